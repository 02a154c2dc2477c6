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
//! let a = CredentialCache::builder(StaticCredential::bearer("t")?).store(store.clone()).build()?;
//! let b = CredentialCache::builder(StaticCredential::bearer("t")?).store(store).build()?;
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

/// A shared, second-level home for credentials. See the [module docs](self).
///
/// Implement it with `async fn`s, as [`CredentialSource`](crate::CredentialSource) is.
/// Store errors never fail a request: the cache logs them and falls back to its source.
pub trait CredentialStore: Send + Sync + 'static {
    /// The stored credential, if any. The cache uses it only while it is not about to
    /// expire and is not the credential just rejected.
    fn load(&self) -> impl Future<Output = Result<Option<Credential>, BoxError>> + Send;

    /// Stores a credential the cache just fetched from its source.
    fn save(&self, credential: &Credential) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Removes `rejected` if it is still the stored credential (compare-and-delete): a
    /// newer credential saved by someone else must survive.
    fn remove(&self, rejected: &Credential) -> impl Future<Output = Result<(), BoxError>> + Send;
}

/// A boxed store call: how the cache holds any store behind one pointer.
pub(crate) type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send + 'a>>;

/// [`CredentialStore`] in a form that can live behind `dyn`: every store is one.
pub(crate) trait DynStore: Send + Sync + 'static {
    fn load(&self) -> StoreFuture<'_, Option<Credential>>;
    fn save<'a>(&'a self, credential: &'a Credential) -> StoreFuture<'a, ()>;
    fn remove<'a>(&'a self, rejected: &'a Credential) -> StoreFuture<'a, ()>;
}

impl<S: CredentialStore> DynStore for S {
    fn load(&self) -> StoreFuture<'_, Option<Credential>> {
        Box::pin(CredentialStore::load(self))
    }

    fn save<'a>(&'a self, credential: &'a Credential) -> StoreFuture<'a, ()> {
        Box::pin(CredentialStore::save(self, credential))
    }

    fn remove<'a>(&'a self, rejected: &'a Credential) -> StoreFuture<'a, ()> {
        Box::pin(CredentialStore::remove(self, rejected))
    }
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
    async fn load(&self) -> Result<Option<Credential>, BoxError> {
        Ok(self.slot().clone())
    }

    async fn save(&self, credential: &Credential) -> Result<(), BoxError> {
        *self.slot() = Some(credential.clone());
        Ok(())
    }

    async fn remove(&self, rejected: &Credential) -> Result<(), BoxError> {
        let mut slot = self.slot();
        if slot.as_ref() == Some(rejected) {
            *slot = None;
        }
        Ok(())
    }
}
