//! [`TokenSource`]: a [`CredentialSource`] over token endpoints, with refresh-token
//! rotation.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use tokio::{
    sync::{Mutex, oneshot},
    time::Instant,
};

use super::{
    client::TokenClient,
    error::{TokenError, TokenErrorKind},
    request::TokenRequest,
    response::{
        JwtExp, MAX_LIFETIME, MIN_LIFETIME, ResponseFields, TokenResponse, is_error_in_success,
        jwt_exp, parse_error_body, parse_retry_after, refresh_token_in,
    },
};
use crate::{
    credential::Credential,
    error::BoxError,
    secret::Secret,
    source::RefreshSharing,
    source::{CredentialSource, FetchContext, FetchReason, RefreshMode},
};

/// Lifetime assumed for a token when the response states none and the token is not a JWT
/// with an `exp` claim: 5 minutes. Short on purpose: refreshing early costs one request,
/// sending an expired token costs a 401 and a replay.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(5 * 60);

/// Default margin taken off every lifetime a token endpoint states, for clocks that
/// disagree and for the time a request takes to reach the API: 5 seconds, and never more
/// than a tenth of the lifetime (see [`TokenSource::clock_skew`]).
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(5);

/// Default longest time the [`on_refresh`](TokenSource::on_refresh) hook may take: 5 s.
/// The hook runs while the source's exchanges are serialised, so a hook that hangs would
/// otherwise block every later exchange.
pub const DEFAULT_ON_REFRESH_TIMEOUT: Duration = Duration::from_secs(5);

/// Share of a lifetime the clock-skew margin takes at most.
const MAX_SKEW_FRACTION: f64 = 0.1;

/// The newest access and refresh tokens, handed to the [`on_refresh`](TokenSource::on_refresh)
/// hook to persist. `Debug` is redacted.
#[derive(Debug, Clone)]
pub struct TokenPair {
    access_token: Option<Secret>,
    refresh_token: Option<Secret>,
}

impl TokenPair {
    /// The access token; `None` when the answer that rotated the refresh token carried
    /// no usable access token (the refresh token is handed over all the same).
    pub fn access_token(&self) -> Option<&Secret> {
        self.access_token.as_ref()
    }

    /// The refresh token now held (the new one, or the old one if the server sent none).
    pub fn refresh_token(&self) -> Option<&Secret> {
        self.refresh_token.as_ref()
    }
}

/// How many requests a [`TokenSource`] made, for dashboards and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TokenStats {
    /// Full logins (the login request).
    pub logins: u64,
    /// Refresh-token exchanges that succeeded.
    pub refreshes: u64,
    /// Refresh-token exchanges the server refused (400/401), each followed by a login.
    pub refresh_rejections: u64,
    /// Refresh-token exchanges whose outcome is unknown (no answer within the token
    /// client's timeout): the refresh token was dropped, never presented again.
    pub unknown_outcomes: u64,
}

#[derive(Default)]
struct Stats {
    logins: AtomicU64,
    refreshes: AtomicU64,
    refresh_rejections: AtomicU64,
    unknown_outcomes: AtomicU64,
}

type OnRefresh = Arc<
    dyn Fn(TokenPair) -> Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>> + Send + Sync,
>;

/// What an [`on_refresh`](TokenSource::on_refresh) hook returns: nothing (persisted, as
/// far as the source can tell), or a `Result` whose error says the pair was not
/// persisted, so the source offers it again later.
pub trait PersistOutcome: Send + 'static {
    /// `Err` when the pair was not persisted.
    fn into_result(self) -> Result<(), BoxError>;
}

impl PersistOutcome for () {
    fn into_result(self) -> Result<(), BoxError> {
        Ok(())
    }
}

impl<E: Into<BoxError> + Send + 'static> PersistOutcome for Result<(), E> {
    fn into_result(self) -> Result<(), BoxError> {
        self.map_err(Into::into)
    }
}

/// The hook's side of a source, shared by its clones: calls in order, and the newest
/// pair it has not confirmed.
#[derive(Default)]
struct Persisting {
    /// One hook call at a time: an older pair never lands after a newer one.
    calls: Mutex<()>,
    /// The newest pair whose hook call failed or timed out, and its number.
    unconfirmed: std::sync::Mutex<Option<(u64, TokenPair)>>,
    /// Numbers pairs in the order they were issued.
    issued: std::sync::atomic::AtomicU64,
    /// Whether a task is offering the unconfirmed pair again.
    retrying: AtomicBool,
}

/// The first wait before the hook is offered an unconfirmed pair again; each next one
/// doubles, up to [`PERSIST_RETRY_MAX`].
const PERSIST_RETRY_FIRST: Duration = Duration::from_millis(250);
/// The longest wait between two offers of an unconfirmed pair.
const PERSIST_RETRY_MAX: Duration = Duration::from_secs(30);

/// Fetches access tokens from a token endpoint: OAuth2 grants (client credentials,
/// password, refresh token) and JSON login APIs, with optional refresh-token rotation.
///
/// - A **login** request gets an access token (and perhaps a refresh token).
/// - With [`refresh_with`](Self::refresh_with), a held refresh token is used instead of
///   logging in again, whenever one is held. The newest refresh token always replaces the
///   old one (the old one is kept if the server sends none). Only when the refresh
///   endpoint refuses the refresh token itself (400 or 401) does the source log in again.
/// - Exchanges are serialised: two exchanges never present one refresh token at once,
///   even when several caches share the source. Each exchange runs to completion in its own task, so a
///   rotated refresh token is stored even if the request that asked for it is dropped.
/// - If the cache stopped waiting for an exchange (its fetch timed out), the next fetch
///   gets that exchange's access token without another request, instead of refreshing
///   early (which providers like style C refuse, forcing a login), unless it has less
///   than [`MIN_LIFETIME`] left. A credential the cache received, or reports as rejected
///   or expiring, is never handed out again.
/// - The lifetime is the earlier of `expires_in` and the JWT `exp` claim (an `exp`
///   already past by this machine's clock is taken as a clock apart: `expires_in` alone,
///   with a warning; a token with no `expires_in` is refused then), else
///   [`default_lifetime`](Self::default_lifetime), measured from the moment the response
///   arrived, on the cache's wall clock (the credential says when it was issued);
///   raised to [`MIN_LIFETIME`] and capped at
///   [`MAX_LIFETIME`]; then less the [`clock_skew`](Self::clock_skew) margin.
/// - A new refresh token is kept before anything else in its answer is judged. A refresh
///   whose outcome is unknown (no answer within the token client's timeout, a 5xx, a 2xx
///   this client cannot use that brings no new refresh token) drops its refresh token and
///   logs in: it may have
///   rotated, and presenting it again could revoke the whole family. The login waits for
///   a `Retry-After` the answer carried.
///
/// # Example
/// ```
/// use tower_client_auth::{AuthLayer, token::{TokenRequest, TokenSource}};
///
/// // Style D: OAuth2 client credentials, Basic + form, with a scope.
/// let source = TokenSource::new(
///     TokenRequest::oauth2_client_credentials("https://idp.example/oauth/v2/token", "id", "secret")?
///         .scope("orders:read"),
/// );
/// let layer = AuthLayer::new(source).origin("https://api.example.com")?;
/// # let _ = layer;
/// # Ok::<_, Box<dyn std::error::Error>>(())
/// ```
pub struct TokenSource {
    client: Option<TokenClient>,
    login: TokenRequest,
    refresh: Option<(TokenRequest, String)>,
    fields: ResponseFields,
    default_lifetime: Option<Duration>,
    clock_skew: Duration,
    allow_http_loopback: bool,
    require_jwt_exp: bool,
    mode: RefreshMode,
    scheme: Option<String>,
    on_refresh: Option<OnRefresh>,
    on_refresh_timeout: Duration,
    persisting: Arc<Persisting>,
    store_down: StoreDownPolicy,
    held: Arc<Mutex<Held>>,
    stats: Arc<Stats>,
    flags: Arc<Flags>,
    /// Where the token endpoint is published, if the requests' URLs come from there.
    issuer: Option<super::Issuer>,
    /// Scopes step-ups added to the login's (see [`FetchReason::StepUp`]): every later
    /// login asks for them too.
    stepped_up: Arc<std::sync::Mutex<Vec<String>>>,
    /// The key DPoP tokens are bound to, if the source asks for them.
    #[cfg(feature = "jwt")]
    dpop: Option<super::DpopKey>,
}

