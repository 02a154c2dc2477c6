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
//! 4. sends a credential only to the origins it was given (a redirect elsewhere gets
//!    none), never over plain HTTP to a non-loopback host, and never prints one: header
//!    values are marked sensitive and `Debug` output is redacted.
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
//!     .layer(AuthLayer::new(StaticCredential::bearer("pat_123")?)
//!         .origin("https://api.example.com")?)
//!     .service(api);
//!
//! let req = Request::get("https://api.example.com/v1/me").body(Full::default())?;
//! let res = client.oneshot(req).await?;
//! assert_eq!(res.status(), StatusCode::OK);
//! # Ok(())
//! # }
//! ```
//!
//! # Guide
//!
//! ## 1. Choose a source
//!
//! | your API uses | source |
//! |---|---|
//! | a fixed token, API key, cookie or `Secret` header | [`StaticCredential`] |
//! | a token someone re-issues at runtime | [`RotatingCredential`] (call `rotate`) |
//! | OAuth2 client credentials | [`token::TokenSource::client_credentials`], or `TokenSource::new(TokenRequest::oauth2_client_credentials(..)?)` for scopes, audiences, JSON bodies |
//! | a JSON login returning a JWT | [`token::TokenSource::session_login`] |
//! | a login plus rotating refresh tokens | [`token::TokenSource::api_key_login`], or any login with `.refresh_with(..)` |
//! | anything else | [`source_fn`] with an async closure, or implement [`CredentialSource`] |
//!
//! ## 2. Add the layer
//!
//! `AuthLayer::new(source)` goes where the credential should be added: usually right
//! above the HTTP client, below retries and timeouts (so a timeout covers the refresh and
//! the replay). Scope it to the API's origin ([`AuthLayer::origin`]): an unscoped layer
//! sends the credential to every host its client calls.
//!
//! **In its default mode the inner service receives `Request<ReplayBody<B>>`** and must
//! be `Clone`, because a rejected request is replayed through a clone with its retained
//! body: build the client for that body type
//! (`Client::builder(..).build_http::<ReplayBody<Full<Bytes>>>()`). A client typed for
//! `Full<Bytes>` fails to compile with an error that never names `ReplayBody`:
//!
//! ```text
//! error[E0599]: the method `oneshot` exists for struct `AddCredential<Client<HttpConnector, http_body_util::Full<bytes::Bytes>>, StaticCredential>`, but its trait bounds were not satisfied
//!    = note: the following trait bounds were not satisfied:
//!            `AddCredential<Client<HttpConnector, http_body_util::Full<bytes::Bytes>>, StaticCredential>: Service<_>`
//! ```
//!
//! **Without replay** ([`AuthLayer::without_replay`], the [`Direct`] mode; the natural
//! choice for a [`StaticCredential`]) the inner service receives `Request<B>` unchanged
//! and need not be `Clone`, as under tower-http's `AddAuthorization`: only replay changes
//! the body type. See [`AuthLayer`]'s "Two modes".
//!
//! To send unauthenticated requests through the same client, wrap their body with
//! [`ReplayBody::new`]. A tonic channel takes the layer without replay as it is, or with
//! replay through one `map_request` into tonic's body type, and
//! [`GrpcUnauthenticated`](rejection::GrpcUnauthenticated) makes `grpc-status: 16` a
//! rejection (the crate's `grpc` example). Share one [`CredentialCache`] between several layers, or
//! with a reqwest client (feature `reqwest`), through [`AuthLayer::with_cache`].
//!
//! ## 3. What happens on expiry and on 401
//!
//! A credential with an expiry is refreshed before it expires: in the *soft* window (the
//! last quarter of its lifetime, at most 5 minutes, with jitter) one background refresh
//! runs while requests keep using it; in the *hard* window (the last twentieth, at most
//! 30 s) requests wait for that one refresh. Sources that reject early refreshes say
//! [`RefreshMode::ReactiveOnly`] and are refreshed only after a rejection.
//!
//! When the API answers `401` (configurable: [`AuthLayerBuilder::rejection_statuses`]), the
//! credential the request carried is invalidated if it is still the current one, one
//! fetch replaces it for everybody, and the request is sent once more with the new one.
//! A second `401` is returned as is. `403` never triggers a refresh. The API's
//! `WWW-Authenticate` challenge is read ([`challenge`]): `insufficient_scope` (on a `401`
//! or `403`) is not a rejection (nothing invalidated, the response marked
//! [`rejection::InsufficientScope`]) unless [`AuthLayer::step_up`] asks the source for a
//! wider grant and replays once; any other rule, `grpc-status: 16` for tonic among them,
//! is a [`rejection::RejectionPolicy`] ([`AuthLayer::rejection_policy`]). A DPoP-bound
//! credential (`TokenSource::dpop`, feature `jwt`) carries a proof made for each
//! request; an API's `use_dpop_nonce` or `invalid_dpop_proof` faults the proof, not the
//! token, and the request is sent once more with a new proof and the same token, if it
//! is still the cache's when the answer comes (else the cache's). A credential that
//! cannot change ([`StaticCredential`], [`RefreshMode::Never`]) is never replayed: its
//! `401` is returned at once, marked [`NotReplayed::FixedCredential`]. A failing source
//! backs off exponentially; still-valid credentials keep being used meanwhile, and
//! callers with nothing valid get [`ErrorKind::Backoff`] at once.
//!
//! ## 4. Body replay limits
//!
//! Bodies stream to the inner service untouched; chunks are retained (shared `Bytes`, no
//! copies) up to [`DEFAULT_REPLAY_LIMIT`] (64 KiB; [`AuthLayer::replay_limit`]). Past the
//! limit the retained chunks are freed at once and a `401` is returned with a
//! [`NotReplayed::BodyTooLarge`] extension. Empty bodies always replay. Mark requests that
//! must never be sent twice with the [`NoReplay`] extension.
//!
//! ## 5. Security defaults
//!
//! - Credentials go only to `https` URIs (the scheme in lower case, as `http` parses it
//!   and as a connector starts TLS for it: not one built as `HTTPS`, nor `wss`); plain
//!   `http` only to loopback hosts and only
//!   with [`AuthLayer::allow_http_loopback`]; URIs without a scheme only with
//!   [`AuthLayer::allow_relative_uris`]. Anything else fails with
//!   [`ErrorKind::InsecureTransport`] before a byte is sent. Token requests follow the
//!   same rule, never follow redirects, and have their own timeout.
//! - Credential header values are [sensitive](https://docs.rs/http/1/http/header/struct.HeaderValue.html#method.set_sensitive); no type
//!   of this crate prints a secret in `Debug` or `Display`, errors scrub secrets the
//!   server echoes, and tracing events carry none.
//! - A request that already carries the credential's header is passed through untouched
//!   ([`ExistingHeader`]).
//! - A layer sends its credential only to the origins it was given
//!   ([`AuthLayer::origin`]); one given none refuses every request with
//!   [`ErrorKind::NoOrigin`], and every origin is an explicit opt-in
//!   ([`AuthLayer::any_https_origin`]). This layer follows no redirects: with tower-http's
//!   `FollowRedirect` above it, a hop to another origin is a request it was not given;
//!   below it, install `redirect::SameOriginCredentials` (feature `tower-http`), which
//!   removes every credential header on a hop to another origin. reqwest follows
//!   redirects inside the client: build it with `reqwest::redirect_policy()`.
//!
//! ## 6. Tune the windows
//!
//! [`AuthLayer::builder`] reaches every setting, the cache's and the layer's, and checks
//! them when it is built ([`InvalidConfig`] names the setting at fault):
//!
//! ```
//! use std::time::Duration;
//! use tower_client_auth::{AuthLayer, StaticCredential};
//!
//! let layer = AuthLayer::builder(StaticCredential::bearer("t")?)
//!     .origin("https://api.example.com")?
//!     .soft_window(Duration::from_secs(60)) // background refresh at most 60 s before expiry
//!     .hard_window(Duration::from_secs(5)) // stop sending it 5 s before expiry
//!     .window_jitter(0.1)
//!     .fetch_timeout(Duration::from_secs(5))
//!     .backoff(Duration::from_millis(500), Duration::from_secs(20))
//!     .replay_limit(1 << 20)
//!     .build()?;
//! # let _ = layer;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## 7. Write your own source
//!
//! ```
//! use std::time::Duration;
//! use tokio::sync::Mutex;
//! use tower_client_auth::{BoxError, Credential, CredentialSource, FetchContext, FetchReason};
//!
//! /// Exchanges a long-lived key for short-lived tokens.
//! struct KeyExchange {
//!     key: String,
//!     exchanges: Mutex<u64>,
//! }
//!
//! impl CredentialSource for KeyExchange {
//!     async fn fetch(&self, cx: FetchContext) -> Result<Credential, BoxError> {
//!         let mut n = self.exchanges.lock().await;
//!         *n += 1;
//!         if cx.reason() == FetchReason::Rejected {
//!             // cx.previous() is the credential the API refused.
//!         }
//!         // ... call your endpoint with self.key; keep secrets out of error messages ...
//!         let token = format!("token-{n}");
//!         Ok(Credential::bearer(token)?.expires_in(Duration::from_secs(900)))
//!     }
//! }
//! # let _ = KeyExchange { key: String::new(), exchanges: Mutex::new(0) }.key;
//! ```
//!
//! The cache calls `fetch` from a task of its own, at most once at a time, under its
//! fetch timeout. Return a typed error; it reaches callers as [`ErrorKind::Fetch`] with
//! yours reachable with [`Error::get_ref`] (its text is part of the error's `Display`).
//!
//! # Where things are
//! - [`CredentialSource`], [`source_fn`]: where credentials come from.
//! - [`StaticCredential`], [`RotatingCredential`]: fixed and swappable tokens.
//! - [`token`]: OAuth2 and login sources and the token client.
//! - [`CredentialCache`]: all of the refresh logic.
//! - [`CredentialStore`]: the seam for sharing credentials between processes.
//! - [`AuthLayer`], [`AddCredential`], [`ResponseFuture`]: the middleware and the
//!   per-request state machine; [`Direct`], [`DirectFuture`]: the mode without replay.
//! - [`ReplayBody`]: body retention and replay.
//!
//! # Features
//!
//! | feature | default | adds |
//! |---|---|---|
//! | `token` | yes (through `https`) | the [`token`] module: token endpoint sources and their parsers |
//! | `https` | yes | implies `token`; `token::TokenClient::hyper_rustls`: hyper-util over rustls (`ring`, webpki roots) |
//! | `redis` | no | `store::redis::RedisStore`: one credential and one fetch for a fleet, on Redis |
//! | `reqwest` | no | implies `token`; `reqwest::AuthMiddleware` for `reqwest-middleware`; token requests through reqwest by default when `https` is off |

