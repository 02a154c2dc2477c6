//! What every `CredentialStore` keeps, checked the same way on each (`MemoryStore` and
//! Redis in `fleet.rs`, the file store in `file_store.rs`): the store contract, and one
//! fetch per token lifetime for caches that each hold their own handle.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
    time::{Duration, Instant},
};

use tower_client_auth::{
    BoxError, Credential, CredentialCache, CredentialSource, CredentialStore, FetchContext,
};

/// A token endpoint shared by the whole fleet: counts fetches and how many ran at once.
#[derive(Clone, Default)]
pub struct Endpoint {
    pub fetches: Arc<AtomicUsize>,
    pub in_flight: Arc<AtomicUsize>,
    pub max_in_flight: Arc<AtomicUsize>,
    pub lifetime: Option<Duration>,
    /// How long an exchange takes (30 ms unless set).
    pub delay: Option<Duration>,
}

impl Endpoint {
    pub fn new(lifetime: Option<Duration>) -> Self {
        Endpoint {
            lifetime,
            ..Endpoint::default()
        }
    }

    pub fn slow(delay: Duration) -> Self {
        Endpoint {
            delay: Some(delay),
            ..Endpoint::default()
        }
    }

    pub fn fetches(&self) -> usize {
        self.fetches.load(SeqCst)
    }
}

impl CredentialSource for Endpoint {
    async fn fetch(&self, cx: FetchContext) -> Result<Credential, BoxError> {
        let now = self.in_flight.fetch_add(1, SeqCst) + 1;
        self.max_in_flight.fetch_max(now, SeqCst);
        let n = self.fetches.fetch_add(1, SeqCst) + 1;
        // A token exchange takes a while: room for the others to race.
        tokio::time::sleep(self.delay.unwrap_or(Duration::from_millis(30))).await;
        self.in_flight.fetch_sub(1, SeqCst);
        let credential = Credential::bearer(format!("fleet-{n}"))?;
        Ok(match self.lifetime {
            Some(lifetime) => credential.lives(cx.now(), lifetime),
            None => credential,
        })
    }
}

