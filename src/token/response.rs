//! Parsing what token endpoints answer: token responses (JSON or form), RFC 6749 §5.2
//! error bodies, `expires_in` in its real-world shapes, and a JWT's `exp` claim.
//!
//! Everything here takes untrusted bytes and never panics; what it cannot use becomes a
//! [`TokenError`] that names the problem without echoing the body (it may hold a token).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use http::StatusCode;
use serde_json::Value;

use super::error::{TokenError, TokenErrorKind};
use crate::secret::Secret;

/// Longest lifetime taken from a response; larger values (a server's "never") are capped
/// here rather than overflowing the clock.
pub const MAX_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Shortest lifetime taken from a response: a token stated to live less (`expires_in:
/// 0.02`) is treated as living this long, so a server cannot set the rate of token
/// requests. Logged once per source when it happens.
pub const MIN_LIFETIME: Duration = Duration::from_secs(1);

/// Where in a token response the fields are. Names may be dotted paths into nested JSON
/// objects (`"data.token"`). Defaults: `access_token`, `refresh_token`, `expires_in`,
/// `token_type` (RFC 6749 §5.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseFields {
    access_token: String,
    refresh_token: String,
    expires_in: String,
    token_type: String,
}

impl Default for ResponseFields {
    fn default() -> Self {
        ResponseFields {
            access_token: "access_token".into(),
            refresh_token: "refresh_token".into(),
            expires_in: "expires_in".into(),
            token_type: "token_type".into(),
        }
    }
}

impl ResponseFields {
    /// The RFC 6749 names.
    pub fn new() -> Self {
        Self::default()
    }

    /// Where the access token is.
    pub fn access_token(mut self, path: impl Into<String>) -> Self {
        self.access_token = path.into();
        self
    }

    /// Where the refresh token is.
    pub fn refresh_token(mut self, path: impl Into<String>) -> Self {
        self.refresh_token = path.into();
        self
    }

    /// Where the lifetime in seconds is.
    pub fn expires_in(mut self, path: impl Into<String>) -> Self {
        self.expires_in = path.into();
        self
    }
}

/// A parsed token response.
#[derive(Debug, Clone)]
pub(crate) struct TokenResponse {
    access_token: Secret,
    expires_in: Option<Duration>,
    token_type: Option<String>,
    /// The response held `"refresh_token": ""`, read as no refresh token.
    pub(crate) empty_refresh_token: bool,
}

impl TokenResponse {
    /// Parses a 2xx token response body: JSON, or a form body (some older providers).
    ///
    /// Tolerant the way real servers need: `expires_in` as a number or a numeric string,
    /// `token_type` missing or in any case, unknown fields ignored. Errors: no body, not
    /// JSON or form, no access token, a non-positive `expires_in`.
    pub(crate) fn parse(
        content_type: Option<&str>,
        body: &[u8],
        fields: &ResponseFields,
    ) -> Result<Self, TokenError> {
        let invalid = |detail| TokenError::new(TokenErrorKind::InvalidResponse).detail(detail);
        let doc = document(content_type, body).ok_or_else(|| invalid("the body is not json"))?;
        if !doc.is_object() {
            return Err(invalid("the body is not a json object"));
        }
        let access_token = match lookup(&doc, &fields.access_token) {
            Some(Value::String(s)) if !s.is_empty() => Secret::new(s.clone()),
            Some(_) => return Err(invalid("the access token is not a non-empty string")),
            None => return Err(invalid("the access token is missing")),
        };
        // The refresh token itself is read on its own, before the body is judged
        // (`refresh_token_in`); here it is only checked.
        let mut empty_refresh_token = false;
        match lookup(&doc, &fields.refresh_token) {
            Some(Value::String(s)) if !s.is_empty() => {}
            // Seen in the wild next to a valid access token: no refresh token.
            Some(Value::String(_)) => empty_refresh_token = true,
            Some(Value::Null) | None => {}
            Some(_) => return Err(invalid("the refresh token is not a non-empty string")),
        }
        let expires_in = match lookup(&doc, &fields.expires_in) {
            Some(Value::Null) | None => None,
            Some(v) => Some(parse_expires_in(v)?),
        };
        let token_type = match lookup(&doc, &fields.token_type) {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        Ok(TokenResponse {
            access_token,
            expires_in,
            token_type,
            empty_refresh_token,
        })
    }

    /// The access token.
    pub(crate) fn access_token(&self) -> &Secret {
        &self.access_token
    }

    /// The lifetime the response states, capped at [`MAX_LIFETIME`].
    pub(crate) fn expires_in(&self) -> Option<Duration> {
        self.expires_in
    }

    /// The `token_type`, as sent.
    pub(crate) fn token_type(&self) -> Option<&str> {
        self.token_type.as_deref()
    }
}

/// Follows a dotted path into nested objects.
fn lookup<'a>(doc: &'a Value, path: &str) -> Option<&'a Value> {
    if let Some(v) = doc.get(path) {
        return Some(v);
    }
    path.split('.').try_fold(doc, |v, key| v.get(key))
}

