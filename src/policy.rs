//! Per-request rules of the layer: which statuses mean "credential rejected", which
//! transports may carry a credential, and what to do with a request that brings its own.

use std::net::IpAddr;

use http::{Request, StatusCode, Uri};

use crate::{
    credential::Credential,
    error::{Error, ErrorKind},
    rejection::Judge,
};

/// Request extension: send this request with the credential, but never a second time.
///
/// For requests that must not be repeated (a payment without an idempotency key). A
/// rejection still invalidates the credential, so the next request gets a fresh one; the
/// rejected response reaches the caller with a
/// [`NotReplayed::OptedOut`](crate::NotReplayed::OptedOut) extension.
///
/// ```
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(tower_client_auth::NoReplay);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoReplay;

/// What the layer does with a request that already carries one of the credential's
/// headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExistingHeader {
    /// Send it untouched: no credential added, no refresh, no replay. The default. A
    /// credential of several headers goes on beside a header of its own the request
    /// brings (its other headers are added), and that request's answer is not judged
    /// either: a 401 may be about the request's own header.
    #[default]
    PassThrough,
    /// Replace the header with the credential.
    Replace,
}

/// Default statuses that mean "the credential was rejected": `401 Unauthorized` only.
/// `403 Forbidden` means missing permissions, which a new token does not fix.
pub const DEFAULT_REJECTION_STATUSES: &[StatusCode] = &[StatusCode::UNAUTHORIZED];

/// A set of 4xx/5xx status codes, as a bitmap: checking a response is one shift.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct StatusSet([u64; 4]);

impl StatusSet {
    const BASE: u16 = 400;

    /// `401` alone: [`DEFAULT_REJECTION_STATUSES`].
    pub(crate) const UNAUTHORIZED: StatusSet = StatusSet([1 << 1, 0, 0, 0]);

    pub(crate) fn new(
        statuses: impl IntoIterator<Item = StatusCode>,
    ) -> Result<Self, crate::error::InvalidConfig> {
        let invalid = |reason| crate::error::InvalidConfig::new("rejection_statuses", reason);
        let mut set = StatusSet([0; 4]);
        for status in statuses {
            match status.as_u16().checked_sub(Self::BASE) {
                Some(bit) if bit < 200 => set.0[usize::from(bit / 64)] |= 1 << (bit % 64),
                _ => {
                    return Err(invalid(
                        "only 4xx and 5xx statuses can mean a rejected credential",
                    ));
                }
            }
        }
        if set.0 == [0; 4] {
            return Err(invalid(
                "at least one status is needed (to replay nothing, use .without_replay())",
            ));
        }
        Ok(set)
    }

    pub(crate) fn contains(&self, status: StatusCode) -> bool {
        match status.as_u16().checked_sub(Self::BASE) {
            Some(bit) if bit < 200 => self.0[usize::from(bit / 64)] & (1 << (bit % 64)) != 0,
            _ => false,
        }
    }

    fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        (0..200u16)
            .filter(|bit| self.0[usize::from(bit / 64)] & (1 << (bit % 64)) != 0)
            .map(|bit| bit + Self::BASE)
    }
}

impl std::fmt::Debug for StatusSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// The layer's per-request settings. Cheap to clone: the standard rejection rule is
/// inline, a custom one behind an `Arc`.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    pub(crate) judge: Judge,
    /// Whether an `insufficient_scope` answer asks the source for a wider grant and
    /// replays once (off by default).
    pub(crate) step_up: bool,
    pub(crate) replay_limit: usize,
    pub(crate) allow_http_loopback: bool,
    pub(crate) allow_relative_uris: bool,
    pub(crate) existing_header: ExistingHeader,
    /// Whether a rejected request is sent again (which means keeping a copy of each
    /// request's head until its response arrives).
    pub(crate) replay: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            judge: Judge::default(),
            step_up: false,
            replay_limit: crate::body::DEFAULT_REPLAY_LIMIT,
            allow_http_loopback: false,
            allow_relative_uris: false,
            existing_header: ExistingHeader::PassThrough,
            replay: true,
        }
    }
}

