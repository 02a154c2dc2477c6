//! The credential a request carries: one or more sensitive headers and an optional expiry.
//!
//! Constructors cover the shapes real APIs use: `Authorization: Bearer <token>`, a custom
//! scheme such as `Authorization: Secret <secret>`, a `Cookie`, or any header (API keys).
//! Every value is validated (no control characters, nothing a header cannot carry) and
//! marked [sensitive](https://docs.rs/http/1/http/header/struct.HeaderValue.html#method.set_sensitive), so HTTP/2 never indexes it and
//! tools that honour the flag never print it. `Debug` prints `[redacted]` for values.
//!
//! # Example
//! ```
//! use std::time::Duration;
//! use tower_client_auth::Credential;
//!
//! let bearer = Credential::bearer("eyJhbGciOi...")?.expires_in(Duration::from_secs(3600));
//! let secret = Credential::with_scheme("Secret", "s3cr3t")?;
//! let cookie = Credential::cookie("session", "abc123")?;
//! let api_key = Credential::header("x-api-key", "k-123")?;
//!
//! assert_eq!(format!("{cookie:?}"), r#"Credential { headers: {"cookie": [redacted]}, expires_at: None, issued_at: None }"#);
//! # let _ = (bearer, secret, api_key);
//! # Ok::<(), tower_client_auth::InvalidCredential>(())
//! ```

use std::{
    fmt,
    time::{Duration, SystemTime},
};

use http::{HeaderMap, HeaderName, HeaderValue, header, header::MaxSizeReached};

use crate::error::InvalidCredential;

/// One or more header name/value pairs that authenticate a request, plus an optional expiry.
///
/// Cheap to clone (header values are reference counted). Two credentials are equal when
/// they carry the same headers; expiry is not compared.
///
/// Expiry is wall-clock time (`SystemTime`), as a server states it: it means the same in
/// every process that shares the credential, and after a suspend. With it goes the time
/// the credential was issued, so the cache sizes its refresh windows from the lifetime
/// the server granted, not from what is left when the credential reaches it.
#[derive(Clone)]
pub struct Credential {
    headers: Box<[(HeaderName, HeaderValue)]>,
    expires_at: Option<SystemTime>,
    issued_at: Option<SystemTime>,
    /// The refresh token issued with it, carried to a shared store (never sent).
    refresh_token: Option<crate::Secret>,
    /// The key it is bound to (DPoP): every request carrying it carries a proof too.
    binding: Option<crate::bound::SharedBinding>,
}

impl Credential {
    /// `Authorization: Bearer <token>` (RFC 6750).
    pub fn bearer(token: impl AsRef<str>) -> Result<Self, InvalidCredential> {
        Self::with_scheme("Bearer", token)
    }

    /// `Authorization: <scheme> <secret>`, for custom schemes such as `Secret`.
    ///
    /// The scheme must be an HTTP token (letters, digits and ``!#$%&'*+-.^_`|~``).
    pub fn with_scheme(scheme: &str, secret: impl AsRef<str>) -> Result<Self, InvalidCredential> {
        if scheme.is_empty() || !scheme.bytes().all(is_tchar) {
            return Err(InvalidCredential::new(
                "authorization scheme is not an http token",
            ));
        }
        let secret = secret.as_ref();
        check_secret(
            secret,
            "authorization secret is empty",
            "authorization secret holds whitespace, control or non-ascii characters",
        )?;
        let value = sensitive(format!("{scheme} {secret}"), "authorization secret")?;
        Ok(Self::from_pair(header::AUTHORIZATION, value))
    }

