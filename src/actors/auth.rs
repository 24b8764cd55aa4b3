//! AuthActor: owns the credential sources and turns a bearer token into a [`Principal`].
//! [`AuthHandle`] is what the gateway uses: a verified-token cache keyed by the token's SHA-256
//! answers the hot path, and only a token not seen before goes to the actor.
//!
//! The cache never outlives what it caches: an entry holds the credential's expiry (`exp`
//! plus leeway) and the revocation generation it was checked against, and is a miss once
//! either has passed; the whole cache is cleared when the revocation set changes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use zeroize::Zeroizing;

use super::ActorSlot;
use crate::auth::{
    bearer_token, fingerprint, token_digest, Authenticator, Principal, Revocations, Verified,
};
use crate::error::Result;

/// Bound of the verified-token cache; past it the cache starts over.
const MAX_CACHED_TOKENS: usize = 100_000;

/// Messages of the [`AuthActor`].
pub enum AuthMsg {
    /// Verify a bearer token.
    Verify {
        /// The token.
        token: Zeroizing<String>,
        /// The verification, and the revocation set it was checked against (which the
        /// handle watches to keep its cache honest).
        reply: RpcReplyPort<(Result<Verified>, Arc<Revocations>)>,
    },
}

/// The credential verifier.
pub struct AuthActor;

impl Actor for AuthActor {
    type Msg = AuthMsg;
    type State = Authenticator;
    type Arguments = Authenticator;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        authenticator: Authenticator,
    ) -> Result<Self::State, ActorProcessingErr> {
        // Once per authenticator: a restarted actor finds the JWKS refresh and the revocation
        // subscription already running.
        authenticator.start_background().await;
        Ok(authenticator)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        authenticator: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            AuthMsg::Verify { token, reply } => {
                let _ = reply.send((
                    authenticator.verify_detailed(&token),
                    authenticator.revocations().clone(),
                ));
            }
        }
        Ok(())
    }
}

struct Cached {
    principal: Arc<Principal>,
    valid_until: Option<u64>,
    generation: u64,
}

/// The gateway's view of authentication.
#[derive(Clone)]
pub struct AuthHandle {
    actor: Arc<ActorSlot<AuthMsg>>,
    verified: Arc<DashMap<[u8; 32], Cached>>,
    revocations: Arc<OnceLock<Arc<Revocations>>>,
    seen_generation: Arc<AtomicU64>,
    call_timeout: Duration,
}

impl std::fmt::Debug for AuthHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthHandle")
            .field("cached", &self.verified.len())
            .finish_non_exhaustive()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

impl AuthHandle {
    /// A handle over the actor in `actor`.
    pub fn new(actor: Arc<ActorSlot<AuthMsg>>, call_timeout: Duration) -> Self {
        Self {
            actor,
            verified: Arc::new(DashMap::new()),
            revocations: Arc::new(OnceLock::new()),
            seen_generation: Arc::new(AtomicU64::new(0)),
            call_timeout,
        }
    }

    /// The current revocation generation, clearing the cache when it moved.
    fn current_generation(&self) -> Option<u64> {
        let generation = self.revocations.get()?.generation();
        if self.seen_generation.swap(generation, Ordering::AcqRel) != generation {
            self.verified.clear();
        }
        Some(generation)
    }

    fn cached(&self, digest: &[u8; 32], generation: Option<u64>) -> Option<Arc<Principal>> {
        let entry = self.verified.get(digest)?;
        let fresh = entry.valid_until.is_none_or(|until| now_secs() < until);
        let current = generation == Some(entry.generation);
        if fresh && current {
            return Some(entry.principal.clone());
        }
        drop(entry);
        self.verified.remove(digest);
        None
    }

    /// The principal of an `Authorization` header value.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Arc<Principal>> {
        let token = bearer_token(authorization)?;
        let digest = token_digest(token);
        let generation = self.current_generation();
        if let Some(principal) = self.cached(&digest, generation) {
            return Ok(principal);
        }
        // Boxed: the actor call's future is large, and every request's future would otherwise
        // carry it for the few that miss the cache.
        Box::pin(self.verify(token, digest)).await
    }

    /// Has the authenticator verify `token` and caches the principal it yields.
    async fn verify(&self, token: &str, digest: [u8; 32]) -> Result<Arc<Principal>> {
        let owned = Zeroizing::new(token.to_owned());
        let (outcome, replied_revocations) = self
            .actor
            .call(
                |reply| AuthMsg::Verify {
                    token: owned,
                    reply,
                },
                self.call_timeout,
            )
            .await?;
        let revocations = self.revocations.get_or_init(|| replied_revocations.clone());
        if !Arc::ptr_eq(revocations, &replied_revocations) {
            // Only one authenticator ever answers a handle; stay safe if that changes.
            self.verified.clear();
        }
        let verified = match outcome {
            Ok(verified) => verified,
            Err(error) => {
                tracing::info!(
                    token = fingerprint(token),
                    code = error.kind().code(),
                    "credential refused"
                );
                return Err(error);
            }
        };
        let principal = Arc::new(verified.principal);
        if self.verified.len() >= MAX_CACHED_TOKENS {
            self.verified.clear();
        }
        // Cache only what was checked against the current revocations.
        if revocations.generation() == verified.revocation_generation {
            self.verified.insert(
                digest,
                Cached {
                    principal: principal.clone(),
                    valid_until: verified.valid_until,
                    generation: verified.revocation_generation,
                },
            );
        }
        Ok(principal)
    }

    /// Forgets every verified token (after revocations or a change of sources).
    pub fn forget_verified(&self) {
        self.verified.clear();
    }
}
