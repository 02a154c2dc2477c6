//! A canary secret never shows: not in `Debug` or `Display` of any public type, not in
//! any error, not in tracing output at TRACE level, not in the request headers' `Debug`.
#![cfg(feature = "https")]

mod support;

use support::scrub::{assert_scrubbed, oauth_error, refused_with, shown_secret};

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use support::{FakeApi, capture_traces, get, post};
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, BoxError, Credential, CredentialCache, ErrorKind, FetchContext, MemoryStore,
    ReplayBody, RotatingCredential, Secret, SharedCredentialSource, StaticCredential, source_fn,
    token::{TokenRequest, TokenSource},
};

const CANARY: &str = "CANARY-5ecr3t-d0-not-print";

/// Tracing caches, call site by call site, whether anyone listens, as the first thread
/// reaches it: a token flow on another test's thread (no subscriber there) could make a
/// call site silent for the test that captures the logs. Those tests run alone.
static LOGS: std::sync::LazyLock<tokio::sync::RwLock<()>> =
    std::sync::LazyLock::new(Default::default);

fn assert_clean(what: &str, text: &str) {
    assert!(!text.contains(CANARY), "{what} leaked the canary: {text}");
}

type TokenClientStack = tower_client_auth::AddCredential<
    hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        ReplayBody<Full<Bytes>>,
    >,
    tower_client_auth::token::TokenSource,
>;

/// GET `url` through `svc`; the status.
async fn status(svc: &TokenClientStack, url: String) -> u16 {
    let req = Request::get(url).body(Full::<Bytes>::default()).unwrap();
    svc.clone().oneshot(req).await.unwrap().status().as_u16()
}

/// Every public type built around the canary prints without it, in both `Debug` forms.
#[tokio::test]
async fn debug_and_display_are_redacted() {
    let _beside = LOGS.read().await;
    let credential = Credential::bearer(CANARY).unwrap();
    let store = MemoryStore::new();
    let cache = CredentialCache::builder(StaticCredential::bearer(CANARY).unwrap())
        .store(store.clone())
        .build()
        .unwrap();
    cache.credential().await.unwrap();
    let layer = AuthLayer::with_cache(cache.clone()).any_https_origin();
    let svc = layer
        .clone()
        .layer(FakeApi::new(|_, _| StatusCode::OK).service());
    let rotating = RotatingCredential::new(credential.clone());
    let url_with_canary = format!("https://client:{CANARY}@idp.test/oauth/token?key={CANARY}");
    let mut printed = vec![
        format!("{credential:?} {credential:#?}"),
        format!("{:?}", Credential::with_scheme("Secret", CANARY).unwrap()),
        format!("{:?}", Credential::cookie("sid", CANARY).unwrap()),
        format!("{:?}", Credential::header("x-api-key", CANARY).unwrap()),
        format!(
            "{:?}",
            Credential::bearer("t").unwrap().with_refresh_token(CANARY)
        ),
        format!(
            "{:?} {:?}",
            StaticCredential::bearer(CANARY).unwrap(),
            StaticCredential::cookie("s", CANARY).unwrap()
        ),
        format!("{rotating:?}"),
        format!("{cache:?} {:?}", cache.handle()),
        format!("{store:?}"),
        format!("{layer:?}"),
        format!("{:?}", svc.cache()),
        format!(
            "{:?}",
            layer
                .clone()
                .layer(tower::service_fn(|_: Request<()>| async {
                    Ok::<_, BoxError>(Response::new(()))
                }))
        ),
        format!(
            "{:?} {:?} {:?}",
            CredentialCache::builder(StaticCredential::bearer(CANARY).unwrap()),
            AuthLayer::builder(StaticCredential::bearer(CANARY).unwrap()).any_https_origin(),
            SharedCredentialSource::new(StaticCredential::bearer(CANARY).unwrap()),
        ),
        format!("{:?}", Secret::new(CANARY)),
        format!(
            "{:?}",
            TokenSource::client_credentials(&url_with_canary, "client", CANARY)
                .unwrap()
                .refresh_token(CANARY)
        ),
        format!("{:?}", context_after_rejecting_the_canary().await),
        // A token url may carry a secret in its userinfo or its query.
        format!("{:?}", TokenRequest::form(&url_with_canary).unwrap()),
        format!(
            "{:?}",
            TokenSource::new(TokenRequest::json(&url_with_canary).unwrap())
                .refresh_with(TokenRequest::form(&url_with_canary).unwrap(), "rt")
        ),
        format!(
            "{:?}",
            tower_client_auth::clock::ManualClock::new(std::time::SystemTime::now())
        ),
        direct_mode_readied_with_the_canary().await,
    ];
    #[cfg(feature = "reqwest")]
    printed.push(format!(
        "{:?}",
        tower_client_auth::reqwest::AuthMiddleware::new(StaticCredential::bearer(CANARY).unwrap())
            .origin("https://api.example.com")
            .unwrap()
    ));
    #[cfg(feature = "tower-http")]
    printed.push(format!(
        "{:?}",
        tower_client_auth::redirect::SameOriginCredentials::new()
    ));
    for (i, text) in printed.iter().enumerate() {
        assert_clean(&format!("printed value {i}"), text);
    }
    assert!(printed[0].contains("[redacted]"));
}

