//! The credential cache: lock-free reads, single-flight refresh, expiry windows, backoff.
//!
//! This file holds all of the refresh logic. The hot path (`CredentialCache::current`,
//! crate-private) is one `ArcSwap` load and one atomic read: no lock, no await, no
//! allocation, no clock read. Everything else happens on the refresh path, under one
//! mutex that is never held across an await:
//!
//! - **Single flight.** However many callers need a new credential, one task fetches it
//!   and every waiter receives that one result, success or error. The task is spawned, so
//!   a refresh continues when the request that started it is dropped.
//! - **Two windows before expiry** (proactive sources only). Each credential's lifetime
//!   `L` is measured when it arrives. In the *soft* window (the last
//!   `min(L × 1/4, soft_window)`, widened by up to `window_jitter` at random so a fleet
//!   does not refresh in lockstep) the first caller starts a background refresh and
//!   everyone keeps using the still-valid credential. In the *hard* window (the last
//!   `min(L × 1/20, hard_window)`) callers wait for the refresh. A timer flips each
//!   credential into its soft window, so requests before it never read the clock. The
//!   timer is a task on the runtime that installed the credential: if that runtime shuts
//!   down while another keeps using the cache, the credential is refreshed when the API
//!   rejects it instead of before it expires.
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
//!   is still the current one, so a thousand concurrent 401s cause one refresh.
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
//!     .build();
//! // One cache can back several layers (and clients): they share one credential.
//! let layer = AuthLayer::with_cache(cache.clone());
//! # let _ = layer;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use arc_swap::{ArcSwapOption, Guard};
use futures_util::future::{FutureExt, Shared};
use tokio::{task::JoinHandle, time::Instant};
use tracing::Instrument;

use crate::{
    credential::Credential,
    error::{Error, ErrorKind},
    source::{CredentialSource, FetchContext, FetchReason, RefreshMode},
    store::CredentialStore,
};

/// Default longest time a fetch may take before it fails with [`ErrorKind::Timeout`].
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Default cap on the soft window (background refresh while the credential is still used).
pub const DEFAULT_SOFT_WINDOW: Duration = Duration::from_secs(5 * 60);
/// Default cap on the hard window (callers wait for the refresh).
pub const DEFAULT_HARD_WINDOW: Duration = Duration::from_secs(30);
/// Share of a credential's lifetime that the soft window covers at most.
pub const SOFT_WINDOW_FRACTION: f64 = 0.25;
/// Share of a credential's lifetime that the hard window covers at most.
pub const HARD_WINDOW_FRACTION: f64 = 0.05;
/// Default random widening of the soft window, as a fraction of it (0.2: up to 20 %).
pub const DEFAULT_WINDOW_JITTER: f64 = 0.2;
/// Default delay after the first failed fetch; it doubles with each further failure.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Default cap on the delay between failed fetches.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A credential rejected within this long of becoming current, before the API accepted
/// any request carrying it, counts as rejected *fresh*: the API may reject every new one
/// too (a wrong audience or scope, clock skew
/// at the API). After such a rejection, the next one causes a fetch only once the
/// backoff (the same schedule as failed fetches) allows; until then the rejected
/// response is returned marked [`NotReplayed::FreshCredentialRejected`]. 10 seconds.
///
/// [`NotReplayed::FreshCredentialRejected`]: crate::NotReplayed::FreshCredentialRejected
pub const YOUNG_CREDENTIAL_AGE: Duration = Duration::from_secs(10);

/// Longest wait a token endpoint's `Retry-After` can impose: 5 minutes. A longer one is
/// taken as this, so a misconfigured server cannot stop a client for hours.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(5 * 60);

/// `at + delay`, or a time decades away when that is past what the clock can hold (a
/// huge configured backoff must not panic inside the flight).
fn saturating_add(at: Instant, delay: Duration) -> Instant {
    at.checked_add(delay)
        .unwrap_or_else(|| at + Duration::from_secs(30 * 365 * 24 * 3600))
}

/// Caches the credential of one [`CredentialSource`] and refreshes it. Cheap to clone:
/// clones share the cache. See the [module docs](self) for the rules.
pub struct CredentialCache<P> {
    inner: Arc<Inner<P>>,
}

