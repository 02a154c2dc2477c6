//! The layer without replay (`AuthLayer::without_replay`, `Direct` mode), in the shape of
//! tower-http's `AddAuthorization`: the inner service gets `Request<B>` unchanged and is
//! not `Clone`; the credential is readied in `poll_ready`. Every test here drives an inner
//! service that is neither `Clone` nor typed for `ReplayBody`.

use crate::support;

use std::{
    convert::Infallible,
    future::{Ready, ready},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use support::TestSource;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_client_auth::{
    AuthLayer, BoxError, Credential, Error, ErrorKind, NotReplayed, StaticCredential,
    clock::ManualClock, source_fn,
};

/// What the API saw: the `Authorization` of every request, and how often it was polled
/// ready.
#[derive(Clone, Default)]
struct Seen {
    authorizations: Arc<Mutex<Vec<Option<String>>>>,
    readied: Arc<AtomicUsize>,
}

impl Seen {
    fn authorizations(&self) -> Vec<Option<String>> {
        self.authorizations.lock().unwrap().clone()
    }

    fn readied(&self) -> usize {
        self.readied.load(Ordering::SeqCst)
    }
}

/// An API client as a user has it: typed for the caller's own body, and not `Clone`.
/// Answers 401 to the tokens in `rejects`.
struct Api {
    seen: Seen,
    rejects: &'static [&'static str],
}

impl Api {
    fn new(seen: &Seen) -> Self {
        Api {
            seen: seen.clone(),
            rejects: &[],
        }
    }
}

impl Service<Request<Full<Bytes>>> for Api {
    type Response = Response<()>;
    type Error = Infallible;
    type Future = Ready<Result<Response<()>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.seen.readied.fetch_add(1, Ordering::SeqCst);
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let auth = req
            .headers()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned());
        let rejected = auth.as_deref().is_some_and(|a| self.rejects.contains(&a));
        self.seen.authorizations.lock().unwrap().push(auth);
        let status = if rejected {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::OK
        };
        ready(Ok(Response::builder().status(status).body(()).unwrap()))
    }
}

const API: &str = "https://api.example.com";

fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::default()).unwrap()
}

/// The layer without replay over `source`, sending its credential to [`API`].
fn direct<P: tower_client_auth::CredentialSource + Clone>(
    source: &P,
) -> AuthLayer<P, tower_client_auth::Direct> {
    AuthLayer::new(source.clone())
        .origin(API)
        .unwrap()
        .without_replay()
}

/// Polls `ready` once: it must wait (for the first fetch).
async fn waits<F: std::future::Future>(ready: std::pin::Pin<&mut F>) {
    let polled = futures_util::future::poll_immediate(ready).await;
    assert!(polled.is_none(), "ready without a credential");
}

fn kind(err: BoxError) -> ErrorKind {
    err.downcast_ref::<Error>()
        .unwrap_or_else(|| panic!("not the crate's error: {err}"))
        .kind()
}

/// World: a static credential and a refreshing source, each in a `ServiceBuilder` stack
/// with a concurrency limit, over a service that is not `Clone` and takes
/// `Request<Full<Bytes>>`, where `AddAuthorization` would go. Proves: it compiles and the
/// credential arrives, unchanged in type.
#[tokio::test]
async fn a_service_that_is_not_clone_gets_the_callers_request_with_the_credential() {
    let seen = Seen::default();
    let mut svc = ServiceBuilder::new()
        .concurrency_limit(4)
        .layer(
            AuthLayer::new(StaticCredential::bearer("pat_123").unwrap())
                .origin(API)
                .unwrap()
                .without_replay(),
        )
        .service(Api::new(&seen));
    let res = svc.ready().await.unwrap().call(get(API)).await.unwrap();
    assert_eq!(res.status(), 200);

    let built = AuthLayer::builder(TestSource::new())
        .origin(API)
        .unwrap()
        .without_replay()
        .build()
        .unwrap();
    let res = built
        .layer(Api::new(&seen))
        .oneshot(get(API))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        seen.authorizations(),
        [Some("Bearer pat_123".into()), Some("Bearer token-1".into())]
    );
}

