//! [`AuthMiddleware`]: the same credentials, cache and rules for `reqwest` users, as a
//! [`reqwest_middleware::Middleware`](https://docs.rs/reqwest-middleware/0.5/reqwest_middleware/trait.Middleware.html).
//!
//! One [`CredentialCache`] can serve a Tower stack and a reqwest client at once: build the
//! middleware [`from_layer`](AuthMiddleware::from_layer) or
//! [`with_cache`](AuthMiddleware::with_cache) and both share one credential and one refresh.
//!
//! It is the layer's request path, not a copy of it: each request's method, URI, headers
//! and body go through the same [`AddCredential`](crate::AddCredential) state machine, over the rest of the
//! middleware chain (the reqwest request keeps its URL, timeout and settings, and the
//! reqwest response comes back as it was, so nothing is parsed twice), so every rule is
//! the same: credential headers marked sensitive;
//! `https` only (loopback `http` on request); on a rejection status (default `401`) the
//! credential is invalidated if still current and the request replayed once, its body
//! (streaming or not) retained as it is sent, up to the replay limit; never replayed with
//! the credential just rejected; `403` never refreshes; a response not replayed carries a
//! [`NotReplayed`](crate::NotReplayed) extension saying why; a [`NoReplay`] in the
//! middleware extensions opts a request out of the replay. The request's reqwest settings
//! and the response's URL and extensions are kept; its own timeout
//! (`RequestBuilder::timeout`) bounds the whole call, a replay sent with what the first
//! attempt and the refresh left of it.
//!
//! # What the client adds below
//! reqwest adds its client's `default_headers` inside the client, below every middleware,
//! to a request that has no header of that name. A `Host` there is never seen by this
//! middleware's rule ("never with a `Host` header that names another origin"): set no
//! `Host` in `default_headers` (set it on the request, where the rule sees it). Forcing
//! each request's own `Host` would close this, and was not done: reqwest keeps a `Host`
//! across a redirect to another host, so a client with reqwest's own redirect policy
//! (a download redirected to object storage, say) would send the API's `Host` there.
//!
//! # Redirects
//! reqwest follows redirects inside the client, below every middleware, and removes only
//! `Authorization`, `Cookie` and `Proxy-Authorization` on a hop to another host, port or
//! scheme: an API-key header or any other credential header would follow the redirect.
//! Build the client with [`redirect_policy`], which follows a redirect only within the
//! origin it starts from and hands any other back to the caller as it came (for DPoP,
//! use `reqwest::redirect::Policy::none()` instead: a hop would carry the first
//! request's proof):
//!
//! ```
//! let client = reqwest::Client::builder()
//!     .redirect(tower_client_auth::reqwest::redirect_policy())
//!     .build()?;
//! # let _ = client;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! A client built otherwise gets no false verdict on a replayable request from an
//! answer at another origin than the request's, or from any hop's answer to a request
//! with a proof: neither is judged as the request's (no refetch, no replay, no new
//! proof) and each goes back as it came. One it can get: a round trip through another
//! origin and back ends at the request's origin with no `Authorization` (reqwest
//! removed it on the way out), and its `401` is judged as the request's; a response does
//! not say which hops it took, and a redirect within the origin, which carried the
//! credential, must be judged. [`redirect_policy`] never leaves the origin.
//!
//! # Ordering with `reqwest-retry`
//! Put the retry middleware **before** (outside) this one:
//!
//! ```text
//! ClientBuilder::new(http) // built with redirect_policy(), below
//!     .with(RetryTransientMiddleware::new_with_policy(policy)) // outer: retries...
//!     .with(AuthMiddleware::new(source).origin(origin)?)       // ...each attempt gets a fresh header
//!     .build()
//! ```
//!
//! Middlewares run in the order they are added. With auth inside the retry loop, every
//! attempt takes the credential from the cache, so a retry after a backoff sleep never
//! resends a credential that expired or was rotated meanwhile. The other way round, the
//! retry middleware would clone and resend the first attempt's header.
//!
//! This middleware's errors reach the retry as `reqwest_middleware::Error::Middleware`,
//! which reqwest-retry's default strategy calls fatal: none is retried. That is what
//! most of them call for (a refused request fails again; a `Backoff` says in
//! [`Error::retry_in`](crate::Error::retry_in) how long the cache waits, which a retry
//! policy's own schedule does not know), but [`ErrorKind::RequestTimeout`] is the
//! timeout reqwest would have raised had it run out during an attempt, which the
//! default strategy retries. A strategy that retries both alike reads this crate's
//! error with [`auth_error`]:
//!
//! ```
//! use reqwest_middleware::ClientBuilder;
//! use reqwest_retry::{
//!     DefaultRetryableStrategy, RetryTransientMiddleware, Retryable, RetryableStrategy,
//!     policies::ExponentialBackoff,
//! };
//! use tower_client_auth::{ErrorKind, reqwest::auth_error};
//!
//! struct TimeoutsAlike;
//!
//! impl RetryableStrategy for TimeoutsAlike {
//!     fn handle(
//!         &self,
//!         res: &reqwest_middleware::Result<reqwest::Response>,
//!     ) -> Option<Retryable> {
//!         match res {
//!             Err(err) if auth_error(err).map(|e| e.kind()) == Some(ErrorKind::RequestTimeout) => {
//!                 Some(Retryable::Transient)
//!             }
//!             other => DefaultRetryableStrategy.handle(other),
//!         }
//!     }
//! }
//!
//! let policy = ExponentialBackoff::builder().build_with_max_retries(2);
//! let retry = RetryTransientMiddleware::new_with_policy_and_strategy(policy, TimeoutsAlike);
//! # let source = tower_client_auth::StaticCredential::new(
//! #     tower_client_auth::Credential::bearer("t").unwrap(),
//! # );
//! let client = ClientBuilder::new(reqwest::Client::new())
//!     .with(retry)
//!     .with(tower_client_auth::reqwest::AuthMiddleware::new(source).any_https_origin())
//!     .build();
//! # drop(client);
//! ```
//!
//! # Example
//! OAuth2 client credentials, the token requests through reqwest too (the whole recipe,
//! against a loopback server, is the crate's `reqwest_client_credentials` example):
//!
//! ```
//! use reqwest_middleware::ClientBuilder;
//! use tower_client_auth::{
//!     ErrorKind,
//!     reqwest::{AuthMiddleware, auth_error},
//!     token::{TokenClient, TokenSource},
//! };
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Token requests must follow no redirect at all (the client secret would go along).
//! let token_http = reqwest::Client::builder()
//!     .redirect(reqwest::redirect::Policy::none())
//!     .build()?;
//! # let idp = "https://127.0.0.1:1"; // nothing listens: the fetch below fails
//! # let api = "https://127.0.0.1:2";
//! let source = TokenSource::client_credentials(&format!("{idp}/oauth/token"), "id", "secret")?
//!     .client(TokenClient::reqwest(token_http));
//! // API requests follow redirects only within their origin.
//! let http = reqwest::Client::builder()
//!     .redirect(tower_client_auth::reqwest::redirect_policy())
//!     .build()?;
//! let client = ClientBuilder::new(http)
//!     .with(AuthMiddleware::new(source).origin(api)?) // "https://api.example.com"
//!     .build();
//!
//! // This crate's error, read back out of reqwest-middleware's: here the token
//! // endpoint could not be reached, so no request went to the API.
//! let err = client.get(format!("{api}/v1/me")).send().await.unwrap_err();
//! assert_eq!(auth_error(&err).map(|e| e.kind()), Some(ErrorKind::Fetch));
//! # Ok(())
//! # }
//! ```

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures_util::{FutureExt, future::BoxFuture};
use http::Extensions;
use http_body_util::BodyExt;
use reqwest_middleware::{Middleware, Next};
use tower_service::Service;

