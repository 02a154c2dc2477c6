//! Reading the API's challenge (RFC 6750 §3) end to end, through Tower and reqwest,
//! against a loopback provider that answers as RFC 6749/6750 servers do (style D's, in
//! `support::providers`): `invalid_token` refreshes and replays; `insufficient_scope` is
//! not a rejection (no token request, no replay, a typed marker), unless step-up is on,
//! which asks once for the union of the scopes and replays once; a rejection policy of
//! one's own sees the headers on both paths.
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
    providers::{ClientCredentialsApi, challenge, reply, serve, start},
    token_client,
};
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, BoxError, Credential, FetchContext, FetchReason, NotReplayed,
    rejection::{InsufficientScope, Verdict, rejection_fn},
    reqwest::AuthMiddleware,
    source_fn,
    token::{TokenRequest, TokenSource},
};

/// Style D's source: client credentials with the scope `shipments:read`.
fn source(base: &str) -> TokenSource {
    TokenSource::new(
        TokenRequest::oauth2_client_credentials(
            &format!("{base}/oauth/v2/token"),
            "d-client",
            "d-secret",
        )
        .unwrap()
        .scope("shipments:read"),
    )
    .client(token_client())
}

fn layer<P: tower_client_auth::CredentialSource>(source: P) -> AuthLayer<P> {
    AuthLayer::new(source)
        .any_https_origin()
        .allow_http_loopback(true)
}

type Answer = (StatusCode, Option<NotReplayed>, Option<InsufficientScope>);

/// A GET through the Tower stack: status and what the layer said about it.
async fn tower_get<S>(svc: &S, url: String) -> Answer
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
    let answer = (
        res.status(),
        res.extensions().get::<NotReplayed>().copied(),
        res.extensions().get::<InsufficientScope>().cloned(),
    );
    res.into_body().collect().await.unwrap();
    answer
}

/// The same through reqwest.
async fn reqwest_get(client: &reqwest_middleware::ClientWithMiddleware, url: String) -> Answer {
    let res = client.get(url).send().await.unwrap();
    (
        res.status(),
        res.extensions().get::<NotReplayed>().copied(),
        res.extensions().get::<InsufficientScope>().cloned(),
    )
}

/// Style D's source behind the reqwest middleware, for the provider at `base`.
fn middleware(base: &str) -> AuthMiddleware<TokenSource> {
    AuthMiddleware::new(source(base))
        .origin(base)
        .unwrap()
        .allow_http_loopback(true)
}

fn reqwest_client(
    middleware: AuthMiddleware<TokenSource>,
) -> reqwest_middleware::ClientWithMiddleware {
    reqwest_client_of(middleware)
}

fn reqwest_client_of<P: tower_client_auth::CredentialSource>(
    middleware: AuthMiddleware<P>,
) -> reqwest_middleware::ClientWithMiddleware {
    reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(middleware)
        .build()
}

fn lacks(scope: &str) -> Option<InsufficientScope> {
    Some(InsufficientScope {
        scope: Some(scope.into()),
    })
}

/// World: a 403 with `error="insufficient_scope"`. Proves, on both paths: no token
/// request, no replay, the response marked with the scope the API named; the credential
/// stays in use.
#[tokio::test]
async fn insufficient_scope_is_returned_marked_without_a_token_request() {
    let api = ClientCredentialsApi::new("d-client", "d-secret");
    let base = start(api.clone()).await;
    let svc = layer(source(&base)).layer(api_client());
    let client = reqwest_client(middleware(&base));
    let marked = (
        StatusCode::FORBIDDEN,
        Some(NotReplayed::InsufficientScope),
        lacks("admin"),
    );
    assert_eq!(
        tower_get(&svc, format!("{base}/v1/admin/users")).await,
        marked
    );
    assert_eq!(
        reqwest_get(&client, format!("{base}/v1/admin/users")).await,
        marked
    );
    assert_eq!(
        tower_get(&svc, format!("{base}/v1/shipments")).await,
        (StatusCode::OK, None, None)
    );
    assert_eq!(
        reqwest_get(&client, format!("{base}/v1/shipments")).await.0,
        StatusCode::OK
    );
    assert_eq!(
        api.token_requests.load(SeqCst),
        2,
        "one token per client, no more"
    );
    assert_eq!(api.api_calls.load(SeqCst), 4, "no replay");
}

/// World: 20 concurrent calls to a resource that needs `admin`, with step-up on. Proves:
/// one token request asks for the union `shipments:read admin` (not 20, not `admin`
/// alone), every call is replayed once and succeeds, and the wider token serves the
/// narrower resource too. Through Tower and through reqwest.
#[tokio::test]
async fn step_up_asks_once_for_the_union_and_replays() {
    for path in ["tower", "reqwest"] {
        let api = ClientCredentialsApi::new("d-client", "d-secret");
        let base = start(api.clone()).await;
        let admin = format!("{base}/v1/admin/users");
        let calls: Vec<tokio::task::JoinHandle<Answer>> = if path == "tower" {
            let svc = layer(source(&base)).step_up(true).layer(api_client());
            // The first credential, before the burst: every call then carries it.
            assert_eq!(tower_get(&svc, format!("{base}/v1/shipments")).await.0, 200);
            (0..20)
                .map(|_| {
                    let (svc, admin) = (svc.clone(), admin.clone());
                    tokio::spawn(async move { tower_get(&svc, admin).await })
                })
                .collect()
        } else {
            let client = reqwest_client(middleware(&base).step_up(true));
            assert_eq!(
                reqwest_get(&client, format!("{base}/v1/shipments")).await.0,
                200
            );
            (0..20)
                .map(|_| {
                    let (client, admin) = (client.clone(), admin.clone());
                    tokio::spawn(async move { reqwest_get(&client, admin).await })
                })
                .collect()
        };
        for call in calls {
            assert_eq!(call.await.unwrap(), (StatusCode::OK, None, None), "{path}");
        }
        assert_eq!(
            *api.scopes_asked.lock().unwrap(),
            ["shipments:read", "shipments:read admin"],
            "{path}: one step-up, for the union"
        );
        // 1 first call + 20 rejected + at most 20 replays (a call sent after the step-up
        // needs none).
        let calls = api.api_calls.load(SeqCst);
        assert!((22..=41).contains(&calls), "{path}: {calls} API calls");
    }
}

/// World: the client is not registered for `admin` (the token endpoint answers
/// `invalid_scope`). Proves: the 403 goes back marked, the credential is kept (the next
/// call succeeds with no token request), and further 403s during the backoff cost no
/// token request.
#[tokio::test]
async fn a_refused_step_up_returns_the_answer_and_keeps_the_credential() {
    let api = ClientCredentialsApi::new("d-client", "d-secret");
    api.registered_scopes
        .lock()
        .unwrap()
        .retain(|s| s != "admin");
    let base = start(api.clone()).await;
    let svc = layer(source(&base)).step_up(true).layer(api_client());
    assert_eq!(tower_get(&svc, format!("{base}/v1/shipments")).await.0, 200);
    for _ in 0..3 {
        assert_eq!(
            tower_get(&svc, format!("{base}/v1/admin/users")).await,
            (
                StatusCode::FORBIDDEN,
                Some(NotReplayed::InsufficientScope),
                lacks("admin")
            )
        );
    }
    assert_eq!(tower_get(&svc, format!("{base}/v1/shipments")).await.0, 200);
    assert_eq!(
        *api.scopes_asked.lock().unwrap(),
        ["shipments:read", "shipments:read admin"],
        "one refused step-up; the backoff holds the others"
    );
}

/// World: a source that cannot widen its scope (a session login with no grant type).
/// Proves: the step-up is refused before anything is sent, and the answer goes back
/// marked.
#[tokio::test]
async fn a_source_that_cannot_widen_its_scope_sends_nothing() {
    let logins = Arc::new(AtomicUsize::new(0));
    let api_calls = Arc::new(AtomicUsize::new(0));
    let addr = {
        let (logins, api_calls) = (logins.clone(), api_calls.clone());
        serve(move |req: Request<hyper::body::Incoming>| {
            let (logins, api_calls) = (logins.clone(), api_calls.clone());
            async move {
                if req.uri().path() == "/login" {
                    logins.fetch_add(1, SeqCst);
                    return reply(StatusCode::OK, json!({"token": "s-1", "expires_in": 3600}));
                }
                api_calls.fetch_add(1, SeqCst);
                challenge(
                    StatusCode::FORBIDDEN,
                    r#"Bearer error="insufficient_scope", scope="write""#,
                )
            }
        })
        .await
    };
    let login = TokenRequest::json(&format!("http://{addr}/login"))
        .unwrap()
        .field("user", "u")
        .secret_field("password", "p");
    let source = TokenSource::new(login)
        .response_fields(tower_client_auth::token::ResponseFields::new().access_token("token"))
        .client(token_client());
    let svc = layer(source).step_up(true).layer(api_client());
    assert_eq!(
        tower_get(&svc, format!("http://{addr}/v1/x")).await,
        (
            StatusCode::FORBIDDEN,
            Some(NotReplayed::InsufficientScope),
            lacks("write")
        )
    );
    assert_eq!(logins.load(SeqCst), 1, "the step-up sent nothing");
    assert_eq!(api_calls.load(SeqCst), 1, "and nothing was replayed");
}

/// World: an API that keeps answering `insufficient_scope`, whatever the token. Proves:
/// one step-up, one replay, and the replay's answer goes back marked as such.
#[tokio::test]
async fn a_replay_that_still_lacks_the_scope_is_returned() {
    let api_calls = Arc::new(AtomicUsize::new(0));
    let addr = {
        let api_calls = api_calls.clone();
        serve(move |_req: Request<hyper::body::Incoming>| {
            api_calls.fetch_add(1, SeqCst);
            async {
                challenge(
                    StatusCode::UNAUTHORIZED,
                    r#"Bearer error="insufficient_scope", scope="a b""#,
                )
            }
        })
        .await
    };
    let fetches = Arc::new(AtomicUsize::new(0));
    let reasons = Arc::new(std::sync::Mutex::new(Vec::new()));
    let source = {
        let (fetches, reasons) = (fetches.clone(), reasons.clone());
        source_fn(move |cx: FetchContext| {
            let n = fetches.fetch_add(1, SeqCst);
            reasons
                .lock()
                .unwrap()
                .push((cx.reason(), cx.required_scope().map(str::to_owned)));
            async move { Credential::bearer(format!("t-{n}")) }
        })
    };
    let svc = layer(source).step_up(true).layer(api_client());
    assert_eq!(
        tower_get(&svc, format!("http://{addr}/")).await,
        (
            StatusCode::UNAUTHORIZED,
            Some(NotReplayed::AlreadyReplayed),
            lacks("a b")
        )
    );
    assert_eq!(api_calls.load(SeqCst), 2);
    assert_eq!(
        *reasons.lock().unwrap(),
        [
            (FetchReason::Initial, None),
            (FetchReason::StepUp, Some("a b".to_owned()))
        ],
        "a 401 that lacks a scope is a step-up, not a rejection"
    );
}

