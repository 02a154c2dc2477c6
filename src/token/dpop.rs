//! DPoP (RFC 9449): sender-constrained tokens. A [`DpopKey`] given to a
//! [`TokenSource`](super::TokenSource) with [`dpop`](super::TokenSource::dpop) signs a
//! proof for each token request; a token the server issues as `token_type: DPoP` is then
//! bound to the key: it goes out as `Authorization: DPoP <token>`, and every request that
//! carries it carries a fresh proof for that request (`htm`, `htu`, `iat`, a random
//! `jti`, `ath` the token's hash, and the server's latest nonce).
//!
//! What a proof needs that does not change is made once: the protected header (with the
//! public key as a JWK) when the key is made, the token's hash when the token arrives.
//! A request pays for the claims and one ES256 signature.
//!
//! Nonces (RFC 9449 §8, §9): a server that wants one answers `use_dpop_nonce` with a
//! `DPoP-Nonce` header (a token endpoint with a `400`, an API with a `401`); the request
//! is sent once more with it, and the latest nonce of each origin goes into every later
//! proof sent there. Any answer may bring a newer one.

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use http::{HeaderValue, Method};
use ring::{
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair},
};

use super::{
    TokenError, TokenErrorKind,
    assertion::{SigningKey, b64, random_id},
};
use crate::{
    Credential, InvalidCredential,
    bound::{Binding, Target},
};

/// At most this many servers' nonces are kept (one slot per role and origin: a server
/// cannot grow the map without bound); past it, the map starts over.
const MAX_ORIGINS: usize = 64;

/// A nonce longer than this is not kept (RFC 9449 leaves the length open; real ones are
/// tens of bytes).
const MAX_NONCE: usize = 512;

/// An EC P-256 key pair that proves possession of DPoP-bound tokens (ES256), generated
/// or read from PEM. Its clones share the key and the nonces servers gave.
///
/// The private key is a secret: `Debug` shows the public key's thumbprint only.
///
/// ```
/// use tower_client_auth::token::{DpopKey, TokenRequest, TokenSource};
///
/// let login = TokenRequest::oauth2_client_credentials(
///     "https://login.example.com/oauth2/token",
///     "my-client",
///     "my-secret",
/// )?;
/// let source = TokenSource::new(login).dpop(DpopKey::generate()?);
/// # let _ = source;
/// # Ok::<_, tower_client_auth::token::TokenError>(())
/// ```
#[derive(Clone)]
pub struct DpopKey {
    inner: Arc<Inner>,
}

struct Inner {
    key: SigningKey,
    /// The protected header, base64url: `typ`, `alg` and the public key.
    header: String,
    /// The RFC 7638 thumbprint of the public key (base64url of its SHA-256).
    thumbprint: String,
    /// The latest nonce of each server: keyed by its role (`as:` a token endpoint,
    /// `rs:` an API) and origin, as RFC 9449 §9 keeps the two apart even on one origin.
    /// Each slot's latest nonce, with when it was given ([`crate::bound::nonce_stamp`]).
    nonces: Mutex<HashMap<String, (String, u64)>>,
}

impl fmt::Debug for DpopKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DpopKey")
            .field("alg", &"ES256")
            .field("thumbprint", &self.inner.thumbprint)
            .finish_non_exhaustive()
    }
}

