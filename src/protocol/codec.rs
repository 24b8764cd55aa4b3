//! Request and reply bodies in protobuf (the default) or protobuf JSON.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{fields, DecryptResponse, EncryptResponse};
use crate::error::{Error, Kind, Result};

/// The body format of one request; the reply uses the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// Protobuf bytes.
    #[default]
    Protobuf,
    /// Protobuf's canonical JSON.
    Json,
}

impl Format {
    /// The format named by a `Content-Type` header value (`application/json` → JSON; anything
    /// else, or none, → protobuf). Parameters such as `; charset=utf-8` are ignored.
    pub fn from_content_type(content_type: Option<&str>) -> Format {
        let Some(value) = content_type else {
            return Format::Protobuf;
        };
        let media_type = value.split(';').next().unwrap_or("").trim();
        if media_type.eq_ignore_ascii_case(super::JSON_CONTENT_TYPE) {
            Format::Json
        } else {
            Format::Protobuf
        }
    }
}

/// Decodes a request body.
pub fn decode<T>(format: Format, body: &[u8]) -> Result<T>
where
    T: prost::Message + Default + DeserializeOwned,
{
    match format {
        Format::Protobuf => T::decode(body).map_err(|error| {
            Error::invalid_argument(format!("malformed protobuf request: {error}"))
        }),
        Format::Json if body.is_empty() => Ok(T::default()),
        Format::Json => match serde_json::from_slice(body) {
            Ok(message) => Ok(message),
            // Protobuf JSON reads a field set to `null` as unset; serde refuses `null` for a
            // string or a map. Only a body that failed is parsed again, without those fields.
            Err(error) if error.is_data() => {
                decode_without_null_fields(body).ok_or_else(|| malformed_json(&error))
            }
            Err(error) => Err(malformed_json(&error)),
        },
    }
}

/// The two string fields of an Encrypt or Decrypt request in protobuf (1: the keyring, 2: the
/// data or the envelope), borrowed from the message instead of copied out of it: the hot path
/// of the two busiest methods, where the second field is the payload (64 KiB and more). `None`
/// for anything but that plain layout (another field or wire type, a truncated field, text
/// that is not UTF-8, even in a value a later one replaces), which [`decode`] then reads with
/// its own answer; where this answers, it is what [`decode`] answers (in any order, the last
/// value winning when a field repeats, as in prost).
pub fn borrow_keyring_and_text(body: &[u8]) -> Option<(&str, &str)> {
    const KEYRING_KEY: u64 = 1 << 3 | 2;
    const TEXT_KEY: u64 = 2 << 3 | 2;
    let mut keyring = "";
    let mut text = "";
    let mut rest = body;
    while !rest.is_empty() {
        let key = prost::encoding::decode_varint(&mut rest).ok()?;
        let len = prost::encoding::decode_varint(&mut rest).ok()?;
        let len = usize::try_from(len).ok().filter(|&len| len <= rest.len())?;
        let (value, after) = rest.split_at(len);
        // Every value is checked, as prost checks each one it merges; with SIMD, as the text is
        // the payload (std's check was 7 % of the service's CPU at 64 KiB Encrypt).
        let value = simdutf8::basic::from_utf8(value).ok()?;
        match key {
            KEYRING_KEY => keyring = value,
            TEXT_KEY => text = value,
            _ => return None,
        }
        rest = after;
    }
    Some((keyring, text))
}

/// The largest JSON body [`request_keyring`] reads.
pub const REQUEST_KEYRING_JSON_LIMIT: usize = 16 * 1024;

/// The `keyring` field (1, `keyring`) that every request but Liveness carries, read on its
/// own: for the audit record of a request refused before its body is decoded (over a rate
/// limit, a refused `X-Tenant-ID`). Empty when the body has none or does not decode.
pub fn request_keyring(format: Format, body: &[u8]) -> String {
    // A refusal must stay cheap under a flood: protobuf skips the other fields by their length,
    // but JSON has to be scanned to its end, so a large JSON body is not read for this.
    if format == Format::Json && body.len() > REQUEST_KEYRING_JSON_LIMIT {
        return String::new();
    }
    /// Any request, every field but its keyring skipped.
    #[derive(Clone, PartialEq, prost::Message, Deserialize)]
    #[serde(default)]
    struct KeyringOnly {
        #[prost(string, tag = "1")]
        keyring: String,
    }
    decode::<KeyringOnly>(format, body)
        .map(|request| request.keyring)
        .unwrap_or_default()
}

