//! The token client against servers that answer as real ones do in the wild: a strict,
//! rotating, family-revoking server (`support::strict_idp`) whose answers to refresh
//! grants are rewritten into the shapes quirky servers and proxies send (review 69).
#![cfg(feature = "https")]

use crate::support;

use std::{
    sync::{Arc, Mutex, atomic::Ordering::SeqCst},
    time::Duration,
};

use bytes::Bytes;
use http::{StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde_json::json;
use support::{
    ApiStack, api_stack, api_status,
    providers::{self, Provider, Reply},
    strict_idp::{Fault, StrictIdp, entra_error},
};
use tower_client_auth::{
    CredentialCache, Error,
    token::{TokenError, TokenSource},
};

const CLIENT_ID: &str = "quirks-client";
const CLIENT_SECRET: &str = "quirks-5ecr3t";

/// How a refresh answer is rewritten on its way out: from the strict server's own
/// answer (status, headers) and body.
type Mangle = fn(http::response::Parts, Bytes) -> Reply;

/// An answer given in the strict server's stead.
type Answer = fn() -> Reply;

/// The strict server, with the answers to refresh grants rewritten while `mangle` holds
/// a rewrite (`once`: only the next one), or, while `refuse` holds an answer, refresh
/// grants answered with it and never shown to the strict server (nothing spent).
#[derive(Clone)]
struct Mangler {
    mangle: Arc<Mutex<Option<(Mangle, bool)>>>,
    refuse: Arc<Mutex<Option<Answer>>>,
}

impl Mangler {
    fn next(&self, mangle: Mangle) {
        *self.mangle.lock().unwrap() = Some((mangle, true));
    }
    /// Every refresh answer rewritten with `mangle` from now on.
    fn always(&self, mangle: Mangle) {
        *self.mangle.lock().unwrap() = Some((mangle, false));
    }
    fn refuse(&self, answer: Answer) {
        *self.refuse.lock().unwrap() = Some(answer);
    }
}

async fn start_mangled(idp: Arc<StrictIdp>) -> (String, Mangler) {
    let mangler = Mangler {
        mangle: Arc::default(),
        refuse: Arc::default(),
    };
    let m = mangler.clone();
    let addr = providers::serve(move |req| {
        let (idp, m) = (idp.clone(), m.clone());
        async move {
            let req = providers::read(req).await;
            let refresh = req.path == "/oauth/token"
                && req.form().get("grant_type").map(String::as_str) == Some("refresh_token");
            if refresh && let Some(answer) = *m.refuse.lock().unwrap() {
                idp.presented
                    .lock()
                    .unwrap()
                    .push(req.form().get("refresh_token").cloned().unwrap_or_default());
                return answer();
            }
            let (reply, _) = idp.handle_delayed(req);
            let mangle = if refresh {
                let mut slot = m.mangle.lock().unwrap();
                match *slot {
                    Some((f, true)) => {
                        *slot = None;
                        Some(f)
                    }
                    Some((f, false)) => Some(f),
                    None => None,
                }
            } else {
                None
            };
            match mangle {
                None => reply,
                Some(f) => {
                    let (parts, body) = reply.into_parts();
                    f(parts, body.collect().await.unwrap().to_bytes())
                }
            }
        }
    })
    .await;
    (format!("http://{addr}"), mangler)
}

fn source(base: &str) -> TokenSource {
    support::strict_idp::rotating_source(base, CLIENT_ID, CLIENT_SECRET)
}

/// A logged-in session against the mangled server whose access token the server has
/// just expired, so the next request's 401 makes the source refresh.
async fn expired_session(
    idp: &Arc<StrictIdp>,
) -> (
    ApiStack<TokenSource>,
    CredentialCache<TokenSource>,
    String,
    Mangler,
) {
    let (base, mangler) = start_mangled(idp.clone()).await;
    let cache = CredentialCache::builder(source(&base))
        .backoff(Duration::from_millis(10), Duration::from_millis(10))
        .build()
        .unwrap();
    let svc = api_stack(cache.clone());
    let url = format!("{base}/v1/things");
    assert_eq!(api_status(&svc, &url).await.unwrap(), 200);
    idp.expire_access_tokens();
    (svc, cache, url, mangler)
}

fn reply_with(parts: &http::response::Parts, content_type: &str, body: Vec<u8>) -> Reply {
    let mut reply = http::Response::builder()
        .status(parts.status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    *reply.status_mut() = parts.status;
    reply
}

/// World: a rotating, family-revoking server (RFC 6819 §5.2.2.3, OAuth 2.1 §4.3.1) that
/// acts on a refresh (spends the presented refresh token, issues a new pair) and answers
/// `200 OK` with a body this client cannot read: the token JSON after a UTF-8 BOM (as
/// .NET and some Java stacks write it), the token JSON followed by a PHP notice, and a
/// `Content-Encoding: gzip` body a proxy compressed although nobody asked.
/// Proves (review 69): "a refresh that left and got no answer that says what became of it
/// ... may have rotated, so that refresh token is dropped, never presented again"
/// (README, refresh tokens). A 2xx says the server acted; the old refresh token must never
/// be presented again (0 reuse, 0 family revocations).
#[tokio::test]
async fn a_2xx_refresh_answer_that_cannot_be_read_never_leads_to_reuse() {
    let cases: Vec<(&str, Mangle)> = vec![
        ("utf-8 bom", |parts, body| {
            let mut bytes = "\u{feff}".as_bytes().to_vec();
            bytes.extend_from_slice(&body);
            reply_with(&parts, "application/json; charset=utf-8", bytes)
        }),
        ("php notice after the json", |parts, body| {
            let mut bytes = body.to_vec();
            bytes.extend_from_slice(
                b"\n<br />\n<b>Notice</b>:  Undefined index: scope in <b>/var/www/token.php</b>",
            );
            reply_with(&parts, "application/json", bytes)
        }),
        ("gzip nobody asked for", |parts, body| {
            // Not real deflate data: the client decodes no content coding either way.
            let mut bytes = vec![0x1f, 0x8b, 0x08, 0x00, 0, 0, 0, 0, 0x00, 0x03];
            bytes.extend(body.iter().map(|b| b ^ 0x5a));
            let mut reply = reply_with(&parts, "application/json", bytes);
            reply
                .headers_mut()
                .insert(header::CONTENT_ENCODING, "gzip".parse().unwrap());
            reply
        }),
    ];
    never_reused_after(cases).await;
}

/// The strict server's JSON token answer written as a form body, `refresh_token` first.
fn as_form_refresh_first(body: &Bytes) -> String {
    let doc: serde_json::Value = serde_json::from_slice(body).unwrap();
    let obj = doc.as_object().unwrap();
    let mut form = form_urlencoded::Serializer::new(String::new());
    if let Some(rt) = obj.get("refresh_token").and_then(|v| v.as_str()) {
        form.append_pair("refresh_token", rt);
    }
    for (k, v) in obj {
        if k == "refresh_token" {
            continue;
        }
        let v = match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        form.append_pair(k, &v);
    }
    form.finish()
}

/// World: a rotating, family-revoking server that acts on a refresh (spends the presented
/// refresh token, issues a new pair) and answers `200 OK` in shapes real stacks write
/// but this client reads nothing (or not the refresh token) from: (a) a form body
/// (`application/x-www-form-urlencoded`, as GitHub-style servers answer) after a UTF-8
/// BOM, the stack that writes a BOM before JSON writing it before a form too, with
/// `refresh_token` as its first field; (b) the token JSON labelled as a form body;
/// (c) the token JSON serialised twice (a gateway that stringifies an already
/// serialised body: a JSON string holding the document).
/// Proves (review 71; README, refresh tokens: "a refresh that left and got no answer that says what
/// became of it ... may have rotated, so that refresh token is dropped, never presented
/// again"; 6c9b0be: "a 2xx answer nothing can be read from drops its refresh token"):
/// after such an answer the old refresh token is never presented again (0 reuse, 0
/// family revocations) over the next two refreshes.
#[tokio::test]
async fn a_2xx_refresh_answer_whose_refresh_token_cannot_be_read_never_leads_to_reuse() {
    let cases: Vec<(&str, Mangle)> = vec![
        (
            "bom before a form body, refresh_token first",
            |parts, body| {
                let mut bytes = "\u{feff}".as_bytes().to_vec();
                bytes.extend_from_slice(as_form_refresh_first(&body).as_bytes());
                reply_with(&parts, "application/x-www-form-urlencoded", bytes)
            },
        ),
        ("json labelled as a form body", |parts, body| {
            reply_with(&parts, "application/x-www-form-urlencoded", body.to_vec())
        }),
        ("json serialised twice", |parts, body| {
            let text = String::from_utf8(body.to_vec()).unwrap();
            let twice = serde_json::to_vec(&serde_json::Value::String(text)).unwrap();
            reply_with(&parts, "application/json", twice)
        }),
    ];
    never_reused_after(cases).await;
}

/// World: a refresh refused with status 200 and an OAuth error body in a shape other
/// than a bare JSON object: form-encoded (`error=invalid_grant&error_description=...`,
/// as a server that answers form bodies writes it: GitHub's token endpoint answers form
/// bodies by default, errors included, with status 200), and JSON with every field of
/// the server's response type serialised, the absent ones as `null` (Jackson's and
/// System.Text.Json's default). The refused refresh token stays refused; logins work.
/// Proves (review 69): README "Responses are parsed tolerantly (... form bodies); RFC
/// 6749 §5.2 errors become `TokenError`s with the status and the `error` code ..., also
/// when a server sends them with status 200" and "A full login only when the refresh
/// itself is refused (400/401, or an OAuth error in a 200)": the source falls back to a
/// login and the request succeeds, as for the same error as a bare JSON object
/// (`edges::a_200_carrying_an_oauth_error_is_that_error`).
#[tokio::test]
async fn a_200_oauth_error_in_another_shape_is_that_error() {
    let shapes: Vec<(&str, Answer)> = vec![
        ("form-encoded", || {
            http::Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded; charset=utf-8")
                .body(Full::new(Bytes::from_static(
                    b"error=invalid_grant&error_description=The+refresh+token+is+invalid&error_uri=https%3A%2F%2Fidp.example%2Fdocs",
                )))
                .unwrap()
        }),
        ("json with nulls", || {
            providers::reply(
                StatusCode::OK,
                json!({"access_token": null, "token_type": null, "expires_in": null,
                       "refresh_token": null, "error": "invalid_grant",
                       "error_description": "The refresh token is invalid"}),
            )
        }),
    ];
    let mut broken = Vec::new();
    for (what, answer) in shapes {
        tokio::time::timeout(Duration::from_secs(30), async {
            let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
            let (svc, cache, url, mangler) = expired_session(&idp).await;
            mangler.refuse(answer);
            let mut outcomes = Vec::new();
            for _ in 0..3 {
                outcomes.push(api_status(&svc, &url).await.map_err(|e| e.to_string()));
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            let line = format!(
                "{what}: outcomes {outcomes:?}; logins {}; refresh token presented {} times; stats {:?}",
                idp.logins.load(SeqCst),
                idp.presented.lock().unwrap().len(),
                cache.source().stats()
            );
            println!("{line}");
            if outcomes[0] != Ok(StatusCode::OK) || idp.logins.load(SeqCst) != 2 {
                broken.push(line);
            }
        })
        .await
        .expect("the scenario hung");
    }
    assert!(
        broken.is_empty(),
        "a refused refresh did not fall back to a login:\n{}",
        broken.join("\n")
    );
}

/// World: the token endpoint answers the refresh `503 Service Unavailable` with
/// `Retry-After: 60` (the server is overloaded and says when to come back; Entra ID and
/// Okta send it with 503/429). Logins would work.
/// Proves (review 69): README "A token endpoint's `Retry-After` (429, 503; seconds or an
/// HTTP date) is the earliest next token request, capped at `cache::MAX_RETRY_AFTER`
/// (5 min)": no other token request (the fallback login included) reaches the endpoint
/// within the next seconds.
#[tokio::test]
async fn a_503_retry_after_on_a_refresh_holds_back_the_fallback_login() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
        let (svc, cache, url, mangler) = expired_session(&idp).await;
        let requests_before = idp.token_requests.load(SeqCst);
        mangler.refuse(|| {
            let mut reply = providers::reply(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "temporarily_unavailable", "error_description": "try later"}),
            );
            reply
                .headers_mut()
                .insert(header::RETRY_AFTER, "60".parse().unwrap());
            reply
        });
        let first = api_status(&svc, &url).await.map_err(|e| e.to_string());
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The refresh itself is answered by the mangler (not counted by the server).
        let presented = idp.presented.lock().unwrap().len();
        let logins_after = idp.logins.load(SeqCst);
        let requests_after = idp.token_requests.load(SeqCst) - requests_before;
        println!(
            "first call {first:?}; refreshes presented {presented}; token requests the server saw after the 503 {requests_after}; logins {logins_after}; stats {:?}",
            cache.source().stats()
        );
        assert_eq!(presented, 1);
        assert_eq!(
            requests_after, 0,
            "a token request (the fallback login) reached the endpoint right after it asked for 60 s: first call {first:?}"
        );
    })
    .await
    .expect("the scenario hung");
}

