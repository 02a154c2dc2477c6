//! Origin scoping over real loopback servers: one client shared by the credential's API
//! and a third party. The third party never sees the credential, over Tower and reqwest.

use crate::support;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use support::{Recorded, api_client, auths, recording_api};
use tower::{Layer, ServiceExt};
use tower_client_auth::{AuthLayer, Credential, RotatingCredential};

/// A server that records the `Authorization` header of each request and answers `status`.
async fn recording(status: StatusCode) -> (String, Recorded) {
    let (addr, seen) = recording_api(status, |_| String::new()).await;
    (format!("http://{addr}"), seen)
}

/// World: a layer scoped to the API's origin over a client that also calls a third
/// party (which answers 401, to tempt a refresh). Proves: the API gets the credential;
/// the third party never does, is not replayed, and causes no fetch; a request to the
/// API's host on another port is another origin.
#[tokio::test]
async fn tower_the_wrong_origin_never_sees_the_credential() {
    let (api, api_seen) = recording(StatusCode::OK).await;
    let (other, other_seen) = recording(StatusCode::UNAUTHORIZED).await;
    let source = RotatingCredential::new(Credential::bearer("scoped-token").unwrap());
    let layer = AuthLayer::new(source)
        .allow_http_loopback(true)
        .origin(&api)
        .unwrap();
    let cache = layer.cache().clone();
    let svc = layer.layer(api_client());
    let get = |url: String| {
        let svc = svc.clone();
        async move {
            let res = svc
                .oneshot(Request::get(url).body(Full::<Bytes>::default()).unwrap())
                .await
                .unwrap();
            let status = res.status();
            res.into_body().collect().await.unwrap();
            status
        }
    };
    assert_eq!(get(format!("{api}/v1/me")).await, 200);
    assert_eq!(get(format!("{other}/hook")).await, 401);
    assert_eq!(get(format!("{other}/hook?to={api}")).await, 401);
    assert_eq!(auths(&api_seen), [Some("Bearer scoped-token".to_owned())]);
    assert_eq!(auths(&other_seen), [None, None], "sent once each, bare");
    let stats = cache.stats();
    assert_eq!((stats.fetches, stats.rejections, stats.replays), (1, 0, 0));
}

/// The same world through the reqwest middleware.
#[cfg(feature = "reqwest")]
#[tokio::test]
async fn reqwest_the_wrong_origin_never_sees_the_credential() {
    use tower_client_auth::reqwest::AuthMiddleware;
    let (api, api_seen) = recording(StatusCode::OK).await;
    let (other, other_seen) = recording(StatusCode::UNAUTHORIZED).await;
    let source = RotatingCredential::new(Credential::bearer("scoped-token").unwrap());
    let auth = AuthMiddleware::new(source)
        .allow_http_loopback(true)
        .origin(&api)
        .unwrap();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(auth)
        .build();
    let status = |url: String| {
        let client = client.clone();
        async move { client.get(url).send().await.unwrap().status() }
    };
    assert_eq!(status(format!("{api}/v1/me")).await, 200);
    assert_eq!(status(format!("{other}/hook")).await, 401);
    assert_eq!(auths(&api_seen), [Some("Bearer scoped-token".to_owned())]);
    assert_eq!(auths(&other_seen), [None]);
}