/// World: five services over one cache with no credential yet, polled ready at once,
/// the source held until the test releases it. Proves: one fetch for all, and no inner
/// service is polled ready (a permit, a pooled connection taken) while the credential is
/// fetched; each then sends the one credential.
#[tokio::test]
async fn poll_ready_waits_for_the_one_refresh_before_readying_the_inner_service() {
    let source = TestSource::gated(None);
    let layer = direct(&source);
    let seen = Seen::default();
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let mut svc = layer.layer(Api::new(&seen));
        tasks.push(tokio::spawn(async move {
            svc.ready().await.unwrap().call(get(API)).await.unwrap()
        }));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(source.fetches(), 1);
    assert_eq!(
        seen.readied(),
        0,
        "an inner service was readied during the fetch"
    );
    source.release(1);
    for task in tasks {
        assert_eq!(task.await.unwrap().status(), 200);
    }
    assert_eq!(source.fetches(), 1);
    assert_eq!(seen.readied(), 5);
    assert_eq!(
        seen.authorizations(),
        vec![Some("Bearer token-1".into()); 5]
    );
}

/// World: ten requests carrying `token-1` answered 401 at once. Proves: each comes back
/// as it was (no replay, marked `OptedOut`), the burst costs one refresh, and the next
/// request carries `token-2`.
#[tokio::test]
async fn a_burst_of_rejections_costs_one_refresh_and_no_replay() {
    let source = TestSource::new();
    let layer = direct(&source);
    layer.cache().credential().await.unwrap();
    let seen = Seen::default();
    let mut futures = Vec::new();
    for _ in 0..10 {
        let mut svc = layer.layer(Api {
            seen: seen.clone(),
            rejects: &["Bearer token-1"],
        });
        svc.ready().await.unwrap();
        futures.push(svc.call(get(API)));
    }
    for res in futures_util::future::join_all(futures).await {
        let res = res.unwrap();
        assert_eq!(res.status(), 401);
        assert_eq!(
            res.extensions().get::<NotReplayed>(),
            Some(&NotReplayed::OptedOut)
        );
    }
    let res = layer
        .layer(Api::new(&seen))
        .oneshot(get(API))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(source.fetches(), 2);
    let sent = seen.authorizations();
    assert_eq!(sent.len(), 11, "a request was replayed");
    assert_eq!(sent[10].as_deref(), Some("Bearer token-2"));
}

