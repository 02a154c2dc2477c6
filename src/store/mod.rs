//! The storage seam behind the cache: where credentials are shared beyond one process.
//!
//! A [`CredentialCache`](crate::CredentialCache) always keeps the current credential in
//! memory, where the hot path reads it without locks. A [`CredentialStore`] is a second,
//! shared level consulted only on the refresh path. With one, a refresh goes:
//!
//! 1. **Load.** Another process (or another cache) may have saved a fresh credential
//!    already: if it may still be sent (and is not the one just rejected), it is used.
//! 2. **Lease.** Otherwise the cache takes the store's refresh lease, for a time longer
//!    than a whole fetch can take. Holding it, the cache loads once more (someone may have
//!    saved just before), then asks its source, **saves under the lease** (a holder whose
//!    lease ran out and was taken over cannot overwrite a newer credential: the save is
//!    fenced) and gives the lease back. While it works it renews the lease every third of
//!    its time, so the lease is short: a holder that dies is taken over within seconds.
//! 3. **Wait.** When another caller holds the lease, the cache waits for what it saves:
//!    woken by the store when it can tell (`changed`), else looking again at growing
//!    intervals, for as long as its whole fetch timeout: one
//!    fetch for every process sharing the store. A holder that died leaves a lease that
//!    runs out; the next cache to look takes it over.
//! 4. **Hold.** A token endpoint that answers the holder with a `Retry-After` (429, 503,
//!    a throttled grant) has spoken to the whole fleet, which shares one client: the
//!    holder records the time in the store ([`CredentialStore::hold`]), and every
//!    holder reads it before it asks its source, so no process of the fleet sends a
//!    token request before then.
//!
//! When the API rejects a credential, the cache removes that credential from the store,
//! and only that one (compare-and-delete): a newer one saved by another process stays.
//! A store that fails or does not answer in time is logged once per outage, never per
//! request, and the cache fetches on its own meanwhile (each process's own single
//! flight); the next refresh tries the store again.
//!
//! [`MemoryStore`] implements the contract within one process. With the `redis` feature,
//! [`redis::RedisStore`] implements it across processes on a real Redis; with
//! `file-store`, [`file::FileStore`] across the processes of one host, in a locked file.
//! Another engine (a SQL table, etcd) implements the six calls below (and the hold's two,
//! to share it; and `save_left` / `load_left` when it keeps a clock of its own that
//! every process can read, to count a shared credential's time on it); `MemoryStore`'s
//! source is the reference.
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
    time::{Duration, Instant, SystemTime},
};

use crate::{clock::WallClock, credential::Credential, error::BoxError};

#[cfg(any(feature = "redis", feature = "file-store"))]
mod codec;
#[cfg(feature = "file-store")]
#[cfg_attr(docsrs, doc(cfg(feature = "file-store")))]
pub mod file;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;