impl<P> Clone for CredentialCache<P> {
    fn clone(&self) -> Self {
        CredentialCache {
            inner: self.inner.clone(),
        }
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

/// Builds a [`CredentialCache`] with non-default settings.
pub struct CredentialCacheBuilder<P> {
    source: P,
    config: Config,
}

impl<P> fmt::Debug for CredentialCacheBuilder<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialCacheBuilder")
            .field("source", &std::any::type_name::<P>())
            .field("config", &self.config)
            .finish()
    }
}

#[derive(Clone)]
struct Config {
    fetch_timeout: Duration,
    soft_window: Duration,
    hard_window: Duration,
    window_jitter: f64,
    backoff_base: Duration,
    backoff_max: Duration,
    store: Option<Arc<dyn CredentialStore>>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("fetch_timeout", &self.fetch_timeout)
            .field("soft_window", &self.soft_window)
            .field("hard_window", &self.hard_window)
            .field("window_jitter", &self.window_jitter)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_max", &self.backoff_max)
            .field("store", &self.store.is_some())
            .finish()
    }
}

impl<P: CredentialSource> CredentialCacheBuilder<P> {
    /// Longest time one fetch may take (default [`DEFAULT_FETCH_TIMEOUT`]): the whole
    /// flight, store calls included (each at most a [`STORE_SHARE`] of it).
    pub fn fetch_timeout(mut self, timeout: Duration) -> Self {
        self.config.fetch_timeout = timeout;
        self
    }

    /// Cap on the soft window (default [`DEFAULT_SOFT_WINDOW`]). `Duration::ZERO` turns
    /// background refresh off.
    pub fn soft_window(mut self, window: Duration) -> Self {
        self.config.soft_window = window;
        self
    }

    /// Cap on the hard window (default [`DEFAULT_HARD_WINDOW`]). Credentials are not
    /// sent during their last `hard_window`: callers wait for the new one.
    pub fn hard_window(mut self, window: Duration) -> Self {
        self.config.hard_window = window;
        self
    }

    /// Random widening of the soft window, as a fraction of it, clamped to `0.0..=1.0`
    /// (default [`DEFAULT_WINDOW_JITTER`]).
    pub fn window_jitter(mut self, jitter: f64) -> Self {
        self.config.window_jitter = if jitter.is_nan() {
            0.0
        } else {
            jitter.clamp(0.0, 1.0)
        };
        self
    }

    /// Backoff after failed fetches: `base` after the first, doubling, at most `max`
    /// (defaults [`DEFAULT_BACKOFF_BASE`], [`DEFAULT_BACKOFF_MAX`]).
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.config.backoff_base = base;
        self.config.backoff_max = max.max(base);
        self
    }

    /// Shares credentials through `store` (see [`crate::store`]).
    pub fn store(mut self, store: impl CredentialStore) -> Self {
        self.config.store = Some(Arc::new(store));
        self
    }

    /// Builds the cache and attaches the source to it.
    pub fn build(self) -> CredentialCache<P> {
        let mode = self.source.refresh_mode();
        let inner = Arc::new(Inner {
            source: self.source,
            mode,
            config: self.config,
            current: ArcSwapOption::empty(),
            state: Mutex::new(State::default()),
            stats: Stats::default(),
            store_down: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
        });
        let weak: Weak<Inner<P>> = Arc::downgrade(&inner);
        inner.source.attach(CacheHandle { inner: weak });
        CredentialCache { inner }
    }
}

impl<P: CredentialSource> CredentialCache<P> {
    /// A cache with the default settings.
    pub fn new(source: P) -> Self {
        Self::builder(source).build()
    }

    /// A builder for a cache with other settings.
    pub fn builder(source: P) -> CredentialCacheBuilder<P> {
        CredentialCacheBuilder {
            source,
            config: Config {
                fetch_timeout: DEFAULT_FETCH_TIMEOUT,
                soft_window: DEFAULT_SOFT_WINDOW,
                hard_window: DEFAULT_HARD_WINDOW,
                window_jitter: DEFAULT_WINDOW_JITTER,
                backoff_base: DEFAULT_BACKOFF_BASE,
                backoff_max: DEFAULT_BACKOFF_MAX,
                store: None,
            },
        }
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

    /// Reports that the API rejected `credential`, and waits for its replacement.
    ///
    /// Only a credential that is still the current one is invalidated: when many callers
    /// report the same rejection, the source is asked once.
    pub async fn reject(&self, credential: &Credential) -> Result<Credential, Error> {
        let generation = {
            let current = self.inner.current.load();
            match current.as_deref() {
                Some(entry) if entry.credential == *credential => Some(entry.generation),
                _ => None,
            }
        };
        let acquire = match generation {
            Some(generation) => self.replace_rejected(generation),
            None => self.acquire(None),
        };
        acquire.await.map(|entry| entry.credential.clone())
    }

    /// A handle that replaces or invalidates this cache's credential from elsewhere.
    pub fn handle(&self) -> CacheHandle {
        let weak: Weak<Inner<P>> = Arc::downgrade(&self.inner);
        CacheHandle { inner: weak }
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

    /// Whether `entry`, the current entry as just read, may be sent now; if not, the
    /// refresh to wait for. Inlined for its common case: an entry before its soft window
    /// (one flag, no clock).
    #[inline]
    pub(crate) fn usable<'e>(&self, entry: Option<&'e Entry>) -> Result<&'e Entry, Acquire> {
        match entry {
            Some(entry) if !entry.aging.load(Ordering::Acquire) => Ok(entry),
            _ => self.usable_aging(entry),
        }
    }