/// World: the provider revokes every token. Proves: its `invalid_token` challenge is a
/// rejection on both paths: one new token each, one replay each.
#[tokio::test]
async fn invalid_token_refreshes_and_replays() {
    let api = ClientCredentialsApi::new("d-client", "d-secret");
    let base = start(api.clone()).await;
    let svc = layer(source(&base)).layer(api_client());
    let client = reqwest_client(middleware(&base));
    let url = format!("{base}/v1/shipments");
    assert_eq!(tower_get(&svc, url.clone()).await.0, 200);
    assert_eq!(reqwest_get(&client, url.clone()).await.0, 200);
    api.revoke_all();
    assert_eq!(
        tower_get(&svc, url.clone()).await,
        (StatusCode::OK, None, None)
    );
    assert_eq!(
        reqwest_get(&client, url.clone()).await,
        (StatusCode::OK, None, None)
    );
    assert_eq!(api.token_requests.load(SeqCst), 4);
    assert_eq!(api.api_calls.load(SeqCst), 6, "2 + 2 rejected + 2 replays");
}

/// World: an API that signals an expired session with `200 OK` and a header. Proves: a
/// rule of one's own sees the response headers on both paths (reqwest lends them to the
/// rule and gives them back), and its verdict refreshes and replays.
#[tokio::test]
async fn a_policy_of_ones_own_sees_the_headers_on_both_paths() {
    let addr = serve(move |req: Request<hyper::body::Incoming>| {
        let fresh = req
            .headers()
            .get("authorization")
            .is_some_and(|v| v != "Bearer t-0");
        async move {
            let mut res = reply(StatusCode::OK, json!({}));
            res.headers_mut().insert(
                "x-session",
                if fresh { "ok" } else { "expired" }.parse().unwrap(),
            );
            res
        }
    })
    .await;
    let policy = rejection_fn(|res: &tower_client_auth::rejection::ResponseHead<'_>| {
        match res.headers().get("x-session") {
            Some(v) if v == "expired" => Verdict::Rejected,
            _ => Verdict::Accepted,
        }
    });
    let counted = || {
        let fetches = Arc::new(AtomicUsize::new(0));
        let source = {
            let fetches = fetches.clone();
            source_fn(move |_| {
                let n = fetches.fetch_add(1, SeqCst);
                async move { Credential::bearer(format!("t-{n}")) }
            })
        };
        (fetches, source)
    };
    let url = format!("http://{addr}/");

    let (fetches, tower_source) = counted();
    let svc = layer(tower_source)
        .rejection_policy(policy.clone())
        .layer(api_client());
    let res = svc
        .oneshot(Request::get(url.clone()).body(Full::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.headers()["x-session"], "ok");
    assert_eq!(fetches.load(SeqCst), 2);

    let (fetches, reqwest_source) = counted();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(
            AuthMiddleware::new(reqwest_source)
                .origin(format!("http://{addr}"))
                .unwrap()
                .allow_http_loopback(true)
                .rejection_policy(policy),
        )
        .build();
    let res = client.get(url).send().await.unwrap();
    assert_eq!(res.headers()["x-session"], "ok", "the headers came back");
    assert_eq!(res.headers()["content-type"], "application/json");
    assert_eq!(fetches.load(SeqCst), 2);
}

/// The fetches the source saw, in order, and that it never ran two at once.
fn assert_fetches(
    log: &std::sync::Mutex<Vec<(FetchReason, Option<String>)>>,
    most_running: &AtomicUsize,
    expected: &[(FetchReason, Option<&str>)],
) {
    let expected: Vec<_> = expected
        .iter()
        .map(|(reason, scope)| (*reason, scope.map(str::to_owned)))
        .collect();
    assert_eq!(*log.lock().unwrap(), expected);
    assert_eq!(most_running.load(SeqCst), 1, "never two fetches at once");
}

type MockReq = Request<tower_client_auth::ReplayBody<Full<Bytes>>>;

fn bearer(req: &MockReq) -> String {
    req.headers()["authorization"].to_str().unwrap().to_owned()
}

fn lacks_scope_w() -> http::Response<&'static str> {
    lacks_scope("w")
}

/// A 403 saying the token lacks `scope`.
fn lacks_scope(scope: &str) -> http::Response<&'static str> {
    http::Response::builder()
        .status(403)
        .header(
            "www-authenticate",
            format!(r#"Bearer error="insufficient_scope", scope="{scope}""#),
        )
        .body("")
        .unwrap()
}

type MockApi = tower_test::mock::Handle<MockReq, http::Response<&'static str>>;
type Call = tokio::task::JoinHandle<Result<http::Response<&'static str>, BoxError>>;
type Reply = tower_test::mock::SendResponse<http::Response<&'static str>>;

/// The next request the mock API gets, within 10 s (a test that waits for a request
/// that never comes fails rather than hangs).
async fn next_request(api: &mut MockApi) -> (MockReq, Reply) {
    tokio::time::timeout(Duration::from_secs(10), api.next_request())
        .await
        .expect("no request came within 10 s")
        .expect("the mock API is gone")
}

/// The next `n` requests the mock API gets, each answered 200: path and credential of
/// each, sorted.
async fn answered_ok(api: &mut MockApi, n: usize) -> Vec<String> {
    let mut sent = Vec::new();
    for _ in 0..n {
        let (req, reply) = next_request(api).await;
        sent.push(format!("{} {}", req.uri().path(), bearer(&req)));
        reply.send_response(http::Response::new(""));
    }
    sent.sort();
    sent
}

/// A layer with step-up on over a mock API, and the mock's handle.
fn step_up_over_mock<P: tower_client_auth::CredentialSource>(
    layer: AuthLayer<P>,
) -> (
    tower_client_auth::AddCredential<
        tower_test::mock::Mock<MockReq, http::Response<&'static str>>,
        P,
    >,
    MockApi,
) {
    let (inner, api) = tower_test::mock::pair::<MockReq, http::Response<&'static str>>();
    (layer.any_https_origin().step_up(true).layer(inner), api)
}

/// A layer over the mock API, as the step-up tests send through it.
trait MockSvc:
    tower::Service<
        Request<Full<Bytes>>,
        Response = http::Response<&'static str>,
        Error = BoxError,
        Future: Send,
    > + Clone
    + Send
    + 'static
{
}

impl<S> MockSvc for S where
    S: tower::Service<
            Request<Full<Bytes>>,
            Response = http::Response<&'static str>,
            Error = BoxError,
            Future: Send,
        > + Clone
        + Send
        + 'static
{
}

/// Sends `path` through `svc` and answers it 200 at the mock API: the credential it
/// carried.
async fn sent_ok<S: MockSvc>(svc: &S, api: &mut MockApi, path: &str) -> String {
    let call = tokio::spawn(svc.clone().oneshot(support::get(path)));
    let (req, reply) = next_request(api).await;
    reply.send_response(http::Response::new(""));
    assert_eq!(call.await.unwrap().unwrap().status(), 200, "{path}");
    bearer(&req)
}

/// Takes the next request off the mock API, answers it 200 and waits for `call`, which
/// sent it: that request, as the API got it.
async fn answer_ok(api: &mut MockApi, call: Call) -> MockReq {
    let (req, reply) = next_request(api).await;
    reply.send_response(http::Response::new(""));
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
    req
}

/// Sends `/a`, then `/b` through `svc`, and takes each off the mock API: both calls, both
/// requests as the API got them, both reply handles.
async fn two_in_flight<S: MockSvc>(
    svc: &S,
    api: &mut MockApi,
) -> ([Call; 2], [MockReq; 2], [Reply; 2]) {
    let first = tokio::spawn(svc.clone().oneshot(support::get("/a")));
    let (req_a, reply_a) = next_request(api).await;
    let second = tokio::spawn(svc.clone().oneshot(support::get("/b")));
    let (req_b, reply_b) = next_request(api).await;
    ([first, second], [req_a, req_b], [reply_a, reply_b])
}

/// World: two requests carry the first credential; the first one's 403 steps up, and the
/// second one's 403 arrives only after the wider credential is installed. Proves: the
/// late 403 starts no second step-up; it is replayed with the credential already there.
#[tokio::test]
async fn a_late_insufficient_scope_uses_the_step_up_already_made() {
    let source = support::TestSource::new();
    let (svc, mut api) = step_up_over_mock(AuthLayer::new(source.clone()));
    let ([first, second], [req_a, req_b], [reply_a, reply_b]) = two_in_flight(&svc, &mut api).await;
    assert_eq!(
        (bearer(&req_a), bearer(&req_b)),
        ("Bearer token-1".into(), "Bearer token-1".into())
    );
    reply_a.send_response(lacks_scope_w());
    let (replay_a, reply) = next_request(&mut api).await;
    assert_eq!(bearer(&replay_a), "Bearer token-2");
    reply.send_response(http::Response::new(""));
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    // Only now does the second request's answer come.
    reply_b.send_response(lacks_scope_w());
    let (replay_b, reply) = next_request(&mut api).await;
    assert_eq!(bearer(&replay_b), "Bearer token-2");
    reply.send_response(http::Response::new(""));
    assert_eq!(second.await.unwrap().unwrap().status(), 200);
    let reasons: Vec<_> = source.log().into_iter().map(|(_, r)| r).collect();
    assert_eq!(reasons, [FetchReason::Initial, FetchReason::StepUp]);
}

/// A source issuing `t-N` (valid for `lifetime`), recording each fetch's reason and scope,
/// whose fetches numbered in `held` each wait for one permit of the returned semaphore;
/// and the most fetches it ever ran at once.
#[allow(clippy::type_complexity)]
fn held_source(
    held: &[usize],
    lifetime: Duration,
    step_up_fails: bool,
) -> (
    impl tower_client_auth::CredentialSource,
    Arc<std::sync::Mutex<Vec<(FetchReason, Option<String>)>>>,
    Arc<tokio::sync::Semaphore>,
    Arc<AtomicUsize>,
) {
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let running = Arc::new(AtomicUsize::new(0));
    let most_running = Arc::new(AtomicUsize::new(0));
    let source = {
        let (log, gate) = (log.clone(), gate.clone());
        let most = most_running.clone();
        let held = held.to_vec();
        source_fn(move |cx: FetchContext| {
            let n = {
                let mut log = log.lock().unwrap();
                log.push((cx.reason(), cx.required_scope().map(str::to_owned)));
                log.len() - 1
            };
            let fails = step_up_fails && cx.reason() == FetchReason::StepUp;
            let (gate, running, most) = (gate.clone(), running.clone(), most.clone());
            let held = held.contains(&n);
            async move {
                most.fetch_max(running.fetch_add(1, SeqCst) + 1, SeqCst);
                // Counted out however the fetch ends, a cancelled one too.
                let _running = Running(running);
                if held {
                    gate.acquire().await.unwrap().forget();
                }
                if fails {
                    return Err("no wider grant for this client".into());
                }
                Ok::<_, BoxError>(Credential::bearer(format!("t-{n}"))?.expires_in(lifetime))
            }
        })
    };
    (source, log, gate, most_running)
}

