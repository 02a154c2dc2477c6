//! [`TokenClient`]: the HTTP client token requests go through.
//!
//! Token requests never go through the wrapped service stack: a refresh must not wait for
//! permits (concurrency limits, buffers) that the requests waiting for it hold, and must
//! not recurse into the auth layer. Any `tower::Service<http::Request<Full<Bytes>>>` can
//! be the client; the default is an HTTPS client (hyper-util and rustls with webpki roots,
//! feature `https`). Whatever the client, the token client applies its own rules: its own
//! timeout, no redirects followed, a cap on the response size, and `https` only (plain
//! `http` to loopback when allowed).

use std::{fmt, future::Future, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response, header};
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};
use tokio::time::Instant;
use tower::ServiceExt;
use tower_service::Service;

use super::error::{TokenError, TokenErrorKind};
use crate::error::BoxError;

/// Default time a token request may take, response body included: 8 seconds, shorter
/// than the cache's [`DEFAULT_FETCH_TIMEOUT`](crate::cache::DEFAULT_FETCH_TIMEOUT) on
/// purpose.
///
/// The two bound different things. The token client's timeout bounds one request to the
/// token endpoint: when it fires, the outcome of a refresh is unknown (the server may
/// have rotated the refresh token), so [`TokenSource`](super::TokenSource) drops that
/// refresh token, never presents it again, and logs in instead. The cache's fetch
/// timeout bounds how long callers wait. With the token timeout the shorter, an exchange
/// always ends (in an answer, or in a login after the unknown outcome) while the cache
/// still waits for it. If you set it longer than the fetch timeout, the cache gives up
/// first and the exchange goes on in its own task; its result is handed to the next
/// fetch, so a late rotation is still never lost.
pub const DEFAULT_TOKEN_TIMEOUT: Duration = Duration::from_secs(8);
/// Default cap on a token response body: 64 KiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024;

type Send_ = Pin<Box<dyn Future<Output = Result<Answer, SendError>> + Send>>;

enum SendError {
    Transport(BoxError),
    TooLarge,
    /// The client followed a redirect on its own: the answer is not the token
    /// endpoint's.
    #[cfg_attr(not(feature = "reqwest"), allow(dead_code))]
    Redirected,
}

/// A token endpoint's answer, as the sources read it.
pub(crate) struct Answer {
    pub(crate) response: Response<Bytes>,
    /// When the response head arrived: lifetimes are measured from here.
    pub(crate) arrived: Instant,
}

/// The client token requests go through. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct TokenClient {
    send: Arc<dyn Fn(Request<Full<Bytes>>, usize) -> Send_ + Send + Sync>,
    timeout: Duration,
    max_response_bytes: usize,
    allow_http_loopback: bool,
    /// For a reqwest client: the proxies it takes from the environment, as it reads them
    /// (see [`client_without_proxy`](Self::client_without_proxy)).
    #[cfg(feature = "reqwest")]
    env_proxies: Option<Arc<hyper_util::client::proxy::matcher::Matcher>>,
}

impl fmt::Debug for TokenClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenClient")
            .field("timeout", &self.timeout)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("allow_http_loopback", &self.allow_http_loopback)
            .finish()
    }
}

