//! The credential cache: lock-free reads, single-flight refresh, expiry windows, backoff.
//!
//! This module holds all of the refresh logic: the cache and its API here; its settings
//! and the window and backoff arithmetic in `config`; the single flight and the source's
//! fetch in `flight`; the refresh through a shared store (its look, the refresh lease,
//! the holder's refresh) in `lease`; a rotated pair the store did not take, kept and
//! saved, in `kept`; the cached entry and its aging in `entry`; the per-clone views in
//! `views`. The hot path (`CredentialCache::current`, crate-private) is one `ArcSwap`
//! load, one atomic read and, for a credential that expires, a read of each clock (wall
//! and monotonic): no lock, no await, no allocation. Everything else happens on the
//! refresh path, under one mutex that is never held across an await:
//!
//! - **Single flight.** However many callers need a new credential, one task fetches it
//!   and every waiter receives that one result, success or error. The task is spawned, so
//!   a refresh continues when the request that started it is dropped.
//! - **Two windows before expiry** (proactive sources only). `L` is the lifetime a
//!   credential was issued with (its expiry less its issue time), so one that arrives
//!   late in its life, from a store or handed over, is refreshed as early as its issuer
//!   meant; without an issue time, `L` is what is left when it arrives, and the hard
//!   window is at least half of that (at most `hard_window`). In the *soft* window (the last
//!   `min(L × 1/4, soft_window)`, widened by up to `window_jitter` at random so a fleet
//!   does not refresh in lockstep) the first caller starts a background refresh and
//!   everyone keeps using the still-valid credential. In the *hard* window (the last
//!   `min(L × 1/20, hard_window)`) callers wait for the refresh.
//! - **Time that survives a pause.** The windows and the expiry are judged on the wall
//!   clock ([`crate::clock`]), which a suspend or a VM pause does not stop, and on the
//!   monotonic clock from when the credential was installed, which a wall-clock step does
//!   not move: whichever says later wins. A timer on the monotonic clock flips each
//!   entry into its soft window; the hot path reads the wall clock for what the timer
//!   cannot see (a pause). The timer is a task on the runtime that installed the
//!   credential: if that runtime shuts down, the entry ages at once and the clocks
//!   decide.
//! - **Reactive-only sources** ([`RefreshMode::ReactiveOnly`]) are refreshed only when
//!   the cache is empty or the API rejected the credential. **Fixed sources**
//!   ([`RefreshMode::Never`], a static key) are fetched once; a rejection changes
//!   nothing, since the source would hand out the same credential.
//! - **Failures** never poison the cache: a failed background refresh keeps serving the
//!   still-valid credential; consecutive failures back off exponentially with jitter
//!   (between `base × 2ⁿ⁻¹ / 2` and `base × 2ⁿ⁻¹`, capped at the maximum); while backing
//!   off, callers that have no valid credential get [`ErrorKind::Backoff`] at once instead
//!   of hammering the token endpoint; after the backoff the next caller tries again.
//! - **Invalidation** is by generation: a rejection only invalidates the credential if it
//!   is still the current one, so a thousand concurrent 401s cause one refresh
//!   ([`CacheHandle::invalidate_if`] does the same for rejections seen outside the layer).
//! - **Never two fetches at once**, whatever starts them. An explicit invalidation while a
//!   fetch runs makes that fetch's result suspect: it goes to the callers already waiting
//!   for it, never into the cache, and its failure backs nothing off. The next caller
//!   starts the one fetch chained after it, which begins when it ends (however many
//!   invalidations arrive meanwhile) and is told [`FetchReason::Invalidated`].
//! - **No refresh is spawned under the lock**: a runtime that is shutting down refuses the
//!   refresh task, and its waiters get [`ErrorKind::SpawnRefused`]. (The aging timers are
//!   spawned under it; a refused timer drops only a weak reference to its entry, which
//!   never takes the lock.)
//! - **A refresh runs on the runtime of the caller that started it.** Callers on other
//!   runtimes wait for it there. A current-thread runtime kept alive but no longer run
//!   (between two `block_on` calls) does not run it: a caller on another runtime (or on
//!   none), or a refresh chained after it, that finds it not begun by the fetch timeout
//!   abandons it and starts the refresh itself (every waiter then gets that one's
//!   result; the abandoned task, run later, does nothing); one that began and then
//!   stalled there (its token request may be under way, so no other starts) is waited
//!   for until it is overdue, then such a caller gets the still-valid credential, or
//!   [`ErrorKind::Timeout`]. Put a timeout above the layer, as everywhere.
//! - **Storage seam**: an optional [`CredentialStore`] is consulted on the refresh path
//!   only (see [`crate::store`]).
//!
//! # Example
//! ```
//! use std::time::Duration;
//! use tower_client_auth::{AuthLayer, CredentialCache, StaticCredential};
//!
//! let cache = CredentialCache::builder(StaticCredential::bearer("t0k3n")?)
//!     .soft_window(Duration::from_secs(60))
//!     .hard_window(Duration::from_secs(10))
//!     .fetch_timeout(Duration::from_secs(5))
//!     .build()?;
//! // One cache can back several layers (and clients): they share one credential.
//! let layer = AuthLayer::with_cache(cache.clone());
//! # let _ = layer;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::{
    fmt,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures_util::future::Shared;
use tokio::time::Instant;

use crate::{
    credential::Credential,
    error::{Error, InvalidCredential},
    handle::Sink,
    source::{CredentialSource, RefreshMode},
};
#[allow(unused_imports)] // for the docs' links
use crate::{error::ErrorKind, source::FetchReason, store::CredentialStore};

mod config;
mod entry;
mod flight;
#[cfg(feature = "file-store")]
pub(crate) use flight::pause_until;
#[cfg(feature = "redis")]
pub(crate) use flight::timers;
mod kept;
mod lease;
mod views;

use self::config::{Config, saturating_add};
pub use self::config::{
    CredentialCacheBuilder, DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_MAX, DEFAULT_FETCH_TIMEOUT,
    DEFAULT_HARD_WINDOW, DEFAULT_SOFT_WINDOW, DEFAULT_WINDOW_JITTER, HARD_WINDOW_FRACTION,
    MAX_RETRY_AFTER, SOFT_WINDOW_FRACTION, STORE_SHARE, YOUNG_CREDENTIAL_AGE,
};
use self::{
    entry::{AgeOnDrop, Phase},
    views::CurrentSlot,
};
pub(crate) use self::{
    entry::{Current, Entry},
    flight::{Acquire, FlightFuture},
    views::{CacheRef, LocalRefs, LocalView},
};
pub use crate::handle::CacheHandle;

/// Caches the credential of one [`CredentialSource`] and refreshes it. Cheap to clone:
/// clones share the cache. See the [module docs](self) for the rules.
pub struct CredentialCache<P> {
    inner: Arc<Inner<P>>,
}

impl<P> Clone for CredentialCache<P> {
    fn clone(&self) -> Self {
        self.inner.users.fetch_add(1, Ordering::Relaxed);
        CredentialCache {
            inner: self.inner.clone(),
        }
    }
}