/// World: a token endpoint that no longer honours a refresh token (past its lifetime,
/// dropped by a per-user limit, reused outside a rotation overlap), answering a refresh
/// with `invalid_grant` at the status its vendor documents: Auth0 with `403 Forbidden`
/// and "Unknown or invalid refresh token." (support.auth0.com, "Troubleshoot Refresh
/// Token Unknown or Invalid Before Expiry"), Keycloak ("Token is not active") and
/// Microsoft Entra (AADSTS700082) with 400. Logins still work.
/// Proves (review 82: the 403 kept the dead token, presented at every backoff step):
/// README "A full login only when the refresh itself is refused" holds at either
/// status: the request after the refusal succeeds through one fallback login, and the
/// dead refresh token is presented once.
#[tokio::test]
async fn an_expired_refresh_token_refused_with_400_or_403_falls_back_to_one_login() {
    for status in [StatusCode::FORBIDDEN, StatusCode::BAD_REQUEST] {
        tokio::time::timeout(Duration::from_secs(30), async {
            let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
            *idp.refused_grant_status.lock().unwrap() = status;
            let (svc, cache, url, _mangler) = expired_session(&idp).await;
            idp.expire_refresh_tokens();
            let mut outcomes = Vec::new();
            for _ in 0..5 {
                outcomes.push(api_status(&svc, &url).await.map_err(|e| e.to_string()));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let presented = idp.presented.lock().unwrap().clone();
            let line = format!(
                "{status}: outcomes {outcomes:?}; logins {}; refresh tokens presented {presented:?}; stats {:?}",
                idp.logins.load(SeqCst),
                cache.source().stats()
            );
            println!("{line}");
            assert_eq!(
                (
                    outcomes[0].clone(),
                    idp.logins.load(SeqCst),
                    presented.len()
                ),
                (Ok(StatusCode::OK), 2, 1),
                "a refresh refused with invalid_grant did not fall back to a login: {line}"
            );
        })
        .await
        .expect("the scenario hung");
    }
}

/// World: Microsoft Entra ID's token endpoint, too busy for a moment: it answers the
/// refresh with its default error status, 400, and `temporarily_unavailable` ("The server
/// is temporarily too busy to handle the request", client action "Retry the request":
/// learn.microsoft.com, "Token Issuance Endpoint Errors"), in its usual shape
/// (`AADSTS...` description, `error_codes`, trace ids). The refresh token was not acted
/// on; the next attempt, after the backoff, is answered.
/// Proves (review 82): README "keeps its refresh token for the next attempt, as does one
/// throttled (429) or refused as a request without a judgement on the grant": the same
/// refresh token is presented again once the server is back, with no login beside it;
/// and the error a user sees is not `is_permanent()` (README, Errors: "retrying will not
/// help" is for a bad client or grant).
#[tokio::test]
async fn a_400_temporarily_unavailable_keeps_the_refresh_token_and_is_not_permanent() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
        let (svc, cache, url, _mangler) = expired_session(&idp).await;
        let busy = || {
            Fault::Answer(Box::new(|_: &providers::Incoming| {
                entra_error(
                    "temporarily_unavailable",
                    90033,
                    "A transient error has occurred. Please try again.",
                )
            }))
        };
        idp.push_fault(busy());
        let first = api_status(&svc, &url).await.map_err(|e| e.to_string());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let second = api_status(&svc, &url).await.map_err(|e| e.to_string());
        let line = format!(
            "calls {first:?} {second:?}; logins {}; refresh grants {}; refresh tokens presented {:?}; stats {:?}",
            idp.logins.load(SeqCst),
            idp.refresh_grants.load(SeqCst),
            idp.presented.lock().unwrap(),
            cache.source().stats()
        );
        println!("{line}");

        // The typed error, as a user of the cache sees it when the login is answered so.
        idp.push_fault(busy());
        let err = CredentialCache::new(source(&providers_base(&url)))
            .credential()
            .await
            .unwrap_err();
        let token = token_error(&err);
        println!(
            "login answered 400 temporarily_unavailable: {err}; token error {token}; description {:?}; is_permanent {}; is_grant_rejected {}",
            token.description(),
            token.is_permanent(),
            token.is_grant_rejected()
        );
        let mut broken = Vec::new();
        if (idp.logins.load(SeqCst), idp.refresh_grants.load(SeqCst)) != (1, 1) {
            broken.push(format!(
                "the refresh token was dropped for a login instead of being presented again: {line}"
            ));
        }
        if token.is_permanent() || err.is_permanent() || token.is_grant_rejected() {
            broken.push(format!("a busy server's error is called permanent: {err}"));
        }
        assert!(broken.is_empty(), "{}", broken.join("\n"));
    })
    .await
    .expect("the scenario hung");
}

