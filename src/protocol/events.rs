//! Key events: subjects and versioned JSON payloads.
//!
//! ```text
//! <prefix>.events.<keyring-token>.dek.created   a keyring got a new DEK (first use, rotation)
//! <prefix>.events.%.kek.rolled                  roll-deks re-sealed the store
//! ```
//!
//! The keyring token is the keyring with `%`, `.`, `*`, `>` and whitespace percent-encoded, so
//! it is one subject token, readable, and distinct for distinct keyrings. Store-wide events use
//! the token `%`, which no keyring encodes to. Subscribe to `<prefix>.events.>` for everything,
//! or `<prefix>.events.<keyring-token>.>` for one keyring.

use serde::{Deserialize, Serialize};

/// Version of the event payloads; bumped only on incompatible changes.
pub const EVENT_VERSION: u32 = 1;
/// Event name of a new DEK.
pub const DEK_CREATED: &str = "dek.created";
/// Event name of a finished master-key roll.
pub const KEK_ROLLED: &str = "kek.rolled";
/// The keyring token of store-wide events.
pub const STORE_WIDE_TOKEN: &str = "%";
/// Header carrying the message id JetStream deduplicates on.
pub const MSG_ID: &str = "Nats-Msg-Id";

/// The keyring as one subject token.
///
/// ```
/// use ringvault::protocol::keyring_token;
/// assert_eq!(keyring_token("org/team.a"), "org/team%2Ea");
/// ```
pub fn keyring_token(keyring: &str) -> String {
    let mut token = String::with_capacity(keyring.len());
    for c in keyring.chars() {
        match c {
            '%' | '.' | '*' | '>' => token.push_str(&format!("%{:02X}", c as u32)),
            c if c.is_whitespace() => {
                let mut buffer = [0u8; 4];
                for byte in c.encode_utf8(&mut buffer).bytes() {
                    token.push_str(&format!("%{byte:02X}"));
                }
            }
            c => token.push(c),
        }
    }
    token
}

/// The keyring a token stands for (the inverse of [`keyring_token`]).
pub fn keyring_from_token(token: &str) -> Option<String> {
    let bytes = token.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = token.get(index + 1..index + 3)?;
            // Two hex digits exactly: `from_str_radix` would also take a sign (`%+A`), and
            // the decoding would no longer be the one inverse of `keyring_token`.
            if !hex.bytes().all(|byte| byte.is_ascii_hexdigit()) {
                return None;
            }
            decoded.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            decoded.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(decoded).ok()
}

/// The subject of `event` for `keyring` under `prefix`.
pub fn event_subject(prefix: &str, keyring: &str, event: &str) -> String {
    format!("{prefix}.events.{}.{event}", keyring_token(keyring))
}

/// The subject of a store-wide `event`.
pub fn store_event_subject(prefix: &str, event: &str) -> String {
    format!("{prefix}.events.{STORE_WIDE_TOKEN}.{event}")
}

/// Why a DEK was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DekCause {
    /// The keyring's first Encrypt.
    FirstUse,
    /// A RotateKeyring call.
    Manual,
    /// The keyring's LATEST reached its `rotate_after` age.
    Scheduled,
}

/// Payload of `dek.created`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DekCreated {
    /// [`EVENT_VERSION`].
    pub version: u32,
    /// The keyring.
    pub keyring: String,
    /// The new DEK, now LATEST.
    pub key_id: String,
    /// The DEK it replaced as LATEST, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_key_id: Option<String>,
    /// Why.
    pub cause: DekCause,
    /// When, unix milliseconds.
    pub time: i64,
    /// The replica that made it.
    pub replica: String,
}

impl DekCreated {
    /// The JetStream deduplication id: one per keyring and key.
    pub fn msg_id(&self) -> String {
        format!("{DEK_CREATED}:{}:{}", self.keyring, self.key_id)
    }
}

/// Payload of `kek.rolled`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KekRolled {
    /// [`EVENT_VERSION`].
    pub version: u32,
    /// The master key everything is sealed by now.
    pub kek_id: String,
    /// Objects looked at.
    pub scanned: u64,
    /// Objects re-sealed.
    pub resealed: u64,
    /// Objects already sealed by it.
    pub already_current: u64,
    /// Objects that failed.
    pub failed: u64,
    /// When, unix milliseconds.
    pub time: i64,
}

impl KekRolled {
    /// The JetStream deduplication id.
    pub fn msg_id(&self) -> String {
        format!("{KEK_ROLLED}:{}:{}", self.kek_id, self.time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyring_tokens_are_single_tokens_and_injective() {
        for keyring in ["ws_1", "org/team/x.y", "a:b-c", "a%2Eb", "a.b"] {
            let token = keyring_token(keyring);
            assert!(!token.contains(['.', '*', '>', ' ']), "{token}");
            assert_eq!(keyring_from_token(&token).as_deref(), Some(keyring));
        }
        assert_ne!(keyring_token("a%2Eb"), keyring_token("a.b"));
        assert_ne!(keyring_token("a"), STORE_WIDE_TOKEN);
        for not_a_token in ["%+A", "%-1", "% A", "%2"] {
            assert_eq!(keyring_from_token(not_a_token), None, "{not_a_token}");
        }
        assert_eq!(
            event_subject("vault.v1", "ws.1", DEK_CREATED),
            "vault.v1.events.ws%2E1.dek.created"
        );
    }

    #[test]
    fn payload_is_versioned_json() {
        let event = DekCreated {
            version: EVENT_VERSION,
            keyring: "ws_1".into(),
            key_id: "dek_2".into(),
            previous_key_id: Some("dek_1".into()),
            cause: DekCause::Manual,
            time: 5,
            replica: "r1".into(),
        };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["version"], 1);
        assert_eq!(json["cause"], "manual");
        assert_eq!(event.msg_id(), "dek.created:ws_1:dek_2");
    }
}
