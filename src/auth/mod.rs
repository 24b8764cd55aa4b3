//! Credentials → [`Principal`]: parsing the `Authorization` header, verifying bearer tokens
//! against the configured sources, and the permission model handlers ask.
//!
//! Tokens never reach logs: [`fingerprint`] is the first 8 hex characters of their SHA-256.

mod principal;
mod static_tokens;

pub use principal::{in_workspace, parse_grants, Action, CredentialSource, Grant, Principal};
pub use static_tokens::{StaticToken, StaticTokens};

use sha2::{Digest as _, Sha256};

use crate::error::{Error, Kind, Result};

/// The SHA-256 of a token: the key of the verified-token cache and of `sha256 =` entries.
pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// What logs show of a token: the first 8 hex characters of its SHA-256.
pub fn fingerprint(token: &str) -> String {
    hex::encode(&token_digest(token)[..4])
}

/// The bearer token of an `Authorization` header value: a missing header is
/// `authentication_required`; another scheme or an empty token is `invalid_token`.
pub fn bearer_token(header: Option<&str>) -> Result<&str> {
    let Some(value) = header else {
        return Err(Error::new(
            Kind::AuthenticationRequired,
            "missing Authorization header; send \"Authorization: Bearer <token>\"",
        ));
    };
    let value = value.trim();
    let Some((scheme, token)) = value.split_once(' ') else {
        return Err(Error::new(
            Kind::InvalidToken,
            "Authorization header must be \"Bearer <token>\"",
        ));
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Error::new(
            Kind::InvalidToken,
            "unsupported Authorization scheme; use Bearer",
        ));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(Error::new(Kind::InvalidToken, "bearer token is empty"));
    }
    Ok(token)
}

/// Every credential source of this process, in order. Verification is pure: the AuthActor owns
/// an `Authenticator` and the gateway caches what it returns.
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    static_tokens: StaticTokens,
}

impl Authenticator {
    /// An authenticator over static tokens.
    pub fn new(static_tokens: StaticTokens) -> Self {
        Self { static_tokens }
    }

    /// The principal a bearer token stands for, or `invalid_token`.
    pub fn verify(&self, token: &str) -> Result<Principal> {
        if let Some(principal) = self.static_tokens.verify(token) {
            return Ok(principal);
        }
        Err(Error::new(
            Kind::InvalidToken,
            format!("token {} is not valid", fingerprint(token)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        assert_eq!(
            bearer_token(None).unwrap_err().kind(),
            Kind::AuthenticationRequired
        );
        assert_eq!(
            bearer_token(Some("Basic abc")).unwrap_err().kind(),
            Kind::InvalidToken
        );
        assert_eq!(
            bearer_token(Some("Bearer ")).unwrap_err().kind(),
            Kind::InvalidToken
        );
        assert_eq!(bearer_token(Some("Bearer abc")).unwrap(), "abc");
        assert_eq!(bearer_token(Some("bearer  abc ")).unwrap(), "abc");
    }

    #[test]
    fn fingerprint_is_short_and_not_the_token() {
        let print = fingerprint("super-secret-token");
        assert_eq!(print.len(), 8);
        assert!(!"super-secret-token".contains(&print));
    }
}
