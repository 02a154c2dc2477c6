//! Loopback servers that behave as the five styles' real APIs do (README, "The five
//! authentication styles"), one per style, with counters for what they saw. Plain HTTP
//! on 127.0.0.1 (the TLS test wraps the same handlers in rustls). The examples have
//! their own, shorter fakes in `examples/support/`.
#![allow(dead_code, unreachable_pub)]

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

pub type Reply = Response<Full<Bytes>>;

/// A request as the handlers see it: body read whole.
pub struct Incoming {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Incoming {
    pub fn bearer(&self) -> Option<&str> {
        self.headers
            .get(header::AUTHORIZATION)?
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")
    }

    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    pub fn form(&self) -> HashMap<String, String> {
        form_urlencoded::parse(&self.body).into_owned().collect()
    }
}

pub fn reply(status: StatusCode, body: Value) -> Reply {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// A reply carrying this header is never sent: the server closes the connection instead
/// (a gateway dropping it, a server crashing mid-answer).
pub const HANG_UP: &str = "x-test-hang-up";

/// A reply that makes the server close the connection without answering.
pub fn hang_up() -> Reply {
    let mut reply = reply(StatusCode::OK, json!({}));
    reply
        .headers_mut()
        .insert(HANG_UP, http::HeaderValue::from_static("1"));
    reply
}

/// Serves `handler` over HTTP/1.1 on 127.0.0.1:0 until the runtime ends.
pub async fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    serve_on("127.0.0.1:0".parse().unwrap(), handler).await
}

/// [`serve`] on a given address (a port that refused connections a moment ago).
pub async fn serve_on<F, Fut>(addr: SocketAddr, handler: F) -> SocketAddr
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move {
                        let reply = handler(req).await;
                        if reply.headers().contains_key(HANG_UP) {
                            // The connection is closed with no answer at all.
                            return Err(std::io::Error::other("hanging up"));
                        }
                        Ok(reply)
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    addr
}

/// Reads the request whole, then asks `handle`.
pub async fn read(req: Request<hyper::body::Incoming>) -> Incoming {
    let (parts, body) = req.into_parts();
    Incoming {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        headers: parts.headers,
        body: body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default(),
    }
}

/// A trait for the provider state: answer one request.
pub trait Provider: Send + Sync + 'static {
    fn handle(&self, req: Incoming) -> Reply;

    /// How long to hold the answer to a request to `path` after handling it.
    fn delay(&self, path: &str) -> Duration {
        let _ = path;
        Duration::ZERO
    }

    /// The answer and how long to hold it; by default [`handle`](Self::handle) and
    /// [`delay`](Self::delay).
    fn handle_delayed(&self, req: Incoming) -> (Reply, Duration) {
        let delay = self.delay(&req.path);
        (self.handle(req), delay)
    }
}

/// Starts `provider` on loopback; returns its base URL (`http://127.0.0.1:PORT`).
pub async fn start<P: Provider>(provider: Arc<P>) -> String {
    start_on("127.0.0.1:0".parse().unwrap(), provider).await
}

/// [`start`] on a given address.
pub async fn start_on<P: Provider>(addr: SocketAddr, provider: Arc<P>) -> String {
    let addr = serve_on(addr, move |req| {
        let provider = provider.clone();
        async move {
            let req = read(req).await;
            let (reply, delay) = provider.handle_delayed(req);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            reply
        }
    })
    .await;
    format!("http://{addr}")
}

/// An error answer with a `WWW-Authenticate` challenge and a JSON body.
pub fn challenge(status: StatusCode, www_authenticate: &str) -> Reply {
    let mut reply = reply(status, json!({"error": status.canonical_reason()}));
    reply.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        http::HeaderValue::from_str(www_authenticate).unwrap(),
    );
    reply
}

fn unauthorized() -> Reply {
    reply(StatusCode::UNAUTHORIZED, json!({"error": "unauthorized"}))
}

pub fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

pub fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

// ---------------------------------------------------------------------------------------
// Style A: session login with key + secret; a JWT whose only lifetime is its `exp`.

pub struct SessionApi {
    pub key: String,
    pub secret: String,
    /// JWT lifetime (the real provider: 1 hour).
    pub lifetime: Duration,
    /// Answer everything with 301 to https, as the provider does on plain http.
    pub redirect_to_https: AtomicBool,
    pub logins: AtomicUsize,
    pub bad_logins: AtomicUsize,
    pub api_calls: AtomicUsize,
    pub unauthorized: AtomicUsize,
    tokens: Mutex<HashMap<String, f64>>,
}

impl SessionApi {
    pub fn new(key: &str, secret: &str, lifetime: Duration) -> Arc<Self> {
        Arc::new(SessionApi {
            key: key.into(),
            secret: secret.into(),
            lifetime,
            redirect_to_https: AtomicBool::new(false),
            logins: AtomicUsize::new(0),
            bad_logins: AtomicUsize::new(0),
            api_calls: AtomicUsize::new(0),
            unauthorized: AtomicUsize::new(0),
            tokens: Mutex::default(),
        })
    }
}

impl SessionApi {
    /// Revokes every session token: the API answers 401 until the next login.
    pub fn revoke_all(&self) {
        self.tokens.lock().unwrap().clear();
    }
}

