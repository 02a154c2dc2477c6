//! [`AuthMiddleware`]: the same credentials, cache and rules for `reqwest` users, as a
//! [`reqwest_middleware::Middleware`](https://docs.rs/reqwest-middleware/0.5/reqwest_middleware/trait.Middleware.html).
//!
//! One [`CredentialCache`] can serve a Tower stack and a reqwest client at once: build the
//! middleware [`from_layer`](AuthMiddleware::from_layer) or
//! [`with_cache`](AuthMiddleware::with_cache) and both share one credential and one refresh.
//!
//! The rules are the layer's: credential headers marked sensitive; `https` only (loopback
//! `http` on request); on a rejection status (default `401`) the credential is invalidated
//! if still current and the request replayed once, when it can be cloned
//! ([`reqwest::Request::try_clone`](https://docs.rs/reqwest/0.13/reqwest/struct.Request.html#method.try_clone); a streaming body cannot, and its 401 is returned as it
//! came); `403` never refreshes; a [`NoReplay`] in the middleware extensions opts a
//! request out of the replay.
//!
//! # Ordering with `reqwest-retry`
//! Put the retry middleware **before** (outside) this one:
//!
//! ```text
//! ClientBuilder::new(reqwest::Client::new())
//!     .with(RetryTransientMiddleware::new_with_policy(policy)) // outer: retries...
//!     .with(AuthMiddleware::new(source))                       // ...each attempt gets a fresh header
//!     .build()
//! ```
//!
//! Middlewares run in the order they are added. With auth inside the retry loop, every
//! attempt takes the credential from the cache, so a retry after a backoff sleep never
//! resends a credential that expired or was rotated meanwhile. The other way round, the
//! retry middleware would clone and resend the first attempt's header.
//!
//! # Example
//! ```
//! use reqwest_middleware::ClientBuilder;
//! use tower_client_auth::{reqwest::AuthMiddleware, StaticCredential};
//!
//! let client = ClientBuilder::new(reqwest::Client::new())
//!     .with(AuthMiddleware::new(StaticCredential::bearer("pat_123")?))
//!     .build();
//! # let _ = client;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::Arc;

use http::{Extensions, StatusCode};
use reqwest_middleware::{Middleware, Next};

use crate::{
    cache::CredentialCache,
    layer::AuthLayer,
    policy::{ExistingHeader, NoReplay, Policy, StatusSet},
    scope::{Origin, Scope},
    source::CredentialSource,
};

/// Adds cached credentials to `reqwest` requests and replays once on rejection. See the
/// [module docs](self).
#[derive(Debug)]
pub struct AuthMiddleware<P> {
    cache: CredentialCache<P>,
    policy: Policy,
    scope: Option<Arc<Scope>>,
}

impl<P> Clone for AuthMiddleware<P> {
    fn clone(&self) -> Self {
        AuthMiddleware {
            cache: self.cache.clone(),
            policy: self.policy,
            scope: self.scope.clone(),
        }
    }
}

impl<P: CredentialSource> AuthMiddleware<P> {
    /// A middleware over a new cache of `source`, with default settings.
    pub fn new(source: P) -> Self {
        Self::with_cache(CredentialCache::new(source))
    }

    /// A middleware over an existing cache, shared with whatever else uses it.
    pub fn with_cache(cache: CredentialCache<P>) -> Self {
        AuthMiddleware {
            cache,
            policy: Policy::default(),
            scope: None,
        }
    }

    /// A middleware sharing `layer`'s cache and settings.
    pub fn from_layer(layer: &AuthLayer<P>) -> Self {
        AuthMiddleware {
            cache: layer.cache().clone(),
            policy: layer.policy(),
            scope: layer.scope(),
        }
    }

    /// The cache behind this middleware.
    pub fn cache(&self) -> &CredentialCache<P> {
        &self.cache
    }

    /// See [`AuthLayer::origin`]: the credential goes to this origin (and any other
    /// given) only; requests elsewhere pass through without it.
    pub fn origin(mut self, origin: Origin) -> Self {
        Scope::add_origin(&mut self.scope, origin);
        self
    }

