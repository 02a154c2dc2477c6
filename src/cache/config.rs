//! The cache's settings: the defaults, [`CredentialCacheBuilder`], and the arithmetic of
//! the refresh windows and the backoff as pure functions.

use std::{
    fmt,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, AtomicUsize},
    },
    time::Duration,
};

use tokio::time::Instant;

use super::{CredentialCache, CurrentSlot, Inner, State, Stats};
#[allow(unused_imports)] // for the docs' links
use crate::error::ErrorKind;
use crate::error::InvalidConfig;
use crate::{
    clock::{Clock, WallClock},
    handle::CacheHandle,
    source::CredentialSource,
    store::{CredentialStore, DynStore},
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
/// response is returned marked [`NotReplayed::FreshCredentialRejected`], and the
/// credential stays in use: an API whose clock is behind the issuer's accepts it a
/// moment later, whereas a new one would be as young as this one was (a cache that
/// dropped each never got one old enough). 10 seconds.
///
/// [`NotReplayed::FreshCredentialRejected`]: crate::NotReplayed::FreshCredentialRejected
pub const YOUNG_CREDENTIAL_AGE: Duration = Duration::from_secs(10);

/// Longest wait a token endpoint's `Retry-After` can impose: 5 minutes. A longer one is
/// taken as this, so a misconfigured server cannot stop a client for hours.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(5 * 60);

/// Share of the fetch timeout one store call may take at most: a quarter.
pub const STORE_SHARE: u32 = 4;

/// `at + delay`, or a time decades away when that is past what the clock can hold (a
/// huge configured backoff must not panic inside the flight).
pub(super) fn saturating_add(at: Instant, delay: Duration) -> Instant {
    at.checked_add(delay)
        .unwrap_or_else(|| at + Duration::from_secs(30 * 365 * 24 * 3600))
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
pub(super) struct Config {
    pub(super) fetch_timeout: Duration,
    pub(super) soft_window: Duration,
    pub(super) hard_window: Duration,
    pub(super) window_jitter: f64,
    pub(super) backoff_base: Duration,
    pub(super) backoff_max: Duration,
    pub(super) store: Option<Arc<dyn DynStore>>,
    pub(super) clock: WallClock,
    /// Refresh at the soft window with no request waiting (see `keep_warm`).
    pub(super) keep_warm: bool,
    /// The `cache` label of this cache's metrics.
    pub(super) name: crate::metrics::Name,
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
            .field("clock", &self.clock)
            .field("keep_warm", &self.keep_warm)
            .field("name", &self.name)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
            soft_window: DEFAULT_SOFT_WINDOW,
            hard_window: DEFAULT_HARD_WINDOW,
            window_jitter: DEFAULT_WINDOW_JITTER,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_MAX,
            store: None,
            clock: WallClock::System,
            keep_warm: false,
            name: Arc::from("default"),
        }
    }
}

impl Config {
    /// Every setting in range, and the windows consistent with each other.
    pub(super) fn validate(&self) -> Result<(), InvalidConfig> {
        let invalid = |setting, reason| Err(InvalidConfig::new(setting, reason));
        if self.fetch_timeout.is_zero() {
            return invalid("fetch_timeout", "must be more than zero");
        }
        if !(0.0..=1.0).contains(&self.window_jitter) {
            return invalid("window_jitter", "must be between 0.0 and 1.0");
        }
        let name_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if self.name.is_empty() || self.name.len() > 64 || !self.name.chars().all(name_ok) {
            return invalid(
                "name",
                "must be 1 to 64 letters, digits, '-', '_' or '.' (it labels metrics)",
            );
        }
        if self.backoff_base.is_zero() {
            return invalid("backoff", "the base must be more than zero");
        }
        if self.backoff_max < self.backoff_base {
            return invalid("backoff", "the maximum must be at least the base");
        }
        if !self.soft_window.is_zero() && self.soft_window < self.hard_window {
            // Name the one that was moved from its default.
            let setting = if self.hard_window != DEFAULT_HARD_WINDOW {
                "hard_window"
            } else {
                "soft_window"
            };
            return invalid(
                setting,
                "the soft window must be zero (no background refresh) or at least the hard window",
            );
        }
        Ok(())
    }
}

impl<P: CredentialSource> CredentialCacheBuilder<P> {
    pub(super) fn new(source: P) -> Self {
        CredentialCacheBuilder {
            source,
            config: Config::default(),
        }
    }

    /// Longest time one fetch may take (default [`DEFAULT_FETCH_TIMEOUT`]): the whole
    /// flight, store calls included (each at most a [`STORE_SHARE`] of it). The store
    /// calls that end a refresh under the lease may run past it, all together within
    /// one share: a flight that takes the store's refresh lease near its deadline lets
    /// the save that takes the refresh token out of the store end (it may land), then
    /// saves what the source brought and gives the lease back, so a caller may wait up
    /// to one share longer.
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

    /// Random widening of the soft window, as a fraction of it, in `0.0..=1.0` (default
    /// [`DEFAULT_WINDOW_JITTER`]).
    pub fn window_jitter(mut self, jitter: f64) -> Self {
        self.config.window_jitter = jitter;
        self
    }