/// World: Microsoft Entra ID refusing the client secret (`400 invalid_client`,
/// AADSTS7000215), its `error_description` carrying `\r\n` before the trace lines as every
/// Entra error document does (learn.microsoft.com, "Token Issuance Endpoint Errors").
/// Proves (review 82): README "Errors": the line an app logs (`{e}` of the crate's
/// error) shows the server's text escaped once, as the `TokenError` under it shows it
/// (`\r\n`), not escaped a second time (`\\r\\n`).
#[tokio::test]
async fn server_text_is_escaped_once_in_the_crate_error() {
    let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
    let base = providers::start(idp.clone()).await;
    idp.push_fault(Fault::Answer(Box::new(|_: &providers::Incoming| {
        entra_error("invalid_client", 7000215, "Invalid client secret provided.")
    })));
    let err = CredentialCache::new(source(&base))
        .credential()
        .await
        .unwrap_err();
    let token = token_error(&err).to_string();
    let shown = err.to_string();
    println!("crate error: {shown}\ntoken error: {token}");
    assert!(
        token.contains(r"provided.\r\nTrace ID"),
        "the token error escapes once: {token}"
    );
    assert!(
        shown.contains(r"provided.\r\nTrace ID"),
        "the crate error escaped the server's text twice: {shown}"
    );
}

