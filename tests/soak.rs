//! Fault-injection soak. A loopback token endpoint and API misbehave on a seeded random
//! schedule while a few hundred concurrent workers drive tens of thousands of requests
//! through `AuthLayer`. About 20 s in CI; `SOAK_SECS=300 cargo test --release --test soak
//! -- --nocapture` for a longer run, `SOAK_SEED=n` for another schedule.
//!
//! Token endpoint (password grant, then refresh grant with rotation; presenting a used
//! refresh token revokes its whole family): 5xx, hangs past the client's timeout, slow
//! answers past the cache's fetch timeout (so exchanges are abandoned mid-flight), garbage
//! bodies, 200s without the token, connection resets, and a total outage in the middle of
//! the run. API: tokens live 2 s, some are revoked early (401 before expiry), some paths
//! answer 403.
#![cfg(feature = "token")]

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde_json::json;
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, CredentialCache, ErrorKind,
    token::{TokenClient, TokenRequest, TokenSource},
};

const LIFETIME_SECS: u64 = 2;
const WORKERS: usize = 200;
const DEADLINE: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Server {
    rng: Mutex<Option<fastrand::Rng>>,
    faults_on: AtomicBool,
    outage: AtomicBool,
    // token endpoint
    token_calls: AtomicUsize,
    token_calls_in_outage: AtomicUsize,
    issued: AtomicUsize,
    injected_failures: AtomicUsize,
    family_revocations: AtomicUsize,
    // api
    api_calls: AtomicUsize,
    missing_credential: AtomicUsize,
    early_revocations: AtomicUsize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next: usize,
    /// access token -> (expires at, revoked)
    access: HashMap<String, (Instant, bool)>,
    /// refresh token -> (family, used)
    refresh: HashMap<String, (usize, bool)>,
    revoked_families: std::collections::HashSet<usize>,
    /// request id -> tokens it was sent with, in order
    attempts: HashMap<String, Vec<String>>,
}

enum Fault {
    None,
    Status5xx,
    Hang,
    Slow,
    Garbage,
    MissingField,
    Reset,
}

impl Server {
    fn roll(&self) -> f64 {
        self.rng.lock().unwrap().as_mut().unwrap().f64()
    }

    fn fault(&self) -> Fault {
        if !self.faults_on.load(SeqCst) {
            return Fault::None;
        }
        match self.roll() {
            p if p < 0.08 => Fault::Status5xx,
            p if p < 0.10 => Fault::Hang,
            p if p < 0.15 => Fault::Slow,
            p if p < 0.19 => Fault::Garbage,
            p if p < 0.22 => Fault::MissingField,
            p if p < 0.25 => Fault::Reset,
            _ => Fault::None,
        }
    }

    fn issue(&self, state: &mut State, family: usize) -> serde_json::Value {
        state.next += 1;
        let (access, refresh) = (format!("at-{}", state.next), format!("rt-{}", state.next));
        let expires = Instant::now() + Duration::from_secs(LIFETIME_SECS);
        state.access.insert(access.clone(), (expires, false));
        state.refresh.insert(refresh.clone(), (family, false));
        self.issued.fetch_add(1, SeqCst);
        json!({"access_token": access, "refresh_token": refresh, "expires_in": LIFETIME_SECS, "token_type": "bearer"})
    }

    /// The grant itself; `None` for a refused grant (with its reply).
    fn grant(
        &self,
        form: &HashMap<String, String>,
    ) -> Result<serde_json::Value, serde_json::Value> {
        let mut state = self.state.lock().unwrap();
        match form.get("grant_type").map(String::as_str) {
            Some("password") => {
                state.next += 1;
                let family = state.next;
                Ok(self.issue(&mut state, family))
            }
            Some("refresh_token") => {
                let token = form.get("refresh_token").cloned().unwrap_or_default();
                match state.refresh.get(&token).copied() {
                    Some((family, false)) if !state.revoked_families.contains(&family) => {
                        state.refresh.insert(token, (family, true));
                        Ok(self.issue(&mut state, family))
                    }
                    Some((family, true)) => {
                        if state.revoked_families.insert(family) {
                            self.family_revocations.fetch_add(1, SeqCst);
                        }
                        Err(
                            json!({"error": "invalid_grant", "error_description": "refresh token reused"}),
                        )
                    }
                    _ => Err(json!({"error": "invalid_grant"})),
                }
            }
            _ => Err(json!({"error": "unsupported_grant_type"})),
        }
    }

