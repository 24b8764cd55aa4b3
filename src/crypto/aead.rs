//! AES-256-GCM over [`Encrypted`]: a fresh random 12-byte nonce per message, no associated data,
//! the 16-byte tag appended to the ciphertext.
//!
//! The implementation is ring's AES-GCM, chosen for speed: on the benchmark machine (AMD Zen 3)
//! it has a VAES/AVX2 code path that seals 64 KiB in ~12-16 µs where AWS-LC's AVX code took
//! ~22-26 µs, and the Encrypt 64 KiB benchmark was short of its goal by about that much (see
//! BENCHMARKS.md). ring keeps the expanded key (AES round keys, GHASH key) inside the key value
//! and offers no way to clear it, so [`Cipher`] holds that value in a box of its own, where it
//! stays from construction to drop, and overwrites it there with the all-zero key's schedule
//! when dropped (`Cipher::wipe`). As with every Rust value, including the [`Zeroizing`] key
//! bytes, copies made on the stack while the key was being built are not cleared; AWS-LC, which
//! ringvault used before, builds its schedule on the heap and so leaves none. Nonces come from
//! the thread-local CSPRNG ([`random_nonce`]).
//!
//! [`Zeroizing`]: zeroize::Zeroizing

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use crate::error::{Error, Result};
use crate::protocol::{Algorithm, Encrypted};

/// Length of the GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Length of the GCM tag.
pub const TAG_LEN: usize = 16;

/// An AES-256-GCM key ready to seal and open; its expanded key is overwritten when dropped.
pub struct Cipher(Box<LessSafeKey>);

impl Cipher {
    /// A cipher for a 32-byte key.
    pub fn new(key: &[u8; 32]) -> Self {
        Self(Box::new(expanded_key(key)))
    }

    /// Replaces the expanded key, in its box, with that of the all-zero key: an assignment
    /// writes the new value over the old one's place, and ring picks the same code path (and
    /// so the same layout) for every key in a process. `black_box` keeps the store from being
    /// removed as dead before the box is freed (best effort, as its documentation says: ring's
    /// key does not implement `Zeroize`, and reaching its bytes otherwise needs `unsafe`, which
    /// this crate forbids).
    fn wipe(&mut self) {
        *self.0 = expanded_key(&[0; 32]);
        std::hint::black_box(&*self.0);
    }
}

impl Drop for Cipher {
    fn drop(&mut self) {
        self.wipe();
    }
}

fn expanded_key(key: &[u8; 32]) -> LessSafeKey {
    let key = UnboundKey::new(&AES_256_GCM, key).expect("aes-256-gcm accepts a 32-byte key");
    LessSafeKey::new(key)
}

/// A fresh random nonce, from the thread's CSPRNG (ChaCha12 seeded from the OS, reseeded
/// periodically and after a fork): no system call and no lock per seal.
pub fn random_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut nonce);
    nonce
}

/// Seals `plaintext` with `cipher` under a fresh random nonce.
pub fn seal(cipher: &Cipher, key_id: &str, plaintext: &[u8], time_ms: i64) -> Encrypted {
    seal_with_nonce(cipher, key_id, plaintext, random_nonce(), time_ms)
}

/// Seals `plaintext` under the given nonce. Only for reproducing known vectors: a nonce must
/// never be used twice with one key, which is why [`seal`] draws a fresh one.
pub fn seal_with_nonce(
    cipher: &Cipher,
    key_id: &str,
    plaintext: &[u8],
    nonce: [u8; NONCE_LEN],
    time_ms: i64,
) -> Encrypted {
    let mut buffer = Vec::with_capacity(plaintext.len() + TAG_LEN);
    crate::buffer::extend_from_slice(&mut buffer, plaintext);
    // Sealing only fails beyond GCM's 64 GiB message limit, impossible with payloads bounded
    // by the NATS max_payload.
    cipher
        .0
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::empty(),
            &mut buffer,
        )
        .expect("aes-256-gcm sealing of a bounded payload cannot fail");
    Encrypted {
        algorithm: Algorithm::Aes256Gcm as i32,
        nonce: nonce.to_vec(),
        ciphertext: buffer,
        encryption_key_id: key_id.to_owned(),
        time: time_ms,
    }
}

/// Seals `plaintext` straight into the protobuf bytes of its [`Encrypted`] envelope: the
/// plaintext is copied once, into the ciphertext field, and encrypted there. The bytes are the
/// ones prost writes for the same message (field order, defaults omitted), so stored and wire
/// forms do not depend on which way a payload was sealed.
pub fn seal_envelope(cipher: &Cipher, key_id: &str, plaintext: &[u8], time_ms: i64) -> Vec<u8> {
    seal_envelope_with_nonce(cipher, key_id, plaintext, random_nonce(), time_ms)
}

/// [`seal_envelope`] under the given nonce, for the same reason as [`seal_with_nonce`].
pub fn seal_envelope_with_nonce(
    cipher: &Cipher,
    key_id: &str,
    plaintext: &[u8],
    nonce: [u8; NONCE_LEN],
    time_ms: i64,
) -> Vec<u8> {
    use crate::protocol::fields;

    let ciphertext_len = plaintext.len() + TAG_LEN;
    let capacity = fields::length_delimited_len(2, NONCE_LEN)
        + fields::length_delimited_len(3, ciphertext_len)
        + fields::length_delimited_len(4, key_id.len())
        + fields::int64_len(5, time_ms);
    let mut out = Vec::with_capacity(capacity);
    // Field 1, the algorithm, is AES-256-GCM = 0: absent, as proto3 leaves defaults out.
    fields::put_bytes_field(2, &nonce, &mut out);
    fields::put_length_delimited_header(3, ciphertext_len, &mut out);
    let plaintext_start = out.len();
    crate::buffer::extend_from_slice(&mut out, plaintext);
    let tag = cipher
        .0
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::empty(),
            &mut out[plaintext_start..],
        )
        .expect("aes-256-gcm sealing of a bounded payload cannot fail");
    out.extend_from_slice(tag.as_ref());
    fields::put_bytes_field(4, key_id.as_bytes(), &mut out);
    fields::put_int64_field(5, time_ms, &mut out);
    out
}

