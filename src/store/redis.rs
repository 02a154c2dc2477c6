//! [`RedisStore`]: the [`CredentialStore`] contract on a real
//! Redis, shared by every process of a fleet (feature `redis`, over redis-rs and its
//! tokio connection manager, which reconnects by itself).
//!
//! Per credential, four keys and a channel that share one hash slot (a hash tag), so each
//! script runs on one node of a Redis Cluster too ([`RedisStore::cluster`]):
//!
//! - `tca:{<id>}:credential`: the credential, `v1:<fingerprint>:<json>`, expiring with it
//!   (one carrying a refresh token does not expire: it stays until it is replaced; nor
//!   does one saved already expired: that is the record a lease holder leaves when it
//!   takes a pair's refresh token out to present it, which a process that kept a pair
//!   through an outage reads, as in every store, to tell whether its own save may have
//!   been taken meanwhile);
//! - `tca:{<id>}:ends`: for a credential that expires, when it ends on Redis's clock
//!   (`<SHA-1 of the stored value>:<milliseconds>`, from the time it had left by its
//!   writer's clock, [`CredentialStore::save_left`]), written and expiring with it: a
//!   reader counts what is left of it there ([`CredentialStore::load_left`]), so
//!   processes whose wall clocks disagree agree on when a shared credential ends. A
//!   value without a record of its own (none, or another value's: an earlier version
//!   wrote the value alone) is read by its own times, on its writer's clock;
//! - `tca:{<id>}:changes`: a pub/sub channel where every save, release and removal is
//!   announced, so processes waiting for a refresh wake when it is saved;
//! - `tca:{<id>}:lease`: the refresh lease, the holder's token, `SET NX PX`, renewed by a
//!   compare-and-extend script while its holder works;
//! - `tca:{<id>}:hold`: the token endpoint's latest `Retry-After` for the fleet, in
//!   milliseconds since the Unix epoch on the writer's clock, expiring when the hold ends
//!   on Redis's clock, which readers count ([`CredentialStore::hold_left`]; one written
//!   by [`CredentialStore::hold`] expires a little over
//!   [`MAX_RETRY_AFTER`](crate::cache::MAX_RETRY_AFTER) after it is written, and is
//!   counted on the reader's clock).
//!
//! `<id>` is a SHA-256 of the namespace you give: for a token source,
//! [`TokenSource::store_namespace`](crate::token::TokenSource::store_namespace) names the
//! token URL, the client id, the scope and audience (what makes two credentials
//! different), never a secret. The fingerprint is a SHA-256 of the credential's headers: a rejection
//! removes the stored credential by comparing fingerprints, and the secret never travels
//! in a script's arguments. Saving checks the lease in the same script (a fenced write);
//! releasing and removing are compare-and-delete scripts.
//!
//! Without a key the credential's headers are stored as they are sent: anyone who can
//! read the key can use the credential. [`RedisStore::encrypted`] encrypts and
//! authenticates every value (XChaCha20-Poly1305, bound to its key name, so a value
//! copied under another credential's key does not open); the fingerprint is then keyed
//! too. Restrict the keys with a Redis ACL user (`redis://user:pass@`) either way.
//!
//! A value that cannot be read (corrupt, from another version, under another key, or in
//! plain text where a key is set) counts as absent: it is never sent, it is logged once,
//! and the next refresh overwrites it.
//!
//! ```no_run
//! use tower_client_auth::{AuthLayer, store::redis::RedisStore, token::TokenSource};
//!
//! # async fn run() -> Result<(), tower_client_auth::BoxError> {
//! let source = TokenSource::client_credentials(
//!     "https://auth.example.com/oauth/token",
//!     "svc-42",
//!     "secret",
//! )?;
//! // Token URL, client id, scope...: what names this credential, never a secret.
//! let namespace = source.store_namespace("payments-prod");
//! let store = RedisStore::connect("redis://127.0.0.1:6379", &namespace).await?;
//! let layer = AuthLayer::builder(source)
//!     .store(store)
//!     .origin("https://api.example.com")?
//!     .build()?;
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use redis::{Script, aio::ConnectionManager};
use sha2::{Digest, Sha256};

