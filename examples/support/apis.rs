//! One fake API per style. Each enforces what its real counterpart enforces (lifetimes,
//! rotation, scopes) and counts what a reader wants to check.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use base64::Engine as _;
use http::{Method, StatusCode, header};
use serde_json::{Value, json};

use super::{Api, Count, Req, now};

fn unauthorized() -> (StatusCode, Value) {
    (StatusCode::UNAUTHORIZED, json!({"error": "unauthorized"}))
}

fn ok(body: Value) -> (StatusCode, Value) {
    (StatusCode::OK, body)
}

/// Tokens a server accepts until their expiry (seconds since the epoch).
#[derive(Default)]
struct Valid(Mutex<HashMap<String, f64>>);

impl Valid {
    fn issue(&self, token: &str, expires_at: f64) {
        self.0.lock().unwrap().insert(token.into(), expires_at);
    }

    fn accepts(&self, token: Option<&str>) -> bool {
        let tokens = self.0.lock().unwrap();
        token
            .and_then(|t| tokens.get(t))
            .is_some_and(|&exp| now() < exp)
    }

    fn revoke_all(&self) {
        self.0.lock().unwrap().clear();
    }
}

// ---------------------------------------------------------------------------------------
/// Style A: `POST /v1/sessions` with `{"type":"api-key","key","secret"}` answers a JWT
/// whose `exp` (whole seconds, floored as real servers do) is its only lifetime.
pub struct SessionApi {
    key: String,
    secret: String,
    ttl_secs: u64,
    pub logins: Count,
    pub rejected: Count,
    valid: Valid,
}

impl SessionApi {
    pub fn new(key: &str, secret: &str, ttl_secs: u64) -> Arc<Self> {
        let (key, secret, valid) = (key.into(), secret.into(), Valid::default());
        let (logins, rejected) = (Count::default(), Count::default());
        Arc::new(SessionApi {
            key,
            secret,
            ttl_secs,
            logins,
            rejected,
            valid,
        })
    }

    /// Every session ends now: the API answers 401 until the next login.
    pub fn revoke_all(&self) {
        self.valid.revoke_all();
    }
}

impl Api for SessionApi {
    fn answer(&self, req: &Req) -> (StatusCode, Value) {
        if (&req.method, req.path.as_str()) == (&Method::POST, "/v1/sessions") {
            let b = req.json();
            if b["type"] != "api-key" || b["key"] != *self.key || b["secret"] != *self.secret {
                return (
                    StatusCode::BAD_REQUEST,
                    json!({"message": "Invalid key or secret"}),
                );
            }
            let n = self.logins.add();
            let exp = now().floor() + self.ttl_secs as f64;
            let part =
                |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
            let jwt = format!(
                "{}.{}.c2ln",
                part(json!({"alg": "HS256", "typ": "JWT"})),
                part(json!({"sub": self.key, "jti": n, "exp": exp as u64}))
            );
            self.valid.issue(&jwt, exp);
            return ok(json!({"access_token": jwt}));
        }
        if self.valid.accepts(req.bearer()) {
            return ok(json!({"consents": []}));
        }
        self.rejected.add();
        unauthorized()
    }
}

// ---------------------------------------------------------------------------------------
/// Style B: OAuth2 client credentials, a JSON body with `client_id`, `client_secret` and
/// an `audience`; `expires_in` is stated and enforced.
pub struct AudienceApi {
    id: String,
    secret: String,
    audience: String,
    expires_in: u64,
    pub tokens_issued: Count,
    pub rejected: Count,
    valid: Valid,
}

impl AudienceApi {
    pub fn new(id: &str, secret: &str, audience: &str, expires_in: u64) -> Arc<Self> {
        Arc::new(AudienceApi {
            id: id.into(),
            secret: secret.into(),
            audience: audience.into(),
            expires_in,
            tokens_issued: Count::default(),
            rejected: Count::default(),
            valid: Valid::default(),
        })
    }

    /// Every token issued so far expires now.
    pub fn expire_all(&self) {
        self.valid.revoke_all();
    }
}