use crate::{
    body::ReplayBody,
    cache::{CacheRef, CredentialCache},
    error::{BoxError, Error, ErrorKind},
    future::ResponseFuture,
    layer::AuthLayer,
    policy::{ExistingHeader, NoReplay, Policy},
    rejection::InsufficientScope,
    scope::{Origin, Scope},
    source::CredentialSource,
};

/// This crate's [`Error`] inside a `reqwest_middleware::Error`, if that is
/// what it carries: a refused request (no origin, an insecure transport), a failed
/// refresh, a backoff. `None` for reqwest's own errors (connect, timeout, body). Read
/// through a `reqwest-retry` middleware's wrapping (`RetryError`, which it puts around
/// every error it hands back), through another middleware's error wrapped whole
/// (`reqwest_middleware::Error::middleware(err)`), and through any middleware error
/// that names it as its source (anyhow's `context`).
///
/// ```
/// # fn handle(err: reqwest_middleware::Error) {
/// use tower_client_auth::{ErrorKind, reqwest::auth_error};
/// match auth_error(&err).map(|e| e.kind()) {
///     Some(ErrorKind::Backoff) => { /* the token endpoint is failing: retry later */ }
///     Some(kind) => eprintln!("auth: {kind:?}: {err}"),
///     None => eprintln!("transport: {err}"),
/// }
/// # }
/// ```
pub fn auth_error(err: &reqwest_middleware::Error) -> Option<&crate::Error> {
    let reqwest_middleware::Error::Middleware(err) = err else {
        return None;
    };
    if let Some(ours) = err.downcast_ref::<crate::Error>() {
        return Some(ours);
    }
    // reqwest-retry wraps every error it hands back, a first attempt's too; its
    // `RetryError::Error` is transparent, so the chain below would skip the error it
    // wraps.
    if let Some(retry) = err.downcast_ref::<reqwest_retry::RetryError>() {
        return match retry {
            reqwest_retry::RetryError::Error(err)
            | reqwest_retry::RetryError::WithRetries { err, .. } => auth_error(err),
        };
    }
    // Another middleware's error handed on in a wrapping of its own, as
    // `reqwest_middleware::Error::middleware(err)` does.
    if let Some(inner) = err.downcast_ref::<reqwest_middleware::Error>() {
        return auth_error(inner);
    }
    // A wrapper of another middleware's that names what it wraps as its source.
    err.chain().skip(1).find_map(|cause| {
        cause.downcast_ref::<crate::Error>().or_else(|| {
            cause
                .downcast_ref::<reqwest_middleware::Error>()
                .and_then(auth_error)
        })
    })
}

/// Most redirects [`redirect_policy`] follows in a row, as reqwest's default policy.
pub const MAX_REDIRECTS: usize = 10;