use super::{
    CredentialStore, Lease,
    codec::{Codec, Sealing, hex, millis, unix_millis},
};

use crate::{credential::Credential, error::BoxError};
/// The Redis client crate (redis-rs) this store is built on, for building a client or a
/// connection of one's own ([`RedisStore::from_client`], [`RedisStore::new`]).
pub use ::redis as redis_rs;

/// The store's keys for one credential.
#[derive(Clone)]
struct Keys {
    credential: String,
    lease: String,
    /// The pub/sub channel every save, release and removal is announced on.
    changes: String,
    /// The token endpoint's hold (see [`CredentialStore::hold`]).
    hold: String,
    /// When the stored credential ends on Redis's clock (see [`CredentialStore::save_left`]).
    ends: String,
}

/// A [`CredentialStore`] on Redis. See the [module docs](self).
#[derive(Clone)]
pub struct RedisStore {
    connection: Connection,
    keys: Keys,
    codec: Codec,
    /// Whether an unreadable value was logged already (once per store).
    unreadable_logged: Arc<AtomicBool>,
    /// Wakes waiters when another process announces a change; `None`: they poll.
    listener: Option<Arc<Listener>>,
}

/// What the store's subscriber task signals through. The task ends when the last store
/// clone drops this (its `stop` sender with it).
struct Listener {
    changes: tokio::sync::Notify,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// One server (through the reconnecting manager) or a cluster (through redis-rs's
/// cluster client, which routes each call by its keys' slot).
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(cmd, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("credential_key", &self.keys.credential)
            .field("encrypted", &self.codec.sealing.is_some())
            .field("notified", &self.listener.is_some())
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to the Redis at `url` (`redis://[user:password@]host:port[/db]`), for the
    /// credential `namespace` names, and subscribes to its changes (see
    /// [`notified_by`](Self::notified_by)). The connections reconnect by themselves after
    /// an outage.
    ///
    /// An ACL user goes in the URL. `rediss://` (TLS) needs the feature `redis-tls` and
    /// trusts the system's roots; for a private CA or a client certificate, build the
    /// client with [`redis_rs::Client::build_with_tls`] and use
    /// [`from_client`](Self::from_client).
    pub async fn connect(url: &str, namespace: &str) -> Result<Self, BoxError> {
        RedisStore::from_client(redis::Client::open(url)?, namespace).await
    }

    /// Over a redis-rs client of your own making (TLS settings, a private CA, a client
    /// certificate, an ACL user): a reconnecting connection manager for the calls and a
    /// subscription for the changes, as [`connect`](Self::connect) makes.
    ///
    /// Fails when the server cannot be reached or refuses this user the store's keys (a
    /// missing or wrong password, an ACL without `~tca:*`): a misconfiguration shows at
    /// start-up, not as a fleet that quietly stops sharing. Logs a warning when the
    /// server has a memory limit and a policy that may evict the store's keys (anything
    /// but `maxmemory-policy noeviction`): an evicted lease lets two processes refresh
    /// at once, an evicted refresh token costs the fleet a login.
    pub async fn from_client(client: redis::Client, namespace: &str) -> Result<Self, BoxError> {
        // Few retries per connection attempt: a refused password fails start-up at once,
        // and in an outage every store call (bounded by the cache) tries again anyway.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let connection = ConnectionManager::new_with_config(client.clone(), config).await?;
        RedisStore::new(connection, namespace)
            .checked()
            .await?
            .notified_by(client)
            .await
    }

    /// Asks about the credential's key once: an error now if this user may not. Then
    /// reads the server's eviction settings, and warns if it may evict the store's keys
    /// (see [`evicting`]).
    async fn checked(self) -> Result<Self, BoxError> {
        let mut connection = self.connection.clone();
        let _: i64 = redis::cmd("EXISTS")
            .arg(&self.keys.credential)
            .query_async(&mut connection)
            .await?;
        let info = redis::cmd("INFO")
            .arg("memory")
            .query_async::<redis::Value>(&mut connection)
            .await;
        match info.as_ref().map(evicting) {
            Ok(Some(policy)) => tracing::warn!(
                policy = %crate::text::escape(&policy, 40),
                "this Redis has a memory limit and may evict the store's keys under memory \
                 pressure: an evicted lease lets two processes refresh at once, an evicted \
                 refresh token makes the fleet sign in again; set `maxmemory-policy \
                 noeviction` (or no `maxmemory`)"
            ),
            Ok(None) => {}
            // An ACL without `INFO`: nothing to tell, and nothing wrong with the store.
            Err(err) => {
                tracing::debug!(error = %crate::text::foreign(&err.to_string()), "could not read the server's eviction settings")
            }
        }
        Ok(self)
    }

    /// Over a connection manager of your own, for the credential `namespace` names.
    /// Without [`notified_by`](Self::notified_by), a cache waiting for another process's
    /// refresh polls.
    pub fn new(connection: ConnectionManager, namespace: &str) -> Self {
        RedisStore::over(Connection::Single(connection), namespace)
    }

    /// Connects to the Redis Cluster that `nodes` (`redis://host:port` URLs, one or more)
    /// belong to, for the credential `namespace` names, and subscribes to its changes
    /// through the first node (a cluster passes every `PUBLISH` to all its nodes). A
    /// credential's keys share one hash slot, so every script runs on one node.
    pub async fn cluster(nodes: &[&str], namespace: &str) -> Result<Self, BoxError> {
        let first = nodes.first().ok_or("no cluster node given")?;
        let connection = redis::cluster::ClusterClient::new(nodes.to_vec())?
            .get_async_connection()
            .await?;
        RedisStore::over_cluster(connection, namespace)
            .checked()
            .await?
            .notified_by(redis::Client::open(*first)?)
            .await
    }

    /// Over a cluster connection of your own, for the credential `namespace` names.
    /// Without [`notified_by`](Self::notified_by) (a client for any one node), a cache
    /// waiting for another process's refresh polls.
    pub fn over_cluster(
        connection: redis::cluster_async::ClusterConnection,
        namespace: &str,
    ) -> Self {
        RedisStore::over(Connection::Cluster(connection), namespace)
    }

    fn over(connection: Connection, namespace: &str) -> Self {
        let id = hex(&Sha256::digest(namespace.as_bytes())[..12]);
        let keys = Keys {
            credential: format!("tca:{{{id}}}:credential"),
            lease: format!("tca:{{{id}}}:lease"),
            changes: format!("tca:{{{id}}}:changes"),
            hold: format!("tca:{{{id}}}:hold"),
            ends: format!("tca:{{{id}}}:ends"),
        };
        RedisStore {
            connection,
            codec: Codec {
                key_name: keys.credential.clone(),
                sealing: None,
            },
            keys,
            unreadable_logged: Arc::default(),
            listener: None,
        }
    }

    /// Subscribes, through its own connection from `client`, to the changes other
    /// processes announce (every save, lease release and removal is published), so a
    /// cache waiting for another process's refresh wakes as soon as it is saved instead
    /// of at its next poll. Subscribed before it returns; after an outage a task
    /// subscribes again (and polling covers the gap). The task ends with the last clone
    /// of this store.
    pub async fn notified_by(mut self, client: redis::Client) -> Result<Self, BoxError> {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(&self.keys.changes).await?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let listener = Arc::new(Listener {
            changes: tokio::sync::Notify::new(),
            _stop: stop,
        });
        tokio::spawn(listen(
            client,
            self.keys.changes.clone(),
            pubsub,
            Arc::downgrade(&listener),
            stopped,
        ));
        self.listener = Some(listener);
        Ok(self)
    }

    /// Encrypts and authenticates every stored value with `key` (XChaCha20-Poly1305, a
    /// random nonce per value, the value bound to its key name). Every process of the
    /// fleet needs the same key; a value that does not open with it counts as absent.
    pub fn encrypted(mut self, key: [u8; 32]) -> Self {
        self.codec.sealing = Some(Arc::new(Sealing::new(key)));
        self
    }
}

/// The eviction policy of a server `INFO memory` describes (of any node, for a cluster,
/// whose answer is one text per node) when it may evict this store's keys: a memory
/// limit (`maxmemory` above 0) with any policy but `noeviction`. `allkeys-*` may evict
/// the stored refresh token and the record a refresh leaves; `volatile-*` the lease (it
/// has a TTL) and an access token.
fn evicting(info: &redis::Value) -> Option<String> {
    let mut texts = Vec::new();
    texts_of(info, &mut texts);
    texts.into_iter().find_map(|text| {
        let field = |name: &str| {
            text.lines()
                .find_map(|line| line.trim_end().strip_prefix(name)?.strip_prefix(':'))
        };
        let limit = field("maxmemory")?.parse::<u64>().ok()?;
        let policy = field("maxmemory_policy")?;
        (limit > 0 && policy != "noeviction").then(|| policy.to_owned())
    })
}

/// Every text in `value`, however nested (a cluster answers `INFO` with one per node).
fn texts_of(value: &redis::Value, texts: &mut Vec<String>) {
    match value {
        redis::Value::BulkString(bytes) => texts.push(String::from_utf8_lossy(bytes).into_owned()),
        redis::Value::SimpleString(text) | redis::Value::VerbatimString { text, .. } => {
            texts.push(text.clone())
        }
        redis::Value::Array(values) | redis::Value::Set(values) => {
            values.iter().for_each(|v| texts_of(v, texts))
        }
        redis::Value::Attribute { data, .. } => texts_of(data, texts),
        redis::Value::Map(pairs) => pairs.iter().for_each(|(k, v)| {
            texts_of(k, texts);
            texts_of(v, texts)
        }),
        _ => {}
    }
}

impl CredentialStore for RedisStore {
    async fn load(&self) -> Result<Option<Credential>, BoxError> {
        Ok(self.load_left().await?.map(|(credential, _)| credential))
    }

