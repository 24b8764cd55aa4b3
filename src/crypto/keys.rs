//! Key types. Key bytes live in [`Zeroizing`] buffers and in AES key schedules that are
//! overwritten when dropped (see [`aead`] for what that covers); `Debug` shows ids only.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use prost::Message as _;
use rand::RngCore as _;
use zeroize::Zeroizing;

use super::aead::{self, Cipher};
use crate::error::{Error, Result};
use crate::protocol::{DataEncryptionKey, Encrypted, EncryptedDataEncryptionKey, KeyEncryptionKey};

/// Length of every key: AES-256.
pub const KEY_LEN: usize = 32;

/// Key material shared by [`Dek`] and [`Kek`]: id, creation time, bytes and a ready cipher.
struct KeyMaterial {
    id: String,
    created_at: i64,
    bytes: Zeroizing<[u8; KEY_LEN]>,
    cipher: Cipher,
}

impl KeyMaterial {
    fn new(id: String, created_at: i64, key: &[u8], what: &str) -> Result<Self> {
        let bytes: [u8; KEY_LEN] = key.try_into().map_err(|_| {
            Error::invalid_argument(format!(
                "{what} {id:?} must be {KEY_LEN} bytes, got {}",
                key.len()
            ))
        })?;
        let bytes = Zeroizing::new(bytes);
        let cipher = Cipher::new(&bytes);
        Ok(Self {
            id,
            created_at,
            bytes,
            cipher,
        })
    }

    fn generate(id: String, created_at: i64) -> Self {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        rand::rngs::OsRng.fill_bytes(bytes.as_mut_slice());
        let cipher = Cipher::new(&bytes);
        Self {
            id,
            created_at,
            bytes,
            cipher,
        }
    }
}

/// A data encryption key: seals the payloads of one keyring.
pub struct Dek(KeyMaterial);

impl Dek {
    /// A new random DEK with a fresh id.
    pub fn generate() -> Self {
        Self(KeyMaterial::generate(super::new_dek_id(), super::now_ms()))
    }

    /// A DEK from its parts; the key must be 32 bytes.
    pub fn from_parts(id: String, created_at: i64, key: &[u8]) -> Result<Self> {
        KeyMaterial::new(id, created_at, key, "data encryption key").map(Self)
    }

    /// The key id.
    pub fn id(&self) -> &str {
        &self.0.id
    }

    /// Creation time, unix milliseconds.
    pub fn created_at(&self) -> i64 {
        self.0.created_at
    }

    /// Seals a payload under a fresh nonce.
    pub fn seal(&self, plaintext: &[u8]) -> Encrypted {
        aead::seal(&self.0.cipher, &self.0.id, plaintext, super::now_ms())
    }

    /// Seals a payload under a fresh nonce into the protobuf bytes of its envelope, the form
    /// callers receive (as base64); one copy of the plaintext, no intermediate message.
    pub fn seal_envelope(&self, plaintext: &[u8]) -> Vec<u8> {
        aead::seal_envelope(&self.0.cipher, &self.0.id, plaintext, super::now_ms())
    }

    /// Opens a payload sealed by this key, decrypting its buffer in place.
    pub fn open(&self, encrypted: Encrypted) -> Result<Vec<u8>> {
        aead::open(&self.0.cipher, encrypted)
    }

    /// The cipher, for reproducing known vectors.
    pub fn cipher(&self) -> &Cipher {
        &self.0.cipher
    }

    /// The protobuf bytes of the plaintext DEK, in a buffer zeroized on drop.
    fn to_protobuf(&self) -> Zeroizing<Vec<u8>> {
        let message = DataEncryptionKey {
            id: self.0.id.clone(),
            created_at: self.0.created_at,
            key: self.0.bytes.to_vec(),
        };
        Zeroizing::new(message.encode_to_vec())
    }
}

impl fmt::Debug for Dek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dek")
            .field("id", &self.0.id)
            .field("created_at", &self.0.created_at)
            .finish_non_exhaustive()
    }
}

/// A key encryption key (master key): seals DEKs for storage.
pub struct Kek(KeyMaterial);

