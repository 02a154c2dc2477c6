//! A scripted token endpoint (a Tower service, no network) behind a real `TokenSource`
//! with a login (client credentials, scope `read`) and a refresh grant: each request
//! takes the next scripted answer, or, with none left, a 200 with `at-N`/`rt-N` and an
//! hour's lifetime; every request is logged with when it came and was answered, its
//! grant, the refresh token it presented and its status.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower_client_auth::{
    BoxError, Credential, CredentialSource, FetchContext, FetchReason,
    token::{TokenClient, TokenRequest, TokenSource},
};

/// One scripted answer: after `delay`, this status, `Retry-After`, body.
#[derive(Clone)]
pub struct Scripted {
    pub delay: Duration,
    pub status: u16,
    pub retry_after: Option<&'static str>,
    pub body: String,
}

/// Each token request: when it came, when it was answered, its grant, the refresh
/// token it presented, the status it got.
pub type Logged = (Instant, Option<Instant>, String, Option<String>, u16);

/// An answer chosen by a request's grant, scope and refresh token, when no scripted
/// answer is left: `None` for the default one.
type Rule = Box<dyn Fn(&str, Option<&str>, Option<&str>) -> Option<Scripted> + Send>;

#[derive(Default)]
struct State {
    n: usize,
    script: VecDeque<Scripted>,
    rule: Option<Rule>,
    /// (arrived, answered, grant_type, refresh_token presented, status)
    log: Vec<Logged>,
    /// Each request's scope, beside `log`.
    scopes: Vec<Option<String>>,
}

#[derive(Clone, Default)]
pub struct Idp(Arc<Mutex<State>>);

fn field(form: &str, name: &str) -> Option<String> {
    form.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.replace("%20", " ").replace('+', " "))
    })
}

impl Scripted {
    /// An answer sent at once.
    pub fn now(status: u16, retry_after: Option<&'static str>, body: &str) -> Self {
        Scripted {
            delay: Duration::ZERO,
            status,
            retry_after,
            body: body.to_string(),
        }
    }

    /// An answer sent after `delay`.
    pub fn after(
        delay: Duration,
        status: u16,
        retry_after: Option<&'static str>,
        body: &str,
    ) -> Self {
        Scripted {
            delay,
            ..Scripted::now(status, retry_after, body)
        }
    }
}

impl Idp {
    pub fn push(&self, s: Scripted) {
        self.0.lock().unwrap().script.push_back(s);
    }
    /// Answers with `rule` once the script is spent (see [`Rule`]).
    pub fn rule(
        &self,
        rule: impl Fn(&str, Option<&str>, Option<&str>) -> Option<Scripted> + Send + 'static,
    ) {
        self.0.lock().unwrap().rule = Some(Box::new(rule));
    }
    /// Each request's grant, scope, the refresh token it presented and its status.
    pub fn scoped(&self) -> Vec<(String, Option<String>, Option<String>, u16)> {
        let st = self.0.lock().unwrap();
        st.log
            .iter()
            .zip(&st.scopes)
            .map(|(l, scope)| (l.2.clone(), scope.clone(), l.3.clone(), l.4))
            .collect()
    }
    pub fn log(&self) -> Vec<Logged> {
        self.0.lock().unwrap().log.clone()
    }
    /// Each request's grant, the refresh token it presented and its status.
    pub fn brief(&self) -> Vec<(String, Option<String>, u16)> {
        self.log()
            .iter()
            .map(|l| (l.2.clone(), l.3.clone(), l.4))
            .collect()
    }
    pub fn logins(&self) -> usize {
        self.log()
            .iter()
            .filter(|l| l.2 == "client_credentials")
            .count()
    }
    pub fn source(&self) -> TokenSource {
        let idp = self.clone();
        let svc = tower::service_fn(move |req: Request<Full<Bytes>>| {
            let idp = idp.clone();
            async move {
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let form = String::from_utf8_lossy(&body).to_string();
                let grant = field(&form, "grant_type").unwrap_or_default();
                let rt = field(&form, "refresh_token");
                let scope = field(&form, "scope");
                let (i, n, scripted) = {
                    let mut st = idp.0.lock().unwrap();
                    st.n += 1;
                    let n = st.n;
                    let scripted = st.script.pop_front().or_else(|| {
                        st.rule
                            .as_ref()
                            .and_then(|rule| rule(&grant, scope.as_deref(), rt.as_deref()))
                    });
                    st.log.push((Instant::now(), None, grant, rt, 0));
                    st.scopes.push(scope);
                    (st.log.len() - 1, n, scripted)
                };
                let (status, retry_after, body) = match scripted {
                    Some(s) => {
                        tokio::time::sleep(s.delay).await;
                        (s.status, s.retry_after, s.body)
                    }
                    None => (
                        200,
                        None,
                        format!(
                            r#"{{"access_token":"at-{n}","refresh_token":"rt-{n}","token_type":"Bearer","expires_in":3600}}"#
                        ),
                    ),
                };
                {
                    let mut st = idp.0.lock().unwrap();
                    st.log[i].1 = Some(Instant::now());
                    st.log[i].4 = status;
                }
                let mut res = Response::builder()
                    .status(status)
                    .header("content-type", "application/json");
                if let Some(ra) = retry_after {
                    res = res.header("retry-after", ra);
                }
                Ok::<_, std::convert::Infallible>(res.body(Full::new(Bytes::from(body))).unwrap())
            }
        });
        let url = "https://idp.test/token";
        TokenSource::new(
            TokenRequest::oauth2_client_credentials(url, "app", "secret")
                .unwrap()
                .scope("read"),
        )
        .refresh_with(
            TokenRequest::oauth2_refresh_token(url, "app", "secret").unwrap(),
            "refresh_token",
        )
        .client(TokenClient::from_service(svc))
    }
}

pub async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

impl Idp {
    /// The requests that came after the first refresh's answer and within `window` of
    /// it: how long after it, their grant, their status.
    pub fn sent_within(&self, window: Duration) -> Vec<(Duration, String, u16)> {
        let log = self.log();
        let i = log
            .iter()
            .position(|l| l.2 == "refresh_token")
            .expect("a refresh was answered");
        let answered = log[i].1.expect("the refresh was answered");
        log[i + 1..]
            .iter()
            .filter(|l| l.0 >= answered && l.0 < answered + window)
            .map(|l| (l.0 - answered, l.2.clone(), l.4))
            .collect()
    }
}

/// One fetch from `source`, for `reason`, replacing `previous`.
pub async fn fetch(
    source: &TokenSource,
    reason: FetchReason,
    previous: Option<Credential>,
) -> Result<Credential, BoxError> {
    source.fetch(FetchContext::new(reason, previous)).await
}