/// One fetch running, counted out when dropped.
struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

/// Lets the tasks of a current-thread runtime run a while.
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

/// Waits until `done` holds (at most 10 s).
async fn wait_for(done: impl Fn() -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("waited 10 s");
}

/// World: two requests carry `t-0`; the first is rejected (401) and its refetch is
/// still running when the second's answer says `t-0` lacks the scope `w`. Proves, with
/// and without a store: the step-up does not join the refetch (which asks for no scope,
/// so its token would lack `w` too and the step-up would count as failed), nor take the
/// refetch's token from the store: it asks for `w` in a fetch of its own, chained after
/// the running one (never two at once), and the second request is replayed with that
/// token. The first is replayed with the refetch's.
#[tokio::test]
async fn a_step_up_during_a_refetch_asks_for_its_scope() {
    for store in [false, true] {
        let (source, log, gate, most_running) = held_source(&[1], Duration::from_secs(3600), false);
        let mut cache = tower_client_auth::CredentialCache::builder(source);
        if store {
            cache = cache.store(tower_client_auth::MemoryStore::new());
        }
        let layer = AuthLayer::with_cache(cache.build().unwrap());
        let (svc, mut api) = step_up_over_mock(layer);
        let ([first, second], [req_a, req_b], [reply_a, reply_b]) =
            two_in_flight(&svc, &mut api).await;
        assert_eq!(
            (bearer(&req_a), bearer(&req_b)),
            ("Bearer t-0".into(), "Bearer t-0".into())
        );
        reply_a.send_response(http::Response::builder().status(401).body("").unwrap());
        wait_for(|| log.lock().unwrap().len() == 2).await;
        reply_b.send_response(lacks_scope_w());
        // The second request asks for its step-up before the refetch ends.
        settle().await;
        gate.add_permits(1);
        assert_eq!(
            answered_ok(&mut api, 2).await,
            ["/a Bearer t-1", "/b Bearer t-2"],
            "store: {store}"
        );
        assert_eq!(first.await.unwrap().unwrap().status(), 200);
        assert_eq!(second.await.unwrap().unwrap().status(), 200);
        assert_fetches(
            &log,
            &most_running,
            &[
                (FetchReason::Initial, None),
                (FetchReason::Rejected, None),
                (FetchReason::StepUp, Some("w")),
            ],
        );
    }
}

/// World: as above, but a third request needing a credential comes while the refetch
/// runs and the step-up waits behind it, and the step-up fails (the source cannot widen
/// the grant). Proves: the third request gets the refetch's token (it does not wait for
/// the step-up, nor take its failure); the step-up's request gets its 403 back, marked.
#[tokio::test]
async fn a_request_needing_a_credential_never_takes_a_step_ups_failure() {
    let (source, log, gate, most_running) = held_source(&[1], Duration::from_secs(3600), true);
    let (svc, mut api) = step_up_over_mock(AuthLayer::new(source));
    let ([first, second], _, [reply_a, reply_b]) = two_in_flight(&svc, &mut api).await;
    reply_a.send_response(http::Response::builder().status(401).body("").unwrap());
    wait_for(|| log.lock().unwrap().len() == 2).await;
    reply_b.send_response(lacks_scope_w());
    settle().await;
    let third = tokio::spawn(svc.clone().oneshot(support::get("/c")));
    settle().await;
    gate.add_permits(1);
    assert_eq!(
        answered_ok(&mut api, 2).await,
        ["/a Bearer t-1", "/c Bearer t-1"]
    );
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    assert_eq!(third.await.unwrap().unwrap().status(), 200);
    let second = second.await.unwrap().unwrap();
    assert_eq!(second.status(), 403);
    assert_eq!(
        second.extensions().get::<NotReplayed>(),
        Some(&NotReplayed::InsufficientScope)
    );
    assert_fetches(
        &log,
        &most_running,
        &[
            (FetchReason::Initial, None),
            (FetchReason::Rejected, None),
            (FetchReason::StepUp, Some("w")),
        ],
    );
}

/// Credentials living 2 s: their soft window (a quarter) starts at 1.5 s.
const SHORT: Duration = Duration::from_secs(2);

/// A cache of `source` (issuing `SHORT`-lived credentials) warmed up with `t-0`, and
/// then left until `t-0` is in its soft window: its next use starts the background
/// refresh.
async fn refreshing_cache<P: tower_client_auth::CredentialSource>(
    source: P,
) -> tower_client_auth::CredentialCache<P> {
    let cache = tower_client_auth::CredentialCache::builder(source)
        .hard_window(Duration::from_millis(100))
        .window_jitter(0.0)
        .build()
        .unwrap();
    cache.warm_up().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1600)).await;
    cache
}

