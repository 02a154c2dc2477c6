//! Keep-warm and warm-up at their edges (review 94): a `Retry-After` answered to a
//! refresh that an invalidation or a `replace` overtook, warm-up on a runtime without
//! timers, warm-up beside requests, keep-warm over a store racing every entry point, and
//! nothing left running once the last clone is dropped.

#![cfg(feature = "token")]

use crate::support;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::{Request, Response, StatusCode};

use support::retry_after::{Idp, settle};
use support::{FakeApi, TestSource, get};
use tokio::{sync::Semaphore, time::Instant};
use tower::{Layer, ServiceExt};
use tower_client_auth::{AuthLayer, Credential, CredentialCache, token::TokenSource};

fn warm_cache(idp: &Idp) -> CredentialCache<TokenSource> {
    CredentialCache::builder(idp.source())
        .window_jitter(0.0)
        .backoff(Duration::from_secs(1), Duration::from_secs(8))
        .keep_warm(true)
        .build()
        .unwrap()
}

/// A warmed-up keep-warm cache whose refresh (76 s in, at its soft window) is held at
/// the endpoint, which will answer it 503 `Retry-After: 60`; the gate that holds it.
async fn refresh_held_at_a_failing_endpoint(
    idp: &Idp,
) -> (CredentialCache<TokenSource>, Arc<Semaphore>) {
    let cache = warm_cache(idp);
    cache.warm_up().await.unwrap();
    let gate = idp.gate();
    idp.set_failing(true);
    tokio::time::sleep(Duration::from_secs(76)).await;
    settle().await;
    assert_eq!(idp.requests(), 2, "keep-warm's refresh is at the endpoint");
    (cache, gate)
}

/// Lets the held refresh's 503 out.
async fn answer_the_held_refresh(idp: &Idp, gate: &Semaphore) {
    idp.ungate();
    gate.add_permits(10);
    settle().await;
}

/// Asks for the credential every 500 ms for 50 s; then no token request may have come
/// within 60 s of a 503's answer.
async fn ask_and_check_retry_after(idp: &Idp, cache: &CredentialCache<TokenSource>) {
    for _ in 0..100 {
        let _ = cache.credential().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let v = idp.violations();
    assert!(v.is_empty(), "{v:?}\nlog: {:?}", idp.log());
}

/// Control: keep-warm's own refresh answered 503 `Retry-After: 60`, requests arriving
/// meanwhile. Proves: no token request within the 60 s.
#[tokio::test(start_paused = true)]
async fn keep_warm_honours_retry_after_on_its_own_refresh() {
    let idp = Idp::default();
    let cache = warm_cache(&idp);
    cache.warm_up().await.unwrap();
    idp.set_failing(true);
    tokio::time::sleep(Duration::from_secs(76)).await;
    settle().await;
    assert_eq!(idp.requests(), 2, "keep-warm refreshed at 75 s");
    for _ in 0..100 {
        let _ = cache.credential().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let v = idp.violations();
    assert!(v.is_empty(), "{v:?}\n{:?}", idp.log());
}

/// World: keep-warm's refresh answered 503 `Retry-After: 60`; then a credential is
/// handed over (`replace`) and the API rejects it 11 s later (`reject`). Proves: the
/// hand-over ends the backoff's own steps, not the endpoint's word: no token request
/// within the 60 s (the rejection is answered with the backoff's error, no fetch).
#[tokio::test(start_paused = true)]
async fn retry_after_outlives_a_replace_and_its_rejection() {
    let idp = Idp::default();
    let cache = warm_cache(&idp);
    cache.warm_up().await.unwrap();
    idp.set_failing(true);
    tokio::time::sleep(Duration::from_secs(76)).await;
    settle().await;
    assert_eq!(idp.requests(), 2, "keep-warm refreshed at 75 s");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let handed = Credential::bearer("handed")
        .unwrap()
        .expires_in(Duration::from_secs(100));
    cache.handle().replace(handed).unwrap();
    let current = cache.credential().await.unwrap();
    // Old enough that its rejection drops it (see `YOUNG_CREDENTIAL_AGE`).
    tokio::time::sleep(Duration::from_secs(11)).await;
    let err = cache.reject(&current).await.map(drop).unwrap_err();
    assert_eq!(err.kind(), tower_client_auth::ErrorKind::Backoff, "{err}");
    ask_and_check_retry_after(&idp, &cache).await;
    assert_eq!(idp.requests(), 3, "{:?}", idp.log());
}

/// README: "A token endpoint's `Retry-After` (429, 503; seconds or an HTTP date) is the
/// earliest next token request". World: keep-warm's refresh is at the endpoint when the
/// credential is invalidated (`CacheHandle::invalidate`) and a request arrives; the
/// endpoint then answers that refresh 503 `Retry-After: 60`. Promise: no token request
/// within the next 60 s.
#[tokio::test(start_paused = true)]
async fn retry_after_holds_when_keep_warms_refresh_was_overtaken_by_an_invalidation() {
    let idp = Idp::default();
    let (cache, gate) = refresh_held_at_a_failing_endpoint(&idp).await;
    cache.handle().invalidate();
    let asking = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.credential().await.map(drop) })
    };
    settle().await;
    answer_the_held_refresh(&idp, &gate).await;
    let _ = tokio::time::timeout(Duration::from_secs(30), asking).await;
    ask_and_check_retry_after(&idp, &cache).await;
}

