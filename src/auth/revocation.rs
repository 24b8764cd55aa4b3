//! Token revocation. `ringvault token revoke TOKEN|JTI` (or [`revoke`]) records the
//! revocation in the object store under `revocations/` and publishes it on
//! `<nats.prefix>.revocations`; every replica subscribes to that subject and loads every stored
//! revocation at start (and again periodically, in case a message was missed), so a revoked
//! token is refused within a second everywhere and after a restart.
//!
//! Neither the store nor NATS ever holds a token or a jti in clear: a revocation names the
//! SHA-256 of the token (`revocations/<sha256-hex>`) or of the jti
//! (`revocations/jti-<sha256-hex>`). For a JWT the token's digest is that of its signed part
//! (`header.payload`), not of the whole text: an ECDSA signature has a second valid form
//! (`s` and `n − s`), so a revoked ES256 token rewritten with the other form would otherwise
//! be a new, unrevoked string.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashSet;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::claims::{looks_like_jwt, now_secs, peek_payload};
use super::{token_digest, RateLimiter};
use crate::config::Config;
use crate::error::{Error, Kind, Result};
use crate::storage::{ObjectStorage, PutCondition};

/// Where revocations live in the object store.
pub const REVOCATIONS_PREFIX: &str = "revocations/";
/// How often every replica reads all stored revocations again.
const RESYNC_PERIOD: Duration = Duration::from_secs(60);
/// How long a replica keeps refusing every token while some stored revocations cannot be read
/// (see [`may_take_tokens`]).
const UNREADABLE_GRACE: Duration = Duration::from_secs(30);
/// How often a replica whose stored revocations could not be read yet tries again.
const LOAD_RETRY_PERIOD: Duration = Duration::from_secs(2);
/// Budget of one storage or NATS step of a revocation.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// The NATS subject revocations are published on.
pub fn revocation_subject(prefix: &str) -> String {
    format!("{prefix}.revocations")
}

/// What a revocation names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationKind {
    /// A whole token, by [`revocation_digest`].
    Token,
    /// Every token with this `jti`, by the SHA-256 of the jti.
    Jti,
}

/// One revocation, as stored and as published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// What `sha256` is the digest of.
    pub kind: RevocationKind,
    /// Hex [`revocation_digest`] of the token, or SHA-256 of the jti.
    pub sha256: String,
    /// When it was revoked, seconds since the Unix epoch.
    pub revoked_at: u64,
}

impl Revocation {
    /// The revocation of `token`.
    pub fn token(token: &str) -> Self {
        Self {
            kind: RevocationKind::Token,
            sha256: hex::encode(revocation_digest(token)),
            revoked_at: now_secs(),
        }
    }

    /// The revocation of every token with `jti`.
    pub fn jti(jti: &str) -> Self {
        Self {
            kind: RevocationKind::Jti,
            sha256: hex::encode(Sha256::digest(jti.as_bytes())),
            revoked_at: now_secs(),
        }
    }

    /// Its object key.
    pub fn object_key(&self) -> String {
        match self.kind {
            RevocationKind::Token => format!("{REVOCATIONS_PREFIX}{}", self.sha256),
            RevocationKind::Jti => format!("{REVOCATIONS_PREFIX}jti-{}", self.sha256),
        }
    }

    /// The revocation an object key names (the inverse of [`Revocation::object_key`]), as far
    /// as the key tells: enough to see whether a set has it, not its time.
    fn from_object_key(key: &str) -> Option<Revocation> {
        let name = key.strip_prefix(REVOCATIONS_PREFIX)?;
        let (kind, sha256) = match name.strip_prefix("jti-") {
            Some(digest) => (RevocationKind::Jti, digest),
            None => (RevocationKind::Token, name),
        };
        Some(Revocation {
            kind,
            sha256: sha256.to_owned(),
            revoked_at: 0,
        })
    }

    /// The revocation of `token` by the digest of its whole text: how revocations were keyed
    /// before a JWT's was its signed part, and how replicas from then still look them up.
    pub fn whole_token(token: &str) -> Self {
        Self {
            kind: RevocationKind::Token,
            sha256: hex::encode(token_digest(token)),
            revoked_at: now_secs(),
        }
    }