    /// `Cookie: <name>=<value>` (RFC 6265 cookie syntax is enforced).
    pub fn cookie(name: &str, value: impl AsRef<str>) -> Result<Self, InvalidCredential> {
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return Err(InvalidCredential::new("cookie name is not an http token"));
        }
        let value = value.as_ref();
        if value.is_empty() {
            return Err(InvalidCredential::new("cookie value is empty"));
        }
        if !value.bytes().all(is_cookie_octet) {
            return Err(InvalidCredential::new(
                "cookie value holds a character cookies cannot carry",
            ));
        }
        let value = sensitive(format!("{name}={value}"), "cookie value")?;
        Ok(Self::from_pair(header::COOKIE, value))
    }

    /// Any header, such as `X-Api-Key: <key>`, but one that frames or routes the
    /// message (`Content-Length`, `Transfer-Encoding`, `Host`, `Connection`, `TE`,
    /// `Trailer`, `Upgrade`, `Keep-Alive`, `Proxy-Connection`): set on a request, it
    /// would cut the body short or send the request elsewhere.
    pub fn header(name: &str, value: impl AsRef<str>) -> Result<Self, InvalidCredential> {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| InvalidCredential::new("header name is not valid"))?;
        check_name(&name)?;
        let value = value.as_ref();
        check_secret(
            value,
            "header value is empty",
            "header value holds whitespace, control or non-ascii characters",
        )?;
        let value = sensitive(value.to_owned(), "header value")?;
        Ok(Self::from_pair(name, value))
    }

    /// A credential made of several headers. Each value is marked sensitive. A header
    /// that frames or routes the message is refused, as by [`header`](Self::header).
    pub fn from_headers<I>(headers: I) -> Result<Self, InvalidCredential>
    where
        I: IntoIterator<Item = (HeaderName, HeaderValue)>,
    {
        let headers: Box<[_]> = headers
            .into_iter()
            .map(|(name, mut value)| {
                check_name(&name)?;
                value.set_sensitive(true);
                Ok((name, value))
            })
            .collect::<Result<_, InvalidCredential>>()?;
        if headers.is_empty() {
            return Err(InvalidCredential::new(
                "a credential needs at least one header",
            ));
        }
        Ok(Credential {
            headers,
            expires_at: None,
            issued_at: None,
            refresh_token: None,
            binding: None,
        })
    }

    fn from_pair(name: HeaderName, value: HeaderValue) -> Self {
        Credential {
            headers: Box::new([(name, value)]),
            expires_at: None,
            issued_at: None,
            refresh_token: None,
            binding: None,
        }
    }

    /// Carries `token`, the refresh token issued with this credential, to a shared
    /// [`CredentialStore`](crate::CredentialStore): it is saved with the credential in
    /// one write, and handed to the next fetch under the store's lease
    /// ([`FetchContext::refresh_sharing`](crate::FetchContext::refresh_sharing)). It is
    /// never sent to the API, and equality ignores it.
    pub fn with_refresh_token(mut self, token: impl Into<crate::Secret>) -> Self {
        self.refresh_token = Some(token.into());
        self
    }

    /// The refresh token carried with this credential, if any.
    pub fn refresh_token(&self) -> Option<&crate::Secret> {
        self.refresh_token.as_ref()
    }

    /// This credential, bound to a key: each request carrying it carries a proof too.
    #[cfg_attr(not(feature = "jwt"), allow(dead_code))]
    pub(crate) fn bound(mut self, binding: crate::bound::SharedBinding) -> Self {
        self.binding = Some(binding);
        self
    }

    /// The key this credential is bound to, if any.
    #[inline]
    pub(crate) fn binding(&self) -> Option<&crate::bound::SharedBinding> {
        self.binding.as_ref()
    }

    /// Whether this credential is bound to a key (a DPoP token, RFC 9449): each request
    /// carrying it also carries a proof of possession, made for that request, in a
    /// `DPoP` header. A bound credential cannot be used without its key, so a
    /// [`CredentialStore`](crate::CredentialStore) does not share it.
    pub fn is_bound(&self) -> bool {
        self.binding.is_some()
    }

    /// This credential without its refresh token.
    pub(crate) fn without_refresh_token(mut self) -> Self {
        self.refresh_token = None;
        self
    }

    /// Sets when the credential stops being valid, on the wall clock. Say when it was
    /// issued too ([`issued_at`](Self::issued_at)) if you know: without it, the cache
    /// takes the lifetime left when the credential reaches it as its whole lifetime.
    pub fn expires_at(mut self, at: SystemTime) -> Self {
        self.expires_at = Some(at);
        self
    }

    /// Sets when the credential was issued, on the wall clock.
    pub fn issued_at(mut self, at: SystemTime) -> Self {
        self.issued_at = Some(at);
        self
    }

    /// Issued now (the system clock) and valid for `lifetime`. A lifetime too large to
    /// represent means the credential never expires.
    pub fn expires_in(self, lifetime: Duration) -> Self {
        self.lives(SystemTime::now(), lifetime)
    }

    /// Issued at `issued` and valid for `lifetime` from then: [`expires_in`](Self::expires_in)
    /// on a clock of your own (a [`Clock`](crate::clock::Clock)). A lifetime too large to
    /// represent means the credential never expires.
    pub fn lives(mut self, issued: SystemTime, lifetime: Duration) -> Self {
        self.issued_at = Some(issued);
        self.expires_at = issued.checked_add(lifetime);
        self
    }

    /// When the credential stops being valid, if known.
    pub fn expiry(&self) -> Option<SystemTime> {
        self.expires_at
    }

    /// When the credential was issued, if known.
    pub fn issued(&self) -> Option<SystemTime> {
        self.issued_at
    }

    /// The lifetime the credential was issued with (expiry minus issue), if both are
    /// known.
    pub fn lifetime(&self) -> Option<Duration> {
        self.expires_at?.duration_since(self.issued_at?).ok()
    }

    /// The header names this credential sets.
    pub fn header_names(&self) -> impl Iterator<Item = &HeaderName> {
        self.headers.iter().map(|(name, _)| name)
    }

    /// The headers this credential sets. Values are sensitive: do not log them.
    pub fn headers(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        self.headers.iter().map(|(name, value)| (name, value))
    }

    /// Sets this credential's headers unless the request brings its own and `replace` is
    /// false; returns whether the request now carries the whole credential as ours (a
    /// credential of several headers may go on in part: see `attach_several`). The usual
    /// single header costs one hash lookup: it is appended, and only if the request
    /// already had that header is the append undone (or the header replaced). Errors only when the header map is full (`http`'s
    /// `MAX_SIZE`); nothing is sent then.
    ///
    /// Inlined into the hot path for the common case; everything else is out of line.
    #[inline]
    pub(crate) fn attach(
        &self,
        headers: &mut HeaderMap,
        replace: bool,
    ) -> Result<bool, MaxSizeReached> {
        let [(name, value)] = &*self.headers else {
            return self.attach_several(headers, replace);
        };
        // `Authorization` by name: the key is a constant, so the map's lookup is
        // specialised for it (the common case; measured in benches/instructions.sh).
        let appended_to_existing = if *name == header::AUTHORIZATION {
            headers.try_append(header::AUTHORIZATION, value.clone())?
        } else {
            headers.try_append(name, value.clone())?
        };
        if appended_to_existing {
            return Self::existing_header(headers, name, value, replace);
        }
        Ok(true)
    }

    /// The request already had the credential's header, and `value` was just appended
    /// after the request's own values.
    #[cold]
    #[inline(never)]
    fn existing_header(
        headers: &mut HeaderMap,
        name: &HeaderName,
        value: &HeaderValue,
        replace: bool,
    ) -> Result<bool, MaxSizeReached> {
        if *name == header::COOKIE {
            // Cookies are one header of many pairs: ours joins theirs, unless they
            // bring a cookie of the same name.
            let mut theirs: Vec<HeaderValue> = headers.get_all(name).iter().cloned().collect();
            theirs.pop();
            return merge_cookie(headers, &theirs, value, replace);
        }
        if replace {
            headers.try_insert(name, value.clone())?;
            return Ok(true);
        }
        // Keep theirs: remove the value just appended (the last one), leaving theirs as
        // they were, in order.
        let mut theirs: Vec<HeaderValue> = headers.get_all(name).iter().cloned().collect();
        theirs.pop();
        headers.remove(name);
        for value in theirs {
            headers.try_append(name, value)?;
        }
        Ok(false)
    }

    /// [`attach`](Self::attach) for a credential of several headers. Each header on its
    /// own follows the rule for a header the request already has (cookies join theirs):
    /// with `replace`, ours take their places; without, theirs are kept and ours go on
    /// beside them. `true` only when the request carries the whole credential as ours:
    /// one that keeps a header of its own (a cookie of the same name, for a cookie) is
    /// not wholly ours, so its answer is not judged (a 401 may be about their header),
    /// and it is never replayed.
    #[inline(never)]
    fn attach_several(
        &self,
        headers: &mut HeaderMap,
        replace: bool,
    ) -> Result<bool, MaxSizeReached> {
        let mut attached = false;
        let mut theirs_kept = false;
        for (i, (name, value)) in self.headers.iter().enumerate() {
            let ours_already = self.headers[..i].iter().any(|(n, _)| n == name);
            let ours = if *name == header::COOKIE && headers.contains_key(header::COOKIE) {
                let theirs: Vec<HeaderValue> = headers.get_all(name).iter().cloned().collect();
                merge_cookie(headers, &theirs, value, replace)?
            } else if ours_already {
                // A second value of one of our own headers joins the first.
                headers.try_append(name, value.clone())?;
                true
            } else if replace || !headers.contains_key(name) {
                headers.try_insert(name, value.clone())?;
                true
            } else {
                false
            };
            attached |= ours;
            theirs_kept |= !ours;
        }
        Ok(attached && !theirs_kept)
    }
}

