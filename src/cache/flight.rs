//! The single flight: starting one refresh for every caller who needs it, waiting for it,
//! and ending it (installing the credential, or backing off), however the task ends.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll, ready},
};

use futures_util::future::{FutureExt, Shared};
use tokio::{task::JoinHandle, time::Instant};
use tracing::Instrument;

use super::{
    CredentialCache, Inner, MAX_RETRY_AFTER, STORE_SHARE, State, Want, YOUNG_CREDENTIAL_AGE,
    config::saturating_add,
    entry::{Entry, Phase, rearm_background},
};
use crate::{
    credential::Credential,
    error::{Error, ErrorKind},
    source::{CredentialSource, FetchContext, FetchReason},
};

impl<P: CredentialSource> CredentialCache<P> {
    /// The refresh path. `want`: `None` for "a credential I may send now".
    pub(super) fn acquire(&self, want: Option<Want>) -> Acquire {
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
    pub(super) fn ready(result: Result<Arc<Entry>, Error>) -> Self {
        Acquire {
            state: AcquireState::Ready(Some(result)),
            fallback: None,
        }
    }

    pub(super) fn waiting(flight: Shared<FlightFuture>, fallback: Option<Arc<Entry>>) -> Self {
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
