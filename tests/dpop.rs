//! DPoP (RFC 9449) end to end, through the Tower layer (replaying and `Direct`) and the
//! reqwest middleware, against a loopback authorization server and API that verify
//! every proof as a strict server does (`support::dpop`: signature, `typ`, `alg`, JWK,
//! `htm`, `htu`, `iat`, `jti` never reused, nonce, `ath`, the token's key) and that
//! both demand a nonce, as Okta's do.
#![cfg(all(feature = "https", feature = "jwt", feature = "reqwest"))]

use crate::support;

use std::sync::{Arc, atomic::Ordering::SeqCst};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use support::{api_client, capture_traces, dpop::DpopState, token_client};
use tower::{BoxError, Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, CredentialCache, CredentialSource, FetchContext, FetchReason, NotReplayed,
    reqwest::AuthMiddleware,
    token::{DpopKey, TokenError, TokenErrorKind, TokenRequest, TokenSource},
};

fn source(token_url: &str, key: DpopKey) -> TokenSource {
    TokenSource::new(
        TokenRequest::oauth2_client_credentials(token_url, "dpop-client", "dpop-secret").unwrap(),
    )
    .client(token_client())
    .dpop(key)
}

/// The layer over a DPoP source, sending its credential to `api` only.
fn layer(token_url: &str, api: &str, key: DpopKey) -> AuthLayer<TokenSource> {
    AuthLayer::new(source(token_url, key))
        .origin(api)
        .unwrap()
        .allow_http_loopback(true)
}

/// A reqwest client whose middleware sends `source`'s credential to `api` only.
fn reqwest_client(
    source: impl CredentialSource,
    api: &str,
) -> reqwest_middleware::ClientWithMiddleware {
    let auth = AuthMiddleware::new(source)
        .origin(api)
        .unwrap()
        .allow_http_loopback(true);
    reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(auth)
        .build()
}

/// A GET through `client` to `url`, which must answer 200.
async fn get_ok(client: &reqwest_middleware::ClientWithMiddleware, url: String) {
    let res = client.get(&url).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK, "{url}");
}

async fn world() -> (Arc<DpopState>, String, String) {
    let state = DpopState::new("dpop-client", "dpop-secret");
    let (token_url, api) = state.start().await;
    (state, token_url, api)
}

/// A request through the replaying Tower layer: status, what the layer said, body.
async fn send<S>(svc: &S, request: Request<Full<Bytes>>) -> (StatusCode, Option<NotReplayed>)
where
    S: tower::Service<
            Request<Full<Bytes>>,
            Response = http::Response<hyper::body::Incoming>,
            Error = BoxError,
        > + Clone,
{
    let res = svc.clone().oneshot(request).await.unwrap();
    let answer = (res.status(), res.extensions().get::<NotReplayed>().copied());
    res.into_body().collect().await.unwrap();
    answer
}

/// World: an authorization server and an API that both demand a DPoP nonce. Proves:
/// the token request is sent once more with the nonce (2 token requests, 1 token); the
/// first API call is sent once more with the API's nonce and the same token (no second
/// token); every later call carries the kept nonce and passes at once; a query string
/// is not part of `htu`, a POST's body is sent again with its new proof; and every
/// proof the servers saw was verified (the only refusals are the two nonce requests).
#[tokio::test]
async fn the_tower_layer_proves_possession_and_answers_nonces() {
    let (state, token_url, api) = world().await;
    let layer = layer(&token_url, &api, DpopKey::generate().unwrap());
    let svc = layer.layer(api_client());
    let post = |body: &'static str| {
        Request::post(format!("{api}/v1/orders?dry_run=1"))
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    };
    assert_eq!(send(&svc, post("{\"n\":1}")).await, (StatusCode::OK, None));
    for i in 0..3 {
        let get = Request::get(format!("{api}/v1/orders/{i}?page=2"))
            .body(Full::default())
            .unwrap();
        assert_eq!(send(&svc, get).await, (StatusCode::OK, None));
    }
    assert_eq!(
        state.refusals(),
        ["token: nonce", "api: nonce"],
        "only the two nonce requests are refused"
    );
    assert_eq!(state.token_requests.load(SeqCst), 2);
    assert_eq!(state.issued.load(SeqCst), 1);
    assert_eq!(state.api_calls.load(SeqCst), 5);
    assert_eq!(state.api_accepted.load(SeqCst), 4);
    let credential = layer.cache().credential().await.unwrap();
    assert!(credential.is_bound());
    let (name, value) = credential.headers().next().unwrap();
    assert_eq!(
        (name.as_str(), value.to_str().unwrap()),
        ("authorization", "DPoP dpop-token-1")
    );
}

/// World: the API hands out a new nonce with every accepted answer. Proves: each is
/// kept from the 200 it came in, so no call after the first is refused for its nonce.
#[tokio::test]
async fn a_nonce_given_in_an_accepted_answer_is_used_next() {
    let (state, token_url, api) = world().await;
    state.rotate_api_nonce.store(true, SeqCst);
    let svc = layer(&token_url, &api, DpopKey::generate().unwrap()).layer(api_client());
    for i in 0..5 {
        let get = Request::get(format!("{api}/v1/{i}"))
            .body(Full::default())
            .unwrap();
        assert_eq!(send(&svc, get).await, (StatusCode::OK, None));
    }
    assert_eq!(state.refusals(), ["token: nonce", "api: nonce"]);
    assert_eq!(state.api_accepted.load(SeqCst), 5);
}

/// World: every token is revoked mid-run. Proves: the rejection (`invalid_token`) gets
/// a new token, and the replay carries it with a new proof (the API refuses a `jti`
/// twice, and a proof whose `ath` is another token's); one new token for the burst.
#[tokio::test]
async fn a_revoked_token_is_replaced_and_the_replay_gets_a_new_proof() {
    let (state, token_url, api) = world().await;
    let layer = layer(&token_url, &api, DpopKey::generate().unwrap());
    let svc = layer.layer(api_client());
    let get = || {
        Request::get(format!("{api}/v1/x"))
            .body(Full::default())
            .unwrap()
    };
    assert_eq!(send(&svc, get()).await, (StatusCode::OK, None));
    state.revoke_all();
    assert_eq!(send(&svc, get()).await, (StatusCode::OK, None));
    assert_eq!(state.issued.load(SeqCst), 2);
    assert_eq!(
        state.refusals(),
        ["token: nonce", "api: nonce", "api: token"],
        "the replay's proof was verified: no jti reused, ath of the new token"
    );
    assert_eq!(layer.cache().stats().replays, 2);
}

/// World: an API that wants a new nonce on every request (hostile). Proves: a request is
/// sent at most twice, the second answer goes back marked `AlreadyReplayed`, and the
/// token is not refetched for it (a nonce says nothing against the token).
#[tokio::test]
async fn an_api_that_always_wants_another_nonce_gets_two_tries() {
    let (state, token_url, api) = world().await;
    state.api_nonce_every_time.store(true, SeqCst);
    let svc = layer(&token_url, &api, DpopKey::generate().unwrap()).layer(api_client());
    let get = Request::get(format!("{api}/v1/x"))
        .body(Full::default())
        .unwrap();
    assert_eq!(
        send(&svc, get).await,
        (StatusCode::UNAUTHORIZED, Some(NotReplayed::AlreadyReplayed))
    );
    assert_eq!(state.api_calls.load(SeqCst), 2);
    assert_eq!(state.issued.load(SeqCst), 1);
}

/// World: the layer without replay (`Direct`). Proves: the proof is attached there
/// too; the `use_dpop_nonce` answer goes back marked, without a new token; its nonce is
/// kept, so the next request passes.
#[tokio::test]
async fn the_direct_layer_keeps_the_nonce_for_the_next_request() {
    let (state, token_url, api) = world().await;
    let svc = layer(&token_url, &api, DpopKey::generate().unwrap())
        .without_replay()
        .layer(support::api_client_for::<Full<Bytes>>());
    let get = || {
        Request::get(format!("{api}/v1/x"))
            .body(Full::default())
            .unwrap()
    };
    let first = svc.clone().oneshot(get()).await.unwrap();
    assert_eq!(first.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        first.extensions().get::<NotReplayed>(),
        Some(&NotReplayed::OptedOut)
    );
    let second = svc.clone().oneshot(get()).await.unwrap();
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(state.issued.load(SeqCst), 1);
    assert_eq!(state.refusals(), ["token: nonce", "api: nonce"]);
}

