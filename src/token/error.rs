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
    /// The refresh token is shared through a credential store that does not answer, and
    /// the source is set to fail rather than log in again
    /// ([`StoreDownPolicy::Fail`](super::StoreDownPolicy::Fail)): nothing was sent.
    StoreUnavailable,
    /// A step-up ([`FetchReason::StepUp`](crate::FetchReason::StepUp)) this source cannot
    /// make: its login is not a grant that takes a scope of the client's choosing (a
    /// session login, a refresh or code grant), or the API named no scope. Nothing was
    /// sent.
    StepUpUnsupported,
    /// The issuer's metadata (RFC 8414, OpenID Connect Discovery) could not be used: not
    /// published, not JSON, missing `token_endpoint`, or naming another issuer.
    Discovery,
    /// Not sent: an earlier answer's `Retry-After` has not passed (one the cache may have
    /// stopped waiting for, which only the source read). [`TokenError::retry_after_hint`]
    /// says how long is left.
    HeldBack,
}

/// A token endpoint failure. `Display` names the status and the RFC 6749 error code (or,
/// for an error body that has none, the start of the body), and never holds a secret:
/// text from the server is scrubbed of every form of the request's secrets and of URL
/// credentials and queries, escaped, and cut short.
pub struct TokenError {
    kind: TokenErrorKind,
    status: Option<StatusCode>,
    oauth_error: Option<String>,
    /// With `oauth_error`, the `error_description`; without it, the start of the error
    /// body (see `body_start`). Scrubbed by [`scrub`](Self::scrub).
    description: Option<String>,
    detail: Option<&'static str>,
    retry_after: Option<Duration>,
    /// The token url as shown: scheme, host, port and path; never userinfo or query.
    endpoint: Option<Box<str>>,
    /// The answer could not be read whole (too large): what the server did is unknown.
    unread: bool,
    /// The request carried a DPoP proof: a proof error refuses the proof, not the grant.
    proof_sent: bool,
    /// The answer carried a nonce (`DPoP-Nonce`) that was kept for the next proof.
    nonce_given: bool,
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
            endpoint: None,
            unread: false,
            proof_sent: false,
            nonce_given: false,
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

    /// Keeps `body` (an error body with no OAuth error) to show its start, once
    /// [`scrub`](Self::scrub) has made it safe.
    pub(crate) fn body(mut self, body: &[u8]) -> Self {
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        // Nothing to say: no body, or an empty JSON value.
        if !(text.is_empty() || matches!(text, "{}" | "[]" | "null" | "\"\"")) {
            self.oauth_error = None;
            self.description = Some(text.to_owned());
        }
        self
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
        let body = self.oauth_error.is_none();
        if let Some(code) = &mut self.oauth_error {
            *code = crate::text::from_server(code, secrets);
        }
        if let Some(text) = &mut self.description {
            *text = if body {
                crate::text::body_start(text, secrets)
            } else {
                crate::text::from_server(text, secrets)
            };
        }
        self
    }

    /// Names the endpoint in `Display`: scheme, host, port and path of `url`, never
    /// userinfo or a query (either may carry a secret).
    pub(crate) fn endpoint(mut self, url: &http::Uri) -> Self {
        self.endpoint = Some(crate::text::shown_url(url).into());
        self
    }

    /// Marks an answer that could not be read whole: its outcome is unknown.
    pub(crate) fn unread(mut self) -> Self {
        self.unread = true;
        self
    }

    /// The request this answers carried a DPoP proof.
    #[cfg_attr(not(feature = "jwt"), allow(dead_code))]
    pub(crate) fn proof_sent(mut self, sent: bool) -> Self {
        self.proof_sent = sent;
        self
    }

    /// The answer carried a nonce that was kept for the next proof.
    #[cfg_attr(not(feature = "jwt"), allow(dead_code))]
    pub(crate) fn nonce_given(mut self, given: bool) -> Self {
        self.nonce_given = given;
        self
    }

