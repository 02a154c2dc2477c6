//! Instruction counts per request, for callgrind: `bash benches/instructions.sh`.
//!
//! Wall-clock times on a shared two-core machine move by ±10 % between runs; callgrind
//! counts instructions, which repeat exactly for the same binary and inputs. Run alone,
//! this binary sends `N` requests through one variant (`instructions VARIANT N`); the
//! script runs it under callgrind for every variant and for 0 and N requests, so start-up
//! cancels out.

mod common;

use std::hint::black_box;

use common::{
    Client, JSON, Lazy, Noop, TOKEN, call, expiring_source, mutex_cache, never_expiring_source,
    request, rwlock_cache, warm, warm_over, watch_receiver,
};
use tower::Layer;
use tower_client_auth::{AuthLayer, StaticCredential};

/// The request: by the `BODY` environment variable, `json` the POST with the small JSON
/// document of `benches/overhead.rs`, `get` a GET with no user headers (issue 26's own
/// measure), else the POST with an empty body.
fn make() -> fn() -> http::Request<http_body_util::Full<bytes::Bytes>> {
    match std::env::var("BODY").as_deref() {
        Ok("json") => || request(JSON),
        Ok("get") => || {
            http::Request::get("https://api.example.com/v1/orders")
                .body(Default::default())
                .unwrap()
        },
        _ => || request(b""),
    }
}

fn run<S>(mut svc: S, n: u64)
where
    S: tower::Service<http::Request<http_body_util::Full<bytes::Bytes>>>,
    S::Error: std::fmt::Debug,
{
    let make = make();
    for _ in 0..n {
        black_box(call(&mut svc, make()));
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(variant), Some(n)) = (args.next(), args.next().and_then(|n| n.parse().ok())) else {
        eprintln!("usage: instructions VARIANT N (see benches/instructions.sh)");
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    match variant.as_str() {
        "floor" => run(Noop, n),
        "add_authorization" => run(
            tower_http::auth::AddAuthorizationLayer::bearer(TOKEN)
                .as_sensitive(true)
                .layer(Noop),
            n,
        ),
        "auth_layer_static" => run(
            warm(
                &rt,
                AuthLayer::new(StaticCredential::bearer(TOKEN).unwrap()).any_https_origin(),
            ),
            n,
        ),
        // The setup README shows: the layer given the API's origin.
        "auth_layer_static_origin" => run(
            warm(
                &rt,
                AuthLayer::new(StaticCredential::bearer(TOKEN).unwrap())
                    .origin("https://api.example.com")
                    .unwrap(),
            ),
            n,
        ),
        // The same without replay: `Direct` mode, AddAuthorization's shape.
        "auth_layer_static_direct" => run(
            warm(
                &rt,
                AuthLayer::new(StaticCredential::bearer(TOKEN).unwrap())
                    .origin("https://api.example.com")
                    .unwrap()
                    .without_replay(),
            ),
            n,
        ),
        // The static credential without replay, any origin: the yardstick's shape.
        "auth_layer_static_direct_any" => run(
            warm(
                &rt,
                AuthLayer::new(StaticCredential::bearer(TOKEN).unwrap())
                    .any_https_origin()
                    .without_replay(),
            ),
            n,
        ),
        // Refreshable, replay off, no expiry: `auth_layer_no_replay` less the wall-clock
        // read.
        "auth_layer_no_replay_no_expiry" => run(
            warm(
                &rt,
                AuthLayer::new(never_expiring_source())
                    .any_https_origin()
                    .without_replay(),
            ),
            n,
        ),
        "auth_layer_no_replay" => run(
            warm(
                &rt,
                AuthLayer::new(expiring_source())
                    .any_https_origin()
                    .without_replay(),
            ),
            n,
        ),
        // The same with a shared store configured: the store is on the refresh path
        // only, so the hot path should not see it.
        "auth_layer_expiring_store" => run(
            warm(
                &rt,
                AuthLayer::builder(expiring_source())
                    .store(tower_client_auth::MemoryStore::new())
                    .any_https_origin()
                    .build()
                    .unwrap(),
            ),
            n,
        ),
        "auth_layer_expiring" => run(
            warm(&rt, AuthLayer::new(expiring_source()).any_https_origin()),
            n,
        ),
        // Over an inner service whose clone writes a shared count, as a real client's does.
        "client_floor" => run(Client::default(), n),
        "client_add_authorization" => run(
            tower_http::auth::AddAuthorizationLayer::bearer(TOKEN)
                .as_sensitive(true)
                .layer(Client::default()),
            n,
        ),
        "client_static" => run(
            warm_over(
                &rt,
                AuthLayer::new(StaticCredential::bearer(TOKEN).unwrap()).any_https_origin(),
                Client::default(),
            ),
            n,
        ),
        "client_expiring" => run(
            warm_over(
                &rt,
                AuthLayer::new(expiring_source()).any_https_origin(),
                Client::default(),
            ),
            n,
        ),
        "client_no_replay" => run(
            warm_over(
                &rt,
                AuthLayer::new(expiring_source())
                    .any_https_origin()
                    .without_replay(),
                Client::default(),
            ),
            n,
        ),
        // Over an inner service whose future is small, as real clients' are.
        "lazy_floor" => run(Lazy, n),
        "lazy_add_authorization" => run(
            tower_http::auth::AddAuthorizationLayer::bearer(TOKEN)
                .as_sensitive(true)
                .layer(Lazy),
            n,
        ),
        "lazy_static" => run(
            warm_over(
                &rt,
                AuthLayer::new(StaticCredential::bearer(TOKEN).unwrap()).any_https_origin(),
                Lazy,
            ),
            n,
        ),
        "lazy_expiring" => run(
            warm_over(
                &rt,
                AuthLayer::new(expiring_source()).any_https_origin(),
                Lazy,
            ),
            n,
        ),
        "lazy_no_replay" => run(
            warm_over(
                &rt,
                AuthLayer::new(expiring_source())
                    .any_https_origin()
                    .without_replay(),
                Lazy,
            ),
            n,
        ),
        // What a user would write instead of replay: tower's `Retry` outside
        // `AddAuthorization`, cloning every request so that a 401 can be sent again.
        "add_authorization_retry" => run(common::add_authorization_retry(Noop), n),
        // The leanest middleware that keeps the promises the hot path pays for.
        "promises_static" => run(common::promises_static(Noop), n),
        "promises_expiring" => run(common::promises_expiring(Noop), n),
        "rwlock_cache" => run(rwlock_cache(Noop), n),
        "mutex_cache" => run(mutex_cache(Noop), n),
        "watch_receiver" => run(watch_receiver(Noop), n),
        other => eprintln!("unknown variant {other}"),
    }
}
