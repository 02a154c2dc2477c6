//! What the wire sees of a body on both attempts, through the Tower layer and, where
//! both apply, the reqwest middleware, against real HTTP/1.1 loopback APIs and mocks: a
//! stream cut short by the `Content-Length` set on it, the header repeated, a `GET`
//! whose stream hyper sends no byte of, trailers a `Content-Length` framing drops,
//! answers that come before the body is read, trailers alone, a body that is not
//! `Unpin`. Proves that the layer frames each attempt as hyper frames the body without
//! it, and replays exactly what the first attempt sent, or nothing.
#![cfg(feature = "reqwest")]

use crate::support;
use support::Open;

use std::{
    convert::Infallible,
    marker::PhantomPinned,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response, StatusCode, header::AUTHORIZATION};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use reqwest_middleware::ClientBuilder;
use support::{Fed, TestSource};
use tower::{Layer, ServiceExt};
use tower_client_auth::{AuthLayer, BoxError, NotReplayed, ReplayBody, reqwest::AuthMiddleware};
use tower_test::mock;

fn status(code: u16) -> Response<&'static str> {
    Response::builder().status(code).body("").unwrap()
}

fn auth<B>(req: &Request<B>) -> String {
    req.headers()[AUTHORIZATION].to_str().unwrap().to_owned()
}

/// `abc`, `def`, `ghi`, all ready at once, of no known length.
fn nine_bytes() -> Vec<Result<Frame<Bytes>, BoxError>> {
    ["abc", "def", "ghi"]
        .iter()
        .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
        .collect()
}

/// World: a stream of unknown length (ready in full when it is sent) whose caller set
/// `Content-Length: 6` by hand while it gives 9 bytes, over HTTP/1.1 to an API that
/// rejects the first attempt. hyper trusts the header and sends `abcdef`. Proves, as README's table says of "a streaming body of unknown length with a
/// `Content-Length` header set by hand": "One that gives more bytes than it declared
/// (HTTP/1.1 cuts it short) is not replayed (`NotReplayed::BodyFailed`)"; through the
/// Tower layer and the reqwest middleware alike.
#[tokio::test]
async fn a_stream_longer_than_its_content_length_is_not_replayed() {
    let (base, log) = support::logging_api(|_, _, attempt| match attempt {
        1 => StatusCode::UNAUTHORIZED,
        _ => StatusCode::OK,
    })
    .await;
    // Tower.
    let client =
        Client::builder(TokioExecutor::new()).build_http::<ReplayBody<BoxBody<Bytes, BoxError>>>();
    let svc = AuthLayer::new(TestSource::new())
        .any_https_origin()
        .allow_http_loopback(true)
        .layer(client);
    let req = Request::post(format!("{base}/tower"))
        .header("content-length", "6")
        .body(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
            nine_bytes(),
        ))))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    let tower = (
        res.status().as_u16(),
        res.extensions().get::<NotReplayed>().copied(),
    );
    // reqwest.
    let layer = AuthLayer::new(TestSource::new())
        .any_https_origin()
        .allow_http_loopback(true);
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(AuthMiddleware::from_layer(&layer))
        .build();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(
        ["abc", "def", "ghi"].map(|c| Ok::<_, std::io::Error>(Bytes::from_static(c.as_bytes()))),
    ));
    let res = client
        .post(format!("{base}/reqwest"))
        .header("content-length", "6")
        .body(body)
        .send()
        .await
        .unwrap();
    let reqwest = (
        res.status().as_u16(),
        res.extensions().get::<NotReplayed>().copied(),
    );
    let seen: Vec<_> = log
        .lock()
        .unwrap()
        .iter()
        .map(|(path, _, body)| (path.clone(), String::from_utf8_lossy(body).into_owned()))
        .collect();
    assert_eq!(
        (tower, reqwest),
        (
            (401, Some(NotReplayed::BodyFailed)),
            (401, Some(NotReplayed::BodyFailed))
        ),
        "the API saw {seen:?}"
    );
}

/// The sending half of a [`Fed`] body.
type Feed = tokio::sync::mpsc::UnboundedSender<Result<Frame<Bytes>, &'static str>>;

/// The mock API's side, for requests whose body is `B`.
type Api<B> = mock::Handle<Request<ReplayBody<B>>, Response<&'static str>>;

/// A call under way.
type Call = tokio::task::JoinHandle<Result<Response<&'static str>, BoxError>>;