    /// Backoff after failed fetches: `base` (more than zero) after the first, doubling,
    /// at most `max` (at least `base`). Defaults [`DEFAULT_BACKOFF_BASE`],
    /// [`DEFAULT_BACKOFF_MAX`].
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.config.backoff_base = base;
        self.config.backoff_max = max;
        self
    }

    /// Keeps the credential warm (default `false`): refreshes it in the background when
    /// its soft window opens even if no request arrives, so the first burst after an idle
    /// period finds a fresh credential in the cache instead of waiting for a fetch.
    ///
    /// - Only for a proactive source with an expiry ([`RefreshMode::Proactive`]): a
    ///   reactive-only source (one whose server refuses early refreshes) or a fixed one is
    ///   never refreshed by it.
    /// - A failed refresh is tried again on the backoff's schedule, as any refresh. A
    ///   credential that arrives already inside its soft window (a source handing out a
    ///   token it cached, one loaded from a store late in its life) is left to requests:
    ///   refreshing it in the background could bring another one just as old. So is
    ///   one that arrives just before its window, fresh for less time than the window
    ///   lasts, when it outlives the credential it replaced by less than that too.
    /// - It keeps the credential the cache holds: an empty cache fills on the first request
    ///   or [`CredentialCache::warm_up`].
    /// - Its timer is the credential's own aging timer: it ends with the last clone of the
    ///   cache, and a refresh runs on the runtime that installed the credential (a
    ///   credential handed over with [`CacheHandle::replace`](crate::CacheHandle::replace)
    ///   outside a runtime has no timer, and is left to requests). A runtime that shuts
    ///   down takes that timer with it: the credential is left to requests until the
    ///   next one arrives, whose timer runs on the runtime that installs it. The timer
    ///   also looks at the wall clock (every quarter of the soft window, at least a
    ///   second apart): a host that slept through the window's opening refreshes soon
    ///   after waking, not a whole window of waking time later. A refresh already at
    ///   the token endpoint finishes first: within the fetch timeout, or with a store
    ///   within twice that (a lease holder's fetch goes on past its flight's deadline);
    ///   none starts once the last clone went.
    ///
    /// [`RefreshMode::Proactive`]: crate::RefreshMode::Proactive
    pub fn keep_warm(mut self, keep_warm: bool) -> Self {
        self.config.keep_warm = keep_warm;
        self
    }

    /// Shares credentials through `store` (see [`crate::store`]).
    pub fn store(mut self, store: impl CredentialStore) -> Self {
        self.config.store = Some(Arc::new(store));
        self
    }

    /// Names this cache in its metrics (the `cache` label; default `default`; feature
    /// `metrics`): 1 to 64 letters, digits, `-`, `_` or `.`, such as `payments-api`.
    /// Name what the credential is for, never a secret or a URL.
    pub fn name(mut self, name: &str) -> Self {
        self.config.name = Arc::from(name);
        self
    }

    /// The wall clock expiry is judged on (default: the system's). For tests of expiry,
    /// suspends and clock steps; see [`crate::clock`].
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.config.clock = WallClock::Custom(Arc::new(clock));
        self
    }

    /// Checks the settings, builds the cache and attaches the source to it. A value out
    /// of range, or a soft window shorter than the hard one, is an [`InvalidConfig`].
    pub fn build(self) -> Result<CredentialCache<P>, InvalidConfig> {
        self.config.validate()?;
        self.source.check()?;
        if self.config.store.is_some() && self.source.binds_credentials() {
            // A bound credential's key never leaves this process: another process could
            // not use what it would load, and the store would never take it.
            return Err(InvalidConfig::new(
                "store",
                "a source of credentials bound to a key (DPoP) cannot share them through a store",
            ));
        }
        Ok(self.build_unchecked())
    }

    /// Builds with settings known to be valid (the defaults).
    pub(crate) fn build_unchecked(mut self) -> CredentialCache<P> {
        let mode = self.source.refresh_mode();
        // Times cross the store on its clock, counted from this cache's.
        if let Some(store) = self.config.store.take() {
            let clock = self.config.clock.clone();
            self.config.store = Some(Arc::new(crate::store::OnClock::new(store, clock)));
        }
        let inner = Arc::new_cyclic(|me| Inner {
            me: me.clone(),
            source: self.source,
            mode,
            config: self.config,
            current: CurrentSlot::empty(),
            state: Mutex::new(State::default()),
            stats: Stats::default(),
            store_health: Default::default(),
            accepted: AtomicU64::new(0),
            background: Default::default(),
            source_gate: Arc::default(),
            kept: Arc::default(),
            users: AtomicUsize::new(1),
            sightings: Default::default(),
        });
        let weak: Weak<Inner<P>> = Arc::downgrade(&inner);
        inner.source.attach(CacheHandle::new(weak));
        CredentialCache { inner }
    }
}

