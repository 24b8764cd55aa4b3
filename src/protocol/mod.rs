//! The wire contract, with no I/O: `vault.v1` messages, the base64 envelope, the protobuf/JSON
//! codec, subjects, header names and the error body.

mod codec;
mod envelope;
mod events;
pub(crate) mod fields;
mod messages;

pub use codec::{
    borrow_keyring_and_text, decode, encode, encode_decrypt_response, encode_encrypt_response,
    request_keyring, ErrorBody, Format, MAX_ERROR_MESSAGE_CHARS,
};
pub(crate) use envelope::tolerant_decode;
pub use envelope::{
    append_envelope_text, decode_envelope, encode_envelope, envelope_text, envelope_text_len,
};
pub use events::{
    event_subject, keyring_from_token, keyring_token, store_event_subject, DekCause, DekCreated,
    KekRolled, DEK_CREATED, EVENT_VERSION, KEK_ROLLED, MSG_ID, STORE_WIDE_TOKEN,
};
pub use messages::*;

/// The default subject prefix of the service.
pub const DEFAULT_PREFIX: &str = "vault.v1";
/// The default NATS queue group, so that replicas share the load.
pub const QUEUE_GROUP: &str = "ringvault";

/// Header carrying `Bearer <token>`.
pub const AUTHORIZATION: &str = "Authorization";
/// Header carrying the request id (generated when absent, echoed on the reply).
pub const REQUEST_ID: &str = "X-Request-ID";
/// Header selecting protobuf JSON (`application/json`) instead of protobuf.
pub const CONTENT_TYPE: &str = "Content-Type";
/// The `Content-Type` value of protobuf JSON.
pub const JSON_CONTENT_TYPE: &str = "application/json";
/// [`REQUEST_ID`] as a NATS header name, built once: a name made from `&str` is validated and
/// allocated each time it is used, and every reply carries this one.
pub const REQUEST_ID_HEADER: async_nats::HeaderName =
    async_nats::HeaderName::from_static(REQUEST_ID);
/// [`CONTENT_TYPE`] as a NATS header name, built once (see [`REQUEST_ID_HEADER`]).
pub const CONTENT_TYPE_HEADER: async_nats::HeaderName =
    async_nats::HeaderName::from_static(CONTENT_TYPE);
/// NATS micro error description header.
pub const SERVICE_ERROR: &str = "Nats-Service-Error";
/// NATS micro error status header (HTTP-like code).
pub const SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";

/// The RPC methods of the service; the subject of each is `<prefix>.<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// Health probe; needs no token.
    Liveness,
    /// Seal a plaintext with the keyring's current DEK.
    Encrypt,
    /// Open an envelope.
    Decrypt,
    /// Open an envelope and seal it again with the keyring's current DEK.
    ReEncrypt,
    /// Encrypt many items, all or nothing.
    EncryptBulk,
    /// Decrypt many items, all or nothing.
    DecryptBulk,
    /// Make a new DEK the keyring's LATEST (ringvault's addition).
    RotateKeyring,
    /// List a keyring's key ids and creation times (ringvault's addition).
    DescribeKeyring,
}

impl Method {
    /// Every method, in the order the service registers them.
    pub const ALL: [Method; 8] = [
        Method::Liveness,
        Method::Encrypt,
        Method::Decrypt,
        Method::ReEncrypt,
        Method::EncryptBulk,
        Method::DecryptBulk,
        Method::RotateKeyring,
        Method::DescribeKeyring,
    ];

    /// The method's name, the last token of its subject.
    pub fn name(self) -> &'static str {
        match self {
            Method::Liveness => "Liveness",
            Method::Encrypt => "Encrypt",
            Method::Decrypt => "Decrypt",
            Method::ReEncrypt => "ReEncrypt",
            Method::EncryptBulk => "EncryptBulk",
            Method::DecryptBulk => "DecryptBulk",
            Method::RotateKeyring => "RotateKeyring",
            Method::DescribeKeyring => "DescribeKeyring",
        }
    }

    /// The subject of this method under `prefix`.
    pub fn subject(self, prefix: &str) -> String {
        format!("{prefix}.{}", self.name())
    }
}
