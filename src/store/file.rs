//! [`FileStore`]: the [`CredentialStore`] contract in one file, for the processes of one
//! user on one host (feature `file-store`): command-line tools run several at a time, a
//! desktop app and its helpers, the workers of a small service without a Redis. They
//! share one token and one refresh-token owner, as a fleet does on Redis.
//!
//! Every call takes an exclusive OS lock on a lock file beside the data (`flock` on Unix,
//! `LockFileEx` on Windows, through fd-lock), reads the data, and, when it
//! changes it, writes a temporary file in the same directory and renames it over the data
//! file: a reader never sees half a write, and a process killed mid-write leaves the old
//! data whole. The lock is on the lock file, never on the data file a rename replaces.
//! The OS drops a dead process's lock; its refresh lease runs out by the wall clock (a
//! lease that ends further away than it was taken for, as after the clock stepped back,
//! is stale; a step forward ends a lease early, which can let a second fetch start).
//!
//! Both files are created readable and writable by their owner only (mode `0600` on
//! Unix). [`FileStore::encrypted`] seals the credential as [`RedisStore`]'s values are
//! sealed. A value that cannot be read counts as absent: never sent, logged once, and
//! overwritten by the next refresh.
//!
//! Waiters poll (the default [`CredentialStore::changed`]): there is no server to tell
//! them.
//!
//! [`RedisStore`]: crate::store::redis::RedisStore
//!
//! ```no_run
//! use tower_client_auth::{CredentialCache, StaticCredential, store::file::FileStore};
//!
//! # fn run() -> Result<(), tower_client_auth::BoxError> {
//! let store = FileStore::open("/home/me/.cache/my-cli/token.json")?;
//! let cache = CredentialCache::builder(StaticCredential::bearer("t")?)
//!     .store(store)
//!     .build()?;
//! # let _ = cache;
//! # Ok(())
//! # }
//! ```

use std::{
    fmt,
    fs::{File, OpenOptions},
    io::{ErrorKind as IoErrorKind, Read as _, Write as _},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

use super::{
    CredentialStore, Lease,
    codec::{Codec, Sealing, millis},
};
use crate::{credential::Credential, error::BoxError};

/// A [`CredentialStore`] in a file. See the [module docs](self).
#[derive(Clone)]
pub struct FileStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    lock_path: PathBuf,
    codec: Codec,
    /// Whether an unreadable file was logged already (once per store).
    unreadable_logged: AtomicBool,
}

impl fmt::Debug for FileStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStore")
            .field("path", &self.inner.path)
            .field("encrypted", &self.inner.codec.sealing.is_some())
            .finish_non_exhaustive()
    }
}

/// What the data file holds.
#[derive(Default)]
struct Data {
    /// The credential in its stored form.
    credential: Option<String>,
    /// The lease's token, when it runs out (milliseconds since the Unix epoch) and for
    /// how long it was taken or last renewed (milliseconds).
    lease: Option<(String, u64, u64)>,
}

impl Data {
    fn holder(&self, now: u64) -> Option<&str> {
        // A lease that ends further away than it was taken for was written before the
        // wall clock stepped back: stale, or every process on the host would wait out
        // the step. (A step forward ends leases early; a lease is short.)
        self.lease
            .as_ref()
            .filter(|(_, until, ttl)| now < *until && until - now <= *ttl)
            .map(|(token, _, _)| token.as_str())
    }

    fn parse(text: &str) -> Result<Data, &'static str> {
        let doc: Value = serde_json::from_str(text).map_err(|_| "malformed")?;
        if doc["v"].as_u64() != Some(1) {
            return Err("written by another version");
        }
        let credential = match &doc["credential"] {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            _ => return Err("malformed"),
        };
        let lease = match &doc["lease"] {
            Value::Null => None,
            lease => Some((
                lease["token"].as_str().ok_or("malformed")?.to_owned(),
                lease["until"].as_u64().ok_or("malformed")?,
                // Written before the length was kept: not judged by it.
                lease["ttl"].as_u64().unwrap_or(u64::MAX),
            )),
        };
        Ok(Data { credential, lease })
    }

    fn render(&self) -> String {
        json!({
            "v": 1,
            "credential": self.credential,
            "lease": self.lease.as_ref().map(|(token, until, ttl)| json!({"token": token, "until": until, "ttl": ttl})),
        })
        .to_string()
    }
}

