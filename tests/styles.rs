//! The five authentication styles (README, "The five authentication styles"), each end
//! to end: a real loopback server that behaves as described there, a `TokenSource` (or
//! static source) in a few lines, `AuthLayer` over a hyper-util client.
#![cfg(feature = "https")]

use crate::support;

use std::{
    sync::{Arc, Mutex, atomic::Ordering::SeqCst},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use support::{api_client, providers::*, token_client};
use tower::{Layer, Service, ServiceExt};
use tower_client_auth::{
    AuthLayer, BoxError, Credential, CredentialCache, CredentialSource, Error, ErrorKind,
    RotatingCredential, StaticCredential,
    token::{BodyEncoding, ClientAuth, TokenError, TokenErrorKind, TokenRequest, TokenSource},
};

type Client = tower_client_auth::AddCredential<
    hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        tower_client_auth::ReplayBody<Full<Bytes>>,
    >,
    TokenSource,
>;

fn layer<P: CredentialSource>(source: P) -> AuthLayer<P> {
    AuthLayer::new(source)
        .any_https_origin()
        .allow_http_loopback(true)
}

async fn get<S>(svc: &S, url: String) -> Result<StatusCode, BoxError>
where
    S: Service<
            Request<Full<Bytes>>,
            Response = http::Response<hyper::body::Incoming>,
            Error = BoxError,
        > + Clone,
{
    let res = svc
        .clone()
        .oneshot(Request::get(url).body(Full::default()).unwrap())
        .await?;
    let status = res.status();
    res.into_body().collect().await?;
    Ok(status)
}

/// Sends `n` concurrent GETs to `url`; every one must end 200.
async fn all_ok(svc: &Client, url: &str, n: usize) {
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let (svc, url) = (svc.clone(), url.to_owned());
            tokio::spawn(async move { get(&svc, url).await.unwrap() })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), 200);
    }
}

/// The token error at the bottom of a request error.
fn token_error(err: &BoxError) -> &TokenError {
    let ours = err.downcast_ref::<Error>().expect("a crate error");
    assert_eq!(ours.kind(), ErrorKind::Fetch);
    ours.get_ref()
        .and_then(|s| s.downcast_ref::<TokenError>())
        .expect("a token error as the source")
}

// --- Style A ---------------------------------------------------------------------------

/// World: a session API whose JWTs live 1.5 s (the real one: 1 h). Ten calls over 3 s of
/// real time. Proves: one login per token lifetime, each token replaced before its `exp`
/// (the API never answers 401), and the lifetime read from the JWT.
#[tokio::test]
async fn style_a_session_login_honours_jwt_exp() {
    let api = SessionApi::new("key-1", "secret-1", Duration::from_millis(1500));
    let base = start(api.clone()).await;
    let source = TokenSource::session_login(&format!("{base}/v1/sessions"), "key-1", "secret-1")
        .unwrap()
        .client(token_client());
    let svc = layer(source).layer(api_client());

    for _ in 0..5 {
        assert_eq!(get(&svc, format!("{base}/v1/consents")).await.unwrap(), 200);
    }
    assert_eq!(api.logins.load(SeqCst), 1, "cached and reused");
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(get(&svc, format!("{base}/v1/consents")).await.unwrap(), 200);
    }
    assert_eq!(
        api.unauthorized.load(SeqCst),
        0,
        "never sent an expired token"
    );
    let logins = api.logins.load(SeqCst);
    assert!(
        (2..=4).contains(&logins),
        "about one login per lifetime, got {logins}"
    );
}

