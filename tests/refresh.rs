//! The cache's refresh rules, in paused time: soft and hard windows, reactive-only
//! sources, failures and backoff, cancelled requests, timeouts, panics, rotation, and
//! the storage seam.

use crate::support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use http::StatusCode;
use support::{FakeApi, TestSource, get};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, BoxError, Credential, CredentialCache, CredentialSource, Error, ErrorKind,
    FetchContext, FetchReason, MemoryStore, RefreshMode, RotatingCredential,
};

/// A cache over `source` with deterministic windows: for a 100 s token the soft window
/// opens at 75 s and the hard window at 95 s.
fn cache(source: TestSource) -> CredentialCache<TestSource> {
    CredentialCache::builder(source)
        .window_jitter(0.0)
        .backoff(Duration::from_secs(1), Duration::from_secs(8))
        .build()
        .unwrap()
}

async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

fn token(res: &http::Response<String>, api: &FakeApi) -> String {
    assert_eq!(res.status(), 200);
    api.seen().last().unwrap().authorization.clone().unwrap()
}

/// A 100 s token from a gated endpoint, already fetched once (`token-1` at t = 0), behind
/// the layer over a fake API.
async fn gated_100s_world() -> (
    TestSource,
    FakeApi,
    impl tower::Service<
        http::Request<http_body_util::Full<bytes::Bytes>>,
        Response = http::Response<String>,
        Error = BoxError,
        Future: Send,
    > + Clone
    + Send
    + 'static,
) {
    let source = TestSource::gated(Some(Duration::from_secs(100)));
    let api = FakeApi::new(|_, _| StatusCode::OK);
    let svc = AuthLayer::with_cache(cache(source.clone()))
        .any_https_origin()
        .layer(api.service());
    source.release(1);
    svc.clone().oneshot(get("/")).await.unwrap();
    (source, api, svc)
}

/// World: a 100 s token and a gated token endpoint. At 80 s (soft window) requests keep
/// flowing with the old token while exactly one background refresh waits at the
/// endpoint; once it lands, the next request uses the new token without another fetch.
#[tokio::test(start_paused = true)]
async fn soft_window_refreshes_in_background() {
    let (source, api, svc) = gated_100s_world().await;

    tokio::time::sleep(Duration::from_secs(80)).await;
    for _ in 0..50 {
        let res = svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(token(&res, &api), "Bearer token-1");
    }
    settle().await; // let the spawned refresh reach the (gated) endpoint
    assert_eq!(
        source.fetches(),
        2,
        "one background refresh for 50 requests"
    );
    assert_eq!(source.log()[1].1, FetchReason::Expiring);

    source.release(1);
    settle().await;
    let res = svc.clone().oneshot(get("/")).await.unwrap();
    assert_eq!(token(&res, &api), "Bearer token-2");
    assert_eq!(source.fetches(), 2);
}

/// World: the same token at 96 s, inside the hard window. A request waits for the
/// refresh instead of sending the nearly-expired token.
#[tokio::test(start_paused = true)]
async fn hard_window_waits_for_the_refresh() {
    let (source, api, svc) = gated_100s_world().await;

    tokio::time::sleep(Duration::from_secs(96)).await;
    let waiting = tokio::spawn(svc.clone().oneshot(get("/")));
    settle().await;
    assert!(!waiting.is_finished(), "a request in the hard window waits");
    assert_eq!(api.seen().len(), 1);
    assert_eq!(source.fetches(), 2);

    source.release(1);
    let res = waiting.await.unwrap().unwrap();
    assert_eq!(token(&res, &api), "Bearer token-2");
}

/// World: a provider that rejects early refreshes (style C). Its source is
/// reactive-only: through the soft window, the hard window and past expiry the token is
/// used as is; only the API's 401 triggers the refresh.
#[tokio::test(start_paused = true)]
async fn reactive_only_source_is_never_refreshed_early() {
    let source = TestSource::build(
        Some(Duration::from_secs(100)),
        Duration::ZERO,
        false,
        RefreshMode::ReactiveOnly,
    );
    let expired = Arc::new(AtomicBool::new(false));
    let api = {
        let expired = expired.clone();
        FakeApi::new(move |_, token| match token {
            Some("token-1") if expired.load(Ordering::SeqCst) => StatusCode::UNAUTHORIZED,
            _ => StatusCode::OK,
        })
    };
    let svc = AuthLayer::with_cache(cache(source.clone()))
        .any_https_origin()
        .layer(api.service());
    for at in [0, 80, 19, 51] {
        tokio::time::sleep(Duration::from_secs(at)).await; // 0 s, 80 s, 99 s, 150 s
        let res = svc.clone().oneshot(get("/")).await.unwrap();
        assert_eq!(token(&res, &api), "Bearer token-1");
    }
    assert_eq!(source.fetches(), 1, "never refreshed before rejection");

    expired.store(true, Ordering::SeqCst);
    let res = svc.clone().oneshot(get("/")).await.unwrap();
    assert_eq!(token(&res, &api), "Bearer token-2");
    assert_eq!(source.log()[1].1, FetchReason::Rejected);
}

