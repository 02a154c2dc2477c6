//! `private_key_jwt` client authentication (RFC 7523) end to end, against a loopback
//! token endpoint that verifies every assertion as a certified server does
//! (`support::providers::JwtClientIdp`: signature, `alg`, `kid`, `iss`/`sub`, `aud`,
//! `exp`, `iat`, `jti` never reused).
#![cfg(all(feature = "https", feature = "jwt"))]

use crate::support;

use std::sync::atomic::Ordering::SeqCst;

use support::{providers::JwtClientIdp, token_client};
use tower_client_auth::{
    CredentialCache, CredentialSource, FetchContext, FetchReason,
    token::{SigningKey, TokenError, TokenErrorKind, TokenRequest, TokenSource},
};

const EC: &str = include_str!("support/keys/ec-p256.pem");
const EC_SEC1: &str = include_str!("support/keys/ec-p256-sec1.pem");
const RSA: &str = include_str!("support/keys/rsa-2048.pem");
const RSA_PKCS1: &str = include_str!("support/keys/rsa-2048-pkcs1.pem");
const P384: &str = include_str!("support/keys/ec-p384.pem");

fn source(url: &str, key: SigningKey) -> TokenSource {
    TokenSource::new(TokenRequest::oauth2_client_credentials_jwt(url, "jwt-client", key).unwrap())
        .client(token_client())
}

/// One token request (an invalidation, so the source never hands back its last one).
async fn fetch(source: &TokenSource) -> Result<(), TokenError> {
    match source
        .fetch(FetchContext::new(FetchReason::Invalidated, None))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => Err(*e.downcast::<TokenError>().expect("a token error")),
    }
}

/// World: the client registered an EC P-256 key and an RSA key (each in both PEM forms
/// OpenSSL writes). Proves: every token request carries a fresh assertion the server
/// verifies (5 requests, 5 distinct `jti`s), for ES256 and RS256, with the `kid`.
#[tokio::test]
async fn each_token_request_carries_a_fresh_verified_assertion() {
    for (pem, alg) in [
        (EC, "ES256"),
        (EC_SEC1, "ES256"),
        (RSA, "RS256"),
        (RSA_PKCS1, "RS256"),
    ] {
        let key = SigningKey::from_pem(pem).unwrap().kid("k-2026");
        let idp = JwtClientIdp::new("jwt-client", alg, key.public_key(), Some("k-2026"));
        let url = idp.start().await;
        let source = source(&url, key);
        for _ in 0..5 {
            fetch(&source).await.unwrap();
        }
        assert_eq!(
            idp.accepted.load(SeqCst),
            5,
            "{alg}: {:?}",
            idp.refusals.lock().unwrap()
        );
        assert_eq!(idp.seen_jti.lock().unwrap().len(), 5);
    }
}

/// World: the same through a cache and the layer's own path: the credential the
/// assertion bought is served.
#[tokio::test]
async fn a_cache_over_a_jwt_source_serves_its_token() {
    let key = SigningKey::from_pem(EC).unwrap();
    let idp = JwtClientIdp::new("jwt-client", "ES256", key.public_key(), None);
    let url = idp.start().await;
    let cache = CredentialCache::new(source(&url, key));
    let credential = cache.credential().await.unwrap();
    let (name, value) = credential.headers().next().unwrap();
    assert_eq!(
        (name.as_str(), value.to_str().unwrap()),
        ("authorization", "Bearer jwt-token-1")
    );
}

/// World: servers that check what a careless client gets wrong. Proves each is a typed
/// `invalid_client` rejection: a key the server does not know, the wrong `kid`, the
/// wrong audience; and that the server's text never carries the assertion.
#[tokio::test]
async fn what_the_server_refuses_is_a_typed_error() {
    let key = SigningKey::from_pem(EC).unwrap().kid("k1");
    let other = SigningKey::from_pem(RSA).unwrap();
    // Registered: the RSA key. Signed: with the EC key.
    let idp = JwtClientIdp::new("jwt-client", "RS256", other.public_key(), None);
    let url = idp.start().await;
    let err = fetch(&source(&url, key.clone())).await.unwrap_err();
    assert_eq!(err.kind(), TokenErrorKind::Rejected);
    assert_eq!(err.oauth_error(), Some("invalid_client"));
    assert_eq!(*idp.refusals.lock().unwrap(), ["alg"]);

    // The right key under another kid.
    let idp = JwtClientIdp::new("jwt-client", "ES256", key.public_key(), Some("k2"));
    let url = idp.start().await;
    fetch(&source(&url, key.clone())).await.unwrap_err();
    assert_eq!(*idp.refusals.lock().unwrap(), ["kid"]);

    // A server that wants its issuer as the audience: refused by default, accepted once
    // the request says so.
    let idp = JwtClientIdp::new("jwt-client", "ES256", key.public_key(), Some("k1"));
    *idp.audience.lock().unwrap() = "https://login.example.com/realms/acme".into();
    let url = idp.start().await;
    fetch(&source(&url, key.clone())).await.unwrap_err();
    assert_eq!(*idp.refusals.lock().unwrap(), ["aud"]);
    let issuer_audience = TokenSource::new(
        TokenRequest::oauth2_client_credentials_jwt(&url, "jwt-client", key.clone())
            .unwrap()
            .assertion_audience("https://login.example.com/realms/acme"),
    )
    .client(token_client());
    fetch(&issuer_audience).await.unwrap();
    assert_eq!(idp.accepted.load(SeqCst), 1);
}

