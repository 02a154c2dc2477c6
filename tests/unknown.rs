//! Promises when the outcome is unknown, against the strict token server
//! (`support::strict_idp`): refresh tokens after gateways, dropped connections and
//! timeouts; a refresh that provably never left; `Retry-After`; hooks that hang.
#![cfg(feature = "https")]

use crate::support;

use std::{
    sync::{Arc, Mutex, atomic::Ordering::SeqCst},
    time::Duration,
};

use http::StatusCode;
use serde_json::json;
use support::{
    ApiStack, api_stack, api_status, capture_traces,
    providers::{self, reply},
    strict_idp::{Fault, StrictIdp},
    token_client,
};
use tower_client_auth::{
    CredentialCache, Error,
    token::{TokenClient, TokenError, TokenErrorKind, TokenRequest, TokenSource},
};

const CLIENT_ID: &str = "unknown-client";
const CLIENT_SECRET: &str = "unknown-5ecr3t";

/// Client credentials as the login at `login_base`, the refresh grant at `refresh_base`.
fn source_at(login_base: &str, refresh_base: &str, client: TokenClient) -> TokenSource {
    TokenSource::new(
        TokenRequest::oauth2_client_credentials(
            &format!("{login_base}/oauth/token"),
            CLIENT_ID,
            CLIENT_SECRET,
        )
        .unwrap(),
    )
    .refresh_with(
        TokenRequest::oauth2_refresh_token(
            &format!("{refresh_base}/oauth/token"),
            CLIENT_ID,
            CLIENT_SECRET,
        )
        .unwrap(),
        "refresh_token",
    )
    .client(client)
}

/// A logged-in session whose access token the server has just expired, so that the next
/// request's 401 makes the source refresh.
async fn expired_session(
    idp: &Arc<StrictIdp>,
    source: TokenSource,
) -> (ApiStack<TokenSource>, CredentialCache<TokenSource>, String) {
    let base = providers::start(idp.clone()).await;
    let cache = CredentialCache::builder(source)
        .backoff(Duration::from_millis(10), Duration::from_millis(10))
        .build()
        .unwrap();
    let svc = api_stack(cache.clone());
    let url = format!("{base}/v1/things");
    assert_eq!(api_status(&svc, &url).await.unwrap(), 200);
    idp.expire_access_tokens();
    (svc, cache, url)
}

fn token_error(err: &Error) -> &TokenError {
    err.get_ref()
        .and_then(|s| s.downcast_ref::<TokenError>())
        .unwrap_or_else(|| panic!("no token error under {err:?}"))
}

/// World: a rotating, family-revoking server that rotates the refresh token and then
/// loses the answer: the server answers 500 (or any 5xx), a gateway answers 502, 503 or 504, the connection is closed, the
/// answer is too large to read, or it comes after the token client's timeout. Proves, for each: the refresh token
/// whose outcome is unknown is never presented again (0 reuse, 0 revocations), the
/// source logs in afresh once, and the request that waited succeeds.
#[tokio::test]
async fn a_refresh_whose_answer_is_lost_is_never_repeated() {
    type MakeFault = fn() -> Fault;
    let faults: Vec<(&str, MakeFault)> = vec![
        // The server itself failing mid-exchange may have rotated first, as a gateway's
        // upstream may have: one rule for every 5xx.
        ("500", || {
            Fault::RotateThenLose(Some(StatusCode::INTERNAL_SERVER_ERROR))
        }),
        ("507", || {
            Fault::RotateThenLose(Some(StatusCode::INSUFFICIENT_STORAGE))
        }),
        ("502", || {
            Fault::RotateThenLose(Some(StatusCode::BAD_GATEWAY))
        }),
        ("503", || {
            Fault::RotateThenLose(Some(StatusCode::SERVICE_UNAVAILABLE))
        }),
        ("504", || {
            Fault::RotateThenLose(Some(StatusCode::GATEWAY_TIMEOUT))
        }),
        ("connection closed", || Fault::RotateThenLose(None)),
        ("answer too large to read", || {
            Fault::RotateThenBody(
                |rt| json!({"access_token": "a", "refresh_token": rt, "padding": "x".repeat(70_000)}),
            )
        }),
        ("client timeout", || {
            Fault::RotateThenDelay(Duration::from_secs(2))
        }),
    ];
    for (what, fault) in faults {
        let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
        let base = providers::start(idp.clone()).await;
        let client = token_client().timeout(Duration::from_millis(500));
        let (svc, cache, url) = expired_session(&idp, source_at(&base, &base, client)).await;
        idp.push_fault(fault());
        assert_eq!(api_status(&svc, &url).await.unwrap(), 200, "{what}");
        assert_eq!(api_status(&svc, &url).await.unwrap(), 200, "{what}");
        assert_eq!(idp.presented.lock().unwrap().len(), 1, "{what}");
        assert_eq!(idp.reused_refresh_tokens.load(SeqCst), 0, "{what}");
        assert_eq!(idp.family_revocations.load(SeqCst), 0, "{what}");
        assert_eq!(idp.logins.load(SeqCst), 2, "{what}: one fresh login");
        assert_eq!(cache.source().stats().unknown_outcomes, 1, "{what}");
    }
}

