//! The reqwest adapter at its edges (review 123): origin scoping of the URL forms
//! reqwest rewrites, redirects (a redirect's target is never judged as the request's,
//! whatever its host is called), a body too large for a replay, requests dropped while
//! their replay's credential is fetched; and `WWW-Authenticate` challenges as the
//! standard rejection rule reads them.
#![cfg(feature = "reqwest")]

use crate::support;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::Full;
use reqwest_middleware::ClientBuilder;
use support::{TestSource, providers::serve};
use tower_client_auth::{
    NotReplayed,
    rejection::{RejectionPolicy, ResponseHead, StandardRejection, Verdict},
    reqwest::AuthMiddleware,
};

/// A middleware below the adapter that records each request's URL and `Authorization`
/// and answers 200 itself: nothing is connected to, so any host can be named.
struct Recorder(Paths);

#[async_trait::async_trait]
impl reqwest_middleware::Middleware for Recorder {
    async fn handle(
        &self,
        req: reqwest::Request,
        _: &mut http::Extensions,
        _: reqwest_middleware::Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        let auth = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap().to_owned());
        self.0.lock().unwrap().push((req.url().to_string(), auth));
        let res = Response::builder().status(200).body("").unwrap();
        Ok(reqwest::Response::from(res))
    }
}

/// World: a reqwest client whose adapter is given `https://api.example.com`,
/// `https://xn--bcher-kva.example` and `https://[2001:db8::1]:8443`, over a recorder
/// below it (nothing is connected to). Requests name those hosts in the forms reqwest's
/// URL parser rewrites (upper case, Unicode and full-width letters, a percent-encoded
/// dot, a default port written out or with a leading zero, an uncompressed IPv6
/// address) and in forms that are another host (a trailing dot, a suffix, userinfo
/// before `@`, a backslash). Proves: the credential goes to exactly the requests whose
/// URL, as reqwest will connect to it, names a given origin, and to no other: the
/// origin rule reads the rewritten URL, so no written form smuggles the credential
/// elsewhere, and none of the given origins' own forms loses it.
#[tokio::test]
async fn url_forms_reqwest_rewrites_get_the_credential_only_at_their_origin() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let client = ClientBuilder::new(reqwest::Client::new())
        .with(
            AuthMiddleware::new(TestSource::new())
                .origin("https://api.example.com")
                .unwrap()
                .origin("https://xn--bcher-kva.example")
                .unwrap()
                .origin("https://[2001:db8::1]:8443")
                .unwrap(),
        )
        .with(Recorder(seen.clone()))
        .build();
    let cases = [
        ("https://api.example.com/a", true),
        ("HTTPS://API.EXAMPLE.COM/a", true),
        ("https://api.example.com:443/a", true),
        ("https://api.example.com:0443/a", true),
        ("https://api%2Eexample.com/a", true),
        ("https://\u{ff41}pi.example.com/a", true),
        ("https://b\u{fc}cher.example/a", true),
        ("https://B\u{dc}CHER.example/a", true),
        ("https://[2001:0db8:0:0:0:0:0:1]:8443/a", true),
        ("https://[2001:db8::1]/a", false),
        ("https://api.example.com./a", false),
        ("https://api.example.com.evil.test/a", false),
        ("https://api.example.com@evil.test/a", false),
        ("https://evil.test\\@api.example.com/a", false),
        ("https://api.example.com:8443/a", false),
    ];
    for (url, gets) in cases {
        seen.lock().unwrap().clear();
        let res = client.get(url).send().await;
        let res = res.unwrap_or_else(|e| panic!("{url}: {e:?}"));
        assert_eq!(res.status(), 200, "{url}");
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "{url}: {seen:?}");
        let (sent_to, auth) = &seen[0];
        let ours = auth.as_deref() == Some("Bearer token-1");
        assert_eq!(ours, gets, "{url} (sent to {sent_to}): {auth:?}");
        if !gets {
            // Another origin's request goes as it came: no header of ours, nor any other
            // (userinfo aside, which reqwest turns into its own Basic header).
            assert!(
                auth.as_deref().is_none_or(|a| a.starts_with("Basic ")),
                "{url}: {auth:?}"
            );
        }
    }
}