/// A predicate scopes what a list cannot name; plain http to a non-loopback host that is
/// out of scope is passed through (no credential, so no transport rule applies).
#[tokio::test]
async fn a_predicate_scopes_and_out_of_scope_requests_are_untouched() {
    let (api, api_seen) = recording(StatusCode::OK).await;
    let port = api.rsplit(':').next().unwrap().to_owned();
    let source = RotatingCredential::new(Credential::bearer("scoped-token").unwrap());
    let svc = AuthLayer::new(source)
        .allow_http_loopback(true)
        .origin_matching(move |uri| uri.port_u16().map(|p| p.to_string()) == Some(port.clone()))
        .layer(api_client());
    let res = svc
        .oneshot(
            Request::get(format!("{api}/v1/me"))
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(auths(&api_seen), [Some("Bearer scoped-token".to_owned())]);

    // Out of scope over plain http to a remote host: sent untouched, not refused.
    let fake = support::FakeApi::new(|_, _| StatusCode::OK);
    let svc = AuthLayer::new(RotatingCredential::new(
        Credential::bearer("scoped-token").unwrap(),
    ))
    .origin("https://api.example.com")
    .unwrap()
    .layer(fake.service());
    let req = Request::get("http://cdn.example.net/logo.png")
        .body(Full::<Bytes>::default())
        .unwrap();
    assert_eq!(svc.oneshot(req).await.unwrap().status(), 200);
    assert_eq!(fake.seen()[0].authorization, None);
}

/// World: `.origin(..)` given an origin no request could ever carry the credential to
/// (plain `http`, `ws` or `wss` to a host that is not loopback; a scheme that is neither
/// `https` nor `http`), on the layer and on the reqwest middleware. Proves: it is an
/// `InvalidOrigin` at `.origin(..)`, saying why, not a layer whose every request to that
/// origin fails later with `InsecureTransport`; the loopback forms stay accepted, since
/// `allow_http_loopback` may come after them.
#[test]
fn an_origin_that_could_never_carry_the_credential_is_refused_where_it_is_given() {
    use tower_client_auth::StaticCredential;
    let layer = || AuthLayer::new(StaticCredential::bearer("t").unwrap());
    for (never, why) in [
        ("http://api.example.com", "plain http"),
        ("ws://api.example.com", "plain http"),
        ("wss://api.example.com", "wss"),
        ("http://api.example.com:8443", "plain http"),
        ("ftp://files.example.com:21", "scheme"),
    ] {
        let err = layer().origin(never).unwrap_err();
        assert!(err.to_string().contains(why), "{never}: {err}");
        #[cfg(feature = "reqwest")]
        {
            use tower_client_auth::reqwest::AuthMiddleware;
            let middleware = AuthMiddleware::new(StaticCredential::bearer("t").unwrap());
            let err = middleware.origin(never).unwrap_err();
            assert!(err.to_string().contains(why), "reqwest, {never}: {err}");
        }
    }
    for loopback in [
        "http://127.0.0.1:8080",
        "http://localhost",
        "ws://[::1]:9000",
        "wss://127.0.0.1:8443",
    ] {
        assert!(layer().origin(loopback).is_ok(), "{loopback}");
    }
}

/// `.origin(..)` takes what users hold, and refuses what is not exactly an origin with a
/// typed error here, not a scope that silently differs. `Origin::of_url` is the explicit
/// way to take a base URL's origin; credentials in a URL are refused either way.
#[test]
fn origins_take_what_users_hold_and_refuse_what_is_not_one() {
    use tower_client_auth::{InvalidOrigin, Origin, StaticCredential};
    let layer = || AuthLayer::new(StaticCredential::bearer("t").unwrap());
    let uri: http::Uri = "https://api.example.com".parse().unwrap();
    let origin: Origin = "https://api.example.com".parse().unwrap();
    let held = String::from("https://API.example.com:443");
    let given: Vec<Result<_, InvalidOrigin>> = vec![
        layer().origin("https://api.example.com"),
        layer().origin(String::from("https://api.example.com/")),
        layer().origin(&held),
        layer().origin(&uri),
        layer().origin(uri.clone()),
        layer().origin(&origin),
        layer().origin(origin.clone()),
        layer().origin(Origin::of_url("https://api.example.com/v1/things?page=2").unwrap()),
    ];
    for (i, layer) in given.into_iter().enumerate() {
        assert!(layer.is_ok(), "form {i} refused");
    }
    #[cfg(feature = "reqwest")]
    {
        let url = reqwest::Url::parse("https://api.example.com").unwrap();
        assert!(layer().origin(&url).is_ok());
        assert!(layer().origin(url).is_ok());
        let with_path = reqwest::Url::parse("https://api.example.com/v1").unwrap();
        assert!(layer().origin(&with_path).is_err());
        assert!(Origin::of_url(with_path.as_str()).is_ok());
    }
    for refused in [
        "https://api.example.com/v1",
        "https://api.example.com?x=1",
        "https://user:secret@api.example.com",
        "api.example.com",
        "/v1",
        "ftp://files.example.com",
        "",
    ] {
        let err = layer().origin(refused).unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }
    let err = layer().origin("https://api.example.com/v1").unwrap_err();
    assert!(err.to_string().contains("Origin::of_url"), "{err}");
    assert!(Origin::of_url("https://user:secret@api.example.com/v1").is_err());

    // Display: the form a browser's `Origin` header takes, and it parses back.
    for (given, shown) in [
        ("https://API.Example.com:443/", "https://api.example.com"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("https://[::1]:8443", "https://[::1]:8443"),
        ("http://localhost:80", "http://localhost"),
    ] {
        let origin: Origin = given.parse().unwrap();
        assert_eq!(origin.to_string(), shown);
        assert_eq!(origin.to_string().parse::<Origin>().unwrap(), origin);
    }
}

/// A server that routes by `Host` (a shared front: an ingress, a CDN, a virtual host)
/// and records, for each request, the `Host` it named and its `Authorization`.
async fn virtual_hosts() -> (String, Recorded) {
    let (addr, seen) = recording_api(StatusCode::OK, support::host_named).await;
    (format!("http://{addr}"), seen)
}

/// World: a layer (replaying and direct) and a reqwest middleware given the API's
/// origin; the API's address is a shared front that routes each request by its `Host`
/// header. A request whose URI names the API's origin but whose `Host` header names
/// another (`tenant.evil.test`: a header copied from an incoming request, say) is
/// delivered to that other origin. Proves (should): the credential goes only with a
/// request whose `Host` names the given origin.
#[tokio::test]
async fn a_host_header_naming_another_origin_gets_no_credential() {
    let (api, seen) = virtual_hosts().await;
    let credential = || RotatingCredential::new(Credential::bearer("scoped-token").unwrap());
    let layer = AuthLayer::new(credential())
        .allow_http_loopback(true)
        .origin(&api)
        .unwrap();
    let request = || {
        Request::get(format!("{api}/v1/me"))
            .header(header::HOST, "tenant.evil.test")
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    layer
        .clone()
        .layer(api_client())
        .oneshot(request())
        .await
        .unwrap();
    layer
        .clone()
        .without_replay()
        .layer(support::api_client_for::<Full<Bytes>>())
        .oneshot(request())
        .await
        .unwrap();
    let entries: &[&str] = if cfg!(feature = "reqwest") {
        &["tower", "direct", "reqwest", "reqwest, a predicate"]
    } else {
        &["tower", "direct"]
    };
    #[cfg(feature = "reqwest")]
    {
        use tower_client_auth::reqwest::AuthMiddleware;
        let middleware = || AuthMiddleware::new(credential()).allow_http_loopback(true);
        // A predicate reads the whole URI: the middleware hands the state machine the
        // request to judge (its other path to the same rule).
        let port = api.rsplit(':').next().unwrap().parse::<u16>().unwrap();
        for middleware in [
            middleware().origin(&api).unwrap(),
            middleware().origin_matching(move |uri| uri.port_u16() == Some(port)),
        ] {
            reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
                .with(middleware)
                .build()
                .get(format!("{api}/v1/me"))
                .header(header::HOST, "tenant.evil.test")
                .send()
                .await
                .unwrap();
        }
    }
    // The control: a `Host` header naming the API's own origin keeps the credential.
    let own = api.strip_prefix("http://").unwrap().to_owned();
    let res = layer
        .clone()
        .layer(api_client())
        .oneshot(
            Request::get(format!("{api}/v1/me"))
                .header(header::HOST, own.to_uppercase())
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let control = seen.lock().unwrap().pop().unwrap();
    assert_eq!(
        control.1.as_deref(),
        Some("Bearer scoped-token"),
        "{control:?}"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), entries.len(), "{seen:?}");
    let mut leaked = Vec::new();
    for (entry, (host, auth)) in entries.iter().zip(&seen) {
        assert_eq!(
            host, "tenant.evil.test",
            "{entry}: the Host header was not kept"
        );
        if auth.is_some() {
            leaked.push(*entry);
        }
    }
    assert!(
        leaked.is_empty(),
        "the credential went to the origin the Host header names, through: {leaked:?}"
    );
}

type Seen = std::sync::Arc<std::sync::Mutex<Vec<(Option<String>, Option<String>)>>>;

/// Records, for each request the inner service receives, its `Host` header and its
/// `Authorization`.
fn recorder<B: Send + 'static>(
    seen: Seen,
) -> impl tower::Service<
    Request<B>,
    Response = http::Response<Full<Bytes>>,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |req: Request<B>| {
        let seen = seen.clone();
        async move {
            let get = |name| {
                req.headers()
                    .get(name)
                    .map(|v: &http::HeaderValue| v.to_str().unwrap().to_owned())
            };
            seen.lock()
                .unwrap()
                .push((get(header::HOST), get(header::AUTHORIZATION)));
            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
        }
    })
}