/// `http://127.0.0.1:PORT` of an API url on the mangled server.
fn providers_base(url: &str) -> String {
    url.trim_end_matches("/v1/things").to_owned()
}

/// The token error under a crate error.
fn token_error(err: &Error) -> &TokenError {
    err.get_ref()
        .and_then(|s| s.downcast_ref::<TokenError>())
        .unwrap_or_else(|| panic!("no token error under {err:?}"))
}

/// Three calls through `svc`, the server expiring its access tokens after each, so that
/// each call after the first refreshes: their outcomes.
async fn refreshing_calls(
    idp: &StrictIdp,
    svc: &ApiStack<TokenSource>,
    url: &str,
) -> Vec<Result<StatusCode, String>> {
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        outcomes.push(api_status(svc, url).await.map_err(|e| e.to_string()));
        tokio::time::sleep(Duration::from_millis(30)).await;
        idp.expire_access_tokens();
    }
    outcomes
}

/// Each of `cases` (a refresh answer rewritten) against a fresh strict server, the
/// session's access token expired three times: the refresh token that answer spent is
/// never presented again (no reuse, no family revoked).
async fn never_reused_after(cases: Vec<(&str, Mangle)>) {
    let mut broken = Vec::new();
    for (what, mangle) in cases {
        let run = async {
            let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
            let (svc, cache, url, mangler) = expired_session(&idp).await;
            mangler.next(mangle);
            let calls = refreshing_calls(&idp, &svc, &url).await;
            let reused = idp.reused_refresh_tokens.load(SeqCst);
            let revoked = idp.family_revocations.load(SeqCst);
            let presented = idp.presented.lock().unwrap().clone();
            let line = format!(
                "{what}: calls {calls:?}, refresh tokens presented {presented:?}, reused {reused}, families revoked {revoked}, logins {}, stats {:?}",
                idp.logins.load(SeqCst),
                cache.source().stats()
            );
            println!("{line}");
            if reused != 0 || revoked != 0 {
                broken.push(line);
            }
        };
        tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("the scenario hung");
    }
    assert!(
        broken.is_empty(),
        "the spent refresh token was presented again:\n{}",
        broken.join("\n")
    );
}

/// World: a rotating, family-revoking server whose refresh answers are form bodies
/// (`application/x-www-form-urlencoded`: GitHub's token endpoint answers so unless asked
/// for JSON, its refresh tokens rotating: docs.github.com, "Refreshing user access
/// tokens"), every field a string. Three refreshes in a row.
/// Proves (review 82's suggestion): the new refresh token is read from the form each
/// time and presented next, never the spent one: three distinct refresh tokens
/// presented, no reuse, no family revoked, no login but the first.
#[tokio::test]
async fn a_rotating_refresh_answered_as_a_form_is_followed() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
        let (svc, cache, url, mangler) = expired_session(&idp).await;
        mangler.always(|parts, body| {
            let form = as_form_refresh_first(&body).into_bytes();
            reply_with(&parts, "application/x-www-form-urlencoded; charset=utf-8", form)
        });
        let outcomes = refreshing_calls(&idp, &svc, &url).await;
        let presented = idp.presented.lock().unwrap().clone();
        let line = format!(
            "outcomes {outcomes:?}; refresh tokens presented {presented:?}; reused {}; families revoked {}; logins {}; stats {:?}",
            idp.reused_refresh_tokens.load(SeqCst),
            idp.family_revocations.load(SeqCst),
            idp.logins.load(SeqCst),
            cache.source().stats()
        );
        println!("{line}");
        let distinct: std::collections::HashSet<_> = presented.iter().collect();
        assert!(outcomes.iter().all(|o| *o == Ok(StatusCode::OK)), "{line}");
        assert_eq!((presented.len(), distinct.len()), (3, 3), "{line}");
        assert_eq!(idp.reused_refresh_tokens.load(SeqCst), 0, "{line}");
        assert_eq!(idp.logins.load(SeqCst), 1, "{line}");
    })
    .await
    .expect("the scenario hung");
}

