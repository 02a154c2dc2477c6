//! The single flight: starting one refresh for every caller who needs it, waiting for it,
//! and ending it (installing the credential, or backing off), however the task ends; and
//! the source's fetch, checked. The refresh through a store is in `lease`, the kept pair
//! in `kept`.

use std::{
    fmt,
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::{
        Arc, Weak,
        atomic::{AtomicU8, Ordering},
    },
    task::{Context, Poll},
};

use futures_util::future::{FutureExt, Shared};
use tokio::time::Instant;
use tracing::Instrument;

use super::{
    CredentialCache, Flight, Inner, MAX_RETRY_AFTER, Retired, State, Want, YOUNG_CREDENTIAL_AGE,
    config::saturating_add,
    entry::{Entry, Phase},
};
use super::{kept::keep_saving, lease::obtain};
use crate::{
    clock::WallClock,
    credential::Credential,
    error::{Error, ErrorKind},
    metrics,
    source::{CredentialSource, FetchContext, FetchReason},
};

impl<P: CredentialSource> CredentialCache<P> {
    /// The refresh path. `want`: `None` for "a credential I may send now".
    ///
    /// Decides under the state lock, and starts a refresh task, if one is needed, after
    /// releasing it: a runtime that refuses the task drops it in place, and the task's
    /// guard then takes the lock itself.
    pub(super) fn acquire(&self, want: Option<Want>) -> Acquire {
        let (acquire, start) = self.plan(want);
        if let Some(start) = start {
            start.spawn();
        }
        acquire
    }

    /// What `acquire` does, decided under the state lock: the result to wait for, and the
    /// refresh task to start, if any.
    fn plan(&self, want: Option<Want>) -> (Acquire, Option<Start<P>>) {
        let inner = &self.inner;
        let now = Instant::now();
        let wall = inner.config.clock.now();
        let mut state = inner.lock_state();
        let current = inner.current.load_full();
        let mut want = want;
        if let Some(Want::Replace(generation)) = want {
            if current.as_ref().is_none_or(|e| e.generation != generation) {
                // A credential no longer current was rejected (one handed to a flight's
                // own waiters only, or already replaced): dropped from now on. If it was
                // a flight's own waiters' and the current one is the same value (taken
                // back from the store meanwhile, under another generation): its
                // rejection.
                // Not for one dropped before (the rejection of a credential the source
                // handed back again: many requests carried it, and the first 401
                // already refetched).
                let found = state.drop_retired(generation);
                if let (Some((value, Retired::Own | Retired::Superseded)), Some(entry)) =
                    (found, &current)
                {
                    if entry.credential == value {
                        want = Some(Want::Replace(entry.generation));
                    }
                }
            }
        }
        let mut reason = FetchReason::Initial;
        let mut previous = None;
        let mut still_valid = None;
        let mut required_scope = None;
        if let Some(entry) = current {
            match want.clone() {
                Some(Want::Replace(generation)) if entry.generation == generation => {
                    let never_accepted = inner.accepted.load(Ordering::Relaxed) <= generation;
                    let young =
                        now.saturating_duration_since(entry.installed_at) < YOUNG_CREDENTIAL_AGE;
                    if young && never_accepted {
                        // Rejected right after it was issued: a new one may well be
                        // rejected too. Fetch again only as the backoff allows.
                        if let Some(at) = state.fresh_rejection_retry_at.filter(|at| now < *at) {
                            return (Acquire::ready(Err(Error::fresh_rejection(at - now))), None);
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
                    metrics::event(&inner.config.name, metrics::REJECTIONS);
                    inner.retire(&mut state, Retired::Dropped);
                    // The same value under other generations (taken back from the store,
                    // handed back by the source): a late rejection of one is no news.
                    state.drop_retired_value(&entry.credential);
                    inner.current.store(None);
                    reason = FetchReason::Rejected;
                    previous = Some(entry.credential.clone());
                }
                Some(Want::Background(generation)) if entry.generation != generation => {
                    return (Acquire::ready(Ok(entry)), None);
                }
                Some(Want::Background(_)) => {
                    reason = FetchReason::Expiring;
                    previous = Some(entry.credential.clone());
                    still_valid = Some(entry);
                }
                Some(Want::StepUp(generation, scope)) => {
                    // A step-up's own credential lacking a scope that step-up asked for:
                    // it was fruitless, whatever it brought (the same token again) and
                    // whether or not the request that saw it can be replayed.
                    let fruitless = (state.stepped_up.as_ref()).is_some_and(|(stepped, asked)| {
                        *stepped == generation && super::covers(asked.as_deref(), scope.as_deref())
                    });
                    if fruitless && entry.generation == generation {
                        inner.step_up_fruitless(&mut state, generation);
                    }
                    // A step-up under way that asks for this scope brings the credential
                    // to replay with (joined below, even while step-ups back off).
                    let covered = state.step_ups.iter().any(|f| f.covers(scope.as_deref()));
                    if !covered {
                        if entry.generation != generation && state.step_ups.is_empty() {
                            // A newer credential, and no step-up under way: the replay
                            // tries it.
                            return (Acquire::ready(Ok(entry)), None);
                        }
                        if state.step_up_retry_at.is_some_and(|at| now < at) {
                            // Step-ups are backing off: the credential as it is.
                            return (Acquire::ready(Ok(entry)), None);
                        }
                    }
                    tracing::debug!(generation, "credential lacks a scope; stepping up");
                    reason = FetchReason::StepUp;
                    previous = Some(entry.credential.clone());
                    required_scope = scope;
                    // Valid still: in use until the wider one is there, and the answer
                    // if the step-up fails (not a newer one: this request was not sent
                    // with it).
                    still_valid = Some(entry)
                        .filter(|e| e.generation == generation && !e.is_expired_at(now, wall));
                }
                _ => match entry.phase_at(now, wall) {
                    Phase::Fresh | Phase::Soft => return (Acquire::ready(Ok(entry)), None),
                    Phase::Hard => {
                        reason = FetchReason::Expiring;
                        previous = Some(entry.credential.clone());
                        still_valid = Some(entry).filter(|e| !e.is_expired_at(now, wall));
                    }
                },
            }
        } else if let Some(Want::StepUp(_, scope)) = &want {
            // The credential that lacked the scope is gone (a rejection retired it): the
            // next one must carry the scope, unless step-ups are backing off (and none
            // under way asks for it).
            let covered = state.step_ups.iter().any(|f| f.covers(scope.as_deref()));
            if covered || state.step_up_retry_at.is_none_or(|at| now >= at) {
                reason = FetchReason::StepUp;
                required_scope = scope.clone();
                // Told what an invalidation dropped, if one did; the marker stays for
                // the next ordinary fetch, should this one fail.
                previous = state.invalidated.clone().flatten();
            }
        }
        let step_up = reason == FetchReason::StepUp;
        // A step-up joins only a step-up: a fetch of another kind (a refetch after a
        // rejection, an expiry's refresh) asks for no scope, so its credential would lack
        // this one too. Without one to join, it gets a fetch of its own, chained below
        // after whatever else is under way.
        // Nor does it join a step-up for another scope: its own, chained after that one,
        // asks for both (later step-ups for either join it).
        let joinable = if step_up {
            let covering = state
                .step_ups
                .iter()
                .find(|f| f.covers(required_scope.as_deref()));
            if let (None, Some(last)) = (covering, state.step_ups.last()) {
                required_scope = last.widened(required_scope.as_deref());
            }
            covering
        } else {
            state.flight.as_ref()
        };
        // Not one a waiter abandoned (its task never began: see `FlightRun`), which the
        // waiter takes out of the state in a moment.
        if let Some(flight) = joinable.filter(|f| !f.run.abandoned()) {
            metrics::event(&inner.config.name, metrics::WAITS);
            if reason == FetchReason::Rejected {
                // Told to the fetch that replaces this flight, should it be abandoned.
                *flight.run.told() = Some((reason, previous.clone()));
            }
            return (
                Acquire::waiting(flight, want, still_valid, &inner.config.clock),
                None,
            );
        }
        if let Some(retry_at) = state.retry_at.filter(|at| now < *at) {
            if let Some(entry) = still_valid {
                // Backing off: keep serving what is still valid rather than failing. A
                // caller that just claimed the background refresh gives the claim back
                // when the backoff ends; a hard-window caller claimed nothing.
                if matches!(want, Some(Want::Background(_))) {
                    inner.rearm_background(&entry, retry_at);
                }
                return (Acquire::ready(Ok(entry)), None);
            }
            return (
                Acquire::ready(Err(backing_off(&state, retry_at, now))),
                None,
            );
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No refresh can start here: what is still valid is better than an error, as
            // while backing off.
            if let Some(entry) = still_valid {
                return (Acquire::ready(Ok(entry)), None);
            }
            return (Acquire::ready(Err(Error::new(ErrorKind::NoRuntime))), None);
        };
        // Taken by any new flight: only one with nothing newer to tell is told it.
        let orphaned = state.orphaned.take();
        if reason == FetchReason::Initial {
            if let Some(dropped) = state.invalidated.take() {
                reason = FetchReason::Invalidated;
                previous = dropped;
                // The marker holds a tainted fetch's result by now, if one ended.
                state.tainted_result = None;
            } else if let Some((told, dropped)) = orphaned {
                // What an abandoned flight was to tell (`FlightRun`).
                reason = told;
                previous = dropped;
            }
        }
        // After an invalidation, the fetch it made suspect may still run: this one waits
        // for it to end before it starts. A flight chained after it and not started yet,
        // or a step-up's beside an ordinary one, is waited for too: never two at once.
        let running = state.running.as_ref().map(|f| f.id);
        let queued = state
            .flight
            .iter()
            .chain(&state.step_ups)
            .filter(|f| running != Some(f.id));
        let predecessors: Vec<Flight> = state.running.iter().chain(queued).cloned().collect();
        state.flight_id += 1;
        let id = state.flight_id;
        let (tx, rx) = tokio::sync::oneshot::channel();
        // The longest this flight runs on a driven runtime: each flight ahead of it, then
        // its own (see `FlightRun::overdue`).
        let longest = longest_flight(&inner.config.fetch_timeout)
            .saturating_mul(u32::try_from(predecessors.len() + 1).unwrap_or(u32::MAX));
        let me: Weak<dyn Replan> = inner.me.clone();
        let flight = Flight {
            id,
            future: FlightFuture { rx }.shared(),
            run: Arc::new(FlightRun {
                id,
                begun: AtomicU8::new(NOT_BEGUN),
                tx: std::sync::Mutex::new(Some(tx)),
                runtime: runtime.id(),
                due: saturating_add(now, inner.config.fetch_timeout),
                overdue: saturating_add(now, longest),
                overdue_logged: Default::default(),
                background: matches!(want, Some(Want::Background(_))),
                told: std::sync::Mutex::new(
                    matches!(reason, FetchReason::Rejected | FetchReason::Invalidated)
                        .then(|| (reason, previous.clone())),
                ),
                cache: me,
            }),
            scope: required_scope.as_deref().filter(|_| step_up).map(Arc::from),
        };
        if predecessors.is_empty() {
            state.running = Some(flight.clone());
        }
        if step_up {
            state.step_ups.push(flight.clone());
        } else {
            state.flight = Some(flight.clone());
        }
        if flight.run.background {
            inner.background.store(Some(flight.run.clone()));
        }
        inner.stats.fetches.fetch_add(1, Ordering::Relaxed);
        metrics::event(&inner.config.name, metrics::WAITS);
        let guard = FlightGuard {
            inner: self.inner.clone(),
            epoch: state.epoch,
            began: None,
            flight: flight.clone(),
            started: false,
            asked: false,
            step_up,
            gave_up: false,
            used: false,
            invalidations: state.invalidations,
        };
        let span = tracing::debug_span!("credential_refresh", reason = ?reason);
        tracing::debug!(parent: &span, background = still_valid.is_some(), chained = !predecessors.is_empty(), "starting credential refresh");
        let start = Start {
            runtime,
            guard,
            cx: FetchContext::new(reason, previous).with_required_scope(required_scope),
            predecessors,
            span,
        };
        (
            Acquire::waiting(&flight, want, still_valid, &inner.config.clock),
            Some(start),
        )
    }
}

impl<P: CredentialSource> CredentialCache<P> {
    /// A caller in the soft window found the claim on the background refresh held. A
    /// background refresh is planned by the caller that claims it, with no one waiting
    /// for it; one whose task has not begun by its due time, on another runtime than
    /// this caller's, never will while that runtime is not driven (see [`FlightRun`]):
    /// abandoned here, and the background refresh planned again on this runtime.
    /// Otherwise a load and a compare.
    #[cold]
    #[inline(never)]
    pub(super) fn unstall_background(&self, entry: &Entry) {
        self.rearm_overdue(entry);
        let run = self.inner.background.load();
        let Some(run) = run.as_ref() else {
            return;
        };
        if run.begun.load(Ordering::Acquire) != NOT_BEGUN || Instant::now() < run.due {
            return;
        }
        // With no runtime here, no refresh could start here either.
        let Ok(here) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if here.id() == run.runtime || !run.abandon() {
            return;
        }
        // Gives the claim back; claimed again here.
        abandon(&*self.inner, run);
        if !entry.background_claimed.swap(true, Ordering::AcqRel) {
            drop(self.acquire(Some(Want::Background(entry.generation))));
        }
    }
}

impl<P: CredentialSource> CredentialCache<P> {
    /// A failed background refresh gives its claim back when its backoff ends, by a timer
    /// on the runtime it failed on (`Inner::rearm_background`); while that runtime is
    /// not driven, a caller on another one past that time takes the claim over and
    /// refreshes. Otherwise a load.
    fn rearm_overdue(&self, entry: &Entry) {
        let due = entry.rearm_at.load(Ordering::Acquire);
        if due == 0
            || Instant::now()
                < saturating_add(entry.installed_at, std::time::Duration::from_nanos(due))
            || tokio::runtime::Handle::try_current().is_err()
        {
            return;
        }
        // Zeroed first here: the claim is this caller's, and the timer gives nothing back.
        if entry
            .rearm_at
            .compare_exchange(due, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            drop(self.acquire(Some(Want::Background(entry.generation))));
        }
    }
}

/// What a request gets while the cache backs off until `retry_at` with no credential
/// to send: the last failure, under [`ErrorKind::Backoff`].
fn backing_off(state: &State, retry_at: Instant, now: Instant) -> Error {
    let err = match &state.last_error {
        // A refused transport stays that, however often it is asked for.
        Some(last) if last.kind() == ErrorKind::InsecureTransport => last.clone(),
        // A wait already (the fleet's hold: see `lease::fleet_hold`).
        Some(last) if last.kind() == ErrorKind::Backoff => last.clone(),
        Some(last) => Error::new(ErrorKind::Backoff).with_shared_source(Arc::new(last.clone())),
        None => Error::new(ErrorKind::Backoff),
    };
    err.with_retry_in(retry_at - now)
}

/// A refresh task, decided under the lock and started after it is released.
struct Start<P: CredentialSource> {
    runtime: tokio::runtime::Handle,
    guard: FlightGuard<P>,
    cx: FetchContext,
    /// The flights this one's fetch waits for (never two fetches at once).
    predecessors: Vec<Flight>,
    span: tracing::Span,
}

impl<P: CredentialSource> Start<P> {
    fn spawn(self) {
        let Start {
            runtime,
            guard,
            cx,
            predecessors,
            span,
        } = self;
        // A refused task is dropped, here or later, without having run: its guard ends
        // the flight with `SpawnRefused`.
        drop(runtime.spawn(run_flight(guard, cx, predecessors).instrument(span)));
    }
}

/// Waits for a credential from the refresh path.
pub(crate) struct Acquire {
    state: AcquireState,
    /// A credential in its hard window that has not expired: if the refresh fails, it is
    /// still better than an error, unless it stopped being current meanwhile. Never set
    /// for a rejected credential.
    fallback: Option<Arc<Entry>>,
    /// The cache's wall clock, to tell whether the fallback has expired meanwhile.
    clock: Option<WallClock>,
}

enum AcquireState {
    Ready(Option<Result<Arc<Entry>, Error>>),
    /// The flight's result, and a watch on whether its task begins (timed only while
    /// polled on another runtime than the task's, or on none).
    Waiting(Shared<FlightFuture>, Option<Box<Watch>>),
}

impl Acquire {
    pub(super) fn ready(result: Result<Arc<Entry>, Error>) -> Self {
        Acquire {
            state: AcquireState::Ready(Some(result)),
            fallback: None,
            clock: None,
        }
    }

    /// A wait for `flight`, by a caller that wants `want`, planned again if the flight
    /// is abandoned. A task spawned on a runtime runs when that runtime is driven; a
    /// caller polled on it is, so only a wait polled on another runtime (or none) times
    /// the flight (see [`FlightRun`]), look by look: a request may be planned on one
    /// runtime and awaited on another.
    fn waiting(
        flight: &Flight,
        want: Option<Want>,
        fallback: Option<Arc<Entry>>,
        clock: &WallClock,
    ) -> Self {
        let watch = Box::new(Watch {
            run: flight.run.clone(),
            want,
            untimeable: false,
            sleep: None,
            alarm: None,
        });
        Acquire {
            state: AcquireState::Waiting(flight.future.clone(), Some(watch)),
            clock: fallback.is_some().then(|| clock.clone()),
            fallback,
        }
    }
}

impl Future for Acquire {
    type Output = Result<Arc<Entry>, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let (flight, watch) = match &mut self.state {
                AcquireState::Ready(result) => {
                    let result = result
                        .take()
                        .unwrap_or_else(|| Err(Error::new(ErrorKind::PolledAfterCompletion)));
                    return Poll::Ready(self.or_fallback(result));
                }
                AcquireState::Waiting(flight, watch) => (flight, watch),
            };
            let result = match Pin::new(flight).poll(cx) {
                Poll::Ready(result) => result,
                Poll::Pending => match watch.as_mut() {
                    None => return Poll::Pending,
                    Some(w) => match w.look(cx) {
                        Look::Waiting => return Poll::Pending,
                        Look::Abandoned => Err(Error::new(ErrorKind::Cancelled)),
                        Look::Overdue => {
                            let err = overdue(&w.run);
                            *watch = None;
                            Err(err)
                        }
                    },
                },
            };
            // A flight whose task never began, ended by a waiter: plan again (another
            // flight, on this runtime, or one a waiter planned already).
            if let (Err(_), Some(w)) = (&result, watch.as_ref()) {
                if w.run.abandoned() {
                    let mut w = watch.take().expect("checked");
                    let (run, want) = (w.run.clone(), w.want.take());
                    drop(w);
                    let next = match run.cache.upgrade() {
                        Some(cache) => cache.replan(want),
                        None => Acquire::ready(Err(Error::new(ErrorKind::Cancelled))),
                    };
                    // The credential this wait would have fallen back on is still its
                    // fallback, whatever the new plan holds (none, outside a runtime).
                    let (fallback, clock) = (self.fallback.take(), self.clock.take());
                    *self = next;
                    if self.fallback.is_none() {
                        (self.fallback, self.clock) = (fallback, clock);
                    }
                    continue;
                }
            }
            return Poll::Ready(self.or_fallback(result));
        }
    }
}

