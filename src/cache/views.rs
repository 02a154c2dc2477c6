//! The per-clone views of a cache a service clone keeps: its view of the current entry
//! and its references to the cache for its requests.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use arc_swap::{ArcSwapOption, Guard};

use super::{CredentialCache, Entry, Inner};

/// The cache's current entry and a count of its changes. Every change goes through
/// [`store`](Self::store), which counts it after it is made, so a view that read count
/// `n` and then loaded the entry holds that change or a later one.
pub(super) struct CurrentSlot {
    entry: ArcSwapOption<Entry>,
    changes: AtomicU64,
}

impl CurrentSlot {
    pub(super) fn empty() -> Self {
        CurrentSlot {
            entry: ArcSwapOption::empty(),
            changes: AtomicU64::new(0),
        }
    }

    pub(super) fn load(&self) -> Guard<Option<Arc<Entry>>> {
        self.entry.load()
    }

    pub(super) fn load_full(&self) -> Option<Arc<Entry>> {
        self.entry.load_full()
    }

    pub(super) fn store(&self, entry: Option<Arc<Entry>>) {
        self.entry.store(entry);
        self.changes.fetch_add(1, Ordering::Release);
    }
}

/// One service clone's view of a cache's current entry: the hot path reads the slot's
/// change count (one load) instead of loading the entry (a load takes and releases a
/// debt slot). It holds a reference to the entry it last saw, so a replaced credential
/// lives until this clone's next request; every change (a refresh, an invalidation, a
/// rotation) is seen on that next request.
pub(crate) struct LocalView<P> {
    inner: Arc<Inner<P>>,
    seen: u64,
    entry: Option<Arc<Entry>>,
}

impl<P> Clone for LocalView<P> {
    fn clone(&self) -> Self {
        LocalView {
            inner: self.inner.clone(),
            seen: self.seen,
            entry: self.entry.clone(),
        }
    }
}

impl<P> LocalView<P> {
    pub(crate) fn new(cache: &CredentialCache<P>) -> Self {
        let mut view = LocalView {
            inner: cache.inner.clone(),
            seen: 0,
            entry: None,
        };
        view.reload(view.inner.current.changes.load(Ordering::Acquire));
        view
    }

    /// The current entry, as of the last change counted.
    #[inline]
    pub(crate) fn load(&mut self) -> Option<&Entry> {
        let changes = self.inner.current.changes.load(Ordering::Acquire);
        if changes != self.seen {
            self.reload(changes);
        }
        self.entry.as_deref()
    }

    /// The entry of the last [`load`](Self::load), without looking for a change: what a
    /// service readied in `poll_ready` sends in `call`.
    #[inline]
    pub(crate) fn held(&self) -> Option<&Entry> {
        self.entry.as_deref()
    }

    #[cold]
    #[inline(never)]
    fn reload(&mut self, changes: u64) {
        self.entry = self.inner.current.load_full();
        self.seen = changes;
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

    /// A view sees every change of the current entry on its next load: the first fetch,
    /// a rotation pushed from outside, a rejection, an invalidation; a clone made before
    /// a change sees it too.
    #[tokio::test]
    async fn a_view_sees_every_change_on_its_next_load() {
        use crate::{Credential, RotatingCredential};
        let bearer = |t| Credential::bearer(t).unwrap();
        let rotating = RotatingCredential::new(bearer("one"));
        let cache = CredentialCache::new(rotating.clone());
        let mut view = LocalView::new(&cache);
        let mut early = view.clone();
        let seen = |view: &mut LocalView<_>| view.load().map(|e| e.credential.clone());
        assert_eq!(seen(&mut view), None);
        cache.credential().await.unwrap();
        assert_eq!(seen(&mut view), Some(bearer("one")));
        rotating.rotate(bearer("two")).unwrap();
        assert_eq!(seen(&mut view), Some(bearer("two")));
        assert_eq!(seen(&mut early), Some(bearer("two")));
        assert_eq!(seen(&mut view.clone()), Some(bearer("two")));
        // A rejection invalidates the credential and installs a new entry (the same
        // value from this source, under a new generation).
        let generation = |view: &mut LocalView<_>| view.load().map(|e| e.generation);
        let before = generation(&mut view);
        cache.reject(&bearer("two")).await.unwrap();
        assert_ne!(generation(&mut view), before, "the rejection went unseen");
        assert_eq!(generation(&mut early), generation(&mut view));
        assert!(cache.handle().invalidate());
        assert_eq!(seen(&mut view), None);
        assert_eq!(seen(&mut early), None);
    }

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
