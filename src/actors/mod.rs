//! The actor tree (ractor) and the request path.
//!
//! ```text
//!            Supervisor (restart policy, escalation)
//!   ┌──────────────┬─────────────┬──────────────┬──────────────┬─────────────┐
//! Gateway        AuthActor    KeyringActor…   StorageActor   EventsActor
//! (NATS service)               (one per keyring, spawned on first use)
//! ```
//!
//! The hot path passes through no mailbox: the gateway answers from the verified-token cache
//! and the keyring cache, and does the AEAD work in the request's own task. Actors own the
//! slow paths — verifying a new token, loading, creating or rotating a keyring's key, writing
//! to storage — and every call to one has a timeout; a call whose actor died is `unavailable`.

mod auth;
mod events;
mod gateway;
mod in_flight;
mod keyring;
mod storage;
mod supervisor;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use ractor::rpc::CallResult;
use ractor::{ActorRef, RpcReplyPort};

pub use auth::{AuthActor, AuthHandle, AuthMsg};
pub use events::{
    ensure_stream, publish_kek_rolled, EventStream, EventsActor, EventsArgs, EventsHandle,
    EventsMsg,
};
pub use gateway::{Gateway, GatewayArgs, GatewayMsg};
pub use keyring::{KeyringActor, KeyringMsg, KeyringRegistry};
pub use storage::{ActorStorage, StorageActor, StorageMsg};
pub use supervisor::{SupervisionPolicy, Supervisor, SupervisorArgs, SupervisorMsg};

use crate::error::{Error, Result};

/// The current instance of a restartable actor. The supervisor swaps in a new reference on
/// restart; callers always reach the live one (or get `unavailable` while there is none).
pub struct ActorSlot<M: ractor::Message> {
    name: &'static str,
    current: ArcSwapOption<ActorRef<M>>,
}

impl<M: ractor::Message> std::fmt::Debug for ActorSlot<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActorSlot")
            .field("name", &self.name)
            .field("live", &self.current.load().is_some())
            .finish()
    }
}

impl<M: ractor::Message> ActorSlot<M> {
    /// An empty slot for the actor called `name` in errors and logs.
    pub fn new(name: &'static str) -> Arc<Self> {
        Arc::new(Self {
            name,
            current: ArcSwapOption::empty(),
        })
    }

    /// Installs the live instance.
    pub fn set(&self, actor: ActorRef<M>) {
        self.current.store(Some(Arc::new(actor)));
    }

    /// Empties the slot.
    pub fn clear(&self) {
        self.current.store(None);
    }

    /// The live instance, if any.
    pub fn get(&self) -> Option<ActorRef<M>> {
        self.current.load().as_ref().map(|actor| (**actor).clone())
    }

    /// Calls the live instance, giving up after `timeout`.
    pub async fn call<T, F>(&self, build: F, timeout: Duration) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(RpcReplyPort<T>) -> M,
    {
        let Some(actor) = self.get() else {
            return Err(Error::unavailable(format!("{} is restarting", self.name)));
        };
        call(self.name, &actor, build, timeout).await
    }
}

/// Calls `actor`; every way the call can fail is `unavailable`, never a hang.
pub async fn call<M, T, F>(
    name: &str,
    actor: &ActorRef<M>,
    build: F,
    timeout: Duration,
) -> Result<T>
where
    M: ractor::Message,
    T: Send + 'static,
    F: FnOnce(RpcReplyPort<T>) -> M,
{
    try_call(name, actor, build, timeout)
        .await
        .unwrap_or_else(|| Err(Error::unavailable(format!("{name} is not running"))))
}

