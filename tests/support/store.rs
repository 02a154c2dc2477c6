//! A shared store with faults a test switches on and off: one `MemoryStore` behind
//! switches, so that each test names the fault it needs instead of writing a store.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst},
    },
    time::Duration,
};

use tokio::sync::{Notify, Semaphore};
use tower_client_auth::{
    BoxError, Credential, CredentialCache, CredentialSource,
    store::{CredentialStore, Lease, MemoryStore},
};

/// A store (a `MemoryStore` unless built `over` another) behind fault switches. Every
/// call goes through to that store unless a switch says otherwise; clones share the
/// store and the switches.
#[derive(Clone, Default)]
pub struct FaultStore<S = MemoryStore> {
    memory: S,
    faults: Arc<Faults>,
}

/// The switches of a [`FaultStore`], all off at first.
#[derive(Default)]
pub struct Faults {
    /// Every call fails at once ("connection refused").
    pub down: AtomicBool,
    /// Every call hangs for good.
    pub hung: AtomicBool,
    /// `lease` fails (a store that stopped answering).
    pub lease_down: AtomicBool,
    /// `renew` fails (a holder cut off from the store while it works).
    pub renew_down: AtomicBool,
    /// `hold` and `held_until` fail (a store whose one key is refused, say by an ACL).
    pub holds_down: AtomicBool,
    /// `remove` fails (a compare-and-delete refused, say a store whose ACL denies
    /// scripts that delete).
    pub removes_down: AtomicBool,
    /// `save` fails for a credential with a refresh token (a store out of memory that
    /// still answers, say).
    pub refusing_pairs: AtomicBool,
    /// The next this many loads see nothing (a lagging replica).
    pub misses: AtomicUsize,
    /// A save of a credential with a refresh token lands, then reports an error (its
    /// reply lost).
    pub lost_pair_replies: AtomicBool,
    /// A save of a credential without a refresh token (a marker) lands, then reports an
    /// error (its reply lost).
    pub lost_marker_replies: AtomicBool,
    /// The next this many loads fail, after `passing_loads` more have passed.
    pub failing_loads: AtomicUsize,
    /// The next this many leases taken are taken, then reported failed (the reply lost).
    pub lost_lease_replies: AtomicUsize,
    /// Loads that pass before `failing_loads` fail.
    pub passing_loads: AtomicUsize,
    /// Every call takes this many milliseconds (a network round trip), when set.
    pub round_trip_ms: std::sync::atomic::AtomicU64,

    /// Loads pass through here first: they wait while it is closed.
    pub loads: Valve,
    /// Lease releases pass through here first.
    pub releases: Valve,
    /// Renewals pass through here first.
    pub renews: Valve,
    /// How long each of the next loads takes, one entry a load.
    load_delays: Mutex<VecDeque<Duration>>,
    /// How long each of the next saves takes, one entry a save.
    save_delays: Mutex<VecDeque<Duration>>,
}

impl FaultStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store whose every call fails at once.
    pub fn down() -> Self {
        let store = Self::new();
        store.faults.down.store(true, SeqCst);
        store
    }

    /// A store whose every call hangs for good.
    pub fn hung() -> Self {
        let store = Self::new();
        store.faults.hung.store(true, SeqCst);
        store
    }
}

impl<S: CredentialStore> FaultStore<S> {
    /// `store` behind the switches (a real Redis, say), all off.
    pub fn over(store: S) -> Self {
        FaultStore {
            memory: store,
            faults: Arc::default(),
        }
    }

    /// Whether the refresh lease is free now (taken for a millisecond to see).
    pub async fn lease_free(&self) -> bool {
        self.memory
            .lease(Duration::from_millis(1))
            .await
            .unwrap()
            .is_some()
    }

    /// The switches.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// The refresh token the store behind the switches holds, if any.
    pub async fn stored_refresh_token(&self) -> Option<String> {
        let stored = self.memory.load().await.unwrap();
        stored.and_then(|c| c.refresh_token().map(|t| t.expose().to_owned()))
    }

