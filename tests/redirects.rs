//! "A credential goes only to the origins it was given", through redirects: every kind
//! of credential (bearer, a custom scheme, a cookie, an API-key header, several headers)
//! through every stack README and the examples show (tower-http's `FollowRedirect` above
//! the layer and below it, reqwest following redirects inside the client), redirected
//! by 302 and 307 to another port of the same host and to another host. Real loopback
//! servers record every header they receive; a same-origin redirect is the control that
//! shows the credential does arrive where it belongs.
#![cfg(all(feature = "tower-http", feature = "reqwest"))]

use crate::support;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, StatusCode, header};
use http_body_util::Full;
use support::{api_client, api_client_for, serve};
use tower::{ServiceBuilder, ServiceExt};
use tower_client_auth::{
    AuthLayer, Credential, ErrorKind, Origin, StaticCredential, redirect::SameOriginCredentials,
};
use tower_http::follow_redirect::FollowRedirectLayer;

const SECRET: &str = "s3cr3t-never-elsewhere";

/// Every kind of credential, each carrying `SECRET`.
fn credentials() -> Vec<(&'static str, Credential)> {
    #[allow(unused_mut)]
    let mut kinds = vec![
        ("bearer", Credential::bearer(SECRET).unwrap()),
        (
            "custom scheme",
            Credential::with_scheme("Secret", SECRET).unwrap(),
        ),
        ("cookie", Credential::cookie("sid", SECRET).unwrap()),
        (
            "api-key header",
            Credential::header("x-api-key", SECRET).unwrap(),
        ),
        (
            "several headers",
            Credential::from_headers([
                (
                    header::AUTHORIZATION,
                    HeaderValue::from_str(&format!("Bearer {SECRET}")).unwrap(),
                ),
                (
                    HeaderName::from_static("x-tenant-key"),
                    HeaderValue::from_static(SECRET),
                ),
            ])
            .unwrap(),
        ),
    ];
    // A DPoP-bound token: its proof goes with it, and neither goes elsewhere.
    #[cfg(feature = "jwt")]
    kinds.push((
        "dpop",
        tower_client_auth::token::DpopKey::generate()
            .unwrap()
            .credential(SECRET)
            .unwrap(),
    ));
    kinds
}

/// A server that records, for every request, whether any header carried `SECRET`, and
/// answers `GET /go/{status}?to={url}` with that redirect.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<(String, bool)>>>,
}

impl Recorder {
    async fn start(&self) -> SocketAddr {
        let seen = self.seen.clone();
        serve(move |req: Request<hyper::body::Incoming>| {
            let seen = seen.clone();
            async move {
                let carried = req
                    .headers()
                    .values()
                    .any(|v| String::from_utf8_lossy(v.as_bytes()).contains(SECRET));
                seen.lock()
                    .unwrap()
                    .push((req.uri().path().to_owned(), carried));
                let path = req.uri().path().to_owned();
                let mut res = http::Response::new(Full::new(Bytes::from_static(b"{}")));
                if path == "/denied" {
                    *res.status_mut() = StatusCode::UNAUTHORIZED;
                    res.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static(r#"Bearer error="invalid_token""#),
                    );
                }
                if let Some(status) = path.strip_prefix("/go/") {
                    let to = req
                        .uri()
                        .query()
                        .and_then(|q| q.strip_prefix("to="))
                        .unwrap();
                    *res.status_mut() = StatusCode::from_u16(status.parse().unwrap()).unwrap();
                    res.headers_mut()
                        .insert(header::LOCATION, HeaderValue::from_str(to).unwrap());
                }
                res
            }
        })
        .await
    }

    fn take(&self) -> Vec<(String, bool)> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// The three places a redirect can lead, from an API at `http://127.0.0.1:{api}`.
struct World {
    api: Recorder,
    api_addr: SocketAddr,
    other: Recorder,
    other_addr: SocketAddr,
}

impl World {
    async fn new() -> Self {
        let (api, other) = (Recorder::default(), Recorder::default());
        let api_addr = api.start().await;
        let other_addr = other.start().await;
        World {
            api,
            api_addr,
            other,
            other_addr,
        }
    }

    fn origin(&self) -> Origin {
        format!("http://{}", self.api_addr).parse().unwrap()
    }