    /// Whether a new proof would differ from the refused one by a nonce the server gave.
    #[cfg_attr(not(feature = "jwt"), allow(dead_code))]
    pub(crate) fn gave_nonce(&self) -> bool {
        self.nonce_given
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
        self.oauth_error.as_ref().and(self.description.as_deref())
    }

    /// For an error answer whose body carries no OAuth error (a login endpoint's own
    /// `{"message": ..}`, an HTML page), the start of that body: scrubbed of every form
    /// of the request's secrets and of URL credentials and queries, control characters
    /// escaped, at most 120 characters. Shown by `Display`.
    pub fn body_start(&self) -> Option<&str> {
        match self.oauth_error {
            Some(_) => None,
            None => self.description.as_deref(),
        }
    }

    /// How long the endpoint asked clients to wait (`Retry-After` on a 429 or 503, in
    /// seconds or as an HTTP date), if it did. The cache makes no token request before.
    pub fn retry_after_hint(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Whether retrying later cannot help: the client credentials or grant were refused
    /// (see [`is_grant_rejected`](Self::is_grant_rejected)), the request cannot be
    /// built, or its transport is refused. Everything else (the endpoint down, slow,
    /// throttling, answering garbage) is transient.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self.kind,
            TokenErrorKind::InvalidRequest | TokenErrorKind::InsecureTransport
        ) || self.is_grant_rejected()
            || (self.kind == TokenErrorKind::Rejected && self.status == Some(StatusCode::NOT_FOUND))
    }

    /// Whether the request left and no answer says what became of it: any 5xx (the
    /// server's own 500 as much as a gateway's 502, 503 or 504: either may come after the
    /// request was acted on), a connection closed after the request was written, an
    /// answer too large to read, or the token client's timeout. A refresh with an unknown outcome may have rotated its refresh
    /// token, so [`TokenSource`](super::TokenSource) never presents that token again.
    pub fn is_outcome_unknown(&self) -> bool {
        if self.unread {
            return true;
        }
        match self.kind {
            TokenErrorKind::Timeout | TokenErrorKind::Transport => true,
            // Any 5xx: the server (or the upstream behind a gateway) may have acted on
            // the request before it failed. A 4xx was judged and refused, or throttled
            // before it was acted on.
            TokenErrorKind::Rejected => self.status.is_some_and(|s| s.is_server_error()),
            _ => false,
        }
    }

    /// Whether the endpoint refused the grant itself: the credentials or refresh token
    /// are bad, as opposed to the endpoint being down. That is a 400 or 401, a 403 that
    /// says why in one of RFC 6749's token error codes (Auth0 refuses an unknown or
    /// expired refresh token with `403 invalid_grant`; a 403 without one, or with another
    /// `error`, may be a gateway's), or an OAuth error in a
    /// 2xx answer (some servers send `{"error": "invalid_grant"}` with 200), unless its
    /// code says the server could not judge it (`temporarily_unavailable`,
    /// `server_error`: RFC 6749 makes 400 the status of every token-endpoint error, and
    /// Microsoft Entra answers its "too busy, retry" with 400).
    pub fn is_grant_rejected(&self) -> bool {
        if self.kind != TokenErrorKind::Rejected {
            return false;
        }
        // A DPoP proof the request carried refused, or a nonce asked for (RFC 9449 §5,
        // §8): the grant was not looked at. Without a proof sent, the same answer says
        // the client must use DPoP: as refused as any grant.
        if self.proof_sent
            && matches!(
                self.oauth_error.as_deref(),
                Some("use_dpop_nonce" | "invalid_dpop_proof")
            )
        {
            return false;
        }
        let unjudged = matches!(
            self.oauth_error.as_deref(),
            Some(
                "server_error"
                    | "temporarily_unavailable"
                    // Slack's words for the same (`ok: false` with 200).
                    | "service_unavailable"
                    | "request_timeout"
                    | "ratelimited"
            )
        );
        match self.status {
            Some(StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED) => !unjudged,
            // A gateway's or a WAF's own 403 may carry an `error` field too ("Forbidden",
            // "request_blocked"): only a token endpoint's own refusal codes count.
            Some(StatusCode::FORBIDDEN) => matches!(
                self.oauth_error.as_deref(),
                Some(
                    "invalid_grant"
                        | "invalid_client"
                        | "unauthorized_client"
                        | "unsupported_grant_type"
                        | "invalid_scope"
                        | "invalid_request"
                )
            ),
            Some(status) if status.is_success() => self.oauth_error.is_some() && !unjudged,
            _ => false,
        }
    }
}

