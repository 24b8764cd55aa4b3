//! StorageActor: the one writer of this process. Writes are serialized through its mailbox (a
//! DEK object, then LATEST; never the reverse, never two writers of one key racing in-process);
//! reads go straight to the store. [`ActorStorage`] is the [`ObjectStorage`] the rest of
//! ringvault uses, routing `put` and `delete` through the actor.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

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

/// The storage writer.
pub struct StorageActor;

/// State and arguments of the [`StorageActor`].
pub struct StorageActorState {
    /// The backend written to.
    pub backend: Arc<dyn ObjectStorage>,
    /// Test fault switches.
    pub hooks: Hooks,
}

impl Actor for StorageActor {
    type Msg = StorageMsg;
    type State = StorageActorState;
    type Arguments = StorageActorState;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: StorageActorState,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(state)
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
                let outcome = state.backend.put(&key, bytes, condition).await;
                // The caller may have timed out and gone; nothing to do then.
                let _ = reply.send(outcome);
            }
            StorageMsg::Delete { key, reply } => {
                let outcome = state.backend.delete(&key).await;
                // The caller may have timed out and gone; nothing to do then.
                let _ = reply.send(outcome);
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