/// A bad secret: the 400 from the session endpoint reaches the caller as a typed error,
/// and no API request is made without a credential.
#[tokio::test]
async fn style_a_bad_secret_is_a_typed_error() {
    let api = SessionApi::new("key-1", "secret-1", Duration::from_secs(3600));
    let base = start(api.clone()).await;
    let source =
        TokenSource::session_login(&format!("{base}/v1/sessions"), "key-1", "WRONG-secret")
            .unwrap()
            .client(token_client());
    let err = get(
        &layer(source).layer(api_client()),
        format!("{base}/v1/consents"),
    )
    .await
    .unwrap_err();
    let token = token_error(&err);
    assert_eq!(token.kind(), TokenErrorKind::Rejected);
    assert_eq!(token.status(), Some(StatusCode::BAD_REQUEST));
    assert!(!format!("{err} {err:?} {token}").contains("WRONG-secret"));
    assert_eq!(api.api_calls.load(SeqCst), 0);
}

/// Plain http to a non-loopback login URL is refused when the source is built, before
/// anything is sent; a loopback server answering 301 (as the provider does on http) is
/// not followed.
#[tokio::test]
async fn style_a_plain_http_refused_and_redirect_not_followed() {
    let err =
        TokenSource::session_login("http://sdk.example.invalid/v1/sessions", "k", "s").unwrap_err();
    assert_eq!(err.kind(), TokenErrorKind::InsecureTransport);

    let api = SessionApi::new("k", "s", Duration::from_secs(3600));
    api.redirect_to_https.store(true, SeqCst);
    let base = start(api.clone()).await;
    let source = TokenSource::session_login(&format!("{base}/v1/sessions"), "k", "s")
        .unwrap()
        .client(token_client());
    let err = CredentialCache::new(source).credential().await.unwrap_err();
    let token = err.get_ref().unwrap().downcast_ref::<TokenError>().unwrap();
    assert_eq!(token.kind(), TokenErrorKind::Redirect);
    assert_eq!(token.status(), Some(StatusCode::MOVED_PERMANENTLY));
}

// --- Style B ---------------------------------------------------------------------------

/// World: client credentials in a JSON body with an audience; the API expires the token
/// mid-run and answers 401 `Token expired.`. Proves: the token is reused while valid, the
/// 401 costs exactly one token request, and the replayed request succeeds.
#[tokio::test]
async fn style_b_json_audience_and_expired_token_mid_run() {
    let api = AudienceApi::new("b-client", "b-secret", "https://api.dataloy.test");
    let base = start(api.clone()).await;
    let source = TokenSource::new(
        TokenRequest::oauth2_client_credentials(
            &format!("{base}/oauth/token"),
            "b-client",
            "b-secret",
        )
        .unwrap()
        .client_auth(ClientAuth::Body)
        .encoding(BodyEncoding::Json)
        .field("audience", "https://api.dataloy.test"),
    )
    .client(token_client());
    let svc = layer(source).layer(api_client());
    for _ in 0..5 {
        assert_eq!(get(&svc, format!("{base}/api/vessels")).await.unwrap(), 200);
    }
    assert_eq!(api.token_requests.load(SeqCst), 1);

    api.expire_all();
    all_ok(&svc, &format!("{base}/api/vessels"), 20).await;
    assert_eq!(
        api.token_requests.load(SeqCst),
        2,
        "one refresh for the expired token"
    );
}

// --- Style C ---------------------------------------------------------------------------

fn style_c(base: &str, api_key: &str) -> TokenSource {
    TokenSource::api_key_login(
        &format!("{base}/v3/auth/login"),
        &format!("{base}/v3/auth/refresh"),
        api_key,
    )
    .unwrap()
    .client(token_client())
}

/// World: the session expires (every API call answers 401) while 200 requests are in
/// flight. Proves: exactly one refresh (not a login), rotation honoured, the server
/// never sees a refresh token twice, and no refresh is ever attempted early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn style_c_refresh_on_401_with_rotation_under_concurrency() {
    let api = RotatingApi::new("0b5a7c3e-uuid");
    let base = start(api.clone()).await;
    let svc = layer(style_c(&base, "0b5a7c3e-uuid")).layer(api_client());
    assert_eq!(get(&svc, format!("{base}/v3/accounts")).await.unwrap(), 200);

    for round in 1..=3 {
        api.expire_sessions();
        all_ok(&svc, &format!("{base}/v3/accounts"), 200).await;
        assert_eq!(api.refreshes.load(SeqCst), round, "one refresh per expiry");
    }
    assert_eq!(api.logins.load(SeqCst), 1, "never logged in again");
    assert_eq!(api.reused_refresh_tokens.load(SeqCst), 0);
    assert_eq!(api.early_refreshes.load(SeqCst), 0);
}

