//! [`FileStore`]: the [`CredentialStore`] contract in one file, for the processes of one
//! user on one host (feature `file-store`): command-line tools run several at a time, a
//! desktop app and its helpers, the workers of a small service without a Redis. They
//! share one token and one refresh-token owner, as a fleet does on Redis. Local file
//! systems only: on a network file system the OS lock may not exclude two threads of one
//! process.
//!
//! Every call takes an exclusive OS lock on a lock file beside the data (`flock` on Unix,
//! `LockFileEx` on Windows, through fd-lock), reads the data, and, when it
//! changes it, writes a temporary file in the same directory and renames it over the data
//! file: a reader never sees half a write, and a process killed mid-write leaves the old
//! data whole; the temporary file it leaves (a copy of the credential) is removed by the
//! next call of any process. The lock is on the lock file, never on the data file a rename
//! replaces. A call waits for a busy lock by trying again at growing intervals (up to
//! 50 ms), never in a thread that outlives it: a call given up on while it waits stops
//! there and writes nothing (one given up on once past the lock finishes its few
//! milliseconds of work). A lock file deleted while another call holds it is made
//! again only after it has been missing for half a second, so a call in progress on the
//! deleted one can end first.
//!
//! The OS drops a dead process's lock; its refresh lease runs out by the wall clock. A
//! lease that ends more than twice its length away was written before the clock stepped
//! back by more than that length: stale, or every process on the host would wait out the
//! step. A smaller step back only makes a lease last longer; a step forward ends a lease
//! early, which can let a second fetch start.
//!
//! Both files are readable and writable by their owner only (mode `0600` on Unix): a lock
//! file found open to others is tightened, or refused when it cannot be (another user's),
//! and a data file others may write (group or world writable, or another user's) is not
//! trusted: it counts as absent (another user could have chosen the session and the
//! refresh token it holds) and is replaced by a private one at the next write. Neither
//! path may be a symbolic link: a save replaces the data path, which would split a link
//! from its target (two refresh-lease holders, one of them with a spent refresh token),
//! so a link there is refused, at [`FileStore::open`] and at every call; open the file
//! it names instead. Errors name the file they are about, never its contents.
//! [`FileStore::encrypted`] seals the credential as [`RedisStore`]'s values are sealed.
//! A value that cannot be read (not JSON, cut short, sealed under another key, larger
//! than 1 MiB) counts as absent: never sent, logged once, and overwritten by the next
//! refresh. A lease or a hold that cannot be read (a float, a missing token: a hand edit)
//! is no lease or hold, and the credential beside it is kept. What is not this store's to overwrite is refused with an error instead, and
//! left as it is: a data path that is not a regular file (a pipe, a device, a directory),
//! or a file written by another format version of this store. The cache then fetches on
//! its own, as with a store that is down.
//!
//! Waiters poll (the default [`CredentialStore::changed`]): there is no server to tell
//! them. Calls run their file I/O on Tokio's blocking pool; called outside a Tokio
//! runtime (a command-line tool's own executor) they run it on the calling thread, a
//! try at a time: a poll never waits there for a lock another call holds (a pause
//! between tries is woken by a thread of the crate's), so the caller's own timeout
//! can end it. A hard link to the data file is split from it by the
//! first save, as a symbolic link would be (which is why those are refused): give
//! every process the same path.
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
    ffi::OsStr,
    fmt,
    fs::{File, OpenOptions},
    io::{self, ErrorKind as IoErrorKind, Read as _, Write as _},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

use super::{
    CredentialStore, Lease,
    codec::{Codec, Sealing, millis, unix_millis},
};
use crate::{credential::Credential, error::BoxError};

/// The format version this store reads and writes.
const VERSION: u64 = 1;

/// The largest data file read: a credential file is a few KiB; anything past this is
/// not one (a stray `truncate`, a copy gone wrong), and reading it whole could exhaust
/// memory in every process at every call.
const MAX_FILE: u64 = 1 << 20;

/// The first pause between tries for a busy lock, and the longest.
const FIRST_PAUSE: Duration = Duration::from_millis(2);
const LONGEST_PAUSE: Duration = Duration::from_millis(50);

/// How long a missing lock file stays missing before a call makes it again: a call in
/// progress on the deleted file (milliseconds, normally) ends first.
const LOCK_GONE_GRACE: Duration = Duration::from_millis(500);

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
    /// Since when the lock file has been seen missing.
    lock_gone_since: Mutex<Option<Instant>>,
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
    /// The token endpoint's hold (see [`CredentialStore::hold`]), in milliseconds since
    /// the Unix epoch.
    hold: Option<u64>,
}

