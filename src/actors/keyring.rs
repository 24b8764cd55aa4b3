//! KeyringActor (one per keyring) and the KeyringRegistry that finds or spawns it.
//!
//! The actor owns its keyring's slow paths: loading LATEST, creating the first DEK, looking up
//! a DEK by id, rotating. The registry answers the hot path from the shared cache first and
//! calls the actor only on a miss, so a hot keyring is never serialized on one mailbox.
//! Keyring actors are transient: one exists while its keyring has slow-path work. After each
//! message it *drains* (takes no new messages, finishes those queued, stops), so that memory
//! grows with the keys cached, not with the keyrings recently used: ten thousand first uses
//! leave ten thousand cached keys, not ten thousand idle actors. A call that finds the actor
//! draining was never delivered and goes to a fresh actor; one that fails while handled is not
//! retried (it may have done part of its work). One that fails is forgotten and respawned on
//! next use; the registry stops the actors of keyrings the cache has evicted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::Hooks;
use crate::crypto::Dek;
use crate::error::{Error, Result};
use crate::keyring::{Keyrings, Rotation};

/// Messages of a [`KeyringActor`].
pub enum KeyringMsg {
    /// The current DEK; `from_storage` forces a storage read.
    Latest {
        /// Read storage whatever the cache holds.
        from_storage: bool,
        /// The DEK.
        reply: RpcReplyPort<Result<Arc<Dek>>>,
    },
    /// The DEK with this id.
    Dek {
        /// Key id.
        key_id: String,
        /// The DEK.
        reply: RpcReplyPort<Result<Arc<Dek>>>,
    },
    /// Make a new DEK LATEST.
    Rotate {
        /// The rotation.
        reply: RpcReplyPort<Result<Rotation>>,
    },
    /// Rotate if LATEST (as storage has it) is at least this old.
    RotateIfOlder {
        /// The age.
        max_age: Duration,
        /// The rotation, if one happened.
        reply: RpcReplyPort<Result<Option<Rotation>>>,
    },
    /// Another replica made `key_id` LATEST.
    ApplyLatest {
        /// The new LATEST.
        key_id: String,
    },
}

/// How many actors a keyring call is offered to before it fails: each may have finished its
/// work and stopped between the lookup and the delivery.
const ACTOR_DELIVERY_ATTEMPTS: usize = 8;

/// The actor of one keyring.
pub struct KeyringActor;

/// State and arguments of a [`KeyringActor`].
pub struct KeyringActorState {
    name: String,
    keyrings: Keyrings,
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    hooks: Hooks,
}

impl Actor for KeyringActor {
    type Msg = KeyringMsg;
    type State = KeyringActorState;
    type Arguments = KeyringActorState;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: KeyringActorState,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        #[cfg(feature = "test-hooks")]
        if state.hooks.faults.take_keyring_failure(&state.name) {
            return Err(format!("injected fault in keyring actor {:?}", state.name).into());
        }
        let keyrings = &state.keyrings;
        let name = state.name.as_str();
        // A caller that gave up (its call timed out behind a slow store) was told
        // `unavailable`: its work is skipped, not done late. Otherwise a backlog behind a slow
        // store grows with work nobody waits for, and a rotation nobody waits for happens
        // after its caller was told it failed.
        let caller_gone = match &message {
            KeyringMsg::Latest { reply, .. } => reply.is_closed(),
            KeyringMsg::Dek { reply, .. } => reply.is_closed(),
            KeyringMsg::Rotate { reply } => reply.is_closed(),
            KeyringMsg::RotateIfOlder { reply, .. } => reply.is_closed(),
            KeyringMsg::ApplyLatest { .. } => false,
        };
        if caller_gone {
            let _ = myself.drain();
            return Ok(());
        }
        match message {
            KeyringMsg::Latest {
                from_storage,
                reply,
            } => {
                let result = if from_storage {
                    keyrings.latest_from_storage(name).await
                } else {
                    keyrings.latest(name).await
                };
                let _ = reply.send(result);
            }
            KeyringMsg::Dek { key_id, reply } => {
                let _ = reply.send(keyrings.dek(name, &key_id).await);
            }
            KeyringMsg::Rotate { reply } => {
                let _ = reply.send(keyrings.rotate(name).await);
            }
            KeyringMsg::RotateIfOlder { max_age, reply } => {
                let _ = reply.send(keyrings.rotate_if_older(name, max_age).await);
            }
            KeyringMsg::ApplyLatest { key_id } => {
                if let Err(error) = keyrings.apply_new_latest(name, &key_id).await {
                    tracing::warn!(keyring = name, key_id, %error, "could not apply a new latest key");
                }
            }
        }
        // Done for now: what is queued still runs, then the actor stops (see the module doc).
        let _ = myself.drain();
        Ok(())
    }
}