/// The same, a credential handed over (`CacheHandle::replace`) while keep-warm's refresh
/// is at the endpoint; the handed credential is already in its soft window (issued 80 s
/// ago for 100 s), so requests want its background refresh.
#[tokio::test(start_paused = true)]
async fn retry_after_holds_when_keep_warms_refresh_was_overtaken_by_a_replace() {
    let idp = Idp::default();
    let (cache, gate) = refresh_held_at_a_failing_endpoint(&idp).await;
    let handed = Credential::bearer("handed").unwrap().lives(
        std::time::SystemTime::now() - Duration::from_secs(80),
        Duration::from_secs(100),
    );
    cache.handle().replace(handed).unwrap();
    answer_the_held_refresh(&idp, &gate).await;
    // A second later, the application asks for the credential (in its soft window).
    tokio::time::sleep(Duration::from_secs(1)).await;
    ask_and_check_retry_after(&idp, &cache).await;
}

/// `CredentialCache::warm_up` on a Tokio runtime built without its time driver (a
/// `Builder::new_current_thread().build()` without `enable_time`). Promise (warm-up:
/// errors typed, "the error is the one a request would get"): a typed error that says
/// what went wrong. `ErrorKind::SourcePanicked` is documented as "The credential source
/// panicked while fetching": it must not be reported when the source was never called.
#[test]
fn warm_up_on_a_runtime_without_timers_does_not_blame_the_source() {
    let source = TestSource::expiring(Duration::from_secs(100));
    let cache = CredentialCache::builder(source.clone())
        .keep_warm(true)
        .build()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(async {
            let warmed = cache.warm_up().await;
            let got = cache.credential().await;
            (
                warmed.map_err(|e| e.kind()),
                got.map(drop).map_err(|e| e.kind()),
            )
        })
    }));
    let outcome = outcome.map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
    });
    println!("outcome {outcome:?}, fetches {}", source.fetches());
    let (warmed, got) = outcome.expect("warm_up panicked");
    assert_eq!(source.fetches(), 0);
    // The runtime's failure, said as such, and nothing backs off from it: the next
    // request is told the same.
    assert_eq!(warmed, Err(tower_client_auth::ErrorKind::NoRuntime));
    assert_eq!(got, Err(tower_client_auth::ErrorKind::NoRuntime));
}

