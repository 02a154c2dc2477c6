//! A refresh refused with a `Retry-After`, against a scripted endpoint: the hold is
//! kept (nothing sent inside it), the login the refusal calls for is owed and comes
//! after it however often the server throttles (a gateway's `Unauthorized`, HubSpot's
//! `BAD_REFRESH_TOKEN`), a `Retry-After` of zero or a past date asks for no wait, a
//! garbage one is ignored and a huge one capped, a widened login falls back to the
//! configured scope, and no refresh token is lost or presented after its rotation.
#![cfg(feature = "token")]

use crate::support;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use support::scripted::{Idp, Scripted, fetch};
use tower_client_auth::{
    BoxError, Credential, CredentialCache, CredentialSource, FetchContext, FetchReason,
    MemoryStore, clock::ManualClock, token::TokenSource,
};

/// World: the refresh token is dead, but the server says so in its own shape
/// (HubSpot's `BAD_REFRESH_TOKEN`, which the source does not take as judging it), and
/// it attaches `Retry-After: 10` to every refusal (a throttling gateway); the login
/// works. The source is asked again after each hold, five times. Proves: the login
/// the refusal calls for is owed, and comes after the first hold (README: "the login it
/// calls for is the next exchange after the hold"), with a credential.
#[tokio::test(start_paused = true)]
async fn an_unjudged_refusal_that_always_asks_for_time_still_logs_in_after_the_hold() {
    let idp = Idp::default();
    idp.rule(|grant, _, _| {
        (grant == "refresh_token").then(|| {
            Scripted::now(
                400,
                Some("10"),
                r#"{"status":"BAD_REFRESH_TOKEN","message":"missing or unknown refresh token"}"#,
            )
        })
    });
    let source = idp.source();
    let first = fetch(&source, FetchReason::Initial, None).await.unwrap();
    let mut outcomes = Vec::new();
    for _ in 0..5 {
        let got = fetch(&source, FetchReason::Expiring, Some(first.clone())).await;
        outcomes.push(got.is_ok());
        if got.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(11)).await;
    }
    assert!(
        idp.logins() >= 2 && outcomes.contains(&true),
        "never logged in again; outcomes {outcomes:?}; requests {:?}",
        idp.scoped()
    );
}