impl Provider for SessionApi {
    fn handle(&self, req: Incoming) -> Reply {
        if self.redirect_to_https.load(SeqCst) {
            let mut res = reply(StatusCode::MOVED_PERMANENTLY, json!({}));
            res.headers_mut()
                .insert(header::LOCATION, "https://localhost/".parse().unwrap());
            return res;
        }
        if req.path == "/v1/sessions" && req.method == Method::POST {
            let body = req.json().unwrap_or(Value::Null);
            let ok = req
                .headers
                .get(header::CONTENT_TYPE)
                .is_some_and(|c| c == "application/json")
                && body["type"] == "api-key"
                && body["key"] == self.key.as_str()
                && body["secret"] == self.secret.as_str();
            if !ok {
                self.bad_logins.fetch_add(1, SeqCst);
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({"code": 400, "message": "Invalid key or secret"}),
                );
            }
            let n = self.logins.fetch_add(1, SeqCst) + 1;
            let exp = now_secs() + self.lifetime.as_secs_f64();
            let jwt = format!(
                "{}.{}.c2lnbmF0dXJl",
                b64(&json!({"alg": "HS256", "typ": "JWT"})),
                b64(&json!({"sub": self.key, "jti": n, "exp": exp}))
            );
            self.tokens.lock().unwrap().insert(jwt.clone(), exp);
            return reply(StatusCode::OK, json!({"access_token": jwt}));
        }
        self.api_calls.fetch_add(1, SeqCst);
        let valid = req
            .bearer()
            .and_then(|t| self.tokens.lock().unwrap().get(t).copied())
            .is_some_and(|exp| now_secs() < exp);
        if valid {
            reply(StatusCode::OK, json!({"consents": []}))
        } else {
            self.unauthorized.fetch_add(1, SeqCst);
            unauthorized()
        }
    }
}

// ---------------------------------------------------------------------------------------
// Style B: OAuth2 client credentials with a JSON body and an audience.

pub struct AudienceApi {
    pub client_id: String,
    pub client_secret: String,
    pub audience: String,
    /// `expires_in` sent with each token, and enforced (the real provider: 86400).
    pub expires_in_secs: std::sync::atomic::AtomicU64,
    pub token_requests: AtomicUsize,
    pub api_calls: AtomicUsize,
    pub expired_answers: AtomicUsize,
    valid: Mutex<HashMap<String, f64>>,
}

impl AudienceApi {
    pub fn new(client_id: &str, client_secret: &str, audience: &str) -> Arc<Self> {
        Arc::new(AudienceApi {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            audience: audience.into(),
            expires_in_secs: std::sync::atomic::AtomicU64::new(86400),
            token_requests: AtomicUsize::new(0),
            api_calls: AtomicUsize::new(0),
            expired_answers: AtomicUsize::new(0),
            valid: Mutex::default(),
        })
    }

    /// Every token issued so far expires now.
    pub fn expire_all(&self) {
        self.valid.lock().unwrap().clear();
    }
}

impl Provider for AudienceApi {
    fn handle(&self, req: Incoming) -> Reply {
        if req.path == "/oauth/token" && req.method == Method::POST {
            let n = self.token_requests.fetch_add(1, SeqCst) + 1;
            let b = req.json().unwrap_or(Value::Null);
            if b["grant_type"] != "client_credentials"
                || b["client_id"] != self.client_id.as_str()
                || b["client_secret"] != self.client_secret.as_str()
                || b["audience"] != self.audience.as_str()
            {
                return reply(
                    StatusCode::UNAUTHORIZED,
                    json!({"error": "access_denied", "error_description": "Unauthorized"}),
                );
            }
            let token = format!("b-token-{n}");
            let lifetime = self.expires_in_secs.load(SeqCst);
            self.valid
                .lock()
                .unwrap()
                .insert(token.clone(), now_secs() + lifetime as f64);
            return reply(
                StatusCode::OK,
                json!({"access_token": token, "expires_in": lifetime, "token_type": "Bearer"}),
            );
        }
        self.api_calls.fetch_add(1, SeqCst);
        let expires = req
            .bearer()
            .and_then(|t| self.valid.lock().unwrap().get(t).copied());
        if expires.is_some_and(|exp| now_secs() < exp) {
            reply(StatusCode::OK, json!({"vessels": []}))
        } else {
            self.expired_answers.fetch_add(1, SeqCst);
            reply(
                StatusCode::UNAUTHORIZED,
                json!({"statusCode": 401, "statusText": "Unauthorized", "message": "Token expired.", "path": req.path}),
            )
        }
    }
}

// ---------------------------------------------------------------------------------------
// Style C: API-key login, access + refresh token, rotation, reactive refresh only.

#[derive(Default)]
struct RotationState {
    /// access token -> expired?
    access: HashMap<String, bool>,
    /// refresh token -> (its access token, already used or revoked?)
    refresh: HashMap<String, (String, bool)>,
    seen_refresh_tokens: HashSet<String>,
    next: usize,
}

