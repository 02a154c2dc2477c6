//! The 401 path and body replay, edge by edge: a request that brings one header of a
//! several-header credential, a 401 through a layer below that rewrites the URI, a replay
//! whose new credential cannot be attached, and bodies at their edges.

use crate::support;

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response, header::AUTHORIZATION};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, StreamBody};
use support::{Fed, TestSource, get};
use tower::{Layer, ServiceExt};
use tower_client_auth::{AuthLayer, Credential, NotReplayed, ReplayBody};
use tower_test::mock;

type Req = Request<ReplayBody<Full<Bytes>>>;

fn status(code: u16) -> Response<&'static str> {
    Response::builder().status(code).body("").unwrap()
}

fn auth<B>(req: &Request<B>) -> String {
    req.headers()[AUTHORIZATION].to_str().unwrap().to_owned()
}

async fn read_body<B: Body>(body: B) -> Vec<u8>
where
    B::Error: std::fmt::Debug,
{
    body.collect().await.unwrap().to_bytes().to_vec()
}

/// A source of a two-header credential: `Authorization: Bearer token-N` and `x-tenant`.
fn two_header_source() -> (
    impl tower_client_auth::CredentialSource + Clone,
    Arc<AtomicUsize>,
) {
    let issued = Arc::new(AtomicUsize::new(0));
    let counter = issued.clone();
    let source = tower_client_auth::source_fn(move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            Credential::from_headers([
                (AUTHORIZATION, format!("Bearer token-{n}").parse().unwrap()),
                ("x-tenant".parse().unwrap(), "ours".parse().unwrap()),
            ])
        }
    });
    (source, issued)
}

/// World: a request that brings its own `Authorization` through a layer whose credential
/// is `Authorization` + `x-tenant`; the API rejects *their* `Authorization`.
/// Proves (review 65: our token was invalidated, refetched, and the request replayed
/// with theirs): a request not wholly ours is not judged: nothing invalidated, no
/// replay.
#[tokio::test]
async fn own_authorization_beside_a_two_header_credential_is_not_ours() {
    let (source, issued) = two_header_source();
    let (inner, mut api) = mock::pair::<Req, Response<&'static str>>();
    let svc = AuthLayer::new(source).any_https_origin().layer(inner);
    let mut req = get("/v1/me");
    req.headers_mut()
        .insert(AUTHORIZATION, "Basic dXNlcjpwYXNz".parse().unwrap());
    let call = tokio::spawn(svc.oneshot(req));
    let (first, reply) = api.next_request().await.unwrap();
    assert_eq!(auth(&first), "Basic dXNlcjpwYXNz", "theirs is kept");
    reply.send_response(status(401));
    // If the layer judged it as ours, a replay comes (with *their* Authorization again).
    let replayed = tokio::time::timeout(std::time::Duration::from_millis(200), api.next_request())
        .await
        .ok()
        .flatten();
    if let Some((again, reply)) = replayed {
        let a = auth(&again);
        reply.send_response(status(401));
        let _ = call.await;
        panic!(
            "the request's own credential was rejected, yet the layer invalidated ours \
             (fetches: {}) and replayed the request (replay's Authorization: {a})",
            issued.load(Ordering::SeqCst)
        );
    }
    let res = call.await.unwrap().unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(issued.load(Ordering::SeqCst), 1, "ours was invalidated");
}

/// As above, through `Direct` (replay off): the 401 invalidates nothing.
#[tokio::test]
async fn own_authorization_beside_a_two_header_credential_is_not_ours_direct() {
    let (source, issued) = two_header_source();
    let (inner, mut api) = mock::pair::<Request<Full<Bytes>>, Response<&'static str>>();
    let layer = AuthLayer::new(source).any_https_origin().without_replay();
    let svc = layer.layer(inner);
    let mut req = get("/v1/me");
    req.headers_mut()
        .insert(AUTHORIZATION, "Basic dXNlcjpwYXNz".parse().unwrap());
    let call = tokio::spawn(svc.clone().oneshot(req));
    let (first, reply) = api.next_request().await.unwrap();
    assert_eq!(auth(&first), "Basic dXNlcjpwYXNz");
    reply.send_response(status(401));
    let res = call.await.unwrap().unwrap();
    assert_eq!(res.status(), 401);
    // The next request of ours: still token-1, nothing fetched.
    let call = tokio::spawn(svc.oneshot(get("/v1/me")));
    let (next, reply) = api.next_request().await.unwrap();
    let a = auth(&next);
    reply.send_response(status(200));
    call.await.unwrap().unwrap();
    assert_eq!(
        (a.as_str(), issued.load(Ordering::SeqCst)),
        ("Bearer token-1", 1),
        "their credential's 401 invalidated ours"
    );
}

