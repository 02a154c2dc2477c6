//! The storage seam behind the cache: where credentials are shared beyond one process.
//!
//! A [`CredentialCache`](crate::CredentialCache) always keeps the current credential in
//! memory, where the hot path reads it without locks. A [`CredentialStore`] is a second,
//! shared level consulted only on the refresh path: before asking its source, the cache
//! loads from the store (another process, or another cache, may have fetched a fresh
//! credential already); after a fetch it saves; when the API rejects a credential it
//! removes that credential, and only that one.
//!
//! [`MemoryStore`] shares credentials between caches in one process. A store over Redis
//! or a database implements the same three calls.
//!
//! # Example
//! ```
//! use tower_client_auth::{CredentialCache, MemoryStore, StaticCredential};
//!
//! let store = MemoryStore::new();
//! let a = CredentialCache::builder(StaticCredential::bearer("t")?).store(store.clone()).build();
//! let b = CredentialCache::builder(StaticCredential::bearer("t")?).store(store).build();
//! # let _ = (a, b);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
};

use crate::{credential::Credential, error::BoxError};

/// The future a [`CredentialStore`] returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send + 'a>>;

/// A shared, second-level home for credentials. See the [module docs](self).
///
/// Store errors never fail a request: the cache logs them and falls back to its source.
pub trait CredentialStore: Send + Sync + 'static {
    /// The stored credential, if any. The cache uses it only while it is not about to
    /// expire and is not the credential just rejected.
    fn load(&self) -> StoreFuture<'_, Option<Credential>>;

    /// Stores a credential the cache just fetched from its source.
    fn save<'a>(&'a self, credential: &'a Credential) -> StoreFuture<'a, ()>;

    /// Removes `rejected` if it is still the stored credential (compare-and-delete): a
    /// newer credential saved by someone else must survive.
    fn remove<'a>(&'a self, rejected: &'a Credential) -> StoreFuture<'a, ()>;
}

/// A [`CredentialStore`] in process memory, shared by clones.
#[derive(Clone, Default)]
pub struct MemoryStore {
    slot: Arc<Mutex<Option<Credential>>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Credential>> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("credential", &*self.slot())
            .finish()
    }
}

impl CredentialStore for MemoryStore {
    fn load(&self) -> StoreFuture<'_, Option<Credential>> {
        let current = self.slot().clone();
        Box::pin(async move { Ok(current) })
    }

    fn save<'a>(&'a self, credential: &'a Credential) -> StoreFuture<'a, ()> {
        *self.slot() = Some(credential.clone());
        Box::pin(async { Ok(()) })
    }

    fn remove<'a>(&'a self, rejected: &'a Credential) -> StoreFuture<'a, ()> {
        let mut slot = self.slot();
        if slot.as_ref() == Some(rejected) {
            *slot = None;
        }
        Box::pin(async { Ok(()) })
    }
}
