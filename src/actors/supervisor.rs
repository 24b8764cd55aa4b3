//! Supervisor: the root of the actor tree. Permanent children (storage, auth, gateway) are
//! restarted with exponential backoff; more than `max_restarts` failures within `window`
//! escalate: the supervisor reports a fatal error and stops, and the process exits non-zero so
//! that the orchestrator restarts it. Keyring actors are transient: a failed one is forgotten
//! and respawned on next use.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::watch;

use super::auth::{AuthActor, AuthMsg};
use super::events::{EventsActor, EventsArgs, EventsMsg};
use super::gateway::{Gateway, GatewayArgs, GatewayMsg};
use super::keyring::KeyringRegistry;
use super::storage::{StorageActor, StorageActorState, StorageMsg};
use super::{ActorSlot, Hooks};
use crate::auth::Authenticator;
use crate::keyring::RotationPolicy;
use crate::storage::ObjectStorage;

/// How often actors of evicted keyrings are stopped.
const IDLE_SWEEP_PERIOD: Duration = Duration::from_secs(30);
/// How long shutdown waits for the gateway to drain: longer than the gateway's own bounds
/// (30 s for its subscriptions, 30 s for requests in flight, 2 s for the flush).
const DRAIN_CALL_TIMEOUT: Duration = Duration::from_secs(70);
/// How long shutdown waits for the keyring actors' running operations (a rotation's writes).
/// With the default 5 s storage timeout a healthy store answers well within it; a failing one
/// is not waited for past it.
const KEYRING_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for the storage actor (which waits for its writes in flight).
const STORAGE_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// When to restart and when to give up.
#[derive(Debug, Clone, Copy)]
pub struct SupervisionPolicy {
    /// Backoff before the first restart; doubles with each failure in the window.
    pub backoff: Duration,
    /// Failures tolerated within `window`.
    pub max_restarts: usize,
    /// The window.
    pub window: Duration,
}

/// Everything the supervisor starts its children with.
pub struct SupervisorArgs {
    /// Restart policy.
    pub policy: SupervisionPolicy,
    /// The store the StorageActor writes to.
    pub storage_backend: Arc<dyn ObjectStorage>,
    /// Where the live StorageActor is published.
    pub storage_slot: Arc<ActorSlot<StorageMsg>>,
    /// Credential sources of the AuthActor.
    pub authenticator: Authenticator,
    /// Where the live AuthActor is published.
    pub auth_slot: Arc<ActorSlot<AuthMsg>>,
    /// Gateway arguments.
    pub gateway: GatewayArgs,
    /// Where the live Gateway is published.
    pub gateway_slot: Arc<ActorSlot<GatewayMsg>>,
    /// Events actor arguments.
    pub events: EventsArgs,
    /// Where the live EventsActor is published.
    pub events_slot: Arc<ActorSlot<EventsMsg>>,
    /// Keyring actors.
    pub registry: KeyringRegistry,
    /// Scheduled rotation.
    pub rotation: RotationPolicy,
    /// How often rotation ages are checked.
    pub rotation_check: Duration,
    /// Test hooks.
    pub hooks: Hooks,
    /// Set to the reason when supervision gives up.
    pub fatal: watch::Sender<Option<String>>,
}

/// Messages of the [`Supervisor`].
pub enum SupervisorMsg {
    /// Stop actors of keyrings the cache evicted.
    SweepIdle,
    /// Rotate keyrings whose LATEST reached its rotation age.
    CheckRotations,
    /// Drain and stop everything, storage last; replies when done.
    Shutdown(RpcReplyPort<()>),
    /// Start a child again, its backoff over (sent by the supervisor to itself).
    Restart(PendingRestart),
}

/// A restart the supervisor scheduled for itself.
pub struct PendingRestart {
    child: Child,
    reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Child {
    Storage,
    Auth,
    Events,
    Gateway,
}

impl Child {
    fn name(self) -> &'static str {
        match self {
            Child::Storage => "storage actor",
            Child::Auth => "auth actor",
            Child::Events => "events actor",
            Child::Gateway => "gateway",
        }
    }
}

/// State of the [`Supervisor`].
pub struct SupervisorState {
    args: SupervisorArgs,
    children: HashMap<ActorId, Child>,
    failures: VecDeque<Instant>,
    stopping: bool,
    checking_rotations: Arc<std::sync::atomic::AtomicBool>,
}

/// The root actor.
pub struct Supervisor;