    /// The credential, with what is left of it on Redis's clock when its writer said
    /// ([`save_left`](CredentialStore::save_left)): the time its `ends` record names less
    /// Redis's `TIME`, read in one script.
    async fn load_left(&self) -> Result<Option<(Credential, Option<Duration>)>, BoxError> {
        let mut connection = self.connection.clone();
        let stored: Option<Vec<String>> = Script::new(LOAD)
            .key(&self.keys.credential)
            .key(&self.keys.ends)
            .invoke_async(&mut connection)
            .await?;
        let Some(stored) = stored else {
            return Ok(None);
        };
        let Some(value) = stored.first() else {
            return Ok(None);
        };
        match self.codec.decode(value) {
            Ok(credential) => {
                let left = (stored.get(1))
                    .and_then(|left| left.parse().ok())
                    .map(Duration::from_millis);
                Ok(Some((credential, left)))
            }
            Err(why) => {
                // Absent: never sent; the next refresh overwrites it.
                if !self.unreadable_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(key = %self.keys.credential, why, "stored credential cannot be read; ignoring it");
                }
                Ok(None)
            }
        }
    }

    async fn lease(&self, ttl: Duration) -> Result<Option<Lease>, BoxError> {
        let mut connection = self.connection.clone();
        let lease = Lease::new();
        let mut unanswered = Unanswered {
            release: Some((self.connection.clone(), self.keys.clone(), lease.clone())),
            ttl,
        };
        let set: Option<String> = redis::cmd("SET")
            .arg(&self.keys.lease)
            .arg(lease.token())
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl).max(1))
            .query_async(&mut connection)
            .await?;
        unanswered.release = None;
        Ok(set.map(|_| lease))
    }

    async fn save(&self, lease: &Lease, credential: &Credential) -> Result<bool, BoxError> {
        // What is left of it by this host's clock.
        let now = SystemTime::now();
        let left = (credential.expiry()).map(|at| at.duration_since(now).unwrap_or_default());
        self.save_left(lease, credential, left).await
    }

    async fn save_left(
        &self,
        lease: &Lease,
        credential: &Credential,
        left: Option<Duration>,
    ) -> Result<bool, BoxError> {
        let mut connection = self.connection.clone();
        // The key lives as long as the credential (no expiry: until it is replaced). A
        // refresh token outlives its access token: a pair stays until it is replaced, so
        // that a fleet idle past the access token's expiry refreshes instead of logging in.
        // One saved already expired (a pair whose refresh token a holder took out) stays
        // until it is replaced too: it records that the refresh token was taken (see the
        // module docs), and is never sent.
        // Without one, a credential expires with it: what is left of it by the writer's
        // clock, never more than its lifetime.
        let ttl = left
            .filter(|left| !left.is_zero() && credential.refresh_token().is_none())
            .map(|left| credential.lifetime().map_or(left, |life| left.min(life)))
            .map(|left| millis(left).clamp(1, MAX_LEFT));
        // When it ends on Redis's clock is recorded beside it, for readers whose clocks
        // disagree with this one.
        let left = left.map_or(String::new(), |left| millis(left).min(MAX_LEFT).to_string());
        let saved: i64 = Script::new(SAVE)
            .key(&self.keys.credential)
            .key(&self.keys.lease)
            .key(&self.keys.ends)
            .arg(lease.token())
            .arg(self.codec.encode(credential)?)
            .arg(ttl.unwrap_or(0))
            .arg(&self.keys.changes)
            .arg(left)
            .invoke_async(&mut connection)
            .await?;
        Ok(saved == 1)
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, BoxError> {
        let mut connection = self.connection.clone();
        let renewed: i64 = Script::new(RENEW)
            .key(&self.keys.lease)
            .arg(lease.token())
            .arg(millis(ttl).max(1))
            .invoke_async(&mut connection)
            .await?;
        Ok(renewed == 1)
    }

    async fn release(&self, lease: &Lease) -> Result<(), BoxError> {
        let mut connection = self.connection.clone();
        let _: i64 = Script::new(RELEASE)
            .key(&self.keys.lease)
            .arg(lease.token())
            .arg(&self.keys.changes)
            .invoke_async(&mut connection)
            .await?;
        Ok(())
    }

    async fn remove(&self, rejected: &Credential) -> Result<(), BoxError> {
        let mut connection = self.connection.clone();
        let _: i64 = Script::new(REMOVE)
            .key(&self.keys.credential)
            .key(&self.keys.ends)
            .arg(self.codec.fingerprint(rejected))
            .arg(&self.keys.changes)
            .invoke_async(&mut connection)
            .await?;
        Ok(())
    }

    async fn hold(&self, until: SystemTime) -> Result<(), BoxError> {
        let mut connection = self.connection.clone();
        // `until` is on the writer's clock, which may not be this host's: the key lives
        // as long as the longest hold a reader takes, whatever the clocks say.
        let _: () = redis::cmd("SET")
            .arg(&self.keys.hold)
            .arg(unix_millis(until))
            .arg("PX")
            .arg(millis(crate::cache::MAX_RETRY_AFTER + HOLD_MARGIN))
            .query_async(&mut connection)
            .await?;
        Ok(())
    }

    /// The hold's key expires when the hold ends, on Redis's clock: a reader counts what
    /// is left of it there ([`held_left`](CredentialStore::held_left)), whatever its own
    /// wall clock and the writer's say.
    async fn hold_left(&self, until: SystemTime, left: Duration) -> Result<(), BoxError> {
        let mut connection = self.connection.clone();
        let _: () = redis::cmd("SET")
            .arg(&self.keys.hold)
            .arg(unix_millis(until))
            .arg("PX")
            .arg(millis(left.min(crate::cache::MAX_RETRY_AFTER)).max(1))
            .query_async(&mut connection)
            .await?;
        Ok(())
    }

    async fn held_left(&self) -> Result<Option<(SystemTime, Option<Duration>)>, BoxError> {
        let mut connection = self.connection.clone();
        let (held, left): (Option<String>, i64) = redis::pipe()
            .cmd("GET")
            .arg(&self.keys.hold)
            .cmd("PTTL")
            .arg(&self.keys.hold)
            .query_async(&mut connection)
            .await?;
        // Not a number: no hold (the next one overwrites it).
        let Some(until) = held
            .and_then(|held| held.parse::<u64>().ok())
            .and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms)))
        else {
            return Ok(None);
        };
        // Kept for longer than any hold (written by `hold`, an earlier version's, which
        // keeps it past the longest hold), or without an expiry (by hand): its time, not
        // Redis's.
        let left = u64::try_from(left)
            .ok()
            .map(Duration::from_millis)
            .filter(|left| *left <= crate::cache::MAX_RETRY_AFTER);
        Ok(Some((until, left)))
    }

    async fn held_until(&self) -> Result<Option<SystemTime>, BoxError> {
        let mut connection = self.connection.clone();
        let held: Option<String> = redis::cmd("GET")
            .arg(&self.keys.hold)
            .query_async(&mut connection)
            .await?;
        // Not a number: no hold (the next one overwrites it).
        Ok(held
            .and_then(|held| held.parse::<u64>().ok())
            .and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms))))
    }

    fn changed(&self, timeout: Duration) -> impl std::future::Future<Output = ()> + Send {
        // Registered now: a change announced from here on wakes it.
        let notified = self.listener.as_ref().map(|listener| {
            let mut notified = Box::pin(listener.changes.notified());
            notified.as_mut().enable();
            notified
        });
        async move {
            match notified {
                Some(notified) => {
                    let _ = tokio::time::timeout(timeout, notified).await;
                }
                None => tokio::time::sleep(timeout).await,
            }
        }
    }
}

