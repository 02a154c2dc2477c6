//! Who holds a refresh token after an exchange fails, with a shared store: the token
//! source's `unspent` mark (this source's alone) after a refusal that does not judge the
//! refresh token, an unusable answer that rotated, and a step-up between (review 86).
#![cfg(feature = "https")]

mod support;

use std::{sync::Arc, sync::atomic::Ordering::SeqCst, time::Duration};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use support::{
    providers::{self, Incoming},
    strict_idp::{Fault, StrictIdp},
};
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, CredentialCache, MemoryStore,
    token::{TokenRequest, TokenSource},
};

const CLIENT_ID: &str = "custody-client";
const CLIENT_SECRET: &str = "custody-5ecr3t";

/// The strict server at `/oauth/token`; `/scoped` answers `403 insufficient_scope`
/// (scope `w`) whatever the token; every other path is the strict server's API.
async fn start(idp: &Arc<StrictIdp>) -> String {
    let idp = idp.clone();
    let addr = providers::serve(move |req| {
        let idp = idp.clone();
        async move {
            let req = providers::read(req).await;
            if req.path == "/scoped" {
                return providers::challenge(
                    StatusCode::FORBIDDEN,
                    r#"Bearer error="insufficient_scope", scope="w""#,
                );
            }
            use support::providers::Provider;
            idp.handle(req)
        }
    })
    .await;
    format!("http://{addr}")
}

/// Client credentials (scope `r`, so a step-up can widen it) to log in, the refresh
/// grant after: the rotating source of `strict_idp`, with a scope.
fn source(base: &str) -> TokenSource {
    let url = format!("{base}/oauth/token");
    TokenSource::new(
        TokenRequest::oauth2_client_credentials(&url, CLIENT_ID, CLIENT_SECRET)
            .unwrap()
            .scope("r"),
    )
    .refresh_with(
        TokenRequest::oauth2_refresh_token(&url, CLIENT_ID, CLIENT_SECRET).unwrap(),
        "refresh_token",
    )
    .client(support::token_client())
}

fn cache(base: &str, store: Option<&MemoryStore>) -> CredentialCache<TokenSource> {
    let builder = CredentialCache::builder(source(base))
        .backoff(Duration::from_millis(10), Duration::from_millis(10));
    match store {
        Some(store) => builder.store(store.clone()).build().unwrap(),
        None => builder.build().unwrap(),
    }
}

fn refused_invalid_client() -> Fault {
    Fault::Answer(Box::new(|_: &Incoming| {
        providers::reply(
            StatusCode::UNAUTHORIZED,
            json!({"error": "invalid_client", "error_description": "Client authentication failed"}),
        )
    }))
}

fn line(idp: &StrictIdp) -> String {
    format!(
        "presented {:?}; refresh grants {}; logins {}; reused {}; families revoked {}",
        idp.presented.lock().unwrap(),
        idp.refresh_grants.load(SeqCst),
        idp.logins.load(SeqCst),
        idp.reused_refresh_tokens.load(SeqCst),
        idp.family_revocations.load(SeqCst),
    )
}

/// World: a rotating server whose answer to a refresh rotates (spends the presented
/// refresh token, issues a new one in the body) and is unusable all the same: a 200
/// saying `invalid_client` next to the new refresh token (an unjudged refusal, 6e607bc's
/// path; the login after it is refused too, the client's secret rotated on one side
/// first), or a 200 with no access token (no login: the plain unusable-answer path).
/// Then the next fetch, once the server works again.
/// Proves: a failed login "leaves held what was held before it (the presented token, or
/// the one a 2xx answer rotated to)"; README "the newest always replaces the old ... so a
/// rotation followed by an unusable body loses nothing", and "never a lost refresh
/// token". Without a store the rotated token is presented by the next fetch (the
/// control); with a store (`MemoryStore`, one process) it is too (review 86: with a
/// store it was dropped for a login, on both paths).
#[tokio::test]
async fn a_rotated_refresh_token_held_after_a_failed_exchange_is_not_lost_with_a_store() {
    tokio::time::timeout(Duration::from_secs(60), async {
        type Make = fn(&str) -> Value;
        let cases: [(&str, Make, bool); 2] = [
            (
                "200 invalid_client with the rotated token, login refused",
                |rt| json!({"error": "invalid_client", "refresh_token": rt}),
                true,
            ),
            (
                "200 without an access token, the rotated token in it",
                |rt| json!({"refresh_token": rt, "token_type": "Bearer"}),
                false,
            ),
        ];
        let mut broken = Vec::new();
        for (what, make, login_refused) in cases {
            for with_store in [false, true] {
                let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
                let base = start(&idp).await;
                let store = MemoryStore::new();
                let cache = cache(&base, with_store.then_some(&store));
                let first = cache.credential().await.unwrap();
                idp.push_fault(Fault::RotateThenBody(make));
                if login_refused {
                    idp.push_fault(refused_invalid_client());
                }
                let failed = cache.reject(&first).await.map(|_| ());
                tokio::time::sleep(Duration::from_millis(50)).await;
                let next = cache.credential().await.map(|_| ());
                let line = format!(
                    "{what}, store {with_store}: reject {:?}, next {:?}; {}; stats {:?}",
                    failed.map_err(|e| e.to_string()),
                    next.map_err(|e| e.to_string()),
                    line(&idp),
                    cache.source().stats()
                );
                println!("{line}");
                let presented = idp.presented.lock().unwrap().clone();
                // The refresh token the failed exchange rotated to is presented next.
                if presented.len() != 2 || idp.logins.load(SeqCst) != 1 {
                    broken.push(format!("the rotated refresh token was lost: {line}"));
                }
            }
        }
        assert!(broken.is_empty(), "{}", broken.join("\n"));
    })
    .await
    .expect("the scenario hung");
}

