//! Hot path: one request through each variant into a no-op service, credential cached,
//! the request built inside the measured loop (as a user pays it). Ratios against
//! `AddAuthorization` and the floor are in BENCHMARKS.md (`python3 benches/report.py`).
//!
//! After criterion, the same variants are timed in interleaved pairs against
//! AddAuthorization (`common::paired`), which keeps the machine's drifting load out of
//! the ratios.

mod common;

use std::{hint::black_box, time::Duration};

use common::{
    JSON, Noop, TOKEN, add_authorization_retry, call, expiring_source, mutex_cache,
    never_expiring_source, paired, request, rwlock_cache, warm, watch_receiver,
};
use criterion::{Criterion, criterion_group, criterion_main};
use tower::Layer;
use tower_client_auth::{AuthLayer, StaticCredential};

/// One variant: sends one request with the given body through its own service.
type Variant = (&'static str, Box<dyn FnMut(&'static [u8])>);

/// Every variant, built once.
fn variants(rt: &tokio::runtime::Runtime) -> Vec<Variant> {
    fn variant<S>(name: &'static str, mut svc: S) -> Variant
    where
        S: tower::Service<http::Request<http_body_util::Full<bytes::Bytes>>> + 'static,
        S::Error: std::fmt::Debug,
    {
        (
            name,
            Box::new(move |body| drop(black_box(call(&mut svc, request(body))))),
        )
    }
    vec![
        variant("floor", Noop),
        variant(
            "add_authorization",
            tower_http::auth::AddAuthorizationLayer::bearer(TOKEN)
                .as_sensitive(true)
                .layer(Noop),
        ),
        variant("add_authorization_retry", add_authorization_retry(Noop)),
        variant(
            "auth_layer_static",
            warm(
                rt,
                AuthLayer::new(StaticCredential::bearer(TOKEN).unwrap()).any_https_origin(),
            ),
        ),
        // The same static credential without replay (`Direct`), given one origin.
        variant(
            "auth_layer_static_direct",
            warm(
                rt,
                AuthLayer::new(StaticCredential::bearer(TOKEN).unwrap())
                    .origin("https://api.example.com")
                    .unwrap()
                    .without_replay(),
            ),
        ),
        variant(
            "auth_layer_expiring",
            warm(rt, AuthLayer::new(expiring_source()).any_https_origin()),
        ),
        variant(
            "auth_layer_no_replay",
            warm(
                rt,
                AuthLayer::new(expiring_source())
                    .any_https_origin()
                    .without_replay(),
            ),
        ),
        // The same path without an expiry: no wall-clock read per request. Against
        // `auth_layer_no_replay`, the cost of that read.
        variant(
            "auth_layer_no_replay_no_expiry",
            warm(
                rt,
                AuthLayer::new(never_expiring_source())
                    .any_https_origin()
                    .without_replay(),
            ),
        ),
        // A DPoP-bound credential (feature `jwt`): the same path, plus one proof per
        // request (claims and an ES256 signature). Against `auth_layer_expiring`, what a
        // proof costs.
        #[cfg(feature = "jwt")]
        variant(
            "auth_layer_dpop",
            warm(rt, AuthLayer::new(dpop_source()).any_https_origin()),
        ),
        variant("rwlock_cache", rwlock_cache(Noop)),
        variant("mutex_cache", mutex_cache(Noop)),
        variant("watch_receiver", watch_receiver(Noop)),
    ]
}

/// A source of DPoP-bound credentials, each bound to one key made at start.
#[cfg(feature = "jwt")]
fn dpop_source() -> tower_client_auth::SourceFn {
    let key = tower_client_auth::token::DpopKey::generate().unwrap();
    tower_client_auth::source_fn(move |_| {
        let credential = key.credential(TOKEN);
        async move {
            Ok::<_, tower_client_auth::BoxError>(credential?.expires_in(Duration::from_secs(3600)))
        }
    })
    .binds_credentials(true)
}

/// Runs one group: every variant on the same request shape.
fn group(c: &mut Criterion, name: &str, body: &'static [u8], variants: &mut [Variant]) {
    let mut g = c.benchmark_group(name);
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (variant, send) in variants.iter_mut() {
        g.bench_function(*variant, |b| b.iter(|| send(body)));
    }
    g.finish();
}

/// Each variant against AddAuthorization, in 400 interleaved pairs of 1,000 requests.
fn pairs(name: &str, body: &'static [u8], variants: &mut [Variant]) {
    println!("\n{name}: time x AddAuthorization, 400 interleaved pairs of 1,000 requests");
    println!("| variant | median | quartiles |\n|---|---|---|");
    let (baseline, rest) = variants.split_at_mut(2);
    let add = &mut baseline[1].1;
    for (variant, send) in rest {
        let [p25, median, p75] = paired(
            400,
            || (0..1000).for_each(|_| add(body)),
            || (0..1000).for_each(|_| send(body)),
        );
        println!("| {variant} | {median:.3} | {p25:.3}-{p75:.3} |");
    }
}

fn overhead(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut variants = variants(&rt);
    group(c, "overhead_empty", b"", &mut variants);
    group(c, "overhead_full", JSON, &mut variants);
    pairs("overhead_empty", b"", &mut variants);
    pairs("overhead_full", JSON, &mut variants);
}

/// What a DPoP proof's signature alone costs (ES256 over a proof-sized input, with
/// `ring`, as the crate signs): against `auth_layer_dpop` minus `auth_layer_expiring`,
/// what the rest of a proof (claims, `jti`, nonce lookup, encoding) costs.
#[cfg(feature = "jwt")]
fn signature_alone(c: &mut Criterion) {
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let key =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    // A DPoP proof's signing input is ~400 bytes (header with the JWK, then the claims).
    let input = [b'x'; 400];
    c.bench_function("overhead_empty/es256_signature_alone", |b| {
        b.iter(|| black_box(key.sign(&rng, black_box(&input)).unwrap()))
    });
}

#[cfg(not(feature = "jwt"))]
fn signature_alone(_: &mut Criterion) {}

criterion_group!(benches, overhead, signature_alone);
criterion_main!(benches);
