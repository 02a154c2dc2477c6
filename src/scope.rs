//! Origin scoping: which requests get the credential at all.
//!
//! A client is often shared: the same hyper or reqwest client calls the API the
//! credential is for, and a webhook target, a CDN, another vendor, and an API may
//! redirect anywhere. So a layer or middleware sends its credential only to the origins
//! it was given: a request to any other origin passes through untouched (no credential,
//! no refresh, no replay). One given none refuses every request with
//! [`ErrorKind::NoOrigin`](crate::ErrorKind::NoOrigin); sending to every https origin a
//! request names is an explicit opt-in, `any_https_origin()`.
//!
//! # Example
//! ```
//! use tower_client_auth::{AuthLayer, Origin, StaticCredential};
//!
//! let layer = AuthLayer::new(StaticCredential::bearer("pat_123")?)
//!     .origin("https://api.example.com")?
//!     // the origin of a base URL with a path:
//!     .origin(Origin::of_url("https://eu.api.example.com/v2/")?)?
//!     .origin_matching(|uri| uri.host().is_some_and(|h| h.ends_with(".api.example.com")));
//! # let _ = layer;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::{fmt, str::FromStr, sync::Arc};

use http::Uri;

/// One origin (`scheme://host[:port]`, RFC 6454): the credential is sent to requests
/// whose scheme, host and port all match. Scheme and host compare case-insensitively; a
/// missing port is the scheme's default (443 for https, 80 for http). A host is written
/// as URL parsers (reqwest's `url`, browsers) write it, or refused: an IPv4 address as
/// `a.b.c.d` in decimal (not `127.1` or `0x7f.0.0.1`), an IPv6 address compressed
/// (`[::1]`, not `[0:0:0:0:0:0:0:1]` or `[::ffff:127.0.0.1]`), a name in its IDNA form
/// (`xn--...`, not percent-encoded): reqwest names a request's host in that form only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: String,
    host: String,
    port: u16,
    /// The authorities a request names this origin by: `host:port`, and `host` alone
    /// when the port is the scheme's default. Matched as text, without parsing each
    /// request's authority (an authority with userinfo never matches: it is refused, not
    /// guessed at).
    authorities: Vec<String>,
}

/// A string that is not an origin: it needs a scheme and a host (written as URL parsers
/// write it: see [`Origin`]), and nothing after them (no path, query or credentials).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidOrigin {
    what: &'static str,
}

impl fmt::Display for InvalidOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid origin: {}", self.what)
    }
}

impl std::error::Error for InvalidOrigin {}

/// The port `authority` names: `None` for none (or an empty one, which RFC 3986 §6.2.3
/// reads as the scheme's default), `Err` for text after the host's `:` that is no port
/// (`99999`, past `u16`): `http` reads such a port as no port at all, which would make
/// it the scheme's default.
pub(crate) fn named_port(authority: &http::uri::Authority) -> Result<Option<u16>, ()> {
    let text = authority.as_str();
    let text = text.rfind('@').map_or(text, |at| &text[at + 1..]);
    // An IPv6 literal's colons are inside its brackets.
    let after_host = text.rfind(']').map_or(text, |end| &text[end + 1..]);
    match after_host.rfind(':').map(|colon| &after_host[colon + 1..]) {
        None | Some("") => Ok(None),
        Some(digits) => match digits.parse::<u16>() {
            Ok(port) if digits.bytes().all(|b| b.is_ascii_digit()) => Ok(Some(port)),
            _ => Err(()),
        },
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "https" | "wss" => Some(443),
        "http" | "ws" => Some(80),
        _ => None,
    }
}

impl FromStr for Origin {
    type Err = InvalidOrigin;

    /// An origin and nothing else: a path, a query or credentials are refused. For the
    /// origin of a longer URL, see [`Origin::of_url`].
    fn from_str(s: &str) -> Result<Self, InvalidOrigin> {
        let uri: Uri = s.parse().map_err(|_| InvalidOrigin { what: "not a uri" })?;
        Origin::from_uri(&uri, true)
    }
}

impl Origin {
    /// The origin of a full URL, such as an API's base URL: its scheme, host and port,
    /// whatever path or query follows (`https://api.example.com/v1?x=1` gives
    /// `https://api.example.com`). A URL with credentials in it is still refused.
    ///
    /// ```
    /// use tower_client_auth::Origin;
    ///
    /// let origin = Origin::of_url("https://API.example.com:443/v1/")?;
    /// assert_eq!(origin.to_string(), "https://api.example.com");
    /// // `.origin(..)` itself takes an origin only: the path is not silently dropped.
    /// assert!("https://api.example.com/v1".parse::<Origin>().is_err());
    /// # Ok::<(), tower_client_auth::InvalidOrigin>(())
    /// ```
    pub fn of_url(url: &str) -> Result<Origin, InvalidOrigin> {
        let uri: Uri = url
            .parse()
            .map_err(|_| InvalidOrigin { what: "not a uri" })?;
        Origin::from_uri(&uri, false)
    }

