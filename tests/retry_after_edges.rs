//! A token endpoint's `Retry-After` held however the refresh it answered ended
//! (overtaken, chained, a step-up's, one the cache stopped waiting for, with a store or
//! without), a credential handed in answering the requests that waited for a failed
//! refresh, a background claim given back on a runtime without timers; guards: one
//! fetch at a time after replace then reject, a hold past an expired handed credential,
//! a relative request's `Host` rule through the layer (reviews 96 and 97; review 96's
//! guard of a body at the replay limit is in `tests/matrix.rs`).
#![cfg(feature = "token")]

use crate::support;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use support::TestSource;
use support::retry_after::{Idp, settle};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};
use tower_client_auth::{AuthLayer, Credential, CredentialCache, ErrorKind, MemoryStore};

fn tok(c: &Credential) -> Option<String> {
    c.headers()
        .next()
        .map(|(_, v)| v.to_str().unwrap().to_string())
}

/// README (Retry-After, review 94): a chained flight that begins inside a held
/// `Retry-After` answers as one planned then would (the credential if it has not
/// expired, else `Backoff`: `FlightGuard::begin`); `CacheHandle::replace`: a credential handed in is used. World: a request
/// waits on a fetch chained behind a refresh that an invalidation overtook; meanwhile a
/// credential is handed in that is valid for 5 s more (inside its hard window); the
/// overtaken refresh is answered 503 `Retry-After: 60`. A request planned at that
/// moment gets the handed credential (still valid, backing off); the waiting request
/// must get it too, not `Backoff`.
#[tokio::test(start_paused = true)]
async fn a_credential_handed_in_answers_a_chained_fetch_held_by_retry_after() {
    let idp = Idp::default();
    let cache = CredentialCache::builder(idp.source())
        .window_jitter(0.0)
        .backoff(Duration::from_secs(1), Duration::from_secs(8))
        .build()
        .unwrap();
    cache.credential().await.unwrap();
    let gate = idp.gate();
    idp.set_failing(true);
    cache.handle().invalidate();
    let first = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.credential().await })
    };
    settle().await;
    assert_eq!(idp.requests(), 2, "the refetch is at the endpoint");
    // Overtaken: a second invalidation, and a request that now waits on a fetch
    // chained behind the running one.
    cache.handle().invalidate();
    let second = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.credential().await })
    };
    settle().await;
    // A credential handed in: valid for 5 s more.
    let handed = Credential::bearer("handed").unwrap().lives(
        SystemTime::now() - Duration::from_secs(995),
        Duration::from_secs(1000),
    );
    cache.handle().replace(handed).unwrap();
    idp.ungate();
    gate.add_permits(10);
    settle().await;
    let planned_now = cache.credential().await;
    let second = second.await.unwrap();
    let first = first.await.unwrap();
    assert_eq!(idp.requests(), 2, "no token request inside the Retry-After");
    assert_eq!(
        planned_now.as_ref().ok().and_then(tok),
        Some("Bearer handed".to_string()),
        "control: a request planned now gets the handed credential: {planned_now:?}"
    );
    assert!(
        second.is_ok(),
        "the chained fetch's waiter got {second:?} while the handed credential is valid (first waiter: {first:?})"
    );
}

