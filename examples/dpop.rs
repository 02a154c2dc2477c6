//! DPoP (RFC 9449): sender-constrained tokens. The token is bound to a key pair the
//! client holds; each request carries a fresh proof signed with it, so a stolen token is
//! useless without the key. Both servers here demand a nonce, as Okta's do: the first
//! token request and the first API call are answered `use_dpop_nonce`, and sent once
//! more with it; every later request carries the nonce kept.
//!
//! `cargo run --example dpop --features jwt` (starts its own authorization server and
//! API on loopback; both verify every proof: signature, `htm`, `htu`, `iat`, `jti`
//! never seen, the nonce, and at the API the token's hash and key).
use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use http_body_util::Full;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde_json::{Value, json};
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, BoxError, ReplayBody,
    token::{DpopKey, TokenRequest, TokenSource},
};

// --- the code to copy: `api` is your API's base URL, `token_url` your token endpoint ---
async fn call_the_api(api: &str, token_url: &str) -> Result<(), BoxError> {
    // A key made now lives as long as the process; `DpopKey::from_pem` for one that
    // outlives it.
    let login = TokenRequest::oauth2_client_credentials(token_url, "ledger-app", "s3cret")?;
    let source = TokenSource::new(login)
        .dpop(DpopKey::generate()?)
        .allow_http_loopback(true); // loopback demo only
    let client = AuthLayer::new(source)
        .origin(api)? // the credential goes to this origin only
        .allow_http_loopback(true) // loopback demo only: production is https-only
        .layer(Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>());
    for path in ["/v1/ledger?page=1", "/v1/ledger?page=2", "/v1/balance"] {
        let req = Request::get(format!("{api}{path}")).body(Full::default())?;
        let res = client.clone().oneshot(req).await?;
        println!("GET {path}: {}", res.status());
        if res.status() != StatusCode::OK {
            return Err(format!("GET {path} answered {}", res.status()).into());
        }
    }
    Ok(())
}
// ---------------------------------------------------------------------------------------

mod support;

/// One server in two roles, on two origins (each with its own nonce): `/token` issues
/// DPoP tokens bound to the proof's key; everything else is the API.
struct Server {
    role: &'static str,
    base: Mutex<String>,
    nonce: &'static str,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// token → thumbprint of the key it is bound to
    tokens: Mutex<Vec<(String, String)>>,
    seen_jti: Mutex<HashSet<String>>,
    token_requests: support::Count,
    api_calls: support::Count,
    nonce_requests: support::Count,
}

impl support::Api for Server {
    fn answer(&self, _: &support::Req) -> (StatusCode, Value) {
        unreachable!("answer_with_headers is the one called")
    }

