//! The fleet at expiry, counted and timed: 1, 2, 4 and 8 OS processes (this binary run
//! as workers), 100 callers each, all asking for the credential 10 ms after it expired,
//! 6 times, against a loopback token endpoint that takes 20 ms per token. With a
//! `RedisStore` (a `redis-server` this bench starts on a free port) and with each process
//! alone. Prints, per row, the token endpoint calls per expiry for the whole fleet and
//! the waiters' p50 and p99 (every caller of a burst waits for the refresh: no background
//! refresh, no window).
//!
//! `cargo bench --bench fleet --features redis` prints the table for BENCHMARKS.md
//! (`redis-server` must be installed; `.ci/run` installs it).

#[path = "../tests/support/providers.rs"]
mod providers;

use std::{
    net::TcpListener,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower_client_auth::{
    BoxError, Credential, CredentialCache, source_fn, store::redis::RedisStore,
};

const WORKER: &str = "TCA_FLEET_BENCH_WORKER";
const CALLERS: usize = 100;
const BURSTS: usize = 6;
/// Tokens expire on the wall clock's whole multiples of this.
const PERIOD_MS: u64 = 1_000;
/// Callers ask this long after each expiry.
const AFTER_MS: u64 = 10;
const TOKEN_LATENCY: Duration = Duration::from_millis(20);

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The next period boundary at least `ahead_ms` from now.
fn next_boundary(ahead_ms: u64) -> u64 {
    (unix_ms() + ahead_ms).div_ceil(PERIOD_MS) * PERIOD_MS
}

fn main() {
    if let Ok(spec) = std::env::var(WORKER) {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(worker(&spec))
            .unwrap();
        return;
    }
    // `cargo bench` passes `--bench`; anything else (`cargo test --benches`) only checks
    // that this builds.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("tca-fleet-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut redis = Command::new("redis-server")
        .args([
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--port",
        ])
        .arg(port.to_string())
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server (apt-get install -y redis-server)");
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (endpoint, _calls) = token_endpoint().await;
        println!(
            "| processes | shared through | token calls per expiry | waiters' p50 | waiters' p99 |"
        );
        println!("|---|---|---|---|---|");
        for processes in [1, 2, 4, 8] {
            for redis_url in [None, Some(format!("redis://127.0.0.1:{port}"))] {
                let row = run(&endpoint, redis_url.as_deref(), processes).await;
                println!(
                    "| {processes} | {} | {:.1} | {:.1} ms | {:.1} ms |",
                    if redis_url.is_some() {
                        "Redis"
                    } else {
                        "nothing (alone)"
                    },
                    row.calls_per_expiry,
                    row.p50_ms,
                    row.p99_ms
                );
            }
        }
    });
    let _ = redis.kill();
    let _ = redis.wait();
    let _ = std::fs::remove_dir_all(dir);
}

struct Row {
    calls_per_expiry: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// The token endpoint: 20 ms per token, each expiring at the next period boundary.
async fn token_endpoint() -> (String, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let addr = providers::serve(move |_req| {
        let counter = counter.clone();
        async move {
            let n = counter.fetch_add(1, SeqCst) + 1;
            tokio::time::sleep(TOKEN_LATENCY).await;
            let exp = next_boundary(50);
            Response::new(Full::new(Bytes::from(format!("tok-{n} {exp}"))))
        }
    })
    .await;
    (format!("http://{addr}/token"), calls)
}

/// Runs `processes` workers and gathers what they measured.
async fn run(endpoint: &str, redis: Option<&str>, processes: usize) -> Row {
    let namespace = format!("fleet-bench {processes} {}", unix_ms());
    let spec = format!("{endpoint} {} {namespace}", redis.unwrap_or("-"));
    let children: Vec<_> = (0..processes)
        .map(|_| {
            Command::new(std::env::current_exe().unwrap())
                .env(WORKER, &spec)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs = tokio::task::spawn_blocking(move || {
        children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let (mut fetches, mut waits) = (0usize, Vec::new());
    for out in outputs {
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        fetches += words
            .next()
            .and_then(|w| w.parse::<usize>().ok())
            .expect("a worker's report");
        waits.extend(words.filter_map(|w| w.parse::<u64>().ok()));
    }
    waits.sort_unstable();
    let at = |q: f64| waits[((waits.len() - 1) as f64 * q) as usize] as f64 / 1_000.0;
    Row {
        calls_per_expiry: fetches as f64 / BURSTS as f64,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
    }
}

/// One worker process: a cache on the endpoint (and the store), warmed up, then
/// `BURSTS` bursts of `CALLERS` calls just after each expiry. Prints the fetches made
/// during the bursts, then each call's latency in microseconds.
async fn worker(spec: &str) -> Result<(), BoxError> {
    let mut parts = spec.splitn(3, ' ');
    let (endpoint, redis, namespace) = (
        parts.next().unwrap().to_owned(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let fetches = Arc::new(AtomicUsize::new(0));
    let counted = fetches.clone();
    let source = source_fn(move |_cx| {
        let (http, endpoint, counted) = (http.clone(), endpoint.clone(), counted.clone());
        async move {
            counted.fetch_add(1, SeqCst);
            let res = http
                .request(Request::post(endpoint).body(Full::default())?)
                .await?;
            let body = res.into_body().collect().await?.to_bytes();
            let text = String::from_utf8(body.to_vec())?;
            let (token, exp) = text.split_once(' ').ok_or("a malformed answer")?;
            let exp = UNIX_EPOCH + Duration::from_millis(exp.parse()?);
            Ok::<_, BoxError>(Credential::bearer(token)?.expires_at(exp))
        }
    });
    let mut builder = CredentialCache::builder(source)
        .soft_window(Duration::ZERO)
        .hard_window(Duration::ZERO)
        .window_jitter(0.0);
    if redis != "-" {
        builder = builder.store(RedisStore::connect(redis, namespace).await?);
    }
    let cache = builder.build()?;
    cache.credential().await?;
    let before = fetches.load(SeqCst);
    let mut waits = Vec::new();
    for _ in 0..BURSTS {
        let at = next_boundary(300) + AFTER_MS;
        tokio::time::sleep(Duration::from_millis(at.saturating_sub(unix_ms()))).await;
        let callers: Vec<_> = (0..CALLERS)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move {
                    let started = Instant::now();
                    cache.credential().await.map(|_| started.elapsed())
                })
            })
            .collect();
        for caller in callers {
            waits.push(caller.await??.as_micros() as u64);
        }
    }
    let mut out = format!("{}", fetches.load(SeqCst) - before);
    for w in waits {
        out.push(' ');
        out.push_str(&w.to_string());
    }
    println!("{out}");
    Ok(())
}