/// World: the same API through reqwest. Proves: the middleware hands the proof the
/// whole URI (`htu` with the path, without the query), answers the nonce request once,
/// and replays a POST body with a new proof.
#[tokio::test]
async fn the_reqwest_middleware_proves_possession_and_answers_nonces() {
    let (state, token_url, api) = world().await;
    let client = reqwest_client(source(&token_url, DpopKey::generate().unwrap()), &api);
    let res = client
        .post(format!("{api}/v1/orders?dry_run=1"))
        .body("{\"n\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    for i in 0..3 {
        get_ok(&client, format!("{api}/v1/orders/{i}?page=2")).await;
    }
    assert_eq!(state.refusals(), ["token: nonce", "api: nonce"]);
    assert_eq!(state.api_accepted.load(SeqCst), 4);
}

/// World: an API that moved a resource (307 to another path of its origin), and a
/// reqwest client that follows redirects within the origin although the docs say to
/// follow none with DPoP: reqwest's hop carries the first request's proof, made for
/// another URI, and the API refuses it. Proves: the hop's refusal is not taken for a
/// verdict on the request that was sent (a token rejected, or a proof to make again):
/// no token request, no second request, the answer comes back as it came; the token
/// keeps working.
#[tokio::test]
async fn a_followed_redirects_refusal_is_not_judged_as_the_requests() {
    let (state, token_url, api) = world().await;
    let auth = AuthMiddleware::new(source(&token_url, DpopKey::generate().unwrap()))
        .origin(&api)
        .unwrap()
        .allow_http_loopback(true);
    let follows = reqwest::Client::builder()
        .redirect(tower_client_auth::reqwest::redirect_policy())
        .build()
        .unwrap();
    let client = reqwest_middleware::ClientBuilder::new(follows)
        .with(auth)
        .build();
    get_ok(&client, format!("{api}/v1/orders/0")).await;
    let (issued, calls) = (state.issued.load(SeqCst), state.api_calls.load(SeqCst));
    let res = client.get(format!("{api}/v1/moved")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(res.url().path(), "/v1/orders/moved");
    assert_eq!(res.extensions().get::<NotReplayed>(), None);
    assert_eq!(
        state.api_calls.load(SeqCst) - calls,
        2,
        "the request and its hop, once"
    );
    assert_eq!(state.issued.load(SeqCst), issued, "no token request");
    get_ok(&client, format!("{api}/v1/orders/2")).await;
    assert_eq!(state.issued.load(SeqCst), issued);
}

/// One token request straight from the source.
async fn fetch(source: &TokenSource) -> Result<tower_client_auth::Credential, TokenError> {
    source
        .fetch(FetchContext::new(FetchReason::Invalidated, None))
        .await
        .map_err(|e| *e.downcast::<TokenError>().expect("a token error"))
}

/// World: token endpoints that refuse. Proves each is a typed error after a bounded
/// number of requests: one that wants another nonce every time (2 requests, then
/// `use_dpop_nonce`); one that refuses the key (`invalid_dpop_proof`, not mistaken for
/// a refused grant, though a refresh refused for its proof logs in again: see below).
#[tokio::test]
async fn token_endpoint_refusals_are_typed_errors() {
    let (state, token_url, _) = world().await;
    state.token_nonce_every_time.store(true, SeqCst);
    let err = fetch(&source(&token_url, DpopKey::generate().unwrap()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TokenErrorKind::Rejected);
    assert_eq!(err.oauth_error(), Some("use_dpop_nonce"));
    assert!(!err.is_grant_rejected());
    assert_eq!(state.token_requests.load(SeqCst), 2);

    let (state, token_url, _) = world().await;
    *state.registered_jkt.lock().unwrap() = Some(DpopKey::generate().unwrap().thumbprint().into());
    let err = fetch(&source(&token_url, DpopKey::generate().unwrap()))
        .await
        .unwrap_err();
    assert_eq!(err.oauth_error(), Some("invalid_dpop_proof"));
    assert!(!err.is_grant_rejected());
    assert_eq!(state.issued.load(SeqCst), 0);
    // The server echoed the proof: scrubbed from what the error shows.
    let shown = format!("{err} {err:?} {:?}", err.description());
    assert!(shown.contains("not registered"), "{shown}");
    assert!(!shown.contains("eyJ"), "the proof leaked: {shown}");
    for part in state.proofs().iter().flat_map(|proof| proof.split('.')) {
        assert!(!shown.contains(part), "a proof's part leaked: {shown}");
    }
}

/// World: a server without DPoP issues `Bearer` tokens. Proves: the token goes out as
/// a bearer token, unbound, and the API accepts it.
#[tokio::test]
async fn a_bearer_token_from_a_server_without_dpop_is_sent_as_bearer() {
    let (state, token_url, api) = world().await;
    state.bearer_only.store(true, SeqCst);
    let layer = layer(&token_url, &api, DpopKey::generate().unwrap());
    let svc = layer.layer(api_client());
    let get = Request::get(format!("{api}/v1/x"))
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&svc, get).await, (StatusCode::OK, None));
    let credential = layer.cache().credential().await.unwrap();
    assert!(!credential.is_bound());
}

/// World: a refresh-token grant with a key given as PEM (a key that outlives the
/// process). Proves: the refresh request carries a proof too (the server binds refresh
/// tokens to the key, as it does for public clients), and the key's thumbprint is
/// the one the server bound the tokens to.
#[tokio::test]
async fn a_refresh_carries_a_proof_with_the_same_key() {
    let (state, token_url, _) = world().await;
    let key = DpopKey::from_pem(include_str!("support/keys/ec-p256.pem")).unwrap();
    *state.registered_jkt.lock().unwrap() = Some(key.thumbprint().into());
    let login =
        TokenRequest::oauth2_client_credentials(&token_url, "dpop-client", "dpop-secret").unwrap();
    let refresh =
        TokenRequest::oauth2_refresh_token(&token_url, "dpop-client", "dpop-secret").unwrap();
    let source = TokenSource::new(login)
        .refresh_with(refresh, "refresh_token")
        .client(token_client())
        .dpop(key);
    let cache = CredentialCache::new(source);
    let first = cache.credential().await.unwrap();
    let second = cache.reject(&first).await.unwrap();
    assert_ne!(first, second);
    assert!(second.is_bound());
    assert_eq!(state.issued.load(SeqCst), 2);
    assert_eq!(state.refusals(), ["token: nonce"]);
}

/// World: a whole DPoP run with every trace captured. Proves: no access token, proof
/// or key material appears in any log line or `Debug` output.
#[tokio::test]
async fn no_proof_token_or_key_reaches_a_log() {
    let (traces, _guard) = capture_traces();
    let (state, token_url, api) = world().await;
    let key = DpopKey::generate().unwrap();
    let layer = layer(&token_url, &api, key.clone());
    let svc = layer.layer(api_client());
    let get = || {
        Request::get(format!("{api}/v1/x"))
            .body(Full::default())
            .unwrap()
    };
    send(&svc, get()).await;
    state.revoke_all();
    send(&svc, get()).await;
    let credential = layer.cache().credential().await.unwrap();
    let shown = format!(
        "{} {key:?} {credential:?} {:?}",
        traces.text(),
        layer.cache().source()
    );
    for secret in ["dpop-token-", "dpop-secret", "dpop-rt-"] {
        assert!(!shown.contains(secret), "{secret} leaked: {shown}");
    }
    // Each part of each proof sent, whole (a prefix such as `eyJ` also turns up by
    // chance in the key's thumbprint, about one key in 6,400).
    let proofs = state.proofs();
    assert!(proofs.len() >= 4, "{proofs:?}");
    for part in proofs.iter().flat_map(|proof| proof.split('.')) {
        assert!(!shown.contains(part), "a proof's part leaked: {shown}");
    }
}

/// World: a DPoP source given a credential store. Proves: the cache is refused when it
/// is built (a bound credential's key never leaves its process, so no other could use
/// it, and a store that could not take it would hold the fleet's lease forever).
#[tokio::test]
async fn a_dpop_source_cannot_share_through_a_store() {
    let (_, token_url, _) = world().await;
    let err = CredentialCache::builder(source(&token_url, DpopKey::generate().unwrap()))
        .store(tower_client_auth::store::MemoryStore::new())
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("store"), "{err}");
    assert!(err.to_string().contains("DPoP"), "{err}");
}

/// A loopback server answering every request with `answer()`; how many it got.
async fn answering(
    answer: fn() -> support::providers::Reply,
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = calls.clone();
    let addr = support::serve(move |_req| {
        seen.fetch_add(1, SeqCst);
        async move { answer() }
    })
    .await;
    (addr, calls)
}

/// A source of one's own handing out one DPoP-bound token (and saying it binds); how
/// many fetches it served.
fn counted_bound_source() -> (impl CredentialSource, Arc<std::sync::atomic::AtomicUsize>) {
    let key = DpopKey::generate().unwrap();
    let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = fetches.clone();
    let source = tower_client_auth::source_fn(move |_| {
        counted.fetch_add(1, SeqCst);
        let credential = key.credential("bound-token");
        async move { credential }
    })
    .binds_credentials(true);
    (source, fetches)
}

