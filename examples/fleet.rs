//! A fleet on one Redis: this program starts a loopback OAuth2 API (client credentials,
//! tokens living 2 s), then runs itself as 4 worker processes, each with its own
//! `AuthLayer` and its own Redis connection, 25 callers each, for 6 s. It prints what the
//! token endpoint issued for the whole fleet beside the prediction (one token per
//! lifetime, not one per process), then does the same run with no store for comparison.
//! Exits with an error when a figure is off its prediction.
//!
//! ```text
//! redis-server --port 6379 --save ''          # a throwaway Redis, if none is running
//! cargo run --example fleet --features redis   # or: -- redis://user:pass@host:6379
//! ```

use std::{
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, BoxError, ReplayBody,
    store::redis::RedisStore,
    token::{TokenRequest, TokenSource},
};

mod support;
use support::apis::ClientCredentialsApi;

const PROCESSES: usize = 4;
const CALLERS: usize = 25;
const RUN_FOR: Duration = Duration::from_secs(6);
/// The tokens' stated lifetime, in seconds.
const LIFETIME: u64 = 2;
const WORKER: &str = "TCA_FLEET_EXAMPLE_WORKER";

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    if let Ok(spec) = std::env::var(WORKER) {
        return worker(&spec).await;
    }
    let redis = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
    if let Err(e) = RedisStore::connect(&redis, "fleet-example probe").await {
        eprintln!(
            "No Redis answers at {redis} ({e}).\n\
             Start a throwaway one with `redis-server --port 6379 --save ''` \
             (Debian/Ubuntu: `apt-get install redis-server`; macOS: `brew install redis`),\n\
             or pass another URL: `cargo run --example fleet --features redis -- redis://host:port`."
        );
        std::process::exit(2);
    }

    println!(
        "{PROCESSES} processes x {CALLERS} callers for {}s, tokens living {LIFETIME}s\n",
        RUN_FOR.as_secs()
    );
    println!(
        "{:<22} {:>8} {:>8} {:>8} {:>10}  prediction",
        "run", "calls", "failed", "401s", "tokens"
    );
    let shared = run(Some(&redis)).await?;
    let alone = run(None).await?;

    // A 2 s token is refreshed after about 1.2 s (the cache's soft window and clock-skew
    // margin): one per 1.2 s of the run for the whole fleet when shared, that many per
    // process when not.
    let lifetimes = RUN_FOR.as_secs_f64() / 1.2;
    let fleet_max = (RUN_FOR.as_secs_f64() + 2.0) as u64;
    let rows = [
        (
            "shared through Redis",
            &shared,
            format!("about {lifetimes:.0}, at most {fleet_max}: one per lifetime for the fleet"),
        ),
        (
            "no store (each alone)",
            &alone,
            format!(
                "about {:.0}: one per lifetime per process",
                lifetimes * PROCESSES as f64
            ),
        ),
    ];
    for (name, run, prediction) in &rows {
        println!(
            "{name:<22} {:>8} {:>8} {:>8} {:>10}  {prediction}",
            run.calls, run.failed, run.rejected, run.tokens
        );
    }
    let ok = shared.failed == 0
        && alone.failed == 0
        && shared.tokens <= fleet_max
        && shared.tokens >= 2
        && alone.tokens > shared.tokens;
    if !ok {
        return Err("a figure is off its prediction".into());
    }
    println!("\nevery figure as predicted");
    Ok(())
}

/// What one run saw, summed over its processes.
struct Run {
    calls: u64,
    failed: u64,
    rejected: u64,
    tokens: u64,
}

/// Runs the worker processes against a fresh API, sharing through `redis` if given.
async fn run(redis: Option<&str>) -> Result<Run, BoxError> {
    let api = ClientCredentialsApi::new("fleet-id", "fleet-secret", LIFETIME);
    let base = support::start(api.clone()).await;
    // A namespace per run, so this run starts with nothing stored.
    let namespace = format!("fleet-example {base} {}", std::process::id());
    let spec = format!("{base} {} {namespace}", redis.unwrap_or("-"));
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            Command::new(std::env::current_exe()?)
                .env(WORKER, &spec)
                .stdout(Stdio::piped())
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    let outputs = tokio::task::spawn_blocking(move || {
        children
            .into_iter()
            .map(|c| c.wait_with_output())
            .collect::<Result<Vec<_>, _>>()
    })
    .await??;
    let (mut calls, mut failed) = (0, 0);
    for out in outputs {
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        calls += words
            .next()
            .and_then(|w| w.parse::<u64>().ok())
            .ok_or("a worker failed")?;
        failed += words
            .next()
            .and_then(|w| w.parse::<u64>().ok())
            .ok_or("a worker failed")?;
    }
    Ok(Run {
        calls,
        failed,
        rejected: api.rejected.get(),
        tokens: api.tokens_issued.get(),
    })
}

/// One worker process: `CALLERS` callers through one `AuthLayer` for `RUN_FOR`; prints
/// its calls and failures.
async fn worker(spec: &str) -> Result<(), BoxError> {
    let mut parts = spec.splitn(3, ' ');
    let (base, redis, namespace) = (
        parts.next().ok_or("spec")?,
        parts.next().ok_or("spec")?,
        parts.next().ok_or("spec")?,
    );
    let token_url = format!("{base}/oauth/v2/token");
    let source = TokenSource::new(TokenRequest::oauth2_client_credentials(
        &token_url,
        "fleet-id",
        "fleet-secret",
    )?)
    .allow_http_loopback(true); // the fake API is plain http on loopback
    let mut builder = AuthLayer::builder(source)
        .origin(base)?
        .allow_http_loopback(true);
    if redis != "-" {
        builder = builder.store(RedisStore::connect(redis, namespace).await?);
    }
    let http = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>();
    let client = builder.build()?.layer(http);
    let (calls, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let until = Instant::now() + RUN_FOR;
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (client, calls, failed) = (client.clone(), calls.clone(), failed.clone());
            let url = format!("{base}/v1/shipments");
            tokio::spawn(async move {
                while Instant::now() < until {
                    calls.fetch_add(1, Relaxed);
                    let req = Request::get(&url).body(Full::default()).expect("a request");
                    let ok = match client.clone().oneshot(req).await {
                        Ok(res) => {
                            let success = res.status().is_success();
                            res.into_body().collect().await.is_ok() && success
                        }
                        Err(_) => false,
                    };
                    if !ok {
                        failed.fetch_add(1, Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await?;
    }
    println!("{} {}", calls.load(Relaxed), failed.load(Relaxed));
    Ok(())
}
