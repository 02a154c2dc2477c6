//! One behaviour matrix, run through both entry points: the Tower layer over a hyper-util
//! client, and the reqwest middleware over a reqwest client. Each case is written once;
//! `both` runs it through each entry point against a real loopback API and checks the
//! same outcome: status, `NotReplayed` marker, what the API saw, how often the source
//! was asked.
#![cfg(feature = "reqwest")]

use crate::support;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use reqwest_middleware::ClientBuilder;
use support::{Log, TestSource};
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, AuthLayerBuilder, BoxError, Credential, CredentialSource, Error, ErrorKind,
    NoReplay, NotReplayed, ReplayBody, RotatingCredential, StaticCredential,
    reqwest::AuthMiddleware,
};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Entry {
    Tower,
    Reqwest,
}

/// A request body as the caller builds it.
#[derive(Clone, Copy, Debug)]
enum Body {
    Empty,
    Bytes(&'static [u8]),
    /// Streamed in chunks, with no size known in advance.
    Chunks(&'static [&'static str]),
}

/// One request of a case.
#[derive(Clone, Copy, Debug)]
struct Call {
    path: &'static str,
    body: Body,
    no_replay: bool,
    /// An `Authorization` header the request brings itself.
    authorization: Option<&'static str>,
    /// Send to this base URL instead of the API's.
    base: Option<&'static str>,
}

impl Call {
    fn get(path: &'static str) -> Self {
        Call {
            path,
            body: Body::Empty,
            no_replay: false,
            authorization: None,
            base: None,
        }
    }

    fn body(self, body: Body) -> Self {
        Call { body, ..self }
    }
}

/// What the caller got back.
#[derive(Debug, PartialEq)]
enum Outcome {
    Answer(u16, Option<NotReplayed>),
    Failed(ErrorKind),
}

/// An API answering by `rule(path, authorization, attempt number on that path)`.
async fn api(rule: fn(&str, &str, usize) -> u16) -> (String, Log) {
    support::logging_api(move |path, auth, attempt| {
        StatusCode::from_u16(rule(path, auth, attempt)).unwrap()
    })
    .await
}

type TowerBody = BoxBody<Bytes, BoxError>;

fn tower_body(body: Body) -> TowerBody {
    match body {
        Body::Empty => Full::new(Bytes::new()).map_err(Into::into).boxed(),
        Body::Bytes(bytes) => Full::new(Bytes::from_static(bytes))
            .map_err(Into::into)
            .boxed(),
        Body::Chunks(chunks) => {
            StreamBody::new(futures_util::stream::iter(chunks.iter().map(|c| {
                Ok::<_, BoxError>(Frame::data(Bytes::from_static(c.as_bytes())))
            })))
            .boxed()
        }
    }
}

fn reqwest_body(body: Body) -> reqwest::Body {
    match body {
        Body::Empty => reqwest::Body::from(Bytes::new()),
        Body::Bytes(bytes) => reqwest::Body::from(bytes),
        Body::Chunks(chunks) => reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks
                .iter()
                .map(|c| Ok::<_, std::io::Error>(Bytes::from_static(c.as_bytes()))),
        )),
    }
}

/// The request `call` describes, as a Tower caller builds it.
fn tower_request(url: String, call: Call) -> Request<TowerBody> {
    let mut req = Request::post(url).body(tower_body(call.body)).unwrap();
    if call.no_replay {
        req.extensions_mut().insert(NoReplay);
    }
    if let Some(auth) = call.authorization {
        req.headers_mut()
            .insert(header::AUTHORIZATION, auth.parse().unwrap());
    }
    req
}

