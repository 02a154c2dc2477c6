//! The framing hyper gives each attempt (review 127), seen on the wire, for bodies whose
//! size hint tightens as they are read (a stream of known most length, `Limited`) and
//! empty streams, against a real HTTP/1.1 loopback API that logs each request's framing
//! headers and body. Proves README's "Each attempt is
//! framed as hyper frames the body without the layer (an exact length only when the body
//! states one)".

use crate::support;

use std::{
    collections::VecDeque,
    convert::Infallible,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header::AUTHORIZATION};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use support::TestSource;
use tower::{Layer, ServiceExt};
use tower_client_auth::{AuthLayer, NotReplayed, ReplayBody};

/// One request as the framing API read it: path, method, `Authorization`,
/// `Content-Length`, `Transfer-Encoding`, body.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    path: String,
    auth: String,
    content_length: Option<String>,
    transfer_encoding: Option<String>,
    body: String,
}

type FramingLog = Arc<Mutex<Vec<Seen>>>;

/// An API over HTTP/1.1 that reads each request whole, logs its framing and body, and
/// answers `token-1` with 401 on a path ending `-rejected`, anything else with 200.
async fn framing_api() -> (String, FramingLog) {
    let log: FramingLog = Default::default();
    let seen = log.clone();
    let addr = support::serve(move |req: Request<hyper::body::Incoming>| {
        let log = seen.clone();
        async move {
            let header = |name: &str| {
                req.headers()
                    .get(name)
                    .map(|v| v.to_str().unwrap().to_owned())
            };
            let auth = header("authorization").unwrap_or_default();
            let content_length = header("content-length");
            let transfer_encoding = header("transfer-encoding");
            let path = req.uri().path().to_owned();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let status = if auth == "Bearer token-1" && path.ends_with("-rejected") {
                401
            } else {
                200
            };
            log.lock().unwrap().push(Seen {
                path,
                auth,
                content_length,
                transfer_encoding,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
            Response::builder()
                .status(status)
                .body(Full::new(Bytes::new()))
                .unwrap()
        }
    })
    .await;
    (format!("http://{addr}"), log)
}

/// A stream that knows the most it will give (`most`, as `http_body_util::Limited`
/// over a stream states it): its hint is `0..=most - given`, exact only once it has
/// nothing left to give. It gives `chunks`, all ready at once, then is not ready once
/// (its end shows at the poll after that), then ends.
struct AtMost {
    chunks: VecDeque<Bytes>,
    most: u64,
    given: u64,
    waited: bool,
}

impl AtMost {
    fn new(chunks: &[&'static [u8]], most: u64) -> Self {
        AtMost {
            chunks: chunks.iter().map(|c| Bytes::from_static(c)).collect(),
            most,
            given: 0,
            waited: false,
        }
    }
}

impl Body for AtMost {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(chunk) = self.chunks.pop_front() {
            self.given += chunk.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if !self.waited {
            self.waited = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(None)
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = SizeHint::new();
        hint.set_upper(self.most - self.given);
        hint
    }
}

/// World: a `POST` and a `GET` whose body is a stream of at most 6 bytes (hint `0..=6`,
/// not exact: hyper frames it chunked, and sends a `GET` of unknown length with no body)
/// that gives `abcdef` at once, its end shown a poll later, over real HTTP/1.1, each
/// sent once without the layer, then through it: the `POST` rejected once, the `GET`
/// accepted. Proves: through the layer each attempt is framed as without it (README:
/// "an exact length only when the body states one"), and the `POST` is replayed with
/// the same bytes and framing. Counter: the framing headers and body the API read per
/// request, the source's fetches.
///
/// Failed before (review 127): the read-ahead takes `abcdef`, and the hint the first attempt states is
/// what was read ahead plus the rest's (`6 + 0..=0`): exact, so hyper frames the first
/// attempt `Content-Length: 6` (the `GET` gains a body) and drops the body at its length
/// without polling its end; the recording never completes and the 401 comes back
/// `BodyIncomplete`, though every byte was sent and read.
#[tokio::test]
async fn a_body_whose_hint_tightens_as_it_is_read_is_framed_as_without_the_layer() {
    let (base, log) = framing_api().await;
    let plain = Client::builder(TokioExecutor::new()).build_http::<AtMost>();
    for (method, path) in [("POST", "/plain-post"), ("GET", "/plain-get")] {
        let req = Request::builder()
            .method(method)
            .uri(format!("{base}{path}"))
            .header(AUTHORIZATION, "Bearer own")
            .body(AtMost::new(&[b"abcdef"], 6))
            .unwrap();
        assert_eq!(plain.request(req).await.unwrap().status(), 200);
    }
    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<AtMost>>();
    let source = TestSource::new();
    let svc = AuthLayer::new(source.clone())
        .any_https_origin()
        .allow_http_loopback(true)
        .layer(client);
    let mut outcomes = Vec::new();
    for (method, path) in [("POST", "/layer-post-rejected"), ("GET", "/layer-get")] {
        let req = Request::builder()
            .method(method)
            .uri(format!("{base}{path}"))
            .body(AtMost::new(&[b"abcdef"], 6))
            .unwrap();
        let res = svc.clone().oneshot(req).await.unwrap();
        outcomes.push((
            path,
            res.status().as_u16(),
            res.extensions().get::<NotReplayed>().copied(),
        ));
    }
    let seen = log.lock().unwrap().clone();
    let framing = |path: &str| -> Vec<_> {
        seen.iter()
            .filter(|s| s.path == path)
            .map(|s| {
                (
                    s.content_length.clone(),
                    s.transfer_encoding.clone(),
                    s.body.clone(),
                )
            })
            .collect()
    };
    let plain_post = framing("/plain-post");
    let plain_get = framing("/plain-get");
    assert_eq!(
        plain_post,
        vec![(None, Some("chunked".to_owned()), "abcdef".to_owned())],
        "hyper without the layer"
    );
    assert_eq!(
        plain_get,
        vec![(None, None, String::new())],
        "hyper without the layer"
    );
    assert_eq!(
        (
            outcomes,
            framing("/layer-post-rejected"),
            framing("/layer-get"),
            source.fetches()
        ),
        (
            vec![
                ("/layer-post-rejected", 200, None),
                ("/layer-get", 200, None)
            ],
            vec![plain_post[0].clone(), plain_post[0].clone()],
            vec![plain_get[0].clone()],
            2
        ),
        "through the layer (outcomes, POST attempts, GET attempts, fetches); the API saw {seen:#?}"
    );
}

/// A stream body over frames known in advance.
type Frames = http_body_util::StreamBody<
    futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>,
>;

/// A stream with nothing in it that does not say so (`is_end_stream` false, no exact
/// hint): `StreamBody` over an empty stream, as a caller that builds every request with
/// one streaming body type sends a `POST` without payload.
fn empty_stream() -> Frames {
    http_body_util::StreamBody::new(futures_util::stream::iter(Vec::new()))
}

/// World: a `POST` whose body is an empty stream that does not show its end before it is
/// polled, sent once without the layer (hyper frames it chunked: `Transfer-Encoding:
/// chunked` and the last chunk), then through the layer to an API that rejects
/// `token-1`. Proves: both attempts through the layer are framed as without it, and the
/// request is replayed once. Counter: the framing headers and body the API read.
///
/// Failed before (review 127): the read-ahead finds the stream empty and plays back a body that shows
/// its end at once (`is_end_stream`), so hyper sends the `POST` with neither
/// `Content-Length` nor `Transfer-Encoding` on both attempts (a front that requires a
/// length on a `POST`, 411, would refuse it only through the layer).
#[tokio::test]
async fn an_empty_stream_is_framed_as_without_the_layer() {
    let (base, log) = framing_api().await;
    let plain = Client::builder(TokioExecutor::new()).build_http::<http_body_util::StreamBody<_>>();
    let req = Request::post(format!("{base}/plain"))
        .header(AUTHORIZATION, "Bearer own")
        .body(empty_stream())
        .unwrap();
    assert_eq!(plain.request(req).await.unwrap().status(), 200);
    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<_>>();
    let source = TestSource::new();
    let svc = AuthLayer::new(source.clone())
        .any_https_origin()
        .allow_http_loopback(true)
        .layer(client);
    let req = Request::post(format!("{base}/layer-rejected"))
        .body(empty_stream())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    let seen = log.lock().unwrap().clone();
    let framing: Vec<_> = seen
        .iter()
        .map(|s| {
            (
                s.path.as_str(),
                s.auth.as_str(),
                s.content_length.as_deref(),
                s.transfer_encoding.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        (res.status(), framing, source.fetches()),
        (
            StatusCode::OK,
            vec![
                ("/plain", "Bearer own", None, Some("chunked")),
                ("/layer-rejected", "Bearer token-1", None, Some("chunked")),
                ("/layer-rejected", "Bearer token-2", None, Some("chunked")),
            ],
            2
        ),
    );
}

/// A stream fed by the test, of unknown length: it never ends while its sender lives.
struct Open(tokio::sync::mpsc::UnboundedReceiver<Bytes>);

impl Body for Open {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

/// World: a `GET` whose body is a stream of unknown length (its first chunk ready, the
/// rest later), over real HTTP/1.1, rejected once. hyper sends a `GET` of unknown length
/// with no body ("GET, HEAD, and CONNECT almost never have bodies") and drops the body
/// unread, with the layer or without. Proves, as README's row on "a body that states no
/// exact length (a stream) on a `GET`" says ("framed as hyper frames it without the
/// layer, on both attempts"): the request is replayed, with no body, as the first
/// attempt went; the API read everything that was sent. Counter: what the API read per
/// attempt, the outcome's `NotReplayed`, the source's fetches.
///
/// Fails today (review 127): the recording never sees the body end (hyper never polls
/// it) and the 401 comes back `BodyIncomplete`, though no byte of the body was ever to
/// be sent. README's row says so.
#[tokio::test]
#[ignore = "open (review 127): a GET of a stream hyper drops unread is not replayed; README, a body that states no exact length on a GET"]
async fn a_get_of_a_stream_hyper_sends_no_body_of_is_replayed() {
    let (base, log) = framing_api().await;
    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Open>>();
    let source = TestSource::new();
    let svc = AuthLayer::new(source.clone())
        .any_https_origin()
        .allow_http_loopback(true)
        .layer(client);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tx.send(Bytes::from_static(b"abc")).unwrap();
    let req = Request::get(format!("{base}/get-rejected"))
        .body(Open(rx))
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    drop(tx);
    let seen: Vec<_> = log
        .lock()
        .unwrap()
        .iter()
        .map(|s| (s.auth.clone(), s.content_length.clone(), s.body.clone()))
        .collect();
    assert_eq!(
        (
            res.status(),
            res.extensions().get::<NotReplayed>().copied(),
            seen,
            source.fetches()
        ),
        (
            StatusCode::OK,
            None,
            vec![
                ("Bearer token-1".to_owned(), None, String::new()),
                ("Bearer token-2".to_owned(), None, String::new()),
            ],
            2
        ),
    );
}
