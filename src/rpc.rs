//! What each RPC does, on decoded requests and a verified [`Principal`]; no NATS here.
//! Every handler asks the principal for the operation's permission before touching a keyring.

use std::collections::HashMap;

use crate::actors::KeyringRegistry;
use crate::auth::{Action, Principal};
use crate::crypto::validate_envelope;
use crate::error::{Error, Kind, Result};
use crate::protocol::{
    decode_envelope, envelope_text, envelope_text_len, DecryptBulkRequest, DecryptBulkResponse,
    DecryptRequest, DecryptResponse, DescribeKeyringRequest, DescribeKeyringResponse,
    EncryptBulkRequest, EncryptBulkResponse, EncryptBulkResponseItem, EncryptRequest, KeyInfo,
    ReEncryptRequest, ReEncryptResponse, RotateKeyringRequest, RotateKeyringResponse,
};
use crate::storage::validate_keyring;

/// A Decrypt's response and the key that opened it (for the audit record).
#[derive(Debug)]
pub struct Decrypted {
    /// The reply.
    pub response: DecryptResponse,
    /// The envelope's key id.
    pub key_id: String,
}

/// An Encrypt's result before encoding: the envelope as protobuf bytes, so the reply can write
/// its base64 straight into the body ([`crate::protocol::encode_encrypt_response`]).
#[derive(Debug)]
pub struct Sealed {
    /// The protobuf bytes of the [`crate::protocol::Encrypted`].
    pub envelope: Vec<u8>,
    /// The DEK that sealed it.
    pub key_id: String,
}

/// What an envelope holds besides the plaintext and the key id, at least: the nonce and the
/// tag.
const MIN_ENVELOPE_OVERHEAD: usize = 12 + 16;
/// The protobuf framing of one bulk reply item, at least: the map entry, its key and its value
/// (a tag and a length each), and the item's two fields.
const MIN_BULK_ITEM_FRAMING: usize = 10;

/// What the EncryptBulk reply to `items` sealed by a key with an id of `key_id_len` bytes
/// takes at least, in either format: each item's id, envelope (base64 of the plaintext, nonce,
/// tag and key id) and key id, and the least framing around them.
fn bulk_reply_lower_bound(items: &HashMap<String, String>, key_id_len: usize) -> usize {
    items
        .iter()
        .map(|(id, data)| {
            id.len()
                + envelope_text_len(data.len() + MIN_ENVELOPE_OVERHEAD + key_id_len)
                + key_id_len
                + MIN_BULK_ITEM_FRAMING
        })
        .sum()
}

/// The operations of the API.
#[derive(Debug, Clone)]
pub struct Vault {
    registry: KeyringRegistry,
    max_plaintext_bytes: usize,
    max_reply_bytes: Option<usize>,
}

impl Vault {
    /// Operations over `registry`, refusing plaintexts larger than `max_plaintext_bytes`.
    pub fn new(registry: KeyringRegistry, max_plaintext_bytes: usize) -> Self {
        Self {
            registry,
            max_plaintext_bytes,
            max_reply_bytes: None,
        }
    }

    /// Refuses, before its items are sealed, a bulk call whose reply could not be larger than
    /// `max_reply_bytes` (the nats-server's `max_payload`) and still hold what was asked.
    pub fn with_max_reply_bytes(mut self, max_reply_bytes: usize) -> Self {
        self.max_reply_bytes = Some(max_reply_bytes);
        self
    }

    /// The largest plaintext accepted.
    pub fn max_plaintext_bytes(&self) -> usize {
        self.max_plaintext_bytes
    }

    /// The keyring registry.
    pub fn registry(&self) -> &KeyringRegistry {
        &self.registry
    }

    /// Encrypt: seal `data` with the keyring's current DEK.
    pub async fn encrypt(&self, principal: &Principal, request: EncryptRequest) -> Result<Sealed> {
        self.encrypt_text(principal, &request.keyring, &request.data)
            .await
    }

    /// [`Vault::encrypt`] of a request's fields borrowed from where they lie.
    pub async fn encrypt_text(
        &self,
        principal: &Principal,
        keyring: &str,
        data: &str,
    ) -> Result<Sealed> {
        authorize(principal, Action::Encrypt, keyring)?;
        self.check_size(data.len())?;
        let dek = self.registry.latest(keyring).await?;
        Ok(Sealed {
            envelope: dek.seal_envelope(data.as_bytes()),
            key_id: dek.id().to_owned(),
        })
    }