/// A revoked refresh token: the refresh is refused, the source logs in once, and the
/// request succeeds. The newest pair reaches the `on_refresh` hook before the request
/// completes.
#[tokio::test]
async fn style_c_revoked_refresh_token_falls_back_to_one_login() {
    let api = RotatingApi::new("key-c");
    let base = start(api.clone()).await;
    let persisted = Arc::new(Mutex::new(Vec::new()));
    let source = style_c(&base, "key-c").on_refresh({
        let persisted = persisted.clone();
        move |pair| {
            let persisted = persisted.clone();
            async move {
                let refresh = pair.refresh_token().unwrap().expose().to_owned();
                persisted.lock().unwrap().push(refresh);
            }
        }
    });
    let svc = layer(source).layer(api_client());
    assert_eq!(get(&svc, format!("{base}/v3/accounts")).await.unwrap(), 200);
    api.expire_sessions();
    assert_eq!(get(&svc, format!("{base}/v3/accounts")).await.unwrap(), 200);
    assert_eq!(
        (api.logins.load(SeqCst), api.refreshes.load(SeqCst)),
        (1, 1)
    );

    api.expire_sessions();
    api.revoke_refresh_tokens();
    assert_eq!(get(&svc, format!("{base}/v3/accounts")).await.unwrap(), 200);
    assert_eq!(api.logins.load(SeqCst), 2, "exactly one fallback login");
    assert_eq!(api.early_refreshes.load(SeqCst), 0);
    let stats = svc.cache().source().stats();
    assert_eq!(
        (stats.logins, stats.refreshes, stats.refresh_rejections),
        (2, 1, 1)
    );
    assert_eq!(
        *persisted.lock().unwrap(),
        ["c-refresh-1", "c-refresh-2", "c-refresh-3"]
    );
}

/// A refresh token saved by an earlier process resumes the session without a login. With
/// a credential store it is not used, even when the store holds none: another process of
/// the fleet may have rotated it already, and presenting a spent one would revoke the
/// family; the process logs in, and the pair it gets lands in the store.
#[tokio::test]
async fn style_c_saved_refresh_token_resumes_without_login() {
    use tower_client_auth::{CredentialStore as _, MemoryStore};
    for store in [None, Some(MemoryStore::new())] {
        let api = RotatingApi::new("key-c");
        let base = start(api.clone()).await;
        let first = layer(style_c(&base, "key-c")).layer(api_client());
        assert_eq!(
            get(&first, format!("{base}/v3/accounts")).await.unwrap(),
            200
        );
        api.expire_sessions();
        // A new process, seeded with the refresh token the first one persisted.
        let seeded = style_c(&base, "key-c").refresh_token("c-refresh-1");
        let mut builder = AuthLayer::builder(seeded)
            .any_https_origin()
            .allow_http_loopback(true);
        if let Some(store) = &store {
            builder = builder.store(store.clone());
        }
        let restarted = builder.build().unwrap().layer(api_client());
        assert_eq!(
            get(&restarted, format!("{base}/v3/accounts"))
                .await
                .unwrap(),
            200
        );
        let expected = if store.is_some() { (2, 0) } else { (1, 1) };
        assert_eq!(
            (api.logins.load(SeqCst), api.refreshes.load(SeqCst)),
            expected,
            "store: {}",
            store.is_some()
        );
        if let Some(store) = &store {
            let stored = store.load().await.unwrap().expect("saved");
            assert!(
                stored.refresh_token().is_some(),
                "the rotated pair is in the store"
            );
        }
    }
}

// --- OAuth2 refresh grant --------------------------------------------------------------

