//! What the benchmarks share: a no-op inner service, the request a user builds, and the
//! designs users would otherwise write (a `RwLock`, a `Mutex<Option<_>>`, a `watch`
//! receiver holding the header value).
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::{
    convert::Infallible,
    future::{Future, Ready, ready},
    pin::Pin,
    sync::{Arc, Mutex, RwLock},
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, header::AUTHORIZATION};
use http_body_util::Full;
use tower::{Layer, Service};
use tower_client_auth::{
    AddCredential, AuthLayer, BoxError, Credential, CredentialSource, SourceFn, source_fn,
};

pub const TOKEN: &str =
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJiZW5jaCIsImV4cCI6NDEwMjQ0NDgwMH0.c2lnbmF0dXJlLXNpZ25hdHVyZQ";
pub const JSON: &[u8] = br#"{"order_id":"8f2c1e","items":[{"sku":"A-100","qty":2},{"sku":"B-220","qty":1}],"note":"x"}"#;

/// Answers at once: the floor every variant is measured over.
#[derive(Clone, Copy, Debug, Default)]
pub struct Noop;

/// Answers at once, like [`Noop`], but holds a shared handle as a real client does
/// (hyper-util's `Client` clones a few `Arc`s): cloning it writes a reference count that
/// every clone shares. Shows what a middleware that clones its inner service per request
/// costs, which [`Noop`] hides.
#[derive(Clone, Debug, Default)]
pub struct Client(Arc<()>);

/// Both inner services: ready at once, an empty `200` at once.
macro_rules! answers_at_once {
    ($($service:ty),*) => {$(
        impl<B> Service<Request<B>> for $service {
            type Response = Response<()>;
            type Error = Infallible;
            type Future = Ready<Result<Response<()>, Infallible>>;

            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
                Poll::Ready(Ok(()))
            }

            fn call(&mut self, _: Request<B>) -> Self::Future {
                ready(Ok(Response::new(())))
            }
        }
    )*};
}

answers_at_once!(Noop, Client);

/// Answers at once, like [`Noop`], but its future is empty and builds the response when
/// polled, as real clients' futures are small (hyper-util's and reqwest's box their
/// state: 16 bytes) while [`Noop`]'s carries the whole 112-byte response from the call.
/// A middleware that wraps the response future moves that future a few times per request.
#[derive(Clone, Copy, Debug, Default)]
pub struct Lazy;

/// [`Lazy`]'s future: nothing until polled.
#[derive(Debug)]
pub struct LazyAnswer;

impl Future for LazyAnswer {
    type Output = Result<Response<()>, Infallible>;

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(Ok(Response::new(())))
    }
}

impl<B> Service<Request<B>> for Lazy {
    type Response = Response<()>;
    type Error = Infallible;
    type Future = LazyAnswer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<B>) -> Self::Future {
        LazyAnswer
    }
}

/// The request a user builds: a URI, two ordinary headers, a body.
pub fn request(body: &'static [u8]) -> Request<Full<Bytes>> {
    Request::post("https://api.example.com/v1/orders")
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .body(Full::new(Bytes::from_static(body)))
        .unwrap()
}

/// Drives one request to completion on the current thread, without a runtime: every
/// service here is ready at once and answers at once.
pub fn call<S, R>(svc: &mut S, req: R) -> S::Response
where
    S: Service<R>,
    S::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(Waker::noop());
    match svc.poll_ready(&mut cx) {
        Poll::Ready(Ok(())) => {}
        _ => panic!("service not ready"),
    }
    let mut fut = std::pin::pin!(svc.call(req));
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(Ok(res)) => res,
        Poll::Ready(Err(e)) => panic!("request failed: {e:?}"),
        Poll::Pending => panic!("request did not complete at once"),
    }
}

/// A credential that can change (so the layer keeps each request replayable): a token
/// valid for an hour, fetched once and then cached mid-life.
pub fn expiring_source() -> SourceFn {
    source_fn(|_| async {
        Ok::<_, BoxError>(Credential::bearer(TOKEN)?.expires_in(Duration::from_secs(3600)))
    })
}

/// A credential that can change but states no expiry: the hot path reads no clock for it.
pub fn never_expiring_source() -> SourceFn {
    source_fn(|_| async { Ok::<_, BoxError>(Credential::bearer(TOKEN)?) })
}