pub struct RotatingApi {
    pub api_key: String,
    /// Delay before the refresh endpoint answers (it rotates first, then waits).
    pub refresh_delay: Mutex<Duration>,
    pub logins: AtomicUsize,
    pub refreshes: AtomicUsize,
    /// Refresh attempts while the access token was still valid (rejected).
    pub early_refreshes: AtomicUsize,
    /// A refresh token presented a second time.
    pub reused_refresh_tokens: AtomicUsize,
    pub api_calls: AtomicUsize,
    state: Mutex<RotationState>,
}

impl RotatingApi {
    pub fn new(api_key: &str) -> Arc<Self> {
        Arc::new(RotatingApi {
            api_key: api_key.into(),
            refresh_delay: Mutex::new(Duration::ZERO),
            logins: AtomicUsize::new(0),
            refreshes: AtomicUsize::new(0),
            early_refreshes: AtomicUsize::new(0),
            reused_refresh_tokens: AtomicUsize::new(0),
            api_calls: AtomicUsize::new(0),
            state: Mutex::default(),
        })
    }

    /// The session expires: every access token answers 401 from now on.
    pub fn expire_sessions(&self) {
        self.state
            .lock()
            .unwrap()
            .access
            .values_mut()
            .for_each(|expired| *expired = true);
    }

    /// Revokes every refresh token (as if it expired server-side).
    pub fn revoke_refresh_tokens(&self) {
        self.state
            .lock()
            .unwrap()
            .refresh
            .values_mut()
            .for_each(|(_, dead)| *dead = true);
    }

    fn issue(state: &mut RotationState) -> Value {
        state.next += 1;
        let (access, refresh) = (
            format!("c-access-{}", state.next),
            format!("c-refresh-{}", state.next),
        );
        state.access.insert(access.clone(), false);
        state
            .refresh
            .insert(refresh.clone(), (access.clone(), false));
        json!({"access_token": access, "refresh_token": refresh})
    }
}

impl Provider for RotatingApi {
    fn delay(&self, path: &str) -> Duration {
        match path {
            "/v3/auth/refresh" => *self.refresh_delay.lock().unwrap(),
            _ => Duration::ZERO,
        }
    }