/// A streamed upload (`ab` ready, the rest fed through the returned sender; made into the
/// request's body by `wrap`) sent through the layer over `source` to a mock API, the call
/// spawned.
fn upload<B>(source: &TestSource, wrap: impl FnOnce(Fed) -> B) -> (Call, Api<B>, Feed)
where
    B: Body<Data = Bytes, Error = &'static str> + Send + 'static,
{
    let (inner, api) = mock::pair::<Request<ReplayBody<B>>, Response<&'static str>>();
    let svc = AuthLayer::new(source.clone())
        .any_https_origin()
        .layer(inner);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tx.send(Ok(Frame::data(Bytes::from_static(b"ab")))).unwrap();
    let req = Request::post("https://api.test/up")
        .body(wrap(Fed(rx)))
        .unwrap();
    (tokio::spawn(svc.oneshot(req)), api, tx)
}

/// The replay of an [`upload`]: it carries the new credential; the rest (`cd`) comes
/// after the answer, to it, and it reads `abcd` whole; answered 200, the call ends with
/// that answer, unmarked, after one refresh.
async fn replayed_whole(api: &mut Api<Fed>, tx: Feed, call: Call, source: &TestSource, what: &str) {
    let (second, reply) = api.next_request().await.unwrap();
    assert_eq!(auth(&second), "Bearer token-2", "{what}");
    tx.send(Ok(Frame::data(Bytes::from_static(b"cd")))).unwrap();
    drop(tx);
    let read = second.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(read, "abcd", "{what}");
    reply.send_response(status(200));
    let res = call.await.unwrap().unwrap();
    assert_eq!(
        (
            res.status(),
            res.extensions().get::<NotReplayed>(),
            source.fetches()
        ),
        (StatusCode::OK, None, 2),
        "{what}"
    );
}

/// World: a streamed upload (its first chunk ready, the rest later) that the API answers
/// 401 without reading (an auth check ahead of the handler), reading none of it or half
/// of it, and holding the body. Proves: the 401 comes back as it came, marked
/// `BodyIncomplete` (the body's rest is still the first attempt's); nothing is sent a
/// second time; the rejection still refreshes (one more fetch), and a body that ends
/// later changes nothing.
#[tokio::test]
async fn an_early_401_on_a_streaming_body_is_returned_marked_and_never_replayed() {
    for how in ["unread", "half"] {
        let source = TestSource::new();
        let (call, mut api, tx) = upload(&source, |fed| fed);
        let (mut first, reply) = api.next_request().await.unwrap();
        if how == "half" {
            let frame = first.body_mut().frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "ab");
        }
        reply.send_response(status(401));
        let res = call.await.unwrap().unwrap();
        // The body ends only now, after the answer.
        let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"cd"))));
        drop(tx);
        assert_eq!(res.status(), 401, "{how}");
        assert_eq!(
            res.extensions().get::<NotReplayed>(),
            Some(&NotReplayed::BodyIncomplete),
            "{how}"
        );
        assert!(
            !matches!(api.next_request().now_or_never(), Some(Some(_))),
            "{how}: sent a second time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(source.fetches(), 2, "{how}: the rejection refreshes");
        drop(first);
    }
}

/// World: a streamed upload (`ab` ready, `cd` later) that the inner service drops before
/// it answers 401 (as hyper drops a body at an early answer, or sends none of a `GET`
/// of unknown length): unread; after it took the part read ahead; after it also polled
/// for the rest and found none yet; after it took the rest (`cd`) too. Proves: while the
/// inner service took nothing of the body's rest, the replay goes with the new
/// credential and the whole body, the part read ahead and then the rest as the caller
/// gives it; once it took some of the rest, the 401 comes back marked `BodyIncomplete`,
/// sent once. Counter: what the second request carried and read, `NotReplayed`, the
/// source's fetches.
#[tokio::test]
async fn a_body_dropped_with_its_rest_untaken_is_replayed_whole() {
    for how in ["unread", "ahead taken", "rest polled", "rest taken"] {
        let source = TestSource::new();
        let (call, mut api, tx) = upload(&source, |fed| fed);
        let (mut first, reply) = api.next_request().await.unwrap();
        if how != "unread" {
            let frame = first.body_mut().frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "ab", "{how}");
        }
        match how {
            "rest polled" => assert!(first.body_mut().frame().now_or_never().is_none()),
            "rest taken" => {
                tx.send(Ok(Frame::data(Bytes::from_static(b"cd")))).unwrap();
                let frame = first.body_mut().frame().await.unwrap().unwrap();
                assert_eq!(frame.into_data().unwrap(), "cd", "{how}");
            }
            _ => {}
        }
        drop(first);
        reply.send_response(status(401));
        if how == "rest taken" {
            let res = call.await.unwrap().unwrap();
            assert_eq!(
                (res.status(), res.extensions().get::<NotReplayed>()),
                (StatusCode::UNAUTHORIZED, Some(&NotReplayed::BodyIncomplete)),
                "{how}"
            );
            assert!(
                !matches!(api.next_request().now_or_never(), Some(Some(_))),
                "{how}: sent a second time"
            );
            continue;
        }
        replayed_whole(&mut api, tx, call, &source, how).await;
    }
}

