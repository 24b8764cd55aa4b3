//! The storage side of a keyring: reading, creating and rotating DEKs as stored objects.
//! Stateless; [`super::Keyrings`] caches what it returns.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;

use crate::crypto::{Dek, MasterKeys};
use crate::error::{Error, Result};
use crate::protocol::EncryptedDataEncryptionKey;
use crate::storage::{dek_key, latest_key, PutCondition, Storage, StorageError, Version};

/// LATEST as read from the store.
#[derive(Debug)]
pub struct LatestRead {
    /// The DEK it holds.
    pub dek: Dek,
    /// The object version, for a conditional replace.
    pub version: Version,
}

/// What writing a new LATEST did (a rotation, or a keyring's first DEK).
#[derive(Debug)]
pub struct Rotated {
    /// The DEK that is LATEST now.
    pub dek: Dek,
    /// The id of the DEK that was LATEST before, if any.
    pub previous_key_id: Option<String>,
    /// False when a concurrent writer replaced LATEST first and its DEK is returned instead.
    pub won: bool,
}

/// How many of a keyring's objects DescribeKeyring reads at once.
pub const DESCRIBE_READS_AT_ONCE: usize = 16;
/// The most time DescribeKeyring may take, listing and reads together.
pub const DESCRIBE_BUDGET: Duration = Duration::from_secs(10);

/// Reads and writes the DEK objects of keyrings, sealing and opening them with the master keys.
#[derive(Clone, Debug)]
pub struct KeyringStore {
    storage: Storage,
    master_keys: Arc<MasterKeys>,
}

impl KeyringStore {
    /// A store over `storage`, sealing with `master_keys`.
    pub fn new(storage: Storage, master_keys: Arc<MasterKeys>) -> Self {
        Self {
            storage,
            master_keys,
        }
    }

    /// The storage handle.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The master keys.
    pub fn master_keys(&self) -> &MasterKeys {
        &self.master_keys
    }

    /// The keyring's LATEST; `None` only when the store says it does not exist.
    pub async fn read_latest(&self, keyring: &str) -> Result<Option<LatestRead>> {
        let key = latest_key(keyring);
        let Some(stored) = self.storage.get(&key).await? else {
            return Ok(None);
        };
        let dek = self.open(&key, &stored.bytes)?;
        Ok(Some(LatestRead {
            dek,
            version: stored.version,
        }))
    }

    /// The DEK `key_id` of the keyring; `None` when the store has no such object.
    pub async fn read_dek(&self, keyring: &str, key_id: &str) -> Result<Option<Dek>> {
        let key = dek_key(keyring, key_id);
        let Some(stored) = self.storage.get(&key).await? else {
            return Ok(None);
        };
        let dek = self.open(&key, &stored.bytes)?;
        if dek.id() != key_id {
            return Err(Error::internal(format!(
                "object {key} holds key {:?}",
                dek.id()
            )));
        }
        Ok(Some(dek))
    }

    /// Creates the keyring's first DEK: the DEK object first, then LATEST if still absent.
    /// When another writer created LATEST first, its DEK is returned (`won: false`) and ours
    /// stays stored, unused.
    pub async fn create_first(&self, keyring: &str) -> Result<Rotated> {
        self.write_new_latest(keyring, None).await
    }

    /// Makes a new DEK the keyring's LATEST, replacing `current` only if it is still LATEST
    /// (where the store supports conditional writes; with no `current`, only if LATEST is
    /// absent). A rotation that loses to a concurrent writer returns that writer's DEK
    /// (`won: false`) and leaves its own stored, unused.
    pub async fn rotate(&self, keyring: &str, current: Option<&LatestRead>) -> Result<Rotated> {
        self.write_new_latest(keyring, current).await
    }

