//! `FileStore` (feature `file-store`, no Redis) against what a host can do to it: several
//! handles on one file standing for the processes of one host, a thread holding the same
//! `flock` for another process inside a store call, real child processes killed with
//! SIGKILL, real files in a fresh directory (pipes, links, wide modes, huge, cut short,
//! another version's), real runtimes. Proves the promises of the `store::file` module
//! docs and README's "One host, no server": a call given up on stops (no lease nobody
//! holds, no pinned thread, a runtime that ends at once); files stay private and are never
//! written through a link; what is not a credential file is refused or counts as absent
//! without being waited on or read whole; a small clock step back keeps a live lease; a
//! killed writer leaves the old data whole and no copy behind; secrets stay out of logs,
//! `Debug` and errors.
#![cfg(feature = "file-store")]

mod support;

use std::{
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, Instant},
};

use support::contract::{Endpoint, one_fetch_per_lifetime, the_contract_holds_with};
use tower_client_auth::{Credential, CredentialCache, CredentialStore, store::file::FileStore};

/// A fresh directory for one test (removed when dropped), and the store's path in it.
fn path(test: &str) -> (support::TempDir, PathBuf) {
    let dir = support::TempDir::new(&format!("file-store-{test}"));
    let path = dir.join("token.json");
    (dir, path)
}

fn lock_path(path: &Path) -> PathBuf {
    let mut lock = path.to_path_buf().into_os_string();
    lock.push(".lock");
    PathBuf::from(lock)
}

/// The name this process's writes went through before each write had a name of its own
/// (`<name>.<pid>.tmp`): what a file planted for a write would be found at.
fn temp_path(path: &Path) -> PathBuf {
    let mut temp = path.file_name().unwrap().to_os_string();
    temp.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(temp)
}

/// Another process of the host inside a store call (holding the OS lock on the lock
/// file) for `busy`: a thread holding the same `flock`. Returns once the lock is held.
fn busy_for(path: &Path, busy: Duration) -> std::thread::JoinHandle<()> {
    let lock = lock_path(path);
    let (held, is_held) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock)
            .unwrap();
        let mut lock = fd_lock::RwLock::new(file);
        let _guard = lock.write().unwrap();
        held.send(()).unwrap();
        std::thread::sleep(busy);
    });
    is_held.recv().unwrap();
    thread
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777
}

fn bearer(token: &str) -> Credential {
    Credential::bearer(token).unwrap()
}

// ---------------------------------------------------------------------------------------
// The contract, and one fetch per lifetime for caches on one file (moved from `fleet.rs`,
// which needs Redis).
// ---------------------------------------------------------------------------------------

/// World: two handles on one file (as two processes have). Proves: the store
/// contract (lease, renewal, fenced save, compare-and-delete) holds; waiters poll.
#[tokio::test]
async fn the_file_store_keeps_the_contract() {
    let (_dir, path) = path("contract");
    let (a, b) = (
        FileStore::open(&path).unwrap(),
        FileStore::open(&path).unwrap(),
    );
    the_contract_holds_with(a, b, false).await;
}

/// World: a lease taken, then the host's wall clock steps back an hour (simulated:
/// the lease's end in the file moved an hour later). Proves: a lease ending further
/// away than it was taken for is stale and taken over at once, instead of keeping
/// every process on the host waiting for an hour; a lease in its time still excludes.
#[tokio::test]
async fn a_lease_stranded_by_a_clock_step_back_is_taken_over() {
    let (_dir, path) = path("clock-step");
    let (a, b) = (
        FileStore::open(&path).unwrap(),
        FileStore::open(&path).unwrap(),
    );
    let held = a
        .lease(Duration::from_secs(3))
        .await
        .unwrap()
        .expect("free");
    assert!(
        b.lease(Duration::from_secs(3)).await.unwrap().is_none(),
        "held"
    );
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let until = doc["lease"]["until"].as_u64().unwrap();
    doc["lease"]["until"] = (until + 3_600_000).into();
    std::fs::write(&path, doc.to_string()).unwrap();
    assert!(
        b.lease(Duration::from_secs(3)).await.unwrap().is_some(),
        "a lease an hour away was taken for 3 s: the clock stepped back"
    );
    assert!(
        !a.save(&held, &Credential::bearer("late").unwrap())
            .await
            .unwrap()
    );
}

/// World: 6 caches, each with its own handle on one file, 10 callers each, tokens
/// living 1 s. Proves: one fetch per lifetime, never two at once, no failed call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caches_on_one_file_fetch_once_per_lifetime() {
    let (_dir, path) = path("fleet");
    let stores = (0..6).map(|_| FileStore::open(&path).unwrap()).collect();
    one_fetch_per_lifetime(stores, 10, Duration::from_millis(2_500)).await;
}

/// World: three processes of one client, a cache each with its own handle on one
/// file, want a token at once; the token endpoint answers the first request `429` with
/// `Retry-After: 2`. Proves: the endpoint hears nothing more from the host's processes
/// for those 2 s, and one login after them serves all three.
#[cfg(feature = "token")]
#[tokio::test]
async fn a_retry_after_holds_every_process_on_the_file() {
    let (_dir, path) = path("hold");
    let stores = (0..3).map(|_| FileStore::open(&path).unwrap()).collect();
    support::contract::a_retry_after_holds_every_process(stores).await;
}

/// World: a file holding garbage, then one sealed under another key. Proves: each
/// counts as absent (never sent), the cache fetches and overwrites it; the files are
/// readable by their owner only; the sealed file shows no secret.
#[tokio::test]
async fn an_unreadable_file_is_absent_and_overwritten_and_files_are_private() {
    let (_dir, path) = path("unreadable");
    std::fs::write(&path, "{not json").unwrap();
    let endpoint = Endpoint::new(None);
    let cache = |store| {
        CredentialCache::builder(endpoint.clone())
            .store(store)
            .build()
            .unwrap()
    };
    let store = FileStore::open(&path).unwrap().encrypted([7; 32]);
    assert_eq!(store.load().await.unwrap(), None);
    let first = cache(store.clone()).credential().await.unwrap();
    assert_eq!(store.load().await.unwrap(), Some(first.clone()));
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        !text.contains("fleet-1") && !text.contains("Bearer"),
        "{text}"
    );

    let other_key = FileStore::open(&path).unwrap().encrypted([8; 32]);
    assert_eq!(
        other_key.load().await.unwrap(),
        None,
        "opened under another key"
    );
    let second = cache(other_key).credential().await.unwrap();
    assert_ne!(second, first);
    assert_eq!(endpoint.fetches(), 2);

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mut lock = path.clone().into_os_string();
        lock.push(".lock");
        for file in [path.clone(), PathBuf::from(lock)] {
            let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", file.display());
        }
    }
    assert!(FileStore::open(path.with_file_name("missing-dir/x.json")).is_err());
}

