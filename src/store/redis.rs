//! [`RedisStore`]: the [`CredentialStore`] contract on a real
//! Redis, shared by every process of a fleet (feature `redis`, over redis-rs and its
//! tokio connection manager, which reconnects by itself).
//!
//! Per credential, two keys and a channel that share one hash slot (a hash tag), so each
//! script runs on one node of a Redis Cluster too ([`RedisStore::cluster`]):
//!
//! - `tca:{<id>}:credential`: the credential, `v1:<fingerprint>:<json>`, expiring with it;
//! - `tca:{<id>}:changes`: a pub/sub channel where every save, release and removal is
//!   announced, so processes waiting for a refresh wake when it is saved;
//! - `tca:{<id>}:lease`: the refresh lease, the holder's token, `SET NX PX`, renewed by a
//!   compare-and-extend script while its holder works.
//!
//! `<id>` is a SHA-256 of the namespace you give (name it after the token URL, the
//! client id and the scope or audience: what makes two credentials different), never of
//! a secret. The fingerprint is a SHA-256 of the credential's headers: a rejection
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
//! let store = RedisStore::connect(
//!     "redis://127.0.0.1:6379",
//!     "payments-prod https://auth.example.com/oauth/token client-id=svc-42",
//! )
//! .await?;
//! let layer = AuthLayer::builder(TokenSource::client_credentials(
//!     "https://auth.example.com/oauth/token",
//!     "svc-42",
//!     "secret",
//! )?)
//! .store(store)
//! .origin("https://api.example.com")?
//! .build()?;
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

use base64::Engine as _;
use chacha20poly1305::{
    XChaCha20Poly1305, XNonce,
    aead::{Aead, AeadCore, KeyInit, OsRng, Payload},
};
use http::{HeaderName, HeaderValue};
use redis::{Script, aio::ConnectionManager};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{CredentialStore, Lease};

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

/// How values are written and read: the credential key's name (what a sealed value is
/// bound to) and the sealing key, if any.
#[derive(Clone)]
struct Codec {
    key_name: String,
    sealing: Option<Arc<Sealing>>,
}

struct Sealing {
    cipher: XChaCha20Poly1305,
    /// Keys the fingerprint, so that it tells nothing even of a short API key.
    salt: [u8; 32],
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
    /// start-up, not as a fleet that quietly stops sharing.
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

    /// Asks about the credential's key once: an error now if this user may not.
    async fn checked(self) -> Result<Self, BoxError> {
        let mut connection = self.connection.clone();
        let _: i64 = redis::cmd("EXISTS")
            .arg(&self.keys.credential)
            .query_async(&mut connection)
            .await?;
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

impl Sealing {
    fn new(key: [u8; 32]) -> Self {
        let salt: [u8; 32] = Sha256::new()
            .chain_update(b"tower-client-auth fingerprint salt")
            .chain_update(key)
            .finalize()
            .into();
        Sealing {
            cipher: XChaCha20Poly1305::new(&key.into()),
            salt,
        }
    }
}

impl Codec {
    /// The stored form of `credential`: `v1:<fingerprint>:<json>`, or with a key
    /// `v1x:<fingerprint>:<base64 of nonce and sealed json>`.
    fn encode(&self, credential: &Credential) -> Result<String, BoxError> {
        let fingerprint = self.fingerprint(credential);
        let json = document(credential);
        let Some(sealing) = &self.sealing else {
            return Ok(format!("v1:{fingerprint}:{json}"));
        };
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let sealed = sealing
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: json.as_bytes(),
                    aad: self.key_name.as_bytes(),
                },
            )
            .map_err(|_| "could not encrypt the credential")?;
        let mut bytes = nonce.to_vec();
        bytes.extend_from_slice(&sealed);
        let text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        Ok(format!("v1x:{fingerprint}:{text}"))
    }

