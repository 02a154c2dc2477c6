//! [`ResponseFuture`]: the per-request state machine of [`AddCredential`](crate::AddCredential).
//!
//! ```text
//!        credential cached ─────────────────────────────┐
//! call ──┤                                               ▼
//!        └─ must wait ─▶ Waiting ─credential, a readied clone─▶ First ─▶ done (no rejection)
//!                                                        │ rejection status
//!                                                        ▼
//!                              replayable? ── no ──▶ done (with a `NotReplayed` extension)
//!                                                        │ yes: keep the rejected response
//!                                                        ▼
//!                                Refreshing ──new credential, a readied clone──▶ Second ──▶ done
//!                                    │ the same credential, or a fresh one rejected again
//!                                    ▼
//!                       done: the rejected response, with a `NotReplayed` extension
//! ```
//!
//! A request is sent at most twice, and never twice with the same credential unless the
//! server asked for a new DPoP proof (`use_dpop_nonce`, a refused proof). The
//! rejection invalidates the credential only if it is still the cache's current one, so
//! concurrent rejections share one refresh. A request that must wait for a credential
//! releases the readiness it was called with (a concurrency permit, a buffer slot) and
//! readies a clone of the inner service once the credential is there; a request refused
//! before it is sent (an insecure transport, no room for the credential) releases it too.
//! A replay (and a resend for a new DPoP proof) readies its clone the same way, and
//! makes its proof only once the clone is ready. Once ready, each looks at its credential
//! again: one dropped meanwhile (invalidated, rejected) is not sent, and the cache's
//! credential as it is then is taken instead, the readiness given back while it comes.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower::util::Oneshot;
use tower_service::Service;

use crate::{
    body::{NotReplayed, ReplayBody, ReplayHandle},
    bound::Sent,
    cache::{Acquire, CacheRef, CredentialCache, Entry},
    credential::Credential,
    error::{BoxError, Error},
    head::Head,
    policy::{ExistingHeader, NoReplay, Policy},
    rejection::{InsufficientScope, Judge, Verdict},
    source::CredentialSource,
};

/// The rules a request meets before it gets the credential, in their order: given no
/// origin, refused (fail closed); another origin, `Ok(false)` (no credential, sent as it
/// is); the transport rule; `Ok(true)`.
#[inline(always)]
pub(crate) fn admits<B>(
    scope: Option<&crate::scope::Scope>,
    policy: &Policy,
    req: &Request<B>,
) -> Result<bool, Error> {
    let Some(scope) = scope else {
        return Err(Error::new(crate::error::ErrorKind::NoOrigin));
    };
    if !scope.allows(req.uri(), req.extensions(), policy.allow_relative_uris) {
        return Ok(false);
    }
    // A `Host` header naming another origin than the URI's sends the request there.
    if crate::scope::has_host_header(req.headers()) && !host_header_agrees(scope, req) {
        return Ok(false);
    }
    policy.check_transport(req.uri()).map(|()| true)
}

/// [`admits`]' `Host` rule for a request that has the header: an absolute URI's names
/// its own origin; a relative one's (whose origin is set below, by the inner service,
/// and which a connection sends with this header) names an origin in scope.
#[cold]
#[inline(never)]
fn host_header_agrees<B>(scope: &crate::scope::Scope, req: &Request<B>) -> bool {
    let uri = req.uri();
    match (uri.scheme_str(), uri.authority()) {
        (Some(scheme), Some(authority)) => crate::scope::named_port(authority).is_ok_and(|port| {
            crate::scope::host_headers_agree(scheme, authority.host(), port, req.headers())
        }),
        _ => scope.names_relative_host(uri, req.headers()),
    }
}