/// World: an API that asks for a nonce without giving one. Proves: nothing is sent
/// again (a resend could not carry a nonce), the credential is kept (no second token),
/// and the answer says why.
#[tokio::test]
async fn a_nonce_request_without_a_nonce_is_not_resent() {
    let (api, calls) = answering(|| {
        support::providers::challenge(StatusCode::UNAUTHORIZED, r#"DPoP error="use_dpop_nonce""#)
    })
    .await;
    let (source, fetches) = counted_bound_source();
    let svc = AuthLayer::new(source)
        .origin(format!("http://{api}").as_str())
        .unwrap()
        .allow_http_loopback(true)
        .layer(api_client());
    let get = Request::get(format!("http://{api}/v1/x"))
        .body(Full::default())
        .unwrap();
    assert_eq!(
        send(&svc, get).await,
        (StatusCode::UNAUTHORIZED, Some(NotReplayed::NoNonce))
    );
    assert_eq!(calls.load(SeqCst), 1);
    assert_eq!(fetches.load(SeqCst), 1);
}

/// World: a refresh token kept from a process with another key (a key generated at each
/// start), at servers that refuse it with `invalid_grant` and with
/// `invalid_dpop_proof`. Proves: either way the source logs in again once, instead of
/// presenting the refused refresh token on every fetch.
#[tokio::test]
async fn a_refresh_token_bound_to_another_key_falls_back_to_a_login() {
    for refusal in ["invalid_grant", "invalid_dpop_proof"] {
        let (state, token_url, _) = world().await;
        *state.refresh_key_mismatch.lock().unwrap() = refusal;
        let refresh = || {
            TokenRequest::oauth2_refresh_token(&token_url, "dpop-client", "dpop-secret").unwrap()
        };
        // The earlier process: its refresh token is bound to its key.
        let earlier = source(&token_url, DpopKey::generate().unwrap())
            .refresh_with(refresh(), "refresh_token");
        fetch(&earlier).await.unwrap();
        // This process: a new key, the kept refresh token.
        let now = source(&token_url, DpopKey::generate().unwrap())
            .refresh_with(refresh(), "refresh_token")
            .refresh_token("dpop-rt-1");
        let credential = fetch(&now).await.unwrap();
        assert!(credential.is_bound(), "{refusal}");
        assert_eq!(state.issued.load(SeqCst), 2, "{refusal}");
        assert_eq!(
            state.refusals(),
            // Each process asks for the nonce once; that resend was the refused
            // proof's new one (a token request goes at most twice).
            [
                "token: nonce",
                "token: nonce",
                "token: refresh token of another key"
            ],
            "{refusal}"
        );
    }
}

/// World: an API that refuses good proofs (`invalid_dpop_proof`): once, then twice.
/// Proves: the proof is what is refused, not the token: the request is sent once more
/// with the same token and a new proof, and passes; refused again, the answer comes back
/// marked, and no token is fetched for it either way.
#[tokio::test]
async fn a_refused_proof_gets_a_new_proof_not_a_new_token() {
    let (state, token_url, api) = world().await;
    let svc = layer(&token_url, &api, DpopKey::generate().unwrap()).layer(api_client());
    let get = || {
        Request::get(format!("{api}/v1/x"))
            .body(Full::default())
            .unwrap()
    };
    assert_eq!(send(&svc, get()).await, (StatusCode::OK, None));
    state.refuse_proofs.store(1, SeqCst);
    assert_eq!(send(&svc, get()).await, (StatusCode::OK, None));
    state.refuse_proofs.store(2, SeqCst);
    assert_eq!(
        send(&svc, get()).await,
        (StatusCode::UNAUTHORIZED, Some(NotReplayed::AlreadyReplayed))
    );
    assert_eq!(send(&svc, get()).await, (StatusCode::OK, None));
    assert_eq!(state.issued.load(SeqCst), 1, "{:?}", state.refusals());
    assert_eq!(state.api_calls.load(SeqCst), 2 + 2 + 2 + 1);
}

/// A source of one's own over a DPoP token source, saying (or not) that its credentials
/// are bound.
struct Own(TokenSource, bool);

impl CredentialSource for Own {
    async fn fetch(&self, cx: FetchContext) -> Result<tower_client_auth::Credential, BoxError> {
        self.0.fetch(cx).await
    }

    fn binds_credentials(&self) -> bool {
        self.1
    }
}

/// World: a source of one's own that returns DPoP-bound credentials. Proves: one that
/// does not say so fails its fetch with a typed error (the reqwest middleware would
/// prove for the origin alone, a store would be handed what it cannot keep), and no
/// request goes out; one that says so works through reqwest on a path below the root
/// (the proof names the whole URI); and it too is refused a store.
#[tokio::test]
async fn a_source_of_ones_own_must_say_it_binds() {
    let (state, token_url, api) = world().await;
    let undeclared = Own(source(&token_url, DpopKey::generate().unwrap()), false);
    let err = CredentialCache::new(undeclared)
        .credential()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), tower_client_auth::ErrorKind::InvalidCredential);
    assert!(err.to_string().contains("binds_credentials"), "{err}");

    let declared = || Own(source(&token_url, DpopKey::generate().unwrap()), true);
    let client = reqwest_client(declared(), &api);
    for i in 0..2 {
        get_ok(&client, format!("{api}/v1/orders/{i}?page=2")).await;
    }
    assert_eq!(state.api_accepted.load(SeqCst), 2, "{:?}", state.refusals());
    assert!(
        CredentialCache::builder(declared())
            .store(tower_client_auth::store::MemoryStore::new())
            .build()
            .is_err()
    );
}

/// World: a token endpoint that refuses one good proof (`invalid_dpop_proof`: its clock
/// stepped) while the source refreshes. Proves: the refresh is sent once more with a new
/// proof and succeeds: the refresh token is kept and used, no login.
#[tokio::test]
async fn a_refresh_refused_once_for_its_proof_is_sent_again_not_dropped() {
    let (state, token_url, _) = world().await;
    let refresh =
        TokenRequest::oauth2_refresh_token(&token_url, "dpop-client", "dpop-secret").unwrap();
    let source =
        source(&token_url, DpopKey::generate().unwrap()).refresh_with(refresh, "refresh_token");
    fetch(&source).await.unwrap();
    state.refuse_token_proofs.store(1, SeqCst);
    fetch(&source).await.unwrap();
    assert_eq!(state.issued.load(SeqCst), 2);
    assert_eq!(state.refusals(), ["token: nonce", "token: refused"]);
    assert_eq!(source.stats().refreshes, 1, "{:?}", source.stats());
}

/// World: a client without DPoP at a server that requires it (it answers a request
/// without a proof `invalid_dpop_proof`, as Okta does). Proves: that is a refused login,
/// as permanent as any (the client must be configured), not a proof problem to retry.
#[tokio::test]
async fn a_client_without_dpop_at_a_server_requiring_it_is_refused_for_good() {
    let (_, token_url, _) = world().await;
    let plain = TokenSource::new(
        TokenRequest::oauth2_client_credentials(&token_url, "dpop-client", "dpop-secret").unwrap(),
    )
    .client(token_client());
    let err = fetch(&plain).await.unwrap_err();
    assert_eq!(err.oauth_error(), Some("invalid_dpop_proof"));
    assert!(err.is_grant_rejected());
}

/// World: DPoP tokens handed in from outside, by a `RotatingCredential` and by a cache's
/// handle. Proves: a rotating source made with a bound credential says it binds, so the
/// reqwest middleware proves for the whole URI (a path and a query below the root) and
/// a rotation to a new bound token is used at once; a rotating source made with a bearer
/// token, or a cache whose source does not bind, refuses a bound credential with a typed
/// error and keeps serving what it had (it could not prove for the whole URI, and a
/// store could not keep it); nothing was refused by the API.
#[tokio::test]
async fn credentials_handed_in_from_outside_keep_the_binding_rules() {
    let (state, token_url, api) = world().await;
    let key = DpopKey::generate().unwrap();
    let tokens = source(&token_url, key);
    let first = fetch(&tokens).await.unwrap();
    let rotating = tower_client_auth::RotatingCredential::new(first);
    assert!(rotating.binds_credentials());
    let client = reqwest_client(rotating.clone(), &api);
    get_ok(&client, format!("{api}/v1/orders/1?page=2")).await;
    rotating.rotate(fetch(&tokens).await.unwrap()).unwrap();
    get_ok(&client, format!("{api}/v1/orders/2?page=2")).await;
    assert_eq!(state.api_accepted.load(SeqCst), 2, "{:?}", state.refusals());
    assert_eq!(state.issued.load(SeqCst), 2);

    let bearer = tower_client_auth::RotatingCredential::new(
        tower_client_auth::Credential::bearer("pat").unwrap(),
    );
    let cache = CredentialCache::new(bearer.clone());
    let err = bearer.rotate(fetch(&tokens).await.unwrap()).unwrap_err();
    assert!(err.to_string().contains("bound"), "{err}");
    let pat = tower_client_auth::Credential::bearer("pat").unwrap();
    assert_eq!(bearer.current(), pat);
    let err = cache
        .handle()
        .replace(fetch(&tokens).await.unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("bound"), "{err}");
    assert_eq!(cache.credential().await.unwrap(), pat);
}

