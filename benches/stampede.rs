//! Stampedes, counted and timed: 10,000 requests arriving as the credential expires, and
//! 1,000 in-flight requests rejected with 401 together, against a loopback token endpoint
//! that takes 20 ms per token. `AuthLayer` against a naive cache written the way a quick
//! hand-rolled one is (a mutex around an optional token; whoever finds it missing
//! fetches). Both fetch through the same client, limited to 64 concurrent token requests.
//!
//! Then the idle burst: 1,000 tasks released 2 ms after the token's expiry on a client
//! idle since its last call, against the same burst mid-lifetime, through a real loopback
//! API over hyper-util (the Tower path) and over reqwest (`AuthMiddleware`, with
//! `--features reqwest`), with and without keep-warm.
//!
//! `cargo bench --bench stampede --features reqwest` prints the tables for BENCHMARKS.md.

#[path = "../tests/support/providers.rs"]
mod providers;

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header::AUTHORIZATION};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower::{Service, ServiceBuilder, ServiceExt, util::BoxCloneSyncService};
use tower_client_auth::{AuthLayer, BoxError, Credential, CredentialCache, source_fn};

const TOKEN_LATENCY: Duration = Duration::from_millis(20);
const LIFETIME: Duration = Duration::from_millis(300);

type TokenClient =
    BoxCloneSyncService<Request<Full<Bytes>>, Response<hyper::body::Incoming>, BoxError>;

/// The loopback token endpoint: 20 ms per token, counted.
async fn token_endpoint() -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let addr = providers::serve(move |_req| {
        let counter = counter.clone();
        async move {
            let n = counter.fetch_add(1, SeqCst) + 1;
            tokio::time::sleep(TOKEN_LATENCY).await;
            Response::new(Full::new(Bytes::from(format!("tok-{n}"))))
        }
    })
    .await;
    (format!("http://{addr}/token"), hits)
}

fn token_client() -> TokenClient {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .concurrency_limit(64)
            .map_err(BoxError::from)
            .service(client),
    )
}

async fn fetch_token(client: TokenClient, url: String) -> Result<String, BoxError> {
    let res = client
        .oneshot(Request::post(url).body(Full::default())?)
        .await?;
    let body = res.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8(body.to_vec())?)
}

/// The API: answers at once; `revoked` tokens get 401.
#[derive(Clone, Default)]
struct Api {
    revoked: Arc<Mutex<Vec<String>>>,
}

impl<B: Send + 'static> Service<Request<B>> for Api {
    type Response = Response<()>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<()>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let auth = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let revoked = self
            .revoked
            .lock()
            .unwrap()
            .iter()
            .any(|t| auth.ends_with(t.as_str()));
        let status = if revoked || auth.is_empty() {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::OK
        };
        std::future::ready(Ok(Response::builder().status(status).body(()).unwrap()))
    }
}

/// The naive design: a mutex around an optional token; whoever finds it missing or
/// expired fetches one itself (no single flight); a 401 clears it and fetches again.
#[derive(Clone)]
struct Naive {
    inner: Api,
    slot: Arc<Mutex<Option<(HeaderValue, Instant)>>>,
    client: TokenClient,
    url: String,
}

impl Naive {
    async fn token(&self) -> Result<HeaderValue, BoxError> {
        if let Some((value, expires)) = self.slot.lock().unwrap().clone() {
            if Instant::now() < expires {
                return Ok(value);
            }
        }
        let token = fetch_token(self.client.clone(), self.url.clone()).await?;
        let value = HeaderValue::try_from(format!("Bearer {token}"))?;
        *self.slot.lock().unwrap() = Some((value.clone(), Instant::now() + LIFETIME));
        Ok(value)
    }
}

impl Service<Request<()>> for Naive {
    type Response = Response<()>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<()>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<()>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            req.headers_mut().insert(AUTHORIZATION, this.token().await?);
            let mut api = this.inner.clone();
            let res = api
                .call(
                    Request::get("https://api.test/")
                        .header(AUTHORIZATION, req.headers()[AUTHORIZATION].clone())
                        .body(())
                        .unwrap(),
                )
                .await?;
            if res.status() != StatusCode::UNAUTHORIZED {
                return Ok(res);
            }
            *this.slot.lock().unwrap() = None;
            let value = this.token().await?;
            Ok(api
                .call(
                    Request::get("https://api.test/")
                        .header(AUTHORIZATION, value)
                        .body(())
                        .unwrap(),
                )
                .await?)
        })
    }
}