/// A gateway's or framework's own 403 or 429 in front of the token endpoint, each a JSON
/// body with an `error` field that is no OAuth error code: Spring Boot's default error
/// document (`{"timestamp", "status": 403, "error": "Forbidden", "path"}`, what a
/// Spring-based gateway's IP filter or CSRF check answers), a WAF's JSON block page, and a
/// throttling proxy's 429.
fn gateway_refusals() -> Vec<(&'static str, Answer)> {
    vec![
        ("403 Spring default error", || {
            providers::reply(
                StatusCode::FORBIDDEN,
                json!({
                    "timestamp": "2026-01-01T00:00:00.000+00:00",
                    "status": 403,
                    "error": "Forbidden",
                    "path": "/oauth/token"
                }),
            )
        }),
        ("403 WAF block page", || {
            providers::reply(
                StatusCode::FORBIDDEN,
                json!({"error": "request_blocked", "message": "Request blocked by WAF rule 942100", "ray_id": "8f1e"}),
            )
        }),
        ("429 with an OAuth-looking error", || {
            providers::reply(
                StatusCode::TOO_MANY_REQUESTS,
                json!({"error": "invalid_request", "error_description": "rate limit"}),
            )
        }),
    ]
}

/// World: the token endpoint behind a gateway that refuses one refresh with its own
/// 403 (or 429) and a JSON body whose `error` field is the gateway's, not the token
/// server's (see `gateway_refusals`); the next refresh gets through. Proves:
/// 77627fb's "A 403 with an OAuth error is a refused grant now (one without may be a
/// gateway's: kept)", and README "keeps its refresh token for the next attempt, as does
/// one throttled (429) or refused as a request without a judgement on the grant". Probe:
/// the refresh token the token server never saw is presented again (no login beside
/// it), and the error is not `is_grant_rejected()`.
#[tokio::test]
async fn a_gateways_own_403_with_an_error_field_keeps_the_refresh_token() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut broken = Vec::new();
        for (what, answer) in gateway_refusals() {
            let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
            let (svc, cache, url, _mangler) = expired_session(&idp).await;
            idp.push_fault(Fault::Answer(Box::new(move |_: &providers::Incoming| answer())));
            let first = api_status(&svc, &url).await.map_err(|e| e.to_string());
            tokio::time::sleep(Duration::from_millis(50)).await;
            let second = api_status(&svc, &url).await.map_err(|e| e.to_string());
            let line = format!(
                "{what}: calls {first:?} {second:?}; logins {}; refresh grants {}; presented {:?}; stats {:?}",
                idp.logins.load(SeqCst),
                idp.refresh_grants.load(SeqCst),
                idp.presented.lock().unwrap(),
                cache.source().stats()
            );
            println!("{line}");
            if (idp.logins.load(SeqCst), idp.refresh_grants.load(SeqCst)) != (1, 1) {
                broken.push(format!(
                    "the refresh token was dropped for a login on a gateway's answer: {line}"
                ));
            }
            // The typed error, when a login is answered so.
            idp.push_fault(Fault::Answer(Box::new(move |_: &providers::Incoming| answer())));
            let err = CredentialCache::new(source(&providers_base(&url)))
                .credential()
                .await
                .unwrap_err();
            let token = token_error(&err);
            println!(
                "{what}: {err}; oauth_error {:?}; is_grant_rejected {}; is_permanent {}",
                token.oauth_error(),
                token.is_grant_rejected(),
                token.is_permanent()
            );
            if token.is_grant_rejected() {
                broken.push(format!("{what}: a gateway's answer is a refused grant: {err}"));
            }
        }
        assert!(broken.is_empty(), "{}", broken.join("\n"));
    })
    .await
    .expect("the scenario hung");
}

/// Refusals of a refresh that say nothing of its refresh token: a load balancer's own
/// 400 page (AWS ALB's HTML, the token server never saw the request), an API gateway's
/// own 401 (`{"message": "Unauthorized"}`, AWS API Gateway's authorizer), the client's
/// credentials refused (`401 invalid_client`, RFC 6749 §5.2; Entra's `400
/// invalid_client`, AADSTS7000215, a secret rotated on one side first), and, found by
/// review 85, the same or "slow down" in vendors' own words: Keycloak's `401
/// {"error": "unauthorized_client", "error_description": "Invalid client or Invalid
/// client credentials"}` (keycloak/keycloak#16923), Auth0's `401 {"error":
/// "access_denied", "error_description": "Unauthorized"}` for a wrong client secret
/// (auth0/laravel-auth0#42), GitHub's `200 {"error": "incorrect_client_credentials"}`
/// (docs.github.com, "Troubleshooting OAuth app access token request errors"), and Zoho's
/// token throttle, status 200 with "Access Denied" (help.zoho.com, Kaizen #43).
fn unjudged_refusals() -> Vec<(&'static str, Answer)> {
    vec![
        ("400 load balancer page", || {
            let mut page = providers::reply(StatusCode::BAD_REQUEST, json!(null));
            *page.body_mut() = "<html><head><title>400 Bad Request</title></head><body><center><h1>400 Bad Request</h1></center></body></html>".to_owned().into();
            page.headers_mut()
                .insert(header::CONTENT_TYPE, "text/html".parse().unwrap());
            page
        }),
        ("401 API gateway message", || {
            providers::reply(StatusCode::UNAUTHORIZED, json!({"message": "Unauthorized"}))
        }),
        ("401 invalid_client", || {
            providers::reply(
                StatusCode::UNAUTHORIZED,
                json!({"error": "invalid_client", "error_description": "Client authentication failed"}),
            )
        }),
        ("400 invalid_client, Entra", || {
            entra_error("invalid_client", 7000215, "Invalid client secret provided.")
        }),
        ("401 unauthorized_client, Keycloak", || {
            providers::reply(
                StatusCode::UNAUTHORIZED,
                json!({"error": "unauthorized_client", "error_description": "Invalid client or Invalid client credentials"}),
            )
        }),
        ("401 access_denied, Auth0 wrong secret", || {
            providers::reply(
                StatusCode::UNAUTHORIZED,
                json!({"error": "access_denied", "error_description": "Unauthorized"}),
            )
        }),
        ("200 incorrect_client_credentials, GitHub", || {
            providers::reply(
                StatusCode::OK,
                json!({"error": "incorrect_client_credentials", "error_description": "The client_id and/or client_secret passed are incorrect."}),
            )
        }),
        ("200 Access Denied, Zoho throttle", || {
            providers::reply(
                StatusCode::OK,
                json!({"error_description": "You have made too many requests continuously. Please try again after some time.", "error": "Access Denied", "status": "failure"}),
            )
        }),
    ]
}

