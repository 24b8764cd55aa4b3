//! StorageActor: the one writer of this process. Every write goes through its mailbox, and writes
//! of one object key run one at a time in mailbox order (never two writers of one key racing
//! in-process); writes of different keys run side by side, up to [`MAX_CONCURRENT_WRITES`], so
//! that 64 new keyrings do not wait on each other's round trips to the store. The DEK-before-
//! LATEST order is each keyring's own: its KeyringActor awaits the DEK write before it sends
//! LATEST. Reads go straight to the store. [`ActorStorage`] is the [`ObjectStorage`] the rest
//! of ringvault uses, routing `put` and `delete` through the actor.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use futures::stream::BoxStream;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::{oneshot, Semaphore};

use super::{ActorSlot, Hooks};
use crate::storage::{ObjectStorage, PutCondition, StorageError, Stored};

/// Messages of the [`StorageActor`].
pub enum StorageMsg {
    /// Write one object.
    Put {
        /// Object key.
        key: String,
        /// Bytes.
        bytes: Bytes,
        /// Condition.
        condition: PutCondition,
        /// Where the outcome goes.
        reply: RpcReplyPort<Result<(), StorageError>>,
    },
    /// Remove one object (absent is fine).
    Delete {
        /// Object key.
        key: String,
        /// Where the outcome goes.
        reply: RpcReplyPort<Result<(), StorageError>>,
    },
}

/// The most writes of different keys running against the store at once; more wait for a slot
/// (in their own tasks, not in the mailbox).
pub const MAX_CONCURRENT_WRITES: usize = 32;
/// The most writes taken and not yet answered; past it a write is refused (`Interrupted`)
/// rather than queued without bound behind a store that does not answer.
const MAX_UNANSWERED_WRITES: usize = 4096;
/// How long a stopping storage actor waits for its writes in flight (within the 10 s the
/// supervisor gives it to stop).
const WRITES_AT_STOP_TIMEOUT: Duration = Duration::from_secs(8);

/// The storage writer.
pub struct StorageActor;

/// Arguments of the [`StorageActor`].
pub struct StorageActorState {
    /// The backend written to.
    pub backend: Arc<dyn ObjectStorage>,
    /// Test fault switches.
    pub hooks: Hooks,
}

/// What the [`StorageActor`] keeps while it runs.
pub struct StorageWriter {
    backend: Arc<dyn ObjectStorage>,
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    hooks: Hooks,
    /// Bounds the writes running against the store.
    slots: Arc<Semaphore>,
    /// One permit per write taken and not yet answered, so that stopping waits for them all.
    unanswered: Arc<Semaphore>,
    /// Per key with a write queued or running: the signal that the last of them is done (a
    /// closed channel), and that write's number. Removed by that write when it is done.
    last_writes: Arc<DashMap<String, (u64, oneshot::Receiver<()>)>>,
    /// Numbers the writes.
    taken: u64,
}

impl StorageWriter {
    /// Queues a write behind the key's previous one and returns at once: the mailbox never
    /// waits on a key whose write is slow, nor on a slot. In its own task the write waits for
    /// the key's previous write, then for a slot, then runs and answers `reply`. A write
    /// whose caller has gone by then (timed out, told `unavailable`) is skipped, so that it
    /// cannot land late and change an object behind the back of a caller who was told it
    /// failed.
    fn start<F>(
        &mut self,
        key: String,
        reply: RpcReplyPort<Result<(), StorageError>>,
        write: impl FnOnce(Arc<dyn ObjectStorage>, String) -> F + Send + 'static,
    ) where
        F: std::future::Future<Output = Result<(), StorageError>> + Send + 'static,
    {
        let Ok(unanswered) = self.unanswered.clone().try_acquire_owned() else {
            let _ = reply.send(Err(StorageError::Interrupted {
                operation: "write",
                key,
            }));
            return;
        };
        self.taken += 1;
        let number = self.taken;
        let (done, done_signal) = oneshot::channel::<()>();
        let previous = self
            .last_writes
            .insert(key.clone(), (number, done_signal))
            .map(|(_, signal)| signal);
        let slots = self.slots.clone();
        let backend = self.backend.clone();
        let last_writes = self.last_writes.clone();
        tokio::spawn(async move {
            if let Some(previous) = previous {
                // Err: the previous write's task ended, which is all this waits for.
                let _ = previous.await;
            }
            let write_for_caller = async {
                if reply.is_closed() {
                    return;
                }
                let Ok(_slot) = slots.acquire_owned().await else {
                    return;
                };
                // Checked again once a slot is free: a store slow enough to fill every slot
                // is when callers give up while their writes wait.
                if reply.is_closed() {
                    return;
                }
                let _ = reply.send(write(backend, key.clone()).await);
            };
            write_for_caller.await;
            last_writes.remove_if(&key, |_, (last, _)| *last == number);
            drop(done);
            drop(unanswered);
        });
    }
}