/// World: a body that is nothing but trailers (a gRPC status-only stream), streamed, read
/// to its end by the API before it answers 401. Proves: the replay carries the same
/// trailers and no data, with the new credential (not shown by its `Debug`), once.
#[tokio::test]
async fn a_body_of_trailers_alone_replays_them() {
    let source = TestSource::new();
    let (inner, mut api) = mock::pair::<Request<ReplayBody<Fed>>, Response<&'static str>>();
    let svc = AuthLayer::new(source.clone())
        .any_https_origin()
        .layer(inner);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let req = Request::post("https://api.test/up").body(Fed(rx)).unwrap();
    let call = tokio::spawn(svc.oneshot(req));
    let (first, reply) = api.next_request().await.unwrap();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    tx.send(Ok(Frame::trailers(trailers.clone()))).unwrap();
    drop(tx);
    let whole = first.into_body().collect().await.unwrap();
    assert_eq!(whole.trailers(), Some(&trailers));
    reply.send_response(status(401));
    let (second, reply) = api.next_request().await.unwrap();
    assert_eq!(auth(&second), "Bearer token-2");
    // The replay's request, rebuilt from the kept head, keeps the credential sensitive.
    let shown = format!("{second:?}");
    assert!(!shown.contains("token-2"), "{shown}");
    let whole = second.into_body().collect().await.unwrap();
    assert_eq!(whole.trailers(), Some(&trailers));
    assert!(whole.to_bytes().is_empty());
    reply.send_response(status(401));
    let res = call.await.unwrap().unwrap();
    assert_eq!(
        res.extensions().get::<NotReplayed>(),
        Some(&NotReplayed::AlreadyReplayed)
    );
    assert!(!matches!(api.next_request().now_or_never(), Some(Some(_))));
}

/// A body that is not `Unpin`, giving `chunks` one per poll after a pause each.
struct Pinned {
    chunks: std::collections::VecDeque<&'static str>,
    paused: bool,
    _pin: PhantomPinned,
}

impl Body for Pinned {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        // SAFETY: no field is structurally pinned; the marker only makes the type !Unpin.
        let this = unsafe { self.get_unchecked_mut() };
        if !this.paused {
            this.paused = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.paused = false;
        Poll::Ready(
            this.chunks
                .pop_front()
                .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes())))),
        )
    }
}

/// World: a body that is not `Unpin` and streams (nothing ready when it is sent), read to
/// its end before a 401. Proves: the response future is `Send`, and the replay carries
/// the same bytes in order, once, with the new credential.
#[tokio::test]
async fn a_body_that_is_not_unpin_streams_and_replays_in_order() {
    fn send<T: Send>(t: T) -> T {
        t
    }
    let (inner, mut api) = mock::pair::<Request<ReplayBody<Pinned>>, Response<&'static str>>();
    let svc = AuthLayer::new(TestSource::new())
        .any_https_origin()
        .layer(inner);
    let req = Request::post("https://api.test/up")
        .body(Pinned {
            chunks: ["a", "bc", "", "def"].into(),
            paused: false,
            _pin: PhantomPinned,
        })
        .unwrap();
    let call = tokio::spawn(send(svc.oneshot(req)));
    let (first, reply) = api.next_request().await.unwrap();
    let first = first.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(first, "abcdef");
    reply.send_response(status(401));
    let (second, reply) = api.next_request().await.unwrap();
    assert_eq!(auth(&second), "Bearer token-2");
    let mut frames = Vec::new();
    // `ReplayBody<B>` is `Unpin` only when `B` is: read it pinned.
    let mut body = Box::pin(second.into_body());
    while let Some(frame) = body.frame().await {
        frames.push(frame.unwrap().into_data().unwrap());
    }
    assert_eq!(frames.concat(), b"abcdef");
    reply.send_response(status(200));
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
}

/// What the early API saw: (path, authorization, body read) per request it read.
type EarlyLog = std::sync::Arc<std::sync::Mutex<Vec<(String, String, Vec<u8>)>>>;