fn malformed_json(error: &serde_json::Error) -> Error {
    Error::invalid_argument(format!("malformed json request: {error}"))
}

/// The request in `body` with its fields that are `null` left out, if that is what kept it
/// from decoding. Only the request's own fields: a `null` inside a bulk call's items is an
/// item, not an unset field, and stays an error.
fn decode_without_null_fields<T: DeserializeOwned>(body: &[u8]) -> Option<T> {
    let serde_json::Value::Object(mut fields) = serde_json::from_slice(body).ok()? else {
        return None;
    };
    let before = fields.len();
    fields.retain(|_, value| !value.is_null());
    if fields.len() == before {
        return None;
    }
    serde_json::from_value(serde_json::Value::Object(fields)).ok()
}

/// Encodes a reply body.
pub fn encode<T>(format: Format, message: &T) -> Bytes
where
    T: prost::Message + Serialize,
{
    match format {
        Format::Protobuf => Bytes::from(message.encode_to_vec()),
        // Serializing these plain structs cannot fail: no maps with non-string keys, no floats.
        Format::Json => Bytes::from(serde_json::to_vec(message).unwrap_or_default()),
    }
}

/// Encodes an Encrypt reply from the sealed envelope's protobuf bytes. In protobuf the base64
/// is written straight into the body, which on large payloads saves two copies of the envelope
/// (the string, then the message) over building an [`EncryptResponse`] and encoding it.
pub fn encode_encrypt_response(format: Format, envelope: &[u8], key_id: &str) -> Bytes {
    if format == Format::Json {
        let response = EncryptResponse {
            encrypted: super::envelope_text(envelope),
            key_id: key_id.to_owned(),
        };
        return encode(format, &response);
    }
    let text_len = super::envelope_text_len(envelope.len());
    let mut body = Vec::with_capacity(
        fields::length_delimited_len(1, text_len) + fields::length_delimited_len(2, key_id.len()),
    );
    // A string field is left out when empty; an envelope never is.
    if text_len > 0 {
        fields::put_length_delimited_header(1, text_len, &mut body);
        super::append_envelope_text(envelope, &mut body);
    }
    fields::put_bytes_field(2, key_id.as_bytes(), &mut body);
    Bytes::from(body)
}

/// Encodes a Decrypt reply. In protobuf the plaintext is appended to the field's header in
/// pieces: a large plaintext written a few bytes into a fresh buffer in one copy is glibc's
/// slow copy case on AMD Zen 3 (see `src/buffer.rs`).
pub fn encode_decrypt_response(format: Format, response: &DecryptResponse) -> Bytes {
    if format == Format::Json {
        return encode(format, response);
    }
    let plaintext = response.plaintext.as_bytes();
    let mut body = Vec::with_capacity(fields::length_delimited_len(1, plaintext.len()));
    fields::put_bytes_field(1, plaintext, &mut body);
    Bytes::from(body)
}

/// The longest error message a reply carries, in characters (longer ones end in `…`).
pub const MAX_ERROR_MESSAGE_CHARS: usize = 512;

/// The JSON body of an error reply: `{"code": "...", "message": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable machine code ([`Kind::code`]).
    pub code: String,
    /// Lowercase human-readable message.
    pub message: String,
}

impl ErrorBody {
    /// The body of `error`.
    /// The message is cut at [`MAX_ERROR_MESSAGE_CHARS`]: some messages quote what the caller
    /// sent (a bulk item's id, a token's `kid`, a mistyped JSON value), which has no other bound.
    pub fn from_error(error: &Error) -> Self {
        let message = error.message();
        let kept = crate::error::first_chars(message, MAX_ERROR_MESSAGE_CHARS);
        let message = if kept.len() < message.len() {
            format!("{kept}…")
        } else {
            message.to_owned()
        };
        Self {
            code: error.kind().code().to_owned(),
            message,
        }
    }