/// The layer without replay, its service holding the canary readied, and its future.
async fn direct_mode_readied_with_the_canary() -> String {
    use tower::{Service, ServiceExt};
    let layer = AuthLayer::new(source_fn(|_| async {
        Ok::<_, BoxError>(Credential::bearer(CANARY)?)
    }))
    .any_https_origin()
    .without_replay();
    let mut svc = layer.layer(tower::service_fn(|_: Request<()>| async {
        Ok::<_, BoxError>(Response::new(()))
    }));
    svc.ready().await.unwrap();
    let readied = format!("{layer:?} {svc:?}");
    let future = svc.call(Request::get("https://api.example.com").body(()).unwrap());
    format!("{readied} {future:?}")
}

/// The `FetchContext` a source sees after the canary credential was rejected.
async fn context_after_rejecting_the_canary() -> FetchContext {
    let seen = Arc::new(Mutex::new(None));
    let cache = CredentialCache::new(source_fn({
        let seen = seen.clone();
        move |cx: FetchContext| {
            *seen.lock().unwrap() = Some(cx);
            async { Ok::<_, BoxError>(Credential::bearer(CANARY)?) }
        }
    }));
    let first = cache.credential().await.unwrap();
    cache.reject(&first).await.unwrap();
    let cx = seen.lock().unwrap().take().unwrap();
    assert!(cx.previous().is_some());
    cx
}

/// Every error the crate produces around a canary credential prints without it.
#[tokio::test]
async fn errors_never_carry_the_secret() {
    let _beside = LOGS.read().await;
    let errors: Vec<String> = [
        Credential::bearer(format!("{CANARY}\n"))
            .unwrap_err()
            .to_string(),
        format!(
            "{:?}",
            Credential::cookie("sid", format!("{CANARY};x")).unwrap_err()
        ),
        format!("{:?}", Credential::with_scheme(CANARY, " ").unwrap_err()),
    ]
    .into_iter()
    .collect();
    for e in &errors {
        assert_clean("credential error", e);
    }

    let err = StaticCredential::bearer(format!("{CANARY}\nbad")).unwrap_err();
    assert_clean(
        "invalid static credential",
        &format!("{err} {err:?} {:?}", std::error::Error::source(&err)),
    );

    let svc = AuthLayer::new(StaticCredential::bearer(CANARY).unwrap())
        .any_https_origin()
        .layer(FakeApi::new(|_, _| StatusCode::OK).service());
    let req = Request::get(format!("http://api.example.com/?token={CANARY}"))
        .body(Full::<Bytes>::default())
        .unwrap();
    let err = svc.oneshot(req).await.unwrap_err();
    let typed = err.downcast_ref::<tower_client_auth::Error>().unwrap();
    assert_eq!(typed.kind(), ErrorKind::InsecureTransport);
    assert_clean("insecure transport error", &format!("{err} {err:?}"));
}

