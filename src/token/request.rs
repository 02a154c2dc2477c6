//! [`TokenRequest`]: a template for the requests a token endpoint expects.

use std::fmt;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Uri, header};
use http_body_util::Full;

use super::error::{TokenError, TokenErrorKind};
use crate::secret::Secret;

/// How a token request's body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BodyEncoding {
    /// `application/json`: an object of string fields.
    Json,
    /// `application/x-www-form-urlencoded`, as RFC 6749 specifies.
    Form,
}

/// Where the client credentials (`client_id`, `client_secret`) go, when the request has
/// them. Never guessed: the default is RFC 6749's recommendation, HTTP Basic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ClientAuth {
    /// `Authorization: Basic base64(urlencode(id):urlencode(secret))` (RFC 6749 §2.3.1).
    #[default]
    Basic,
    /// `client_id` and `client_secret` as body fields, in the request's encoding (a form
    /// body, or a JSON body as some providers want).
    Body,
}

#[derive(Clone)]
enum Value {
    Plain(String),
    Secret(Secret),
}

impl Value {
    fn as_str(&self) -> &str {
        match self {
            Value::Plain(s) => s,
            Value::Secret(s) => s.expose(),
        }
    }
}

/// A template for a token request: URL, body encoding, fields, client authentication.
/// Secret fields are held redacted and scrubbed from any error the endpoint sends back.
///
/// ```
/// use tower_client_auth::token::{BodyEncoding, ClientAuth, TokenRequest};
///
/// // OAuth2 client credentials as most providers do it: Basic auth + form body.
/// let d = TokenRequest::oauth2_client_credentials("https://idp.example/oauth/v2/token", "id", "secret")?
///     .field("scope", "read write");
///
/// // The same grant with everything in a JSON body, plus an audience.
/// let b = TokenRequest::oauth2_client_credentials("https://auth.example/oauth/token", "id", "secret")?
///     .client_auth(ClientAuth::Body)
///     .encoding(BodyEncoding::Json)
///     .field("audience", "https://api.example");
/// # let _ = (d, b);
/// # Ok::<_, tower_client_auth::token::TokenError>(())
/// ```
#[derive(Clone)]
pub struct TokenRequest {
    url: Uri,
    encoding: BodyEncoding,
    fields: Vec<(String, Value)>,
    client: Option<(String, Secret)>,
    client_auth: ClientAuth,
    /// Whether `client_auth` was chosen by the user: otherwise an issuer's metadata
    /// chooses it.
    client_auth_chosen: bool,
    /// Whether the client authenticates with its TLS certificate (RFC 8705): an
    /// issuer's `mtls_endpoint_aliases` apply.
    mtls: bool,
    /// `private_key_jwt` or `client_secret_jwt`: a fresh signed assertion per request,
    /// instead of a secret.
    #[cfg(feature = "jwt")]
    assertion: Option<ClientAssertion>,
}

/// The client's identity and key for `private_key_jwt` (or its secret, for
/// `client_secret_jwt`), and the audience if not the token endpoint.
#[cfg(feature = "jwt")]
#[derive(Clone)]
struct ClientAssertion {
    client_id: String,
    key: super::assertion::AssertionKey,
    audience: Option<String>,
}

impl fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Fields<'a>(&'a [(String, Value)]);
        impl fmt::Debug for Fields<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_map()
                    .entries(self.0.iter().map(|(k, v)| match v {
                        Value::Plain(p) => (k, p.as_str()),
                        Value::Secret(_) => (k, "[redacted]"),
                    }))
                    .finish()
            }
        }
        f.debug_struct("TokenRequest")
            // As errors show it: never the userinfo or the query.
            .field(
                "url",
                &format_args!("{}", crate::text::shown_url(&self.url)),
            )
            .field("encoding", &self.encoding)
            .field("fields", &Fields(&self.fields))
            .field("client_id", &self.client_id())
            .field("client_auth", &self.client_auth_shown())
            .finish()
    }
}