/// World: the refresh endpoint refuses connections (nothing listens there yet), then
/// comes up. Proves: a refresh that provably never left keeps its refresh token: no
/// login, and the same token is presented once the endpoint is back.
#[tokio::test]
async fn a_refresh_that_never_left_keeps_its_token() {
    let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
    let login = providers::start(idp.clone()).await;
    let (refresh_addr, closed) = support::refusing_port();
    let source = source_at(&login, &format!("http://{refresh_addr}"), token_client());
    let (svc, cache, url) = expired_session(&idp, source).await;

    let err = api_status(&svc, &url).await.unwrap_err();
    let err = err.downcast_ref::<Error>().expect("a crate error");
    assert_eq!(token_error(err).kind(), TokenErrorKind::Connect, "{err}");
    assert_eq!(cache.source().stats().unknown_outcomes, 0);

    drop(closed);
    providers::start_on(refresh_addr, idp.clone()).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(api_status(&svc, &url).await.unwrap(), 200);
    assert_eq!(
        idp.logins.load(SeqCst),
        1,
        "no login: the refresh token was kept"
    );
    assert_eq!(idp.refresh_grants.load(SeqCst), 1);
    assert_eq!(idp.reused_refresh_tokens.load(SeqCst), 0);
}

/// World: a login answer carrying `"refresh_token": ""` next to a valid access token.
/// Proves: the login is accepted (an empty refresh token is no refresh token), and that
/// is logged once, not once per login.
#[tokio::test(flavor = "current_thread")]
async fn an_empty_refresh_token_is_no_refresh_token() {
    let (capture, _guard) = capture_traces();
    let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
    let base = providers::start(idp.clone()).await;
    let empty = || {
        Fault::Answer(Box::new(|_| {
            reply(
                StatusCode::OK,
                json!({"access_token": "opaque-access", "refresh_token": "", "expires_in": 60}),
            )
        }))
    };
    idp.push_fault(empty());
    idp.push_fault(empty());
    let cache = CredentialCache::new(source_at(&base, &base, token_client()));
    cache.credential().await.unwrap();
    cache.handle().invalidate();
    cache.credential().await.unwrap();
    assert_eq!(idp.token_requests.load(SeqCst), 2);
    assert_eq!(
        idp.refresh_grants.load(SeqCst),
        0,
        "nothing to refresh with"
    );
    let logs = capture.text();
    assert_eq!(
        logs.matches("empty refresh token").count(),
        1,
        "logged once: {logs}"
    );
}

/// World: the token endpoint answers 429 with `Retry-After: 5`, then recovers; a request
/// every 100 ms. Proves: no token request for 5 s after the 429 (the cache's own backoff
/// would have tried after ~1 s), and requests succeed after.
#[tokio::test]
async fn retry_after_is_the_earliest_next_attempt() {
    let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
    let base = providers::start(idp.clone()).await;
    idp.push_fault(Fault::Answer(Box::new(|_| {
        let mut res = reply(StatusCode::TOO_MANY_REQUESTS, json!({"error": "slow_down"}));
        res.headers_mut()
            .insert("retry-after", http::HeaderValue::from_static("5"));
        res
    })));
    let svc = api_stack(CredentialCache::new(source_at(
        &base,
        &base,
        token_client(),
    )));
    let url = format!("{base}/v1/things");
    let started = std::time::Instant::now();
    let err = api_status(&svc, &url).await.unwrap_err();
    let err = err.downcast_ref::<Error>().expect("a crate error");
    assert_eq!(
        token_error(err).status(),
        Some(StatusCode::TOO_MANY_REQUESTS)
    );
    while started.elapsed() < Duration::from_millis(4800) {
        let _ = api_status(&svc, &url).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        idp.token_requests.load(SeqCst),
        1,
        "asked again before Retry-After"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(api_status(&svc, &url).await.unwrap(), 200);
    assert_eq!(idp.token_requests.load(SeqCst), 2);
}

/// World: an `on_refresh` hook that never returns. Proves: it is bounded (the fetch
/// completes after the hook timeout instead of hanging, also while the unconfirmed pair
/// is being offered again), and the new refresh token is kept in memory all the same:
/// the next refresh presents it, with no reuse.
#[tokio::test]
async fn a_hanging_on_refresh_hook_blocks_nothing() {
    let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
    let base = providers::start(idp.clone()).await;
    let calls = Arc::new(Mutex::new(0));
    let source = source_at(&base, &base, token_client())
        .on_refresh({
            let calls = calls.clone();
            move |_pair| {
                *calls.lock().unwrap() += 1;
                std::future::pending::<()>()
            }
        })
        .on_refresh_timeout(Duration::from_millis(200));
    let limit = Duration::from_secs(3);
    let (svc, _cache, url) = tokio::time::timeout(limit, expired_session(&idp, source))
        .await
        .expect("the login's hook hung the fetch");
    assert_eq!(
        tokio::time::timeout(limit, api_status(&svc, &url))
            .await
            .unwrap()
            .unwrap(),
        200
    );
    idp.expire_access_tokens();
    assert_eq!(
        tokio::time::timeout(limit, api_status(&svc, &url))
            .await
            .unwrap()
            .unwrap(),
        200
    );
    let presented = idp.presented.lock().unwrap().clone();
    assert_eq!(presented.len(), 2);
    assert_ne!(presented[0], presented[1]);
    assert_eq!(idp.reused_refresh_tokens.load(SeqCst), 0);
    // One call per pair, and the newest unconfirmed pair offered again meanwhile.
    assert!(*calls.lock().unwrap() >= 3, "{}", *calls.lock().unwrap());
}
