//! Signed tokens: HS256 JWTs minted by `ringvault token issue`. Verification takes an ordered
//! list of secrets — the first signs, every one verifies — so a secret rotates without
//! downtime. Only HS256 is accepted here; tokens of any other algorithm never reach these
//! secrets, which is what defeats algorithm confusion.

use std::time::{Duration, SystemTime};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use zeroize::Zeroizing;

use super::claims::{decode_with_any, peek_header, Claims};
use crate::config::AuthConfig;
use crate::error::{Error, Kind, Result};

/// The shortest secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;

/// An HS256 issuer and verifier over an ordered list of secrets.
#[derive(Clone)]
pub struct SignedTokens {
    secrets: Vec<Zeroizing<Vec<u8>>>,
    issuer: String,
    audience: Option<String>,
    leeway: Duration,
    workspace_claim: String,
}

impl std::fmt::Debug for SignedTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedTokens")
            .field("secrets", &self.secrets.len())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .finish_non_exhaustive()
    }
}

impl SignedTokens {
    /// Tokens signed with `secrets[0]` and verified with any of `secrets`, issued by `issuer`,
    /// for `audience` when given; `exp` and `nbf` allow `leeway` of clock skew. Fails when
    /// there is no secret or one is shorter than [`MIN_SECRET_BYTES`].
    pub fn new<S: AsRef<[u8]>>(
        secrets: &[S],
        issuer: impl Into<String>,
        audience: Option<String>,
        leeway: Duration,
        workspace_claim: impl Into<String>,
    ) -> Result<Self> {
        if secrets.is_empty() {
            return Err(Error::invalid_argument("no signing secret is configured"));
        }
        for (index, secret) in secrets.iter().enumerate() {
            let length = secret.as_ref().len();
            if length < MIN_SECRET_BYTES {
                return Err(Error::invalid_argument(format!(
                    "signing secret {index} is {length} bytes; at least {MIN_SECRET_BYTES} are required"
                )));
            }
        }
        Ok(Self {
            secrets: secrets
                .iter()
                .map(|secret| Zeroizing::new(secret.as_ref().to_vec()))
                .collect(),
            issuer: issuer.into(),
            audience: audience.filter(|audience| !audience.is_empty()),
            leeway,
            workspace_claim: workspace_claim.into(),
        })
    }

    /// The signed tokens of `[auth]`; `None` when `auth.signing_secrets` is empty.
    pub fn from_config(auth: &AuthConfig) -> Result<Option<Self>> {
        if auth.signing_secrets.is_empty() {
            return Ok(None);
        }
        Self::new(
            &auth.signing_secrets,
            auth.issuer.clone(),
            Some(auth.audience.clone()),
            Duration::from_secs(auth.leeway_secs),
            auth.workspace_claim.clone(),
        )
        .map(Some)
    }

    /// The role tokens of the HTTP endpoints: signed and verified with `http.token_secret`,
    /// issued by `auth.issuer`, for `http.audience` when set; `None` when no secret is set.
    pub fn http_from_config(config: &crate::config::Config) -> Result<Option<Self>> {
        if config.http.token_secret.is_empty() {
            return Ok(None);
        }
        Self::new(
            &[config.http.token_secret.as_bytes()],
            config.auth.issuer.clone(),
            Some(config.http.audience.clone()),
            Duration::from_secs(config.auth.leeway_secs),
            config.auth.workspace_claim.clone(),
        )
        .map(Some)
    }

    /// The issuer written into and required of tokens.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Clock skew allowed on `exp` and `nbf`.
    pub fn leeway(&self) -> Duration {
        self.leeway
    }

    /// The claim naming the workspace.
    pub fn workspace_claim(&self) -> &str {
        &self.workspace_claim
    }

