//! A token source's own `Retry-After` hold (`TokenErrorKind::HeldBack`) against a
//! scripted endpoint (its login asks for a scope, so that a step-up can widen it): a
//! refresh token the server never acted on survives the hold, with a store and without;
//! the hold counts from the answer that asked for it; a credential nobody took is
//! handed out inside a hold a step-up's answer set (reviews 98 and 99).
#![cfg(feature = "token")]

use std::time::Duration;

use crate::support::scripted::{Idp, Scripted, settle};
use tower_client_auth::{
    CredentialCache, CredentialSource, FetchContext, FetchReason, MemoryStore, token::TokenSource,
};

/// A cache over `idp`'s source (with a `MemoryStore` if `store`) that stops waiting
/// for a fetch after 1 s, logged in once.
async fn logged_in(idp: &Idp, store: bool) -> CredentialCache<TokenSource> {
    let mut builder = CredentialCache::builder(idp.source())
        .window_jitter(0.0)
        .backoff(Duration::from_millis(100), Duration::from_millis(200))
        .fetch_timeout(Duration::from_secs(1));
    if store {
        builder = builder.store(MemoryStore::new());
    }
    let cache = builder.build().unwrap();
    cache.credential().await.unwrap();
    cache
}

/// World: a store shares the refresh token; the refresh is throttled (429
/// `Retry-After: 30`) after the cache stopped waiting (fetch timeout 1 s, answer at
/// 1.5 s); a fetch inside the hold; one after it. Proves: a refresh token the server
/// never acted on is not lost with the hold (README "never a lost refresh token"): the
/// fetch inside it is `HeldBack` with nothing held touched, and the one after presents
/// the token (review 98 saw the store's sharing rule drop it, and a second login).
#[tokio::test(start_paused = true)]
async fn a_refresh_token_held_back_by_retry_after_is_not_lost() {
    let idp = Idp::default();
    let cache = logged_in(&idp, true).await;
    idp.push(Scripted::after(
        Duration::from_millis(1500),
        429,
        Some("30"),
        r#"{"error":"slow_down"}"#,
    ));
    cache.handle().invalidate();
    let timed_out = cache.credential().await;
    assert!(timed_out.is_err(), "{timed_out:?}");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    settle().await;
    // Inside the hold: HeldBack (or the cache's own backoff).
    let held = cache.credential().await;
    assert!(held.is_err(), "{held:?}");
    eprintln!(
        "inside the hold: {:?}",
        held.as_ref().err().map(|e| e.to_string())
    );
    tokio::time::sleep(Duration::from_secs(31)).await;
    let next = cache.credential().await;
    let log = idp.log();
    assert!(next.is_ok(), "{next:?} {log:?}");
    assert_eq!(
        idp.logins(),
        1,
        "logged in again: the refresh token the server never acted on was lost: {:?}",
        log.iter().map(|l| (&l.2, &l.3, l.4)).collect::<Vec<_>>()
    );
}

/// The same without a store (no sharing): a guard.
#[tokio::test(start_paused = true)]
async fn a_refresh_token_held_back_by_retry_after_is_not_lost_without_a_store() {
    let idp = Idp::default();
    let cache = logged_in(&idp, false).await;
    idp.push(Scripted::after(
        Duration::from_millis(1500),
        429,
        Some("30"),
        r#"{"error":"slow_down"}"#,
    ));
    cache.handle().invalidate();
    assert!(cache.credential().await.is_err());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    settle().await;
    assert!(cache.credential().await.is_err());
    tokio::time::sleep(Duration::from_secs(31)).await;
    let next = cache.credential().await;
    assert!(next.is_ok(), "{next:?}");
    assert_eq!(idp.logins(), 1, "{:?}", idp.log());
}

