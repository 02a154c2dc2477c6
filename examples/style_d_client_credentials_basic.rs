//! Style D: OAuth2 client credentials with HTTP Basic + form body and a scope; a 403 is
//! a permission problem and never triggers a refresh.
//! `cargo run --example style_d_client_credentials_basic`
use std::sync::atomic::Ordering::SeqCst;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, BoxError, ReplayBody,
    token::{TokenClient, TokenRequest, TokenSource},
};

#[path = "../tests/support/providers.rs"]
mod providers;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let provider = providers::ClientCredentialsApi::new("logistics-app", "s3cret");
    let base = providers::start(provider.clone()).await;

    // --- user code -------------------------------------------------------------------
    let request = TokenRequest::oauth2_client_credentials(
        &format!("{base}/oauth/v2/token"),
        "logistics-app",
        "s3cret",
    )?
    .scope("shipments:read");
    let source = TokenSource::new(request).client(TokenClient::https()?.allow_http_loopback(true));
    let client = AuthLayer::new(source)
        .origin(base.parse::<tower_client_auth::Origin>()?) // the credential goes there only
        .allow_http_loopback(true) // loopback demo only
        .layer(Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>());

    for path in ["/v1/shipments", "/v1/admin/users", "/v1/shipments"] {
        let req = Request::get(format!("{base}{path}")).body(Full::default())?;
        let res = client.clone().oneshot(req).await?;
        println!("GET {path}: {}", res.status());
    }
    // ---------------------------------------------------------------------------------
    println!(
        "token requests: {} (the 403 caused none), API requests: {} (and no replay)",
        provider.token_requests.load(SeqCst),
        provider.api_calls.load(SeqCst),
    );
    Ok(())
}