impl Api for AudienceApi {
    fn answer(&self, req: &Req) -> (StatusCode, Value) {
        if (&req.method, req.path.as_str()) == (&Method::POST, "/oauth/token") {
            let b = req.json();
            if b["grant_type"] != "client_credentials"
                || b["client_id"] != *self.id
                || b["client_secret"] != *self.secret
                || b["audience"] != *self.audience
            {
                return (StatusCode::UNAUTHORIZED, json!({"error": "access_denied"}));
            }
            let token = format!("b-token-{}", self.tokens_issued.add());
            self.valid.issue(&token, now() + self.expires_in as f64);
            let body = json!({"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"});
            return ok(body);
        }
        if self.valid.accepts(req.bearer()) {
            return ok(json!({"vessels": []}));
        }
        self.rejected.add();
        (
            StatusCode::UNAUTHORIZED,
            json!({"message": "Token expired."}),
        )
    }
}

// ---------------------------------------------------------------------------------------
/// Style C: `POST /v3/auth/login` with `{"api_key"}` answers an access and a refresh token;
/// `POST /v3/auth/refresh` with `{"refresh_token"}` rotates both, accepts each refresh
/// token once, and refuses a refresh while the access token still works.
pub struct RotatingApi {
    api_key: String,
    pub logins: Count,
    pub refreshes: Count,
    /// A refresh token presented a second time (a lost rotation in real life).
    pub refresh_tokens_reused: Count,
    /// A refresh tried while the access token still worked.
    pub early_refreshes: Count,
    pub rejected: Count,
    state: Mutex<Rotation>,
}

#[derive(Default)]
struct Rotation {
    /// Access tokens that still work.
    live: HashSet<String>,
    /// Refresh token -> its access token, for refresh tokens not used yet.
    unused: HashMap<String, String>,
    seen: HashSet<String>,
    next: u64,
}

impl Rotation {
    fn issue(&mut self) -> Value {
        self.next += 1;
        let (access, refresh) = (
            format!("c-access-{}", self.next),
            format!("c-refresh-{}", self.next),
        );
        self.live.insert(access.clone());
        self.unused.insert(refresh.clone(), access.clone());
        json!({"access_token": access, "refresh_token": refresh})
    }
}

impl RotatingApi {
    pub fn new(api_key: &str) -> Arc<Self> {
        Arc::new(RotatingApi {
            api_key: api_key.into(),
            logins: Count::default(),
            refreshes: Count::default(),
            refresh_tokens_reused: Count::default(),
            early_refreshes: Count::default(),
            rejected: Count::default(),
            state: Mutex::default(),
        })
    }

    /// The session expires: every access token answers 401 from now on.
    pub fn expire_sessions(&self) {
        self.state.lock().unwrap().live.clear();
    }
}