/// Like [`call`], but `None` when the message was never delivered because the actor had
/// stopped: only then may a caller safely retry with another actor (a failure while handling
/// may have done part of the work).
pub async fn try_call<M, T, F>(
    name: &str,
    actor: &ActorRef<M>,
    build: F,
    timeout: Duration,
) -> Option<Result<T>>
where
    M: ractor::Message,
    T: Send + 'static,
    F: FnOnce(RpcReplyPort<T>) -> M,
{
    match actor.call(build, Some(timeout)).await {
        Ok(CallResult::Success(value)) => Some(Ok(value)),
        Ok(CallResult::Timeout) => Some(Err(Error::unavailable(format!(
            "{name} did not answer within {timeout:?}"
        )))),
        Ok(CallResult::SenderError) => Some(Err(Error::unavailable(format!(
            "{name} failed while handling the request"
        )))),
        Err(_) => None,
    }
}

/// Consumes the method pending in `slot` if it is `method`.
#[cfg(feature = "test-hooks")]
fn take_pending(
    slot: &std::sync::Mutex<Option<crate::protocol::Method>>,
    method: crate::protocol::Method,
) -> bool {
    let mut pending = crate::lock_ignoring_poison(slot);
    if *pending == Some(method) {
        *pending = None;
        return true;
    }
    false
}

/// Fault hooks for tests: make actors fail on purpose. Compiled only with `test-hooks`.
#[cfg(feature = "test-hooks")]
#[derive(Debug, Default)]
pub struct FaultHooks {
    /// The next write handled by the StorageActor fails the actor.
    pub fail_storage_actor: std::sync::atomic::AtomicUsize,
    /// The next message handled by the KeyringActor of this keyring fails the actor.
    pub fail_keyring_actor: std::sync::Mutex<Option<String>>,
    /// The next this many starts of the StorageActor fail.
    pub fail_storage_start: std::sync::atomic::AtomicUsize,
    /// The next this many starts of the gateway fail once their tasks are spawned.
    pub fail_gateway_start: std::sync::atomic::AtomicUsize,
    /// The request loop that takes the next request of this method ends (dropping it).
    pub end_request_loop: std::sync::Mutex<Option<crate::protocol::Method>>,
    /// The next request of this method is held this long before it is handled.
    pub delay_next_request: std::sync::Mutex<Option<(crate::protocol::Method, Duration)>>,
    /// The handler of the next authenticated request of this method panics.
    pub panic_next_request: std::sync::Mutex<Option<crate::protocol::Method>>,
}

#[cfg(feature = "test-hooks")]
impl FaultHooks {
    /// Consumes one pending storage-actor failure.
    pub fn take_storage_failure(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.fail_storage_actor
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Consumes the pending end of a request loop of `method`.
    pub fn take_request_loop_end(&self, method: crate::protocol::Method) -> bool {
        take_pending(&self.end_request_loop, method)
    }

    /// Consumes the pending delay of the next request of `method`.
    pub fn take_request_delay(&self, method: crate::protocol::Method) -> Option<Duration> {
        let mut pending = crate::lock_ignoring_poison(&self.delay_next_request);
        match *pending {
            Some((delayed, delay)) if delayed == method => {
                *pending = None;
                Some(delay)
            }
            _ => None,
        }
    }

    /// Consumes the pending panic of the next authenticated request of `method`.
    pub fn take_request_panic(&self, method: crate::protocol::Method) -> bool {
        take_pending(&self.panic_next_request, method)
    }

    /// Consumes one pending failure of a gateway start.
    pub fn take_gateway_start_failure(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.fail_gateway_start
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Consumes one pending failure of a StorageActor start.
    pub fn take_storage_start_failure(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.fail_storage_start
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Consumes the pending failure of keyring `name`'s actor.
    pub fn take_keyring_failure(&self, name: &str) -> bool {
        let mut pending = crate::lock_ignoring_poison(&self.fail_keyring_actor);
        if pending.as_deref() == Some(name) {
            *pending = None;
            return true;
        }
        false
    }
}

/// What the actors share with tests: the fault hooks when compiled in, nothing otherwise.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    #[cfg(feature = "test-hooks")]
    /// The fault switches.
    pub faults: Arc<FaultHooks>,
}
