//! [`AuthLayer`]: configuration of the request side, and the [`tower_layer::Layer`] impl.

use std::{marker::PhantomData, sync::Arc, time::Duration};

use tower_layer::Layer;

use crate::{
    cache::{CredentialCache, CredentialCacheBuilder},
    direct::Direct,
    error::InvalidConfig,
    policy::{ExistingHeader, Policy},
    scope::{Origin, Scope},
    service::{AddCredential, Replaying},
    source::CredentialSource,
    store::CredentialStore,
};

/// The request rules every entry point shares (`AuthLayer`, its builder, the reqwest
/// `AuthMiddleware`): setters over fields `policy: Policy` and
/// `scope: Option<Arc<Scope>>`, written once, as tower-http writes its accessors.
macro_rules! request_rules {
    () => {
        /// Response statuses that mean "credential rejected" and trigger one refresh and
        /// one replay (default
        /// [`DEFAULT_REJECTION_STATUSES`](crate::DEFAULT_REJECTION_STATUSES): `401` only).
        /// 4xx and 5xx codes only, at least one: anything else is an
        /// [`InvalidConfig`](crate::InvalidConfig), here, not on a request.
        ///
        /// This configures the standard rule,
        /// [`StandardRejection`](crate::rejection::StandardRejection) (which also reads
        /// RFC 6750's `insufficient_scope` challenge); it replaces a
        /// [`rejection_policy`](Self::rejection_policy) given before it.
        pub fn rejection_statuses(
            mut self,
            statuses: impl IntoIterator<Item = http::StatusCode>,
        ) -> Result<Self, crate::InvalidConfig> {
            self.policy.judge = crate::rejection::Judge::Standard(
                crate::rejection::StandardRejection::statuses(statuses)?,
            );
            Ok(self)
        }

        /// The rule that tells a rejected credential from a response (default
        /// [`StandardRejection`](crate::rejection::StandardRejection): `401`, and RFC
        /// 6750's challenges): a policy of your own, one built with
        /// [`rejection_fn`](crate::rejection::rejection_fn), or
        /// [`GrpcUnauthenticated`](crate::rejection::GrpcUnauthenticated) for gRPC. It
        /// replaces the [`rejection_statuses`](Self::rejection_statuses) given before it.
        /// See [`crate::rejection`].
        pub fn rejection_policy<R: crate::rejection::RejectionPolicy>(mut self, policy: R) -> Self {
            self.policy.judge = crate::rejection::Judge::Custom(std::sync::Arc::new(policy));
            self
        }

        /// Sends the credential to `origin` (and to any other origin or predicate given):
        /// a request to anywhere else, a redirect's target included, passes through
        /// without it, and is never refreshed for or replayed. Call it for every origin of
        /// the API; see [`Origin`]. So does a request whose `Host` header names another
        /// host or port than its URI (or, for a relative URI, than every origin given): a
        /// server that routes by `Host` (an ingress, a CDN, virtual hosts) would deliver it
        /// to that other origin. A port past 65535 is refused here, never read as none.
        ///
        /// **Given no origin, predicate or [`any_https_origin`](Self::any_https_origin),
        /// every request fails** with [`ErrorKind::NoOrigin`](crate::ErrorKind::NoOrigin):
        /// a credential is never sent to a host nobody named.
        ///
        /// Takes an [`Origin`], or what converts into exactly one: `&str`, `String`,
        /// `http::Uri` (and `reqwest::Url` with the `reqwest` feature). Anything with a
        /// path, query or credentials is an [`InvalidOrigin`](crate::InvalidOrigin) here,
        /// not a scope that silently differs; take a base URL's origin with
        /// [`Origin::of_url`]. So is an origin no request could carry the credential to
        /// (plain `http`, `ws` or `wss` to a host that is not loopback, another scheme):
        /// the transport rule would refuse every request to it. A loopback `http` origin
        /// is taken; its requests need [`allow_http_loopback`](Self::allow_http_loopback).
        pub fn origin<O>(mut self, origin: O) -> Result<Self, crate::InvalidOrigin>
        where
            O: TryInto<Origin>,
            O::Error: Into<crate::InvalidOrigin>,
        {
            let origin = origin.try_into().map_err(Into::into)?;
            origin.can_carry_credential()?;
            Scope::add_origin(&mut self.scope, origin);
            Ok(self)
        }

        /// Sends the credential to every origin a request names (https, or loopback http
        /// where [`allow_http_loopback`](Self::allow_http_loopback) allows it): for a
        /// client that talks to the credential's API alone.
        ///
        /// A redirect's target is another request to this layer: one followed above it by
        /// tower-http's `FollowRedirect` with [`SameOriginCredentials`] gets the credential
        /// only at the origin it came from; with another policy it cannot be told from a
        /// first request, and gets the credential wherever it goes. Prefer
        /// [`origin`](Self::origin).
        ///
        /// [`SameOriginCredentials`]: crate::redirect::SameOriginCredentials
        pub fn any_https_origin(mut self) -> Self {
            Scope::add_any(&mut self.scope);
            self
        }

        /// Sends the credential to requests whose URI `matches` (for origins a list cannot
        /// name: every subdomain of a host, say), in addition to the [`origin`](Self::origin)s.
        /// Relative URIs (no scheme or host) are in scope only with
        /// [`allow_relative_uris`](Self::allow_relative_uris).
        pub fn origin_matching<F>(mut self, matches: F) -> Self
        where
            F: Fn(&http::Uri) -> bool + Send + Sync + 'static,
        {
            Scope::add_predicate(&mut self.scope, matches);
            self
        }

        /// Allows plain `http` to loopback hosts (`localhost`, `127.0.0.0/8`, `::1`), for tests
        /// and local development. Default `false`. Plain `http` to any other host is always
        /// refused.
        ///
        /// Loopback is the request URL's host: a client below that sends plain `http`
        /// through a proxy (`HTTP_PROXY`, `ALL_PROXY`) or resolves `localhost` elsewhere
        /// sends the credential there in plain text. Build that client without a proxy or
        /// resolver override. (The reqwest middleware refuses a request the environment's
        /// proxies would send to another host; see its `client_without_proxy`.)
        pub fn allow_http_loopback(mut self, allow: bool) -> Self {
            self.policy.allow_http_loopback = allow;
            self
        }

        /// Allows requests whose URI has no scheme (default `false`).
        ///
        /// Some stacks set the origin below this layer (a tonic `Channel` sends `/pkg.Svc/Method`
        /// and adds the origin itself), so the layer cannot check the transport. Allow this
        /// only when the stack below is known to use TLS. A URI that names a host without a
        /// scheme (`CONNECT host:port`, the authority form) is not relative: it gets no
        /// credential. Nor does a relative request whose `Host` header (which an HTTP/1
        /// connection sends as it is) names no origin in scope: a given origin's host and
        /// port, any under [`any_https_origin`](Self::any_https_origin), or one a
        /// predicate takes (asked as `https://` the header's authority and the path).
        pub fn allow_relative_uris(mut self, allow: bool) -> Self {
            self.policy.allow_relative_uris = allow;
            self
        }

        /// What to do with a request that already carries a credential header (default
        /// [`ExistingHeader::PassThrough`]).
        pub fn existing_header(mut self, behaviour: ExistingHeader) -> Self {
            self.policy.existing_header = behaviour;
            self
        }
    };
}

