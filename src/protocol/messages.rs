//! The `vault.v1` messages with the exact field numbers of spec/vault-v1.md.
//!
//! Storage and envelope messages (`object.proto`) are protobuf only. Service messages
//! (`service.proto`) also speak protobuf's canonical JSON: lowerCamelCase out, both spellings
//! in, unknown fields ignored, empty fields omitted.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// The AEAD of an [`Encrypted`]; 0 is AES-256-GCM and is absent on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Algorithm {
    /// AES-256-GCM with a 12-byte nonce and a 16-byte tag.
    Aes256Gcm = 0,
}

/// A data encryption key in plaintext. Only ever built in memory, to be sealed or after opening;
/// [`crate::crypto::Dek`] is the type the rest of ringvault holds.
#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct DataEncryptionKey {
    /// Opaque key id (`dek_…`).
    #[prost(string, tag = "1")]
    pub id: String,
    /// Creation time, unix milliseconds.
    #[prost(int64, tag = "2")]
    pub created_at: i64,
    /// 32 key bytes.
    #[prost(bytes = "vec", tag = "3")]
    pub key: Vec<u8>,
}

/// The master key, as configured (base64 of these protobuf bytes).
#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct KeyEncryptionKey {
    /// Opaque key id (`kek_…`).
    #[prost(string, tag = "1")]
    pub id: String,
    /// Creation time, unix milliseconds.
    #[prost(int64, tag = "2")]
    pub created_at: i64,
    /// 32 key bytes.
    #[prost(bytes = "vec", tag = "3")]
    pub key: Vec<u8>,
}

// Plaintext key messages wipe their key bytes when dropped and print no key bytes, so that a
// temporary made while sealing or opening never leaves key material behind.
macro_rules! plaintext_key_message {
    ($name:ident) => {
        impl Drop for $name {
            fn drop(&mut self) {
                zeroize::Zeroize::zeroize(&mut self.key);
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("id", &self.id)
                    .field("created_at", &self.created_at)
                    .finish_non_exhaustive()
            }
        }
    };
}

plaintext_key_message!(DataEncryptionKey);
plaintext_key_message!(KeyEncryptionKey);

/// A DEK sealed by a KEK: the stored object at `keyring/<ring>/<id>` and `LATEST`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EncryptedDataEncryptionKey {
    /// The DEK's id.
    #[prost(string, tag = "1")]
    pub id: String,
    /// The DEK's creation time, unix milliseconds.
    #[prost(int64, tag = "2")]
    pub created_at: i64,
    /// The protobuf bytes of the [`DataEncryptionKey`], sealed by the KEK.
    #[prost(message, optional, tag = "3")]
    pub encrypted: Option<Encrypted>,
}

/// One sealed payload: the envelope callers keep (as base64) and the body of a stored DEK.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Encrypted {
    /// Always [`Algorithm::Aes256Gcm`] today.
    #[prost(enumeration = "Algorithm", tag = "1")]
    pub algorithm: i32,
    /// 12 random bytes.
    #[prost(bytes = "vec", tag = "2")]
    pub nonce: Vec<u8>,
    /// GCM output followed by the 16-byte tag.
    #[prost(bytes = "vec", tag = "3")]
    pub ciphertext: Vec<u8>,
    /// Id of the key that sealed it (a DEK for payloads, a KEK for stored DEKs).
    #[prost(string, tag = "4")]
    pub encryption_key_id: String,
    /// Sealing time, unix milliseconds.
    #[prost(int64, tag = "5")]
    pub time: i64,
}

/// `Liveness` request (no fields).
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
pub struct LivenessRequest {}

/// `Liveness` reply.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LivenessResponse {
    /// `"ok"`.
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub status: String,
}

/// `Encrypt` request.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EncryptRequest {
    /// The keyring whose current DEK seals the data.
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub keyring: String,
    /// The plaintext.
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub data: String,
}

/// `Encrypt` reply.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EncryptResponse {
    /// Base64 of the protobuf [`Encrypted`].
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub encrypted: String,
    /// The DEK that sealed it.
    #[prost(string, tag = "2")]
    #[serde(alias = "key_id", skip_serializing_if = "String::is_empty")]
    pub key_id: String,
}