impl Policy {
    /// Whether a credential may be sent to `uri`. Inlined into the hot path for its
    /// common case, `https`; everything else is looked at out of line, given the scheme
    /// and host text rather than the `Uri`: a reference into the request handed to a
    /// function the compiler cannot see into made the common path dearer (BENCHMARKS.md's git
    /// history, 2026-12-02).
    #[inline]
    pub(crate) fn check_transport(&self, uri: &Uri) -> Result<(), Error> {
        if is_https(uri) {
            return Ok(());
        }
        self.check_transport_slow(uri.scheme_str(), || uri.host().is_some_and(is_loopback))
    }

    /// [`check_transport`](Self::check_transport) for a URI given as its scheme and
    /// whether its host is a loopback host (`localhost`, 127.0.0.0/8, `::1` or
    /// IPv4-mapped loopback), asked only for plain `http` (a reqwest URL has its host
    /// parsed already).
    #[cfg(feature = "reqwest")]
    #[inline]
    pub(crate) fn check_transport_of(
        &self,
        scheme: &str,
        loopback: impl FnOnce() -> bool,
    ) -> Result<(), Error> {
        if scheme == "https" {
            return Ok(());
        }
        self.check_transport_slow(Some(scheme), loopback)
    }

    #[cold]
    #[inline(never)]
    fn check_transport_slow(
        &self,
        scheme: Option<&str>,
        loopback: impl FnOnce() -> bool,
    ) -> Result<(), Error> {
        check_transport_parts(
            scheme,
            loopback,
            self.allow_http_loopback,
            self.allow_relative_uris,
        )
        .map_err(|detail| {
            Error::new(ErrorKind::InsecureTransport).with_detail(name_the_setter(
                detail,
                "plain http to a loopback host: call allow_http_loopback(true) on the AuthLayer (or AuthMiddleware)",
            ))
        })
    }

    /// Attaches `credential` to `request`, or returns `false` when the request brings its
    /// own credential header and the policy is to pass such requests through untouched.
    #[inline]
    pub(crate) fn attach<B>(
        &self,
        credential: &Credential,
        request: &mut Request<B>,
    ) -> Result<bool, Error> {
        attach(
            credential,
            request,
            self.existing_header == ExistingHeader::Replace,
        )
    }
}

/// Attaches `credential` to `request` (see [`Credential::attach`] for `replace`), with a
/// proof of possession when the credential is bound to a key.
#[inline]
pub(crate) fn attach<B>(
    credential: &Credential,
    request: &mut Request<B>,
    replace: bool,
) -> Result<bool, Error> {
    let attached = credential
        .attach(request.headers_mut(), replace)
        .map_err(headers_full)?;
    if let (true, Some(binding)) = (attached, credential.binding()) {
        crate::bound::prove(&**binding, request)?;
    }
    Ok(attached)
}

/// The error for a header map with no room for the credential.
pub(crate) fn headers_full(_: http::header::MaxSizeReached) -> Error {
    Error::new(ErrorKind::HeadersFull)
}

/// The one transport rule, for the token client (the layer and the reqwest middleware
/// apply it through [`Policy::check_transport`]): `https` always; plain `http` (or `ws`,
/// `wss`) only to a loopback host and only when allowed; a URI without a scheme only
/// when allowed. The error says why, without the URI. A scheme is read as `http` parses
/// it and as an HTTP client's connector reads it, in lower case (see
/// [`check_transport_parts`]).
#[cfg(feature = "token")]
pub(crate) fn check_transport(
    uri: &Uri,
    allow_http_loopback: bool,
    allow_relative: bool,
) -> Result<(), &'static str> {
    if is_https(uri) {
        return Ok(());
    }
    check_transport_parts(
        uri.scheme_str(),
        || uri.host().is_some_and(is_loopback),
        allow_http_loopback,
        allow_relative,
    )
}

/// The common case, checked first: `https` needs no look at the host (parsing the
/// authority for it costs more than everything else the check does).
#[inline]
fn is_https(uri: &Uri) -> bool {
    // `scheme_str` is inlined; `Scheme`'s `PartialEq` is a call.
    uri.scheme_str() == Some("https")
}