/// The subscriber task: wakes waiters on every announced change; after a lost connection,
/// subscribes again every second until it can; ends when the store is dropped.
async fn listen(
    client: redis::Client,
    channel: String,
    first: redis::aio::PubSub,
    listener: std::sync::Weak<Listener>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    use futures_util::{
        StreamExt as _,
        future::{Either, select},
    };
    let wake = || match listener.upgrade() {
        Some(listener) => {
            listener.changes.notify_waiters();
            true
        }
        None => false,
    };
    let mut pubsub = Some(first);
    loop {
        let session = async {
            let mut pubsub = match pubsub.take() {
                Some(pubsub) => pubsub,
                None => {
                    let Ok(mut pubsub) = client.get_async_pubsub().await else {
                        return;
                    };
                    if pubsub.subscribe(&channel).await.is_err() {
                        return;
                    }
                    // Changes may have been missed while unsubscribed.
                    wake();
                    pubsub
                }
            };
            let mut messages = pubsub.on_message();
            while messages.next().await.is_some() {
                if !wake() {
                    return;
                }
            }
        };
        if let Either::Right(_) = select(std::pin::pin!(session), &mut stopped).await {
            return;
        }
        let pause = tokio::time::sleep(Duration::from_secs(1));
        if let Either::Right(_) = select(std::pin::pin!(pause), &mut stopped).await {
            return;
        }
    }
}