impl Supervisor {
    async fn start_child(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        child: Child,
    ) -> Result<(), ActorProcessingErr> {
        let args = &state.args;
        let supervisor = myself.get_cell();
        let id = match child {
            Child::Storage => {
                let actor_state = StorageActorState {
                    backend: args.storage_backend.clone(),
                    hooks: args.hooks.clone(),
                };
                let (actor, _) =
                    Actor::spawn_linked(None, StorageActor, actor_state, supervisor).await?;
                args.storage_slot.set(actor.clone());
                actor.get_id()
            }
            Child::Auth => {
                let (actor, _) =
                    Actor::spawn_linked(None, AuthActor, args.authenticator.clone(), supervisor)
                        .await?;
                args.auth_slot.set(actor.clone());
                actor.get_id()
            }
            Child::Events => {
                let (actor, _) =
                    Actor::spawn_linked(None, EventsActor, args.events.clone(), supervisor).await?;
                args.events_slot.set(actor.clone());
                actor.get_id()
            }
            Child::Gateway => {
                let (actor, _) =
                    Actor::spawn_linked(None, Gateway, args.gateway.clone(), supervisor).await?;
                args.gateway_slot.set(actor.clone());
                actor.get_id()
            }
        };
        state.children.insert(id, child);
        Ok(())
    }

    fn slot_clear(state: &SupervisorState, child: Child) {
        match child {
            Child::Storage => state.args.storage_slot.clear(),
            Child::Auth => state.args.auth_slot.clear(),
            Child::Events => state.args.events_slot.clear(),
            Child::Gateway => state.args.gateway_slot.clear(),
        }
    }

    async fn on_child_down(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        id: ActorId,
        reason: String,
        failed: bool,
    ) -> Result<(), ActorProcessingErr> {
        let Some(child) = state.children.remove(&id) else {
            // Keyring actors stop after their work (drained); only a failure is news.
            if !failed {
                state.args.registry.forget(id);
            } else if state.args.registry.failed(id) {
                tracing::warn!(%reason, "keyring actor failed; it is respawned on next use");
            }
            return Ok(());
        };
        Self::slot_clear(state, child);
        if state.stopping {
            return Ok(());
        }
        Self::restart_later(myself, state, child, reason).await;
        Ok(())
    }

    /// Counts a failure of `child`, then gives up or schedules its restart after a backoff:
    /// a message to itself, so that meanwhile the supervisor still takes a shutdown or
    /// another child's failure. A restart that fails (NATS unreachable while the gateway
    /// subscribes, say) comes back here as one more failure; it never fails the supervisor,
    /// which would leave a process that serves nothing and never exits.
    async fn restart_later(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        child: Child,
        reason: String,
    ) {
        let now = Instant::now();
        let policy = state.args.policy;
        state.failures.push_back(now);
        while let Some(&first) = state.failures.front() {
            if now.duration_since(first) <= policy.window {
                break;
            }
            state.failures.pop_front();
        }
        let recent = state.failures.len();
        if recent > policy.max_restarts {
            let message = format!(
                "{} failed {recent} times within {:?}: giving up ({reason})",
                child.name(),
                policy.window
            );
            tracing::error!(child = child.name(), failures = recent, %reason, "supervision gave up");
            Self::escalate(myself, state, message).await;
            return;
        }
        let exponent = u32::try_from(recent.saturating_sub(1))
            .unwrap_or(u32::MAX)
            .min(10);
        let backoff = policy
            .backoff
            .saturating_mul(1 << exponent)
            .min(Duration::from_secs(10));
        tracing::warn!(child = child.name(), failures = recent, ?backoff, %reason, "restarting");
        metrics::counter!("ringvault_actor_restarts_total", "actor" => child.name()).increment(1);
        myself.send_after(backoff, move || {
            SupervisorMsg::Restart(PendingRestart { child, reason })
        });
    }

    /// Gives up: stops what writes, then reports `message` as fatal (the process exits once
    /// it is out) and stops.
    async fn escalate(
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        message: String,
    ) {
        state.stopping = true;
        state.args.registry.stop_all(KEYRING_STOP_TIMEOUT).await;
        Self::stop_storage(state).await;
        state.args.fatal.send_replace(Some(message));
        myself.stop_children(Some("escalated".into()));
        myself.stop(Some("escalated".into()));
    }

