//! The promise "a source is never asked twice at once", attacked from every entry point
//! that can start a fetch: expiry, rejection (the cache's own `reject` and a 401 through
//! the layer), invalidation (plain and generation-checked), replacement, and a store.
//! A source that counts its concurrent fetches and the refresh tokens presented to it
//! sees any break.

use crate::support;

use std::{
    collections::HashSet,
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::{Request, Response, StatusCode};
use support::{TestSource, store::FaultStore};
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, BoxError, Credential, CredentialCache, CredentialSource, CredentialStore, ErrorKind,
    FetchContext, FetchReason, MemoryStore, RefreshMode,
};

/// A rotating-refresh-token source, as style C's servers are: each fetch presents the
/// refresh token the last fetch received and gets a new one. It records how many fetches
/// ran at once and every refresh token presented twice.
#[derive(Clone, Default)]
struct Rotating {
    inner: Arc<RotatingState>,
}

#[derive(Default)]
struct RotatingState {
    fetches: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    refresh_token: Mutex<u64>,
    presented: Mutex<HashSet<u64>>,
    presented_twice: AtomicUsize,
}

impl CredentialSource for Rotating {
    async fn fetch(&self, _cx: FetchContext) -> Result<Credential, BoxError> {
        let s = &self.inner;
        let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        s.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let n = s.fetches.fetch_add(1, Ordering::SeqCst) + 1;
        let presented = *s.refresh_token.lock().unwrap();
        if !s.presented.lock().unwrap().insert(presented) {
            s.presented_twice.fetch_add(1, Ordering::SeqCst);
        }
        // The exchange takes a while, as a real one does: room for the others to race.
        tokio::time::sleep(Duration::from_millis(fastrand_ms(1, 6))).await;
        *s.refresh_token.lock().unwrap() = presented + 1;
        s.in_flight.fetch_sub(1, Ordering::SeqCst);
        Ok(Credential::bearer(format!("access-{n}"))?.expires_in(Duration::from_millis(120)))
    }
}

fn fastrand_ms(low: u64, high: u64) -> u64 {
    use std::hash::{BuildHasher, RandomState};
    low + RandomState::new().hash_one(std::time::Instant::now()) % (high - low)
}