/// Full flows at TRACE level (fetch, use, 401, refresh, replay, failures, backoff,
/// rotation) leave no canary in the captured tracing output.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn tracing_output_never_carries_the_secret() {
    let _alone = LOGS.write().await;
    let (capture, _guard) = capture_traces();

    let calls = Arc::new(Mutex::new(0u32));
    let source =
        {
            let calls = calls.clone();
            source_fn(move |_cx: FetchContext| {
                let n = {
                    let mut c = calls.lock().unwrap();
                    *c += 1;
                    *c
                };
                async move {
                    if n == 3 {
                        return Err::<Credential, BoxError>("token endpoint answered 503".into());
                    }
                    Ok(Credential::bearer(format!("{CANARY}-{n}"))?
                        .expires_in(Duration::from_secs(60)))
                }
            })
        };
    let api = FakeApi::new(|_, token| match token {
        Some(t) if t.ends_with("-1") => StatusCode::UNAUTHORIZED,
        _ => StatusCode::OK,
    });
    let inspect = tower::service_fn({
        let api = api.service();
        move |req: Request<ReplayBody<Full<Bytes>>>| {
            // What a careless inner layer might log: the headers' Debug.
            tracing::trace!(headers = ?req.headers(), "inner service got a request");
            api.clone().oneshot(req)
        }
    });
    let svc = AuthLayer::new(source).any_https_origin().layer(inspect);
    let res: Response<String> = svc.clone().oneshot(post("/v1/pay", b"{}")).await.unwrap();
    assert_eq!(res.status(), 200);
    tokio::time::sleep(Duration::from_secs(59)).await; // hard window: refresh fails
    let _ = svc.clone().oneshot(get("/")).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let _ = svc.clone().oneshot(get("/")).await;

    let pat = RotatingCredential::new(Credential::bearer(CANARY).unwrap());
    let rotating = AuthLayer::new(pat.clone())
        .any_https_origin()
        .layer(api.service());
    rotating.clone().oneshot(get("/")).await.unwrap();
    pat.rotate(Credential::bearer(format!("{CANARY}-rotated")).unwrap())
        .unwrap();
    rotating.oneshot(get("/")).await.unwrap();

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("credential refreshed"),
        "tracing was captured: {logs}"
    );
    assert!(logs.contains("credential refresh failed"), "{logs}");
    assert!(logs.contains("replaying request"), "{logs}");
    assert_clean("tracing output", &logs);
}

/// World: the token flows with canary secrets everywhere a user puts one (session key
/// secret, API key, client secret), real loopback providers, TRACE-level tracing and a
/// panic hook both captured, plus a token endpoint that echoes the client secret in its
/// `error_description`. Proves: no log line, error (`Display` or `Debug`), stats output or
/// panic message carries a canary; the echoed secret is scrubbed.
#[tokio::test(flavor = "current_thread")]
async fn token_flows_never_leak_the_secret() {
    let _alone = LOGS.write().await;
    use support::providers::*;
    use tower_client_auth::token::{TokenClient, TokenSource};

    let (capture, _guard) = capture_traces();
    let panics = Arc::new(Mutex::new(Vec::<String>::new()));
    let previous_hook = std::panic::take_hook();
    {
        let panics = panics.clone();
        std::panic::set_hook(Box::new(move |info| {
            panics.lock().unwrap().push(info.to_string())
        }));
    }

    let client = || {
        TokenClient::hyper_rustls()
            .unwrap()
            .allow_http_loopback(true)
    };
    let request = tower_client_auth::token::TokenRequest::oauth2_password(
        "https://idp.test/t",
        "id",
        CANARY,
        "me",
        CANARY,
    )
    .unwrap()
    .secret_field("api_key", CANARY);
    let api_client = support::api_client;
    let mut printed = vec![
        format!("{request:?}"),
        format!("{:?}", tower_client_auth::Secret::from(CANARY)),
        format!("{:?}", client()),
    ];

    // Style A with a canary secret; the session expires mid-run.
    let a = SessionApi::new("key", CANARY, Duration::from_secs(3600));
    let base = start(a.clone()).await;
    let source = TokenSource::session_login(&format!("{base}/v1/sessions"), "key", CANARY)
        .unwrap()
        .client(client());
    printed.push(format!("{source:?}"));
    let svc = AuthLayer::new(source)
        .any_https_origin()
        .allow_http_loopback(true)
        .layer(api_client());
    assert_eq!(status(&svc, format!("{base}/v1/x")).await, 200);
    a.revoke_all();
    assert_eq!(status(&svc, format!("{base}/v1/x")).await, 200);
    printed.push(format!(
        "{:?} {:?}",
        svc.cache(),
        svc.cache().source().stats()
    ));

    // Style C with a canary API key: login, expiry, rotation.
    let c = RotatingApi::new(CANARY);
    let base = start(c.clone()).await;
    let source = TokenSource::api_key_login(
        &format!("{base}/v3/auth/login"),
        &format!("{base}/v3/auth/refresh"),
        CANARY,
    )
    .unwrap()
    .client(client())
    .on_refresh(|pair| async move { tracing::info!(?pair, "persisting pair") });
    let svc = AuthLayer::new(source)
        .any_https_origin()
        .allow_http_loopback(true)
        .layer(api_client());
    assert_eq!(status(&svc, format!("{base}/v3/a")).await, 200);
    c.expire_sessions();
    assert_eq!(status(&svc, format!("{base}/v3/a")).await, 200);

    // Style D with a wrong canary secret, against an endpoint that echoes it back.
    let addr = support::serve(|_req| async {
        let body = format!(
            r#"{{"error":"invalid_client","error_description":"client secret {CANARY} is wrong"}}"#
        );
        Response::builder()
            .status(401)
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    })
    .await;
    let source = TokenSource::client_credentials(&format!("http://{addr}/token"), "id", CANARY)
        .unwrap()
        .client(client());
    let svc = AuthLayer::new(source)
        .any_https_origin()
        .allow_http_loopback(true)
        .layer(api_client());
    let err = svc
        .oneshot(
            Request::get(format!("http://{addr}/api"))
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap_err();
    let token_err = err
        .downcast_ref::<tower_client_auth::Error>()
        .and_then(|e| e.token_error())
        .unwrap();
    assert_eq!(
        token_err.description(),
        Some("client secret [redacted] is wrong")
    );
    printed.push(format!("{err} {err:?} {token_err} {token_err:?}"));

    std::panic::set_hook(previous_hook);
    for (i, text) in printed.iter().enumerate() {
        assert_clean(&format!("printed value {i}"), text);
    }
    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("logging in") && logs.contains("refreshing with the held refresh token"),
        "{logs}"
    );
    assert!(logs.contains("persisting pair"), "{logs}");
    assert_clean("tracing output", &logs);
    let panics = panics.lock().unwrap();
    assert!(panics.is_empty(), "panicked: {panics:?}");
}