/// What the source holds between exchanges, under one lock.
#[derive(Default)]
struct Held {
    /// Until when the token endpoint asked for no request (`Retry-After` on the last
    /// answer), whether or not the cache was still waiting for that answer.
    not_before: Option<Instant>,
    refresh_token: Option<Secret>,
    /// Whether `refresh_token` is this source's alone after an exchange that failed: one
    /// taken from the store that the server did not act on (never sent, throttled,
    /// refused without a word on it), or one an unusable answer rotated to (the store
    /// never got it). The next shared exchange presents it if the store holds none. Any
    /// answer accepted clears it.
    unspent: bool,
    /// The refresh token a refusal that judged nothing (see `unjudged` in `exchange`)
    /// left held when it asked for time (`Retry-After`): the login that refusal calls
    /// for is owed, and the next exchange that holds this same token logs in rather than
    /// presenting it again (which such a server refuses again, with every hold).
    login_owed: Option<Secret>,
    /// Whether the last exchange's credential (`last`) reached nobody: the cache stopped
    /// waiting. Its refresh token (`refresh_token`) is then newer than the store's.
    undelivered: bool,
    /// Whether the exchange under way runs while the store does not answer: its
    /// credential, if it reaches nobody, is not handed out later (its refresh token is
    /// no fleet's, and the store's would be passed over for it).
    outage: bool,
    /// The last credential issued. If the cache stopped waiting for the exchange (its
    /// fetch timed out: `undelivered`), the server has already issued this one: the next
    /// fetch hands it out instead of refreshing again, which a provider that refuses
    /// early refreshes would answer with an error (and a fallback login).
    last: Option<Credential>,
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSource")
            .field("login", &self.login)
            .field("refresh", &self.refresh.as_ref().map(|(r, _)| r))
            .field("fields", &self.fields)
            .field("default_lifetime", &self.default_lifetime)
            .field("mode", &self.mode)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Whether a refused refresh's `error` code says the refresh token itself is bad:
/// RFC 6749's `invalid_grant`, GitHub's `bad_refresh_token` (a 200 answer, docs.github.com
/// "Refreshing user access tokens"), Slack's `invalid_refresh_token` (`ok: false`). Any
/// other refusal (no code at all, or a code about the client, the request or the
/// server) leaves the login to tell (see `fetch`).
fn judges_refresh_token(e: &TokenError) -> bool {
    matches!(
        e.oauth_error(),
        Some("invalid_grant" | "bad_refresh_token" | "invalid_refresh_token")
    )
}

/// Most scopes step-ups add to a login's own: an API cannot make a source ask for an
/// unbounded list.
const MAX_STEPPED_UP_SCOPES: usize = 32;

/// Longest scope a step-up asks for, in bytes.
const MAX_SCOPE_LEN: usize = 256;

/// What a [`TokenSource`] whose refresh token is shared through a credential store does
/// when that store does not answer ([`TokenSource::when_store_is_down`]). Either way it
/// never presents a refresh token another process may hold, and the cache keeps serving
/// the credential it has while that is valid.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreDownPolicy {
    /// Log in again (a new session for this process). The default: keeps serving.
    #[default]
    LogIn,
    /// Fail the fetch with [`TokenErrorKind::StoreUnavailable`]: for providers that limit
    /// logins, or where a second session is not wanted.
    Fail,
}

impl TokenSource {
    /// A source that logs in with `login`.
    pub fn new(login: TokenRequest) -> Self {
        TokenSource {
            client: None,
            login,
            refresh: None,
            fields: ResponseFields::default(),
            default_lifetime: Some(DEFAULT_TOKEN_LIFETIME),
            clock_skew: DEFAULT_CLOCK_SKEW,
            allow_http_loopback: false,
            require_jwt_exp: false,
            mode: RefreshMode::Proactive,
            scheme: None,
            on_refresh: None,
            on_refresh_timeout: DEFAULT_ON_REFRESH_TIMEOUT,
            persisting: Arc::default(),
            store_down: StoreDownPolicy::default(),
            held: Arc::default(),
            stats: Arc::default(),
            flags: Arc::default(),
            stepped_up: Arc::default(),
            issuer: None,
            #[cfg(feature = "jwt")]
            dpop: None,
        }
    }

    /// OAuth2 client credentials (RFC 6749 §4.4) at the token endpoint `issuer`
    /// publishes (RFC 8414, OpenID Connect Discovery; see [`Issuer`](super::Issuer)),
    /// the client authenticated as the server supports (HTTP Basic, else body fields).
    pub fn client_credentials_from_issuer(
        issuer: &str,
        client_id: impl Into<String>,
        client_secret: impl Into<Secret>,
    ) -> Result<Self, TokenError> {
        let login = TokenRequest::oauth2_client_credentials(issuer, client_id, client_secret)?;
        Ok(Self::new(login).issuer(super::Issuer::new(issuer)?))
    }

    /// Sends the login and refresh requests to the token endpoint `issuer` publishes,
    /// whatever URL they were built with: the metadata is fetched before the first
    /// token request, kept for its cache lifetime, and fetched again when the token
    /// endpoint answers `404` (a request that met a moved endpoint is sent once more, to
    /// the new one). A request whose client authentication was not chosen with
    /// [`TokenRequest::client_auth`] authenticates as the server supports. See
    /// [`Issuer`](super::Issuer).
    pub fn issuer(mut self, issuer: super::Issuer) -> Self {
        self.issuer = Some(issuer);
        self
    }

    /// OAuth2 client credentials (RFC 6749 §4.4) with HTTP Basic and a form body.
    pub fn client_credentials(
        token_url: &str,
        client_id: impl Into<String>,
        client_secret: impl Into<Secret>,
    ) -> Result<Self, TokenError> {
        Ok(Self::new(TokenRequest::oauth2_client_credentials(
            token_url,
            client_id,
            client_secret,
        )?))
    }

    /// A session login with an API key and secret: `POST url` with JSON
    /// `{"type": "api-key", "key": ..., "secret": ...}` answering `{"access_token": <JWT>}`.
    /// The lifetime comes from the JWT's `exp` (or an `expires_in`), else it is
    /// [`DEFAULT_TOKEN_LIFETIME`], as for every token source
    /// ([`default_lifetime`](Self::default_lifetime) sets another).
    ///
    /// A login of another shape is the same three lines with [`TokenSource::new`]:
    ///
    /// ```
    /// use tower_client_auth::token::{TokenRequest, TokenSource};
    ///
    /// // What `session_login(url, key, secret)` sends, field by field: `field` for plain
    /// // values, `secret_field` for secrets (redacted in `Debug`, scrubbed from errors).
    /// let login = TokenRequest::json("https://api.example.com/v1/sessions")?
    ///     .field("type", "api-key")
    ///     .field("key", "my-key")
    ///     .secret_field("secret", "my-secret");
    /// let source = TokenSource::new(login);
    /// # let _ = source;
    /// # Ok::<_, tower_client_auth::token::TokenError>(())
    /// ```
    pub fn session_login(
        url: &str,
        key: impl Into<String>,
        secret: impl Into<Secret>,
    ) -> Result<Self, TokenError> {
        let login = TokenRequest::json(url)?
            .field("type", "api-key")
            .field("key", key)
            .secret_field("secret", secret);
        Ok(Self::new(login))
    }

    /// An API-key login with rotating refresh tokens: `POST login_url` with JSON
    /// `{"api_key": ...}` answering `{"access_token", "refresh_token"}`; after a 401,
    /// `POST refresh_url` with `{"refresh_token": ...}` answering a new pair. Refreshes
    /// only on rejection ([`RefreshMode::ReactiveOnly`]), for providers that refuse early
    /// refreshes.
    pub fn api_key_login(
        login_url: &str,
        refresh_url: &str,
        api_key: impl Into<Secret>,
    ) -> Result<Self, TokenError> {
        let login = TokenRequest::json(login_url)?.secret_field("api_key", api_key);
        Ok(Self::new(login)
            .refresh_with(TokenRequest::json(refresh_url)?, "refresh_token")
            .refresh_mode(RefreshMode::ReactiveOnly))
    }

