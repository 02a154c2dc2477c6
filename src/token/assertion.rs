//! `private_key_jwt` and `client_secret_jwt` client authentication (RFC 7523 §2.2, RFC
//! 7521 §4.2, OpenID Connect Core §9): the client proves who it is with a JWT it signs
//! with its private key (or, for `client_secret_jwt`, with its secret, which then never
//! leaves the process). Signed with `ring` (the crypto provider rustls already brings),
//! never with cryptography of this crate's own.
//!
//! Each token request carries a fresh assertion: `iss` and `sub` the client id, `aud` the
//! token endpoint's URL (or what [`TokenRequest::assertion_audience`] says), a random
//! 128-bit `jti`, `iat` now and `exp` a minute later, signed RS256 (an RSA key), ES256
//! (a P-256 key) with the `kid` given, or HS256 (the client secret).
//!
//! [`TokenRequest::assertion_audience`]: super::TokenRequest::assertion_audience

use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use ring::{
    hmac,
    rand::{SecureRandom, SystemRandom},
    signature::{self, EcdsaKeyPair, RsaKeyPair},
};
use rustls_pki_types::{PrivateKeyDer, pem::PemObject};

use super::{TokenError, TokenErrorKind};
use crate::Secret;

/// The fewest bytes of a client secret that signs HS256 assertions: RFC 7518 §3.2 wants
/// a key at least as long as the hash (256 bits), and servers on Nimbus JOSE or jose4j
/// refuse to verify with a shorter one.
pub(crate) const SHORTEST_SHARED_SECRET: usize = 32;

/// What signs a client's assertions: its private key (`private_key_jwt`), or its secret
/// (`client_secret_jwt`, HS256).
#[derive(Clone)]
pub(crate) enum AssertionKey {
    Private(SigningKey),
    Shared { secret: Secret, key: hmac::Key },
}

impl AssertionKey {
    /// The client secret as an HS256 key, refused (a typed error that quotes nothing of
    /// it) when shorter than [`SHORTEST_SHARED_SECRET`] bytes.
    pub(crate) fn shared(secret: Secret) -> Result<Self, TokenError> {
        if secret.expose().len() < SHORTEST_SHARED_SECRET {
            return Err(bad_key(
                "the client secret is too short to sign HS256 assertions: RFC 7518 §3.2 \
                 wants at least 32 bytes, and servers refuse a shorter key",
            ));
        }
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes());
        Ok(AssertionKey::Shared { secret, key })
    }

    /// The client secret, when it is what signs: to scrub from what servers send back.
    pub(crate) fn secret(&self) -> Option<&Secret> {
        match self {
            AssertionKey::Private(_) => None,
            AssertionKey::Shared { secret, .. } => Some(secret),
        }
    }

    fn sign(&self, claims: &serde_json::Value) -> Result<String, TokenError> {
        match self {
            AssertionKey::Private(key) => key.sign(claims),
            AssertionKey::Shared { key, .. } => {
                let header = b64(br#"{"alg":"HS256","typ":"JWT"}"#);
                let input = format!("{header}.{}", b64(claims.to_string().as_bytes()));
                let tag = hmac::sign(key, input.as_bytes());
                Ok(format!("{input}.{}", b64(tag.as_ref())))
            }
        }
    }
}

impl fmt::Debug for AssertionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AssertionKey::Private(key) => key.fmt(f),
            AssertionKey::Shared { .. } => f.write_str("client_secret_jwt (HS256)"),
        }
    }
}

/// How long an assertion is valid: short, as servers want (many refuse over 5 minutes).
pub(crate) const ASSERTION_LIFETIME: Duration = Duration::from_secs(60);