struct Outcome {
    fetches: usize,
    ok: usize,
    p50: Duration,
    p99: Duration,
}

/// Fires `n` requests at once through `svc`; latency per request, percentiles.
async fn fire<S>(svc: S, n: usize, hits: &AtomicUsize, before: usize) -> Outcome
where
    S: Service<Request<()>, Response = Response<()>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
{
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                let ok = svc
                    .oneshot(Request::get("https://api.test/").body(()).unwrap())
                    .await
                    .is_ok_and(|r| r.status() == 200);
                (start.elapsed(), ok)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(n);
    let mut ok = 0;
    for task in tasks {
        let (latency, success) = task.await.unwrap();
        latencies.push(latency);
        ok += usize::from(success);
    }
    latencies.sort();
    Outcome {
        fetches: hits.load(SeqCst) - before,
        ok,
        p50: latencies[n / 2],
        p99: latencies[n * 99 / 100],
    }
}

fn row(what: &str, design: &str, n: usize, o: &Outcome) {
    println!(
        "| {what} | {design} | {n} | {} | {} | {:.1} | {:.1} |",
        o.ok,
        o.fetches,
        o.p50.as_secs_f64() * 1e3,
        o.p99.as_secs_f64() * 1e3
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (url, hits) = token_endpoint().await;
    let client = token_client();

    // One token round trip, for scale.
    let start = Instant::now();
    fetch_token(client.clone(), url.clone()).await.unwrap();
    let round_trip = start.elapsed();

    let source = {
        let (client, url) = (client.clone(), url.clone());
        source_fn(move |_| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                Ok::<_, BoxError>(
                    Credential::bearer(fetch_token(client, url).await?)?.expires_in(LIFETIME),
                )
            }
        })
    };
    let api = Api::default();
    let layer = AuthLayer::new(source).any_https_origin();
    let ours = ServiceBuilder::new()
        .map_request(|r: Request<()>| r.map(|()| Full::<Bytes>::default()))
        .layer(layer.clone())
        .map_request(|r: Request<tower_client_auth::ReplayBody<Full<Bytes>>>| r.map(|_| ()))
        .service(api.clone());
    let naive = Naive {
        inner: api.clone(),
        slot: Arc::default(),
        client: client.clone(),
        url: url.clone(),
    };

    println!(
        "token round trip: {:.1} ms (20 ms endpoint latency on loopback)\n",
        round_trip.as_secs_f64() * 1e3
    );
    println!(
        "| scenario | design | requests | succeeded | token fetches | p50 latency (ms) | p99 latency (ms) |"
    );
    println!("|---|---|---|---|---|---|---|");

    // 1. 10,000 requests arrive just after the credential expired.
    for (design, naive_run) in [
        ("AuthLayer (single flight)", false),
        ("naive mutex cache", true),
    ] {
        if naive_run {
            naive.token().await.unwrap();
        } else {
            layer.cache().credential().await.unwrap();
        }
        tokio::time::sleep(LIFETIME + Duration::from_millis(20)).await;
        let before = hits.load(SeqCst);
        let outcome = if naive_run {
            fire(naive.clone(), 10_000, &hits, before).await
        } else {
            fire(ours.clone(), 10_000, &hits, before).await
        };
        row("10,000 requests at expiry", design, 10_000, &outcome);
    }

    // 2. 1,000 requests in flight with a token the API then revokes: all get 401.
    for (design, naive_run) in [
        ("AuthLayer (single flight)", false),
        ("naive mutex cache", true),
    ] {
        tokio::time::sleep(LIFETIME + Duration::from_millis(20)).await;
        let token = if naive_run {
            naive
                .token()
                .await
                .unwrap()
                .to_str()
                .unwrap()
                .trim_start_matches("Bearer ")
                .to_owned()
        } else {
            let c = layer.cache().credential().await.unwrap();
            c.headers()
                .next()
                .unwrap()
                .1
                .to_str()
                .unwrap()
                .trim_start_matches("Bearer ")
                .to_owned()
        };
        api.revoked.lock().unwrap().push(token);
        let before = hits.load(SeqCst);
        let outcome = if naive_run {
            fire(naive.clone(), 1_000, &hits, before).await
        } else {
            fire(ours.clone(), 1_000, &hits, before).await
        };
        row("1,000 concurrent 401s", design, 1_000, &outcome);
    }

    idle_burst(&url, &client, &hits).await;
}