/// World: the cache stops waiting at 1 s; the answer (503 `Retry-After: 6`) comes at
/// 5 s; the next fetch comes 2 s after the answer. Proves: the hold counts from the
/// answer that asked for it (README: a `Retry-After` "is the earliest next token
/// request"): nothing is sent inside the 6 s (review 98 saw a hold counted from the
/// request, which ended 1 s after the answer).
#[tokio::test(start_paused = true)]
async fn a_retry_after_counts_from_the_answer_that_carried_it() {
    let idp = Idp::default();
    let cache = logged_in(&idp, false).await;
    idp.push(Scripted::after(
        Duration::from_secs(5),
        503,
        Some("6"),
        r#"{"error":"temporarily_unavailable"}"#,
    ));
    cache.handle().invalidate();
    assert!(cache.credential().await.is_err());
    // The answer comes at 5 s (4 s after the timeout).
    tokio::time::sleep(Duration::from_millis(4100)).await;
    settle().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = cache.credential().await;
    let log = idp.log();
    let (_, answered, ..) = log.iter().find(|l| l.4 == 503).cloned().expect("the 503");
    let answered = answered.unwrap();
    let early: Vec<_> = log
        .iter()
        .filter(|l| l.0 >= answered && l.0 < answered + Duration::from_secs(6))
        .map(|l| (l.0 - answered, l.2.clone(), l.4))
        .collect();
    assert!(
        early.is_empty(),
        "sent before the Retry-After passed: {early:?}"
    );
}

/// Control for `a_refresh_token_held_back_by_retry_after_is_not_lost`: the same world
/// without the fetch inside the hold keeps the refresh token (so that test sees what a
/// `HeldBack` answer does to it, and nothing else).
#[tokio::test(start_paused = true)]
async fn control_without_a_fetch_inside_the_hold_the_refresh_token_is_kept() {
    let idp = Idp::default();
    let cache = logged_in(&idp, true).await;
    idp.push(Scripted::after(
        Duration::from_millis(1500),
        429,
        Some("30"),
        r#"{"error":"slow_down"}"#,
    ));
    cache.handle().invalidate();
    assert!(cache.credential().await.is_err());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    settle().await;
    tokio::time::sleep(Duration::from_secs(31)).await;
    let next = cache.credential().await;
    assert!(next.is_ok(), "{next:?}");
    assert_eq!(idp.logins(), 1, "{:?}", idp.log());
}

/// World: a refresh's answer (at-late, rt-late) arrives after the cache stopped waiting
/// (undelivered); a step-up then logs in (it neither hands out nor clears that
/// credential) and is throttled, 429 `Retry-After: 30`; two ordinary fetches follow
/// inside the hold. Proves: the first is handed at-late, which needs no request (review
/// 99 saw `HeldBack` there), and the hold stands after that hand-out: the second sends
/// nothing (the hand-out once cleared it).
#[tokio::test(start_paused = true)]
async fn an_undelivered_credential_is_handed_out_inside_a_step_ups_hold() {
    let idp = Idp::default();
    let source = idp.source();
    let first = source
        .fetch(FetchContext::new(FetchReason::Initial, None))
        .await
        .unwrap();
    // The refresh is answered at 2 s; the cache stops waiting at 1 s.
    idp.push(Scripted::after(Duration::from_secs(2), 200, None, r#"{"access_token":"at-late","refresh_token":"rt-late","token_type":"Bearer","expires_in":3600}"#));
    let timed_out = tokio::time::timeout(
        Duration::from_secs(1),
        source.fetch(FetchContext::new(
            FetchReason::Expiring,
            Some(first.clone()),
        )),
    )
    .await;
    assert!(timed_out.is_err(), "{timed_out:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    settle().await;
    // A step-up, throttled.
    idp.push(Scripted::now(429, Some("30"), r#"{"error":"slow_down"}"#));
    let stepped = source
        .fetch(
            FetchContext::new(FetchReason::StepUp, Some(first.clone()))
                .with_required_scope(Some("admin".into())),
        )
        .await;
    assert!(stepped.is_err(), "{stepped:?}");
    // The next ordinary fetch: at-late was issued and never handed out.
    let next = source
        .fetch(FetchContext::new(
            FetchReason::Expiring,
            Some(first.clone()),
        ))
        .await;
    let log: Vec<_> = idp
        .log()
        .iter()
        .map(|l| (l.2.clone(), l.3.clone(), l.4))
        .collect();
    let next = next.map_err(|e| e.to_string());
    assert!(
        next.is_ok(),
        "the credential already issued (at-late) was held back: {next:?} {log:?}"
    );
    // Handing it out sent nothing: the hold stands for the fetch after it.
    let requests = idp.log().len();
    let after = source
        .fetch(FetchContext::new(FetchReason::Expiring, next.ok()))
        .await
        .map_err(|e| e.to_string());
    assert_eq!(
        idp.log().len(),
        requests,
        "a token request inside the hold: {after:?}"
    );
    assert!(after.is_err(), "{after:?}");
}
