//! A refresh task on a runtime that is not driven (a current-thread runtime between two
//! `block_on` calls): a waiter on another runtime abandons a flight whose task never
//! began, and stops waiting for one that began and stalled (src/cache/flight.rs:
//! `FlightRun`, `Watch`, `Acquire::poll`). Reviews 113 and 114.

use crate::support::{self, TestSource};

use std::{
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering::SeqCst},
        mpsc,
    },
    time::Duration,
};

use tower_client_auth::{
    BoxError, Credential, CredentialCache, ErrorKind, FetchContext, FetchReason, RefreshMode,
    store::MemoryStore,
};

/// A current-thread runtime on its own thread that polls `make()`'s future once (its
/// refresh task is spawned and never polled), then is left undriven. On `go`, it is
/// driven again: the kept future is awaited (bounded) and its result sent back.
struct Idle<T> {
    go: mpsc::Sender<()>,
    done: mpsc::Receiver<Option<T>>,
}

fn idle<T, F>(make: impl FnOnce() -> F + Send + 'static) -> Idle<T>
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel();
    let (polled_tx, polled_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut fut = {
            let _inside = runtime.enter();
            Box::pin(make())
        };
        runtime.block_on(async {
            use futures_util::FutureExt;
            assert!((&mut fut).now_or_never().is_none(), "answered at once");
        });
        polled_tx.send(()).unwrap();
        if go_rx.recv().is_err() {
            return;
        }
        let out = runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(2), fut).await.ok() });
        let _ = done_tx.send(out);
        drop(runtime);
    });
    polled_rx.recv().unwrap();
    Idle {
        go: go_tx,
        done: done_rx,
    }
}

impl<T> Idle<T> {
    /// Drives the runtime again; `None` if the kept future did not end within 2 s.
    fn drive(self) -> Option<T> {
        self.go.send(()).unwrap();
        self.done
            .recv_timeout(Duration::from_secs(5))
            .expect("idle thread")
    }
}

/// A current-thread runtime, on a thread of its own, that runs `start` once, then is kept
/// and not driven: the runtime a blocking wrapper leaves between two calls.
fn left_undriven(
    start: impl FnOnce(&tokio::runtime::Runtime) + Send + 'static,
) -> tokio::runtime::Runtime {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        start(&runtime);
        runtime
    })
    .join()
    .unwrap()
}

/// Drives `runtime` again for `ms` milliseconds, on a thread of its own (a runtime can
/// be neither driven nor dropped inside another).
fn drive_for(runtime: tokio::runtime::Runtime, ms: u64) -> tokio::runtime::Runtime {
    std::thread::spawn(move || {
        runtime.block_on(async { tokio::time::sleep(Duration::from_millis(ms)).await });
        runtime
    })
    .join()
    .unwrap()
}

/// Drops `runtime` off the async context.
fn drop_off(runtime: tokio::runtime::Runtime) {
    std::thread::spawn(move || drop(runtime)).join().unwrap();
}

/// A runtime [`left_undriven`] once a refresh has begun on it (its source asked) and its
/// caller gave up: the refresh stalls mid-fetch.
fn stalled_mid_fetch<S: tower_client_auth::CredentialSource>(
    cache: &CredentialCache<S>,
) -> tokio::runtime::Runtime {
    let cache = cache.clone();
    left_undriven(move |runtime| {
        runtime.block_on(async {
            let gave_up = tokio::time::timeout(Duration::from_millis(50), cache.credential());
            assert!(gave_up.await.is_err());
        });
    })
}

/// World: a request on a current-thread runtime plans a refresh, is polled once and kept
/// (a blocking wrapper that awaits it again in a later `block_on`); a request on another
/// runtime abandons the flight and refreshes. Proves: the kept request, when
/// its runtime runs again, gets a credential, not `Cancelled`: a fresh one is cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_kept_on_the_idle_runtime_gets_the_credential_after_abandonment() {
    let source = TestSource::new();
    let cache = CredentialCache::builder(source.clone())
        .fetch_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let kept = idle({
        let cache = cache.clone();
        move || async move { cache.credential().await.map_err(|e| e.kind()) }
    });
    let answer = tokio::time::timeout(Duration::from_secs(3), cache.credential()).await;
    assert!(answer.expect("the waiter hung").is_ok());
    let kept = tokio::task::spawn_blocking(move || kept.drive())
        .await
        .unwrap();
    assert_eq!(source.fetches(), 1);
    assert!(
        matches!(kept, Some(Ok(_))),
        "the request kept on the idle runtime: {kept:?}"
    );
}

/// World: a refresh task spawned on a current-thread runtime that is not driven, and
/// then dropped (shutting down: the task is dropped before it ever ran, which the
/// guard reports as `SpawnRefused`); a request on another runtime waits for it (within
/// the fetch timeout, so nothing abandons it). Proves: that waiter gets
/// `SpawnRefused`, as the flight's own waiters do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_dropped_unrun_by_its_runtime_gives_spawn_refused_to_another_runtimes_waiter() {
    let source = TestSource::new();
    let cache = CredentialCache::builder(source.clone())
        .fetch_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let (go, go_rx) = mpsc::channel::<()>();
    let (polled_tx, polled_rx) = mpsc::channel();
    let thread = std::thread::spawn({
        let cache = cache.clone();
        move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                use futures_util::FutureExt;
                assert!(cache.credential().now_or_never().is_none());
            });
            polled_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            drop(runtime); // drops the task it never ran
        }
    });
    polled_rx.recv().unwrap();
    let waiter = tokio::spawn({
        let cache = cache.clone();
        async move { cache.credential().await.map_err(|e| e.kind()) }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    go.send(()).unwrap();
    thread.join().unwrap();
    let got = tokio::time::timeout(Duration::from_secs(3), waiter)
        .await
        .expect("the waiter hung")
        .unwrap();
    assert_eq!(source.fetches(), 0);
    assert_eq!(
        got.map(|_| ()),
        Err(ErrorKind::SpawnRefused),
        "the waiter on another runtime"
    );
}

/// What each fetch was told: its reason, and `previous` as its `Debug` shows it.
type Tellings = Arc<Mutex<Vec<(FetchReason, Option<String>)>>>;

/// A source that records each fetch's reason and `previous`; `hard`: every credential
/// it issues is in its hard window (10 s left of an hour).
#[derive(Clone, Default)]
struct Told {
    log: Tellings,
    n: Arc<AtomicUsize>,
    hard: bool,
}

impl Told {
    fn hard() -> Self {
        Told {
            hard: true,
            ..Told::default()
        }
    }
}

impl tower_client_auth::CredentialSource for Told {
    async fn fetch(&self, cx: FetchContext) -> Result<Credential, BoxError> {
        let n = self.n.fetch_add(1, SeqCst) + 1;
        let previous = cx.previous().map(|c| format!("{c:?}"));
        self.log.lock().unwrap().push((cx.reason(), previous));
        let credential = Credential::bearer(format!("token-{n}"))?;
        Ok(match self.hard {
            true => credential.lives(
                std::time::SystemTime::now() - Duration::from_secs(3590),
                Duration::from_secs(3600),
            ),
            false => credential,
        })
    }
}

/// World: a credential is cached; a request on a current-thread runtime invalidates it
/// and plans the refresh, then its runtime is not driven; a request on another runtime
/// abandons that flight and refreshes. Proves: the refresh that runs is told
/// it follows an invalidation, with the credential dropped as `previous` (README: what
/// a source holding its last credential must not hand back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refresh_after_an_abandoned_flight_is_told_of_the_invalidation() {
    let source = Told::default();
    let cache = CredentialCache::builder(source.clone())
        .fetch_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    cache.credential().await.unwrap();
    let _kept = idle({
        let cache = cache.clone();
        move || {
            assert!(cache.handle().invalidate());
            async move { cache.credential().await.map_err(|e| e.kind()) }
        }
    });
    let answer = tokio::time::timeout(Duration::from_secs(3), cache.credential()).await;
    assert!(answer.expect("the waiter hung").is_ok());
    let log = source.log.lock().unwrap().clone();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[1].0, FetchReason::Invalidated, "{log:?}");
    assert!(
        log[1].1.is_some(),
        "not told the dropped credential: {log:?}"
    );
}