/// The idle burst's token lifetime: the soft window opens 0.5-0.6 s before expiry.
const IDLE_LIFETIME: Duration = Duration::from_secs(2);
const BURST: usize = 1_000;
const ROUNDS: usize = 9;

/// Rounds of the idle burst: `ROUNDS`, or `TCA_ROUNDS` (its per-round ratio is noisy:
/// more rounds give steadier quartiles).
fn rounds() -> usize {
    std::env::var("TCA_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .filter(|r| *r > 0)
        .unwrap_or(ROUNDS)
}

/// One client under test: the Tower path or the reqwest one, over its own cache.
#[derive(Clone)]
enum Path {
    Tower(BoxCloneSyncService<Request<Full<Bytes>>, Response<hyper::body::Incoming>, BoxError>),
    #[cfg(feature = "reqwest")]
    Reqwest(reqwest_middleware::ClientWithMiddleware),
}

impl Path {
    /// One GET to the API, read to its end; whether it succeeded.
    async fn get(self, url: &str) -> bool {
        match self {
            Path::Tower(svc) => {
                let req = Request::get(url).body(Full::<Bytes>::default()).unwrap();
                match svc.oneshot(req).await {
                    Ok(res) => {
                        let ok = res.status() == StatusCode::OK;
                        ok && res.into_body().collect().await.is_ok()
                    }
                    Err(_) => false,
                }
            }
            #[cfg(feature = "reqwest")]
            Path::Reqwest(client) => match client.get(url).send().await {
                Ok(res) => res.status() == StatusCode::OK && res.bytes().await.is_ok(),
                Err(_) => false,
            },
        }
    }
}

/// `BURST` tasks, all released at `at`; each one's latency counted from `at`.
async fn burst(path: &Path, url: &str, at: tokio::time::Instant) -> (Duration, Duration, usize) {
    let (go, ready) = tokio::sync::watch::channel(false);
    let tasks: Vec<_> = (0..BURST)
        .map(|_| {
            let (path, url, mut ready) = (path.clone(), url.to_owned(), ready.clone());
            tokio::spawn(async move {
                let _ = ready.wait_for(|go| *go).await;
                let ok = path.get(&url).await;
                (tokio::time::Instant::now(), ok)
            })
        })
        .collect();
    drop(ready);
    tokio::time::sleep_until(at).await;
    let released = tokio::time::Instant::now();
    go.send(true).unwrap();
    let mut latencies = Vec::with_capacity(BURST);
    let mut ok = 0;
    for task in tasks {
        let (done, success) = task.await.unwrap();
        latencies.push(done - released);
        ok += usize::from(success);
    }
    latencies.sort();
    (latencies[BURST / 2], latencies[BURST * 99 / 100], ok)
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

/// The idle burst (scenario 3): per round, a new cache is warmed up (its token issued at `t0`) and
/// the connection pool filled; a burst at `t0 + 1 s` (mid-lifetime); then nothing until
/// the same burst 2 ms after the first token's expiry.
async fn idle_burst(token_url: &str, token_client: &TokenClient, hits: &AtomicUsize) {
    let api = providers::serve(|req| async move {
        let status = if req.headers().contains_key(AUTHORIZATION) {
            StatusCode::OK
        } else {
            StatusCode::UNAUTHORIZED
        };
        Response::builder()
            .status(status)
            .body(Full::new(Bytes::from_static(b"ok")))
            .unwrap()
    })
    .await;
    let origin = format!("http://{api}");
    let url = format!("{origin}/v1/items");
    let source = {
        let (client, url) = (token_client.clone(), token_url.to_owned());
        source_fn(move |_| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                Ok::<_, BoxError>(
                    Credential::bearer(fetch_token(client, url).await?)?.expires_in(IDLE_LIFETIME),
                )
            }
        })
    };
    println!(
        "\nidle burst: {BURST} tasks, a {} s token, a loopback API (HTTP/1.1), {} rounds, medians\n",
        IDLE_LIFETIME.as_secs(),
        rounds()
    );
    println!(
        "| path | keep-warm | mid-lifetime p50 / p99 (ms) | after idle, 2 ms past expiry: p50 / p99 (ms) | p99 after idle × mid-lifetime, per round: median (quartiles) | token fetches in the idle burst |"
    );
    println!("|---|---|---|---|---|---|");
    let paths: &[&str] = if cfg!(feature = "reqwest") {
        &["tower (hyper-util)", "reqwest"]
    } else {
        &["tower (hyper-util)"]
    };
    for path_name in paths {
        for keep_warm in [false, true] {
            let (mut mid50, mut mid99, mut idle50, mut idle99, mut fetches) =
                (vec![], vec![], vec![], vec![], vec![]);
            // Each round's own ratio: a ratio of medians mixes rounds whose bursts met
            // different loads.
            let mut ratios = vec![];
            let mut failed = 0;
            let rounds = rounds();
            for _ in 0..rounds {
                let cache = CredentialCache::builder(source.clone())
                    .keep_warm(keep_warm)
                    .build()
                    .unwrap();
                let path = match *path_name {
                    "tower (hyper-util)" => {
                        let http = Client::builder(TokioExecutor::new())
                            .build_http::<tower_client_auth::ReplayBody<Full<Bytes>>>();
                        let layer = AuthLayer::with_cache(cache.clone())
                            .origin(&origin)
                            .unwrap()
                            .allow_http_loopback(true);
                        Path::Tower(BoxCloneSyncService::new(tower::Layer::layer(&layer, http)))
                    }
                    #[cfg(feature = "reqwest")]
                    _ => {
                        let middleware =
                            tower_client_auth::reqwest::AuthMiddleware::with_cache(cache.clone())
                                .origin(&origin)
                                .unwrap()
                                .allow_http_loopback(true);
                        Path::Reqwest(
                            reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
                                .with(middleware)
                                .build(),
                        )
                    }
                    #[cfg(not(feature = "reqwest"))]
                    _ => unreachable!(),
                };
                cache.warm_up().await.unwrap();
                let t0 = tokio::time::Instant::now();
                // Fill the connection pool, as a client in use has it.
                let (_, _, ok) = burst(&path, &url, t0).await;
                failed += BURST - ok;
                let (p50, p99, ok) = burst(&path, &url, t0 + IDLE_LIFETIME / 2).await;
                failed += BURST - ok;
                mid50.push(p50);
                mid99.push(p99);
                let expired = t0 + IDLE_LIFETIME + Duration::from_millis(2);
                // Keep-warm's refresh has happened by now: count only the burst's.
                tokio::time::sleep_until(expired - Duration::from_millis(1)).await;
                let before = hits.load(SeqCst);
                let (p50, p99, ok) = burst(&path, &url, expired).await;
                failed += BURST - ok;
                idle50.push(p50);
                idle99.push(p99);
                ratios.push(p99.as_secs_f64() / mid99.last().unwrap().as_secs_f64());
                fetches.push(hits.load(SeqCst) - before);
            }
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            let (m50, m99, i50, i99) =
                (median(mid50), median(mid99), median(idle50), median(idle99));
            ratios.sort_by(f64::total_cmp);
            let quartile = |q: usize| ratios[(rounds - 1) * q / 4];
            println!(
                "| {path_name} | {} | {:.1} / {:.1} | {:.1} / {:.1} | {:.2} ({:.2}-{:.2}) | {} |",
                if keep_warm { "on" } else { "off" },
                ms(m50),
                ms(m99),
                ms(i50),
                ms(i99),
                quartile(2),
                quartile(1),
                quartile(3),
                {
                    fetches.sort();
                    fetches[rounds / 2]
                },
            );
            assert_eq!(failed, 0, "{path_name}: every request succeeds");
        }
    }
}
