//! Step-by-step scenarios of one request through `AuthLayer`, with `tower_test::mock`
//! standing in for the API so each exchange is observed and answered by the test.

use crate::support;

use std::convert::Infallible;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response, StatusCode, header::AUTHORIZATION};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use support::{TestSource, get, post};
use tower::{Layer, Service, ServiceExt};
use tower_client_auth::{
    AddCredential, AuthLayer, BoxError, Credential, CredentialSource, ExistingHeader, NoReplay,
    NotReplayed, ReplayBody, StaticCredential,
};
use tower_test::mock;

type Req = Request<ReplayBody<Full<Bytes>>>;

fn bearer(req: &Req) -> &str {
    req.headers()[AUTHORIZATION].to_str().unwrap()
}

fn status(code: u16) -> Response<&'static str> {
    Response::builder().status(code).body("").unwrap()
}

/// Asserts that no further request reached the API (the handle may also be closed).
fn assert_no_more_requests(api: &mut mock::Handle<Req, Response<&'static str>>) {
    let next = api.next_request().now_or_never();
    assert!(
        !matches!(next, Some(Some(_))),
        "an unexpected request reached the API"
    );
}

async fn read_body<B: http_body::Body>(body: B) -> Vec<u8>
where
    B::Error: std::fmt::Debug,
{
    body.collect().await.unwrap().to_bytes().to_vec()
}

/// A cached credential is added to the request, marked sensitive, and reused: two
/// requests, one fetch.
#[tokio::test]
async fn credential_is_added_sensitive_and_reused() {
    let source = TestSource::new();
    let (inner, mut api) = mock::pair::<Req, Response<&'static str>>();
    let svc = AuthLayer::new(source.clone())
        .any_https_origin()
        .layer(inner);

    for _ in 0..2 {
        let call = tokio::spawn(svc.clone().oneshot(get("/v1/me")));
        let (req, reply) = api.next_request().await.unwrap();
        assert_eq!(bearer(&req), "Bearer token-1");
        assert!(req.headers()[AUTHORIZATION].is_sensitive());
        reply.send_response(status(200));
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }
    assert_eq!(source.fetches(), 1);
}

/// 401 → the credential is invalidated, fetched once more, and the request (with its
/// body) replayed once with the new credential. A second 401 goes back to the caller:
/// there is never a third attempt.
#[tokio::test]
async fn rejection_refreshes_once_and_replays_once() {
    let source = TestSource::new();
    let (inner, mut api) = mock::pair::<Req, Response<&'static str>>();
    let svc = AuthLayer::new(source.clone())
        .any_https_origin()
        .layer(inner);

    let call = tokio::spawn(svc.clone().oneshot(post("/v1/orders", b"{\"qty\":1}")));
    let (req, reply) = api.next_request().await.unwrap();
    assert_eq!(bearer(&req), "Bearer token-1");
    assert_eq!(read_body(req.into_body()).await, b"{\"qty\":1}");
    reply.send_response(status(401));

    let (req, reply) = api.next_request().await.unwrap();
    assert_eq!(bearer(&req), "Bearer token-2");
    assert_eq!(req.method(), "POST");
    assert_eq!(req.uri(), "https://api.test/v1/orders");
    assert_eq!(read_body(req.into_body()).await, b"{\"qty\":1}");
    reply.send_response(status(401));

    let res = call.await.unwrap().unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(
        res.extensions().get::<NotReplayed>(),
        Some(&NotReplayed::AlreadyReplayed)
    );
    assert_eq!(source.fetches(), 2);
    tokio::task::yield_now().await;
    assert_no_more_requests(&mut api);

    // The replay's 401 did not invalidate the fresh credential: no fetch storm.
    let call = tokio::spawn(svc.clone().oneshot(get("/v1/me")));
    let (req, reply) = api.next_request().await.unwrap();
    assert_eq!(bearer(&req), "Bearer token-2");
    reply.send_response(status(200));
    call.await.unwrap().unwrap();
    assert_eq!(source.fetches(), 2);
}

/// A service clone kept for many requests (each clone remembers the entry it last
/// read) sees every change to the shared cache on its next request: a refresh made
/// through another clone, an invalidation, a replaced credential.
#[tokio::test]
async fn a_long_lived_clone_sees_every_change() {
    let source = TestSource::new();
    let (inner, mut api) = mock::pair::<Req, Response<&'static str>>();
    let layer = AuthLayer::new(source.clone()).any_https_origin();
    let svc = layer.layer(inner);
    let mut kept = svc.clone();

    async fn expect(api: &mut mock::Handle<Req, Response<&'static str>>, want: &str, answer: u16) {
        let (req, reply) = api.next_request().await.unwrap();
        assert_eq!(bearer(&req), want);
        reply.send_response(status(answer));
    }
    let send = |svc: &mut tower_client_auth::AddCredential<_, _>| {
        let call = svc.call(get("/v1/me"));
        tokio::spawn(call)
    };

    for _ in 0..2 {
        kept.ready().await.unwrap();
        let call = send(&mut kept);
        expect(&mut api, "Bearer token-1", 200).await;
        call.await.unwrap().unwrap();
    }

    // Another clone's request is rejected: token-2 replaces token-1 for everyone.
    let other = tokio::spawn(svc.clone().oneshot(get("/v1/me")));
    expect(&mut api, "Bearer token-1", 401).await;
    expect(&mut api, "Bearer token-2", 200).await;
    other.await.unwrap().unwrap();
    kept.ready().await.unwrap();
    let call = send(&mut kept);
    expect(&mut api, "Bearer token-2", 200).await;
    call.await.unwrap().unwrap();

    // Invalidated from elsewhere: the kept clone waits for a new fetch.
    assert!(layer.cache().handle().invalidate());
    kept.ready().await.unwrap();
    let call = send(&mut kept);
    expect(&mut api, "Bearer token-3", 200).await;
    call.await.unwrap().unwrap();

    // Replaced from elsewhere: used at once, without a fetch.
    let replacement = tower_client_auth::Credential::bearer("pushed").unwrap();
    assert!(layer.cache().handle().replace(replacement).unwrap());
    kept.ready().await.unwrap();
    let call = send(&mut kept);
    expect(&mut api, "Bearer pushed", 200).await;
    call.await.unwrap().unwrap();
    assert_eq!(source.fetches(), 3);
}

