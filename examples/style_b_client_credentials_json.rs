//! Style B: OAuth2 client credentials with a JSON body and an audience; an expired token
//! answers 401 `Token expired.`. `cargo run --example style_b_client_credentials_json`
use std::sync::atomic::Ordering::SeqCst;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, BoxError, ReplayBody,
    token::{BodyEncoding, ClientAuth, TokenClient, TokenRequest, TokenSource},
};

#[path = "../tests/support/providers.rs"]
mod providers;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let provider = providers::AudienceApi::new("client-id", "client-secret", "https://api.example");
    let base = providers::start(provider.clone()).await;

    // --- user code -------------------------------------------------------------------
    let request = TokenRequest::oauth2_client_credentials(
        &format!("{base}/oauth/token"),
        "client-id",
        "client-secret",
    )?
    .client_auth(ClientAuth::Body)
    .encoding(BodyEncoding::Json)
    .field("audience", "https://api.example");
    let source = TokenSource::new(request).client(TokenClient::https()?.allow_http_loopback(true));
    let client = AuthLayer::new(source)
        .origin(base.parse::<tower_client_auth::Origin>()?) // the credential goes there only
        .allow_http_loopback(true) // loopback demo only
        .layer(Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>());

    for i in 0..6 {
        if i == 3 {
            provider.expire_all(); // the API now answers 401 "Token expired."
        }
        let req = Request::post(format!("{base}/api/vessels"))
            .body(Full::new(Bytes::from("{\"imo\":9321483}")))?;
        let res = client.clone().oneshot(req).await?;
        println!("request {i}: {}", res.status());
    }
    // ---------------------------------------------------------------------------------
    println!(
        "token requests: {}, 401 Token expired. answered: {} (replayed with the new token)",
        provider.token_requests.load(SeqCst),
        provider.expired_answers.load(SeqCst),
    );
    Ok(())
}