/// Why a data file is not read as data.
enum Unusable {
    /// Counts as absent (logged once) and is overwritten by the next write.
    Unreadable(&'static str),
    /// Written by another format version: left as it is, every call refused.
    OtherVersion,
}

impl Data {
    fn holder(&self, now: u64) -> Option<&str> {
        // A lease that ends more than twice as far away as it was taken for was written
        // before the wall clock stepped back by more than its length: stale, or every
        // process on the host would wait out the step. Up to that, the slack keeps a
        // live holder's lease (the cache renews it every third of its length): a smaller
        // step back must not let a second fetch start.
        self.lease
            .as_ref()
            .filter(|(_, until, ttl)| now < *until && until - now <= ttl.saturating_mul(2))
            .map(|(token, _, _)| token.as_str())
    }

    fn parse(text: &str) -> Result<Data, Unusable> {
        use Unusable::Unreadable;
        let doc: Value = serde_json::from_str(text).map_err(|_| Unreadable("malformed"))?;
        match doc["v"].as_u64() {
            Some(VERSION) => {}
            Some(_) => return Err(Unusable::OtherVersion),
            None => return Err(Unreadable("malformed")),
        }
        let credential = match &doc["credential"] {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            _ => return Err(Unreadable("malformed")),
        };
        // A lease this store cannot read (written by hand or by another tool: a float,
        // a missing token) is no lease, as a hold is no hold: the credential beside it,
        // and the refresh token in it, are read all the same, never overwritten for it.
        let lease = match (
            &doc["lease"],
            &doc["lease"]["token"],
            &doc["lease"]["until"],
        ) {
            (Value::Null, ..) => None,
            (lease, Value::String(token), until) => until.as_u64().map(|until| {
                (
                    token.clone(),
                    until,
                    // Written before the length was kept: not judged by it.
                    lease["ttl"].as_u64().unwrap_or(u64::MAX),
                )
            }),
            _ => None,
        };
        // Written before holds were kept, or not a number: no hold.
        let hold = doc["hold"].as_u64();
        Ok(Data {
            credential,
            lease,
            hold,
        })
    }

    fn render(&self) -> String {
        json!({
            "v": VERSION,
            "credential": self.credential,
            "lease": self.lease.as_ref().map(|(token, until, ttl)| json!({"token": token, "until": until, "ttl": ttl})),
            "hold": self.hold,
        })
        .to_string()
    }
}

/// One try at a call: done, or the lock was busy and `change` comes back for the next.
enum Attempt<T, F> {
    Done(Result<T, BoxError>),
    Busy(F),
}

/// Set when the future of a call is dropped: a try already running in the blocking pool
/// then stops before it changes anything.
struct GivenUp(Arc<AtomicBool>);

impl Drop for GivenUp {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
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
        // Fails now, not at the first refresh, when the directory is missing or closed,
        // the lock file is open to others and not ours to tighten, or the data path is a
        // symbolic link.
        let lock = open_lock_file(&lock_path, true).map_err(|e| at(&lock_path, e))?;
        checked_lock_file(lock, &lock_path)?;
        refuse_link(&path)?;
        Ok(FileStore {
            inner: Arc::new(Inner {
                path,
                lock_path,
                codec: Codec {
                    key_name: format!("tca-file:{name}"),
                    sealing: None,
                },
                unreadable_logged: AtomicBool::new(false),
                lock_gone_since: Mutex::new(None),
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
            lock_gone_since: Mutex::new(None),
        };
        FileStore {
            inner: Arc::new(inner),
        }
    }

    /// Runs `change` on the data under the lock, off the async threads; writes the data
    /// back when `change` says it changed it. The lock is only ever tried, never waited
    /// for in a thread: a busy lock is tried again after an async pause, so dropping this
    /// future stops the call (a try already running sees it and changes nothing).
    async fn locked<T, F>(&self, change: F) -> Result<T, BoxError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner, &mut Data) -> (T, bool) + Send + 'static,
    {
        let given_up = GivenUp(Arc::new(AtomicBool::new(false)));
        let runtime = tokio::runtime::Handle::try_current().ok();
        let mut change = change;
        let mut pause = FIRST_PAUSE;
        loop {
            let attempt = match &runtime {
                Some(runtime) => {
                    let inner = Arc::clone(&self.inner);
                    let gone = Arc::clone(&given_up.0);
                    runtime
                        .spawn_blocking(move || inner.attempt(change, &gone))
                        .await?
                }
                // Outside a Tokio runtime (a command-line tool's own executor): the try,
                // a few milliseconds of file I/O, runs on the calling thread.
                None => self.inner.attempt(change, &given_up.0),
            };
            match attempt {
                Attempt::Done(result) => return result,
                Attempt::Busy(back) => change = back,
            }
            // The pause between tries never blocks the poll (outside a runtime, or on one
            // without timers, the process's alarm thread wakes it): a caller's timeout
            // can end the call, even behind a process stopped while it holds the lock.
            crate::cache::pause_until(tokio::time::Instant::now() + pause).await;
            pause = (pause * 2).min(LONGEST_PAUSE);
        }
    }
}

impl Inner {
    /// One try: the lock if it is free, then the read, the change and the write.
    fn attempt<T, F>(&self, change: F, given_up: &AtomicBool) -> Attempt<T, F>
    where
        F: FnOnce(&Inner, &mut Data) -> (T, bool),
    {
        let file = match self.lock_file() {
            Ok(Some(file)) => file,
            Ok(None) => return Attempt::Busy(change),
            Err(e) => return Attempt::Done(Err(e)),
        };
        let mut lock = fd_lock::RwLock::new(file);
        let held = match lock.try_write() {
            Ok(held) => held,
            Err(e) if e.kind() == IoErrorKind::WouldBlock => return Attempt::Busy(change),
            Err(e) => return Attempt::Done(Err(e.into())),
        };
        // Deleted or replaced between our open and our lock: the lock excludes nobody.
        if !same_file(&held, &self.lock_path) {
            return Attempt::Busy(change);
        }
        if given_up.load(Ordering::Acquire) {
            return Attempt::Done(Err("the call was given up".into()));
        }
        let result = (|| {
            self.sweep();
            let mut data = self.read()?;
            let (out, changed) = change(self, &mut data);
            if changed {
                self.write(&data)?;
            }
            Ok(out)
        })();
        drop(held); // Unlocks.
        Attempt::Done(result)
    }

