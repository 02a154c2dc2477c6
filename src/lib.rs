//! Client-side authentication middleware for Tower.
//!
//! [`AuthLayer`] wraps any `tower::Service<http::Request<B>>` (a hyper-util client, an
//! axum app's outgoing client, a tonic channel) and, on every request:
//!
//! 1. takes a credential (`Authorization: Bearer …`, `Authorization: Secret …`,
//!    `Cookie: …`, an API-key header) from a [`CredentialSource`];
//! 2. caches it and reuses it until shortly before it expires, refreshing it **once** for
//!    all concurrent callers, in the background while it is still valid
//!    ([`CredentialCache`]);
//! 3. when the API still answers `401`, invalidates exactly the rejected credential,
//!    fetches a new one and **replays the request once**; request bodies are retained as
//!    they stream, up to a limit, for that ([`ReplayBody`]);
//! 4. never sends a credential over plain HTTP to a non-loopback host, and never prints
//!    one: header values are marked sensitive and `Debug` output is redacted.
//!
//! # Example
//! ```
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use bytes::Bytes;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_client_auth::{AuthLayer, ReplayBody, StaticCredential};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_client_auth::BoxError> {
//! // Any `Service<Request<ReplayBody<B>>>`: here, one that checks the header.
//! let api = tower::service_fn(|req: Request<ReplayBody<Full<Bytes>>>| async move {
//!     let ok = req.headers()["authorization"] == "Bearer pat_123";
//!     let status = if ok { StatusCode::OK } else { StatusCode::UNAUTHORIZED };
//!     Ok::<_, std::convert::Infallible>(Response::builder().status(status).body(()).unwrap())
//! });
//!
//! let client = ServiceBuilder::new()
//!     .layer(AuthLayer::new(StaticCredential::bearer("pat_123")))
//!     .service(api);
//!
//! let req = Request::get("https://api.example.com/v1/me").body(Full::default())?;
//! let res = client.oneshot(req).await?;
//! assert_eq!(res.status(), StatusCode::OK);
//! # Ok(())
//! # }
//! ```
//!
//! # Where things are
//! - [`CredentialSource`], [`source_fn`]: where credentials come from (`source.rs`).
//! - [`StaticCredential`], [`RotatingCredential`]: fixed and swappable tokens.
//! - [`CredentialCache`]: all of the refresh logic (`cache.rs`).
//! - [`CredentialStore`]: the seam for sharing credentials between processes (`store.rs`).
//! - [`AuthLayer`], [`Auth`], [`ResponseFuture`]: the middleware; the per-request state
//!   machine is in `future.rs`.
//! - [`ReplayBody`]: body retention and replay (`body.rs`).
//!
//! # Security
//! - Credentials go only to `https` URIs. Plain `http` to loopback hosts is allowed with
//!   [`AuthLayer::allow_http_loopback`]; to any other host it fails with
//!   [`ErrorKind::InsecureTransport`] before a byte is sent.
//! - Credential header values are [sensitive](http::HeaderValue::set_sensitive); no type
//!   of this crate prints a secret in `Debug` or `Display`, and tracing events carry none.
//! - This layer follows no redirects. If you add a redirect layer *below* it, make it
//!   drop credentials on cross-origin redirects.

#![cfg_attr(docsrs, feature(doc_cfg))]

mod body;
pub mod cache;
mod credential;
mod error;
mod future;
mod layer;
mod policy;
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub mod reqwest;
mod secret;
mod service;
pub mod source;
mod static_source;
pub mod store;
pub mod token;

pub use crate::{
    body::{DEFAULT_REPLAY_LIMIT, NotReplayed, ReplayBody},
    cache::{CacheHandle, CacheStats, CredentialCache, CredentialCacheBuilder},
    credential::Credential,
    error::{BoxError, Error, ErrorKind, InvalidCredential},
    future::ResponseFuture,
    layer::AuthLayer,
    policy::{DEFAULT_REJECTION_STATUSES, ExistingHeader, NoReplay},
    secret::Secret,
    service::Auth,
    source::{CredentialSource, FetchContext, FetchReason, RefreshMode, SourceFn, source_fn},
    static_source::{RotatingCredential, StaticCredential},
    store::{CredentialStore, MemoryStore},
};