    fn handle(&self, req: Incoming) -> Reply {
        let mut state = self.state.lock().unwrap();
        match (req.method.clone(), req.path.as_str()) {
            (Method::POST, "/v3/auth/login") => {
                if req
                    .json()
                    .is_none_or(|b| b["api_key"] != self.api_key.as_str())
                {
                    return reply(
                        StatusCode::UNAUTHORIZED,
                        json!({"error": "invalid api key"}),
                    );
                }
                self.logins.fetch_add(1, SeqCst);
                reply(StatusCode::OK, Self::issue(&mut state))
            }
            (Method::POST, "/v3/auth/refresh") => {
                let token = req
                    .json()
                    .and_then(|b| b["refresh_token"].as_str().map(str::to_owned));
                let Some(token) = token else {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        json!({"error": "refresh_token missing"}),
                    );
                };
                if !state.seen_refresh_tokens.insert(token.clone()) {
                    self.reused_refresh_tokens.fetch_add(1, SeqCst);
                }
                let Some((access, dead)) = state.refresh.get(&token).cloned() else {
                    return reply(
                        StatusCode::UNAUTHORIZED,
                        json!({"error": "unknown refresh token"}),
                    );
                };
                if dead {
                    return reply(
                        StatusCode::UNAUTHORIZED,
                        json!({"error": "refresh token expired"}),
                    );
                }
                if state.access.get(&access) == Some(&false) {
                    self.early_refreshes.fetch_add(1, SeqCst);
                    return reply(
                        StatusCode::BAD_REQUEST,
                        json!({"error": "access token has not expired"}),
                    );
                }
                state.refresh.insert(token, (access, true));
                self.refreshes.fetch_add(1, SeqCst);
                reply(StatusCode::OK, Self::issue(&mut state))
            }
            _ => {
                self.api_calls.fetch_add(1, SeqCst);
                match req.bearer().and_then(|t| state.access.get(t)) {
                    Some(false) => reply(StatusCode::OK, json!({"accounts": []})),
                    _ => unauthorized(),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// OAuth2 refresh grant (RFC 6749 §6), form + Basic, rotation with reuse detection: a
// refresh token presented twice revokes its whole family.

#[derive(Default)]
struct GrantState {
    access: HashMap<String, (usize, bool)>,
    /// refresh token -> (family, used)
    refresh: HashMap<String, (usize, bool)>,
    revoked_families: HashSet<usize>,
    next: usize,
}

pub struct RefreshGrantApi {
    pub client_id: String,
    pub client_secret: String,
    pub password_grants: AtomicUsize,
    pub refresh_grants: AtomicUsize,
    pub family_revocations: AtomicUsize,
    pub api_calls: AtomicUsize,
    state: Mutex<GrantState>,
}

impl RefreshGrantApi {
    pub fn new(client_id: &str, client_secret: &str) -> Arc<Self> {
        Arc::new(RefreshGrantApi {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            password_grants: AtomicUsize::new(0),
            refresh_grants: AtomicUsize::new(0),
            family_revocations: AtomicUsize::new(0),
            api_calls: AtomicUsize::new(0),
            state: Mutex::default(),
        })
    }

    pub fn expire_access_tokens(&self) {
        self.state
            .lock()
            .unwrap()
            .access
            .values_mut()
            .for_each(|(_, expired)| *expired = true);
    }

    fn issue(&self, state: &mut GrantState, family: usize) -> Reply {
        state.next += 1;
        let (access, refresh) = (
            format!("g-access-{}", state.next),
            format!("g-refresh-{}", state.next),
        );
        state.access.insert(access.clone(), (family, false));
        state.refresh.insert(refresh.clone(), (family, false));
        reply(
            StatusCode::OK,
            json!({"access_token": access, "refresh_token": refresh, "token_type": "bearer", "expires_in": "3600"}),
        )
    }

    fn client_ok(&self, headers: &HeaderMap) -> bool {
        basic_credentials(headers)
            .is_some_and(|(id, secret)| id == self.client_id && secret == self.client_secret)
    }
}

/// The first parameter a form body repeats, if any: RFC 6749 §3.2 ("Request and response
/// parameters MUST NOT be included more than once"), which Okta enforces ("the request
/// contains duplicated parameters": `invalid_request`, developer.okta.com OIDC API
/// reference, okta/okta-developer-docs#2082) and Keycloak too (keycloak/keycloak#7544).
pub fn repeated_parameter(body: &[u8]) -> Option<String> {
    let mut seen = HashSet::new();
    form_urlencoded::parse(body)
        .map(|(k, _)| k.into_owned())
        .find(|k| !seen.insert(k.clone()))
}

/// The `invalid_request` a strict token endpoint answers a repeated parameter with.
pub fn repeated_parameter_refusal(name: &str) -> Reply {
    reply(
        StatusCode::BAD_REQUEST,
        json!({"error": "invalid_request", "error_description": format!("duplicated parameter: {name}")}),
    )
}

/// Decodes `Authorization: Basic` without url-decoding: id and secret as sent.
pub fn basic_raw(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(value)
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

/// Decodes `Authorization: Basic`, url-decoding id and secret (RFC 6749 §2.3.1).
pub fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let (id, secret) = basic_raw(headers)?;
    let unescape = |s: &str| {
        form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
    };
    Some((unescape(&id)?, unescape(&secret)?))
}

impl Provider for RefreshGrantApi {
    fn handle(&self, req: Incoming) -> Reply {
        let mut state = self.state.lock().unwrap();
        if req.path == "/oauth/token" {
            if !self.client_ok(&req.headers) {
                return reply(StatusCode::UNAUTHORIZED, json!({"error": "invalid_client"}));
            }
            if let Some(name) = repeated_parameter(&req.body) {
                return repeated_parameter_refusal(&name);
            }
            let form = req.form();
            return match form.get("grant_type").map(String::as_str) {
                Some("password")
                    if form.get("username").is_some_and(|u| u == "alice")
                        && form.get("password").is_some_and(|p| p == "wonderland") =>
                {
                    self.password_grants.fetch_add(1, SeqCst);
                    state.next += 1;
                    let family = state.next;
                    self.issue(&mut state, family)
                }
                Some("refresh_token") => {
                    let token = form.get("refresh_token").cloned().unwrap_or_default();
                    match state.refresh.get(&token).copied() {
                        Some((family, false)) if !state.revoked_families.contains(&family) => {
                            state.refresh.insert(token, (family, true));
                            self.refresh_grants.fetch_add(1, SeqCst);
                            self.issue(&mut state, family)
                        }
                        Some((family, true)) => {
                            // Reuse: revoke the whole family, access tokens included.
                            if state.revoked_families.insert(family) {
                                self.family_revocations.fetch_add(1, SeqCst);
                            }
                            reply(
                                StatusCode::BAD_REQUEST,
                                json!({"error": "invalid_grant", "error_description": "refresh token reused"}),
                            )
                        }
                        _ => reply(StatusCode::BAD_REQUEST, json!({"error": "invalid_grant"})),
                    }
                }
                _ => reply(StatusCode::BAD_REQUEST, json!({"error": "invalid_grant"})),
            };
        }
        self.api_calls.fetch_add(1, SeqCst);
        match req.bearer().and_then(|t| state.access.get(t)).copied() {
            Some((family, false)) if !state.revoked_families.contains(&family) => {
                reply(StatusCode::OK, json!({}))
            }
            _ => unauthorized(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Style D: OAuth2 client credentials, HTTP Basic + form body, scopes; 403 for missing
// permissions. As RFC 6749 and RFC 6750 servers (Auth0, Okta, Keycloak) answer: a scope
// the client is not registered for is `invalid_scope` at the token endpoint; a token
// the API does not know is a 401 with `WWW-Authenticate: Bearer error="invalid_token"`
// (no error code when no token came at all); a token without the scope a resource needs
// is a 403 with `error="insufficient_scope"` and the `scope` it needs; the token
// response states the granted scope.

pub struct ClientCredentialsApi {
    pub client_id: String,
    pub client_secret: String,
    /// `expires_in` sent with each token, and enforced (the usual: 3600).
    pub expires_in_secs: std::sync::atomic::AtomicU64,
    pub token_requests: AtomicUsize,
    pub api_calls: AtomicUsize,
    pub last_scope: Mutex<Option<String>>,
    /// Every scope asked for at the token endpoint, in order.
    pub scopes_asked: Mutex<Vec<String>>,
    /// What this client may be granted; anything else is `invalid_scope`.
    pub registered_scopes: Mutex<Vec<String>>,
    valid: Mutex<HashMap<String, (String, f64)>>,
}

impl ClientCredentialsApi {
    pub fn new(client_id: &str, client_secret: &str) -> Arc<Self> {
        Arc::new(ClientCredentialsApi {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            expires_in_secs: std::sync::atomic::AtomicU64::new(3600),
            token_requests: AtomicUsize::new(0),
            api_calls: AtomicUsize::new(0),
            last_scope: Mutex::default(),
            scopes_asked: Mutex::default(),
            registered_scopes: Mutex::new(vec!["shipments:read".into(), "admin".into()]),
            valid: Mutex::default(),
        })
    }
}

impl ClientCredentialsApi {
    /// Revokes every token issued so far.
    pub fn revoke_all(&self) {
        self.valid.lock().unwrap().clear();
    }
}

impl Provider for ClientCredentialsApi {
    fn handle(&self, req: Incoming) -> Reply {
        if req.path == "/oauth/v2/token" && req.method == Method::POST {
            let n = self.token_requests.fetch_add(1, SeqCst) + 1;
            let client_ok = basic_credentials(&req.headers)
                .is_some_and(|(id, secret)| id == self.client_id && secret == self.client_secret);
            if !client_ok {
                return reply(
                    StatusCode::UNAUTHORIZED,
                    json!({"error": "invalid_client", "error_description": "Client authentication failed"}),
                );
            }
            if let Some(name) = repeated_parameter(&req.body) {
                return repeated_parameter_refusal(&name);
            }
            let form_ok = req
                .headers
                .get(header::CONTENT_TYPE)
                .is_some_and(|c| c == "application/x-www-form-urlencoded");
            let form = req.form();
            if !form_ok || form.get("grant_type").map(String::as_str) != Some("client_credentials")
            {
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "unsupported_grant_type"}),
                );
            }
            let scope = form.get("scope").cloned().unwrap_or_default();
            *self.last_scope.lock().unwrap() = Some(scope.clone());
            self.scopes_asked.lock().unwrap().push(scope.clone());
            let registered = self.registered_scopes.lock().unwrap().clone();
            if let Some(bad) = scope
                .split(' ')
                .find(|s| !s.is_empty() && !registered.iter().any(|r| r == s))
            {
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "invalid_scope", "error_description": format!("scope {bad} is not allowed for this client")}),
                );
            }
            let token = format!("d-token-{n}");
            let lifetime = self.expires_in_secs.load(SeqCst);
            self.valid
                .lock()
                .unwrap()
                .insert(token.clone(), (scope.clone(), now_secs() + lifetime as f64));
            return reply(
                StatusCode::OK,
                json!({"token_type": "Bearer", "expires_in": lifetime, "access_token": token, "scope": scope}),
            );
        }
        self.api_calls.fetch_add(1, SeqCst);
        let Some(token) = req.bearer() else {
            // RFC 6750 §3.1: no error code when the request carried no token.
            return challenge(StatusCode::UNAUTHORIZED, r#"Bearer realm="logistics""#);
        };
        let scope = self
            .valid
            .lock()
            .unwrap()
            .get(token)
            .cloned()
            .filter(|(_, exp)| now_secs() < *exp)
            .map(|(scope, _)| scope);
        match scope {
            None => challenge(
                StatusCode::UNAUTHORIZED,
                r#"Bearer realm="logistics", error="invalid_token", error_description="The access token expired or was revoked""#,
            ),
            Some(scope)
                if req.path.starts_with("/v1/admin") && !scope.split(' ').any(|s| s == "admin") =>
            {
                challenge(
                    StatusCode::FORBIDDEN,
                    r#"Bearer realm="logistics", error="insufficient_scope", scope="admin", error_description="The request requires higher privileges""#,
                )
            }
            Some(_) => reply(StatusCode::OK, json!({"shipments": []})),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Style E: personal access tokens, cookies and the custom `Secret` scheme.

pub struct PersonalTokenApi {
    pub pat: Mutex<String>,
    pub cookie: (String, String),
    pub client_secret: String,
    pub api_calls: AtomicUsize,
}

impl PersonalTokenApi {
    pub fn new(pat: &str, cookie: (&str, &str), client_secret: &str) -> Arc<Self> {
        Arc::new(PersonalTokenApi {
            pat: Mutex::new(pat.into()),
            cookie: (cookie.0.into(), cookie.1.into()),
            client_secret: client_secret.into(),
            api_calls: AtomicUsize::new(0),
        })
    }

    /// The user revokes the token and issues a new one.
    pub fn reissue(&self, pat: &str) {
        *self.pat.lock().unwrap() = pat.into();
    }
}

impl Provider for PersonalTokenApi {
    fn handle(&self, req: Incoming) -> Reply {
        self.api_calls.fetch_add(1, SeqCst);
        let auth = req
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let ok = match req.path.as_str() {
            "/api/me" => auth == Some(&format!("Bearer {}", self.pat.lock().unwrap())),
            "/api/cookie/me" => req
                .headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split("; "))
                .any(|c| c == format!("{}={}", self.cookie.0, self.cookie.1)),
            "/api/clients/verify" => auth == Some(&format!("Secret {}", self.client_secret)),
            _ => false,
        };
        if ok {
            reply(StatusCode::OK, json!({"ok": true}))
        } else {
            unauthorized()
        }
    }
}

// ---------------------------------------------------------------------------------------
// Discovery: an authorization server that publishes its metadata as Keycloak and Okta do
// (an issuer with a path; RFC 8414's well-known URL, or only OpenID Connect's), with a
// `Cache-Control` lifetime, and a token endpoint that can move. The token endpoint
// enforces the client authentication methods the metadata lists.

pub struct DiscoveryIdp {
    /// The issuer's path (`/realms/acme`); the issuer is `base + path`.
    pub issuer_path: String,
    /// Set once started: the issuer as published (a test may make it lie).
    pub issuer: Mutex<String>,
    /// Whether the RFC 8414 well-known URL is served (else only OpenID Connect's).
    pub rfc8414: AtomicBool,
    pub token_path: Mutex<String>,
    pub cache_control: Mutex<Option<String>>,
    /// `token_endpoint_auth_methods_supported`.
    pub auth_methods: Mutex<Vec<String>>,
    /// Overrides the published token endpoint (to point it elsewhere).
    pub token_endpoint_override: Mutex<Option<String>>,
    pub metadata_requests: Mutex<Vec<String>>,
    pub token_requests: Mutex<Vec<String>>,
    /// The metadata URLs answer 503.
    pub metadata_down: AtomicBool,
}

impl DiscoveryIdp {
    pub fn new(issuer_path: &str) -> Arc<Self> {
        Arc::new(DiscoveryIdp {
            issuer_path: issuer_path.into(),
            issuer: Mutex::default(),
            rfc8414: AtomicBool::new(true),
            token_path: Mutex::new(format!("{issuer_path}/protocol/openid-connect/token")),
            cache_control: Mutex::new(Some("public, max-age=3600".into())),
            auth_methods: Mutex::new(vec![
                "client_secret_basic".into(),
                "client_secret_post".into(),
            ]),
            token_endpoint_override: Mutex::default(),
            metadata_requests: Mutex::default(),
            token_requests: Mutex::default(),
            metadata_down: AtomicBool::new(false),
        })
    }

    /// Starts it; returns the issuer (`http://127.0.0.1:PORT/realms/...`).
    pub async fn start(self: &Arc<Self>) -> String {
        let base = start(self.clone()).await;
        let issuer = format!("{base}{}", self.issuer_path);
        *self.issuer.lock().unwrap() = issuer.clone();
        issuer
    }

    fn metadata(&self, base: &str) -> Reply {
        let token_endpoint = self
            .token_endpoint_override
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| format!("{base}{}", self.token_path.lock().unwrap()));
        let mut reply = reply(
            StatusCode::OK,
            json!({
                "issuer": *self.issuer.lock().unwrap(),
                "token_endpoint": token_endpoint,
                "token_endpoint_auth_methods_supported": *self.auth_methods.lock().unwrap(),
                "grant_types_supported": ["client_credentials", "refresh_token"],
                "response_types_supported": ["code"],
            }),
        );
        if let Some(cc) = self.cache_control.lock().unwrap().as_deref() {
            reply
                .headers_mut()
                .insert(header::CACHE_CONTROL, cc.parse().unwrap());
        }
        reply
    }
}

impl Provider for DiscoveryIdp {
    fn handle(&self, req: Incoming) -> Reply {
        let host = req
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let base = format!("http://{host}");
        let path = &self.issuer_path;
        let rfc8414 = format!("/.well-known/oauth-authorization-server{path}");
        let oidc = format!("{path}/.well-known/openid-configuration");
        if req.method == Method::GET && (req.path == rfc8414 || req.path == oidc) {
            self.metadata_requests
                .lock()
                .unwrap()
                .push(req.path.clone());
            if self.metadata_down.load(SeqCst) {
                return reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"error": "unavailable"}),
                );
            }
            if req.path == rfc8414 && !self.rfc8414.load(SeqCst) {
                return reply(StatusCode::NOT_FOUND, json!({"error": "not found"}));
            }
            return self.metadata(&base);
        }
        if req.method == Method::POST && req.path == *self.token_path.lock().unwrap() {
            if let Some(name) = repeated_parameter(&req.body) {
                self.token_requests.lock().unwrap().push(req.path.clone());
                return repeated_parameter_refusal(&name);
            }
            let methods = self.auth_methods.lock().unwrap().clone();
            let form = req.form();
            let basic = basic_credentials(&req.headers);
            let in_body = form.get("client_id").zip(form.get("client_secret"));
            let client_ok = match (basic, in_body) {
                (Some((id, secret)), None)
                    if methods.iter().any(|m| m == "client_secret_basic") =>
                {
                    id == "disc-client" && secret == "disc-secret"
                }
                (None, Some((id, secret))) if methods.iter().any(|m| m == "client_secret_post") => {
                    id == "disc-client" && secret == "disc-secret"
                }
                _ => false,
            };
            self.token_requests.lock().unwrap().push(req.path.clone());
            if !client_ok {
                return reply(
                    StatusCode::UNAUTHORIZED,
                    json!({"error": "invalid_client", "error_description": "client authentication method not allowed"}),
                );
            }
            return reply(
                StatusCode::OK,
                json!({"access_token": format!("disc-token-{}", self.token_requests.lock().unwrap().len()), "token_type": "Bearer", "expires_in": 300}),
            );
        }
        // Anything else (an old token endpoint among it) is not here.
        self.token_requests.lock().unwrap().push(req.path.clone());
        reply(StatusCode::NOT_FOUND, json!({"error": "not found"}))
    }
}

// ---------------------------------------------------------------------------------------
// private_key_jwt (RFC 7523 §3, OpenID Connect Core §9), checked as a certified server
// checks it: the assertion type; the signature against the registered public key, with
// the algorithm the key implies (the header's `alg` must match; `none` and HMAC are
// refused); the `kid` if the client registered one; `iss` = `sub` = the client id; `aud`
// the token endpoint or the issuer; `exp` in the future and at most 5 minutes away;
// `iat` not in the future; a `jti` never seen before. Any failure is `invalid_client`.
// Registered with `HS256`, the key is the client's secret (`client_secret_jwt`): only
// HS256 is accepted then, verified with a key of at least 256 bits, as Nimbus JOSE and
// jose4j insist (RFC 7518 §3.2; quarkusio/quarkus#22969), and a second client
// authentication (an `Authorization` header, a `client_secret` field) is refused (RFC
// 6749 §2.3: one method per request). A refusal in that mode names the registered
// secret, as a careless server's error text does.

pub struct JwtClientIdp {
    pub client_id: String,
    /// (alg, public key bytes as ring verifies them, kid)
    pub key: Mutex<(String, Vec<u8>, Option<String>)>,
    /// What `aud` must be: the token endpoint's URL (set on start) or the issuer.
    pub audience: Mutex<String>,
    pub seen_jti: Mutex<HashSet<String>>,
    pub token_requests: AtomicUsize,
    pub accepted: AtomicUsize,
    /// Why each refused assertion was refused.
    pub refusals: Mutex<Vec<&'static str>>,
    /// When set, the signing key is looked up as Microsoft Entra ID looks it up: by the
    /// registered certificate's thumbprint in the JOSE header (`x5t`, or `x5t#S256`),
    /// never by `kid`; an assertion without it is refused ("AADSTS700027: The
    /// certificate with identifier used to sign the client assertion is not registered
    /// on application"; learn.microsoft.com, "Microsoft identity platform application
    /// authentication certificate credentials"; keycloak/keycloak#12946).
    pub x5t: Mutex<Option<String>>,
}

impl JwtClientIdp {
    pub fn new(client_id: &str, alg: &str, public_key: Vec<u8>, kid: Option<&str>) -> Arc<Self> {
        Arc::new(JwtClientIdp {
            client_id: client_id.into(),
            key: Mutex::new((alg.into(), public_key, kid.map(Into::into))),
            audience: Mutex::default(),
            seen_jti: Mutex::default(),
            token_requests: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
            refusals: Mutex::default(),
            x5t: Mutex::default(),
        })
    }

