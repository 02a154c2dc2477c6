//! A token server that behaves like the strictest OAuth2 servers in the wild, not like
//! the happy path:
//!
//! - access tokens are JWTs whose `exp` is `floor(now) + ttl` while `expires_in` states
//!   the full `ttl` (as certified OIDC providers stamp them), and the API enforces `exp`;
//! - refresh tokens rotate on every use, and a refresh token presented twice revokes its
//!   whole family, access tokens included (RFC 6819 §5.2.2.3, OAuth 2.1 §4.3.1);
//! - faults can be queued: an answer of any shape (a 200 carrying an OAuth error, an
//!   `error_description` echoing what the client sent), a refresh that rotates and then
//!   sends a body the client cannot parse, a refresh that rotates and answers late;
//! - a refused refresh grant can be answered with another status than RFC 6749's 400
//!   (`refused_grant_status`: Auth0 answers 403), refresh tokens can outlive their
//!   lifetime (`expire_refresh_tokens`), errors can take Microsoft Entra ID's shape
//!   (`entra_error`), and a refused refresh grant can be answered in a server's own
//!   shape, without an OAuth error (`refused_grant_body`: HubSpot's `BAD_REFRESH_TOKEN`).
//!
//! One endpoint, `/oauth/token`: client credentials or password grant as the login,
//! refresh grant (form body, HTTP Basic client authentication). Every other path is the
//! API.
#![allow(dead_code, unreachable_pub)]

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst},
    },
    time::Duration,
};

use http::{Method, StatusCode};
use serde_json::{Value, json};

use super::providers::{Incoming, Provider, Reply, b64, basic_credentials, now_secs, reply};

/// A queued misbehaviour of the token endpoint.
pub enum Fault {
    /// The next token request (any grant) gets this answer; nothing is issued.
    Answer(Box<dyn Fn(&Incoming) -> Reply + Send + Sync>),
    /// The next refresh rotates (the presented refresh token is spent, a new one issued),
    /// then answers 200 with this body, made from the new refresh token.
    RotateThenBody(fn(&str) -> Value),
    /// The next refresh rotates and answers correctly, after this delay.
    RotateThenDelay(Duration),
    /// The next refresh rotates, then the answer is lost: a gateway answers this status
    /// instead (502, 503, 504), or, with `None`, the connection is closed.
    RotateThenLose(Option<StatusCode>),
}

#[derive(Default)]
struct IdpState {
    /// access token -> (exp in unix seconds, family)
    access: HashMap<String, (f64, usize)>,
    /// refresh token -> (family, spent)
    refresh: HashMap<String, (usize, bool)>,
    revoked_families: HashSet<usize>,
    faults: VecDeque<Fault>,
    next: usize,
    last_access: Option<String>,
}

pub struct StrictIdp {
    pub client_id: String,
    pub client_secret: String,
    /// Lifetime stated as `expires_in`, in seconds.
    pub ttl: Mutex<f64>,
    /// Whether the JWT's `exp` is floored to the second (`floor(now) + ttl`).
    pub floor_exp: AtomicBool,
    /// When set, `expires_in` is sent as this value instead of `ttl` (`Null`: omitted).
    pub expires_in: Mutex<Option<Value>>,
    /// When set, the JWT's `exp` claim is this value (the API still enforces `ttl`).
    pub exp_claim: Mutex<Option<Value>>,
    /// Whether the API refuses tokens past their `exp`.
    pub enforce_exp: AtomicBool,
    /// Whether the API refuses every token (a revoked grant, a wrong audience).
    pub reject_all: AtomicBool,
    /// Whether logins also issue a refresh token.
    pub issue_refresh_tokens: AtomicBool,
    /// Whether a login hands out the previous access token again instead of a new one.
    pub reissue_same_token: AtomicBool,
    /// Whether a refresh spends its refresh token and issues a new one (the default);
    /// off, as Google, Dropbox and Cognito without rotation do: the refresh token stays
    /// valid and the answer carries none.
    pub rotate: AtomicBool,
    /// The status a refused refresh grant (`invalid_grant`: reused, unknown, expired) is
    /// answered with: 400 by default (RFC 6749 §5.2); Auth0 answers 403 ("403: Unknown
    /// or invalid refresh token", support.auth0.com).
    pub refused_grant_status: Mutex<StatusCode>,
    /// When set, a refused refresh grant is answered with this body (at
    /// `refused_grant_status`) instead of an OAuth error: HubSpot answers an unknown or
    /// revoked refresh token `400 {"status": "BAD_REFRESH_TOKEN", "message": "missing or
    /// invalid refresh token"}`, with no `error` field (community.hubspot.com, "What to
    /// do when you suddenly get BAD_REFRESH_TOKEN").
    pub refused_grant_body: Mutex<Option<Value>>,
    pub token_requests: AtomicUsize,
    pub logins: AtomicUsize,
    pub refresh_grants: AtomicUsize,
    /// Refresh tokens presented after they were spent.
    pub reused_refresh_tokens: AtomicUsize,
    pub family_revocations: AtomicUsize,
    pub api_calls: AtomicUsize,
    pub api_unauthorized: AtomicUsize,
    /// Every refresh token presented, in order.
    pub presented: Mutex<Vec<String>>,
    state: Mutex<IdpState>,
}

