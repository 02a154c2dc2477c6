//! The body kept for a replay, through the layer over a mock API: chunks on both sides
//! of a 64 KiB copy segment interleaved with empty frames, ready in full or streamed,
//! stating their length or not, at the limit exactly and one byte past it; a body that
//! states its exact length and gives trailers; an exact body under a smaller
//! `Content-Length` header. Each attempt's body is read as the inner service reads it
//! (frames, size hint, trailers) and compared: the replay gives the same bytes in the
//! same order, the same stated length and the same trailers, or is refused at the
//! limit.

use crate::support;

use std::{
    collections::VecDeque,
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use support::TestSource;
use tower::{Layer, ServiceExt};
use tower_client_auth::{AuthLayer, NotReplayed, ReplayBody};
use tower_test::mock;

/// One step of a [`Steps`] body.
enum Step {
    Frame(Frame<Bytes>),
    /// Not ready yet: `Pending` once, the reader woken at once.
    Wait,
}

/// A body that gives its steps in order, stating `exact` as its length if set.
struct Steps {
    steps: VecDeque<Step>,
    exact: Option<u64>,
}

impl Body for Steps {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.steps.pop_front() {
            None => Poll::Ready(None),
            Some(Step::Frame(frame)) => Poll::Ready(Some(Ok(frame))),
            Some(Step::Wait) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.exact {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// What the inner service reads of one attempt's body: its exact length if stated
/// before the first frame, its bytes, its trailers.
#[derive(Debug, PartialEq)]
struct Seen {
    exact: Option<u64>,
    bytes: Vec<u8>,
    trailers: Option<HeaderMap>,
}

async fn seen<B: Body<Data = Bytes> + Unpin>(mut body: B) -> Seen
where
    B::Error: std::fmt::Debug,
{
    let exact = body.size_hint().exact();
    let mut bytes = Vec::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        match frame.into_data() {
            Ok(d) => bytes.extend_from_slice(&d),
            Err(f) => trailers = f.into_trailers().ok(),
        }
    }
    Seen {
        exact,
        bytes,
        trailers,
    }
}

fn status(code: u16) -> Response<&'static str> {
    Response::builder().status(code).body("").unwrap()
}

/// Sends `body` through the layer (replay limit `limit`); the API reads the first
/// attempt whole and answers 401, then reads the replay, if one comes, and answers 200.
/// Returns what it read of each attempt, or why there was no replay.
async fn both_attempts(body: Steps, limit: usize) -> (Seen, Result<Seen, NotReplayed>) {
    let layer = AuthLayer::new(TestSource::new())
        .any_https_origin()
        .replay_limit(limit);
    let (inner, mut api) = mock::pair::<Request<ReplayBody<Steps>>, Response<&'static str>>();
    let svc = layer.layer(inner);
    let req = Request::put("https://api.test/upload").body(body).unwrap();
    let call = tokio::spawn(svc.oneshot(req));
    let (first, reply) = api.next_request().await.unwrap();
    let first = seen(first.into_body()).await;
    reply.send_response(status(401));
    let mut call = call;
    tokio::select! {
        Some((second, reply)) = api.next_request() => {
            let second = seen(second.into_body()).await;
            reply.send_response(status(200));
            assert_eq!(call.await.unwrap().unwrap().status(), 200);
            (first, Ok(second))
        }
        res = &mut call => {
            let res = res.unwrap().unwrap();
            assert_eq!(res.status(), 401);
            let why = *res.extensions().get::<NotReplayed>().expect("no NotReplayed mark");
            (first, Err(why))
        }
    }
}

/// Chunks of sizes on both sides of 16 KiB, empty frames among them, each filled with
/// its own byte; `wait`: a pause before each (streamed) or none (ready in full).
/// `taken`: under the 64 KiB read ahead, so that a body ready in full is taken whole.
fn mixed(wait: bool, exact: bool, taken: bool) -> (Steps, Vec<u8>) {
    let sizes: &[usize] = if taken {
        &[100, 20_000, 50, 0, 10, 16_384, 1, 0, 7]
    } else {
        &[100, 20_000, 50, 0, 10, 16_384, 1, 0, 16_383, 17_000, 7]
    };
    let sizes = sizes.iter().copied();
    let mut steps = VecDeque::new();
    let mut whole = Vec::new();
    for (i, n) in sizes.into_iter().enumerate() {
        let chunk = vec![b'a' + i as u8; n];
        whole.extend_from_slice(&chunk);
        if wait {
            steps.push_back(Step::Wait);
        }
        steps.push_back(Step::Frame(Frame::data(Bytes::from(chunk))));
    }
    let len = whole.len() as u64;
    (
        Steps {
            steps,
            exact: exact.then_some(len),
        },
        whole,
    )
}

/// World: an upload of chunks large and small (all copied, in 64 KiB segments),
/// empty frames among them, ready in full or streamed, stating its length or not, under a
/// replay limit exactly its size, then one byte smaller. Proves: "the replay
/// carries exactly what the first attempt put on the wire" (same bytes in the same
/// order, the same stated length), and the limit's edge (within: replayed; past:
/// `BodyTooLarge`).
#[tokio::test]
async fn interleaved_large_and_small_chunks_replay_in_order_at_the_limit() {
    let mut broken = Vec::new();
    for (wait, exact, taken) in (0..8).map(|i| (i & 1 != 0, i & 2 != 0, i & 4 != 0)) {
        {
            let (body, whole) = mixed(wait, exact, taken);
            let limit = whole.len();
            let (first, replay) = both_attempts(body, limit).await;
            let what =
                format!("streamed {wait}, exact {exact}, under 64 KiB {taken}, limit {limit}");
            if first.bytes != whole {
                broken.push(format!("{what}: the first attempt's bytes differ"));
            }
            match replay {
                Ok(replay) if replay == first => {}
                Ok(replay) => broken.push(format!(
                    "{what}: the replay differs: exact {:?} vs {:?}, {} vs {} bytes, same bytes {}",
                    replay.exact,
                    first.exact,
                    replay.bytes.len(),
                    first.bytes.len(),
                    replay.bytes == first.bytes
                )),
                Err(why) => broken.push(format!("{what}: not replayed at the limit: {why:?}")),
            }
            let (body, _) = mixed(wait, exact, taken);
            let (_, past) = both_attempts(body, limit - 1).await;
            if past.as_ref().err() != Some(&NotReplayed::BodyTooLarge) {
                broken.push(format!(
                    "{what}: one byte past the limit: {:?}",
                    past.map(|s| s.bytes.len())
                ));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// World: a body that states its exact length and gives its data and trailers ready in
/// full (taken whole before sending), or streamed. Proves: `exact` on the replay
/// ("a replayed or taken-whole body states an exact length only when the original body
/// did") and trailers kept: each attempt states the same length and gives the same
/// trailers, as the inner service (hyper over HTTP/2, which sends both) reads them.
#[tokio::test]
async fn a_body_of_exact_length_with_trailers_is_given_alike_on_both_attempts() {
    let mut broken = Vec::new();
    for wait in [false, true] {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let mut steps = VecDeque::new();
        if wait {
            steps.push_back(Step::Wait);
        }
        steps.push_back(Step::Frame(Frame::data(Bytes::from_static(b"abcd"))));
        if wait {
            steps.push_back(Step::Wait);
        }
        steps.push_back(Step::Frame(Frame::trailers(trailers)));
        let body = Steps {
            steps,
            exact: Some(4),
        };
        let (first, replay) = both_attempts(body, 1024).await;
        println!("streamed {wait}: first {first:?}; replay {replay:?}");
        match replay {
            Ok(replay) if replay == first => {}
            other => broken.push(format!(
                "streamed {wait}: first {first:?}, replay {other:?}"
            )),
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// World: a body that states its exact length (9, `abcdefghi`, ready in full) sent with
/// a `Content-Length: 6` header set by hand, over HTTP/1.1 to an API that rejects the
/// first attempt. hyper trusts the header over the body's hint. Proves: README's
/// "One that gives more bytes than it declared (HTTP/1.1 cuts it short) ... is not
/// replayed (`NotReplayed::BodyFailed`)" (said of a stream of unknown length), and "the
/// replay carries exactly what the first attempt put on the wire". The replay,
/// if there is one, carries what the first attempt carried, as hyper sends it without
/// the layer.
#[tokio::test]
async fn an_exact_body_longer_than_its_content_length_header_replays_what_was_sent() {
    use http::StatusCode;
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};
    let (base, log) = support::logging_api(|_, auth, _| {
        if auth == "Bearer token-1" {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::OK
        }
    })
    .await;
    let body = || Steps {
        steps: [Step::Frame(Frame::data(Bytes::from_static(b"abcdefghi")))].into(),
        exact: Some(9),
    };
    let plain = Client::builder(TokioExecutor::new()).build_http::<Steps>();
    let req = Request::post(format!("{base}/plain"))
        .header("content-length", "6")
        .body(body())
        .unwrap();
    let plain_outcome = plain.request(req).await.map(|r| r.status());
    let client = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Steps>>();
    let svc = AuthLayer::new(TestSource::new())
        .any_https_origin()
        .allow_http_loopback(true)
        .layer(client);
    let req = Request::post(format!("{base}/layer"))
        .header("content-length", "6")
        .body(body())
        .unwrap();
    let res = svc.oneshot(req).await;
    let outcome = res
        .as_ref()
        .map(|r| (r.status(), r.extensions().get::<NotReplayed>().copied()))
        .map_err(|e| e.to_string());
    let seen: Vec<(String, String, String)> = log
        .lock()
        .unwrap()
        .iter()
        .map(|(p, a, b)| {
            (
                p.clone(),
                a.clone(),
                String::from_utf8_lossy(b).into_owned(),
            )
        })
        .collect();
    println!("without the layer: {plain_outcome:?}; through it: {outcome:?}; seen {seen:?}");
    let layer: Vec<_> = seen.iter().filter(|(p, _, _)| p == "/layer").collect();
    assert!(
        layer.windows(2).all(|w| w[0].2 == w[1].2),
        "the replay carried other bytes than the first attempt: {seen:?}"
    );
}

/// `sizes` as a [`Steps`] body, each chunk of its own byte; `wait` a pause before each,
/// `exact` its length stated, `trailers` a trailer frame after the data.
fn sized(sizes: &[usize], wait: bool, exact: bool, trailers: bool) -> (Steps, Vec<u8>) {
    let mut steps = VecDeque::new();
    let mut whole = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let chunk: Vec<u8> = (0..n).map(|j| (i * 31 + j) as u8).collect();
        whole.extend_from_slice(&chunk);
        if wait {
            steps.push_back(Step::Wait);
        }
        steps.push_back(Step::Frame(Frame::data(Bytes::from(chunk))));
    }
    if trailers {
        let mut map = HeaderMap::new();
        map.insert("x-sum", "1".parse().unwrap());
        steps.push_back(Step::Frame(Frame::trailers(map)));
    }
    let len = whole.len() as u64;
    (
        Steps {
            steps,
            exact: exact.then_some(len),
        },
        whole,
    )
}

/// World: bodies at the 64 KiB copy segment's edges (one chunk of exactly 64 KiB, one
/// a byte over, chunks that cross a segment boundary, chunks that end exactly on one
/// and then a one-byte chunk), an empty body, a body of empty frames only, each ready
/// in full or streamed, stating its length or not, with trailers or not, under a limit
/// exactly its size, its trailers counted (and, for bodies over 64 KiB, a limit of 4 segments). Promise
/// probed: "The replay must carry exactly the bytes the first attempt sent, in order"
/// with `Kept` (9ce36e1) and `ReplayHandle::Whole { kept }` (6a9abec).
#[tokio::test]
async fn bodies_at_segment_edges_replay_what_the_first_attempt_sent() {
    const S: usize = 64 * 1024;
    let shapes: &[&[usize]] = &[
        &[S],
        &[S + 1],
        &[S - 1, 1],
        &[S - 1, 2, S],
        &[40_000, 40_000, 40_000],
        &[S, S, 1],
        &[1, S, S - 1, 0, 3],
        &[],
        &[0, 0, 0],
        &[0],
        &[5],
    ];
    let mut broken = Vec::new();
    for shape in shapes {
        for i in 0..8 {
            let (wait, exact, trailers) = (i & 1 != 0, i & 2 != 0, i & 4 != 0);
            let (_, whole) = sized(shape, wait, exact, trailers);
            // The trailers count against the limit: name, value and 32 bytes.
            let room = if trailers { "x-sum".len() + 1 + 32 } else { 0 };
            for limit in [whole.len().max(1) + room, 4 * S] {
                let (body, _) = sized(shape, wait, exact, trailers);
                let (first, replay) = both_attempts(body, limit).await;
                let what = format!(
                    "{shape:?} streamed {wait} exact {exact} trailers {trailers} limit {limit}"
                );
                if first.bytes != whole {
                    broken.push(format!("{what}: the first attempt's bytes differ"));
                }
                match replay {
                    Ok(replay) if replay == first => {}
                    Ok(replay) => broken.push(format!(
                        "{what}: the replay differs: exact {:?} vs {:?}, {} vs {} bytes, same bytes {}, trailers {:?} vs {:?}",
                        replay.exact,
                        first.exact,
                        replay.bytes.len(),
                        first.bytes.len(),
                        replay.bytes == first.bytes,
                        replay.trailers,
                        first.trailers
                    )),
                    Err(why) => broken.push(format!("{what}: not replayed: {why:?}")),
                }
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}