/// `layer` around [`Noop`], its credential fetched (inside `rt`: the first fetch is
/// spawned), so that every measured call takes the cached hot path.
pub fn warm<P: CredentialSource, M: Default>(
    rt: &tokio::runtime::Runtime,
    layer: AuthLayer<P, M>,
) -> AddCredential<Noop, P, M> {
    warm_over(rt, layer, Noop)
}

/// [`warm`], around `inner`.
pub fn warm_over<S, P: CredentialSource, M: Default>(
    rt: &tokio::runtime::Runtime,
    layer: AuthLayer<P, M>,
    inner: S,
) -> AddCredential<S, P, M> {
    rt.block_on(async { layer.cache().credential().await.unwrap() });
    layer.layer(inner)
}

/// Times `a` and `b` alternately, `rounds` times, the order flipping every round so that
/// neither always runs first, and returns the quartiles `[p25, median, p75]` of the
/// per-round ratio time(b) / time(a).
///
/// Criterion measures one variant for seconds, then the next: on a shared machine, load
/// that comes and goes between the two windows lands in their ratio. Here both sides of
/// every ratio are measured within the same few milliseconds.
pub fn paired(rounds: usize, mut a: impl FnMut(), mut b: impl FnMut()) -> [f64; 3] {
    let time = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        f();
        start.elapsed().as_secs_f64()
    };
    let mut ratios: Vec<f64> = (0..rounds)
        .map(|round| {
            let (ta, tb) = if round % 2 == 0 {
                let ta = time(&mut a);
                (ta, time(&mut b))
            } else {
                let tb = time(&mut b);
                (time(&mut a), tb)
            };
            tb / ta
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    let at = |q: usize| ratios[(ratios.len() - 1) * q / 4];
    [at(1), at(2), at(3)]
}

fn sensitive(token: &str) -> HeaderValue {
    let mut v = HeaderValue::try_from(format!("Bearer {token}")).unwrap();
    v.set_sensitive(true);
    v
}

/// The designs users would otherwise write: the header value behind some shared cell,
/// read per request by `read`, then inserted. The three baselines differ only in `read`.
#[derive(Clone)]
pub struct Baseline<S, R> {
    inner: S,
    read: R,
}

impl<S, R, B> Service<Request<B>> for Baseline<S, R>
where
    S: Service<Request<B>>,
    R: Fn() -> HeaderValue,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        req.headers_mut().insert(AUTHORIZATION, (self.read)());
        self.inner.call(req)
    }
}

/// A cache behind `std::sync::RwLock`: read-lock, clone the value.
pub fn rwlock_cache<S>(inner: S) -> Baseline<S, impl Fn() -> HeaderValue + Clone + Send> {
    let value = Arc::new(RwLock::new(sensitive(TOKEN)));
    Baseline {
        inner,
        read: move || value.read().unwrap().clone(),
    }
}

/// A cache behind `Mutex<Option<_>>`, as a quick hand-written cache does it.
pub fn mutex_cache<S>(inner: S) -> Baseline<S, impl Fn() -> HeaderValue + Clone + Send> {
    let value = Arc::new(Mutex::new(Some(sensitive(TOKEN))));
    Baseline {
        inner,
        read: move || value.lock().unwrap().clone().expect("cached"),
    }
}

/// A `tokio::sync::watch` receiver holding the header value (the sender is leaked so the
/// channel stays open for the whole benchmark).
pub fn watch_receiver<S>(inner: S) -> Baseline<S, impl Fn() -> HeaderValue + Clone + Send> {
    let (tx, rx) = tokio::sync::watch::channel(sensitive(TOKEN));
    std::mem::forget(tx);
    Baseline {
        inner,
        read: move || rx.borrow().clone(),
    }
}

/// A `tower::retry` policy that retries a 401 once, cloning every request (method, URI,
/// version, headers, extensions and body) before it is sent: the hand-made replay.
#[derive(Clone, Copy)]
pub struct CloneEachRequest;

impl<B: Clone, E> tower::retry::Policy<http::Request<B>, http::Response<()>, E>
    for CloneEachRequest
{
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _: &mut http::Request<B>,
        result: &mut Result<http::Response<()>, E>,
    ) -> Option<Self::Future> {
        match result {
            Ok(res) if res.status() == http::StatusCode::UNAUTHORIZED => {
                Some(std::future::ready(()))
            }
            _ => None,
        }
    }

    fn clone_request(&mut self, req: &http::Request<B>) -> Option<http::Request<B>> {
        let mut clone = http::Request::new(req.body().clone());
        *clone.method_mut() = req.method().clone();
        *clone.uri_mut() = req.uri().clone();
        *clone.version_mut() = req.version();
        *clone.headers_mut() = req.headers().clone();
        *clone.extensions_mut() = req.extensions().clone();
        Some(clone)
    }
}

