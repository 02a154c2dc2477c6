//! The promises under a user's code that panics: a store that panics once (review 113;
//! the `on_refresh` hook's panic is in `edges.rs`).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering::SeqCst},
    },
    time::Duration,
};

use tower_client_auth::{
    BoxError, Credential, CredentialCache, FetchContext, RefreshSharing,
    store::{CredentialStore, Lease, MemoryStore},
};

/// A `MemoryStore` whose first save of a pair (a credential carrying a refresh token)
/// panics, after the source has already rotated that refresh token.
#[derive(Clone, Default)]
struct PanicsOnFirstPairSave {
    memory: MemoryStore,
    panicked: Arc<AtomicBool>,
}

impl CredentialStore for PanicsOnFirstPairSave {
    async fn load(&self) -> Result<Option<Credential>, BoxError> {
        self.memory.load().await
    }
    async fn lease(&self, ttl: Duration) -> Result<Option<Lease>, BoxError> {
        self.memory.lease(ttl).await
    }
    async fn save(&self, lease: &Lease, c: &Credential) -> Result<bool, BoxError> {
        if c.refresh_token().is_some() && !self.panicked.swap(true, SeqCst) {
            panic!("store bug: save panicked");
        }
        self.memory.save(lease, c).await
    }
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, BoxError> {
        self.memory.renew(lease, ttl).await
    }
    async fn release(&self, lease: &Lease) -> Result<(), BoxError> {
        self.memory.release(lease).await
    }
    async fn remove(&self, rejected: &Credential) -> Result<(), BoxError> {
        self.memory.remove(rejected).await
    }
}

/// A rotating source: presented `rt-N`, it answers `access-N+1` with `rt-N+1`; with no
/// refresh token, it logs in. Records what it was presented (`None`: a login).
fn rotating() -> (tower_client_auth::SourceFn, Arc<Mutex<Vec<Option<String>>>>) {
    let presented: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let source = tower_client_auth::source_fn({
        let presented = presented.clone();
        move |cx: FetchContext| {
            let answer = match cx.refresh_sharing() {
                RefreshSharing::Shared(token) => {
                    let token = token.map(|t| t.expose().to_owned());
                    presented.lock().unwrap().push(token.clone());
                    let n = match token.as_deref() {
                        Some(t) => t.trim_start_matches("rt-").parse::<u32>().unwrap() + 1,
                        None => 100,
                    };
                    Ok(Credential::bearer(format!("access-{n}"))
                        .unwrap()
                        .expires_in(Duration::from_secs(3600))
                        .with_refresh_token(format!("rt-{n}")))
                }
                other => Err(format!("not shared: {other:?}")),
            };
            async move { answer.map_err(BoxError::from) }
        }
    });
    (source, presented)
}

/// Promise: no lost refresh token. World: the store holds an expired `access-1` with
/// `rt-1`; the source rotates `rt-1` for `rt-2`; the store's save of that new pair panics
/// (once). Proves: a panicking save fails as a save that returns an error does: the
/// request gets the new credential, the pair is kept and saved again (the store holds
/// `rt-2` soon after), and the refresh after an invalidation presents `rt-2`, never a
/// login or the spent `rt-1`. Before, the unwinding refresh dropped the pair the source
/// had issued, which existed nowhere else once `rt-1` was spent.
#[tokio::test]
async fn a_store_save_that_panics_once_loses_no_refresh_token() {
    let store = PanicsOnFirstPairSave::default();
    let lease = store
        .memory
        .lease(Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    let expired = Credential::bearer("access-1")
        .unwrap()
        .with_refresh_token("rt-1")
        .expires_at(std::time::SystemTime::now() - Duration::from_secs(60));
    assert!(store.memory.save(&lease, &expired).await.unwrap());
    store.memory.release(&lease).await.unwrap();
    let (source, presented) = rotating();
    let cache = CredentialCache::builder(source)
        .store(store.clone())
        .fetch_timeout(Duration::from_millis(500))
        .backoff(Duration::from_millis(1), Duration::from_millis(1))
        .build()
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), cache.credential())
        .await
        .expect("the first request hung");
    assert!(store.panicked.load(SeqCst), "the save never ran: {first:?}");
    assert!(
        first.is_ok(),
        "the issued credential was not the answer: {first:?}"
    );
    let mut stored = None;
    for _ in 0..100 {
        stored = store.memory.load().await.unwrap();
        if stored
            .as_ref()
            .and_then(|c| c.refresh_token())
            .map(|t| t.expose())
            == Some("rt-2")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored_token = stored
        .as_ref()
        .and_then(|c| c.refresh_token())
        .map(|t| t.expose().to_owned());
    assert_eq!(
        stored_token.as_deref(),
        Some("rt-2"),
        "the kept pair never reached the store"
    );
    assert!(cache.handle().invalidate());
    let second = tokio::time::timeout(Duration::from_secs(10), cache.credential())
        .await
        .expect("the second request hung");
    assert!(second.is_ok(), "{second:?}");
    let presented = presented.lock().unwrap().clone();
    assert_eq!(
        presented,
        [Some("rt-1".to_owned()), Some("rt-2".to_owned())],
        "the refresh token issued before the store's panic was lost"
    );
}

