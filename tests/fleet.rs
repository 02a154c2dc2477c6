//! The fleet level on a real Redis (feature `redis`): the store contract (lease, fenced
//! save, compare-and-delete), one fetch for many caches that each hold their own
//! connection (as processes do), a dead holder's lease taken over, a shared rejection,
//! and Redis down then back. Every test starts its own `redis-server` on a free loopback
//! port; nothing here mocks Redis.
#![cfg(feature = "redis")]

use crate::support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
    time::{Duration, Instant},
};

use support::{
    contract::{Endpoint, one_fetch_per_lifetime, the_contract_holds_with},
    redis::{RedisCluster, RedisServer},
    store::FaultStore,
};
use tower_client_auth::{
    BoxError, Credential, CredentialCache, CredentialSource, CredentialStore, FetchContext,
    MemoryStore, store::redis::RedisStore,
};

async fn redis_store(server: &RedisServer, namespace: &str) -> RedisStore {
    RedisStore::connect(&server.url(), namespace).await.unwrap()
}

/// The contract every store keeps, checked on `store` (and `other`, a second handle on
/// the same data, as another process has): one lease at a time, given back only by its
/// holder, renewed only by it; a save fenced by the lease; a removal that spares a newer
/// value; a change seen by whoever waits for one.
async fn the_contract_holds<S: CredentialStore + Clone>(store: S, other: S) {
    the_contract_holds_with(store, other, true).await;
}

/// World: `MemoryStore` and `RedisStore` on a real server. Proves: both keep the one
/// contract the cache relies on.
#[tokio::test]
async fn memory_and_redis_keep_the_same_contract() {
    let memory = MemoryStore::new();
    the_contract_holds(memory.clone(), memory).await;
    let server = RedisServer::start();
    the_contract_holds(
        redis_store(&server, "contract").await,
        redis_store(&server, "contract").await,
    )
    .await;
}

/// World: a pair saved whose access token expires in 1 s, read back 1.5 s later, in the
/// memory store and in Redis; and a marker (a credential without a refresh token, saved
/// already expired). Proves: the refresh token outlives its access token in every store
/// (an idle fleet refreshes with it instead of logging in again), while a credential
/// without one still goes with its expiry in Redis; a marker stays in every store (it
/// records that a holder took the refresh token out: see `Kept::left` in the cache).
#[tokio::test]
async fn a_stored_refresh_token_outlives_its_access_token() {
    let server = RedisServer::start();
    let memory = MemoryStore::new();
    let redis = redis_store(&server, "outlives").await;
    let pair = Credential::bearer("access")
        .unwrap()
        .expires_in(Duration::from_secs(1))
        .with_refresh_token("refresh-1");
    for store in [&memory as &dyn Probe, &redis] {
        store.put(&pair).await;
    }
    let plain = redis_store(&server, "outlives-plain").await;
    plain
        .put(
            &Credential::bearer("access")
                .unwrap()
                .expires_in(Duration::from_secs(1)),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (name, store) in [("memory", &memory as &dyn Probe), ("redis", &redis)] {
        let stored = store.get().await;
        assert_eq!(
            stored.as_ref().and_then(|c| c.refresh_token().cloned()),
            pair.refresh_token().cloned(),
            "{name}: the refresh token went with its access token"
        );
    }
    assert_eq!(
        plain.get().await,
        None,
        "a credential alone expires with itself"
    );
    let marker = Credential::bearer("taken")
        .unwrap()
        .expires_at(std::time::SystemTime::UNIX_EPOCH);
    let marked = redis_store(&server, "outlives-marker").await;
    for store in [&memory as &dyn Probe, &marked] {
        store.put(&marker).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (name, store) in [("memory", &memory as &dyn Probe), ("redis", &marked)] {
        assert_eq!(
            store.get().await,
            Some(marker.clone()),
            "{name}: the marker went"
        );
    }
}

/// World: a fleet's cache (over memory, and over Redis), its own source rotating the
/// refresh token on every refresh but answering one refresh with an access token that
/// has already expired (a clock-skewed server, say). The cache refuses that credential
/// (`Expired`). Proves: the refresh token it carried is not lost with it: the store
/// keeps the pair (its access token unusable), and the next refresh presents that
/// refresh token; nobody logs in again, and no refresh token is presented twice.
#[tokio::test]
async fn a_refused_credential_leaves_its_refresh_token_in_the_store() {
    let server = RedisServer::start();
    refused_keeps_its_refresh_token("memory", MemoryStore::new()).await;
    refused_keeps_its_refresh_token("redis", redis_store(&server, "refused").await).await;
}

async fn refused_keeps_its_refresh_token<S: CredentialStore + Clone>(name: &str, store: S) {
    let (source, log) = first_refresh_expired(Duration::from_secs(60));
    let cache = CredentialCache::builder(source)
        .store(store.clone())
        .backoff(Duration::from_millis(1), Duration::from_millis(2))
        .build()
        .unwrap();
    let first = cache.credential().await.unwrap();
    let err = cache.reject(&first).await.unwrap_err();
    assert_eq!(
        err.kind(),
        tower_client_auth::ErrorKind::Expired,
        "{name}: {err}"
    );
    assert_eq!(
        refresh_token_of(store.get().await),
        Some("rt-2".to_owned()),
        "{name}: the refused credential's refresh token is not in the store"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    let next = cache.credential().await.unwrap();
    assert_eq!(next, Credential::bearer("access-r2").unwrap(), "{name}");
    let log = log.lock().unwrap();
    assert_eq!(log.logins, 1, "{name}: logged in again");
    assert_eq!(log.presented, ["rt-1", "rt-2"], "{name}");
}

/// The refresh token `stored` carries, as text.
fn refresh_token_of(stored: Option<Credential>) -> Option<String> {
    stored?.refresh_token().map(|t| t.expose().to_owned())
}

/// What [`first_refresh_expired`]'s source did: logins, and the refresh tokens presented.
#[derive(Default)]
struct RotationLog {
    logins: usize,
    presented: Vec<String>,
}

/// A fleet source that logs in (`access-login`, `rt-1`, living `login_lifetime`) when the
/// store holds no refresh token, and otherwise presents the one it is given and rotates
/// it (`rt-N` for `rt-N+1`); its first refresh's access token arrives already expired.
fn first_refresh_expired(
    login_lifetime: Duration,
) -> (
    tower_client_auth::SourceFn,
    Arc<std::sync::Mutex<RotationLog>>,
) {
    use tower_client_auth::RefreshSharing;
    let log = Arc::new(std::sync::Mutex::new(RotationLog::default()));
    let source = tower_client_auth::source_fn({
        let log = log.clone();
        move |cx: FetchContext| {
            let mut log = log.lock().unwrap();
            let now = std::time::SystemTime::now();
            let answer = match cx.refresh_sharing() {
                RefreshSharing::Shared(Some(token)) => {
                    log.presented.push(token.expose().to_owned());
                    let n = log.presented.len();
                    let access = Credential::bearer(format!("access-r{n}")).unwrap();
                    let access = if n == 1 {
                        access.expires_at(now - Duration::from_secs(1))
                    } else {
                        access.expires_in(Duration::from_secs(60))
                    };
                    Ok(access.with_refresh_token(format!("rt-{}", n + 1)))
                }
                RefreshSharing::Shared(None) => {
                    log.logins += 1;
                    Ok(Credential::bearer("access-login")
                        .unwrap()
                        .expires_in(login_lifetime)
                        .with_refresh_token("rt-1"))
                }
                other => Err(format!("not shared: {other:?}")),
            };
            async move { answer.map_err(BoxError::from) }
        }
    });
    (source, log)
}

/// Saves and loads through the store's own lease, for a test that only writes and reads.
trait Probe {
    fn put<'a>(&'a self, credential: &'a Credential) -> futures_util::future::BoxFuture<'a, ()>;
    fn get(&self) -> futures_util::future::BoxFuture<'_, Option<Credential>>;
}

impl<S: CredentialStore + Sync> Probe for S {
    fn put<'a>(&'a self, credential: &'a Credential) -> futures_util::future::BoxFuture<'a, ()> {
        Box::pin(async move {
            let lease = self.lease(Duration::from_secs(5)).await.unwrap().unwrap();
            assert!(self.save(&lease, credential).await.unwrap());
            self.release(&lease).await.unwrap();
        })
    }
    fn get(&self) -> futures_util::future::BoxFuture<'_, Option<Credential>> {
        Box::pin(async move { self.load().await.unwrap() })
    }
}

/// World: two caches (each its own Redis connection, as two processes), the first one's
/// exchange taking 4.5 s, longer than a lease lasts unrenewed. Proves: the holder renews
/// its lease while it works, so the second cache waits for its credential instead of
/// taking the lease over: one exchange, never two at once.
#[tokio::test]
async fn a_slow_holder_keeps_its_lease() {
    let server = RedisServer::start();
    let endpoint = Endpoint::slow(Duration::from_millis(4_500));
    let cache = async || {
        CredentialCache::builder(endpoint.clone())
            .store(redis_store(&server, "slow-holder").await)
            .build()
            .unwrap()
    };
    let (a, b) = (cache().await, cache().await);
    let first = tokio::spawn(async move { a.credential().await.unwrap() });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = b.credential().await.unwrap();
    assert_eq!(first.await.unwrap(), second, "b took a's credential");
    assert_eq!(endpoint.fetches(), 1);
    assert_eq!(endpoint.max_in_flight.load(SeqCst), 1);
}

/// World: 8 caches, each with its own Redis connection (as 8 processes have), 25
/// concurrent callers each, for 3 s, tokens living 1 s. Proves: the token endpoint is
/// asked about once per lifetime for the whole fleet (not once per cache), never twice
/// at once, and every call succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_fetches_once_per_lifetime() {
    let server = RedisServer::start();
    let mut stores = Vec::new();
    for _ in 0..8 {
        stores.push(redis_store(&server, "fleet").await);
    }
    one_fetch_per_lifetime(stores, 25, Duration::from_secs(3)).await;
}

/// World: three processes of one client, a cache each over its own connection to one
/// real Redis (and the same over one `MemoryStore`), want a token at once; the token
/// endpoint answers the first request `429` with `Retry-After: 2`. Proves: the endpoint
/// hears nothing more from the fleet for those 2 s, whichever process asks, and one
/// login after them serves every process (`contract::a_retry_after_holds_every_process`).
#[cfg(feature = "token")]
#[tokio::test]
async fn a_retry_after_holds_every_process_of_the_fleet() {
    let memory = MemoryStore::new();
    support::contract::a_retry_after_holds_every_process(vec![memory.clone(); 3]).await;
    let server = RedisServer::start();
    let mut stores = Vec::new();
    for _ in 0..3 {
        stores.push(redis_store(&server, "hold").await);
    }
    support::contract::a_retry_after_holds_every_process(stores).await;
}

/// World: a real three-node Redis Cluster the test makes (`redis-cli --cluster
/// create`), three credentials whose keys fall on the three nodes. Proves: the whole
/// store contract holds on a cluster (each script's keys share a slot; a change
/// published on one node wakes a waiter subscribed through another), and 4 caches, each
/// with its own cluster connection, fetch once per lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_keeps_the_contract_and_one_fetch_per_lifetime() {
    let cluster = RedisCluster::start();
    let urls = cluster.urls();
    let nodes: Vec<&str> = urls.iter().map(String::as_str).collect();
    let store = async |namespace: &str| RedisStore::cluster(&nodes, namespace).await.unwrap();
    // Their keys' slots fall on the three nodes, one each (5461 slots a node).
    for namespace in ["cluster-1", "cluster-2", "cluster-3"] {
        the_contract_holds(store(namespace).await, store(namespace).await).await;
    }
    for port in &cluster.ports {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string(), "--raw", "keys", "tca:*:credential"])
            .output()
            .unwrap();
        let keys = String::from_utf8_lossy(&out.stdout);
        assert_eq!(keys.lines().count(), 1, "node {port} holds {keys:?}");
    }
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(store("cluster-fleet").await);
    }
    one_fetch_per_lifetime(stores, 10, Duration::from_millis(2_500)).await;
}

/// World: a lease held by a process that died (a token nobody will release, 300 ms to
/// live). Proves: a cache waits for it to run out, then takes it over and fetches once.
#[tokio::test]
async fn a_dead_holders_lease_is_taken_over_when_it_runs_out() {
    let server = RedisServer::start();
    let store = redis_store(&server, "dead-holder").await;
    let dead = store.lease(Duration::from_millis(300)).await.unwrap();
    assert!(dead.is_some());
    let endpoint = Endpoint::new(None);
    let cache = CredentialCache::builder(endpoint.clone())
        .store(redis_store(&server, "dead-holder").await)
        .build()
        .unwrap();
    let started = Instant::now();
    cache.credential().await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "fetched while another held the lease"
    );
    assert_eq!(endpoint.fetches(), 1);
}

