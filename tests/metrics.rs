//! The signals an operator graphs (feature `metrics`), read back through metrics-util's
//! debugging recorder: what the refresh path, the store and the layer record, under the
//! documented names, with the cache's name as a label and never a secret or a URL.
#![cfg(feature = "metrics")]

mod support;

use std::{sync::OnceLock, time::Duration};

use http::StatusCode;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use support::{FakeApi, TestSource, get, store::FaultStore};
use tower::{Service, ServiceExt};
use tower_client_auth::{AuthLayer, Credential, CredentialCache, CredentialStore, MemoryStore};

/// The process's recorder, installed once for this test binary.
fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().expect("the only recorder");
        snapshotter
    })
}

/// One recorded series: its name, its labels, its value.
type Series = (String, Vec<(String, String)>, DebugValue);

/// Every series recorded so far.
/// Taken by each test for its whole run: a snapshot drains the counters it reads, so two
/// tests reading at once would take each other's counts.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn series() -> Vec<Series> {
    snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let labels = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            (key.name().to_owned(), labels, value)
        })
        .collect()
}

/// The count of `name` for cache `cache` whose labels include `with`: a counter's value,
/// a histogram's number of samples.
fn count(all: &[Series], name: &str, cache: &str, with: &[(&str, &str)]) -> u64 {
    all.iter()
        .filter(|(n, labels, _)| {
            n == name
                && labels.iter().any(|(k, v)| k == "cache" && v == cache)
                && with
                    .iter()
                    .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, value)| match value {
            DebugValue::Counter(n) => *n,
            DebugValue::Histogram(samples) => samples.len() as u64,
            DebugValue::Gauge(_) => 0,
        })
        .sum()
}