/// What is not a usable key is refused when it is read, with a typed error that quotes
/// nothing of it: another curve, a public key, garbage.
#[test]
fn unusable_keys_are_refused_when_read() {
    let public_only = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n";
    for bad in [P384, public_only, "garbage"] {
        let err = SigningKey::from_pem(bad).unwrap_err();
        assert_eq!(err.kind(), TokenErrorKind::InvalidRequest);
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("MI"), "{shown}");
    }
}

/// The private key never shows: not in the key's, the request's or the source's
/// `Debug`, not in an error (the canary is the key's base64 body).
#[tokio::test]
async fn the_private_key_never_shows() {
    let key = SigningKey::from_pem(EC).unwrap().kid("k1");
    let body: String = EC.lines().filter(|l| !l.starts_with("-----")).collect();
    let canaries: Vec<&str> = EC
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .chain([body.as_str()])
        .collect();
    let idp = JwtClientIdp::new("jwt-client", "RS256", vec![1, 2, 3], None);
    let url = idp.start().await;
    let request =
        TokenRequest::oauth2_client_credentials_jwt(&url, "jwt-client", key.clone()).unwrap();
    let source = source(&url, key.clone());
    let err = fetch(&source).await.unwrap_err();
    let shown = format!("{key:?} {request:?} {source:?} {err} {err:?}");
    for canary in canaries {
        assert!(!shown.contains(canary), "key material in: {shown}");
    }
    assert!(shown.contains("ES256"), "{shown}");
    // The server echoed the assertion it refused: scrubbed as a secret is.
    assert!(err.to_string().contains("[redacted]"), "{err}");
    assert!(!err.to_string().contains("eyJ"), "{err}");
}

/// World: a token endpoint that finds the client's key as Microsoft Entra ID does: by the
/// registered certificate's thumbprint in the assertion's JOSE header (`x5t#S256`, or
/// `x5t`), never by `kid` (learn.microsoft.com, "Microsoft identity platform
/// application authentication certificate credentials": header `alg`, `typ`,
/// `x5t#S256`; an assertion without it is `AADSTS700027 ... The key was not found`,
/// keycloak/keycloak#12946). The client holds the key and its self-signed certificate
/// (made now) and gives both (`SigningKey::certificate_pem`). Proves: the assertion
/// names the certificate so that such a server can verify it, and the token is issued.
/// Counter: one assertion accepted, none refused (review 125: refused for `x5t`, the
/// crate could set no header but `kid`).
#[tokio::test]
async fn an_entra_style_server_finds_the_key_by_its_certificate_thumbprint() {
    use base64::Engine as _;
    let certified = rcgen::CertificateParams::new(vec!["jwt-client".to_owned()])
        .unwrap()
        .self_signed(&rcgen::KeyPair::from_pem(RSA).unwrap())
        .unwrap();
    let thumbprint = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(ring::digest::digest(&ring::digest::SHA256, certified.der()));
    let key = SigningKey::from_pem(RSA)
        .unwrap()
        .certificate_pem(&certified.pem())
        .unwrap();
    let idp = JwtClientIdp::new("jwt-client", "RS256", key.public_key(), None);
    *idp.x5t.lock().unwrap() = Some(thumbprint);
    let url = idp.start().await;
    let result = fetch(&source(&url, key)).await;
    assert_eq!(
        *idp.refusals.lock().unwrap(),
        Vec::<&str>::new(),
        "refused: {result:?}"
    );
    assert_eq!(idp.accepted.load(SeqCst), 1);
}

/// World: a client gives its EC key with the certificate of its RSA key, and PEM with no
/// certificate in it. Proves (bad input is a typed error that does not quote the input):
/// both are `InvalidRequest` errors, neither names the PEM's content, and no assertion
/// is ever signed under a certificate that is not the key's. Counter: the errors.
#[test]
fn a_certificate_that_is_not_the_keys_is_refused() {
    let certified = rcgen::CertificateParams::new(vec!["jwt-client".to_owned()])
        .unwrap()
        .self_signed(&rcgen::KeyPair::from_pem(RSA).unwrap())
        .unwrap();
    let pem = certified.pem();
    let err = SigningKey::from_pem(EC)
        .unwrap()
        .certificate_pem(&pem)
        .unwrap_err();
    assert_eq!(err.kind(), TokenErrorKind::InvalidRequest, "{err}");
    assert!(err.to_string().contains("not this key's"), "{err}");
    assert!(!err.to_string().contains("MII"), "{err}");
    let err = SigningKey::from_pem(RSA)
        .unwrap()
        .certificate_pem(RSA)
        .unwrap_err();
    assert_eq!(err.kind(), TokenErrorKind::InvalidRequest, "{err}");
    assert!(!err.to_string().contains("MII"), "{err}");
}

/// World: a token endpoint that refuses a request repeating a parameter (RFC 6749 §3.2
/// "MUST NOT be included more than once"; Okta answers `invalid_request` "the request
/// contains duplicated parameters", okta/okta-developer-docs#2082; Keycloak likewise,
/// keycloak/keycloak#7544). The request template began as mutual-TLS client credentials
/// and was switched to `private_key_jwt`, which the docs promise replaces the client
/// authentication given before ("the last one given wins"). Proves: the request carries
/// `client_id` once and the server accepts it. Counter: one assertion accepted, no
/// refusal.
#[tokio::test]
async fn switching_from_mtls_to_private_key_jwt_sends_client_id_once() {
    let key = SigningKey::from_pem(EC).unwrap();
    let idp = JwtClientIdp::new("jwt-client", "ES256", key.public_key(), None);
    let url = idp.start().await;
    let source = TokenSource::new(
        TokenRequest::oauth2_client_credentials_mtls(&url, "jwt-client")
            .unwrap()
            .private_key_jwt("jwt-client", key),
    )
    .client(token_client());
    let result = fetch(&source).await;
    assert_eq!(
        *idp.refusals.lock().unwrap(),
        Vec::<&str>::new(),
        "refused: {result:?}"
    );
    assert_eq!(idp.accepted.load(SeqCst), 1);
}