/// A reqwest redirect policy that keeps credentials on their origin: it follows a
/// redirect to the same origin (scheme, host and port) as the request it answers, at
/// most [`MAX_REDIRECTS`] in a row, and stops at any other, handing that 3xx back to the
/// caller as it came. reqwest removes only a few standard headers on a hop to another
/// origin; with this policy there is no such hop. See the [module docs](self).
///
/// Not for a client whose middleware's source binds credentials (DPoP,
/// [`CredentialSource::binds_credentials`]): a same-origin hop would carry the first
/// request's proof, made for another URI (and a redirect policy cannot see that a request
/// carries one). Build that client with `reqwest::redirect::Policy::none()`.
pub fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let Some(previous) = attempt.previous().last() else {
            return attempt.follow();
        };
        let next = attempt.url();
        let same_origin = next.scheme() == previous.scheme()
            && next.host_str() == previous.host_str()
            && next.port_or_known_default() == previous.port_or_known_default();
        if !same_origin {
            attempt.stop()
        } else if attempt.previous().len() > MAX_REDIRECTS {
            attempt.error("too many redirects")
        } else {
            attempt.follow()
        }
    })
}

/// Adds cached credentials to `reqwest` requests and replays once on rejection. See the
/// [module docs](self).
pub struct AuthMiddleware<P> {
    /// Counted once per request (see `CacheRef`): a clone of the cache itself would
    /// count its users too.
    cache: Arc<CredentialCache<P>>,
    policy: Policy,
    scope: Option<Arc<Scope>>,
    /// The proxies a reqwest client built with its defaults takes from the environment,
    /// read when the middleware is built (as the client reads them when it is built);
    /// `None` once told the client takes none
    /// ([`client_without_proxy`](Self::client_without_proxy)).
    env_proxies: Option<Arc<hyper_util::client::proxy::matcher::Matcher>>,
}

// By hand: a derive would ask `P: Debug`, which the cache's `Debug` does not need.
impl<P> std::fmt::Debug for AuthMiddleware<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthMiddleware")
            .field("cache", &self.cache)
            .field("policy", &self.policy)
            .field("scope", &self.scope)
            .field("env_proxies", &self.env_proxies.is_some())
            .finish()
    }
}

impl<P> Clone for AuthMiddleware<P> {
    fn clone(&self) -> Self {
        AuthMiddleware {
            cache: self.cache.clone(),
            policy: self.policy.clone(),
            scope: self.scope.clone(),
            env_proxies: self.env_proxies.clone(),
        }
    }
}

impl<P: CredentialSource> AuthMiddleware<P> {
    /// A middleware over a new cache of `source`, with default settings.
    pub fn new(source: P) -> Self {
        Self::with_cache(CredentialCache::new(source))
    }

    /// A middleware over an existing cache, shared with whatever else uses it.
    pub fn with_cache(cache: CredentialCache<P>) -> Self {
        AuthMiddleware {
            cache: Arc::new(cache),
            policy: Policy::default(),
            scope: None,
            env_proxies: crate::policy::env_proxies(),
        }
    }

    /// A middleware sharing `layer`'s cache and settings.
    pub fn from_layer<M>(layer: &AuthLayer<P, M>) -> Self {
        AuthMiddleware {
            cache: Arc::new(layer.cache().clone()),
            policy: layer.policy(),
            scope: layer.scope(),
            env_proxies: crate::policy::env_proxies(),
        }
    }

    /// Says that the reqwest client below takes no proxy from the environment: it was
    /// built with `.no_proxy()`.
    ///
    /// With [`allow_http_loopback`](Self::allow_http_loopback), a plain-http request to a
    /// loopback host is refused (`ErrorKind::InsecureTransport`, before anything is
    /// sent) when the proxy variables a default reqwest client reads (`HTTP_PROXY`,
    /// `ALL_PROXY`, lower case too, less `NO_PROXY`, and none of them under CGI; on
    /// macOS and Windows also the system's settings) would send it to a proxy, even one
    /// listening on this host: plain http is allowed because the request stays on this
    /// host, and a proxy may send it on anywhere, unseen (cntlm in the clear to its parent
    /// proxy, a loopback port of `ssh -L` or `kubectl port-forward` to another host, a
    /// SOCKS proxy from its far end).
    ///
    /// The variables are read when the middleware is built, as a default client reads
    /// them when it is built: build both in the same environment. The middleware cannot
    /// see the client's own settings; this tells it. A client with proxies of its own
    /// (`ClientBuilder::proxy`) is yours to keep off loopback hosts before you say this.
    /// (Adding the host to `NO_PROXY` also works, for every client.)
    pub fn client_without_proxy(mut self) -> Self {
        self.env_proxies = None;
        self
    }

    /// The cache behind this middleware.
    pub fn cache(&self) -> &CredentialCache<P> {
        &self.cache
    }

    /// Fetches the credential now, before the first request needs it: see
    /// [`CredentialCache::warm_up`].
    pub async fn warm_up(&self) -> Result<(), crate::Error> {
        self.cache.warm_up().await
    }

    request_rules!();

    /// The rules `future::admits` applies to a request's URI, in its order, applied
    /// to a reqwest URL (scheme and authority as reqwest parsed them; a user's
    /// `origin_matching` predicate is not asked): `Ok(true)` the credential goes,
    /// `Ok(false)` another origin (the request goes as it is), `Err` refused (no origin
    /// given, or the transport).
    fn gate(&self, url: &reqwest::Url) -> Result<bool, crate::Error> {
        let Some(scope) = self.scope.as_deref() else {
            return Err(crate::Error::new(crate::ErrorKind::NoOrigin));
        };
        if !scope.allows_origin(url.scheme(), url.authority()) {
            return Ok(false);
        }
        if url.scheme() == "https" {
            return Ok(true);
        }
        self.plain_transport(url).map(|()| true)
    }