/// The replay settings, for entry points that replay (`AuthLayer<P, Replaying>`, its
/// builder, the reqwest `AuthMiddleware`).
macro_rules! replay_rules {
    () => {
        /// Most bytes of a request body retained for a replay (default
        /// [`DEFAULT_REPLAY_LIMIT`](crate::DEFAULT_REPLAY_LIMIT)). `0` keeps only empty bodies
        /// replayable.
        pub fn replay_limit(mut self, bytes: usize) -> Self {
            self.policy.replay_limit = bytes;
            self
        }

        /// Step-up authorization (default off). When the API answers that the
        /// credential lacks a scope ([`Verdict::InsufficientScope`]: RFC 6750's
        /// `insufficient_scope` challenge), the source is asked for a new grant with the
        /// scope the API named ([`FetchReason::StepUp`], [`FetchContext::required_scope`];
        /// a refresh cannot widen a scope, RFC 6749 §6) and the request is replayed once
        /// with it. However many requests get that answer for one credential and scope,
        /// the source is asked once; a request lacking a scope that no step-up under way
        /// asks for gets a step-up after them that asks for its scope and the last one's.
        ///
        /// Off, or when the step-up fails or brings back the same credential, the answer
        /// goes back as it came, with an [`InsufficientScope`] extension and
        /// [`NotReplayed::InsufficientScope`]; the credential is not invalidated. A failed
        /// step-up backs step-ups off (a backoff of their own: the current credential is
        /// served meanwhile, and its refresh before expiry is not held back), and so does
        /// one whose credential the API still finds lacking the scope it asked for (its
        /// replay's answer, or the next request's when the request could not be
        /// replayed, or the same token brought back), so an API that keeps asking costs
        /// one token request per backoff step, not one per call. A replay that lacks a
        /// scope again is returned with [`NotReplayed::AlreadyReplayed`].
        ///
        /// [`Verdict::InsufficientScope`]: crate::rejection::Verdict::InsufficientScope
        /// [`FetchReason::StepUp`]: crate::FetchReason::StepUp
        /// [`FetchContext::required_scope`]: crate::FetchContext::required_scope
        /// [`InsufficientScope`]: crate::rejection::InsufficientScope
        /// [`NotReplayed::InsufficientScope`]: crate::NotReplayed::InsufficientScope
        /// [`NotReplayed::AlreadyReplayed`]: crate::NotReplayed::AlreadyReplayed
        pub fn step_up(mut self, step_up: bool) -> Self {
            self.policy.step_up = step_up;
            self
        }
    };
}

