//! Random interleavings of everything that moves the refresh path at once: requests
//! whose answers are random (200, a 401 rejection, a 403 naming a missing scope, which
//! steps up), credentials that expire in the middle of it all (refreshed by keep-warm's
//! timers too, every other seed), a source that is slow at random and fails at random,
//! and the application invalidating and replacing the credential at random moments, on a
//! multi-threaded runtime, with and without a store, through the Tower layer and through
//! reqwest.
//!
//! Each run checks the promises that every interleaving must keep, with counters that
//! would see them broken: never two fetches at once; no request hangs; a request whose
//! credential was rejected is never replayed with that same credential; a credential
//! the application dropped (`invalidate_if`, `reject`, but for a fresh rejection within
//! its backoff, which keeps the credential: `YOUNG_CREDENTIAL_AGE`) is never sent by a
//! request that started after it was dropped (from the store or anywhere else), and
//! `reject` never
//! answers with the credential it was given; a credential's rejection is counted once at
//! most; and afterwards the cache is not wedged (a request gets a credential and its
//! answer). The Tower layer runs in both modes (replaying, and `Direct`). The targeted
//! tests in `single_flight.rs` and `challenges.rs` pin each interleaving found so far;
//! this one looks for the next.

#![cfg(feature = "reqwest")]

use crate::support;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use support::{Dice, providers::serve};
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, BoxError, Credential, CredentialCache, CredentialStore, ErrorKind, FetchContext,
    FetchReason, MemoryStore, ReplayBody, reqwest::AuthMiddleware, source_fn, store::Lease,
};

/// One fetch running, counted out however it ends.
struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

/// What one run saw.
#[derive(Default)]
struct Seen {
    /// Most fetches the source ever ran at once.
    most_running: AtomicUsize,
    fetches: AtomicUsize,
    /// Per request id, the token of its last attempt and whether it was rejected.
    attempts: Mutex<HashMap<String, (String, bool)>>,
    /// Replays that carried the very token their request had rejected.
    same_token_replays: Mutex<Vec<String>>,
    /// Whether the API still answers at random (then all 200: the final check).
    chaos: AtomicBool,
    /// A sequence every request start and every drop by the application is numbered in.
    clock: AtomicU64,
    /// Tokens the application dropped, with the number of the moment after it did.
    dropped: Mutex<HashMap<String, u64>>,
    /// Requests that carried a token dropped before they started.
    resurrected: Mutex<Vec<String>>,
    /// Tokens the API rejected with a 401 at least once.
    rejected: Mutex<HashSet<String>>,
    /// `reject` calls that invalidated their credential, and those answered with it.
    rejects: AtomicU64,
    rejects_answered_same: Mutex<Vec<String>>,
}

impl Seen {
    /// The application dropped `credential`: no request that starts from now on may
    /// carry it.
    fn dropped(&self, credential: &Credential) {
        let at = self.clock.fetch_add(1, SeqCst);
        self.dropped.lock().unwrap().insert(token(credential), at);
    }
}

/// The `Authorization` value a bearer credential puts on a request.
fn token(credential: &Credential) -> String {
    let (_, value) = credential.headers().next().unwrap();
    value.to_str().unwrap().to_owned()
}

type ApiRequest = Request<ReplayBody<Full<Bytes>>>;