/// World: `t-0` is in its soft window, so the request carrying it starts a background
/// refresh (held); the API answers that `t-0` lacks the scope `w` while it runs.
/// Proves, through Tower and through reqwest: the step-up asks for `w` in a fetch
/// chained after the refresh, and the replay carries that token, not the refresh's.
#[tokio::test]
async fn a_step_up_during_a_background_refresh_asks_for_its_scope() {
    // Tower.
    let (source, log, gate, most_running) = held_source(&[1], SHORT, false);
    let (svc, mut api) = step_up_over_mock(AuthLayer::with_cache(refreshing_cache(source).await));
    let call = tokio::spawn(svc.clone().oneshot(support::get("/b")));
    let (req, respond) = next_request(&mut api).await;
    assert_eq!(bearer(&req), "Bearer t-0");
    wait_for(|| log.lock().unwrap().len() == 2).await;
    respond.send_response(lacks_scope_w());
    settle().await;
    gate.add_permits(1);
    let (replay, respond) = next_request(&mut api).await;
    assert_eq!(bearer(&replay), "Bearer t-2", "the step-up's token");
    respond.send_response(http::Response::new(""));
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
    let reasons = log.lock().unwrap().clone();
    assert_eq!(
        reasons,
        [
            (FetchReason::Initial, None),
            (FetchReason::Expiring, None),
            (FetchReason::StepUp, Some("w".to_owned())),
        ]
    );
    assert_eq!(most_running.load(SeqCst), 1, "never two fetches at once");

    // reqwest, against a loopback API that wants `t-2` on `/b`.
    let (source, log, gate, most_running) = held_source(&[1], SHORT, false);
    let cache = refreshing_cache(source).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let addr = serve(move |req: Request<hyper::body::Incoming>| {
        counted.fetch_add(1, SeqCst);
        let auth = req.headers()["authorization"].to_str().unwrap().to_owned();
        async move {
            if auth == "Bearer t-2" {
                reply(StatusCode::OK, json!({}))
            } else {
                challenge(
                    StatusCode::FORBIDDEN,
                    r#"Bearer error="insufficient_scope", scope="w""#,
                )
            }
        }
    })
    .await;
    let client = reqwest_client_of(
        AuthMiddleware::with_cache(cache)
            .origin(format!("http://{addr}"))
            .unwrap()
            .allow_http_loopback(true)
            .step_up(true),
    );
    let call = tokio::spawn(async move { reqwest_get(&client, format!("http://{addr}/b")).await });
    // The refresh is held until the step-up has been asked for (the 403 has come back
    // well within 100 ms on loopback).
    wait_for(|| log.lock().unwrap().len() == 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.add_permits(1);
    assert_eq!(call.await.unwrap(), (StatusCode::OK, None, None));
    assert_eq!(calls.load(SeqCst), 2, "the 403, then the replay with t-2");
    assert_fetches(
        &log,
        &most_running,
        &[
            (FetchReason::Initial, None),
            (FetchReason::Expiring, None),
            (FetchReason::StepUp, Some("w")),
        ],
    );
}

/// World: two requests carry `t-0`; the first's answer says it lacks `w`, and while
/// that step-up fetches (held) the second's says it lacks `x`. Proves: the second does
/// not join a step-up that asks for `w` alone (its replay would lack `x` again, and
/// step-ups would back off): a step-up of its own, chained after the first (never two
/// at once), asks for both, and each request is replayed with a token granted its
/// scope. A third request lacking `w` joins the first step-up, which asks for it: no
/// third one starts.
#[tokio::test]
async fn step_ups_for_different_scopes_each_ask_for_theirs() {
    let (source, log, gate, most_running) = held_source(&[1], Duration::from_secs(3600), false);
    let (svc, mut api) = step_up_over_mock(AuthLayer::new(source));
    let ([first, second], _, [reply_a, reply_b]) = two_in_flight(&svc, &mut api).await;
    let third = tokio::spawn(svc.clone().oneshot(support::get("/c")));
    let (_, reply_c) = next_request(&mut api).await;
    reply_a.send_response(lacks_scope("w"));
    wait_for(|| log.lock().unwrap().len() == 2).await;
    reply_b.send_response(lacks_scope("x"));
    settle().await;
    reply_c.send_response(lacks_scope("w"));
    settle().await;
    gate.add_permits(1);
    assert_eq!(
        answered_ok(&mut api, 3).await,
        ["/a Bearer t-1", "/b Bearer t-2", "/c Bearer t-1"]
    );
    for call in [first, second, third] {
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }
    assert_fetches(
        &log,
        &most_running,
        &[
            (FetchReason::Initial, None),
            (FetchReason::StepUp, Some("w")),
            (FetchReason::StepUp, Some("w x")),
        ],
    );
}

/// World: a step-up's task dies: cancelled with its runtime while it fetches (held), or
/// refused by a runtime that has shut down. Proves: that backs step-ups off and nothing
/// else: the next `insufficient_scope` goes back at once with no fetch, and after an
/// invalidation the next request's fetch starts at once (not backed off as after a
/// failed refresh) and the request goes through.
#[test]
fn a_step_up_whose_task_dies_backs_off_step_ups_only() {
    for case in ["cancelled", "refused"] {
        let main = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (source, log, gate, most_running) = held_source(&[1], Duration::from_secs(3600), false);
        let layer = AuthLayer::new(source);
        let cache = layer.cache().clone();
        main.block_on(cache.warm_up()).unwrap();
        let (svc, mut api) = step_up_over_mock(layer);
        let answer_lacking_w = |api: &mut MockApi| {
            main.block_on(async {
                let (req, reply) = next_request(api).await;
                assert_eq!(bearer(&req), "Bearer t-0", "{case}");
                reply.send_response(lacks_scope_w());
            })
        };
        if case == "cancelled" {
            let dying = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let _call = dying.spawn(svc.clone().oneshot(support::get("/a")));
            answer_lacking_w(&mut api);
            main.block_on(wait_for(|| log.lock().unwrap().len() == 2));
            dying.shutdown_background();
        } else {
            let handle = support::dead_runtime();
            let call = std::thread::spawn({
                let svc = svc.clone();
                move || {
                    let _entered = handle.enter();
                    support::block_on(svc.oneshot(support::get("/a")))
                }
            });
            answer_lacking_w(&mut api);
            let res = call.join().unwrap().unwrap();
            assert_eq!(res.status(), 403);
        }
        main.block_on(wait_for(|| cache.stats().fetch_failures == 1));
        // The second fetch, if it is not the dead step-up's, is not held.
        gate.add_permits(1);
        main.block_on(async {
            let call = tokio::spawn(svc.clone().oneshot(support::get("/b")));
            let (req, reply) = next_request(&mut api).await;
            assert_eq!(bearer(&req), "Bearer t-0", "{case}");
            reply.send_response(lacks_scope_w());
            let res = call.await.unwrap().unwrap();
            assert_eq!(res.status(), 403, "{case}: step-ups back off");
            assert_eq!(
                res.extensions().get::<NotReplayed>(),
                Some(&NotReplayed::InsufficientScope)
            );
            assert!(cache.handle().invalidate());
            let call = tokio::spawn(svc.clone().oneshot(support::get("/c")));
            let (req, reply) = next_request(&mut api).await;
            let fetched = if case == "cancelled" { "t-2" } else { "t-1" };
            assert_eq!(bearer(&req), format!("Bearer {fetched}"), "{case}");
            reply.send_response(http::Response::new(""));
            assert_eq!(call.await.unwrap().unwrap().status(), 200, "{case}");
        });
        let mut expected = vec![(FetchReason::Initial, None)];
        if case == "cancelled" {
            expected.push((FetchReason::StepUp, Some("w")));
        }
        expected.push((FetchReason::Invalidated, None));
        assert_fetches(&log, &most_running, &expected);
    }
}

/// World: `t-0` is in its soft window; `/a` and `/b` carry it; `/a`'s sending starts the
/// background refresh (held), and its answer says `t-0` lacks `w`, so a step-up is
/// chained after the refresh. The refresh installs `t-1`, the step-up starts (held), and
/// only then does `/b`'s answer say `t-0` lacks `w`. Proves: `/b` is not replayed with
/// `t-1` (newer, but granted no `w`): it waits for the step-up under way and is replayed
/// with its token, and no further step-up starts.
#[tokio::test]
async fn a_late_insufficient_scope_waits_for_the_step_up_under_way() {
    let (source, log, gate, most_running) = held_source(&[1, 2], SHORT, false);
    let (svc, mut api) = step_up_over_mock(AuthLayer::with_cache(refreshing_cache(source).await));
    let ([first, second], _, [reply_a, reply_b]) = two_in_flight(&svc, &mut api).await;
    wait_for(|| log.lock().unwrap().len() == 2).await;
    reply_a.send_response(lacks_scope_w());
    settle().await;
    gate.add_permits(1);
    wait_for(|| log.lock().unwrap().len() == 3).await;
    reply_b.send_response(lacks_scope_w());
    settle().await;
    gate.add_permits(1);
    assert_eq!(
        answered_ok(&mut api, 2).await,
        ["/a Bearer t-2", "/b Bearer t-2"]
    );
    for call in [first, second] {
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }
    assert_fetches(
        &log,
        &most_running,
        &[
            (FetchReason::Initial, None),
            (FetchReason::Expiring, None),
            (FetchReason::StepUp, Some("w")),
        ],
    );
}

/// World: the application invalidates `t-0` while a request carrying it is in flight,
/// and that request's answer then says `t-0` lacks `w`. Proves: the step-up, with no
/// credential in place, is told what the invalidation dropped (a source must not hand it
/// back); if the step-up fails, the next ordinary fetch is still the invalidation's, and
/// told the same.
#[tokio::test]
async fn a_step_up_after_an_invalidation_is_told_what_it_dropped() {
    for step_up_fails in [false, true] {
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let source = {
            let log = log.clone();
            source_fn(move |cx: FetchContext| {
                let n = {
                    let mut log = log.lock().unwrap();
                    log.push((cx.reason(), cx.previous().cloned()));
                    log.len() - 1
                };
                let fails = step_up_fails && cx.reason() == FetchReason::StepUp;
                async move {
                    if fails {
                        return Err("no wider grant for this client".into());
                    }
                    Ok::<_, BoxError>(Credential::bearer(format!("t-{n}"))?)
                }
            })
        };
        let layer = AuthLayer::new(source);
        let cache = layer.cache().clone();
        let t0 = cache.credential().await.unwrap();
        let (svc, mut api) = step_up_over_mock(layer);
        let call = tokio::spawn(svc.clone().oneshot(support::get("/a")));
        let (_, reply) = next_request(&mut api).await;
        assert!(cache.handle().invalidate());
        reply.send_response(lacks_scope_w());
        let mut expected = vec![
            (FetchReason::Initial, None),
            (FetchReason::StepUp, Some(t0.clone())),
        ];
        if step_up_fails {
            assert_eq!(call.await.unwrap().unwrap().status(), 403);
            let call = tokio::spawn(svc.clone().oneshot(support::get("/c")));
            let (req, reply) = next_request(&mut api).await;
            assert_eq!(bearer(&req), "Bearer t-2");
            reply.send_response(http::Response::new(""));
            assert_eq!(call.await.unwrap().unwrap().status(), 200);
            expected.push((FetchReason::Invalidated, Some(t0)));
        } else {
            let replay = answer_ok(&mut api, call).await;
            assert_eq!(bearer(&replay), "Bearer t-1");
        }
        assert_eq!(
            *log.lock().unwrap(),
            expected,
            "step-up fails: {step_up_fails}"
        );
    }
}

/// World: a step-up is fetching (held), or chained after a background refresh and not
/// started yet, when the application hands over a credential of its own (`replace`).
/// Proves: the step-up's request is replayed with the step-up's token (the wider grant it
/// asked for, not the handed-over one, which was granted no `w`), while the handed-over
/// credential stays the one every other request gets.
#[tokio::test]
async fn a_replacement_during_a_step_up_leaves_the_step_up_its_token() {
    for queued in [false, true] {
        let (source, log, gate, most_running) = held_source(&[1, 2], SHORT, false);
        let cache = refreshing_cache(source).await;
        let handle = cache.handle();
        let (svc, mut api) = step_up_over_mock(AuthLayer::with_cache(cache));
        let first = tokio::spawn(svc.clone().oneshot(support::get("/a")));
        let (_, reply) = next_request(&mut api).await;
        // `/a`'s sending started the background refresh (held).
        wait_for(|| log.lock().unwrap().len() == 2).await;
        reply.send_response(lacks_scope_w());
        settle().await;
        if !queued {
            gate.add_permits(1);
            wait_for(|| log.lock().unwrap().len() == 3).await;
        }
        assert!(handle.replace(Credential::bearer("mine").unwrap()).unwrap());
        gate.add_permits(2);
        let replay = answer_ok(&mut api, first).await;
        assert_eq!(bearer(&replay), "Bearer t-2", "queued: {queued}");
        let next = tokio::spawn(svc.clone().oneshot(support::get("/c")));
        let (req, reply) = next_request(&mut api).await;
        assert_eq!(bearer(&req), "Bearer mine", "queued: {queued}");
        reply.send_response(http::Response::new(""));
        assert_eq!(next.await.unwrap().unwrap().status(), 200);
        assert_fetches(
            &log,
            &most_running,
            &[
                (FetchReason::Initial, None),
                (FetchReason::Expiring, None),
                (FetchReason::StepUp, Some("w")),
            ],
        );
    }
}

/// World: step-up A (for `w`) is fetching (held) and step-up AB (for `w x`) is chained
/// after it when the application invalidates the credential. Proves (review finding):
/// the invalidation reaches A although AB took its place among the step-ups: A's token
/// goes to A's own request only, and a request sent while AB fetches gets AB's token
/// (fetched after the invalidation), never A's.
#[tokio::test]
async fn an_invalidation_reaches_a_step_up_a_wider_one_followed() {
    let (source, log, gate, most_running) = held_source(&[1, 2], Duration::from_secs(3600), false);
    let layer = AuthLayer::new(source);
    let handle = layer.cache().handle();
    let (svc, mut api) = step_up_over_mock(layer);
    let ([first, second], _, [reply_a, reply_b]) = two_in_flight(&svc, &mut api).await;
    reply_a.send_response(lacks_scope("w"));
    wait_for(|| log.lock().unwrap().len() == 2).await;
    reply_b.send_response(lacks_scope("x"));
    settle().await;
    assert!(handle.invalidate());
    gate.add_permits(1);
    let replay = answer_ok(&mut api, first).await;
    assert_eq!(
        (replay.uri().path(), bearer(&replay)),
        ("/a", "Bearer t-1".to_owned())
    );
    wait_for(|| log.lock().unwrap().len() == 3).await;
    let third = tokio::spawn(svc.clone().oneshot(support::get("/c")));
    settle().await;
    gate.add_permits(1);
    assert_eq!(
        answered_ok(&mut api, 2).await,
        ["/b Bearer t-2", "/c Bearer t-2"]
    );
    for call in [second, third] {
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }
    assert_fetches(
        &log,
        &most_running,
        &[
            (FetchReason::Initial, None),
            (FetchReason::StepUp, Some("w")),
            (FetchReason::StepUp, Some("w x")),
        ],
    );
}

/// World: a background refresh is fetching (held); step-up A (for `w`) is chained after
/// it; a request's step-up for `x` (which would ask for `w x`) is refused by a runtime
/// that has shut down; then the application invalidates, and a request needing a
/// credential comes. Proves (review finding): A, chained and no longer the newest
/// step-up, is still waited for: when the refresh ends, A fetches and the request's
/// fetch does not start beside it (never two at once).
#[test]
fn a_dead_wider_step_up_leaves_the_chain_behind_it_intact() {
    let main = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (source, log, gate, most_running) = held_source(&[1, 2], SHORT, false);
    let cache = main.block_on(refreshing_cache(source));
    let handle = cache.handle();
    let (svc, mut api) = step_up_over_mock(AuthLayer::with_cache(cache));
    let first = main.spawn(svc.clone().oneshot(support::get("/a")));
    main.block_on(async {
        let (req, reply) = next_request(&mut api).await;
        assert_eq!(bearer(&req), "Bearer t-0");
        wait_for(|| log.lock().unwrap().len() == 2).await;
        reply.send_response(lacks_scope("w"));
        settle().await;
    });
    let entered = support::dead_runtime();
    let second = std::thread::spawn({
        let svc = svc.clone();
        move || {
            let _entered = entered.enter();
            support::block_on(svc.oneshot(support::get("/b")))
        }
    });
    main.block_on(async {
        let (req, reply) = next_request(&mut api).await;
        assert_eq!(bearer(&req), "Bearer t-0");
        reply.send_response(lacks_scope("x"));
    });
    assert_eq!(second.join().unwrap().unwrap().status(), 403);
    assert!(handle.invalidate());
    let third = main.spawn(svc.clone().oneshot(support::get("/c")));
    main.block_on(async {
        settle().await;
        gate.add_permits(1);
        wait_for(|| log.lock().unwrap().len() >= 3).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            log.lock().unwrap().len(),
            3,
            "a fetch started beside the step-up"
        );
        gate.add_permits(1);
        assert_eq!(
            answered_ok(&mut api, 2).await,
            ["/a Bearer t-2", "/c Bearer t-2"]
        );
        assert_eq!(first.await.unwrap().unwrap().status(), 200);
        assert_eq!(third.await.unwrap().unwrap().status(), 200);
    });
    assert_fetches(
        &log,
        &most_running,
        &[
            (FetchReason::Initial, None),
            (FetchReason::Expiring, None),
            (FetchReason::StepUp, Some("w")),
        ],
    );
}

