//! AuthActor: owns the credential sources and turns a bearer token into a [`Principal`].
//! [`AuthHandle`] is what the gateway uses: a verified-token cache keyed by the token's SHA-256
//! answers the hot path, and only a token not seen lately goes to the actor, which checks
//! each in a task of its own (up to one per core at once) rather than one after another.
//!
//! The cache never outlives what it caches: an entry holds the credential's expiry (`exp`
//! plus leeway) and the revocation generation it was checked against, and is a miss once
//! either has passed; the whole cache is cleared when the revocation set changes.
//!
//! Refusals are remembered briefly too ([`REFUSAL_MEMORY`]): a client that retries an expired
//! or forged token in a loop costs the actor one verification per period, not one per request.
//! Expired refusals leave when their token returns or when the memory fills up, so it stays
//! within [`MAX_REMEMBERED_REFUSALS`] entries of at most a short message each.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use super::ActorSlot;
use crate::auth::{
    bearer_token, fingerprint, token_digest, Authenticator, Principal, Revocations, Verified,
};
use crate::error::{Error, Kind, Result};
use crate::protocol::MAX_ERROR_MESSAGE_CHARS;

/// Bound of the verified-token cache; past it the cache starts over.
const MAX_CACHED_TOKENS: usize = 100_000;

/// How long a refused token is answered from memory. Long enough that a client retrying a bad
/// token in a loop is refused without a signature check each time; short enough that a token
/// refused only for now (an `nbf` just ahead, a key its identity provider has yet to publish in
/// the JWKS) is accepted soon after it becomes good.
pub const REFUSAL_MEMORY: Duration = Duration::from_secs(2);
/// Bound of the refusal memory: when full, expired refusals leave, and if none has expired,
/// the memory starts over.
pub const MAX_REMEMBERED_REFUSALS: usize = 10_000;

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

/// What the [`AuthActor`] holds: the credential sources, and the permits of the verifications
/// running beside it.
pub struct AuthState {
    authenticator: Arc<Authenticator>,
    verifying: Arc<Semaphore>,
}

