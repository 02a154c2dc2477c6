//! The whole flow over real TLS: a self-signed certificate made at test time, a rustls
//! loopback server (token endpoint and API), the default HTTPS token client trusting it,
//! and `AuthLayer` in strict mode (https only, no loopback exception).
#![cfg(feature = "https")]

use crate::support;

use std::{sync::Arc, sync::atomic::Ordering::SeqCst};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use support::{providers::ClientCredentialsApi, tls::serve_tls};
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, CredentialCache, ReplayBody,
    token::{TokenClient, TokenError, TokenErrorKind, TokenSource},
};

/// An API client that trusts `root` (what a user's own HTTPS client would do).
fn https_api_client(
    root: &[u8],
) -> hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    ReplayBody<Full<Bytes>>,
> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(root.to_vec()))
        .unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(connector)
}

/// World: style D served only over TLS with a certificate no public root signs. Proves:
/// the default HTTPS token client, given that root, fetches the token; the layer sends
/// it over TLS; the API answers 200; without the root the handshake fails as a typed
/// transport error.
#[tokio::test]
async fn whole_flow_over_real_tls() {
    let api = ClientCredentialsApi::new("tls-client", "tls-secret");
    let tls = serve_tls(api.clone()).await;
    let token_url = format!("https://{}/oauth/v2/token", tls.addr);

    let source = TokenSource::client_credentials(&token_url, "tls-client", "tls-secret")
        .unwrap()
        .client(TokenClient::hyper_rustls_with_roots([&tls.root_der]).unwrap());
    let svc = AuthLayer::new(source)
        .any_https_origin()
        .layer(https_api_client(&tls.root_der));
    for _ in 0..3 {
        let req = Request::get(format!("https://{}/v1/shipments", tls.addr))
            .body(Full::default())
            .unwrap();
        let res = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        res.into_body().collect().await.unwrap();
    }
    assert_eq!(api.token_requests.load(SeqCst), 1);
    assert_eq!(api.api_calls.load(SeqCst), 3);

    let untrusting = TokenSource::client_credentials(&token_url, "tls-client", "tls-secret")
        .unwrap()
        .client(TokenClient::hyper_rustls().unwrap());
    let err = CredentialCache::new(untrusting)
        .credential()
        .await
        .unwrap_err();
    let token = err.get_ref().unwrap().downcast_ref::<TokenError>().unwrap();
    assert_eq!(token.kind(), TokenErrorKind::Connect);
    assert_eq!(
        api.token_requests.load(SeqCst),
        1,
        "nothing reached the server"
    );
}

/// A root that is not a certificate is a typed error, not a panic.
#[test]
fn bad_root_certificate_is_a_typed_error() {
    let err = TokenClient::hyper_rustls_with_roots([b"not a certificate".as_slice()]).unwrap_err();
    assert_eq!(err.kind(), TokenErrorKind::InvalidRequest);
}

/// World: one token client shared by runtimes created one after another (what every
/// `#[tokio::test]` does, and apps that build a runtime per job), against one loopback
/// HTTPS token endpoint that outlives them all. Proves: every runtime fetches its token;
/// no runtime trips over a pooled connection whose driver died with an earlier runtime.
#[test]
fn runtimes_one_after_another_share_a_token_client() {
    let (tx, rx) = std::sync::mpsc::channel();
    let api = ClientCredentialsApi::new("rt-client", "rt-secret");
    std::thread::spawn(move || {
        let server = tokio::runtime::Runtime::new().unwrap();
        server.block_on(async move {
            tx.send(serve_tls(api).await).unwrap();
            std::future::pending::<()>().await
        });
    });
    let tls = rx.recv().unwrap();
    let client = TokenClient::hyper_rustls_with_roots([&tls.root_der]).unwrap();
    let token_url = format!("https://{}/oauth/v2/token", tls.addr);
    for round in 0..4 {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let source = TokenSource::client_credentials(&token_url, "rt-client", "rt-secret")
                .unwrap()
                .client(client.clone());
            let got = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                CredentialCache::new(source).credential(),
            )
            .await;
            assert!(matches!(got, Ok(Ok(_))), "runtime {round}: {got:?}");
        });
    }
}