impl Acquire {
    /// `result`, or, for a failure, the still-valid credential this wait holds, unless
    /// it was dropped meanwhile (invalidated, rejected, replaced) or has expired.
    fn or_fallback(&mut self, result: Result<Arc<Entry>, Error>) -> Result<Arc<Entry>, Error> {
        let wall = self.clock.as_ref().map(WallClock::now);
        match (result, self.fallback.take(), wall) {
            (Err(err), Some(entry), Some(wall))
                if !entry.retired.load(Ordering::Acquire)
                    && !entry.is_expired_at(Instant::now(), wall) =>
            {
                tracing::debug!(error = %err, "refresh failed; using the still-valid credential");
                Ok(entry)
            }
            (result, _, _) => result,
        }
    }
}

/// A wait's watch on its flight.
struct Watch {
    run: Arc<FlightRun>,
    /// What the waiter asked for, to ask again.
    want: Option<Want>,
    /// Set when no alarm thread could be started: nothing to time the wait with.
    untimeable: bool,
    /// Until the flight's due time, then its overdue time, on the timer of the runtime
    /// it was made on; made at the first timed look (again on another runtime).
    sleep: Option<(tokio::runtime::Id, Pin<Box<tokio::time::Sleep>>)>,
    /// Polled outside any runtime, or on one without timers: its alarm (see [`alarm`]).
    alarm: Option<u64>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(id) = self.alarm.take() {
            alarm::cancel(id);
        }
    }
}

