//! The envelope callers keep: standard base64, with padding, of the protobuf bytes of
//! [`Encrypted`]. Decoding is as tolerant as Go's standard decoder, which issued the envelopes
//! already in the wild: CR and LF are skipped, and non-zero trailing bits are accepted.
//!
//! Envelopes are on every Encrypt and Decrypt, so encoding and the common decode (canonical,
//! padded base64) use SIMD (`base64-simd`, 5–10× the `base64` crate here); anything the strict
//! SIMD decoder refuses goes to the tolerant decoder, which accepts a superset and decodes what
//! both accept to the same bytes.

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use prost::Message as _;

use super::Encrypted;
use crate::error::{Error, Result};

const TOLERANT_DECODER: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The base64 string of `encrypted`.
pub fn encode_envelope(encrypted: &Encrypted) -> String {
    envelope_text(&encrypted.encode_to_vec())
}

/// The envelope of an [`Encrypted`] already in protobuf bytes (what
/// [`crate::crypto::Dek::seal_envelope`] returns).
pub fn envelope_text(protobuf: &[u8]) -> String {
    base64_simd::STANDARD.encode_to_string(protobuf)
}

/// The length of the envelope of `protobuf_len` protobuf bytes.
pub fn envelope_text_len(protobuf_len: usize) -> usize {
    base64_simd::STANDARD.encoded_length(protobuf_len)
}

/// Appends the envelope of protobuf bytes to `out`: a reply body can take it in place, with no
/// intermediate string.
pub fn append_envelope_text(protobuf: &[u8], out: &mut Vec<u8>) {
    base64_simd::STANDARD.encode_append(protobuf, out);
}

/// The [`Encrypted`] inside a base64 envelope.
///
/// ```
/// use ringvault::protocol::{decode_envelope, encode_envelope, Encrypted};
/// let encrypted = Encrypted { nonce: vec![1; 12], ciphertext: vec![2; 16],
///     encryption_key_id: "dek_1".into(), time: 1, ..Default::default() };
/// let text = encode_envelope(&encrypted);
/// assert_eq!(decode_envelope(&text).unwrap(), encrypted);
/// assert!(decode_envelope("not base64!").is_err());
/// ```
pub fn decode_envelope(text: &str) -> Result<Encrypted> {
    if text.is_empty() {
        return Err(Error::invalid_argument("encrypted is empty"));
    }
    let bytes = match base64_simd::STANDARD.decode_to_vec(text) {
        Ok(bytes) => bytes,
        Err(_) => tolerant_decode(text).map_err(|error| {
            Error::invalid_argument(format!("encrypted is not valid base64: {error}"))
        })?,
    };
    // From `Bytes`, not a slice: prost takes each bytes field out of a slice as a copy and then
    // copies that into the field's vector, twice the ciphertext per Decrypt; out of `Bytes` the
    // first step only shares the buffer.
    Encrypted::decode(bytes::Bytes::from(bytes)).map_err(|error| {
        Error::invalid_argument(format!("encrypted is not a vault.v1 envelope: {error}"))
    })
}

/// Go's `base64.StdEncoding` leniency (CR and LF skipped, non-zero trailing bits accepted), and
/// missing padding accepted too.
pub(crate) fn tolerant_decode(text: &str) -> std::result::Result<Vec<u8>, base64::DecodeError> {
    if text.contains(['\r', '\n']) {
        let cleaned: String = text.chars().filter(|c| !matches!(c, '\r' | '\n')).collect();
        TOLERANT_DECODER.decode(cleaned)
    } else {
        TOLERANT_DECODER.decode(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn simd_encoding_is_the_standard_encoding(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let simd = base64_simd::STANDARD.encode_to_string(&bytes);
            prop_assert_eq!(&simd, &base64::engine::general_purpose::STANDARD.encode(&bytes));
        }

        #[test]
        fn the_fast_decode_agrees_with_the_tolerant_one(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            edits in proptest::collection::vec(
                (any::<prop::sample::Index>(), prop::sample::select(&b"A/+=\r\n"[..])),
                0..3,
            ),
        ) {
            // Canonical encodings, some of them altered: whatever the strict SIMD decoder
            // accepts, the tolerant one accepts as the same bytes.
            let mut text = base64::engine::general_purpose::STANDARD.encode(&bytes).into_bytes();
            for (at, byte) in edits {
                if !text.is_empty() {
                    let at = at.index(text.len());
                    text[at] = byte;
                }
            }
            let text = String::from_utf8(text).unwrap();
            if let Ok(fast) = base64_simd::STANDARD.decode_to_vec(&text) {
                prop_assert_eq!(Ok(fast), tolerant_decode(&text));
            }
        }
    }

    fn sample() -> Encrypted {
        Encrypted {
            nonce: vec![7; 12],
            ciphertext: vec![9; 21],
            encryption_key_id: "dek_abc".into(),
            time: 1_700_000_000_003,
            ..Default::default()
        }
    }

    #[test]
    fn output_is_standard_padded_base64() {
        let text = encode_envelope(&sample());
        assert!(text.ends_with('='), "{text}");
        assert!(!text.contains(['-', '_']));
    }

    #[test]
    fn tolerates_line_breaks_and_trailing_bits() {
        let text = encode_envelope(&sample());
        let folded = format!("{}\r\n{}\n", &text[..10], &text[10..]);
        assert_eq!(decode_envelope(&folded).unwrap(), sample());
        // The vector from the spec ends in `=`: flip the last data character's unused bits.
        let vector =
            "EgwCAgICAgICAgICAgIaFQVrWddDKJXEx3VtC+wQWZYT4astTSINZGVrX1RFU1RERUswMSiD0JX/vDE=";
        let with_trailing_bits = vector.replace("vDE=", "vDF=");
        assert_eq!(
            decode_envelope(vector).unwrap(),
            decode_envelope(&with_trailing_bits).unwrap()
        );
    }

    #[test]
    fn rejects_garbage_with_clear_errors() {
        let error = decode_envelope("%%%").unwrap_err();
        assert!(error.message().contains("base64"), "{error}");
        let error = decode_envelope("").unwrap_err();
        assert!(error.message().contains("empty"), "{error}");
        // Valid base64 of bytes that are not a protobuf message.
        let error = decode_envelope("//////8=").unwrap_err();
        assert!(error.message().contains("envelope"), "{error}");
    }
}