/// `client_assertion_type` for a JWT (RFC 7523 §2.2).
pub(crate) const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A private key that signs client assertions: RSA (RS256) or EC P-256 (ES256), from
/// PEM. It is a secret: its `Debug` shows the algorithm and `kid` only, and it is never
/// part of an error or log line.
///
/// ```
/// # let pem = include_str!("../../tests/support/keys/ec-p256.pem");
/// use tower_client_auth::token::{SigningKey, TokenRequest, TokenSource};
///
/// let key = SigningKey::from_pem(pem)?.kid("key-2026-12");
/// let login = TokenRequest::oauth2_client_credentials_jwt(
///     "https://login.example.com/oauth2/token",
///     "my-client",
///     key,
/// )?;
/// let source = TokenSource::new(login);
/// # let _ = source;
/// # Ok::<_, tower_client_auth::token::TokenError>(())
/// ```
#[derive(Clone)]
pub struct SigningKey {
    key: Arc<Key>,
    kid: Option<String>,
    /// The thumbprints of the key's certificate, when one was given: `x5t` (SHA-1) and
    /// `x5t#S256` (SHA-256), base64url (RFC 7515 §4.1.7, §4.1.8).
    thumbprints: Option<Arc<(String, String)>>,
}

enum Key {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.alg())
            .field("kid", &self.kid)
            .field("x5t_s256", &self.thumbprints.as_ref().map(|t| t.1.as_str()))
            .finish_non_exhaustive()
    }
}

fn bad_key(detail: &'static str) -> TokenError {
    TokenError::new(TokenErrorKind::InvalidRequest).detail(detail)
}