impl<P> Drop for CredentialCache<P> {
    fn drop(&mut self) {
        self.inner.users.fetch_sub(1, Ordering::Release);
    }
}

impl<P> fmt::Debug for CredentialCache<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let current = self.inner.current.load();
        f.debug_struct("CredentialCache")
            .field("source", &std::any::type_name::<P>())
            .field("generation", &current.as_ref().map(|e| e.generation))
            .field("config", &self.inner.config)
            .finish()
    }
}

impl<P: CredentialSource> CredentialCache<P> {
    /// A cache with the default settings.
    pub fn new(source: P) -> Self {
        Self::builder(source).build_unchecked()
    }

    /// A builder for a cache with other settings.
    pub fn builder(source: P) -> CredentialCacheBuilder<P> {
        CredentialCacheBuilder::new(source)
    }

    /// Counts of what the refresh path did so far. Nothing is counted per request: the
    /// hot path stays free of shared writes.
    pub fn stats(&self) -> CacheStats {
        let s = &self.inner.stats;
        CacheStats {
            fetches: s.fetches.load(Ordering::Relaxed),
            fetch_failures: s.fetch_failures.load(Ordering::Relaxed),
            rejections: s.rejections.load(Ordering::Relaxed),
            replays: s.replays.load(Ordering::Relaxed),
        }
    }

    /// Counts a replay (called by the layer and the reqwest middleware).
    pub(crate) fn record_replay(&self) {
        self.inner.stats.replays.fetch_add(1, Ordering::Relaxed);
        crate::metrics::event(&self.inner.config.name, crate::metrics::REPLAYS);
    }

    /// The source this cache refreshes from.
    pub fn source(&self) -> &P {
        &self.inner.source
    }

    /// A usable credential: the cached one, or a fresh one after waiting for the refresh.
    ///
    /// For callers outside a Tower stack; the layer uses the same path.
    pub async fn credential(&self) -> Result<Credential, Error> {
        match self.current() {
            Ok(current) => Ok(current.credential.clone()),
            Err(acquire) => acquire.await.map(|entry| entry.credential.clone()),
        }
    }

    /// Fetches the credential now, unless a usable one is cached: for a cold start, so
    /// that the first requests do not wait for the token endpoint. The error is the one a
    /// request would get (and, for a failed fetch, the backoff applies to the next try).
    /// With [`keep_warm`](CredentialCacheBuilder::keep_warm), the cache then stays warm.
    pub async fn warm_up(&self) -> Result<(), Error> {
        match self.current() {
            Ok(_) => Ok(()),
            Err(acquire) => acquire.await.map(drop),
        }
    }

    /// Reports that the API rejected `credential`, and waits for its replacement.
    ///
    /// Only a credential that is still the current one is invalidated: when many callers
    /// report the same rejection, the source is asked once. The one exception: a
    /// credential rejected right after it became current, while the backoff after such a
    /// rejection runs, stays in use and this fails [`ErrorKind::Backoff`] at once (see
    /// [`YOUNG_CREDENTIAL_AGE`]: an API whose clock is behind the issuer's accepts it a
    /// moment later).
    pub async fn reject(&self, credential: &Credential) -> Result<Credential, Error> {
        // Compared and dropped under one lock: a refresh that takes the credential back
        // from the store and installs it comes either before (then it is current here,
        // and rejected as such) or after (then it is dropped, and the refresh refuses it).
        let generation = {
            let mut state = self.inner.lock_state();
            let current = self.inner.current.load();
            match current.as_deref() {
                Some(entry) if entry.credential == *credential => Some(entry.generation),
                _ => {
                    // Not current (replaced already, or handed to a fetch's own waiters
                    // only): never taken back from the store either.
                    state.drop_retired_value(credential);
                    None
                }
            }
        };
        #[cfg(test)]
        flight::hook::run("after_reject_read");
        let acquire = match generation {
            Some(generation) => self.replace_rejected(generation),
            None => self.acquire(None),
        };
        acquire.await.map(|entry| entry.credential.clone())
    }

    /// A handle that replaces or invalidates this cache's credential from elsewhere.
    pub fn handle(&self) -> CacheHandle {
        let weak: Weak<Inner<P>> = Arc::downgrade(&self.inner);
        CacheHandle::new(weak)
    }

    /// The current credential if it may be sent now, or the refresh to wait for. In the
    /// soft window this starts the background refresh (once). The layer reads through a
    /// [`LocalView`] instead; this is for callers that share the cache by reference.
    pub(crate) fn current(&self) -> Result<Current, Acquire> {
        let guard = self.inner.current.load();
        match self.usable(guard.as_deref()) {
            Ok(_) => Ok(Current(guard)),
            Err(acquire) => {
                drop(guard);
                Err(acquire)
            }
        }
    }

    /// What a resend with the same credential and a new proof (a DPoP nonce) takes: for
    /// the entry of `generation`, if it is still current, what a new request would get
    /// now ([`usable`](Self::usable), which reads the wall clock: the request may have
    /// waited out a suspend for its answer); else
    /// [`current_entry`](Self::current_entry). The answer may be that entry (a reactive
    /// credential goes until it is rejected; one in its hard window during a backoff is
    /// kept) or another: the resend tells which by its generation.
    pub(crate) fn entry_again(&self, generation: u64) -> Acquire {
        match self.inner.current.load_full() {
            Some(entry) if entry.generation == generation => match self.usable(Some(&entry)) {
                Ok(_) => Acquire::ready(Ok(entry)),
                Err(refresh) => refresh,
            },
            _ => self.current_entry(),
        }
    }

    /// The current credential if it may be sent now, else the refresh to wait for: what
    /// a request that waited takes when the credential it got was dropped meanwhile.
    pub(crate) fn current_entry(&self) -> Acquire {
        match self.current() {
            Ok(Current(guard)) => match guard.as_ref() {
                Some(entry) => Acquire::ready(Ok(Arc::clone(entry))),
                None => self.acquire(None),
            },
            Err(acquire) => acquire,
        }
    }