/// A shared, second-level home for credentials, with the lease that makes one fetch
/// serve every process. See the [module docs](self) for how the cache uses each call.
///
/// Implement it with `async fn`s, as [`CredentialSource`](crate::CredentialSource) is.
/// Store errors never fail a request: the cache logs them and fetches on its own.
pub trait CredentialStore: Send + Sync + 'static {
    /// The stored credential, if any. The cache uses it only while it may still be sent
    /// and is not the credential just rejected. It reads what the last save or removal
    /// left (read from the primary, never a replica that may lag): a pair this process
    /// keeps through an outage is saved over a store that reads as empty, taken for one
    /// that restarted empty, and a read that missed a record another process wrote when
    /// it took the pair's refresh token out would put that spent token back.
    fn load(&self) -> impl Future<Output = Result<Option<Credential>, BoxError>> + Send;

    /// Takes the refresh lease for `ttl` if nobody holds it: `Some(lease)`. `None` when
    /// another caller holds it (the cache then waits for what that caller saves). A lease
    /// that is not given back runs out after `ttl`, so a holder that died is taken over.
    fn lease(&self, ttl: Duration) -> impl Future<Output = Result<Option<Lease>, BoxError>> + Send;

    /// Stores `credential`, fetched under `lease`, only if `lease` is still held (fenced):
    /// `Ok(false)`, and nothing written, when it ran out (and perhaps was taken over).
    fn save(
        &self,
        lease: &Lease,
        credential: &Credential,
    ) -> impl Future<Output = Result<bool, BoxError>> + Send;

    /// Extends `lease` to run out `ttl` from now, only if it is still held
    /// (compare-and-extend on its token): `Ok(false)` when it ran out already. The cache
    /// renews a lease every third of its time while the holder works, so a lease can be
    /// short (a holder that dies is taken over soon) and a slow holder still keeps it.
    fn renew(
        &self,
        lease: &Lease,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, BoxError>> + Send;

    /// Gives `lease` back, if it is still held (compare-and-delete on its token).
    fn release(&self, lease: &Lease) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Removes `rejected` if it is still the stored credential (compare-and-delete; a
    /// store that keeps a fingerprint compares that, never the secret): a newer credential
    /// saved by someone else must survive.
    fn remove(&self, rejected: &Credential) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Waits until what is stored may have changed (a save, a release, a removal, here or
    /// in another process) since this call, or for `timeout`, whichever comes first. The
    /// cache calls it before it looks at the store, and awaits it when another holder
    /// refreshes: a store that can be told of changes should register when `changed` is
    /// called, not when its future is first polled, so that a change between the look
    /// and the wait is not missed. The default waits out `timeout`: the cache then polls.
    /// A missed notification only costs that one `timeout`.
    fn changed(&self, timeout: Duration) -> impl Future<Output = ()> + Send {
        tokio::time::sleep(timeout)
    }

    /// Records the token endpoint's word that no token request be made before `until`
    /// (its `Retry-After`, told to the lease holder whose request it answered), for
    /// every process: it replaces the one recorded (the endpoint's latest word wins,
    /// even when it names an earlier time: a wall clock stepped back meanwhile), and the
    /// record may go [`MAX_RETRY_AFTER`](crate::cache::MAX_RETRY_AFTER) after it is
    /// written. `until` is on the writer's clock (its cache's
    /// [`Clock`](crate::clock::Clock)), which the store does not judge. The cache calls
    /// it under the lease, and before the holder asks its source it reads the record
    /// back ([`held_until`](Self::held_until)): a holder inside the hold asks nothing and
    /// fails its callers with [`ErrorKind::Backoff`](crate::ErrorKind::Backoff) until
    /// then.
    ///
    /// The default records nothing: each process then holds back on its own, and the
    /// next lease holder of the fleet may ask the endpoint inside the hold.
    fn hold(&self, until: SystemTime) -> impl Future<Output = Result<(), BoxError>> + Send {
        let _ = until;
        std::future::ready(Ok(()))
    }

    /// The time [`hold`](Self::hold) recorded, if any (one already past may be
    /// returned: the cache compares it with its clock). The default: none.
    fn held_until(&self) -> impl Future<Output = Result<Option<SystemTime>, BoxError>> + Send {
        std::future::ready(Ok(None))
    }

    /// [`hold`](Self::hold), told also the time the hold has left (`until` less the
    /// writer's clock now). What the cache calls. A store whose server keeps time of its
    /// own (Redis) keeps the hold for that long on its clock, so that processes whose
    /// wall clocks disagree are held alike (with [`held_left`](Self::held_left)). The
    /// default: `hold(until)`.
    fn hold_left(
        &self,
        until: SystemTime,
        left: Duration,
    ) -> impl Future<Output = Result<(), BoxError>> + Send {
        let _ = left;
        self.hold(until)
    }

    /// [`held_until`](Self::held_until), with the time the hold has left by the store's
    /// own clock, when it keeps one (see [`hold_left`](Self::hold_left)): the reader
    /// then counts that, not `until` against its own wall clock. What the cache calls.
    /// The default: `held_until()`, no time left known.
    fn held_left(
        &self,
    ) -> impl Future<Output = Result<Option<(SystemTime, Option<Duration>)>, BoxError>> + Send {
        async { Ok(self.held_until().await?.map(|until| (until, None))) }
    }

    /// [`save`](Self::save), told also the time `credential` has left: its expiry less
    /// the writer's clock now (its cache's [`Clock`](crate::clock::Clock)); zero when it
    /// has expired, `None` when it does not expire. What the cache calls. A store whose
    /// server keeps time of its own (Redis) records when the credential ends on that
    /// clock, so that a process whose wall clock disagrees with the writer's counts what
    /// is left of it ([`load_left`](Self::load_left)). The default: `save`.
    fn save_left(
        &self,
        lease: &Lease,
        credential: &Credential,
        left: Option<Duration>,
    ) -> impl Future<Output = Result<bool, BoxError>> + Send {
        let _ = left;
        self.save(lease, credential)
    }

    /// [`load`](Self::load), with the time the stored credential has left by the store's
    /// own clock, when it keeps one (see [`save_left`](Self::save_left)): the cache then
    /// counts its expiry from its own clock now, and moves its issue time by as much (its
    /// lifetime unchanged), whatever the writer's clock said. The default: `load()`, no
    /// time left known (the times are taken as written).
    fn load_left(
        &self,
    ) -> impl Future<Output = Result<Option<(Credential, Option<Duration>)>, BoxError>> + Send {
        async { Ok(self.load().await?.map(|credential| (credential, None))) }
    }
}

/// A refresh lease, named by a token unique to its holder: what fences a save.
#[derive(Clone, PartialEq, Eq)]
pub struct Lease {
    token: String,
}

impl Lease {
    /// A lease with a fresh token: unique across processes and hosts (the process id,
    /// the time, a counter and randomness from the OS, hashed).
    pub fn new() -> Self {
        use std::{
            hash::{BuildHasher, Hasher},
            sync::atomic::{AtomicU64, Ordering},
        };
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut words = [0u64; 2];
        for (i, word) in words.iter_mut().enumerate() {
            // Each `RandomState` is seeded from the OS's randomness.
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(i as u64);
            h.write_u32(std::process::id());
            h.write_u64(nanos);
            h.write_u64(count);
            *word = h.finish();
        }
        Lease {
            token: format!("{:016x}{:016x}", words[0], words[1]),
        }
    }

    /// A lease with a token of the store's own making.
    pub fn from_token(token: impl Into<String>) -> Self {
        Lease {
            token: token.into(),
        }
    }

    /// The holder's token.
    pub fn token(&self) -> &str {
        &self.token
    }
}

impl Default for Lease {
    fn default() -> Self {
        Lease::new()
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not a secret, but what a late holder would need to pass the fence: kept short.
        f.debug_tuple("Lease")
            .field(&self.token.get(..4).unwrap_or(""))
            .finish()
    }
}

/// A boxed store call: how the cache holds any store behind one pointer.
pub(crate) type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send + 'a>>;

/// [`CredentialStore`] in a form that can live behind `dyn`: every store is one.
pub(crate) trait DynStore: Send + Sync + 'static {
    fn load(&self) -> StoreFuture<'_, Option<Credential>>;
    fn lease(&self, ttl: Duration) -> StoreFuture<'_, Option<Lease>>;
    fn save<'a>(&'a self, lease: &'a Lease, credential: &'a Credential) -> StoreFuture<'a, bool>;
    fn renew<'a>(&'a self, lease: &'a Lease, ttl: Duration) -> StoreFuture<'a, bool>;
    fn release<'a>(&'a self, lease: &'a Lease) -> StoreFuture<'a, ()>;
    fn remove<'a>(&'a self, rejected: &'a Credential) -> StoreFuture<'a, ()>;
    fn changed(&self, timeout: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    fn hold_left(&self, until: SystemTime, left: Duration) -> StoreFuture<'_, ()>;
    fn held_left(&self) -> StoreFuture<'_, Option<(SystemTime, Option<Duration>)>>;
    fn save_left<'a>(
        &'a self,
        lease: &'a Lease,
        credential: &'a Credential,
        left: Option<Duration>,
    ) -> StoreFuture<'a, bool>;
    fn load_left(&self) -> StoreFuture<'_, Option<(Credential, Option<Duration>)>>;
}