/// The same through a cache (what an app sees), with a `MemoryStore`: a minute of
/// `credential()` calls every 11 s after the access token was invalidated.
#[tokio::test(start_paused = true)]
async fn an_unjudged_refusal_that_always_asks_for_time_still_logs_in_through_a_cache() {
    let idp = Idp::default();
    idp.rule(|grant, _, _| {
        (grant == "refresh_token")
            .then(|| Scripted::now(401, Some("10"), r#"{"message":"Unauthorized"}"#))
    });
    let cache = CredentialCache::builder(idp.source())
        .window_jitter(0.0)
        .store(MemoryStore::new())
        .build()
        .unwrap();
    cache.credential().await.unwrap();
    cache.handle().invalidate();
    let mut got = cache.credential().await.map(drop);
    for _ in 0..6 {
        if got.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(11)).await;
        got = cache.credential().await.map(drop);
    }
    assert!(
        got.is_ok(),
        "no credential after a minute: {got:?}; requests {:?}",
        idp.scoped()
    );
}

/// World: the refresh is refused in words that do not judge the refresh token
/// (a gateway's 401 `{"message":"Unauthorized"}`; HubSpot's `BAD_REFRESH_TOKEN`) with
/// `Retry-After: 0`, or with an HTTP date in the past (RFC 9110: no wait), the login
/// works. Proves: no wait was asked, so the fetch logs in at once and succeeds.
#[tokio::test(start_paused = true)]
async fn an_unjudged_refusal_with_a_zero_retry_after_logs_in_at_once() {
    let mut failures = Vec::new();
    for retry_after in ["0", "Wed, 21 Oct 2015 07:28:00 GMT"] {
        for body in [
            r#"{"message":"Unauthorized"}"#,
            r#"{"status":"BAD_REFRESH_TOKEN","message":"missing or unknown refresh token"}"#,
        ] {
            let idp = Idp::default();
            let source = idp.source();
            let first = fetch(&source, FetchReason::Initial, None).await.unwrap();
            idp.push(Scripted::now(
                if body.contains("BAD") { 400 } else { 401 },
                Some(retry_after),
                body,
            ));
            let got = fetch(&source, FetchReason::Expiring, Some(first)).await;
            if got.is_err() {
                failures.push(format!(
                    "Retry-After {retry_after:?}, {body}: {:?}; requests {:?}",
                    got.as_ref().err().map(|e| e.to_string()),
                    idp.scoped()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// World: a `Retry-After` that is no number and no date. Proves: it is ignored; the
/// unjudged refusal falls through to the login at once.
#[tokio::test(start_paused = true)]
async fn an_unjudged_refusal_with_a_garbage_retry_after_logs_in_at_once() {
    for garbage in ["soon", "-1", "1.5", ""] {
        let idp = Idp::default();
        let source = idp.source();
        let first = fetch(&source, FetchReason::Initial, None).await.unwrap();
        idp.push(Scripted::now(
            401,
            Some(garbage),
            r#"{"message":"Unauthorized"}"#,
        ));
        let got = fetch(&source, FetchReason::Expiring, Some(first)).await;
        assert!(got.is_ok(), "{garbage:?}: {got:?} {:?}", idp.scoped());
        assert_eq!(idp.logins(), 2, "{garbage:?}: {:?}", idp.scoped());
    }
}

/// World: a huge `Retry-After` (u64 overflow) on an unjudged refusal. Proves: it holds
/// at most `cache::MAX_RETRY_AFTER` (5 min): nothing is sent inside it, the owed login
/// after it.
#[tokio::test(start_paused = true)]
async fn a_huge_retry_after_holds_at_most_the_cap() {
    let idp = Idp::default();
    let source = idp.source();
    let first = fetch(&source, FetchReason::Initial, None).await.unwrap();
    idp.push(Scripted::now(
        400,
        Some("99999999999999999999999"),
        r#"{"error":"slow_down"}"#,
    ));
    assert!(
        fetch(&source, FetchReason::Expiring, Some(first.clone()))
            .await
            .is_err()
    );
    let sent = idp.scoped().len();
    tokio::time::sleep(Duration::from_secs(299)).await;
    let inside = fetch(&source, FetchReason::Expiring, Some(first.clone())).await;
    assert!(inside.is_err(), "{inside:?}");
    assert_eq!(
        idp.scoped().len(),
        sent,
        "sent inside the hold: {:?}",
        idp.scoped()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = fetch(&source, FetchReason::Expiring, Some(first)).await;
    assert!(after.is_ok(), "{after:?} {:?}", idp.scoped());
    // The login that unjudged refusal called for, owed since.
    let log = idp.scoped();
    assert_eq!(log.last().unwrap().0, "client_credentials", "{log:?}");
}

/// World: a step-up widened the login's scope (`read admin`); later the refresh token
/// is refused dead and the widened login is refused `invalid_scope` with
/// `Retry-After: 30` (the client's registration lost `admin`; the endpoint attaches a
/// `Retry-After` to its refusals). Proves: the login after the hold asks for the
/// configured scope (`read`) and gets a credential; the step-up's scopes are dropped.
#[tokio::test(start_paused = true)]
async fn a_widened_login_refused_with_retry_after_asks_with_the_configured_scope_after_the_hold() {
    let idp = Idp::default();
    let source = idp.source();
    let first = fetch(&source, FetchReason::Initial, None).await.unwrap();
    let wide = source
        .fetch(
            FetchContext::new(FetchReason::StepUp, Some(first))
                .with_required_scope(Some("admin".into())),
        )
        .await
        .unwrap();
    // From now on: the refresh token is dead, and `admin` is refused, always throttled.
    idp.rule(|grant, scope, _| match grant {
        "refresh_token" => Some(Scripted::now(400, None, r#"{"error":"invalid_grant"}"#)),
        "client_credentials" if scope.is_some_and(|s| s.contains("admin")) => Some(Scripted::now(
            400,
            Some("30"),
            r#"{"error":"invalid_scope"}"#,
        )),
        _ => None,
    });
    // Refused; the configured scope is not asked at once (retry_after_custody's test).
    let _refused = fetch(&source, FetchReason::Expiring, Some(wide.clone())).await;
    let mut after = Err::<Credential, BoxError>("not asked".into());
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(31)).await;
        after = fetch(&source, FetchReason::Expiring, Some(wide.clone())).await;
        if after.is_ok() {
            break;
        }
    }
    let logins: Vec<_> = idp
        .scoped()
        .into_iter()
        .filter(|l| l.0 == "client_credentials")
        .map(|l| (l.1, l.3))
        .collect();
    assert!(
        after.is_ok(),
        "still refused after three holds: {:?}; logins (scope, status): {logins:?}",
        after.as_ref().err().map(|e| e.to_string())
    );
}

/// World: a dead refresh token (400 `invalid_grant`, `Retry-After: 30`) with an
/// `on_refresh` hook. Proves: the hook is told it is withdrawn (a pair with none) before the
/// refusal returns, and it is never presented again.
#[tokio::test(start_paused = true)]
async fn a_dead_refresh_token_refused_with_retry_after_is_withdrawn_from_the_hook() {
    let idp = Idp::default();
    let pairs = Arc::new(Mutex::new(Vec::<Option<String>>::new()));
    let seen = pairs.clone();
    let source = idp.source().on_refresh(move |pair| {
        let seen = seen.clone();
        async move {
            seen.lock()
                .unwrap()
                .push(pair.refresh_token().map(|s| s.expose().to_owned()));
        }
    });
    let first = fetch(&source, FetchReason::Initial, None).await.unwrap();
    idp.push(Scripted::now(
        400,
        Some("30"),
        r#"{"error":"invalid_grant"}"#,
    ));
    let refused = fetch(&source, FetchReason::Expiring, Some(first.clone())).await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(
        pairs.lock().unwrap().last().cloned(),
        Some(None),
        "the hook was not told the refresh token is withdrawn: {:?}",
        pairs.lock().unwrap()
    );
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert!(
        fetch(&source, FetchReason::Expiring, Some(first))
            .await
            .is_ok()
    );
    let rt1 = idp
        .scoped()
        .iter()
        .filter(|l| l.2.as_deref() == Some("rt-1"))
        .count();
    assert_eq!(rt1, 1, "{:?}", idp.scoped());
}

/// Lets `d` pass on both clocks a cache reads: Tokio's (paused) and its wall clock. The
/// fleet's hold is kept on the wall clock (processes share no other).
async fn pass(clock: &ManualClock, d: Duration) {
    clock.advance(d);
    tokio::time::sleep(d).await;
}

/// Two processes over one `MemoryStore`: a cache each over its own source for `idp`, on
/// one wall clock.
fn two_processes(idp: &Idp) -> (ManualClock, [CredentialCache<TokenSource>; 2]) {
    let store = MemoryStore::new();
    let clock = ManualClock::new(std::time::SystemTime::now());
    let build = || {
        CredentialCache::builder(idp.source())
            .window_jitter(0.0)
            .store(store.clone())
            .clock(clock.clone())
            .build()
            .unwrap()
    };
    (clock.clone(), [build(), build()])
}

/// World: a `MemoryStore` shared by two caches over two sources (two processes):
/// A's refresh is refused unjudged with `Retry-After: 30` (its refresh token marked
/// unspent); B, asked inside the hold, sends nothing; after it B refreshes first with the
/// store's rt-1 and writes rt-N. Proves: A then presents the store's newest refresh token,
/// never its own unspent rt-1 (which the server has rotated away by then).
#[tokio::test(start_paused = true)]
async fn an_unspent_refresh_token_loses_to_the_one_another_process_stored_meanwhile() {
    let idp = Idp::default();
    let (clock, [a, b]) = two_processes(&idp);
    a.credential().await.unwrap();
    b.credential().await.unwrap();
    assert_eq!(idp.logins(), 1, "{:?}", idp.scoped());
    idp.push(Scripted::now(
        401,
        Some("30"),
        r#"{"message":"Unauthorized"}"#,
    ));
    a.handle().invalidate();
    assert!(a.credential().await.is_err());
    // The fleet's hold: B sends nothing inside it.
    b.handle().invalidate();
    assert!(b.credential().await.is_err());
    assert_eq!(idp.log().len(), 2, "{:?}", idp.scoped());
    pass(&clock, Duration::from_secs(31)).await;
    // B refreshes (it presents the store's refresh token; the server rotates it).
    b.handle().invalidate();
    b.credential().await.unwrap();
    a.handle().invalidate();
    let after = a.credential().await;
    assert!(after.is_ok(), "{after:?} {:?}", idp.scoped());
    let log = idp.scoped();
    let presented: Vec<_> = log
        .iter()
        .filter(|l| l.0 == "refresh_token")
        .map(|l| l.2.clone().unwrap_or_default())
        .collect();
    // Each refresh token presented at most once (a second presentation is reuse).
    for (i, rt) in presented.iter().enumerate() {
        assert!(
            !presented[..i].contains(rt)
                || log.iter().any(|l| l.2.as_deref() == Some(rt) && l.3 == 401),
            "{rt} presented again after the server rotated it: {log:?}"
        );
    }
}

/// World: two caches over one `MemoryStore`, each
/// with its own source; A's refresh of rt-1 is refused (401 `Unauthorized`,
/// `Retry-After: 10`: owed rt-1, taken out of the store); B, asked inside the hold, sends
/// nothing; after it B logs in (rt-3) and refreshes it (not rotated); A adopts B's
/// credential, then is invalidated and fetches. Proves: A refreshes the store's rt-3 (the
/// owed mark names rt-1 only), no needless login.
#[tokio::test(start_paused = true)]
async fn an_owed_mark_does_not_outlive_its_token_in_a_fleet() {
    let idp = Idp::default();
    let (clock, [a, b]) = two_processes(&idp);
    a.credential().await.unwrap();
    idp.push(Scripted::now(
        401,
        Some("10"),
        r#"{"message":"Unauthorized"}"#,
    ));
    a.handle().invalidate();
    assert!(a.credential().await.is_err());
    assert!(
        b.credential().await.is_err(),
        "asked inside the fleet's hold"
    );
    assert_eq!(idp.log().len(), 2, "{:?}", idp.brief());
    pass(&clock, Duration::from_secs(11)).await;
    b.credential().await.unwrap();
    idp.push(Scripted::now(
        200,
        None,
        r#"{"access_token":"at-b","token_type":"Bearer","expires_in":3600}"#,
    ));
    b.handle().invalidate();
    b.credential().await.unwrap();
    a.handle().invalidate();
    a.credential().await.unwrap();
    a.handle().invalidate();
    let by_a = a.credential().await;
    let log = idp.brief();
    assert!(by_a.is_ok(), "{by_a:?} {log:?}");
    assert_eq!(
        log.last().map(|l| (l.0.as_str(), l.1.as_deref())),
        Some(("refresh_token", Some("rt-3"))),
        "{log:?}"
    );
}

/// World: an unjudged refusal with `Retry-After` through a cache, then an owed login
/// that fails. Proves: after the hold the owed login comes, and when it fails rt-1 is
/// kept (presented again next), never lost.
#[tokio::test(start_paused = true)]
async fn a_failed_owed_login_keeps_the_refresh_token() {
    let idp = Idp::default();
    let cache = CredentialCache::builder(idp.source())
        .window_jitter(0.0)
        .backoff(Duration::from_millis(100), Duration::from_millis(200))
        .store(MemoryStore::new())
        .build()
        .unwrap();
    cache.credential().await.unwrap();
    idp.push(Scripted::now(
        401,
        Some("10"),
        r#"{"message":"Unauthorized"}"#,
    ));
    cache.handle().invalidate();
    assert!(cache.credential().await.is_err());
    tokio::time::sleep(Duration::from_secs(11)).await;
    idp.push(Scripted::now(503, None, "down"));
    let _ = cache.credential().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = cache.credential().await;
    let log = idp.brief();
    assert!(got.is_ok(), "{got:?} {log:?}");
    assert_eq!(log[1].0, "refresh_token", "{log:?}");
    assert_eq!(log[2].0, "client_credentials", "{log:?}");
    assert_eq!(log[3].1.as_deref(), Some("rt-1"), "{log:?}");
}

/// World: DPoP; a refresh, then a first login, each refused `400 invalid_dpop_proof`
/// (and `use_dpop_nonce` with a nonce) with `Retry-After: 10`: the endpoint asks for ten
/// seconds, though a refused proof is otherwise sent once more with a new one at once.
/// Proves: the `Retry-After` wins: nothing is sent inside the ten seconds (review 104
/// saw the resend go at once, and no hold at all when its answer carried none).
#[cfg(feature = "jwt")]
#[tokio::test(start_paused = true)]
async fn a_refused_proof_that_asks_for_time_is_not_sent_again_inside_it() {
    for error in ["invalid_dpop_proof", "use_dpop_nonce"] {
        let body = format!(r#"{{"error":"{error}","error_description":"try later"}}"#);
        // A refresh.
        let idp = Idp::default();
        let source = idp
            .source()
            .dpop(tower_client_auth::token::DpopKey::generate().unwrap());
        let first = fetch(&source, FetchReason::Initial, None).await.unwrap();
        idp.push(Scripted::now(400, Some("10"), &body));
        assert!(
            fetch(&source, FetchReason::Expiring, Some(first))
                .await
                .is_err()
        );
        let early = idp.sent_within(Duration::from_secs(10));
        assert!(early.is_empty(), "{error}: sent inside the hold: {early:?}");
        // A first login.
        let idp = Idp::default();
        let source = idp
            .source()
            .dpop(tower_client_auth::token::DpopKey::generate().unwrap());
        idp.push(Scripted::now(400, Some("10"), &body));
        assert!(fetch(&source, FetchReason::Initial, None).await.is_err());
        assert_eq!(idp.log().len(), 1, "{error}: {:?}", idp.brief());
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(fetch(&source, FetchReason::Initial, None).await.is_err());
        assert_eq!(
            idp.log().len(),
            1,
            "{error}: sent inside the hold: {:?}",
            idp.brief()
        );
    }
}

/// World: DPoP; the first login is refused `400 invalid_dpop_proof` with
/// `Retry-After: 0`. Proves: an answer that asks for no wait is no hold: the refused
/// proof is sent once more at once, and the login succeeds.
#[cfg(feature = "jwt")]
#[tokio::test(start_paused = true)]
async fn a_refused_proof_that_asks_for_no_wait_is_sent_again_at_once() {
    let idp = Idp::default();
    let source = idp
        .source()
        .dpop(tower_client_auth::token::DpopKey::generate().unwrap());
    idp.push(Scripted::now(
        400,
        Some("0"),
        r#"{"error":"invalid_dpop_proof","error_description":"iat"}"#,
    ));
    let got = fetch(&source, FetchReason::Initial, None).await;
    assert!(got.is_ok(), "{got:?} {:?}", idp.brief());
    assert_eq!(idp.log().len(), 2, "{:?}", idp.brief());
}
