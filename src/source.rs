//! Where credentials come from: the [`CredentialSource`] trait and its closure adapter.
//!
//! A source fetches a fresh [`Credential`] when the cache needs one: the first time, when
//! the cached one is about to expire, or after the API rejected it. The
//! [`FetchContext`] says which, and carries the credential being replaced, so a stateful
//! source (one holding a refresh token) can react to a rejection. The cache guarantees
//! that at most one fetch of a source runs at a time, so a refresh token is never used by
//! two fetches at once.
//!
//! Start with a closure through [`source_fn`]; write a type when the source holds state.
//!
//! # Example
//! ```
//! use std::time::Duration;
//! use tower_client_auth::{source_fn, BoxError, Credential, FetchContext, FetchReason};
//!
//! let source = source_fn(|cx: FetchContext| async move {
//!     // ... call the token endpoint here; `cx.reason()` says why ...
//!     let token = if cx.reason() == FetchReason::Rejected { "t0k3n-2" } else { "t0k3n" };
//!     Ok::<_, BoxError>(Credential::bearer(token)?.expires_in(Duration::from_secs(3600)))
//! });
//! # let _ = source;
//! ```

use std::{fmt, future::Future, pin::Pin, sync::Arc, time::SystemTime};

use crate::{credential::Credential, error::BoxError, handle::CacheHandle};

/// Why the cache asks for a new credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FetchReason {
    /// The cache holds no credential: the first request, or the previous one was dropped.
    Initial,
    /// The cached credential is about to expire (proactive refresh).
    Expiring,
    /// The API rejected the previous credential (for example with `401 Unauthorized`).
    Rejected,
    /// The credential was dropped from outside, through
    /// [`CacheHandle::invalidate`](crate::CacheHandle::invalidate) (for example after a
    /// gRPC `UNAUTHENTICATED`). The source must not hand the same credential back.
    Invalidated,
    /// The API said the credential lacks a scope, and the layer steps up
    /// ([`AuthLayer::step_up`](crate::AuthLayer::step_up)): get a new grant whose scope
    /// adds [`FetchContext::required_scope`] to what the current one has (a refresh
    /// cannot widen a scope, RFC 6749 §6). The current credential stays in use until this
    /// fetch succeeds; a source that cannot widen its scope returns an error, and the
    /// API's answer goes back to the caller as it came.
    StepUp,
}

/// What a [`CredentialSource`] is told about a fetch.
#[derive(Clone)]
pub struct FetchContext {
    reason: FetchReason,
    previous: Option<Credential>,
    now: SystemTime,
    sharing: Sharing,
    required_scope: Option<String>,
}

impl fmt::Debug for FetchContext {
    /// The scope an API asked for is its text: escaped and cut, as
    /// [`InsufficientScope`](crate::rejection::InsufficientScope)'s `Debug` shows it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FetchContext")
            .field("reason", &self.reason)
            .field("previous", &self.previous)
            .field("now", &self.now)
            .field("sharing", &self.sharing)
            .field(
                "required_scope",
                &(self.required_scope.as_deref())
                    .map(|scope| crate::text::escape(scope, crate::text::MAX_SERVER_TEXT)),
            )
            .finish()
    }
}

/// Who owns the refresh token for this fetch (see [`RefreshSharing`]).
#[derive(Debug, Clone, Default)]
pub(crate) enum Sharing {
    #[default]
    NotShared,
    Shared(Option<crate::Secret>),
    StoreUnavailable,
}

/// Who owns the refresh token for a fetch, from
/// [`FetchContext::refresh_sharing`]. A source that keeps refresh tokens follows it, so
/// that no two processes of a fleet ever present one refresh token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefreshSharing<'a> {
    /// No shared store: the source keeps its own refresh token.
    NotShared,
    /// The cache shares credentials through a store and holds its refresh lease: this
    /// is the refresh token the store held (`None`: none, log in), taken out of the store
    /// for this fetch. Use it and no other; return the next one with
    /// [`Credential::with_refresh_token`].
    Shared(Option<&'a crate::Secret>),
    /// The cache shares through a store that does not answer: a refresh token this
    /// source holds may be another process's by now, and must not be presented.
    StoreUnavailable,
}