pin_project! {
    /// Response future of [`AddCredential`](crate::AddCredential). See the [module docs](self).
    pub struct ResponseFuture<S, B, P>
    where
        S: Service<Request<ReplayBody<B>>>,
        B: Body,
    {
        #[pin]
        state: State<S, B, P>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B, P>
    where
        S: Service<Request<ReplayBody<B>>>,
        B: Body,
    {
        Failed { error: Option<Error> },
        // Rare (no usable credential yet): the whole request is boxed, so that the
        // common state, and every move of this future, stays small.
        Waiting { acquire: Acquire, pending: Option<Box<Pending<S, B, P>>> },
        First { #[pin] future: S::Future, retry: Option<Retry<S, B, P>> },
        // The replay path boxes its large payloads (a whole rebuilt request): one
        // allocation per replay keeps every hot-path move of this future small.
        Refreshing { acquire: Acquire, resend: Option<Box<Resend<S, B, P>>> },
        // The cache and generation of the replay's credential, to record its acceptance.
        Second {
            future: Pin<Box<Oneshot<S, Request<ReplayBody<B>>>>>,
            judge: Judge,
            // Why the request was sent again.
            why: Again,
            cache: CacheRef<P>,
            generation: u64,
            // The replay's proof, when its credential is bound to a key.
            dpop: Option<Box<Sent>>,
        },
    }
}

impl<S, B, P> fmt::Debug for ResponseFuture<S, B, P>
where
    S: Service<Request<ReplayBody<B>>>,
    B: Body,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Failed { .. } => "failed",
            State::Waiting { .. } => "waiting for a credential",
            State::First { .. } => "first attempt",
            State::Refreshing { .. } => "refreshing after a rejection",
            State::Second { .. } => "replay",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

/// Why a request is sent a second time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Again {
    /// Its credential was rejected: with a new one.
    Rejected,
    /// Its credential lacked a scope: with a wider one.
    SteppedUp,
    /// The server wanted a nonce in the proof, or refused the proof: with the same
    /// credential and a new proof.
    NewProof,
}

/// A request waiting for its first credential, then for its service to be ready.
struct Pending<S, B, P> {
    /// A clone that was not polled ready: readied once the credential is there.
    service: S,
    /// The credential, once it arrived.
    entry: Option<Arc<Entry>>,
    request: Request<B>,
    cache: CredentialCache<P>,
    policy: Policy,
}

/// What the first attempt keeps in case its credential is rejected.
struct Retry<S, B, P> {
    /// `None` when the credential cannot change ([`RefreshMode::Never`]): nothing to
    /// invalidate or refetch, so the request does not hold a reference to the cache (an
    /// atomic increment and decrement saved per request).
    ///
    /// [`RefreshMode::Never`]: crate::RefreshMode::Never
    cache: Option<CacheRef<P>>,
    generation: u64,
    judge: Judge,
    /// Whether an `insufficient_scope` answer steps up (see `Policy::step_up`).
    step_up: bool,
    replay: Result<Replay<S, B>, NotReplayed>,
    /// The proof sent, when the credential is bound to a key (DPoP): its answer may
    /// carry a nonce, or ask for one.
    dpop: Option<Box<Sent>>,
}

impl<S, B, P: CredentialSource> Retry<S, B, P> {
    /// The answer accepts the credential: the cache hears so, and the replay's body
    /// goes now (see [`release`](Self::release)).
    #[inline(always)]
    fn accepted(&self) {
        if let Some(cache) = &self.cache {
            cache.accepted(self.generation);
        }
        self.release();
    }

    /// The answer is not a rejection: nobody will replay, so what the recording holds
    /// (a body's rest handed back) goes now, not with the future (a caller may keep a
    /// settled future a while).
    #[inline(always)]
    fn release(&self) {
        if let Ok(replay) = &self.replay {
            replay.body.release();
        }
    }
}

/// What a replay is rebuilt from. Not a `Request`: the body is rebuilt from the recording.
struct Replay<S, B> {
    service: S,
    head: Head,
    body: ReplayHandle<B>,
    /// The policy's rule for a header the request brings (`ExistingHeader::Replace`),
    /// applied again to the replay.
    replace: bool,
}

/// A replay's head and a body that has not settled yet (see `Resend::request`).
type Unsettled<B> = (Head, ReplayHandle<B>);

/// A replay waiting for its new credential (or, for a new proof, the same one), then for
/// its service clone to be ready; its request is built when the credential is there (its
/// body may have been settling until then: `unsettled`).
struct Resend<S: Service<Request<ReplayBody<B>>>, B: Body, P> {
    service: S,
    /// `Err`: the head and a body that gave every byte it declared without showing its
    /// end yet (see `ReplayHandle::unsettled`); the request is built when the new
    /// credential is there, if the body settled by then. (`Err(None)` only while it is
    /// built.)
    request: Result<Request<ReplayBody<B>>, Option<Unsettled<B>>>,
    judge: Judge,
    cache: CacheRef<P>,
    /// The rejected credential (`None` if the cache no longer knows it) and response:
    /// if the source hands the same credential back, a replay cannot help, and the
    /// rejection is returned as it came.
    rejected: Option<Credential>,
    /// `None` once the new credential came: released then.
    response: Option<S::Response>,
    /// See [`Replay::replace`].
    replace: bool,
    /// For a step-up: what the API said was missing, put back on `response` if it goes
    /// back to the caller. Cleared when the replay takes the cache's credential on a
    /// second look.
    scope: Option<InsufficientScope>,
    /// The new credential, once it arrived, while the service gets ready.
    entry: Option<Arc<Entry>>,
    /// Why the request goes again: after a second look at the cache (its first
    /// credential dropped while the service got ready), as after a rejection.
    why: Again,
    /// For a new proof: the generation of the credential the server answered about. A
    /// resend that gets another goes as after a rejection (its answer says nothing of
    /// that one).
    asked: Option<u64>,
    /// The `DPoP-Nonce` of the answer that caused this replay, kept when the answer is
    /// released: the server's, whichever key proves the replay (one bound to a key
    /// other than the first attempt's, taken on the first or a second look, gets it).
    nonce: Option<http::HeaderValue>,
    /// When that answer came ([`crate::bound::nonce_stamp`]), to order its nonce
    /// against those other answers give meanwhile: the stamp the first attempt's key
    /// kept it with, when it did (any later stamp would put it over a nonce another
    /// answer gave in between); else taken when the resend is built.
    answered: u64,
}

impl<S, B, P> ResponseFuture<S, B, P>
where
    S: Service<Request<ReplayBody<B>>> + Clone,
    B: Body,
    B::Data: Into<Bytes>,
    P: CredentialSource,
{
    /// The request path of [`Replaying`](crate::Replaying), over borrowed parts: the
    /// layer's `call`, and the reqwest middleware's per request (which has no
    /// `AddCredential` of its own, so that no shared count is written per request).
    /// `rules` decides whether the request gets the credential ([`admits`]: the origin and
    /// transport rules over its URI; the reqwest middleware decides from the URL reqwest
    /// has parsed instead). `usable` reads the credential (only for a request in scope
    /// that may be sent); `cache_ref` is the way back to the cache a replayable request
    /// keeps. Always inlined: the layer's hot path is this (the request is not passed on
    /// to another function before it is sent: that cost a copy of it, +28 instructions).
    #[inline(always)]
    pub(crate) fn start<E: std::ops::Deref<Target = Entry>>(
        inner: &mut S,
        cache: &CredentialCache<P>,
        policy: &Policy,
        rules: impl FnOnce(&Request<B>) -> Result<bool, Error>,
        req: Request<B>,
        usable: impl FnOnce() -> Result<E, Acquire>,
        cache_ref: impl FnOnce() -> CacheRef<P>,
    ) -> Self {
        match rules(&req) {
            Ok(true) => {}
            // Another origin: no credential, so no transport rule, refresh or replay.
            Ok(false) => return Self::passthrough(inner, req),
            Err(err) => return Self::refused(inner, err),
        }
        match usable() {
            Ok(current) => {
                // A credential that cannot change needs no way back to the cache.
                let cache = cache.refreshes().then(cache_ref);
                Self::send(inner, req, &current, cache, policy)
            }
            Err(acquire) => {
                // Nothing is sent until the credential is there: the readiness this
                // service holds (a concurrency permit, a buffer slot, a pooled
                // connection) is released now rather than held through the refresh. The
                // request readies a clone of its own once it has the credential.
                release_readiness(inner);
                let unready = inner.clone();
                Self::wait(acquire, unready, req, cache.clone(), policy.clone())
            }
        }
    }

    pub(crate) fn failed(error: Error) -> Self {
        ResponseFuture {
            state: State::Failed { error: Some(error) },
        }
    }

    /// Sends `request` as it is, through `service` (polled ready): no credential, no
    /// refresh, no replay.
    pub(crate) fn passthrough(service: &mut S, request: Request<B>) -> Self {
        let future = service.call(request.map(ReplayBody::forward));
        ResponseFuture {
            state: State::First {
                future,
                retry: None,
            },
        }
    }

    pub(crate) fn wait(
        acquire: Acquire,
        service: S,
        request: Request<B>,
        cache: CredentialCache<P>,
        policy: Policy,
    ) -> Self {
        let pending = Pending {
            service,
            entry: None,
            request,
            cache,
            policy,
        };
        ResponseFuture {
            state: State::Waiting {
                acquire,
                pending: Some(Box::new(pending)),
            },
        }
    }

    /// Attaches `entry`'s credential and sends the first attempt through `service`
    /// (polled ready). `cache` is `None` for a credential that cannot change. Only a
    /// request that may be replayed clones the service (for its second attempt), and one
    /// refused before it is sent (to release its readiness). Always inlined into
    /// `AddCredential::call`: passing the request and returning the future through a call
    /// cost ~30 instructions per request (BENCHMARKS.md's git history, 2026-12-02).
    #[inline(always)]
    pub(crate) fn send(
        service: &mut S,
        mut request: Request<B>,
        entry: &Entry,
        cache: Option<CacheRef<P>>,
        policy: &Policy,
    ) -> Self {
        let not_replayed = if !policy.replay || request.extensions().get::<NoReplay>().is_some() {
            Some(NotReplayed::OptedOut)
        } else if cache.is_none() {
            Some(NotReplayed::FixedCredential)
        } else {
            None
        };
        // Two paths, each building its state directly: a head that may or may not be
        // there, carried through one path, was moved (80 bytes) twice per request.
        let Some(reason) = not_replayed else {
            // The snapshot is taken before the credential is attached: a replay gets the new one.
            let head = Head::of(&request);
            match policy.attach(&entry.credential, &mut request) {
                Ok(true) => {}
                Ok(false) => return ResponseFuture::passthrough(service, request),
                Err(err) => return Self::refused(service, err),
            }
            let dpop = Sent::of(&entry.credential, request.uri());
            let Some(head) = head else {
                let future = service.call(request.map(ReplayBody::forward));
                return Self::first(
                    future,
                    entry,
                    cache,
                    policy,
                    Err(NotReplayed::HeadUnavailable),
                    dpop,
                );
            };
            let (parts, body) = request.into_parts();
            let (body, handle) = ReplayBody::record_declared(body, policy.replay_limit, || {
                crate::body::content_length(&parts.headers)
            });
            let future = service.call(Request::from_parts(parts, body));
            // Cloned after the call, so that the clone is not the instance polled ready.
            let replay = Replay {
                service: service.clone(),
                head,
                body: handle,
                replace: policy.existing_header == ExistingHeader::Replace,
            };
            return Self::first(future, entry, cache, policy, Ok(replay), dpop);
        };
        match policy.attach(&entry.credential, &mut request) {
            Ok(true) => {}
            // The request brings its own credential (or a part of ours as its own):
            // sent as it is, never judged nor replayed.
            Ok(false) => return ResponseFuture::passthrough(service, request),
            Err(err) => return Self::refused(service, err),
        }
        let dpop = Sent::of(&entry.credential, request.uri());
        let future = service.call(request.map(ReplayBody::forward));
        Self::first(future, entry, cache, policy, Err(reason), dpop)
    }

    /// The future of a request refused before it is sent (`err`). Nothing will be sent,
    /// so the readiness `service` holds (a concurrency permit, a buffer slot) goes back
    /// now.
    #[cold]
    #[inline(never)]
    pub(crate) fn refused(service: &mut S, err: Error) -> Self {
        release_readiness(service);
        ResponseFuture::failed(err)
    }

    /// The state of a first attempt sent as `future`.
    #[inline(always)]
    fn first(
        future: S::Future,
        entry: &Entry,
        cache: Option<CacheRef<P>>,
        policy: &Policy,
        replay: Result<Replay<S, B>, NotReplayed>,
        dpop: Option<Box<Sent>>,
    ) -> Self {
        ResponseFuture {
            state: State::First {
                future,
                retry: Some(Retry {
                    cache,
                    generation: entry.generation,
                    judge: policy.judge.clone(),
                    step_up: policy.step_up,
                    replay,
                    dpop,
                }),
            },
        }
    }

    /// [`send`](Self::send) for a request that waited for its credential: the rare path,
    /// kept out of `poll`.
    #[inline(never)]
    fn send_after_wait(
        service: &mut S,
        request: Request<B>,
        entry: &Entry,
        cache: Option<CacheRef<P>>,
        policy: &Policy,
    ) -> Self {
        Self::send(service, request, entry, cache, policy)
    }
}

impl<S, B, P, ResBody> Future for ResponseFuture<S, B, P>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    B: Body,
    B::Data: Into<Bytes>,
    P: CredentialSource,
{
    type Output = Result<Response<ResBody>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Failed { error } => {
                    let error = error.take().unwrap_or_else(polled_after_completion);
                    return Poll::Ready(Err(error.into()));
                }
                StateProj::Waiting { acquire, pending } => {
                    let Some(p) = pending.as_mut() else {
                        return Poll::Ready(Err(polled_after_completion().into()));
                    };
                    if p.entry.is_none() {
                        let entry = ready!(Pin::new(&mut *acquire).poll(cx));
                        match entry {
                            Ok(entry) => p.entry = Some(entry),
                            Err(err) => {
                                *pending = None;
                                return Poll::Ready(Err(err.into()));
                            }
                        }
                    }
                    // The service was not readied for this request (see `AddCredential::call`):
                    // ready it now that there is something to send.
                    if let Err(err) = ready!(p.service.poll_ready(cx)) {
                        *pending = None;
                        return Poll::Ready(Err(err.into()));
                    }
                    // Readiness may take long (a concurrency limit, a balancer): a
                    // credential dropped (or expired) meanwhile is not sent; the cache's
                    // credential as it is now is, the service readied again for it.
                    if p.entry
                        .as_deref()
                        .is_some_and(|entry| !p.cache.still_sendable(entry))
                    {
                        p.entry = None;
                        // Its readiness is not held through a refresh.
                        release_readiness(&mut p.service);
                        *acquire = p.cache.current_entry();
                        continue;
                    }
                    let Some(p) = pending.take() else {
                        return Poll::Ready(Err(polled_after_completion().into()));
                    };
                    let Pending {
                        mut service,
                        entry,
                        request,
                        cache,
                        policy,
                    } = *p;
                    let Some(entry) = entry else {
                        return Poll::Ready(Err(polled_after_completion().into()));
                    };
                    let cache = cache.refreshes().then_some(CacheRef::Shared(cache));
                    let next = ResponseFuture::send_after_wait(
                        &mut service,
                        request,
                        &entry,
                        cache,
                        &policy,
                    );
                    this.state.set(next.state);
                }
                StateProj::First { future, retry } => {
                    let mut response = ready!(future.poll(cx)).map_err(Into::into)?;
                    // Look before taking: the common answer leaves `retry` in place, to be
                    // dropped with the future, instead of moving it out first.
                    let verdict = match retry.as_ref() {
                        Some(r) if r.judge.accepts_at_once(response.status()) => {
                            // The common answer, first and apart from the rest.
                            if let Some(sent) = &r.dpop {
                                sent.saw(response.headers());
                            }
                            r.accepted();
                            return Poll::Ready(Ok(response));
                        }
                        Some(r) => r.judge.verdict(&response),
                        None => return Poll::Ready(Ok(response)),
                    };
                    // Any answer may carry the server's next nonce: `Some(kept)`, with
                    // the stamp it was kept with (if it was), when a proof was sent.
                    let nonce = match retry.as_ref() {
                        Some(Retry {
                            dpop: Some(sent), ..
                        }) => Some(sent.saw(response.headers())),
                        _ => None,
                    };
                    let scope = match verdict {
                        Verdict::Rejected => None,
                        Verdict::InsufficientScope { scope } => Some(InsufficientScope { scope }),
                        // A new proof: the server gave the nonce it wants, or refused
                        // the proof (not the token).
                        Verdict::UseDpopNonce | Verdict::InvalidDpopProof
                            if matches!(nonce, Some(Some(_)))
                                || (nonce.is_some() && verdict == Verdict::InvalidDpopProof) =>
                        {
                            let Some(retry) = retry.take() else {
                                return Poll::Ready(Ok(response));
                            };
                            match Self::with_new_proof(retry, response, nonce.flatten()) {
                                Ok(second) => this.state.set(second),
                                Err(response) => return Poll::Ready(Ok(response)),
                            }
                            continue;
                        }
                        // Asked for a nonce without giving one: a resend could not
                        // carry it. Nothing against the credential either.
                        Verdict::UseDpopNonce if nonce == Some(None) => {
                            if let Some(r) = retry.as_ref() {
                                r.release();
                            }
                            response.extensions_mut().insert(NotReplayed::NoNonce);
                            return Poll::Ready(Ok(response));
                        }
                        // About a proof, with no proof sent: a rejection.
                        Verdict::UseDpopNonce | Verdict::InvalidDpopProof => None,
                        _ => {
                            if let Some(r) = retry.as_ref() {
                                r.accepted();
                            }
                            return Poll::Ready(Ok(response));
                        }
                    };
                    let Some(retry) = retry.take() else {
                        return Poll::Ready(Ok(response));
                    };
                    if let Some(scope) = scope {
                        match Self::step_up(retry, response, scope, nonce.flatten()) {
                            Ok(refreshing) => this.state.set(refreshing),
                            Err(response) => return Poll::Ready(Ok(response)),
                        }
                        continue;
                    }
                    tracing::debug!(status = %response.status(), generation = retry.generation, "credential rejected");
                    let Some(cache) = retry.cache else {
                        // Nothing to refetch: the source would hand out the same credential.
                        response
                            .extensions_mut()
                            .insert(NotReplayed::FixedCredential);
                        return Poll::Ready(Ok(response));
                    };
                    let rejected = cache.credential_of(retry.generation);
                    let acquire = cache.replace_rejected(retry.generation);
                    // The refresh started by the rejection goes on in the background
                    // whether or not this request can be replayed.
                    match Self::resend(
                        acquire,
                        retry.replay,
                        retry.judge,
                        cache,
                        rejected,
                        response,
                        None,
                        Again::Rejected,
                        nonce.flatten(),
                    ) {
                        Ok(refreshing) => this.state.set(refreshing),
                        Err(response) => return Poll::Ready(Ok(response)),
                    }
                }
                StateProj::Refreshing { acquire, resend } => {
                    let Some(r) = resend.as_mut() else {
                        return Poll::Ready(Err(polled_after_completion().into()));
                    };
                    if r.entry.is_none() {
                        let entry = ready!(Pin::new(&mut *acquire).poll(cx));
                        match Self::replay_with(r, entry) {
                            Ok(()) => {}
                            Err(answer) => {
                                *resend = None;
                                return Poll::Ready(answer);
                            }
                        }
                        // A new proof with another credential than the one asked about
                        // goes as after a rejection.
                        if r.asked.take().is_some_and(|asked| {
                            r.entry.as_ref().is_some_and(|e| e.generation != asked)
                        }) {
                            r.why = Again::Rejected;
                        }
                    }
                    // The replay's service clone was not readied: ready it now that there
                    // is a credential to send. Readiness may take long (a concurrency
                    // limit, a balancer): a credential dropped (or expired) meanwhile is
                    // not sent; the cache's credential as it is then is, the service
                    // readied again for it (its readiness is not held through a refresh).
                    // One merely refreshed meanwhile still goes (a step-up's carries the
                    // scope the replay needs).
                    if let Err(err) = ready!(r.service.poll_ready(cx)) {
                        *resend = None;
                        return Poll::Ready(Err(err.into()));
                    }
                    if r.entry
                        .as_deref()
                        .is_some_and(|entry| !r.cache.replay_sendable(entry))
                    {
                        r.entry = None;
                        // The cache's credential goes instead: no longer a step-up's
                        // replay (its answer says nothing about step-ups).
                        r.scope = None;
                        r.why = Again::Rejected;
                        release_readiness(&mut r.service);
                        *acquire = r.cache.current_entry();
                        continue;
                    }
                    let Some(resend) = resend.take() else {
                        return Poll::Ready(Err(polled_after_completion().into()));
                    };
                    let Resend {
                        service,
                        request,
                        judge,
                        cache,
                        replace,
                        entry,
                        why,
                        nonce,
                        answered,
                        ..
                    } = *resend;
                    let (Ok(mut request), Some(entry)) = (request, entry) else {
                        return Poll::Ready(Err(polled_after_completion().into()));
                    };
                    let dpop = Sent::of(&entry.credential, request.uri());
                    if let (Some(sent), Some(nonce)) = (&dpop, &nonce) {
                        sent.carry_nonce(nonce, answered);
                    }
                    // The snapshot is the request as it came: the same rule as on the
                    // first attempt decides each header the request brought.
                    if !crate::policy::attach(&entry.credential, &mut request, replace)? {
                        // Taken on a second look, and of another shape than the request
                        // admits: never sent without our credential.
                        return Poll::Ready(Err(not_attachable().into()));
                    }
                    tracing::debug!(
                        generation = entry.generation,
                        "replaying request with the new credential"
                    );
                    cache.record_replay();
                    this.state.set(State::Second {
                        // Ready already: the oneshot's own look at readiness is answered
                        // at once.
                        future: Box::pin(Oneshot::new(service, request)),
                        judge,
                        why,
                        cache,
                        generation: entry.generation,
                        dpop,
                    });
                }
                StateProj::Second {
                    future,
                    judge,
                    why,
                    cache,
                    generation,
                    dpop,
                } => {
                    let mut response = ready!(future.as_mut().poll(cx)).map_err(Into::into)?;
                    let verdict = match judge.accepts_at_once(response.status()) {
                        true => Verdict::Accepted,
                        false => judge.verdict(&response),
                    };
                    if let Some(sent) = dpop.as_deref() {
                        sent.saw(response.headers());
                    }
                    match verdict {
                        Verdict::Rejected | Verdict::UseDpopNonce | Verdict::InvalidDpopProof => {
                            if *why == Again::NewProof && verdict == Verdict::Rejected {
                                // Sent again for a nonce, with the same credential, and
                                // now rejected: the next request gets a new one. A
                                // replay's new credential rejected in turn is left to the
                                // next request's rejection: invalidating it here cost a
                                // second token request for every request an API answers
                                // 401 whatever the token (a resource's own 401).
                                drop(cache.replace_rejected(*generation));
                            }
                            response
                                .extensions_mut()
                                .insert(NotReplayed::AlreadyReplayed);
                        }
                        Verdict::InsufficientScope { scope } => {
                            cache.accepted(*generation);
                            if *why == Again::SteppedUp {
                                // The wider grant was not wide enough (or not granted).
                                cache.step_up_failed(*generation);
                            }
                            response = with_scope(
                                response,
                                Some(InsufficientScope { scope }),
                                NotReplayed::AlreadyReplayed,
                            );
                        }
                        _ => {
                            cache.accepted(*generation);
                            if *why == Again::SteppedUp {
                                cache.step_up_worked(*generation);
                            }
                        }
                    }
                    return Poll::Ready(Ok(response));
                }
            }
        }
    }
}

