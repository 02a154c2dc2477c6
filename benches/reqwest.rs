//! The reqwest path: `AuthMiddleware` against the same reqwest-middleware stack with a
//! trivial middleware that inserts a fixed header (the floor a reqwest user compares
//! with), over a real reqwest client and a loopback HTTP/1.1 API in the same process.
//!
//! - `cargo bench --bench reqwest --features reqwest`: throughput, 64 tasks on a
//!   2-thread runtime, interleaved rounds (each variant and the fixed-header stack
//!   alternate, the order flipping every round); prints the quartiles of
//!   throughput(variant) / throughput(fixed header) and the time added per request
//!   (`TCA_THREADS=1` for one runtime thread; `TCA_ROUNDS=N` for more rounds: a round's
//!   ratio strays by 10 % on a shared machine, so a verdict near the goal needs ~100;
//!   names after `--` measure those variants only).
//! - `BENCH=reqwest bash benches/instructions.sh`: instructions per request under
//!   callgrind (this binary run as `reqwest instructions VARIANT N`: N requests one after
//!   the other on a current-thread runtime).

#[path = "../tests/support/providers.rs"]
mod providers;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header::AUTHORIZATION};
use http_body_util::Full;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware, Middleware, Next};
use tower_client_auth::{
    BoxError, Credential, StaticCredential, reqwest::AuthMiddleware, source_fn,
};

const TOKEN: &str =
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJiZW5jaCIsImV4cCI6NDEwMjQ0NDgwMH0.c2lnbmF0dXJlLXNpZ25hdHVyZQ";
const TASKS: usize = 64;
const PER_TASK: usize = 50;
const ROUNDS: usize = 31;

/// The floor: a middleware that inserts a fixed header, as a reqwest user writes one.
struct FixedHeader(HeaderValue);

#[async_trait::async_trait]
impl Middleware for FixedHeader {
    async fn handle(
        &self,
        mut req: reqwest::Request,
        extensions: &mut http::Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        req.headers_mut().insert(AUTHORIZATION, self.0.clone());
        next.run(req, extensions).await
    }
}

/// The loopback API: 200 and a short body.
async fn api() -> String {
    let addr = providers::serve(|_req| async move {
        Response::new(Full::new(Bytes::from_static(b"{\"ok\":true}")))
    })
    .await;
    format!("http://{addr}")
}

/// The client of `variant`, warmed up (its credential fetched).
async fn client(variant: &str, origin: &str) -> ClientWithMiddleware {
    let http = reqwest::Client::new();
    let builder = ClientBuilder::new(http);
    let refreshable = || {
        source_fn(|_| async {
            Ok::<_, BoxError>(Credential::bearer(TOKEN)?.expires_in(Duration::from_secs(3600)))
        })
    };
    let builder = match variant {
        "none" => builder,
        "header" => {
            let mut value = HeaderValue::try_from(format!("Bearer {TOKEN}")).unwrap();
            value.set_sensitive(true);
            builder.with(FixedHeader(value))
        }
        "refreshable" => builder.with(warm(AuthMiddleware::new(refreshable()), origin).await),
        "no_replay" => builder.with(
            warm(
                AuthMiddleware::new(refreshable()).replay_rejected(false),
                origin,
            )
            .await,
        ),
        "static" => builder.with(
            warm(
                AuthMiddleware::new(StaticCredential::bearer(TOKEN).unwrap()),
                origin,
            )
            .await,
        ),
        other => panic!("unknown variant {other}"),
    };
    builder.build()
}

async fn warm<P: tower_client_auth::CredentialSource>(
    middleware: AuthMiddleware<P>,
    origin: &str,
) -> AuthMiddleware<P> {
    let middleware = middleware.origin(origin).unwrap().allow_http_loopback(true);
    middleware.warm_up().await.unwrap();
    middleware
}

/// A GET of `url`; with `TCA_TIMEOUT_MS` set, with that timeout of its own (the
/// adapter then keeps the call's deadline: `Exchange::deadline`).
async fn get(client: &ClientWithMiddleware, url: &str) {
    static TIMEOUT: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    let timeout = TIMEOUT.get_or_init(|| {
        let ms = std::env::var("TCA_TIMEOUT_MS").ok()?.parse().ok()?;
        Some(Duration::from_millis(ms))
    });
    let mut req = client.get(url);
    if let Some(timeout) = timeout {
        req = req.timeout(*timeout);
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    std::hint::black_box(res.bytes().await.unwrap());
}

/// `TASKS` tasks, `PER_TASK` requests each, one after the other; the wall time.
async fn round(client: &ClientWithMiddleware, url: &Arc<str>) -> f64 {
    let start = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                for _ in 0..PER_TASK {
                    get(&client, &url).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    start.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("instructions") {
        let (Some(variant), Some(n)) = (args.get(1), args.get(2).and_then(|n| n.parse().ok()))
        else {
            eprintln!("usage: reqwest instructions VARIANT N");
            return;
        };
        return instructions(variant, n);
    }
    // TCA_THREADS=1 runs it on one runtime thread (contention out of the picture).
    let threads = std::env::var("TCA_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap();
    let rounds = std::env::var("TCA_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .filter(|r| *r > 0)
        .unwrap_or(ROUNDS);
    // Cargo passes `--bench`; any other argument names a variant.
    let mut variants: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if variants.is_empty() {
        variants = vec!["none", "static", "refreshable", "no_replay"];
    }
    rt.block_on(throughput(&variants, rounds));
}

/// N requests one after the other, on one thread: for callgrind.
fn instructions(variant: &str, n: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let origin = api().await;
        let url = format!("{origin}/v1/items");
        let client = client(variant, &origin).await;
        // The connection is opened before the count starts (also for N = 0).
        get(&client, &url).await;
        for _ in 0..n {
            get(&client, &url).await;
        }
    });
}

async fn throughput(variants: &[&str], rounds: usize) {
    let origin = api().await;
    let url: Arc<str> = Arc::from(format!("{origin}/v1/items"));
    let floor = client("header", &origin).await;
    let requests = (TASKS * PER_TASK) as f64;
    println!(
        "reqwest path: {TASKS} tasks x {PER_TASK} requests per round, {rounds} interleaved rounds, loopback HTTP/1.1 API\n"
    );
    println!(
        "| variant | throughput x fixed-header middleware: median (quartiles) | time added per request (µs, median) |"
    );
    println!("|---|---|---|");
    for &variant in variants {
        let client = client(variant, &origin).await;
        // Warm both pools.
        round(&floor, &url).await;
        round(&client, &url).await;
        let mut ratios = Vec::with_capacity(rounds);
        let mut added = Vec::with_capacity(rounds);
        for r in 0..rounds {
            let (tf, tv) = if r % 2 == 0 {
                let tf = round(&floor, &url).await;
                (tf, round(&client, &url).await)
            } else {
                let tv = round(&client, &url).await;
                (round(&floor, &url).await, tv)
            };
            ratios.push(tf / tv);
            added.push((tv - tf) / requests * 1e6);
        }
        ratios.sort_by(f64::total_cmp);
        added.sort_by(f64::total_cmp);
        let q = |xs: &[f64], k: usize| xs[(xs.len() - 1) * k / 4];
        println!(
            "| {variant} | {:.3} ({:.3}-{:.3}) | {:+.2} |",
            q(&ratios, 2),
            q(&ratios, 1),
            q(&ratios, 3),
            q(&added, 2),
        );
    }
}
