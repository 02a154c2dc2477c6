//! [`Direct`]: the mode without replay, in the shape of tower-http's `AddAuthorization`.
//!
//! The inner service receives `Request<B>` unchanged and need not be `Clone`. Without a
//! clone to send through later, a request cannot wait for its credential after `call`,
//! so the credential is readied in `poll_ready`:
//!
//! ```text
//! poll_ready ─▶ the view's credential usable? ─ yes ─▶ inner.poll_ready ─▶ Ready
//!                     │ no                                   ▲
//!                     ▼                                      │
//!              wait for the one refresh ── its credential ───┘
//!                     │ failed: kept for `call` (a request to another origin still passes)
//!
//! call ─▶ out of scope: sent as it is
//!      ─▶ in scope: the readied credential attached (if it has not expired meanwhile)
//!         ─▶ response: a rejection invalidates that credential and goes back to the
//!            caller, marked `NotReplayed`
//! ```

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::{
    body::NotReplayed,
    cache::{Acquire, CacheRef, Entry},
    error::{BoxError, Error, ErrorKind},
    rejection::{InsufficientScope, Judge, Verdict},
    service::AddCredential,
    source::CredentialSource,
};

/// The mode of [`AuthLayer`](crate::AuthLayer) and [`AddCredential`] without replay,
/// from [`AuthLayer::without_replay`](crate::AuthLayer::without_replay): the inner
/// service receives `Request<B>` unchanged and need not be `Clone`, as under tower-http's
/// `AddAuthorization`.
///
/// `poll_ready` readies the credential before it readies the inner service: it returns
/// `Pending` while the one refresh of the cache runs, and never holds the inner service's
/// readiness (a concurrency permit, a pooled connection) through a refresh. A refresh that
/// fails fails the next request to the credential's origins, not `poll_ready`. A
/// rejected response goes back to the caller marked [`NotReplayed`] after it has
/// invalidated its credential, so the next request gets a new one.
///
/// A value of this type is the per-service state of that readiness; a clone starts
/// unready, as a clone of any tower service does.
#[derive(Default)]
pub struct Direct {
    ready: Ready,
}

#[derive(Default)]
enum Ready {
    /// Nothing readied: the next `poll_ready` looks at the cache.
    #[default]
    Unchecked,
    /// The view's credential was usable at `poll_ready`; `call` sends that one.
    View,
    /// Waiting for the refresh.
    Waiting(Acquire),
    /// The refresh's credential, for the next call.
    Waited(Arc<Entry>),
    /// The refresh failed: the next request to the credential's origins fails with this.
    Failed(Error),
}

impl Clone for Direct {
    fn clone(&self) -> Self {
        Direct::default()
    }
}

impl fmt::Debug for Direct {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ready = match self.ready {
            Ready::Unchecked => "unchecked",
            Ready::View | Ready::Waited(_) => "credential ready",
            Ready::Waiting(_) => "waiting for a credential",
            Ready::Failed(_) => "credential failed",
        };
        f.debug_struct("Direct").field("ready", &ready).finish()
    }
}

impl<S, P> AddCredential<S, P, Direct>
where
    P: CredentialSource,
{
    /// Readies a credential for the next call: the view's if usable, else the refresh's
    /// (or its failure). The common case (nothing readied, or the view readied by an
    /// earlier poll, and the view's credential usable) inline; the rest out of line.
    #[inline(always)]
    fn poll_credential(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if matches!(self.mode.ready, Ready::Unchecked | Ready::View) {
            match self.cache.usable(self.view.load()) {
                Ok(_) => {
                    self.mode.ready = Ready::View;
                    return Poll::Ready(());
                }
                Err(acquire) => self.mode.ready = Ready::Waiting(acquire),
            }
        }
        self.poll_credential_waiting(cx)
    }

    /// [`poll_credential`](Self::poll_credential) past its common case: waiting for the
    /// refresh, or readied before.
    #[inline(never)]
    fn poll_credential_waiting(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if matches!(self.mode.ready, Ready::View | Ready::Failed(_)) {
            // Polled again before a call: look again (the view may have changed, a
            // failed refresh may be over its backoff).
            self.mode.ready = Ready::Unchecked;
        }
        loop {
            match &mut self.mode.ready {
                Ready::Unchecked => {
                    self.mode.ready = match self.cache.usable(self.view.load()) {
                        Ok(_) => Ready::View,
                        Err(acquire) => Ready::Waiting(acquire),
                    };
                }
                Ready::Waiting(acquire) => {
                    self.mode.ready = match ready!(Pin::new(acquire).poll(cx)) {
                        Ok(entry) => Ready::Waited(entry),
                        Err(err) => Ready::Failed(err),
                    };
                }
                Ready::View | Ready::Waited(_) | Ready::Failed(_) => return Poll::Ready(()),
            }
        }
    }
}