/// 403 means missing permissions: returned as is, no fetch, no replay.
/// A service clone kept for many requests reaches the cache through its own handle from
/// its second request on: its rejections still refresh once and replay once, and a
/// rejection it shares with another clone still costs one refresh.
#[tokio::test]
async fn a_long_lived_clones_rejections_refresh_once() {
    let source = TestSource::new();
    let (inner, mut api) = mock::pair::<Req, Response<&'static str>>();
    let svc = AuthLayer::new(source.clone())
        .any_https_origin()
        .layer(inner);
    let mut kept = svc.clone();
    // One request through the kept clone; the caller polls it ready first.
    let send = |kept: &mut tower_client_auth::AddCredential<_, _>| {
        tokio::spawn(kept.call(post("/v1/orders", b"{}")))
    };

    for _ in 0..2 {
        let call = {
            kept.ready().await.unwrap();
            send(&mut kept)
        };
        let (req, reply) = api.next_request().await.unwrap();
        assert_eq!(bearer(&req), "Bearer token-1");
        reply.send_response(status(200));
        call.await.unwrap().unwrap();
    }

    // The kept clone's third request is rejected: refreshed once, replayed once.
    let call = {
        kept.ready().await.unwrap();
        send(&mut kept)
    };
    let (req, reply) = api.next_request().await.unwrap();
    assert_eq!(bearer(&req), "Bearer token-1");
    // Read, as a client sends it (a body the API never read is not replayed).
    assert_eq!(read_body(req.into_body()).await, b"{}");
    reply.send_response(status(401));
    let (req, reply) = api.next_request().await.unwrap();
    assert_eq!(bearer(&req), "Bearer token-2");
    assert_eq!(read_body(req.into_body()).await, b"{}");
    reply.send_response(status(200));
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
    assert_eq!(source.fetches(), 2);

    // The kept clone and a fresh clone are rejected together: one refresh for both.
    let kept_call = {
        kept.ready().await.unwrap();
        send(&mut kept)
    };
    let fresh_call = tokio::spawn(svc.clone().oneshot(get("/v1/me")));
    let mut rejected = Vec::new();
    for _ in 0..2 {
        let (req, reply) = api.next_request().await.unwrap();
        assert_eq!(bearer(&req), "Bearer token-2");
        read_body(req.into_body()).await;
        rejected.push(reply);
    }
    for reply in rejected {
        reply.send_response(status(401));
    }
    for _ in 0..2 {
        let (req, reply) = api.next_request().await.unwrap();
        assert_eq!(bearer(&req), "Bearer token-3");
        reply.send_response(status(200));
    }
    assert_eq!(kept_call.await.unwrap().unwrap().status(), 200);
    assert_eq!(fresh_call.await.unwrap().unwrap().status(), 200);
    assert_eq!(source.fetches(), 3);
    assert_no_more_requests(&mut api);
}

#[tokio::test]
async fn forbidden_is_returned_without_refresh() {
    let source = TestSource::new();
    let (inner, mut api) = mock::pair::<Req, Response<&'static str>>();
    let svc = AuthLayer::new(source.clone())
        .any_https_origin()
        .layer(inner);

    let call = tokio::spawn(svc.clone().oneshot(get("/v1/admin")));
    let (_req, reply) = api.next_request().await.unwrap();
    reply.send_response(status(403));
    let res = call.await.unwrap().unwrap();
    assert_eq!(res.status(), 403);
    assert!(res.extensions().get::<NotReplayed>().is_none());
    tokio::task::yield_now().await;
    assert_eq!(source.fetches(), 1);
    assert_no_more_requests(&mut api);
}

/// Other statuses can be configured as rejections (here 419, as some session APIs use).
#[tokio::test]
async fn rejection_statuses_are_configurable() {
    let source = TestSource::new();
    let (inner, mut api) = mock::pair::<Req, Response<&'static str>>();
    let svc = AuthLayer::builder(source.clone())
        .any_https_origin()
        .rejection_statuses([StatusCode::UNAUTHORIZED, StatusCode::from_u16(419).unwrap()])
        .unwrap()
        .build()
        .unwrap()
        .layer(inner);
    let call = tokio::spawn(svc.oneshot(get("/")));
    api.next_request()
        .await
        .unwrap()
        .1
        .send_response(status(419));
    let (req, reply) = api.next_request().await.unwrap();
    assert_eq!(bearer(&req), "Bearer token-2");
    reply.send_response(status(200));
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
}

/// A request marked `NoReplay` is never sent twice; its 401 still invalidates the
/// credential, so the next request carries a fresh one.
#[tokio::test]
async fn no_replay_extension_opts_out() {
    let source = TestSource::new();
    let (inner, mut api) = mock::pair::<Req, Response<&'static str>>();
    let svc = AuthLayer::new(source.clone())
        .any_https_origin()
        .layer(inner);

    let mut req = post("/v1/payments", b"{}");
    req.extensions_mut().insert(NoReplay);
    let call = tokio::spawn(svc.clone().oneshot(req));
    let (req, reply) = api.next_request().await.unwrap();
    assert_eq!(bearer(&req), "Bearer token-1");
    reply.send_response(status(401));
    let res = call.await.unwrap().unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(
        res.extensions().get::<NotReplayed>(),
        Some(&NotReplayed::OptedOut)
    );
    tokio::task::yield_now().await;
    assert_no_more_requests(&mut api);

    let call = tokio::spawn(svc.oneshot(get("/v1/me")));
    let (req, reply) = api.next_request().await.unwrap();
    assert_eq!(bearer(&req), "Bearer token-2");
    reply.send_response(status(200));
    call.await.unwrap().unwrap();
}

