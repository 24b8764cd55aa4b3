//! Credentials → [`Principal`]: parsing the `Authorization` header, verifying bearer tokens
//! against the configured sources (static tokens, HS256 [`SignedTokens`], identity-provider
//! JWTs through [`JwtVerifier`]), [`Revocations`], [`Policies`], the permission model handlers
//! ask, and the [`RateLimiter`] and [`AuditRecord`] the gateway uses after authentication.
//!
//! Tokens never reach logs: [`fingerprint`] is the first 8 hex characters of their SHA-256.

mod audit;
mod claims;
mod jwks;
mod policy;
mod principal;
mod rate_limit;
mod revocation;
mod signed;
mod static_tokens;

pub use audit::{AuditRecord, Outcome};
pub use claims::{looks_like_jwt, Claims};
pub use jwks::{JwksSource, JwtVerifier, KeySet};
pub use policy::{intersect, Policies, Policy};
pub use principal::{
    in_workspace, parse_grants, validate_workspace, Action, CredentialSource, Grant, Principal,
};
pub use rate_limit::RateLimiter;
pub use revocation::{
    announce_revocations, load_revocations, revocation_digest, revocation_subject, revocations_for,
    revoke, store_revocations, Loaded, Revocation, RevocationKind, Revocations, REVOCATIONS_PREFIX,
};
pub use signed::{SignedTokens, MIN_SECRET_BYTES};
pub use static_tokens::{StaticToken, StaticTokens};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use crate::config::Config;
use crate::error::{Error, Kind, Result};

/// How long the AuthActor's start waits for the revocation subscription and the first load.
const REVOCATIONS_READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the AuthActor's start waits for the first JWKS fetch.
const JWKS_FIRST_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The SHA-256 of a token: the key of the verified-token cache and of `sha256 =` entries.
pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// What logs show of a token: the first 8 hex characters of its SHA-256.
pub fn fingerprint(token: &str) -> String {
    hex::encode(&token_digest(token)[..4])
}

/// The bearer token of an `Authorization` header value: a missing or empty header is
/// `authentication_required`; another scheme or an empty token is `invalid_token`.
pub fn bearer_token(header: Option<&str>) -> Result<&str> {
    // An empty header is no credential at all, as a missing one is.
    let Some(value) = header.map(str::trim).filter(|value| !value.is_empty()) else {
        return Err(Error::new(
            Kind::AuthenticationRequired,
            "missing Authorization header; send \"Authorization: Bearer <token>\"",
        ));
    };
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

/// A verified credential: the principal, until when the verification holds, and the
/// revocation generation it was checked against (what the verified-token cache keeps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Who it is and what it may do (policies applied).
    pub principal: Principal,
    /// Seconds since the Unix epoch after which the credential no longer verifies (`exp` plus
    /// the leeway); `None` for static tokens.
    pub valid_until: Option<u64>,
    /// [`Revocations::generation`] before the check.
    pub revocation_generation: u64,
}

/// Background work of an [`Authenticator`] (JWKS refresh, revocation sync), started once by
/// the AuthActor and aborted when the last clone of the authenticator is dropped.
#[derive(Default)]
struct Background {
    sync: Option<Arc<Config>>,
    started: tokio::sync::OnceCell<()>,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Background {
    fn track(&self, task: tokio::task::JoinHandle<()>) {
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.push(task.abort_handle());
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Ok(tasks) = self.tasks.get_mut() {
            for task in tasks.drain(..) {
                task.abort();
            }
        }
    }
}

/// Every credential source of this process, in order: static tokens, signed tokens (HS256),
/// identity-provider JWTs (RS256, ES256, EdDSA against a JWKS); then revocations and policies.
/// Verification is pure and synchronous; clones share the JWKS keys, the revocation set and
/// the background tasks. The AuthActor owns one and the gateway caches what it returns.
#[derive(Clone, Default)]
pub struct Authenticator {
    static_tokens: StaticTokens,
    signed: Option<SignedTokens>,
    jwt: Option<JwtVerifier>,
    policies: Arc<Policies>,
    revocations: Arc<Revocations>,
    background: Arc<Background>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("static_tokens", &self.static_tokens.len())
            .field("signed", &self.signed)
            .field("jwt", &self.jwt)
            .field("policies", &self.policies.len())
            .field("revocations", &self.revocations.len())
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// An authenticator over static tokens.
    pub fn new(static_tokens: StaticTokens) -> Self {
        Self {
            static_tokens,
            ..Self::default()
        }
    }

    /// Also accepts signed (HS256) tokens.
    pub fn with_signed_tokens(mut self, signed: SignedTokens) -> Self {
        self.signed = Some(signed);
        self
    }

    /// Also accepts identity-provider JWTs.
    pub fn with_jwt(mut self, jwt: JwtVerifier) -> Self {
        self.jwt = Some(jwt);
        self
    }

    /// Limits every principal by `policies`.
    pub fn with_policies(mut self, policies: Policies) -> Self {
        self.policies = Arc::new(policies);
        self
    }

    /// The policies every principal is limited by (for a principal acting for another
    /// workspace, which that workspace's policies limit too).
    pub fn policies(&self) -> Arc<Policies> {
        self.policies.clone()
    }

