//! The main job: the five authentication styles (A–E, see the README), each against its
//! own fake API on loopback, each under 16 concurrent workers for 3 s while tokens expire,
//! sessions end and tokens are revoked on a fixed schedule. Prints, per style, what the
//! provider saw next to what the schedule predicts, and a naive client under the same
//! load for comparison. Exits with an error if a figure differs from its prediction.
//!
//! `cargo run --example demo` (add `--release` for bigger request counts). No setup.

use std::{
    sync::Arc,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, BoxError, Credential, CredentialSource, ReplayBody, RotatingCredential,
    StaticCredential,
    token::{BodyEncoding, ClientAuth, TokenRequest, TokenSource},
};

mod support;
use support::apis::{AudienceApi, ClientCredentialsApi, PersonalTokenApi, RotatingApi, SessionApi};

const WORKERS: usize = 16;
const RUN_FOR: Duration = Duration::from_secs(3);

/// Something the schedule does to the provider at a moment of the run.
type Event = (Duration, Box<dyn FnOnce() + Send>);

fn at(secs: f64, event: impl FnOnce() + Send + 'static) -> Event {
    (Duration::from_secs_f64(secs), Box::new(event))
}

/// What one run saw.
#[derive(Default)]
struct Load {
    sent: u64,
    ok: u64,
}

/// `WORKERS` loops, each sending GET `url` through `send` until `RUN_FOR` is over; each
/// event happens at its moment.
async fn drive<F, Fut>(url: String, events: Vec<Event>, send: F) -> Load
where
    F: Fn(String) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let (sent, ok) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let start = Instant::now();
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (send, url, sent, ok) = (send.clone(), url.clone(), sent.clone(), ok.clone());
            tokio::spawn(async move {
                while start.elapsed() < RUN_FOR {
                    sent.fetch_add(1, Relaxed);
                    if send(url.clone()).await {
                        ok.fetch_add(1, Relaxed);
                    }
                }
            })
        })
        .collect();
    for (moment, event) in events {
        tokio::time::sleep_until((start + moment).into()).await;
        event();
    }
    for worker in workers {
        worker.await.expect("a worker");
    }
    Load {
        sent: sent.load(Relaxed),
        ok: ok.load(Relaxed),
    }
}

/// One style's figures: observed by the provider (or the cache, for style E), expected
/// from the schedule.
struct Row {
    style: &'static str,
    load: Load,
    rejected: u64,
    replays: u64,
    fetches: u64,
    expected: u64,
    why: &'static str,
}

/// Runs `source` through `AuthLayer` over hyper-util under the load; `observed` reads the
/// provider's count of tokens issued afterwards.
async fn with_the_crate<P: CredentialSource>(
    base: &str,
    path: &str,
    source: P,
    events: Vec<Event>,
) -> (Load, tower_client_auth::CacheStats) {
    let http = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>();
    let client = AuthLayer::new(source)
        .origin(base)
        .expect("an origin")
        .allow_http_loopback(true) // the fake APIs are plain http on loopback
        .layer(http);
    let svc = client.clone();
    let load = drive(format!("{base}{path}"), events, move |url| {
        let svc = svc.clone();
        async move {
            let req = Request::get(url).body(Full::default()).expect("a request");
            match svc.oneshot(req).await {
                Ok(res) => {
                    let success = res.status().is_success();
                    res.into_body().collect().await.is_ok() && success
                }
                Err(_) => false,
            }
        }
    })
    .await;
    (load, client.cache().stats())
}

async fn style_a() -> Row {
    // JWTs living 4 s, `exp` floored to the second as real servers do.
    let api = SessionApi::new("key", "secret", 4);
    let base = support::start(api.clone()).await;
    let source = TokenSource::session_login(&format!("{base}/v1/sessions"), "key", "secret")
        .expect("a token request")
        .allow_http_loopback(true);
    let (load, stats) = with_the_crate(&base, "/v1/consents", source, vec![]).await;
    Row {
        style: "A  session login, JWT exp",
        load,
        rejected: api.rejected.get(),
        replays: stats.replays,
        fetches: api.logins.get(),
        expected: 2,
        why: "1 + 1 renewal before the floored exp",
    }
}

async fn style_b() -> Row {
    let api = AudienceApi::new("id", "secret", "https://api.example", 2);
    let base = support::start(api.clone()).await;
    let request =
        TokenRequest::oauth2_client_credentials(&format!("{base}/oauth/token"), "id", "secret")
            .expect("a token request")
            .client_auth(ClientAuth::Body)
            .encoding(BodyEncoding::Json)
            .field("audience", "https://api.example");
    let source = TokenSource::new(request).allow_http_loopback(true);
    let (load, stats) = with_the_crate(&base, "/api/vessels", source, vec![]).await;
    Row {
        style: "B  client creds, JSON + audience",
        load,
        rejected: api.rejected.get(),
        replays: stats.replays,
        fetches: api.tokens_issued.get(),
        expected: 3,
        why: "1 + 2 renewals before expires_in (2 s)",
    }
}

