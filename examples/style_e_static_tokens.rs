//! Style E: a personal access token swapped at runtime, a cookie, and the custom
//! `Authorization: Secret <secret>` scheme. `cargo run --example style_e_static_tokens`
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, BoxError, Credential, ReplayBody, RotatingCredential, StaticCredential,
};

#[path = "../tests/support/providers.rs"]
mod providers;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let provider =
        providers::PersonalTokenApi::new("pat_old", ("session", "c00k1e"), "cl1ent-s3cret");
    let base = providers::start(provider.clone()).await;
    let http = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>();
    let get = |path: &str| {
        Request::get(format!("{base}{path}"))
            .body(Full::<Bytes>::default())
            .unwrap()
    };

    // --- user code -------------------------------------------------------------------
    let pat = RotatingCredential::new(Credential::bearer("pat_old")?);
    let origin: tower_client_auth::Origin = base.parse()?; // the credentials go there only
    let api = AuthLayer::new(pat.clone())
        .origin(origin.clone())
        .allow_http_loopback(true)
        .layer(http.clone());
    let cookie = AuthLayer::new(StaticCredential::cookie("session", "c00k1e"))
        .origin(origin.clone())
        .allow_http_loopback(true)
        .layer(http.clone());
    let secret = AuthLayer::new(StaticCredential::with_scheme("Secret", "cl1ent-s3cret"))
        .origin(origin)
        .allow_http_loopback(true)
        .layer(http);

    println!(
        "bearer PAT:        {}",
        api.clone().oneshot(get("/api/me")).await?.status()
    );
    println!(
        "cookie:            {}",
        cookie.oneshot(get("/api/cookie/me")).await?.status()
    );
    println!(
        "Secret scheme:     {}",
        secret.oneshot(get("/api/clients/verify")).await?.status()
    );

    provider.reissue("pat_new"); // the user revoked the token and issued a new one
    println!(
        "after revocation:  {}",
        api.clone().oneshot(get("/api/me")).await?.status()
    );
    pat.rotate(Credential::bearer("pat_new")?); // from an admin endpoint, a file watcher...
    println!(
        "after rotate():    {}",
        api.clone().oneshot(get("/api/me")).await?.status()
    );
    // ---------------------------------------------------------------------------------
    Ok(())
}