/// World: a cache over a store; while the first fetch runs (held), the application
/// hands over a credential already in its hard window, so the fetch's `t-0` goes to the
/// request that waited for it only (and into the store). The API rejects that request's
/// `t-0` either after the next request has refreshed the handed-over credential (and
/// taken `t-0` from the store, as current), or before. Proves (found by
/// tests/interleavings.rs, then a review): either way the rejection drops `t-0`: the
/// first request is replayed with a new token from the source, not `t-0` again, and the
/// next request gets the new one too (before the fix: with the rejection after, the
/// 401 went back unreplayed and `t-0` stayed current; with it before, the store handed
/// `t-0` back as the rejected request's replacement).
#[tokio::test]
async fn a_token_handed_only_to_its_waiters_is_never_replayed_after_its_rejection() {
    for rejected_first in [false, true] {
        let (source, log, gate, most_running) = held_source(&[0], Duration::from_secs(3600), false);
        let cache = tower_client_auth::CredentialCache::builder(source)
            .store(tower_client_auth::MemoryStore::new())
            .build()
            .unwrap();
        let handle = cache.handle();
        let (svc, mut api) = step_up_over_mock(AuthLayer::with_cache(cache));
        let first = tokio::spawn(svc.clone().oneshot(support::get("/a")));
        wait_for(|| log.lock().unwrap().len() == 1).await;
        let now = std::time::SystemTime::now();
        let stale = Credential::bearer("handed-over")
            .unwrap()
            .issued_at(now - Duration::from_secs(3600))
            .expires_at(now + Duration::from_secs(5));
        assert!(handle.replace(stale).unwrap());
        gate.add_permits(1);
        let (req_a, reply_a) = next_request(&mut api).await;
        assert_eq!(bearer(&req_a), "Bearer t-0");
        let mut fetches = vec![(FetchReason::Initial, None)];
        if !rejected_first {
            let second = tokio::spawn(svc.clone().oneshot(support::get("/b")));
            let (req_b, reply_b) = next_request(&mut api).await;
            assert_eq!(bearer(&req_b), "Bearer t-0", "taken from the store");
            reply_b.send_response(http::Response::new(""));
            assert_eq!(second.await.unwrap().unwrap().status(), 200);
            fetches.push((FetchReason::Rejected, None));
        } else {
            fetches.push((FetchReason::Expiring, None));
        }
        reply_a.send_response(http::Response::builder().status(401).body("").unwrap());
        let replay = answer_ok(&mut api, first).await;
        assert_eq!(
            bearer(&replay),
            "Bearer t-1",
            "rejected first: {rejected_first}: replayed with a new token"
        );
        let next = tokio::spawn(svc.clone().oneshot(support::get("/c")));
        assert_eq!(answered_ok(&mut api, 1).await, ["/c Bearer t-1"]);
        assert_eq!(next.await.unwrap().unwrap().status(), 200);
        assert_fetches(&log, &most_running, &fetches);
    }
}

/// A layer with step-up on over a cache of `held_source` (nothing held) whose backoff
/// starts at `backoff`; `/a`, `/b` and `/c` sent, each answered that `t-0` lacks `w`.
/// The service, the mock API, the source's log and most-running count, and the calls.
async fn three_lacking_w(
    backoff: Duration,
) -> (
    tower_client_auth::AddCredential<
        tower_test::mock::Mock<MockReq, http::Response<&'static str>>,
        impl tower_client_auth::CredentialSource,
    >,
    MockApi,
    Arc<std::sync::Mutex<Vec<(FetchReason, Option<String>)>>>,
    Arc<AtomicUsize>,
    Vec<Call>,
) {
    let (source, log, _, most_running) = held_source(&[], Duration::from_secs(3600), false);
    let cache = tower_client_auth::CredentialCache::builder(source)
        .backoff(backoff, Duration::from_secs(30))
        .build()
        .unwrap();
    let (svc, mut api) = step_up_over_mock(AuthLayer::with_cache(cache));
    let calls: Vec<_> = ["/a", "/b", "/c"]
        .into_iter()
        .map(|path| tokio::spawn(svc.clone().oneshot(support::get(path))))
        .collect();
    for _ in 0..3 {
        let (req, reply) = next_request(&mut api).await;
        assert_eq!(bearer(&req), "Bearer t-0");
        reply.send_response(lacks_scope_w());
    }
    (svc, api, log, most_running, calls)
}

/// World: three requests lack the same scope at once; the one step-up they share brings
/// a token the API still finds lacking for all three replays. Proves (review finding):
/// that is one fruitless step-up, not three: its backoff is the first step's (here at
/// most 200 ms), so a request lacking the scope 250 ms later steps up again and is
/// replayed with the new token (counted three times, the backoff was 400-800 ms and the
/// request got its 403 back unreplayed).
#[tokio::test]
async fn replays_of_one_step_up_that_all_still_lack_the_scope_count_one_failure() {
    let (svc, mut api, log, most_running, calls) =
        three_lacking_w(Duration::from_millis(200)).await;
    for _ in 0..3 {
        let (req, reply) = next_request(&mut api).await;
        assert_eq!(bearer(&req), "Bearer t-1", "the step-up's replay");
        reply.send_response(lacks_scope_w());
    }
    for call in calls {
        let res = call.await.unwrap().unwrap();
        assert_eq!(res.status(), 403);
        assert_eq!(
            res.extensions().get::<NotReplayed>(),
            Some(&NotReplayed::AlreadyReplayed)
        );
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    let later = tokio::spawn(svc.clone().oneshot(support::get("/d")));
    let (req, reply) = next_request(&mut api).await;
    assert_eq!(bearer(&req), "Bearer t-1");
    reply.send_response(lacks_scope_w());
    let replay = answer_ok(&mut api, later).await;
    assert_eq!(bearer(&replay), "Bearer t-2", "stepped up again");
    assert_fetches(
        &log,
        &most_running,
        &[
            (FetchReason::Initial, None),
            (FetchReason::StepUp, Some("w")),
            (FetchReason::StepUp, Some("w")),
        ],
    );
}

/// World: a source that hands out the same credential every time (a fixed key, a
/// revoked token not rotated yet); two requests carry it and both get a 401, the second
/// only after the first one's refetch brought the same value back. Proves (review
/// finding): one refetch, one rejection counted; both 401s come back marked
/// `SameCredential` (the late one is not taken for a rejection of the refetched copy,
/// which cost a second refetch and a `FreshCredentialRejected`).
#[tokio::test]
async fn a_late_401_for_a_credential_the_source_hands_back_costs_no_second_refetch() {
    let fetches = Arc::new(AtomicUsize::new(0));
    let source = {
        let fetches = fetches.clone();
        source_fn(move |_| {
            fetches.fetch_add(1, SeqCst);
            async { Credential::bearer("fixed") }
        })
    };
    let layer = AuthLayer::new(source);
    let cache = layer.cache().clone();
    let (svc, mut api) = step_up_over_mock(layer);
    let ([first, second], _, [reply_a, reply_b]) = two_in_flight(&svc, &mut api).await;
    reply_a.send_response(http::Response::builder().status(401).body("").unwrap());
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), 401);
    assert_eq!(
        first.extensions().get::<NotReplayed>(),
        Some(&NotReplayed::SameCredential)
    );
    reply_b.send_response(http::Response::builder().status(401).body("").unwrap());
    let second = second.await.unwrap().unwrap();
    assert_eq!(second.status(), 401);
    assert_eq!(
        second.extensions().get::<NotReplayed>(),
        Some(&NotReplayed::SameCredential)
    );
    assert_eq!(fetches.load(SeqCst), 2, "one refetch");
    assert_eq!(cache.stats().rejections, 1);
}

/// World: the API accepts the token on `/good` and answers 401 on `/bad` whatever the
/// token (a resource's own 401, which many APIs send for 403), five times over. Proves
/// (review finding): each `/bad` costs one token request, for its first attempt's
/// rejection; its replay's 401 does not invalidate the new token in turn (that cost a
/// second token request per `/bad`, the fresh-rejection rule never applying since each
/// first rejection is of an accepted token).
#[tokio::test]
async fn a_resources_own_401_costs_one_token_request_per_request() {
    let (source, log, _, most_running) = held_source(&[], Duration::from_secs(3600), false);
    let (svc, mut api) = step_up_over_mock(AuthLayer::new(source));
    for round in 0..5 {
        assert_eq!(
            sent_ok(&svc, &mut api, "/good").await,
            format!("Bearer t-{round}")
        );
        let bad = tokio::spawn(svc.clone().oneshot(support::get("/bad")));
        for token in [round, round + 1] {
            let (req, reply) = next_request(&mut api).await;
            assert_eq!(bearer(&req), format!("Bearer t-{token}"));
            reply.send_response(http::Response::builder().status(401).body("").unwrap());
        }
        let bad = bad.await.unwrap().unwrap();
        assert_eq!(bad.status(), 401);
        assert_eq!(
            bad.extensions().get::<NotReplayed>(),
            Some(&NotReplayed::AlreadyReplayed)
        );
    }
    let mut fetches = vec![(FetchReason::Initial, None)];
    fetches.extend([(FetchReason::Rejected, None); 5]);
    assert_fetches(&log, &most_running, &fetches);
}