impl TokenClient {
    /// Uses any Tower HTTP client for token requests.
    ///
    /// # Redirects
    ///
    /// The token client never follows a redirect: a 3xx answer is
    /// [`TokenErrorKind::Redirect`]. It cannot stop a client that follows redirects
    /// itself before answering, and such a client sends the token request, client
    /// secret included (in the body or the Basic header), to wherever the redirect
    /// points. Give this a client that does not follow redirects: hyper-util's client
    /// never does; `tower_http::follow_redirect` must not be in the stack; a reqwest
    /// client needs `redirect(reqwest::redirect::Policy::none())`.
    ///
    /// ```
    /// use tower_client_auth::token::TokenClient;
    /// # use bytes::Bytes; use http_body_util::Full;
    /// # let my_client = tower::service_fn(|_req: http::Request<Full<Bytes>>| async {
    /// #     Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
    /// # });
    /// let client = TokenClient::from_service(my_client);
    /// # let _ = client;
    /// ```
    pub fn from_service<S, B>(service: S) -> Self
    where
        S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + Sync + 'static,
        S::Future: Send,
        S::Error: Into<BoxError>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let send = move |req: Request<Full<Bytes>>, max: usize| -> Send_ {
            let service = service.clone();
            Box::pin(async move {
                let response = service
                    .oneshot(req)
                    .await
                    .map_err(|e| SendError::Transport(e.into()))?;
                let arrived = Instant::now();
                let (parts, body) = response.into_parts();
                let body = Limited::new(body, max).collect().await.map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        SendError::TooLarge
                    } else {
                        SendError::Transport(e)
                    }
                })?;
                Ok(Answer {
                    response: Response::from_parts(parts, body.to_bytes()),
                    arrived,
                })
            })
        };
        TokenClient {
            send: Arc::new(send),
            timeout: DEFAULT_TOKEN_TIMEOUT,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            allow_http_loopback: false,
            #[cfg(feature = "reqwest")]
            env_proxies: None,
        }
    }

    /// Longest time one token request may take (default [`DEFAULT_TOKEN_TIMEOUT`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Largest token response body read (default [`DEFAULT_MAX_RESPONSE_BYTES`]).
    pub fn max_response_bytes(mut self, bytes: usize) -> Self {
        self.max_response_bytes = bytes;
        self
    }

    /// Allows plain `http` token URLs on loopback hosts, for tests and local development
    /// (default `false`). Other plain `http` URLs are always refused.
    pub fn allow_http_loopback(mut self, allow: bool) -> Self {
        self.allow_http_loopback = allow;
        self
    }

    /// Sends a token request. Redirects are errors; the body is read whole, within the cap.
    pub(crate) async fn send(&self, request: Request<Full<Bytes>>) -> Result<Answer, TokenError> {
        crate::policy::check_transport(request.uri(), self.allow_http_loopback, false).map_err(
            |detail| {
                TokenError::new(TokenErrorKind::InsecureTransport).detail(
                    crate::policy::name_the_setter(
                        detail,
                        "plain http to a loopback host: call TokenSource::allow_http_loopback(true) (or TokenClient's)",
                    ),
                )
            },
        )?;
        #[cfg(feature = "reqwest")]
        if (self.env_proxies.as_deref())
            .is_some_and(|proxies| crate::policy::proxied(proxies, request.uri()))
        {
            return Err(TokenError::new(TokenErrorKind::InsecureTransport).detail(
                "plain http to a loopback host would go through a proxy (HTTP_PROXY or ALL_PROXY, not excluded by NO_PROXY), which may send it on anywhere: build the reqwest client with .no_proxy() and call TokenClient::client_without_proxy, or add the host to NO_PROXY",
            ));
        }
        let sent =
            tokio::time::timeout(self.timeout, (self.send)(request, self.max_response_bytes)).await;
        let response = match sent {
            Err(_) => return Err(TokenError::new(TokenErrorKind::Timeout)),
            Ok(Err(SendError::Transport(e))) => {
                let kind = if never_sent(&*e) {
                    TokenErrorKind::Connect
                } else {
                    TokenErrorKind::Transport
                };
                return Err(TokenError::new(kind).with_source(e));
            }
            Ok(Err(SendError::Redirected)) => {
                return Err(TokenError::new(TokenErrorKind::Redirect)
                    .detail("the http client followed a redirect; build it with redirects off"));
            }
            Ok(Err(SendError::TooLarge)) => {
                return Err(TokenError::new(TokenErrorKind::InvalidResponse)
                    .detail("the response body is larger than the client accepts")
                    .unread());
            }
            Ok(Ok(answer)) => answer,
        };
        let status = response.response.status();
        if status.is_redirection() {
            return Err(TokenError::new(TokenErrorKind::Redirect).status_mut(status));
        }
        Ok(response)
    }

    /// The content type of an answer, for parsing.
    pub(crate) fn content_type(response: &Response<Bytes>) -> Option<&str> {
        response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
    }
}

