//! Compile-time regression: a `source_fn` closure that uses `?` into `BoxError`, behind
//! the layer, inside a spawned (`Send`) task. With a generic `SourceFn<F>` carrying a
//! `Fut: Send` where-clause, rustc re-proves that bound with erased lifetimes and fails
//! ("implementation of `From` is not general enough"); `SourceFn` boxes at construction
//! so this compiles.

use crate::support;

use http::StatusCode;
use support::{FakeApi, get};
use tower::{Layer, ServiceExt};
use tower_client_auth::{AuthLayer, BoxError, Credential, source_fn};

/// The spawned task compiles and runs: a token parsed with `?` reaches the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_fn_with_question_mark_is_send() {
    let api = FakeApi::new(|_, token| match token {
        Some("abc") => StatusCode::OK,
        _ => StatusCode::UNAUTHORIZED,
    });
    let svc = AuthLayer::new(source_fn(|_| async {
        let (token, _lifetime) = "abc 3600".split_once(' ').ok_or("malformed")?;
        let _: u64 = _lifetime.parse()?;
        Ok::<_, BoxError>(Credential::bearer(token)?)
    }))
    .any_https_origin()
    .layer(api.service());
    let status = tokio::spawn(async move { svc.oneshot(get("/")).await.map(|r| r.status()) })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::OK);
}