impl PartialEq for Credential {
    fn eq(&self, other: &Self) -> bool {
        self.headers == other.headers
    }
}

impl Eq for Credential {}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Redacted<'a>(&'a [(HeaderName, HeaderValue)]);
        impl fmt::Debug for Redacted<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_map()
                    .entries(
                        self.0
                            .iter()
                            .map(|(name, _)| (name, format_args!("[redacted]"))),
                    )
                    .finish()
            }
        }
        let mut f = f.debug_struct("Credential");
        f.field("headers", &Redacted(&self.headers))
            .field("expires_at", &self.expires_at)
            .field("issued_at", &self.issued_at);
        // Shown only when carried (a credential shared with its refresh token).
        if let Some(token) = &self.refresh_token {
            f.field("refresh_token", token);
        }
        if self.binding.is_some() {
            f.field("bound", &true);
        }
        f.finish()
    }
}

/// Joins the cookie pair `ours` (`name=value`) to the request's own `Cookie` values
/// `theirs`, as one header (RFC 6265 §5.4: one `Cookie` header, pairs joined by `; `).
/// When they bring a cookie of the same name: with `replace`, ours takes its place;
/// without, the request is left as it came and `false` returned.
fn merge_cookie(
    headers: &mut HeaderMap,
    theirs: &[HeaderValue],
    ours: &HeaderValue,
    replace: bool,
) -> Result<bool, MaxSizeReached> {
    let name_of = |pair: &[u8]| -> Vec<u8> {
        let name = pair.split(|b| *b == b'=').next().unwrap_or(pair);
        name.trim_ascii().to_vec()
    };
    let our_name = name_of(ours.as_bytes());
    let pairs: Vec<&[u8]> = theirs
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .map(<[u8]>::trim_ascii)
        .filter(|p| !p.is_empty())
        .collect();
    let same_name = pairs.iter().any(|p| name_of(p) == our_name);
    if same_name && !replace {
        // Put theirs back as they were (the caller removed ours already, or never added).
        headers.remove(header::COOKIE);
        for value in theirs {
            headers.try_append(header::COOKIE, value.clone())?;
        }
        return Ok(false);
    }
    let mut merged = Vec::new();
    for pair in pairs.iter().filter(|p| name_of(p) != our_name) {
        merged.extend_from_slice(pair);
        merged.extend_from_slice(b"; ");
    }
    merged.extend_from_slice(ours.as_bytes());
    // Every byte came from valid header values, joined with "; ".
    let mut value = HeaderValue::from_bytes(&merged).unwrap_or_else(|_| ours.clone());
    value.set_sensitive(true);
    headers.try_insert(header::COOKIE, value)?;
    Ok(true)
}

