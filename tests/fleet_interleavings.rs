//! Random interleavings across a fleet: three caches, each with its own connection to one
//! real Redis (as three processes have), in front of a token server as strict as real
//! ones (`support::strict_idp`: JWTs whose `exp` is floored to the second, refresh tokens
//! that rotate on every use and revoke their whole family when one is presented twice),
//! while tokens expire on their own, the server revokes every access token at random
//! moments (each cache's requests get 401s), the application invalidates and rejects
//! credentials at random in any of the three, and one cache's connection at times
//! refuses to save a pair (as a Redis out of memory refuses writes, while it still
//! answers reads and the lease), so that its rotated refresh token is kept under its
//! lease, and taken over by its own next refresh.
//!
//! Each run checks the fleet's promises with counters that would see them broken: no
//! refresh token is ever presented twice (so no family is revoked); the fleet logs in
//! once, and every later token comes from a refresh (a refresh token lost anywhere would
//! cost a login); no request fails with an error, and no request is answered 401 but one
//! whose replay met a second revocation; afterwards every cache serves a request.
#![cfg(all(feature = "redis", feature = "https"))]

use crate::support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::FutureExt;
use http::Request;
use http_body_util::Full;
use support::{
    Dice, api_client, providers, redis::RedisServer, store::FaultStore, strict_idp::StrictIdp,
};
use tower::{Layer, ServiceExt};
use tower_client_auth::{AuthLayer, BoxError, CredentialCache, store::redis::RedisStore};

const CLIENT_ID: &str = "fleet-client";
const CLIENT_SECRET: &str = "fleet-5ecr3t";

type Stack = tower::util::BoxCloneService<Request<Full<Bytes>>, u16, BoxError>;