/// Refusals in words that judge the refresh token itself: RFC 6749's `400 invalid_grant`,
/// GitHub's `200 {"error": "bad_refresh_token"}` (docs.github.com, "Refreshing user
/// access tokens") and Slack's `200 {"ok": false, "error": "invalid_refresh_token"}`
/// (api.slack.com, `tooling.tokens.rotate`).
fn judged_refusals() -> Vec<(&'static str, Answer)> {
    vec![
        ("400 invalid_grant", || {
            providers::reply(
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid_grant", "error_description": "Token is not active"}),
            )
        }),
        ("200 bad_refresh_token, GitHub", || {
            providers::reply(
                StatusCode::OK,
                json!({"error": "bad_refresh_token", "error_description": "The refresh token passed is incorrect or expired."}),
            )
        }),
        ("200 invalid_refresh_token, Slack", || {
            providers::reply(
                StatusCode::OK,
                json!({"ok": false, "error": "invalid_refresh_token"}),
            )
        }),
    ]
}

/// World: a refresh answered by something that did not judge the refresh token (see
/// `unjudged_refusals`), and the login that follows it answered the same way (the gateway
/// or the client's secret refuses every token request for a while); then the token
/// server is reachable again.
/// Proves: README "never a lost refresh token": a refusal without a judgement on the
/// refresh token falls back to a login, and while no login replaces it the refresh
/// token is kept and presented again, with no login beside it (review 84 saw every
/// 400/401 drop it: with a refresh-only grant, a user sent back to consent). The
/// control: a refusal in words that judge the refresh token itself (`judged_refusals`)
/// drops it though the login fails too, and the next fetch logs in (README: "Only a
/// refusal in words that judge the refresh token itself ... drops it outright").
#[tokio::test]
async fn a_refresh_refused_without_a_judgement_on_its_token_keeps_it_until_a_login_replaces_it() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut broken = Vec::new();
        let unjudged = unjudged_refusals().into_iter().map(|(w, a)| (w, a, true));
        let judged = judged_refusals().into_iter().map(|(w, a)| (w, a, false));
        for (what, answer, kept) in unjudged.chain(judged) {
            let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
            let (svc, cache, url, _mangler) = expired_session(&idp).await;
            for _ in 0..2 {
                idp.push_fault(Fault::Answer(Box::new(move |_: &providers::Incoming| answer())));
            }
            let first = api_status(&svc, &url).await.map_err(|e| e.to_string());
            tokio::time::sleep(Duration::from_millis(50)).await;
            let second = api_status(&svc, &url).await.map_err(|e| e.to_string());
            let line = format!(
                "{what}: calls {first:?} {second:?}; token requests {}; logins {}; refresh grants {}; presented {:?}; stats {:?}",
                idp.token_requests.load(SeqCst),
                idp.logins.load(SeqCst),
                idp.refresh_grants.load(SeqCst),
                idp.presented.lock().unwrap(),
                cache.source().stats()
            );
            println!("{line}");
            if idp.token_requests.load(SeqCst) != 4 {
                broken.push(format!("no login was tried after the refusal: {line}"));
            }
            let expected = if kept { (1, 1) } else { (2, 0) };
            if (idp.logins.load(SeqCst), idp.refresh_grants.load(SeqCst)) != expected
                || second != Ok(StatusCode::OK)
            {
                let what = if kept { "not kept" } else { "kept though judged" };
                broken.push(format!("the refresh token was {what}: {line}"));
            }
        }
        assert!(broken.is_empty(), "{}", broken.join("\n"));
    })
    .await
    .expect("the scenario hung");
}

/// World: HubSpot, whose token endpoint answers a revoked or unknown refresh token
/// `400 {"status": "BAD_REFRESH_TOKEN", "message": "missing or invalid refresh
/// token"}`, no OAuth `error` field (`StrictIdp::refused_grant_body`), every time it is
/// presented; the login works.
/// Proves: a refusal without an OAuth error still falls back to a login at once (the
/// call it was made for succeeds), and the login's refresh token replaces the dead one,
/// which is never presented again.
#[tokio::test]
async fn a_dead_refresh_token_refused_in_a_servers_own_words_is_replaced_by_a_login() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
        *idp.refused_grant_body.lock().unwrap() = Some(json!({
            "status": "BAD_REFRESH_TOKEN",
            "message": "missing or invalid refresh token"
        }));
        let (svc, cache, url, _mangler) = expired_session(&idp).await;
        let dead = idp.presented.lock().unwrap().len();
        idp.expire_refresh_tokens();
        let outcomes = refreshing_calls(&idp, &svc, &url).await;
        let presented = idp.presented.lock().unwrap().clone();
        let line = format!(
            "outcomes {outcomes:?}; logins {}; refresh grants {}; refresh tokens presented {presented:?}; stats {:?}",
            idp.logins.load(SeqCst),
            idp.refresh_grants.load(SeqCst),
            cache.source().stats()
        );
        println!("{line}");
        assert!(
            outcomes.iter().all(|o| *o == Ok(StatusCode::OK)),
            "a call failed: {line}"
        );
        assert_eq!(
            (dead, idp.logins.load(SeqCst), idp.refresh_grants.load(SeqCst)),
            (0, 2, 2),
            "the dead refresh token was not replaced by one login: {line}"
        );
        assert_eq!(
            presented.iter().filter(|t| *t == &presented[0]).count(),
            1,
            "the dead refresh token was presented again: {line}"
        );
    })
    .await
    .expect("the scenario hung");
}

