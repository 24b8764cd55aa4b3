//! Permission policies (`[[auth.policies]]`): the most a subject or a workspace may do,
//! whatever its credential says. A principal's effective permissions are its own grants
//! intersected with every policy that matches it — both must allow.
//!
//! The intersection is conservative. A grant survives a policy only when some policy grant of
//! the same action (or `admin`) covers it: `decrypt:ws_42/*` is covered by `decrypt` and by
//! `decrypt:ws_42/*`. A grant broader than the policy's pattern is narrowed to that pattern
//! (`decrypt` under a `decrypt:ws_42/*` policy becomes `decrypt:ws_42/*`), `admin` under a
//! `decrypt` policy becomes `decrypt`, and two patterns neither of which provably contains the
//! other give nothing.

use super::principal::{Action, Grant, Principal};
use crate::config::PolicyConfig;
use crate::error::Result;
use crate::pattern::matches as glob_matches;

/// One policy: who it applies to and what it allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The subject it applies to; `None`: any.
    pub subject: Option<String>,
    /// The workspace it applies to; `None`: any.
    pub workspace: Option<String>,
    /// What it allows.
    pub grants: Vec<Grant>,
}

impl Policy {
    /// A policy from its configuration entry.
    pub fn from_config(entry: &PolicyConfig) -> Result<Self> {
        let grants = super::parse_grants(&entry.permissions).map_err(|error| {
            error.context(format!(
                "policy for subject {:?} workspace {:?}",
                entry.subject, entry.workspace
            ))
        })?;
        // Checked here because a policy fails open: one whose workspace matches no principal
        // (`ws_*` where a name was meant) would start fine and cap nobody.
        if !entry.workspace.is_empty() {
            super::validate_workspace(&entry.workspace).map_err(|error| {
                error.context(format!("policy for subject {:?}", entry.subject))
            })?;
        }
        Ok(Self {
            subject: (!entry.subject.is_empty()).then(|| entry.subject.clone()),
            workspace: (!entry.workspace.is_empty()).then(|| entry.workspace.clone()),
            grants,
        })
    }

    /// Whether it applies to `principal`: every field it names matches. A workspace policy
    /// applies to principals bound to that workspace or to one below it (`ws_42/team` is in
    /// `ws_42`), as workspace isolation does: a binding below a workspace must not escape its
    /// cap.
    pub fn matches(&self, principal: &Principal) -> bool {
        self.subject
            .as_deref()
            .is_none_or(|subject| subject == principal.subject)
            && self.workspace.as_deref().is_none_or(|workspace| {
                principal
                    .workspace
                    .as_deref()
                    .is_some_and(|own| super::principal::in_workspace(workspace, own))
            })
    }
}

/// Every configured policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policies {
    policies: Vec<Policy>,
}

impl Policies {
    /// A set of policies.
    pub fn new(policies: Vec<Policy>) -> Self {
        Self { policies }
    }

    /// The policies of `auth.policies`.
    pub fn from_config(entries: &[PolicyConfig]) -> Result<Self> {
        entries
            .iter()
            .map(Policy::from_config)
            .collect::<Result<Vec<_>>>()
            .map(Self::new)
    }

    /// How many are configured.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// `principal` with its permissions intersected with every policy that matches it.
    pub fn apply(&self, mut principal: Principal) -> Principal {
        for policy in &self.policies {
            if policy.matches(&principal) {
                principal.permissions = intersect(&principal.permissions, &policy.grants);
            }
        }
        principal
    }
}

/// The grants allowed by both `token` and `policy`.
pub fn intersect(token: &[Grant], policy: &[Grant]) -> Vec<Grant> {
    let mut out: Vec<Grant> = Vec::new();
    for grant in token {
        for limit in policy {
            if let Some(both) = intersect_one(grant, limit) {
                if !out.contains(&both) {
                    out.push(both);
                }
            }
        }
    }
    out
}

fn intersect_one(grant: &Grant, limit: &Grant) -> Option<Grant> {
    let action = match (grant.action, limit.action) {
        (action, Action::Admin) => action,
        (Action::Admin, action) => action,
        (a, b) if a == b => a,
        _ => return None,
    };
    let pattern = match (grant.pattern.as_deref(), limit.pattern.as_deref()) {
        (None, None) => None,
        (Some(pattern), None) | (None, Some(pattern)) => Some(pattern.to_owned()),
        (Some(own), Some(allowed)) if covers(allowed, own) => Some(own.to_owned()),
        (Some(own), Some(allowed)) if covers(own, allowed) => Some(allowed.to_owned()),
        _ => return None,
    };
    Some(Grant { action, pattern })
}