impl<S: CredentialStore> DynStore for S {
    fn load(&self) -> StoreFuture<'_, Option<Credential>> {
        guarded(move || CredentialStore::load(self))
    }

    fn lease(&self, ttl: Duration) -> StoreFuture<'_, Option<Lease>> {
        guarded(move || CredentialStore::lease(self, ttl))
    }

    fn save<'a>(&'a self, lease: &'a Lease, credential: &'a Credential) -> StoreFuture<'a, bool> {
        guarded(move || CredentialStore::save(self, lease, credential))
    }

    fn renew<'a>(&'a self, lease: &'a Lease, ttl: Duration) -> StoreFuture<'a, bool> {
        guarded(move || CredentialStore::renew(self, lease, ttl))
    }

    fn release<'a>(&'a self, lease: &'a Lease) -> StoreFuture<'a, ()> {
        guarded(move || CredentialStore::release(self, lease))
    }

    fn remove<'a>(&'a self, rejected: &'a Credential) -> StoreFuture<'a, ()> {
        guarded(move || CredentialStore::remove(self, rejected))
    }

    fn changed(&self, timeout: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        // Called now, not at the first poll: the contract is that a change between this
        // call and the wait is not missed. A panic (making the future or polling it)
        // waits out `timeout`, as the default does: the waiter's looks stay paced.
        let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            CredentialStore::changed(self, timeout)
        }));
        Box::pin(async move {
            let woke = match made {
                Ok(wait) => {
                    let wait = std::panic::AssertUnwindSafe(wait);
                    futures_util::FutureExt::catch_unwind(wait).await.is_ok()
                }
                Err(_) => false,
            };
            if !woke {
                tokio::time::sleep(timeout).await;
            }
        })
    }

    fn hold_left(&self, until: SystemTime, left: Duration) -> StoreFuture<'_, ()> {
        guarded(move || CredentialStore::hold_left(self, until, left))
    }

    fn held_left(&self) -> StoreFuture<'_, Option<(SystemTime, Option<Duration>)>> {
        guarded(move || CredentialStore::held_left(self))
    }

    fn save_left<'a>(
        &'a self,
        lease: &'a Lease,
        credential: &'a Credential,
        left: Option<Duration>,
    ) -> StoreFuture<'a, bool> {
        guarded(move || CredentialStore::save_left(self, lease, credential, left))
    }

    fn load_left(&self) -> StoreFuture<'_, Option<(Credential, Option<Duration>)>> {
        guarded(move || CredentialStore::load_left(self))
    }
}

