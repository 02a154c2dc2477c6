//! The token endpoint found from the issuer: RFC 8414 (OAuth 2.0 Authorization Server
//! Metadata), falling back to OpenID Connect Discovery 1.0.
//!
//! An [`Issuer`] fetches `/.well-known/oauth-authorization-server` (inserted between the
//! issuer's host and path, RFC 8414 §3.1), and, if that answers a 4xx, the issuer's
//! `/.well-known/openid-configuration`. The document's `issuer` must be identical to the
//! one configured (RFC 8414 §3.3: a document served for another issuer is an attack or a
//! misconfiguration, never used). It is kept for its HTTP cache lifetime
//! (`Cache-Control: max-age`; `no-store` or `no-cache`: not kept; none: one hour, at most
//! a day), and fetched again when the token endpoint answers `404` (the endpoint moved).
//! It is fetched with the token client, under the same rules as token requests: https
//! only (loopback http on request), no redirects, the client's timeout and size cap.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Uri, header};
use http_body_util::Full;
use tokio::time::Instant;

use super::{TokenClient, TokenError, TokenErrorKind};

/// How long a document with no cache header is kept.
const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// How long an expired document serves before the next try, once fetching it again
/// failed.
const STALE_GRACE: Duration = Duration::from_secs(30);

/// The longest a document is kept, whatever its `max-age`.
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// An authorization server known by its issuer identifier: its metadata is fetched when
/// a token request first needs it, and cached. Cheap to clone; clones (and every
/// [`TokenSource`](super::TokenSource) given one) share one cached document and fetch it
/// one at a time.
///
/// ```
/// use tower_client_auth::token::{Issuer, TokenSource};
///
/// // Client credentials at whatever token endpoint the issuer publishes.
/// let source = TokenSource::client_credentials_from_issuer(
///     "https://login.example.com/realms/acme",
///     "my-client",
///     "my-secret",
/// )?;
/// // Any grant: the requests' URLs are replaced by the published token endpoint.
/// let issuer = Issuer::new("https://login.example.com/realms/acme")?;
/// # let _ = (source, issuer);
/// # Ok::<_, tower_client_auth::token::TokenError>(())
/// ```
#[derive(Clone)]
pub struct Issuer {
    inner: Arc<Shared>,
}

struct Shared {
    /// As configured: the document's `issuer` must be this string, exactly.
    issuer: String,
    url: Uri,
    cache: tokio::sync::Mutex<Option<Cached>>,
    fetches: AtomicUsize,
}

struct Cached {
    metadata: Arc<Metadata>,
    until: Instant,
}

/// What this crate reads of an authorization server's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    token_endpoint: Uri,
    auth_methods: Option<Vec<String>>,
    mtls_token_endpoint: Option<Uri>,
}

impl Metadata {
    /// `token_endpoint`.
    pub fn token_endpoint(&self) -> &Uri {
        &self.token_endpoint
    }

    /// `token_endpoint_auth_methods_supported`, if the document lists them (RFC 8414 §2:
    /// omitted means `client_secret_basic`).
    pub fn token_endpoint_auth_methods(&self) -> Option<&[String]> {
        self.auth_methods.as_deref()
    }

    /// Whether the server accepts client authentication `method` at the token endpoint.
    pub fn supports_auth_method(&self, method: &str) -> bool {
        match &self.auth_methods {
            Some(methods) => methods.iter().any(|m| m == method),
            None => method == "client_secret_basic",
        }
    }

    /// `mtls_endpoint_aliases.token_endpoint` (RFC 8705 §5), if any: where a client
    /// authenticating with a certificate sends token requests.
    pub fn mtls_token_endpoint(&self) -> Option<&Uri> {
        self.mtls_token_endpoint.as_ref()
    }
}

impl fmt::Debug for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issuer")
            .field("issuer", &self.inner.issuer)
            .field("fetches", &self.fetches())
            .finish()
    }
}

fn invalid(detail: &'static str) -> TokenError {
    TokenError::new(TokenErrorKind::Discovery).detail(detail)
}