impl Actor for AuthActor {
    type Msg = AuthMsg;
    type State = AuthState;
    type Arguments = Authenticator;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        authenticator: Authenticator,
    ) -> Result<Self::State, ActorProcessingErr> {
        // Once per authenticator: a restarted actor finds the JWKS refresh and the revocation
        // subscription already running.
        authenticator.start_background().await;
        // At least two, so that one slow check never holds up the next even on one core.
        let cores = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .max(2);
        Ok(AuthState {
            authenticator: Arc::new(authenticator),
            verifying: Arc::new(Semaphore::new(cores)),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            AuthMsg::Verify { token, reply } => {
                // A signature check is CPU work (tens of µs for ES256 or RS256). Done here,
                // the actor would be one queue that every token not cached passes one at a
                // time; instead each runs as a task of its own, up to one per core, and the
                // actor waits for a permit only when that many are running.
                let Ok(permit) = state.verifying.clone().acquire_owned().await else {
                    return Ok(());
                };
                let authenticator = state.authenticator.clone();
                tokio::spawn(async move {
                    #[cfg(test)]
                    tests::gate(&token).await;
                    let verified = authenticator.verify_detailed(&token);
                    let _ = reply.send((verified, authenticator.revocations().clone()));
                    drop(permit);
                });
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

impl Cached {
    /// Whether the entry may still answer: not expired, and checked against the revocations
    /// of `generation`.
    fn usable(&self, generation: Option<u64>) -> bool {
        self.valid_until.is_none_or(|until| now_secs() < until)
            && generation == Some(self.generation)
    }
}

/// A remembered refusal: the error the actor gave (its message cut as a reply would cut it, as
/// some quote the token), until when it is repeated.
struct Refused {
    kind: Kind,
    message: String,
    until: Instant,
}

impl Refused {
    /// Whether the refusal is still repeated at `now`.
    fn in_force(&self, now: Instant) -> bool {
        now < self.until
    }
}

/// The gateway's view of authentication.
#[derive(Clone)]
pub struct AuthHandle {
    actor: Arc<ActorSlot<AuthMsg>>,
    verified: Arc<DashMap<[u8; 32], Cached>>,
    refused: Arc<DashMap<[u8; 32], Refused>>,
    revocations: Arc<OnceLock<Arc<Revocations>>>,
    seen_generation: Arc<AtomicU64>,
    call_timeout: Duration,
}

impl std::fmt::Debug for AuthHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthHandle")
            .field("cached", &self.verified.len())
            .field("refused", &self.refused.len())
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
            refused: Arc::new(DashMap::new()),
            revocations: Arc::new(OnceLock::new()),
            seen_generation: Arc::new(AtomicU64::new(0)),
            call_timeout,
        }
    }

    /// The current revocation generation, clearing the cache when it moved.
    fn current_generation(&self) -> Option<u64> {
        let generation = self.revocations.get()?.generation();
        // A load first: every request passes here, and a write would move the cache line
        // between cores each time.
        if self.seen_generation.load(Ordering::Acquire) != generation
            && self.seen_generation.swap(generation, Ordering::AcqRel) != generation
        {
            self.verified.clear();
        }
        Some(generation)
    }

    fn cached(&self, digest: &[u8; 32], generation: Option<u64>) -> Option<Arc<Principal>> {
        let entry = self.verified.get(digest)?;
        if entry.usable(generation) {
            return Some(entry.principal.clone());
        }
        drop(entry);
        // Only if still stale: another request may have just cached it afresh.
        self.verified
            .remove_if(digest, |_, entry| !entry.usable(generation));
        None
    }

    /// The principal of an `Authorization` header value; `request_id` names the request in the
    /// log line of a refusal.
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
        request_id: &str,
    ) -> Result<Arc<Principal>> {
        let token = bearer_token(authorization)?;
        let digest = token_digest(token);
        let generation = self.current_generation();
        if let Some(principal) = self.cached(&digest, generation) {
            return Ok(principal);
        }
        if let Some(error) = self.remembered_refusal(&digest) {
            return Err(error);
        }
        // Boxed: the actor call's future is large, and every request's future would otherwise
        // carry it for the few that miss the cache.
        Box::pin(self.verify(token, digest, request_id)).await
    }

    /// Has the authenticator verify `token` and caches the principal it yields.
    async fn verify(
        &self,
        token: &str,
        digest: [u8; 32],
        request_id: &str,
    ) -> Result<Arc<Principal>> {
        // A refusal is remembered from when it was asked for, not from when the answer came.
        let asked = Instant::now();
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
                    request_id,
                    "credential refused"
                );
                self.remember_refusal(digest, &error, asked);
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

    /// The refusal of this token the actor gave within [`REFUSAL_MEMORY`], if any.
    fn remembered_refusal(&self, digest: &[u8; 32]) -> Option<Error> {
        let entry = self.refused.get(digest)?;
        if entry.in_force(Instant::now()) {
            return Some(Error::new(entry.kind, entry.message.clone()));
        }
        drop(entry);
        // Only if still expired: another request may have just remembered it afresh.
        self.refused
            .remove_if(digest, |_, refused| !refused.in_force(Instant::now()));
        None
    }

    /// Remembers a refusal that the token itself earned (a bad signature, an expiry, a
    /// revocation, an unknown source): `invalid_token` and `token_expired`, never an error
    /// saying that the verifier could not answer (`unavailable`, `internal`).
    fn remember_refusal(&self, digest: [u8; 32], error: &Error, asked: Instant) {
        if !matches!(error.kind(), Kind::InvalidToken | Kind::TokenExpired) {
            return;
        }
        if self.refused.len() >= MAX_REMEMBERED_REFUSALS {
            let now = Instant::now();
            self.refused.retain(|_, refused| refused.in_force(now));
            if self.refused.len() >= MAX_REMEMBERED_REFUSALS {
                self.refused.clear();
            }
        }
        let message = crate::error::first_chars(error.message(), MAX_ERROR_MESSAGE_CHARS);
        self.refused.insert(
            digest,
            Refused {
                kind: error.kind(),
                message: message.to_owned(),
                until: asked + REFUSAL_MEMORY,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;
    use crate::auth::{
        parse_grants, CredentialSource, JwksSource, JwtVerifier, KeySet, StaticToken, StaticTokens,
    };

    /// Tokens whose verification waits at a barrier first (only the tests that register them
    /// see a difference): a verification that has to meet another one there can only finish
    /// if the two run at the same time.
    static GATES: std::sync::Mutex<Vec<(String, Arc<tokio::sync::Barrier>)>> =
        std::sync::Mutex::new(Vec::new());

    pub(super) async fn gate(token: &str) {
        let gate = GATES
            .lock()
            .unwrap()
            .iter()
            .find(|(gated, _)| gated == token)
            .map(|(_, barrier)| barrier.clone());
        if let Some(barrier) = gate {
            barrier.wait().await;
        }
    }

    /// Two tokens that are not cached are verified side by side, not one after the other in
    /// the actor: each waits for the other at a barrier before its check, which only both
    /// running at once can pass.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tokens_not_cached_are_verified_side_by_side() {
        let principal = |workspace: &str| Principal {
            workspace: Some(workspace.into()),
            subject: "svc".into(),
            source: CredentialSource::StaticToken,
            permissions: parse_grants(&["encrypt"]).unwrap(),
        };
        let tokens = StaticTokens::new(vec![
            StaticToken::new("side-by-side-a", principal("ws_a")),
            StaticToken::new("side-by-side-b", principal("ws_b")),
        ]);
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        GATES.lock().unwrap().extend([
            ("side-by-side-a".to_owned(), barrier.clone()),
            ("side-by-side-b".to_owned(), barrier),
        ]);
        let (handle, _slot, _actor) = handle_over(Authenticator::new(tokens)).await;
        let both = async {
            tokio::join!(
                handle.authenticate(Some("Bearer side-by-side-a"), "req-a"),
                handle.authenticate(Some("Bearer side-by-side-b"), "req-b"),
            )
        };
        let (a, b) = tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .expect("the two verifications ran one after the other");
        assert_eq!(a.unwrap().workspace.as_deref(), Some("ws_a"));
        assert_eq!(b.unwrap().workspace.as_deref(), Some("ws_b"));
    }

    async fn handle_over(
        authenticator: Authenticator,
    ) -> (AuthHandle, Arc<ActorSlot<AuthMsg>>, ActorRef<AuthMsg>) {
        let (actor, _) = Actor::spawn(None, AuthActor, authenticator).await.unwrap();
        let slot = ActorSlot::new("auth actor");
        slot.set(actor.clone());
        (
            AuthHandle::new(slot.clone(), Duration::from_secs(5)),
            slot,
            actor,
        )
    }

    async fn refused(handle: &AuthHandle, token: &str) -> Error {
        handle
            .authenticate(Some(&format!("Bearer {token}")), "req-1")
            .await
            .unwrap_err()
    }

    #[tokio::test]
    async fn a_refused_token_is_answered_from_memory_until_the_memory_ends() {
        let principal = Principal {
            workspace: Some("ws_1".into()),
            subject: "svc".into(),
            source: CredentialSource::StaticToken,
            permissions: parse_grants(&["encrypt"]).unwrap(),
        };
        let tokens = StaticTokens::new(vec![StaticToken::new("good", principal)]);
        let (handle, slot, actor) = handle_over(Authenticator::new(tokens)).await;
        let first = refused(&handle, "forged").await;
        assert_eq!(first.kind(), Kind::InvalidToken, "{first}");
        assert!(handle
            .authenticate(Some("Bearer good"), "req-1")
            .await
            .is_ok());

        // Without the actor, only memory can answer: the refusal is repeated as it was, and
        // the verified token still passes, while a token never seen cannot be checked.
        slot.clear();
        assert_eq!(refused(&handle, "forged").await, first);
        assert!(handle
            .authenticate(Some("Bearer good"), "req-1")
            .await
            .is_ok());
        let unseen = refused(&handle, "unseen").await;
        assert_eq!(unseen.kind(), Kind::Unavailable, "{unseen}");

        // Once its memory ends the refusal goes back to the verifier.
        handle
            .refused
            .get_mut(&token_digest("forged"))
            .unwrap()
            .until = Instant::now();
        let expired = refused(&handle, "forged").await;
        assert_eq!(expired.kind(), Kind::Unavailable, "{expired}");
        actor.stop(None);
    }

    /// A verifier that cannot answer yet (no JWKS loaded) refuses with `unavailable`, which is
    /// not remembered: the token passes as soon as the keys are there.
    #[tokio::test]
    async fn a_refusal_the_token_did_not_earn_is_not_remembered() {
        let jwt = JwtVerifier::new(
            JwksSource::Url("http://127.0.0.1:9/jwks.json".into()),
            KeySet::default(),
            Duration::from_secs(3600),
            None,
            None,
            Duration::ZERO,
            "tenant_id",
        )
        .unwrap();
        let (handle, _slot, actor) =
            handle_over(Authenticator::new(StaticTokens::default()).with_jwt(jwt)).await;
        let part = |json: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
        let token = format!("{}.{}.c2ln", part(r#"{"alg":"ES256"}"#), part("{}"));
        let error = refused(&handle, &token).await;
        assert_eq!(error.kind(), Kind::Unavailable, "{error}");
        assert!(!handle.refused.contains_key(&token_digest(&token)));
        actor.stop(None);
    }
}