/// Every request a loopback server saw: its path and `Authorization`.
type Paths = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A loopback server answering `status` to every request (and `Location: location`
/// when given), recording each.
async fn answering(status: StatusCode, location: Option<String>) -> (std::net::SocketAddr, Paths) {
    let seen: Paths = Arc::default();
    let addr = serve({
        let seen = seen.clone();
        move |req: Request<hyper::body::Incoming>| {
            let (seen, location) = (seen.clone(), location.clone());
            async move {
                let auth = req
                    .headers()
                    .get(header::AUTHORIZATION)
                    .map(|v| v.to_str().unwrap().to_owned());
                seen.lock()
                    .unwrap()
                    .push((req.uri().path().to_owned(), auth));
                let mut res = Response::builder().status(status);
                if let Some(location) = location {
                    res = res.header(header::LOCATION, location);
                }
                res.body(Full::new(Bytes::new())).unwrap()
            }
        }
    })
    .await;
    (addr, seen)
}

/// World: a client with reqwest's own redirect policy (README: "a client built
/// otherwise"), the adapter given the API's loopback origin. The API answers `302` to
/// another host (another loopback port, the host name pointed at it by the client's
/// resolver as DNS would), which answers `401` to everything. Once the other host is
/// `other.test`, once `no.url.provided.local`, the host reqwest gives a response a
/// middleware builds itself. Proves (README, Redirects: "A client built otherwise gets
/// no false verdict from an answer at another origin than the request's ... neither is
/// judged as the request's (no refetch, no replay)"): the other origin's 401 comes back
/// as it came, with no token request and the API asked once, whatever that origin's
/// host is called. Counters: the token endpoint's fetches, the API's requests (review
/// 123: (2, 2) for `no.url.provided.local`: the adapter took any answer from that host
/// for one a middleware below built, and judged it; now only reqwest's whole placeholder
/// URL with no peer address is).
#[tokio::test]
async fn a_redirect_targets_401_is_never_judged_whatever_its_host_is_called() {
    for other_host in ["other.test", "no.url.provided.local"] {
        let (other, other_seen) = answering(StatusCode::UNAUTHORIZED, None).await;
        let location = format!("http://{other_host}:{}/blob", other.port());
        let (api, api_seen) = answering(StatusCode::FOUND, Some(location)).await;
        let source = TestSource::new();
        let http = reqwest::Client::builder()
            .no_proxy()
            .resolve(other_host, other)
            .build()
            .unwrap();
        let client = ClientBuilder::new(http)
            .with(
                AuthMiddleware::new(source.clone())
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
        assert_eq!(res.status(), 401, "{other_host}");
        assert!(
            other_seen.lock().unwrap().iter().all(|(_, a)| a.is_none()),
            "{other_host}: the other origin got the credential"
        );
        assert_eq!(
            (source.fetches(), api_seen.lock().unwrap().len()),
            (1, 1),
            "{other_host}: the other origin's 401 was judged as the request's \
             (token fetches, requests the API saw)"
        );
    }
}

/// World: a client built with `redirect_policy()` and the adapter given
/// `http://127.0.0.1:<port>` (loopback allowed); the API redirects `/same` to `/landing`
/// on its own origin, and `/aliased` to the same server named `localhost` (another
/// origin that reaches the same socket), `/dotted` to `127.0.0.1.` and `/hex` to
/// `0x7f.0.0.1` (forms the URL parser rewrites to `127.0.0.1`). Proves: the policy
/// follows exactly the hops whose rewritten URL is the origin (with the credential),
/// and hands the hop to `localhost` back as it came, so that name never gets it.
#[tokio::test]
async fn redirect_policy_follows_only_hops_whose_rewritten_url_is_the_origin() {
    let seen: Paths = Arc::default();
    let port = Arc::new(std::sync::OnceLock::<u16>::new());
    let addr = serve({
        let (seen, port) = (seen.clone(), port.clone());
        move |req: Request<hyper::body::Incoming>| {
            let (seen, port) = (seen.clone(), port.clone());
            async move {
                let auth = req
                    .headers()
                    .get(header::AUTHORIZATION)
                    .map(|v| v.to_str().unwrap().to_owned());
                let path = req.uri().path().to_owned();
                seen.lock().unwrap().push((path.clone(), auth));
                let port = port.get().unwrap();
                let to = match path.as_str() {
                    "/same" => format!("http://127.0.0.1:{port}/landing"),
                    "/aliased" => format!("http://localhost:{port}/landing"),
                    "/dotted" => format!("http://127.0.0.1.:{port}/landing"),
                    "/hex" => format!("http://0x7f.0.0.1:{port}/landing"),
                    _ => {
                        return Response::builder()
                            .status(200)
                            .body(Full::new(Bytes::new()))
                            .unwrap();
                    }
                };
                Response::builder()
                    .status(StatusCode::FOUND)
                    .header(header::LOCATION, to)
                    .body(Full::new(Bytes::new()))
                    .unwrap()
            }
        }
    })
    .await;
    port.set(addr.port()).unwrap();
    let http = reqwest::Client::builder()
        .no_proxy()
        .redirect(tower_client_auth::reqwest::redirect_policy())
        .build()
        .unwrap();
    let client = ClientBuilder::new(http)
        .with(
            AuthMiddleware::new(TestSource::new())
                .allow_http_loopback(true)
                .client_without_proxy()
                .origin(format!("http://{addr}").as_str())
                .unwrap(),
        )
        .build();
    let ours = Some("Bearer token-1".to_owned());
    for (path, followed) in [
        ("/same", true),
        ("/dotted", true),
        ("/hex", true),
        ("/aliased", false),
    ] {
        seen.lock().unwrap().clear();
        let res = client
            .get(format!("http://{addr}{path}"))
            .send()
            .await
            .unwrap();
        let seen = seen.lock().unwrap().clone();
        if followed {
            assert_eq!(res.status(), 200, "{path}");
            assert_eq!(
                seen,
                [
                    (path.to_owned(), ours.clone()),
                    ("/landing".into(), ours.clone())
                ],
                "{path}"
            );
        } else {
            assert_eq!(res.status(), StatusCode::FOUND, "{path}");
            assert_eq!(seen, [(path.to_owned(), ours.clone())], "{path}");
        }
    }
}

/// World: the API answers 401 to `token-1` and 200 to any later token; a reqwest
/// request posts an in-memory body of 100 KiB (over the 64 KiB replay limit), then a
/// plain GET follows. Proves: the first comes back 401 marked
/// `NotReplayed::BodyTooLarge`, the server saw it once with the whole body, the rejection
/// still invalidated `token-1` (counted once), and the next request goes with a new
/// token and succeeds, with no replay counted.
#[tokio::test]
async fn a_body_over_the_limit_is_not_replayed_but_its_rejection_counts() {
    let (base, log) = support::logging_api(|_, auth, _| match auth {
        "Bearer token-1" => StatusCode::UNAUTHORIZED,
        _ => StatusCode::OK,
    })
    .await;
    let source = TestSource::new();
    let auth = AuthMiddleware::new(source.clone())
        .any_https_origin()
        .allow_http_loopback(true);
    let cache = auth.cache().clone();
    let client = ClientBuilder::new(reqwest::Client::builder().no_proxy().build().unwrap())
        .with(auth.client_without_proxy())
        .build();
    let body = vec![b'x'; 100 * 1024];
    let res = client
        .post(format!("{base}/upload"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(
        res.extensions().get::<NotReplayed>(),
        Some(&NotReplayed::BodyTooLarge)
    );
    {
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].2.len(), body.len(), "the whole body was sent once");
    }
    let res = client.get(format!("{base}/next")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(log.lock().unwrap()[1].1, "Bearer token-2");
    let stats = cache.stats();
    assert_eq!((stats.rejections, stats.replays), (1, 0), "{stats:?}");
    assert_eq!(source.fetches(), 2);
}

/// World: a gated source (its first token let through), an API answering 401 to
/// `token-1` and 200 to later tokens; eight reqwest requests are rejected together and
/// all wait for the one refresh, which is held; every caller then goes away (its task
/// aborted) before the refresh ends; the refresh is let through, and a ninth request
/// follows. Proves: one refresh for the eight rejections (one rejection counted, never
/// two fetches at once), no replay sent or counted for a caller that went away, and the
/// refresh the callers abandoned still lands: the ninth request goes with `token-2` at
/// once and succeeds, with no fetch of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reqwest_callers_gone_while_their_replays_credential_is_fetched_cost_nothing_more() {
    let (base, log) = support::logging_api(|_, auth, _| match auth {
        "Bearer token-1" => StatusCode::UNAUTHORIZED,
        _ => StatusCode::OK,
    })
    .await;
    let source = TestSource::gated(None);
    source.release(1);
    let auth = AuthMiddleware::new(source.clone())
        .any_https_origin()
        .allow_http_loopback(true)
        .client_without_proxy();
    let cache = auth.cache().clone();
    auth.warm_up().await.unwrap();
    let client = ClientBuilder::new(reqwest::Client::builder().no_proxy().build().unwrap())
        .with(auth)
        .build();
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let (client, url) = (client.clone(), format!("{base}/v1/{i}"));
            tokio::spawn(async move { client.post(url).body("{}").send().await })
        })
        .collect();
    // Every first attempt answered and the refresh under way (held at the gate): up to
    // 20 s on a loaded machine.
    for _ in 0..4000 {
        if log.lock().unwrap().len() == 8 && source.fetches() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(log.lock().unwrap().len(), 8);
    assert_eq!(source.fetches(), 2);
    for call in &calls {
        call.abort();
    }
    for call in calls {
        assert!(call.await.unwrap_err().is_cancelled());
    }
    source.release(1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let res = client.get(format!("{base}/after")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 9, "no replay was sent: {log:?}");
    assert_eq!(log[8].1, "Bearer token-2");
    assert_eq!(source.fetches(), 2);
    assert_eq!(source.max_in_flight(), 1);
    let stats = cache.stats();
    assert_eq!((stats.rejections, stats.replays), (1, 0), "{stats:?}");
}

/// The standard rule's verdict on a response of `status` with these
/// `WWW-Authenticate` header lines.
fn verdict(status: u16, lines: &[&[u8]]) -> Verdict {
    let mut headers = HeaderMap::new();
    for line in lines {
        headers.append(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_bytes(line).unwrap(),
        );
    }
    StandardRejection::default().judge(&ResponseHead::new(
        StatusCode::from_u16(status).unwrap(),
        &headers,
    ))
}

fn lacks(scope: Option<&str>) -> Verdict {
    Verdict::InsufficientScope {
        scope: scope.map(str::to_owned),
    }
}

/// World: 401s and 403s whose `WWW-Authenticate` is unusual but seen in the wild or
/// hostile: an `error=` inside a quoted string (escaped quotes, commas), an escaped
/// backslash closing a string, the challenge in a second header line, schemes and codes
/// in upper case, BWS around `=`, `insufficient_scope` beside `invalid_token`, the error
/// under a scheme that does not define it, a header of 40 challenges before the one that
/// matters, a 256 KiB quoted value, bytes that are not UTF-8. Proves: the rule reads the
/// challenge grammar (a quoted `error=` is text, not a parameter), `invalid_token`
/// always wins (a token the API refuses is refreshed), anything cut or broken falls to
/// the safe side (a rejection: refresh and replay, never a token kept that the API
/// refused), and nothing panics or takes long.
#[test]
fn challenges_in_the_wild_are_judged_on_the_safe_side() {
    let rejected = Verdict::Rejected;
    // A quoted `error=` is the realm's text.
    assert_eq!(
        verdict(401, &[br#"Bearer realm="a, error=\"insufficient_scope\"""#]),
        rejected
    );
    assert_eq!(
        verdict(401, &[br#"Bearer realm="a, error=insufficient_scope""#]),
        rejected
    );
    // `\\` is one backslash: the string ends at the next quote.
    assert_eq!(
        verdict(
            401,
            &[br#"Bearer realm="a\\", error="insufficient_scope", scope="w""#]
        ),
        lacks(Some("w"))
    );
    // The Bearer challenge in a second line, after a Basic one.
    assert_eq!(
        verdict(
            401,
            &[
                b"Basic realm=\"x\"",
                br#"Bearer error="insufficient_scope", scope="a b""#
            ]
        ),
        lacks(Some("a b"))
    );
    assert_eq!(
        verdict(403, &[b"BEARER ERROR = INSUFFICIENT_SCOPE"]),
        lacks(None)
    );
    // `invalid_token` wins, in any order and line.
    for lines in [
        &[&br#"Bearer error="insufficient_scope", Bearer error="invalid_token""#[..]][..],
        &[
            &br#"Bearer error="insufficient_scope""#[..],
            &br#"DPoP error="invalid_token""#[..],
        ],
        &[&br#"Bearer error="invalid_token", error_description="insufficient_scope""#[..]],
    ] {
        assert_eq!(verdict(401, lines), rejected, "{lines:?}");
    }
    // A scheme that does not define the error: a plain rejection (a 403 stays accepted).
    assert_eq!(
        verdict(401, &[br#"Newauth error="insufficient_scope""#]),
        rejected
    );
    assert_eq!(
        verdict(403, &[br#"Newauth error="insufficient_scope""#]),
        Verdict::Accepted
    );
    assert_eq!(
        verdict(403, &[br#"Bearer error="invalid_token""#]),
        Verdict::Accepted
    );
    // Past the challenge limit: the scope error is not read, the 401 is a rejection.
    let many = format!(
        "{}, Bearer error=\"insufficient_scope\"",
        vec!["Basic realm=\"r\""; 40].join(", ")
    );
    assert_eq!(verdict(401, &[many.as_bytes()]), rejected);
    // Huge and broken input: judged, at once.
    let huge = format!(
        "Bearer realm=\"{}\", error=\"insufficient_scope\"",
        "a\\\",".repeat(64 * 1024)
    );
    let started = std::time::Instant::now();
    assert_eq!(verdict(401, &[huge.as_bytes()]), lacks(None));
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(
        verdict(
            401,
            &[b"Bearer realm=\"\xff\xfe\", error=\"insufficient_scope\""]
        ),
        lacks(None)
    );
    assert_eq!(
        verdict(401, &[b"Bearer error=\"insufficient_scope"]),
        rejected
    );
}

/// A middleware below the adapter that passes each response up through `http::Response`
/// and back (as one that rewrites a header or wraps the body does; reqwest documents the
/// two conversions as inverses): reqwest's `http::Response` keeps the response's
/// extensions (its peer address among them) but not its URL, so what comes back carries
/// reqwest's placeholder URL and the API's peer address.
struct RoundTrip;

#[async_trait::async_trait]
impl reqwest_middleware::Middleware for RoundTrip {
    async fn handle(
        &self,
        req: reqwest::Request,
        extensions: &mut http::Extensions,
        next: reqwest_middleware::Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        let res = next.run(req, extensions).await?;
        let (mut parts, body) = http::Response::<reqwest::Body>::from(res).into_parts();
        parts
            .headers
            .insert("x-seen-by", http::HeaderValue::from_static("round-trip"));
        Ok(reqwest::Response::from(http::Response::from_parts(
            parts, body,
        )))
    }
}

/// World: the API (loopback) answers 401 to `token-1` and 200 to any later token; below
/// the adapter sits a middleware that passes each response through `http::Response` and
/// back ([`RoundTrip`]): the API's own 401 reaches the adapter with reqwest's placeholder
/// URL and the API's peer address. Proves (README: one refresh and one replay on a 401;
/// `speaks_for`: "A response a middleware below built itself carries reqwest's
/// placeholder URL ... it speaks for the request"): the API's 401 is judged as the
/// request's, `token-1` refetched once and the request replayed once with `token-2`.
/// Counters: the source's fetches (2), the API's requests (2), the final status (200).
/// On 1edaa07 the placeholder host alone made it speak; since 235bf63 a peer address
/// makes the placeholder another origin, and the 401 comes back unjudged (1 fetch, 1
/// request, 401).
#[tokio::test]
async fn an_apis_401_passed_up_through_http_response_is_still_judged_and_replayed() {
    let (base, log) = support::logging_api(|_, auth, _| match auth {
        "Bearer token-1" => StatusCode::UNAUTHORIZED,
        _ => StatusCode::OK,
    })
    .await;
    let source = TestSource::new();
    let client = ClientBuilder::new(reqwest::Client::builder().no_proxy().build().unwrap())
        .with(
            AuthMiddleware::new(source.clone())
                .allow_http_loopback(true)
                .client_without_proxy()
                .origin(base.as_str())
                .unwrap(),
        )
        .with(RoundTrip)
        .build();
    let res = client.get(format!("{base}/a")).send().await.unwrap();
    let status = res.status();
    assert_eq!(res.headers()["x-seen-by"], "round-trip");
    assert_eq!(
        (status.as_u16(), source.fetches(), log.lock().unwrap().len()),
        (200, 2, 2),
        "(status, token fetches, API requests): the API's 401 was not judged"
    );
}
