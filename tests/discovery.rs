//! The token endpoint found from the issuer (RFC 8414, OpenID Connect Discovery 1.0),
//! against a loopback authorization server that publishes its metadata as Keycloak and
//! Okta do (`support::providers::DiscoveryIdp`).
#![cfg(feature = "https")]

use crate::support;

use std::sync::atomic::Ordering::SeqCst;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::json;
use support::{
    api_client,
    providers::{DiscoveryIdp, reply, serve},
    token_client,
};
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, CredentialSource, FetchContext, FetchReason,
    token::{Issuer, TokenErrorKind, TokenRequest, TokenSource},
};

const ID: &str = "disc-client";
const SECRET: &str = "disc-secret";

fn source(issuer: &str) -> TokenSource {
    TokenSource::client_credentials_from_issuer(issuer, ID, SECRET)
        .unwrap()
        .client(token_client())
}

/// One token request (an invalidation: the source never hands out its last credential).
async fn fetch(source: &TokenSource) -> Result<String, TokenErrorKind> {
    match source
        .fetch(FetchContext::new(FetchReason::Invalidated, None))
        .await
    {
        Ok(credential) => Ok(format!("{credential:?}")),
        Err(e) => Err(e
            .downcast_ref::<tower_client_auth::token::TokenError>()
            .map(|e| e.kind())
            .expect("a token error")),
    }
}