    /// Uses `refresh` (with the refresh token added as field `field`) whenever a refresh
    /// token is held. For the OAuth2 refresh grant:
    /// `.refresh_with(TokenRequest::oauth2_refresh_token(url, id, secret)?, "refresh_token")`.
    pub fn refresh_with(mut self, refresh: TokenRequest, field: impl Into<String>) -> Self {
        self.refresh = Some((refresh, field.into()));
        self
    }

    /// Starts with a refresh token saved earlier, so a restart does not need a login.
    ///
    /// Not used when the cache shares credentials through a store
    /// ([`CredentialStore`](crate::CredentialStore)): the store owns the fleet's refresh
    /// token, and a saved one may have been rotated by another process already
    /// (presenting it again would revoke the family at a strict server). With a store,
    /// the first process logs in, or save the pair into the store before the fleet starts.
    pub fn refresh_token(mut self, token: impl Into<Secret>) -> Self {
        self.held = Arc::new(Mutex::new(Held {
            refresh_token: Some(token.into()),
            ..Held::default()
        }));
        self
    }

    /// The client token requests go through (default: [`TokenClient::hyper_rustls`] with
    /// the `https` feature, else `TokenClient::reqwest` over a reqwest client that follows
    /// no redirects with the `reqwest` feature; with neither, it must be given, and a
    /// cache or layer builder refuses the source without it).
    pub fn client(mut self, client: TokenClient) -> Self {
        self.client = Some(client);
        self
    }

    /// Allows plain `http` token URLs on loopback hosts, for tests and local development
    /// (default `false`), whichever client the source uses: the same switch as
    /// [`TokenClient::allow_http_loopback`], so one call on the source is enough. The
    /// layer's own [`AuthLayer::allow_http_loopback`](crate::AuthLayer::allow_http_loopback)
    /// covers the API side.
    pub fn allow_http_loopback(mut self, allow: bool) -> Self {
        self.allow_http_loopback = allow;
        self
    }

    /// Where the fields are in the response (default: RFC 6749 names).
    pub fn response_fields(mut self, fields: ResponseFields) -> Self {
        self.fields = fields;
        self
    }

    /// Lifetime assumed when the response states none and the token carries no JWT `exp`
    /// (default [`DEFAULT_TOKEN_LIFETIME`]); `None` means such tokens never expire and are
    /// refreshed only on rejection.
    pub fn default_lifetime(mut self, lifetime: Option<Duration>) -> Self {
        self.default_lifetime = lifetime;
        self
    }

    /// Margin taken off every stated lifetime (default [`DEFAULT_CLOCK_SKEW`]), capped at
    /// a tenth of the lifetime, so a token is replaced before the API's clock says it
    /// expired. `Duration::ZERO` trusts the stated lifetime as is.
    pub fn clock_skew(mut self, skew: Duration) -> Self {
        self.clock_skew = skew;
        self
    }

    /// Requires the lifetime from `expires_in` or a JWT `exp`: a token with neither is an
    /// error instead of getting the default lifetime.
    pub fn require_expiry(mut self, require: bool) -> Self {
        self.require_jwt_exp = require;
        self
    }

    /// When the cache may refresh (default proactive).
    pub fn refresh_mode(mut self, mode: RefreshMode) -> Self {
        self.mode = mode;
        self
    }

    /// What to do, with a refresh token shared through a credential store, when that
    /// store does not answer (default [`StoreDownPolicy::LogIn`]). The refresh token this
    /// source last held may have been presented by another process since, so it is never
    /// presented then.
    pub fn when_store_is_down(mut self, policy: StoreDownPolicy) -> Self {
        self.store_down = policy;
        self
    }

    /// Asks for DPoP-bound tokens (RFC 9449), proving possession of `key`: every token
    /// request carries a proof, and a token the server issues as `token_type: DPoP` goes
    /// out as `Authorization: DPoP <token>` with a proof for each request made for that
    /// request (see [`DpopKey`](super::DpopKey)). A server's `use_dpop_nonce` is
    /// answered once with the nonce it gave, at the token endpoint and at the API. A
    /// token issued as `Bearer` (a server without DPoP) is sent as a bearer token.
    ///
    /// A proof names one request and is good for one use, so whatever sends a request
    /// again must sit above the layer (or middleware), where each attempt gets its own:
    /// `FollowRedirect` (below the layer, [`SameOriginCredentials`] drops the proof on
    /// every hop), a retry layer, and reqwest's own redirects (turn them off with
    /// `redirect::Policy::none()` for DPoP). A request URI needs a scheme and a host.
    ///
    /// Tokens bound to a key are not shared through a
    /// [`CredentialStore`](crate::CredentialStore): the key stays in this process, and a
    /// cache built with a store and such a source is refused.
    ///
    /// [`SameOriginCredentials`]: crate::redirect::SameOriginCredentials
    #[cfg(feature = "jwt")]
    #[cfg_attr(docsrs, doc(cfg(feature = "jwt")))]
    pub fn dpop(mut self, key: super::DpopKey) -> Self {
        self.dpop = Some(key);
        self
    }

    /// Sends the token with this `Authorization` scheme instead of `Bearer`, whatever the
    /// response's `token_type`. Without it, a `token_type` other than bearer is an error
    /// (RFC 6749 §7.1: do not use a token type you do not understand). With
    /// [`dpop`](Self::dpop), a token issued as `token_type: DPoP` is sent as RFC 9449
    /// says, `Authorization: DPoP`, whatever this scheme is: a bound token under another
    /// scheme would be refused.
    pub fn scheme(mut self, scheme: impl Into<String>) -> Self {
        self.scheme = Some(scheme.into());
        self
    }

    /// Called with every new token pair, after it is held and before anyone waiting for
    /// the new credential is released: persist the refresh token here. A rotated refresh
    /// token is handed over even when the rest of its answer is unusable (then
    /// [`TokenPair::access_token`] is `None`). A refresh token dropped (refused in words
    /// that judge it, or presented in an exchange whose outcome is unknown) is withdrawn
    /// with a pair that holds none: persist that too, so that a restart never presents it.
    ///
    /// The hook may return nothing, or a `Result`: an `Err` (or no answer within
    /// [`on_refresh_timeout`](Self::on_refresh_timeout)) means "not persisted". The source
    /// keeps using the new pair from memory, never the old one, and offers the newest
    /// unconfirmed pair to the hook again (250 ms, doubling to 30 s) until it is accepted
    /// or a newer pair is; calls never overlap, so an older pair never lands after a
    /// newer one.
    pub fn on_refresh<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(TokenPair) -> Fut + Send + Sync + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: PersistOutcome,
    {
        self.on_refresh = Some(Arc::new(move |pair| {
            let call = hook(pair);
            Box::pin(async move { call.await.into_result() })
        }));
        self
    }

    /// Longest time the [`on_refresh`](Self::on_refresh) hook may take (default
    /// [`DEFAULT_ON_REFRESH_TIMEOUT`]). A hook that fails to finish in time is logged and
    /// abandoned; the new refresh token is kept in memory all the same and used by the
    /// next exchange, so it is never lost (only not persisted by that call).
    pub fn on_refresh_timeout(mut self, timeout: Duration) -> Self {
        self.on_refresh_timeout = timeout;
        self
    }

    /// The namespace to give a shared store (`RedisStore::connect(url, &namespace)`,
    /// feature `redis`) for the credential this source obtains: `prefix` (your service
    /// and environment, such as `payments-prod`), then the token URL (scheme, host,
    /// path), the client id and every login field that is not a secret (grant type,
    /// scope, audience, resource, user name), and the issuer for a source given one
    /// ([`issuer`](Self::issuer)). Sources that differ in any of these get different
    /// keys; the same source in every process gets the same one. It holds no secret, and
    /// the store keeps only a hash of it.
    pub fn store_namespace(&self, prefix: &str) -> String {
        match &self.issuer {
            // The login's own URL may be a placeholder: the issuer says where it goes.
            Some(issuer) => format!(
                "{prefix}\n{}\nissuer={}",
                self.login.identity(),
                issuer.as_str()
            ),
            None => format!("{prefix}\n{}", self.login.identity()),
        }
    }

