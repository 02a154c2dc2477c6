//! Step-ups back off whichever way they fail: a step-up that brings back the token it
//! replaced, step-ups for requests that cannot be replayed (nothing judges their wider
//! token but the next request's answer), and a replay with a plain newer credential is
//! not a step-up's (review 70).
#![cfg(all(feature = "https", feature = "reqwest"))]

use crate::support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::json;
use support::{
    api_client,
    providers::{challenge, reply, serve},
};
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, BoxError, Credential, FetchContext, FetchReason, NotReplayed, source_fn,
};

fn layer<P: tower_client_auth::CredentialSource>(source: P) -> AuthLayer<P> {
    AuthLayer::new(source)
        .any_https_origin()
        .allow_http_loopback(true)
}

/// An API answering `insufficient_scope` (scope `w`) on `/scoped`, 200 elsewhere.
async fn scoped_api() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let addr = {
        let calls = calls.clone();
        serve(move |req: Request<hyper::body::Incoming>| {
            calls.fetch_add(1, SeqCst);
            let scoped = req.uri().path() == "/scoped";
            async move {
                if scoped {
                    challenge(
                        StatusCode::FORBIDDEN,
                        r#"Bearer error="insufficient_scope", scope="w""#,
                    )
                } else {
                    reply(StatusCode::OK, json!({}))
                }
            }
        })
        .await
    };
    (addr, calls)
}

async fn tower_get<S>(svc: &S, url: String) -> (StatusCode, Option<NotReplayed>)
where
    S: tower::Service<
            Request<Full<Bytes>>,
            Response = http::Response<hyper::body::Incoming>,
            Error = BoxError,
        > + Clone,
{
    let res = svc
        .clone()
        .oneshot(Request::get(url).body(Full::default()).unwrap())
        .await
        .unwrap();
    let answer = (res.status(), res.extensions().get::<NotReplayed>().copied());
    res.into_body().collect().await.unwrap();
    answer
}

/// World: an IdP that ignores the requested scope and hands back the token it already
/// issued (many IdPs cache client-credentials tokens while valid); the API answers
/// `insufficient_scope` forever. Proves (review 70; README: "A failed step-up, or one whose replay
/// still lacks the scope, backs step-ups off"): a step-up that brings back the very
/// token that lacked the scope (it brings no accepted scope) backs step-ups off, so
/// ten requests cost at most one step-up fetch, not one per request.
#[tokio::test]
async fn a_step_up_that_brings_back_the_same_token_backs_off() {
    tokio::time::timeout(Duration::from_secs(20), async {
        let (addr, _calls) = scoped_api().await;
        let fetches = Arc::new(AtomicUsize::new(0));
        let reasons = Arc::new(std::sync::Mutex::new(Vec::new()));
        let source = {
            let (fetches, reasons) = (fetches.clone(), reasons.clone());
            source_fn(move |cx: FetchContext| {
                fetches.fetch_add(1, SeqCst);
                reasons.lock().unwrap().push(cx.reason());
                async move { Credential::bearer("the-same-token") }
            })
        };
        let svc = layer(source).step_up(true).layer(api_client());
        for _ in 0..10 {
            let (status, marker) = tower_get(&svc, format!("http://{addr}/scoped")).await;
            assert_eq!(status, 403);
            assert!(marker.is_some());
        }
        let reasons = reasons.lock().unwrap().clone();
        assert!(
            fetches.load(SeqCst) <= 2,
            "a step-up that brought back the same token did not back off: {} fetches for 10 requests: {reasons:?}",
            fetches.load(SeqCst)
        );
    })
    .await
    .expect("hung");
}

/// A source issuing a new `t-N` on every fetch, counting fetches and their reasons.
fn counting_source() -> (
    Arc<AtomicUsize>,
    Arc<std::sync::Mutex<Vec<FetchReason>>>,
    impl tower_client_auth::CredentialSource,
) {
    let fetches = Arc::new(AtomicUsize::new(0));
    let reasons = Arc::new(std::sync::Mutex::new(Vec::new()));
    let source = {
        let (fetches, reasons) = (fetches.clone(), reasons.clone());
        source_fn(move |cx: FetchContext| {
            let n = fetches.fetch_add(1, SeqCst);
            reasons.lock().unwrap().push(cx.reason());
            async move { Credential::bearer(format!("t-{n}")) }
        })
    };
    (fetches, reasons, source)
}