    #[cold]
    #[inline(never)]
    fn usable_aging<'e>(&self, entry: Option<&'e Entry>) -> Result<&'e Entry, Acquire> {
        if let Some(entry) = entry {
            match entry.phase_at(Instant::now()) {
                Phase::Fresh => return Ok(entry),
                Phase::Soft => {
                    if !entry.background_claimed.load(Ordering::Relaxed)
                        && !entry.background_claimed.swap(true, Ordering::AcqRel)
                    {
                        drop(self.acquire(Some(Want::Background(entry.generation))));
                    }
                    return Ok(entry);
                }
                Phase::Hard => {}
            }
        }
        Err(self.acquire(None))
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
            .find(|(g, _)| *g == generation)
            .map(|(_, c)| c.clone())
    }

    /// The API rejected the credential of `generation`: invalidate it if it is still
    /// current, and return the refresh that replaces it.
    pub(crate) fn replace_rejected(&self, generation: u64) -> Acquire {
        self.acquire(Some(Want::Replace(generation)))
    }

    /// The refresh path. `want`: `None` for "a credential I may send now".
    fn acquire(&self, want: Option<Want>) -> Acquire {
        let inner = &self.inner;
        let now = Instant::now();
        let mut state = inner.lock_state();
        let current = inner.current.load_full();
        let mut reason = FetchReason::Initial;
        let mut previous = None;
        let mut still_valid = None;
        if let Some(entry) = current {
            match want {
                Some(Want::Replace(generation)) if entry.generation == generation => {
                    let never_accepted = inner.accepted.load(Ordering::Relaxed) <= generation;
                    let young =
                        now.saturating_duration_since(entry.installed_at) < YOUNG_CREDENTIAL_AGE;
                    if young && never_accepted {
                        // Rejected right after it was issued: a new one may well be
                        // rejected too. Fetch again only as the backoff allows.
                        if let Some(at) = state.fresh_rejection_retry_at.filter(|at| now < *at) {
                            return Acquire::ready(Err(Error::fresh_rejection(at - now)));
                        }
                        state.fresh_rejections = state.fresh_rejections.saturating_add(1);
                        let delay = inner.backoff(state.fresh_rejections);
                        state.fresh_rejection_retry_at = Some(saturating_add(now, delay));
                    } else {
                        state.fresh_rejections = 0;
                        state.fresh_rejection_retry_at = None;
                    }
                    tracing::debug!(generation, "credential rejected; invalidating it");
                    inner.stats.rejections.fetch_add(1, Ordering::Relaxed);
                    inner.retire(&mut state);
                    inner.current.store(None);
                    reason = FetchReason::Rejected;
                    previous = Some(entry.credential.clone());
                }
                Some(Want::Background(generation)) if entry.generation != generation => {
                    return Acquire::ready(Ok(entry));
                }
                Some(Want::Background(_)) => {
                    reason = FetchReason::Expiring;
                    previous = Some(entry.credential.clone());
                    still_valid = Some(entry);
                }
                _ => match entry.phase_at(now) {
                    Phase::Fresh | Phase::Soft => return Acquire::ready(Ok(entry)),
                    Phase::Hard => {
                        reason = FetchReason::Expiring;
                        previous = Some(entry.credential.clone());
                        still_valid = Some(entry).filter(|e| !e.is_expired_at(now));
                    }
                },
            }
        }
        if let Some(flight) = &state.flight {
            return Acquire::waiting(flight.clone(), still_valid);
        }
        if let Some(retry_at) = state.retry_at.filter(|at| now < *at) {
            if let Some(entry) = still_valid {
                // Backing off: keep serving what is still valid rather than failing. A
                // caller that just claimed the background refresh gives the claim back
                // when the backoff ends; a hard-window caller claimed nothing.
                if matches!(want, Some(Want::Background(_))) {
                    rearm_background(&entry, retry_at);
                }
                return Acquire::ready(Ok(entry));
            }
            let err = match &state.last_error {
                // A refused transport stays that, however often it is asked for.
                Some(last) if last.kind() == ErrorKind::InsecureTransport => last.clone(),
                Some(last) => {
                    Error::new(ErrorKind::Backoff).with_shared_source(Arc::new(last.clone()))
                }
                None => Error::new(ErrorKind::Backoff),
            };
            return Acquire::ready(Err(err.with_retry_in(retry_at - now)));
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Acquire::ready(Err(Error::new(ErrorKind::NoRuntime)));
        };
        if reason == FetchReason::Initial {
            if let Some(dropped) = state.invalidated.take() {
                reason = FetchReason::Invalidated;
                previous = dropped;
            }
        }
        state.flight_id += 1;
        let guard = FlightGuard {
            inner: self.inner.clone(),
            epoch: state.epoch,
            id: state.flight_id,
            done: false,
        };
        inner.stats.fetches.fetch_add(1, Ordering::Relaxed);
        let cx = FetchContext::new(reason, previous);
        let span = tracing::debug_span!("credential_refresh", reason = ?reason);
        tracing::debug!(parent: &span, background = still_valid.is_some(), "starting credential refresh");
        let task = runtime.spawn(run_flight(guard, cx).instrument(span));
        let flight = FlightFuture { task }.shared();
        state.flight = Some(flight.clone());
        Acquire::waiting(flight, still_valid)
    }
}

