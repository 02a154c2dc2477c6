//! Credentials bound to a key (RFC 9449, DPoP): every request that carries one carries a
//! fresh proof of possession too, signed for that request's method and URI.
//!
//! The request path knows only the [`Binding`] trait: a credential without one (every
//! credential but a DPoP token) costs one `Option` check per request. The key, the
//! signature and the nonces are the token module's (`token::DpopKey`, feature `jwt`).
//!
//! A server asks for a nonce in its proofs with `DPoP-Nonce` (RFC 9449 §8, §9), on a
//! `use_dpop_nonce` rejection or on any answer: each answer to a request with a proof is
//! read for it ([`Sent::saw`]), and the latest nonce of each origin goes into the next
//! proof sent there.

use std::{fmt, sync::Arc};

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};

use crate::{
    credential::Credential,
    error::{Error, ErrorKind},
};

/// The request header that carries a proof.
pub(crate) const DPOP: HeaderName = HeaderName::from_static("dpop");

/// The response header that carries a server's nonce.
pub(crate) const DPOP_NONCE: HeaderName = HeaderName::from_static("dpop-nonce");

/// What a credential bound to a key can do: prove possession for one request, and keep
/// the nonce a server gave.
pub(crate) trait Binding: Send + Sync + 'static {
    /// The proof for one request of `method` to `target`.
    fn proof(&self, method: &Method, target: &Target) -> Result<HeaderValue, Error>;

    /// The API at `origin` wants `nonce` in the proofs sent to it from now on; returns
    /// the [`nonce_stamp`] it was kept with, if it was kept (a valid nonce).
    fn nonce(&self, origin: &str, nonce: &HeaderValue) -> Option<u64>;

    /// As [`nonce`](Self::nonce), for a nonce given at `given` (a [`nonce_stamp`]): a
    /// nonce an earlier answer gave, carried over to this key, never overwrites one this
    /// key was given later.
    fn nonce_given(&self, origin: &str, nonce: &HeaderValue, given: u64) -> bool;
}

/// Orders the nonces servers give across keys: a nonce carried from one key to another
/// (a replay with another credential) goes over an older one, never a newer one.
static NONCE_ORDER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The next stamp of [`NONCE_ORDER`]: when a nonce was given.
pub(crate) fn nonce_stamp() -> u64 {
    NONCE_ORDER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl fmt::Debug for dyn Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Binding")
    }
}

/// Where a request goes, as a proof names it: the origin (`scheme://host[:port]`, the
/// key of a server's nonce) and `htu`, the URI without query and fragment (RFC 9449
/// §4.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) origin: String,
    pub(crate) htu: String,
}

impl Target {
    /// `None` for a URI without a scheme or a host (a proof must name both).
    pub(crate) fn of(uri: &Uri) -> Option<Target> {
        let scheme = uri.scheme_str()?.to_ascii_lowercase();
        let authority = uri.authority()?;
        let host = authority.host().to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "https" | "wss" => Some(443),
            "http" | "ws" => Some(80),
            _ => None,
        };
        // Userinfo is never part of it; a default port is left out (RFC 3986 §6.2.3).
        let origin = match authority.port_u16() {
            Some(port) if Some(port) != default_port => format!("{scheme}://{host}:{port}"),
            _ => format!("{scheme}://{host}"),
        };
        let path = match uri.path() {
            "" => "/",
            path => path,
        };
        Some(Target {
            htu: format!("{origin}{path}"),
            origin,
        })
    }
}

/// The mark of a request that carries a proof this crate made: a redirect policy below
/// the layer follows no redirect of it (a proof is good for one request). The policy
/// also takes a `DPoP` header beside an `Authorization: DPoP` token for a proof (a
/// request rebuilt below the layer loses this mark), but not a `DPoP` header beside any
/// other credential.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Proved;

