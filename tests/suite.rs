//! The integration suite in one test binary: each file beside this one is a module here
//! (`cargo test --test suite scope::` runs `tests/scope.rs`). One binary links the crate
//! and its dependencies once instead of forty times, which is most of what a fresh
//! `cargo test` spends compiling. A test file whose tests change the process (its
//! environment, a global tracing subscriber or metrics recorder, a counting allocator) or
//! run the test binary again as a child process stays a binary of its own: see
//! `[[test]]` in Cargo.toml. So does one that installs a panic hook (tests/secrets.rs
//! counts every panic while it runs, and other modules' tests panic on purpose).

mod support;

mod cancellation;
mod challenges;
mod clock;
mod concurrency;
mod config;
mod direct;
mod discovery;
mod dpop;
mod edges;
mod fleet;
mod fleet_interleavings;
mod grpc;
mod interleavings;
mod keep_warm;
mod keep_warm_edges;
mod layer;
mod loopback;
mod matrix;
mod mtls;
mod owed_login;
mod panics;
mod private_key_jwt;
mod quirks;
mod redirects;
mod refresh;
mod refresh_custody;
mod replay_edges;
mod replay_framing;
mod replay_order;
mod replay_wire;
mod reqwest;
mod reqwest_edges;
mod retry_after_custody;
mod retry_after_edges;
mod retry_after_fleet;
mod retry_after_refusals;
mod scope;
mod secrets_echoes;
mod send_bounds;
mod single_flight;
mod step_up_backoff;
mod styles;
mod tls;
mod undriven;
mod unknown;
mod waits;