    async fn shutdown(state: &mut SupervisorState) {
        state.stopping = true;
        if let Some(gateway) = state.args.gateway_slot.get() {
            let drained =
                super::call("gateway", &gateway, GatewayMsg::Drain, DRAIN_CALL_TIMEOUT).await;
            if let Err(error) = drained {
                tracing::warn!(%error, "gateway did not drain cleanly");
            }
            gateway.stop(None);
        }
        // Before storage stops: a keyring actor may be writing a rotation.
        state.args.registry.stop_all(KEYRING_STOP_TIMEOUT).await;
        if let Some(events) = state.args.events_slot.get() {
            let _ = events
                .stop_and_wait(None, Some(Duration::from_secs(5)))
                .await;
        }
        if let Some(auth) = state.args.auth_slot.get() {
            let _ = auth.stop_and_wait(None, Some(Duration::from_secs(5))).await;
        }
        // Storage goes last: every write a drained request started has finished.
        Self::stop_storage(state).await;
    }

    /// Stops the storage actor once its writes in flight have finished.
    async fn stop_storage(state: &SupervisorState) {
        if let Some(storage) = state.args.storage_slot.get() {
            let _ = storage
                .stop_and_wait(None, Some(STORAGE_STOP_TIMEOUT))
                .await;
        }
    }
}

/// Rotates every cached keyring whose LATEST reached its rotation age. The keyring actor checks
/// the age again against storage, so a replica that sees a stale cache does not rotate twice.
async fn rotate_due_keyrings(registry: &KeyringRegistry, policy: &RotationPolicy) {
    let now = crate::crypto::now_ms();
    for name in registry.keyrings().cached_names() {
        let Some(max_age) = policy.rotate_after(&name) else {
            continue;
        };
        let Some(latest) = registry.keyrings().peek_latest(&name) else {
            continue;
        };
        let age_ms = u128::try_from(now.saturating_sub(latest.created_at())).unwrap_or(0);
        if age_ms < max_age.as_millis() {
            continue;
        }
        match registry.rotate_if_older(&name, max_age).await {
            Ok(Some(rotation)) if rotation.won => {
                tracing::info!(
                    keyring = name,
                    key_id = rotation.dek.id(),
                    "scheduled rotation"
                )
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(keyring = name, %error, "scheduled rotation failed"),
        }
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        args.registry.set_supervisor(myself.get_cell());
        let mut state = SupervisorState {
            args,
            children: HashMap::new(),
            failures: VecDeque::new(),
            stopping: false,
            checking_rotations: Arc::default(),
        };
        for child in [Child::Storage, Child::Auth, Child::Events, Child::Gateway] {
            Self::start_child(&myself, &mut state, child).await?;
        }
        myself.send_interval(IDLE_SWEEP_PERIOD, || SupervisorMsg::SweepIdle);
        if state.args.rotation.is_enabled() {
            myself.send_interval(state.args.rotation_check, || SupervisorMsg::CheckRotations);
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SupervisorMsg::SweepIdle => {
                let stopped = state.args.registry.stop_idle();
                if stopped > 0 {
                    tracing::debug!(stopped, "stopped actors of evicted keyrings");
                }
            }
            SupervisorMsg::CheckRotations => {
                use std::sync::atomic::Ordering;
                if state.stopping || state.checking_rotations.swap(true, Ordering::AcqRel) {
                    return Ok(());
                }
                let registry = state.args.registry.clone();
                let policy = state.args.rotation.clone();
                let running = state.checking_rotations.clone();
                tokio::spawn(async move {
                    rotate_due_keyrings(&registry, &policy).await;
                    running.store(false, Ordering::Release);
                });
            }
            SupervisorMsg::Shutdown(reply) => {
                Self::shutdown(state).await;
                let _ = reply.send(());
                myself.stop(Some("shutdown".into()));
            }
            SupervisorMsg::Restart(PendingRestart { child, .. }) if state.stopping => {
                tracing::debug!(child = child.name(), "not restarting: stopping");
            }
            SupervisorMsg::Restart(PendingRestart { child, reason }) => {
                if let Err(error) = Self::start_child(&myself, state, child).await {
                    tracing::warn!(child = child.name(), %error, %reason, "restart failed");
                    Self::restart_later(&myself, state, child, format!("restart failed: {error}"))
                        .await;
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, error) => {
                Self::on_child_down(&myself, state, cell.get_id(), error.to_string(), true).await
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                let reason = reason.unwrap_or_else(|| "stopped".to_owned());
                Self::on_child_down(&myself, state, cell.get_id(), reason, false).await
            }
            _ => Ok(()),
        }
    }
}