    /// Starts it; returns the token endpoint's URL (the default audience).
    pub async fn start(self: &Arc<Self>) -> String {
        let base = start(self.clone()).await;
        let url = format!("{base}/oauth2/token");
        let mut audience = self.audience.lock().unwrap();
        if audience.is_empty() {
            *audience = url.clone();
        }
        url
    }

    fn check(&self, form: &HashMap<String, String>) -> Result<(), &'static str> {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
        if form.get("client_assertion_type").map(String::as_str)
            != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        {
            return Err("client_assertion_type");
        }
        if form.contains_key("client_secret") {
            return Err("a client secret beside the assertion");
        }
        let jws = form.get("client_assertion").ok_or("no client_assertion")?;
        let parts: Vec<&str> = jws.split('.').collect();
        let [header, claims, sig] = parts[..] else {
            return Err("not a compact JWS");
        };
        let decode = |part: &str| -> Result<Value, &'static str> {
            serde_json::from_slice(&B64.decode(part).map_err(|_| "base64url")?).map_err(|_| "json")
        };
        let (header, claims) = (decode(header)?, decode(claims)?);
        let sig = B64.decode(sig).map_err(|_| "signature base64url")?;
        let (alg, public_key, kid) = self.key.lock().unwrap().clone();
        let signed = &jws[..jws.rfind('.').unwrap()];
        if header["alg"] != alg.as_str() {
            return Err("alg");
        }
        if let Some(kid) = kid {
            if header["kid"] != kid.as_str() {
                return Err("kid");
            }
        }
        if let Some(x5t) = self.x5t.lock().unwrap().as_deref() {
            if header["x5t"] != x5t && header["x5t#S256"] != x5t {
                return Err("x5t");
            }
        }
        match alg.as_str() {
            "HS256" if public_key.len() < 32 => return Err("HS256 key under 256 bits"),
            "HS256" => {
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &public_key);
                ring::hmac::verify(&key, signed.as_bytes(), &sig).map_err(|_| "signature")?;
            }
            "RS256" | "ES256" => {
                let verification: &dyn ring::signature::VerificationAlgorithm = match alg.as_str() {
                    "RS256" => &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                    _ => &ring::signature::ECDSA_P256_SHA256_FIXED,
                };
                ring::signature::UnparsedPublicKey::new(verification, public_key)
                    .verify(signed.as_bytes(), &sig)
                    .map_err(|_| "signature")?;
            }
            _ => return Err("alg not allowed"),
        }
        if claims["iss"] != self.client_id.as_str() || claims["sub"] != self.client_id.as_str() {
            return Err("iss/sub");
        }
        if form
            .get("client_id")
            .is_some_and(|id| *id != self.client_id)
        {
            return Err("client_id");
        }
        if claims["aud"] != self.audience.lock().unwrap().as_str() {
            return Err("aud");
        }
        let now = now_secs();
        let exp = claims["exp"].as_f64().ok_or("exp")?;
        let iat = claims["iat"].as_f64().ok_or("iat")?;
        if exp <= now || exp > now + 300.0 {
            return Err("exp");
        }
        if iat > now + 5.0 {
            return Err("iat in the future");
        }
        let jti = claims["jti"].as_str().ok_or("jti")?;
        if jti.len() < 16 || !self.seen_jti.lock().unwrap().insert(jti.to_owned()) {
            return Err("jti reused");
        }
        Ok(())
    }
}