type Streamed =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// Proves: a streamed body that ends exactly at the limit is replayed byte for byte; one
/// byte more is not replayed.
#[tokio::test]
async fn a_streamed_body_exactly_at_the_limit_replays_one_more_byte_does_not() {
    for (len, replayed) in [(8usize, true), (9, false)] {
        let source = TestSource::new();
        let (inner, mut api) =
            mock::pair::<Request<ReplayBody<Streamed>>, Response<&'static str>>();
        let svc = AuthLayer::new(source.clone())
            .any_https_origin()
            .replay_limit(8)
            .layer(inner);
        let bytes: Vec<u8> = (0..len as u8).collect();
        let chunks: Vec<Result<Frame<Bytes>, Infallible>> = bytes
            .chunks(3)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        let req = Request::put("https://api.test/blob")
            .body(StreamBody::new(futures_util::stream::iter(chunks)))
            .unwrap();
        let call = tokio::spawn(svc.oneshot(req));
        let (req, reply) = api.next_request().await.unwrap();
        assert_eq!(read_body(req.into_body()).await, bytes);
        reply.send_response(status(401));
        if replayed {
            let (req, reply) = api.next_request().await.unwrap();
            assert_eq!(auth(&req), "Bearer token-2");
            assert_eq!(read_body(req.into_body()).await, bytes);
            reply.send_response(status(200));
            assert_eq!(call.await.unwrap().unwrap().status(), 200);
        } else {
            let res = call.await.unwrap().unwrap();
            assert_eq!(res.status(), 401);
            assert_eq!(
                res.extensions().get::<NotReplayed>(),
                Some(&NotReplayed::BodyTooLarge)
            );
        }
    }
}

/// A body whose size hint lies: it says exactly `declared` bytes, and gives `chunks`.
struct Liar {
    chunks: std::collections::VecDeque<Option<Bytes>>,
    declared: u64,
}

impl Body for Liar {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.chunks.pop_front() {
            None => Poll::Ready(None),
            Some(Some(c)) => Poll::Ready(Some(Ok(Frame::data(c)))),
            // A pause: the rest streams.
            Some(None) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.declared)
    }
}

/// Proves: a body whose exact size hint is smaller than what it gives (and, read whole,
/// within the limit) is never replayed with another body than the first attempt's.
#[tokio::test]
async fn a_body_with_a_lying_exact_hint_is_not_replayed_altered() {
    for shape in [
        vec![Some(Bytes::from_static(b"abcdef"))],
        vec![
            None,
            Some(Bytes::from_static(b"abc")),
            None,
            Some(Bytes::from_static(b"def")),
        ],
        vec![
            Some(Bytes::from_static(b"ab")),
            None,
            Some(Bytes::from_static(b"cdef")),
        ],
    ] {
        let source = TestSource::new();
        let (inner, mut api) = mock::pair::<Request<ReplayBody<Liar>>, Response<&'static str>>();
        let svc = AuthLayer::new(source.clone())
            .any_https_origin()
            .layer(inner);
        let req = Request::put("https://api.test/blob")
            .body(Liar {
                chunks: shape.clone().into(),
                declared: 4,
            })
            .unwrap();
        let call = tokio::spawn(svc.oneshot(req));
        let (req, reply) = api.next_request().await.unwrap();
        let first_hint = req.body().size_hint().exact();
        let first = read_body(req.into_body()).await;
        reply.send_response(status(401));
        match tokio::time::timeout(std::time::Duration::from_millis(200), api.next_request()).await
        {
            Ok(Some((req, reply))) => {
                let hint = req.body().size_hint().exact();
                let second = read_body(req.into_body()).await;
                reply.send_response(status(200));
                let _ = call.await;
                assert_eq!(
                    (first_hint, &first),
                    (hint, &second),
                    "{shape:?}: replayed with another body or framing"
                );
            }
            _ => {
                let res = call.await.unwrap().unwrap();
                assert_eq!(res.status(), 401);
                assert!(res.extensions().get::<NotReplayed>().is_some());
            }
        }
    }
}

