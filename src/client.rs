//! A typed async client of the `vault.v1` NATS API.
//!
//! Every request carries a fresh `X-Request-ID`, the `Authorization: Bearer <token>` header when a
//! token is configured (never on `Liveness`), and `Content-Type: application/json` when the client
//! speaks JSON. Error replies come back as [`Error`] with the service's [`Kind`], so callers can
//! `match e.kind()`. A request that finds no responder is retried with a doubling backoff
//! (50 ms, 100 ms, 200 ms, …) up to [`ClientOptions::retries`] times; after that, and on a
//! timeout, the error is [`Kind::Unavailable`].
//!
//! ```no_run
//! use ringvault::client::{Client, ClientOptions};
//! use ringvault::Kind;
//!
//! # async fn example() -> ringvault::Result<()> {
//! let options = ClientOptions {
//!     token: Some("my-token".into()),
//!     ..ClientOptions::default()
//! };
//! let client = Client::connect("nats://127.0.0.1:4222", options).await?;
//! let sealed = client.encrypt("workspace_1", "hello").await?;
//! let opened = client.decrypt("workspace_1", &sealed.encrypted).await?;
//! assert_eq!(opened.plaintext, "hello");
//! match client.with_token(None).encrypt("workspace_1", "x").await {
//!     Err(error) if error.kind() == Kind::AuthenticationRequired => {}
//!     other => panic!("unexpected {other:?}"),
//! }
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use async_nats::HeaderMap;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Kind, Result};
use crate::protocol::{
    self, DecryptBulkRequest, DecryptBulkResponse, DecryptRequest, DecryptResponse,
    EncryptBulkRequest, EncryptBulkResponse, EncryptRequest, EncryptResponse, ErrorBody, Format,
    LivenessRequest, LivenessResponse, Method, ReEncryptRequest, ReEncryptResponse,
    RotateKeyringRequest, RotateKeyringResponse,
};

/// The first backoff after a request found no responder; it doubles on every retry.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);

/// How a [`Client`] talks to the service. `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// Subject prefix of the service (default [`protocol::DEFAULT_PREFIX`]).
    pub prefix: String,
    /// Bearer token sent in `Authorization` (none by default).
    pub token: Option<String>,
    /// How long to wait for one reply (default 5 s).
    pub timeout: Duration,
    /// How many times to retry a request that found no responder (default 3).
    pub retries: u32,
    /// Body format of requests and replies (default protobuf).
    pub format: Format,
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("prefix", &self.prefix)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("format", &self.format)
            .finish()
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            prefix: protocol::DEFAULT_PREFIX.to_owned(),
            token: None,
            timeout: Duration::from_secs(5),
            retries: 3,
            format: Format::Protobuf,
        }
    }
}

/// A typed client of the `vault.v1` API over one NATS connection. Cloning is cheap: clones share
/// the connection and the options.
#[derive(Debug, Clone)]
pub struct Client {
    nats: async_nats::Client,
    options: Arc<ClientOptions>,
}

/// A reply as received, before it is read as a success or an error.
#[derive(Debug, Clone, Default)]
pub struct RawReply {
    /// The reply's headers (empty when it had none).
    pub headers: HeaderMap,
    /// The reply's body.
    pub body: Bytes,
}

impl RawReply {
    /// The error this reply carries, if it is an error reply: the kind comes from the JSON body's
    /// `code`, else (no body, or a code this client does not know, as a newer service may send)
    /// from the `Nats-Service-Error-Code` status; the message from the body, else from the
    /// `Nats-Service-Error` header.
    pub fn error(&self) -> Option<Error> {
        let status = self.header(protocol::SERVICE_ERROR_CODE);
        let description = self.header(protocol::SERVICE_ERROR);
        if status.is_none() && description.is_none() {
            return None;
        }
        let status_kind = status
            .and_then(|status| status.trim().parse::<u16>().ok())
            .map(kind_of_status);
        if let Ok(body) = serde_json::from_slice::<ErrorBody>(&self.body) {
            // Unknown codes would all read as internal, a retryable 503 or 429 among them.
            let kind = Kind::from_known_code(&body.code)
                .or(status_kind)
                .unwrap_or(Kind::Internal);
            return Some(Error::new(kind, body.message));
        }
        let kind = status_kind.unwrap_or(Kind::Internal);
        let message = match (description, status) {
            (Some(description), _) if !description.is_empty() => description.to_owned(),
            (_, Some(status)) => format!("service error {status}"),
            _ => "service error without a description".to_owned(),
        };
        Some(Error::new(kind, message))
    }