    /// Counts of logins and refreshes so far.
    pub fn stats(&self) -> TokenStats {
        TokenStats {
            logins: self.stats.logins.load(Ordering::Relaxed),
            refreshes: self.stats.refreshes.load(Ordering::Relaxed),
            refresh_rejections: self.stats.refresh_rejections.load(Ordering::Relaxed),
            unknown_outcomes: self.stats.unknown_outcomes.load(Ordering::Relaxed),
        }
    }

    /// The scopes a step-up would have every login ask for on top of the login's own:
    /// those already added and the ones `required`. Kept (by the exchange) only once a
    /// login with them succeeds. An error, before anything is sent, when this source's
    /// login cannot widen its scope or the API named none (or too many).
    fn step_up(&self, required: Option<&str>) -> Result<Vec<String>, TokenError> {
        let unsupported =
            |detail| TokenError::new(TokenErrorKind::StepUpUnsupported).detail(detail);
        let required: Vec<&str> = required
            .unwrap_or_default()
            .split_ascii_whitespace()
            .collect();
        if required.is_empty() {
            return Err(unsupported("the API named no scope"));
        }
        let mut wider = self.stepped_up();
        for scope in required {
            if scope.len() > MAX_SCOPE_LEN {
                return Err(unsupported("the API named a scope too long to ask for"));
            }
            if !wider.iter().any(|s| s == scope) {
                wider.push(scope.to_owned());
            }
        }
        if wider.len() > MAX_STEPPED_UP_SCOPES {
            return Err(unsupported(
                "the API named more scopes than a step-up asks for",
            ));
        }
        if self.login.widened(&wider).is_none() {
            return Err(unsupported(
                "the login is not a grant with a scope to widen (client credentials, password, JWT bearer, with .scope(..))",
            ));
        }
        Ok(wider)
    }

    /// The scopes step-ups added so far.
    fn stepped_up(&self) -> Vec<String> {
        self.stepped_up
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The job of one exchange; `step_up`: the scopes a step-up asks for.
    fn exchange_job(&self, step_up: Option<Vec<String>>) -> Result<Exchange, TokenError> {
        let mut client = match &self.client {
            Some(client) => client.clone(),
            None => default_client()?,
        };
        if self.allow_http_loopback {
            client = client.allow_http_loopback(true);
        }
        let scopes = step_up.clone().unwrap_or_else(|| self.stepped_up());
        let login = match scopes.is_empty() {
            true => None,
            false => self.login.widened(&scopes),
        };
        Ok(Exchange {
            client,
            issuer: self.issuer.clone(),
            #[cfg(feature = "jwt")]
            dpop: self.dpop.clone(),
            widened: login.is_some() && step_up.is_none(),
            login: login.unwrap_or_else(|| self.login.clone()),
            base_login: self.login.clone(),
            step_up,
            stepped_up: self.stepped_up.clone(),
            refresh: self.refresh.clone(),
            fields: self.fields.clone(),
            default_lifetime: self.default_lifetime,
            clock_skew: self.clock_skew,
            require_expiry: self.require_jwt_exp,
            scheme: self.scheme.clone(),
            on_refresh: self.on_refresh.clone(),
            on_refresh_timeout: self.on_refresh_timeout,
            persisting: self.persisting.clone(),
            store_down: self.store_down,
            held: self.held.clone(),
            stats: self.stats.clone(),
            flags: self.flags.clone(),
            began: (SystemTime::now(), Instant::now()),
        })
    }
}

#[cfg(feature = "https")]
fn default_client() -> Result<TokenClient, TokenError> {
    TokenClient::hyper_rustls()
}

#[cfg(all(not(feature = "https"), feature = "reqwest"))]
fn default_client() -> Result<TokenClient, TokenError> {
    // Never following redirects: a token request must not carry the client secret
    // wherever a redirect points.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| {
            TokenError::new(TokenErrorKind::InvalidRequest)
                .detail("could not build the default reqwest token client")
                .with_source(e)
        })?;
    Ok(TokenClient::reqwest(client))
}

#[cfg(not(any(feature = "https", feature = "reqwest")))]
fn default_client() -> Result<TokenClient, TokenError> {
    Err(TokenError::new(TokenErrorKind::InvalidRequest).detail(NO_CLIENT))
}

/// Why a token source cannot work without `TokenSource::client`.
#[cfg(not(any(feature = "https", feature = "reqwest")))]
const NO_CLIENT: &str =
    "no token client: call TokenSource::client, or enable the `https` or `reqwest` feature";

impl CredentialSource for TokenSource {
    fn check(&self) -> Result<(), crate::InvalidConfig> {
        #[cfg(not(any(feature = "https", feature = "reqwest")))]
        if self.client.is_none() {
            return Err(crate::InvalidConfig::new("client", NO_CLIENT));
        }
        Ok(())
    }

    async fn fetch(&self, cx: FetchContext) -> Result<Credential, BoxError> {
        let step_up = match cx.reason() {
            FetchReason::StepUp => Some(self.step_up(cx.required_scope())?),
            _ => None,
        };
        let mut job = self.exchange_job(step_up)?;
        job.began = (cx.now(), Instant::now());
        // The exchange runs in its own task: if the cache stops waiting (timeout, drop),
        // a refresh token the server already rotated is still received and stored.
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move { job.run(cx, tx).await });
        match rx.await {
            Ok(result) => result.map_err(Into::into),
            Err(_) => Err(TokenError::new(TokenErrorKind::Transport)
                .detail("the token exchange task failed")
                .into()),
        }
    }

    fn refresh_mode(&self) -> RefreshMode {
        self.mode
    }

    fn binds_credentials(&self) -> bool {
        #[cfg(feature = "jwt")]
        return self.dpop.is_some();
        #[cfg(not(feature = "jwt"))]
        false
    }
}

/// Everything one fetch needs, owned, so it can run in its own task.
struct Exchange {
    client: TokenClient,
    issuer: Option<super::Issuer>,
    #[cfg(feature = "jwt")]
    dpop: Option<super::DpopKey>,
    /// The login as configured, without scopes step-ups added.
    base_login: TokenRequest,
    /// Whether `login` asks for scopes earlier step-ups added (not a step-up itself).
    widened: bool,
    /// For a step-up: every scope it asks for on top of the login's own, kept in
    /// `stepped_up` once the login succeeds.
    step_up: Option<Vec<String>>,
    stepped_up: Arc<std::sync::Mutex<Vec<String>>>,
    login: TokenRequest,
    refresh: Option<(TokenRequest, String)>,
    fields: ResponseFields,
    default_lifetime: Option<Duration>,
    clock_skew: Duration,
    require_expiry: bool,
    scheme: Option<String>,
    on_refresh: Option<OnRefresh>,
    on_refresh_timeout: Duration,
    persisting: Arc<Persisting>,
    store_down: StoreDownPolicy,
    held: Arc<Mutex<Held>>,
    stats: Arc<Stats>,
    flags: Arc<Flags>,
    /// The cache's wall clock when the fetch began, and the monotonic instant it was
    /// read at: an answer's arrival on the cache's wall clock is the first plus the
    /// monotonic time since the second.
    began: (SystemTime, Instant),
}

/// Whether a refused token request's answer asked for time before the next one: a
/// `Retry-After` of zero (or an HTTP date past) asks for none.
fn asks_to_wait(e: &TokenError) -> bool {
    e.retry_after_hint().is_some_and(|wait| !wait.is_zero())
}

impl Exchange {
    /// When `arrived` (monotonic) was, on the cache's wall clock.
    fn wall(&self, arrived: Instant) -> SystemTime {
        let since = arrived.saturating_duration_since(self.began.1);
        self.began.0.checked_add(since).unwrap_or(self.began.0)
    }