/// World: a flight on an undriven runtime; a waiter polled outside any runtime (a
/// minimal executor on a plain thread) is the only one waiting. Proves: it does not
/// wait for ever: a thread wakes it at the flight's due time, it abandons the flight,
/// and, with no runtime to start a refresh on, fails with `NoRuntime`.
#[test]
fn a_waiter_outside_any_runtime_does_not_hang_on_an_abandoned_flight() {
    let source = TestSource::new();
    let cache = CredentialCache::builder(source.clone())
        .fetch_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let _kept = idle({
        let cache = cache.clone();
        move || async move { cache.credential().await.map_err(|e| e.kind()) }
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn({
        let cache = cache.clone();
        move || {
            let _ = tx.send(support::block_on(cache.credential()).map_err(|e| e.kind()));
        }
    });
    let got = rx.recv_timeout(Duration::from_secs(3));
    let got = got.expect("the waiter outside a runtime hung 3 s (15 fetch timeouts)");
    // It abandons the flight, and can start none: no runtime here.
    assert_eq!(got.map(drop), Err(ErrorKind::NoRuntime));
    assert_eq!(source.fetches(), 0);
}

/// World: many rounds of a flight planned on an idle runtime, two waiters on two other
/// runtimes, and the idle runtime driven again at about the fetch timeout (abandonment
/// racing the task's begin), with and without a store. Proves: never two
/// fetches at once, every waiter answered, stats().fetches equal to the source's calls.
#[test]
fn abandonment_racing_the_task_beginning_never_fetches_twice_at_once() {
    for round in 0..40u64 {
        let source = TestSource::build(
            None,
            Duration::from_millis(30),
            false,
            RefreshMode::Proactive,
        );
        let builder =
            CredentialCache::builder(source.clone()).fetch_timeout(Duration::from_millis(60));
        let cache = if round % 2 == 0 {
            builder.store(MemoryStore::new()).build().unwrap()
        } else {
            builder.build().unwrap()
        };
        let kept = idle({
            let cache = cache.clone();
            move || async move { cache.credential().await.map_err(|e| e.kind()) }
        });
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let cache = cache.clone();
                std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    runtime.block_on(async {
                        tokio::time::timeout(Duration::from_secs(3), cache.credential())
                            .await
                            .map(|r| r.map(drop).map_err(|e| e.kind()))
                    })
                })
            })
            .collect();
        // Around the fetch timeout: the task's begin races the waiters' abandon.
        std::thread::sleep(Duration::from_micros(55_000 + (round % 10) * 1_000));
        let kept_answer = kept.drive();
        for w in waiters {
            let got = w.join().unwrap();
            assert!(got.is_ok(), "round {round}: a waiter hung");
            assert!(got.unwrap().is_ok(), "round {round}: a waiter failed");
        }
        assert!(
            kept_answer.is_some(),
            "round {round}: the kept request hung"
        );
        assert_eq!(
            source.max_in_flight(),
            1,
            "round {round}: two fetches at once"
        );
        assert_eq!(
            cache.stats().fetches as usize,
            source.fetches(),
            "round {round}: stats().fetches against the source's calls"
        );
        assert_eq!(cache.stats().fetch_failures, 0, "round {round}");
    }
}

/// World: a fetch running on a driven runtime; an invalidation; the flight chained after
/// it planned on an idle runtime; waiters on two other runtimes join the chained one and
/// abandon it; the idle runtime is then driven. Proves: never two fetches at
/// once, every waiter answered, the abandoned task does nothing, counts agree.
#[test]
fn an_abandoned_chained_flight_keeps_fetches_one_at_a_time() {
    let source = TestSource::build(
        None,
        Duration::from_millis(150),
        false,
        RefreshMode::Proactive,
    );
    let cache = CredentialCache::builder(source.clone())
        .fetch_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let driven = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let first = driven.spawn({
        let cache = cache.clone();
        async move { cache.credential().await.map(drop).map_err(|e| e.kind()) }
    });
    while source.fetches() == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(cache.handle().invalidate());
    let kept = idle({
        let cache = cache.clone();
        move || async move { cache.credential().await.map(drop).map_err(|e| e.kind()) }
    });
    let waiters: Vec<_> = (0..2)
        .map(|_| {
            let cache = cache.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    tokio::time::timeout(Duration::from_secs(3), cache.credential())
                        .await
                        .map(|r| r.map(drop).map_err(|e| e.kind()))
                })
            })
        })
        .collect();
    for w in waiters {
        let got = w.join().unwrap();
        assert_eq!(got, Ok(Ok(())), "a waiter on another runtime");
    }
    assert_eq!(
        driven.block_on(first).unwrap(),
        Ok(()),
        "the suspect fetch's own request"
    );
    let before = (source.fetches(), cache.stats());
    let _ = kept.drive();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(source.max_in_flight(), 1, "two fetches at once");
    assert_eq!(source.fetches(), before.0, "the abandoned task fetched");
    assert_eq!(cache.stats().fetch_failures, before.1.fetch_failures);
    assert_eq!(cache.stats().fetches as usize, source.fetches());
}

/// World: a request on a current-thread runtime starts the refresh, and that runtime
/// stops being driven before the refresh task runs (its `block_on` gave up on the
/// request: a sync wrapper's per-call timeout, say), though it is not dropped; a request
/// on another, running runtime joins that flight (review 113). Proves: no waiter waits
/// for ever for a task nothing polls: past the fetch timeout the waiter abandons the
/// flight that never began and refreshes on its own runtime, with one fetch, and the
/// abandoned task, when its runtime is driven again, fetches nothing. Before, the
/// request hung past any fetch timeout.
#[tokio::test]
async fn a_flight_left_on_an_undriven_runtime_leaves_no_waiter_hanging() {
    let fetches = Arc::new(AtomicUsize::new(0));
    let source = tower_client_auth::source_fn({
        let fetches = fetches.clone();
        move |_cx: FetchContext| {
            fetches.fetch_add(1, SeqCst);
            async { Ok::<_, BoxError>(Credential::bearer("t").unwrap()) }
        }
    });
    let cache = CredentialCache::builder(source)
        .fetch_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let idle = left_undriven({
        let cache = cache.clone();
        move |runtime| {
            runtime.block_on(async {
                // Polled once (the refresh is planned and its task spawned), then given up.
                use futures_util::FutureExt;
                assert!(cache.credential().now_or_never().is_none());
            });
        }
    });
    let answer = tokio::time::timeout(Duration::from_secs(3), cache.credential()).await;
    let fetched = fetches.load(SeqCst);
    assert!(
        answer.is_ok(),
        "a request waited 3 s (six fetch timeouts) for a refresh nothing drives; \
         fetches: {fetched}"
    );
    assert!(answer.unwrap().is_ok());
    assert_eq!(fetched, 1);
    // The stalled runtime driven again: its task finds its flight abandoned.
    drop_off(drive_for(idle, 50));
    assert_eq!(
        fetches.load(SeqCst),
        1,
        "the abandoned task fetched when it ran"
    );
    assert_eq!(cache.stats().fetches, 1);
}

