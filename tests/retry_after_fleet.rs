//! The token endpoint's `Retry-After` across processes that share a store: README's "a
//! token endpoint's `Retry-After` is the earliest next token request", from each path a
//! process of the fleet asks by (a rejection's refresh, a fetch its flight stopped waiting
//! for, a background refresh before expiry, a step-up, a hold longer than the cap, a
//! store that keeps no hold). Each process is a cache
//! over its own token source and its own handle on one `MemoryStore`; the scenario every
//! store runs (Redis, the file store) is `support::contract::a_retry_after_holds_every_process`.
#![cfg(feature = "token")]

use std::time::{Duration, SystemTime};

use crate::support::scripted::{Idp, Scripted, settle};
use tower_client_auth::{
    BoxError, Credential, CredentialCache, CredentialStore, ErrorKind, MemoryStore,
    cache::MAX_RETRY_AFTER, clock::ManualClock, store::Lease, token::TokenSource,
};

/// A process of the fleet: a cache over its own source for `idp`'s client, over `store`.
fn process(idp: &Idp, store: impl CredentialStore) -> CredentialCache<TokenSource> {
    CredentialCache::builder(idp.source())
        .store(store)
        .window_jitter(0.0)
        .backoff(Duration::from_millis(100), Duration::from_millis(200))
        .fetch_timeout(Duration::from_millis(300))
        .build()
        .unwrap()
}

/// World: two processes share `at-1`/`rt-1`; the API rejects it in the first, whose
/// refresh is answered `503` with `Retry-After: 2`; then the second process's copy is
/// rejected too, inside the hold. Proves: the second process sends no token request
/// inside the hold (neither the refresh nor the login the first one's answer left owed)
/// and fails with `Backoff` saying how long is left; after the hold one request serves
/// both, and no refresh token is lost.
#[tokio::test]
async fn a_rejection_in_another_process_inside_the_hold_asks_nothing() {
    let idp = Idp::default();
    let store = MemoryStore::new();
    let (a, b) = (process(&idp, store.clone()), process(&idp, store.clone()));
    let first = a.credential().await.unwrap();
    assert_eq!(b.credential().await.unwrap(), first, "b takes a's login");
    idp.push(Scripted::now(503, Some("2"), "upstream busy"));
    a.reject(&first).await.expect_err("refused, held");
    assert_eq!(idp.log().len(), 2, "{:?}", idp.brief());
    let answered = idp.log()[1].1.unwrap();

    let held = b.reject(&first).await.expect_err("a token inside the hold");
    assert_eq!(held.kind(), ErrorKind::Backoff, "{held}");
    let left = held.retry_in().expect("how long is left");
    assert!(
        left > Duration::from_millis(1000) && left <= Duration::from_secs(2),
        "{left:?}"
    );
    assert_eq!(
        idp.log().len(),
        2,
        "asked inside the hold: {:?}",
        idp.brief()
    );

    tokio::time::sleep_until(answered + Duration::from_millis(2100)).await;
    let next = b.credential().await.expect("a token after the hold");
    assert_ne!(next, first);
    assert_eq!(
        a.credential().await.unwrap(),
        next,
        "one request serves both"
    );
    let log = idp.log();
    assert_eq!(log.len(), 3, "{:?}", idp.brief());
    assert!(log[2].0 >= answered + Duration::from_secs(2));
}

/// World: a process stops waiting for its login after 300 ms; the endpoint answers it at
/// 500 ms, `429` with `Retry-After: 2`; another process asks at 700 ms. Proves: the
/// answer that came after its flight gave up still holds the fleet: the second process
/// sends nothing before the 2 s are up.
#[tokio::test]
async fn a_retry_after_answering_a_fetch_after_its_timeout_holds_the_fleet() {
    let idp = Idp::default();
    let store = MemoryStore::new();
    let (a, b) = (process(&idp, store.clone()), process(&idp, store.clone()));
    idp.push(Scripted::after(
        Duration::from_millis(500),
        429,
        Some("2"),
        r#"{"error":"rate_limited"}"#,
    ));
    let timed_out = a.credential().await.expect_err("no answer in time");
    assert_eq!(timed_out.kind(), ErrorKind::Timeout, "{timed_out}");
    let started = idp.log()[0].0;
    tokio::time::sleep_until(started + Duration::from_millis(700)).await;
    let answered = idp.log()[0].1.expect("answered by now");
    let held = b.credential().await.expect_err("a token inside the hold");
    assert_eq!(held.kind(), ErrorKind::Backoff, "{held}");
    assert_eq!(
        idp.log().len(),
        1,
        "asked inside the hold: {:?}",
        idp.brief()
    );

    tokio::time::sleep_until(answered + Duration::from_millis(2100)).await;
    b.credential().await.expect("a token after the hold");
    let log = idp.log();
    assert_eq!(log.len(), 2, "{:?}", idp.brief());
    assert!(log[1].0 >= answered + Duration::from_secs(2));
}