    /// The exchange, its result sent to `tx` under the lock: a result nobody received any
    /// more (the cache stopped waiting) is marked, so that the next fetch hands it out
    /// with the refresh token it came with.
    async fn run(self, cx: FetchContext, tx: oneshot::Sender<Result<Credential, TokenError>>) {
        // Held across the exchange: one exchange at a time per source.
        let mut held = self.held.lock().await;
        // The endpoint's `Retry-After` holds every request of this source, whoever still
        // waited for the answer that carried it: nothing is sent before it, and nothing
        // held is touched (a refresh token the store shares keeps its marks), but a
        // credential an exchange brought and nobody took is handed out (a step-up's
        // answer may have set the hold after it came; a step-up never takes it).
        let left = (held.not_before).and_then(|at| at.checked_duration_since(Instant::now()));
        let waiting = held.undelivered && held.last.is_some() && self.step_up.is_none();
        let result = match left {
            Some(left) if !waiting => Err(self.held_back(left)),
            left => {
                let result = self.outcome(cx, &mut held, left).await;
                // Counted from the answer that asked, not from the request; a credential
                // handed out inside the hold sent nothing, and the hold stands.
                held.not_before = match &result {
                    _ if left.is_some() => held.not_before,
                    Err(e) => e
                        .retry_after_hint()
                        .map(|asked| Instant::now() + asked.min(crate::cache::MAX_RETRY_AFTER)),
                    Ok(_) => None,
                };
                result
            }
        };
        let issued = result.is_ok();
        match tx.send(result) {
            Err(Ok(_)) if !held.outage => held.undelivered = true,
            // The cache has it: never handed out again.
            Ok(()) if issued => held.undelivered = false,
            _ => {}
        }
    }

    /// Nothing sent: the endpoint's `Retry-After` has `left` to run.
    fn held_back(&self, left: Duration) -> TokenError {
        TokenError::new(TokenErrorKind::HeldBack)
            .retry_after(Some(left))
            .endpoint(self.login.url())
    }

    /// The fetch; `held_back`: the endpoint's `Retry-After` has this long to run, and
    /// only a credential nobody took may be handed out.
    async fn outcome(
        &self,
        cx: FetchContext,
        held: &mut Held,
        held_back: Option<Duration>,
    ) -> Result<Credential, TokenError> {
        // Read before the store's sharing rule takes the mark.
        let undelivered = held.undelivered;
        held.outage = false;
        // A refresh token this source alone holds, set aside while the store does not
        // answer (below).
        let mut aside = None;
        let shared = match cx.refresh_sharing() {
            // A step-up logs in and presents no refresh token: the store kept its own,
            // and what this source holds stays as it is if the login fails.
            RefreshSharing::Shared(_) if self.step_up.is_some() => true,
            RefreshSharing::Shared(token) => {
                // The store owns the refresh token: its one, or none (log in). One this
                // source kept may have been presented by another process since, and so
                // may one saved earlier (`refresh_token(saved)`): another process of
                // the fleet may have rotated it already. Only a token this source alone
                // holds is kept: a late exchange's rotated one (newer than the store's;
                // it goes with that exchange's credential), or one the server never acted
                // on after this source took it out of the store.
                if !std::mem::take(&mut held.undelivered) {
                    let unspent = std::mem::take(&mut held.unspent)
                        .then(|| held.refresh_token.take())
                        .flatten();
                    held.refresh_token = token.cloned().or(unspent);
                }
                true
            }
            RefreshSharing::StoreUnavailable if self.refresh.is_some() => {
                if self.store_down == StoreDownPolicy::Fail {
                    return Err(TokenError::new(TokenErrorKind::StoreUnavailable));
                }
                tracing::info!(
                    "credential store unavailable; logging in rather than presenting a shared refresh token"
                );
                held.outage = true;
                // One nobody else holds (unspent, or a late exchange's, newer than the
                // store's) is not presented now either, but kept for when the store
                // answers: lost, nothing would bring it back.
                if held.unspent || held.undelivered {
                    aside = held.refresh_token.take();
                }
                held.refresh_token = None;
                false
            }
            _ => false,
        };
        let result = self.exchange(&cx, held, undelivered, held_back).await;
        if held.outage {
            // The outage exchange's own refresh token is no fleet's (the cache keeps none
            // from it): what was set aside is held again, this source's alone.
            held.refresh_token = aside;
            held.unspent = held.refresh_token.is_some();
            // A late exchange's token is marked as the source's alone now; its credential,
            // handed out or not, is not handed out again.
            held.undelivered = false;
        }
        // The next refresh token goes to the store with the credential, in one write.
        match (shared, &held.refresh_token) {
            (true, Some(token)) => result.map(|c| c.with_refresh_token(token.clone())),
            _ => result,
        }
    }

