//! Object keys of the storage layout, and the validation that guards them.

use crate::error::{Error, Result};

/// Prefix of every keyring object.
pub const KEYRING_ROOT: &str = "keyring/";
/// Name of the object holding a byte copy of a keyring's newest DEK.
pub const LATEST: &str = "LATEST";
/// How every key id ringvault (and Vault) makes begins.
pub const DEK_ID_PREFIX: &str = "dek_";
/// Longest accepted keyring name, in bytes.
pub const MAX_KEYRING_LEN: usize = 256;
/// Longest accepted key id, in bytes.
const MAX_KEY_ID_LEN: usize = 128;

fn allowed_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b':' | b'-')
}

/// The longest segment of a keyring name: a file name on the file store (`NAME_MAX`).
const MAX_SEGMENT_LEN: usize = 255;

/// Checks a keyring name: 1–256 bytes of `[A-Za-z0-9_.:/-]`, no leading or trailing `/`,
/// no empty, `.` or `..` segment, none over 255 bytes, and below the first segment none that is `LATEST` or starts
/// with `dek_` (the names of the objects of the keyring above).
///
/// ```
/// use ringvault::storage::validate_keyring;
/// assert!(validate_keyring("env_prod/team-a/x.y").is_ok());
/// assert!(validate_keyring("a/../b").is_err());
/// ```
pub fn validate_keyring(keyring: &str) -> Result<()> {
    if keyring.is_empty() {
        return Err(Error::invalid_argument("keyring is empty"));
    }
    if keyring.len() > MAX_KEYRING_LEN {
        return Err(Error::invalid_argument(format!(
            "keyring is {} bytes, at most {MAX_KEYRING_LEN} are allowed",
            keyring.len()
        )));
    }
    if let Some(bad) = keyring
        .bytes()
        .find(|&byte| byte != b'/' && !allowed_byte(byte))
    {
        return Err(Error::invalid_argument(format!(
            "keyring {:?} contains {:?}; allowed are letters, digits and _ . : / -",
            keyring.escape_debug().to_string(),
            char::from(bad)
        )));
    }
    for (index, segment) in keyring.split('/').enumerate() {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err(Error::invalid_argument(format!(
                "keyring {keyring:?} has an empty, \".\" or \"..\" segment"
            )));
        }
        // Each segment is a directory of the file store, whose names are at most 255 bytes.
        if segment.len() > MAX_SEGMENT_LEN {
            return Err(Error::invalid_argument(format!(
                "keyring segments are at most {MAX_SEGMENT_LEN} bytes; one is {}",
                segment.len()
            )));
        }
        // `a/LATEST` and `a/dek_…` are where keyring `a` keeps its objects: as keyrings, their
        // objects would sit below a file (a file store cannot have both), or the other way
        // round, and keyring `a` could no longer be written.
        if index > 0 && (segment == LATEST || segment.starts_with(DEK_ID_PREFIX)) {
            return Err(Error::invalid_argument(format!(
                "keyring {keyring:?} has a segment {segment:?}, which names an object of the \
                 keyring above it ({LATEST} or a {DEK_ID_PREFIX}… key id)"
            )));
        }
    }
    Ok(())
}

/// Checks a key id taken from an envelope before it becomes part of an object key.
pub fn validate_key_id(key_id: &str) -> Result<()> {
    if key_id.is_empty() {
        return Err(Error::invalid_argument("encryption key id is empty"));
    }
    let valid = key_id.len() <= MAX_KEY_ID_LEN
        && key_id.bytes().all(allowed_byte)
        && key_id != "."
        && key_id != ".."
        && key_id != LATEST;
    if !valid {
        return Err(Error::invalid_argument(format!(
            "encryption key id {:?} is not a valid key id",
            crate::error::first_chars(key_id, 64)
        )));
    }
    Ok(())
}

/// `keyring/<keyring>/<key_id>`; both parts must be valid.
pub fn dek_key(keyring: &str, key_id: &str) -> String {
    format!("{KEYRING_ROOT}{keyring}/{key_id}")
}

/// `keyring/<keyring>/LATEST`.
pub fn latest_key(keyring: &str) -> String {
    format!("{KEYRING_ROOT}{keyring}/{LATEST}")
}

/// Splits an object key into keyring and last segment (`LATEST` or a key id).
pub fn keyring_of(object_key: &str) -> Option<(&str, &str)> {
    let rest = object_key.strip_prefix(KEYRING_ROOT)?;
    let (keyring, leaf) = rest.rsplit_once('/')?;
    (!keyring.is_empty() && !leaf.is_empty()).then_some((keyring, leaf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyring_rules() {
        let long = "a".repeat(257);
        for bad in [
            "",
            "../x",
            "a/../b",
            "a//b",
            "/a",
            "a/",
            &long,
            "a\0b",
            "a b",
            ".",
            "a/./b",
            "é",
            // Where keyring `a` keeps its objects.
            "a/LATEST",
            "a/dek_2VJbKzD9o4H1yf7mPb8bZq",
            "a/b/dek_x",
            &"a".repeat(256),
        ] {
            assert!(validate_keyring(bad).is_err(), "accepted {bad:?}");
        }
        let longest = format!("{}/b", "a".repeat(254));
        for good in [
            "ws_3ZkPq9Lx",
            "env_prod/team-a/x.y",
            "org/team/project/keyring",
            "a:b",
            &longest,
            // Only below a keyring do these names collide.
            "LATEST",
            "dek_like_a_key",
            "a/latest",
            "a/xdek_1",
        ] {
            assert!(validate_keyring(good).is_ok(), "refused {good:?}");
        }
    }

    #[test]
    fn key_id_rules() {
        for good in [
            "dek_abc123",
            "dek_2VJbKzD9o4H1yf7mPb8bZqTqW1x",
            "dek_3ZkPq9Lx",
        ] {
            assert!(validate_key_id(good).is_ok(), "refused {good:?}");
        }
        for bad in ["", "a/b", "..", "LATEST", "x\ny", &"d".repeat(200)] {
            assert!(validate_key_id(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn layout() {
        assert_eq!(dek_key("org/x", "dek_1"), "keyring/org/x/dek_1");
        assert_eq!(latest_key("ws"), "keyring/ws/LATEST");
        assert_eq!(keyring_of("keyring/org/x/dek_1"), Some(("org/x", "dek_1")));
        assert_eq!(keyring_of("other/x"), None);
    }
}