    /// Decrypt: open an envelope of the keyring.
    pub async fn decrypt(
        &self,
        principal: &Principal,
        request: DecryptRequest,
    ) -> Result<Decrypted> {
        self.decrypt_text(principal, &request.keyring, &request.encrypted)
            .await
    }

    /// [`Vault::decrypt`] of a request's fields borrowed from where they lie.
    pub async fn decrypt_text(
        &self,
        principal: &Principal,
        keyring: &str,
        encrypted: &str,
    ) -> Result<Decrypted> {
        authorize(principal, Action::Decrypt, keyring)?;
        let (plaintext, key_id) = self.open(keyring, encrypted).await?;
        Ok(Decrypted {
            response: DecryptResponse { plaintext },
            key_id,
        })
    }

    /// ReEncrypt: open, then seal with the keyring's current DEK as storage has it now.
    pub async fn reencrypt(
        &self,
        principal: &Principal,
        request: ReEncryptRequest,
    ) -> Result<ReEncryptResponse> {
        authorize(principal, Action::ReEncrypt, &request.keyring)?;
        let (plaintext, _) = self.open(&request.keyring, &request.encrypted).await?;
        let dek = self.registry.latest_from_storage(&request.keyring).await?;
        let encrypted = envelope_text(&dek.seal_envelope(plaintext.as_bytes()));
        Ok(ReEncryptResponse {
            encrypted,
            key_id: dek.id().to_owned(),
        })
    }

    /// EncryptBulk: every item or none; an error names the failing item.
    pub async fn encrypt_bulk(
        &self,
        principal: &Principal,
        request: EncryptBulkRequest,
    ) -> Result<EncryptBulkResponse> {
        authorize(principal, Action::Encrypt, &request.keyring)?;
        let total: usize = request.items.values().map(String::len).sum();
        self.check_size(total)
            .map_err(|error| error.context("bulk items together"))?;
        let dek = self.registry.latest(&request.keyring).await?;
        self.check_bulk_reply(&request.items, dek.id().len())?;
        let mut items = HashMap::with_capacity(request.items.len());
        for (index, (id, data)) in request.items.into_iter().enumerate() {
            yield_between_items(index).await;
            let encrypted = envelope_text(&dek.seal_envelope(data.as_bytes()));
            items.insert(
                id,
                EncryptBulkResponseItem {
                    encrypted,
                    key_id: dek.id().to_owned(),
                },
            );
        }
        Ok(EncryptBulkResponse { items })
    }

    /// DecryptBulk: every item or none; an error names the failing item.
    pub async fn decrypt_bulk(
        &self,
        principal: &Principal,
        request: DecryptBulkRequest,
    ) -> Result<DecryptBulkResponse> {
        authorize(principal, Action::Decrypt, &request.keyring)?;
        let mut ids: Vec<&String> = request.items.keys().collect();
        ids.sort_unstable();
        let mut items = HashMap::with_capacity(ids.len());
        for (index, id) in ids.into_iter().enumerate() {
            yield_between_items(index).await;
            let (plaintext, _) = self
                .open(&request.keyring, &request.items[id])
                .await
                .map_err(|error| error.context(format!("item {id:?}")))?;
            items.insert(id.clone(), plaintext);
        }
        Ok(DecryptBulkResponse { items })
    }

    /// RotateKeyring: a new DEK becomes LATEST.
    pub async fn rotate(
        &self,
        principal: &Principal,
        request: RotateKeyringRequest,
    ) -> Result<RotateKeyringResponse> {
        authorize(principal, Action::Rotate, &request.keyring)?;
        let rotation = self.registry.rotate(&request.keyring).await?;
        Ok(RotateKeyringResponse {
            key_id: rotation.dek.id().to_owned(),
            previous_key_id: rotation.previous_key_id.unwrap_or_default(),
        })
    }

    /// DescribeKeyring: key ids with creation times and which one is LATEST; never key
    /// material. A key-management call, so it needs `rotate`.
    pub async fn describe(
        &self,
        principal: &Principal,
        request: DescribeKeyringRequest,
    ) -> Result<DescribeKeyringResponse> {
        authorize(principal, Action::Rotate, &request.keyring)?;
        let (keys, latest) = self
            .registry
            .keyrings()
            .store()
            .describe(&request.keyring)
            .await?;
        Ok(DescribeKeyringResponse {
            keyring: request.keyring,
            latest_key_id: latest.unwrap_or_default(),
            count: u32::try_from(keys.len()).unwrap_or(u32::MAX),
            keys: keys
                .into_iter()
                .map(|(key_id, created_at)| KeyInfo { key_id, created_at })
                .collect(),
        })
    }

