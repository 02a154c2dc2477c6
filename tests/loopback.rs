//! End to end over real sockets: a hyper server on 127.0.0.1 with a token endpoint and
//! an API, and a hyper-util client wrapped in `AuthLayer`. Also the transport rules:
//! credentials never leave over plain http except to loopback when allowed.

use crate::support;

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

/// World: a layer over `.any_https_origin()` that does not allow plain http to loopback,
/// and a `wss://127.0.0.1` request (a connector starts no TLS for `wss`, so the rule
/// takes it as plain text: loopback only when allowed). Proves: the refusal says what
/// was refused ("the error says why"): it names `wss`, not "plain http", which this
/// request is not and whose setter alone would not tell its user that `wss` is the
/// problem.
#[tokio::test]
async fn a_wss_request_to_loopback_is_refused_with_its_own_reason() {
    let source = TestSource::new();
    let api = FakeApi::new(|_, _| StatusCode::OK);
    let svc = AuthLayer::new(source.clone())
        .any_https_origin()
        .layer(api.service());
    let req = Request::get("wss://127.0.0.1:8443/v1/stream")
        .body(Full::<Bytes>::default())
        .unwrap();
    let err = svc.oneshot(req).await.unwrap_err();
    let err = err.downcast_ref::<Error>().unwrap();
    assert_eq!(err.kind(), ErrorKind::InsecureTransport);
    assert!(api.seen().is_empty());
    let text = err.to_string();
    assert!(
        text.contains("wss") && !text.contains("plain http to a loopback host"),
        "the refusal of a wss request: {text}"
    );
}

/// What the body server saw of one request: its body and `x-checksum` trailer, or that
/// the body never arrived whole.
type Seen = Result<(Bytes, Option<String>), String>;

/// An API that records each request's body as it arrived, and rejects `tok-1`.
async fn body_server() -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let addr = serve(move |req: Request<hyper::body::Incoming>| {
        let log = log.clone();
        async move {
            let rejected = req.headers()["authorization"] == "Bearer tok-1";
            let outcome = match req.into_body().collect().await {
                Ok(whole) => {
                    let checksum = whole
                        .trailers()
                        .and_then(|t| t.get("x-checksum"))
                        .map(|v| v.to_str().unwrap().to_owned());
                    Ok((whole.to_bytes(), checksum))
                }
                Err(e) => Err(e.to_string()),
            };
            log.lock().unwrap().push(outcome);
            let status = if rejected {
                StatusCode::UNAUTHORIZED
            } else {
                StatusCode::OK
            };
            Response::builder()
                .status(status)
                .body(Full::default())
                .unwrap()
        }
    })
    .await;
    (addr, seen)
}

/// `tok-1`, `tok-2`, ..., each after `delay` (a token endpoint's round trip).
fn counting_source_taking(delay: std::time::Duration) -> impl tower_client_auth::CredentialSource {
    let issued = Arc::new(AtomicUsize::new(0));
    source_fn(move |_cx: FetchContext| {
        let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            tokio::time::sleep(delay).await;
            Ok::<_, BoxError>(Credential::bearer(format!("tok-{n}"))?)
        }
    })
}

/// `tok-1`, `tok-2`, ...
fn counting_source() -> impl tower_client_auth::CredentialSource {
    let issued = Arc::new(AtomicUsize::new(0));
    source_fn(move |_cx: FetchContext| {
        let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
        async move { Ok::<_, BoxError>(Credential::bearer(format!("tok-{n}"))?) }
    })
}

