//! The reqwest adapter and the proxies a default reqwest client takes from the
//! environment (`HTTP_PROXY`, `NO_PROXY`): a plain-http loopback request, allowed with
//! `allow_http_loopback`, must not carry its credential through any proxy: plain http
//! is allowed because loopback traffic stays on this host, and a proxy may send it on
//! anywhere (cntlm to its parent proxy in the clear, an `ssh -L` or `kubectl
//! port-forward` port to another host, a SOCKS proxy from its far end).
//!
//! A test binary of its own, with one test: it sets process-wide environment variables,
//! which every reqwest client built in the same process would read.
#![cfg(feature = "reqwest")]

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::mpsc,
};
use tower_client_auth::{
    CredentialCache, ErrorKind, StaticCredential,
    reqwest::{AuthMiddleware, auth_error},
    token::{TokenClient, TokenError, TokenErrorKind, TokenSource},
};

/// A loopback HTTP server that answers `200 OK` to each request and hands over the
/// request head it read, as text.
async fn recorder() -> (String, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    (addr.to_string(), rx)
}

/// Clears the proxy variables, then sets `vars`, for the clients and middlewares built
/// after it.
fn proxy_env(vars: &[(&str, &str)]) {
    // SAFETY: this binary's only test sets them, before the clients and middlewares
    // that read them are built, and nothing else in the process reads the environment
    // concurrently (the runtime's threads only serve the servers above).
    unsafe {
        for name in [
            "HTTP_PROXY",
            "http_proxy",
            "ALL_PROXY",
            "all_proxy",
            "NO_PROXY",
            "no_proxy",
            "REQUEST_METHOD",
        ] {
            std::env::remove_var(name);
        }
        for (name, value) in vars {
            std::env::set_var(name, value);
        }
    }
}

/// `mw` refuses to send `url` (through the origin rule's path, or a predicate's) with
/// `InsecureTransport`, with no secret in its error.
async fn refused(name: &str, mw: AuthMiddleware<StaticCredential>, url: &str) {
    let err = client(reqwest::Client::new(), mw)
        .get(url)
        .send()
        .await
        .unwrap_err();
    let auth = auth_error(&err).unwrap_or_else(|| panic!("{name}: {err}"));
    assert_eq!(auth.kind(), ErrorKind::InsecureTransport, "{name}");
    assert!(auth.to_string().contains("NO_PROXY"), "{name}: {auth}");
    assert!(
        !auth.to_string().contains("loopback-secret"),
        "{name}: {auth}"
    );
}

/// Both of the middleware's paths refuse to send `url` to `api`.
async fn refused_by_both(api: &str, url: &str) {
    refused("origin", middleware(api), url).await;
    let by_predicate = middleware(api).origin_matching(|uri| uri.path().starts_with("/v1/"));
    refused("predicate", by_predicate, url).await;
}

fn client(
    reqwest: reqwest::Client,
    mw: AuthMiddleware<StaticCredential>,
) -> reqwest_middleware::ClientWithMiddleware {
    reqwest_middleware::ClientBuilder::new(reqwest)
        .with(mw)
        .build()
}

fn middleware(api: &str) -> AuthMiddleware<StaticCredential> {
    AuthMiddleware::new(StaticCredential::bearer("loopback-secret").unwrap())
        .origin(format!("http://{api}"))
        .unwrap()
        .allow_http_loopback(true)
}

/// Sends `url` through `reqwest` with `mw`, expects `200 OK`, and returns the request
/// head that arrived at `at`, which carries the credential.
async fn sent(
    reqwest: reqwest::Client,
    mw: AuthMiddleware<StaticCredential>,
    url: &str,
    at: &mut mpsc::UnboundedReceiver<String>,
) -> String {
    let res = client(reqwest, mw).get(url).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let head = at.recv().await.unwrap();
    assert!(head.contains("Bearer loopback-secret"), "{head}");
    head
}

async fn nothing_arrives(rx: &mut mpsc::UnboundedReceiver<String>) {
    let arrived = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await;
    assert!(arrived.is_err(), "a request arrived: {arrived:?}");
}

