//! The master-key roll: re-seal every stored DEK not sealed by the current master key, the
//! `LATEST` copies included, keeping each DEK's id and creation time. Idempotent: objects
//! already sealed by the current key are left alone, so a crashed roll is simply run again.

use futures::StreamExt as _;
use prost::Message as _;

use super::KeyringStore;
use crate::error::{Error, Result};
use crate::protocol::EncryptedDataEncryptionKey;
use crate::storage::{dek_key, keyring_of, PutCondition, KEYRING_ROOT, LATEST};

/// How many objects are re-sealed at once.
const CONCURRENCY: usize = 16;

/// Counts of a roll, updated as it goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RollReport {
    /// Objects looked at.
    pub scanned: u64,
    /// Objects re-sealed by the current master key.
    pub resealed: u64,
    /// Objects that were sealed by the current master key already.
    pub already_current: u64,
    /// Objects that could not be re-sealed (see `failures`).
    pub failed: u64,
    /// Object key and error of each failure.
    pub failures: Vec<(String, Error)>,
}

enum Outcome {
    Resealed,
    AlreadyCurrent,
}

impl RollReport {
    fn record(&mut self, key: String, outcome: Result<Outcome>) {
        self.scanned += 1;
        match outcome {
            Ok(Outcome::Resealed) => self.resealed += 1,
            Ok(Outcome::AlreadyCurrent) => self.already_current += 1,
            Err(error) => {
                self.failed += 1;
                self.failures.push((key, error));
            }
        }
    }
}

/// Re-seals every keyring object with the current master key, calling `progress` after each
/// object. DEK objects go first; LATEST copies after, as byte copies of their re-sealed DEK
/// object, so LATEST stays identical to the object it copies.
pub async fn roll_deks(
    store: &KeyringStore,
    mut progress: impl FnMut(&RollReport),
) -> Result<RollReport> {
    let mut report = RollReport::default();
    let mut latest_keys = Vec::new();
    let mut dek_keys = Vec::new();
    let mut listing = store.storage().list(KEYRING_ROOT);
    while let Some(key) = listing.next().await {
        let key = key.map_err(Error::from)?;
        match keyring_of(&key) {
            Some((_, LATEST)) => latest_keys.push(key),
            Some(_) => dek_keys.push(key),
            None => report.record(
                key.clone(),
                Err(Error::internal(format!("{key} is not a keyring object"))),
            ),
        }
    }
    let mut resealing = futures::stream::iter(dek_keys)
        .map(|key| async move {
            let outcome = reseal_dek_object(store, &key).await;
            (key, outcome)
        })
        .buffer_unordered(CONCURRENCY);
    while let Some((key, outcome)) = resealing.next().await {
        report.record(key, outcome);
        progress(&report);
    }
    drop(resealing);
    let mut copying = futures::stream::iter(latest_keys)
        .map(|key| async move {
            let outcome = reseal_latest(store, &key).await;
            (key, outcome)
        })
        .buffer_unordered(CONCURRENCY);
    while let Some((key, outcome)) = copying.next().await {
        report.record(key, outcome);
        progress(&report);
    }
    Ok(report)
}

/// An object the listing named that a read then did not find. ringvault never deletes keyring
/// objects, so this is no success to skip quietly: the object may still be sealed by the old
/// master key (a name the store lists in one spelling and reads in another, or a deletion by
/// someone else), and retiring that key would make it unreadable.
fn listed_but_missing(key: &str) -> Error {
    Error::not_found(format!(
        "{key} was listed but not found when read; it was not re-sealed"
    ))
}

fn decode(key: &str, bytes: &[u8]) -> Result<EncryptedDataEncryptionKey> {
    EncryptedDataEncryptionKey::decode(bytes).map_err(|error| {
        Error::internal(format!(
            "{key} is not an EncryptedDataEncryptionKey: {error}"
        ))
    })
}

fn sealed_by_current(store: &KeyringStore, stored: &EncryptedDataEncryptionKey) -> bool {
    stored
        .encrypted
        .as_ref()
        .is_some_and(|encrypted| store.master_keys().is_current(&encrypted.encryption_key_id))
}

async fn reseal_dek_object(store: &KeyringStore, key: &str) -> Result<Outcome> {
    let Some(object) = store.storage().get(key).await? else {
        return Err(listed_but_missing(key));
    };
    let stored = decode(key, &object.bytes)?;
    if sealed_by_current(store, &stored) {
        return Ok(Outcome::AlreadyCurrent);
    }
    let dek = store.open(key, &object.bytes)?;
    store
        .storage()
        .put(
            key,
            store.seal(&dek),
            PutCondition::IfUnchanged(object.version),
        )
        .await?;
    Ok(Outcome::Resealed)
}

async fn reseal_latest(store: &KeyringStore, key: &str) -> Result<Outcome> {
    let Some(latest) = store.storage().get(key).await? else {
        return Err(listed_but_missing(key));
    };
    let stored = decode(key, &latest.bytes)?;
    if sealed_by_current(store, &stored) {
        return Ok(Outcome::AlreadyCurrent);
    }
    let dek = store.open(key, &latest.bytes)?;
    let (keyring, _) =
        keyring_of(key).ok_or_else(|| Error::internal(format!("{key} is not a keyring object")))?;
    let object_key = dek_key(keyring, dek.id());
    // Copy the DEK object when it is current already; otherwise (missing, or written after the
    // first pass) seal it now and write it under its id first, as every new DEK is.
    let bytes = match store.storage().get(&object_key).await? {
        Some(object) if sealed_by_current(store, &decode(&object_key, &object.bytes)?) => {
            object.bytes
        }
        _ => {
            let bytes = store.seal(&dek);
            store
                .storage()
                .put(&object_key, bytes.clone(), PutCondition::Overwrite)
                .await?;
            bytes
        }
    };
    store
        .storage()
        .put(key, bytes, PutCondition::IfUnchanged(latest.version))
        .await?;
    Ok(Outcome::Resealed)
}
