//! The integration tests, as one test binary.
//!
//! Every file under `tests/` is its own binary that links the whole dependency tree (AWS-LC,
//! ring, object_store, ...); one binary instead of one per suite keeps a clean test build to
//! a single link and a fraction of the disk. Run one suite with its module path, for example
//! `cargo test --test integration service_faults::`.
//!
//! `tests/http.rs` stays apart: it checks exact counter deltas on the process-wide metrics
//! recorder, which the other suites' services would move if they shared its process.

#[path = "../common/mod.rs"]
mod common;

mod auth_jwks;
mod auth_tokens;
mod auth_wire;
mod bench_echo;
mod cli_client;
mod events;
mod harness;
mod s3_storage;
mod service_faults;
mod service_rpc;
mod service_shutdown;
mod tampering;
mod vault_compat;
