//! The main job: the five authentication styles of `auth-flows.md`, each against its own
//! loopback provider, each under a burst of concurrent traffic with tokens that expire
//! every second and a forced revocation (401s) mid-run. Prints one table.
//!
//! `cargo run --example demo` (add `--release` for bigger numbers). No setup; about 3 s.

use std::{
    sync::Arc,
    sync::atomic::{AtomicU64, Ordering::Relaxed, Ordering::SeqCst},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    Auth, AuthLayer, BoxError, CacheStats, Credential, CredentialSource, ReplayBody,
    RotatingCredential,
    token::{BodyEncoding, ClientAuth, TokenClient, TokenRequest, TokenSource, TokenStats},
};

#[path = "../tests/support/providers.rs"]
mod providers;

const WORKERS: usize = 16;
const RUN_FOR: Duration = Duration::from_secs(2);

type Http = Client<HttpConnector, ReplayBody<Full<Bytes>>>;

struct Row {
    style: &'static str,
    sent: u64,
    ok: u64,
    cache: CacheStats,
    tokens: Option<TokenStats>,
    time: Duration,
}

/// Runs `WORKERS` loops of GET `url` for `RUN_FOR`; calls each event at its moment.
async fn burst<P: CredentialSource>(
    svc: Auth<Http, P>,
    url: String,
    events: Vec<(Duration, Box<dyn FnOnce() + Send>)>,
) -> (u64, u64, Duration) {
    let (sent, ok) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let start = Instant::now();
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (svc, url, sent, ok) = (svc.clone(), url.clone(), sent.clone(), ok.clone());
            tokio::spawn(async move {
                while start.elapsed() < RUN_FOR {
                    sent.fetch_add(1, Relaxed);
                    let req = Request::get(url.as_str()).body(Full::default()).unwrap();
                    if let Ok(res) = svc.clone().oneshot(req).await {
                        let success = res.status().is_success();
                        if res.into_body().collect().await.is_ok() && success {
                            ok.fetch_add(1, Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for (at, event) in events {
        tokio::time::sleep_until((start + at).into()).await;
        event();
    }
    for worker in workers {
        worker.await.unwrap();
    }
    (sent.load(Relaxed), ok.load(Relaxed), start.elapsed())
}

fn at(fraction: f64) -> Duration {
    RUN_FOR.mul_f64(fraction)
}

async fn run<P, F>(
    style: &'static str,
    source: P,
    url: String,
    events: Vec<(Duration, Box<dyn FnOnce() + Send>)>,
    tokens: F,
) -> Row
where
    P: CredentialSource,
    F: Fn(&P) -> Option<TokenStats>,
{
    // The credential goes to the API's origin only (scheme, host and port of `url`).
    let origin: tower_client_auth::Origin = {
        let uri: http::Uri = url.parse().expect("a url");
        format!(
            "{}://{}",
            uri.scheme_str().unwrap_or("http"),
            uri.authority().expect("a host")
        )
        .parse()
        .expect("an origin")
    };
    let svc = AuthLayer::new(source)
        .origin(origin)
        .allow_http_loopback(true) // loopback demo: production is https-only
        .layer(Client::builder(TokioExecutor::new()).build_http());
    let (sent, ok, time) = burst(svc.clone(), url, events).await;
    Row {
        style,
        sent,
        ok,
        cache: svc.cache().stats(),
        tokens: tokens(svc.cache().source()),
        time,
    }
}

fn token_client() -> TokenClient {
    TokenClient::https()
        .expect("tls setup")
        .allow_http_loopback(true)
}

async fn style_a() -> Row {
    let api = providers::SessionApi::new("key", "secret", Duration::from_secs(1));
    let base = providers::start(api.clone()).await;
    let source = TokenSource::session_login(&format!("{base}/v1/sessions"), "key", "secret")
        .unwrap()
        .client(token_client());
    let revoke: Box<dyn FnOnce() + Send> = Box::new(move || api.revoke_all());
    run(
        "A  session login, JWT exp",
        source,
        format!("{base}/v1/consents"),
        vec![(at(0.5), revoke)],
        |s| Some(s.stats()),
    )
    .await
}

async fn style_b() -> Row {
    let api = providers::AudienceApi::new("id", "secret", "https://api.example");
    api.expires_in_secs.store(1, SeqCst);
    let base = providers::start(api.clone()).await;
    let request =
        TokenRequest::oauth2_client_credentials(&format!("{base}/oauth/token"), "id", "secret")
            .unwrap()
            .client_auth(ClientAuth::Body)
            .encoding(BodyEncoding::Json)
            .field("audience", "https://api.example");
    let expire: Box<dyn FnOnce() + Send> = Box::new(move || api.expire_all());
    let source = TokenSource::new(request).client(token_client());
    run(
        "B  client creds, JSON + audience",
        source,
        format!("{base}/api/vessels"),
        vec![(at(0.5), expire)],
        |s| Some(s.stats()),
    )
    .await
}

async fn style_c() -> Row {
    let api = providers::RotatingApi::new("api-key");
    let base = providers::start(api.clone()).await;
    let source = TokenSource::api_key_login(
        &format!("{base}/v3/auth/login"),
        &format!("{base}/v3/auth/refresh"),
        "api-key",
    )
    .unwrap()
    .client(token_client());
    let (a, b) = (api.clone(), api.clone());
    let events: Vec<(Duration, Box<dyn FnOnce() + Send>)> = vec![
        (at(0.33), Box::new(move || a.expire_sessions())),
        (at(0.66), Box::new(move || b.expire_sessions())),
    ];
    let row = run(
        "C  api-key login, rotating refresh",
        source,
        format!("{base}/v3/accounts"),
        events,
        |s| Some(s.stats()),
    )
    .await;
    assert_eq!(
        api.reused_refresh_tokens.load(SeqCst) + api.early_refreshes.load(SeqCst),
        0
    );
    row
}

async fn style_d() -> Row {
    let api = providers::ClientCredentialsApi::new("id", "secret");
    api.expires_in_secs.store(1, SeqCst);
    let base = providers::start(api.clone()).await;
    let request =
        TokenRequest::oauth2_client_credentials(&format!("{base}/oauth/v2/token"), "id", "secret")
            .unwrap()
            .scope("read");
    let revoke: Box<dyn FnOnce() + Send> = Box::new(move || api.revoke_all());
    let source = TokenSource::new(request).client(token_client());
    run(
        "D  client creds, Basic + form",
        source,
        format!("{base}/v1/shipments"),
        vec![(at(0.5), revoke)],
        |s| Some(s.stats()),
    )
    .await
}

async fn style_e() -> Row {
    let api = providers::PersonalTokenApi::new("pat_1", ("session", "c00k1e"), "s3cret");
    let base = providers::start(api.clone()).await;
    let pat = RotatingCredential::new(Credential::bearer("pat_1").unwrap());
    let rotate = pat.clone();
    let reissue: Box<dyn FnOnce() + Send> = Box::new(move || {
        rotate.rotate(Credential::bearer("pat_2").unwrap());
        api.reissue("pat_2");
    });
    run(
        "E  personal token, rotated",
        pat,
        format!("{base}/api/me"),
        vec![(at(0.5), reissue)],
        |_| None,
    )
    .await
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    println!(
        "tower-client-auth demo: 5 styles at once, {WORKERS} concurrent workers each for {RUN_FOR:?};\n\
         tokens live 1 s (A, B, D), sessions expire twice (C), every token revoked mid-run (A, B, D), PAT rotated (E)\n"
    );
    let rows = tokio::join!(style_a(), style_b(), style_c(), style_d(), style_e());
    println!(
        "{:<36} {:>9} {:>10} {:>7} {:>7} {:>10} {:>8} {:>7}",
        "style", "requests", "succeeded", "fetches", "logins", "refreshes", "replays", "time"
    );
    let mut all_ok = true;
    for row in [rows.0, rows.1, rows.2, rows.3, rows.4] {
        let (logins, refreshes) = match row.tokens {
            Some(t) => (t.logins.to_string(), t.refreshes.to_string()),
            None => ("-".into(), "-".into()),
        };
        all_ok &= row.ok == row.sent;
        println!(
            "{:<36} {:>9} {:>10} {:>7} {:>7} {:>10} {:>8} {:>6.2}s",
            row.style,
            row.sent,
            row.ok,
            row.cache.fetches,
            logins,
            refreshes,
            row.cache.replays,
            row.time.as_secs_f64()
        );
    }
    println!(
        "\nfetches: times the credential source was asked; refreshes: refresh-token exchanges; replays: requests\n\
         sent again after a 401 with the new credential. {}",
        if all_ok {
            "Every request succeeded."
        } else {
            "Some requests failed (see above)."
        }
    );
    Ok(())
}