/// The layer under test, its source gated (its first fetch let through), over a mock
/// API.
type Gated = tower_client_auth::AddCredential<mock::Mock<Req, Response<&'static str>>, TestSource>;

fn over_a_gated_source() -> (TestSource, Gated, mock::Handle<Req, Response<&'static str>>) {
    let source = TestSource::gated(None);
    source.release(1);
    let (inner, api) = mock::pair::<Req, Response<&'static str>>();
    let svc = AuthLayer::new(source.clone())
        .any_https_origin()
        .layer(inner);
    (source, svc, api)
}

/// A layer over a gated source (its first fetch let through) and a mock API; a request
/// whose `token-1` the API rejects, its replay now waiting for the refetch (`token-2`,
/// held at the gate until the test releases it). The API mock and the call with it.
async fn rejected_while_the_refetch_waits() -> (
    TestSource,
    Gated,
    mock::Handle<Req, Response<&'static str>>,
    tokio::task::JoinHandle<Result<Response<&'static str>, tower_client_auth::BoxError>>,
) {
    let (source, svc, mut api) = over_a_gated_source();
    let call = tokio::spawn(svc.clone().oneshot(get("/v1/me")));
    let (_req, reply) = api.next_request().await.unwrap();
    reply.send_response(status(401));
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    (source, svc, api, call)
}

/// Proves: dropping the caller's future while the replay waits for its new credential
/// leaves the cache whole: the one fetch finishes, the next request uses its result.
#[tokio::test]
async fn a_caller_gone_mid_replay_costs_nothing_more() {
    let (source, svc, mut api, call) = rejected_while_the_refetch_waits().await;
    assert_eq!(source.fetches(), 2);
    call.abort();
    let _ = call.await;
    source.release(1);
    let call = tokio::spawn(svc.oneshot(get("/v1/me")));
    let (req, reply) = api.next_request().await.unwrap();
    assert_eq!(auth(&req), "Bearer token-2");
    reply.send_response(status(200));
    call.await.unwrap().unwrap();
    assert_eq!(source.fetches(), 2);
    assert!(!matches!(api.next_request().now_or_never(), Some(Some(_))));
}

/// Proves: a late 401 for token-1, arriving after token-2 replaced it (and token-2 has
/// been accepted), invalidates nothing: the late request replays with token-2.
#[tokio::test]
async fn a_late_401_for_an_old_generation_leaves_the_new_one() {
    let source = TestSource::new();
    let (inner, mut api) = mock::pair::<Req, Response<&'static str>>();
    let svc = AuthLayer::new(source.clone())
        .any_https_origin()
        .layer(inner);
    let slow = tokio::spawn(svc.clone().oneshot(get("/slow")));
    let (slow_req, slow_reply) = api.next_request().await.unwrap();
    assert_eq!(auth(&slow_req), "Bearer token-1");
    let fast = tokio::spawn(svc.clone().oneshot(get("/fast")));
    let (req, reply) = api.next_request().await.unwrap();
    assert_eq!(auth(&req), "Bearer token-1");
    reply.send_response(status(401));
    let (req, reply) = api.next_request().await.unwrap();
    assert_eq!(auth(&req), "Bearer token-2");
    reply.send_response(status(200));
    fast.await.unwrap().unwrap();
    slow_reply.send_response(status(401));
    let (req, reply) = api.next_request().await.unwrap();
    assert_eq!(auth(&req), "Bearer token-2");
    reply.send_response(status(200));
    slow.await.unwrap().unwrap();
    assert_eq!(source.fetches(), 2);
}

