//! Style C: API-key login, access + refresh token, rotation, refresh only after a 401;
//! 100 requests hit the expired session at once. `cargo run --example style_c_refresh_rotation`
use std::sync::atomic::Ordering::SeqCst;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, BoxError, ReplayBody,
    token::{TokenClient, TokenSource},
};

#[path = "../tests/support/providers.rs"]
mod providers;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let provider = providers::RotatingApi::new("6f1c2a9e-api-key");
    let base = providers::start(provider.clone()).await;

    // --- user code -------------------------------------------------------------------
    let source = TokenSource::api_key_login(
        &format!("{base}/v3/auth/login"),
        &format!("{base}/v3/auth/refresh"),
        "6f1c2a9e-api-key",
    )?
    .client(TokenClient::https()?.allow_http_loopback(true))
    .on_refresh(|pair| async move {
        // Persist the newest refresh token here (a file, a secret store...).
        println!(
            "new token pair held (refresh token present: {})",
            pair.refresh_token().is_some()
        );
    });
    let client = AuthLayer::new(source)
        .origin(base.parse::<tower_client_auth::Origin>()?) // the credential goes there only
        .allow_http_loopback(true) // loopback demo only
        .layer(Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>());

    let get = |client: &tower_client_auth::Auth<_, _>| {
        let req = Request::get(format!("{base}/v3/accounts"))
            .body(Full::default())
            .unwrap();
        client.clone().oneshot(req)
    };
    get(&client).await?;
    provider.expire_sessions(); // every access token now answers 401
    let burst: Vec<_> = (0..100).map(|_| tokio::spawn(get(&client))).collect();
    for call in burst {
        assert!(call.await??.status().is_success());
    }
    // ---------------------------------------------------------------------------------
    println!(
        "logins: {}, refreshes: {}, refresh tokens presented twice: {}, early refreshes: {}",
        provider.logins.load(SeqCst),
        provider.refreshes.load(SeqCst),
        provider.reused_refresh_tokens.load(SeqCst),
        provider.early_refreshes.load(SeqCst),
    );
    Ok(())
}