/// World: a source that hands out its cached token again for an expiry's refresh (as a
/// sidecar or a metadata service does) and a new one only when told it was rejected. A
/// request carries `v`; meanwhile the soft-window refresh brings `v` back as a new
/// entry; then the API rejects the request. Proves (review finding): the rejection is of
/// the `v` in place, though the request carried the entry before it: `v` is invalidated,
/// a new token fetched, and the request replayed with it (not returned `SameCredential`,
/// leaving the revoked `v` in use).
#[tokio::test]
async fn a_rejection_of_a_superseded_entry_of_the_same_value_invalidates_it() {
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let source = {
        let log = log.clone();
        source_fn(move |cx: FetchContext| {
            let n = {
                let mut log = log.lock().unwrap();
                log.push(cx.reason());
                log.len()
            };
            let token = match cx.reason() {
                FetchReason::Rejected => format!("fresh-{n}"),
                _ => "v".to_owned(),
            };
            async move {
                Ok::<_, BoxError>(Credential::bearer(token)?.expires_in(Duration::from_millis(400)))
            }
        })
    };
    let cache = tower_client_auth::CredentialCache::builder(source)
        .window_jitter(0.0)
        .build()
        .unwrap();
    let (svc, mut api) = step_up_over_mock(AuthLayer::with_cache(cache));
    let first = tokio::spawn(svc.clone().oneshot(support::get("/a")));
    let (req_a, reply_a) = next_request(&mut api).await;
    assert_eq!(bearer(&req_a), "Bearer v");
    // Into the soft window (the last quarter): the next request refreshes, and `v` comes
    // back as a new entry.
    tokio::time::sleep(Duration::from_millis(320)).await;
    assert_eq!(sent_ok(&svc, &mut api, "/b").await, "Bearer v");
    wait_for(|| log.lock().unwrap().len() == 2).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    reply_a.send_response(http::Response::builder().status(401).body("").unwrap());
    let replay = answer_ok(&mut api, first).await;
    assert_eq!(
        bearer(&replay),
        "Bearer fresh-3",
        "replayed with a new token"
    );
    assert_eq!(
        *log.lock().unwrap(),
        [
            FetchReason::Initial,
            FetchReason::Expiring,
            FetchReason::Rejected
        ]
    );
}

/// World: three requests lacking `w` share one step-up; of their replays, `/b` and `/c`
/// still lack it and `/a` is accepted, answered in the order `/b`, `/a`, `/c`. Proves
/// (review finding): `/c`'s fruitless replay, after `/a`'s success reset the step-up
/// backoff, backs step-ups off again (it was taken for `/b`'s, counted already): a
/// fourth request lacking `w` right after gets its 403 back, with no token request.
#[tokio::test]
async fn a_fruitless_replay_after_a_step_ups_success_backs_off_again() {
    let (svc, mut api, log, most_running, calls) = three_lacking_w(Duration::from_secs(5)).await;
    let mut replays = std::collections::HashMap::new();
    for _ in 0..3 {
        let (req, reply) = next_request(&mut api).await;
        assert_eq!(bearer(&req), "Bearer t-1");
        replays.insert(req.uri().path().to_owned(), reply);
    }
    for (path, accepted) in [("/b", false), ("/a", true), ("/c", false)] {
        let reply = replays.remove(path).unwrap();
        match accepted {
            true => reply.send_response(http::Response::new("")),
            false => reply.send_response(lacks_scope_w()),
        }
        // Each answer is judged before the next is sent.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let later = tokio::spawn(svc.clone().oneshot(support::get("/d")));
    let (req, reply) = next_request(&mut api).await;
    assert_eq!(bearer(&req), "Bearer t-1");
    reply.send_response(lacks_scope_w());
    let later = tokio::time::timeout(Duration::from_secs(5), later)
        .await
        .expect("stepped up again at once (its replay waits for an answer)")
        .unwrap()
        .unwrap();
    assert_eq!(later.status(), 403);
    assert_fetches(
        &log,
        &most_running,
        &[
            (FetchReason::Initial, None),
            (FetchReason::StepUp, Some("w")),
        ],
    );
}

/// World: a step-up is fetching (held) when the application invalidates the credential.
/// Proves: the step-up's token, fetched across the invalidation, goes to its own request
/// only (its replay); the next request does not get it but a fetch made after the
/// invalidation.
#[tokio::test]
async fn an_invalidation_during_a_step_up_keeps_its_token_out_of_the_cache() {
    let (source, log, gate, most_running) = held_source(&[1], Duration::from_secs(3600), false);
    let layer = AuthLayer::new(source);
    let handle = layer.cache().handle();
    let (svc, mut api) = step_up_over_mock(layer);
    let first = tokio::spawn(svc.clone().oneshot(support::get("/a")));
    let (_, reply) = next_request(&mut api).await;
    reply.send_response(lacks_scope_w());
    wait_for(|| log.lock().unwrap().len() == 2).await;
    assert!(handle.invalidate());
    gate.add_permits(1);
    let replay = answer_ok(&mut api, first).await;
    assert_eq!(bearer(&replay), "Bearer t-1", "the step-up's own request");
    assert_eq!(
        sent_ok(&svc, &mut api, "/c").await,
        "Bearer t-2",
        "not the token fetched across the invalidation"
    );
    assert_fetches(
        &log,
        &most_running,
        &[
            (FetchReason::Initial, None),
            (FetchReason::StepUp, Some("w")),
            (FetchReason::Invalidated, None),
        ],
    );
}

/// World: a step-up is fetching (held) when the credential enters its soft window, so
/// the next request's background refresh is chained after the step-up; then the step-up
/// fails. Proves: the background refresh still fetches (it is not ended by the
/// still-sendable credential its predecessor left, which would have kept the refresh
/// claimed and done nothing until the hard window).
#[tokio::test]
async fn a_refresh_queued_behind_a_failed_step_up_still_fetches() {
    let (source, log, gate, most_running) = held_source(&[1], SHORT, true);
    let cache = tower_client_auth::CredentialCache::builder(source)
        .hard_window(Duration::from_millis(100))
        .window_jitter(0.0)
        .build()
        .unwrap();
    cache.warm_up().await.unwrap();
    let (svc, mut api) = step_up_over_mock(AuthLayer::with_cache(cache));
    let first = tokio::spawn(svc.clone().oneshot(support::get("/a")));
    let (_, reply) = next_request(&mut api).await;
    reply.send_response(lacks_scope_w());
    wait_for(|| log.lock().unwrap().len() == 2).await;
    // `t-0` enters its soft window while the step-up is held.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let second = tokio::spawn(svc.clone().oneshot(support::get("/c")));
    let (req, reply) = next_request(&mut api).await;
    assert_eq!(bearer(&req), "Bearer t-0");
    reply.send_response(http::Response::new(""));
    settle().await;
    gate.add_permits(1);
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), 403);
    assert_eq!(second.await.unwrap().unwrap().status(), 200);
    wait_for(|| log.lock().unwrap().len() == 3).await;
    assert_fetches(
        &log,
        &most_running,
        &[
            (FetchReason::Initial, None),
            (FetchReason::StepUp, Some("w")),
            (FetchReason::Expiring, None),
        ],
    );
}

/// An API answering `insufficient_scope` (scope `w`) on `/scoped` and 200 elsewhere;
/// counts its calls.
async fn scoped_api() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    scoped_api_after(Duration::ZERO).await
}