/// How long before expiry the soft and hard windows open, in seconds, for a credential
/// issued with a lifetime of `lifetime` seconds: the hard window is the last
/// `min(lifetime × HARD_WINDOW_FRACTION, hard_window)`, the soft one the last
/// `min(lifetime × SOFT_WINDOW_FRACTION, soft_window)` (never shorter than the hard one),
/// widened by `jitter × window_jitter` (`jitter` in `0.0..1.0`), never past the lifetime.
pub(super) fn windows(config: &Config, lifetime: f64, jitter: f64) -> (f64, f64) {
    let hard = (lifetime * HARD_WINDOW_FRACTION).min(config.hard_window.as_secs_f64());
    if config.soft_window.is_zero() {
        // No background refresh: the soft window opens with the hard one, unwidened.
        return (hard, hard);
    }
    let soft = (lifetime * SOFT_WINDOW_FRACTION)
        .min(config.soft_window.as_secs_f64())
        .max(hard);
    let soft = (soft * (1.0 + config.window_jitter * jitter)).min(lifetime);
    (soft, hard)
}

/// The wait after `failures` consecutive failures: `base × 2^(failures − 1)`, capped at
/// `max`, then "equal jitter": between half and all of it (`jitter` in `0.0..1.0`).
pub(super) fn backoff(config: &Config, failures: u32, jitter: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let full = config
        .backoff_base
        .saturating_mul(1 << exp)
        .min(config.backoff_max);
    full / 2 + full.mul_f64(jitter / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(d: f64) -> f64 {
        (d * 1000.0).round() / 1000.0
    }

    #[test]
    fn windows_are_fractions_of_short_lifetimes_and_capped_for_long_ones() {
        let config = Config::default();
        // 100 s: hard = 5 s, soft = 25 s, widened by up to 20 %.
        let (soft, hard) = windows(&config, 100.0, 0.0);
        assert_eq!((secs(soft), secs(hard)), (25.0, 5.0));
        let (soft, _) = windows(&config, 100.0, 1.0);
        assert_eq!(secs(soft), 30.0);
        // One day: the caps (5 min soft, 30 s hard).
        let (soft, hard) = windows(&config, 86_400.0, 0.0);
        assert_eq!((secs(soft), secs(hard)), (300.0, 30.0));
        // A soft window capped below the hard one is raised to it.
        let config = Config {
            soft_window: Duration::from_secs(1),
            ..Config::default()
        };
        let (soft, hard) = windows(&config, 1000.0, 0.0);
        assert_eq!((secs(soft), secs(hard)), (30.0, 30.0));
        // Full jitter never opens a window before the credential arrived.
        let config = Config {
            window_jitter: 1.0,
            ..Config::default()
        };
        let (soft, _) = windows(&config, 1.0, 1.0);
        assert!(soft <= 1.0);
    }

    #[test]
    fn invalid_settings_are_refused_with_their_name() {
        assert_eq!(Config::default().validate(), Ok(()));
        let cases = [
            (
                Config {
                    fetch_timeout: Duration::ZERO,
                    ..Config::default()
                },
                "fetch_timeout",
            ),
            (
                Config {
                    window_jitter: f64::NAN,
                    ..Config::default()
                },
                "window_jitter",
            ),
            (
                Config {
                    window_jitter: 1.5,
                    ..Config::default()
                },
                "window_jitter",
            ),
            (
                Config {
                    window_jitter: -0.1,
                    ..Config::default()
                },
                "window_jitter",
            ),
            (
                Config {
                    backoff_base: Duration::ZERO,
                    ..Config::default()
                },
                "backoff",
            ),
            (
                Config {
                    backoff_base: Duration::from_secs(10),
                    backoff_max: Duration::from_secs(1),
                    ..Config::default()
                },
                "backoff",
            ),
            (
                Config {
                    soft_window: Duration::from_secs(1),
                    ..Config::default()
                },
                "soft_window",
            ),
        ];
        for (config, setting) in cases {
            assert_eq!(config.validate().map_err(|e| e.setting()), Err(setting));
        }
        let off = Config {
            soft_window: Duration::ZERO,
            ..Config::default()
        };
        assert_eq!(
            off.validate(),
            Ok(()),
            "a zero soft window turns background refresh off"
        );
        let (soft, hard) = windows(&off, 100.0, 1.0);
        assert_eq!(soft, hard, "not widened by the jitter either");
        let long_hard = Config {
            hard_window: Duration::from_secs(600),
            ..Config::default()
        };
        assert_eq!(
            long_hard.validate().map_err(|e| e.setting()),
            Err("hard_window")
        );
    }

    #[test]
    fn backoff_doubles_within_its_jitter_and_saturates() {
        let config = Config::default();
        assert_eq!(backoff(&config, 1, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(&config, 1, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(&config, 3, 1.0), Duration::from_secs(4));
        assert_eq!(backoff(&config, 10, 1.0), DEFAULT_BACKOFF_MAX);
        assert_eq!(
            backoff(&config, u32::MAX, 0.5),
            DEFAULT_BACKOFF_MAX.mul_f64(0.75)
        );
        let huge = Config {
            backoff_base: Duration::MAX,
            backoff_max: Duration::MAX,
            ..Config::default()
        };
        assert!(backoff(&huge, 40, 1.0) >= Duration::from_secs(u64::MAX / 2));
    }
}