/// Sends `call` through `entry`, built from `layer` (the reqwest middleware takes the
/// layer's cache and every setting with `AuthMiddleware::from_layer`). Without `replay`,
/// the Tower layer is in `Direct` mode, over a client typed for the caller's own body.
async fn send<P: CredentialSource>(
    (entry, replay): (Entry, bool),
    layer: &AuthLayer<P>,
    base: &str,
    call: Call,
) -> Outcome {
    let url = format!("{}{}", call.base.unwrap_or(base), call.path);
    let outcome = |result: Result<http::Response<hyper::body::Incoming>, BoxError>| match result {
        Ok(res) => Outcome::Answer(
            res.status().as_u16(),
            res.extensions().get::<NotReplayed>().copied(),
        ),
        Err(err) => Outcome::Failed(
            err.downcast_ref::<Error>()
                .unwrap_or_else(|| panic!("not the crate's error: {err}"))
                .kind(),
        ),
    };
    match entry {
        Entry::Tower if !replay => {
            let http = Client::builder(TokioExecutor::new()).build_http::<TowerBody>();
            let req = tower_request(url, call);
            outcome(
                layer
                    .clone()
                    .without_replay()
                    .layer(http)
                    .oneshot(req)
                    .await,
            )
        }
        Entry::Tower => {
            let http = Client::builder(TokioExecutor::new()).build_http::<ReplayBody<TowerBody>>();
            let req = tower_request(url, call);
            outcome(layer.clone().layer(http).oneshot(req).await)
        }
        Entry::Reqwest => {
            let client = ClientBuilder::new(reqwest::Client::new())
                .with(AuthMiddleware::from_layer(layer).replay_rejected(replay))
                .build();
            let mut req = client.post(url).body(reqwest_body(call.body));
            if call.no_replay {
                req = req.with_extension(NoReplay);
            }
            if let Some(auth) = call.authorization {
                req = req.header(header::AUTHORIZATION, auth);
            }
            match req.send().await {
                Ok(res) => Outcome::Answer(
                    res.status().as_u16(),
                    res.extensions().get::<NotReplayed>().copied(),
                ),
                Err(reqwest_middleware::Error::Middleware(err)) => Outcome::Failed(
                    err.downcast_ref::<Error>()
                        .unwrap_or_else(|| panic!("not the crate's error: {err}"))
                        .kind(),
                ),
                Err(err) => panic!("{entry:?}: {err}"),
            }
        }
    }
}

/// One case: a layer, an API rule, calls and what each returns, what the API saw.
struct Case<P> {
    name: &'static str,
    source: fn() -> P,
    layer: fn(AuthLayerBuilder<P>) -> AuthLayerBuilder<P>,
    rule: fn(&str, &str, usize) -> u16,
    calls: Vec<(Call, Outcome)>,
    /// (authorization, body) per request the API saw, in order.
    seen: Vec<(&'static str, &'static str)>,
}

/// Runs `case` through both entry points, each with a fresh source, layer and API.
async fn both<P: CredentialSource>(case: Case<P>) {
    run(case, &[(Entry::Tower, true), (Entry::Reqwest, true)]).await
}

/// Runs `case`, whose outcome involves no replay, through both entry points with replay
/// on and off (the Tower layer in `Direct` mode): the same outcome from all four.
async fn everywhere<P: CredentialSource>(case: Case<P>) {
    let entries = [
        (Entry::Tower, true),
        (Entry::Tower, false),
        (Entry::Reqwest, true),
        (Entry::Reqwest, false),
    ];
    run(case, &entries).await
}

/// Runs `case` through both entry points with replay off.
async fn without_replay<P: CredentialSource>(case: Case<P>) {
    run(case, &[(Entry::Tower, false), (Entry::Reqwest, false)]).await
}

async fn run<P: CredentialSource>(case: Case<P>, entries: &[(Entry, bool)]) {
    for &entry in entries {
        let (base, log) = api(case.rule).await;
        let builder = AuthLayer::builder((case.source)()).allow_http_loopback(true);
        let layer = (case.layer)(builder).build().expect("a valid layer");
        for (i, (call, expected)) in case.calls.iter().enumerate() {
            let got = send(entry, &layer, &base, *call).await;
            assert_eq!(&got, expected, "{}: call {i} through {entry:?}", case.name);
        }
        let seen: Vec<_> = log
            .lock()
            .unwrap()
            .iter()
            .map(|(_, auth, body)| (auth.clone(), String::from_utf8_lossy(body).into_owned()))
            .collect();
        let expected: Vec<_> = case
            .seen
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(
            seen, expected,
            "{}: what the API saw through {entry:?}",
            case.name
        );
    }
}

fn ok(status: u16) -> Outcome {
    Outcome::Answer(status, None)
}

fn not_replayed(status: u16, why: NotReplayed) -> Outcome {
    Outcome::Answer(status, Some(why))
}

fn first_attempt_401(_: &str, _: &str, attempt: usize) -> u16 {
    if attempt == 1 { 401 } else { 200 }
}

