//! One builder path from the source to the layer reaches every setting, and a value out
//! of range (or two settings that contradict each other) is a typed error when the layer
//! or cache is built. Before, a window jitter of 7 was clamped to 1, a backoff maximum
//! under its base raised to it, and rejection statuses outside 4xx/5xx dropped, all
//! silently.

use crate::support;

use std::time::Duration;

use http::StatusCode;
use support::{FakeApi, TestSource, get};
use tower::{Layer, ServiceExt};
use tower_client_auth::{
    AuthLayer, BoxError, Credential, CredentialCache, CredentialSource, ErrorKind, FetchContext,
    InvalidConfig,
};

fn refused<T: std::fmt::Debug>(built: Result<T, InvalidConfig>) -> &'static str {
    let err = built.expect_err("an invalid setting");
    assert!(err.to_string().starts_with("invalid "), "{err}");
    err.setting()
}

#[test]
fn invalid_settings_are_refused_when_built_and_named() {
    let layer = || AuthLayer::builder(TestSource::new()).any_https_origin();
    let cache = || CredentialCache::builder(TestSource::new());
    let ok = StatusCode::OK;
    let secs = Duration::from_secs;
    assert_eq!(
        refused(layer().rejection_statuses([ok])),
        "rejection_statuses"
    );
    assert_eq!(
        refused(layer().rejection_statuses([])),
        "rejection_statuses"
    );
    let shared =
        || AuthLayer::with_cache(CredentialCache::new(TestSource::new())).any_https_origin();
    assert_eq!(
        refused(shared().rejection_statuses([ok])),
        "rejection_statuses"
    );
    #[cfg(feature = "reqwest")]
    {
        let middleware =
            tower_client_auth::reqwest::AuthMiddleware::new(TestSource::new()).any_https_origin();
        let refused_statuses = middleware.rejection_statuses([ok]);
        assert_eq!(refused(refused_statuses), "rejection_statuses");
    }
    assert_eq!(refused(layer().window_jitter(7.0).build()), "window_jitter");
    assert_eq!(
        refused(layer().window_jitter(f64::NAN).build()),
        "window_jitter"
    );
    assert_eq!(
        refused(layer().backoff(secs(10), secs(1)).build()),
        "backoff"
    );
    assert_eq!(
        refused(layer().backoff(Duration::ZERO, secs(1)).build()),
        "backoff"
    );
    assert_eq!(
        refused(layer().fetch_timeout(Duration::ZERO).build()),
        "fetch_timeout"
    );
    let windows = layer().soft_window(secs(1)).build();
    assert_eq!(refused(windows), "soft_window");
    let windows = layer().hard_window(secs(600)).build();
    assert_eq!(
        refused(windows),
        "hard_window",
        "the one moved from its default is named"
    );
    assert_eq!(
        refused(cache().window_jitter(-1.0).build()),
        "window_jitter"
    );
    assert_eq!(
        refused(cache().backoff(secs(10), secs(1)).build()),
        "backoff"
    );

    // The boundaries are valid.
    assert!(
        layer()
            .window_jitter(1.0)
            .backoff(secs(1), secs(1))
            .build()
            .is_ok()
    );
    assert!(
        layer().soft_window(Duration::ZERO).build().is_ok(),
        "zero: no background refresh"
    );
    let statuses = [
        StatusCode::from_u16(400).unwrap(),
        StatusCode::from_u16(599).unwrap(),
    ];
    assert!(
        layer()
            .rejection_statuses(statuses)
            .unwrap()
            .build()
            .is_ok()
    );
}

/// A source that never answers.
struct Hanging;

impl CredentialSource for Hanging {
    async fn fetch(&self, _cx: FetchContext) -> Result<Credential, BoxError> {
        std::future::pending().await
    }
}

/// The cache's settings reach it through the layer's builder: here the fetch timeout,
/// which `AuthLayer::new(source).any_https_origin()` could not set.
#[tokio::test(start_paused = true)]
async fn cache_settings_reach_the_cache_through_the_layer() {
    let layer = AuthLayer::builder(Hanging)
        .any_https_origin()
        .fetch_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let svc = layer.layer(FakeApi::new(|_, _| StatusCode::OK).service());
    let started = tokio::time::Instant::now();
    let err = svc.oneshot(get("/")).await.unwrap_err();
    let err = err.downcast_ref::<tower_client_auth::Error>().unwrap();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert_eq!(started.elapsed(), Duration::from_millis(300));
}