/// World: an issuer with a path, publishing RFC 8414 metadata. Proves: the first
/// request through the layer finds the token endpoint there (one metadata request, at
/// RFC 8414's URL: between host and path), and the API call carries the token.
#[tokio::test]
async fn the_token_endpoint_comes_from_the_issuer() {
    let idp = DiscoveryIdp::new("/realms/acme");
    let issuer = idp.start().await;
    let api = serve(|req: Request<hyper::body::Incoming>| async move {
        let ok = req
            .headers()
            .get("authorization")
            .is_some_and(|v| v.to_str().unwrap().starts_with("Bearer disc-token-"));
        reply(
            if ok {
                StatusCode::OK
            } else {
                StatusCode::UNAUTHORIZED
            },
            json!({}),
        )
    })
    .await;
    let svc = AuthLayer::new(source(&issuer))
        .any_https_origin()
        .allow_http_loopback(true)
        .layer(api_client());
    for _ in 0..3 {
        let res = svc
            .clone()
            .oneshot(
                Request::get(format!("http://{api}/v1/x"))
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(
        *idp.metadata_requests.lock().unwrap(),
        ["/.well-known/oauth-authorization-server/realms/acme"]
    );
    assert_eq!(
        *idp.token_requests.lock().unwrap(),
        ["/realms/acme/protocol/openid-connect/token"]
    );
}

/// World: only OpenID Connect's well-known URL is served. Proves: the RFC 8414 URL's 404
/// falls back to it.
#[tokio::test]
async fn falls_back_to_openid_configuration() {
    let idp = DiscoveryIdp::new("/oauth2/default");
    idp.rfc8414.store(false, SeqCst);
    let issuer = idp.start().await;
    fetch(&source(&issuer)).await.unwrap();
    assert_eq!(
        *idp.metadata_requests.lock().unwrap(),
        [
            "/.well-known/oauth-authorization-server/oauth2/default",
            "/oauth2/default/.well-known/openid-configuration"
        ]
    );
}

/// World: metadata naming another issuer (a mix-up attack, or a misconfigured proxy).
/// Proves: a typed `Discovery` error, and no token request is sent anywhere.
#[tokio::test]
async fn metadata_for_another_issuer_is_refused() {
    let idp = DiscoveryIdp::new("/realms/acme");
    let issuer = idp.start().await;
    *idp.issuer.lock().unwrap() = format!("{issuer}-evil");
    assert_eq!(
        fetch(&source(&issuer)).await,
        Err(TokenErrorKind::Discovery)
    );
    assert!(idp.token_requests.lock().unwrap().is_empty());
    // A trailing slash is another issuer too (RFC 8414 §3.3: identical).
    *idp.issuer.lock().unwrap() = format!("{issuer}/");
    assert_eq!(
        fetch(&source(&issuer)).await,
        Err(TokenErrorKind::Discovery)
    );
    assert!(idp.token_requests.lock().unwrap().is_empty());
}

/// World: a document kept for an hour, then one that may not be kept. Proves: five
/// token requests cost one metadata request while it is fresh, and one each when it may
/// not be kept.
#[tokio::test]
async fn the_document_is_kept_for_its_cache_lifetime() {
    let idp = DiscoveryIdp::new("/t1");
    let issuer = idp.start().await;
    let kept = source(&issuer);
    for _ in 0..5 {
        fetch(&kept).await.unwrap();
    }
    assert_eq!(idp.metadata_requests.lock().unwrap().len(), 1);
    *idp.cache_control.lock().unwrap() = Some("no-store".into());
    let unkept = source(&issuer);
    for _ in 0..3 {
        fetch(&unkept).await.unwrap();
    }
    assert_eq!(idp.metadata_requests.lock().unwrap().len(), 1 + 3);
    assert_eq!(idp.token_requests.lock().unwrap().len(), 8);
}

/// World: the token endpoint moves while the old document is still fresh in the cache.
/// Proves: the old endpoint's 404 makes the source fetch the metadata again and send the
/// same request once more, to the new endpoint; the fetch succeeds.
#[tokio::test]
async fn a_moved_token_endpoint_is_found_again_after_a_404() {
    let idp = DiscoveryIdp::new("/realms/acme");
    let issuer = idp.start().await;
    let source = source(&issuer);
    fetch(&source).await.unwrap();
    *idp.token_path.lock().unwrap() = "/realms/acme/v2/token".into();
    fetch(&source).await.unwrap();
    assert_eq!(
        *idp.token_requests.lock().unwrap(),
        [
            "/realms/acme/protocol/openid-connect/token",
            "/realms/acme/protocol/openid-connect/token",
            "/realms/acme/v2/token"
        ]
    );
    assert_eq!(idp.metadata_requests.lock().unwrap().len(), 2);
}

/// World: a server that accepts client secrets only in the body. Proves: a source whose
/// client authentication was not chosen follows the metadata; one that chose Basic
/// keeps it (and the server refuses it, as a real one would).
#[tokio::test]
async fn client_authentication_follows_the_metadata_unless_chosen() {
    let idp = DiscoveryIdp::new("/realms/acme");
    *idp.auth_methods.lock().unwrap() = vec!["client_secret_post".into()];
    let issuer = idp.start().await;
    fetch(&source(&issuer)).await.unwrap();
    let chosen = TokenSource::new(
        TokenRequest::oauth2_client_credentials(&issuer, ID, SECRET)
            .unwrap()
            .client_auth(tower_client_auth::token::ClientAuth::Basic),
    )
    .issuer(Issuer::new(&issuer).unwrap())
    .client(token_client());
    assert_eq!(fetch(&chosen).await, Err(TokenErrorKind::Rejected));
}

/// World: metadata that points the token endpoint at plain http on another host.
/// Proves: refused with `InsecureTransport` before any token request.
#[tokio::test]
async fn an_insecure_token_endpoint_in_the_metadata_is_refused() {
    let idp = DiscoveryIdp::new("/realms/acme");
    *idp.token_endpoint_override.lock().unwrap() = Some("http://idp.example.com/token".into());
    let issuer = idp.start().await;
    assert_eq!(
        fetch(&source(&issuer)).await,
        Err(TokenErrorKind::InsecureTransport)
    );
    assert!(idp.token_requests.lock().unwrap().is_empty());
}

/// World: no authorization server listens at the issuer. Proves: the error is the
/// metadata's (`Discovery`), so a refresh token waiting to be sent would be kept.
#[tokio::test]
async fn an_unreachable_issuer_is_a_discovery_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let source = source(&format!("http://127.0.0.1:{port}/realms/acme"));
    assert_eq!(fetch(&source).await, Err(TokenErrorKind::Discovery));
}

/// World: a document that may not be kept, then the metadata URLs go down while the
/// token endpoint keeps working. Proves: the expired copy serves (review finding: a
/// metadata outage failed every token request).
#[tokio::test]
async fn an_expired_document_serves_while_the_metadata_is_down() {
    let idp = DiscoveryIdp::new("/realms/acme");
    *idp.cache_control.lock().unwrap() = Some("max-age=0".into());
    let issuer = idp.start().await;
    let source = source(&issuer);
    fetch(&source).await.unwrap();
    idp.metadata_down.store(true, SeqCst);
    fetch(&source).await.unwrap();
    assert_eq!(idp.token_requests.lock().unwrap().len(), 2);
}

/// Sources that differ only in their issuer get different store namespaces (review
/// finding: a placeholder URL made them share one).
#[test]
fn the_issuer_is_part_of_the_store_namespace() {
    let with = |issuer: &str| {
        TokenSource::new(
            TokenRequest::oauth2_client_credentials("https://placeholder.example", ID, SECRET)
                .unwrap(),
        )
        .issuer(Issuer::new(issuer).unwrap())
        .store_namespace("ns")
    };
    assert_ne!(with("https://a.example"), with("https://b.example"));
}

/// World: the discovery server's token endpoint, reached directly, which accepts
/// `client_secret_post` and refuses a request repeating a parameter (RFC 6749 §3.2; Okta
/// and Keycloak answer `invalid_request`). The request template began as mutual-TLS
/// client credentials (which put `client_id` in the body) and was switched to a client
/// secret sent in the body (`client_credentials` + `ClientAuth::Body`: "the last one
/// given wins"). Proves: `client_id` goes once and the token is issued. Counter: one
/// token request, answered with a token.
#[tokio::test]
async fn switching_from_mtls_to_a_secret_in_the_body_sends_client_id_once() {
    use tower_client_auth::token::ClientAuth;
    let idp = DiscoveryIdp::new("/realms/acme");
    *idp.auth_methods.lock().unwrap() = vec!["client_secret_post".into()];
    let issuer = idp.start().await;
    let token_url = format!("{issuer}/protocol/openid-connect/token");
    let source = TokenSource::new(
        TokenRequest::oauth2_client_credentials_mtls(&token_url, ID)
            .unwrap()
            .client_credentials(ID, SECRET)
            .client_auth(ClientAuth::Body),
    )
    .client(token_client());
    let result = fetch(&source).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(idp.token_requests.lock().unwrap().len(), 1);
}

/// What a token client captured of each request: its `Authorization` header and body.
type Captured = std::sync::Arc<std::sync::Mutex<Vec<(Option<String>, String)>>>;

/// A token client that records each request and answers with a token.
fn capturing() -> (tower_client_auth::token::TokenClient, Captured) {
    use http_body_util::BodyExt as _;
    let captured = Captured::default();
    let seen = captured.clone();
    let svc = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let seen = seen.clone();
        async move {
            let auth = (req.headers().get(http::header::AUTHORIZATION))
                .map(|v| v.to_str().unwrap_or("?").to_owned());
            let body = req.into_body().collect().await.unwrap().to_bytes();
            seen.lock()
                .unwrap()
                .push((auth, String::from_utf8_lossy(&body).into_owned()));
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(
                        r#"{"access_token":"at","token_type":"Bearer","expires_in":3600}"#,
                    )))
                    .unwrap(),
            )
        }
    });
    (
        tower_client_auth::token::TokenClient::from_service(svc),
        captured,
    )
}