    /// The transport rule for a URL in scope that is not `https`, and the proxy rule for
    /// a plain-http one the transport rule allows.
    #[cold]
    #[inline(never)]
    fn plain_transport(&self, url: &reqwest::Url) -> Result<(), crate::Error> {
        self.policy
            .check_transport_of(url.scheme(), || is_loopback(url))?;
        if self.env_proxies.is_none() {
            return Ok(());
        }
        match http::Uri::try_from(url.as_str()) {
            Ok(uri) => self.not_through_a_proxy(&uri),
            // reqwest cannot send a URL `http` cannot read: nothing goes anywhere.
            Err(_) => Ok(()),
        }
    }

    /// Refuses a plain-http request that the environment's proxies would hand to a proxy
    /// (see
    /// [`client_without_proxy`](Self::client_without_proxy)).
    fn not_through_a_proxy(&self, uri: &http::Uri) -> Result<(), crate::Error> {
        match &self.env_proxies {
            Some(proxies) if crate::policy::proxied(proxies, uri) => {
                Err(crate::Error::new(crate::ErrorKind::InsecureTransport).with_detail(
                    "plain http to a loopback host would go through a proxy (HTTP_PROXY or ALL_PROXY, not excluded by NO_PROXY), which may send it on anywhere: build the reqwest client with .no_proxy() and call client_without_proxy() on the AuthMiddleware, or add the host to NO_PROXY",
                ))
            }
            _ => Ok(()),
        }
    }

    replay_rules!();

    /// Whether a rejected request is replayed once with the new credential (default
    /// `true`). With `false`, a rejection still invalidates the credential (the next
    /// request gets a new one) but the rejected response goes back to the caller, and
    /// no request body is retained.
    pub fn replay_rejected(mut self, replay: bool) -> Self {
        self.policy.replay = replay;
        self
    }
}

/// The inner service the layer's request path runs over in the reqwest adapter (attach,
/// send, judge the answer, invalidate, replay once), so that both entry points share one
/// implementation: it hands each attempt to the rest of the middleware chain through the
/// [`Exchange`].
///
/// Nothing is parsed or converted twice: the state machine gets an `http` request made of
/// the method, URI, headers and body, while the reqwest request keeps everything else
/// (its URL, timeout and reqwest's own settings) in the exchange's shell; an attempt puts
/// its headers and body back into the shell (the first) or a copy of it (a replay). The
/// answer is the reqwest response itself, carried in an `http::Response` whose status the
/// state machine reads.
///
/// An attempt does not send anything itself: it leaves its reqwest request in the
/// [`Exchange`] and waits, and the middleware's own loop (which alone holds the middleware
/// extensions the rest of the chain borrows) sends it and leaves the answer there. So an
/// attempt's future is a plain enum, neither boxed nor holding a lock across a send.
#[derive(Clone, Copy)]
struct Rest<'a> {
    exchange: &'a std::sync::Mutex<Exchange>,
    body: BodyKind,
}

/// Where a request's attempts and the middleware's loop meet (see [`Rest`]).
struct Exchange {
    /// The reqwest request without its headers and body: the first attempt takes it;
    /// when a replay is possible, a copy of what reqwest sends from it (method, URL,
    /// version, timeout: reqwest reads nothing else of a request's settings) is left for
    /// the replay. An attempt fills it in place and marks the slot `Outgoing`; the loop
    /// takes it from here (each move of a reqwest request copies ~300 bytes).
    shell: Option<reqwest::Request>,
    slot: Slot,
    /// Whether a replay can follow the first attempt.
    replayable: bool,
    /// When the request's own timeout (reqwest's, per send) runs out, counted from the
    /// first attempt's send: a replay is sent with what is left of it.
    deadline: Option<tokio::time::Instant>,
}

/// An attempt's request on its way down the chain, then its answer on the way back.
enum Slot {
    Empty,
    /// The request as the state machine starts from it, until it starts.
    Start(http::Request<reqwest::Body>),
    /// Left by an attempt, for the middleware's loop to send: the exchange's shell.
    Outgoing,
    /// Left by the loop, for the attempt to take.
    Answered(Result<http::Response<reqwest::Response>, reqwest_middleware::Error>),
}

impl Exchange {
    fn lock(this: &std::sync::Mutex<Self>) -> std::sync::MutexGuard<'_, Self> {
        this.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn is_outgoing(&self) -> bool {
        matches!(self.slot, Slot::Outgoing)
    }

    /// The prepared request, once.
    fn take_start(this: &std::sync::Mutex<Self>) -> Option<http::Request<reqwest::Body>> {
        match std::mem::replace(&mut Self::lock(this).slot, Slot::Empty) {
            Slot::Start(req) => Some(req),
            _ => None,
        }
    }

    /// The request an attempt left, sent down the rest of the chain; `None` if there is
    /// none. Not inside the `async` caller: the request would take room in its future.
    fn send_outgoing<'e>(
        this: &std::sync::Mutex<Self>,
        next: &Next<'e>,
        extensions: &'e mut Extensions,
    ) -> Option<BoxFuture<'e, reqwest_middleware::Result<reqwest::Response>>> {
        let mut x = Self::lock(this);
        if !x.is_outgoing() {
            return None;
        }
        x.slot = Slot::Empty;
        let mut out = x.shell.take()?;
        if x.replayable {
            copy_for_replay(&out, &mut x.shell);
        }
        // The request's timeout bounds the whole call, as the caller set it for one:
        // a replay gets what the first attempt and the refresh left of it, and is not
        // sent when nothing is left.
        if let Some(timeout) = out.timeout_mut() {
            let now = tokio::time::Instant::now();
            match x.deadline {
                None => x.deadline = now.checked_add(*timeout),
                Some(deadline) if now >= deadline => {
                    return Some(Box::pin(std::future::ready(Err(ran_out()))));
                }
                Some(deadline) => *timeout = deadline - now,
            }
        }
        // Not under the lock: the next middleware's `handle` runs in `run`.
        drop(x);
        Some(next.clone().run(out, extensions))
    }
}