/// Credentials `t-N` (with `:scopes` for a step-up's), living 80 ms, 400 ms or an hour;
/// a fetch that is slow at random and fails one time in eight.
fn source(dice: Dice, seen: Arc<Seen>) -> impl tower_client_auth::CredentialSource {
    let running = Arc::new(AtomicUsize::new(0));
    source_fn(move |cx: FetchContext| {
        let n = seen.fetches.fetch_add(1, SeqCst);
        let (dice, seen, running) = (dice.clone(), seen.clone(), running.clone());
        async move {
            seen.most_running
                .fetch_max(running.fetch_add(1, SeqCst) + 1, SeqCst);
            let _running = Running(running);
            dice.pause(4).await;
            if seen.chaos.load(SeqCst) && dice.roll(8) == 0 {
                return Err::<Credential, BoxError>("the token endpoint is down".into());
            }
            let scopes = match (cx.reason(), cx.required_scope()) {
                (FetchReason::StepUp, Some(scope)) => format!(":{}", scope.replace(' ', ",")),
                _ => String::new(),
            };
            let lifetime = [80, 400, 3_600_000][dice.roll(3) as usize];
            Ok(Credential::bearer(format!("t-{n}{scopes}"))?
                .expires_in(Duration::from_millis(lifetime)))
        }
    })
}

/// The API's answer to a request carrying `token` (its `Authorization` value) for the
/// request `id`: at random 200, 401, or 403 lacking `w` or `x` (unless the token was
/// granted it); every answer after the chaos is 200. Notes a replay that carries the
/// token its request had rejected.
async fn answer(dice: &Dice, seen: &Seen, sent: Sent) -> Response<Full<Bytes>> {
    let Sent { token, id, started } = sent;
    dice.pause(2).await;
    let status = match (seen.chaos.load(SeqCst), dice.roll(10)) {
        (false, _) => 200,
        (true, 0) => 401,
        (true, 1 | 2) => 403,
        (true, _) => 200,
    };
    let scope = ["w", "x"][dice.roll(2) as usize];
    let granted = token
        .split_once(':')
        .is_some_and(|(_, s)| s.split(',').any(|g| g == scope));
    let status = if status == 403 && granted {
        200
    } else {
        status
    };
    if seen.chaos.load(SeqCst) {
        if let Some(at) = seen.dropped.lock().unwrap().get(&token) {
            if *at < started {
                seen.resurrected
                    .lock()
                    .unwrap()
                    .push(format!("{id}: {token}"));
            }
        }
    }
    if status == 401 {
        seen.rejected.lock().unwrap().insert(token.clone());
    }
    {
        let mut attempts = seen.attempts.lock().unwrap();
        if let Some((before, true)) = attempts.get(&id) {
            if *before == token {
                seen.same_token_replays.lock().unwrap().push(id.clone());
            }
        }
        attempts.insert(id, (token, status == 401));
    }
    let mut res = Response::new(Full::default());
    *res.status_mut() = http::StatusCode::from_u16(status).unwrap();
    if status == 403 {
        let challenge = format!(r#"Bearer error="insufficient_scope", scope="{scope}""#);
        res.headers_mut()
            .insert("www-authenticate", challenge.parse().unwrap());
    }
    res
}

/// A `MemoryStore` that, during the chaos, fails one call in eight (a release excepted)
/// and is slow at random: the cache must fetch on its own then, and never lose its way.
struct Flaky {
    store: MemoryStore,
    dice: Dice,
    seen: Arc<Seen>,
}

impl Flaky {
    async fn call<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, BoxError>>,
    ) -> Result<T, BoxError> {
        self.dice.pause(2).await;
        if self.seen.chaos.load(SeqCst) && self.dice.roll(8) == 0 {
            return Err("the store is down".into());
        }
        call.await
    }
}

impl CredentialStore for Flaky {
    async fn load(&self) -> Result<Option<Credential>, BoxError> {
        self.call(self.store.load()).await
    }

    async fn lease(&self, ttl: Duration) -> Result<Option<Lease>, BoxError> {
        self.call(self.store.lease(ttl)).await
    }