/// Token characters of RFC 9110 §5.6.2.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 6265 §4.1.1 `cookie-octet`.
fn is_cookie_octet(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E)
}

/// A header that frames or routes the message (its length, its transfer coding, its
/// host, the connection's options) carries no credential: set on a request, it would
/// cut the body short (hyper keeps a `Content-Length` it is given, and the rest of the
/// body reads as the next request on the connection), or send it elsewhere.
fn check_name(name: &HeaderName) -> Result<(), InvalidCredential> {
    const FRAMING: &[HeaderName] = &[
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::HOST,
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
    ];
    if FRAMING.contains(name) || matches!(name.as_str(), "keep-alive" | "proxy-connection") {
        return Err(InvalidCredential::new(
            "header name frames or routes the message: it cannot carry a credential",
        ));
    }
    Ok(())
}

/// Secrets are visible ASCII: no spaces, no control characters (header injection).
fn check_secret(
    secret: &str,
    empty: &'static str,
    bad: &'static str,
) -> Result<(), InvalidCredential> {
    if secret.is_empty() {
        return Err(InvalidCredential::new(empty));
    }
    if !secret.bytes().all(|b| (0x21..=0x7E).contains(&b)) {
        return Err(InvalidCredential::new(bad));
    }
    Ok(())
}