/// A store as a cache calls it: a credential's times cross it on the store's clock when
/// it keeps one. Each save tells the store how long the credential has left by the
/// cache's clock ([`CredentialStore::save_left`]); each load that learns how long a
/// credential has left by the store's clock counts its expiry from the cache's clock now
/// ([`CredentialStore::load_left`]). Processes whose wall clocks disagree then agree on
/// when a shared credential ends, to within a store call.
pub(crate) struct OnClock {
    store: Arc<dyn DynStore>,
    clock: WallClock,
}

impl OnClock {
    pub(crate) fn new(store: Arc<dyn DynStore>, clock: WallClock) -> Self {
        OnClock { store, clock }
    }
}

impl DynStore for OnClock {
    fn load(&self) -> StoreFuture<'_, Option<Credential>> {
        Box::pin(async move {
            Ok(self
                .store
                .load_left()
                .await?
                .map(|(credential, left)| match left {
                    Some(left) => counted_from(credential, left, self.clock.now()),
                    None => credential,
                }))
        })
    }

    fn lease(&self, ttl: Duration) -> StoreFuture<'_, Option<Lease>> {
        self.store.lease(ttl)
    }

    fn save<'a>(&'a self, lease: &'a Lease, credential: &'a Credential) -> StoreFuture<'a, bool> {
        // Never more than its lifetime: one issued in this clock's future is not counted
        // valid longer than that from now (as the cache counts it, `believed_expiry`).
        let now = self.clock.now();
        let left = (credential.expiry()).map(|at| {
            let left = at.duration_since(now).unwrap_or_default();
            credential
                .lifetime()
                .map_or(left, |lifetime| left.min(lifetime))
        });
        self.store.save_left(lease, credential, left)
    }

    fn renew<'a>(&'a self, lease: &'a Lease, ttl: Duration) -> StoreFuture<'a, bool> {
        self.store.renew(lease, ttl)
    }

    fn release<'a>(&'a self, lease: &'a Lease) -> StoreFuture<'a, ()> {
        self.store.release(lease)
    }

    fn remove<'a>(&'a self, rejected: &'a Credential) -> StoreFuture<'a, ()> {
        self.store.remove(rejected)
    }

    fn changed(&self, timeout: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        self.store.changed(timeout)
    }

    fn hold_left(&self, until: SystemTime, left: Duration) -> StoreFuture<'_, ()> {
        self.store.hold_left(until, left)
    }

    fn held_left(&self) -> StoreFuture<'_, Option<(SystemTime, Option<Duration>)>> {
        self.store.held_left()
    }

    fn save_left<'a>(
        &'a self,
        lease: &'a Lease,
        credential: &'a Credential,
        left: Option<Duration>,
    ) -> StoreFuture<'a, bool> {
        self.store.save_left(lease, credential, left)
    }

    fn load_left(&self) -> StoreFuture<'_, Option<(Credential, Option<Duration>)>> {
        self.store.load_left()
    }
}