/// World: a refresh begins on a current-thread runtime (the source is asked, and waits
/// on that runtime's timer), and that runtime stops being driven mid-fetch; a request
/// on another runtime joins the refresh. Proves: the waiter stops waiting once the
/// refresh is overdue (longer than it could take on a driven runtime) with `Timeout`,
/// rather than hanging; no second token request starts while the first may be under
/// way (never two at once); and once the stalled runtime runs again, requests get a
/// credential.
#[tokio::test]
async fn a_refresh_stalled_mid_fetch_with_its_runtime_bounds_its_waiters() {
    let fetches = Arc::new(AtomicUsize::new(0));
    let source = tower_client_auth::source_fn({
        let fetches = fetches.clone();
        move |_cx: FetchContext| {
            fetches.fetch_add(1, SeqCst);
            async {
                // On the runtime that runs the refresh: it ends only while driven.
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok::<_, BoxError>(Credential::bearer("t").unwrap())
            }
        }
    });
    let cache = CredentialCache::builder(source)
        .fetch_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let idle = stalled_mid_fetch(&cache);
    assert_eq!(fetches.load(SeqCst), 1);
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(10), cache.credential())
        .await
        .expect("a request waited 10 s for a refresh its runtime does not drive");
    let err = answer.expect_err("no credential could have been fetched");
    assert_eq!(err.kind(), tower_client_auth::ErrorKind::Timeout, "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        fetches.load(SeqCst),
        1,
        "a second token request while the first may run"
    );
    // The stalled runtime runs again: its refresh ends; requests get a credential.
    let idle = drive_for(idle, 300);
    let next = tokio::time::timeout(Duration::from_secs(10), cache.credential())
        .await
        .expect("hung after the runtime ran again");
    assert!(next.is_ok(), "{next:?}");
    drop_off(idle);
}

/// World: a refresh begins on a current-thread runtime that then stops being driven
/// mid-fetch; 20 requests on another runtime join it and each stops waiting once it is
/// overdue. Proves: the warning that the refresh is overdue is logged once for the
/// flight, not once per waiter (a log line per request under load would drown the log),
/// and every waiter still gets `Timeout`.
#[tokio::test]
async fn an_overdue_refresh_is_logged_once_however_many_wait() {
    let source = tower_client_auth::source_fn(|_cx: FetchContext| async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok::<_, BoxError>(Credential::bearer("t").unwrap())
    });
    let cache = CredentialCache::builder(source)
        .fetch_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let idle = stalled_mid_fetch(&cache);
    let (capture, _guard) = support::capture_traces();
    let waits = (0..20).map(|_| cache.credential());
    let answers = tokio::time::timeout(
        Duration::from_secs(10),
        futures_util::future::join_all(waits),
    )
    .await
    .expect("requests waited 10 s for a refresh its runtime does not drive");
    for answer in answers {
        let err = answer.expect_err("no credential could have been fetched");
        assert_eq!(err.kind(), ErrorKind::Timeout, "{err:?}");
    }
    let text = capture.text();
    assert_eq!(text.matches("is overdue").count(), 1, "{text}");
    drop_off(idle);
}

/// World: a flight planned on an idle runtime (never begun); an invalidation on a driven
/// runtime detaches it; the next request there plans the fetch chained after it.
/// Proves: no waiter waits for ever for a task nothing polls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_chained_after_an_undriven_flight_does_not_hang() {
    let source = TestSource::new();
    let cache = CredentialCache::builder(source.clone())
        .fetch_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let _kept = idle({
        let cache = cache.clone();
        move || async move { cache.credential().await.map_err(|e| e.kind()) }
    });
    cache.handle().invalidate();
    let answer = tokio::time::timeout(Duration::from_secs(3), cache.credential()).await;
    assert!(
        answer.is_ok(),
        "a request hung 3 s (15 fetch timeouts) behind a flight nothing drives; fetches: {}",
        source.fetches()
    );
    assert!(answer.unwrap().is_ok());
}

/// World: a credential in its hard window (still valid for ~10 s); its refresh planned on
/// an idle runtime; a request polled outside any runtime joins it and abandons it.
/// Proves: a waiter with a still-valid credential gets it when the refresh fails or
/// stalls (never an error while a valid one is at hand).
#[test]
fn a_waiter_outside_any_runtime_keeps_its_still_valid_credential() {
    let source = Told::hard();
    let cache = CredentialCache::builder(source.clone())
        .fetch_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let first = support::block_on(async {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let cache = cache.clone();
        std::thread::spawn(move || rt.block_on(cache.credential()))
            .join()
            .unwrap()
    })
    .unwrap();
    let _kept = idle({
        let cache = cache.clone();
        move || async move { cache.credential().await.map_err(|e| e.kind()) }
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn({
        let cache = cache.clone();
        move || {
            let _ = tx.send(support::block_on(cache.credential()).map_err(|e| e.kind()));
        }
    });
    let got = rx.recv_timeout(Duration::from_secs(3)).expect("hung");
    assert_eq!(
        got,
        Ok(first),
        "the still-valid credential was not the answer"
    );
}

/// World: a credential in its hard window; its refresh planned on an idle runtime; the
/// API rejects the credential (`reject`, the layer's 401 path) on a driven runtime: the
/// rejection joins the never-begun flight, abandons it and refreshes. Proves: the
/// fetch that replaces a rejected credential is told so (`Rejected`, with the rejected
/// credential as `previous`), so that a source does not hand it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_that_joined_an_abandoned_flight_is_told_to_the_refetch() {
    let source = Told::hard();
    let cache = CredentialCache::builder(source.clone())
        .fetch_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let first = cache.credential().await.unwrap();
    let _kept = idle({
        let cache = cache.clone();
        move || async move { cache.credential().await.map_err(|e| e.kind()) }
    });
    let answer = tokio::time::timeout(Duration::from_secs(3), cache.reject(&first)).await;
    let answer = answer.expect("hung").unwrap();
    assert_ne!(answer, first);
    let log = source.log.lock().unwrap().clone();
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(
        log[1].0 == FetchReason::Rejected || log[1].1.is_some(),
        "the refetch after a rejection was told nothing of it: {log:?}"
    );
}

/// Threads of this process named `credential-wait` (the waker threads of `Watch::passed`).
fn wait_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "credential-wait")
        .count()
}

/// World: a flight planned on an idle runtime (never begun), default fetch timeout;
/// 50 requests polled once outside any runtime (a minimal executor) join it, and are
/// then dropped (their callers gave up). Proves: waiting outside a runtime costs no
/// more than the wait: a dropped waiter leaves nothing behind.
#[test]
fn waiters_outside_a_runtime_leave_no_threads_behind() {
    let source = TestSource::new();
    let cache = CredentialCache::builder(source.clone()).build().unwrap();
    let _kept = idle({
        let cache = cache.clone();
        move || async move { cache.credential().await.map_err(|e| e.kind()) }
    });
    let waker = futures_util::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    let mut waiters: Vec<_> = (0..50).map(|_| Box::pin(cache.credential())).collect();
    for w in &mut waiters {
        assert!(w.as_mut().poll(&mut cx).is_pending());
    }
    // One thread for the process, whatever other tests here wait on it too.
    let while_waiting = wait_threads();
    drop(waiters);
    // Their alarms (10 s away) are cancelled: the thread ends, once the other tests'
    // short ones have rung.
    let mut after = wait_threads();
    for _ in 0..60 {
        if after == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        after = wait_threads();
    }
    assert!(
        after == 0 && while_waiting <= 1,
        "{while_waiting} waker threads for 50 waiters; {after} still sleeping after every \
         waiter was dropped"
    );
}

