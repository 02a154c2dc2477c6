//! The kept pair: a rotated refresh token the store did not take, kept under this
//! process's refresh lease and saved until the store takes it, taken over by a flight of
//! this process that needs a refresh meanwhile; and a late fetch's pair, the next
//! flight's answer until it is saved.

use std::sync::{Arc, atomic::Ordering};

use tokio::time::Instant;

use super::lease::{LEASE_HOLD, LEASE_POLL_FIRST, LEASE_POLL_MAX, lease_hold, release, store_call};
use super::{Inner, config::saturating_add};
use crate::{credential::Credential, metrics, source::CredentialSource, store::Lease};

/// A rotated pair the store did not take, and the refresh lease it is kept under until
/// it is saved (see [`keep_saving`]).
pub(super) struct Kept {
    /// Names this keeping: its task acts on the pair only while this one is in the
    /// slot (a flight that took the lease over may have put another there since, under
    /// the same lease).
    pub(super) id: u64,
    pub(super) lease: Lease,
    pub(super) credential: Credential,
    /// `State::next_generation` when the refresh that brought `credential` began: a
    /// credential installed since then is newer (see [`superseded`]).
    pub(super) born: u64,
    /// What the store may hold as this process left it when the pair was kept (see
    /// [`Left`]). While the lease is held, only this process writes; once it was lost,
    /// a store that holds something else may have taken a save of this pair that landed
    /// though its reply was lost, and another holder may have spent it (see
    /// [`keep_saving`]).
    pub(super) left: Left,
    /// Whether the pair's lease was held without a break since it was kept, or the
    /// store was found as this process left it ([`Kept::store_as_left`]) since the lease
    /// was taken again. Until then the pair is neither saved, nor taken over by a flight,
    /// nor saved as the cache goes: a save of it may have landed, been taken by another
    /// holder and spent.
    pub(super) checked: bool,
    /// Wakes the task keeping the pair before its next round: a flight handed it its
    /// lease (see `take_lost_kept`).
    pub(super) nudge: Arc<tokio::sync::Notify>,
}

/// What the store may hold as this process left it, under a lease held without a break
/// since: each a record the refresh loaded or wrote (`None`: nothing stored), two when
/// a write's reply was lost (it may have landed or not). Empty when unknown (a look
/// failed).
#[derive(Clone, Default)]
pub(super) struct Left(pub(super) Vec<Option<Credential>>);

impl Left {
    /// What a refresh holding the lease loaded (`None`: the look failed), after
    /// `before`: as a pair taken over with the lease left it, when the look failed.
    pub(super) fn loaded(held: &Option<Option<Credential>>, before: Option<&Left>) -> Left {
        match (held, before) {
            (Some(held), _) => Left(vec![held.clone()]),
            (None, Some(before)) => before.clone(),
            (None, None) => Left::default(),
        }
    }