/// Single flight across a fleet of two (two caches of one process sharing a
/// MemoryStore and one source), both keep-warm, in step. Promise: one fetch at a time,
/// one refresh for the fleet at the soft window.
#[tokio::test(start_paused = true)]
async fn two_keep_warm_caches_over_one_store_fetch_one_at_a_time() {
    let source = TestSource::build(
        Some(Duration::from_secs(100)),
        Duration::from_secs(1),
        false,
        tower_client_auth::RefreshMode::Proactive,
    );
    let store = tower_client_auth::MemoryStore::new();
    let make = || {
        CredentialCache::builder(source.clone())
            .window_jitter(0.0)
            .backoff(Duration::from_secs(1), Duration::from_secs(8))
            .store(store.clone())
            .keep_warm(true)
            .build()
            .unwrap()
    };
    let (a, b) = (make(), make());
    let (x, y) = tokio::join!(a.warm_up(), b.warm_up());
    x.unwrap();
    y.unwrap();
    tokio::time::sleep(Duration::from_secs(80)).await;
    settle().await;
    println!("fetches {}, log {:?}", source.fetches(), source.log());
    assert_eq!(source.max_in_flight(), 1, "two fetches at once");
    assert_eq!(
        source.fetches(),
        2,
        "one cold start, one keep-warm refresh, for the fleet"
    );
    assert_eq!(a.credential().await.unwrap(), b.credential().await.unwrap());
}

/// Control: warm_up, `credential()` and layer requests all at once, on a cold cache
/// with keep-warm, the source slow. Proves: one fetch, never two at once.
#[tokio::test(start_paused = true)]
async fn concurrent_warm_up_and_requests_fetch_once() {
    let source = TestSource::gated(Some(Duration::from_secs(100)));
    let layer = AuthLayer::builder(source.clone())
        .keep_warm(true)
        .any_https_origin()
        .build()
        .unwrap();
    let api = FakeApi::new(|_, _| StatusCode::OK);
    let svc = layer.clone().layer(api.service());
    let mut tasks = Vec::new();
    for i in 0..30 {
        let layer = layer.clone();
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            if i % 3 == 0 {
                layer.warm_up().await.map_err(|e| e.to_string())
            } else {
                svc.oneshot(get("/"))
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        }));
    }
    settle().await;
    source.release(5);
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(source.fetches(), 1);
    assert_eq!(source.max_in_flight(), 1);
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Control: keep-warm's refresh answered 503 `Retry-After: 60`, then the last clone is
/// dropped. Proves: no task outlives it, and no token request follows.
#[tokio::test(start_paused = true)]
async fn keep_warm_backing_off_a_retry_after_stops_with_the_last_clone() {
    let baseline = alive_tasks();
    let idp = Idp::default();
    let cache = warm_cache(&idp);
    let handle = cache.handle();
    cache.warm_up().await.unwrap();
    idp.set_failing(true);
    tokio::time::sleep(Duration::from_secs(76)).await;
    settle().await;
    assert_eq!(idp.requests(), 2);
    drop(cache);
    settle().await;
    assert_eq!(alive_tasks(), baseline, "a task outlived the cache");
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(idp.requests(), 2);
    assert!(
        !handle.invalidate(),
        "the cache is still alive (its Weak upgrades) after its last clone went"
    );
}