// ---------------------------------------------------------------------------------------
// Cancellation: a store call given up while the lock is busy stops there.
// ---------------------------------------------------------------------------------------

/// World: process B is inside a store call (holds the lock) for 300 ms; process A asks
/// for the lease and gives up after 100 ms (as the cache does after its share of the
/// fetch timeout). Proves: a lease is held only by a caller that has it (A
/// gave up: it never got a lease token, so it can never renew, save under or release
/// it). Proves: A's abandoned call takes nothing once the lock frees (it used to, with a
/// token nobody knows, and every process then waited the lease out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_call_given_up_on_a_busy_lock_leaves_no_lease_behind() {
    let (_dir, path) = path("orphan-lease");
    let (a, b) = (
        FileStore::open(&path).unwrap(),
        FileStore::open(&path).unwrap(),
    );
    let busy = busy_for(&path, Duration::from_millis(300));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), a.lease(Duration::from_secs(3)))
            .await
            .is_err(),
        "the lock is busy: A gives up"
    );
    busy.join().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        b.lease(Duration::from_secs(3)).await.unwrap().is_some(),
        "nobody holds a lease (A gave up on its call), yet B cannot take one: a lease \
         with a token nobody knows was written after A had given up"
    );
}

/// World: two processes' caches on one file (fetch timeout 400 ms: each store call gets
/// 100 ms). Another process is inside a store call for 300 ms (a slow `fsync` under the
/// lock, say) as A refreshes; A's load and lease calls get no answer in time, so A
/// fetches on its own (store "down"). Then B, a process arriving a moment later with a healthy
/// store and nobody fetching, needs a credential. Proves: a store call that
/// gets no answer costs a log line and a fetch, never a failed request elsewhere.
/// Proves: A's abandoned lease call does not land after A moved on (it used to: B then
/// waited for that lease's holder, who does not exist, and its request failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_that_gave_up_on_a_busy_lock_does_not_stall_the_next_process() {
    let (_dir, path) = path("orphan-cache");
    let cache = |source: support::TestSource| {
        CredentialCache::builder(source)
            .store(FileStore::open(&path).unwrap())
            .fetch_timeout(Duration::from_millis(400))
            .build()
            .unwrap()
    };
    let (source_a, source_b) = (support::TestSource::new(), support::TestSource::new());
    let (a, b) = (cache(source_a.clone()), cache(source_b.clone()));
    // Busy from before A's refresh: A's load and lease calls each get no answer in time.
    let busy = busy_for(&path, Duration::from_millis(300));
    let got_a = a.credential().await;
    busy.join().unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // What the file holds now: a lease, though A's refresh ended without one.
    // (No file at all when no call wrote one.)
    let stranded = std::fs::read_to_string(&path)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .is_some_and(|doc| !doc["lease"].is_null());
    let got_b = b.credential().await;
    assert!(got_a.is_ok(), "A: {got_a:?}");
    assert!(
        got_b.is_ok(),
        "B failed ({:?}) although the store answers and nobody fetches: it waited for \
         the lease A's abandoned call took (a lease in the file as B began: {stranded}; \
         A fetched {}, B {})",
        got_b.map(|_| ()),
        source_a.fetches(),
        source_b.fetches(),
    );
}

/// World: another process holds the lock for 2 s (stopped with Ctrl-Z inside a store
/// call, say) while this process's `#[tokio::main]`-style runtime makes a store call and
/// gives up on it after 50 ms, then ends. Proves: a call given up is given up (a
/// process on the host that does not answer costs this one a logged outage, nothing
/// more). Proves: no thread goes on waiting for the OS lock, so dropping the runtime is
/// immediate (a thread waiting on the lock used to keep the process from exiting until
/// the other one let go).
#[test]
fn a_runtime_ends_at_once_after_giving_up_on_a_busy_lock() {
    let (_dir, path) = path("runtime-drop");
    let store = FileStore::open(&path).unwrap();
    let busy = busy_for(&path, Duration::from_secs(2));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        assert!(
            tokio::time::timeout(Duration::from_millis(50), store.load())
                .await
                .is_err()
        );
    });
    let start = Instant::now();
    drop(runtime);
    let took = start.elapsed();
    busy.join().unwrap();
    assert!(
        took < Duration::from_millis(500),
        "dropping the runtime waited {took:?} for another process's lock"
    );
}

/// World: as above, the lock busy for 1.5 s; a runtime whose blocking pool has 4
/// threads; 32 store calls, each given up after 20 ms (a cache retrying its refresh,
/// callers polling). Proves: an abandoned call keeps no blocking-pool thread (each used
/// to wait on the OS lock: a lock held for good, by a stopped process, pinned one
/// thread per call until the pool was exhausted, and with it every `spawn_blocking` of
/// the application, DNS lookups included): the application's own blocking task still
/// runs at once while the lock is busy.
#[test]
fn calls_given_up_on_a_busy_lock_do_not_pin_threads() {
    let (_dir, path) = path("pinned-threads");
    let store = FileStore::open(&path).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(4)
        .build()
        .unwrap();
    let busy = busy_for(&path, Duration::from_millis(1_500));
    let ran = runtime.block_on(async {
        for _ in 0..32 {
            let _ = tokio::time::timeout(Duration::from_millis(20), store.load()).await;
        }
        let own = tokio::task::spawn_blocking(|| ());
        tokio::time::timeout(Duration::from_millis(500), own).await
    });
    busy.join().unwrap();
    drop(runtime);
    assert!(
        ran.is_ok(),
        "the application's blocking task waited behind calls given up long ago"
    );
}