/// World: step-up on; every request opts out of replay (`NoReplay`: a non-idempotent
/// call); the API answers `insufficient_scope` forever, whatever the token (the IdP
/// grants the scope, the API never finds it enough). Proves (review 70; README: "A failed step-up,
/// or one whose replay still lacks the scope, backs step-ups off"; brief: the API
/// answering insufficient_scope forever must not hammer the token endpoint): requests
/// that cannot be replayed still start a step-up each, and since no replay ever judges
/// the wider token, nothing backs step-ups off: one token request per API request.
#[tokio::test]
async fn unreplayable_requests_each_start_a_step_up_with_no_backoff() {
    tokio::time::timeout(Duration::from_secs(20), async {
        let (addr, _calls) = scoped_api().await;
        let (fetches, reasons, source) = counting_source();
        let svc = layer(source).step_up(true).layer(api_client());
        for _ in 0..10 {
            let mut req = Request::get(format!("http://{addr}/scoped"))
                .body(Full::default())
                .unwrap();
            req.extensions_mut().insert(tower_client_auth::NoReplay);
            let res = svc.clone().oneshot(req).await.unwrap();
            assert_eq!(res.status(), 403);
            res.into_body().collect().await.unwrap();
            // Let the spawned step-up land before the next request.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let reasons = reasons.lock().unwrap().clone();
        assert!(
            fetches.load(SeqCst) <= 3,
            "step-ups for unreplayable requests never back off: {} fetches for 10 requests: {reasons:?}",
            fetches.load(SeqCst)
        );
    })
    .await
    .expect("hung");
}

/// World: as above, with uploads over the replay limit (128 KiB bodies) instead of
/// `NoReplay`. Proves the same: each upload costs a step-up fetch, with no backoff.
#[tokio::test]
async fn uploads_over_the_replay_limit_each_start_a_step_up_with_no_backoff() {
    tokio::time::timeout(Duration::from_secs(20), async {
        let (addr, _calls) = scoped_api().await;
        let (fetches, reasons, source) = counting_source();
        let svc = layer(source).step_up(true).layer(api_client());
        for _ in 0..10 {
            let req = Request::post(format!("http://{addr}/scoped"))
                .body(Full::new(Bytes::from(vec![b'x'; 128 * 1024])))
                .unwrap();
            let res = svc.clone().oneshot(req).await.unwrap();
            assert_eq!(res.status(), 403);
            assert!(res.extensions().get::<NotReplayed>().is_some());
            res.into_body().collect().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let reasons = reasons.lock().unwrap().clone();
        assert!(
            fetches.load(SeqCst) <= 3,
            "step-ups for unreplayable uploads never back off: {} fetches for 10 requests: {reasons:?}",
            fetches.load(SeqCst)
        );
    })
    .await
    .expect("hung");
}

/// World: break 1 through the reqwest middleware: the IdP hands back the same token;
/// the API answers `insufficient_scope` forever. Proves: the same unbounded step-ups.
#[tokio::test]
async fn reqwest_a_step_up_that_brings_back_the_same_token_backs_off() {
    tokio::time::timeout(Duration::from_secs(20), async {
        let (addr, _calls) = scoped_api().await;
        let fetches = Arc::new(AtomicUsize::new(0));
        let source = {
            let fetches = fetches.clone();
            source_fn(move |_cx: FetchContext| {
                fetches.fetch_add(1, SeqCst);
                async move { Credential::bearer("the-same-token") }
            })
        };
        let mw = tower_client_auth::reqwest::AuthMiddleware::new(source)
            .origin(format!("http://{addr}"))
            .unwrap()
            .allow_http_loopback(true)
            .step_up(true);
        let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
            .with(mw)
            .build();
        for _ in 0..10 {
            let res = client
                .get(format!("http://{addr}/scoped"))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 403);
        }
        assert!(
            fetches.load(SeqCst) <= 2,
            "reqwest: {} fetches for 10 requests",
            fetches.load(SeqCst)
        );
    })
    .await
    .expect("hung");
}

type MockReq = Request<tower_client_auth::ReplayBody<Full<Bytes>>>;
type MockApi = tower_test::mock::Handle<MockReq, http::Response<&'static str>>;

fn bearer(req: &MockReq) -> String {
    req.headers()["authorization"].to_str().unwrap().to_owned()
}

fn lacks_scope_w() -> http::Response<&'static str> {
    http::Response::builder()
        .status(403)
        .header(
            "www-authenticate",
            r#"Bearer error="insufficient_scope", scope="w""#,
        )
        .body("")
        .unwrap()
}

async fn next_request(
    api: &mut MockApi,
) -> (
    MockReq,
    tower_test::mock::SendResponse<http::Response<&'static str>>,
) {
    tokio::time::timeout(Duration::from_secs(10), api.next_request())
        .await
        .expect("no request came within 10 s")
        .expect("the mock API is gone")
}

