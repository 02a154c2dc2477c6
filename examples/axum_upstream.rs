//! An axum app whose handlers call an authenticated upstream API through one shared
//! `AuthLayer` client: one token for all handlers and all concurrent requests.
//! `cargo run --example axum_upstream`
use axum::{Router, extract::State, http::StatusCode, routing::get};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AddCredential, AuthLayer, BoxError, ReplayBody,
    token::{TokenRequest, TokenSource},
};

// --- the code to copy: the app's state and a handler calling the upstream API ----------

/// The app's state: the authenticated upstream client. Cloning it is cheap and shares the
/// credential cache.
#[derive(Clone)]
struct App {
    upstream: AddCredential<Client<HttpConnector, ReplayBody<Full<Bytes>>>, TokenSource>,
    upstream_base: String,
}

async fn shipments(State(app): State<App>) -> Result<String, StatusCode> {
    let req = Request::get(format!("{}/v1/shipments", app.upstream_base))
        .body(Full::default())
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    let res = app
        .upstream
        .oneshot(req)
        .await
        .map_err(|_| StatusCode::BAD_GATEWAY)?;
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|_| StatusCode::BAD_GATEWAY)?;
    Ok(String::from_utf8_lossy(&body.to_bytes()).into_owned())
}

/// The app: one authenticated upstream client shared by every handler.
fn app(upstream_base: String) -> Result<Router, BoxError> {
    let source = TokenSource::new(TokenRequest::oauth2_client_credentials(
        &format!("{upstream_base}/oauth/v2/token"),
        "app",
        "app-secret",
    )?)
    .allow_http_loopback(true); // the fake upstream is plain http on loopback; drop in production
    let upstream = AuthLayer::new(source)
        .origin(&upstream_base)? // the credential goes there only
        .allow_http_loopback(true) // loopback demo only
        .layer(Client::builder(TokioExecutor::new()).build_http());
    Ok(Router::new()
        .route("/shipments", get(shipments))
        .with_state(App {
            upstream,
            upstream_base,
        }))
}
// ---------------------------------------------------------------------------------------

mod support;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let provider = support::apis::ClientCredentialsApi::new("app", "app-secret", 3600);
    let app = app(support::start(provider.clone()).await)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });

    // Fifty concurrent callers of the app: one upstream token.
    let plain = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let plain = plain.clone();
            tokio::spawn(async move {
                plain
                    .get(format!("http://{addr}/shipments").parse().unwrap())
                    .await
            })
        })
        .collect();
    for call in calls {
        assert!(call.await??.status().is_success());
    }
    println!(
        "50 app requests served; upstream token requests: {}",
        provider.tokens_issued.get(),
    );
    Ok(())
}
