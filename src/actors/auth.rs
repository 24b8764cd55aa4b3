//! AuthActor: owns the credential sources and turns a bearer token into a [`Principal`].
//! [`AuthHandle`] is what the gateway uses: a verified-token cache keyed by the token's SHA-256
//! answers the hot path, and only a token not seen before goes to the actor.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use zeroize::Zeroizing;

use super::ActorSlot;
use crate::auth::{bearer_token, fingerprint, token_digest, Authenticator, Principal};
use crate::error::Result;

/// Bound of the verified-token cache; past it the cache starts over.
const MAX_CACHED_TOKENS: usize = 100_000;

/// Messages of the [`AuthActor`].
pub enum AuthMsg {
    /// Verify a bearer token.
    Verify {
        /// The token.
        token: Zeroizing<String>,
        /// The principal, or why not.
        reply: RpcReplyPort<Result<Principal>>,
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
                let _ = reply.send(authenticator.verify(&token));
            }
        }
        Ok(())
    }
}

/// The gateway's view of authentication.
#[derive(Clone)]
pub struct AuthHandle {
    actor: Arc<ActorSlot<AuthMsg>>,
    verified: Arc<DashMap<[u8; 32], Arc<Principal>>>,
    call_timeout: Duration,
}

impl std::fmt::Debug for AuthHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthHandle")
            .field("cached", &self.verified.len())
            .finish_non_exhaustive()
    }
}

impl AuthHandle {
    /// A handle over the actor in `actor`.
    pub fn new(actor: Arc<ActorSlot<AuthMsg>>, call_timeout: Duration) -> Self {
        Self {
            actor,
            verified: Arc::new(DashMap::new()),
            call_timeout,
        }
    }

    /// The principal of an `Authorization` header value.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Arc<Principal>> {
        let token = bearer_token(authorization)?;
        let digest = token_digest(token);
        if let Some(principal) = self.verified.get(&digest) {
            return Ok(principal.clone());
        }
        let owned = Zeroizing::new(token.to_owned());
        let verified = self
            .actor
            .call(
                |reply| AuthMsg::Verify {
                    token: owned,
                    reply,
                },
                self.call_timeout,
            )
            .await?;
        let principal = match verified {
            Ok(principal) => Arc::new(principal),
            Err(error) => {
                tracing::info!(
                    token = fingerprint(token),
                    code = error.kind().code(),
                    "credential refused"
                );
                return Err(error);
            }
        };
        if self.verified.len() >= MAX_CACHED_TOKENS {
            self.verified.clear();
        }
        self.verified.insert(digest, principal.clone());
        Ok(principal)
    }

    /// Forgets every verified token (after revocations or a change of sources).
    pub fn forget_verified(&self) {
        self.verified.clear();
    }
}
