//! Style A: a session login with key + secret; the JWT's `exp` is the only lifetime.
//! `cargo run --example style_a_session_login` (starts its own fake API on loopback).
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower::{Layer, ServiceExt};
use tower_client_auth::{AuthLayer, BoxError, ReplayBody, token::TokenSource};

// --- the code to copy: `api` is your API's base URL, e.g. "https://api.example.com" ----
async fn call_the_api(api: &str) -> Result<(), BoxError> {
    let source = TokenSource::session_login(&format!("{api}/v1/sessions"), "my-key", "my-secret")?
        .allow_http_loopback(true); // the fake API is plain http on loopback; drop in production
    let client = AuthLayer::new(source)
        .origin(api)? // the credential goes to this origin only
        .allow_http_loopback(true) // as above: production is https-only
        .layer(Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>());

    for i in 0..8 {
        let req = Request::get(format!("{api}/v1/consents")).body(Full::default())?;
        let res = client.clone().oneshot(req).await?;
        println!("request {i}: {}", res.status());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}
// ---------------------------------------------------------------------------------------

mod support;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // Tokens live 2 s here (the real provider: 1 h), `exp` floored to the second.
    let api = support::apis::SessionApi::new("my-key", "my-secret", 2);
    call_the_api(&support::start(api.clone()).await).await?;
    println!(
        "logins: {}, 401s: {} (each token renewed before its exp, with no request refused)",
        api.logins.get(),
        api.rejected.get(),
    );
    Ok(())
}