/// A request that brings its own `Authorization` passes through untouched (no refresh,
/// no replay on its 401), unless the layer is told to replace it.
#[tokio::test]
async fn existing_header_passes_through_or_is_replaced() {
    let source = TestSource::new();
    let (inner, mut api) = mock::pair::<Req, Response<&'static str>>();
    let svc = AuthLayer::new(source.clone())
        .any_https_origin()
        .layer(inner);
    let mut req = get("/v1/me");
    req.headers_mut()
        .insert(AUTHORIZATION, "Basic dXNlcjpwYXNz".parse().unwrap());
    let call = tokio::spawn(svc.oneshot(req));
    let (req, reply) = api.next_request().await.unwrap();
    assert_eq!(bearer(&req), "Basic dXNlcjpwYXNz");
    reply.send_response(status(401));
    assert_eq!(call.await.unwrap().unwrap().status(), 401);
    tokio::task::yield_now().await;
    assert_no_more_requests(&mut api);
    assert_eq!(source.fetches(), 1, "only the lookup that found the header");

    let (inner, mut api) = mock::pair::<Req, Response<&'static str>>();
    let svc = AuthLayer::new(source.clone())
        .any_https_origin()
        .existing_header(ExistingHeader::Replace)
        .layer(inner);
    let mut req = get("/v1/me");
    req.headers_mut()
        .insert(AUTHORIZATION, "Basic dXNlcjpwYXNz".parse().unwrap());
    let call = tokio::spawn(svc.oneshot(req));
    let (req, reply) = api.next_request().await.unwrap();
    assert!(bearer(&req).starts_with("Bearer token-"));
    reply.send_response(status(200));
    call.await.unwrap().unwrap();
}

/// A credential of two headers (`Authorization` and `x-tenant`), a request that brings
/// its own `x-tenant` only. Proves: only the colliding header follows the existing-header
/// rule: with `ExistingHeader::PassThrough` (the default), `Authorization` is attached
/// and the request's `x-tenant` kept, and the request, not wholly ours, is not judged (its
/// 401 may be about its own header: nothing invalidated, no replay; review 65); with
/// `ExistingHeader::Replace`, ours replaces it, on the first attempt and on the replay
/// after a 401. A request that brings every header of the credential passes through.
#[tokio::test]
async fn a_colliding_header_does_not_drop_the_rest_of_the_credential() {
    let issued = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let source = {
        let issued = issued.clone();
        tower_client_auth::source_fn(move |_| {
            let n = issued.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            async move {
                Credential::from_headers([
                    (AUTHORIZATION, format!("Bearer token-{n}").parse().unwrap()),
                    ("x-tenant".parse().unwrap(), "ours".parse().unwrap()),
                ])
            }
        })
    };
    for existing in [ExistingHeader::PassThrough, ExistingHeader::Replace] {
        let (inner, mut api) = mock::pair::<Req, Response<&'static str>>();
        let svc = AuthLayer::new(source.clone())
            .any_https_origin()
            .existing_header(existing)
            .layer(inner);
        let mut req = get("/v1/me");
        req.headers_mut()
            .insert("x-tenant", "theirs".parse().unwrap());
        let call = tokio::spawn(svc.clone().oneshot(req));
        let (req, reply) = api.next_request().await.unwrap();
        assert_eq!(req.headers().get_all("x-tenant").iter().count(), 1);
        if existing == ExistingHeader::PassThrough {
            assert!(
                bearer(&req).starts_with("Bearer token-"),
                "the rest is attached"
            );
            assert_eq!(req.headers()["x-tenant"], "theirs");
            let before = issued.load(std::sync::atomic::Ordering::SeqCst);
            reply.send_response(status(401));
            let res = tokio::time::timeout(std::time::Duration::from_secs(5), call)
                .await
                .expect("judged as ours: a replay waits for its answer")
                .unwrap()
                .unwrap();
            assert_eq!(res.status(), 401);
            assert_no_more_requests(&mut api);
            assert_eq!(
                issued.load(std::sync::atomic::Ordering::SeqCst),
                before,
                "nothing invalidated"
            );
        } else {
            assert!(bearer(&req).starts_with("Bearer token-"));
            assert_eq!(req.headers()["x-tenant"], "ours");
            let first = bearer(&req).to_owned();
            reply.send_response(status(401));
            let (req, reply) = api.next_request().await.unwrap();
            assert_ne!(bearer(&req), first, "not replayed anew");
            assert_eq!(req.headers().get_all("x-tenant").iter().count(), 1);
            assert_eq!(req.headers()["x-tenant"], "ours", "on the replay");
            reply.send_response(status(200));
            assert_eq!(call.await.unwrap().unwrap().status(), 200);
        }

        // Every header of the credential brought by the request: theirs, untouched.
        let mut req = get("/v1/me");
        req.headers_mut()
            .insert(AUTHORIZATION, "Basic dXNlcjpwYXNz".parse().unwrap());
        req.headers_mut()
            .insert("x-tenant", "theirs".parse().unwrap());
        let call = tokio::spawn(svc.oneshot(req));
        let (req, reply) = api.next_request().await.unwrap();
        if existing == ExistingHeader::PassThrough {
            assert_eq!(bearer(&req), "Basic dXNlcjpwYXNz");
            assert_eq!(req.headers()["x-tenant"], "theirs");
        } else {
            assert!(bearer(&req).starts_with("Bearer token-"));
            assert_eq!(req.headers()["x-tenant"], "ours");
        }
        reply.send_response(status(200));
        call.await.unwrap().unwrap();
    }
}

/// A body over the replay limit streams through whole, but its 401 reaches the caller as
/// it came, marked `BodyTooLarge`. The refresh still happens for the next request.
#[tokio::test]
async fn over_limit_body_is_not_replayed() {
    let source = TestSource::new();
    let (inner, mut api) = mock::pair::<Req, Response<&'static str>>();
    let svc = AuthLayer::new(source.clone())
        .any_https_origin()
        .replay_limit(4)
        .layer(inner);

    let call = tokio::spawn(svc.oneshot(post("/upload", b"0123456789")));
    let (req, reply) = api.next_request().await.unwrap();
    assert_eq!(read_body(req.into_body()).await, b"0123456789");
    reply.send_response(status(401));
    let res = call.await.unwrap().unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(
        res.extensions().get::<NotReplayed>(),
        Some(&NotReplayed::BodyTooLarge)
    );
    tokio::task::yield_now().await;
    assert_no_more_requests(&mut api);
    assert_eq!(
        source.fetches(),
        2,
        "the rejected credential was still replaced"
    );
}

