//! The one error type of ringvault: a [`Kind`] that the wire maps to a stable code, and a
//! message that says what was wrong and with which value. Messages never carry key bytes,
//! plaintext, tokens, credentials or storage URLs.

use std::fmt;

/// What went wrong, as a caller can act on it. Each kind has a stable machine code
/// ([`Kind::code`]) and an HTTP-like status ([`Kind::status`]) used by the NATS micro headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The request is malformed or names something invalid.
    InvalidArgument,
    /// No credential was presented.
    AuthenticationRequired,
    /// The credential is malformed, forged, revoked or of an unknown scheme.
    InvalidToken,
    /// The credential was valid once and has expired.
    TokenExpired,
    /// The credential is valid but does not allow this operation on this keyring.
    AccessDenied,
    /// The thing asked for does not exist (for example an unknown key id).
    NotFound,
    /// The payload is larger than the configured maximum.
    PayloadTooLarge,
    /// The workspace exceeded its request rate.
    RateLimited,
    /// A dependency (storage, an actor) is not answering; retrying later may work.
    Unavailable,
    /// A bug or an inconsistency inside ringvault or its store.
    Internal,
}

impl Kind {
    /// Every kind, in a stable order (used by docs and tests).
    pub const ALL: [Kind; 10] = [
        Kind::InvalidArgument,
        Kind::AuthenticationRequired,
        Kind::InvalidToken,
        Kind::TokenExpired,
        Kind::AccessDenied,
        Kind::NotFound,
        Kind::PayloadTooLarge,
        Kind::RateLimited,
        Kind::Unavailable,
        Kind::Internal,
    ];

    /// The stable machine code sent on the wire.
    pub fn code(self) -> &'static str {
        match self {
            Kind::InvalidArgument => "invalid_argument",
            Kind::AuthenticationRequired => "authentication_required",
            Kind::InvalidToken => "invalid_token",
            Kind::TokenExpired => "token_expired",
            Kind::AccessDenied => "access_denied",
            Kind::NotFound => "not_found",
            Kind::PayloadTooLarge => "payload_too_large",
            Kind::RateLimited => "rate_limited",
            Kind::Unavailable => "unavailable",
            Kind::Internal => "internal",
        }
    }

    /// The HTTP-like status of the NATS micro `Nats-Service-Error-Code` header.
    pub fn status(self) -> u16 {
        match self {
            Kind::InvalidArgument => 400,
            Kind::AuthenticationRequired | Kind::InvalidToken | Kind::TokenExpired => 401,
            Kind::AccessDenied => 403,
            Kind::NotFound => 404,
            Kind::PayloadTooLarge => 413,
            Kind::RateLimited => 429,
            Kind::Unavailable => 503,
            Kind::Internal => 500,
        }
    }

    /// The kind of a wire code; unknown codes read as [`Kind::Internal`].
    pub fn from_code(code: &str) -> Kind {
        Kind::from_known_code(code).unwrap_or(Kind::Internal)
    }

    /// The kind of a wire code, or `None` for a code this version does not know (a newer
    /// service's).
    pub fn from_known_code(code: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.code() == code)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// An error with a [`Kind`] and a lowercase message.
///
/// ```
/// use ringvault::{Error, Kind};
/// let error = Error::invalid_argument("keyring \"a//b\" has an empty segment");
/// match error.kind() {
///     Kind::InvalidArgument => {}
///     other => panic!("unexpected {other}"),
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: Kind,
    message: String,
}

/// `Result` with ringvault's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with `message`.
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// What went wrong, for callers to `match` on.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The human-readable message (lowercase, no secrets).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// [`Kind::InvalidArgument`] with `message`.
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(Kind::InvalidArgument, message)
    }

    /// [`Kind::NotFound`] with `message`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Kind::NotFound, message)
    }

    /// [`Kind::Unavailable`] with `message`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(Kind::Unavailable, message)
    }

    /// [`Kind::Internal`] with `message`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Kind::Internal, message)
    }

    /// The same error with `context: ` put in front of its message.
    pub fn context(self, context: impl fmt::Display) -> Self {
        Self {
            kind: self.kind,
            message: format!("{context}: {}", self.message),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.code(), self.message)
    }
}

impl std::error::Error for Error {}

/// The first `max` characters of `text` (all of it when shorter): for quoting what a caller
/// sent, which has no other bound, in messages and records.
pub(crate) fn first_chars(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((cut, _)) => &text[..cut],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_distinct() {
        for kind in Kind::ALL {
            assert_eq!(Kind::from_code(kind.code()), kind);
        }
        let mut codes: Vec<_> = Kind::ALL.iter().map(|kind| kind.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), Kind::ALL.len());
        assert_eq!(Kind::from_code("no_such_code"), Kind::Internal);
        assert_eq!(Kind::from_known_code("no_such_code"), None);
    }

    #[test]
    fn display_shows_code_and_message() {
        let error = Error::not_found("key \"dek_x\" not found").context("keyring \"ws_1\"");
        assert_eq!(
            error.to_string(),
            "not_found: keyring \"ws_1\": key \"dek_x\" not found"
        );
        assert_eq!(error.kind().status(), 404);
    }
}
