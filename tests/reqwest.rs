//! The reqwest-middleware adapter with real reqwest requests against loopback servers:
//! the layer's rules, a cache shared with a Tower stack, and the order with reqwest-retry.
#![cfg(feature = "reqwest")]

use crate::support;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use reqwest_retry::{RetryTransientMiddleware, policies::ExponentialBackoff};
use support::{TestSource, logging_api as server, providers::serve};
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, Credential, Error, ErrorKind, NoReplay, RotatingCredential, reqwest::AuthMiddleware,
};

fn loopback_client(
    auth: AuthMiddleware<impl tower_client_auth::CredentialSource>,
) -> ClientWithMiddleware {
    ClientBuilder::new(reqwest::Client::new())
        .with(auth.allow_http_loopback(true))
        .build()
}

/// Accepts only the newest token the source issued.
fn newest_only(
    source: &TestSource,
) -> impl Fn(&str, &str, usize) -> StatusCode + Send + Sync + 'static {
    let source = source.clone();
    move |path, auth, _| match path {
        "/forbidden" => StatusCode::FORBIDDEN,
        _ if auth == format!("Bearer token-{}", source.fetches()) && source.fetches() > 1 => {
            StatusCode::OK
        }
        _ => StatusCode::UNAUTHORIZED,
    }
}

