//! Audit records: one per Encrypt, Decrypt, ReEncrypt, bulk call, rotation and admin action,
//! naming the principal's subject — never plaintext, ciphertext or a token. Serialized as one
//! JSON object for the `<prefix>.audit` subject and the log.
//!
//! Each message on the subject carries one or more records, one JSON object per line
//! ([`AuditRecord::to_json_messages`]).

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
        let mut json = Vec::with_capacity(320);
        self.write_json(&mut json);
        String::from_utf8(json).unwrap_or_else(|_| "{}".to_owned())
    }

    /// Records as JSON lines in as many messages as it takes for each to hold at most
    /// `max_bytes` (a nats-server's `max_payload`), in order: a batch over the limit would be
    /// refused whole, and every record in it lost. A record longer than `max_bytes` on its own
    /// is a message of its own.
    pub fn to_json_messages(records: &[AuditRecord], max_bytes: usize) -> Vec<Bytes> {
        let mut messages = Vec::new();
        let mut lines = Vec::with_capacity(records.len().saturating_mul(320).min(max_bytes));
        for record in records {
            let start = lines.len();
            if start > 0 {
                lines.push(b'\n');
            }
            record.write_json(&mut lines);
            if lines.len() > max_bytes && start > 0 {
                // This record starts the next message.
                let next = lines[start + 1..].to_vec();
                lines.truncate(start);
                messages.push(Bytes::from(std::mem::replace(&mut lines, next)));
            }
        }
        if !lines.is_empty() {
            messages.push(Bytes::from(lines));
        }
        messages
    }

    /// Appends the record as one JSON object, byte for byte what `serde_json` writes for it
    /// (a property test checks), without serde's per-field machinery: every request leaves a
    /// record, and serializing them was ~4 % of the service's CPU.
    fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"time\":\"");
        match rfc3339_millis::format(self.time) {
            Some(text) => out.extend_from_slice(&text),
            None => out.extend_from_slice(
                humantime::format_rfc3339_millis(self.time)
                    .to_string()
                    .as_bytes(),
            ),
        }
        out.extend_from_slice(b"\",\"request_id\":");
        json_string(out, &self.request_id);
        out.extend_from_slice(b",\"subject\":");
        json_string(out, &self.subject);
        if let Some(workspace) = &self.workspace {
            out.extend_from_slice(b",\"workspace\":");
            json_string(out, workspace);
        }
        if let Some(acting_for) = &self.acting_for {
            out.extend_from_slice(b",\"acting_for\":");
            json_string(out, acting_for);
        }
        out.extend_from_slice(b",\"credential_source\":");
        json_string(out, &self.credential_source);
        out.extend_from_slice(b",\"action\":");
        json_string(out, &self.action);
        out.extend_from_slice(b",\"keyring\":");
        json_string(out, &self.keyring);
        if let Some(key_id) = &self.key_id {
            out.extend_from_slice(b",\"key_id\":");
            json_string(out, key_id);
        }
        out.extend_from_slice(b",\"item_count\":");
        out.extend_from_slice(itoa::Buffer::new().format(self.item_count).as_bytes());
        out.extend_from_slice(match self.outcome {
            Outcome::Ok => b",\"outcome\":\"ok\"",
            Outcome::Error => b",\"outcome\":\"error\"",
        });
        if let Some(error_code) = &self.error_code {
            out.extend_from_slice(b",\"error_code\":");
            json_string(out, error_code);
        }
        out.push(b'}');
    }
}

/// Appends `text` as a JSON string: as is between quotes when nothing in it needs escaping
/// (the usual case: names, ids, codes), else as `serde_json` escapes it.
fn json_string(out: &mut Vec<u8>, text: &str) {
    if text
        .bytes()
        .all(|byte| byte >= 0x20 && byte != b'"' && byte != b'\\')
    {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
        return;
    }
    if serde_json::to_writer(&mut *out, text).is_err() {
        // Writing a string to a vector cannot fail; stay valid JSON if it ever did.
        out.extend_from_slice(b"\"\"");
    }
}

