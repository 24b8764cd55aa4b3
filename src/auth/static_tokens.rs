//! Static bearer tokens from configuration, held as SHA-256 digests and compared in constant
//! time, so neither the configuration nor timing reveals them.

use subtle::ConstantTimeEq as _;

use super::{token_digest, CredentialSource, Grant, Principal};
use crate::config::StaticTokenConfig;
use crate::error::{Error, Result};

/// One configured token.
#[derive(Clone)]
pub struct StaticToken {
    digest: [u8; 32],
    principal: Principal,
}

impl std::fmt::Debug for StaticToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticToken")
            .field("subject", &self.principal.subject)
            .finish_non_exhaustive()
    }
}

impl StaticToken {
    /// A token known by its value.
    pub fn new(token: &str, principal: Principal) -> Self {
        Self {
            digest: token_digest(token),
            principal,
        }
    }

    /// A token known by the hex SHA-256 of its value.
    pub fn from_sha256(hex_digest: &str, principal: Principal) -> Result<Self> {
        let bytes = hex::decode(hex_digest.trim()).map_err(|_| {
            Error::invalid_argument(format!(
                "sha256 of token for {:?} is not hex",
                principal.subject
            ))
        })?;
        let digest: [u8; 32] = bytes.try_into().map_err(|_| {
            Error::invalid_argument(format!(
                "sha256 of token for {:?} must be 64 hex characters",
                principal.subject
            ))
        })?;
        Ok(Self { digest, principal })
    }

    /// A token from its configuration entry.
    pub fn from_config(entry: &StaticTokenConfig) -> Result<Self> {
        let permissions: Vec<Grant> = super::parse_grants(&entry.permissions)
            .map_err(|error| error.context(format!("token for {:?}", entry.subject)))?;
        if !entry.workspace.is_empty() {
            super::validate_workspace(&entry.workspace)
                .map_err(|error| error.context(format!("token for {:?}", entry.subject)))?;
        }
        let principal = Principal {
            workspace: (!entry.workspace.is_empty()).then(|| entry.workspace.clone()),
            subject: entry.subject.clone(),
            source: CredentialSource::StaticToken,
            permissions,
        };
        if entry.token.is_empty() {
            Self::from_sha256(&entry.sha256, principal)
        } else {
            Ok(Self::new(&entry.token, principal))
        }
    }
}

/// The configured static tokens.
#[derive(Debug, Clone, Default)]
pub struct StaticTokens {
    tokens: Vec<StaticToken>,
}

impl StaticTokens {
    /// A set of tokens.
    pub fn new(tokens: Vec<StaticToken>) -> Self {
        Self { tokens }
    }

    /// How many tokens are configured.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether none are configured.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The principal of `token`, comparing against every entry without an early exit.
    pub fn verify(&self, token: &str) -> Option<Principal> {
        let digest = token_digest(token);
        let mut found = None;
        for candidate in &self.tokens {
            if bool::from(candidate.digest.ct_eq(&digest)) {
                found = Some(&candidate.principal);
            }
        }
        found.cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(subject: &str) -> Principal {
        Principal {
            workspace: None,
            subject: subject.into(),
            source: CredentialSource::StaticToken,
            permissions: vec!["encrypt".parse().unwrap()],
        }
    }

    #[test]
    fn by_value_and_by_digest() {
        let digest = hex::encode(token_digest("t2"));
        let tokens = StaticTokens::new(vec![
            StaticToken::new("t1", principal("one")),
            StaticToken::from_sha256(&digest, principal("two")).unwrap(),
        ]);
        assert_eq!(tokens.verify("t1").unwrap().subject, "one");
        assert_eq!(tokens.verify("t2").unwrap().subject, "two");
        assert!(tokens.verify("t3").is_none());
        assert!(StaticToken::from_sha256("abc", principal("x")).is_err());
    }

    /// A token bound to a workspace no keyring could have would reach nothing: refused at
    /// start instead of failing every request.
    #[test]
    fn a_token_bound_to_an_impossible_workspace_is_refused() {
        let entry = |workspace: &str| StaticTokenConfig {
            token: "t1".to_owned(),
            sha256: String::new(),
            subject: "svc".to_owned(),
            workspace: workspace.to_owned(),
            permissions: vec!["encrypt".to_owned()],
        };
        for workspace in ["ws_*", "ws_42/", "ws 42"] {
            let error = StaticToken::from_config(&entry(workspace)).unwrap_err();
            assert!(error.message().contains("workspace"), "{error}");
        }
        assert!(StaticToken::from_config(&entry("ws_42/team")).is_ok());
        assert!(StaticToken::from_config(&entry("")).is_ok());
    }
}