/// World: a client sends a body with a trailer (a checksum declared in `Trailer`), ready
/// in full when it is sent, over HTTP/1.1. Proves: the trailer reaches the server on the
/// first attempt and on the replay; the body taken whole before sending does not claim
/// an exact length, which would make hyper send a `Content-Length` and drop the trailer.
#[tokio::test]
async fn a_body_s_trailers_reach_the_server_on_the_first_attempt_and_the_replay() {
    let (addr, seen) = body_server().await;
    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Body>>();
    let svc = AuthLayer::new(counting_source())
        .any_https_origin()
        .allow_http_loopback(true)
        .layer(client);
    let mut checksum = http::HeaderMap::new();
    checksum.insert("x-checksum", "abc".parse().unwrap());
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
        Ok(Frame::data(Bytes::from_static(b"hello "))),
        Ok(Frame::data(Bytes::from_static(b"world"))),
        Ok(Frame::trailers(checksum)),
    ];
    let body = BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames)));
    let req = Request::post(format!("http://{addr}/v1/upload"))
        .header("trailer", "x-checksum")
        .body(body)
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200, "replayed after tok-1 was rejected");
    let seen = seen.lock().unwrap().clone();
    let whole = Ok((Bytes::from_static(b"hello world"), Some("abc".to_owned())));
    assert_eq!(seen, vec![whole.clone(), whole]);
}

/// World: a body fails while it is read ahead (a file read errors after its first
/// chunk). Proves, over HTTP/1.1: the call fails, as it would without the layer, and the
/// request never reaches the server as a complete one (a `Content-Length` covering only
/// the chunk before the error).
#[tokio::test]
async fn a_body_that_fails_before_it_is_sent_never_reaches_the_server_whole() {
    type Failing = BoxBody<Bytes, BoxError>;
    let (addr, seen) = body_server().await;
    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Failing>>();
    let svc = AuthLayer::new(counting_source())
        .any_https_origin()
        .allow_http_loopback(true)
        .layer(client);
    let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
        Ok(Frame::data(Bytes::from_static(b"ab"))),
        Err("disk gone".into()),
    ];
    let body = BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames)));
    let req = Request::post(format!("http://{addr}/v1/upload"))
        .body(body)
        .unwrap();
    let res = svc.clone().oneshot(req).await;
    assert!(res.is_err(), "the body's failure fails the call: {res:?}");
    // A sound request after it, over the same client: once it is answered, the server
    // has seen whatever it was going to see of the failed one (nothing, or a body cut
    // short), and never the failed one whole.
    let good = Request::post(format!("http://{addr}/v1/upload"))
        .body(
            Full::new(Bytes::from_static(b"cd"))
                .map_err(Into::into)
                .boxed(),
        )
        .unwrap();
    assert_eq!(svc.oneshot(good).await.unwrap().status(), 200, "replayed");
    let seen = seen.lock().unwrap().clone();
    let whole: Vec<_> = seen.iter().filter_map(|s| s.as_ref().ok()).collect();
    let cd = (Bytes::from_static(b"cd"), None);
    assert_eq!(whole, [&cd, &cd], "{seen:?}");
}

/// A body fed through a channel that declares its whole length at every poll (its hint
/// does not shrink as it is read, which hyper tolerates: it reads the hint once, before
/// the first poll), or declares nothing (`None`: a stream of unknown length).
struct Stale {
    rx: tokio::sync::mpsc::UnboundedReceiver<Bytes>,
    total: Option<u64>,
}

impl http_body::Body for Stale {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.total
            .map(http_body::SizeHint::with_exact)
            .unwrap_or_default()
    }
}

/// World: a body with a stale exact hint, its first chunk ready when the request is
/// sent and the rest a moment later, over HTTP/1.1. Proves: the layer announces the
/// length the body declared (what hyper reads without the layer, where this request
/// goes through), never that length plus what it read ahead, which would make hyper
/// wait for bytes that never come and fail the request.
#[tokio::test]
async fn a_body_is_announced_at_the_length_it_declared() {
    let (addr, seen) = body_server().await;
    let plain = Client::builder(TokioExecutor::new()).build_http::<Stale>();
    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Stale>>();
    let layered = AuthLayer::new(source_fn(|_| async { Credential::bearer("tok-ok") }))
        .any_https_origin()
        .allow_http_loopback(true)
        .layer(client);
    let stale = || {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(Bytes::from_static(b"ab")).unwrap();
        let rest = async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            tx.send(Bytes::from_static(b"cd")).unwrap();
        };
        (Stale { rx, total: Some(4) }, rest)
    };
    let url = format!("http://{addr}/v1/upload");
    let auth = "Bearer tok-0";

    // Without the layer.
    let (body, rest) = stale();
    let req = Request::post(url.as_str())
        .header("authorization", auth)
        .body(body)
        .unwrap();
    let (res, ()) = tokio::join!(plain.request(req), rest);
    assert_eq!(res.unwrap().status(), 200);

    // Through the layer.
    let (body, rest) = stale();
    let req = Request::post(url.as_str()).body(body).unwrap();
    let (res, ()) = tokio::join!(layered.oneshot(req), rest);
    assert_eq!(res.unwrap().status(), 200);
    let seen = seen.lock().unwrap().clone();
    let abcd = Ok((Bytes::from_static(b"abcd"), None));
    assert_eq!(seen, vec![abcd.clone(), abcd]);
}

