//! Property tests for every parser of untrusted input: arbitrary bytes never panic, and
//! valid inputs round-trip. Token responses (JSON and form), RFC 6749 error bodies, JWT
//! `exp`, `expires_in` as number or string, field mapping by path, and the credential
//! constructors fed arbitrary strings.

use std::time::{Duration, UNIX_EPOCH};

use super::response::{
    MAX_LIFETIME, ResponseFields, TokenResponse, jwt_expiry, parse_error_response, parse_expires_in,
};
use crate::Credential;
use base64::Engine as _;
use http::StatusCode;
use proptest::prelude::*;

fn b64(s: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

/// A token: visible ASCII without quotes or backslashes, so it embeds in JSON as is.
fn token() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._~+/=-]{1,200}"
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    /// Arbitrary bytes, with any content type, never panic a token-response parse.
    #[test]
    fn token_response_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512), form in any::<bool>()) {
        let ct = if form { "application/x-www-form-urlencoded" } else { "application/json" };
        let _ = TokenResponse::parse(Some(ct), &body, &ResponseFields::default());
        let _ = TokenResponse::parse(None, &body, &ResponseFields::new().access_token("a.b.c"));
    }

    /// Arbitrary JSON-ish text near the real shape never panics either.
    #[test]
    fn token_response_near_misses_never_panic(access in any::<String>(), expires in any::<String>(), extra in any::<String>()) {
        let body = format!(r#"{{"access_token":{access:?},"expires_in":{expires},"x":{extra:?}}}"#);
        let _ = TokenResponse::parse(Some("application/json"), body.as_bytes(), &ResponseFields::default());
    }

    /// A valid JSON token response round-trips: token, refresh token, lifetime as number
    /// or string, unknown fields ignored.
    #[test]
    fn token_response_round_trips(access in token(), refresh in proptest::option::of(token()), secs in 1u64..10_000_000, as_string in any::<bool>()) {
        let expires = if as_string { format!("\"{secs}\"") } else { secs.to_string() };
        let refresh_field = refresh.as_ref().map(|r| format!(r#","refresh_token":"{r}""#)).unwrap_or_default();
        let body = format!(r#"{{"access_token":"{access}","expires_in":{expires},"token_type":"bearer","scope":"x y"{refresh_field}}}"#);
        let parsed = TokenResponse::parse(Some("application/json"), body.as_bytes(), &ResponseFields::default()).unwrap();
        prop_assert_eq!(parsed.access_token().expose(), access.as_str());
        let rotated = super::response::refresh_token_in(Some("application/json"), body.as_bytes(), &ResponseFields::default());
        prop_assert_eq!(rotated.map(|s| s.expose().to_owned()), refresh);
        prop_assert_eq!(parsed.expires_in(), Some(Duration::from_secs(secs)));
    }

    /// The same fields as a form body round-trip, whatever bytes the token holds.
    #[test]
    fn form_response_round_trips(access in "[^\u{0}]{1,100}", secs in 1u64..100_000) {
        let body = form_urlencoded::Serializer::new(String::new())
            .append_pair("access_token", &access)
            .append_pair("expires_in", &secs.to_string())
            .finish();
        let parsed = TokenResponse::parse(Some("application/x-www-form-urlencoded"), body.as_bytes(), &ResponseFields::default()).unwrap();
        prop_assert_eq!(parsed.access_token().expose(), access.as_str());
        prop_assert_eq!(parsed.expires_in(), Some(Duration::from_secs(secs)));
    }

    /// Fields found by dotted path at any depth round-trip.
    #[test]
    fn field_mapping_round_trips(path in proptest::collection::vec("[a-z]{1,8}", 1..4), access in token()) {
        let mut doc = serde_json::json!(access);
        for key in path.iter().rev() {
            doc = serde_json::json!({ key.clone(): doc });
        }
        let fields = ResponseFields::new().access_token(path.join("."));
        let parsed = TokenResponse::parse(None, doc.to_string().as_bytes(), &fields).unwrap();
        prop_assert_eq!(parsed.access_token().expose(), access.as_str());
    }

    /// `expires_in` from any JSON value never panics; positive numbers and numeric strings
    /// round-trip (capped at `MAX_LIFETIME`); zero and negatives are errors.
    #[test]
    fn expires_in_number_or_string(secs in 1u32..u32::MAX, negative in -1_000_000i64..=0, junk in any::<String>()) {
        let expected = Duration::from_secs(secs.into()).min(MAX_LIFETIME);
        prop_assert_eq!(parse_expires_in(&serde_json::json!(secs)).unwrap(), expected);
        prop_assert_eq!(parse_expires_in(&serde_json::json!(secs.to_string())).unwrap(), expected);
        prop_assert!(parse_expires_in(&serde_json::json!(negative)).is_err());
        let _ = parse_expires_in(&serde_json::json!(junk));
        let _ = parse_expires_in(&serde_json::json!({"nested": junk}));
    }

    /// RFC 6749 error bodies: arbitrary bytes never panic; a valid body's code and status
    /// are read back.
    #[test]
    fn error_bodies(body in proptest::collection::vec(any::<u8>(), 0..256), code in "[a-z_]{1,30}", status in 400u16..600) {
        let status = StatusCode::from_u16(status).unwrap();
        let _ = parse_error_response(status, &body).to_string();
        let valid = serde_json::json!({"error": code, "error_description": "why"}).to_string();
        let err = parse_error_response(status, valid.as_bytes());
        prop_assert_eq!(err.oauth_error(), Some(code.as_str()));
        prop_assert_eq!(err.status(), Some(status));
    }

    /// JWT `exp`: arbitrary strings never panic; a JWT built with any `exp` gives it back.
    #[test]
    fn jwt_exp(junk in any::<String>(), exp in 0u64..32_503_680_000, extra in any::<String>()) {
        let _ = jwt_expiry(&junk);
        let _ = jwt_expiry(&format!("a.{junk}.c"));
        let _ = jwt_expiry(&format!("a.{}.c", b64(&junk)));
        let payload = serde_json::json!({"sub": extra, "exp": exp}).to_string();
        let jwt = format!("{}.{}.sig", b64(r#"{"alg":"RS256"}"#), b64(&payload));
        prop_assert_eq!(jwt_expiry(&jwt), Some(UNIX_EPOCH + Duration::from_secs(exp)));
    }

    /// Credential constructors take arbitrary strings without panicking, and whatever they
    /// accept is sensitive and never printed.
    #[test]
    fn credential_constructors(name in any::<String>(), value in any::<String>()) {
        for built in [
            Credential::bearer(&value),
            Credential::with_scheme(&name, &value),
            Credential::cookie(&name, &value),
            Credential::header(&name, &value),
        ] {
            match built {
                Ok(c) => {
                    prop_assert!(c.headers().all(|(_, v)| v.is_sensitive()));
                    let shown = format!("{c:?}");
                    prop_assert!(value.len() < 4 || !shown.contains(&value));
                }
                Err(e) => prop_assert!(value.len() < 4 || !e.to_string().contains(&value)),
            }
        }
    }
}
