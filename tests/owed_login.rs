//! The login a refresh refusal calls for, owed across a `Retry-After` hold: what the
//! `on_refresh` hook is told, an unusable answer, two fetches after the hold, DPoP's
//! `invalid_dpop_proof`, a reactive-only cache, and a step-up that does not pay it.
#![cfg(feature = "token")]

use crate::support;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use support::scripted::{Idp, Scripted, fetch};
use tower_client_auth::{CredentialSource, FetchContext, FetchReason, token::TokenSource};

type Pairs = Arc<Mutex<Vec<(Option<String>, Option<String>)>>>;

fn hooked(idp: &Idp) -> (TokenSource, Pairs) {
    let pairs: Pairs = Arc::new(Mutex::new(Vec::new()));
    let seen = pairs.clone();
    let source = idp.source().on_refresh(move |pair| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push((
                pair.access_token().map(|s| s.expose().to_owned()),
                pair.refresh_token().map(|s| s.expose().to_owned()),
            ));
        }
    });
    (source, pairs)
}

/// World: a gateway refuses the refresh with 401 `{"message":"Unauthorized"}` and
/// `Retry-After: 10`; after the hold the owed login succeeds with at-3/rt-3. An
/// `on_refresh` hook persists pairs. Proves: the hook's last pair is the login's
/// (rt-1 withdrawn, replaced by rt-3), and rt-1 is never presented again.
#[tokio::test(start_paused = true)]
async fn owed_login_tells_the_hook_the_new_pair() {
    let idp = Idp::default();
    let (source, pairs) = hooked(&idp);
    let first = fetch(&source, FetchReason::Initial, None).await.unwrap();
    idp.push(Scripted::now(
        401,
        Some("10"),
        r#"{"message":"Unauthorized"}"#,
    ));
    let refused = fetch(&source, FetchReason::Expiring, Some(first.clone())).await;
    assert!(refused.is_err(), "{refused:?}");
    tokio::time::sleep(Duration::from_secs(11)).await;
    let second = fetch(&source, FetchReason::Expiring, Some(first))
        .await
        .unwrap();
    let got = fetch(&source, FetchReason::Expiring, Some(second)).await;
    assert!(got.is_ok(), "{got:?}");
    let brief = idp.brief();
    assert_eq!(brief[2].0, "client_credentials", "{brief:?}");
    let rt1 = brief
        .iter()
        .filter(|l| l.1.as_deref() == Some("rt-1"))
        .count();
    assert_eq!(rt1, 1, "rt-1 presented again: {brief:?}");
    let pairs = pairs.lock().unwrap().clone();
    assert!(
        pairs.contains(&(Some("at-3".into()), Some("rt-3".into()))),
        "the hook never got the owed login's pair: {pairs:?}"
    );
}