impl TokenRequest {
    /// A `POST` to `url` with a JSON body.
    pub fn json(url: &str) -> Result<Self, TokenError> {
        Self::new(url, BodyEncoding::Json)
    }

    /// A `POST` to `url` with a form body.
    pub fn form(url: &str) -> Result<Self, TokenError> {
        Self::new(url, BodyEncoding::Form)
    }

    fn new(url: &str, encoding: BodyEncoding) -> Result<Self, TokenError> {
        let url: Uri = url.parse().map_err(|e| {
            TokenError::new(TokenErrorKind::InvalidRequest)
                .detail("the token url is not a valid uri")
                .with_source(e)
        })?;
        if url.scheme().is_none() || url.host().is_none() {
            return Err(TokenError::new(TokenErrorKind::InvalidRequest)
                .detail("the token url must be absolute"));
        }
        // Refused now rather than at the first fetch: plain http only ever reaches a
        // loopback host (and then only through a client that allows it).
        crate::policy::check_transport(&url, true, false)
            .map_err(|detail| TokenError::new(TokenErrorKind::InsecureTransport).detail(detail))?;
        Ok(TokenRequest {
            url,
            encoding,
            fields: Vec::new(),
            client: None,
            client_auth: ClientAuth::Basic,
            client_auth_chosen: false,
            mtls: false,
            #[cfg(feature = "jwt")]
            assertion: None,
        })
    }

    /// RFC 6749 §4.4 client credentials grant: form body `grant_type=client_credentials`,
    /// client authenticated with HTTP Basic (change with [`client_auth`](Self::client_auth)).
    pub fn oauth2_client_credentials(
        url: &str,
        client_id: impl Into<String>,
        client_secret: impl Into<Secret>,
    ) -> Result<Self, TokenError> {
        Ok(Self::form(url)?
            .field("grant_type", "client_credentials")
            .client_credentials(client_id, client_secret))
    }

    /// RFC 6749 §4.4 client credentials with mutual-TLS client authentication (RFC 8705
    /// §2, `tls_client_auth` or `self_signed_tls_client_auth`): the body carries
    /// `client_id` and no secret; the token client presents the certificate
    /// ([`TokenClient::hyper_rustls_with_identity`](super::TokenClient::hyper_rustls_with_identity)).
    /// With an issuer, the request goes to its `mtls_endpoint_aliases.token_endpoint`
    /// when it publishes one.
    pub fn oauth2_client_credentials_mtls(
        url: &str,
        client_id: impl Into<String>,
    ) -> Result<Self, TokenError> {
        Ok(Self::form(url)?
            .field("grant_type", "client_credentials")
            .field("client_id", client_id)
            .mtls_client_auth())
    }

    /// Marks this request as authenticated by the TLS client certificate (RFC 8705):
    /// for a grant of your own. It keeps the client id of the authentication it replaces
    /// (client credentials, a signed assertion) as a `client_id` field, which RFC 8705
    /// §2 requires, unless the request has one; with none before, give `client_id` with
    /// [`field`](Self::field).
    pub fn mtls_client_auth(mut self) -> Self {
        // One way to authenticate the client (RFC 6749 §2.3): the last one given.
        let id = self.client_id().map(str::to_owned);
        self.client = None;
        #[cfg(feature = "jwt")]
        {
            self.assertion = None;
        }
        if let Some(id) = id.filter(|_| !self.fields.iter().any(|(k, _)| k == "client_id")) {
            self.fields.push(("client_id".to_owned(), Value::Plain(id)));
        }
        self.mtls = true;
        self
    }

    /// RFC 6749 §6 refresh grant: form body `grant_type=refresh_token` and the refresh
    /// token (added at send time), client authenticated with HTTP Basic.
    pub fn oauth2_refresh_token(
        url: &str,
        client_id: impl Into<String>,
        client_secret: impl Into<Secret>,
    ) -> Result<Self, TokenError> {
        Ok(Self::form(url)?
            .field("grant_type", "refresh_token")
            .client_credentials(client_id, client_secret))
    }

