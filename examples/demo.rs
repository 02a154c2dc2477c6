//! The demo: a token endpoint and an API on 127.0.0.1, concurrent traffic through
//! `AuthLayer`, tokens that expire every second, and a forced revocation mid-run.
//!
//! Run with `cargo run --example demo`. It needs no setup and finishes in about 3 s.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
};
use tower::{Layer, ServiceExt};
use tower_client_auth::{AuthLayer, BoxError, Credential, CredentialCache, ReplayBody, source_fn};

const TOKEN_LIFETIME: Duration = Duration::from_secs(1);
const WORKERS: usize = 64;
const RUN_FOR: Duration = Duration::from_millis(2500);

/// What the loopback provider saw.
#[derive(Default)]
struct Provider {
    tokens: Mutex<HashMap<String, Instant>>,
    token_requests: AtomicUsize,
    api_requests: AtomicUsize,
    rejected: AtomicUsize,
}

async fn handle(
    provider: Arc<Provider>,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    if req.uri().path() == "/token" {
        let n = provider.token_requests.fetch_add(1, Relaxed) + 1;
        let token = format!("tok-{n}");
        provider
            .tokens
            .lock()
            .unwrap()
            .insert(token.clone(), Instant::now() + TOKEN_LIFETIME);
        let body = format!("{token} {}", TOKEN_LIFETIME.as_millis());
        return Response::new(Full::new(Bytes::from(body)));
    }
    provider.api_requests.fetch_add(1, Relaxed);
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    let valid = token
        .and_then(|t| t.strip_prefix("Bearer "))
        .and_then(|t| provider.tokens.lock().unwrap().get(t).copied())
        .is_some_and(|expires| Instant::now() < expires);
    if valid {
        Response::new(Full::new(Bytes::from_static(b"{\"items\":[]}")))
    } else {
        provider.rejected.fetch_add(1, Relaxed);
        let mut res = Response::new(Full::new(Bytes::from_static(
            b"{\"message\":\"Token expired.\"}",
        )));
        *res.status_mut() = StatusCode::UNAUTHORIZED;
        res
    }
}

async fn start_provider(provider: Arc<Provider>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let provider = provider.clone();
            let service = hyper::service::service_fn(move |req| {
                let provider = provider.clone();
                async move { Ok::<_, Infallible>(handle(provider, req).await) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    addr
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let provider = Arc::new(Provider::default());
    let addr = start_provider(provider.clone()).await;

    // The credential source: its own client, straight to the token endpoint.
    let token_client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let source = source_fn(move |_cx| {
        let client = token_client.clone();
        async move {
            let res = client
                .request(Request::post(format!("http://{addr}/token")).body(Full::default())?)
                .await?;
            let body = res.into_body().collect().await?.to_bytes();
            let (token, millis) = std::str::from_utf8(&body)?
                .split_once(' ')
                .ok_or("bad token response")?;
            let lifetime = Duration::from_millis(millis.parse()?);
            Ok::<_, BoxError>(Credential::bearer(token)?.expires_in(lifetime))
        }
    });

    // The API client: any tower service; here hyper-util's, under the layer.
    let api_client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>();
    let cache = CredentialCache::new(source);
    let client = AuthLayer::with_cache(cache)
        .allow_http_loopback(true)
        .layer(api_client);

    let sent = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (client, sent, ok) = (client.clone(), sent.clone(), ok.clone());
            tokio::spawn(async move {
                while start.elapsed() < RUN_FOR {
                    let req = Request::get(format!("http://{addr}/v1/items"))
                        .body(Full::default())
                        .unwrap();
                    sent.fetch_add(1, Relaxed);
                    if let Ok(res) = client.clone().oneshot(req).await {
                        if res.status() == StatusCode::OK {
                            ok.fetch_add(1, Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    // Mid-run the provider revokes every token: in-flight requests get 401 and replay.
    tokio::time::sleep(RUN_FOR / 2).await;
    provider.tokens.lock().unwrap().clear();
    for worker in workers {
        worker.await?;
    }
    let elapsed = start.elapsed();

    let rows = [
        ("requests sent", sent.load(Relaxed).to_string()),
        ("requests succeeded", ok.load(Relaxed).to_string()),
        (
            "token fetches",
            provider.token_requests.load(Relaxed).to_string(),
        ),
        (
            "401s answered (each replayed once)",
            provider.rejected.load(Relaxed).to_string(),
        ),
        (
            "API requests incl. replays",
            provider.api_requests.load(Relaxed).to_string(),
        ),
        ("time taken", format!("{:.2} s", elapsed.as_secs_f64())),
    ];
    println!(
        "tower-client-auth demo: bearer tokens living {TOKEN_LIFETIME:?}, {WORKERS} concurrent workers, all tokens revoked at {:?}\n",
        RUN_FOR / 2
    );
    for (what, value) in rows {
        println!("  {what:<38} {value:>10}");
    }
    Ok(())
}
