//! ringvault: an actor-based, event-driven envelope-encryption service over NATS,
//! wire- and storage-compatible with Unkey's Vault (see `spec/vault-v1.md`).
//!
//! Module map:
//!
//! - [`protocol`]: the wire contract, no I/O — `vault.v1` messages, the base64 envelope,
//!   the protobuf/JSON codec, subjects and header names.
//! - [`crypto`]: AES-256-GCM, [`crypto::Kek`]/[`crypto::Dek`] (zeroized on drop), the
//!   [`crypto::MasterKeys`] that seal DEKs, key ids.
//! - [`storage`]: the object-store trait and backends (memory, local directory, S3), the
//!   key layout, keyring validation, time-bounded retries.
//! - [`keyring`]: the DEK lifecycle of a keyring — get-or-create LATEST, rotate, look up by id,
//!   the fresh/stale DEK cache — and the master-key roll.
//! - [`auth`]: credentials → [`auth::Principal`], permissions, static tokens.
//! - [`actors`]: the actor tree — supervisor, gateway (NATS), auth, keyring, storage.
//! - [`rpc`]: what each RPC does with a decoded request and a principal.
//! - [`server`]: bootstrap from [`config::Config`] and the run/shutdown lifecycle.
//! - [`http`]: health and Prometheus metrics over HTTP, behind role tokens.
//! - [`config`]: typed configuration (embedded defaults, file, `RINGVAULT_*` variables).
//! - [`pattern`]: keyring patterns (`ws_42/*`) of grants and rotation ages.
//! - [`error`]: the one [`Error`] with a [`Kind`] that maps to wire codes.
//! - [`client`]: a typed async client of the NATS API (retries, timeouts, service errors).
//! - [`bench`](mod@bench): the load generator of `ringvault bench`, with an echo baseline.
//! - [`fuzzing`]: the entry points of the fuzz targets in `fuzz/`, one per decoder of untrusted
//!   bytes (requests, envelopes, stored keys, tokens, JWKS, events).
//! - `buffer` (internal): appending large payloads to buffers without glibc's slow copy case.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod actors;
pub mod auth;
pub mod bench;
mod buffer;
pub mod client;
pub mod config;
pub mod crypto;
pub mod error;
pub mod fuzzing;
pub mod http;
pub mod keyring;
pub mod pattern;
pub mod protocol;
pub mod rpc;
pub mod server;
pub mod storage;

pub use error::{Error, Kind, Result};

/// The guard of `mutex`, poisoned or not: for mutexes whose sections leave no half-done state,
/// so that a panic elsewhere while one was held breaks nothing.
pub(crate) fn lock_ignoring_poison<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