impl SigningKey {
    /// A key from PEM: `PRIVATE KEY` (PKCS#8, RSA or EC P-256), `RSA PRIVATE KEY`
    /// (PKCS#1) or `EC PRIVATE KEY` (SEC1, P-256, with its public key, as OpenSSL writes
    /// it). Anything else (a certificate, an encrypted key, another curve, an RSA key
    /// under 2048 bits) is an `InvalidRequest` error that does not quote the input.
    pub fn from_pem(pem: &str) -> Result<Self, TokenError> {
        let der = PrivateKeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|_| bad_key("no unencrypted private key in the PEM"))?;
        let rng = SystemRandom::new();
        let key = match der {
            PrivateKeyDer::Pkcs8(der) => {
                let der = der.secret_pkcs8_der();
                match RsaKeyPair::from_pkcs8(der) {
                    Ok(rsa) => Key::Rsa(rsa),
                    Err(_) => EcdsaKeyPair::from_pkcs8(
                        &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                        der,
                        &rng,
                    )
                    .map(Key::Ec)
                    .map_err(|_| {
                        bad_key("the key is neither RSA (2048 bits or more) nor EC P-256")
                    })?,
                }
            }
            PrivateKeyDer::Pkcs1(der) => RsaKeyPair::from_der(der.secret_pkcs1_der())
                .map(Key::Rsa)
                .map_err(|_| bad_key("the RSA key is unusable (2048 bits or more)"))?,
            PrivateKeyDer::Sec1(der) => {
                let pkcs8 = sec1_p256_to_pkcs8(der.secret_sec1_der())
                    .ok_or_else(|| bad_key("the EC key is not a P-256 key with its public key"))?;
                EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
                    .map(Key::Ec)
                    .map_err(|_| bad_key("the EC key is not a usable P-256 key"))?
            }
            _ => return Err(bad_key("unsupported private key format")),
        };
        Ok(SigningKey {
            key: Arc::new(key),
            kid: None,
            thumbprints: None,
        })
    }

    /// The key's certificate (PEM, the first `CERTIFICATE` in it), named in every
    /// assertion's header by its thumbprints, `x5t#S256` (SHA-256) and `x5t` (SHA-1):
    /// how servers that register a certificate rather than a key find it. Microsoft
    /// Entra ID wants `x5t#S256` (or `x5t`; ADFS `x5t`) and refuses an assertion without
    /// it (`AADSTS700027`, "The key was not found"); a `kid` does not stand in. A
    /// certificate that is not this key's (its public key is another), or PEM without
    /// a certificate, is an `InvalidRequest` error that does not quote the input.
    pub fn certificate_pem(mut self, pem: &str) -> Result<Self, TokenError> {
        use rustls_pki_types::CertificateDer;
        let cert = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|_| bad_key("no certificate in the PEM"))?;
        if certificate_public_key(&cert) != Some(self.public_key().as_slice()) {
            return Err(bad_key(
                "the certificate is not this key's (its public key is another, or it cannot be read)",
            ));
        }
        let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &cert);
        let sha256 = ring::digest::digest(&ring::digest::SHA256, &cert);
        self.thumbprints = Some(Arc::new((b64(sha1.as_ref()), b64(sha256.as_ref()))));
        Ok(self)
    }

    /// The `kid` header: which of the client's registered keys signed (most servers
    /// want it when a client has several).
    pub fn kid(mut self, kid: impl Into<String>) -> Self {
        self.kid = Some(kid.into());
        self
    }

    /// `RS256` or `ES256`.
    pub fn alg(&self) -> &'static str {
        match *self.key {
            Key::Rsa(_) => "RS256",
            Key::Ec(_) => "ES256",
        }
    }

    /// The public key, as the server verifies with it: for RSA, the DER `RSAPublicKey`;
    /// for EC, the uncompressed point. For registering the key, and for tests.
    pub fn public_key(&self) -> Vec<u8> {
        use signature::KeyPair as _;
        match &*self.key {
            Key::Rsa(k) => k.public_key().as_ref().to_vec(),
            Key::Ec(k) => k.public_key().as_ref().to_vec(),
        }
    }

    /// An EC P-256 key from PKCS#8 DER (a generated DPoP key).
    pub(crate) fn ec_from_pkcs8(der: &[u8]) -> Result<Self, TokenError> {
        let key = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            der,
            &SystemRandom::new(),
        )
        .map_err(|_| bad_key("the EC key is not a usable P-256 key"))?;
        Ok(SigningKey {
            key: Arc::new(Key::Ec(key)),
            kid: None,
            thumbprints: None,
        })
    }

    /// A compact JWS of `claims` (a JSON object), signed with this key.
    pub(crate) fn sign(&self, claims: &serde_json::Value) -> Result<String, TokenError> {
        let mut header = serde_json::json!({"alg": self.alg(), "typ": "JWT"});
        if let Some(kid) = &self.kid {
            header["kid"] = serde_json::Value::from(kid.as_str());
        }
        if let Some(thumbprints) = &self.thumbprints {
            header["x5t"] = serde_json::Value::from(thumbprints.0.as_str());
            header["x5t#S256"] = serde_json::Value::from(thumbprints.1.as_str());
        }
        self.sign_with_header(&b64(header.to_string().as_bytes()), claims)
    }

    /// A compact JWS of `claims` under a header already encoded (base64url).
    pub(crate) fn sign_with_header(
        &self,
        header: &str,
        claims: &serde_json::Value,
    ) -> Result<String, TokenError> {
        let input = format!("{header}.{}", b64(claims.to_string().as_bytes()));
        let rng = SystemRandom::new();
        let failed = |_| bad_key("signing the assertion failed");
        let sig = match &*self.key {
            Key::Rsa(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(
                    &signature::RSA_PKCS1_SHA256,
                    &rng,
                    input.as_bytes(),
                    &mut sig,
                )
                .map_err(failed)?;
                sig
            }
            Key::Ec(k) => k
                .sign(&rng, input.as_bytes())
                .map_err(failed)?
                .as_ref()
                .to_vec(),
        };
        Ok(format!("{input}.{}", b64(&sig)))
    }
}

/// base64url without padding, as JOSE writes it.
pub(crate) fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// 128 random bits, for a `jti`.
pub(crate) fn random_id() -> Result<String, TokenError> {
    let mut jti = [0u8; 16];
    SystemRandom::new()
        .fill(&mut jti)
        .map_err(|_| bad_key("no randomness for a jti"))?;
    Ok(b64(&jti))
}

/// A client assertion for one token request to `audience`, by `client_id`.
pub(crate) fn client_assertion(
    key: &AssertionKey,
    client_id: &str,
    audience: &str,
) -> Result<String, TokenError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let jti = random_id()?;
    key.sign(&serde_json::json!({
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "jti": jti,
        "iat": now,
        "exp": now + ASSERTION_LIFETIME.as_secs(),
    }))
}