    /// One exchange with the token endpoint, or none: `undelivered` says that the last
    /// exchange's credential reached nobody (the cache stopped waiting), which is then
    /// handed out instead.
    async fn exchange(
        &self,
        cx: &FetchContext,
        held: &mut Held,
        undelivered: bool,
        held_back: Option<Duration>,
    ) -> Result<Credential, TokenError> {
        // A step-up needs a new grant: neither the last credential nor a refresh (which
        // cannot widen a scope) will do.
        let step_up = self.step_up.is_some();
        if let Some(last) = (!step_up).then(|| held.last.take()).flatten() {
            // Only one the cache never received: one it did may be one it has rejected
            // since, or one older than what it took from a store (another process's).
            // The cache names the credential it is replacing: once rejected or expiring,
            // it is never handed out again, whatever happens to this exchange. An
            // explicit invalidation always goes to the token endpoint. Nor is one near
            // its end: the cache would refuse one that expires before it arrives, and its
            // refresh token (the fleet's, which goes with it) with it.
            let now = self.wall(Instant::now());
            let lasting = last.expiry().is_none_or(|at| {
                at.duration_since(now)
                    .is_ok_and(|left| left >= MIN_LIFETIME)
            });
            if undelivered
                && lasting
                && cx.previous() != Some(&last)
                && cx.reason() != FetchReason::Invalidated
            {
                tracing::debug!(
                    "handing out the credential of an exchange the cache stopped waiting for"
                );
                held.last = Some(last.clone());
                return Ok(last);
            }
        }
        if let Some(left) = held_back {
            // Held back, and the credential nobody took could not be handed out: the
            // refresh token that came with it stays marked as that exchange's (the
            // store's sharing rule would otherwise replace it with the spent one).
            held.undelivered = undelivered;
            return Err(self.held_back(left));
        }
        let refresh = self.refresh.as_ref().filter(|_| !step_up);
        // Whether the refresh was refused without a word on its token (below), now or
        // by the exchange before, which asked for time before the login it called for.
        // A step-up's login asks for more than the owed one: it leaves the mark.
        let owed = if step_up {
            None
        } else {
            held.login_owed.take()
        };
        let mut unjudged = owed.is_some() && owed == held.refresh_token;
        if unjudged {
            tracing::debug!(reason = ?cx.reason(), "logging in, as the last refusal of the held refresh token called for");
        }
        if let (Some((request, field)), Some(token), false) =
            (refresh, held.refresh_token.clone(), unjudged)
        {
            tracing::debug!(reason = ?cx.reason(), "refreshing with the held refresh token");
            // A 2xx answer's refresh token is held by `accept` before anything else in
            // it is judged, even when the answer then turns out to be an OAuth error.
            let outcome = match self.send(request, Some((field, &token))).await {
                Ok(answer) => self.accept(answer, held, Some(token.clone())).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(credential) => {
                    self.stats.refreshes.fetch_add(1, Ordering::Relaxed);
                    return Ok(credential);
                }
                // Refused, but not with a word that judges the refresh token: the
                // client's own credentials (`invalid_client`, Keycloak's
                // `unauthorized_client`, Auth0's `access_denied`, GitHub's
                // `incorrect_client_credentials`), a throttle in a server's own words
                // (Zoho's 200 "Access Denied"), a gateway's page or its
                // `{"message": "Unauthorized"}` (the token server never saw it), a
                // server's own shape for a dead token (HubSpot's `BAD_REFRESH_TOKEN`),
                // or a refresh refused for its proof twice (`send_to` sent a new one: a
                // refresh token bound to another key, or every proof refused after a
                // clock step). The login tells which: one that succeeds replaces the
                // refresh token (the refusal was about it after all); one that fails
                // leaves it held, for the next exchange to present again.
                Err(e)
                    if (e.is_grant_rejected() && !judges_refresh_token(&e))
                        || (e.oauth_error() == Some("invalid_dpop_proof")
                            && !e.is_outcome_unknown()) =>
                {
                    self.stats
                        .refresh_rejections
                        .fetch_add(1, Ordering::Relaxed);
                    if asks_to_wait(&e) {
                        // The endpoint said when to come back: the login waits for it
                        // too, as the next exchange's (owed), and the refresh token,
                        // judged by nobody, stays held (this source's alone, as when
                        // throttled) until that login succeeds.
                        tracing::info!(error = %e, "refresh refused with a Retry-After; keeping the refresh token, logging in no sooner");
                        held.unspent = held.refresh_token.is_some();
                        held.login_owed = held.refresh_token.clone();
                        return Err(e);
                    }
                    tracing::info!(error = %e, "refresh refused without a word on the refresh token; logging in, keeping it unless the login succeeds");
                    unjudged = true;
                }
                // Refused in words that judge the refresh token itself.
                Err(e) if e.is_grant_rejected() => {
                    self.stats
                        .refresh_rejections
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(error = %e, "refresh token refused; logging in again");
                    if held.refresh_token.as_ref() == Some(&token) {
                        held.refresh_token = None;
                        // Whoever persists refresh tokens must not resume with this one
                        // (the login's pair, if it brings one, follows).
                        self.persist(None, held).await;
                    }
                    if asks_to_wait(&e) {
                        // The endpoint said when to come back: the login waits for it.
                        return Err(e);
                    }
                }
                // An unknown outcome (below), or a 2xx (the server acted on the
                // refresh) that this client cannot use and read no new refresh token
                // from (a body that is no document at all, one whose refresh token
                // cannot be found): the old one may have been rotated.
                Err(e)
                    if e.is_outcome_unknown()
                        || (e.kind() == TokenErrorKind::InvalidResponse
                            && e.status().is_some_and(|status| status.is_success())
                            && held.refresh_token.as_ref() == Some(&token)) =>
                {
                    // The request left, and no answer says what became of it: the server
                    // may have rotated the refresh token (any 5xx, a connection closed
                    // mid-answer, the token client's timeout).
                    // Presenting it again could count as reuse and revoke the whole
                    // family: it is dropped, never sent again.
                    self.stats.unknown_outcomes.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        error = %e,
                        "refresh outcome unknown; dropping the refresh token and logging in again"
                    );
                    held.refresh_token = None;
                    // Whoever persists refresh tokens must not resume with this one.
                    self.persist(None, held).await;
                    if asks_to_wait(&e) {
                        // The endpoint said when to come back (`Retry-After` on a 503):
                        // the login waits for that too, as the next fetch.
                        return Err(e);
                    }
                }
                // Never sent (no connection), throttled, or answered in a way that
                // shows it was not acted on: keep the refresh token (one taken from the
                // store has no other holder now).
                Err(e) => {
                    // The one presented (taken out of the store) or the one the answer
                    // rotated to (which the store never got): this source's alone.
                    held.unspent = held.refresh_token.is_some();
                    return Err(e);
                }
            }
        }
        tracing::debug!(reason = ?cx.reason(), "logging in");
        let sent = match self.send(&self.login, None).await {
            // The scopes earlier step-ups added are refused now (the client's
            // registration changed): they are dropped, and the login asks for its own.
            // If the endpoint said when to come back, the next exchange asks.
            Err(e) if self.widened && e.oauth_error() == Some("invalid_scope") => {
                tracing::warn!(
                    "the token endpoint refuses the scopes step-ups added; logging in with the configured scope"
                );
                self.stepped_up
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clear();
                if asks_to_wait(&e) {
                    Err(e)
                } else {
                    self.send(&self.base_login, None).await
                }
            }
            sent => sent,
        };
        // What an unjudged refusal left held (the refresh token presented, or the one its
        // answer rotated to): kept if the login fails.
        let before = unjudged.then(|| held.refresh_token.clone()).flatten();
        let logged_in = match sent {
            Ok(answer) => {
                self.stats.logins.fetch_add(1, Ordering::Relaxed);
                self.accept(answer, held, None).await
            }
            Err(e) => Err(e),
        };
        let credential = match logged_in {
            Ok(credential) => credential,
            Err(e) => {
                if unjudged {
                    // A login answer that brought none leaves the one held before it.
                    if held.refresh_token.is_none() {
                        held.refresh_token = before;
                    }
                    // The one presented (taken out of the store), the one the refusal's
                    // answer rotated to, or the one the login's unusable answer brought:
                    // none of them is in the store (see `unspent`).
                    held.unspent = held.refresh_token.is_some();
                }
                return Err(e);
            }
        };
        if let Some(scopes) = &self.step_up {
            // A new session: a late exchange's refresh token, if one was held, belongs
            // to the old one.
            held.undelivered = false;
            // Granted: every later login asks for these scopes too (with any another
            // step-up added meanwhile).
            let mut kept = self
                .stepped_up
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for scope in scopes {
                if !kept.contains(scope) && kept.len() < MAX_STEPPED_UP_SCOPES {
                    kept.push(scope.clone());
                }
            }
        }
        Ok(credential)
    }

    /// Sends one token request. A 2xx answer comes back unjudged (see [`Answer`]); an
    /// error status, or a 2xx carrying an OAuth error, is the error the server stated,
    /// scrubbed of every form of this request's secrets.
    async fn send(
        &self,
        request: &TokenRequest,
        extra: Option<(&str, &Secret)>,
    ) -> Result<Answer, TokenError> {
        let Some(issuer) = &self.issuer else {
            return self.send_to(request, extra).await;
        };
        let metadata = issuer.metadata(&self.client, None).await?;
        let sent = self.send_to(&request.at(&metadata), extra).await;
        match sent {
            // The endpoint may have moved: a 404 was not acted on, so the request (a
            // refresh token in it included) can go once more, to where the issuer says
            // now.
            Err(e)
                if e.kind() == TokenErrorKind::Rejected
                    && e.status() == Some(http::StatusCode::NOT_FOUND) =>
            {
                let fresh = issuer.metadata(&self.client, Some(&metadata)).await?;
                let moved = request.at(&fresh);
                if moved.url() == request.at(&metadata).url() {
                    return Err(e);
                }
                tracing::info!(
                    "the token endpoint moved; sending to the one the issuer publishes now"
                );
                self.send_to(&moved, extra).await
            }
            sent => sent,
        }
    }

    /// [`send`](Self::send) to the request's own URL. With DPoP, a `use_dpop_nonce` (with
    /// a nonce) or `invalid_dpop_proof` answer (RFC 9449 §8, §5) is a request the server
    /// refused before acting on it: it goes once more, with a new proof (and the nonce the
    /// answer gave), since a proof can fail for a reason of its own (a nonce rotated
    /// between the two, a clock step at `iat`).
    async fn send_to(
        &self,
        request: &TokenRequest,
        extra: Option<(&str, &Secret)>,
    ) -> Result<Answer, TokenError> {
        match self.send_once(request, extra).await {
            // A 4xx only: a 5xx leaves the outcome unknown (a refresh token in it may
            // have been spent), whatever its body says.
            // A nonce asked for without one given: a resend could carry none. An answer
            // that asks for time (`Retry-After`) holds the resend too: it goes back, and
            // the hold is the caller's.
            Err(e)
                if self.dpop_enabled()
                    && match e.oauth_error() {
                        Some("use_dpop_nonce") => e.gave_nonce(),
                        Some("invalid_dpop_proof") => true,
                        _ => false,
                    }
                    && e.status().is_some_and(|s| s.is_client_error())
                    && !asks_to_wait(&e) =>
            {
                tracing::debug!(
                    "the token endpoint refused the DPoP proof or wants a nonce; sending again with a new proof"
                );
                self.send_once(request, extra).await
            }
            sent => sent,
        }
    }

    fn dpop_enabled(&self) -> bool {
        #[cfg(feature = "jwt")]
        return self.dpop.is_some();
        #[cfg(not(feature = "jwt"))]
        false
    }

    /// One token request to the request's own URL.
    async fn send_once(
        &self,
        request: &TokenRequest,
        extra: Option<(&str, &Secret)>,
    ) -> Result<Answer, TokenError> {
        #[allow(unused_mut)]
        let (mut http, assertion) = request
            .build_signed(extra)
            .map_err(|e| e.endpoint(request.url()))?;
        #[cfg(feature = "jwt")]
        let (target, proof) = match &self.dpop {
            Some(key) => {
                let (target, proof) = self
                    .prove(key, &mut http)
                    .map_err(|e| e.endpoint(request.url()))?;
                (Some(target), Some(proof))
            }
            None => (None, None),
        };
        let answer = self
            .client
            .send(http)
            .await
            .map_err(|e| e.endpoint(request.url()))?;
        #[cfg(feature = "jwt")]
        let nonce_given = match (
            &self.dpop,
            &target,
            answer.response.headers().get(crate::bound::DPOP_NONCE),
        ) {
            (Some(key), Some(target), Some(nonce)) => {
                key.keep_nonce(&target.origin, true, nonce.as_bytes())
            }
            _ => false,
        };
        let response = &answer.response;
        let (status, body) = (response.status(), response.body());
        let content_type = TokenClient::content_type(response);
        let error_in_success =
            status.is_success() && is_error_in_success(content_type, body, &self.fields);
        if !status.is_success() || error_in_success {
            let retry_after = response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| parse_retry_after(v.as_bytes(), SystemTime::now()));
            #[allow(unused_mut)]
            let mut sent = request.sent_secrets(extra.map(|(_, s)| s), assertion.as_ref());
            // A server may echo the proof too.
            #[cfg(feature = "jwt")]
            sent.extend(proof);
            #[allow(unused_mut)]
            let mut err = parse_error_body(status, content_type, body).scrub(&sent);
            #[cfg(feature = "jwt")]
            {
                err = err.proof_sent(target.is_some()).nonce_given(nonce_given);
            }
            let err = err.retry_after(retry_after).endpoint(request.url());
            if !error_in_success {
                return Err(err);
            }
            // An OAuth error with status 200: judged as the error it is, after its
            // refresh token (if a server sends one there) is read.
            return Ok(Answer {
                refresh_token: refresh_token_in(content_type, body, &self.fields),
                parsed: Err(err),
                arrived: answer.arrived,
            });
        }
        Ok(Answer {
            refresh_token: refresh_token_in(content_type, body, &self.fields),
            parsed: TokenResponse::parse(content_type, body, &self.fields)
                .map_err(|e| e.status_mut(status).endpoint(request.url())),
            arrived: answer.arrived,
        })
    }

    /// Adds a DPoP proof for the token request `http` (RFC 9449 §5); returns where it
    /// goes, whose nonce its answer may carry.
    #[cfg(feature = "jwt")]
    fn prove(
        &self,
        key: &super::DpopKey,
        http: &mut http::Request<http_body_util::Full<bytes::Bytes>>,
    ) -> Result<(crate::bound::Target, String), TokenError> {
        let invalid = |detail| TokenError::new(TokenErrorKind::InvalidRequest).detail(detail);
        let target = crate::bound::Target::of(http.uri())
            .ok_or_else(|| invalid("the token endpoint's url has no scheme or host"))?;
        let proof = key.proof(http.method().as_str(), &target, None)?;
        let mut value = http::HeaderValue::try_from(proof.as_str())
            .map_err(|_| invalid("the DPoP proof is not a header value"))?;
        value.set_sensitive(true);
        http.headers_mut().insert(crate::bound::DPOP, value);
        Ok((target, proof))
    }

    /// Holds the new refresh token first (it must never be lost, even if the rest of the
    /// answer turns out unusable), then builds the credential and runs the hook.
    async fn accept(
        &self,
        answer: Answer,
        held: &mut Held,
        previous_refresh: Option<Secret>,
    ) -> Result<Credential, TokenError> {
        let rotated = answer.refresh_token.is_some();
        held.refresh_token = answer.refresh_token.or(previous_refresh);
        // Whatever was held before is replaced: a mark it carried does not pass on (a
        // step-up's refresh token goes to the store, and is no longer this source's alone).
        held.unspent = false;
        let built = answer
            .parsed
            .and_then(|response| Ok((self.credential(&response, answer.arrived)?, response)));
        let (credential, response) = match built {
            Ok(built) => built,
            Err(e) if rotated => {
                tracing::warn!(error = %e, "token answer unusable; keeping its new refresh token");
                // Nobody else has it: the store never got it.
                held.unspent = true;
                self.persist(None, held).await;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        if response.empty_refresh_token {
            self.flags.once(&self.flags.empty_refresh, || {
                tracing::info!(
                    "the token endpoint sent an empty refresh token; treating it as none"
                )
            });
        }
        held.last = Some(credential.clone());
        self.persist(Some(response.access_token().clone()), held)
            .await;
        Ok(credential)
    }

    /// Hands the pair now held to the `on_refresh` hook; when the hook does not take it,
    /// keeps it as the newest unconfirmed pair and starts offering it again.
    async fn persist(&self, access_token: Option<Secret>, held: &Held) {
        let Some(hook) = &self.on_refresh else {
            return;
        };
        let pair = TokenPair {
            access_token,
            refresh_token: held.refresh_token.clone(),
        };
        let persisting = &self.persisting;
        // Numbered under the exchange lock: in the order the pairs were issued.
        let number = persisting.issued.fetch_add(1, Ordering::Relaxed) + 1;
        let taken = {
            let _turn = persisting.calls.lock().await;
            offer(hook, pair.clone(), self.on_refresh_timeout).await
        };
        let mut unconfirmed = persisting
            .unconfirmed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if taken {
            if unconfirmed.as_ref().is_some_and(|(n, _)| *n <= number) {
                *unconfirmed = None;
            }
            return;
        }
        // Kept in memory (`held`) and used by the next exchange; offered again until
        // the hook takes it or a newer pair.
        *unconfirmed = Some((number, pair));
        // Still under the lock: `offer_again` decides to stop under it too, so either it
        // sees this pair or this sees it stopped (and starts another).
        let retrying = persisting.retrying.swap(true, Ordering::AcqRel);
        drop(unconfirmed);
        if !retrying {
            tokio::spawn(offer_again(
                Arc::downgrade(persisting),
                hook.clone(),
                self.on_refresh_timeout,
            ));
        }
    }

    fn credential(
        &self,
        response: &TokenResponse,
        arrived: Instant,
    ) -> Result<Credential, TokenError> {
        let invalid = |detail| TokenError::new(TokenErrorKind::InvalidResponse).detail(detail);
        #[cfg(feature = "jwt")]
        if let (Some(key), Some(token_type)) = (&self.dpop, response.token_type()) {
            if token_type.trim().eq_ignore_ascii_case("dpop") {
                let token = response.access_token().expose();
                let lifetime = self.lifetime(response.expires_in(), jwt_exp(token))?;
                let credential = key.credential(token).map_err(|_| {
                    invalid("the access token holds characters a header cannot carry")
                })?;
                return Ok(match lifetime {
                    Some(lifetime) => credential.lives(self.wall(arrived), lifetime),
                    None => credential,
                });
            }
        }
        let scheme = match (&self.scheme, response.token_type()) {
            (Some(scheme), _) => scheme.as_str(),
            (None, None) => "Bearer",
            (None, Some(t)) if t.trim().eq_ignore_ascii_case("bearer") => "Bearer",
            (None, Some(_)) => {
                return Err(invalid(
                    "the token_type is not bearer; set TokenSource::scheme to send it anyway",
                ));
            }
        };
        let token = response.access_token().expose();
        let lifetime = self.lifetime(response.expires_in(), jwt_exp(token))?;
        let credential = Credential::with_scheme(scheme, token)
            .map_err(|_| invalid("the access token holds characters a header cannot carry"))?;
        // Issued when the answer arrived, on the cache's clock: the cache sizes its
        // refresh windows from this lifetime wherever the credential travels.
        Ok(match lifetime {
            Some(lifetime) => credential.lives(self.wall(arrived), lifetime),
            None => credential,
        })
    }

    /// The lifetime to use, from arrival: the earlier of `expires_in` and the JWT `exp`
    /// (some servers floor `exp` to the second and state the full `expires_in`), else the
    /// default; raised to [`MIN_LIFETIME`] if shorter; less the clock-skew margin.
    fn lifetime(
        &self,
        expires_in: Option<Duration>,
        exp: JwtExp,
    ) -> Result<Option<Duration>, TokenError> {
        let invalid = |detail| TokenError::new(TokenErrorKind::InvalidResponse).detail(detail);
        // `exp` is read through the system's wall clock once, here; the result is a
        // lifetime from arrival.
        let from_exp = match exp {
            JwtExp::At(at) => match at.duration_since(SystemTime::now()) {
                Ok(left) if !left.is_zero() => Some(left.min(MAX_LIFETIME)),
                _ if expires_in.is_none() => {
                    return Err(invalid("the access token's jwt exp is in the past"));
                }
                _ => {
                    self.flags.once(&self.flags.past_exp, || {
                        tracing::warn!(
                            "the access token's jwt exp is already past by this machine's clock; using expires_in (check the clock)"
                        )
                    });
                    None
                }
            },
            JwtExp::Unreadable => {
                if expires_in.is_none() {
                    self.flags.once(&self.flags.bad_exp, || {
                        tracing::warn!(
                            "the access token's jwt exp claim cannot be read and the response states no expires_in; using the default lifetime"
                        )
                    });
                }
                None
            }
            JwtExp::Absent => None,
        };
        let stated = match (expires_in, from_exp) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) if self.require_expiry => {
                return Err(invalid(
                    "the response states no lifetime and the token is not a jwt with exp",
                ));
            }
            (None, None) => match self.default_lifetime {
                Some(default) => default,
                None => return Ok(None),
            },
        };
        if stated < MIN_LIFETIME {
            self.flags.once(&self.flags.short_lifetime, || {
                tracing::warn!(
                    stated_ms = stated.as_millis() as u64,
                    minimum_ms = MIN_LIFETIME.as_millis() as u64,
                    "the token endpoint states a lifetime shorter than the minimum; using the minimum"
                )
            });
        }
        // The floor applies to what the server states; the margin comes off after, so
        // a short-lived token still gets its margin.
        let stated = stated.clamp(MIN_LIFETIME, MAX_LIFETIME);
        let skew = self.clock_skew.min(stated.mul_f64(MAX_SKEW_FRACTION));
        Ok(Some(stated - skew))
    }
}