/// A `MemoryStore` whose `changed` panics, counting its loads.
#[derive(Clone, Default)]
struct ChangedPanics {
    memory: MemoryStore,
    loads: Arc<std::sync::atomic::AtomicUsize>,
}

impl CredentialStore for ChangedPanics {
    async fn load(&self) -> Result<Option<Credential>, BoxError> {
        self.loads.fetch_add(1, SeqCst);
        self.memory.load().await
    }
    async fn lease(&self, ttl: Duration) -> Result<Option<Lease>, BoxError> {
        self.memory.lease(ttl).await
    }
    async fn save(&self, lease: &Lease, c: &Credential) -> Result<bool, BoxError> {
        self.memory.save(lease, c).await
    }
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, BoxError> {
        self.memory.renew(lease, ttl).await
    }
    async fn release(&self, lease: &Lease) -> Result<(), BoxError> {
        self.memory.release(lease).await
    }
    async fn remove(&self, rejected: &Credential) -> Result<(), BoxError> {
        self.memory.remove(rejected).await
    }
    #[allow(clippy::manual_async_fn)]
    fn changed(&self, _timeout: Duration) -> impl std::future::Future<Output = ()> + Send {
        async { panic!("store bug: changed panicked") }
    }
}

/// World: another process holds the fleet's lease; this process's store's `changed`
/// panics (guarded since review 113: "a panic is a wake"). Proves: the waiter still
/// paces its looks at the store (20 ms doubling to 250 ms: about a dozen in 1.5 s),
/// rather than calling the store in a loop with no pause until its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_whose_changed_panics_is_not_polled_in_a_hot_loop() {
    let store = ChangedPanics::default();
    let held = store.memory.lease(Duration::from_secs(30)).await.unwrap();
    assert!(held.is_some(), "the other process's lease");
    let cache = CredentialCache::builder(crate::support::TestSource::new())
        .store(store.clone())
        .fetch_timeout(Duration::from_millis(1500))
        .build()
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), cache.credential())
        .await
        .expect("bounded by the fetch timeout");
    let loads = store.loads.load(SeqCst);
    assert!(
        loads <= 40,
        "{loads} store loads in one 1.5 s wait for another holder (got {:?}): the panicking \
         `changed` is a wake with no pause",
        got.map(|_| ())
    );
}

/// A `MemoryStore` whose every `save` panics.
#[derive(Clone, Default)]
struct SavePanics {
    memory: MemoryStore,
}