impl DpopKey {
    /// A new P-256 key pair, from the system's secure random source. It lives as long as
    /// the process: tokens bound to it are useless to any other.
    pub fn generate() -> Result<Self, TokenError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| {
                TokenError::new(TokenErrorKind::InvalidRequest)
                    .detail("could not generate a DPoP key")
            })?;
        Self::from_key(SigningKey::ec_from_pkcs8(pkcs8.as_ref())?)
    }

    /// A P-256 key from PEM (`PRIVATE KEY` or `EC PRIVATE KEY`), for a key that outlives
    /// the process (tokens bound to it survive a restart, or serve several processes).
    /// Anything but an EC P-256 private key is an `InvalidRequest` error that does not
    /// quote the input.
    pub fn from_pem(pem: &str) -> Result<Self, TokenError> {
        let key = SigningKey::from_pem(pem)?;
        if key.alg() != "ES256" {
            return Err(TokenError::new(TokenErrorKind::InvalidRequest)
                .detail("a DPoP key must be an EC P-256 key (ES256)"));
        }
        Self::from_key(key)
    }

    fn from_key(key: SigningKey) -> Result<Self, TokenError> {
        let point = key.public_key();
        // An uncompressed P-256 point: 0x04, then x and y, 32 bytes each.
        let (Some(x), Some(y)) = (point.get(1..33), point.get(33..65)) else {
            return Err(TokenError::new(TokenErrorKind::InvalidRequest)
                .detail("the DPoP key's public key is not a P-256 point"));
        };
        let (x, y) = (b64(x), b64(y));
        // RFC 7638: the required members, in lexicographic order, no whitespace.
        let jwk = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let thumbprint = b64(ring::digest::digest(&ring::digest::SHA256, jwk.as_bytes()).as_ref());
        let header = format!(r#"{{"typ":"dpop+jwt","alg":"ES256","jwk":{jwk}}}"#);
        Ok(DpopKey {
            inner: Arc::new(Inner {
                key,
                header: b64(header.as_bytes()),
                thumbprint,
                nonces: Mutex::default(),
            }),
        })
    }

    /// The JWK SHA-256 thumbprint of the public key (RFC 7638), base64url: what a server
    /// binds tokens to (`cnf.jkt`), and the `dpop_jkt` of an authorization request.
    pub fn thumbprint(&self) -> &str {
        &self.inner.thumbprint
    }

    /// The public key as a JWK (`kty`, `crv`, `x`, `y`).
    pub fn public_jwk(&self) -> String {
        let point = self.inner.key.public_key();
        format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            b64(&point[1..33]),
            b64(&point[33..65])
        )
    }

    /// A proof for one request of `htm` to `target`, with `ath` (the token's hash) on
    /// an API request, and the latest nonce of the target's origin.
    pub(crate) fn proof(
        &self,
        htm: &str,
        target: &Target,
        ath: Option<&str>,
    ) -> Result<String, TokenError> {
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut claims = serde_json::json!({
            "jti": random_id()?,
            "htm": htm,
            "htu": target.htu,
            "iat": iat,
        });
        if let Some(ath) = ath {
            claims["ath"] = ath.into();
        }
        // An API request carries the token's hash; a token request does not.
        if let Some(nonce) = self.nonce_for(&slot(&target.origin, ath.is_none())) {
            claims["nonce"] = nonce.into();
        }
        self.inner.key.sign_with_header(&self.inner.header, &claims)
    }

    fn nonce_for(&self, slot: &str) -> Option<String> {
        self.nonces().get(slot).map(|(nonce, _)| nonce.clone())
    }

    fn nonces(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, u64)>> {
        self.inner
            .nonces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps `nonce` as the latest of the token endpoint (or API) at `origin`, if it is
    /// one (RFC 9449 §8.1: visible ASCII but `"` and `\`; not over [`MAX_NONCE`]);
    /// returns whether it did.
    pub(crate) fn keep_nonce(&self, origin: &str, token_endpoint: bool, nonce: &[u8]) -> bool {
        self.keep_nonce_given(origin, token_endpoint, nonce, None)
            .is_some()
    }

    /// [`keep_nonce`](Self::keep_nonce) for a nonce given now (`None`: stamped under the
    /// lock, so it is the slot's newest whatever answers come at once), or carried from an
    /// answer given at `Some(stamp)` (a [`crate::bound::nonce_stamp`]): not over a nonce
    /// of the slot given later. The stamp it was kept with, if it was kept.
    fn keep_nonce_given(
        &self,
        origin: &str,
        token_endpoint: bool,
        nonce: &[u8],
        given: Option<u64>,
    ) -> Option<u64> {
        let valid = !nonce.is_empty()
            && nonce.len() <= MAX_NONCE
            && nonce
                .iter()
                .all(|b| matches!(b, 0x21 | 0x23..=0x5B | 0x5D..=0x7E));
        let Some(nonce) = valid.then(|| String::from_utf8_lossy(nonce).into_owned()) else {
            tracing::debug!("ignoring a DPoP-Nonce that is not a valid nonce");
            return None;
        };
        let slot = slot(origin, token_endpoint);
        let mut nonces = self.nonces();
        if nonces.len() >= MAX_ORIGINS && !nonces.contains_key(&slot) {
            nonces.clear();
        }
        let given = match given {
            Some(given) if nonces.get(&slot).is_some_and(|(_, kept)| *kept > given) => {
                return None;
            }
            Some(given) => given,
            None => crate::bound::nonce_stamp(),
        };
        nonces.insert(slot, (nonce, given));
        Some(given)
    }

    /// The credential for `token`, a DPoP token issued for this key:
    /// `Authorization: DPoP <token>`, bound to the key, so that each request carrying it
    /// carries a proof made for that request. For a [`CredentialSource`] of your own that
    /// obtains DPoP tokens; a [`TokenSource`](super::TokenSource) with
    /// [`dpop`](super::TokenSource::dpop) makes these itself.
    ///
    /// [`CredentialSource`]: crate::CredentialSource
    pub fn credential(&self, token: &str) -> Result<Credential, InvalidCredential> {
        let credential = Credential::with_scheme("DPoP", token)?;
        let ath = b64(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
        Ok(credential.bound(Arc::new(Bound {
            key: self.clone(),
            ath,
        })))
    }
}

/// The key of a server's nonce: its role and origin.
fn slot(origin: &str, token_endpoint: bool) -> String {
    let role = if token_endpoint { "as:" } else { "rs:" };
    format!("{role}{origin}")
}

/// A DPoP token's binding: its key and its hash (`ath`).
pub(crate) struct Bound {
    key: DpopKey,
    ath: String,
}

impl Binding for Bound {
    fn proof(&self, method: &Method, target: &Target) -> Result<HeaderValue, crate::Error> {
        let failed = || crate::Error::new(crate::ErrorKind::Proof);
        let proof = self
            .key
            .proof(method.as_str(), target, Some(&self.ath))
            .map_err(|_| failed().with_detail("signing the DPoP proof failed"))?;
        let mut value = HeaderValue::try_from(proof).map_err(|_| failed())?;
        value.set_sensitive(true);
        Ok(value)
    }

    fn nonce(&self, origin: &str, nonce: &HeaderValue) -> Option<u64> {
        self.key
            .keep_nonce_given(origin, false, nonce.as_bytes(), None)
    }

    fn nonce_given(&self, origin: &str, nonce: &HeaderValue, given: u64) -> bool {
        self.key
            .keep_nonce_given(origin, false, nonce.as_bytes(), Some(given))
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;

    const EC: &str = include_str!("../../tests/support/keys/ec-p256.pem");
    const RSA: &str = include_str!("../../tests/support/keys/rsa-2048.pem");

    fn decode(part: &str) -> serde_json::Value {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    /// A proof is a JWS the public key in its own header verifies, naming the request
    /// (method, `htu` without query), with a fresh `jti` each time, `ath` on an API
    /// request, and the latest valid nonce of the origin (and of no other).
    #[test]
    fn proofs_verify_and_name_the_request() {
        let key = DpopKey::generate().unwrap();
        let target = Target::of(&"https://api.example.com/v1/x?y=1".parse().unwrap()).unwrap();
        let credential = key.credential("token-1").unwrap();
        let bound = credential.binding().unwrap();
        let proof = bound.proof(&Method::PUT, &target).unwrap();
        assert!(proof.is_sensitive());
        let proof = proof.to_str().unwrap().to_owned();
        let parts: Vec<&str> = proof.split('.').collect();
        let (header, claims) = (decode(parts[0]), decode(parts[1]));
        assert_eq!(header["typ"], "dpop+jwt");
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["jwk"]["kty"], "EC");
        assert!(header["jwk"].get("d").is_none(), "no private part");
        assert_eq!(claims["htm"], "PUT");
        assert_eq!(claims["htu"], "https://api.example.com/v1/x");
        let ath = b64(ring::digest::digest(&ring::digest::SHA256, b"token-1").as_ref());
        assert_eq!(claims["ath"], ath.as_str());
        assert!(claims.get("nonce").is_none());
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header["jwk"]["x"].as_str().unwrap())
            .unwrap();
        let y = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header["jwk"]["y"].as_str().unwrap())
            .unwrap();
        let point = [&[4u8][..], &x, &y].concat();
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[2])
            .unwrap();
        let signed = &proof[..proof.rfind('.').unwrap()];
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
            .verify(signed.as_bytes(), &sig)
            .unwrap();

        let kept = bound.nonce(&target.origin, &HeaderValue::from_static("n-1"));
        let other = bound.nonce(
            "https://other.example",
            &HeaderValue::from_static("n-other"),
        );
        // Each kept with a stamp of its own, in the order given.
        assert!(
            kept.is_some() && other.is_some() && kept < other,
            "{kept:?} {other:?}"
        );
        // Not a nonce: ignored, the last valid one stays.
        assert!(
            bound
                .nonce(&target.origin, &HeaderValue::from_static("bad\"nonce"))
                .is_none()
        );
        // A token endpoint on the same origin has its own.
        assert!(key.keep_nonce(&target.origin, true, b"as-1"));
        let again = bound.proof(&Method::GET, &target).unwrap();
        let again = decode(again.to_str().unwrap().split('.').nth(1).unwrap());
        assert_eq!(again["nonce"], "n-1");
        assert_ne!(again["jti"], claims["jti"]);
        let token_request = key.proof("POST", &target, None).unwrap();
        let token_request = decode(token_request.split('.').nth(1).unwrap());
        assert_eq!(token_request["nonce"], "as-1");
        assert!(token_request.get("ath").is_none());
    }

    /// The thumbprint is RFC 7638's, over the canonical JWK: the expected value was
    /// computed apart from this crate (OpenSSL's public point, Python's SHA-256 over the
    /// sorted, compact JWK).
    #[test]
    fn thumbprint_is_rfc_7638() {
        let key = DpopKey::from_pem(EC).unwrap();
        assert_eq!(
            key.thumbprint(),
            "HRf4W_OvIUtoB0bBYDKpvGL7Kg0XIEnSmDiO4lX-zsI"
        );
        assert!(
            key.public_jwk()
                .starts_with(r#"{"crv":"P-256","kty":"EC","x":""#)
        );
        assert_eq!(
            format!("{key:?}"),
            "DpopKey { alg: \"ES256\", thumbprint: \"HRf4W_OvIUtoB0bBYDKpvGL7Kg0XIEnSmDiO4lX-zsI\", .. }"
        );
    }

    /// Only an EC P-256 key can be a DPoP key; the error quotes nothing of the input.
    #[test]
    fn only_p256_keys() {
        let err = DpopKey::from_pem(RSA).unwrap_err();
        assert_eq!(err.kind(), TokenErrorKind::InvalidRequest);
        assert!(!format!("{err} {err:?}").contains("MII"));
        assert!(DpopKey::from_pem("not pem").is_err());
    }

    /// A server cannot grow the nonce map without bound.
    #[test]
    fn nonces_are_bounded() {
        let key = DpopKey::generate().unwrap();
        for i in 0..(MAX_ORIGINS * 3) {
            key.keep_nonce(&format!("https://h{i}.example"), false, b"n");
        }
        assert!(key.nonces().len() <= MAX_ORIGINS);
        assert!(!key.keep_nonce("https://a.example", false, &[b'n'; MAX_NONCE + 1]));
        assert_eq!(key.nonce_for(&slot("https://a.example", false)), None);
    }

    /// A valid nonce an answer gives is always kept, however many answers come at once
    /// (`keep_nonce` refusing one reads as "no valid nonce": a `use_dpop_nonce` answer
    /// would go back unreplayed, `NotReplayed::NoNonce`).
    #[test]
    fn concurrent_answers_never_refuse_a_valid_nonce() {
        let key = DpopKey::generate().unwrap();
        let refused = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for t in 0..4 {
                let (key, refused) = (&key, &refused);
                s.spawn(move || {
                    for i in 0..50_000 {
                        let nonce = format!("n-{t}-{i}");
                        if !key.keep_nonce("https://api.example", false, nonce.as_bytes()) {
                            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(refused.into_inner(), 0, "valid nonces refused");
    }
}