/// A 2xx answer from the token endpoint, before it is judged.
struct Answer {
    /// The refresh token it carries, read on its own: kept even if `parsed` failed.
    refresh_token: Option<Secret>,
    parsed: Result<TokenResponse, TokenError>,
    arrived: Instant,
}

/// Warnings a source gives once, not once per token.
#[derive(Default)]
struct Flags {
    short_lifetime: AtomicBool,
    empty_refresh: AtomicBool,
    bad_exp: AtomicBool,
    past_exp: AtomicBool,
}

impl Flags {
    fn once(&self, flag: &AtomicBool, log: impl FnOnce()) {
        if !flag.swap(true, Ordering::Relaxed) {
            log();
        }
    }
}

/// One call of the hook: whether it took the pair (logged when not; never the pair).
/// A hook that panics (in the call or its future) did not take it: the pair stays
/// unconfirmed and is offered again, as after an `Err`, and the credential it came with
/// is still the fetch's answer.
async fn offer(hook: &OnRefresh, pair: TokenPair, timeout: Duration) -> bool {
    use futures_util::FutureExt;
    let call = std::panic::AssertUnwindSafe(async move { hook(pair).await }).catch_unwind();
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(Ok(()))) => true,
        Ok(Err(_)) => {
            tracing::warn!(
                "on_refresh hook panicked; the new tokens are kept in memory, offered again"
            );
            false
        }
        Ok(Ok(Err(e))) => {
            tracing::warn!(
                error = %crate::text::foreign(&e.to_string()),
                "on_refresh hook did not persist the new tokens; kept in memory, offered again"
            );
            false
        }
        Err(_) => {
            tracing::warn!(
                timeout_ms = timeout.as_millis() as u64,
                "on_refresh hook timed out; the new tokens are kept in memory, offered again"
            );
            false
        }
    }
}