    /// The origin of `uri`, whatever path or query follows: [`of_url`](Self::of_url) for
    /// an `http::Uri`.
    pub fn of_uri(uri: &Uri) -> Result<Origin, InvalidOrigin> {
        Origin::from_uri(uri, false)
    }

    /// Refuses an origin that no request could carry the credential to, whatever the
    /// layer's settings: plain `http`, `ws` or `wss` to a host that is not loopback, or a
    /// scheme that is neither. The transport rule ([`check_transport_parts`]) would refuse
    /// every such request; the setter says so where the origin is given. A loopback
    /// origin passes: `allow_http_loopback` may be called after it.
    ///
    /// [`check_transport_parts`]: crate::policy::check_transport_parts
    pub(crate) fn can_carry_credential(&self) -> Result<(), InvalidOrigin> {
        crate::policy::check_transport_parts(
            Some(&self.scheme),
            || crate::policy::is_loopback(&self.host),
            true,
            false,
        )
        .map_err(|what| InvalidOrigin { what })
    }

    /// `strict`: refuse anything after the authority but a lone `/`.
    fn from_uri(uri: &Uri, strict: bool) -> Result<Origin, InvalidOrigin> {
        let invalid = |what| InvalidOrigin { what };
        let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            return Err(invalid("it needs a scheme and a host"));
        };
        if authority.as_str().contains('@') {
            return Err(invalid("it must not carry credentials"));
        }
        let path_and_query = uri.path_and_query().map(|p| p.as_str()).unwrap_or("");
        if strict && !(path_and_query.is_empty() || path_and_query == "/") {
            return Err(invalid(
                "it must not have a path or query (take a URL's origin with Origin::of_url)",
            ));
        }
        let scheme = scheme.to_ascii_lowercase();
        let port = match named_port(authority) {
            Ok(Some(port)) => port,
            Ok(None) => default_port(&scheme).ok_or(invalid("unknown scheme and no port"))?,
            Err(()) => return Err(invalid("its port is not a number from 0 to 65535")),
        };
        let host = authority.host().to_ascii_lowercase();
        check_host_form(&host).map_err(invalid)?;
        // The form requests use most first: no port when it is the default.
        let mut authorities = Vec::with_capacity(2);
        if default_port(&scheme) == Some(port) {
            authorities.push(host.clone());
        }
        authorities.push(format!("{host}:{port}"));
        Ok(Origin {
            scheme,
            host,
            port,
            authorities,
        })
    }
}

/// Refuses a host that URL parsers (WHATWG's, which reqwest's `url` follows) would
/// rewrite: an IP address in any form but the one they write, or a percent-encoded name.
/// A request through reqwest names its host in the rewritten form, so an origin written
/// otherwise would never match it, and its requests would go without the credential.
fn check_host_form(host: &str) -> Result<(), &'static str> {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        let addr: std::net::Ipv6Addr = inner
            .parse()
            .map_err(|_| "its host is not an IPv6 address")?;
        return if whatwg_ipv6(&addr) == inner {
            Ok(())
        } else {
            Err(
                "write its IPv6 address as URL parsers do: lower case, the longest run of zeros as ::, no dotted IPv4 part",
            )
        };
    }
    if host.contains('%') {
        return Err("its host is percent-encoded: write it as URL parsers do (IDNA: xn--...)");
    }
    // WHATWG reads a host whose last label is a number as an IPv4 address, in decimal,
    // octal or hex, with fewer than four parts: only a.b.c.d in decimal stays as written.
    let last = host
        .strip_suffix('.')
        .unwrap_or(host)
        .rsplit('.')
        .next()
        .unwrap_or("");
    let numeric = !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit())
        || last
            .strip_prefix("0x")
            .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()));
    if numeric {
        let canonical = host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|addr| addr.to_string() == host);
        if !canonical {
            return Err(
                "write its IPv4 address as four decimal numbers (a.b.c.d), as URL parsers do",
            );
        }
    }
    Ok(())
}