/// A handle to a cache that replaces or invalidates its credential from outside the
/// request path. Given to [`CredentialSource::attach`]; it does not keep the cache alive.
#[derive(Clone)]
pub struct CacheHandle {
    inner: Weak<dyn Sink>,
}

impl CacheHandle {
    /// Whether the cache is still alive (handles do not keep it alive).
    pub fn is_alive(&self) -> bool {
        self.inner.strong_count() > 0
    }

    /// Makes `credential` the current one at once, ahead of any refresh in flight.
    /// Returns `false` if the cache is gone.
    pub fn replace(&self, credential: Credential) -> bool {
        match self.inner.upgrade() {
            Some(sink) => {
                sink.replace(credential);
                true
            }
            None => false,
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

impl fmt::Debug for CacheHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheHandle")
            .field("alive", &(self.inner.strong_count() > 0))
            .finish()
    }
}

trait Sink: Send + Sync {
    fn replace(&self, credential: Credential);
    fn invalidate(&self);
}

impl<P: CredentialSource> Sink for Inner<P> {
    fn replace(&self, credential: Credential) {
        let mut state = self.lock_state();
        // A fetch in flight started before this value existed: its result must not win.
        state.epoch += 1;
        state.failures = 0;
        state.retry_at = None;
        state.last_error = None;
        tracing::debug!("credential replaced from outside");
        self.install(&mut state, credential, Instant::now());
    }

    fn invalidate(&self) {
        let mut state = self.lock_state();
        state.epoch += 1;
        // The next fetch is told what was dropped, so that a source holding a last
        // credential does not hand it back.
        let dropped = self.current.load_full().map(|e| e.credential.clone());
        let dropped = dropped.or_else(|| state.invalidated.take().flatten());
        self.retire(&mut state);
        state.invalidated = Some(dropped);
        self.current.store(None);
        // A fetch in flight started before the invalidation: the next request must not
        // join it (its result is handed to its own waiters only).
        state.flight = None;
    }
}

struct Inner<P> {
    source: P,
    mode: RefreshMode,
    config: Config,
    /// The hot path reads this; it is written only under `state`'s lock.
    current: ArcSwapOption<Entry>,
    state: Mutex<State>,
    stats: Stats,
    /// Whether the store's last call failed: its outage is logged once.
    store_down: AtomicBool,
    /// One more than the newest generation the API answered with anything but a
    /// rejection: written once per credential, read on every answer.
    accepted: AtomicU64,
}

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
    /// Times the refresh path started (a store lookup, then the source if needed).
    pub fetches: u64,
    /// Refreshes that failed (error, timeout, panic, cancelled).
    pub fetch_failures: u64,
    /// Rejections that invalidated the current credential (at most one per credential).
    pub rejections: u64,
    /// Requests replayed with a new credential after a rejection.
    pub replays: u64,
}