/// `loopback` tells whether the host is a loopback host; it is asked only for plain
/// `http` (or `ws`, `wss`).
pub(crate) fn check_transport_parts(
    scheme: Option<&str>,
    loopback: impl FnOnce() -> bool,
    allow_http_loopback: bool,
    allow_relative: bool,
) -> Result<(), &'static str> {
    let Some(scheme) = scheme else {
        return if allow_relative {
            Ok(())
        } else {
            Err("the request uri has no scheme, so its transport cannot be checked")
        };
    };
    // The text a connector starts TLS for is `https` alone (hyper-tls compares
    // `scheme_str()` with it; hyper-util's `HttpConnector` takes port 443 for
    // `Scheme::HTTPS` only): a scheme built in upper case (`Uri::builder().scheme("HTTPS")`,
    // which `http` keeps apart from `Scheme::HTTPS`) or `wss` goes in plain text there.
    let (plain, loopback_refused) = match scheme {
        "https" => return Ok(()),
        "http" | "ws" => ("plain http to a non-loopback host", LOOPBACK_NOT_ALLOWED),
        "wss" => (
            "wss to a non-loopback host: an http client's connector does not start TLS for it (use https)",
            "wss to a loopback host: an http client's connector does not start TLS for it, so it is allowed only as plain http is (allow_http_loopback(true)); or use https",
        ),
        _ => {
            return Err(
                "a uri scheme other than https or http (in lower case, as http parses them)",
            );
        }
    };
    match loopback() {
        true if allow_http_loopback => Ok(()),
        true => Err(loopback_refused),
        false => Err(plain),
    }
}

/// The refusal of plain http to a loopback host that was not allowed; each caller names
/// its own setter in its place (see [`name_the_setter`]).
const LOOPBACK_NOT_ALLOWED: &str = "plain http to a loopback host needs allow_http_loopback";

/// `detail` as the caller shows it: the loopback refusal names `setter`, the exact call
/// that allows it; any other refusal is left as it is.
pub(crate) fn name_the_setter(detail: &'static str, setter: &'static str) -> &'static str {
    if detail == LOOPBACK_NOT_ALLOWED {
        setter
    } else {
        detail
    }
}

/// The proxies a default reqwest client takes from the environment, as it reads them
/// (hyper-util's matcher, `from_system`), or `None` when none can apply to plain http:
/// on a platform whose only source is the environment (not macOS or Windows), none of
/// `HTTP_PROXY`, `ALL_PROXY` (or lower case) is set. Then a plain-http request pays no
/// look at its URL.
#[cfg(feature = "reqwest")]
pub(crate) fn env_proxies() -> Option<std::sync::Arc<hyper_util::client::proxy::matcher::Matcher>> {
    let may_apply = cfg!(any(target_os = "macos", windows))
        || ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
            .iter()
            .any(|name| std::env::var_os(name).is_some());
    may_apply
        .then(|| std::sync::Arc::new(hyper_util::client::proxy::matcher::Matcher::from_system()))
}

/// Whether `proxies` (the environment's, as a default reqwest client reads them) would
/// hand a plain-http request to `uri` to any proxy. Plain http is allowed to a loopback
/// host because the request stays on this host; a proxy, wherever it listens, may send
/// it on anywhere, and nothing here can see where: cntlm forwards it in the clear to its
/// parent proxy, a loopback port of `ssh -L` or `kubectl port-forward` ends on another
/// host (whose own loopback then gets the credential), a SOCKS proxy connects to the
/// target from its far end.
#[cfg(feature = "reqwest")]
pub(crate) fn proxied(proxies: &hyper_util::client::proxy::matcher::Matcher, uri: &Uri) -> bool {
    uri.scheme_str() == Some("http") && proxies.intercept(uri).is_some()
}