    /// (what, the URL that redirects, whether its target is the API's own origin).
    fn redirects(&self) -> Vec<(String, String, bool)> {
        let (api, other) = (self.api_addr, self.other_addr);
        let mut cases = Vec::new();
        for status in [302, 307] {
            let go = |to: String| format!("http://{api}/go/{status}?to={to}");
            cases.push((
                format!("{status} to the same origin"),
                go(format!("http://{api}/landing")),
                true,
            ));
            cases.push((
                format!("{status} to another port of the same host"),
                go(format!("http://127.0.0.1:{}/landing", other.port())),
                false,
            ));
            cases.push((
                format!("{status} to another host"),
                go(format!("http://localhost:{}/landing", other.port())),
                false,
            ));
            cases.push((
                format!("{status} to another host that redirects back"),
                go(format!(
                    "http://localhost:{}/go/{status}?to=http://{api}/landing",
                    other.port()
                )),
                false,
            ));
        }
        cases
    }

    /// After one redirected request: the landing page was reached, and the secret
    /// reached the API's origin only, and reached it on the same-origin landing.
    /// After one redirected request that must not be followed (a DPoP proof below the
    /// layer): the first request carried the credential, no hop was made.
    fn check_not_followed(&self, what: &str) {
        let api = self.api.take();
        let other = self.other.take();
        assert!(
            other.is_empty(),
            "{what}: followed to another origin: {other:?}"
        );
        assert_eq!(api.len(), 1, "{what}: followed: {api:?}");
        assert!(api[0].1, "{what}: the first request lacked its credential");
    }

    fn check(&self, what: &str, same_origin: bool) {
        let api = self.api.take();
        let other = self.other.take();
        assert!(
            other.iter().all(|(_, carried)| !carried),
            "{what}: the credential reached another origin: {other:?}"
        );
        assert!(
            api.first().is_some_and(|(_, carried)| *carried),
            "{what}: the first request lacked its credential: {api:?}"
        );
        if same_origin {
            assert_eq!(api.len(), 2, "{what}: {api:?}");
            assert!(api[1].1, "{what}: the same-origin landing lacked it");
        } else {
            assert!(
                !other.is_empty(),
                "{what}: the redirect was not followed at all"
            );
        }
    }
}

fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::default()).unwrap()
}

/// World: tower-http's `FollowRedirect` *above* the layer (the usual order), with its
/// standard policy and with `SameOriginCredentials`, over a layer given the API's
/// origin; and the opt-in `any_https_origin` layer under `SameOriginCredentials`.
/// Proves: every credential kind reaches the API and never the other origin, through
/// every redirect.
#[tokio::test]
async fn follow_redirect_above_the_layer() {
    let world = World::new().await;
    for (kind, credential) in credentials() {
        let scoped = AuthLayer::new(StaticCredential::new(credential.clone()))
            .origin(world.origin())
            .unwrap()
            .allow_http_loopback(true);
        let any = AuthLayer::new(StaticCredential::new(credential.clone()))
            .any_https_origin()
            .allow_http_loopback(true);
        for (what, url, same) in world.redirects() {
            let standard = ServiceBuilder::new()
                .layer(FollowRedirectLayer::new())
                .layer(scoped.clone())
                .service(api_client());
            standard.oneshot(get(&url)).await.unwrap();
            world.check(&format!("{kind}, standard policy, scoped: {what}"), same);

            let ours = ServiceBuilder::new()
                .layer(FollowRedirectLayer::with_policy(
                    SameOriginCredentials::new(),
                ))
                .layer(scoped.clone())
                .service(api_client());
            ours.oneshot(get(&url)).await.unwrap();
            world.check(&format!("{kind}, our policy, scoped: {what}"), same);

            let opened = ServiceBuilder::new()
                .layer(FollowRedirectLayer::with_policy(
                    SameOriginCredentials::new(),
                ))
                .layer(any.clone())
                .service(api_client());
            opened.oneshot(get(&url)).await.unwrap();
            world.check(&format!("{kind}, our policy, any origin: {what}"), same);

            // The layer without replay, over a client typed for the caller's body.
            let direct = ServiceBuilder::new()
                .layer(FollowRedirectLayer::new())
                .layer(scoped.clone().without_replay())
                .service(api_client_for::<Full<Bytes>>());
            direct.oneshot(get(&url)).await.unwrap();
            world.check(&format!("{kind}, standard policy, direct: {what}"), same);

            let direct_any = ServiceBuilder::new()
                .layer(FollowRedirectLayer::with_policy(
                    SameOriginCredentials::new(),
                ))
                .layer(any.clone().without_replay())
                .service(api_client_for::<Full<Bytes>>());
            direct_any.oneshot(get(&url)).await.unwrap();
            world.check(
                &format!("{kind}, our policy, direct, any origin: {what}"),
                same,
            );
        }
    }
}

