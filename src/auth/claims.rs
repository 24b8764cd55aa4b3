//! JWT claims as ringvault reads and mints them, a look at a token's header before any key is
//! chosen, and the mapping of `jsonwebtoken` failures to [`Kind::InvalidToken`] /
//! [`Kind::TokenExpired`]. Nothing here ever puts a token into an error message.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::Grant;
use crate::error::{Error, Kind, Result};

/// The claims of a signed token or of an identity provider's JWT.
///
/// The workspace claim's name is configurable (`auth.workspace_claim`, default `tenant_id`),
/// so claims are converted to and from JSON with [`Claims::to_json`] and [`Claims::from_json`]
/// rather than with a fixed serde layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// `sub`: who the token stands for.
    pub sub: String,
    /// The workspace claim: the workspace the principal is bound to.
    pub workspace: Option<String>,
    /// `scope`: space-separated permissions (`encrypt decrypt:ws_42/*`).
    pub scope: Option<String>,
    /// `permissions`: permissions as an array.
    pub permissions: Vec<String>,
    /// `roles`: roles of the HTTP endpoints.
    pub roles: Vec<String>,
    /// `exp`: expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// `nbf`: not valid before, seconds since the Unix epoch.
    pub nbf: Option<u64>,
    /// `iat`: issued at, seconds since the Unix epoch.
    pub iat: Option<u64>,
    /// `jti`: the token's id, what revocation by id names.
    pub jti: Option<String>,
    /// `iss`: the issuer.
    pub iss: Option<String>,
    /// `aud`: the audiences (a single string on the wire when there is one).
    pub aud: Vec<String>,
}

impl Claims {
    /// Claims for `subject` valid from now for `ttl`, with a random `jti`; `iss` is filled in
    /// by the issuer.
    pub fn new(subject: impl Into<String>, ttl: Duration) -> Claims {
        let now = now_secs();
        Claims {
            sub: subject.into(),
            workspace: None,
            scope: None,
            permissions: Vec::new(),
            roles: Vec::new(),
            exp: now.saturating_add(ttl.as_secs()),
            nbf: Some(now),
            iat: Some(now),
            jti: Some(hex::encode(rand::random::<[u8; 16]>())),
            iss: None,
            aud: Vec::new(),
        }
    }

    /// The claims as a JSON object, the workspace under `workspace_claim`.
    pub fn to_json(&self, workspace_claim: &str) -> Value {
        let mut map = Map::new();
        map.insert("sub".into(), Value::from(self.sub.clone()));
        if let Some(workspace) = &self.workspace {
            map.insert(workspace_claim.into(), Value::from(workspace.clone()));
        }
        if let Some(scope) = &self.scope {
            map.insert("scope".into(), Value::from(scope.clone()));
        }
        if !self.permissions.is_empty() {
            map.insert("permissions".into(), Value::from(self.permissions.clone()));
        }
        if !self.roles.is_empty() {
            map.insert("roles".into(), Value::from(self.roles.clone()));
        }
        map.insert("exp".into(), Value::from(self.exp));
        if let Some(nbf) = self.nbf {
            map.insert("nbf".into(), Value::from(nbf));
        }
        if let Some(iat) = self.iat {
            map.insert("iat".into(), Value::from(iat));
        }
        if let Some(jti) = &self.jti {
            map.insert("jti".into(), Value::from(jti.clone()));
        }
        if let Some(iss) = &self.iss {
            map.insert("iss".into(), Value::from(iss.clone()));
        }
        match self.aud.as_slice() {
            [] => {}
            [one] => {
                map.insert("aud".into(), Value::from(one.clone()));
            }
            many => {
                map.insert("aud".into(), Value::from(many.to_vec()));
            }
        }
        Value::Object(map)
    }