/// World: the lock busy for 500 ms, a current-thread runtime making a store call while a
/// ticker task runs beside it. Probe: the store's blocking I/O happens off the runtime's
/// thread. Held: the ticker keeps ticking while the call waits for the lock.
#[test]
fn a_call_waiting_for_the_lock_does_not_block_a_current_thread_runtime() {
    let (_dir, path) = path("current-thread");
    let store = FileStore::open(&path).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let busy = busy_for(&path, Duration::from_millis(500));
    let ticks = runtime.block_on(async {
        let ticker = tokio::spawn(async {
            let mut ticks = 0;
            let start = tokio::time::Instant::now();
            while start.elapsed() < Duration::from_millis(400) {
                tokio::time::sleep(Duration::from_millis(10)).await;
                ticks += 1;
            }
            ticks
        });
        let loaded = store.load().await.unwrap();
        assert_eq!(loaded, None);
        ticker.await.unwrap()
    });
    busy.join().unwrap();
    assert!(
        ticks >= 5,
        "the runtime was blocked: {ticks} ticks in 400 ms"
    );
}

// ---------------------------------------------------------------------------------------
// Files: modes, symlinks, what is found in place.
// ---------------------------------------------------------------------------------------

/// World: a file already at the temporary file's name (`token.json.<pid>.tmp`),
/// readable by all: left by someone else in a shared directory, or by a process of this
/// pid before a reboot or in another PID namespace. Proves: the data file is
/// readable and writable by its owner only. Proves: a file found there is not used (it
/// used to be opened as found, its mode kept, and renamed over the data): each write
/// creates a temporary file of its own name, exclusively, mode 0600, and what is found
/// at a temporary name of this store is removed under the lock.
#[cfg(unix)]
#[tokio::test]
async fn a_temporary_file_found_in_place_does_not_widen_the_data_file() {
    use std::os::unix::fs::PermissionsExt as _;
    let (_dir, path) = path("temp-mode");
    let store = FileStore::open(&path).unwrap();
    // Taking the lease writes the file too: the file found is placed after it, before the
    // save that writes the credential.
    let lease = store.lease(Duration::from_secs(5)).await.unwrap().unwrap();
    let temp = temp_path(&path);
    std::fs::write(&temp, "").unwrap();
    std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(store.save(&lease, &bearer("s3cr3t")).await.unwrap());
    assert_eq!(
        mode(&path),
        0o600,
        "the data file holding the credential took the found file's mode"
    );
}

/// World: a symbolic link at the temporary file's name, pointing elsewhere. Proves: the
/// save writes nothing through it (it used to write the credential, access and refresh
/// token in plain text, into the link's target, then move the link over the data).
#[cfg(unix)]
#[tokio::test]
async fn a_symlink_at_the_temporary_name_is_not_written_through() {
    let (dir, path) = path("temp-symlink");
    let store = FileStore::open(&path).unwrap();
    let elsewhere = dir.join("elsewhere.txt");
    let lease = store.lease(Duration::from_secs(5)).await.unwrap().unwrap();
    std::os::unix::fs::symlink(&elsewhere, temp_path(&path)).unwrap();
    let credential = bearer("s3cr3t-access").with_refresh_token("s3cr3t-refresh");
    assert!(store.save(&lease, &credential).await.unwrap());
    let leaked = std::fs::read_to_string(&elsewhere).unwrap_or_default();
    assert!(
        !leaked.contains("s3cr3t"),
        "the credential was written through the link into {}: {leaked}",
        elsewhere.display()
    );
}

/// World: the lock file already there, readable and writable by all (created by hand, by
/// another user in a shared directory, by an older tool). Proves: README "both
/// files mode 0600". Proves: it is tightened to 0600 (being ours; another user's is
/// refused): anyone who can open it could hold the `flock` and stall every process of
/// the store.
#[cfg(unix)]
#[tokio::test]
async fn a_lock_file_found_wide_open_is_tightened_or_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let (_dir, path) = path("lock-mode");
    let lock = lock_path(&path);
    std::fs::write(&lock, "").unwrap();
    std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let Ok(store) = FileStore::open(&path) else {
        return; // Refused: fine.
    };
    let lease = store.lease(Duration::from_secs(5)).await.unwrap().unwrap();
    assert!(store.save(&lease, &bearer("t")).await.unwrap());
    assert_eq!(mode(&lock), 0o600, "the lock file kept mode 0666");
}

/// World: a data file found readable by all (made by hand, or by an older tool). Probe:
/// the first save replaces it by a private file (the rename puts a new inode in place).
/// Held.
#[cfg(unix)]
#[tokio::test]
async fn a_data_file_found_wide_open_is_replaced_by_a_private_one_at_the_first_save() {
    use std::os::unix::fs::PermissionsExt as _;
    let (_dir, path) = path("data-mode");
    std::fs::write(&path, "{\"v\":1,\"credential\":null,\"lease\":null}").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let store = FileStore::open(&path).unwrap();
    let lease = store.lease(Duration::from_secs(5)).await.unwrap().unwrap();
    assert!(store.save(&lease, &bearer("s3cr3t")).await.unwrap());
    assert_eq!(mode(&path), 0o600);
}

/// World: the data path is a symbolic link to a file elsewhere (dotfiles, a `~/.cache`
/// entry linked to a shared location), found when the store is opened, or put there
/// after (another process, a stray command). Before review 120 a store opened through
/// the link read the target, and its first save replaced the link (a rename) by a file
/// of its own: two processes that shared the target then each held the refresh lease in
/// their own file, and the one on the target went on with a spent refresh token.
/// Proves: "one refresh-token owner" among the processes sharing a file, and "bad input
/// gets a clear typed error": a data path that is a link is refused at `open` and at
/// every call, with an error naming it; the link and its target are left as they are.
#[cfg(unix)]
#[tokio::test]
async fn a_data_path_that_is_a_symlink_is_refused_never_split_or_written_through() {
    let (dir, path) = path("data-symlink");
    let target = dir.join("target.json");
    let real = FileStore::open(&target).unwrap();
    let lease = real.lease(Duration::from_secs(5)).await.unwrap().unwrap();
    assert!(
        real.save(&lease, &bearer("at-1").with_refresh_token("rt-1"))
            .await
            .unwrap()
    );
    real.release(&lease).await.unwrap();
    let before = std::fs::read_to_string(&target).unwrap();
    std::os::unix::fs::symlink(&target, &path).unwrap();
    let err = FileStore::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("data-symlink") && err.contains("symbolic link"),
        "{err}"
    );
    // A link put at the path of a store already open: every call refused.
    let other = dir.join("later.json");
    let store = FileStore::open(&other).unwrap();
    std::os::unix::fs::symlink(&target, &other).unwrap();
    let refused = store
        .lease(Duration::from_secs(5))
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("symbolic link"), "{refused}");
    assert!(store.load().await.is_err());
    assert!(
        std::fs::symlink_metadata(&other)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), before);
    // The target's own store goes on, its lease free.
    assert!(real.lease(Duration::from_secs(5)).await.unwrap().is_some());
}