/// An API that answers a path's first request 401 at once, reading none of its body (an
/// auth check ahead of the handler, as servers do on big uploads), and reads and logs
/// every later one before it answers 200.
async fn early_api() -> (String, EarlyLog) {
    let log: EarlyLog = Default::default();
    let seen = log.clone();
    let addr = support::serve(move |req: Request<hyper::body::Incoming>| {
        let log = seen.clone();
        async move {
            let path = req.uri().path().to_owned();
            let auth = req
                .headers()
                .get(AUTHORIZATION)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            let first = !log.lock().unwrap().iter().any(|(p, _, _)| *p == path);
            if first {
                log.lock().unwrap().push((path, auth, Vec::new()));
                return Response::builder()
                    .status(401)
                    .body(http_body_util::Full::new(Bytes::new()))
                    .unwrap();
            }
            let body = req.into_body().collect().await.unwrap().to_bytes().to_vec();
            log.lock().unwrap().push((path, auth, body));
            Response::builder()
                .status(200)
                .body(http_body_util::Full::new(Bytes::new()))
                .unwrap()
        }
    })
    .await;
    (format!("http://{addr}"), log)
}

/// `ab` ready at once; `cd` 100 ms later (`streaming`), or at once.
fn abcd(streaming: bool) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::iter([Bytes::from_static(b"ab")])
        .chain(futures_util::stream::once(async move {
            if streaming {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Bytes::from_static(b"cd")
        }))
        .map(Ok)
}

use futures_util::StreamExt;

/// World: an API that answers 401 before it reads a byte of the body, over real
/// HTTP/1.1: a body ready in full sent with `Expect: 100-continue` (hyper does not wait
/// for the `100`), and a body still streaming (`cd` 100 ms after `ab`). Proves: through
/// the Tower layer and the reqwest middleware alike, both are replayed whole with the
/// new credential: the ready one was taken before sending; hyper drops the streaming
/// one at the early answer without taking its rest, which the replay then gives after
/// the part taken ahead. Counter: each call's status and `NotReplayed`, and what the API
/// read per request.
#[tokio::test]
async fn an_early_401_is_judged_alike_through_tower_and_reqwest() {
    let (base, log) = early_api().await;
    let mut outcomes = Vec::new();
    for streaming in [false, true] {
        // Tower.
        let client = Client::builder(TokioExecutor::new())
            .build_http::<ReplayBody<BoxBody<Bytes, BoxError>>>();
        let svc = AuthLayer::new(TestSource::new())
            .any_https_origin()
            .allow_http_loopback(true)
            .layer(client);
        let path = format!("/tower/{streaming}");
        let body = StreamBody::new(abcd(streaming).map(|c| c.map(Frame::data).map_err(Into::into)));
        let req = Request::post(format!("{base}{path}"))
            .header("expect", "100-continue")
            .body(BodyExt::boxed(body))
            .unwrap();
        let res = svc.oneshot(req).await.unwrap();
        outcomes.push((
            path,
            res.status().as_u16(),
            res.extensions().get::<NotReplayed>().copied(),
        ));
        // reqwest.
        let layer = AuthLayer::new(TestSource::new())
            .any_https_origin()
            .allow_http_loopback(true);
        let client = ClientBuilder::new(reqwest::Client::new())
            .with(AuthMiddleware::from_layer(&layer))
            .build();
        let path = format!("/reqwest/{streaming}");
        let res = client
            .post(format!("{base}{path}"))
            .header("expect", "100-continue")
            .body(reqwest::Body::wrap_stream(abcd(streaming)))
            .send()
            .await
            .unwrap();
        outcomes.push((
            path,
            res.status().as_u16(),
            res.extensions().get::<NotReplayed>().copied(),
        ));
    }
    let seen = log.lock().unwrap().clone();
    assert_eq!(
        outcomes,
        vec![
            ("/tower/false".to_owned(), 200, None),
            ("/reqwest/false".to_owned(), 200, None),
            ("/tower/true".to_owned(), 200, None),
            ("/reqwest/true".to_owned(), 200, None),
        ],
        "the API saw {seen:?}"
    );
    let replays: Vec<_> = seen
        .iter()
        .filter(|(_, _, body)| !body.is_empty())
        .map(|(p, a, b)| (p.as_str(), a.as_str(), b.as_slice()))
        .collect();
    assert_eq!(
        replays,
        vec![
            ("/tower/false", "Bearer token-2", &b"abcd"[..]),
            ("/reqwest/false", "Bearer token-2", &b"abcd"[..]),
            ("/tower/true", "Bearer token-2", &b"abcd"[..]),
            ("/reqwest/true", "Bearer token-2", &b"abcd"[..]),
        ]
    );
}