    /// The `X-Request-ID` the service echoed, if any.
    pub fn request_id(&self) -> Option<String> {
        self.header(protocol::REQUEST_ID).map(str::to_owned)
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|value| value.as_str())
    }
}

/// The kind of an HTTP-like status when an error reply has no readable body.
fn kind_of_status(status: u16) -> Kind {
    match status {
        400 => Kind::InvalidArgument,
        401 => Kind::AuthenticationRequired,
        403 => Kind::AccessDenied,
        404 => Kind::NotFound,
        413 => Kind::PayloadTooLarge,
        429 => Kind::RateLimited,
        503 => Kind::Unavailable,
        _ => Kind::Internal,
    }
}

/// A fresh request id: 16 random bytes in lowercase hex.
pub fn new_request_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// The headers a client with `token` and `format` sends: a fresh `X-Request-ID`,
/// `Authorization: Bearer <token>` when there is a token, and `Content-Type: application/json`
/// for JSON. A token with a line break (a secret file's trailing newline kept) cannot be a
/// header value: [`Kind::InvalidArgument`].
pub fn request_headers(token: Option<&str>, format: Format) -> Result<HeaderMap> {
    let mut headers = HeaderMap::new();
    headers.insert(protocol::REQUEST_ID, new_request_id().as_str());
    if let Some(token) = token {
        let value: async_nats::HeaderValue = format!("Bearer {token}").parse().map_err(|_| {
            Error::invalid_argument(
                "the bearer token contains a line break (a trailing newline from a file?)",
            )
        })?;
        headers.insert(protocol::AUTHORIZATION, value);
    }
    if format == Format::Json {
        headers.insert(protocol::CONTENT_TYPE, protocol::JSON_CONTENT_TYPE);
    }
    Ok(headers)
}

/// Reads a success reply body in `format`; a body that does not decode is [`Kind::Internal`].
fn decode_reply<T>(format: Format, subject: &str, body: &[u8]) -> Result<T>
where
    T: prost::Message + Default + DeserializeOwned,
{
    match format {
        Format::Protobuf => T::decode(body).map_err(|error| {
            Error::internal(format!("malformed protobuf reply from {subject}: {error}"))
        }),
        Format::Json if body.is_empty() => Ok(T::default()),
        Format::Json => serde_json::from_slice(body).map_err(|error| {
            Error::internal(format!("malformed json reply from {subject}: {error}"))
        }),
    }
}

impl Client {
    /// Connects to the NATS server at `url`. An unreachable server is [`Kind::Unavailable`].
    pub async fn connect(url: &str, options: ClientOptions) -> Result<Client> {
        let nats = async_nats::ConnectOptions::new()
            .connection_timeout(options.timeout)
            .request_timeout(Some(options.timeout))
            .connect(url)
            .await
            .map_err(|error| {
                Error::unavailable(format!(
                    "cannot connect to nats at {}: {error}",
                    crate::config::redacted_url(url)
                ))
            })?;
        Ok(Client::new(nats, options))
    }

    /// A client over an existing NATS connection.
    pub fn new(nats: async_nats::Client, options: ClientOptions) -> Client {
        Client {
            nats,
            options: Arc::new(options),
        }
    }

    /// The underlying NATS connection.
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    /// The options of this client.
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// The bearer token this client sends, if any.
    pub fn token(&self) -> Option<&str> {
        self.options.token.as_deref()
    }