/// World: two driven runtimes; a slow source (0.8 s of a 1 s fetch timeout) with a
/// MemoryStore; a fetch runs on one runtime, an invalidation, and the chained fetch is
/// planned there; a request on the other runtime joins the chained one. Proves: no
/// `Timeout` from the overdue bound while every flight ends normally on a driven runtime.
#[test]
fn a_driven_chained_refresh_is_never_overdue() {
    let source = TestSource::build(
        None,
        Duration::from_millis(800),
        false,
        RefreshMode::Proactive,
    );
    let cache = CredentialCache::builder(source.clone())
        .fetch_timeout(Duration::from_secs(1))
        .store(MemoryStore::new())
        .build()
        .unwrap();
    let r1 = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let r2 = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let first = r1.spawn({
        let cache = cache.clone();
        async move { cache.credential().await.map(drop).map_err(|e| e.kind()) }
    });
    while source.fetches() == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    cache.handle().invalidate();
    let chained = r1.spawn({
        let cache = cache.clone();
        async move { cache.credential().await.map(drop).map_err(|e| e.kind()) }
    });
    std::thread::sleep(Duration::from_millis(20));
    let other = r2
        .block_on(cache.credential())
        .map(drop)
        .map_err(|e| e.kind());
    assert_eq!(other, Ok(()));
    assert_eq!(r1.block_on(first).unwrap(), Ok(()));
    assert_eq!(r1.block_on(chained).unwrap(), Ok(()));
    assert_eq!(source.max_in_flight(), 1);
    assert_eq!(cache.stats().fetches as usize, source.fetches());
    assert_eq!(cache.stats().fetch_failures, 0);
}

/// World: a flight planned on an idle runtime (never begun); a request on a driven
/// runtime built without a time driver (`enable_io` only, or nothing) joins it.
/// Proves: no waiter waits for ever for a task nothing polls (a thread times a waiter
/// with no timer outside a runtime; one on a runtime without timers has none).
#[test]
fn a_waiter_on_a_runtime_without_timers_does_not_hang() {
    let source = TestSource::new();
    let cache = CredentialCache::builder(source.clone())
        .fetch_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let _kept = idle({
        let cache = cache.clone();
        move || async move { cache.credential().await.map_err(|e| e.kind()) }
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn({
        let cache = cache.clone();
        move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let _ = tx.send(
                rt.block_on(cache.credential())
                    .map(drop)
                    .map_err(|e| e.kind()),
            );
        }
    });
    let got = rx.recv_timeout(Duration::from_secs(3));
    assert!(
        got.is_ok(),
        "a waiter on a runtime without timers hung 3 s (15 fetch timeouts)"
    );
}

/// Tokio's "timers are disabled" panics printed on this thread (a hook installed once
/// for the suite, passing every panic on to the hook before it).
fn timer_panics_printed_here() -> usize {
    use std::cell::Cell;
    thread_local!(static PRINTED: Cell<usize> = const { Cell::new(0) });
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let before = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.to_string().contains("timers are disabled") {
                PRINTED.with(|p| p.set(p.get() + 1));
            }
            before(info)
        }));
    });
    PRINTED.with(Cell::get)
}

/// World: a current-thread runtime built without a time driver; five requests in a
/// row, each of which plans a refresh there (which fails `NoRuntime`). Proves: the runtime's failure is told each time
/// (`NoRuntime`, never a hang), and Tokio's panic on a timer made there, which the
/// cache catches and the panic hook prints as if the program had crashed, is printed
/// once for the runtime, not once per request or wait.
#[test]
fn a_runtime_without_timers_gets_tokios_panic_printed_once() {
    let source = TestSource::new();
    let cache = CredentialCache::builder(source.clone())
        .fetch_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let printed = std::thread::spawn(move || {
        let before = timer_panics_printed_here();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for _ in 0..5 {
            let got = rt
                .block_on(cache.credential())
                .map(drop)
                .map_err(|e| e.kind());
            assert_eq!(got, Err(ErrorKind::NoRuntime));
        }
        timer_panics_printed_here() - before
    })
    .join()
    .unwrap();
    assert_eq!(printed, 1, "Tokio's timer panic printed {printed} times");
    assert_eq!(source.fetches(), 0);
}

/// World: `/a` goes with `token-1`; meanwhile a request on an idle runtime invalidates
/// `token-1` and plans the refresh (never begun); the API answers `/a` 403
/// insufficient_scope, and the layer steps up on its own (driven) runtime: the step-up's
/// fetch is chained after the never-begun flight. Proves: the step-up is made (or `/a`
/// answered) within the fetch timeouts; no request waits for ever for a task nothing
/// polls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_up_chained_after_an_undriven_flight_does_not_hang() {
    use http::{Request, StatusCode};
    use http_body_util::Full;
    use tower::{Layer, ServiceExt};
    type MockReq = Request<tower_client_auth::ReplayBody<Full<bytes::Bytes>>>;
    let source = TestSource::new();
    let cache = CredentialCache::builder(source.clone())
        .fetch_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    cache.credential().await.unwrap();
    let layer = tower_client_auth::AuthLayer::with_cache(cache.clone());
    let (inner, mut api) = tower_test::mock::pair::<MockReq, http::Response<&'static str>>();
    let svc = layer.any_https_origin().step_up(true).layer(inner);
    let call = tokio::spawn(svc.clone().oneshot(support::get("/a")));
    let (_req, reply) = tokio::time::timeout(Duration::from_secs(3), api.next_request())
        .await
        .unwrap()
        .unwrap();
    let _kept = idle({
        let cache = cache.clone();
        move || {
            cache.handle().invalidate();
            async move { cache.credential().await.map_err(|e| e.kind()) }
        }
    });
    reply.send_response(
        http::Response::builder()
            .status(403)
            .header(
                "www-authenticate",
                r#"Bearer error="insufficient_scope", scope="w""#,
            )
            .body("")
            .unwrap(),
    );
    let replay = tokio::time::timeout(Duration::from_secs(3), async {
        tokio::select! {
            got = api.next_request() => { if let Some((_, r)) = got { r.send_response(http::Response::new("")) } }
            res = call => { let _ = res; }
        }
    })
    .await;
    assert!(
        replay.is_ok(),
        "no replay and no answer for /a in 3 s (15 fetch timeouts); fetches: {}",
        source.fetches()
    );
    let _ = StatusCode::OK;
}

/// World: a refresh begins on a current-thread runtime and stalls mid-fetch with it; an
/// invalidation; a request on a driven runtime plans the fetch chained after it, which
/// gives up once the stalled one is overdue (no fetch, no backoff). Proves: the flight
/// that gave up without asking the source is no fetch in `stats().fetches` (the count
/// an abandoned flight takes back), nor a failure; and once the stalled runtime runs
/// again, the next request gets a credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chained_flight_that_gave_up_is_not_counted_as_a_fetch() {
    let source = TestSource::build(
        None,
        Duration::from_millis(150),
        false,
        RefreshMode::Proactive,
    );
    let cache = CredentialCache::builder(source.clone())
        .fetch_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let idle = stalled_mid_fetch(&cache);
    assert_eq!(source.fetches(), 1);
    cache.handle().invalidate();
    let got = tokio::time::timeout(Duration::from_secs(10), cache.credential())
        .await
        .expect("hung behind the stalled refresh");
    let kind = got.map(drop).map_err(|e| e.kind());
    assert_eq!(
        source.fetches(),
        1,
        "fetched beside the stalled one ({kind:?})"
    );
    let (stats, asked) = (cache.stats(), source.fetches());
    let idle = drive_for(idle, 400);
    let next = tokio::time::timeout(Duration::from_secs(5), cache.credential())
        .await
        .expect("hung after the stalled runtime ran again");
    drop_off(idle);
    assert_eq!(
        stats.fetch_failures, 0,
        "a failure counted, none failed ({kind:?})"
    );
    assert_eq!(
        stats.fetches as usize, asked,
        "stats().fetches against the source's calls, after a chained flight gave up ({kind:?})"
    );
    assert!(
        next.is_ok(),
        "after the stalled runtime ran again: {next:?}; fetches {}, stats {:?}",
        source.fetches(),
        cache.stats()
    );
}