    /// Reads claims from a verified token's JSON payload. A missing or empty `sub`, a missing
    /// `exp` or a claim of the wrong type is `invalid_token`.
    pub fn from_json(value: &Value, workspace_claim: &str) -> Result<Claims> {
        let invalid = |what: &str| Error::new(Kind::InvalidToken, format!("token {what}"));
        let map = value
            .as_object()
            .ok_or_else(|| invalid("claims are not a json object"))?;
        let string = |name: &str| -> Result<Option<String>> {
            match map.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(text)) => Ok(Some(text.clone())),
                Some(_) => Err(invalid(&format!("claim {name:?} is not a string"))),
            }
        };
        let number = |name: &str| -> Result<Option<u64>> {
            match map.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Number(number)) => number
                    .as_u64()
                    .or_else(|| {
                        number
                            .as_f64()
                            .filter(|value| value.is_finite() && *value >= 0.0)
                            .map(|value| value as u64)
                    })
                    .map(Some)
                    .ok_or_else(|| invalid(&format!("claim {name:?} is not a timestamp"))),
                Some(_) => Err(invalid(&format!("claim {name:?} is not a number"))),
            }
        };
        let list = |name: &str| -> Result<Vec<String>> {
            match map.get(name) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::String(text)) => {
                    Ok(text.split_whitespace().map(str::to_owned).collect())
                }
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|item| {
                        item.as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| invalid(&format!("claim {name:?} holds a non-string")))
                    })
                    .collect(),
                Some(_) => Err(invalid(&format!("claim {name:?} is not a list"))),
            }
        };
        let sub = string("sub")?
            .filter(|sub| !sub.is_empty())
            .ok_or_else(|| invalid("has no sub claim"))?;
        let exp = number("exp")?.ok_or_else(|| invalid("has no exp claim"))?;
        // Only an absent claim means "bound to no workspace" (every keyring): an empty one is
        // what identity providers often send for a user without a tenant, and must not turn
        // into the widest binding there is.
        let workspace = string(workspace_claim)?;
        let present_but_empty = match map.get(workspace_claim) {
            Some(Value::Null) => true,
            Some(_) => workspace
                .as_deref()
                .is_some_and(|text| text.trim().is_empty()),
            None => false,
        };
        if present_but_empty {
            return Err(invalid(&format!("has an empty {workspace_claim:?} claim")));
        }
        // A name no keyring could have (`*billing`) could also collide with the keys ringvault
        // derives from it.
        if workspace
            .as_deref()
            .is_some_and(|workspace| super::validate_workspace(workspace).is_err())
        {
            return Err(invalid(&format!(
                "has a {workspace_claim:?} claim that is not a valid workspace name"
            )));
        }
        Ok(Claims {
            sub,
            workspace,
            scope: string("scope")?,
            permissions: list("permissions")?,
            roles: list("roles")?,
            exp,
            nbf: number("nbf")?,
            iat: number("iat")?,
            jti: string("jti")?,
            iss: string("iss")?,
            aud: list("aud")?,
        })
    }

    /// The permissions the token carries: `scope` (space separated) and the `permissions`
    /// array together. Entries that are not ringvault permissions (an identity provider's
    /// `openid`, `profile`, …) are ignored with a debug log: ignoring can only take power away,
    /// and refusing the whole token would make scopes shared with other services unusable.
    pub fn grants(&self) -> Vec<Grant> {
        let scope = self.scope.iter().flat_map(|scope| scope.split_whitespace());
        let mut grants: Vec<Grant> = Vec::new();
        for text in scope.chain(self.permissions.iter().map(String::as_str)) {
            match text.parse::<Grant>() {
                Ok(grant) if !grants.contains(&grant) => grants.push(grant),
                Ok(_) => {}
                Err(_) => tracing::debug!(
                    subject = self.sub,
                    permission = text,
                    "ignoring a token permission ringvault does not know"
                ),
            }
        }
        grants
    }

    /// When the token expires; `None` past what the system clock can represent.
    pub fn expires_at(&self) -> Option<SystemTime> {
        UNIX_EPOCH.checked_add(Duration::from_secs(self.exp))
    }

    /// The expiry in RFC 3339 (UTC), or in seconds after the epoch past the year 9999.
    pub fn expires_at_text(&self) -> String {
        rfc3339(self.exp)
    }
}

/// The fields of a JWT header that choose the verifier and the key.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct PeekedHeader {
    /// The algorithm as written in the token.
    pub alg: String,
    /// The key id.
    #[serde(default)]
    pub kid: Option<String>,
}

