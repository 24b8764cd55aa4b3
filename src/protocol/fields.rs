//! Protobuf fields written by hand, for the bodies built without an intermediate message (the
//! sealed envelope, the Encrypt and Decrypt replies). Each writes what prost writes for the same
//! field; the property tests of those bodies compare them with prost byte for byte.

use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};

/// The encoded size of a length-delimited field of `len` bytes.
pub(crate) fn length_delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// The key and the length of a length-delimited field, for the caller to append its `len` bytes.
pub(crate) fn put_length_delimited_header(tag: u32, len: usize, out: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(len as u64, out);
}

/// A `string` or `bytes` field, left out when empty as proto3 does. Large values are appended in
/// pieces ([`crate::buffer::extend_from_slice`]).
pub(crate) fn put_bytes_field(tag: u32, value: &[u8], out: &mut Vec<u8>) {
    if value.is_empty() {
        return;
    }
    put_length_delimited_header(tag, value.len(), out);
    crate::buffer::extend_from_slice(out, value);
}

/// The encoded size of an `int64` field, 0 when it is left out.
pub(crate) fn int64_len(tag: u32, value: i64) -> usize {
    if value == 0 {
        return 0;
    }
    key_len(tag) + encoded_len_varint(value as u64)
}

/// An `int64` field, left out when 0; negative values take ten bytes (two's complement), as in
/// prost.
pub(crate) fn put_int64_field(tag: u32, value: i64, out: &mut Vec<u8>) {
    if value == 0 {
        return;
    }
    encode_key(tag, WireType::Varint, out);
    encode_varint(value as u64, out);
}