impl Issuer {
    /// An issuer identifier: an absolute `https` URL (plain `http` reaches only a loopback
    /// host, through a client that allows it) with no query or fragment (RFC 8414 §2).
    pub fn new(issuer: &str) -> Result<Self, TokenError> {
        if issuer.contains('#') {
            return Err(
                TokenError::new(TokenErrorKind::InvalidRequest).detail("an issuer has no fragment")
            );
        }
        let url: Uri = issuer.parse().map_err(|e| {
            TokenError::new(TokenErrorKind::InvalidRequest)
                .detail("the issuer is not a valid uri")
                .with_source(e)
        })?;
        if url.scheme().is_none() || url.host().is_none() {
            return Err(TokenError::new(TokenErrorKind::InvalidRequest)
                .detail("the issuer must be an absolute url"));
        }
        if url.query().is_some() {
            return Err(
                TokenError::new(TokenErrorKind::InvalidRequest).detail("an issuer has no query")
            );
        }
        if url.authority().is_some_and(|a| a.as_str().contains('@')) {
            // Never printed or sent: an issuer identifier carries no credentials.
            return Err(
                TokenError::new(TokenErrorKind::InvalidRequest).detail("an issuer has no userinfo")
            );
        }
        crate::policy::check_transport(&url, true, false)
            .map_err(|detail| TokenError::new(TokenErrorKind::InsecureTransport).detail(detail))?;
        Ok(Issuer {
            inner: Arc::new(Shared {
                issuer: issuer.to_owned(),
                url,
                cache: tokio::sync::Mutex::new(None),
                fetches: AtomicUsize::new(0),
            }),
        })
    }

    /// The issuer identifier, as configured.
    pub fn as_str(&self) -> &str {
        &self.inner.issuer
    }

    /// How many metadata documents were fetched (each well-known URL tried counts).
    pub fn fetches(&self) -> usize {
        self.inner.fetches.load(Ordering::Relaxed)
    }

    /// The RFC 8414 URL, then the OpenID Connect one.
    fn well_known(&self) -> [Uri; 2] {
        let url = &self.inner.url;
        let path = url.path().trim_end_matches('/');
        let origin = format!(
            "{}://{}",
            url.scheme_str().unwrap_or("https"),
            url.authority().map(|a| a.as_str()).unwrap_or_default()
        );
        let make = |path: String| -> Uri {
            // Parts of a URI that parsed once: they parse again.
            format!("{origin}{path}")
                .parse()
                .unwrap_or_else(|_| url.clone())
        };
        [
            make(format!("/.well-known/oauth-authorization-server{path}")),
            make(format!("{path}/.well-known/openid-configuration")),
        ]
    }

    /// The metadata, from the cache while it is fresh (and `stale` is not the document
    /// in use, which a token endpoint `404` condemned), or fetched now.
    pub(crate) async fn metadata(
        &self,
        client: &TokenClient,
        stale: Option<&Arc<Metadata>>,
    ) -> Result<Arc<Metadata>, TokenError> {
        let mut cache = self.inner.cache.lock().await;
        let mut fallback = None;
        if let Some(cached) = cache.as_ref() {
            let condemned = stale.is_some_and(|s| Arc::ptr_eq(s, &cached.metadata));
            if !condemned && Instant::now() < cached.until {
                return Ok(cached.metadata.clone());
            }
            // Expired, not condemned: better than nothing if the fetch fails.
            fallback = (!condemned).then(|| cached.metadata.clone());
        }
        match (self.fetch(client, &mut cache).await, fallback) {
            (Err(e), Some(expired)) if e.kind() != TokenErrorKind::InsecureTransport => {
                tracing::warn!(error = %e, "authorization server metadata could not be fetched again; using the expired copy for a while");
                // Not tried again at every token request of the outage.
                *cache = Some(Cached {
                    metadata: expired.clone(),
                    until: Instant::now() + STALE_GRACE,
                });
                Ok(expired)
            }
            (fetched, _) => fetched,
        }
    }

