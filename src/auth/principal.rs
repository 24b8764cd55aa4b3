//! Who is asking and what they may do: [`Principal`], [`Action`], [`Grant`].

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Kind, Result};

/// An operation a principal may be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Encrypt and EncryptBulk.
    Encrypt,
    /// Decrypt and DecryptBulk.
    Decrypt,
    /// ReEncrypt.
    ReEncrypt,
    /// RotateKeyring.
    Rotate,
    /// Everything, and acting for another workspace.
    Admin,
}

impl Action {
    /// The permission name.
    pub fn name(self) -> &'static str {
        match self {
            Action::Encrypt => "encrypt",
            Action::Decrypt => "decrypt",
            Action::ReEncrypt => "reencrypt",
            Action::Rotate => "rotate",
            Action::Admin => "admin",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Action {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        match text {
            "encrypt" => Ok(Action::Encrypt),
            "decrypt" => Ok(Action::Decrypt),
            "reencrypt" => Ok(Action::ReEncrypt),
            "rotate" => Ok(Action::Rotate),
            "admin" => Ok(Action::Admin),
            other => Err(Error::invalid_argument(format!(
                "unknown permission {other:?}; expected encrypt, decrypt, reencrypt, rotate or admin"
            ))),
        }
    }
}

/// One permission: an action, optionally limited to keyrings matching a pattern where `*`
/// matches any run of characters (`decrypt:ws_42/*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The action allowed.
    pub action: Action,
    /// The keyrings it applies to; `None` means all (within the principal's workspace).
    pub pattern: Option<String>,
}

impl FromStr for Grant {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let (action, pattern) = match text.split_once(':') {
            Some((action, pattern)) if !pattern.is_empty() => (action, Some(pattern.to_owned())),
            Some(_) => {
                return Err(Error::invalid_argument(format!(
                    "permission {text:?} has an empty keyring pattern"
                )))
            }
            None => (text, None),
        };
        Ok(Grant {
            action: action.trim().parse()?,
            pattern,
        })
    }
}

impl Grant {
    fn allows(&self, action: Action, keyring: &str) -> bool {
        let action_matches = self.action == action || self.action == Action::Admin;
        action_matches
            && self
                .pattern
                .as_deref()
                .is_none_or(|pattern| crate::pattern::matches(pattern, keyring))
    }
}

/// Where a principal's credential came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CredentialSource {
    /// A static bearer token from configuration.
    StaticToken,
    /// An HS256 token minted by ringvault.
    SignedToken,
    /// A JWT from an external identity provider.
    Jwt,
}

impl CredentialSource {
    /// The name used in logs and audit records.
    pub fn name(self) -> &'static str {
        match self {
            CredentialSource::StaticToken => "static_token",
            CredentialSource::SignedToken => "signed_token",
            CredentialSource::Jwt => "jwt",
        }
    }
}

/// A verified caller: what every handler sees instead of a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The workspace it is bound to; `None` reaches every keyring.
    pub workspace: Option<String>,
    /// Who it is.
    pub subject: String,
    /// The credential source that verified it.
    pub source: CredentialSource,
    /// What it may do.
    pub permissions: Vec<Grant>,
}

impl Principal {
    /// Allows `action` on `keyring` or fails closed with `access_denied`: the keyring must
    /// belong to the principal's workspace (`ws` or `ws/…`) and a grant must cover it.
    pub fn authorize(&self, action: Action, keyring: &str) -> Result<()> {
        if let Some(workspace) = &self.workspace {
            if !in_workspace(workspace, keyring) {
                return Err(Error::new(
                    Kind::AccessDenied,
                    format!(
                        "{} may not {action} keyring {keyring:?}: it is outside workspace {workspace:?}",
                        self.subject
                    ),
                ));
            }
        }
        if self
            .permissions
            .iter()
            .any(|grant| grant.allows(action, keyring))
        {
            return Ok(());
        }
        Err(Error::new(
            Kind::AccessDenied,
            format!(
                "{} has no {action} permission for keyring {keyring:?}",
                self.subject
            ),
        ))
    }
}