/// A lease call that ended without its answer: given up on (the cache's share of the
/// fetch timeout ran out while Redis stalled) or failed on the way. Its `SET` may still
/// land when Redis answers again, a lease nobody holds that would hold every refresh of
/// the fleet back for its whole length: dropped unanswered, this sends the release
/// behind it on the same connection, whose commands Redis runs in order (a
/// compare-and-delete, so it frees only that lease). Bounded by the lease's length,
/// past which the lease is gone by itself.
struct Unanswered {
    release: Option<(Connection, Keys, Lease)>,
    ttl: Duration,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        let Some((mut connection, keys, lease)) = self.release.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let until = tokio::time::Instant::now().checked_add(self.ttl);
        runtime.spawn(async move {
            let script = Script::new(RELEASE);
            let mut invocation = script.key(&keys.lease);
            invocation.arg(lease.token()).arg(&keys.changes);
            let release = invocation.invoke_async::<i64>(&mut connection);
            match until.and_then(crate::cache::timers::sleep_until) {
                Some(sleep) => {
                    let _ = futures_util::future::select(
                        std::pin::pin!(release),
                        std::pin::pin!(sleep),
                    )
                    .await;
                }
                None => drop(release.await),
            }
        });
    }
}

/// Sets the credential only while the caller's token holds the lease, and beside it, for
/// one that expires, when it ends on Redis's clock (`<SHA-1 of the value>:<milliseconds>`),
/// expiring with it; for one that does not, or where this user may not ask the time (an
/// ACL without `TIME`), no such record (its readers take its times as written).
const SAVE: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if redis.replicate_commands then redis.replicate_commands() end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
local t = ARGV[5] ~= '' and redis.pcall('TIME')
if not t or t.err then
  redis.call('DEL', KEYS[3])