/// World: a body that declares its length and shows its end only when polled after its
/// last byte (a file read behind a channel, a body that does not override
/// `is_end_stream`), over HTTP/1.1, rejected once. hyper stops reading it once the
/// declared length is sent, and never polls for its end. Proves: it is replayed all the
/// same, however many of its chunks were ready when it was sent (none, one, all), since
/// all it declared was sent and recorded.
#[tokio::test]
async fn a_body_whose_end_shows_only_after_its_declared_length_is_replayed() {
    let (addr, seen) = body_server().await;
    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Stale>>();
    stale_bodies_rejected_once_are_replayed(client, addr).await;
    let abcd = Ok((Bytes::from_static(b"abcd"), None));
    // Each rejected attempt (read whole by this server) and its replay.
    assert_eq!(*seen.lock().unwrap(), vec![abcd; 6]);
}

/// Sends a body of 4 declared bytes in two chunks, none, one or both ready when it is
/// sent, its end shown 20 ms after its last byte, through the layer (its refresh taking
/// 200 ms) (`tok-1` is rejected) to `addr`; each
/// must come back 200, replayed.
async fn stale_bodies_rejected_once_are_replayed(
    client: Client<hyper_util::client::legacy::connect::HttpConnector, ReplayBody<Stale>>,
    addr: SocketAddr,
) {
    let chunks = [Bytes::from_static(b"ab"), Bytes::from_static(b"cd")];
    for ready in 0..=2 {
        // The refresh takes longer than the body takes to show its end (a token
        // endpoint's round trip): the replay is built from the settled body.
        let svc = AuthLayer::new(counting_source_taking(std::time::Duration::from_millis(
            200,
        )))
        .any_https_origin()
        .allow_http_loopback(true)
        .layer(client.clone());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for chunk in &chunks[..ready] {
            tx.send(chunk.clone()).unwrap();
        }
        let rest = async {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            for chunk in &chunks[ready..] {
                tx.send(chunk.clone()).unwrap();
            }
            // The end shows a moment after the last byte.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            drop(tx);
        };
        let req = Request::post(format!("http://{addr}/v1/upload"))
            .body(Stale { rx, total: Some(4) })
            .unwrap();
        let (res, ()) = tokio::join!(svc.oneshot(req), rest);
        let res = res.unwrap();
        assert_eq!(
            res.status(),
            200,
            "chunks ready when sent: {ready}: {:?}",
            res.extensions().get::<tower_client_auth::NotReplayed>()
        );
    }
}

