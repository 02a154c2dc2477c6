//! Mutual-TLS client authentication at the token endpoint (RFC 8705 §2): the client
//! proves who it is with its TLS client certificate, and the token request carries its
//! `client_id` and no secret (`tls_client_auth` for a certificate from a CA,
//! `self_signed_tls_client_auth` for one registered as is; the client does the same for
//! both).
//!
//! A [`ClientIdentity`] is a certificate chain and its private key, swappable at run
//! time: [`ClientIdentity::replace_pem`] installs a renewed certificate, and every TLS
//! handshake after it presents the new one (connections already open keep the one they
//! were made with until they close). A client with an identity resumes no TLS session:
//! a resumed session would carry the old certificate's identity. The private key is a secret: never in `Debug`, an
//! error or a log line.

use std::{fmt, sync::Arc};

use arc_swap::ArcSwap;
use rustls::{
    SignatureScheme,
    client::ResolvesClientCert,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    sign::CertifiedKey,
};

use super::{TokenError, TokenErrorKind};

/// A TLS client certificate chain and private key for the token client, replaceable
/// without a restart. Cheap to clone; clones share the current certificate.
///
/// ```no_run
/// use tower_client_auth::token::{ClientIdentity, TokenClient, TokenRequest, TokenSource};
///
/// # fn main() -> Result<(), tower_client_auth::token::TokenError> {
/// # let (cert_pem, key_pem) = (String::new(), String::new());
/// let identity = ClientIdentity::from_pem(&cert_pem, &key_pem)?;
/// let client = TokenClient::hyper_rustls_with_identity(identity.clone(), Vec::<Vec<u8>>::new())?;
/// let login = TokenRequest::oauth2_client_credentials_mtls(
///     "https://mtls.login.example.com/oauth2/token",
///     "my-client",
/// )?;
/// let source = TokenSource::new(login).client(client);
/// // Later, when the certificate is renewed: new handshakes present the new one.
/// # let (new_cert_pem, new_key_pem) = (String::new(), String::new());
/// identity.replace_pem(&new_cert_pem, &new_key_pem)?;
/// # let _ = source;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ClientIdentity {
    current: Arc<ArcSwap<CertifiedKey>>,
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("certificates", &self.current.load().cert.len())
            .finish_non_exhaustive()
    }
}

fn invalid(detail: &'static str) -> TokenError {
    TokenError::new(TokenErrorKind::InvalidRequest).detail(detail)
}

/// The chain and key from PEM, checked to belong together.
fn certified(cert_chain_pem: &str, key_pem: &str) -> Result<CertifiedKey, TokenError> {
    let chain = CertificateDer::pem_slice_iter(cert_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| invalid("the client certificate PEM does not parse"))?;
    if chain.is_empty() {
        return Err(invalid("no certificate in the client certificate PEM"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|_| invalid("no unencrypted private key in the client key PEM"))?;
    CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider())
        .map_err(|_| invalid("the client key is unusable or does not match the certificate"))
}

impl ClientIdentity {
    /// A certificate chain (leaf first; PEM `CERTIFICATE`s) and its private key (PEM:
    /// PKCS#8, PKCS#1 or SEC1). The key must match the leaf's public key.
    pub fn from_pem(cert_chain_pem: &str, key_pem: &str) -> Result<Self, TokenError> {
        Ok(ClientIdentity {
            current: Arc::new(ArcSwap::from_pointee(certified(cert_chain_pem, key_pem)?)),
        })
    }

    /// Installs a renewed certificate and key: handshakes from now on present them. On
    /// an error the current one stays.
    pub fn replace_pem(&self, cert_chain_pem: &str, key_pem: &str) -> Result<(), TokenError> {
        self.current
            .store(Arc::new(certified(cert_chain_pem, key_pem)?));
        Ok(())
    }

    /// The leaf certificate presented now (DER).
    pub fn certificate(&self) -> Vec<u8> {
        self.current.load().cert[0].to_vec()
    }

    pub(crate) fn resolver(&self) -> Arc<dyn ResolvesClientCert> {
        Arc::new(Resolver(self.current.clone()))
    }
}

/// What rustls asks for the certificate at each handshake: the current one.
struct Resolver(Arc<ArcSwap<CertifiedKey>>);

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientIdentity resolver")
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let current = self.0.load_full();
        // A server that accepts none of the key's schemes gets no certificate (and then
        // refuses the handshake, or the client), rather than one it cannot verify.
        current
            .key
            .choose_scheme(sigschemes)
            .is_some()
            .then_some(current)
    }

    fn has_certs(&self) -> bool {
        true
    }
}
