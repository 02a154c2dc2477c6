//! The single flight: starting one refresh for every caller who needs it, waiting for it,
//! and ending it (installing the credential, or backing off), however the task ends.

use std::{
    fmt,
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll, ready},
};

use futures_util::future::{FutureExt, Shared};
use tokio::time::Instant;
use tracing::Instrument;

use super::{
    CredentialCache, Flight, Inner, MAX_RETRY_AFTER, Retired, STORE_SHARE, State, Want,
    YOUNG_CREDENTIAL_AGE,
    config::saturating_add,
    entry::{Entry, Phase},
};
use crate::{
    clock::WallClock,
    credential::Credential,
    error::{Error, ErrorKind},
    metrics,
    source::{CredentialSource, FetchContext, FetchReason, Sharing},
    store::Lease,
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
        if let Some(flight) = joinable {
            metrics::event(&inner.config.name, metrics::WAITS);
            return (
                Acquire::waiting(flight.future.clone(), still_valid, &inner.config.clock),
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
            let err = match &state.last_error {
                // A refused transport stays that, however often it is asked for.
                Some(last) if last.kind() == ErrorKind::InsecureTransport => last.clone(),
                Some(last) => {
                    Error::new(ErrorKind::Backoff).with_shared_source(Arc::new(last.clone()))
                }
                None => Error::new(ErrorKind::Backoff),
            };
            return (Acquire::ready(Err(err.with_retry_in(retry_at - now))), None);
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return (Acquire::ready(Err(Error::new(ErrorKind::NoRuntime))), None);
        };
        if reason == FetchReason::Initial {
            if let Some(dropped) = state.invalidated.take() {
                reason = FetchReason::Invalidated;
                previous = dropped;
                // The marker holds a tainted fetch's result by now, if one ended.
                state.tainted_result = None;
            }
        }
        state.flight_id += 1;
        let id = state.flight_id;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let flight = Flight {
            id,
            future: FlightFuture { rx }.shared(),
            scope: required_scope.as_deref().filter(|_| step_up).map(Arc::from),
        };
        // After an invalidation, the fetch it made suspect may still run: this one waits
        // for it to end before it starts. A flight chained after it and not started yet,
        // or a step-up's beside an ordinary one, is waited for too: never two at once.
        let running = state.running.as_ref().map(|f| f.id);
        let queued = state
            .flight
            .iter()
            .chain(&state.step_ups)
            .filter(|f| running != Some(f.id));
        let predecessors: Vec<_> = state
            .running
            .iter()
            .chain(queued)
            .map(|f| f.future.clone())
            .collect();
        if predecessors.is_empty() {
            state.running = Some(flight.clone());
        }
        if step_up {
            state.step_ups.push(flight.clone());
        } else {
            state.flight = Some(flight.clone());
        }
        inner.stats.fetches.fetch_add(1, Ordering::Relaxed);
        metrics::event(&inner.config.name, metrics::WAITS);
        let guard = FlightGuard {
            inner: self.inner.clone(),
            epoch: state.epoch,
            began: None,
            flight: flight.clone(),
            started: false,
            tx: Some(tx),
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
            Acquire::waiting(flight.future, still_valid, &inner.config.clock),
            Some(start),
        )
    }
}

/// A refresh task, decided under the lock and started after it is released.
struct Start<P: CredentialSource> {
    runtime: tokio::runtime::Handle,
    guard: FlightGuard<P>,
    cx: FetchContext,
    /// The flights this one's fetch waits for (never two fetches at once).
    predecessors: Vec<Shared<FlightFuture>>,
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
    Waiting(Shared<FlightFuture>),
}

impl Acquire {
    pub(super) fn ready(result: Result<Arc<Entry>, Error>) -> Self {
        Acquire {
            state: AcquireState::Ready(Some(result)),
            fallback: None,
            clock: None,
        }
    }