/// World: `FollowRedirect` *below* the layer, so the credential is already on the
/// request each hop copies, with `SameOriginCredentials`. Proves: no credential kind
/// follows a redirect to another origin (tower-http's own filter would let an API-key
/// header through), and a same-origin hop keeps it.
#[tokio::test]
async fn follow_redirect_below_the_layer() {
    let world = World::new().await;
    for (kind, credential) in credentials() {
        let layer = AuthLayer::new(StaticCredential::new(credential))
            .origin(world.origin())
            .unwrap()
            .allow_http_loopback(true);
        for (what, url, same) in world.redirects() {
            let svc = ServiceBuilder::new()
                .layer(layer.clone())
                .layer(FollowRedirectLayer::with_policy(
                    SameOriginCredentials::new(),
                ))
                .service(api_client());
            svc.oneshot(get(&url)).await.unwrap();
            // A proof is good for one request: with DPoP, below the layer, the 3xx goes
            // back instead of a hop the API would refuse.
            let check = |what: &str| match kind {
                "dpop" => world.check_not_followed(what),
                _ => world.check(what, same),
            };
            check(&format!("{kind}, below: {what}"));

            let direct = ServiceBuilder::new()
                .layer(layer.clone().without_replay())
                .layer(FollowRedirectLayer::with_policy(
                    SameOriginCredentials::new(),
                ))
                .service(api_client_for::<Full<Bytes>>());
            direct.oneshot(get(&url)).await.unwrap();
            check(&format!("{kind}, below, direct: {what}"));
        }
    }
}