/// src/cache/flight.rs, `finish` (review 94): a refresh that "gave up without asking the
/// source" (the runtime has no timers) leaves nothing backed off, and "A background
/// refresh it ended may be tried again (after one backoff step, as a superseded one's
/// is)". World: one cache used from two runtimes; a request on a runtime built without
/// timers finds the credential in its soft window and claims its background refresh,
/// which fails `NoRuntime`. Later, on a runtime with timers, requests in the soft window
/// must refresh it in the background again.
#[test]
fn a_background_refresh_that_gave_up_for_want_of_timers_may_be_tried_again() {
    let source = TestSource::expiring(Duration::from_secs(100));
    let cache = CredentialCache::builder(source.clone())
        .window_jitter(0.0)
        .backoff(Duration::from_millis(50), Duration::from_millis(100))
        .build()
        .unwrap();
    // 20 s left of 100: in the soft window (25 s), not the hard one (5 s).
    let soft = Credential::bearer("handed").unwrap().lives(
        SystemTime::now() - Duration::from_secs(80),
        Duration::from_secs(100),
    );
    cache.handle().replace(soft).unwrap();
    let timerless = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let got = timerless.block_on(async {
        let got = cache.credential().await.map(drop).map_err(|e| e.kind());
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        got
    });
    assert_eq!(got, Ok(()), "the soft-window credential is sent");
    assert_eq!(source.fetches(), 0, "the source was never asked");
    let timed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    timed.block_on(async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for _ in 0..10 {
            let _ = cache.credential().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    assert_eq!(
        source.fetches(),
        1,
        "a request in the soft window, long after one backoff step, refreshes in the background"
    );
    drop(timerless);
}

/// The cache's wall clock on Tokio's (paused) clock.
#[derive(Debug, Clone)]
struct TokioClock {
    base: SystemTime,
    start: Instant,
}

impl TokioClock {
    fn new() -> Self {
        TokioClock {
            base: SystemTime::now(),
            start: Instant::now(),
        }
    }
}

impl tower_client_auth::clock::Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.base + (Instant::now() - self.start)
    }
}

/// src/cache/mod.rs `rearm_background`: "After a failed background refresh, lets the
/// next caller in `entry`'s soft window try again once the backoff ends at `retry_at`;
/// with keep-warm, tries again itself then"; README: keep-warm's "backoff and recovery
/// with no request". World (keep-warm, no request after the setup): a refetch after an
/// invalidation is at the endpoint; a credential with 8 s left is handed in, and its
/// background refresh is claimed (chained behind the refetch); 4 s later (the handed
/// credential now in its hard window) the endpoint answers the refetch 503
/// `Retry-After: 60`. The chained background refresh begins inside the held
/// `Retry-After` and ends `Backoff`. Promise: once the 60 s are over, keep-warm tries
/// again by itself (no token request before, at least one after).
#[tokio::test(start_paused = true)]
async fn keep_warm_tries_again_after_a_retry_after_that_ended_a_chained_background_refresh() {
    keep_warm_after_a_held_chained_background_refresh(4).await;
}

/// Guard for the test above: the same, the 503 answered while the handed credential is
/// still in its soft window (it is the failed refetch's answer then, and its claim is
/// re-armed for the end of the `Retry-After`). Passes now.
#[tokio::test(start_paused = true)]
async fn keep_warm_tries_again_after_a_retry_after_answered_in_the_soft_window() {
    keep_warm_after_a_held_chained_background_refresh(0).await;
}

async fn keep_warm_after_a_held_chained_background_refresh(wait_before_503: u64) {
    let idp = Idp::default();
    let clock = TokioClock::new();
    let cache = CredentialCache::builder(idp.source())
        .window_jitter(0.0)
        .backoff(Duration::from_secs(1), Duration::from_secs(8))
        .keep_warm(true)
        .clock(clock.clone())
        .build()
        .unwrap();
    cache.warm_up().await.unwrap();
    let gate = idp.gate();
    idp.set_failing(true);
    cache.handle().invalidate();
    let first = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.credential().await.map(drop) })
    };
    settle().await;
    assert_eq!(idp.requests(), 2, "the refetch is at the endpoint");
    use tower_client_auth::clock::Clock as _;
    let handed = Credential::bearer("handed").unwrap().lives(
        clock.now() - Duration::from_secs(92),
        Duration::from_secs(100),
    );
    cache.handle().replace(handed).unwrap();
    // In its soft window (8 s left of 100; soft 25 s, hard 5 s): served, and its
    // background refresh claimed.
    let got = cache.credential().await.map(|c| tok(&c));
    assert_eq!(got.ok().flatten().as_deref(), Some("Bearer handed"));
    settle().await;
    tokio::time::sleep(Duration::from_secs(wait_before_503)).await;
    idp.ungate();
    gate.add_permits(10);
    settle().await;
    let _ = first.await;
    assert_eq!(idp.requests(), 2);
    // Idle: no request from here on.
    tokio::time::sleep(Duration::from_secs(150)).await;
    settle().await;
    // No token request within 60 s of the 503's answer (the log's second entry).
    let log = idp.log();
    let answered = log[1].1.unwrap();
    let early: Vec<_> = log[2..]
        .iter()
        .filter(|(arrived, _, _)| *arrived < answered + Duration::from_secs(60))
        .collect();
    assert!(early.is_empty(), "{early:?}\nlog: {log:?}");
    assert!(
        idp.requests() >= 3,
        "keep-warm never tried again after the Retry-After: log {:?}",
        idp.log()
    );
}