/// Adds credentials to requests, refreshes them, and replays a request once when the API
/// rejects its credential. See the [crate docs](crate) for the whole picture.
///
/// Defaults are production-safe: https only, refresh and replay on `401` only, request
/// bodies up to [`DEFAULT_REPLAY_LIMIT`](crate::DEFAULT_REPLAY_LIMIT) retained for the
/// replay, requests that bring their own credential header passed through untouched.
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_client_auth::{AuthLayer, StaticCredential};
/// # let inner = tower::service_fn(|_req: http::Request<tower_client_auth::ReplayBody<String>>| async {
/// #     Ok::<_, std::convert::Infallible>(http::Response::new(()))
/// # });
///
/// let client = ServiceBuilder::new()
///     .layer(AuthLayer::new(StaticCredential::bearer("pat_123")?)
///         .origin("https://api.example.com")?)
///     .service(inner);
/// # let _ = client;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Two modes
///
/// `M` says whether a rejected request is replayed:
///
/// - [`Replaying`] (the default): the inner service receives `Request<ReplayBody<B>>` and
///   must be `Clone`, because the replay resends the retained body through a clone.
/// - [`Direct`], from [`without_replay`](Self::without_replay): the inner service
///   receives `Request<B>` unchanged and need not be `Clone`, so the layer drops in
///   wherever tower-http's `AddAuthorization` fits. A rejection still invalidates the
///   credential (the next request gets a new one) and the rejected response goes back to
///   the caller, marked [`NotReplayed`](crate::NotReplayed). The credential is readied in
///   `poll_ready`. Take this mode for a [`StaticCredential`](crate::StaticCredential),
///   which has nothing to replay with.
///
/// ```
/// use tower::{ServiceBuilder, ServiceExt};
/// use tower_client_auth::{AuthLayer, StaticCredential};
///
/// // Neither `Clone` nor typed for `ReplayBody`: what a hyper client or a tonic channel
/// // accepts as it is.
/// struct Api;
/// impl tower::Service<http::Request<String>> for Api {
///     type Response = http::Response<()>;
///     type Error = std::convert::Infallible;
///     type Future = std::future::Ready<Result<http::Response<()>, std::convert::Infallible>>;
///     fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
///         std::task::Poll::Ready(Ok(()))
///     }
///     fn call(&mut self, req: http::Request<String>) -> Self::Future {
///         assert_eq!(req.headers()["authorization"], "Bearer pat_123");
///         std::future::ready(Ok(http::Response::new(())))
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_client_auth::BoxError> {
/// let client = ServiceBuilder::new()
///     .layer(AuthLayer::new(StaticCredential::bearer("pat_123")?)
///         .origin("https://api.example.com")?
///         .without_replay())
///     .service(Api);
/// let req = http::Request::get("https://api.example.com/v1").body(String::new())?;
/// client.oneshot(req).await?;
/// # Ok(())
/// # }
/// ```
pub struct AuthLayer<P, M = Replaying> {
    cache: CredentialCache<P>,
    policy: Policy,
    scope: Option<Arc<Scope>>,
    mode: PhantomData<fn() -> M>,
}

// By hand: a derive would ask `P: Debug`, which the cache's `Debug` does not need.
impl<P, M> std::fmt::Debug for AuthLayer<P, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthLayer")
            .field("cache", &self.cache)
            .field("policy", &self.policy)
            .field("scope", &self.scope)
            .field("mode", &std::any::type_name::<M>())
            .finish()
    }
}