    /// Signs `claims` with the first secret. `iss` defaults to the configured issuer and `aud`
    /// to the configured audience.
    pub fn issue(&self, claims: &Claims) -> Result<String> {
        let mut claims = claims.clone();
        if claims.iss.is_none() {
            claims.iss = Some(self.issuer.clone());
        }
        if claims.aud.is_empty() {
            if let Some(audience) = &self.audience {
                claims.aud = vec![audience.clone()];
            }
        }
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims.to_json(&self.workspace_claim),
            &EncodingKey::from_secret(&self.secrets[0]),
        )
        .map_err(|error| Error::internal(format!("cannot sign the token: {error}")))
    }

    /// The claims of `token` when one of the secrets signed it with HS256 and it is current,
    /// from this issuer and (when configured) for this audience. An expired token is
    /// `token_expired`; anything else wrong is `invalid_token`.
    pub fn verify(&self, token: &str) -> Result<Claims> {
        let header = peek_header(token)?;
        if header.alg != "HS256" {
            return Err(Error::new(
                Kind::InvalidToken,
                format!(
                    "signed token: algorithm {:?} is not accepted; signed tokens are HS256",
                    header.alg
                ),
            ));
        }
        let validation = self.validation();
        let keys: Vec<DecodingKey> = self
            .secrets
            .iter()
            .map(|secret| DecodingKey::from_secret(secret))
            .collect();
        decode_with_any(
            "signed token",
            token,
            &keys,
            &validation,
            &self.workspace_claim,
        )
    }

    fn validation(&self) -> Validation {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.issuer]);
        match &self.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
            }
            None => {
                validation.validate_aud = false;
                validation.set_required_spec_claims(&["exp", "sub", "iss"]);
            }
        }
        validation
    }

    /// How long `claims` remain valid from now (zero when expired).
    pub fn time_left(claims: &Claims) -> Duration {
        claims.expires_at().map_or(Duration::MAX, |expires_at| {
            expires_at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        })
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;

    const OLD: &str = "old-secret-old-secret-old-secret-0";
    const NEW: &str = "new-secret-new-secret-new-secret-1";

    fn tokens(secrets: &[&str], audience: Option<&str>) -> SignedTokens {
        SignedTokens::new(
            secrets,
            "ringvault",
            audience.map(str::to_owned),
            Duration::from_secs(5),
            "tenant_id",
        )
        .unwrap()
    }

    fn claims() -> Claims {
        let mut claims = Claims::new("svc", Duration::from_secs(600));
        claims.workspace = Some("ws_1".into());
        claims.scope = Some("encrypt".into());
        claims
    }

    fn b64(json: &serde_json::Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json.to_string())
    }

    #[test]
    fn issue_then_verify() {
        let signer = tokens(&[NEW], None);
        let token = signer.issue(&claims()).unwrap();
        let verified = signer.verify(&token).unwrap();
        assert_eq!(verified.sub, "svc");
        assert_eq!(verified.workspace.as_deref(), Some("ws_1"));
        assert_eq!(verified.iss.as_deref(), Some("ringvault"));
        assert!(verified.jti.is_some());
    }

    #[test]
    fn short_secrets_are_refused() {
        let error = SignedTokens::new(&["short"], "i", None, Duration::ZERO, "t").unwrap_err();
        assert!(error.message().contains("at least 32"), "{error}");
        assert!(SignedTokens::new::<&str>(&[], "i", None, Duration::ZERO, "t").is_err());
    }

    #[test]
    fn rotation_overlap() {
        let old = tokens(&[OLD], None).issue(&claims()).unwrap();
        let new = tokens(&[NEW, OLD], None).issue(&claims()).unwrap();
        let overlap = tokens(&[NEW, OLD], None);
        assert!(overlap.verify(&old).is_ok());
        assert!(overlap.verify(&new).is_ok());
        let after = tokens(&[NEW], None);
        assert!(after.verify(&new).is_ok());
        let error = after.verify(&old).unwrap_err();
        assert_eq!(error.kind(), Kind::InvalidToken);
        assert!(!error.message().contains(&old));
    }

    #[test]
    fn expiry_and_not_before() {
        let signer = tokens(&[NEW], None);
        let mut expired = claims();
        expired.exp = super::super::claims::now_secs() - 60;
        let error = signer.verify(&signer.issue(&expired).unwrap()).unwrap_err();
        assert_eq!(error.kind(), Kind::TokenExpired);
        assert!(error.message().contains("token expired at "), "{error}");
        let mut within_leeway = claims();
        within_leeway.exp = super::super::claims::now_secs() - 2;
        assert!(signer
            .verify(&signer.issue(&within_leeway).unwrap())
            .is_ok());
        let mut early = claims();
        early.nbf = Some(super::super::claims::now_secs() + 120);
        let error = signer.verify(&signer.issue(&early).unwrap()).unwrap_err();
        assert_eq!(error.kind(), Kind::InvalidToken);
        assert!(error.message().contains("not valid before"), "{error}");
    }

    #[test]
    fn issuer_and_audience() {
        let signer = tokens(&[NEW], Some("vault"));
        let token = signer.issue(&claims()).unwrap();
        assert!(signer.verify(&token).is_ok());
        let mut other = claims();
        other.aud = vec!["other".into()];
        let error = signer.verify(&signer.issue(&other).unwrap()).unwrap_err();
        assert_eq!(error.kind(), Kind::InvalidToken);
        // A token without aud does not pass a verifier that requires one.
        let no_audience = tokens(&[NEW], None).issue(&claims()).unwrap();
        assert_eq!(
            signer.verify(&no_audience).unwrap_err().kind(),
            Kind::InvalidToken
        );
        let mut foreign = claims();
        foreign.iss = Some("someone-else".into());
        let error = signer.verify(&signer.issue(&foreign).unwrap()).unwrap_err();
        assert!(error.message().contains("issuer"), "{error}");
    }

    #[test]
    fn alg_none_and_other_algorithms_are_refused() {
        let signer = tokens(&[NEW], None);
        let payload = b64(&claims().to_json("tenant_id"));
        for alg in ["none", "None", "HS512", "RS256"] {
            let header = b64(&serde_json::json!({"alg": alg, "typ": "JWT"}));
            let token = format!("{header}.{payload}.");
            let error = signer.verify(&token).unwrap_err();
            assert_eq!(error.kind(), Kind::InvalidToken, "{alg}");
        }
        assert_eq!(
            signer.verify("not-a-jwt").unwrap_err().kind(),
            Kind::InvalidToken
        );
    }

    #[test]
    fn tampered_payload_fails() {
        let signer = tokens(&[NEW], None);
        let token = signer.issue(&claims()).unwrap();
        let mut parts: Vec<&str> = token.split('.').collect();
        let mut admin = claims();
        admin.scope = Some("admin".into());
        let forged = b64(&admin.to_json("tenant_id"));
        parts[1] = &forged;
        let error = signer.verify(&parts.join(".")).unwrap_err();
        assert_eq!(error.kind(), Kind::InvalidToken);
        assert!(error.message().contains("signature"), "{error}");
    }
}