/// World: `/a` goes with `token-1`; before its answer comes, the application rejects
/// `token-1` (as for a gRPC status), and the plain refetch installs `token-2`. The API
/// then says `token-1` lacks `w`; the step-up path, seeing a newer credential and no
/// step-up under way, replays with `token-2` (no step-up was made), which lacks `w` too.
/// Proves (review 70; README: "A failed step-up, or one whose replay still lacks the scope, backs
/// step-ups off"; the same class as `a_replay_that_looked_again_is_not_counted_as_a_step_up`):
/// that replay is not a step-up's, so it must not back step-ups off: the next request
/// lacking `w` (`/b`, with `token-2`) steps up at once. On main it is counted as a
/// fruitless step-up, and `/b` comes back 403 with no step-up tried.
#[tokio::test]
async fn a_replay_with_a_plain_newer_credential_is_not_counted_as_a_step_up() {
    tokio::time::timeout(Duration::from_secs(20), async {
        let source = support::TestSource::new();
        let layer = AuthLayer::new(source.clone());
        let cache = layer.cache().clone();
        let (inner, mut api) = tower_test::mock::pair::<MockReq, http::Response<&'static str>>();
        let svc = layer.any_https_origin().step_up(true).layer(inner);

        let call = tokio::spawn(svc.clone().oneshot(support::get("/a")));
        let (req, reply) = next_request(&mut api).await;
        assert_eq!(bearer(&req), "Bearer token-1");
        let first = cache.credential().await.unwrap();
        let plain = cache.reject(&first).await.unwrap();
        assert_eq!(plain, Credential::bearer("token-2").unwrap());
        reply.send_response(lacks_scope_w());
        let (replay, reply) = next_request(&mut api).await;
        assert_eq!(
            bearer(&replay),
            "Bearer token-2",
            "no step-up: the newer one"
        );
        assert_eq!(source.fetches(), 2);
        reply.send_response(lacks_scope_w());
        assert_eq!(call.await.unwrap().unwrap().status(), 403);

        let call = tokio::spawn(svc.clone().oneshot(support::get("/b")));
        let (req, reply) = next_request(&mut api).await;
        assert_eq!(bearer(&req), "Bearer token-2");
        reply.send_response(lacks_scope_w());
        let answered = tokio::select! {
            res = call => Some(res.unwrap().unwrap()),
            got = next_request(&mut api) => {
                let (replay, reply) = got;
                assert_eq!(bearer(&replay), "Bearer token-3");
                reply.send_response(http::Response::new(""));
                None
            }
        };
        if let Some(res) = answered {
            panic!(
                "/b came back {} {:?} with no step-up tried ({} fetches, reasons {:?}): \
                 the plain replay of /a was counted as a fruitless step-up",
                res.status(),
                res.extensions().get::<NotReplayed>(),
                source.fetches(),
                source.log().into_iter().map(|(_, r)| r).collect::<Vec<_>>()
            );
        }
    })
    .await
    .expect("hung");
}

/// World: `/a` goes with `token-1` and the API says it lacks `w`; the step-up's fetch is
/// held at the source while the application hands a credential over (`replace`), so the
/// step-up's `token-2` goes to its own waiters only; `/a`'s replay with `token-2` lacks
/// `w` too. Then `/b` (with the handed credential) lacks `w`. Proves: that step-up was
/// fruitless and counts as such though its credential never became current: `/b` comes
/// back 403 within the step-up backoff, with no third fetch.
#[tokio::test]
async fn a_step_up_overtaken_by_a_replacement_still_backs_step_ups_off() {
    tokio::time::timeout(Duration::from_secs(20), async {
        let source = support::TestSource::gated(None);
        source.release(1);
        let layer = AuthLayer::new(source.clone());
        let handle = layer.cache().handle();
        let (inner, mut api) = tower_test::mock::pair::<MockReq, http::Response<&'static str>>();
        let svc = layer.any_https_origin().step_up(true).layer(inner);

        let call = tokio::spawn(svc.clone().oneshot(support::get("/a")));
        let (req, reply) = next_request(&mut api).await;
        assert_eq!(bearer(&req), "Bearer token-1");
        reply.send_response(lacks_scope_w());
        while source.fetches() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            handle
                .replace(Credential::bearer("handed").unwrap())
                .unwrap()
        );
        source.release(1);
        let (replay, reply) = next_request(&mut api).await;
        assert_eq!(bearer(&replay), "Bearer token-2", "the step-up's own token");
        reply.send_response(lacks_scope_w());
        assert_eq!(call.await.unwrap().unwrap().status(), 403);

        let call = tokio::spawn(svc.clone().oneshot(support::get("/b")));
        let (req, reply) = next_request(&mut api).await;
        assert_eq!(bearer(&req), "Bearer handed");
        reply.send_response(lacks_scope_w());
        source.release(1);
        let res = tokio::select! {
            res = call => res.unwrap().unwrap(),
            got = next_request(&mut api) => {
                panic!("a step-up was tried at once: /b replayed with {}", bearer(&got.0))
            }
        };
        assert_eq!(res.status(), 403);
        assert_eq!(source.fetches(), 2, "{:?}", source.log());
    })
    .await
    .expect("hung");
}