/// World: keep-warm; a 2 s token (soft window at 1.5 s, hard at 1.9 s), fetch timeout
/// 200 ms, installed by `warm_up` on a current-thread runtime then left undriven (its
/// keep-warm timer with it); in the soft window a request polled on that runtime
/// (entered, not driven: a blocking wrapper's) claims the background refresh, whose task
/// never begins; the application goes on asking on a driven runtime every 20 ms.
/// Proves (as review 67 promised of a cancelled background refresh): the credential is
/// refreshed in its soft window, rather than nothing until the hard window makes every
/// caller wait: the never-begun background flight leaves no claim for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_refresh_left_on_an_undriven_runtime_leaves_no_claim() {
    let source = TestSource::expiring(Duration::from_secs(2));
    let cache = CredentialCache::builder(source.clone())
        .window_jitter(0.0)
        .backoff(Duration::from_millis(100), Duration::from_millis(200))
        .fetch_timeout(Duration::from_millis(200))
        .keep_warm(true)
        .build()
        .unwrap();
    let start = std::time::Instant::now();
    // Installed on the runtime that is then left undriven: its keep-warm timer is there.
    let runtime = left_undriven({
        let cache = cache.clone();
        move |runtime| runtime.block_on(cache.warm_up()).unwrap()
    });
    tokio::time::sleep_until((start + Duration::from_millis(1520)).into()).await;
    let idle = std::thread::spawn({
        let cache = cache.clone();
        move || {
            {
                let _inside = runtime.enter();
                use futures_util::FutureExt;
                let got = cache.credential().now_or_never();
                assert!(matches!(got, Some(Ok(_))), "in the soft window: at once");
            }
            runtime
        }
    })
    .join()
    .unwrap();
    while start.elapsed() < Duration::from_millis(1850) {
        tokio::time::timeout(Duration::from_secs(2), cache.credential())
            .await
            .expect("a request in the soft window waited")
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fetches = source.fetches();
    let log: Vec<_> = (source.log().iter())
        .map(|(t, r)| (t.duration_since(start.into()), *r))
        .collect();
    drop_off(idle);
    assert!(
        fetches >= 2,
        "not refreshed in the soft window ({fetches} fetches by 1.85 s): the claim of a \
         background refresh that never began is held; {log:?}"
    );
}

/// A source whose drop is seen through a `Weak`.
#[derive(Clone)]
struct Marked {
    source: TestSource,
    _alive: Arc<()>,
}

impl tower_client_auth::CredentialSource for Marked {
    async fn fetch(&self, cx: FetchContext) -> Result<Credential, BoxError> {
        tower_client_auth::CredentialSource::fetch(&self.source, cx).await
    }
}

/// World: a background refresh is planned on a runtime then left undriven, a request on
/// a driven runtime unstalls it (review 116: the cache keeps the last background
/// flight's `FlightRun`) and refreshes; then the cache, the idle runtime and every
/// request go. Proves: nothing the kept `FlightRun` holds keeps the cache (and its
/// source) alive, and the unstalled refresh never ran beside another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kept_background_flight_keeps_nothing_alive_after_the_cache_goes() {
    let alive = Arc::new(());
    let source = TestSource::expiring(Duration::from_secs(2));
    let marked = Marked {
        source: source.clone(),
        _alive: alive.clone(),
    };
    let gone = Arc::downgrade(&alive);
    drop(alive);
    let cache = CredentialCache::builder(marked)
        .window_jitter(0.0)
        .fetch_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let start = std::time::Instant::now();
    cache.warm_up().await.unwrap();
    tokio::time::sleep_until((start + Duration::from_millis(1520)).into()).await;
    let idle = idle({
        let cache = cache.clone();
        move || async move {
            // Soft window: answered at once; the background task it spawned never runs.
            let _ = cache.credential().await;
            std::future::pending::<()>().await
        }
    });
    tokio::time::sleep(Duration::from_millis(250)).await;
    for _ in 0..10 {
        tokio::time::timeout(Duration::from_secs(2), cache.credential())
            .await
            .expect("a request in the soft window waited")
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fetches = source.fetches();
    assert!(source.max_in_flight() <= 1, "two fetches at once");
    drop(cache);
    std::thread::spawn(move || drop(idle)).join().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        gone.upgrade().is_none(),
        "the source outlived its cache ({fetches} fetches)"
    );
    assert!(fetches >= 2, "unstalled: {fetches} fetches");
}

/// World: as above, with keep-warm and a fleet's `MemoryStore`; the idle runtime that
/// holds the never-begun background task is driven again after the request on a driven
/// runtime unstalled it. Proves: one refresh in the soft window, under the lease; the
/// abandoned task, run late, fetches nothing, and no two fetches ever overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unstalled_background_refresh_with_keep_warm_and_a_store_fetches_once() {
    let source = TestSource::expiring(Duration::from_secs(2));
    let cache = CredentialCache::builder(source.clone())
        .window_jitter(0.0)
        .fetch_timeout(Duration::from_millis(200))
        .keep_warm(true)
        .store(MemoryStore::new())
        .build()
        .unwrap();
    let start = std::time::Instant::now();
    cache.warm_up().await.unwrap();
    tokio::time::sleep_until((start + Duration::from_millis(1520)).into()).await;
    let idle = idle({
        let cache = cache.clone();
        move || async move {
            // Soft window: answered at once; kept pending a moment after.
            let got = cache.credential().await.map(|_| ());
            tokio::time::sleep(Duration::from_millis(50)).await;
            got
        }
    });
    tokio::time::sleep(Duration::from_millis(250)).await;
    for _ in 0..5 {
        tokio::time::timeout(Duration::from_secs(2), cache.credential())
            .await
            .expect("a request in the soft window waited")
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = source.fetches();
    let kept = std::thread::spawn(move || idle.drive()).join().unwrap();
    assert!(kept.is_some(), "the kept request ended");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log: Vec<_> = (source.log().iter())
        .map(|(t, r)| (t.duration_since(start.into()), *r))
        .collect();
    assert_eq!(before, 2, "one refresh in the soft window; {log:?}");
    assert_eq!(source.fetches(), 2, "the abandoned task fetched; {log:?}");
    assert!(source.max_in_flight() <= 1, "two fetches at once");
}