/// README: "A token endpoint's `Retry-After` (429, 503; seconds or an HTTP date) is the
/// earliest next token request"; `FlightGuard::hold_retry_after`: a `Retry-After` "is
/// the endpoint's word on every token request". World: step-up on; a request is answered 403
/// `insufficient_scope`; the step-up's token request is answered 503 `Retry-After: 60`
/// (not overtaken: an overtaken one now holds every fetch). Then the credential is
/// invalidated and asked for again within the 60 s. Promise: no token request before
/// the 60 s are over.
#[tokio::test(start_paused = true)]
async fn a_retry_after_answered_to_a_step_up_holds_the_next_token_request() {
    let idp = Idp {
        scoped: true,
        ..Idp::default()
    };
    let layer = AuthLayer::new(idp.source())
        .any_https_origin()
        .step_up(true);
    let api = tower::service_fn(
        |_req: Request<tower_client_auth::ReplayBody<Full<Bytes>>>| async move {
            Ok::<_, tower_client_auth::BoxError>(
                Response::builder()
                    .status(403)
                    .header(
                        "www-authenticate",
                        r#"Bearer error="insufficient_scope", scope="write""#,
                    )
                    .body("")
                    .unwrap(),
            )
        },
    );
    let svc = layer.clone().layer(api);
    layer.cache().warm_up().await.unwrap();
    idp.set_failing(true);
    let res = svc
        .oneshot(
            Request::get("https://api.test/v1/x")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(idp.requests(), 2, "the step-up asked and was answered 503");
    tokio::time::sleep(Duration::from_secs(5)).await;
    layer.cache().handle().invalidate();
    let got = layer
        .cache()
        .credential()
        .await
        .map(drop)
        .map_err(|e| e.kind());
    let log = idp.log();
    assert_eq!(
        idp.requests(),
        2,
        "a token request 5 s after a 503 Retry-After: 60 (the caller got {got:?}); log {log:?}"
    );
}

/// Guard (passes now): review 93's rule for a relative request's `Host`, through the
/// layer. A given origin's host and port, case aside, with its default port or that
/// port written out, gets the credential, and no `Host` at all (tonic) does too; a
/// trailing dot, another IPv4 form, another port, a port past 65535 and two `Host`
/// headers fail closed (no credential).
#[tokio::test]
async fn a_relative_requests_host_gets_the_credential_only_for_an_origin_in_scope() {
    let seen = Arc::new(Mutex::new(Vec::<Option<String>>::new()));
    let api = {
        let seen = seen.clone();
        tower::service_fn(
            move |req: Request<tower_client_auth::ReplayBody<Full<Bytes>>>| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(
                        req.headers()
                            .get("authorization")
                            .map(|v| v.to_str().unwrap().to_string()),
                    );
                    Ok::<_, tower_client_auth::BoxError>(Response::new(""))
                }
            },
        )
    };
    let layer = AuthLayer::builder(TestSource::new())
        .origin("https://api.example.com")
        .unwrap()
        .origin("http://127.0.0.1:8080")
        .unwrap()
        .origin("https://[::1]:8443")
        .unwrap()
        .allow_relative_uris(true)
        .build()
        .unwrap();
    let svc = layer.layer(api);
    let cases: &[(&[&str], bool)] = &[
        (&[], true),
        (&["api.example.com"], true),
        (&["API.Example.COM:443"], true),
        (&["api.example.com:"], true),
        (&["127.0.0.1:8080"], true),
        (&["[::1]:8443"], true),
        (&["api.example.com."], false),
        (&["api.example.com:8443"], false),
        (&["api.example.com:65979"], false),
        (&["127.0.0.1"], false),
        (&["127.1:8080"], false),
        (&["[::1]"], false),
        (&["api.example.com", "api.example.com"], false),
        (&["tenant.evil.test"], false),
    ];
    for (hosts, gets) in cases {
        let mut req = Request::get("/v1/me").body(Full::default()).unwrap();
        for host in *hosts {
            req.headers_mut().append("host", host.parse().unwrap());
        }
        let res = svc.clone().oneshot(req).await;
        assert!(res.is_ok(), "{hosts:?}: {:?}", res.err());
        let auth = seen.lock().unwrap().pop().unwrap();
        assert_eq!(auth.is_some(), *gets, "{hosts:?}: {auth:?}");
    }
}