/// The contract every store keeps, checked on `store` (and `other`, a second handle on
/// the same data, as another process has): one lease at a time, given back only by its
/// holder, renewed only by it; a save fenced by the lease; a removal that spares a newer
/// value; the token endpoint's hold, seen through the other handle, the latest one kept;
/// and, for a store that tells waiters of changes (`notifies`), a change seen by whoever
/// waits for one.
pub async fn the_contract_holds_with<S: CredentialStore + Clone>(
    store: S,
    other: S,
    notifies: bool,
) {
    let bearer = |t: &str| Credential::bearer(t).unwrap();
    assert_eq!(store.load().await.unwrap(), None);

    // The hold: none at first; the latest replaces it (an earlier time too: the wall
    // clock may have been stepped back), one already past is kept for the readers to
    // judge, and the other handle reads the same (to the millisecond).
    let millis = |at: Option<std::time::SystemTime>| {
        at.map(|at| {
            at.duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
        })
    };
    assert_eq!(other.held_until().await.unwrap(), None);
    let now = std::time::SystemTime::now();
    for (by, at) in [
        (&store, now + Duration::from_secs(10)),
        (&other, now + Duration::from_secs(5)),
        (&store, now - Duration::from_secs(3600)),
        (&other, now + Duration::from_secs(20)),
    ] {
        by.hold(at).await.unwrap();
        assert_eq!(millis(store.held_until().await.unwrap()), millis(Some(at)));
        assert_eq!(millis(other.held_until().await.unwrap()), millis(Some(at)));
    }
    let first = store.lease(Duration::from_secs(5)).await.unwrap().unwrap();
    assert!(store.lease(Duration::from_secs(5)).await.unwrap().is_none());
    // Only the holder gives a lease back.
    let stranger = tower_client_auth::store::Lease::new();
    store.release(&stranger).await.unwrap();
    assert!(store.lease(Duration::from_secs(5)).await.unwrap().is_none());
    assert!(store.save(&first, &bearer("one")).await.unwrap());
    assert_eq!(store.load().await.unwrap(), Some(bearer("one")));
    store.release(&first).await.unwrap();

    // A holder whose lease ran out and was taken over cannot save.
    let late = store
        .lease(Duration::from_millis(100))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let next = store.lease(Duration::from_secs(5)).await.unwrap().unwrap();
    assert!(store.save(&next, &bearer("two")).await.unwrap());
    assert!(!store.save(&late, &bearer("stale")).await.unwrap());
    assert_eq!(store.load().await.unwrap(), Some(bearer("two")));
    store.release(&late).await.unwrap();
    assert!(store.lease(Duration::from_secs(5)).await.unwrap().is_none());
    store.release(&next).await.unwrap();

    // Compare-and-delete: a removal of an older credential spares the newer one.
    store.remove(&bearer("one")).await.unwrap();
    assert_eq!(store.load().await.unwrap(), Some(bearer("two")));
    store.remove(&bearer("two")).await.unwrap();
    assert_eq!(store.load().await.unwrap(), None);

    // Only the holder renews, and a renewed lease outlives its first term.
    let held = store
        .lease(Duration::from_millis(300))
        .await
        .unwrap()
        .unwrap();
    assert!(
        !store
            .renew(&stranger, Duration::from_secs(5))
            .await
            .unwrap()
    );
    assert!(store.renew(&held, Duration::from_secs(5)).await.unwrap());
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert!(store.lease(Duration::from_secs(5)).await.unwrap().is_none());
    assert!(store.save(&held, &bearer("three")).await.unwrap());
    store.release(&held).await.unwrap();
    let lapsed = store
        .lease(Duration::from_millis(100))
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(
        !store.renew(&lapsed, Duration::from_secs(5)).await.unwrap(),
        "renewed a lease that ran out"
    );

    // A save through one handle wakes a waiter on the other long before its timeout.
    for change in 0..2 {
        if !notifies {
            break;
        }
        let waiter = tokio::spawn({
            let other = other.clone();
            async move { other.changed(Duration::from_secs(60)).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let lease = store.lease(Duration::from_secs(5)).await.unwrap().unwrap();
        if change == 0 {
            assert!(store.save(&lease, &bearer("four")).await.unwrap());
        }
        store.release(&lease).await.unwrap();
        tokio::time::timeout(Duration::from_secs(20), waiter)
            .await
            .expect("a waiter was not told of a change")
            .unwrap();
    }
}

/// A cache per store, `callers` callers each, for `run`, on tokens living 1 s: the
/// endpoint is asked about once per lifetime, never twice at once, every call succeeds.
pub async fn one_fetch_per_lifetime(
    stores: Vec<impl CredentialStore>,
    callers: usize,
    run: Duration,
) {
    let endpoint = Endpoint::new(Some(Duration::from_secs(1)));
    let caches: Vec<_> = stores
        .into_iter()
        .map(|store| {
            CredentialCache::builder(endpoint.clone())
                .store(store)
                .window_jitter(0.0)
                .build()
                .unwrap()
        })
        .collect();
    let started = Instant::now();
    let failures = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for cache in &caches {
        for _ in 0..callers {
            let (cache, failures) = (cache.clone(), failures.clone());
            tasks.push(tokio::spawn(async move {
                while started.elapsed() < run {
                    if cache.credential().await.is_err() {
                        failures.fetch_add(1, SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    let lifetimes = run.as_secs_f64() / 0.75; // refreshed in the last quarter of each
    let fetches = endpoint.fetches();
    assert_eq!(failures.load(SeqCst), 0);
    assert_eq!(
        endpoint.max_in_flight.load(SeqCst),
        1,
        "two fetches at once"
    );
    assert!(
        fetches as f64 <= lifetimes + 2.0,
        "{fetches} fetches for about {lifetimes:.0} lifetimes: not shared by the fleet"
    );
    assert!(fetches >= 2, "{fetches}: the tokens never expired");
}

/// Three processes of one client (a cache each, over its own handle on one store and a
/// token source of its own) want a token at once from an endpoint that answers the first
/// token request, after 300 ms, `429` with `Retry-After: 2`. Proves the README's "a
/// token endpoint's `Retry-After` is the earliest next token request" for the fleet: the
/// endpoint sees that one request and no other until the 2 s are up (the processes that
/// waited for the first one's lease, and one that asks later, fail with `Backoff`
/// instead); after them one login serves all three.
#[cfg(feature = "token")]
pub async fn a_retry_after_holds_every_process(stores: Vec<impl CredentialStore>) {
    use super::scripted::{Idp, Scripted};
    use tower_client_auth::ErrorKind;

    let idp = Idp::default();
    idp.push(Scripted::after(
        Duration::from_millis(300),
        429,
        Some("2"),
        r#"{"error":"rate_limited"}"#,
    ));
    let caches: Vec<_> = stores
        .into_iter()
        .map(|store| {
            CredentialCache::builder(idp.source())
                .store(store)
                .build()
                .unwrap()
        })
        .collect();
    let calls: Vec<_> = caches
        .iter()
        .map(|cache| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.credential().await })
        })
        .collect();
    for call in calls {
        assert!(call.await.unwrap().is_err(), "a token inside the hold");
    }
    let log = idp.log();
    assert_eq!(
        log.len(),
        1,
        "token requests inside the hold: {:?}",
        idp.brief()
    );
    let answered = log[0].1.expect("the first request was answered");
    // A process that asks later, inside the hold, is held too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let late = caches[1]
        .credential()
        .await
        .expect_err("a token inside the hold");
    assert_eq!(late.kind(), ErrorKind::Backoff, "{late}");
    assert_eq!(idp.log().len(), 1, "{:?}", idp.brief());

    tokio::time::sleep_until(answered + Duration::from_millis(2100)).await;
    let mut tokens = Vec::new();
    for cache in &caches {
        tokens.push(cache.credential().await.expect("a token after the hold"));
    }
    let log = idp.log();
    assert_eq!(log.len(), 2, "{:?}", idp.brief());
    assert!(
        log[1].0 >= answered + Duration::from_secs(2),
        "the second token request came {:?} after the 429",
        log[1].0 - answered
    );
    assert!(
        tokens.iter().all(|t| t == &tokens[0]),
        "one login serves the fleet"
    );
}