    /// The JSON bytes of this body.
    pub fn to_bytes(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// The error this body describes.
    pub fn into_error(self) -> Error {
        Error::new(Kind::from_code(&self.code), self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{DecryptBulkRequest, DecryptRequest, EncryptRequest, ReEncryptRequest};
    use proptest::strategy::Strategy as _;

    #[test]
    fn borrowed_requests_read_the_plain_layout_and_leave_the_rest_to_prost() {
        let request = EncryptRequest {
            keyring: "ws_1/a".into(),
            data: "plaintext".into(),
        };
        let body = encode(Format::Protobuf, &request);
        assert_eq!(
            borrow_keyring_and_text(&body),
            Some(("ws_1/a", "plaintext"))
        );
        assert_eq!(borrow_keyring_and_text(b""), Some(("", "")));
        // Fields in the other order, and a repeated field (the last wins).
        assert_eq!(
            borrow_keyring_and_text(b"\x12\x01d\x0a\x01a\x0a\x01b"),
            Some(("b", "d"))
        );
        // Left to prost: an unknown field, another wire type, a truncated field, bad UTF-8.
        for body in [
            &b"\x0a\x01a\x1a\x01x"[..],
            b"\x08\x01",
            b"\x0a\x05ab",
            b"\x12\x02\xff\xfe",
            b"\x0a",
            // Invalid UTF-8 replaced by a later value: prost refuses it all the same.
            b"\x0a\x01\xff\x0a\x01a",
        ] {
            assert_eq!(borrow_keyring_and_text(body), None, "{body:?}");
        }
    }

    proptest::proptest! {
        /// Wherever the borrowed read answers, prost reads the same strings, as an Encrypt and
        /// as a Decrypt request; and every encoded request is read.
        #[test]
        fn borrowed_requests_agree_with_prost(
            fields in proptest::collection::vec((
                proptest::prop_oneof![
                    proptest::strategy::Just(0x0au8),
                    proptest::strategy::Just(0x12u8),
                    proptest::num::u8::ANY,
                ],
                proptest::prop_oneof![
                    ".{0,6}".prop_map(String::into_bytes),
                    proptest::collection::vec(proptest::num::u8::ANY, 0..6),
                ],
                proptest::num::u8::ANY,
            ), 0..5),
            keyring in ".{0,8}",
            data in ".{0,40}",
        ) {
            // Mostly well-formed fields (a key, a length, that many bytes, UTF-8 or not), now
            // and then a length that does not fit.
            let mut body = Vec::new();
            for (key, value, skew) in fields {
                body.push(key);
                let len = if skew < 16 { value.len() + 1 } else { value.len() };
                body.push(len as u8);
                body.extend_from_slice(&value);
            }
            if let Some((keyring, text)) = borrow_keyring_and_text(&body) {
                let encrypt: EncryptRequest = decode(Format::Protobuf, &body).unwrap();
                proptest::prop_assert_eq!((keyring, text), (&*encrypt.keyring, &*encrypt.data));
                let decrypt: DecryptRequest = decode(Format::Protobuf, &body).unwrap();
                proptest::prop_assert_eq!(text, &*decrypt.encrypted);
            }
            let request = EncryptRequest { keyring: keyring.clone(), data: data.clone() };
            let encoded = encode(Format::Protobuf, &request);
            proptest::prop_assert_eq!(
                borrow_keyring_and_text(&encoded),
                Some((keyring.as_str(), data.as_str()))
            );
        }
    }

    #[test]
    fn request_keyring_reads_the_keyring_of_any_request() {
        let encrypt = EncryptRequest {
            keyring: "ws_1/a".into(),
            data: "plaintext".into(),
        };
        let bulk = DecryptBulkRequest {
            keyring: "ws_2".into(),
            items: [("a".to_owned(), "b".to_owned())].into(),
        };
        for format in [Format::Protobuf, Format::Json] {
            assert_eq!(request_keyring(format, &encode(format, &encrypt)), "ws_1/a");
            assert_eq!(request_keyring(format, &encode(format, &bulk)), "ws_2");
            assert_eq!(request_keyring(format, b""), "");
        }
        assert_eq!(request_keyring(Format::Protobuf, b"\x0a\x20truncated"), "");
        assert_eq!(request_keyring(Format::Json, br#"{"keyring":"ws_1""#), "");
        assert_eq!(request_keyring(Format::Json, br#"{"keyring":null}"#), "");
        // A large JSON body is not scanned for it; protobuf skips the payload by its length.
        let large = EncryptRequest {
            keyring: "ws_3".into(),
            data: "x".repeat(REQUEST_KEYRING_JSON_LIMIT),
        };
        assert_eq!(
            request_keyring(Format::Json, &encode(Format::Json, &large)),
            ""
        );
        assert_eq!(
            request_keyring(Format::Protobuf, &encode(Format::Protobuf, &large)),
            "ws_3"
        );
    }

    #[test]
    fn json_null_fields_are_unset_fields() {
        let request: EncryptRequest =
            decode(Format::Json, br#"{"keyring":"ws_1","data":null}"#).unwrap();
        assert_eq!(request.keyring, "ws_1");
        assert_eq!(request.data, "");
        let bulk: crate::protocol::DecryptBulkRequest =
            decode(Format::Json, br#"{"keyring":"ws_1","items":null}"#).unwrap();
        assert!(bulk.items.is_empty());
        // A null item is not an unset field: still an error, and so is a wrong type.
        let null_item = decode::<crate::protocol::DecryptBulkRequest>(
            Format::Json,
            br#"{"keyring":"ws_1","items":{"a":null}}"#,
        );
        assert_eq!(null_item.unwrap_err().kind(), Kind::InvalidArgument);
        let wrong_type = decode::<EncryptRequest>(Format::Json, br#"{"keyring":null,"data":7}"#);
        assert_eq!(wrong_type.unwrap_err().kind(), Kind::InvalidArgument);
    }

    #[test]
    fn json_is_camel_case_out_and_accepts_both_spellings_in() {
        let response = EncryptResponse {
            encrypted: "abc".into(),
            key_id: "dek_1".into(),
        };
        let json = encode(Format::Json, &response);
        assert_eq!(&json[..], br#"{"encrypted":"abc","keyId":"dek_1"}"#);
        let snake: EncryptResponse =
            decode(Format::Json, br#"{"encrypted":"abc","key_id":"dek_1"}"#).unwrap();
        assert_eq!(snake, response);
        let camel: ReEncryptRequest = decode(
            Format::Json,
            br#"{"keyring":"k","keyId":"dek_1","extra":[1]}"#,
        )
        .unwrap();
        assert_eq!(camel.key_id.as_deref(), Some("dek_1"));
    }

    #[test]
    fn empty_fields_are_omitted() {
        let json = encode(Format::Json, &EncryptResponse::default());
        assert_eq!(&json[..], b"{}");
    }

    #[test]
    fn malformed_bodies_are_invalid_argument() {
        let error = decode::<EncryptRequest>(Format::Protobuf, &[0xff, 0xff, 0xff]).unwrap_err();
        assert_eq!(error.kind(), Kind::InvalidArgument);
        assert!(error.message().contains("protobuf"), "{error}");
        let error = decode::<EncryptRequest>(Format::Json, b"{\"data\": \"\xff\"}").unwrap_err();
        assert_eq!(error.kind(), Kind::InvalidArgument);
        assert!(error.message().contains("json"), "{error}");
    }

    proptest::proptest! {
        #[test]
        fn an_encrypt_reply_from_envelope_bytes_is_the_encoded_response(
            envelope in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            key_id in "[a-z_0-9]{0,30}",
        ) {
            let response = EncryptResponse {
                encrypted: crate::protocol::envelope_text(&envelope),
                key_id: key_id.clone(),
            };
            for format in [Format::Protobuf, Format::Json] {
                proptest::prop_assert_eq!(
                    encode_encrypt_response(format, &envelope, &key_id),
                    encode(format, &response)
                );
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn a_decrypt_reply_is_the_encoded_response(plaintext in ".{0,300}") {
            let response = DecryptResponse { plaintext };
            for format in [Format::Protobuf, Format::Json] {
                proptest::prop_assert_eq!(
                    encode_decrypt_response(format, &response),
                    encode(format, &response)
                );
            }
        }
    }

    #[test]
    fn error_messages_quoting_the_caller_are_cut() {
        let long = Error::invalid_argument(format!("item {:?} failed", "é".repeat(100_000)));
        let body = ErrorBody::from_error(&long);
        assert_eq!(body.message.chars().count(), MAX_ERROR_MESSAGE_CHARS + 1);
        assert!(body.message.starts_with("item \"éé"));
        assert!(body.message.ends_with('…'));
        let short = Error::invalid_argument("bad base64");
        assert_eq!(ErrorBody::from_error(&short).message, "bad base64");
    }

    #[test]
    fn content_type_selects_format() {
        assert_eq!(Format::from_content_type(None), Format::Protobuf);
        assert_eq!(
            Format::from_content_type(Some("application/json; charset=utf-8")),
            Format::Json
        );
        assert_eq!(
            Format::from_content_type(Some("application/protobuf")),
            Format::Protobuf
        );
    }
}