/// What a [`Watch`] saw.
enum Look {
    /// Nothing to do but wait.
    Waiting,
    /// The flight's task had not begun by its due time: abandoned (by this waiter,
    /// ended here, or by another).
    Abandoned,
    /// Begun and not ended by the time it would have on a driven runtime.
    Overdue,
}

impl Watch {
    fn look(&mut self, cx: &mut Context<'_>) -> Look {
        let begun = match self.run.begun.load(Ordering::Acquire) {
            ABANDONED => return Look::Abandoned,
            // Dropped unrun by its runtime: the guard sends its result.
            ENDED => return Look::Waiting,
            state => state == BEGUN,
        };
        // Polled on the task's runtime, which runs it: nothing to time. (A request may
        // be planned on one runtime and polled on another: looked at each time.)
        let here = tokio::runtime::Handle::try_current().map(|h| h.id()).ok();
        if self.untimeable || here == Some(self.run.runtime) {
            return Look::Waiting;
        }
        let deadline = if begun {
            self.run.overdue
        } else {
            self.run.due
        };
        if !self.passed(deadline, here, cx) {
            return Look::Waiting;
        }
        if begun {
            return Look::Overdue;
        }
        if self.run.abandon() {
            match self.run.cache.upgrade() {
                Some(cache) => abandon(&*cache, &self.run),
                None => self.run.send(Err(Error::new(ErrorKind::Cancelled))),
            }
            return Look::Abandoned;
        }
        match self.run.begun.load(Ordering::Acquire) {
            ABANDONED => Look::Abandoned,
            BEGUN => {
                // Begun meanwhile: timed as a begun one from the next look.
                cx.waker().wake_by_ref();
                Look::Waiting
            }
            _ => Look::Waiting,
        }
    }

    /// Whether `deadline` has passed; if not, this wait is woken when it does: by a
    /// timer of the runtime it is polled on, or, outside any runtime or on one without
    /// timers, by the process's [`alarm`] thread.
    fn passed(
        &mut self,
        deadline: Instant,
        here: Option<tokio::runtime::Id>,
        cx: &mut Context<'_>,
    ) -> bool {
        if let Some(here) = here {
            // A sleep made on another runtime fires only while that one is driven; a
            // runtime without timers makes none (`timers` remembers it).
            if self.sleep.as_ref().is_none_or(|(on, _)| *on != here) {
                self.sleep = timers::sleep_until(deadline).map(|sleep| (here, Box::pin(sleep)));
            }
            if let Some((_, sleep)) = self.sleep.as_mut() {
                if sleep.deadline() != deadline {
                    sleep.as_mut().reset(deadline);
                }
                return sleep.as_mut().poll(cx).is_ready();
            }
        }
        // Outside any runtime, or on one without timers: the process's alarm thread.
        if Instant::now() >= deadline {
            return true;
        }
        match alarm::set(self.alarm, deadline.into_std(), cx.waker()) {
            Some(id) => self.alarm = Some(id),
            // No thread could be started: nothing to time the wait with.
            None => self.untimeable = true,
        }
        false
    }
}

/// Timers of the runtime a task is polled on. Tokio panics when one is made on a runtime
/// built without its time driver (the panic is caught, and the hook prints it): each
/// such runtime is remembered, so that the message is printed once for it, not once per
/// wait or refresh.
pub(crate) mod timers {
    use std::sync::{Mutex, PoisonError};

    /// The runtimes found without timers (ids are never reused); the last few.
    static ABSENT: Mutex<Vec<tokio::runtime::Id>> = Mutex::new(Vec::new());
    const REMEMBERED: usize = 16;

    /// Whether the runtime polled on is one found without timers.
    pub(in crate::cache) fn known_absent() -> bool {
        let Ok(here) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        let absent = ABSENT.lock().unwrap_or_else(PoisonError::into_inner);
        !absent.is_empty() && absent.contains(&here.id())
    }

    /// Remembers the runtime polled on as one without timers.
    pub(in crate::cache) fn found_absent() {
        let Ok(here) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut absent = ABSENT.lock().unwrap_or_else(PoisonError::into_inner);
        if !absent.contains(&here.id()) {
            if absent.len() == REMEMBERED {
                absent.remove(0);
            }
            absent.push(here.id());
        }
    }

    /// A sleep until `deadline` on the runtime polled on; `None` on one without timers.
    pub(crate) fn sleep_until(deadline: tokio::time::Instant) -> Option<tokio::time::Sleep> {
        if known_absent() {
            return None;
        }
        match std::panic::catch_unwind(|| tokio::time::sleep_until(deadline)) {
            Ok(sleep) => Some(sleep),
            Err(_) => {
                found_absent();
                None
            }
        }
    }
}

/// Until `until`: on the timer of the runtime polled on, or, outside one or on one built
/// without timers, on the process's alarm thread. Either way a poll returns at once, and
/// the caller may give up on the wait.
pub(crate) async fn pause_until(until: tokio::time::Instant) {
    let timer =
        (tokio::runtime::Handle::try_current().ok()).and_then(|_| timers::sleep_until(until));
    match timer {
        Some(sleep) => sleep.await,
        None => alarm::Sleep::until(until.into_std()).await,
    }
}

/// Wakes waits that no runtime's timer can wake (polled outside any runtime, or on one
/// built without timers) at their deadlines: one thread for the process, started with
/// the first such wait and ended when none is left (a dropped wait cancels its alarm).
mod alarm {
    use std::{
        sync::{Condvar, Mutex, MutexGuard, PoisonError},
        task::Waker,
        time::Instant,
    };

    struct Alarms {
        due: Vec<(u64, Instant, Waker)>,
        next: u64,
        thread: bool,
    }

    static ALARMS: Mutex<Alarms> = Mutex::new(Alarms {
        due: Vec::new(),
        next: 0,
        thread: false,
    });
    static CHANGED: Condvar = Condvar::new();

    fn lock() -> MutexGuard<'static, Alarms> {
        ALARMS.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets alarm `id` (a new one for `None`) to wake `waker` at `at`; `None` if no
    /// thread could be started to ring it.
    pub(super) fn set(id: Option<u64>, at: Instant, waker: &Waker) -> Option<u64> {
        let mut alarms = lock();
        let found = id.and_then(|id| alarms.due.iter().position(|a| a.0 == id));
        let id = match found {
            Some(i) => {
                alarms.due[i].1 = at;
                alarms.due[i].2.clone_from(waker);
                alarms.due[i].0
            }
            None => {
                alarms.next += 1;
                let id = alarms.next;
                alarms.due.push((id, at, waker.clone()));
                id
            }
        };
        if !alarms.thread {
            let started = std::thread::Builder::new()
                .name("credential-wait".into())
                .spawn(ring);
            if started.is_err() {
                alarms.due.retain(|a| a.0 != id);
                return None;
            }
            alarms.thread = true;
        }
        CHANGED.notify_one();
        Some(id)
    }

    /// A future that is ready at `at`, woken by the alarm thread (for a runtime without
    /// timers); never ready if no thread could be started.
    pub(super) struct Sleep {
        at: Instant,
        id: Option<u64>,
        untimeable: bool,
    }

    impl Sleep {
        pub(super) fn until(at: Instant) -> Self {
            Sleep {
                at,
                id: None,
                untimeable: false,
            }
        }
    }

    impl std::future::Future for Sleep {
        type Output = ();

        fn poll(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<()> {
            if Instant::now() >= self.at {
                return std::task::Poll::Ready(());
            }
            if !self.untimeable {
                match set(self.id, self.at, cx.waker()) {
                    Some(id) => self.id = Some(id),
                    None => self.untimeable = true,
                }
            }
            std::task::Poll::Pending
        }
    }

    impl Drop for Sleep {
        fn drop(&mut self) {
            if let Some(id) = self.id.take() {
                cancel(id);
            }
        }
    }

    pub(super) fn cancel(id: u64) {
        lock().due.retain(|a| a.0 != id);
        CHANGED.notify_one();
    }