/// README: "A credential goes only to the origins it was given ..., never with a `Host`
/// header that names another". `AuthLayer::origin`: "So does a request whose `Host`
/// header names another host or port than its URI: a server that routes by `Host` (an
/// ingress, a CDN, virtual hosts) would deliver it to that other origin."
///
/// World: a layer given `https://api.example.com` only, with `allow_relative_uris(true)`
/// (the stack below sets the origin: a connection to a shared front), and an
/// origin-form request `/v1/me` whose `Host` header names `tenant.evil.test` (a header
/// copied from an incoming request, say). An HTTP/1 connection sends that `Host` as it
/// is, and the front routes the request to `tenant.evil.test`.
/// Should: no credential on that request (replaying and `Direct`).
#[tokio::test]
async fn a_relative_request_whose_host_names_another_origin_gets_no_credential() {
    let seen: Seen = Seen::default();
    let layer = AuthLayer::new(RotatingCredential::new(
        Credential::bearer("scoped-token").unwrap(),
    ))
    .origin("https://api.example.com")
    .unwrap()
    .allow_relative_uris(true);
    let request = |host: &str| {
        Request::get("/v1/me")
            .header(header::HOST, host)
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let res = layer
        .clone()
        .layer(recorder::<tower_client_auth::ReplayBody<Full<Bytes>>>(
            seen.clone(),
        ))
        .oneshot(request("tenant.evil.test"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    layer
        .clone()
        .without_replay()
        .layer(recorder::<Full<Bytes>>(seen.clone()))
        .oneshot(request("tenant.evil.test"))
        .await
        .unwrap();
    // The control: a `Host` naming the given origin gets the credential.
    layer
        .clone()
        .layer(recorder::<tower_client_auth::ReplayBody<Full<Bytes>>>(
            seen.clone(),
        ))
        .oneshot(request("api.example.com"))
        .await
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(
        seen[2],
        (
            Some("api.example.com".into()),
            Some("Bearer scoped-token".into())
        )
    );
    let leaked: Vec<_> = ["replaying", "direct"]
        .iter()
        .zip(&seen[..2])
        .filter(|(_, (_, auth))| auth.is_some())
        .collect();
    assert!(
        leaked.is_empty(),
        "the credential went with a Host naming tenant.evil.test: {leaked:?}"
    );
}

/// World: the same over the wire: an HTTP/1 connection (hyper's `conn::http1`, as a stack that
/// sets the origin below the layer would hold) to a shared front that routes by `Host`.
/// The front's `tenant.evil.test` virtual host records what it received.
#[tokio::test]
async fn over_the_wire_a_relative_request_routed_by_host_to_another_origin_gets_no_credential() {
    let (addr, seen) = recording_api(StatusCode::OK, support::host_named).await;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let send = std::sync::Arc::new(tokio::sync::Mutex::new(send));
    let inner = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let send = send.clone();
        async move {
            let mut send = send.lock().await;
            send.ready().await?;
            send.send_request(req).await
        }
    });
    let svc = AuthLayer::new(RotatingCredential::new(
        Credential::bearer("scoped-token").unwrap(),
    ))
    .origin("https://api.example.com")
    .unwrap()
    .allow_relative_uris(true)
    .without_replay()
    .layer(inner);
    let res = svc
        .oneshot(
            Request::get("/v1/me")
                .header(header::HOST, "tenant.evil.test")
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, "tenant.evil.test");
    assert_eq!(
        seen[0].1, None,
        "the virtual host tenant.evil.test received the credential"
    );
}

/// `scope::host_headers_agree` (src/scope.rs): "Whether a request's `Host` header ...
/// names the same host and port as its absolute URI ... one that is not an authority
/// ... never agree[s]"; `AuthLayer::origin`: a request "whose `Host` header names another
/// host or port than its URI" gets no credential.
///
/// World: a layer given `https://api.example.com`; requests to that URI whose `Host`
/// header names a port no URL parser accepts (`99999`, and `65979`, which is 443 modulo
/// 2^16). `http`'s `port_u16` reads such a port as absent, and the rule then fills in
/// the scheme's default (443): the header is taken to agree.
/// Should: no credential (the header names neither the URI's port nor a valid one).
#[tokio::test]
async fn a_host_header_with_an_out_of_range_port_gets_no_credential() {
    for host in ["api.example.com:99999", "api.example.com:65979"] {
        let seen: Seen = Seen::default();
        let layer = AuthLayer::new(RotatingCredential::new(
            Credential::bearer("scoped-token").unwrap(),
        ))
        .origin("https://api.example.com")
        .unwrap();
        let request = Request::get("https://api.example.com/v1/me")
            .header(header::HOST, host)
            .body(Full::<Bytes>::default())
            .unwrap();
        layer
            .without_replay()
            .layer(recorder::<Full<Bytes>>(seen.clone()))
            .oneshot(request)
            .await
            .unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec![(Some(host.to_owned()), None)],
            "Host: {host} was taken to name port 443"
        );
    }
}