/// World: the token endpoint goes down at the start of the soft window and comes back at
/// 140 s; a request arrives every 100 ms. Proves: the still-valid token is served until
/// it expires (soft and hard window alike); after expiry callers get typed errors at once;
/// the endpoint is called no more often than the backoff allows; traffic recovers on its
/// own after the outage.
#[tokio::test(start_paused = true)]
async fn failing_source_keeps_valid_credential_and_backs_off() {
    let source = TestSource::expiring(Duration::from_secs(100));
    let api = FakeApi::new(|_, _| StatusCode::OK);
    let svc = AuthLayer::with_cache(cache(source.clone()))
        .any_https_origin()
        .layer(api.service());
    let start = Instant::now();
    svc.clone().oneshot(get("/")).await.unwrap();
    source.set_failing(true);

    let mut kinds = Vec::new();
    let mut recovered_at = None;
    tokio::time::sleep(Duration::from_secs(70)).await;
    while Instant::now() < start + Duration::from_secs(170) {
        let now = Instant::now() - start;
        if now >= Duration::from_secs(140) {
            source.set_failing(false);
        }
        match svc.clone().oneshot(get("/")).await {
            Ok(res) => {
                let token = token(&res, &api);
                if now < Duration::from_secs(100) {
                    assert_eq!(token, "Bearer token-1", "at {now:?}");
                } else {
                    assert_ne!(
                        token, "Bearer token-1",
                        "an expired token is never sent ({now:?})"
                    );
                    recovered_at.get_or_insert(now);
                }
            }
            Err(err) => {
                assert!(
                    now >= Duration::from_secs(100),
                    "failed at {now:?} with a valid token"
                );
                let err = err.downcast::<Error>().expect("a typed error");
                kinds.push(err.kind());
                if err.kind() == ErrorKind::Backoff {
                    assert!(err.retry_in().is_some());
                    let last = err.get_ref().and_then(|e| e.downcast_ref::<Error>());
                    assert!(last.is_some(), "carries the last failure");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(kinds.contains(&ErrorKind::Backoff));
    assert!(
        kinds
            .iter()
            .all(|k| matches!(k, ErrorKind::Backoff | ErrorKind::Fetch))
    );

    // Spacing of the calls during the outage: never closer than half the exponential
    // delay (equal jitter), capped at 8 s.
    let calls: Vec<Instant> = source.log().iter().map(|(at, _)| *at).collect();
    let failures = calls
        .iter()
        .filter(|at| **at < start + Duration::from_secs(140))
        .count()
        - 1;
    for k in 1..failures {
        let gap = calls[k + 1] - calls[k];
        let full = Duration::from_secs(1 << (k - 1).min(3));
        assert!(gap >= full / 2, "call {k}: gap {gap:?} < {:?}", full / 2);
    }
    // 70 s of outage at one request per 100 ms would be 700 calls without backoff.
    assert!(failures <= 15, "{failures} calls during the outage");
    let recovered_at = recovered_at.expect("traffic recovered");
    assert!(
        recovered_at <= Duration::from_secs(140 + 8),
        "recovered at {recovered_at:?}"
    );
}

/// World: the request that triggered a fetch is dropped while the fetch is in flight.
/// Proves: the refresh completes anyway and the next request uses it without fetching.
#[tokio::test(start_paused = true)]
async fn refresh_outlives_the_request_that_started_it() {
    let source = TestSource::gated(None);
    let api = FakeApi::new(|_, _| StatusCode::OK);
    let svc = AuthLayer::new(source.clone())
        .any_https_origin()
        .layer(api.service());

    let first = tokio::spawn(svc.clone().oneshot(get("/")));
    settle().await;
    assert_eq!(source.fetches(), 1);
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());

    source.release(1);
    settle().await;
    let res = svc.clone().oneshot(get("/")).await.unwrap();
    assert_eq!(token(&res, &api), "Bearer token-1");
    assert_eq!(source.fetches(), 1);
}

/// A fetch that never answers fails with `Timeout` after the fetch timeout; during the
/// following backoff callers get `Backoff` at once instead of queueing.
#[tokio::test(start_paused = true)]
async fn fetch_timeout_then_backoff() {
    let source = TestSource::gated(None);
    let cache = CredentialCache::builder(source.clone())
        .fetch_timeout(Duration::from_secs(5))
        .backoff(Duration::from_secs(2), Duration::from_secs(2))
        .build()
        .unwrap();
    let started = Instant::now();
    let err = cache.credential().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert_eq!(Instant::now() - started, Duration::from_secs(5));
    let err = cache.credential().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backoff);
    assert!(err.retry_in().unwrap() <= Duration::from_secs(2));
    assert_eq!(source.fetches(), 1);

    tokio::time::sleep(Duration::from_secs(2)).await;
    source.release(1);
    assert_eq!(
        cache.credential().await.unwrap(),
        Credential::bearer("token-2").unwrap()
    );
}

/// A source that panics yields `SourcePanicked` to its waiters and does not wedge the
/// cache: after the backoff the next fetch goes through.
#[tokio::test(start_paused = true)]
async fn panicking_source_does_not_wedge_the_cache() {
    struct PanicsOnce(AtomicBool);
    impl CredentialSource for PanicsOnce {
        async fn fetch(&self, _: FetchContext) -> Result<Credential, BoxError> {
            if !self.0.swap(true, Ordering::SeqCst) {
                panic!("source bug");
            }
            Ok(Credential::bearer("after-panic")?)
        }
    }
    let cache = CredentialCache::new(PanicsOnce(AtomicBool::new(false)));
    let err = cache.credential().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::SourcePanicked);
    tokio::time::sleep(tower_client_auth::cache::DEFAULT_BACKOFF_BASE).await;
    assert_eq!(
        cache.credential().await.unwrap(),
        Credential::bearer("after-panic").unwrap()
    );
}

/// A source that returns an already-expired credential gets a typed error, not a
/// refresh loop.
#[tokio::test(start_paused = true)]
async fn already_expired_credential_is_an_error() {
    let cache = CredentialCache::new(tower_client_auth::source_fn(|_| async {
        Ok::<_, BoxError>(Credential::bearer("old")?.expires_at(std::time::SystemTime::now()))
    }));
    assert_eq!(
        cache.credential().await.unwrap_err().kind(),
        ErrorKind::Expired
    );
}

/// A rotated personal access token takes effect on the very next request, with no
/// restart and no fetch.
#[tokio::test]
async fn rotated_token_takes_effect_on_next_request() {
    let pat = RotatingCredential::new(Credential::bearer("pat-1").unwrap());
    let api = FakeApi::new(|_, _| StatusCode::OK);
    let svc = AuthLayer::new(pat.clone())
        .any_https_origin()
        .layer(api.service());
    let res = svc.clone().oneshot(get("/")).await.unwrap();
    assert_eq!(token(&res, &api), "Bearer pat-1");
    pat.rotate(Credential::bearer("pat-2").unwrap()).unwrap();
    let res = svc.clone().oneshot(get("/")).await.unwrap();
    assert_eq!(token(&res, &api), "Bearer pat-2");
}

/// `reject` invalidates only the credential that is still current: reporting an old
/// one again costs no fetch.
#[tokio::test]
async fn reject_is_generation_checked() {
    let source = TestSource::new();
    let cache = CredentialCache::new(source.clone());
    let first = cache.credential().await.unwrap();
    let second = cache.reject(&first).await.unwrap();
    assert_ne!(first, second);
    assert_eq!(cache.reject(&first).await.unwrap(), second);
    assert_eq!(source.fetches(), 2);
}

/// World: two caches (two processes, say) share a store. The second finds the first's
/// credential in the store and never asks its own source; a rejection removes only the
/// rejected credential, so the second picks up the first's replacement too.
#[tokio::test]
async fn store_shares_credentials_between_caches() {
    let store = MemoryStore::new();
    let (source_a, source_b) = (TestSource::new(), TestSource::new());
    let a = CredentialCache::builder(source_a.clone())
        .store(store.clone())
        .build()
        .unwrap();
    let b = CredentialCache::builder(source_b.clone())
        .store(store.clone())
        .build()
        .unwrap();

    let token_1 = a.credential().await.unwrap();
    assert_eq!(b.credential().await.unwrap(), token_1);
    assert_eq!((source_a.fetches(), source_b.fetches()), (1, 0));

    let token_2 = a.reject(&token_1).await.unwrap();
    assert_eq!(b.reject(&token_1).await.unwrap(), token_2);
    assert_eq!((source_a.fetches(), source_b.fetches()), (2, 0));
}