/// The future of one attempt: its answer, once the middleware's loop has left it in the
/// exchange.
enum Attempt<'a> {
    Waiting(&'a std::sync::Mutex<Exchange>),
    /// The attempt could not be made (its in-memory body failed, or it was one too many).
    Failed(Option<reqwest_middleware::Error>),
}

impl Future for Attempt<'_> {
    type Output = Result<http::Response<reqwest::Response>, reqwest_middleware::Error>;

    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Attempt::Failed(err) => Poll::Ready(Err(err.take().unwrap_or_else(|| {
                reqwest_middleware::Error::middleware(Opaque(
                    "an attempt was polled after it ended".into(),
                ))
            }))),
            Attempt::Waiting(exchange) => {
                let mut x = Exchange::lock(exchange);
                if x.is_outgoing() {
                    // Not sent yet: the middleware's loop sees it as soon as this
                    // returns, sends it, and polls again (no waker is needed).
                    return Poll::Pending;
                }
                match std::mem::replace(&mut x.slot, Slot::Empty) {
                    Slot::Answered(answer) => Poll::Ready(answer),
                    // Neither sent nor answered (polled after its answer, or lost): a
                    // bug, reported rather than hung on.
                    _ => Poll::Ready(Err(reqwest_middleware::Error::middleware(Opaque(
                        "an attempt was polled with no request or answer of its own".into(),
                    )))),
                }
            }
        }
    }
}

/// Whether an answer reqwest got from `answered` (its URL after any redirects) speaks for
/// the request sent to `sent`: the same URL (but for a fragment, which is never sent), or
/// a hop within its origin that carried the same credential. Not a hop of a request with
/// a proof (DPoP): the proof named `sent` and was spent there, so the hop's refusal says
/// nothing of the token or a new proof.
///
/// A response a middleware below built itself, or passed up through an
/// `http::Response` (to change a header, to wrap its body: it keeps the peer address,
/// not the URL), carries reqwest's placeholder URL, whole: it speaks for the request (a
/// stub answering 401 is judged as the API would be). A redirect's target that only
/// bears the placeholder's host name (a `.local` name anyone on the LAN may answer to)
/// has a port or a path of its own, and is another origin's answer like any other; one
/// redirected to exactly `http://no.url.provided.local/` cannot be told from the
/// placeholder (README's "Redirects": build the client with `redirect_policy()`). A
/// middleware below that sends the request to another host makes its answers look
/// like a redirect's; README's "Redirects" says so.
fn speaks_for(answered: &reqwest::Url, sent: &reqwest::Url, binds: bool) -> bool {
    if answered.as_str() == NO_URL_PROVIDED {
        return true;
    }
    let (answered, sent) = (without_fragment(answered), without_fragment(sent));
    if answered == sent {
        return true;
    }
    let Ok(answered) = reqwest::Url::parse(answered) else {
        return false;
    };
    !binds && reqwest::Url::parse(sent).is_ok_and(|sent| answered.origin() == sent.origin())
}

/// `url` as a string, without its fragment: the URL knows where its fragment starts, so
/// nothing is scanned.
fn without_fragment(url: &reqwest::Url) -> &str {
    let whole = url.as_str();
    match url.fragment() {
        // The serialization ends with `#` and the fragment.
        Some(fragment) => &whole[..whole.len() - fragment.len() - 1],
        None => whole,
    }
}

/// Whether `url`'s host is a loopback host, as `policy::is_loopback` decides it for the
/// host as a string, read from the host the URL has parsed already (an IPv4 address
/// is not parsed again).
fn is_loopback(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        Some(url::Host::Domain(name)) => crate::policy::is_loopback(name),
        None => false,
    }
}

/// The URL reqwest gives a response built from an `http::Response` without one.
const NO_URL_PROVIDED: &str = "http://no.url.provided.local/";

/// What the reqwest request's body was, so that each attempt hands reqwest the same kind.
#[derive(Clone, Copy)]
enum BodyKind {
    /// No body at all.
    None,
    /// Bytes in memory: handed on as bytes again, so the request stays cloneable (reqwest's
    /// redirects, its HTTP/2 retries and the middlewares after this one need that).
    InMemory,
    /// A stream.
    Stream,
}

impl<'a> Service<http::Request<ReplayBody<reqwest::Body>>> for Rest<'a> {
    type Response = http::Response<reqwest::Response>;
    type Error = reqwest_middleware::Error;
    type Future = Attempt<'a>;

    /// Ready, but for a request sent again (a replay, a new proof) after its own timeout
    /// ran out: nothing more is sent, and the state machine counts no replay.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match Exchange::lock(self.exchange).deadline {
            Some(deadline) if tokio::time::Instant::now() >= deadline => {
                Poll::Ready(Err(ran_out()))
            }
            _ => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: http::Request<ReplayBody<reqwest::Body>>) -> Self::Future {
        match self.attempt(req) {
            Ok(()) => Attempt::Waiting(self.exchange),
            Err(err) => Attempt::Failed(Some(err)),
        }
    }
}