    async fn token(&self, body: Bytes) -> Result<Response<Full<Bytes>>, std::io::Error> {
        self.token_calls.fetch_add(1, SeqCst);
        if self.outage.load(SeqCst) {
            self.token_calls_in_outage.fetch_add(1, SeqCst);
            self.injected_failures.fetch_add(1, SeqCst);
            return Ok(reply(
                StatusCode::SERVICE_UNAVAILABLE,
                Bytes::from_static(b"down"),
            ));
        }
        let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
        let fault = self.fault();
        if !matches!(fault, Fault::None | Fault::Slow) {
            self.injected_failures.fetch_add(1, SeqCst);
        }
        match fault {
            Fault::Status5xx => {
                return Ok(reply(
                    StatusCode::BAD_GATEWAY,
                    Bytes::from_static(b"<html>502</html>"),
                ));
            }
            Fault::Hang => {
                // Never rotates: a hung endpoint, answered long after the client gave up.
                tokio::time::sleep(Duration::from_secs(3)).await;
                return Ok(reply(StatusCode::SERVICE_UNAVAILABLE, Bytes::new()));
            }
            Fault::Garbage => {
                return Ok(reply(
                    StatusCode::OK,
                    Bytes::from_static(b"\x00\xffnot json{"),
                ));
            }
            Fault::MissingField => {
                return Ok(reply(
                    StatusCode::OK,
                    Bytes::from_static(br#"{"token_type":"bearer"}"#),
                ));
            }
            Fault::Reset => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "reset",
                ));
            }
            Fault::None | Fault::Slow => {}
        }
        let answer = match self.grant(&form) {
            Ok(tokens) => reply(StatusCode::OK, Bytes::from(tokens.to_string())),
            Err(error) => reply(StatusCode::BAD_REQUEST, Bytes::from(error.to_string())),
        };
        if let Fault::Slow = fault {
            // Rotated already; answered after the cache stopped waiting (but before the
            // token client's own timeout), so the exchange completes in the background.
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        Ok(answer)
    }

    fn api(&self, path: &str, headers: &http::HeaderMap) -> Response<Full<Bytes>> {
        self.api_calls.fetch_add(1, SeqCst);
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let Some(token) = token else {
            self.missing_credential.fetch_add(1, SeqCst);
            return reply(StatusCode::UNAUTHORIZED, Bytes::new());
        };
        let id = headers
            .get("x-req-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let revoke_early = self.faults_on.load(SeqCst) && self.roll() < 0.005;
        let mut state = self.state.lock().unwrap();
        state.attempts.entry(id).or_default().push(token.clone());
        let valid = match state.access.get_mut(&token) {
            Some((expires, revoked)) => {
                if revoke_early && !*revoked {
                    *revoked = true;
                    self.early_revocations.fetch_add(1, SeqCst);
                }
                !*revoked && Instant::now() < *expires
            }
            None => false,
        };
        if !valid {
            return reply(
                StatusCode::UNAUTHORIZED,
                Bytes::from_static(br#"{"message":"Token expired."}"#),
            );
        }
        if path == "/api/admin" {
            return reply(StatusCode::FORBIDDEN, Bytes::new());
        }
        reply(StatusCode::OK, Bytes::from_static(b"{}"))
    }
}

fn reply(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .body(Full::new(body))
        .unwrap()
}

async fn serve(server: Arc<Server>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let server = server.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let server = server.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            if parts.uri.path() == "/token" {
                                server.token(body).await
                            } else {
                                Ok::<_, std::io::Error>(
                                    server.api(parts.uri.path(), &parts.headers),
                                )
                            }
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[derive(Default, Debug)]
struct Outcomes {
    ok: usize,
    forbidden: usize,
    unauthorized: usize,
    errors: HashMap<String, usize>,
    hung: usize,
    failed_after_recovery: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_under_faults() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261124);
    let run = Duration::from_secs(secs);
    let (outage_from, outage_to, faults_stop) =
        (run.mul_f64(0.40), run.mul_f64(0.55), run.mul_f64(0.75));
    let recovery_allowance = Duration::from_secs(3);

    let server = Arc::new(Server::default());
    *server.rng.lock().unwrap() = Some(fastrand::Rng::with_seed(seed));
    let addr = serve(server.clone()).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let baseline_tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();

    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    {
        let url = format!("http://{addr}/token");
        let token_http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let token_client = TokenClient::from_service(token_http)
            .timeout(Duration::from_secs(1))
            .allow_http_loopback(true);
        let source = TokenSource::new(
            TokenRequest::oauth2_password(&url, "app", "app-secret", "alice", "pw").unwrap(),
        )
        .refresh_with(
            TokenRequest::oauth2_refresh_token(&url, "app", "app-secret").unwrap(),
            "refresh_token",
        )
        .client(token_client);
        let cache = CredentialCache::builder(source)
            .fetch_timeout(Duration::from_millis(250))
            .backoff(Duration::from_millis(50), Duration::from_secs(1))
            .build()
            .unwrap();
        let api = Client::builder(TokioExecutor::new())
            .build_http::<tower_client_auth::ReplayBody<Full<Bytes>>>();
        let svc = AuthLayer::with_cache(cache)
            .any_https_origin()
            .allow_http_loopback(true)
            .layer(api);

        server.faults_on.store(true, SeqCst);
        let start = Instant::now();
        let ids = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let (svc, outcomes, ids) = (svc.clone(), outcomes.clone(), ids.clone());
                tokio::spawn(async move {
                    let mut rng = fastrand::Rng::with_seed(seed ^ w as u64);
                    while start.elapsed() < run {
                        let began = start.elapsed();
                        let id = ids.fetch_add(1, SeqCst).to_string();
                        let path = if rng.f64() < 0.02 {
                            "/api/admin"
                        } else {
                            "/api/items"
                        };
                        let req = Request::get(format!("http://{addr}{path}"))
                            .header("x-req-id", &id)
                            .body(Full::default())
                            .unwrap();
                        let result = tokio::time::timeout(DEADLINE, async {
                            let res = svc.clone().oneshot(req).await?;
                            let status = res.status();
                            res.into_body().collect().await?;
                            Ok::<_, tower_client_auth::BoxError>(status)
                        })
                        .await;
                        if !matches!(result, Ok(Ok(_))) {
                            // A real caller pauses after a failure instead of spinning.
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        let mut o = outcomes.lock().unwrap();
                        let recovered = began > faults_stop + recovery_allowance;
                        match result {
                            Err(_) => o.hung += 1,
                            Ok(Ok(StatusCode::OK)) => o.ok += 1,
                            Ok(Ok(StatusCode::FORBIDDEN)) => o.forbidden += 1,
                            Ok(Ok(status)) => {
                                assert_eq!(status, StatusCode::UNAUTHORIZED, "unexpected status");
                                o.unauthorized += 1;
                                o.failed_after_recovery += usize::from(recovered);
                            }
                            Ok(Err(err)) => {
                                let kind = match err.downcast_ref::<tower_client_auth::Error>() {
                                    Some(e) => format!("{:?}", e.kind()),
                                    None => format!("inner: {err}"),
                                };
                                *o.errors.entry(kind).or_default() += 1;
                                o.failed_after_recovery += usize::from(recovered);
                            }
                        }
                    }
                })
            })
            .collect();
        // The fault timeline: an outage, then calm.
        tokio::time::sleep(outage_from).await;
        server.outage.store(true, SeqCst);
        tokio::time::sleep(outage_to - outage_from).await;
        server.outage.store(false, SeqCst);
        tokio::time::sleep(faults_stop - outage_to).await;
        server.faults_on.store(false, SeqCst);
        for worker in workers {
            worker.await.expect("no panic in a worker");
        }
        let stats = svc.cache().stats();
        let token_stats = svc.cache().source().stats();
        println!("cache: {stats:?}\nsource: {token_stats:?}");
    }

    {
        let o = outcomes.lock().unwrap();
        let total = o.ok + o.forbidden + o.unauthorized + o.errors.values().sum::<usize>() + o.hung;
        let state = server.state.lock().unwrap();
        let replayed = state.attempts.values().filter(|t| t.len() == 2).count();
        let same_token_twice = state
            .attempts
            .values()
            .filter(|t| t.len() == 2 && t[0] == t[1])
            .count();
        let over_two = state.attempts.values().filter(|t| t.len() > 2).count();
        let expiries = secs / LIFETIME_SECS + 1;
        let early = server.early_revocations.load(SeqCst);
        let issued = server.issued.load(SeqCst);
        let outage_calls = server.token_calls_in_outage.load(SeqCst);
        println!(
            "soak {secs}s seed {seed}: {total} requests, {} ok, {} forbidden, {} unauthorized, errors {:?}, hung {}\n\
             api calls {}, replayed {replayed}, replays with the same token {same_token_twice}, sent over twice {over_two}, without credential {}\n\
             token calls {} (issued {issued}, injected failures {}, during the {:?} outage {outage_calls}), expiries <= {expiries}, early revocations {early}, family revocations {}\n\
             requests failed after recovery (started > {:?}): {}",
            o.ok,
            o.forbidden,
            o.unauthorized,
            o.errors,
            o.hung,
            server.api_calls.load(SeqCst),
            server.missing_credential.load(SeqCst),
            server.token_calls.load(SeqCst),
            server.injected_failures.load(SeqCst),
            outage_to - outage_from,
            server.family_revocations.load(SeqCst),
            faults_stop + recovery_allowance,
            o.failed_after_recovery,
        );

        assert!(total >= 10_000, "tens of thousands of requests: {total}");
        assert_eq!(
            server.missing_credential.load(SeqCst),
            0,
            "a request reached the API without a credential"
        );
        assert_eq!(
            same_token_twice, 0,
            "a replay carried the token that had just been rejected"
        );
        assert_eq!(over_two, 0, "a request was sent more than twice");
        assert_eq!(
            server.family_revocations.load(SeqCst),
            0,
            "a refresh token was presented twice"
        );
        assert_eq!(o.hung, 0, "a request outlived its deadline");
        for kind in o.errors.keys() {
            let known = [ErrorKind::Fetch, ErrorKind::Timeout, ErrorKind::Backoff]
                .map(|k| format!("{k:?}"));
            assert!(known.contains(kind), "untyped or unexpected error: {kind}");
        }
        // Successful issues are bounded by need: one per expiry, one per revocation (early,
        // or found expired by a 401), plus the first login and exchanges abandoned by the
        // cache; failures are retried under backoff only.
        assert!(
            issued <= 3 * (expiries as usize + early) + 10,
            "token endpoint hammered: {issued} issues"
        );
        // The outage lasts 15 % of the run; exponential backoff (50 ms doubling to 1 s) allows
        // about one call per half second after the first few.
        let outage_secs = (outage_to - outage_from).as_secs_f64();
        let outage_bound = 8 + (outage_secs / 0.5) as usize;
        assert!(
            outage_calls <= outage_bound,
            "{outage_calls} calls during the outage (bound {outage_bound})"
        );
        assert_eq!(
            o.failed_after_recovery, 0,
            "traffic did not recover on its own"
        );
    }

    // No task leak: with the layer, cache and clients dropped, the runtime's tasks fall
    // back to what the servers alone use.
    let mut alive = usize::MAX;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        alive = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        if alive <= baseline_tasks {
            break;
        }
    }
    assert!(
        alive <= baseline_tasks,
        "tasks alive: {alive}, baseline {baseline_tasks}"
    );
}