impl<P, M> Clone for AuthLayer<P, M> {
    fn clone(&self) -> Self {
        AuthLayer {
            cache: self.cache.clone(),
            policy: self.policy.clone(),
            scope: self.scope.clone(),
            mode: PhantomData,
        }
    }
}

impl<P: CredentialSource> AuthLayer<P> {
    /// A layer over a new cache of `source`, with default settings.
    pub fn new(source: P) -> Self {
        Self::with_cache(CredentialCache::new(source))
    }

    /// A builder reaching every setting, the cache's (windows, timeouts, backoff, store)
    /// and the layer's (origins, rejection statuses, replay): one path from the source to
    /// the layer, checked when it is built.
    ///
    /// ```
    /// use std::time::Duration;
    /// use http::StatusCode;
    /// use tower_client_auth::{AuthLayer, StaticCredential};
    ///
    /// let layer = AuthLayer::builder(StaticCredential::bearer("pat_123")?)
    ///     .fetch_timeout(Duration::from_secs(5))
    ///     .rejection_statuses([StatusCode::UNAUTHORIZED, StatusCode::from_u16(419)?])?
    ///     .origin("https://api.example.com")?
    ///     .build()?;
    ///
    /// // An invalid value is an error when it is set or built, never on a request:
    /// let refused = AuthLayer::builder(StaticCredential::bearer("pat_123")?)
    ///     .origin("https://api.example.com")?
    ///     .window_jitter(7.0)
    ///     .build();
    /// assert_eq!(refused.unwrap_err().setting(), "window_jitter");
    /// # let _ = layer;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn builder(source: P) -> AuthLayerBuilder<P> {
        AuthLayerBuilder {
            cache: CredentialCache::builder(source),
            policy: Policy::default(),
            scope: None,
            mode: PhantomData,
        }
    }

    /// A layer over an existing cache (configured with
    /// [`CredentialCache::builder`], or shared with other layers and clients).
    pub fn with_cache(cache: CredentialCache<P>) -> Self {
        AuthLayer {
            cache,
            policy: Policy::default(),
            scope: None,
            mode: PhantomData,
        }
    }
}

impl<P> AuthLayer<P, Replaying> {
    /// The layer in [`Direct`] mode: rejected requests are not replayed, the inner service
    /// receives `Request<B>` unchanged and need not be `Clone`. See [Two modes](Self#two-modes).
    pub fn without_replay(mut self) -> AuthLayer<P, Direct> {
        self.policy.replay = false;
        AuthLayer {
            cache: self.cache,
            policy: self.policy.clone(),
            scope: self.scope,
            mode: PhantomData,
        }
    }

    replay_rules!();
}

impl<P, M> AuthLayer<P, M> {
    /// The cache behind this layer.
    pub fn cache(&self) -> &CredentialCache<P> {
        &self.cache
    }

    /// Fetches the credential now, before the first request needs it (a cold start),
    /// unless the cache holds a usable one already: see [`CredentialCache::warm_up`].
    pub async fn warm_up(&self) -> Result<(), crate::Error>
    where
        P: CredentialSource,
    {
        self.cache.warm_up().await
    }

    /// [`origin`](Self::origin) for a value that is an origin already: nothing to refuse.
    pub(crate) fn scoped_to(mut self, origin: Origin) -> Self {
        Scope::add_origin(&mut self.scope, origin);
        self
    }

