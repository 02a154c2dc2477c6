//! The crate's error types.
//!
//! Middleware errors are small values you can match on ([`Error::kind`]) or downcast to
//! from the service's `BoxError`. Their `Display` is lowercase, never carries a
//! credential, and says what failed and why in one line: the causes it shows are not
//! returned again by [`std::error::Error::source`], so a report that prints the chain
//! (anyhow's `{:#}`, eyre) says each once. The wrapped error itself stays reachable
//! for downcasting through [`Error::get_ref`], as with [`std::io::Error::get_ref`].

use std::{error::Error as StdError, fmt, sync::Arc, time::Duration};

/// Alias for a type-erased error, as used throughout Tower.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// What went wrong while authenticating a request.
///
/// New kinds may be added, so matches need a wildcard arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The credential source returned an error.
    Fetch,
    /// The credential source did not answer within the fetch timeout; or a refresh
    /// running on another runtime has not ended by the time it would have there, since
    /// that runtime is not driven (a current-thread runtime between two `block_on`
    /// calls): the request stops waiting for it.
    Timeout,
    /// The cache is waiting before it asks the source again. Either recent fetches
    /// failed, and no valid credential is available meanwhile (the last failure is the
    /// `source()`); or, without a `source()`, the API rejected credentials right after
    /// they became current, and the rejected one, still in use, is not replaced before
    /// the backoff allows (see
    /// [`YOUNG_CREDENTIAL_AGE`](crate::cache::YOUNG_CREDENTIAL_AGE)); or, without a
    /// `source()` either, the token endpoint asked every process of the fleet to wait (a
    /// `Retry-After` another process sharing the store was answered with: see
    /// [`CredentialStore::hold`](crate::CredentialStore::hold)), which is no failure of
    /// this cache's. [`Error::retry_in`] says how long is left.
    Backoff,
    /// The source returned a credential that had already expired.
    Expired,
    /// The credential source panicked while fetching.
    SourcePanicked,
    /// The request would have carried a credential over an insecure transport.
    InsecureTransport,
    /// A credential could not be built from the given values (bad characters, empty).
    InvalidCredential,
    /// No Tokio runtime was available to run the refresh on, or the one there has no
    /// timers (built without `enable_time`).
    NoRuntime,
    /// The refresh was cancelled before it finished: the runtime it ran on shut down.
    Cancelled,
    /// The runtime refused to start the refresh task: it is shutting down.
    SpawnRefused,
    /// The layer or middleware was given no origin to send its credential to, so it
    /// sends it nowhere. Call `.origin(..)` with the API's origin, or opt in to every
    /// https origin with `.any_https_origin()`.
    NoOrigin,
    /// A layer without replay ([`Direct`](crate::Direct)) was called with no usable
    /// credential readied: `call` without a `poll_ready` that returned `Ready` first, or
    /// after holding the service ready until the credential it readied expired. Poll it
    /// ready again.
    NotReady,
    /// A future of this crate was polled after it had completed (a bug in the caller).
    PolledAfterCompletion,
    /// The request's header map was full (`http`'s `MAX_SIZE`), so the credential could
    /// not be added; the request was not sent.
    HeadersFull,
    /// The credential is bound to a key (DPoP, RFC 9449) and no proof of possession
    /// could be made for the request (a URI without scheme or host, a failed signature);
    /// the request was not sent.
    Proof,
    /// The refresh found its credential in the shared store, and each time that
    /// credential was dropped (rejected, invalidated) as it loaded, by another request
    /// of this process: nothing was installed. The source was not asked, and nothing
    /// backs off: the next request looks again.
    StoreCredentialDropped,
    /// The request's own timeout (reqwest's `RequestBuilder::timeout`, which the reqwest
    /// middleware counts from the first attempt's send) ran out after its first answer,
    /// before it could be sent again (a replay, a new proof): while it waited for a new
    /// credential, or as it came. Nothing more was sent. (One that runs out while an
    /// attempt is on its way is reqwest's own timeout error.)
    RequestTimeout,
}