/// `credential` with `left` to live from `now`: its expiry moved to `now + left` and its
/// issue time by as much (its lifetime kept). With nothing left, an expiry already past
/// by `now` is kept (the record a holder leaves, at the epoch, stays as written), else it
/// becomes `now`.
fn counted_from(credential: Credential, left: Duration, now: SystemTime) -> Credential {
    let Some(expiry) = credential.expiry() else {
        return credential;
    };
    let lifetime = credential.lifetime();
    let ends = match now.checked_add(left) {
        _ if left.is_zero() => expiry.min(now),
        Some(ends) => ends,
        None => return credential,
    };
    let moved = credential.expires_at(ends);
    match lifetime.and_then(|lifetime| ends.checked_sub(lifetime)) {
        Some(issued) => moved.issued_at(issued),
        None => moved,
    }
}

/// A store call that panics (making its future, or polling it) fails as one that
/// returned an error does: a panicking `save` leaves the pair it was given kept and
/// saved again, as a failed one does, where an unwinding refresh would drop it (and a
/// rotated refresh token with it).
fn guarded<'a, T, F>(call: impl FnOnce() -> F + Send + 'a) -> StoreFuture<'a, T>
where
    F: Future<Output = Result<T, BoxError>> + Send + 'a,
{
    Box::pin(async move {
        let call = std::panic::AssertUnwindSafe(async move { call().await });
        futures_util::FutureExt::catch_unwind(call)
            .await
            .unwrap_or_else(|_| Err("the credential store panicked".into()))
    })
}

/// A [`CredentialStore`] in process memory, shared by clones: the contract within one
/// process (several caches over one source fetch once), and the reference for a store of
/// one's own.
#[derive(Clone, Default)]
pub struct MemoryStore {
    slot: Arc<Mutex<Slot>>,
    /// Wakes the callers of [`CredentialStore::changed`].
    changes: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct Slot {
    credential: Option<Credential>,
    /// The lease's token and when it runs out.
    lease: Option<(String, Instant)>,
    /// The token endpoint's hold (see [`CredentialStore::hold`]).
    hold: Option<SystemTime>,
}

impl Slot {
    /// The lease's token, if it is held and has not run out.
    fn holder(&self, now: Instant) -> Option<&str> {
        self.lease
            .as_ref()
            .filter(|(_, until)| now < *until)
            .map(|(token, _)| token.as_str())
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let slot = self.slot();
        f.debug_struct("MemoryStore")
            .field("credential", &slot.credential)
            .field("leased", &slot.holder(Instant::now()).is_some())
            .finish()
    }
}

/// `ttl` from `now`, or a day when that is past what an `Instant` holds.
fn until(now: Instant, ttl: Duration) -> Instant {
    now.checked_add(ttl)
        .unwrap_or(now + Duration::from_secs(86_400))
}

impl CredentialStore for MemoryStore {
    async fn load(&self) -> Result<Option<Credential>, BoxError> {
        Ok(self.slot().credential.clone())
    }