/// Whether a client error proves the request never left: the connection could not be
/// made (refused, DNS, TLS). Only the default client's errors can tell; any other
/// client's transport error may have come after the request was written.
fn never_sent(error: &(dyn std::error::Error + 'static)) -> bool {
    #[cfg(feature = "https")]
    if let Some(e) = error.downcast_ref::<hyper_util::client::legacy::Error>() {
        return e.is_connect() || client_certificate_refused(error);
    }
    #[cfg(feature = "reqwest")]
    if let Some(e) = error.downcast_ref::<reqwest::Error>() {
        return e.is_connect();
    }
    let _ = error;
    false
}

/// Whether the server refused the TLS client certificate. In TLS 1.3 the server judges
/// it after the client's side of the handshake has ended, so the refusal (an alert)
/// arrives after the request was written; the server never read it, and a refresh token
/// in it is unspent.
#[cfg(feature = "https")]
fn client_certificate_refused(error: &(dyn std::error::Error + 'static)) -> bool {
    use rustls::AlertDescription as A;
    let mut source = Some(error);
    while let Some(e) = source {
        let tls = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::AlertReceived(alert)) = tls {
            return matches!(
                alert,
                A::CertificateRequired
                    | A::BadCertificate
                    | A::UnsupportedCertificate
                    | A::CertificateRevoked
                    | A::CertificateExpired
                    | A::CertificateUnknown
                    | A::UnknownCA
                    | A::AccessDenied
            );
        }
        source = e.source();
    }
    false
}

#[cfg(feature = "reqwest")]
#[cfg_attr(docsrs, doc(cfg(feature = "reqwest")))]
impl TokenClient {
    /// Sends token requests through your reqwest client: one HTTP stack and one TLS
    /// provider for the API and the token endpoint, with the client's proxies and
    /// roots. The default for reqwest users.
    ///
    /// The client must not follow redirects, or it would send the token request, client
    /// secret included, to wherever a redirect points. Build it with
    /// `redirect(Policy::none())`, as below. The token client checks the final URL of
    /// every answer and refuses one that came from elsewhere
    /// ([`TokenErrorKind::Redirect`]), but by then a client that follows redirects has
    /// already sent the request there.
    ///
    /// ```
    /// use tower_client_auth::token::{TokenClient, TokenSource};
    ///
    /// let http = reqwest::Client::builder()
    ///     .redirect(reqwest::redirect::Policy::none())
    ///     .build()
    ///     .expect("a reqwest client");
    /// let source = TokenSource::client_credentials("https://idp.example/oauth/token", "id", "secret")?
    ///     .client(TokenClient::reqwest(http));
    /// # let _ = source;
    /// # Ok::<_, tower_client_auth::token::TokenError>(())
    /// ```
    pub fn reqwest(client: reqwest::Client) -> Self {
        let send = move |req: Request<Full<Bytes>>, max: usize| -> Send_ {
            let client = client.clone();
            Box::pin(async move {
                // The URL is the token URL, whose query may hold a key: never kept in
                // an error (its `Display` and `Debug` would show it).
                let transport = |e: reqwest::Error| SendError::Transport(Box::new(e.without_url()));
                let (parts, body) = req.into_parts();
                // A `Full` body is one chunk, and cannot fail.
                let body = body
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                let req = reqwest::Request::try_from(Request::from_parts(parts, body))
                    .map_err(transport)?;
                let sent_to = req.url().clone();
                let mut res = client.execute(req).await.map_err(transport)?;
                let arrived = Instant::now();
                if *res.url() != sent_to {
                    return Err(SendError::Redirected);
                }
                let mut body = bytes::BytesMut::new();
                while let Some(chunk) = res.chunk().await.map_err(transport)? {
                    if body.len() + chunk.len() > max {
                        return Err(SendError::TooLarge);
                    }
                    body.extend_from_slice(&chunk);
                }
                let mut response = Response::new(body.freeze());
                *response.status_mut() = res.status();
                *response.headers_mut() = std::mem::take(res.headers_mut());
                Ok(Answer { response, arrived })
            })
        };
        TokenClient {
            send: Arc::new(send),
            timeout: DEFAULT_TOKEN_TIMEOUT,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            allow_http_loopback: false,
            #[cfg(feature = "reqwest")]
            env_proxies: crate::policy::env_proxies(),
        }
    }

    /// Says that the reqwest client given to [`reqwest`](Self::reqwest) takes no proxy
    /// from the environment (it was built with `.no_proxy()`).
    ///
    /// With [`allow_http_loopback`](Self::allow_http_loopback), a plain-http token
    /// request to a loopback host is refused (`TokenErrorKind::InsecureTransport`,
    /// nothing sent) when the proxy variables a default reqwest client reads
    /// (`HTTP_PROXY`, `ALL_PROXY`, less `NO_PROXY`; on macOS and Windows also the
    /// system's settings) would send it, client secret included, to any proxy, even one
    /// listening on this host (which may send it on anywhere, unseen; see
    /// [`AuthMiddleware::client_without_proxy`](crate::reqwest::AuthMiddleware::client_without_proxy)).
    /// The variables are read when
    /// [`reqwest`](Self::reqwest) is called, as the reqwest client read them when it was
    /// built: build both in the same environment. This client cannot see the reqwest
    /// client's own settings; this tells it (a client with proxies of its own is yours
    /// to keep off loopback hosts).
    pub fn client_without_proxy(mut self) -> Self {
        self.env_proxies = None;
        self
    }
}

#[cfg(feature = "https")]
#[cfg_attr(docsrs, doc(cfg(feature = "https")))]
impl TokenClient {
    /// The default token client: hyper-util over rustls (the `ring` provider, HTTP/1.1 and
    /// HTTP/2) trusting the webpki roots; what a [`TokenSource`](crate::token::TokenSource)
    /// uses unless given another. It speaks https only; plain http to a loopback host
    /// (a test server) on request, with
    /// [`TokenSource::allow_http_loopback`](crate::token::TokenSource::allow_http_loopback)
    /// or [`allow_http_loopback`](Self::allow_http_loopback). Processes share one default
    /// client and its connections.
    ///
    /// It honours the standard proxy variables as curl reads them (`HTTPS_PROXY`,
    /// `ALL_PROXY`, `NO_PROXY`, lower case too), read when the client is first built:
    /// https token requests to a proxied host go through an HTTP `CONNECT` tunnel (with
    /// the proxy URL's credentials as `Proxy-Authorization`), so a corporate network
    /// that lets the API through lets the token endpoint through too.
    pub fn hyper_rustls() -> Result<Self, TokenError> {
        static DEFAULT: std::sync::OnceLock<Result<TokenClient, &'static str>> =
            std::sync::OnceLock::new();
        DEFAULT
            .get_or_init(|| {
                Self::hyper_rustls_with_roots(Vec::<Vec<u8>>::new()).map_err(|_| "tls setup failed")
            })
            .clone()
            .map_err(|detail| TokenError::new(TokenErrorKind::InvalidRequest).detail(detail))
    }

    /// An HTTPS client trusting the webpki roots plus `roots` (DER-encoded certificates),
    /// for private certificate authorities and self-signed test servers.
    pub fn hyper_rustls_with_roots<I, C>(roots: I) -> Result<Self, TokenError>
    where
        I: IntoIterator<Item = C>,
        C: AsRef<[u8]>,
    {
        Self::hyper_rustls_built(roots, None)
    }

    /// An HTTPS client that authenticates with `identity`'s TLS client certificate
    /// (RFC 8705 mutual TLS; replace the certificate at run time with
    /// [`ClientIdentity::replace_pem`](super::ClientIdentity::replace_pem)), trusting the
    /// webpki roots plus `roots` (DER). Pair it with
    /// [`TokenRequest::oauth2_client_credentials_mtls`](super::TokenRequest::oauth2_client_credentials_mtls).
    pub fn hyper_rustls_with_identity<I, C>(
        identity: super::ClientIdentity,
        roots: I,
    ) -> Result<Self, TokenError>
    where
        I: IntoIterator<Item = C>,
        C: AsRef<[u8]>,
    {
        Self::hyper_rustls_built(roots, Some(identity))
    }

    fn hyper_rustls_built<I, C>(
        roots: I,
        identity: Option<super::ClientIdentity>,
    ) -> Result<Self, TokenError>
    where
        I: IntoIterator<Item = C>,
        C: AsRef<[u8]>,
    {
        let invalid = |detail| TokenError::new(TokenErrorKind::InvalidRequest).detail(detail);
        let mut store = rustls::RootCertStore::empty();
        store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for der in roots {
            let cert = rustls::pki_types::CertificateDer::from(der.as_ref().to_vec());
            store
                .add(cert)
                .map_err(|_| invalid("a root certificate is not a valid der certificate"))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|_| invalid("tls protocol versions unavailable"))?
            .with_root_certificates(store);
        let with_identity = identity.is_some();
        let tls = match identity {
            Some(identity) => {
                let mut tls = tls.with_client_cert_resolver(identity.resolver());
                // A resumed session keeps the certificate of the handshake it came from:
                // a replaced certificate would never be presented on a connection to a
                // server seen before. Token requests are rare; every connection makes a
                // full handshake.
                tls.resumption = rustls::client::Resumption::disabled();
                tls
            }
            None => tls.with_no_client_auth(),
        };
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(proxy::ProxyConnector::from_env());
        let mut builder =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new());
        if with_identity {
            // A pooled connection keeps the certificate it was made with: every token
            // request (they are rare) makes a new one, so a replaced certificate is
            // presented at once.
            builder.pool_max_idle_per_host(0);
        }
        let client = builder.build::<_, Full<Bytes>>(connector);
        Ok(Self::from_service(client))
    }
}