impl StrictIdp {
    pub fn new(client_id: &str, client_secret: &str, ttl: f64) -> Arc<Self> {
        Arc::new(StrictIdp {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            ttl: Mutex::new(ttl),
            floor_exp: AtomicBool::new(true),
            expires_in: Mutex::new(None),
            exp_claim: Mutex::new(None),
            enforce_exp: AtomicBool::new(true),
            reject_all: AtomicBool::new(false),
            issue_refresh_tokens: AtomicBool::new(true),
            reissue_same_token: AtomicBool::new(false),
            rotate: AtomicBool::new(true),
            refused_grant_status: Mutex::new(StatusCode::BAD_REQUEST),
            refused_grant_body: Mutex::new(None),
            token_requests: AtomicUsize::new(0),
            logins: AtomicUsize::new(0),
            refresh_grants: AtomicUsize::new(0),
            reused_refresh_tokens: AtomicUsize::new(0),
            family_revocations: AtomicUsize::new(0),
            api_calls: AtomicUsize::new(0),
            api_unauthorized: AtomicUsize::new(0),
            presented: Mutex::default(),
            state: Mutex::default(),
        })
    }

    pub fn push_fault(&self, fault: Fault) {
        self.state.lock().unwrap().faults.push_back(fault);
    }

    /// Every access token issued so far is refused by the API from now on.
    pub fn expire_access_tokens(&self) {
        self.state
            .lock()
            .unwrap()
            .access
            .values_mut()
            .for_each(|(exp, _)| *exp = 0.0);
    }

    /// Every refresh token issued so far is past its lifetime (Auth0's absolute lifetime,
    /// Entra ID's 90 days of inactivity, Keycloak's SSO session idle): unknown to the
    /// endpoint from now on. Access tokens are untouched.
    pub fn expire_refresh_tokens(&self) {
        self.state.lock().unwrap().refresh.clear();
    }

    /// The OAuth2 error the endpoint answers with.
    fn oauth_error(status: StatusCode, code: &str, description: &str) -> Reply {
        reply(
            status,
            json!({"error": code, "error_description": description}),
        )
    }

    /// A refused refresh grant's answer: `invalid_grant` with `description`, or the
    /// body set in `refused_grant_body`.
    fn refused_grant(&self, description: &str) -> Reply {
        let status = *self.refused_grant_status.lock().unwrap();
        match self.refused_grant_body.lock().unwrap().clone() {
            Some(body) => reply(status, body),
            None => Self::oauth_error(status, "invalid_grant", description),
        }
    }

