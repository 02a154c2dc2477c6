//! Shared helpers for the scenario tests: a scriptable, counting credential source, a
//! recording fake API service, and a real HTTP/1 server on 127.0.0.1.
#![allow(dead_code, unreachable_pub, unused_imports)]

pub mod contract;
pub mod dpop;
pub mod providers;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "token")]
pub mod retry_after;
#[cfg(feature = "token")]
pub mod scripted;
#[cfg(feature = "token")]
pub mod scrub;
pub mod store;
pub mod strict_idp;
#[cfg(feature = "https")]
pub mod tls;

use std::{
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::{sync::Semaphore, time::Instant};
use tower_client_auth::{
    BoxError, Credential, CredentialSource, FetchContext, FetchReason, RefreshMode, ReplayBody,
};

/// A credential source that issues `token-1`, `token-2`, ... and counts every fetch.
/// It can be gated (each fetch waits for a permit), made to fail, or made reactive-only.
#[derive(Clone)]
pub struct TestSource {
    inner: Arc<SourceState>,
}

struct SourceState {
    fetches: AtomicUsize,
    /// Fetches under way now, and the most ever at once.
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    lifetime: Option<Duration>,
    delay: Duration,
    gate: Option<Semaphore>,
    failing: AtomicBool,
    mode: RefreshMode,
    log: Mutex<Vec<(Instant, FetchReason)>>,
}

impl TestSource {
    pub fn new() -> Self {
        Self::build(None, Duration::ZERO, false, RefreshMode::Proactive)
    }

    pub fn build(
        lifetime: Option<Duration>,
        delay: Duration,
        gated: bool,
        mode: RefreshMode,
    ) -> Self {
        TestSource {
            inner: Arc::new(SourceState {
                fetches: AtomicUsize::new(0),
                in_flight: AtomicUsize::new(0),
                max_in_flight: AtomicUsize::new(0),
                lifetime,
                delay,
                gate: gated.then(|| Semaphore::new(0)),
                failing: AtomicBool::new(false),
                mode,
                log: Mutex::new(Vec::new()),
            }),
        }
    }

    /// A proactive source whose every fetch waits for a permit (see [`release`](Self::release)).
    pub fn gated(lifetime: Option<Duration>) -> Self {
        Self::build(lifetime, Duration::ZERO, true, RefreshMode::Proactive)
    }

    pub fn expiring(lifetime: Duration) -> Self {
        Self::build(
            Some(lifetime),
            Duration::ZERO,
            false,
            RefreshMode::Proactive,
        )
    }

    /// Number of fetches started.
    pub fn fetches(&self) -> usize {
        self.inner.fetches.load(Ordering::SeqCst)
    }

    /// The most fetches that were ever under way at once (a cancelled one ends when
    /// it is dropped).
    pub fn max_in_flight(&self) -> usize {
        self.inner.max_in_flight.load(Ordering::SeqCst)
    }

    /// Lets `n` gated fetches finish.
    pub fn release(&self, n: usize) {
        self.inner
            .gate
            .as_ref()
            .expect("gated source")
            .add_permits(n);
    }

    pub fn set_failing(&self, failing: bool) {
        self.inner.failing.store(failing, Ordering::SeqCst);
    }

    /// When each fetch started, and why.
    pub fn log(&self) -> Vec<(Instant, FetchReason)> {
        self.inner.log.lock().unwrap().clone()
    }
}

impl CredentialSource for TestSource {
    async fn fetch(&self, cx: FetchContext) -> Result<Credential, BoxError> {
        let n = self.inner.fetches.fetch_add(1, Ordering::SeqCst) + 1;
        struct InFlight<'a>(&'a AtomicUsize);
        impl Drop for InFlight<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let now = self.inner.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        let _in_flight = InFlight(&self.inner.in_flight);
        self.inner.max_in_flight.fetch_max(now, Ordering::SeqCst);
        self.inner
            .log
            .lock()
            .unwrap()
            .push((Instant::now(), cx.reason()));
        if let Some(gate) = &self.inner.gate {
            gate.acquire().await?.forget();
        }
        if !self.inner.delay.is_zero() {
            tokio::time::sleep(self.inner.delay).await;
        }
        if self.inner.failing.load(Ordering::SeqCst) {
            return Err("token endpoint answered 503".into());
        }
        let credential = Credential::bearer(format!("token-{n}"))?;
        Ok(match self.inner.lifetime {
            Some(lifetime) => credential.expires_in(lifetime),
            None => credential,
        })
    }

    fn refresh_mode(&self) -> RefreshMode {
        self.inner.mode
    }
}

/// One request as the fake API saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub authorization: Option<String>,
    pub body: Vec<u8>,
}

/// What the fake API answers, given the request's path and bearer token.
pub type Rule = Arc<dyn Fn(&str, Option<&str>) -> StatusCode + Send + Sync>;

/// A fake API (a Tower service, no network) that records every request it sees,
/// reading the whole body, and answers by `rule`.
#[derive(Clone)]
pub struct FakeApi {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    rule: Rule,
}