    /// Many small items pass the plaintext limit and still make a reply that cannot be sent
    /// (each item's envelope is ~130 bytes): such a call is refused before its items are sealed,
    /// by a lower bound of its reply's size.
    fn check_bulk_reply(&self, items: &HashMap<String, String>, key_id_len: usize) -> Result<()> {
        let Some(max_reply_bytes) = self.max_reply_bytes else {
            return Ok(());
        };
        let at_least = bulk_reply_lower_bound(items, key_id_len);
        if at_least > max_reply_bytes {
            return Err(Error::new(
                Kind::PayloadTooLarge,
                format!(
                    "the reply to {} items would be at least {at_least} bytes, more than the \
                     nats server's max_payload of {max_reply_bytes}; send fewer items per request",
                    items.len()
                ),
            ));
        }
        Ok(())
    }

    fn check_size(&self, len: usize) -> Result<()> {
        if len > self.max_plaintext_bytes {
            return Err(Error::new(
                Kind::PayloadTooLarge,
                format!(
                    "plaintext is {len} bytes, at most {} are accepted",
                    self.max_plaintext_bytes
                ),
            ));
        }
        Ok(())
    }

    /// The plaintext of an envelope of `keyring`, and the id of the key that opened it.
    async fn open(&self, keyring: &str, encrypted: &str) -> Result<(String, String)> {
        let envelope = decode_envelope(encrypted)?;
        validate_envelope(&envelope)?;
        let dek = self
            .registry
            .dek(keyring, &envelope.encryption_key_id)
            .await?;
        let key_id = envelope.encryption_key_id.clone();
        let plaintext = dek.open(envelope)?;
        // Encrypt takes only text, so this envelope was sealed elsewhere; a reply's string
        // field cannot carry it.
        let plaintext = String::from_utf8(plaintext).map_err(|_| {
            Error::invalid_argument(
                "the envelope opens, but its plaintext is not utf-8 text, which decrypt cannot return",
            )
        })?;
        Ok((plaintext, key_id))
    }
}

/// Lets the other requests of the subscription task run between every [`ITEMS_PER_POLL`]
/// items of a bulk call: thousands of small items would otherwise hold the task (and the
/// runtime thread) for milliseconds in one poll.
async fn yield_between_items(index: usize) {
    if index > 0 && index.is_multiple_of(ITEMS_PER_POLL) {
        tokio::task::yield_now().await;
    }
}

/// Bulk items handled in one poll (~64 µs of sealing at small sizes).
const ITEMS_PER_POLL: usize = 64;

/// Validates the keyring name, then asks the principal.
fn authorize(principal: &Principal, action: Action, keyring: &str) -> Result<()> {
    validate_keyring(keyring)?;
    principal.authorize(action, keyring)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::crypto::Dek;
    use crate::protocol::{encode, Format};

    proptest! {
        /// The bound must never refuse a call whose reply fits: it stays at or below the reply
        /// as actually encoded, in both formats, for empty and odd ids and data alike.
        #[test]
        fn the_bulk_reply_bound_never_exceeds_the_reply(
            items in proptest::collection::hash_map(".{0,12}", ".{0,40}", 0..24),
            key_id_len in 4usize..40,
        ) {
            let dek = Dek::from_parts(format!("dek_{}", "k".repeat(key_id_len - 4)), 1, &[3; 32])
                .unwrap();
            let reply = EncryptBulkResponse {
                items: items
                    .iter()
                    .map(|(id, data)| {
                        let item = EncryptBulkResponseItem {
                            encrypted: envelope_text(&dek.seal_envelope(data.as_bytes())),
                            key_id: dek.id().to_owned(),
                        };
                        (id.clone(), item)
                    })
                    .collect(),
            };
            let bound = bulk_reply_lower_bound(&items, key_id_len);
            for format in [Format::Protobuf, Format::Json] {
                let encoded = encode(format, &reply).len();
                prop_assert!(bound <= encoded, "{format:?}: bound {bound} > reply {encoded}");
            }
        }
    }
}