    /// Issues an access token (and a refresh token) in `family`: the token body.
    fn issue(&self, state: &mut IdpState, family: usize, with_refresh: bool) -> (Value, String) {
        state.next += 1;
        let n = state.next;
        let ttl = *self.ttl.lock().unwrap();
        let now = now_secs();
        let exp = if self.floor_exp.load(SeqCst) {
            now.floor() + ttl
        } else {
            now + ttl
        };
        let access = match (&state.last_access, self.reissue_same_token.load(SeqCst)) {
            (Some(last), true) => last.clone(),
            _ => {
                let claim = self.exp_claim.lock().unwrap().clone().unwrap_or(json!(exp));
                format!(
                    "{}.{}.c2lnbmF0dXJl",
                    b64(&json!({"alg": "RS256", "typ": "JWT"})),
                    b64(&json!({"sub": self.client_id, "jti": n, "exp": claim}))
                )
            }
        };
        state.access.insert(access.clone(), (exp, family));
        state.last_access = Some(access.clone());
        let mut body = json!({"access_token": access, "token_type": "Bearer"});
        match self.expires_in.lock().unwrap().clone() {
            None => body["expires_in"] = json!(ttl),
            Some(Value::Null) => {}
            Some(v) => body["expires_in"] = v,
        }
        let refresh = format!("rt-{family}-{n}");
        if with_refresh {
            state.refresh.insert(refresh.clone(), (family, false));
            body["refresh_token"] = json!(refresh);
        }
        (body, refresh)
    }

    fn token(&self, req: &Incoming) -> (Reply, Duration) {
        self.token_requests.fetch_add(1, SeqCst);
        let mut state = self.state.lock().unwrap();
        if let Some(Fault::Answer(_)) = state.faults.front() {
            let Some(Fault::Answer(answer)) = state.faults.pop_front() else {
                unreachable!()
            };
            return (answer(req), Duration::ZERO);
        }
        let client_ok = basic_credentials(&req.headers)
            .is_some_and(|(id, secret)| id == self.client_id && secret == self.client_secret);
        if !client_ok {
            return (
                Self::oauth_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    "Client authentication failed",
                ),
                Duration::ZERO,
            );
        }
        // RFC 6749 §3.2 (a parameter sent twice) and §2.3 (more than one way to
        // authenticate the client: Basic and body credentials both): `invalid_request`,
        // as Okta answers both ("both header and form parameters were used for
        // authentication, ... or the request contains duplicated parameters").
        if let Some(name) = super::providers::repeated_parameter(&req.body) {
            return (
                super::providers::repeated_parameter_refusal(&name),
                Duration::ZERO,
            );
        }
        let form = req.form();
        if form.contains_key("client_secret") || form.contains_key("client_assertion") {
            return (
                Self::oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "more than one client authentication method",
                ),
                Duration::ZERO,
            );
        }
        match form.get("grant_type").map(String::as_str) {
            Some("client_credentials" | "password") => {
                self.logins.fetch_add(1, SeqCst);
                state.next += 1;
                let family = state.next;
                let with_refresh = self.issue_refresh_tokens.load(SeqCst);
                let (body, _) = self.issue(&mut state, family, with_refresh);
                (reply(StatusCode::OK, body), Duration::ZERO)
            }
            Some("refresh_token") => {
                let token = form.get("refresh_token").cloned().unwrap_or_default();
                self.presented.lock().unwrap().push(token.clone());
                match state.refresh.get(&token).copied() {
                    Some((family, false)) if !state.revoked_families.contains(&family) => {
                        let rotate = self.rotate.load(SeqCst);
                        state.refresh.insert(token, (family, rotate));
                        self.refresh_grants.fetch_add(1, SeqCst);
                        let (body, new_refresh) = self.issue(&mut state, family, rotate);
                        match state.faults.front() {
                            Some(Fault::RotateThenBody(make)) => {
                                let make = *make;
                                state.faults.pop_front();
                                (reply(StatusCode::OK, make(&new_refresh)), Duration::ZERO)
                            }
                            Some(Fault::RotateThenDelay(delay)) => {
                                let delay = *delay;
                                state.faults.pop_front();
                                (reply(StatusCode::OK, body), delay)
                            }
                            Some(Fault::RotateThenLose(status)) => {
                                let status = *status;
                                state.faults.pop_front();
                                let lost = match status {
                                    Some(status) => reply(
                                        status,
                                        json!({"message": "upstream request timeout"}),
                                    ),
                                    None => super::providers::hang_up(),
                                };
                                (lost, Duration::ZERO)
                            }
                            _ => (reply(StatusCode::OK, body), Duration::ZERO),
                        }
                    }
                    Some((family, true)) => {
                        self.reused_refresh_tokens.fetch_add(1, SeqCst);
                        if state.revoked_families.insert(family) {
                            self.family_revocations.fetch_add(1, SeqCst);
                        }
                        (
                            self.refused_grant("refresh token reused; family revoked"),
                            Duration::ZERO,
                        )
                    }
                    _ => (
                        self.refused_grant("Unknown or invalid refresh token."),
                        Duration::ZERO,
                    ),
                }
            }
            _ => (
                Self::oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type", ""),
                Duration::ZERO,
            ),
        }
    }

    fn api(&self, req: &Incoming) -> Reply {
        self.api_calls.fetch_add(1, SeqCst);
        let state = self.state.lock().unwrap();
        let valid = req
            .bearer()
            .and_then(|t| state.access.get(t).copied())
            .is_some_and(|(exp, family)| {
                !self.reject_all.load(SeqCst)
                    && !state.revoked_families.contains(&family)
                    && (!self.enforce_exp.load(SeqCst) || now_secs() < exp)
            });
        if valid {
            reply(StatusCode::OK, json!({"ok": true}))
        } else {
            self.api_unauthorized.fetch_add(1, SeqCst);
            reply(
                StatusCode::UNAUTHORIZED,
                json!({"error": "invalid_token", "error_description": "The access token expired"}),
            )
        }
    }
}