/// World: as above, but the owed login's 200 answer is unusable and carries no refresh
/// token (`{"token_type":"Bearer"}`). Proves: rt-1 is kept (the login told nothing), the
/// hook is not told it is withdrawn, and the next exchange presents rt-1 (not lost).
#[tokio::test(start_paused = true)]
async fn unusable_owed_login_keeps_the_refresh_token() {
    let idp = Idp::default();
    let (source, pairs) = hooked(&idp);
    let first = fetch(&source, FetchReason::Initial, None).await.unwrap();
    idp.push(Scripted::now(
        401,
        Some("10"),
        r#"{"message":"Unauthorized"}"#,
    ));
    idp.push(Scripted::now(200, None, r#"{"token_type":"Bearer"}"#));
    assert!(
        fetch(&source, FetchReason::Expiring, Some(first.clone()))
            .await
            .is_err()
    );
    tokio::time::sleep(Duration::from_secs(11)).await;
    let unusable = fetch(&source, FetchReason::Expiring, Some(first.clone())).await;
    assert!(unusable.is_err(), "{unusable:?}");
    let got = fetch(&source, FetchReason::Expiring, Some(first)).await;
    assert!(got.is_ok(), "{got:?}");
    let brief = idp.brief();
    assert_eq!(brief[3].1.as_deref(), Some("rt-1"), "rt-1 lost: {brief:?}");
    let pairs = pairs.lock().unwrap().clone();
    assert!(
        !pairs.iter().any(|p| p.1.is_none()),
        "the hook was told rt-1 is withdrawn: {pairs:?}"
    );
}

/// World: as above, but the owed login's 200 answer is unusable (no access token) and
/// rotates to rt-3. Proves: rt-3 is kept and presented next, and the hook gets rt-3.
#[tokio::test(start_paused = true)]
async fn unusable_owed_login_with_a_refresh_token_keeps_it() {
    let idp = Idp::default();
    let (source, pairs) = hooked(&idp);
    let first = fetch(&source, FetchReason::Initial, None).await.unwrap();
    idp.push(Scripted::now(
        401,
        Some("10"),
        r#"{"message":"Unauthorized"}"#,
    ));
    idp.push(Scripted::now(
        200,
        None,
        r#"{"token_type":"Bearer","refresh_token":"rt-X"}"#,
    ));
    assert!(
        fetch(&source, FetchReason::Expiring, Some(first.clone()))
            .await
            .is_err()
    );
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert!(
        fetch(&source, FetchReason::Expiring, Some(first.clone()))
            .await
            .is_err()
    );
    let got = fetch(&source, FetchReason::Expiring, Some(first)).await;
    assert!(got.is_ok(), "{got:?}");
    let brief = idp.brief();
    assert_eq!(brief[3].1.as_deref(), Some("rt-X"), "{brief:?}");
    let pairs = pairs.lock().unwrap().clone();
    assert!(
        pairs.iter().any(|p| p.1.as_deref() == Some("rt-X")),
        "{pairs:?}"
    );
}

/// World: the refresh is refused unjudged with `Retry-After: 10`; after the hold the
/// owed login goes, and a concurrent second fetch (another caller on the same source)
/// runs beside it. Proves: rt-1 is never presented again, by either.
#[tokio::test(start_paused = true)]
async fn two_fetches_after_the_hold_never_present_rt1_again() {
    let idp = Idp::default();
    let source = idp.source();
    let first = fetch(&source, FetchReason::Initial, None).await.unwrap();
    idp.push(Scripted::now(
        401,
        Some("10"),
        r#"{"message":"Unauthorized"}"#,
    ));
    assert!(
        fetch(&source, FetchReason::Expiring, Some(first.clone()))
            .await
            .is_err()
    );
    tokio::time::sleep(Duration::from_secs(11)).await;
    idp.push(Scripted::after(
        Duration::from_secs(1),
        200,
        None,
        r#"{"access_token":"at-L","refresh_token":"rt-L","token_type":"Bearer","expires_in":3600}"#,
    ));
    let (a, b) = tokio::join!(
        fetch(&source, FetchReason::Expiring, Some(first.clone())),
        fetch(&source, FetchReason::Invalidated, Some(first.clone())),
    );
    assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
    let brief = idp.brief();
    let rt1 = brief
        .iter()
        .filter(|l| l.1.as_deref() == Some("rt-1"))
        .count();
    assert_eq!(rt1, 1, "rt-1 presented again: {brief:?}");
}

/// World: DPoP; the refresh is refused `400 invalid_dpop_proof` with `Retry-After: 10`
/// (a refresh token bound to another key). Proves: the refusal judged nothing and asked
/// for time, so the login is owed: the first request after the hold is a login, and rt-1
/// is not presented again.
#[cfg(feature = "jwt")]
#[tokio::test(start_paused = true)]
async fn invalid_dpop_proof_with_retry_after_owes_the_login() {
    let idp = Idp::default();
    let source = idp
        .source()
        .dpop(tower_client_auth::token::DpopKey::generate().unwrap());
    let first = fetch(&source, FetchReason::Initial, None).await.unwrap();
    idp.push(Scripted::now(
        400,
        Some("10"),
        r#"{"error":"invalid_dpop_proof","error_description":"key mismatch"}"#,
    ));
    let refused = fetch(&source, FetchReason::Expiring, Some(first.clone())).await;
    assert!(refused.is_err(), "{refused:?}");
    let before = idp.brief().len();
    tokio::time::sleep(Duration::from_secs(11)).await;
    let got = fetch(&source, FetchReason::Expiring, Some(first)).await;
    let brief = idp.brief();
    assert!(got.is_ok(), "{got:?} {brief:?}");
    assert_eq!(brief[before].0, "client_credentials", "{brief:?}");
}

/// World: the login's 200 answer is unusable (a token type this client does not take,
/// or an `expires_in` that is no number) and carries a new access token the request
/// never held (so `scrub` does not know it). Proves: the error's Display and Debug
/// never show the access token the answer carried.
#[tokio::test(start_paused = true)]
async fn unusable_answer_does_not_show_its_new_access_token() {
    let mut shown = Vec::new();
    for body in [
        r#"{"access_token":"NEWS3CRET","token_type":"mac","expires_in":3600}"#,
        r#"{"access_token":"NEWS3CRET","token_type":"Bearer","expires_in":"soon"}"#,
        r#"{"access_token":["NEWS3CRET"],"token_type":"Bearer"}"#,
        r#"{"token":{"access_token":"NEWS3CRET"},"token_type":"Bearer"}"#,
        r#"access_token: "NEWS3CRET""#,
    ] {
        let idp = Idp::default();
        let source = idp.source();
        idp.push(Scripted::now(200, None, body));
        let got = fetch(&source, FetchReason::Initial, None).await;
        let e = got.expect_err(body);
        let text = format!("{e} {e:?}");
        if text.contains("NEWS3CRET") {
            shown.push(format!("{body}\n  -> {text}"));
        }
    }
    assert!(shown.is_empty(), "{}", shown.join("\n"));
}

/// World: the owed login (client credentials) answers a usable pair with no refresh
/// token. Proves: the hook is told the new access token with no refresh token (rt-1
/// withdrawn), and rt-1 is never presented again.
#[tokio::test(start_paused = true)]
async fn owed_login_without_a_refresh_token_withdraws_rt1() {
    let idp = Idp::default();
    let (source, pairs) = hooked(&idp);
    let first = fetch(&source, FetchReason::Initial, None).await.unwrap();
    idp.push(Scripted::now(
        401,
        Some("10"),
        r#"{"message":"Unauthorized"}"#,
    ));
    idp.push(Scripted::now(
        200,
        None,
        r#"{"access_token":"at-L","token_type":"Bearer","expires_in":3600}"#,
    ));
    assert!(
        fetch(&source, FetchReason::Expiring, Some(first.clone()))
            .await
            .is_err()
    );
    tokio::time::sleep(Duration::from_secs(11)).await;
    let second = fetch(&source, FetchReason::Expiring, Some(first))
        .await
        .unwrap();
    let _ = fetch(&source, FetchReason::Expiring, Some(second)).await;
    let brief = idp.brief();
    let rt1 = brief
        .iter()
        .filter(|l| l.1.as_deref() == Some("rt-1"))
        .count();
    assert_eq!(rt1, 1, "rt-1 presented again: {brief:?}");
    let pairs = pairs.lock().unwrap().clone();
    assert!(
        pairs.contains(&(Some("at-L".into()), None)),
        "the hook was not told rt-1 is withdrawn: {pairs:?}"
    );
}

/// World: a cache in `RefreshMode::ReactiveOnly`; the API rejects the access token,
/// the refresh is refused unjudged with `Retry-After: 10`; after the hold the API
/// rejects again. Proves: the owed login goes (not rt-1 again), a credential comes.
#[tokio::test(start_paused = true)]
async fn reactive_only_cache_owes_the_login() {
    let idp = Idp::default();
    let cache = tower_client_auth::CredentialCache::builder(
        idp.source()
            .refresh_mode(tower_client_auth::RefreshMode::ReactiveOnly),
    )
    .window_jitter(0.0)
    .build()
    .unwrap();
    let first = cache.credential().await.unwrap();
    idp.push(Scripted::now(
        401,
        Some("10"),
        r#"{"message":"Unauthorized"}"#,
    ));
    let refused = cache.reject(&first).await.map(|_| ());
    tokio::time::sleep(Duration::from_secs(11)).await;
    let got = cache.credential().await.map(|_| ());
    let got = match got {
        Ok(()) => Ok(()),
        Err(_) => cache.reject(&first).await.map(|_| ()),
    };
    let brief = idp.brief();
    assert!(got.is_ok(), "{refused:?} {got:?} {brief:?}");
    let rt1 = brief
        .iter()
        .filter(|l| l.1.as_deref() == Some("rt-1"))
        .count();
    assert_eq!(rt1, 1, "rt-1 presented again: {brief:?}");
}

/// World: a gateway refuses every refresh with 401 `{"message":"Unauthorized"}` and
/// `Retry-After: 10` (the login the refusal calls for is owed). After the hold, the
/// first exchange is a step-up (the API asked for scope `admin`), whose login the server
/// refuses `400 invalid_scope` (the client may not have `admin`; nothing said about its
/// credentials or about the configured login). Then an ordinary fetch.
/// Proves (README: "the login it calls for is the next exchange after the hold"): a
/// step-up's login does not pay the owed one, so the ordinary fetch logs in with the
/// configured scope and succeeds; rt-1 is not presented again.
#[tokio::test(start_paused = true)]
async fn a_failed_step_up_does_not_pay_the_owed_login() {
    let idp = Idp::default();
    idp.rule(|grant, scope, _| {
        if grant == "refresh_token" {
            Some(Scripted::now(
                401,
                Some("10"),
                r#"{"message":"Unauthorized"}"#,
            ))
        } else if scope.is_some_and(|s| s.contains("admin")) {
            Some(Scripted::now(400, None, r#"{"error":"invalid_scope"}"#))
        } else {
            None
        }
    });
    let source = idp.source();
    let first = fetch(&source, FetchReason::Initial, None).await.unwrap();
    let refused = fetch(&source, FetchReason::Expiring, Some(first.clone())).await;
    assert!(refused.is_err(), "{refused:?}");
    tokio::time::sleep(Duration::from_secs(11)).await;
    let stepped = source
        .fetch(
            FetchContext::new(FetchReason::StepUp, Some(first.clone()))
                .with_required_scope(Some("admin".into())),
        )
        .await;
    assert!(stepped.is_err(), "{stepped:?}");
    let got = fetch(&source, FetchReason::Expiring, Some(first)).await;
    let scoped = idp.scoped();
    assert!(
        got.is_ok(),
        "{:?}; requests {scoped:?}",
        got.as_ref().err().map(|e| e.to_string())
    );
    let rt1 = scoped
        .iter()
        .filter(|l| l.2.as_deref() == Some("rt-1"))
        .count();
    assert_eq!(rt1, 1, "rt-1 presented again: {scoped:?}");
}