/// World: a token endpoint that asks for a nonce (`use_dpop_nonce`, 400) without giving
/// one. Proves: the token request is not sent again (a resend could carry no nonce),
/// and the error says what the server said.
#[tokio::test]
async fn a_token_endpoint_asking_for_a_nonce_without_one_is_not_asked_again() {
    let (idp, calls) = answering(|| {
        support::providers::reply(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "use_dpop_nonce"}),
        )
    })
    .await;
    let tokens = source(
        &format!("http://{idp}/oauth2/token"),
        DpopKey::generate().unwrap(),
    );
    let err = fetch(&tokens).await.unwrap_err();
    assert_eq!(err.oauth_error(), Some("use_dpop_nonce"), "{err}");
    assert_eq!(calls.load(SeqCst), 1);
}

/// World: a DPoP token handed to a `StaticCredential`, at an API that demands a nonce
/// before anything else (as Okta's do). Proves: the first request is sent once more with
/// the nonce and the same token, through the Tower layer and through reqwest, as with a
/// token source: a fixed credential is not fetched again, but its proof is made again.
#[tokio::test]
async fn a_fixed_dpop_credential_answers_a_nonce_request() {
    let (state, token_url, api) = world().await;
    let tokens = source(&token_url, DpopKey::generate().unwrap());
    let fixed =
        || async { tower_client_auth::StaticCredential::new(fetch(&tokens).await.unwrap()) };
    let svc = AuthLayer::new(fixed().await)
        .origin(api.as_str())
        .unwrap()
        .allow_http_loopback(true)
        .layer(api_client());
    let get = || {
        Request::get(format!("{api}/v1/orders?page=2"))
            .body(Full::default())
            .unwrap()
    };
    assert_eq!(send(&svc, get()).await, (StatusCode::OK, None));
    assert_eq!(send(&svc, get()).await, (StatusCode::OK, None));
    let client = reqwest_client(fixed().await, &api);
    get_ok(&client, format!("{api}/v1/orders/7")).await;
    assert_eq!(state.api_accepted.load(SeqCst), 3, "{:?}", state.refusals());
    assert_eq!(state.issued.load(SeqCst), 2);
}

/// A wrapper of one's own over a `RotatingCredential` that says it binds when the
/// credential it serves is bound (asking the rotating source for it).
#[derive(Clone)]
struct AsksCurrent(tower_client_auth::RotatingCredential);

impl CredentialSource for AsksCurrent {
    async fn fetch(&self, cx: FetchContext) -> Result<tower_client_auth::Credential, BoxError> {
        self.0.fetch(cx).await
    }

    fn binds_credentials(&self) -> bool {
        self.0.current().is_bound()
    }

    fn refresh_mode(&self) -> tower_client_auth::RefreshMode {
        self.0.refresh_mode()
    }

    fn attach(&self, cache: tower_client_auth::CacheHandle) {
        self.0.attach(cache)
    }
}

/// World: a cache over a wrapper whose `binds_credentials` reads the rotating source's
/// current credential. Proves: rotating to another bound credential does not deadlock
/// (the rotating source's lock is not held while the caches are told), and the cache
/// serves the new credential.
#[tokio::test]
async fn rotating_does_not_hold_its_lock_while_caches_check_the_credential() {
    let (_state, token_url, _api) = world().await;
    let tokens = source(&token_url, DpopKey::generate().unwrap());
    let rotating = tower_client_auth::RotatingCredential::new(fetch(&tokens).await.unwrap());
    let cache = CredentialCache::new(AsksCurrent(rotating.clone()));
    cache.credential().await.unwrap();
    let next = fetch(&tokens).await.unwrap();
    // On a thread of its own, left behind if it deadlocks (the test fails, not hangs).
    let (done, rotated) = std::sync::mpsc::channel();
    std::thread::spawn({
        let (rotating, next) = (rotating.clone(), next.clone());
        move || done.send(rotating.rotate(next))
    });
    rotated
        .recv_timeout(std::time::Duration::from_secs(5))
        .expect("rotate deadlocked")
        .unwrap();
    assert_eq!(cache.credential().await.unwrap(), next);
}