/// The API answered before reading the body (a gRPC interceptor, an auth check ahead of
/// the handler), but the body was ready in full when the request was sent: it was taken
/// whole then, so the request is replayed, body and all. (Before, this depended on
/// whether the connection had read the body's end before the answer came: tonic's
/// unary call lost its replay about one time in ten.)
#[tokio::test]
async fn a_body_ready_in_full_is_replayed_though_the_api_answered_before_reading_it() {
    let source = TestSource::new();
    let (inner, mut api) = mock::pair::<Req, Response<&'static str>>();
    let svc = AuthLayer::new(source.clone())
        .any_https_origin()
        .layer(inner);
    let call = tokio::spawn(svc.oneshot(post("/upload", b"abc")));
    let (unread, reply) = api.next_request().await.unwrap();
    let first = bearer(&unread).to_owned();
    reply.send_response(status(401));
    let (req, reply) = api.next_request().await.unwrap();
    assert_ne!(bearer(&req), first, "replayed with a new credential");
    assert_eq!(read_body(req.into_body()).await, b"abc");
    reply.send_response(status(200));
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
    assert_eq!(source.fetches(), 2);
    // The first attempt's body still reads whole, for a connection that sends it late.
    assert_eq!(read_body(unread.into_body()).await, b"abc");
}

type Piped = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// A body that streams from a channel: what was sent before the request is ready, the
/// rest comes later.
fn piped() -> (tokio::sync::mpsc::UnboundedSender<&'static [u8]>, Piped) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<&'static [u8]>();
    let frames = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|c| c.map(|c| Ok(Frame::data(Bytes::from_static(c)))))
    });
    (tx, StreamBody::new(frames).boxed_unsync())
}

/// The API answered while the body was still streaming (its rest not produced yet): the
/// rest is the first attempt's, so the 401 goes back to the caller, marked
/// `BodyIncomplete`, and the part already taken is sent whole to the first attempt.
#[tokio::test]
async fn a_body_still_streaming_when_the_api_answers_is_not_replayed() {
    let (inner, mut api) = mock::pair::<Request<ReplayBody<Piped>>, Response<&'static str>>();
    let svc = AuthLayer::new(TestSource::new())
        .any_https_origin()
        .layer(inner);
    let (tx, body) = piped();
    tx.send(b"ab").unwrap();
    let req = Request::post("https://api.test/upload").body(body).unwrap();
    let call = tokio::spawn(svc.oneshot(req));
    let (unread, reply) = api.next_request().await.unwrap();
    reply.send_response(status(401));
    let res = call.await.unwrap().unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(
        res.extensions().get::<NotReplayed>(),
        Some(&NotReplayed::BodyIncomplete)
    );
    tx.send(b"cd").unwrap();
    drop(tx);
    assert_eq!(read_body(unread.into_body()).await, b"abcd");
}

type Streamed =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// A body that arrives in many chunks is streamed through and replayed byte for byte.
#[tokio::test]
async fn streamed_body_is_replayed_byte_for_byte() {
    let source = TestSource::new();
    let (inner, mut api) = mock::pair::<Request<ReplayBody<Streamed>>, Response<&'static str>>();
    let svc = AuthLayer::new(source.clone())
        .any_https_origin()
        .layer(inner);
    let chunks: Vec<Result<Frame<Bytes>, Infallible>> = (0..100u8)
        .map(|i| Ok(Frame::data(Bytes::from(vec![i; 100]))))
        .collect();
    let expected: Vec<u8> = (0..100u8).flat_map(|i| vec![i; 100]).collect();
    let req = Request::put("https://api.test/blob")
        .body(StreamBody::new(futures_util::stream::iter(chunks)))
        .unwrap();
    let call = tokio::spawn(svc.oneshot(req));
    let (req, reply) = api.next_request().await.unwrap();
    assert_eq!(read_body(req.into_body()).await, expected);
    reply.send_response(status(401));
    let (req, reply) = api.next_request().await.unwrap();
    assert_eq!(req.headers()[AUTHORIZATION], "Bearer token-2");
    assert_eq!(read_body(req.into_body()).await, expected);
    reply.send_response(status(201));
    assert_eq!(call.await.unwrap().unwrap().status(), 201);
}

/// Errors of the inner service reach the caller as they came (downcastable).
#[tokio::test]
async fn inner_errors_pass_through() {
    let (inner, mut api) = mock::pair::<Req, Response<&'static str>>();
    let svc = AuthLayer::new(StaticCredential::bearer("pat").unwrap())
        .any_https_origin()
        .layer(inner);
    let call = tokio::spawn(svc.oneshot(get("/")));
    let (_req, reply) = api.next_request().await.unwrap();
    reply.send_error(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "reset",
    ));
    let err: BoxError = call.await.unwrap().unwrap_err();
    let io = err
        .downcast_ref::<std::io::Error>()
        .expect("the inner error, unchanged");
    assert_eq!(io.kind(), std::io::ErrorKind::ConnectionReset);
}

/// A static credential with a value a header cannot carry is refused when it is built:
/// it never reaches a request, a fetch or the backoff path.
#[test]
fn invalid_static_credential_is_refused_when_built() {
    for invalid in [
        StaticCredential::bearer("bad\ntoken").err(),
        StaticCredential::with_scheme("Secret", "a\u{7f}b").err(),
        StaticCredential::with_scheme("Sec ret", "s").err(),
        StaticCredential::cookie("na;me", "v").err(),
        StaticCredential::cookie("name", "v\r\n").err(),
        StaticCredential::header("x api key", "k").err(),
        StaticCredential::header("x-api-key", "").err(),
    ] {
        let err = invalid.expect("refused when built");
        assert!(!err.to_string().is_empty());
    }
    assert!(StaticCredential::header("x-api-key", "k-123").is_ok());
}