    fn answer_with_headers(&self, req: &support::Req) -> (StatusCode, Value, HeaderMap) {
        let mut headers = HeaderMap::new();
        let htu = format!("{}{}", self.base.lock().unwrap(), req.path);
        let token = req
            .header(header::AUTHORIZATION)
            .and_then(|a| a.strip_prefix("DPoP "))
            .map(str::to_owned);
        if self.role == "token" {
            self.shared.token_requests.add();
        } else {
            self.shared.api_calls.add();
        }
        let verified = self.verify(req, &htu, token.as_deref());
        let jkt = match verified {
            Ok(jkt) => jkt,
            Err("nonce") => {
                self.shared.nonce_requests.add();
                headers.insert("dpop-nonce", HeaderValue::from_static(self.nonce));
                let status = match self.role {
                    "token" => StatusCode::BAD_REQUEST,
                    _ => {
                        headers.insert(
                            header::WWW_AUTHENTICATE,
                            HeaderValue::from_static(r#"DPoP error="use_dpop_nonce""#),
                        );
                        StatusCode::UNAUTHORIZED
                    }
                };
                return (status, json!({"error": "use_dpop_nonce"}), headers);
            }
            Err(why) => {
                let answer = json!({"error": "invalid_dpop_proof", "error_description": why});
                return (StatusCode::UNAUTHORIZED, answer, headers);
            }
        };
        let mut tokens = self.shared.tokens.lock().unwrap();
        if self.role == "token" {
            let token = format!("dpop-{}", tokens.len() + 1);
            tokens.push((token.clone(), jkt));
            let answer = json!({"access_token": token, "token_type": "DPoP", "expires_in": 300});
            return (StatusCode::OK, answer, headers);
        }
        let bound = tokens
            .iter()
            .any(|(t, k)| Some(t) == token.as_ref() && *k == jkt);
        match bound {
            true => (StatusCode::OK, json!({"entries": []}), headers),
            false => (
                StatusCode::UNAUTHORIZED,
                json!({"error": "invalid_token"}),
                headers,
            ),
        }
    }
}

impl Server {
    /// Checks the request's proof as RFC 9449 §4.3 says; returns its key's thumbprint.
    fn verify(
        &self,
        req: &support::Req,
        htu: &str,
        token: Option<&str>,
    ) -> Result<String, &'static str> {
        let proof = req
            .header(http::HeaderName::from_static("dpop"))
            .ok_or("no proof")?;
        let (signed, sig) = proof.rsplit_once('.').ok_or("not a JWS")?;
        let (header, claims) = signed.split_once('.').ok_or("not a JWS")?;
        let decode = |part: &str| -> Result<Value, &'static str> {
            serde_json::from_slice(&B64.decode(part).map_err(|_| "base64url")?).map_err(|_| "json")
        };
        let (header, claims) = (decode(header)?, decode(claims)?);
        let jwk = &header["jwk"];
        let coordinate = |c: &str| {
            B64.decode(jwk[c].as_str().unwrap_or_default())
                .unwrap_or_default()
        };
        let point = [vec![4], coordinate("x"), coordinate("y")].concat();
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point)
            .verify(
                signed.as_bytes(),
                &B64.decode(sig).map_err(|_| "signature")?,
            )
            .map_err(|_| "signature")?;
        let method = if self.role == "token" {
            Method::POST
        } else {
            req.method.clone()
        };
        let fresh = claims["iat"]
            .as_f64()
            .is_some_and(|iat| (iat - support::now()).abs() < 60.0);
        if header["typ"] != "dpop+jwt"
            || claims["htm"] != method.as_str()
            || claims["htu"] != htu
            || !fresh
        {
            return Err("proof does not match the request");
        }
        if let Some(token) = token {
            let ath = B64.encode(ring::digest::digest(
                &ring::digest::SHA256,
                token.as_bytes(),
            ));
            if claims["ath"] != ath.as_str() {
                return Err("ath");
            }
        }
        let jti = claims["jti"].as_str().ok_or("jti")?.to_owned();
        if !self.shared.seen_jti.lock().unwrap().insert(jti) {
            return Err("jti reused");
        }
        if claims["nonce"] != self.nonce {
            return Err("nonce");
        }
        let canonical = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            jwk["x"].as_str().unwrap_or_default(),
            jwk["y"].as_str().unwrap_or_default()
        );
        Ok(B64.encode(ring::digest::digest(
            &ring::digest::SHA256,
            canonical.as_bytes(),
        )))
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let shared = Arc::new(Shared::default());
    let server = |role, nonce| {
        Arc::new(Server {
            role,
            base: Mutex::default(),
            nonce,
            shared: shared.clone(),
        })
    };
    let (idp, api) = (server("token", "as-n1"), server("api", "rs-n1"));
    let idp_base = support::start(idp.clone()).await;
    let api_base = support::start(api.clone()).await;
    *idp.base.lock().unwrap() = idp_base.clone();
    *api.base.lock().unwrap() = api_base.clone();
    call_the_api(&api_base, &format!("{idp_base}/token")).await?;
    let (tokens, calls, nonces) = (
        shared.token_requests.get(),
        shared.api_calls.get(),
        shared.nonce_requests.get(),
    );
    println!(
        "token requests: {tokens} (1 nonce request), api calls: {calls} (1 nonce request), \
         proofs verified: {} distinct jti",
        shared.seen_jti.lock().unwrap().len()
    );
    // What the numbers must be: one token, each server's nonce asked for once.
    if (tokens, calls, nonces) != (2, 4, 2) {
        return Err(format!("expected 2 token requests, 4 api calls, 2 nonce requests; saw {tokens}, {calls}, {nonces}").into());
    }
    Ok(())
}