/// Whether every keyring `inner` matches is matched by `outer`, decided conservatively: false
/// when unsure.
fn covers(outer: &str, inner: &str) -> bool {
    if outer == inner || outer == "*" {
        return true;
    }
    if !inner.contains('*') {
        return glob_matches(outer, inner);
    }
    // `prefix*` covers any pattern whose literal start begins with `prefix`.
    match outer.split_once('*') {
        Some((prefix, "")) => {
            let literal = inner.split('*').next().unwrap_or("");
            literal.starts_with(prefix)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{parse_grants, CredentialSource};

    fn grants(list: &[&str]) -> Vec<Grant> {
        parse_grants(list).unwrap()
    }

    fn principal(subject: &str, workspace: Option<&str>, list: &[&str]) -> Principal {
        Principal {
            workspace: workspace.map(str::to_owned),
            subject: subject.into(),
            source: CredentialSource::SignedToken,
            permissions: grants(list),
        }
    }

    #[test]
    fn intersection_rules() {
        let cases: &[(&[&str], &[&str], &[&str])] = &[
            (&["decrypt:ws_42/*"], &["decrypt"], &["decrypt:ws_42/*"]),
            (
                &["decrypt:ws_42/*"],
                &["decrypt:ws_42/*"],
                &["decrypt:ws_42/*"],
            ),
            (&["decrypt"], &["decrypt:ws_42/*"], &["decrypt:ws_42/*"]),
            (
                &["decrypt:ws_42/a"],
                &["decrypt:ws_42/*"],
                &["decrypt:ws_42/a"],
            ),
            (
                &["decrypt:ws_42/a/*"],
                &["decrypt:ws_*"],
                &["decrypt:ws_42/a/*"],
            ),
            (&["decrypt:*-prod"], &["decrypt:ws_1/*"], &[]),
            (&["decrypt"], &["encrypt"], &[]),
            (
                &["admin"],
                &["decrypt", "encrypt:ws_1"],
                &["decrypt", "encrypt:ws_1"],
            ),
            (&["encrypt", "rotate"], &["admin"], &["encrypt", "rotate"]),
            (&["admin"], &["admin"], &["admin"]),
            (&["encrypt:ws_1/*"], &["admin:ws_1/*"], &["encrypt:ws_1/*"]),
        ];
        for (token, policy, expected) in cases {
            assert_eq!(
                intersect(&grants(token), &grants(policy)),
                grants(expected),
                "{token:?} ∩ {policy:?}"
            );
        }
    }

    #[test]
    fn policies_apply_by_subject_and_workspace() {
        let policies = Policies::new(vec![
            Policy {
                subject: Some("svc".into()),
                workspace: None,
                grants: grants(&["encrypt", "decrypt"]),
            },
            Policy {
                subject: None,
                workspace: Some("ws_1".into()),
                grants: grants(&["decrypt", "encrypt:ws_1/public/*"]),
            },
        ]);
        let applied = policies.apply(principal("svc", Some("ws_1"), &["admin"]));
        assert_eq!(
            applied.permissions,
            grants(&["encrypt:ws_1/public/*", "decrypt"])
        );
        let other = policies.apply(principal("other", Some("ws_2"), &["admin"]));
        assert_eq!(other.permissions, grants(&["admin"]));
        let svc_elsewhere = policies.apply(principal("svc", Some("ws_2"), &["rotate", "encrypt"]));
        assert_eq!(svc_elsewhere.permissions, grants(&["encrypt"]));
        let below = policies.apply(principal("team", Some("ws_1/team"), &["admin"]));
        assert_eq!(
            below.permissions,
            grants(&["decrypt", "encrypt:ws_1/public/*"]),
            "a binding below ws_1 is capped by ws_1's policy"
        );
        let sibling = policies.apply(principal("team", Some("ws_10"), &["admin"]));
        assert_eq!(
            sibling.permissions,
            grants(&["admin"]),
            "ws_10 is not in ws_1"
        );
    }

    #[test]
    fn coverage_is_conservative() {
        assert!(covers("*", "anything*"));
        assert!(covers("ws_*", "ws_1/*"));
        assert!(!covers("ws_1/*", "ws_*"));
        assert!(!covers("*/prod", "ws_1/*"));
        assert!(covers("*/prod", "ws_1/prod"));
    }

    /// A policy whose workspace no principal can have would cap nobody: refused at start.
    #[test]
    fn a_policy_for_an_impossible_workspace_is_refused() {
        let entry = |workspace: &str| PolicyConfig {
            subject: String::new(),
            workspace: workspace.to_owned(),
            permissions: vec!["decrypt".to_owned()],
        };
        for workspace in ["ws_*", "ws_42/", " ws_42", "ws 42", "a//b"] {
            let error = Policy::from_config(&entry(workspace)).unwrap_err();
            assert_eq!(error.kind(), crate::error::Kind::InvalidArgument);
            assert!(error.message().contains("workspace"), "{error}");
        }
        for workspace in ["", "ws_42", "ws_42/team"] {
            assert!(
                Policy::from_config(&entry(workspace)).is_ok(),
                "{workspace}"
            );
        }
    }
}
