//! Object storage: a small trait ([`ObjectStorage`]) over `object_store` backends (memory,
//! local directory, S3), the [`Storage`] handle that bounds every call in time and retries
//! transient failures, and the key layout of spec/vault-v1.md:
//!
//! ```text
//! keyring/<keyring>/<dek_id>   protobuf EncryptedDataEncryptionKey
//! keyring/<keyring>/LATEST     a byte copy of the newest one
//! ```
//!
//! Keyring names and key ids are validated here, before any path is built.

mod backend;
#[cfg(any(test, feature = "test-hooks"))]
mod faults;
mod paths;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt as _;

pub use backend::{ObjectStoreBackend, S3Settings};
#[cfg(any(test, feature = "test-hooks"))]
pub use faults::{Faults, FaultyStorage};
pub use paths::{
    dek_key, keyring_of, latest_key, validate_key_id, validate_keyring, DEK_ID_PREFIX,
    KEYRING_ROOT, LATEST, MAX_KEYRING_LEN,
};

use crate::error::Error;

/// What a storage call can fail with, at the module boundary.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StorageError {
    /// `put` with [`PutCondition::IfAbsent`] found an object already there.
    #[error("object {key} already exists")]
    AlreadyExists {
        /// The object key.
        key: String,
    },
    /// `put` with [`PutCondition::IfUnchanged`] found the object changed.
    #[error("object {key} changed since it was read")]
    Changed {
        /// The object key.
        key: String,
    },
    /// The store does not support the requested conditional write.
    #[error("the store does not support conditional writes: {detail}")]
    ConditionalUnsupported {
        /// What the store said.
        detail: String,
    },
    /// The store did not answer, answered with a server error, or refused our credentials.
    /// The detail is for logs; it may name hosts and must not reach callers.
    #[error("storage {operation} of {key} failed: {detail}")]
    Unavailable {
        /// `get`, `put`, `list` or `delete`.
        operation: &'static str,
        /// The object key or prefix.
        key: String,
        /// The store's own words, for logs only.
        detail: String,
    },
    /// The store refused the call for good: our credentials or their permissions (401, 403).
    /// Not retried, since the same call cannot succeed; the detail is for logs only.
    #[error("storage {operation} of {key} was refused: {detail}")]
    Refused {
        /// `get`, `put`, `list` or `delete`.
        operation: &'static str,
        /// The object key or prefix.
        key: String,
        /// The store's own words, for logs only.
        detail: String,
    },
    /// The storage writer died while handling this write; it is being restarted. Not retried:
    /// the caller gets `unavailable` and may try again.
    #[error("storage {operation} of {key} was interrupted: the storage writer restarted")]
    Interrupted {
        /// `put` or `delete`.
        operation: &'static str,
        /// The object key.
        key: String,
    },
    /// The call ran out of its time budget.
    #[error("storage {operation} of {key} timed out after {after:?}")]
    Timeout {
        /// `get`, `put`, `list` or `delete`.
        operation: &'static str,
        /// The object key or prefix.
        key: String,
        /// The budget.
        after: Duration,
    },
}

impl StorageError {
    /// Whether retrying the same call may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StorageError::Unavailable { .. })
    }
}

impl From<StorageError> for Error {
    fn from(error: StorageError) -> Self {
        // Callers see the operation and the object key, never the store's detail, which can
        // carry endpoint URLs.
        match &error {
            StorageError::Unavailable { operation, key, .. } => {
                Error::unavailable(format!("storage {operation} of {key} failed"))
            }
            StorageError::Refused { operation, key, .. } => {
                Error::unavailable(format!("storage {operation} of {key} was refused"))
            }
            StorageError::Timeout { .. } | StorageError::Interrupted { .. } => {
                Error::unavailable(error.to_string())
            }
            StorageError::AlreadyExists { .. } | StorageError::Changed { .. } => {
                Error::unavailable(format!("{error}; retry"))
            }
            StorageError::ConditionalUnsupported { .. } => Error::internal(error.to_string()),
        }
    }
}

/// An object's version, as the store reports it, for conditional updates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Version {
    /// The entity tag.
    pub e_tag: Option<String>,
    /// The store's version id.
    pub version: Option<String>,
}

/// An object read from the store.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The object's bytes.
    pub bytes: Bytes,
    /// Its version, for [`PutCondition::IfUnchanged`].
    pub version: Version,
}

/// When a `put` may replace what is there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutCondition {
    /// Always (last writer wins).
    Overwrite,
    /// Only when no object exists at the key.
    IfAbsent,
    /// Only when the object still has this version.
    IfUnchanged(Version),
}