impl Provider for JwtClientIdp {
    fn handle(&self, req: Incoming) -> Reply {
        let n = self.token_requests.fetch_add(1, SeqCst) + 1;
        if let Some(name) = repeated_parameter(&req.body) {
            self.refusals.lock().unwrap().push("a repeated parameter");
            return repeated_parameter_refusal(&name);
        }
        let form = req.form();
        let shared = self.key.lock().unwrap().0 == "HS256";
        let checked = match req.headers.contains_key(header::AUTHORIZATION) {
            true if shared => Err("a second client authentication"),
            _ => self.check(&form),
        };
        if let Err(why) = checked {
            self.refusals.lock().unwrap().push(why);
            // As some servers do: the refused assertion echoed back (and, for a secret's
            // assertion, the secret it should have been signed with).
            let mut echoed = form.get("client_assertion").cloned().unwrap_or_default();
            if shared {
                let secret = String::from_utf8_lossy(&self.key.lock().unwrap().1).into_owned();
                echoed = format!("{echoed} (expected a signature with {secret})");
            }
            return reply(
                StatusCode::UNAUTHORIZED,
                json!({"error": "invalid_client", "error_description": format!("{why}: {echoed}")}),
            );
        }
        self.accepted.fetch_add(1, SeqCst);
        reply(
            StatusCode::OK,
            json!({"access_token": format!("jwt-token-{n}"), "token_type": "Bearer", "expires_in": 300}),
        )
    }
}