/// World: a named pipe at the data path (any non-regular file a stray command left).
/// Proves: bad input is a typed error, or counts as absent. Proves: it is
/// refused at once with an error, and the next call of another process answers too (the
/// open used to block forever inside the lock, and with it every call of every process).
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_path_that_is_a_pipe_is_refused_not_waited_on() {
    let (_dir, path) = path("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .unwrap();
    assert!(made.success());
    let (a, b) = (
        FileStore::open(&path).unwrap(),
        FileStore::open(&path).unwrap(),
    );
    let first = tokio::time::timeout(Duration::from_secs(1), a.load()).await;
    let second =
        tokio::time::timeout(Duration::from_secs(1), b.lease(Duration::from_secs(3))).await;
    // Unblock the stranded blocking threads so the test can end: an open for reading and
    // writing never blocks on a pipe, and wakes an open for reading waiting on it (which
    // then reads an empty file once this end is closed). Repeated for the next caller.
    let stranded = first.is_err() || second.is_err();
    for _ in 0..if stranded { 200 } else { 0 } {
        drop(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path),
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        first.is_ok() && second.is_ok(),
        "a pipe at the data path: load answered {}, another process's lease {}",
        if first.is_ok() { "in time" } else { "never" },
        if second.is_ok() {
            "in time"
        } else {
            "never (the lock is held by the stuck load)"
        },
    );
}

// ---------------------------------------------------------------------------------------
// The lease and the wall clock.
// ---------------------------------------------------------------------------------------

/// World: A takes a 3 s lease (what the cache asks for) and begins its fetch; 200 ms
/// later the host's clock steps back 1 s (an NTP step, a VM resumed), simulated as the
/// existing test does: the lease's end in the file moved 1 s later. Proves:
/// never two fetches at once. Proves: B does not take it (a lease ending 1 s further away
/// than its 3 s used to be stale at once: any step back larger than the time since the
/// holder's last renewal let a second fetch start). Only a lease ending more than twice
/// its length away is stale (`fleet.rs` shows an hour's step still cleared at once).
#[tokio::test]
async fn a_small_clock_step_back_does_not_hand_a_live_lease_to_another_process() {
    let (_dir, path) = path("step-back");
    let (a, b) = (
        FileStore::open(&path).unwrap(),
        FileStore::open(&path).unwrap(),
    );
    let _held = a.lease(Duration::from_secs(3)).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let until = doc["lease"]["until"].as_u64().unwrap();
    doc["lease"]["until"] = (until + 1_000).into();
    std::fs::write(&path, doc.to_string()).unwrap();
    assert!(
        b.lease(Duration::from_secs(3)).await.unwrap().is_none(),
        "a 1 s clock step back handed A's live lease to B: two fetches at once"
    );
}

// ---------------------------------------------------------------------------------------
// Whole writes, unreadable values, secrets.
// ---------------------------------------------------------------------------------------

/// World: one process saving large credentials (64 KiB headers) as fast as it can, a
/// reader reading the raw data file at the same time without the lock. Probe: a reader
/// never sees half a write. Held: every read is a whole document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_without_the_lock_never_sees_half_a_write() {
    let (_dir, path) = path("half-write");
    let writer = FileStore::open(&path).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (path, stop) = (path.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match std::fs::read_to_string(&path) {
                    Ok(text) => {
                        serde_json::from_str::<serde_json::Value>(&text)
                            .unwrap_or_else(|e| panic!("half a write ({} bytes): {e}", text.len()));
                        reads += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => panic!("{e}"),
                }
            }
            reads
        })
    };
    let lease = writer
        .lease(Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    for i in 0..60 {
        let big = format!("{i}-{}", "x".repeat(64 * 1024));
        assert!(writer.save(&lease, &bearer(&big)).await.unwrap());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.join().unwrap();
    assert!(reads > 0);
}

/// World: the data file holds a plain credential (access and refresh token) while this
/// store encrypts; then garbage around the same secrets; then the store's `Debug`, the
/// error of a save whose write fails. Probe: secrets never in logs, `Debug` or errors. Held:
/// the one warning names the path and why, never the contents. (The subscriber is
/// global: the store logs from a blocking-pool thread, which a thread-local subscriber,
/// as `support::capture_traces` installs, never sees.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_value_is_logged_once_without_its_contents() {
    let capture = support::Capture::default();
    let writer = capture.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish(),
    )
    .unwrap();
    let (dir, path) = path("secrets");
    let plain = FileStore::open(&path).unwrap();
    let lease = plain.lease(Duration::from_secs(5)).await.unwrap().unwrap();
    let credential = bearer("s3cr3t-access").with_refresh_token("s3cr3t-refresh");
    assert!(plain.save(&lease, &credential).await.unwrap());
    plain.release(&lease).await.unwrap();

    let sealed = FileStore::open(&path).unwrap().encrypted([3; 32]);
    for _ in 0..3 {
        assert_eq!(
            sealed.load().await.unwrap(),
            None,
            "plain text where it encrypts"
        );
    }
    let garbage = FileStore::open(&path).unwrap();
    std::fs::write(&path, "{\"v\":1,\"credential\":\"v1:ab:{s3cr3t-access\"").unwrap();
    assert_eq!(garbage.load().await.unwrap(), None);
    std::fs::write(&path, "s3cr3t-access s3cr3t-refresh").unwrap();
    assert_eq!(garbage.load().await.unwrap(), None);

    let debug = format!("{sealed:?} {garbage:?}");
    // A write that fails: a store whose data file is a hard link to this one, under a name
    // that leaves no room for a temporary file's (255 bytes at most, what every file
    // system of this host allows); an error that shows no secret, and the data as it was.
    let lease = garbage
        .lease(Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    let before = std::fs::read_to_string(&path).unwrap();
    let long = dir.join(&format!("{}.json", "t".repeat(245)));
    std::fs::hard_link(&path, &long).unwrap();
    let saved = FileStore::open(&long)
        .unwrap()
        .save(&lease, &credential)
        .await;
    assert!(saved.is_err(), "{saved:?}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
    let error = format!("{saved:?}");
    let log = capture.text();
    assert!(
        !log.contains("s3cr3t") && !debug.contains("s3cr3t"),
        "{log}\n{debug}"
    );
    assert!(!error.contains("s3cr3t"), "{error}");
    // (Other tests of this binary log for their own files: only this one's are counted.)
    let ours = log
        .lines()
        .filter(|line| line.contains("credential file cannot be read"))
        .filter(|line| line.contains(&*path.to_string_lossy()))
        .count();
    assert_eq!(ours, 2, "once per store: {log}");
}

/// World: a lease that ran out (nobody took it over) while its holder still works, then
/// the holder saves and renews. Probe: the save is fenced by the lease's time, not only
/// by a newer holder. Held: refused, nothing written; a new lease is free.
#[tokio::test]
async fn a_lease_that_ran_out_untaken_still_fences_its_save() {
    let (_dir, path) = path("lapsed");
    let (a, b) = (
        FileStore::open(&path).unwrap(),
        FileStore::open(&path).unwrap(),
    );
    let lapsed = a.lease(Duration::from_millis(100)).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(!a.save(&lapsed, &bearer("late")).await.unwrap());
    assert!(!a.renew(&lapsed, Duration::from_secs(5)).await.unwrap());
    assert_eq!(b.load().await.unwrap(), None);
    assert!(b.lease(Duration::from_secs(5)).await.unwrap().is_some());
}

/// World: the data file is 128 MiB (a sparse file of zero bytes: a stray `truncate -s`,
/// a disk error, a copy gone wrong). Proves: bad input counts as absent, never a
/// panic (nor an abort). Proves: it counts as absent without being read (every call used
/// to read the whole file into memory: peak memory grew by the file's size, and a file of
/// some GiB aborted the process on allocation failure); 1 MiB is the bound.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_huge_data_file_is_refused_without_reading_it_whole() {
    fn peak_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
    let (_dir, path) = path("huge");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let store = FileStore::open(&path).unwrap();
    let before = peak_kib();
    assert_eq!(store.load().await.unwrap(), None);
    let grew = peak_kib().saturating_sub(before);
    assert!(
        grew < 16 << 10,
        "one load of a 128 MiB data file raised peak memory by {} MiB",
        grew >> 10
    );
}

