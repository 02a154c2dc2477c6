//! Hot path: one request through each variant into a no-op service, credential cached,
//! the request built inside the measured loop (as a user pays it). Ratios against
//! `AddAuthorization` and the floor are in BENCHMARKS.md (`python3 benches/report.py`).

mod common;

use std::time::Duration;

use common::{JSON, Noop, TOKEN, call, mutex_cache, request, rwlock_cache, watch_receiver};
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use tower::Layer;
use tower_client_auth::{AuthLayer, BoxError, Credential, StaticCredential, source_fn};

/// Runs one group: every variant on the same request shape.
fn group(c: &mut Criterion, name: &str, body: &'static [u8], rt: &tokio::runtime::Runtime) {
    let mut g = c.benchmark_group(name);
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    let mut floor = Noop;
    g.bench_function("floor", |b| {
        b.iter(|| black_box(call(&mut floor, request(body))))
    });

    let mut add = tower_http::auth::AddAuthorizationLayer::bearer(TOKEN)
        .as_sensitive(true)
        .layer(Noop);
    g.bench_function("add_authorization", |b| {
        b.iter(|| black_box(call(&mut add, request(body))))
    });

    // Both layers are warmed up inside the runtime (the first fetch is spawned); the
    // measured calls are the cached hot path and need no runtime.
    let mut fixed = AuthLayer::new(StaticCredential::bearer(TOKEN)).layer(Noop);
    rt.block_on(async { fixed.cache().credential().await.unwrap() });
    g.bench_function("auth_layer_static", |b| {
        b.iter(|| black_box(call(&mut fixed, request(body))))
    });

    let source = source_fn(|_| async {
        Ok::<_, BoxError>(Credential::bearer(TOKEN)?.expires_in(Duration::from_secs(3600)))
    });
    let mut expiring = AuthLayer::new(source).layer(Noop);
    rt.block_on(async { expiring.cache().credential().await.unwrap() });
    g.bench_function("auth_layer_expiring", |b| {
        b.iter(|| black_box(call(&mut expiring, request(body))))
    });

    let mut no_replay = AuthLayer::new(StaticCredential::bearer(TOKEN))
        .replay_rejected(false)
        .layer(Noop);
    rt.block_on(async { no_replay.cache().credential().await.unwrap() });
    g.bench_function("auth_layer_no_replay", |b| {
        b.iter(|| black_box(call(&mut no_replay, request(body))))
    });

    let mut rwlock = rwlock_cache(Noop);
    g.bench_function("rwlock_cache", |b| {
        b.iter(|| black_box(call(&mut rwlock, request(body))))
    });
    let mut mutex = mutex_cache(Noop);
    g.bench_function("mutex_cache", |b| {
        b.iter(|| black_box(call(&mut mutex, request(body))))
    });
    let mut watch = watch_receiver(Noop);
    g.bench_function("watch_receiver", |b| {
        b.iter(|| black_box(call(&mut watch, request(body))))
    });
    g.finish();
}

fn overhead(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    group(c, "overhead_empty", b"", &rt);
    group(c, "overhead_full", JSON, &rt);
}

criterion_group!(benches, overhead);
criterion_main!(benches);