/// World: a source whose credential changes cookie name (`session`, then `sid`), and a
/// request that brings its own `sid` cookie: the first attempt merges ours; the replay's
/// credential cannot go on (their `sid` is kept, PassThrough). Proves (review 65: the
/// replay went with no credential of ours): the 401 comes back marked
/// `NotReplayed::CredentialNotAttachable`, nothing sent bare.
#[tokio::test]
async fn a_replay_whose_credential_cannot_be_attached_is_not_sent_bare() {
    let issued = Arc::new(AtomicUsize::new(0));
    let source = {
        let issued = issued.clone();
        tower_client_auth::source_fn(move |_| {
            let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                match n {
                    1 => Credential::cookie("session", "ours-1"),
                    _ => Credential::cookie("sid", format!("ours-{n}")),
                }
            }
        })
    };
    let (inner, mut api) = mock::pair::<Req, Response<&'static str>>();
    let svc = AuthLayer::new(source).any_https_origin().layer(inner);
    let mut req = get("/v1/me");
    req.headers_mut()
        .insert(http::header::COOKIE, "sid=theirs".parse().unwrap());
    let call = tokio::spawn(svc.oneshot(req));
    let (first, reply) = api.next_request().await.unwrap();
    assert_eq!(
        first.headers()[http::header::COOKIE],
        "sid=theirs; session=ours-1"
    );
    reply.send_response(status(401));
    match tokio::time::timeout(std::time::Duration::from_millis(200), api.next_request()).await {
        Ok(Some((replay, reply))) => {
            let cookie = replay.headers()[http::header::COOKIE]
                .to_str()
                .unwrap()
                .to_owned();
            reply.send_response(status(401));
            let _ = call.await;
            assert!(
                cookie.contains("ours-2"),
                "replayed without the new credential: Cookie: {cookie}"
            );
        }
        _ => {
            let res = call.await.unwrap().unwrap();
            assert_eq!(res.status(), 401);
        }
    }
}

/// Proves: the replay's service fails `poll_ready`: the caller gets an error (no hang,
/// no third attempt), and the new credential stays for the next request.
#[tokio::test]
async fn a_replay_whose_service_fails_to_get_ready_fails_cleanly() {
    let (source, _svc, mut api, call) = rejected_while_the_refetch_waits().await;
    api.send_error("balancer has no endpoint");
    source.release(1);
    let res = tokio::time::timeout(std::time::Duration::from_secs(2), call)
        .await
        .expect("hung")
        .unwrap();
    let err = res.unwrap_err();
    assert!(err.to_string().contains("no endpoint"), "{err}");
    assert!(!matches!(api.next_request().now_or_never(), Some(Some(_))));
    assert_eq!(source.fetches(), 2);
}

/// `own_authorization_beside_a_two_header_credential_is_not_ours` through the reqwest
/// adapter: a request that brings its own `Authorization`, answered 401 by a real server.
#[cfg(feature = "reqwest")]
#[tokio::test]
async fn own_authorization_beside_a_two_header_credential_is_not_ours_reqwest() {
    let (addr, seen) = support::recording_api(http::StatusCode::UNAUTHORIZED, |r| {
        r.headers()
            .get("x-tenant")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    })
    .await;
    let (source, issued) = two_header_source();
    let auth = tower_client_auth::reqwest::AuthMiddleware::new(source)
        .origin(format!("http://{addr}"))
        .unwrap()
        .allow_http_loopback(true)
        .client_without_proxy();
    let client = reqwest_middleware::ClientBuilder::new(
        reqwest::Client::builder().no_proxy().build().unwrap(),
    )
    .with(auth)
    .build();
    let res = client
        .get(format!("http://{addr}/v1/me"))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(
        (issued.load(Ordering::SeqCst), support::auths(&seen).len()),
        (1, 1),
        "their credential's 401 was judged as ours: {:?}",
        seen.lock().unwrap()
    );
}

/// Proves: streamed bodies, read by the API to their end before it answers 401: one with
/// trailers replays with them; an empty one replays empty; one that failed mid-way is
/// not replayed (`BodyFailed`), nothing sent a second time.
#[tokio::test]
async fn streamed_bodies_with_trailers_empty_or_failing() {
    for shape in ["trailers", "empty", "error"] {
        let source = TestSource::new();
        let (inner, mut api) = mock::pair::<Request<ReplayBody<Fed>>, Response<&'static str>>();
        let svc = AuthLayer::new(source.clone())
            .any_https_origin()
            .layer(inner);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let req = Request::post("https://api.test/up").body(Fed(rx)).unwrap();
        let call = tokio::spawn(svc.oneshot(req));
        let (mut first, reply) = api.next_request().await.unwrap();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-sum", "42".parse().unwrap());
        match shape {
            "trailers" => {
                tx.send(Ok(Frame::data(Bytes::from_static(b"ab")))).unwrap();
                tx.send(Ok(Frame::trailers(trailers.clone()))).unwrap();
            }
            "error" => {
                tx.send(Ok(Frame::data(Bytes::from_static(b"ab")))).unwrap();
                tx.send(Err("disk gone")).unwrap();
            }
            _ => {}
        }
        drop(tx);
        let mut given = Vec::new();
        while let Some(frame) = first.body_mut().frame().await {
            match frame {
                Ok(f) => given.push(f.is_data()),
                Err(_) => break,
            }
        }
        reply.send_response(status(401));
        if shape == "error" {
            let res = call.await.unwrap().unwrap();
            assert_eq!(
                res.extensions().get::<NotReplayed>(),
                Some(&NotReplayed::BodyFailed)
            );
            assert!(!matches!(api.next_request().now_or_never(), Some(Some(_))));
            continue;
        }
        let (second, reply) = api.next_request().await.unwrap();
        assert_eq!(auth(&second), "Bearer token-2", "{shape}");
        let whole = second.into_body().collect().await.unwrap();
        match shape {
            "trailers" => {
                assert_eq!(whole.trailers(), Some(&trailers));
                assert_eq!(whole.to_bytes(), "ab");
            }
            _ => assert!(whole.to_bytes().is_empty()),
        }
        reply.send_response(status(200));
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }
}

