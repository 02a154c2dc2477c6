//! Keep-warm and warm-up, in paused time: a proactive credential refreshed before its
//! soft window with no request arriving, so the first burst after an idle period is served
//! from the cache; never for a reactive-only source; backing off like any refresh; gone
//! with the last clone of the cache; and a cold start fetched before the first request.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::{FakeApi, TestSource, get};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};
use tower_client_auth::{AuthLayer, CredentialCache, ErrorKind, FetchReason, RefreshMode};

/// A 100 s token, deterministic windows (soft at 75 s, hard at 95 s), backoff 1 s to 8 s.
fn cache(source: &TestSource, keep_warm: bool) -> CredentialCache<TestSource> {
    CredentialCache::builder(source.clone())
        .window_jitter(0.0)
        .backoff(Duration::from_secs(1), Duration::from_secs(8))
        .keep_warm(keep_warm)
        .build()
        .unwrap()
}

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// World: an idle client for 101 s, then a burst, with and without keep-warm. Proves:
/// with it, the token is refreshed at its soft window though no request came, and the
/// burst after the old token's expiry is served at once from the cache (no fetch, no
/// wait); without it, the same burst waits for a fetch.
#[tokio::test(start_paused = true)]
async fn an_idle_client_is_refreshed_when_its_soft_window_opens() {
    for keep_warm in [true, false] {
        let source = TestSource::expiring(Duration::from_secs(100));
        let api = FakeApi::new(|_, _| StatusCode::OK);
        let layer = AuthLayer::with_cache(cache(&source, keep_warm)).any_https_origin();
        layer.warm_up().await.unwrap();
        assert_eq!(source.fetches(), 1, "warm_up fetched before any request");
        let svc = layer.layer(api.service());

        tokio::time::sleep(Duration::from_secs(74)).await;
        settle().await;
        assert_eq!(source.fetches(), 1, "nothing before the soft window");
        tokio::time::sleep(Duration::from_secs(2)).await;
        settle().await;
        if keep_warm {
            assert_eq!(source.fetches(), 2, "refreshed at 75 s with no request");
            assert_eq!(source.log()[1].1, FetchReason::Expiring);
        } else {
            assert_eq!(source.fetches(), 1);
        }

        // 101 s: token-1 has expired. A burst of 100 requests.
        tokio::time::sleep(Duration::from_secs(25)).await;
        let start = Instant::now();
        let burst: Vec<_> = (0..100)
            .map(|_| tokio::spawn(svc.clone().oneshot(get("/"))))
            .collect();
        for req in burst {
            assert_eq!(req.await.unwrap().unwrap().status(), 200);
        }
        let seen = api.seen();
        assert_eq!(seen.len(), 100);
        assert!(
            seen.iter()
                .all(|s| s.authorization.as_deref() == Some("Bearer token-2")),
            "every request of the burst carries the new token"
        );
        assert_eq!(source.fetches(), 2, "one refresh in all");
        if keep_warm {
            assert_eq!(
                Instant::now(),
                start,
                "served from the cache: no wait at all"
            );
        } else {
            assert_eq!(source.log()[1].1, FetchReason::Expiring);
        }
    }
}

/// World: keep-warm over many lifetimes, no request at all. Proves: one refresh per
/// lifetime (at each soft window), never more.
#[tokio::test(start_paused = true)]
async fn keep_warm_refreshes_once_per_lifetime() {
    let source = TestSource::expiring(Duration::from_secs(100));
    let cache = cache(&source, true);
    cache.warm_up().await.unwrap();
    // Soft windows at 75 s, 150 s, 225 s, ... (each token lives 100 s from its fetch).
    tokio::time::sleep(Duration::from_secs(75 * 10 + 10)).await;
    settle().await;
    assert_eq!(source.fetches(), 11);
    let log = source.log();
    for pair in log.windows(2) {
        assert_eq!(pair[1].0 - pair[0].0, Duration::from_secs(75));
        assert_eq!(pair[1].1, FetchReason::Expiring);
    }
    assert_eq!(cache.credential().await.unwrap(), {
        tower_client_auth::Credential::bearer("token-11").unwrap()
    });
}

/// World: a reactive-only source (style C: early refreshes are refused) and a fixed one
/// (`RefreshMode::Never`), with keep-warm set. Proves: neither is ever refreshed in the
/// background, however long the client idles.
#[tokio::test(start_paused = true)]
async fn keep_warm_never_refreshes_a_reactive_only_or_fixed_source() {
    for mode in [RefreshMode::ReactiveOnly, RefreshMode::Never] {
        let source = TestSource::build(Some(Duration::from_secs(100)), Duration::ZERO, false, mode);
        let cache = cache(&source, true);
        cache.warm_up().await.unwrap();
        tokio::time::sleep(Duration::from_secs(1000)).await;
        settle().await;
        assert_eq!(source.fetches(), 1, "{mode:?}");
    }
}