/// Adds the proof for `request` to it, when `credential` is bound to a key (called once
/// the credential's own headers are attached), and marks it [`Proved`]. Out of line: the
/// hot path only checks whether there is a binding.
#[cold]
#[inline(never)]
pub(crate) fn prove<B>(binding: &dyn Binding, request: &mut Request<B>) -> Result<(), Error> {
    let target = Target::of(request.uri()).ok_or_else(|| {
        Error::new(ErrorKind::Proof)
            .with_detail("a DPoP proof names the request's scheme and host, and the uri has none")
    })?;
    let proof = binding.proof(request.method(), &target)?;
    request
        .headers_mut()
        .try_insert(DPOP, proof)
        .map_err(crate::policy::headers_full)?;
    request.extensions_mut().insert(Proved);
    Ok(())
}

/// What a request sent with a proof keeps for its answer: the bound credential it
/// carried and the origin it went to. Boxed, and only for such a request.
#[derive(Debug)]
pub(crate) struct Sent {
    pub(crate) credential: Credential,
    origin: String,
}

impl Sent {
    /// For a request to `uri` that carried `credential`, if that is bound to a key.
    #[inline]
    pub(crate) fn of(credential: &Credential, uri: &Uri) -> Option<Box<Sent>> {
        credential.binding()?;
        Self::of_bound(credential, uri)
    }

    #[cold]
    #[inline(never)]
    fn of_bound(credential: &Credential, uri: &Uri) -> Option<Box<Sent>> {
        Some(Box::new(Sent {
            credential: credential.clone(),
            origin: Target::of(uri)?.origin,
        }))
    }

    /// Keeps the nonce an answer to this request carries, if it carries one; returns
    /// the [`nonce_stamp`] it kept it with, if it kept one: when the answer gave it, in
    /// the order of every nonce given (a resend carrying it elsewhere carries that
    /// stamp, so that it never goes over a nonce given after it).
    #[inline(never)]
    pub(crate) fn saw(&self, headers: &HeaderMap) -> Option<u64> {
        let nonce = headers.get(DPOP_NONCE)?;
        self.credential.binding()?.nonce(&self.origin, nonce)
    }

    /// Keeps `nonce`, which the server gave an earlier attempt of this request (proved
    /// by this key or another) at `given` (a [`nonce_stamp`]), unless this key holds a
    /// nonce of the origin given later (another answer's, meanwhile).
    pub(crate) fn carry_nonce(&self, nonce: &HeaderValue, given: u64) -> bool {
        self.credential
            .binding()
            .is_some_and(|binding| binding.nonce_given(&self.origin, nonce, given))
    }
}

/// The `DPoP-Nonce` an answer gives, if any.
pub(crate) fn nonce_of(headers: &HeaderMap) -> Option<HeaderValue> {
    headers.get(DPOP_NONCE).cloned()
}

/// A binding, shared by every copy of its credential.
pub(crate) type SharedBinding = Arc<dyn Binding>;

#[cfg(test)]
mod tests {
    use super::*;

    /// The origin and `htu` a proof names: lower-cased scheme and host, no userinfo, no
    /// default port, no query or fragment; a URI without scheme or host has none.
    #[test]
    fn targets() {
        for (uri, origin, htu) in [
            (
                "https://API.example.com/v1/orders?page=2",
                "https://api.example.com",
                "https://api.example.com/v1/orders",
            ),
            (
                "HTTPS://user:pw@api.example.com:443/x",
                "https://api.example.com",
                "https://api.example.com/x",
            ),
            (
                "http://127.0.0.1:8080",
                "http://127.0.0.1:8080",
                "http://127.0.0.1:8080/",
            ),
            (
                "http://[::1]:80/a/b#frag",
                "http://[::1]",
                "http://[::1]/a/b",
            ),
        ] {
            let target = Target::of(&uri.parse().unwrap()).unwrap();
            assert_eq!(target.origin, origin, "{uri}");
            assert_eq!(target.htu, htu, "{uri}");
        }
        assert_eq!(Target::of(&"/relative".parse().unwrap()), None);
    }
}