impl CredentialStore for SavePanics {
    async fn load(&self) -> Result<Option<Credential>, BoxError> {
        self.memory.load().await
    }
    async fn lease(&self, ttl: Duration) -> Result<Option<Lease>, BoxError> {
        self.memory.lease(ttl).await
    }
    async fn save(&self, _lease: &Lease, _c: &Credential) -> Result<bool, BoxError> {
        panic!("store bug: save panicked")
    }
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, BoxError> {
        self.memory.renew(lease, ttl).await
    }
    async fn release(&self, lease: &Lease) -> Result<(), BoxError> {
        self.memory.release(lease).await
    }
    async fn remove(&self, rejected: &Credential) -> Result<(), BoxError> {
        self.memory.remove(rejected).await
    }
}

/// World: a process's store panics in `save` while it holds the lease (a credential
/// with no refresh token: nothing to keep saving). Proves: the lease is released, so
/// another process waiting for it refreshes at once rather than after the lease's TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_that_panics_under_the_lease_releases_it() {
    let store = SavePanics::default();
    let one = CredentialCache::builder(crate::support::TestSource::new())
        .store(store.clone())
        .fetch_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), one.credential())
        .await
        .expect("bounded")
        .expect("the fetch's credential, though the save panicked");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let free = store.memory.lease(Duration::from_secs(1)).await.unwrap();
    assert!(
        free.is_some(),
        "the lease is still held after a panicking save"
    );
    store.memory.release(&free.unwrap()).await.unwrap();
    let two = CredentialCache::builder(crate::support::TestSource::new())
        .store(store.clone())
        .fetch_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let at = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), two.credential())
        .await
        .expect("bounded")
        .unwrap();
    assert!(
        at.elapsed() < Duration::from_millis(500),
        "waited {:?}",
        at.elapsed()
    );
}

/// A `MemoryStore` whose every save of a pair panics (a store broken for good).
#[derive(Clone, Default)]
struct AlwaysPanicsOnPairSave {
    memory: MemoryStore,
}

impl CredentialStore for AlwaysPanicsOnPairSave {
    async fn load(&self) -> Result<Option<Credential>, BoxError> {
        self.memory.load().await
    }
    async fn lease(&self, ttl: Duration) -> Result<Option<Lease>, BoxError> {
        self.memory.lease(ttl).await
    }
    async fn save(&self, lease: &Lease, c: &Credential) -> Result<bool, BoxError> {
        if c.refresh_token().is_some() {
            panic!("store bug: save panicked");
        }
        self.memory.save(lease, c).await
    }
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, BoxError> {
        self.memory.renew(lease, ttl).await
    }
    async fn release(&self, lease: &Lease) -> Result<(), BoxError> {
        self.memory.release(lease).await
    }
    async fn remove(&self, rejected: &Credential) -> Result<(), BoxError> {
        self.memory.remove(rejected).await
    }
}

/// World: every pair save of the store panics; the source rotates `rt-1` for `rt-2`,
/// then an invalidation. Proves: no refresh token is lost: the next refresh presents
/// `rt-2` (kept in memory), never the spent `rt-1`, nor logs in (review 118, held).
#[tokio::test]
async fn a_store_whose_pair_saves_always_panic_loses_no_refresh_token() {
    let store = AlwaysPanicsOnPairSave::default();
    let lease = store
        .memory
        .lease(Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    let expired = Credential::bearer("access-1")
        .unwrap()
        .with_refresh_token("rt-1")
        .expires_at(std::time::SystemTime::now() - Duration::from_secs(60));
    assert!(store.memory.save(&lease, &expired).await.unwrap());
    store.memory.release(&lease).await.unwrap();
    let (source, presented) = rotating();
    let cache = CredentialCache::builder(source)
        .store(store.clone())
        .fetch_timeout(Duration::from_millis(500))
        .backoff(Duration::from_millis(1), Duration::from_millis(1))
        .build()
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), cache.credential())
        .await
        .expect("hung");
    assert!(first.is_ok(), "{first:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(cache.handle().invalidate());
    let second = tokio::time::timeout(Duration::from_secs(10), cache.credential())
        .await
        .expect("hung");
    assert!(second.is_ok(), "{second:?}");
    let presented = presented.lock().unwrap().clone();
    assert_eq!(
        presented.get(1).cloned().flatten().as_deref(),
        Some("rt-2"),
        "{presented:?}"
    );
}