/// Finds or spawns the actor of a keyring; answers cache hits without one.
#[derive(Clone)]
pub struct KeyringRegistry {
    keyrings: Keyrings,
    actors: Arc<DashMap<String, ActorRef<KeyringMsg>>>,
    /// The keyring of each live actor, to forget one by id.
    names: Arc<DashMap<ActorId, String>>,
    supervisor: Arc<OnceLock<ActorCell>>,
    /// Set by [`KeyringRegistry::stop_all`]: no actor is spawned after it (a scheduled
    /// rotation or another replica's event would otherwise start work storage no longer takes).
    stopped: Arc<AtomicBool>,
    call_timeout: Duration,
    hooks: Hooks,
    /// Cache hits, counted per request: handles registered once, not looked up by label.
    latest_hits: metrics::Counter,
    key_id_hits: metrics::Counter,
}

impl std::fmt::Debug for KeyringRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyringRegistry")
            .field("actors", &self.actors.len())
            .field("keyrings", &self.keyrings)
            .finish()
    }
}

impl KeyringRegistry {
    /// A registry over the cache `keyrings`.
    pub fn new(keyrings: Keyrings, call_timeout: Duration, hooks: Hooks) -> Self {
        Self {
            keyrings,
            actors: Arc::new(DashMap::new()),
            names: Arc::new(DashMap::new()),
            supervisor: Arc::new(OnceLock::new()),
            stopped: Arc::new(AtomicBool::new(false)),
            call_timeout,
            hooks,
            latest_hits: metrics::counter!("ringvault_cache_hits_total", "lookup" => "latest"),
            key_id_hits: metrics::counter!("ringvault_cache_hits_total", "lookup" => "key_id"),
        }
    }

    /// The cache.
    pub fn keyrings(&self) -> &Keyrings {
        &self.keyrings
    }

    /// Links keyring actors spawned from now on to `supervisor`.
    pub fn set_supervisor(&self, supervisor: ActorCell) {
        let _ = self.supervisor.set(supervisor);
    }

    /// How many keyring actors are alive.
    pub fn actor_count(&self) -> usize {
        self.actors.len()
    }

    /// The keyring's current DEK, for sealing.
    pub async fn latest(&self, name: &str) -> Result<Arc<Dek>> {
        if let Some(dek) = self.keyrings.cached_latest(name) {
            self.latest_hits.increment(1);
            return Ok(dek);
        }
        metrics::counter!("ringvault_cache_misses_total", "lookup" => "latest").increment(1);
        self.call(
            name,
            |reply| KeyringMsg::Latest {
                from_storage: false,
                reply,
            },
            || self.keyrings.cached_latest(name).map(Ok),
        )
        .await?
    }

    /// The keyring's current DEK read from storage now (ReEncrypt); only this keyring's
    /// cache changes.
    pub async fn latest_from_storage(&self, name: &str) -> Result<Arc<Dek>> {
        self.call(
            name,
            |reply| KeyringMsg::Latest {
                from_storage: true,
                reply,
            },
            || None,
        )
        .await?
    }

    /// The DEK `key_id` of the keyring, for opening.
    pub async fn dek(&self, name: &str, key_id: &str) -> Result<Arc<Dek>> {
        if let Some(dek) = self.keyrings.cached_dek_of(name, key_id) {
            self.key_id_hits.increment(1);
            return Ok(dek);
        }
        metrics::counter!("ringvault_cache_misses_total", "lookup" => "key_id").increment(1);
        self.call(
            name,
            |reply| KeyringMsg::Dek {
                key_id: key_id.to_owned(),
                reply,
            },
            || self.keyrings.cached_dek_of(name, key_id).map(Ok),
        )
        .await?
    }

    /// Makes a new DEK the keyring's LATEST.
    pub async fn rotate(&self, name: &str) -> Result<Rotation> {
        self.call(name, |reply| KeyringMsg::Rotate { reply }, || None)
            .await?
    }