    async fn save(&self, lease: &Lease, credential: &Credential) -> Result<bool, BoxError> {
        self.call(self.store.save(lease, credential)).await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, BoxError> {
        self.call(self.store.renew(lease, ttl)).await
    }

    // Never fails: a lease not given back makes every fetch wait until it runs out
    // (3 s), the design's answer, and would only slow the runs down.
    async fn release(&self, lease: &Lease) -> Result<(), BoxError> {
        self.store.release(lease).await
    }

    async fn remove(&self, rejected: &Credential) -> Result<(), BoxError> {
        self.call(self.store.remove(rejected)).await
    }

    fn changed(&self, timeout: Duration) -> impl std::future::Future<Output = ()> + Send {
        self.store.changed(timeout)
    }
}

/// What a run's cache shares its credentials through.
#[derive(Clone, Copy, Debug)]
enum Store {
    None,
    Memory,
    /// A memory store failing at random.
    Flaky,
}

/// What a request carries: its token, its id, and the number of the moment it started.
struct Sent {
    token: String,
    id: String,
    started: u64,
}

impl Sent {
    fn of(headers: &http::HeaderMap) -> Self {
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        Sent {
            token: text("authorization"),
            id: text("x-id"),
            started: text("x-started").parse().unwrap_or(u64::MAX),
        }
    }
}

/// The entry point a run's requests go through.
#[derive(Clone, Copy, Debug)]
enum Entry {
    /// `AuthLayer` over the API as a Tower service.
    Tower,
    /// The same without replay (`Direct`): a rejection invalidates, nothing is resent.
    Direct,
    /// `AuthMiddleware` in a reqwest client, to the API on a loopback server.
    Reqwest,
}

/// A Tower stack as the runs send through it: the status, or the error as text.
type TowerClient = tower::util::BoxCloneService<Request<Full<Bytes>>, u16, String>;

/// Either entry point, ready to send.
#[derive(Clone)]
enum Client {
    Tower(TowerClient),
    Reqwest(reqwest_middleware::ClientWithMiddleware, String),
}

impl Client {
    /// Sends one request with the id `id`, numbered as it starts: its status or error,
    /// or `None` if it did not end within 10 s. (By value: a boxed Tower service is not
    /// `Sync`.)
    async fn send(self, id: &str, seen: &Seen) -> Option<Result<u16, String>> {
        let id = http::HeaderValue::from_str(id).unwrap();
        let started = http::HeaderValue::from(seen.clock.fetch_add(1, SeqCst));
        let sent = async {
            match self {
                Client::Tower(svc) => {
                    let mut req = support::get("/r");
                    req.headers_mut().insert("x-id", id);
                    req.headers_mut().insert("x-started", started);
                    svc.oneshot(req).await
                }
                Client::Reqwest(client, base) => client
                    .get(format!("{base}/r"))
                    .header("x-id", id)
                    .header("x-started", started)
                    .send()
                    .await
                    .map(|res| res.status().as_u16())
                    .map_err(|e| e.to_string()),
            }
        };
        tokio::time::timeout(Duration::from_secs(10), sent)
            .await
            .ok()
    }
}

/// One run: six tasks sending 25 requests each while the application invalidates and
/// replaces the credential at random; then the checks.
async fn run(seed: u64, store: Store, entry: Entry) {
    let what = format!("seed {seed}, store {store:?}, {entry:?}");
    let dice = Dice::new(seed);
    let seen = Arc::new(Seen::default());
    seen.chaos.store(true, SeqCst);
    let mut cache = CredentialCache::builder(source(dice.clone(), seen.clone()))
        .hard_window(Duration::from_millis(20))
        .window_jitter(0.0)
        .backoff(Duration::from_millis(1), Duration::from_millis(8))
        .fetch_timeout(Duration::from_secs(5))
        // Every other seed, the aging timers refresh too, with no request asking.
        .keep_warm(seed % 2 == 1);
    match store {
        Store::None => {}
        Store::Memory => cache = cache.store(MemoryStore::new()),
        Store::Flaky => {
            cache = cache.store(Flaky {
                store: MemoryStore::new(),
                dice: dice.clone(),
                seen: seen.clone(),
            })
        }
    }
    let cache = cache.build().unwrap();
    let handle = cache.handle();
    let layer = AuthLayer::with_cache(cache.clone())
        .any_https_origin()
        .step_up(true);
    let client = match entry {
        Entry::Tower => {
            let api = {
                let (dice, seen) = (dice.clone(), seen.clone());
                tower::service_fn(move |req: ApiRequest| {
                    let (dice, seen) = (dice.clone(), seen.clone());
                    let sent = Sent::of(req.headers());
                    async move { Ok::<_, BoxError>(answer(&dice, &seen, sent).await) }
                })
            };
            let svc = layer
                .layer(api)
                .map_response(|res: Response<Full<Bytes>>| res.status().as_u16())
                .map_err(|e: BoxError| e.to_string());
            Client::Tower(tower::util::BoxCloneService::new(svc))
        }
        Entry::Direct => {
            let api = {
                let (dice, seen) = (dice.clone(), seen.clone());
                tower::service_fn(move |req: Request<Full<Bytes>>| {
                    let (dice, seen) = (dice.clone(), seen.clone());
                    let sent = Sent::of(req.headers());
                    async move { Ok::<_, BoxError>(answer(&dice, &seen, sent).await) }
                })
            };
            let svc = layer
                .without_replay()
                .layer(api)
                .map_response(|res: Response<Full<Bytes>>| res.status().as_u16())
                .map_err(|e: BoxError| e.to_string());
            Client::Tower(tower::util::BoxCloneService::new(svc))
        }
        Entry::Reqwest => {
            let addr = serve({
                let (dice, seen) = (dice.clone(), seen.clone());
                move |req: Request<hyper::body::Incoming>| {
                    let (dice, seen) = (dice.clone(), seen.clone());
                    let sent = Sent::of(req.headers());
                    async move { answer(&dice, &seen, sent).await }
                }
            })
            .await;
            let base = format!("http://{addr}");
            let auth = AuthMiddleware::with_cache(cache.clone())
                .origin(&base)
                .unwrap()
                .allow_http_loopback(true)
                .step_up(true);
            let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
                .with(auth)
                .build();
            Client::Reqwest(client, base)
        }
    };
    let done = Arc::new(AtomicBool::new(false));
    let meddling = tokio::spawn({
        let (dice, done, seen, cache) = (dice.clone(), done.clone(), seen.clone(), cache.clone());
        async move {
            let mut replaced = 0;
            while !done.load(SeqCst) {
                dice.pause(6).await;
                match dice.roll(12) {
                    0 => {
                        handle.invalidate();
                    }
                    1 | 2 => {
                        // Dropped by name: from now on no request may send it.
                        if let Ok(current) = cache.credential().await {
                            if handle.invalidate_if(&current) {
                                seen.dropped(&current);
                            }
                        }
                    }
                    10 | 11 => {
                        // A rejection seen outside the layer (a gRPC status, say).
                        if let Ok(current) = cache.credential().await {
                            let rejected = cache.stats().rejections;
                            // Dropped as `reject` is first polled, unless it was rejected
                            // fresh within that backoff: then it stays in use, and
                            // `reject` fails `Backoff` at once, with no failed fetch as
                            // its source (`YOUNG_CREDENTIAL_AGE`).
                            let mut answer = std::pin::pin!(cache.reject(&current));
                            let first = futures_util::future::poll_immediate(&mut answer).await;
                            let kept = matches!(&first, Some(Err(e))
                                if e.kind() == ErrorKind::Backoff && e.get_ref().is_none());
                            if !kept {
                                seen.dropped(&current);
                            }
                            let answer = match first {
                                Some(answer) => answer,
                                None => answer.await,
                            };
                            if cache.stats().rejections > rejected {
                                seen.rejects.fetch_add(1, SeqCst);
                            }
                            if answer.as_ref().is_ok_and(|c| *c == current) {
                                seen.rejects_answered_same
                                    .lock()
                                    .unwrap()
                                    .push(token(&current));
                            }
                        }
                    }
                    3 | 4 => {
                        replaced += 1;
                        let mine = Credential::bearer(format!("mine-{replaced}"))
                            .unwrap()
                            .expires_in(Duration::from_millis(300));
                        handle.replace(mine).unwrap();
                    }
                    _ => {}
                }
            }
        }
    });
    let mut calls = Vec::new();
    for task in 0..6 {
        let (client, dice, what, seen) = (client.clone(), dice.clone(), what.clone(), seen.clone());
        calls.push(tokio::spawn(async move {
            for i in 0..25 {
                let answered = client.clone().send(&format!("{task}-{i}"), &seen).await;
                assert!(answered.is_some(), "{what}: request {task}-{i} hung");
                dice.pause(3).await;
            }
        }));
    }
    for call in calls {
        call.await.unwrap();
    }
    done.store(true, SeqCst);
    meddling.await.unwrap();
    seen.chaos.store(false, SeqCst);
    assert_eq!(
        seen.most_running.load(SeqCst),
        1,
        "{what}: two fetches at once"
    );
    assert!(
        seen.same_token_replays.lock().unwrap().is_empty(),
        "{what}: replayed with the rejected token: {:?}",
        seen.same_token_replays.lock().unwrap()
    );
    assert!(
        seen.resurrected.lock().unwrap().is_empty(),
        "{what}: sent a credential dropped before the request started: {:?}",
        seen.resurrected.lock().unwrap()
    );
    assert!(
        seen.rejects_answered_same.lock().unwrap().is_empty(),
        "{what}: `reject` answered with the credential it was given: {:?}",
        seen.rejects_answered_same.lock().unwrap()
    );
    // A rejection is counted once per credential: by the layer for a 401, or by the
    // application's `reject`.
    let rejections = cache.stats().rejections;
    let rejected = seen.rejected.lock().unwrap().len() as u64 + seen.rejects.load(SeqCst);
    assert!(
        rejections <= rejected,
        "{what}: {rejections} rejections counted for {rejected} rejected credentials"
    );
    // Not wedged: once the backoff has run out, a request gets a credential and its
    // answer.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let last = client.clone().send("last", &seen).await;
    assert_eq!(last, Some(Ok(200)), "{what}: the last request");
    assert_eq!(seen.most_running.load(SeqCst), 1, "{what}");
}

/// World: 16 seeds (or the range `INTERLEAVING_SEEDS` names, `16..400` say, to look
/// further), each on a fresh two-thread runtime, without a store, with one, and with one
/// failing at random, through the Tower layer (replaying and `Direct`) and through
/// reqwest. Proves: the promises above hold in every one.
///
/// The seeds are dealt to [`PARTS`] tests by their remainder, which the harness runs side
/// by side: a run waits on its slow source far more than it computes.
fn random_interleavings_keep_the_refresh_paths_promises(part: u64) {
    let seeds = Dice::seeds("INTERLEAVING_SEEDS", 0..16).filter(|seed| seed % PARTS == part);
    for seed in seeds {
        for store in [Store::None, Store::Memory, Store::Flaky] {
            for entry in [Entry::Tower, Entry::Direct, Entry::Reqwest] {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(run(seed, store, entry));
            }
        }
    }
}

const PARTS: u64 = 4;

#[test]
fn random_interleavings_keep_the_refresh_paths_promises_seeds_0_mod_4() {
    random_interleavings_keep_the_refresh_paths_promises(0);
}

#[test]
fn random_interleavings_keep_the_refresh_paths_promises_seeds_1_mod_4() {
    random_interleavings_keep_the_refresh_paths_promises(1);
}

#[test]
fn random_interleavings_keep_the_refresh_paths_promises_seeds_2_mod_4() {
    random_interleavings_keep_the_refresh_paths_promises(2);
}

#[test]
fn random_interleavings_keep_the_refresh_paths_promises_seeds_3_mod_4() {
    random_interleavings_keep_the_refresh_paths_promises(3);
}
