//! Cancellation and drop: requests dropped at random instants, at every await point of
//! the state machine (waiting for a credential, first attempt, refresh, replay), and a
//! cache that gives up on a refresh the server has already answered. Proves: the cache is
//! never corrupted, a rotated refresh token is never lost (so never reused, never a second
//! login), and no refresh is left stuck.
#![cfg(feature = "https")]

use crate::support;

use std::{sync::atomic::Ordering::SeqCst, time::Duration};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use support::{api_client, providers::*, token_client};
use tower::{Layer, ServiceExt};
use tower_client_auth::{AuthLayer, CredentialCache, token::TokenSource};

/// World: a style-C provider (rotating refresh tokens, early refreshes refused). Forty
/// rounds: the session expires, 40 requests start and each is dropped after a random
/// 0–6 ms, then one request without a deadline must succeed. Every fourth round the
/// refresh endpoint answers only after 30 ms, past the cache's 10 ms fetch timeout: the
/// server has rotated, the cache has given up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_requests_and_abandoned_refreshes_lose_nothing() {
    let api = RotatingApi::new("cancel-key");
    let base = start(api.clone()).await;
    let source = TokenSource::api_key_login(
        &format!("{base}/v3/auth/login"),
        &format!("{base}/v3/auth/refresh"),
        "cancel-key",
    )
    .unwrap()
    .client(token_client());
    let cache = CredentialCache::builder(source)
        .fetch_timeout(Duration::from_millis(10))
        .backoff(Duration::from_millis(5), Duration::from_millis(20))
        .build()
        .unwrap();
    let svc = AuthLayer::with_cache(cache)
        .any_https_origin()
        .allow_http_loopback(true)
        .layer(api_client());
    type Svc = tower_client_auth::AddCredential<
        hyper_util::client::legacy::Client<
            hyper_util::client::legacy::connect::HttpConnector,
            tower_client_auth::ReplayBody<Full<Bytes>>,
        >,
        TokenSource,
    >;
    let get = |svc: &Svc| {
        let req = Request::get(format!("{base}/v3/accounts"))
            .body(Full::<Bytes>::default())
            .unwrap();
        let svc = svc.clone();
        async move {
            let res: http::Response<hyper::body::Incoming> = svc.oneshot(req).await?;
            let status = res.status();
            res.into_body().collect().await?;
            Ok::<_, tower_client_auth::BoxError>(status)
        }
    };
    // Not stuck, not corrupted: a request with no deadline gets through, retrying only
    // while the cache backs off from a fetch it stopped waiting for (the 10 ms timeout
    // can pass on a loaded machine, the first login's included).
    let until_ok = |svc: &Svc| {
        let svc = svc.clone();
        async move {
            let mut status = get(&svc).await;
            for _ in 0..50 {
                if matches!(status, Ok(s) if s == 200) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                status = get(&svc).await;
            }
            status
        }
    };
    assert_eq!(until_ok(&svc).await.unwrap(), 200);

    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let (mut dropped, mut completed) = (0, 0);
    for round in 0..40 {
        let slow = round % 4 == 3;
        *api.refresh_delay.lock().unwrap() = Duration::from_millis(if slow { 30 } else { 0 });
        api.expire_sessions();
        let calls: Vec<_> = (0..40)
            .map(|_| {
                let deadline = Duration::from_micros(rng.u64(0..6_000));
                tokio::spawn(tokio::time::timeout(deadline, get(&svc)))
            })
            .collect();
        for call in calls {
            match call.await.unwrap() {
                Err(_elapsed) => dropped += 1,
                Ok(_) => completed += 1,
            }
        }
        *api.refresh_delay.lock().unwrap() = Duration::ZERO;
        assert_eq!(until_ok(&svc).await.unwrap(), 200, "round {round}");
    }
    println!(
        "dropped {dropped}, completed {completed}; logins {}, refreshes {}, reused refresh tokens {}, early refreshes {}",
        api.logins.load(SeqCst),
        api.refreshes.load(SeqCst),
        api.reused_refresh_tokens.load(SeqCst),
        api.early_refreshes.load(SeqCst)
    );
    assert!(dropped > 100, "the schedule must actually drop requests");
    assert_eq!(
        api.reused_refresh_tokens.load(SeqCst),
        0,
        "a refresh token was presented twice"
    );
    assert_eq!(api.early_refreshes.load(SeqCst), 0);
    assert_eq!(
        api.logins.load(SeqCst),
        1,
        "a rotated refresh token was lost"
    );
    assert!(api.refreshes.load(SeqCst) >= 40);
}
