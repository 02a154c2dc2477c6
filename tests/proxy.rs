//! The default HTTPS token client in a network that needs a proxy: `HTTPS_PROXY` names a
//! loopback CONNECT proxy, the token endpoint is a TLS loopback server. Its own test
//! binary: the proxy variables are process-wide.
#![cfg(feature = "https")]

mod support;

use std::sync::{Arc, Mutex, atomic::Ordering::SeqCst};

use support::{providers::ClientCredentialsApi, tls::serve_tls};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};
use tower_client_auth::{
    CredentialCache,
    token::{TokenClient, TokenSource},
};

/// Each CONNECT the proxy saw: target, `Proxy-Authorization`.
type Tunnels = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A CONNECT proxy on loopback: records each CONNECT target and its
/// `Proxy-Authorization`, then splices the two connections.
async fn connect_proxy() -> (String, Tunnels) {
    let seen: Tunnels = Arc::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut client = BufReader::new(client);
                let mut line = String::new();
                client.read_line(&mut line).await.unwrap();
                let target = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                let mut auth = None;
                loop {
                    let mut header = String::new();
                    client.read_line(&mut header).await.unwrap();
                    if header.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = header
                        .strip_prefix("proxy-authorization: ")
                        .or_else(|| header.strip_prefix("Proxy-Authorization: "))
                    {
                        auth = Some(v.trim().to_owned());
                    }
                }
                log.lock().unwrap().push((target.clone(), auth));
                let Ok(mut upstream) = TcpStream::connect(&target).await else {
                    return;
                };
                let mut client = client.into_inner();
                client
                    .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                    .await
                    .unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (format!("http://user:pa55@{addr}"), seen)
}

/// World: `HTTPS_PROXY` set (with credentials), `NO_PROXY` set to other hosts, a token
/// endpoint reachable only as the proxy's CONNECT target. Proves: the default HTTPS
/// client tunnels the token request through the proxy, authenticated, and gets the
/// token; `NO_PROXY` is honoured.
#[tokio::test]
async fn the_default_client_honours_https_proxy_and_no_proxy() {
    let api = ClientCredentialsApi::new("proxy-client", "proxy-secret");
    let tls = serve_tls(api.clone()).await;
    let (proxy, seen) = connect_proxy().await;
    // SAFETY: this binary has one test, and nothing else reads the environment while
    // it is written.
    unsafe {
        std::env::set_var("HTTPS_PROXY", &proxy);
        std::env::set_var("NO_PROXY", "example.invalid");
    }
    let client = TokenClient::hyper_rustls_with_roots([&tls.root_der]).unwrap();
    let url = format!("https://{}/oauth/v2/token", tls.addr);
    let source = TokenSource::client_credentials(&url, "proxy-client", "proxy-secret")
        .unwrap()
        .client(client);
    CredentialCache::new(source).credential().await.unwrap();
    let tunnels = seen.lock().unwrap().clone();
    assert_eq!(tunnels.len(), 1, "{tunnels:?}");
    assert_eq!(tunnels[0].0, tls.addr.to_string());
    assert_eq!(tunnels[0].1.as_deref(), Some("Basic dXNlcjpwYTU1"));
    assert_eq!(api.token_requests.load(SeqCst), 1);

    // The same host listed in NO_PROXY: straight there, the proxy sees nothing more.
    unsafe {
        std::env::set_var("NO_PROXY", "127.0.0.1");
    }
    let client = TokenClient::hyper_rustls_with_roots([&tls.root_der]).unwrap();
    let source = TokenSource::client_credentials(&url, "proxy-client", "proxy-secret")
        .unwrap()
        .client(client);
    CredentialCache::new(source).credential().await.unwrap();
    assert_eq!(api.token_requests.load(SeqCst), 2);
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "the proxy saw a NO_PROXY host"
    );
}
