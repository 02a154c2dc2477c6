//! A DPoP authorization server and resource server (RFC 9449) that verify every proof
//! as a strict server does (§4.3, §7.1): exactly one `DPoP` header; `typ` `dpop+jwt`;
//! `alg` ES256; a public JWK with no private part; the signature; `htm` and `htu` (this
//! server's own URL, no query); `iat` within a minute; a `jti` never seen before; the
//! server's current nonce; and at the API, `ath` (the token's hash) and the key the
//! token was bound to (`cnf.jkt`). Both require a nonce, as Okta's do: the first request
//! to each gets `use_dpop_nonce` with a `DPoP-Nonce`.
#![allow(dead_code, unreachable_pub)]

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst},
    },
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde_json::{Value, json};

use super::providers::{Incoming, Provider, Reply, basic_credentials, now_secs, reply, start};

/// What the two servers share: the tokens issued and the keys they are bound to.
pub struct DpopState {
    pub client_id: String,
    pub client_secret: String,
    /// access token → (thumbprint of its key, expiry)
    tokens: Mutex<HashMap<String, (String, f64)>>,
    /// refresh token → thumbprint of its key
    refresh_tokens: Mutex<HashMap<String, String>>,
    seen_jti: Mutex<HashSet<String>>,
    /// Every DPoP proof either server was sent, as it came.
    proofs: Mutex<Vec<String>>,
    pub token_nonce: Mutex<String>,
    pub api_nonce: Mutex<String>,
    nonces: AtomicUsize,
    /// The token endpoint's and the API's own URLs (for `htu`).
    token_url: Mutex<String>,
    api_base: Mutex<String>,
    pub token_requests: AtomicUsize,
    pub issued: AtomicUsize,
    pub api_calls: AtomicUsize,
    pub api_accepted: AtomicUsize,
    /// Why each refused request was refused, in order ("token: nonce", "api: ath", ...).
    pub refusals: Mutex<Vec<String>>,
    /// The API hands out a new nonce with every accepted answer.
    pub rotate_api_nonce: AtomicBool,
    /// The token endpoint wants a new nonce on every request, refusing even the one it
    /// gave last (a hostile server).
    pub token_nonce_every_time: AtomicBool,
    /// The API wants a new nonce on every request, refusing even the one it gave last
    /// (a hostile server).
    pub api_nonce_every_time: AtomicBool,
    /// Issues `Bearer` tokens and ignores proofs (a server without DPoP).
    pub bearer_only: AtomicBool,
    /// The only key thumbprint the token endpoint accepts, if set (a registered key).
    pub registered_jkt: Mutex<Option<String>>,
    /// What a refresh token bound to another key is refused with: `invalid_grant`
    /// (most servers) or `invalid_dpop_proof`.
    pub refresh_key_mismatch: Mutex<&'static str>,
    /// The token endpoint refuses this many more proofs, however good.
    pub refuse_token_proofs: AtomicUsize,
    /// The API refuses this many more proofs, however good (`invalid_dpop_proof`: a
    /// server whose clock stepped, a proxy that rewrote the path).
    pub refuse_proofs: AtomicUsize,
    /// Lifetime of each access token, in seconds.
    pub expires_in: AtomicUsize,
}

pub struct DpopIdp(pub Arc<DpopState>);
pub struct DpopApi(pub Arc<DpopState>);

impl DpopState {
    pub fn new(client_id: &str, client_secret: &str) -> Arc<Self> {
        Arc::new(DpopState {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            tokens: Mutex::default(),
            refresh_tokens: Mutex::default(),
            seen_jti: Mutex::default(),
            proofs: Mutex::default(),
            token_nonce: Mutex::new("as-nonce-0".into()),
            api_nonce: Mutex::new("rs-nonce-0".into()),
            nonces: AtomicUsize::new(0),
            token_url: Mutex::default(),
            api_base: Mutex::default(),
            token_requests: AtomicUsize::new(0),
            issued: AtomicUsize::new(0),
            api_calls: AtomicUsize::new(0),
            api_accepted: AtomicUsize::new(0),
            refusals: Mutex::default(),
            rotate_api_nonce: AtomicBool::new(false),
            token_nonce_every_time: AtomicBool::new(false),
            api_nonce_every_time: AtomicBool::new(false),
            bearer_only: AtomicBool::new(false),
            registered_jkt: Mutex::default(),
            refresh_key_mismatch: Mutex::new("invalid_grant"),
            refuse_proofs: AtomicUsize::new(0),
            refuse_token_proofs: AtomicUsize::new(0),
            expires_in: AtomicUsize::new(300),
        })
    }