/// World: one cache with a store, behind a layer whose API rejects one answer in five,
/// used for a second and a half by request loops (through the replaying layer and the
/// layer without replay), `reject` loops, plain and
/// generation-checked invalidation loops and a replacement loop, all at once on two
/// threads, with credentials that live 120 ms (so expiry refreshes run all along).
/// Proves: the source never ran two fetches at once, no refresh token was presented
/// twice, and every path was exercised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_entry_point_runs_two_fetches_at_once() {
    let source = Rotating::default();
    let cache = CredentialCache::builder(source.clone())
        .store(MemoryStore::new())
        .backoff(Duration::from_millis(1), Duration::from_millis(5))
        .build()
        .unwrap();
    let layer = AuthLayer::with_cache(cache.clone()).any_https_origin();
    let svc = layer.layer(tower::service_fn(api));
    // The layer without replay readies its credential in `poll_ready`: another way in.
    let direct = layer.without_replay().layer(tower::service_fn(api));
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new([
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    ]);
    let mut tasks = Vec::new();
    for who in 0..8usize {
        let (cache, svc, direct, stop, counts) = (
            cache.clone(),
            svc.clone(),
            direct.clone(),
            stop.clone(),
            counts.clone(),
        );
        let handle = cache.handle();
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match who {
                    // Requests through the Tower layer: expiry and 401 rejections.
                    0..=1 => {
                        send(svc.clone()).await;
                    }
                    // The same without replay: the wait happens in `poll_ready`.
                    2 => {
                        let req = Request::get("https://api.example.com/")
                            .body(String::new())
                            .unwrap();
                        if direct.clone().oneshot(req).await.is_ok() {
                            counts[4].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    // The cache's own rejection path.
                    3 => {
                        if let Ok(c) = cache.credential().await {
                            let _ = cache.reject(&c).await;
                        }
                    }
                    // A generation-checked invalidation of what was just used.
                    4 => {
                        if let Ok(c) = cache.credential().await {
                            if handle.invalidate_if(&c) {
                                counts[0].fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    // Plain invalidation, as a gRPC UNAUTHENTICATED burst would send.
                    5 => {
                        handle.invalidate();
                        counts[1].fetch_add(1, Ordering::Relaxed);
                    }
                    // A credential handed over from outside.
                    6 => {
                        let c = Credential::bearer("pushed")
                            .unwrap()
                            .expires_in(Duration::from_millis(100));
                        handle.replace(c).unwrap();
                        counts[2].fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        if cache.credential().await.is_ok() {
                            counts[3].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(fastrand_ms(0, 4))).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let s = &source.inner;
    let stats = cache.stats();
    assert!(
        s.fetches.load(Ordering::SeqCst) > 20,
        "too few fetches to prove anything: {stats:?}"
    );
    assert!(stats.rejections > 0 && stats.replays > 0, "{stats:?}");
    for (what, count) in [
        "invalidate_if",
        "invalidate",
        "replace",
        "credential",
        "without replay",
    ]
    .iter()
    .zip(counts.iter())
    {
        assert!(
            count.load(Ordering::Relaxed) > 0,
            "{what} never took effect"
        );
    }
    assert_eq!(
        s.max_in_flight.load(Ordering::SeqCst),
        1,
        "two fetches ran at once"
    );
    assert_eq!(s.presented_twice.load(Ordering::SeqCst), 0);
}

/// The API: reads the body, as a real client does; one answer in five is a 401.
async fn api<B: http_body::Body>(req: Request<B>) -> Result<Response<()>, Infallible> {
    let _ = http_body_util::BodyExt::collect(req.into_body()).await;
    let status = if fastrand_ms(0, 5) == 0 {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::OK
    };
    Ok(Response::builder().status(status).body(()).unwrap())
}

/// One request through the layer; its outcome does not matter here, only the fetches.
fn send<S>(svc: S) -> impl std::future::Future<Output = ()> + Send
where
    S: tower::Service<Request<String>> + Send,
    S::Future: Send,
{
    let req = Request::get("https://api.example.com/")
        .body(String::new())
        .unwrap();
    async move {
        let _ = svc.oneshot(req).await;
    }
}

/// A caller asking `cache` for a credential, as a task of its own.
fn ask<P: CredentialSource>(
    cache: &CredentialCache<P>,
) -> tokio::task::JoinHandle<Result<Credential, tower_client_auth::Error>> {
    let cache = cache.clone();
    tokio::spawn(async move { cache.credential().await })
}

/// Lets the runtime run everything that is ready.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// World: fifty explicit invalidations, each followed by a request, while one slow fetch
/// is in flight. Proves: no second fetch starts while the first runs; exactly one fetch
/// is chained after it, told `Invalidated`; the first fetch's result goes to its own
/// waiter only, and every later request gets the chained fetch's credential.
#[tokio::test(start_paused = true)]
async fn invalidations_during_a_fetch_chain_exactly_one_fetch_after_it() {
    let source = TestSource::gated(None);
    let cache = CredentialCache::new(source.clone());
    let first = ask(&cache);
    settle().await;
    assert_eq!(source.fetches(), 1);
    let mut later = Vec::new();
    for _ in 0..50 {
        assert!(cache.handle().invalidate());
        later.push(ask(&cache));
        settle().await;
    }
    assert_eq!(source.fetches(), 1, "a fetch started while another ran");
    source.release(1);
    assert_eq!(
        first.await.unwrap().unwrap(),
        Credential::bearer("token-1").unwrap()
    );
    settle().await;
    assert_eq!(source.fetches(), 2, "no fetch was chained after the first");
    assert_eq!(source.log()[1].1, FetchReason::Invalidated);
    source.release(1);
    for task in later {
        assert_eq!(
            task.await.unwrap().unwrap(),
            Credential::bearer("token-2").unwrap()
        );
    }
    assert_eq!(
        cache.credential().await.unwrap(),
        Credential::bearer("token-2").unwrap()
    );
    assert_eq!(source.fetches(), 2);
}

/// World: a cache over a store; the application invalidates while a fetch runs (the
/// first one, or a background refresh with a credential in place), and the next request
/// comes only after that fetch has ended. Proves: the fetch's result, made suspect by the
/// invalidation, goes to its own waiter only, and not back into the cache through the
/// store it was saved in: the next request's fetch goes to the source, told
/// `Invalidated`, and gets a new credential.
#[tokio::test(start_paused = true)]
async fn an_invalidated_fetchs_result_is_not_taken_back_from_the_store() {
    for background in [false, true] {
        let source = TestSource::gated(Some(Duration::from_secs(40)));
        let cache = CredentialCache::builder(source.clone())
            .store(MemoryStore::new())
            .window_jitter(0.0)
            .build()
            .unwrap();
        let mut n = 1;
        if background {
            let warm = ask(&cache);
            settle().await;
            source.release(1);
            warm.await.unwrap().unwrap();
            // Into the soft window (the last quarter): the next request starts the
            // background refresh, and gets `token-1` meanwhile.
            tokio::time::advance(Duration::from_secs(31)).await;
            n = 2;
        }
        let first = ask(&cache);
        settle().await;
        assert_eq!(source.fetches(), n, "background: {background}");
        assert!(cache.handle().invalidate());
        source.release(1);
        let mine = first.await.unwrap().unwrap();
        settle().await;
        let next = ask(&cache);
        settle().await;
        assert_eq!(
            source.fetches(),
            n + 1,
            "background: {background}: the store handed back the invalidated fetch's credential"
        );
        assert_eq!(source.log()[n].1, FetchReason::Invalidated);
        source.release(1);
        let next = next.await.unwrap().unwrap();
        assert_eq!(
            next,
            Credential::bearer(format!("token-{}", n + 1)).unwrap()
        );
        assert_ne!(next, mine);
    }
}

/// World: a cache over a store; the application invalidates while the first fetch runs
/// (no credential in place, so the invalidation drops none of its own), and a request
/// comes while that fetch still runs, so its fetch is chained after it. Proves (review
/// finding): the chained fetch is told, as it begins, what the tainted fetch brought
/// (`FetchContext::previous`), which a source holding a last credential must not hand
/// back, and goes to the source rather than the store.
#[tokio::test(start_paused = true)]
async fn a_fetch_chained_after_a_tainted_one_is_told_what_it_brought() {
    // Once, and with a second invalidation after the request (review finding: it set
    // the marker again, and the tainted result went there, not to the chained fetch);
    // and with a credential in place, in its soft window, whose background refresh the
    // invalidation taints (review finding: the chained fetch was told the credential
    // the invalidation dropped, not the newer one the tainted fetch brought).
    for invalidations in [1, 2] {
        told_what_the_tainted_fetch_brought(invalidations, false).await;
    }
    told_what_the_tainted_fetch_brought(1, true).await;
}

async fn told_what_the_tainted_fetch_brought(invalidations: usize, in_place: bool) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let source = tower_client_auth::source_fn({
        let (log, gate) = (log.clone(), gate.clone());
        move |cx: FetchContext| {
            let n = {
                let mut log = log.lock().unwrap();
                log.push((cx.reason(), cx.previous().cloned()));
                log.len()
            };
            let gate = gate.clone();
            async move {
                gate.acquire().await.unwrap().forget();
                Ok::<_, BoxError>(
                    Credential::bearer(format!("token-{n}"))?.expires_in(Duration::from_secs(40)),
                )
            }
        }
    });
    let cache = CredentialCache::builder(source)
        .store(MemoryStore::new())
        .window_jitter(0.0)
        .build()
        .unwrap();
    let mut logged = vec![(FetchReason::Initial, None)];
    if in_place {
        gate.add_permits(1);
        let warm = cache.credential().await.unwrap();
        // Into the soft window (the last quarter): the next request starts the
        // background refresh, and gets the credential in place meanwhile.
        tokio::time::advance(Duration::from_secs(31)).await;
        logged.push((FetchReason::Expiring, Some(warm)));
    }
    let n = logged.len();
    let first = ask(&cache);
    settle().await;
    assert_eq!(log.lock().unwrap().len(), n);
    assert!(cache.handle().invalidate());
    let next = ask(&cache);
    settle().await;
    for _ in 1..invalidations {
        assert!(cache.handle().invalidate());
    }
    gate.add_permits(2);
    if !in_place {
        let tainted = first.await.unwrap().unwrap();
        assert_eq!(tainted, Credential::bearer("token-1").unwrap());
    }
    assert_eq!(
        next.await.unwrap().unwrap(),
        Credential::bearer(format!("token-{}", n + 1)).unwrap()
    );
    let tainted = Credential::bearer(format!("token-{n}")).unwrap();
    logged.push((FetchReason::Invalidated, Some(tainted)));
    assert_eq!(
        *log.lock().unwrap(),
        logged,
        "invalidations: {invalidations}, a credential in place: {in_place}"
    );
}

/// World: a cache over a store, its source holding the last credential it issued and
/// handing it back unless told it was dropped (`FetchContext::previous`, as its docs
/// show). Its credential `A` is in its soft window; another process saved `X` in the
/// store. The background refresh, held in the store's load, will take `X`; meanwhile
/// the application invalidates `A`, and a request chains a fetch after the refresh.
/// Proves (review finding): the chained fetch is told `A`, the credential its source
/// holds, not `X` (the tainted refresh's result, which came from the store): it gets a
/// new credential, not `A` handed back.
#[tokio::test(start_paused = true)]
async fn a_fetch_chained_after_a_tainted_store_hit_is_told_what_was_dropped() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let source = tower_client_auth::source_fn({
        let log = log.clone();
        let last: Arc<Mutex<Option<Credential>>> = Arc::default();
        move |cx: FetchContext| {
            log.lock()
                .unwrap()
                .push((cx.reason(), cx.previous().cloned()));
            let mut last = last.lock().unwrap();
            let credential = match last.as_ref() {
                Some(held) if cx.previous() != Some(held) => held.clone(),
                _ => {
                    let n = log.lock().unwrap().len();
                    let fresh = Credential::bearer(format!("token-{n}"))
                        .unwrap()
                        .expires_in(Duration::from_secs(40));
                    *last = Some(fresh.clone());
                    fresh
                }
            };
            async move { Ok::<_, BoxError>(credential) }
        }
    });
    let store = FaultStore::new();
    let cache = CredentialCache::builder(source)
        .store(store.clone())
        .window_jitter(0.0)
        .build()
        .unwrap();
    let a = cache.credential().await.unwrap();
    assert_eq!(a, Credential::bearer("token-1").unwrap());
    // Another process's credential, saved under its own lease.
    let x = Credential::bearer("x")
        .unwrap()
        .expires_in(Duration::from_secs(3600));
    let lease = store.lease(Duration::from_secs(3)).await.unwrap().unwrap();
    assert!(store.save(&lease, &x).await.unwrap());
    store.release(&lease).await.unwrap();
    // Into the soft window: the next request starts the background refresh (held).
    tokio::time::advance(Duration::from_secs(31)).await;
    settle().await;
    store.faults().loads.close();
    assert_eq!(cache.credential().await.unwrap(), a);
    settle().await;
    assert!(cache.handle().invalidate());
    let next = ask(&cache);
    settle().await;
    store.faults().loads.open();
    let next = next.await.unwrap().unwrap();
    assert_ne!(next, a, "the dropped credential came back from its source");
    assert_ne!(
        next, x,
        "the tainted refresh's credential came back from the store"
    );
    assert_eq!(log.lock().unwrap().last().unwrap().1, Some(a));
}

/// World: a cache over a store that holds `token-1`, a fetch's result handed only to its
/// own waiter (overtaken by a stale replacement). The next refresh misses it at its first
/// look (a lagging replica), takes the lease, finds it then, and is giving the lease back
/// (held) when the application drops `token-1` by name. Proves (found by
/// tests/interleavings.rs: `reject` answered with the credential it was given): the
/// refresh does not install the credential dropped while it loaded: it looks again, and
/// the source's new credential is the answer.
#[tokio::test(start_paused = true)]
async fn a_store_hit_dropped_while_its_lease_is_given_back_is_not_installed() {
    let store = FaultStore::new();
    let (source, cache, own) = overtaken_by_a_stale_replacement(store.clone()).await;
    store.faults().misses.store(1, Ordering::SeqCst);
    store.faults().releases.close();
    let next = ask(&cache);
    settle().await;
    assert_eq!(
        source.fetches(),
        1,
        "the refresh found token-1 in the store"
    );
    assert!(
        !cache.handle().invalidate_if(&own),
        "token-1 is not current"
    );
    store.faults().releases.open();
    settle().await;
    source.release(1);
    let next = next.await.unwrap().unwrap();
    assert_ne!(
        next, own,
        "the credential dropped while it loaded was installed"
    );
    assert_eq!(next, Credential::bearer("token-2").unwrap());
}

/// World: a cache over a store; the application invalidates while a fetch runs, then
/// hands over a credential of its own before that fetch ends (so its waiters get the
/// handed-over one), and later drops that one too. Proves (review finding): the fetch
/// the invalidation tainted, saved in the store, is not taken back from there by the
/// fetch that follows: it goes to the source.
#[tokio::test(start_paused = true)]
async fn a_tainted_fetch_overtaken_by_a_replacement_is_not_taken_back_from_the_store() {
    let source = TestSource::gated(Some(Duration::from_secs(3600)));
    let cache = CredentialCache::builder(source.clone())
        .store(MemoryStore::new())
        .build()
        .unwrap();
    let first = ask(&cache);
    settle().await;
    assert!(cache.handle().invalidate());
    let mine = Credential::bearer("mine").unwrap();
    assert!(cache.handle().replace(mine.clone()).unwrap());
    source.release(1);
    assert_eq!(first.await.unwrap().unwrap(), mine);
    assert!(cache.handle().invalidate());
    let next = ask(&cache);
    settle().await;
    assert_eq!(
        source.fetches(),
        2,
        "the tainted fetch's token came back from the store"
    );
    source.release(1);
    let next = next.await.unwrap().unwrap();
    assert_eq!(next, Credential::bearer("token-2").unwrap());
}

/// An hour-long credential with 5 s left: in its hard window (the last 30 s).
fn stale(token: &str) -> Credential {
    let now = std::time::SystemTime::now();
    Credential::bearer(token)
        .unwrap()
        .issued_at(now - Duration::from_secs(3600))
        .expires_at(now + Duration::from_secs(5))
}

/// A source whose first credential is already in its hard window, and whose next
/// fetches wait at the gate returned with it, then fail.
fn stale_then_failing() -> (impl CredentialSource, Arc<tokio::sync::Semaphore>) {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let source = tower_client_auth::source_fn({
        let (gate, fetches) = (gate.clone(), Arc::new(AtomicUsize::new(0)));
        move |_: FetchContext| {
            let n = fetches.fetch_add(1, Ordering::SeqCst);
            let gate = gate.clone();
            async move {
                if n == 0 {
                    return Ok(stale("stale"));
                }
                gate.acquire().await.unwrap().forget();
                Err::<Credential, BoxError>("the token endpoint is down".into())
            }
        }
    });
    (source, gate)
}

/// A cache over `store` whose first fetch (held) is overtaken by a credential handed
/// over already in its hard window: the fetch's `token-1` goes to its own waiter only,
/// and into the store. The source (gated), the cache, and `token-1`.
async fn overtaken_by_a_stale_replacement<S: CredentialStore>(
    store: S,
) -> (TestSource, CredentialCache<TestSource>, Credential) {
    let source = TestSource::gated(Some(Duration::from_secs(3600)));
    let cache = CredentialCache::builder(source.clone())
        .store(store)
        .build()
        .unwrap();
    let first = ask(&cache);
    settle().await;
    assert!(cache.handle().replace(stale("handed-over")).unwrap());
    source.release(1);
    let fetched = first.await.unwrap().unwrap();
    assert_eq!(fetched, Credential::bearer("token-1").unwrap());
    (source, cache, fetched)
}

/// World: a cache over a store; the application hands over a credential already in its
/// hard window while a fetch runs, so that fetch's result goes to its own waiter only;
/// the next request refreshes the handed-over credential. Proves (review finding): the
/// fetch made suspect by a replacement, not an invalidation, is a good credential: the
/// refresh takes it from the store instead of asking the source again.
#[tokio::test(start_paused = true)]
async fn a_fetch_overtaken_by_a_stale_replacement_is_still_taken_from_the_store() {
    let (source, cache, fetched) = overtaken_by_a_stale_replacement(MemoryStore::new()).await;
    let next = ask(&cache);
    settle().await;
    assert_eq!(source.fetches(), 1, "the source was asked again");
    assert_eq!(next.await.unwrap().unwrap(), fetched);
}

/// World: as above, the fetch overtaken by a stale replacement goes to its own waiter
/// only (and into the store); then the application reports that credential rejected
/// with `reject`. Proves (review finding): `reject` answers with a new credential from
/// the source, not the rejected one taken back from the store (it is not the current
/// one, and was not known as dropped).
#[tokio::test(start_paused = true)]
async fn rejecting_a_credential_handed_only_to_its_waiter_drops_it_from_the_store_too() {
    let (source, cache, fetched) = overtaken_by_a_stale_replacement(MemoryStore::new()).await;
    let rejected = tokio::spawn({
        let (cache, fetched) = (cache.clone(), fetched.clone());
        async move { cache.reject(&fetched).await }
    });
    settle().await;
    source.release(1);
    let answer = rejected.await.unwrap().unwrap();
    assert_ne!(
        answer, fetched,
        "reject answered with the credential it was given"
    );
    assert_eq!(answer, Credential::bearer("token-2").unwrap());
    assert_eq!(source.fetches(), 2);
    assert_eq!(cache.credential().await.unwrap(), answer);
}

/// World: the credential in place is in its hard window, so a request waits for its
/// refresh, holding that credential to fall back on should the refresh fail; the
/// application drops the credential (`invalidate_if`) before the refresh fails. Proves
/// (review finding): the waiter is not handed the dropped credential as a fallback: it
/// gets the refresh's error.
#[tokio::test(start_paused = true)]
async fn a_waiter_never_falls_back_on_a_credential_dropped_while_it_waited() {
    let (source, gate) = stale_then_failing();
    let cache = CredentialCache::new(source);
    let stale = cache.credential().await.unwrap();
    let waiter = ask(&cache);
    settle().await;
    assert!(cache.handle().invalidate_if(&stale));
    gate.add_permits(1);
    let got = waiter.await.unwrap();
    assert!(
        got.is_err(),
        "the waiter fell back on the dropped credential: {got:?}"
    );
}

/// World: as above, a request waits for the refresh of a credential in its hard window,
/// but the application hands over a credential of its own before the refresh fails.
/// Proves (review finding): the waiter gets the handed-over credential, not the
/// refresh's error (the one it held to fall back on is no longer current either).
#[tokio::test(start_paused = true)]
async fn a_waiter_whose_refresh_fails_after_a_replacement_gets_the_replacement() {
    let (source, gate) = stale_then_failing();
    let cache = CredentialCache::new(source);
    cache.credential().await.unwrap();
    let waiter = ask(&cache);
    settle().await;
    let mine = Credential::bearer("mine").unwrap();
    assert!(cache.handle().replace(mine.clone()).unwrap());
    gate.add_permits(1);
    assert_eq!(waiter.await.unwrap().unwrap(), mine);
}

/// World: a fetch in flight is superseded (by a credential handed over with `replace`,
/// or by an invalidation and the fetch chained after it) and then fails. Proves: the
/// superseded fetch's failure reaches its own waiter only (after a replacement, not even
/// that: the waiter gets the credential handed over): the cache is not put into
/// backoff, so rejecting the good credential fetches again at once instead of answering
/// `Backoff` with the old failure as its cause.
#[tokio::test(start_paused = true)]
async fn a_superseded_fetchs_failure_does_not_back_off_the_cache() {
    for by_replace in [true, false] {
        let source = TestSource::gated(None);
        let cache = CredentialCache::new(source.clone());
        let first = ask(&cache);
        settle().await;
        let pushed = Credential::bearer("pushed").unwrap();
        let second = if by_replace {
            assert!(cache.handle().replace(pushed.clone()).unwrap());
            None
        } else {
            assert!(cache.handle().invalidate());
            let second = ask(&cache);
            settle().await;
            Some(second)
        };
        source.set_failing(true);
        source.release(1);
        match by_replace {
            // The credential handed over is its waiter's answer (see
            // `a_waiter_whose_refresh_fails_after_a_replacement_gets_the_replacement`).
            true => assert_eq!(first.await.unwrap().unwrap(), pushed),
            false => assert_eq!(first.await.unwrap().unwrap_err().kind(), ErrorKind::Fetch),
        }
        settle().await;
        source.set_failing(false);
        let good = match second {
            Some(second) => {
                source.release(1);
                second.await.unwrap().unwrap()
            }
            None => pushed,
        };
        assert_eq!(cache.credential().await.unwrap(), good);
        source.release(1);
        let replaced = cache
            .reject(&good)
            .await
            .unwrap_or_else(|e| panic!("replace: {by_replace}: {e:?}"));
        assert_ne!(replaced, good);
    }
}

/// World: a credential invalidated with `invalidate_if` by many callers that all saw
/// it rejected, as a burst of gRPC `UNAUTHENTICATED` answers would. Proves: only the
/// first call invalidates; a credential that is not current is never invalidated by
/// name; the burst costs one fetch.
#[tokio::test(start_paused = true)]
async fn a_burst_of_named_invalidations_costs_one_fetch() {
    let source = TestSource::new();
    let cache = CredentialCache::new(source.clone());
    let rejected = cache.credential().await.unwrap();
    let handle = cache.handle();
    let invalidated = (0..100).filter(|_| handle.invalidate_if(&rejected)).count();
    assert_eq!(invalidated, 1);
    let next = cache.credential().await.unwrap();
    assert_ne!(next, rejected);
    assert!(
        !handle.invalidate_if(&rejected),
        "an old credential invalidated the new one"
    );
    assert_eq!(cache.credential().await.unwrap(), next);
    assert_eq!(source.fetches(), 2);
    assert_eq!(source.log()[1].1, FetchReason::Invalidated);
}

/// World: a runtime that has shut down but is still entered by a thread that asks the
/// cache for a credential, so the refresh task cannot be spawned. Proves: the caller gets
/// a typed error instead of hanging on the cache's own lock, and another thread can still
/// use the cache's handle at once.
#[test]
fn a_refused_spawn_is_a_typed_error_not_a_deadlock() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let handle = runtime.handle().clone();
    let cache = CredentialCache::new(TestSource::new());
    runtime.shutdown_background();
    let (tx, rx) = std::sync::mpsc::channel();
    let asking = std::thread::spawn({
        let cache = cache.clone();
        move || {
            let _entered = handle.enter();
            let result = support::block_on(cache.credential());
            let _ = tx.send(result.map_err(|e| e.kind()));
        }
    });
    let result = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the caller hung: a refused spawn deadlocked the cache");
    assert_eq!(result.unwrap_err(), ErrorKind::SpawnRefused);
    asking.join().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let other = std::thread::spawn({
        let handle = cache.handle();
        move || {
            let _ = tx.send(handle.invalidate());
        }
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(5))
            .expect("another thread blocked on the cache")
    );
    other.join().unwrap();
}

/// Waits up to a second for `cond`, on this thread.
fn wait_for(mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("condition never held");
}

/// World: a fetch made suspect by an invalidation, still running on one runtime; the
/// fetch chained after it dies before it starts, refused by a runtime shutting down or
/// cancelled with its runtime while it waits. Proves: the suspect fetch is not forgotten:
/// the next request chains after it again instead of fetching beside it.
#[test]
fn a_chained_fetch_that_dies_before_it_starts_leaves_the_suspect_one_alone() {
    for case in ["cancelled", "refused"] {
        let first_runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let source = TestSource::gated(None);
        let cache = CredentialCache::builder(source.clone())
            .backoff(Duration::from_millis(1), Duration::from_millis(1))
            .build()
            .unwrap();
        let _first = first_runtime.spawn({
            let cache = cache.clone();
            async move { cache.credential().await }
        });
        wait_for(|| source.fetches() == 1);
        assert!(cache.handle().invalidate(), "{case}");
        if case == "refused" {
            let handle = support::dead_runtime();
            let cache = cache.clone();
            let kind = std::thread::spawn(move || {
                let _entered = handle.enter();
                support::block_on(cache.credential()).map_err(|e| e.kind())
            })
            .join()
            .unwrap();
            assert_eq!(kind.unwrap_err(), ErrorKind::SpawnRefused);
        } else {
            let second_runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            second_runtime.block_on(async {
                let waited =
                    tokio::time::timeout(Duration::from_millis(20), cache.credential()).await;
                assert!(waited.is_err(), "the chained fetch did not wait");
            });
            // Cancels the chained fetch while it waits for the suspect one.
            drop(second_runtime);
        }
        std::thread::sleep(Duration::from_millis(20)); // past the 1 ms backoff
        let _third = first_runtime.spawn({
            let cache = cache.clone();
            async move { cache.credential().await }
        });
        std::thread::sleep(Duration::from_millis(100));
        let fetches = source.fetches();
        source.release(10);
        assert_eq!(
            fetches, 1,
            "{case}: a fetch started beside the suspect one still running"
        );
    }
}

/// World: a fetch running when a credential that lives 100 ms is handed over; callers
/// that arrive after it expired join that fetch, directly or through the fetch chained
/// after an invalidation. Proves: nobody is handed the expired credential, and the
/// fetched one is installed rather than thrown away.
#[tokio::test]
async fn a_handed_over_credential_gone_stale_does_not_supersede_a_fetch() {
    for chained in [false, true] {
        let source = TestSource::gated(None);
        let cache = CredentialCache::new(source.clone());
        let first = ask(&cache);
        settle().await;
        let second = chained.then(|| {
            assert!(cache.handle().invalidate());
            ask(&cache)
        });
        settle().await;
        let pushed = Credential::bearer("pushed")
            .unwrap()
            .expires_in(Duration::from_millis(100));
        assert!(cache.handle().replace(pushed.clone()).unwrap());
        tokio::time::sleep(Duration::from_millis(200)).await;
        let late = ask(&cache);
        settle().await;
        source.release(2);
        let _ = first.await.unwrap();
        if let Some(second) = second {
            assert_ne!(second.await.unwrap().unwrap(), pushed, "chained: {chained}");
        }
        let got = late.await.unwrap().unwrap();
        assert_ne!(
            got, pushed,
            "chained: {chained}: handed an expired credential"
        );
        assert_eq!(
            cache.credential().await.unwrap(),
            got,
            "chained: {chained}: the fetched credential was not installed"
        );
    }
}

/// A source whose first fetch waits for the test's word and returns `A`; every later
/// fetch returns `C` at once.
#[derive(Clone, Default)]
struct Gated {
    go: Arc<tokio::sync::Notify>,
    fetches: Arc<AtomicUsize>,
}

impl CredentialSource for Gated {
    async fn fetch(&self, _cx: FetchContext) -> Result<Credential, BoxError> {
        if self.fetches.fetch_add(1, Ordering::SeqCst) == 0 {
            self.go.notified().await;
            return Ok(Credential::bearer("A")?);
        }
        Ok(Credential::bearer("C")?)
    }

    fn refresh_mode(&self) -> RefreshMode {
        RefreshMode::ReactiveOnly
    }
}

/// World: a fetch of `A` under way when `B` is handed in from outside (`replace`), and
/// `B` then rejected by the API. Proves: the rejection does not wait for the fetch that
/// started before `B` existed and take its `A` (a credential older than the one the API
/// just rejected): the replay carries `C`, fetched after the rejection, one fetch at a
/// time.
#[tokio::test]
async fn a_fetch_older_than_a_replacement_does_not_answer_its_rejection() {
    let source = Gated::default();
    let cache = CredentialCache::new(source.clone());
    let early = tokio::spawn({
        let cache = cache.clone();
        async move { cache.credential().await }
    });
    while source.fetches.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    assert!(
        cache
            .handle()
            .replace(Credential::bearer("B").unwrap())
            .unwrap()
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    let api = tower::service_fn({
        let seen = seen.clone();
        move |req: Request<tower_client_auth::ReplayBody<String>>| {
            let auth = req.headers()[http::header::AUTHORIZATION]
                .to_str()
                .unwrap()
                .to_owned();
            seen.lock().unwrap().push(auth.clone());
            let status = match auth.as_str() {
                "Bearer B" => StatusCode::UNAUTHORIZED,
                _ => StatusCode::OK,
            };
            async move {
                let mut res = Response::new(String::new());
                *res.status_mut() = status;
                Ok::<_, Infallible>(res)
            }
        }
    });
    let svc = AuthLayer::with_cache(cache.clone())
        .any_https_origin()
        .layer(api);
    let call = tokio::spawn(
        svc.oneshot(
            Request::get("https://api.test/v1")
                .body(String::new())
                .unwrap(),
        ),
    );
    // The rejection of B is in; then the old fetch ends.
    while seen.lock().unwrap().is_empty() {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    source.go.notify_one();
    let res = call.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(*seen.lock().unwrap(), ["Bearer B", "Bearer C"]);
    drop(early.await.unwrap());
}

/// World: a fetch running, made suspect by an invalidation, and a fetch chained after
/// it; then the application hands over `m` (100 s), which reaches its soft window while
/// the first fetch still runs, and a request there claims its background refresh (it
/// joins the chained fetch); the chained fetch then succeeds, or fails. Proves (review
/// findings): the chained fetch, which starts only once `m` is due, refreshes `m` when
/// it succeeds: its result is installed, not thrown away as older than the replacement
/// (which left `m` unrefreshed until its hard window, with its background refresh
/// claimed and never given back); when it fails, its waiters get `m`, still sendable,
/// nothing backs off, and `m`'s background refresh is given back after a backoff.
#[tokio::test(start_paused = true)]
async fn a_fetch_chained_before_a_replacement_refreshes_it_once_it_is_due() {
    let value = |c: Credential| c.headers().next().unwrap().1.to_str().unwrap().to_owned();
    for fails in [false, true] {
        let source = TestSource::gated(Some(Duration::from_secs(3600)));
        let cache = CredentialCache::builder(source.clone())
            .window_jitter(0.0)
            .build()
            .unwrap();
        let running = ask(&cache);
        settle().await;
        cache.handle().invalidate();
        let chained = ask(&cache);
        settle().await;
        assert_eq!(source.fetches(), 1, "the chained fetch started at once");
        let m = Credential::bearer("m")
            .unwrap()
            .expires_in(Duration::from_secs(100));
        cache.handle().replace(m.clone()).unwrap();
        tokio::time::advance(Duration::from_secs(80)).await;
        settle().await;
        assert_eq!(cache.credential().await.unwrap(), m, "in its soft window");
        source.set_failing(fails);
        source.release(2);
        settle().await;
        // The handed-over credential wins for a fetch that ran across the replacement.
        assert_eq!(value(running.await.unwrap().unwrap()), "Bearer m");
        assert_eq!(source.fetches(), 2);
        let chained = chained.await.unwrap().map(value);
        if fails {
            assert_eq!(
                chained.map_err(|e| e.kind()),
                Ok("Bearer m".to_owned()),
                "the chained fetch's waiter failed although m is current"
            );
            assert_eq!(value(cache.credential().await.unwrap()), "Bearer m");
            assert_eq!(cache.stats().fetch_failures, 2);
            // The background claim that joined the failed fetch is given back after a
            // backoff: the next request in m's soft window refreshes it.
            source.set_failing(false);
            tokio::time::advance(Duration::from_secs(2)).await;
            settle().await;
            assert_eq!(value(cache.credential().await.unwrap()), "Bearer m");
            settle().await;
            assert_eq!(
                source.fetches(),
                3,
                "m's background refresh never came back"
            );
            source.release(1);
            settle().await;
            assert_eq!(value(cache.credential().await.unwrap()), "Bearer token-3");
        } else {
            assert_eq!(chained.unwrap(), "Bearer token-2");
            assert_eq!(
                value(cache.credential().await.unwrap()),
                "Bearer token-2",
                "m was not refreshed in its soft window"
            );
        }
    }
}

/// A source whose first fetch takes 1.5 s (past a 1 s fetch timeout) and every later one
/// 50 ms; it counts its fetches. Its credentials are `slow-1`, `slow-2`, ...
#[derive(Clone, Default)]
struct SlowFirst {
    fetches: Arc<AtomicUsize>,
}

impl CredentialSource for SlowFirst {
    async fn fetch(&self, _cx: FetchContext) -> Result<Credential, BoxError> {
        let n = self.fetches.fetch_add(1, Ordering::SeqCst) + 1;
        let took = if n == 1 { 1500 } else { 50 };
        tokio::time::sleep(Duration::from_millis(took)).await;
        Ok(Credential::bearer(format!("slow-{n}"))?)
    }
}

/// World: one cache on a `MemoryStore`; its first fetch outlives the 1 s fetch timeout
/// (the lease holder's fetch goes on after its flight failed, and saves what it brings).
/// Half a second in, while that fetch runs, the cache is invalidated, and a request
/// asks for a credential. Proves (README, "invalidation while a fetch runs": that
/// fetch's result never goes into the cache, nor is taken back from a store it was
/// saved in): neither that request nor a later one gets `slow-1`.
#[tokio::test]
async fn a_fetch_running_at_an_invalidation_is_not_taken_back_after_it_outlives_its_timeout() {
    let source = SlowFirst::default();
    let cache = late_fetching(source.clone(), MemoryStore::new());
    invalidated_while_slow_first_runs(&cache, Duration::from_millis(500)).await;
}

/// World: as above, but the invalidation comes while the flight is at the store (its
/// first look takes 300 ms), before the source is asked. Proves: the flight is suspect
/// from then on, its late fetch too: neither the request made after the invalidation
/// nor a later one gets `slow-1`.
#[tokio::test]
async fn an_invalidation_before_a_late_fetch_asks_the_source_is_not_missed() {
    let source = SlowFirst::default();
    let cache = late_fetching(source.clone(), {
        let store = FaultStore::new();
        store.delay_next_loads(&[Duration::from_millis(300)]);
        store
    });
    invalidated_while_slow_first_runs(&cache, Duration::from_millis(150)).await;
}

/// A cache of `source` over `store` whose fetches time out after 1 s (the lease
/// holder's fetch goes on past it: see `finish_late`), backing off 50 to 100 ms.
fn late_fetching<P: CredentialSource>(
    source: P,
    store: impl CredentialStore,
) -> CredentialCache<P> {
    CredentialCache::builder(source)
        .store(store)
        .fetch_timeout(Duration::from_secs(1))
        .backoff(Duration::from_millis(50), Duration::from_millis(100))
        .build()
        .unwrap()
}

/// Asks `cache` (on a `SlowFirst` source) for a credential, invalidates it `after` that,
/// and asks again; neither that request nor a later one may get `slow-1`, the result of
/// the fetch the invalidation made suspect.
async fn invalidated_while_slow_first_runs<S>(cache: &CredentialCache<S>, after: Duration)
where
    S: CredentialSource,
{
    let waiting = tokio::spawn({
        let cache = cache.clone();
        async move { cache.credential().await }
    });
    tokio::time::sleep(after).await;
    assert!(cache.handle().invalidate());
    let answer = cache.credential().await;
    let _ = waiting.await.unwrap();
    let slow_1 = Credential::bearer("slow-1").unwrap();
    assert_ne!(
        answer.as_ref().ok(),
        Some(&slow_1),
        "a request made after the invalidation got the result of the fetch it made suspect"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let later = cache.credential().await.unwrap();
    assert_ne!(later, slow_1, "taken back from the store");
}

/// World: as `a_fetch_running_at_an_invalidation_is_not_taken_back_after_it_outlives_its_timeout`,
/// but the invalidation lands while the late fetch saves `slow-1` under its lease (its
/// fetch ends at 1.5 s, its save takes 200 ms: within the save's share of the fetch
/// timeout). Proves (review finding: the late fetch looked for an invalidation before
/// its save only): no request made after the invalidation gets `slow-1` from the store.
#[tokio::test]
async fn an_invalidation_while_a_late_fetch_saves_is_not_missed() {
    let source = SlowFirst::default();
    let store = FaultStore::new();
    store.delay_next_saves(&[Duration::from_millis(200)]);
    let cache = late_fetching(source.clone(), store);
    let first = cache.credential().await;
    assert_eq!(first.unwrap_err().kind(), ErrorKind::Timeout);
    // The late fetch answers at 1.5 s; its save runs until 1.7 s.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(cache.handle().invalidate());
    let slow_1 = Credential::bearer("slow-1").unwrap();
    for _ in 0..2 {
        let answer = cache.credential().await;
        assert_ne!(
            answer.as_ref().ok(),
            Some(&slow_1),
            "a request made after the invalidation got the late fetch's result ({} fetches)",
            source.fetches.load(Ordering::SeqCst)
        );
    }
}

/// A source holding the last credential it issued, handing it back unless told it was
/// dropped (`FetchContext::previous`, as its docs show); its first fetch takes 1.5 s.
#[derive(Clone, Default)]
struct HoldingSlowFirst {
    fetches: Arc<AtomicUsize>,
    held: Arc<Mutex<Option<Credential>>>,
    log: Arc<Mutex<Vec<Told>>>,
}

/// Why a fetch came, and what it was told had been dropped.
type Told = (FetchReason, Option<Credential>);

impl CredentialSource for HoldingSlowFirst {
    async fn fetch(&self, cx: FetchContext) -> Result<Credential, BoxError> {
        self.log
            .lock()
            .unwrap()
            .push((cx.reason(), cx.previous().cloned()));
        let n = self.fetches.fetch_add(1, Ordering::SeqCst) + 1;
        if n == 1 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        let mut held = self.held.lock().unwrap();
        match held.as_ref() {
            Some(h) if cx.previous() != Some(h) => Ok(h.clone()),
            _ => {
                let fresh = Credential::bearer(format!("slow-{n}"))?;
                *held = Some(fresh.clone());
                Ok(fresh)
            }
        }
    }
}

/// World: a cache over a store, its source holding its last credential; its first fetch
/// outlives the 1 s fetch timeout (the lease holder's fetch goes on); at 0.5 s the
/// application invalidates and a request comes (its fetch is chained after the running
/// flight and begins at 1 s, waiting for the lease while the late fetch runs). Proves
/// (review finding: the chained fetch was told nothing, since the late fetch's result
/// came after it began): the chained fetch is told `slow-1`, and no request made after
/// the invalidation gets it.
#[tokio::test]
async fn a_fetch_after_an_invalidated_late_fetch_is_told_what_it_brought() {
    let source = HoldingSlowFirst::default();
    let cache = late_fetching(source.clone(), MemoryStore::new());
    let waiting = ask(&cache);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(cache.handle().invalidate());
    let answer = cache.credential().await;
    let _ = waiting.await.unwrap();
    let slow_1 = Credential::bearer("slow-1").unwrap();
    let log = source.log.lock().unwrap().clone();
    assert_ne!(
        answer.as_ref().ok(),
        Some(&slow_1),
        "the invalidated late fetch's result came back through its source; fetches: {log:?}"
    );
    assert_eq!(log.last().unwrap().1.as_ref(), Some(&slow_1), "{log:?}");
}

/// A source whose first fetch takes 1.5 s and each later one 400 ms, bringing
/// `slow-<n>`.
#[derive(Clone, Default)]
struct SlowFirstThenSlowish {
    fetches: Arc<AtomicUsize>,
}

impl CredentialSource for SlowFirstThenSlowish {
    async fn fetch(&self, _cx: FetchContext) -> Result<Credential, BoxError> {
        let n = self.fetches.fetch_add(1, Ordering::SeqCst) + 1;
        let took = if n == 1 { 1500 } else { 400 };
        tokio::time::sleep(Duration::from_millis(took)).await;
        Ok(Credential::bearer(format!("slow-{n}"))?)
    }
}

/// Two processes (caches A and B) on one `MemoryStore`. A's first fetch (the lease
/// holder's) takes 1.5 s; at 0.5 s A's application invalidates and asks again (a fetch
/// chained after the running flight); at 1.7 s B asks. What B got.
async fn what_b_gets_after_a_invalidates(a_fetch_timeout: Duration) -> Credential {
    let started = tokio::time::Instant::now();
    let store = MemoryStore::new();
    let a = CredentialCache::builder(SlowFirstThenSlowish::default())
        .store(store.clone())
        .fetch_timeout(a_fetch_timeout)
        .backoff(Duration::from_millis(50), Duration::from_millis(100))
        .build()
        .unwrap();
    let b = CredentialCache::builder(SlowFirstThenSlowish::default())
        .store(store.clone())
        .fetch_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let first = ask(&a);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(a.handle().invalidate());
    let after = ask(&a);
    tokio::time::sleep_until(started + Duration::from_millis(1700)).await;
    let b_got = b.credential().await.unwrap();
    let _ = (first.await.unwrap(), after.await.unwrap());
    b_got
}

/// World: as `what_b_gets_after_a_invalidates`, with A's fetch timeout 1 s: its first
/// fetch goes on past it (`finish_late`) and brings `slow-1` after the invalidation.
/// With a 5 s timeout (the suspect fetch ends in its flight, and the chained fetch,
/// told of it as it begins, removes it from the store) B never gets `slow-1`. Proves
/// (review finding: late, the chained fetch was told only as it asked the source, after
/// its look at the store, so `slow-1` stayed there for the fleet): late, B does not get
/// the credential A's invalidation dropped either.
#[tokio::test]
async fn an_invalidated_late_result_is_not_left_in_the_store_for_the_fleet() {
    let slow_1 = Credential::bearer("slow-1").unwrap();
    let control = what_b_gets_after_a_invalidates(Duration::from_secs(5)).await;
    assert_ne!(control, slow_1, "control");
    let late = what_b_gets_after_a_invalidates(Duration::from_secs(1)).await;
    assert_ne!(
        late, slow_1,
        "process B took the credential A's invalidation dropped"
    );
}

/// A source whose first fetch answers at once, its second in 1.5 s, the rest in 400 ms,
/// each `access-<n>` (or `b-access-<n>`: another process's) issued 85 s ago for 100 s (in
/// a 20 s soft window).
#[derive(Clone, Default)]
struct QuickSlowSlowish {
    fetches: Arc<AtomicUsize>,
    log: Arc<Mutex<Vec<Told>>>,
    other: bool,
}

impl CredentialSource for QuickSlowSlowish {
    async fn fetch(&self, cx: FetchContext) -> Result<Credential, BoxError> {
        self.log
            .lock()
            .unwrap()
            .push((cx.reason(), cx.previous().cloned()));
        let n = self.fetches.fetch_add(1, Ordering::SeqCst);
        let took = match n {
            0 => 0,
            1 => 1500,
            _ => 400,
        };
        tokio::time::sleep(Duration::from_millis(took)).await;
        let issued = cx.now() - Duration::from_secs(85);
        let prefix = if self.other { "b-" } else { "" };
        Ok(Credential::bearer(format!("{prefix}access-{n}"))?
            .lives(issued, Duration::from_secs(100)))
    }
}

/// World: processes A and B on one store; A's `access-0` is current and in the store;
/// A's background refresh outlives its timeout, and the save of what it brings
/// (`access-1`) outlives its share (the store keeps `access-0`). Then A's application
/// drops `access-0`, by `invalidate_if` or by `reject`. Proves (review finding: the
/// invalidation told the next fetch `access-1`, the late result, as what it dropped, so
/// that fetch removed `access-1` from the store rather than `access-0`): process B never
/// gets `access-0`, and A's next fetch is told `access-0`.
#[tokio::test]
async fn an_invalidation_beside_a_late_result_removes_what_it_dropped() {
    for by_invalidate in [false, true] {
        let store = FaultStore::new();
        let source = QuickSlowSlowish::default();
        let a = support::store::windowed(source.clone(), store.clone());
        let b_source = QuickSlowSlowish {
            other: true,
            ..QuickSlowSlowish::default()
        };
        let b = support::store::windowed(b_source, store.clone());
        let access_0 = a.credential().await.unwrap();
        assert_eq!(access_0, Credential::bearer("access-0").unwrap());
        store.delay_next_saves(&[Duration::from_secs(2)]);
        // In the soft window: served, and the background refresh starts.
        assert_eq!(a.credential().await.unwrap(), access_0);
        tokio::time::sleep(Duration::from_millis(1900)).await;
        assert_eq!(
            source.fetches.load(Ordering::SeqCst),
            2,
            "the late fetch ran"
        );
        assert_eq!(store.load().await.unwrap().as_ref(), Some(&access_0));
        let a_after = if by_invalidate {
            assert!(a.handle().invalidate_if(&access_0));
            ask(&a)
        } else {
            let (a, access_0) = (a.clone(), access_0.clone());
            tokio::spawn(async move { a.reject(&access_0).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let b_got = b.credential().await.unwrap();
        let _ = a_after.await.unwrap();
        let told = source.log.lock().unwrap().clone();
        assert_ne!(
            b_got, access_0,
            "invalidate: {by_invalidate}: process B took the credential A dropped; A told {told:?}"
        );
        assert_eq!(
            told.last().unwrap().1.as_ref(),
            Some(&access_0),
            "invalidate: {by_invalidate}: {told:?}"
        );
    }
}
