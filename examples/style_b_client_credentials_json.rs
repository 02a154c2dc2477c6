//! Style B: OAuth2 client credentials with a JSON body and an audience; an expired token
//! answers 401 `Token expired.`. `cargo run --example style_b_client_credentials_json`
//! (starts its own fake API on loopback).
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, BoxError, ReplayBody,
    token::{BodyEncoding, ClientAuth, TokenRequest, TokenSource},
};

// --- the code to copy: `api` is your API's base URL, e.g. "https://api.example.com" ----
async fn call_the_api(api: &str, mid_run: impl FnOnce()) -> Result<(), BoxError> {
    let request = TokenRequest::oauth2_client_credentials(
        &format!("{api}/oauth/token"),
        "client-id",
        "client-secret",
    )?
    .client_auth(ClientAuth::Body)
    .encoding(BodyEncoding::Json)
    .field("audience", "https://api.example");
    let source = TokenSource::new(request).allow_http_loopback(true); // loopback fake only
    let client = AuthLayer::new(source)
        .origin(api)? // the credential goes to this origin only
        .allow_http_loopback(true) // loopback fake only: production is https-only
        .layer(Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>());

    let mut mid_run = Some(mid_run);
    for i in 0..6 {
        if i == 3 {
            mid_run.take().unwrap()(); // the API now answers 401 "Token expired."
        }
        let req = Request::post(format!("{api}/api/vessels"))
            .body(Full::new(Bytes::from("{\"imo\":9321483}")))?;
        let res = client.clone().oneshot(req).await?; // the body is replayed on a 401
        println!("request {i}: {}", res.status());
    }
    Ok(())
}
// ---------------------------------------------------------------------------------------

mod support;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let api =
        support::apis::AudienceApi::new("client-id", "client-secret", "https://api.example", 86400);
    let base = support::start(api.clone()).await;
    call_the_api(&base, || api.expire_all()).await?;
    println!(
        "token requests: {}, 401 Token expired. answered: {} (that request was replayed with the new token)",
        api.tokens_issued.get(),
        api.rejected.get(),
    );
    Ok(())
}