    fn digest(&self) -> Option<[u8; 32]> {
        hex::decode(&self.sha256).ok()?.try_into().ok()
    }

    /// What logs show of it: its kind and the first 8 hex characters of the digest (for a
    /// token, its [`fingerprint`](super::fingerprint)).
    pub fn describe(&self) -> String {
        let kind = match self.kind {
            RevocationKind::Token => "token",
            RevocationKind::Jti => "jti",
        };
        format!("{kind} {}", self.sha256.get(..8).unwrap_or(&self.sha256))
    }
}

/// What a token's revocation is keyed by: the SHA-256 of a JWT's signed part
/// (`header.payload`), which every valid signature of it shares, or of the whole text of any
/// other token.
pub fn revocation_digest(token: &str) -> [u8; 32] {
    match token.rsplit_once('.') {
        Some((signed, _signature)) if looks_like_jwt(token) => {
            Sha256::digest(signed.as_bytes()).into()
        }
        _ => token_digest(token),
    }
}

/// What `token_or_jti` revokes. A JWT-shaped argument is a token: the token itself, and its
/// `jti` when it has one (read without verification: revoking only takes power away). Anything
/// else may be an opaque static token or a jti, so both are revoked.
pub fn revocations_for(token_or_jti: &str) -> Vec<Revocation> {
    let text = token_or_jti.trim();
    let mut out = vec![Revocation::token(text)];
    if looks_like_jwt(text) {
        // Also by the digest of the whole text, as replicas before revocations were keyed by
        // a JWT's signed part look them up: a rolling upgrade must not let the token through
        // on the replicas not yet upgraded.
        out.push(Revocation::whole_token(text));
        if let Some(jti) = peek_payload(text)
            .as_ref()
            .and_then(|claims| claims.get("jti"))
            .and_then(|jti| jti.as_str())
        {
            out.push(Revocation::jti(jti));
        }
    } else {
        out.push(Revocation::jti(text));
    }
    out
}

/// The revocations this replica knows. Every new one bumps [`Revocations::generation`], which
/// the gateway's verified-token cache watches.
#[derive(Debug, Default)]
pub struct Revocations {
    tokens: DashSet<[u8; 32]>,
    jtis: DashSet<[u8; 32]>,
    generation: AtomicU64,
    /// Set until the stored revocations have been read once (a set kept in sync with a
    /// store): until then no token can be told apart from a revoked one.
    unloaded: AtomicBool,
}

impl Revocations {
    /// An empty set, complete as it is.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty set that refuses every token (`unavailable`) until
    /// [`Revocations::mark_loaded`]: the set of a service whose stored revocations are still
    /// to be read. Failing closed: a replica that cannot read them must not take revoked
    /// tokens meanwhile.
    pub fn until_loaded() -> Self {
        Self {
            unloaded: AtomicBool::new(true),
            ..Self::default()
        }
    }

    /// Records that the stored revocations have all been read.
    pub fn mark_loaded(&self) {
        self.unloaded.store(false, Ordering::Release);
    }

    /// Whether the stored revocations have been read (always, for a set of [`Revocations::new`]).
    pub fn is_loaded(&self) -> bool {
        !self.unloaded.load(Ordering::Acquire)
    }