/// `Origin` (src/scope.rs): "A string that is not an origin: it needs a scheme and a host
/// ..., and nothing after them"; `AuthLayer::origin`: "Anything with a path, query or
/// credentials is an `InvalidOrigin` here, not a scope that silently differs".
///
/// World: an origin written with a port no URL parser accepts (`99999`; `65979`, a typo
/// of a five-digit port, is 443 modulo 2^16). `http` parses the authority, its
/// `port_u16` reads the port as absent, and `Origin` fills in the scheme's default: the
/// scope silently becomes `https://api.example.com` (port 443), an origin nobody gave.
/// Should: refused as an `InvalidOrigin`; and in any case no credential for
/// `https://api.example.com/` (port 443).
#[tokio::test]
async fn an_origin_whose_port_is_no_port_is_refused_not_read_as_the_default_port() {
    for given in [
        "https://api.example.com:99999",
        "https://api.example.com:65979",
    ] {
        let parsed = given.parse::<tower_client_auth::Origin>();
        let of_url = tower_client_auth::Origin::of_url(&format!("{given}/v1/"));
        let seen: Seen = Seen::default();
        if let Ok(layer) = AuthLayer::new(RotatingCredential::new(
            Credential::bearer("scoped-token").unwrap(),
        ))
        .origin(given)
        {
            layer
                .without_replay()
                .layer(recorder::<Full<Bytes>>(seen.clone()))
                .oneshot(
                    Request::get("https://api.example.com/v1/me")
                        .body(Full::<Bytes>::default())
                        .unwrap(),
                )
                .await
                .unwrap();
        }
        #[cfg(feature = "reqwest")]
        assert!(
            tower_client_auth::reqwest::AuthMiddleware::new(RotatingCredential::new(
                Credential::bearer("scoped-token").unwrap(),
            ))
            .origin(given)
            .is_err(),
            "{given}: the reqwest middleware took it"
        );
        let seen = seen.lock().unwrap().clone();
        assert!(
            seen.iter().all(|(_, auth)| auth.is_none()),
            "given {given}, the credential went to https://api.example.com (port 443): {seen:?}"
        );
        assert!(
            parsed.is_err() && of_url.is_err(),
            "{given} was taken as an origin: {:?} / {:?}",
            parsed.map(|o| o.to_string()),
            of_url.map(|o| o.to_string())
        );
    }
}