/// A request whose header map is full (`http`'s `MAX_SIZE`) gets a typed error instead of
/// a panic, and is not sent without its credential.
#[tokio::test]
async fn full_header_map_is_a_typed_error() {
    let source = TestSource::new();
    let (inner, mut api) = mock::pair::<Req, Response<&'static str>>();
    let svc = AuthLayer::new(source).any_https_origin().layer(inner);
    let mut req = get("/v1/me");
    for i in 0.. {
        let name = http::HeaderName::try_from(format!("x-filler-{i}")).unwrap();
        if req
            .headers_mut()
            .try_append(name, http::HeaderValue::from_static("1"))
            .is_err()
        {
            break;
        }
    }
    let err = svc.oneshot(req).await.unwrap_err();
    let err = err.downcast_ref::<tower_client_auth::Error>().unwrap();
    assert_eq!(err.kind(), tower_client_auth::ErrorKind::HeadersFull);
    tokio::task::yield_now().await;
    assert_no_more_requests(&mut api);
}

/// A static credential cannot change, so its 401 comes back at once: no refetch, no
/// second request carrying the same credential into the same rejection, no head kept.
#[tokio::test]
async fn static_credential_rejection_is_not_replayed() {
    let (inner, mut api) = mock::pair::<Req, Response<&'static str>>();
    let layer = AuthLayer::new(StaticCredential::bearer("pat").unwrap()).any_https_origin();
    let svc = layer.layer(inner);
    let call = tokio::spawn(svc.clone().oneshot(post("/v1/orders", b"{}")));
    let (req, reply) = api.next_request().await.unwrap();
    assert_eq!(bearer(&req), "Bearer pat");
    reply.send_response(status(401));
    let res = call.await.unwrap().unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(
        res.extensions().get::<NotReplayed>(),
        Some(&NotReplayed::FixedCredential)
    );
    tokio::task::yield_now().await;
    assert_no_more_requests(&mut api);
    let stats = layer.cache().stats();
    assert_eq!((stats.fetches, stats.rejections, stats.replays), (1, 0, 0));

    // The next request still carries it: nothing was invalidated.
    let call = tokio::spawn(svc.oneshot(get("/v1/me")));
    let (req, reply) = api.next_request().await.unwrap();
    assert_eq!(bearer(&req), "Bearer pat");
    reply.send_response(status(200));
    call.await.unwrap().unwrap();
    assert_eq!(layer.cache().stats().fetches, 1);
}

/// A cookie credential joins the request's own cookies in one `Cookie` header; only a
/// cookie of the same name counts as already present (then the request goes as it
/// came); a replay joins the new cookie to the request's own again.
#[tokio::test]
async fn cookie_credentials_merge_with_the_requests_cookies() {
    use http::header::COOKIE;
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let source = tower_client_auth::source_fn({
        let n = n.clone();
        move |_cx| {
            let v = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            async move { tower_client_auth::Credential::cookie("session", format!("v{v}")) }
        }
    })
    .refresh_mode(tower_client_auth::RefreshMode::ReactiveOnly);
    let (inner, mut api) = mock::pair::<Req, Response<&'static str>>();
    let mut svc = AuthLayer::new(source).any_https_origin().layer(inner);
    let with_cookies = |cookies: &[&str]| {
        let mut req = get("/v1/me");
        for c in cookies {
            req.headers_mut().append(COOKIE, c.parse().unwrap());
        }
        req
    };
    let cookies = |req: &Req| -> Vec<String> {
        req.headers()
            .get_all(COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    };

    // Theirs and ours, one header.
    svc.ready().await.unwrap();
    let call = tokio::spawn(svc.call(with_cookies(&["a=1", "b=2; c=3"])));
    let (req, reply) = api.next_request().await.unwrap();
    assert_eq!(cookies(&req), ["a=1; b=2; c=3; session=v1"]);
    assert!(req.headers()[COOKIE].is_sensitive());
    reply.send_response(status(200));
    call.await.unwrap().unwrap();

    // Their own `session` cookie: untouched.
    svc.ready().await.unwrap();
    let call = tokio::spawn(svc.call(with_cookies(&["a=1; session=theirs"])));
    let (req, reply) = api.next_request().await.unwrap();
    assert_eq!(cookies(&req), ["a=1; session=theirs"]);
    reply.send_response(status(200));
    call.await.unwrap().unwrap();

    // Rejected: the replay joins the new cookie to theirs.
    svc.ready().await.unwrap();
    let call = tokio::spawn(svc.call(with_cookies(&["a=1"])));
    let (req, reply) = api.next_request().await.unwrap();
    assert_eq!(cookies(&req), ["a=1; session=v1"]);
    reply.send_response(status(401));
    let (req, reply) = api.next_request().await.unwrap();
    assert_eq!(cookies(&req), ["a=1; session=v2"]);
    reply.send_response(status(200));
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
}

/// tower-http's conventions: `Type::new`, `Type::layer`, the inner service's accessors,
/// and `Debug` that asks nothing of the source.
#[tokio::test]
async fn the_service_follows_tower_http_conventions() {
    /// A source that is not `Debug`.
    struct Opaque;
    impl tower_client_auth::CredentialSource for Opaque {
        async fn fetch(
            &self,
            _cx: tower_client_auth::FetchContext,
        ) -> Result<Credential, tower_client_auth::BoxError> {
            Ok(Credential::bearer("t0k3n")?)
        }
    }
    let layer = AddCredential::layer(Opaque);
    assert!(format!("{layer:?}").contains("AuthLayer"));
    let (inner, mut api) = mock::pair::<Req, Response<&'static str>>();
    let mut svc = AddCredential::new(inner, Opaque, "https://api.test".parse().unwrap());
    assert!(format!("{svc:?}").starts_with("AddCredential"));
    let _: &mut mock::Mock<Req, Response<&'static str>> = svc.get_mut();
    let _: &mock::Mock<Req, Response<&'static str>> = svc.get_ref();
    let call = tokio::spawn(svc.clone().oneshot(get("/")));
    let (req, reply) = api.next_request().await.unwrap();
    assert_eq!(req.headers()[AUTHORIZATION], "Bearer t0k3n");
    reply.send_response(Response::new("ok"));
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
    let _inner: mock::Mock<Req, Response<&'static str>> = svc.into_inner();
}

/// Sources chosen at run time behind one type keep their own behaviour: a static one is
/// never refetched (its 401 comes back marked), a rotating one still rotates (its
/// `attach` reached the cache), a fetching one is asked once and refreshed on a 401.
#[tokio::test]
async fn shared_sources_keep_their_own_behaviour() {
    use tower_client_auth::{RotatingCredential, SharedCredentialSource};

    async fn answer(api: &mut mock::Handle<Req, Response<&'static str>>, status: u16) -> String {
        let (req, reply) = api.next_request().await.unwrap();
        reply.send_response(self::status(status));
        bearer(&req).to_owned()
    }

    let rotating = RotatingCredential::new(Credential::bearer("old").unwrap());
    let fetching = TestSource::new();
    let sources = [
        SharedCredentialSource::new(StaticCredential::bearer("pat").unwrap()),
        SharedCredentialSource::new(rotating.clone()),
        SharedCredentialSource::new(fetching.clone()),
    ];
    assert!(format!("{:?}", sources[0]).contains("StaticCredential"));

    let (inner, mut api) = mock::pair::<Req, Response<&'static str>>();
    let svc = AuthLayer::new(sources[0].clone())
        .any_https_origin()
        .layer(inner);
    let call = tokio::spawn(svc.oneshot(get("/")));
    assert_eq!(answer(&mut api, 401).await, "Bearer pat");
    let res = call.await.unwrap().unwrap();
    assert_eq!(
        res.extensions().get::<NotReplayed>(),
        Some(&NotReplayed::FixedCredential)
    );

    let (inner, mut api) = mock::pair::<Req, Response<&'static str>>();
    let svc = AuthLayer::new(sources[1].clone())
        .any_https_origin()
        .layer(inner);
    let call = tokio::spawn(svc.clone().oneshot(get("/")));
    assert_eq!(answer(&mut api, 200).await, "Bearer old");
    call.await.unwrap().unwrap();
    rotating.rotate(Credential::bearer("new").unwrap()).unwrap();
    let call = tokio::spawn(svc.oneshot(get("/")));
    assert_eq!(answer(&mut api, 200).await, "Bearer new");
    call.await.unwrap().unwrap();

    let (inner, mut api) = mock::pair::<Req, Response<&'static str>>();
    let svc = AuthLayer::new(sources[2].clone())
        .any_https_origin()
        .layer(inner);
    let call = tokio::spawn(svc.oneshot(get("/")));
    assert_eq!(answer(&mut api, 401).await, "Bearer token-1");
    assert_eq!(answer(&mut api, 200).await, "Bearer token-2");
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
    assert_eq!(fetching.fetches(), 2);
}

/// An inner service that counts its clones, as a real client would be cloned
/// (hyper-util's `Client` clones a few `Arc`s), and answers 401 to one credential.
struct CountsClones {
    clones: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    rejects: Option<&'static str>,
}

impl Clone for CountsClones {
    fn clone(&self) -> Self {
        self.clones
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        CountsClones {
            clones: self.clones.clone(),
            rejects: self.rejects,
        }
    }
}

impl Service<Req> for CountsClones {
    type Response = Response<&'static str>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<&'static str>, Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let sent = req.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
        let rejected = self.rejects.is_some_and(|r| sent == Some(r.as_bytes()));
        // Read the body, as a client sending it would (a replay needs all of it recorded).
        let body = req.into_body().collect().now_or_never();
        assert!(matches!(body, Some(Ok(_))), "a full body reads at once");
        std::future::ready(Ok(status(if rejected { 401 } else { 200 })))
    }
}

