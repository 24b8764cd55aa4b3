//! AES-256-GCM over [`Encrypted`]: a fresh random 12-byte nonce per message, no associated data,
//! the 16-byte tag appended to the ciphertext.

use aes_gcm::aead::{AeadInPlace, OsRng};
use aes_gcm::{AeadCore, Aes256Gcm, Nonce};

use crate::error::{Error, Result};
use crate::protocol::{Algorithm, Encrypted};

/// Length of the GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Length of the GCM tag.
pub const TAG_LEN: usize = 16;

/// Seals `plaintext` with `cipher` under a fresh random nonce.
pub fn seal(cipher: &Aes256Gcm, key_id: &str, plaintext: &[u8], time_ms: i64) -> Encrypted {
    let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
    seal_with_nonce(cipher, key_id, plaintext, nonce.into(), time_ms)
}

/// Seals `plaintext` under the given nonce. Only for reproducing known vectors: a nonce must
/// never be used twice with one key, which is why [`seal`] draws a fresh one.
pub fn seal_with_nonce(
    cipher: &Aes256Gcm,
    key_id: &str,
    plaintext: &[u8],
    nonce: [u8; NONCE_LEN],
    time_ms: i64,
) -> Encrypted {
    let mut buffer = Vec::with_capacity(plaintext.len() + TAG_LEN);
    buffer.extend_from_slice(plaintext);
    // Encryption into a Vec only fails when the buffer cannot grow or the message exceeds
    // GCM's 64 GiB limit, neither possible with payloads bounded by the NATS max_payload.
    cipher
        .encrypt_in_place(Nonce::from_slice(&nonce), b"", &mut buffer)
        .expect("aes-256-gcm encryption of a bounded payload cannot fail");
    Encrypted {
        algorithm: Algorithm::Aes256Gcm as i32,
        nonce: nonce.to_vec(),
        ciphertext: buffer,
        encryption_key_id: key_id.to_owned(),
        time: time_ms,
    }
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

/// Opens an envelope with `cipher`. Any change to nonce, ciphertext or tag fails
/// authentication; the caller has already matched the key id.
pub fn open(cipher: &Aes256Gcm, encrypted: &Encrypted) -> Result<Vec<u8>> {
    validate_envelope(encrypted)?;
    let mut buffer = encrypted.ciphertext.clone();
    cipher
        .decrypt_in_place(Nonce::from_slice(&encrypted.nonce), b"", &mut buffer)
        .map_err(|_| {
            Error::invalid_argument(format!(
                "decryption failed with key {:?}: the ciphertext was altered or belongs to another keyring",
                encrypted.encryption_key_id
            ))
        })?;
    Ok(buffer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes_gcm::KeyInit;

    fn cipher() -> Aes256Gcm {
        Aes256Gcm::new_from_slice(&[5u8; 32]).unwrap()
    }

    #[test]
    fn seal_then_open() {
        let sealed = seal(&cipher(), "dek_1", b"hello", 42);
        assert_eq!(sealed.nonce.len(), NONCE_LEN);
        assert_eq!(sealed.ciphertext.len(), 5 + TAG_LEN);
        assert_eq!(open(&cipher(), &sealed).unwrap(), b"hello");
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
