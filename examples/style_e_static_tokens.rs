//! Style E: a personal access token swapped at runtime, a session cookie, and the custom
//! `Authorization: Secret <secret>` scheme. `cargo run --example style_e_static_tokens`
//! (starts its own fake API on loopback).
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, BoxError, Credential, Origin, ReplayBody, RotatingCredential, StaticCredential,
};

// --- the code to copy: `api` is your API's base URL, e.g. "https://api.example.com" ----
async fn call_the_api(api: &str, user_reissues_the_token: impl FnOnce()) -> Result<(), BoxError> {
    // A layer that replays a rejected request hands its client a `ReplayBody`; one
    // `.without_replay()` hands it the request unchanged, as `AddAuthorization` does.
    let http = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>();
    let plain = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let get = |path: &str| Request::get(format!("{api}{path}")).body(Full::<Bytes>::default());
    let origin = Origin::of_url(api)?; // the credentials go to this origin only

    // A personal access token that can be replaced while the app runs.
    let pat = RotatingCredential::new(Credential::bearer("pat_old")?);
    let bearer = AuthLayer::new(pat.clone()).origin(&origin)?;
    // A session cookie, merged into any `Cookie` header the request already has. Fixed,
    // so there is nothing to replay with: no replay, no `ReplayBody`.
    let cookie = AuthLayer::new(StaticCredential::cookie("session", "c00k1e")?)
        .origin(&origin)?
        .without_replay();
    // A vendor scheme: `Authorization: Secret <secret>`.
    let secret = AuthLayer::new(StaticCredential::with_scheme("Secret", "cl1ent-s3cret")?)
        .origin(origin)?
        .without_replay();

    // `allow_http_loopback(true)`: the fake API is plain http on loopback; drop in production.
    let bearer = bearer.allow_http_loopback(true).layer(http.clone());
    let cookie = cookie.allow_http_loopback(true).layer(plain.clone());
    let secret = secret.allow_http_loopback(true).layer(plain);

    println!(
        "bearer PAT:       {}",
        bearer.clone().oneshot(get("/api/me")?).await?.status()
    );
    println!(
        "cookie:           {}",
        cookie.oneshot(get("/api/cookie/me")?).await?.status()
    );
    println!(
        "Secret scheme:    {}",
        secret.oneshot(get("/api/clients/verify")?).await?.status()
    );

    user_reissues_the_token(); // revoked in the vendor's console, a new one issued
    println!(
        "after revocation: {}",
        bearer.clone().oneshot(get("/api/me")?).await?.status()
    );
    // From an admin endpoint, a file watcher, a secret manager's push...: `rotate` swaps
    // the credential in every cache that uses `pat`; no fetch happens.
    pat.rotate(Credential::bearer("pat_new")?)?;
    println!(
        "after rotate():   {}",
        bearer.clone().oneshot(get("/api/me")?).await?.status()
    );
    Ok(())
}
// ---------------------------------------------------------------------------------------

mod support;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let api =
        support::apis::PersonalTokenApi::new("pat_old", ("session", "c00k1e"), "cl1ent-s3cret");
    let base = support::start(api.clone()).await;
    call_the_api(&base, || api.reissue("pat_new")).await?;
    println!(
        "401s: {} (the revoked PAT, until rotate)",
        api.rejected.get()
    );
    Ok(())
}