    /// Fetches the document (RFC 8414's URL, then OpenID Connect's) into `cache`.
    async fn fetch(
        &self,
        client: &TokenClient,
        cache: &mut Option<Cached>,
    ) -> Result<Arc<Metadata>, TokenError> {
        let mut last = None;
        for url in self.well_known() {
            self.inner.fetches.fetch_add(1, Ordering::Relaxed);
            let request = Request::get(url.clone())
                .header(header::ACCEPT, "application/json")
                .body(Full::<Bytes>::default())
                .map_err(|e| invalid("the metadata request").with_source(e))?;
            // A failure here is the metadata's, never a token request's: a refresh
            // token waiting to be sent was not sent, whatever went wrong.
            let answer = client.send(request).await.map_err(|e| match e.kind() {
                TokenErrorKind::InsecureTransport => e,
                _ => invalid("the metadata could not be fetched")
                    .endpoint(&url)
                    .with_source(e),
            })?;
            let status = answer.response.status();
            if status.is_client_error() {
                // Not published here: try the other well-known URL.
                last = Some(
                    invalid("no metadata at either well-known url")
                        .status_mut(status)
                        .endpoint(&url),
                );
                continue;
            }
            if !status.is_success() {
                return Err(invalid("the metadata request failed")
                    .status_mut(status)
                    .endpoint(&url));
            }
            let metadata = Arc::new(
                self.parse(answer.response.body())
                    .map_err(|e| e.endpoint(&url))?,
            );
            let ttl = cache_ttl(answer.response.headers());
            *cache = Some(Cached {
                metadata: metadata.clone(),
                until: answer.arrived + ttl,
            });
            tracing::debug!(issuer = %self.inner.issuer, ttl_s = ttl.as_secs(), "fetched authorization server metadata");
            return Ok(metadata);
        }
        Err(last.unwrap_or_else(|| invalid("no metadata at either well-known url")))
    }

    fn parse(&self, body: &[u8]) -> Result<Metadata, TokenError> {
        let doc: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| invalid("the metadata is not JSON").with_source(e))?;
        let doc = doc
            .as_object()
            .ok_or_else(|| invalid("the metadata is not a JSON object"))?;
        match doc.get("issuer").and_then(|v| v.as_str()) {
            Some(issuer) if issuer == self.inner.issuer => {}
            Some(_) => {
                return Err(invalid(
                    "the metadata names another issuer than the one configured (RFC 8414 §3.3): not used",
                ));
            }
            None => return Err(invalid("the metadata has no issuer")),
        }
        let endpoint = |value: Option<&serde_json::Value>| -> Result<Option<Uri>, TokenError> {
            let Some(value) = value else {
                return Ok(None);
            };
            let text = value
                .as_str()
                .ok_or_else(|| invalid("an endpoint in the metadata is not a string"))?;
            let uri: Uri = text
                .parse()
                .map_err(|e| invalid("an endpoint in the metadata is not a url").with_source(e))?;
            if uri.scheme().is_none() || uri.host().is_none() {
                return Err(invalid(
                    "an endpoint in the metadata is not an absolute url",
                ));
            }
            // Plain http (loopback) only from an issuer that is itself on loopback http: a
            // remote issuer must not point secrets at whatever listens on this host.
            let issuer_is_https =
                crate::policy::check_transport(&self.inner.url, false, false).is_ok();
            crate::policy::check_transport(&uri, !issuer_is_https, false).map_err(|detail| {
                TokenError::new(TokenErrorKind::InsecureTransport).detail(detail)
            })?;
            Ok(Some(uri))
        };
        let token_endpoint = endpoint(doc.get("token_endpoint"))?
            .ok_or_else(|| invalid("the metadata has no token_endpoint"))?;
        let auth_methods = match doc.get("token_endpoint_auth_methods_supported") {
            None => None,
            Some(v) => Some(
                v.as_array()
                    .ok_or_else(|| invalid("token_endpoint_auth_methods_supported is not a list"))?
                    .iter()
                    .filter_map(|m| m.as_str().map(str::to_owned))
                    .collect(),
            ),
        };
        let mtls_token_endpoint = endpoint(
            doc.get("mtls_endpoint_aliases")
                .and_then(|a| a.get("token_endpoint")),
        )?;
        Ok(Metadata {
            token_endpoint,
            auth_methods,
            mtls_token_endpoint,
        })
    }
}

