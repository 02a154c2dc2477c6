//! The promises at the edges, against a token server as strict as real ones
//! (`support::strict_idp`): lifetimes as servers really state them, refresh tokens after
//! answers that do not parse or come late, 200s carrying OAuth errors, explicit
//! invalidation, replays that could not help, secrets echoed back, forged log lines, and
//! insecure token URLs.
#![cfg(feature = "https")]

use crate::support;

use std::{
    sync::{Arc, Mutex, atomic::Ordering::SeqCst},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use support::{
    api_client, capture_traces,
    providers::{self, Incoming, reply},
    strict_idp::{Fault, StrictIdp},
    token_client,
};
use tower::{Layer, ServiceExt};
use tower_client_auth::cache::DEFAULT_FETCH_TIMEOUT;
use tower_client_auth::{
    AuthLayer, BoxError, Credential, CredentialCache, CredentialSource, Error, ErrorKind,
    NotReplayed, RotatingCredential, StaticCredential,
    token::{
        DEFAULT_TOKEN_TIMEOUT, MAX_LIFETIME, MIN_LIFETIME, TokenClient, TokenError, TokenErrorKind,
        TokenRequest, TokenSource,
    },
};

const CLIENT_ID: &str = "edge-client";
const CLIENT_SECRET: &str = "CANARY-client-5ecr3t/+&=straddle";

/// Client credentials to log in, the refresh grant after, on the server at `base`.
fn oauth_source(base: &str) -> TokenSource {
    support::strict_idp::rotating_source(base, CLIENT_ID, CLIENT_SECRET)
}

async fn start(idp: &Arc<StrictIdp>) -> String {
    providers::start(idp.clone()).await
}

/// The layer over a plain hyper-util client, `cache` behind it.
fn stack<P: CredentialSource>(
    cache: CredentialCache<P>,
) -> tower_client_auth::AddCredential<
    hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        tower_client_auth::ReplayBody<Full<Bytes>>,
    >,
    P,
> {
    AuthLayer::with_cache(cache)
        .any_https_origin()
        .allow_http_loopback(true)
        .layer(api_client())
}

async fn call<S>(svc: &S, url: &str) -> Result<http::Response<Bytes>, BoxError>
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
        .await?;
    let (parts, body) = res.into_parts();
    Ok(http::Response::from_parts(
        parts,
        body.collect().await?.to_bytes(),
    ))
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Time left on a credential's expiry.
fn left(credential: &Credential) -> Option<Duration> {
    credential.expiry().map(|at| {
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
    })
}

/// The token error under a crate error.
fn token_error(err: &Error) -> &TokenError {
    err.get_ref()
        .and_then(|s| s.downcast_ref::<TokenError>())
        .unwrap_or_else(|| panic!("no token error under {err:?}"))
}

// --- 1, 2: lifetimes ---------------------------------------------------------------------

/// World: a server whose JWTs live 3 s, stamped `exp = floor(now) + 3` while `expires_in`
/// says 3 (up to a second more than the token lives), and an API that enforces `exp`.
/// 1,000+ requests over 12 s. Proves: the lifetime is the earlier of the two, so no
/// request ever carries an expired token (0 API 401s), and the source asks for at most
/// one token per (real) lifetime.
#[tokio::test]
async fn floored_jwt_exp_never_reaches_the_api_expired() {
    let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3.0);
    idp.issue_refresh_tokens.store(false, SeqCst);
    let base = start(&idp).await;
    let svc = stack(CredentialCache::new(oauth_source(&base)));
    let url = format!("{base}/v1/things");
    let started = std::time::Instant::now();
    let mut requests = 0;
    while started.elapsed() < Duration::from_secs(12) {
        let res = call(&svc, &url).await.unwrap();
        assert_eq!(res.status(), 200);
        requests += 1;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(requests >= 1000, "{requests} requests");
    assert_eq!(idp.api_unauthorized.load(SeqCst), 0, "expired tokens sent");
    // Each token really lives more than 2 s; the cache refreshes it in its last quarter
    // (less the skew margin): never more than one token per 1.4 s.
    let tokens = idp.logins.load(SeqCst);
    assert!(
        (4..=9).contains(&tokens),
        "{tokens} tokens in 12 s of 3 s tokens"
    );
}

/// The stated lifetime is the earlier of `expires_in` and the JWT's `exp`, less the
/// clock-skew margin (at most a tenth of the lifetime).
#[tokio::test]
async fn lifetime_is_the_earlier_of_expires_in_and_exp_less_the_skew() {
    let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
    idp.floor_exp.store(false, SeqCst);
    *idp.exp_claim.lock().unwrap() = Some(json!(now_secs() + 100.0));
    let base = start(&idp).await;

    let cache = CredentialCache::new(oauth_source(&base));
    let lifetime = left(&cache.credential().await.unwrap()).unwrap();
    // 100 s from exp, less the default skew margin.
    assert!(
        lifetime <= Duration::from_secs(100) - tower_client_auth::token::DEFAULT_CLOCK_SKEW,
        "{lifetime:?}"
    );
    assert!(lifetime > Duration::from_secs(90), "{lifetime:?}");

    let cache = CredentialCache::new(oauth_source(&base).clock_skew(Duration::from_secs(30)));
    let lifetime = left(&cache.credential().await.unwrap()).unwrap();
    // A 30 s margin is capped at a tenth of the 100 s lifetime.
    assert!(lifetime <= Duration::from_secs(90), "{lifetime:?}");
    assert!(lifetime > Duration::from_secs(85), "{lifetime:?}");

    // expires_in is the earlier one: it wins.
    *idp.exp_claim.lock().unwrap() = Some(json!(now_secs() + 7200.0));
    *idp.expires_in.lock().unwrap() = Some(json!(50));
    let cache = CredentialCache::new(oauth_source(&base).clock_skew(Duration::ZERO));
    let lifetime = left(&cache.credential().await.unwrap()).unwrap();
    assert!(
        lifetime <= Duration::from_secs(50) && lifetime > Duration::from_secs(49),
        "{lifetime:?}"
    );
}

/// World: a server stating `expires_in: 0.02` for tokens the API accepts for an hour, and
/// a request every 10 ms for 2 s. Proves: the server cannot set the fetch rate: the
/// lifetime is raised to `MIN_LIFETIME` (a handful of token requests, not one per
/// request), and that is logged once.
#[tokio::test(flavor = "current_thread")]
async fn a_server_cannot_set_the_fetch_rate() {
    let (capture, _guard) = capture_traces();
    let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
    idp.issue_refresh_tokens.store(false, SeqCst);
    *idp.expires_in.lock().unwrap() = Some(json!(0.02));
    let base = start(&idp).await;
    let svc = stack(CredentialCache::new(oauth_source(&base)));
    let url = format!("{base}/v1/things");
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        assert_eq!(call(&svc, &url).await.unwrap().status(), 200);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let max = (2.0_f64 / MIN_LIFETIME.as_secs_f64()).ceil() as usize + 2;
    let tokens = idp.logins.load(SeqCst);
    assert!(tokens <= max, "{tokens} token requests in 2 s");
    let logs = capture.text();
    assert_eq!(
        logs.matches("shorter than the minimum").count(),
        1,
        "logged once: {logs}"
    );
}

/// A JWT `exp` far in the future gets the same 10-year cap as `expires_in`; a JWT whose
/// `exp` cannot be read, with no `expires_in` either, gets the default lifetime and says
/// so in the log (without the token).
#[tokio::test(flavor = "current_thread")]
async fn jwt_exp_is_capped_and_a_bad_one_is_logged() {
    let (capture, _guard) = capture_traces();
    let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
    *idp.expires_in.lock().unwrap() = Some(Value::Null);
    *idp.exp_claim.lock().unwrap() = Some(json!(1e15));
    let base = start(&idp).await;
    let cache = CredentialCache::new(oauth_source(&base));
    let lifetime = left(&cache.credential().await.unwrap()).expect("a capped expiry");
    assert!(lifetime <= MAX_LIFETIME, "{lifetime:?}");
    assert!(lifetime > MAX_LIFETIME / 2, "{lifetime:?}");

    *idp.exp_claim.lock().unwrap() = Some(json!("soon"));
    let cache = CredentialCache::new(oauth_source(&base));
    let credential = cache.credential().await.unwrap();
    let lifetime = left(&credential).unwrap();
    assert!(
        lifetime <= tower_client_auth::token::DEFAULT_TOKEN_LIFETIME,
        "{lifetime:?}"
    );
    let logs = capture.text();
    assert!(logs.contains("jwt exp claim cannot be read"), "{logs}");
    assert!(!logs.contains("eyJ"), "the token reached the log: {logs}");
}

// --- 3, 4, 5: refresh tokens ------------------------------------------------------------

/// One session with a refresh token: the first request logs in, then the access token is
/// expired on the server so the next request's 401 makes the source refresh.
async fn session(
    idp: &Arc<StrictIdp>,
    source: TokenSource,
) -> (
    impl tower::Service<
        Request<Full<Bytes>>,
        Response = http::Response<hyper::body::Incoming>,
        Error = BoxError,
    > + Clone
    + use<>,
    String,
) {
    let base = start(idp).await;
    let cache = CredentialCache::builder(source)
        .backoff(Duration::from_millis(10), Duration::from_millis(10))
        .build()
        .unwrap();
    let svc = stack(cache);
    let url = format!("{base}/v1/things");
    assert_eq!(call(&svc, &url).await.unwrap().status(), 200);
    idp.expire_access_tokens();
    (svc, url)
}

/// A source on `base` whose `on_refresh` hook records the refresh token of each pair
/// it is given (`None` for a pair that holds none).
fn hooked_source(base: &str) -> (TokenSource, Arc<Mutex<Vec<Option<String>>>>) {
    let hooked = Arc::new(Mutex::new(Vec::new()));
    let source = oauth_source(base).on_refresh({
        let hooked = hooked.clone();
        move |pair| {
            let rt = pair.refresh_token().map(|s| s.expose().to_owned());
            hooked.lock().unwrap().push(rt);
            async {}
        }
    });
    (source, hooked)
}

/// World: a rotating, family-revoking server that rotates the refresh token and then
/// answers 200 with a body the client cannot use (`expires_in: 0`, an empty access token,
/// no access token, an OAuth error next to the new refresh token). Proves, for each: the new refresh token is kept (and handed to
/// `on_refresh`) before the body is judged, so the old one is never presented again, no
/// family is revoked and no second login is needed.
#[tokio::test]
async fn a_rotated_refresh_token_survives_an_unusable_answer() {
    let broken: [fn(&str) -> Value; 4] = [
        |rt| json!({"access_token": "fresh-but-unusable", "expires_in": 0, "refresh_token": rt}),
        |rt| json!({"access_token": "", "expires_in": 60, "refresh_token": rt}),
        |rt| json!({"refresh_token": rt, "token_type": "Bearer"}),
        |rt| json!({"error": "server_error", "refresh_token": rt}),
    ];
    for make in broken {
        let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
        let (source, hooked) = hooked_source(&start(&idp).await);
        let (svc, url) = session(&idp, source).await;
        idp.push_fault(Fault::RotateThenBody(make));
        let err = call(&svc, &url).await.unwrap_err();
        let err = err.downcast_ref::<Error>().expect("a crate error");
        assert!(
            matches!(
                token_error(err).kind(),
                TokenErrorKind::InvalidResponse | TokenErrorKind::Rejected
            ),
            "{err}"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(call(&svc, &url).await.unwrap().status(), 200);

        let presented = idp.presented.lock().unwrap().clone();
        assert_eq!(presented.len(), 2, "{presented:?}");
        assert_ne!(presented[0], presented[1], "the old refresh token again");
        assert_eq!(idp.reused_refresh_tokens.load(SeqCst), 0);
        assert_eq!(idp.family_revocations.load(SeqCst), 0);
        assert_eq!(idp.logins.load(SeqCst), 1, "no second login");
        let hooked = hooked.lock().unwrap().clone();
        assert_eq!(
            hooked.get(1).cloned().flatten().as_deref(),
            Some(presented[1].as_str()),
            "on_refresh saw the rotated token: {hooked:?}"
        );
    }
}

/// World: an `on_refresh` hook recording each pair; a refresh answered `invalid_grant`
/// (the refresh token judged dead) and the login after it refused too (`invalid_client`:
/// the client's secret was rotated meanwhile). Proves: the hook is told that no refresh
/// token is held now (a pair without one), as after an unknown outcome, so that an
/// application that persists it never resumes with the dead one after a restart.
#[tokio::test]
async fn a_refresh_token_judged_dead_is_withdrawn_from_the_hook() {
    let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
    let (source, hooked) = hooked_source(&start(&idp).await);
    let (svc, url) = session(&idp, source).await;
    idp.push_fault(Fault::Answer(Box::new(|_: &Incoming| {
        reply(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_grant", "error_description": "refresh token revoked"}),
        )
    })));
    idp.push_fault(Fault::Answer(Box::new(|_: &Incoming| {
        reply(StatusCode::UNAUTHORIZED, json!({"error": "invalid_client"}))
    })));
    call(&svc, &url).await.unwrap_err();
    let hooked = hooked.lock().unwrap().clone();
    assert!(
        matches!(hooked.first(), Some(Some(_))),
        "the login's pair: {hooked:?}"
    );
    assert_eq!(
        hooked.last(),
        Some(&None),
        "the hook still holds the dead refresh token: {hooked:?}"
    );
}

/// World: a rotating, family-revoking server and an `on_refresh` hook that fails (disk
/// full) the first three times it is called, then works; two refreshes follow the login.
/// Proves: every call is served with the newest pair (never the old refresh token, no
/// second login); the hook is offered the newest unconfirmed pair again until it takes
/// it, and what it took last is the refresh token the source holds: never an older
/// pair after a newer one.
#[tokio::test]
async fn a_pair_the_hook_could_not_persist_is_offered_again_newest_first() {
    let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
    let base = start(&idp).await;
    let refusals = Arc::new(std::sync::atomic::AtomicUsize::new(3));
    let persisted = Arc::new(Mutex::new(Vec::<String>::new()));
    let source = oauth_source(&base).on_refresh({
        let (refusals, persisted) = (refusals.clone(), persisted.clone());
        move |pair| {
            let rt = pair.refresh_token().map(|s| s.expose().to_owned());
            let refuse = refusals
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok();
            let persisted = persisted.clone();
            async move {
                if refuse {
                    return Err("disk full");
                }
                persisted.lock().unwrap().extend(rt);
                Ok(())
            }
        }
    });
    let cache = tower_client_auth::CredentialCache::builder(source)
        .build()
        .unwrap();
    cache.credential().await.unwrap();
    for _ in 0..2 {
        assert!(cache.handle().invalidate());
        cache.credential().await.unwrap();
    }
    // The third refusal was the second refresh's pair; it is offered again.
    let started = std::time::Instant::now();
    while persisted.lock().unwrap().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never offered again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The next refresh presents what the source holds: what the hook took last.
    assert!(cache.handle().invalidate());
    cache.credential().await.unwrap();
    let presented = idp.presented.lock().unwrap().clone();
    let persisted = persisted.lock().unwrap().clone();
    assert_eq!(
        persisted.first(),
        presented.last(),
        "{persisted:?} {presented:?}"
    );
    assert_eq!(
        persisted.len(),
        2,
        "the newest unconfirmed pair once, then the next"
    );
    assert_eq!(idp.reused_refresh_tokens.load(SeqCst), 0);
    assert_eq!(idp.logins.load(SeqCst), 1);
    assert_eq!(idp.refresh_grants.load(SeqCst), 3);
}

/// World: the defaults (fetch timeout, token timeout) and a rotating, family-revoking
/// server that rotates a refresh and answers it only after the fetch timeout + 1 s.
/// Proves: the token client gives up first (its default timeout is shorter), the refresh
/// token whose outcome is unknown is never presented again, the source logs in instead,
/// and the request that waited succeeds.
#[tokio::test]
async fn a_refresh_answered_after_the_fetch_timeout_is_never_reused() {
    assert!(DEFAULT_TOKEN_TIMEOUT < DEFAULT_FETCH_TIMEOUT);
    let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
    let base = start(&idp).await;
    let source = oauth_source(&base);
    let cache = CredentialCache::new(source);
    let svc = stack(cache.clone());
    let url = format!("{base}/v1/things");
    assert_eq!(call(&svc, &url).await.unwrap().status(), 200);
    idp.expire_access_tokens();
    idp.push_fault(Fault::RotateThenDelay(
        DEFAULT_FETCH_TIMEOUT + Duration::from_secs(1),
    ));
    assert_eq!(call(&svc, &url).await.unwrap().status(), 200);
    assert_eq!(call(&svc, &url).await.unwrap().status(), 200);
    assert_eq!(idp.presented.lock().unwrap().len(), 1);
    assert_eq!(idp.reused_refresh_tokens.load(SeqCst), 0);
    assert_eq!(idp.family_revocations.load(SeqCst), 0);
    assert_eq!(
        idp.logins.load(SeqCst),
        2,
        "one fresh login after the timeout"
    );
    assert_eq!(cache.source().stats().unknown_outcomes, 1);
}

/// World: the refresh is refused with `{"error":"invalid_grant"}` and status 200, as some
/// servers do. Proves: it is read as that OAuth error (the same kind and code as a 400),
/// so the source falls back to a login and the request succeeds.
#[tokio::test]
async fn a_200_carrying_an_oauth_error_is_that_error() {
    let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
    let base = start(&idp).await;
    let (svc, url) = session(&idp, oauth_source(&base)).await;
    idp.push_fault(Fault::Answer(Box::new(|_| {
        reply(
            StatusCode::OK,
            json!({"error": "invalid_grant", "error_description": "refresh token expired"}),
        )
    })));
    assert_eq!(call(&svc, &url).await.unwrap().status(), 200);
    assert_eq!(idp.logins.load(SeqCst), 2, "fell back to a login");

    // The error itself, as a user of the cache sees it when there is no login to fall
    // back to.
    idp.push_fault(Fault::Answer(Box::new(|_| {
        reply(StatusCode::OK, json!({"error": "invalid_client"}))
    })));
    let cache = CredentialCache::new(oauth_source(&base));
    let err = cache.credential().await.unwrap_err();
    let token = token_error(&err);
    assert_eq!(token.kind(), TokenErrorKind::Rejected);
    assert_eq!(token.oauth_error(), Some("invalid_client"));
    assert!(token.is_grant_rejected());
}

// --- 6, 7: invalidation and replay --------------------------------------------------------

/// `CacheHandle::invalidate` makes the next request ask the source again, for every
/// shipped source; a token source goes to its token endpoint and returns a new token.
#[tokio::test]
async fn invalidation_always_reaches_the_source() {
    async fn invalidated<P: CredentialSource>(source: P) {
        let cache = CredentialCache::new(source);
        cache.credential().await.unwrap();
        assert!(cache.handle().invalidate());
        cache.credential().await.unwrap();
        assert_eq!(cache.stats().fetches, 2, "invalidate led to a fetch");
    }
    invalidated(StaticCredential::bearer("static").unwrap()).await;
    invalidated(RotatingCredential::new(Credential::bearer("pat").unwrap())).await;
    invalidated(tower_client_auth::source_fn(|_cx| async {
        Ok::<_, BoxError>(Credential::bearer("from-a-closure")?)
    }))
    .await;

    let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
    let base = start(&idp).await;
    let cache = CredentialCache::new(oauth_source(&base));
    let first = cache.credential().await.unwrap();
    cache.handle().invalidate();
    let second = cache.credential().await.unwrap();
    assert_ne!(first, second, "invalidate handed back the same token");
    assert_eq!(idp.token_requests.load(SeqCst), 2);
}

/// World: an API that rejects every token, and sources that hand the same credential
/// back: a revoked personal access token not yet rotated, and a token endpoint that
/// re-issues the token it issued last. Proves: the request is not replayed with the
/// credential just rejected; the 401 comes back once, marked
/// `NotReplayed::SameCredential`.
#[tokio::test]
async fn a_replay_never_carries_the_rejected_credential() {
    let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
    idp.issue_refresh_tokens.store(false, SeqCst);
    let base = start(&idp).await;
    let url = format!("{base}/v1/things");

    let svc = stack(CredentialCache::new(oauth_source(&base)));
    assert_eq!(call(&svc, &url).await.unwrap().status(), 200);
    idp.reject_all.store(true, SeqCst);
    idp.reissue_same_token.store(true, SeqCst);
    let calls = idp.api_calls.load(SeqCst);
    let res = call(&svc, &url).await.unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(
        res.extensions().get::<NotReplayed>(),
        Some(&NotReplayed::SameCredential)
    );
    assert_eq!(idp.api_calls.load(SeqCst), calls + 1, "sent once");
    assert_eq!(idp.logins.load(SeqCst), 2, "the source was asked");

    let pat = RotatingCredential::new(Credential::bearer("revoked-pat").unwrap());
    let svc = stack(CredentialCache::new(pat));
    let calls = idp.api_calls.load(SeqCst);
    let res = call(&svc, &url).await.unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(
        res.extensions().get::<NotReplayed>(),
        Some(&NotReplayed::SameCredential)
    );
    assert_eq!(idp.api_calls.load(SeqCst), calls + 1, "sent once");
}

// --- 8, 9: secrets and logs -------------------------------------------------------------

/// A token endpoint refusing the client with `error_description` built by `describe`
/// from the request it got; the error a cache over it returns, and the log.
async fn refusal(describe: fn(&Incoming) -> String) -> (String, String) {
    let (capture, _guard) = capture_traces();
    let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
    let base = start(&idp).await;
    idp.push_fault(Fault::Answer(Box::new(move |req| {
        reply(
            StatusCode::UNAUTHORIZED,
            json!({"error": "invalid_client", "error_description": describe(req)}),
        )
    })));
    let cache = CredentialCache::new(oauth_source(&base));
    let err = cache.credential().await.unwrap_err();
    let shown = format!(
        "{err} | {err:?} | {} | {:?}",
        token_error(&err),
        token_error(&err)
    );
    (shown, capture.text())
}

/// World: token endpoints that echo what they were sent in `error_description`: the
/// secret straddling the 200-character cut, the Basic header's base64 (padded or not),
/// the url-encoded secret (upper- or lower-case escapes). Proves: no part of any of them reaches `Display`, `Debug` or the log.
#[tokio::test(flavor = "current_thread")]
async fn echoed_secrets_are_scrubbed_in_every_form() {
    let straddling = |_: &Incoming| format!("{}{CLIENT_SECRET} is wrong", "x".repeat(190));
    let basic = |req: &Incoming| {
        let header = req.headers["authorization"].to_str().unwrap().to_owned();
        format!("bad credentials in '{header}'")
    };
    let urlencoded = |req: &Incoming| {
        let (_, encoded) = providers::basic_raw(&req.headers).unwrap();
        format!("client secret {encoded} unknown")
    };
    let encoded_secret: String =
        form_urlencoded::byte_serialize(CLIENT_SECRET.as_bytes()).collect();
    let unpadded = |req: &Incoming| {
        let header = req.headers["authorization"].to_str().unwrap().to_owned();
        format!("bad: {}", header.trim_end_matches('='))
    };
    let lowercase = |req: &Incoming| {
        let (_, encoded) = providers::basic_raw(&req.headers).unwrap();
        format!(
            "client secret {} unknown",
            encoded
                .replace("%2F", "%2f")
                .replace("%2B", "%2b")
                .replace("%3D", "%3d")
        )
    };
    for describe in [straddling, basic, urlencoded, unpadded, lowercase] {
        let (shown, logs) = refusal(describe).await;
        for text in [&shown, &logs] {
            assert!(text.contains("invalid_client"), "{text}");
            assert!(!text.contains(&CLIENT_SECRET[..10]), "secret: {text}");
            assert!(!text.contains(&encoded_secret[..16]), "url-encoded: {text}");
            assert!(!text.contains("Basic ZW"), "basic header: {text}");
            assert!(!text.contains("5ecr3t%2f"), "lower-case escapes: {text}");
        }
    }
}

/// World: a token endpoint whose `error_description` forges a log line (CR/LF) and
/// carries an ANSI escape. Proves: `Display` and the logs carry them escaped, never raw.
#[tokio::test(flavor = "current_thread")]
async fn server_text_cannot_forge_log_lines_or_reach_the_terminal() {
    let (shown, logs) = refusal(|_| {
        "nope\r\n2026-12-01T00:00:00Z ERROR forged: all good \u{1b}[31mred\u{1b}[0m \u{202e}".into()
    })
    .await;
    for text in [&shown, &logs] {
        assert!(text.contains("invalid_client"), "{text}");
        assert!(!text.contains('\u{1b}'), "raw escape: {text:?}");
        assert!(!text.contains('\r'), "raw CR: {text:?}");
        assert!(!text.contains('\u{202e}'), "raw bidi override: {text:?}");
        assert!(text.contains("\\n"), "escaped newline shown: {text:?}");
    }
    assert!(!shown.contains('\n'), "{shown:?}");
    assert!(
        !logs
            .lines()
            .any(|l| l.contains("ERROR forged") && !l.contains("invalid_client")),
        "a forged log line: {logs}"
    );
}

// --- 10: configuration errors early -------------------------------------------------------

/// A token URL over plain http to a remote host is refused when the request is built,
/// with `InsecureTransport`; a loopback one is accepted there, and refused at fetch time
/// by a client that does not allow it, as `ErrorKind::InsecureTransport` at the top.
#[tokio::test]
async fn insecure_token_urls_are_refused_early_and_typed() {
    for url in ["http://idp.example/token", "http://10.0.0.1/token"] {
        assert_eq!(
            TokenRequest::json(url).unwrap_err().kind(),
            TokenErrorKind::InsecureTransport
        );
        assert_eq!(
            TokenSource::client_credentials(url, "id", "secret")
                .unwrap_err()
                .kind(),
            TokenErrorKind::InsecureTransport
        );
    }
    let source = TokenSource::client_credentials("http://127.0.0.1:9/token", "id", "secret")
        .unwrap()
        .client(TokenClient::hyper_rustls().unwrap());
    let err = CredentialCache::new(source).credential().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InsecureTransport, "{err}");
    assert_eq!(token_error(&err).kind(), TokenErrorKind::InsecureTransport);
    assert!(err.is_permanent());
    // The error names the exact call that allows it (issue 12, item 4)...
    assert!(
        err.to_string()
            .contains("call TokenSource::allow_http_loopback(true)"),
        "{err}"
    );
    // ...and that one call on the source is enough, whatever its client.
    let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
    let base = start(&idp).await;
    let source =
        TokenSource::client_credentials(&format!("{base}/oauth/token"), CLIENT_ID, CLIENT_SECRET)
            .unwrap()
            .allow_http_loopback(true);
    CredentialCache::new(source).credential().await.unwrap();
}

// --- Errors a person can act on (issue 12, item 3) ----------------------------------------

/// The five most common token failures, as an app that logs `{e}` sees them: one line
/// with the endpoint (never a secret) and the innermost useful cause; a 404 reads "not
/// found (check the token url)"; the accessors answer the common questions without
/// downcasts.
#[tokio::test]
async fn the_common_token_failures_say_what_went_wrong() {
    let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
    let base = start(&idp).await;
    let (refused, _closed) = support::refusing_port();
    let refused = format!("http://{refused}");
    let hanging = providers::serve(|_req| std::future::pending()).await;

    let failure = |source: TokenSource| async move {
        CredentialCache::new(source).credential().await.unwrap_err()
    };
    let wrong_secret = failure(
        TokenSource::client_credentials(&format!("{base}/oauth/token"), CLIENT_ID, "wrong")
            .unwrap()
            .client(token_client()),
    )
    .await;
    let wrong_url = failure(
        TokenSource::client_credentials(&format!("{base}/oauth/tokn"), CLIENT_ID, CLIENT_SECRET)
            .unwrap()
            .client(token_client()),
    )
    .await;
    let down = failure(
        TokenSource::client_credentials(&format!("{refused}/oauth/token"), "id", "secret")
            .unwrap()
            .client(token_client()),
    )
    .await;
    let slow = failure(
        TokenSource::client_credentials(&format!("http://{hanging}/oauth/token"), "id", "s")
            .unwrap()
            .client(token_client().timeout(Duration::from_millis(200))),
    )
    .await;
    idp.push_fault(Fault::Answer(Box::new(|_| {
        reply(
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_grant", "error_description": "the grant was revoked"}),
        )
    })));
    let revoked = failure(oauth_source(&base)).await;

    let shown: Vec<String> = [&wrong_secret, &wrong_url, &down, &slow, &revoked]
        .iter()
        .map(|e| e.to_string())
        .collect();
    for line in &shown {
        println!("{line}");
        assert!(!line.contains('\n'), "{line}");
        assert!(!line.contains(CLIENT_SECRET), "{line}");
    }
    assert_eq!(
        shown[0],
        format!(
            "credential source failed to fetch a credential: token endpoint {base}/oauth/token answered 401 invalid_client (Client authentication failed)"
        )
    );
    assert!(
        shown[1].contains("answered 404 not found (check the token url)"),
        "{}",
        shown[1]
    );
    assert!(
        shown[2].contains(&format!(
            "could not connect to the token endpoint {refused}/oauth/token"
        )),
        "{}",
        shown[2]
    );
    assert!(shown[3].contains("did not answer in time"), "{}", shown[3]);
    assert!(
        shown[4].contains("answered 400 invalid_grant (the grant was revoked)"),
        "{}",
        shown[4]
    );

    assert_eq!(wrong_secret.oauth_error(), Some("invalid_client"));
    assert_eq!(wrong_secret.token_status(), Some(StatusCode::UNAUTHORIZED));
    assert!(wrong_secret.is_permanent());
    assert!(wrong_url.is_permanent());
    assert!(revoked.is_permanent());
    assert!(!down.is_permanent() && !slow.is_permanent());
    assert_eq!(down.oauth_error(), None);

    // While backing off, the line still says why (the README shows this one too).
    idp.push_fault(Fault::Answer(Box::new(|_| {
        reply(StatusCode::SERVICE_UNAVAILABLE, json!({}))
    })));
    let cache = CredentialCache::new(oauth_source(&base));
    let first = cache.credential().await.unwrap_err().to_string();
    assert!(first.ends_with("/oauth/token answered 503"), "{first}");
    let backing_off = cache.credential().await.unwrap_err();
    let line = backing_off.to_string();
    assert!(
        line.starts_with("credential source is backing off after failed fetches (next attempt in ")
            && line.ends_with(&format!("token endpoint {base}/oauth/token answered 503")),
        "{line}"
    );
    assert_eq!(
        backing_off.token_status(),
        Some(StatusCode::SERVICE_UNAVAILABLE)
    );
    assert!(!backing_off.is_permanent());

    // A report that prints the chain (anyhow's `{:#}`, eyre) says each cause once: a
    // cause shown in `Display` is not also a `source()`.
    for err in [
        &wrong_secret,
        &wrong_url,
        &down,
        &slow,
        &revoked,
        &backing_off,
    ] {
        let mut report = err.to_string();
        let mut cause = std::error::Error::source(err);
        while let Some(c) = cause {
            report.push_str(&format!(": {c}"));
            cause = c.source();
        }
        let shown = err.to_string();
        assert_eq!(report, shown, "a cause printed twice");
        // The wrapped error is still there to downcast.
        assert!(err.get_ref().is_some(), "{shown}");
    }
}

/// World: one process, no store: the cache has a token from the source, then the
/// application hands over one of its own (`replace`), which the API then rejects.
/// Proves: the source refreshes; it does not hand back its last token, which the cache
/// received and the application replaced.
#[tokio::test]
async fn a_replaced_credential_is_not_handed_back_by_the_source() {
    let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
    let base = providers::start(idp.clone()).await;
    let cache = CredentialCache::builder(oauth_source(&base))
        .backoff(Duration::from_millis(1), Duration::from_millis(2))
        .build()
        .unwrap();
    let first = cache.credential().await.unwrap();
    let mine = Credential::bearer("handed-over").unwrap();
    assert!(cache.handle().replace(mine.clone()).unwrap());
    tokio::time::sleep(Duration::from_millis(10)).await;
    let next = cache.reject(&mine).await.unwrap();
    assert_ne!(
        next, first,
        "the source handed back the token the application replaced"
    );
    assert_ne!(next, mine);
    assert_eq!(idp.refresh_grants.load(SeqCst), 1);
}

/// World: an `on_refresh` hook that panics the first time it is called (a bug hit
/// once), then persists (review 113). Proves the promise "on an `Err` or a timeout the
/// pair is still held in memory and used, and the newest unconfirmed pair is offered to
/// the hook again until it takes it" for a panic too: the request gets the credential
/// the endpoint issued, and the pair is offered again and persisted. Before, the panic
/// unwound the exchange task before the pair was recorded as unconfirmed: the request
/// failed, nothing offered the pair again, and a restart resumed with no refresh token.
#[tokio::test]
async fn a_pair_the_hook_panicked_on_is_offered_again() {
    let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
    let base = start(&idp).await;
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let persisted = Arc::new(Mutex::new(Vec::<String>::new()));
    let source = oauth_source(&base).on_refresh({
        let (calls, persisted) = (calls.clone(), persisted.clone());
        move |pair| {
            let rt = pair.refresh_token().map(|s| s.expose().to_owned());
            if calls.fetch_add(1, SeqCst) == 0 {
                panic!("on_refresh hook bug, hit once");
            }
            let persisted = persisted.clone();
            async move {
                persisted.lock().unwrap().extend(rt);
                Ok::<(), &str>(())
            }
        }
    });
    let cache = tower_client_auth::CredentialCache::builder(source)
        .build()
        .unwrap();
    let first = cache.credential().await;
    assert!(
        first.is_ok(),
        "the issued credential was not the answer: {first:?}"
    );
    // Offered again after 250 ms, doubling: well within 3 s.
    for _ in 0..30 {
        if !persisted.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let persisted = persisted.lock().unwrap().clone();
    assert_eq!(
        persisted.len(),
        1,
        "the login's pair (the refresh token the source now holds) was never offered \
         again after the hook panicked (hook calls: {}, first request: {first:?})",
        calls.load(SeqCst)
    );
}
