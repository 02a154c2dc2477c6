//! Scrub scenarios shared by `tests/secrets.rs` and `tests/secrets_echoes.rs`: a token
//! endpoint that answers 401 with a given body, and what its error shows of the canary.

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use tower_client_auth::{CredentialCache, token::TokenSource};

/// The error of a client-credentials fetch with `secret` from a token endpoint that
/// answers every request 401 with `body`.
pub async fn refused_with(body: String, secret: &str) -> tower_client_auth::Error {
    let addr = super::serve(move |_req| {
        let body = body.clone();
        async move {
            Response::builder()
                .status(401)
                .body(Full::new(Bytes::from(body)))
                .unwrap()
        }
    })
    .await;
    let source = TokenSource::client_credentials(&format!("http://{addr}/token"), "id", secret)
        .unwrap()
        .client(super::token_client());
    CredentialCache::new(source).credential().await.unwrap_err()
}

/// The token error as shown (`Display`, `Debug`, its description and body start), if
/// any part of the canary secret (`CANARY`, `5ecr3t`, `d0-not-print`) shows in it.
pub fn shown_secret(err: &tower_client_auth::Error) -> Option<String> {
    let token_error = err.token_error().expect("a token error");
    let shown = format!(
        "{err} {err:?} {:?} {:?}",
        token_error.description(),
        token_error.body_start()
    );
    ["CANARY", "5ecr3t", "d0-not-print"]
        .iter()
        .any(|part| shown.contains(part))
        .then_some(shown)
}

/// Each case (what, the secret, the body a token endpoint answers 401 with) refused,
/// and no part of its secret shown by the error: every leak listed.
pub async fn assert_scrubbed(cases: Vec<(&str, &str, String)>) {
    let mut leaks = Vec::new();
    for (case, secret, body) in cases {
        let err = refused_with(body, secret).await;
        if let Some(shown) = shown_secret(&err) {
            leaks.push(format!("{case}:\n    {shown}"));
        }
    }
    assert!(
        leaks.is_empty(),
        "leaked ({}):\n{}",
        leaks.len(),
        leaks.join("\n")
    );
}

/// An RFC 6749 error body: `invalid_client`, with `description`.
pub fn oauth_error(description: &str) -> String {
    serde_json::json!({"error": "invalid_client", "error_description": description}).to_string()
}