impl Rest<'_> {
    /// Leaves the reqwest request of one attempt in the exchange: the shell (or, for a
    /// replay, its copy) with the state machine's headers and body.
    fn attempt(
        &self,
        req: http::Request<ReplayBody<reqwest::Body>>,
    ) -> Result<(), reqwest_middleware::Error> {
        // The state machine changes headers only (method and URI are the shell's).
        let (parts, body) = req.into_parts();
        let body = match self.body {
            BodyKind::None => None,
            // Read through the replay body now (it records as it is read, so a replay
            // stays possible) and hand reqwest bytes again. An in-memory body is ready at
            // once; anything else is a bug.
            BodyKind::InMemory => match body.collect().now_or_never() {
                Some(Ok(collected)) => Some(reqwest::Body::from(collected.to_bytes())),
                Some(Err(err)) => return Err(reqwest_middleware::Error::middleware(err)),
                None => {
                    return Err(reqwest_middleware::Error::middleware(Opaque(
                        "an in-memory request body was not ready".into(),
                    )));
                }
            },
            BodyKind::Stream => Some(reqwest::Body::wrap(body)),
        };
        let mut x = Exchange::lock(self.exchange);
        let x = &mut *x;
        if !matches!(x.slot, Slot::Empty) {
            // The state machine sends one attempt at a time: anything else is a bug,
            // reported rather than a request or an answer silently dropped.
            return Err(reqwest_middleware::Error::middleware(Opaque(
                "an attempt was made while another was under way".into(),
            )));
        }
        let Some(shell) = x.shell.as_mut() else {
            return Err(reqwest_middleware::Error::middleware(Opaque(
                "a request was sent more often than planned".into(),
            )));
        };
        *shell.headers_mut() = parts.headers;
        *shell.body_mut() = body;
        x.slot = Slot::Outgoing;
        Ok(())
    }
}

/// What reqwest sends a request from, but its headers and body, left in `slot`: the
/// replay's shell. Made where it is kept (returning it moved it twice, 300 bytes each).
fn copy_for_replay(shell: &reqwest::Request, slot: &mut Option<reqwest::Request>) {
    let copy = slot.insert(reqwest::Request::new(
        shell.method().clone(),
        shell.url().clone(),
    ));
    *copy.version_mut() = shell.version();
    if let Some(timeout) = shell.timeout() {
        *copy.timeout_mut() = Some(*timeout);
    }
}

/// The error of a call whose own timeout ran out before its replay was sent.
fn ran_out() -> reqwest_middleware::Error {
    into_middleware_error(ran_out_box())
}

/// [`ran_out`] as the state machine's error.
fn ran_out_box() -> BoxError {
    Box::new(Error::new(ErrorKind::RequestTimeout))
}

/// The reqwest response, with what the state machine said about it (a `NotReplayed`).
fn into_reqwest(res: http::Response<reqwest::Response>) -> reqwest::Response {
    let (mut parts, mut res) = res.into_parts();
    if !parts.headers.is_empty() {
        *res.headers_mut() = parts.headers;
    }
    if let Some(reason) = parts.extensions.remove::<crate::body::NotReplayed>() {
        res.extensions_mut().insert(reason);
    }
    if let Some(scope) = parts.extensions.remove::<InsufficientScope>() {
        res.extensions_mut().insert(scope);
    }
    res
}

/// The chain's own errors as they came; the crate's as a middleware error.
fn into_middleware_error(err: BoxError) -> reqwest_middleware::Error {
    match err.downcast::<reqwest_middleware::Error>() {
        Ok(err) => *err,
        Err(err) => match err.downcast::<crate::Error>() {
            Ok(err) => reqwest_middleware::Error::middleware(*err),
            Err(err) => reqwest_middleware::Error::middleware(Opaque(err)),
        },
    }
}

/// An error of neither kind (none is expected), kept with its text.
#[derive(Debug)]
struct Opaque(BoxError);

impl std::fmt::Display for Opaque {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Opaque {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// What [`AuthMiddleware::prepare`] decided about a request, besides its exchange.
#[derive(Clone, Copy)]
struct Plan {
    body: BodyKind,
    replayable: bool,
    /// The source binds credentials: every answer's headers go to the state machine.
    binds: bool,
    /// `None`: the state machine applies its rules to the request's whole URI; `Some`:
    /// they were applied to the reqwest URL already (`true`: in scope).
    in_scope: Option<bool>,
}

impl<P: CredentialSource> AuthMiddleware<P> {
    /// Splits `req` for the state machine: the `http` request it reads (method, URI,
    /// headers, body), left in the exchange's slot, and the shell that keeps the rest. A
    /// request the rules refuse (no origin, the transport, a URI a proof cannot name) is
    /// `Err`, sent nowhere.
    ///
    /// Not part of the async `handle`: a local borrowed there stays in the boxed future
    /// for its whole life, and that box is allocated per request.
    fn prepare(
        &self,
        req: reqwest::Request,
        opted_out: bool,
    ) -> Result<(Exchange, Plan), crate::Error> {
        // Headers and body go to the state machine; the rest stays in the shell.
        let mut shell = req;
        let (kind, body) = match shell.body_mut().take() {
            None => (BodyKind::None, reqwest::Body::from(bytes::Bytes::new())),
            Some(body) if body.as_bytes().is_some() => (BodyKind::InMemory, body),
            Some(body) => (BodyKind::Stream, body),
        };
        // A proof of possession (DPoP) names the whole URI, as does an origin rule that
        // reads paths: the state machine gets it and applies its rules to it. The common
        // case needs the origin alone, which the reqwest URL has parsed already: the
        // rules are applied to it here, and the state machine's URI is never read.
        let binds = self.cache.source().binds_credentials();
        let (uri, in_scope) = if binds || self.scope.as_ref().is_some_and(|s| s.reads_paths()) {
            match http::Uri::try_from(shell.url().as_str()) {
                Ok(uri) => (Some(uri), None),
                // A URL `http` cannot read (over 64 KiB): no predicate can be asked about
                // it, and no proof can name it. The origin rules still decide first.
                Err(_) => {
                    let in_scope = self.gate(shell.url())?;
                    if binds && in_scope {
                        return Err(crate::Error::new(crate::ErrorKind::Proof).with_detail(
                            "a DPoP proof names the request's uri, and http cannot read this one",
                        ));
                    }
                    (None, Some(in_scope))
                }
            }
        } else {
            (None, Some(self.gate(shell.url())?))
        };
        // A `Host` header naming another origin than the URL's sends the request there
        // (the state machine's rule, `future::admits`, for a URI it reads).
        let in_scope = match in_scope {
            Some(true) => {
                let url = shell.url();
                Some(
                    !crate::scope::has_host_header(shell.headers())
                        || crate::scope::host_headers_agree(
                            url.scheme(),
                            url.host_str().unwrap_or_default(),
                            url.port(),
                            shell.headers(),
                        ),
                )
            }
            other => other,
        };
        // Built empty and filled: the headers change places with the shell's (which
        // keeps the new request's empty map, rather than one being made and another
        // dropped), and the URI stays the default unless the rules read it.
        let mut req = http::Request::new(body);
        *req.method_mut() = shell.method().clone();
        if let Some(uri) = uri {
            *req.uri_mut() = uri;
        }
        *req.version_mut() = shell.version();
        std::mem::swap(req.headers_mut(), shell.headers_mut());
        if opted_out {
            req.extensions_mut().insert(NoReplay);
        }
        let plan = Plan {
            body: kind,
            replayable: self.policy.replay && !opted_out && self.cache.refreshes(),
            binds,
            in_scope,
        };
        let exchange = Exchange {
            shell: Some(shell),
            slot: Slot::Start(req),
            replayable: plan.replayable,
            deadline: None,
        };
        Ok((exchange, plan))
    }