    /// Keeps the revocation set in sync with the store and NATS of `config` once
    /// [`Authenticator::start_background`] runs.
    /// Until the stored revocations are first read every token is refused as `unavailable`.
    pub fn with_revocation_sync(mut self, config: Config) -> Self {
        self.revocations = Arc::new(Revocations::until_loaded());
        self.background = Arc::new(Background {
            sync: Some(Arc::new(config)),
            started: tokio::sync::OnceCell::new(),
            tasks: Mutex::new(Vec::new()),
        });
        self
    }

    /// The signed-token issuer and verifier, when signing secrets are configured.
    pub fn signed_tokens(&self) -> Option<&SignedTokens> {
        self.signed.as_ref()
    }

    /// The identity-provider verifier, when a JWKS is configured.
    pub fn jwt(&self) -> Option<&JwtVerifier> {
        self.jwt.as_ref()
    }

    /// The revocations this process knows (shared by every clone).
    pub fn revocations(&self) -> &Arc<Revocations> {
        &self.revocations
    }

    /// Starts the background work once per authenticator (later calls, from clones too, do
    /// nothing): the first JWKS fetch and its periodic refresh, and the revocation sync. Waits
    /// (bounded) for the first JWKS fetch and for the revocation subscription, so that a
    /// started service already refuses stored revocations.
    pub async fn start_background(&self) {
        self.background
            .started
            .get_or_init(|| async {
                if let Some(jwt) = &self.jwt {
                    if matches!(jwt.source(), JwksSource::Url(_)) {
                        match tokio::time::timeout(JWKS_FIRST_FETCH_TIMEOUT, jwt.refresh()).await {
                            Ok(Ok(count)) => {
                                tracing::info!(source = %jwt.source(), keys = count, "jwks loaded")
                            }
                            Ok(Err(error)) => tracing::error!(
                                source = %jwt.source(),
                                %error,
                                "jwks not loaded; identity-provider tokens are refused until a refresh succeeds"
                            ),
                            Err(_) => tracing::error!(
                                source = %jwt.source(),
                                "jwks fetch timed out; identity-provider tokens are refused until a refresh succeeds"
                            ),
                        }
                    }
                    let revocations = self.revocations.clone();
                    self.background.track(tokio::spawn(
                        jwt.clone()
                            .refresh_forever(move || revocations.invalidate_verified()),
                    ));
                }
                if let Some(config) = &self.background.sync {
                    let (ready, is_ready) = tokio::sync::oneshot::channel();
                    self.background.track(tokio::spawn(revocation::sync_forever(
                        config.clone(),
                        self.revocations.clone(),
                        ready,
                    )));
                    if tokio::time::timeout(REVOCATIONS_READY_TIMEOUT, is_ready)
                        .await
                        .is_err()
                    {
                        tracing::warn!(
                            "revocation subscription not ready yet; continuing to try in the background"
                        );
                    }
                }
            })
            .await;
    }

    /// The principal a bearer token stands for, or `invalid_token` / `token_expired`.
    pub fn verify(&self, token: &str) -> Result<Principal> {
        self.verify_detailed(token)
            .map(|verified| verified.principal)
    }

    /// [`Authenticator::verify`] with what a cache needs to know about the answer.
    pub fn verify_detailed(&self, token: &str) -> Result<Verified> {
        let revocation_generation = self.revocations.generation();
        let (principal, valid_until, jti) =
            if let Some(principal) = self.static_tokens.verify(token) {
                (principal, None, None)
            } else if looks_like_jwt(token) {
                let header = claims::peek_header(token)?;
                let (claims, source, leeway) = match header.alg.as_str() {
                    "HS256" => {
                        let signed = self.signed.as_ref().ok_or_else(|| {
                            Error::new(Kind::InvalidToken, "signed tokens are not enabled")
                        })?;
                        (
                            signed.verify(token)?,
                            CredentialSource::SignedToken,
                            signed.leeway(),
                        )
                    }
                    "RS256" | "ES256" | "EdDSA" => {
                        let jwt = self.jwt.as_ref().ok_or_else(|| {
                            Error::new(
                                Kind::InvalidToken,
                                "identity-provider tokens are not enabled",
                            )
                        })?;
                        (jwt.verify(token)?, CredentialSource::Jwt, jwt.leeway())
                    }
                    other => {
                        let shown: String = other.chars().take(16).collect();
                        return Err(Error::new(
                            Kind::InvalidToken,
                            format!("token algorithm {shown:?} is not accepted"),
                        ));
                    }
                };
                let principal = Principal {
                    permissions: claims.grants(),
                    workspace: claims.workspace,
                    subject: claims.sub,
                    source,
                };
                (
                    principal,
                    Some(claims.exp.saturating_add(leeway.as_secs())),
                    claims.jti,
                )
            } else {
                return Err(Error::new(
                    Kind::InvalidToken,
                    format!("token {} is not valid", fingerprint(token)),
                ));
            };
        self.revocations.refuse_if_revoked(token, jti.as_deref())?;
        Ok(Verified {
            principal: self.policies.apply(principal),
            valid_until,
            revocation_generation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        for missing in [None, Some(""), Some("  ")] {
            assert_eq!(
                bearer_token(missing).unwrap_err().kind(),
                Kind::AuthenticationRequired,
                "{missing:?}"
            );
        }
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
