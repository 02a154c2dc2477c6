//! Instruction counts per request, for callgrind: `bash benches/instructions.sh`.
//!
//! Wall-clock times on a shared two-core machine move by ±10 % between runs; callgrind
//! counts instructions, which repeat exactly for the same binary and inputs. Run alone,
//! this binary sends `N` requests through one variant (`instructions VARIANT N`); the
//! script runs it under callgrind for every variant and for 0 and N requests, so start-up
//! cancels out.

mod common;

use std::{hint::black_box, time::Duration};

use common::{JSON, Noop, TOKEN, call, mutex_cache, request, rwlock_cache, watch_receiver};
use tower::Layer;
use tower_client_auth::{AuthLayer, BoxError, Credential, StaticCredential, source_fn};

/// The request body: empty, or the small JSON document of `benches/overhead.rs` when the
/// `BODY` environment variable is `json`.
fn body() -> &'static [u8] {
    match std::env::var("BODY").as_deref() {
        Ok("json") => JSON,
        _ => b"",
    }
}

fn run<S>(mut svc: S, n: u64)
where
    S: tower::Service<http::Request<http_body_util::Full<bytes::Bytes>>>,
    S::Error: std::fmt::Debug,
{
    let body = body();
    for _ in 0..n {
        black_box(call(&mut svc, request(body)));
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
    let warm =
        |layer: &AuthLayer<_>| rt.block_on(async { layer.cache().credential().await.unwrap() });
    match variant.as_str() {
        "floor" => run(Noop, n),
        "add_authorization" => run(
            tower_http::auth::AddAuthorizationLayer::bearer(TOKEN)
                .as_sensitive(true)
                .layer(Noop),
            n,
        ),
        "auth_layer_static" => {
            let layer = AuthLayer::new(StaticCredential::bearer(TOKEN));
            warm(&layer);
            run(layer.layer(Noop), n)
        }
        "auth_layer_no_replay" => {
            let layer = AuthLayer::new(StaticCredential::bearer(TOKEN)).replay_rejected(false);
            warm(&layer);
            run(layer.layer(Noop), n)
        }
        "auth_layer_expiring" => {
            let source = source_fn(|_| async {
                Ok::<_, BoxError>(Credential::bearer(TOKEN)?.expires_in(Duration::from_secs(3600)))
            });
            let layer = AuthLayer::new(source);
            rt.block_on(async { layer.cache().credential().await.unwrap() });
            run(layer.layer(Noop), n)
        }
        "rwlock_cache" => run(rwlock_cache(Noop), n),
        "mutex_cache" => run(mutex_cache(Noop), n),
        "watch_receiver" => run(watch_receiver(Noop), n),
        other => eprintln!("unknown variant {other}"),
    }
}