    /// RFC 6749 §4.3 resource owner password grant.
    pub fn oauth2_password(
        url: &str,
        client_id: impl Into<String>,
        client_secret: impl Into<Secret>,
        username: impl Into<String>,
        password: impl Into<Secret>,
    ) -> Result<Self, TokenError> {
        Ok(Self::form(url)?
            .field("grant_type", "password")
            .field("username", username)
            .secret_field("password", password)
            .client_credentials(client_id, client_secret))
    }

    /// Adds a plain field (`audience`, `scope`, `resource`, `type`, ...).
    pub fn field(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.fields.push((name.into(), Value::Plain(value.into())));
        self
    }

    /// Adds a secret field: sent, but never printed.
    pub fn secret_field(mut self, name: impl Into<String>, value: impl Into<Secret>) -> Self {
        self.fields.push((name.into(), Value::Secret(value.into())));
        self
    }

    /// Adds `scope`.
    pub fn scope(self, scope: impl Into<String>) -> Self {
        self.field("scope", scope)
    }

    /// This request sent to the token endpoint `metadata` publishes, authenticating the
    /// client as the server supports (HTTP Basic if it does, else body fields), unless
    /// [`client_auth`](Self::client_auth) chose.
    pub(crate) fn at(&self, metadata: &super::Metadata) -> TokenRequest {
        let mut at = self.clone();
        at.url = match metadata.mtls_token_endpoint() {
            Some(alias) if self.mtls => alias.clone(),
            _ => metadata.token_endpoint().clone(),
        };
        if !self.client_auth_chosen
            && !metadata.supports_auth_method("client_secret_basic")
            && metadata.supports_auth_method("client_secret_post")
        {
            at.client_auth = ClientAuth::Body;
        }
        at
    }

    /// This request asking for `extra` scopes on top of its own `scope` field, for a
    /// step-up. `None` for a request with no `scope` field (its scope is the server's
    /// default, which the client cannot name), and for one whose grant does not take a
    /// scope of the client's choosing: no `grant_type` (a session login), or a grant that
    /// can only keep or narrow the scope granted before (refresh token, authorization
    /// code, device code).
    pub(crate) fn widened(&self, extra: &[String]) -> Option<TokenRequest> {
        let grant = self.fields.iter().find_map(|(name, value)| match value {
            Value::Plain(v) if name == "grant_type" => Some(v.as_str()),
            _ => None,
        })?;
        if matches!(
            grant,
            "refresh_token" | "authorization_code" | "urn:ietf:params:oauth:grant-type:device_code"
        ) {
            return None;
        }
        let mut widened = self.clone();
        let at = widened.fields.iter().position(|(n, _)| n == "scope");
        let mut scopes: Vec<String> = match at.map(|i| &widened.fields[i].1) {
            Some(Value::Plain(scope)) => {
                scope.split_ascii_whitespace().map(str::to_owned).collect()
            }
            Some(Value::Secret(_)) => return None,
            // No scope of its own: the server's default, which a list of the new scopes
            // alone could narrow. Not a union anyone can state.
            None => return None,
        };
        for scope in extra {
            if !scopes.contains(scope) {
                scopes.push(scope.clone());
            }
        }
        let value = Value::Plain(scopes.join(" "));
        match at {
            Some(i) => widened.fields[i].1 = value,
            None => widened.fields.push(("scope".to_owned(), value)),
        }
        Some(widened)
    }

    /// The client id, whichever way the client authenticates.
    fn client_id(&self) -> Option<&str> {
        #[cfg(feature = "jwt")]
        if let Some(a) = &self.assertion {
            return Some(&a.client_id);
        }
        self.client.as_ref().map(|(id, _)| id.as_str())
    }