/// An IPv6 address as the WHATWG URL standard serializes it: lower-case hex pieces
/// without leading zeros, the first longest run of two or more zero pieces as `::`, and
/// never a dotted IPv4 part (unlike `Ipv6Addr`'s `Display`).
fn whatwg_ipv6(addr: &std::net::Ipv6Addr) -> String {
    let pieces = addr.segments();
    let (mut best, mut best_len, mut run, mut run_len) = (None, 1, 0, 0);
    for (i, piece) in pieces.iter().enumerate() {
        if *piece == 0 {
            if run_len == 0 {
                run = i;
            }
            run_len += 1;
            if run_len > best_len {
                (best, best_len) = (Some(run), run_len);
            }
        } else {
            run_len = 0;
        }
    }
    let mut out = String::with_capacity(39);
    let mut i = 0;
    while i < 8 {
        if Some(i) == best {
            out.push_str(if i == 0 { "::" } else { ":" });
            i += best_len;
            continue;
        }
        out.push_str(&format!("{:x}", pieces[i]));
        if i < 7 {
            out.push(':');
        }
        i += 1;
    }
    out
}

/// `scheme://host[:port]`, the port only when it is not the scheme's default: the form
/// a browser's `Origin` header takes.
impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.host)?;
        if default_port(&self.scheme) != Some(self.port) {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// What `.origin(..)` takes: an [`Origin`], or a string or URI that is exactly one (a
/// path or query is refused; take a longer URL's origin with [`Origin::of_url`]).
impl TryFrom<&str> for Origin {
    type Error = InvalidOrigin;

    fn try_from(s: &str) -> Result<Self, InvalidOrigin> {
        s.parse()
    }
}

impl TryFrom<String> for Origin {
    type Error = InvalidOrigin;

    fn try_from(s: String) -> Result<Self, InvalidOrigin> {
        s.parse()
    }
}

impl TryFrom<&String> for Origin {
    type Error = InvalidOrigin;

    fn try_from(s: &String) -> Result<Self, InvalidOrigin> {
        s.parse()
    }
}

impl TryFrom<&Uri> for Origin {
    type Error = InvalidOrigin;

    fn try_from(uri: &Uri) -> Result<Self, InvalidOrigin> {
        Origin::from_uri(uri, true)
    }
}

impl TryFrom<Uri> for Origin {
    type Error = InvalidOrigin;

    fn try_from(uri: Uri) -> Result<Self, InvalidOrigin> {
        Origin::from_uri(&uri, true)
    }
}

impl TryFrom<&Origin> for Origin {
    type Error = InvalidOrigin;

    fn try_from(origin: &Origin) -> Result<Self, InvalidOrigin> {
        Ok(origin.clone())
    }
}

#[cfg(feature = "reqwest")]
impl TryFrom<&reqwest::Url> for Origin {
    type Error = InvalidOrigin;

    fn try_from(url: &reqwest::Url) -> Result<Self, InvalidOrigin> {
        url.as_str().parse()
    }
}

#[cfg(feature = "reqwest")]
impl TryFrom<reqwest::Url> for Origin {
    type Error = InvalidOrigin;

    fn try_from(url: reqwest::Url) -> Result<Self, InvalidOrigin> {
        url.as_str().parse()
    }
}

/// `Origin` converts into itself without failing.
impl From<std::convert::Infallible> for InvalidOrigin {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
    }
}

/// One way a request names a given origin: its scheme, and an authority as a request
/// writes it (`host`, or `host:port`), both in lower case. A scope keeps these in one
/// flat list, so that a request is matched by one loop over short strings.
#[derive(Clone, Debug)]
struct Named {
    scheme: Box<str>,
    authority: Box<str>,
}

impl Named {
    /// Whether the request's `scheme` and `authority` (as it wrote them) are this one's.
    /// No allocation and no parsing: it runs for every request through a scoped layer.
    /// The authority first: it is the part that tells origins apart.
    #[inline(always)]
    fn is(&self, scheme: &str, authority: &str) -> bool {
        same_text(&self.authority, authority) && same_text(&self.scheme, scheme)
    }
}

/// `known` (lower case) and `named` are the same text, case aside. Exact bytes first
/// (requests usually write schemes and hosts in lower case), compared inline for the
/// lengths origins have: the library's `memcmp` for 15 bytes cost a request more than
/// the rest of the origin rule (BENCHMARKS.md).
#[inline(always)]
fn same_text(known: &str, named: &str) -> bool {
    known.len() == named.len()
        && (same_bytes(known.as_bytes(), named.as_bytes()) || known.eq_ignore_ascii_case(named))
}

