//! Audit records: one per Encrypt, Decrypt, ReEncrypt, bulk call, rotation and admin action,
//! naming the principal's subject — never plaintext, ciphertext or a token. Serialized as one
//! JSON object for the `<prefix>.audit` subject and the log.
//!
//! Each message on the subject carries one or more records, one JSON object per line
//! ([`AuditRecord::to_json_lines`]).

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::Principal;
use crate::error::Kind;

/// Whether the audited operation succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It did.
    Ok,
    /// It failed with `error_code`.
    Error,
}

/// One audited operation.
///
/// Built on every request, so it holds what is cheap to take there (the time as a number, the
/// fixed names borrowed) and leaves formatting to serialization, which happens per batch off the
/// reply path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When it happened, to the millisecond (serialized as RFC 3339, UTC, milliseconds).
    #[serde(with = "rfc3339_millis")]
    pub time: SystemTime,
    /// The request id (the `Request-Id` header, or generated).
    pub request_id: String,
    /// Who asked.
    pub subject: String,
    /// The principal's workspace, if bound to one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub workspace: Option<String>,
    /// The workspace an admin acted for (`X-Tenant-ID`), when not its own.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub acting_for: Option<String>,
    /// The credential source (`static_token`, `signed_token`, `jwt`).
    pub credential_source: Cow<'static, str>,
    /// The operation (`encrypt`, `decrypt`, `reencrypt`, `encrypt_bulk`, `decrypt_bulk`,
    /// `rotate`, …).
    pub action: Cow<'static, str>,
    /// The keyring.
    pub keyring: String,
    /// The key used or created, when known.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub key_id: Option<String>,
    /// Items handled (1 for single calls, the batch size for bulk ones).
    pub item_count: u64,
    /// Success or failure.
    pub outcome: Outcome,
    /// The error code on failure (`access_denied`, …).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error_code: Option<String>,
}

impl AuditRecord {
    /// A successful record of `action` by `principal` on `keyring` for one item, stamped now.
    pub fn new(
        request_id: impl Into<String>,
        principal: &Principal,
        action: impl Into<Cow<'static, str>>,
        keyring: impl Into<String>,
    ) -> Self {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            time: UNIX_EPOCH + Duration::from_millis(since_epoch.as_millis() as u64),
            request_id: request_id.into(),
            subject: principal.subject.clone(),
            workspace: principal.workspace.clone(),
            acting_for: None,
            credential_source: Cow::Borrowed(principal.source.name()),
            action: action.into(),
            keyring: keyring.into(),
            key_id: None,
            item_count: 1,
            outcome: Outcome::Ok,
            error_code: None,
        }
    }

    /// With the key id.
    pub fn with_key_id(mut self, key_id: impl Into<String>) -> Self {
        self.key_id = Some(key_id.into());
        self
    }

    /// With the number of items.
    pub fn with_item_count(mut self, count: u64) -> Self {
        self.item_count = count;
        self
    }

    /// With the workspace an admin acted for.
    pub fn acting_for(mut self, workspace: impl Into<String>) -> Self {
        self.acting_for = Some(workspace.into());
        self
    }

    /// Marked as failed with `kind`'s code.
    pub fn failed(mut self, kind: Kind) -> Self {
        self.outcome = Outcome::Error;
        self.error_code = Some(kind.code().to_owned());
        self
    }

    /// The record as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }

    /// Records as JSON lines: one object per record, separated by newlines.
    pub fn to_json_lines(records: &[AuditRecord]) -> Bytes {
        let mut lines = Vec::with_capacity(records.len() * 320);
        for (index, record) in records.iter().enumerate() {
            if index > 0 {
                lines.push(b'\n');
            }
            if serde_json::to_writer(&mut lines, record).is_err() {
                lines.extend_from_slice(b"{}");
            }
        }
        Bytes::from(lines)
    }
}

/// `SystemTime` as RFC 3339 text with milliseconds, written straight into the serializer.
mod rfc3339_millis {
    use std::time::SystemTime;

    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_rfc3339_millis(*time))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SystemTime, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(deserializer)?;
        humantime::parse_rfc3339(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{parse_grants, CredentialSource};

    #[test]
    fn record_serializes_without_secrets() {
        let principal = Principal {
            workspace: Some("ws_1".into()),
            subject: "svc".into(),
            source: CredentialSource::Jwt,
            permissions: parse_grants(&["encrypt"]).unwrap(),
        };
        let record = AuditRecord::new("req-1", &principal, "encrypt_bulk", "ws_1/app")
            .with_key_id("dek_1")
            .with_item_count(3);
        let json: serde_json::Value = serde_json::from_str(&record.to_json()).unwrap();
        assert_eq!(json["subject"], "svc");
        assert_eq!(json["workspace"], "ws_1");
        assert_eq!(json["credential_source"], "jwt");
        assert_eq!(json["outcome"], "ok");
        assert_eq!(json["item_count"], 3);
        assert!(json.get("error_code").is_none());
        let time = json["time"].as_str().unwrap();
        assert!(
            time.ends_with('Z') && time.len() == "2026-11-23T16:40:00.123Z".len(),
            "{time}"
        );
        let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
        for forbidden in ["token", "plaintext", "ciphertext", "encrypted", "data"] {
            assert!(
                !keys.iter().any(|key| key.as_str() == forbidden),
                "{forbidden}"
            );
        }
        let failed = record.clone().failed(Kind::AccessDenied);
        assert_eq!(failed.error_code.as_deref(), Some("access_denied"));
        let back: AuditRecord = serde_json::from_str(&failed.to_json()).unwrap();
        assert_eq!(back, failed);
        let lines = AuditRecord::to_json_lines(&[record.clone(), failed.clone()]);
        let parsed: Vec<AuditRecord> = std::str::from_utf8(&lines)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(parsed, vec![record, failed]);
    }
}