/// World: a streamed upload (`ab` ready, `cd` later) whose inner service hands the 401
/// to the caller first and drops the body, its rest untaken, only after (a connection
/// task that answers and then clears its body; the caller's task on another worker
/// sees the answer in between); the refresh is held until then. Proves: the replay is
/// built when the new credential is there, not at the answer, so it goes with the whole
/// body rather than coming back `BodyIncomplete`. Counter: the second request's
/// credential and body, the outcome, the source's fetches.
///
/// Open (review 129): building the replay that late held back the 401 of a body the
/// inner service still held until the refresh ended (and turned it into the refresh's
/// error when that failed), so the decision is made when the answer comes; a body
/// dropped only after that is not replayed. README, "API answers before it reads the
/// body".
#[tokio::test]
#[ignore = "open (review 129): a body dropped untaken only after the answer is not replayed; README, API answers before it reads the body"]
async fn a_body_dropped_untaken_after_the_answer_is_replayed_whole() {
    let source = TestSource::gated(None);
    source.release(1);
    let (call, mut api, tx) = upload(&source, |fed| fed);
    let (first, reply) = api.next_request().await.unwrap();
    reply.send_response(status(401));
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert_eq!(source.fetches(), 2, "the refresh did not start");
    drop(first);
    source.release(1);
    replayed_whole(&mut api, tx, call, &source, "dropped after the answer").await;
}

/// World: a streamed upload (`ab` ready, the rest later) that the inner service answers
/// 401 while it still holds the body, its rest untaken (hyper's HTTP/2 pipe, or a bidi
/// stream, holds a body it polled and found pending); the refresh the rejection starts
/// is held (a slow token endpoint), or fails. Proves: the 401 comes back as it came,
/// marked `BodyIncomplete`, as soon as it is answered, as before the change (nothing to
/// replay: the rest is the first attempt's); neither delayed until the refresh ends nor
/// turned into the refresh's error. Counter: the outcome within 500 ms.
#[tokio::test]
async fn an_early_401_on_a_held_untaken_body_comes_back_without_waiting_for_the_refresh() {
    for how in ["refresh held", "refresh fails"] {
        let source = TestSource::gated(None);
        source.release(1);
        let (mut call, mut api, tx) = upload(&source, |fed| fed);
        let (first, reply) = api.next_request().await.unwrap();
        if how == "refresh fails" {
            source.set_failing(true);
            source.release(1);
        }
        reply.send_response(status(401));
        let outcome = match tokio::time::timeout(Duration::from_millis(500), &mut call).await {
            Err(_) => "still waiting for the refresh".to_owned(),
            Ok(joined) => match joined.unwrap() {
                Ok(res) => format!(
                    "{} {:?}",
                    res.status().as_u16(),
                    res.extensions().get::<NotReplayed>()
                ),
                Err(err) => format!("error: {err}"),
            },
        };
        assert_eq!(outcome, "401 Some(BodyIncomplete)", "{how}");
        call.abort();
        drop((first, tx));
    }
}

/// A request body that counts its owners (`Arc::strong_count` of the second field).
struct Watched(Fed, #[allow(dead_code)] std::sync::Arc<()>);

impl Body for Watched {
    type Data = Bytes;
    type Error = &'static str;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, &'static str>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }
}

/// World: a streamed upload (`ab` ready, the rest later) that the inner service drops
/// with its rest untaken (as hyper does at an early answer) and answers 200 (or 404: an
/// answer that is not a rejection); the caller keeps the settled future a while (a
/// `select!` loop, a `FuturesUnordered` not drained yet). Proves: the
/// caller's body is dropped once the answer is given, as it was before the hand-back
/// (when the inner service dropped it), not kept until the future is dropped: nobody
/// can replay it. Counter: the body's owners once the answer is out, and once the
/// future is dropped.
#[tokio::test]
async fn a_rest_handed_back_is_dropped_once_the_answer_is_given() {
    for code in [200, 404] {
        let source = TestSource::new();
        let (inner, mut api) = mock::pair::<Request<ReplayBody<Watched>>, Response<&'static str>>();
        let svc = AuthLayer::new(source.clone())
            .any_https_origin()
            .layer(inner);
        let alive = std::sync::Arc::new(());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(Ok(Frame::data(Bytes::from_static(b"ab")))).unwrap();
        let req = Request::post("https://api.test/up")
            .body(Watched(Fed(rx), alive.clone()))
            .unwrap();
        let (answered, on_answer) = tokio::sync::oneshot::channel();
        let (release, on_release) = tokio::sync::oneshot::channel::<()>();
        let caller = tokio::spawn(async move {
            let mut svc = svc;
            let ready = svc.ready().await.unwrap();
            let mut call = Box::pin(tower::Service::call(ready, req));
            let res = (&mut call).await.unwrap();
            answered.send(res.status().as_u16()).unwrap();
            let _ = on_release.await;
            drop(call);
        });
        let (first, reply) = api.next_request().await.unwrap();
        drop(first);
        reply.send_response(status(code));
        assert_eq!(on_answer.await.unwrap(), code);
        let after_answer = std::sync::Arc::strong_count(&alive) - 1;
        release.send(()).unwrap();
        caller.await.unwrap();
        let after_drop = std::sync::Arc::strong_count(&alive) - 1;
        assert_eq!(
            (after_answer, after_drop),
            (0, 0),
            "{code}: owners of the body"
        );
        drop(tx);
    }
}