    /// Down past a 3 s refresh lease (which runs out, no one else taking it), then up
    /// again, taking pairs: the outage a kept pair's lease is lost in.
    pub async fn outage_past_the_lease(&self) {
        self.faults.down.store(true, SeqCst);
        tokio::time::sleep(Duration::from_millis(3500)).await;
        self.faults.refusing_pairs.store(false, SeqCst);
        self.faults.down.store(false, SeqCst);
    }

    /// The next loads take these long, one after another (a slow round trip).
    pub fn delay_next_loads(&self, delays: &[Duration]) {
        self.faults
            .load_delays
            .lock()
            .unwrap()
            .extend(delays.iter().copied());
    }

    /// The next saves take these long, one after another (a slow round trip).
    pub fn delay_next_saves(&self, delays: &[Duration]) {
        self.faults
            .save_delays
            .lock()
            .unwrap()
            .extend(delays.iter().copied());
    }

    /// What a call meets before it goes through: an error or a hang when the store is
    /// down or hung.
    async fn reach(&self) -> Result<(), BoxError> {
        let round_trip = self.faults.round_trip_ms.load(SeqCst);
        if round_trip > 0 {
            tokio::time::sleep(Duration::from_millis(round_trip)).await;
        }
        if self.faults.hung.load(SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.faults.down.load(SeqCst) {
            return Err("connection refused".into());
        }
        Ok(())
    }
}

impl<S: CredentialStore> CredentialStore for FaultStore<S> {
    async fn load(&self) -> Result<Option<Credential>, BoxError> {
        self.reach().await?;
        self.faults.loads.pass().await;
        let delay = self.faults.load_delays.lock().unwrap().pop_front();
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let passed = self
            .faults
            .passing_loads
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let failed = !passed
            && self
                .faults
                .failing_loads
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok();
        if failed {
            return Err("load timed out".into());
        }
        let missed = self
            .faults
            .misses
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if missed {
            return Ok(None);
        }
        self.memory.load().await
    }

    async fn lease(&self, ttl: Duration) -> Result<Option<Lease>, BoxError> {
        self.reach().await?;
        if self.faults.lease_down.load(SeqCst) {
            return Err("connection refused".into());
        }
        let lease = self.memory.lease(ttl).await?;
        if lease.is_some()
            && (self.faults.lost_lease_replies)
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err("connection reset before the reply".into());
        }
        Ok(lease)
    }

    async fn save(&self, lease: &Lease, credential: &Credential) -> Result<bool, BoxError> {
        self.reach().await?;
        if credential.refresh_token().is_some() && self.faults.refusing_pairs.load(SeqCst) {
            return Err("OOM command not allowed when used memory > 'maxmemory'".into());
        }
        let delay = self.faults.save_delays.lock().unwrap().pop_front();
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let saved = self.memory.save(lease, credential).await?;
        if credential.refresh_token().is_some() && self.faults.lost_pair_replies.load(SeqCst) {
            return Err("connection reset before the reply".into());
        }
        if credential.refresh_token().is_none() && self.faults.lost_marker_replies.load(SeqCst) {
            return Err("connection reset before the reply".into());
        }
        Ok(saved)
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, BoxError> {
        self.reach().await?;
        if self.faults.renew_down.load(SeqCst) {
            return Err("connection reset".into());
        }
        self.faults.renews.pass().await;
        self.memory.renew(lease, ttl).await
    }

    async fn release(&self, lease: &Lease) -> Result<(), BoxError> {
        self.reach().await?;
        self.faults.releases.pass().await;
        self.memory.release(lease).await
    }

    async fn remove(&self, rejected: &Credential) -> Result<(), BoxError> {
        self.reach().await?;
        if self.faults.removes_down.load(SeqCst) {
            return Err("NOPERM this user has no permissions to run the remove script".into());
        }
        self.memory.remove(rejected).await
    }

    async fn hold(&self, until: std::time::SystemTime) -> Result<(), BoxError> {
        self.reach().await?;
        if self.faults.holds_down.load(SeqCst) {
            return Err("NOPERM this user has no permissions to access the hold key".into());
        }
        self.memory.hold(until).await
    }

    async fn held_until(&self) -> Result<Option<std::time::SystemTime>, BoxError> {
        self.reach().await?;
        if self.faults.holds_down.load(SeqCst) {
            return Err("NOPERM this user has no permissions to access the hold key".into());
        }
        self.memory.held_until().await
    }

    async fn changed(&self, timeout: Duration) {
        if self.faults.hung.load(SeqCst) {
            std::future::pending::<()>().await;
        }
        self.memory.changed(timeout).await
    }
}

/// A door calls pass through: open at first; while closed, each call waits for a
/// permit. Every call says it came (`arrived`) before it waits.
pub struct Valve {
    closed: AtomicBool,
    permits: Semaphore,
    arrived: Notify,
}

impl Default for Valve {
    fn default() -> Self {
        Valve {
            closed: AtomicBool::new(false),
            permits: Semaphore::new(0),
            arrived: Notify::new(),
        }
    }
}

impl Valve {
    /// Calls from now on wait.
    pub fn close(&self) {
        self.closed.store(true, SeqCst);
    }