impl FetchContext {
    /// A context as the cache would pass it, for calling a source's `fetch` in a test of
    /// your own (the cache makes its own): `reason`, the credential being replaced, and
    /// the system clock's time (set another with [`at`](Self::at)).
    ///
    /// ```
    /// use tower_client_auth::{Credential, CredentialSource, FetchContext, FetchReason, source_fn};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), tower_client_auth::BoxError> {
    /// // A source that must never hand back the credential the API rejected.
    /// let source = source_fn(|cx: FetchContext| async move {
    ///     let first = Credential::bearer("t1")?;
    ///     let stale = cx.previous() == Some(&first);
    ///     if stale { Credential::bearer("t2") } else { Ok(first) }
    /// });
    /// let rejected = Credential::bearer("t1")?;
    /// let cx = FetchContext::new(FetchReason::Rejected, Some(rejected.clone()));
    /// assert_ne!(source.fetch(cx).await?, rejected);
    /// # Ok(())
    /// # }
    /// ```
    pub fn new(reason: FetchReason, previous: Option<Credential>) -> Self {
        FetchContext {
            reason,
            previous,
            now: SystemTime::now(),
            sharing: Sharing::NotShared,
            required_scope: None,
        }
    }

    /// For a [`FetchReason::StepUp`]: the scope the API said the resource needs
    /// (space-separated, as the server sent it; `None` if it named none). Text from a
    /// server: escape it before logging it.
    pub fn required_scope(&self) -> Option<&str> {
        self.required_scope.as_deref()
    }

    /// Sets the scope a step-up asks for (the cache, or a test of your own).
    pub fn with_required_scope(mut self, scope: Option<String>) -> Self {
        self.required_scope = scope;
        self
    }

    /// Who owns the refresh token for this fetch: see [`RefreshSharing`].
    pub fn refresh_sharing(&self) -> RefreshSharing<'_> {
        match &self.sharing {
            Sharing::NotShared => RefreshSharing::NotShared,
            Sharing::Shared(token) => RefreshSharing::Shared(token.as_ref()),
            Sharing::StoreUnavailable => RefreshSharing::StoreUnavailable,
        }
    }

    /// Tells the fetch what an invalidation dropped, learnt after it was planned.
    pub(crate) fn set_previous(&mut self, previous: Credential) {
        self.previous = Some(previous);
    }

    /// Tells the fetch, planned for another reason, what a rejection or an invalidation
    /// learnt after it was planned dropped.
    pub(crate) fn set_told(&mut self, reason: FetchReason, previous: Option<Credential>) {
        self.reason = reason;
        self.previous = previous;
    }

    /// Sets who owns the refresh token (the cache, from its store).
    pub(crate) fn sharing(mut self, sharing: Sharing) -> Self {
        self.sharing = sharing;
        self
    }

    /// The wall-clock reading [`now`](Self::now) reports. The cache sets its clock's
    /// reading as it asks the source; a test sets a fixed one.
    pub fn at(mut self, now: SystemTime) -> Self {
        self.now = now;
        self
    }

    /// The cache's wall clock as the source is asked (see [`crate::clock`]; not as the
    /// refresh began: it may have waited for another process's lease): stamp a
    /// credential's issue and expiry with it
    /// ([`Credential::lives`](crate::Credential::lives)), so they mean the same to the cache
    /// whatever clock it was given.
    pub fn now(&self) -> SystemTime {
        self.now
    }

    /// Why the cache needs a new credential.
    pub fn reason(&self) -> FetchReason {
        self.reason
    }

    /// The credential being replaced: the rejected one for [`FetchReason::Rejected`], the
    /// expiring one for [`FetchReason::Expiring`], the dropped one (if the cache held one)
    /// for [`FetchReason::Invalidated`].
    pub fn previous(&self) -> Option<&Credential> {
        self.previous.as_ref()
    }
}

