//! [`RedisStore`]: the [`CredentialStore`] contract on a real
//! Redis, shared by every process of a fleet (feature `redis`, over redis-rs and its
//! tokio connection manager, which reconnects by itself).
//!
//! Per credential, two keys that share one hash slot (a hash tag), so each script runs on
//! one node of a Redis Cluster too:
//!
//! - `tca:{<id>}:credential`: the credential, `v1:<fingerprint>:<json>`, expiring with it;
//! - `tca:{<id>}:lease`: the refresh lease, the holder's token, `SET NX PX`.
//!
//! `<id>` is a SHA-256 of the namespace you give (name it after the token URL, the
//! client id and the scope or audience: what makes two credentials different), never of
//! a secret. The fingerprint is a SHA-256 of the credential's headers: a rejection
//! removes the stored credential by comparing fingerprints, and the secret never travels
//! in a script's arguments. Saving checks the lease in the same script (a fenced write);
//! releasing and removing are compare-and-delete scripts.
//!
//! The credential's headers are stored as they are sent: anyone who can read the key
//! can use the credential. Restrict the keys with a Redis ACL user (`redis://user:pass@`).
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
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http::{HeaderName, HeaderValue};
use redis::{Script, aio::ConnectionManager};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{CredentialStore, Lease};
use crate::{credential::Credential, error::BoxError};

/// The store's keys for one credential.
#[derive(Clone)]
struct Keys {
    credential: String,
    lease: String,
}

/// A [`CredentialStore`] on Redis. See the [module docs](self).
#[derive(Clone)]
pub struct RedisStore {
    connection: ConnectionManager,
    keys: Keys,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("credential_key", &self.keys.credential)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to the Redis at `url` (`redis://[user:password@]host:port[/db]`), for the
    /// credential `namespace` names. The connection reconnects by itself after an outage.
    pub async fn connect(url: &str, namespace: &str) -> Result<Self, BoxError> {
        let client = redis::Client::open(url)?;
        let connection = ConnectionManager::new(client).await?;
        Ok(RedisStore::new(connection, namespace))
    }

    /// Over a connection manager of your own, for the credential `namespace` names.
    pub fn new(connection: ConnectionManager, namespace: &str) -> Self {
        let id = hex(&Sha256::digest(namespace.as_bytes())[..12]);
        RedisStore {
            connection,
            keys: Keys {
                credential: format!("tca:{{{id}}}:credential"),
                lease: format!("tca:{{{id}}}:lease"),
            },
        }
    }
}

impl CredentialStore for RedisStore {
    async fn load(&self) -> Result<Option<Credential>, BoxError> {
        let mut connection = self.connection.clone();
        let stored: Option<String> = redis::cmd("GET")
            .arg(&self.keys.credential)
            .query_async(&mut connection)
            .await?;
        stored.map(|stored| decode(&stored)).transpose()
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
            .arg(encode(credential))
            .arg(ttl.unwrap_or(0))
            .invoke_async(&mut connection)
            .await?;
        Ok(saved == 1)
    }

    async fn release(&self, lease: &Lease) -> Result<(), BoxError> {
        let mut connection = self.connection.clone();
        let _: i64 = Script::new(RELEASE)
            .key(&self.keys.lease)
            .arg(lease.token())
            .invoke_async(&mut connection)
            .await?;
        Ok(())
    }

    async fn remove(&self, rejected: &Credential) -> Result<(), BoxError> {
        let mut connection = self.connection.clone();
        let _: i64 = Script::new(REMOVE)
            .key(&self.keys.credential)
            .arg(format!("v1:{}:", fingerprint(rejected)))
            .invoke_async(&mut connection)
            .await?;
        Ok(())
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
return 1
";

/// Deletes the lease only if the caller's token still holds it.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Deletes the credential only if it is the one with the given fingerprint.
const REMOVE: &str = r"
local stored = redis.call('GET', KEYS[1])
if stored and string.sub(stored, 1, string.len(ARGV[1])) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// A credential as stored: `v1:<fingerprint>:<json>`.
fn encode(credential: &Credential) -> String {
    let headers: Vec<Value> = credential
        .headers()
        .map(|(name, value)| json!([name.as_str(), String::from_utf8_lossy(value.as_bytes())]))
        .collect();
    let doc = json!({
        "h": headers,
        "exp": credential.expiry().map(unix_millis),
        "iat": credential.issued().map(unix_millis),
    });
    format!("v1:{}:{doc}", fingerprint(credential))
}

fn decode(stored: &str) -> Result<Credential, BoxError> {
    let malformed = || -> BoxError { "a stored credential this version cannot read".into() };
    let rest = stored.strip_prefix("v1:").ok_or_else(malformed)?;
    let (_, json) = rest.split_once(':').ok_or_else(malformed)?;
    let doc: Value = serde_json::from_str(json).map_err(|_| malformed())?;
    let headers = doc["h"]
        .as_array()
        .ok_or_else(malformed)?
        .iter()
        .map(|pair| {
            let name = pair[0].as_str().ok_or_else(malformed)?;
            let value = pair[1].as_str().ok_or_else(malformed)?;
            Ok((
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| malformed())?,
                HeaderValue::from_str(value).map_err(|_| malformed())?,
            ))
        })
        .collect::<Result<Vec<_>, BoxError>>()?;
    let mut credential = Credential::from_headers(headers).map_err(|_| malformed())?;
    if let Some(at) = doc["iat"].as_u64() {
        credential = credential.issued_at(UNIX_EPOCH + Duration::from_millis(at));
    }
    if let Some(at) = doc["exp"].as_u64() {
        credential = credential.expires_at(UNIX_EPOCH + Duration::from_millis(at));
    }
    Ok(credential)
}

/// A SHA-256 of the credential's headers, names and values: equal for equal credentials,
/// and telling nothing of the secret.
fn fingerprint(credential: &Credential) -> String {
    let mut hash = Sha256::new();
    for (name, value) in credential.headers() {
        hash.update(name.as_str().as_bytes());
        hash.update([0]);
        hash.update(value.as_bytes());
        hash.update([0]);
    }
    hex(&hash.finalize()[..16])
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

    /// A credential survives the trip through its stored form, expiry and issue time
    /// included (to the millisecond), and its fingerprint names it without its secret.
    #[test]
    fn the_stored_form_round_trips_and_hides_the_secret_in_the_fingerprint() {
        let issued = UNIX_EPOCH + Duration::from_millis(1_800_000_000_123);
        let credential = Credential::from_headers([
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
        .lives(issued, Duration::from_secs(3600));
        let stored = encode(&credential);
        let back = decode(&stored).unwrap();
        assert_eq!(back, credential);
        assert_eq!(back.expiry(), credential.expiry());
        assert_eq!(back.issued(), credential.issued());
        assert!(!fingerprint(&credential).contains("s3cr3t"));
        assert_ne!(
            fingerprint(&credential),
            fingerprint(&Credential::bearer("other").unwrap())
        );
        assert!(decode("v2:x:{}").is_err());
        assert!(decode("v1:ab:{not json").is_err());
        let err = decode("v1:ab:{\"h\":[[\"authorization\",\"Bearer \\n x\"]]}").unwrap_err();
        assert!(!err.to_string().contains("Bearer"), "{err}");
    }
}