/// A GET of `url` through `svc`: its status.
async fn get<S>(svc: &S, url: String) -> StatusCode
where
    S: tower::Service<
            Request<Full<Bytes>>,
            Response = http::Response<hyper::body::Incoming>,
            Error = tower_client_auth::BoxError,
        > + Clone,
{
    let res = svc
        .clone()
        .oneshot(Request::get(url).body(Full::default()).unwrap())
        .await
        .unwrap();
    let status = res.status();
    res.into_body().collect().await.unwrap();
    status
}

/// World: two processes (A, B: caches with sources of their own) sharing one
/// `MemoryStore`, in front of the strict, rotating, family-revoking server.
/// 1. A logs in (refresh token T1 in the store).
/// 2. A's access token is rejected; its refresh (T1, taken out of the store) is refused
///    `401 invalid_client` and so is the login after it (a client secret rotated on
///    one side first): T1 stays held, marked unspent.
/// 3. B logs in (its pair in the store); A takes B's credential from the store.
/// 4. The API asks A for a wider scope: A's step-up logs in, and its credential, with
///    the step-up login's refresh token L, goes to the store.
/// 5. B's access token is rejected twice (the first time it takes A's from the store):
///    B takes L out of the store and presents it; the server rotates it, and the
///    answer is lost (a gateway's 502): B drops L and logs in, a login that now brings
///    no refresh token; the store holds B's credential without one.
/// 6. A's access token is rejected twice likewise: A's refresh finds none in the store.
/// Proves: README "no refresh token is ever presented twice (zero family revocations)"
/// and "with a store, that refresh token (taken out of the store before it was
/// presented) is presented by this process's next refresh when the store holds none":
/// the mark was T1's and does not pass to L (review 86: A presented L, which B had spent).
#[tokio::test]
async fn an_unspent_mark_left_by_a_failed_login_outlives_a_step_up() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let idp = StrictIdp::new(CLIENT_ID, CLIENT_SECRET, 3600.0);
        let base = start(&idp).await;
        let store = MemoryStore::new();
        let (a, b) = (cache(&base, Some(&store)), cache(&base, Some(&store)));
        let settle = || tokio::time::sleep(Duration::from_millis(50));

        // 1.
        let a1 = a.credential().await.unwrap();
        // 2.
        idp.push_fault(refused_invalid_client());
        idp.push_fault(refused_invalid_client());
        let step2 = a.reject(&a1).await.map(|_| ()).map_err(|e| e.to_string());
        settle().await;
        // 3.
        let b1 = b.credential().await.unwrap();
        let a2 = a.credential().await.unwrap();
        let step3 = (a2 == b1, idp.logins.load(SeqCst));
        // 4.
        let stepping_up = AuthLayer::with_cache(a.clone())
            .any_https_origin()
            .allow_http_loopback(true)
            .step_up(true)
            .layer(support::api_client());
        let step4 = get(&stepping_up, format!("{base}/scoped")).await;
        let logins_after_step_up = idp.logins.load(SeqCst);
        settle().await;
        // 5.
        idp.issue_refresh_tokens.store(false, SeqCst);
        idp.push_fault(Fault::RotateThenLose(Some(StatusCode::BAD_GATEWAY)));
        let b2 = b.reject(&b1).await.unwrap();
        // Past the backoff for a credential rejected right after it was issued.
        settle().await;
        let b3 = b.reject(&b2).await.map_err(|e| e.to_string());
        settle().await;
        // 6.
        let a3 = a.credential().await.unwrap();
        let a4 = a.reject(&a3).await.map(|_| ()).map_err(|e| e.to_string());
        let a4 = match a4 {
            // The store's credential taken first (B's): rejected in turn.
            Ok(()) => {
                settle().await;
                let now = a.credential().await.unwrap();
                a.reject(&now).await.map(|_| ()).map_err(|e| e.to_string())
            }
            failed => failed,
        };
        let line = format!(
            "step 2 {step2:?}; step 3 (A took B's, logins) {step3:?}; step 4 {step4}, logins {logins_after_step_up}; step 5 {:?}; step 6 {a4:?}; {}; A {:?}; B {:?}",
            b3.map(|_| ()),
            line(&idp),
            a.source().stats(),
            b.source().stats()
        );
        println!("{line}");
        assert_eq!(idp.reused_refresh_tokens.load(SeqCst), 0, "{line}");
        assert_eq!(idp.family_revocations.load(SeqCst), 0, "{line}");
    })
    .await
    .expect("the scenario hung");
}