/// When a source's credentials may be refreshed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RefreshMode {
    /// Refresh before expiry: in the soft window in the background, in the hard window
    /// while callers wait. The default.
    #[default]
    Proactive,
    /// Refresh only when there is no credential or the API rejected it. For providers
    /// that reject early refreshes; an expired credential is still sent, and the API's
    /// rejection triggers the refresh.
    ReactiveOnly,
    /// The credential never changes (a fixed API key): it is fetched once and never
    /// refreshed. A rejection reaches the caller as it came, marked
    /// [`NotReplayed::FixedCredential`](crate::NotReplayed::FixedCredential): a replay
    /// would carry the same credential into the same rejection, so the layer does not
    /// keep request heads for one either. [`StaticCredential`](crate::StaticCredential)
    /// uses this mode (but for a DPoP token, which is `ReactiveOnly`: a server's nonce
    /// request is answered with a new proof).
    Never,
}

/// Fetches credentials on behalf of a [`CredentialCache`](crate::CredentialCache).
///
/// Implement it with an `async fn`:
///
/// ```
/// use tower_client_auth::{BoxError, Credential, CredentialSource, FetchContext, RefreshMode};
///
/// struct MyLogin { /* http client, key, refresh token in a Mutex, ... */ }
///
/// impl CredentialSource for MyLogin {
///     async fn fetch(&self, cx: FetchContext) -> Result<Credential, BoxError> {
///         // Use the refresh token on `FetchReason::Rejected`, log in otherwise...
///         Ok(Credential::bearer("access-token")?)
///     }
///
///     fn refresh_mode(&self) -> RefreshMode {
///         RefreshMode::ReactiveOnly
///     }
/// }
/// ```
pub trait CredentialSource: Send + Sync + 'static {
    /// Fetches a fresh credential.
    ///
    /// The cache runs this in a task of its own, under its fetch timeout, and never
    /// runs two calls of `fetch` of one cache at once (work a call spawns and that
    /// outlives it is yours to serialise: see below). Errors reach callers as
    /// [`ErrorKind::Fetch`](crate::ErrorKind::Fetch) with this error as the `source()`:
    /// keep secrets out of its message (the crate escapes control characters and
    /// removes URL credentials and queries from it before logging it, but cannot know
    /// your secrets).
    ///
    /// # Cancellation
    ///
    /// The returned future may be dropped at any await point: when the fetch timeout
    /// fires, or when the runtime running the refresh shuts down. If your exchange
    /// changes state on the server (it presents a refresh token that the server
    /// rotates), a drop between sending and storing the answer loses the new token, and
    /// the next fetch presents the spent one. Either make the exchange safe to drop, or
    /// run it in a task of its own (`tokio::spawn`) and await its handle, so it runs to
    /// completion and stores what it got even when this future is gone. Then serialise
    /// those exchanges yourself, always (an async mutex held across the exchange, in the
    /// spawned task): once a timed-out fetch is dropped, the cache may call `fetch` again
    /// after its backoff while the spawned exchange still runs, and two exchanges would
    /// present one refresh token twice. The crate's
    /// [`TokenSource`](crate::token::TokenSource) does exactly this.
    fn fetch(&self, cx: FetchContext) -> impl Future<Output = Result<Credential, BoxError>> + Send;

    /// When this source's credentials may be refreshed. Defaults to
    /// [`RefreshMode::Proactive`].
    fn refresh_mode(&self) -> RefreshMode {
        RefreshMode::Proactive
    }

    /// Whether this source can work as configured: checked when a cache or layer is
    /// built with a builder ([`CredentialCacheBuilder::build`](crate::CredentialCacheBuilder::build),
    /// [`AuthLayerBuilder::build`](crate::AuthLayerBuilder::build)), so that a source
    /// missing a piece is refused there, not on its first fetch. The default has nothing
    /// to check.
    fn check(&self) -> Result<(), crate::InvalidConfig> {
        Ok(())
    }

    /// Called once by every cache that takes this source, before any fetch. A source
    /// whose value changes from outside (a rotated token, a watched file) keeps the
    /// handle and pushes the new credential through it. The default ignores it.
    fn attach(&self, cache: CacheHandle) {
        let _ = cache;
    }

    /// Whether this source may return credentials bound to a key (DPoP:
    /// [`DpopKey::credential`](crate::token::DpopKey::credential)). Each request carrying
    /// one carries a proof naming its whole URI, so the reqwest middleware hands the
    /// request path the whole URI rather than the origin alone; and such credentials are
    /// never shared through a [`CredentialStore`](crate::CredentialStore) (a cache built
    /// with both is refused). A source that returns a bound credential without saying so
    /// here fails that fetch with [`ErrorKind::InvalidCredential`](crate::ErrorKind::InvalidCredential).
    /// The default is `false`; [`TokenSource`](crate::token::TokenSource) with
    /// [`dpop`](crate::token::TokenSource::dpop) and a [`StaticCredential`](crate::StaticCredential)
    /// holding a bound credential say `true`.
    fn binds_credentials(&self) -> bool {
        false
    }
}