    pub(super) fn waiting(
        flight: Shared<FlightFuture>,
        fallback: Option<Arc<Entry>>,
        clock: &WallClock,
    ) -> Self {
        Acquire {
            state: AcquireState::Waiting(flight),
            clock: fallback.is_some().then(|| clock.clone()),
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
                let wall = self.clock.as_ref().map(WallClock::now);
                Poll::Ready(match (result, self.fallback.take(), wall) {
                    // Not one dropped meanwhile (invalidated, rejected, replaced).
                    (Err(err), Some(entry), Some(wall))
                        if !entry.retired.load(Ordering::Acquire)
                            && !entry.is_expired_at(Instant::now(), wall) =>
                    {
                        tracing::debug!(error = %err, "refresh failed; using the still-valid credential");
                        Ok(entry)
                    }
                    (result, _, _) => result,
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
    /// Whether the task ran at all: a task dropped before its first poll was refused.
    started: bool,
    /// Where the result goes; taken when it is sent.
    tx: Option<tokio::sync::oneshot::Sender<Result<Arc<Entry>, Error>>>,
    /// Whether this is a step-up: its failure backs off step-ups only (the credential
    /// in use is still valid, and its own refresh must not wait for a scope).
    step_up: bool,
    /// Whether it gave up because the store's credentials were dropped as they loaded:
    /// no source was asked, so nothing backs off. (Not told by the error's kind: a
    /// source over another cache may pass that kind on as its own failure.)
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
    fn begin(&mut self, cx: &mut FetchContext) -> Option<Arc<Entry>> {
        let mut state = self.inner.lock_state();
        state.running = Some(self.flight.clone());
        self.invalidations = state.invalidations;
        if cx.reason() == FetchReason::Invalidated {
            if let Some(dropped) = state.tainted_result.take() {
                cx.set_previous(dropped);
            }
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
        Some(current)
    }

    /// Whether `entry` may be sent without waiting: not yet in its hard window.
    fn sendable(&self, entry: &Entry) -> bool {
        let phase = entry.phase_at(Instant::now(), self.inner.config.clock.now());
        matches!(phase, Phase::Fresh | Phase::Soft)
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
            // detached as well.
            if let Some(current) = self.inner.current.load_full().filter(|e| self.sendable(e)) {
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
                    Ok(own(&mut state, credential))
                }
                (Ok(credential), Standing::Overtaken) => {
                    tracing::debug!(
                        "step-up overtaken by a replacement; its token goes to its own waiters"
                    );
                    Ok(own(&mut state, credential))
                }
                (Ok(credential), Standing::Current) => {
                    state.failures = 0;
                    state.retry_at = None;
                    state.last_error = None;
                    let entry = inner.install(&mut state, credential, now);
                    tracing::debug!(generation = entry.generation, "credential refreshed");
                    Ok(entry)
                }
                (Err(err), Standing::Replaced(current)) => {
                    // The credential handed over meanwhile is the answer, as it would have
                    // been to a success (the one the waiters held to fall back on is no
                    // longer current either).
                    if !self.gave_up {
                        inner.stats.fetch_failures.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::debug!(error = %err, "a superseded refresh failed; using the replacement");
                    inner.give_back_claim(&current, now);
                    Ok(current)
                }
                (Err(err), _) => {
                    if self.gave_up {
                        // The source was not asked: no failure of its, nothing to back
                        // off from. A background refresh it ended may be tried again
                        // (after one backoff step, as a superseded one's is).
                        tracing::debug!("the store's credential was dropped at every look");
                        if let Some(current) = inner.current.load_full() {
                            inner.give_back_claim(&current, now);
                        }
                    } else if superseded {
                        inner.stats.fetch_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(error = %err, "a superseded refresh failed");
                    } else if self.step_up {
                        inner.stats.fetch_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(error = %err, cause = err_source(&err), "step-up failed; keeping the credential in use");
                        inner.step_up_failed_locked(&mut state);
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

    fn send(&mut self, outcome: Result<Arc<Entry>, Error>) {
        if let Some(tx) = self.tx.take() {
            // No waiter left is fine: the credential is installed all the same.
            let _ = tx.send(outcome);
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
        if self.tx.is_none() {
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
        {
            let mut state = self.inner.lock_state();
            let (standing, _) = self.leave(&mut state, false);
            if let Standing::Replaced(current) = standing {
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

async fn run_flight<P: CredentialSource>(
    mut guard: FlightGuard<P>,
    mut cx: FetchContext,
    predecessors: Vec<Shared<FlightFuture>>,
) {
    guard.started = true;
    if !predecessors.is_empty() {
        // Their results are not this flight's: only their end matters.
        for predecessor in predecessors {
            let _ = predecessor.await;
        }
        if let Some(current) = guard.begin(&mut cx) {
            #[cfg(test)]
            hook::run("after_begin");
            return guard.send(Ok(current));
        }
    }
    // A store's credential dropped while it was loaded (`invalidate_if` or `reject` of
    // that value) is not this flight's answer: it looks again, and the store's copy is
    // refused then. Three looks at most (each stale one needs a drop of its own, landing
    // while the store answered).
    // One flight, one count in the metrics, however many looks it took; one deadline,
    // the fetch timeout, for all of them.
    let started = Instant::now();
    let deadline = saturating_add(started, guard.inner.config.fetch_timeout);
    let name = guard.inner.config.name.clone();
    for look in 0..3 {
        // A store call that answers at once is not cut at the deadline: none begins
        // past it.
        if look > 0 && Instant::now() >= deadline {
            break;
        }
        let mut from_store = false;
        let mut to_keep = None;
        let result = AssertUnwindSafe(obtain(
            &guard.inner,
            cx.clone(),
            deadline,
            guard.invalidations,
            &mut from_store,
            &mut to_keep,
        ))
        .catch_unwind()
        .await
        .unwrap_or_else(|_panic| Err(Error::new(ErrorKind::SourcePanicked)));
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

/// Whether [`FlightGuard::finish`] ended the flight.
enum Finished {
    Yes,
    /// Not ended: the store's credential it was given was dropped while it loaded.
    StaleStoreHit,
}

/// Gets a credential from the store, or else from the source: the refresh path of
/// [`crate::store`]'s module docs. One deadline, the flight's, bounds the loads,
/// the lease, the wait for another holder and the fetch; each store call gets at most a
/// [`STORE_SHARE`] of it, and a store that fails or does not answer in time is skipped
/// (logged once per outage) for this process's own fetch. `from_store`: set when the
/// credential is the store's, not the source's.
async fn obtain<P: CredentialSource>(
    inner: &Arc<Inner<P>>,
    cx: FetchContext,
    deadline: Instant,
    invalidations: u64,
    from_store: &mut bool,
    to_keep: &mut Option<Kept>,
) -> Result<Credential, Error> {
    let cx = cx.at(inner.config.clock.now());
    let Some(store) = &inner.config.store else {
        return fetch(inner, cx, deadline, &mut None).await;
    };
    // What this refresh brings is newer than every credential installed before now.
    let born = inner.lock_state().next_generation;
    if let (FetchReason::Rejected | FetchReason::Invalidated, Some(rejected)) =
        (cx.reason(), cx.previous())
    {
        // A credential that carries the fleet's refresh token is not removed: the
        // refresh token goes with it, and the lease holder replaces both at once (it
        // never uses the rejected credential: see `usable`).
        if rejected.refresh_token().is_none() {
            store_call(inner, deadline, "remove", store.remove(rejected)).await;
        }
    }
    // A step-up asks the source for a wider grant: whatever the store holds was not
    // granted for its scope.
    let step_up = cx.reason() == FetchReason::StepUp;
    let usable = |stored: &Credential| {
        !step_up && Some(stored) != cx.previous() && inner.is_reusable_stored(stored)
    };
    let mut pause = LEASE_POLL_FIRST;
    let name = &inner.config.name;
    // When this flight began to wait for another holder, if it did.
    let mut waiting_since = None;
    let waited = |since: Option<Instant>| {
        if let Some(since) = since {
            metrics::lease_wait(name, since.elapsed());
        }
    };
    loop {
        if !step_up {
            if let Some(late) = unsaved_late(inner) {
                tracing::debug!("using the unsaved credential a late fetch brought");
                waited(waiting_since);
                return Ok(late);
            }
        }
        // Registered before the looks below, so a save between them and the wait is
        // not missed.
        let wake = store.changed(pause);
        if let Some(Some(stored)) = store_call(inner, deadline, "load", store.load()).await {
            if usable(&stored) {
                #[cfg(test)]
                hook::run("store_hit");
                tracing::debug!("using the credential found in the store");
                waited(waiting_since);
                *from_store = true;
                return Ok(stored);
            }
        }
        let taken = match store_call(inner, deadline, "lease", store.lease(lease_hold(inner))).await
        {
            // A pair this process keeps whose own lease ran out: taken over, if the store
            // says no one took it meanwhile; or the lease handed to its task, when the
            // store does not say, and waited for.
            Some(Some(lease)) => match step_up {
                true => Some((lease, None)),
                false => match take_lost_kept(inner, store.as_ref(), deadline, &lease).await {
                    LostKept::None => Some((lease, None)),
                    LostKept::Taken(kept) => Some((lease, Some(kept))),
                    LostKept::Handed => None,
                },
            },
            // This process's own, kept to save a pair the store refused: taken over; or
            // another process fetches.
            Some(None) => take_kept(inner, store.as_ref(), deadline, step_up).await,
            // The store is not answering: this process's own fetch, told so (a refresh
            // token it holds may be another process's by now).
            // Its refresh token, if the source gave one, is this process's alone and
            // never saved: dropped, so that it passes for no kept pair's successor
            // (see `superseded`); the fleet's refresh token is the store's or a kept
            // pair's (`TokenSource` gives none then).
            None => {
                waited(waiting_since);
                if Instant::now() >= deadline {
                    // Out of time, not a store that does not answer: the call could not
                    // be answered in no time. Fetching on its own would ask the source
                    // beside the lease's holder.
                    return Err(Error::new(ErrorKind::Timeout));
                }
                return fetch(
                    inner,
                    cx.sharing(Sharing::StoreUnavailable),
                    deadline,
                    &mut None,
                )
                .await
                .map(Credential::without_refresh_token);
            }
        };
        let Some((lease, kept)) = taken else {
            // Another holder fetches: wait for what it saves, as long as the deadline
            // allows. A holder that died leaves a lease that runs out.
            let now = Instant::now();
            if now + pause >= deadline {
                waited(waiting_since);
                return Err(Error::new(ErrorKind::Timeout));
            }
            waiting_since.get_or_insert(now);
            tracing::debug!(
                wait_ms = pause.as_millis() as u64,
                "another holder has the refresh lease; waiting"
            );
            // Bounded here too: a store's own wait may not be.
            let _ = tokio::time::timeout(pause, wake).await;
            pause = (pause * 2).min(LEASE_POLL_MAX);
            continue;
        };
        waited(waiting_since);
        let took = match &kept {
            Some(kept) => Took::Kept(kept),
            None if waiting_since.is_some() => Took::Over,
            None => Took::Free,
        };
        let Holding {
            result: held,
            saved,
            also_saved,
            spent,
            late,
            left,
        } = renewing(inner, store.as_ref(), &lease, async {
            holding(
                inner,
                store.as_ref(),
                &lease,
                cx,
                deadline,
                took,
                invalidations,
            )
            .await
        })
        .await;
        // A kept pair whose refresh token this flight did not present (a step-up logs
        // in; a fetch that never began presents nothing) is still the fleet's newest, if
        // the flight brings nothing newer.
        let kept = kept.filter(|kept| kept.credential.refresh_token() != spent.as_ref());
        if let Some(late) = late {
            // The lease goes with the fetch, and is given back when it ends.
            tokio::spawn(finish_late(
                Arc::clone(inner),
                Arc::clone(store),
                lease,
                late,
                born,
                kept,
                left,
            ));
            return held;
        }
        *from_store = saved == Saved::StoreHit;
        // Not in the store: a save that failed, or one the fence refused (the lease ran
        // out during the refresh: the pair is still this process's to save, once the
        // store, looked at under the lease taken again, is as this refresh left it).
        let unsaved = match saved {
            Saved::Failed | Saved::Fenced => held.as_ref().ok().or(also_saved.as_ref()),
            _ => None,
        };
        // The pair taken over is handed back unless what the flight brought carries a
        // newer refresh token, or the store took the kept one meanwhile.
        let handed_back = |kept: &Kept| match (&held, saved) {
            (Ok(stored), Saved::StoreHit) => {
                stored.refresh_token() != kept.credential.refresh_token()
            }
            (held, _) => held.is_err() && also_saved.is_none(),
        };
        let keep = match unsaved.filter(|credential| credential.refresh_token().is_some()) {
            Some(credential) => {
                if let Some(kept) = &kept {
                    late_settled(inner, &kept.credential, false);
                }
                let kept = Kept::new(lease.clone(), credential.clone(), born, left);
                Some(match saved {
                    Saved::Fenced => kept.lease_lost(),
                    _ => kept,
                })
            }
            None => match kept {
                Some(kept) if handed_back(&kept) => {
                    late_lent(inner, &kept.credential, false);
                    Some(match saved {
                        Saved::Fenced => kept.again(left).lease_lost(),
                        _ => kept.again(left),
                    })
                }
                Some(kept) => {
                    late_settled(inner, &kept.credential, false);
                    None
                }
                None => None,
            },
        };
        match keep {
            // A rotated refresh token exists nowhere but here: keep the lease and keep
            // trying to save it, rather than leave the fleet to log in again. The task
            // is spawned once the flight has installed what it brought (see
            // `run_flight`): its first step weighs the pair against the installed one.
            Some(kept) => *to_keep = Some(kept),
            // Within the one share a caller may wait past the deadline (the marker's save
            // or the save after the fetch may have used it): one cut there leaves the
            // lease to run out.
            None => {
                release_by(
                    inner,
                    store.as_ref(),
                    &lease,
                    Some(overtime(inner, deadline)),
                )
                .await
            }
        }
        return held;
    }
}

/// Whether the holder's fetch ended up in the store.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Saved {
    /// Saved, or nothing to save (the fetch failed).
    Done,
    /// Nothing to save: the store's credential was used, not the source's.
    StoreHit,
    /// The lease ran out first: nothing written. Another holder may have taken the
    /// lease, and bring a newer credential; a rotated pair is kept all the same, until
    /// the store says whether one did (see [`Kept::lease_lost`]).
    Fenced,
    /// The store failed or did not answer.
    Failed,
}

/// A rotated pair the store did not take, and the refresh lease it is kept under until
/// it is saved (see [`keep_saving`]).
pub(super) struct Kept {
    /// Names this keeping: its task acts on the pair only while this one is in the
    /// slot (a flight that took the lease over may have put another there since, under
    /// the same lease).
    id: u64,
    lease: Lease,
    credential: Credential,
    /// `State::next_generation` when the refresh that brought `credential` began: a
    /// credential installed since then is newer (see [`superseded`]).
    born: u64,
    /// What the store may hold as this process left it when the pair was kept (see
    /// [`Left`]). While the lease is held, only this process writes; once it was lost,
    /// a store that holds something else may have taken a save of this pair that landed
    /// though its reply was lost, and another holder may have spent it (see
    /// [`keep_saving`]).
    left: Left,
    /// Whether the pair's lease was held without a break since it was kept, or the
    /// store was found as this process left it ([`Kept::store_as_left`]) since the lease
    /// was taken again. Until then the pair is neither saved, nor taken over by a flight,
    /// nor saved as the cache goes: a save of it may have landed, been taken by another
    /// holder and spent.
    checked: bool,
    /// Wakes the task keeping the pair before its next round: a flight handed it its
    /// lease (see `take_lost_kept`).
    nudge: Arc<tokio::sync::Notify>,
}

/// What the store may hold as this process left it, under a lease held without a break
/// since: each a record the refresh loaded or wrote (`None`: nothing stored), two when
/// a write's reply was lost (it may have landed or not). Empty when unknown (a look
/// failed).
#[derive(Clone, Default)]
pub(super) struct Left(Vec<Option<Credential>>);

impl Left {
    /// What a refresh holding the lease loaded (`None`: the look failed), after
    /// `before`: as a pair taken over with the lease left it, when the look failed.
    fn loaded(held: &Option<Option<Credential>>, before: Option<&Left>) -> Left {
        match (held, before) {
            (Some(held), _) => Left(vec![held.clone()]),
            (None, Some(before)) => before.clone(),
            (None, None) => Left::default(),
        }
    }

    /// `record` written over this (`landed`: `Some(true)` known to, `None` unknown).
    fn wrote(&mut self, record: Credential, landed: Option<bool>) {
        match landed {
            Some(true) => self.0 = vec![Some(record)],
            Some(false) => {}
            // Either: what it was (if known), or the record.
            None if self.0.is_empty() => {}
            None => self.0.push(Some(record)),
        }
    }
}

impl Kept {
    fn new(lease: Lease, credential: Credential, born: u64, left: Left) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Kept {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            lease,
            credential,
            born,
            left,
            checked: true,
            nudge: Arc::default(),
        }
    }

    /// The same pair, whose lease ran out before it was kept (its save was refused by
    /// the fence): neither saved nor taken over until the store says no one took it.
    fn lease_lost(mut self) -> Self {
        self.checked = false;
        self
    }

    /// The same pair, under a name of its own: kept by a new task, after a flight that
    /// left the store as `left` (which starts from this pair's own when that flight's
    /// look failed: see [`Left::loaded`]).
    fn again(self, left: Left) -> Self {
        Kept::new(self.lease, self.credential, self.born, left)
    }

    /// Whether the store, as loaded (`stored`) under a lease taken again after this
    /// pair's was lost, is as this process left it: nothing else was written since, so
    /// no save of this pair landed there and was taken by another holder. Never when it
    /// holds a refresh token (a newer pair, or this one saved: the fleet has it), nor a
    /// marker of this very pair: this process's own, or another holder's that took a
    /// save of the pair which landed though its reply was lost (markers have the pair's
    /// headers: the two cannot be told apart, and a refresh token presented twice costs
    /// the fleet more than the login abandoning this pair costs it). An empty store
    /// counts as left: a store that restarted empty lost the lease too, and the pair is
    /// the fleet's only refresh token then.
    fn store_as_left(&self, stored: Option<&Credential>) -> bool {
        let Some(stored) = stored else {
            return true;
        };
        stored.refresh_token().is_none()
            && *stored != self.credential
            && (self.left.0.iter().flatten())
                .any(|left| left.refresh_token().is_none() && left == stored)
    }
}

/// Where the pair [`keep_saving`] keeps waits, shared by the cache and that task: the
/// task locks it for each of its store calls, and a flight of this process that finds
/// the lease held takes the pair and the lease from it ([`take_kept`]).
pub(super) type KeptSlot = Arc<tokio::sync::Mutex<Option<Kept>>>;

/// The save of a credential carrying a refresh token that the store did not take: tried
/// again at growing intervals (up to [`SAVE_RETRY_MAX`]) until it is saved, for as long
/// as the cache lives and no newer refresh token is in use here. The lease is kept
/// meanwhile, renewed every third of its hold (however far apart the tries are), so other
/// processes wait for this save instead of logging in. A rejection or an invalidation of
/// the access token changes nothing here: the refresh token is still the newest, and the
/// next refresh needs it. That refresh, if this process needs one first, takes the pair
/// and the lease over from this task, which then ends (see [`take_kept`]). A lease lost
/// in the outage (the store restarted, say) is taken again once it is free (another
/// holder's, or this process's own taken by a call whose reply was lost, is waited
/// out); until a look at the store then answers, the pair is neither saved nor taken
/// over ([`Kept::checked`]), and it is saved only if the store is as this process left
/// it, or empty ([`Kept::store_as_left`]): a newer pair wins, and a save of this pair
/// that landed though its reply was lost, and was taken and spent by another holder
/// meanwhile, is not put back for a third to present. An empty store is taken as a
/// restart (the pair is the fleet's only refresh token then). A marker is never sent,
/// so never removed after a rejection, and no store lets it expire: only a store that
/// lost its data (a restart without persistence, a flush) hides a take, and this pair
/// is then saved.
async fn keep_saving<P: CredentialSource>(
    inner: std::sync::Weak<Inner<P>>,
    store: Arc<dyn crate::store::DynStore>,
    slot: KeptSlot,
    kept: Kept,
) {
    tracing::warn!("a rotated refresh token could not be saved; keeping it and trying again");
    let id = kept.id;
    let nudge = Arc::clone(&kept.nudge);
    let mut held = slot.lock().await;
    // A newer refresh token is in use here (a late fetch's pair, fenced, after a login
    // that followed it), or a pair kept here already came from a refresh that began
    // later than this one's, or as early and is not itself superseded (on such a tie the
    // two are as new, and the first is already this process's answer; one superseded by
    // what is installed would be given up at its task's next round, and this one is the
    // installed credential's): this one gives way rather than push it out of the slot,
    // and its lease goes back (the other pair's task holds its own). A pair it does push
    // out is given up the same way.
    let cache = inner.upgrade();
    let newer_kept = held.as_ref().is_some_and(|other| {
        other.born > kept.born
            || (other.born == kept.born
                && !cache
                    .as_ref()
                    .is_some_and(|cache| superseded(cache, &other.credential, other.born)))
    });
    let gives_way = newer_kept
        || cache
            .as_ref()
            .is_some_and(|cache| superseded(cache, &kept.credential, kept.born));
    let given_up = match gives_way {
        true => Some(kept),
        false => held.replace(kept),
    };
    let kept_lease = held.as_ref().map(|kept| kept.lease.clone());
    drop(held);
    if let Some(given_up) = given_up {
        if let Some(cache) = &cache {
            late_settled(cache, &given_up.credential, false);
            if kept_lease.as_ref() != Some(&given_up.lease) {
                release(cache, store.as_ref(), &given_up.lease).await;
            }
        }
        if gives_way {
            return;
        }
    }
    drop(cache);
    let mut pause = SAVE_RETRY_FIRST;
    let mut next_try = saturating_add(Instant::now(), pause);
    loop {
        let Some(hold) = inner.upgrade().map(|inner| lease_hold(&inner)) else {
            return last_save(store.as_ref(), &slot, id, LEASE_HOLD).await;
        };
        // A round at least every third of the hold (the lease renewed), and no sooner
        // than the first retry's wait: a round that could not save (another holder's
        // lease waited out, a look that failed) waits too; unless a flight handed this
        // task its lease to look for it (see `take_lost_kept`).
        let now = Instant::now();
        let wake = next_try.max(saturating_add(now, SAVE_RETRY_FIRST));
        let _ = tokio::time::timeout_at(wake.min(saturating_add(now, hold / 3)), nudge.notified())
            .await;
        let Some(inner) = inner.upgrade() else {
            return last_save(store.as_ref(), &slot, id, hold).await;
        };
        // Held for this round's store calls: a flight waits for them to end before it
        // takes the lease over, so no save of this pair lands after the flight's.
        let mut mine = slot.lock().await;
        let Some(kept) = mine.as_mut().filter(|kept| kept.id == id) else {
            // A flight of this process took the lease over, and the pair's refresh token
            // with it.
            return;
        };
        if superseded(&inner, &kept.credential, kept.born) {
            // A newer refresh token is in use here: this one is spent.
            late_settled(&inner, &kept.credential, false);
            let lease = kept.lease.clone();
            *mine = None;
            drop(mine);
            release(&inner, store.as_ref(), &lease).await;
            return;
        }
        let until = saturating_add(Instant::now(), inner.config.fetch_timeout);
        match store_call(&inner, until, "renew", store.renew(&kept.lease, hold)).await {
            None | Some(true) => {}
            Some(false) => {
                // Lost in the outage: another holder may have taken the pair from the
                // store since (a save whose reply was lost may have landed), so it is
                // neither saved nor presented until the store, looked at under the lease
                // taken again, says no one did.
                kept.checked = false;
                match store_call(&inner, until, "lease", store.lease(hold)).await {
                    // Held by another (this process's own lease too, taken again by a
                    // call whose reply was lost): waited for, as any holder is.
                    None | Some(None) => continue,
                    Some(Some(again)) => kept.lease = again,
                }
            }
        }
        if !kept.checked {
            // Looked at again each round until a look answers: a round whose look failed
            // renews the lease taken again without a break, which proves nothing of
            // the outage before it.
            match store_call(&inner, until, "load", store.load()).await {
                None => continue,
                Some(stored) if !kept.store_as_left(stored.as_ref()) => {
                    // A newer refresh token, or a marker some holder wrote when it
                    // took one out of the store: perhaps this pair's, from a save
                    // that landed though its reply was lost.
                    tracing::info!(
                        "the store changed while the refresh lease was lost; the unsaved refresh token is abandoned"
                    );
                    late_settled(&inner, &kept.credential, false);
                    let lease = kept.lease.clone();
                    *mine = None;
                    drop(mine);
                    release(&inner, store.as_ref(), &lease).await;
                    return;
                }
                Some(_) => kept.checked = true,
            }
        }
        if Instant::now() < next_try {
            continue;
        }
        metrics::event(&inner.config.name, metrics::SAVE_RETRIES);
        pause = (pause * 2).min(SAVE_RETRY_MAX);
        next_try = saturating_add(Instant::now(), pause);
        // Dropped here since (rejected, or invalidated before it was served): only its
        // refresh token is the fleet's, its access token left marked expired, as a
        // rejected pair is left (see `holding`).
        let spent = |kept: &Kept| {
            kept.credential
                .clone()
                .expires_at(std::time::SystemTime::UNIX_EPOCH)
        };
        let was_dropped = inner.lock_state().dropped(&kept.credential);
        let saving = match was_dropped {
            true => spent(kept),
            false => kept.credential.clone(),
        };
        // A failure, or a lease that ran out between the renewal and the save (taken
        // again at the next renewal), is tried again.
        if let Some(true) =
            store_call(&inner, until, "save", store.save(&kept.lease, &saving)).await
        {
            if !was_dropped && inner.lock_state().dropped(&kept.credential) {
                // Dropped while it was saved: saved again marked expired, under the lease
                // still held, before another process takes the access token.
                let again = spent(kept);
                store_call(&inner, until, "save", store.save(&kept.lease, &again)).await;
            }
            tracing::info!("the rotated refresh token is saved");
            late_settled(&inner, &kept.credential, true);
            let lease = kept.lease.clone();
            *mine = None;
            drop(mine);
            release(&inner, store.as_ref(), &lease).await;
            return;
        }
    }
}

/// The cache is gone (its process shutting down, say) while a rotated pair is still
/// unsaved: one last try to save it, then the lease goes back, within a second; unless
/// a flight took the pair over before the cache went (it saved or kept its own). A lease
/// lost in an outage (known, or found by the save's fence) is taken again if free, and
/// the pair saved only over the store as its refresh left it (see [`keep_saving`]).
async fn last_save(
    store: &dyn crate::store::DynStore,
    slot: &KeptSlot,
    id: u64,
    hold: std::time::Duration,
) {
    // The lease to give back, once the try is over or out of time.
    let mut lease = None;
    let saved = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        let Some(kept) = slot.lock().await.take_if(|kept| kept.id == id) else {
            return true;
        };
        lease = Some(kept.lease.clone());
        // Its access token goes marked expired: the cache that could tell whether it
        // was dropped (invalidated, rejected) is gone, and a dropped one must not be
        // handed to another process; the refresh token is what the fleet needs.
        let saving = kept
            .credential
            .clone()
            .expires_at(std::time::SystemTime::UNIX_EPOCH);
        let saved = match kept.checked {
            true => store.save(&kept.lease, &saving).await.ok(),
            false => Some(false),
        };
        match saved {
            Some(false) => {
                // Held still (taken again by its task, whose look had not answered), or
                // taken again now if free.
                let held = match store.renew(&kept.lease, hold).await {
                    Ok(true) => Some(kept.lease.clone()),
                    _ => store.lease(hold).await.ok().flatten(),
                };
                let Some(held) = held else {
                    return false;
                };
                lease = Some(held.clone());
                matches!(store.load().await, Ok(stored) if kept.store_as_left(stored.as_ref()))
                    && matches!(store.save(&held, &saving).await, Ok(true))
            }
            saved => saved == Some(true),
        }
    })
    .await;
    if let Some(lease) = lease {
        let _ = tokio::time::timeout(std::time::Duration::from_millis(500), store.release(&lease))
            .await;
    }
    if saved != Ok(true) {
        tracing::warn!("the cache was dropped before its rotated refresh token could be saved");
    }
}

/// The refresh lease this process's [`keep_saving`] holds, taken over by a flight that
/// found the lease held (by this process, then), with the pair kept under it: the
/// flight refreshes with its refresh token at once rather than wait for a save the
/// store may refuse for a long while. Only while the store still knows the lease as
/// this one (renewed here first); else the pair is left to its task. The pair is `None`
/// when a newer refresh token is in use here (it is spent: the flight refreshes with
/// what the store holds). A step-up presents none of it, and hands it back if it fails.
async fn take_kept<P: CredentialSource>(
    inner: &Arc<Inner<P>>,
    store: &dyn crate::store::DynStore,
    deadline: Instant,
    step_up: bool,
) -> Option<(Lease, Option<Kept>)> {
    let mut slot = tokio::time::timeout_at(deadline, inner.kept.lock())
        .await
        .ok()?;
    let kept = slot.take()?;
    if !kept.checked {
        // Its lease was lost and taken again, and the store not looked at since: left to
        // its task, which looks before anything else.
        *slot = Some(kept);
        return None;
    }
    let renewed = store.renew(&kept.lease, lease_hold(inner));
    if store_call(inner, deadline, "renew", renewed).await != Some(true) {
        *slot = Some(kept);
        return None;
    }
    drop(slot);
    tracing::debug!("taking the refresh lease over from the task saving a kept pair");
    Some((kept.lease.clone(), adopt(inner, kept, step_up)))
}

/// What [`take_lost_kept`] did with this process's kept pair.
enum LostKept {
    /// None is kept.
    None,
    /// Taken over, under the flight's lease.
    Taken(Kept),
    /// Its task was given the flight's lease: the flight waits for it.
    Handed,
}

/// The pair this process's [`keep_saving`] keeps, taken over by a flight that found the
/// lease free: the pair's own lease ran out (in an outage, say) before its task took it
/// again. Taken only once a look at the store under the flight's lease says no one took
/// the pair meanwhile ([`Kept::store_as_left`]); given up when the store says someone
/// may have (a newer pair, or a marker a holder left as it took one out). When the look
/// does not answer, the lease goes to the pair's task, which looks again each round, and
/// the flight waits for it as for any holder: refreshing on its own, it would find no
/// refresh token in the store (this process's own marker), log in, and the pair would be
/// given up as spent.
async fn take_lost_kept<P: CredentialSource>(
    inner: &Arc<Inner<P>>,
    store: &dyn crate::store::DynStore,
    deadline: Instant,
    lease: &Lease,
) -> LostKept {
    let Ok(mut slot) = tokio::time::timeout_at(deadline, inner.kept.lock()).await else {
        // The slot is held past the flight's deadline: a pair's task is mid-round, so a
        // pair is kept, and the flight cannot look at it. Refreshing as if none were
        // kept would find this process's own marker and log in, and the pair would be
        // given up as spent: the lease goes back to the store (the pair's task takes it
        // again at a round of its own), and the flight ends with `Timeout`.
        release(inner, store, lease).await;
        return LostKept::Handed;
    };
    let Some(kept) = slot.as_mut() else {
        return LostKept::None;
    };
    // Its lease is gone: the flight holds the lease.
    kept.checked = false;
    let Some(stored) = store_call(inner, deadline, "load", store.load()).await else {
        kept.lease = lease.clone();
        kept.nudge.notify_one();
        return LostKept::Handed;
    };
    let Some(mut kept) = slot.take() else {
        return LostKept::None;
    };
    drop(slot);
    if !kept.store_as_left(stored.as_ref()) {
        tracing::info!(
            "the store changed while the refresh lease was lost; the unsaved refresh token is abandoned"
        );
        late_settled(inner, &kept.credential, false);
        return LostKept::None;
    }
    tracing::debug!("taking over a kept pair whose refresh lease ran out");
    kept.lease = lease.clone();
    kept.checked = true;
    match adopt(inner, kept, false) {
        Some(kept) => LostKept::Taken(kept),
        None => LostKept::None,
    }
}

/// A kept pair taken over by a flight: `None` when a newer refresh token is in use
/// here (it is spent).
fn adopt<P: CredentialSource>(inner: &Inner<P>, kept: Kept, step_up: bool) -> Option<Kept> {
    if superseded(inner, &kept.credential, kept.born) {
        late_settled(inner, &kept.credential, false);
        return None;
    }
    match step_up {
        // Presented by this flight: no longer the next flight's answer.
        false => late_settled(inner, &kept.credential, false),
        // Lent to a step-up, which presents none of it and may keep a pair of its own
        // instead: not the next flight's answer meanwhile, and still made suspect by an
        // invalidation (then saved so if it is handed back).
        true => late_lent(inner, &kept.credential, true),
    }
    Some(kept)
}

/// Whether the cache now holds a credential carrying another refresh token than
/// `credential`'s, installed since the refresh that brought `credential` began (`born`,
/// a generation): then `credential`'s was spent to get it, or handed in newer. Not one
/// installed before: that pair is older (still current while the answers of one or more
/// refreshes, refused on arrival or late, never became current).
fn superseded<P>(inner: &Inner<P>, credential: &Credential, born: u64) -> bool {
    inner.current.load().as_ref().is_some_and(|entry| {
        let current = entry.credential.refresh_token();
        entry.generation >= born && current.is_some() && current != credential.refresh_token()
    })
}

/// The first wait before saving a rotated refresh token again; each next one doubles.
const SAVE_RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(250);
/// The longest wait between two tries to save a rotated refresh token.
const SAVE_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// The refresh under `lease`: a last look at the store, then the source, then the save.
async fn holding<P: CredentialSource>(
    inner: &Arc<Inner<P>>,
    store: &dyn crate::store::DynStore,
    lease: &Lease,
    cx: FetchContext,
    deadline: Instant,
    took: Took<'_>,
    invalidations: u64,
) -> Holding {
    // The one share a caller may wait past the deadline, for the marker's save and the
    // save after the fetch together.
    let share = inner.config.fetch_timeout / STORE_SHARE;
    let overtime = overtime(inner, deadline);
    // Someone may have saved between the load and the lease.
    let held = store_call(inner, deadline, "load", store.load()).await;
    if held.is_none() && Instant::now() >= deadline {
        // Out of time (a flight that waited for another holder takes the lease late),
        // not a store that does not answer: logging in under the lease would abandon
        // the store's refresh token. Nothing was written; the lease goes back (a kept
        // pair taken over goes back to its task, as the store was left).
        let left = Left::loaded(
            &held,
            match took {
                Took::Kept(kept) => Some(&kept.left),
                _ => None,
            },
        );
        return Holding {
            left,
            ..Holding::ended(Err(Error::new(ErrorKind::Timeout)), Saved::Done)
        };
    }
    // A step-up wants a wider grant, which no stored credential is known to be.
    let step_up = cx.reason() == FetchReason::StepUp;
    if let Some(Some(stored)) = held.as_ref().filter(|_| !step_up) {
        if Some(stored) != cx.previous() && inner.is_reusable_stored(stored) {
            tracing::debug!("using the credential found in the store");
            let mut hit = Holding::ended(Ok(stored.clone()), Saved::StoreHit);
            hit.left = Left::loaded(&held, None);
            return hit;
        }
    }
    if let Took::Over = took {
        // Waited for another holder, which gave the lease up (or died) without a save.
        tracing::debug!("took the refresh lease over from a holder that saved nothing");
        metrics::event(&inner.config.name, metrics::LEASE_TAKEOVERS);
    }
    // The refresh token goes with the lease, and out of the store before it is
    // presented: a holder that dies mid-exchange leaves none to be presented twice
    // (the next holder logs in instead).
    // A step-up logs in and presents no refresh token: the stored one stays in the store
    // unless the step-up succeeds, whose login starts a new session (its credential,
    // with the refresh token that login brought or none, replaces the stored pair).
    // The refresh token to present, and what the store keeps meanwhile in place of the
    // pair it came with: that pair without it, marked expired: never sent again (its
    // access token may have been rejected or invalidated), so never rejected and
    // removed, and kept by every store until it is replaced. That marker is the
    // fleet's record that the refresh token was taken (see `Kept::left`). A process
    // that starts meanwhile waits for this refresh instead of taking the old access
    // token from the store.
    let pair = match (&held, took) {
        _ if step_up => None,
        // The store's own, unless a kept pair taken over carries another.
        (Some(Some(stored)), took)
            if stored.refresh_token().is_some()
                && match took {
                    Took::Kept(kept) => stored.refresh_token() == kept.credential.refresh_token(),
                    _ => true,
                } =>
        {
            Some(stored)
        }
        // A pair this process kept, taken over with the lease (`take_kept`, which
        // renewed it: held without a break, so no one else took the pair from the
        // store): newer than any other the store holds. The store may hold it too (a
        // save that landed though its reply was lost), or the store's load may have
        // failed: taken out all the same.
        (_, Took::Kept(kept)) => Some(&kept.credential),
        _ => None,
    };
    let taking = pair.and_then(|pair| {
        let marker = pair
            .clone()
            .without_refresh_token()
            .expires_at(std::time::SystemTime::UNIX_EPOCH);
        pair.refresh_token().cloned().map(|token| (marker, token))
    });
    // What the store holds as this refresh leaves it: what it loaded, and the marker
    // it writes in place of the pair it takes the refresh token from.
    let mut left = Left::loaded(
        &held,
        match took {
            Took::Kept(kept) => Some(&kept.left),
            _ => None,
        },
    );
    let took_out = taking.is_some();
    let sharing = match (taking, &held) {
        (Some((marker, token)), _) => {
            // A share of its own, past the flight's deadline if need be (the fetch then
            // goes on late, under the lease): cut at the deadline, a marker whose save
            // the store would have answered passes for a store that does not answer,
            // and the flight logs in rather than present the token. It cannot end at
            // the deadline either: the marker may have landed in place of the pair.
            let until = saturating_add(Instant::now(), share).min(overtime);
            let saved = store_call(inner, until, "save", store.save(lease, &marker)).await;
            // A save that failed may have landed all the same.
            left.wrote(marker, saved);
            match saved {
                Some(true) => Sharing::Shared(Some(token)),
                Some(false) => {
                    // The lease ran out already: someone else may hold it now. What the
                    // store held as this refresh left it goes with a pair handed back.
                    let timeout = Err(Error::new(ErrorKind::Timeout));
                    return Holding {
                        left,
                        ..Holding::ended(timeout, Saved::Fenced)
                    };
                }
                None => Sharing::StoreUnavailable,
            }
        }
        (None, None) => Sharing::StoreUnavailable,
        (None, Some(_)) => Sharing::Shared(None),
    };
    let spent = match &sharing {
        Sharing::Shared(presented) => presented.clone(),
        _ => None,
    };
    let mut refused = None;
    let mut late = None;
    let mut asked = false;
    let fetched = fetch_holding(
        inner,
        cx.sharing(sharing),
        deadline,
        &mut refused,
        &mut late,
        invalidations,
        &mut asked,
    )
    .await;
    // Never asked (the source busy past the deadline): nothing was presented.
    let spent = spent.filter(|_| asked);
    // A refresh token taken out of the store (its marker may have landed) and never
    // presented (the source never asked, or told the store did not answer the marker's
    // save, so it logged in) goes back with its pair if the fetch brings nothing newer:
    // saved under the lease as a fetched pair is, kept if that fails. Its access token
    // goes back expired, as the marker's did: it may have been rejected. A kept pair
    // taken over is handed back to its task instead (see `obtain`).
    let unpresented = (took_out && spent.is_none() && !matches!(took, Took::Kept(_)))
        .then(|| pair.map(|pair| pair.clone().expires_at(std::time::SystemTime::UNIX_EPOCH)))
        .flatten();
    if late.is_some() {
        // Still running, under the lease: see `finish_late`.
        return Holding {
            result: fetched,
            saved: Saved::Done,
            also_saved: refused,
            spent,
            late,
            left,
        };
    }
    let mut saved = Saved::Done;
    // A credential refused on arrival goes to the store all the same when it carries a
    // refresh token: the presented one is spent, and the new one exists nowhere else
    // (its access token, expired, is never handed out: see `is_reusable_stored`).
    let also_saved = refused.or(unpresented);
    if let Some(credential) = fetched.as_ref().ok().or(also_saved.as_ref()) {
        // A fresh credential is worth saving even if the fetch used up the deadline:
        // the save gets a share of its own, within the one share past the deadline that
        // the marker's save may have used already. A save cut there fails, and the
        // pair is kept (see `obtain`).
        let until = saturating_add(Instant::now(), share).min(overtime);
        saved = match store_call(inner, until, "save", store.save(lease, credential)).await {
            Some(true) => Saved::Done,
            Some(false) => {
                tracing::debug!("the refresh lease ran out before the save; not saved");
                Saved::Fenced
            }
            None => Saved::Failed,
        };
    }
    Holding {
        result: fetched,
        saved,
        also_saved,
        spent,
        late: None,
        left,
    }
}

/// How a holder came by the refresh lease.
#[derive(Clone, Copy)]
enum Took<'a> {
    /// Free for the taking.
    Free,
    /// Waited for another holder, which gave it up (or died) without a save.
    Over,
    /// From this process's [`keep_saving`], with the pair kept under it (see
    /// [`take_kept`]).
    Kept(&'a Kept),
}

/// What the holder's refresh came to.
struct Holding {
    result: Result<Credential, Error>,
    saved: Saved,
    /// Not the flight's answer, but a pair that exists nowhere else, saved under the
    /// lease all the same (kept if the save fails): a credential refused on arrival that
    /// carries a refresh token (see [`fetch`]), or the store's pair whose refresh token
    /// this holder took out and never presented (the source was never asked).
    also_saved: Option<Credential>,
    /// The refresh token the fetch presented, spent by now.
    spent: Option<crate::Secret>,
    /// The source's fetch, still running when the deadline came (see `finish_late`).
    late: Option<LateFetch>,
    /// What the store held once this refresh had looked and written under the lease
    /// (see [`Kept::left`]).
    left: Left,
}

impl Holding {
    /// Ended before the source was asked.
    fn ended(result: Result<Credential, Error>, saved: Saved) -> Self {
        Holding {
            result,
            saved,
            also_saved: None,
            spent: None,
            late: None,
            left: Left::default(),
        }
    }
}

/// A lease holder's source fetch, boxed so that it can outlive its flight.
type Fetching = Pin<Box<dyn Future<Output = Result<Credential, crate::error::BoxError>> + Send>>;

/// A lease holder's fetch that outlived the flight's deadline.
struct LateFetch {
    fetching: Fetching,
    /// `State::invalidations` when its flight began to run (see `FlightGuard`).
    began: u64,
}

/// [`fetch`] for the lease holder: the source's fetch is not dropped at the deadline
/// but handed back in `late`, still running. Its exchange may still be with the server
/// (a token source runs it in its own task, so that a rotated refresh token is not
/// lost): the lease must not be given back before it ends, or another process would
/// take the lease, find no refresh token in the store (this one took it out) and log
/// in while it runs: two token requests at once in one fleet.
async fn fetch_holding<P: CredentialSource>(
    inner: &Arc<Inner<P>>,
    cx: FetchContext,
    deadline: Instant,
    refused: &mut Option<Credential>,
    late: &mut Option<LateFetch>,
    began: u64,
    asked: &mut bool,
) -> Result<Credential, Error> {
    let started = Instant::now();
    let gate = Arc::clone(&inner.source_gate);
    let Ok(gate) = tokio::time::timeout_at(deadline, gate.lock_owned()).await else {
        return Err(Error::new(ErrorKind::Timeout));
    };
    *asked = true;
    let mut fetching: Fetching = {
        let inner = Arc::clone(inner);
        Box::pin(async move {
            let cx = asking(&inner, cx);
            let answer = ask_source(&inner.source, cx).await;
            drop(gate);
            answer
        })
    };
    let result = match tokio::time::timeout_at(deadline, &mut fetching).await {
        Err(_elapsed) => {
            *late = Some(LateFetch { fetching, began });
            Err(Error::new(ErrorKind::Timeout))
        }
        Ok(answer) => check_fetched(inner, answer, refused),
    };
    measured(inner, started, result)
}

/// The rest of a lease holder's fetch that outlived its flight's deadline (whose
/// waiters were told `Timeout`), in a task of its own: the lease is kept, renewed, for
/// up to one more fetch timeout while the fetch ends; what it brings is saved under the
/// lease (fenced) and only then is the lease given back. Meanwhile every other refresh
/// of the fleet, this process's included, waits for that save, as for any holder's. A
/// rotated refresh token the store does not take is kept trying, as `keep_saving` does.
/// A fetch still running after that extra time is dropped and the lease given back: a
/// holder stalled past its bound, the one case where the fleet may fetch twice.
async fn finish_late<P: CredentialSource>(
    inner: Arc<Inner<P>>,
    store: Arc<dyn crate::store::DynStore>,
    lease: Lease,
    late: LateFetch,
    born: u64,
    kept: Option<Kept>,
    left: Left,
) {
    tracing::debug!("the fetch outlived its deadline; the refresh lease is kept until it ends");
    let bound = inner.config.fetch_timeout;
    let LateFetch { fetching, began } = late;
    let answer = renewing(
        &inner,
        store.as_ref(),
        &lease,
        tokio::time::timeout(bound, fetching),
    )
    .await;
    let mut refused = None;
    let credential = match answer {
        Ok(answer) => check_fetched(&inner, answer, &mut refused).ok().or(refused),
        Err(_elapsed) => {
            tracing::warn!("the fetch outlived its deadline twice; giving the refresh lease back");
            None
        }
    };
    if let (Some(_), Some(kept)) = (&credential, &kept) {
        // Something newer came (a step-up's login): the pair it took over is dropped.
        late_settled(&inner, &kept.credential, false);
    }
    let credential = credential.and_then(|credential| {
        let mut state = inner.lock_state();
        if state.invalidations == began {
            // The cache's newest: an invalidation from now on makes it suspect; unsaved,
            // it is the next flight's answer (see `Late`).
            state.late = Some(super::Late {
                credential: credential.clone(),
                unsaved: false,
            });
            return Some(credential);
        }
        // An invalidation since it began: as a running flight's result, never taken
        // back from the store by this cache, and the next fetch is told it. Nor by the
        // fleet: a running flight's is removed from the store by the fetch chained after
        // it, told it as it begins, which this one began too early to be. Only its
        // rotated refresh token is saved (it exists nowhere else), with its access token
        // marked expired, as a rejected credential's is left (see `holding`).
        let entry = inner.entry(&mut state, credential.clone(), Instant::now());
        inner.forget_suspect(&mut state, &entry, false);
        credential
            .refresh_token()
            .is_some()
            .then(|| credential.expires_at(std::time::SystemTime::UNIX_EPOCH))
    });
    if let Some(credential) = credential {
        let until = saturating_add(Instant::now(), inner.config.fetch_timeout / STORE_SHARE);
        let saved = store_call(&inner, until, "save", store.save(&lease, &credential)).await;
        if saved != Some(true) && credential.refresh_token().is_some() {
            // Kept under the lease (or, refused by the fence, under the lease taken
            // again, as in `obtain`): this process's next answer (see `Late`).
            if let Some(late) = inner
                .lock_state()
                .late
                .as_mut()
                .filter(|late| late.credential == credential)
            {
                late.unsaved = true;
            }
            let kept = Kept::new(lease, credential, born, left);
            let kept = match saved {
                Some(false) => kept.lease_lost(),
                _ => kept,
            };
            return keep_saving_late(inner, store, kept).await;
        }
        if saved.is_some() {
            late_settled(&inner, &credential, true);
        }
    } else if let Some(kept) = kept {
        // Nothing newer came: the pair taken over is still the one to save.
        late_lent(&inner, &kept.credential, false);
        return keep_saving_late(inner, store, kept.again(left)).await;
    }
    release(&inner, store.as_ref(), &lease).await;
}

/// [`keep_saving`] from [`finish_late`], which holds the cache strongly: only a weak
/// reference from here on, so that a cache dropped meanwhile ends it.
async fn keep_saving_late<P: CredentialSource>(
    inner: Arc<Inner<P>>,
    store: Arc<dyn crate::store::DynStore>,
    kept: Kept,
) {
    let (weak, slot) = (Arc::downgrade(&inner), Arc::clone(&inner.kept));
    drop(inner);
    keep_saving(weak, store, slot, kept).await;
}

/// A late fetch's `credential` (see `Late`) was saved (`saved`): the store holds it, and
/// it is no longer the next flight's answer over the store's; or it was given up (a
/// newer pair won): forgotten.
fn late_settled<P: CredentialSource>(inner: &Inner<P>, credential: &Credential, saved: bool) {
    let mut state = inner.lock_state();
    if state
        .late
        .as_ref()
        .is_some_and(|late| late.credential == *credential)
    {
        match saved {
            true => {
                if let Some(late) = state.late.as_mut() {
                    late.unsaved = false;
                }
            }
            false => state.late = None,
        }
    }
}

/// A late fetch's `credential` (see `Late`), kept under the lease, `lent` to a step-up
/// that took the lease over (not the next flight's answer while the step-up has it), or
/// handed back by it to be kept again (the next flight's answer again).
fn late_lent<P: CredentialSource>(inner: &Inner<P>, credential: &Credential, lent: bool) {
    if let Some(late) = inner
        .lock_state()
        .late
        .as_mut()
        .filter(|late| late.credential == *credential)
    {
        late.unsaved = !lent;
    }
}

/// The late fetch's result still unsaved (see `Late`), taken as this flight's answer
/// when it is still usable and was not dropped.
fn unsaved_late<P: CredentialSource>(inner: &Inner<P>) -> Option<Credential> {
    let mut state = inner.lock_state();
    let late = state.late.as_ref().filter(|late| late.unsaved)?;
    let credential = late.credential.clone();
    if state.dropped(&credential) || !inner.is_usable_stored(&credential) {
        return None;
    }
    state.late = None;
    Some(credential)
}

/// `cx` as the source is asked: stamped with the cache's wall clock now (the flight may
/// have waited long for a lease or the source, and a source stamps its credential's
/// issue and expiry with [`FetchContext::now`]: one stamped as the flight began would
/// have lived that wait already); and told (if it is an invalidation's fetch) what a
/// fetch the invalidation made suspect brought, if that fetch ended after this one
/// began (a late fetch, say, which ends while this one waits for its lease or the
/// source): the one a source holding its last credential would hand back. See
/// `FlightGuard::begin`.
fn asking<P: CredentialSource>(inner: &Inner<P>, cx: FetchContext) -> FetchContext {
    let mut cx = cx.at(inner.config.clock.now());
    if cx.reason() == FetchReason::Invalidated {
        if let Some(dropped) = inner.lock_state().tainted_result.take() {
            cx.set_previous(dropped);
        }
    }
    cx
}

/// Runs `work` while keeping `lease`: renewed every third of its hold, so a holder that
/// dies is taken over within one hold, and one that is slow keeps it. A renewal that
/// finds the lease gone (the holder was paused past it, say) stops renewing; the save
/// after the work is then refused by the fence.
async fn renewing<P, T>(
    inner: &Inner<P>,
    store: &dyn crate::store::DynStore,
    lease: &Lease,
    work: impl Future<Output = T>,
) -> T {
    let hold = lease_hold(inner);
    let renewals = async {
        loop {
            tokio::time::sleep(hold / 3).await;
            let until = saturating_add(Instant::now(), hold / 3);
            if let Some(false) = store_call(inner, until, "renew", store.renew(lease, hold)).await {
                tracing::warn!(
                    "the refresh lease ran out while held; another process may fetch too"
                );
                metrics::event(&inner.config.name, metrics::LEASES_LOST);
                return std::future::pending::<std::convert::Infallible>().await;
            }
        }
    };
    let (work, renewals) = (std::pin::pin!(work), std::pin::pin!(renewals));
    match futures_util::future::select(work, renewals).await {
        futures_util::future::Either::Left((out, _)) => out,
        futures_util::future::Either::Right((never, _)) => match never {},
    }
}

/// Gives a lease back, with a share of its own: a lease left behind makes every other
/// process wait until it runs out.
async fn release<P>(inner: &Inner<P>, store: &dyn crate::store::DynStore, lease: &Lease) {
    release_by(inner, store, lease, None).await;
}

/// [`release`], ending by `until` at the latest, when given.
async fn release_by<P>(
    inner: &Inner<P>,
    store: &dyn crate::store::DynStore,
    lease: &Lease,
    until: Option<Instant>,
) {
    let share = saturating_add(Instant::now(), inner.config.fetch_timeout / STORE_SHARE);
    let until = until.map_or(share, |until| until.min(share));
    store_call(inner, until, "release", store.release(lease)).await;
}

/// The latest the store calls that end a refresh under the lease may run, past its
/// `deadline`: one share, which is what a caller may wait past the fetch timeout.
fn overtime<P>(inner: &Inner<P>, deadline: Instant) -> Instant {
    saturating_add(deadline, inner.config.fetch_timeout / STORE_SHARE)
}

/// How long a refresh lease lasts without a renewal: [`LEASE_HOLD`], or less when even
/// a whole refresh (the fetch timeout, the shares of the save and the release after it,
/// and a margin) is shorter.
fn lease_hold<P>(inner: &Inner<P>) -> std::time::Duration {
    let share = inner.config.fetch_timeout / STORE_SHARE;
    (inner.config.fetch_timeout + share * 2 + LEASE_MARGIN).min(LEASE_HOLD)
}

/// The longest a lease lasts without a renewal, renewed every third of it: what a dead
/// holder costs the fleet at most.
const LEASE_HOLD: std::time::Duration = std::time::Duration::from_secs(3);

/// The first wait for another process's refresh; each next one doubles, up to
/// [`LEASE_POLL_MAX`].
const LEASE_POLL_FIRST: std::time::Duration = std::time::Duration::from_millis(20);
/// The longest wait between two looks at the store while another process refreshes.
const LEASE_POLL_MAX: std::time::Duration = std::time::Duration::from_millis(250);
/// What a lease lasts beyond the longest its holder can take.
const LEASE_MARGIN: std::time::Duration = std::time::Duration::from_secs(1);

/// Asks the source, under the deadline, and checks what it answered. `refused`: a
/// credential the check refused (expired on arrival) that carries a refresh token, which
/// must not be lost with it: the lease holder keeps it in the store.
async fn fetch<P: CredentialSource>(
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
fn measured<P>(
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
async fn ask_source<P: CredentialSource>(
    source: &P,
    cx: FetchContext,
) -> Result<Credential, crate::error::BoxError> {
    AssertUnwindSafe(source.fetch(cx))
        .catch_unwind()
        .await
        .unwrap_or_else(|_panic| Err(Error::new(ErrorKind::SourcePanicked).into()))
}

/// What the source answered, checked: see [`fetch`].
fn check_fetched<P: CredentialSource>(
    inner: &Inner<P>,
    answer: Result<Credential, crate::error::BoxError>,
    refused: &mut Option<Credential>,
) -> Result<Credential, Error> {
    let credential = answer.map_err(fetch_error)?;
    let wall = inner.config.clock.now();
    if credential.expiry().is_some_and(|at| at <= wall) {
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
    metrics::store_error(&inner.config.name, what);
    if !inner.store_down.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            call = what,
            error = %failure,
            "credential store failed; fetching without it until it answers again"
        );
    }
    None
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
        for _ in 0..3 {
            hook::set("store_hit", {
                let (cache, loaded) = (cache.clone(), loaded.clone());
                move || {
                    // Another task hands the value just loaded over, and drops it again.
                    let value = loaded.lock().unwrap().last().unwrap().clone();
                    assert!(cache.handle().replace(value.clone()).unwrap());
                    assert!(cache.handle().invalidate_if(&value));
                }
            });
        }
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
        for _ in 0..3 {
            hook::set("store_hit", {
                let (cache, loaded) = (cache.clone(), loaded.clone());
                move || {
                    std::thread::sleep(Duration::from_millis(1200));
                    let value = loaded.lock().unwrap().last().unwrap().clone();
                    assert!(cache.handle().replace(value.clone()).unwrap());
                    assert!(cache.handle().invalidate_if(&value));
                }
            });
        }
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
