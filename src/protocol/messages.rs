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
#[derive(Clone, PartialEq, Default)]
pub struct DataEncryptionKey {
    /// Opaque key id (`dek_…`); field 1.
    pub id: String,
    /// Creation time, unix milliseconds; field 2.
    pub created_at: i64,
    /// 32 key bytes; field 3.
    pub key: Vec<u8>,
}

/// The master key, as configured (base64 of these protobuf bytes).
#[derive(Clone, PartialEq, Default)]
pub struct KeyEncryptionKey {
    /// Opaque key id (`kek_…`); field 1.
    pub id: String,
    /// Creation time, unix milliseconds; field 2.
    pub created_at: i64,
    /// 32 key bytes; field 3.
    pub key: Vec<u8>,
}

// Plaintext key messages wipe their key bytes when dropped and print no key bytes, so that a
// temporary made while sealing or opening never leaves key material behind. Their protobuf
// code is written here rather than derived because prost's `bytes` decode passes the key
// through a temporary buffer that it frees without wiping ([`merge_key`]); the bytes are what
// prost writes and reads (tested against a derived twin).
macro_rules! plaintext_key_message {
    ($name:ident) => {
        impl prost::Message for $name {
            fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
                use prost::encoding::{bytes as bytes_field, int64, string};
                if !self.id.is_empty() {
                    string::encode(1, &self.id, buf);
                }
                if self.created_at != 0 {
                    int64::encode(2, &self.created_at, buf);
                }
                if !self.key.is_empty() {
                    bytes_field::encode(3, &self.key, buf);
                }
            }

            fn merge_field(
                &mut self,
                tag: u32,
                wire_type: prost::encoding::WireType,
                buf: &mut impl bytes::Buf,
                ctx: prost::encoding::DecodeContext,
            ) -> Result<(), prost::DecodeError> {
                use prost::encoding::{int64, skip_field, string};
                match tag {
                    1 => string::merge(wire_type, &mut self.id, buf, ctx),
                    2 => int64::merge(wire_type, &mut self.created_at, buf, ctx),
                    3 => merge_key(wire_type, &mut self.key, buf, ctx),
                    _ => skip_field(wire_type, tag, buf, ctx),
                }
            }

            fn encoded_len(&self) -> usize {
                use prost::encoding::{bytes as bytes_field, int64, string};
                let mut len = 0;
                if !self.id.is_empty() {
                    len += string::encoded_len(1, &self.id);
                }
                if self.created_at != 0 {
                    len += int64::encoded_len(2, &self.created_at);
                }
                if !self.key.is_empty() {
                    len += bytes_field::encoded_len(3, &self.key);
                }
                len
            }

            fn clear(&mut self) {
                self.id.clear();
                self.created_at = 0;
                zeroize::Zeroize::zeroize(&mut self.key);
            }
        }

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

/// Reads a key field (`bytes`, last one wins) straight from the input into a buffer of its own
/// size, wiping the value it replaces. prost's `bytes` merge copies the field into a temporary
/// first and frees it unwiped. An input in pieces (no caller of ours has one) or a short one
/// goes to prost, for its copy or its error.
fn merge_key(
    wire_type: prost::encoding::WireType,
    key: &mut Vec<u8>,
    buf: &mut impl bytes::Buf,
    ctx: prost::encoding::DecodeContext,
) -> Result<(), prost::DecodeError> {
    prost::encoding::check_wire_type(prost::encoding::WireType::LengthDelimited, wire_type)?;
    let chunk = buf.chunk();
    let mut after_len = chunk;
    let contiguous = chunk.len() == buf.remaining();
    let value = if contiguous {
        let len = prost::encoding::decode_varint(&mut after_len)?;
        usize::try_from(len)
            .ok()
            .and_then(|len| after_len.get(..len))
    } else {
        None
    };
    let Some(value) = value else {
        let mut elsewhere = zeroize::Zeroizing::new(Vec::new());
        prost::encoding::bytes::merge(wire_type, &mut *elsewhere, buf, ctx)?;
        zeroize::Zeroize::zeroize(key);
        *key = std::mem::take(&mut *elsewhere);
        return Ok(());
    };
    let fresh = value.to_vec();
    let consumed = chunk.len() - after_len.len() + value.len();
    buf.advance(consumed);
    zeroize::Zeroize::zeroize(key);
    *key = fresh;
    Ok(())
}

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
    /// Creation time, unix milliseconds. A string in JSON, as protobuf JSON writes an int64.
    #[prost(int64, tag = "2")]
    #[serde(
        alias = "created_at",
        with = "int64_json",
        skip_serializing_if = "is_zero_i64"
    )]
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
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub count: u32,
}

fn is_zero_i64(value: &i64) -> bool {
    *value == 0
}

fn is_zero_u32(value: &u32) -> bool {
    *value == 0
}