    /// Whether `entry`, the current entry as just read, may be sent now; if not, the
    /// refresh to wait for. Inlined for its common case: an entry before its soft window
    /// (one flag, and a read of each clock for a credential that expires).
    #[inline]
    pub(crate) fn usable<'e>(&self, entry: Option<&'e Entry>) -> Result<&'e Entry, Acquire> {
        match entry {
            Some(entry) if entry.fresh(|| self.inner.config.clock.now()) => Ok(entry),
            _ => self.usable_aging(entry),
        }
    }

    #[cold]
    #[inline(never)]
    fn usable_aging<'e>(&self, entry: Option<&'e Entry>) -> Result<&'e Entry, Acquire> {
        if let Some(entry) = entry {
            match entry.phase_at(Instant::now(), self.inner.config.clock.now()) {
                Phase::Fresh => return Ok(entry),
                Phase::Soft => {
                    if !entry.background_claimed.load(Ordering::Relaxed)
                        && !entry.background_claimed.swap(true, Ordering::AcqRel)
                    {
                        drop(self.acquire(Some(Want::Background(entry.generation))));
                    } else {
                        self.unstall_background(entry);
                    }
                    return Ok(entry);
                }
                Phase::Hard => {}
            }
        }
        Err(self.acquire(None))
    }

    /// Whether `entry`, found usable by [`usable`](Self::usable) before (readied in
    /// `poll_ready`, or the credential a request waited for) may still be sent: it is
    /// still current (not invalidated, rejected, replaced or refreshed since) and has
    /// not expired. One in its windows starts the refresh `usable` would.
    ///
    /// The hold since the check may have spanned a suspend (a service held ready in a
    /// balancer's ready set while the machine slept), which stops the aging timer but
    /// not the wall clock: the wall clock is read, as the hot path reads it, for a
    /// credential with refresh windows.
    #[inline]
    pub(crate) fn still_sendable(&self, entry: &Entry) -> bool {
        entry.fresh(|| self.inner.config.clock.now()) || self.still_sendable_aging(entry)
    }

    #[cold]
    #[inline(never)]
    fn still_sendable_aging(&self, entry: &Entry) -> bool {
        if entry.retired.load(Ordering::Acquire)
            || entry.is_expired_at(Instant::now(), self.inner.config.clock.now())
            || self.dropped_since(entry)
        {
            return false;
        }
        // In the soft window this claims the background refresh; in the hard window it
        // starts the refresh the next `poll_ready` waits for.
        drop(self.usable(Some(entry)));
        true
    }

    /// Whether `entry`, a replay's new credential (a step-up's, say), may still be sent
    /// once the replay's service is ready: not dropped (rejected, invalidated) nor, for
    /// a credential with refresh windows, expired since (a reactive credential goes
    /// until it is rejected, as on the hot path). One merely replaced by a newer one may
    /// (a step-up's carries the scope the replay needs; the newer one may not). The
    /// wait for readiness may have spanned a suspend, which stops the aging timer: the
    /// wall clock is read, as the hot path reads it; no lock is taken while the entry is
    /// before its soft window.
    #[inline]
    pub(crate) fn replay_sendable(&self, entry: &Entry) -> bool {
        entry.fresh(|| self.inner.config.clock.now()) || self.replay_sendable_aging(entry)
    }

    #[cold]
    #[inline(never)]
    fn replay_sendable_aging(&self, entry: &Entry) -> bool {
        !entry.is_expired_at(Instant::now(), self.inner.config.clock.now())
            && !self.dropped_since(entry)
    }

    /// Whether `entry`, not current (retired, or a flight's own waiters' credential that
    /// never was), has been dropped (rejected, invalidated) since. The current entry never
    /// has: no lock is taken for it.
    fn dropped_since(&self, entry: &Entry) -> bool {
        let current = self.inner.current.load();
        if current.as_deref().is_some_and(|c| std::ptr::eq(c, entry)) {
            return false;
        }
        drop(current);
        self.inner.lock_state().dropped_generation(entry.generation)
    }

    /// Whether a rejected credential can be replaced by a different one: false for a
    /// source in [`RefreshMode::Never`].
    #[inline]
    pub(crate) fn refreshes(&self) -> bool {
        self.inner.mode != RefreshMode::Never
    }

    /// The API answered a request carrying the credential of `generation` with anything
    /// but a rejection: it accepts this credential. One shared read per answer, a write
    /// only for the first answer of each credential.
    #[inline]
    pub(crate) fn accepted(&self, generation: u64) {
        if self.inner.accepted.load(Ordering::Relaxed) <= generation {
            self.inner
                .accepted
                .fetch_max(generation + 1, Ordering::Relaxed);
        }
    }

    /// The credential of `generation`, if it is current or among the last few replaced.
    /// For telling whether the credential that replaces a rejected one is any different.
    pub(crate) fn credential_of(&self, generation: u64) -> Option<Credential> {
        if let Some(entry) = self.inner.current.load().as_deref() {
            if entry.generation == generation {
                return Some(entry.credential.clone());
            }
        }
        let state = self.inner.lock_state();
        state
            .retired
            .iter()
            .find(|(g, _, _)| *g == generation)
            .map(|(_, c, _)| c.clone())
    }

    /// The API rejected the credential of `generation`: invalidate it if it is still
    /// current, and return the refresh that replaces it.
    pub(crate) fn replace_rejected(&self, generation: u64) -> Acquire {
        self.acquire(Some(Want::Replace(generation)))
    }

    /// The API said the credential of `generation` lacks `scope`: the step-up fetch that
    /// replaces it, if it is still current (one for every request that saw it), or the
    /// newer credential. A failed step-up hands back the credential it was to replace,
    /// while that is valid.
    pub(crate) fn step_up(&self, generation: u64, scope: Option<String>) -> Acquire {
        self.acquire(Some(Want::StepUp(generation, scope)))
    }

    /// A replay with the credential of `generation`, a step-up's, still lacked a scope:
    /// the next step-up waits for the step-up backoff. Counted once per credential, as
    /// many requests as shared the step-up: one fruitless step-up, one backoff step.
    /// Not when the replay's credential was not a step-up's (a plain newer one, which
    /// the step-up was not needed for: no step-up was tried).
    pub(crate) fn step_up_failed(&self, generation: u64) {
        let mut state = self.inner.lock_state();
        if (state.stepped_up.as_ref()).is_some_and(|(stepped, _)| *stepped == generation) {
            self.inner.step_up_fruitless(&mut state, generation);
        }
    }

    /// A replay after a step-up was accepted (with the credential of `generation`, a
    /// step-up's): the step-up backoff starts over.
    pub(crate) fn step_up_worked(&self, generation: u64) {
        let mut state = self.inner.lock_state();
        if (state.stepped_up.as_ref()).is_some_and(|(stepped, _)| *stepped == generation) {
            state.step_ups_failed = 0;
            state.step_up_retry_at = None;
            state.step_up_fruitless = None;
        }
    }
}

/// Until an entry's soft window opens: at the monotonic instant `at`, or, with keep-warm
/// (`wall`: the window's wall-clock moment, the cache's clock, how often to look), at
/// that moment by the wall clock if it comes first. A suspend stops the monotonic clock,
/// and every timer with it, not the wall clock: a laptop that slept through the window's
/// opening would otherwise refresh only a whole window's worth of waking time later,
/// past the token's expiry more often than not. Looking every quarter of the window
/// finds it at most that long after waking, while three quarters of it are left.
async fn soft_window_opens(
    at: Instant,
    wall: Option<(SystemTime, crate::clock::WallClock, Duration)>,
) {
    let Some((on_wall, clock, step)) = wall else {
        tokio::time::sleep_until(at).await;
        return;
    };
    loop {
        let now = Instant::now();
        let by_wall = on_wall
            .duration_since(clock.now())
            .unwrap_or(Duration::ZERO);
        if now >= at || by_wall.is_zero() {
            return;
        }
        tokio::time::sleep_until(saturating_add(now, by_wall.min(step)).min(at)).await;
    }
}

