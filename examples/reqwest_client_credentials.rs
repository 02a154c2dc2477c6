//! reqwest: OAuth2 client credentials through `reqwest-middleware`, token requests through
//! your own reqwest client too, a token revoked mid-run (one refresh, the request
//! replayed), and this crate's error read back out of a `reqwest_middleware::Error`.
//!
//! `cargo run --example reqwest_client_credentials --features reqwest` (starts its own
//! fake API and token endpoint on loopback).
use reqwest_middleware::ClientBuilder;
use tower_client_auth::{
    BoxError, ErrorKind,
    reqwest::{AuthMiddleware, auth_error, redirect_policy},
    token::{TokenClient, TokenRequest, TokenSource},
};

// --- the code to copy: `api` is your API's base URL, e.g. "https://api.example.com" ----
async fn call_the_api(api: &str, revoke_tokens: impl FnOnce()) -> Result<(), BoxError> {
    // Token requests go through reqwest too (one HTTP stack, one TLS provider), on a
    // client that follows no redirect at all: the client secret would go along.
    let token_http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let request = TokenRequest::oauth2_client_credentials(
        &format!("{api}/oauth/v2/token"),
        "logistics-app",
        "s3cret",
    )?
    .scope("shipments:read");
    let source = TokenSource::new(request)
        .client(TokenClient::reqwest(token_http))
        .allow_http_loopback(true); // loopback fake only

    // API requests follow redirects only within the origin they start from.
    let http = reqwest::Client::builder()
        .redirect(redirect_policy())
        .build()?;
    let client = ClientBuilder::new(http)
        // (a retry middleware goes here, before auth: each attempt gets a fresh header)
        .with(
            AuthMiddleware::new(source)
                .origin(api)? // the credential goes to this origin only
                .allow_http_loopback(true), // loopback fake only: production is https-only
        )
        .build();

    let res = client.get(format!("{api}/v1/shipments")).send().await?;
    println!("GET /v1/shipments:            {}", res.status());

    revoke_tokens(); // revoked at the provider: the next request gets a 401...
    let res = client.get(format!("{api}/v1/shipments")).send().await?;
    println!(
        "after revocation:             {} (refreshed, replayed once)",
        res.status()
    );

    // Errors: this crate's, inside reqwest-middleware's. Here a wrong client secret:
    // the token endpoint refuses it, and no request reaches the API.
    let wrong = TokenSource::client_credentials(
        &format!("{api}/oauth/v2/token"),
        "logistics-app",
        "wrong-secret",
    )?
    .allow_http_loopback(true); // no .client(..): the default token client
    let misconfigured = ClientBuilder::new(
        reqwest::Client::builder()
            .redirect(redirect_policy())
            .build()?,
    )
    .with(
        AuthMiddleware::new(wrong)
            .origin(api)?
            .allow_http_loopback(true),
    )
    .build();
    match misconfigured
        .get(format!("{api}/v1/shipments"))
        .send()
        .await
    {
        Err(err) => match auth_error(&err) {
            Some(auth) if auth.kind() == ErrorKind::Fetch => println!(
                "wrong secret:                 {:?}, OAuth error {:?}",
                auth.kind(),
                auth.oauth_error()
            ),
            Some(auth) => println!("auth error {:?}: {err}", auth.kind()),
            None => println!("transport error: {err}"),
        },
        Ok(res) => println!("unexpected: {}", res.status()),
    }
    Ok(())
}
// ---------------------------------------------------------------------------------------

mod support;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let api = support::apis::ClientCredentialsApi::new("logistics-app", "s3cret", 3600);
    let base = support::start(api.clone()).await;
    call_the_api(&base, || api.revoke_all()).await?;
    println!(
        "token requests: {} (one at start, one after the revocation), 401s: {}",
        api.tokens_issued.get(),
        api.rejected.get(),
    );
    Ok(())
}
