//! Fixed and rotatable credentials: personal access tokens, API keys, client secrets.
//!
//! [`StaticCredential`] always hands out the same credential. [`RotatingCredential`]
//! can be swapped at runtime from any task (a revoked personal access token re-issued
//! without a restart); the next request through every attached cache uses the new value.
//!
//! # Example
//! ```
//! use tower_client_auth::{AuthLayer, Credential, RotatingCredential, StaticCredential};
//!
//! let api_key = AuthLayer::new(StaticCredential::header("x-api-key", "k-123")?)
//!     .origin("https://api.example.com")?;
//!
//! let pat = RotatingCredential::new(Credential::bearer("pat_old")?);
//! let layer = AuthLayer::new(pat.clone()).origin("https://api.example.com")?;
//! // Later, from an admin endpoint or a config watcher:
//! pat.rotate(Credential::bearer("pat_new")?)?;
//! # let _ = (api_key, layer);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::{
    fmt,
    sync::{Arc, Mutex, PoisonError},
};

use crate::{
    credential::Credential,
    error::{BoxError, InvalidCredential},
    handle::CacheHandle,
    source::{CredentialSource, FetchContext, RefreshMode},
};

/// A source that always returns the same credential.
///
/// One that states its expiry (`Credential::lives`, `expires_at`) is never sent past
/// it: from then on, requests to its origins fail with a typed error (the first with
/// [`ErrorKind::Expired`](crate::ErrorKind::Expired)) until it is replaced.
///
/// The string constructors check the value as [`Credential`]'s do: a value a header
/// cannot carry is an [`InvalidCredential`] when the source is built, never a failure on
/// the first request.
#[derive(Clone)]
pub struct StaticCredential {
    credential: Credential,
}

impl StaticCredential {
    /// Serves `credential`.
    pub fn new(credential: Credential) -> Self {
        StaticCredential { credential }
    }

    /// `Authorization: Bearer <token>`.
    pub fn bearer(token: impl AsRef<str>) -> Result<Self, InvalidCredential> {
        Credential::bearer(token).map(Self::new)
    }

    /// `Authorization: <scheme> <secret>`, such as `Secret <client secret>`.
    pub fn with_scheme(scheme: &str, secret: impl AsRef<str>) -> Result<Self, InvalidCredential> {
        Credential::with_scheme(scheme, secret).map(Self::new)
    }

    /// `Cookie: <name>=<value>`.
    pub fn cookie(name: &str, value: impl AsRef<str>) -> Result<Self, InvalidCredential> {
        Credential::cookie(name, value).map(Self::new)
    }

    /// Any header, such as an API key.
    pub fn header(name: &str, value: impl AsRef<str>) -> Result<Self, InvalidCredential> {
        Credential::header(name, value).map(Self::new)
    }
}

impl fmt::Debug for StaticCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("StaticCredential")
            .field(&self.credential)
            .finish()
    }
}

impl CredentialSource for StaticCredential {
    async fn fetch(&self, _cx: FetchContext) -> Result<Credential, BoxError> {
        Ok(self.credential.clone())
    }

    /// A static credential cannot get any fresher: never refreshed, never replayed with
    /// another. One bound to a key (DPoP) is `ReactiveOnly`: a server's nonce request is
    /// answered by sending the request again with a new proof, which needs the way back
    /// to the cache a never-refreshed credential does without (a rejection fetches the
    /// same credential again, and the answer is marked `SameCredential`).
    fn refresh_mode(&self) -> RefreshMode {
        if self.credential.is_bound() {
            RefreshMode::ReactiveOnly
        } else {
            RefreshMode::Never
        }
    }

    fn binds_credentials(&self) -> bool {
        self.credential.is_bound()
    }
}

/// A credential that can be replaced at runtime. Clones share the value.
///
/// [`rotate`](RotatingCredential::rotate) takes effect on the next request through every
/// cache this source is attached to, including requests already waiting for a credential.
///
/// Made with a credential bound to a key (a DPoP token, see
/// [`CredentialSource::binds_credentials`]), it binds: each request gets a proof for its
/// whole URI, and it may be rotated to another bound credential. Made with any other
/// credential, it refuses a bound one.
#[derive(Clone)]
pub struct RotatingCredential {
    shared: Arc<Mutex<Rotating>>,
    /// Held through a whole rotation, so that rotations reach the caches in the order
    /// they were made; `shared` is not held while the caches are told (a cache asks its
    /// source, which may ask this one, whether it binds).
    rotations: Arc<Mutex<()>>,
    binds: bool,
}

struct Rotating {
    current: Credential,
    caches: Vec<CacheHandle>,
}

impl RotatingCredential {
    /// Starts with `credential`.
    pub fn new(credential: Credential) -> Self {
        RotatingCredential {
            binds: credential.is_bound(),
            rotations: Arc::default(),
            shared: Arc::new(Mutex::new(Rotating {
                current: credential,
                caches: Vec::new(),
            })),
        }
    }

    /// Replaces the credential; every attached cache switches to it at once.
    ///
    /// # Errors
    /// A credential bound to a key when this source was made with one that is not: the
    /// layers it is attached to were built for credentials without proofs. The credential
    /// served is unchanged.
    pub fn rotate(&self, credential: Credential) -> Result<(), InvalidCredential> {
        if credential.is_bound() && !self.binds {
            return Err(InvalidCredential::new(crate::error::UNDECLARED_BINDING));
        }
        let _rotation = self
            .rotations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let caches = {
            let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
            shared.current = credential.clone();
            shared.caches.retain(CacheHandle::is_alive);
            shared.caches.clone()
        };
        for cache in caches {
            if let Err(e) = cache.replace(credential.clone()) {
                // A cache over a wrapper of this source that does not pass on
                // `binds_credentials`: it keeps what it had.
                tracing::warn!(error = %e, "a cache refused the rotated credential");
            }
        }
        Ok(())
    }

    /// The credential currently served.
    pub fn current(&self) -> Credential {
        let shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        shared.current.clone()
    }
}

impl fmt::Debug for RotatingCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RotatingCredential")
            .field(&self.current())
            .finish()
    }
}

impl CredentialSource for RotatingCredential {
    async fn fetch(&self, _cx: FetchContext) -> Result<Credential, BoxError> {
        Ok(self.current())
    }

    fn refresh_mode(&self) -> RefreshMode {
        RefreshMode::ReactiveOnly
    }

    fn binds_credentials(&self) -> bool {
        self.binds
    }

    fn attach(&self, cache: CacheHandle) {
        let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        // Caches come and go (one per job, per tenant): the dead are dropped here, so
        // the list holds the live ones, not every cache ever attached.
        shared.caches.retain(CacheHandle::is_alive);
        shared.caches.push(cache);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CredentialCache;

    /// Attaching in a loop, with each cache dropped before the next, keeps one handle.
    #[test]
    fn attach_prunes_dead_caches() {
        let pat = RotatingCredential::new(Credential::bearer("pat").unwrap());
        for _ in 0..100 {
            drop(CredentialCache::new(pat.clone()));
        }
        let kept = CredentialCache::new(pat.clone());
        let shared = pat.shared.lock().unwrap();
        assert_eq!(shared.caches.len(), 1);
        drop(shared);
        drop(kept);
    }
}