/// The world of the two tests below: a 4 s token (soft window at 3.0 s, hard at 3.8 s),
/// backoff 100-200 ms, fetch timeout 200 ms; in the soft window (3.05 s) the source
/// starts failing, and a request on a current-thread runtime claims the background
/// refresh, which runs there and fails; that runtime is then left undriven (returned).
/// The source is left failing; `start` is when the token was fetched.
async fn background_failed_left_undriven() -> (
    TestSource,
    CredentialCache<TestSource>,
    std::time::Instant,
    tokio::runtime::Runtime,
) {
    let source = TestSource::expiring(Duration::from_secs(4));
    let cache = CredentialCache::builder(source.clone())
        .window_jitter(0.0)
        .backoff(Duration::from_millis(100), Duration::from_millis(200))
        .fetch_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let start = std::time::Instant::now();
    cache.warm_up().await.unwrap();
    tokio::time::sleep_until((start + Duration::from_millis(3050)).into()).await;
    source.set_failing(true);
    let idle = left_undriven({
        let (cache, source) = (cache.clone(), source.clone());
        move |runtime| {
            runtime.block_on(async {
                // Soft window: answered at once; the background refresh runs here.
                assert!(cache.credential().await.is_ok());
                for _ in 0..200 {
                    if source.fetches() >= 2 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                // Let the failure be recorded (and its re-arm timer spawned here).
                tokio::time::sleep(Duration::from_millis(20)).await;
            })
        }
    });
    assert_eq!(source.fetches(), 2, "the background refresh ran and failed");
    (source, cache, start, idle)
}

/// World: a 4 s token (soft window at 3.0 s, hard at 3.8 s), backoff 100-200 ms, fetch
/// timeout 200 ms. In the soft window a request on a current-thread runtime claims the
/// background refresh, which runs there and fails (the endpoint answers 503); that
/// runtime is driven until the refresh has failed, then kept undriven (a blocking
/// wrapper between two calls). The endpoint recovers; the application asks on a driven
/// runtime every 20 ms until 3.7 s. Proves: the claim on the background refresh is
/// never leaked: the failed refresh gives it back through a timer on the undriven
/// runtime (`rearm_background`), and a caller on the driven runtime past its due time
/// takes it over (`rearm_overdue`), so the credential is refreshed in the soft window,
/// not left for every caller to wait for in the hard window. (Review 118 found the
/// leak; the only test here with a timing margin, ~430 ms.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_background_refresh_on_a_runtime_left_undriven_leaks_no_claim() {
    let (source, cache, start, idle) = background_failed_left_undriven().await;
    source.set_failing(false);
    while start.elapsed() < Duration::from_millis(3700) {
        tokio::time::timeout(Duration::from_secs(2), cache.credential())
            .await
            .expect("a request in the soft window waited")
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fetches = source.fetches();
    let log: Vec<_> = (source.log().iter())
        .map(|(t, r)| (t.duration_since(start.into()), *r))
        .collect();
    drop_off(idle);
    assert!(
        fetches >= 3,
        "not refreshed in the soft window after the failed background refresh's backoff \
         ({fetches} fetches by 3.7 s): its claim is held by a timer on the undriven \
         runtime; {log:?}"
    );
}

/// World: a request is first polled on a current-thread runtime (its refresh task is
/// spawned there, and its wait planned there), then handed to another, driven runtime
/// that awaits it; the first runtime is kept and not driven. Fetch timeout 200 ms.
/// Proves: a waiter polled on another runtime than its flight's does not wait for ever
/// (cache docs: "a caller on another runtime ... that finds it not begun by the fetch
/// timeout abandons it"), whichever runtime it was planned on: whether a wait times its
/// flight is decided look by look, from the runtime that polls it (review 118: it was
/// decided once, when planned, and the moved request hung).
#[test]
fn a_request_moved_to_a_driven_runtime_does_not_hang_on_its_idle_flight() {
    let source = TestSource::new();
    let cache = CredentialCache::builder(source.clone())
        .fetch_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let (fut, idle) = std::thread::spawn({
        let cache = cache.clone();
        move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut fut = {
                let _inside = runtime.enter();
                Box::pin(async move { cache.credential().await.map(drop).map_err(|e| e.kind()) })
            };
            runtime.block_on(async {
                use futures_util::FutureExt;
                assert!((&mut fut).now_or_never().is_none(), "answered at once");
            });
            (fut, runtime)
        }
    })
    .join()
    .unwrap();
    let driven = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let got = driven.block_on(async { tokio::time::timeout(Duration::from_secs(3), fut).await });
    drop(driven);
    drop_off(idle);
    assert!(
        got.is_ok(),
        "a request awaited on a driven runtime hung 3 s (15 fetch timeouts) on a flight \
         that never began on the idle runtime it was first polled on; fetches: {}",
        source.fetches()
    );
}

/// World: a credential is cached and then rejected (`reject`, the layer's 401 path) on a
/// current-thread runtime that is then left undriven: the refetch it plans (told
/// `Rejected`, with the rejected credential) never begins. On a driven runtime the
/// application invalidates (nothing is current any more) and asks: its fetch is chained
/// after the never-begun one, abandons it at its due time, and fetches. Proves: the
/// fetch that replaces a rejected credential is told of the rejection (`Rejected`, or
/// the rejected credential as `previous`: README, what a source holding its last
/// credential must not hand back), even when it was planned, chained, before the
/// flight it replaces was abandoned: `forget_flight` hands what that one was to tell to
/// the flight planned meanwhile, told at its start (review 118: it was dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_abandoned_behind_a_chained_flight_is_still_told() {
    let source = Told::default();
    let cache = CredentialCache::builder(source.clone())
        .fetch_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let first = cache.credential().await.unwrap();
    let _kept = idle({
        let (cache, first) = (cache.clone(), first.clone());
        move || async move { cache.reject(&first).await.map(drop).map_err(|e| e.kind()) }
    });
    cache.handle().invalidate();
    let answer = tokio::time::timeout(Duration::from_secs(3), cache.credential()).await;
    let answer = answer.expect("hung").unwrap();
    assert_ne!(answer, first);
    let log = source.log.lock().unwrap().clone();
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(
        log[1].0 == FetchReason::Rejected || log[1].1.is_some(),
        "the only fetch after a rejection was told nothing of it: {log:?}"
    );
}

/// World: a fetch runs (gated); an invalidation; the next request plans the fetch
/// chained after it; a credential is handed over (`replace`), fresh, before the first
/// fetch ends: the chained flight's fetch is then needless, and it never asks the
/// source (nor the store). Proves: `stats().fetches` counts refreshes that asked the
/// store or the source: a chained flight that `FlightGuard::begin` answers without
/// either (a fresh credential handed over, a backoff) is no fetch, as a chained flight
/// that gave up is not (review 116). Review 118 found it counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chained_flight_made_needless_is_not_counted_as_a_fetch() {
    use futures_util::FutureExt;
    let source = TestSource::gated(None);
    let cache = CredentialCache::builder(source.clone()).build().unwrap();
    let mut first = Box::pin(cache.credential());
    assert!((&mut first).now_or_never().is_none());
    for _ in 0..400 {
        if source.fetches() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(source.fetches(), 1, "the first fetch began");
    cache.handle().invalidate();
    let mut chained = Box::pin(cache.credential());
    assert!((&mut chained).now_or_never().is_none());
    let mine = Credential::bearer("mine").unwrap();
    assert!(cache.handle().replace(mine.clone()).unwrap());
    source.release(1);
    let a = tokio::time::timeout(Duration::from_secs(3), first)
        .await
        .expect("hung");
    let b = tokio::time::timeout(Duration::from_secs(3), chained)
        .await
        .expect("hung");
    assert_eq!(
        b.unwrap(),
        mine,
        "the chained flight answered with the handed-over one"
    );
    let _ = a;
    assert_eq!(source.fetches(), 1, "one token request");
    assert_eq!(
        cache.stats().fetches as usize,
        source.fetches(),
        "stats().fetches against the source's calls: {:?}",
        cache.stats()
    );
}

/// World: a flight planned on an idle runtime (never begun); an invalidation detaches
/// it; the next request comes on a driven current-thread runtime built without a time
/// driver, and plans the fetch chained after the never-begun one. Fetch timeout 200 ms.
/// Proves: no waiter waits for ever for a task nothing polls: on a runtime without
/// timers the chained flight times the one ahead of it with the process's alarm thread
/// and abandons it, as a join there does (`a_waiter_on_a_runtime_without_timers_does_
/// not_hang`). Review 118: it awaited the predecessor with no deadline, and hung.
#[test]
fn a_chained_flight_on_a_runtime_without_timers_does_not_hang() {
    let source = TestSource::new();
    let cache = CredentialCache::builder(source.clone())
        .fetch_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let _kept = idle({
        let cache = cache.clone();
        move || async move { cache.credential().await.map_err(|e| e.kind()) }
    });
    cache.handle().invalidate();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn({
        let cache = cache.clone();
        move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let _ = tx.send(
                rt.block_on(cache.credential())
                    .map(drop)
                    .map_err(|e| e.kind()),
            );
        }
    });
    let got = rx.recv_timeout(Duration::from_secs(3));
    assert!(
        got.is_ok(),
        "a request on a runtime without timers, chained after a never-begun flight, hung \
         3 s (15 fetch timeouts); fetches: {}",
        source.fetches()
    );
}