#[derive(Default)]
struct State {
    flight: Option<Shared<FlightFuture>>,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<Error>,
    /// Bumped when the credential is replaced from outside; a fetch that started in an
    /// older epoch does not install its result.
    epoch: u64,
    next_generation: u64,
    /// Counts flights started; see `FlightGuard::id`.
    flight_id: u64,
    /// Set by an explicit invalidation, with the credential it dropped: the next fetch
    /// is a [`FetchReason::Invalidated`] one.
    invalidated: Option<Option<Credential>>,
    /// The last few credentials that stopped being current, by generation: a request
    /// whose credential was rejected after it was already replaced can still tell
    /// whether the replacement is the same value.
    retired: std::collections::VecDeque<(u64, Credential)>,
    /// Consecutive rejections of credentials younger than [`YOUNG_CREDENTIAL_AGE`], and
    /// when the next one may cause a fetch.
    fresh_rejections: u32,
    fresh_rejection_retry_at: Option<Instant>,
}

/// How many replaced credentials [`State::retired`] remembers.
const RETIRED_KEPT: usize = 8;

#[derive(Clone, Copy)]
enum Want {
    /// Replace the credential of this generation, which the API rejected.
    Replace(u64),
    /// Refresh the credential of this generation in the background (soft window).
    Background(u64),
}

impl<P: CredentialSource> Inner<P> {
    fn lock_state(&self) -> MutexGuard<'_, State> {
        // The lock is never held across user code, so poisoning cannot leave it
        // half-updated; recover rather than propagate a panic to every caller.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers the current credential as retired, before it stops being current.
    /// Called with the state lock held.
    fn retire(&self, state: &mut State) {
        if let Some(entry) = self.current.load_full() {
            if state.retired.len() == RETIRED_KEPT {
                state.retired.pop_front();
            }
            state
                .retired
                .push_back((entry.generation, entry.credential.clone()));
        }
    }

    /// Makes `credential` current. Called with the state lock held.
    fn install(&self, state: &mut State, credential: Credential, now: Instant) -> Arc<Entry> {
        self.retire(state);
        state.invalidated = None;
        let entry = self.entry(state, credential, now);
        self.current.store(Some(entry.clone()));
        entry
    }

    /// A new entry for `credential`, not (yet) current. Called with the state lock held.
    fn entry(&self, state: &mut State, credential: Credential, now: Instant) -> Arc<Entry> {
        let generation = state.next_generation;
        state.next_generation += 1;
        let (soft_at, hard_at) = match (self.mode, credential.expiry()) {
            (RefreshMode::Proactive, Some(expires_at)) => self.windows(expires_at, now),
            _ => (None, None),
        };
        let runtime = tokio::runtime::Handle::try_current().ok();
        Arc::new_cyclic(|weak: &Weak<Entry>| {
            // Without a runtime for the timer, the entry starts aging at once: correct,
            // only a clock read per request slower.
            let (aging, timer) = match (soft_at, &runtime) {
                (Some(at), Some(rt)) if at > now => {
                    let guard = AgeOnDrop(weak.clone());
                    let task = rt.spawn(async move {
                        let _guard = guard;
                        tokio::time::sleep_until(at).await;
                    });
                    (false, Some(task.abort_handle()))
                }
                (Some(_), _) => (true, None),
                (None, _) => (false, None),
            };
            Entry {
                credential,
                generation,
                soft_at,
                hard_at,
                installed_at: now,
                aging: AtomicBool::new(aging),
                background_claimed: AtomicBool::new(false),
                timer,
            }
        })
    }

    /// When the soft and hard windows of a credential expiring at `expires_at` open.
    fn windows(&self, expires_at: Instant, now: Instant) -> (Option<Instant>, Option<Instant>) {
        let lifetime = expires_at.saturating_duration_since(now).as_secs_f64();
        let cfg = &self.config;
        let hard = (lifetime * HARD_WINDOW_FRACTION).min(cfg.hard_window.as_secs_f64());
        let soft = (lifetime * SOFT_WINDOW_FRACTION)
            .min(cfg.soft_window.as_secs_f64())
            .max(hard);
        let soft = (soft * (1.0 + cfg.window_jitter * fastrand::f64())).min(lifetime);
        let at = |before: f64| {
            Duration::try_from_secs_f64(before)
                .ok()
                .and_then(|d| expires_at.checked_sub(d))
                .unwrap_or(now)
        };
        (Some(at(soft)), Some(at(hard)))
    }