/// World: the data file written by another version of the crate (`"v": 2`) whose process
/// holds the lease right now. Probe: what another version's file counts for. Proves:
/// every call is refused with an error (the cache then fetches on its own, as with a
/// store that is down) and the file is left as it is. It used to count as absent, lease
/// included: this version took the lease and rewrote the file in its own format,
/// dropping the other version's credential, refresh token and lease. (The review's test
/// asked for `Ok(None)` from `lease`; an error says more, and a cache waiting for a
/// holder that never saves in this format would time out instead.)
#[tokio::test]
async fn a_file_of_another_version_holding_a_lease_is_not_overwritten() {
    let (_dir, path) = path("other-version");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let newer = serde_json::json!({
        "v": 2,
        "credential": "v2:whatever",
        "lease": {"token": "held-by-v2", "until": now + 3_000, "ttl": 3_000},
    })
    .to_string();
    std::fs::write(&path, &newer).unwrap();
    let store = FileStore::open(&path).unwrap();
    // Refused (an error: the cache fetches on its own, as with a store that is down), or
    // seen as leased; never taken, never rewritten.
    let taken = store.lease(Duration::from_secs(3)).await;
    let saved = match store.lease(Duration::from_secs(3)).await {
        Ok(Some(lease)) => store.save(&lease, &bearer("mine")).await.unwrap_or(false),
        _ => false,
    };
    let loaded = store.load().await;
    let after = std::fs::read_to_string(&path).unwrap();
    assert!(
        !matches!(taken, Ok(Some(_))) && !saved && after == newer,
        "took the lease ({}) and rewrote the other version's file: {after}",
        matches!(taken, Ok(Some(_)))
    );
    assert!(!matches!(loaded, Ok(Some(_))), "{loaded:?}");
}

// ---------------------------------------------------------------------------------------
// A process killed mid-write (real child processes: this binary, running `writer`).
// ---------------------------------------------------------------------------------------

const WRITER: &str = "TCA_FILE_REVIEW_WRITER";

/// World: 6 rounds of a child process saving 256 KiB credentials (each with its refresh
/// token) through the store as fast as it can, killed with SIGKILL at a varying moment;
/// each round's writer takes the dead one's lease over (a 150 ms lease). Proves: a
/// process killed mid-write leaves the old data whole (after every kill the file holds
/// one whole credential, refresh token included), and the temporary file a kill inside a
/// write leaves (the whole stored form, refresh token included) is removed by the next
/// call of any process: here the load that follows the kill.
#[cfg(unix)]
#[tokio::test]
async fn a_process_killed_mid_write_leaves_the_old_data_whole_and_no_copy_behind() {
    let (dir, path) = path("killed-writer");
    let store = FileStore::open(&path).unwrap();
    let mut leftovers = Vec::new();
    let mut last: Option<Credential> = None;
    for round in 0..6u64 {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "writer",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WRITER, &path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Until this round's writer has saved (its credentials name its pid).
        let started = Instant::now();
        while store.load().await.unwrap() == last {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the writer never wrote"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(37 * (round + 1) % 100 + 10)).await;
        child.kill().unwrap();
        child.wait().unwrap();
        let loaded = store
            .load()
            .await
            .unwrap()
            .expect("a whole credential after a kill");
        assert!(
            loaded.refresh_token().is_some(),
            "round {round}: its refresh token is gone"
        );
        for entry in std::fs::read_dir(dir.join("")).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if name.ends_with(".tmp") && !leftovers.contains(&name) {
                leftovers.push(name);
            }
        }
        last = Some(loaded);
    }
    assert!(
        leftovers.is_empty(),
        "copies of the credential left by killed writers: {leftovers:?}"
    );
}