/// World: the store holds a hold a day away (a clock far ahead, a value another version
/// wrote). Proves: a process holds back at most `MAX_RETRY_AFTER`, as for its own
/// endpoint's answer, and says so with a `Backoff` error rather than wait or fail
/// otherwise.
#[tokio::test]
async fn a_hold_past_the_cap_holds_no_longer_than_it() {
    let idp = Idp::default();
    let store = MemoryStore::new();
    store
        .hold(SystemTime::now() + Duration::from_secs(86_400))
        .await
        .unwrap();
    let err = process(&idp, store).credential().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backoff, "{err}");
    let left = err.retry_in().unwrap();
    assert!(
        left <= MAX_RETRY_AFTER && left > MAX_RETRY_AFTER / 2,
        "{left:?}"
    );
    assert!(idp.log().is_empty());
}

/// A store of one's own that keeps no hold (the trait's default calls).
#[derive(Clone, Default)]
struct NoHolds(MemoryStore);

impl CredentialStore for NoHolds {
    async fn load(&self) -> Result<Option<Credential>, BoxError> {
        self.0.load().await
    }
    async fn lease(&self, ttl: Duration) -> Result<Option<Lease>, BoxError> {
        self.0.lease(ttl).await
    }
    async fn save(&self, lease: &Lease, credential: &Credential) -> Result<bool, BoxError> {
        self.0.save(lease, credential).await
    }
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, BoxError> {
        self.0.renew(lease, ttl).await
    }
    async fn release(&self, lease: &Lease) -> Result<(), BoxError> {
        self.0.release(lease).await
    }
    async fn remove(&self, rejected: &Credential) -> Result<(), BoxError> {
        self.0.remove(rejected).await
    }
}