    /// The lock file, checked; `None` while it has been missing for less than
    /// [`LOCK_GONE_GRACE`].
    fn lock_file(&self) -> Result<Option<File>, BoxError> {
        let mut gone_since = self
            .lock_gone_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let file = match open_lock_file(&self.lock_path, false) {
            Ok(file) => file,
            Err(e) if e.kind() == IoErrorKind::NotFound => {
                let since = *gone_since.get_or_insert_with(Instant::now);
                if since.elapsed() < LOCK_GONE_GRACE {
                    return Ok(None);
                }
                open_lock_file(&self.lock_path, true).map_err(|e| at(&self.lock_path, e))?
            }
            Err(e) => return Err(at(&self.lock_path, e).into()),
        };
        *gone_since = None;
        Ok(Some(checked_lock_file(file, &self.lock_path)?))
    }

    /// The data file's content; an absent file is empty data, an unreadable one too
    /// (logged once). A path that is not a regular file is refused without waiting on it
    /// (a pipe would block the open, inside the lock), and so is another version's file.
    fn read(&self) -> Result<Data, BoxError> {
        let mut options = OpenOptions::new();
        options.read(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            // Never through a link: a save replaces the path (a rename), so a link read
            // through would be split from its target by the first save.
            options.custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW);
        }
        let file = match options.open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == IoErrorKind::NotFound => return Ok(Data::default()),
            #[cfg(unix)]
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(refused(&self.path, LINK).into());
            }
            Err(e) => return Err(at(&self.path, e).into()),
        };
        let meta = file.metadata().map_err(|e| at(&self.path, e))?;
        if !meta.is_file() {
            return Err(refused(&self.path, "is not a regular file").into());
        }
        if meta.len() > MAX_FILE {
            return Ok(self.unreadable("larger than a credential file"));
        }
        if let Some(why) = untrusted(&meta) {
            return Ok(self.unreadable(why));
        }
        let mut bytes = Vec::new();
        file.take(MAX_FILE + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| at(&self.path, e))?;
        if bytes.len() as u64 > MAX_FILE {
            return Ok(self.unreadable("larger than a credential file"));
        }
        let Ok(text) = String::from_utf8(bytes) else {
            return Ok(self.unreadable("not text"));
        };
        match Data::parse(&text) {
            Ok(data) => Ok(data),
            Err(Unusable::Unreadable(why)) => Ok(self.unreadable(why)),
            Err(Unusable::OtherVersion) => Err(refused(
                &self.path,
                "was written by another format version of this store; left as it is",
            )
            .into()),
        }
    }

    fn unreadable(&self, why: &'static str) -> Data {
        if !self.unreadable_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(path = %self.path.display(), why, "credential file cannot be read; ignoring it");
        }
        Data::default()
    }

    /// Replaces the data file whole: a new private temporary file beside it, synced,
    /// renamed over it.
    fn write(&self, data: &Data) -> Result<(), BoxError> {
        let text = data.render();
        if text.len() as u64 > MAX_FILE {
            return Err("the credential is too large for the file store (1 MiB)".into());
        }
        let (temp, mut file) = temp_file(&self.path).map_err(|e| at(&self.path, e))?;
        let result = (|| -> io::Result<()> {
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&temp, &self.path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        result.map_err(|e| at(&self.path, e))?;
        // The rename reaches the disk with its directory: without this, a power loss
        // could bring back the file before it, and a refresh token spent since. Not every
        // file system syncs a directory; the write stands either way.
        #[cfg(unix)]
        if let Ok(dir) = File::open(self.dir()) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// The directory of the data file.
    fn dir(&self) -> &Path {
        match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        }
    }

    /// Removes the temporary files of writers killed mid-write, each a whole copy of the
    /// credential: under the lock, no live writer has one.
    fn sweep(&self) {
        let Some(name) = self.path.file_name() else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(self.dir()) else {
            return;
        };
        for entry in entries.flatten() {
            if is_temp_of(name, &entry.file_name()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
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

/// Why a data path that is a symbolic link is refused.
const LINK: &str = "is a symbolic link (open the file it names: every save replaces the \
                    path, which would split the link from its target)";

/// A data path that is a symbolic link, refused (see [`LINK`]); anything else is left to
/// the calls.
fn refuse_link(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => Err(refused(path, LINK)),
        _ => Ok(()),
    }
}

/// Why a data file is not trusted, if it is not: one others may write (another user
/// could have chosen the session and the refresh token every process here presents).
/// It counts as absent, and the next write replaces it with a private file.
fn untrusted(meta: &std::fs::Metadata) -> Option<&'static str> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        if meta.mode() & 0o022 != 0 {
            return Some("writable by others");
        }
        if meta.uid() != rustix::process::geteuid().as_raw() {
            return Some("owned by another user");
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    None
}

/// `e` with the path it was met at (never the file's contents), its kind kept.
fn at(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("credential file {}: {e}", path.display()))
}

/// An error naming the path (never its contents) and why it is not used.
fn refused(path: &Path, why: &str) -> io::Error {
    io::Error::new(
        IoErrorKind::InvalidData,
        format!("credential file {}: {why}", path.display()),
    )
}

/// Opens the lock file (creating it when `create`), without waiting on whatever is there.
fn open_lock_file(path: &Path, create: bool) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options
        .read(true)
        .write(true)
        .create(create)
        .truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        // Never through a link: the mode check below would tighten the file it names.
        options
            .mode(0o600)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW);
    }
    options.open(path).map_err(|e| {
        #[cfg(unix)]
        if e.raw_os_error() == Some(libc::ELOOP) {
            return refused(path, "is a symbolic link");
        }
        e
    })
}