impl ErrorKind {
    fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Fetch => "credential source failed to fetch a credential",
            ErrorKind::Timeout => "credential fetch timed out",
            ErrorKind::Backoff => "credential source is backing off after failed fetches",
            ErrorKind::Expired => "credential source returned an expired credential",
            ErrorKind::SourcePanicked => "credential source panicked",
            ErrorKind::InsecureTransport => {
                "refusing to send a credential over an insecure transport"
            }
            ErrorKind::InvalidCredential => "invalid credential",
            ErrorKind::NoRuntime => "no tokio runtime available to refresh the credential",
            ErrorKind::Cancelled => {
                "the credential refresh was cancelled: the runtime it ran on shut down"
            }
            ErrorKind::NoOrigin => {
                "no origin to send the credential to: call .origin(..) with the api's origin, or .any_https_origin() to send it to every https origin"
            }
            ErrorKind::SpawnRefused => {
                "the runtime refused to start the credential refresh: it is shutting down"
            }
            ErrorKind::NotReady => {
                "no usable credential was readied for this call: poll the service ready right before calling it"
            }
            ErrorKind::PolledAfterCompletion => "a future was polled after it completed",
            ErrorKind::HeadersFull => {
                "the request's header map is full; no room for the credential"
            }
            ErrorKind::Proof => "no proof of possession could be made for the request",
            ErrorKind::StoreCredentialDropped => {
                "the shared store's credential was dropped each time it was loaded: try again"
            }
            ErrorKind::RequestTimeout => {
                "the request's own timeout ran out before it could be sent again"
            }
        }
    }
}