impl FileStore {
    /// A store in the file at `path` (created on the first save; its directory must
    /// exist), with its lock file at `path` plus `.lock`. Every process that opens the
    /// same path shares the credential it holds.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, BoxError> {
        let path = path.into();
        let name = path
            .file_name()
            .ok_or("the store's path names no file")?
            .to_string_lossy()
            .into_owned();
        let mut lock_name = path.clone().into_os_string();
        lock_name.push(".lock");
        let lock_path = PathBuf::from(lock_name);
        // Fails now, not at the first refresh, when the directory is missing or closed.
        private_file(&lock_path)?;
        Ok(FileStore {
            inner: Arc::new(Inner {
                path,
                lock_path,
                codec: Codec {
                    key_name: format!("tca-file:{name}"),
                    sealing: None,
                },
                unreadable_logged: AtomicBool::new(false),
            }),
        })
    }

    /// Encrypts and authenticates the stored credential with `key` (XChaCha20-Poly1305,
    /// bound to the file's name). Every process needs the same key; a value that does not
    /// open with it counts as absent.
    pub fn encrypted(self, key: [u8; 32]) -> Self {
        let inner = Inner {
            path: self.inner.path.clone(),
            lock_path: self.inner.lock_path.clone(),
            codec: Codec {
                key_name: self.inner.codec.key_name.clone(),
                sealing: Some(Arc::new(Sealing::new(key))),
            },
            unreadable_logged: AtomicBool::new(false),
        };
        FileStore {
            inner: Arc::new(inner),
        }
    }

    /// Runs `change` on the data under the lock, off the async threads; writes the data
    /// back when `change` says it changed it.
    async fn locked<T: Send + 'static>(
        &self,
        change: impl FnOnce(&Inner, &mut Data) -> (T, bool) + Send + 'static,
    ) -> Result<T, BoxError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || -> Result<T, BoxError> {
            let mut lock = fd_lock::RwLock::new(private_file(&inner.lock_path)?);
            let held = lock.write()?;
            let mut data = inner.read()?;
            let (out, changed) = change(&inner, &mut data);
            if changed {
                inner.write(&data)?;
            }
            drop(held); // Unlocks.
            Ok(out)
        })
        .await?
    }
}

impl Inner {
    /// The data file's content; an absent file is empty data, an unreadable one too
    /// (logged once).
    fn read(&self) -> Result<Data, BoxError> {
        let mut text = String::new();
        match File::open(&self.path) {
            Ok(mut file) => {
                if file.read_to_string(&mut text).is_err() {
                    return Ok(self.unreadable("not text"));
                }
            }
            Err(e) if e.kind() == IoErrorKind::NotFound => return Ok(Data::default()),
            Err(e) => return Err(e.into()),
        }
        Ok(Data::parse(&text).unwrap_or_else(|why| self.unreadable(why)))
    }

    fn unreadable(&self, why: &'static str) -> Data {
        if !self.unreadable_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(path = %self.path.display(), why, "credential file cannot be read; ignoring it");
        }
        Data::default()
    }

    /// Replaces the data file whole: a temporary file beside it, synced, renamed over it.
    fn write(&self, data: &Data) -> Result<(), BoxError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let mut temp_name = self.path.file_name().unwrap_or_default().to_os_string();
        temp_name.push(format!(".{}.tmp", std::process::id()));
        let temp = dir.join(temp_name);
        let result = (|| -> std::io::Result<()> {
            let mut file = private_file(&temp)?;
            file.set_len(0)?;
            file.write_all(data.render().as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&temp, &self.path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        Ok(result?)
    }

    fn credential(&self, data: &Data) -> Option<Credential> {
        let stored = data.credential.as_deref()?;
        match self.codec.decode(stored) {
            Ok(credential) => Some(credential),
            Err(why) => {
                self.unreadable(why);
                None
            }
        }
    }
}

/// Opens (creating) a file only its owner may read or write.
fn private_file(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    options.open(path)
}

fn now_millis() -> u64 {
    millis(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default(),
    )
}

impl CredentialStore for FileStore {
    async fn load(&self) -> Result<Option<Credential>, BoxError> {
        self.locked(|inner, data| (inner.credential(data), false))
            .await
    }

    async fn lease(&self, ttl: Duration) -> Result<Option<Lease>, BoxError> {
        self.locked(move |_, data| {
            let now = now_millis();
            if data.holder(now).is_some() {
                return (None, false);
            }
            let lease = Lease::new();
            let ttl = millis(ttl);
            data.lease = Some((lease.token().to_owned(), now.saturating_add(ttl), ttl));
            (Some(lease), true)
        })
        .await
    }

    async fn save(&self, lease: &Lease, credential: &Credential) -> Result<bool, BoxError> {
        let token = lease.token().to_owned();
        let stored = self.inner.codec.encode(credential)?;
        self.locked(move |_, data| {
            if data.holder(now_millis()) != Some(token.as_str()) {
                return (false, false);
            }
            data.credential = Some(stored);
            (true, true)
        })
        .await
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, BoxError> {
        let token = lease.token().to_owned();
        self.locked(move |_, data| {
            let now = now_millis();
            if data.holder(now) != Some(token.as_str()) {
                return (false, false);
            }
            let ttl = millis(ttl);
            data.lease = Some((token, now.saturating_add(ttl), ttl));
            (true, true)
        })
        .await
    }

    async fn release(&self, lease: &Lease) -> Result<(), BoxError> {
        let token = lease.token().to_owned();
        self.locked(move |_, data| {
            let held = data.lease.as_ref().is_some_and(|(t, _, _)| *t == token);
            if held {
                data.lease = None;
            }
            ((), held)
        })
        .await
    }

    async fn remove(&self, rejected: &Credential) -> Result<(), BoxError> {
        let fingerprint = self.inner.codec.fingerprint(rejected);
        self.locked(move |inner, data| {
            let same = data
                .credential
                .as_deref()
                .and_then(|stored| inner.codec.stored_fingerprint(stored))
                .is_some_and(|stored| stored == fingerprint);
            if same {
                data.credential = None;
            }
            ((), same)
        })
        .await
    }
}