/// One run: three caches, four tasks each sending requests for about two seconds, the
/// server and the application meddling at random; then the checks.
async fn run(seed: u64, redis: &RedisServer) {
    let what = format!("seed {seed}");
    let dice = Dice::new(seed);
    // Tokens live 2 s as stated (1-2 s by their floored `exp`): several refreshes a run.
    let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 2.0);
    let base = providers::start(idp.clone()).await;
    let namespace = format!("fleet-interleavings-{seed}");
    let mut caches = Vec::new();
    let mut stores = Vec::new();
    let mut stacks: Vec<Stack> = Vec::new();
    for _ in 0..3 {
        let store = FaultStore::over(RedisStore::connect(&redis.url(), &namespace).await.unwrap());
        stores.push(store.clone());
        let cache = CredentialCache::builder(support::strict_idp::rotating_source(
            &base,
            CLIENT_ID,
            CLIENT_SECRET,
        ))
        .store(store)
        .backoff(Duration::from_millis(5), Duration::from_millis(50))
        .build()
        .unwrap();
        let svc = AuthLayer::with_cache(cache.clone())
            .any_https_origin()
            .allow_http_loopback(true)
            .layer(api_client())
            .map_response(|res: http::Response<hyper::body::Incoming>| res.status().as_u16());
        stacks.push(tower::util::BoxCloneService::new(svc));
        caches.push(cache);
    }
    let url = format!("{base}/v1/things");
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let unauthorized = Arc::new(AtomicUsize::new(0));
    let revocations = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let meddling = tokio::spawn({
        let (dice, done, idp, caches) = (dice.clone(), done.clone(), idp.clone(), caches.clone());
        let (revocations, stores) = (revocations.clone(), stores.clone());
        async move {
            while !done.load(SeqCst) {
                dice.pause(60).await;
                let i = dice.roll(3) as usize;
                let cache = &caches[i];
                match dice.roll(7) {
                    0 => {
                        // The server revokes every access token: every cache's next
                        // request is rejected and refreshes.
                        revocations.fetch_add(1, SeqCst);
                        idp.expire_access_tokens();
                    }
                    1 | 2 => {
                        if let Ok(current) = cache.credential().await {
                            cache.handle().invalidate_if(&current);
                        }
                    }
                    3 => {
                        if let Ok(current) = cache.credential().await {
                            let _ = cache.reject(&current).await;
                        }
                    }
                    4 => {
                        // This cache's connection refuses pairs for a while, and its
                        // credential is dropped twice meanwhile: the first refresh's pair
                        // is kept under the lease, the second takes it over.
                        let refusing = &stores[i].faults().refusing_pairs;
                        refusing.store(true, SeqCst);
                        for _ in 0..2 {
                            dice.pause(300).await;
                            if let Ok(current) = cache.credential().await {
                                cache.handle().invalidate_if(&current);
                            }
                        }
                        dice.pause(300).await;
                        refusing.store(false, SeqCst);
                    }
                    _ => {}
                }
            }
            for store in &stores {
                store.faults().refusing_pairs.store(false, SeqCst);
            }
        }
    });
    let mut tasks = Vec::new();
    for (i, stack) in stacks.iter().enumerate() {
        for task in 0..4 {
            let (stack, dice, url) = (stack.clone(), dice.clone(), url.clone());
            let (errors, unauthorized, what) = (errors.clone(), unauthorized.clone(), what.clone());
            tasks.push(tokio::spawn(async move {
                let started = std::time::Instant::now();
                while started.elapsed() < Duration::from_secs(2) {
                    let req = Request::get(&url).body(Full::default()).unwrap();
                    let answer =
                        tokio::time::timeout(Duration::from_secs(10), stack.clone().oneshot(req))
                            .await
                            .unwrap_or_else(|_| {
                                panic!("{what}: cache {i} task {task}: a request hung")
                            });
                    match answer {
                        Ok(200) => {}
                        Ok(401) => {
                            unauthorized.fetch_add(1, SeqCst);
                        }
                        Ok(status) => errors
                            .lock()
                            .unwrap()
                            .push(format!("cache {i}: status {status}")),
                        Err(err) => errors.lock().unwrap().push(format!("cache {i}: {err}")),
                    }
                    dice.pause(15).await;
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    done.store(true, SeqCst);
    meddling.await.unwrap();
    assert_eq!(
        idp.reused_refresh_tokens.load(SeqCst),
        0,
        "{what}: a refresh token was presented twice: {:?}",
        idp.presented.lock().unwrap()
    );
    assert_eq!(idp.family_revocations.load(SeqCst), 0, "{what}");
    assert_eq!(
        idp.logins.load(SeqCst),
        1,
        "{what}: the fleet logged in again (a refresh token was lost); refreshes: {}",
        idp.refresh_grants.load(SeqCst)
    );
    assert!(
        errors.lock().unwrap().is_empty(),
        "{what}: requests failed: {:?}",
        errors.lock().unwrap()
    );
    // A 401 comes back only for a replay that met a second revocation: at most one per
    // request in flight at each revocation (twelve tasks).
    let revoked = revocations.load(SeqCst);
    assert!(
        unauthorized.load(SeqCst) <= 12 * revoked,
        "{what}: {} requests answered 401 for {revoked} revocations",
        unauthorized.load(SeqCst)
    );
    eprintln!(
        "{what}: logins {} refreshes {} revocations {revoked} 401s {} api {}",
        idp.logins.load(SeqCst),
        idp.refresh_grants.load(SeqCst),
        unauthorized.load(SeqCst),
        idp.api_calls.load(SeqCst)
    );
    // Not wedged: each cache serves a request within a few tries, each after the
    // backoff's longest step. A try may come back 401: after a last revocation, a
    // rejection's refresh can find in the store a token another cache saved before that
    // revocation (revoked too, which no cache can know before an API says so), and a
    // token rejected young and never accepted refetches only as the backoff allows.
    for (i, stack) in stacks.into_iter().enumerate() {
        let mut answers = Vec::new();
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(60)).await;
            let req = Request::get(&url).body(Full::default()).unwrap();
            let answer = tokio::time::timeout(Duration::from_secs(10), stack.clone().oneshot(req))
                .await
                .map(|answer| answer.map_err(|e| e.to_string()));
            let ok = matches!(answer, Ok(Ok(200)));
            answers.push(answer);
            if ok {
                break;
            }
        }
        assert!(
            matches!(answers.last(), Some(Ok(Ok(200)))),
            "{what}: cache {i}'s last requests: {answers:?}"
        );
    }
}

/// World: six seeds (or the range `FLEET_INTERLEAVING_SEEDS` names, to look further),
/// each a fresh token server and a fresh namespace on one Redis started for the test,
/// on a two-thread runtime. Proves: the promises above hold in every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_under_random_interleavings_keeps_one_refresh_token_line() {
    let redis = RedisServer::start();
    // `FLEET_TRACE=file`: a failing run's debug trace is written there.
    let trace = std::env::var_os("FLEET_TRACE").map(|file| {
        let capture = support::Capture::default();
        let writer = capture.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_thread_ids(true)
            .try_init()
            .unwrap_or_else(|_| {
                // One binary with other modules: one of them set the global subscriber.
                eprintln!("FLEET_TRACE: run this test alone (`-- fleet_interleavings::`)");
            });
        (file, capture)
    });
    for seed in Dice::seeds("FLEET_INTERLEAVING_SEEDS", 0..6) {
        if let Some((_, capture)) = &trace {
            capture.0.lock().unwrap().clear();
        }
        let outcome = std::panic::AssertUnwindSafe(run(seed, &redis))
            .catch_unwind()
            .await;
        if let Err(panic) = outcome {
            if let Some((file, capture)) = &trace {
                std::fs::write(file, capture.text()).unwrap();
            }
            std::panic::resume_unwind(panic);
        }
    }
}
