//! A tonic gRPC client channel with a bearer credential.
//!
//! tonic's generated clients send `http::Request<tonic::body::Body>` and a `Channel`
//! accepts only that body type, while `AuthLayer` hands its inner service a
//! `ReplayBody<tonic::body::Body>`. The smallest adapter is one `map_request` that wraps
//! the replay body back into a `tonic::body::Body` (`Body::new` takes any `http_body::Body`).
//!
//! gRPC reports a bad token as HTTP 200 with `grpc-status: 16` (UNAUTHENTICATED), not as a
//! 401, so the layer's 401 replay does not fire for gRPC; expiry-driven refresh does.
//!
//! `cargo run --example tonic_channel`
use std::time::Duration;

use http::Request;
use tonic::{
    Status,
    body::Body,
    transport::{Channel, Server},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tower::ServiceBuilder;
use tower_client_auth::{AuthLayer, BoxError, Credential, ReplayBody, source_fn};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // A gRPC server that requires `authorization: Bearer grpc-token`.
    let (_reporter, health) = tonic_health::server::health_reporter();
    let check = |req: tonic::Request<()>| match req.metadata().get("authorization") {
        Some(v) if v == "Bearer grpc-token" => Ok(req),
        _ => Err(Status::unauthenticated("bad token")),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        Server::builder()
            .add_service(tonic::service::interceptor::InterceptedService::new(
                health, check,
            ))
            .serve_with_incoming(tokio_stream_compat(listener)),
    );
    tokio::time::sleep(Duration::from_millis(50)).await;

    // --- user code -------------------------------------------------------------------
    let origin: http::Uri = format!("http://{addr}").parse()?;
    let channel = Channel::builder(origin.clone()).connect().await?;
    let source = source_fn(|_| async {
        Ok::<_, BoxError>(Credential::bearer("grpc-token")?.expires_in(Duration::from_secs(3600)))
    });
    let authed = ServiceBuilder::new()
        .layer(
            AuthLayer::new(source)
                .origin(format!("http://{addr}").parse::<tower_client_auth::Origin>()?) // the credential goes there only
                .allow_http_loopback(true), // loopback demo only
        )
        .map_request(|req: Request<ReplayBody<Body>>| req.map(Body::new))
        .service(channel);
    // `with_origin` puts scheme and host on every request, so the layer can check them.
    let mut client = HealthClient::with_origin(authed, origin);
    let reply = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    // ---------------------------------------------------------------------------------
    println!("health: {:?}", reply.into_inner().status());
    Ok(())
}

/// Accepted TCP connections as the stream tonic's server takes.
fn tokio_stream_compat(
    listener: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |listener| async move {
        let conn = listener.accept().await.map(|(stream, _)| stream);
        Some((conn, listener))
    })
}