/// src/handle.rs, `CacheHandle::replace`: "Makes `credential` the current one at once,
/// ahead of any refresh in flight: the requests waiting for that refresh get
/// `credential` too". World: a refetch after an invalidation is at the endpoint, a
/// request waits on it; a credential valid for 5 s more (in its hard window) is handed
/// in; the refetch then fails (503). Promise: the waiting request gets the handed
/// credential, not the refetch's failure (a request made at that moment gets it).
#[tokio::test(start_paused = true)]
async fn requests_waiting_for_a_refresh_get_a_credential_handed_in_meanwhile() {
    let idp = Idp::default();
    let cache = CredentialCache::builder(idp.source())
        .window_jitter(0.0)
        .build()
        .unwrap();
    cache.credential().await.unwrap();
    let gate = idp.gate();
    idp.set_failing(true);
    cache.handle().invalidate();
    let waiting = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.credential().await })
    };
    settle().await;
    assert_eq!(idp.requests(), 2, "the refetch is at the endpoint");
    let handed = Credential::bearer("handed").unwrap().lives(
        SystemTime::now() - Duration::from_secs(995),
        Duration::from_secs(1000),
    );
    cache.handle().replace(handed).unwrap();
    idp.ungate();
    gate.add_permits(10);
    settle().await;
    let waiting = waiting.await.unwrap();
    let now = cache.credential().await;
    assert_eq!(
        now.as_ref().ok().and_then(tok).as_deref(),
        Some("Bearer handed"),
        "control: {now:?}"
    );
    assert_eq!(
        waiting.as_ref().ok().and_then(tok).as_deref(),
        Some("Bearer handed"),
        "the request waiting for the refresh got {waiting:?}"
    );
}

/// README: "A source is never asked twice at once, whatever asks (expiry, a 401, ...)".
/// A refresh held at the endpoint, a credential handed in (which detaches the running
/// fetch), then that credential rejected: no second token request may go out while the
/// first is unanswered.
#[tokio::test(start_paused = true)]
async fn a_source_is_never_asked_twice_at_once_after_replace_then_reject() {
    let idp = Idp::default();
    let cache = CredentialCache::builder(idp.source())
        .window_jitter(0.0)
        .build()
        .unwrap();
    cache.credential().await.unwrap();
    let gate = idp.gate();
    cache.handle().invalidate();
    let first = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.credential().await })
    };
    settle().await;
    assert_eq!(idp.requests(), 2);
    let handed = Credential::bearer("handed")
        .unwrap()
        .lives(SystemTime::now(), Duration::from_secs(1000));
    cache.handle().replace(handed.clone()).unwrap();
    let second = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.reject(&handed).await })
    };
    settle().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    settle().await;
    let at_once = idp.requests();
    gate.add_permits(10);
    idp.ungate();
    let _ = first.await.unwrap();
    let _ = second.await.unwrap();
    assert_eq!(
        at_once, 2,
        "a second token request went out while the first was held"
    );
}