    /// Whether a credential found in the store is worth using instead of fetching.
    fn is_usable_stored(&self, credential: &Credential, now: Instant) -> bool {
        match credential.expiry() {
            None => true,
            Some(expires_at) if expires_at <= now => false,
            Some(expires_at) => match self.mode {
                RefreshMode::ReactiveOnly | RefreshMode::Never => true,
                RefreshMode::Proactive => {
                    let (_, hard_at) = self.windows(expires_at, now);
                    hard_at.is_none_or(|at| now < at)
                }
            },
        }
    }

    fn backoff(&self, failures: u32) -> Duration {
        let cfg = &self.config;
        let exp = failures.saturating_sub(1).min(30);
        let full = cfg
            .backoff_base
            .saturating_mul(1 << exp)
            .min(cfg.backoff_max);
        // "Equal jitter": between half and all of the exponential delay.
        full / 2 + full.mul_f64(fastrand::f64() / 2.0)
    }
}

/// One cached credential and its refresh bookkeeping.
pub(crate) struct Entry {
    pub(crate) credential: Credential,
    pub(crate) generation: u64,
    /// When its background refresh may start (proactive sources with an expiry).
    soft_at: Option<Instant>,
    /// When callers must stop using it and wait (proactive sources with an expiry).
    hard_at: Option<Instant>,
    /// When it became current: a rejection soon after counts as a fresh rejection.
    installed_at: Instant,
    /// Set once the soft window opens; until then the hot path reads no clock.
    aging: AtomicBool,
    /// Whether a caller already started this entry's background refresh.
    background_claimed: AtomicBool,
    timer: Option<tokio::task::AbortHandle>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Some(timer) = &self.timer {
            timer.abort();
        }
    }
}

enum Phase {
    Fresh,
    Soft,
    Hard,
}

impl Entry {
    fn phase_at(&self, now: Instant) -> Phase {
        // `aging` may be set before the soft window opens (its timer died with its
        // runtime): the clock decides then.
        if !self.aging.load(Ordering::Acquire) || self.soft_at.is_some_and(|at| now < at) {
            Phase::Fresh
        } else if self.hard_at.is_some_and(|at| now >= at) {
            Phase::Hard
        } else {
            Phase::Soft
        }
    }

    fn is_expired_at(&self, now: Instant) -> bool {
        self.credential.expiry().is_some_and(|at| now >= at)
    }
}

/// Owned by an entry's aging timer: however the timer ends (its instant came, or its
/// runtime shut down and dropped it), the entry starts aging, and from then on the
/// clock decides. An entry dropped first is simply gone.
struct AgeOnDrop(Weak<Entry>);

impl Drop for AgeOnDrop {
    fn drop(&mut self) {
        if let Some(entry) = self.0.upgrade() {
            entry.aging.store(true, Ordering::Release);
        }
    }
}

/// After a failed background refresh, lets the next caller in the soft window try again
/// once the backoff is over.
fn rearm_background(entry: &Arc<Entry>, retry_at: Instant) {
    let weak = Arc::downgrade(entry);
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            tokio::time::sleep_until(retry_at).await;
            if let Some(entry) = weak.upgrade() {
                entry.background_claimed.store(false, Ordering::Release);
            }
        });
    }
}

/// A credential that may be sent now, borrowed from the cache without a reference count.
pub(crate) struct Current(Guard<Option<Arc<Entry>>>);

impl std::ops::Deref for Current {
    type Target = Entry;

    fn deref(&self) -> &Entry {
        // `current` only builds a `Current` from a guard holding an entry.
        self.0.as_deref().expect("Current always holds an entry")
    }
}

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

/// Waits for a credential from the refresh path.
pub(crate) struct Acquire {
    state: AcquireState,
    /// A credential in its hard window that has not expired: if the refresh fails, it is
    /// still better than an error. Never set for a rejected credential.
    fallback: Option<Arc<Entry>>,
}

enum AcquireState {
    Ready(Option<Result<Arc<Entry>, Error>>),
    Waiting(Shared<FlightFuture>),
}

impl Acquire {
    fn ready(result: Result<Arc<Entry>, Error>) -> Self {
        Acquire {
            state: AcquireState::Ready(Some(result)),
            fallback: None,
        }
    }