/// `Decrypt` request.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DecryptRequest {
    /// The keyring the ciphertext belongs to.
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub keyring: String,
    /// Base64 of the protobuf [`Encrypted`].
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub encrypted: String,
}

/// `Decrypt` reply.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DecryptResponse {
    /// The plaintext.
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub plaintext: String,
}

/// `ReEncrypt` request: decrypt, then encrypt with the keyring's current DEK.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ReEncryptRequest {
    /// The keyring.
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub keyring: String,
    /// Base64 of the protobuf [`Encrypted`].
    #[prost(string, tag = "2")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub encrypted: String,
    /// Accepted for compatibility; the current DEK is always used.
    #[prost(string, optional, tag = "3")]
    #[serde(alias = "key_id", skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

/// `ReEncrypt` reply.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ReEncryptResponse {
    /// Base64 of the new protobuf [`Encrypted`].
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub encrypted: String,
    /// The DEK that sealed it.
    #[prost(string, tag = "2")]
    #[serde(alias = "key_id", skip_serializing_if = "String::is_empty")]
    pub key_id: String,
}

/// `EncryptBulk` request: caller id → plaintext.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EncryptBulkRequest {
    /// The keyring.
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub keyring: String,
    /// Caller id → plaintext.
    #[prost(map = "string, string", tag = "2")]
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    pub items: HashMap<String, String>,
}

/// One item of an [`EncryptBulkResponse`].
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EncryptBulkResponseItem {
    /// Base64 of the protobuf [`Encrypted`].
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub encrypted: String,
    /// The DEK that sealed it.
    #[prost(string, tag = "2")]
    #[serde(alias = "key_id", skip_serializing_if = "String::is_empty")]
    pub key_id: String,
}

/// `EncryptBulk` reply: caller id → item.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EncryptBulkResponse {
    /// Caller id → item.
    #[prost(map = "string, message", tag = "1")]
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    pub items: HashMap<String, EncryptBulkResponseItem>,
}

/// `DecryptBulk` request: caller id → base64 envelope.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DecryptBulkRequest {
    /// The keyring.
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub keyring: String,
    /// Caller id → base64 envelope.
    #[prost(map = "string, string", tag = "2")]
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    pub items: HashMap<String, String>,
}

/// `DecryptBulk` reply: caller id → plaintext.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DecryptBulkResponse {
    /// Caller id → plaintext.
    #[prost(map = "string, string", tag = "1")]
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    pub items: HashMap<String, String>,
}

/// `RotateKeyring` request (ringvault's addition): a new DEK becomes LATEST.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RotateKeyringRequest {
    /// The keyring.
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub keyring: String,
}

/// `RotateKeyring` reply.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RotateKeyringResponse {
    /// The new DEK's id.
    #[prost(string, tag = "1")]
    #[serde(alias = "key_id", skip_serializing_if = "String::is_empty")]
    pub key_id: String,
    /// The DEK it replaced as LATEST (empty on first use).
    #[prost(string, tag = "2")]
    #[serde(alias = "previous_key_id", skip_serializing_if = "String::is_empty")]
    pub previous_key_id: String,
}

/// `DescribeKeyring` request (ringvault's addition).
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DescribeKeyringRequest {
    /// The keyring.
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub keyring: String,
}

/// One key of a [`DescribeKeyringResponse`]: metadata only, never key material.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct KeyInfo {
    /// The key id.
    #[prost(string, tag = "1")]
    #[serde(alias = "key_id", skip_serializing_if = "String::is_empty")]
    pub key_id: String,
    /// Creation time, unix milliseconds.
    #[prost(int64, tag = "2")]
    #[serde(alias = "created_at")]
    pub created_at: i64,
}

/// `DescribeKeyring` reply.
#[derive(Clone, PartialEq, prost::Message, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DescribeKeyringResponse {
    /// The keyring.
    #[prost(string, tag = "1")]
    #[serde(skip_serializing_if = "String::is_empty")]
    pub keyring: String,
    /// The id of LATEST (empty for a keyring never used).
    #[prost(string, tag = "2")]
    #[serde(alias = "latest_key_id", skip_serializing_if = "String::is_empty")]
    pub latest_key_id: String,
    /// Every key of the keyring, oldest first.
    #[prost(message, repeated, tag = "3")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<KeyInfo>,
    /// How many keys.
    #[prost(uint32, tag = "4")]
    pub count: u32,
}
