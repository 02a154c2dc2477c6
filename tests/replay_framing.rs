//! The framing hyper gives each attempt (review 127), seen on the wire, for bodies whose
//! size hint tightens as they are read (a stream of known most length, `Limited`) and
//! empty streams, against a real HTTP/1.1 loopback API that logs each request's framing
//! headers and body. Proves README's "Each attempt is
//! framed as hyper frames the body without the layer (an exact length only when the body
//! states one)".

use crate::support;
use support::Open;

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
    framing_api_over(false).await
}

/// [`framing_api`] over HTTP/1.1, or over HTTP/2 (prior knowledge) if `http2`.
async fn framing_api_over(http2: bool) -> (String, FramingLog) {
    let log: FramingLog = Default::default();
    let seen = log.clone();
    let handler = move |req: Request<hyper::body::Incoming>| {
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
    };
    if !http2 {
        let addr = support::serve(handler).await;
        return (format!("http://{addr}"), log);
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            let service = hyper::service::service_fn(move |req| {
                let reply = handler(req);
                async move { Ok::<_, Infallible>(reply.await) }
            });
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
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

/// World: a `GET` whose body is a stream of unknown length (its first chunk ready, the
/// rest later), over real HTTP/1.1, rejected once. hyper sends a `GET` of unknown length
/// with no body ("GET, HEAD, and CONNECT almost never have bodies") and drops the body
/// unread, with the layer or without. Proves, as README's row on "a body that states no
/// exact length (a stream) on a `GET`" says ("framed as hyper frames it without the
/// layer, on both attempts"): the request is replayed, with no body, as the first
/// attempt went; the API read everything that was sent. Counter: what the API read per
/// attempt, the outcome's `NotReplayed`, the source's fetches.
///
/// Failed before the body's untaken rest was handed back for the replay (review 127):
/// the recording never saw the body end (hyper never polls it) and the 401 came back
/// `BodyIncomplete`, though no byte of the body was ever to be sent.
#[tokio::test]
async fn a_get_of_a_stream_hyper_sends_no_body_of_is_replayed() {
    a_get_of_a_stream_rejected_once().await;
}

/// World: as above, 20 times on a multi-threaded runtime, where hyper's connection task
/// and the caller's task run on two workers. Proves (the closing note's "on any
/// runtime"): hyper drops a `GET`'s body of unknown length before the request is sent,
/// so the replay never races the drop: every round is replayed. Counter: as above, per
/// round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_of_a_stream_is_replayed_on_a_multi_threaded_runtime() {
    for _ in 0..20 {
        a_get_of_a_stream_rejected_once().await;
    }
}

/// One round of [`a_get_of_a_stream_hyper_sends_no_body_of_is_replayed`].
async fn a_get_of_a_stream_rejected_once() {
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

/// A body that states its exact length, 0, without showing its end (`is_end_stream`
/// false), as hyper's HTTP/2 `Incoming` of a request that came with `content-length: 0`
/// states it before its END_STREAM (a proxy forwarding it), or `Limited` with a limit
/// of 0 over a stream: its end shows at its first poll, or (`waits`) at the poll after
/// one `Pending`.
struct StatedZero {
    waits: bool,
}

impl Body for StatedZero {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.waits {
            self.waits = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(None)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(0)
    }
}

/// The framing (`Content-Length`, `Transfer-Encoding`, body) the framing API read of a
/// `method` request whose body `make` makes: sent once without the layer, then through
/// it to a path the API rejects once; with the outcome's `NotReplayed` and the source's
/// fetches. Over HTTP/2 if `http2`.
async fn framing_without_and_with_the_layer<B>(
    http2: bool,
    method: &str,
    make: impl Fn() -> B,
) -> (Vec<Seen>, Vec<Seen>, Option<NotReplayed>, usize)
where
    B: Body<Data = Bytes, Error = Infallible> + Send + Unpin + 'static,
{
    let (base, log) = framing_api_over(http2).await;
    let mut builder = Client::builder(TokioExecutor::new());
    builder.http2_only(http2);
    let plain = builder.build_http::<B>();
    let req = Request::builder()
        .method(method)
        .uri(format!("{base}/plain"))
        .header(AUTHORIZATION, "Bearer own")
        .body(make())
        .unwrap();
    assert_eq!(plain.request(req).await.unwrap().status(), 200);
    let source = TestSource::new();
    let svc = AuthLayer::new(source.clone())
        .any_https_origin()
        .allow_http_loopback(true)
        .layer(builder.build_http::<ReplayBody<B>>());
    let req = Request::builder()
        .method(method)
        .uri(format!("{base}/layer-rejected"))
        .body(make())
        .unwrap();
    let res = svc.oneshot(req).await.unwrap();
    let seen = log.lock().unwrap().clone();
    let (plain, layer): (Vec<_>, Vec<_>) = seen
        .into_iter()
        .map(|s| Seen {
            auth: String::new(),
            path: String::new(),
            ..s
        })
        .enumerate()
        .partition(|(i, _)| *i == 0);
    (
        plain.into_iter().map(|(_, s)| s).collect(),
        layer.into_iter().map(|(_, s)| s).collect(),
        res.extensions().get::<NotReplayed>().copied(),
        source.fetches(),
    )
}

/// World: a `POST` and a `GET` whose body states its exact length, 0, but not its end
/// (`is_end_stream` false; [`StatedZero`]), its end shown at its first poll or after one
/// `Pending`, over real HTTP/1.1: sent once without the layer (hyper frames it by its
/// stated length: `Content-Length: 0`, on the `GET` too), then through the layer to an
/// API that rejects `token-1`. Proves README's "framed as hyper frames the body without
/// the layer (an exact length only when the body states one)" and "the replay sends
/// exactly what the first attempt sent" for a body that states 0: both attempts through
/// the layer carry `Content-Length: 0`, as without it. Counter: the framing headers and
/// body the API read per attempt, the source's fetches.
///
/// Fails today (review 128): a body taken whole of an exact length plays back as at its
/// end when nothing remains (`is_end_stream` true for an exact replay of 0 bytes), so
/// hyper sends it as no body at all: neither `Content-Length` nor `Transfer-Encoding`, on
/// both attempts when the end shows at once, on the replay alone when it shows after a
/// `Pending` (the first attempt is then the body itself, `Content-Length: 0`).
#[tokio::test]
async fn a_body_that_states_a_length_of_zero_is_framed_as_without_the_layer() {
    let mut seen = Vec::new();
    for waits in [false, true] {
        for method in ["POST", "GET"] {
            let (plain, layer, not, fetches) =
                framing_without_and_with_the_layer(false, method, || StatedZero { waits }).await;
            assert_eq!(
                plain[0].content_length.as_deref(),
                Some("0"),
                "hyper without the layer"
            );
            seen.push((
                waits,
                method,
                layer,
                not,
                fetches,
                vec![plain[0].clone(), plain[0].clone()],
            ));
        }
    }
    // Per case, the `Content-Length` of each attempt through the layer, as without it.
    let lengths =
        |seen: &[Seen]| -> Vec<_> { seen.iter().map(|s| s.content_length.clone()).collect() };
    let through: Vec<_> = seen
        .iter()
        .map(|(waits, method, layer, not, fetches, _)| {
            (*waits, *method, lengths(layer), *not, *fetches)
        })
        .collect();
    let expected: Vec<_> = seen
        .iter()
        .map(|(waits, method, _, _, _, plain)| (*waits, *method, lengths(plain), None, 2))
        .collect();
    assert_eq!(
        through, expected,
        "(waits, method, Content-Length per attempt, NotReplayed, fetches); all: {seen:#?}"
    );
}

/// World: the body of [`a_body_that_states_a_length_of_zero_is_framed_as_without_the_layer`],
/// ready at once, as hyper's HTTP/2 client sends it (`content-length: 0` on a `POST`,
/// none on a `GET`: "a method with no defined payload semantics"), over real HTTP/2.
/// Proves: through the layer both attempts carry the headers they carry without it (the
/// layer's "at its end" moves END_STREAM onto HEADERS, which hyper's h2 client frames
/// with `content-length: 0` all the same, from the exact hint). Counter: the framing
/// headers and body the API read per attempt, `NotReplayed`, the source's fetches.
#[tokio::test]
async fn over_http2_a_body_that_states_a_length_of_zero_is_framed_as_without_the_layer() {
    let mut seen = Vec::new();
    for method in ["POST", "GET"] {
        let (plain, layer, not, fetches) =
            framing_without_and_with_the_layer(true, method, || StatedZero { waits: false }).await;
        seen.push((
            method,
            layer,
            not,
            fetches,
            vec![plain[0].clone(), plain[0].clone()],
        ));
    }
    assert_eq!(
        seen[0].4[0].content_length.as_deref(),
        Some("0"),
        "hyper's h2 client without the layer, POST"
    );
    for (method, layer, not, fetches, expected) in seen.clone() {
        assert_eq!(
            (layer, not, fetches),
            (expected, None, 2),
            "{method}: the attempts through the layer, NotReplayed, fetches; all: {seen:#?}"
        );
    }
}

/// World: bodies of every shape of stated hint, each sent once without the layer and
/// through it (rejected once) over real HTTP/1.1 and HTTP/2, as `POST` and `GET`: an empty
/// stream, a stream of at most 10 bytes (`0..=10`) giving 6 (its bound not reached) or
/// 10 (reached, its end shown a poll later), `Limited` over a stream, and a `Full`.
/// Proves: through the layer each attempt is framed as without it, the replay as the
/// first attempt, and the request is replayed once (over HTTP/1.1 a `GET` of a stream
/// still streaming when sent too, which hyper drops unsent: its rest is handed back for
/// the replay; see [`a_get_of_a_stream_hyper_sends_no_body_of_is_replayed`]). Counter: the framing headers and body the API read per attempt, `NotReplayed`, the
/// source's fetches.
#[tokio::test]
async fn bodies_of_every_hint_are_framed_as_without_the_layer_over_both_versions() {
    type Boxed = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;
    type Maker = (&'static str, fn() -> Boxed);
    let makers: Vec<Maker> = vec![
        ("empty stream", || empty_stream().boxed_unsync()),
        ("at most 10, gives 6", || {
            AtMost::new(&[b"abc", b"def"], 10).boxed_unsync()
        }),
        ("at most 10, gives 10", || {
            AtMost::new(&[b"abcde", b"fghij"], 10).boxed_unsync()
        }),
        ("Limited 6 over a stream of 6", || {
            http_body_util::Limited::new(
                http_body_util::StreamBody::new(futures_util::stream::iter(vec![Ok::<
                    _,
                    Infallible,
                >(
                    Frame::data(Bytes::from_static(b"abcdef")),
                )])),
                6,
            )
            .map_err(|_| unreachable!())
            .boxed_unsync()
        }),
        ("Full", || {
            Full::new(Bytes::from_static(b"abcdef")).boxed_unsync()
        }),
    ];
    let mut off = Vec::new();
    for http2 in [false, true] {
        for method in ["POST", "GET", "PUT"] {
            for (name, make) in &makers {
                let (plain, layer, not, fetches) =
                    framing_without_and_with_the_layer(http2, method, make).await;
                let expected = vec![plain[0].clone(), plain[0].clone()];
                if (layer.clone(), not, fetches) != (expected.clone(), None, 2) {
                    off.push((http2, method, *name, layer, not, fetches, expected));
                }
            }
        }
    }
    assert!(
        off.is_empty(),
        "framed otherwise through the layer: {off:#?}"
    );
}