/// World: a reqwest client left with reqwest's own redirect policy (README says to build
/// it with `redirect_policy()`), a refreshable bearer credential, and redirects to a
/// page answering 401. Proves: a 401 from another origin, which got no credential
/// (reqwest strips `Authorization`), is not judged a rejection: no token fetched, no
/// replay, the answer back as it came. The control: a hop within the origin carried the
/// credential, so its 401 is the credential's: fetched again and replayed once.
#[tokio::test]
async fn a_401_from_a_redirects_other_origin_is_not_a_rejection() {
    let world = World::new().await;
    let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let source = tower_client_auth::source_fn({
        let fetches = fetches.clone();
        move |_| {
            let n = fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { Credential::bearer(format!("{SECRET}-{n}")) }
        }
    });
    let auth = tower_client_auth::reqwest::AuthMiddleware::new(source)
        .origin(world.origin())
        .unwrap()
        .allow_http_loopback(true);
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(auth)
        .build();
    let (api, other) = (world.api_addr, world.other_addr);
    let res = client
        .get(format!(
            "http://{api}/go/307?to=http://localhost:{}/denied",
            other.port()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(res.url().host_str(), Some("localhost"));
    assert_eq!(
        res.extensions().get::<tower_client_auth::NotReplayed>(),
        None
    );
    assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(world.api.take().len(), 1, "not replayed");
    world.other.take();

    let res = client
        .get(format!("http://{api}/go/307?to=http://{api}/denied"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        res.extensions().get::<tower_client_auth::NotReplayed>(),
        Some(&tower_client_auth::NotReplayed::AlreadyReplayed)
    );
    assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(world.api.take().len(), 4, "the request and its hop, twice");
}

/// World: reqwest following redirects inside the client, built with the crate's
/// `redirect_policy`, under `AuthMiddleware` given the API's origin. Proves: no
/// credential kind reaches another origin (reqwest itself strips only `Authorization`
/// and `Cookie`); the cross-origin 3xx comes back to the caller; a same-origin redirect
/// is followed with the credential. A DPoP credential, with `Policy::none()` as the
/// docs ask (a reqwest policy cannot see that a request carries a proof, and a hop would
/// carry the first one): every 3xx comes back, the first request carried the credential.
#[tokio::test]
async fn reqwest_following_redirects() {
    let world = World::new().await;
    for (kind, credential) in credentials() {
        let policy = match kind {
            "dpop" => reqwest::redirect::Policy::none(),
            _ => tower_client_auth::reqwest::redirect_policy(),
        };
        let http = reqwest::Client::builder().redirect(policy).build().unwrap();
        let client = reqwest_middleware::ClientBuilder::new(http)
            .with(
                tower_client_auth::reqwest::AuthMiddleware::new(StaticCredential::new(credential))
                    .origin(world.origin())
                    .unwrap()
                    .allow_http_loopback(true),
            )
            .build();
        for (what, url, same) in world.redirects() {
            let res = client.get(&url).send().await.unwrap();
            let what = format!("{kind}, reqwest: {what}");
            if kind == "dpop" {
                assert!(res.status().is_redirection(), "{what}: {}", res.status());
                world.check_not_followed(&what);
            } else if same {
                assert_eq!(res.status(), 200, "{what}");
                world.check(&what, true);
            } else {
                assert!(res.status().is_redirection(), "{what}: {}", res.status());
                let api = world.api.take();
                assert_eq!(api.len(), 1, "{what}: {api:?}");
                assert!(api[0].1, "{what}");
                assert!(world.other.take().is_empty(), "{what}: followed elsewhere");
            }
        }
    }
}

/// World: a layer, a builder and a reqwest middleware given no origin. Proves: they
/// fail closed: every request is refused with `NoOrigin` (naming `.origin(..)` and the
/// explicit opt-in), nothing is sent, and the builder refuses to build.
#[tokio::test]
async fn a_layer_given_no_origin_sends_nothing() {
    let world = World::new().await;
    let url = format!("http://{}/v1/x", world.api_addr);
    let layer = AuthLayer::new(StaticCredential::bearer(SECRET).unwrap()).allow_http_loopback(true);
    let err = ServiceBuilder::new()
        .layer(layer)
        .service(api_client())
        .oneshot(get(&url))
        .await
        .unwrap_err();
    let err = err.downcast_ref::<tower_client_auth::Error>().unwrap();
    assert_eq!(err.kind(), ErrorKind::NoOrigin);
    let shown = err.to_string();
    assert!(
        shown.contains(".origin(") && shown.contains(".any_https_origin()"),
        "{shown}"
    );

    let refused = AuthLayer::builder(StaticCredential::bearer(SECRET).unwrap()).build();
    assert_eq!(refused.unwrap_err().setting(), "origin");

    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(
            tower_client_auth::reqwest::AuthMiddleware::new(
                StaticCredential::bearer(SECRET).unwrap(),
            )
            .allow_http_loopback(true),
        )
        .build();
    let err = client.get(&url).send().await.unwrap_err();
    let reqwest_middleware::Error::Middleware(err) = err else {
        panic!("{err:?}")
    };
    assert_eq!(
        err.downcast_ref::<tower_client_auth::Error>()
            .map(|e| e.kind()),
        Some(ErrorKind::NoOrigin)
    );
    assert!(world.api.take().is_empty(), "a request was sent");
}

/// World: `FollowRedirect` below a layer with a bearer credential, and a request that
/// carries a `DPoP` header the caller made itself (a mechanism of its own the layer does
/// not know). Proves: a `DPoP` header beside a bearer token is no proof of the layer's
/// and stops no redirect; this request follows
/// a same-origin redirect with its credential, as any other does.
#[tokio::test]
async fn a_dpop_header_the_caller_made_does_not_stop_redirects() {
    let world = World::new().await;
    let layer = AuthLayer::new(StaticCredential::bearer(SECRET).unwrap())
        .origin(world.origin())
        .unwrap()
        .allow_http_loopback(true);
    let svc = ServiceBuilder::new()
        .layer(layer)
        .layer(FollowRedirectLayer::with_policy(
            SameOriginCredentials::new(),
        ))
        .service(api_client());
    for (what, url, same) in world.redirects().into_iter().filter(|c| c.2) {
        let mut request = get(&url);
        request
            .headers_mut()
            .insert("dpop", HeaderValue::from_static("made-by-the-caller"));
        svc.clone().oneshot(request).await.unwrap();
        world.check(&format!("own DPoP header: {what}"), same);
    }
}

/// World: `FollowRedirect` below a DPoP layer, with a layer between them that rebuilds
/// each request (method, URI, headers and body into a new request: its extensions are
/// lost). Proves: the proved request still follows no redirect (its first request carried
/// the token and its proof; no hop was made).
#[tokio::test]
async fn a_proved_request_rebuilt_below_the_layer_follows_no_redirect() {
    let world = World::new().await;
    let dpop = credentials()
        .into_iter()
        .find(|(kind, _)| *kind == "dpop")
        .unwrap()
        .1;
    let layer = AuthLayer::new(StaticCredential::new(dpop))
        .origin(world.origin())
        .unwrap()
        .allow_http_loopback(true);
    let rebuild = |req: Request<_>| {
        let (parts, body) = req.into_parts();
        let mut rebuilt = Request::builder()
            .method(parts.method)
            .uri(parts.uri)
            .body(body)
            .unwrap();
        *rebuilt.headers_mut() = parts.headers;
        rebuilt
    };
    let svc = ServiceBuilder::new()
        .layer(layer)
        .map_request(rebuild)
        .layer(FollowRedirectLayer::with_policy(
            SameOriginCredentials::new(),
        ))
        .service(api_client());
    for (what, url, _) in world.redirects() {
        svc.clone().oneshot(get(&url)).await.unwrap();
        world.check_not_followed(&format!("dpop, rebuilt below: {what}"));
    }
}
