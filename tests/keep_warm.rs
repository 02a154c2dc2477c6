//! Keep-warm and warm-up, in paused time: a proactive credential refreshed before its
//! soft window with no request arriving, so the first burst after an idle period is served
//! from the cache; never for a reactive-only source; backing off like any refresh; gone
//! with the last clone of the cache; and a cold start fetched before the first request.

use crate::support;

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
    // The soft window is counted on the wall clock, which moves in real time while the
    // test's paused clock jumps: a loaded machine shifts each refresh by milliseconds.
    for pair in log.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(
            gap.abs_diff(Duration::from_secs(75)) < Duration::from_millis(100),
            "{gap:?}"
        );
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
    // Every fetch's time and reason, for the message: this assertion failed once, beside
    // a build, and was not seen again (twenty-third sitting).
    let log: Vec<_> = (source.log().iter())
        .map(|(at, why)| (*at - start, *why))
        .collect();
    assert_eq!(calls[1] - start, Duration::from_secs(75), "{log:?}");
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

/// World: an issuer that hands out tokens it minted a while ago: each arrives with 31 s
/// left of its 100 s, just before its soft window (the last 25 s) opens; keep-warm, no
/// request for 10 minutes. Proves (review 67): keep-warm refreshes such a credential
/// once, and leaves the next to requests, since it gained hardly any life: it does not
/// ask the issuer at the soft window's pace for good (171 requests in 10 minutes before).
#[tokio::test(start_paused = true)]
async fn keep_warm_does_not_spin_on_credentials_born_just_before_their_soft_window() {
    #[derive(Clone, Default)]
    struct Aged(std::sync::Arc<std::sync::atomic::AtomicUsize>);
    impl tower_client_auth::CredentialSource for Aged {
        async fn fetch(
            &self,
            _: tower_client_auth::FetchContext,
        ) -> Result<tower_client_auth::Credential, tower_client_auth::BoxError> {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let issued = std::time::SystemTime::now() - Duration::from_secs(69);
            Ok(tower_client_auth::Credential::bearer(format!("aged-{n}"))?
                .lives(issued, Duration::from_secs(100)))
        }
    }
    let source = Aged::default();
    let cache = CredentialCache::builder(source.clone())
        .window_jitter(0.0)
        .keep_warm(true)
        .build()
        .unwrap();
    cache.warm_up().await.unwrap();
    tokio::time::sleep(Duration::from_secs(600)).await;
    settle().await;
    assert_eq!(source.0.load(std::sync::atomic::Ordering::SeqCst), 2);
    cache.credential().await.unwrap();
    assert_eq!(source.0.load(std::sync::atomic::Ordering::SeqCst), 3);
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

/// World: keep-warm over a store (a fleet of one), fetch timeout 5 s, backoff 1 s up to
/// `backoff_max`; the token endpoint hangs from the keep-warm refresh on, and the last
/// clone is dropped while that refresh is at the endpoint. The lease holder's fetch goes
/// on past its flight's deadline (`finish_late`), holding the cache for its own task.
/// Proves (review 67): the source is asked no more once the last clone went (that task
/// does not count as a user, so its failure's retry does not start another refresh that
/// holds the cache in turn), and no task of the cache is left.
async fn dropped_over_a_store_with_a_hung_endpoint(backoff_max: Duration) {
    let baseline = alive_tasks();
    let source = TestSource::gated(Some(Duration::from_secs(100)));
    source.release(1);
    let cache = CredentialCache::builder(source.clone())
        .window_jitter(0.0)
        .fetch_timeout(Duration::from_secs(5))
        .backoff(Duration::from_secs(1), backoff_max)
        .store(tower_client_auth::MemoryStore::new())
        .keep_warm(true)
        .build()
        .unwrap();
    cache.warm_up().await.unwrap();
    tokio::time::sleep(Duration::from_secs(76)).await;
    settle().await;
    assert_eq!(
        source.fetches(),
        2,
        "the keep-warm refresh is at the endpoint"
    );
    let dropped = Instant::now();
    drop(cache);
    tokio::time::sleep(Duration::from_secs(600)).await;
    settle().await;
    let since: Vec<_> = (source.log().iter())
        .filter(|(at, _)| *at > dropped)
        .map(|(at, _)| *at - dropped)
        .collect();
    assert!(
        since.is_empty(),
        "the source was asked after the last clone went: {since:?}"
    );
    assert_eq!(alive_tasks(), baseline, "a task outlived the cache");
}

/// World: `dropped_over_a_store_with_a_hung_endpoint`, with a backoff that can outgrow
/// the fetch timeout (up to 8 s).
#[tokio::test(start_paused = true)]
async fn keep_warm_over_a_store_stops_with_the_last_clone() {
    dropped_over_a_store_with_a_hung_endpoint(Duration::from_secs(8)).await;
}

/// World: `dropped_over_a_store_with_a_hung_endpoint`, with a backoff shorter than the
/// fetch timeout (up to 4 s): before the fix, the dropped cache asked the endpoint
/// every few seconds for good.
#[tokio::test(start_paused = true)]
async fn keep_warm_over_a_store_with_a_short_backoff_stops_with_the_last_clone() {
    dropped_over_a_store_with_a_hung_endpoint(Duration::from_secs(4)).await;
}

/// World: a credential installed on runtime A (8 s token: soft window at 6 s, hard at
/// 7.6 s; backoff 100 to 200 ms); A's background refresh (keep-warm's, or a request's in
/// the soft window) is at the token endpoint when A shuts down, which cancels it; the
/// endpoint recovers, and the application goes on with the cache on runtime B, asking
/// for the credential every 50 ms from 6.6 s to 7.3 s (past that refresh's backoff,
/// before the hard window). Real time. Returns the fetches made by then.
fn background_refresh_cancelled_with_its_runtime(keep_warm: bool) -> usize {
    let source = TestSource::gated(Some(Duration::from_secs(8)));
    source.release(1);
    let cache = CredentialCache::builder(source.clone())
        .window_jitter(0.0)
        .backoff(Duration::from_millis(100), Duration::from_millis(200))
        .keep_warm(keep_warm)
        .build()
        .unwrap();
    let start = std::time::Instant::now();
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let a = runtime();
    a.block_on(async {
        cache.warm_up().await.unwrap();
        tokio::time::sleep(Duration::from_millis(6300)).await;
        if !keep_warm {
            // A request in the soft window starts the background refresh.
            cache.credential().await.unwrap();
        }
        settle().await;
    });
    assert_eq!(
        source.fetches(),
        2,
        "the background refresh is at the endpoint"
    );
    drop(a);
    source.release(100);
    runtime().block_on(async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        while start.elapsed() < Duration::from_millis(7300) {
            tokio::time::timeout(Duration::from_secs(5), cache.credential())
                .await
                .expect("a request in the soft window waited")
                .unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        source.fetches()
    })
}

/// World: `background_refresh_cancelled_with_its_runtime`, keep-warm's refresh
/// cancelled. Proves (review 67): the cancelled refresh's claim on the soft window is
/// given back (its timer was refused by the runtime shutting down): a caller on B
/// starts the background refresh once the backoff is over, rather than nothing until
/// the hard window makes every caller wait.
#[test]
fn a_keep_warm_refresh_cancelled_with_its_runtime_leaves_no_claim() {
    let fetches = background_refresh_cancelled_with_its_runtime(true);
    assert!(
        fetches > 2,
        "no background refresh after the cancelled one ({fetches})"
    );
}

/// World: as above, a request's background refresh cancelled (no keep-warm). Proves
/// (review 67): the same.
#[test]
fn a_background_refresh_cancelled_with_its_runtime_leaves_no_claim() {
    let fetches = background_refresh_cancelled_with_its_runtime(false);
    assert!(
        fetches > 2,
        "no background refresh after the cancelled one ({fetches})"
    );
}

/// World: keep-warm's refresh held at the token endpoint while every other entry point
/// piles on: an invalidation, requests, a credential handed over (`replace`), its
/// rejection, another invalidation, more requests; then the endpoint answers one fetch
/// at a time. Proves (review 67's probe): never two fetches at the endpoint at once, and
/// every caller is answered.
#[tokio::test(start_paused = true)]
async fn keep_warm_racing_every_entry_point_is_one_fetch_at_a_time() {
    let source = TestSource::gated(Some(Duration::from_secs(100)));
    source.release(1);
    let cache = cache(&source, true);
    cache.warm_up().await.unwrap();
    tokio::time::sleep(Duration::from_secs(76)).await;
    settle().await;
    assert_eq!(
        source.fetches(),
        2,
        "keep-warm's refresh is at the endpoint"
    );
    let handle = cache.handle();
    let asking = |tasks: &mut Vec<tokio::task::JoinHandle<_>>| {
        for _ in 0..3 {
            let cache = cache.clone();
            tasks.push(tokio::spawn(
                async move { cache.credential().await.map(drop) },
            ));
        }
    };
    let mut tasks = Vec::new();
    handle.invalidate();
    asking(&mut tasks);
    settle().await;
    let handed = tower_client_auth::Credential::bearer("handed")
        .unwrap()
        .expires_in(Duration::from_secs(100));
    handle.replace(handed.clone()).unwrap();
    let rejecting = cache.clone();
    tasks.push(tokio::spawn(async move {
        rejecting.reject(&handed).await.map(drop)
    }));
    settle().await;
    handle.invalidate();
    asking(&mut tasks);
    settle().await;
    for _ in 0..10 {
        source.release(1);
        settle().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("a caller was never answered")
            .unwrap()
            .unwrap();
    }
    assert_eq!(
        source.max_in_flight(),
        1,
        "two fetches at the endpoint at once"
    );
}

/// Issues `token-1`, `token-2`, ... living `lifetime` from the cache's own wall clock
/// (`FetchContext::now`), so a `ManualClock` stands for a suspend.
#[derive(Clone, Default)]
struct WallIssuer(std::sync::Arc<std::sync::atomic::AtomicUsize>, Duration);

impl tower_client_auth::CredentialSource for WallIssuer {
    async fn fetch(
        &self,
        cx: tower_client_auth::FetchContext,
    ) -> Result<tower_client_auth::Credential, tower_client_auth::BoxError> {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        Ok(tower_client_auth::Credential::bearer(format!("token-{n}"))?.lives(cx.now(), self.1))
    }
}

/// A keep-warm cache on a `ManualClock` over a [`WallIssuer`] of 100 s tokens (soft
/// window at 75 s, no jitter, backoff 1-8 s), not warmed up yet.
fn wall_keep_warm() -> (
    tower_client_auth::clock::ManualClock,
    WallIssuer,
    CredentialCache<WallIssuer>,
) {
    let clock = tower_client_auth::clock::ManualClock::new(
        std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    );
    let issuer = WallIssuer(Default::default(), Duration::from_secs(100));
    let cache = CredentialCache::builder(issuer.clone())
        .window_jitter(0.0)
        .backoff(Duration::from_secs(1), Duration::from_secs(8))
        .clock(clock.clone())
        .keep_warm(true)
        .build()
        .unwrap();
    (clock, issuer, cache)
}

/// World (review 120): a keep-warm cache over a 100 s token (soft window at 75 s), then
/// the host suspends for 90 s (a laptop lid, a paused VM): the wall clock moves on, the
/// monotonic clock does not (`ManualClock` for the wall, Tokio's paused clock for the
/// monotonic time). On waking, the client idles 9 s more; the token still has 1 s left.
/// Proves: README's "no request arrives, `.keep_warm(true)`: the aging timer starts the
/// background refresh when the soft window opens, so the first burst after an idle
/// period is served from the cache" (and `clock`'s "the cache therefore judges expiry on
/// the wall clock"): the soft window opened by the wall clock during the suspend, so
/// keep-warm refreshes soon after waking, before the token expires.
#[tokio::test(start_paused = true)]
async fn keep_warm_refreshes_after_a_suspend_that_crossed_the_soft_window() {
    let (clock, issuer, cache) = wall_keep_warm();
    cache.warm_up().await.unwrap();
    let fetched = || issuer.0.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(fetched(), 1);
    // Suspended for 90 s: past the soft window (75 s) by the wall clock.
    clock.advance(Duration::from_secs(90));
    // Awake and idle for 9 s of monotonic time (the wall clock is held, so the token
    // still has 1 s left at the end).
    tokio::time::sleep(Duration::from_secs(9)).await;
    settle().await;
    assert_eq!(
        fetched(),
        2,
        "keep-warm did not refresh after waking inside the soft window (wall 99 s of a 100 s token)"
    );
}

/// World (review 120): a keep-warm cache whose source issues credentials with no expiry,
/// idle for 1,000 s, then dropped. Proves (held): keep-warm never refreshes a credential
/// that states no expiry (no soft window), runs no timer for it, and leaves no task
/// behind once the last clone goes.
#[tokio::test(start_paused = true)]
async fn keep_warm_on_a_credential_without_expiry_does_nothing() {
    let baseline = alive_tasks();
    let source = TestSource::new();
    let cache = cache(&source, true);
    cache.warm_up().await.unwrap();
    settle().await;
    assert_eq!(
        alive_tasks(),
        baseline,
        "no timer for a credential without expiry"
    );
    tokio::time::sleep(Duration::from_secs(1000)).await;
    settle().await;
    assert_eq!(source.fetches(), 1);
    drop(cache);
    settle().await;
    assert_eq!(alive_tasks(), baseline);
}

/// World (review 120): keep-warm's refresh is at the source when the source itself drops
/// the last clone of the cache (an app's shutdown hook run from inside a fetch, a source
/// that held the cache in a slot and gives it up). Proves (held): "the timer ends with
/// the last clone of the cache, and no refresh starts after it": once that fetch ends, no
/// task is left and the source is never asked again.
#[tokio::test(start_paused = true)]
async fn keep_warm_cache_dropped_from_inside_its_own_fetch_stops() {
    #[derive(Clone, Default)]
    struct Dropper {
        fetches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        slot: std::sync::Arc<std::sync::Mutex<Option<CredentialCache<Dropper>>>>,
    }
    impl tower_client_auth::CredentialSource for Dropper {
        async fn fetch(
            &self,
            _: tower_client_auth::FetchContext,
        ) -> Result<tower_client_auth::Credential, tower_client_auth::BoxError> {
            let n = self
                .fetches
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                + 1;
            if n == 2 {
                // The keep-warm refresh: the last user goes from inside it.
                let last = self.slot.lock().unwrap().take();
                drop(last);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Ok(tower_client_auth::Credential::bearer(format!("token-{n}"))?
                .expires_in(Duration::from_secs(100)))
        }
    }
    let baseline = alive_tasks();
    let source = Dropper::default();
    let cache = CredentialCache::builder(source.clone())
        .window_jitter(0.0)
        .backoff(Duration::from_secs(1), Duration::from_secs(8))
        .keep_warm(true)
        .build()
        .unwrap();
    cache.warm_up().await.unwrap();
    *source.slot.lock().unwrap() = Some(cache);
    tokio::time::sleep(Duration::from_secs(76)).await;
    settle().await;
    assert_eq!(source.fetches.load(std::sync::atomic::Ordering::SeqCst), 2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    settle().await;
    assert_eq!(alive_tasks(), baseline, "a task outlived the cache");
    tokio::time::sleep(Duration::from_secs(1000)).await;
    settle().await;
    assert_eq!(source.fetches.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// World (review 120): a keep-warm cache warmed up on runtime A (4 s token: soft window
/// at 3 s, no jitter); A shuts down 1 s in (a blocking wrapper's runtime replaced, a
/// test harness's runtime per phase) while keep-warm sleeps, taking the timer with it;
/// the application goes on with the cache on runtime B. Real time. Proves the builder's
/// "a runtime that shuts down takes that timer with it: the credential is left to
/// requests until the next one arrives, whose timer runs on the runtime that installs
/// it": nothing refreshes while no request comes (no runtime is known to run it on);
/// B's first request in the soft window is served and refreshes in the background, on
/// B; that credential's keep-warm then refreshes on B with no request at all.
#[test]
fn keep_warm_resumes_on_the_runtime_of_the_next_credential() {
    let source = TestSource::expiring(Duration::from_secs(4));
    let cache = CredentialCache::builder(source.clone())
        .window_jitter(0.0)
        .backoff(Duration::from_millis(100), Duration::from_millis(200))
        .keep_warm(true)
        .build()
        .unwrap();
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let a = runtime();
    a.block_on(async {
        cache.warm_up().await.unwrap();
        tokio::time::sleep(Duration::from_millis(1000)).await;
    });
    drop(a);
    let b = runtime();
    b.block_on(async {
        // Idle into the soft window (3 s), before expiry (4 s): no runtime to refresh on.
        tokio::time::sleep(Duration::from_millis(2300)).await;
        assert_eq!(source.fetches(), 1);
        // A request: served from the cache, and the background refresh runs on B.
        cache.credential().await.unwrap();
        for _ in 0..100 {
            if source.fetches() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            source.fetches(),
            2,
            "the request in the soft window refreshed"
        );
        // The new credential's keep-warm runs on B: a refresh 3 s on, no request.
        tokio::time::sleep(Duration::from_millis(3500)).await;
        assert_eq!(source.fetches(), 3, "keep-warm resumed on B");
    });
}

/// World (review 122): a keep-warm cache over a 100 s token (soft window at 75 s); right
/// after the first fetch the wall clock is stepped back an hour (an NTP correction), and
/// the client idles 200 s of monotonic time (the wall clock held there); then the wall
/// clock is stepped forward 2 hours and the client idles 200 s more.
/// Proves (held; README "no request arrives, `.keep_warm(true)`": the timer looks at the
/// wall clock "every quarter of the window", and keep-warm never spins): a wall clock
/// stepped back leaves the refresh to the monotonic timer (one per 75 s, not a loop),
/// and one stepped far forward (every token now long expired by it) brings one refresh
/// at once, then one per window again, never a refresh per wall-clock look.
/// Counter: the source's fetches.
#[tokio::test(start_paused = true)]
async fn keep_warm_does_not_spin_when_the_wall_clock_is_stepped_back_or_far_forward() {
    use tower_client_auth::clock::Clock as _;
    let (clock, issuer, cache) = wall_keep_warm();
    cache.warm_up().await.unwrap();
    let fetched = || issuer.0.load(std::sync::atomic::Ordering::SeqCst);
    clock.set(clock.now() - Duration::from_secs(3600));
    tokio::time::sleep(Duration::from_secs(200)).await;
    settle().await;
    let back = fetched();
    assert!(
        (2..=4).contains(&back),
        "{back} fetches in 200 s of a 100 s token after the wall clock stepped back"
    );
    clock.set(clock.now() + Duration::from_secs(7200));
    tokio::time::sleep(Duration::from_secs(200)).await;
    settle().await;
    let forward = fetched() - back;
    assert!(
        (1..=5).contains(&forward),
        "{forward} fetches in 200 s of a 100 s token after the wall clock stepped forward 2 h"
    );
}

/// World (review 122): a keep-warm cache over a 100 s token on a wall clock then stepped
/// back an hour, so its aging timer is in the wall-clock loop (looking every quarter of
/// the window, the window an hour away by the wall); 30 s pass and the last clone of the
/// cache is dropped.
/// Proves (held; README: "the timer ends with the last clone of the cache"): no task is
/// left behind once the last clone goes, the looping timer included, and no refresh
/// starts after. Counters: the runtime's alive tasks; the source's fetches.
#[tokio::test(start_paused = true)]
async fn keep_warm_wall_clock_loop_ends_with_the_last_clone() {
    use tower_client_auth::clock::{Clock as _, ManualClock};
    let baseline = alive_tasks();
    let clock =
        ManualClock::new(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
    let issuer = WallIssuer(Default::default(), Duration::from_secs(100));
    let cache = CredentialCache::builder(issuer.clone())
        .window_jitter(0.0)
        .clock(clock.clone())
        .keep_warm(true)
        .build()
        .unwrap();
    cache.warm_up().await.unwrap();
    clock.set(clock.now() - Duration::from_secs(3600));
    tokio::time::sleep(Duration::from_secs(30)).await;
    settle().await;
    drop(cache);
    settle().await;
    assert_eq!(alive_tasks(), baseline, "a task outlived the last clone");
    tokio::time::sleep(Duration::from_secs(300)).await;
    settle().await;
    assert_eq!(issuer.0.load(std::sync::atomic::Ordering::SeqCst), 1);
}