/// 401 → one refresh → the cloned request (JSON body included) replayed with the new
/// token; 403 → returned, no refresh; the header is sent and the token reused.
#[tokio::test]
async fn rejection_refreshes_and_replays_clonable_requests() {
    let source = TestSource::new();
    let (base, log) = server(newest_only(&source)).await;
    let client = loopback_client(AuthMiddleware::new(source.clone()).any_https_origin());

    let res = client
        .post(format!("{base}/v1/orders"))
        .body("{\"qty\":2}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let log_now = log.lock().unwrap().clone();
    assert_eq!(log_now.len(), 2);
    assert_eq!(log_now[0].1, "Bearer token-1");
    assert_eq!(log_now[1].1, "Bearer token-2");
    assert_eq!(log_now[1].2, b"{\"qty\":2}");

    let res = client
        .get(format!("{base}/forbidden"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let res = client
        .get(format!("{base}/v1/orders"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(source.fetches(), 2, "403 refreshed nothing; token reused");
    assert_eq!(log.lock().unwrap().len(), 4, "and nothing was replayed");
}

/// A streaming body is retained as it streams (up to the replay limit) and replayed,
/// exactly as through the Tower layer; `NoReplay` in the middleware extensions returns the
/// 401 as it came.
#[tokio::test]
async fn streaming_bodies_are_replayed_and_no_replay_returns_the_401() {
    let source = TestSource::new();
    let (base, log) = server(newest_only(&source)).await;
    let client = loopback_client(AuthMiddleware::new(source.clone()).any_https_origin());

    let stream = futures_util::stream::iter(
        [&b"chu"[..], b"nk"].map(|c| Ok::<_, std::io::Error>(Bytes::from_static(c))),
    );
    let res = client
        .put(format!("{base}/v1/blob"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let log_now = log.lock().unwrap().clone();
    assert_eq!(log_now.len(), 2);
    assert!(
        log_now.iter().all(|(_, _, body)| body == b"chunk"),
        "{log_now:?}"
    );
    assert_eq!(res.url().path(), "/v1/blob", "the response keeps its URL");

    let source = TestSource::new();
    let (base, log) = server(newest_only(&source)).await;
    let client = loopback_client(AuthMiddleware::new(source.clone()).any_https_origin());
    let res = client
        .post(format!("{base}/v1/payments"))
        .with_extension(NoReplay)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(log.lock().unwrap().len(), 1);
}

/// A stream of unknown length whose `Content-Length` is set by hand (an upload of a
/// file of known size) and that shows no end after its last byte: hyper sends the
/// length the header declares and drops the body without polling it again. Proves: it
/// is replayed after a 401 all the same, whole.
#[tokio::test]
async fn a_stream_whose_length_is_set_by_hand_is_replayed() {
    let source = TestSource::new();
    let (base, log) = server(newest_only(&source)).await;
    let client = loopback_client(AuthMiddleware::new(source.clone()).any_https_origin());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tx.send(Bytes::from_static(b"chu")).unwrap();
    tx.send(Bytes::from_static(b"nk")).unwrap();
    let rx = futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, std::io::Error>(chunk), rx))
    });
    let res = client
        .put(format!("{base}/v1/blob"))
        .header(header::CONTENT_LENGTH, 5)
        .body(reqwest::Body::wrap_stream(rx))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let log_now = log.lock().unwrap().clone();
    assert_eq!(log_now.len(), 2);
    assert!(
        log_now.iter().all(|(_, _, body)| body == b"chunk"),
        "{log_now:?}"
    );
    // The sender lived on: the body never ended on its own.
    drop(tx);
}

/// Plain http to a non-loopback host is refused before anything is sent.
#[tokio::test]
async fn insecure_transport_is_refused() {
    let source = TestSource::new();
    let client = loopback_client(AuthMiddleware::new(source.clone()).any_https_origin());
    let err = client
        .get("http://api.example.invalid/v1")
        .send()
        .await
        .unwrap_err();
    let reqwest_middleware::Error::Middleware(err) = err else {
        panic!("{err:?}")
    };
    let err = err.downcast_ref::<Error>().expect("the crate's error");
    assert_eq!(err.kind(), ErrorKind::InsecureTransport);
    assert_eq!(source.fetches(), 0);
}

/// Every answer retried, every error too: retries run out on any error.
struct RetryEverything;

impl reqwest_retry::RetryableStrategy for RetryEverything {
    fn handle(
        &self,
        _: &reqwest_middleware::Result<reqwest::Response>,
    ) -> Option<reqwest_retry::Retryable> {
        Some(reqwest_retry::Retryable::Transient)
    }
}

/// One cache behind a Tower stack and a reqwest client: one fetch serves both.
#[tokio::test]
async fn one_cache_serves_tower_and_reqwest() {
    let source = TestSource::new();
    let (base, log) = server(|_, auth, _| {
        if auth == "Bearer token-1" {
            StatusCode::OK
        } else {
            StatusCode::UNAUTHORIZED
        }
    })
    .await;
    let layer = AuthLayer::new(source.clone())
        .any_https_origin()
        .allow_http_loopback(true);
    let reqwest_client = ClientBuilder::new(reqwest::Client::new())
        .with(AuthMiddleware::from_layer(&layer))
        .build();
    let tower_client = layer.layer(support::api_client());

    assert_eq!(
        reqwest_client
            .get(format!("{base}/a"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let req = Request::get(format!("{base}/b"))
        .body(Full::default())
        .unwrap();
    assert_eq!(tower_client.oneshot(req).await.unwrap().status(), 200);
    assert_eq!(source.fetches(), 1);
    assert_eq!(log.lock().unwrap().len(), 2);
}

/// World: the first attempt meets a 503 and, meanwhile, the token is rotated. With the
/// retry middleware outside the auth middleware (the documented order), the retry takes
/// the new token from the cache: the server never sees a stale header. Inside, the retry
/// would resend the first attempt's header.
#[tokio::test]
async fn retry_outside_auth_sends_a_fresh_header_on_every_attempt() {
    let pat = RotatingCredential::new(Credential::bearer("old").unwrap());
    let rotate = pat.clone();
    let (base, log) = server(move |_, auth, attempt| {
        if attempt == 1 {
            rotate.rotate(Credential::bearer("new").unwrap()).unwrap();
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        if auth == "Bearer new" {
            StatusCode::OK
        } else {
            StatusCode::UNAUTHORIZED
        }
    })
    .await;
    let retry = RetryTransientMiddleware::new_with_policy(
        ExponentialBackoff::builder()
            .retry_bounds(Duration::from_millis(1), Duration::from_millis(5))
            .build_with_max_retries(2),
    );
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(retry)
        .with(
            AuthMiddleware::new(pat)
                .any_https_origin()
                .allow_http_loopback(true),
        )
        .build();
    let res = client.get(format!("{base}/v1/me")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let seen: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .map(|(_, a, _)| a.clone())
        .collect();
    assert_eq!(
        seen,
        ["Bearer old", "Bearer new"],
        "no stale header, no 401"
    );
}

/// A static credential cannot change: its 401 comes back after one request, with no
/// refetch and no replay of a clonable request (the same rule as the Tower layer).
#[tokio::test]
async fn static_credential_rejection_is_not_replayed() {
    let (base, log) = server(|_, _, _| StatusCode::UNAUTHORIZED).await;
    let auth = AuthMiddleware::new(tower_client_auth::StaticCredential::bearer("pat").unwrap())
        .any_https_origin();
    let cache = auth.cache().clone();
    let client = loopback_client(auth);
    let res = client
        .post(format!("{base}/v1/orders"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(log.lock().unwrap().len(), 1, "sent once");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let stats = cache.stats();
    assert_eq!((stats.fetches, stats.rejections, stats.replays), (1, 0, 0));
}

/// A revoked personal access token not yet rotated: the source hands the rejected token
/// back, so the request is sent once and its 401 returned, marked
/// `NotReplayed::SameCredential` (the same rule as the Tower layer).
#[tokio::test]
async fn the_rejected_credential_is_never_replayed() {
    let (base, log) = server(|_, _, _| StatusCode::UNAUTHORIZED).await;
    let pat = RotatingCredential::new(Credential::bearer("revoked-pat").unwrap());
    let auth = AuthMiddleware::new(pat).any_https_origin();
    let cache = auth.cache().clone();
    let client = loopback_client(auth);
    let res = client
        .post(format!("{base}/v1/orders"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(
        res.extensions().get::<tower_client_auth::NotReplayed>(),
        Some(&tower_client_auth::NotReplayed::SameCredential)
    );
    assert_eq!(log.lock().unwrap().len(), 1, "sent once");
    let stats = cache.stats();
    assert_eq!((stats.fetches, stats.rejections, stats.replays), (2, 1, 0));
}

/// A request whose header map is full gets `ErrorKind::HeadersFull` and is not sent.
#[tokio::test]
async fn full_header_map_is_a_typed_error() {
    let (base, log) = server(|_, _, _| StatusCode::OK).await;
    let client = loopback_client(AuthMiddleware::new(TestSource::new()).any_https_origin());
    let mut headers = http::HeaderMap::new();
    for i in 0.. {
        let name = http::HeaderName::try_from(format!("x-filler-{i}")).unwrap();
        if headers
            .try_append(name, http::HeaderValue::from_static("1"))
            .is_err()
        {
            break;
        }
    }
    let err = client
        .get(format!("{base}/v1/me"))
        .headers(headers)
        .send()
        .await
        .unwrap_err();
    let reqwest_middleware::Error::Middleware(err) = err else {
        panic!("expected the middleware's error, got {err:?}");
    };
    let err = err.downcast_ref::<Error>().unwrap();
    assert_eq!(err.kind(), ErrorKind::HeadersFull);
    assert!(log.lock().unwrap().is_empty(), "nothing was sent");
}

/// A reqwest client for token requests, as the docs build it: redirects off.
fn token_http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// World: a reqwest app whose token requests go through a reqwest client too (one HTTP
/// stack), against the strict token server. Proves: the token is fetched once and used,
/// through the middleware, and an expired one is refreshed and the request replayed.
#[tokio::test]
async fn token_requests_go_through_a_reqwest_client() {
    use support::strict_idp::StrictIdp;
    use tower_client_auth::token::{TokenClient, TokenRequest, TokenSource};
    let idp = StrictIdp::new("rq-client", "rq-secret", 3600.0);
    let base = support::providers::start(idp.clone()).await;
    let url = format!("{base}/oauth/token");
    let source = TokenSource::new(
        TokenRequest::oauth2_client_credentials(&url, "rq-client", "rq-secret").unwrap(),
    )
    .refresh_with(
        TokenRequest::oauth2_refresh_token(&url, "rq-client", "rq-secret").unwrap(),
        "refresh_token",
    )
    .client(TokenClient::reqwest(token_http()).allow_http_loopback(true));
    let client = loopback_client(AuthMiddleware::new(source).any_https_origin());
    for _ in 0..3 {
        let res = client
            .get(format!("{base}/v1/things"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    idp.expire_access_tokens();
    let res = client
        .get(format!("{base}/v1/things"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    use std::sync::atomic::Ordering::SeqCst;
    assert_eq!(idp.logins.load(SeqCst), 1);
    assert_eq!(idp.refresh_grants.load(SeqCst), 1);
}

/// World: a token endpoint answering 307 to another server. Proves: with redirects off
/// (as documented) the other server never sees the token request, client secret and
/// all, and the answer is `TokenErrorKind::Redirect`; a client that follows redirects
/// anyway is caught by the final-URL check (same kind), though the other server did see
/// the request, which is why the docs require redirects off.
#[tokio::test]
async fn token_requests_never_follow_redirects() {
    use tower_client_auth::{
        CredentialCache,
        token::{TokenClient, TokenError, TokenErrorKind, TokenSource},
    };
    let (elsewhere, seen) = server(|_, _, _| StatusCode::OK).await;
    let to = format!("{elsewhere}/steal");
    let addr = serve(move |_req| {
        let to = to.clone();
        async move {
            Response::builder()
                .status(StatusCode::TEMPORARY_REDIRECT)
                .header(header::LOCATION, to)
                .body(Full::new(Bytes::new()))
                .unwrap()
        }
    })
    .await;
    let token_url = format!("http://{addr}/oauth/token");
    for (http, followed) in [(token_http(), false), (reqwest::Client::new(), true)] {
        let source = TokenSource::client_credentials(&token_url, "id", "redirect-secret")
            .unwrap()
            .client(TokenClient::reqwest(http).allow_http_loopback(true));
        let err = CredentialCache::new(source).credential().await.unwrap_err();
        let token = err
            .get_ref()
            .and_then(|s| s.downcast_ref::<TokenError>())
            .unwrap();
        assert_eq!(token.kind(), TokenErrorKind::Redirect, "{err}");
        assert_eq!(seen.lock().unwrap().len(), usize::from(followed));
    }
}

/// The request's own timeout still applies through the adapter, to the first attempt and
/// to the replay after a 401 (which is rebuilt from a copy of the request).
#[tokio::test]
async fn a_requests_own_timeout_still_applies() {
    let addr = serve(|_req: Request<hyper::body::Incoming>| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Response::new(Full::new(Bytes::new()))
    })
    .await;
    let client = loopback_client(AuthMiddleware::new(TestSource::new()).any_https_origin());
    times_out(
        &client,
        format!("http://{addr}/slow"),
        Duration::from_millis(200),
    )
    .await;

    // The replay after a 401 carries the same timeout (it is rebuilt from the request).
    let first = std::sync::atomic::AtomicBool::new(true);
    let first = Arc::new(first);
    let addr = serve(move |_req: Request<hyper::body::Incoming>| {
        let first = first.clone();
        async move {
            if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                let mut res = Response::new(Full::new(Bytes::new()));
                *res.status_mut() = StatusCode::UNAUTHORIZED;
                return res;
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
            Response::new(Full::new(Bytes::new()))
        }
    })
    .await;
    let source = TestSource::new();
    let client = loopback_client(AuthMiddleware::new(source.clone()).any_https_origin());
    times_out(
        &client,
        format!("http://{addr}/slow"),
        Duration::from_millis(300),
    )
    .await;
    assert_eq!(source.fetches(), 2, "the 401 was replayed");
}

/// World: the API answers the first attempt 401 after 400 ms and the replay after
/// 300 ms; the request's own timeout is 600 ms (and, as a control, 3 s). Proves: the
/// timeout bounds the whole call, as the caller set it for one request: the replay gets
/// what is left (about 200 ms) and the call fails with reqwest's timeout, well before
/// the 1.2 s a fresh timeout per attempt would allow; with room for both it succeeds.
#[tokio::test]
async fn a_requests_own_timeout_bounds_its_replay_too() {
    for (timeout, ok) in [
        (Duration::from_millis(600), false),
        (Duration::from_secs(3), true),
    ] {
        let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let addr = serve(move |_req: Request<hyper::body::Incoming>| {
            let first = first.clone();
            async move {
                if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    let mut res = Response::new(Full::new(Bytes::new()));
                    *res.status_mut() = StatusCode::UNAUTHORIZED;
                    return res;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                Response::new(Full::new(Bytes::new()))
            }
        })
        .await;
        let source = TestSource::new();
        let client = loopback_client(AuthMiddleware::new(source.clone()).any_https_origin());
        let sent = client
            .get(format!("http://{addr}/slow"))
            .timeout(timeout)
            .send()
            .await;
        assert_eq!(source.fetches(), 2, "the 401 was replayed");
        match sent {
            Ok(res) => assert!(ok, "answered {} past the timeout", res.status()),
            Err(reqwest_middleware::Error::Reqwest(err)) if !ok => {
                assert!(err.is_timeout(), "{err:?}")
            }
            Err(err) => panic!("{timeout:?}: {err:?}"),
        }
    }
}

/// World: the API answers the first attempt 401 at once, then 200; the refresh after
/// the 401 either hangs (a gated source) or takes 700 ms; the request's own timeout is
/// 300 ms. Proves: the timeout bounds the wait for the replay's credential too: the call
/// ends with `ErrorKind::RequestTimeout` (within 3 s: it does not wait on the refresh,
/// whose own bound is the cache's fetch timeout, 10 s), and no replay reaches the API
/// after the timeout ran out (review 106: a replay went with 1 ms to run and a loopback
/// server answered a POST 200, 400 ms past the timeout).
#[tokio::test]
async fn a_requests_own_timeout_bounds_the_wait_for_its_replays_credential() {
    let hanging = TestSource::gated(None);
    hanging.release(1);
    for slow in [
        hanging,
        TestSource::build(
            None,
            Duration::from_millis(700),
            false,
            tower_client_auth::RefreshMode::Proactive,
        ),
    ] {
        let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = seen.clone();
        let addr = serve(move |_req: Request<hyper::body::Incoming>| {
            let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                let mut res = Response::new(Full::new(Bytes::new()));
                if n == 0 {
                    *res.status_mut() = StatusCode::UNAUTHORIZED;
                }
                res
            }
        })
        .await;
        let client = loopback_client(AuthMiddleware::new(slow.clone()).any_https_origin());
        let call = client
            .post(format!("http://{addr}/orders"))
            .body("{\"qty\":2}")
            .timeout(Duration::from_millis(300))
            .send();
        let err = tokio::time::timeout(Duration::from_secs(3), call)
            .await
            .expect("the call waits on its refresh past its own timeout")
            .expect_err("answered past its own timeout");
        let kind = tower_client_auth::reqwest::auth_error(&err).map(Error::kind);
        assert_eq!(kind, Some(ErrorKind::RequestTimeout), "{err:?}");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            seen.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "a replay reached the API after the call's timeout"
        );
    }
}

/// A middleware below the adapter whose first answer comes after `delay`, a 401, after
/// it had the cache take a new credential (another request's rejection), so that the
/// replay's is ready at once; later calls are answered 200. Counts the calls.
struct LateRejection {
    cache: tower_client_auth::CredentialCache<TestSource>,
    delay: Duration,
    calls: Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait::async_trait]
impl reqwest_middleware::Middleware for LateRejection {
    async fn handle(
        &self,
        _: reqwest::Request,
        _: &mut http::Extensions,
        _: reqwest_middleware::Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        let n = (self.calls).fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut status = StatusCode::OK;
        if n == 0 {
            tokio::time::sleep(self.delay).await;
            let old = self.cache.credential().await.unwrap();
            self.cache.reject(&old).await.unwrap();
            status = StatusCode::UNAUTHORIZED;
        }
        let res = Response::builder().status(status).body("").unwrap();
        Ok(reqwest::Response::from(res))
    }
}

/// A client built on `builder` with the adapter over a new cache, and below it a
/// `LateRejection` 400 ms late: the cache, the count of calls below, the client.
fn late_rejected(
    builder: ClientBuilder,
) -> (
    tower_client_auth::CredentialCache<TestSource>,
    Arc<std::sync::atomic::AtomicUsize>,
    ClientWithMiddleware,
) {
    let cache = tower_client_auth::CredentialCache::new(TestSource::new());
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let client = builder
        .with(AuthMiddleware::with_cache(cache.clone()).any_https_origin())
        .with(LateRejection {
            cache: cache.clone(),
            delay: Duration::from_millis(400),
            calls: calls.clone(),
        })
        .build();
    (cache, calls, client)
}

/// World: the first attempt's 401 comes back after the request's own timeout ran out,
/// the replay's credential ready at once. Proves: the call fails `RequestTimeout`,
/// nothing more is sent, and no replay is counted (`CacheStats::replays`, the replays
/// metric: "requests sent again"; review 107 saw one counted).
#[tokio::test]
async fn a_replay_never_sent_for_the_timeout_is_not_counted() {
    let (cache, calls, client) = late_rejected(ClientBuilder::new(reqwest::Client::new()));
    let err = client
        .get("https://api.test/v1")
        .timeout(Duration::from_millis(200))
        .send()
        .await
        .expect_err("answered past its own timeout");
    let kind = tower_client_auth::reqwest::auth_error(&err).map(Error::kind);
    assert_eq!(kind, Some(ErrorKind::RequestTimeout), "{err:?}");
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "sent again"
    );
    assert_eq!(
        cache.stats().replays,
        0,
        "a replay counted, though none was sent"
    );
}

/// The strategy the module docs ("Ordering with `reqwest-retry`") show: this crate's
/// `RequestTimeout` retried as reqwest's own timeout is, anything else as the default
/// strategy says.
struct TimeoutsAlike;

impl reqwest_retry::RetryableStrategy for TimeoutsAlike {
    fn handle(
        &self,
        res: &reqwest_middleware::Result<reqwest::Response>,
    ) -> Option<reqwest_retry::Retryable> {
        match res {
            Err(err)
                if tower_client_auth::reqwest::auth_error(err).map(Error::kind)
                    == Some(ErrorKind::RequestTimeout) =>
            {
                Some(reqwest_retry::Retryable::Transient)
            }
            other => reqwest_retry::DefaultRetryableStrategy.handle(other),
        }
    }
}

/// World: as above, with `reqwest-retry` outside the adapter, as the docs order them.
/// Proves what the module docs say of the two: the default strategy does not retry the
/// adapter's `RequestTimeout` (a middleware's error is fatal to it; one call, the error
/// back), and the strategy they show does: the next attempt, with a fresh timeout and
/// the cache's new credential, is answered 200.
#[tokio::test]
async fn a_request_timeout_is_retried_only_by_a_strategy_that_says_so() {
    for documented in [false, true] {
        let policy = ExponentialBackoff::builder()
            .retry_bounds(Duration::from_millis(1), Duration::from_millis(5))
            .build_with_max_retries(2);
        let retry = match documented {
            true => ClientBuilder::new(reqwest::Client::new()).with(
                RetryTransientMiddleware::new_with_policy_and_strategy(policy, TimeoutsAlike),
            ),
            false => ClientBuilder::new(reqwest::Client::new())
                .with(RetryTransientMiddleware::new_with_policy(policy)),
        };
        let (_, calls, client) = late_rejected(retry);
        let sent = client
            .get("https://api.test/v1")
            .timeout(Duration::from_millis(200))
            .send()
            .await;
        let calls = calls.load(std::sync::atomic::Ordering::SeqCst);
        match sent {
            Ok(res) if documented => {
                assert_eq!(res.status(), 200);
                assert_eq!(calls, 2);
            }
            Err(err) if !documented => {
                let kind = tower_client_auth::reqwest::auth_error(&err).map(Error::kind);
                assert_eq!(kind, Some(ErrorKind::RequestTimeout), "{err:?}");
                assert_eq!(calls, 1, "retried");
            }
            other => panic!("documented strategy: {documented}: {other:?}, {calls} calls"),
        }
    }
}

/// Sends a GET to `url` with `timeout`: it must fail with reqwest's timeout, well before
/// the server's 5 s answer.
async fn times_out(client: &ClientWithMiddleware, url: String, timeout: Duration) {
    let started = std::time::Instant::now();
    let err = client.get(url).timeout(timeout).send().await.unwrap_err();
    let reqwest_middleware::Error::Reqwest(err) = err else {
        panic!("{err:?}")
    };
    assert!(err.is_timeout(), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(4));
}

/// A middleware below the adapter that answers by itself, as test stubs do: 401 to a
/// token it has not seen accepted yet, 200 to the newest; it builds each response from an
/// `http::Response` (reqwest gives it a placeholder URL).
struct Stub(TestSource);

#[async_trait::async_trait]
impl reqwest_middleware::Middleware for Stub {
    async fn handle(
        &self,
        req: reqwest::Request,
        _: &mut http::Extensions,
        _: reqwest_middleware::Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        let newest = format!("Bearer token-{}", self.0.fetches());
        let status = match req.headers().get(header::AUTHORIZATION) {
            Some(auth) if self.0.fetches() > 1 && *auth == *newest => StatusCode::OK,
            _ => StatusCode::UNAUTHORIZED,
        };
        let res = Response::builder().status(status).body("").unwrap();
        Ok(reqwest::Response::from(res))
    }
}

/// World: a stub middleware below the adapter answers 401 to the first token. Proves: a
/// response built below (with reqwest's placeholder URL, not the one sent) is judged as
/// the request's answer, not as a redirect target's: the token is fetched again and the
/// request replayed.
#[tokio::test]
async fn a_response_built_below_the_adapter_is_judged() {
    let source = TestSource::new();
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(AuthMiddleware::new(source.clone()).any_https_origin())
        .with(Stub(source.clone()))
        .build();
    let res = client.get("https://api.test/v1").send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(source.fetches(), 2);
}

/// Records whether each request reaching it could still be cloned.
struct CloneProbe(Arc<std::sync::Mutex<Vec<bool>>>);

#[async_trait::async_trait]
impl reqwest_middleware::Middleware for CloneProbe {
    async fn handle(
        &self,
        req: reqwest::Request,
        extensions: &mut http::Extensions,
        next: reqwest_middleware::Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        self.0.lock().unwrap().push(req.try_clone().is_some());
        next.run(req, extensions).await
    }
}

/// A request with an in-memory body stays cloneable below the adapter (for the
/// middlewares after it, and for reqwest's own redirects and HTTP/2 retries), in scope or
/// not; a 307 of a POST is followed with its body and the credential.
#[tokio::test]
async fn in_memory_bodies_stay_cloneable_below_the_adapter() {
    let seen: support::Log = Arc::default();
    let addr = serve({
        let seen = seen.clone();
        move |req: Request<hyper::body::Incoming>| {
            let seen = seen.clone();
            async move {
                let req = support::providers::read(req).await;
                let auth = req
                    .headers
                    .get(header::AUTHORIZATION)
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                seen.lock()
                    .unwrap()
                    .push((req.path.clone(), auth, req.body.to_vec()));
                let mut res = Response::builder();
                if req.path == "/old" {
                    res = res.status(307).header(header::LOCATION, "/new");
                }
                res.body(Full::new(Bytes::new())).unwrap()
            }
        }
    })
    .await;
    let base = format!("http://{addr}");
    let probe = Arc::new(std::sync::Mutex::new(Vec::new()));
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(
            AuthMiddleware::new(TestSource::new())
                .origin(&base)
                .unwrap()
                .allow_http_loopback(true),
        )
        .with(CloneProbe(probe.clone()))
        .build();
    let res = client
        .post(format!("{base}/old"))
        .body("{\"amount\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.url().path(), "/new");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for (_, auth, body) in &seen {
        assert_eq!(auth, "Bearer token-1");
        assert_eq!(body, b"{\"amount\":1}");
    }
    // Out of scope: passed through, cloneable too.
    let res = client
        .post(format!("http://localhost:{}/new", addr.port()))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(*probe.lock().unwrap(), vec![true, true]);
}

/// World: a middleware scoped with `origin_matching` by path (`/v1/` only). Proves: the
/// predicate sees the request's whole URI through the reqwest adapter (the adapter gives
/// the state machine only the origin otherwise): the credential goes to `/v1/...` and not
/// to `/public/...` on the same host.
#[tokio::test]
async fn a_path_predicate_sees_the_whole_uri() {
    let source = TestSource::new();
    let (base, log) = server(|_, _, _| StatusCode::OK).await;
    let client = loopback_client(
        AuthMiddleware::new(source.clone()).origin_matching(|uri| uri.path().starts_with("/v1/")),
    );
    for path in ["/v1/orders?page=2", "/public/status"] {
        let res = client.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.url().as_str(), format!("{base}{path}"));
    }
    let log = log.lock().unwrap().clone();
    assert_eq!(log[0].1, "Bearer token-1");
    assert_eq!(log[1].1, "", "no credential outside the predicate's paths");
}

/// World: a middleware given one loopback origin; requests to it, to the same host on
/// another port, and to it with userinfo in the URL. Proves: the adapter's origin check
/// (it hands the state machine the URL's scheme and authority only) sends the credential
/// to the origin alone, as the layer does: not to another port; and a URL with userinfo
/// (which reqwest turns into its own Basic `Authorization` before any middleware) keeps
/// that header, never ours.
#[tokio::test]
async fn only_the_given_origin_gets_the_credential_through_reqwest() {
    let (base, log) = server(|_, _, _| StatusCode::OK).await;
    let (other, other_log) = server(|_, _, _| StatusCode::OK).await;
    let client = loopback_client(
        AuthMiddleware::new(TestSource::new())
            .origin(&base)
            .unwrap(),
    );
    let with_userinfo = base.replace("http://", "http://user:pw@");
    for url in [
        format!("{base}/v1/a"),
        format!("{other}/v1/b"),
        format!("{with_userinfo}/v1/c"),
    ] {
        assert_eq!(client.get(url).send().await.unwrap().status(), 200);
    }
    let log = log.lock().unwrap().clone();
    assert_eq!(log[0].1, "Bearer token-1");
    assert!(
        !log[1].1.starts_with("Bearer"),
        "sent through a URL with userinfo: {}",
        log[1].1
    );
    assert_eq!(other_log.lock().unwrap()[0].1, "", "sent to another port");
}

/// A replay goes to exactly the URL the first attempt went to (an encoded path, an
/// encoded `#` in the query, a fragment, which is never sent), with the same method and
/// version: the adapter keeps the URL as text for the replay and parses it back.
#[tokio::test]
async fn a_replay_goes_to_the_url_and_method_of_the_first_attempt() {
    let seen: Arc<std::sync::Mutex<Vec<(http::Method, String, http::Version)>>> = Arc::default();
    let addr = serve({
        let seen = seen.clone();
        move |req: Request<hyper::body::Incoming>| {
            let seen = seen.clone();
            async move {
                let mut seen = seen.lock().unwrap();
                seen.push((req.method().clone(), req.uri().to_string(), req.version()));
                let status = match seen.len() {
                    1 => StatusCode::UNAUTHORIZED,
                    _ => StatusCode::OK,
                };
                Response::builder()
                    .status(status)
                    .body(Full::new(Bytes::new()))
                    .unwrap()
            }
        }
    })
    .await;
    let source = TestSource::new();
    let client = loopback_client(AuthMiddleware::new(source.clone()).any_https_origin());
    let res = client
        .request(
            http::Method::PATCH,
            format!("http://{addr}/v1/caf%C3%A9/a%2Fb/?q=%23x&r=%20#frag"),
        )
        .version(http::Version::HTTP_11)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(source.fetches(), 2, "the 401 refreshed the credential");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0], seen[1]);
    assert_eq!(seen[0].0, http::Method::PATCH);
    assert_eq!(seen[0].1, "/v1/caf%C3%A9/a%2Fb/?q=%23x&r=%20");
}

/// How a user's middleware wraps the errors it hands back.
type Wrap = fn(reqwest_middleware::Error) -> reqwest_middleware::Error;

/// A user's middleware outside the adapter (and outside reqwest-retry, when there is
/// one) that hands back every error it gets, wrapped by its `Wrap`.
struct Wrapping(Wrap);

#[async_trait::async_trait]
impl reqwest_middleware::Middleware for Wrapping {
    async fn handle(
        &self,
        req: reqwest::Request,
        ext: &mut http::Extensions,
        next: reqwest_middleware::Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        next.run(req, ext).await.map_err(self.0)
    }
}

/// World: a request the adapter refuses (plain http to a non-loopback host), under a
/// user's middleware that hands the error back as it came or wrapped the ways
/// reqwest-middleware and anyhow offer (`Error::middleware(err)`,
/// `anyhow::Error::new(err).context(..)`, `Result::context(..)`), with and without
/// reqwest-retry between it and the adapter (its default strategy, which hands back
/// `RetryError::Error`, or one retrying every error until its retry runs out,
/// `RetryError::WithRetries`). Proves: `auth_error` reads the adapter's error back
/// through each (its docs; README: "reads this crate's error back, through
/// reqwest-retry's wrapping too"; through reqwest-retry it read `None`, a transport
/// error to the caller's code, before 9cadaf5), and nothing panics.
#[tokio::test]
async fn auth_error_reads_the_error_back_through_retries_and_wrappings() {
    use anyhow::Context as _;
    let wraps: [(&str, Wrap); 4] = [
        ("no wrapping", |err| err),
        ("Error::middleware", reqwest_middleware::Error::middleware),
        ("anyhow context", |err| {
            reqwest_middleware::Error::Middleware(anyhow::Error::new(err).context("billing"))
        }),
        ("Result::context", |err| {
            reqwest_middleware::Error::Middleware(Err::<(), _>(err).context("billing").unwrap_err())
        }),
    ];
    let mut unread = Vec::new();
    for (name, wrap) in wraps {
        for retry in ["none", "default strategy", "retrying every error"] {
            let source = TestSource::new();
            let mut builder = ClientBuilder::new(reqwest::Client::new()).with(Wrapping(wrap));
            let policy = ExponentialBackoff::builder()
                .retry_bounds(Duration::from_millis(1), Duration::from_millis(5))
                .build_with_max_retries(1);
            match retry {
                "default strategy" => {
                    builder = builder.with(RetryTransientMiddleware::new_with_policy(policy));
                }
                "retrying every error" => {
                    builder = builder.with(RetryTransientMiddleware::new_with_policy_and_strategy(
                        policy,
                        RetryEverything,
                    ));
                }
                _ => {}
            }
            let client = builder
                .with(AuthMiddleware::new(source.clone()).any_https_origin())
                .build();
            let err = client
                .get("http://api.example.invalid/v1")
                .send()
                .await
                .unwrap_err();
            let kind = tower_client_auth::reqwest::auth_error(&err).map(Error::kind);
            if kind != Some(ErrorKind::InsecureTransport) {
                unread.push(format!(
                    "{name}, reqwest-retry inside it: {retry}: {kind:?}"
                ));
            }
        }
    }
    assert!(unread.is_empty(), "not read back: {unread:#?}");
}

/// World: a client with reqwest's own redirect policy (not this crate's
/// `redirect_policy()`) and the adapter given the API's origin; the API answers `302` to
/// a download on another host (another loopback port: another origin, as object
/// storage would be). Proves: the hop reaches that host named by its own `Host` and with
/// no credential. The adapter adds no `Host` of its own (module docs, "What the client
/// adds below": reqwest keeps a `Host` across a redirect to another host, so a forced one
/// would have sent the API's name there).
#[tokio::test]
async fn a_redirect_to_another_host_carries_neither_the_credential_nor_the_apis_host() {
    let (storage, seen) = support::recording_api(StatusCode::OK, support::host_named).await;
    let api = serve(move |_req: Request<hyper::body::Incoming>| async move {
        Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, format!("http://{storage}/blob/1"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    })
    .await;
    let client = ClientBuilder::new(reqwest::Client::builder().no_proxy().build().unwrap())
        .with(
            AuthMiddleware::new(TestSource::new())
                .allow_http_loopback(true)
                .client_without_proxy()
                .origin(format!("http://{api}").as_str())
                .unwrap(),
        )
        .build();
    let res = client
        .get(format!("http://{api}/files/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen, [(storage.to_string(), None)]);
}