/// How often keep-warm looks at the wall clock before a soft window of `window` opens: a
/// quarter of it, never more often than once a second (a timer wake and a clock read
/// each; a window so short leaves nothing to gain by looking sooner).
fn wall_step(window: Duration) -> Duration {
    (window / 4).max(Duration::from_secs(1))
}

/// Keep-warm's refresh of the entry of `generation`, if the cache (and that entry in
/// it) is still there: the background refresh a request in its soft window would start
/// (or, past it, the refresh a request would wait for). An entry replaced or invalidated
/// meanwhile has its own timer, or none.
fn keep_warm<P: CredentialSource>(cache: &Weak<Inner<P>>, generation: u64) {
    // Alive for no user but its own tasks (a lease holder's late fetch, say): such a
    // refresh would hold it alive in turn, past every user, for as long as the endpoint
    // fails.
    let Some(inner) = cache.upgrade() else {
        return;
    };
    #[cfg(test)]
    flight::hook::run("keep_warm_upgraded");
    // Counted as a user only while one is left, in one step: a look, then a count, let
    // the last user go between them, and this refresh run for nobody.
    let counted = inner
        .users
        .fetch_update(Ordering::Acquire, Ordering::Acquire, |users| {
            (users > 0).then_some(users + 1)
        });
    if counted.is_err() {
        return;
    }
    let cache = CredentialCache { inner };
    let current = cache.inner.current.load_full();
    if let Some(entry) = current.filter(|e| e.generation == generation) {
        tracing::debug!(
            generation,
            "keep-warm: refreshing before any request needs it"
        );
        drop(cache.usable_aging(Some(&entry)));
    }
}

impl<P: CredentialSource> Sink for Inner<P> {
    fn replace(&self, credential: Credential) -> Result<(), InvalidCredential> {
        if credential.is_bound() && !self.source.binds_credentials() {
            return Err(InvalidCredential::new(crate::error::UNDECLARED_BINDING));
        }
        let mut state = self.lock_state();
        // A fetch in flight started before this value existed: its result must not win,
        // and its failure is its own waiters' only.
        state.epoch += 1;
        state.failures = 0;
        // The endpoint's own word (`Retry-After`) still holds, and says why.
        state.retry_at = state.endpoint_hold.filter(|at| Instant::now() < *at);
        if state.retry_at.is_none() {
            state.last_error = None;
        }
        // Nor may a rejection of the new value join that fetch and take its older one.
        Self::detach_running(&mut state);
        tracing::debug!("credential replaced from outside");
        let shared = (self.config.store.as_ref())
            .filter(|_| credential.refresh_token().is_some())
            .map(|store| (Arc::clone(store), credential.clone()));
        let entry = self.install(&mut state, credential, Instant::now());
        // A pair handed in is the fleet's newest session: shared through the store, or
        // presented by this process's next refresh if that comes first.
        let handing = shared.as_ref().map(|(_, credential)| {
            let handing = kept::Handing::new(entry.generation, credential.clone());
            let over = Arc::clone(&handing.over);
            if let Some(older) = state.handing.replace(handing) {
                older.end();
            }
            over
        });
        drop(state);
        if let (Some((store, credential)), Some(over)) = (shared, handing) {
            let task = kept::hand_in(
                self.me.clone(),
                store,
                credential,
                entry.generation,
                over,
                (self.config.fetch_timeout, lease::lease_hold(self)),
            );
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn(task)),
                Err(_) => tracing::warn!(
                    "a pair handed in outside a Tokio runtime is not shared through the store"
                ),
            }
        }
        Ok(())
    }

    fn invalidate_if(&self, credential: &Credential) -> bool {
        let mut state = self.lock_state();
        let current = self.current.load_full();
        if current.is_none_or(|e| e.credential != *credential) {
            // Not current: never taken back from the store either.
            state.drop_retired_value(credential);
            return false;
        }
        self.invalidate_locked(&mut state);
        true
    }

    fn invalidate(&self) {
        let mut state = self.lock_state();
        self.invalidate_locked(&mut state);
    }
}

impl<P: CredentialSource> Inner<P> {
    /// Drops the current credential; a fetch running now becomes suspect. Called with the
    /// state lock held.
    fn invalidate_locked(&self, state: &mut State) {
        state.invalidations = state.invalidations.wrapping_add(1);
        // The next fetch is told what was dropped, so that a source holding a last
        // credential does not hand it back.
        let current = self.current.load_full().map(|e| e.credential.clone());
        let had_current = current.is_some();
        self.retire(state, Retired::Dropped);
        if let Some(value) = &current {
            // Every generation of the value: one a flight handed its own waiters too.
            state.drop_retired_value(value);
        }
        let dropped = current.or_else(|| state.invalidated.take().flatten());
        state.invalidated = Some(dropped);
        self.current.store(None);
        Self::detach_running(state);
        if let Some(running) = &state.running {
            state.tainted = Some(running.id);
        }
        // A late fetch's result, never current: suspect from now on. The next fetch is
        // told it when nothing was current (it is what a source holding its last
        // credential holds); else it is told what was current, which the store holds
        // (the late result's save failed, or it would have been taken from there).
        if let Some(late) = state.late.take() {
            let entry = self.entry(state, late.credential, Instant::now());
            self.forget_suspect(state, &entry, had_current);
        }
    }

    /// A fetch running now started before an invalidation or a replacement: its result
    /// goes to its own waiters only. The next request (or rejection) does not join it; it
    /// starts the one fetch chained after it, which waits for it to end (never two at
    /// once). A chained fetch that has not started yet starts after this anyway.
    fn detach_running(state: &mut State) {
        let Some(running) = state.running.as_ref().map(|f| f.id) else {
            return;
        };
        state.flight.take_if(|f| f.id == running);
        state.step_ups.retain(|f| f.id != running);
        // Suspect whether or not a slot still held it (one that was detached before is
        // in none, and still runs).
        state.suspect = Some(running);
    }
}

struct Inner<P> {
    /// This cache itself, weakly: what its timers hold (keep-warm), so that none of them
    /// keeps it alive.
    me: Weak<Inner<P>>,
    source: P,
    mode: RefreshMode,
    config: Config,
    /// The hot path reads this; it is written only under `state`'s lock.
    current: CurrentSlot,
    state: Mutex<State>,
    stats: Stats,
    /// How the store has answered (see `lease::StoreHealth`): an outage is logged once
    /// when it begins and once when a call that failed in it answers.
    store_health: lease::StoreHealth,
    /// One more than the newest generation the API answered with anything but a
    /// rejection: written once per credential, read on every answer.
    accepted: AtomicU64,
    /// The last background refresh planned: a soft-window caller that finds the claim
    /// held looks whether it ever began (see `CredentialCache::unstall_background`).
    background: arc_swap::ArcSwapOption<flight::FlightRun>,
    /// Held while the source fetches: by the flight whose fetch runs, and then by a
    /// lease holder's fetch that outlived its flight (`lease::finish_late`), so that a
    /// later flight never asks the source while that one still runs. Uncontended but
    /// for that.
    source_gate: Arc<tokio::sync::Mutex<()>>,
    /// A rotated pair the store did not take, kept under the refresh lease until it is
    /// saved (`kept::keep_saving`); a flight of this process that finds the lease held
    /// takes both from here. Shared with the task keeping it, which outlives the cache.
    kept: kept::KeptSlot,
    /// How many [`CredentialCache`] clones exist: the cache's users. The cache's own
    /// tasks (a flight, a lease holder's late fetch, a kept pair's round) hold it
    /// strongly too, for a bounded time each; keep-warm refreshes only while a user is
    /// left, so that those tasks cannot keep one another going once the last user went.
    users: AtomicUsize,
    /// Credentials issued in this clock's future (see [`Inner::believed_expiry`]), with
    /// the expiry believed when each was first seen: the last few.
    sightings: Mutex<Vec<(Credential, SystemTime)>>,
}