/// World: a token endpoint whose `error_description` names a URL with credentials and a
/// query (an IdP echoing the upstream it failed to reach, `https://svc:pw@...?sig=...`).
/// Proves: README "Errors" ("never userinfo, a query or a secret") and
/// `text::foreign`'s rule (URL credentials and queries removed from text that is
/// logged), which the crate `Error` applies (`text::ours`); the `TokenError` under it is
/// what the source logs itself (`tracing::info!(error = %e, ..)` on a refused refresh).
/// Probe: neither `Display` shows the password or the query.
#[tokio::test]
async fn url_credentials_in_a_description_stay_out_of_both_displays() {
    let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
    let base = providers::start(idp.clone()).await;
    idp.push_fault(Fault::Answer(Box::new(|_: &providers::Incoming| {
        providers::reply(
            StatusCode::BAD_REQUEST,
            json!({
                "error": "invalid_client",
                "error_description": "upstream https://svc:hunter2@vault.internal/v1/creds?sig=S3CR3TSIG refused"
            }),
        )
    })));
    let err = CredentialCache::new(source(&base))
        .credential()
        .await
        .unwrap_err();
    let token = token_error(&err).to_string();
    let shown = err.to_string();
    println!("Error: {shown}\nTokenError: {token}");
    for (what, text) in [("Error", &shown), ("TokenError", &token)] {
        assert!(
            !text.contains("hunter2") && !text.contains("S3CR3TSIG"),
            "{what}'s Display shows URL credentials or a query: {text}"
        );
    }
}

/// World: a server that does not rotate refresh tokens (Google, Dropbox, Cognito without
/// rotation): a refresh answers a new access token and no refresh token, and the one
/// presented stays valid. Three refreshes in a row.
/// Proves (review 82's suggestion): README "the newest always replaces the old (kept if
/// the server sends none)": the same refresh token is presented each time and honoured,
/// no login but the first.
#[tokio::test]
async fn a_refresh_answer_without_a_refresh_token_keeps_the_one_presented() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
        idp.rotate.store(false, SeqCst);
        let (svc, cache, url, _mangler) = expired_session(&idp).await;
        let outcomes = refreshing_calls(&idp, &svc, &url).await;
        let presented = idp.presented.lock().unwrap().clone();
        let line = format!(
            "outcomes {outcomes:?}; refresh tokens presented {presented:?}; logins {}; refresh grants {}; stats {:?}",
            idp.logins.load(SeqCst),
            idp.refresh_grants.load(SeqCst),
            cache.source().stats()
        );
        println!("{line}");
        assert!(outcomes.iter().all(|o| *o == Ok(StatusCode::OK)), "{line}");
        assert_eq!(presented.len(), 3, "{line}");
        assert!(presented.iter().all(|t| *t == presented[0]), "{line}");
        assert_eq!(
            (idp.logins.load(SeqCst), idp.refresh_grants.load(SeqCst)),
            (1, 3),
            "{line}"
        );
    })
    .await
    .expect("the scenario hung");
}

/// World: a token endpoint whose `error_description` names a URL carrying a secret in
/// shapes `strip_url_secrets` does not cut: a password with a `/` in it (an AWS secret
/// key or base64 secret pasted into a URL unencoded), a password with a `#`, and a
/// token in the fragment (an implicit-flow callback `#access_token=...`). Promise
/// probed: README "Errors" ("never userinfo, a query or a secret") and 9ce36e1's "server
/// text loses them at the source now". Probe: neither `Display` shows the secret.
#[tokio::test]
async fn url_secrets_of_other_shapes_stay_out_of_both_displays() {
    let mut broken = Vec::new();
    for (secret, description) in [
        (
            "wJalrXUtnFEMI/K7MDENG",
            "upstream https://AKIAEXAMPLE:wJalrXUtnFEMI/K7MDENG@s3.internal/bucket refused",
        ),
        (
            "p4ss#w0rd",
            "upstream https://svc:p4ss#w0rd@vault.internal/v1 refused",
        ),
        (
            "FR4GT0KEN",
            "redirect_uri mismatch: https://app.example/cb#access_token=FR4GT0KEN&token_type=bearer",
        ),
    ] {
        let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
        let base = providers::start(idp.clone()).await;
        idp.push_fault(Fault::Answer(Box::new(move |_: &providers::Incoming| {
            providers::reply(
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid_client", "error_description": description}),
            )
        })));
        let err = CredentialCache::new(source(&base))
            .credential()
            .await
            .unwrap_err();
        let token = token_error(&err).to_string();
        let shown = err.to_string();
        for (what, text) in [("Error", &shown), ("TokenError", &token)] {
            if text.contains(secret) {
                broken.push(format!("{what}'s Display shows {secret:?}: {text}"));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// World: the token endpoint answers one refresh with a 200 `{"ok": false, "error": ..}`
/// naming a server-side condition in Slack's own words that the crate does not list
/// (`ratelimited`; it lists Slack's `service_unavailable` and `request_timeout`); the
/// next refresh gets through. Promise
/// probed: `TokenError::is_grant_rejected` ("an OAuth error in a 2xx answer ... unless
/// its code says the server could not judge it") and README's which-answers-refuse.
/// Probe: the refresh token the server did not judge is presented again (no login).
#[tokio::test]
async fn a_2xx_saying_the_server_could_not_judge_keeps_the_refresh_token() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut broken = Vec::new();
        // `service_unavailable`, listed: the control.
        for code in ["service_unavailable", "ratelimited"] {
            let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
            let (svc, _cache, url, _mangler) = expired_session(&idp).await;
            idp.push_fault(Fault::Answer(Box::new(move |_: &providers::Incoming| {
                providers::reply(StatusCode::OK, json!({"ok": false, "error": code}))
            })));
            let first = api_status(&svc, &url).await.map_err(|e| e.to_string());
            tokio::time::sleep(Duration::from_millis(50)).await;
            let second = api_status(&svc, &url).await.map_err(|e| e.to_string());
            let line = format!(
                "{code}: calls {first:?} {second:?}; logins {}; refresh grants {}",
                idp.logins.load(SeqCst),
                idp.refresh_grants.load(SeqCst),
            );
            println!("{line}");
            if (idp.logins.load(SeqCst), idp.refresh_grants.load(SeqCst)) != (1, 1) {
                broken.push(format!("the refresh token was dropped: {line}"));
            }
        }
        assert!(broken.is_empty(), "{}", broken.join("\n"));
    })
    .await
    .expect("the scenario hung");
}

/// World: a HubSpot-shaped server (a dead refresh token refused `400 {"status":
/// "BAD_REFRESH_TOKEN", ..}`, no OAuth `error`) whose logins answer no refresh token
/// (a client-credentials or session login beside a refresh grant). The refresh token
/// dies (`expire_refresh_tokens`), then the access token expires three times.
/// Proves: a login that succeeds after a refusal replaces the refresh token even when it
/// brings none: the dead one is presented once, then each expiry is one login (review 85
/// saw cd6df45 keep it and present it, refused, at every expiry: two token requests for
/// one).
#[tokio::test]
async fn a_dead_refresh_token_is_dropped_once_a_login_without_one_succeeds() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
        *idp.refused_grant_body.lock().unwrap() = Some(json!({
            "status": "BAD_REFRESH_TOKEN",
            "message": "missing or invalid refresh token"
        }));
        let (svc, cache, url, _mangler) = expired_session(&idp).await;
        idp.expire_refresh_tokens();
        idp.issue_refresh_tokens.store(false, SeqCst);
        let outcomes = refreshing_calls(&idp, &svc, &url).await;
        let presented = idp.presented.lock().unwrap().clone();
        let line = format!(
            "outcomes {outcomes:?}; token requests {}; logins {}; refresh tokens presented {presented:?}; stats {:?}",
            idp.token_requests.load(SeqCst),
            idp.logins.load(SeqCst),
            cache.source().stats()
        );
        println!("{line}");
        assert!(outcomes.iter().all(|o| *o == Ok(StatusCode::OK)), "{line}");
        assert_eq!(
            presented.len(),
            1,
            "the dead refresh token was presented again at every expiry: {line}"
        );
    })
    .await
    .expect("the scenario hung");
}

