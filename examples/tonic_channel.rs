//! A tonic gRPC client channel with a bearer credential.
//!
//! gRPC reports a bad token as HTTP 200 with `grpc-status: 16` (UNAUTHENTICATED), not as a
//! 401, so a 401 replay would never fire for gRPC; expiry-driven refresh does. The layer
//! goes `.without_replay()`: the `Channel` then receives tonic's own
//! `http::Request<tonic::body::Body>` unchanged, with no adapter. (To react to
//! UNAUTHENTICATED, call `CacheHandle::invalidate_if` with the credential that was sent.)
//!
//! `cargo run --example tonic_channel`
use std::time::Duration;

use tonic::{
    Status,
    transport::{Channel, Server},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tower::ServiceBuilder;
use tower_client_auth::{AuthLayer, BoxError, Credential, source_fn};

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
                .origin(format!("http://{addr}"))? // the credential goes there only
                .allow_http_loopback(true) // loopback demo only
                .without_replay(), // gRPC has no 401 to replay on: the request goes as it is
        )
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