/// World: one process's caches through every path the metrics describe: a failed then a
/// good fetch, a rejection replayed by the layer, a second cache served from the shared
/// store, a cache waiting on another's lease, a store credential a hand-over made
/// needless, and a store that is down. Proves: each is
/// counted under its documented name and its cache's name; no label holds a secret or a
/// URL; a name that could is refused by the builder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refresh_path_is_counted_under_documented_names() {
    let _serial = SERIAL.lock().await;
    snapshotter();
    // A failed fetch, then a good one.
    let source = TestSource::new();
    source.set_failing(true);
    let cache = CredentialCache::builder(source.clone())
        .name("m-fail")
        .backoff(Duration::from_millis(1), Duration::from_millis(1))
        .build()
        .unwrap();
    assert!(cache.credential().await.is_err());
    source.set_failing(false);
    tokio::time::sleep(Duration::from_millis(20)).await;
    cache.credential().await.unwrap();

    // A rejection the layer replays: the API refuses token-1 only.
    let api = FakeApi::new(|_, token| match token {
        Some("token-1") => StatusCode::UNAUTHORIZED,
        _ => StatusCode::OK,
    });
    let layer = AuthLayer::builder(TestSource::new())
        .name("m-layer")
        .origin("https://api.test")
        .unwrap()
        .build()
        .unwrap();
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(api.service());
    let response = svc.ready().await.unwrap().call(get("/x")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // Two caches on one store: the second is served from it. A third waits for a slow
    // holder's lease.
    let store = MemoryStore::new();
    let first = CredentialCache::builder(TestSource::new())
        .name("m-first")
        .store(store.clone())
        .build()
        .unwrap();
    let peer = CredentialCache::builder(TestSource::new())
        .name("m-peer")
        .store(store.clone())
        .build()
        .unwrap();
    first.credential().await.unwrap();
    peer.credential().await.unwrap();
    let slow_store = MemoryStore::new();
    let slow = CredentialCache::builder(TestSource::build(
        None,
        Duration::from_millis(300),
        false,
        Default::default(),
    ))
    .name("m-holder")
    .store(slow_store.clone())
    .build()
    .unwrap();
    let waiter = CredentialCache::builder(TestSource::new())
        .name("m-waiter")
        .store(slow_store)
        .build()
        .unwrap();
    let holding = tokio::spawn(async move { slow.credential().await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    waiter.credential().await.unwrap();
    holding.await.unwrap().unwrap();

    // A refresh that finds another process's credential in the store, while a
    // credential handed over meanwhile answers instead: no store hit.
    let store = FaultStore::new();
    let lease = store.lease(Duration::from_secs(10)).await.unwrap().unwrap();
    let saved = Credential::bearer("saved").unwrap();
    assert!(store.save(&lease, &saved).await.unwrap());
    store.release(&lease).await.unwrap();
    store.faults().loads.close();
    let cache = CredentialCache::builder(TestSource::new())
        .name("m-replaced")
        .store(store.clone())
        .build()
        .unwrap();
    let refresh = tokio::spawn({
        let cache = cache.clone();
        async move { cache.credential().await }
    });
    store.faults().loads.arrived().await;
    let handed = Credential::bearer("handed").unwrap();
    assert!(cache.handle().replace(handed.clone()).unwrap());
    store.faults().loads.let_one();
    assert_eq!(refresh.await.unwrap().unwrap(), handed);

    // A store that is down.
    let down = CredentialCache::builder(TestSource::new())
        .name("m-down")
        .store(FaultStore::down())
        .build()
        .unwrap();
    down.credential().await.unwrap();

    let all = series();
    let c = |name: &str, cache: &str, with: &[(&str, &str)]| count(&all, name, cache, with);
    assert_eq!(
        c("tower_client_auth_store_hits_total", "m-replaced", &[]),
        0
    );
    assert_eq!(
        c(
            "tower_client_auth_source_fetches_total",
            "m-fail",
            &[("outcome", "error")]
        ),
        1
    );
    assert_eq!(
        c(
            "tower_client_auth_source_fetches_total",
            "m-fail",
            &[("outcome", "ok")]
        ),
        1
    );
    assert_eq!(
        c(
            "tower_client_auth_refreshes_total",
            "m-fail",
            &[("outcome", "error")]
        ),
        1
    );
    assert_eq!(
        c(
            "tower_client_auth_refresh_duration_seconds",
            "m-fail",
            &[("outcome", "ok")]
        ),
        1
    );
    assert_eq!(
        c(
            "tower_client_auth_source_fetch_duration_seconds",
            "m-fail",
            &[]
        ),
        2
    );
    assert!(c("tower_client_auth_waits_total", "m-fail", &[]) >= 2);
    assert_eq!(c("tower_client_auth_rejections_total", "m-layer", &[]), 1);
    assert_eq!(c("tower_client_auth_replays_total", "m-layer", &[]), 1);
    assert_eq!(
        c(
            "tower_client_auth_source_fetches_total",
            "m-layer",
            &[("outcome", "ok")]
        ),
        2
    );
    assert_eq!(
        c("tower_client_auth_source_fetches_total", "m-peer", &[]),
        0
    );
    assert_eq!(c("tower_client_auth_store_hits_total", "m-peer", &[]), 1);
    assert_eq!(
        c("tower_client_auth_lease_wait_seconds", "m-waiter", &[]),
        1
    );
    assert_eq!(c("tower_client_auth_store_hits_total", "m-waiter", &[]), 1);
    assert_eq!(
        c("tower_client_auth_source_fetches_total", "m-waiter", &[]),
        0
    );
    assert!(
        c(
            "tower_client_auth_store_errors_total",
            "m-down",
            &[("call", "load")]
        ) >= 1
    );
    assert_eq!(
        c(
            "tower_client_auth_source_fetches_total",
            "m-down",
            &[("outcome", "ok")]
        ),
        1
    );

    for (name, labels, _) in &all {
        assert!(name.starts_with("tower_client_auth_"), "{name}");
        for (key, value) in labels {
            assert!(
                ["cache", "outcome", "call"].contains(&key.as_str()),
                "{name}: label {key}"
            );
            assert!(
                !value.contains("token-") && !value.contains("://") && !value.contains("refused"),
                "{name}: {key}={value}"
            );
        }
    }

    for bad in ["", "has space", "https://api.test", &"x".repeat(65)] {
        let err = CredentialCache::builder(TestSource::new())
            .name(bad)
            .build()
            .unwrap_err();
        assert_eq!(err.setting(), "name", "{bad:?}");
    }
}

/// A store whose `held_until` fails (a Redis `GET` error, say), its other calls working.
#[derive(Clone, Default)]
struct HoldUnreadable(MemoryStore);

impl CredentialStore for HoldUnreadable {
    async fn load(&self) -> Result<Option<Credential>, tower_client_auth::BoxError> {
        self.0.load().await
    }
    async fn lease(
        &self,
        ttl: Duration,
    ) -> Result<Option<tower_client_auth::store::Lease>, tower_client_auth::BoxError> {
        self.0.lease(ttl).await
    }
    async fn save(
        &self,
        lease: &tower_client_auth::store::Lease,
        credential: &Credential,
    ) -> Result<bool, tower_client_auth::BoxError> {
        self.0.save(lease, credential).await
    }
    async fn renew(
        &self,
        lease: &tower_client_auth::store::Lease,
        ttl: Duration,
    ) -> Result<bool, tower_client_auth::BoxError> {
        self.0.renew(lease, ttl).await
    }
    async fn release(
        &self,
        lease: &tower_client_auth::store::Lease,
    ) -> Result<(), tower_client_auth::BoxError> {
        self.0.release(lease).await
    }
    async fn remove(&self, rejected: &Credential) -> Result<(), tower_client_auth::BoxError> {
        self.0.remove(rejected).await
    }
    async fn held_until(
        &self,
    ) -> Result<Option<std::time::SystemTime>, tower_client_auth::BoxError> {
        Err("GET failed".into())
    }
}

/// World: a store whose hold cannot be read, no hold in force; then one that holds the
/// fleet. Proves: the process logs in (a store that does not answer holds nothing); the
/// failed read is counted under a `call` README names (review 108: `held_until` was
/// not named); a refresh the hold ended is counted as `held`, not `error`.
#[tokio::test]
async fn the_fleet_hold_is_counted_under_documented_names() {
    let _serial = SERIAL.lock().await;
    snapshotter();
    let cache = CredentialCache::builder(TestSource::new())
        .name("m-hold")
        .store(HoldUnreadable::default())
        .build()
        .unwrap();
    cache.credential().await.expect("logged in");
    let held = MemoryStore::new();
    held.hold(std::time::SystemTime::now() + Duration::from_secs(30))
        .await
        .unwrap();
    let cache = CredentialCache::builder(TestSource::new())
        .name("m-held")
        .store(held)
        .build()
        .unwrap();
    cache.credential().await.expect_err("held");
    let all = series();
    let labelled = |name: &str, cache: &str, label: &str| -> Vec<String> {
        all.iter()
            .filter(|(n, labels, _)| {
                n == name && labels.iter().any(|(k, v)| k == "cache" && v == cache)
            })
            .flat_map(|(_, labels, _)| {
                labels
                    .iter()
                    .filter(|(k, _)| k == label)
                    .map(|(_, v)| v.clone())
            })
            .collect()
    };
    let calls = labelled("tower_client_auth_store_errors_total", "m-hold", "call");
    assert_eq!(calls, ["held_until"], "{all:?}");
    let outcomes = labelled("tower_client_auth_refreshes_total", "m-held", "outcome");
    assert_eq!(outcomes, ["held"], "{all:?}");
}
