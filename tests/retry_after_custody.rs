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
    // The 503 answered the first refresh.
    let early = idp.sent_within(Duration::from_secs(6));
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
    let first = late_credential_then_step_up_hold(&idp, &source).await;
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

/// World: the refresh is refused in words that do not judge the refresh token, with
/// `Retry-After: 30`: RFC 8628's `slow_down` (400), a client lock-out (401
/// `invalid_client`), a rate limit in `invalid_request`, and a 200 carrying
/// `{"error":"slow_down"}` (GitHub's shape). Proves: the login the source falls back
/// to waits for the `Retry-After` like any token request (README: "the earliest next
/// token request"): nothing is sent within 30 s of that answer, and the fetch fails
/// with the refusal; after it, the login comes first, and its refresh token is used.
#[tokio::test(start_paused = true)]
async fn a_refusal_that_asks_for_time_holds_the_login_after_it() {
    let cases = [
        (
            400,
            r#"{"error":"slow_down","error_description":"too many requests"}"#,
        ),
        (
            401,
            r#"{"error":"invalid_client","error_description":"locked, try again later"}"#,
        ),
        (
            400,
            r#"{"error":"invalid_request","error_description":"rate limited"}"#,
        ),
        (200, r#"{"error":"slow_down"}"#),
    ];
    for (status, body) in cases {
        let idp = Idp::default();
        let source = idp.source();
        let first = source
            .fetch(FetchContext::new(FetchReason::Initial, None))
            .await
            .unwrap();
        idp.push(Scripted::now(status, Some("30"), body));
        let refreshed = source
            .fetch(FetchContext::new(
                FetchReason::Expiring,
                Some(first.clone()),
            ))
            .await;
        assert!(refreshed.is_err(), "{status} {body}: {refreshed:?}");
        // And a fetch inside the hold sends nothing either.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let inside = source
            .fetch(FetchContext::new(
                FetchReason::Expiring,
                Some(first.clone()),
            ))
            .await;
        assert!(inside.is_err(), "{status} {body}: {inside:?}");
        let early = idp.sent_within(Duration::from_secs(30));
        assert!(
            early.is_empty(),
            "{status} {body}: {early:?} {:?}",
            idp.brief()
        );
        // After it, the login the refusal called for (a refresh presented again would
        // be refused again, with every hold), and its refresh token replaces rt-1.
        tokio::time::sleep(Duration::from_secs(21)).await;
        let after = source
            .fetch(FetchContext::new(
                FetchReason::Expiring,
                Some(first.clone()),
            ))
            .await;
        assert!(after.is_ok(), "{status} {body}: {after:?}");
        let next = source
            .fetch(FetchContext::new(FetchReason::Expiring, after.ok()))
            .await;
        assert!(next.is_ok(), "{status} {body}: {next:?}");
        let log = idp.brief();
        let after_hold: Vec<_> = log[2..]
            .iter()
            .map(|l| (l.0.as_str(), l.1.as_deref()))
            .collect();
        assert_eq!(
            after_hold,
            [
                ("client_credentials", None),
                ("refresh_token", Some("rt-3"))
            ],
            "{status} {body}: {log:?}"
        );
    }
}

/// The same through a cache with a store (what an app sees): a refresh refused 400
/// `slow_down` with `Retry-After: 30`, then the cache's next fetches. Proves: no token
/// request within the 30 s; one after it.
#[tokio::test(start_paused = true)]
async fn a_refusal_that_asks_for_time_holds_the_caches_next_fetch() {
    let idp = Idp::default();
    let cache = CredentialCache::builder(idp.source())
        .window_jitter(0.0)
        .store(MemoryStore::new())
        .build()
        .unwrap();
    cache.credential().await.unwrap();
    idp.push(Scripted::now(400, Some("30"), r#"{"error":"slow_down"}"#));
    cache.handle().invalidate();
    assert!(cache.credential().await.is_err());
    tokio::time::sleep(Duration::from_secs(10)).await;
    cache.handle().invalidate();
    assert!(cache.credential().await.is_err());
    let early = idp.sent_within(Duration::from_secs(30));
    assert!(early.is_empty(), "{early:?} {:?}", idp.brief());
    tokio::time::sleep(Duration::from_secs(21)).await;
    let after = cache.credential().await;
    assert!(after.is_ok(), "{after:?} {:?}", idp.brief());
}

/// World: the refresh is refused in words that judge the refresh token dead (400
/// `invalid_grant`), with `Retry-After: 30` (a server that throttles its refusals).
/// Proves: the dead token is withdrawn at once, and the login waits for the
/// `Retry-After`: nothing within 30 s; after it, a login, never the dead token again.
#[tokio::test(start_paused = true)]
async fn a_dead_refresh_token_refused_with_retry_after_is_dropped_and_the_login_waits() {
    let idp = Idp::default();
    let source = idp.source();
    let first = source
        .fetch(FetchContext::new(FetchReason::Initial, None))
        .await
        .unwrap();
    idp.push(Scripted::now(
        400,
        Some("30"),
        r#"{"error":"invalid_grant"}"#,
    ));
    let refused = source
        .fetch(FetchContext::new(
            FetchReason::Expiring,
            Some(first.clone()),
        ))
        .await;
    assert!(refused.is_err(), "{refused:?}");
    let early = idp.sent_within(Duration::from_secs(30));
    assert!(early.is_empty(), "{early:?} {:?}", idp.brief());
    tokio::time::sleep(Duration::from_secs(31)).await;
    let after = source
        .fetch(FetchContext::new(FetchReason::Expiring, Some(first)))
        .await;
    assert!(after.is_ok(), "{after:?}");
    let log = idp.brief();
    assert_eq!(log.last().unwrap().0, "client_credentials", "{log:?}");
    assert_eq!(
        log.iter()
            .filter(|l| l.1.as_deref() == Some("rt-1"))
            .count(),
        1,
        "the dead refresh token was presented again: {log:?}"
    );
}

/// A late refresh's answer (at-late, rt-late) that nobody took, then a step-up
/// throttled 429 `Retry-After: 30`: the source holds, with at-late undelivered.
async fn late_credential_then_step_up_hold(
    idp: &Idp,
    source: &TokenSource,
) -> tower_client_auth::Credential {
    let first = source
        .fetch(FetchContext::new(FetchReason::Initial, None))
        .await
        .unwrap();
    idp.push(Scripted::after(
        Duration::from_secs(2),
        200,
        None,
        r#"{"access_token":"at-late","refresh_token":"rt-late","token_type":"Bearer","expires_in":3600}"#,
    ));
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
    idp.push(Scripted::now(429, Some("30"), r#"{"error":"slow_down"}"#));
    let stepped = source
        .fetch(
            FetchContext::new(FetchReason::StepUp, Some(first.clone()))
                .with_required_scope(Some("admin".into())),
        )
        .await;
    assert!(stepped.is_err(), "{stepped:?}");
    first
}

/// World: a late refresh's credential waits undelivered in the source when a step-up
/// is throttled (429 `Retry-After: 30`); inside that hold comes an invalidation, which
/// must not be answered with a credential it did not ask the endpoint for. Proves:
/// nothing is sent inside the hold, and after it the refresh presents the late
/// answer's refresh token (the newest), which kept its mark (README "never a lost
/// refresh token").
#[tokio::test(start_paused = true)]
async fn a_late_refresh_token_survives_an_invalidation_held_back() {
    let idp = Idp::default();
    let source = idp.source();
    let first = late_credential_then_step_up_hold(&idp, &source).await;
    let before = idp.log().len();
    let inside = source
        .fetch(FetchContext::new(
            FetchReason::Invalidated,
            Some(first.clone()),
        ))
        .await;
    assert!(inside.is_err(), "{inside:?}");
    assert_eq!(
        idp.log().len(),
        before,
        "sent inside the hold: {:?}",
        idp.brief()
    );
    tokio::time::sleep(Duration::from_secs(31)).await;
    let after = source
        .fetch(FetchContext::new(FetchReason::Expiring, Some(first)))
        .await;
    assert!(after.is_ok(), "{after:?}");
    let log = idp.brief();
    let last = log.last().unwrap();
    assert_eq!(
        (last.0.as_str(), last.1.as_deref()),
        ("refresh_token", Some("rt-late")),
        "{log:?}"
    );
}

/// World: two caches over one `TokenSource` (two layers of one app); cache A's refresh
/// is throttled 429 `Retry-After: 30`; cache B asks for its first credential right
/// after, and both ask again 10 s later. Proves: the hold is the source's, so neither
/// cache sends anything inside it; B gets a credential after it.
#[tokio::test(start_paused = true)]
async fn two_caches_over_one_source_keep_its_hold() {
    let idp = Idp::default();
    let source = std::sync::Arc::new(idp.source());
    let a = CredentialCache::builder(source.clone())
        .window_jitter(0.0)
        .build()
        .unwrap();
    let b = CredentialCache::builder(source.clone())
        .window_jitter(0.0)
        .build()
        .unwrap();
    a.credential().await.unwrap();
    idp.push(Scripted::now(429, Some("30"), r#"{"error":"slow_down"}"#));
    a.handle().invalidate();
    assert!(a.credential().await.is_err());
    let held = b.credential().await;
    assert!(held.is_err(), "{held:?}");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let _ = b.credential().await;
    let _ = a.credential().await;
    let early = idp.sent_within(Duration::from_secs(30));
    assert!(early.is_empty(), "{early:?} {:?}", idp.brief());
    tokio::time::sleep(Duration::from_secs(21)).await;
    let late = b.credential().await;
    assert!(late.is_ok(), "{late:?} {:?}", idp.brief());
}

/// World: a cache with a `MemoryStore` stops waiting for a refresh (fetch timeout 1 s)
/// that the server answers at 2 s with at-late/rt-late (rt-1, in the store, rotated
/// away); the app invalidates; the source presents rt-late and is throttled (429
/// `Retry-After: 30`: not acted on); after the hold, the next fetch. Proves: rt-late
/// is presented again (the one live refresh token), never the store's rotated rt-1.
#[tokio::test(start_paused = true)]
async fn a_late_refresh_token_throttled_after_an_invalidation_beats_the_stores_older_one() {
    let idp = Idp::default();
    let cache = CredentialCache::builder(idp.source())
        .window_jitter(0.0)
        .backoff(Duration::from_millis(100), Duration::from_millis(200))
        .fetch_timeout(Duration::from_secs(1))
        .store(MemoryStore::new())
        .build()
        .unwrap();
    cache.credential().await.unwrap();
    idp.push(Scripted::after(
        Duration::from_secs(2),
        200,
        None,
        r#"{"access_token":"at-late","refresh_token":"rt-late","token_type":"Bearer","expires_in":3600}"#,
    ));
    cache.handle().invalidate();
    assert!(cache.credential().await.is_err());
    tokio::time::sleep(Duration::from_secs(2)).await;
    settle().await;
    idp.push(Scripted::now(429, Some("30"), r#"{"error":"slow_down"}"#));
    cache.handle().invalidate();
    let throttled = cache.credential().await;
    tokio::time::sleep(Duration::from_secs(31)).await;
    let next = cache.credential().await;
    let log = idp.brief();
    let presented: Vec<_> = log
        .iter()
        .filter(|l| l.0 == "refresh_token")
        .map(|l| l.1.clone())
        .collect();
    assert!(next.is_ok(), "{next:?} {log:?}");
    assert_eq!(
        presented.last().cloned().flatten().as_deref(),
        Some("rt-late"),
        "throttled: {throttled:?}; all: {log:?}"
    );
    assert!(
        !presented[1..].contains(&Some("rt-1".to_string())),
        "the rotated rt-1 was presented again: {log:?}"
    );
}

/// World: a step-up widened the login's scope; later the refresh token is refused dead
/// and the widened login is refused `invalid_scope` with `Retry-After: 30` (the
/// registration changed, and the endpoint throttles). Proves: the source does not
/// re-send the login with its configured scope at once; the next token request waits
/// for the `Retry-After`, and then asks with the configured scope.
#[tokio::test(start_paused = true)]
async fn a_widened_login_refused_with_retry_after_is_not_resent_at_once() {
    let idp = Idp::default();
    let source = idp.source();
    let first = source
        .fetch(FetchContext::new(FetchReason::Initial, None))
        .await
        .unwrap();
    let wide = source
        .fetch(
            FetchContext::new(FetchReason::StepUp, Some(first))
                .with_required_scope(Some("admin".into())),
        )
        .await
        .unwrap();
    idp.push(Scripted::now(400, None, r#"{"error":"invalid_grant"}"#));
    idp.push(Scripted::now(
        400,
        Some("30"),
        r#"{"error":"invalid_scope"}"#,
    ));
    let refused = source
        .fetch(FetchContext::new(FetchReason::Expiring, Some(wide.clone())))
        .await;
    assert!(refused.is_err(), "{refused:?}");
    let log = idp.brief();
    assert_eq!(
        log.iter()
            .rev()
            .take_while(|l| l.0 == "client_credentials")
            .count(),
        1,
        "the login was sent again at once: {log:?}"
    );
    let early = idp.sent_within(Duration::from_secs(30));
    assert_eq!(early.len(), 1, "{early:?} {log:?}");
    tokio::time::sleep(Duration::from_secs(31)).await;
    let after = source
        .fetch(FetchContext::new(FetchReason::Expiring, Some(wide)))
        .await;
    assert!(after.is_ok(), "{after:?} {:?}", idp.brief());
}