/// `expires_in` as a number (integer or float) or a numeric string, in seconds. Zero or
/// negative is an error; huge values are capped at [`MAX_LIFETIME`].
pub(crate) fn parse_expires_in(value: &Value) -> Result<Duration, TokenError> {
    let invalid = |detail| TokenError::new(TokenErrorKind::InvalidResponse).detail(detail);
    let secs: f64 = match value {
        Value::Number(n) => n
            .as_f64()
            .ok_or_else(|| invalid("expires_in is not a number"))?,
        Value::String(s) => s
            .trim()
            .parse::<f64>()
            .map_err(|_| invalid("expires_in is not a number"))?,
        _ => return Err(invalid("expires_in is not a number")),
    };
    if secs.is_nan() {
        return Err(invalid("expires_in is not a number"));
    }
    if secs <= 0.0 {
        return Err(invalid("expires_in is not positive"));
    }
    Ok(Duration::try_from_secs_f64(secs)
        .unwrap_or(MAX_LIFETIME)
        .min(MAX_LIFETIME))
}

/// The `exp` claim of a JWT, without verifying the signature (a client only needs to
/// know when to refresh). `None` if `token` is not a JWT with a numeric `exp`.
///
/// The one parser that is public: for a source of your own whose endpoint answers a JWT
/// (`Credential::bearer(jwt)?.expires_in(..)` with the time left until `exp`).
/// [`TokenSource`](crate::token::TokenSource) already reads `exp` itself.
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// use tower_client_auth::token::jwt_expiry;
///
/// // header {"alg":"none"}, payload {"exp":2000000000}
/// let jwt = "eyJhbGciOiJub25lIn0.eyJleHAiOjIwMDAwMDAwMDB9.";
/// assert_eq!(jwt_expiry(jwt), Some(UNIX_EPOCH + Duration::from_secs(2_000_000_000)));
/// assert_eq!(jwt_expiry("opaque-token"), None);
/// ```
pub fn jwt_expiry(token: &str) -> Option<SystemTime> {
    match jwt_exp(token) {
        JwtExp::At(at) => Some(at),
        JwtExp::Absent | JwtExp::Unreadable => None,
    }
}

/// Turns a non-2xx answer into a [`TokenError`], reading an RFC 6749 §5.2 body when
/// there is one (`error`, `error_description`). The body itself is never kept; the
/// server's text is kept with control characters escaped and cut to 200 characters.
#[cfg(test)]
pub(crate) fn parse_error_response(status: StatusCode, body: &[u8]) -> TokenError {
    parse_error_body(status, None, body).scrub(&[])
}