/// World: a binding source behind the reqwest middleware, and a URL reqwest takes but
/// `http::Uri` cannot read (over 64 KiB). Proves: the origin rules decide first: to
/// another origin, the request goes on untouched (here to a closed loopback port: the
/// error is reqwest's own, not this crate's) and no credential is fetched; to the API's
/// origin, it is refused with a typed error (no proof can name that URI), nothing sent,
/// nothing fetched. Never an untyped error.
#[tokio::test]
async fn a_url_http_cannot_read_meets_the_origin_rules_first() {
    let (source, fetches) = counted_bound_source();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let api = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let client = reqwest_client(source, &api);
    let long = "a".repeat(70_000);
    let err = client
        .get(format!("http://127.0.0.1:1/{long}"))
        .send()
        .await
        .unwrap_err();
    assert!(
        matches!(err, reqwest_middleware::Error::Reqwest(_)),
        "{err}"
    );
    let err = client
        .get(format!("{api}/{long}"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        tower_client_auth::reqwest::auth_error(&err).map(|e| e.kind()),
        Some(tower_client_auth::ErrorKind::Proof),
        "{err}"
    );
    assert_eq!(fetches.load(SeqCst), 0);
}

/// World: a DPoP token of a short life in a `StaticCredential`, at an API that answers
/// every request `401 invalid_token` (the token was revoked). Proves what README says:
/// while the token is valid the 401 comes back marked (the refetch hands back the same
/// token); once it has expired, the next request still goes (a reactive credential goes
/// until it is rejected) and its rejection's refetch finds the token expired: it gets
/// `Expired`, the ones after it `Backoff`, and nothing more is sent.
#[tokio::test]
async fn an_expired_static_dpop_token_fails_with_a_typed_error() {
    let (api, calls) = answering(|| {
        support::providers::challenge(StatusCode::UNAUTHORIZED, r#"DPoP error="invalid_token""#)
    })
    .await;
    let key = DpopKey::generate().unwrap();
    let token = key
        .credential("revoked-token")
        .unwrap()
        .expires_in(std::time::Duration::from_millis(1500));
    let svc = AuthLayer::new(tower_client_auth::StaticCredential::new(token))
        .origin(format!("http://{api}").as_str())
        .unwrap()
        .allow_http_loopback(true)
        .layer(api_client());
    let get = || {
        Request::get(format!("http://{api}/v1/x"))
            .body(Full::default())
            .unwrap()
    };
    let (status, marked) = send(&svc, get()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        matches!(
            marked,
            Some(NotReplayed::SameCredential | NotReplayed::FreshCredentialRejected)
        ),
        "{marked:?}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1600)).await;
    let before = calls.load(SeqCst);
    let mut kinds = Vec::new();
    for _ in 0..3 {
        match svc.clone().oneshot(get()).await {
            Ok(res) => kinds.push(format!(
                "{} {:?}",
                res.status(),
                res.extensions().get::<NotReplayed>()
            )),
            Err(err) => kinds.push(format!(
                "{:?}",
                err.downcast_ref::<tower_client_auth::Error>()
                    .map(|e| e.kind())
            )),
        }
    }
    // The first is still sent (a reactive credential goes until it is rejected); its
    // rejection's refetch finds the token expired.
    assert_eq!(kinds, ["Some(Expired)", "Some(Backoff)", "Some(Backoff)"]);
    assert_eq!(calls.load(SeqCst) - before, 1);
}

/// What the strict servers may refuse in a run where they change nonces, refuse proofs
/// and revoke tokens at random: a stale nonce, a revoked or expired token, a proof they
/// chose to refuse. Anything else (a `jti` sent twice, a proof for another token, key or
/// URL, a bound token sent as a bearer one) is the client's fault.
const EXPECTED_REFUSALS: [&str; 4] = ["api: nonce", "api: token", "api: refused", "token: nonce"];

/// World: one cache of DPoP-bound tokens (living 1 s) shared by the replaying Tower
/// layer and the reqwest middleware, six tasks sending through them while, at random,
/// the API's nonce changes with every accepted answer, either server asks for a new
/// nonce, the API refuses a proof, every token is revoked, and the application
/// invalidates or rejects the credential; four seeds (`DPOP_CHAOS_SEEDS=4..40` for more).
/// (A token endpoint refusing a proof
/// fails the fetch, as it should: `tests/dpop.rs` has it on its own.) Proves: every refusal the servers logged is one
/// the chaos explains (never a proof sent twice, made for another token or key, or a
/// bound token sent without its proof), no request fails with an error or hangs, and
/// afterwards both entry points get a 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_nonces_refusals_and_revocations_never_make_the_client_send_a_bad_proof() {
    for seed in support::Dice::seeds("DPOP_CHAOS_SEEDS", 0..4) {
        let (state, token_url, api) = world().await;
        state.expires_in.store(1, SeqCst);
        let dice = support::Dice::new(seed);
        let cache = CredentialCache::builder(source(&token_url, DpopKey::generate().unwrap()))
            .backoff(
                std::time::Duration::from_millis(5),
                std::time::Duration::from_millis(50),
            )
            .build()
            .unwrap();
        let svc = AuthLayer::with_cache(cache.clone())
            .origin(&api)
            .unwrap()
            .allow_http_loopback(true)
            .layer(api_client());
        let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
            .with(
                AuthMiddleware::with_cache(cache.clone())
                    .origin(&api)
                    .unwrap()
                    .allow_http_loopback(true),
            )
            .build();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let meddling = tokio::spawn({
            let (state, dice, done, cache) =
                (state.clone(), dice.clone(), done.clone(), cache.clone());
            async move {
                while !done.load(SeqCst) {
                    dice.pause(20).await;
                    match dice.roll(10) {
                        0 => {
                            let flip = !state.rotate_api_nonce.load(SeqCst);
                            state.rotate_api_nonce.store(flip, SeqCst);
                        }
                        1 => {
                            *state.api_nonce.lock().unwrap() =
                                format!("rs-chaos-{}", dice.roll(1 << 20))
                        }
                        2 => {
                            *state.token_nonce.lock().unwrap() =
                                format!("as-chaos-{}", dice.roll(1 << 20))
                        }
                        3 => {
                            state.refuse_proofs.fetch_add(1, SeqCst);
                        }
                        5 => state.revoke_all(),
                        6 => {
                            if let Ok(current) = cache.credential().await {
                                cache.handle().invalidate_if(&current);
                            }
                        }
                        7 => {
                            if let Ok(current) = cache.credential().await {
                                let _ = cache.reject(&current).await;
                            }
                        }
                        _ => {}
                    }
                }
            }
        });
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for task in 0..6 {
            let (svc, client, dice, api) = (svc.clone(), client.clone(), dice.clone(), api.clone());
            let failures = failures.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..60 {
                    let url = format!("{api}/v1/orders/{task}-{i}");
                    let sent = async {
                        if task % 2 == 0 {
                            let req = Request::get(&url).body(Full::default()).unwrap();
                            let res = svc.clone().oneshot(req).await?;
                            let status = res.status();
                            res.into_body().collect().await?;
                            Ok::<_, BoxError>(status)
                        } else {
                            Ok(client.get(&url).send().await?.status())
                        }
                    };
                    match tokio::time::timeout(std::time::Duration::from_secs(10), sent).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(err)) => failures.lock().unwrap().push(format!("{url}: {err}")),
                        Err(_) => failures.lock().unwrap().push(format!("{url}: hung")),
                    }
                    dice.pause(10).await;
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        done.store(true, SeqCst);
        meddling.await.unwrap();
        let unexpected: Vec<_> = state
            .refusals()
            .into_iter()
            .filter(|why| !EXPECTED_REFUSALS.contains(&why.as_str()))
            .collect();
        assert!(unexpected.is_empty(), "seed {seed}: {unexpected:?}");
        let refusals = state.refusals();
        eprintln!(
            "seed {seed}: {} refusals ({} nonce, {} token, {} refused), {} token requests, {} api calls",
            refusals.len(),
            refusals.iter().filter(|r| r.ends_with("nonce")).count(),
            refusals.iter().filter(|r| *r == "api: token").count(),
            refusals.iter().filter(|r| r.ends_with("refused")).count(),
            state.token_requests.load(SeqCst),
            state.api_calls.load(SeqCst)
        );
        // The one failure the chaos explains: the token endpoint's nonce changed again
        // between its demand and the fetch's one retry with it (a fetch answers a nonce
        // demand once), so the fetch failed, and the requests waiting for it, or coming
        // during its backoff, got that error.
        let unexplained: Vec<_> = std::mem::take(&mut *failures.lock().unwrap())
            .into_iter()
            .filter(|f| !f.contains("answered 400 use_dpop_nonce"))
            .collect();
        assert!(unexplained.is_empty(), "seed {seed}: {unexplained:?}");
        // The chaos over: both entry points are served within a few tries, each after
        // the backoff's longest step. A try may come back 401: a stale API nonce costs
        // its one resend, and a token revoked at the end rejects that resend (a request
        // is sent at most twice); a token rejected young refetches as the backoff allows.
        state.rotate_api_nonce.store(false, SeqCst);
        for entry in ["tower", "reqwest"] {
            let mut answers = Vec::new();
            for _ in 0..5 {
                tokio::time::sleep(std::time::Duration::from_millis(60)).await;
                let url = format!("{api}/v1/last");
                let status = match entry {
                    "tower" => {
                        send(&svc, Request::get(url).body(Full::default()).unwrap())
                            .await
                            .0
                    }
                    _ => client.get(url).send().await.unwrap().status(),
                };
                answers.push(status);
                if status == StatusCode::OK {
                    break;
                }
            }
            assert_eq!(
                answers.last(),
                Some(&StatusCode::OK),
                "seed {seed}, {entry}: {answers:?}"
            );
        }
    }
}

/// World: an API (a mock) that asks for a nonce and gives one; the service clone the
/// resend goes through waits for readiness (a concurrency limit, a balancer), and
/// meanwhile the credential is invalidated. Proves: the resend does not carry the
/// dropped credential: it takes the cache's credential as it is once the service is
/// ready, with a proof made then, carrying the nonce.
#[tokio::test]
async fn a_nonce_resend_does_not_send_a_credential_dropped_while_its_service_gets_ready() {
    use tower_client_auth::ReplayBody;
    type Req = Request<ReplayBody<Full<Bytes>>>;
    let (mock, mut api) = tower_test::mock::pair::<Req, http::Response<&'static str>>();
    let key = DpopKey::generate().unwrap();
    let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = fetches.clone();
    let source = tower_client_auth::source_fn(move |_| {
        let n = counted.fetch_add(1, SeqCst) + 1;
        let credential = key.credential(&format!("bound-{n}"));
        async move { credential }
    })
    .binds_credentials(true);
    let layer = AuthLayer::new(source).any_https_origin();
    let cache = layer.cache().clone();
    let request = Request::get("https://api.example.com/v1/x")
        .body(Full::<Bytes>::default())
        .unwrap();
    let call = tokio::spawn(layer.layer(mock).oneshot(request));
    let authorization = |req: &Req| {
        req.headers()[http::header::AUTHORIZATION]
            .to_str()
            .unwrap()
            .to_owned()
    };
    let (req, respond) = api.next_request().await.unwrap();
    assert_eq!(authorization(&req), "DPoP bound-1");
    api.allow(0);
    respond.send_response(
        http::Response::builder()
            .status(401)
            .header("www-authenticate", r#"DPoP error="use_dpop_nonce""#)
            .header("dpop-nonce", "nonce-1")
            .body("")
            .unwrap(),
    );
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert!(cache.handle().invalidate(), "nothing to invalidate");
    api.allow(1);
    let (req, respond) = api.next_request().await.unwrap();
    assert_eq!(
        authorization(&req),
        "DPoP bound-2",
        "the resend sent a dropped credential"
    );
    let proof = req.headers()["dpop"].to_str().unwrap();
    let claims = proof.split('.').nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, claims).unwrap(),
    )
    .unwrap();
    assert_eq!(claims["nonce"], "nonce-1", "{claims}");
    respond.send_response(http::Response::builder().status(200).body("").unwrap());
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
    assert_eq!(fetches.load(SeqCst), 2);
}

/// The API's answer asking for a nonce, and giving `nonce-1`.
fn nonce_please() -> http::Response<&'static str> {
    http::Response::builder()
        .status(401)
        .header("www-authenticate", r#"DPoP error="use_dpop_nonce""#)
        .header("dpop-nonce", "nonce-1")
        .body("")
        .unwrap()
}

/// The request the mock-API tests below send.
fn api_get() -> Request<Full<Bytes>> {
    Request::get("https://api.example.com/v1/x")
        .body(Full::<Bytes>::default())
        .unwrap()
}

/// The `Authorization` header a request reached the API with.
fn authorization<B>(req: &Request<B>) -> http::HeaderValue {
    req.headers()[http::header::AUTHORIZATION].clone()
}

/// The API's answer refusing the token (`invalid_token`).
fn invalid_token() -> http::Response<&'static str> {
    http::Response::builder()
        .status(401)
        .header("www-authenticate", r#"DPoP error="invalid_token""#)
        .body("")
        .unwrap()
}

/// A source of DPoP-bound tokens `bound-1`, `bound-2`, ... (one key), each issued now
/// on `clock` for 600 s; the fetches after the first `good` fail (`idp down`).
fn clocked_bound_source(
    clock: &tower_client_auth::clock::ManualClock,
    good: usize,
) -> impl CredentialSource {
    let (clock, fetches) = (clock.clone(), std::sync::atomic::AtomicUsize::new(0));
    let key = DpopKey::generate().unwrap();
    tower_client_auth::source_fn(move |_| {
        let n = fetches.fetch_add(1, SeqCst) + 1;
        let now = tower_client_auth::clock::Clock::now(&clock);
        let credential = key.credential(&format!("bound-{n}")).map(|c| {
            c.issued_at(now)
                .expires_at(now + std::time::Duration::from_secs(600))
        });
        async move {
            if n > good {
                return Err::<tower_client_auth::Credential, BoxError>("idp down".into());
            }
            Ok(credential?)
        }
    })
    .binds_credentials(true)
}

/// The `nonce` claim of the request's DPoP proof.
fn proof_nonce<B>(req: &Request<B>) -> serde_json::Value {
    let proof = req.headers()["dpop"].to_str().unwrap();
    let claims = proof.split('.').nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, claims).unwrap(),
    )
    .unwrap();
    claims["nonce"].clone()
}