    /// The credential in `stored`, or why it cannot be read (never its content).
    fn decode(&self, stored: &str) -> Result<Credential, &'static str> {
        let (sealed, rest) = match (stored.strip_prefix("v1x:"), stored.strip_prefix("v1:")) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            _ => return Err("written by another version"),
        };
        let (_, body) = rest.split_once(':').ok_or("malformed")?;
        match (&self.sealing, sealed) {
            (None, false) => parse(body),
            (None, true) => Err("encrypted, and this store has no key"),
            (Some(_), false) => Err("in plain text, and this store encrypts"),
            (Some(sealing), true) => {
                let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(body)
                    .map_err(|_| "malformed")?;
                if bytes.len() < 24 {
                    return Err("malformed");
                }
                let (nonce, sealed) = bytes.split_at(24);
                let json = sealing
                    .cipher
                    .decrypt(
                        XNonce::from_slice(nonce),
                        Payload {
                            msg: sealed,
                            aad: self.key_name.as_bytes(),
                        },
                    )
                    .map_err(|_| "does not open with this store's key and key name")?;
                parse(std::str::from_utf8(&json).map_err(|_| "malformed")?)
            }
        }
    }

    /// A SHA-256 of the credential's headers, names and values (keyed when values are
    /// encrypted): equal for equal credentials, and telling nothing of the secret.
    fn fingerprint(&self, credential: &Credential) -> String {
        let mut hash = Sha256::new();
        if let Some(sealing) = &self.sealing {
            hash.update(sealing.salt);
        }
        for (name, value) in credential.headers() {
            hash.update(name.as_str().as_bytes());
            hash.update([0]);
            hash.update(value.as_bytes());
            hash.update([0]);
        }
        hex(&hash.finalize()[..16])
    }
}