/// Single flight with a store: keep-warm's refresh held at the token endpoint (a
/// MemoryStore shared by the fleet of one) while an invalidation, requests, a 401
/// through the layer, `replace` and another invalidation pile on. Promise: never two
/// fetches of the source at once.
#[tokio::test(start_paused = true)]
async fn keep_warm_over_a_store_racing_every_entry_point_is_one_fetch_at_a_time() {
    let source = TestSource::gated(Some(Duration::from_secs(100)));
    source.release(1);
    let cache = CredentialCache::builder(source.clone())
        .window_jitter(0.0)
        .backoff(Duration::from_secs(1), Duration::from_secs(8))
        .store(tower_client_auth::MemoryStore::new())
        .keep_warm(true)
        .build()
        .unwrap();
    cache.warm_up().await.unwrap();
    let api = FakeApi::new(|_, token| match token {
        Some("token-1") => StatusCode::UNAUTHORIZED,
        _ => StatusCode::OK,
    });
    let svc = AuthLayer::with_cache(cache.clone())
        .any_https_origin()
        .layer(api.service());
    tokio::time::sleep(Duration::from_secs(76)).await;
    settle().await;
    assert_eq!(
        source.fetches(),
        2,
        "keep-warm's refresh is at the endpoint"
    );
    let handle = cache.handle();
    let mut tasks: Vec<tokio::task::JoinHandle<Result<(), String>>> = Vec::new();
    for _ in 0..3 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            svc.oneshot(get("/"))
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }));
    }
    settle().await;
    handle.invalidate();
    for _ in 0..3 {
        let cache = cache.clone();
        tasks.push(tokio::spawn(async move {
            cache
                .credential()
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }));
    }
    settle().await;
    handle
        .replace(
            Credential::bearer("handed")
                .unwrap()
                .expires_in(Duration::from_secs(100)),
        )
        .unwrap();
    settle().await;
    handle.invalidate();
    for _ in 0..3 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            svc.oneshot(get("/"))
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }));
    }
    settle().await;
    for _ in 0..20 {
        source.release(1);
        settle().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("a caller was never answered")
            .unwrap();
    }
    println!("fetches {}, log {:?}", source.fetches(), source.log());
    assert_eq!(
        source.max_in_flight(),
        1,
        "two fetches at the endpoint at once"
    );
}

/// Promise (README, keep-warm): "the timer ends with the last clone of the cache, and no
/// refresh starts after it, even while a store's late fetch still holds the cache"; the
/// brief's "a kept pair's save round". World: keep-warm over a store that stops
/// answering (hangs) before the soft window; keep-warm's refresh runs into it; a pair
/// (with a refresh token) is handed over (`replace`), its save round hangs too; the last
/// clone is dropped. Promise: within twice the fetch timeout, no task of the cache is
/// left and the source is asked no more.
#[tokio::test(start_paused = true)]
async fn keep_warm_over_a_hung_store_with_a_pair_handed_in_stops_with_the_last_clone() {
    let baseline = alive_tasks();
    let source = TestSource::expiring(Duration::from_secs(100));
    let store = support::store::FaultStore::new();
    let faults = store.clone();
    let cache = CredentialCache::builder(source.clone())
        .window_jitter(0.0)
        .fetch_timeout(Duration::from_secs(5))
        .backoff(Duration::from_secs(1), Duration::from_secs(4))
        .store(store)
        .keep_warm(true)
        .build()
        .unwrap();
    cache.warm_up().await.unwrap();
    faults.faults().hung.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(78)).await;
    settle().await;
    cache
        .handle()
        .replace(
            Credential::bearer("handed")
                .unwrap()
                .with_refresh_token("rt-handed")
                .expires_in(Duration::from_secs(100)),
        )
        .unwrap();
    settle().await;
    let dropped = Instant::now();
    let fetched = source.fetches();
    drop(cache);
    tokio::time::sleep(Duration::from_secs(600)).await;
    settle().await;
    let since: Vec<_> = (source.log().iter())
        .filter(|(at, _)| *at > dropped)
        .map(|(at, _)| *at - dropped)
        .collect();
    println!(
        "fetches before drop {fetched}, after {since:?}, tasks {} vs {baseline}",
        alive_tasks()
    );
    assert!(
        since.is_empty(),
        "the source was asked after the last clone went: {since:?}"
    );
    assert_eq!(alive_tasks(), baseline, "a task outlived the cache");
}

