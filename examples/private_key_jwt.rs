//! OAuth2 client credentials with `private_key_jwt` client authentication (RFC 7523): no
//! shared secret; each token request carries a fresh assertion signed with the client's
//! private key, which the authorization server verifies with the public key it has on
//! record.
//!
//! `cargo run --example private_key_jwt --features jwt` (starts its own authorization
//! server and API on loopback; the key pair is made at start, as a registration would).
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde_json::{Value, json};
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, BoxError, ReplayBody,
    token::{SigningKey, TokenRequest, TokenSource},
};

// --- the code to copy: `api` is your API's base URL, `key_pem` your private key --------
async fn call_the_api(api: &str, key_pem: &str) -> Result<(), BoxError> {
    // PKCS#8, PKCS#1 (RSA) or SEC1 (EC P-256) PEM; `kid` as registered with the server.
    let key = SigningKey::from_pem(key_pem)?.kid("key-2026-12");
    let login = TokenRequest::oauth2_client_credentials_jwt(
        &format!("{api}/oauth2/token"),
        "billing-app",
        key,
    )?
    .scope("invoices:read");
    let source = TokenSource::new(login).allow_http_loopback(true); // loopback demo only
    let client = AuthLayer::new(source)
        .origin(api)? // the credential goes to this origin only
        .allow_http_loopback(true) // loopback demo only: production is https-only
        .layer(Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>());
    for _ in 0..2 {
        let req = Request::get(format!("{api}/v1/invoices")).body(Full::default())?;
        let res = client.clone().oneshot(req).await?;
        println!("GET /v1/invoices: {}", res.status());
    }
    Ok(())
}
// ---------------------------------------------------------------------------------------

mod support;

/// The authorization server and the API: the token endpoint verifies each assertion
/// (signature with the registered key, `iss`/`sub`, `aud`, `exp`, a `jti` never seen).
struct Server {
    public_key: Vec<u8>,
    audience: Mutex<String>,
    seen_jti: Mutex<Vec<String>>,
    tokens: support::Count,
}

impl support::Api for Server {
    fn answer(&self, req: &support::Req) -> (StatusCode, Value) {
        if req.path == "/oauth2/token" {
            return match self.verify(&req.form()) {
                Ok(()) => {
                    let n = self.tokens.add();
                    (
                        StatusCode::OK,
                        json!({"access_token": format!("pkjwt-{n}"), "token_type": "Bearer", "expires_in": 300}),
                    )
                }
                Err(why) => (
                    StatusCode::UNAUTHORIZED,
                    json!({"error": "invalid_client", "error_description": why}),
                ),
            };
        }
        match req.bearer() {
            Some(t) if t.starts_with("pkjwt-") => (StatusCode::OK, json!({"invoices": []})),
            _ => (StatusCode::UNAUTHORIZED, json!({"error": "invalid_token"})),
        }
    }
}

impl Server {
    fn verify(&self, form: &std::collections::HashMap<String, String>) -> Result<(), &'static str> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let jws = form.get("client_assertion").ok_or("no assertion")?;
        let (signed, sig) = jws.rsplit_once('.').ok_or("not a JWS")?;
        let sig = b64.decode(sig).map_err(|_| "bad signature encoding")?;
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            &self.public_key,
        )
        .verify(signed.as_bytes(), &sig)
        .map_err(|_| "bad signature")?;
        let claims = signed.split('.').nth(1).ok_or("no claims")?;
        let claims: Value = serde_json::from_slice(&b64.decode(claims).map_err(|_| "claims")?)
            .map_err(|_| "claims")?;
        let ok = claims["iss"] == "billing-app"
            && claims["sub"] == "billing-app"
            && claims["aud"] == self.audience.lock().unwrap().as_str()
            && claims["exp"]
                .as_f64()
                .is_some_and(|exp| exp > support::now());
        let jti = claims["jti"].as_str().ok_or("no jti")?.to_owned();
        let mut seen = self.seen_jti.lock().unwrap();
        if !ok || seen.contains(&jti) {
            return Err("assertion refused");
        }
        seen.push(jti);
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // The client's key pair: the private half stays with the client, the public half is
    // registered with the authorization server.
    let pair = rcgen::KeyPair::generate()?; // EC P-256
    let key_pem = pair.serialize_pem();
    let public_key = SigningKey::from_pem(&key_pem)?.public_key();
    let server = Arc::new(Server {
        public_key,
        audience: Mutex::default(),
        seen_jti: Mutex::default(),
        tokens: support::Count::default(),
    });
    let api = support::start(server.clone()).await;
    *server.audience.lock().unwrap() = format!("{api}/oauth2/token");
    call_the_api(&api, &key_pem).await?;
    println!(
        "token requests: {} (each with a fresh assertion the server verified: {} distinct jti)",
        server.tokens.get(),
        server.seen_jti.lock().unwrap().len()
    );
    Ok(())
}