/// `a == b` for two slices of one length, in at most two loads each for up to 16 bytes
/// (overlapping words at both ends).
#[inline(always)]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let word = |s: &[u8], at: usize| u64::from_ne_bytes(s[at..at + 8].try_into().unwrap_or([0; 8]));
    let half = |s: &[u8], at: usize| u32::from_ne_bytes(s[at..at + 4].try_into().unwrap_or([0; 4]));
    match n {
        8..=16 => word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8),
        4..=7 => half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4),
        _ => a == b,
    }
}

type Predicate = Arc<dyn Fn(&Uri) -> bool + Send + Sync>;

/// The origins a layer or middleware sends its credential to. Shared by clones.
#[derive(Clone, Default)]
pub(crate) struct Scope {
    origins: Vec<Origin>,
    /// Every way a request names one of `origins`, flat (see [`Named`]).
    named: Vec<Named>,
    predicates: Vec<Predicate>,
    /// `any_https_origin()`: every origin a request names (the transport rule still
    /// applies), except a redirect hop to an origin other than the one it came from.
    any: bool,
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scope")
            .field("origins", &self.origins)
            .field("predicates", &self.predicates.len())
            .field("any_https_origin", &self.any)
            .finish()
    }
}

/// Put on a request by [`redirect::SameOriginCredentials`](crate::redirect) when it
/// follows a redirect: the origin of the request it came from.
#[derive(Clone, Debug)]
pub(crate) struct RedirectedFrom(pub(crate) Uri);

/// Whether two URIs have the same origin (scheme, host, port with the scheme's default).
/// A port that is no port (past `u16`) is the same as no other.
pub(crate) fn same_origin(a: &Uri, b: &Uri) -> bool {
    let port = |u: &Uri| match u.authority().map(named_port) {
        Some(Ok(Some(port))) => Ok(Some(port)),
        Some(Err(())) => Err(()),
        _ => Ok(u
            .scheme_str()
            .and_then(|s| default_port(&s.to_ascii_lowercase()))),
    };
    let (pa, pb) = (port(a), port(b));
    pa.is_ok()
        && pa == pb
        && a.scheme_str().map(str::to_ascii_lowercase)
            == b.scheme_str().map(str::to_ascii_lowercase)
        && a.host().map(str::to_ascii_lowercase) == b.host().map(str::to_ascii_lowercase)
}

/// Whether `headers` has a `Host`: a walk over the few names a request has, which costs
/// less than the map's hashed lookup (see BENCHMARKS.md).
#[inline(always)]
pub(crate) fn has_host_header(headers: &http::HeaderMap) -> bool {
    headers.keys().any(|name| *name == http::header::HOST)
}

/// Whether a request's `Host` header (it has one: see [`has_host_header`]) names the
/// same host and port as its absolute URI (`scheme`, `host`, `port`): an HTTP/1 client
/// sends the header it is given, and a server (a shared front: an ingress, a CDN,
/// virtual hosts) routes by it, so a request whose header names another origin goes to
/// that origin. Several `Host` headers, or one that is not an authority (or carries
/// userinfo), never agree.
#[cold]
#[inline(never)]
pub(crate) fn host_headers_agree(
    scheme: &str,
    host: &str,
    port: Option<u16>,
    headers: &http::HeaderMap,
) -> bool {
    let Some((named, named_port)) = host_header(headers) else {
        return false;
    };
    let default = ["https", "wss", "http", "ws"]
        .into_iter()
        .find(|known| scheme.eq_ignore_ascii_case(known))
        .and_then(default_port);
    named.host().eq_ignore_ascii_case(host) && named_port.or(default) == port.or(default)
}

/// The one `Host` header of `headers`, as an authority with a port that is one (or
/// none) and no userinfo; `None` for several, none, or one that is no such authority.
fn host_header(headers: &http::HeaderMap) -> Option<(http::uri::Authority, Option<u16>)> {
    let mut values = headers.get_all(http::header::HOST).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return None;
    };
    let named = http::uri::Authority::try_from(value.as_bytes()).ok()?;
    let port = named_port(&named).ok()?;
    (!named.as_str().contains('@')).then_some((named, port))
}