    fn waiting(flight: Shared<FlightFuture>, fallback: Option<Arc<Entry>>) -> Self {
        Acquire {
            state: AcquireState::Waiting(flight),
            fallback,
        }
    }
}

impl Future for Acquire {
    type Output = Result<Arc<Entry>, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            AcquireState::Ready(result) => Poll::Ready(
                result
                    .take()
                    .unwrap_or_else(|| Err(Error::new(ErrorKind::PolledAfterCompletion))),
            ),
            AcquireState::Waiting(flight) => {
                let result = ready!(Pin::new(flight).poll(cx));
                Poll::Ready(match (result, self.fallback.take()) {
                    (Err(err), Some(entry)) if !entry.is_expired_at(Instant::now()) => {
                        tracing::debug!(error = %err, "refresh failed; using the still-valid credential");
                        Ok(entry)
                    }
                    (result, _) => result,
                })
            }
        }
    }
}

impl fmt::Debug for Acquire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Acquire")
    }
}

/// The spawned refresh task, as a future every waiter can share.
pub(crate) struct FlightFuture {
    task: JoinHandle<Result<Arc<Entry>, Error>>,
}

impl Future for FlightFuture {
    type Output = Result<Arc<Entry>, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.task)
            .poll(cx)
            .map(|joined| match joined {
                Ok(result) => result,
                Err(e) if e.is_panic() => Err(Error::new(ErrorKind::SourcePanicked)),
                Err(_) => Err(Error::new(ErrorKind::Cancelled)),
            })
    }
}

/// Owned by the refresh task. Whatever way the task ends (done, panicked, cancelled by a
/// runtime shutting down, or never polled), the flight is cleared and a failure is
/// counted, so the single-flight state can never wedge.
struct FlightGuard<P: CredentialSource> {
    inner: Arc<Inner<P>>,
    epoch: u64,
    /// Which flight this is: an invalidation detaches a flight, and a newer one may be
    /// in `State::flight` by the time this one ends.
    id: u64,
    done: bool,
}

impl<P: CredentialSource> FlightGuard<P> {
    fn finish(&mut self, result: Result<Credential, Error>) -> Result<Arc<Entry>, Error> {
        self.done = true;
        let inner = &self.inner;
        let now = Instant::now();
        let mut state = inner.lock_state();
        if state.flight_id == self.id {
            state.flight = None;
        }
        match result {
            Ok(credential) => {
                state.failures = 0;
                state.retry_at = None;
                state.last_error = None;
                if state.epoch != self.epoch {
                    if let Some(current) = inner.current.load_full() {
                        tracing::debug!("fetched credential superseded by a replacement");
                        return Ok(current);
                    }
                    if state.invalidated.is_some() {
                        // Invalidated while this fetch ran: its result predates the
                        // invalidation, so it goes to its own waiters only; the next
                        // request fetches anew.
                        tracing::debug!("fetched credential predates an invalidation");
                        return Ok(inner.entry(&mut state, credential, now));
                    }
                }
                let entry = inner.install(&mut state, credential, now);
                tracing::debug!(generation = entry.generation, "credential refreshed");
                Ok(entry)
            }
            Err(err) => {
                Self::record_failure(inner, &mut state, &err, now);
                Err(err)
            }
        }
    }

    fn record_failure(inner: &Inner<P>, state: &mut State, err: &Error, now: Instant) {
        inner.stats.fetch_failures.fetch_add(1, Ordering::Relaxed);
        state.failures = state.failures.saturating_add(1);
        let mut delay = inner.backoff(state.failures);
        if let Some(asked) = err.not_before {
            // The endpoint said when (`Retry-After`): no earlier, within reason.
            delay = delay.max(asked.min(MAX_RETRY_AFTER));
        }
        let retry_at = saturating_add(now, delay);
        state.retry_at = Some(retry_at);
        state.last_error = Some(err.clone());
        tracing::warn!(
            failures = state.failures,
            retry_in_ms = delay.as_millis() as u64,
            error = %err,
            cause = err_source(err),
            "credential refresh failed; backing off"
        );
        if let Some(entry) = inner.current.load_full() {
            rearm_background(&entry, retry_at);
        }
    }
}