/// SEC1 `ECPrivateKey` (P-256) wrapped as PKCS#8 `PrivateKeyInfo`, which `ring` reads.
/// `None` unless the key names P-256 (or no curve) and carries its public key, as
/// OpenSSL writes it.
fn sec1_p256_to_pkcs8(sec1: &[u8]) -> Option<Vec<u8>> {
    // OID 1.2.840.10045.3.1.7 (prime256v1), as DER.
    const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    // AlgorithmIdentifier { id-ecPublicKey, prime256v1 }.
    const ALGORITHM: &[u8] = &[
        0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86,
        0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ];
    // ring wants the inner key without the curve parameters: PKCS#8 names the curve.
    let (tag, body, rest) = der_item(sec1)?;
    if tag != 0x30 || !rest.is_empty() {
        return None;
    }
    let (version, v, mut rest) = der_item(body)?;
    let (octets, private, r) = der_item(rest)?;
    if version != 0x02 || v != [1] || octets != 0x04 || private.len() != 32 {
        return None;
    }
    rest = r;
    let mut public = None;
    while !rest.is_empty() {
        let (tag, inner, r) = der_item(rest)?;
        match tag {
            0xa0 if inner != P256 => return None,
            0xa0 => {}
            0xa1 => public = Some(inner),
            _ => return None,
        }
        rest = r;
    }
    let public = public?;
    let mut inner = Vec::new();
    der_push(&mut inner, 0x02, &[1]);
    der_push(&mut inner, 0x04, private);
    der_push(&mut inner, 0xa1, public);
    let mut ec = Vec::new();
    der_push(&mut ec, 0x30, &inner);
    let mut info = Vec::new();
    der_push(&mut info, 0x02, &[0]);
    info.extend_from_slice(ALGORITHM);
    der_push(&mut info, 0x04, &ec);
    let mut out = Vec::new();
    der_push(&mut out, 0x30, &info);
    Some(out)
}

/// One DER item: tag, contents, what follows. Definite lengths up to 2 bytes.
/// The public key in an X.509 certificate (DER): the `subjectPublicKey` bits of its
/// `SubjectPublicKeyInfo`, which for RSA is the DER `RSAPublicKey` and for EC the
/// uncompressed point, as [`SigningKey::public_key`] gives them. `None` when the DER is
/// not a certificate this reads.
fn certificate_public_key(cert: &[u8]) -> Option<&[u8]> {
    // The whole input is the certificate: bytes after it would be hashed into the
    // thumbprints, which would then name no certificate.
    let (0x30, cert, []) = der_item(cert)? else {
        return None;
    };
    let (0x30, tbs, _) = der_item(cert)? else {
        return None;
    };
    // [0] version (optional), serial number, signature, issuer, validity, subject.
    let (tag, _, mut rest) = der_item(tbs)?;
    let before_key = if tag == 0xa0 { 5 } else { 4 };
    for _ in 0..before_key {
        rest = der_item(rest)?.2;
    }
    let (0x30, spki, _) = der_item(rest)? else {
        return None;
    };
    let (_, _, bits) = der_item(spki)?;
    let (0x03, bits, _) = der_item(bits)? else {
        return None;
    };
    match bits.split_first()? {
        (0, key) => Some(key),
        _ => None,
    }
}

fn der_item(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        0..=0x7f => (usize::from(first), rest),
        0x81 => {
            let (&l, rest) = rest.split_first()?;
            (usize::from(l), rest)
        }
        0x82 => {
            let l = rest.get(..2)?;
            (usize::from(l[0]) << 8 | usize::from(l[1]), rest.get(2..)?)
        }
        _ => return None,
    };
    let body = rest.get(..len)?;
    Some((tag, body, rest.get(len..)?))
}