    fn client_auth_shown(&self) -> &dyn fmt::Debug {
        if self.mtls {
            return &"tls client certificate";
        }
        #[cfg(feature = "jwt")]
        if let Some(a) = &self.assertion {
            return &a.key;
        }
        &self.client_auth
    }

    /// RFC 6749 §4.4 client credentials, the client authenticated with a signed JWT
    /// (`private_key_jwt`, RFC 7523): see [`private_key_jwt`](Self::private_key_jwt).
    #[cfg(feature = "jwt")]
    #[cfg_attr(docsrs, doc(cfg(feature = "jwt")))]
    pub fn oauth2_client_credentials_jwt(
        url: &str,
        client_id: impl Into<String>,
        key: super::SigningKey,
    ) -> Result<Self, TokenError> {
        Ok(Self::form(url)?
            .field("grant_type", "client_credentials")
            .private_key_jwt(client_id, key))
    }

    /// Authenticates the client with `private_key_jwt` (RFC 7523 §2.2, OpenID Connect
    /// Core §9) instead of a secret: each request carries `client_id`,
    /// `client_assertion_type` (`urn:ietf:params:oauth:client-assertion-type:jwt-bearer`)
    /// and a fresh `client_assertion` signed with `key` (`iss` = `sub` = the client id,
    /// `aud` the token endpoint's URL unless
    /// [`assertion_audience`](Self::assertion_audience) says otherwise, a random `jti`,
    /// `exp` a minute after `iat`). Replaces client credentials given before; an
    /// assertion is scrubbed from server errors as a secret is.
    #[cfg(feature = "jwt")]
    #[cfg_attr(docsrs, doc(cfg(feature = "jwt")))]
    pub fn private_key_jwt(self, client_id: impl Into<String>, key: super::SigningKey) -> Self {
        self.signed_by(
            client_id.into(),
            super::assertion::AssertionKey::Private(key),
        )
    }

    /// RFC 6749 §4.4 client credentials, the client authenticated with a JWT signed with
    /// its secret (`client_secret_jwt`): see [`client_secret_jwt`](Self::client_secret_jwt).
    #[cfg(feature = "jwt")]
    #[cfg_attr(docsrs, doc(cfg(feature = "jwt")))]
    pub fn oauth2_client_credentials_secret_jwt(
        url: &str,
        client_id: impl Into<String>,
        client_secret: impl Into<Secret>,
    ) -> Result<Self, TokenError> {
        Self::form(url)?
            .field("grant_type", "client_credentials")
            .client_secret_jwt(client_id, client_secret)
    }

    /// Authenticates the client with `client_secret_jwt` (OpenID Connect Core §9, RFC
    /// 7523 §2.2): as [`private_key_jwt`](Self::private_key_jwt), but each assertion is
    /// signed HS256 with the client secret, which itself is never sent (nor shown, and it
    /// is scrubbed from server errors as the assertion is). Replaces client credentials
    /// given before.
    ///
    /// A secret shorter than 32 bytes is an `InvalidRequest` error that quotes nothing
    /// of it: RFC 7518 §3.2 wants an HS256 key of at least 256 bits, and servers built on
    /// Nimbus JOSE or jose4j refuse to verify with a shorter one.
    ///
    /// ```
    /// use tower_client_auth::token::{TokenRequest, TokenSource};
    ///
    /// let login = TokenRequest::oauth2_client_credentials_secret_jwt(
    ///     "https://login.example.com/oauth2/token",
    ///     "my-client",
    ///     "a-client-secret-of-32-bytes-or-more",
    /// )?;
    /// let source = TokenSource::new(login);
    /// # let _ = source;
    /// # Ok::<_, tower_client_auth::token::TokenError>(())
    /// ```
    #[cfg(feature = "jwt")]
    #[cfg_attr(docsrs, doc(cfg(feature = "jwt")))]
    pub fn client_secret_jwt(
        self,
        client_id: impl Into<String>,
        client_secret: impl Into<Secret>,
    ) -> Result<Self, TokenError> {
        let key = super::assertion::AssertionKey::shared(client_secret.into())?;
        Ok(self.signed_by(client_id.into(), key))
    }