    /// Adds `revocation`; true when it was new.
    pub fn insert(&self, revocation: &Revocation) -> bool {
        let Some(digest) = revocation.digest() else {
            tracing::warn!(
                revocation = revocation.describe(),
                "ignoring a revocation whose digest is not 64 hex characters"
            );
            return false;
        };
        let added = match revocation.kind {
            RevocationKind::Token => self.tokens.insert(digest),
            RevocationKind::Jti => self.jtis.insert(digest),
        };
        if added {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        added
    }

    /// Whether `revocation` is in the set already.
    pub fn contains(&self, revocation: &Revocation) -> bool {
        let Some(digest) = revocation.digest() else {
            return false;
        };
        match revocation.kind {
            RevocationKind::Token => self.tokens.contains(&digest),
            RevocationKind::Jti => self.jtis.contains(&digest),
        }
    }

    /// Whether `token` (or its `jti`, if any) is revoked. A JWT revoked before revocations
    /// were keyed by its signed part is found by the digest of its whole text.
    pub fn is_revoked(&self, token: &str, jti: Option<&str>) -> bool {
        self.tokens.contains(&revocation_digest(token))
            || (looks_like_jwt(token) && self.tokens.contains(&token_digest(token)))
            || jti.is_some_and(|jti| {
                let jti_digest: [u8; 32] = Sha256::digest(jti.as_bytes()).into();
                self.jtis.contains(&jti_digest)
            })
    }

    /// [`Revocations::is_revoked`] as the refusal a verifier returns.
    /// Before the stored revocations are loaded every token is `unavailable`.
    pub fn refuse_if_revoked(&self, token: &str, jti: Option<&str>) -> Result<()> {
        if !self.is_loaded() {
            return Err(Error::unavailable(
                "the stored revocations are not loaded yet; retry shortly",
            ));
        }
        if self.is_revoked(token, jti) {
            return Err(Error::new(Kind::InvalidToken, "token has been revoked"));
        }
        Ok(())
    }

    /// Something other than a revocation took trust away (the identity provider's key set
    /// changed): every verification cached so far must be redone, as after a new revocation.
    pub(crate) fn invalidate_verified(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Increases whenever a revocation is added (or trust is otherwise taken away).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// How many revocations are known.
    pub fn len(&self) -> usize {
        self.tokens.len() + self.jtis.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

async fn bounded<T, E: std::fmt::Display>(
    what: &str,
    future: impl std::future::Future<Output = std::result::Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(STEP_TIMEOUT, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(Error::unavailable(format!("{what} failed: {error}"))),
        Err(_) => Err(Error::unavailable(format!(
            "{what} did not finish within {STEP_TIMEOUT:?}"
        ))),
    }
}

/// Revokes `token_or_jti`: records it under `revocations/` in `storage`, then publishes it on
/// `<prefix>.revocations` so that running replicas refuse it at once. Returns what was
/// revoked. This is what `ringvault token revoke` does.
pub async fn revoke(
    storage: &dyn ObjectStorage,
    nats: &async_nats::Client,
    prefix: &str,
    token_or_jti: &str,
) -> Result<Vec<Revocation>> {
    let revocations = store_revocations(storage, token_or_jti).await?;
    announce_revocations(nats, prefix, &revocations).await?;
    Ok(revocations)
}

/// The first half of [`revoke`]: records the revocations of `token_or_jti` in `storage`, where
/// every replica finds them at its next periodic read (within a minute) and at every start.
pub async fn store_revocations(
    storage: &dyn ObjectStorage,
    token_or_jti: &str,
) -> Result<Vec<Revocation>> {
    if token_or_jti.trim().is_empty() {
        return Err(Error::invalid_argument(
            "nothing to revoke: the token or jti is empty",
        ));
    }
    let revocations = revocations_for(token_or_jti);
    for revocation in &revocations {
        let body = serde_json::to_vec(revocation)
            .map_err(|error| Error::internal(format!("cannot encode a revocation: {error}")))?;
        let key = revocation.object_key();
        match tokio::time::timeout(
            STEP_TIMEOUT,
            storage.put(&key, Bytes::from(body), PutCondition::Overwrite),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(Error::from(error)),
            Err(_) => {
                return Err(Error::unavailable(format!(
                    "storage put of {key} did not finish within {STEP_TIMEOUT:?}"
                )))
            }
        }
    }
    Ok(revocations)
}

/// The second half of [`revoke`]: publishes stored `revocations` so that running replicas
/// apply them at once.
pub async fn announce_revocations(
    nats: &async_nats::Client,
    prefix: &str,
    revocations: &[Revocation],
) -> Result<()> {
    let subject = revocation_subject(prefix);
    for revocation in revocations {
        let body = serde_json::to_vec(revocation)
            .map_err(|error| Error::internal(format!("cannot encode a revocation: {error}")))?;
        bounded(
            "publishing the revocation",
            nats.publish(subject.clone(), Bytes::from(body)),
        )
        .await?;
    }
    bounded("flushing the revocation to nats", nats.flush()).await?;
    Ok(())
}

/// What one read of the stored revocations found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    /// Revocations new to the set.
    pub added: usize,
    /// Objects listed that could not be read (each logged).
    pub unreadable: usize,
}

/// Reads every revocation under `revocations/` into `into`. An error means the listing
/// failed; an object that cannot be read does not keep the others out, and is counted in
/// [`Loaded::unreadable`].
pub async fn load_revocations(storage: &dyn ObjectStorage, into: &Revocations) -> Result<Loaded> {
    let keys: Vec<String> = bounded(
        "listing revocations",
        storage
            .list(REVOCATIONS_PREFIX)
            .collect::<Vec<_>>()
            .map(|results| {
                results
                    .into_iter()
                    .collect::<std::result::Result<Vec<_>, _>>()
            }),
    )
    .await?;
    let mut added = 0;
    let mut unreadable = 0;
    for key in keys {
        // Known already (every periodic read lists them all): no read needed.
        if Revocation::from_object_key(&key).is_some_and(|revocation| into.contains(&revocation)) {
            continue;
        }
        let stored = match bounded("reading a revocation", storage.get(&key)).await {
            Ok(Some(stored)) => stored,
            Ok(None) => continue,
            Err(error) => {
                tracing::warn!(key, %error, "revocations: cannot read a stored revocation");
                unreadable += 1;
                continue;
            }
        };
        match stored_revocation(&key, &stored.bytes) {
            Some(revocation) => {
                if into.insert(&revocation) {
                    added += 1;
                }
            }
            None => tracing::warn!(key, "ignoring a malformed revocation object"),
        }
    }
    Ok(Loaded { added, unreadable })
}

/// Whether a replica whose stored revocations are read as `loaded`, after trying for
/// `trying_for`, may take tokens. Every object read: yes. Some unreadable: not at first, as
/// one may revoke the token at hand; but an object that stays unreadable (a permission the
/// service lacks) must not keep every replica refusing every token for good, so after
/// [`UNREADABLE_GRACE`] the rest counts, and the unreadable ones are tried again at every
/// periodic read.
fn may_take_tokens(loaded: Loaded, trying_for: Duration) -> bool {
    loaded.unreadable == 0 || trying_for >= UNREADABLE_GRACE
}

/// The revocation in the object stored under `key`, if it is one and belongs at that key.
fn stored_revocation(key: &str, bytes: &[u8]) -> Option<Revocation> {
    serde_json::from_slice::<Revocation>(bytes)
        .ok()
        .filter(|revocation| revocation.object_key() == key)
}

use futures::FutureExt as _;

/// Connects to NATS as `[nats]` says (url, credentials file, token).
pub(crate) async fn connect_nats(config: &Config) -> Result<async_nats::Client> {
    crate::server::connect_nats(config, "ringvault-revocations")
        .await
        .map_err(|error| Error::unavailable(error.to_string()))
}

/// How many revocation messages a second are each confirmed by a read of their own object
/// (also the burst allowed at once); past it, the rest wait for one read of the whole store.
const CONFIRMATIONS_PER_SECOND: u64 = 16;
/// The one bucket of the confirmation limiter.
const CONFIRMATIONS: &str = "confirmations";

/// The limiter of revocation confirmations: [`CONFIRMATIONS_PER_SECOND`].
fn confirmation_limiter() -> RateLimiter {
    RateLimiter::new(CONFIRMATIONS_PER_SECOND, CONFIRMATIONS_PER_SECOND)
}

/// Applies a revocation message. It is only a hint: anyone allowed to publish on the subject
/// could send one, and each new entry grows the set and empties the verified-token cache, so
/// it counts once the store holds the same revocation (`revoke` writes the store first).
/// Malformed and known ones cost nothing; the others are read one by one within `budget`.
/// Returns false for one past the budget: it waits for a read of the whole store.
async fn apply_message(
    storage: &dyn ObjectStorage,
    revocations: &Revocations,
    payload: &[u8],
    budget: &RateLimiter,
) -> bool {
    let Some(revocation) = new_revocation_in(revocations, payload) else {
        return true;
    };
    if budget.check(CONFIRMATIONS).is_err() {
        return false;
    }
    confirm(storage, revocations, &revocation).await;
    true
}

/// The revocation a message names, unless it is malformed or known already (neither needs a
/// read of the store).
fn new_revocation_in(revocations: &Revocations, payload: &[u8]) -> Option<Revocation> {
    let Ok(revocation) = serde_json::from_slice::<Revocation>(payload) else {
        tracing::warn!("ignoring a malformed revocation message");
        return None;
    };
    (!revocations.contains(&revocation)).then_some(revocation)
}

/// Adds `revocation` once the store holds it.
async fn confirm(storage: &dyn ObjectStorage, revocations: &Revocations, revocation: &Revocation) {
    let key = revocation.object_key();
    let stored = match bounded("reading a revocation", storage.get(&key)).await {
        Ok(stored) => stored,
        Err(error) => {
            // The periodic re-read of the store picks it up if it is real.
            tracing::warn!(%error, key, "revocations: cannot confirm a message in the store");
            return;
        }
    };
    let Some(stored) = stored.and_then(|stored| stored_revocation(&key, &stored.bytes)) else {
        tracing::warn!(key, "ignoring a revocation message the store does not hold");
        return;
    };
    if revocations.insert(&stored) {
        tracing::info!(revocation = revocation.describe(), "credential revoked");
    }
}

/// Waits before trying NATS again. Stored revocations not loaded yet are read meanwhile, every
/// [`LOAD_RETRY_PERIOD`] at most: the store, not NATS, decides when tokens are taken.
async fn wait_for_nats<F, Fut>(backoff: &mut Duration, revocations: &Revocations, load: &F)
where
    F: Fn(&'static str) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if revocations.is_loaded() {
        tokio::time::sleep(*backoff).await;
    } else {
        tokio::time::sleep((*backoff).min(LOAD_RETRY_PERIOD)).await;
        load("retry").await;
    }
    *backoff = (*backoff * 2).min(Duration::from_secs(10));
}

/// Keeps `revocations` current until aborted: loads the store, subscribes to the revocation
/// subject, loads again (nothing published in between is lost), signals `ready`, then applies
/// every message and re-reads the store every minute.
pub(crate) async fn sync_forever(
    config: Arc<Config>,
    revocations: Arc<Revocations>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let backend = loop {
        match crate::server::open_backend(&config).await {
            Ok(backend) => break backend,
            Err(error) => {
                tracing::warn!(%error, "revocations: cannot open the store; retrying");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    };
    // The grace for unreadable objects runs from the first listing that found some, not from
    // the start: a store that was down for a while gets its full grace once it answers.
    let unreadable_since: Arc<std::sync::Mutex<Option<tokio::time::Instant>>> = Arc::default();
    let load = |why: &'static str| {
        let backend = backend.clone();
        let revocations = revocations.clone();
        let unreadable_since = unreadable_since.clone();
        async move {
            let outcome = load_revocations(&*backend, &revocations).await;
            let waited = match &outcome {
                Ok(loaded) if loaded.unreadable > 0 => {
                    crate::lock_ignoring_poison(&unreadable_since)
                        .get_or_insert_with(tokio::time::Instant::now)
                        .elapsed()
                }
                _ => Duration::ZERO,
            };
            match outcome {
                Ok(loaded) if !revocations.is_loaded() && !may_take_tokens(loaded, waited) => {
                    tracing::error!(
                        unreadable = loaded.unreadable,
                        why,
                        "revocations: some stored revocations cannot be read; every token is \
                         refused (unavailable) while they are tried again"
                    )
                }
                Ok(Loaded { added, unreadable }) => {
                    if unreadable > 0 {
                        tracing::error!(
                            unreadable,
                            why,
                            "revocations: some stored revocations still cannot be read; the \
                             tokens they revoke are taken until they can be (tried at every \
                             periodic read)"
                        );
                    }
                    if !revocations.is_loaded() {
                        tracing::info!(added, why, "stored revocations loaded; taking tokens");
                    } else if added > 0 {
                        tracing::info!(added, why, "revocations loaded");
                    }
                    revocations.mark_loaded();
                }
                Err(error) if revocations.is_loaded() => {
                    tracing::warn!(%error, why, "revocations: cannot read the store")
                }
                Err(error) => tracing::error!(
                    %error,
                    why,
                    "revocations: cannot read the store; every token is refused (unavailable) \
                     until the stored revocations are loaded"
                ),
            }
        }
    };
    load("start").await;
    let subject = revocation_subject(&config.nats.prefix);
    let mut backoff = Duration::from_millis(200);
    loop {
        let subscriber = match connect_nats(&config).await {
            Ok(client) => client
                .subscribe(subject.clone())
                .await
                .map(|sub| (client, sub)),
            Err(error) => {
                tracing::warn!(%error, "revocations: cannot connect to nats; retrying");
                wait_for_nats(&mut backoff, &revocations, &load).await;
                continue;
            }
        };
        let (_client, mut subscriber) = match subscriber {
            Ok(pair) => pair,
            Err(error) => {
                tracing::warn!(%error, subject, "revocations: cannot subscribe; retrying");
                wait_for_nats(&mut backoff, &revocations, &load).await;
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        load("subscribed").await;
        if let Some(ready) = ready.take() {
            let _ = ready.send(());
        }
        let mut resync = tokio::time::interval(RESYNC_PERIOD);
        resync.tick().await;
        let mut retry_load = tokio::time::interval(LOAD_RETRY_PERIOD);
        retry_load.tick().await;
        let budget = confirmation_limiter();
        let mut burst_read = tokio::time::interval(Duration::from_secs(1));
        // Ticks missed while no burst was waiting are not owed: at most one read a second.
        burst_read.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        burst_read.tick().await;
        let mut read_for_burst = false;
        loop {
            tokio::select! {
                message = subscriber.next() => match message {
                    Some(message) => {
                        let payload = &message.payload;
                        if !apply_message(&*backend, &revocations, payload, &budget).await {
                            // A burst (real or forged): one read of the store, soon, answers
                            // every message of it, instead of one read each.
                            read_for_burst = true;
                        }
                    }
                    None => break,
                },
                _ = resync.tick() => load("periodic").await,
                _ = burst_read.tick(), if read_for_burst => {
                    read_for_burst = false;
                    load("burst").await;
                }
                // Not loaded yet, the service refuses every token: try again sooner.
                _ = retry_load.tick(), if !revocations.is_loaded() => load("retry").await,
            }
        }
        tracing::warn!(
            subject,
            "revocations: subscription ended; subscribing again"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::ObjectStoreBackend;

    #[test]
    fn opaque_arguments_revoke_token_and_jti_without_keeping_them() {
        let revocations = revocations_for("rv_static_secret");
        assert_eq!(revocations.len(), 2);
        for revocation in &revocations {
            assert!(!revocation.object_key().contains("rv_static_secret"));
            assert!(!serde_json::to_string(revocation)
                .unwrap()
                .contains("rv_static_secret"));
        }
        let set = Revocations::new();
        for revocation in &revocations {
            assert!(set.insert(revocation));
        }
        assert!(!set.insert(&revocations[0]));
        assert_eq!(set.generation(), 2);
        assert!(set.is_revoked("rv_static_secret", None));
        assert!(set.is_revoked("other", Some("rv_static_secret")));
        assert!(!set.is_revoked("other", Some("jti-2")));
    }

    /// Every signature of a JWT's signed part is the same revoked token; a revocation stored
    /// under the digest of a JWT's whole text (before revocations were keyed by the signed
    /// part) still counts.
    #[test]
    fn a_revoked_jwt_stays_revoked_under_another_signature() {
        let set = Revocations::new();
        for revocation in revocations_for("aGVhZGVy.cGF5bG9hZA.c2lnLTE") {
            set.insert(&revocation);
        }
        assert!(set.is_revoked("aGVhZGVy.cGF5bG9hZA.c2lnLTI", None));
        assert!(!set.is_revoked("aGVhZGVy.b3RoZXI.c2lnLTE", None));
        let legacy = Revocation::whole_token("aGVhZGVy.bGVnYWN5.c2ln");
        set.insert(&legacy);
        assert!(set.is_revoked("aGVhZGVy.bGVnYWN5.c2ln", None));
    }

    #[tokio::test]
    async fn stored_revocations_load() {
        let store = ObjectStoreBackend::in_memory();
        store_revocations(&store, "a.b.c").await.unwrap();
        store
            .put(
                "revocations/garbage",
                Bytes::from_static(b"{}"),
                PutCondition::Overwrite,
            )
            .await
            .unwrap();
        let set = Revocations::new();
        let loaded = load_revocations(&store, &set).await.unwrap();
        assert_eq!(
            loaded,
            Loaded {
                added: 2,
                unreadable: 0
            },
            "by the signed part and by the whole text"
        );
        assert!(set.is_revoked("a.b.c", None));
        assert_eq!(load_revocations(&store, &set).await.unwrap().added, 0);
    }

    #[test]
    fn a_set_still_to_be_loaded_refuses_every_token_as_unavailable() {
        let set = Revocations::until_loaded();
        let error = set.refuse_if_revoked("any-token", None).unwrap_err();
        assert_eq!(error.kind(), Kind::Unavailable);
        set.mark_loaded();
        set.refuse_if_revoked("any-token", None).unwrap();
        assert!(Revocations::new().is_loaded());
    }

    /// One revocation that cannot be read does not keep the others out, and the load reports
    /// it: tokens wait for it for a while, not for good.
    #[tokio::test]
    async fn an_unreadable_revocation_does_not_keep_the_others_out() {
        let store = Arc::new(ObjectStoreBackend::in_memory());
        // Each an opaque token, revoked as a token and as a jti: six objects.
        for token in ["first-token", "second-token", "third-token"] {
            store_revocations(&*store, token).await.unwrap();
        }
        let (faulty, faults) = crate::storage::FaultyStorage::new(store);
        faults
            .fail_next
            .store(1, std::sync::atomic::Ordering::SeqCst);
        let set = Revocations::new();
        let loaded = load_revocations(&faulty, &set).await.unwrap();
        assert_eq!(
            loaded,
            Loaded {
                added: 5,
                unreadable: 1
            }
        );
        assert_eq!(set.len(), 5, "the readable revocations are in");
        assert!(!may_take_tokens(loaded, Duration::ZERO));
        assert!(
            may_take_tokens(loaded, UNREADABLE_GRACE),
            "an object that stays unreadable does not lock every token out for good"
        );
        let again = load_revocations(&faulty, &set).await.unwrap();
        assert_eq!(again.added, 1);
        assert!(may_take_tokens(again, Duration::ZERO));
        // Every one known now: a periodic read lists them and reads none.
        let reads_before = faults.calls.load(std::sync::atomic::Ordering::SeqCst);
        let quiet = load_revocations(&faulty, &set).await.unwrap();
        assert_eq!(quiet.added, 0);
        assert_eq!(
            faults.calls.load(std::sync::atomic::Ordering::SeqCst),
            reads_before,
            "known revocations were read again"
        );
    }

    /// A flood of revocation messages (forged ones cost a read each to be found out) is
    /// confirmed one by one only up to a budget a second; the rest wait for one read of the
    /// store.
    #[test]
    fn confirmations_are_budgeted_per_second() {
        let start = std::time::Instant::now();
        let budget = confirmation_limiter();
        let taken = (0..100)
            .filter(|_| budget.check_at(CONFIRMATIONS, start).is_ok())
            .count();
        assert_eq!(taken, CONFIRMATIONS_PER_SECOND as usize);
        assert!(budget
            .check_at(CONFIRMATIONS, start + Duration::from_secs(1))
            .is_ok());
    }

    #[tokio::test]
    async fn a_revocation_message_counts_only_once_the_store_holds_it() {
        let store = ObjectStoreBackend::in_memory();
        let set = Revocations::new();
        let revocation = &revocations_for("x.y.z")[0];
        let message = serde_json::to_vec(revocation).unwrap();
        assert!(apply_message(&store, &set, &message, &confirmation_limiter()).await);
        assert!(!set.is_revoked("x.y.z", None), "a forged message");
        assert_eq!(set.generation(), 0, "the token cache was not emptied");
        store
            .put(
                &revocation.object_key(),
                Bytes::from(message.clone()),
                PutCondition::Overwrite,
            )
            .await
            .unwrap();
        assert!(apply_message(&store, &set, &message, &confirmation_limiter()).await);
        assert!(set.is_revoked("x.y.z", None));
        assert_eq!(set.generation(), 1);
    }
}