/// README/flight.rs: a `Retry-After` holds every token request, "even past a
/// credential handed over meanwhile"; a chained/planned request while held and the
/// credential expired gets `Backoff`, and the next request after the hold fetches.
#[tokio::test(start_paused = true)]
async fn a_hold_past_an_expired_handed_credential_backs_off_then_recovers() {
    let idp = Idp::default();
    let cache = CredentialCache::builder(idp.source())
        .window_jitter(0.0)
        .backoff(Duration::from_secs(1), Duration::from_secs(8))
        .build()
        .unwrap();
    cache.credential().await.unwrap();
    idp.set_failing(true);
    cache.handle().invalidate();
    assert!(cache.credential().await.is_err());
    assert_eq!(idp.requests(), 2);
    let handed = Credential::bearer("handed")
        .unwrap()
        .lives(SystemTime::now(), Duration::from_secs(10));
    cache.handle().replace(handed).unwrap();
    assert!(cache.credential().await.is_ok());
    tokio::time::sleep(Duration::from_secs(20)).await;
    let held = cache.credential().await;
    assert_eq!(
        idp.requests(),
        2,
        "a token request inside the Retry-After: {held:?}"
    );
    assert_eq!(
        held.as_ref().err().map(|e| e.kind()),
        Some(ErrorKind::Backoff),
        "{held:?}"
    );
    idp.set_failing(false);
    tokio::time::sleep(Duration::from_secs(41)).await;
    let after = cache.credential().await;
    assert!(after.is_ok(), "right after the hold: {after:?}");
    assert!(idp.violations().is_empty(), "{:?}", idp.violations());
}

/// README: "A token endpoint's `Retry-After` (429, 503 ...) is the earliest next token
/// request". World: a fetch that outlived the cache's `fetch_timeout` is answered 503
/// `Retry-After: 60` after the cache stopped waiting (with a store, its late result
/// goes to `lease::finish_late`; without, only the `TokenSource`'s own exchange task
/// reads it); the endpoint recovers at once. Proves: the next token request still waits
/// for the 60 s (review 97 saw one 10 s later, both ways).
#[tokio::test(start_paused = true)]
async fn a_retry_after_answered_to_a_fetch_the_cache_stopped_waiting_for_holds_the_next_one() {
    for with_store in [true, false] {
        let idp = Idp::default();
        let mut builder = CredentialCache::builder(idp.source())
            .window_jitter(0.0)
            .backoff(Duration::from_secs(1), Duration::from_secs(2))
            .fetch_timeout(Duration::from_secs(2));
        if with_store {
            builder = builder.store(MemoryStore::new());
        }
        let cache = builder.build().unwrap();
        cache.credential().await.unwrap();
        let gate = idp.gate();
        idp.set_failing(true);
        cache.handle().invalidate();
        let timed_out = cache.credential().await;
        assert!(timed_out.is_err(), "{timed_out:?}");
        // The late fetch is answered now: 503 Retry-After: 60.
        gate.add_permits(10);
        idp.ungate();
        settle().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        settle().await;
        idp.set_failing(false);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let next = cache.credential().await;
        assert!(
            idp.violations().is_empty(),
            "with a store: {with_store}: {:?} (log {:?}, next {next:?})",
            idp.violations(),
            idp.log()
        );
    }
}