impl Provider for StrictIdp {
    fn handle(&self, req: Incoming) -> Reply {
        self.handle_delayed(req).0
    }

    fn handle_delayed(&self, req: Incoming) -> (Reply, Duration) {
        if req.path == "/oauth/token" && req.method == Method::POST {
            self.token(&req)
        } else if req.path.starts_with("/oauth/") {
            // A mistyped token url: the identity provider's own 404 page.
            let mut page = reply(StatusCode::NOT_FOUND, json!(null));
            *page.body_mut() = "<html><body>Not Found</body></html>".to_owned().into();
            (page, Duration::ZERO)
        } else {
            (self.api(&req), Duration::ZERO)
        }
    }
}

/// An error answer as Microsoft Entra ID's token endpoint writes it: 400 (its default
/// status for every error document), the OAuth `error`, an `error_description` that starts
/// with the AADSTS code and carries trace lines after `\r\n`, `error_codes`, `trace_id`,
/// `correlation_id` (learn.microsoft.com, "Token Issuance Endpoint Errors",
/// previous-versions/azure/dn645548).
pub fn entra_error(error: &str, aadsts: u32, text: &str) -> Reply {
    reply(
        StatusCode::BAD_REQUEST,
        json!({
            "error": error,
            "error_description": format!(
                "AADSTS{aadsts}: {text}\r\nTrace ID: 4457d068-2a03-42b2-97f2-d55325289d86\r\nCorrelation ID: 6b3474d8-233e-463f-b0a3-86433d8ba889\r\nTimestamp: 2026-01-01 00:00:00Z"
            ),
            "error_codes": [aadsts],
            "timestamp": "2026-01-01 00:00:00Z",
            "trace_id": "4457d068-2a03-42b2-97f2-d55325289d86",
            "correlation_id": "6b3474d8-233e-463f-b0a3-86433d8ba889",
        }),
    )
}

/// A source for a `StrictIdp` served at `base`: client credentials to log in, the
/// refresh grant after (both at `/oauth/token`), through the test token client.
#[cfg(feature = "https")]
pub fn rotating_source(
    base: &str,
    client_id: &str,
    client_secret: &str,
) -> tower_client_auth::token::TokenSource {
    use tower_client_auth::token::{TokenRequest, TokenSource};
    let url = format!("{base}/oauth/token");
    TokenSource::new(
        TokenRequest::oauth2_client_credentials(&url, client_id, client_secret).unwrap(),
    )
    .refresh_with(
        TokenRequest::oauth2_refresh_token(&url, client_id, client_secret).unwrap(),
        "refresh_token",
    )
    .client(super::token_client())
}