impl FakeApi {
    pub fn new(rule: impl Fn(&str, Option<&str>) -> StatusCode + Send + Sync + 'static) -> Self {
        FakeApi {
            seen: Arc::default(),
            rule: Arc::new(rule),
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn service(
        &self,
    ) -> impl tower::Service<
        Request<ReplayBody<Full<Bytes>>>,
        Response = Response<String>,
        Error = Infallible,
        Future: Send,
    >
    + Clone
    + Send
    + 'static
    + use<> {
        let api = self.clone();
        tower::service_fn(move |req: Request<ReplayBody<Full<Bytes>>>| {
            let api = api.clone();
            async move {
                let path = req.uri().path().to_owned();
                let authorization = req
                    .headers()
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_owned());
                let body = req.into_body().collect().await.unwrap().to_bytes().to_vec();
                let token = authorization
                    .as_deref()
                    .and_then(|a| a.strip_prefix("Bearer "));
                let status = (api.rule)(&path, token);
                api.seen.lock().unwrap().push(Seen {
                    path,
                    authorization,
                    body,
                });
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(status)
                        .body(format!("{}", status.as_u16()))
                        .unwrap(),
                )
            }
        })
    }
}

/// A handle to a runtime that has shut down: a thread that enters it has every task it
/// spawns refused.
pub fn dead_runtime() -> tokio::runtime::Handle {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let handle = runtime.handle().clone();
    runtime.shutdown_background();
    handle
}

/// A minimal executor: polls a future on this thread until it is ready (for a thread
/// that has entered a runtime which no longer runs tasks).
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        std::thread::park();
    }
}

/// A request to `path` on the fake API host, over https.
pub fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("https://api.test{path}"))
        .body(Full::default())
        .unwrap()
}

/// A POST with a body.
pub fn post(path: &str, body: &'static [u8]) -> Request<Full<Bytes>> {
    Request::post(format!("https://api.test{path}"))
        .body(Full::new(Bytes::from_static(body)))
        .unwrap()
}

pub use providers::serve;

/// A plain hyper-util HTTP/1 client for the API side, as a user would build it.
pub fn api_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    ReplayBody<Full<Bytes>>,
> {
    api_client_for()
}

/// The layer over [`api_client`], as the loopback token tests stack it.
pub type ApiStack<P> = tower_client_auth::AddCredential<
    hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        ReplayBody<Full<Bytes>>,
    >,
    P,
>;

/// `cache` over [`api_client`], any https origin and loopback http.
pub fn api_stack<P: CredentialSource>(cache: tower_client_auth::CredentialCache<P>) -> ApiStack<P> {
    use tower::Layer;
    tower_client_auth::AuthLayer::with_cache(cache)
        .any_https_origin()
        .allow_http_loopback(true)
        .layer(api_client())
}

/// The status of a GET of `url` through `svc`, its body read to the end.
pub async fn api_status<P: CredentialSource>(
    svc: &ApiStack<P>,
    url: &str,
) -> Result<StatusCode, BoxError> {
    use tower::ServiceExt;
    let res = svc
        .clone()
        .oneshot(Request::get(url).body(Full::<Bytes>::default()).unwrap())
        .await?;
    let status = res.status();
    res.into_body().collect().await?;
    Ok(status)
}

/// [`api_client`] for request bodies of type `B`: `Full<Bytes>` under a layer in
/// `Direct` mode.
#[allow(dead_code)]
pub fn api_client_for<B>()
-> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// The default HTTPS token client, allowed to reach the loopback test servers.
#[cfg(feature = "https")]
pub fn token_client() -> tower_client_auth::token::TokenClient {
    tower_client_auth::token::TokenClient::hyper_rustls()
        .unwrap()
        .allow_http_loopback(true)
}

/// Captures everything `tracing` emits, at every level, into a buffer.
#[derive(Clone, Default)]
pub struct Capture(pub Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Tracing caches, call site by call site, whether anyone listens, as the first thread
/// reaches it: another test's thread (no subscriber there) could make a call site
/// silent for a test that listens on its own thread, more likely the more tests run at
/// once. A global subscriber that listens to everything and keeps nothing (a bare
/// registry) keeps every call site live; the tests that listen install it first.
pub fn keep_call_sites_live() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
    });
}

/// Installs a subscriber that captures everything `tracing` emits, at every level, on this
/// thread (the tests run on current-thread runtimes, so spawned tasks are included).
pub fn capture_traces() -> (Capture, tracing::subscriber::DefaultGuard) {
    keep_call_sites_live();
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    (capture, tracing::subscriber::set_default(subscriber))
}