impl CredentialStore for RedisStore {
    async fn load(&self) -> Result<Option<Credential>, BoxError> {
        let mut connection = self.connection.clone();
        let stored: Option<String> = redis::cmd("GET")
            .arg(&self.keys.credential)
            .query_async(&mut connection)
            .await?;
        let Some(stored) = stored else {
            return Ok(None);
        };
        match self.codec.decode(&stored) {
            Ok(credential) => Ok(Some(credential)),
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
        let set: Option<String> = redis::cmd("SET")
            .arg(&self.keys.lease)
            .arg(lease.token())
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl).max(1))
            .query_async(&mut connection)
            .await?;
        Ok(set.map(|_| lease))
    }

    async fn save(&self, lease: &Lease, credential: &Credential) -> Result<bool, BoxError> {
        let mut connection = self.connection.clone();
        // The key lives as long as the credential (no expiry: until it is replaced).
        let ttl = credential
            .expiry()
            .map(|at| millis(at.duration_since(SystemTime::now()).unwrap_or_default()).max(1));
        let saved: i64 = Script::new(SAVE)
            .key(&self.keys.credential)
            .key(&self.keys.lease)
            .arg(lease.token())
            .arg(self.codec.encode(credential)?)
            .arg(ttl.unwrap_or(0))
            .arg(&self.keys.changes)
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
            .arg(self.codec.fingerprint(rejected))
            .arg(&self.keys.changes)
            .invoke_async(&mut connection)
            .await?;
        Ok(())
    }

    async fn changed(&self, timeout: Duration) {
        match &self.listener {
            Some(listener) => {
                let _ = tokio::time::timeout(timeout, listener.changes.notified()).await;
            }
            None => tokio::time::sleep(timeout).await,
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

/// Sets the credential only while the caller's token holds the lease.
const SAVE: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
redis.call('PUBLISH', ARGV[4], 'saved')
return 1
";

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
/// between the first two colons, whatever the form).
const REMOVE: &str = r"
local stored = redis.call('GET', KEYS[1])
if not stored then return 0 end
local first = string.find(stored, ':', 1, true)
if not first then return 0 end
local second = string.find(stored, ':', first + 1, true)
if second and string.sub(stored, first + 1, second - 1) == ARGV[1] then
  redis.call('PUBLISH', ARGV[2], 'removed')
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// The credential as JSON: its headers, expiry and issue time (milliseconds).
fn document(credential: &Credential) -> String {
    let headers: Vec<Value> = credential
        .headers()
        .map(|(name, value)| json!([name.as_str(), String::from_utf8_lossy(value.as_bytes())]))
        .collect();
    json!({
        "h": headers,
        "exp": credential.expiry().map(unix_millis),
        "iat": credential.issued().map(unix_millis),
        "rt": credential.refresh_token().map(|t| t.expose()),
    })
    .to_string()
}

fn parse(json: &str) -> Result<Credential, &'static str> {
    const MALFORMED: &str = "malformed";
    let doc: Value = serde_json::from_str(json).map_err(|_| MALFORMED)?;
    let headers = doc["h"]
        .as_array()
        .ok_or(MALFORMED)?
        .iter()
        .map(|pair| {
            let name = pair[0].as_str().ok_or(MALFORMED)?;
            let value = pair[1].as_str().ok_or(MALFORMED)?;
            Ok((
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| MALFORMED)?,
                HeaderValue::from_str(value).map_err(|_| MALFORMED)?,
            ))
        })
        .collect::<Result<Vec<_>, &'static str>>()?;
    let mut credential = Credential::from_headers(headers).map_err(|_| MALFORMED)?;
    if let Some(at) = doc["iat"].as_u64() {
        credential = credential.issued_at(UNIX_EPOCH + Duration::from_millis(at));
    }
    if let Some(at) = doc["exp"].as_u64() {
        credential = credential.expires_at(UNIX_EPOCH + Duration::from_millis(at));
    }
    if let Some(token) = doc["rt"].as_str() {
        credential = credential.with_refresh_token(token);
    }
    Ok(credential)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn unix_millis(at: SystemTime) -> u64 {
    millis(at.duration_since(UNIX_EPOCH).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec(key_name: &str, key: Option<[u8; 32]>) -> Codec {
        Codec {
            key_name: key_name.into(),
            sealing: key.map(|key| Arc::new(Sealing::new(key))),
        }
    }

    fn credential() -> Credential {
        let issued = UNIX_EPOCH + Duration::from_millis(1_800_000_000_123);
        Credential::from_headers([
            (
                HeaderName::from_static("authorization"),
                HeaderValue::from_static("Bearer s3cr3t"),
            ),
            (
                HeaderName::from_static("x-tenant"),
                HeaderValue::from_static("t1"),
            ),
        ])
        .unwrap()
        .lives(issued, Duration::from_secs(3600))
        .with_refresh_token("rt-s3cr3t")
    }

    /// A credential survives the trip through its stored form, plain and sealed, expiry
    /// and issue time included (to the millisecond); the fingerprint names it without
    /// its secret.
    #[test]
    fn the_stored_form_round_trips_plain_and_sealed() {
        let credential = credential();
        for codec in [codec("k", None), codec("k", Some([1; 32]))] {
            let stored = codec.encode(&credential).unwrap();
            let back = codec.decode(&stored).unwrap();
            assert_eq!(back, credential);
            assert_eq!(back.expiry(), credential.expiry());
            assert_eq!(back.issued(), credential.issued());
            assert_eq!(back.refresh_token(), credential.refresh_token());
            let fingerprint = codec.fingerprint(&credential);
            assert!(stored.contains(&fingerprint));
            assert!(!fingerprint.contains("s3cr3t"));
        }
        let sealed = codec("k", Some([1; 32])).encode(&credential).unwrap();
        assert!(
            !sealed.contains("s3cr3t") && !sealed.contains("tenant") && !sealed.contains("rt-"),
            "{sealed}"
        );
        assert_ne!(
            codec("k", None).fingerprint(&credential),
            codec("k", Some([1; 32])).fingerprint(&credential),
            "the sealed fingerprint is keyed"
        );
    }

    /// What cannot be read is refused, saying why and never what it holds: another
    /// version, garbage, a sealed value under another key or bound to another key name,
    /// plain text where a key is set, a sealed value where none is.
    #[test]
    fn what_cannot_be_read_is_refused() {
        let credential = credential();
        let plain = codec("k", None);
        let sealed = codec("k", Some([1; 32]));
        let other_key = codec("k", Some([2; 32]));
        let other_name = codec("other", Some([1; 32]));
        let sealed_value = sealed.encode(&credential).unwrap();
        let plain_value = plain.encode(&credential).unwrap();
        for (codec, value) in [
            (&plain, "v2:ab:{}".to_owned()),
            (&plain, "v1:ab:{not json".to_owned()),
            (
                &plain,
                "v1:ab:{\"h\":[[\"authorization\",\"Bearer \\n x\"]]}".to_owned(),
            ),
            (&plain, sealed_value.clone()),
            (&sealed, plain_value.clone()),
            (&other_key, sealed_value.clone()),
            (&other_name, sealed_value.clone()),
            (
                &sealed,
                format!("{}x", &sealed_value[..sealed_value.len() - 2]),
            ),
        ] {
            let why = codec.decode(&value).unwrap_err();
            assert!(!why.contains("s3cr3t") && !why.contains("Bearer"), "{why}");
        }
    }
}