/// Proves: two 401s for token-1, the second arriving while the refetch the first started
/// is still running: one fetch, both replayed with token-2.
#[tokio::test]
async fn a_401_during_the_refetch_joins_it() {
    let (source, svc, mut api) = over_a_gated_source();
    let a = tokio::spawn(svc.clone().oneshot(get("/a")));
    let (ra, reply_a) = api.next_request().await.unwrap();
    let b = tokio::spawn(svc.clone().oneshot(get("/b")));
    let (rb, reply_b) = api.next_request().await.unwrap();
    assert_eq!(
        (auth(&ra), auth(&rb)),
        ("Bearer token-1".into(), "Bearer token-1".into())
    );
    reply_a.send_response(status(401));
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert_eq!(source.fetches(), 2);
    reply_b.send_response(status(401));
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert_eq!(source.fetches(), 2, "a second fetch beside the first");
    source.release(5);
    for _ in 0..2 {
        let (r, reply) = api.next_request().await.unwrap();
        assert_eq!(auth(&r), "Bearer token-2");
        reply.send_response(status(200));
    }
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    assert_eq!(source.fetches(), 2);
}

/// World: below the layer, a layer maps the API's name to the address it is served at
/// (`https://api.test` → `https://10.0.0.7:8443`, service discovery), then
/// `FollowRedirect` with `SameOriginCredentials`; no redirect happens. The API rejects
/// `token-1` (revoked) and takes `token-2`. Proves (review 66: a check that judged by the
/// answer's `RequestUri` took it for another origin's): the 401, about our
/// credential (carried to the one origin the request went to), is judged: a new token
/// is fetched and the request replayed; the caller gets the 200.
#[cfg(feature = "tower-http")]
#[tokio::test]
async fn a_401_from_the_uri_a_lower_layer_rewrote_is_still_ours() {
    use tower::ServiceBuilder;
    use tower_client_auth::redirect::SameOriginCredentials;
    use tower_http::follow_redirect::FollowRedirectLayer;

    let api = tower::service_fn(|req: Request<ReplayBody<Full<Bytes>>>| async move {
        let status = match auth(&req).as_str() {
            "Bearer token-1" => 401,
            _ => 200,
        };
        Ok::<_, Infallible>(
            Response::builder()
                .status(status)
                .body(String::new())
                .unwrap(),
        )
    });
    let source = TestSource::new();
    let svc = ServiceBuilder::new()
        .layer(
            AuthLayer::new(source.clone())
                .origin("https://api.test")
                .unwrap(),
        )
        .map_request(|mut req: Request<ReplayBody<Full<Bytes>>>| {
            let path = req.uri().path_and_query().unwrap().as_str().to_owned();
            *req.uri_mut() = format!("https://10.0.0.7:8443{path}").parse().unwrap();
            req
        })
        .layer(FollowRedirectLayer::with_policy(
            SameOriginCredentials::new(),
        ))
        .service(api);
    let res = svc.oneshot(get("/go")).await.unwrap();
    assert_eq!(
        (res.status().as_u16(), source.fetches()),
        (200, 2),
        "the API's 401 of our credential was not judged; extension: {:?}",
        res.extensions().get::<NotReplayed>()
    );
}