/// World: a source that fails. Proves: `poll_ready` still readies the service (the
/// failure is not its to report), a request to the credential's origin fails with the
/// fetch error and is not sent, and a request to another origin goes out without a
/// credential.
#[tokio::test]
async fn a_failed_refresh_fails_only_requests_for_the_credentials_origin() {
    let source = TestSource::new();
    source.set_failing(true);
    let seen = Seen::default();
    let mut svc = direct(&source).layer(Api::new(&seen));
    let err = svc.ready().await.unwrap().call(get(API)).await.unwrap_err();
    assert_eq!(kind(err), ErrorKind::Fetch);
    assert!(seen.authorizations().is_empty(), "a request went out");
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(get("https://elsewhere.example/x"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(seen.authorizations(), [None]);
}

/// World: a credential valid for 60 s; a service polled ready, then called after a
/// long hold (tokio's clock and the wall clock the test drives move together). Proves:
/// into its windows the readied credential is still sent (it has not expired) and the
/// refresh starts; past its expiry nothing is sent and the call fails `NotReady`; polled
/// ready again, the service waits for the new credential and sends it.
#[tokio::test(start_paused = true)]
async fn a_service_held_ready_past_expiry_sends_nothing() {
    let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
    let fetches = Arc::new(AtomicUsize::new(0));
    let source = clocked_source(&clock, &fetches);
    let layer = AuthLayer::builder(source)
        .clock(clock.clone())
        .window_jitter(0.0)
        .origin(API)
        .unwrap()
        .without_replay()
        .build()
        .unwrap();
    let seen = Seen::default();
    let mut svc = layer.layer(Api::new(&seen));
    // A hold: both clocks move, and the runtime runs what came due meanwhile.
    let hold = |by: Duration| {
        clock.advance(by);
        async move {
            tokio::time::advance(by).await;
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        }
    };

    svc.ready().await.unwrap();
    hold(Duration::from_secs(58)).await;
    let res = svc.call(get(API)).await.unwrap();
    assert_eq!(
        res.status(),
        200,
        "a credential in its hard window was refused"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(fetches.load(Ordering::SeqCst), 2, "no refresh started");

    svc.ready().await.unwrap();
    hold(Duration::from_secs(61)).await;
    let err = svc.call(get(API)).await.unwrap_err();
    assert_eq!(kind(err), ErrorKind::NotReady);
    assert_eq!(
        seen.authorizations(),
        [Some("Bearer t1".into())],
        "an expired credential was sent"
    );

    svc.ready().await.unwrap();
    svc.call(get(API)).await.unwrap();
    assert_eq!(
        seen.authorizations().last().unwrap().as_deref(),
        Some("Bearer t3")
    );
}

/// World: services readied with `token-1` (one by the view, one after waiting for the
/// first fetch), then the credential dropped before their `call`: by `invalidate_if`,
/// by `reject`, by `replace`. Proves: no call sends the dropped credential; each sends
/// the one current by then, or fails `NotReady` and sends nothing when none is (a
/// service held ready, as a balancer's `ReadyCache` holds one, must not keep a
/// credential the application dropped).
#[tokio::test]
async fn a_credential_dropped_while_a_service_is_held_ready_is_not_sent() {
    let source = TestSource::new();
    let layer = direct(&source);
    let cache = layer.cache().clone();
    let seen = Seen::default();

    // Readied after waiting for the first fetch (`Waited`), then invalidated.
    let mut waited = layer.layer(Api::new(&seen));
    waited.ready().await.unwrap();
    let first = cache.credential().await.unwrap();
    assert!(cache.handle().invalidate_if(&first));
    let res = waited.call(get(API)).await;
    assert!(
        res.as_ref().is_ok_and(|r| r.status() == 200)
            || res.is_err_and(|e| kind(e) == ErrorKind::NotReady),
        "neither sent with a credential nor refused"
    );

    // Readied from the view, then rejected.
    let second = cache.credential().await.unwrap();
    let mut viewed = layer.layer(Api::new(&seen));
    viewed.ready().await.unwrap();
    let third = cache.reject(&second).await.unwrap();
    viewed.call(get(API)).await.unwrap();

    // Readied from the view, then replaced by hand.
    let mut replaced = layer.layer(Api::new(&seen));
    replaced.ready().await.unwrap();
    assert!(
        cache
            .handle()
            .replace(Credential::bearer("by-hand").unwrap())
            .unwrap()
    );
    replaced.call(get(API)).await.unwrap();

    // The first call either sent nothing or a credential other than `token-1`.
    let sent = seen.authorizations();
    let expected = [Some("Bearer token-3".into()), Some("Bearer by-hand".into())];
    assert!(
        !sent.contains(&Some("Bearer token-1".into())) && sent.ends_with(&expected),
        "a dropped credential was sent, or not the current one: {sent:?}"
    );
    assert!(!sent.contains(&Some("Bearer token-2".into())), "{sent:?}");
    drop((first, second, third));
}

/// World: a service waiting in `poll_ready` for the first fetch, which an invalidation
/// makes suspect while it runs (its credential, `token-1`, goes to its own waiters only),
/// then, or not, `token-1` dropped by name before the service's `call`. Proves: the
/// waiter sends it when nothing dropped it since (it asked before the invalidation);
/// dropped by name, the call does not send it (it fails `NotReady`, sending nothing, as
/// nothing else may go without a wait).
#[tokio::test]
async fn a_fetched_credential_dropped_before_the_call_that_waited_for_it_is_not_sent() {
    for drop_by_name in [false, true] {
        let source = TestSource::gated(None);
        let layer = direct(&source);
        let cache = layer.cache().clone();
        let seen = Seen::default();
        let mut svc = layer.layer(Api::new(&seen));
        {
            let mut ready = std::pin::pin!(svc.ready());
            waits(ready.as_mut()).await;
            tokio::task::yield_now().await;
            cache.handle().invalidate();
            source.release(1);
            ready.await.unwrap();
        }
        if drop_by_name {
            cache
                .handle()
                .invalidate_if(&Credential::bearer("token-1").unwrap());
            let res = svc.call(get(API)).await;
            assert!(
                res.is_err_and(|e| kind(e) == ErrorKind::NotReady),
                "not refused"
            );
            assert_eq!(seen.authorizations(), [], "sent after it was dropped");
        } else {
            svc.call(get(API)).await.unwrap();
            assert_eq!(seen.authorizations(), [Some("Bearer token-1".into())]);
        }
    }
}

/// World: a service waiting in `poll_ready` for the first fetch, which a stale
/// replacement makes suspect (its credential `k` goes to its own waiters only); the
/// replacement's refresh gets `k` back from the source, current now under another
/// generation, and the application drops `k` by name before the service's `call`.
/// Proves (review finding): the call does not send `k`: a drop by name reaches every
/// generation of the value, the waiter's too.
#[tokio::test]
async fn a_value_dropped_by_name_is_dropped_under_every_generation() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let fetches = Arc::new(AtomicUsize::new(0));
    let source = source_fn({
        let (gate, fetches) = (gate.clone(), fetches.clone());
        move |_| {
            let first = fetches.fetch_add(1, Ordering::SeqCst) == 0;
            let gate = gate.clone();
            async move {
                if first {
                    gate.acquire().await.unwrap().forget();
                }
                Ok::<_, BoxError>(Credential::bearer("k")?.expires_in(Duration::from_secs(3600)))
            }
        }
    });
    let layer = direct(&source);
    let cache = layer.cache().clone();
    let seen = Seen::default();
    let mut svc = layer.layer(Api::new(&seen));
    {
        let mut ready = std::pin::pin!(svc.ready());
        waits(ready.as_mut()).await;
        tokio::task::yield_now().await;
        // A replacement already in its hard window: the next request refreshes it.
        let stale = Credential::bearer("x").unwrap().lives(
            SystemTime::now() - Duration::from_secs(3590),
            Duration::from_secs(3600),
        );
        assert!(cache.handle().replace(stale).unwrap());
        gate.add_permits(1);
        ready.await.unwrap();
    }
    let k = Credential::bearer("k").unwrap();
    let current = cache.credential().await.unwrap();
    assert_eq!(current.headers().next().unwrap().1, "Bearer k");
    assert!(cache.handle().invalidate_if(&current));
    let res = svc.call(get(API)).await;
    assert!(
        res.is_err_and(|e| kind(e) == ErrorKind::NotReady),
        "not refused"
    );
    assert_eq!(
        seen.authorizations(),
        [],
        "{k:?} was sent after it was dropped"
    );
}

/// World: `call` without `poll_ready` (a breach of the `Service` contract). Proves: with
/// a usable credential cached it is sent; with none the call fails `NotReady` and sends
/// nothing, rather than sending the request without its credential.
#[tokio::test]
async fn a_call_without_poll_ready_never_goes_out_without_its_credential() {
    let source = TestSource::new();
    let layer = direct(&source);
    let seen = Seen::default();
    let err = layer
        .layer(Api::new(&seen))
        .call(get(API))
        .await
        .unwrap_err();
    assert_eq!(kind(err), ErrorKind::NotReady);
    assert!(seen.authorizations().is_empty());
    layer.cache().credential().await.unwrap();
    let res = layer.layer(Api::new(&seen)).call(get(API)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(seen.authorizations(), [Some("Bearer token-1".into())]);
}

/// World: a layer without replay given no origin. Proves: it fails closed as the
/// replaying layer does (`NoOrigin`), never asks its source, and sends nothing.
#[tokio::test]
async fn a_layer_given_no_origin_fetches_nothing_and_sends_nothing() {
    let source = TestSource::new();
    let seen = Seen::default();
    let svc = AuthLayer::new(source.clone())
        .without_replay()
        .layer(Api::new(&seen));
    let err = svc.oneshot(get(API)).await.unwrap_err();
    assert_eq!(kind(err), ErrorKind::NoOrigin);
    assert_eq!(source.fetches(), 0);
    assert!(seen.authorizations().is_empty());
}

/// World: the service and its futures inside a spawned task. Proves: `Direct` mode is
/// `Send` as the replaying layer is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_without_replay_runs_in_a_spawned_task() {
    let seen = Seen::default();
    let svc = AuthLayer::new(TestSource::new())
        .origin(API)
        .unwrap()
        .without_replay()
        .layer(Api::new(&seen));
    let status = tokio::spawn(async move { svc.oneshot(get(API)).await.map(|r| r.status()) })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
}

/// An API that answers by path: `/scope` a 403 naming a missing scope, `/error` a 500,
/// anything else a 200.
struct Statuses(Seen);

impl Service<Request<Full<Bytes>>> for Statuses {
    type Response = Response<()>;
    type Error = Infallible;
    type Future = Ready<Result<Response<()>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> Self::Future {
        let auth = req.headers().get("authorization");
        let auth = auth.map(|v| v.to_str().unwrap().to_owned());
        self.0.authorizations.lock().unwrap().push(auth);
        let res = match req.uri().path() {
            "/scope" => Response::builder().status(StatusCode::FORBIDDEN).header(
                "www-authenticate",
                r#"Bearer error="insufficient_scope", scope="write""#,
            ),
            "/error" => Response::builder().status(StatusCode::INTERNAL_SERVER_ERROR),
            _ => Response::builder().status(StatusCode::OK),
        };
        ready(Ok(res.body(()).unwrap()))
    }
}

/// World: `Direct` answers that are neither accepted at once nor a rejection: a 403 with
/// `insufficient_scope`, and a 500. Proves: the 403 comes back marked with the missing
/// scope and `NotReplayed::InsufficientScope`, the 500 unmarked; neither costs a token
/// request, and the credential stays in use.
#[tokio::test]
async fn answers_that_are_not_rejections_are_marked_and_cost_no_token_request() {
    use tower_client_auth::rejection::InsufficientScope;
    let source = TestSource::new();
    let layer = direct(&source);
    let seen = Seen::default();
    let send = |path: &str| {
        layer
            .layer(Statuses(seen.clone()))
            .oneshot(get(&format!("{API}{path}")))
    };
    let res = send("/scope").await.unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(
        res.extensions().get::<NotReplayed>(),
        Some(&NotReplayed::InsufficientScope)
    );
    assert_eq!(
        res.extensions()
            .get::<InsufficientScope>()
            .and_then(|s| s.scope.clone())
            .as_deref(),
        Some("write")
    );
    let res = send("/error").await.unwrap();
    assert_eq!(res.status(), 500);
    assert_eq!(res.extensions().get::<NotReplayed>(), None);
    assert_eq!(send("/ok").await.unwrap().status(), 200);
    assert_eq!(source.fetches(), 1, "no answer here asked for a new token");
    let token = Some("Bearer token-1".to_owned());
    assert_eq!(
        seen.authorizations(),
        vec![token.clone(), token.clone(), token]
    );
}

/// World: a service held ready (a balancer's ready set) while the machine sleeps past
/// its credential's expiry: the wall clock jumps an hour, the monotonic clock and every
/// timer stand still. Proves: `call` does not send the expired credential (README: a
/// service held ready never sends a credential expired since `poll_ready`).
#[tokio::test(start_paused = true)]
async fn a_service_held_ready_through_a_suspend_sends_no_expired_credential() {
    let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
    let source = clocked_source(&clock, &Arc::default());
    let layer = AuthLayer::builder(source)
        .clock(clock.clone())
        .origin(API)
        .unwrap()
        .without_replay()
        .build()
        .unwrap();
    let seen = Seen::default();
    let mut svc = layer.layer(Api::new(&seen));
    svc.ready().await.unwrap();
    clock.advance(Duration::from_secs(3600));
    let _ = svc.call(get(API)).await;
    assert!(
        !seen.authorizations().contains(&Some("Bearer t1".into())),
        "a credential expired an hour ago was sent: {:?}",
        seen.authorizations()
    );
    // The next request, readied after the suspend, waits for a new credential.
    svc.ready().await.unwrap();
    svc.call(get(API)).await.unwrap();
    assert_eq!(
        seen.authorizations().last(),
        Some(&Some("Bearer t2".into()))
    );
}

/// A source of `t1`, `t2`, ... (counted in `fetches`), each issued now on `clock` for 60 s.
fn clocked_source(
    clock: &ManualClock,
    fetches: &Arc<AtomicUsize>,
) -> impl tower_client_auth::CredentialSource {
    let (clock, fetches) = (clock.clone(), fetches.clone());
    source_fn(move |_| {
        let n = fetches.fetch_add(1, Ordering::SeqCst) + 1;
        let now = tower_client_auth::clock::Clock::now(&clock);
        async move {
            Ok::<_, BoxError>(
                Credential::bearer(format!("t{n}"))?
                    .issued_at(now)
                    .expires_at(now + Duration::from_secs(60)),
            )
        }
    })
}