/// World: while a request's first attempt is out, its credential is replaced (another
/// token of the same key handed over, or a token of a new key: the key rotated) or
/// invalidated; the API then asks for a nonce, and answers the resend 401
/// `invalid_token`. Proves: the resend carries the cache's credential as it is then,
/// with the nonce (the server's, whichever key proves it), never the one replaced or
/// dropped; and it counts as a replay after a rejection: its 401 leaves that credential
/// to the next request's rejection (no invalidation, no fetch for it).
#[tokio::test]
async fn a_nonce_resend_after_a_replacement_or_a_drop_goes_as_a_replay() {
    use tower_client_auth::ReplayBody;
    type Req = Request<ReplayBody<Full<Bytes>>>;
    for (dropped, new_key) in [(false, false), (false, true), (true, false)] {
        let (mock, mut api) = tower_test::mock::pair::<Req, http::Response<&'static str>>();
        let key = DpopKey::generate().unwrap();
        let handed_key = match new_key {
            true => DpopKey::generate().unwrap(),
            false => key.clone(),
        };
        let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let source = {
            let (key, counted) = (key.clone(), fetches.clone());
            tower_client_auth::source_fn(move |_| {
                let n = counted.fetch_add(1, SeqCst) + 1;
                let credential = key.credential(&format!("bound-{n}"));
                async move { credential }
            })
            .binds_credentials(true)
        };
        let layer = AuthLayer::new(source).any_https_origin();
        let cache = layer.cache().clone();
        let call = tokio::spawn(layer.layer(mock).oneshot(api_get()));
        let (req, respond) = api.next_request().await.unwrap();
        assert_eq!(authorization(&req), "DPoP bound-1");
        let (expected, fetched) = if dropped {
            assert!(cache.handle().invalidate());
            ("DPoP bound-2", 2)
        } else {
            let handed = handed_key.credential("handed").unwrap();
            assert!(cache.handle().replace(handed).unwrap());
            ("DPoP handed", 1)
        };
        respond.send_response(nonce_please());
        let (req, respond) = api.next_request().await.unwrap();
        assert_eq!(authorization(&req), expected, "dropped: {dropped}");
        assert_eq!(
            proof_nonce(&req),
            "nonce-1",
            "dropped: {dropped}, new key: {new_key}"
        );
        respond.send_response(invalid_token());
        let res = call.await.unwrap().unwrap();
        assert_eq!(res.status(), 401);
        assert_eq!(
            res.extensions().get::<NotReplayed>(),
            Some(&NotReplayed::AlreadyReplayed)
        );
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert_eq!(cache.stats().rejections, 0, "dropped: {dropped}");
        assert_eq!(fetches.load(SeqCst), fetched, "dropped: {dropped}");
        let current = cache.credential().await.unwrap();
        let expected = expected.strip_prefix("DPoP ").unwrap();
        assert_eq!(current, handed_key.credential(expected).unwrap());
    }
}

/// World: a request's first attempt is out when the machine sleeps past its token's
/// expiry (the wall clock jumps, the monotonic clock does not); the API then asks for a
/// nonce. Proves: the resend does not carry the expired token: it waits for a new one.
#[tokio::test]
async fn a_nonce_resend_after_a_suspend_does_not_send_an_expired_token() {
    use std::time::{Duration, SystemTime};
    use tower_client_auth::{ReplayBody, clock::ManualClock};
    type Req = Request<ReplayBody<Full<Bytes>>>;
    let (mock, mut api) = tower_test::mock::pair::<Req, http::Response<&'static str>>();
    let clock = ManualClock::new(SystemTime::now());
    let cache = CredentialCache::builder(clocked_bound_source(&clock, usize::MAX))
        .clock(clock.clone())
        .build()
        .unwrap();
    let layer = AuthLayer::with_cache(cache).any_https_origin();
    let call = tokio::spawn(layer.layer(mock).oneshot(api_get()));
    let (req, respond) = api.next_request().await.unwrap();
    assert_eq!(authorization(&req), "DPoP bound-1");
    clock.advance(Duration::from_secs(3600));
    respond.send_response(nonce_please());
    let (req, respond) = api.next_request().await.unwrap();
    assert_eq!(
        authorization(&req),
        "DPoP bound-2",
        "the resend carried a token expired on the wall clock"
    );
    assert_eq!(proof_nonce(&req), "nonce-1");
    respond.send_response(http::Response::builder().status(200).body("").unwrap());
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
}

/// World: a source of 600 s DPoP tokens on a manual wall clock; a request's service
/// clone waits for readiness (a concurrency limit) while the machine sleeps an hour
/// (the wall clock jumps, the monotonic clock and every timer stand still). Three
/// waits: the first attempt's, after waiting for its first token; a replay's, after a
/// 401; a nonce resend's. Proves: none sends the token that expired meanwhile: each
/// looks at the wall clock once ready, and takes a new token.
#[tokio::test]
async fn a_suspend_while_the_service_gets_ready_never_sends_an_expired_token() {
    use std::time::{Duration, SystemTime};
    use tower::Service;
    use tower_client_auth::{ReplayBody, clock::ManualClock};
    type Req = Request<ReplayBody<Full<Bytes>>>;
    for wait in ["first attempt", "replay", "nonce resend"] {
        let (mock, mut api) = tower_test::mock::pair::<Req, http::Response<&'static str>>();
        let clock = ManualClock::new(SystemTime::now());
        let cache = CredentialCache::builder(clocked_bound_source(&clock, usize::MAX))
            .clock(clock.clone())
            .build()
            .unwrap();
        let layer = AuthLayer::with_cache(cache).any_https_origin();
        let settle = || async {
            for _ in 0..50 {
                tokio::task::yield_now().await;
            }
        };
        let mut svc = layer.layer(mock);
        svc.ready().await.unwrap();
        if wait == "first attempt" {
            // The clone that sends once the token is there waits for readiness.
            api.allow(0);
        }
        let call = tokio::spawn(svc.call(api_get()));
        let expected = if wait == "first attempt" {
            "DPoP bound-2"
        } else {
            let (req, respond) = api.next_request().await.unwrap();
            assert_eq!(authorization(&req), "DPoP bound-1");
            api.allow(0);
            if wait == "replay" {
                respond.send_response(invalid_token());
                "DPoP bound-3"
            } else {
                respond.send_response(nonce_please());
                "DPoP bound-2"
            }
        };
        settle().await;
        clock.advance(Duration::from_secs(3600));
        api.allow(1);
        let (req, respond) = api.next_request().await.unwrap();
        assert_eq!(
            authorization(&req),
            expected,
            "{wait}: sent a token that expired while the service got ready"
        );
        respond.send_response(http::Response::builder().status(200).body("").unwrap());
        assert_eq!(call.await.unwrap().unwrap().status(), 200, "{wait}");
    }
}