impl Scope {
    /// Whether a relative request (`uri` with no scheme and no host: its origin is set
    /// below the layer) whose `Host` header an HTTP/1 connection would send as it is, and
    /// a shared front route by, names an origin in scope: a given origin's host and port
    /// (its scheme's default port for none), any under `any_https_origin`, or one a
    /// predicate takes (asked with `https`, the scheme the stack below must use for
    /// relative URIs to be allowed at all).
    #[cold]
    #[inline(never)]
    pub(crate) fn names_relative_host(&self, uri: &Uri, headers: &http::HeaderMap) -> bool {
        let Some((named, port)) = host_header(headers) else {
            return false;
        };
        let host = named.host();
        if self.any
            || self.origins.iter().any(|origin| {
                origin.host.eq_ignore_ascii_case(host)
                    && port.or_else(|| default_port(&origin.scheme)) == Some(origin.port)
            })
        {
            return true;
        }
        if self.predicates.is_empty() {
            return false;
        }
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        Uri::builder()
            .scheme("https")
            .authority(named)
            .path_and_query(path)
            .build()
            .is_ok_and(|absolute| self.predicates.iter().any(|p| p(&absolute)))
    }

    fn with_origin(mut self, origin: Origin) -> Self {
        self.named
            .extend(origin.authorities.iter().map(|authority| Named {
                scheme: origin.scheme.as_str().into(),
                authority: authority.as_str().into(),
            }));
        self.origins.push(origin);
        self
    }

    /// Adds `origin` to `scope` (making an unscoped one scoped): the setter behind
    /// `AuthLayer::origin` and `AuthMiddleware::origin`.
    pub(crate) fn add_origin(scope: &mut Option<Arc<Scope>>, origin: Origin) {
        let next = scope.take().map(|s| (*s).clone()).unwrap_or_default();
        *scope = Some(Arc::new(next.with_origin(origin)));
    }

    /// Makes `scope` take every origin: the setter behind `any_https_origin`.
    pub(crate) fn add_any(scope: &mut Option<Arc<Scope>>) {
        let mut next = scope.take().map(|s| (*s).clone()).unwrap_or_default();
        next.any = true;
        *scope = Some(Arc::new(next));
    }

    /// Adds a predicate to `scope`: the setter behind both `origin_matching`s.
    pub(crate) fn add_predicate<F>(scope: &mut Option<Arc<Scope>>, matches: F)
    where
        F: Fn(&Uri) -> bool + Send + Sync + 'static,
    {
        let mut next = scope.take().map(|s| (*s).clone()).unwrap_or_default();
        next.predicates.push(Arc::new(matches));
        *scope = Some(Arc::new(next));
    }

    /// Whether a user's predicate ([`origin_matching`](crate::AuthLayer::origin_matching))
    /// sees the request's whole URI, path included.
    #[cfg(feature = "reqwest")]
    pub(crate) fn reads_paths(&self) -> bool {
        !self.predicates.is_empty()
    }

    /// Whether one of the given origins is `scheme://authority`, the authority as the
    /// request names it (with a port, userinfo, upper case, as it came).
    #[inline(always)]
    fn names(&self, scheme: &str, authority: &str) -> bool {
        for named in &self.named {
            if named.is(scheme, authority) {
                return true;
            }
        }
        false
    }

    /// [`allows`](Self::allows) for a request whose URI is absolute (`scheme://authority`
    /// given apart, as a reqwest URL has them parsed) and that is no hop of a redirect
    /// policy's (which only `FollowRedirect` marks): the same rule, on the text alone,
    /// without the user's predicates (which read a whole `Uri`: the caller asks them
    /// where it has one, see [`reads_paths`](Self::reads_paths)).
    #[cfg(feature = "reqwest")]
    pub(crate) fn allows_origin(&self, scheme: &str, authority: &str) -> bool {
        self.any || self.names(scheme, authority)
    }