impl<S, P, B, ResBody> Service<Request<B>> for AddCredential<S, P, Direct>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    P: CredentialSource,
{
    type Response = Response<ResBody>;
    type Error = BoxError;
    type Future = DirectFuture<S::Future, P>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // A layer with no origin sends nothing anywhere: nothing to fetch.
        if self.scope.is_some() {
            ready!(self.poll_credential(cx));
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        match crate::future::admits(self.scope.as_deref(), &self.policy, &req) {
            Ok(true) => {}
            // Another origin: no credential, so no transport rule and no rejection rule.
            Ok(false) => {
                self.mode.ready = Ready::Unchecked;
                return DirectFuture::passthrough(self.inner.call(req));
            }
            Err(err) => {
                self.mode.ready = Ready::Unchecked;
                return DirectFuture::failed(err);
            }
        }
        // Whatever happens, the next call needs a `poll_ready` of its own.
        let waited;
        let entry = if matches!(self.mode.ready, Ready::View) {
            // The common case: nothing to move out.
            self.mode.ready = Ready::Unchecked;
            self.view.held()
        } else {
            match std::mem::take(&mut self.mode.ready) {
                Ready::Waited(entry) => {
                    waited = entry;
                    Some(&*waited)
                }
                Ready::Failed(err) => return DirectFuture::failed(err),
                // Called without a `poll_ready` that returned `Ready` (a breach of the
                // `Service` contract): the cache's credential if it is usable now, and no
                // waiting for one, which only `poll_ready` can do.
                Ready::View | Ready::Unchecked | Ready::Waiting(_) => {
                    self.cache.usable(self.view.load()).ok()
                }
            }
        };
        // Readied a moment ago, as a rule; a service held ready for longer (a balancer's
        // ready set) must not send a credential that has expired since, nor one dropped
        // since (invalidated, rejected, replaced): the current one, if it may be sent
        // without waiting, else nothing. A hold through a suspend, which stops the aging
        // timer, is seen by the wall clock (`CredentialCache::still_sendable`).
        let entry = match entry {
            Some(entry) if self.cache.still_sendable(entry) => Some(entry),
            _ => self
                .cache
                .usable(self.view.load())
                .ok()
                .filter(|entry| self.cache.still_sendable(entry)),
        };
        let Some(entry) = entry else {
            return DirectFuture::failed(Error::new(ErrorKind::NotReady));
        };
        match self.policy.attach(&entry.credential, &mut req) {
            Ok(true) => {}
            // The request brings its own credential (or a part of ours as its own):
            // sent as it is, never judged.
            Ok(false) => return DirectFuture::passthrough(self.inner.call(req)),
            Err(err) => return DirectFuture::failed(err),
        }
        let check = Check {
            // A credential that cannot change needs no way back to the cache.
            cache: self.cache.refreshes().then(|| self.refs.get(&self.cache)),
            generation: entry.generation,
            judge: self.policy.judge.clone(),
            dpop: crate::bound::Sent::of(&entry.credential, req.uri()),
        };
        DirectFuture {
            state: DirectState::Sent {
                future: self.inner.call(req),
            },
            check: Some(check),
        }
    }
}

pin_project! {
    /// Response future of [`AddCredential`] in [`Direct`] mode: the inner service's
    /// future, and what to tell the cache about its answer.
    pub struct DirectFuture<F, P> {
        #[pin]
        state: DirectState<F>,
        check: Option<Check<P>>,
    }
}