fn always(status: u16) -> fn(&str, &str, usize) -> u16 {
    match status {
        200 => |_, _, _| 200,
        401 => |_, _, _| 401,
        403 => |_, _, _| 403,
        419 => |_, _, _| 419,
        _ => unreachable!(),
    }
}

/// The layer for the API's origin, whatever its port: every request's.
fn same<P: CredentialSource>(layer: AuthLayerBuilder<P>) -> AuthLayerBuilder<P> {
    layer.any_https_origin()
}

const ONE_SMALL: Body = Body::Bytes(b"hello");
const CHUNKS: Body = Body::Chunks(&["str", "eam", "ed"]);

#[tokio::test]
async fn an_accepted_credential_is_sent_once() {
    everywhere(Case {
        name: "accepted",
        source: TestSource::new,
        layer: same,
        rule: always(200),
        calls: vec![
            (Call::get("/a").body(ONE_SMALL), ok(200)),
            (Call::get("/a"), ok(200)),
        ],
        seen: vec![("Bearer token-1", "hello"), ("Bearer token-1", "")],
    })
    .await;
}

#[tokio::test]
async fn a_rejection_refreshes_and_replays_the_body_once() {
    for body in [ONE_SMALL, CHUNKS] {
        let sent = match body {
            Body::Chunks(_) => "streamed",
            _ => "hello",
        };
        both(Case {
            name: "replayed",
            source: TestSource::new,
            layer: same,
            rule: first_attempt_401,
            calls: vec![(Call::get("/a").body(body), ok(200))],
            seen: vec![("Bearer token-1", sent), ("Bearer token-2", sent)],
        })
        .await;
    }
}

#[tokio::test]
async fn a_second_rejection_is_returned_marked() {
    both(Case {
        name: "rejected twice",
        source: TestSource::new,
        layer: same,
        rule: always(401),
        calls: vec![(
            Call::get("/a"),
            not_replayed(401, NotReplayed::AlreadyReplayed),
        )],
        seen: vec![("Bearer token-1", ""), ("Bearer token-2", "")],
    })
    .await;
}

#[tokio::test]
async fn a_403_is_returned_with_no_refresh() {
    everywhere(Case {
        name: "403",
        source: TestSource::new,
        layer: same,
        rule: always(403),
        calls: vec![(Call::get("/a"), ok(403)), (Call::get("/a"), ok(403))],
        seen: vec![("Bearer token-1", ""), ("Bearer token-1", "")],
    })
    .await;
}

#[tokio::test]
async fn a_fixed_credential_is_never_replayed() {
    both(Case {
        name: "fixed",
        source: || StaticCredential::bearer("pat").unwrap(),
        layer: same,
        rule: always(401),
        calls: vec![(
            Call::get("/a"),
            not_replayed(401, NotReplayed::FixedCredential),
        )],
        seen: vec![("Bearer pat", "")],
    })
    .await;
}

#[tokio::test]
async fn the_rejected_credential_is_never_sent_again() {
    both(Case {
        name: "same credential",
        source: || RotatingCredential::new(Credential::bearer("revoked").unwrap()),
        layer: same,
        rule: always(401),
        calls: vec![(
            Call::get("/a"),
            not_replayed(401, NotReplayed::SameCredential),
        )],
        seen: vec![("Bearer revoked", "")],
    })
    .await;
}

#[tokio::test]
async fn opting_out_returns_the_401_and_still_refreshes() {
    let opted_out = Call {
        no_replay: true,
        ..Call::get("/a")
    };
    everywhere(Case {
        name: "NoReplay",
        source: TestSource::new,
        layer: same,
        rule: first_attempt_401,
        calls: vec![
            (opted_out, not_replayed(401, NotReplayed::OptedOut)),
            (Call::get("/a"), ok(200)),
        ],
        // The rejection refreshed the credential: the next request carries token-2.
        seen: vec![("Bearer token-1", ""), ("Bearer token-2", "")],
    })
    .await;
    without_replay(Case {
        name: "without replay",
        source: TestSource::new,
        layer: same,
        rule: first_attempt_401,
        calls: vec![(Call::get("/a"), not_replayed(401, NotReplayed::OptedOut))],
        seen: vec![("Bearer token-1", "")],
    })
    .await;
}