/// A writer process (run by the test above, never on its own): holds the lease (taking it
/// again if it ran out) and saves credentials with refresh tokens until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a writer process of the kill test, started by it"]
async fn writer() {
    let Some(path) = std::env::var_os(WRITER) else {
        return;
    };
    let store = FileStore::open(PathBuf::from(path)).unwrap();
    let ttl = Duration::from_millis(150);
    let pad = "x".repeat(256 << 10);
    let pid = std::process::id();
    let mut i = 0u64;
    loop {
        let Some(lease) = store.lease(ttl).await.unwrap() else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        while store.renew(&lease, ttl).await.unwrap() {
            let credential =
                bearer(&format!("at-{pid}-{i}-{pad}")).with_refresh_token(format!("rt-{pid}-{i}"));
            store.save(&lease, &credential).await.unwrap();
            i += 1;
        }
    }
}

/// World: a process is inside a store call (holds the `flock`) when the lock file is
/// deleted (a user clearing the cache directory, `rm ~/.cache/my-cli/*`). Probe: every
/// call is exclusive. Proves: the next call does not go in at once (it used to create a
/// new lock file and lock it inside the first process's critical section: two
/// read-modify-writes at once). A missing lock file is made again only after 500 ms,
/// longer than a call lasts; a holder on the deleted file for longer is not seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_file_deleted_under_a_holder_does_not_let_a_second_caller_in() {
    let (_dir, path) = path("lock-unlinked");
    let store = FileStore::open(&path).unwrap();
    let busy = busy_for(&path, Duration::from_millis(500));
    std::fs::remove_file(lock_path(&path)).unwrap();
    let answered = tokio::time::timeout(Duration::from_millis(200), store.load()).await;
    busy.join().unwrap();
    assert!(
        answered.is_err(),
        "a call went through while another held the lock on the deleted lock file"
    );
}

/// World: the store's directory on a full file system (`TCA_SMALL_FS`: a directory on a
/// small tmpfs, e.g. `mount -t tmpfs -o size=256k tmpfs DIR`; skipped when unset), a
/// save that does not fit. Probe: disk full is a typed error, the old data whole, no
/// temporary file left. Held.
#[tokio::test]
async fn a_save_on_a_full_disk_fails_cleanly() {
    let Some(dir) = std::env::var_os("TCA_SMALL_FS") else {
        return;
    };
    let path = PathBuf::from(dir).join("token.json");
    let _ = std::fs::remove_file(&path);
    let store = FileStore::open(&path).unwrap();
    let lease = store.lease(Duration::from_secs(5)).await.unwrap().unwrap();
    let small = bearer("small").with_refresh_token("rt-small");
    assert!(store.save(&lease, &small).await.unwrap());
    let huge = bearer(&"x".repeat(1 << 20)).with_refresh_token("rt-huge");
    let saved = store.save(&lease, &huge).await;
    assert!(saved.is_err(), "{:?}", saved.map(|_| ()));
    let loaded = store.load().await.unwrap().unwrap();
    assert_eq!(loaded, small);
    assert_eq!(loaded.refresh_token().unwrap().expose(), "rt-small");
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(store.save(&lease, &small).await.unwrap());
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(lock_path(&path));
}