/// Every value a form body gives `name`.
fn form_values(body: &str, name: &str) -> Vec<String> {
    form_urlencoded::parse(body.as_bytes())
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .collect()
}

/// World: three token requests, each naming the client in a `client_id` field of the
/// user's or the crate's: HTTP Basic client authentication with `field("client_id", ..)`
/// added by hand (some servers want it beside Basic); a JSON body with the secret in the
/// body (`ClientAuth::Body`) and a stale `client_id` field given before; and mutual-TLS
/// client credentials (`oauth2_client_credentials_mtls`, where the field is the only
/// thing that names the client). Proves (README: "the client authentication given last
/// sends its own `client_id`: one left as a field ... is not sent twice"; RFC 8705 §2:
/// the mTLS body carries `client_id`): Basic keeps the user's field, once; the JSON body
/// names the client once, as its authentication does; mTLS sends `client_id` once.
/// Counter: the `client_id` values each captured request carries.
#[tokio::test]
async fn client_id_is_sent_once_and_never_dropped_where_nothing_else_sends_it() {
    use tower_client_auth::token::ClientAuth;
    let url = "https://idp.test/token";
    let (client, captured) = capturing();
    let basic = TokenSource::new(
        TokenRequest::oauth2_client_credentials(url, ID, SECRET)
            .unwrap()
            .field("client_id", ID),
    )
    .client(client.clone());
    fetch(&basic).await.unwrap();
    let json_body = TokenSource::new(
        TokenRequest::json(url)
            .unwrap()
            .field("grant_type", "client_credentials")
            .field("client_id", "stale")
            .client_credentials(ID, SECRET)
            .client_auth(ClientAuth::Body),
    )
    .client(client.clone());
    fetch(&json_body).await.unwrap();
    let mtls = TokenSource::new(TokenRequest::oauth2_client_credentials_mtls(url, ID).unwrap())
        .client(client);
    let mtls_result = fetch(&mtls).await;
    let seen = captured.lock().unwrap().clone();
    // Basic: the header, and the user's field once.
    assert!(
        seen[0]
            .0
            .as_deref()
            .is_some_and(|a| a.starts_with("Basic ")),
        "{seen:?}"
    );
    assert_eq!(
        form_values(&seen[0].1, "client_id"),
        vec![ID.to_owned()],
        "{seen:?}"
    );
    // JSON with the secret in the body: one client_id, the client's.
    let body: serde_json::Value = serde_json::from_str(&seen[1].1).unwrap();
    assert_eq!(body["client_id"], ID, "{seen:?}");
    assert_eq!(seen[1].1.matches("\"client_id\"").count(), 1, "{seen:?}");
    // mTLS: client_id once (this client presents no certificate; the body is what
    // the crate builds).
    assert!(mtls_result.is_ok(), "{mtls_result:?}");
    assert_eq!(
        form_values(&seen[2].1, "client_id"),
        vec![ID.to_owned()],
        "{seen:?}"
    );
}
