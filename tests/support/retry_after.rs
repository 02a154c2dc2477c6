//! A token endpoint for `Retry-After` scenarios: a Tower service (no network) behind a
//! real `TokenSource`, answering 200 with a 100 s token or 503 `Retry-After: 60` (or the
//! time set with `Idp::retry_after`), each request held at a gate if one is set, every
//! request logged with when it came and was answered.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tokio::{sync::Semaphore, time::Instant};
use tower_client_auth::token::{TokenClient, TokenSource};

/// Lets spawned tasks run (paused time).
pub async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// A token endpoint (a Tower service, no network): answers 200 with a 100 s token, or
/// 503 with `Retry-After: 60` while `failing`; each request may be held at a gate.
#[derive(Clone, Default)]
pub struct Idp {
    pub state: Arc<IdpState>,
    /// Asks for a scope (`read`), so a step-up can widen it.
    pub scoped: bool,
}

#[derive(Default)]
pub struct IdpState {
    n: AtomicUsize,
    failing: std::sync::atomic::AtomicBool,
    /// The `Retry-After` of a 503, in seconds; 0: 60.
    retry_after: std::sync::atomic::AtomicU64,
    gate: Mutex<Option<Arc<Semaphore>>>,
    /// (when the request arrived, when it was answered, status)
    log: Mutex<Vec<(Instant, Option<Instant>, u16)>>,
}

impl Idp {
    pub fn source(&self) -> TokenSource {
        let idp = self.clone();
        let svc = tower::service_fn(move |_req: Request<Full<Bytes>>| {
            let idp = idp.clone();
            async move {
                let n = idp.state.n.fetch_add(1, Ordering::SeqCst) + 1;
                let i = {
                    let mut log = idp.state.log.lock().unwrap();
                    log.push((Instant::now(), None, 0));
                    log.len() - 1
                };
                let gate = idp.state.gate.lock().unwrap().clone();
                if let Some(gate) = gate {
                    gate.acquire().await.unwrap().forget();
                }
                let failing = idp.state.failing.load(Ordering::SeqCst);
                let (status, body) = if failing {
                    (503, r#"{"error":"temporarily_unavailable"}"#.to_string())
                } else {
                    (
                        200,
                        format!(
                            r#"{{"access_token":"at-{n}","token_type":"Bearer","expires_in":100}}"#
                        ),
                    )
                };
                {
                    let mut log = idp.state.log.lock().unwrap();
                    log[i].1 = Some(Instant::now());
                    log[i].2 = status;
                }
                let mut res = Response::builder()
                    .status(status)
                    .header("content-type", "application/json");
                if failing {
                    res = res.header("retry-after", idp.retry_after().as_secs().to_string());
                }
                Ok::<_, std::convert::Infallible>(res.body(Full::new(Bytes::from(body))).unwrap())
            }
        });
        self.scoped.then_some(()).map_or_else(
            || {
                TokenSource::client_credentials("https://idp.test/token", "app", "secret")
                    .unwrap()
                    .client(TokenClient::from_service(svc.clone()))
            },
            |()| {
                TokenSource::new(
                    tower_client_auth::token::TokenRequest::oauth2_client_credentials(
                        "https://idp.test/token",
                        "app",
                        "secret",
                    )
                    .unwrap()
                    .scope("read"),
                )
                .client(TokenClient::from_service(svc.clone()))
            },
        )
    }

    pub fn requests(&self) -> usize {
        self.state.n.load(Ordering::SeqCst)
    }

    pub fn gate(&self) -> Arc<Semaphore> {
        let gate = Arc::new(Semaphore::new(0));
        *self.state.gate.lock().unwrap() = Some(gate.clone());
        gate
    }

    pub fn ungate(&self) {
        *self.state.gate.lock().unwrap() = None;
    }

    /// A 503's `Retry-After` from now on.
    pub fn set_retry_after(&self, after: Duration) {
        self.state
            .retry_after
            .store(after.as_secs().max(1), Ordering::SeqCst);
    }

    pub fn retry_after(&self) -> Duration {
        match self.state.retry_after.load(Ordering::SeqCst) {
            0 => Duration::from_secs(60),
            secs => Duration::from_secs(secs),
        }
    }

    pub fn set_failing(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::SeqCst);
    }

    pub fn log(&self) -> Vec<(Instant, Option<Instant>, u16)> {
        self.state.log.lock().unwrap().clone()
    }

    /// Token requests that arrived within `Retry-After` (60 s unless set) of a 503's
    /// answer (logged after it: one logged before it came first, even at the same paused
    /// instant).
    pub fn violations(&self) -> Vec<String> {
        let log = self.log();
        let mut out = Vec::new();
        for (i, (_, answered, status)) in log.iter().enumerate() {
            if *status != 503 {
                continue;
            }
            let answered = answered.unwrap();
            for (arrived, _, s) in &log[i + 1..] {
                if *arrived >= answered && *arrived < answered + self.retry_after() {
                    out.push(format!(
                        "a token request {:?} after a 503 Retry-After: {:?} (it got {s})",
                        *arrived - answered,
                        self.retry_after()
                    ));
                }
            }
        }
        out
    }
}