async fn style_c() -> (Row, u64, u64) {
    let api = RotatingApi::new("api-key");
    let base = support::start(api.clone()).await;
    let source = TokenSource::api_key_login(
        &format!("{base}/v3/auth/login"),
        &format!("{base}/v3/auth/refresh"),
        "api-key",
    )
    .expect("a token request")
    .allow_http_loopback(true);
    let (a, b) = (api.clone(), api.clone());
    let events = vec![
        at(1.0, move || a.expire_sessions()),
        at(2.0, move || b.expire_sessions()),
    ];
    let (load, stats) = with_the_crate(&base, "/v3/accounts", source, events).await;
    let row = Row {
        style: "C  api-key login, rotating refresh",
        load,
        rejected: api.rejected.get(),
        replays: stats.replays,
        fetches: api.logins.get() + api.refreshes.get(),
        expected: 3,
        why: "1 login + 1 refresh per session end (2)",
    };
    (
        row,
        api.refresh_tokens_reused.get(),
        api.early_refreshes.get(),
    )
}

async fn style_d() -> Row {
    let api = ClientCredentialsApi::new("id", "secret", 3600);
    let base = support::start(api.clone()).await;
    let request =
        TokenRequest::oauth2_client_credentials(&format!("{base}/oauth/v2/token"), "id", "secret")
            .expect("a token request")
            .scope("read");
    let source = TokenSource::new(request).allow_http_loopback(true);
    let (a, b) = (api.clone(), api.clone());
    let events = vec![
        at(1.0, move || a.revoke_all()),
        at(2.0, move || b.revoke_all()),
    ];
    let (load, stats) = with_the_crate(&base, "/v1/shipments", source, events).await;
    Row {
        style: "D  client creds, Basic + form",
        load,
        rejected: api.rejected.get(),
        replays: stats.replays,
        fetches: api.tokens_issued.get(),
        expected: 3,
        why: "1 + 1 per revocation (2)",
    }
}

/// Style E: three static kinds, each a layer of its own over one fake API.
async fn style_e() -> [Row; 3] {
    let api = PersonalTokenApi::new("pat_1", ("session", "c00k1e"), "s3cret");
    let base = support::start(api.clone()).await;
    let pat = RotatingCredential::new(Credential::bearer("pat_1").expect("a token"));
    let (rotate, reissue) = (pat.clone(), api.clone());
    let events = vec![at(1.5, move || {
        // The user issues a new token and the app swaps it in; the old one is revoked.
        rotate
            .rotate(Credential::bearer("pat_2").expect("a token"))
            .expect("a bearer token rotates");
        reissue.reissue("pat_2");
    })];
    let cookie = StaticCredential::cookie("session", "c00k1e").expect("a cookie");
    let secret = StaticCredential::with_scheme("Secret", "s3cret").expect("a secret");
    let ((pat, pat_stats), (cookie, cookie_stats), (secret, secret_stats)) = tokio::join!(
        with_the_crate(&base, "/api/me", pat, events),
        with_the_crate(&base, "/api/cookie/me", cookie, vec![]),
        with_the_crate(&base, "/api/clients/verify", secret, vec![]),
    );
    let row = |style, load, stats: tower_client_auth::CacheStats, why| Row {
        style,
        load,
        rejected: 0,
        replays: stats.replays,
        fetches: stats.fetches,
        expected: 1,
        why,
    };
    let mut rows = [
        row(
            "E  personal token, rotated",
            pat,
            pat_stats,
            "1: a rotation is not a fetch",
        ),
        row(
            "E  cookie session=...",
            cookie,
            cookie_stats,
            "1: read once, kept",
        ),
        row(
            "E  Authorization: Secret",
            secret,
            secret_stats,
            "1: read once, kept",
        ),
    ];
    // The API's 401s are shared by the three; all of them belong to the revoked PAT.
    rows[0].rejected = api.rejected.get();
    rows
}