impl Actor for StorageActor {
    type Msg = StorageMsg;
    type State = StorageWriter;
    type Arguments = StorageActorState;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        arguments: StorageActorState,
    ) -> Result<Self::State, ActorProcessingErr> {
        #[cfg(feature = "test-hooks")]
        if arguments.hooks.faults.take_storage_start_failure() {
            return Err("storage actor start failed (test fault)".into());
        }
        Ok(StorageWriter {
            backend: arguments.backend,
            hooks: arguments.hooks,
            slots: Arc::new(Semaphore::new(MAX_CONCURRENT_WRITES)),
            unanswered: Arc::new(Semaphore::new(MAX_UNANSWERED_WRITES)),
            last_writes: Arc::new(DashMap::new()),
            taken: 0,
        })
    }

    /// Waits for the writes in flight (each holds a slot until it has answered): at shutdown
    /// the process must not exit under a write it acknowledged to no one yet.
    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let all = u32::try_from(MAX_UNANSWERED_WRITES).unwrap_or(u32::MAX);
        let finished =
            tokio::time::timeout(WRITES_AT_STOP_TIMEOUT, state.unanswered.acquire_many(all)).await;
        if finished.is_err() {
            tracing::warn!("storage writes still in flight when the storage actor stopped");
        }
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            StorageMsg::Put {
                key,
                bytes,
                condition,
                reply,
            } => {
                #[cfg(feature = "test-hooks")]
                if state.hooks.faults.take_storage_failure() {
                    return Err(format!("injected storage actor fault while writing {key}").into());
                }
                state.start(key, reply, move |backend, key| async move {
                    backend.put(&key, bytes, condition).await
                });
            }
            StorageMsg::Delete { key, reply } => {
                state.start(key, reply, |backend, key| async move {
                    backend.delete(&key).await
                });
            }
        }
        Ok(())
    }
}

/// [`ObjectStorage`] whose writes and deletes go through the [`StorageActor`].
pub struct ActorStorage {
    backend: Arc<dyn ObjectStorage>,
    writer: Arc<ActorSlot<StorageMsg>>,
    call_timeout: Duration,
}

impl ActorStorage {
    /// Reads from `backend`, writes through the actor in `writer`.
    pub fn new(
        backend: Arc<dyn ObjectStorage>,
        writer: Arc<ActorSlot<StorageMsg>>,
        call_timeout: Duration,
    ) -> Self {
        Self {
            backend,
            writer,
            call_timeout,
        }
    }
}

impl ActorStorage {
    /// Hands one write to the storage actor; a writer that died or did not answer in time is
    /// `Interrupted` (not retried: the caller gets `unavailable`).
    async fn through_writer(
        &self,
        operation: &'static str,
        key: &str,
        build: impl FnOnce(RpcReplyPort<Result<(), StorageError>>) -> StorageMsg,
    ) -> Result<(), StorageError> {
        match self.writer.call(build, self.call_timeout).await {
            Ok(result) => result,
            Err(error) => {
                tracing::warn!(operation, key, %error, "storage writer did not complete the call");
                Err(StorageError::Interrupted {
                    operation,
                    key: key.to_owned(),
                })
            }
        }
    }
}

#[async_trait::async_trait]
impl ObjectStorage for ActorStorage {
    async fn get(&self, key: &str) -> Result<Option<Stored>, StorageError> {
        self.backend.get(key).await
    }

    async fn put(
        &self,
        key: &str,
        bytes: Bytes,
        condition: PutCondition,
    ) -> Result<(), StorageError> {
        let key_owned = key.to_owned();
        self.through_writer("put", key, |reply| StorageMsg::Put {
            key: key_owned,
            bytes,
            condition,
            reply,
        })
        .await
    }

