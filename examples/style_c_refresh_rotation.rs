//! Style C: API-key login, access + refresh token, rotation, refresh only after a 401;
//! 100 requests meet the expired session at once. `cargo run --example style_c_refresh_rotation`
//! (starts its own fake API on loopback).
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower::{Layer, ServiceExt};
use tower_client_auth::{AuthLayer, BoxError, ReplayBody, token::TokenSource};

// --- the code to copy: `api` is your API's base URL, e.g. "https://api.example.com" ----
async fn call_the_api(api: &str, mid_run: impl FnOnce()) -> Result<(), BoxError> {
    let source = TokenSource::api_key_login(
        &format!("{api}/v3/auth/login"),
        &format!("{api}/v3/auth/refresh"),
        "6f1c2a9e-api-key",
    )?
    .allow_http_loopback(true) // loopback fake only
    .on_refresh(|pair| async move {
        // Persist the newest refresh token here (a file, a secret store...): the old one
        // is spent the moment the provider rotates it.
        println!(
            "new pair held (refresh token present: {})",
            pair.refresh_token().is_some()
        );
    });
    let client = AuthLayer::new(source)
        .origin(api)? // the credential goes to this origin only
        .allow_http_loopback(true) // loopback fake only: production is https-only
        .layer(Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>());

    let get = |client: &tower_client_auth::AddCredential<_, _>| {
        let req = Request::get(format!("{api}/v3/accounts")).body(Full::default());
        client.clone().oneshot(req.expect("a valid request"))
    };
    get(&client).await?;
    mid_run(); // every access token now answers 401
    let burst: Vec<_> = (0..100).map(|_| tokio::spawn(get(&client))).collect();
    for call in burst {
        assert!(call.await??.status().is_success());
    }
    Ok(())
}
// ---------------------------------------------------------------------------------------

mod support;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let api = support::apis::RotatingApi::new("6f1c2a9e-api-key");
    let base = support::start(api.clone()).await;
    call_the_api(&base, || api.expire_sessions()).await?;
    println!(
        "logins: {}, refreshes: {} (100 callers met the 401, one refresh), \
         refresh tokens presented twice: {}, early refreshes: {}",
        api.logins.get(),
        api.refreshes.get(),
        api.refresh_tokens_reused.get(),
        api.early_refreshes.get(),
    );
    Ok(())
}