impl<P: CredentialSource> CredentialSource for Arc<P> {
    fn fetch(&self, cx: FetchContext) -> impl Future<Output = Result<Credential, BoxError>> + Send {
        (**self).fetch(cx)
    }

    fn refresh_mode(&self) -> RefreshMode {
        (**self).refresh_mode()
    }

    fn attach(&self, cache: CacheHandle) {
        (**self).attach(cache)
    }

    fn check(&self) -> Result<(), crate::InvalidConfig> {
        (**self).check()
    }

    fn binds_credentials(&self) -> bool {
        (**self).binds_credentials()
    }
}

/// [`CredentialSource`] in a form that can live behind `dyn`: every source is one.
trait DynSource: Send + Sync + 'static {
    fn fetch_boxed(&self, cx: FetchContext) -> BorrowedFetch<'_>;
    fn refresh_mode(&self) -> RefreshMode;
    fn attach(&self, cache: CacheHandle);
    fn check(&self) -> Result<(), crate::InvalidConfig>;
    fn binds_credentials(&self) -> bool;
    fn type_name(&self) -> &'static str;
}

impl<P: CredentialSource> DynSource for P {
    fn fetch_boxed(&self, cx: FetchContext) -> BorrowedFetch<'_> {
        Box::pin(CredentialSource::fetch(self, cx))
    }

    fn refresh_mode(&self) -> RefreshMode {
        CredentialSource::refresh_mode(self)
    }

    fn attach(&self, cache: CacheHandle) {
        CredentialSource::attach(self, cache)
    }

    fn check(&self) -> Result<(), crate::InvalidConfig> {
        CredentialSource::check(self)
    }

    fn binds_credentials(&self) -> bool {
        CredentialSource::binds_credentials(self)
    }

    fn type_name(&self) -> &'static str {
        std::any::type_name::<P>()
    }
}

/// Any [`CredentialSource`] behind one type: chosen at run time (from configuration, per
/// tenant), kept in a `Vec` or a map, or named in a struct field without a type
/// parameter, as the AWS SDK's `SharedIdentityResolver` does. Cheap to clone: clones
/// share the source. One box per fetch (fetches are rare; requests never pay it).
///
/// ```
/// use tower_client_auth::{AuthLayer, SharedCredentialSource, StaticCredential, source_fn};
///
/// # fn pick(from_config: &str) -> Result<SharedCredentialSource, Box<dyn std::error::Error>> {
/// let source = match from_config {
///     "static" => SharedCredentialSource::new(StaticCredential::bearer("pat_123")?),
///     _ => SharedCredentialSource::new(source_fn(|_cx| async {
///         tower_client_auth::Credential::bearer("fetched")
///     })),
/// };
/// # Ok(source) }
/// let layer: AuthLayer<SharedCredentialSource> =
///     AuthLayer::new(pick("static")?).origin("https://api.example.com")?;
/// # let _ = layer;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct SharedCredentialSource {
    inner: Arc<dyn DynSource>,
}