/// World: a streamed upload (`ab` ready, the rest later) that the inner service drops
/// untaken and answers 401, the refresh held; the caller drops the call mid-refresh,
/// with the body handed back before the answer, or after it (while the replay waits to
/// be built). Proves: the caller's body goes with the call, nothing keeps it (no cycle
/// through the recorder). Counter: the body's owners once the call is dropped.
#[tokio::test]
async fn a_rest_handed_back_goes_with_a_call_dropped_mid_refresh() {
    for before_answer in [true, false] {
        let source = TestSource::gated(None);
        source.release(1);
        let alive = std::sync::Arc::new(());
        let (call, mut api, tx) = upload(&source, |fed| Watched(fed, alive.clone()));
        let (first, reply) = api.next_request().await.unwrap();
        let first = if before_answer {
            drop(first);
            None
        } else {
            Some(first)
        };
        reply.send_response(status(401));
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            source.fetches(),
            2,
            "{before_answer}: the refresh did not start"
        );
        drop(first);
        call.abort();
        let _ = call.await;
        assert_eq!(
            std::sync::Arc::strong_count(&alive) - 1,
            0,
            "{before_answer}: owners of the body"
        );
        drop(tx);
    }
}

/// World: as above, a streaming upload (`ab` ready, `cd` 100 ms later) that the API
/// answers 401 before it reads a byte, 20 times, on a multi-threaded runtime: hyper's
/// connection task hands the answer to the caller's task and then drops the body, and the
/// caller's task may run on the other worker in between. Proves: every request is
/// replayed whole with the new credential, not returned `BodyIncomplete` when the
/// caller's task was quicker. Counter: each call's status and `NotReplayed`, what the
/// API read per request.
///
/// Open (review 129), as [`a_body_dropped_untaken_after_the_answer_is_replayed_whole`]:
/// the replay is decided when the answer comes, and nothing orders hyper's drop of the
/// body after it with the caller's look: 0 of 60 rounds lost alone on this machine, 7 to
/// 15 of 20 lost beside two builds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "open (review 129): on a multi-threaded runtime the caller may look before hyper drops the body; README, API answers before it reads the body"]
async fn an_early_401_on_a_stream_is_replayed_whole_on_a_multi_threaded_runtime() {
    let (base, log) = early_api().await;
    let client =
        Client::builder(TokioExecutor::new()).build_http::<ReplayBody<BoxBody<Bytes, BoxError>>>();
    let mut outcomes = Vec::new();
    for round in 0..20 {
        // A source of its own per round: a credential rejected just after a refresh
        // fetched it is not replayed (`FreshCredentialRejected`), whatever its body.
        let svc = AuthLayer::new(TestSource::new())
            .any_https_origin()
            .allow_http_loopback(true)
            .layer(client.clone());
        let body = StreamBody::new(abcd(true).map(|c| c.map(Frame::data).map_err(Into::into)));
        let req = Request::post(format!("{base}/up/{round}"))
            .body(BodyExt::boxed(body))
            .unwrap();
        let res = svc.oneshot(req).await.unwrap();
        outcomes.push((
            res.status().as_u16(),
            res.extensions().get::<NotReplayed>().copied(),
        ));
    }
    let seen = log.lock().unwrap().clone();
    assert_eq!(outcomes, vec![(200, None); 20], "the API saw {seen:?}");
    let read: Vec<_> = seen
        .iter()
        .filter(|(_, _, body)| !body.is_empty())
        .collect();
    assert_eq!(read.len(), 20, "the API saw {seen:?}");
    assert!(
        read.iter().all(|(_, _, body)| body == b"abcd"),
        "the API saw {seen:?}"
    );
}