    /// Whether a request to `uri` gets the credential. A URI without a scheme or host
    /// (set below the layer, as a tonic channel does) is in scope only when
    /// `relative_in_scope`.
    ///
    /// A given origin or predicate is in scope wherever the request came from. Under
    /// `any_https_origin` alone, a redirect hop (marked by the redirect policy) is in
    /// scope only at the origin it came from.
    ///
    /// Always inlined: the hot path's call of it cost ~28 instructions per request, and
    /// whether the compiler inlined it moved with unrelated code (BENCHMARKS.md).
    #[inline(always)]
    pub(crate) fn allows(
        &self,
        uri: &Uri,
        extensions: &http::Extensions,
        relative_in_scope: bool,
    ) -> bool {
        match (uri.scheme_str(), uri.authority()) {
            (Some(scheme), Some(authority)) => {
                (self.any
                    && extensions
                        .get::<RedirectedFrom>()
                        .is_none_or(|from| same_origin(&from.0, uri)))
                    || self.names(scheme, authority.as_str())
                    || self.predicates.iter().any(|p| p(uri))
            }
            // An authority-form URI (`host:port`, as `CONNECT` takes) names a host but
            // no scheme: no origin given is it, and its transport cannot be known (a
            // client sends it over plain http). It is no relative URI.
            (None, Some(_)) => false,
            // Under `any_https_origin` a relative URI is in scope too, and so meets the
            // transport rule, which refuses it unless relative URIs are allowed.
            _ => relative_in_scope || self.any,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Same origin: scheme, host and port, the port defaulted by the scheme, case aside.
    #[test]
    fn same_origin_compares_scheme_host_and_port() {
        let same = |a: &str, b: &str| same_origin(&a.parse().unwrap(), &b.parse().unwrap());
        assert!(same("https://api.test/a", "HTTPS://API.test:443/b"));
        assert!(same("http://[::1]:80/", "http://[::1]/x"));
        assert!(!same("https://api.test/", "http://api.test/"));
        assert!(!same("https://api.test/", "https://api.test:8443/"));
        assert!(!same("https://api.test/", "https://api.test.evil/"));
        assert!(!same("http://127.0.0.1:80/", "http://localhost:80/"));
    }

    /// A port is digits naming a number up to 65535, or none (an empty one is none, as
    /// RFC 3986 reads it); anything else after the host's `:` is no port, where `http`
    /// reads it as none (which made `:99999` the scheme's default). An IPv6 literal's
    /// colons are no port, nor userinfo's.
    #[test]
    fn a_port_is_a_number_to_65535_or_none() {
        let port = |a: &str| named_port(&a.parse().unwrap());
        assert_eq!(port("api.test"), Ok(None));
        assert_eq!(port("api.test:"), Ok(None));
        assert_eq!(port("api.test:443"), Ok(Some(443)));
        assert_eq!(port("api.test:0443"), Ok(Some(443)));
        assert_eq!(port("api.test:65535"), Ok(Some(65535)));
        assert_eq!(port("[::1]"), Ok(None));
        assert_eq!(port("[::1]:8443"), Ok(Some(8443)));
        assert_eq!(port("u:p@api.test"), Ok(None));
        for bad in [
            "api.test:65536",
            "api.test:99999",
            "api.test:65979",
            "[::1]:70000",
        ] {
            assert_eq!(port(bad), Err(()), "{bad}");
        }
        for bad in ["https://api.test:65536", "https://api.test:99999"] {
            assert!(bad.parse::<Origin>().is_err(), "{bad}");
            assert!(Origin::of_url(&format!("{bad}/v1")).is_err(), "{bad}");
        }
        let same = |a: &str, b: &str| same_origin(&a.parse().unwrap(), &b.parse().unwrap());
        assert!(!same("https://api.test/", "https://api.test:65979/"));
        assert!(!same("https://api.test:99999/", "https://api.test:99999/"));
    }

    /// A relative request's `Host` header names an origin in scope: a given one's host
    /// and port (its default for none, case aside), any under `any_https_origin`, one a
    /// predicate takes (asked as `https`); several `Host` headers, userinfo, or a port
    /// that is no port never do.
    #[test]
    fn a_relative_requests_host_names_an_origin_in_scope() {
        let scope = Scope::default()
            .with_origin("https://api.example.com".parse().unwrap())
            .with_origin("http://127.0.0.1:8080".parse().unwrap());
        let names = |scope: &Scope, hosts: &[&str]| {
            let mut headers = http::HeaderMap::new();
            for host in hosts {
                headers.append(http::header::HOST, host.parse().unwrap());
            }
            scope.names_relative_host(&"/v1/me?x=1".parse().unwrap(), &headers)
        };
        for good in ["api.example.com", "API.example.com:443", "127.0.0.1:8080"] {
            assert!(names(&scope, &[good]), "{good}");
        }
        for bad in [
            "tenant.evil.test",
            "api.example.com:8443",
            "api.example.com:65979",
            "127.0.0.1",
            "user@api.example.com",
            "api.example.com.evil.test",
        ] {
            assert!(!names(&scope, &[bad]), "{bad}");
        }
        assert!(!names(&scope, &["api.example.com", "api.example.com"]));
        let any = Scope {
            any: true,
            ..Scope::default()
        };
        assert!(names(&any, &["tenant.test"]));
        let mut predicate = None;
        Scope::add_predicate(&mut predicate, |uri: &Uri| {
            uri.scheme_str() == Some("https")
                && uri.host() == Some("tenant.test")
                && uri.path_and_query().map(|p| p.as_str()) == Some("/v1/me?x=1")
        });
        let predicate = predicate.unwrap();
        assert!(names(&predicate, &["tenant.test"]));
        assert!(!names(&predicate, &["other.test"]));
    }

    /// The inline compare agrees with `==` at every length and for a difference at
    /// every position (each word of the short paths is looked at), and a request's
    /// scheme or host in upper case still matches.
    #[test]
    fn the_short_compare_agrees_with_eq() {
        for n in 0..40 {
            let a: Vec<u8> = (0..n as u8).map(|i| b'a' + i % 26).collect();
            assert!(same_bytes(&a, &a.clone()), "{n}");
            for at in 0..n {
                let mut b = a.clone();
                b[at] ^= 0x40;
                assert!(!same_bytes(&a, &b), "{n} {at}");
            }
            assert!(!same_bytes(&a, &a[..n.saturating_sub(1)]) || n == 0, "{n}");
        }
        assert!(same_text("api.example.com", "API.Example.COM"));
        assert!(!same_text("api.example.com", "api.example.co"));
    }

    /// Origins parse strictly and match scheme, host and (default) port exactly.
    #[test]
    fn origins_match_exactly() {
        let o: Origin = "https://API.example.com".parse().unwrap();
        let scope = Scope::default().with_origin(o);
        let none = http::Extensions::new();
        let allows = |u: &str| scope.allows(&u.parse().unwrap(), &none, false);
        assert!(allows("https://api.example.com/v1/x"));
        assert!(allows("HTTPS://api.EXAMPLE.com:443/"));
        assert!(!allows("https://api.example.com:8443/"));
        assert!(!allows("http://api.example.com/"));
        assert!(!allows("https://api.example.com.evil.test/"));
        assert!(!allows("https://evil.test/?https://api.example.com"));
        assert!(allows("https://api.example.com:443/v1"));
        // Userinfo in a request's authority is not guessed at: no credential.
        assert!(!allows("https://user@api.example.com/"));
        assert!(!allows("/relative"));
        for bad in [
            "api.example.com",
            "https://u:p@api.example.com",
            "https://api.example.com/path",
            "https://api.example.com?q",
            "ftp://x.test",
            "",
        ] {
            assert!(bad.parse::<Origin>().is_err(), "{bad}");
        }
        let v6: Origin = "https://[::1]:8443".parse().unwrap();
        let scope = Scope::default().with_origin(v6);
        assert!(scope.allows(&"https://[::1]:8443/a".parse().unwrap(), &none, false));
        assert!(!scope.allows(&"https://[::1]/a".parse().unwrap(), &none, false));
        let local: Origin = "http://127.0.0.1:8080".parse().unwrap();
        let scope = Scope::default().with_origin(local);
        assert!(scope.allows(&"http://127.0.0.1:8080/a".parse().unwrap(), &none, false));
        assert!(!scope.allows(&"http://127.0.0.1:8081/a".parse().unwrap(), &none, false));
    }

    /// An IP address written in a form other than the one URL parsers (reqwest's `url`,
    /// browsers: WHATWG) rewrite it to is refused with a typed error: such an origin
    /// could never match a reqwest request, which names it in the rewritten form, so its
    /// requests would go without the credential. The written forms are kept.
    #[test]
    fn ip_origins_must_be_in_the_form_url_parsers_write() {
        for bad in [
            "http://127.1",
            "http://127.0.1:8080",
            "http://0x7f.0.0.1",
            "http://2130706433",
            "http://0177.0.0.1",
            "http://127.0.0.01",
            "http://127.0.0.1.",
            "http://1.example.0x10",
            "http://[0:0:0:0:0:0:0:1]",
            "http://[::0:1]",
            "http://[::ffff:127.0.0.1]:8080",
            "http://[2001:db8:0:0:1:0:0:1]",
            "http://b%C3%BCcher.example",
        ] {
            assert!(bad.parse::<Origin>().is_err(), "{bad}");
        }
        for (good, shown) in [
            ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
            ("http://10.0.0.255", "http://10.0.0.255"),
            ("http://[::1]", "http://[::1]"),
            ("http://[::FFFF:7F00:1]:8080", "http://[::ffff:7f00:1]:8080"),
            ("http://[2001:db8::1:0:0:1]", "http://[2001:db8::1:0:0:1]"),
            (
                "http://[2001:db8:0:1:1:1:1:1]",
                "http://[2001:db8:0:1:1:1:1:1]",
            ),
            ("https://api.example.com", "https://api.example.com"),
            ("https://1.2.3.example", "https://1.2.3.example"),
            (
                "https://xn--bcher-kva.example",
                "https://xn--bcher-kva.example",
            ),
        ] {
            let origin: Origin = good.parse().unwrap_or_else(|e| panic!("{good}: {e}"));
            assert_eq!(origin.to_string(), shown);
        }
    }

    /// A `Host` header agrees with the URI only when it names the same host (case aside)
    /// and port (the scheme's default filled in); several, userinfo, or text that is no
    /// authority never agree; no header agrees. And an authority-form URI (a host, no
    /// scheme) is never taken for a relative one.
    #[test]
    fn a_host_header_agrees_only_with_its_own_uri() {
        let agrees = |uri: &str, hosts: &[&str]| {
            let uri: Uri = uri.parse().unwrap();
            let mut headers = http::HeaderMap::new();
            headers.insert(http::header::ACCEPT, http::HeaderValue::from_static("*/*"));
            for host in hosts {
                headers.append(http::header::HOST, host.parse().unwrap());
            }
            !has_host_header(&headers)
                || host_headers_agree(
                    uri.scheme_str().unwrap(),
                    uri.host().unwrap(),
                    uri.port_u16(),
                    &headers,
                )
        };
        let api = "https://api.example.com/v1";
        assert!(agrees(api, &[]));
        assert!(agrees(api, &["api.example.com"]));
        assert!(agrees(api, &["API.Example.com:443"]));
        assert!(agrees("https://api.example.com:443/", &["api.example.com"]));
        assert!(agrees("http://127.0.0.1:8080/", &["127.0.0.1:8080"]));
        assert!(agrees("https://[::1]:8443/", &["[::1]:8443"]));
        for other in [
            "evil.test",
            "api.example.com:8443",
            "api.example.com:80",
            "api.example.com.evil.test",
            "user@api.example.com",
            "api.example.com/path",
            "",
        ] {
            assert!(!agrees(api, &[other]), "{other:?}");
        }
        assert!(!agrees(api, &["api.example.com", "api.example.com"]));
        assert!(!agrees(api, &["api.example.com", "evil.test"]));
        assert!(!agrees("http://127.0.0.1:8080/", &["127.0.0.1"]));

        let relative_allowed =
            Scope::default().with_origin("https://api.example.com".parse().unwrap());
        let none = http::Extensions::new();
        let connect: Uri = "api.example.com:443".parse().unwrap();
        assert!(!relative_allowed.allows(&connect, &none, true));
        assert!(relative_allowed.allows(&"/pkg.Svc/Method".parse().unwrap(), &none, true));
    }
}

/// The reqwest middleware applies the origin rule to the URL reqwest parsed: the same
/// answer as the rule over that URL as an `http::Uri`.
#[cfg(all(test, feature = "reqwest"))]
mod reqwest_tests {
    use super::*;

    #[test]
    fn the_origin_rule_reads_a_reqwest_url_as_it_reads_a_uri() {
        let one = Scope::default().with_origin("https://API.example.com".parse().unwrap());
        let two = one
            .clone()
            .with_origin("http://127.0.0.1:8080".parse().unwrap())
            .with_origin("https://[::1]:8443".parse().unwrap());
        let any = Scope {
            any: true,
            ..Scope::default()
        };
        let none = http::Extensions::new();
        for url in [
            "https://api.example.com/v1/x?q=1",
            "HTTPS://API.EXAMPLE.COM:443/",
            "https://api.example.com:8443/",
            "http://api.example.com/",
            "https://user@api.example.com/",
            "https://user:pw@api.example.com/",
            "https://api.example.com.evil.test/",
            "https://evil.test/?https://api.example.com",
            "http://127.0.0.1:8080/a",
            "http://127.0.0.1:80/a",
            "http://127.0.0.1/a",
            "https://[::1]:8443/",
            "https://[0:0:0:0:0:0:0:1]:8443/",
            "https://[::1]/",
            "wss://api.example.com/",
        ] {
            let parsed = reqwest::Url::parse(url).unwrap();
            // The URL as reqwest sends it (its parser canonicalises: lower case, no
            // default port, IPv6 compressed), which the slow path parses as a `Uri`.
            let uri: Uri = parsed.as_str().parse().unwrap();
            for (name, scope) in [("one", &one), ("two", &two), ("any", &any)] {
                assert_eq!(
                    scope.allows_origin(parsed.scheme(), parsed.authority()),
                    scope.allows(&uri, &none, false),
                    "{name}: {url}"
                );
            }
        }
    }
}
