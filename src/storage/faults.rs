//! A storage wrapper that fails on demand, for tests of what happens when storage misbehaves.
//! Compiled only for tests and the `test-hooks` feature.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;

use super::{ObjectStorage, PutCondition, StorageError, Stored};

/// Switches shared between a test and its [`FaultyStorage`].
#[derive(Debug, Default)]
pub struct Faults {
    /// Every call fails while set.
    pub down: AtomicBool,
    /// The next this many calls fail.
    pub fail_next: AtomicUsize,
    /// Calls made so far (`get` and `put`).
    pub calls: AtomicUsize,
    /// `put` calls made so far.
    pub puts: AtomicUsize,
    /// The next put of a `LATEST` object is written, then answered with an error (an answer
    /// lost after the write landed).
    pub lose_next_latest_answer: AtomicBool,
    /// With `lose_next_latest_answer`: every call after that lost answer fails (the store
    /// went away right after the write landed).
    pub down_after_lost_answer: AtomicBool,
    /// Just before the next conditional put of a `LATEST` object, that object is written again
    /// with its own bytes: a new version of the same key, as `roll-deks` resealing it makes.
    pub reseal_latest_before_next_put: AtomicBool,
    /// Every `get` takes this many milliseconds longer (a store far away).
    pub get_delay_ms: std::sync::atomic::AtomicU64,
}

impl Faults {
    fn should_fail(&self) -> bool {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return true;
        }
        self.fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Sets or clears the outage.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}

/// Wraps a backend and fails its calls as [`Faults`] say.
pub struct FaultyStorage {
    inner: Arc<dyn ObjectStorage>,
    faults: Arc<Faults>,
}

impl FaultyStorage {
    /// `inner`, failing on demand through the returned switches.
    pub fn new(inner: Arc<dyn ObjectStorage>) -> (Self, Arc<Faults>) {
        let faults = Arc::new(Faults::default());
        (
            Self {
                inner,
                faults: faults.clone(),
            },
            faults,
        )
    }

    fn injected(operation: &'static str, key: &str) -> StorageError {
        StorageError::Unavailable {
            operation,
            key: key.to_owned(),
            detail: "injected fault".to_owned(),
        }
    }
}

#[async_trait::async_trait]
impl ObjectStorage for FaultyStorage {
    async fn get(&self, key: &str) -> Result<Option<Stored>, StorageError> {
        if self.faults.should_fail() {
            return Err(Self::injected("get", key));
        }
        let delay = self.faults.get_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        self.inner.get(key).await
    }

    async fn put(
        &self,
        key: &str,
        bytes: Bytes,
        condition: PutCondition,
    ) -> Result<(), StorageError> {
        self.faults.puts.fetch_add(1, Ordering::SeqCst);
        if self.faults.should_fail() {
            return Err(Self::injected("put", key));
        }
        if key.ends_with(super::LATEST)
            && condition != PutCondition::Overwrite
            && self
                .faults
                .reseal_latest_before_next_put
                .swap(false, Ordering::SeqCst)
        {
            if let Some(current) = self.inner.get(key).await? {
                self.inner
                    .put(key, current.bytes, PutCondition::Overwrite)
                    .await?;
            }
        }
        let written = self.inner.put(key, bytes, condition).await;
        if written.is_ok()
            && key.ends_with(super::LATEST)
            && self
                .faults
                .lose_next_latest_answer
                .swap(false, Ordering::SeqCst)
        {
            if self.faults.down_after_lost_answer.load(Ordering::SeqCst) {
                self.faults.set_down(true);
            }
            return Err(Self::injected("put", key));
        }
        written
    }

    fn list(&self, prefix: &str) -> BoxStream<'static, Result<String, StorageError>> {
        self.inner.list(prefix)
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        if self.faults.should_fail() {
            return Err(Self::injected("delete", key));
        }
        self.inner.delete(key).await
    }

    fn supports_conditional_writes(&self) -> bool {
        self.inner.supports_conditional_writes()
    }

    fn describe(&self) -> String {
        format!("faulty:{}", self.inner.describe())
    }
}
