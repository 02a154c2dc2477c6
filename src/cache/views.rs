//! The per-clone views of a cache a service clone keeps: its view of the current entry
//! and its references to the cache for its requests.

use std::sync::Arc;

use arc_swap::ArcSwapOption;

use super::{CredentialCache, Entry, Inner};

/// One service clone's view of a cache's current entry: an [`arc_swap::Cache`], so that
/// the hot path checks one pointer against the shared one instead of loading it (a load
/// takes and releases a debt slot). It holds a reference to the entry it last saw, so a
/// replaced credential lives until this clone's next request; every change (a refresh,
/// an invalidation, a rotation) is seen on that next request.
pub(crate) struct LocalView<P> {
    view: arc_swap::Cache<CurrentSlot<P>, Option<Arc<Entry>>>,
}

/// What [`LocalView`] revalidates against: the cache's `current` slot.
struct CurrentSlot<P>(Arc<Inner<P>>);

impl<P> std::ops::Deref for CurrentSlot<P> {
    type Target = ArcSwapOption<Entry>;

    fn deref(&self) -> &ArcSwapOption<Entry> {
        &self.0.current
    }
}

impl<P> Clone for CurrentSlot<P> {
    fn clone(&self) -> Self {
        CurrentSlot(self.0.clone())
    }
}

impl<P> Clone for LocalView<P> {
    fn clone(&self) -> Self {
        LocalView {
            view: self.view.clone(),
        }
    }
}

impl<P> LocalView<P> {
    pub(crate) fn new(cache: &CredentialCache<P>) -> Self {
        LocalView {
            view: arc_swap::Cache::new(CurrentSlot(cache.inner.clone())),
        }
    }

    /// The current entry, revalidated.
    #[inline]
    pub(crate) fn load(&mut self) -> Option<&Entry> {
        self.view.load().as_deref()
    }
}

/// How a request reaches its cache if the API rejects its credential. Every request of a
/// source that can change holds one until its response arrives.
///
/// Cloning the [`CredentialCache`] for each request would count on one reference count
/// that every thread shares: a cache line written twice per request from every core. A
/// service clone that sends more than one request (a clone per worker, per connection,
/// kept in a struct) makes its own counted handle once, on its second request, and its
/// requests count on that instead, a line only its own thread writes. A clone made for a
/// single request (`svc.clone().oneshot(req)`) never allocates one.
pub(crate) enum CacheRef<P> {
    Shared(CredentialCache<P>),
    Local(Arc<CredentialCache<P>>),
}

impl<P> std::ops::Deref for CacheRef<P> {
    type Target = CredentialCache<P>;

    fn deref(&self) -> &CredentialCache<P> {
        match self {
            CacheRef::Shared(cache) => cache,
            CacheRef::Local(cache) => cache,
        }
    }
}

/// One service clone's source of [`CacheRef`]s. Not shared by clones: a clone may run on
/// another thread.
pub(crate) struct LocalRefs<P> {
    handle: Option<Arc<CredentialCache<P>>>,
    used: bool,
}

impl<P> LocalRefs<P> {
    pub(crate) fn new() -> Self {
        LocalRefs {
            handle: None,
            used: false,
        }
    }

    /// A reference to `cache` for one request.
    #[inline]
    pub(crate) fn get(&mut self, cache: &CredentialCache<P>) -> CacheRef<P> {
        match &self.handle {
            Some(handle) => CacheRef::Local(handle.clone()),
            None => self.first(cache),
        }
    }

    #[cold]
    #[inline(never)]
    fn first(&mut self, cache: &CredentialCache<P>) -> CacheRef<P> {
        if !self.used {
            self.used = true;
            return CacheRef::Shared(cache.clone());
        }
        let handle = Arc::new(cache.clone());
        self.handle = Some(handle.clone());
        CacheRef::Local(handle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StaticCredential;

    /// A service clone's first request counts on the shared cache; its second makes the
    /// clone's own handle, which every later request reuses.
    #[test]
    fn local_refs_make_one_handle_on_the_second_request() {
        let cache = CredentialCache::new(StaticCredential::bearer("t").unwrap());
        let mut refs = LocalRefs::new();
        assert!(matches!(refs.get(&cache), CacheRef::Shared(_)));
        let CacheRef::Local(second) = refs.get(&cache) else {
            panic!("the second request did not get the clone's own handle");
        };
        let CacheRef::Local(third) = refs.get(&cache) else {
            panic!("the third request did not reuse the clone's own handle");
        };
        assert!(Arc::ptr_eq(&second, &third));
        assert!(Arc::ptr_eq(&second.inner, &cache.inner));
    }
}