/// The strict server's rotated refresh answer rewritten as a `200` carrying the new
/// refresh token and `"error": "invalid_client"` (no access token): the server spent the
/// presented refresh token and issued a new one, and the answer is an OAuth error.
fn rotated_then_invalid_client(parts: http::response::Parts, body: Bytes) -> Reply {
    let mut doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let doc = doc.as_object_mut().unwrap();
    doc.remove("access_token");
    doc.insert("error".into(), json!("invalid_client"));
    reply_with(&parts, "application/json", serde_json::to_vec(doc).unwrap())
}

/// World: a rotating, family-revoking server whose refresh answer is a 2xx that rotated
/// (its new refresh token in the body) but says `invalid_client`; logins answer no refresh
/// token. Proves: README "the newest always replaces the old", "no refresh token is ever
/// presented twice" (review 85: cd6df45 handed the *presented* token to the login as the
/// one to keep, and a login answer without one put the spent token back: reuse, family
/// revoked).
#[tokio::test]
async fn an_unjudged_refusal_that_rotated_never_brings_back_the_spent_token() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
        let (svc, cache, url, mangler) = expired_session(&idp).await;
        idp.issue_refresh_tokens.store(false, SeqCst);
        mangler.next(rotated_then_invalid_client);
        let calls = refreshing_calls(&idp, &svc, &url).await;
        let line = format!(
            "calls {calls:?}; presented {:?}; reused {}; families revoked {}; logins {}; stats {:?}",
            idp.presented.lock().unwrap(),
            idp.reused_refresh_tokens.load(SeqCst),
            idp.family_revocations.load(SeqCst),
            idp.logins.load(SeqCst),
            cache.source().stats()
        );
        println!("{line}");
        assert_eq!(idp.reused_refresh_tokens.load(SeqCst), 0, "{line}");
        assert_eq!(idp.family_revocations.load(SeqCst), 0, "{line}");
    })
    .await
    .expect("the scenario hung");
}

/// World: two processes (caches with their own sources) sharing one store, against the
/// HubSpot-shaped server of `a_dead_refresh_token_is_dropped_once_a_login_without_one_succeeds`
/// (logins answer no refresh token once the session is made). The fleet's refresh token
/// dies; A's access token is rejected, then B's.
/// Proves: the same across a store: A's successful login drops the dead refresh token,
/// so the store gets A's credential without it and B never presents it (review 85: cd6df45
/// saved it with A's credential and B presented it too).
#[tokio::test]
async fn a_dead_refresh_token_is_not_handed_to_the_fleet() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
        *idp.refused_grant_body.lock().unwrap() = Some(json!({
            "status": "BAD_REFRESH_TOKEN",
            "message": "missing or invalid refresh token"
        }));
        let base = providers::start(idp.clone()).await;
        let store = tower_client_auth::MemoryStore::new();
        let cache = |store: tower_client_auth::MemoryStore| {
            CredentialCache::builder(source(&base))
                .store(store)
                .backoff(Duration::from_millis(10), Duration::from_millis(10))
                .build()
                .unwrap()
        };
        let (a, b) = (cache(store.clone()), cache(store.clone()));
        let first = a.credential().await.unwrap();
        idp.expire_refresh_tokens();
        idp.issue_refresh_tokens.store(false, SeqCst);
        let from_a = a.reject(&first).await.map_err(|e| e.to_string());
        let seen_by_b = b.credential().await.unwrap();
        let from_b = b.reject(&seen_by_b).await.map_err(|e| e.to_string());
        let presented = idp.presented.lock().unwrap().clone();
        let line = format!(
            "a {:?}, b {:?}; token requests {}; logins {}; refresh tokens presented {presented:?}",
            from_a.map(|_| ()),
            from_b.map(|_| ()),
            idp.token_requests.load(SeqCst),
            idp.logins.load(SeqCst),
        );
        println!("{line}");
        assert_eq!(
            presented.len(),
            1,
            "the dead refresh token went to the store and was presented again: {line}"
        );
    })
    .await
    .expect("the scenario hung");
}