    /// `record` written over this (`landed`: `Some(true)` known to, `None` unknown).
    pub(super) fn wrote(&mut self, record: Credential, landed: Option<bool>) {
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
    pub(super) fn new(lease: Lease, credential: Credential, born: u64, left: Left) -> Self {
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
    pub(super) fn lease_lost(mut self) -> Self {
        self.checked = false;
        self
    }

    /// The same pair, under a name of its own: kept by a new task, after a flight that
    /// left the store as `left` (which starts from this pair's own when that flight's
    /// look failed: see [`Left::loaded`]).
    pub(super) fn again(self, left: Left) -> Self {
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
    pub(super) fn store_as_left(&self, stored: Option<&Credential>) -> bool {
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
pub(super) async fn keep_saving<P: CredentialSource>(
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
        // A failure, or a lease that ran out between the renewal and the save (taken
        // again at the next renewal), is tried again.
        if let Some(true) =
            save_pair(&inner, store.as_ref(), &kept.lease, &kept.credential, until).await
        {
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
        let saving = spent(&kept.credential);
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
pub(super) async fn take_kept<P: CredentialSource>(
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
pub(super) enum LostKept {
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
pub(super) async fn take_lost_kept<P: CredentialSource>(
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
/// a generation): then `credential`'s was spent to get it, or handed in newer; or a pair
/// handed in since is pending. Not one installed before: that pair is older (still
/// current while the answers of one or more refreshes, refused on arrival or late, never
/// became current).
pub(super) fn superseded<P: CredentialSource>(
    inner: &Inner<P>,
    credential: &Credential,
    born: u64,
) -> bool {
    let newer = |generation: u64, other: &Credential| {
        generation >= born
            && other.refresh_token().is_some()
            && other.refresh_token() != credential.refresh_token()
    };
    (inner.current.load().as_ref()).is_some_and(|entry| newer(entry.generation, &entry.credential))
        // A pair handed in since, still pending: the current credential may carry no
        // refresh token (another replaced it, a login in an outage), and the hand-in is
        // newer all the same.
        || (inner.lock_state().handing.as_ref())
            .is_some_and(|handing| newer(handing.generation, &handing.credential))
}

/// A pair handed in (`CacheHandle::replace`) that carries a refresh token, with a store,
/// until it reaches the store ([`hand_in`]) or a flight of this process takes it over.
pub(super) struct Handing {
    /// The generation it was installed under.
    pub(super) generation: u64,
    pub(super) credential: Credential,
    /// Set once it is no longer pending (see [`Handing::end`]): read by its [`hand_in`]
    /// task, which may outlive the cache.
    pub(super) over: Arc<std::sync::atomic::AtomicBool>,
}

impl Handing {
    pub(super) fn new(generation: u64, credential: Credential) -> Self {
        Handing {
            generation,
            credential,
            over: Arc::default(),
        }
    }

    /// No longer pending: saved or kept by its task, taken over by a flight (which
    /// presents its refresh token or puts it back), or superseded by a newer refresh
    /// token installed here (another hand-in, a step-up's login): its task saves nothing
    /// from now on.
    pub(super) fn end(self) {
        self.over.store(true, Ordering::Release);
    }
}

/// The pair handed in that has not reached the store. While it is pending, a flight of
/// this process that needs a refresh takes no pair from the store (an older session's: a
/// refresh another process began before the hand-in may save one), nor a pair kept here
/// from a refresh that began before it (see [`superseded`]), and, once it holds the
/// lease, presents this pair's refresh token (see `lease::holding`), as it takes a kept
/// pair over.
pub(super) fn pending_hand_in<P: CredentialSource>(inner: &Inner<P>) -> Option<Credential> {
    (inner.lock_state().handing.as_ref()).map(|handing| handing.credential.clone())
}

/// The pending hand-in of `credential` is over (if it is still that one's): saved,
/// kept, or taken over by a flight.
pub(super) fn hand_in_taken<P: CredentialSource>(inner: &Inner<P>, credential: &Credential) {
    let mut state = inner.lock_state();
    if let Some(handing) = state
        .handing
        .take_if(|handing| handing.credential == *credential)
    {
        handing.end();
    }
}

/// A pair handed in (`CacheHandle::replace`) that carries a refresh token, with a store:
/// the fleet's newest session from now on, shared as a holder's refresh shares what it
/// brought. The refresh lease is taken once it is free (another holder's refresh ends
/// first; a pair kept here gives way to this newer one at its task's next round, nudged
/// now), the store is looked at, and the pair saved under the lease; a save the store
/// does not take is kept ([`keep_saving`]). Given up once the hand-in is over (`over`:
/// see [`Handing::end`]). A cache dropped before the pair is saved (a process handing a
/// session to the fleet as it exits) leaves one fetch timeout to save it
/// ([`last_hand_in`]).
pub(super) async fn hand_in<P: CredentialSource>(
    inner: std::sync::Weak<Inner<P>>,
    store: Arc<dyn crate::store::DynStore>,
    credential: Credential,
    born: u64,
    over: Arc<std::sync::atomic::AtomicBool>,
    (fetch_timeout, hold): (std::time::Duration, std::time::Duration),
) {
    let mut pause = LEASE_POLL_FIRST;
    loop {
        if over.load(Ordering::Acquire) {
            return;
        }
        let Some(cache) = inner.upgrade() else {
            let until = saturating_add(Instant::now(), fetch_timeout);
            return last_hand_in(store.as_ref(), &credential, &over, until, hold).await;
        };
        if let Ok(slot) = cache.kept.try_lock() {
            if let Some(kept) = slot.as_ref() {
                kept.nudge.notify_one();
            }
        }
        let deadline = saturating_add(Instant::now(), cache.config.fetch_timeout);
        let lease = store_call(&cache, deadline, "lease", store.lease(lease_hold(&cache))).await;
        let answered = lease.is_some();
        if let Some(Some(lease)) = lease {
            if over.load(Ordering::Acquire) {
                // A flight of this process took the pair over while the lease was free
                // (it presented or saved the refresh token): saving it now would hand
                // the fleet a spent token.
                return release(&cache, store.as_ref(), &lease).await;
            }
            let held = store_call(&cache, deadline, "load", store.load()).await;
            match save_pair(&cache, store.as_ref(), &lease, &credential, deadline).await {
                Some(true) => {
                    tracing::debug!("the pair handed in is saved for the fleet");
                    hand_in_taken(&cache, &credential);
                    return release(&cache, store.as_ref(), &lease).await;
                }
                // The lease ran out first: taken again.
                Some(false) => {}
                None => {
                    hand_in_taken(&cache, &credential);
                    let kept = Kept::new(lease, credential, born, Left::loaded(&held, None));
                    let slot = Arc::clone(&cache.kept);
                    drop(cache);
                    return keep_saving(inner, store, slot, kept).await;
                }
            }
        }
        drop(cache);
        tokio::time::sleep(pause).await;
        // Held by another refresh, which ends within a fetch timeout; a store that does
        // not answer is tried at the pace of a kept pair's saves.
        pause = (pause * 2).min(if answered {
            LEASE_POLL_MAX
        } else {
            SAVE_RETRY_MAX
        });
    }
}

/// [`hand_in`] once its cache went before the pair was saved: the lease taken as soon as
/// it is free and the pair saved under it, until `until`. No flight of this process can
/// take it over any more; its access token goes marked expired (the cache that could
/// tell whether it was dropped is gone), as a kept pair's does in [`last_save`].
async fn last_hand_in(
    store: &dyn crate::store::DynStore,
    credential: &Credential,
    over: &std::sync::atomic::AtomicBool,
    until: Instant,
    hold: std::time::Duration,
) {
    let saving = spent(credential);
    let mut pause = LEASE_POLL_FIRST;
    while !over.load(Ordering::Acquire) && Instant::now() < until {
        if let Ok(Ok(Some(lease))) = tokio::time::timeout_at(until, store.lease(hold)).await {
            let saved = tokio::time::timeout_at(until, store.save(&lease, &saving)).await;
            let _ =
                tokio::time::timeout(std::time::Duration::from_millis(500), store.release(&lease))
                    .await;
            if let Ok(Ok(true)) = saved {
                tracing::debug!("the pair handed in is saved for the fleet as its cache goes");
                return;
            }
        }
        tokio::time::sleep_until(saturating_add(Instant::now(), pause).min(until)).await;
        pause = (pause * 2).min(LEASE_POLL_MAX);
    }
    tracing::warn!("the cache was dropped before the pair handed in could be saved");
}

/// Saves `pair` under `lease` by `until`, as [`keep_saving`] and [`hand_in`] do. A pair
/// dropped here since it came (rejected, invalidated) goes with its access token marked
/// expired: only its refresh token is the fleet's, as a rejected pair's is left (see
/// `lease::holding`); one dropped while it was saved is saved again so, under the lease
/// still held, before another process takes the access token. The save's answer
/// (`None`: the store did not answer).
async fn save_pair<P: CredentialSource>(
    inner: &Inner<P>,
    store: &dyn crate::store::DynStore,
    lease: &Lease,
    pair: &Credential,
    until: Instant,
) -> Option<bool> {
    let was_dropped = inner.lock_state().dropped(pair);
    let saving = match was_dropped {
        true => spent(pair),
        false => pair.clone(),
    };
    let saved = store_call(inner, until, "save", store.save(lease, &saving)).await;
    if saved == Some(true) && !was_dropped && inner.lock_state().dropped(pair) {
        store_call(inner, until, "save", store.save(lease, &spent(pair))).await;
    }
    saved
}

/// `pair` with its access token marked expired: never handed out again, its refresh
/// token still the fleet's.
pub(super) fn spent(pair: &Credential) -> Credential {
    pair.clone().expires_at(std::time::SystemTime::UNIX_EPOCH)
}

/// The first wait before saving a rotated refresh token again; each next one doubles.
const SAVE_RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(250);
/// The longest wait between two tries to save a rotated refresh token.
const SAVE_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// [`keep_saving`] from `lease::finish_late`, which holds the cache strongly: only a weak
/// reference from here on, so that a cache dropped meanwhile ends it.
pub(super) async fn keep_saving_late<P: CredentialSource>(
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
pub(super) fn late_settled<P: CredentialSource>(
    inner: &Inner<P>,
    credential: &Credential,
    saved: bool,
) {
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
pub(super) fn late_lent<P: CredentialSource>(
    inner: &Inner<P>,
    credential: &Credential,
    lent: bool,
) {
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
pub(super) fn unsaved_late<P: CredentialSource>(inner: &Inner<P>) -> Option<Credential> {
    let mut state = inner.lock_state();
    let late = state.late.as_ref().filter(|late| late.unsaved)?;
    let credential = late.credential.clone();
    if state.dropped(&credential) || !inner.is_usable_stored(&credential) {
        return None;
    }
    state.late = None;
    Some(credential)
}