/// World: a fixed DPoP token (`StaticCredential`) that expires while a request is out;
/// the API asks for a nonce, then answers the resend 401 `invalid_token`. Proves: as
/// README's row for such a token says, the resend goes with it (a reactive credential
/// goes until it is rejected), its 401 counts as its rejection, and nothing more is sent
/// with it: the next request fails `Expired` without reaching the API.
#[tokio::test]
async fn an_expired_fixed_dpop_token_rejected_on_its_nonce_resend_is_sent_no_more() {
    use std::time::{Duration, SystemTime};
    use tower_client_auth::{ErrorKind, ReplayBody, StaticCredential, clock::ManualClock};
    type Req = Request<ReplayBody<Full<Bytes>>>;
    let (mock, mut api) = tower_test::mock::pair::<Req, http::Response<&'static str>>();
    let clock = ManualClock::new(SystemTime::now());
    let now = tower_client_auth::clock::Clock::now(&clock);
    let token = DpopKey::generate()
        .unwrap()
        .credential("fixed")
        .unwrap()
        .issued_at(now)
        .expires_at(now + Duration::from_secs(600));
    let cache = CredentialCache::builder(StaticCredential::new(token))
        .clock(clock.clone())
        .build()
        .unwrap();
    let svc = AuthLayer::with_cache(cache.clone())
        .any_https_origin()
        .layer(mock);
    let get = || api_get();
    let call = tokio::spawn(svc.clone().oneshot(get()));
    let (_, respond) = api.next_request().await.unwrap();
    clock.advance(Duration::from_secs(3600));
    respond.send_response(nonce_please());
    let (req, respond) = api.next_request().await.unwrap();
    assert_eq!(req.headers()[http::header::AUTHORIZATION], "DPoP fixed");
    respond.send_response(invalid_token());
    let res = call.await.unwrap().unwrap();
    assert_eq!(
        res.extensions().get::<NotReplayed>(),
        Some(&NotReplayed::AlreadyReplayed)
    );
    assert_eq!(cache.stats().rejections, 1);
    let next = tokio::spawn(svc.clone().oneshot(get()));
    let answer = tokio::select! {
        answer = next => answer.unwrap(),
        Some((req, _)) = api.next_request() => {
            panic!("the rejected, expired token was sent again: {:?}", req.headers())
        }
    };
    let err = answer.expect_err("answered without a token");
    let err = err.downcast::<tower_client_auth::Error>().unwrap();
    assert!(
        matches!(err.kind(), ErrorKind::Expired | ErrorKind::Backoff),
        "{err}"
    );
}

/// World: a 600 s DPoP token in its hard window while a failed refresh backs off (the
/// cache keeps sending a token that has not expired rather than nothing); the API asks
/// for a nonce, then answers the resend 401 `invalid_token`. Proves: the resend goes
/// with that token as a new proof's resend, so its 401 counts as the token's rejection,
/// and the next request does not send it again.
#[tokio::test]
async fn a_nonce_resend_of_a_token_kept_through_a_backoff_counts_its_rejection() {
    use std::time::{Duration, SystemTime};
    use tower_client_auth::{ReplayBody, clock::ManualClock};
    type Req = Request<ReplayBody<Full<Bytes>>>;
    let (mock, mut api) = tower_test::mock::pair::<Req, http::Response<&'static str>>();
    let clock = ManualClock::new(SystemTime::now());
    let cache = CredentialCache::builder(clocked_bound_source(&clock, 1))
        .clock(clock.clone())
        .window_jitter(0.0)
        .backoff(Duration::from_secs(300), Duration::from_secs(600))
        .build()
        .unwrap();
    let svc = AuthLayer::with_cache(cache.clone())
        .any_https_origin()
        .layer(mock);
    let get = || api_get();
    let ok = || http::Response::builder().status(200).body("").unwrap();
    let settle = || async {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    };
    let call = tokio::spawn(svc.clone().oneshot(get()));
    let (_, respond) = api.next_request().await.unwrap();
    respond.send_response(ok());
    call.await.unwrap().unwrap();
    // Into the hard window: a request waits for the refresh, which fails, and goes with
    // the token still valid; the cache backs off.
    clock.advance(Duration::from_secs(590));
    let call = tokio::spawn(svc.clone().oneshot(get()));
    let (req, respond) = api.next_request().await.unwrap();
    assert_eq!(authorization(&req), "DPoP bound-1");
    respond.send_response(ok());
    call.await.unwrap().unwrap();
    settle().await;
    assert_eq!(cache.stats().fetch_failures, 1);
    let call = tokio::spawn(svc.clone().oneshot(get()));
    let (_, respond) = api.next_request().await.unwrap();
    respond.send_response(nonce_please());
    let (req, respond) = api.next_request().await.unwrap();
    assert_eq!(authorization(&req), "DPoP bound-1");
    respond.send_response(invalid_token());
    let res = call.await.unwrap().unwrap();
    assert_eq!(
        res.extensions().get::<NotReplayed>(),
        Some(&NotReplayed::AlreadyReplayed)
    );
    settle().await;
    assert_eq!(
        cache.stats().rejections,
        1,
        "the resend's 401 was not counted"
    );
    let next = tokio::spawn(svc.clone().oneshot(get()));
    let answer = tokio::select! {
        answer = next => answer.unwrap(),
        Some((req, _)) = api.next_request() => {
            panic!("the rejected token was sent again: {:?}", req.headers())
        }
    };
    assert!(answer.is_err(), "answered without a token");
}

/// World: a request's token is invalidated while its first attempt is out, and the
/// source then fails; the API asks for a nonce. Proves what README says: the resend
/// waits for the cache's refresh, whose failure fails the request as a replay's does,
/// and nothing more reaches the API.
#[tokio::test]
async fn a_nonce_resend_whose_refresh_fails_fails_the_request() {
    use std::time::SystemTime;
    use tower_client_auth::{ErrorKind, ReplayBody, clock::ManualClock};
    type Req = Request<ReplayBody<Full<Bytes>>>;
    let (mock, mut api) = tower_test::mock::pair::<Req, http::Response<&'static str>>();
    let clock = ManualClock::new(SystemTime::now());
    let cache = CredentialCache::builder(clocked_bound_source(&clock, 1))
        .clock(clock.clone())
        .build()
        .unwrap();
    let layer = AuthLayer::with_cache(cache.clone()).any_https_origin();
    let call = tokio::spawn(layer.layer(mock).oneshot(api_get()));
    let (req, respond) = api.next_request().await.unwrap();
    assert_eq!(authorization(&req), "DPoP bound-1");
    assert!(cache.handle().invalidate());
    respond.send_response(nonce_please());
    let err = call.await.unwrap().expect_err("answered without a token");
    let err = err.downcast::<tower_client_auth::Error>().unwrap();
    assert_eq!(err.kind(), ErrorKind::Fetch, "{err}");
    let next = futures_util::FutureExt::now_or_never(api.next_request());
    assert!(
        !matches!(next, Some(Some(_))),
        "a request without a token reached the API"
    );
}

/// World: every fetch brings a token bound to a key of its own (the keys rotate). A
/// request's first attempt is answered with a nonce request (a resend) or a 401 that
/// gives a nonce (a replay); while the resend's service gets ready, its credential is
/// dropped, so it takes the cache's on a second look: a token of yet another key.
/// Proves: that token proves with the server's nonce too.
#[tokio::test]
async fn a_second_look_credential_of_another_key_carries_the_servers_nonce() {
    use tower_client_auth::ReplayBody;
    type Req = Request<ReplayBody<Full<Bytes>>>;
    for first_answer in ["nonce resend", "replay"] {
        let (mock, mut api) = tower_test::mock::pair::<Req, http::Response<&'static str>>();
        let source = tower_client_auth::source_fn({
            let fetches = std::sync::atomic::AtomicUsize::new(0);
            move |_| {
                let n = fetches.fetch_add(1, SeqCst) + 1;
                let credential = DpopKey::generate()
                    .unwrap()
                    .credential(&format!("bound-{n}"));
                async move { credential }
            }
        })
        .binds_credentials(true);
        let layer = AuthLayer::new(source).any_https_origin();
        let cache = layer.cache().clone();
        let call = tokio::spawn(layer.layer(mock).oneshot(api_get()));
        let (req, respond) = api.next_request().await.unwrap();
        assert_eq!(authorization(&req), "DPoP bound-1");
        api.allow(0);
        let expected = if first_answer == "nonce resend" {
            respond.send_response(nonce_please());
            "DPoP bound-2"
        } else {
            let mut answer = invalid_token();
            answer
                .headers_mut()
                .insert("dpop-nonce", http::HeaderValue::from_static("nonce-1"));
            respond.send_response(answer);
            "DPoP bound-3"
        };
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        assert!(cache.handle().invalidate());
        api.allow(1);
        let (req, respond) = api.next_request().await.unwrap();
        assert_eq!(authorization(&req), expected, "{first_answer}");
        assert_eq!(proof_nonce(&req), "nonce-1", "{first_answer}");
        respond.send_response(http::Response::builder().status(200).body("").unwrap());
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }
}