    /// See [`AuthLayer::origin_matching`].
    pub fn origin_matching<F>(mut self, matches: F) -> Self
    where
        F: Fn(&http::Uri) -> bool + Send + Sync + 'static,
    {
        Scope::add_predicate(&mut self.scope, matches);
        self
    }

    /// See [`AuthLayer::rejection_statuses`].
    pub fn rejection_statuses(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        self.policy.rejections = StatusSet::new(statuses);
        self
    }

    /// See [`AuthLayer::allow_http_loopback`].
    pub fn allow_http_loopback(mut self, allow: bool) -> Self {
        self.policy.allow_http_loopback = allow;
        self
    }

    /// See [`AuthLayer::replay_rejected`].
    pub fn replay_rejected(mut self, replay: bool) -> Self {
        self.policy.replay = replay;
        self
    }

    /// See [`AuthLayer::existing_header`].
    pub fn existing_header(mut self, behaviour: ExistingHeader) -> Self {
        self.policy.existing_header = behaviour;
        self
    }
}

fn middleware_error(err: crate::Error) -> reqwest_middleware::Error {
    reqwest_middleware::Error::middleware(err)
}

#[async_trait::async_trait]
impl<P: CredentialSource> Middleware for AuthMiddleware<P> {
    async fn handle(
        &self,
        mut req: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        let url = req.url();
        if let Some(scope) = &self.scope {
            if !scope.allows_url(url) {
                // Another origin: sent as it is, without the credential.
                return next.run(req, extensions).await;
            }
        }
        self.policy
            .check_transport_parts(Some(url.scheme()), url.host_str())
            .map_err(middleware_error)?;
        let (credential, generation) = match self.cache.current() {
            Ok(current) => (current.credential.clone(), current.generation),
            Err(acquire) => {
                let entry = acquire.await.map_err(middleware_error)?;
                (entry.credential.clone(), entry.generation)
            }
        };
        // Cloned before the credential is attached: a replay gets the new one.
        let replay = if !self.policy.replay
            || !self.cache.refreshes()
            || extensions.get::<NoReplay>().is_some()
        {
            None
        } else {
            req.try_clone()
        };
        let attached = self
            .policy
            .attach(&credential, req.headers_mut())
            .map_err(middleware_error)?;
        if !attached {
            return next.run(req, extensions).await;
        }
        let response = next.clone().run(req, extensions).await?;
        if !self.policy.rejections.contains(response.status()) {
            self.cache.accepted(generation);
            return Ok(response);
        }
        if !self.cache.refreshes() {
            tracing::debug!(status = %response.status(), "fixed credential rejected");
            return Ok(response);
        }
        let rejected = self.cache.credential_of(generation);
        let refresh = self.cache.replace_rejected(generation);
        let Some(mut replay) = replay else {
            tracing::debug!(status = %response.status(), "rejected request cannot be replayed");
            return Ok(response);
        };
        let entry = match refresh.await {
            Ok(entry) => entry,
            Err(err) if err.fresh_rejection => {
                let mut response = response;
                response
                    .extensions_mut()
                    .insert(crate::NotReplayed::FreshCredentialRejected);
                return Ok(response);
            }
            Err(err) => return Err(middleware_error(err)),
        };
        if rejected.as_ref() == Some(&entry.credential) {
            // The source handed back the rejected credential: a replay cannot help.
            tracing::debug!("the source handed back the rejected credential; not replaying");
            let mut response = response;
            response
                .extensions_mut()
                .insert(crate::NotReplayed::SameCredential);
            return Ok(response);
        }
        drop(response);
        entry
            .credential
            .apply(replay.headers_mut())
            .map_err(|e| middleware_error(crate::policy::headers_full(e)))?;
        self.cache.record_replay();
        tracing::debug!(
            generation = entry.generation,
            "replaying request with the new credential"
        );
        let response = next.run(replay, extensions).await?;
        if !self.policy.rejections.contains(response.status()) {
            self.cache.accepted(entry.generation);
        }
        Ok(response)
    }
}