impl<S, B, P, ResBody> ResponseFuture<S, B, P>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResBody>> + Clone,
    B: Body,
    B::Data: Into<Bytes>,
    P: CredentialSource,
{
    /// The server wants a nonce in the proof (its answer's nonce is kept already), or
    /// refused the proof: the request goes once more with the same credential and a new
    /// proof, unless it cannot be replayed (then the answer goes back, marked with why).
    ///
    /// It keeps its credential if that is still the cache's when the answer comes and a
    /// new request could send it; else the cache's credential goes, and the resend counts
    /// as a replay after a rejection (a 401 to it leaves that credential to the next
    /// request's rejection). Then, as a replay does, it readies its service clone, looks
    /// at the credential again (one dropped or expired meanwhile is not sent; one merely
    /// replaced still goes), and only then makes the proof.
    #[cold]
    #[inline(never)]
    fn with_new_proof(
        retry: Retry<S, B, P>,
        response: Response<ResBody>,
        kept: Option<u64>,
    ) -> Result<State<S, B, P>, Response<ResBody>> {
        tracing::debug!(
            generation = retry.generation,
            "the server wants a DPoP nonce; sending again with it"
        );
        let (Some(cache), Some(_)) = (retry.cache, retry.dpop) else {
            return Err(with_scope(response, None, NotReplayed::FixedCredential));
        };
        // Nothing to fetch for a request that cannot go again.
        if let Err(reason) = &retry.replay {
            return Err(with_scope(response, None, *reason));
        }
        // The credential sent, if a new request could still send it; else the cache's as
        // it is now, and the resend goes as after a rejection: see `Resend::asked`.
        let acquire = cache.entry_again(retry.generation);
        let mut state = Self::resend(
            acquire,
            retry.replay,
            retry.judge,
            cache,
            None,
            response,
            None,
            Again::NewProof,
            kept,
        );
        if let Ok(State::Refreshing {
            resend: Some(resend),
            ..
        }) = &mut state
        {
            resend.asked = Some(retry.generation);
        }
        state
    }

    /// The first attempt's answer says its credential lacks `scope`. The credential is
    /// valid (nothing is invalidated); with step-up on, the source is asked for a wider
    /// grant (once for every request that saw this credential) and the request waits to
    /// be replayed with it. Otherwise, or when it cannot be replayed, the answer goes back
    /// marked.
    #[cold]
    #[inline(never)]
    fn step_up(
        retry: Retry<S, B, P>,
        response: Response<ResBody>,
        scope: InsufficientScope,
        kept: Option<u64>,
    ) -> Result<State<S, B, P>, Response<ResBody>> {
        tracing::debug!(generation = retry.generation, "credential lacks a scope");
        if let Some(cache) = &retry.cache {
            cache.accepted(retry.generation);
        }
        let Some(cache) = retry.cache.filter(|_| retry.step_up) else {
            return Err(with_scope(
                response,
                Some(scope),
                NotReplayed::InsufficientScope,
            ));
        };
        let rejected = cache.credential_of(retry.generation);
        // Started whether or not this request can be replayed: the next ones get it.
        let acquire = cache.step_up(retry.generation, scope.scope.clone());
        Self::resend(
            acquire,
            retry.replay,
            retry.judge,
            cache,
            rejected,
            response,
            Some(scope),
            Again::SteppedUp,
            kept,
        )
    }

    /// The new credential came (or did not): keeps it for the replay, builds the
    /// replay's request if its body had still to settle, and releases the rejected
    /// response (and its connection: the replay's service may need it to get ready).
    /// `Err`: the answer instead of a replay. The rejected response marked with why
    /// when it is still there: a step-up that failed with nothing valid to fall back on
    /// (the API's answer is still the best there is), a fresh rejection, the source
    /// handing back the rejected credential, a body that cannot be replayed.
    fn replay_with(
        r: &mut Resend<S, B, P>,
        entry: Result<Arc<Entry>, Error>,
    ) -> Result<(), Result<Response<ResBody>, BoxError>>
    where
        S: Service<Request<ReplayBody<B>>, Response = Response<ResBody>>,
    {
        let not_replayed = |r: &mut Resend<S, B, P>, reason: NotReplayed, err: Option<Error>| {
            match (r.response.take(), err) {
                (Some(response), _) => Ok(with_scope(response, r.scope.take(), reason)),
                (None, Some(err)) => Err(err.into()),
                // Looked again once the service got ready (the first credential was
                // dropped meanwhile), and the source handed back the rejected one.
                (None, None) => Err(Error::new(crate::error::ErrorKind::Fetch)
                    .with_detail("the source handed back the credential the api rejected")
                    .into()),
            }
        };
        let entry = match entry {
            Ok(entry) => entry,
            Err(err) if r.scope.is_some() => {
                tracing::debug!(error = %err, "step-up failed; not replaying");
                return Err(not_replayed(r, NotReplayed::InsufficientScope, Some(err)));
            }
            Err(err) if err.fresh_rejection => {
                return Err(not_replayed(
                    r,
                    NotReplayed::FreshCredentialRejected,
                    Some(err),
                ));
            }
            Err(err) => return Err(Err(err.into())),
        };
        if r.rejected.as_ref() == Some(&entry.credential) {
            tracing::debug!(
                generation = entry.generation,
                "the source handed back the rejected credential; not replaying"
            );
            // For a step-up: it failed, or brought nothing new.
            let reason = match r.scope {
                Some(_) => NotReplayed::InsufficientScope,
                None => NotReplayed::SameCredential,
            };
            return Err(not_replayed(r, reason, None));
        }
        if let Err(unsettled) = &mut r.request {
            let built = match unsettled.take() {
                Some((head, mut body)) => body
                    .take()
                    .and_then(|body| head.into_request(body).ok_or(NotReplayed::HeadUnavailable)),
                None => Err(NotReplayed::HeadUnavailable),
            };
            match built {
                Ok(request) => r.request = Ok(request),
                Err(reason) => {
                    tracing::debug!(?reason, "not replayed");
                    return Err(not_replayed(r, reason, None));
                }
            }
        }
        // A replay that could not carry this credential (the request brings a header of
        // its name, kept as theirs) would go without one of ours: the rejection goes back.
        if let Ok(request) = &r.request {
            let mut probe = request.headers().clone();
            if !matches!(entry.credential.attach(&mut probe, r.replace), Ok(true)) {
                tracing::debug!("the new credential cannot be attached to the replay");
                if r.response.is_none() {
                    return Err(Err(not_attachable().into()));
                }
                return Err(not_replayed(r, NotReplayed::CredentialNotAttachable, None));
            }
        }
        r.entry = Some(entry);
        // The rejected response (and its connection) is released now; a nonce it gave
        // (kept by the first attempt's key as it came) is carried over to the key of
        // the credential the replay finally carries, unless that key was given a nonce
        // later (`Resend::answered`).
        if let Some(response) = r.response.take() {
            r.nonce = crate::bound::nonce_of(response.headers());
        }
        Ok(())
    }

    /// The state that waits for the credential replacing the one the first attempt carried (a new
    /// one after a rejection, a wider one after a step-up) and then replays; or, for a
    /// request that cannot be replayed, `response` marked with why. The response is
    /// kept until the new credential is known: it is the answer if that is the same.
    // Each argument is a field of the `Resend` it builds (`kept`: its `answered`), from
    // three callers that differ in all but `replay` and `judge`.
    #[allow(clippy::too_many_arguments)]
    fn resend(
        acquire: Acquire,
        replay: Result<Replay<S, B>, NotReplayed>,
        judge: Judge,
        cache: CacheRef<P>,
        rejected: Option<Credential>,
        response: Response<ResBody>,
        scope: Option<InsufficientScope>,
        why: Again,
        kept: Option<u64>,
    ) -> Result<State<S, B, P>, Response<ResBody>> {
        let rebuilt = match replay {
            // Built when the new credential is there: the body has until then to settle
            // (no longer: the caller may end it only once it has an answer).
            Ok(replay) if replay.body.unsettled() => Ok((
                replay.service,
                Err(Some((replay.head, replay.body))),
                replay.replace,
            )),
            replay => {
                rebuild(replay).map(|(service, request, replace)| (service, Ok(request), replace))
            }
        };
        match rebuilt {
            Ok((service, request, replace)) => Ok(State::Refreshing {
                acquire,
                resend: Some(Box::new(Resend {
                    service,
                    request,
                    judge,
                    cache,
                    rejected,
                    response: Some(response),
                    replace,
                    scope,
                    entry: None,
                    why,
                    asked: None,
                    nonce: None,
                    answered: kept.unwrap_or_else(crate::bound::nonce_stamp),
                })),
            }),
            Err(reason) => {
                tracing::debug!(?reason, "not replayed");
                Err(with_scope(response, scope, reason))
            }
        }
    }
}

