//! [`Entry`]: one cached credential, its refresh windows and its aging timer.

use std::{
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::SystemTime,
};

use arc_swap::Guard;
use tokio::time::Instant;

use crate::credential::Credential;

/// One cached credential and its refresh bookkeeping.
pub(crate) struct Entry {
    pub(crate) credential: Credential,
    pub(crate) generation: u64,
    /// When its background refresh may start (proactive sources with an expiry), on the
    /// wall clock, and on the monotonic clock as measured when it was installed (the
    /// guard against a wall clock stepped back): whichever comes first.
    pub(super) soft_wall: Option<SystemTime>,
    pub(super) soft_at: Option<Instant>,
    /// When callers must stop using it and wait (proactive sources with an expiry), on
    /// both clocks.
    pub(super) hard_wall: Option<SystemTime>,
    pub(super) hard_at: Option<Instant>,
    /// When it expires on the monotonic clock, as measured when it was installed.
    pub(super) expires_at: Option<Instant>,
    /// When it expires on the wall clock: the credential's own expiry, never more than
    /// its lifetime after it was installed (see `believed_expiry`).
    pub(super) expires_wall: Option<SystemTime>,
    /// When it became current: a rejection soon after counts as a fresh rejection.
    pub(super) installed_at: Instant,
    /// Set once the soft window opens (by its timer, if the runtime that installed it is
    /// driven); the hot path also reads both clocks for an entry with windows.
    pub(super) aging: AtomicBool,
    /// Whether a caller already started this entry's background refresh.
    pub(super) background_claimed: AtomicBool,
    /// Set when it stops being current (replaced, rejected, invalidated): a request that
    /// held it to fall back on while it waited for a refresh no longer may.
    pub(super) retired: AtomicBool,
    pub(super) timer: Option<tokio::task::AbortHandle>,
    /// The timer that gives the background refresh back after a failure's backoff.
    pub(super) rearm: Mutex<Option<tokio::task::AbortHandle>>,
    /// When that timer is due, in nanoseconds after `installed_at` (0: none set, or it
    /// gave the claim back already). Whoever zeroes it gives the claim back: the timer,
    /// or a caller in the soft window past it when the timer's runtime is not driven.
    pub(super) rearm_at: std::sync::atomic::AtomicU64,
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Some(timer) = &self.timer {
            timer.abort();
        }
        let rearm = self.rearm.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(rearm) = rearm {
            rearm.abort();
        }
    }
}

pub(super) enum Phase {
    Fresh,
    Soft,
    Hard,
}

impl Entry {
    /// Whether the hot path may send it without a closer look: its timer has not fired
    /// and neither clock has reached its soft window (read only for an entry that has
    /// one). A suspend stops the timer and the monotonic clock, not the wall clock; a
    /// wall clock stepped back is caught by the timer, unless the runtime that runs the
    /// timer is no longer driven: the monotonic clock is read too.
    #[inline]
    pub(super) fn fresh(&self, wall: impl FnOnce() -> SystemTime) -> bool {
        !self.aging.load(Ordering::Acquire)
            && match (self.soft_wall, self.soft_at) {
                (Some(on_wall), Some(at)) => wall() < on_wall && Instant::now() < at,
                _ => true,
            }
    }

    /// Its phase at `now` and `wall`: the later of what the two clocks say.
    pub(super) fn phase_at(&self, now: Instant, wall: SystemTime) -> Phase {
        let reached = |mono: Option<Instant>, on_wall: Option<SystemTime>| {
            mono.is_some_and(|at| now >= at) || on_wall.is_some_and(|at| wall >= at)
        };
        if reached(self.hard_at, self.hard_wall) {
            Phase::Hard
        } else if reached(self.soft_at, self.soft_wall) {
            Phase::Soft
        } else {
            Phase::Fresh
        }
    }

    /// Whether it has expired by either clock.
    pub(super) fn is_expired_at(&self, now: Instant, wall: SystemTime) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
            || self.expires_wall.is_some_and(|at| wall >= at)
    }
}

/// Owned by an entry's aging timer: however the timer ends (its instant came, or its
/// runtime shut down and dropped it), the entry starts aging, and from then on the
/// clock decides. An entry dropped first is simply gone.
pub(super) struct AgeOnDrop(pub(super) Weak<Entry>);

impl Drop for AgeOnDrop {
    fn drop(&mut self) {
        if let Some(entry) = self.0.upgrade() {
            entry.aging.store(true, Ordering::Release);
        }
    }
}

/// A credential that may be sent now, borrowed from the cache without a reference count.
pub(crate) struct Current(pub(super) Guard<Option<Arc<Entry>>>);

impl std::ops::Deref for Current {
    type Target = Entry;

    fn deref(&self) -> &Entry {
        // `current` only builds a `Current` from a guard holding an entry.
        self.0.as_deref().expect("Current always holds an entry")
    }
}