/// What many apps write by hand: one cached token behind a mutex, fetched when missing,
/// dropped on any 401 (which may drop a newer token another caller just fetched), no
/// replay. Run against style D's API under the same schedule.
async fn naive_baseline() -> (Load, u64) {
    let api = ClientCredentialsApi::new("id", "secret", 3600);
    let base = support::start(api.clone()).await;
    let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let cached: Arc<tokio::sync::Mutex<Option<String>>> = Arc::default();
    let (a, b) = (api.clone(), api.clone());
    let events = vec![
        at(1.0, move || a.revoke_all()),
        at(2.0, move || b.revoke_all()),
    ];
    let token_url = format!("{base}/oauth/v2/token");
    let load = drive(format!("{base}/v1/shipments"), events, move |url| {
        let (http, cached, token_url) = (http.clone(), cached.clone(), token_url.clone());
        async move {
            let token = {
                let mut held = cached.lock().await;
                if held.is_none() {
                    *held = naive_fetch(&http, &token_url).await;
                }
                held.clone()
            };
            let Some(token) = token else { return false };
            let req = Request::get(url)
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .body(Full::default())
                .expect("a request");
            match http.request(req).await {
                Ok(res) if res.status() == StatusCode::UNAUTHORIZED => {
                    *cached.lock().await = None;
                    false
                }
                Ok(res) => res.status().is_success() && res.into_body().collect().await.is_ok(),
                Err(_) => false,
            }
        }
    })
    .await;
    (load, api.tokens_issued.get())
}

async fn naive_fetch(http: &Client<HttpConnector, Full<Bytes>>, url: &str) -> Option<String> {
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode("id:secret");
    let req = Request::post(url)
        .header(header::AUTHORIZATION, format!("Basic {basic}"))
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from_static(
            b"grant_type=client_credentials&scope=read",
        )))
        .ok()?;
    let body = http
        .request(req)
        .await
        .ok()?
        .into_body()
        .collect()
        .await
        .ok()?;
    let json: serde_json::Value = serde_json::from_slice(&body.to_bytes()).ok()?;
    Some(json["access_token"].as_str()?.to_owned())
}

fn main() -> Result<(), BoxError> {
    let runtime = tokio::runtime::Runtime::new()?;
    println!(
        "tower-client-auth demo: styles A-E at once, {WORKERS} concurrent workers each for {RUN_FOR:?}.\n\
         Schedule: A's JWTs live 4 s (exp floored), B's tokens 2 s; C's sessions end at 1 s and 2 s;\n\
         D's tokens are revoked at 1 s and 2 s; E's PAT is rotated (and the old one revoked) at 1.5 s.\n"
    );
    let (a, b, (c, reused, early), d, e, (naive, naive_fetches)) = runtime.block_on(async {
        tokio::join!(
            style_a(),
            style_b(),
            style_c(),
            style_d(),
            style_e(),
            naive_baseline()
        )
    });
    println!(
        "{:<36} {:>9} {:>10} {:>9} {:>8}   token fetches: observed / expected",
        "style", "requests", "succeeded", "API 401s", "replays"
    );
    let mut wrong = Vec::new();
    let rows = [a, b, c, d].into_iter().chain(e);
    let mut d_row = (0, 0, 0);
    for row in rows {
        let matches = row.fetches == row.expected;
        // Every request the API rejected was sent again once, and only those.
        if !matches || row.load.ok != row.load.sent || row.replays != row.rejected {
            wrong.push(row.style);
        }
        if row.style.starts_with('D') {
            d_row = (row.load.sent, row.load.sent - row.load.ok, row.fetches);
        }
        println!(
            "{:<36} {:>9} {:>10} {:>9} {:>8}   {} / {} = {}{}",
            row.style,
            row.load.sent,
            row.load.ok,
            row.rejected,
            row.replays,
            row.fetches,
            row.expected,
            row.why,
            if matches { "" } else { "   <- differs" }
        );
    }
    println!(
        "\nC: refresh tokens presented twice: {reused} (expected 0, the provider's own count); \
         refreshes tried while the access token still worked: {early} (expected 0)."
    );
    if reused + early != 0 {
        wrong.push("C rotation");
    }
    println!(
        "E: `rotate()` installs the new PAT in the cache directly, so no fetch happens; the API's 401s are\n   \
         requests already on their way with the old PAT, each replayed once with the new one."
    );
    println!(
        "\nNaive baseline, style D's API and schedule (one token behind a mutex, dropped on a 401, no replay):\n  \
         requests {}, failed {}, token fetches {}  vs tower-client-auth: requests {}, failed {}, token fetches {}",
        naive.sent,
        naive.sent - naive.ok,
        naive_fetches,
        d_row.0,
        d_row.1,
        d_row.2
    );
    println!(
        "\nAPI 401s: answers the fake API gave to a token it no longer accepted; replays: requests sent again\n\
         once, with the new credential, after such a 401 (checked: replays = API 401s, every request\n\
         succeeded); token fetches: tokens the provider issued (for E, times the cache asked its source)."
    );
    if wrong.is_empty() {
        println!("Every request succeeded and every figure is as expected.");
        Ok(())
    } else {
        Err(format!("figures differ from the prediction: {}", wrong.join(", ")).into())
    }
}