/// The same as the invalidation case, keep-warm's refresh overtaken by a rejection (the
/// API answered 401 to the current credential: `CredentialCache::reject`).
#[tokio::test(start_paused = true)]
async fn retry_after_holds_when_keep_warms_refresh_was_overtaken_by_a_rejection() {
    let idp = Idp::default();
    let (cache, gate) = refresh_held_at_a_failing_endpoint(&idp).await;
    // In its soft window: handed out at once, as the refresh runs.
    let current = cache.credential().await.unwrap();
    let rejecting = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.reject(&current).await.map(drop) })
    };
    settle().await;
    answer_the_held_refresh(&idp, &gate).await;
    let _ = tokio::time::timeout(Duration::from_secs(30), rejecting).await;
    ask_and_check_retry_after(&idp, &cache).await;
}

/// Keep-warm alone, no request: keep-warm's refresh is at the endpoint when a fresh
/// 20 s credential is handed over (`replace`); the endpoint answers that refresh 503
/// `Retry-After: 60`. The handed credential's own keep-warm refresh (its soft window
/// opens at 15 s) must wait for the 60 s too: no token request within them.
#[tokio::test(start_paused = true)]
async fn keep_warm_honours_retry_after_from_a_refresh_overtaken_by_a_replace_with_no_request() {
    let idp = Idp::default();
    let (cache, gate) = refresh_held_at_a_failing_endpoint(&idp).await;
    cache
        .handle()
        .replace(
            Credential::bearer("handed")
                .unwrap()
                .expires_in(Duration::from_secs(20)),
        )
        .unwrap();
    answer_the_held_refresh(&idp, &gate).await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    settle().await;
    let v = idp.violations();
    assert!(v.is_empty(), "{v:?}\nlog: {:?}", idp.log());
}

/// A gated issuer on the cache's clock: `token-n` living 100 s from `cx.now()`; fails
/// while `failing`.
#[derive(Clone)]
struct GatedIssuer {
    n: Arc<AtomicUsize>,
    failing: Arc<std::sync::atomic::AtomicBool>,
    gate: Arc<Semaphore>,
}

impl tower_client_auth::CredentialSource for GatedIssuer {
    async fn fetch(
        &self,
        cx: tower_client_auth::FetchContext,
    ) -> Result<Credential, tower_client_auth::BoxError> {
        let n = self.n.fetch_add(1, Ordering::SeqCst) + 1;
        self.gate.acquire().await?.forget();
        if self.failing.load(Ordering::SeqCst) {
            return Err("503".into());
        }
        Ok(Credential::bearer(format!("token-{n}"))?.lives(cx.now(), Duration::from_secs(100)))
    }
}

