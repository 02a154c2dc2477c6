//! The wall clock credentials expire on, and a clock a test can drive.
//!
//! A token expires at a moment on the server's clock, and that moment comes whether or
//! not this process was running: a laptop suspended or a VM paused for an hour wakes
//! with every token an hour older. A monotonic clock (`Instant`) stops during such a
//! pause on Linux, so a cache that measured expiry on it would send expired tokens after
//! one. The cache therefore judges expiry on the wall clock, read through [`Clock`], and
//! guards it with the monotonic one: a credential is as old as the older of the two says,
//! so a wall clock stepped back does not make it young again.
//!
//! # Example
//! ```
//! use std::time::{Duration, SystemTime};
//! use tower_client_auth::{CredentialCache, StaticCredential, clock::ManualClock};
//!
//! let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
//! let cache = CredentialCache::builder(StaticCredential::bearer("t0k3n")?)
//!     .clock(clock.clone())
//!     .build()?;
//! clock.advance(Duration::from_secs(3600)); // an hour passes, as during a suspend
//! # let _ = cache;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

/// A source of wall-clock time for a cache.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current time.
    ///
    /// Called on the hot path and, at times, with the cache's internal lock held: it
    /// must not call back into the cache, and should neither block nor panic.
    fn now(&self) -> SystemTime;
}

/// The system's wall clock (`SystemTime::now`): the default.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A wall clock that moves only when told: for tests of expiry, suspends and clock
/// steps. Clones share the time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    /// Nanoseconds since the Unix epoch.
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock reading `start` (clamped to the range a `u64` of nanoseconds since the
    /// Unix epoch holds: 1970 to 2554).
    pub fn new(start: SystemTime) -> Self {
        ManualClock {
            nanos: Arc::new(AtomicU64::new(to_nanos(start))),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        let _ = self
            .nanos
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_add(by))
            });
    }

    /// Sets the clock to `to`, backwards as well as forwards (a clock step).
    pub fn set(&self, to: SystemTime) {
        self.nanos.store(to_nanos(to), Ordering::Release);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(self.nanos.load(Ordering::Acquire))
    }
}

fn to_nanos(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The clock a cache reads: the system's without an indirection (the hot path reads it
/// for every request carrying an expiring credential), or one the user gave.
#[derive(Clone, Default)]
pub(crate) enum WallClock {
    #[default]
    System,
    Custom(Arc<dyn Clock>),
}

impl WallClock {
    #[inline]
    pub(crate) fn now(&self) -> SystemTime {
        match self {
            WallClock::System => system_now(),
            WallClock::Custom(clock) => clock.now(),
        }
    }
}

/// The system's wall clock. (Linux's coarse realtime clock costs a quarter as much, but
/// it was seen lagging the precise one by more than its stated resolution, so a
/// credential could be taken as valid after it expired: not used; measured 2026-12-03, in
/// BENCHMARKS.md's git history.)
#[inline]
fn system_now() -> SystemTime {
    SystemTime::now()
}

impl fmt::Debug for WallClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WallClock::System => f.write_str("SystemClock"),
            WallClock::Custom(clock) => clock.fmt(f),
        }
    }
}