    /// Rotates the keyring if its LATEST is at least `max_age` old.
    pub async fn rotate_if_older(&self, name: &str, max_age: Duration) -> Result<Option<Rotation>> {
        self.call(
            name,
            |reply| KeyringMsg::RotateIfOlder { max_age, reply },
            || None,
        )
        .await?
    }

    /// Applies another replica's new LATEST to a keyring this process caches; keyrings it
    /// does not cache are left alone (they read storage on first use anyway). Events for one
    /// keyring are coalesced: one reload queued at a time, one per
    /// [`crate::keyring::EVENT_RELOAD_INTERVAL`], and a reload always follows the last event.
    pub async fn apply_latest(&self, name: &str, key_id: &str) {
        if !self.keyrings.is_cached(name) {
            return;
        }
        if self
            .keyrings
            .peek_latest(name)
            .is_some_and(|dek| dek.id() == key_id)
        {
            return;
        }
        let Some(wait) = self.keyrings.schedule_event_reload(name) else {
            return;
        };
        self.reload_for_events(name, key_id, wait).await;
    }

    /// Forgets a keyring actor that failed. A key-event reload scheduled for it is lost with
    /// its mailbox, and the events since were coalesced into that reload: it is scheduled
    /// again for a fresh actor, so that the last event of a burst is still followed by a read.
    pub fn failed(&self, id: ActorId) -> bool {
        let Some(name) = self.forget_named(id) else {
            return false;
        };
        if self.keyrings.cancel_event_reload(&name) {
            if let Some(wait) = self.keyrings.schedule_event_reload(&name) {
                // Off the caller (the supervisor), which must not wait on a keyring actor.
                // No event's key id to name: storage decides anyway.
                let registry = self.clone();
                tokio::spawn(async move { registry.reload_for_events(&name, "", wait).await });
            }
        }
        true
    }