/// README: a credential goes "only over https (`https` as a connector starts TLS for it:
/// not a scheme built as `HTTPS`, nor `wss` ...)"; `lib.rs`: "Credentials go only to
/// `https` URIs".
///
/// World: hyper-util's client over a connector that decides TLS as hyper-tls's
/// `HttpsConnector` does (`dst.scheme_str() == Some("https")`: TLS; any other scheme: the
/// plain TCP stream, here to a loopback recorder standing in for `api.example.com`, a
/// non-loopback host). (a) A layer given `https://api.example.com:<port>` and a request
/// whose URI was built with `Uri::builder().scheme("HTTPS")`: `http` keeps that scheme as
/// another scheme than `Scheme::HTTPS` (only a parsed `HTTPS://` string is folded to it),
/// which the origin and transport rules read case-insensitively as https. (b) A layer
/// given `.any_https_origin()` and a `wss://` URI, which the transport rule takes for
/// https though no HTTP client connector starts TLS for it. Direct and replaying.
/// Proves: no credential goes in plain text to a non-loopback host (review 111: each of
/// the three arrived in the clear; the transport rule read the scheme case-insensitively
/// and took `wss` for https).
#[tokio::test]
async fn a_scheme_the_connector_does_not_take_for_https_never_carries_the_credential_in_clear() {
    let (addr, seen) = recording_api(StatusCode::OK, support::host_named).await;
    // hyper-tls's rule: TLS only for a URI whose scheme is the text `https`.
    let connector = tower::service_fn(move |dst: http::Uri| {
        Box::pin(async move {
            if dst.scheme_str() == Some("https") {
                return Err(std::io::Error::other("TLS would start here"));
            }
            tokio::net::TcpStream::connect(addr)
                .await
                .map(hyper_util::rt::TokioIo::new)
        })
    });
    let client = || {
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build::<_, Full<Bytes>>(connector)
    };
    let port = addr.port();
    let source = || RotatingCredential::new(Credential::bearer("scoped-token").unwrap());

    // (a) A scheme built as `HTTPS`, to the origin given.
    let scoped = AuthLayer::new(source())
        .origin(format!("https://api.example.com:{port}").as_str())
        .unwrap()
        .without_replay()
        .layer(client());
    // A URI whose scheme was built as `HTTPS`: `http` keeps it apart from `Scheme::HTTPS`.
    let upper_case_https = || {
        let uri = http::Uri::builder()
            .scheme("HTTPS")
            .authority(format!("api.example.com:{port}"))
            .path_and_query("/v1/me")
            .build()
            .unwrap();
        assert_ne!(uri.scheme(), Some(&http::uri::Scheme::HTTPS));
        Request::get(uri).body(Full::<Bytes>::default()).unwrap()
    };
    // Each is refused before it is sent (lib.rs: "Anything else fails with
    // `ErrorKind::InsecureTransport` before a byte is sent").
    let refused = |sent: Result<_, tower_client_auth::BoxError>| {
        let err = sent.expect_err("sent");
        let kind = err
            .downcast_ref::<tower_client_auth::Error>()
            .map(|e| e.kind());
        assert_eq!(
            kind,
            Some(tower_client_auth::ErrorKind::InsecureTransport),
            "{err}"
        );
    };
    refused(scoped.oneshot(upper_case_https()).await.map(drop));

    // The same through the replaying layer.
    let replaying = AuthLayer::new(source())
        .origin(format!("https://api.example.com:{port}").as_str())
        .unwrap()
        .layer(
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build::<_, tower_client_auth::ReplayBody<Full<Bytes>>>(connector),
        );
    refused(replaying.oneshot(upper_case_https()).await.map(drop));

    // (b) `wss://` under `any_https_origin`.
    let any = AuthLayer::new(source())
        .any_https_origin()
        .without_replay()
        .layer(client());
    refused(
        any.oneshot(
            Request::get(format!("wss://api.example.com:{port}/v1/stream"))
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .map(drop),
    );

    let seen = seen.lock().unwrap().clone();
    let leaked: Vec<_> = seen.iter().filter(|(_, auth)| auth.is_some()).collect();
    assert!(
        leaked.is_empty(),
        "the credential went in plain text to a non-loopback host (by Host): {leaked:?}"
    );
}

/// `.origin()` (review 113: refuses an origin no request could carry the credential to)
/// still takes every loopback form a user writes for a local API.
#[test]
fn origin_takes_every_loopback_form() {
    use tower_client_auth::StaticCredential;
    for origin in [
        "http://[::1]:8080",
        "http://localhost",
        "HTTP://127.0.0.1:1",
        "http://[::ffff:7f00:1]",
        "http://127.0.0.2:9",
        "ws://localhost:1",
        "https://example.com",
        "HTTPS://example.com",
    ] {
        let layer = AuthLayer::new(StaticCredential::bearer("t").unwrap()).origin(origin);
        assert!(layer.is_ok(), "{origin} refused: {:?}", layer.err());
    }
    for origin in [
        "http://example.com",
        "ftp://localhost:21",
        "ws://example.com",
    ] {
        let layer = AuthLayer::new(StaticCredential::bearer("t").unwrap()).origin(origin);
        assert!(layer.is_err(), "{origin} taken");
    }
}