/// World: a `GET` whose body is a stream of unknown length, ready in full (a caller that
/// builds every request with the same streaming body type, empty or not). Without the
/// layer hyper sends a `GET` of unknown length with no body at all ("GET, HEAD, and
/// CONNECT almost never have bodies"). Proves: through the layer the request
/// is sent as it would be without it, here with no body; the read-ahead does not turn
/// it into a `GET` with a `Content-Length` and a body, whether the stream is within the
/// replay limit (taken whole) or over it (streamed on, not replayed).
#[tokio::test]
async fn a_get_is_sent_with_the_body_hyper_would_send_without_the_layer() {
    let (base, log) = support::logging_api(|_, _, _| StatusCode::OK).await;
    let body = || BodyExt::boxed(StreamBody::new(futures_util::stream::iter(nine_bytes())));
    let plain = Client::builder(TokioExecutor::new()).build_http::<BoxBody<Bytes, BoxError>>();
    let req = Request::get(format!("{base}/plain"))
        .header(AUTHORIZATION, "Bearer own")
        .body(body())
        .unwrap();
    assert_eq!(plain.request(req).await.unwrap().status(), 200);
    let client =
        Client::builder(TokioExecutor::new()).build_http::<ReplayBody<BoxBody<Bytes, BoxError>>>();
    let svc = AuthLayer::new(TestSource::new())
        .any_https_origin()
        .allow_http_loopback(true)
        .layer(client);
    let req = Request::get(format!("{base}/layer")).body(body()).unwrap();
    assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), 200);
    let over_limit = AuthLayer::new(TestSource::new())
        .any_https_origin()
        .allow_http_loopback(true)
        .replay_limit(7)
        .layer(svc.get_ref().clone());
    // Over the limit, its end shown with its last frame (read ahead whole, not replayed).
    let req = Request::get(format!("{base}/layer-over-limit"))
        .body(BodyExt::boxed(EndShown(
            [&b"abc"[..], b"def", b"ghi"].map(Bytes::from_static).into(),
        )))
        .unwrap();
    assert_eq!(over_limit.oneshot(req).await.unwrap().status(), 200);
    // reqwest: without the middleware, then with it.
    let stream = || {
        reqwest::Body::wrap_stream(futures_util::stream::iter(
            ["abc", "def", "ghi"]
                .map(|c| Ok::<_, std::io::Error>(Bytes::from_static(c.as_bytes()))),
        ))
    };
    let res = reqwest::Client::new()
        .get(format!("{base}/reqwest-plain"))
        .body(stream())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let layer = AuthLayer::new(TestSource::new())
        .any_https_origin()
        .allow_http_loopback(true);
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(AuthMiddleware::from_layer(&layer))
        .build();
    let res = client
        .get(format!("{base}/reqwest-layer"))
        .body(stream())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let seen: Vec<_> = log
        .lock()
        .unwrap()
        .iter()
        .map(|(path, _, body)| (path.clone(), String::from_utf8_lossy(body).into_owned()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("/plain".to_owned(), String::new()),
            ("/layer".to_owned(), String::new()),
            ("/layer-over-limit".to_owned(), String::new()),
            ("/reqwest-plain".to_owned(), String::new()),
            ("/reqwest-layer".to_owned(), String::new()),
        ]
    );
}

/// Chunks ready at once, of no stated length, whose end shows with the last one
/// (`is_end_stream`), as a body that knows it has nothing more does.
struct EndShown(std::collections::VecDeque<Bytes>);

impl Body for EndShown {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.0.pop_front().map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

/// World: an upload of known size streamed (its first chunk ready, the rest 20 ms
/// later, the stream left open), its length set by hand as `Content-Length: 6` once, or
/// twice with the same value (a header appended rather than inserted; hyper, as RFC
/// 9110 §8.6 allows, reads the length `6` from it, and so does the server), over
/// HTTP/1.1, rejected once. hyper sends the 6 bytes and stops. Proves, as README says of a stream with a `Content-Length` set by hand: "the body
/// is recorded to that length and replayed after a 401", as it is for a plain
/// `Content-Length: 6` (`tests/loopback.rs`).
#[tokio::test]
async fn a_length_hyper_reads_from_a_repeated_content_length_is_replayed() {
    let (base, log) = support::logging_api(|_, _, attempt| match attempt {
        1 => StatusCode::UNAUTHORIZED,
        _ => StatusCode::OK,
    })
    .await;
    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Open>>();
    let mut outcomes = Vec::new();
    for (path, values) in [("/plain", &["6"][..]), ("/twice", &["6", "6"][..])] {
        let svc = AuthLayer::new(TestSource::new())
            .any_https_origin()
            .allow_http_loopback(true)
            .layer(client.clone());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(Bytes::from_static(b"abc")).unwrap();
        let mut req = Request::post(format!("{base}{path}"));
        for value in values {
            req = req.header("content-length", *value);
        }
        let req = req.body(Open(rx)).unwrap();
        let rest = async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = tx.send(Bytes::from_static(b"def"));
            tx
        };
        let (res, _tx) = tokio::join!(svc.oneshot(req), rest);
        outcomes.push(match res {
            Ok(res) => (
                path,
                res.status().as_u16(),
                res.extensions().get::<NotReplayed>().copied(),
            ),
            Err(err) => panic!("{path}: {err:?}"),
        });
    }
    let seen: Vec<_> = log
        .lock()
        .unwrap()
        .iter()
        .map(|(path, _, body)| (path.clone(), String::from_utf8_lossy(body).into_owned()))
        .collect();
    assert_eq!(
        outcomes,
        vec![("/plain", 200, None), ("/twice", 200, None)],
        "the API saw {seen:?}"
    );
}