/// World: password grant + RFC 6749 §6 refresh grant (form, Basic), where presenting a
/// refresh token twice revokes its family. 200 concurrent 401s, three times over.
/// Proves: one refresh per expiry and zero family revocations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth2_refresh_grant_rotation_without_family_revocation() {
    let api = RefreshGrantApi::new("app", "app-secret");
    let base = start(api.clone()).await;
    let url = format!("{base}/oauth/token");
    let source = TokenSource::new(
        TokenRequest::oauth2_password(&url, "app", "app-secret", "alice", "wonderland").unwrap(),
    )
    .refresh_with(
        TokenRequest::oauth2_refresh_token(&url, "app", "app-secret").unwrap(),
        "refresh_token",
    )
    .client(token_client());
    let svc = layer(source).layer(api_client());
    assert_eq!(get(&svc, format!("{base}/api/me")).await.unwrap(), 200);
    for round in 1..=3 {
        api.expire_access_tokens();
        all_ok(&svc, &format!("{base}/api/me"), 200).await;
        assert_eq!(api.refresh_grants.load(SeqCst), round);
    }
    assert_eq!(api.family_revocations.load(SeqCst), 0);
    assert_eq!(api.password_grants.load(SeqCst), 1);
}

// --- Style D ---------------------------------------------------------------------------