impl Api for RotatingApi {
    fn answer(&self, req: &Req) -> (StatusCode, Value) {
        let mut state = self.state.lock().unwrap();
        match (&req.method, req.path.as_str()) {
            (&Method::POST, "/v3/auth/login") if req.json()["api_key"] == *self.api_key => {
                self.logins.add();
                ok(state.issue())
            }
            (&Method::POST, "/v3/auth/login") => unauthorized(),
            (&Method::POST, "/v3/auth/refresh") => {
                let token = req.json()["refresh_token"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if !state.seen.insert(token.clone()) {
                    self.refresh_tokens_reused.add();
                }
                let Some(access) = state.unused.get(&token).cloned() else {
                    return unauthorized();
                };
                if state.live.contains(&access) {
                    self.early_refreshes.add();
                    return (
                        StatusCode::BAD_REQUEST,
                        json!({"error": "access token has not expired"}),
                    );
                }
                state.unused.remove(&token);
                self.refreshes.add();
                ok(state.issue())
            }
            _ if req.bearer().is_some_and(|t| state.live.contains(t)) => {
                ok(json!({"accounts": []}))
            }
            _ => {
                self.rejected.add();
                unauthorized()
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
/// Style D: OAuth2 client credentials with HTTP Basic and a form body, scopes; `403` for
/// a path the token's scopes do not cover.
pub struct ClientCredentialsApi {
    id: String,
    secret: String,
    expires_in: u64,
    pub tokens_issued: Count,
    pub rejected: Count,
    valid: Valid,
    scopes: Mutex<HashMap<String, String>>,
}

impl ClientCredentialsApi {
    pub fn new(id: &str, secret: &str, expires_in: u64) -> Arc<Self> {
        Arc::new(ClientCredentialsApi {
            id: id.into(),
            secret: secret.into(),
            expires_in,
            tokens_issued: Count::default(),
            rejected: Count::default(),
            valid: Valid::default(),
            scopes: Mutex::default(),
        })
    }

    /// Revokes every token issued so far.
    pub fn revoke_all(&self) {
        self.valid.revoke_all();
    }
}

impl Api for ClientCredentialsApi {
    fn answer(&self, req: &Req) -> (StatusCode, Value) {
        if (&req.method, req.path.as_str()) == (&Method::POST, "/oauth/v2/token") {
            if req.basic() != Some((self.id.clone(), self.secret.clone())) {
                return (StatusCode::UNAUTHORIZED, json!({"error": "invalid_client"}));
            }
            let form = req.form();
            let is_form =
                req.header(header::CONTENT_TYPE) == Some("application/x-www-form-urlencoded");
            if !is_form || form.get("grant_type").map(String::as_str) != Some("client_credentials")
            {
                return (
                    StatusCode::BAD_REQUEST,
                    json!({"error": "unsupported_grant_type"}),
                );
            }
            let token = format!("d-token-{}", self.tokens_issued.add());
            self.valid.issue(&token, now() + self.expires_in as f64);
            let scope = form.get("scope").cloned().unwrap_or_default();
            self.scopes.lock().unwrap().insert(token.clone(), scope);
            let body = json!({"token_type": "Bearer", "expires_in": self.expires_in, "access_token": token});
            return ok(body);
        }
        if !self.valid.accepts(req.bearer()) {
            self.rejected.add();
            return unauthorized();
        }
        let scopes = self.scopes.lock().unwrap();
        let scope = req
            .bearer()
            .and_then(|t| scopes.get(t))
            .map_or("", String::as_str);
        if req.path.starts_with("/v1/admin") && !scope.split(' ').any(|s| s == "admin") {
            return (
                StatusCode::FORBIDDEN,
                json!({"error": "insufficient_scope"}),
            );
        }
        ok(json!({"shipments": []}))
    }
}

// ---------------------------------------------------------------------------------------
/// Style E: a personal access token (`/api/me`), a session cookie (`/api/cookie/me`) and
/// the custom `Authorization: Secret <secret>` scheme (`/api/clients/verify`).
pub struct PersonalTokenApi {
    pat: Mutex<String>,
    cookie: String,
    secret: String,
    pub rejected: Count,
}

impl PersonalTokenApi {
    pub fn new(pat: &str, cookie: (&str, &str), secret: &str) -> Arc<Self> {
        Arc::new(PersonalTokenApi {
            pat: Mutex::new(pat.into()),
            cookie: format!("{}={}", cookie.0, cookie.1),
            secret: secret.into(),
            rejected: Count::default(),
        })
    }

    /// The user revokes the token and issues a new one: the old one answers 401.
    pub fn reissue(&self, pat: &str) {
        *self.pat.lock().unwrap() = pat.into();
    }
}

impl Api for PersonalTokenApi {
    fn answer(&self, req: &Req) -> (StatusCode, Value) {
        let auth = req.header(header::AUTHORIZATION);
        let cookies = req.header(header::COOKIE).unwrap_or_default();
        let accepted = match req.path.as_str() {
            "/api/me" => auth == Some(&format!("Bearer {}", self.pat.lock().unwrap())),
            "/api/cookie/me" => cookies.split("; ").any(|c| c == self.cookie),
            "/api/clients/verify" => auth == Some(&format!("Secret {}", self.secret)),
            _ => false,
        };
        if accepted {
            return ok(json!({"ok": true}));
        }
        self.rejected.add();
        unauthorized()
    }
}