#[cfg(feature = "https")]
mod proxy {
    //! The default client's way to the token endpoint: direct, or through the proxy the
    //! environment names, with hyper-util's own matcher and tunnel.

    use std::{future::Future, pin::Pin, sync::Arc};

    use http::Uri;
    use hyper_util::{
        client::{
            legacy::connect::{HttpConnector, proxy::Tunnel},
            proxy::matcher::Matcher,
        },
        rt::TokioIo,
    };
    use tokio::net::TcpStream;
    use tower::ServiceExt;
    use tower_service::Service;

    use crate::error::BoxError;

    type Connecting = Pin<Box<dyn Future<Output = Result<TokioIo<TcpStream>, BoxError>> + Send>>;

    /// Connects directly, or tunnels an https destination through its proxy.
    #[derive(Clone)]
    pub(super) struct ProxyConnector {
        http: HttpConnector,
        matcher: Arc<Matcher>,
    }

    impl ProxyConnector {
        pub(super) fn from_env() -> Self {
            let mut http = HttpConnector::new();
            http.enforce_http(false);
            ProxyConnector {
                http,
                matcher: Arc::new(Matcher::from_env()),
            }
        }
    }

    impl Service<Uri> for ProxyConnector {
        type Response = TokioIo<TcpStream>;
        type Error = BoxError;
        type Future = Connecting;

        fn poll_ready(
            &mut self,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), BoxError>> {
            // Each call readies its own connector below.
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, dst: Uri) -> Connecting {
            let http = self.http.clone();
            // Only https goes through a tunnel: plain http is loopback-only here, and a
            // proxy would see the request in the clear.
            let proxy = match dst.scheme_str() {
                Some("https") => self.matcher.intercept(&dst),
                _ => None,
            };
            Box::pin(async move {
                match proxy {
                    None => http.oneshot(dst).await.map_err(Into::into),
                    Some(proxy) => {
                        let mut tunnel = Tunnel::new(proxy.uri().clone(), http);
                        if let Some(auth) = proxy.basic_auth() {
                            tunnel = tunnel.with_auth(auth.clone());
                        }
                        tunnel.oneshot(dst).await.map_err(Into::into)
                    }
                }
            })
        }
    }
}