/// The replay's service and request, rebuilt from what the first attempt kept, and the
/// rule for a header the request brings.
fn rebuild<S, B>(
    replay: Result<Replay<S, B>, NotReplayed>,
) -> Result<(S, Request<ReplayBody<B>>, bool), NotReplayed>
where
    B: Body,
    B::Data: Into<Bytes>,
{
    let mut replay = replay?;
    let body = replay.body.take()?;
    let request = replay
        .head
        .into_request(body)
        .ok_or(NotReplayed::HeadUnavailable)?;
    Ok((replay.service, request, replay.replace))
}

/// `response` going back to the caller unreplayed (`reason`), with what the API said was
/// missing, if it said.
fn with_scope<B>(
    mut response: Response<B>,
    scope: Option<InsufficientScope>,
    reason: NotReplayed,
) -> Response<B> {
    if let Some(scope) = scope {
        response.extensions_mut().insert(scope);
    }
    response.extensions_mut().insert(reason);
    response
}

/// Drops a service that was polled ready but will not be called, releasing what its
/// readiness holds (a concurrency permit, a buffer slot), and leaves an unready clone in
/// its place.
#[cold]
pub(crate) fn release_readiness<S: Clone>(service: &mut S) {
    let clone = service.clone();
    drop(std::mem::replace(service, clone));
}

/// A replay that could not carry the credential it was to be sent with.
#[cold]
fn not_attachable() -> Error {
    Error::new(crate::error::ErrorKind::InvalidCredential).with_detail(
        "the replay could not carry the new credential: the request brings its own header of that name",
    )
}

fn polled_after_completion() -> Error {
    Error::new(crate::error::ErrorKind::PolledAfterCompletion)
}