impl Kek {
    /// A new random master key with a fresh id.
    pub fn generate() -> Self {
        Self(KeyMaterial::generate(super::new_kek_id(), super::now_ms()))
    }

    /// Parses the configured form: standard base64 of the protobuf `KeyEncryptionKey`, read
    /// as Go's Vault reads it (line breaks, as `base64` wraps at 76 columns, and non-zero
    /// trailing bits accepted; other whitespace and missing padding too). Errors never repeat
    /// the input, not even the one character that is wrong.
    pub fn parse(text: &str) -> Result<Self> {
        let compact: Zeroizing<String> = Zeroizing::new(
            text.chars()
                .filter(|character| !character.is_ascii_whitespace())
                .collect(),
        );
        let bytes = Zeroizing::new(crate::protocol::tolerant_decode(&compact).map_err(|_| {
            Error::invalid_argument(
                "master key is not valid base64 (standard alphabet, as `ringvault keygen` \
                     writes it)",
            )
        })?);
        let message = KeyEncryptionKey::decode(bytes.as_slice()).map_err(|error| {
            Error::invalid_argument(format!(
                "master key is not a protobuf KeyEncryptionKey: {error}"
            ))
        })?;
        if message.id.is_empty() {
            return Err(Error::invalid_argument("master key has an empty id"));
        }
        // A key's encoding is canonical (each field once, in order). Anything longer held more
        // (two keys pasted one after the other, where the later one's fields would silently
        // win) and is refused rather than guessed at.
        if prost::Message::encoded_len(&message) != bytes.len() {
            return Err(Error::invalid_argument(
                "master key holds more than one key, or fields a key does not have",
            ));
        }
        KeyMaterial::new(
            message.id.clone(),
            message.created_at,
            &message.key,
            "master key",
        )
        .map(Self)
    }

    /// The configured form of this key (a secret: handle with care).
    pub fn to_base64(&self) -> Zeroizing<String> {
        let message = KeyEncryptionKey {
            id: self.0.id.clone(),
            created_at: self.0.created_at,
            key: self.0.bytes.to_vec(),
        };
        let bytes = Zeroizing::new(message.encode_to_vec());
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(bytes.as_slice()))
    }

    /// The key id.
    pub fn id(&self) -> &str {
        &self.0.id
    }

    /// Creation time, unix milliseconds.
    pub fn created_at(&self) -> i64 {
        self.0.created_at
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kek")
            .field("id", &self.0.id)
            .field("created_at", &self.0.created_at)
            .finish_non_exhaustive()
    }
}

/// The current master key and the previous ones still accepted for opening stored DEKs.
/// New DEKs are always sealed by the current key.
#[derive(Clone)]
pub struct MasterKeys {
    current: Arc<Kek>,
    by_id: HashMap<String, Arc<Kek>>,
}

impl MasterKeys {
    /// The current key and any number of previous ones. Ids must be distinct.
    pub fn new(current: Kek, previous: impl IntoIterator<Item = Kek>) -> Result<Self> {
        let current = Arc::new(current);
        let mut by_id = HashMap::new();
        by_id.insert(current.id().to_owned(), current.clone());
        for kek in previous {
            let id = kek.id().to_owned();
            if by_id.insert(id.clone(), Arc::new(kek)).is_some() {
                return Err(Error::invalid_argument(format!(
                    "master key id {id:?} is configured twice"
                )));
            }
        }
        Ok(Self { current, by_id })
    }

    /// The key that seals new DEKs.
    pub fn current(&self) -> &Kek {
        &self.current
    }

    /// Whether `kek_id` is the current key.
    pub fn is_current(&self, kek_id: &str) -> bool {
        self.current.id() == kek_id
    }

    /// Seals `dek` with the current master key into the stored form.
    pub fn seal_dek(&self, dek: &Dek) -> EncryptedDataEncryptionKey {
        self.seal_dek_with_nonce(dek, aead::random_nonce(), super::now_ms())
    }