    /// The request path over a prepared exchange: the layer's state machine, each of its
    /// attempts sent down the rest of the chain from here (where the extensions are).
    ///
    /// An `async` block, not an `async fn`: the latter moves its arguments into locals
    /// and so keeps them twice in its future (measured with `-Zprint-type-sizes`), and
    /// this future is a per-request allocation, best kept within malloc's fast bins.
    #[allow(clippy::manual_async_fn)]
    fn run<'a>(
        &'a self,
        exchange: std::sync::Mutex<Exchange>,
        plan: Plan,
        extensions: &'a mut Extensions,
        next: Next<'a>,
    ) -> impl Future<Output = reqwest_middleware::Result<reqwest::Response>> + Send + 'a {
        async move {
            let Some(req) = Exchange::take_start(&exchange) else {
                return Err(reqwest_middleware::Error::middleware(Opaque(
                    "a request was prepared twice".into(),
                )));
            };
            let mut rest = Rest {
                exchange: &exchange,
                body: plan.body,
            };
            // The layer's request path over this middleware's own parts (`Rest` is always
            // ready): the cache is read through its shared slot, and only a request whose
            // credential can change takes a reference to it.
            let mut future = std::pin::pin!(ResponseFuture::start(
                &mut rest,
                &self.cache,
                &self.policy,
                |req| match plan.in_scope {
                    Some(in_scope) => Ok(in_scope),
                    None => match crate::future::admits(self.scope.as_deref(), &self.policy, req) {
                        Ok(true) => self.not_through_a_proxy(req.uri()).map(|()| true),
                        other => other,
                    },
                },
                req,
                || self.cache.current(),
                || CacheRef::Local(Arc::clone(&self.cache)),
            ));
            let res = loop {
                if let Some(sending) = Exchange::send_outgoing(&exchange, &next, extensions) {
                    let answer = sending.await;
                    let mut x = Exchange::lock(&exchange);
                    // What was sent: the replay's copy has its URL.
                    let sent = x.shell.as_ref().map(reqwest::Request::url);
                    let answer = answer.map(|res| self.lend_headers(res, plan.binds, sent));
                    x.slot = Slot::Answered(answer);
                }
                // Once sent, the request's own timeout bounds the wait for the credential
                // to replay with too (an attempt under way has reqwest's own): a timer only
                // for a step that must wait (the common one, an answer judged or a replay
                // to send, is ready at once).
                let mut timer = None;
                let step = std::future::poll_fn(|cx| match future.as_mut().poll(cx) {
                    Poll::Ready(res) => Poll::Ready(Some(res)),
                    Poll::Pending => {
                        let x = Exchange::lock(&exchange);
                        if x.is_outgoing() {
                            return Poll::Ready(None);
                        }
                        let Some(deadline) = x.deadline else {
                            return Poll::Pending;
                        };
                        drop(x);
                        let timer = timer
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                        match timer.as_mut().poll(cx) {
                            Poll::Ready(()) => Poll::Ready(Some(Err(ran_out_box()))),
                            Poll::Pending => Poll::Pending,
                        }
                    }
                })
                .await;
                if let Some(res) = step {
                    break res;
                }
            };
            let res = res.map_err(into_middleware_error)?;
            Ok(into_reqwest(res))
        }
    }