/// World: two requests go out with `bound-1` (one key). The API answers the first 401
/// `invalid_token` giving `nonce-1`; while its replay's service gets ready, the second
/// is answered 200 giving `nonce-2` (the server rotated its nonce). Proves (RFC 9449
/// §8: the client uses the latest nonce the server gave): the replay proves with
/// `nonce-2`, not the older one of the answer that caused it.
#[tokio::test]
async fn a_replay_does_not_prove_with_a_nonce_older_than_the_servers_latest() {
    use tower_client_auth::{ReplayBody, clock::ManualClock};
    type Req = Request<ReplayBody<Full<Bytes>>>;
    let (mock, mut api) = tower_test::mock::pair::<Req, http::Response<&'static str>>();
    let clock = ManualClock::new(std::time::SystemTime::now());
    let cache = CredentialCache::builder(clocked_bound_source(&clock, 10))
        .clock(clock.clone())
        .build()
        .unwrap();
    let layer = AuthLayer::with_cache(cache).any_https_origin();
    let svc = layer.layer(mock);
    let first = tokio::spawn(svc.clone().oneshot(api_get()));
    let (req1, respond1) = api.next_request().await.unwrap();
    let second = tokio::spawn(svc.clone().oneshot(api_get()));
    let (req2, respond2) = api.next_request().await.unwrap();
    assert_eq!(authorization(&req1), "DPoP bound-1");
    assert_eq!(authorization(&req2), "DPoP bound-1");
    api.allow(0);
    let mut answer = invalid_token();
    answer
        .headers_mut()
        .insert("dpop-nonce", http::HeaderValue::from_static("nonce-1"));
    respond1.send_response(answer);
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    respond2.send_response(
        http::Response::builder()
            .status(200)
            .header("dpop-nonce", "nonce-2")
            .body("")
            .unwrap(),
    );
    assert_eq!(second.await.unwrap().unwrap().status(), 200);
    api.allow(1);
    let (req, respond) = api.next_request().await.unwrap();
    assert_eq!(authorization(&req), "DPoP bound-2");
    assert_eq!(
        proof_nonce(&req),
        "nonce-2",
        "the replay proved with the nonce of an older answer"
    );
    respond.send_response(http::Response::builder().status(200).body("").unwrap());
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
}

/// World: the source's tokens alternate between two keys (a rotation with an overlap:
/// `bound-1` and `bound-3` of key A, `bound-2` of key B). `bound-1` is answered 200
/// giving `nonce-0`; then the cache is invalidated, and `bound-2` is answered 401
/// `invalid_token` giving `nonce-1` (the server rotated its nonce). Proves: the replay,
/// with `bound-3` (key A), proves with `nonce-1`, the server's latest, not the `nonce-0`
/// key A kept from an older answer.
#[tokio::test]
async fn a_replay_of_a_key_holding_an_older_nonce_proves_with_the_latest() {
    use tower_client_auth::ReplayBody;
    type Req = Request<ReplayBody<Full<Bytes>>>;
    let (mock, mut api) = tower_test::mock::pair::<Req, http::Response<&'static str>>();
    let keys = [DpopKey::generate().unwrap(), DpopKey::generate().unwrap()];
    let source = tower_client_auth::source_fn({
        let fetches = std::sync::atomic::AtomicUsize::new(0);
        move |_| {
            let n = fetches.fetch_add(1, SeqCst) + 1;
            let credential = keys[(n + 1) % 2].credential(&format!("bound-{n}"));
            async move { credential }
        }
    })
    .binds_credentials(true);
    let layer = AuthLayer::new(source).any_https_origin();
    let cache = layer.cache().clone();
    let svc = layer.layer(mock);
    let first = tokio::spawn(svc.clone().oneshot(api_get()));
    let (req, respond) = api.next_request().await.unwrap();
    assert_eq!(authorization(&req), "DPoP bound-1");
    respond.send_response(
        http::Response::builder()
            .status(200)
            .header("dpop-nonce", "nonce-0")
            .body("")
            .unwrap(),
    );
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    assert!(cache.handle().invalidate());
    let second = tokio::spawn(svc.clone().oneshot(api_get()));
    let (req, respond) = api.next_request().await.unwrap();
    assert_eq!(authorization(&req), "DPoP bound-2");
    let mut answer = invalid_token();
    answer
        .headers_mut()
        .insert("dpop-nonce", http::HeaderValue::from_static("nonce-1"));
    respond.send_response(answer);
    let (req, respond) = api.next_request().await.unwrap();
    assert_eq!(authorization(&req), "DPoP bound-3");
    let nonce = proof_nonce(&req);
    respond.send_response(http::Response::builder().status(200).body("").unwrap());
    let _ = second.await;
    assert_eq!(
        nonce, "nonce-1",
        "the replay proved with an older nonce than the one its 401 gave"
    );
}

/// Runs a hook (once) when the event whose message contains `at` is logged: places an
/// interleaving at a point the code logs, deterministically.
struct Interleave {
    at: &'static str,
    hook: Hook,
}

/// What [`Interleave`] runs, once.
type Hook = Arc<std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>>;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Interleave {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" {
                    self.0 = format!("{v:?}");
                }
            }
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        if message.0.contains(self.at) {
            let hook = self.hook.lock().unwrap().take();
            if let Some(hook) = hook {
                hook();
            }
        }
    }
}

/// World: request A is answered 401 `use_dpop_nonce` with `nonce-1`; between its key
/// keeping `nonce-1` and its resend being built, request B (same key and origin, run on
/// another thread at that moment, as another worker would) is answered 200 with
/// `nonce-2`, the server's latest. Proves (review finding: the resend's answer was
/// stamped when the resend was built, after B's nonce, so A's carried `nonce-1` went
/// over `nonce-2`): the next request C proves with `nonce-2`.
#[tokio::test]
async fn a_nonce_given_while_a_resend_is_built_is_not_overwritten_by_its_older_one() {
    use std::sync::Mutex;
    use tower_client_auth::ReplayBody;
    use tracing_subscriber::layer::SubscriberExt as _;

    let seen: Arc<Mutex<Vec<(String, serde_json::Value)>>> = Arc::default();
    let a_tries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let inner = tower::service_fn({
        let (seen, a_tries) = (seen.clone(), a_tries.clone());
        move |req: Request<ReplayBody<Full<Bytes>>>| {
            let which = req.headers()["x-which"].to_str().unwrap().to_owned();
            seen.lock()
                .unwrap()
                .push((which.clone(), proof_nonce(&req)));
            let res = match which.as_str() {
                "a" if a_tries.fetch_add(1, SeqCst) == 0 => nonce_please(),
                "b" => http::Response::builder()
                    .status(200)
                    .header("dpop-nonce", "nonce-2")
                    .body("")
                    .unwrap(),
                _ => http::Response::builder().status(200).body("").unwrap(),
            };
            async move { Ok::<_, BoxError>(res) }
        }
    });
    let key = DpopKey::generate().unwrap();
    let source = tower_client_auth::source_fn(move |_| {
        let credential = key.credential("bound-1");
        async move { credential }
    })
    .binds_credentials(true);
    let svc = AuthLayer::new(source).any_https_origin().layer(inner);
    let req = |which: &str| {
        Request::get("https://api.example.com/v1/x")
            .header("x-which", which)
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    // The cache warmed, so that B, on its own runtime, needs no fetch.
    assert_eq!(
        svc.clone().oneshot(req("warm")).await.unwrap().status(),
        200
    );
    let hook: Hook = Arc::default();
    let (svc_b, b) = (svc.clone(), req("b"));
    *hook.lock().unwrap() = Some(Box::new(move || {
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    assert_eq!(svc_b.oneshot(b).await.unwrap().status(), 200);
                })
        })
        .join()
        .unwrap();
    }));
    let interleave = Interleave {
        at: "wants a DPoP nonce",
        hook: hook.clone(),
    };
    support::keep_call_sites_live();
    let _guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(interleave));
    assert_eq!(svc.clone().oneshot(req("a")).await.unwrap().status(), 200);
    assert!(hook.lock().unwrap().is_none(), "the hook never ran");
    assert_eq!(svc.clone().oneshot(req("c")).await.unwrap().status(), 200);
    let seen = seen.lock().unwrap().clone();
    let c = seen.iter().find(|(w, _)| w == "c").unwrap();
    assert_eq!(
        c.1, "nonce-2",
        "the server's latest nonce (B's, given after A's) was overwritten by A's carried one: {seen:?}"
    );
}
