//! Redirects that keep credentials where they belong: a policy for tower-http's
//! `FollowRedirect`.
//!
//! A redirect is a request to wherever the server says. tower-http's standard policy
//! removes `Authorization`, `Cookie` and `Proxy-Authorization` on a hop to another
//! origin, but not an API-key header or any other header a credential may be made of,
//! and a `FollowRedirect` *above* the layer sends each hop through the layer again as a
//! new request. [`SameOriginCredentials`] closes both gaps, wherever `FollowRedirect`
//! sits:
//!
//! - **below the layer**, on a hop to an origin other than the first request's, it
//!   removes every header the crate marked sensitive (every credential header is), as
//!   well as the ones tower-http's `FilterCredentials` removes;
//! - **above the layer**, it marks each hop with the origin it came from, so a layer
//!   opened to [`any_https_origin`](crate::AuthLayer::any_https_origin) attaches the
//!   credential only at that origin. A layer scoped with
//!   [`origin`](crate::AuthLayer::origin) needs no mark: a hop to an origin it was not
//!   given never gets the credential.
//!
//! Below the layer, a hop is the same request as far as the layer can tell: it carries
//! the credential the first request was sent with, even one dropped (rejected,
//! invalidated, replaced) while the redirect was answered, as a request already on its
//! way carries it. Above the layer, each hop takes the cache's credential as it is when
//! the hop is sent.
//!
//! Both rely on what the request carries: a layer between `FollowRedirect` and this
//! crate's layer must keep the request's extensions (the hop's mark, above) and its
//! header values as they are (the sensitive flag, below), as `map_request` over the
//! same request does; one that builds a new request from parts of the old loses them.
//!
//! A DPoP proof names one request and is good once, so below the layer no hop can
//! carry one: a request that carried a proof follows no redirect (its 3xx goes back to
//! the caller, rather than a hop whose 401 would discard a good token), and no hop
//! carries the first proof. Above the layer, each hop gets a proof of its own.
//!
//! # Example
//! ```
//! use tower::ServiceBuilder;
//! use tower_client_auth::{AuthLayer, StaticCredential, redirect::SameOriginCredentials};
//! use tower_http::follow_redirect::FollowRedirectLayer;
//! # let client = tower::service_fn(|_req: http::Request<tower_client_auth::ReplayBody<String>>| async {
//! #     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
//! # });
//!
//! let client = ServiceBuilder::new()
//!     .layer(FollowRedirectLayer::with_policy(SameOriginCredentials::new()))
//!     .layer(AuthLayer::new(StaticCredential::header("x-api-key", "k3y")?)
//!         .origin("https://api.example.com")?)
//!     .service(client);
//! # let _ = client;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use http::{Request, Uri, header};
use tower_http::follow_redirect::policy::{Action, Attempt, Policy, Standard};

use crate::scope::{RedirectedFrom, same_origin};

/// A `FollowRedirect` policy: `P`'s decisions (tower-http's [`Standard`] by default: at
/// most 20 redirects, standard credential headers removed across origins), and no
/// credential of this crate's past the origin of the first request. See the
/// [module docs](self).
#[derive(Clone, Debug, Default)]
pub struct SameOriginCredentials<P = Standard> {
    inner: P,
    /// The first request's URI: where the credential was meant to go. `FollowRedirect`
    /// clones the policy for each request, so this is per request.
    first: Option<Uri>,
    /// Whether the first request carried a DPoP proof the layer made: a proof names one
    /// request, so no hop below the layer can carry one, and the redirect is handed back
    /// instead.
    proved: bool,
}

impl SameOriginCredentials {
    /// Over tower-http's [`Standard`] policy.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<P> SameOriginCredentials<P> {
    /// Wraps another policy: its decisions, with this policy's credential rule.
    pub fn wrap(inner: P) -> Self {
        SameOriginCredentials {
            inner,
            first: None,
            proved: false,
        }
    }
}

impl<B, E, P: Policy<B, E>> Policy<B, E> for SameOriginCredentials<P> {
    fn redirect(&mut self, attempt: &Attempt<'_>) -> Result<Action, E> {
        if self.proved {
            // A hop would carry the token without a proof (or the first one again), and
            // its 401 would throw a good token away: the 3xx goes back to the caller.
            return Ok(Action::Stop);
        }
        self.inner.redirect(attempt)
    }

    fn on_request(&mut self, request: &mut Request<B>) {
        self.inner.on_request(request);
        let Some(first) = &self.first else {
            self.first = Some(request.uri().clone());
            self.proved = proved(request);
            return;
        };
        // A DPoP proof names one request's method and URI and is good for one use: no
        // hop carries it (for DPoP, put `FollowRedirect` above the layer, so that each
        // hop gets a proof of its own).
        request.headers_mut().remove(crate::bound::DPOP);
        if !same_origin(first, request.uri()) {
            // Below the layer, each hop carries the first request's headers, and so the
            // credential attached to it. Every credential header is marked sensitive.
            let headers = request.headers_mut();
            for name in [
                header::AUTHORIZATION,
                header::COOKIE,
                header::PROXY_AUTHORIZATION,
            ] {
                headers.remove(name);
            }
            let sensitive: Vec<_> = headers
                .iter()
                .filter(|(_, v)| v.is_sensitive())
                .map(|(n, _)| n.clone())
                .collect();
            for name in sensitive {
                headers.remove(name);
            }
        }
        request
            .extensions_mut()
            .insert(RedirectedFrom(first.clone()));
    }

    fn clone_body(&self, body: &B) -> Option<B> {
        self.inner.clone_body(body)
    }
}

/// Whether `request` carries a DPoP proof: the layer's mark, or (for a request rebuilt
/// between the layer and `FollowRedirect`, which loses extensions) a `DPoP` header beside
/// an `Authorization: DPoP` token. A `DPoP` header of the caller's own beside any other
/// credential is not a proof of this crate's and stops nothing.
fn proved<B>(request: &Request<B>) -> bool {
    if request.extensions().get::<crate::bound::Proved>().is_some() {
        return true;
    }
    let headers = request.headers();
    headers.contains_key(crate::bound::DPOP)
        && headers.get_all(header::AUTHORIZATION).iter().any(|value| {
            value
                .as_bytes()
                .get(..5)
                .is_some_and(|scheme| scheme.eq_ignore_ascii_case(b"dpop "))
        })
}