/// World: a saved data file (plain, then sealed) cut at every length (a copy or a disk
/// gone wrong; the store itself never leaves one). Probe: a truncated file counts as
/// absent, never an error, never a panic, never a credential other than the one saved.
/// Held.
#[tokio::test]
async fn a_data_file_cut_at_any_length_is_absent_or_whole() {
    let (_dir, path) = path("truncated");
    let credential = bearer("s3cr3t-access")
        .expires_in(Duration::from_secs(600))
        .with_refresh_token("s3cr3t-refresh");
    for store in [
        FileStore::open(&path).unwrap(),
        FileStore::open(&path).unwrap().encrypted([9; 32]),
    ] {
        let lease = store.lease(Duration::from_secs(60)).await.unwrap().unwrap();
        assert!(store.save(&lease, &credential).await.unwrap());
        store.release(&lease).await.unwrap();
        let whole = std::fs::read(&path).unwrap();
        for len in 0..whole.len() {
            std::fs::write(&path, &whole[..len]).unwrap();
            match store.load().await {
                Ok(None) => {}
                Ok(Some(loaded)) => {
                    assert_eq!(loaded, credential, "cut at {len}");
                    assert_eq!(
                        loaded.refresh_token().map(|t| t.expose().to_owned()),
                        Some("s3cr3t-refresh".to_owned()),
                        "cut at {len}"
                    );
                }
                Err(e) => panic!("cut at {len}: {e}"),
            }
        }
        std::fs::remove_file(&path).unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// Review 83.
// ---------------------------------------------------------------------------------------

/// World: the lock file's name is a symbolic link to another file of the user's, open
/// to others (`~/.profile`, a shared notes file): planted in the cache directory, or
/// left by a tool that linked its cache files. Proves: the module docs' "a lock
/// file found open to others is tightened, or refused", and 914c37b's "never opened as
/// found: a file or link already there is not written through" (said of the temporary
/// file). Probe: the mode of the file the link names is left alone (the store refuses
/// the link, or replaces it, but never changes another file).
#[cfg(unix)]
#[tokio::test]
async fn a_lock_file_that_is_a_symlink_does_not_change_the_file_it_names() {
    use std::os::unix::fs::PermissionsExt as _;
    let (dir, path) = path("lock-symlink");
    let other = dir.join("notes.txt");
    std::fs::write(&other, "shared notes").unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::symlink(&other, lock_path(&path)).unwrap();
    let opened = FileStore::open(&path);
    if let Ok(store) = &opened {
        let _ = store.load().await;
    }
    assert_eq!(
        mode(&other),
        0o644,
        "the file the lock file's link names was made private (open: {:?})",
        opened.map(|_| ())
    );
}

/// World (review 120): `FileStore::open` at a path whose directory does not exist (a
/// typo, a cache directory not created yet), and a data path under a regular file.
/// Proves: the module's "fails now, not at the first refresh, when the directory is
/// missing" with a clear error: the message names the path it could not use (as the
/// store's own refusals do: `credential file <path>: ...`), so a log line says which
/// file; a bare `No such file or directory (os error 2)` does not.
#[tokio::test]
async fn opening_a_store_in_a_missing_directory_names_the_path() {
    let (dir, _) = path("missing-dir");
    let missing = dir.join("no-such-dir").join("token.json");
    let err = FileStore::open(&missing).unwrap_err();
    assert!(
        err.downcast_ref::<std::io::Error>().is_some(),
        "a typed (io) error: {err:?}"
    );
    let shown = err.to_string();
    assert!(
        shown.contains("no-such-dir"),
        "the error does not say which path: {shown:?}"
    );
}

/// World (review 120): a data file whose `lease` field was written by hand or another
/// tool with a millisecond time as a JSON float (`"until": 1.8e12`), beside a stored
/// pair with its refresh token. Proves: "never a lost refresh token" (README: the
/// store owns the fleet's refresh token): a stray field the store does not need to read
/// the credential does not make the next lease discard a readable refresh token. (The
/// module docs say an unreadable *value* counts as absent and is overwritten: here the
/// value is readable, only the lease beside it is not.)
#[tokio::test]
async fn a_malformed_lease_field_discards_a_readable_refresh_token() {
    let (_dir, path) = path("bad-lease-field");
    let store = FileStore::open(&path).unwrap();
    let lease = store.lease(Duration::from_secs(5)).await.unwrap().unwrap();
    assert!(
        store
            .save(&lease, &bearer("at").with_refresh_token("rt-keep"))
            .await
            .unwrap()
    );
    store.release(&lease).await.unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let mut doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    doc["lease"] = serde_json::json!({"token": "x", "until": 1.8e12, "ttl": 5000});
    std::fs::write(&path, doc.to_string()).unwrap();
    // The next process's lease: the file counts as absent and is overwritten.
    let _ = store.lease(Duration::from_secs(5)).await.unwrap();
    let after = std::fs::read_to_string(&path).unwrap();
    assert!(
        after.contains("rt-keep"),
        "the stored refresh token was discarded by a lease: {after}"
    );
}

const FULL_WRITER: &str = "TCA_REVIEW120_FSIZE_DIR";

/// World (review 120): a process whose writes are cut short midway (`RLIMIT_FSIZE` of
/// 64 KiB, `SIGXFSZ` ignored: each write past it fails `EFBIG` after a partial write,
/// as on a full disk), run as a child so the limit touches no other test. It saves a
/// small pair, then one of 256 KiB. Proves (held): "every write a temporary file
/// renamed over the data ... a process killed mid-write leaves the old data whole",
/// for a write that fails rather than a kill: the failed save is an error (no panic),
/// the small pair, refresh token included, is whole, no temporary file is left, and a
/// later save goes through.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_save_cut_short_midway_is_an_error_and_keeps_the_old_pair() {
    let (dir, _path) = path("fsize");
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "save_cut_short_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(FULL_WRITER, dir.join(""))
        // Through pipes: the file-size limit applies to every file the child writes,
        // its output too when that is a file (a CI log past 64 KiB).
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "the child's checks failed: {:?}\n{}{}",
        status.status,
        String::from_utf8_lossy(&status.stdout),
        String::from_utf8_lossy(&status.stderr)
    );
}