    #[cfg(feature = "jwt")]
    fn signed_by(mut self, client_id: String, key: super::assertion::AssertionKey) -> Self {
        // One way to authenticate the client (RFC 6749 §2.3): the last one given.
        self.client = None;
        self.mtls = false;
        let audience = self.assertion.take().and_then(|a| a.audience);
        self.assertion = Some(ClientAssertion {
            client_id,
            key,
            audience,
        });
        self
    }

    /// The `aud` of `private_key_jwt` and `client_secret_jwt` assertions, for servers
    /// that want the issuer identifier rather than the token endpoint's URL (the
    /// default). Call it after [`private_key_jwt`](Self::private_key_jwt) or
    /// [`client_secret_jwt`](Self::client_secret_jwt); without one it has no effect.
    #[cfg(feature = "jwt")]
    #[cfg_attr(docsrs, doc(cfg(feature = "jwt")))]
    pub fn assertion_audience(mut self, audience: impl Into<String>) -> Self {
        if let Some(a) = &mut self.assertion {
            a.audience = Some(audience.into());
        }
        self
    }

    /// Sets the client credentials, sent as [`client_auth`](Self::client_auth) says.
    pub fn client_credentials(
        mut self,
        client_id: impl Into<String>,
        client_secret: impl Into<Secret>,
    ) -> Self {
        // One way to authenticate the client (RFC 6749 §2.3): the last one given.
        #[cfg(feature = "jwt")]
        {
            self.assertion = None;
        }
        self.mtls = false;
        self.client = Some((client_id.into(), client_secret.into()));
        self
    }

    /// Where the client credentials go (default [`ClientAuth::Basic`]).
    pub fn client_auth(mut self, client_auth: ClientAuth) -> Self {
        self.client_auth = client_auth;
        self.client_auth_chosen = true;
        self
    }