/// How many credentials issued in the cache clock's future it remembers first seeing.
const SIGHTINGS: usize = 8;

#[derive(Default)]
struct Stats {
    fetches: AtomicU64,
    fetch_failures: AtomicU64,
    rejections: AtomicU64,
    replays: AtomicU64,
}

/// What a [`CredentialCache`]'s refresh path has done, from [`CredentialCache::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Times the refresh path started (a store lookup, then the source if needed); a
    /// refresh that ends without either is not one: queued behind another and answered
    /// by a fresh credential handed over meanwhile, a backoff in force or a stalled one
    /// ahead, cancelled with its runtime while it waited, or refused by a runtime
    /// shutting down (nor is it a failure to back off from, but for a step-up's).
    pub fetches: u64,
    /// Refreshes that failed (error, timeout, panic, cancelled); not one that gave up
    /// because the store's credentials were dropped as they loaded
    /// ([`ErrorKind::StoreCredentialDropped`]), nor one the fleet's hold ended (a
    /// `Retry-After` another process was answered with: see
    /// [`CredentialStore::hold`]), which asked no source.
    pub fetch_failures: u64,
    /// Rejections that invalidated the current credential (at most one per credential).
    pub rejections: u64,
    /// Requests sent again: with a new credential after a rejection or a step-up, or
    /// with a new DPoP proof the server asked for.
    pub replays: u64,
}

/// A flight as the state knows it: its id and the future its waiters share.
#[derive(Clone)]
struct Flight {
    id: u64,
    future: Shared<FlightFuture>,
    /// Whether its task has begun, and where its result goes (see [`FlightRun`]).
    run: Arc<flight::FlightRun>,
    /// For a step-up, the scope it asks for (space-separated): a step-up for a scope
    /// it does not cover is another one.
    scope: Option<Arc<str>>,
}

/// Whether `asked` (a step-up's scopes) names every scope in `wanted` (space-separated).
fn covers(asked: Option<&str>, wanted: Option<&str>) -> bool {
    let asked = asked.unwrap_or_default();
    wanted
        .unwrap_or_default()
        .split_ascii_whitespace()
        .all(|w| asked.split_ascii_whitespace().any(|a| a == w))
}

impl Flight {
    /// Whether this step-up asks for every scope in `wanted` (space-separated).
    fn covers(&self, wanted: Option<&str>) -> bool {
        covers(self.scope.as_deref(), wanted)
    }

    /// What a step-up asks for that must cover this one's scope and `wanted` too: this
    /// one's scopes, then those of `wanted` it lacks.
    fn widened(&self, wanted: Option<&str>) -> Option<String> {
        let mut scope = self.scope.as_deref().map(str::to_owned);
        for w in wanted.unwrap_or_default().split_ascii_whitespace() {
            match &mut scope {
                Some(s) if s.split_ascii_whitespace().any(|a| a == w) => {}
                Some(s) => {
                    s.push(' ');
                    s.push_str(w);
                }
                None => scope = Some(w.to_owned()),
            }
        }
        scope
    }
}

#[derive(Default)]
struct State {
    /// The flight a caller who needs a credential joins: running, or chained after a
    /// suspect one and waiting for it to end. Never a step-up's.
    flight: Option<Flight>,
    /// The step-ups' flights, running or chained after the others, oldest first: a
    /// later step-up joins the first that asks for its scope, or chains a wider one
    /// after them; nothing else joins them (a caller that needs any credential is not
    /// held to a wider grant, nor to its failure).
    step_ups: Vec<Flight>,
    /// The flight whose fetch runs now: at most one at any time. A new flight started
    /// while it runs (it was made suspect and detached) is chained after it, for as long
    /// as it runs: a chained flight that dies before it starts does not make it forgotten.
    running: Option<Flight>,
    /// A running flight that an invalidation or a replacement made suspect: its result
    /// and its failure go to its own waiters only.
    suspect: Option<u64>,
    /// A running flight that an invalidation made suspect: its result is also kept out
    /// of the store's answers (see `Inner::forget_suspect`).
    tainted: Option<u64>,
    /// What a tainted flight brought, when a fetch chained after it had already taken
    /// the invalidation's marker: that fetch is told it as it begins.
    tainted_result: Option<Credential>,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<Error>,
    /// The time before which the token endpoint asked for no request (`Retry-After`),
    /// held across a hand-over, which ends the backoff's own steps only; cleared by a
    /// fetch that succeeds.
    endpoint_hold: Option<Instant>,
    /// The fleet's hold as this cache first saw it in the store (or wrote it): its time
    /// there, and when it ends by this process's monotonic clock (see
    /// `lease::fleet_hold`).
    fleet_hold: Option<(std::time::SystemTime, Instant)>,
    /// Bumped when the credential is replaced from outside; a fetch that started in an
    /// older epoch does not install its result while the replacement is current.
    epoch: u64,
    next_generation: u64,
    /// Counts flights started; see `FlightGuard::id`.
    flight_id: u64,
    /// Set by an explicit invalidation, with the credential it dropped: the next fetch
    /// is a [`FetchReason::Invalidated`] one.
    invalidated: Option<Option<Credential>>,
    /// What a flight abandoned before its task began (`flight::FlightRun`) was to tell
    /// its source (a rejection or an invalidation, and the credential it dropped): the
    /// next fetch that has nothing newer to tell is told it instead.
    orphaned: Option<(FetchReason, Option<Credential>)>,
    /// The last few credentials that stopped being current, or were handed to a
    /// flight's own waiters without ever being current, by generation: a request whose
    /// credential was rejected after it was already replaced can still tell whether the
    /// replacement is the same value; and whether it may be taken back from the store
    /// (see [`Retired`]).
    retired: std::collections::VecDeque<(u64, Credential, Retired)>,
    /// The newest generation forgotten from `retired` (or rejected only after it was
    /// forgotten): every generation up to it that `retired` no longer names is taken as
    /// dropped, whatever it was when it was forgotten, so that a request holding a
    /// credential dropped long ago (or dropped by value after it was forgotten, when
    /// nothing could mark it) never sends it, however many changes came since. A
    /// request holding a forgotten credential that was merely superseded takes the
    /// current one instead.
    forgotten: u64,
    /// Counts invalidations: a lease holder's fetch that outlived its flight
    /// (`lease::finish_late`) and ends after one did not begin after it, so its
    /// result is remembered as suspect, as a running flight's is.
    invalidations: u64,
    /// What a lease holder's fetch that outlived its flight brought (see `Late`), until
    /// a credential is installed.
    late: Option<Late>,
    /// A pair handed in that has not reached the store yet (see `kept::hand_in`).
    handing: Option<kept::Handing>,
    /// Consecutive rejections of credentials younger than [`YOUNG_CREDENTIAL_AGE`], and
    /// when the next one may cause a fetch.
    fresh_rejections: u32,
    fresh_rejection_retry_at: Option<Instant>,
    /// Consecutive step-ups that failed or brought no scope the API accepts, and when
    /// the next may start: a backoff of their own, so that the refresh before expiry is
    /// never held back by a scope the API keeps asking for.
    step_ups_failed: u32,
    step_up_retry_at: Option<Instant>,
    /// The newest step-up credential found still lacking a scope it asked for (by its
    /// replay, or by the next request's answer): counted once (as are older ones whose
    /// answers come late); cleared when a replay with the newest step-up's credential
    /// works.
    step_up_fruitless: Option<u64>,
    /// The generation of the newest credential a step-up installed, and the scopes it
    /// asked for: only its answers say whether a step-up worked.
    stepped_up: Option<(u64, Option<Arc<str>>)>,
}