/// [`scoped_api`], answering `/scoped` after `delay` (a slow backend).
async fn scoped_api_after(delay: Duration) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let addr = {
        let calls = calls.clone();
        serve(move |req: Request<hyper::body::Incoming>| {
            calls.fetch_add(1, SeqCst);
            let scoped = req.uri().path() == "/scoped";
            async move {
                if scoped {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
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

/// A source issuing `t-N` with refresh token `rt-N`, that cannot step up (it fails the
/// step-up fetch as a source that cannot widen its scope does), recording each reason.
fn no_step_up_source() -> (
    Arc<std::sync::Mutex<Vec<FetchReason>>>,
    impl tower_client_auth::CredentialSource,
) {
    let reasons = Arc::new(std::sync::Mutex::new(Vec::new()));
    let source = {
        let reasons = reasons.clone();
        source_fn(move |cx: FetchContext| {
            let mut reasons = reasons.lock().unwrap();
            reasons.push(cx.reason());
            let n = reasons.len();
            async move {
                if cx.reason() == FetchReason::StepUp {
                    return Err::<Credential, BoxError>("cannot widen the scope".into());
                }
                Ok(Credential::bearer(format!("t-{n}"))?.with_refresh_token(format!("rt-{n}")))
            }
        })
    };
    (reasons, source)
}

/// World: the client is not registered for `admin`; a step-up is refused; later the
/// API revokes the token. Proves: the refused scope is not kept, so the login that
/// follows asks for the configured scope alone and succeeds (review finding: a refused
/// step-up made every later login fail).
#[tokio::test]
async fn a_refused_step_up_leaves_later_logins_alone() {
    let api = ClientCredentialsApi::new("d-client", "d-secret");
    api.registered_scopes
        .lock()
        .unwrap()
        .retain(|s| s != "admin");
    let base = start(api.clone()).await;
    let svc = layer(source(&base)).step_up(true).layer(api_client());
    assert_eq!(
        tower_get(&svc, format!("{base}/v1/admin/users")).await.0,
        403
    );
    api.revoke_all();
    assert_eq!(tower_get(&svc, format!("{base}/v1/shipments")).await.0, 200);
    assert_eq!(
        *api.scopes_asked.lock().unwrap(),
        ["shipments:read", "shipments:read admin", "shipments:read"]
    );
}

/// World: a step-up is granted, then the client's registration loses `admin`. Proves:
/// the next login's `invalid_scope` drops the stepped-up scope and logs in with the
/// configured one, in the same fetch.
#[tokio::test]
async fn stepped_up_scopes_refused_later_are_dropped() {
    let api = ClientCredentialsApi::new("d-client", "d-secret");
    let base = start(api.clone()).await;
    let svc = layer(source(&base)).step_up(true).layer(api_client());
    assert_eq!(
        tower_get(&svc, format!("{base}/v1/admin/users")).await.0,
        200
    );
    api.registered_scopes
        .lock()
        .unwrap()
        .retain(|s| s != "admin");
    api.revoke_all();
    assert_eq!(tower_get(&svc, format!("{base}/v1/shipments")).await.0, 200);
    assert_eq!(
        *api.scopes_asked.lock().unwrap(),
        [
            "shipments:read",
            "shipments:read admin",
            "shipments:read admin",
            "shipments:read"
        ]
    );
}

/// The API client behind a layer with step-up on.
type SteppingUp<P> = tower_client_auth::AddCredential<
    hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        tower_client_auth::ReplayBody<Full<Bytes>>,
    >,
    P,
>;

/// A layer with step-up on, over a cache of `source` sharing through `store`.
fn stepping_up_over<P: tower_client_auth::CredentialSource>(
    store: tower_client_auth::MemoryStore,
    source: P,
) -> SteppingUp<P> {
    let cache = tower_client_auth::CredentialCache::builder(source)
        .store(store)
        .build()
        .unwrap();
    stepping_up(cache)
}

/// A layer with step-up on, over `cache`, sending to any origin, loopback http too.
fn stepping_up<P: tower_client_auth::CredentialSource>(
    cache: tower_client_auth::CredentialCache<P>,
) -> SteppingUp<P> {
    AuthLayer::with_cache(cache)
        .any_https_origin()
        .allow_http_loopback(true)
        .step_up(true)
        .layer(api_client())
}

/// World: a fleet cache over a store; the source cannot step up. Proves: the stored
/// refresh token is still in the store after the failed step-up (review finding: the
/// step-up took it out of the store and lost it).
#[tokio::test]
async fn a_failed_step_up_leaves_the_stored_refresh_token() {
    use tower_client_auth::{CredentialStore, MemoryStore};
    let (addr, _) = scoped_api().await;
    let (reasons, source) = no_step_up_source();
    let store = MemoryStore::new();
    let svc = stepping_up_over(store.clone(), source);
    assert_eq!(
        tower_get(&svc, format!("http://{addr}/scoped")).await.1,
        Some(NotReplayed::InsufficientScope)
    );
    assert_eq!(
        *reasons.lock().unwrap(),
        [FetchReason::Initial, FetchReason::StepUp]
    );
    let stored = store.load().await.unwrap().expect("a stored credential");
    assert_eq!(
        stored.refresh_token().map(|t| t.expose().to_owned()),
        Some("rt-1".to_owned()),
        "the fleet's refresh token is still in the store"
    );
}

/// World: a fleet cache over a store that refuses pairs (it answers, but will not take a
/// value carrying a refresh token); an invalidation's refresh brings `rt-2`, kept under
/// this process's lease to be saved; then the API asks for a scope and the step-up fails.
/// Proves: the step-up takes the lease over from the task keeping the pair at once
/// (before, it waited for its own process's lease into `Timeout` and never asked the
/// source), presents nothing of it, and hands the pair back when it fails: `rt-2`
/// reaches the store once the store takes pairs.
#[tokio::test]
async fn a_failed_step_up_over_a_kept_pair_keeps_it() {
    use tower_client_auth::CredentialStore;
    let (addr, _) = scoped_api().await;
    let (reasons, source) = no_step_up_source();
    let store = support::store::FaultStore::new();
    let cache = tower_client_auth::CredentialCache::builder(source)
        .store(store.clone())
        .fetch_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let handle = cache.handle();
    let svc = stepping_up(cache);
    assert_eq!(tower_get(&svc, format!("http://{addr}/other")).await.0, 200);
    store.faults().refusing_pairs.store(true, SeqCst);
    handle.invalidate();
    assert_eq!(tower_get(&svc, format!("http://{addr}/other")).await.0, 200);
    assert_eq!(
        tower_get(&svc, format!("http://{addr}/scoped")).await.1,
        Some(NotReplayed::InsufficientScope)
    );
    assert_eq!(
        *reasons.lock().unwrap(),
        [
            FetchReason::Initial,
            FetchReason::Invalidated,
            FetchReason::StepUp
        ]
    );
    store.faults().refusing_pairs.store(false, SeqCst);
    let started = std::time::Instant::now();
    loop {
        let stored = store.load().await.unwrap();
        let token = stored.as_ref().and_then(|c| c.refresh_token());
        if token.map(|t| t.expose()) == Some("rt-2") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the kept refresh token never reached the store: {:?}",
            token.map(|t| t.expose())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// World: `access-0` current in its soft window, a store refusing pairs; a request's
/// background refresh ends late (1.5 s, past the 1 s fetch timeout) with
/// `access-1`/`rt-1`, kept to be saved; that request's answer (1.8 s) asks for a scope,
/// and the step-up, which takes the kept pair over, fails; then the credential is
/// invalidated, and the store takes pairs again. Proves (review finding: the step-up's
/// hand-over forgot that `access-1` came late, so the invalidation did not make it
/// suspect, it was saved live and another process sent it): `access-1` reaches the store
/// marked expired, and another process never gets it; as without the step-up.
#[tokio::test]
async fn a_step_up_over_a_late_kept_pair_leaves_it_to_an_invalidation() {
    use tower_client_auth::{CredentialCache, CredentialStore};
    for step_up in [false, true] {
        let (addr, _) = scoped_api_after(Duration::from_millis(1800)).await;
        let fetches = Arc::new(AtomicUsize::new(0));
        let source = {
            let fetches = fetches.clone();
            source_fn(move |cx: FetchContext| {
                let n = fetches.fetch_add(1, SeqCst);
                async move {
                    if cx.reason() == FetchReason::StepUp {
                        return Err::<Credential, BoxError>("cannot widen the scope".into());
                    }
                    if n == 1 {
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                    }
                    // 15 s left of 100: in a 20 s soft window, outside a 1 s hard one.
                    let issued = cx.now() - Duration::from_secs(85);
                    Ok(Credential::bearer(format!("access-{n}"))?
                        .with_refresh_token(format!("rt-{n}"))
                        .lives(issued, Duration::from_secs(100)))
                }
            })
        };
        let store = support::store::FaultStore::new();
        let cache = support::store::windowed(source, store.clone());
        let handle = cache.handle();
        let svc = stepping_up(cache);
        assert_eq!(tower_get(&svc, format!("http://{addr}/other")).await.0, 200);
        store.faults().refusing_pairs.store(true, SeqCst);
        if step_up {
            let answer = tower_get(&svc, format!("http://{addr}/scoped")).await;
            assert_eq!(answer.1, Some(NotReplayed::InsufficientScope));
        } else {
            tower_get(&svc, format!("http://{addr}/other")).await;
            tokio::time::sleep(Duration::from_millis(1800)).await;
        }
        assert_eq!(
            fetches.load(SeqCst),
            2 + step_up as usize,
            "step-up {step_up}"
        );
        assert!(handle.invalidate());
        store.faults().refusing_pairs.store(false, SeqCst);
        tokio::time::sleep(Duration::from_millis(2000)).await;
        let access_1 = Credential::bearer("access-1").unwrap();
        let stored = store.load().await.unwrap().expect("saved");
        let live = stored
            .expiry()
            .is_some_and(|at| at > std::time::SystemTime::now());
        assert!(
            !(stored == access_1 && live),
            "step-up {step_up}: access-1, fetched before the invalidation, saved live"
        );
        let b = CredentialCache::builder(source_fn(|_cx: FetchContext| async {
            Credential::bearer("b-own")
        }))
        .store(store.clone())
        .build()
        .unwrap();
        assert_ne!(b.credential().await.unwrap(), access_1, "step-up {step_up}");
    }
}

/// World: `access-0` current in its soft window, a store refusing pairs; a request's
/// background refresh presents `rt-0` and ends late (1.5 s) with `access-1`/`rt-1`, kept
/// to be saved; that request's answer asks for a scope and the step-up takes the kept
/// pair over; its login brings `access-2`/`rt-2`, at once but already expired (refused
/// on arrival), or late (1.5 s); either is kept instead of `rt-1`. Then the API rejects
/// `access-0`, and the store takes pairs again. Proves (review finding: the late pair
/// stayed the next flight's answer after the step-up had dropped it; the rejection
/// installed it, which made the step-up's kept pair look older and dropped it too, so
/// the next refresh logged in): a refresh token reaches the store, and the next
/// refresh presents it.
#[tokio::test]
async fn a_step_up_that_keeps_its_own_pair_over_a_late_one_loses_neither() {
    use tower_client_auth::{CredentialStore, RefreshSharing};
    for late_step_up in [false, true] {
        let (addr, _) = scoped_api_after(Duration::from_millis(1800)).await;
        let fetches = Arc::new(AtomicUsize::new(0));
        let presented = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let source = {
            let (fetches, presented) = (fetches.clone(), presented.clone());
            source_fn(move |cx: FetchContext| {
                let n = fetches.fetch_add(1, SeqCst);
                presented.lock().unwrap().push(match cx.refresh_sharing() {
                    RefreshSharing::Shared(Some(t)) => t.expose().to_owned(),
                    RefreshSharing::Shared(None) => "login".to_owned(),
                    _ => "store down".to_owned(),
                });
                async move {
                    let step_up = cx.reason() == FetchReason::StepUp;
                    if n == 1 || (step_up && late_step_up) {
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                    }
                    let credential = Credential::bearer(format!("access-{n}"))?
                        .with_refresh_token(format!("rt-{n}"));
                    if step_up && !late_step_up {
                        let past = std::time::SystemTime::now() - Duration::from_secs(1);
                        return Ok(credential.expires_at(past));
                    }
                    // 15 s left of 100: in a 20 s soft window, outside a 1 s hard one.
                    let issued = cx.now() - Duration::from_secs(85);
                    Ok::<_, BoxError>(credential.lives(issued, Duration::from_secs(100)))
                }
            })
        };
        let store = support::store::FaultStore::new();
        let cache = support::store::windowed(source, store.clone());
        let svc = stepping_up(cache.clone());
        assert_eq!(tower_get(&svc, format!("http://{addr}/other")).await.0, 200);
        let access_0 = cache.credential().await.unwrap();
        store.faults().refusing_pairs.store(true, SeqCst);
        let answer = tower_get(&svc, format!("http://{addr}/scoped")).await;
        assert_eq!(answer.1, Some(NotReplayed::InsufficientScope));
        assert_eq!(fetches.load(SeqCst), 3);
        cache.reject(&access_0).await.unwrap();
        tokio::time::sleep(Duration::from_millis(600 + 1000 * late_step_up as u64)).await;
        store.faults().refusing_pairs.store(false, SeqCst);
        tokio::time::sleep(Duration::from_secs(6)).await;
        let stored = store.load().await.unwrap();
        let stored = stored.as_ref().and_then(|c| c.refresh_token());
        assert!(
            stored.is_some(),
            "late step-up {late_step_up}: no refresh token stored"
        );
        cache.handle().invalidate();
        let _ = cache.credential().await;
        let presented = presented.lock().unwrap().clone();
        assert_ne!(
            presented.last().map(String::as_str),
            Some("login"),
            "late step-up {late_step_up}: logged in again; presented, in order: {presented:?}"
        );
    }
}

/// World: a step-up fails; then the credential is invalidated. Proves: the step-up's
/// failure does not back off the cache's own fetches (review finding: it did, and a
/// credential could expire behind a scope the API kept asking for).
#[tokio::test]
async fn a_failed_step_up_does_not_hold_back_the_next_fetch() {
    let (addr, _) = scoped_api().await;
    let (reasons, source) = no_step_up_source();
    let layer = layer(source).step_up(true);
    let handle = layer.cache().handle();
    let svc = layer.layer(api_client());
    assert_eq!(
        tower_get(&svc, format!("http://{addr}/scoped")).await.0,
        403
    );
    handle.invalidate();
    assert_eq!(tower_get(&svc, format!("http://{addr}/other")).await.0, 200);
    assert_eq!(
        *reasons.lock().unwrap(),
        [
            FetchReason::Initial,
            FetchReason::StepUp,
            FetchReason::Invalidated
        ]
    );
}

/// World: the source grants a new token on every step-up, but the API never finds the
/// scope in it. Proves: after one fruitless step-up, the next requests within the
/// step-up backoff cost no token request (review finding: each one cost a login and a
/// replay).
#[tokio::test]
async fn a_fruitless_step_up_backs_off() {
    let (addr, calls) = scoped_api().await;
    let fetches = Arc::new(AtomicUsize::new(0));
    let source = {
        let fetches = fetches.clone();
        source_fn(move |_| {
            let n = fetches.fetch_add(1, SeqCst);
            async move { Credential::bearer(format!("t-{n}")) }
        })
    };
    let svc = layer(source).step_up(true).layer(api_client());
    for _ in 0..5 {
        let (status, marker, _) = tower_get(&svc, format!("http://{addr}/scoped")).await;
        assert_eq!(status, 403);
        assert!(marker.is_some());
    }
    assert_eq!(fetches.load(SeqCst), 2, "one login, one step-up");
    assert_eq!(calls.load(SeqCst), 6, "one replay");
}

/// World: a fleet cache over a store; a step-up succeeds with a login that brings no
/// refresh token. Proves: the wider credential is what the fleet shares now, and the old
/// session's refresh token is not carried into it (a refresh with it could only bring
/// back the narrow scope, and carrying it made the step-up's save look like the only
/// copy of a token another process may hold).
#[tokio::test]
async fn a_step_up_over_a_store_shares_the_wider_credential() {
    use tower_client_auth::{CredentialStore, MemoryStore};
    let (addr, _) = scoped_api().await;
    let fetches = Arc::new(AtomicUsize::new(0));
    let source = {
        let fetches = fetches.clone();
        source_fn(move |cx: FetchContext| {
            let n = fetches.fetch_add(1, SeqCst) + 1;
            async move {
                let credential = Credential::bearer(format!("t-{n}"))?;
                Ok::<_, BoxError>(match cx.reason() {
                    FetchReason::StepUp => credential,
                    _ => credential.with_refresh_token(format!("rt-{n}")),
                })
            }
        })
    };
    let store = MemoryStore::new();
    let svc = stepping_up_over(store.clone(), source);
    tower_get(&svc, format!("http://{addr}/scoped")).await;
    assert_eq!(fetches.load(SeqCst), 2, "a login and a step-up");
    let stored = store.load().await.unwrap().expect("a stored credential");
    let (_, value) = stored.headers().next().unwrap();
    assert_eq!(value.to_str().unwrap(), "Bearer t-2");
    assert!(stored.refresh_token().is_none());
}

/// World: a 403 lacking `w` steps up (`token-2`); the replay's service clone waits for
/// readiness, and meanwhile the application rejects `token-2` (as for a gRPC status), so
/// the replay, looking again once ready, goes with the plain refetch's `token-3`, which
/// the API says lacks `w` too. Proves (review finding): that 403 is not counted as a
/// fruitless step-up (no step-up was tried with `token-3`): the next request lacking `w`
/// steps up at once, rather than wait out a step-up backoff.
#[tokio::test]
async fn a_replay_that_looked_again_is_not_counted_as_a_step_up() {
    let source = support::TestSource::new();
    let layer = AuthLayer::new(source.clone());
    let cache = layer.cache().clone();
    let (svc, mut api) = step_up_over_mock(layer);
    let call = tokio::spawn(svc.clone().oneshot(support::get("/a")));
    let (req, reply) = next_request(&mut api).await;
    assert_eq!(bearer(&req), "Bearer token-1");
    api.allow(0);
    reply.send_response(lacks_scope_w());
    settle().await;
    assert_eq!(source.fetches(), 2, "no step-up");
    let stepped_up = cache.credential().await.unwrap();
    let plain = cache.reject(&stepped_up).await.unwrap();
    assert_eq!(plain, Credential::bearer("token-3").unwrap());
    api.allow(10);
    let (replay, reply) = next_request(&mut api).await;
    assert_eq!(bearer(&replay), "Bearer token-3");
    reply.send_response(lacks_scope_w());
    assert_eq!(call.await.unwrap().unwrap().status(), 403);

    let call = tokio::spawn(svc.clone().oneshot(support::get("/b")));
    let (req, reply) = next_request(&mut api).await;
    assert_eq!(bearer(&req), "Bearer token-3");
    reply.send_response(lacks_scope_w());
    settle().await;
    assert_eq!(source.fetches(), 4, "the next step-up waited for a backoff");
    let (replay, reply) = next_request(&mut api).await;
    assert_eq!(bearer(&replay), "Bearer token-4");
    reply.send_response(http::Response::new(""));
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
}

/// World: processes A and B over one store. A's save of `a1`/`rt1` lands though its
/// reply is lost, so A keeps the pair; a step-up at A takes the kept pair over, finds
/// `a1`/`rt1` in the store, presents nothing and fails: the pair is handed back. A's
/// connection goes down past the lease; B takes `rt1` out of the store (its marker:
/// `a1` without it), spends it and keeps `rt2` (its connection refuses pairs); B's
/// connection goes down past its lease; A's comes back, then B's. Proves (review
/// finding: the step-up recorded the store as holding `a1`/`rt1`, and B's marker, equal
/// to it by its headers, passed for it, so A saved the spent `rt1` and B gave `rt2`
/// up): `rt2` reaches the store.
#[tokio::test]
async fn a_step_up_over_a_kept_pair_leaves_no_marker_passing_for_the_store() {
    use std::collections::HashSet;
    use tower_client_auth::{CredentialCache, CredentialStore, MemoryStore, RefreshSharing};
    let (addr, _) = scoped_api().await;
    let next = Arc::new(AtomicUsize::new(0));
    let reused = Arc::new(AtomicUsize::new(0));
    let logins = Arc::new(AtomicUsize::new(0));
    let spent = Arc::new(std::sync::Mutex::new(HashSet::<String>::new()));
    let source = {
        let (next, reused, logins, spent) =
            (next.clone(), reused.clone(), logins.clone(), spent.clone());
        source_fn(move |cx: FetchContext| {
            let (next, reused, logins, spent) =
                (next.clone(), reused.clone(), logins.clone(), spent.clone());
            async move {
                if cx.reason() == FetchReason::StepUp {
                    return Err::<Credential, BoxError>("cannot widen the scope".into());
                }
                match cx.refresh_sharing() {
                    RefreshSharing::Shared(Some(t)) => {
                        if !spent.lock().unwrap().insert(t.expose().to_owned()) {
                            reused.fetch_add(1, SeqCst);
                            return Err("invalid_grant: reused".into());
                        }
                    }
                    _ => {
                        logins.fetch_add(1, SeqCst);
                    }
                }
                let n = next.fetch_add(1, SeqCst);
                Ok(Credential::bearer(format!("a{n}"))?
                    .with_refresh_token(format!("rt{n}"))
                    .expires_in(Duration::from_secs(3600)))
            }
        })
    };
    let memory = MemoryStore::default();
    let sa = support::store::FaultStore::over(memory.clone());
    let sb = support::store::FaultStore::over(memory.clone());
    let a = CredentialCache::builder(source.clone())
        .store(sa.clone())
        .fetch_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let b = CredentialCache::builder(source)
        .store(sb.clone())
        .fetch_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let ha = a.handle();
    let svc = stepping_up(a);
    assert_eq!(tower_get(&svc, format!("http://{addr}/other")).await.0, 200);
    sa.faults().lost_pair_replies.store(true, SeqCst);
    ha.invalidate();
    assert_eq!(tower_get(&svc, format!("http://{addr}/other")).await.0, 200);
    let p1 = memory.load().await.unwrap().unwrap();
    assert_eq!(p1.refresh_token().map(|t| t.expose()), Some("rt1"));
    assert_eq!(
        tower_get(&svc, format!("http://{addr}/scoped")).await.1,
        Some(NotReplayed::InsufficientScope)
    );
    support::store::a_goes_down_and_b_refuses_pairs(&sa, &sb).await;
    let got = b.credential().await.unwrap();
    assert_eq!(got, p1);
    b.reject(&got).await.expect("B refreshed with rt1");
    support::store::b_goes_down_then_both_come_back(&sa, &sb).await;
    assert_eq!(sa.stored_refresh_token().await.as_deref(), Some("rt2"));
    assert_eq!(reused.load(SeqCst), 0);
}

/// World: a client-credentials source that can step up (scope `read`), step-up on, and
/// an API whose 403 says `insufficient_scope` without naming a scope (RFC 6750 §3 lets
/// the `scope` attribute out). Proves (README: "one with no `scope`, is
/// `TokenErrorKind::StepUpUnsupported`, nothing sent"): no token request is sent for it,
/// twice over (no login asking for nothing more, once per request or per backoff step),
/// nothing is replayed, and each answer goes back marked, with no scope.
#[tokio::test]
async fn an_insufficient_scope_naming_no_scope_sends_no_token_request() {
    let idp = support::scripted::Idp::default();
    let api_calls = Arc::new(AtomicUsize::new(0));
    let api = {
        let api_calls = api_calls.clone();
        tower::service_fn(
            move |_req: Request<tower_client_auth::ReplayBody<Full<Bytes>>>| {
                api_calls.fetch_add(1, SeqCst);
                async move {
                    Ok::<_, BoxError>(
                        http::Response::builder()
                            .status(StatusCode::FORBIDDEN)
                            .header(
                                http::header::WWW_AUTHENTICATE,
                                r#"Bearer error="insufficient_scope""#,
                            )
                            .body(Full::<Bytes>::default())
                            .unwrap(),
                    )
                }
            },
        )
    };
    let svc = AuthLayer::new(idp.source())
        .any_https_origin()
        .step_up(true)
        .layer(api);
    for _ in 0..2 {
        let res = svc.clone().oneshot(support::get("/v1/x")).await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            res.extensions().get::<NotReplayed>(),
            Some(&NotReplayed::InsufficientScope)
        );
        assert_eq!(
            res.extensions().get::<InsufficientScope>(),
            Some(&InsufficientScope { scope: None })
        );
    }
    assert_eq!(
        idp.scoped(),
        [("client_credentials".into(), Some("read".into()), None, 200)]
    );
    assert_eq!(api_calls.load(SeqCst), 2, "nothing replayed");
}
