//! The refresh through a shared store (the module docs of [`crate::store`]): a look at
//! the store, the refresh lease, the holder's refresh under it (the refresh token taken
//! out, the source asked, what it brought saved, fenced), and a holder's fetch that
//! outlives its flight's deadline.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::time::Instant;

use super::flight::{ask_source, asking, check_fetched, fetch, measured};
use super::kept::{
    Kept, Left, LostKept, hand_in_taken, keep_saving_late, late_lent, late_settled,
    pending_hand_in, take_kept, take_lost_kept, unsaved_late,
};
use super::{Inner, STORE_SHARE, config::saturating_add};
use crate::{
    credential::Credential,
    error::{Error, ErrorKind},
    metrics,
    source::{CredentialSource, FetchContext, FetchReason, Sharing},
    store::Lease,
};

/// Gets a credential from the store, or else from the source: the refresh path of
/// [`crate::store`]'s module docs. One deadline, the flight's, bounds the loads,
/// the lease, the wait for another holder and the fetch; each store call gets at most a
/// [`STORE_SHARE`] of it, and a store that fails or does not answer in time is skipped
/// (logged once per outage) for this process's own fetch. `from_store`: set when the
/// credential is the store's, not the source's.
pub(super) async fn obtain<P: CredentialSource>(
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
    // Nor is it while a pair handed in here is pending: that is the fleet's newest
    // session, whose refresh token this flight presents (see `pending_hand_in`).
    let usable = |stored: &Credential| {
        !step_up
            && Some(stored) != cx.previous()
            && inner.is_reusable_stored(stored)
            && pending_hand_in(inner).is_none()
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
        if !step_up && pending_hand_in(inner).is_none() {
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
                super::flight::hook::run("store_hit");
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
            outage_login,
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
            Saved::Failed | Saved::Fenced => (held.as_ref().ok())
                .filter(|credential| credential.refresh_token().is_some())
                .or(also_saved.as_ref()),
            _ => None,
        };
        // The pair taken over is handed back unless what the flight brought carries a
        // newer refresh token, or the store took the kept one meanwhile (an outage
        // login brings none).
        let handed_back = |kept: &Kept| match (&held, saved) {
            (Ok(stored), Saved::StoreHit) => {
                stored.refresh_token() != kept.credential.refresh_token()
            }
            (held, _) => (held.is_err() || outage_login) && also_saved.is_none(),
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
    // A refresh that ends before it writes or asks anything: the lease goes back (a kept
    // pair taken over goes back to its task, as the store was left).
    let untouched = |err: Error| Holding {
        left: Left::loaded(
            &held,
            match took {
                Took::Kept(kept) => Some(&kept.left),
                _ => None,
            },
        ),
        ..Holding::ended(Err(err), Saved::Done)
    };
    if held.is_none() && Instant::now() >= deadline {
        // Out of time (a flight that waited for another holder takes the lease late),
        // not a store that does not answer: logging in under the lease would abandon
        // the store's refresh token.
        return untouched(Error::new(ErrorKind::Timeout));
    }
    // A step-up wants a wider grant, which no stored credential is known to be.
    let step_up = cx.reason() == FetchReason::StepUp;
    // A pair handed in here and not yet in the store: newer than anything the store
    // holds, and this refresh presents its refresh token. A kept pair taken over is
    // newer still: one from a refresh that began before the hand-in is superseded by it
    // (see `kept::superseded`), and not taken over.
    let handing = match took {
        _ if step_up => None,
        Took::Kept(_) => None,
        Took::Free | Took::Over => pending_hand_in(inner),
    };
    if let Some(Some(stored)) = held.as_ref().filter(|_| !step_up && handing.is_none()) {
        if Some(stored) != cx.previous() && inner.is_reusable_stored(stored) {
            tracing::debug!("using the credential found in the store");
            let mut hit = Holding::ended(Ok(stored.clone()), Saved::StoreHit);
            hit.left = Left::loaded(&held, None);
            return hit;
        }
    }
    // The token endpoint asked the fleet to wait (another holder's `Retry-After`): not
    // asked before then, and nothing taken out of the store.
    if let Some(err) = fleet_hold(inner, store, deadline).await {
        tracing::debug!(
            retry_in_ms = err.retry_in().unwrap_or_default().as_millis() as u64,
            "the token endpoint asked the fleet to wait; not asking the source"
        );
        return untouched(err);
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
        _ if handing.is_some() => handing.as_ref(),
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
            if let Some(handing) = handing.as_ref().filter(|_| saved != Some(false)) {
                // Taken over: this refresh presents it, or puts it back unpresented (a
                // marker the fence refused leaves it pending).
                hand_in_taken(inner, handing);
            }
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
                // A pending hand-in was never in the store: no other process can
                // hold its refresh token, whether or not the marker landed.
                None if handing.is_some() => Sharing::Shared(Some(token)),
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
    let outage = matches!(sharing, Sharing::StoreUnavailable);
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
    if let Err(err) = &fetched {
        let until = saturating_add(Instant::now(), share).min(overtime);
        share_hold(inner, store, err, until).await;
    }
    // Never asked (the source busy past the deadline): nothing was presented.
    let spent = spent.filter(|_| asked);
    // A refresh token taken out of the store (its marker may have landed) and never
    // presented (the source never asked, or told the store did not answer the marker's
    // save, so it logged in) goes back with its pair if the fetch brings nothing newer:
    // saved under the lease as a fetched pair is, kept if that fails. Its access token
    // goes back expired, as the marker's did: it may have been rejected. A kept pair
    // taken over is handed back to its task instead (see `obtain`).
    let unpresented = (took_out && spent.is_none() && !matches!(took, Took::Kept(_)))
        .then(|| pair.map(super::kept::spent))
        .flatten();
    // A refresh token known to be at stake if the source logs in because the store did
    // not answer: one taken out whose marker's save got no answer, or a kept pair.
    let at_stake = unpresented.is_some() || matches!(took, Took::Kept(_));
    if let Some(mut late) = late {
        // Still running, under the lease: see `finish_late`, which puts back a pair
        // whose refresh token was never presented if the fetch brings nothing.
        late.outage = outage && at_stake;
        late.unpresented = unpresented;
        return Holding {
            result: fetched,
            saved: Saved::Done,
            also_saved: refused,
            spent,
            late: Some(late),
            left,
            outage_login: false,
        };
    }
    let mut saved = Saved::Done;
    // A credential refused on arrival goes to the store all the same when it carries a
    // refresh token: the presented one is spent, and the new one exists nowhere else
    // (its access token, expired, is never handed out: see `is_reusable_stored`).
    let also_saved = refused.or(unpresented);
    // A login made because the store did not answer keeps no refresh token and is no
    // session of the fleet's: where a refresh token is known to be at stake (one taken
    // out of the store, whose marker's save got no answer; a kept pair taken over) it is
    // not saved over it. The pair taken out goes back instead; a kept pair is handed
    // back. After loads that all failed nothing is known to be at stake, and the login is
    // saved as any fetch is: the others wait for it rather than each log in, and the
    // credential this holder rejected is replaced (a refresh token the store held then
    // is lost, and the fleet logs in once more).
    let outage_login =
        outage && at_stake && fetched.as_ref().is_ok_and(|c| c.refresh_token().is_none());
    let to_save = match outage_login {
        true => also_saved.as_ref(),
        false => fetched.as_ref().ok().or(also_saved.as_ref()),
    };
    if let Some(credential) = to_save {
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
        outage_login,
    }
}

/// How a holder came by the refresh lease.
#[derive(Clone, Copy)]
enum Took<'a> {
    /// Free for the taking.
    Free,
    /// Waited for another holder, which gave it up (or died) without a save.
    Over,
    /// From this process's [`keep_saving`](super::kept::keep_saving), with the pair kept under it (see
    /// [`take_kept`]).
    Kept(&'a Kept),
}

/// What the holder's refresh came to.
struct Holding {
    pub(super) result: Result<Credential, Error>,
    pub(super) saved: Saved,
    /// Not the flight's answer, but a pair that exists nowhere else, saved under the
    /// lease all the same (kept if the save fails): a credential refused on arrival that
    /// carries a refresh token (see [`fetch`]), or the store's pair whose refresh token
    /// this holder took out and never presented (the source was never asked).
    pub(super) also_saved: Option<Credential>,
    /// The refresh token the fetch presented, spent by now.
    pub(super) spent: Option<crate::Secret>,
    /// The source's fetch, still running when the deadline came (see `finish_late`).
    pub(super) late: Option<LateFetch>,
    /// What the store held once this refresh had looked and written under the lease
    /// (see [`Kept::left`]).
    pub(super) left: Left,
    /// The fetch was a login made because the store did not answer, and brought no
    /// refresh token: nothing newer than a kept pair taken over (handed back).
    pub(super) outage_login: bool,
}

impl Holding {
    /// Ended before the source was asked.
    pub(super) fn ended(result: Result<Credential, Error>, saved: Saved) -> Self {
        Holding {
            result,
            saved,
            also_saved: None,
            spent: None,
            late: None,
            left: Left::default(),
            outage_login: false,
        }
    }
}

/// A lease holder's source fetch, boxed so that it can outlive its flight.
type Fetching = Pin<Box<dyn Future<Output = Result<Credential, crate::error::BoxError>> + Send>>;

/// A lease holder's fetch that outlived the flight's deadline.
struct LateFetch {
    pub(super) fetching: Fetching,
    /// `State::invalidations` when its flight began to run (see `FlightGuard`).
    pub(super) began: u64,
    /// The store's pair whose refresh token the holder took out and never presented
    /// (see `holding`): put back if the fetch brings nothing.
    pub(super) unpresented: Option<Credential>,
    /// The source was told the store did not answer, with a refresh token at stake: a
    /// login that brings no refresh token is not saved over it (see `holding`).
    pub(super) outage: bool,
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
            *late = Some(LateFetch {
                fetching,
                began,
                unpresented: None,
                outage: false,
            });
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
    let LateFetch {
        fetching,
        began,
        unpresented,
        outage,
    } = late;
    let answer = renewing(
        &inner,
        store.as_ref(),
        &lease,
        tokio::time::timeout(bound, fetching),
    )
    .await;
    let mut refused = None;
    let credential = match answer {
        Ok(answer) => {
            let fetched = check_fetched(&inner, answer, &mut refused);
            if let Err(err) = &fetched {
                let until =
                    saturating_add(Instant::now(), inner.config.fetch_timeout / STORE_SHARE);
                share_hold(&inner, store.as_ref(), err, until).await;
            }
            fetched.ok().or(refused)
        }
        Err(_elapsed) => {
            tracing::warn!("the fetch outlived its deadline twice; giving the refresh lease back");
            None
        }
    };
    // A login made because the store did not answer, bringing no refresh token: this
    // cache's newest all the same (below), but nothing of the store's is given up for
    // it: not saved, and a kept pair taken over is still the one to save.
    let outage_login = outage
        && credential
            .as_ref()
            .is_some_and(|c| c.refresh_token().is_none());
    if let (Some(_), Some(kept), false) = (&credential, &kept, outage_login) {
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
            .then(|| super::kept::spent(&credential))
    });
    // Nothing came (or an outage login): a pair whose refresh token this holder took
    // out of the store and never presented goes back (see `holding`), kept if the store
    // does not take it.
    let credential = credential.filter(|_| !outage_login).or(unpresented);
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

/// The token endpoint's word to the fleet, as the store keeps it (see
/// [`CredentialStore::hold`](crate::CredentialStore::hold)): the error a lease holder
/// fails with, without asking its source, while the hold lasts (by this cache's clock,
/// at most [`MAX_RETRY_AFTER`](super::MAX_RETRY_AFTER) from now). A store that does not
/// answer holds nothing.
async fn fleet_hold<P: CredentialSource>(
    inner: &Inner<P>,
    store: &dyn crate::store::DynStore,
    deadline: Instant,
) -> Option<Error> {
    let (until, kept_left) = store_call(inner, deadline, "held_until", store.held_left()).await??;
    // The time left by the store's own clock where it keeps one (Redis): the writer's
    // wall clock and this one's may disagree.
    let left = kept_left
        .or_else(|| until.duration_since(inner.config.clock.now()).ok())
        .filter(|left| !left.is_zero())?
        .min(super::MAX_RETRY_AFTER);
    // Over when either clock says so, as an expiry is: the monotonic end is set when
    // this cache first sees the hold (or writes it), so a wall clock stepped back does
    // not stretch it.
    let now = Instant::now();
    let ends = {
        let mut state = inner.lock_state();
        match state.fleet_hold {
            Some((seen, ends)) if Some(seen) == whole_millis(until) => ends,
            _ => {
                let ends = saturating_add(now, left);
                if let Some(seen) = whole_millis(until) {
                    state.fleet_hold = Some((seen, ends));
                }
                ends
            }
        }
    };
    let left = left.min(ends.saturating_duration_since(now));
    if left.is_zero() {
        return None;
    }
    let mut err = Error::new(ErrorKind::Backoff)
        .with_detail("the token endpoint asked every process of the fleet to wait (Retry-After)")
        .with_retry_in(left);
    err.not_before = Some(left);
    err.held = true;
    Some(err)
}

/// Tells the fleet the `Retry-After` a lease holder's fetch failed with, if it carries
/// one (see [`fleet_hold`]), by `until` at the latest.
async fn share_hold<P: CredentialSource>(
    inner: &Inner<P>,
    store: &dyn crate::store::DynStore,
    err: &Error,
    until: Instant,
) {
    let Some(asked) = err.not_before.filter(|asked| !asked.is_zero()) else {
        return;
    };
    let asked = asked.min(super::MAX_RETRY_AFTER);
    // To the millisecond, as stores keep it: read back, it is known as this one.
    let Some(at) = (inner.config.clock.now())
        .checked_add(asked)
        .and_then(whole_millis)
    else {
        return;
    };
    // Read back here, it ends when this process's own hold does.
    inner.lock_state().fleet_hold = Some((at, saturating_add(Instant::now(), asked)));
    store_call(inner, until, "hold", store.hold_left(at, asked)).await;
}

/// `at` to the millisecond below it, if it is after the Unix epoch.
fn whole_millis(at: std::time::SystemTime) -> Option<std::time::SystemTime> {
    let since = at.duration_since(std::time::UNIX_EPOCH).ok()?;
    let millis = u64::try_from(since.as_millis()).ok()?;
    std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_millis(millis))
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
pub(super) async fn release<P>(
    inner: &Inner<P>,
    store: &dyn crate::store::DynStore,
    lease: &Lease,
) {
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
pub(super) fn lease_hold<P>(inner: &Inner<P>) -> std::time::Duration {
    let share = inner.config.fetch_timeout / STORE_SHARE;
    // Saturating: the builder takes any fetch timeout (`Duration::MAX` means none).
    inner
        .config
        .fetch_timeout
        .saturating_add(share.saturating_mul(2))
        .saturating_add(LEASE_MARGIN)
        .min(LEASE_HOLD)
}

/// The longest a lease lasts without a renewal, renewed every third of it: what a dead
/// holder costs the fleet at most.
pub(super) const LEASE_HOLD: std::time::Duration = std::time::Duration::from_secs(3);

/// The first wait for another process's refresh; each next one doubles, up to
/// [`LEASE_POLL_MAX`].
pub(super) const LEASE_POLL_FIRST: std::time::Duration = std::time::Duration::from_millis(20);
/// The longest wait between two looks at the store while another process refreshes.
pub(super) const LEASE_POLL_MAX: std::time::Duration = std::time::Duration::from_millis(250);
/// What a lease lasts beyond the longest its holder can take.
const LEASE_MARGIN: std::time::Duration = std::time::Duration::from_secs(1);

/// One store call, bounded by its share of the flight's deadline. `None` when it failed
/// or took too long; the first such call of an outage is logged (see [`StoreHealth`]).
pub(super) async fn store_call<P, T>(
    inner: &Inner<P>,
    deadline: Instant,
    what: &'static str,
    call: crate::store::StoreFuture<'_, T>,
) -> Option<T> {
    let until = deadline.min(saturating_add(
        Instant::now(),
        inner.config.fetch_timeout / STORE_SHARE,
    ));
    let health = &inner.store_health;
    let failure = match tokio::time::timeout_at(until, call).await {
        Ok(Ok(value)) => {
            health.answered(what);
            return Some(value);
        }
        Ok(Err(e)) => crate::text::foreign(&e.to_string()),
        Err(_) => "no answer in time".to_owned(),
    };
    metrics::store_error(&inner.config.name, what);
    health.failed(what, &failure);
    None
}

/// How the store has answered this cache, for logging each outage once and its end once.
/// An outage begins with the first call that fails while none is failing, whichever call
/// it is (a save after a token request, a remove after a rejection, a load); it ends when
/// one of the calls that failed in it answers. A call that keeps failing is one outage,
/// logged once, however seldom it is made (a remove after a rejection, a hold after a
/// `Retry-After`) and however many refreshes meet no failure between its calls. Another
/// call that fails after a refresh met no failure begins an outage of its own, logged
/// too (a once-failed renewal, seldom made, does not hide it); one that fails while the
/// outage's refreshes still fail is the same outage.
#[derive(Default)]
pub(super) struct StoreHealth {
    state: std::sync::Mutex<Health>,
    /// Calls that failed, and calls that answered, ever: a refresh compares them from
    /// its start to its end (see [`StoreHealth::flight_began`]).
    failures: AtomicU64,
    answers: AtomicU64,
}

#[derive(Default)]
struct Health {
    /// The calls that failed in the outage under way (a bit each, `store_call_bit`);
    /// none when the store is not known to fail.
    failing: u16,
    /// Whether a refresh met no failure since the last call that failed.
    clean_since: bool,
}

/// What [`StoreHealth::flight_ended`] compares with: the counts as a refresh began.
pub(super) struct HealthMark {
    failures: u64,
    answers: u64,
}

impl StoreHealth {
    fn lock(&self) -> std::sync::MutexGuard<'_, Health> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn answered(&self, what: &'static str) {
        self.answers.fetch_add(1, Ordering::Relaxed);
        let mut health = self.lock();
        if health.failing & store_call_bit(what) != 0 {
            *health = Health::default();
            drop(health);
            tracing::info!(call = what, "credential store answers again");
        }
    }

    fn failed(&self, what: &'static str, failure: &str) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let bit = store_call_bit(what);
        let mut health = self.lock();
        let new = health.failing == 0 || (health.failing & bit == 0 && health.clean_since);
        health.failing |= bit;
        health.clean_since = false;
        drop(health);
        if new {
            tracing::warn!(
                call = what,
                error = %failure,
                "credential store failed; going on without it until it answers again"
            );
        }
    }

    pub(super) fn flight_began(&self) -> HealthMark {
        HealthMark {
            failures: self.failures.load(Ordering::Relaxed),
            answers: self.answers.load(Ordering::Relaxed),
        }
    }

    /// A refresh ended: one whose store calls all answered is recorded (see `failed`).
    pub(super) fn flight_ended(&self, began: HealthMark) {
        let clean = self.failures.load(Ordering::Relaxed) == began.failures
            && self.answers.load(Ordering::Relaxed) != began.answers;
        if clean {
            let mut health = self.lock();
            if health.failing != 0 {
                health.clean_since = true;
            }
        }
    }
}

/// The bit of [`Health::failing`] that stands for the store call `what`.
fn store_call_bit(what: &str) -> u16 {
    match what {
        "load" => 1,
        "lease" => 1 << 1,
        "save" => 1 << 2,
        "renew" => 1 << 3,
        "release" => 1 << 4,
        "remove" => 1 << 5,
        "hold" => 1 << 6,
        "held_until" => 1 << 7,
        _ => 1 << 15,
    }
}