impl State {
    /// Remembers `entry` among the last [`RETIRED_KEPT`] credentials that stopped
    /// being current (or were never made current: see `Inner::forget_suspect`);
    /// `dropped`: not to be taken back from the store.
    fn remember_retired(&mut self, entry: &Entry, how: Retired) {
        // Off the hot path: a service that readied it (one that waited for a flight's
        // own result, say) looks closer before sending it (`still_sendable`).
        entry.aging.store(true, Ordering::Release);
        if self.retired.len() == RETIRED_KEPT {
            if let Some((generation, ..)) = self.retired.pop_front() {
                self.forgotten = self.forgotten.max(generation);
            }
        }
        self.retired
            .push_back((entry.generation, entry.credential.clone(), how));
    }

    /// A credential no longer current (one handed to a flight's own waiters only, say)
    /// was rejected: remembered as dropped from now on, so that it is not taken back
    /// from the store. Its value, and how it had retired, if it is still remembered.
    fn drop_retired(&mut self, generation: u64) -> Option<(Credential, Retired)> {
        let Some((_, credential, how)) = self.retired.iter_mut().find(|(g, ..)| *g == generation)
        else {
            self.forgotten = self.forgotten.max(generation);
            return None;
        };
        let before = std::mem::replace(how, Retired::Dropped);
        Some((credential.clone(), before))
    }

    /// Whether `credential` was rejected, invalidated or replaced here (under any
    /// generation): not to be taken back from the store.
    fn dropped(&self, credential: &Credential) -> bool {
        self.retired
            .iter()
            .any(|(_, retired, how)| *how != Retired::Own && retired == credential)
    }

    /// Whether the credential of `generation`, not current, is remembered as dropped, or
    /// was forgotten (see `forgotten`).
    fn dropped_generation(&self, generation: u64) -> bool {
        match self.retired.iter().find(|(g, ..)| *g == generation) {
            Some((_, _, how)) => *how == Retired::Dropped,
            None => generation <= self.forgotten,
        }
    }

    /// [`drop_retired`](Self::drop_retired) by value, for every generation it had.
    fn drop_retired_value(&mut self, credential: &Credential) {
        for (_, retired, how) in &mut self.retired {
            if retired == credential {
                *how = Retired::Dropped;
            }
        }
    }
}

/// What a lease holder's fetch that outlived its flight brought (`lease::finish_late`),
/// no invalidation having come since its flight began. It was never current (its flight
/// had failed; a credential older than it may still be), yet it is this cache's newest
/// credential, the one a source holding its last credential holds: an invalidation
/// before a credential is installed makes it suspect, as it makes a running flight's
/// result (else a flight after the invalidation would take it back from the store it
/// was saved in), and the next fetch is told it if nothing was current. While its
/// rotated refresh token is `unsaved` (the store refused it, and `keep_saving` keeps the
/// lease), it is this
/// process's next answer: the store cannot have a newer one, and the lease is its own,
/// which every flight of this process would otherwise wait out. Forgotten when
/// `keep_saving` gives it up to a newer pair.
pub(super) struct Late {
    pub(super) credential: Credential,
    pub(super) unsaved: bool,
}

/// How a credential in [`State::retired`] stopped being current, or never was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Retired {
    /// Handed to a flight's own waiters only: a good credential the store may give back.
    Own,
    /// Replaced by a newer one (a refresh, a replacement): not taken back from the store.
    Superseded,
    /// Rejected or invalidated: not taken back from the store, a late rejection of it is
    /// no news, and nothing sends it any more.
    Dropped,
    /// Fetched across an invalidation: as `Dropped`, except that the flight's own
    /// waiters (who asked before the invalidation) may still send it, until it is
    /// dropped by value.
    Tainted,
}

/// How many credentials [`State::retired`] remembers: a bound, not a guarantee. A
/// credential dropped this many changes ago is forgotten by value: a rejection of it,
/// still in flight, can no longer be told from its replacement, and a store that nothing
/// has written since could hand it back. Not by generation: a request still holding it
/// never sends it (`State::forgotten`). Each change is a fetch, a replacement, a
/// rejection or an invalidation; 64 of them while one request is in flight, or with no
/// fetch saving over the store, is far beyond what a client sees. Scanned only on the
/// refresh path (a rejection, a store's answer), never per request.
const RETIRED_KEPT: usize = 64;

#[derive(Clone)]
enum Want {
    /// Replace the credential of this generation, which the API rejected.
    Replace(u64),
    /// Refresh the credential of this generation in the background (soft window).
    Background(u64),
    /// A wider grant than the credential of this generation, which the API said lacks
    /// the scope given (step-up): it stays in use until the new one is there.
    StepUp(u64, Option<String>),
}

impl<P: CredentialSource> Inner<P> {
    /// The step-up's credential of `generation` still lacks a scope it asked for:
    /// counted once per credential, as many requests as shared the step-up (one
    /// fruitless step-up, one backoff step).
    fn step_up_fruitless(&self, state: &mut State, generation: u64) {
        if (state.step_up_fruitless).is_some_and(|counted| counted >= generation) {
            return;
        }
        state.step_up_fruitless = Some(generation);
        self.step_up_failed_locked(state);
    }