/// `SystemTime` as RFC 3339 text with milliseconds, written straight into the serializer.
mod rfc3339_millis {
    use std::time::{SystemTime, UNIX_EPOCH};

    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
        match format(*time) {
            Some(text) => serializer.serialize_str(std::str::from_utf8(&text).unwrap_or_default()),
            None => serializer.collect_str(&humantime::format_rfc3339_millis(*time)),
        }
    }

    /// The latest time [`format`] writes: 9999-12-31T23:59:59.999Z.
    const LAST_SECOND: u64 = 253_402_300_799;

    /// `time` as `YYYY-MM-DDTHH:MM:SS.mmmZ`, what humantime's `format_rfc3339_millis` writes,
    /// but without `fmt`'s machinery: it runs once per audit record. `None` before 1970 or
    /// after 9999, left to humantime.
    pub(super) fn format(time: SystemTime) -> Option<[u8; 24]> {
        let since_epoch = time.duration_since(UNIX_EPOCH).ok()?;
        let secs = since_epoch.as_secs();
        if secs > LAST_SECOND {
            return None;
        }
        let (year, month, day) = civil_from_days(secs / 86_400);
        let of_day = secs % 86_400;
        let mut text = *b"0000-00-00T00:00:00.000Z";
        let mut put = |at: usize, value: u64, digits: usize| {
            let mut value = value;
            for index in (at..at + digits).rev() {
                text[index] = b'0' + (value % 10) as u8;
                value /= 10;
            }
        };
        put(0, year, 4);
        put(5, month, 2);
        put(8, day, 2);
        put(11, of_day / 3600, 2);
        put(14, of_day % 3600 / 60, 2);
        put(17, of_day % 60, 2);
        put(20, u64::from(since_epoch.subsec_millis()), 3);
        Some(text)
    }

    /// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
    /// `civil_from_days`, for days on or after the epoch).
    fn civil_from_days(days: u64) -> (u64, u64, u64) {
        let shifted = days + 719_468;
        let era = shifted / 146_097;
        let day_of_era = shifted % 146_097;
        let year_of_era =
            (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
        let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
        let month_from_march = (5 * day_of_year + 2) / 153;
        let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
        let month = if month_from_march < 10 {
            month_from_march + 3
        } else {
            month_from_march - 9
        };
        let year = year_of_era + era * 400 + u64::from(month <= 2);
        (year, month, day)
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

    proptest::proptest! {
        /// The audit time reads as humantime writes it, to the millisecond, over every time
        /// from 1970 to 9999.
        #[test]
        fn audit_time_is_humantime_s_rfc3339_millis(millis in 0u64..=253_402_300_799_999) {
            let time = UNIX_EPOCH + Duration::from_millis(millis);
            let ours = rfc3339_millis::format(time).expect("within 1970..=9999");
            proptest::prop_assert_eq!(
                std::str::from_utf8(&ours).unwrap(),
                humantime::format_rfc3339_millis(time).to_string()
            );
        }
    }

    fn text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::strategy::Strategy as _;

        proptest::prop_oneof![
            "[a-z0-9_/.-]{0,20}",
            proptest::string::string_regex(".{0,12}").unwrap(),
            proptest::collection::vec(proptest::char::any(), 0..8)
                .prop_map(|chars| chars.into_iter().collect::<String>()),
        ]
    }

    fn optional_text() -> impl proptest::strategy::Strategy<Value = Option<String>> {
        proptest::option::of(text())
    }

    proptest::proptest! {
        /// The hand-written JSON of a record is serde_json's, byte for byte.
        #[test]
        fn audit_json_is_serde_json_s(
            millis in 0u64..=253_402_300_799_999,
            request_id in text(),
            subject in text(),
            workspace in optional_text(),
            acting_for in optional_text(),
            action in text(),
            keyring in text(),
            key_id in optional_text(),
            item_count in proptest::num::u64::ANY,
            error_code in optional_text(),
        ) {
            let record = AuditRecord {
                time: UNIX_EPOCH + Duration::from_millis(millis),
                request_id,
                subject,
                workspace,
                acting_for,
                credential_source: Cow::Borrowed("static_token"),
                action: Cow::Owned(action),
                keyring,
                key_id,
                item_count,
                outcome: if error_code.is_some() { Outcome::Error } else { Outcome::Ok },
                error_code,
            };
            proptest::prop_assert_eq!(record.to_json(), serde_json::to_string(&record).unwrap());
        }
    }

    #[test]
    fn audit_time_at_the_edges() {
        for (millis, text) in [
            (0, "1970-01-01T00:00:00.000Z"),
            (951_782_400_000, "2000-02-29T00:00:00.000Z"),
            (4_107_542_399_999, "2100-02-28T23:59:59.999Z"),
            (253_402_300_799_999, "9999-12-31T23:59:59.999Z"),
        ] {
            let time = UNIX_EPOCH + Duration::from_millis(millis);
            assert_eq!(&rfc3339_millis::format(time).unwrap(), text.as_bytes());
        }
        assert!(rfc3339_millis::format(UNIX_EPOCH - Duration::from_secs(1)).is_none());
        assert!(
            rfc3339_millis::format(UNIX_EPOCH + Duration::from_secs(253_402_300_800)).is_none()
        );
    }

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
        let messages = AuditRecord::to_json_messages(&[record.clone(), failed.clone()], usize::MAX);
        assert_eq!(messages.len(), 1);
        let lines = &messages[0];
        let parsed: Vec<AuditRecord> = std::str::from_utf8(lines)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(parsed, vec![record, failed]);
    }

    #[test]
    fn records_are_split_into_messages_of_at_most_the_limit() {
        let principal = Principal {
            workspace: None,
            subject: "svc".into(),
            source: CredentialSource::StaticToken,
            permissions: parse_grants(&["encrypt"]).unwrap(),
        };
        let records: Vec<AuditRecord> = (0..40)
            .map(|index| {
                // Sizes vary, so that the limit falls inside records, not only between them.
                let keyring = format!("ws_1/{}", "k".repeat(index * 7));
                AuditRecord::new(format!("req-{index}"), &principal, "encrypt", keyring)
            })
            .collect();
        let mut whole = AuditRecord::to_json_messages(&records, usize::MAX);
        assert_eq!(whole.len(), 1);
        let whole = whole.remove(0);
        let parse = |message: &[u8]| -> Vec<AuditRecord> {
            std::str::from_utf8(message)
                .unwrap()
                .lines()
                .map(|line| serde_json::from_str(line).unwrap())
                .collect()
        };
        assert_eq!(parse(&whole), records);
        assert_eq!(
            AuditRecord::to_json_messages(&records, whole.len()),
            vec![whole.clone()]
        );
        for limit in [1, 200, 500, 1000, whole.len() - 1] {
            let messages = AuditRecord::to_json_messages(&records, limit);
            assert!(messages.len() > 1, "{limit}");
            // Every record once, in order; a message is over the limit only when it is one
            // record longer than the limit on its own.
            let again: Vec<AuditRecord> = messages.iter().flat_map(|m| parse(m)).collect();
            assert_eq!(again, records, "{limit}");
            for message in &messages {
                assert!(
                    message.len() <= limit || parse(message).len() == 1,
                    "{limit}: {} bytes",
                    message.len()
                );
                assert!(!message.starts_with(b"\n") && !message.ends_with(b"\n"));
            }
        }
        assert!(AuditRecord::to_json_messages(&[], 100).is_empty());
        assert!(AuditRecord::to_json_messages(&[], usize::MAX).is_empty());
    }
}