/// How long a document may be kept, from its `Cache-Control` (less its `Age`, the time
/// a cache in between already kept it).
fn cache_ttl(headers: &http::HeaderMap) -> Duration {
    let mut ttl = DEFAULT_TTL;
    for value in headers.get_all(header::CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for directive in value.split(',') {
            let (name, arg) = match directive.split_once('=') {
                Some((name, arg)) => (name.trim(), Some(arg.trim().trim_matches('"'))),
                None => (directive.trim(), None),
            };
            if name.eq_ignore_ascii_case("no-store") || name.eq_ignore_ascii_case("no-cache") {
                return Duration::ZERO;
            }
            if name.eq_ignore_ascii_case("max-age") {
                match arg.map(str::parse::<u64>) {
                    Some(Ok(secs)) => ttl = Duration::from_secs(secs),
                    _ => return Duration::ZERO,
                }
            }
        }
    }
    let age = headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_secs);
    ttl.saturating_sub(age).min(MAX_TTL)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8414 §3.1 inserts the well-known segment between host and path; OpenID
    /// Connect appends it.
    #[test]
    fn well_known_urls() {
        let urls = |issuer: &str| {
            Issuer::new(issuer)
                .unwrap()
                .well_known()
                .map(|u| u.to_string())
        };
        assert_eq!(
            urls("https://as.example.com"),
            [
                "https://as.example.com/.well-known/oauth-authorization-server",
                "https://as.example.com/.well-known/openid-configuration"
            ]
        );
        assert_eq!(
            urls("https://as.example.com/realms/acme/"),
            [
                "https://as.example.com/.well-known/oauth-authorization-server/realms/acme",
                "https://as.example.com/realms/acme/.well-known/openid-configuration"
            ]
        );
        assert_eq!(
            urls("http://127.0.0.1:8080/t1")[0],
            "http://127.0.0.1:8080/.well-known/oauth-authorization-server/t1"
        );
    }

    /// What is not an issuer identifier is refused when it is built.
    #[test]
    fn bad_issuers() {
        for bad in [
            "https://as.example.com/?tenant=1",
            "https://as.example.com/#x",
            "https://user:pass@as.example.com/",
            "as.example.com",
            "http://as.example.com",
            "not a url",
        ] {
            assert!(Issuer::new(bad).is_err(), "{bad}");
        }
    }

    /// A request authenticated by its TLS certificate goes to the issuer's
    /// `mtls_endpoint_aliases.token_endpoint` (RFC 8705 §5); any other to
    /// `token_endpoint`.
    #[test]
    fn mtls_requests_use_the_alias() {
        let issuer = Issuer::new("https://as.example.com").unwrap();
        let metadata = issuer
            .parse(
                br#"{"issuer": "https://as.example.com",
                     "token_endpoint": "https://as.example.com/token",
                     "mtls_endpoint_aliases": {"token_endpoint": "https://mtls.as.example.com/token"}}"#,
            )
            .unwrap();
        let mtls = super::super::TokenRequest::oauth2_client_credentials_mtls(
            "https://as.example.com",
            "id",
        )
        .unwrap();
        assert_eq!(
            mtls.at(&metadata).url(),
            "https://mtls.as.example.com/token"
        );
        let secret = super::super::TokenRequest::oauth2_client_credentials(
            "https://as.example.com",
            "id",
            "s",
        )
        .unwrap();
        assert_eq!(secret.at(&metadata).url(), "https://as.example.com/token");
    }

    /// A remote https issuer may not point the token endpoint at plain http, loopback
    /// included; an issuer on loopback http may.
    #[test]
    fn a_remote_issuer_cannot_point_at_local_http() {
        let doc = |issuer: &str| {
            format!(r#"{{"issuer": "{issuer}", "token_endpoint": "http://127.0.0.1:9/token"}}"#)
        };
        let remote = Issuer::new("https://as.example.com").unwrap();
        let err = remote
            .parse(doc("https://as.example.com").as_bytes())
            .unwrap_err();
        assert_eq!(err.kind(), TokenErrorKind::InsecureTransport);
        let local = Issuer::new("http://127.0.0.1:8").unwrap();
        assert!(local.parse(doc("http://127.0.0.1:8").as_bytes()).is_ok());
    }

    #[test]
    fn cache_lifetimes() {
        let ttl = |value: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(header::CACHE_CONTROL, value.parse().unwrap());
            cache_ttl(&headers)
        };
        assert_eq!(cache_ttl(&http::HeaderMap::new()), DEFAULT_TTL);
        assert_eq!(ttl("public, max-age=600"), Duration::from_secs(600));
        assert_eq!(ttl("max-age=0"), Duration::ZERO);
        assert_eq!(ttl("no-store"), Duration::ZERO);
        assert_eq!(ttl("max-age=600, no-cache"), Duration::ZERO);
        assert_eq!(ttl("max-age=99999999"), MAX_TTL);
        assert_eq!(ttl("max-age=soon"), Duration::ZERO);
        assert_eq!(ttl("Max-Age = 600"), Duration::from_secs(600));
        let mut aged = http::HeaderMap::new();
        aged.insert(header::CACHE_CONTROL, "max-age=600".parse().unwrap());
        aged.insert(header::AGE, "100".parse().unwrap());
        assert_eq!(cache_ttl(&aged), Duration::from_secs(500));
        aged.insert(header::AGE, "9999".parse().unwrap());
        assert_eq!(cache_ttl(&aged), Duration::ZERO);
    }
}