/// An `int64` as protobuf JSON has it: written as a decimal string (a JSON number loses
/// precision past 2^53 in JavaScript), read from a string or a number.
mod int64_json {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &i64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Int64 {
            Number(i64),
            Text(String),
        }
        match Int64::deserialize(deserializer)? {
            Int64::Number(value) => Ok(value),
            Int64::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use prost::Message as _;

    use super::{DataEncryptionKey, DescribeKeyringResponse, KeyEncryptionKey, KeyInfo};

    /// DescribeKeyring in JSON as protobuf JSON has it: `createdAt` (an int64) a string, read
    /// back from a string or a number; zero values left out.
    #[test]
    fn describe_json_writes_int64_as_a_string() {
        let reply = DescribeKeyringResponse {
            keyring: "ws_1".into(),
            latest_key_id: "dek_2".into(),
            keys: vec![KeyInfo {
                key_id: "dek_2".into(),
                created_at: 1_700_000_000_123,
            }],
            count: 1,
        };
        let json = serde_json::to_value(&reply).unwrap();
        assert_eq!(json["keys"][0]["createdAt"], "1700000000123");
        assert_eq!(json["count"], 1);
        let back: DescribeKeyringResponse = serde_json::from_value(json).unwrap();
        assert_eq!(back, reply);
        let number: KeyInfo =
            serde_json::from_str(r#"{"keyId":"dek_2","createdAt":1700000000123}"#).unwrap();
        assert_eq!(number.created_at, 1_700_000_000_123);
        let empty = serde_json::to_value(DescribeKeyringResponse::default()).unwrap();
        assert_eq!(empty, serde_json::json!({}));
    }

    /// What prost derives for the key messages: the reference for the hand-written code.
    #[derive(Clone, PartialEq, prost::Message)]
    struct DerivedKeyMessage {
        #[prost(string, tag = "1")]
        id: String,
        #[prost(int64, tag = "2")]
        created_at: i64,
        #[prost(bytes = "vec", tag = "3")]
        key: Vec<u8>,
    }

    fn fields_of_dek(message: &DataEncryptionKey) -> (String, i64, Vec<u8>) {
        (message.id.clone(), message.created_at, message.key.clone())
    }

    fn fields_of_kek(message: &KeyEncryptionKey) -> (String, i64, Vec<u8>) {
        (message.id.clone(), message.created_at, message.key.clone())
    }

    fn fields_of_derived(message: &DerivedKeyMessage) -> (String, i64, Vec<u8>) {
        (message.id.clone(), message.created_at, message.key.clone())
    }

    proptest! {
        #[test]
        fn key_messages_encode_as_prost_derives(
            id in ".{0,40}",
            created_at in any::<i64>(),
            key in prop::collection::vec(any::<u8>(), 0..80),
        ) {
            let derived = DerivedKeyMessage { id: id.clone(), created_at, key: key.clone() };
            let dek = DataEncryptionKey { id: id.clone(), created_at, key: key.clone() };
            let kek = KeyEncryptionKey { id, created_at, key };
            prop_assert_eq!(dek.encode_to_vec(), derived.encode_to_vec());
            prop_assert_eq!(kek.encode_to_vec(), derived.encode_to_vec());
            prop_assert_eq!(dek.encoded_len(), derived.encoded_len());
        }

        #[test]
        fn key_messages_decode_as_prost_derives(
            bytes in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..120),
                // Well-formed messages, with repeated and unknown fields appended.
                (".{0,20}", any::<i64>(), prop::collection::vec(any::<u8>(), 0..40),
                 prop::collection::vec(any::<u8>(), 0..40))
                    .prop_map(|(id, created_at, key, tail)| {
                        let mut bytes = DerivedKeyMessage { id, created_at, key }.encode_to_vec();
                        bytes.extend_from_slice(&tail);
                        bytes
                    }),
            ],
        ) {
            let derived = DerivedKeyMessage::decode(bytes.as_slice());
            let dek = DataEncryptionKey::decode(bytes.as_slice());
            let kek = KeyEncryptionKey::decode(bytes.as_slice());
            match &derived {
                Ok(derived) => {
                    prop_assert_eq!(fields_of_dek(dek.as_ref().unwrap()), fields_of_derived(derived));
                    prop_assert_eq!(fields_of_kek(kek.as_ref().unwrap()), fields_of_derived(derived));
                }
                Err(_) => {
                    prop_assert!(dek.is_err());
                    prop_assert!(kek.is_err());
                }
            }
        }
    }

    #[test]
    fn a_repeated_key_field_keeps_the_last_value() {
        let mut bytes = DerivedKeyMessage {
            id: "dek_1".into(),
            created_at: 5,
            key: vec![1; 32],
        }
        .encode_to_vec();
        bytes.extend(
            DerivedKeyMessage {
                key: vec![2; 32],
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let dek = DataEncryptionKey::decode(bytes.as_slice()).unwrap();
        assert_eq!(dek.key, vec![2; 32]);
        assert_eq!(dek.id, "dek_1");
        // A length past the end is prost's error, not a panic.
        assert!(DataEncryptionKey::decode(&[0x1a, 0x40, 1, 2][..]).is_err());
    }
}
