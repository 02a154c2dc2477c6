//! Mutual-TLS client authentication at the token endpoint (RFC 8705), against a
//! loopback TLS server that requires a client certificate made at test time
//! (`support::tls::serve_mtls`, `support::providers::MtlsIdp`), including a certificate
//! rotation mid-run.
#![cfg(feature = "https")]

use crate::support;

use std::sync::Arc;

use support::{
    providers::MtlsIdp,
    tls::{serve_mtls, serve_mtls_refusing, sha256_hex},
};
use tower_client_auth::{
    CredentialSource, FetchContext, FetchReason,
    token::{ClientIdentity, TokenClient, TokenError, TokenErrorKind, TokenRequest, TokenSource},
};

/// A self-signed client certificate and its key, as PEM.
fn client_cert(name: &str) -> (String, String) {
    let certified = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    (certified.cert.pem(), certified.signing_key.serialize_pem())
}

fn fingerprint(cert_pem: &str) -> String {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    sha256_hex(
        CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .unwrap()
            .as_ref(),
    )
}

async fn fetch(source: &TokenSource) -> Result<(), TokenError> {
    source
        .fetch(FetchContext::new(FetchReason::Invalidated, None))
        .await
        .map(|_| ())
        .map_err(|e| *e.downcast::<TokenError>().expect("a token error"))
}

async fn world() -> (Arc<MtlsIdp>, String, Vec<u8>) {
    let idp = MtlsIdp::new("mtls-client");
    let tls = serve_mtls(idp.clone()).await;
    (
        idp,
        format!("https://{}/oauth2/token", tls.addr),
        tls.root_der,
    )
}

/// World: the client's certificate is registered; it is renewed mid-run and the new one
/// registered too. Proves: token requests authenticate with the certificate alone (no
/// secret is sent), and the request after `replace_pem` presents the new certificate,
/// with no restart and no new client.
#[tokio::test]
async fn the_certificate_authenticates_and_is_replaced_at_run_time() {
    let (idp, url, root) = world().await;
    let (cert_a, key_a) = client_cert("client-a");
    let (cert_b, key_b) = client_cert("client-b");
    idp.registered
        .lock()
        .unwrap()
        .extend([fingerprint(&cert_a), fingerprint(&cert_b)]);
    let identity = ClientIdentity::from_pem(&cert_a, &key_a).unwrap();
    let client = TokenClient::hyper_rustls_with_identity(identity.clone(), [root]).unwrap();
    let source = TokenSource::new(
        TokenRequest::oauth2_client_credentials_mtls(&url, "mtls-client").unwrap(),
    )
    .client(client);
    fetch(&source).await.unwrap();
    fetch(&source).await.unwrap();
    identity.replace_pem(&cert_b, &key_b).unwrap();
    fetch(&source).await.unwrap();
    assert_eq!(
        *idp.seen.lock().unwrap(),
        [
            fingerprint(&cert_a),
            fingerprint(&cert_a),
            fingerprint(&cert_b)
        ]
    );
    assert_eq!(identity.certificate(), {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        CertificateDer::from_pem_slice(cert_b.as_bytes())
            .unwrap()
            .to_vec()
    });
}

/// World: a certificate the server does not know, and then none at all. Proves: the
/// first is the server's typed `invalid_client`; the second never completes the
/// handshake, so nothing is issued.
#[tokio::test]
async fn an_unregistered_or_missing_certificate_gets_no_token() {
    let (idp, url, root) = world().await;
    let (cert, key) = client_cert("stranger");
    let identity = ClientIdentity::from_pem(&cert, &key).unwrap();
    let login = TokenRequest::oauth2_client_credentials_mtls(&url, "mtls-client").unwrap();
    let source = TokenSource::new(login.clone())
        .client(TokenClient::hyper_rustls_with_identity(identity, [root.clone()]).unwrap());
    let err = fetch(&source).await.unwrap_err();
    assert_eq!(err.kind(), TokenErrorKind::Rejected);
    assert_eq!(err.oauth_error(), Some("invalid_client"));

    let no_cert =
        TokenSource::new(login).client(TokenClient::hyper_rustls_with_roots([root]).unwrap());
    let err = fetch(&no_cert).await.unwrap_err();
    assert!(
        matches!(
            err.kind(),
            TokenErrorKind::Connect | TokenErrorKind::Transport
        ),
        "{err}"
    );
    assert_eq!(idp.issued.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// What is not a usable identity is a typed error that quotes nothing of it, and a
/// failed replacement keeps the current certificate.
#[test]
fn unusable_identities_are_refused() {
    let (cert_a, key_a) = client_cert("a");
    let (_, key_b) = client_cert("b");
    for (cert, key) in [
        ("", key_a.as_str()),
        (cert_a.as_str(), ""),
        (cert_a.as_str(), key_b.as_str()),
        ("garbage", "garbage"),
    ] {
        let err = ClientIdentity::from_pem(cert, key).unwrap_err();
        assert_eq!(err.kind(), TokenErrorKind::InvalidRequest);
        assert!(!format!("{err} {err:?}").contains("MI"), "{err}");
    }
    let identity = ClientIdentity::from_pem(&cert_a, &key_a).unwrap();
    let before = identity.certificate();
    assert!(identity.replace_pem(&cert_a, &key_b).is_err());
    assert_eq!(identity.certificate(), before);
    let shown = format!("{identity:?}");
    assert!(!shown.contains(key_a.lines().nth(1).unwrap()), "{shown}");
}

/// World: a server that refuses the client certificate in the handshake (TLS 1.3: after
/// the client has written its request). Proves: a refresh token in that request is kept
/// unspent (a `Connect` error), not dropped as an unknown outcome (review finding: the
/// alert read as "sent, answer lost").
#[tokio::test]
async fn a_refused_certificate_leaves_the_refresh_token_unspent() {
    let idp = MtlsIdp::new("mtls-client");
    let tls = serve_mtls_refusing(idp.clone()).await;
    let url = format!("https://{}/oauth2/token", tls.addr);
    let (cert, key) = client_cert("expired-one");
    let identity = ClientIdentity::from_pem(&cert, &key).unwrap();
    let refresh = TokenRequest::form(&url)
        .unwrap()
        .field("grant_type", "refresh_token")
        .field("client_id", "mtls-client")
        .mtls_client_auth();
    let source = TokenSource::new(
        TokenRequest::oauth2_client_credentials_mtls(&url, "mtls-client").unwrap(),
    )
    .refresh_with(refresh, "refresh_token")
    .refresh_token("rt-seed")
    .client(TokenClient::hyper_rustls_with_identity(identity, [tls.root_der]).unwrap());
    let err = fetch(&source).await.unwrap_err();
    assert_eq!(err.kind(), TokenErrorKind::Connect, "{err}");
    assert_eq!(source.stats().unknown_outcomes, 0);
    assert!(
        idp.seen.lock().unwrap().is_empty(),
        "the server read nothing"
    );
}
