//! Contention: two OS threads (this machine has two cores) hammer one shared service,
//! each with its own clone, as a multi-threaded runtime would. Criterion reports the time
//! for each thread to do one request while the other does the same; throughput ratios
//! are in BENCHMARKS.md (`python3 benches/report.py`).

mod common;

use std::{
    hint::black_box,
    sync::Barrier,
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{
    Client, Noop, TOKEN, call, expiring_source, mutex_cache, paired, request, rwlock_cache, warm,
    warm_over, watch_receiver,
};
use criterion::{Criterion, criterion_group, criterion_main};
use http::Request;
use http_body_util::Full;
use tower::{Layer, Service};
use tower_client_auth::{AuthLayer, StaticCredential};

const THREADS: usize = 2;

/// Each of `THREADS` threads runs `iters` requests on its own clone of `svc`, all
/// starting together; the slowest thread's time is the measurement.
fn hammer<S>(svc: &S, iters: u64) -> Duration
where
    S: Service<Request<Full<Bytes>>> + Clone + Send,
    S::Error: std::fmt::Debug,
    S::Response: Send,
{
    let barrier = Barrier::new(THREADS);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let (mut svc, barrier) = (svc.clone(), &barrier);
                scope.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..iters {
                        black_box(call(&mut svc, request(b"")));
                    }
                    start.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .max()
            .unwrap()
    })
}

fn contention(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("contention");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    g.bench_function("floor", |b| b.iter_custom(|n| hammer(&Noop, n)));
    let add = tower_http::auth::AddAuthorizationLayer::bearer(TOKEN)
        .as_sensitive(true)
        .layer(Noop);
    g.bench_function("add_authorization", |b| b.iter_custom(|n| hammer(&add, n)));

    let fixed = warm(
        &rt,
        AuthLayer::new(StaticCredential::bearer(TOKEN).unwrap()).any_https_origin(),
    );
    g.bench_function("auth_layer_static", |b| {
        b.iter_custom(|n| hammer(&fixed, n))
    });

    let expiring = warm(&rt, AuthLayer::new(expiring_source()).any_https_origin());
    g.bench_function("auth_layer_expiring", |b| {
        b.iter_custom(|n| hammer(&expiring, n))
    });

    let no_replay = warm(
        &rt,
        AuthLayer::new(expiring_source())
            .any_https_origin()
            .without_replay(),
    );
    g.bench_function("auth_layer_no_replay", |b| {
        b.iter_custom(|n| hammer(&no_replay, n))
    });

    g.bench_function("rwlock_cache", |b| {
        b.iter_custom(|n| hammer(&rwlock_cache(Noop), n))
    });
    g.bench_function("mutex_cache", |b| {
        b.iter_custom(|n| hammer(&mutex_cache(Noop), n))
    });
    let watch = watch_receiver(Noop);
    g.bench_function("watch_receiver", |b| b.iter_custom(|n| hammer(&watch, n)));
    g.finish();

    // The goals as interleaved pairs (`common::paired`): each round runs 5,000 requests
    // per thread through a baseline, then through the layer (or the other way round).
    let (rwlock, mutex) = (rwlock_cache(Noop), mutex_cache(Noop));
    let baselines: [(&str, Round<'_>); 4] = [
        ("AddAuthorization", round(&add)),
        ("RwLock", round(&rwlock)),
        ("Mutex", round(&mutex)),
        ("watch", round(&watch)),
    ];
    // AddAuthorization is a row too: against itself it shows the method's own spread, and
    // against the other baselines what adding a header at all leaves to gain.
    let layers: [(&str, Round<'_>); 4] = [
        ("AddAuthorization", round(&add)),
        ("auth_layer_static", round(&fixed)),
        ("auth_layer_expiring", round(&expiring)),
        ("auth_layer_no_replay", round(&no_replay)),
    ];
    println!(
        "\ncontention: throughput x baseline, 160 interleaved pairs of 5,000 requests per thread (median, quartiles)"
    );
    println!(
        "| variant | x AddAuthorization | x RwLock | x Mutex | x watch |\n|---|---|---|---|---|"
    );
    for (name, layer) in layers {
        let cells: Vec<String> = baselines
            .iter()
            .map(|(_, baseline)| {
                // paired() gives time(layer) / time(baseline); throughput is its inverse.
                let [p25, median, p75] = paired(160, baseline, &layer);
                format!("{:.2} ({:.2}-{:.2})", 1.0 / median, 1.0 / p75, 1.0 / p25)
            })
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }

    // The same over an inner service whose clone writes a count shared by both threads,
    // as a real client's does: what cloning the inner service per request costs.
    let client_add = tower_http::auth::AddAuthorizationLayer::bearer(TOKEN)
        .as_sensitive(true)
        .layer(Client::default());
    let client_layers: [(&str, Round<'_>); 3] = [
        (
            "auth_layer_static",
            round_owned(warm_over(
                &rt,
                AuthLayer::new(StaticCredential::bearer(TOKEN).unwrap()).any_https_origin(),
                Client::default(),
            )),
        ),
        (
            "auth_layer_expiring",
            round_owned(warm_over(
                &rt,
                AuthLayer::new(expiring_source()).any_https_origin(),
                Client::default(),
            )),
        ),
        (
            "auth_layer_no_replay",
            round_owned(warm_over(
                &rt,
                AuthLayer::new(expiring_source())
                    .any_https_origin()
                    .without_replay(),
                Client::default(),
            )),
        ),
    ];
    println!(
        "\ncontention over a client handle: throughput x AddAuthorization over the same, 160 interleaved pairs (median, quartiles)"
    );
    println!("| variant | x AddAuthorization |\n|---|---|");
    let baseline = round(&client_add);
    for (name, layer) in client_layers {
        let [p25, median, p75] = paired(160, &baseline, &layer);
        println!(
            "| {name} | {:.2} ({:.2}-{:.2}) |",
            1.0 / median,
            1.0 / p75,
            1.0 / p25
        );
    }
}

/// [`round`] for a service it owns.
fn round_owned<'a, S>(svc: S) -> Round<'a>
where
    S: Service<Request<Full<Bytes>>> + Clone + Send + Sync + 'a,
    S::Error: std::fmt::Debug,
    S::Response: Send,
{
    Box::new(move || {
        hammer(&svc, ROUND);
    })
}

/// Requests per thread in one round of the interleaved pairs.
const ROUND: u64 = 5_000;

/// One round of the interleaved pairs through one service.
type Round<'a> = Box<dyn Fn() + 'a>;

fn round<S>(svc: &S) -> Round<'_>
where
    S: Service<Request<Full<Bytes>>> + Clone + Send + Sync,
    S::Error: std::fmt::Debug,
    S::Response: Send,
{
    Box::new(move || {
        hammer(svc, ROUND);
    })
}

criterion_group!(benches, contention);
criterion_main!(benches);