    /// Every waiting call goes on, and calls from now on pass.
    pub fn open(&self) {
        self.closed.store(false, SeqCst);
        self.permits.add_permits(1_000);
    }

    /// One waiting (or the next) call goes on; the valve stays closed.
    pub fn let_one(&self) {
        self.permits.add_permits(1);
    }

    /// Until a call comes to the valve (or one came since the last wait).
    pub async fn arrived(&self) {
        self.arrived.notified().await;
    }

    async fn pass(&self) {
        self.arrived.notify_one();
        if self.closed.load(SeqCst) {
            self.permits.acquire().await.unwrap().forget();
        }
    }
}

/// A cache of `source` over `store` for the late-fetch tests: a 1 s fetch timeout (a
/// slow exchange outlives it), a 20 s soft window and a 1 s hard one, no jitter, and a
/// 50-100 ms backoff.
pub fn windowed<P: CredentialSource>(source: P, store: FaultStore) -> CredentialCache<P> {
    CredentialCache::builder(source)
        .store(store)
        .fetch_timeout(Duration::from_secs(1))
        .soft_window(Duration::from_secs(20))
        .hard_window(Duration::from_secs(1))
        .window_jitter(0.0)
        .backoff(Duration::from_millis(50), Duration::from_millis(100))
        .build()
        .unwrap()
}

/// Process A's and B's connections to one store, in the two outages of the kept-pair
/// tests. The first: A's connection goes down past A's lease (a save whose reply A lost
/// stays landed), and B's refuses pairs from now on, so that B keeps what it rotates.
pub async fn a_goes_down_and_b_refuses_pairs<S: CredentialStore>(
    a: &FaultStore<S>,
    b: &FaultStore<S>,
) {
    a.faults().down.store(true, SeqCst);
    a.faults().lost_pair_replies.store(false, SeqCst);
    b.faults().refusing_pairs.store(true, SeqCst);
    tokio::time::sleep(Duration::from_millis(3500)).await;
}

/// The second: B's connection goes down past B's lease; A's comes back (its task takes
/// the free lease again); then B's, taking pairs again; both tasks have had their turn
/// when this returns.
pub async fn b_goes_down_then_both_come_back<S: CredentialStore>(
    a: &FaultStore<S>,
    b: &FaultStore<S>,
) {
    b.faults().down.store(true, SeqCst);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    a.faults().down.store(false, SeqCst);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    b.faults().down.store(false, SeqCst);
    b.faults().refusing_pairs.store(false, SeqCst);
    tokio::time::sleep(Duration::from_millis(2500)).await;
}