    /// Starts the token endpoint and the API, each on its own origin (each with its own
    /// nonce); returns the token endpoint's URL and the API's base URL.
    pub async fn start(self: &Arc<Self>) -> (String, String) {
        let idp = start(Arc::new(DpopIdp(self.clone()))).await;
        let api = start(Arc::new(DpopApi(self.clone()))).await;
        let token_url = format!("{idp}/oauth2/token");
        *self.token_url.lock().unwrap() = token_url.clone();
        *self.api_base.lock().unwrap() = api.clone();
        (token_url, api)
    }

    /// Revokes every access token issued so far.
    pub fn revoke_all(&self) {
        self.tokens.lock().unwrap().clear();
    }

    /// Every DPoP proof either server was sent.
    pub fn proofs(&self) -> Vec<String> {
        self.proofs.lock().unwrap().clone()
    }

    pub fn refusals(&self) -> Vec<String> {
        self.refusals.lock().unwrap().clone()
    }

    fn refuse(&self, why: String) {
        self.refusals.lock().unwrap().push(why);
    }

    fn next_nonce(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.nonces.fetch_add(1, SeqCst) + 1)
    }

    /// Verifies the request's proof; returns the thumbprint of its key.
    fn verify(
        &self,
        headers: &HeaderMap,
        method: &Method,
        htu: &str,
        nonce: &str,
        token: Option<&str>,
    ) -> Result<String, &'static str> {
        let mut proofs = headers.get_all("dpop").iter();
        let (Some(proof), None) = (proofs.next(), proofs.next()) else {
            return Err("not exactly one DPoP header");
        };
        let proof = proof.to_str().map_err(|_| "proof not ascii")?;
        self.proofs.lock().unwrap().push(proof.to_owned());
        let parts: Vec<&str> = proof.split('.').collect();
        let [header, claims, sig] = parts[..] else {
            return Err("not a compact JWS");
        };
        let decode = |part: &str| -> Result<Value, &'static str> {
            serde_json::from_slice(&B64.decode(part).map_err(|_| "base64url")?).map_err(|_| "json")
        };
        let (header, claims) = (decode(header)?, decode(claims)?);
        if header["typ"] != "dpop+jwt" {
            return Err("typ");
        }
        if header["alg"] != "ES256" {
            return Err("alg");
        }
        let jwk = &header["jwk"];
        if jwk["kty"] != "EC" || jwk["crv"] != "P-256" || jwk.get("d").is_some() {
            return Err("jwk");
        }
        let coordinate = |name: &str| -> Result<Vec<u8>, &'static str> {
            let bytes = B64
                .decode(jwk[name].as_str().ok_or("jwk")?)
                .map_err(|_| "jwk")?;
            (bytes.len() == 32).then_some(bytes).ok_or("jwk")
        };
        let point = [vec![4u8], coordinate("x")?, coordinate("y")?].concat();
        let signature = B64.decode(sig).map_err(|_| "signature base64url")?;
        let signed = &proof[..proof.rfind('.').unwrap()];
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point)
            .verify(signed.as_bytes(), &signature)
            .map_err(|_| "signature")?;
        if claims["htm"] != method.as_str() {
            return Err("htm");
        }
        if claims["htu"] != htu {
            return Err("htu");
        }
        let iat = claims["iat"].as_f64().ok_or("iat")?;
        if (iat - now_secs()).abs() > 60.0 {
            return Err("iat");
        }
        let jti = claims["jti"].as_str().ok_or("jti")?;
        if jti.len() < 16 || !self.seen_jti.lock().unwrap().insert(jti.to_owned()) {
            return Err("jti reused");
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
        // Checked last, as servers do: a stale nonce is answered with the new one.
        if claims["nonce"] != nonce {
            return Err("nonce");
        }
        // RFC 7638 over the required members, in order.
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

fn with_nonce(mut reply: Reply, nonce: &str) -> Reply {
    reply
        .headers_mut()
        .insert("dpop-nonce", HeaderValue::from_str(nonce).unwrap());
    reply
}

impl Provider for DpopIdp {
    fn handle(&self, req: Incoming) -> Reply {
        let s = &self.0;
        s.token_requests.fetch_add(1, SeqCst);
        let client_ok = basic_credentials(&req.headers)
            .is_some_and(|(id, secret)| id == s.client_id && secret == s.client_secret);
        if !client_ok || req.method != Method::POST {
            return reply(StatusCode::UNAUTHORIZED, json!({"error": "invalid_client"}));
        }
        let form = req.form();
        let bearer_only = s.bearer_only.load(SeqCst);
        let jkt = if bearer_only {
            None
        } else {
            let nonce = s.token_nonce.lock().unwrap().clone();
            let htu = s.token_url.lock().unwrap().clone();
            let verified = s
                .verify(&req.headers, &req.method, &htu, &nonce, None)
                .and_then(|jkt| match s.token_nonce_every_time.load(SeqCst) {
                    true => Err("nonce"),
                    false => Ok(jkt),
                })
                .and_then(|jkt| {
                    let refuse = s
                        .refuse_token_proofs
                        .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                    if refuse { Err("refused") } else { Ok(jkt) }
                });
            match verified {
                Ok(jkt) => Some(jkt),
                Err(why) => {
                    s.refuse(format!("token: {why}"));
                    if why == "nonce" {
                        if s.token_nonce_every_time.load(SeqCst) {
                            *s.token_nonce.lock().unwrap() = s.next_nonce("as-nonce");
                        }
                        let nonce = s.token_nonce.lock().unwrap().clone();
                        return with_nonce(
                            reply(
                                StatusCode::BAD_REQUEST,
                                json!({"error": "use_dpop_nonce", "error_description": "Authorization server requires nonce in DPoP proof"}),
                            ),
                            &nonce,
                        );
                    }
                    return reply(
                        StatusCode::BAD_REQUEST,
                        json!({"error": "invalid_dpop_proof", "error_description": format!("DPoP proof refused: {why}")}),
                    );
                }
            }
        };
        if let (Some(jkt), Some(registered)) = (&jkt, s.registered_jkt.lock().unwrap().as_ref()) {
            if jkt != registered {
                s.refuse("token: unregistered key".into());
                // As some servers do: the refused proof echoed back.
                let echoed = req
                    .headers
                    .get("dpop")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "invalid_dpop_proof", "error_description": format!("the proof's key is not registered for this client: {echoed}")}),
                );
            }
        }
        match form.get("grant_type").map(String::as_str) {
            Some("client_credentials") => {}
            Some("refresh_token") => {
                // Spent only when the grant is judged good: a refused proof spends nothing.
                let presented = form.get("refresh_token").cloned().unwrap_or_default();
                let bound = s.refresh_tokens.lock().unwrap().get(&presented).cloned();
                let Some(bound) = bound else {
                    s.refuse("token: refresh token".into());
                    return reply(StatusCode::BAD_REQUEST, json!({"error": "invalid_grant"}));
                };
                if Some(&bound) != jkt.as_ref() && !bearer_only {
                    s.refuse("token: refresh token of another key".into());
                    let error = *s.refresh_key_mismatch.lock().unwrap();
                    return reply(StatusCode::BAD_REQUEST, json!({"error": error}));
                }
                s.refresh_tokens.lock().unwrap().remove(&presented);
            }
            _ => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "unsupported_grant_type"}),
                );
            }
        }
        let n = s.issued.fetch_add(1, SeqCst) + 1;
        let token = format!("dpop-token-{n}");
        let refresh = format!("dpop-rt-{n}");
        let lifetime = s.expires_in.load(SeqCst) as f64;
        let jkt = jkt.unwrap_or_default();
        s.tokens
            .lock()
            .unwrap()
            .insert(token.clone(), (jkt.clone(), now_secs() + lifetime));
        s.refresh_tokens
            .lock()
            .unwrap()
            .insert(refresh.clone(), jkt);
        let token_type = if bearer_only { "Bearer" } else { "DPoP" };
        reply(
            StatusCode::OK,
            json!({"access_token": token, "token_type": token_type, "expires_in": lifetime, "refresh_token": refresh}),
        )
    }
}