/// Whether `token` has the shape of a JWT: three dot-separated, non-empty base64url parts
/// (the signature may be empty, as in `alg: none` tokens, which are then refused).
pub fn looks_like_jwt(token: &str) -> bool {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let base64url = |part: &str| {
        part.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    !header.is_empty()
        && !payload.is_empty()
        && base64url(header)
        && base64url(payload)
        && base64url(signature)
}

/// The header of a JWT-shaped token, read without verifying anything.
pub(crate) fn peek_header(token: &str) -> Result<PeekedHeader> {
    let header = token.split('.').next().unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .map_err(|_| Error::new(Kind::InvalidToken, "token header is not base64url"))?;
    serde_json::from_slice(&bytes).map_err(|_| {
        Error::new(
            Kind::InvalidToken,
            "token header is not a json object with alg",
        )
    })
}

/// The payload of a JWT-shaped token, read without verifying anything. Only for what is safe
/// to read from an unverified token: the `exp` of an error message, the `jti` to revoke.
pub(crate) fn peek_payload(token: &str) -> Option<Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Seconds since the Unix epoch.
pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

/// A Unix timestamp as RFC 3339 (`2030-01-01T00:00:00Z`). The times come from tokens, so any
/// `u64` is possible: past what RFC 3339 can write (the year 9999) they stay plain seconds.
pub(crate) fn rfc3339(secs: u64) -> String {
    if secs > LAST_RFC3339_SECOND {
        return format!("{secs} s after the unix epoch");
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// 9999-12-31T23:59:59Z, the last second RFC 3339 has a year for.
const LAST_RFC3339_SECOND: u64 = 253_402_300_799;

/// The error of a failed `jsonwebtoken::decode` of `token` by `what` (`signed token`, `jwt`).
/// Only an expiry is `token_expired`; everything else is `invalid_token`.
pub(crate) fn decode_error(what: &str, token: &str, error: &jsonwebtoken::errors::Error) -> Error {
    use jsonwebtoken::errors::ErrorKind;
    let claim = |name: &str| {
        peek_payload(token)
            .and_then(|payload| payload.get(name).and_then(Value::as_u64))
            .map(rfc3339)
            .unwrap_or_else(|| "an unknown time".to_owned())
    };
    let reason = match error.kind() {
        ErrorKind::ExpiredSignature => {
            return Error::new(
                Kind::TokenExpired,
                format!("{what}: token expired at {}", claim("exp")),
            )
        }
        ErrorKind::ImmatureSignature => format!("token is not valid before {}", claim("nbf")),
        ErrorKind::InvalidSignature => "signature does not verify".to_owned(),
        ErrorKind::InvalidIssuer => "issuer is not accepted".to_owned(),
        ErrorKind::InvalidAudience => "audience is not accepted".to_owned(),
        ErrorKind::InvalidSubject => "subject is not accepted".to_owned(),
        ErrorKind::MissingRequiredClaim(name) => format!("token has no {name} claim"),
        ErrorKind::InvalidClaimFormat(name) => format!("claim {name} is malformed"),
        ErrorKind::InvalidAlgorithm | ErrorKind::UnsupportedAlgorithm => {
            "algorithm is not accepted".to_owned()
        }
        _ => "token is malformed".to_owned(),
    };
    Error::new(Kind::InvalidToken, format!("{what}: {reason}"))
}

/// Verifies `token` with each of `keys` in turn: the first whose signature checks decides.
/// A bad signature moves on to the next key (another key may have signed it); any other
/// failure means the signature verified and the claims are wrong, which ends the search.
pub(crate) fn decode_with_any<'k>(
    what: &str,
    token: &str,
    keys: impl IntoIterator<Item = &'k jsonwebtoken::DecodingKey>,
    validation: &jsonwebtoken::Validation,
    workspace_claim: &str,
) -> Result<Claims> {
    let mut last = None;
    for key in keys {
        match jsonwebtoken::decode::<Value>(token, key, validation) {
            Ok(data) => return Claims::from_json(&data.claims, workspace_claim),
            Err(error)
                if matches!(
                    error.kind(),
                    jsonwebtoken::errors::ErrorKind::InvalidSignature
                ) =>
            {
                last = Some(error)
            }
            Err(error) => return Err(decode_error(what, token, &error)),
        }
    }
    Err(match last {
        Some(error) => decode_error(what, token, &error),
        None => Error::new(Kind::InvalidToken, format!("{what}: no key to verify with")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_with_a_custom_workspace_claim() {
        let mut claims = Claims::new("svc", Duration::from_secs(60));
        claims.workspace = Some("ws_1".into());
        claims.scope = Some("encrypt decrypt:ws_1/*".into());
        claims.roles = vec!["metrics".into()];
        claims.aud = vec!["vault".into()];
        claims.iss = Some("ringvault".into());
        let json = claims.to_json("org");
        assert_eq!(json["org"], "ws_1");
        assert_eq!(json["aud"], "vault");
        assert_eq!(Claims::from_json(&json, "org").unwrap(), claims);
        assert_eq!(
            Claims::from_json(&json, "tenant_id").unwrap().workspace,
            None
        );
    }

    #[test]
    fn a_workspace_claim_no_keyring_could_have_is_refused() {
        for workspace in ["*billing", "ws/../other", "/ws", "ws 1"] {
            let mut claims = Claims::new("user-1", Duration::from_secs(600));
            claims.workspace = Some(workspace.into());
            let json = claims.to_json("tenant_id");
            let error = Claims::from_json(&json, "tenant_id").unwrap_err();
            assert_eq!(error.kind(), Kind::InvalidToken, "{workspace:?}");
        }
    }

    #[test]
    fn an_empty_workspace_claim_is_refused_not_unbound() {
        let claims = Claims::new("svc", Duration::from_secs(60));
        for empty in [Value::from(""), Value::from("  "), Value::Null] {
            let mut json = claims.to_json("tenant_id");
            json["tenant_id"] = empty;
            let error = Claims::from_json(&json, "tenant_id").unwrap_err();
            assert_eq!(error.kind(), Kind::InvalidToken, "{error}");
            assert!(error.message().contains("tenant_id"), "{error}");
        }
        let absent = claims.to_json("tenant_id");
        assert_eq!(
            Claims::from_json(&absent, "tenant_id").unwrap().workspace,
            None
        );
    }

    #[test]
    fn times_past_the_year_9999_are_written_as_seconds() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(LAST_RFC3339_SECOND), "9999-12-31T23:59:59Z");
        assert_eq!(
            rfc3339(LAST_RFC3339_SECOND + 1),
            "253402300800 s after the unix epoch"
        );
        assert!(rfc3339(u64::MAX).starts_with("18446744073709551615 s"));
    }

    #[test]
    fn grants_ignore_unknown_permissions() {
        let mut claims = Claims::new("svc", Duration::from_secs(60));
        claims.scope = Some("openid encrypt profile".into());
        claims.permissions = vec!["decrypt:ws_1/*".into(), "delete".into(), "encrypt".into()];
        let grants = claims.grants();
        assert_eq!(
            grants,
            vec![
                "encrypt".parse::<Grant>().unwrap(),
                "decrypt:ws_1/*".parse().unwrap()
            ]
        );
    }

    #[test]
    fn missing_sub_or_exp_is_invalid() {
        let error = Claims::from_json(&serde_json::json!({"exp": 1}), "tenant_id").unwrap_err();
        assert_eq!(error.kind(), Kind::InvalidToken);
        let error = Claims::from_json(&serde_json::json!({"sub": "a"}), "tenant_id").unwrap_err();
        assert_eq!(error.kind(), Kind::InvalidToken);
        let error =
            Claims::from_json(&serde_json::json!({"sub": "a", "exp": "x"}), "t").unwrap_err();
        assert_eq!(error.kind(), Kind::InvalidToken);
    }

    #[test]
    fn jwt_shape_and_header() {
        assert!(looks_like_jwt("eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0."));
        assert!(!looks_like_jwt("rv_dev_abc"));
        assert!(!looks_like_jwt("a.b"));
        assert!(!looks_like_jwt("a.b.c.d"));
        assert!(!looks_like_jwt("a b.c.d"));
        let header = peek_header("eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0.").unwrap();
        assert_eq!(header.alg, "none");
        assert!(peek_header("!!!.a.b").is_err());
    }
}
