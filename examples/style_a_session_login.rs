//! Style A: session login with key + secret; the JWT's `exp` is the only lifetime.
//! Starts its own loopback provider. `cargo run --example style_a_session_login`
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, BoxError,
    token::{TokenClient, TokenSource},
};

#[path = "../tests/support/providers.rs"]
mod providers;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // A provider whose tokens live 2 s (the real one: 1 h).
    let provider = providers::SessionApi::new("my-key", "my-secret", Duration::from_secs(2));
    let base = providers::start(provider.clone()).await;

    // --- user code -------------------------------------------------------------------
    let source = TokenSource::session_login(&format!("{base}/v1/sessions"), "my-key", "my-secret")?
        .client(TokenClient::https()?.allow_http_loopback(true)); // loopback demo only
    let client = AuthLayer::new(source)
        .origin(base.parse::<tower_client_auth::Origin>()?) // the credential goes there only
        .allow_http_loopback(true) // loopback demo only: production is https-only
        .layer(
            Client::builder(TokioExecutor::new())
                .build_http::<tower_client_auth::ReplayBody<Full<Bytes>>>(),
        );

    for i in 0..8 {
        let req = Request::get(format!("{base}/v1/consents")).body(Full::default())?;
        let res = client.clone().oneshot(req).await?;
        println!("request {i}: {}", res.status());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // ---------------------------------------------------------------------------------
    println!(
        "logins: {}, 401s: {} (tokens were renewed before their exp)",
        provider.logins.load(std::sync::atomic::Ordering::SeqCst),
        provider
            .unauthorized
            .load(std::sync::atomic::Ordering::SeqCst),
    );
    Ok(())
}