/// One way of sending three requests through one service, and how many clones of the
/// inner service it must make.
struct CloneCase<P> {
    case: &'static str,
    layer: AuthLayer<P>,
    /// The credential is fetched before the first request (otherwise that request waits).
    warm: bool,
    no_replay: bool,
    rejects: Option<&'static str>,
    clones: usize,
}

impl<P: tower_client_auth::CredentialSource> CloneCase<P> {
    async fn check(self) {
        let case = self.case;
        if self.warm {
            self.layer.cache().credential().await.unwrap();
        }
        let clones = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let inner = CountsClones {
            clones: clones.clone(),
            rejects: self.rejects,
        };
        let mut svc = self.layer.layer(inner);
        for _ in 0..3 {
            let mut req = post("/v1/payments", b"{}");
            if self.no_replay {
                req.extensions_mut().insert(NoReplay);
            }
            let res = svc.ready().await.unwrap().call(req).await.unwrap();
            let why = res.extensions().get::<NotReplayed>();
            assert_eq!(res.status(), 200, "{case}: {why:?}");
        }
        let made = clones.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(made, self.clones, "{case}: clones of the inner service");
    }
}

/// A request that cannot be replayed, its credential cached, goes through the service
/// that was polled ready, uncloned, as tower-http's middleware do. A replayable request
/// clones it once, for its second attempt, and a replay after a 401 uses that clone. A
/// request that waits for its credential gives back the ready service (one clone takes
/// its place) and readies one of its own (a second clone).
#[tokio::test]
async fn only_a_replayable_or_waiting_request_clones_the_inner_service() {
    let fixed = || AuthLayer::new(StaticCredential::bearer("k3y").unwrap()).any_https_origin();
    let fetched = || AuthLayer::new(TestSource::new()).any_https_origin();
    fn case<P>(case: &'static str, layer: AuthLayer<P>, clones: usize) -> CloneCase<P> {
        CloneCase {
            case,
            layer,
            warm: true,
            no_replay: false,
            rejects: None,
            clones,
        }
    }
    case("static credential", fixed(), 0).check().await;
    let elsewhere = "https://elsewhere.example";
    case(
        "other origin",
        AuthLayer::new(TestSource::new()).origin(elsewhere).unwrap(),
        0,
    )
    .check()
    .await;
    CloneCase {
        no_replay: true,
        ..case("NoReplay", fetched(), 0)
    }
    .check()
    .await;
    case("replay on", fetched(), 3).check().await;
    // token-1 is rejected; the first request is replayed with token-2, which is accepted.
    CloneCase {
        rejects: Some("Bearer token-1"),
        ..case("a 401 replayed", fetched(), 3)
    }
    .check()
    .await;
    CloneCase {
        warm: false,
        no_replay: true,
        ..case("NoReplay, the first request waits", fetched(), 2)
    }
    .check()
    .await;
    CloneCase {
        warm: false,
        ..case("replay on, the first request waits", fetched(), 2 + 3)
    }
    .check()
    .await;
}