pin_project! {
    #[project = DirectStateProj]
    enum DirectState<F> {
        Failed { error: Option<Error> },
        Sent { #[pin] future: F },
    }
}

/// The credential a request carried, to invalidate it if the API rejects it.
struct Check<P> {
    /// `None` for a credential that cannot change: nothing to invalidate.
    cache: Option<CacheRef<P>>,
    generation: u64,
    judge: Judge,
    /// The proof sent, when the credential is bound to a key (DPoP).
    dpop: Option<Box<crate::bound::Sent>>,
}

impl<F, P> fmt::Debug for DirectFuture<F, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            DirectState::Failed { .. } => "failed",
            DirectState::Sent { .. } => "sent",
        };
        f.debug_struct("DirectFuture")
            .field("state", &state)
            .finish()
    }
}

impl<F, P> DirectFuture<F, P> {
    fn passthrough(future: F) -> Self {
        DirectFuture {
            state: DirectState::Sent { future },
            check: None,
        }
    }

    #[cold]
    #[inline(never)]
    fn failed(error: Error) -> Self {
        DirectFuture {
            state: DirectState::Failed { error: Some(error) },
            check: None,
        }
    }
}

impl<F, P, E, ResBody> Future for DirectFuture<F, P>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    E: Into<BoxError>,
    P: CredentialSource,
{
    type Output = Result<Response<ResBody>, BoxError>;

    /// The common answer (accepted, or no credential sent) inline; the rest out of line.
    #[inline(always)]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let future = match this.state.project() {
            DirectStateProj::Failed { error } => return Poll::Ready(Err(failed(error))),
            DirectStateProj::Sent { future } => future,
        };
        let response = ready!(future.poll(cx)).map_err(Into::into)?;
        // Look before taking: the common answer leaves `check` in place.
        let Some(check) = this.check.as_ref() else {
            return Poll::Ready(Ok(response));
        };
        if check.judge.accepts_at_once(response.status()) {
            if let Some(sent) = &check.dpop {
                sent.saw(response.headers());
            }
            if let Some(cache) = &check.cache {
                cache.accepted(check.generation);
            }
            return Poll::Ready(Ok(response));
        }
        Poll::Ready(Ok(judged(this.check.take(), response)))
    }
}

/// The error of a request refused before it was sent (or of a poll after the end).
#[cold]
#[inline(never)]
fn failed(error: &mut Option<Error>) -> BoxError {
    error
        .take()
        .unwrap_or_else(|| Error::new(ErrorKind::PolledAfterCompletion))
        .into()
}

/// An answer the rejection rule must look at more closely: judged, what it says told to
/// the cache, and marked for the caller.
#[inline(never)]
fn judged<P: CredentialSource, ResBody>(
    check: Option<Check<P>>,
    mut response: Response<ResBody>,
) -> Response<ResBody> {
    let Some(check) = check else {
        return response;
    };
    let verdict = check.judge.verdict(&response);
    if let Some(sent) = &check.dpop {
        // Any answer may carry the server's next nonce.
        sent.saw(response.headers());
    }
    match verdict {
        Verdict::Rejected => {}
        // The credential is fine: the next request gets a new proof (with the nonce).
        Verdict::UseDpopNonce | Verdict::InvalidDpopProof if check.dpop.is_some() => {
            response.extensions_mut().insert(NotReplayed::OptedOut);
            return response;
        }
        Verdict::UseDpopNonce | Verdict::InvalidDpopProof => {}
        Verdict::InsufficientScope { scope } => {
            // A valid credential that lacks a scope: nothing to invalidate.
            if let Some(cache) = &check.cache {
                cache.accepted(check.generation);
            }
            response
                .extensions_mut()
                .insert(InsufficientScope { scope });
            response
                .extensions_mut()
                .insert(NotReplayed::InsufficientScope);
            return response;
        }
        _ => {
            if let Some(cache) = &check.cache {
                cache.accepted(check.generation);
            }
            return response;
        }
    }
    tracing::debug!(status = %response.status(), generation = check.generation, "credential rejected");
    if let Some(cache) = &check.cache {
        // The refresh goes on without this request: the next one gets its result.
        drop(cache.replace_rejected(check.generation));
    }
    // As a replaying layer with replay off says it, whatever the source.
    response.extensions_mut().insert(NotReplayed::OptedOut);
    response
}