    /// Runs a scheduled key-event reload after `wait`.
    async fn reload_for_events(&self, name: &str, key_id: &str, wait: Duration) {
        if wait.is_zero() {
            self.deliver_apply_latest(name, key_id).await;
            return;
        }
        // Soon after the last reload: this one waits its turn, off the events listener.
        let registry = self.clone();
        let (name, key_id) = (name.to_owned(), key_id.to_owned());
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            registry.deliver_apply_latest(&name, &key_id).await;
        });
    }

    /// Hands a scheduled reload for a key event to the keyring's actor.
    async fn deliver_apply_latest(&self, name: &str, key_id: &str) {
        'undelivered: {
            // A draining actor refuses the message; a fresh one takes it.
            for _ in 0..ACTOR_DELIVERY_ATTEMPTS {
                let actor = match self.actor(name).await {
                    Ok(actor) => actor,
                    Err(error) => {
                        tracing::warn!(keyring = name, %error, "could not apply a new latest key");
                        break 'undelivered;
                    }
                };
                let message = KeyringMsg::ApplyLatest {
                    key_id: key_id.to_owned(),
                };
                if actor.send_message(message).is_ok() {
                    return;
                }
                self.forget(actor.get_id());
            }
            tracing::warn!(keyring = name, key_id, "could not apply a new latest key");
        }
        // Given up: the turn goes back for the next event, and the next use reads meanwhile.
        self.keyrings.cancel_event_reload(name);
        self.keyrings.refresh_on_next_use(name);
    }

    /// Sends the keyring's actor `build`'s message and waits for the reply; `cached` answers
    /// instead, when it can, before a call is offered to another actor.
    ///
    /// Boxed, and returned as the box itself: a call may spawn the actor, whose future is
    /// large, and the cache-hit paths that await this one would otherwise carry that size (or,
    /// were this an `async fn` awaiting the box, its arguments) in every request's future.
    fn call<'a, T, F>(
        &'a self,
        name: &'a str,
        build: F,
        cached: impl Fn() -> Option<T> + 'a,
    ) -> impl std::future::Future<Output = Result<T>> + 'a
    where
        T: Send + 'static,
        F: Fn(RpcReplyPort<T>) -> KeyringMsg + 'a,
    {
        Box::pin(self.call_unboxed(name, build, cached))
    }

    async fn call_unboxed<T, F>(
        &self,
        name: &str,
        build: F,
        cached: impl Fn() -> Option<T>,
    ) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(RpcReplyPort<T>) -> KeyringMsg,
    {
        // The actor may have started draining since the lookup; the message then never reaches
        // it, and a fresh actor takes the call instead. Under a burst of cache misses on one
        // keyring, an actor serves the calls that reached it before it drained and the others
        // are refused, and so may a fresh actor's: so this is tried a few times, and before
        // each retry the cache is asked again, which the actor that refused has most likely
        // just filled (without that, a burst of 64 first uses on one subscription ran out of
        // attempts).
        for attempt in 0..ACTOR_DELIVERY_ATTEMPTS {
            if attempt > 0 {
                if let Some(result) = cached() {
                    return Ok(result);
                }
            }
            let actor = self.actor(name).await?;
            if let Some(result) =
                super::try_call("keyring actor", &actor, &build, self.call_timeout).await
            {
                return result.map_err(|error| error.context(format!("keyring {name:?}")));
            }
            self.forget(actor.get_id());
        }
        Err(Error::unavailable(format!(
            "keyring {name:?}: no keyring actor took the call"
        )))
    }

    /// The live actor of keyring `name`, spawned when there is none.
    async fn actor(&self, name: &str) -> Result<ActorRef<KeyringMsg>> {
        if let Some(actor) = self.actors.get(name) {
            return Ok(actor.clone());
        }
        if self.stopped.load(Ordering::Acquire) {
            return Err(Error::unavailable(
                "shutting down: keyring work is no longer taken",
            ));
        }
        // Validates the name before anything is spawned for it (without caching an entry:
        // the operation the actor runs does that once it has a key).
        crate::storage::validate_keyring(name)?;
        let state = KeyringActorState {
            name: name.to_owned(),
            keyrings: self.keyrings.clone(),
            hooks: self.hooks.clone(),
        };
        let spawned = match self.supervisor.get() {
            Some(supervisor) => {
                Actor::spawn_linked(None, KeyringActor, state, supervisor.clone()).await
            }
            None => Actor::spawn(None, KeyringActor, state).await,
        };
        let (actor, _) = spawned.map_err(|error| {
            Error::unavailable(format!(
                "cannot start the actor of keyring {name:?}: {error}"
            ))
        })?;
        // Two first uses may race; the first actor registered wins and the other stops.
        let winner = self
            .actors
            .entry(name.to_owned())
            .or_insert_with(|| actor.clone())
            .clone();
        if winner.get_id() == actor.get_id() {
            self.names.insert(actor.get_id(), name.to_owned());
        } else {
            actor.stop(None);
        }
        Ok(winner)
    }

    /// Forgets the actor with `id` after it failed or stopped; returns whether it was one of
    /// ours.
    pub fn forget(&self, id: ActorId) -> bool {
        self.forget_named(id).is_some()
    }

    /// [`KeyringRegistry::forget`], returning the keyring the actor was for.
    fn forget_named(&self, id: ActorId) -> Option<String> {
        let (_, name) = self.names.remove(&id)?;
        self.actors
            .remove_if(&name, |_, actor| actor.get_id() == id);
        Some(name)
    }

    /// Stops the actors of keyrings that the cache no longer holds.
    pub fn stop_idle(&self) -> usize {
        let idle: Vec<String> = self
            .actors
            .iter()
            .filter(|entry| !self.keyrings.is_cached(entry.key()))
            .map(|entry| entry.key().clone())
            .collect();
        for name in &idle {
            if let Some((_, actor)) = self.actors.remove(name) {
                self.names.remove(&actor.get_id());
                // Drained, not stopped: a call already queued (a first use whose keyring is not
                // cached yet) is answered before the actor goes.
                let _ = actor.drain();
            }
        }
        idle.len()
    }

    /// Stops every keyring actor (shutdown) and waits, up to `within`, for the operations
    /// they are running (a rotation's writes) to finish.
    pub async fn stop_all(&self, within: Duration) {
        self.stopped.store(true, Ordering::Release);
        let actors: Vec<ActorRef<KeyringMsg>> = self
            .actors
            .iter()
            .map(|entry| entry.value().clone())
            .collect();
        self.actors.clear();
        self.names.clear();
        let stopped = futures::future::join_all(
            actors
                .iter()
                .map(|actor| actor.stop_and_wait(Some("shutdown".into()), Some(within))),
        )
        .await;
        // An actor that had already drained and gone is not late.
        let late = stopped
            .iter()
            .filter(|result| {
                result
                    .as_ref()
                    .is_err_and(|error| !matches!(error, ractor::RactorErr::Messaging(_)))
            })
            .count();
        if late > 0 {
            tracing::warn!(actors = late, "keyring actors still busy at shutdown");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Kek, MasterKeys};
    use crate::keyring::{CachePolicy, KeyringStore};
    use crate::storage::Storage;

    #[tokio::test]
    async fn after_stop_all_no_keyring_work_starts() {
        let master_keys = Arc::new(MasterKeys::new(Kek::generate(), []).unwrap());
        let keyrings = Keyrings::new(
            KeyringStore::new(Storage::in_memory(), master_keys),
            CachePolicy::default(),
        );
        let registry = KeyringRegistry::new(keyrings, Duration::from_secs(5), Hooks::default());
        let before = registry.latest("ws_1").await.unwrap();
        registry.stop_all(Duration::from_secs(5)).await;
        // The cache still answers; nothing new is started.
        assert_eq!(registry.latest("ws_1").await.unwrap().id(), before.id());
        let error = registry.latest("ws_2").await.unwrap_err();
        assert_eq!(error.kind(), crate::Kind::Unavailable, "{error}");
        let error = registry.rotate("ws_1").await.unwrap_err();
        assert_eq!(error.kind(), crate::Kind::Unavailable, "{error}");
    }

    /// Work whose caller has gone (its call timed out while the message waited) is skipped:
    /// here a keyring's first key, which the caller was told could not be made.
    #[tokio::test]
    async fn work_whose_caller_has_gone_is_skipped() {
        let master_keys = Arc::new(MasterKeys::new(Kek::generate(), []).unwrap());
        let storage = Storage::in_memory();
        let keyrings = Keyrings::new(
            KeyringStore::new(storage.clone(), master_keys),
            CachePolicy::default(),
        );
        let registry = KeyringRegistry::new(keyrings, Duration::from_secs(5), Hooks::default());
        let (reply, gone) = tokio::sync::oneshot::channel();
        drop(gone);
        let actor = registry.actor("ws_new").await.unwrap();
        actor
            .send_message(KeyringMsg::Latest {
                from_storage: false,
                reply: reply.into(),
            })
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stored: Vec<String> =
            futures::TryStreamExt::try_collect(storage.list("keyring/ws_new/"))
                .await
                .unwrap();
        assert!(
            stored.is_empty(),
            "no first key for a caller that left: {stored:?}"
        );
        registry.latest("ws_new").await.unwrap();
    }

    /// A flood of key events naming made-up keys (anyone who may publish on the subject can
    /// send them) costs a few storage reads, not one each; the real event in it still lands.
    #[tokio::test]
    async fn a_flood_of_key_events_is_coalesced_and_the_last_one_still_applies() {
        use std::sync::atomic::Ordering;

        let backend = Arc::new(crate::storage::ObjectStoreBackend::in_memory());
        let (faulty, faults) = crate::storage::FaultyStorage::new(backend);
        let storage = Storage::new(Arc::new(faulty), crate::storage::StoragePolicy::default());
        let master_keys = Arc::new(MasterKeys::new(Kek::generate(), []).unwrap());
        let store = KeyringStore::new(storage, master_keys);
        let keyrings = Keyrings::new(store.clone(), CachePolicy::default());
        let registry = KeyringRegistry::new(keyrings, Duration::from_secs(5), Hooks::default());
        let first = registry.latest("ws_1").await.unwrap();
        let other_replica = Keyrings::new(store, CachePolicy::default());

        let reads_before = faults.calls.load(Ordering::SeqCst);
        for n in 0..1_000 {
            registry
                .apply_latest("ws_1", &format!("dek_forged{n:06}"))
                .await;
        }
        // The real rotation, announced amid the flood.
        let rotated = other_replica.rotate("ws_1").await.unwrap();
        let reads_of_the_rotation = faults.calls.load(Ordering::SeqCst) - reads_before;
        for n in 0..1_000 {
            registry
                .apply_latest("ws_1", &format!("dek_forged{n:06}"))
                .await;
        }
        registry.apply_latest("ws_1", rotated.dek.id()).await;

        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while registry
            .keyrings
            .peek_latest("ws_1")
            .is_none_or(|dek| dek.id() != rotated.dek.id())
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the real new key was not applied"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_ne!(first.id(), rotated.dek.id());
        tokio::time::sleep(crate::keyring::EVENT_RELOAD_INTERVAL * 3).await;
        let reads = faults.calls.load(Ordering::SeqCst) - reads_before;
        assert!(
            reads <= reads_of_the_rotation + 12,
            "2,001 events cost {reads} storage calls ({reads_of_the_rotation} of them the rotation's)"
        );
    }
}