    async fn lease(&self, ttl: Duration) -> Result<Option<Lease>, BoxError> {
        let now = Instant::now();
        let mut slot = self.slot();
        if slot.holder(now).is_some() {
            return Ok(None);
        }
        let lease = Lease::new();
        slot.lease = Some((lease.token.clone(), until(now, ttl)));
        Ok(Some(lease))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, BoxError> {
        let now = Instant::now();
        let mut slot = self.slot();
        if slot.holder(now) != Some(lease.token()) {
            return Ok(false);
        }
        slot.lease = Some((lease.token.clone(), until(now, ttl)));
        Ok(true)
    }

    async fn save(&self, lease: &Lease, credential: &Credential) -> Result<bool, BoxError> {
        let mut slot = self.slot();
        if slot.holder(Instant::now()) != Some(lease.token()) {
            return Ok(false);
        }
        slot.credential = Some(credential.clone());
        self.changes.notify_waiters();
        Ok(true)
    }

    async fn release(&self, lease: &Lease) -> Result<(), BoxError> {
        let mut slot = self.slot();
        if slot
            .lease
            .as_ref()
            .is_some_and(|(token, _)| token == lease.token())
        {
            slot.lease = None;
            self.changes.notify_waiters();
        }
        Ok(())
    }

    async fn remove(&self, rejected: &Credential) -> Result<(), BoxError> {
        let mut slot = self.slot();
        if slot.credential.as_ref() == Some(rejected) {
            slot.credential = None;
            self.changes.notify_waiters();
        }
        Ok(())
    }

    async fn hold(&self, until: SystemTime) -> Result<(), BoxError> {
        self.slot().hold = Some(until);
        Ok(())
    }

    async fn held_until(&self) -> Result<Option<SystemTime>, BoxError> {
        Ok(self.slot().hold)
    }

    fn changed(&self, timeout: Duration) -> impl Future<Output = ()> + Send {
        // Registered now: a change from here on wakes it.
        let mut notified = Box::pin(self.changes.notified());
        notified.as_mut().enable();
        async move {
            let _ = tokio::time::timeout(timeout, notified).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// A credential written on a clock an hour ahead, read with 10 minutes left: its
    /// expiry is 10 minutes from the reader's now, its lifetime unchanged.
    #[test]
    fn counted_from_moves_expiry_and_issue_alike() {
        let written = Credential::bearer("t").unwrap().lives(at(10_000), HOUR);
        let now = at(5_000);
        let read = counted_from(written, Duration::from_secs(600), now);
        assert_eq!(read.expiry(), Some(at(5_600)));
        assert_eq!(read.lifetime(), Some(HOUR));
        assert_eq!(read.issued(), Some(at(5_600 - 3600)));
    }

    /// Nothing left: an expiry already past by the reader's clock stays where it is (the
    /// marker at the epoch), one still ahead becomes now; a credential without expiry,
    /// or without issue time, is kept as it is, or moved alone.
    #[test]
    fn counted_from_with_nothing_left_or_no_times() {
        let marker = Credential::bearer("m")
            .unwrap()
            .expires_at(SystemTime::UNIX_EPOCH);
        let now = at(5_000);
        let read = counted_from(marker, Duration::ZERO, now);
        assert_eq!(read.expiry(), Some(SystemTime::UNIX_EPOCH));
        let ahead = Credential::bearer("a").unwrap().lives(at(9_000), HOUR);
        assert_eq!(counted_from(ahead, Duration::ZERO, now).expiry(), Some(now));
        let forever = Credential::bearer("f").unwrap();
        assert_eq!(counted_from(forever, HOUR, now).expiry(), None);
        let bare = Credential::bearer("b").unwrap().expires_at(at(9_000));
        let read = counted_from(bare, Duration::from_secs(60), now);
        assert_eq!(read.expiry(), Some(at(5_060)));
        assert_eq!(read.issued(), None);
    }

    /// A time left past what the clock holds keeps the times as written (never a panic).
    #[test]
    fn counted_from_past_the_clock_keeps_the_times() {
        let written = Credential::bearer("t").unwrap().lives(at(10_000), HOUR);
        let read = counted_from(written, Duration::MAX, at(5_000));
        assert_eq!(read.expiry(), Some(at(13_600)));
    }
}