fn der_push(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    match body.len() {
        len @ 0..=0x7f => out.push(len as u8),
        len @ 0x80..=0xff => out.extend_from_slice(&[0x81, len as u8]),
        len => out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]),
    }
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    const EC_PKCS8: &str = include_str!("../../tests/support/keys/ec-p256.pem");
    const EC_SEC1: &str = include_str!("../../tests/support/keys/ec-p256-sec1.pem");
    const RSA_PKCS8: &str = include_str!("../../tests/support/keys/rsa-2048.pem");
    const RSA_PKCS1: &str = include_str!("../../tests/support/keys/rsa-2048-pkcs1.pem");

    fn verify(key: &SigningKey, jws: &str) -> bool {
        let (input, sig) = jws.rsplit_once('.').unwrap();
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sig)
            .unwrap();
        let alg: &dyn signature::VerificationAlgorithm = match key.alg() {
            "RS256" => &signature::RSA_PKCS1_2048_8192_SHA256,
            _ => &signature::ECDSA_P256_SHA256_FIXED,
        };
        signature::UnparsedPublicKey::new(alg, key.public_key())
            .verify(input.as_bytes(), &sig)
            .is_ok()
    }

    /// Every supported PEM form signs what its public key verifies, with its algorithm;
    /// the SEC1 and PKCS#8 forms of one EC key are the same key.
    #[test]
    fn every_pem_form_signs() {
        for (pem, alg) in [
            (EC_PKCS8, "ES256"),
            (EC_SEC1, "ES256"),
            (RSA_PKCS8, "RS256"),
            (RSA_PKCS1, "RS256"),
        ] {
            let key = SigningKey::from_pem(pem).unwrap().kid("k1");
            assert_eq!(key.alg(), alg);
            let signer = AssertionKey::Private(key.clone());
            let jws = client_assertion(&signer, "client", "https://as.example/token").unwrap();
            assert!(verify(&key, &jws), "{alg}");
            let header = jws.split('.').next().unwrap();
            let header: serde_json::Value = serde_json::from_slice(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(header)
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(header["alg"], alg);
            assert_eq!(header["kid"], "k1");
        }
        assert_eq!(
            SigningKey::from_pem(EC_PKCS8).unwrap().public_key(),
            SigningKey::from_pem(EC_SEC1).unwrap().public_key()
        );
    }

    /// A client secret signs HS256: the header says so (no `kid`), the tag is the
    /// secret's HMAC-SHA256 of the signing input, and `Debug` names the method only.
    #[test]
    fn a_client_secret_signs_hs256() {
        let secret = "a-client-secret-of-32-bytes-0123";
        let signer = AssertionKey::shared(Secret::from(secret)).unwrap();
        let jws = client_assertion(&signer, "client", "https://as.example/token").unwrap();
        let (input, tag) = jws.rsplit_once('.').unwrap();
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
        let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(tag)
            .unwrap();
        assert!(hmac::verify(&key, input.as_bytes(), &tag).is_ok());
        let header = input.split('.').next().unwrap();
        assert_eq!(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(header)
                .unwrap(),
            br#"{"alg":"HS256","typ":"JWT"}"#
        );
        assert_eq!(format!("{signer:?}"), "client_secret_jwt (HS256)");
        assert_eq!(signer.secret().map(Secret::expose), Some(secret));
        let short = AssertionKey::shared(Secret::from(&secret[1..])).unwrap_err();
        assert_eq!(short.kind(), TokenErrorKind::InvalidRequest);
    }

    /// What is not a usable private key is a typed error that does not quote the input,
    /// never a panic; `Debug` shows no key material.
    #[test]
    fn bad_keys_are_typed_errors() {
        let cert_like = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let truncated = &EC_SEC1[..EC_SEC1.len() / 2];
        for bad in ["", "not pem", cert_like, truncated] {
            let err = SigningKey::from_pem(bad).unwrap_err();
            assert_eq!(err.kind(), TokenErrorKind::InvalidRequest);
            assert!(!format!("{err} {err:?}").contains("MII"), "{err}");
        }
        let key = SigningKey::from_pem(EC_PKCS8).unwrap();
        let shown = format!("{key:?}");
        assert_eq!(
            shown,
            "SigningKey { alg: \"ES256\", kid: None, x5t_s256: None, .. }"
        );
    }

    /// SEC1 input the converter must refuse: another curve, no public key, garbage.
    #[test]
    fn sec1_conversion_refuses_what_it_cannot_convert() {
        assert!(sec1_p256_to_pkcs8(&[]).is_none());
        assert!(sec1_p256_to_pkcs8(&[0x30, 0x82, 0xff]).is_none());
        assert!(sec1_p256_to_pkcs8(&[0x30, 0x03, 0x02, 0x01, 0x01]).is_none());
    }
}
