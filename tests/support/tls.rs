//! A TLS loopback server for the scenario tests: a self-signed certificate made at test
//! time for 127.0.0.1, rustls, and a provider's handler behind it.
#![allow(dead_code, unreachable_pub)]

use std::{net::SocketAddr, sync::Arc};

use super::providers::{Provider, read};

/// A TLS loopback server: where it listens, and the certificate to trust.
pub struct Tls {
    pub addr: SocketAddr,
    pub root_der: Vec<u8>,
}

/// Serves `provider` over TLS on 127.0.0.1 with a fresh self-signed certificate for that
/// address.
pub async fn serve_tls<P: Provider>(provider: Arc<P>) -> Tls {
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert_der = certified.cert.der().to_vec();
    let key_der = certified.signing_key.serialize_der();
    let provider_ring = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider_ring)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![rustls::pki_types::CertificateDer::from(cert_der.clone())],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key_der.into()),
        )
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, provider) = (acceptor.clone(), provider.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req| {
                    let provider = provider.clone();
                    async move { Ok::<_, std::convert::Infallible>(provider.handle(read(req).await)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Tls {
        addr,
        root_der: cert_der,
    }
}
