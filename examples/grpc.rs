//! A tonic gRPC client with a bearer credential, refreshed and replayed on
//! UNAUTHENTICATED.
//!
//! gRPC reports a bad token as HTTP 200 with `grpc-status: 16` (UNAUTHENTICATED), not as a
//! 401. `rejection_policy(GrpcUnauthenticated::new())` makes that status a rejection: the
//! layer invalidates the token, fetches a new one and replays the call once, body
//! included. The channel takes tonic's own body type, so the replayable body goes into
//! it through one `map_request`. (Without replay, `.without_replay()` hands the channel
//! tonic's request unchanged, with no adapter; expiry still refreshes.)
//!
//! Here the server revokes every token between two calls; the second call still
//! succeeds, with one new token and one replay.
//!
//! `cargo run --example grpc`
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
    time::Duration,
};

use tonic::{
    Status,
    transport::{Channel, Server},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tower::ServiceBuilder;
use tower_client_auth::{
    AuthLayer, BoxError, Credential, ReplayBody, rejection::GrpcUnauthenticated, source_fn,
};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // A gRPC server that accepts only the token its issuer handed out last.
    let issued = Arc::new(Mutex::new(String::new()));
    let calls = Arc::new(AtomicUsize::new(0));
    let addr = start_server(issued.clone(), calls.clone()).await?;

    // --- user code -------------------------------------------------------------------
    let origin: http::Uri = format!("http://{addr}").parse()?;
    let channel = Channel::builder(origin.clone()).connect().await?;
    let fetches = Arc::new(AtomicUsize::new(0));
    let source = {
        let (issued, fetches) = (issued.clone(), fetches.clone());
        source_fn(move |_| {
            // Your token endpoint here; this one tells the demo server what it issued.
            let token = format!("grpc-token-{}", fetches.fetch_add(1, SeqCst) + 1);
            *issued.lock().unwrap() = token.clone();
            async move {
                Ok::<_, BoxError>(Credential::bearer(token)?.expires_in(Duration::from_secs(3600)))
            }
        })
    };
    let authed = ServiceBuilder::new()
        .layer(
            AuthLayer::new(source)
                .origin(format!("http://{addr}"))? // the credential goes there only
                .allow_http_loopback(true) // loopback demo only
                .rejection_policy(GrpcUnauthenticated::new()), // grpc-status 16 → refresh, replay
        )
        // The channel takes tonic's body type: the replayable body goes inside it.
        .map_request(|req: http::Request<ReplayBody<tonic::body::Body>>| {
            req.map(tonic::body::Body::new)
        })
        .service(channel);
    // `with_origin` puts scheme and host on every request, so the layer can check them.
    let mut client = HealthClient::with_origin(authed, origin);
    let check = || HealthCheckRequest {
        service: String::new(),
    };
    let first = client.check(check()).await?;
    // ---------------------------------------------------------------------------------
    println!("first call:  {:?}", first.into_inner().status());

    *issued.lock().unwrap() = "revoked".into();
    let second = client.check(check()).await?;
    println!(
        "second call after a revocation: {:?}",
        second.into_inner().status()
    );
    println!(
        "tokens fetched: {} (one new after UNAUTHENTICATED); calls the server saw: {} (one replayed)",
        fetches.load(SeqCst),
        calls.load(SeqCst)
    );
    assert_eq!((fetches.load(SeqCst), calls.load(SeqCst)), (2, 3));
    Ok(())
}

/// Starts a health server behind an interceptor that accepts `Bearer <issued>` only.
async fn start_server(
    issued: Arc<Mutex<String>>,
    calls: Arc<AtomicUsize>,
) -> Result<std::net::SocketAddr, BoxError> {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let check = move |req: tonic::Request<()>| {
        calls.fetch_add(1, SeqCst);
        let expected = format!("Bearer {}", issued.lock().unwrap());
        match req.metadata().get("authorization") {
            Some(v) if v.to_str().is_ok_and(|v| v == expected) => Ok(req),
            _ => Err(Status::unauthenticated("invalid token")),
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let incoming = futures_util::stream::unfold(listener, |listener| async move {
        let conn = listener.accept().await.map(|(stream, _)| stream);
        Some((conn, listener))
    });
    tokio::spawn(
        Server::builder()
            .add_service(tonic::service::interceptor::InterceptedService::new(
                health, check,
            ))
            .serve_with_incoming(incoming),
    );
    Ok(addr)
}