fn sensitive(value: String, what: &'static str) -> Result<HeaderValue, InvalidCredential> {
    let mut value = HeaderValue::try_from(value).map_err(|_| InvalidCredential::new(what))?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CANARY: &str = "canary-7f3a9c";

    /// Every constructor marks its values sensitive and never prints them.
    #[test]
    fn constructors_are_sensitive_and_redacted() {
        let all = [
            Credential::bearer(CANARY).unwrap(),
            Credential::with_scheme("Secret", CANARY).unwrap(),
            Credential::cookie("sid", CANARY).unwrap(),
            Credential::header("x-api-key", CANARY).unwrap(),
        ];
        for c in &all {
            assert!(c.headers().all(|(_, v)| v.is_sensitive()));
            assert!(!format!("{c:?}").contains(CANARY));
            assert!(!format!("{c:#?}").contains(CANARY));
        }
        let mut map = HeaderMap::new();
        all[1].attach(&mut map, true).unwrap();
        assert_eq!(map["authorization"], format!("Secret {CANARY}").as_str());
        all[2].attach(&mut map, true).unwrap();
        assert_eq!(map["cookie"], format!("sid={CANARY}").as_str());
    }

    /// `attach`: absent → added; present and kept → every value the request brought
    /// stays, in order, and nothing of ours is left; present and replaced → ours alone.
    /// Other headers are never touched.
    #[test]
    fn attach_adds_keeps_or_replaces() {
        let ours = Credential::header("x-api-key", "ours").unwrap();
        let brought = |values: &[&'static str]| {
            let mut map = HeaderMap::new();
            map.insert("accept", HeaderValue::from_static("*/*"));
            for v in values {
                map.append("x-api-key", HeaderValue::from_static(v));
            }
            map
        };
        let values = |map: &HeaderMap| -> Vec<String> {
            map.get_all("x-api-key")
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect()
        };

        let mut map = brought(&[]);
        assert!(ours.attach(&mut map, false).unwrap());
        assert_eq!(values(&map), ["ours"]);

        for theirs in [&["k1"][..], &["k1", "k2", "k3"]] {
            let mut map = brought(theirs);
            assert!(!ours.attach(&mut map, false).unwrap());
            assert_eq!(values(&map), theirs);
            assert_eq!(map["accept"], "*/*");
            assert_eq!(map.len(), theirs.len() + 1);

            let mut map = brought(theirs);
            assert!(ours.attach(&mut map, true).unwrap());
            assert_eq!(values(&map), ["ours"]);
            assert_eq!(map["accept"], "*/*");
        }
    }

    /// A cookie joins the request's cookies in one header; a cookie of the same name is
    /// kept (or, replacing, swapped for ours in place of it); `apply` (the replay) joins
    /// ours to theirs.
    #[test]
    fn cookies_merge() {
        let ours = Credential::cookie("sid", "ours").unwrap();
        let brought = |values: &[&'static str]| {
            let mut map = HeaderMap::new();
            for v in values {
                map.append("cookie", HeaderValue::from_static(v));
            }
            map
        };
        let values = |map: &HeaderMap| -> Vec<String> {
            map.get_all("cookie")
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect()
        };
        let mut map = brought(&["a=1", "b=2; c=3"]);
        assert!(ours.attach(&mut map, false).unwrap());
        assert_eq!(values(&map), ["a=1; b=2; c=3; sid=ours"]);
        assert!(map["cookie"].is_sensitive());

        let mut map = brought(&["a=1; sid=theirs", "b=2"]);
        assert!(!ours.attach(&mut map, false).unwrap());
        assert_eq!(values(&map), ["a=1; sid=theirs", "b=2"]);

        let mut map = brought(&["a=1; sid=theirs", "b=2"]);
        assert!(ours.attach(&mut map, true).unwrap());
        assert_eq!(values(&map), ["a=1; b=2; sid=ours"]);

        let mut map = brought(&["a=1"]);
        ours.attach(&mut map, true).unwrap();
        assert_eq!(values(&map), ["a=1; sid=ours"]);
        let mut map = brought(&[]);
        ours.attach(&mut map, true).unwrap();
        assert_eq!(values(&map), ["sid=ours"]);
    }

    /// Values that would break the header (or inject another) are typed errors naming
    /// the part, never echoing the value.
    #[test]
    fn bad_values_are_typed_errors_without_the_value() {
        let cases = [
            Credential::bearer(format!("{CANARY}\r\nX-Evil: 1")).unwrap_err(),
            Credential::bearer("").unwrap_err(),
            Credential::bearer(format!("{CANARY} space")).unwrap_err(),
            Credential::with_scheme("Bad Scheme", CANARY).unwrap_err(),
            Credential::cookie("sid", format!("{CANARY};other=1")).unwrap_err(),
            Credential::cookie("s=d", CANARY).unwrap_err(),
            Credential::cookie("sid", "").unwrap_err(),
            Credential::header("bad header", CANARY).unwrap_err(),
            Credential::header("x-api-key", format!("{CANARY}\u{e9}")).unwrap_err(),
        ];
        for e in cases {
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains(CANARY), "{shown}");
            assert!(shown.starts_with("invalid credential: "), "{shown}");
        }
        assert!(Credential::from_headers([]).is_err());
    }

    /// Equality compares headers only, so a re-stamped copy of a token is the same token.
    #[test]
    fn equality_ignores_expiry() {
        let a = Credential::bearer("t").unwrap();
        let b = a.clone().expires_in(Duration::from_secs(5));
        assert_eq!(a, b);
        assert_ne!(a, Credential::bearer("u").unwrap());
    }

    /// An unrepresentable lifetime means "never expires", not a panic.
    #[test]
    fn huge_lifetime_means_no_expiry() {
        let c = Credential::bearer("t").unwrap().expires_in(Duration::MAX);
        assert_eq!(c.expiry(), None);
    }
}