/// Promise: keep-warm "sends no expired credential after the process was suspended".
/// World: keep-warm's refresh hangs at the endpoint into the hard window; a request
/// through the layer waits on it (token-1, 4 s left, its fallback); the machine is
/// suspended for 200 s (the wall clock moves, the monotonic one does not); on wake the
/// refresh fails. Promise: token-1, expired by the wall clock, is not sent.
#[tokio::test(start_paused = true)]
async fn a_request_waiting_on_keep_warms_refresh_across_a_suspend_sends_no_expired_credential() {
    use tower_client_auth::clock::ManualClock;
    let clock =
        ManualClock::new(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
    let source = GatedIssuer {
        n: Arc::default(),
        failing: Arc::default(),
        gate: Arc::new(Semaphore::new(0)),
    };
    source.gate.add_permits(1);
    let cache = CredentialCache::builder(source.clone())
        .clock(clock.clone())
        .window_jitter(0.0)
        .fetch_timeout(Duration::from_secs(60))
        .keep_warm(true)
        .build()
        .unwrap();
    cache.warm_up().await.unwrap();
    let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let api = tower::service_fn({
        let seen = seen.clone();
        move |req: Request<tower_client_auth::ReplayBody<String>>| {
            let auth = (req.headers().get("authorization")).map(|v| v.to_str().unwrap().to_owned());
            seen.lock().unwrap().push(auth);
            std::future::ready(Ok::<_, tower_client_auth::BoxError>(Response::new(())))
        }
    });
    let svc = AuthLayer::with_cache(cache.clone())
        .any_https_origin()
        .layer(api);
    // 96 s on both clocks: keep-warm's refresh (from 75 s) is at the endpoint.
    for _ in 0..96 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        clock.advance(Duration::from_secs(1));
    }
    settle().await;
    assert_eq!(
        source.n.load(Ordering::SeqCst),
        2,
        "keep-warm's refresh is at the endpoint"
    );
    let request = tokio::spawn(
        svc.clone().oneshot(
            Request::get("https://api.example.com/")
                .body(String::new())
                .unwrap(),
        ),
    );
    settle().await;
    // Suspend: the wall clock jumps 200 s; the refresh then fails.
    clock.advance(Duration::from_secs(200));
    source.failing.store(true, Ordering::SeqCst);
    source.gate.add_permits(1);
    settle().await;
    let outcome = tokio::time::timeout(Duration::from_secs(5), request).await;
    let seen = seen.lock().unwrap().clone();
    println!(
        "outcome {:?}, seen {seen:?}",
        outcome.as_ref().map(|r| r
            .as_ref()
            .map(|r| r.as_ref().map(drop).map_err(|e| e.to_string())))
    );
    assert!(
        !seen.iter().any(|a| a.as_deref() == Some("Bearer token-1")),
        "token-1 sent after it expired: {seen:?}"
    );
}

/// Promise: keep-warm "stops when the last layer or cache clone is dropped (no task or
/// timer outlives its users, including ... a kept pair's save round)". World: a source of
/// pairs (access + refresh token), keep-warm over a store that refuses pairs; keep-warm's
/// refresh at the soft window brings a pair the store will not take (kept, saved again
/// and again); the last clone is dropped. Promise: no task left after a bounded time,
/// no fetch after the drop.
#[tokio::test(start_paused = true)]
async fn keep_warm_with_a_kept_pair_stops_with_the_last_clone() {
    #[derive(Clone, Default)]
    struct Pairs(Arc<AtomicUsize>, Arc<Mutex<Vec<Instant>>>);
    impl tower_client_auth::CredentialSource for Pairs {
        async fn fetch(
            &self,
            _: tower_client_auth::FetchContext,
        ) -> Result<Credential, tower_client_auth::BoxError> {
            let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
            self.1.lock().unwrap().push(Instant::now());
            Ok(Credential::bearer(format!("at-{n}"))?
                .with_refresh_token(format!("rt-{n}"))
                .expires_in(Duration::from_secs(100)))
        }
    }
    let baseline = alive_tasks();
    let source = Pairs::default();
    let store = support::store::FaultStore::new();
    let switches = store.clone();
    let cache = CredentialCache::builder(source.clone())
        .window_jitter(0.0)
        .fetch_timeout(Duration::from_secs(5))
        .backoff(Duration::from_secs(1), Duration::from_secs(4))
        .store(store)
        .keep_warm(true)
        .build()
        .unwrap();
    cache.warm_up().await.unwrap();
    switches
        .faults()
        .refusing_pairs
        .store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(80)).await;
    settle().await;
    assert_eq!(source.0.load(Ordering::SeqCst), 2, "keep-warm refreshed");
    let dropped = Instant::now();
    drop(cache);
    tokio::time::sleep(Duration::from_secs(600)).await;
    settle().await;
    let since: Vec<_> = source
        .1
        .lock()
        .unwrap()
        .iter()
        .filter(|at| **at > dropped)
        .map(|at| *at - dropped)
        .collect();
    println!(
        "after drop: {since:?}, tasks {} vs {baseline}",
        alive_tasks()
    );
    assert!(since.is_empty(), "fetched after the drop: {since:?}");
    assert_eq!(alive_tasks(), baseline, "a task outlived the cache");
}