    /// The answer as the state machine reads it: its status, and its headers when the
    /// rejection rule (or a proof's nonce) may read them, lent until `into_reqwest`.
    ///
    /// An answer that does not speak for the request sent to `sent` (see
    /// [`speaks_for`]: a redirect followed by a client the docs say to build otherwise)
    /// is read as the 3xx the request itself got (a 307): not a rejection, nothing to
    /// resend, and, as any answer but a rejection, the credential counted as accepted.
    /// It goes back to the caller as it came.
    fn lend_headers(
        &self,
        res: reqwest::Response,
        binds: bool,
        sent: Option<&reqwest::Url>,
    ) -> http::Response<reqwest::Response> {
        let status = res.status();
        let mut res = http::Response::new(res);
        if sent.is_some_and(|sent| !speaks_for(res.body().url(), sent, binds)) {
            tracing::debug!(
                status = status.as_u16(),
                "an answer from a redirect's target is not judged as the request's"
            );
            *res.status_mut() = http::StatusCode::TEMPORARY_REDIRECT;
            return res;
        }
        *res.status_mut() = status;
        if binds || self.policy.judge.reads_headers(status) {
            *res.headers_mut() = std::mem::take(res.body_mut().headers_mut());
        }
        res
    }
}

// By hand rather than with `#[async_trait]`, which keeps the reqwest request the
// future is called with inside it for its whole life: the request is split before the
// future is made (`prepare`), so the box allocated per request holds only what the
// attempts need.
impl<P: CredentialSource> Middleware for AuthMiddleware<P> {
    fn handle<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        req: reqwest::Request,
        extensions: &'life1 mut Extensions,
        next: Next<'life2>,
    ) -> Pin<
        Box<
            dyn Future<Output = reqwest_middleware::Result<reqwest::Response>>
                + Send
                + 'async_trait,
        >,
    >
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        match self.prepare(req, extensions.get::<NoReplay>().is_some()) {
            Ok((exchange, plan)) => {
                Box::pin(self.run(std::sync::Mutex::new(exchange), plan, extensions, next))
            }
            Err(err) => Box::pin(std::future::ready(Err(
                reqwest_middleware::Error::middleware(err),
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StaticCredential;

    /// `gate` (the rules applied to a reqwest URL) decides as `future::admits` (the
    /// state machine's rules) does on the same URL as an `http::Uri`: no origin given, the origin rule (named
    /// origins, `any_https_origin`), then the transport rule (loopback allowed or not),
    /// over hosts the url crate rewrites (IPv4 forms, mapped IPv6, case, default ports).
    #[test]
    fn the_gate_decides_as_the_state_machine_does() {
        let source = || StaticCredential::bearer("t").unwrap();
        let named = || {
            AuthMiddleware::new(source())
                .origin("http://127.0.0.1:8080")
                .unwrap()
                .origin("https://api.example.com")
                .unwrap()
                .origin("http://[::ffff:7f00:1]:8080")
                .unwrap()
        };
        let middlewares = [
            ("none", AuthMiddleware::new(source())),
            ("named", named()),
            ("named, loopback", named().allow_http_loopback(true)),
            ("any", AuthMiddleware::new(source()).any_https_origin()),
            (
                "any, loopback",
                AuthMiddleware::new(source())
                    .any_https_origin()
                    .allow_http_loopback(true),
            ),
        ];
        for url in [
            "https://api.example.com/v1",
            "HTTPS://API.example.com:443/v1",
            "https://user@api.example.com/",
            "http://api.example.com/",
            "https://other.example.com/",
            "http://other.example.com/",
            "http://127.0.0.1:8080/x",
            "http://0x7f.1:8080/x",
            "http://127.1:8080/x",
            "http://2130706433:8080/x",
            "http://localhost:8080/x",
            "http://LocalHost:8080/x",
            "http://localhost.:8080/x",
            "http://127.255.255.254/x",
            "http://128.0.0.1/x",
            "http://[::1]:8080/x",
            "http://[::2]:8080/x",
            "http://0177.0.0.1/x",
            "http://0x7f000001/x",
            "http://[0:0:0:0:0:0:0:1]/x",
            "http://[::ffff:7f00:1]/x",
            "http://[::7f00:1]/x",
            "http://localhost%2e:8080/x",
            "ws://[::1]:8080/socket",
            "http://[::ffff:10.0.0.1]:8080/x",
            "http://[::ffff:127.0.0.1]:8080/x",
            "http://10.0.0.1:8080/x",
            "wss://api.example.com/socket",
            "ws://127.0.0.1:8080/socket",
        ] {
            let parsed = reqwest::Url::parse(url).unwrap();
            let uri: http::Uri = parsed.as_str().parse().unwrap();
            for (name, mw) in &middlewares {
                let by_gate = mw.gate(&parsed).map_err(|e| e.kind());
                let request = http::Request::get(uri.clone()).body(()).unwrap();
                let by_start = crate::future::admits(mw.scope.as_deref(), &mw.policy, &request)
                    .map_err(|e| e.kind());
                assert_eq!(by_gate, by_start, "{name}: {url} ({parsed})");
            }
        }
    }

    /// A URL without its fragment is its serialization up to the first `#`, found
    /// without a scan: none, an empty one, one with a `#` of its own, after a query.
    #[test]
    fn without_fragment_cuts_at_the_first_hash() {
        for url in [
            "https://api.example.com/v1/x",
            "https://api.example.com/v1/x#",
            "https://api.example.com/v1/x#a#b",
            "https://api.example.com/v1/x?q=1#f",
            "https://api.example.com/v1/%23x?q=%23#f",
            "http://[::1]:8080/#",
        ] {
            let parsed = reqwest::Url::parse(url).unwrap();
            let scanned = parsed
                .as_str()
                .split_once('#')
                .map_or(parsed.as_str(), |(b, _)| b);
            assert_eq!(without_fragment(&parsed), scanned, "{url}");
        }
    }
}