/// World: a token endpoint answers 401 with a JSON body that is not an OAuth error and
/// echoes the client secret, written by the JSON encoders of PHP (`\/`, `\u00e9`),
/// Python (`\u00e9`), Go (`\u0026`) and .NET (`\u002B`, `\u0026`, `\u00E9`), each
/// escaping what serde_json does not. Proves: no part of the secret reaches the error's
/// `body_start`, `Display` or `Debug`.
#[tokio::test(flavor = "current_thread")]
async fn a_secret_echoed_by_any_json_encoder_is_scrubbed() {
    let _beside = LOGS.read().await;
    const SECRET: &str = "CANARY/5ecr3t+&\u{e9}-d0-not-print";
    type Encoder = fn(&str) -> String;
    let encoders: [(&str, Encoder); 4] = [
        ("php", |s| {
            s.replace('/', "\\/").replace('\u{e9}', "\\u00e9")
        }),
        ("python", |s| s.replace('\u{e9}', "\\u00e9")),
        ("go", |s| s.replace('&', "\\u0026")),
        ("dotnet", |s| {
            s.replace('+', "\\u002B")
                .replace('&', "\\u0026")
                .replace('\u{e9}', "\\u00E9")
        }),
    ];
    for (encoder, encode) in encoders {
        let echoed = encode(SECRET);
        let body = format!(r#"{{"message":"client secret {echoed} is wrong"}}"#);
        let err = refused_with(body, SECRET).await;
        let shown = format!("{err} {err:?}");
        let start = err.token_error().expect("a token error").body_start();
        let start = start.unwrap_or_default().to_owned();
        assert!(start.contains("[redacted]"), "{encoder}: {start}");
        for part in ["CANARY", "5ecr3t", "d0-not-print"] {
            assert!(!start.contains(part), "{encoder}: body_start: {start}");
            assert!(!shown.contains(part), "{encoder}: the error: {shown}");
        }
    }
}

/// World: a token endpoint answers 401. (1) An OAuth error whose `error_description`,
/// correctly JSON-encoded, quotes the client secret (the secret holds `\/`, which the
/// decoded description carries raw); (2) a non-OAuth body that passes an upstream's
/// JSON error through as a string (JSON in a JSON string, both written by PHP, which
/// escapes `/`); (3) a non-JSON body with a stray `"` before a PHP-escaped echo.
/// Proves: no part of the secret reaches the error's `description`, `body_start`,
/// `Display` or `Debug`.
#[tokio::test(flavor = "current_thread")]
async fn a_secret_quoted_raw_or_nested_in_json_is_scrubbed() {
    let _beside = LOGS.read().await;
    const RAW: &str = r"CANARY\/5ecr3t-d0-not-print";
    const SLASH: &str = "CANARY/5ecr3t-d0-not-print";
    let cases: [(&str, &str, String); 3] = [
        (
            "quoted raw in error_description",
            RAW,
            serde_json::json!({
                "error": "invalid_client",
                "error_description": format!("client secret \"{RAW}\" is wrong"),
            })
            .to_string(),
        ),
        (
            "nested JSON, PHP-escaped",
            SLASH,
            r#"{"upstream":"{\"client_secret\":\"CANARY\\\/5ecr3t-d0-not-print\"}"}"#.to_owned(),
        ),
        (
            "a stray quote before a PHP-escaped echo",
            SLASH,
            r#"upstream said 5" then {"message":"client secret CANARY\/5ecr3t-d0-not-print is wrong"}"#
                .to_owned(),
        ),
    ];
    let mut leaks = Vec::new();
    for (case, secret, body) in cases {
        let err = refused_with(body, secret).await;
        if let Some(shown) = shown_secret(&err) {
            leaks.push(format!("{case}: {shown}"));
        }
    }
    assert!(leaks.is_empty(), "leaked:\n{}", leaks.join("\n"));
}

/// World: a base64 client secret (`=` padding) echoed by Gson, Java's default JSON
/// encoder, which escapes `=` as `\u003d`: (1) after a stray quote (the literals pair
/// wrongly); (2) in a JSON body whose description also holds a lone surrogate escape
/// (`\ud83d`, a message cut mid-emoji), which serde_json refuses. Proves: no part of the
/// secret reaches the error's `description`, `body_start`, `Display` or `Debug`.
#[tokio::test(flavor = "current_thread")]
async fn a_gson_escaped_secret_is_scrubbed_when_its_literal_is_not_decoded() {
    let _beside = LOGS.read().await;
    const SECRET: &str = "CANARY-5ecr3t-d0-not-print==";
    let cases: [(&str, String); 2] = [
        (
            "stray quote before a Gson echo",
            r#"upstream said 5" then {"message":"client secret CANARY-5ecr3t-d0-not-print\u003d\u003d is wrong"}"#
                .to_owned(),
        ),
        (
            "lone surrogate in the literal",
            r#"{"error":"invalid_client","error_description":"client secret CANARY-5ecr3t-d0-not-print\u003d\u003d is wrong \ud83d"}"#
                .to_owned(),
        ),
    ];
    let mut leaks = Vec::new();
    for (case, body) in cases {
        let err = refused_with(body, SECRET).await;
        if let Some(shown) = shown_secret(&err) {
            leaks.push(format!("{case}: {shown}"));
        }
    }
    assert!(leaks.is_empty(), "leaked:\n{}", leaks.join("\n"));
}

/// World: a token endpoint's body quotes an upstream's JSON-escaped text inside its own
/// JSON string (the secret's escapes escaped again), after a stray quote that pairs the
/// literals wrongly. Proves: no part of the secret reaches the error.
#[tokio::test]
async fn a_doubly_escaped_secret_after_a_stray_quote_is_scrubbed() {
    let _beside = LOGS.read().await;
    const SECRET: &str = "CANARY-5ecr3t-d0-not-print==";
    let body = r#"upstream said 5" then {"message":"upstream said \\u0043ANARY-5ecr3t-d0-not-print\\u003d\\u003d is wrong"}"#.to_owned();
    let err = refused_with(body, SECRET).await;
    if let Some(shown) = shown_secret(&err) {
        panic!("leaked: {shown}");
    }
}

/// World: a token endpoint echoes the client secret through an encoding other than JSON
/// or the request's own form encoding: HTML-escaped in `error_description` (Spring
/// Security OAuth's serializer runs `HtmlUtils.htmlEscape` on it), HTML numeric
/// references (ASP.NET Core's `HtmlEncoder`), percent-encoded by another encoder than
/// the form's (Python's `quote` keeps `/`, Go's `QueryEscape` keeps `~`, JavaScript's
/// `encodeURIComponent` keeps `!`, PHP's `urlencode` writes `*` as `%2A`), UTF-8 read
/// as Latin-1 (a servlet without a character encoding filter), or cut by the server
/// mid-secret. Proves (review findings): no part of the secret reaches the error.
#[tokio::test(flavor = "current_thread")]
async fn a_secret_echoed_through_other_encodings_is_scrubbed() {
    let _beside = LOGS.read().await;
    let cases: Vec<(&str, &str, String)> = vec![
        (
            "HTML-escaped (&amp;) in error_description",
            "CANARY&5ecr3t&d0-not-print",
            oauth_error("Invalid client secret: CANARY&amp;5ecr3t&amp;d0-not-print"),
        ),
        (
            "HTML numeric reference (&#39;)",
            "CANARY'5ecr3t'd0-not-print",
            oauth_error("Invalid client secret: CANARY&#39;5ecr3t&#39;d0-not-print"),
        ),
        (
            "ASP.NET Core HtmlEncoder (&#x2B;) in an HTML body",
            "CANARY+5ecr3t+d0-not-print",
            "<p>Bad secret CANARY&#x2B;5ecr3t&#x2B;d0-not-print</p>".to_owned(),
        ),
        (
            "Python urllib.parse.quote",
            "CANARY/5ecr3t+d0-not-print",
            oauth_error("client_secret=CANARY/5ecr3t%2Bd0-not-print is not valid"),
        ),
        (
            "Go url.QueryEscape",
            "CANARY~5ecr3t+d0-not-print",
            oauth_error("client_secret=CANARY~5ecr3t%2Bd0-not-print is not valid"),
        ),
        (
            "JavaScript encodeURIComponent",
            "CANARY!5ecr3t+d0-not-print",
            oauth_error("client_secret=CANARY!5ecr3t%2Bd0-not-print is not valid"),
        ),
        (
            "PHP urlencode",
            "CANARY*5ecr3t+d0-not-print",
            oauth_error("client_secret=CANARY%2A5ecr3t%2Bd0-not-print is not valid"),
        ),
        (
            "HTML-escaped and then percent-encoded",
            "CANARY&5ecr3t+d0-not-print",
            oauth_error("secret=CANARY%26amp%3B5ecr3t%2Bd0-not-print"),
        ),
        (
            "UTF-8 read as Latin-1",
            "CANARY-5ecr3t-d0-not-print-\u{e9}",
            oauth_error("Invalid client secret: CANARY-5ecr3t-d0-not-print-\u{c3}\u{a9}"),
        ),
        (
            "cut by the server",
            "CANARY-5ecr3t-d0-not-print-XYZ",
            oauth_error("Invalid client secret: CANARY-5ecr3t-d0-not-pr"),
        ),
        (
            "cut by the server, with an ellipsis, in a plain body",
            "CANARY-5ecr3t-d0-not-print-XYZ",
            "bad secret CANARY-5ecr3t-d0-not...".to_owned(),
        ),
    ];
    assert_scrubbed(cases).await;
}

/// World: echoes that a decoding shows only in part or not at all, each as a real
/// server writes it: a message cut inside an HTML reference or a percent escape (an
/// escaper, then a cut), cut inside a UTF-8 character (Go's `msg[:n]`, then
/// `encoding/json` writes U+FFFD), UTF-8 misread as Windows-1252, a space as `+` with
/// `~` kept (Python's `urlencode`, Go's `QueryEscape`), and two echoes of a secret
/// holding `%41` (a link percent-encoded, a form value HTML-escaped), where
/// percent-decoding the first garbles the second. Proves (review findings: each
/// leaked): no part of the secret reaches the error.
#[tokio::test(flavor = "current_thread")]
async fn echoes_a_decoding_shows_in_part_are_scrubbed() {
    let _beside = LOGS.read().await;
    let cases: Vec<(&str, &str, String)> = vec![
        (
            "HTML-escaped, cut inside a reference",
            "CANARY&5ecr3t&d0-not-print",
            oauth_error("Invalid client secret: CANARY&amp;5ecr3t&am"),
        ),
        (
            "percent-encoded, cut inside an escape",
            "CANARY/5ecr3t+d0-not-print",
            oauth_error("client_secret=CANARY/5ecr3t%2"),
        ),
        (
            "cut inside a UTF-8 character",
            "CANARY-5ecr3t-d0-not-pr\u{e9}nt",
            r#"{"error":"invalid_client","error_description":"bad secret CANARY-5ecr3t-d0-not-pr\ufffd"}"#
                .to_owned(),
        ),
        (
            "UTF-8 misread as Windows-1252",
            "CANARY-stra\u{df}e-5ecr3t-d0-not-print",
            oauth_error("bad secret CANARY-stra\u{c3}\u{178}e-5ecr3t-d0-not-print"),
        ),
        (
            "a space as +, ~ kept",
            "CANARY 5ecr3t~d0-not-print",
            oauth_error("client_secret=CANARY+5ecr3t~d0-not-print is not valid"),
        ),
        (
            "two echoes, one garbled by the other's decoding",
            "CANARY*5ecr3t%41d0&not-print",
            "<a href=\"/login?secret=CANARY%2A5ecr3t%2541d0%26not-print\">retry</a> \
             <input value=\"CANARY*5ecr3t%41d0&amp;not-print\">"
                .to_owned(),
        ),
    ];
    assert_scrubbed(cases).await;
}

/// World: a servlet that read the UTF-8 form right but answers in its default charset,
/// ISO-8859-1: `é` comes back as the byte E9 (not UTF-8), `€` as `?`. Proves (review
/// finding): no part of the secret reaches the error.
#[tokio::test(flavor = "current_thread")]
async fn a_secret_in_an_iso_8859_1_answer_is_scrubbed() {
    let _beside = LOGS.read().await;
    for (secret, echoed) in [
        (
            "CANARY-5ecr3t-d0-not-pr\u{e9}nt",
            &b"CANARY-5ecr3t-d0-not-pr\xe9nt"[..],
        ),
        (
            "CANARY-5ecr3t-\u{20ac}-d0-not-print",
            &b"CANARY-5ecr3t-?-d0-not-print"[..],
        ),
    ] {
        let mut body = br#"{"error":"invalid_client","error_description":"bad secret "#.to_vec();
        body.extend_from_slice(echoed);
        body.extend_from_slice(br#""}"#);
        let addr = support::serve(move |_req| {
            let body = body.clone();
            async move {
                Response::builder()
                    .status(401)
                    .header("content-type", "application/json;charset=ISO-8859-1")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap()
            }
        })
        .await;
        let source = TokenSource::client_credentials(&format!("http://{addr}/token"), "id", secret)
            .unwrap()
            .client(support::token_client());
        let err = CredentialCache::new(source).credential().await.unwrap_err();
        assert_eq!(shown_secret(&err), None, "{secret}");
    }
}

/// World: a 401 with an HTML body. Proves (review finding on a version that escaped
/// quotes: the crate error's `Display`, which escapes the token error's text again,
/// showed `\"` for each): the body shows in quotes as it came.
#[tokio::test(flavor = "current_thread")]
async fn a_body_shows_in_plain_quotes() {
    let _beside = LOGS.read().await;
    let err = refused_with("<html>down</html>".to_owned(), "CANARY-5ecr3t-d0-not-print").await;
    let shown = err.to_string();
    assert!(shown.contains(r#"(body: "<html>down</html>")"#), "{shown}");
}

/// World: echoes that review found leaking past the decoders: backslash escapes that
/// are not JSON (Ruby's `inspect` writes `\#$`, Python's `repr` `\'`, both `\xC3\xA9`
/// for bytes), HTML named references beyond ASCII punctuation (Spring's `htmlEscape`
/// writes `&eacute;`, `&euro;`; PHP's `ENT_HTML5` `&lcub;`, `&vert;`, `&Hat;`), a masked
/// echo, an echo elided in the middle (pydantic's `input_value='...'`), and a secret
/// made ASCII by dropping or replacing the rest. Proves: no part of the secret reaches
/// the error.
#[tokio::test(flavor = "current_thread")]
async fn echoes_in_other_languages_escapes_are_scrubbed() {
    let _beside = LOGS.read().await;
    let cases: Vec<(&str, &str, String)> = vec![
        (
            "Ruby inspect, \\#$",
            "CANARY-5ecr3t#$d0-not-print",
            oauth_error(r#"Invalid client secret "CANARY-5ecr3t\#$d0-not-print""#),
        ),
        (
            "Python repr, \\'",
            "CANARY-5ecr3t'x\"d0-not-print",
            oauth_error(r#"Invalid client secret 'CANARY-5ecr3t\'x"d0-not-print'"#),
        ),
        (
            "Ruby inspect of bytes, \\xC3\\xA9",
            "CANARY-5ecr3t-\u{e9}-d0-not-print",
            oauth_error(r#"Invalid client secret "CANARY-5ecr3t-\xC3\xA9-d0-not-print""#),
        ),
        (
            "Spring htmlEscape, &eacute;",
            "CANARY-5ecr3t-\u{e9}-d0-not-print",
            oauth_error("Invalid client secret: CANARY-5ecr3t-&eacute;-d0-not-print"),
        ),
        (
            "Spring htmlEscape, &euro;",
            "CANARY-5ecr3t-\u{20ac}-d0-not-print",
            oauth_error("Invalid client secret: CANARY-5ecr3t-&euro;-d0-not-print"),
        ),
        (
            "PHP ENT_HTML5, &lcub;&vert;&rcub;",
            "CANARY-5ecr3t{|}d0-not-print",
            "<p>Invalid client secret: CANARY-5ecr3t&lcub;&vert;&rcub;d0-not-print</p>".to_owned(),
        ),
        (
            "PHP ENT_HTML5, &Hat;&lsqb;&rsqb;",
            "CANARY-5ecr3t^[]d0-not-print",
            "<p>Invalid client secret: CANARY-5ecr3t&Hat;&lsqb;&rsqb;d0-not-print</p>".to_owned(),
        ),
        (
            "masked",
            "CANARY-5ecr3t-d0-not-print",
            oauth_error("Invalid client secret CANARY-5ecr3t-d0****"),
        ),
        (
            "elided in the middle",
            "CANARY-5ecr3t-0123456789abcdefghijklmnopqrstuvwxyz-d0-not-print",
            oauth_error(
                "client_secret: String should have at most 40 characters [input_value=\
                 'CANARY-5ecr3t-0123456789...qrstuvwxyz-d0-not-print', input_type=str]",
            ),
        ),
        (
            "non-ASCII dropped",
            "CANARY-5ecr3t-\u{e9}\u{20ac}-d0-not-print",
            oauth_error("bad secret CANARY-5ecr3t--d0-not-print"),
        ),
        (
            "non-ASCII as ?",
            "CANARY-5ecr3t-\u{e9}\u{20ac}-d0-not-print",
            oauth_error("bad secret CANARY-5ecr3t-??-d0-not-print"),
        ),
    ];
    assert_scrubbed(cases).await;
}

/// World: a servlet on a Windows-1252 JVM misreads the UTF-8 form (Java reads the
/// undefined bytes 0x81, 0x8D, 0x8F, 0x90, 0x9D as U+FFFD: `Á` comes back `Ã\u{fffd}`);
/// another answers in Windows-1252 (`€` as the byte 0x80, not UTF-8). Proves (review
/// findings): no part of the secret reaches the error.
#[tokio::test(flavor = "current_thread")]
async fn a_secret_through_windows_1252_is_scrubbed() {
    let _beside = LOGS.read().await;
    assert_scrubbed(vec![
        (
            "\u{c1} misread by Java's Cp1252",
            "CANARY-5ecr3t-\u{c1}-d0-not-print",
            oauth_error("bad secret CANARY-5ecr3t-\u{c3}\u{fffd}-d0-not-print"),
        ),
        (
            "\u{10d} misread by Java's Cp1252",
            "CANARY-5ecr3t-\u{10d}-d0-not-print",
            oauth_error("bad secret CANARY-5ecr3t-\u{c4}\u{fffd}-d0-not-print"),
        ),
    ])
    .await;
    let body = [
        &br#"{"error":"invalid_client","error_description":"bad secret CANARY-5ecr3t-"#[..],
        b"\x80",
        br#"-d0-not-print"}"#,
    ]
    .concat();
    let addr = support::serve(move |_req| {
        let body = body.clone();
        async move {
            Response::builder()
                .status(401)
                .header("content-type", "application/json;charset=windows-1252")
                .body(Full::new(Bytes::from(body)))
                .unwrap()
        }
    })
    .await;
    let secret = "CANARY-5ecr3t-\u{20ac}-d0-not-print";
    let source = TokenSource::client_credentials(&format!("http://{addr}/token"), "id", secret)
        .unwrap()
        .client(support::token_client());
    let err = CredentialCache::new(source).credential().await.unwrap_err();
    assert_eq!(shown_secret(&err), None);
}
