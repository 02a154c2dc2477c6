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
    serve(provider, None).await
}

pub use super::providers::CLIENT_CERT_SHA256;

/// Serves `provider` over TLS on 127.0.0.1, requiring a client certificate: any
/// certificate, self-signed or not, whose key signs the handshake (the server checks
/// possession; the provider decides whether it is registered, from
/// [`CLIENT_CERT_SHA256`]). Every answer closes its connection, so each request makes a
/// new handshake.
pub async fn serve_mtls<P: Provider>(provider: Arc<P>) -> Tls {
    serve(provider, Some(false)).await
}

/// [`serve_mtls`] refusing every client certificate in the handshake (an expired or
/// revoked one, say): TLS 1.3 sends that alert after the client has written its request.
pub async fn serve_mtls_refusing<P: Provider>(provider: Arc<P>) -> Tls {
    serve(provider, Some(true)).await
}

/// `mtls`: `None` for no client certificate, `Some(refuse)` to require one.
async fn serve<P: Provider>(provider: Arc<P>, mtls: Option<bool>) -> Tls {
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert_der = certified.cert.der().to_vec();
    let key_der = certified.signing_key.serialize_der();
    let provider_ring = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider_ring.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match mtls {
        Some(refuse) => {
            builder.with_client_cert_verifier(Arc::new(AnyClientCert(provider_ring, refuse)))
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
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
                let fingerprint = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| sha256_hex(c.as_ref()));
                let service = hyper::service::service_fn(move |req| {
                    let (provider, fingerprint) = (provider.clone(), fingerprint.clone());
                    async move {
                        let mut incoming = read(req).await;
                        if let Some(fingerprint) = &fingerprint {
                            incoming
                                .headers
                                .insert(CLIENT_CERT_SHA256, fingerprint.parse().unwrap());
                        }
                        let mut reply = provider.handle(incoming);
                        if mtls.is_some() {
                            reply
                                .headers_mut()
                                .insert(http::header::CONNECTION, "close".parse().unwrap());
                        }
                        Ok::<_, std::convert::Infallible>(reply)
                    }
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

pub fn sha256_hex(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Accepts any client certificate chain, and checks that the client holds its key (the
/// handshake signature): `self_signed_tls_client_auth` servers verify so, then compare
/// the certificate with the one registered.
#[derive(Debug)]
struct AnyClientCert(Arc<rustls::crypto::CryptoProvider>, bool);

impl rustls::server::danger::ClientCertVerifier for AnyClientCert {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        if self.1 {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired,
            ));
        }
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