// ---------------------------------------------------------------------------------------
// Mutual TLS (RFC 8705 §2.2, `self_signed_tls_client_auth`), behind
// `tls::serve_mtls`: the client authenticates with a certificate registered with the
// server (by its SHA-256); the body carries `client_id` and nothing secret; a request
// with a client secret, or a certificate not registered for that client, is
// `invalid_client`.

/// The header a mutual-TLS server (`tls::serve_mtls`) adds to each request it hands its
/// provider: the SHA-256 (hex) of the client certificate the handshake verified. Set by
/// the server, never taken from the client.
pub const CLIENT_CERT_SHA256: &str = "x-test-client-cert-sha256";

pub struct MtlsIdp {
    pub client_id: String,
    /// SHA-256 (hex) of each certificate registered for the client.
    pub registered: Mutex<HashSet<String>>,
    /// The certificate each token request came with, in order.
    pub seen: Mutex<Vec<String>>,
    pub issued: AtomicUsize,
}

impl MtlsIdp {
    pub fn new(client_id: &str) -> Arc<Self> {
        Arc::new(MtlsIdp {
            client_id: client_id.into(),
            registered: Mutex::default(),
            seen: Mutex::default(),
            issued: AtomicUsize::new(0),
        })
    }
}

impl Provider for MtlsIdp {
    fn handle(&self, req: Incoming) -> Reply {
        let cert = req
            .headers
            .get(CLIENT_CERT_SHA256)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        self.seen.lock().unwrap().push(cert.clone());
        if let Some(name) = repeated_parameter(&req.body) {
            return repeated_parameter_refusal(&name);
        }
        let form = req.form();
        let refused = |why: &str| {
            reply(
                StatusCode::UNAUTHORIZED,
                json!({"error": "invalid_client", "error_description": why}),
            )
        };
        if form.get("client_id") != Some(&self.client_id) {
            return refused("client_id");
        }
        if form.contains_key("client_secret") || req.headers.contains_key(header::AUTHORIZATION) {
            return refused("a secret with a certificate-bound client");
        }
        if !self.registered.lock().unwrap().contains(&cert) {
            return refused("certificate not registered for this client");
        }
        let n = self.issued.fetch_add(1, SeqCst) + 1;
        reply(
            StatusCode::OK,
            json!({"access_token": format!("mtls-token-{n}"), "token_type": "Bearer", "expires_in": 300}),
        )
    }
}