    fn list(&self, prefix: &str) -> BoxStream<'static, Result<String, StorageError>> {
        self.backend.list(prefix)
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let key_owned = key.to_owned();
        self.through_writer("delete", key, |reply| StorageMsg::Delete {
            key: key_owned,
            reply,
        })
        .await
    }

    fn supports_conditional_writes(&self) -> bool {
        self.backend.supports_conditional_writes()
    }

    fn describe(&self) -> String {
        self.backend.describe()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex as StdMutex;

    use super::*;
    use crate::storage::ObjectStoreBackend;

    /// A store whose writes wait until the test lets them go, counting how many are in flight
    /// and recording the bytes of each write in the order the writes finish.
    struct GatedStorage {
        inner: ObjectStoreBackend,
        gate: Arc<Semaphore>,
        in_flight: AtomicUsize,
        most_in_flight: AtomicUsize,
        finished: StdMutex<Vec<Bytes>>,
    }

    #[async_trait::async_trait]
    impl ObjectStorage for GatedStorage {
        async fn get(&self, key: &str) -> Result<Option<Stored>, StorageError> {
            self.inner.get(key).await
        }

        async fn put(
            &self,
            key: &str,
            bytes: Bytes,
            condition: PutCondition,
        ) -> Result<(), StorageError> {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_in_flight.fetch_max(now, Ordering::SeqCst);
            self.gate.acquire().await.expect("gate open").forget();
            let outcome = self.inner.put(key, bytes.clone(), condition).await;
            self.finished.lock().unwrap().push(bytes);
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            outcome
        }

        fn list(&self, prefix: &str) -> BoxStream<'static, Result<String, StorageError>> {
            self.inner.list(prefix)
        }

        async fn delete(&self, key: &str) -> Result<(), StorageError> {
            self.inner.delete(key).await
        }

        fn supports_conditional_writes(&self) -> bool {
            self.inner.supports_conditional_writes()
        }

        fn describe(&self) -> String {
            "gated".to_owned()
        }
    }

    async fn writer(gated: Arc<GatedStorage>) -> (ActorStorage, ActorRef<StorageMsg>) {
        writer_waiting(gated, Duration::from_secs(10)).await
    }

    async fn writer_waiting(
        gated: Arc<GatedStorage>,
        call_timeout: Duration,
    ) -> (ActorStorage, ActorRef<StorageMsg>) {
        let (actor, _) = Actor::spawn(
            None,
            StorageActor,
            StorageActorState {
                backend: gated,
                hooks: Hooks::default(),
            },
        )
        .await
        .unwrap();
        let slot = ActorSlot::new("storage");
        slot.set(actor.clone());
        let storage = ActorStorage::new(
            Arc::new(ObjectStoreBackend::in_memory()),
            slot,
            call_timeout,
        );
        (storage, actor)
    }

    fn put_in_background(
        storage: &Arc<ActorStorage>,
        key: &str,
        bytes: &'static str,
    ) -> tokio::task::JoinHandle<Result<(), StorageError>> {
        let storage = storage.clone();
        let key = key.to_owned();
        tokio::spawn(async move {
            storage
                .put(&key, Bytes::from(bytes), PutCondition::Overwrite)
                .await
        })
    }

    /// A key whose write is slow holds up its own later writes, not the writes of other
    /// keys sent after them.
    #[tokio::test]
    async fn a_slow_key_does_not_hold_up_other_keys() {
        let store = gated();
        let (storage, actor) = writer(store.clone()).await;
        let storage = Arc::new(storage);
        let first = put_in_background(&storage, "keyring/slow/LATEST", "a1");
        wait_for(|| store.in_flight.load(Ordering::SeqCst) == 1).await;
        let second = put_in_background(&storage, "keyring/slow/LATEST", "a2");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let other = put_in_background(&storage, "keyring/other/LATEST", "b");
        wait_for(|| store.in_flight.load(Ordering::SeqCst) == 2).await;
        store.gate.add_permits(3);
        for write in [first, second, other] {
            write.await.unwrap().unwrap();
        }
        let order = store.finished.lock().unwrap().clone();
        let position = |bytes: &str| order.iter().position(|done| done == bytes).unwrap();
        assert!(position("a1") < position("a2"), "{order:?}");
        actor.stop(None);
    }

    /// A write whose caller gave up waiting is not made later: the caller was told it failed.
    #[tokio::test]
    async fn a_write_whose_caller_has_gone_is_skipped() {
        let store = gated();
        let (storage, actor) = writer_waiting(store.clone(), Duration::from_millis(200)).await;
        let storage = Arc::new(storage);
        let first = put_in_background(&storage, "keyring/k/LATEST", "kept");
        wait_for(|| store.in_flight.load(Ordering::SeqCst) == 1).await;
        let late = put_in_background(&storage, "keyring/k/LATEST", "late");
        let gave_up = late.await.unwrap().unwrap_err();
        assert!(
            matches!(gave_up, StorageError::Interrupted { .. }),
            "{gave_up:?}"
        );
        store.gate.add_permits(2);
        let _ = first.await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(*store.finished.lock().unwrap(), vec![Bytes::from("kept")]);
        let stored = store.get("keyring/k/LATEST").await.unwrap().unwrap();
        assert_eq!(stored.bytes, Bytes::from("kept"));
        actor.stop(None);
    }

    fn gated() -> Arc<GatedStorage> {
        Arc::new(GatedStorage {
            inner: ObjectStoreBackend::in_memory(),
            gate: Arc::new(Semaphore::new(0)),
            in_flight: AtomicUsize::new(0),
            most_in_flight: AtomicUsize::new(0),
            finished: StdMutex::new(Vec::new()),
        })
    }

    async fn wait_for(what: impl Fn() -> bool) {
        for _ in 0..500 {
            if what() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not reached within 5 s");
    }

    #[tokio::test]
    async fn writes_of_different_keys_run_side_by_side() {
        let store = gated();
        let (storage, actor) = writer(store.clone()).await;
        let storage = Arc::new(storage);
        let writes: Vec<_> = (0..8)
            .map(|index| {
                let storage = storage.clone();
                tokio::spawn(async move {
                    storage
                        .put(
                            &format!("keyring/k{index}/LATEST"),
                            Bytes::from("x"),
                            PutCondition::Overwrite,
                        )
                        .await
                })
            })
            .collect();
        // All eight reach the store before any of them is let through.
        wait_for(|| store.in_flight.load(Ordering::SeqCst) == 8).await;
        store.gate.add_permits(8);
        for write in writes {
            write.await.unwrap().unwrap();
        }
        assert_eq!(store.most_in_flight.load(Ordering::SeqCst), 8);
        actor.stop(None);
    }

    #[tokio::test]
    async fn a_stopping_writer_waits_for_its_writes_in_flight() {
        let store = gated();
        let (storage, actor) = writer(store.clone()).await;
        let write = tokio::spawn(async move {
            storage
                .put(
                    "keyring/k/LATEST",
                    Bytes::from("x"),
                    PutCondition::Overwrite,
                )
                .await
        });
        wait_for(|| store.in_flight.load(Ordering::SeqCst) == 1).await;
        let stopping = tokio::spawn(async move { actor.stop_and_wait(None, None).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!stopping.is_finished(), "stopped under a write in flight");
        store.gate.add_permits(1);
        write.await.unwrap().unwrap();
        stopping.await.unwrap().unwrap();
        assert!(store.get("keyring/k/LATEST").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn writes_of_one_key_run_one_at_a_time_in_order() {
        let store = gated();
        let (storage, actor) = writer(store.clone()).await;
        let storage = Arc::new(storage);
        let mut writes = Vec::new();
        for version in 0..5 {
            let storage = storage.clone();
            writes.push(tokio::spawn(async move {
                storage
                    .put(
                        "keyring/k/LATEST",
                        Bytes::from(format!("v{version}")),
                        PutCondition::Overwrite,
                    )
                    .await
            }));
            // Each write is in the mailbox before the next is sent.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        wait_for(|| store.in_flight.load(Ordering::SeqCst) == 1).await;
        store.gate.add_permits(5);
        for write in writes {
            write.await.unwrap().unwrap();
        }
        assert_eq!(store.most_in_flight.load(Ordering::SeqCst), 1);
        let expected: Vec<Bytes> = (0..5).map(|v| Bytes::from(format!("v{v}"))).collect();
        assert_eq!(*store.finished.lock().unwrap(), expected);
        let stored = store.get("keyring/k/LATEST").await.unwrap().unwrap();
        assert_eq!(stored.bytes, Bytes::from("v4"));
        actor.stop(None);
    }
}