    /// The thread: wakes each alarm at its time (outside the lock); ends with the last.
    fn ring() {
        let mut alarms = lock();
        loop {
            let now = Instant::now();
            let mut woken = Vec::new();
            alarms.due.retain(|a| {
                let due = a.1 <= now;
                if due {
                    woken.push(a.2.clone());
                }
                !due
            });
            if !woken.is_empty() {
                drop(alarms);
                woken.into_iter().for_each(Waker::wake);
                alarms = lock();
                continue;
            }
            let Some(next) = alarms.due.iter().map(|a| a.1).min() else {
                alarms.thread = false;
                return;
            };
            alarms = CHANGED
                .wait_timeout(alarms, next - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// What a flight's waiters share with its task: whether the task has begun, and where
/// its result goes. A task runs on the runtime of the request that planned it, when
/// that runtime is driven: one spawned on a current-thread runtime that is then not
/// driven (between two `block_on` calls of a blocking wrapper) never begins, and its
/// waiters on other runtimes would wait for ever. A waiter on another runtime (or none),
/// or a flight chained after it (`wait_behind`), that finds it not begun by its due
/// time (the fetch timeout after it was planned) abandons it: takes it out of the state, ends every waiter's wait (they all plan
/// again, and join one new flight), and plans another, on its own runtime. The task,
/// should it run later, does nothing: it never fetched, so there are never two fetches
/// at once. A task that has begun and then stalls with its runtime may have its token
/// request under way: it is never abandoned, but a waiter on another runtime stops
/// waiting for it once it is overdue (`Timeout`, or the still-valid credential).
pub(super) struct FlightRun {
    id: u64,
    begun: AtomicU8,
    tx: std::sync::Mutex<Option<ResultSender>>,
    runtime: tokio::runtime::Id,
    /// Abandoned if not begun by then.
    due: Instant,
    /// Begun and not ended by then, on a driven runtime it would have ended: its runtime
    /// is not driven, and a watching waiter stops waiting (`Timeout`).
    overdue: Instant,
    /// Whether its being overdue was logged.
    overdue_logged: std::sync::atomic::AtomicBool,
    /// Whether it is a background refresh (soft window): one abandoned gives its claim
    /// on the soft window back.
    background: bool,
    /// What the flight tells its source that no later fetch would know (a rejection or
    /// an invalidation, and the credential it dropped), a rejection that joins it too:
    /// left for the next fetch if the flight is abandoned.
    told: std::sync::Mutex<Option<(FetchReason, Option<Credential>)>>,
    cache: Weak<dyn Replan>,
}

/// The longest one flight takes on a driven runtime: its fetch timeout, the store's
/// calls that end it past that (a share each: the save, the release), and a margin.
fn longest_flight(fetch_timeout: &std::time::Duration) -> std::time::Duration {
    let share = *fetch_timeout / super::STORE_SHARE;
    fetch_timeout
        .saturating_add(share.saturating_mul(2))
        .saturating_add(std::time::Duration::from_secs(1))
}

/// Where a flight's result goes.
type ResultSender = tokio::sync::oneshot::Sender<Result<Arc<Entry>, Error>>;

const NOT_BEGUN: u8 = 0;
const BEGUN: u8 = 1;
/// A waiter abandoned it before its task began.
const ABANDONED: u8 = 2;
/// Its task was dropped unrun (a runtime refusing or shutting down): its guard ends it.
const ENDED: u8 = 3;

impl FlightRun {
    /// The task begins, unless a waiter abandoned the flight first.
    fn begin(&self) -> bool {
        self.begun
            .compare_exchange(NOT_BEGUN, BEGUN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Abandons a flight not begun; `false` if it has begun, or was abandoned before.
    fn abandon(&self) -> bool {
        self.begun
            .compare_exchange(NOT_BEGUN, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The guard of a task dropped before it ran ends the flight, unless a waiter
    /// abandoned it first.
    fn end_unrun(&self) -> bool {
        self.begun
            .compare_exchange(NOT_BEGUN, ENDED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn abandoned(&self) -> bool {
        self.begun.load(Ordering::Acquire) == ABANDONED
    }

    fn told(&self) -> std::sync::MutexGuard<'_, Option<(FetchReason, Option<Credential>)>> {
        self.told
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn tx(&self) -> std::sync::MutexGuard<'_, Option<ResultSender>> {
        self.tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends the flight's result, if none was sent.
    fn send(&self, outcome: Result<Arc<Entry>, Error>) {
        // Ended: nothing left to tell (and no credential kept for it).
        self.told().take();
        if let Some(tx) = self.tx().take() {
            // No waiter left is fine: the credential is installed all the same.
            let _ = tx.send(outcome);
        }
    }

    fn sent(&self) -> bool {
        self.tx().is_none()
    }
}

/// What a waiter needs of its cache to end a flight that never began and plan another
/// ([`FlightRun`]): the cache with its source's type erased, as `Acquire` has none.
pub(super) trait Replan: Send + Sync {
    /// Takes the flight out of the state, as its task would have on ending; it never
    /// fetched, and what it was to tell its source is left for the next fetch.
    fn forget_flight(&self, run: &FlightRun);
    /// `acquire` again.
    fn replan(&self, want: Option<Want>) -> Acquire;
}

impl<P: CredentialSource> Replan for Inner<P> {
    fn forget_flight(&self, run: &FlightRun) {
        let id = run.id;
        let mut state = self.lock_state();
        if state.flight.as_ref().is_some_and(|f| f.id == id) {
            state.flight = None;
        }
        state.step_ups.retain(|f| f.id != id);
        if state.running.as_ref().is_some_and(|f| f.id == id) {
            state.running = None;
        }
        if state.suspect == Some(id) {
            state.suspect = None;
        }
        if state.tainted == Some(id) {
            state.tainted = None;
        }
        if run.background {
            // Its claim on the soft window: the next caller there refreshes.
            if let Some(entry) = self.current.load_full() {
                entry.background_claimed.store(false, Ordering::Release);
            }
        }
        // For the flights planned meanwhile (chained after this one, so not begun: each
        // is told at its start), step-ups too; and the next ordinary one, if none is.
        if let Some(told) = run.told().take() {
            for step_up in &state.step_ups {
                inherit(&mut step_up.run.told(), told.clone());
            }
            match state.flight.as_ref() {
                Some(next) => inherit(&mut next.run.told(), told),
                None => state.orphaned = Some(told),
            }
        }
        self.stats.fetches.fetch_sub(1, Ordering::Relaxed);
    }

    fn replan(&self, want: Option<Want>) -> Acquire {
        match self.me.upgrade() {
            Some(inner) => CredentialCache { inner }.acquire(want),
            None => Acquire::ready(Err(Error::new(ErrorKind::Cancelled))),
        }
    }
}

impl fmt::Debug for Acquire {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Acquire")
    }
}

/// The result of a refresh task, as a future every waiter can share. The task's guard
/// sends it however the task ends; it exists before the task is spawned, so a flight is
/// recorded under the lock and the task started after the lock is released.
pub(crate) struct FlightFuture {
    rx: tokio::sync::oneshot::Receiver<Result<Arc<Entry>, Error>>,
}

impl Future for FlightFuture {
    type Output = Result<Arc<Entry>, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            // The guard always sends; a dropped sender is a task that vanished.
            .map(|sent| sent.unwrap_or_else(|_| Err(Error::new(ErrorKind::Cancelled))))
    }
}

/// Whose a flight's result is, when it ends.
enum Standing {
    /// The cache's: installed, or its failure backs the cache off.
    Current,
    /// An invalidation or a replacement made it suspect: its own waiters' only.
    Suspect,
    /// A step-up overtaken by a credential handed over: its own waiters' only (they
    /// asked for a wider grant than the handed-over one is known to carry).
    Overtaken,
    /// A credential handed over since it started, still sendable, is the answer.
    Replaced(Arc<Entry>),
}

/// Owned by the refresh task. Whatever way the task ends (done, cancelled by a runtime
/// shutting down, or refused and never run), the flight is cleared, its waiters get a
/// result, and a failure is counted, so the single-flight state can never wedge.
struct FlightGuard<P: CredentialSource> {
    inner: Arc<Inner<P>>,
    /// The epoch it was planned in, and the one its fetch began in, if it was chained
    /// (see `begin`): a replacement since either is newer than the flight, or its fetch.
    epoch: u64,
    began: Option<u64>,
    /// Which flight this is (an invalidation detaches a running flight, and a newer one
    /// may be in `State::flight` by the time this one ends), and its future, which
    /// flights chained after it wait for.
    flight: Flight,
    /// Whether the task ran at all: a task dropped before its first poll was refused
    /// (or its flight abandoned: see [`FlightRun`]).
    started: bool,
    /// Whether it got past the flights ahead of it to its own fetch (the store, then
    /// the source). One dropped before (refused, or cancelled with its runtime while it
    /// waited behind) asked nothing: it is no fetch, and backs nothing off.
    asked: bool,
    /// Whether this is a step-up: its failure backs off step-ups only (the credential
    /// in use is still valid, and its own refresh must not wait for a scope).
    step_up: bool,
    /// Whether it gave up without asking the source (the store's credentials were
    /// dropped as they loaded, or the runtime has no timers): nothing backs off. (Not
    /// told by the error's kind: a source over another cache may pass that kind on as
    /// its own failure.)
    gave_up: bool,
    /// Whether its result answered it (set by `finish`): not when a credential handed
    /// over meanwhile did, nor when it failed.
    used: bool,
    /// `State::invalidations` when its fetch began to run (planned running, or
    /// `begin`): an invalidation since makes it suspect, as `State::tainted` says while
    /// it runs; told to a fetch of its that outlives it (`finish_late`).
    invalidations: u64,
}

impl<P: CredentialSource> FlightGuard<P> {
    /// A chained flight's predecessor ended: this flight's fetch starts now. `Some` when
    /// a credential handed over or fetched meanwhile is fresh, which makes the fetch
    /// needless: the flight has left the state then, and that credential is its answer
    /// to send. One in its soft window does not: a refresh is due (a background
    /// refresh queued behind a step-up that failed would otherwise end here with its
    /// claim never given back, and nothing refreshed before the hard window).
    ///
    /// A fetch told of an invalidation is told now what the fetch the invalidation
    /// tainted brought, if it ended meanwhile (`forget_suspect`): newer than what the
    /// invalidation dropped, it is the one a source holding a last credential would hand
    /// back, the one the store holds, and the one with the newest refresh token.
    ///
    /// `Some(Err)` or `Some(Ok)` too when the cache backs off (a predecessor's failure
    /// asked, with `Retry-After`, for no token request before then): the flight ends as
    /// one planned now would, with the credential if it has not expired, else the
    /// backoff's error, and the source is not asked; a background refresh is tried
    /// again when the hold ends.
    fn begin(&mut self, cx: &mut FetchContext) -> Option<Result<Arc<Entry>, Error>> {
        // A rejection that joined it while it was queued, or what an abandoned flight
        // ahead of it was to tell: told now, unless it knows what was dropped already.
        // An explicit invalidation stays one (a source never hands back a credential
        // then: see `TokenSource`), told the dropped credential; a step-up, too, asks
        // for its scope, told what was dropped.
        if let (None, Some((reason, previous))) = (cx.previous(), self.flight.run.told().clone()) {
            match cx.reason() {
                FetchReason::Initial | FetchReason::Expiring
                    if previous.is_some() || reason == FetchReason::Rejected =>
                {
                    cx.set_told(reason, previous);
                }
                FetchReason::Invalidated | FetchReason::Rejected | FetchReason::StepUp => {
                    if let Some(previous) = previous {
                        cx.set_previous(previous);
                    }
                }
                _ => {}
            }
        }
        let mut state = self.inner.lock_state();
        state.running = Some(self.flight.clone());
        self.invalidations = state.invalidations;
        if cx.reason() == FetchReason::Invalidated {
            if let Some(dropped) = state.tainted_result.take() {
                cx.set_previous(dropped);
            }
        }
        let now = Instant::now();
        if let Some(retry_at) = state.retry_at.filter(|at| now < *at) {
            let _ = self.leave(&mut state, false);
            let current = self.inner.current.load_full();
            // A background refresh this was: tried again when the hold ends.
            if let Some(entry) = &current {
                if entry.background_claimed.load(Ordering::Acquire) {
                    self.inner.rearm_background(entry, retry_at);
                }
            }
            return Some(match current.filter(|e| self.valid(e)) {
                Some(entry) => Ok(entry),
                None => Err(backing_off(&state, retry_at, now)),
            });
        }
        // A step-up always fetches: what its predecessor brought asked for no scope.
        if self.step_up {
            return None;
        }
        // Its fetch starts now: not older than a credential handed over while it was
        // queued. Such a credential, fresh, makes it needless (below); one that is due
        // for a refresh is replaced by its result, if it brings one (see `leave`).
        self.began = Some(state.epoch);
        let (now, wall) = (Instant::now(), self.inner.config.clock.now());
        let current = self
            .inner
            .current
            .load_full()
            .filter(|e| matches!(e.phase_at(now, wall), Phase::Fresh))?;
        // Leaves under the lock that took the answer: a rejection of `current` that
        // comes after must start a fetch, not join this flight and be answered with
        // the credential it rejected.
        let _ = self.leave(&mut state, false);
        Some(Ok(current))
    }

    /// Whether `entry` may be sent without waiting: not yet in its hard window.
    fn sendable(&self, entry: &Entry) -> bool {
        let phase = entry.phase_at(Instant::now(), self.inner.config.clock.now());
        matches!(phase, Phase::Fresh | Phase::Soft)
    }

    /// Whether `entry` has not expired: in its hard window still better than an error.
    fn valid(&self, entry: &Entry) -> bool {
        !entry.is_expired_at(Instant::now(), self.inner.config.clock.now())
    }

    /// Takes this flight out of the state, and says whose its result is (`fetched`:
    /// whether it brought a credential), and whether an invalidation tainted it (then a
    /// result it brought is forgotten, whatever its standing: see
    /// `Inner::forget_suspect`).
    fn leave(&self, state: &mut State, fetched: bool) -> (Standing, bool) {
        let id = self.flight.id;
        if state.flight.as_ref().is_some_and(|f| f.id == id) {
            state.flight = None;
        }
        state.step_ups.retain(|f| f.id != id);
        if state.running.as_ref().is_some_and(|f| f.id == id) {
            state.running = None;
        }
        let suspect = state.suspect == Some(id);
        if suspect {
            state.suspect = None;
        }
        let tainted = state.tainted == Some(id);
        if tainted {
            state.tainted = None;
        }
        if state.epoch != self.epoch {
            // A credential handed over since this flight (or its fetch) started wins
            // while it may be sent (for this flight's own waiters too); one gone stale
            // meanwhile does not: this flight's result replaces it, unless it was
            // detached as well. Over no result, one that has not expired wins (better
            // than an error, as a waiter's own fallback is).
            let wins = |e: &Arc<Entry>| {
                if fetched {
                    self.sendable(e)
                } else {
                    self.valid(e)
                }
            };
            if let Some(current) = self.inner.current.load_full().filter(wins) {
                // A step-up's waiters asked for a wider grant than the handed-over
                // credential is known to carry: theirs is the step-up's result, and the
                // handed-over credential stays current.
                if self.step_up {
                    return (Standing::Overtaken, tainted);
                }
                // A chained fetch that began after the hand-over refreshes it, as any
                // refresh would; failed, it leaves it current, as the answer.
                if !(fetched && self.began == Some(state.epoch)) {
                    return (Standing::Replaced(current), tainted);
                }
            }
        }
        if suspect {
            return (Standing::Suspect, tainted);
        }
        (Standing::Current, tainted)
    }

    /// Ends the flight with the source's answer (or the store's: `from_store`); the
    /// waiters are told after the lock is released. A store's answer dropped meanwhile
    /// ends nothing (checked under the lock that installs it).
    fn finish(&mut self, result: Result<Credential, Error>, from_store: bool) -> Finished {
        let outcome = {
            let inner = &self.inner;
            let now = Instant::now();
            let mut state = inner.lock_state();
            if let (true, Ok(credential)) = (from_store, &result) {
                if state.dropped(credential) {
                    return Finished::StaleStoreHit;
                }
            }
            let (standing, tainted) = self.leave(&mut state, result.is_ok());
            let superseded = !matches!(standing, Standing::Current);
            // A credential handed over meanwhile answers instead of this one.
            self.used = result.is_ok() && !matches!(standing, Standing::Replaced(_));
            // After an invalidation a store may hold this fetch's result by now, however
            // it ends: it is remembered as dropped, so that no fetch of this cache takes
            // it back from there (and the next is told it).
            let forgotten = match &result {
                Ok(credential) if tainted => {
                    let entry = inner.entry(&mut state, credential.clone(), now);
                    inner.forget_suspect(&mut state, &entry, from_store);
                    Some(entry)
                }
                _ => None,
            };
            // A result for this flight's own waiters only: remembered, so that a request
            // it is rejected for can tell it from the credential offered instead (the
            // store's copy of it may be current by then, under another generation).
            let own = |state: &mut State, credential| {
                forgotten.clone().unwrap_or_else(|| {
                    let entry = inner.entry(state, credential, now);
                    state.remember_retired(&entry, Retired::Own);
                    entry
                })
            };
            match (result, standing) {
                (Ok(_), Standing::Replaced(current)) => {
                    tracing::debug!("fetched credential superseded by a replacement");
                    Ok(current)
                }
                (Ok(credential), Standing::Suspect) => {
                    // Invalidated (or replaced) while this fetch ran: its result predates
                    // that, so it goes to its own waiters only.
                    tracing::debug!("fetched credential predates an invalidation");
                    let entry = own(&mut state, credential);
                    self.record_step_up(&mut state, &entry);
                    Ok(entry)
                }
                (Ok(credential), Standing::Overtaken) => {
                    tracing::debug!(
                        "step-up overtaken by a replacement; its token goes to its own waiters"
                    );
                    let entry = own(&mut state, credential);
                    self.record_step_up(&mut state, &entry);
                    Ok(entry)
                }
                (Ok(credential), Standing::Current) => {
                    state.failures = 0;
                    state.retry_at = None;
                    state.last_error = None;
                    state.endpoint_hold = None;
                    let entry = inner.install(&mut state, credential, now);
                    self.record_step_up(&mut state, &entry);
                    tracing::debug!(generation = entry.generation, "credential refreshed");
                    Ok(entry)
                }
                (Err(err), Standing::Replaced(current)) => {
                    // The credential handed over meanwhile is the answer, as it would have
                    // been to a success (the one the waiters held to fall back on is no
                    // longer current either).
                    // The fleet's hold is no failure (see `lease::fleet_hold`).
                    if !self.gave_up && !err.held {
                        inner.stats.fetch_failures.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::debug!(error = %err, "a superseded refresh failed; using the replacement");
                    match Self::hold_retry_after(&mut state, &err, now) {
                        Some(retry_at) => {
                            if current.background_claimed.load(Ordering::Acquire) {
                                let at = match err.held {
                                    true => retry_at,
                                    false => retry_at.max(saturating_add(now, inner.backoff(1))),
                                };
                                inner.rearm_background(&current, at);
                            }
                        }
                        None => inner.give_back_claim(&current, now),
                    }
                    Ok(current)
                }
                (Err(err), _) => {
                    if self.gave_up {
                        // The source was not asked: no failure of its, nothing to back
                        // off from. A background refresh it ended may be tried again
                        // (after one backoff step, as a superseded one's is).
                        tracing::debug!(error = %err, "the refresh gave up without asking the source");
                        if let Some(current) = inner.current.load_full() {
                            inner.give_back_claim(&current, now);
                        }
                    } else if err.held {
                        // The fleet's hold, read from the store: no failure of this
                        // source's, no backoff step of this cache's; asked again when the
                        // hold ends (see `lease::fleet_hold`).
                        tracing::debug!(error = %err, "the refresh waits for the fleet's hold");
                        if let Some(retry_at) = Self::hold_retry_after(&mut state, &err, now) {
                            if let Some(entry) = inner.current.load_full() {
                                inner.rearm_background(&entry, retry_at);
                            }
                        }
                    } else if superseded {
                        inner.stats.fetch_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(error = %err, "a superseded refresh failed");
                        Self::hold_retry_after(&mut state, &err, now);
                    } else if self.step_up {
                        inner.stats.fetch_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(error = %err, cause = err_source(&err), "step-up failed; keeping the credential in use");
                        inner.step_up_failed_locked(&mut state);
                        // Its own steps hold back step-ups only; the endpoint's word
                        // holds every token request.
                        Self::hold_retry_after(&mut state, &err, now);
                    } else {
                        Self::record_failure(inner, &mut state, &err, now);
                    }
                    Err(err)
                }
            }
        };
        self.send(outcome);
        Finished::Yes
    }

    /// A step-up's credential, current or its own waiters' only: their answers tell
    /// whether the step-up worked (see `State::stepped_up`).
    fn record_step_up(&self, state: &mut State, entry: &Entry) {
        if self.step_up {
            state.stepped_up = Some((entry.generation, self.flight.scope.clone()));
        }
    }

    fn send(&mut self, outcome: Result<Arc<Entry>, Error>) {
        self.flight.run.send(outcome);
    }

    /// A failure that is not the cache's (superseded: its result would not have been
    /// installed) does not back the cache off, but a `Retry-After` it carries is the
    /// endpoint's word on every token request: no fetch begins before it (`plan`,
    /// `begin`). The time it holds to, if it carries one.
    fn hold_retry_after(state: &mut State, err: &Error, now: Instant) -> Option<Instant> {
        let asked = err.not_before?;
        let until = saturating_add(now, asked.min(MAX_RETRY_AFTER));
        state.endpoint_hold = state.endpoint_hold.max(Some(until));
        if state.retry_at.is_none_or(|at| at < until) {
            state.retry_at = Some(until);
            state.last_error = Some(err.clone());
        }
        state.retry_at
    }

    fn record_failure(inner: &Inner<P>, state: &mut State, err: &Error, now: Instant) {
        inner.stats.fetch_failures.fetch_add(1, Ordering::Relaxed);
        state.failures = state.failures.saturating_add(1);
        let mut delay = inner.backoff(state.failures);
        if let Some(asked) = err.not_before {
            // The endpoint said when (`Retry-After`): no earlier, within reason, even
            // past a credential handed over meanwhile.
            let asked = asked.min(MAX_RETRY_AFTER);
            delay = delay.max(asked);
            state.endpoint_hold = state.endpoint_hold.max(Some(saturating_add(now, asked)));
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
            inner.rearm_background(&entry, retry_at);
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
    #[cfg(feature = "token")]
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
        // A flight a waiter abandoned before its task began was ended by that waiter.
        if (!self.started && !self.flight.run.end_unrun()) || self.flight.run.sent() {
            return;
        }
        // Not finished: cancelled with its runtime, or refused before it ever ran.
        let kind = if self.started {
            ErrorKind::Cancelled
        } else {
            ErrorKind::SpawnRefused
        };
        let err = Error::new(kind);
        let mut outcome = Err(err.clone());
        if !self.asked {
            // Refused, or cancelled while it waited behind: it asked nothing.
            self.inner.stats.fetches.fetch_sub(1, Ordering::Relaxed);
        }
        {
            let mut state = self.inner.lock_state();
            let (standing, _) = self.leave(&mut state, false);
            if !self.asked && !self.step_up {
                // Nothing failed: no backoff. A background refresh's claim goes back
                // (the next caller in the soft window tries again), as when abandoned.
                // (A step-up's death backs off step-ups only, asked or not: below.)
                if let Standing::Replaced(current) = &standing {
                    outcome = Ok(current.clone());
                }
                if self.flight.run.background {
                    if let Some(entry) = self.inner.current.load_full() {
                        entry.background_claimed.store(false, Ordering::Release);
                    }
                }
            } else if let Standing::Replaced(current) = standing {
                // As in `finish`: the credential handed over meanwhile is the answer.
                self.inner
                    .stats
                    .fetch_failures
                    .fetch_add(1, Ordering::Relaxed);
                self.inner.give_back_claim(&current, Instant::now());
                outcome = Ok(current);
            } else if !matches!(standing, Standing::Current) {
                self.inner
                    .stats
                    .fetch_failures
                    .fetch_add(1, Ordering::Relaxed);
            } else if self.step_up {
                // A step-up's failure backs off step-ups only, as in `finish`.
                self.inner
                    .stats
                    .fetch_failures
                    .fetch_add(1, Ordering::Relaxed);
                self.inner.step_up_failed_locked(&mut state);
            } else {
                Self::record_failure(&self.inner, &mut state, &err, Instant::now());
            }
        }
        self.send(outcome);
    }
}

/// Waits for `ahead`, a flight this one is chained after, to end. Its task runs on the
/// runtime that planned it: one that has not begun by its due time (that runtime is not
/// driven) is abandoned here, as a waiter on another runtime abandons it (see
/// [`FlightRun`]); one that began and is overdue stalled mid-fetch: `Err`, as this flight
/// must not fetch beside it.
async fn wait_behind<P: CredentialSource>(inner: &Inner<P>, ahead: &Flight) -> Result<(), Error> {
    let mut result = ahead.future.clone();
    loop {
        let (deadline, begun) = match ahead.run.begun.load(Ordering::Acquire) {
            NOT_BEGUN => (ahead.run.due, false),
            BEGUN => (ahead.run.overdue, true),
            _ => {
                let _ = result.await;
                return Ok(());
            }
        };
        // On a runtime without timers, the process's alarm thread.
        let ended = matches!(
            futures_util::future::select(&mut result, std::pin::pin!(pause_until(deadline))).await,
            futures_util::future::Either::Left(_)
        );
        if ended {
            return Ok(());
        }
        if begun {
            return Err(overdue(&ahead.run));
        }
        if ahead.run.abandon() {
            abandon(inner, &ahead.run);
            return Ok(());
        }
    }
}

/// Adds to a flight's `told` what another flight was to tell: the one that names a
/// dropped credential (a rejection's first) wins.
fn inherit(
    into: &mut Option<(FetchReason, Option<Credential>)>,
    told: (FetchReason, Option<Credential>),
) {
    let names =
        |t: &(FetchReason, Option<Credential>)| (t.1.is_some(), t.0 == FetchReason::Rejected);
    if into.as_ref().is_none_or(|mine| names(&told) > names(mine)) {
        *into = Some(told);
    }
}

/// Ends a flight whose task never began, abandoned by the caller (see [`FlightRun`]).
fn abandon(cache: &dyn Replan, run: &FlightRun) {
    tracing::warn!(
        "a credential refresh never began: the runtime it was started on is not driven; \
         starting another on this one"
    );
    cache.forget_flight(run);
    run.send(Err(Error::new(ErrorKind::Cancelled)));
}

/// What a wait for a flight that began and then stalled with its runtime ends with
/// (logged once per flight, however many wait for it).
fn overdue(run: &FlightRun) -> Error {
    if !run.overdue_logged.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "a credential refresh running on another runtime is overdue: that runtime is \
             not driven; no longer waiting for it"
        );
    }
    Error::new(ErrorKind::Timeout)
        .with_detail("the refresh runs on another runtime, which is not driving it")
}

async fn run_flight<P: CredentialSource>(
    mut guard: FlightGuard<P>,
    mut cx: FetchContext,
    predecessors: Vec<Flight>,
) {
    if !guard.flight.run.begin() {
        // Abandoned by a waiter on another runtime, which planned another flight.
        return;
    }
    guard.started = true;
    if !predecessors.is_empty() {
        // Their results are not this flight's: only their end matters.
        for predecessor in &predecessors {
            if let Err(err) = wait_behind(&guard.inner, predecessor).await {
                // One ahead stalled mid-fetch with its runtime: this one must not fetch
                // beside it, and nothing failed here (no backoff).
                guard.gave_up = true;
                guard.inner.stats.fetches.fetch_sub(1, Ordering::Relaxed);
                let _ = guard.finish(Err(err), false);
                return;
            }
        }
        if let Some(answer) = guard.begin(&mut cx) {
            // Answered without the store or the source (a fresh credential handed over
            // meanwhile, or a backoff): no fetch.
            guard.inner.stats.fetches.fetch_sub(1, Ordering::Relaxed);
            #[cfg(test)]
            hook::run("after_begin");
            return guard.send(answer);
        }
    }
    // A store's credential dropped while it was loaded (`invalidate_if` or `reject` of
    // that value) is not this flight's answer: it looks again, and the store's copy is
    // refused then. Three looks at most (each stale one needs a drop of its own, landing
    // while the store answered).
    // One flight, one count in the metrics, however many looks it took; one deadline,
    // the fetch timeout, for all of them.
    guard.asked = true;
    let started = Instant::now();
    let deadline = saturating_add(started, guard.inner.config.fetch_timeout);
    let name = guard.inner.config.name.clone();
    // Whether the store answered every call of this refresh, told when it ends.
    let inner = Arc::clone(&guard.inner);
    let _health = HealthEnd(&inner.store_health, Some(inner.store_health.flight_began()));
    for look in 0..3 {
        // A store call that answers at once is not cut at the deadline: none begins
        // past it.
        if look > 0 && Instant::now() >= deadline {
            break;
        }
        let mut from_store = false;
        let mut to_keep = None;
        let result = if timers::known_absent() {
            // As below, without Tokio's panic printed again for this runtime.
            guard.gave_up = true;
            Err(Error::new(ErrorKind::NoRuntime).with_detail(NO_TIMERS))
        } else {
            match AssertUnwindSafe(obtain(
                &guard.inner,
                cx.clone(),
                deadline,
                guard.invalidations,
                &mut from_store,
                &mut to_keep,
            ))
            .catch_unwind()
            .await
            {
                Ok(result) => result,
                // Tokio's timers panic on a runtime built without them, before the source
                // is asked: the runtime's failure, which nothing backs off from.
                Err(panic) if timers_disabled(&*panic) => {
                    timers::found_absent();
                    guard.gave_up = true;
                    Err(Error::new(ErrorKind::NoRuntime).with_detail(NO_TIMERS))
                }
                Err(_panic) => Err(Error::new(ErrorKind::SourcePanicked)),
            }
        };
        let outcome = metrics::outcome(&result);
        let finished = guard.finish(result, from_store);
        // A pair to keep saving, once what the flight brought is installed: the task's
        // first step weighs the pair against the installed credential (a pair the
        // installed one supersedes gives way), which a task that ran first, on another
        // worker, would weigh against the one before.
        if let (Some(kept), Some(store)) = (to_keep, &guard.inner.config.store) {
            tokio::spawn(keep_saving(
                Arc::downgrade(&guard.inner),
                Arc::clone(store),
                Arc::clone(&guard.inner.kept),
                kept,
            ));
        }
        match finished {
            Finished::Yes => {
                if from_store && guard.used {
                    metrics::event(&name, metrics::STORE_HITS);
                }
                return metrics::refresh(&name, outcome, started.elapsed());
            }
            Finished::StaleStoreHit => {
                tracing::debug!("the store's credential was dropped while it loaded; again");
            }
        }
    }
    // None is installed: the flight fails, and the next request looks again (the store's
    // credentials it was given are known as dropped by then, and refused).
    guard.gave_up = true;
    guard.finish(Err(Error::new(ErrorKind::StoreCredentialDropped)), false);
    metrics::refresh(&name, "dropped", started.elapsed());
}

/// Ends a refresh's look at the store's health (see [`super::lease::StoreHealth`]) when
/// the refresh ends, however it ends.
struct HealthEnd<'a>(
    &'a super::lease::StoreHealth,
    Option<super::lease::HealthMark>,
);

impl Drop for HealthEnd<'_> {
    fn drop(&mut self) {
        if let Some(began) = self.1.take() {
            self.0.flight_ended(began);
        }
    }
}

/// Why a refresh on a runtime without timers failed.
const NO_TIMERS: &str =
    "the Tokio runtime has no timers: build it with enable_time (or enable_all)";

/// Whether a panic is Tokio's on a runtime built without its time driver.
fn timers_disabled(panic: &(dyn std::any::Any + Send)) -> bool {
    let text = (panic.downcast_ref::<&str>().copied())
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str));
    text.is_some_and(|text| text.contains("timers are disabled"))
}

/// Whether [`FlightGuard::finish`] ended the flight.
enum Finished {
    Yes,
    /// Not ended: the store's credential it was given was dropped while it loaded.
    StaleStoreHit,
}

/// `cx` as the source is asked: stamped with the cache's wall clock now (the flight may
/// have waited long for a lease or the source, and a source stamps its credential's
/// issue and expiry with [`FetchContext::now`]: one stamped as the flight began would
/// have lived that wait already); and told (if it is an invalidation's fetch) what a
/// fetch the invalidation made suspect brought, if that fetch ended after this one
/// began (a late fetch, say, which ends while this one waits for its lease or the
/// source): the one a source holding its last credential would hand back. See
/// `FlightGuard::begin`.
pub(super) fn asking<P: CredentialSource>(inner: &Inner<P>, cx: FetchContext) -> FetchContext {
    let mut cx = cx.at(inner.config.clock.now());
    if cx.reason() == FetchReason::Invalidated {
        if let Some(dropped) = inner.lock_state().tainted_result.take() {
            cx.set_previous(dropped);
        }
    }
    cx
}

/// Asks the source, under the deadline, and checks what it answered. `refused`: a
/// credential the check refused (expired on arrival) that carries a refresh token, which
/// must not be lost with it: the lease holder keeps it in the store.
pub(super) async fn fetch<P: CredentialSource>(
    inner: &Inner<P>,
    cx: FetchContext,
    deadline: Instant,
    refused: &mut Option<Credential>,
) -> Result<Credential, Error> {
    let started = Instant::now();
    let result = checked_fetch(inner, cx, deadline, refused).await;
    measured(inner, started, result)
}

/// `result`, a source fetch's begun at `started`, recorded in the metrics.
pub(super) fn measured<P>(
    inner: &Inner<P>,
    started: Instant,
    result: Result<Credential, Error>,
) -> Result<Credential, Error> {
    metrics::source_fetch(
        &inner.config.name,
        metrics::outcome(&result),
        started.elapsed(),
    );
    result
}

/// [`fetch`], unmeasured.
async fn checked_fetch<P: CredentialSource>(
    inner: &Inner<P>,
    cx: FetchContext,
    deadline: Instant,
    refused: &mut Option<Credential>,
) -> Result<Credential, Error> {
    // A lease holder's fetch that outlived its flight may still run (see
    // `fetch_holding`): waited for, as the fleet's other processes wait for its lease.
    let fetched = tokio::time::timeout_at(deadline, async {
        let _gate = inner.source_gate.lock().await;
        ask_source(&inner.source, asking(inner, cx)).await
    });
    match fetched.await {
        Err(_elapsed) => Err(Error::new(ErrorKind::Timeout)),
        Ok(answer) => check_fetched(inner, answer, refused),
    }
}

/// The source's fetch, a panic in it caught as [`ErrorKind::SourcePanicked`]: the
/// flight's own error path then runs, and gives a lease it holds back at once rather
/// than leave the fleet to wait it out (the flight catches a panic too, but only after
/// the lease was dropped unreleased).
pub(super) async fn ask_source<P: CredentialSource>(
    source: &P,
    cx: FetchContext,
) -> Result<Credential, crate::error::BoxError> {
    AssertUnwindSafe(source.fetch(cx))
        .catch_unwind()
        .await
        .unwrap_or_else(|_panic| Err(Error::new(ErrorKind::SourcePanicked).into()))
}

/// What the source answered, checked: see [`fetch`].
pub(super) fn check_fetched<P: CredentialSource>(
    inner: &Inner<P>,
    answer: Result<Credential, crate::error::BoxError>,
    refused: &mut Option<Credential>,
) -> Result<Credential, Error> {
    let credential = answer.map_err(fetch_error)?;
    let wall = inner.config.clock.now();
    if inner
        .believed_expiry(&credential, wall)
        .is_some_and(|at| at <= wall)
    {
        if credential.refresh_token().is_some() {
            *refused = Some(credential);
        }
        return Err(Error::new(ErrorKind::Expired));
    }
    if credential.is_bound() && !inner.source.binds_credentials() {
        // The reqwest middleware would prove for the origin alone, and a store would be
        // handed what it cannot keep.
        return Err(
            Error::new(ErrorKind::InvalidCredential).with_detail(crate::error::UNDECLARED_BINDING)
        );
    }
    tracing::debug!(
        expires_in_s = credential
            .expiry()
            .map(|at| at.duration_since(wall).unwrap_or_default().as_secs()),
        "credential fetched"
    );
    Ok(credential)
}

/// Tests' hooks into moments where another thread's call can land on a multi-threaded
/// runtime, between a decision and what is done on it: a test runs that call there, on
/// one thread. `after_begin`: a chained flight found its fetch needless and took its
/// answer, before its waiters are told. `after_reject_read`: `reject` decided whether the
/// credential is current, before it acts on that.
#[cfg(test)]
pub(super) mod hook {
    use std::cell::RefCell;

    type Hook = (&'static str, Box<dyn FnOnce()>);

    thread_local! {
        static HOOKS: RefCell<Vec<Hook>> = const { RefCell::new(Vec::new()) };
    }

    pub(in crate::cache) fn set(at: &'static str, f: impl FnOnce() + 'static) {
        HOOKS.with(|h| h.borrow_mut().push((at, Box::new(f))));
    }

    pub(in crate::cache) fn run(at: &'static str) {
        let hook = HOOKS.with(|h| {
            let mut hooks = h.borrow_mut();
            let i = hooks.iter().position(|(name, _)| *name == at)?;
            Some(hooks.remove(i).1)
        });
        if let Some(f) = hook {
            f();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        cell::RefCell,
        rc::Rc,
        sync::{
            Arc,
            atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst},
        },
    };

    use super::*;
    use std::time::Duration;

    use crate::store::Lease;
    use crate::{error::BoxError, source::source_fn};

    /// A source of `t-0`, `t-1`, ...: its first fetch waits for a permit of the gate
    /// returned with it; the count of its fetches.
    fn gated() -> (
        impl CredentialSource,
        Arc<tokio::sync::Semaphore>,
        Arc<AtomicUsize>,
    ) {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let fetches = Arc::new(AtomicUsize::new(0));
        let source = source_fn({
            let (gate, fetches) = (gate.clone(), fetches.clone());
            move |_cx: FetchContext| {
                let n = fetches.fetch_add(1, SeqCst);
                let gate = gate.clone();
                async move {
                    if n == 0 {
                        gate.acquire().await.unwrap().forget();
                    }
                    Credential::bearer(format!("t-{n}")).map_err(BoxError::from)
                }
            }
        });
        (source, gate, fetches)
    }

    /// Keep-warm's refresh, due at the soft window, finds the cache with a user and
    /// counts itself one; the last user goes between the two. Proves: no refresh
    /// starts (the source is not asked) for a cache nobody uses any more.
    #[tokio::test(start_paused = true)]
    async fn keep_warm_starts_nothing_once_the_last_user_went_as_it_looked() {
        let fetches = Arc::new(AtomicUsize::new(0));
        let source = source_fn({
            let fetches = fetches.clone();
            move |_cx: FetchContext| {
                let n = fetches.fetch_add(1, SeqCst);
                async move {
                    Ok::<_, BoxError>(
                        Credential::bearer(format!("t-{n}"))?.expires_in(Duration::from_secs(100)),
                    )
                }
            }
        });
        let cache = CredentialCache::builder(source)
            .window_jitter(0.0)
            .build()
            .unwrap();
        cache.credential().await.unwrap();
        tokio::time::advance(Duration::from_secs(80)).await;
        let generation = cache.inner.current.load().as_ref().unwrap().generation;
        let weak = Arc::downgrade(&cache.inner);
        hook::set("keep_warm_upgraded", move || drop(cache));
        super::super::keep_warm(&weak, generation);
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            fetches.load(SeqCst),
            1,
            "a refresh ran after the last user went"
        );
    }

    /// A chained flight made needless by a credential handed over answers with that
    /// credential. A rejection of it that lands after the flight took it, before the
    /// flight's waiters are told, must not join that flight: it would be answered with
    /// the very credential it rejected (seen once by `tests/interleavings.rs`, seed 0).
    #[tokio::test]
    async fn a_rejection_landing_as_a_needless_flight_ends_does_not_join_it() {
        let (source, gate, fetches) = gated();
        let cache = CredentialCache::new(source);
        let handle = cache.handle();
        // A fetch runs; an invalidation makes it suspect; the next caller's flight is
        // chained after it; then a credential is handed over, which makes that one's
        // fetch needless.
        let first = cache.acquire(None);
        tokio::task::yield_now().await;
        handle.invalidate();
        let chained = cache.acquire(None);
        let mine = Credential::bearer("mine").unwrap();
        assert!(handle.replace(mine.clone()).unwrap());
        let generation = cache.inner.current.load().as_ref().unwrap().generation;
        // The API rejects the handed-over credential just as the chained flight ends.
        let rejected: Rc<RefCell<Option<Acquire>>> = Rc::default();
        hook::set("after_begin", {
            let (cache, rejected) = (cache.clone(), rejected.clone());
            move || *rejected.borrow_mut() = Some(cache.replace_rejected(generation))
        });
        gate.add_permits(1);
        // The handed-over credential answers both flights' waiters.
        assert_eq!(first.await.unwrap().credential, mine);
        assert_eq!(chained.await.unwrap().credential, mine);
        let replacement = rejected.borrow_mut().take().expect("the hook ran");
        let replacement = replacement.await.unwrap();
        assert_ne!(
            replacement.credential, mine,
            "the rejection was answered with the credential it rejected"
        );
        assert_eq!(fetches.load(SeqCst), 2);
    }

    /// A store that, while `fresh` is set, holds another credential at each load
    /// (`stored-0`, `stored-1`, ...: processes saving one after another), recorded in
    /// `loaded`; otherwise, and for everything else, a `MemoryStore`.
    struct Saving {
        memory: crate::store::MemoryStore,
        loaded: Arc<std::sync::Mutex<Vec<Credential>>>,
        fresh: Arc<AtomicBool>,
    }

    impl Saving {
        fn new(loaded: Arc<std::sync::Mutex<Vec<Credential>>>, fresh: Arc<AtomicBool>) -> Self {
            let memory = crate::store::MemoryStore::new();
            Saving {
                memory,
                loaded,
                fresh,
            }
        }
    }

    impl crate::store::CredentialStore for Saving {
        async fn load(&self) -> Result<Option<Credential>, BoxError> {
            if !self.fresh.load(SeqCst) {
                return self.memory.load().await;
            }
            let mut loaded = self.loaded.lock().unwrap();
            let credential = Credential::bearer(format!("stored-{}", loaded.len()))?;
            loaded.push(credential.clone());
            Ok(Some(credential))
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
    }

    /// At each of a flight's next three store hits, another task hands the value just
    /// loaded over and drops it again, `late` after the load (blocking the thread).
    fn drop_each_load<P: CredentialSource>(
        cache: &CredentialCache<P>,
        loaded: &Arc<std::sync::Mutex<Vec<Credential>>>,
        late: Duration,
    ) {
        for _ in 0..3 {
            hook::set("store_hit", {
                let (cache, loaded) = (cache.clone(), loaded.clone());
                move || {
                    std::thread::sleep(late);
                    let value = loaded.lock().unwrap().last().unwrap().clone();
                    assert!(cache.handle().replace(value.clone()).unwrap());
                    assert!(cache.handle().invalidate_if(&value));
                }
            });
        }
    }

    /// A store that holds another credential at each load (other processes saving one
    /// after another), each handed over here and dropped again (`replace`, then
    /// `invalidate_if` of that value) just as the load returns, three times running.
    /// None of the three is installed or handed to the flight's waiters: the refresh
    /// fails after its third look, and the next request looks again.
    #[tokio::test]
    async fn store_hits_dropped_on_every_load_are_never_installed() {
        #[cfg(feature = "metrics")]
        let snapshotter = {
            let recorder = metrics_util::debugging::DebuggingRecorder::new();
            let snapshotter = recorder.snapshotter();
            recorder.install().expect("the lib tests' only recorder");
            snapshotter
        };
        let loaded = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (source, gate, _) = gated();
        gate.add_permits(1);
        let cache = CredentialCache::builder(source)
            .name("stale-looks")
            .store(Saving::new(loaded.clone(), Arc::new(AtomicBool::new(true))))
            .build()
            .unwrap();
        drop_each_load(&cache, &loaded, Duration::ZERO);
        let answer = cache.credential().await;
        let loaded = loaded.lock().unwrap().clone();
        assert_eq!(loaded.len(), 3, "{loaded:?}");
        // Three looks, three drops: the refresh fails, saying why, and backs nothing
        // off: the next request looks again (and takes the store's next credential).
        let err = answer.expect_err("a credential dropped while it loaded was handed out");
        assert_eq!(err.kind(), ErrorKind::StoreCredentialDropped, "{err}");
        assert_eq!(cache.stats().fetch_failures, 0);
        // One flight, counted once, as given up; no store hit (none was used).
        #[cfg(feature = "metrics")]
        {
            let counted = |metric: &str| -> Vec<(Vec<String>, u64)> {
                let snapshot = snapshotter.snapshot().into_vec();
                snapshot
                    .into_iter()
                    .filter(|(key, ..)| key.key().name() == metric)
                    .map(|(key, _, _, value)| {
                        let labels = key.key().labels().map(|l| l.value().to_owned()).collect();
                        let n = match value {
                            metrics_util::debugging::DebugValue::Counter(n) => n,
                            _ => 0,
                        };
                        (labels, n)
                    })
                    .filter(|(labels, _): &(Vec<String>, u64)| {
                        labels.iter().any(|l| l == "stale-looks")
                    })
                    .collect()
            };
            assert_eq!(
                counted("tower_client_auth_refreshes_total"),
                [(vec!["stale-looks".to_owned(), "dropped".to_owned()], 1)]
            );
            assert_eq!(counted("tower_client_auth_store_hits_total"), []);
        }
        let current = cache.inner.current.load_full();
        assert!(
            current.is_none_or(|e| !loaded.contains(&e.credential)),
            "a credential dropped while it loaded is current"
        );
        let next = cache
            .credential()
            .await
            .expect("the next request did not look again");
        assert!(!loaded.contains(&next));
    }

    /// As above, but each drop lands late, 1.2 s after its load, with a 2 s fetch
    /// timeout (the task that drops it held up). The looks share the flight's one
    /// deadline: the second look, at 1.2 s, is within it; none begins past it, and the
    /// caller is told at 2.4 s, rather than wait up to three fetch timeouts, one a look.
    #[tokio::test]
    async fn a_flights_store_looks_share_one_deadline() {
        let loaded = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (source, gate, fetches) = gated();
        gate.add_permits(1);
        let cache = CredentialCache::builder(source)
            .store(Saving::new(loaded.clone(), Arc::new(AtomicBool::new(true))))
            .fetch_timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        drop_each_load(&cache, &loaded, Duration::from_millis(1200));
        let err = cache.credential().await.expect_err("a dropped credential");
        assert_eq!(err.kind(), ErrorKind::StoreCredentialDropped, "{err}");
        assert_eq!(
            loaded.lock().unwrap().len(),
            2,
            "a look began past the deadline"
        );
        assert_eq!(fetches.load(SeqCst), 0);
    }

    /// A background refresh (the soft window) whose three store looks each found a
    /// credential dropped as it loaded (values this cache had handed a flight's own
    /// waiters, rejected elsewhere meanwhile) gives its claim back after one backoff
    /// step, as a failed one does: a later request in the soft window starts it again,
    /// rather than leave the refresh to the hard window.
    #[tokio::test]
    async fn a_background_refresh_given_up_on_stale_store_looks_is_tried_again() {
        use std::time::SystemTime;
        tokio::time::pause();
        let clock = crate::clock::ManualClock::new(SystemTime::now());
        let fetches = Arc::new(AtomicUsize::new(0));
        let source = source_fn({
            let (clock, fetches) = (clock.clone(), fetches.clone());
            move |_cx: FetchContext| {
                let n = fetches.fetch_add(1, SeqCst);
                let now = crate::clock::Clock::now(&clock);
                async move {
                    let credential = Credential::bearer(format!("t-{n}"))?;
                    Ok::<_, BoxError>(credential.lives(now, Duration::from_secs(100)))
                }
            }
        });
        let (loaded, fresh) = (Arc::default(), Arc::new(AtomicBool::new(false)));
        let cache = CredentialCache::builder(source)
            .clock(clock.clone())
            .store(Saving::new(Arc::clone(&loaded), fresh.clone()))
            .build()
            .unwrap();
        assert_eq!(
            cache.credential().await.unwrap(),
            Credential::bearer("t-0").unwrap()
        );
        {
            let mut state = cache.inner.lock_state();
            for i in 0..3 {
                let value = Credential::bearer(format!("stored-{i}")).unwrap();
                state.retired.push_back((1000 + i, value, Retired::Own));
            }
        }
        fresh.store(true, SeqCst);
        for _ in 0..3 {
            hook::set("store_hit", {
                let (cache, loaded) = (cache.clone(), Arc::clone(&loaded));
                move || {
                    let value = loaded.lock().unwrap().last().unwrap().clone();
                    // Rejected elsewhere: not current, so `false`, but dropped.
                    assert!(!cache.handle().invalidate_if(&value));
                }
            });
        }
        let soft = Duration::from_secs(80);
        clock.advance(soft);
        tokio::time::advance(soft).await;
        // The background refresh starts, and gives up after three stale looks.
        assert_eq!(
            cache.credential().await.unwrap(),
            Credential::bearer("t-0").unwrap()
        );
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        assert_eq!(loaded.lock().unwrap().len(), 3);
        assert_eq!(fetches.load(SeqCst), 1);
        fresh.store(false, SeqCst);
        // Past one backoff step, still in the soft window: the next request starts it.
        let later = Duration::from_secs(5);
        clock.advance(later);
        tokio::time::advance(later).await;
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        cache.credential().await.unwrap();
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            fetches.load(SeqCst),
            2,
            "no background refresh in the soft window"
        );
    }

    /// A fetch overtaken by a credential handed over (already in its hard window) goes
    /// to its own waiters only, and into the store. The application rejects that
    /// credential with `reject`, while another thread's request refreshes the handed-over
    /// one: that refresh must not take the rejected credential back from the store, and
    /// `reject` must not answer with it, however the two interleave. (Review finding:
    /// `reject` compared the credential with the current one before taking the lock.)
    #[tokio::test]
    async fn a_rejection_racing_a_refresh_never_gets_its_credential_back_from_the_store() {
        let (source, gate, _) = gated();
        let cache = CredentialCache::builder(source)
            .store(crate::store::MemoryStore::new())
            .build()
            .unwrap();
        let first = tokio::spawn({
            let cache = cache.clone();
            async move { cache.credential().await }
        });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        // Ten seconds left of an hour: in its hard window.
        let stale = Credential::bearer("handed-over").unwrap().lives(
            std::time::SystemTime::now() - std::time::Duration::from_secs(3590),
            std::time::Duration::from_secs(3600),
        );
        assert!(cache.handle().replace(stale).unwrap());
        gate.add_permits(1);
        let fetched = first.await.unwrap().unwrap();
        assert_eq!(fetched, Credential::bearer("t-0").unwrap());
        // Another thread's request, landing right after `reject` looked at the current
        // credential: it refreshes the handed-over one.
        hook::set("after_reject_read", {
            let other = cache.clone();
            move || {
                let got = std::thread::spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap()
                        .block_on(other.credential())
                })
                .join()
                .unwrap();
                assert!(got.is_ok());
            }
        });
        let answer = cache.reject(&fetched).await.unwrap();
        assert_ne!(
            answer, fetched,
            "`reject` answered with the credential it rejected"
        );
        assert_ne!(
            cache.credential().await.unwrap(),
            fetched,
            "the rejected credential is current"
        );
    }

    /// A lease holder that took the store's refresh token out (its marker saved) but
    /// never asked the source (the source busy past the deadline with a fetch that
    /// outlived an earlier flight, whose lease was lost) presented nothing: the pair goes
    /// back to the store, and the next refresh presents its refresh token rather than
    /// log in.
    #[tokio::test]
    async fn a_holder_that_never_asked_the_source_puts_the_refresh_token_back() {
        use crate::{CredentialStore, source::RefreshSharing};
        let presented: Arc<std::sync::Mutex<Vec<Option<String>>>> = Arc::default();
        let source = source_fn({
            let presented = presented.clone();
            move |cx: FetchContext| {
                let token = match cx.refresh_sharing() {
                    RefreshSharing::Shared(token) => token.map(|t| t.expose().to_owned()),
                    _ => Some("not shared".into()),
                };
                presented.lock().unwrap().push(token);
                async {
                    Credential::bearer("a2")
                        .map(|c| c.with_refresh_token("rt2"))
                        .map_err(BoxError::from)
                }
            }
        });
        let store = crate::MemoryStore::default();
        let lease = store.lease(Duration::from_secs(5)).await.unwrap().unwrap();
        let expired = Credential::bearer("a1")
            .unwrap()
            .with_refresh_token("rt1")
            .expires_at(std::time::SystemTime::now() - Duration::from_secs(60));
        assert!(store.save(&lease, &expired).await.unwrap());
        store.release(&lease).await.unwrap();
        let cache = CredentialCache::builder(source)
            .store(store.clone())
            .fetch_timeout(Duration::from_millis(300))
            .backoff(Duration::from_millis(1), Duration::from_millis(1))
            .build()
            .unwrap();
        // A fetch that outlived an earlier flight holds the source.
        let busy = Arc::clone(&cache.inner.source_gate).lock_owned().await;
        let err = cache.credential().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Timeout);
        drop(busy);
        let stored = store.load().await.unwrap().expect("a pair in the store");
        assert_eq!(
            stored.refresh_token().map(crate::Secret::expose),
            Some("rt1"),
            "the refresh token taken out of the store and never presented is lost"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        cache.credential().await.unwrap();
        assert_eq!(*presented.lock().unwrap(), [Some("rt1".to_owned())]);
    }
}