    fn step_up_failed_locked(&self, state: &mut State) {
        state.step_ups_failed = state.step_ups_failed.saturating_add(1);
        let delay = self.backoff(state.step_ups_failed);
        state.step_up_retry_at = Some(config::saturating_add(Instant::now(), delay));
        tracing::debug!(
            failures = state.step_ups_failed,
            retry_in_ms = delay.as_millis() as u64,
            "step-up brought no accepted scope; backing step-ups off"
        );
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        // The lock is never held across an await, nor across a source's, a store's or
        // the application's callbacks: what runs under it is the cache's own
        // bookkeeping, the configured `Clock`, and tracing and metrics events. A panic
        // there (a clock's) leaves nothing half-updated that matters: a credential at
        // worst remembered as retired before it stopped being current, which only keeps
        // it from being taken back from the store or fallen back on. Recover rather than propagate a panic
        // to every caller.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers the current credential as retired (`how`), before it stops being
    /// current. Called with the state lock held.
    fn retire(&self, state: &mut State, how: Retired) {
        if let Some(entry) = self.current.load_full() {
            entry.retired.store(true, Ordering::Release);
            state.remember_retired(&entry, how);
        }
    }

    /// Makes `credential` current. Called with the state lock held.
    fn install(&self, state: &mut State, credential: Credential, now: Instant) -> Arc<Entry> {
        // A newer refresh token than a pending hand-in's ends it (see `kept::Handing`):
        // while one is pending, none is installed but from a refresh that began after
        // it (one that presented its refresh token, a step-up's login) or another
        // hand-in.
        if credential.refresh_token().is_some() {
            if let Some(handing) = state
                .handing
                .take_if(|h| h.credential.refresh_token() != credential.refresh_token())
            {
                handing.end();
            }
        }
        self.retire(state, Retired::Superseded);
        state.invalidated = None;
        state.tainted_result = None;
        state.late = None;
        let entry = self.entry(state, credential, now);
        self.current.store(Some(entry.clone()));
        entry
    }

    /// A new entry for `credential`, not (yet) current. Called with the state lock held.
    fn entry(&self, state: &mut State, credential: Credential, now: Instant) -> Arc<Entry> {
        let generation = state.next_generation;
        state.next_generation += 1;
        let wall = self.config.clock.now();
        let expires_wall = self.believed_expiry(&credential, wall);
        // The monotonic guard: the lifetime left now, counted on the monotonic clock.
        let expires_at = expires_wall
            .map(|at| saturating_add(now, at.duration_since(wall).unwrap_or(Duration::ZERO)));
        let windows = match (self.mode, expires_wall, expires_at) {
            (RefreshMode::Proactive, Some(expires_wall), Some(expires_mono)) => {
                let (soft, hard) = self.windows(&credential, expires_wall, wall);
                let before = |on_wall: SystemTime, d: Duration| on_wall.checked_sub(d);
                let mono = |d: Duration| expires_mono.checked_sub(d).unwrap_or(now);
                Some((
                    before(expires_wall, soft).unwrap_or(wall),
                    mono(soft),
                    before(expires_wall, hard).unwrap_or(wall),
                    mono(hard),
                ))
            }
            // A fixed credential that says when it expires: no refresh before, but not
            // sent past its expiry (its refetch then fails `Expired`, nothing is sent).
            (RefreshMode::Never, Some(expires_wall), Some(expires_mono)) => {
                Some((expires_wall, expires_mono, expires_wall, expires_mono))
            }
            _ => None,
        };
        let runtime = tokio::runtime::Handle::try_current().ok();
        // Keep-warm: the aging timer goes on to start the background refresh, never
        // sooner than the backoff base after this entry arrived. An entry born inside
        // its soft window (a source handing out a token it cached, one loaded late in
        // its life) has no timer, and is left to requests: refreshing it in the
        // background could bring another one just as old, a loop. So is one born old
        // just before its window, fresh for less time than its window lasts, that
        // outlives the entry it follows by less than that too: the refresh of such an
        // issuer's token brought one hardly younger, and the next would be as old
        // again, a loop at the window's pace.
        let born_old = |(_, soft_at, ..): (SystemTime, Instant, SystemTime, Instant)| {
            let Some(expires) = expires_at else {
                return false;
            };
            let window = expires.saturating_duration_since(soft_at);
            let gained = (self.current.load().as_ref())
                .and_then(|previous| previous.expires_at)
                .is_none_or(|previous| expires.saturating_duration_since(previous) >= window);
            soft_at.saturating_duration_since(now) < window && !gained
        };
        let warm_mode = self.config.keep_warm && self.mode == RefreshMode::Proactive;
        let warm = (warm_mode && !windows.is_some_and(born_old)).then(|| {
            (
                self.me.clone(),
                saturating_add(now, self.config.backoff_base),
            )
        });
        Arc::new_cyclic(|weak: &Weak<Entry>| {
            // Without a runtime for the timer, the entry starts aging at once: correct,
            // only a clock read per request slower.
            let soft_at = windows.map(|w| w.1);
            let (aging, timer) = match (soft_at, &runtime) {
                // A runtime known without timers: the timer would panic (printed).
                (Some(at), Some(rt)) if at > now && !flight::timers::known_absent() => {
                    let guard = AgeOnDrop(weak.clone());
                    // Keep-warm also looks at the wall clock on the way: a suspend stops
                    // the monotonic clock, and with it the timer, not the wall clock.
                    let watch_wall = warm.as_ref().and(windows).map(|(soft_wall, ..)| {
                        let window =
                            expires_at.map_or(Duration::ZERO, |e| e.saturating_duration_since(at));
                        (soft_wall, self.config.clock.clone(), wall_step(window))
                    });
                    let task = rt.spawn(async move {
                        soft_window_opens(at, watch_wall).await;
                        drop(guard);
                        if let Some((cache, not_before)) = warm {
                            tokio::time::sleep_until(not_before).await;
                            keep_warm(&cache, generation);
                        }
                    });
                    // A runtime shutting down refuses the timer: age from the start then.
                    (task.is_finished(), Some(task.abort_handle()))
                }
                (Some(_), _) => (true, None),
                (None, _) => (false, None),
            };
            Entry {
                credential,
                generation,
                soft_wall: windows.map(|w| w.0),
                soft_at,
                hard_wall: windows.map(|w| w.2),
                hard_at: windows.map(|w| w.3),
                expires_at,
                expires_wall,
                installed_at: now,
                aging: AtomicBool::new(aging),
                background_claimed: AtomicBool::new(false),
                retired: AtomicBool::new(false),
                timer,
                rearm: Mutex::new(None),
                rearm_at: std::sync::atomic::AtomicU64::new(0),
            }
        })
    }

    /// How long before its expiry a credential's soft and hard windows open: fractions of
    /// the lifetime it was issued with. A credential that does not say when it was issued
    /// may have reached the cache late in its life (from a store, handed over): the
    /// fractions are of the lifetime left at `wall` then, and the hard window is at least
    /// half of that lifetime or the configured hard window, whichever is shorter, so such a
    /// credential is not sent to its last second.
    fn windows(
        &self,
        credential: &Credential,
        expires: SystemTime,
        wall: SystemTime,
    ) -> (Duration, Duration) {
        let issued = credential.lifetime();
        let lifetime =
            issued.unwrap_or_else(|| expires.duration_since(wall).unwrap_or(Duration::ZERO));
        let (mut soft, mut hard) =
            config::windows(&self.config, lifetime.as_secs_f64(), fastrand::f64());
        if issued.is_none() {
            let floor = (lifetime.as_secs_f64() / 2.0).min(self.config.hard_window.as_secs_f64());
            hard = hard.max(floor);
            soft = soft.max(hard);
        }
        let secs = |s: f64| Duration::try_from_secs_f64(s).unwrap_or(lifetime);
        (secs(soft), secs(hard))
    }

    /// Whether a credential loaded from the store may be taken: usable, and not one this
    /// cache stopped using (rejected, invalidated, replaced, or fetched across an
    /// invalidation: see `forget_suspect`).
    fn is_reusable_stored(&self, credential: &Credential) -> bool {
        self.is_usable_stored(credential) && !self.lock_state().dropped(credential)
    }

    /// A fetch made suspect by an invalidation brought `entry`: remembered as retired
    /// (a rejection of it is told it apart from its replacement, and the store's copy
    /// is not taken back), and, if the source brought it, as what the invalidation
    /// dropped (the next fetch is told it, and removes it from the store, or keeps only
    /// its refresh token there). One the store brought (`from_store`: another process's)
    /// is not what the source holds, so the next fetch is told what the invalidation
    /// dropped still. Called with the state lock held.
    fn forget_suspect(&self, state: &mut State, entry: &Entry, from_store: bool) {
        state.remember_retired(entry, Retired::Tainted);
        if from_store {
            return;
        }
        // The newest credential this cache dropped: the one a source hands back if any,
        // and the one the store holds, if this fetch saved it there.
        if let Some(dropped) = &mut state.invalidated {
            *dropped = Some(entry.credential.clone());
        }
        // A fetch chained after this one may have taken the marker already: told as it
        // begins. The next marker taken, or credential installed, clears it.
        state.tainted_result = Some(entry.credential.clone());
    }

    /// When `credential` stops being valid as this cache counts, looked at on its clock at
    /// `wall`: its expiry, but never more than its lifetime after this cache first saw
    /// it. One issued in this clock's future (another process's, through a store, on a
    /// host whose clock runs ahead of this one's; or handed over) would otherwise be sent
    /// past its real end by as much as that clock is ahead; such a credential's first
    /// sighting is remembered (the last few), so that seeing it again (handed over
    /// again, fetched again from a fixed source) does not start its lifetime over. One
    /// issued in this clock's past keeps its expiry.
    pub(super) fn believed_expiry(
        &self,
        credential: &Credential,
        wall: SystemTime,
    ) -> Option<SystemTime> {
        let expiry = credential.expiry()?;
        let (Some(issued), Some(lifetime)) = (credential.issued(), credential.lifetime()) else {
            return Some(expiry);
        };
        let mut sightings = self
            .sightings
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Seen before in this clock's future: as believed then, whatever the clock says
        // of its issue time now.
        if let Some((_, believed)) = sightings.iter().find(|(seen, _)| seen == credential) {
            return Some(*believed);
        }
        if issued <= wall {
            return Some(expiry);
        }
        let believed = wall
            .checked_add(lifetime)
            .map_or(expiry, |whole| expiry.min(whole));
        if sightings.len() == SIGHTINGS {
            sightings.remove(0);
        }
        sightings.push((credential.clone(), believed));
        Some(believed)
    }

    /// Whether a credential found in the store is worth using instead of fetching: not
    /// expired, and (for a proactive source) not in its hard window, by the lifetime it
    /// was issued with.
    fn is_usable_stored(&self, credential: &Credential) -> bool {
        let wall = self.config.clock.now();
        match self.believed_expiry(credential, wall) {
            None => true,
            Some(expires_at) if expires_at <= wall => false,
            Some(expires_at) => match self.mode {
                RefreshMode::ReactiveOnly | RefreshMode::Never => true,
                RefreshMode::Proactive => {
                    let (_, hard) = self.windows(credential, expires_at, wall);
                    expires_at
                        .checked_sub(hard)
                        .is_some_and(|hard_at| wall < hard_at)
                }
            },
        }
    }

    /// A refresh that failed answered with `entry`, handed over meanwhile: a background
    /// refresh of `entry` claimed by a caller who joined it is given back after a
    /// backoff step, as after any failed background refresh (else `entry` would not be
    /// refreshed before its hard window).
    fn give_back_claim(&self, entry: &Arc<Entry>, now: Instant) {
        if entry.background_claimed.load(Ordering::Acquire) {
            self.rearm_background(entry, config::saturating_add(now, self.backoff(1)));
        }
    }

    /// After a failed background refresh, lets the next caller in `entry`'s soft window
    /// try again once the backoff ends at `retry_at`; with keep-warm, tries again itself
    /// then. The timer goes with the entry.
    fn rearm_background(&self, entry: &Arc<Entry>, retry_at: Instant) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No timer to give the claim back: given back now. A caller in the soft
            // window claims it again and is held to the backoff (`plan`, which re-arms
            // on that caller's runtime).
            entry.background_claimed.store(false, Ordering::Release);
            return;
        };
        let weak = Arc::downgrade(entry);
        let warm = self.config.keep_warm.then(|| self.me.clone());
        let generation = entry.generation;
        // Its runtime may not be driven when it is due: a caller in the soft window past
        // it gives the claim back then (`CredentialCache::unstall_background`).
        let due = retry_at
            .saturating_duration_since(entry.installed_at)
            .as_nanos();
        let due = u64::try_from(due).unwrap_or(u64::MAX).max(1);
        entry.rearm_at.store(due, Ordering::Release);
        // Given back by whoever zeroes the due time first.
        let give_back = |entry: &Entry| {
            entry.rearm_at.swap(0, Ordering::AcqRel) != 0 && {
                entry.background_claimed.store(false, Ordering::Release);
                true
            }
        };
        let task = runtime.spawn(async move {
            // A runtime without timers (where a refresh fails `NoRuntime`): the claim
            // goes back now, and keep-warm, which could only fail there again, is left
            // to the next request.
            let Some(sleep) = flight::timers::sleep_until(retry_at) else {
                if let Some(entry) = weak.upgrade() {
                    give_back(&entry);
                }
                return;
            };
            sleep.await;
            match weak.upgrade() {
                Some(entry) if give_back(&entry) => {}
                _ => return,
            }
            if let Some(cache) = warm {
                keep_warm(&cache, generation);
            }
        });
        if task.is_finished() {
            // Refused by a runtime shutting down (which cancels the flight that failed):
            // given back now, as above, or no caller on another runtime would refresh
            // the entry before its hard window.
            give_back(entry);
        }
        let mut rearm = entry.rearm.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(previous) = rearm.replace(task.abort_handle()) {
            previous.abort();
        }
    }

    fn backoff(&self, failures: u32) -> Duration {
        config::backoff(&self.config, failures, fastrand::f64())
    }
}