/// tower's `Retry` (cloning every request) outside tower-http's `AddAuthorization`:
/// what a user writes to send a 401 once more by hand.
pub fn add_authorization_retry<S: Clone>(
    inner: S,
) -> tower::retry::Retry<CloneEachRequest, tower_http::auth::AddAuthorization<S>> {
    tower::retry::Retry::new(
        CloneEachRequest,
        tower_http::auth::AddAuthorizationLayer::bearer(TOKEN)
            .as_sensitive(true)
            .layer(inner),
    )
}

/// A yardstick for issue 26's 1.03x goal, not a design: the leanest middleware written
/// by hand that keeps the promises the layer's hot path pays for, and nothing else. It
/// sends its credential only over `https` (the `any_https_origin` rule, which implies
/// the transport rule), never once it has expired by the wall clock or by the monotonic
/// clock (`expires`, for a credential that can expire: a wall clock stepped back does not
/// make it young) nor once the API rejected it (`rejected`), and marks a
/// rejected answer for the caller. No cache, no refresh, no waiting, no generations: a
/// request with no credential to send fails.
#[derive(Clone)]
pub struct Promises<S> {
    inner: S,
    cell: Arc<PromiseCell>,
}

struct PromiseCell {
    value: HeaderValue,
    expires: Option<(std::time::SystemTime, std::time::Instant)>,
    rejected: std::sync::atomic::AtomicBool,
}

/// [`Promises`] with a credential that never expires (the layer's static credential).
pub fn promises_static<S>(inner: S) -> Promises<S> {
    promises(inner, None)
}

/// [`Promises`] with a credential that expires in an hour (the layer's expiring one).
pub fn promises_expiring<S>(inner: S) -> Promises<S> {
    promises(
        inner,
        Some((
            std::time::SystemTime::now() + Duration::from_secs(3600),
            std::time::Instant::now() + Duration::from_secs(3600),
        )),
    )
}

fn promises<S>(
    inner: S,
    expires: Option<(std::time::SystemTime, std::time::Instant)>,
) -> Promises<S> {
    Promises {
        inner,
        cell: Arc::new(PromiseCell {
            value: sensitive(TOKEN),
            expires,
            rejected: Default::default(),
        }),
    }
}

/// The mark a rejected answer carries.
#[derive(Clone, Copy, Debug)]
pub struct Rejected;

impl<S, B, ResBody> Service<Request<B>> for Promises<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<ResBody>;
    type Error = BoxError;
    type Future = PromiseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if req.uri().scheme() != Some(&http::uri::Scheme::HTTPS) {
            // Another origin: sent as it is.
            return PromiseFuture::Sent {
                future: self.inner.call(req),
                cell: None,
            };
        }
        let cell = &self.cell;
        if cell.rejected.load(std::sync::atomic::Ordering::Relaxed)
            || cell.expires.is_some_and(|(wall, at)| {
                std::time::SystemTime::now() >= wall || std::time::Instant::now() >= at
            })
        {
            return PromiseFuture::Failed;
        }
        if req
            .headers_mut()
            .try_append(AUTHORIZATION, cell.value.clone())
            .is_err()
        {
            return PromiseFuture::Failed;
        }
        PromiseFuture::Sent {
            future: self.inner.call(req),
            // Only a credential that can be invalidated needs the way back.
            cell: cell.expires.is_some().then(|| cell.clone()),
        }
    }
}

pin_project_lite::pin_project! {
    #[project = PromiseProj]
    pub enum PromiseFuture<F> {
        Sent { #[pin] future: F, cell: Option<Arc<PromiseCell>> },
        Failed,
    }
}

impl<F, E, ResBody> Future for PromiseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<ResBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (future, cell) = match self.project() {
            PromiseProj::Sent { future, cell } => (future, cell),
            PromiseProj::Failed => return Poll::Ready(Err("no credential to send".into())),
        };
        let mut response = std::task::ready!(future.poll(cx)).map_err(Into::into)?;
        if response.status() == http::StatusCode::UNAUTHORIZED {
            if let Some(cell) = cell {
                cell.rejected
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            response.extensions_mut().insert(Rejected);
        }
        Poll::Ready(Ok(response))
    }
}
