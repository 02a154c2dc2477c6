//! End to end over real sockets: a hyper server on 127.0.0.1 with a token endpoint and
//! an API, and a hyper-util client wrapped in `AuthLayer`. Also the transport rules:
//! credentials never leave over plain http except to loopback when allowed.

mod support;

use std::{
    collections::HashSet,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use support::{FakeApi, TestSource, serve};
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, BoxError, Credential, Error, ErrorKind, FetchContext, ReplayBody, source_fn,
};

type Body = BoxBody<Bytes, Infallible>;

/// The server's state: which tokens are valid, and what it was asked.
#[derive(Default)]
struct Server {
    valid: Mutex<HashSet<String>>,
    issued: AtomicUsize,
    api_calls: AtomicUsize,
}

/// `POST /token` issues `tok-N` (and makes it valid); `/v1/echo` answers 200 with the
/// request body when the bearer token is valid, and a JSON 401 otherwise.
async fn start_server() -> (SocketAddr, Arc<Server>) {
    let state = Arc::new(Server::default());
    let server = state.clone();
    let addr = serve(move |req: Request<hyper::body::Incoming>| {
        let state = server.clone();
        async move {
            let path = req.uri().path().to_owned();
            let auth = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let reply = |status: StatusCode, body: Bytes| {
                Response::builder()
                    .status(status)
                    .body(Full::new(body))
                    .unwrap()
            };
            if path == "/token" {
                let n = state.issued.fetch_add(1, Ordering::SeqCst) + 1;
                let token = format!("tok-{n}");
                state.valid.lock().unwrap().insert(token.clone());
                return reply(StatusCode::OK, Bytes::from(token));
            }
            state.api_calls.fetch_add(1, Ordering::SeqCst);
            let token = auth.as_deref().and_then(|a| a.strip_prefix("Bearer "));
            match token {
                Some(t) if state.valid.lock().unwrap().contains(t) => reply(StatusCode::OK, body),
                _ => reply(
                    StatusCode::UNAUTHORIZED,
                    Bytes::from_static(br#"{"statusCode":401,"message":"Token expired."}"#),
                ),
            }
        }
    })
    .await;
    (addr, state)
}

/// A credential source that asks the loopback token endpoint over its own client.
fn token_endpoint_source(addr: SocketAddr) -> impl tower_client_auth::CredentialSource {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    source_fn(move |_cx: FetchContext| {
        let client = client.clone();
        async move {
            let req = Request::post(format!("http://{addr}/token")).body(Full::default())?;
            let res = client.request(req).await?;
            let token = res.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>(Credential::bearer(std::str::from_utf8(&token)?)?)
        }
    })
}

fn chunked(parts: &[&'static str]) -> Body {
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = parts
        .iter()
        .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
        .collect();
    BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames)))
}

/// World: a real server revokes every token mid-run. Proves, over real HTTP/1.1: the
/// token is fetched once and reused; a 401 costs one token request and one replay whose
/// body (a full one, then a chunked one) arrives byte for byte.
#[tokio::test]
async fn token_revoked_mid_run_is_refreshed_and_body_replayed() {
    let (addr, server) = start_server().await;
    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Body>>();
    let svc = AuthLayer::new(token_endpoint_source(addr))
        .any_https_origin()
        .allow_http_loopback(true)
        .layer(client);
    let url = format!("http://{addr}/v1/echo");
    let send = |body: Body| {
        let req = Request::post(url.as_str()).body(body).unwrap();
        svc.clone().oneshot(req)
    };

    for i in 0..3 {
        let res = send(Full::new(Bytes::from(format!("call {i}"))).boxed())
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.into_body().collect().await.unwrap().to_bytes(),
            format!("call {i}")
        );
    }
    assert_eq!(
        server.issued.load(Ordering::SeqCst),
        1,
        "one token for three calls"
    );

    server.valid.lock().unwrap().clear();
    let res = send(Full::new(Bytes::from_static(b"{\"amount\":42}")).boxed())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "{\"amount\":42}"
    );
    assert_eq!(server.issued.load(Ordering::SeqCst), 2);
    assert_eq!(server.api_calls.load(Ordering::SeqCst), 5);

    server.valid.lock().unwrap().clear();
    let res = send(chunked(&["chunk-1,", "chunk-2,", "chunk-3"]))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.into_body().collect().await.unwrap().to_bytes(),
        "chunk-1,chunk-2,chunk-3"
    );
    assert_eq!(server.issued.load(Ordering::SeqCst), 3);
}

/// Plain http to a loopback server is refused unless the user allows it, and the
/// refusal happens before any connection: the server sees nothing.
#[tokio::test]
async fn loopback_http_only_when_allowed() {
    let (addr, server) = start_server().await;
    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Body>>();
    let strict = AuthLayer::new(token_endpoint_source(addr))
        .any_https_origin()
        .layer(client.clone());
    let url = format!("http://{addr}/v1/echo");

    let err = strict
        .oneshot(Request::get(url.as_str()).body(Body::default()).unwrap())
        .await
        .unwrap_err();
    let err = err.downcast_ref::<Error>().unwrap();
    assert_eq!(err.kind(), ErrorKind::InsecureTransport);
    assert_eq!(server.api_calls.load(Ordering::SeqCst), 0);
    assert_eq!(
        server.issued.load(Ordering::SeqCst),
        0,
        "no token was even fetched"
    );

    let dev = AuthLayer::new(token_endpoint_source(addr))
        .any_https_origin()
        .allow_http_loopback(true)
        .layer(client);
    let res = dev
        .oneshot(Request::get(url.as_str()).body(Body::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

/// Plain http to any other host is refused even when loopback is allowed, and so is a
/// URI whose transport cannot be checked, before the inner service is called.
#[tokio::test]
async fn insecure_transports_are_refused_before_sending() {
    let source = TestSource::new();
    let api = FakeApi::new(|_, _| StatusCode::OK);
    let svc = AuthLayer::new(source.clone())
        .any_https_origin()
        .allow_http_loopback(true)
        .layer(api.service());
    for uri in [
        "http://api.example.com/v1",
        "http://10.1.2.3/",
        "/relative",
        "ftp://files.example.com/",
    ] {
        let req = Request::get(uri).body(Full::<Bytes>::default()).unwrap();
        let err = svc.clone().oneshot(req).await.unwrap_err();
        let err = err.downcast_ref::<Error>().unwrap();
        assert_eq!(err.kind(), ErrorKind::InsecureTransport, "{uri}");
    }
    assert!(api.seen().is_empty());
    assert_eq!(source.fetches(), 0);

    let relative = AuthLayer::new(source.clone())
        .any_https_origin()
        .allow_relative_uris(true)
        .layer(api.service());
    let req = Request::get("/pkg.Service/Method")
        .body(Full::<Bytes>::default())
        .unwrap();
    assert_eq!(relative.oneshot(req).await.unwrap().status(), 200);
}