/// Wraps a source's error, keeping the crate's own typed errors as they are.
fn fetch_error(e: crate::error::BoxError) -> Error {
    let e = match e.downcast::<Error>() {
        Ok(ours) => return *ours,
        Err(e) => e,
    };
    // A refused transport is a configuration error, not a failed fetch: it keeps its
    // kind at the top, with the token error below it.
    if let Some(token) = e.downcast_ref::<crate::token::TokenError>() {
        let kind = match token.kind() {
            crate::token::TokenErrorKind::InsecureTransport => ErrorKind::InsecureTransport,
            _ => ErrorKind::Fetch,
        };
        let not_before = token.retry_after_hint();
        let mut err = Error::new(kind).with_source(e);
        err.not_before = not_before;
        return err;
    }
    match e.downcast::<crate::error::InvalidCredential>() {
        Ok(invalid) => Error::from(*invalid),
        Err(e) => Error::new(ErrorKind::Fetch).with_source(e),
    }
}

/// The cause of `err`, made safe to log: it may be a user source's text.
fn err_source(err: &Error) -> String {
    use std::error::Error as _;
    err.source()
        .map(|s| crate::text::foreign(&s.to_string()))
        .unwrap_or_default()
}

impl<P: CredentialSource> Drop for FlightGuard<P> {
    fn drop(&mut self) {
        if !self.done {
            let err = Error::new(ErrorKind::Cancelled);
            let mut state = self.inner.lock_state();
            if state.flight_id == self.id {
                state.flight = None;
            }
            Self::record_failure(&self.inner, &mut state, &err, Instant::now());
        }
    }
}

async fn run_flight<P: CredentialSource>(
    mut guard: FlightGuard<P>,
    cx: FetchContext,
) -> Result<Arc<Entry>, Error> {
    let result = obtain(&guard.inner, cx).await;
    guard.finish(result)
}

/// Gets a credential from the store, or else from the source. One deadline, the fetch
/// timeout, bounds it all: each store call gets at most a [`STORE_SHARE`] of it, and a
/// store that fails or does not answer in time is skipped (logged once per outage).
async fn obtain<P: CredentialSource>(
    inner: &Inner<P>,
    cx: FetchContext,
) -> Result<Credential, Error> {
    let deadline = saturating_add(Instant::now(), inner.config.fetch_timeout);
    if let Some(store) = &inner.config.store {
        if let (FetchReason::Rejected | FetchReason::Invalidated, Some(rejected)) =
            (cx.reason(), cx.previous())
        {
            store_call(inner, deadline, "remove", store.remove(rejected)).await;
        }
        if let Some(Some(stored)) = store_call(inner, deadline, "load", store.load()).await {
            if Some(&stored) != cx.previous() && inner.is_usable_stored(&stored, Instant::now()) {
                tracing::debug!("using the credential found in the store");
                return Ok(stored);
            }
        }
    }
    let fetched = tokio::time::timeout_at(deadline, inner.source.fetch(cx)).await;
    let credential = match fetched {
        Err(_elapsed) => return Err(Error::new(ErrorKind::Timeout)),
        Ok(Err(e)) => return Err(fetch_error(e)),
        Ok(Ok(credential)) => credential,
    };
    if credential.expiry().is_some_and(|at| at <= Instant::now()) {
        return Err(Error::new(ErrorKind::Expired));
    }
    tracing::debug!(
        expires_in_s = credential
            .expiry()
            .map(|at| at.saturating_duration_since(Instant::now()).as_secs()),
        "credential fetched"
    );
    if let Some(store) = &inner.config.store {
        store_call(inner, deadline, "save", store.save(&credential)).await;
    }
    Ok(credential)
}

/// Share of the fetch timeout one store call may take at most: a quarter.
pub const STORE_SHARE: u32 = 4;

/// One store call, bounded by its share of the flight's deadline. `None` when it failed
/// or took too long; the first such call of an outage is logged, and so is the store's
/// first answer after it.
async fn store_call<P, T>(
    inner: &Inner<P>,
    deadline: Instant,
    what: &'static str,
    call: crate::store::StoreFuture<'_, T>,
) -> Option<T> {
    let until = deadline.min(saturating_add(
        Instant::now(),
        inner.config.fetch_timeout / STORE_SHARE,
    ));
    let failure = match tokio::time::timeout_at(until, call).await {
        Ok(Ok(value)) => {
            if inner.store_down.swap(false, Ordering::Relaxed) {
                tracing::info!(call = what, "credential store answers again");
            }
            return Some(value);
        }
        Ok(Err(e)) => crate::text::foreign(&e.to_string()),
        Err(_) => "no answer in time".to_owned(),
    };
    if !inner.store_down.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            call = what,
            error = %failure,
            "credential store failed; fetching without it until it answers again"
        );
    }
    None
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