impl SharedCredentialSource {
    /// Shares `source` behind one type. Its refresh mode and `attach` are its own.
    pub fn new(source: impl CredentialSource) -> Self {
        SharedCredentialSource {
            inner: Arc::new(source),
        }
    }
}

impl fmt::Debug for SharedCredentialSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SharedCredentialSource")
            .field(&self.inner.type_name())
            .finish()
    }
}

impl CredentialSource for SharedCredentialSource {
    fn fetch(&self, cx: FetchContext) -> impl Future<Output = Result<Credential, BoxError>> + Send {
        self.inner.fetch_boxed(cx)
    }

    fn refresh_mode(&self) -> RefreshMode {
        self.inner.refresh_mode()
    }

    fn attach(&self, cache: CacheHandle) {
        self.inner.attach(cache)
    }

    fn check(&self) -> Result<(), crate::InvalidConfig> {
        self.inner.check()
    }

    fn binds_credentials(&self) -> bool {
        self.inner.binds_credentials()
    }
}

/// Makes a [`CredentialSource`] from an async closure. See [`SourceFn`].
pub fn source_fn<F, Fut, E>(f: F) -> SourceFn
where
    F: Fn(FetchContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Credential, E>> + Send + 'static,
    E: Into<BoxError>,
{
    SourceFn {
        f: Arc::new(move |cx| {
            let fut = f(cx);
            Box::pin(async move { fut.await.map_err(Into::into) })
        }),
        mode: RefreshMode::Proactive,
        binds: false,
    }
}

type FetchFuture = Pin<Box<dyn Future<Output = Result<Credential, BoxError>> + Send>>;

/// A boxed fetch that borrows its source.
type BorrowedFetch<'a> = Pin<Box<dyn Future<Output = Result<Credential, BoxError>> + Send + 'a>>;

/// A [`CredentialSource`] made from a closure by [`source_fn`]. Cheap to clone.
///
/// The closure's future is boxed once per fetch (fetches are rare; requests never
/// allocate for it). Boxing at construction also makes `SourceFn` a plain, nameable type:
/// `AddCredential<S, SourceFn>` can be written in a struct field, and the compiler never has to
/// re-prove the closure's `Send` bounds inside the futures of your own code.
#[derive(Clone)]
pub struct SourceFn {
    f: Arc<dyn Fn(FetchContext) -> FetchFuture + Send + Sync>,
    mode: RefreshMode,
    binds: bool,
}

impl SourceFn {
    /// Sets the [`RefreshMode`] (default: proactive).
    pub fn refresh_mode(mut self, mode: RefreshMode) -> Self {
        self.mode = mode;
        self
    }

    /// Says the closure returns credentials bound to a key (DPoP): see
    /// [`CredentialSource::binds_credentials`].
    pub fn binds_credentials(mut self, binds: bool) -> Self {
        self.binds = binds;
        self
    }
}

impl fmt::Debug for SourceFn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceFn")
            .field("mode", &self.mode)
            .finish()
    }
}

impl CredentialSource for SourceFn {
    fn fetch(&self, cx: FetchContext) -> impl Future<Output = Result<Credential, BoxError>> + Send {
        (self.f)(cx)
    }

    fn refresh_mode(&self) -> RefreshMode {
        self.mode
    }

    fn binds_credentials(&self) -> bool {
        self.binds
    }
}
