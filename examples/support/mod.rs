//! The fake APIs the examples talk to: loopback HTTP servers that answer as each style's
//! real API does (the README's table of styles A–E), counting what they saw. Not part of
//! what you copy from an example.
#![allow(dead_code, unreachable_pub)]

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde_json::Value;

pub mod apis;

/// A request as a fake API sees it: the body read whole.
pub struct Req {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Req {
    pub fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.headers.get(name)?.to_str().ok()
    }

    pub fn bearer(&self) -> Option<&str> {
        self.header(header::AUTHORIZATION)?.strip_prefix("Bearer ")
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn form(&self) -> HashMap<String, String> {
        form_urlencoded::parse(&self.body).into_owned().collect()
    }

    /// `Authorization: Basic` decoded, then each half url-decoded (RFC 6749 §2.3.1).
    pub fn basic(&self) -> Option<(String, String)> {
        use base64::Engine as _;
        let encoded = self.header(header::AUTHORIZATION)?.strip_prefix("Basic ")?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (id, secret) = text.split_once(':')?;
        let unescape = |s: &str| {
            let pair = format!("x={s}");
            let (_, value) = form_urlencoded::parse(pair.as_bytes()).next()?;
            Some(value.into_owned())
        };
        Some((unescape(id)?, unescape(secret)?))
    }
}

/// A fake API: one answer (status, JSON body) per request.
pub trait Api: Send + Sync + 'static {
    fn answer(&self, req: &Req) -> (StatusCode, Value);

    /// The answer with headers of its own (a challenge, a nonce); by default none.
    fn answer_with_headers(&self, req: &Req) -> (StatusCode, Value, HeaderMap) {
        let (status, json) = self.answer(req);
        (status, json, HeaderMap::new())
    }
}

/// Serves `api` over HTTP/1.1 on 127.0.0.1 until the program ends; returns its base URL.
pub async fn start<A: Api>(api: Arc<A>) -> String {
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let api = api.clone();
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let api = api.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body.collect().await?.to_bytes();
                    let req = Req {
                        method: parts.method,
                        path: parts.uri.path().to_owned(),
                        headers: parts.headers,
                        body,
                    };
                    let (status, json, headers) = api.answer_with_headers(&req);
                    let mut reply = Response::builder()
                        .status(status)
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(Full::new(Bytes::from(json.to_string())))?;
                    reply.headers_mut().extend(headers);
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(reply)
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(io, service));
        }
    });
    base
}

/// Seconds since the Unix epoch.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A counter a fake API keeps.
#[derive(Debug, Default)]
pub struct Count(AtomicU64);

impl Count {
    pub fn add(&self) -> u64 {
        self.0.fetch_add(1, Relaxed) + 1
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}
