//! [`TokenError`]: what went wrong talking to a token endpoint.

use std::{error::Error as StdError, fmt, time::Duration};

use http::StatusCode;

use crate::error::BoxError;

/// What kind of token-endpoint failure a [`TokenError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TokenErrorKind {
    /// The token request could not be built (bad URL, bad header value).
    InvalidRequest,
    /// The token URL is plain `http` to a non-loopback host (or loopback not allowed).
    InsecureTransport,
    /// Connecting failed (refused, DNS, TLS): the request was never sent, so a refresh
    /// token it carried is still unspent.
    Connect,
    /// Sending or receiving failed after the connection was made (a connection closed
    /// mid-answer): the server may have acted on the request.
    Transport,
    /// No complete answer within the token client's timeout.
    Timeout,
    /// The endpoint answered with a redirect; token requests never follow redirects.
    Redirect,
    /// The endpoint answered with an error status (4xx, 5xx). See [`TokenError::status`]
    /// and, for RFC 6749 §5.2 bodies, [`TokenError::oauth_error`].
    Rejected,
    /// The endpoint answered 2xx with a body that is not a usable token response.
    InvalidResponse,
}

/// A token endpoint failure. `Display` names the status and the RFC 6749 error code, and
/// never holds a secret: descriptions from the server are scrubbed of the request's
/// secrets, and response bodies are never echoed.
#[derive(Debug)]
pub struct TokenError {
    kind: TokenErrorKind,
    status: Option<StatusCode>,
    oauth_error: Option<String>,
    description: Option<String>,
    detail: Option<&'static str>,
    retry_after: Option<Duration>,
    source: Option<BoxError>,
}

impl TokenError {
    pub(crate) fn new(kind: TokenErrorKind) -> Self {
        TokenError {
            kind,
            status: None,
            oauth_error: None,
            description: None,
            detail: None,
            retry_after: None,
            source: None,
        }
    }

    pub(crate) fn detail(mut self, detail: &'static str) -> Self {
        self.detail = Some(detail);
        self
    }

    pub(crate) fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    pub(crate) fn rejected(
        status: StatusCode,
        oauth_error: Option<String>,
        description: Option<String>,
    ) -> Self {
        TokenError {
            status: Some(status),
            oauth_error,
            description,
            ..TokenError::new(TokenErrorKind::Rejected)
        }
    }

    pub(crate) fn status_mut(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
    }

    /// Makes the server-supplied text safe to keep: every secret (in each form it was
    /// sent) replaced with `[redacted]` first, then control characters escaped, then the
    /// text cut to a bounded length. A server may echo what it was sent, and may send
    /// line breaks or terminal escapes.
    pub(crate) fn scrub(mut self, secrets: &[String]) -> Self {
        for text in [&mut self.oauth_error, &mut self.description]
            .into_iter()
            .flatten()
        {
            *text = crate::text::from_server(text, secrets);
        }
        self
    }

    pub(crate) fn retry_after(mut self, retry_after: Option<Duration>) -> Self {
        self.retry_after = retry_after;
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> TokenErrorKind {
        self.kind
    }

    /// The HTTP status the token endpoint answered with, if it answered.
    pub fn status(&self) -> Option<StatusCode> {
        self.status
    }

    /// The RFC 6749 §5.2 `error` code (`invalid_client`, `invalid_grant`, ...), if the
    /// endpoint sent one.
    pub fn oauth_error(&self) -> Option<&str> {
        self.oauth_error.as_deref()
    }

    /// The endpoint's `error_description`, scrubbed of the request's secrets.
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// How long the endpoint asked clients to wait (`Retry-After` on a 429 or 503, in
    /// seconds or as an HTTP date), if it did. The cache makes no token request before.
    pub fn retry_after_hint(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Whether the request left and no answer says what became of it: a gateway's 502,
    /// 503 or 504, a connection closed after the request was written, or the token
    /// client's timeout. A refresh with an unknown outcome may have rotated its refresh
    /// token, so [`TokenSource`](super::TokenSource) never presents that token again.
    pub fn is_outcome_unknown(&self) -> bool {
        match self.kind {
            TokenErrorKind::Timeout | TokenErrorKind::Transport => true,
            TokenErrorKind::Rejected => matches!(
                self.status,
                Some(
                    StatusCode::BAD_GATEWAY
                        | StatusCode::SERVICE_UNAVAILABLE
                        | StatusCode::GATEWAY_TIMEOUT
                )
            ),
            _ => false,
        }
    }

    /// Whether the endpoint refused the grant itself: the credentials or refresh token
    /// are bad, as opposed to the endpoint being down. That is a 400 or 401, or an OAuth
    /// error in a 2xx answer (some servers send `{"error": "invalid_grant"}` with 200),
    /// unless its code says the server is unavailable.
    pub fn is_grant_rejected(&self) -> bool {
        if self.kind != TokenErrorKind::Rejected {
            return false;
        }
        match self.status {
            Some(StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED) => true,
            Some(status) if status.is_success() => !matches!(
                self.oauth_error.as_deref(),
                None | Some("server_error" | "temporarily_unavailable")
            ),
            _ => false,
        }
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            TokenErrorKind::InvalidRequest => "invalid token request",
            TokenErrorKind::InsecureTransport => {
                "refusing to send token request over an insecure transport"
            }
            TokenErrorKind::Connect => "could not connect to the token endpoint",
            TokenErrorKind::Transport => "token request failed",
            TokenErrorKind::Timeout => "token request timed out",
            TokenErrorKind::Redirect => {
                "token endpoint answered with a redirect, which is not followed"
            }
            TokenErrorKind::Rejected => "token endpoint rejected the request",
            TokenErrorKind::InvalidResponse => "invalid token response",
        };
        f.write_str(what)?;
        if let Some(status) = self.status {
            write!(f, " (status {})", status.as_u16())?;
        }
        if let Some(detail) = self.detail {
            write!(f, ": {detail}")?;
        }
        if let Some(code) = &self.oauth_error {
            write!(f, ": {code}")?;
            if let Some(description) = &self.description {
                write!(f, " ({description})")?;
            }
        }
        Ok(())
    }
}

impl StdError for TokenError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}