#[tokio::test]
async fn a_body_over_the_replay_limit_is_not_replayed() {
    for body in [
        Body::Bytes(b"eleven byte"),
        Body::Chunks(&["eleven", " byte"]),
    ] {
        both(Case {
            name: "over the limit",
            source: TestSource::new,
            layer: |layer| same(layer).replay_limit(4),
            rule: first_attempt_401,
            calls: vec![(
                Call::get("/a").body(body),
                not_replayed(401, NotReplayed::BodyTooLarge),
            )],
            seen: vec![("Bearer token-1", "eleven byte")],
        })
        .await;
    }
}

/// README/matrix: the reqwest adapter and the Tower layer replay by the same body
/// rules. A body of exactly `replay_limit` bytes (in memory, streamed, streamed with
/// empty chunks) and an empty stream under a limit of 0 are replayed after a 401 by
/// both entry points alike.
#[tokio::test]
async fn a_body_at_the_replay_limit_is_replayed_alike_by_both_entry_points() {
    for (limit, body, sent) in [
        (5usize, Body::Bytes(b"hello"), "hello"),
        (5, Body::Chunks(&["he", "llo"]), "hello"),
        (5, Body::Chunks(&["", "hello", ""]), "hello"),
        (0, Body::Chunks(&[]), ""),
        (0, Body::Empty, ""),
    ] {
        let _ = limit;
        let case = Case {
            name: "at the limit",
            source: TestSource::new,
            layer: match limit {
                5 => |l: AuthLayerBuilder<TestSource>| same(l).replay_limit(5),
                _ => |l: AuthLayerBuilder<TestSource>| same(l).replay_limit(0),
            },
            rule: first_attempt_401,
            calls: vec![(Call::get("/a").body(body), ok(200))],
            seen: vec![("Bearer token-1", sent), ("Bearer token-2", sent)],
        };
        both(case).await;
    }
}

#[tokio::test]
async fn other_origins_get_no_credential_and_no_replay() {
    everywhere(Case {
        name: "other origin",
        source: TestSource::new,
        layer: |layer| layer.origin("https://api.example.com").unwrap(),
        rule: always(401),
        calls: vec![(Call::get("/a"), ok(401))],
        seen: vec![("", "")],
    })
    .await;
}

#[tokio::test]
async fn a_request_with_its_own_credential_is_left_alone() {
    let own = Call {
        authorization: Some("Bearer mine"),
        ..Call::get("/a")
    };
    everywhere(Case {
        name: "own header",
        source: TestSource::new,
        layer: same,
        rule: always(401),
        calls: vec![(own, ok(401))],
        seen: vec![("Bearer mine", "")],
    })
    .await;
}

#[tokio::test]
async fn rejection_statuses_are_the_layers() {
    both(Case {
        name: "419",
        source: TestSource::new,
        layer: |layer| {
            same(layer)
                .rejection_statuses([StatusCode::UNAUTHORIZED, StatusCode::from_u16(419).unwrap()])
                .unwrap()
        },
        rule: |_, _, attempt| if attempt == 1 { 419 } else { 200 },
        calls: vec![(Call::get("/a"), ok(200))],
        seen: vec![("Bearer token-1", ""), ("Bearer token-2", "")],
    })
    .await;
}

#[tokio::test]
async fn an_api_rejecting_every_fresh_credential_gets_no_more_fetches() {
    both(Case {
        name: "fresh rejection",
        source: TestSource::new,
        layer: same,
        rule: always(401),
        calls: vec![
            (
                Call::get("/a"),
                not_replayed(401, NotReplayed::AlreadyReplayed),
            ),
            (
                Call::get("/a"),
                not_replayed(401, NotReplayed::FreshCredentialRejected),
            ),
        ],
        seen: vec![
            ("Bearer token-1", ""),
            ("Bearer token-2", ""),
            ("Bearer token-2", ""),
        ],
    })
    .await;
}

#[tokio::test]
async fn plain_http_to_a_remote_host_is_refused() {
    let remote = Call {
        base: Some("http://api.example.invalid"),
        ..Call::get("/a")
    };
    everywhere(Case {
        name: "insecure",
        source: TestSource::new,
        layer: same,
        rule: always(200),
        calls: vec![(remote, Outcome::Failed(ErrorKind::InsecureTransport))],
        seen: vec![],
    })
    .await;
}
