//! What an operator graphs (feature `metrics`): counters and histograms through the
//! [`metrics`](https://docs.rs/metrics) facade, which costs nothing until the application
//! installs a recorder (Prometheus, StatsD, OpenTelemetry through their exporters). Every
//! series carries `cache`, the name given to
//! [`CredentialCacheBuilder::name`](crate::CredentialCacheBuilder::name) (`default`
//! otherwise); never a secret, a URL or a server's text. The names, with their other
//! labels, are listed in README's "Metrics" section. Without the feature every call here
//! compiles to nothing.

use std::time::Duration;

/// The name of a cache's series.
pub(crate) type Name = std::sync::Arc<str>;

#[cfg(feature = "metrics")]
mod on {
    use super::*;
    use ::metrics::{counter, histogram};

    pub(crate) fn source_fetch(cache: &Name, outcome: &'static str, took: Duration) {
        counter!("tower_client_auth_source_fetches_total", "cache" => cache.to_string(), "outcome" => outcome)
            .increment(1);
        histogram!("tower_client_auth_source_fetch_duration_seconds", "cache" => cache.to_string(), "outcome" => outcome)
            .record(took.as_secs_f64());
    }

    pub(crate) fn refresh(cache: &Name, outcome: &'static str, took: Duration) {
        counter!("tower_client_auth_refreshes_total", "cache" => cache.to_string(), "outcome" => outcome)
            .increment(1);
        histogram!("tower_client_auth_refresh_duration_seconds", "cache" => cache.to_string(), "outcome" => outcome)
            .record(took.as_secs_f64());
    }

    pub(crate) fn event(cache: &Name, name: &'static str) {
        counter!(name, "cache" => cache.to_string()).increment(1);
    }

    pub(crate) fn lease_wait(cache: &Name, took: Duration) {
        histogram!("tower_client_auth_lease_wait_seconds", "cache" => cache.to_string())
            .record(took.as_secs_f64());
    }

    pub(crate) fn store_error(cache: &Name, call: &'static str) {
        counter!("tower_client_auth_store_errors_total", "cache" => cache.to_string(), "call" => call)
            .increment(1);
    }
}

#[cfg(not(feature = "metrics"))]
mod on {
    use super::*;

    pub(crate) fn source_fetch(_: &Name, _: &'static str, _: Duration) {}
    pub(crate) fn refresh(_: &Name, _: &'static str, _: Duration) {}
    pub(crate) fn event(_: &Name, _: &'static str) {}
    pub(crate) fn lease_wait(_: &Name, _: Duration) {}
    pub(crate) fn store_error(_: &Name, _: &'static str) {}
}

pub(crate) use on::{event, lease_wait, refresh, source_fetch, store_error};

/// Callers that waited for a refresh in flight.
pub(crate) const WAITS: &str = "tower_client_auth_waits_total";
/// Credentials the API rejected (each invalidated once).
pub(crate) const REJECTIONS: &str = "tower_client_auth_rejections_total";
/// Requests sent again with a new credential after a rejection.
pub(crate) const REPLAYS: &str = "tower_client_auth_replays_total";
/// Refreshes served by a credential another process (or cache) saved in the store.
pub(crate) const STORE_HITS: &str = "tower_client_auth_store_hits_total";
/// Leases taken after waiting for a holder that never saved (it died, or failed).
pub(crate) const LEASE_TAKEOVERS: &str = "tower_client_auth_lease_takeovers_total";
/// Renewals that found the lease gone (the holder was paused past it).
pub(crate) const LEASES_LOST: &str = "tower_client_auth_leases_lost_total";
/// Tries to save a rotated refresh token the store missed.
pub(crate) const SAVE_RETRIES: &str = "tower_client_auth_save_retries_total";

/// The outcome label of a refresh or a source fetch.
pub(crate) fn outcome(result: &Result<crate::Credential, crate::Error>) -> &'static str {
    use crate::ErrorKind;
    match result {
        Ok(_) => "ok",
        Err(e) if e.held => "held",
        Err(e) => match e.kind() {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Expired => "expired",
            ErrorKind::SourcePanicked => "panicked",
            ErrorKind::Cancelled => "cancelled",
            _ => "error",
        },
    }
}