/// World: a request that waited for the first fetch, then waits for its service to be
/// ready (a concurrency limit of one), and meanwhile its credential is dropped by name.
/// Proves: it does not send the dropped credential: it takes the cache's credential as
/// it is when the service is ready (a new fetch here), and while it waits for that fetch
/// it holds no concurrency permit (another clone gets ready meanwhile).
#[tokio::test]
async fn a_credential_dropped_while_the_service_gets_ready_is_not_sent() {
    let (mock, mut api) = mock::pair::<Req, Response<&'static str>>();
    let source = TestSource::gated(None);
    let layer = AuthLayer::new(source.clone()).any_https_origin();
    let cache = layer.cache().clone();
    let mut svc = layer.layer(tower::limit::ConcurrencyLimit::new(mock, 1));
    api.allow(1);
    svc.ready().await.unwrap();
    // The clone that sends once the credential is there waits for readiness.
    api.allow(0);
    let request = tokio::spawn(svc.call(get("/v1/things")));
    let settle = || async {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    };
    settle().await;
    source.release(1);
    settle().await;
    assert_eq!(source.fetches(), 1);
    assert!(
        cache
            .handle()
            .invalidate_if(&Credential::bearer("token-1").unwrap())
    );
    api.allow(5);
    settle().await;
    assert_eq!(source.fetches(), 2, "the request did not look again");
    // The new fetch is gated: the request waits for it without the permit.
    let mut other = svc.clone();
    let ready = tokio::time::timeout(std::time::Duration::from_secs(5), other.ready()).await;
    assert!(
        ready.is_ok(),
        "a concurrency permit was held through the refresh"
    );
    drop(other);
    source.release(1);
    let (req, respond) = api.next_request().await.unwrap();
    assert_eq!(
        bearer(&req),
        "Bearer token-2",
        "the dropped credential was sent"
    );
    respond.send_response(status(200));
    assert_eq!(request.await.unwrap().unwrap().status(), 200);
}