#[tokio::test]
async fn a_plain_http_loopback_request_never_goes_through_a_proxy() {
    let (api, mut at_api) = recorder().await;
    let url = format!("http://{api}/v1/me");

    // No proxy variables: sent, directly.
    proxy_env(&[]);
    sent(reqwest::Client::new(), middleware(&api), &url, &mut at_api).await;

    // A proxy on another host, from the environment, under any of the names a default
    // client reads: refused before anything is sent, by the origin rule's path and by
    // the path that hands the URI to a predicate.
    for name in ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"] {
        proxy_env(&[(name, "http://proxy.invalid:3128")]);
        refused_by_both(&api, &url).await;
    }
    // A SOCKS proxy, even one on this host: it tunnels the request on to wherever it
    // connects from (an `ssh -D` tunnel's far end), so it counts as another host.
    for proxy in ["socks5h://127.0.0.1:1080", "socks5://localhost:1080"] {
        proxy_env(&[("ALL_PROXY", proxy)]);
        refused_by_both(&api, &url).await;
    }
    // `NO_PROXY=localhost` does not cover `[::1]`: a default client would proxy it.
    proxy_env(&[
        ("HTTP_PROXY", "http://proxy.invalid:3128"),
        ("NO_PROXY", "localhost"),
    ]);
    let v6 = "[::1]:9";
    refused_by_both(v6, &format!("http://{v6}/v1/me")).await;
    nothing_arrives(&mut at_api).await;

    // Told that the client takes no proxy (and it does not): sent, directly.
    let no_proxy = reqwest::Client::builder().no_proxy().build().unwrap();
    let told = middleware(&api).client_without_proxy();
    sent(no_proxy, told, &url, &mut at_api).await;

    // The host excluded by NO_PROXY: the default client goes directly, and so may the
    // credential.
    proxy_env(&[
        ("HTTP_PROXY", "http://proxy.invalid:3128"),
        ("NO_PROXY", "127.0.0.1"),
    ]);
    sent(reqwest::Client::new(), middleware(&api), &url, &mut at_api).await;

    // Under CGI (`REQUEST_METHOD` set) a default client ignores `HTTP_PROXY`, which a
    // request could set through its `Proxy:` header ("httpoxy"): sent, directly.
    proxy_env(&[
        ("HTTP_PROXY", "http://proxy.invalid:3128"),
        ("REQUEST_METHOD", "GET"),
    ]);
    sent(reqwest::Client::new(), middleware(&api), &url, &mut at_api).await;

    // An HTTP proxy listening on this host, under any of the names: refused too. Where
    // it sends the request on, the middleware cannot see (cntlm forwards it in the clear
    // to its parent proxy; a loopback port of `ssh -L` or `kubectl port-forward` ends on
    // another host). The default client would send it there: without the middleware
    // the proxy gets the request, with it nothing arrives.
    let (proxy, mut at_proxy) = recorder().await;
    for name in ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"] {
        proxy_env(&[(name, &format!("http://{proxy}"))]);
        refused_by_both(&api, &url).await;
        nothing_arrives(&mut at_proxy).await;
        let res = reqwest::Client::new().get(&url).send().await.unwrap();
        assert_eq!(res.status(), 200, "{name}");
        let head = at_proxy.recv().await.unwrap();
        assert!(head.starts_with(&format!("GET {url} ")), "{name}: {head}");
    }
    nothing_arrives(&mut at_api).await;

    // The token client over reqwest: the client secret must not go there either.
    let (idp, mut at_idp) = recorder().await;
    let token_url = format!("http://{idp}/token");
    let source = |client: TokenClient| {
        TokenSource::client_credentials(&token_url, "id", "client-secret")
            .unwrap()
            .allow_http_loopback(true)
            .client(client.allow_http_loopback(true))
    };
    let loopback_proxy = format!("http://{proxy}");
    for (name, proxy) in [
        ("HTTP_PROXY", "http://proxy.invalid:3128"),
        ("ALL_PROXY", "socks5h://127.0.0.1:1080"),
        ("HTTP_PROXY", loopback_proxy.as_str()),
    ] {
        proxy_env(&[(name, proxy)]);
        let err = CredentialCache::new(source(TokenClient::reqwest(reqwest::Client::new())))
            .credential()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InsecureTransport, "{proxy}: {err}");
        let token = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<TokenError>())
            .unwrap_or_else(|| panic!("no token error under {err:?}"));
        assert_eq!(token.kind(), TokenErrorKind::InsecureTransport);
        assert!(!format!("{err:?}").contains("client-secret"));
    }
    nothing_arrives(&mut at_idp).await;
    nothing_arrives(&mut at_proxy).await;
    // Told the client takes no proxy: the request goes to the token endpoint (whose
    // empty answer is no token, which is beside the point here).
    let no_proxy = reqwest::Client::builder().no_proxy().build().unwrap();
    let told = source(TokenClient::reqwest(no_proxy).client_without_proxy());
    let _ = CredentialCache::new(told).credential().await;
    assert!(at_idp.recv().await.unwrap().starts_with("POST /token "));
}