impl Capture {
    /// Everything captured so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// What the server saw: (path, authorization, body) per request.
pub type Log = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

/// A server that answers by `rule(path, authorization, attempt number on that path)`.
pub async fn logging_api(
    rule: impl Fn(&str, &str, usize) -> StatusCode + Send + Sync + 'static,
) -> (String, Log) {
    let log: Log = Arc::default();
    let rule = Arc::new(rule);
    let addr = serve({
        let log = log.clone();
        move |req: Request<hyper::body::Incoming>| {
            let (log, rule) = (log.clone(), rule.clone());
            async move {
                let req = providers::read(req).await;
                let auth = req
                    .headers
                    .get(http::header::AUTHORIZATION)
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                let mut log = log.lock().unwrap();
                let attempt = log.iter().filter(|(p, _, _)| *p == req.path).count() + 1;
                log.push((req.path.clone(), auth.clone(), req.body.to_vec()));
                let status = rule(&req.path, &auth, attempt);
                Response::builder()
                    .status(status)
                    .body(Full::new(Bytes::new()))
                    .unwrap()
            }
        }
    })
    .await;
    (format!("http://{addr}"), log)
}

/// Each request a [`recording_api`] saw: what its label names it by, and its
/// `Authorization`.
pub type Recorded = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// The `Host` a request named (empty for none): a `recording_api` label for a front
/// that routes by it.
pub fn host_named(req: &Request<hyper::body::Incoming>) -> String {
    req.headers()
        .get(http::header::HOST)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// A server that answers `status` to every request and records, for each, `label` of it
/// and its `Authorization`.
pub async fn recording_api(
    status: StatusCode,
    label: fn(&Request<hyper::body::Incoming>) -> String,
) -> (std::net::SocketAddr, Recorded) {
    let seen: Recorded = Arc::default();
    let addr = serve({
        let seen = seen.clone();
        move |req: Request<hyper::body::Incoming>| {
            let seen = seen.clone();
            async move {
                let auth = req
                    .headers()
                    .get(http::header::AUTHORIZATION)
                    .map(|v| v.to_str().unwrap().to_owned());
                seen.lock().unwrap().push((label(&req), auth));
                Response::builder()
                    .status(status)
                    .body(Full::new(Bytes::new()))
                    .unwrap()
            }
        }
    })
    .await;
    (addr, seen)
}

/// The `Authorization` of each request a [`recording_api`] saw.
pub fn auths(seen: &Recorded) -> Vec<Option<String>> {
    seen.lock()
        .unwrap()
        .iter()
        .map(|(_, a)| a.clone())
        .collect()
}

/// A seeded random stream, shared by every task of one random-interleavings run (the
/// order the tasks draw in is the runtime's; the seed picks the mix).
#[derive(Clone)]
pub struct Dice(Arc<std::sync::atomic::AtomicU64>);

impl Dice {
    /// The seeds a random-interleavings test runs: `default`, or the range the
    /// environment variable `var` names (`16..400`, say), to look further by hand.
    pub fn seeds(var: &str, default: std::ops::Range<u64>) -> std::ops::Range<u64> {
        let Ok(range) = std::env::var(var) else {
            return default;
        };
        let parse = |n: &str| n.trim().parse::<u64>().ok();
        match range.split_once("..").map(|(a, b)| (parse(a), parse(b))) {
            Some((Some(from), Some(to))) => from..to,
            _ => panic!("{var}={range:?}: expected a range such as 16..400"),
        }
    }

    pub fn new(seed: u64) -> Self {
        Dice(Arc::new(std::sync::atomic::AtomicU64::new(
            seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
        )))
    }

    /// A number in `0..n` (splitmix64 over a shared counter).
    pub fn roll(&self, n: u64) -> u64 {
        let mut z = self.0.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::SeqCst);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }

    /// Sleeps up to `ms` milliseconds, or only yields.
    pub async fn pause(&self, ms: u64) {
        match self.roll(ms + 1) {
            0 => tokio::task::yield_now().await,
            d => tokio::time::sleep(Duration::from_millis(d)).await,
        }
    }
}

/// A fresh directory under the system's temporary one, removed (with what is in it)
/// when dropped, also when its test panics.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    /// `tca-{name}-{pid}`, emptied if a run before left it.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tca-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// `name` in the directory.
    pub fn join(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A request body fed by the test: frames (or an error) come when the test sends them.
pub struct Fed(
    pub tokio::sync::mpsc::UnboundedReceiver<Result<http_body::Frame<Bytes>, &'static str>>,
);

impl http_body::Body for Fed {
    type Data = Bytes;
    type Error = &'static str;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, &'static str>>> {
        self.0.poll_recv(cx)
    }
}

/// A request body fed by the test, of unknown length: it never ends while its sender
/// lives.
pub struct Open(pub tokio::sync::mpsc::UnboundedReceiver<Bytes>);

impl http_body::Body for Open {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(http_body::Frame::data(c))))
    }
}

/// A loopback port that refuses connections and stays this test's: bound but not
/// listening (a port bound and dropped may be handed to another test's server running
/// beside it, which would then answer). Drop it to take the port for a server.
pub fn refusing_port() -> (std::net::SocketAddr, tokio::net::TcpSocket) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    (socket.local_addr().unwrap(), socket)
}
