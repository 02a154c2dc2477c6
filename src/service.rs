//! [`AddCredential`]: the middleware service. The per-request state machine is in
//! `future.rs`; the mode without replay ([`Direct`](crate::Direct)) is in `direct.rs`.

use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::{
    body::ReplayBody,
    cache::{CredentialCache, LocalRefs, LocalView},
    error::BoxError,
    future::ResponseFuture,
    layer::AuthLayer,
    policy::Policy,
    scope::Scope,
    source::CredentialSource,
};

/// Adds a cached credential to each request and, in the default mode ([`Replaying`]),
/// replays it once when the API rejects the credential. Built by
/// [`AuthLayer`].
///
/// With [`Replaying`], the inner service receives the request with a [`ReplayBody`] and
/// must be `Clone`. With [`Direct`](crate::Direct)
/// ([`AuthLayer::without_replay`](crate::AuthLayer::without_replay)) it receives the
/// request unchanged and need not be `Clone`, as under tower-http's `AddAuthorization`.
/// Errors are [`BoxError`]s: the crate's own [`Error`](crate::Error), or the inner
/// service's error as it came (downcast to get it back).
pub struct AddCredential<S, P, M = Replaying> {
    pub(crate) inner: S,
    pub(crate) cache: CredentialCache<P>,
    /// This clone's view of the cache's current entry (see `LocalView`).
    pub(crate) view: LocalView<P>,
    /// This clone's references to the cache for its requests (see `CacheRef`).
    pub(crate) refs: LocalRefs<P>,
    pub(crate) policy: Policy,
    /// Where the credential goes; `None`: nowhere (every request is refused).
    pub(crate) scope: Option<Arc<Scope>>,
    /// The mode's own per-clone state (none for [`Replaying`]).
    pub(crate) mode: M,
}

/// The default mode of [`AuthLayer`] and [`AddCredential`]: a request whose credential
/// the API rejects is sent once more with a new one. The inner service receives
/// `Request<ReplayBody<B>>` and must be `Clone` (the replay goes through a clone).
///
/// The other mode is [`Direct`](crate::Direct).
#[derive(Debug, Clone, Copy, Default)]
pub struct Replaying;

impl<S: fmt::Debug, P, M> fmt::Debug for AddCredential<S, P, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AddCredential")
            .field("inner", &self.inner)
            .field("cache", &self.cache)
            .field("policy", &self.policy)
            .field("scope", &self.scope)
            .finish()
    }
}

impl<S: Clone, P, M: Clone> Clone for AddCredential<S, P, M> {
    fn clone(&self) -> Self {
        AddCredential {
            inner: self.inner.clone(),
            cache: self.cache.clone(),
            view: self.view.clone(),
            refs: LocalRefs::new(),
            policy: self.policy.clone(),
            scope: self.scope.clone(),
            mode: self.mode.clone(),
        }
    }
}

impl<S, P, M: Default> AddCredential<S, P, M> {
    pub(crate) fn from_parts(
        inner: S,
        cache: CredentialCache<P>,
        policy: Policy,
        scope: Option<Arc<Scope>>,
    ) -> Self {
        AddCredential {
            inner,
            view: LocalView::new(&cache),
            refs: LocalRefs::new(),
            cache,
            policy,
            scope,
            mode: M::default(),
        }
    }
}

impl<S, P, M> AddCredential<S, P, M> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably. Readiness is the inner service's: a caller that
    /// polls it ready through here, then calls `AddCredential`, keeps the contract.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service; the cache goes on serving any other clone.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The cache this service reads credentials from.
    pub fn cache(&self) -> &CredentialCache<P> {
        &self.cache
    }
}

impl<S, P: CredentialSource> AddCredential<S, P> {
    /// Wraps `inner`, over a new cache of `source`, with the layer's defaults, sending
    /// the credential to `origin` only: `AuthLayer::new(source).origin(origin)?.layer(inner)`,
    /// except that an origin `AuthLayer::origin` refuses (one no request could carry the
    /// credential to: plain `http` to a host that is not loopback, say) is taken here,
    /// and every request to it fails with
    /// [`ErrorKind::InsecureTransport`](crate::ErrorKind::InsecureTransport).
    pub fn new(inner: S, source: P, origin: crate::Origin) -> Self {
        tower_layer::Layer::layer(&AuthLayer::new(source).scoped_to(origin), inner)
    }
}

impl<P: CredentialSource> AddCredential<(), P> {
    /// A layer wrapping services in `AddCredential` over a new cache of `source`, as
    /// tower-http's middleware offer `Type::layer`: the same as [`AuthLayer::new`].
    pub fn layer(source: P) -> AuthLayer<P> {
        AuthLayer::new(source)
    }
}

impl<S, P, B, ResBody> Service<Request<B>> for AddCredential<S, P, Replaying>
where
    S: Service<Request<ReplayBody<B>>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    P: CredentialSource,
    B: Body,
    B::Data: Into<Bytes>,
{
    type Response = Response<ResBody>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B, P>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Request<B>) -> Self::Future {
        ResponseFuture::start(
            &mut self.inner,
            &self.cache,
            &self.policy,
            |req| crate::future::admits(self.scope.as_deref(), &self.policy, req),
            req,
            || self.cache.usable(self.view.load()),
            || self.refs.get(&self.cache),
        )
    }
}