/// The few operations ringvault needs from an object store.
#[async_trait::async_trait]
pub trait ObjectStorage: Send + Sync + 'static {
    /// The object at `key`; `Ok(None)` only when the store says it does not exist.
    async fn get(&self, key: &str) -> Result<Option<Stored>, StorageError>;

    /// Writes `bytes` at `key` atomically, under `condition`.
    async fn put(
        &self,
        key: &str,
        bytes: Bytes,
        condition: PutCondition,
    ) -> Result<(), StorageError>;

    /// Every object key under `prefix`, fetched page by page as the stream is read.
    fn list(&self, prefix: &str) -> BoxStream<'static, Result<String, StorageError>>;

    /// Removes the object at `key` (absent is fine). Only the startup probe deletes (its own
    /// object): keys are never deleted.
    async fn delete(&self, key: &str) -> Result<(), StorageError>;

    /// Whether [`PutCondition::IfAbsent`] and [`PutCondition::IfUnchanged`] are enforced.
    fn supports_conditional_writes(&self) -> bool;

    /// A short description for logs (`local:/var/lib/ringvault`), without credentials.
    fn describe(&self) -> String;
}

/// Time bounds of storage calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoragePolicy {
    /// Total time one call may take, retries included.
    pub timeout: Duration,
    /// Wait before the first retry; doubles each time.
    pub initial_backoff: Duration,
}

impl Default for StoragePolicy {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            initial_backoff: Duration::from_millis(50),
        }
    }
}

/// The storage handle the rest of ringvault uses: a backend plus a time budget per call, with
/// transient failures retried with exponential backoff inside that budget.
#[derive(Clone)]
pub struct Storage {
    backend: Arc<dyn ObjectStorage>,
    policy: StoragePolicy,
    conditional_writes: bool,
    /// Whether an update conditioned on the version read is enforced, as far as the startup
    /// probe could tell (assumed until then).
    compare_and_swap: bool,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("backend", &self.backend.describe())
            .field("policy", &self.policy)
            .field("conditional_writes", &self.conditional_writes)
            .field("compare_and_swap", &self.compare_and_swap)
            .finish()
    }
}

impl Storage {
    /// A handle over `backend`. Conditional writes are used when the backend enforces them.
    pub fn new(backend: Arc<dyn ObjectStorage>, policy: StoragePolicy) -> Self {
        let conditional_writes = backend.supports_conditional_writes();
        Self {
            backend,
            policy,
            conditional_writes,
            compare_and_swap: conditional_writes,
        }
    }

    /// An in-memory store, for tests and experiments.
    pub fn in_memory() -> Self {
        Self::new(
            Arc::new(ObjectStoreBackend::in_memory()),
            StoragePolicy::default(),
        )
    }

    /// Turns conditional writes off (last writer wins), whatever the backend supports.
    pub fn without_conditional_writes(mut self) -> Self {
        self.conditional_writes = false;
        self
    }