/// An authentication failure raised by this crate (never by the inner service).
///
/// Cheap to clone: every waiter of one refresh receives the same error.
///
/// ```
/// use tower_client_auth::{Error, ErrorKind, BoxError};
///
/// fn is_insecure(err: &BoxError) -> bool {
///     err.downcast_ref::<Error>().map(Error::kind) == Some(ErrorKind::InsecureTransport)
/// }
/// # let _ = is_insecure;
/// ```
#[derive(Clone)]
pub struct Error {
    kind: ErrorKind,
    detail: Option<&'static str>,
    retry_in: Option<Duration>,
    /// The source asked for no new attempt before this long (a `Retry-After`).
    pub(crate) not_before: Option<Duration>,
    /// The credential was rejected right after it became current, and the backoff holds
    /// off the fetch that would replace it: the rejected response is the answer.
    pub(crate) fresh_rejection: bool,
    /// The fleet's hold (a `Retry-After` read from the store): no fetch failed.
    pub(crate) held: bool,
    source: Option<Arc<dyn StdError + Send + Sync>>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind) -> Self {
        Error {
            kind,
            detail: None,
            retry_in: None,
            not_before: None,
            fresh_rejection: false,
            held: false,
            source: None,
        }
    }

    /// The error for a fresh rejection held off by the backoff (see its field).
    pub(crate) fn fresh_rejection(retry_in: Duration) -> Self {
        let mut err = Error::new(ErrorKind::Backoff)
            .with_detail("the api rejects credentials right after they are issued")
            .with_retry_in(retry_in);
        err.fresh_rejection = true;
        err
    }

    pub(crate) fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(Arc::from(source.into()));
        self
    }

    pub(crate) fn with_shared_source(mut self, source: Arc<dyn StdError + Send + Sync>) -> Self {
        self.source = Some(source);
        self
    }

    /// A fixed, secret-free explanation appended to the message.
    pub(crate) fn with_detail(mut self, detail: &'static str) -> Self {
        self.detail = Some(detail);
        self
    }

    pub(crate) fn with_retry_in(mut self, retry_in: Duration) -> Self {
        self.retry_in = Some(retry_in);
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The error this one wraps, for downcasting: a source's own error, a
    /// [`TokenError`](crate::token::TokenError), or this crate's `Error` for the failure
    /// behind a backoff. Its text is already part of this error's `Display`, so it is
    /// not also returned by `source()`.
    pub fn get_ref(&self) -> Option<&(dyn StdError + Send + Sync + 'static)> {
        self.source.as_deref()
    }

    /// Every error under this one, nearest first, whether `Display` shows it or not.
    fn causes(&self) -> impl Iterator<Item = &(dyn StdError + 'static)> {
        let first = self.get_ref().map(|e| e as &(dyn StdError + 'static));
        // Through the crate's own errors by `get_ref`: their `source()` skips what their
        // `Display` shows.
        std::iter::successors(first, |e: &&(dyn StdError + 'static)| {
            match e.downcast_ref::<Error>() {
                Some(ours) => ours.get_ref().map(|e| e as &(dyn StdError + 'static)),
                None => (*e).source(),
            }
        })
        // A user's error whose chain loops (or runs on without end) is cut.
        .take(MAX_CHAIN)
    }

    /// The causes `Display` shows (at most [`MAX_CAUSES`]; the crate's own wrappers are
    /// passed over), and the first cause it does not show, which `source()` returns.
    fn shown_causes(
        &self,
    ) -> (
        impl Iterator<Item = &(dyn StdError + 'static)>,
        Option<&(dyn StdError + 'static)>,
    ) {
        let mut shown = 0;
        let mut rest = None;
        let mut taken = 0;
        for cause in self.causes() {
            if cause.downcast_ref::<Error>().is_some() {
                taken += 1;
                continue;
            }
            if shown == MAX_CAUSES {
                rest = Some(cause);
                break;
            }
            shown += 1;
            taken += 1;
        }
        let causes = self
            .causes()
            .take(taken)
            .filter(|c| c.downcast_ref::<Error>().is_none());
        (causes, rest)
    }

    /// For [`ErrorKind::Backoff`]: how long until the cache asks the source again.
    pub fn retry_in(&self) -> Option<Duration> {
        self.retry_in
    }

    #[cfg(feature = "token")]
    #[cfg_attr(docsrs, doc(cfg(feature = "token")))]
    /// The token endpoint failure behind this error, if a
    /// [`TokenSource`](crate::token::TokenSource) failed (directly, or as the cause of a
    /// backoff).
    pub fn token_error(&self) -> Option<&crate::token::TokenError> {
        self.causes()
            .find_map(|e| e.downcast_ref::<crate::token::TokenError>())
    }

    #[cfg(feature = "token")]
    #[cfg_attr(docsrs, doc(cfg(feature = "token")))]
    /// The OAuth2 `error` code the token endpoint answered (`invalid_client`,
    /// `invalid_grant`, ...), if any.
    pub fn oauth_error(&self) -> Option<&str> {
        self.token_error().and_then(|t| t.oauth_error())
    }

    #[cfg(feature = "token")]
    #[cfg_attr(docsrs, doc(cfg(feature = "token")))]
    /// The HTTP status the token endpoint answered, if it answered.
    pub fn token_status(&self) -> Option<http::StatusCode> {
        self.token_error().and_then(|t| t.status())
    }

    /// Whether retrying cannot help without a change of configuration: the client
    /// credentials or grant were refused, the token url is wrong or insecure, a
    /// credential cannot be built. Transient otherwise (the endpoint down, slow,
    /// throttling), and the cache retries on its backoff schedule.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::InsecureTransport | ErrorKind::InvalidCredential | ErrorKind::HeadersFull
        ) || self.token_failure_is_permanent()
    }

    #[cfg(feature = "token")]
    fn token_failure_is_permanent(&self) -> bool {
        self.token_error().is_some_and(|t| t.is_permanent())
    }

    #[cfg(not(feature = "token"))]
    fn token_failure_is_permanent(&self) -> bool {
        false
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Debug shows the cause's Display rather than its Debug: a user error type's
        // derived Debug is the likeliest place for a secret to slip out.
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind);
        if let Some(detail) = self.detail {
            d.field("detail", &detail);
        }
        if let Some(retry_in) = self.retry_in {
            d.field("retry_in", &retry_in);
        }
        if self.source.is_some() {
            // Sanitised, as `Display` shows them: a user source's text may carry a URL
            // with a key in it, or control characters, and its chain may be long.
            let causes: Vec<String> = self.shown_causes().0.map(shown).collect();
            d.field("source", &format_args!("{}", causes.join(": ")));
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    /// One line: what failed, then the causes that say why (the token endpoint's
    /// answer, the connection error), each made safe to show (no URL credentials or
    /// queries, control characters escaped). The crate's own wrappers (a backoff over a
    /// failed fetch) are not repeated.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.fresh_rejection || self.held {
            // No fetch failed: the detail says why.
            f.write_str("credential source is backing off")?;
        } else {
            f.write_str(self.kind.as_str())?;
        }
        if let Some(detail) = self.detail {
            write!(f, ": {detail}")?;
        }
        if let Some(retry_in) = self.retry_in {
            write!(f, " (next attempt in {} ms)", retry_in.as_millis())?;
        }
        for cause in self.shown_causes().0 {
            write!(f, ": {}", shown(cause))?;
        }
        Ok(())
    }
}

/// A cause as `Display` and `Debug` show it: made safe to show.
fn shown(cause: &(dyn StdError + 'static)) -> String {
    // The token client's errors show server text escaped already: escaped again, every
    // backslash of its escapes would double.
    #[cfg(feature = "token")]
    if cause.is::<crate::token::TokenError>() {
        return crate::text::ours(&cause.to_string());
    }
    crate::text::foreign(&cause.to_string())
}

/// Most causes `Display` shows after the error itself.
const MAX_CAUSES: usize = 4;

/// Most causes of a chain looked at, for any purpose.
const MAX_CHAIN: usize = 64;

impl StdError for Error {
    /// The first cause `Display` does not already show: `None` unless the chain is
    /// longer than `Display` goes. [`Error::get_ref`] reaches the wrapped error.
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.shown_causes().1
    }
}

/// Why a credential bound to a key is refused where binding was not declared.
pub(crate) const UNDECLARED_BINDING: &str = "a credential bound to a key (DPoP) given to a source that does not bind credentials: its CredentialSource::binds_credentials must return true (a RotatingCredential binds when made with a bound credential)";

/// A credential could not be built or handed in: a value holds characters a header
/// cannot carry, a required part is empty, or it is bound to a key where binding was not
/// declared.
///
/// The message names the part that is wrong, never its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidCredential {
    what: &'static str,
}

impl InvalidCredential {
    pub(crate) fn new(what: &'static str) -> Self {
        InvalidCredential { what }
    }
}

impl fmt::Display for InvalidCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid credential: {}", self.what)
    }
}

impl StdError for InvalidCredential {}

impl From<InvalidCredential> for Error {
    fn from(e: InvalidCredential) -> Self {
        Error::new(ErrorKind::InvalidCredential).with_source(e)
    }
}

/// A setting of a cache or a layer is out of range, or two settings contradict each
/// other. Returned when the cache or layer is built, never later on a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidConfig {
    setting: &'static str,
    reason: &'static str,
}

impl InvalidConfig {
    pub(crate) fn new(setting: &'static str, reason: &'static str) -> Self {
        InvalidConfig { setting, reason }
    }

    /// The setter at fault, such as `"window_jitter"`.
    pub fn setting(&self) -> &'static str {
        self.setting
    }
}

impl fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: {}", self.setting, self.reason)
    }
}

impl StdError for InvalidConfig {}