/// An HTTP/2 (h2c) server like [`body_server`], except that it answers `tok-1` with a 401
/// once it has read `len` bytes, without waiting for the body's end, and keeps that
/// body open meanwhile (no reset): the client's h2 pipe goes on polling it.
async fn h2_early_answer_server(len: usize) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = log.clone();
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let log = log.clone();
                async move {
                    let rejected = req.headers()["authorization"] == "Bearer tok-1";
                    let mut body = req.into_body();
                    let status = if rejected {
                        let mut read = 0;
                        while read < len {
                            match body.frame().await {
                                Some(Ok(frame)) => {
                                    read += frame.data_ref().map_or(0, |d| d.len());
                                }
                                _ => break,
                            }
                        }
                        tokio::spawn(async move {
                            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                            drop(body);
                        });
                        StatusCode::UNAUTHORIZED
                    } else {
                        let outcome = match body.collect().await {
                            Ok(whole) => Ok((whole.to_bytes(), None)),
                            Err(e) => Err(e.to_string()),
                        };
                        log.lock().unwrap().push(outcome);
                        StatusCode::OK
                    };
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .body(Full::<Bytes>::default())
                            .unwrap(),
                    )
                }
            });
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// World: the body of [`a_body_whose_end_shows_only_after_its_declared_length_is_replayed`]
/// (its length declared, its end shown only when polled after its last byte), over
/// HTTP/2, rejected once all its bytes arrived but
/// before its end (the server reads what it needs and answers; hyper's h2 pipe keeps
/// the body and goes on polling it for its end). Proves: it is replayed all the same,
/// however many of its chunks were ready when it was sent (none, one, all: then the
/// read-ahead holds every byte, and the end is still not shown), since all it declared
/// was sent and recorded.
#[tokio::test]
async fn over_http2_a_body_whose_end_shows_late_is_replayed() {
    let (addr, seen) = h2_early_answer_server(4).await;
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<ReplayBody<Stale>>();
    stale_bodies_rejected_once_are_replayed(client, addr).await;
    let abcd = Ok((Bytes::from_static(b"abcd"), None));
    // The replays only: this server answers the rejected attempts before their end.
    assert_eq!(*seen.lock().unwrap(), vec![abcd; 3]);
}

/// World: a stream of unknown length whose `Content-Length` the caller set by hand (an
/// upload of a file it knows the size of), over HTTP/1.1, rejected once; its first
/// chunk ready when it is sent, or none. hyper trusts the header: it stops reading once
/// that many bytes are sent, and never polls the body for its end. Proves: the body is
/// replayed, since all the header declared was sent and recorded (the same request
/// without the layer is sent whole too).
#[tokio::test]
async fn a_stream_whose_length_is_set_by_hand_is_replayed() {
    let (addr, seen) = body_server().await;
    let plain = Client::builder(TokioExecutor::new()).build_http::<Stale>();
    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Stale>>();
    let url = format!("http://{addr}/v1/upload");
    let send_later = |tx: tokio::sync::mpsc::UnboundedSender<Bytes>, first_ready: bool| {
        if first_ready {
            tx.send(Bytes::from_static(b"ab")).unwrap();
        }
        async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            if !first_ready {
                tx.send(Bytes::from_static(b"ab")).unwrap();
            }
            tx.send(Bytes::from_static(b"cd")).unwrap();
            // The sender lives on: the body never ends on its own.
            tx
        }
    };
    // Without the layer.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let req = Request::post(url.as_str())
        .header("authorization", "Bearer tok-0")
        .header("content-length", "4")
        .body(Stale { rx, total: None })
        .unwrap();
    let (res, _tx) = tokio::join!(plain.request(req), send_later(tx, false));
    assert_eq!(res.unwrap().status(), 200);
    for first_ready in [true, false] {
        let svc = AuthLayer::new(counting_source())
            .any_https_origin()
            .allow_http_loopback(true)
            .layer(client.clone());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let rest = send_later(tx, first_ready);
        let req = Request::post(url.as_str())
            .header("content-length", "4")
            .body(Stale { rx, total: None })
            .unwrap();
        let (res, _tx) = tokio::join!(svc.oneshot(req), rest);
        let res = res.unwrap();
        assert_eq!(
            res.status(),
            200,
            "first ready: {first_ready}: {:?}",
            res.extensions().get::<tower_client_auth::NotReplayed>()
        );
    }
    let seen = seen.lock().unwrap().clone();
    let abcd = Ok((Bytes::from_static(b"abcd"), None));
    assert_eq!(seen, vec![abcd.clone(); 5]);
}