else
  local ends = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[5])
  local record = redis.sha1hex(ARGV[2]) .. ':' .. string.format('%.0f', ends)
  if tonumber(ARGV[3]) > 0 then
    redis.call('SET', KEYS[3], record, 'PX', ARGV[3])
  else
    redis.call('SET', KEYS[3], record)
  end
end
redis.call('PUBLISH', ARGV[4], 'saved')
return 1
";

/// The credential, and if a record of when it ends is beside it, and that record is of
/// this very value (the SHA-1 of the stored string: not of another value with the same
/// headers, such as the record an earlier version's save left of a pair it then marked
/// spent), the milliseconds left of it on Redis's clock (not where this user may not
/// ask the time).
const LOAD: &str = r"
local stored = redis.call('GET', KEYS[1])
if not stored then return false end
local record = redis.call('GET', KEYS[2])
if not record or string.sub(record, 1, 41) ~= redis.sha1hex(stored) .. ':' then return {stored} end
local ends = tonumber(string.sub(record, 42))
local t = redis.pcall('TIME')
if not ends or t.err then return {stored} end
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {stored, string.format('%.0f', math.max(0, ends - now))}
";

/// The longest time left a save records, and the longest expiry it sets on a key (about
/// 140,000 years): beyond it, milliseconds lose their precision in Redis's Lua numbers,
/// and Redis refuses an expiry past what its clock holds.
const MAX_LEFT: u64 = 1 << 52;

/// How long the hold's key outlives the longest hold a reader takes.
const HOLD_MARGIN: Duration = Duration::from_secs(5);

/// Extends the lease only if the caller's token still holds it.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
";

/// Deletes the lease only if the caller's token still holds it.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PUBLISH', ARGV[2], 'released')
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Deletes the credential only if it is the one with the given fingerprint (the field
/// between the first two colons, whatever the form), and the record of when it ends.
const REMOVE: &str = r"
local stored = redis.call('GET', KEYS[1])
if not stored then return 0 end
local first = string.find(stored, ':', 1, true)
if not first then return 0 end
local second = string.find(stored, ':', first + 1, true)
if second and string.sub(stored, first + 1, second - 1) == ARGV[1] then
  redis.call('PUBLISH', ARGV[2], 'removed')
  redis.call('DEL', KEYS[2])
  return redis.call('DEL', KEYS[1])
end
return 0
";