/// World: three processes of one client on a real Redis (a cache each over its own
/// connection and token source), four callers each rejecting every credential they get
/// (an API answering 401 to all) for 4 s; for 2 s of it the token endpoint answers every
/// request `503` with `Retry-After: 1`. Proves: no token request from any process
/// arrives inside a `Retry-After` the endpoint gave (the endpoint counts them), the
/// endpoint was asked again after each hold (the outage was seen more than once), and
/// once it recovers every process gets a token.
#[cfg(feature = "token")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_storm_through_an_outage_keeps_every_retry_after() {
    let server = RedisServer::start();
    let idp = support::retry_after::Idp::default();
    idp.set_retry_after(Duration::from_secs(1));
    let mut caches = Vec::new();
    for _ in 0..3 {
        caches.push(
            CredentialCache::builder(idp.source())
                .store(redis_store(&server, "storm").await)
                .backoff(Duration::from_millis(50), Duration::from_millis(200))
                .build()
                .unwrap(),
        );
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for cache in &caches {
        for _ in 0..4 {
            let cache = cache.clone();
            tasks.push(tokio::spawn(async move {
                while started.elapsed() < Duration::from_secs(4) {
                    if let Ok(credential) = cache.credential().await {
                        let _ = cache.reject(&credential).await;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    idp.set_failing(true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    idp.set_failing(false);
    for task in tasks {
        task.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for cache in &caches {
        cache.credential().await.expect("a token after the outage");
    }
    let violations = idp.violations();
    assert!(violations.is_empty(), "{violations:#?}");
    let refused = idp.log().iter().filter(|l| l.2 == 503).count();
    assert!(refused >= 2, "the outage was seen {refused} times");
}

/// World: two caches sharing a store; the API rejects the credential both hold. Proves:
/// the first rejection removes it fleet-wide and fetches a new one; the second cache's
/// rejection of the same old credential spares the new one and uses it: one fetch.
#[tokio::test]
async fn a_rejection_removes_exactly_that_credential_fleet_wide() {
    let server = RedisServer::start();
    let endpoint = Endpoint::new(None);
    let cache = |store| {
        CredentialCache::builder(endpoint.clone())
            .store(store)
            .build()
            .unwrap()
    };
    let a = cache(redis_store(&server, "shared-rejection").await);
    let b = cache(redis_store(&server, "shared-rejection").await);
    let old = a.credential().await.unwrap();
    assert_eq!(
        b.credential().await.unwrap(),
        old,
        "b loaded a's credential"
    );
    assert_eq!(endpoint.fetches(), 1);
    let new = a.reject(&old).await.unwrap();
    assert_ne!(new, old);
    assert_eq!(b.reject(&old).await.unwrap(), new);
    assert_eq!(endpoint.fetches(), 2);
}

/// World: Redis stops under two caches, then starts again (empty). Proves: while it is
/// down each cache fetches on its own and every call succeeds; once it is back, the
/// caches share again without a restart.
#[tokio::test]
async fn redis_down_is_degraded_not_down_and_caches_rejoin() {
    let mut server = RedisServer::start();
    let endpoint = Endpoint::new(None);
    let cache = |store| {
        CredentialCache::builder(endpoint.clone())
            .store(store)
            .fetch_timeout(Duration::from_secs(2))
            .build()
            .unwrap()
    };
    let (store_a, store_b) = (
        redis_store(&server, "outage").await,
        redis_store(&server, "outage").await,
    );
    let a = cache(store_a.clone());
    let b = cache(store_b.clone());
    server.stop();
    a.credential().await.unwrap();
    b.credential().await.unwrap();
    assert_eq!(endpoint.fetches(), 2, "each fetched on its own");

    server.resume();
    // The connection managers reconnect on their own; wait until both answer.
    for store in [&store_a, &store_b] {
        let started = Instant::now();
        while store.load().await.is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "never rejoined"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let before = endpoint.fetches();
    let shared = a.reject(&a.credential().await.unwrap()).await.unwrap();
    assert!(b.handle().invalidate());
    assert_eq!(
        b.credential().await.unwrap(),
        shared,
        "b took a's new credential"
    );
    assert_eq!(endpoint.fetches(), before + 1);
}

/// Raw access to the test server, as an operator (or an attacker with the keys) has it.
async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The one credential key on the server.
async fn credential_key(server: &RedisServer) -> String {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("tca:*:credential")
        .query_async(&mut raw(server).await)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    keys.into_iter().next().unwrap()
}

/// World: the stored value replaced by garbage, by a value sealed under another key, by
/// plain text where the fleet encrypts, and by a value copied from another credential's
/// key. Proves: each counts as absent: never handed out, a fresh credential fetched and
/// saved over it (the next cache loads that one without fetching).
#[tokio::test]
async fn an_unreadable_value_is_absent_and_overwritten() {
    let server = RedisServer::start();
    let endpoint = Endpoint::new(None);
    let sealed = |store: RedisStore| store.encrypted([7; 32]);
    let cache = |store| {
        CredentialCache::builder(endpoint.clone())
            .store(store)
            .build()
            .unwrap()
    };
    // A first credential, saved sealed, and the key it lives under.
    let first = cache(sealed(redis_store(&server, "unreadable").await))
        .credential()
        .await
        .unwrap();
    let key = credential_key(&server).await;
    let good: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut raw(&server).await)
        .await
        .unwrap();
    assert!(
        good.starts_with("v1x:") && !good.contains("fleet-"),
        "{good}"
    );
    // What another credential's key would hold: the same form, bound to another name.
    let other = sealed(redis_store(&server, "another-client").await);
    let lease = other.lease(Duration::from_secs(5)).await.unwrap().unwrap();
    assert!(other.save(&lease, &first).await.unwrap());
    let copied: String = redis::cmd("GET")
        .arg(format!(
            "tca:{{{}}}:credential",
            other_id(&server, &key).await
        ))
        .query_async(&mut raw(&server).await)
        .await
        .unwrap();
    let plain = {
        let plain_store = redis_store(&server, "plain-writer").await;
        let lease = plain_store
            .lease(Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        assert!(plain_store.save(&lease, &first).await.unwrap());
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("tca:*:credential")
            .query_async(&mut raw(&server).await)
            .await
            .unwrap();
        let mut value = None;
        for k in keys {
            let v: String = redis::cmd("GET")
                .arg(&k)
                .query_async(&mut raw(&server).await)
                .await
                .unwrap();
            if v.starts_with("v1:") {
                value = Some(v);
            }
        }
        value.unwrap()
    };
    for (what, value, key_used) in [
        ("garbage", "v1x:00:%%%".to_owned(), [7; 32]),
        ("another version", "v9:00:{}".to_owned(), [7; 32]),
        ("sealed under another key", good.clone(), [9; 32]),
        ("plain text", plain, [7; 32]),
        ("copied from another key", copied, [7; 32]),
    ] {
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(&value)
            .query_async(&mut raw(&server).await)
            .await
            .unwrap();
        let before = endpoint.fetches();
        let store = redis_store(&server, "unreadable").await.encrypted(key_used);
        let got = cache(store.clone()).credential().await.unwrap();
        assert_ne!(got, first, "{what}: the unreadable value was handed out");
        assert_eq!(endpoint.fetches(), before + 1, "{what}");
        // Saved over it: the next cache of the fleet loads it without fetching.
        assert_eq!(cache(store).credential().await.unwrap(), got, "{what}");
        assert_eq!(endpoint.fetches(), before + 1, "{what}");
    }
}

/// The hash-tag id of the one credential key that is not `ours`.
async fn other_id(server: &RedisServer, ours: &str) -> String {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("tca:*:credential")
        .query_async(&mut raw(server).await)
        .await
        .unwrap();
    let other = keys.into_iter().find(|k| k != ours).unwrap();
    other
        .trim_start_matches("tca:{")
        .trim_end_matches("}:credential")
        .to_owned()
}

#[cfg(feature = "https")]
mod refresh_tokens {
    //! Rotating refresh tokens across the fleet, against a strict OAuth2 server that
    //! rotates every refresh token and revokes the whole family when one is presented twice.

    use super::*;
    use support::{
        providers::start,
        strict_idp::{Fault, StrictIdp},
    };
    use tower_client_auth::{
        ErrorKind,
        token::{StoreDownPolicy, TokenErrorKind, TokenSource},
    };

    const ID: &str = "fleet-client";
    const SECRET: &str = "fleet-secret";

    /// One process's source: client credentials to log in, the refresh grant after.
    fn source(base: &str) -> TokenSource {
        support::strict_idp::rotating_source(base, ID, SECRET)
    }

    /// World: 6 caches, each with its own source and Redis connection (as 6 processes
    /// have), 10 callers each, for 4 s on tokens that live 1 s, against a server that
    /// rotates refresh tokens and revokes the family on reuse. Proves: one login for the
    /// whole fleet, then refresh grants only, each refresh token presented once (no
    /// reuse, no revocation), and every call succeeds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rotating_refresh_token_has_one_owner_in_the_fleet() {
        let server = RedisServer::start();
        let idp = StrictIdp::new(ID, SECRET, 1.0);
        let base = start(idp.clone()).await;
        let mut caches = Vec::new();
        for _ in 0..6 {
            let store = redis_store(&server, "rotating").await.encrypted([3; 32]);
            caches.push(
                CredentialCache::builder(source(&base))
                    .store(store)
                    .build()
                    .unwrap(),
            );
        }
        let started = Instant::now();
        let failures = Arc::new(AtomicUsize::new(0));
        let mut callers = Vec::new();
        for cache in &caches {
            for _ in 0..10 {
                let (cache, failures) = (cache.clone(), failures.clone());
                callers.push(tokio::spawn(async move {
                    while started.elapsed() < Duration::from_secs(4) {
                        if cache.credential().await.is_err() {
                            failures.fetch_add(1, SeqCst);
                        }
                        tokio::time::sleep(Duration::from_millis(15)).await;
                    }
                }));
            }
        }
        for caller in callers {
            caller.await.unwrap();
        }
        assert_eq!(failures.load(SeqCst), 0);
        assert_eq!(
            idp.reused_refresh_tokens.load(SeqCst),
            0,
            "a refresh token was presented twice"
        );
        assert_eq!(idp.family_revocations.load(SeqCst), 0);
        assert_eq!(
            idp.logins.load(SeqCst),
            1,
            "more than one login for the fleet"
        );
        assert!(idp.refresh_grants.load(SeqCst) >= 2, "never refreshed");
    }

    /// World: two caches (two processes) on one Redis and a strict server. Cache A logs
    /// in; B takes A's pair from the store and refreshes it; A, its token rejected,
    /// takes B's from the store; then the API rejects that one too. Proves: A's source
    /// refreshes with the fleet's refresh token, and does not hand out the credential of
    /// its own last exchange instead: that one reached A's cache, which had rejected it
    /// already (and, had it expired meanwhile, the cache would have refused it and the
    /// fleet's refresh token would have been lost with it: a second login).
    #[tokio::test]
    async fn a_source_never_hands_back_a_credential_its_cache_has_had() {
        let server = RedisServer::start();
        let idp = StrictIdp::new(ID, SECRET, 60.0);
        let base = start(idp.clone()).await;
        let mut caches = Vec::new();
        for _ in 0..2 {
            let store = redis_store(&server, "handed-back").await;
            // Rejections of young credentials wait out only a short backoff.
            let cache = CredentialCache::builder(source(&base))
                .store(store)
                .backoff(Duration::from_millis(1), Duration::from_millis(2));
            caches.push(cache.build().unwrap());
        }
        let (a, b) = (&caches[0], &caches[1]);
        let pause = || tokio::time::sleep(Duration::from_millis(10));
        let first = a.credential().await.unwrap();
        assert_eq!(b.credential().await.unwrap(), first, "from the store");
        let second = b.reject(&first).await.unwrap();
        assert_ne!(second, first);
        pause().await;
        assert_eq!(a.reject(&first).await.unwrap(), second, "from the store");
        pause().await;
        let third = a.reject(&second).await.unwrap();
        assert_ne!(
            third, first,
            "handed back a credential the cache had rejected"
        );
        assert_ne!(third, second);
        assert_eq!(idp.logins.load(SeqCst), 1);
        assert_eq!(idp.refresh_grants.load(SeqCst), 2);
        assert_eq!(idp.reused_refresh_tokens.load(SeqCst), 0);
    }

    /// World: a fleet's refresh token in Redis, then Redis stops and the access token
    /// expires. Proves: the refresh token (which another process may hold) is not
    /// presented; by default the cache logs in again and serves; with
    /// `StoreDownPolicy::Fail` it fails with `StoreUnavailable`, nothing sent.
    #[tokio::test]
    async fn a_shared_refresh_token_is_never_presented_while_the_store_is_down() {
        for policy in [StoreDownPolicy::LogIn, StoreDownPolicy::Fail] {
            let mut server = RedisServer::start();
            let idp = StrictIdp::new(ID, SECRET, 3600.0);
            let base = start(idp.clone()).await;
            let cache = CredentialCache::builder(source(&base).when_store_is_down(policy))
                .store(redis_store(&server, "outage").await)
                .fetch_timeout(Duration::from_secs(2))
                .build()
                .unwrap();
            let first = cache.credential().await.unwrap();
            assert_eq!(idp.logins.load(SeqCst), 1);
            // A second fetch through the store: the refresh grant, under the lease.
            assert!(cache.handle().invalidate());
            assert_ne!(cache.credential().await.unwrap(), first);
            assert_eq!(idp.refresh_grants.load(SeqCst), 1);

            server.stop();
            assert!(cache.handle().invalidate());
            let result = cache.credential().await;
            assert_eq!(
                idp.refresh_grants.load(SeqCst),
                1,
                "{policy:?}: presented it"
            );
            assert_eq!(idp.reused_refresh_tokens.load(SeqCst), 0);
            match policy {
                StoreDownPolicy::LogIn => {
                    result.unwrap();
                    assert_eq!(idp.logins.load(SeqCst), 2);
                }
                _ => {
                    let err = result.unwrap_err();
                    assert_eq!(err.kind(), ErrorKind::Fetch, "{err}");
                    assert_eq!(
                        err.token_error().map(|e| e.kind()),
                        Some(TokenErrorKind::StoreUnavailable)
                    );
                    assert_eq!(idp.logins.load(SeqCst), 1);
                }
            }
        }
    }

    /// World: a fleet's refresh token in Redis; a refresh rotates it and, while the
    /// answer is on its way, Redis stops, to come back empty (as a Redis without
    /// persistence does). Proves: the rotated refresh token is neither lost nor replaced
    /// by the old one: this process serves with it, keeps trying to save it, and saves it
    /// once Redis answers; another process then refreshes with it. One login in all, no
    /// refresh token presented twice.
    #[tokio::test]
    async fn a_rotated_refresh_token_the_store_missed_is_saved_when_it_returns() {
        let mut server = RedisServer::start();
        let idp = StrictIdp::new(ID, SECRET, 3600.0);
        let base = start(idp.clone()).await;
        let cache = |store| {
            CredentialCache::builder(source(&base))
                .store(store)
                .fetch_timeout(Duration::from_secs(3))
                .build()
                .unwrap()
        };
        let a = cache(redis_store(&server, "durable").await);
        a.credential().await.unwrap();
        idp.push_fault(Fault::RotateThenDelay(Duration::from_millis(800)));
        assert!(a.handle().invalidate());
        let refreshing = tokio::spawn({
            let a = a.clone();
            async move { a.credential().await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.stop();
        let rotated = refreshing
            .await
            .unwrap()
            .expect("served with the rotated pair");
        assert_eq!(idp.refresh_grants.load(SeqCst), 1);
        server.resume();

        let store = redis_store(&server, "durable").await;
        let started = Instant::now();
        loop {
            match store.load().await {
                Ok(Some(stored)) if stored == rotated => {
                    assert!(
                        stored.refresh_token().is_some(),
                        "saved without its refresh token"
                    );
                    break;
                }
                _ => {
                    assert!(
                        started.elapsed() < Duration::from_secs(30),
                        "the rotated pair never reached the store"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let b = cache(store);
        assert_eq!(b.credential().await.unwrap(), rotated);
        assert_ne!(b.reject(&rotated).await.unwrap(), rotated);
        assert_eq!(
            idp.logins.load(SeqCst),
            1,
            "logged in again: the refresh token was lost"
        );
        assert_eq!(idp.refresh_grants.load(SeqCst), 2);
        assert_eq!(idp.reused_refresh_tokens.load(SeqCst), 0);
        assert_eq!(idp.family_revocations.load(SeqCst), 0);
    }

    /// A cache over a memory store, logged in against a strict server issuing tokens
    /// that live `ttl` seconds, whose next token request is throttled (429); the backoff
    /// is short.
    async fn logged_in_then_throttled(
        ttl: f64,
    ) -> (Arc<StrictIdp>, CredentialCache<TokenSource>, Credential) {
        let idp = StrictIdp::new(ID, SECRET, ttl);
        let base = start(idp.clone()).await;
        let cache = CredentialCache::builder(source(&base))
            .store(MemoryStore::new())
            .backoff(Duration::from_millis(100), Duration::from_millis(200))
            .build()
            .unwrap();
        let first = cache.credential().await.unwrap();
        idp.push_fault(Fault::Answer(Box::new(|_| {
            support::providers::reply(
                http::StatusCode::TOO_MANY_REQUESTS,
                serde_json::json!({"error": "slow_down"}),
            )
        })));
        (idp, cache, first)
    }

    /// World: a fleet's refresh token in the store; the refresh that takes it out is
    /// throttled (429: the server did not act on it), then the access token has expired.
    /// Proves: the refresh token the server never acted on is not lost with the failed
    /// exchange (the store no longer holds it: its holder took it out before presenting
    /// it): the next refresh presents it; no second login, nothing presented twice.
    #[tokio::test]
    async fn a_refresh_token_the_server_never_acted_on_is_kept() {
        let (idp, a, first) = logged_in_then_throttled(2.0).await;
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let throttled = a.credential().await.unwrap_err();
        assert_eq!(throttled.kind(), ErrorKind::Fetch);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let second = a.credential().await.expect("refreshed");
        assert_ne!(second, first);
        assert_eq!(
            idp.logins.load(SeqCst),
            1,
            "logged in again: the unspent refresh token was lost"
        );
        assert_eq!(idp.reused_refresh_tokens.load(SeqCst), 0);
        assert_eq!(idp.family_revocations.load(SeqCst), 0);
    }

    /// World: the API rejects the fleet's access token; the refresh that follows is
    /// throttled (429). Proves: the rejected access token is not served again from the
    /// store after the failed refresh (the holder left it there without its refresh
    /// token); the next refresh presents the unspent refresh token; one login in all.
    #[tokio::test]
    async fn a_rejected_credential_is_not_served_again_after_a_failed_refresh() {
        let (idp, a, first) = logged_in_then_throttled(3600.0).await;
        assert!(a.reject(&first).await.is_err(), "the refresh was throttled");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let second = a.credential().await.expect("refreshed");
        assert_ne!(
            second, first,
            "the rejected credential came back from the store"
        );
        assert_eq!(idp.logins.load(SeqCst), 1);
        assert_eq!(idp.reused_refresh_tokens.load(SeqCst), 0);
    }

    /// World: the fleet's refresh token is presented and the server rotates it, but its
    /// answer comes after the cache stopped waiting (a 1 s fetch timeout, a 1.5 s
    /// answer); the exchange ends in its own task. Proves: the next fetch hands out that
    /// late credential with its rotated refresh token, which reaches the store and is
    /// presented by the next refresh: one login in all, nothing presented twice.
    #[tokio::test]
    async fn a_late_rotation_keeps_its_refresh_token() {
        let idp = StrictIdp::new(ID, SECRET, 3600.0);
        let base = start(idp.clone()).await;
        let store = MemoryStore::new();
        let a = CredentialCache::builder(source(&base))
            .store(store.clone())
            .fetch_timeout(Duration::from_secs(1))
            .backoff(Duration::from_millis(100), Duration::from_millis(200))
            .build()
            .unwrap();
        a.credential().await.unwrap();
        idp.push_fault(Fault::RotateThenDelay(Duration::from_millis(1500)));
        assert!(a.handle().invalidate());
        let err = a.credential().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Timeout);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let late = a
            .credential()
            .await
            .expect("the late exchange's credential");
        assert_eq!(idp.refresh_grants.load(SeqCst), 1);
        let stored = store.load().await.unwrap().expect("saved");
        assert!(
            stored.refresh_token().is_some(),
            "the late exchange's rotated refresh token did not reach the store"
        );
        assert_ne!(a.reject(&late).await.unwrap(), late);
        assert_eq!(
            idp.logins.load(SeqCst),
            1,
            "logged in again: the rotated refresh token was lost"
        );
        assert_eq!(idp.reused_refresh_tokens.load(SeqCst), 0);
        assert_eq!(idp.family_revocations.load(SeqCst), 0);
    }

    /// World: a fleet's cache whose login pair (4 s) reaches its hard window; its refresh
    /// presents `rt-1` and is answered with an access token already expired and `rt-2`
    /// (refused: `Expired`), while the store refuses every pair; the old pair stays
    /// current meanwhile. Proves (review finding): the holder keeps `rt-2` with its lease
    /// and saves it once the store takes it (it is newer than the current pair's spent
    /// `rt-1`, not superseded by it); the next refresh presents it: one login in all.
    #[tokio::test(start_paused = true)]
    async fn a_refused_pair_is_kept_while_the_pair_it_replaces_is_current() {
        let (source, log) = super::first_refresh_expired(Duration::from_secs(4));
        let store = FaultStore::new();
        let cache = CredentialCache::builder(source)
            .store(store.clone())
            .backoff(Duration::from_millis(1), Duration::from_millis(2))
            .window_jitter(0.0)
            .build()
            .unwrap();
        let first = cache.credential().await.unwrap();
        store.faults().refusing_pairs.store(true, SeqCst);
        // Into the hard window: the refresh runs, its answer refused; the old pair, still
        // valid, is the answer.
        tokio::time::sleep(Duration::from_millis(3850)).await;
        assert_eq!(cache.credential().await.unwrap(), first);
        // The first retries of the save fail; then the store takes pairs again.
        tokio::time::sleep(Duration::from_millis(600)).await;
        store.faults().refusing_pairs.store(false, SeqCst);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(
            super::refresh_token_of(store.load().await.unwrap()),
            Some("rt-2".to_owned()),
            "the refused pair's refresh token was dropped"
        );
        let next = cache.credential().await.unwrap();
        assert_eq!(next, Credential::bearer("access-r2").unwrap());
        let log = log.lock().unwrap();
        assert_eq!(log.logins, 1, "logged in again: rt-2 was lost");
        assert_eq!(log.presented, ["rt-1", "rt-2"]);
    }

    /// World: a rotated pair the store refuses, then the cache holding it is dropped (its
    /// process shutting down) just as the store recovers. Proves: the pair gets one last
    /// save and the lease goes back, rather than the refresh token vanishing and the
    /// fleet waiting out the lease.
    #[tokio::test]
    async fn a_dropped_cache_saves_its_unsaved_pair_once_more() {
        let idp = StrictIdp::new(ID, SECRET, 3600.0);
        let base = start(idp.clone()).await;
        let store = FaultStore::new();
        let a = CredentialCache::builder(source(&base))
            .store(store.clone())
            .build()
            .unwrap();
        a.credential().await.unwrap();
        store.faults().refusing_pairs.store(true, SeqCst);
        assert!(a.handle().invalidate());
        let rotated = a.credential().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        store.faults().refusing_pairs.store(false, SeqCst);
        drop(a);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let stored = store.load().await.unwrap().expect("saved");
        assert_eq!(stored, rotated);
        assert!(
            stored.refresh_token().is_some(),
            "the rotated refresh token was lost"
        );
        assert!(store.lease_free().await, "the lease was not given back");
    }

    /// World: a rotated pair the store refuses for 8 s (it answers, but will not take a
    /// value carrying a refresh token), and meanwhile the credential is invalidated here.
    /// Proves: the holder keeps the refresh lease the whole time (another process probing
    /// every 100 ms never gets it, though each retry of the save is further apart than a
    /// lease lasts), keeps the rotated refresh token through the invalidation, and saves it
    /// once the store takes it, its access token marked expired (invalidated here, it is
    /// not the fleet's to send); another process then refreshes with it: one login in
    /// all, no refresh token presented twice.
    #[tokio::test]
    async fn a_refused_rotated_pair_keeps_its_lease_and_survives_an_invalidation() {
        let idp = StrictIdp::new(ID, SECRET, 3600.0);
        let base = start(idp.clone()).await;
        let store = FaultStore::new();
        let cache = |store: FaultStore| {
            CredentialCache::builder(source(&base))
                .store(store)
                .fetch_timeout(Duration::from_secs(3))
                .build()
                .unwrap()
        };
        let a = cache(store.clone());
        a.credential().await.unwrap();
        store.faults().refusing_pairs.store(true, SeqCst);
        assert!(a.handle().invalidate());
        let rotated = a.credential().await.expect("served with the rotated pair");
        assert_eq!(idp.refresh_grants.load(SeqCst), 1);

        // Another process looks for the lease every 100 ms for 8 s.
        let started = Instant::now();
        let mut invalidated = false;
        while started.elapsed() < Duration::from_secs(8) {
            if let Some(lease) = store.lease(Duration::from_millis(1)).await.unwrap() {
                store.release(&lease).await.unwrap();
                panic!(
                    "the refresh lease was free after {:?}: another process would log in",
                    started.elapsed()
                );
            }
            if !invalidated && started.elapsed() > Duration::from_secs(1) {
                // The access token is rejected here; the refresh token is still the newest.
                a.handle().invalidate();
                invalidated = true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        store.faults().refusing_pairs.store(false, SeqCst);
        let started = Instant::now();
        loop {
            match store.load().await.unwrap() {
                Some(stored) if stored.refresh_token().is_some() => {
                    assert_eq!(stored, rotated);
                    break;
                }
                _ => {
                    assert!(
                        started.elapsed() < Duration::from_secs(10),
                        "the rotated pair never reached the store"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        // Invalidated here: its access token was saved marked expired, and the other
        // process refreshes with its refresh token rather than send it.
        let b = cache(store.clone());
        assert_ne!(b.credential().await.unwrap(), rotated);
        assert_eq!(idp.refresh_grants.load(SeqCst), 2);
        assert_eq!(
            idp.logins.load(SeqCst),
            1,
            "logged in again: the refresh token was lost"
        );
        assert_eq!(idp.reused_refresh_tokens.load(SeqCst), 0);
        assert_eq!(idp.family_revocations.load(SeqCst), 0);
    }

    /// World: a rotated pair the store refuses (it answers, but will not take a value
    /// carrying a refresh token), kept under this process's lease to be saved; then the
    /// API rejects it here, or a plain credential handed in replaces it and the API
    /// rejects that. Proves (the eighth sitting's note: the rejection's flight waited for
    /// its own process's lease into `Timeout`): the flight takes the lease over from the
    /// task keeping the pair and refreshes with the kept refresh token at once; no login,
    /// no refresh token presented twice; once the store takes pairs it holds the newest
    /// pair, and the lease is given back.
    #[tokio::test]
    async fn a_kept_pair_is_refreshed_at_once_when_a_rejection_needs_one() {
        for replaced in [false, true] {
            let idp = StrictIdp::new(ID, SECRET, 3600.0);
            let base = start(idp.clone()).await;
            let store = FaultStore::new();
            let a = CredentialCache::builder(source(&base))
                .store(store.clone())
                .fetch_timeout(Duration::from_secs(2))
                .build()
                .unwrap();
            a.credential().await.unwrap();
            store.faults().refusing_pairs.store(true, SeqCst);
            assert!(a.handle().invalidate());
            let rotated = a.credential().await.expect("served with the rotated pair");
            assert_eq!(idp.refresh_grants.load(SeqCst), 1);
            let rejected = if replaced {
                let handed = Credential::bearer("handed-in").unwrap();
                assert!(a.handle().replace(handed.clone()).unwrap());
                handed
            } else {
                rotated.clone()
            };
            let next = a.reject(&rejected).await;
            let next = next.unwrap_or_else(|e| {
                panic!("replaced: {replaced}: the rejection's refresh failed: {e}")
            });
            assert!(next != rotated && next != rejected, "replaced: {replaced}");
            assert_eq!(
                idp.refresh_grants.load(SeqCst),
                2,
                "replaced: {replaced}: not refreshed with the kept refresh token"
            );
            assert_eq!(idp.logins.load(SeqCst), 1, "replaced: {replaced}");
            assert_eq!(idp.reused_refresh_tokens.load(SeqCst), 0);
            assert_eq!(idp.family_revocations.load(SeqCst), 0);

            store.faults().refusing_pairs.store(false, SeqCst);
            let started = Instant::now();
            while store.load().await.unwrap().as_ref() != Some(&next) || !store.lease_free().await {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "replaced: {replaced}: the newest pair never reached the store, or the \
                     lease was kept"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let stored = store.load().await.unwrap().unwrap();
            assert_eq!(stored.refresh_token(), next.refresh_token());
        }
    }
}

/// World: a real Redis that speaks only TLS, with a certificate made now, and no access
/// but for an ACL user limited to the store's keys and channels (`~tca:* &tca:*`).
/// Proves: through redis-rs's own TLS and AUTH (a client built with the test's root),
/// the whole contract holds, notifications included; a wrong password, no user, and
/// plain text to the TLS port are typed errors that never show the password.
#[cfg(feature = "redis-tls")]
#[tokio::test]
async fn tls_and_an_acl_user_through_the_client_crates_own_features() {
    use tower_client_auth::store::redis::redis_rs;

    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let dir = support::TempDir::new("redis-tls");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let port = support::redis::free_port();
    let port_text = port.to_string();
    let _server = RedisServer::start_with(
        port,
        &[
            "--port",
            "0",
            "--tls-port",
            &port_text,
            "--tls-cert-file",
            cert.to_str().unwrap(),
            "--tls-key-file",
            key.to_str().unwrap(),
            "--tls-ca-cert-file",
            cert.to_str().unwrap(),
            "--tls-auth-clients",
            "no",
            "--user",
            "default",
            "off",
            "--user",
            "fleet",
            "on",
            ">fleet-pass",
            "~tca:*",
            "&tca:*",
            "+@all",
            "--user",
            "elsewhere",
            "on",
            ">other-pass",
            "~other:*",
            "+@all",
        ],
    );
    let client = |url: String| {
        redis_rs::Client::build_with_tls(
            url,
            redis_rs::TlsCertificates {
                client_tls: None,
                root_cert: Some(certified.cert.pem().into_bytes()),
            },
        )
        .unwrap()
    };
    let url = format!("rediss://fleet:fleet-pass@127.0.0.1:{port}");
    let store = async || {
        RedisStore::from_client(client(url.clone()), "tls")
            .await
            .unwrap()
    };
    the_contract_holds(store().await, store().await).await;

    for (url, what) in [
        (
            format!("rediss://fleet:wrong-pass@127.0.0.1:{port}"),
            "a wrong password",
        ),
        (format!("rediss://127.0.0.1:{port}"), "no user"),
        (
            format!("rediss://elsewhere:other-pass@127.0.0.1:{port}"),
            "a user without the store's keys",
        ),
    ] {
        let err = RedisStore::from_client(client(url), "tls")
            .await
            .expect_err(what);
        let text = format!("{err} {err:?}");
        assert!(!text.contains("wrong-pass"), "{what}: {text}");
    }
    let plain = tokio::time::timeout(
        Duration::from_secs(20),
        RedisStore::connect(&format!("redis://fleet:fleet-pass@127.0.0.1:{port}"), "tls"),
    )
    .await
    .expect("plain text to a TLS port hung");
    let err = plain.expect_err("plain text to a TLS port");
    assert!(!format!("{err} {err:?}").contains("fleet-pass"));
}

/// World: real Redis servers with a memory limit under each kind of eviction policy,
/// one with a limit and `noeviction`, and one without a limit (the default).
/// Proves: connecting warns, naming the policy, exactly when the server may evict the
/// store's keys (a lost lease or refresh token would follow); the store works either way.
#[tokio::test]
async fn connecting_to_a_redis_that_may_evict_the_stores_keys_warns() {
    for (args, evicts) in [
        (
            &["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"][..],
            true,
        ),
        (
            &["--maxmemory", "64mb", "--maxmemory-policy", "volatile-ttl"][..],
            true,
        ),
        (
            &["--maxmemory", "64mb", "--maxmemory-policy", "noeviction"][..],
            false,
        ),
        (&["--maxmemory-policy", "allkeys-random"][..], false),
        (&[][..], false),
    ] {
        let server = RedisServer::start_with(support::redis::free_port(), args);
        let (capture, _guard) = support::capture_traces();
        let store = redis_store(&server, "evicting").await;
        let text = capture.text();
        let warned = text.contains("may evict the store's keys");
        assert_eq!(warned, evicts, "{args:?}: {text}");
        if evicts {
            assert!(
                text.contains(args[3]),
                "{args:?}: the policy is named: {text}"
            );
        }
        let lease = store.lease(Duration::from_secs(5)).await.unwrap().unwrap();
        let credential = Credential::bearer("kept").unwrap();
        assert!(store.save(&lease, &credential).await.unwrap(), "{args:?}");
        assert_eq!(store.load().await.unwrap(), Some(credential), "{args:?}");
    }
}

/// World: two processes on one store (two caches on one `MemoryStore`); A's refresh
/// presents the fleet's refresh token and the server takes 1.5 s to answer, past A's 1 s
/// fetch timeout (the token source's exchange goes on in its own task). B's own copy of
/// the access token is rejected half a second later, so B waits for A's lease. Proves:
/// A keeps the lease until its exchange ends and saves what it brought; B never logs in
/// meanwhile (one token request at a time in the fleet, one login in all), and the
/// fleet goes on with the refresh token A's late answer rotated.
#[cfg(feature = "https")]
#[tokio::test]
async fn a_lease_is_kept_while_its_exchange_outlives_the_fetch_timeout() {
    use support::{
        providers::start,
        strict_idp::{Fault, StrictIdp, rotating_source},
    };
    let idp = StrictIdp::new("fleet-client", "fleet-secret", 3600.0);
    let base = start(idp.clone()).await;
    let store = MemoryStore::new();
    let cache = || {
        CredentialCache::builder(rotating_source(&base, "fleet-client", "fleet-secret"))
            .store(store.clone())
            .fetch_timeout(Duration::from_secs(1))
            .backoff(Duration::from_millis(100), Duration::from_millis(200))
            .build()
            .unwrap()
    };
    let (a, b) = (cache(), cache());
    let first = a.credential().await.unwrap();
    assert_eq!(b.credential().await.unwrap(), first, "from the store");
    assert_eq!(idp.logins.load(SeqCst), 1);

    idp.push_fault(Fault::RotateThenDelay(Duration::from_millis(1500)));
    let started = Instant::now();
    let refreshing = tokio::spawn({
        let (a, first) = (a.clone(), first.clone());
        async move { a.reject(&first).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b_got = b.reject(&first).await;
    let b_done = started.elapsed();
    let _ = refreshing.await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        idp.logins.load(SeqCst),
        1,
        "B logged in {b_done:?} after A's refresh began (A's exchange answers at 1.5 s): \
         two token requests at once in the fleet, and a second login ({b_got:?})"
    );
    // The late answer was saved: both take it from the store, nobody logs in.
    let late = b.credential().await.unwrap();
    assert_ne!(late, first);
    assert_eq!(a.credential().await.unwrap(), late);
    assert_eq!(idp.logins.load(SeqCst), 1);
}

/// World: a lease holder's source answers after 1.5 s, past its 1 s fetch timeout (the
/// fetch goes on, under the lease, after its flight failed); the store then stops
/// answering, and the next flight of the same cache fetches on its own. Proves: it does
/// not ask the source while the late fetch still runs (never two fetches of one cache
/// at once).
#[tokio::test]
async fn a_late_fetch_under_the_lease_is_never_joined_by_a_second_one() {
    let endpoint = Endpoint::default();
    let source = {
        let endpoint = endpoint.clone();
        tower_client_auth::source_fn(move |_| {
            let endpoint = endpoint.clone();
            async move {
                let n = endpoint.fetches.fetch_add(1, SeqCst) + 1;
                let now = endpoint.in_flight.fetch_add(1, SeqCst) + 1;
                endpoint.max_in_flight.fetch_max(now, SeqCst);
                tokio::time::sleep(Duration::from_millis(1500)).await;
                endpoint.in_flight.fetch_sub(1, SeqCst);
                Credential::bearer(format!("token-{n}"))
            }
        })
    };
    let store = FaultStore::new();
    let cache = CredentialCache::builder(source)
        .store(store.clone())
        .fetch_timeout(Duration::from_secs(1))
        .backoff(Duration::from_millis(50), Duration::from_millis(100))
        .build()
        .unwrap();
    assert!(
        cache.credential().await.is_err(),
        "the first fetch timed out"
    );
    store.faults().lease_down.store(true, SeqCst);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let _ = cache.credential().await;
    assert_eq!(
        endpoint.max_in_flight.load(SeqCst),
        1,
        "the source was asked while the late fetch still ran"
    );
}

/// World: a lease holder's source panics (a bug in it), at once or after the fetch
/// timeout (in the fetch that goes on under the lease). Proves: the lease is given back
/// as soon as the panic is caught, not left for the fleet to wait out (its 3 s); the
/// caller gets `SourcePanicked`.
#[tokio::test]
async fn a_source_that_panics_under_the_lease_gives_it_back() {
    for after in [Duration::ZERO, Duration::from_millis(1200)] {
        let source = tower_client_auth::source_fn(move |_| async move {
            tokio::time::sleep(after).await;
            if true {
                panic!("a bug in the source");
            }
            Credential::bearer("never")
        });
        let store = FaultStore::new();
        let cache = CredentialCache::builder(source)
            .store(store.clone())
            .fetch_timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        let err = cache.credential().await.unwrap_err();
        let want = if after.is_zero() {
            tower_client_auth::ErrorKind::SourcePanicked
        } else {
            tower_client_auth::ErrorKind::Timeout
        };
        assert_eq!(err.kind(), want, "after {after:?}");
        // Past the panic (the late one ends 200 ms after the flight's deadline).
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            store.lease_free().await,
            "a source that panicked {after:?} into its fetch left the lease held"
        );
    }
}

/// A rotating source: its first exchange takes 1.5 s and brings `access-1` with `rt-1`;
/// each later one answers at once. Holds `alive` (a test watches it to see whether the
/// cache's source is still kept).
fn slow_first_rotating(alive: Arc<()>) -> impl CredentialSource {
    let fetches = Arc::new(AtomicUsize::new(0));
    tower_client_auth::source_fn(move |_cx: FetchContext| {
        let _alive = alive.clone();
        let n = fetches.fetch_add(1, SeqCst) + 1;
        async move {
            if n == 1 {
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
            Ok::<_, BoxError>(
                Credential::bearer(format!("access-{n}"))?.with_refresh_token(format!("rt-{n}")),
            )
        }
    })
}

/// A cache over `store` (refusing pairs) on `slow_first_rotating`, a 1 s fetch
/// timeout; its first request asked, timed out, and the late exchange ended (1.5 s)
/// with its save refused.
async fn a_late_pair_refused(
    store: &FaultStore,
    alive: &Arc<()>,
) -> CredentialCache<impl CredentialSource> {
    store.faults().refusing_pairs.store(true, SeqCst);
    let cache = CredentialCache::builder(slow_first_rotating(alive.clone()))
        .store(store.clone())
        .fetch_timeout(Duration::from_secs(1))
        .backoff(Duration::from_millis(50), Duration::from_millis(100))
        .build()
        .unwrap();
    let first = cache.credential().await;
    assert_eq!(
        first.unwrap_err().kind(),
        tower_client_auth::ErrorKind::Timeout
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    cache
}

/// World: a lease holder's rotating exchange outlives its 1 s fetch timeout; when it
/// ends (1.5 s) the store refuses the rotated pair (it answers, but will not take a
/// value with a refresh token). Proves (README, "One owner for a rotating refresh
/// token": the process serves with it, keeps the lease and tries the save again; review
/// finding: every request timed out, waiting for the lease its own process kept): the
/// next request is served with the rotated pair, without another exchange.
#[tokio::test]
async fn a_late_rotated_pair_the_store_refuses_is_served() {
    let alive = Arc::new(());
    let store = FaultStore::new();
    let cache = a_late_pair_refused(&store, &alive).await;
    let next = cache.credential().await.expect("served with the late pair");
    assert_eq!(next, Credential::bearer("access-1").unwrap());
    assert_eq!(next.refresh_token().map(|t| t.expose()), Some("rt-1"));
    // The save goes through once the store takes pairs again.
    store.faults().refusing_pairs.store(false, SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stored = store.load().await.unwrap().expect("saved");
    assert_eq!(stored.refresh_token().map(|t| t.expose()), Some("rt-1"));
}

/// World: as above; then the cache is dropped (its process shutting down). Proves
/// (README: a refused pair is saved once more by a cache being dropped, and the lease
/// goes back; review finding: the task kept the cache alive and renewed the lease for
/// as long as the store refused): 4 s after the drop the lease is free and the cache's
/// source is gone.
#[tokio::test]
async fn a_dropped_cache_stops_keeping_a_late_pair() {
    let alive = Arc::new(());
    let store = FaultStore::new();
    let cache = a_late_pair_refused(&store, &alive).await;
    drop(cache);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let lease = store.lease(Duration::from_millis(1)).await.unwrap();
    let source_alive = Arc::strong_count(&alive) > 1;
    assert!(
        lease.is_some() && !source_alive,
        "4 s after the cache was dropped: lease free: {}, its source still alive: {source_alive}",
        lease.is_some()
    );
}

/// A rotating source whose first exchange answers at once (`access-0`/`rt-0`, already in
/// its soft window), whose second takes 1.5 s (`access-1`/`rt-1`), the rest at once.
fn quick_then_slow_rotating(fetches: Arc<AtomicUsize>) -> impl CredentialSource {
    tower_client_auth::source_fn(move |cx: FetchContext| {
        let n = fetches.fetch_add(1, SeqCst);
        async move {
            if n == 1 {
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
            // Issued 85 s ago for 100 s: 15 s left, inside a 20 s soft window, outside
            // a 1 s hard window.
            let issued = cx.now() - Duration::from_secs(85);
            Ok::<_, BoxError>(
                Credential::bearer(format!("access-{n}"))?
                    .with_refresh_token(format!("rt-{n}"))
                    .lives(issued, Duration::from_secs(100)),
            )
        }
    })
}

/// World: the store refuses pairs from the moment a background refresh (soft window)
/// presents `rt-0`; its exchange outlives the 1 s fetch timeout and brings
/// `access-1`/`rt-1` at 1.5 s, while `access-0` is still current; the lease is kept to
/// save the pair. Then the API rejects `access-0`. Proves (review finding: the late pair
/// was kept for the next flight only when nothing was current, so the rejection's flight
/// waited for its own process's lease into `Timeout`): the replacement is `access-1`,
/// without another exchange.
#[tokio::test]
async fn a_late_pair_refused_while_a_credential_is_current_is_served_after_a_rejection() {
    let fetches = Arc::new(AtomicUsize::new(0));
    let store = FaultStore::new();
    let cache = support::store::windowed(quick_then_slow_rotating(fetches.clone()), store.clone());
    let access_0 = cache.credential().await.unwrap();
    assert_eq!(access_0, Credential::bearer("access-0").unwrap());
    store.faults().refusing_pairs.store(true, SeqCst);
    // In its soft window: served, and the background refresh starts.
    assert_eq!(cache.credential().await.unwrap(), access_0);
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(fetches.load(SeqCst), 2, "the late exchange ran");
    let next = cache.reject(&access_0).await;
    assert_eq!(
        next.as_ref().ok(),
        Some(&Credential::bearer("access-1").unwrap()),
        "{next:?} ({} fetches); the rotated pair existed only in the task saving it",
        fetches.load(SeqCst)
    );
}

/// A rotating source as strict as a real server about reuse: each refresh token it
/// presents is spent (one presented twice is counted and refused); with `expired` set,
/// its answers arrive already expired (its clock ahead of ours). Issues `aN`/`rtN`,
/// living 4 s.
#[derive(Clone, Default)]
struct Rotating {
    next: Arc<AtomicUsize>,
    spent: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    reused: Arc<AtomicUsize>,
    logins: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
    expired: Arc<std::sync::atomic::AtomicBool>,
}

impl Rotating {
    /// A cache of this source over `store`, with a 2 s fetch timeout.
    fn cache(&self, store: impl CredentialStore) -> CredentialCache<Rotating> {
        CredentialCache::builder(self.clone())
            .store(store)
            .fetch_timeout(Duration::from_secs(2))
            .build()
            .unwrap()
    }
}

impl CredentialSource for Rotating {
    async fn fetch(&self, cx: FetchContext) -> Result<Credential, BoxError> {
        use tower_client_auth::RefreshSharing;
        self.calls.fetch_add(1, SeqCst);
        match cx.refresh_sharing() {
            RefreshSharing::Shared(Some(token)) => {
                if !self.spent.lock().unwrap().insert(token.expose().to_owned()) {
                    self.reused.fetch_add(1, SeqCst);
                    return Err("invalid_grant: refresh token reused".into());
                }
            }
            _ => {
                self.logins.fetch_add(1, SeqCst);
            }
        }
        let n = self.next.fetch_add(1, SeqCst);
        let credential = Credential::bearer(format!("a{n}"))?.with_refresh_token(format!("rt{n}"));
        Ok(if self.expired.load(SeqCst) {
            credential.expires_at(std::time::SystemTime::now() - Duration::from_secs(1))
        } else {
            credential.expires_in(Duration::from_secs(4))
        })
    }
}

/// World: a store refusing pairs; a background refresh brings `a1`/`rt1` (current,
/// kept to be saved); then the server's answers arrive expired, and two more background
/// refreshes of `a1` each take the kept pair over, present its refresh token and bring a
/// pair refused on arrival (`rt2`, then `rt3`), kept in turn while `a1` stays current.
/// Proves (review finding: the task keeping `rt3` took `a1`'s older `rt1` for a newer
/// one and dropped `rt3`, and the fleet logged in again): `rt3` reaches the store once
/// it takes pairs, and the next refresh presents it.
#[tokio::test]
async fn a_chain_of_kept_pairs_keeps_the_newest() {
    let source = Rotating::default();
    let store = FaultStore::new();
    let a = CredentialCache::builder(source.clone())
        .store(store.clone())
        .fetch_timeout(Duration::from_secs(2))
        .soft_window(Duration::from_secs(3600))
        .hard_window(Duration::from_secs(1))
        .window_jitter(0.0)
        .backoff(Duration::from_millis(50), Duration::from_millis(100))
        .build()
        .unwrap();
    let calls = |n: usize| {
        let source = source.clone();
        async move {
            let started = Instant::now();
            while source.calls.load(SeqCst) < n {
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "fetch {n} never came"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // The flight ends: its save refused, the pair kept.
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    };
    assert_eq!(
        a.credential().await.unwrap(),
        Credential::bearer("a0").unwrap()
    );
    store.faults().refusing_pairs.store(true, SeqCst);
    // Into the soft window (the last quarter of 4 s): a background refresh.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    a.credential().await.unwrap();
    calls(2).await;
    let a1 = Credential::bearer("a1").unwrap();
    assert_eq!(a.credential().await.unwrap(), a1);
    // Into `a1`'s soft window: each request starts a background refresh.
    source.expired.store(true, SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(a.credential().await.unwrap(), a1);
    calls(3).await;
    assert_eq!(a.credential().await.unwrap(), a1);
    calls(4).await;
    source.expired.store(false, SeqCst);
    store.faults().refusing_pairs.store(false, SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        refresh_token_of(store.load().await.unwrap()).as_deref(),
        Some("rt3"),
        "the newest refresh token was lost"
    );
    a.handle().invalidate();
    a.credential().await.unwrap();
    assert_eq!(source.reused.load(SeqCst), 0);
    assert_eq!(
        source.logins.load(SeqCst),
        1,
        "the fleet had to log in again"
    );
}

/// World: `a1`/`rt1`'s save lands in the store but reports an error (its reply lost),
/// so the pair is kept under the lease as well; the store then refuses pairs; the API
/// rejects `a1`, and the load under the lease fails, so the rejection's flight presents
/// the kept `rt1` without seeing the store; `a2`/`rt2` is refused and kept; then the API
/// rejects `a2`. Proves (review finding: the flight after presented the store's `rt1`,
/// spent, rather than the kept `rt2`): a kept refresh token is taken out of the store
/// (its pair saved without it) before it is presented, and no refresh token is presented
/// twice.
#[tokio::test]
async fn a_kept_token_also_in_the_store_is_never_presented_twice() {
    let source = Rotating::default();
    let store = FaultStore::new();
    let a = source.cache(store.clone());
    let a0 = a.credential().await.unwrap();
    store.faults().lost_pair_replies.store(true, SeqCst);
    assert!(a.handle().invalidate());
    let a1 = a.credential().await.unwrap();
    assert_ne!(a0, a1);
    assert_eq!(store.load().await.unwrap().as_ref(), Some(&a1));
    store.faults().lost_pair_replies.store(false, SeqCst);
    store.faults().refusing_pairs.store(true, SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The flight's first load passes; the one under the lease fails.
    store.faults().passing_loads.store(1, SeqCst);
    store.faults().failing_loads.store(1, SeqCst);
    let a2 = a.reject(&a1).await.expect("refreshed with the kept rt1");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let _ = a.reject(&a2).await;
    assert_eq!(
        source.reused.load(SeqCst),
        0,
        "a spent refresh token presented again"
    );
    assert_eq!(source.logins.load(SeqCst), 1);
}

/// World: processes A and B, each on its own connection to one store. A's save of
/// `a1`/`rt1` lands though its reply is lost, so A keeps the pair under its lease; A's
/// connection goes down past the lease; B takes the lease, refreshes with the store's
/// `rt1` (spends it) and keeps `rt2` (its connection refuses pairs); A comes back; then
/// B's connection goes down past its own lease, and the API rejects `a1` at A. Proves
/// (review finding: A left `rt1` in its slot when it found the lease taken, and its next
/// flight, getting the lease afresh with no refresh token in the store, presented it):
/// a pair whose lease ran out is never presented: any of its saves may have landed and
/// been taken by another holder.
#[tokio::test]
async fn a_pair_whose_lease_ran_out_is_never_presented() {
    let source = Rotating::default();
    let memory = MemoryStore::default();
    let (sa, sb) = (
        FaultStore::over(memory.clone()),
        FaultStore::over(memory.clone()),
    );
    let (a, b) = (source.cache(sa.clone()), source.cache(sb.clone()));
    a.credential().await.unwrap();
    sa.faults().lost_pair_replies.store(true, SeqCst);
    assert!(a.handle().invalidate());
    let a1 = a.credential().await.unwrap();
    assert_eq!(memory.load().await.unwrap().as_ref(), Some(&a1));
    sa.faults().down.store(true, SeqCst);
    sb.faults().refusing_pairs.store(true, SeqCst);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    if b.credential().await.unwrap() == a1 {
        b.reject(&a1)
            .await
            .expect("B refreshed with the store's rt1");
    }
    sa.faults().down.store(false, SeqCst);
    sa.faults().lost_pair_replies.store(false, SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sb.faults().down.store(true, SeqCst);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let _ = a.reject(&a1).await;
    assert_eq!(
        source.reused.load(SeqCst),
        0,
        "a spent refresh token presented again"
    );
}

/// World: processes A and B, each on its own connection to one store (memory, then a
/// real Redis). A's save of `a1`/`rt1` lands though its reply is lost, so A keeps the
/// pair under its lease; A's connection goes down past the lease; B takes the lease,
/// takes `rt1` out of the store, refreshes with it and keeps `rt2` (its connection
/// refuses pairs); B's connection goes down past B's lease too; then A's comes back,
/// and A's task takes the free lease again; then B's comes back. Proves (the hole the
/// ninth sitting's note left: A's task found no refresh token in the store and saved
/// `rt1` there, B then found a refresh token in the store and gave `rt2` up, and the
/// fleet's next refresh presented `rt1` again): a kept pair is saved after its lease was
/// lost only over the store as its refresh left it; `rt2` reaches the store and the next
/// refresh presents it.
#[tokio::test]
async fn a_kept_pair_whose_save_was_taken_meanwhile_is_not_saved_again() {
    taken_meanwhile_in_memory_and_redis(Take::Rejected).await;
}

/// [`kept_pair_taken_meanwhile`] over memory and over a real Redis, the two worlds side
/// by side (each waits out leases for 12 s; nothing is shared but the runtime).
async fn taken_meanwhile_in_memory_and_redis(take: Take) {
    let memory = MemoryStore::default();
    let server = RedisServer::start();
    let redis = async || redis_store(&server, "taken-meanwhile").await;
    let (ra, rb, rlook) = (redis().await, redis().await, redis().await);
    tokio::join!(
        kept_pair_taken_meanwhile(memory.clone(), memory.clone(), memory, take, 0),
        kept_pair_taken_meanwhile(ra, rb, rlook, take, 0),
    );
}

/// How process B comes to take process A's pair out of the store.
#[derive(Clone, Copy, PartialEq)]
enum Take {
    /// The API rejects the pair's access token at B.
    Rejected,
    /// Its access token is in B's hard window: refreshed ahead of its expiry.
    AheadOfExpiry,
}

/// See [`a_kept_pair_whose_save_was_taken_meanwhile_is_not_saved_again`]: processes A
/// and B over `a` and `b`, B taking A's pair as `take` says, the first `failed_looks`
/// looks at the store A takes once back failing, and the store looked at through `look`.
async fn kept_pair_taken_meanwhile<S: CredentialStore + Clone>(
    a: S,
    b: S,
    look: S,
    take: Take,
    failed_looks: usize,
) {
    let source = Rotating::default();
    let (sa, sb) = (FaultStore::over(a), FaultStore::over(b));
    let a = source.cache(sa.clone());
    let b = match take {
        Take::Rejected => source.cache(sb.clone()),
        Take::AheadOfExpiry => CredentialCache::builder(source.clone())
            .store(sb.clone())
            .fetch_timeout(Duration::from_secs(2))
            .hard_window(Duration::from_secs(3))
            .build()
            .unwrap(),
    };
    a.credential().await.unwrap();
    sa.faults().lost_pair_replies.store(true, SeqCst);
    assert!(a.handle().invalidate());
    let a1 = a.credential().await.unwrap();
    assert_eq!(look.load().await.unwrap().as_ref(), Some(&a1));
    support::store::a_goes_down_and_b_refuses_pairs(&sa, &sb).await;
    if b.credential().await.unwrap() == a1 {
        match take {
            Take::Rejected => {
                b.reject(&a1)
                    .await
                    .expect("B refreshed with the store's rt1");
            }
            Take::AheadOfExpiry => {
                // Refreshed before it is served again.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = b.credential().await.unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
    assert_ne!(b.credential().await.unwrap(), a1, "B refreshed");
    assert_eq!(source.calls.load(SeqCst), 3, "B refreshed once");
    sa.faults().failing_loads.store(failed_looks, SeqCst);
    support::store::b_goes_down_then_both_come_back(&sa, &sb).await;
    let stored = look.load().await.unwrap();
    assert_eq!(
        stored
            .as_ref()
            .and_then(|c| c.refresh_token())
            .map(|t| t.expose()),
        Some("rt2"),
        "the store holds {:?}",
        stored.as_ref().map(shown)
    );
    let _ = a.reject(&a1).await;
    assert_eq!(
        source.reused.load(SeqCst),
        0,
        "a spent refresh token presented again"
    );
    assert_eq!(source.logins.load(SeqCst), 1);
}

/// A credential's header, refresh token and expiry, for a failure message.
fn shown(c: &Credential) -> String {
    let headers: Vec<_> = c
        .headers()
        .map(|(_, v)| v.to_str().unwrap_or("?").to_owned())
        .collect();
    format!(
        "{headers:?} rt={:?} expiry={:?}",
        c.refresh_token().map(|t| t.expose().to_owned()),
        c.expiry()
    )
}

/// Process B's first credential from `store`.
async fn process_b_gets(store: &FaultStore) -> Credential {
    CredentialCache::builder(Endpoint::default())
        .store(store.clone())
        .fetch_timeout(Duration::from_secs(1))
        .build()
        .unwrap()
        .credential()
        .await
        .unwrap()
}

/// World: process A's late rotated pair `access-1`/`rt-1`, refused by the store, is
/// kept to be saved; then A drops it: invalidated before it was served, or served and
/// then rejected. The store takes pairs again. Proves (review finding: the task saving
/// it saved it as it came, and process B took the access token A had dropped): B never
/// gets `access-1`. Invalidated, its refresh token is saved and its access token marked
/// expired; rejected, the rejection's refresh takes the pair over and A is answered at
/// once with the next pair (`rt-2`), which reaches the store.
#[tokio::test]
async fn a_late_pair_dropped_while_kept_is_saved_spent() {
    for rejected in [false, true] {
        let alive = Arc::new(());
        let store = FaultStore::new();
        let a = a_late_pair_refused(&store, &alive).await;
        let access_1 = Credential::bearer("access-1").unwrap();
        let newest = if rejected {
            let served = a.credential().await.expect("served with the late pair");
            assert_eq!(served, access_1);
            let next = a
                .reject(&served)
                .await
                .expect("refreshed with the kept pair");
            assert_eq!(next, Credential::bearer("access-2").unwrap());
            "rt-2"
        } else {
            assert!(a.handle().invalidate());
            "rt-1"
        };
        store.faults().refusing_pairs.store(false, SeqCst);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let stored = store.load().await.unwrap();
        assert_eq!(
            stored
                .as_ref()
                .and_then(|c| c.refresh_token())
                .map(|t| t.expose()),
            Some(newest),
            "rejected: {rejected}: the newest refresh token was lost"
        );
        let b_got = process_b_gets(&store).await;
        assert_ne!(
            b_got,
            access_1,
            "rejected: {rejected}: process B took the access token A dropped: {}",
            shown(&b_got)
        );
    }
}

/// World: a pair is handed over while a late exchange runs; the late pair comes after
/// it, refused by the store, and the task saving it gives it up (the cache holds a
/// newer refresh token: the handed-over pair's, kept in its place until the store takes
/// it); the store takes pairs again; process B takes the handed-over pair from the
/// store; the API rejects it. Proves (review finding: the given-up pair stayed kept as
/// the next answer): A does not answer with the pair it gave up; the handed-over pair
/// is the fleet's (it reaches the store, and B gets it).
#[tokio::test]
async fn a_late_pair_given_up_is_not_served() {
    let alive = Arc::new(());
    let store = FaultStore::new();
    store.faults().refusing_pairs.store(true, SeqCst);
    let a = CredentialCache::builder(slow_first_rotating(alive.clone()))
        .store(store.clone())
        .fetch_timeout(Duration::from_secs(1))
        .backoff(Duration::from_millis(50), Duration::from_millis(100))
        .build()
        .unwrap();
    let first = tokio::spawn({
        let a = a.clone();
        async move { a.credential().await }
    });
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let handed = Credential::bearer("handed")
        .unwrap()
        .with_refresh_token("rt-h");
    assert!(a.handle().replace(handed.clone()).unwrap());
    let _ = first.await.unwrap();
    // The late exchange ends at 1.5 s; the late pair's task gives way at its first look,
    // and the handed-over pair is kept under the lease until the store takes pairs.
    tokio::time::sleep(Duration::from_millis(800)).await;
    store.faults().refusing_pairs.store(false, SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(store.stored_refresh_token().await.as_deref(), Some("rt-h"));
    assert!(
        store.lease_free().await,
        "the lease was given back once saved"
    );
    assert_eq!(process_b_gets(&store).await, handed);
    let next = a.reject(&handed).await.unwrap();
    assert_ne!(
        next,
        Credential::bearer("access-1").unwrap(),
        "A served the pair it gave up ({})",
        shown(&next)
    );
    assert_eq!(next, Credential::bearer("access-2").unwrap());
}

/// World: as in `a_kept_pair_whose_save_was_taken_meanwhile_is_not_saved_again`, but B
/// refreshes ahead of expiry (`a1` in B's hard window) instead of after a rejection.
/// Proves (review finding: B's marker kept `a1`'s expiry, so Redis let it go with it,
/// A found an empty store and saved the spent `rt1`): a marker is saved expired, and
/// stays in every store until it is replaced; `rt2` reaches the store.
#[tokio::test]
async fn a_marker_left_by_a_refresh_ahead_of_expiry_stays() {
    taken_meanwhile_in_memory_and_redis(Take::AheadOfExpiry).await;
}

/// World: one process; the marker its refresh writes in place of `a0`/`rt0` lands
/// though the reply is lost, so it is told the store is unavailable and logs in; the
/// store refuses the new pair `a1`/`rt1`, which is kept; the lease is lost in an
/// outage. Proves (review finding: a marker whose save had no answer made the store
/// "unknown", and the process abandoned the fleet's only refresh token on finding its
/// own marker): a write without an answer leaves the store as it was or as written,
/// and `rt1` is saved when the store comes back.
#[tokio::test]
async fn a_marker_whose_save_had_no_answer_is_known_as_left() {
    let source = Rotating::default();
    let memory = MemoryStore::default();
    let sa = FaultStore::over(memory.clone());
    let a = source.cache(sa.clone());
    a.credential().await.unwrap();
    sa.faults().lost_marker_replies.store(true, SeqCst);
    sa.faults().refusing_pairs.store(true, SeqCst);
    assert!(a.handle().invalidate());
    a.credential().await.unwrap();
    assert_eq!(
        source.logins.load(SeqCst),
        2,
        "logged in: the store did not answer the marker's save"
    );
    let stored = memory.load().await.unwrap();
    assert_eq!(
        stored.and_then(|c| c.refresh_token().cloned()),
        None,
        "the marker landed"
    );
    sa.faults().lost_marker_replies.store(false, SeqCst);
    sa.faults().down.store(true, SeqCst);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    sa.faults().down.store(false, SeqCst);
    sa.faults().refusing_pairs.store(false, SeqCst);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(sa.stored_refresh_token().await.as_deref(), Some("rt1"));
}

/// Process A of a fresh [`Rotating`] over a fresh fault store, logged in (`a0`/`rt0`
/// in the store).
async fn a_logged_in() -> (Rotating, FaultStore, CredentialCache<Rotating>) {
    let source = Rotating::default();
    let store = FaultStore::new();
    let a = source.cache(store.clone());
    a.credential().await.unwrap();
    (source, store, a)
}

/// Process B of `source` over `store` starts and is not handed `dropped`, an access
/// token process A dropped.
async fn b_is_not_handed(source: &Rotating, store: &FaultStore, dropped: &Credential) {
    let got = source.cache(store.clone()).credential().await.unwrap();
    assert_ne!(
        &got,
        dropped,
        "B was handed the access token A dropped: {}",
        shown(&got)
    );
}

/// The pair `h`/`rt-h`, a session made elsewhere, to hand in.
fn pair_h() -> Credential {
    Credential::bearer("h").unwrap().with_refresh_token("rt-h")
}

/// World: process A logged in (`a0`/`rt0` in the store); a pair `h`/`rt-h` is handed in
/// (`replace`: a session made elsewhere); then process B over the same store needs a
/// refresh. Proves: the handed-in pair is the fleet's: it reaches the store, B takes
/// it, and B's refresh presents `rt-h`; no login but A's first.
#[tokio::test]
async fn a_pair_handed_in_reaches_the_store() {
    let (source, store, a) = a_logged_in().await;
    let handed = pair_h();
    assert!(a.handle().replace(handed.clone()).unwrap());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        store.stored_refresh_token().await.as_deref(),
        Some("rt-h"),
        "the handed-in pair never reached the store"
    );
    let b = source.cache(store.clone());
    assert_eq!(b.credential().await.unwrap(), handed);
    assert!(b.handle().invalidate());
    b.credential().await.unwrap();
    assert!(
        source.spent.lock().unwrap().contains("rt-h"),
        "B did not present rt-h"
    );
    assert_eq!(source.logins.load(SeqCst), 1);
    assert_eq!(source.reused.load(SeqCst), 0);
}

/// World: the store refuses pairs; A's refresh rotates `rt0` into `a1`/`rt1`, kept under
/// A's lease to be saved; then a pair `h`/`rt-h` is handed in; later the store takes
/// pairs again. Proves (helper-61's finding: the kept pair gave way to the handed-in
/// one, which never reached the store, and the fleet logged in again): the handed-in
/// pair, newer, takes the kept one's place and reaches the store; the next refresh
/// presents `rt-h`; one login in all.
#[tokio::test]
async fn a_pair_handed_in_over_a_kept_pair_reaches_the_store() {
    let (source, store, a) = a_logged_in().await;
    store.faults().refusing_pairs.store(true, SeqCst);
    assert!(a.handle().invalidate());
    a.credential().await.unwrap();
    let handed = pair_h();
    assert!(a.handle().replace(handed.clone()).unwrap());
    tokio::time::sleep(Duration::from_millis(600)).await;
    store.faults().refusing_pairs.store(false, SeqCst);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        store.stored_refresh_token().await.as_deref(),
        Some("rt-h"),
        "the fleet's refresh token was lost"
    );
    assert!(a.handle().invalidate());
    a.credential().await.unwrap();
    assert!(
        source.spent.lock().unwrap().contains("rt-h"),
        "rt-h was not presented"
    );
    assert_eq!(source.logins.load(SeqCst), 1, "logged in again");
    assert_eq!(source.reused.load(SeqCst), 0);
}

/// [`Rotating`] whose logins fail while `down` is set (a token endpoint that answers
/// 503 to the client-credentials grant), after `hang` (one that hangs first); refreshes
/// pass.
#[derive(Clone, Default)]
struct LoginsDown {
    source: Rotating,
    down: Arc<std::sync::atomic::AtomicBool>,
    hang: Duration,
}

impl CredentialSource for LoginsDown {
    async fn fetch(&self, cx: FetchContext) -> Result<Credential, BoxError> {
        use tower_client_auth::RefreshSharing;
        let login = !matches!(cx.refresh_sharing(), RefreshSharing::Shared(Some(_)));
        if login && self.down.load(SeqCst) {
            tokio::time::sleep(self.hang).await;
            return Err("503 Service Unavailable".into());
        }
        self.source.fetch(cx).await
    }
}

/// World: one process; the marker its refresh writes in place of `a0`/`rt0` lands
/// though the reply is lost, so it is told the store is unavailable and logs in; the
/// login fails (the token endpoint answers 503): at once, or after 2.5 s, past the 2 s
/// fetch timeout (the login goes on under the lease, late). Proves (the store held the
/// marker and nothing else: the fleet's only refresh token was lost, and the next
/// refresh logged in; the late case from review 66): `rt0`, taken out of the store and
/// never presented, goes back with its pair, and the lease with it; the next refresh
/// presents it; one login in all.
#[tokio::test]
async fn a_marker_whose_save_had_no_answer_then_a_failed_login_leave_the_refresh_token() {
    for hang in [Duration::ZERO, Duration::from_millis(2500)] {
        let source = LoginsDown {
            hang,
            ..LoginsDown::default()
        };
        let sa = FaultStore::new();
        let a = CredentialCache::builder(source.clone())
            .store(sa.clone())
            .fetch_timeout(Duration::from_secs(2))
            .backoff(Duration::from_millis(1), Duration::from_millis(1))
            .build()
            .unwrap();
        a.credential().await.unwrap();
        sa.faults().lost_marker_replies.store(true, SeqCst);
        source.down.store(true, SeqCst);
        assert!(a.handle().invalidate());
        a.credential().await.unwrap_err();
        sa.faults().lost_marker_replies.store(false, SeqCst);
        // A late login fails at 2.5 s; its task ends, and the lease goes back.
        tokio::time::sleep(hang.saturating_sub(Duration::from_secs(1))).await;
        source.down.store(false, SeqCst);
        assert!(sa.lease_free().await, "{hang:?}: the lease went back");
        assert_eq!(
            sa.stored_refresh_token().await.as_deref(),
            Some("rt0"),
            "{hang:?}: the refresh token taken out of the store and never presented is lost"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        a.credential().await.unwrap();
        assert!(source.source.spent.lock().unwrap().contains("rt0"));
        assert_eq!(
            source.source.logins.load(SeqCst),
            1,
            "{hang:?}: logged in again"
        );
    }
}

/// [`Rotating`] through an exchange that takes 300 ms.
#[derive(Clone, Default)]
struct SlowRotating(Rotating);

impl CredentialSource for SlowRotating {
    async fn fetch(&self, cx: FetchContext) -> Result<Credential, BoxError> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.0.fetch(cx).await
    }
}

/// World: process B's pair `a0`/`rt0` (4 s) is refreshed ahead of its expiry (in its
/// soft window, the last quarter) through a slow exchange, while B goes on serving
/// `a0`; process C starts during that exchange, over the same store. Proves (the cost
/// that README and `holding` state of always-expired markers): C is not handed `a0`
/// from the marker B left in the store, though `a0` is still valid; it waits for B's
/// refresh and gets `a1`; one login, one refresh.
#[tokio::test]
async fn a_process_starting_during_a_refresh_gets_its_pair_not_the_marker() {
    let source = SlowRotating::default();
    let memory = MemoryStore::default();
    let b = CredentialCache::builder(source.clone())
        .store(memory.clone())
        .fetch_timeout(Duration::from_secs(2))
        .window_jitter(0.0)
        .build()
        .unwrap();
    let a0 = b.credential().await.unwrap();
    // Asked until its soft window begins: the refresh is under way once the store holds
    // the marker (its refresh token taken out).
    let began = Instant::now();
    while memory
        .load()
        .await
        .unwrap()
        .unwrap()
        .refresh_token()
        .is_some()
    {
        assert!(began.elapsed() < Duration::from_secs(5), "no refresh ahead");
        assert_eq!(
            b.credential().await.unwrap(),
            a0,
            "served while it refreshes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = CredentialCache::builder(source.clone())
        .store(memory.clone())
        .fetch_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let got = c.credential().await.unwrap();
    assert_ne!(got, a0, "C was handed the marker's access token");
    assert_eq!(got, Credential::bearer("a1").unwrap());
    assert_eq!(source.0.logins.load(SeqCst), 1);
    assert_eq!(source.0.calls.load(SeqCst), 2);
}

/// [`Rotating`] whose next `slow` refreshes (logins are quick) each take `delay`.
#[derive(Clone, Default)]
struct SlowRefreshes {
    rotating: Rotating,
    slow: Arc<AtomicUsize>,
    delay: Duration,
}

impl SlowRefreshes {
    /// `cache`'s credential rejected in a task, whose refresh is slow: returns once that
    /// refresh is in the source.
    async fn a_slow_refresh(
        &self,
        cache: &CredentialCache<SlowRefreshes>,
    ) -> tokio::task::JoinHandle<Result<Credential, tower_client_auth::Error>> {
        let current = cache.credential().await.unwrap();
        self.slow.store(1, SeqCst);
        let refresh = tokio::spawn({
            let cache = cache.clone();
            async move { cache.reject(&current).await }
        });
        while self.slow.load(SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        refresh
    }
}

impl CredentialSource for SlowRefreshes {
    async fn fetch(&self, cx: FetchContext) -> Result<Credential, BoxError> {
        let refresh = matches!(
            cx.refresh_sharing(),
            tower_client_auth::RefreshSharing::Shared(Some(_))
        );
        if refresh && (self.slow.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))).is_ok() {
            tokio::time::sleep(self.delay).await;
        }
        self.rotating.fetch(cx).await
    }
}

/// A cache of `source` over a fault store of its own, with `fetch_timeout`.
fn over_a_fault_store<S: CredentialSource + Clone>(
    source: &S,
    fetch_timeout: Duration,
) -> (FaultStore, CredentialCache<S>) {
    let store = FaultStore::new();
    let cache = CredentialCache::builder(source.clone())
        .store(store.clone())
        .fetch_timeout(fetch_timeout)
        .build()
        .unwrap();
    (store, cache)
}

/// World: one process over a store; the API rejects `a0`, and the refresh that
/// presents `rt0` takes `refresh_takes` while the store is down from its start until
/// the lease has run out (no other process takes it), then answers again; the save of
/// `a1`/`rt1` is refused by the fence. Within the fetch timeout, or past it (a late
/// fetch, which ends on its own).
/// Proves (review of the tenth sitting's note: the rotated pair was dropped on a fenced
/// save, the store kept the marker, and the next refresh logged in, the only live
/// refresh token lost): the pair is kept, saved once the lease is taken again and the
/// store is as the refresh left it, and the next refresh presents `rt1`: one login,
/// no reuse.
async fn a_fenced_save(fetch_timeout: Duration, refresh_takes: Duration) {
    let source = SlowRefreshes {
        delay: refresh_takes,
        ..SlowRefreshes::default()
    };
    let (store, a) = over_a_fault_store(&source, fetch_timeout);
    let refresh = source.a_slow_refresh(&a).await;
    assert_eq!(store.stored_refresh_token().await, None, "rt0 taken out");
    store.faults().down.store(true, SeqCst);
    // The lease (3 s) runs out.
    tokio::time::sleep(Duration::from_millis(3300)).await;
    store.faults().down.store(false, SeqCst);
    let _ = refresh.await.unwrap();
    let began = Instant::now();
    while store.stored_refresh_token().await.as_deref() != Some("rt1") {
        assert!(
            began.elapsed() < Duration::from_secs(6),
            "{fetch_timeout:?}: rt1 never reached the store"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a1 = a.credential().await.unwrap();
    let _ = a.reject(&a1).await.expect("refreshed with rt1");
    assert_eq!(source.rotating.reused.load(SeqCst), 0, "{fetch_timeout:?}");
    assert_eq!(
        source.rotating.logins.load(SeqCst),
        1,
        "{fetch_timeout:?}: logged in again"
    );
    assert_eq!(store.stored_refresh_token().await.as_deref(), Some("rt2"));
}

/// See [`a_fenced_save`]: the refresh ends within the fetch timeout.
#[tokio::test]
async fn a_pair_whose_save_was_fenced_is_kept_and_saved() {
    a_fenced_save(Duration::from_secs(10), Duration::from_millis(4000)).await;
}

/// See [`a_fenced_save`]: the refresh ends past the fetch timeout (a late fetch).
#[tokio::test]
async fn a_late_pair_whose_save_was_fenced_is_kept_and_saved() {
    a_fenced_save(Duration::from_secs(2), Duration::from_millis(3600)).await;
}

/// [`Rotating`], but a fetch told the store is unavailable fails (a source that will
/// not log in beside a fleet).
#[derive(Clone, Default)]
struct FailsWhenDown(Rotating);

impl CredentialSource for FailsWhenDown {
    async fn fetch(&self, cx: FetchContext) -> Result<Credential, BoxError> {
        if cx.refresh_sharing() == tower_client_auth::RefreshSharing::StoreUnavailable {
            return Err("store unavailable".into());
        }
        self.0.fetch(cx).await
    }
}

/// Processes A and B over one memory store, each through a fault store of its own
/// (its connection), their caches of `source` with a 2 s fetch timeout and a short
/// backoff: the memory, A's and B's stores, A and B.
fn a_and_b_over_one_memory<S: CredentialSource + Clone>(
    source: &S,
) -> (
    MemoryStore,
    FaultStore,
    FaultStore,
    CredentialCache<S>,
    CredentialCache<S>,
) {
    let memory = MemoryStore::default();
    let (sa, sb) = (
        FaultStore::over(memory.clone()),
        FaultStore::over(memory.clone()),
    );
    let cache = |store: &FaultStore| {
        CredentialCache::builder(source.clone())
            .store(store.clone())
            .fetch_timeout(Duration::from_secs(2))
            .backoff(Duration::from_millis(50), Duration::from_millis(100))
            .build()
            .unwrap()
    };
    let (a, b) = (cache(&sa), cache(&sb));
    (memory, sa, sb, a, b)
}

/// World: processes A and B over one store. A keeps `a1`/`rt1` (the store refuses
/// pairs, under marker `a0`); A's own next refresh takes the pair over and writes its
/// marker, which lands though the reply is lost, and fails; the pair is handed back.
/// A's task then saves it: that save lands too, its reply lost. A's connection goes
/// down past the lease; B takes `rt1` out of the store (its own marker of `a1`, alike
/// A's to the byte but for the expiry) and spends it, and keeps `rt2` (its connection
/// refuses pairs); B's connection goes down past its lease; A's comes back, then B's.
/// Proves (review round, the case behind the rule that a marker of the kept pair
/// itself is never as left): A does not save the spent `rt1` over B's marker, `rt2`
/// reaches the store, and no refresh token is presented twice.
#[tokio::test]
async fn a_marker_of_the_kept_pair_itself_is_never_taken_as_left() {
    let source = FailsWhenDown::default();
    let (memory, sa, sb, a, b) = a_and_b_over_one_memory(&source);
    a.credential().await.unwrap();
    sa.faults().refusing_pairs.store(true, SeqCst);
    assert!(a.handle().invalidate());
    let a1 = a.credential().await.unwrap();
    sa.faults().lost_marker_replies.store(true, SeqCst);
    assert!(a.handle().invalidate());
    let _ = a.credential().await;
    let stored = memory.load().await.unwrap().unwrap();
    assert_eq!(stored, a1, "a1's marker landed");
    assert!(stored.refresh_token().is_none());
    sa.faults().lost_marker_replies.store(false, SeqCst);
    sa.faults().refusing_pairs.store(false, SeqCst);
    sa.faults().lost_pair_replies.store(true, SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stored = memory.load().await.unwrap().unwrap();
    assert_eq!(stored.refresh_token().map(|t| t.expose()), Some("rt1"));
    support::store::a_goes_down_and_b_refuses_pairs(&sa, &sb).await;
    if b.credential().await.unwrap() == a1 {
        b.reject(&a1).await.expect("B refreshed with rt1");
    }
    support::store::b_goes_down_then_both_come_back(&sa, &sb).await;
    assert_eq!(sa.stored_refresh_token().await.as_deref(), Some("rt2"));
    let _ = b.reject(&b.credential().await.unwrap()).await;
    assert_eq!(
        source.0.reused.load(SeqCst),
        0,
        "a spent refresh token presented again"
    );
}

/// World: as in [`a_kept_pair_whose_save_was_taken_meanwhile_is_not_saved_again`], over
/// memory, but the first look A's task takes at the store, once it has the lease again,
/// fails. Proves (review finding: the task kept the new lease and went round; the next
/// round's renewal answered, so the store was never looked at, and the spent `rt1` was
/// saved over B's marker): a pair whose lease was taken again is neither saved nor
/// presented before a look at the store answers.
#[tokio::test]
async fn a_kept_pair_is_saved_only_after_a_look_that_answers() {
    let memory = MemoryStore::default();
    let take = Take::Rejected;
    kept_pair_taken_meanwhile(memory.clone(), memory.clone(), memory, take, 1).await;
}

/// World: one process keeps `a1`/`rt1` (the store refuses pairs, under its marker of
/// `a0`); its connection goes down past the lease; when it comes back, the lease its
/// task takes again is taken, but the reply is lost. Proves (review finding: the task
/// then found the lease held, by its own lost lease, and abandoned `rt1`, which nobody
/// else ever saw, and the next refresh logged in): a lease held by another is waited
/// for, and the store, looked at once it is free, decides; `rt1` is saved.
#[tokio::test]
async fn a_kept_pair_waits_out_a_lease_it_took_without_an_answer() {
    let source = Rotating::default();
    let memory = MemoryStore::default();
    let sa = FaultStore::over(memory.clone());
    let a = source.cache(sa.clone());
    a.credential().await.unwrap();
    sa.faults().refusing_pairs.store(true, SeqCst);
    assert!(a.handle().invalidate());
    let a1 = a.credential().await.unwrap();
    sa.faults().down.store(true, SeqCst);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    sa.faults().lost_lease_replies.store(1, SeqCst);
    sa.faults().refusing_pairs.store(false, SeqCst);
    sa.faults().down.store(false, SeqCst);
    tokio::time::sleep(Duration::from_millis(6000)).await;
    assert_eq!(sa.stored_refresh_token().await.as_deref(), Some("rt1"));
    let _ = a.reject(&a1).await;
    assert_eq!(source.logins.load(SeqCst), 1, "logged in again");
}

/// Process A over a fault store of its own, with `fetch_timeout`, keeping `a1`/`rt1`:
/// logged in (`a0`/`rt0`, saved), then refreshed while the store refuses pairs, so the
/// store holds the marker of `a0` and A's task keeps trying to save the pair. Returns
/// the source, the store, A and `a1`.
async fn keeping_a1(
    fetch_timeout: Duration,
) -> (Rotating, FaultStore, CredentialCache<Rotating>, Credential) {
    let source = Rotating::default();
    let (store, a) = over_a_fault_store(&source, fetch_timeout);
    a.credential().await.unwrap();
    store.faults().refusing_pairs.store(true, SeqCst);
    assert!(a.handle().invalidate());
    let a1 = a.credential().await.unwrap();
    assert_eq!(a1, Credential::bearer("a1").unwrap());
    assert_eq!(store.stored_refresh_token().await, None, "kept, not saved");
    (source, store, a, a1)
}

/// World: one process keeps `a1`/`rt1` (the store refuses pairs); the application
/// invalidates `a1` (a dropped credential must not be sent again), the store takes pairs
/// again, and the cache is dropped (the process shuts down) before the task's next try.
/// Process B starts over the store. Proves (review helper-57: the last save saved the
/// pair as it was, and B was handed `a1`): the last save as a cache goes saves `rt1`
/// with its access token marked expired (the cache that could tell it was dropped is
/// gone), so B refreshes with `rt1` rather than send `a1`; no login. The task's own
/// saves do the same for a dropped pair (`a_late_pair_dropped_while_kept_is_saved_spent`).
#[tokio::test]
async fn a_cache_dropped_while_keeping_a_pair_hands_on_no_access_token_it_dropped() {
    let (source, store, a, a1) = keeping_a1(Duration::from_secs(2)).await;
    assert!(a.handle().invalidate(), "a1 dropped");
    store.faults().refusing_pairs.store(false, SeqCst);
    drop(a);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        store.stored_refresh_token().await.as_deref(),
        Some("rt1"),
        "the last save saved rt1"
    );
    let b = source.cache(store.clone());
    let got = b.credential().await.unwrap();
    assert_ne!(
        got,
        a1,
        "B was handed the access token A dropped: {}",
        shown(&got)
    );
    assert_eq!(source.logins.load(SeqCst), 1, "B refreshed with rt1");
}

/// World: one process keeps `a1`/`rt1` (the store refuses pairs, under its marker of
/// `a0`); its connection goes down past the lease; it comes back (taking pairs again),
/// and the API rejects `a1` before the saving task's next round. Proves (review
/// helper-57: the rejection's flight, finding the lease free, never asked for the kept
/// pair, found this process's own marker, logged in, and gave `rt1` up as spent): a
/// flight that takes the lease afresh takes the kept pair over once the store is as the
/// pair's refresh left it, and presents `rt1`; one login, no reuse.
#[tokio::test]
async fn a_flight_that_finds_the_lease_free_takes_the_kept_pair() {
    flight_finding_the_lease_free(0).await;
}

/// See [`a_flight_that_finds_the_lease_free_takes_the_kept_pair`]; the flight's look at
/// the kept pair under its new lease failing `failed_looks` times.
async fn flight_finding_the_lease_free(failed_looks: usize) {
    let (source, sa, a, a1) = keeping_a1(Duration::from_secs(2)).await;
    // The flight's first look passes; those at the kept pair fail.
    sa.faults().passing_loads.store(1, SeqCst);
    sa.faults().failing_loads.store(failed_looks, SeqCst);
    sa.outage_past_the_lease().await;
    let next = a.reject(&a1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        (source.logins.load(SeqCst), source.reused.load(SeqCst)),
        (1, 0),
        "logins, reuses: A answered {:?}; the store holds {:?}",
        next.as_ref().map(shown),
        sa.stored_refresh_token().await
    );
}

/// World: one process keeps `a1`/`rt1` (the store refuses pairs); its connection goes
/// down; the API rejects `a1` meanwhile, and the rejection's fetch, told the store is
/// unavailable, logs in (`a2`/`rt2`, never saved: an outage fetch is this process's
/// own). The connection comes back, taking pairs. Proves (review helper-57: the kept
/// pair's task took the outage login's `rt2` for proof that `rt1` was spent and gave it
/// up, and `rt2` never reached the store either): an outage fetch's refresh token is
/// dropped (`TokenSource` gives none then; this file's `Rotating` does), `rt1` is saved
/// once the store is back, and the next refresh presents it: no login past the outage's.
#[tokio::test]
async fn an_outage_login_does_not_make_a_kept_pair_spent() {
    let (source, sa, a, a1) = keeping_a1(Duration::from_secs(2)).await;
    sa.faults().down.store(true, SeqCst);
    let a2 = a
        .reject(&a1)
        .await
        .expect("logged in while the store is down");
    assert_eq!(source.logins.load(SeqCst), 2, "the outage's own login");
    sa.faults().refusing_pairs.store(false, SeqCst);
    sa.faults().down.store(false, SeqCst);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let stored = sa.load().await.unwrap();
    let _ = a.reject(&a2).await;
    assert_eq!(
        (source.logins.load(SeqCst), source.reused.load(SeqCst)),
        (2, 0),
        "logins, reuses: the store held {:?} once back",
        stored.as_ref().map(shown)
    );
}

/// World: one process keeps `a1`/`rt1` (the store refuses pairs) under its lease, over
/// the marker of `a0` its refresh left. The API rejects `a1`: the rejection's flight
/// takes the pair and the lease over, and its look at the store takes 3.5 s while its
/// renewals fail, so the lease runs out before it writes its own marker, which the
/// fence refuses. Then the store takes pairs again. Proves (review helper-57: the pair
/// handed back forgot what the store held as its refresh left it, so the marker of
/// `a0`, found once the lease was taken again, passed for another holder's, and `rt1`
/// was given up): the pair handed back keeps that record, is saved once the lease is
/// taken again, and the next refresh presents `rt1`: one login, no reuse.
#[tokio::test]
async fn a_kept_pair_handed_back_by_a_fenced_flight_is_saved() {
    let (source, store, a, a1) = keeping_a1(Duration::from_secs(16)).await;
    // The flight's first look is quick; the one under the lease is slow.
    store.delay_next_loads(&[Duration::ZERO, Duration::from_millis(3500)]);
    let rejected = tokio::spawn({
        let a = a.clone();
        async move { a.reject(&a1).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    store.faults().renew_down.store(true, SeqCst);
    tokio::time::sleep(Duration::from_millis(3400)).await;
    store.faults().renew_down.store(false, SeqCst);
    store.faults().refusing_pairs.store(false, SeqCst);
    let _ = rejected.await.unwrap();
    let began = Instant::now();
    while store.stored_refresh_token().await.as_deref() != Some("rt1") {
        assert!(
            began.elapsed() < Duration::from_secs(6),
            "rt1 never reached the store: {:?}",
            store.load().await.unwrap().as_ref().map(shown)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The failed flight's backoff passes first.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let current = a.credential().await.unwrap();
    let _ = a.reject(&current).await.expect("refreshed with rt1");
    assert_eq!(source.reused.load(SeqCst), 0);
    assert_eq!(source.logins.load(SeqCst), 1, "logged in again");
}

/// World: one process keeps `a1`/`rt1` (the store refuses pairs); its connection goes
/// down past the lease; it comes back, taking pairs, and the cache is dropped at once
/// (the process shuts down) before the saving task learns the lease was lost. Process B
/// starts over the store. Proves (review helper-57: the last save, refused by the fence
/// or never tried for a pair whose lease was lost, gave `rt1` up): the last save takes
/// the lease again and saves `rt1` over the store as the pair's refresh left it; B
/// refreshes with it: one login, no reuse.
#[tokio::test]
async fn a_cache_dropped_after_its_lease_was_lost_still_saves_its_pair() {
    let (source, store, a, _) = keeping_a1(Duration::from_secs(2)).await;
    store.outage_past_the_lease().await;
    drop(a);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(store.stored_refresh_token().await.as_deref(), Some("rt1"));
    let b = source.cache(store.clone());
    let got = b.credential().await.unwrap();
    assert_eq!(got, Credential::bearer("a2").unwrap(), "refreshed with rt1");
    assert_eq!(source.reused.load(SeqCst), 0);
    assert_eq!(source.logins.load(SeqCst), 1);
}

/// World: one process keeps `a1`/`rt1` (the store refuses pairs); the store takes pairs
/// again, but the saving task's save takes 2 s, and the application invalidates `a1`
/// while it is under way. Process B starts over the store once the save landed.
/// Proves (review helper-57: the task read whether the pair was dropped before its save
/// and not after, so the store kept `a1` as valid and B was handed it): B is not handed
/// the access token A dropped; it refreshes with `rt1`, no login, no reuse.
#[tokio::test]
async fn a_pair_dropped_while_its_save_is_under_way_is_saved_spent() {
    // Room for a 2 s save: a store call gets a quarter of the fetch timeout.
    let (source, store, a, a1) = keeping_a1(Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    store.delay_next_saves(&[Duration::from_millis(2000)]);
    store.faults().refusing_pairs.store(false, SeqCst);
    // The task's next try comes at 250 ms, and takes 2 s.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(store.stored_refresh_token().await, None, "not landed yet");
    assert!(a.handle().invalidate(), "a1 dropped");
    let began = Instant::now();
    while store.stored_refresh_token().await.as_deref() != Some("rt1") {
        assert!(began.elapsed() < Duration::from_secs(4), "rt1 never saved");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let b = source.cache(store.clone());
    let got = b.credential().await.unwrap();
    assert_ne!(got, a1, "B was handed the access token A dropped");
    assert_eq!(source.reused.load(SeqCst), 0);
    assert_eq!(source.logins.load(SeqCst), 1);
}

/// One process keeps `a1`/`rt1` (the store refuses pairs); its connection goes down
/// past the lease; it comes back (taking pairs), and the saving task takes the lease
/// again, but its looks at the store hang for a while (each times out); with
/// `drop_cache`, the cache is dropped meanwhile (the process shuts down) and the store
/// answers looks again at once. Then process B starts. Returns the store's refresh
/// token once things settled, the logins and the reuses.
async fn last_save_after_a_failed_look(drop_cache: bool) -> (Option<String>, usize, usize) {
    let (source, store, a, _) = keeping_a1(Duration::from_secs(2)).await;
    store.faults().down.store(true, SeqCst);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    // Back, taking pairs; but every look hangs for now (each times out after its
    // share, 500 ms).
    store.faults().loads.close();
    store.faults().refusing_pairs.store(false, SeqCst);
    store.faults().down.store(false, SeqCst);
    // The task's next round (within a third of the 3 s hold) takes the lease again; its
    // look does not answer.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!store.lease_free().await, "the task took the lease again");
    if drop_cache {
        // While a look of the task's is pending: once it times out, the task finds the
        // cache gone and makes its last save.
        store.faults().loads.arrived().await;
        drop(a);
        tokio::time::sleep(Duration::from_millis(550)).await;
    }
    // The store answers looks again.
    store.faults().loads.open();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let stored = store.stored_refresh_token().await;
    // Process B (after the lease, if left, ran out).
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let b = source.cache(store.clone());
    b.credential().await.unwrap();
    (
        stored,
        source.logins.load(SeqCst),
        source.reused.load(SeqCst),
    )
}

/// World: see [`last_save_after_a_failed_look`], the cache dropped. Proves (review
/// helper-58: the last save found the lease held, by the very lease its task had taken
/// again, and gave `rt1` up without a look; B logged in): the last save renews the
/// lease it holds, looks, and saves `rt1`, which B refreshes with: one login, no reuse.
#[tokio::test]
async fn a_cache_dropped_while_its_task_holds_a_retaken_lease_still_saves_its_pair() {
    let (stored, logins, reused) = last_save_after_a_failed_look(true).await;
    assert_eq!(reused, 0);
    assert_eq!(
        (stored.as_deref(), logins),
        (Some("rt1"), 1),
        "(store's refresh token after the cache was dropped, logins)"
    );
}

/// World: see [`last_save_after_a_failed_look`], the cache kept. Proves: the task's own
/// next look that answers saves `rt1`; one login, no reuse.
#[tokio::test]
async fn a_kept_pair_whose_retaken_lease_saw_looks_fail_is_saved_once_one_answers() {
    let (stored, logins, reused) = last_save_after_a_failed_look(false).await;
    assert_eq!(reused, 0);
    assert_eq!((stored.as_deref(), logins), (Some("rt1"), 1));
}

/// [`Rotating`] whose calls each wait the next of `delays` (none once they run out)
/// before the source acts; `started` counts calls as they come in.
#[derive(Clone, Default)]
struct Paced {
    rotating: Rotating,
    delays: Arc<std::sync::Mutex<std::collections::VecDeque<Duration>>>,
    started: Arc<AtomicUsize>,
}

impl CredentialSource for Paced {
    async fn fetch(&self, cx: FetchContext) -> Result<Credential, BoxError> {
        self.started.fetch_add(1, SeqCst);
        let delay = self.delays.lock().unwrap().pop_front();
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        self.rotating.fetch(cx).await
    }
}

/// Waits until `n` calls came into `source`.
async fn started(source: &Paced, n: usize) {
    let began = Instant::now();
    while source.started.load(SeqCst) < n {
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "call {n} never came"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One process, fetch timeout 2 s. The API rejects `a0`; the refresh presenting `rt0`
/// takes 3.6 s (a late fetch), and the store is down from its start until the lease has
/// run out (the rejection fails with `Timeout`). Then the late save takes `late_save`
/// (and is fenced), while a second flight logs in, its exchange taking `login`: returns
/// once that login is in the source, with the source, the store, the cache and the
/// second flight.
async fn a_late_refresh_then_a_login(
    login: Duration,
    late_save: Duration,
) -> (
    Paced,
    FaultStore,
    CredentialCache<Paced>,
    tokio::task::JoinHandle<Result<Credential, tower_client_auth::Error>>,
) {
    let source = Paced::default();
    let store = FaultStore::new();
    let a = CredentialCache::builder(source.clone())
        .store(store.clone())
        .fetch_timeout(Duration::from_secs(2))
        .backoff(Duration::from_millis(50), Duration::from_millis(100))
        .build()
        .unwrap();
    let a0 = a.credential().await.unwrap();
    source
        .delays
        .lock()
        .unwrap()
        .extend([Duration::from_millis(3600), login]);
    let first = tokio::spawn({
        let a = a.clone();
        async move { a.reject(&a0).await }
    });
    started(&source, 2).await;
    assert_eq!(store.stored_refresh_token().await, None, "rt0 taken out");
    store.faults().down.store(true, SeqCst);
    tokio::time::sleep(Duration::from_millis(3300)).await;
    store.faults().down.store(false, SeqCst);
    assert!(first.await.unwrap().is_err(), "the first flight timed out");
    store.delay_next_saves(&[late_save]);
    let second = tokio::spawn({
        let a = a.clone();
        async move { a.credential().await }
    });
    started(&source, 3).await;
    (source, store, a, second)
}

/// World: one process, fetch timeout 2 s. The API rejects `a0`; the refresh presenting
/// `rt0` takes 3.6 s (a late fetch), and the store is down from its start until the
/// lease has run out. The next flight takes the free lease, finds the marker of `a0` and
/// logs in (`a2`/`rt2`, installed; its save refused, so the pair is kept). The late
/// save of `a1`/`rt1` is slow and refused by the fence. Proves (review helper-58: the
/// fenced `rt1`, kept since 7522112, pushed `rt2` out of the slot and was then given up
/// as superseded by `a2`: both lost, and the fleet logged in again): a kept pair gives
/// way to a newer one rather than push it out; `rt2` reaches the store once it takes
/// pairs, and the next refresh presents it.
#[tokio::test]
async fn a_fenced_late_pair_gives_way_to_a_newer_kept_pair() {
    let (source, store, a, second) =
        a_late_refresh_then_a_login(Duration::from_millis(200), Duration::from_millis(450)).await;
    store.faults().refusing_pairs.store(true, SeqCst);
    let a2 = second.await.unwrap().expect("logged in");
    assert_eq!(a2, Credential::bearer("a2").unwrap());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    store.faults().refusing_pairs.store(false, SeqCst);
    let began = Instant::now();
    while store.stored_refresh_token().await.is_none() && began.elapsed() < Duration::from_secs(8) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored = store.stored_refresh_token().await;
    let _ = a.reject(&a2).await;
    assert_eq!(source.rotating.reused.load(SeqCst), 0);
    assert_eq!(
        (stored.as_deref(), source.rotating.logins.load(SeqCst)),
        (Some("rt2"), 2),
        "(the store's refresh token once it took pairs again, logins)"
    );
}

/// World: as in [`a_flight_that_finds_the_lease_free_takes_the_kept_pair`], but the look
/// the flight takes at the kept pair under its new lease fails once (the flight's first
/// look, and every later one, pass). Proves (review helper-58: the flight went on holding
/// the lease as if no pair were kept, found this process's own marker, logged in, and
/// the pair was given up): the flight hands its lease to the pair's task, which looks
/// again and saves `rt1`, and waits for it; one login, no reuse.
#[tokio::test]
async fn a_flight_whose_look_at_a_lost_kept_pair_fails_leaves_it_to_its_task() {
    flight_finding_the_lease_free(1).await;
}

/// World: one process keeps `a1`/`rt1`; its connection goes down past the lease; it
/// comes back, but every look at the store fails at once (an error reply, not a
/// timeout). Proves (review helper-58: a round whose look failed went round again with
/// no pause, since the next save's time lay in the past: 239,488 looks in 2 s): the task
/// waits between rounds, a few looks a second.
#[tokio::test]
async fn a_kept_pair_whose_looks_fail_waits_between_rounds() {
    let (_source, store, a, _) = keeping_a1(Duration::from_secs(2)).await;
    store.faults().down.store(true, SeqCst);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    const MANY: usize = 100_000_000;
    store.faults().failing_loads.store(MANY, SeqCst);
    store.faults().down.store(false, SeqCst);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let looks = MANY - store.faults().failing_loads.swap(0, SeqCst);
    assert!(looks < 50, "{looks} failed looks in 2 s");
    drop(a);
}

/// A store that counts the `renew` and `lease` calls made through it.
#[derive(Clone)]
struct Counting<S> {
    inner: S,
    calls: Arc<AtomicUsize>,
}

impl<S: CredentialStore> CredentialStore for Counting<S> {
    async fn load(&self) -> Result<Option<Credential>, BoxError> {
        self.inner.load().await
    }
    async fn lease(
        &self,
        ttl: Duration,
    ) -> Result<Option<tower_client_auth::store::Lease>, BoxError> {
        self.calls.fetch_add(1, SeqCst);
        self.inner.lease(ttl).await
    }
    async fn save(
        &self,
        lease: &tower_client_auth::store::Lease,
        credential: &Credential,
    ) -> Result<bool, BoxError> {
        self.inner.save(lease, credential).await
    }
    async fn renew(
        &self,
        lease: &tower_client_auth::store::Lease,
        ttl: Duration,
    ) -> Result<bool, BoxError> {
        self.calls.fetch_add(1, SeqCst);
        self.inner.renew(lease, ttl).await
    }
    async fn release(&self, lease: &tower_client_auth::store::Lease) -> Result<(), BoxError> {
        self.inner.release(lease).await
    }
    async fn remove(&self, rejected: &Credential) -> Result<(), BoxError> {
        self.inner.remove(rejected).await
    }
    async fn hold(&self, until: std::time::SystemTime) -> Result<(), BoxError> {
        self.inner.hold(until).await
    }
    async fn held_until(&self) -> Result<Option<std::time::SystemTime>, BoxError> {
        self.inner.held_until().await
    }
    async fn changed(&self, timeout: Duration) {
        self.inner.changed(timeout).await
    }
}

/// World: one process keeps `a1`/`rt1`; its connection goes down past the lease; another
/// process takes the lease and holds it 3 s. Proves (review helper-58: the task waited
/// the other holder out with no pause, 1,296,640 renew and lease calls in 2 s): it
/// waits between rounds, a few calls a second.
#[tokio::test]
async fn a_kept_pair_waits_between_rounds_while_another_holds_the_lease() {
    let source = Rotating::default();
    let memory = MemoryStore::default();
    let fault = FaultStore::over(memory.clone());
    let counting = Counting {
        inner: fault.clone(),
        calls: Arc::default(),
    };
    let a = source.cache(counting.clone());
    a.credential().await.unwrap();
    fault.faults().refusing_pairs.store(true, SeqCst);
    assert!(a.handle().invalidate());
    a.credential().await.unwrap();
    fault.faults().down.store(true, SeqCst);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    // Another process holds the lease for 3 s.
    let _held = memory.lease(Duration::from_secs(3)).await.unwrap().unwrap();
    fault.faults().down.store(false, SeqCst);
    let before = counting.calls.load(SeqCst);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let calls = counting.calls.load(SeqCst) - before;
    assert!(
        calls < 50,
        "{calls} renew/lease calls in 2 s while another held the lease"
    );
    drop(a);
}

/// World: one process; the API rejects `a0`; the refresh presenting `rt0` takes 4 s while
/// the store is down until the lease ran out; then another process takes the lease (held
/// 3 s), and the save of `a1`/`rt1` is refused by the fence. Proves (review helper-58:
/// the fenced pair, kept unchecked since 7522112, waited the other holder out with no
/// pause): the task waits between rounds there too.
#[tokio::test]
async fn a_fenced_pair_waits_between_rounds_while_another_holds_the_lease() {
    let source = SlowRefreshes {
        delay: Duration::from_millis(4000),
        ..SlowRefreshes::default()
    };
    let memory = MemoryStore::default();
    let fault = FaultStore::over(memory.clone());
    let counting = Counting {
        inner: fault.clone(),
        calls: Arc::default(),
    };
    let a = CredentialCache::builder(source.clone())
        .store(counting.clone())
        .fetch_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let refresh = source.a_slow_refresh(&a).await;
    fault.faults().down.store(true, SeqCst);
    tokio::time::sleep(Duration::from_millis(3300)).await;
    // Another process takes the free lease, for 3 s.
    let _held = memory.lease(Duration::from_secs(3)).await.unwrap().unwrap();
    fault.faults().down.store(false, SeqCst);
    let _ = refresh.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = counting.calls.load(SeqCst);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let calls = counting.calls.load(SeqCst) - before;
    assert!(
        calls < 20,
        "{calls} renew/lease calls in 1 s while another held the lease"
    );
}

/// World: one process keeps `a1`/`rt1`; its connection goes down past the lease; it
/// comes back taking pairs, and the API rejects `a1` at an offset swept across the
/// saving task's one-second round (ten runs at once). Proves: whichever takes the lease
/// first, the flight or the task taking it again, no refresh token is presented twice
/// and the fleet does not log in again.
#[tokio::test]
async fn a_flight_racing_the_kept_pairs_task_for_the_lease_loses_no_refresh_token() {
    let runs: Vec<_> = (0..10)
        .map(|i| {
            tokio::spawn(async move {
                let offset = Duration::from_millis(i * 110);
                let (source, store, a, a1) = keeping_a1(Duration::from_secs(2)).await;
                store.outage_past_the_lease().await;
                tokio::time::sleep(offset).await;
                let next = a.reject(&a1).await;
                tokio::time::sleep(Duration::from_millis(2500)).await;
                let current = a.credential().await.unwrap();
                let _ = a.reject(&current).await;
                (
                    offset,
                    source.logins.load(SeqCst),
                    source.reused.load(SeqCst),
                    next.is_ok(),
                    store.stored_refresh_token().await,
                )
            })
        })
        .collect();
    let mut bad = Vec::new();
    for run in runs {
        let (offset, logins, reused, answered, stored) = run.await.unwrap();
        if reused != 0 || logins != 1 {
            bad.push((offset, logins, reused, answered, stored));
        }
    }
    assert!(
        bad.is_empty(),
        "(offset, logins, reuses, answered, stored): {bad:?}"
    );
}

/// World: processes A and B on one store. A's refresh presenting `rt0` is late (3.6 s,
/// fetch timeout 2 s) and A's connection is down until its lease ran out; B takes the
/// lease, finds the marker of `a0` and logs in (its pair saved). A's late `a1`/`rt1` is
/// fenced and kept unchecked. Proves: once A's task looks, it finds B's pair and gives
/// `rt1` up; no reuse, and the fleet goes on with B's pair.
#[tokio::test]
async fn a_fenced_late_pair_gives_way_to_another_processs_login() {
    let source = Paced::default();
    let (memory, sa, _, a, b) = a_and_b_over_one_memory(&source);
    let a0 = a.credential().await.unwrap();
    source
        .delays
        .lock()
        .unwrap()
        .push_back(Duration::from_millis(3600));
    let first = tokio::spawn({
        let a = a.clone();
        async move { a.reject(&a0).await }
    });
    started(&source, 2).await;
    sa.faults().down.store(true, SeqCst);
    tokio::time::sleep(Duration::from_millis(3100)).await;
    // B starts: the store holds the marker of a0 and the lease is free.
    let got_b = b.credential().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    sa.faults().down.store(false, SeqCst);
    let _ = first.await.unwrap();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let got_a = a.credential().await.unwrap();
    let stored = memory.load().await.unwrap();
    let _ = b.reject(&got_b).await;
    let _ = a.reject(&got_a).await;
    assert_eq!(
        source.rotating.reused.load(SeqCst),
        0,
        "A {} B {} stored {:?}",
        shown(&got_a),
        shown(&got_b),
        stored.as_ref().map(shown)
    );
    assert_eq!(source.rotating.logins.load(SeqCst), 2, "A's first, B's");
}

/// World: as in [`a_fenced_late_pair_gives_way_to_a_newer_kept_pair`], but the login that follows the late refresh brings `a2`/`rt2` expired on arrival
/// (refused, never installed: its flight failed, so the two flights began at the same
/// generation). Its save is refused too, so `rt2` is kept (under the login's lease, held
/// and renewed); then the late `a1`/`rt1`'s save is fenced and kept. Proves (review
/// helper-59: on the tie the late pair pushed `rt2` out of the slot and its lease was
/// left held): the pair kept first stays, `rt2` reaches the store once it takes pairs,
/// and the lease the late pair had goes back.
#[tokio::test]
async fn a_late_pair_as_new_as_a_kept_one_gives_way_to_it() {
    let (source, store, _a, second) =
        a_late_refresh_then_a_login(Duration::from_millis(200), Duration::from_millis(450)).await;
    // The login's answer arrives expired (refused on arrival), and its save is refused.
    source.rotating.expired.store(true, SeqCst);
    store.faults().refusing_pairs.store(true, SeqCst);
    let second = second.await.unwrap();
    assert!(second.is_err(), "the login's pair was refused on arrival");
    source.rotating.expired.store(false, SeqCst);
    // The late save (450 ms) is fenced meanwhile.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let lease_free_after_the_late_pair_was_kept = store.lease_free().await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    store.faults().refusing_pairs.store(false, SeqCst);
    let began = Instant::now();
    while store.stored_refresh_token().await.is_none() && began.elapsed() < Duration::from_secs(8) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored = store.stored_refresh_token().await;
    assert_eq!(source.rotating.reused.load(SeqCst), 0);
    assert_eq!(
        (stored.as_deref(), source.rotating.logins.load(SeqCst)),
        (Some("rt2"), 2),
        "(the store's refresh token once it took pairs again, logins); lease free 600 ms after: {lease_free_after_the_late_pair_was_kept}"
    );
}

/// World: one process keeps `a1`/`rt1` (the store refuses pairs); its
/// connection goes down past the lease; it comes back (taking pairs), but the saving
/// task's looks fail, so it holds the lease it took again, unchecked. Right after one
/// of its rounds, the cache is dropped (the process shuts down): the last save renews
/// that lease, and its look hangs (`hang_the_look`) or answers. Proves (review
/// helper-59: the last save renewed the lease for 3 s, ran out of its second in the
/// look, and never gave the lease back; B waited it out): 1.2 s after the last save's
/// look began the lease is free, and B is not made to wait out a lease nobody holds.
async fn last_save_with_a_slow_look(hang_the_look: bool) {
    let (source, store, a, _) = keeping_a1(Duration::from_secs(2)).await;
    store.faults().down.store(true, SeqCst);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    const MANY: usize = 1_000_000;
    store.faults().failing_loads.store(MANY, SeqCst);
    store.faults().refusing_pairs.store(false, SeqCst);
    store.faults().down.store(false, SeqCst);
    // Two of the task's looks fail (the lease taken again, then renewed).
    while MANY - store.faults().failing_loads.load(SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        !store.lease_free().await,
        "the task holds the lease taken again"
    );
    // A permit left by earlier loads is used up.
    let _ = tokio::time::timeout(Duration::ZERO, store.faults().loads.arrived()).await;
    if hang_the_look {
        store.faults().loads.close();
    }
    store.faults().failing_loads.store(0, SeqCst);
    drop(a);
    let dropped = Instant::now();
    store.faults().loads.arrived().await;
    let look = Instant::now();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let free = store.lease_free().await;
    store.faults().loads.open();
    let b = source.cache(store.clone());
    let began = Instant::now();
    let got = b.credential().await;
    assert!(
        free,
        "the lease is still held 1.2 s after the last save's look began ({:?} after the drop); \
         B then waited {:?} and got {:?}; logins {}",
        look - dropped,
        began.elapsed(),
        got.as_ref().map(shown),
        source.logins.load(SeqCst)
    );
    assert!(got.is_ok());
}

/// See [`last_save_with_a_slow_look`]: the look hangs.
#[tokio::test]
async fn a_last_save_whose_look_hangs_gives_the_lease_back_within_its_second() {
    last_save_with_a_slow_look(true).await;
}

/// See [`last_save_with_a_slow_look`]: the look answers.
#[tokio::test]
async fn a_last_save_whose_look_answers_gives_the_lease_back() {
    last_save_with_a_slow_look(false).await;
}

/// As [`flight_finding_the_lease_free`], with a 300 ms fetch timeout (hold 1.45 s): the
/// rejection's flight finds the lease free, and its look at the kept pair fails
/// `failed_looks` times (the store answers otherwise). Proves (review helper-59: the
/// flight handed its lease to the pair's task, which looked only at its next round, a
/// third of the hold later, past the flight's deadline: `Timeout`): the task is woken
/// at once, and the rejection is answered with a credential; one login, no reuse.
async fn lease_free_with_a_short_timeout(failed_looks: usize) {
    let (source, sa, a, a1) = keeping_a1(Duration::from_millis(300)).await;
    sa.faults().passing_loads.store(1, SeqCst);
    sa.faults().failing_loads.store(failed_looks, SeqCst);
    sa.outage_past_the_lease().await;
    let began = Instant::now();
    let next = a.reject(&a1).await;
    let took = began.elapsed();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        (source.logins.load(SeqCst), source.reused.load(SeqCst)),
        (1, 0),
        "logins, reuses"
    );
    assert!(
        next.is_ok(),
        "the rejection answered {:?} after {took:?} (the store healthy but for one look)",
        next.as_ref().map(shown)
    );
}

/// See [`lease_free_with_a_short_timeout`]: one look fails.
#[tokio::test]
async fn a_short_timeout_flight_whose_look_fails_once_still_gets_a_credential() {
    lease_free_with_a_short_timeout(1).await;
}

/// See [`lease_free_with_a_short_timeout`]: the look answers.
#[tokio::test]
async fn a_short_timeout_flight_whose_look_answers_gets_a_credential() {
    lease_free_with_a_short_timeout(0).await;
}

/// World: as in [`a_fenced_late_pair_gives_way_to_a_newer_kept_pair`], in the other
/// order: the late `a1`/`rt1`'s save is fenced first (kept, and this
/// process's unsaved late answer), then the login that followed brings `a2`/`rt2`
/// expired on arrival (refused, never installed; its save refused too, kept). The
/// application then asks for a credential while the store still refuses pairs; then the
/// store takes pairs again, and the API rejects the credential A serves.
/// Proves (review helper-59: the login pair pushed the late one out of the slot, which
/// stayed this process's unsaved answer and was served, then the login pair's task
/// found itself superseded: both lost, a third login): the fleet keeps one of the two
/// refresh tokens, no login past the second.
#[tokio::test]
async fn a_late_pair_kept_first_stays_and_answers_and_no_refresh_token_is_lost() {
    let (source, store, a, second) =
        a_late_refresh_then_a_login(Duration::from_millis(400), Duration::from_millis(100)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The login's answer arrives expired; its save is refused.
    source.rotating.expired.store(true, SeqCst);
    store.faults().refusing_pairs.store(true, SeqCst);
    assert!(
        second.await.unwrap().is_err(),
        "the login's pair was refused on arrival"
    );
    source.rotating.expired.store(false, SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The application asks while the store still refuses pairs.
    let served = a.credential().await;
    let served = format!("A served {:?}", served.as_ref().map(shown));
    pairs_taken_again_then_one_refresh(&source, &store, &a, &served).await;
}

/// After the late-refresh-then-login world (see [`a_late_refresh_then_a_login`]): the
/// store takes pairs again 1.5 s on, and 4 s later the API rejects what A serves.
/// Asserts no refresh token was presented twice and the fleet logged in twice only (its
/// first login and the second flight's), `what` saying what happened before.
async fn pairs_taken_again_then_one_refresh(
    source: &Paced,
    store: &FaultStore,
    a: &CredentialCache<Paced>,
    what: &str,
) {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    store.faults().refusing_pairs.store(false, SeqCst);
    tokio::time::sleep(Duration::from_millis(4000)).await;
    let stored = store.stored_refresh_token().await;
    let current = a.credential().await.unwrap();
    let next = a.reject(&current).await;
    assert_eq!(source.rotating.reused.load(SeqCst), 0);
    assert_eq!(
        source.rotating.logins.load(SeqCst),
        2,
        "logged in again: {what}; A then served {}; the store then held {stored:?}; the \
         next refresh answered {:?}",
        shown(&current),
        next.as_ref().map(shown)
    );
}

/// A source whose credentials live 1 s from `FetchContext::now`, stamped as the docs
/// tell a source to stamp them.
#[derive(Clone, Default)]
struct StampedOneSecond(Arc<AtomicUsize>);

impl CredentialSource for StampedOneSecond {
    async fn fetch(&self, cx: FetchContext) -> Result<Credential, BoxError> {
        let n = self.0.fetch_add(1, SeqCst);
        Ok(Credential::bearer(format!("s{n}"))?.lives(cx.now(), Duration::from_secs(1)))
    }
}

/// World: another process holds the refresh lease for 1.5 s and saves nothing (it
/// died); process A needs a credential meanwhile, waits for that lease, takes it over
/// and asks its source, whose credentials live 1 s from `FetchContext::now`. Proves
/// (found by the fleet-interleavings soak, seeds 1106 and 1118: `now` was read as the
/// flight began, so a credential stamped with it had lived the wait already and came
/// expired, failing every request waiting for it): `now` is the wall clock as the source
/// is asked, and A gets a credential with its whole second.
#[tokio::test]
async fn a_source_asked_after_a_wait_for_the_lease_stamps_its_credential_then() {
    let memory = MemoryStore::default();
    let _held = memory
        .lease(Duration::from_millis(1500))
        .await
        .unwrap()
        .unwrap();
    let a = CredentialCache::builder(StampedOneSecond::default())
        .store(memory.clone())
        .fetch_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let began = Instant::now();
    let got = a.credential().await.expect("a credential after the wait");
    assert!(began.elapsed() >= Duration::from_millis(1400), "waited");
    let left = got
        .expiry()
        .unwrap()
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    assert!(left > Duration::from_millis(800), "{left:?} left of 1 s");
}

/// World: as in [`a_late_pair_kept_first_stays_and_answers_and_no_refresh_token_is_lost`],
/// but the login that follows the late refresh answers normally: `a2`/`rt2` is
/// installed (its save refused, so `rt2` is kept). The late `a1`/`rt1` was fenced and
/// kept first: the two flights began at the same generation. Then the store takes pairs
/// again, and the API rejects what A serves. Proves (review helper-60: `rt2`, the
/// installed one, gave way to `rt1` on the tie, and `rt1` was then given up as
/// superseded by `a2`: both lost, a third login): on a tie the pair that the installed
/// credential supersedes is pushed out; `rt2` is saved, no login past the second.
#[tokio::test]
async fn a_late_pair_kept_first_gives_way_to_an_installed_login_of_the_same_generation() {
    let (source, store, a, second) =
        a_late_refresh_then_a_login(Duration::from_millis(400), Duration::from_millis(100)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    store.faults().refusing_pairs.store(true, SeqCst);
    let a2 = second.await.unwrap().expect("logged in");
    let answered = format!("the login answered {}", shown(&a2));
    pairs_taken_again_then_one_refresh(&source, &store, &a, &answered).await;
}

/// World (review 61): one process keeps `a1`/`rt1` (the store refuses pairs), with an
/// 8 s fetch timeout (a store call's share: 2 s); its connection goes down past the
/// lease, and another process B takes the lease as it comes back (and saves nothing).
/// The API rejects `a1`: the rejection's flight waits for B's lease. 1.7 s before that
/// flight's deadline the saving task's renewal hangs (its round holds the kept-pair
/// slot until the renewal's share runs out); B gives the lease back just then. The
/// flight takes the free lease, and waits for the slot to look at the kept pair, past
/// its deadline. Proves or breaks: a flight that cannot look at the kept pair in time
/// does not refresh as if none were kept (it finds this process's own marker, logs in,
/// and `rt1`, the fleet's only refresh token, is given up as spent).
#[tokio::test]
async fn a_flight_out_of_time_waiting_for_the_kept_pair_does_not_log_in() {
    let source = Rotating::default();
    let (memory, sa, a) = a_over_memory(&source);
    a.credential().await.unwrap();
    sa.faults().refusing_pairs.store(true, SeqCst);
    assert!(a.handle().invalidate());
    let a1 = a.credential().await.unwrap();
    assert_eq!(a1, Credential::bearer("a1").unwrap());
    // The outage: A's lease (3 s) runs out; B takes the lease as the store comes back.
    sa.faults().down.store(true, SeqCst);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let b_lease = memory
        .lease(Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    sa.faults().down.store(false, SeqCst);
    // The task learns its lease is gone (and waits for B's).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let began = Instant::now();
    let rejected = tokio::spawn({
        let a = a.clone();
        async move { a.reject(&a1).await }
    });
    // 1.7 s before the flight's deadline, renewals hang; the task's next one comes
    // within a second.
    tokio::time::sleep(Duration::from_millis(6300)).await;
    sa.faults().renews.close();
    let _ = tokio::time::timeout(Duration::ZERO, sa.faults().renews.arrived()).await;
    sa.faults().renews.arrived().await;
    let arrived = began.elapsed();
    memory.release(&b_lease).await.unwrap();
    let answer = rejected.await.unwrap();
    let answered = began.elapsed();
    sa.faults().renews.open();
    sa.faults().refusing_pairs.store(false, SeqCst);
    tokio::time::sleep(Duration::from_millis(4000)).await;
    let stored = sa.stored_refresh_token().await;
    assert!(
        arrived > Duration::from_millis(6300) && arrived < Duration::from_millis(7500),
        "the task's renewal came {arrived:?} after the rejection"
    );
    assert_eq!(
        (source.logins.load(SeqCst), source.reused.load(SeqCst)),
        (1, 0),
        "(logins, reuses): the rejection answered {:?} after {answered:?} (the task's \
         renewal hung from {arrived:?}); the store then held {stored:?}",
        answer.as_ref().map(shown)
    );
}

/// World (review 61): processes A and B over one store, each call of A's taking 1 ms (a
/// network round trip), A's fetch timeout 8 s (a store call's share: 2 s). B holds the
/// refresh lease (its exchange under way). The API rejects A's `a0`: A's flight waits
/// for B's lease; 1.5 s before its deadline A's loads turn slow (each would take 10 s),
/// so the flight's next look runs into its deadline. Proves or breaks: a flight out of
/// time while another holder holds the lease fails with `Timeout`; it does not take its
/// own deadline for a store that does not answer and log in beside the holder (two
/// token requests at once in one fleet).
#[tokio::test]
async fn a_flight_out_of_time_waiting_for_another_holder_does_not_log_in() {
    let WaitingForB {
        source,
        sa,
        a: _a,
        b_lease: _b_lease,
        rejected,
        began,
        ..
    } = a_rejection_while_b_holds_the_lease().await;
    sa.faults().round_trip_ms.store(1, SeqCst);
    tokio::time::sleep(Duration::from_millis(6500)).await;
    sa.delay_next_loads(&[Duration::from_secs(10); 4]);
    let answer = rejected.await.unwrap();
    let answered = began.elapsed();
    assert_eq!(
        source.logins.load(SeqCst),
        1,
        "logged in while B held the lease: the rejection answered {:?} after {answered:?}",
        answer.as_ref().map(shown)
    );
}

/// World (review 61): one process keeps `a1`/`rt1` (the store refuses pairs), with an
/// 8 s fetch timeout (a store call's share: 2 s); its connection goes down past the
/// lease; when it comes back the saving task takes the lease again, but its looks fail,
/// so the pair stays unchecked. The API rejects `a1`: the rejection's flight waits for
/// that lease. 1.7 s before its deadline the looks answer again: the task's look finds
/// the store as left, and the flight takes the pair over; the marker it writes takes
/// 1.9 s (within a store call's share), which runs past the flight's deadline.
/// Proves or breaks: the flight's own deadline is not taken for a store that did not
/// answer the marker's save: it does not log in and give `rt1` up (the fleet logs in
/// once, and no refresh token is presented twice).
#[tokio::test]
async fn a_kept_pair_taken_over_near_the_deadline_is_not_given_up_for_a_login() {
    let (source, store, a, a1) = keeping_a1(Duration::from_secs(8)).await;
    store.faults().down.store(true, SeqCst);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    const MANY: usize = 1_000_000;
    store.faults().failing_loads.store(MANY, SeqCst);
    store.faults().down.store(false, SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!store.lease_free().await, "the task took the lease again");
    let began = Instant::now();
    let rejected = tokio::spawn({
        let a = a.clone();
        async move { a.reject(&a1).await }
    });
    tokio::time::sleep(Duration::from_millis(6300)).await;
    // The marker's save (pairs are refused before they wait) takes 1.9 s.
    store.delay_next_saves(&[Duration::from_millis(1900)]);
    store.faults().failing_loads.store(0, SeqCst);
    let answer = rejected.await.unwrap();
    let answered = began.elapsed();
    store.faults().refusing_pairs.store(false, SeqCst);
    tokio::time::sleep(Duration::from_millis(6000)).await;
    let stored = store.stored_refresh_token().await;
    let current = a.credential().await.unwrap();
    let next = a.reject(&current).await;
    assert_eq!(
        (source.logins.load(SeqCst), source.reused.load(SeqCst)),
        (1, 0),
        "(logins, reuses): the rejection answered {:?} after {answered:?}; the store then \
         held {stored:?}; the next refresh answered {:?}",
        answer.as_ref().map(shown),
        next.as_ref().map(shown)
    );
}

/// World: processes A and B over one store, A's fetch timeout 8 s (a store call's share:
/// 2 s). B holds the refresh lease. The API rejects A's `a0`: A's flight waits for B's
/// lease. 1.5 s before its deadline B gives the lease up without a save; the flight
/// takes it, and its first look under the lease takes 1.8 s (within a store call's
/// share, past the flight's deadline). Proves: the flight's own deadline is not taken
/// for a store that does not answer that look: it does not log in under the lease (over
/// the store's pair, whose refresh token would be abandoned): one login in all, no
/// refresh token presented twice, and the store keeps a live refresh token.
#[tokio::test]
async fn a_flight_taking_the_lease_near_its_deadline_looks_before_it_logs_in() {
    let WaitingForB {
        source,
        sa,
        a: _a,
        rejected,
        began,
        ..
    } = a_flight_waiting_for_bs_lease_until(Duration::from_millis(6500)).await;
    // That look passes at once, and the next (under the lease) takes 1.8 s.
    sa.delay_next_loads(&[Duration::ZERO, Duration::from_millis(1800)]);
    sa.faults().loads.open();
    let answer = rejected.await.unwrap();
    let answered = began.elapsed();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let stored = sa.stored_refresh_token().await;
    assert_eq!(
        (source.logins.load(SeqCst), source.reused.load(SeqCst)),
        (1, 0),
        "(logins, reuses): the rejection answered {:?} after {answered:?}; the store then \
         held {stored:?}",
        answer.as_ref().map(shown)
    );
    assert!(
        matches!(stored.as_deref(), Some("rt0" | "rt1")),
        "the store held {stored:?}"
    );
}

/// World (review 64): processes A and B over one store, A's fetch timeout 8 s (a store
/// call's share: 2 s). B holds the refresh lease; the API rejects A's `a0`, and A's
/// flight waits for B's lease. 0.5 s before the deadline B gives the lease up; A takes
/// it, finds `a0`/`rt0` and writes its marker, which takes 1.9 s (its own share, past
/// the deadline); the source answers at once, and the save of `a1`/`rt1` takes 1.9 s
/// too. Breaks: no caller waits past the fetch timeout plus one store share (10 s).
#[tokio::test]
async fn a_marker_saved_past_the_deadline_leaves_the_caller_one_share_at_most() {
    let WaitingForB {
        source,
        sa,
        a: _a,
        rejected,
        began,
        ..
    } = a_flight_waiting_for_bs_lease_until(Duration::from_millis(7500)).await;
    // The marker's save, then the pair's.
    sa.delay_next_saves(&[Duration::from_millis(1900), Duration::from_millis(1900)]);
    sa.faults().loads.open();
    let answer = rejected.await.unwrap();
    let answered = began.elapsed();
    assert!(
        answered <= Duration::from_millis(10_200),
        "the caller waited {answered:?} (fetch timeout 8 s, share 2 s); answered {:?}",
        answer.as_ref().map(shown)
    );
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(
        (source.logins.load(SeqCst), source.reused.load(SeqCst)),
        (1, 0),
        "(logins, reuses)"
    );
    assert_eq!(sa.stored_refresh_token().await.as_deref(), Some("rt1"));
}

/// World (review 64): as in
/// [`a_marker_saved_past_the_deadline_leaves_the_caller_one_share_at_most`], but the save
/// of `a1`/`rt1` answers at once and the lease's release does not answer (cut at its
/// share). Breaks: no caller waits past the fetch timeout plus one store share (10 s).
#[tokio::test]
async fn a_marker_saved_past_the_deadline_then_a_slow_release_overruns_one_share_at_most() {
    let WaitingForB {
        source,
        sa,
        a: _a,
        rejected,
        began,
        ..
    } = a_flight_waiting_for_bs_lease_until(Duration::from_millis(7500)).await;
    sa.delay_next_saves(&[Duration::from_millis(1900)]);
    sa.faults().releases.close();
    sa.faults().loads.open();
    let answer = rejected.await.unwrap();
    let answered = began.elapsed();
    sa.faults().releases.open();
    assert!(
        answered <= Duration::from_millis(10_200),
        "the caller waited {answered:?} (fetch timeout 8 s, share 2 s); answered {:?}",
        answer.as_ref().map(shown)
    );
    assert_eq!(
        (source.logins.load(SeqCst), source.reused.load(SeqCst)),
        (1, 0),
        "(logins, reuses)"
    );
}

/// Process A of a [`Rotating`] source over a fault store of its own (see
/// [`a_over_memory`]: an 8 s fetch timeout), `a0` fetched; process B holds the refresh
/// lease (its exchange under way); the API rejects `a0`, and A's flight waits for B's
/// lease (in a task not yet polled when this returns).
struct WaitingForB {
    source: Rotating,
    memory: MemoryStore,
    sa: FaultStore,
    a: CredentialCache<Rotating>,
    b_lease: tower_client_auth::store::Lease,
    rejected: tokio::task::JoinHandle<Result<Credential, tower_client_auth::Error>>,
    began: Instant,
}

/// See [`WaitingForB`].
async fn a_rejection_while_b_holds_the_lease() -> WaitingForB {
    let source = Rotating::default();
    let (memory, sa, a) = a_over_memory(&source);
    let a0 = a.credential().await.unwrap();
    let b_lease = memory
        .lease(Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    let began = Instant::now();
    let rejected = tokio::spawn({
        let a = a.clone();
        async move { a.reject(&a0).await }
    });
    WaitingForB {
        source,
        memory,
        sa,
        a,
        b_lease,
        rejected,
        began,
    }
}

/// [`WaitingForB`], until `at`: then A's next look waits at the closed loads valve, and
/// B gives the lease up without a save: the look passes when the caller opens the valve.
async fn a_flight_waiting_for_bs_lease_until(at: Duration) -> WaitingForB {
    let world = a_rejection_while_b_holds_the_lease().await;
    tokio::time::sleep(at).await;
    world.sa.faults().loads.close();
    world.sa.faults().loads.arrived().await;
    world.memory.release(&world.b_lease).await.unwrap();
    world
}

/// Process A of `source` over a fault store over a memory (returned for process B's
/// calls), with an 8 s fetch timeout (a store call's share: 2 s).
fn a_over_memory(source: &Rotating) -> (MemoryStore, FaultStore, CredentialCache<Rotating>) {
    let memory = MemoryStore::default();
    let sa = FaultStore::over(memory.clone());
    let a = CredentialCache::builder(source.clone())
        .store(sa.clone())
        .fetch_timeout(Duration::from_secs(8))
        .build()
        .unwrap();
    (memory, sa, a)
}

// ---- A pair handed in: review 66 ----

/// World: process A logged in (`a0`/`rt0` in the store); a pair `h`/`rt-h` is handed in
/// (`replace`), and the application invalidates `h` at once (a dropped credential must
/// not be sent again). A does not refresh yet. Process B starts over the store. Proves
/// (review66): B is never handed the access token A dropped, as for a kept pair dropped
/// here (`a_late_pair_dropped_while_kept_is_saved_spent`); `rt-h` still reaches the store.
#[tokio::test]
async fn a_pair_handed_in_then_invalidated_is_not_handed_to_b() {
    let (source, store, a) = a_logged_in().await;
    let handed = pair_h();
    assert!(a.handle().replace(handed.clone()).unwrap());
    assert!(a.handle().invalidate(), "h dropped");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(store.stored_refresh_token().await.as_deref(), Some("rt-h"));
    b_is_not_handed(&source, &store, &handed).await;
    assert_eq!(source.reused.load(SeqCst), 0);
}

/// World: as above, but the store is down when `h`/`rt-h` is handed in and invalidated;
/// A's next request logs in meanwhile (told the store does not answer), and the store
/// comes back. Proves (review 66): the handed-in pair reaches the store without the
/// access token A dropped; B is not handed `h`.
#[tokio::test]
async fn a_pair_handed_in_then_invalidated_in_an_outage_is_not_handed_to_b() {
    let (source, store, a) = a_logged_in().await;
    store.faults().down.store(true, SeqCst);
    let handed = pair_h();
    assert!(a.handle().replace(handed.clone()).unwrap());
    assert!(a.handle().invalidate(), "h dropped");
    let served = a.credential().await.unwrap();
    assert_ne!(served, handed);
    store.faults().down.store(false, SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(store.stored_refresh_token().await.as_deref(), Some("rt-h"));
    b_is_not_handed(&source, &store, &handed).await;
}

/// World: process A logged in (`a0`/`rt0` in the store); a pair `h`/`rt-h` is handed in
/// (`replace`), and the cache is dropped right after (a short-lived process that hands a
/// session to the fleet and exits), the store answering all along. Proves (review 66):
/// the handed-in pair reaches the store (a kept pair gets a last save as its cache goes).
#[tokio::test]
async fn a_pair_handed_in_as_the_cache_goes_reaches_the_store() {
    let (_, store, a) = a_logged_in().await;
    let handed = pair_h();
    assert!(a.handle().replace(handed.clone()).unwrap());
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        store.stored_refresh_token().await.as_deref(),
        Some("rt-h"),
        "the handed-in pair never reached the store"
    );
}

/// World: A logged in; two pairs are handed in one after the other (`h1`, then `h2`), the
/// store taking 5 ms a call (the two tasks interleave). Proves (review 66): the second,
/// the newest, is what the store ends with; the lease goes back; B gets `h2`.
#[tokio::test]
async fn two_pairs_handed_in_quickly_leave_the_second() {
    for gap_ms in [0, 2, 7, 12] {
        let source = Rotating::default();
        let store = FaultStore::new();
        store.faults().round_trip_ms.store(5, SeqCst);
        let a = source.cache(store.clone());
        a.credential().await.unwrap();
        let h1 = Credential::bearer("h1")
            .unwrap()
            .with_refresh_token("rt-h1");
        let h2 = Credential::bearer("h2")
            .unwrap()
            .with_refresh_token("rt-h2");
        assert!(a.handle().replace(h1).unwrap());
        tokio::time::sleep(Duration::from_millis(gap_ms)).await;
        assert!(a.handle().replace(h2.clone()).unwrap());
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(
            store.stored_refresh_token().await.as_deref(),
            Some("rt-h2"),
            "gap {gap_ms} ms"
        );
        assert!(store.lease_free().await, "gap {gap_ms} ms");
        assert_eq!(a.credential().await.unwrap(), h2);
    }
}

/// World: A's refresh (300 ms exchange) holds the lease, `rt0` taken out; a pair `h` is
/// handed in meanwhile. Proves (review 66): once the refresh ends, `h`/`rt-h` reaches the
/// store; A serves `h`; the next refresh presents `rt-h`; no reuse, one login.
#[tokio::test]
async fn a_pair_handed_in_during_a_flight_holding_the_lease_reaches_the_store() {
    let source = SlowRotating::default();
    let store = FaultStore::new();
    let a = CredentialCache::builder(source.clone())
        .store(store.clone())
        .fetch_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    a.credential().await.unwrap();
    assert!(a.handle().invalidate());
    let flight = tokio::spawn({
        let a = a.clone();
        async move { a.credential().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(store.stored_refresh_token().await, None, "rt0 taken out");
    let handed = pair_h();
    assert!(a.handle().replace(handed.clone()).unwrap());
    let _ = flight.await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(store.stored_refresh_token().await.as_deref(), Some("rt-h"));
    assert!(store.lease_free().await);
    assert_eq!(a.credential().await.unwrap(), handed);
    let b = CredentialCache::builder(source.clone())
        .store(store.clone())
        .fetch_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    assert_eq!(b.credential().await.unwrap(), handed);
    assert!(a.handle().invalidate());
    a.credential().await.unwrap();
    assert!(source.0.spent.lock().unwrap().contains("rt-h"));
    assert_eq!(source.0.reused.load(SeqCst), 0);
    assert_eq!(source.0.logins.load(SeqCst), 1);
}

/// Whether `rt-h`, handed in to A, reached the fleet: presented (once), or in the store.
async fn rt_h_not_lost(source: &Rotating, store: &FaultStore, got: &Credential) {
    let presented = source.spent.lock().unwrap().contains("rt-h");
    let stored = store.stored_refresh_token().await;
    assert!(
        presented || stored.as_deref() == Some("rt-h"),
        "rt-h, the pending hand-in, was neither presented nor saved: spent {:?}, A serves {}, \
         the store holds {stored:?}",
        source.spent.lock().unwrap(),
        shown(got)
    );
    assert_eq!(source.reused.load(SeqCst), 0);
}

/// The world of the two tests below: A logged in (`a0`/`rt0`); the store refuses pairs,
/// so A's refresh of `rt0` brings `a1`/`rt1`, kept under A's lease to be saved.
async fn a_keeping_rt1() -> (Rotating, FaultStore, CredentialCache<Rotating>) {
    let (source, store, a) = a_logged_in().await;
    store.faults().refusing_pairs.store(true, SeqCst);
    assert!(a.handle().invalidate());
    let a1 = a.credential().await.unwrap();
    assert_eq!(a1.refresh_token().map(|t| t.expose()), Some("rt1"));
    (source, store, a)
}

/// A's `current` invalidated, so A refreshes; then the store takes pairs again, and
/// `rt-h` (handed in before) must not be lost.
async fn a_refreshes_past(
    current: &Credential,
    (source, store, a): (&Rotating, &FaultStore, &CredentialCache<Rotating>),
) {
    assert!(a.handle().invalidate_if(current));
    let got = a.credential().await.unwrap();
    store.faults().refusing_pairs.store(false, SeqCst);
    tokio::time::sleep(Duration::from_secs(6)).await;
    rt_h_not_lost(source, store, &got).await;
}

/// World: `a_keeping_rt1`; then `h`/`rt-h` is handed in and at once a credential without
/// a refresh token (`x`), so no newer refresh token is installed and the hand-in stays
/// pending; `x` is invalidated, so A refreshes; later the store takes pairs. Proves
/// (review 68): the pending hand-in is newer than the kept pair (its refresh began
/// before): A's refresh presents `rt-h`, not `rt1`; `rt-h` is not lost.
#[tokio::test]
async fn a_pending_hand_in_is_presented_rather_than_an_older_kept_pair() {
    let (source, store, a) = a_keeping_rt1().await;
    assert!(a.handle().replace(pair_h()).unwrap());
    let x = Credential::bearer("x").unwrap();
    assert!(a.handle().replace(x.clone()).unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    a_refreshes_past(&x, (&source, &store, &a)).await;
}

/// World: `a_keeping_rt1`; a round of the task keeping `rt1` hangs in its renewal when
/// `h`/`rt-h` is handed in; the store goes down and `h` is invalidated: A's refresh
/// logs in, told the store does not answer, and installs `a2` without a refresh token.
/// The store comes back (still refusing pairs); `a2` is invalidated, so A refreshes
/// again; later the store takes pairs. Proves (review 68): A's next refresh presents
/// the pending hand-in, not the older kept `rt1`; `rt-h` is not lost.
#[tokio::test]
async fn a_pending_hand_in_beats_an_older_kept_pair_after_an_outage_login() {
    let (source, store, a) = a_keeping_rt1().await;
    store.faults().renews.close();
    store.faults().renews.arrived().await;
    assert!(a.handle().replace(pair_h()).unwrap());
    store.faults().down.store(true, SeqCst);
    assert!(a.handle().invalidate());
    let a2 = a.credential().await.unwrap();
    assert!(
        a2.refresh_token().is_none(),
        "an outage login keeps no refresh token"
    );
    store.faults().down.store(false, SeqCst);
    store.faults().renews.open();
    tokio::time::sleep(Duration::from_millis(700)).await;
    a_refreshes_past(&a2, (&source, &store, &a)).await;
}

/// World: A logged in (`a0`/`rt0`); process B holds the refresh lease (its refresh
/// under way); `h`/`rt-h` is handed in to A and A's cache is dropped right after (a
/// short-lived process handing a session to the fleet as it exits); B gives the lease
/// back 400 ms later without a save. Proves (review 68): `rt-h` reaches the store all
/// the same (its task tries on for a fetch timeout after the cache went).
#[tokio::test]
async fn a_pair_handed_in_as_the_cache_goes_while_the_lease_is_held_reaches_the_store() {
    let source = Rotating::default();
    let memory = MemoryStore::default();
    let store = FaultStore::over(memory.clone());
    let a = source.cache(store.clone());
    a.credential().await.unwrap();
    let b_lease = memory
        .lease(Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    assert!(a.handle().replace(pair_h()).unwrap());
    drop(a);
    tokio::time::sleep(Duration::from_millis(400)).await;
    memory.release(&b_lease).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        store.stored_refresh_token().await.as_deref(),
        Some("rt-h"),
        "the handed-in pair never reached the store"
    );
    assert!(store.lease_free().await);
}

/// World: A logged in; `h`/`rt-h` handed in from outside a runtime (no task saves it:
/// it stays pending), then invalidated; A's refresh takes the lease, and the save of
/// the marker (taking `rt-h` out) lands but its reply is lost. Proves (review 68):
/// `rt-h`, never in the store (no other process can hold it), is presented rather than
/// abandoned for a login; one login.
#[tokio::test]
async fn a_hand_in_whose_marker_reply_is_lost_is_not_abandoned_for_a_login() {
    let (source, store, a) = a_logged_in().await;
    let handle = a.handle();
    std::thread::spawn(move || assert!(handle.replace(pair_h()).unwrap()))
        .join()
        .unwrap();
    assert!(a.handle().invalidate());
    store.faults().lost_marker_replies.store(true, SeqCst);
    let got = a.credential().await.unwrap();
    store.faults().lost_marker_replies.store(false, SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        source.spent.lock().unwrap().contains("rt-h"),
        "A serves {}",
        shown(&got)
    );
    assert_eq!(source.logins.load(SeqCst), 1, "logged in again");
    assert_eq!(source.reused.load(SeqCst), 0);
}

/// World: A logged in, fetch timeout 400 ms; A's refresh (a 700 ms exchange) goes past
/// its deadline and goes on under the lease (`finish_late`, which saves the older
/// session's `a1`/`rt1`); meanwhile `h`/`rt-h` is handed in and invalidated, and A asks
/// until it gets a credential. Proves (review 68's probe): the pending hand-in is
/// presented by A's next refresh, not given up for the late fetch's pair; the store
/// ends with what A serves; no reuse, one login.
#[tokio::test]
async fn a_hand_in_while_a_late_fetch_holds_the_lease_is_presented() {
    let source = Paced::default();
    let store = FaultStore::new();
    let a = CredentialCache::builder(source.clone())
        .store(store.clone())
        .fetch_timeout(Duration::from_millis(400))
        .build()
        .unwrap();
    source
        .delays
        .lock()
        .unwrap()
        .extend([Duration::ZERO, Duration::from_millis(700)]);
    a.credential().await.unwrap();
    assert!(a.handle().invalidate());
    assert!(a.credential().await.is_err(), "the refresh went late");
    assert!(a.handle().replace(pair_h()).unwrap());
    assert!(a.handle().invalidate());
    let mut got = None;
    for _ in 0..40 {
        if let Ok(credential) = a.credential().await {
            got = Some(credential);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = got.expect("A got a credential");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a_presented_rt_h(&source.rotating, &store, &got).await;
}

/// World: A logged in (`a0`/`rt0` in the store); a pair `h`/`rt-h` is handed in from a
/// thread outside any Tokio runtime (no task can be spawned to save it), then `h` is
/// invalidated and A refreshes. Proves: the pair reaches the fleet all the same: A's
/// refresh presents `rt-h`, not the store's `rt0`, and the store ends with what that
/// brought; no reuse, one login.
#[tokio::test]
async fn a_pair_handed_in_outside_a_runtime_reaches_the_fleet_at_the_next_refresh() {
    let (source, store, a) = a_logged_in().await;
    let handle = a.handle();
    let handed = pair_h();
    std::thread::spawn(move || assert!(handle.replace(handed).unwrap()))
        .join()
        .unwrap();
    assert!(a.handle().invalidate());
    let got = a.credential().await.unwrap();
    assert!(!source.spent.lock().unwrap().contains("rt0"));
    a_presented_rt_h(&source, &store, &got).await;
}

/// A presented `rt-h` (handed in), serves what that brought, which the store holds; no
/// refresh token presented twice, no login but A's first.
async fn a_presented_rt_h(source: &Rotating, store: &FaultStore, got: &Credential) {
    assert!(
        source.spent.lock().unwrap().contains("rt-h"),
        "rt-h never presented; A serves {}",
        shown(got)
    );
    assert_eq!(
        store.stored_refresh_token().await.as_deref(),
        got.refresh_token().map(|token| token.expose()),
        "the store does not hold what presenting rt-h brought"
    );
    assert_eq!(source.reused.load(SeqCst), 0);
    assert_eq!(source.logins.load(SeqCst), 1);
}

/// World: process B holds the lease, its refresh of `rt0` under way; a pair `h`/`rt-h`
/// is handed in to A, and A's application invalidates `h` before B is done, so A needs
/// a refresh; B then saves `b1`/`rt-b1` (from `rt0`: an older session's) and gives the
/// lease back. Proves (review 66's break 4): the handed-in session, the fleet's newest,
/// is not given up for the older one: A's refresh presents `rt-h` (once), A serves what
/// that brought, and the store ends with it; no login but A's first.
#[tokio::test]
async fn a_pair_handed_in_is_not_given_up_for_an_older_sessions_pair() {
    let source = Rotating::default();
    let memory = MemoryStore::default();
    let store = FaultStore::over(memory.clone());
    let a = source.cache(store.clone());
    a.credential().await.unwrap();
    let b_lease = memory
        .lease(Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    let handed = pair_h();
    assert!(a.handle().replace(handed.clone()).unwrap());
    assert!(a.handle().invalidate());
    let flight = tokio::spawn({
        let a = a.clone();
        async move { a.credential().await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let b1 = Credential::bearer("b1")
        .unwrap()
        .with_refresh_token("rt-b1")
        .expires_in(Duration::from_secs(60));
    assert!(memory.save(&b_lease, &b1).await.unwrap());
    memory.release(&b_lease).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), flight)
        .await
        .expect("A's refresh ends")
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_ne!(got, b1, "A serves the older session's pair");
    assert!(
        source.spent.lock().unwrap().contains("rt-h"),
        "rt-h never presented; A serves {}",
        shown(&got)
    );
    assert_eq!(
        store.stored_refresh_token().await.as_deref(),
        got.refresh_token().map(|token| token.expose()),
        "the store does not hold what presenting rt-h brought"
    );
    assert!(store.lease_free().await);
    assert_eq!(source.reused.load(SeqCst), 0);
    assert_eq!(source.logins.load(SeqCst), 1);
}

/// The `Authorization` header a credential sends.
#[cfg(feature = "token")]
fn sent(credential: &Credential) -> String {
    credential
        .headers()
        .map(|(_, v)| v.to_str().unwrap_or("?").to_owned())
        .collect::<Vec<_>>()
        .join(",")
}

/// A host's wall clock that runs `ahead` (or behind, negative) of this one's, by a fixed
/// amount: time passes on it as it does on Redis's, which a `ManualClock` cannot show
/// (a store that counts a credential's time on Redis's clock sees a manual clock's
/// advance as a step of that clock, not as time passing).
#[cfg(feature = "token")]
#[derive(Debug, Clone)]
struct OffsetClock {
    ahead: Duration,
    behind: Duration,
}

#[cfg(feature = "token")]
impl tower_client_auth::clock::Clock for OffsetClock {
    fn now(&self) -> std::time::SystemTime {
        std::time::SystemTime::now() + self.ahead - self.behind
    }
}

/// Two processes of a fleet on one real Redis under `namespace`, each on its own host's
/// clock: A's `a_ahead` ahead of B's (B's is the host's and the token endpoint's), over
/// token sources for one scripted endpoint that issues rotating pairs living
/// `lifetime` (`at-N`, `rt-N`).
#[cfg(feature = "token")]
struct Skewed {
    _server: RedisServer,
    idp: support::scripted::Idp,
    a: CredentialCache<tower_client_auth::token::TokenSource>,
    b: CredentialCache<tower_client_auth::token::TokenSource>,
    /// When the endpoint issued its first token, once a test has fetched it: what its
    /// sleeps count from.
    start: Instant,
}

#[cfg(feature = "token")]
async fn skewed(a_ahead: Duration, lifetime: Duration, namespace: &str) -> Skewed {
    skewed_by(a_ahead, Duration::ZERO, lifetime, namespace).await
}

/// [`skewed`], with A's clock `a_behind` behind B's.
#[cfg(feature = "token")]
async fn skewed_behind(a_behind: Duration, lifetime: Duration, namespace: &str) -> Skewed {
    skewed_by(Duration::ZERO, a_behind, lifetime, namespace).await
}

#[cfg(feature = "token")]
async fn skewed_by(
    a_ahead: Duration,
    a_behind: Duration,
    lifetime: Duration,
    namespace: &str,
) -> Skewed {
    let server = RedisServer::start();
    let idp = support::scripted::Idp::default();
    let issued = Arc::new(AtomicUsize::new(0));
    idp.rule(move |_, _, _| {
        let n = issued.fetch_add(1, SeqCst) + 1;
        Some(support::scripted::Scripted::now(
            200,
            None,
            &format!(
                r#"{{"access_token":"at-{n}","refresh_token":"rt-{n}","token_type":"Bearer","expires_in":{}}}"#,
                lifetime.as_secs()
            ),
        ))
    });
    let process = async |clock: OffsetClock| {
        CredentialCache::builder(idp.source())
            .store(redis_store(&server, namespace).await)
            .clock(clock)
            .window_jitter(0.0)
            .build()
            .unwrap()
    };
    let a = process(OffsetClock {
        ahead: a_ahead,
        behind: a_behind,
    })
    .await;
    let b = process(OffsetClock {
        ahead: Duration::ZERO,
        behind: Duration::ZERO,
    })
    .await;
    Skewed {
        _server: server,
        idp,
        a,
        b,
        start: Instant::now(),
    }
}

/// Sleeps until `at` after `start`.
#[cfg(feature = "token")]
async fn until(start: Instant, at: Duration) {
    tokio::time::sleep_until((start + at).into()).await;
}

/// World: two processes on one real Redis; A's host clock runs 3 s ahead of B's (and of
/// the token endpoint's). A logs in (`at-1`, `expires_in: 4`) and B takes `at-1` from
/// the store; then 4.4 s pass (`at-1` ended 0.4 s ago).
/// Proves (README: an expiring credential is never handed out expired; "Clocks across
/// hosts"): B does not hand out `at-1` past its end. Counter: the credential B hands out
/// (review 121 found B handing out an hour's `at-1` 3640 s after it got it: the stored
/// expiry was absolute on A's clock, 50 min ahead, and B trusted it).
#[cfg(feature = "token")]
#[tokio::test]
async fn a_token_from_a_process_whose_clock_runs_ahead_is_not_sent_past_its_lifetime() {
    let Skewed {
        _server,
        idp,
        a,
        b,
        start,
    } = skewed(
        Duration::from_secs(3),
        Duration::from_secs(4),
        "skew-expiry",
    )
    .await;
    assert_eq!(sent(&a.credential().await.unwrap()), "Bearer at-1");
    assert_eq!(sent(&b.credential().await.unwrap()), "Bearer at-1");
    assert_eq!(idp.log().len(), 1, "{:?}", idp.brief());
    until(start, Duration::from_millis(4400)).await;
    let later = b.credential().await.unwrap();
    assert_ne!(
        sent(&later),
        "Bearer at-1",
        "B hands out at-1 4.4 s after it was issued, a 4 s token; {:?}",
        idp.brief()
    );
}

/// World: as `a_token_from_a_process_whose_clock_runs_ahead_is_not_sent_past_its_lifetime`,
/// but B asks again in its hard window for `at-1` (3.85 s of a 4 s token) and refreshes:
/// the store may still hold `at-1`; then again 4.5 s after its issue.
/// Proves: B does not take `at-1` back from the store for a new lifetime, and never
/// hands it out past its end. Counter: the credential B hands out.
#[cfg(feature = "token")]
#[tokio::test]
async fn a_skewed_token_read_back_from_the_store_keeps_its_first_sight_lifetime() {
    let Skewed {
        _server,
        idp,
        a,
        b,
        start,
    } = skewed(
        Duration::from_secs(3),
        Duration::from_secs(4),
        "skew-reread",
    )
    .await;
    assert_eq!(sent(&a.credential().await.unwrap()), "Bearer at-1");
    assert_eq!(sent(&b.credential().await.unwrap()), "Bearer at-1");
    until(start, Duration::from_millis(3850)).await;
    // In B's hard window (or past the end, on a slow machine): B refreshes.
    let mid = b.credential().await.unwrap();
    assert_ne!(sent(&mid), "Bearer at-1", "{:?}", idp.brief());
    until(start, Duration::from_millis(4500)).await;
    let later = b.credential().await.unwrap();
    assert_ne!(
        sent(&later),
        "Bearer at-1",
        "B hands out at-1 4.5 s after it was issued, a 4 s token: {:?}",
        idp.brief()
    );
}

/// World: two processes on one real Redis; A's host clock runs 3 s ahead of B's (and of
/// the token endpoint's). A logs in (`at-1`, `expires_in: 4`); B first needs a
/// credential 2.5 s later (it starts then, or had no request before) and takes `at-1`
/// from the store; then B asks again 4.4 s after the issue (`at-1` ended 0.4 s ago).
/// Proves (README: an expiring credential is never handed out expired; "Clocks across
/// hosts"): B does not hand out `at-1` past its end. Counter: the credential B hands out
/// (review 122: B handed it out: by A's clock `at-1` was issued in B's future, so B
/// counted its lifetime from its first sight, 2.5 s late; a process behind the writer
/// that joined late sent a spent token for up to the skew, each use a 401 and a replay.
/// Fixed by counting a stored credential's time on Redis's clock).
#[cfg(feature = "token")]
#[tokio::test]
async fn a_process_behind_the_writer_that_joins_late_does_not_send_the_token_past_its_end() {
    let Skewed {
        _server,
        idp,
        a,
        b,
        start,
    } = skewed(Duration::from_secs(3), Duration::from_secs(4), "skew-late").await;
    assert_eq!(sent(&a.credential().await.unwrap()), "Bearer at-1");
    until(start, Duration::from_millis(2500)).await;
    assert_eq!(sent(&b.credential().await.unwrap()), "Bearer at-1");
    assert_eq!(idp.log().len(), 1, "{:?}", idp.brief());
    until(start, Duration::from_millis(4400)).await;
    let later = b.credential().await.unwrap();
    assert_ne!(
        sent(&later),
        "Bearer at-1",
        "B hands out at-1 4.4 s after it was issued, a 4 s token; {:?}",
        idp.brief()
    );
}

/// World: `RedisStore` on a real server; a writer whose clock runs an hour ahead of the
/// host's saves a token it says has 10 s left (`save_left`), and a pair with a refresh
/// token; then each is read (`load_left`), removed, or its `ends` record taken away (as
/// a fleet with an earlier version leaves it: no record, or another credential's).
/// Proves (module docs of `store::redis`, the `ends` key; README "Clocks across hosts"):
/// a reader learns what is left of a stored credential on Redis's clock, whatever the
/// writer's clock said; the record expires with the credential's key, a pair's lives as
/// long as the pair; a record of another credential, or none, tells nothing (the times
/// are read as written); a removal takes the record with the credential. Counters: the
/// time left read, the keys' `PTTL`s, the keys left.
#[tokio::test]
async fn a_stored_credential_carries_what_is_left_of_it_on_redis_clock() {
    let server = RedisServer::start();
    let store = redis_store(&server, "ends").await;
    let redis = |args: &[&str]| server.cli(args);
    let ahead = std::time::SystemTime::now() + Duration::from_secs(3600);
    let token = Credential::bearer("short")
        .unwrap()
        .lives(ahead, Duration::from_secs(10));
    let lease = store.lease(Duration::from_secs(5)).await.unwrap().unwrap();
    assert!(
        store
            .save_left(&lease, &token, Some(Duration::from_secs(10)))
            .await
            .unwrap()
    );
    let credential_key = redis(&["--scan", "--pattern", "tca:*:credential"]);
    let ends_key = redis(&["--scan", "--pattern", "tca:*:ends"]);
    assert!(ends_key.ends_with(":ends"), "{ends_key:?}");
    let ttl = |key: &str| -> i64 { redis(&["PTTL", key]).parse().unwrap() };
    assert!((9_000..=10_000).contains(&ttl(&credential_key)));
    assert!((9_000..=10_000).contains(&ttl(&ends_key)));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (read, left) = store.load_left().await.unwrap().unwrap();
    assert_eq!(read, token);
    let written = token.expiry().unwrap();
    assert!(
        written.duration_since(read.expiry().unwrap()).unwrap() < Duration::from_millis(1),
        "the times are read as written (to the millisecond)"
    );
    let left = left.expect("what is left, on Redis's clock");
    assert!(
        left <= Duration::from_millis(8_800) && left >= Duration::from_millis(7_500),
        "{left:?} left of a 10 s token saved 1.2 s ago"
    );
    // A record of another credential tells nothing of this one.
    let record = redis(&["GET", &ends_key]);
    let pair = Credential::bearer("pair")
        .unwrap()
        .expires_in(Duration::from_secs(60))
        .with_refresh_token("rt");
    assert!(
        store
            .save_left(&lease, &pair, Some(Duration::from_secs(60)))
            .await
            .unwrap()
    );
    assert_eq!(
        ttl(&credential_key),
        -1,
        "a pair stays until it is replaced"
    );
    assert_eq!(ttl(&ends_key), -1, "and its record with it");
    assert_eq!(redis(&["SET", &ends_key, &record]), "OK");
    let (read, left) = store.load_left().await.unwrap().unwrap();
    assert_eq!(read, pair);
    assert_eq!(left, None, "another credential's record");
    // No record (an earlier version's save): nothing known.
    assert_eq!(redis(&["DEL", &ends_key]), "1");
    assert_eq!(store.load_left().await.unwrap().unwrap().1, None);
    // A credential that does not expire leaves no record.
    let forever = Credential::bearer("forever").unwrap();
    assert!(store.save_left(&lease, &forever, None).await.unwrap());
    assert_eq!(redis(&["EXISTS", &ends_key]), "0");
    assert_eq!(store.load_left().await.unwrap().unwrap().1, None);
    // A removal takes the record with the credential.
    assert!(
        store
            .save_left(&lease, &pair, Some(Duration::from_secs(60)))
            .await
            .unwrap()
    );
    assert_eq!(redis(&["EXISTS", &ends_key]), "1");
    store.remove(&pair).await.unwrap();
    assert_eq!(redis(&["EXISTS", &credential_key]), "0");
    assert_eq!(redis(&["EXISTS", &ends_key]), "0");
    // One saved already expired (the record a holder leaves) is read with nothing left.
    let marker = Credential::bearer("taken")
        .unwrap()
        .expires_at(std::time::SystemTime::UNIX_EPOCH);
    assert!(
        store
            .save_left(&lease, &marker, Some(Duration::ZERO))
            .await
            .unwrap()
    );
    assert_eq!(ttl(&credential_key), -1, "the marker stays");
    assert_eq!(
        store.load_left().await.unwrap().unwrap().1,
        Some(Duration::ZERO)
    );
    store.release(&lease).await.unwrap();
}

/// World: two processes on one real Redis; A's host clock runs an hour behind B's and
/// the token endpoint's. A logs in (`at-1`, `expires_in: 3600`, so `at-1` ends an hour
/// after B's now by B's clock, now by A's); B needs a credential a moment later.
/// Proves (README "Clocks across hosts"): B counts `at-1`'s time on Redis's clock and
/// takes it; it neither refreshes beside it (A's expiry, read by B's clock, is now) nor
/// hands out `at-1` as spent. Counter: the token endpoint's log.
#[cfg(feature = "token")]
#[tokio::test]
async fn a_token_from_a_process_whose_clock_runs_behind_is_taken_fresh() {
    let fleet = skewed_behind(
        Duration::from_secs(3600),
        Duration::from_secs(3600),
        "skew-behind",
    )
    .await;
    the_writers_fresh_token_is_taken(&fleet.a, &fleet.b, &fleet.idp).await;
}

/// `writer` logs in (`at-1`), then `reader` asks: it takes `at-1` and the endpoint is
/// asked once.
#[cfg(feature = "token")]
async fn the_writers_fresh_token_is_taken(
    writer: &CredentialCache<tower_client_auth::token::TokenSource>,
    reader: &CredentialCache<tower_client_auth::token::TokenSource>,
    idp: &support::scripted::Idp,
) {
    assert_eq!(sent(&writer.credential().await.unwrap()), "Bearer at-1");
    let got = reader.credential().await.unwrap();
    assert_eq!(
        (sent(&got).as_str(), idp.log().len()),
        ("Bearer at-1", 1),
        "the reader fetched beside the fleet's fresh token: {:?}",
        idp.brief()
    );
}

/// World: `RedisStore` on a real server; a caller of the store's own trait asks for a
/// lease of `Duration::MAX` (the crate's spelling of "no limit", as for the fetch
/// timeout), which Redis refuses (`PX` out of range).
/// Proves (`CredentialStore::lease`: a store that cannot lease answers `Err`): the call
/// returns an error, it does not panic. Counter: the call's outcome, caught (review 122:
/// FAILS, the refused `SET` drops `Unanswered`, whose `Drop` computes
/// `Instant::now() + ttl` and panics "overflow when adding duration to instant"; in a
/// drop during unwinding that would abort the process).
#[tokio::test]
async fn a_refused_lease_of_any_length_is_an_error_not_a_panic() {
    let server = RedisServer::start();
    let store = redis_store(&server, "lease-max").await;
    let outcome =
        tokio::spawn(async move { store.lease(Duration::MAX).await.map(|l| l.is_some()) }).await;
    match outcome {
        Ok(result) => drop(result),
        Err(e) => panic!("RedisStore::lease(Duration::MAX) panicked: {e}"),
    }
}

/// World: two processes on one real Redis; B logs in (`at-1`, `expires_in: 3600`), and A,
/// whose host clock runs 3590 s ahead of B's, asks a moment later.
/// Proves (README, "One fetch for the fleet"; "1 token endpoint call for the fleet" per
/// lifetime; "Clocks across hosts"): A takes the fleet's fresh token rather than fetch
/// beside it and overwrite it. Counter: the token endpoint's log (review 121: 2, A's
/// clock put the fleet's token in its hard window; a skew past a token's lifetime minus
/// its hard window made the ahead process the fleet's fetcher, its tokens then living
/// lifetime + skew on the others' clocks. Fixed by counting a stored credential's time
/// on Redis's clock).
#[cfg(feature = "token")]
#[tokio::test]
async fn a_process_whose_clock_runs_ahead_takes_the_fleets_fresh_token() {
    let fleet = skewed(
        Duration::from_secs(3590),
        Duration::from_secs(3600),
        "skew-ahead",
    )
    .await;
    the_writers_fresh_token_is_taken(&fleet.b, &fleet.a, &fleet.idp).await;
}

/// World: two processes share `at-1`/`rt-1` on a real Redis (fetch timeout 400 ms); Redis
/// stalls for 1.5 s (`CLIENT PAUSE 1500 ALL` from another client) and A's credential is invalidated
/// meanwhile; once Redis answers again B's is invalidated too.
/// Proves (README: "each store call gets at most a quarter of it, then the cache fetches
/// without the store"; "When Redis is back ... the processes share again"; the
/// rotating refresh token is never presented twice): A's caller waits no longer than its
/// fetch timeout and a share; B, asking after Redis is back, gets a credential (not a
/// `Timeout` behind a lease nobody holds), and `rt-1` is presented at most once.
/// Counters: A's wait, B's result, the refresh tokens presented.
#[cfg(feature = "token")]
#[tokio::test]
async fn a_stalled_redis_bounds_the_caller_and_the_fleet_shares_again_after() {
    let server = RedisServer::start();
    let idp = support::scripted::Idp::default();
    let fleet = |store| {
        CredentialCache::builder(idp.source())
            .store(store)
            .window_jitter(0.0)
            .fetch_timeout(Duration::from_millis(400))
            .build()
            .unwrap()
    };
    let a = fleet(redis_store(&server, "stall").await);
    let b = fleet(redis_store(&server, "stall").await);
    assert_eq!(sent(&a.credential().await.unwrap()), "Bearer at-1");
    assert_eq!(sent(&b.credential().await.unwrap()), "Bearer at-1");
    let port = server.port;
    // Every other client's commands wait 1.5 s (`DEBUG` is refused by default).
    let paused = support::redis::cli(port, &["CLIENT", "PAUSE", "1500", "ALL"]);
    assert_eq!(paused, "OK", "{paused:?}");
    let paused_at = Instant::now();
    a.handle().invalidate();
    let started = Instant::now();
    let got = a.credential().await;
    let waited = started.elapsed();
    assert!(
        waited <= Duration::from_millis(400 + 100 + 150),
        "A's caller waited {waited:?} on a stalled Redis ({got:?})"
    );
    tokio::time::sleep(Duration::from_millis(1550).saturating_sub(paused_at.elapsed())).await;
    b.handle().invalidate();
    let started = Instant::now();
    let after = b.credential().await;
    let b_waited = started.elapsed();
    // Who holds the lease now: nobody does (A fetched without the store).
    let redis = |args: &[&str]| support::redis::cli(port, args);
    let lease = redis(&["--scan", "--pattern", "tca:*:lease"]);
    let lease_ttl = (!lease.is_empty()).then(|| redis(&["PTTL", &lease]));
    let presented: Vec<_> = idp.brief().into_iter().filter_map(|l| l.1).collect();
    let mut unique = presented.clone();
    unique.dedup();
    assert_eq!(
        presented,
        unique,
        "a refresh token presented twice: {:?}",
        idp.brief()
    );
    assert!(
        after.is_ok(),
        "B, after Redis came back, failed after {b_waited:?}: {after:?}; A: {got:?}; {:?}; \
         lease key {lease:?}, PTTL {lease_ttl:?}",
        idp.brief()
    );
}

/// A source of bearer tokens without a refresh token, each issued for an hour on the wall
/// clock the cache asked at (`FetchContext::now`).
struct HourTokens(tower_client_auth::clock::ManualClock);

impl CredentialSource for HourTokens {
    async fn fetch(&self, _cx: FetchContext) -> Result<Credential, BoxError> {
        use tower_client_auth::clock::Clock;
        Ok(Credential::bearer("hour")?.lives(self.0.now(), Duration::from_secs(3600)))
    }
}

/// World: one process on a real Redis whose cache reads its own wall clock (a
/// `ManualClock`, or any `clock::Clock` of the application's, say one corrected against
/// a time service) 30 min ahead of the host's; its source issues an hour's bearer token
/// without a refresh token, saved to the store.
/// Proves (module docs of `store::redis`: the credential key is "expiring with it"):
/// the stored key expires within the token's hour. Counter: the key's `PTTL` (review
/// 121: `RedisStore::save` sized the TTL on the host's clock alone, 90 min here: the key
/// outlived its token by the skew. A cache clock behind the host's is not covered: a
/// credential the host's clock calls expired is kept without expiry, as the marker a
/// holder leaves when it takes a refresh token out is, `a_stored_refresh_token_outlives_its_access_token`).
#[tokio::test]
async fn a_stored_credential_expires_with_it_on_the_caches_clock() {
    use tower_client_auth::clock::ManualClock;
    let server = RedisServer::start();
    let clock = ManualClock::new(std::time::SystemTime::now() + Duration::from_secs(1800));
    let cache = CredentialCache::builder(HourTokens(clock.clone()))
        .store(redis_store(&server, "cache-clock-ttl").await)
        .clock(clock.clone())
        .build()
        .unwrap();
    cache.credential().await.unwrap();
    let redis = |args: &[&str]| server.cli(args);
    let key = redis(&["--scan", "--pattern", "tca:*:credential"]);
    let ttl: i64 = redis(&["PTTL", &key]).parse().unwrap();
    assert!(
        (1..=3_600_000).contains(&ttl),
        "the stored hour's token {key} has PTTL {ttl} ms"
    );
}

/// World: one process on a real Redis (fetch timeout 400 ms); Redis stalls for 2 s
/// (`CLIENT PAUSE 2000 ALL` from another client), and the process's credential is
/// invalidated and fetched again five times meanwhile; then Redis answers and it is
/// invalidated once more.
/// Proves (README: "A store that fails is logged once per outage (a warning at its first
/// failed call ...; an info line when a call that failed in it answers again"): one
/// warning for the stall, however many store calls timed out in it, and one info line
/// when it ends; every caller in the stall is served. Counter: the captured log lines
/// (review 121: held).
#[tokio::test]
async fn a_stalled_redis_is_logged_once_and_its_end_once() {
    let (capture, _guard) = support::capture_traces();
    let server = RedisServer::start();
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = CredentialCache::builder(Numbered(calls.clone()))
        .store(redis_store(&server, "stall-log").await)
        .fetch_timeout(Duration::from_millis(400))
        .build()
        .unwrap();
    cache.credential().await.unwrap();
    assert_eq!(server.cli(&["CLIENT", "PAUSE", "2000", "ALL"]), "OK");
    let paused_at = Instant::now();
    for round in 0..5 {
        cache.handle().invalidate();
        let got = cache.credential().await;
        assert!(got.is_ok(), "round {round}: {got:?}");
    }
    assert!(
        paused_at.elapsed() < Duration::from_millis(2000),
        "the stall ended first"
    );
    tokio::time::sleep(Duration::from_millis(2100).saturating_sub(paused_at.elapsed())).await;
    // A lease a timed-out call left may still be held (see
    // `a_stalled_redis_bounds_the_caller_and_the_fleet_shares_again_after`): wait it out.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    cache.handle().invalidate();
    cache.credential().await.unwrap();
    let text = capture.text();
    let warned = text.matches("credential store failed").count();
    let back = text.matches("credential store answers again").count();
    assert_eq!((warned, back), (1, 1), "{text}");
}

/// Bearer tokens `n0`, `n1`... that never expire.
struct Numbered(Arc<AtomicUsize>);

impl CredentialSource for Numbered {
    async fn fetch(&self, _cx: FetchContext) -> Result<Credential, BoxError> {
        let n = self.0.fetch_add(1, SeqCst);
        Ok(Credential::bearer(format!("n{n}"))?)
    }
}

/// Two processes on one real Redis under `namespace` sharing `at-1`/`rt-1` (asserted),
/// and the token endpoint's next answer scripted: the rotated `at-2`/`rt-2`, 600 ms
/// after it is asked.
#[cfg(feature = "token")]
async fn sharing_at_1_before_a_slow_rotation(
    namespace: &str,
) -> (
    RedisServer,
    support::scripted::Idp,
    CredentialCache<tower_client_auth::token::TokenSource>,
    CredentialCache<tower_client_auth::token::TokenSource>,
) {
    use support::scripted::Scripted;
    let server = RedisServer::start();
    let idp = support::scripted::Idp::default();
    let fleet = |store| {
        CredentialCache::builder(idp.source())
            .store(store)
            .window_jitter(0.0)
            .build()
            .unwrap()
    };
    let a = fleet(redis_store(&server, namespace).await);
    let b = fleet(redis_store(&server, namespace).await);
    assert_eq!(sent(&a.credential().await.unwrap()), "Bearer at-1");
    assert_eq!(sent(&b.credential().await.unwrap()), "Bearer at-1");
    idp.push(Scripted::after(
        Duration::from_millis(600),
        200,
        None,
        r#"{"access_token":"at-2","refresh_token":"rt-2","token_type":"Bearer","expires_in":3600}"#,
    ));
    (server, idp, a, b)
}

/// World: two processes share `at-1`/`rt-1` (rotating refresh tokens) on a real Redis; A
/// refreshes (its access token invalidated), and while its exchange is on the wire
/// (600 ms) Redis loses everything (`FLUSHALL`: the lease, the marker A left in place of
/// the pair). The exchange brings `at-2`/`rt-2`, whose save the fence refuses; nobody
/// else writes meanwhile. Then B refreshes, twice.
/// Proves (README, "One owner for a rotating refresh token": "If Redis lost the lease
/// meanwhile, the pair is neither saved nor presented until the lease is taken again ...
/// and a look at the store finds it as this process left it (or empty, as a restart
/// leaves it)"): `rt-2` reaches the store; B takes `at-2` from it, then refreshes with
/// `rt-2`; one login for the fleet, every refresh token presented once. Counter: the
/// token endpoint's log (review 121: held).
#[cfg(feature = "token")]
#[tokio::test]
async fn a_rotated_pair_whose_lease_a_flushall_took_reaches_the_store() {
    let (server, idp, a, b) = sharing_at_1_before_a_slow_rotation("flushall").await;
    let port = server.port;
    let flush = async move {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(support::redis::cli(port, &["FLUSHALL"]), "OK");
    };
    a.handle().invalidate();
    let (got, ()) = tokio::join!(a.credential(), flush);
    assert_eq!(sent(&got.unwrap()), "Bearer at-2", "{:?}", idp.brief());
    // The kept pair's task: its lease taken again, the store found empty, saved.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    b.handle().invalidate();
    assert_eq!(
        sent(&b.credential().await.unwrap()),
        "Bearer at-2",
        "{:?}",
        idp.brief()
    );
    b.handle().invalidate();
    b.credential().await.unwrap();
    assert_eq!(idp.logins(), 1, "{:?}", idp.brief());
    let presented: Vec<_> = idp.brief().into_iter().filter_map(|l| l.1).collect();
    assert_eq!(presented, ["rt-1", "rt-2"], "{:?}", idp.brief());
}

/// World: as `a_rotated_pair_whose_lease_a_flushall_took_reaches_the_store`, but B needs
/// a credential (its own invalidated) right after the `FLUSHALL`, while A's exchange is
/// still on the wire.
/// Proves (README, "What the store asks of Redis: keep every acknowledged write.
/// Evicting the lease lets two processes refresh at once ... costs the fleet a login":
/// the limit admitted, and what it is bounded by): no refresh token is presented twice,
/// and the fleet goes on on one line; the two token requests at once the lost lease
/// lets through (review 121 saw B log in beside A's refresh) are the admitted cost,
/// at most one. Counters: refresh tokens presented, overlapping requests.
#[cfg(feature = "token")]
#[tokio::test]
async fn a_flushall_mid_refresh_costs_at_most_a_login_and_no_refresh_token() {
    let (server, idp, a, b) = sharing_at_1_before_a_slow_rotation("flushall-b").await;
    let port = server.port;
    let flush_then_b = async {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(support::redis::cli(port, &["FLUSHALL"]), "OK");
        b.handle().invalidate();
        b.credential().await
    };
    a.handle().invalidate();
    let (got_a, got_b) = tokio::join!(a.credential(), flush_then_b);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Both go on with refreshes: the fleet's line, whichever it is.
    for _ in 0..2 {
        a.handle().invalidate();
        a.credential().await.unwrap();
        b.handle().invalidate();
        b.credential().await.unwrap();
    }
    let log = idp.log();
    let presented: Vec<_> = log.iter().filter_map(|l| l.3.clone()).collect();
    let mut unique = presented.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        presented.len(),
        unique.len(),
        "a refresh token presented twice: {:?}",
        idp.brief()
    );
    let overlapping = log
        .windows(2)
        .filter(|w| w[1].0 < w[0].1.unwrap_or(w[1].0))
        .count();
    assert!(
        overlapping <= 1,
        "{overlapping} token request(s) beside another; A {got_a:?}, B {got_b:?}: {:?}",
        idp.brief()
    );
}

/// World: a real Redis whose only user for the store may use every command but `TIME`
/// (`+@all -time`, on the store's keys and channels); two processes share a token there.
/// Proves (README "Clocks across hosts"; a store error never fails a request, but a
/// store that cannot be read is no store at all): without the time, the store still
/// keeps its contract (the times cross it as written, as before the `ends` record):
/// one fetch for both, no store error. Counters: the source's fetches, the time left
/// read (none known), the warnings logged (a failed store call logs one: the first
/// version of the `ends` record asked for the time unguarded, and every save failed).
#[tokio::test]
async fn a_user_that_may_not_ask_the_time_still_shares_through_redis() {
    let (capture, _guard) = support::capture_traces();
    let port = support::redis::free_port();
    let _server = RedisServer::start_with(
        port,
        &[
            "--user",
            "default",
            "off",
            "--user",
            "fleet",
            "on",
            ">fleet-pass",
            "~tca:*",
            "&tca:*",
            "+@all",
            "-time",
        ],
    );
    let url = format!("redis://fleet:fleet-pass@127.0.0.1:{port}");
    let calls = Arc::new(AtomicUsize::new(0));
    /// Numbered bearer tokens of an hour.
    struct Hourly(Arc<AtomicUsize>);
    impl CredentialSource for Hourly {
        async fn fetch(&self, _cx: FetchContext) -> Result<Credential, BoxError> {
            let n = self.0.fetch_add(1, SeqCst);
            Ok(Credential::bearer(format!("h{n}"))?.expires_in(Duration::from_secs(3600)))
        }
    }
    let process = async || {
        CredentialCache::builder(Hourly(calls.clone()))
            .store(RedisStore::connect(&url, "no-time").await.unwrap())
            .build()
            .unwrap()
    };
    let (a, b) = (process().await, process().await);
    let first = a.credential().await.unwrap();
    assert_eq!(b.credential().await.unwrap(), first);
    assert_eq!(
        calls.load(SeqCst),
        1,
        "the second process fetched beside the first"
    );
    let store = RedisStore::connect(&url, "no-time").await.unwrap();
    let (stored, left) = store.load_left().await.unwrap().unwrap();
    assert_eq!(stored, first);
    assert_eq!(left, None, "no time known without TIME");
    let logged = capture.text();
    assert!(
        !logged.contains("WARN"),
        "a store call failed for want of TIME: {logged}"
    );
}

/// World: a process on a real Redis whose source hands out an hour's token issued ten
/// minutes in the cache clock's future (a source on a clock of its own, ahead); the
/// process saves it to the store, and another reads it.
/// Proves (README "Clocks across hosts": never counted valid for longer than its
/// lifetime from when the cache first saw it): the store is told no more than the
/// token's lifetime left, so a reader counts at most an hour, not the 70 minutes its
/// expiry names. Counter: the time left the store records (4,200 s without the store
/// wrapper's cap at the lifetime: the cache keeps the credential's own expiry and caps
/// only what it believes, `believed_expiry`).
#[tokio::test]
async fn a_token_issued_in_the_writers_future_is_stored_with_no_more_than_its_lifetime() {
    struct Ahead;
    impl CredentialSource for Ahead {
        async fn fetch(&self, _cx: FetchContext) -> Result<Credential, BoxError> {
            let issued = std::time::SystemTime::now() + Duration::from_secs(600);
            Ok(Credential::bearer("ahead")?.lives(issued, Duration::from_secs(3600)))
        }
    }
    let server = RedisServer::start();
    let cache = CredentialCache::builder(Ahead)
        .store(redis_store(&server, "ahead-source").await)
        .build()
        .unwrap();
    cache.credential().await.unwrap();
    let reader = redis_store(&server, "ahead-source").await;
    let (_, left) = reader.load_left().await.unwrap().unwrap();
    let left = left.expect("what is left, on Redis's clock");
    assert!(
        left <= Duration::from_secs(3600),
        "the store counts {left:?} left of an hour's token"
    );
}

/// Copies into `server`'s credential key of the store under `ours` the value a store
/// under a scratch namespace saves for `credential`, without touching the `ends` record:
/// what a process of an earlier version (whose SAVE writes the credential alone) leaves.
async fn saved_by_an_earlier_version(server: &RedisServer, ours: &str, credential: &Credential) {
    let scratch = redis_store(server, "earlier-version-scratch").await;
    let lease = scratch
        .lease(Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert!(scratch.save(&lease, credential).await.unwrap());
    scratch.release(&lease).await.unwrap();
    let mut raw = raw(server).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("tca:*:credential")
        .query_async(&mut raw)
        .await
        .unwrap();
    let ours = ours.to_owned();
    let theirs = keys.iter().find(|k| **k != ours).unwrap().clone();
    let value: String = redis::cmd("GET")
        .arg(&theirs)
        .query_async(&mut raw)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&ours)
        .arg(value)
        .query_async(&mut raw)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(theirs.replace(":credential", ":ends"))
        .query_async(&mut raw)
        .await
        .unwrap();
}

/// World: `RedisStore` on a real server; a pair (`at-1`, `rt-1`, an hour) saved by this
/// version (its `ends` record written), then a process of an earlier version takes the
/// refresh token out: it writes the marker (`at-1`, no refresh token, expired at the
/// epoch) over the pair with its own SAVE, which leaves the `ends` record in place (the
/// marker has the pair's headers: a record matched by fingerprint read as the marker's); then
/// likewise the spent pair (`at-1` expired at the epoch, `rt-1` kept) it saves for a
/// pair the server rejected.
/// Proves (README "Clocks across hosts": a credential an earlier version saved is read
/// by its own times; `store::redis` module docs: the marker is never sent): `load_left`
/// tells nothing, or nothing left, of either. Counter: the time left read
/// (review 124 saw about an hour: the pair's record read as the marker's).
#[tokio::test]
async fn an_earlier_versions_marker_over_a_pair_is_not_given_the_pairs_time() {
    let server = RedisServer::start();
    let store = redis_store(&server, "ends-marker").await;
    let pair = Credential::bearer("at-1")
        .unwrap()
        .expires_in(Duration::from_secs(3600))
        .with_refresh_token("rt-1");
    let lease = store.lease(Duration::from_secs(5)).await.unwrap().unwrap();
    assert!(
        store
            .save_left(&lease, &pair, Some(Duration::from_secs(3600)))
            .await
            .unwrap()
    );
    let ours = credential_key(&server).await;
    let marker = Credential::bearer("at-1")
        .unwrap()
        .expires_at(std::time::SystemTime::UNIX_EPOCH);
    // The spent pair an earlier version saves for a pair the server rejected: its
    // refresh token kept, its access token never sent again.
    let spent = marker.clone().with_refresh_token("rt-1");
    for (what, written) in [("marker", &marker), ("spent pair", &spent)] {
        saved_by_an_earlier_version(&server, &ours, written).await;
        let (read, left) = store.load_left().await.unwrap().unwrap();
        assert_eq!(read.expiry(), Some(std::time::SystemTime::UNIX_EPOCH));
        assert!(
            left.is_none_or(|left| left.is_zero()),
            "the {what} an earlier version wrote is read with {left:?} left: the pair's record"
        );
    }
}

/// World: two processes on one real Redis (clocks in sync); A (this version) logs in
/// (`at-1`, `rt-1`, 60 s) and saves the pair with its `ends` record; then a process of
/// an earlier version takes `rt-1` out to present it, writing the marker (`at-1`, no
/// refresh token, expired at the epoch) over the pair, which leaves the record. B, a
/// fresh process of this version, then asks for a credential.
/// Proves (`store::redis` module docs: a marker "is never sent"; README "Clocks across
/// hosts": an earlier version's save is read by its own times): B does not hand out the
/// marker's `at-1`. Counter: the credential B hands out (review 124 saw `Bearer at-1`,
/// the marker moved to the pair's end by `store::OnClock`).
#[cfg(feature = "token")]
#[tokio::test]
async fn an_earlier_versions_marker_is_never_handed_out_as_fresh() {
    let Skewed {
        _server: server,
        idp,
        a,
        b,
        ..
    } = skewed(Duration::ZERO, Duration::from_secs(60), "ends-marker-cache").await;
    assert_eq!(sent(&a.credential().await.unwrap()), "Bearer at-1");
    let ours = credential_key(&server).await;
    let marker = Credential::bearer("at-1")
        .unwrap()
        .expires_at(std::time::SystemTime::UNIX_EPOCH);
    saved_by_an_earlier_version(&server, &ours, &marker).await;
    let handed = tokio::time::timeout(Duration::from_secs(10), b.credential()).await;
    if let Ok(Ok(handed)) = handed {
        assert_ne!(
            sent(&handed),
            "Bearer at-1",
            "B hands out the marker an earlier version left; {:?}",
            idp.brief()
        );
    }
}

/// World: an encrypted `RedisStore` on a real server (its fingerprints keyed); a pair
/// (`at-1`, `rt-1`, 60 s left) saved, then this version's marker of it (no refresh
/// token, expired at the epoch, `save_left` with nothing left) over it; then a pair
/// with `Duration::MAX` left (expiring in the year 9999); then one that does
/// not expire. Each is read back with `load_left`.
/// Proves (`store::redis` module docs, the `ends` key): the record of a sealed value (its
/// SHA-1, as stored) matches it (what is left is read); this version's marker is
/// read with nothing left and stays at the epoch (never sent); a time left past what
/// Lua numbers hold is capped, read back without an error; a credential that does not
/// expire leaves no record. Counters: the time left read, the `ends` key's presence.
#[tokio::test]
async fn the_ends_record_holds_for_sealed_values_markers_and_endless_times() {
    let server = RedisServer::start();
    let store = redis_store(&server, "ends-sealed").await.encrypted([9; 32]);
    let lease = store.lease(Duration::from_secs(5)).await.unwrap().unwrap();
    let pair = Credential::bearer("at-1")
        .unwrap()
        .expires_in(Duration::from_secs(60))
        .with_refresh_token("rt-1");
    assert!(
        store
            .save_left(&lease, &pair, Some(Duration::from_secs(60)))
            .await
            .unwrap()
    );
    let (_, left) = store.load_left().await.unwrap().unwrap();
    let left = left.expect("a sealed value's record is read");
    assert!(
        left > Duration::from_secs(58) && left <= Duration::from_secs(60),
        "{left:?}"
    );
    let marker = Credential::bearer("at-1")
        .unwrap()
        .expires_at(std::time::SystemTime::UNIX_EPOCH);
    assert!(
        store
            .save_left(&lease, &marker, Some(Duration::ZERO))
            .await
            .unwrap()
    );
    let (read, left) = store.load_left().await.unwrap().unwrap();
    assert_eq!(read.expiry(), Some(std::time::SystemTime::UNIX_EPOCH));
    assert_eq!(left, Some(Duration::ZERO));
    let far = Credential::bearer("far")
        .unwrap()
        .expires_at(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799))
        .with_refresh_token("rt-far");
    assert!(
        store
            .save_left(&lease, &far, Some(Duration::MAX))
            .await
            .unwrap()
    );
    let (_, left) = store.load_left().await.unwrap().unwrap();
    let left = left.expect("a capped time left is read");
    assert!(
        left > Duration::from_secs(100_000 * 365 * 86_400),
        "{left:?}: capped near 2^52 ms"
    );
    let forever = Credential::bearer("forever").unwrap();
    assert!(store.save_left(&lease, &forever, None).await.unwrap());
    let (_, left) = store.load_left().await.unwrap().unwrap();
    assert_eq!(left, None);
    assert_eq!(server.cli(&["--scan", "--pattern", "tca:*:ends"]), "");
}

struct Endless(Arc<AtomicUsize>);

impl CredentialSource for Endless {
    async fn fetch(&self, _: FetchContext) -> Result<Credential, BoxError> {
        let n = self.0.fetch_add(1, SeqCst) + 1;
        Ok(Credential::bearer(format!("endless-{n}"))?.expires_in(Duration::from_secs(1 << 60)))
    }
}

/// World: two processes on one real Redis over a source whose credential (no refresh
/// token) says it lives 2^60 s (`expires_in`: representable, so it expires). A asks for
/// a credential, then B.
/// Proves (README: one fetch for the fleet per lifetime; `Credential::lives`: a lifetime
/// too large to represent never expires, one that is representable is kept): B takes
/// A's credential from the store. Counter: fetches (seen 2: the SAVE script sets the key
/// with `PX` of the lifetime in milliseconds, saturated to `u64::MAX`, which Redis
/// refuses, "value is not an integer or out of range"; the same `PX` as before review
/// 124's commit, not introduced by it).
#[tokio::test]
async fn an_endless_lifetime_is_shared_through_redis() {
    let server = RedisServer::start();
    let fetches = Arc::new(AtomicUsize::new(0));
    let process = async || {
        CredentialCache::builder(Endless(fetches.clone()))
            .store(redis_store(&server, "endless").await)
            .build()
            .unwrap()
    };
    let a = process().await;
    let b = process().await;
    let from_a = a.credential().await.unwrap();
    let from_b = b.credential().await.unwrap();
    assert_eq!(
        (fetches.load(SeqCst), from_b == from_a),
        (1, true),
        "keys: {:?}",
        server.cli(&["--scan", "--pattern", "tca:*"])
    );
}

/// World: two processes on one real Redis, clocks in sync, over a scripted endpoint
/// that issues 4 s tokens (`at-N`, `rt-N`); while it answers A's first login, Redis
/// stalls for 2.5 s (`SIGSTOP`, then `SIGCONT`: a fork, a slow disk, a paused VM), so
/// A's save, sent with 4 s left by A's clock, lands 1.8 s late, still under A's lease.
/// B asks for a credential 4.3 s after the login (`at-1` ended 0.3 s ago).
/// Proves (README "Clocks across hosts": neither sends it past its end; "the error is
/// one store call's time"): B does not hand out `at-1` past its end. Counter: the
/// credential B hands out (held in review 124: the late SAVE records Redis's `TIME` on
/// landing plus the 4 s left when A sent it, 2.5 s too late, but A, whose save call was
/// cut at its share, keeps the pair and saves it again once Redis answers, with what is
/// left then, which rewrites the record to the token's real end; seen in the `ends`
/// record, `start + 3.6 s`).
#[cfg(feature = "token")]
#[tokio::test]
async fn a_save_that_lands_late_does_not_move_the_tokens_end() {
    let server = RedisServer::start();
    let info = server.cli(&["INFO", "server"]);
    let pid = info
        .lines()
        .find_map(|line| line.trim().strip_prefix("process_id:"))
        .unwrap()
        .trim()
        .to_owned();
    let idp = support::scripted::Idp::default();
    let issued = Arc::new(AtomicUsize::new(0));
    idp.rule(move |_, _, _| {
        let n = issued.fetch_add(1, SeqCst) + 1;
        if n == 1 {
            let signal = |which: &str, pid: &str| {
                std::process::Command::new("kill")
                    .args([which, pid])
                    .status()
                    .unwrap();
            };
            signal("-STOP", &pid);
            let pid = pid.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(2500));
                signal("-CONT", &pid);
            });
        }
        Some(support::scripted::Scripted::now(
            200,
            None,
            &format!(
                r#"{{"access_token":"at-{n}","refresh_token":"rt-{n}","token_type":"Bearer","expires_in":4}}"#
            ),
        ))
    });
    let process = async || {
        CredentialCache::builder(idp.source())
            .store(redis_store(&server, "late-save").await)
            .window_jitter(0.0)
            .build()
            .unwrap()
    };
    let a = process().await;
    let b = process().await;
    let start = Instant::now();
    assert_eq!(sent(&a.credential().await.unwrap()), "Bearer at-1");
    until(start, Duration::from_millis(4300)).await;
    let later = b.credential().await.unwrap();
    assert_ne!(
        sent(&later),
        "Bearer at-1",
        "B hands out at-1 4.3 s after it was issued, a 4 s token; {:?}",
        idp.brief()
    );
}

/// A host's wall clock that runs as this one's, moved by `step` seconds (signed) when a
/// test steps it (NTP correcting it, a VM's clock set).
#[cfg(feature = "token")]
#[derive(Debug, Clone, Default)]
struct SteppedClock(Arc<std::sync::atomic::AtomicI64>);

#[cfg(feature = "token")]
impl tower_client_auth::clock::Clock for SteppedClock {
    fn now(&self) -> std::time::SystemTime {
        let step = self.0.load(SeqCst);
        let now = std::time::SystemTime::now();
        if step >= 0 {
            now + Duration::from_secs(step as u64)
        } else {
            now - Duration::from_secs(step.unsigned_abs())
        }
    }
}

/// World: two processes on one real Redis; A on the host's clock logs in (`at-1`,
/// `expires_in: 4`); B, on a clock that agrees then, takes `at-1` from the store (its
/// expiry counted on Redis's clock, from B's now). Then B's clock is stepped back 3 s
/// (as NTP steps a clock it finds fast), and 4.4 s after `at-1` was issued B is asked
/// again. Proves (README: an expiring credential is never handed out expired; "Clocks
/// across hosts": the error is one store call's time): a step of the reader's clock
/// after it took the credential does not make it look fresher; B does not hand out
/// `at-1` past its end. Counter: the credential B hands out.
#[cfg(feature = "token")]
#[tokio::test]
async fn a_reader_whose_clock_is_stepped_back_after_loading_does_not_send_past_the_end() {
    let server = RedisServer::start();
    let idp = support::scripted::Idp::default();
    let issued = Arc::new(AtomicUsize::new(0));
    idp.rule(move |_, _, _| {
        let n = issued.fetch_add(1, SeqCst) + 1;
        Some(support::scripted::Scripted::now(
            200,
            None,
            &format!(
                r#"{{"access_token":"at-{n}","refresh_token":"rt-{n}","token_type":"Bearer","expires_in":4}}"#
            ),
        ))
    });
    let b_clock = SteppedClock::default();
    let a = CredentialCache::builder(idp.source())
        .store(redis_store(&server, "stepped-reader").await)
        .window_jitter(0.0)
        .build()
        .unwrap();
    let b = CredentialCache::builder(idp.source())
        .store(redis_store(&server, "stepped-reader").await)
        .clock(b_clock.clone())
        .window_jitter(0.0)
        .build()
        .unwrap();
    let start = Instant::now();
    assert_eq!(sent(&a.credential().await.unwrap()), "Bearer at-1");
    assert_eq!(sent(&b.credential().await.unwrap()), "Bearer at-1");
    b_clock.0.store(-3, SeqCst);
    until(start, Duration::from_millis(4400)).await;
    let later = b.credential().await.unwrap();
    assert_ne!(
        sent(&later),
        "Bearer at-1",
        "B hands out at-1 past its end after its clock was stepped back; {:?}",
        idp.brief()
    );
    // The rotation stayed single: each refresh token presented at most once.
    let presented: Vec<_> = idp
        .brief()
        .into_iter()
        .filter_map(|(_, rt, _)| rt)
        .collect();
    let unique: std::collections::HashSet<_> = presented.iter().collect();
    assert_eq!(presented.len(), unique.len(), "{:?}", idp.brief());
}

/// World: as `a_token_from_a_process_whose_clock_runs_ahead_is_not_sent_past_its_lifetime`
/// (A's clock 3 s ahead of B's, 60 s pairs): A logs in (`at-1`), B takes `at-1` from the
/// store (its times moved to B's clock), the API rejects `at-1` at B, and B rejects it.
/// Then A rejects `at-1` too. Proves (README: a rejected credential is removed for the
/// fleet and refreshed once; a refresh token is presented once): the removal of a
/// credential whose times the load moved still finds the stored one (it is named by its
/// headers), the fleet refreshes once with `rt-1`, and A takes B's `at-2` from the store.
/// Counters: the token requests (2: the login and one refresh), `rt-1` presented once,
/// the credential A hands out.
#[cfg(feature = "token")]
#[tokio::test]
async fn a_rejection_of_a_rebased_credential_refreshes_the_fleet_once() {
    let Skewed {
        _server,
        idp,
        a,
        b,
        start: _,
    } = skewed(
        Duration::from_secs(3),
        Duration::from_secs(60),
        "skew-reject",
    )
    .await;
    let first = a.credential().await.unwrap();
    assert_eq!(sent(&first), "Bearer at-1");
    let at_b = b.credential().await.unwrap();
    assert_eq!(sent(&at_b), "Bearer at-1");
    let fresh = b.reject(&at_b).await.unwrap();
    assert_eq!(sent(&fresh), "Bearer at-2", "{:?}", idp.brief());
    let at_a = a.reject(&first).await.unwrap();
    assert_eq!(sent(&at_a), "Bearer at-2", "{:?}", idp.brief());
    let brief = idp.brief();
    assert_eq!(brief.len(), 2, "{brief:?}");
    assert_eq!(
        brief
            .iter()
            .filter(|(_, rt, _)| rt.as_deref() == Some("rt-1"))
            .count(),
        1,
        "{brief:?}"
    );
}

/// World: a real three-node Redis Cluster; a process on the host's clock logs in to an
/// hour's token and saves it; a second process, whose clock runs 50 minutes ahead,
/// shares the credential's key (its slot on one node) through its own cluster
/// connection. Proves (README "Clocks across hosts": on a Redis Cluster the clock is
/// that of the slot's primary): the `ends` record is written and read on a cluster too
/// (the scripts' keys share a slot), so the process ahead takes the fleet's token with
/// about an hour left by its own clock, instead of counting it 10 minutes from its end
/// and refreshing beside the fleet. Counters: the source's fetches (1), the time left
/// the store reads, the expiry the second process counts.
#[cfg(feature = "token")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_carries_the_ends_record_for_a_process_ahead() {
    let cluster = RedisCluster::start();
    let urls = cluster.urls();
    let nodes: Vec<&str> = urls.iter().map(String::as_str).collect();
    let fetches = Arc::new(AtomicUsize::new(0));
    struct Hourly(Arc<AtomicUsize>);
    impl CredentialSource for Hourly {
        async fn fetch(&self, _cx: FetchContext) -> Result<Credential, BoxError> {
            let n = self.0.fetch_add(1, SeqCst);
            Ok(Credential::bearer(format!("h{n}"))?.expires_in(Duration::from_secs(3600)))
        }
    }
    let writer = CredentialCache::builder(Hourly(fetches.clone()))
        .store(RedisStore::cluster(&nodes, "cluster-ends").await.unwrap())
        .build()
        .unwrap();
    let ahead = OffsetClock {
        ahead: Duration::from_secs(50 * 60),
        behind: Duration::ZERO,
    };
    let reader = CredentialCache::builder(Hourly(fetches.clone()))
        .store(RedisStore::cluster(&nodes, "cluster-ends").await.unwrap())
        .clock(ahead.clone())
        .window_jitter(0.0)
        .build()
        .unwrap();
    let first = writer.credential().await.unwrap();
    let (_, left) = RedisStore::cluster(&nodes, "cluster-ends")
        .await
        .unwrap()
        .load_left()
        .await
        .unwrap()
        .unwrap();
    let left = left.expect("the ends record, read on the cluster");
    assert!(left > Duration::from_secs(3590), "{left:?}");
    let got = reader.credential().await.unwrap();
    assert_eq!(got, first);
    assert_eq!(
        fetches.load(SeqCst),
        1,
        "the process ahead fetched beside the fleet"
    );
    let counted = got
        .expiry()
        .unwrap()
        .duration_since(tower_client_auth::clock::Clock::now(&ahead))
        .unwrap();
    assert!(counted > Duration::from_secs(3590), "{counted:?}");
}