/// A body that says it is exactly `declared` bytes long and gives `frames`, then waits
/// once (its end shows only at the poll after that).
struct Declared {
    frames: std::collections::VecDeque<Frame<Bytes>>,
    declared: u64,
    waited: bool,
}

impl Body for Declared {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(frame) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if !self.waited {
            self.waited = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(None)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.declared)
    }
}

/// What the trailer API saw: (authorization, body, `x-checksum` trailer) per request.
type TrailerLog = std::sync::Arc<std::sync::Mutex<Vec<(String, String, Option<String>)>>>;

/// An API that reads each request whole, trailers included, logs it, and rejects
/// `token-1`.
async fn trailer_api() -> (String, TrailerLog) {
    let log: TrailerLog = Default::default();
    let seen = log.clone();
    let addr = support::serve(move |req: Request<hyper::body::Incoming>| {
        let log = seen.clone();
        async move {
            let auth = req.headers()[AUTHORIZATION].to_str().unwrap().to_owned();
            let whole = req.into_body().collect().await.unwrap();
            let checksum = whole
                .trailers()
                .and_then(|t| t.get("x-checksum"))
                .map(|v| v.to_str().unwrap().to_owned());
            let body = String::from_utf8_lossy(&whole.to_bytes()).into_owned();
            let status = if auth == "Bearer token-1" { 401 } else { 200 };
            log.lock().unwrap().push((auth, body, checksum));
            Response::builder()
                .status(status)
                .body(http_body_util::Full::new(Bytes::new()))
                .unwrap()
        }
    })
    .await;
    (format!("http://{addr}"), log)
}

/// World: a body that declares its exact length (4) and gives `abcd` and an
/// `x-checksum` trailer at once, its end showing only at a later poll, sent with
/// `Trailer: x-checksum` over HTTP/1.1 and rejected once. Without the layer hyper frames
/// it by its exact length (`Content-Length: 4`), which carries no trailers: the
/// checksum never leaves. Proves: the replay carries what the first attempt
/// sent, the same data and the same trailers (none here), as README promises ("its end
/// or its drop replay it as it was, with trailers if it gives them"; the replay
/// "carries exactly" what went).
#[tokio::test]
async fn a_replay_carries_no_trailers_the_first_attempt_did_not_send() {
    let (base, log) = trailer_api().await;
    let body = || {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-checksum", "c0ffee".parse().unwrap());
        Declared {
            frames: [
                Frame::data(Bytes::from_static(b"abcd")),
                Frame::trailers(trailers),
            ]
            .into(),
            declared: 4,
            waited: false,
        }
    };
    // Without the layer: what hyper sends of this body.
    let plain = Client::builder(TokioExecutor::new()).build_http::<Declared>();
    let req = Request::post(format!("{base}/plain"))
        .header(AUTHORIZATION, "Bearer own")
        .header("trailer", "x-checksum")
        .body(body())
        .unwrap();
    assert_eq!(plain.request(req).await.unwrap().status(), 200);
    // Through the layer, rejected once.
    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Declared>>();
    let svc = AuthLayer::new(TestSource::new())
        .any_https_origin()
        .allow_http_loopback(true)
        .layer(client);
    let req = Request::post(format!("{base}/layer"))
        .header("trailer", "x-checksum")
        .body(body())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    let seen = log.lock().unwrap().clone();
    let abcd = |auth: &str| (auth.to_owned(), "abcd".to_owned(), None);
    assert_eq!(
        (res.status(), seen),
        (
            StatusCode::OK,
            vec![
                abcd("Bearer own"),
                abcd("Bearer token-1"),
                abcd("Bearer token-2")
            ]
        ),
        "the replay differs from the first attempt"
    );
}
