//! Style D: OAuth2 client credentials with HTTP Basic + form body and a scope; a 403 is
//! a permission problem and never triggers a refresh.
//! `cargo run --example style_d_client_credentials_basic` (starts its own fake API on loopback).
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, BoxError, ReplayBody,
    token::{TokenRequest, TokenSource},
};

// --- the code to copy: `api` is your API's base URL, e.g. "https://api.example.com" ----
async fn call_the_api(api: &str) -> Result<(), BoxError> {
    let request = TokenRequest::oauth2_client_credentials(
        &format!("{api}/oauth/v2/token"),
        "logistics-app",
        "s3cret",
    )?
    .scope("shipments:read");
    let source = TokenSource::new(request).allow_http_loopback(true); // loopback fake only
    let client = AuthLayer::new(source)
        .origin(api)? // the credential goes to this origin only
        .allow_http_loopback(true) // loopback fake only: production is https-only
        .layer(Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>());

    for path in ["/v1/shipments", "/v1/admin/users", "/v1/shipments"] {
        let req = Request::get(format!("{api}{path}")).body(Full::default())?;
        let res = client.clone().oneshot(req).await?;
        println!("GET {path}: {}", res.status());
    }
    Ok(())
}
// ---------------------------------------------------------------------------------------

mod support;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let api = support::apis::ClientCredentialsApi::new("logistics-app", "s3cret", 3600);
    call_the_api(&support::start(api.clone()).await).await?;
    println!(
        "token requests: {} (the 403 caused no refresh and no replay), 401s: {}",
        api.tokens_issued.get(),
        api.rejected.get(),
    );
    Ok(())
}