/// World: client credentials with Basic + form and a scope. Proves: the scope is sent,
/// the token reused; a 403 (missing permission) is returned as is with no token request.
#[tokio::test]
async fn style_d_basic_form_scope_and_403_untouched() {
    let api = ClientCredentialsApi::new("d-client", "d-secret");
    let base = start(api.clone()).await;
    let source = TokenSource::new(
        TokenRequest::oauth2_client_credentials(
            &format!("{base}/oauth/v2/token"),
            "d-client",
            "d-secret",
        )
        .unwrap()
        .scope("shipments:read"),
    )
    .client(token_client());
    let svc: Client = layer(source).layer(api_client());
    assert_eq!(
        get(&svc, format!("{base}/v1/shipments")).await.unwrap(),
        200
    );
    assert_eq!(
        api.last_scope.lock().unwrap().as_deref(),
        Some("shipments:read")
    );
    // RFC 6750's `insufficient_scope`: the credential is valid, it lacks a scope.
    let res = svc
        .clone()
        .oneshot(
            Request::get(format!("{base}/v1/admin/users"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(
        res.extensions()
            .get::<tower_client_auth::rejection::InsufficientScope>()
            .and_then(|s| s.scope.as_deref()),
        Some("admin")
    );
    assert_eq!(
        res.extensions().get::<tower_client_auth::NotReplayed>(),
        Some(&tower_client_auth::NotReplayed::InsufficientScope)
    );
    assert_eq!(
        get(&svc, format!("{base}/v1/shipments")).await.unwrap(),
        200
    );
    assert_eq!(
        api.token_requests.load(SeqCst),
        1,
        "403 caused no token request"
    );
    assert_eq!(api.api_calls.load(SeqCst), 3, "and no replay");
}

/// A wrong client secret: 401 at the token endpoint becomes a typed `invalid_client`
/// error with its status, without the secret.
#[tokio::test]
async fn style_d_bad_client_secret_is_invalid_client() {
    let api = ClientCredentialsApi::new("d-client", "d-secret");
    let base = start(api.clone()).await;
    let source = TokenSource::client_credentials(
        &format!("{base}/oauth/v2/token"),
        "d-client",
        "WRONG-d-secret",
    )
    .unwrap()
    .client(token_client());
    let err = get(
        &layer(source).layer(api_client()),
        format!("{base}/v1/shipments"),
    )
    .await
    .unwrap_err();
    let token = token_error(&err);
    assert_eq!(token.oauth_error(), Some("invalid_client"));
    assert_eq!(token.status(), Some(StatusCode::UNAUTHORIZED));
    assert!(!format!("{err} {err:?} {token} {token:?}").contains("WRONG-d-secret"));
    assert_eq!(api.api_calls.load(SeqCst), 0);
}

// --- Style E ---------------------------------------------------------------------------

/// Static bearer, cookie and `Secret` scheme, each checked by the server; a re-issued
/// personal token takes effect on the next request without a restart.
#[tokio::test]
async fn style_e_static_cookie_secret_and_rotation() {
    let api = PersonalTokenApi::new("pat_1", ("session", "s3ss10n"), "client-s3cret");
    let base = start(api.clone()).await;

    let cookie = layer(StaticCredential::cookie("session", "s3ss10n").unwrap()).layer(api_client());
    assert_eq!(
        get(&cookie, format!("{base}/api/cookie/me")).await.unwrap(),
        200
    );
    let secret = layer(StaticCredential::with_scheme("Secret", "client-s3cret").unwrap())
        .layer(api_client());
    assert_eq!(
        get(&secret, format!("{base}/api/clients/verify"))
            .await
            .unwrap(),
        200
    );
    let wrong = layer(StaticCredential::bearer("client-s3cret").unwrap()).layer(api_client());
    assert_eq!(
        get(&wrong, format!("{base}/api/clients/verify"))
            .await
            .unwrap(),
        401
    );

    let pat = RotatingCredential::new(Credential::bearer("pat_1").unwrap());
    let svc = layer(pat.clone()).layer(api_client());
    assert_eq!(get(&svc, format!("{base}/api/me")).await.unwrap(), 200);
    api.reissue("pat_2");
    assert_eq!(
        get(&svc, format!("{base}/api/me")).await.unwrap(),
        401,
        "old token revoked"
    );
    pat.rotate(Credential::bearer("pat_2").unwrap()).unwrap();
    assert_eq!(get(&svc, format!("{base}/api/me")).await.unwrap(), 200);
}

/// World: a login endpoint answering a JWT with no `exp` and no `expires_in`, reached
/// through `session_login` and through the recipe for a login of one's own
/// (`TokenRequest::json(..).field(..).secret_field(..)`). Proves: both send the same
/// body README shows (`type`, `key`, `secret`) and give the token the same lifetime, the
/// documented `DEFAULT_TOKEN_LIFETIME` less the clock-skew margin.
#[tokio::test]
async fn a_login_without_a_stated_lifetime_gets_the_documented_default() {
    use tower_client_auth::token::{DEFAULT_CLOCK_SKEW, DEFAULT_TOKEN_LIFETIME};
    let bodies: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let addr = serve({
        let bodies = bodies.clone();
        move |req: Request<hyper::body::Incoming>| {
            let bodies = bodies.clone();
            async move {
                let body = req.into_body().collect().await.unwrap().to_bytes();
                bodies
                    .lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap());
                let jwt = format!(
                    "{}.{}.sig",
                    b64(&serde_json::json!({"alg": "none"})),
                    b64(&serde_json::json!({"sub": "svc"}))
                );
                reply(StatusCode::OK, serde_json::json!({ "access_token": jwt }))
            }
        }
    })
    .await;
    let url = format!("http://{addr}/v1/sessions");
    let shipped = TokenSource::session_login(&url, "my-key", "my-secret").unwrap();
    let own = TokenSource::new(
        TokenRequest::json(&url)
            .unwrap()
            .field("type", "api-key")
            .field("key", "my-key")
            .secret_field("secret", "my-secret"),
    );
    let mut lifetimes = Vec::new();
    for source in [shipped, own] {
        let cache = CredentialCache::new(source.client(token_client()));
        lifetimes.push(cache.credential().await.unwrap().lifetime().unwrap());
    }
    assert_eq!(
        lifetimes[0], lifetimes[1],
        "session_login and the recipe differ"
    );
    assert_eq!(lifetimes[0], DEFAULT_TOKEN_LIFETIME - DEFAULT_CLOCK_SKEW);
    let bodies = bodies.lock().unwrap();
    assert_eq!(bodies[0], bodies[1]);
    assert_eq!(
        bodies[0],
        serde_json::json!({"type": "api-key", "key": "my-key", "secret": "my-secret"})
    );
}