    /// A client on the same connection that sends `token` instead.
    pub fn with_token(&self, token: Option<String>) -> Client {
        let options = ClientOptions {
            token,
            ..(*self.options).clone()
        };
        Client::new(self.nats.clone(), options)
    }

    /// The subject of `method` under this client's prefix.
    pub fn subject(&self, method: Method) -> String {
        method.subject(&self.options.prefix)
    }

    /// `Liveness`: the service's health, without a token.
    pub async fn liveness(&self) -> Result<LivenessResponse> {
        self.call(Method::Liveness, &LivenessRequest {}).await
    }

    /// `Encrypt`: seals `data` with the keyring's current DEK.
    pub async fn encrypt(&self, keyring: &str, data: &str) -> Result<EncryptResponse> {
        let request = EncryptRequest {
            keyring: keyring.to_owned(),
            data: data.to_owned(),
        };
        self.call(Method::Encrypt, &request).await
    }

    /// `Decrypt`: opens the base64 envelope `encrypted`.
    pub async fn decrypt(&self, keyring: &str, encrypted: &str) -> Result<DecryptResponse> {
        let request = DecryptRequest {
            keyring: keyring.to_owned(),
            encrypted: encrypted.to_owned(),
        };
        self.call(Method::Decrypt, &request).await
    }

    /// `ReEncrypt`: opens `encrypted` and seals it again with the keyring's current DEK.
    pub async fn reencrypt(&self, keyring: &str, encrypted: &str) -> Result<ReEncryptResponse> {
        let request = ReEncryptRequest {
            keyring: keyring.to_owned(),
            encrypted: encrypted.to_owned(),
            key_id: None,
        };
        self.call(Method::ReEncrypt, &request).await
    }

    /// `EncryptBulk`: seals every item (caller id → plaintext), all or nothing.
    pub async fn encrypt_bulk(
        &self,
        keyring: &str,
        items: HashMap<String, String>,
    ) -> Result<EncryptBulkResponse> {
        let request = EncryptBulkRequest {
            keyring: keyring.to_owned(),
            items,
        };
        self.call(Method::EncryptBulk, &request).await
    }

    /// `DecryptBulk`: opens every item (caller id → base64 envelope), all or nothing.
    pub async fn decrypt_bulk(
        &self,
        keyring: &str,
        items: HashMap<String, String>,
    ) -> Result<DecryptBulkResponse> {
        let request = DecryptBulkRequest {
            keyring: keyring.to_owned(),
            items,
        };
        self.call(Method::DecryptBulk, &request).await
    }

    /// `RotateKeyring`: makes a new DEK the keyring's LATEST.
    pub async fn rotate(&self, keyring: &str) -> Result<RotateKeyringResponse> {
        let request = RotateKeyringRequest {
            keyring: keyring.to_owned(),
        };
        self.call(Method::RotateKeyring, &request).await
    }

    /// Sends `request` to `method` in this client's format and reads the reply: an error reply
    /// becomes its [`Error`], a success reply is decoded as `Resp`.
    pub async fn call<Req, Resp>(&self, method: Method, request: &Req) -> Result<Resp>
    where
        Req: prost::Message + Serialize,
        Resp: prost::Message + Default + DeserializeOwned,
    {
        let format = self.options.format;
        let token = match method {
            Method::Liveness => None,
            _ => self.token(),
        };
        let headers = request_headers(token, format)?;
        let body = protocol::encode(format, request);
        let reply = self.request_raw(method, headers, body).await?;
        if let Some(error) = reply.error() {
            return Err(error);
        }
        decode_reply(format, &self.subject(method), &reply.body)
    }