/// The lock file, if it is a regular file only its owner may open: anyone who can open
/// it can hold the lock and stall every process of the store. A wider mode is tightened
/// when the file is ours, else refused.
fn checked_lock_file(file: File, path: &Path) -> io::Result<File> {
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(refused(path, "is not a regular file"));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if meta.permissions().mode() & 0o077 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(|_| refused(path, "is open to others and cannot be made private"))?;
        }
    }
    Ok(file)
}

/// Whether `path` still names the open `file` (always, where files in use cannot be
/// deleted).
fn same_file(file: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        match (file.metadata(), std::fs::metadata(path)) {
            (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (file, path);
        true
    }
}

/// A new temporary file beside `path`, `<name>.<pid>-<count>-<random>.tmp`, created
/// (never opened as found: a file or link already there is not written through) readable
/// and writable by its owner only from the start.
fn temp_file(path: &Path) -> io::Result<(PathBuf, File)> {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().unwrap_or_default();
    let mut last = None;
    for _ in 0..8 {
        let mut temp_name = name.to_os_string();
        temp_name.push(format!(
            ".{}-{}-{:08x}.tmp",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed),
            fastrand::u32(..),
        ));
        let temp = path.with_file_name(temp_name);
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o600);
        }
        match options.open(&temp) {
            Ok(file) => return Ok((temp, file)),
            Err(e) if e.kind() == IoErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| IoErrorKind::AlreadyExists.into()))
}

/// Whether `file` is a temporary file of the store named `name`: `<name>.<tag>.tmp`, the
/// tag of digits, hex and dashes (this version's, and the `<pid>` of earlier ones), so
/// another store's files in the directory are never taken for ours.
fn is_temp_of(name: &OsStr, file: &OsStr) -> bool {
    let (Some(name), Some(file)) = (name.to_str(), file.to_str()) else {
        return false;
    };
    file.strip_prefix(name)
        .and_then(|rest| rest.strip_prefix('.'))
        .and_then(|rest| rest.strip_suffix(".tmp"))
        .is_some_and(|tag| {
            !tag.is_empty() && tag.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        })
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

    async fn hold(&self, until: SystemTime) -> Result<(), BoxError> {
        let until = unix_millis(until);
        self.locked(move |_, data| {
            let changed = data.hold != Some(until);
            data.hold = Some(until);
            ((), changed)
        })
        .await
    }

    async fn held_until(&self) -> Result<Option<SystemTime>, BoxError> {
        self.locked(|_, data| {
            let held = data
                .hold
                .and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms)));
            (held, false)
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