impl Provider for DpopApi {
    fn handle(&self, req: Incoming) -> Reply {
        let s = &self.0;
        s.api_calls.fetch_add(1, SeqCst);
        let challenge = |error: &str, description: &str| {
            let mut r = reply(StatusCode::UNAUTHORIZED, json!({"error": error}));
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_str(&format!(
                    r#"DPoP algs="ES256", error="{error}", error_description="{description}""#
                ))
                .unwrap(),
            );
            r
        };
        if req.path == "/v1/moved" {
            // A resource that moved within the API's origin, redirected before any
            // check, as a front proxy does.
            let mut moved = reply(StatusCode::TEMPORARY_REDIRECT, json!({}));
            let to = format!("{}/v1/orders/moved", s.api_base.lock().unwrap());
            moved
                .headers_mut()
                .insert(header::LOCATION, HeaderValue::from_str(&to).unwrap());
            return moved;
        }
        let authorization = req
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bearer_only = s.bearer_only.load(SeqCst);
        let (scheme, token) = authorization.split_once(' ').unwrap_or_default();
        let bound = s
            .tokens
            .lock()
            .unwrap()
            .get(token)
            .cloned()
            .filter(|(_, exp)| now_secs() < *exp);
        let Some((jkt, _)) = bound else {
            s.refuse("api: token".into());
            return challenge("invalid_token", "The access token expired or was revoked");
        };
        if bearer_only {
            if scheme != "Bearer" {
                s.refuse("api: scheme".into());
                return challenge("invalid_token", "not a bearer token");
            }
            s.api_accepted.fetch_add(1, SeqCst);
            return reply(StatusCode::OK, json!({"ok": true}));
        }
        if scheme != "DPoP" {
            // RFC 9449 §7.2: a DPoP-bound token presented as a bearer token.
            s.refuse("api: scheme".into());
            return challenge("invalid_token", "DPoP-bound token sent without DPoP");
        }
        let nonce = s.api_nonce.lock().unwrap().clone();
        let htu = format!("{}{}", s.api_base.lock().unwrap(), req.path);
        let verified = s
            .verify(&req.headers, &req.method, &htu, &nonce, Some(token))
            .and_then(|jkt| match s.api_nonce_every_time.load(SeqCst) {
                true => Err("nonce"),
                false => Ok(jkt),
            })
            .and_then(|jkt| {
                let refuse = s
                    .refuse_proofs
                    .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if refuse { Err("refused") } else { Ok(jkt) }
            });
        match verified {
            Ok(key) if key == jkt => {}
            Ok(_) => {
                s.refuse("api: key".into());
                return challenge("invalid_token", "the proof's key is not the token's");
            }
            Err("nonce") => {
                s.refuse("api: nonce".into());
                if s.api_nonce_every_time.load(SeqCst) {
                    *s.api_nonce.lock().unwrap() = s.next_nonce("rs-nonce");
                }
                let nonce = s.api_nonce.lock().unwrap().clone();
                return with_nonce(
                    challenge(
                        "use_dpop_nonce",
                        "Resource server requires nonce in DPoP proof",
                    ),
                    &nonce,
                );
            }
            Err(why) => {
                s.refuse(format!("api: {why}"));
                return challenge("invalid_dpop_proof", why);
            }
        }
        s.api_accepted.fetch_add(1, SeqCst);
        let answer = reply(StatusCode::OK, json!({"ok": true, "path": req.path}));
        if s.rotate_api_nonce.load(SeqCst) {
            let next = s.next_nonce("rs-nonce");
            *s.api_nonce.lock().unwrap() = next.clone();
            return with_nonce(answer, &next);
        }
        answer
    }
}