    /// The body encoding.
    pub fn encoding(mut self, encoding: BodyEncoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// What names the credential this request obtains, for a store's key: the token URL
    /// (its scheme, host and path), the client id, and every field that is not a secret
    /// (grant type, scope, audience, resource, user name), sorted. Never a secret.
    pub(crate) fn identity(&self) -> String {
        let mut fields: Vec<String> = self
            .fields
            .iter()
            .filter_map(|(k, v)| match v {
                Value::Plain(p) => Some(format!("{k}={p}")),
                Value::Secret(_) => None,
            })
            .collect();
        fields.sort();
        let url = format!(
            "{}://{}{}",
            self.url.scheme_str().unwrap_or(""),
            self.url
                .authority()
                .map(|a| a.as_str().rsplit('@').next().unwrap_or(""))
                .unwrap_or(""),
            self.url.path()
        );
        let client = self.client_id().unwrap_or_default();
        format!("{url}\nclient_id={client}\n{}", fields.join("\n"))
    }

    /// The token URL.
    pub fn url(&self) -> &Uri {
        &self.url
    }

    /// Every secret this request carries, to scrub from errors.
    pub(crate) fn secrets(&self) -> impl Iterator<Item = &str> {
        let fields = self.fields.iter().filter_map(|(_, v)| match v {
            Value::Secret(s) => Some(s.expose()),
            Value::Plain(_) => None,
        });
        #[cfg(feature = "jwt")]
        let signing = self.assertion.as_ref().and_then(|a| a.key.secret());
        #[cfg(not(feature = "jwt"))]
        let signing: Option<&Secret> = None;
        fields
            .chain(self.client.iter().map(|(_, s)| s.expose()))
            .chain(signing.map(Secret::expose))
    }

    /// Every form in which this request (with `extra`) sends a secret, for scrubbing
    /// what the server says back: each secret as is and url-encoded (as a form body and
    /// the Basic header carry it, `+` or `%20` for a space), and the Basic credentials in
    /// base64, as sent and without url-encoding.
    pub(crate) fn sent_secrets(
        &self,
        extra: Option<&Secret>,
        assertion: Option<&Secret>,
    ) -> Vec<String> {
        let mut forms = Vec::new();
        let sent = extra.into_iter().chain(assertion).map(Secret::expose);
        for secret in self.secrets().chain(sent) {
            let encoded: String = form_urlencoded::byte_serialize(secret.as_bytes()).collect();
            // Percent-encoding in lower case too (`%2f`): servers echo either.
            let lower = lowercase_escapes(&encoded);
            forms.push(encoded.replace('+', "%20"));
            forms.push(lower.replace('+', "%20"));
            forms.push(lower);
            forms.push(encoded);
            // As JSON encoders write it in a string (`\"`, `\/`, `\u00e9`), for JSON
            // bodies echoed raw (an escape none of them writes is decoded by the scrub).
            forms.extend(crate::text::json_forms(secret));
            forms.push(secret.to_owned());
        }
        if let Some((id, secret)) = &self.client {
            let b64 = |s: String| base64::engine::general_purpose::STANDARD.encode(s);
            for pair in [
                basic_pair(id, secret.expose()),
                format!("{id}:{}", secret.expose()),
            ] {
                // Padded and unpadded: the unpadded form is a prefix of the padded one.
                let encoded = b64(pair);
                forms.push(encoded.trim_end_matches('=').to_owned());
                forms.push(encoded);
            }
        }
        forms.retain(|f| !f.is_empty());
        forms
    }

    /// Builds the HTTP request, with `extra` secret fields (a refresh token) appended.
    #[cfg(test)]
    pub(crate) fn build(
        &self,
        extra: Option<(&str, &Secret)>,
    ) -> Result<Request<Full<Bytes>>, TokenError> {
        self.build_signed(extra).map(|(request, _)| request)
    }

    /// Builds the HTTP request, with `extra` secret fields (a refresh token) appended;
    /// with it the client assertion it carries, if any, to scrub from what comes back.
    pub(crate) fn build_signed(
        &self,
        extra: Option<(&str, &Secret)>,
    ) -> Result<(Request<Full<Bytes>>, Option<Secret>), TokenError> {
        let mut fields: Vec<(&str, &str)> = self
            .fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        #[allow(unused_mut)]
        let mut signed: Option<Secret> = None;
        #[cfg(feature = "jwt")]
        if let Some(a) = &self.assertion {
            let audience = match &a.audience {
                Some(audience) => audience.clone(),
                // The token endpoint as the server knows it (and publishes it): no
                // query, no user info, no port that is the scheme's default (a server
                // comparing `aud` with its published `https://h/t` refuses
                // `https://h:443/t`; review 130).
                None => {
                    let scheme = self.url.scheme_str().unwrap_or("https");
                    let host = self.url.host().unwrap_or_default();
                    let port = match self.url.port_u16() {
                        Some(443) if scheme == "https" => None,
                        Some(80) if scheme == "http" => None,
                        port => port,
                    };
                    match port {
                        Some(port) => format!("{scheme}://{host}:{port}{}", self.url.path()),
                        None => format!("{scheme}://{host}{}", self.url.path()),
                    }
                }
            };
            signed = Some(Secret::from(super::assertion::client_assertion(
                &a.key,
                &a.client_id,
                &audience,
            )?));
        }
        // The client authentication sends its own `client_id`: one given as a field
        // before (by `oauth2_client_credentials_mtls`, or by hand) is not sent beside it
        // (RFC 6749 §3.2: no parameter more than once; strict servers refuse a repeat).
        let auth_names_client = signed.is_some()
            || (matches!(self.client_auth, ClientAuth::Body) && self.client.is_some());
        if auth_names_client {
            fields.retain(|(name, _)| *name != "client_id");
        }
        #[cfg(feature = "jwt")]
        if let (Some(a), Some(signed)) = (&self.assertion, &signed) {
            fields.push(("client_id", &a.client_id));
            fields.push(("client_assertion_type", super::assertion::JWT_BEARER));
            fields.push(("client_assertion", signed.expose()));
        }
        if let (ClientAuth::Body, Some((id, secret))) = (self.client_auth, &self.client) {
            fields.push(("client_id", id));
            fields.push(("client_secret", secret.expose()));
        }
        if let Some((name, value)) = extra {
            fields.push((name, value.expose()));
        }
        let (content_type, body) = match self.encoding {
            BodyEncoding::Json => {
                let object: serde_json::Map<String, serde_json::Value> = fields
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
                    .collect();
                (
                    "application/json",
                    serde_json::Value::Object(object).to_string(),
                )
            }
            BodyEncoding::Form => {
                let mut form = form_urlencoded::Serializer::new(String::new());
                form.extend_pairs(fields);
                ("application/x-www-form-urlencoded", form.finish())
            }
        };
        let mut req = Request::new(Full::new(Bytes::from(body)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.url.clone();
        let headers = req.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        if let (ClientAuth::Basic, Some((id, secret))) = (self.client_auth, &self.client) {
            let basic =
                base64::engine::general_purpose::STANDARD.encode(basic_pair(id, secret.expose()));
            let mut value = HeaderValue::try_from(format!("Basic {basic}")).map_err(|_| {
                TokenError::new(TokenErrorKind::InvalidRequest)
                    .detail("client credentials cannot form a header")
            })?;
            value.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, value);
        }
        Ok((req, signed))
    }
}

/// `%2F` as `%2f`: the other case of every percent escape.
fn lowercase_escapes(encoded: &str) -> String {
    let mut out = String::with_capacity(encoded.len());
    let mut chars = encoded.chars();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '%' {
            out.extend(chars.by_ref().take(2).map(|h| h.to_ascii_lowercase()));
        }
    }
    out
}

/// `urlencode(id):urlencode(secret)`, what HTTP Basic carries (RFC 6749 §2.3.1).
fn basic_pair(id: &str, secret: &str) -> String {
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    format!("{}:{}", enc(id), enc(secret))
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    async fn body(req: Request<Full<Bytes>>) -> String {
        String::from_utf8(req.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    /// The default `aud` of a client assertion is the token endpoint as a server
    /// publishes it: a port that is the scheme's default, user info and the query are
    /// left out (a server comparing `aud` with its published `https://h/t` refuses
    /// `https://h:443/t`); another port is kept, and so is an IPv6 host's brackets.
    #[cfg(feature = "jwt")]
    #[tokio::test]
    async fn the_default_assertion_audience_is_the_endpoint_as_published() {
        use base64::Engine as _;
        let secret = "a-client-secret-of-32-bytes-0123";
        for (url, aud) in [
            (
                "https://login.example.com:443/oauth2/token?x=1",
                "https://login.example.com/oauth2/token",
            ),
            (
                "https://user@login.example.com/oauth2/token",
                "https://login.example.com/oauth2/token",
            ),
            ("http://127.0.0.1:80/t", "http://127.0.0.1/t"),
            (
                "https://login.example.com:8443/t",
                "https://login.example.com:8443/t",
            ),
            ("https://[::1]:443/t", "https://[::1]/t"),
        ] {
            let req = TokenRequest::oauth2_client_credentials_secret_jwt(url, "id", secret)
                .unwrap()
                .build(None)
                .unwrap();
            let form = body(req).await;
            let jws = form
                .split('&')
                .find_map(|kv| kv.strip_prefix("client_assertion="))
                .unwrap();
            let claims = jws.split('.').nth(1).unwrap();
            let claims: serde_json::Value = serde_json::from_slice(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(claims)
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(claims["aud"], aud, "{url}");
        }
    }

    /// Basic auth url-encodes id and secret before base64 (RFC 6749 §2.3.1), and the
    /// form body carries the grant and extra parameters.
    #[tokio::test]
    async fn client_credentials_basic_and_form() {
        let req =
            TokenRequest::oauth2_client_credentials("https://idp.test/token", "my id", "s:cr&t")
                .unwrap()
                .scope("read write")
                .build(None)
                .unwrap();
        assert_eq!(req.method(), Method::POST);
        assert_eq!(
            req.headers()[header::CONTENT_TYPE],
            "application/x-www-form-urlencoded"
        );
        let auth = req.headers()[header::AUTHORIZATION]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(req.headers()[header::AUTHORIZATION].is_sensitive());
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.strip_prefix("Basic ").unwrap())
            .unwrap();
        assert_eq!(decoded, b"my+id:s%3Acr%26t");
        assert_eq!(
            body(req).await,
            "grant_type=client_credentials&scope=read+write"
        );
    }

    /// One way to authenticate the client: client credentials given after a private key
    /// replace it, and the other way round (review finding: both were sent).
    #[cfg(feature = "jwt")]
    #[tokio::test]
    async fn the_last_client_authentication_given_wins() {
        let key = super::super::SigningKey::from_pem(include_str!(
            "../../tests/support/keys/ec-p256.pem"
        ))
        .unwrap();
        let secret_last =
            TokenRequest::oauth2_client_credentials_jwt("https://idp.test/t", "id", key.clone())
                .unwrap()
                .client_credentials("id", "sec")
                .build(None)
                .unwrap();
        assert!(secret_last.headers().contains_key(header::AUTHORIZATION));
        assert!(!body(secret_last).await.contains("client_assertion"));
        let key_last = TokenRequest::oauth2_client_credentials("https://idp.test/t", "id", "sec")
            .unwrap()
            .private_key_jwt("id", key)
            .build(None)
            .unwrap();
        assert!(!key_last.headers().contains_key(header::AUTHORIZATION));
        let body = body(key_last).await;
        assert!(
            body.contains("client_assertion=") && !body.contains("sec&"),
            "{body}"
        );
    }

    /// Client credentials in a JSON body, with an audience; the refresh token is appended.
    #[tokio::test]
    async fn json_body_with_client_fields() {
        let req = TokenRequest::oauth2_client_credentials("https://idp.test/token", "id", "sec")
            .unwrap()
            .client_auth(ClientAuth::Body)
            .encoding(BodyEncoding::Json)
            .field("audience", "https://api.test")
            .build(Some(("refresh_token", &Secret::from("rt"))))
            .unwrap();
        assert!(req.headers().get(header::AUTHORIZATION).is_none());
        let json: serde_json::Value = serde_json::from_str(&body(req).await).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"grant_type": "client_credentials", "audience": "https://api.test",
                "client_id": "id", "client_secret": "sec", "refresh_token": "rt"})
        );
    }

    /// A relative or malformed URL is a typed error; secrets never show in `Debug`.
    #[test]
    fn bad_url_and_redacted_debug() {
        assert_eq!(
            TokenRequest::json("/token").unwrap_err().kind(),
            TokenErrorKind::InvalidRequest
        );
        assert_eq!(
            TokenRequest::json("ht tp://x").unwrap_err().kind(),
            TokenErrorKind::InvalidRequest
        );
        let r = TokenRequest::oauth2_password(
            "https://x.test/t",
            "id",
            "CLIENT-SECRET",
            "me",
            "PASSWORD",
        )
        .unwrap();
        let shown = format!("{r:?}");
        assert!(
            !shown.contains("CLIENT-SECRET") && !shown.contains("PASSWORD"),
            "{shown}"
        );
        assert_eq!(
            r.secrets().collect::<Vec<_>>(),
            ["PASSWORD", "CLIENT-SECRET"]
        );
    }
}