/// Offers the newest unconfirmed pair to the hook at growing intervals until one is
/// taken with nothing newer waiting; ends with the last clone of the source.
async fn offer_again(persisting: std::sync::Weak<Persisting>, hook: OnRefresh, timeout: Duration) {
    let mut pause = PERSIST_RETRY_FIRST;
    loop {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(PERSIST_RETRY_MAX);
        let Some(persisting) = persisting.upgrade() else {
            return;
        };
        let _turn = persisting.calls.lock().await;
        let newest = {
            let unconfirmed = persisting
                .unconfirmed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if unconfirmed.is_none() {
                // Under the lock `persist` records a pair under: it cannot slip in between.
                persisting.retrying.store(false, Ordering::Release);
            }
            unconfirmed.clone()
        };
        let Some((number, pair)) = newest else {
            return;
        };
        if offer(&hook, pair, timeout).await {
            let mut unconfirmed = persisting
                .unconfirmed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if unconfirmed.as_ref().is_some_and(|(n, _)| *n == number) {
                *unconfirmed = None;
                persisting.retrying.store(false, Ordering::Release);
                tracing::info!("on_refresh hook took the new tokens");
                return;
            }
        }
    }
}

#[cfg(test)]
mod namespace_tests {
    use super::*;

    /// A store namespace names what makes two credentials different (token URL, client
    /// id, scope, audience, user) and nothing secret; the same source gives the same one.
    #[test]
    fn store_namespaces_name_the_credential_never_a_secret() {
        let url = "https://user:pw@auth.example.com/oauth/token?k=v";
        let make = |scope: &str, id: &str| {
            TokenSource::new(
                TokenRequest::oauth2_client_credentials(url, id, "s3cr3t")
                    .unwrap()
                    .scope(scope),
            )
            .store_namespace("payments-prod")
        };
        let ns = make("read", "svc");
        assert_eq!(ns, make("read", "svc"));
        assert_ne!(ns, make("write", "svc"));
        assert_ne!(ns, make("read", "other"));
        for part in [
            "payments-prod",
            "https://auth.example.com/oauth/token",
            "client_id=svc",
            "scope=read",
        ] {
            assert!(ns.contains(part), "{part} in {ns:?}");
        }
        for secret in ["s3cr3t", "pw", "k=v"] {
            assert!(!ns.contains(secret), "{secret} in {ns:?}");
        }
        let password = TokenSource::new(
            TokenRequest::oauth2_password(
                "https://auth.example.com/t",
                "id",
                "sec",
                "alice",
                "hunter2",
            )
            .unwrap(),
        );
        let ns = password.store_namespace("cli");
        assert!(
            ns.contains("username=alice") && !ns.contains("hunter2") && !ns.contains("sec"),
            "{ns:?}"
        );
    }
}

/// What a token source does without the default client (`https` off).
#[cfg(all(test, not(feature = "https")))]
mod tests {
    use super::*;
    #[cfg(feature = "reqwest")]
    use crate::ErrorKind;
    use crate::{AuthLayer, CredentialCache};

    /// Loopback, port 1: nothing listens, so nothing leaves the machine.
    fn source() -> TokenSource {
        TokenSource::client_credentials("https://127.0.0.1:1/oauth/token", "id", "secret").unwrap()
    }

    /// With neither `https` nor `reqwest`, a token source given no client is refused when
    /// a cache or layer is built, naming the setting, not on its first fetch.
    #[cfg(not(any(feature = "https", feature = "reqwest")))]
    #[test]
    fn a_source_without_a_client_is_refused_when_built() {
        let refused = AuthLayer::builder(source())
            .any_https_origin()
            .build()
            .unwrap_err();
        assert_eq!(refused.setting(), "client");
        assert!(
            refused.to_string().contains("TokenSource::client"),
            "{refused}"
        );
        let refused = CredentialCache::builder(source()).build().unwrap_err();
        assert_eq!(refused.setting(), "client");
        let client = TokenClient::from_service(tower::service_fn(|_req: http::Request<_>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::<
                bytes::Bytes,
            >::default()))
        }));
        assert!(
            CredentialCache::builder(source().client(client))
                .build()
                .is_ok()
        );
    }

    /// With `reqwest` (and not `https`), a token source needs no `.client(..)`: its
    /// requests go through reqwest, and it is accepted when built.
    #[cfg(all(feature = "reqwest", not(feature = "https")))]
    #[tokio::test]
    async fn reqwest_alone_gives_token_sources_a_client() {
        assert!(default_client().is_ok());
        let cache = CredentialCache::builder(source()).build().unwrap();
        // A fetch is attempted through reqwest: it fails at the transport (nothing
        // listens), not for want of a client.
        let err = cache.credential().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Fetch);
        assert!(!err.to_string().contains("no token client"), "{err}");
        let _ = AuthLayer::builder(source())
            .any_https_origin()
            .build()
            .unwrap();
    }
}