/// Checks the shape of an envelope before any key lookup; each defect has its own message.
pub fn validate_envelope(encrypted: &Encrypted) -> Result<()> {
    if encrypted.algorithm != Algorithm::Aes256Gcm as i32 {
        return Err(Error::invalid_argument(format!(
            "unsupported algorithm {}",
            encrypted.algorithm
        )));
    }
    if encrypted.nonce.len() != NONCE_LEN {
        return Err(Error::invalid_argument(format!(
            "nonce must be {NONCE_LEN} bytes, got {}",
            encrypted.nonce.len()
        )));
    }
    if encrypted.ciphertext.len() < TAG_LEN {
        return Err(Error::invalid_argument(format!(
            "ciphertext must be at least {TAG_LEN} bytes, got {}",
            encrypted.ciphertext.len()
        )));
    }
    if encrypted.encryption_key_id.is_empty() {
        return Err(Error::invalid_argument("encryption key id is empty"));
    }
    Ok(())
}

/// Opens an envelope with `cipher`, decrypting its ciphertext buffer in place (no copy).
/// Any change to nonce, ciphertext or tag fails authentication; the caller has already
/// matched the key id.
pub fn open(cipher: &Cipher, encrypted: Encrypted) -> Result<Vec<u8>> {
    validate_envelope(&encrypted)?;
    let Encrypted {
        nonce,
        ciphertext: mut buffer,
        encryption_key_id,
        ..
    } = encrypted;
    let nonce = Nonce::try_assume_unique_for_key(&nonce)
        .map_err(|_| Error::invalid_argument(format!("nonce must be {NONCE_LEN} bytes")))?;
    let plaintext_len = cipher
        .0
        .open_in_place(nonce, Aad::empty(), &mut buffer)
        .map_err(|_| {
            Error::invalid_argument(format!(
                "decryption failed with key {encryption_key_id:?}: the ciphertext was altered or belongs to another keyring"
            ))
        })?
        .len();
    buffer.truncate(plaintext_len);
    Ok(buffer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher() -> Cipher {
        Cipher::new(&[5u8; 32])
    }

    #[test]
    fn seal_then_open() {
        let sealed = seal(&cipher(), "dek_1", b"hello", 42);
        assert_eq!(sealed.nonce.len(), NONCE_LEN);
        assert_eq!(sealed.ciphertext.len(), 5 + TAG_LEN);
        assert_eq!(open(&cipher(), sealed).unwrap(), b"hello");
    }

    #[test]
    fn a_wiped_cipher_holds_the_zero_key_in_place_of_its_own() {
        let mut wiped = cipher();
        let sealed = seal(&wiped, "dek_1", b"hello", 42);
        wiped.wipe();
        assert!(open(&wiped, sealed).is_err());
        let by_zero_key = seal(&Cipher::new(&[0; 32]), "dek_1", b"hello", 42);
        assert_eq!(open(&wiped, by_zero_key).unwrap(), b"hello");
    }

    #[test]
    fn another_key_does_not_open() {
        let sealed = seal(&cipher(), "dek_1", b"hello", 42);
        let error = open(&Cipher::new(&[6u8; 32]), sealed).unwrap_err();
        assert!(error.message().contains("decryption failed"));
    }

    proptest::proptest! {
        #[test]
        fn a_sealed_envelope_is_the_protobuf_of_the_sealed_message(
            plaintext in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
            key_id in "[a-z_0-9]{0,30}",
            nonce in proptest::prelude::any::<[u8; NONCE_LEN]>(),
            time_ms in proptest::prelude::any::<i64>(),
        ) {
            use prost::Message as _;
            let cipher = cipher();
            let bytes = seal_envelope_with_nonce(&cipher, &key_id, &plaintext, nonce, time_ms);
            let message = seal_with_nonce(&cipher, &key_id, &plaintext, nonce, time_ms);
            proptest::prop_assert_eq!(&bytes, &message.encode_to_vec());
            if !key_id.is_empty() {
                let decoded = Encrypted::decode(bytes.as_slice()).unwrap();
                proptest::prop_assert_eq!(open(&cipher, decoded).unwrap(), plaintext);
            }
        }
    }

    #[test]
    fn nonces_are_fresh() {
        let first = seal(&cipher(), "dek_1", b"x", 0);
        let second = seal(&cipher(), "dek_1", b"x", 0);
        assert_ne!(first.nonce, second.nonce);
        assert_ne!(first.ciphertext, second.ciphertext);
    }

    #[test]
    fn validation_names_each_defect() {
        let good = seal(&cipher(), "dek_1", b"hello", 0);
        let mut short_nonce = good.clone();
        short_nonce.nonce.pop();
        assert!(validate_envelope(&short_nonce)
            .unwrap_err()
            .message()
            .contains("nonce"));
        let mut short_ciphertext = good.clone();
        short_ciphertext.ciphertext.truncate(15);
        assert!(validate_envelope(&short_ciphertext)
            .unwrap_err()
            .message()
            .contains("ciphertext"));
        let mut no_key = good;
        no_key.encryption_key_id.clear();
        assert!(validate_envelope(&no_key)
            .unwrap_err()
            .message()
            .contains("key id"));
    }
}