    /// Checks that the store answers (a listing of the keyring prefix) and whether it really
    /// enforces create-if-absent; turns conditional writes off when it does not. Run once at
    /// startup, so that a missing bucket, wrong credentials or an unreachable endpoint is
    /// reported then, not at the first request.
    pub async fn probe(&mut self) -> Result<(), StorageError> {
        let budget = self.policy.timeout;
        let first = tokio::time::timeout(budget, self.backend.list(KEYRING_ROOT).next()).await;
        match first {
            Err(_) => {
                return Err(StorageError::Timeout {
                    operation: "list",
                    key: KEYRING_ROOT.to_owned(),
                    after: budget,
                })
            }
            Ok(Some(Err(error))) => return Err(error),
            Ok(_) => {}
        }
        if !self.conditional_writes {
            return Ok(());
        }
        let key = format!("ringvault-probe/{}", hex::encode(rand::random::<[u8; 8]>()));
        let probe = Bytes::from_static(b"ringvault conditional write probe");
        self.backend
            .put(&key, probe.clone(), PutCondition::IfAbsent)
            .await?;
        let second = self
            .backend
            .put(&key, probe.clone(), PutCondition::IfAbsent)
            .await;
        let update = match &second {
            Err(StorageError::AlreadyExists { .. }) => Some(
                self.backend
                    .put(
                        &key,
                        probe,
                        PutCondition::IfUnchanged(Version {
                            e_tag: Some("\"ringvault-probe-no-such-version\"".to_owned()),
                            version: None,
                        }),
                    )
                    .await,
            ),
            _ => None,
        };
        let _ = self.backend.delete(&key).await;
        match second {
            Err(StorageError::AlreadyExists { .. }) => {
                if !matches!(update, Some(Err(StorageError::Changed { .. }))) {
                    tracing::warn!(
                        store = self.backend.describe(),
                        "the store enforces create-if-absent but not compare-and-swap: a rotation \
                         racing another writer of LATEST (another replica's rotation, roll-deks) \
                         falls back to last-writer-wins (no key is lost; LATEST may end on the \
                         older of two new keys, and two replicas may both rotate on schedule)"
                    );
                    self.compare_and_swap = false;
                }
                Ok(())
            }
            Ok(()) | Err(StorageError::ConditionalUnsupported { .. }) => {
                tracing::warn!(
                    store = self.backend.describe(),
                    "the store does not enforce conditional writes: falling back to last-writer-wins \
                     (no key is lost; two replicas racing a keyring's first use may both create a key)"
                );
                self.conditional_writes = false;
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    /// This handle with updates by version sent as plain writes, as the startup probe decides
    /// for a store that does not compare versions (for a handle that was not probed itself).
    pub fn without_compare_and_swap(mut self) -> Self {
        self.compare_and_swap = false;
        self
    }

    /// Whether writes that must not clobber a concurrent writer are conditional.
    pub fn conditional_writes(&self) -> bool {
        self.conditional_writes
    }

    /// Whether updates conditioned on the version read (LATEST's replacement) are enforced;
    /// the startup probe finds out.
    pub fn compare_and_swap(&self) -> bool {
        self.conditional_writes && self.compare_and_swap
    }

    /// The backend's description, for logs.
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// The time policy.
    pub fn policy(&self) -> StoragePolicy {
        self.policy
    }

    /// Reads `key`; `Ok(None)` only on an explicit not-found.
    pub async fn get(&self, key: &str) -> Result<Option<Stored>, StorageError> {
        self.bounded("get", key, || self.backend.get(key)).await
    }

    /// Writes `key`. A condition is downgraded to [`PutCondition::Overwrite`] when conditional
    /// writes are off, and an update by version when the probe found that the store does not
    /// compare versions (it refused or ignored the probe's): every DEK is stored under its own
    /// id first, so last-writer-wins loses no key.
    pub async fn put(
        &self,
        key: &str,
        bytes: Bytes,
        condition: PutCondition,
    ) -> Result<(), StorageError> {
        let condition = match condition {
            _ if !self.conditional_writes => PutCondition::Overwrite,
            // Such a store may answer every conditional update with an error of its own (a
            // 400 or 501), and each rotation would fail, not fall back as the probe said.
            PutCondition::IfUnchanged(_) if !self.compare_and_swap => PutCondition::Overwrite,
            condition => condition,
        };
        let result = self
            .bounded("put", key, || {
                self.backend.put(key, bytes.clone(), condition.clone())
            })
            .await;
        match result {
            // A store that enforces create-if-absent but cannot compare versions: the update
            // falls back to last-writer-wins, which loses no key (see above). (The local
            // directory compares versions itself, under a lock; see `ObjectStoreBackend`.)
            Err(StorageError::ConditionalUnsupported { .. })
                if matches!(condition, PutCondition::IfUnchanged(_)) =>
            {
                self.bounded("put", key, || {
                    self.backend
                        .put(key, bytes.clone(), PutCondition::Overwrite)
                })
                .await
            }
            other => other,
        }
    }

    /// Removes `key` (absent is fine), within the same time budget as `get` and `put`.
    pub async fn delete(&self, key: &str) -> Result<(), StorageError> {
        self.bounded("delete", key, || self.backend.delete(key))
            .await
    }

    /// Every key under `prefix`, page by page.
    pub fn list(&self, prefix: &str) -> BoxStream<'static, Result<String, StorageError>> {
        self.backend.list(prefix)
    }

    /// Runs `call` until it succeeds, fails for good, or the time budget runs out.
    async fn bounded<T, F, Fut>(
        &self,
        operation: &'static str,
        key: &str,
        mut call: F,
    ) -> Result<T, StorageError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StorageError>>,
    {
        let budget = self.policy.timeout;
        let started = std::time::Instant::now();
        let attempts = async {
            let mut backoff = self.policy.initial_backoff;
            loop {
                match call().await {
                    Err(error) if error.is_transient() => {
                        metrics::counter!("ringvault_storage_retries_total", "operation" => operation)
                            .increment(1);
                        tracing::debug!(operation, key, %error, ?backoff, "storage call failed, retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                    result => return result,
                }
            }
        };
        let result = match tokio::time::timeout(budget, attempts).await {
            Ok(result) => result,
            Err(_) => Err(StorageError::Timeout {
                operation,
                key: key.to_owned(),
                after: budget,
            }),
        };
        metrics::histogram!("ringvault_storage_duration_seconds", "operation" => operation)
            .record(started.elapsed().as_secs_f64());
        if matches!(
            result,
            Err(StorageError::Unavailable { .. }
                | StorageError::Refused { .. }
                | StorageError::Timeout { .. })
        ) {
            metrics::counter!("ringvault_storage_errors_total", "operation" => operation)
                .increment(1);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store that enforces create-if-absent but cannot compare versions, as some S3
    /// implementations do; `.1` is its answer to an update by version.
    struct NoCompareAndSwap(ObjectStoreBackend, fn() -> StorageError);

    #[async_trait::async_trait]
    impl ObjectStorage for NoCompareAndSwap {
        async fn get(&self, key: &str) -> Result<Option<Stored>, StorageError> {
            self.0.get(key).await
        }

        async fn put(
            &self,
            key: &str,
            bytes: Bytes,
            condition: PutCondition,
        ) -> Result<(), StorageError> {
            if matches!(condition, PutCondition::IfUnchanged(_)) {
                return Err((self.1)());
            }
            self.0.put(key, bytes, condition).await
        }

        fn list(&self, prefix: &str) -> BoxStream<'static, Result<String, StorageError>> {
            self.0.list(prefix)
        }

        async fn delete(&self, key: &str) -> Result<(), StorageError> {
            self.0.delete(key).await
        }

        fn supports_conditional_writes(&self) -> bool {
            true
        }

        fn describe(&self) -> String {
            "no-compare-and-swap".to_owned()
        }
    }

    #[tokio::test]
    async fn the_probe_tells_whether_updates_compare_versions() {
        let mut enforced = Storage::in_memory();
        enforced.probe().await.unwrap();
        assert!(enforced.conditional_writes() && enforced.compare_and_swap());

        let mut create_only = Storage::new(
            Arc::new(NoCompareAndSwap(
                ObjectStoreBackend::in_memory(),
                unsupported,
            )),
            StoragePolicy::default(),
        );
        create_only.probe().await.unwrap();
        assert!(
            create_only.conditional_writes(),
            "create-if-absent still holds"
        );
        assert!(!create_only.compare_and_swap());
        let probes: Vec<String> = futures::TryStreamExt::try_collect(create_only.list(""))
            .await
            .unwrap();
        assert!(probes.is_empty(), "the probe cleaned up: {probes:?}");
    }

    fn unsupported() -> StorageError {
        StorageError::ConditionalUnsupported {
            detail: "no If-Match here".to_owned(),
        }
    }

    fn bad_request() -> StorageError {
        StorageError::Refused {
            operation: "put",
            key: "k".to_owned(),
            detail: "400 Bad Request: If-Match".to_owned(),
        }
    }

    /// Whatever a store answers an update by version with, once the probe has found that it
    /// does not compare versions, updates go through as plain writes (last-writer-wins, as the
    /// probe's warning says), on the probed handle and on one told so.
    #[tokio::test]
    async fn updates_fall_back_to_plain_writes_where_versions_are_not_compared() {
        for answer in [unsupported as fn() -> StorageError, bad_request] {
            let backend = Arc::new(NoCompareAndSwap(ObjectStoreBackend::in_memory(), answer));
            let mut probed = Storage::new(backend.clone(), StoragePolicy::default());
            probed.probe().await.unwrap();
            assert!(probed.conditional_writes() && !probed.compare_and_swap());
            let told = Storage::new(backend, StoragePolicy::default()).without_compare_and_swap();
            for storage in [&probed, &told] {
                storage
                    .put("k", Bytes::from_static(b"one"), PutCondition::IfAbsent)
                    .await
                    .unwrap();
                let version = storage.get("k").await.unwrap().unwrap().version;
                storage
                    .put(
                        "k",
                        Bytes::from_static(b"two"),
                        PutCondition::IfUnchanged(version),
                    )
                    .await
                    .unwrap();
                assert_eq!(&storage.get("k").await.unwrap().unwrap().bytes[..], b"two");
                // Create-if-absent still holds.
                assert!(matches!(
                    storage
                        .put("k", Bytes::from_static(b"three"), PutCondition::IfAbsent)
                        .await,
                    Err(StorageError::AlreadyExists { .. })
                ));
                storage.delete("k").await.unwrap();
            }
        }
    }
}