    #[cfg(feature = "reqwest")]
    pub(crate) fn policy(&self) -> Policy {
        self.policy.clone()
    }

    #[cfg(feature = "reqwest")]
    pub(crate) fn scope(&self) -> Option<Arc<Scope>> {
        self.scope.clone()
    }

    request_rules!();
}

impl<S, P, M: Default> Layer<S> for AuthLayer<P, M> {
    type Service = AddCredential<S, P, M>;

    fn layer(&self, inner: S) -> Self::Service {
        AddCredential::from_parts(
            inner,
            self.cache.clone(),
            self.policy.clone(),
            self.scope.clone(),
        )
    }
}

/// Every setting of a layer and its cache, checked by [`build`](Self::build). From
/// [`AuthLayer::builder`].
pub struct AuthLayerBuilder<P, M = Replaying> {
    cache: CredentialCacheBuilder<P>,
    policy: Policy,
    scope: Option<Arc<Scope>>,
    mode: PhantomData<fn() -> M>,
}

impl<P, M> std::fmt::Debug for AuthLayerBuilder<P, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthLayerBuilder")
            .field("cache", &self.cache)
            .field("policy", &self.policy)
            .field("scope", &self.scope)
            .field("mode", &std::any::type_name::<M>())
            .finish()
    }
}

impl<P> AuthLayerBuilder<P, Replaying> {
    /// Builds a layer in [`Direct`] mode: see [`AuthLayer::without_replay`].
    pub fn without_replay(mut self) -> AuthLayerBuilder<P, Direct> {
        self.policy.replay = false;
        AuthLayerBuilder {
            cache: self.cache,
            policy: self.policy.clone(),
            scope: self.scope,
            mode: PhantomData,
        }
    }

    replay_rules!();
}

impl<P: CredentialSource, M> AuthLayerBuilder<P, M> {
    /// See [`CredentialCacheBuilder::fetch_timeout`].
    pub fn fetch_timeout(mut self, timeout: Duration) -> Self {
        self.cache = self.cache.fetch_timeout(timeout);
        self
    }

    /// See [`CredentialCacheBuilder::soft_window`].
    pub fn soft_window(mut self, window: Duration) -> Self {
        self.cache = self.cache.soft_window(window);
        self
    }

    /// See [`CredentialCacheBuilder::hard_window`].
    pub fn hard_window(mut self, window: Duration) -> Self {
        self.cache = self.cache.hard_window(window);
        self
    }

    /// See [`CredentialCacheBuilder::window_jitter`].
    pub fn window_jitter(mut self, jitter: f64) -> Self {
        self.cache = self.cache.window_jitter(jitter);
        self
    }

    /// See [`CredentialCacheBuilder::backoff`].
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.cache = self.cache.backoff(base, max);
        self
    }

    /// See [`CredentialCacheBuilder::keep_warm`].
    pub fn keep_warm(mut self, keep_warm: bool) -> Self {
        self.cache = self.cache.keep_warm(keep_warm);
        self
    }

    /// See [`CredentialCacheBuilder::store`].
    pub fn store(mut self, store: impl CredentialStore) -> Self {
        self.cache = self.cache.store(store);
        self
    }

    /// See [`CredentialCacheBuilder::clock`].
    pub fn clock(mut self, clock: impl crate::clock::Clock) -> Self {
        self.cache = self.cache.clock(clock);
        self
    }

    /// See [`CredentialCacheBuilder::name`].
    pub fn name(mut self, name: &str) -> Self {
        self.cache = self.cache.name(name);
        self
    }

    request_rules!();

    /// Checks every setting and builds the layer over a new cache: a value out of range
    /// or two settings that contradict each other is an [`InvalidConfig`] naming the
    /// setting.
    pub fn build(self) -> Result<AuthLayer<P, M>, InvalidConfig> {
        let cache = self.cache.build()?;
        if self.scope.is_none() {
            return Err(InvalidConfig::new(
                "origin",
                "no origin to send the credential to: call .origin(..) with the api's origin, or .any_https_origin()",
            ));
        }
        Ok(AuthLayer {
            cache,
            policy: self.policy.clone(),
            scope: self.scope,
            mode: PhantomData,
        })
    }
}
