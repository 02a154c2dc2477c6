//! A hyper-util client stack: timeout and concurrency limit around `AuthLayer`, over
//! hyper-util's pooled client. `cargo run --example hyper_client`
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower::{ServiceBuilder, ServiceExt};
use tower_client_auth::{
    AuthLayer, BoxError, ReplayBody,
    token::{TokenRequest, TokenSource},
};

// --- the code to copy: `base` is your API's base URL, e.g. "https://api.example.com" ---
async fn call_the_api(base: &str) -> Result<(), BoxError> {
    let source = TokenSource::new(TokenRequest::oauth2_client_credentials(
        &format!("{base}/oauth/v2/token"),
        "app",
        "app-secret",
    )?)
    .allow_http_loopback(true); // the fake API is plain http on loopback; drop in production
    let hyper = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>();

    // Outer layers see the whole exchange (including a refresh and a replay) as one call.
    let client = ServiceBuilder::new()
        .timeout(Duration::from_secs(30))
        .concurrency_limit(64)
        .layer(
            AuthLayer::new(source)
                .origin(base)? // the credential goes there only
                .allow_http_loopback(true), // loopback demo only
        )
        .service(hyper);

    let req = Request::get(format!("{base}/v1/shipments")).body(Full::default())?;
    let res = client.oneshot(req).await?;
    println!(
        "{} {}",
        res.status(),
        String::from_utf8_lossy(&res.into_body().collect().await?.to_bytes())
    );
    Ok(())
}
// ---------------------------------------------------------------------------------------

mod support;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let api = support::apis::ClientCredentialsApi::new("app", "app-secret", 3600);
    call_the_api(&support::start(api.clone()).await).await?;
    println!("token requests: {}", api.tokens_issued.get());
    Ok(())
}