/// World: a layer given `https://api.example.com` with `allow_relative_uris(true)` (as
/// for a tonic channel that sets the origin below), over a hyper-util client whose DNS
/// resolves `tenant.evil.test` (a non-loopback name) to a loopback server, and a
/// `CONNECT tenant.evil.test:{port}` request (authority-form: a host, and no scheme).
/// hyper-util sends an authority-form `CONNECT` over plain http to the host it names.
/// Proves (should): a URI that names a host is held to the origin rule and the
/// transport rule, even with relative URIs allowed: no credential goes over plain http
/// to a host the layer was not given.
#[tokio::test]
async fn an_authority_form_uri_is_no_relative_uri() {
    use hyper_util::client::legacy::connect::{HttpConnector, dns::Name};
    let (addr, seen) = support::recording_api(StatusCode::FORBIDDEN, |req| {
        format!("{} {}", req.method(), req.uri())
    })
    .await;
    // The name resolves to the loopback server (DNS standing in for a real remote host).
    let resolver =
        tower::service_fn(
            move |_: Name| async move { Ok::<_, std::io::Error>(std::iter::once(addr)) },
        );
    let client = Client::builder(TokioExecutor::new())
        .build::<_, ReplayBody<Full<Bytes>>>(HttpConnector::new_with_resolver(resolver));
    let layer =
        AuthLayer::new(tower_client_auth::StaticCredential::bearer("relative-secret").unwrap())
            .origin("https://api.example.com")
            .unwrap()
            .allow_relative_uris(true);
    let uri = format!("tenant.evil.test:{}", addr.port());
    let request = || {
        Request::connect(uri.as_str())
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let replaying = layer.clone().layer(client.clone()).oneshot(request()).await;
    let direct = layer
        .without_replay()
        .layer(
            Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(
                HttpConnector::new_with_resolver(tower::service_fn(move |_: Name| async move {
                    Ok::<_, std::io::Error>(std::iter::once(addr))
                })),
            ),
        )
        .oneshot(request())
        .await;
    let seen = seen.lock().unwrap().clone();
    let leaked: Vec<_> = seen.iter().filter(|(_, auth)| auth.is_some()).collect();
    assert!(
        leaked.is_empty(),
        "over plain http to {uri} (replaying: {:?}, direct: {:?}): {leaked:?}",
        replaying.map(|r| r.status()),
        direct.map(|r| r.status()),
    );
}

/// World: a source whose credential is (by a configuration slip) a header that frames
/// the message, `Content-Length: 2`, and a POST of `hello` through the layer over real
/// HTTP/1.1. Proves: such a credential is refused when it is made, with a typed error
/// (`InvalidCredential`), for every header that frames or routes a message, whatever
/// its case, through `Credential::header`, `Credential::from_headers` and
/// `StaticCredential::header`; so the body is never cut short (hyper keeps a
/// `Content-Length` set on the request: the server got `he`, and the rest would read as
/// the next request on the connection).
#[tokio::test]
async fn a_credential_header_that_frames_the_message_never_cuts_the_body() {
    use tower_client_auth::{Credential, StaticCredential};
    let (url, log) = support::logging_api(|_, _, _| StatusCode::OK).await;
    if let Ok(source) = StaticCredential::header("content-length", "2") {
        let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Body>>();
        let svc = AuthLayer::new(source)
            .any_https_origin()
            .allow_http_loopback(true)
            .layer(client);
        let req = Request::post(format!("{url}/upload"))
            .body(Full::new(Bytes::from_static(b"hello")).boxed())
            .unwrap();
        let _ = svc.oneshot(req).await;
        let bodies: Vec<Vec<u8>> = log
            .lock()
            .unwrap()
            .iter()
            .map(|(_, _, b)| b.clone())
            .collect();
        assert_eq!(bodies, [b"hello".to_vec()], "the body went cut short");
    }
    for name in [
        "content-length",
        "Transfer-Encoding",
        "host",
        "connection",
        "te",
        "trailer",
        "upgrade",
        "Keep-Alive",
        "proxy-connection",
    ] {
        let refused = Credential::header(name, "2").unwrap_err();
        assert!(
            refused.to_string().contains("frames or routes"),
            "{name}: {refused}"
        );
        assert!(StaticCredential::header(name, "2").is_err(), "{name}");
        let parsed = http::HeaderName::from_bytes(name.as_bytes()).unwrap();
        let several = [
            (
                http::header::AUTHORIZATION,
                http::HeaderValue::from_static("Bearer t"),
            ),
            (parsed, http::HeaderValue::from_static("2")),
        ];
        assert!(Credential::from_headers(several).is_err(), "{name}");
    }
    // The ordinary ones still are credentials.
    assert!(Credential::header("x-api-key", "k").is_ok());
}