    /// Writes a new DEK under its id, then as LATEST: if absent when `current` is `None`,
    /// else only if LATEST is still `current`.
    async fn write_new_latest(
        &self,
        keyring: &str,
        current: Option<&LatestRead>,
    ) -> Result<Rotated> {
        let dek = Dek::generate();
        let bytes = self.seal(&dek);
        self.storage
            .put(
                &dek_key(keyring, dek.id()),
                bytes.clone(),
                PutCondition::Overwrite,
            )
            .await?;
        let condition = match current {
            Some(current) => PutCondition::IfUnchanged(current.version.clone()),
            None => PutCondition::IfAbsent,
        };
        let previous_key_id = current.map(|current| current.dek.id().to_owned());
        match self
            .storage
            .put(&latest_key(keyring), bytes, condition)
            .await
        {
            Ok(()) => {
                tracing::info!(
                    keyring,
                    key_id = dek.id(),
                    previous_key_id,
                    "wrote a new latest key"
                );
                Ok(Rotated {
                    dek,
                    previous_key_id,
                    won: true,
                })
            }
            // Our DEK object stays. "Lost" may be a retry that met our own write: a conditional
            // put that landed but whose answer was lost (a 5xx, a dropped connection) is retried,
            // by `Storage` and by the S3 client, and the retry finds LATEST taken. Meanwhile
            // other replicas may have read our key as LATEST and sealed with it, so it must
            // never be deleted; an unused DEK object costs a few hundred bytes.
            Err(StorageError::AlreadyExists { .. } | StorageError::Changed { .. }) => {
                let latest = self.read_latest(keyring).await?.ok_or_else(|| {
                    Error::unavailable(format!("keyring {keyring:?} changed while being written"))
                })?;
                // A retry that met our own landed write: we did win, and must announce it.
                let won = latest.dek.id() == dek.id();
                if won {
                    tracing::info!(
                        keyring,
                        key_id = dek.id(),
                        "wrote a new latest key (on a retry)"
                    );
                } else {
                    tracing::info!(
                        keyring,
                        key_id = latest.dek.id(),
                        unused_key_id = dek.id(),
                        "another writer replaced latest first; using its key"
                    );
                }
                Ok(Rotated {
                    dek: latest.dek,
                    previous_key_id,
                    won,
                })
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Every key of the keyring, oldest first, and the id of LATEST; read from the stored
    /// objects' plaintext fields, without opening any. The objects are read
    /// `DESCRIBE_READS_AT_ONCE` at a time, and the whole call within `DESCRIBE_BUDGET`: a
    /// keyring rotated thousands of times must not hold a request (and its in-flight slot)
    /// for as long as thousands of reads one after the other take.
    pub async fn describe(&self, keyring: &str) -> Result<(Vec<(String, i64)>, Option<String>)> {
        tokio::time::timeout(DESCRIBE_BUDGET, self.describe_unbounded(keyring))
            .await
            .unwrap_or_else(|_| {
                Err(Error::unavailable(format!(
                    "describing keyring {keyring:?} took longer than {DESCRIBE_BUDGET:?}"
                )))
            })
    }

    async fn describe_unbounded(
        &self,
        keyring: &str,
    ) -> Result<(Vec<(String, i64)>, Option<String>)> {
        use futures::{StreamExt as _, TryStreamExt as _};

        let prefix = format!("{}{keyring}/", crate::storage::KEYRING_ROOT);
        let listed: Vec<String> = self.storage.list(&prefix).try_collect().await?;
        // Deeper keyrings (`<keyring>/x/…`) share the prefix; only direct children count.
        let children = listed.into_iter().filter(|key| {
            key.strip_prefix(&prefix)
                .is_some_and(|leaf| !leaf.contains('/'))
        });
        let mut reads = futures::stream::iter(children)
            .map(|key| async move {
                let object = self.storage.get(&key).await?;
                Ok::<_, Error>((key, object))
            })
            .buffer_unordered(DESCRIBE_READS_AT_ONCE);
        let mut keys = Vec::new();
        let mut latest_id = None;
        while let Some((key, object)) = reads.try_next().await? {
            let Some(object) = object else {
                continue;
            };
            let stored =
                EncryptedDataEncryptionKey::decode(object.bytes.as_ref()).map_err(|error| {
                    Error::internal(format!(
                        "object {key} is not an EncryptedDataEncryptionKey: {error}"
                    ))
                })?;
            if key.rsplit('/').next() == Some(crate::storage::LATEST) {
                latest_id = Some(stored.id);
            } else {
                keys.push((stored.id, stored.created_at));
            }
        }
        keys.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        Ok((keys, latest_id))
    }

    /// The stored form of `dek`, sealed by the current master key.
    pub fn seal(&self, dek: &Dek) -> Bytes {
        Bytes::from(self.master_keys.seal_dek(dek).encode_to_vec())
    }

    /// Opens the stored object at `key`.
    pub fn open(&self, key: &str, bytes: &[u8]) -> Result<Dek> {
        let stored = EncryptedDataEncryptionKey::decode(bytes).map_err(|error| {
            Error::internal(format!(
                "object {key} is not an EncryptedDataEncryptionKey: {error}"
            ))
        })?;
        self.master_keys
            .open_dek(&stored)
            .map_err(|error| error.context(format!("object {key}")))
    }
}