#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
// The docs link items of every feature: built with some features only, those links
// cannot resolve. Built with all of them (`.ci/run`, docs.rs), every link is checked.
#![cfg_attr(
    not(all(
        feature = "https",
        feature = "jwt",
        feature = "redis",
        feature = "redis-tls",
        feature = "file-store",
        feature = "metrics",
        feature = "tower-http",
        feature = "reqwest"
    )),
    allow(rustdoc::broken_intra_doc_links)
)]

/// README.md's code blocks, compiled as doc tests: the quickstart must build as shown.
#[cfg(all(doctest, feature = "https"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

mod body;
mod bound;
pub mod cache;
pub mod challenge;
pub mod clock;
mod credential;
mod direct;
mod error;
mod future;
mod handle;
mod head;
#[macro_use]
mod layer;
mod metrics;
mod policy;
#[cfg(feature = "tower-http")]
#[cfg_attr(docsrs, doc(cfg(feature = "tower-http")))]
pub mod redirect;
pub mod rejection;
#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
pub mod reqwest;
mod scope;
mod secret;
mod service;
pub mod source;
mod static_source;
pub mod store;
mod text;
#[cfg(feature = "token")]
#[cfg_attr(docsrs, doc(cfg(feature = "token")))]
pub mod token;

pub use crate::{
    body::{DEFAULT_REPLAY_LIMIT, NotReplayed, ReplayBody},
    cache::{CacheHandle, CacheStats, CredentialCache, CredentialCacheBuilder},
    credential::Credential,
    direct::{Direct, DirectFuture},
    error::{BoxError, Error, ErrorKind, InvalidConfig, InvalidCredential},
    future::ResponseFuture,
    layer::{AuthLayer, AuthLayerBuilder},
    policy::{DEFAULT_REJECTION_STATUSES, ExistingHeader, NoReplay},
    scope::{InvalidOrigin, Origin},
    secret::Secret,
    service::{AddCredential, Replaying},
    source::{
        CredentialSource, FetchContext, FetchReason, RefreshMode, RefreshSharing,
        SharedCredentialSource, SourceFn, source_fn,
    },
    static_source::{RotatingCredential, StaticCredential},
    store::{CredentialStore, MemoryStore},
};
