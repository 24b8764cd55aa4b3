//! Keys and the AEAD, with no I/O: AES-256-GCM seal/open of envelopes, the [`Kek`] and [`Dek`]
//! types (zeroized on drop, never printed), the [`MasterKeys`] that seal DEKs for storage, and
//! random key ids.

mod aead;
mod ids;
mod keys;

pub use aead::{
    open, random_nonce, seal, seal_envelope, seal_envelope_with_nonce, seal_with_nonce,
    validate_envelope, Cipher, NONCE_LEN, TAG_LEN,
};
pub use ids::{new_dek_id, new_kek_id};
pub use keys::{Dek, Kek, MasterKeys, KEY_LEN};

/// The current time in unix milliseconds, as stored in `created_at` and `time`.
pub fn now_ms() -> i64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}