/// A body fed by the test, frame by frame; it ends when the sender is dropped.
struct Chan(tokio::sync::mpsc::UnboundedReceiver<Result<Frame<Bytes>, &'static str>>);

impl http_body::Body for Chan {
    type Data = Bytes;
    type Error = &'static str;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, &'static str>>> {
        self.0.poll_recv(cx)
    }
}

/// World: a streaming body with a hand-set `Content-Length: 4` that gives `abcd`; the
/// API answers 401 (as over HTTP/2, where hyper's pipe still polls the body for its end)
/// and the refresh is held; meanwhile the body gives trailers, an error or more data, or
/// nothing yet. Proves (review finding): the replay is built when the new credential is
/// there, from what the body settled to: with the trailers; not at all after an error or
/// more data (`BodyFailed`); and, with a body not settled by then, not at all
/// (`BodyIncomplete`), rather than wait for an end the caller may give only once it has
/// an answer.
#[tokio::test]
async fn a_body_answered_before_its_end_is_replayed_as_it_was_sent() {
    type ChanReq = Request<ReplayBody<Chan>>;
    for tail in ["trailers", "error", "more", "none yet"] {
        let (mock, mut api) = mock::pair::<ChanReq, Response<&'static str>>();
        let source = TestSource::gated(None);
        source.release(1);
        let svc = AuthLayer::new(source.clone())
            .any_https_origin()
            .layer(mock);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let req = Request::post("https://api.test/v1/upload")
            .header(http::header::CONTENT_LENGTH, "4")
            .body(Chan(rx))
            .unwrap();
        let call = tokio::spawn(svc.oneshot(req));
        let (mut first, respond) = api.next_request().await.unwrap();
        tx.send(Ok(Frame::data(Bytes::from_static(b"abcd"))))
            .unwrap();
        let got = first.body_mut().frame().await.unwrap().unwrap();
        assert_eq!(got.into_data().unwrap(), "abcd");
        respond.send_response(status(401));
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert_eq!(source.fetches(), 2, "the refresh did not start");
        match tail {
            "trailers" => {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("x-checksum", "abc".parse().unwrap());
                tx.send(Ok(Frame::trailers(trailers))).unwrap();
            }
            "error" => tx.send(Err("disk read failed")).unwrap(),
            "more" => tx.send(Ok(Frame::data(Bytes::from_static(b"ef")))).unwrap(),
            _ => {}
        }
        if tail != "none yet" {
            drop(tx);
            // The first attempt's body gives its tail.
            while let Some(Ok(_)) = first.body_mut().frame().await {}
            source.release(1);
        } else {
            source.release(1);
            // The caller ends its body once it has an answer.
            let res = call.await.unwrap().unwrap();
            drop(tx);
            assert_eq!(res.status(), 401);
            assert_eq!(
                res.extensions().get::<NotReplayed>(),
                Some(&NotReplayed::BodyIncomplete)
            );
            continue;
        }
        if tail == "trailers" {
            let (second, respond) = api.next_request().await.unwrap();
            let whole = second.into_body().collect().await.unwrap();
            assert_eq!(whole.trailers().unwrap()["x-checksum"], "abc");
            assert_eq!(whole.to_bytes(), "abcd");
            respond.send_response(status(200));
            assert_eq!(call.await.unwrap().unwrap().status(), 200);
        } else {
            let res = call.await.unwrap().unwrap();
            assert_eq!(res.status(), 401, "{tail}");
            assert_eq!(
                res.extensions().get::<NotReplayed>(),
                Some(&NotReplayed::BodyFailed),
                "{tail}"
            );
            assert!(
                !matches!(api.poll_request(), std::task::Poll::Ready(Some(_))),
                "{tail}: replayed a body the first attempt did not send"
            );
        }
    }
}

/// The world of the two tests below: a request through a layer over `source` (which
/// issues `token-1`, then `token-2`) is rejected once; the service clone its replay goes
/// through waits for readiness, and meanwhile the replay's new credential, `token-2`, is
/// dropped by name. Returns the request's task, the API, which lets one more request
/// through, and the cache's handle.
async fn rejected_then_dropped_while_the_replay_gets_ready<P: CredentialSource>(
    source: P,
    fetches: impl Fn() -> usize,
) -> (
    tokio::task::JoinHandle<Result<Response<&'static str>, BoxError>>,
    mock::Handle<Req, Response<&'static str>>,
    tower_client_auth::CacheHandle,
) {
    let (mock, mut api) = mock::pair::<Req, Response<&'static str>>();
    let layer = AuthLayer::new(source).any_https_origin();
    let cache = layer.cache().clone();
    let call = tokio::spawn(layer.layer(mock).oneshot(get("/v1/things")));
    let (req, respond) = api.next_request().await.unwrap();
    assert_eq!(bearer(&req), "Bearer token-1");
    api.allow(0);
    respond.send_response(status(401));
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert_eq!(fetches(), 2);
    assert!(
        cache
            .handle()
            .invalidate_if(&Credential::bearer("token-2").unwrap())
    );
    api.allow(1);
    (call, api, cache.handle())
}

/// World: a request rejected once; the service clone its replay goes through waits for
/// readiness (a concurrency limit, a balancer), and meanwhile the replay's new credential
/// is dropped by name. Proves: the replay does not send it: it takes the cache's
/// credential as it is once the service is ready (a third token here).
#[tokio::test]
async fn a_replay_does_not_send_a_credential_dropped_while_its_service_gets_ready() {
    let source = TestSource::new();
    let (call, mut api, _) = rejected_then_dropped_while_the_replay_gets_ready(source.clone(), {
        let source = source.clone();
        move || source.fetches()
    })
    .await;
    let (req, respond) = api.next_request().await.unwrap();
    assert_eq!(
        bearer(&req),
        "Bearer token-3",
        "the replay sent a dropped credential"
    );
    respond.send_response(status(200));
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
}

/// World: as above, and before the replay's service is ready the application replaces
/// the credential a hundred times over (more changes than the cache remembers
/// credentials by name). Proves: the replay still does not send the dropped credential:
/// it sends the last replacement.
#[tokio::test]
async fn a_replay_does_not_send_a_dropped_credential_however_many_changes_came_after() {
    let source = TestSource::new();
    let (call, mut api, handle) =
        rejected_then_dropped_while_the_replay_gets_ready(source.clone(), {
            let source = source.clone();
            move || source.fetches()
        })
        .await;
    for i in 0..100 {
        let credential = Credential::bearer(format!("replacement-{i}")).unwrap();
        assert!(handle.replace(credential).unwrap());
    }
    let (req, respond) = api.next_request().await.unwrap();
    assert_eq!(
        bearer(&req),
        "Bearer replacement-99",
        "the replay sent a dropped credential"
    );
    respond.send_response(status(200));
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
    assert_eq!(source.fetches(), 2);
}

/// World: a request rejected once; while its replay's service gets ready, the replay's
/// new credential (`token-2`) is merely replaced, a hundred times over (more changes
/// than the cache remembers credentials by name), and only then reported rejected by
/// name. Proves: the replay does not send a credential reported rejected before it went.
#[tokio::test]
async fn a_replay_does_not_send_a_credential_rejected_by_name_after_many_changes() {
    let source = TestSource::new();
    let (mock, mut api) = mock::pair::<Req, Response<&'static str>>();
    let layer = AuthLayer::new(source.clone()).any_https_origin();
    let cache = layer.cache().clone();
    let call = tokio::spawn(layer.layer(mock).oneshot(get("/v1/things")));
    let (req, respond) = api.next_request().await.unwrap();
    assert_eq!(bearer(&req), "Bearer token-1");
    api.allow(0);
    respond.send_response(status(401));
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert_eq!(source.fetches(), 2);
    let handle = cache.handle();
    for i in 0..100 {
        let credential = Credential::bearer(format!("replacement-{i}")).unwrap();
        assert!(handle.replace(credential).unwrap());
    }
    cache
        .reject(&Credential::bearer("token-2").unwrap())
        .await
        .unwrap();
    api.allow(1);
    let (req, respond) = api.next_request().await.unwrap();
    assert_eq!(
        bearer(&req),
        "Bearer replacement-99",
        "the replay sent a credential reported rejected"
    );
    respond.send_response(status(200));
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
}

/// World: as above, but the source's third answer is the very credential the API
/// rejected (an identity provider that hands back its cached token after a drop). Proves:
/// the replay does not send it (a request is never sent twice with one credential); the
/// request fails with `Fetch`, saying so, and the API sees nothing more.
#[tokio::test]
async fn a_replay_that_looks_again_and_gets_the_rejected_credential_back_does_not_send_it() {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    let fetches = Arc::new(AtomicUsize::new(0));
    let source = {
        let fetches = fetches.clone();
        tower_client_auth::source_fn(move |_| {
            let n = fetches.fetch_add(1, Ordering::SeqCst);
            async move {
                let token = ["token-1", "token-2", "token-1"][n.min(2)];
                Ok::<_, BoxError>(Credential::bearer(token)?)
            }
        })
    };
    let (mut call, mut api, _) = rejected_then_dropped_while_the_replay_gets_ready(source, {
        let fetches = fetches.clone();
        move || fetches.load(Ordering::SeqCst)
    })
    .await;
    let answer = tokio::select! {
        answer = &mut call => answer.unwrap(),
        Some((req, _)) = api.next_request() => {
            panic!("the replay went with {}", bearer(&req))
        }
    };
    let err = answer.expect_err("answered without a replay or an error");
    let err = err.downcast::<tower_client_auth::Error>().unwrap();
    assert_eq!(err.kind(), tower_client_auth::ErrorKind::Fetch, "{err}");
    assert!(err.to_string().contains("rejected"), "{err}");
    assert_eq!(fetches.load(Ordering::SeqCst), 3);
    assert_no_more_requests(&mut api);
}