impl Principal {
    /// Whether it may act for `workspace` (the `X-Tenant-ID` header): it holds `admin`
    /// unscoped, or scoped by a pattern that matches the workspace name, and its own binding
    /// reaches that workspace: a principal bound to a workspace reaches only that workspace
    /// and those below it, whatever its grants say.
    pub fn may_act_for(&self, workspace: &str) -> bool {
        if let Some(own) = &self.workspace {
            if !in_workspace(own, workspace) {
                return false;
            }
        }
        self.permissions.iter().any(|grant| {
            grant.action == Action::Admin
                && grant
                    .pattern
                    .as_deref()
                    .is_none_or(|pattern| crate::pattern::matches(pattern, workspace))
        })
    }
}

/// Whether `keyring` is `workspace` itself or below it.
pub fn in_workspace(workspace: &str, keyring: &str) -> bool {
    match keyring.strip_prefix(workspace) {
        Some("") => true,
        Some(rest) => rest.starts_with('/'),
        None => false,
    }
}

/// Checks that `workspace` is a name a workspace can have: a keyring name, since a workspace is
/// a keyring prefix. A name no keyring could have (`ws_*`, `ws_42/`) would bind to nothing
/// real: a policy naming it would cap nobody, a token bound to it would reach nothing.
pub fn validate_workspace(workspace: &str) -> Result<()> {
    crate::storage::validate_keyring(workspace).map_err(|_| {
        crate::error::Error::invalid_argument(format!(
            "{workspace:?} is not a valid workspace name (a keyring name: no patterns, no empty \
             segments)"
        ))
    })
}

/// Parses permission strings (`encrypt`, `decrypt:ws_42/*`).
pub fn parse_grants<S: AsRef<str>>(permissions: &[S]) -> Result<Vec<Grant>> {
    permissions
        .iter()
        .map(|permission| permission.as_ref().parse())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(workspace: Option<&str>, permissions: &[&str]) -> Principal {
        Principal {
            workspace: workspace.map(str::to_owned),
            subject: "svc".into(),
            source: CredentialSource::StaticToken,
            permissions: parse_grants(permissions).unwrap(),
        }
    }

    #[test]
    fn grants_and_patterns() {
        let p = principal(None, &["encrypt", "decrypt:ws_42/*"]);
        assert!(p.authorize(Action::Encrypt, "anything").is_ok());
        assert!(p.authorize(Action::Decrypt, "ws_42/a/b").is_ok());
        assert!(p.authorize(Action::Decrypt, "ws_42").is_err());
        assert!(p.authorize(Action::Decrypt, "ws_43/a").is_err());
        let error = p.authorize(Action::Rotate, "x").unwrap_err();
        assert_eq!(error.kind(), Kind::AccessDenied);
    }

    #[test]
    fn workspace_binding() {
        let p = principal(Some("ws_a"), &["admin"]);
        assert!(p.authorize(Action::Rotate, "ws_a").is_ok());
        assert!(p.authorize(Action::Encrypt, "ws_a/x").is_ok());
        assert!(p.authorize(Action::Encrypt, "ws_ab").is_err());
        assert!(p.authorize(Action::Encrypt, "ws_b").is_err());
        // Acting for a workspace stays within the binding: below its own, not beside it.
        assert!(!p.may_act_for("ws_b"));
        assert!(!p.may_act_for("ws_ab"));
        assert!(p.may_act_for("ws_a/team"));
        assert!(!principal(Some("ws_a"), &["admin:ws_*"]).may_act_for("ws_ab"));
        assert!(principal(None, &["admin"]).may_act_for("ws_b"));
        assert!(!principal(Some("ws_a"), &["encrypt", "rotate"]).may_act_for("ws_a/team"));
        assert!(principal(None, &["admin:ws_*"]).may_act_for("ws_b"));
        assert!(!principal(None, &["admin:ws_c"]).may_act_for("ws_b"));
    }

    #[test]
    fn bad_permissions_are_refused() {
        assert!("delete".parse::<Grant>().is_err());
        assert!("decrypt:".parse::<Grant>().is_err());
    }
}