    /// Sends `body` with exactly `headers` (no header is added) to `method` and returns the reply
    /// as received. Error replies are returned, not turned into errors; see [`RawReply::error`].
    /// No responder (after the retries) and a timeout are [`Kind::Unavailable`].
    pub async fn request_raw(
        &self,
        method: Method,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<RawReply> {
        let subject = self.subject(method);
        let mut backoff = FIRST_BACKOFF;
        let mut attempt: u32 = 0;
        loop {
            let request = async_nats::Request::new()
                .headers(headers.clone())
                .payload(body.clone())
                .timeout(Some(self.options.timeout));
            let error = match self.nats.send_request(subject.clone(), request).await {
                Ok(message) => {
                    return Ok(RawReply {
                        headers: message.headers.unwrap_or_default(),
                        body: message.payload,
                    })
                }
                Err(error) => error,
            };
            match error.kind() {
                RequestErrorKind::NoResponders if attempt < self.options.retries => {
                    attempt += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = backoff.saturating_mul(2);
                }
                RequestErrorKind::NoResponders => {
                    return Err(Error::unavailable(format!(
                        "no ringvault responded on {subject} after {} attempts",
                        attempt + 1
                    )));
                }
                RequestErrorKind::TimedOut => {
                    return Err(Error::unavailable(format!(
                        "request to {subject} timed out after {:?}",
                        self.options.timeout
                    )));
                }
                RequestErrorKind::MaxPayloadExceeded => {
                    return Err(Error::new(
                        Kind::PayloadTooLarge,
                        format!(
                            "request to {subject} is larger than the nats max payload: {error}"
                        ),
                    ));
                }
                RequestErrorKind::InvalidSubject => {
                    return Err(Error::invalid_argument(format!(
                        "invalid subject {subject:?}: {error}"
                    )));
                }
                _ => {
                    return Err(Error::unavailable(format!(
                        "request to {subject} failed: {error}"
                    )));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_headers(status: &str, description: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(protocol::SERVICE_ERROR_CODE, status);
        headers.insert(protocol::SERVICE_ERROR, description);
        headers.insert(protocol::REQUEST_ID, "abc123");
        headers
    }

    #[test]
    fn error_comes_from_the_json_body_code() {
        let reply = RawReply {
            headers: error_headers("401", "token is forged"),
            body: Bytes::from_static(br#"{"code":"invalid_token","message":"token is forged"}"#),
        };
        let error = reply.error().expect("an error reply");
        assert_eq!(error.kind(), Kind::InvalidToken);
        assert_eq!(error.message(), "token is forged");
        assert_eq!(reply.request_id().as_deref(), Some("abc123"));
    }

    #[test]
    fn error_falls_back_to_the_headers_when_the_body_is_unreadable() {
        let reply = RawReply {
            headers: error_headers("403", "not allowed"),
            body: Bytes::from_static(b"\x08\x01"),
        };
        let error = reply.error().expect("an error reply");
        assert_eq!(error.kind(), Kind::AccessDenied);
        assert_eq!(error.message(), "not allowed");

        let mut headers = HeaderMap::new();
        headers.insert(protocol::SERVICE_ERROR_CODE, "599");
        let reply = RawReply {
            headers,
            body: Bytes::new(),
        };
        let error = reply.error().expect("an error reply");
        assert_eq!(error.kind(), Kind::Internal);
        assert!(error.message().contains("599"), "{error}");
    }

    #[test]
    fn success_replies_carry_no_error() {
        let mut headers = HeaderMap::new();
        headers.insert(protocol::REQUEST_ID, "r1");
        // A success body that happens to look like an error body is still a success.
        let reply = RawReply {
            headers,
            body: Bytes::from_static(br#"{"code":"internal","message":"x"}"#),
        };
        assert!(reply.error().is_none());
        assert_eq!(reply.request_id().as_deref(), Some("r1"));
        assert!(RawReply::default().error().is_none());
        assert!(RawReply::default().request_id().is_none());
    }

    #[test]
    fn unknown_codes_read_by_their_status_else_as_internal() {
        let reply = RawReply {
            headers: error_headers("418", "teapot"),
            body: Bytes::from_static(br#"{"code":"teapot","message":"short and stout"}"#),
        };
        assert_eq!(reply.error().unwrap().kind(), Kind::Internal);
        let reply = RawReply {
            headers: error_headers("503", "draining"),
            body: Bytes::from_static(br#"{"code":"draining","message":"come back later"}"#),
        };
        let error = reply.error().unwrap();
        assert_eq!(error.kind(), Kind::Unavailable);
        assert_eq!(error.message(), "come back later");
    }

    #[tokio::test]
    async fn a_failed_connect_does_not_repeat_the_url_s_password() {
        let options = ClientOptions {
            timeout: Duration::from_secs(2),
            ..ClientOptions::default()
        };
        let error = Client::connect("nats://svc:s3cret@127.0.0.1:1", options)
            .await
            .expect_err("nothing listens on port 1");
        assert_eq!(error.kind(), Kind::Unavailable);
        assert!(!error.message().contains("s3cret"), "{error}");
        assert!(error.message().contains("***@127.0.0.1:1"), "{error}");
    }

    #[test]
    fn a_token_with_a_line_break_is_an_error_not_a_panic() {
        for token in ["t0k\n", "t0k\r\n", "t0\nk"] {
            let error = request_headers(Some(token), Format::Protobuf).unwrap_err();
            assert_eq!(error.kind(), Kind::InvalidArgument, "{token:?}");
            assert!(!error.message().contains("t0"), "the token is not quoted");
        }
    }

    #[test]
    fn json_format_sets_content_type_and_protobuf_does_not() {
        let json = request_headers(Some("t0k"), Format::Json).unwrap();
        assert_eq!(
            json.get(protocol::CONTENT_TYPE).map(|v| v.as_str()),
            Some(protocol::JSON_CONTENT_TYPE)
        );
        assert_eq!(
            json.get(protocol::AUTHORIZATION).map(|v| v.as_str()),
            Some("Bearer t0k")
        );
        let protobuf = request_headers(None, Format::Protobuf).unwrap();
        assert!(protobuf.get(protocol::CONTENT_TYPE).is_none());
        assert!(protobuf.get(protocol::AUTHORIZATION).is_none());
        let request_id = protobuf.get(protocol::REQUEST_ID).unwrap().as_str();
        assert_eq!(request_id.len(), 32);
        assert!(request_id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(request_id, json.get(protocol::REQUEST_ID).unwrap().as_str());
    }

    #[test]
    fn replies_decode_in_the_requested_format() {
        let response = EncryptResponse {
            encrypted: "abc".into(),
            key_id: "dek_1".into(),
        };
        let protobuf = protocol::encode(Format::Protobuf, &response);
        let json = protocol::encode(Format::Json, &response);
        assert_eq!(&json[..], br#"{"encrypted":"abc","keyId":"dek_1"}"#);
        let decoded: EncryptResponse =
            decode_reply(Format::Protobuf, "vault.v1.Encrypt", &protobuf).unwrap();
        assert_eq!(decoded, response);
        let decoded: EncryptResponse =
            decode_reply(Format::Json, "vault.v1.Encrypt", &json).unwrap();
        assert_eq!(decoded, response);
        // JSON bytes are not a valid protobuf message here, and vice versa: both are internal.
        let error = decode_reply::<EncryptResponse>(Format::Json, "vault.v1.Encrypt", &protobuf)
            .unwrap_err();
        assert_eq!(error.kind(), Kind::Internal);
        assert!(error.message().contains("json"), "{error}");
        let error = decode_reply::<EncryptResponse>(Format::Protobuf, "vault.v1.Encrypt", b"\xff")
            .unwrap_err();
        assert_eq!(error.kind(), Kind::Internal);
        assert!(error.message().contains("vault.v1.Encrypt"), "{error}");
    }

    #[test]
    fn default_options() {
        let options = ClientOptions::default();
        assert_eq!(options.prefix, "vault.v1");
        assert_eq!(options.timeout, Duration::from_secs(5));
        assert_eq!(options.retries, 3);
        assert_eq!(options.format, Format::Protobuf);
        assert!(options.token.is_none());
        let with_token = ClientOptions {
            token: Some("s3cret".into()),
            ..options
        };
        let debug = format!("{with_token:?}");
        assert!(
            !debug.contains("s3cret") && debug.contains("redacted"),
            "{debug}"
        );
    }
}