/// World: a store of one's own written before holds were shared (it implements none of
/// the hold's calls); the endpoint answers a process's login `429` with `Retry-After:
/// 2`. Proves: the trait's default calls keep such a store working, and the process
/// holds back on its own (nothing more sent from it inside the hold), as it does with
/// no store.
#[tokio::test]
async fn a_store_that_keeps_no_hold_still_holds_its_own_process() {
    let idp = Idp::default();
    let a = process(&idp, NoHolds::default());
    idp.push(Scripted::now(429, Some("2"), r#"{"error":"rate_limited"}"#));
    a.credential().await.expect_err("throttled");
    let held = a.credential().await.expect_err("inside its own hold");
    assert_eq!(held.kind(), ErrorKind::Backoff, "{held}");
    let left = held.retry_in().unwrap();
    assert!(left > Duration::from_secs(1), "{left:?}");
    assert_eq!(idp.log().len(), 1, "{:?}", idp.brief());
}

/// Two processes over `store`, a cache each over its own source for `idp`, both on
/// `clock` (their wall clock).
fn on_clock(
    idp: &Idp,
    clock: &ManualClock,
    stores: [impl CredentialStore; 2],
) -> [CredentialCache<TokenSource>; 2] {
    stores.map(|store| {
        CredentialCache::builder(idp.source())
            .window_jitter(0.0)
            .store(store)
            .clock(clock.clone())
            .build()
            .unwrap()
    })
}

/// Two processes over one `MemoryStore` on one `ManualClock` (see [`on_clock`]), the
/// first logged in and the second holding the same credential from the store.
async fn sharing_a_login(idp: &Idp) -> (ManualClock, [CredentialCache<TokenSource>; 2]) {
    let clock = ManualClock::new(SystemTime::now());
    let store = MemoryStore::new();
    let [a, b] = on_clock(idp, &clock, [store.clone(), store]);
    a.credential().await.unwrap();
    b.credential().await.unwrap();
    (clock, [a, b])
}

/// Lets `d` pass on both clocks a cache reads: Tokio's (paused) and its wall clock.
async fn pass(clock: &ManualClock, d: Duration) {
    clock.advance(d);
    tokio::time::sleep(d).await;
}

/// World: two processes on one store and one wall clock. A's refresh is answered `503`,
/// `Retry-After: 2`, and B sees that hold; it ends; the wall clock is stepped back a
/// minute (NTP), and A's next refresh is answered `429`, `Retry-After: 30`, a time
/// earlier than the first hold's by the clock now. Proves: B, asked inside the second
/// hold, sends nothing and fails with `Backoff` (review 105: the store kept the later,
/// stale time, which B had seen end, and B asked).
#[tokio::test(start_paused = true)]
async fn a_hold_after_the_wall_clock_stepped_back_still_holds_the_fleet() {
    let idp = Idp::default();
    let (clock, [a, b]) = sharing_a_login(&idp).await;
    idp.push(Scripted::now(503, Some("2"), "upstream busy"));
    a.handle().invalidate();
    a.credential().await.expect_err("throttled");
    b.handle().invalidate();
    let held = b.credential().await.expect_err("inside the first hold");
    assert_eq!(held.kind(), ErrorKind::Backoff, "{held}");
    assert_eq!(idp.log().len(), 2, "{:?}", idp.brief());

    pass(&clock, Duration::from_millis(2100)).await;
    clock.set(SystemTime::now() - Duration::from_secs(60));
    idp.push(Scripted::now(
        429,
        Some("30"),
        r#"{"error":"rate_limited"}"#,
    ));
    a.handle().invalidate();
    a.credential().await.expect_err("throttled again");
    assert_eq!(idp.log().len(), 3, "{:?}", idp.brief());

    pass(&clock, Duration::from_secs(1)).await;
    b.handle().invalidate();
    let held = b.credential().await;
    assert_eq!(
        idp.log().len(),
        3,
        "B asked inside A's hold: {:?}",
        idp.brief()
    );
    let held = held.expect_err("inside the second hold");
    assert_eq!(held.kind(), ErrorKind::Backoff, "{held}");
}

/// World: two processes whose caches' clock (a `ManualClock`) runs an hour behind the
/// host's, on a `MemoryStore` and on a real Redis; A's login is answered `429`,
/// `Retry-After: 2`. Proves: the hold is kept on the caches' clock, whatever the host's
/// says: B sends nothing inside it (review 105: Redis dropped a hold already past by the
/// host's clock).
#[tokio::test]
async fn a_hold_is_kept_on_the_caches_clock_not_the_hosts() {
    async fn held(stores: [impl CredentialStore; 2]) {
        let idp = Idp::default();
        let clock = ManualClock::new(SystemTime::now() - Duration::from_secs(3600));
        let [a, b] = on_clock(&idp, &clock, stores);
        idp.push(Scripted::now(429, Some("2"), r#"{"error":"rate_limited"}"#));
        a.credential().await.expect_err("throttled");
        let held = b.credential().await;
        assert_eq!(
            idp.log().len(),
            1,
            "B asked inside A's hold: {:?}",
            idp.brief()
        );
        assert_eq!(held.unwrap_err().kind(), ErrorKind::Backoff);
    }
    let memory = MemoryStore::new();
    held([memory.clone(), memory]).await;
    #[cfg(feature = "redis")]
    {
        use tower_client_auth::store::redis::RedisStore;
        let server = crate::support::redis::RedisServer::start();
        let a = RedisStore::connect(&server.url(), "clock").await.unwrap();
        let b = RedisStore::connect(&server.url(), "clock").await.unwrap();
        held([a, b]).await;
    }
}

/// World: one process on each store, its wall clock a `ManualClock` read to the
/// nanosecond, as the host's is; its login is answered `429`, `Retry-After: 1`; 1.1 s
/// pass on both clocks, then the wall clock is stepped back a minute and it asks again.
/// Proves: its own 1 s hold, over by the monotonic clock, is not stretched by the step
/// back on any store (review 106: Redis and the file store keep the time to the
/// millisecond, and the writer no longer knew its own hold when it read it back).
#[tokio::test]
async fn a_writers_own_hold_read_back_to_the_millisecond_is_not_stretched() {
    async fn asks_after_its_hold(store: impl CredentialStore, what: &str) {
        let idp = Idp::default();
        let clock = ManualClock::new(SystemTime::now());
        let a = CredentialCache::builder(idp.source())
            .store(store)
            .clock(clock.clone())
            .window_jitter(0.0)
            .backoff(Duration::from_millis(100), Duration::from_millis(200))
            .build()
            .unwrap();
        idp.push(Scripted::now(429, Some("1"), r#"{"error":"rate_limited"}"#));
        a.credential().await.expect_err("throttled");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        clock.advance(Duration::from_millis(1100));
        clock.set(SystemTime::now() - Duration::from_secs(60));
        let after = a.credential().await;
        assert!(after.is_ok(), "{what}: {after:?}");
        assert_eq!(idp.log().len(), 2, "{what}: {:?}", idp.brief());
    }
    asks_after_its_hold(MemoryStore::new(), "MemoryStore").await;
    #[cfg(feature = "file-store")]
    {
        let dir = crate::support::TempDir::new("hold-millis");
        let store = tower_client_auth::store::file::FileStore::open(dir.join("token.json"));
        asks_after_its_hold(store.unwrap(), "FileStore").await;
    }
    #[cfg(feature = "redis")]
    {
        use tower_client_auth::store::redis::RedisStore;
        let server = crate::support::redis::RedisServer::start();
        let store = RedisStore::connect(&server.url(), "millis").await.unwrap();
        asks_after_its_hold(store, "RedisStore").await;
    }
}

/// World: the store holds the fleet for 300 ms more (another process's 429); a process
/// whose source never failed, with backoff steps (2 s) longer than that, asks twice at
/// once, waits the `retry_in` it was told, and asks again. Proves: every caller inside
/// the hold is told how long is left of it, not the process's own backoff step (README:
/// "fails its callers with `ErrorKind::Backoff` and how long is left"); once that is
/// over the source is asked (`Error::retry_in`: "how long until the cache asks the
/// source again"); the hold is no failure: its error names the fleet's wait, not failed
/// fetches, has no cause, and `CacheStats::fetch_failures` stays 0 (review 108: the
/// second caller was told 1.2 s, and asked after the 300 ms it was still held).
#[tokio::test]
async fn a_process_held_by_the_fleet_is_told_how_long_and_asks_after_it() {
    let idp = Idp::default();
    let store = MemoryStore::new();
    store
        .hold(SystemTime::now() + Duration::from_millis(300))
        .await
        .unwrap();
    let a = CredentialCache::builder(idp.source())
        .store(store)
        .window_jitter(0.0)
        .backoff(Duration::from_secs(2), Duration::from_secs(4))
        .build()
        .unwrap();
    let mut wait = Duration::ZERO;
    for _ in 0..2 {
        let held = a.credential().await.expect_err("held");
        assert_eq!(held.kind(), ErrorKind::Backoff, "{held}");
        wait = held.retry_in().expect("how long is left");
        assert!(wait <= Duration::from_millis(300), "told {wait:?}");
        let text = held.to_string();
        assert!(
            text.contains("asked every process of the fleet to wait"),
            "{text}"
        );
        assert!(!text.contains("failed fetches"), "{text}");
        assert!(std::error::Error::source(&held).is_none(), "{held:?}");
    }
    assert_eq!(a.stats().fetch_failures, 0);
    assert!(idp.log().is_empty());
    tokio::time::sleep(wait + Duration::from_millis(100)).await;
    let after = a.credential().await;
    assert!(after.is_ok(), "{after:?}");
    assert_eq!(idp.log().len(), 1);
}

/// A `MemoryStore` whose `held_until` answers after `delay` (a store across a network).
#[derive(Clone)]
struct SlowHold(MemoryStore, Duration);

impl CredentialStore for SlowHold {
    async fn load(&self) -> Result<Option<Credential>, BoxError> {
        self.0.load().await
    }
    async fn lease(&self, ttl: Duration) -> Result<Option<Lease>, BoxError> {
        self.0.lease(ttl).await
    }
    async fn save(&self, lease: &Lease, credential: &Credential) -> Result<bool, BoxError> {
        self.0.save(lease, credential).await
    }
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, BoxError> {
        self.0.renew(lease, ttl).await
    }
    async fn release(&self, lease: &Lease) -> Result<(), BoxError> {
        self.0.release(lease).await
    }
    async fn remove(&self, rejected: &Credential) -> Result<(), BoxError> {
        self.0.remove(rejected).await
    }
    async fn hold(&self, until: SystemTime) -> Result<(), BoxError> {
        self.0.hold(until).await
    }
    async fn held_until(&self) -> Result<Option<SystemTime>, BoxError> {
        tokio::time::sleep(self.1).await;
        self.0.held_until().await
    }
}

/// World: the store holds the fleet for 2 s; a process's first refresh reads that hold
/// from a store that answers in 200 ms, and meanwhile the application hands the process
/// a credential (`CacheHandle::replace`). Proves: the held flight, superseded by the
/// hand-over, asks no source and counts no fetch failure (README, Metrics: `held` is "no
/// failure"; review 109 saw one counted), and the handed credential is served.
#[tokio::test]
async fn a_held_flight_superseded_by_a_hand_over_counts_no_failure() {
    let idp = Idp::default();
    let store = MemoryStore::new();
    store
        .hold(SystemTime::now() + Duration::from_secs(2))
        .await
        .unwrap();
    let a = CredentialCache::builder(idp.source())
        .store(SlowHold(store, Duration::from_millis(200)))
        .window_jitter(0.0)
        .build()
        .unwrap();
    let waiter = {
        let a = a.clone();
        tokio::spawn(async move { a.credential().await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let handed = Credential::bearer("handed-over")
        .unwrap()
        .expires_in(Duration::from_secs(3600));
    a.handle().replace(handed.clone()).unwrap();
    let _ = waiter.await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(idp.log().is_empty(), "{:?}", idp.brief());
    assert_eq!(a.credential().await.unwrap(), handed);
    assert_eq!(a.stats().fetch_failures, 0, "{:?}", a.stats());
}

/// The header value a credential is sent with.
trait Bearer {
    fn bearer(&self) -> &str;
}

impl Bearer for Credential {
    fn bearer(&self) -> &str {
        let (_, value) = self.headers().next().expect("a header");
        value.to_str().expect("visible ASCII")
    }
}

/// World: two processes on one store and one wall clock share `at-1`/`rt-1` (an hour's
/// life, a soft window of 5 minutes); both enter the soft window; A's background
/// refresh is answered `503`, `Retry-After: 60`; then a request of B's starts B's.
/// Proves: B's background refresh, taking the lease A gave up, reads the hold and sends
/// nothing inside it, while both keep serving `at-1`; when the hold is over, B's next
/// request in the soft window refreshes (its claim given back for the hold's end): one
/// request for the fleet (a login: the 503 left `rt-1`'s fate unknown, so it was
/// dropped), and A takes what B saved.
#[tokio::test(start_paused = true)]
async fn a_background_refresh_before_expiry_waits_for_the_fleets_hold() {
    let idp = Idp::default();
    let (clock, [a, b]) = sharing_a_login(&idp).await;
    assert_eq!(idp.log().len(), 1, "{:?}", idp.brief());

    pass(&clock, Duration::from_secs(3310)).await;
    idp.push(Scripted::now(503, Some("60"), "upstream busy"));
    assert_eq!(a.credential().await.unwrap().bearer(), "Bearer at-1");
    settle().await;
    assert_eq!(
        idp.brief(),
        [
            ("client_credentials".into(), None, 200),
            ("refresh_token".into(), Some("rt-1".into()), 503)
        ]
    );

    pass(&clock, Duration::from_secs(1)).await;
    assert_eq!(b.credential().await.unwrap().bearer(), "Bearer at-1");
    settle().await;
    pass(&clock, Duration::from_secs(1)).await;
    assert_eq!(
        idp.log().len(),
        2,
        "B refreshed inside A's hold: {:?}",
        idp.brief()
    );
    assert_eq!(b.stats().fetch_failures, 0, "{:?}", b.stats());

    pass(&clock, Duration::from_secs(60)).await;
    assert_eq!(b.credential().await.unwrap().bearer(), "Bearer at-1");
    settle().await;
    pass(&clock, Duration::from_secs(1)).await;
    assert_eq!(idp.brief()[2..], [("client_credentials".into(), None, 200)]);
    assert_eq!(b.credential().await.unwrap().bearer(), "Bearer at-3");
    // A, still in its soft window, takes the store's newer credential in the
    // background refresh its next request starts.
    a.credential().await.unwrap();
    pass(&clock, Duration::from_secs(1)).await;
    assert_eq!(a.credential().await.unwrap().bearer(), "Bearer at-3");
    assert_eq!(idp.log().len(), 3, "{:?}", idp.brief());
}

/// World: two processes with step-up on share `at-1` through one store; the API answers
/// `/scoped` with `insufficient_scope` (scope `w`) to `at-1`; A's step-up is answered
/// `429`, `Retry-After: 30`; then B's request to `/scoped` asks for its own. Proves: B's
/// step-up, which takes the lease as every fetch with a store does, reads the hold and
/// sends nothing inside it (README: "a `Retry-After` its token request is answered with
/// holds every token request"); after the hold, B's step-up is one login for `read w`,
/// and its request is replayed and answered 200.
#[tokio::test(start_paused = true)]
async fn a_step_up_waits_for_the_fleets_hold() {
    use http::Request;
    use http_body_util::Full;
    use tower::{Layer, ServiceExt};
    use tower_client_auth::ReplayBody;

    let idp = Idp::default();
    let clock = ManualClock::new(SystemTime::now());
    let store = MemoryStore::new();
    let api = tower::service_fn(|req: Request<ReplayBody<Full<bytes::Bytes>>>| async move {
        let lacking =
            req.uri().path() == "/scoped" && req.headers()["authorization"] == "Bearer at-1";
        let mut res = http::Response::builder().status(if lacking { 403 } else { 200 });
        if lacking {
            res = res.header(
                "www-authenticate",
                r#"Bearer error="insufficient_scope", scope="w""#,
            );
        }
        Ok::<_, BoxError>(res.body(Full::<bytes::Bytes>::default()).unwrap())
    });
    let [a, b] = on_clock(&idp, &clock, [store.clone(), store]).map(|cache| {
        tower_client_auth::AuthLayer::with_cache(cache)
            .any_https_origin()
            .step_up(true)
            .layer(api)
    });
    let status = |svc: &_, path: &str| {
        let svc: &tower_client_auth::AddCredential<_, _> = svc;
        svc.clone().oneshot(crate::support::get(path))
    };
    assert_eq!(status(&a, "/").await.unwrap().status(), 200);
    assert_eq!(status(&b, "/").await.unwrap().status(), 200);
    assert_eq!(idp.log().len(), 1, "{:?}", idp.brief());

    idp.push(Scripted::now(429, Some("30"), r#"{"error":"slow_down"}"#));
    let _ = status(&a, "/scoped").await;
    assert_eq!(
        idp.scoped()[1..],
        [(
            "client_credentials".into(),
            Some("read w".into()),
            None,
            429
        )]
    );

    pass(&clock, Duration::from_secs(1)).await;
    let held = status(&b, "/scoped").await;
    assert_eq!(
        idp.log().len(),
        2,
        "B stepped up inside A's hold: {:?}",
        idp.scoped()
    );
    if let Ok(res) = held {
        assert_eq!(res.status(), 403, "answered without a wider token");
    }

    pass(&clock, Duration::from_secs(30)).await;
    assert_eq!(status(&b, "/scoped").await.unwrap().status(), 200);
    assert_eq!(
        idp.scoped()[2..],
        [(
            "client_credentials".into(),
            Some("read w".into()),
            None,
            200
        )]
    );
}

/// One process of a fleet on a real Redis, its cache's wall clock `clock` (its host's,
/// which may not agree with the other hosts').
#[cfg(feature = "redis")]
async fn on_redis(
    idp: &Idp,
    clock: &ManualClock,
    server: &crate::support::redis::RedisServer,
) -> CredentialCache<TokenSource> {
    use tower_client_auth::store::redis::RedisStore;
    let store = RedisStore::connect(&server.url(), "skewed-hold")
        .await
        .unwrap();
    CredentialCache::builder(idp.source())
        .store(store)
        .clock(clock.clone())
        .window_jitter(0.0)
        .backoff(Duration::from_millis(100), Duration::from_millis(200))
        .build()
        .unwrap()
}

/// Two processes on one real Redis, A on the host's clock and B on `b_clock`; A's login
/// is answered `429`, `Retry-After: 30`, then a second passes on both clocks. B, and the
/// token endpoint's script and log (and the server, which must outlive B's call).
#[cfg(feature = "redis")]
async fn a_30_s_hold_a_second_old(
    b_clock: ManualClock,
) -> (
    crate::support::redis::RedisServer,
    Idp,
    CredentialCache<tower_client_auth::token::TokenSource>,
) {
    let server = crate::support::redis::RedisServer::start();
    let idp = Idp::default();
    let a_clock = ManualClock::new(SystemTime::now());
    let a = on_redis(&idp, &a_clock, &server).await;
    let b = on_redis(&idp, &b_clock, &server).await;
    idp.push(Scripted::now(
        429,
        Some("30"),
        r#"{"error":"rate_limited"}"#,
    ));
    a.credential().await.expect_err("throttled");
    a_clock.advance(Duration::from_secs(1));
    b_clock.advance(Duration::from_secs(1));
    (server, idp, b)
}

/// World: two processes on one real Redis, on two hosts whose wall clocks disagree: B's
/// runs a minute ahead of A's (NTP broken on one pod). A's login is answered `429`,
/// `Retry-After: 30`; B asks at once, a second later by every clock.
/// Proves (README, "A `Retry-After` holds the fleet": "Inside the hold a process sends
/// no token request"): B sends nothing inside A's 30 s hold. Counter: the token
/// endpoint's log (review 121 found B asking: the hold was an absolute time on the
/// writer's clock, which B's clock had passed already; it is now counted on Redis's
/// clock, as the lease's TTL is).
#[cfg(feature = "redis")]
#[tokio::test]
async fn a_hold_holds_a_process_whose_clock_runs_ahead_of_the_writers() {
    let (_server, idp, b) = a_30_s_hold_a_second_old(ManualClock::new(
        SystemTime::now() + Duration::from_secs(60),
    ))
    .await;
    let held = b.credential().await;
    assert_eq!(
        idp.log().len(),
        1,
        "B asked 1 s into A's 30 s hold: {:?} ({held:?})",
        idp.brief()
    );
    assert_eq!(held.unwrap_err().kind(), ErrorKind::Backoff);
}

/// World: as above, but B's wall clock runs a minute behind A's. A's login is answered
/// `429`, `Retry-After: 30`; B asks a second later.
/// Proves (README: a `Retry-After` "is the earliest next token request", and B "fails
/// its callers with `ErrorKind::Backoff` and how long is left"): B is held no longer
/// than the 29 s the token endpoint has left of its 30 s. Counter: B's `retry_in`
/// (review 121 found B told ~89 s: the writer's absolute time read on a clock a minute
/// behind; up to `MAX_RETRY_AFTER` with a bigger skew).
#[cfg(feature = "redis")]
#[tokio::test]
async fn a_hold_holds_a_process_whose_clock_runs_behind_no_longer_than_asked() {
    let (_server, idp, b) = a_30_s_hold_a_second_old(ManualClock::new(
        SystemTime::now() - Duration::from_secs(60),
    ))
    .await;
    let held = b.credential().await.expect_err("inside A's hold");
    assert_eq!(held.kind(), ErrorKind::Backoff, "{held}");
    let left = held.retry_in().expect("how long is left");
    assert!(
        left <= Duration::from_secs(30),
        "B is held {left:?} by a 30 s Retry-After"
    );
    assert_eq!(idp.log().len(), 1, "{:?}", idp.brief());
}