/// World: a cache built with `fetch_timeout(Duration::MAX)` (the builder refuses only
/// zero: "no timeout", in effect) and a fleet's `MemoryStore`. Proves: a configuration
/// the builder accepts refreshes: the lease's hold is a saturating sum of the fetch
/// timeout and the store's shares (review 118: it overflowed and panicked inside every
/// refresh, reported as a source panic: no credential, ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_fetch_timeout_with_a_store_still_refreshes() {
    let source = TestSource::new();
    let cache = CredentialCache::builder(source.clone())
        .fetch_timeout(Duration::MAX)
        .store(MemoryStore::new())
        .build()
        .expect("accepted by the builder");
    let got = tokio::time::timeout(Duration::from_secs(3), cache.credential())
        .await
        .expect("hung");
    assert!(
        got.is_ok(),
        "no credential with fetch_timeout(Duration::MAX) and a store: {:?} ({} source \
         fetches)",
        got.map(drop).map_err(|e| e.kind()),
        source.fetches()
    );
}

/// World: `fetch_timeout(Duration::MAX)` without a store, keep-warm; an invalidation,
/// and requests on two runtimes. Proves: no deadline overflows (`due`, `overdue`, the
/// alarm's wait), one fetch at a time, and the counts agree (review 118, held).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_timeout_of_duration_max_without_a_store_keeps_its_promises() {
    let source = TestSource::expiring(Duration::from_secs(3600));
    let cache = CredentialCache::builder(source.clone())
        .fetch_timeout(Duration::MAX)
        .keep_warm(true)
        .build()
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(3), cache.credential()).await;
    assert!(got.expect("hung").is_ok());
    cache.handle().invalidate();
    let other = std::thread::spawn({
        let cache = cache.clone();
        move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    tokio::time::timeout(Duration::from_secs(3), cache.credential()).await
                })
        }
    });
    let here = tokio::time::timeout(Duration::from_secs(3), cache.credential()).await;
    let there = other.join().unwrap();
    assert!(here.expect("hung").is_ok());
    assert!(there.expect("hung").is_ok());
    assert!(source.max_in_flight() <= 1);
    assert_eq!(cache.stats().fetches as usize, source.fetches());
}

/// World: `fetch_timeout(Duration::MAX)`; a waiter outside any runtime joins a flight
/// on an idle runtime, and is dropped, and the cache too. Proves: the alarm thread ends
/// with its last wait, however far its deadline (review 118, held).
#[test]
fn the_alarm_for_a_far_deadline_ends_with_its_waiter() {
    let source = TestSource::new();
    let cache = CredentialCache::builder(source.clone())
        .fetch_timeout(Duration::MAX)
        .build()
        .unwrap();
    let _kept = idle({
        let cache = cache.clone();
        move || async move { cache.credential().await.map_err(|e| e.kind()) }
    });
    let mut fut = Box::pin(cache.credential());
    let waker = futures_util::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    drop(fut);
    drop(cache);
    for _ in 0..200 {
        if wait_threads() == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(wait_threads(), 0, "the alarm thread outlived every waiter");
}

/// World: a fetch runs (gated) on a driven runtime; an invalidation; a request on a
/// current-thread runtime plans the fetch chained after it, whose task begins there and
/// waits behind the running one; that runtime then shuts down (a blocking wrapper's
/// runtime dropped), cancelling the queued task before it asked the store or the
/// source. The first fetch is then released. Proves: `stats().fetches` counts no
/// refresh that ended without the store or the source (`CacheStats::fetches`): the
/// guard of a flight that never got past the ones ahead gives the count back (review
/// 119 found it kept).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chained_flight_cancelled_while_queued_is_not_counted_as_a_fetch() {
    use futures_util::FutureExt;
    let source = TestSource::gated(None);
    let cache = CredentialCache::builder(source.clone()).build().unwrap();
    let mut first = Box::pin(cache.credential());
    assert!((&mut first).now_or_never().is_none());
    for _ in 0..400 {
        if source.fetches() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(source.fetches(), 1, "the first fetch began");
    cache.handle().invalidate();
    let queued = cache.clone();
    tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // Plans the chained flight here; its task begins and waits behind.
            let waited =
                tokio::time::timeout(Duration::from_millis(100), queued.credential()).await;
            assert!(
                waited.is_err(),
                "the chained flight answered while the first ran"
            );
        });
        drop(rt); // shuts down: the queued task is cancelled, never having fetched
    })
    .await
    .unwrap();
    source.release(1);
    let a = tokio::time::timeout(Duration::from_secs(3), first)
        .await
        .expect("hung");
    assert!(a.is_ok(), "{a:?}");
    assert_eq!(source.fetches(), 1, "one call to the source");
    assert_eq!(
        cache.stats().fetches as usize,
        source.fetches(),
        "stats().fetches against the source's calls, after a queued flight was cancelled \
         before it asked either: {:?}",
        cache.stats()
    );
}

/// World: a request is made inside a runtime that has shut down (the task is refused:
/// `SpawnRefused`). Proves: a refresh whose task never ran asked nothing: no fetch in
/// `stats()`, and no failure to back off from (review 119 found both).
#[test]
fn a_refused_refresh_task_is_not_counted_as_a_fetch() {
    let source = TestSource::new();
    let cache = CredentialCache::builder(source.clone()).build().unwrap();
    let dead = support::dead_runtime();
    let got = {
        let _inside = dead.enter();
        support::block_on(cache.credential())
    };
    assert_eq!(
        got.map(drop).map_err(|e| e.kind()),
        Err(ErrorKind::SpawnRefused)
    );
    assert_eq!(source.fetches(), 0);
    assert_eq!(
        cache.stats().fetches,
        0,
        "a refused task counted as a fetch: {:?}",
        cache.stats()
    );
    assert_eq!(cache.stats().fetch_failures, 0);
    // Nothing to back off from: the next request, on a driven runtime, fetches.
    let next = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(cache.credential());
    assert!(next.is_ok(), "backed off after a refused task: {next:?}");
    assert_eq!(source.fetches(), 1);
}

/// World: a credential `token-1` is cached; a request on a current-thread runtime
/// rejects it (`reject`, the layer's 401 path) and is then left undriven: its refetch
/// (told `Rejected`, `token-1`) never begins. The API then answers another request 403
/// insufficient_scope and the layer steps up on a driven runtime: the step-up's fetch is
/// chained after the never-begun refetch and abandons it. Proves (README's undriven
/// row: a refresh chained after an abandoned one, "an invalidation's, a step-up's", is
/// "told what the abandoned one was to tell"): the step-up, the only fetch after the
/// rejection, is told the rejected credential as `previous` (review 119: it was told
/// nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_up_chained_after_an_abandoned_rejection_is_told_of_it() {
    use http::Request;
    use http_body_util::Full;
    use tower::{Layer, ServiceExt};
    type MockReq = Request<tower_client_auth::ReplayBody<Full<bytes::Bytes>>>;
    let source = Told::default();
    let cache = CredentialCache::builder(source.clone())
        .fetch_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let first = cache.credential().await.unwrap();
    let layer = tower_client_auth::AuthLayer::with_cache(cache.clone());
    let (inner, mut api) = tower_test::mock::pair::<MockReq, http::Response<&'static str>>();
    let svc = layer.any_https_origin().step_up(true).layer(inner);
    let call = tokio::spawn(svc.clone().oneshot(support::get("/a")));
    let (_req, reply) = tokio::time::timeout(Duration::from_secs(3), api.next_request())
        .await
        .unwrap()
        .unwrap();
    let _kept = idle({
        let (cache, first) = (cache.clone(), first.clone());
        move || async move { cache.reject(&first).await.map(drop).map_err(|e| e.kind()) }
    });
    reply.send_response(
        http::Response::builder()
            .status(403)
            .header(
                "www-authenticate",
                r#"Bearer error="insufficient_scope", scope="w""#,
            )
            .body("")
            .unwrap(),
    );
    let replay = tokio::time::timeout(Duration::from_secs(3), async {
        tokio::select! {
            got = api.next_request() => { if let Some((_, r)) = got { r.send_response(http::Response::new("")) } }
            res = call => { let _ = res; }
        }
    })
    .await;
    assert!(replay.is_ok(), "hung");
    let log = source.log.lock().unwrap().clone();
    assert_eq!(log.len(), 2, "one fetch after the rejection: {log:?}");
    assert_eq!(log[1].0, FetchReason::StepUp, "{log:?}");
    assert!(
        log[1].1.is_some(),
        "the step-up chained after the abandoned refetch of a rejected credential was told \
         nothing of the rejection (previous: None): {log:?}"
    );
}