/// The child of the test above (never run on its own).
#[cfg(target_os = "linux")]
#[tokio::test]
#[ignore = "a child process of a_save_cut_short_midway_is_an_error_and_keeps_the_old_pair"]
async fn save_cut_short_child() {
    let Some(dir) = std::env::var_os(FULL_WRITER) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let path = dir.join("token.json");
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let limit = libc::rlimit {
            rlim_cur: 64 << 10,
            rlim_max: libc::RLIM_INFINITY,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
    let store = FileStore::open(&path).unwrap();
    let lease = store.lease(Duration::from_secs(30)).await.unwrap().unwrap();
    let small = bearer("small").with_refresh_token("rt-small");
    assert!(store.save(&lease, &small).await.unwrap());
    let huge = bearer(&"x".repeat(256 << 10)).with_refresh_token("rt-huge");
    let saved = store.save(&lease, &huge).await;
    assert!(saved.is_err(), "{:?}", saved.map(|_| ()));
    let shown = saved.unwrap_err().to_string();
    assert!(
        !shown.contains("rt-huge") && !shown.contains("xxxx"),
        "{shown}"
    );
    let loaded = store.load().await.unwrap().unwrap();
    assert_eq!(loaded, small);
    assert_eq!(loaded.refresh_token().unwrap().expose(), "rt-small");
    let temps: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(temps.is_empty(), "{temps:?}");
    assert!(store.save(&lease, &small).await.unwrap());
}

/// World (review 120): the data file is found writable by everyone (mode `0666`, a
/// stray `chmod`, a `umask 0` shell), and another local user writes a credential of
/// their choosing into it (here: this process, standing for them) before this store
/// ever writes. Proves: the module's "both files are readable and writable by their
/// owner only" and the brief's "clear typed errors on ... wrong permissions": a data
/// file others can write is refused (as a wide-open lock file is) or counts as absent;
/// its credential, and its refresh token, are never taken (else another user picks the
/// session this host's processes use and what they present to the token endpoint).
#[cfg(unix)]
#[tokio::test]
async fn a_data_file_writable_by_others_is_not_trusted() {
    use std::os::unix::fs::PermissionsExt as _;
    let (_dir, path) = path("data-world-writable");
    // Another user's credential, in the store's own format.
    let planter_path = path.with_file_name("planted.json");
    let planter = FileStore::open(&planter_path).unwrap();
    let lease = planter
        .lease(Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert!(
        planter
            .save(
                &lease,
                &bearer("attacker-at").with_refresh_token("attacker-rt")
            )
            .await
            .unwrap()
    );
    planter.release(&lease).await.unwrap();
    std::fs::copy(&planter_path, &path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let store = FileStore::open(&path).unwrap();
    let loaded = store.load().await;
    assert!(
        !matches!(loaded, Ok(Some(_))),
        "a credential from a world-writable file was taken: {:?}",
        loaded.map(|c| c.map(|c| c.refresh_token().is_some()))
    );
    // The next write replaces it with a private file of this store's.
    let lease = store.lease(Duration::from_secs(5)).await.unwrap().unwrap();
    assert!(store.save(&lease, &bearer("mine")).await.unwrap());
    assert_eq!(mode(&path), 0o600);
    assert_eq!(store.load().await.unwrap(), Some(bearer("mine")));
    // Private, but another user's (`nobody`; only a root test run can make one): the
    // same.
    std::fs::copy(&planter_path, &path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    if std::process::Command::new("chown")
        .args(["65534"])
        .arg(&path)
        .status()
        .is_ok_and(|s| s.success())
    {
        assert_eq!(
            store.load().await.unwrap(),
            None,
            "another user's file was taken"
        );
    }
}

/// World (review 120): data files crafted by hand or by another tool, each valid JSON of
/// this version but with values at their edges: issued after it expires, an expiry past
/// year 9999, a float or negative lease end, a hold at `u64::MAX` ms, no headers, a
/// header value with a line break, a deep nesting, an array at the top. Proves (held):
/// "clear typed errors on bad input ..., never a panic": every call answers (`load`,
/// `lease`, `held_until`), none panics, and a credential that cannot be sent is never
/// handed out.
#[tokio::test]
async fn crafted_data_files_never_panic_and_never_hand_out_a_bad_credential() {
    let (_dir, path) = path("crafted");
    let cred = |doc: &str| format!("v1:00:{doc}");
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let files: Vec<String> = vec![
        serde_json::json!({"v":1,"credential":cred(r#"{"h":[["authorization","Bearer a"]],"iat":2000000000000,"exp":1000}"#)}).to_string(),
        serde_json::json!({"v":1,"credential":cred(r#"{"h":[["authorization","Bearer a"]],"exp":253402300800000}"#)}).to_string(),
        serde_json::json!({"v":1,"credential":cred(r#"{"h":[],"exp":null}"#)}).to_string(),
        serde_json::json!({"v":1,"credential":cred(r#"{"h":[["authorization","Bearer a\r\nx: y"]]}"#)}).to_string(),
        serde_json::json!({"v":1,"credential":cred(r#"{"h":[["bad name","x"]]}"#)}).to_string(),
        serde_json::json!({"v":1,"credential":cred(&deep)}).to_string(),
        serde_json::json!({"v":1,"credential":null,"lease":{"token":"t","until":-5,"ttl":1}}).to_string(),
        serde_json::json!({"v":1,"credential":null,"lease":{"token":"t","until":u64::MAX,"ttl":u64::MAX}}).to_string(),
        serde_json::json!({"v":1,"credential":null,"hold":u64::MAX}).to_string(),
        format!("{{\"v\":1,\"credential\":null,\"lease\":{deep}}}"),
        "[1,2,3]".to_owned(),
        "{\"v\":18446744073709551616}".to_owned(),
    ];
    for (i, text) in files.iter().enumerate() {
        std::fs::write(&path, text).unwrap();
        let store = FileStore::open(&path).unwrap();
        let loaded = store.load().await;
        if let Ok(Some(credential)) = &loaded {
            assert!(
                credential.headers().count() > 0,
                "file {i}: a credential with no header"
            );
        }
        let _ = store.held_until().await;
        let _ = store.lease(Duration::from_secs(1)).await;
    }
}

/// World (review 120): a tool calls the store directly (`CredentialStore` is public: a
/// CLI's `logout` command reading or clearing the shared file) from an executor that
/// is not Tokio's (here a minimal `block_on` of std's `Wake`). Proves: "never a panic":
/// a call outside a Tokio runtime is an error, or works (the file calls are blocking
/// I/O); it panics inside `tokio::task::spawn_blocking`, which the module docs do not
/// mention.
#[test]
fn a_store_call_outside_a_tokio_runtime_does_not_panic() {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        let waker = std::task::Waker::from(std::sync::Arc::new(Unpark(std::thread::current())));
        let mut cx = std::task::Context::from_waker(&waker);
        let mut future = std::pin::pin!(future);
        loop {
            if let std::task::Poll::Ready(out) = future.as_mut().poll(&mut cx) {
                return out;
            }
            std::thread::park_timeout(Duration::from_millis(10));
        }
    }
    let (_dir, path) = path("no-runtime");
    let store = FileStore::open(&path).unwrap();
    let answered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        block_on(store.load()).map_err(|e| e.to_string())
    }));
    assert!(
        answered.is_ok(),
        "FileStore::load panicked outside a Tokio runtime"
    );
}

/// World (review 122): a tool calls the store directly from an executor that is not
/// Tokio's (as `a_store_call_outside_a_tokio_runtime_does_not_panic`), while another
/// process of the host is inside a store call for 1.5 s (holds the `flock`; a stopped
/// or stuck process holds it for as long as it is stopped). The tool polls `load()`
/// once, as an executor does before it gets to the tool's own timeout.
/// Proves (module docs: outside a runtime "the try, a few milliseconds of file I/O,
/// runs on the calling thread"; a caller's timeout can end any store call, as
/// `GivenUp` lets it on a runtime): one poll does a try and returns, so the caller can
/// give up. Counter: how long the first poll takes (review 122: FAILS, the poll loops
/// on the calling thread, `std::thread::sleep` between tries, until the other process
/// lets go: no timeout of the caller's can end it, and a holder that never lets go
/// hangs the tool).
#[test]
fn a_store_call_outside_a_runtime_does_not_wait_out_another_process_in_one_poll() {
    let (_dir, path) = path("no-runtime-busy");
    let store = FileStore::open(&path).unwrap();
    let holder = busy_for(&path, Duration::from_millis(1500));
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut load = std::pin::pin!(store.load());
    let started = std::time::Instant::now();
    let _ = load.as_mut().poll(&mut cx);
    let first_poll = started.elapsed();
    holder.join().unwrap();
    assert!(
        first_poll < Duration::from_millis(500),
        "one poll of FileStore::load outside a runtime blocked {first_poll:?}, as long as another process held the lock"
    );
}