/// `parse_error_response` (the tests' shorthand) with the server's text as sent: the
/// caller scrubs it of the request's secrets (which escapes and cuts it too) before it
/// is shown anywhere.
pub(crate) fn parse_error_body(
    status: StatusCode,
    content_type: Option<&str>,
    body: &[u8],
) -> TokenError {
    // A server that writes form bodies writes its errors so too.
    let doc = document(content_type, body);
    let text = |key: &str| {
        doc.as_ref()
            .and_then(|d| d.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let code = text("error")
        .filter(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_graphic() || b == b' '));
    let description = code.as_ref().and_then(|_| text("error_description"));
    match code {
        Some(_) => TokenError::rejected(status, code, description),
        // Nothing standard to read: the body's start says what can be said.
        None => TokenError::rejected(status, None, None).body(body),
    }
}

/// Whether a 2xx body is an OAuth error instead of a token: an object (JSON, or a form
/// body) with a non-empty string `error` and no access token (absent, or `null` as a
/// serialiser that writes every field of its type sends it). Some servers answer a
/// refused grant with 200.
pub(crate) fn is_error_in_success(
    content_type: Option<&str>,
    body: &[u8],
    fields: &ResponseFields,
) -> bool {
    let Some(doc) = document(content_type, body) else {
        return false;
    };
    matches!(doc.get("error"), Some(Value::String(code)) if !code.is_empty())
        && matches!(lookup(&doc, &fields.access_token), None | Some(Value::Null))
}

/// The refresh token in a 2xx body, read on its own before anything else about the body
/// is judged: a server that rotated the refresh token has spent the old one, even if the
/// rest of its answer is unusable.
pub(crate) fn refresh_token_in(
    content_type: Option<&str>,
    body: &[u8],
    fields: &ResponseFields,
) -> Option<Secret> {
    let doc = document(content_type, body)?;
    match lookup(&doc, &fields.refresh_token) {
        Some(Value::String(s)) if !s.is_empty() => Some(Secret::new(s.clone())),
        _ => None,
    }
}

/// A body as a JSON document: JSON, or a form body turned into an object; after one
/// UTF-8 byte order mark (RFC 8259 §8.1 lets a parser ignore it; some stacks write it).
fn document(content_type: Option<&str>, body: &[u8]) -> Option<Value> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let is_form = content_type.is_some_and(|ct| {
        ct.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .eq_ignore_ascii_case("application/x-www-form-urlencoded")
    });
    if is_form {
        return Some(Value::Object(
            form_urlencoded::parse(body)
                .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
                .collect(),
        ));
    }
    serde_json::from_slice(body).ok()
}

