//! Credential sources over token endpoints: OAuth2 grants and JSON login APIs.
//!
//! - [`TokenRequest`] describes a request a token endpoint expects: URL, JSON or form
//!   body, fields (secret ones held redacted), client authentication.
//! - [`TokenSource`] logs in with one, refreshes with another (rotating refresh tokens),
//!   and turns responses into credentials with the right lifetime.
//! - [`TokenClient`] is the HTTP client token requests go through: your own Tower service,
//!   or the default HTTPS client.
//!
//! Ready-made sources for the common styles:
//!
//! | style | call |
//! |---|---|
//! | OAuth2 client credentials, Basic + form | [`TokenSource::client_credentials`] |
//! | OAuth2 client credentials, JSON body with an audience | `TokenSource::new(TokenRequest::oauth2_client_credentials(..)?.client_auth(ClientAuth::Body).encoding(BodyEncoding::Json).field("audience", ..))` |
//! | session login with key + secret, JWT lifetime | [`TokenSource::session_login`] |
//! | API-key login with rotating refresh tokens | [`TokenSource::api_key_login`] |
//! | any grant + OAuth2 refresh grant | `TokenSource::new(..).refresh_with(TokenRequest::oauth2_refresh_token(..)?, "refresh_token")` |
//!
//! # Example
//! ```no_run
//! use tower_client_auth::{AuthLayer, token::{TokenRequest, TokenSource}};
//!
//! let source = TokenSource::api_key_login(
//!     "https://api.example.com/v3/auth/login",
//!     "https://api.example.com/v3/auth/refresh",
//!     "4f1c0e7a-...",
//! )?
//! .on_refresh(|pair| async move {
//!     // persist pair.refresh_token() so a restart can resume without a login
//!     let _ = pair;
//! });
//! let layer = AuthLayer::new(source).origin("https://api.example.com")?;
//! # let _ = layer;
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! ```

#[cfg(feature = "jwt")]
mod assertion;
mod client;
mod discovery;
#[cfg(feature = "jwt")]
mod dpop;
mod error;
#[cfg(feature = "https")]
mod mtls;
mod request;
mod response;
mod source;

#[cfg(test)]
mod properties;

#[cfg(feature = "jwt")]
#[cfg_attr(docsrs, doc(cfg(feature = "jwt")))]
pub use self::assertion::SigningKey;
#[cfg(feature = "jwt")]
#[cfg_attr(docsrs, doc(cfg(feature = "jwt")))]
pub use self::dpop::DpopKey;
#[cfg(feature = "https")]
#[cfg_attr(docsrs, doc(cfg(feature = "https")))]
pub use self::mtls::ClientIdentity;
pub use self::{
    client::{DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_TOKEN_TIMEOUT, TokenClient},
    discovery::{Issuer, Metadata},
    error::{TokenError, TokenErrorKind},
    request::{BodyEncoding, ClientAuth, TokenRequest},
    response::{MAX_LIFETIME, MIN_LIFETIME, ResponseFields, jwt_expiry},
    source::{
        DEFAULT_CLOCK_SKEW, DEFAULT_ON_REFRESH_TIMEOUT, DEFAULT_TOKEN_LIFETIME, PersistOutcome,
        StoreDownPolicy, TokenPair, TokenSource, TokenStats,
    },
};