    /// Seals `dek` under a given nonce and time. Only for reproducing known vectors: a nonce
    /// must never repeat under one key, which is why [`MasterKeys::seal_dek`] draws a fresh one.
    pub fn seal_dek_with_nonce(
        &self,
        dek: &Dek,
        nonce: [u8; aead::NONCE_LEN],
        time_ms: i64,
    ) -> EncryptedDataEncryptionKey {
        let plaintext = dek.to_protobuf();
        let kek = &self.current;
        EncryptedDataEncryptionKey {
            id: dek.id().to_owned(),
            created_at: dek.created_at(),
            encrypted: Some(aead::seal_with_nonce(
                &kek.0.cipher,
                kek.id(),
                &plaintext,
                nonce,
                time_ms,
            )),
        }
    }

    /// Opens a stored DEK with whichever configured master key sealed it.
    pub fn open_dek(&self, stored: &EncryptedDataEncryptionKey) -> Result<Dek> {
        let encrypted = stored.encrypted.as_ref().ok_or_else(|| {
            Error::internal(format!("stored key {:?} has no encrypted body", stored.id))
        })?;
        let kek = self
            .by_id
            .get(&encrypted.encryption_key_id)
            .ok_or_else(|| {
                Error::internal(format!(
                    "stored key {:?} is sealed by master key {:?}, which is not configured",
                    stored.id, encrypted.encryption_key_id
                ))
            })?;
        let plaintext =
            Zeroizing::new(aead::open(&kek.0.cipher, encrypted.clone()).map_err(|_| {
                Error::internal(format!(
                    "stored key {:?} does not open with master key {:?}",
                    stored.id,
                    kek.id()
                ))
            })?);
        let message = DataEncryptionKey::decode(plaintext.as_slice()).map_err(|error| {
            Error::internal(format!(
                "stored key {:?} is not a DataEncryptionKey: {error}",
                stored.id
            ))
        })?;
        let dek = Dek::from_parts(message.id.clone(), message.created_at, &message.key)
            .map_err(|error| Error::internal(error.message().to_owned()))?;
        if dek.id() != stored.id {
            return Err(Error::internal(format!(
                "stored key {:?} holds key {:?}",
                stored.id,
                dek.id()
            )));
        }
        Ok(dek)
    }
}

impl fmt::Debug for MasterKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<_> = self.by_id.keys().collect();
        ids.sort();
        f.debug_struct("MasterKeys")
            .field("current", &self.current.id())
            .field("known", &ids)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key wrapped as `base64` wraps it (76 columns), with trailing bits Go ignores, parses
    /// as Go's Vault parses it; a wrong character is refused without being quoted.
    #[test]
    fn master_keys_are_read_as_go_reads_them_and_never_quoted() {
        let kek = Kek::generate();
        let text = kek.to_base64().to_string();
        let wrapped: String = text
            .as_bytes()
            .chunks(76)
            .map(|line| format!("{}\n", std::str::from_utf8(line).unwrap()))
            .collect();
        assert!(wrapped.trim_end().contains('\n'), "long enough to wrap");
        assert_eq!(Kek::parse(&wrapped).unwrap().id(), kek.id());
        assert_eq!(
            Kek::parse(&format!("  {}\r\n", text.trim_end_matches('=')))
                .unwrap()
                .id(),
            kek.id()
        );
        let mut broken = text.clone();
        broken.replace_range(10..11, "-");
        let error = Kek::parse(&broken).unwrap_err();
        assert_eq!(error.kind(), crate::Kind::InvalidArgument);
        assert!(!error.message().contains('-'), "{error}");
        assert!(!error.message().contains("offset"), "{error}");
    }

    /// Two keys pasted on two lines would decode as one message in which the second's fields
    /// win: refused, not guessed at.
    #[test]
    fn a_text_of_two_keys_is_refused() {
        use base64::Engine as _;
        let engine = base64::engine::general_purpose::STANDARD;
        let first = engine.decode(Kek::generate().to_base64().as_str()).unwrap();
        let second = engine.decode(Kek::generate().to_base64().as_str()).unwrap();
        let both = [first.as_slice(), second.as_slice()].concat();
        let error = Kek::parse(&engine.encode(&both)).unwrap_err();
        assert!(error.message().contains("more than one key"), "{error}");
    }
}