impl fmt::Debug for TokenError {
    /// Every field but the cause as it is (each was made safe when it was set); the
    /// cause, another library's error, as its `Display` made safe to show (no URL
    /// credentials or queries, escaped, cut).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenError")
            .field("kind", &self.kind)
            .field("status", &self.status)
            .field("oauth_error", &self.oauth_error)
            .field("description", &self.description)
            .field("detail", &self.detail)
            .field("retry_after", &self.retry_after)
            .field("endpoint", &self.endpoint)
            .field("unread", &self.unread)
            .field("proof_sent", &self.proof_sent)
            .field("nonce_given", &self.nonce_given)
            .field(
                "source",
                &self
                    .source
                    .as_ref()
                    .map(|e| crate::text::foreign(&e.to_string())),
            )
            .finish()
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = |f: &mut fmt::Formatter<'_>| match &self.endpoint {
            Some(endpoint) => write!(f, " {endpoint}"),
            None => Ok(()),
        };
        match self.kind {
            TokenErrorKind::InvalidRequest => f.write_str("invalid token request")?,
            TokenErrorKind::Discovery => {
                f.write_str("authorization server metadata")?;
                if self.endpoint.is_some() {
                    f.write_str(" at")?;
                    at(f)?;
                }
                if let Some(status) = self.status {
                    write!(f, " (status {})", status.as_u16())?;
                }
            }
            TokenErrorKind::StepUpUnsupported => {
                f.write_str("this token source cannot ask for a wider scope (step-up)")?
            }
            TokenErrorKind::HeldBack => {
                f.write_str("token endpoint")?;
                at(f)?;
                f.write_str(" asked for no request before its Retry-After passed; not sent")?;
            }
            TokenErrorKind::StoreUnavailable => f.write_str(
                "the credential store sharing the refresh token does not answer; not presenting it (StoreDownPolicy::Fail)",
            )?,
            TokenErrorKind::InsecureTransport => {
                f.write_str("refusing to send a token request over an insecure transport")?
            }
            TokenErrorKind::Connect => {
                f.write_str("could not connect to the token endpoint")?;
                at(f)?;
            }
            TokenErrorKind::Transport => {
                f.write_str("token request to")?;
                at(f)?;
                f.write_str(" failed after it was sent")?;
            }
            TokenErrorKind::Timeout => {
                f.write_str("token endpoint")?;
                at(f)?;
                f.write_str(" did not answer in time")?;
            }
            TokenErrorKind::Redirect => {
                f.write_str("token endpoint")?;
                at(f)?;
                f.write_str(" answered with a redirect, which is not followed")?;
            }
            TokenErrorKind::Rejected => {
                f.write_str("token endpoint")?;
                at(f)?;
                match self.status {
                    Some(StatusCode::NOT_FOUND) => {
                        f.write_str(" answered 404 not found (check the token url)")?
                    }
                    Some(status) => write!(f, " answered {}", status.as_u16())?,
                    None => f.write_str(" refused the request")?,
                }
            }
            TokenErrorKind::InvalidResponse => {
                f.write_str("invalid token response")?;
                if self.endpoint.is_some() {
                    f.write_str(" from")?;
                    at(f)?;
                }
            }
        }
        if let (Some(status), TokenErrorKind::Redirect | TokenErrorKind::InvalidResponse) =
            (self.status, self.kind)
        {
            write!(f, " (status {})", status.as_u16())?;
        }
        if let Some(detail) = self.detail {
            write!(f, ": {detail}")?;
        }
        if let Some(code) = &self.oauth_error {
            write!(f, " {code}")?;
            if let Some(description) = &self.description {
                write!(f, " ({description})")?;
            }
        } else if let Some(body) = self.body_start() {
            write!(f, " (body: \"{body}\")")?;
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
