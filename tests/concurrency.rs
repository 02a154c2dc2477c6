//! Concurrency claims, counted: a stampede at expiry and a storm of 401s each cost
//! exactly one fetch, however many requests are in flight.

use crate::support;

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use support::{FakeApi, TestSource, get};
use tower::{Layer, ServiceExt};
use tower_client_auth::{AuthLayer, CredentialCache, RefreshMode, ReplayBody};

const N: usize = 1000;

/// World: a token living 60 s, one request to fetch it, then time jumps past its expiry
/// and 1,000 requests arrive at once. Proves: the source is asked exactly once more, and
/// every request carries that one new token.
#[tokio::test(start_paused = true)]
async fn stampede_at_expiry_fetches_once() {
    let source = TestSource::build(
        Some(Duration::from_secs(60)),
        Duration::from_millis(20),
        false,
        RefreshMode::Proactive,
    );
    let api = FakeApi::new(|_, _| StatusCode::OK);
    let svc = AuthLayer::new(source.clone())
        .any_https_origin()
        .layer(api.service());
    svc.clone().oneshot(get("/warm-up")).await.unwrap();
    assert_eq!(source.fetches(), 1);

    tokio::time::sleep(Duration::from_secs(61)).await;
    let calls: Vec<_> = (0..N)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("/burst"))))
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(source.fetches(), 2, "one fetch for the whole stampede");
    let seen = api.seen();
    assert_eq!(seen.len(), N + 1);
    assert!(
        seen[1..]
            .iter()
            .all(|s| s.authorization.as_deref() == Some("Bearer token-2"))
    );
}

/// The same on two real threads in real time: the refresh is held open until every
/// request has been issued, so they all pile onto it. Tokens live 1 s, so that token-2
/// outlasts the burst on a loaded machine (with 50 ms, a burst slowed past token-2's
/// soft window rightly began its refresh: a third fetch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stampede_at_expiry_fetches_once_on_two_threads() {
    let source = TestSource::gated(Some(Duration::from_secs(1)));
    let api = FakeApi::new(|_, _| StatusCode::OK);
    let svc = AuthLayer::new(source.clone())
        .any_https_origin()
        .layer(api.service());
    source.release(1);
    svc.clone().oneshot(get("/warm-up")).await.unwrap();

    tokio::time::sleep(Duration::from_millis(1100)).await; // token-1 has expired
    let calls: Vec<_> = (0..N)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("/burst"))))
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(source.fetches(), 2, "the pile waits on one refresh");
    source.release(1);
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(source.fetches(), 2);
}

/// World: 1,000 requests are in flight with token-1 when the API revokes it and answers
/// all of them 401. Proves: one refresh, not 1,000; all 1,000 succeed on their replay
/// with token-2; no request is sent a third time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_of_401s_refreshes_once_and_all_replays_succeed() {
    let source = TestSource::new();
    let arrived = Arc::new(AtomicUsize::new(0));
    let attempts = Arc::new(AtomicUsize::new(0));
    let (revoke, revoked) = tokio::sync::watch::channel(false);
    let api = {
        let (arrived, attempts) = (arrived.clone(), attempts.clone());
        tower::service_fn(move |req: Request<ReplayBody<Full<Bytes>>>| {
            let (arrived, attempts, mut revoked) =
                (arrived.clone(), attempts.clone(), revoked.clone());
            async move {
                attempts.fetch_add(1, Ordering::SeqCst);
                let status = match req.headers()["authorization"].to_str().unwrap() {
                    "Bearer token-1" => {
                        arrived.fetch_add(1, Ordering::SeqCst);
                        revoked.wait_for(|r| *r).await.unwrap();
                        StatusCode::UNAUTHORIZED
                    }
                    "Bearer token-2" => StatusCode::OK,
                    _ => StatusCode::FORBIDDEN,
                };
                Ok::<_, Infallible>(Response::builder().status(status).body(()).unwrap())
            }
        })
    };
    let cache = CredentialCache::new(source.clone());
    cache.credential().await.unwrap();
    let svc = AuthLayer::with_cache(cache).any_https_origin().layer(api);

    let calls: Vec<_> = (0..N)
        .map(|_| tokio::spawn(svc.clone().oneshot(get("/v1/items"))))
        .collect();
    while arrived.load(Ordering::SeqCst) < N {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    revoke.send(true).unwrap();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(source.fetches(), 2, "one refresh for 1,000 rejections");
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        2 * N,
        "each request sent exactly twice"
    );
}