/// A `Retry-After` value (RFC 9110 §10.2.3): a number of seconds, or an HTTP date
/// (taken relative to `now`; a date in the past means no wait). Anything else is ignored.
pub(crate) fn parse_retry_after(value: &[u8], now: SystemTime) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(text.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// What a token's JWT `exp` claim says, for choosing its lifetime.
pub(crate) enum JwtExp {
    /// Not a JWT (an opaque token), or a JWT without `exp`.
    Absent,
    /// A JWT whose `exp` is there but not a usable number of seconds.
    Unreadable,
    /// The claim, as a wall-clock time.
    At(SystemTime),
}

/// Reads a token's `exp` claim without verifying the signature.
pub(crate) fn jwt_exp(token: &str) -> JwtExp {
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return JwtExp::Absent;
    };
    let Some(claims) = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()
        .and_then(|p| serde_json::from_slice::<Value>(&p).ok())
        .filter(Value::is_object)
    else {
        return JwtExp::Absent;
    };
    let Some(exp) = claims.get("exp") else {
        return JwtExp::Absent;
    };
    match exp.as_f64() {
        Some(exp) if exp.is_finite() && exp >= 0.0 => {
            // Past what the clock can hold: capped like any other "never".
            let since_epoch = Duration::try_from_secs_f64(exp).unwrap_or(Duration::MAX);
            JwtExp::At(
                UNIX_EPOCH
                    .checked_add(since_epoch)
                    .unwrap_or_else(|| SystemTime::now() + MAX_LIFETIME),
            )
        }
        _ => JwtExp::Unreadable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parsed response never prints its token (the crate's secret canary test cannot
    /// reach this type since it became crate-private).
    #[test]
    fn a_parsed_response_prints_no_token() {
        let body = br#"{"access_token":"canary-7f3a9c","expires_in":60}"#;
        let parsed = TokenResponse::parse(None, body, &ResponseFields::default()).unwrap();
        let printed = format!("{parsed:?} {parsed:#?}");
        assert!(!printed.contains("canary-7f3a9c"), "{printed}");
    }

    fn parse(body: &str) -> Result<TokenResponse, TokenError> {
        TokenResponse::parse(
            Some("application/json"),
            body.as_bytes(),
            &ResponseFields::default(),
        )
    }

    /// The shapes real servers send all parse; extra fields are ignored.
    #[test]
    fn tolerant_parsing() {
        let r =
            parse(r#"{"access_token":"a","expires_in":3600,"token_type":"bearer","x":{"y":1}}"#)
                .unwrap();
        assert_eq!(r.access_token().expose(), "a");
        assert_eq!(r.expires_in(), Some(Duration::from_secs(3600)));
        assert_eq!(r.token_type(), Some("bearer"));
        let r = parse(r#"{"access_token":"a","expires_in":"86400"}"#).unwrap();
        assert_eq!(r.expires_in(), Some(Duration::from_secs(86400)));
        assert_eq!(r.token_type(), None);
        let r = parse(r#"{"access_token":"a","expires_in":1.5,"refresh_token":"r"}"#).unwrap();
        assert_eq!(r.expires_in(), Some(Duration::from_millis(1500)));
        let body = br#"{"access_token":"a","expires_in":1.5,"refresh_token":"r"}"#;
        let refresh = refresh_token_in(None, body, &ResponseFields::default());
        assert_eq!(refresh.unwrap().expose(), "r");
        let r = parse(r#"{"access_token":"a","expires_in":1e300}"#).unwrap();
        assert_eq!(r.expires_in(), Some(MAX_LIFETIME));
        let r = parse(r#"{"access_token":"a","expires_in":null,"refresh_token":null}"#).unwrap();
        assert!(r.expires_in().is_none() && !r.empty_refresh_token);
        let body = br#"{"access_token":"a","refresh_token":null}"#;
        assert!(refresh_token_in(None, body, &ResponseFields::default()).is_none());
    }

    /// Form-encoded token responses parse too.
    #[test]
    fn form_response() {
        let r = TokenResponse::parse(
            Some("application/x-www-form-urlencoded; charset=utf-8"),
            b"access_token=a%2Bb&expires_in=60&token_type=bearer",
            &ResponseFields::default(),
        )
        .unwrap();
        assert_eq!(r.access_token().expose(), "a+b");
        assert_eq!(r.expires_in(), Some(Duration::from_secs(60)));
    }

    /// Nested fields by dotted path.
    #[test]
    fn nested_fields() {
        let fields = ResponseFields::new()
            .access_token("data.token")
            .expires_in("data.ttl");
        let r = TokenResponse::parse(None, br#"{"data":{"token":"t","ttl":5}}"#, &fields).unwrap();
        assert_eq!(r.access_token().expose(), "t");
        assert_eq!(r.expires_in(), Some(Duration::from_secs(5)));
    }

    /// Unusable bodies are typed errors that do not echo the body.
    #[test]
    fn bad_bodies_are_typed_errors() {
        for body in [
            "<html>Service Unavailable</html>",
            "",
            "[]",
            r#"{"token":"SECRET-TOKEN"}"#,
            r#"{"access_token":""}"#,
            r#"{"access_token":42}"#,
            r#"{"access_token":"a","expires_in":0}"#,
            r#"{"access_token":"a","expires_in":-5}"#,
            r#"{"access_token":"a","expires_in":"soon"}"#,
            r#"{"access_token":"a","refresh_token":7}"#,
        ] {
            let err = parse(body).unwrap_err();
            assert_eq!(err.kind(), TokenErrorKind::InvalidResponse, "{body}");
            assert!(!err.to_string().contains("SECRET-TOKEN"));
        }
    }

    /// RFC 6749 §5.2 errors are read; anything else keeps just the status.
    #[test]
    fn error_bodies() {
        let e = parse_error_response(
            StatusCode::UNAUTHORIZED,
            br#"{"error":"invalid_client","error_description":"Client authentication failed"}"#,
        );
        assert_eq!(e.oauth_error(), Some("invalid_client"));
        assert_eq!(e.status(), Some(StatusCode::UNAUTHORIZED));
        assert!(e.is_grant_rejected());
        assert_eq!(
            e.to_string(),
            "token endpoint answered 401 invalid_client (Client authentication failed)"
        );
        let e = parse_error_response(StatusCode::SERVICE_UNAVAILABLE, b"<html>down</html>");
        assert_eq!(e.oauth_error(), None);
        assert!(!e.is_grant_rejected());
        assert_eq!(
            e.to_string(),
            "token endpoint answered 503 (body: \"<html>down</html>\")"
        );
        assert_eq!(
            parse_error_response(StatusCode::BAD_GATEWAY, b" \n").to_string(),
            "token endpoint answered 502"
        );
    }

    /// A login endpoint's own error body (no OAuth `error`): its start is shown, with
    /// every form of the request's secrets, URL credentials and queries taken out,
    /// control characters escaped, and the length bounded.
    #[test]
    fn a_non_oauth_error_body_shows_its_start_scrubbed() {
        let body = br#"{"message":"key my-key with secret s3cr3t-val is not valid; see https://u:pw@docs.example/x?sig=abc","trace":"[31m"}"#;
        let e = parse_error_body(StatusCode::BAD_REQUEST, None, body).scrub(&["s3cr3t-val".into()]);
        let shown = e.to_string();
        assert!(
            shown.starts_with("token endpoint answered 400 (body: \"{"),
            "{shown}"
        );
        assert!(
            shown.contains("key my-key with secret [redacted]"),
            "{shown}"
        );
        for leaked in ["s3cr3t-val", "u:pw", "sig=abc", "\u{1b}"] {
            assert!(!shown.contains(leaked), "{leaked} in {shown}");
        }
        let long = format!("{{\"message\":\"{}\"}}", "x".repeat(10_000));
        let e = parse_error_body(StatusCode::BAD_REQUEST, None, long.as_bytes()).scrub(&[]);
        assert!(e.body_start().unwrap().chars().count() <= 130, "{e}");
    }

    /// `Retry-After` in both forms; garbage is ignored, a past date is no wait.
    #[test]
    fn retry_after_forms() {
        let now = UNIX_EPOCH + Duration::from_secs(1_445_412_480); // Wed, 21 Oct 2015 07:28:00 GMT
        assert_eq!(parse_retry_after(b"5", now), Some(Duration::from_secs(5)));
        assert_eq!(
            parse_retry_after(b" 120 ", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after(b"Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after(b"Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after(b"99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
        for bad in [&b""[..], b"-1", b"soon", b"1.5", b"\xff"] {
            assert_eq!(parse_retry_after(bad, now), None);
        }
    }

    /// JWT `exp`: read from the payload; anything that is not a JWT with a numeric exp
    /// gives `None`.
    #[test]
    fn jwt_exp() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let jwt = format!(
            "{}.{}.sig",
            b64(r#"{"alg":"HS256"}"#),
            b64(r#"{"sub":"x","exp":1700000000}"#)
        );
        assert_eq!(
            jwt_expiry(&jwt),
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        for bad in [
            "".to_owned(),
            "a.b".to_owned(),
            "a.b.c.d".to_owned(),
            format!("h.{}.s", b64("not json")),
            format!("h.{}.s", b64(r#"{"exp":"soon"}"#)),
            format!("h.{}.s", b64(r#"{"exp":-1}"#)),
            format!("h.{}.s", b64(r#"{"nbf":1}"#)),
            "h.!!!.s".to_owned(),
        ] {
            assert_eq!(jwt_expiry(&bad), None, "{bad}");
        }
    }
}