/// World: extreme builder values all at once: backoff(Duration::MAX, Duration::MAX),
/// fetch_timeout(Duration::MAX), soft and hard windows of Duration::MAX, keep-warm, a
/// MemoryStore; a 4 s token; the source fails in the soft window (background refresh
/// fails, re-arm timer at a saturated time), then a request on another runtime in the
/// soft window (rearm_overdue's path), an invalidation and a request (backing off).
/// Proves (review 119, held): nothing panics; a request in backoff is answered (Backoff) at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_durations_never_panic() {
    let source = TestSource::expiring(Duration::from_secs(4));
    let cache = CredentialCache::builder(source.clone())
        .backoff(Duration::MAX, Duration::MAX)
        .fetch_timeout(Duration::MAX)
        .soft_window(Duration::MAX)
        .hard_window(Duration::MAX)
        .window_jitter(1.0)
        .keep_warm(true)
        .store(MemoryStore::new())
        .build()
        .expect("accepted");
    let got = tokio::time::timeout(Duration::from_secs(3), cache.credential()).await;
    assert!(got.expect("hung").is_ok());
    // Into the soft window (a quarter of the lifetime, at most), before the hard one.
    tokio::time::sleep(Duration::from_millis(3150)).await;
    source.set_failing(true);
    for _ in 0..5 {
        let _ = tokio::time::timeout(Duration::from_secs(3), cache.credential())
            .await
            .expect("hung");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let other = std::thread::spawn({
        let cache = cache.clone();
        move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    tokio::time::timeout(Duration::from_secs(3), cache.credential())
                        .await
                        .is_ok()
                })
        }
    })
    .join()
    .expect("no panic on another runtime");
    assert!(other, "hung on another runtime");
    cache.handle().invalidate();
    let got = tokio::time::timeout(Duration::from_secs(3), cache.credential())
        .await
        .expect("hung");
    let kind = got.map(drop).map_err(|e| e.kind());
    assert_ne!(
        kind,
        Err(ErrorKind::SourcePanicked),
        "a panic inside the flight"
    );
    assert!(cache.stats().fetches as usize >= source.fetches());
}

/// World: fetch timeout 30 s; a flight planned on an idle runtime (never begun); an
/// invalidation; a request on a current-thread runtime built without timers plans the
/// fetch chained after it, whose task waits behind with an `alarm::Sleep` (due in 30 s);
/// after 100 ms that runtime is stopped and dropped. Proves (review 119, held): the dropped
/// `alarm::Sleep` cancels its alarm, and the `credential-wait` thread ends with it.
#[test]
fn a_dropped_chained_wait_on_a_runtime_without_timers_ends_the_alarm_thread() {
    let source = TestSource::new();
    let cache = CredentialCache::builder(source.clone())
        .fetch_timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let _kept = idle({
        let cache = cache.clone();
        move || async move { cache.credential().await.map_err(|e| e.kind()) }
    });
    cache.handle().invalidate();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn({
        let cache = cache.clone();
        move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(async {
                tokio::select! {
                    _ = cache.credential() => panic!("answered with the one ahead not begun"),
                    _ = stopped => {}
                }
            });
            drop(rt);
        }
    });
    // Tokio's caught panic is printed first (with a backtrace, if asked for: slow).
    for _ in 0..300 {
        if wait_threads() >= 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(wait_threads() >= 1, "the chained wait set no alarm");
    stop.send(()).unwrap();
    thread.join().unwrap();
    for _ in 0..200 {
        if wait_threads() == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        wait_threads(),
        0,
        "the alarm thread outlived the dropped chained wait"
    );
    assert_eq!(source.fetches(), 0);
}

/// World: as `a_chained_flight_cancelled_while_queued_is_not_counted_as_a_fetch`:
/// a fetch runs (gated); an invalidation; the fetch chained after it is planned on a
/// current-thread runtime, begins waiting behind, and is cancelled by that runtime's
/// shutdown before it asked the store or the source; the first fetch then succeeds (its
/// result is its own waiters', the invalidation made it suspect). The source never
/// failed. Proves: nothing backs off: the next request, on a healthy driven runtime,
/// fetches rather than being refused with `Backoff` (review 119: the queued flight's
/// guard recorded a failure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_flight_cancelled_with_its_runtime_backs_nothing_off() {
    use futures_util::FutureExt;
    let source = TestSource::gated(None);
    let cache = CredentialCache::builder(source.clone()).build().unwrap();
    let mut first = Box::pin(cache.credential());
    assert!((&mut first).now_or_never().is_none());
    for _ in 0..400 {
        if source.fetches() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cache.handle().invalidate();
    let queued = cache.clone();
    tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_millis(100), queued.credential()).await;
        });
        drop(rt);
    })
    .await
    .unwrap();
    source.release(2);
    let _ = tokio::time::timeout(Duration::from_secs(3), first).await;
    let next = tokio::time::timeout(Duration::from_secs(3), cache.credential())
        .await
        .expect("hung");
    assert!(
        next.is_ok(),
        "the next request after a queued flight was cancelled (the source never failed): \
         {:?}; stats {:?}",
        next.as_ref().map(drop).map_err(|e| e.to_string()),
        cache.stats()
    );
}

/// World: as `a_failed_background_refresh_on_a_runtime_left_undriven_leaks_no_claim`
/// (4 s token, soft window at 3.0 s, backoff 100-200 ms doubling), but the source keeps
/// failing; the background refresh fails on a runtime then left undriven, and the
/// application asks on a driven runtime every 5 ms until 3.7 s, and once from outside
/// any runtime. Proves (review 119, held): the takeover (`rearm_overdue`) respects the backoff: no
/// hot loop of refreshes in the soft window (at most one per backoff step), never two
/// fetches at once, `stats().fetches` equal to the source's calls, and a caller outside
/// any runtime is answered with the still-valid credential.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_of_a_failing_background_refresh_keeps_to_the_backoff() {
    let (source, cache, start, idle) = background_failed_left_undriven().await;
    while start.elapsed() < Duration::from_millis(3700) {
        let got = tokio::time::timeout(Duration::from_secs(2), cache.credential())
            .await
            .expect("a request in the soft window waited");
        assert!(got.is_ok(), "the still-valid credential: {got:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let outside = std::thread::spawn({
        let cache = cache.clone();
        move || {
            support::block_on(cache.credential())
                .map(drop)
                .map_err(|e| e.kind())
        }
    })
    .join()
    .unwrap();
    let fetches = source.fetches();
    let stats = cache.stats();
    drop_off(idle);
    assert!(outside.is_ok(), "outside any runtime: {outside:?}");
    assert!(source.max_in_flight() <= 1, "two fetches at once");
    // ~650 ms of soft window past the first failure, backoff >= 50 ms (half of 100 ms),
    // doubling to a 100 ms floor: a handful at most, never one per request (~130).
    assert!(fetches <= 12, "a hot loop of refreshes: {fetches}");
    assert!(fetches >= 3, "the claim leaked: {fetches}");
    assert_eq!(stats.fetches as usize, fetches, "{stats:?}");
}
