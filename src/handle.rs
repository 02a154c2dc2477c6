//! [`CacheHandle`]: how a credential source reaches the cache it is attached to. A leaf
//! module: the source trait names the handle without naming the cache.

use std::{fmt, sync::Weak};

use crate::{credential::Credential, error::InvalidCredential};

/// A handle to a cache that replaces or invalidates its credential from outside the
/// request path. Given to [`CredentialSource::attach`](crate::CredentialSource::attach); it does not keep the cache alive.
#[derive(Clone)]
pub struct CacheHandle {
    inner: Weak<dyn Sink>,
}

impl CacheHandle {
    pub(crate) fn new(inner: Weak<dyn Sink>) -> Self {
        CacheHandle { inner }
    }

    /// Whether the cache is still alive (handles do not keep it alive).
    pub fn is_alive(&self) -> bool {
        self.inner.strong_count() > 0
    }

    /// Makes `credential` the current one at once, ahead of any refresh in flight: the
    /// requests waiting for that refresh get `credential` too (one already in its hard
    /// window only if that refresh fails), except a step-up's
    /// (`AuthLayer::step_up`), which get the wider grant they asked for. Returns
    /// `Ok(false)` if the cache is gone.
    ///
    /// With a store, a credential carrying a refresh token is the fleet's newest
    /// session: a task saves it to the store under the refresh lease, as a refresh's
    /// result is saved. Until it is saved, a refresh of this process presents its
    /// refresh token, never a pair the store holds (an older session's). Called outside
    /// a Tokio runtime, no task saves it: it reaches the fleet through this process's
    /// next refresh.
    ///
    /// # Errors
    /// A credential bound to a key (DPoP) when the cache's source does not say it binds
    /// ([`CredentialSource::binds_credentials`](crate::CredentialSource::binds_credentials)):
    /// the cache keeps what it had.
    pub fn replace(&self, credential: Credential) -> Result<bool, InvalidCredential> {
        match self.inner.upgrade() {
            Some(sink) => sink.replace(credential).map(|()| true),
            None => Ok(false),
        }
    }

    /// Drops the current credential, so the next request fetches a new one. Returns
    /// `false` if the cache is gone.
    pub fn invalidate(&self) -> bool {
        match self.inner.upgrade() {
            Some(sink) => {
                sink.invalidate();
                true
            }
            None => false,
        }
    }
}

impl CacheHandle {
    /// Drops `credential` if it is still the cache's current one, so the next request
    /// fetches a new one; a credential that was already replaced (or dropped) is left
    /// alone. Returns whether this call dropped it.
    ///
    /// This is the form to use when the API rejected a request outside the layer's view
    /// (a gRPC `UNAUTHENTICATED`, say): a burst of such answers, each naming the
    /// credential it carried, costs one fetch.
    pub fn invalidate_if(&self, credential: &Credential) -> bool {
        self.inner
            .upgrade()
            .is_some_and(|sink| sink.invalidate_if(credential))
    }
}

impl fmt::Debug for CacheHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheHandle")
            .field("alive", &(self.inner.strong_count() > 0))
            .finish()
    }
}

/// What a handle does to its cache; implemented by the cache.
pub(crate) trait Sink: Send + Sync {
    fn replace(&self, credential: Credential) -> Result<(), InvalidCredential>;
    fn invalidate(&self);
    fn invalidate_if(&self, credential: &Credential) -> bool;
}