/// A self-signed certificate for `key_pem` (rcgen), DER and PEM.
fn certificate_of(key_pem: &str) -> (Vec<u8>, String) {
    let certified = rcgen::CertificateParams::new(vec!["jwt-client".to_owned()])
        .unwrap()
        .self_signed(&rcgen::KeyPair::from_pem(key_pem).unwrap())
        .unwrap();
    (certified.der().to_vec(), certified.pem())
}

/// `der` as a PEM `CERTIFICATE` block.
fn pem_of(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

/// World: a token endpoint that finds the client's key as ADFS does: by the SHA-1
/// thumbprint of its registered certificate in `x5t` (not `x5t#S256`), for an RSA key
/// and for an EC P-256 key (each with its own self-signed certificate). Proves
/// (README: `.certificate_pem(cert)` puts `x5t#S256` and `x5t` in every assertion's
/// header): `x5t` is the base64url SHA-1 of the certificate's DER, for both key types.
/// Counter: one assertion accepted per key, no refusal.
#[tokio::test]
async fn an_adfs_style_server_finds_the_key_by_its_sha1_thumbprint() {
    use base64::Engine as _;
    for (pem, alg) in [(RSA, "RS256"), (EC, "ES256")] {
        let (der, cert) = certificate_of(pem);
        let sha1 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(ring::digest::digest(
            &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
            &der,
        ));
        let key = SigningKey::from_pem(pem)
            .unwrap()
            .certificate_pem(&cert)
            .unwrap();
        let idp = JwtClientIdp::new("jwt-client", alg, key.public_key(), None);
        *idp.x5t.lock().unwrap() = Some(sha1);
        let url = idp.start().await;
        let result = fetch(&source(&url, key)).await;
        assert_eq!(
            *idp.refusals.lock().unwrap(),
            Vec::<&str>::new(),
            "{alg}: refused: {result:?}"
        );
        assert_eq!(idp.accepted.load(SeqCst), 1, "{alg}");
    }
}

/// World: the key file a client is handed holds the private key and then its
/// certificate (one PEM, as many tools write it), or the certificate after a text dump
/// (`openssl x509 -text` output above the block). Proves: the certificate is found past
/// what is not one, and matched to the key. Counter: `certificate_pem` succeeds.
#[test]
fn a_certificate_after_the_key_or_text_in_one_pem_is_found() {
    let (_, cert) = certificate_of(RSA);
    let combined = format!("{RSA}\n{cert}");
    assert!(
        SigningKey::from_pem(RSA)
            .unwrap()
            .certificate_pem(&combined)
            .is_ok()
    );
    let dumped = format!("Certificate:\n    Data:\n        Version: 3 (0x2)\n{cert}");
    assert!(
        SigningKey::from_pem(RSA)
            .unwrap()
            .certificate_pem(&dumped)
            .is_ok()
    );
}

/// World: a client gives malformed or hostile certificates with its key's own public
/// key somewhere in them: the real certificate cut at every length; its outer length
/// rewritten long-form (`0x83`, `0x84`), indefinite (`0x80`), or over-long; a chain
/// whose first certificate is another key's; an empty SEQUENCE; garbage. Proves
/// (module docs: a certificate that cannot be read is an `InvalidRequest` that does not
/// quote the input): every one is a typed error, never a panic, and the error never
/// shows the input; `Debug` of an accepted key shows no private material. Counter: each
/// call's result.
#[test]
fn hostile_certificate_der_is_a_typed_error_never_a_panic() {
    let (der, cert) = certificate_of(RSA);
    let (_, other) = certificate_of(EC);
    let mut inputs: Vec<Vec<u8>> = (0..der.len()).map(|n| der[..n].to_vec()).collect();
    // Long-form lengths the reader does not take, over the whole certificate.
    let body = &der[4..]; // `30 82 hi lo` then the body
    assert_eq!(der[1], 0x82, "rcgen's certificate has a two-byte length");
    let len = body.len();
    inputs.push([&[0x30, 0x83, 0, (len >> 8) as u8, len as u8][..], body].concat());
    inputs.push([&[0x30, 0x84, 0, 0, (len >> 8) as u8, len as u8][..], body].concat());
    inputs.push([&[0x30, 0x80][..], body, &[0, 0]].concat());
    inputs.push([&[0x30, 0x82, 0xff, 0xff][..], body].concat());
    inputs.push(vec![0x30, 0x00]);
    inputs.push(vec![0x30, 0x83, 0xff, 0xff, 0xff]);
    inputs.push(vec![0xa0; 64]);
    for input in &inputs {
        let err = SigningKey::from_pem(RSA)
            .unwrap()
            .certificate_pem(&pem_of(input))
            .unwrap_err();
        assert_eq!(err.kind(), TokenErrorKind::InvalidRequest, "{err}");
        assert!(!err.to_string().contains("MII"), "{err}");
    }
    // A chain whose first certificate is another key's: refused (the first is read).
    let chain = format!("{other}{cert}");
    let err = SigningKey::from_pem(RSA)
        .unwrap()
        .certificate_pem(&chain)
        .unwrap_err();
    assert_eq!(err.kind(), TokenErrorKind::InvalidRequest, "{err}");
    let key = SigningKey::from_pem(RSA)
        .unwrap()
        .certificate_pem(&cert)
        .unwrap();
    let shown = format!("{key:?}");
    assert!(
        !shown.contains("MII") && !shown.contains("PRIVATE"),
        "{shown}"
    );
}

/// World: a client gives its certificate with bytes after it in the PEM block (DER
/// followed by junk: a concatenation gone wrong, or a hostile file). The server has the
/// certificate itself registered (its thumbprint). Proves (README: the assertion names
/// the certificate by its thumbprint; bad input is a typed error): either the input is
/// refused as not a certificate, or the thumbprint sent is the certificate's; never a
/// thumbprint of bytes that are not a certificate, which the server cannot find.
/// Counter: `certificate_pem`'s result, and the server's verdict (review 126: accepted,
/// and the thumbprints were of the certificate and the junk: refused for `x5t`).
#[tokio::test]
async fn a_certificate_with_bytes_after_it_is_refused_or_named_by_its_own_thumbprint() {
    use base64::Engine as _;
    let (der, _) = certificate_of(RSA);
    let thumbprint = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(ring::digest::digest(&ring::digest::SHA256, &der));
    let padded = [&der[..], b"\x05\x00junk"].concat();
    let Ok(key) = SigningKey::from_pem(RSA)
        .unwrap()
        .certificate_pem(&pem_of(&padded))
    else {
        return; // refused: as promised
    };
    let idp = JwtClientIdp::new("jwt-client", "RS256", key.public_key(), None);
    *idp.x5t.lock().unwrap() = Some(thumbprint);
    let url = idp.start().await;
    let result = fetch(&source(&url, key)).await;
    assert_eq!(
        *idp.refusals.lock().unwrap(),
        Vec::<&str>::new(),
        "accepted a certificate with junk after it, and named the junk: {result:?}"
    );
}

/// A client secret of 40 bytes, registered with the server as the HS256 key.
const SHARED: &str = "s3cr3t-of-forty-bytes/with+marks&=0123456";

/// World: a token endpoint where the client registered `client_secret_jwt` (OpenID
/// Connect Core §9): it verifies each assertion as `JwtClientIdp` does (HS256 only, with
/// the registered secret as a key of at least 256 bits, `iss`/`sub`/`aud`/`exp`/`jti`),
/// and refuses a request that also authenticates otherwise (an `Authorization` header,
/// a `client_secret` field). Proves: every token request carries a fresh HS256
/// assertion the server accepts (3 requests, 3 distinct `jti`s); a request that began
/// with Basic client credentials and was switched to `client_secret_jwt` sends no
/// second authentication; the issuer audience works as for `private_key_jwt`; a client
/// holding another secret is refused (the server does verify). Counter: the server's
/// accepted count, refusals, and `jti`s.
#[tokio::test]
async fn client_secret_jwt_is_verified_by_a_strict_server() {
    let idp = JwtClientIdp::new("jwt-client", "HS256", SHARED.as_bytes().to_vec(), None);
    let url = idp.start().await;
    let request =
        TokenRequest::oauth2_client_credentials_secret_jwt(&url, "jwt-client", SHARED).unwrap();
    let source = TokenSource::new(request).client(token_client());
    for _ in 0..3 {
        fetch(&source).await.unwrap();
    }
    assert_eq!(
        (
            idp.accepted.load(SeqCst),
            idp.refusals.lock().unwrap().clone()
        ),
        (3, Vec::<&str>::new())
    );
    assert_eq!(idp.seen_jti.lock().unwrap().len(), 3);

    *idp.audience.lock().unwrap() = "https://login.example.com/realms/acme".into();
    let issuer_audience = TokenSource::new(
        TokenRequest::form(&url)
            .unwrap()
            .field("grant_type", "client_credentials")
            .client_secret_jwt("jwt-client", SHARED)
            .unwrap()
            .assertion_audience("https://login.example.com/realms/acme"),
    )
    .client(token_client());
    fetch(&issuer_audience).await.unwrap();
    assert_eq!(idp.accepted.load(SeqCst), 4);

    *idp.audience.lock().unwrap() = url.clone();
    let switched = TokenRequest::oauth2_client_credentials(&url, "jwt-client", SHARED)
        .unwrap()
        .client_secret_jwt("jwt-client", SHARED)
        .unwrap();
    fetch(&TokenSource::new(switched).client(token_client()))
        .await
        .unwrap();
    assert_eq!(idp.accepted.load(SeqCst), 5);

    let other = "another-secret-of-forty-bytes-0123456789";
    let wrong = TokenRequest::oauth2_client_credentials_secret_jwt(&url, "jwt-client", other);
    let err = fetch(&TokenSource::new(wrong.unwrap()).client(token_client()))
        .await
        .unwrap_err();
    assert_eq!(
        (err.oauth_error(), idp.refusals.lock().unwrap().clone()),
        (Some("invalid_client"), vec!["signature"])
    );
}

/// World: a client secret shorter than the 32 bytes an HS256 key needs (RFC 7518 §3.2),
/// and an empty one. Proves (bad input is a typed error that quotes nothing of it): both
/// are `InvalidRequest` errors before anything is sent, naming neither secret. Counter:
/// the errors' kind and text.
#[test]
fn a_client_secret_too_short_to_sign_is_refused() {
    for short in ["short-secret-of-31-bytes-long!!", ""] {
        assert!(short.len() < 32);
        let err = TokenRequest::oauth2_client_credentials_secret_jwt(
            "https://login.example.com/oauth2/token",
            "jwt-client",
            short,
        )
        .unwrap_err();
        assert_eq!(err.kind(), TokenErrorKind::InvalidRequest);
        let shown = format!("{err} {err:?}");
        assert!(shown.contains("32 bytes"), "{shown}");
        if !short.is_empty() {
            assert!(!shown.contains(short), "{shown}");
        }
    }
}

/// World: the server refuses the assertion (it wants its issuer as the audience) and its
/// error text quotes both the refused assertion and the client's secret it verified
/// with, as careless servers do. Proves: the client secret never shows: not in the
/// request's or the source's `Debug`, nor, with the assertion, in the error (scrubbed as
/// a secret is, in every form it may come back in). Counter: the shown text.
#[tokio::test]
async fn the_client_secret_never_shows() {
    let idp = JwtClientIdp::new("jwt-client", "HS256", SHARED.as_bytes().to_vec(), None);
    *idp.audience.lock().unwrap() = "https://login.example.com/realms/acme".into();
    let url = idp.start().await;
    let request =
        TokenRequest::oauth2_client_credentials_secret_jwt(&url, "jwt-client", SHARED).unwrap();
    let source = TokenSource::new(request.clone()).client(token_client());
    let err = fetch(&source).await.unwrap_err();
    assert_eq!(*idp.refusals.lock().unwrap(), ["aud"]);
    assert_eq!(err.oauth_error(), Some("invalid_client"));
    let shown = format!("{request:?} {source:?} {err} {err:?}");
    for canary in [SHARED, "forty-bytes", "eyJ"] {
        assert!(!shown.contains(canary), "{canary} in: {shown}");
    }
    assert!(shown.contains("client_secret_jwt (HS256)"), "{shown}");
    assert!(err.to_string().contains("[redacted]"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Review 130: client_secret_jwt against a recording endpoint (every request kept whole,
// headers and body), with its assertions verified here as a strict server does.

type Recorded = std::sync::Arc<std::sync::Mutex<Vec<(http::HeaderMap, bytes::Bytes)>>>;

/// A token endpoint that keeps every request and answers with `answer(n)` (n from 1).
async fn recording_endpoint(answer: fn(usize) -> support::providers::Reply) -> (String, Recorded) {
    let seen: Recorded = Recorded::default();
    let kept = seen.clone();
    let addr = support::providers::serve(move |req| {
        let kept = kept.clone();
        async move {
            let req = support::providers::read(req).await;
            let n = {
                let mut kept = kept.lock().unwrap();
                kept.push((req.headers, req.body));
                kept.len()
            };
            answer(n)
        }
    })
    .await;
    (format!("http://{addr}/oauth2/token"), seen)
}

fn tokens(n: usize) -> support::providers::Reply {
    support::providers::reply(
        http::StatusCode::OK,
        serde_json::json!({"access_token": format!("t-{n}"), "token_type": "Bearer",
            "expires_in": 300, "refresh_token": format!("rt-{n}")}),
    )
}

/// The body's fields as sent, in order, repeats kept (a form or a JSON object).
fn sent_fields(headers: &http::HeaderMap, body: &[u8]) -> Vec<(String, String)> {
    if headers[http::header::CONTENT_TYPE] == "application/json" {
        let doc: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body).unwrap();
        doc.into_iter()
            .map(|(k, v)| (k, v.as_str().unwrap().to_owned()))
            .collect()
    } else {
        form_urlencoded::parse(body).into_owned().collect()
    }
}

fn count(fields: &[(String, String)], name: &str) -> usize {
    fields.iter().filter(|(n, _)| n == name).count()
}

fn get<'a>(fields: &'a [(String, String)], name: &str) -> &'a str {
    &fields.iter().find(|(n, _)| n == name).unwrap().1
}

/// An HS256 client assertion checked as Connect2id/Nimbus, Keycloak and Okta check it:
/// header `alg` HS256, the tag verified with `secret`, `iss` = `sub` = `client_id`, `aud`,
/// `exp` after `iat` and at most an hour away, a `jti` of at least 128 bits. Its claims.
fn verified_hs256(jws: &str, secret: &str, client_id: &str, aud: &str) -> serde_json::Value {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (input, tag) = jws.rsplit_once('.').unwrap();
    let (header, claims) = input.split_once('.').unwrap();
    let header: serde_json::Value = serde_json::from_slice(&b64.decode(header).unwrap()).unwrap();
    assert_eq!(header["alg"], "HS256", "{header}");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    ring::hmac::verify(&key, input.as_bytes(), &b64.decode(tag).unwrap())
        .expect("the tag is the secret's HMAC-SHA256");
    let claims: serde_json::Value = serde_json::from_slice(&b64.decode(claims).unwrap()).unwrap();
    assert_eq!(
        (&claims["iss"], &claims["sub"], &claims["aud"]),
        (
            &serde_json::json!(client_id),
            &serde_json::json!(client_id),
            &serde_json::json!(aud)
        ),
        "{claims}"
    );
    let (iat, exp) = (
        claims["iat"].as_u64().unwrap(),
        claims["exp"].as_u64().unwrap(),
    );
    assert!(exp > iat && exp - iat <= 3600, "{claims}");
    assert!(claims["jti"].as_str().unwrap().len() >= 22, "{claims}");
    claims
}

/// How a request must authenticate its client.
#[derive(Debug, Clone, Copy)]
enum Sent {
    /// `client_secret_jwt` with this secret and `aud` (`None`: the token endpoint).
    SecretJwt(&'static str, Option<&'static str>),
    /// `private_key_jwt` (ES256).
    PrivateKeyJwt,
    /// HTTP Basic, nothing of the client in the body.
    Basic,
    /// `client_id` and `client_secret` in the body.
    Body,
}

const OTHER_SHARED: &str = "a-second-secret-of-forty-bytes-0123456789";
const ISSUER: &str = "https://login.example.com/realms/acme";

/// World: a request switched between client authentication methods, in every order the
/// builder allows (Basic, Body, mTLS, `private_key_jwt`, `client_secret_jwt`, another
/// secret, the issuer audience, a JSON body, a `client_id` given by hand), sent to an
/// endpoint that keeps each request whole. Proves: exactly the last method is sent:
/// one `client_id` (none in a Basic body), no `Authorization` beside an assertion, no
/// `client_secret` (nor the secret in any form) beside or inside a `client_secret_jwt`
/// request, an HS256 assertion a strict server verifies with the last secret given and
/// a `jti` never sent before. Counter: the requests as the endpoint received them.
#[tokio::test]
async fn client_secret_jwt_is_sent_alone_whatever_was_switched_from() {
    let (url, seen) = recording_endpoint(tokens).await;
    let key = || SigningKey::from_pem(EC).unwrap();
    let id = "jwt-client";
    let u = url.as_str();
    use tower_client_auth::token::{BodyEncoding, ClientAuth};
    let cases: Vec<(&str, TokenRequest, Sent)> = vec![
        (
            "basic -> secret_jwt",
            TokenRequest::oauth2_client_credentials(u, id, SHARED)
                .unwrap()
                .client_secret_jwt(id, SHARED)
                .unwrap(),
            Sent::SecretJwt(SHARED, None),
        ),
        (
            "body -> secret_jwt",
            TokenRequest::oauth2_client_credentials(u, id, SHARED)
                .unwrap()
                .client_auth(ClientAuth::Body)
                .client_secret_jwt(id, SHARED)
                .unwrap(),
            Sent::SecretJwt(SHARED, None),
        ),
        (
            "mtls -> secret_jwt",
            TokenRequest::oauth2_client_credentials_mtls(u, id)
                .unwrap()
                .client_secret_jwt(id, SHARED)
                .unwrap(),
            Sent::SecretJwt(SHARED, None),
        ),
        (
            "private_key_jwt + audience -> secret_jwt (audience kept)",
            TokenRequest::oauth2_client_credentials_jwt(u, id, key())
                .unwrap()
                .assertion_audience(ISSUER)
                .client_secret_jwt(id, SHARED)
                .unwrap(),
            Sent::SecretJwt(SHARED, Some(ISSUER)),
        ),
        (
            "secret_jwt -> other secret_jwt",
            TokenRequest::oauth2_client_credentials_secret_jwt(u, id, SHARED)
                .unwrap()
                .client_secret_jwt(id, OTHER_SHARED)
                .unwrap(),
            Sent::SecretJwt(OTHER_SHARED, None),
        ),
        (
            "secret_jwt -> client_auth(Body), JSON body, client_id by hand",
            TokenRequest::json(u)
                .unwrap()
                .field("grant_type", "client_credentials")
                .field("client_id", id)
                .client_secret_jwt(id, SHARED)
                .unwrap()
                .client_auth(ClientAuth::Body)
                .encoding(BodyEncoding::Json),
            Sent::SecretJwt(SHARED, None),
        ),
        (
            "secret_jwt + audience -> private_key_jwt",
            TokenRequest::oauth2_client_credentials_secret_jwt(u, id, SHARED)
                .unwrap()
                .assertion_audience(ISSUER)
                .private_key_jwt(id, key()),
            Sent::PrivateKeyJwt,
        ),
        (
            "secret_jwt -> basic",
            TokenRequest::oauth2_client_credentials_secret_jwt(u, id, SHARED)
                .unwrap()
                .client_credentials(id, "plain-secret"),
            Sent::Basic,
        ),
        (
            "secret_jwt -> body",
            TokenRequest::oauth2_client_credentials_secret_jwt(u, id, SHARED)
                .unwrap()
                .client_credentials(id, "plain-secret")
                .client_auth(ClientAuth::Body),
            Sent::Body,
        ),
    ];
    let mut jtis = std::collections::HashSet::new();
    for (name, request, want) in cases {
        let source = TokenSource::new(request).client(token_client());
        for _ in 0..2 {
            fetch(&source).await.unwrap();
            let (headers, body) = seen.lock().unwrap().last().cloned().unwrap();
            let fields = sent_fields(&headers, &body);
            let text = String::from_utf8_lossy(&body).into_owned();
            let auth = headers.get(http::header::AUTHORIZATION);
            match want {
                Sent::SecretJwt(secret, aud) => {
                    assert!(auth.is_none(), "{name}: {auth:?}");
                    assert_eq!(count(&fields, "client_id"), 1, "{name}: {text}");
                    assert_eq!(count(&fields, "client_secret"), 0, "{name}: {text}");
                    assert_eq!(count(&fields, "client_assertion"), 1, "{name}: {text}");
                    assert_eq!(
                        get(&fields, "client_assertion_type"),
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                        "{name}"
                    );
                    let claims = verified_hs256(
                        get(&fields, "client_assertion"),
                        secret,
                        id,
                        aud.unwrap_or(u),
                    );
                    assert!(jtis.insert(claims["jti"].to_string()), "{name}: jti reused");
                    for s in [SHARED, OTHER_SHARED, "0123456789"] {
                        assert!(!text.contains(s), "{name}: {s} in {text}");
                    }
                }
                Sent::PrivateKeyJwt => {
                    assert!(auth.is_none(), "{name}: {auth:?}");
                    assert_eq!(count(&fields, "client_id"), 1, "{name}: {text}");
                    assert_eq!(count(&fields, "client_secret"), 0, "{name}: {text}");
                    assert!(!text.contains("0123456789"), "{name}: {text}");
                }
                Sent::Basic => {
                    assert!(auth.is_some(), "{name}");
                    assert_eq!(count(&fields, "client_id"), 0, "{name}: {text}");
                    assert_eq!(count(&fields, "client_assertion"), 0, "{name}: {text}");
                    assert!(!text.contains("0123456789"), "{name}: {text}");
                }
                Sent::Body => {
                    assert!(auth.is_none(), "{name}: {auth:?}");
                    assert_eq!(count(&fields, "client_id"), 1, "{name}: {text}");
                    assert_eq!(get(&fields, "client_secret"), "plain-secret", "{name}");
                    assert_eq!(count(&fields, "client_assertion"), 0, "{name}: {text}");
                    assert!(!text.contains("0123456789"), "{name}: {text}");
                }
            }
        }
    }
}

/// World: a request that authenticated with `client_secret_jwt` (or Basic) switched to
/// mutual TLS with `mtls_client_auth()`, as one moving a client to RFC 8705 would write
/// it. Proves (the promise: any switch sends one method and `client_id` exactly once):
/// the mTLS request still names its client. Counter: `client_id` fields received.
/// FAILS at 11e6260: none is sent (`mtls_client_auth` adds no field and drops the
/// client id the assertion or the Basic credentials carried), which an RFC 8705 server
/// refuses (`client_id` is REQUIRED there).
#[tokio::test]
async fn switching_from_client_secret_jwt_to_mtls_keeps_the_client_id() {
    let (url, seen) = recording_endpoint(tokens).await;
    for (name, request) in [
        (
            "secret_jwt -> mtls",
            TokenRequest::oauth2_client_credentials_secret_jwt(&url, "jwt-client", SHARED)
                .unwrap()
                .mtls_client_auth(),
        ),
        (
            "basic -> mtls",
            TokenRequest::oauth2_client_credentials(&url, "jwt-client", SHARED)
                .unwrap()
                .mtls_client_auth(),
        ),
    ] {
        fetch(&TokenSource::new(request).client(token_client()))
            .await
            .unwrap();
        let (headers, body) = seen.lock().unwrap().last().cloned().unwrap();
        let fields = sent_fields(&headers, &body);
        assert!(headers.get(http::header::AUTHORIZATION).is_none(), "{name}");
        assert_eq!(count(&fields, "client_assertion"), 0, "{name}");
        assert_eq!(
            count(&fields, "client_id"),
            1,
            "{name}: {}",
            String::from_utf8_lossy(&body)
        );
    }
}

/// World: the refresh grant authenticated with `client_secret_jwt`, a refresh token saved
/// earlier, and an endpoint that rotates refresh tokens. Proves: each refresh is a
/// `refresh_token` grant carrying the held refresh token and a fresh HS256 assertion
/// (verified, a new `jti`), never the secret. Counter: the requests received.
#[tokio::test]
async fn client_secret_jwt_authenticates_the_refresh_grant() {
    let (url, seen) = recording_endpoint(tokens).await;
    let refresh = TokenRequest::form(&url)
        .unwrap()
        .field("grant_type", "refresh_token")
        .client_secret_jwt("jwt-client", SHARED)
        .unwrap();
    let source = TokenSource::new(
        TokenRequest::oauth2_client_credentials_secret_jwt(&url, "jwt-client", SHARED).unwrap(),
    )
    .refresh_with(refresh, "refresh_token")
    .refresh_token("rt-saved")
    .client(token_client());
    fetch(&source).await.unwrap();
    fetch(&source).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    let mut jtis = Vec::new();
    for ((headers, body), held) in seen.iter().zip(["rt-saved", "rt-1"]) {
        let fields = sent_fields(headers, body);
        assert_eq!(get(&fields, "grant_type"), "refresh_token");
        assert_eq!(get(&fields, "refresh_token"), held);
        assert!(headers.get(http::header::AUTHORIZATION).is_none());
        assert_eq!(count(&fields, "client_id"), 1);
        assert_eq!(count(&fields, "client_secret"), 0);
        let claims = verified_hs256(get(&fields, "client_assertion"), SHARED, "jwt-client", &url);
        jtis.push(claims["jti"].to_string());
    }
    assert_ne!(jtis[0], jtis[1]);
}

/// A secret with every character an echo may encode differently: `/`, `+`, `"`, `\`,
/// `&`, `=`, a space and a non-ASCII letter; the canary is its plain middle.
const MARKED: &str = "Mk/+\"\\&= \u{e9}-canary-0123456789-ABCDEFGHIJ";
const CANARY: &str = "canary-0123456789";

/// Refusals that echo the registered secret (the secret itself never travelled): as
/// sent, form-encoded (upper and lower case, `+` and `%20`), JSON-escaped as PHP,
/// Python and .NET write it, in the `error` code itself, and in a plain-text body.
fn echo_secret(n: usize) -> support::providers::Reply {
    let form: String = form_urlencoded::byte_serialize(MARKED.as_bytes()).collect();
    let json = serde_json::to_string(MARKED).unwrap();
    let json = &json[1..json.len() - 1];
    let php = json.replace('/', "\\/").replace('\u{e9}', "\\u00e9");
    let dotnet = json
        .replace("\\\"", "\\u0022")
        .replace('&', "\\u0026")
        .replace('+', "\\u002B")
        .replace('\u{e9}', "\\u00E9");
    // Percent escapes in lower case (`%2f`), a space as `%20`.
    let mut lower = String::new();
    let mut chars = form.chars();
    while let Some(c) = chars.next() {
        lower.push(c);
        if c == '%' {
            lower.extend(chars.by_ref().take(2).map(|h| h.to_ascii_lowercase()));
        }
    }
    let lower = lower.replace('+', "%20");
    let text = match n {
        1 => format!("expected a signature with {MARKED}"),
        2 => format!("key={form} or {lower}"),
        3 => format!("key {json} / {php} / {dotnet}"),
        _ => String::new(),
    };
    match n {
        4 => support::providers::reply(
            http::StatusCode::BAD_REQUEST,
            serde_json::json!({"error": format!("invalid_client:{MARKED}")}),
        ),
        5 => http::Response::builder()
            .status(http::StatusCode::UNAUTHORIZED)
            .header(http::header::CONTENT_TYPE, "text/plain")
            .body(http_body_util::Full::new(bytes::Bytes::from(format!(
                "bad client assertion, expected HS256 with key {MARKED}"
            ))))
            .unwrap(),
        _ => support::providers::reply(
            http::StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": "invalid_client", "error_description": text}),
        ),
    }
}

/// World: a careless server refuses each `client_secret_jwt` request with the registered
/// secret in its answer, in each form a server may echo it (as is, form-encoded in
/// either case, JSON-escaped three ways, inside the `error` code, in a plain-text body).
/// Proves: the secret shows in no error's `Display` or `Debug`. Counter: the text shown.
#[tokio::test]
async fn the_client_secret_is_scrubbed_in_every_form_a_server_echoes() {
    let (url, seen) = recording_endpoint(echo_secret).await;
    let source = TokenSource::new(
        TokenRequest::oauth2_client_credentials_secret_jwt(&url, "jwt-client", MARKED).unwrap(),
    )
    .client(token_client());
    for n in 1..=5 {
        let err = fetch(&source).await.unwrap_err();
        assert_eq!(seen.lock().unwrap().len(), n, "{err}");
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains(CANARY), "answer {n}: {shown}");
    }
}

/// World: an issuer (RFC 8414) that lists only `client_secret_jwt` in
/// `token_endpoint_auth_methods_supported` and first publishes a token endpoint that is
/// gone (404), then the one that is there now: a strict `client_secret_jwt` server
/// wanting its own URL as `aud`. Proves: the request made with the issuer's URL is sent
/// to the endpoint published, re-signed for it (its `aud`, a fresh `jti`), and accepted.
/// Counter: the server's accepted count and refusals.
#[tokio::test]
async fn client_secret_jwt_follows_the_issuer_to_a_moved_token_endpoint() {
    let idp = JwtClientIdp::new("jwt-client", "HS256", SHARED.as_bytes().to_vec(), None);
    let now_at = idp.start().await;
    let published = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let issuer = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (p, i, there) = (published.clone(), issuer.clone(), now_at.clone());
    let addr = support::providers::serve(move |req| {
        let (p, i, there) = (p.clone(), i.clone(), there.clone());
        async move {
            let req = support::providers::read(req).await;
            let issuer = i.lock().unwrap().clone();
            if req.method == http::Method::GET && req.path.contains("/.well-known/") {
                let token_endpoint = match p.fetch_add(1, SeqCst) {
                    0 => format!("{issuer}/gone/token"),
                    _ => there,
                };
                return support::providers::reply(
                    http::StatusCode::OK,
                    serde_json::json!({"issuer": issuer, "token_endpoint": token_endpoint,
                        "token_endpoint_auth_methods_supported": ["client_secret_jwt"],
                        "response_types_supported": ["code"]}),
                );
            }
            support::providers::reply(
                http::StatusCode::NOT_FOUND,
                serde_json::json!({"error": "not found"}),
            )
        }
    })
    .await;
    let base = format!("http://{addr}");
    *issuer.lock().unwrap() = base.clone();
    let source = TokenSource::new(
        TokenRequest::oauth2_client_credentials_secret_jwt(&base, "jwt-client", SHARED).unwrap(),
    )
    .issuer(tower_client_auth::token::Issuer::new(&base).unwrap())
    .client(token_client());
    fetch(&source).await.unwrap();
    fetch(&source).await.unwrap();
    assert_eq!(
        (
            idp.accepted.load(SeqCst),
            idp.refusals.lock().unwrap().clone()
        ),
        (2, Vec::<&str>::new())
    );
}

/// The first token request wants a DPoP nonce (RFC 9449 §8); the rest get tokens.
fn nonce_first(n: usize) -> support::providers::Reply {
    if n > 1 {
        return tokens(n);
    }
    let mut reply = support::providers::reply(
        http::StatusCode::BAD_REQUEST,
        serde_json::json!({"error": "use_dpop_nonce", "error_description": "nonce required"}),
    );
    reply
        .headers_mut()
        .insert("dpop-nonce", http::HeaderValue::from_static("n-1"));
    reply
}

/// World: a DPoP-bound token endpoint that answers the first request `use_dpop_nonce`,
/// and a client authenticating with `client_secret_jwt`: a server enforcing single-use
/// `jti`s (as Okta and Keycloak do) refuses a resend that repeats the assertion. Proves:
/// the resend with the nonce carries a new assertion (a new `jti`, verified), not the
/// first one again. Counter: the two requests received.
#[tokio::test]
async fn a_dpop_nonce_resend_carries_a_fresh_client_secret_jwt() {
    let (url, seen) = recording_endpoint(nonce_first).await;
    let source = TokenSource::new(
        TokenRequest::oauth2_client_credentials_secret_jwt(&url, "jwt-client", SHARED).unwrap(),
    )
    .dpop(tower_client_auth::token::DpopKey::generate().unwrap())
    .client(token_client());
    fetch(&source).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    let jtis: Vec<String> = seen
        .iter()
        .map(|(headers, body)| {
            let fields = sent_fields(headers, body);
            let claims =
                verified_hs256(get(&fields, "client_assertion"), SHARED, "jwt-client", &url);
            claims["jti"].to_string()
        })
        .collect();
    assert_ne!(jtis[0], jtis[1]);
}