/// `localhost`, 127.0.0.0/8, `::1` and IPv4-mapped loopback.
pub(crate) fn is_loopback(host: &str) -> bool {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip.is_loopback(),
        Ok(IpAddr::V6(ip)) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bitmap holds exactly what was put in; codes outside 400–599, or none at all,
    /// are refused; the default is 401 alone.
    #[test]
    fn status_set_membership() {
        assert!(StatusSet::new([StatusCode::UNAUTHORIZED, StatusCode::OK]).is_err());
        assert!(StatusSet::new([StatusCode::from_u16(600).unwrap()]).is_err());
        assert!(StatusSet::new([]).is_err());
        assert!(
            StatusSet::new(DEFAULT_REJECTION_STATUSES.iter().copied()).unwrap()
                == StatusSet::UNAUTHORIZED
        );
        let set = StatusSet::new([
            StatusCode::UNAUTHORIZED,
            StatusCode::from_u16(419).unwrap(),
            StatusCode::from_u16(599).unwrap(),
        ])
        .unwrap();
        assert!(set.contains(StatusCode::from_u16(599).unwrap()));
        assert!(set.contains(StatusCode::UNAUTHORIZED));
        assert!(set.contains(StatusCode::from_u16(419).unwrap()));
        assert!(!set.contains(StatusCode::FORBIDDEN));
        assert!(!set.contains(StatusCode::OK));
        assert!(!set.contains(StatusCode::from_u16(999).unwrap()));
        assert_eq!(format!("{set:?}"), "{401, 419, 599}");
    }

    /// The layer's transport check reads the host as `Uri` does: userinfo and port
    /// stripped, IPv6 brackets kept.
    #[test]
    fn transport_check_reads_the_host_as_uri_does() {
        let policy = Policy {
            allow_http_loopback: true,
            ..Policy::default()
        };
        for (uri, allowed) in [
            ("http://localhost/", true),
            ("http://localhost:8080/x", true),
            ("http://user:pa:ss@127.0.0.1:9/", true),
            ("http://u@[::1]:80/", true),
            ("http://[::1]/", true),
            ("http://[::ffff:127.0.0.1]:1/", true),
            ("http://a@b@example.com/", false),
            ("ws://api.example.com:443", false),
            ("http://127.0.0.1", true),
            ("http://user@[::1]:8080/", true),
            ("http://localhost:1/", true),
            ("http://127.0.0.1@evil.example/", false),
            ("http://evil.example:80@127.0.0.1/", true),
            ("http://[::2]/", false),
        ] {
            let uri: Uri = uri.parse().unwrap();
            assert_eq!(policy.check_transport(&uri).is_ok(), allowed, "{uri}");
        }
    }

    /// Only https (or loopback http when allowed) may carry a credential.
    #[test]
    fn transport_rules() {
        let strict = Policy::default();
        let dev = Policy {
            allow_http_loopback: true,
            ..Policy::default()
        };
        let ok = |p: &Policy, u: &str| p.check_transport(&u.parse().unwrap()).is_ok();
        assert!(ok(&strict, "https://api.example.com/v1"));
        assert!(ok(&strict, "HTTPS://api.example.com/v1"));
        assert!(!ok(&strict, "http://127.0.0.1:8080/"));
        assert!(!ok(&strict, "http://api.example.com/"));
        assert!(!ok(&strict, "/relative/path"));
        assert!(!ok(&strict, "ftp://example.com/"));
        for loopback in [
            "http://127.0.0.1:1/",
            "http://127.9.9.9/",
            "http://localhost:3000/",
            "http://LOCALHOST/",
            "http://[::1]:80/",
            "http://[::ffff:127.0.0.1]/",
        ] {
            assert!(ok(&dev, loopback), "{loopback}");
        }
        for remote in [
            "http://10.0.0.1/",
            "http://localhost.example.com/",
            "http://127.0.0.1.nip.io/",
            "http://[::2]/",
        ] {
            assert!(!ok(&dev, remote), "{remote}");
        }
        let relative = Policy {
            allow_relative_uris: true,
            ..Policy::default()
        };
        assert!(ok(&relative, "/pkg.Service/Method"));
        let err = strict
            .check_transport(&"http://api.example.com/".parse().unwrap())
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InsecureTransport);
        assert_eq!(
            err.to_string(),
            "refusing to send a credential over an insecure transport: plain http to a non-loopback host"
        );
    }
}