/// World: the token endpoint fails from the first keep-warm refresh on, and recovers at
/// 150 s; no request arrives. Proves: keep-warm tries again on the backoff's schedule
/// (never closer than half the doubling delay, capped at 8 s), through the old token's
/// expiry, and the first success after the outage is in the cache before any request.
#[tokio::test(start_paused = true)]
async fn keep_warm_backs_off_and_recovers_on_its_own() {
    let source = TestSource::expiring(Duration::from_secs(100));
    let cache = cache(&source, true);
    let start = Instant::now();
    cache.warm_up().await.unwrap();
    source.set_failing(true);
    tokio::time::sleep(Duration::from_secs(150)).await;
    settle().await;
    let failed = source.fetches() - 1;
    source.set_failing(false);
    // 75 s of outage: 10 to 21 tries on this schedule (1, 2, 4, then 8 s, each halved at
    // worst by the jitter); a retry per request would be thousands.
    assert!(
        (5..=25).contains(&failed),
        "{failed} tries during the outage"
    );
    let calls: Vec<Instant> = source.log().iter().map(|(at, _)| *at).collect();
    assert_eq!(calls[1] - start, Duration::from_secs(75));
    for k in 1..failed {
        let gap = calls[k + 1] - calls[k];
        let full = Duration::from_secs(1 << (k - 1).min(3));
        assert!(gap >= full / 2, "try {k}: gap {gap:?} < {:?}", full / 2);
    }
    // The next try after the outage succeeds, with nobody asking.
    tokio::time::sleep(Duration::from_secs(9)).await;
    settle().await;
    assert_eq!(source.fetches(), failed + 2);
    let before = Instant::now();
    let credential = cache.credential().await.unwrap();
    assert_eq!(Instant::now(), before, "in the cache already");
    assert_eq!(
        credential,
        tower_client_auth::Credential::bearer(format!("token-{}", failed + 2)).unwrap()
    );
}

/// World: keep-warm caches and layers, dropped (one of them while a keep-warm refresh is
/// at the token endpoint). Proves: no timer or task outlives the last clone, and no
/// fetch happens after it is gone.
#[tokio::test(start_paused = true)]
async fn keep_warm_stops_with_the_last_clone() {
    let baseline = alive_tasks();

    // Idle, then dropped.
    let source = TestSource::expiring(Duration::from_secs(100));
    let layer = AuthLayer::builder(source.clone())
        .keep_warm(true)
        .any_https_origin()
        .build()
        .unwrap();
    layer.warm_up().await.unwrap();
    let svc = layer
        .clone()
        .layer(FakeApi::new(|_, _| StatusCode::OK).service());
    settle().await;
    assert!(alive_tasks() > baseline, "the aging timer runs");
    drop((layer, svc));
    settle().await;
    assert_eq!(alive_tasks(), baseline, "its timer went with the cache");
    tokio::time::sleep(Duration::from_secs(1000)).await;
    assert_eq!(source.fetches(), 1);

    // Dropped while its keep-warm refresh is at the endpoint: that fetch ends (bounded by
    // the fetch timeout), and nothing follows it.
    let source = TestSource::build(
        Some(Duration::from_secs(100)),
        Duration::from_secs(2),
        false,
        RefreshMode::Proactive,
    );
    let cache = cache(&source, true);
    cache.warm_up().await.unwrap();
    tokio::time::sleep(Duration::from_secs(76)).await;
    assert_eq!(source.fetches(), 2, "the keep-warm refresh is in flight");
    drop(cache);
    tokio::time::sleep(Duration::from_secs(2)).await;
    settle().await;
    assert_eq!(alive_tasks(), baseline, "gone once its fetch ended");
    tokio::time::sleep(Duration::from_secs(1000)).await;
    assert_eq!(source.fetches(), 2);
}

/// World: a source whose every credential arrives already inside its soft window (issued
/// long before, as a server that hands out its cached token does), a client idle for 10
/// minutes. Proves: keep-warm leaves such a credential to requests: no background
/// refresh at all (each would bring another one just as old), and a request after the
/// idle period fetches as without keep-warm.
#[tokio::test(start_paused = true)]
async fn keep_warm_does_not_spin_on_credentials_born_old() {
    #[derive(Clone, Default)]
    struct Old(std::sync::Arc<std::sync::atomic::AtomicUsize>);
    impl tower_client_auth::CredentialSource for Old {
        async fn fetch(
            &self,
            _: tower_client_auth::FetchContext,
        ) -> Result<tower_client_auth::Credential, tower_client_auth::BoxError> {
            // A spinning cache would never let paused time advance: fail it instead.
            if self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 100 {
                return Err("spinning".into());
            }
            // Issued 80 s ago for 100 s: its soft window (the last 25 s) is open.
            let issued = std::time::SystemTime::now() - Duration::from_secs(80);
            Ok(tower_client_auth::Credential::bearer("same")?
                .lives(issued, Duration::from_secs(100)))
        }
    }
    let source = Old::default();
    let cache = CredentialCache::builder(source.clone())
        .window_jitter(0.0)
        .backoff(Duration::from_secs(1), Duration::from_secs(8))
        .keep_warm(true)
        .build()
        .unwrap();
    cache.warm_up().await.unwrap();
    tokio::time::sleep(Duration::from_secs(600)).await;
    settle().await;
    assert_eq!(source.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    cache.credential().await.unwrap();
    assert_eq!(source.0.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// World: `warm_up` on a layer whose token endpoint fails. Proves: the cold start's
/// error is the typed one a request would get, and a later request fetches on the
/// backoff's terms.
#[tokio::test(start_paused = true)]
async fn warm_up_reports_a_failed_cold_start() {
    let source = TestSource::expiring(Duration::from_secs(100));
    source.set_failing(true);
    let layer = AuthLayer::with_cache(cache(&source, false)).any_https_origin();
    let err = layer.warm_up().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Fetch);
    assert_eq!(source.fetches(), 1);
    source.set_failing(false);
    tokio::time::sleep(Duration::from_secs(2)).await;
    layer.warm_up().await.unwrap();
    assert_eq!(source.fetches(), 2);
}
