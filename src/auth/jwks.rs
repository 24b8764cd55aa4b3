//! JWTs of an external identity provider: RS256, ES256 and EdDSA verified against a JWKS read
//! from a file or fetched over HTTP(S), refreshed periodically. A refresh that fails keeps the
//! last good set. Symmetric (`oct`) keys of a JWKS are never used, and HS256 tokens never reach
//! this verifier, so a token "signed" with a public key as an HMAC secret cannot pass.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::claims::{decode_with_any, peek_header, Claims};
use crate::config::AuthConfig;
use crate::error::{Error, Kind, Result};

/// Time one JWKS fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// The shortest time between two JWKS reads that tokens with an unknown `kid` cause.
const UNKNOWN_KID_REFRESH_GAP: Duration = Duration::from_secs(30);
/// Redirects one JWKS fetch may follow.
const MAX_REDIRECTS: usize = 5;

/// Whether the JWKS may be fetched from `url`: over https, or over plain http only from this
/// machine (a test or a sidecar), since whoever answers the fetch decides which tokens pass.
fn jwks_url_allowed(url: &reqwest::Url) -> bool {
    match url.scheme() {
        "https" => true,
        "http" => url.host_str().is_some_and(|host| {
            host.eq_ignore_ascii_case("localhost")
                || host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|address| address.is_loopback())
        }),
        _ => false,
    }
}
/// The most characters of a token's `kid` an error message quotes (a key id is short; a
/// caller's may be anything).
const MAX_QUOTED_KID_CHARS: usize = 64;

/// What a refresh loaded.
struct Refreshed {
    keys: usize,
    /// Its keys differ from those loaded before.
    changed: bool,
}

/// Where the JWKS comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// A local file, read again at every refresh.
    File(PathBuf),
    /// An `http://` or `https://` URL.
    Url(String),
}

impl std::fmt::Display for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwksSource::File(path) => write!(f, "file {}", path.display()),
            JwksSource::Url(url) => write!(f, "url {url}"),
        }
    }
}

/// The kind of public key, which fixes the one algorithm it verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    P256,
    Ed25519,
}

impl KeyKind {
    fn algorithm(self) -> Algorithm {
        match self {
            KeyKind::Rsa => Algorithm::RS256,
            KeyKind::P256 => Algorithm::ES256,
            KeyKind::Ed25519 => Algorithm::EdDSA,
        }
    }
}

struct VerifyKey {
    kid: Option<String>,
    kind: KeyKind,
    key: DecodingKey,
}

/// A parsed JWKS: the signing keys ringvault can use (RSA, EC P-256, Ed25519).
#[derive(Default)]
pub struct KeySet {
    keys: Vec<VerifyKey>,
    /// SHA-256 of the usable keys (id, type, public components), sorted: the same for the
    /// same keys however the document orders or spells them.
    fingerprint: [u8; 32],
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.kids())
            .finish()
    }
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    usage: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

impl KeySet {
    /// Parses a JWKS document. Keys that are not for signatures, of another type or curve, or
    /// whose `alg` is not the one their type verifies are skipped; a set with no usable key
    /// is an error (so that a refresh never replaces good keys with nothing).
    pub fn parse(bytes: &[u8]) -> Result<KeySet> {
        let raw: RawJwks = serde_json::from_slice(bytes)
            .map_err(|error| Error::invalid_argument(format!("jwks is not valid json: {error}")))?;
        let mut keys = Vec::new();
        let mut identities = Vec::new();
        for value in raw.keys {
            let Ok(jwk) = serde_json::from_value::<RawJwk>(value) else {
                tracing::debug!("skipping a jwks entry that is not a json web key");
                continue;
            };
            match Self::usable(&jwk) {
                Ok(key) => {
                    identities.push(
                        [
                            jwk.kid.as_deref(),
                            Some(jwk.kty.as_str()),
                            jwk.crv.as_deref(),
                            jwk.n.as_deref(),
                            jwk.e.as_deref(),
                            jwk.x.as_deref(),
                            jwk.y.as_deref(),
                        ]
                        .map(|part| part.unwrap_or(""))
                        .join("\u{1f}"),
                    );
                    keys.push(key);
                }
                Err(reason) => {
                    tracing::debug!(kid = jwk.kid.as_deref(), reason, "skipping a jwks key")
                }
            }
        }
        if keys.is_empty() {
            return Err(Error::invalid_argument(
                "jwks has no usable signing key (rsa, ec p-256 or ed25519)",
            ));
        }
        identities.sort();
        let fingerprint =
            <sha2::Sha256 as sha2::Digest>::digest(identities.join("\u{1e}").as_bytes()).into();
        Ok(KeySet { keys, fingerprint })
    }

    fn usable(jwk: &RawJwk) -> std::result::Result<VerifyKey, &'static str> {
        if jwk.usage.as_deref().is_some_and(|usage| usage != "sig") {
            return Err("not a signature key");
        }
        let component = |value: &Option<String>| value.clone().ok_or("missing a key component");
        let (kind, key) = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
            ("RSA", _) => {
                // Decoded here, once, as jsonwebtoken would (base64url without padding), so
                // that the modulus can be measured.
                let decoded = |value: &Option<String>| {
                    let text = value.as_deref().ok_or("missing a key component")?;
                    URL_SAFE_NO_PAD
                        .decode(text)
                        .map_err(|_| "malformed key components")
                };
                let modulus = decoded(&jwk.n)?;
                if rsa_modulus_bits(&modulus) < MIN_RSA_MODULUS_BITS {
                    return Err("rsa modulus shorter than 2048 bits");
                }
                let exponent = decoded(&jwk.e)?;
                (
                    KeyKind::Rsa,
                    Ok(DecodingKey::from_rsa_raw_components(&modulus, &exponent)),
                )
            }
            ("EC", Some("P-256")) => (
                KeyKind::P256,
                DecodingKey::from_ec_components(&component(&jwk.x)?, &component(&jwk.y)?),
            ),
            ("OKP", Some("Ed25519")) => (
                KeyKind::Ed25519,
                DecodingKey::from_ed_components(&component(&jwk.x)?),
            ),
            _ => return Err("unsupported key type or curve"),
        };
        let key = key.map_err(|_| "malformed key components")?;
        if let Some(alg) = &jwk.alg {
            let expected = match kind {
                KeyKind::Rsa => "RS256",
                KeyKind::P256 => "ES256",
                KeyKind::Ed25519 => "EdDSA",
            };
            if alg != expected {
                return Err("key alg is not the one its type verifies");
            }
        }
        Ok(VerifyKey {
            kid: jwk.kid.clone(),
            kind,
            key,
        })
    }

    /// How many usable keys the set holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key ids, for logs.
    pub fn kids(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|key| key.kid.clone().unwrap_or_else(|| "-".to_owned()))
            .collect()
    }
}

/// Verifies identity-provider JWTs against the current JWKS. Clones share the key set, so a
/// refresh through one is seen by all.
#[derive(Clone)]
pub struct JwtVerifier {
    keys: Arc<ArcSwap<KeySet>>,
    source: JwksSource,
    refresh_every: Duration,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: Duration,
    workspace_claim: String,
    http: reqwest::Client,
    /// Woken by a token whose `kid` no key has: the provider may have published a new key.
    unknown_kid: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("source", &self.source)
            .field("keys", &self.keys.load().len())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// A verifier over `source`, starting with `initial` keys (possibly empty until the first
    /// fetch), requiring `issuer` and `audience` when given.
    pub fn new(
        source: JwksSource,
        initial: KeySet,
        refresh_every: Duration,
        issuer: Option<String>,
        audience: Option<String>,
        leeway: Duration,
        workspace_claim: impl Into<String>,
    ) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    attempt.error("too many redirects")
                } else if jwks_url_allowed(attempt.url()) {
                    attempt.follow()
                } else {
                    attempt.error("redirected to plain http on a host that is not this machine")
                }
            }))
            .build()
            .map_err(|error| {
                Error::internal(format!("cannot build the jwks http client: {error}"))
            })?;
        Ok(Self {
            keys: Arc::new(ArcSwap::from_pointee(initial)),
            source,
            refresh_every: refresh_every.max(Duration::from_secs(1)),
            issuer: issuer.filter(|issuer| !issuer.is_empty()),
            audience: audience.filter(|audience| !audience.is_empty()),
            leeway,
            workspace_claim: workspace_claim.into(),
            http,
            unknown_kid: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// The verifier of `[auth.jwt]`; `None` when neither `jwks_file` nor `jwks_url` is set. A
    /// JWKS file is read now (and must be valid); a URL is fetched by [`JwtVerifier::refresh`].
    pub fn from_config(auth: &AuthConfig) -> Result<Option<Self>> {
        let jwt = &auth.jwt;
        let (source, initial) = if !jwt.jwks_file.is_empty() {
            let source = JwksSource::File(PathBuf::from(&jwt.jwks_file));
            let bytes = std::fs::read(&jwt.jwks_file).map_err(|error| {
                Error::invalid_argument(format!(
                    "cannot read auth.jwt.jwks_file {}: {error}",
                    jwt.jwks_file
                ))
            })?;
            let set = KeySet::parse(&bytes)
                .map_err(|error| error.context(format!("auth.jwt.jwks_file {}", jwt.jwks_file)))?;
            (source, set)
        } else if !jwt.jwks_url.is_empty() {
            let url = reqwest::Url::parse(&jwt.jwks_url).map_err(|error| {
                Error::invalid_argument(format!(
                    "auth.jwt.jwks_url {:?} is not a url: {error}",
                    jwt.jwks_url
                ))
            })?;
            if !jwks_url_allowed(&url) {
                return Err(Error::invalid_argument(format!(
                    "auth.jwt.jwks_url {:?} must be https (plain http only on this machine: \
                     127.0.0.1, ::1, localhost): whoever can answer it can mint tokens",
                    jwt.jwks_url
                )));
            }
            (JwksSource::Url(jwt.jwks_url.clone()), KeySet::default())
        } else {
            return Ok(None);
        };
        if jwt.issuer.is_empty() || jwt.audience.is_empty() {
            return Err(Error::invalid_argument(
                "auth.jwt.issuer and auth.jwt.audience are required with an identity provider's \
                 jwks: without them any token its keys signed is accepted, one issued for \
                 another application (or, with keys shared across tenants, another tenant) too",
            ));
        }
        Self::new(
            source,
            initial,
            Duration::from_secs(jwt.jwks_refresh_secs),
            Some(jwt.issuer.clone()),
            Some(jwt.audience.clone()),
            Duration::from_secs(auth.leeway_secs),
            auth.workspace_claim.clone(),
        )
        .map(Some)
    }

    /// Where the keys come from.
    pub fn source(&self) -> &JwksSource {
        &self.source
    }

    /// How often [`JwtVerifier::refresh`] should run.
    pub fn refresh_every(&self) -> Duration {
        self.refresh_every
    }

    /// Clock skew allowed on `exp` and `nbf`.
    pub fn leeway(&self) -> Duration {
        self.leeway
    }

    /// The ids of the current keys.
    pub fn kids(&self) -> Vec<String> {
        self.keys.load().kids()
    }

    /// Replaces the key set.
    pub fn replace_keys(&self, keys: KeySet) {
        self.keys.store(Arc::new(keys));
    }

    /// Reads the JWKS again; on success the new set replaces the old one, on failure the old
    /// one stays and the error is returned. Returns the number of keys loaded.
    pub async fn refresh(&self) -> Result<usize> {
        self.refresh_reporting_change()
            .await
            .map(|refreshed| refreshed.keys)
    }

    async fn refresh_reporting_change(&self) -> Result<Refreshed> {
        let bytes = match &self.source {
            JwksSource::File(path) => tokio::fs::read(path).await.map_err(|error| {
                Error::unavailable(format!("cannot read jwks file {}: {error}", path.display()))
            })?,
            JwksSource::Url(url) => self.fetch(url).await?,
        };
        let set = KeySet::parse(&bytes)?;
        let keys = set.len();
        let changed = self.keys.load().fingerprint != set.fingerprint;
        self.replace_keys(set);
        Ok(Refreshed { keys, changed })
    }

    async fn fetch(&self, url: &str) -> Result<Vec<u8>> {
        let response = self
            .http
            .get(url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|error| Error::unavailable(format!("jwks fetch failed: {error}")))?;
        let status = response.status();
        if !status.is_success() {
            return Err(Error::unavailable(format!(
                "jwks fetch answered http {}",
                status.as_u16()
            )));
        }
        // Read piece by piece: a broken or hostile endpoint must not make us hold a body of
        // any size before it is refused.
        let mut response = response;
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|error| Error::unavailable(format!("jwks fetch failed: {error}")))?
        {
            if bytes.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(Error::unavailable(format!(
                    "jwks is more than {MAX_JWKS_BYTES} bytes"
                )));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }

    /// Refreshes every [`JwtVerifier::refresh_every`], and soon after a token names a `kid`
    /// no key has (at most once per [`UNKNOWN_KID_REFRESH_GAP`]), until the task is aborted;
    /// failures are logged and the last good keys kept. A changed key set calls
    /// `on_change`, which empties the verified-token cache: a key the provider withdrew must
    /// stop vouching for the tokens it signed.
    pub(crate) async fn refresh_forever(self, on_change: impl Fn() + Send + 'static) {
        let mut ticker = tokio::time::interval(self.refresh_every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        let mut last_for_unknown_kid: Option<tokio::time::Instant> = None;
        loop {
            let may_read_for_unknown_kid =
                last_for_unknown_kid.is_none_or(|last| last.elapsed() >= UNKNOWN_KID_REFRESH_GAP);
            let gap_ends = last_for_unknown_kid.map_or_else(tokio::time::Instant::now, |last| {
                last + UNKNOWN_KID_REFRESH_GAP
            });
            tokio::select! {
                _ = ticker.tick() => {}
                () = self.unknown_kid.notified(), if may_read_for_unknown_kid => {
                    last_for_unknown_kid = Some(tokio::time::Instant::now());
                    tracing::debug!(source = %self.source, "a token names an unknown kid: reading the jwks again");
                }
                // The gap over, look again: an unknown kid seen meanwhile is read for then,
                // not at the next periodic refresh.
                () = tokio::time::sleep_until(gap_ends), if !may_read_for_unknown_kid => continue,
            }
            match self.refresh_reporting_change().await {
                Ok(Refreshed { keys, changed }) => {
                    if changed {
                        tracing::info!(source = %self.source, keys, "jwks changed");
                        on_change();
                    } else {
                        tracing::debug!(source = %self.source, keys, "jwks refreshed");
                    }
                }
                Err(error) => tracing::warn!(
                    source = %self.source,
                    %error,
                    kept = self.keys.load().len(),
                    "jwks refresh failed; keeping the last good keys"
                ),
            }
        }
    }

    /// The claims of `token` when a JWKS key of the header's algorithm (RS256, ES256 or
    /// EdDSA) verifies it and its claims are current and from the right issuer for the right
    /// audience. The key is chosen by `kid`; without a `kid` every key of the type is tried.
    pub fn verify(&self, token: &str) -> Result<Claims> {
        let header = peek_header(token)?;
        let algorithm = match header.alg.as_str() {
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            "EdDSA" => Algorithm::EdDSA,
            other => {
                return Err(Error::new(
                    Kind::InvalidToken,
                    format!("jwt: algorithm {other:?} is not accepted"),
                ))
            }
        };
        let set = self.keys.load();
        if set.is_empty() {
            // The verifier cannot answer yet (the first fetch has not succeeded): not the
            // token's fault, so not a refusal anyone should remember.
            return Err(Error::new(
                Kind::Unavailable,
                "jwt: no identity provider keys are loaded",
            ));
        }
        let candidates: Vec<&VerifyKey> = set
            .keys
            .iter()
            .filter(|key| key.kind.algorithm() == algorithm)
            .filter(|key| match &header.kid {
                Some(kid) => key.kid.as_deref() == Some(kid.as_str()),
                None => true,
            })
            .collect();
        if candidates.is_empty() {
            if header.kid.is_some() {
                // Perhaps a key published since the last refresh.
                self.unknown_kid.notify_one();
            }
            return Err(Error::new(
                Kind::InvalidToken,
                match &header.kid {
                    Some(kid) => format!(
                        "jwt: no {} key with kid {:?}",
                        header.alg,
                        crate::error::first_chars(kid, MAX_QUOTED_KID_CHARS)
                    ),
                    None => format!("jwt: no {} key", header.alg),
                },
            ));
        }
        let validation = self.validation(algorithm);
        decode_with_any(
            "jwt",
            token,
            candidates.iter().map(|candidate| &candidate.key),
            &validation,
            &self.workspace_claim,
        )
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &self.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        validation
    }
}

/// The shortest RSA modulus a JWKS key may have: shorter ones can be factored, and NIST has
/// not allowed them for signatures since 2013.
const MIN_RSA_MODULUS_BITS: usize = 2048;

/// The bit length of a big-endian RSA modulus (leading zero bytes do not count).
fn rsa_modulus_bits(modulus: &[u8]) -> usize {
    let Some(significant) = modulus.iter().position(|&byte| byte != 0) else {
        return 0;
    };
    let leading = modulus[significant].leading_zeros() as usize;
    (modulus.len() - significant) * 8 - leading
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use jsonwebtoken::{EncodingKey, Header};
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair as _};

    use super::*;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    struct Keys {
        ec: (EncodingKey, serde_json::Value),
        ed: (EncodingKey, serde_json::Value),
    }

    fn keys(ec_kid: &str, ed_kid: &str) -> Keys {
        let rng = ring::rand::SystemRandom::new();
        let ec_pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .unwrap();
        let ec_pair = EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            ec_pkcs8.as_ref(),
            &rng,
        )
        .unwrap();
        let point = ec_pair.public_key().as_ref();
        let ec_jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "kid": ec_kid, "use": "sig", "alg": "ES256",
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        });
        let ed_pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let ed_pair = Ed25519KeyPair::from_pkcs8(ed_pkcs8.as_ref()).unwrap();
        let ed_jwk = serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "kid": ed_kid,
            "x": b64(ed_pair.public_key().as_ref()),
        });
        Keys {
            ec: (EncodingKey::from_ec_der(ec_pkcs8.as_ref()), ec_jwk),
            ed: (EncodingKey::from_ed_der(ed_pkcs8.as_ref()), ed_jwk),
        }
    }

    fn verifier(jwks: &serde_json::Value) -> JwtVerifier {
        JwtVerifier::new(
            JwksSource::File("unused".into()),
            KeySet::parse(jwks.to_string().as_bytes()).unwrap(),
            Duration::from_secs(60),
            Some("https://idp.example".into()),
            Some("ringvault".into()),
            Duration::from_secs(5),
            "tenant_id",
        )
        .unwrap()
    }

    fn claims(exp_offset: i64) -> serde_json::Value {
        let now = super::super::claims::now_secs() as i64;
        serde_json::json!({
            "sub": "user-1", "tenant_id": "ws_1", "scope": "openid encrypt",
            "iss": "https://idp.example", "aud": "ringvault", "exp": now + exp_offset,
        })
    }

    fn sign(
        alg: Algorithm,
        kid: Option<&str>,
        claims: &serde_json::Value,
        key: &EncodingKey,
    ) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, key).unwrap()
    }

    #[test]
    fn es256_and_eddsa_by_kid_and_without() {
        let keys = keys("ec-1", "ed-1");
        let verifier = verifier(&serde_json::json!({"keys": [keys.ec.1, keys.ed.1]}));
        let token = sign(Algorithm::ES256, Some("ec-1"), &claims(600), &keys.ec.0);
        let verified = verifier.verify(&token).unwrap();
        assert_eq!(verified.sub, "user-1");
        assert_eq!(verified.workspace.as_deref(), Some("ws_1"));
        let token = sign(Algorithm::EdDSA, None, &claims(600), &keys.ed.0);
        assert!(verifier.verify(&token).is_ok());
        let token = sign(Algorithm::ES256, Some("unknown"), &claims(600), &keys.ec.0);
        assert_eq!(
            verifier.verify(&token).unwrap_err().kind(),
            Kind::InvalidToken
        );
    }

    #[test]
    fn claims_are_checked() {
        let keys = keys("ec-1", "ed-1");
        let verifier = verifier(&serde_json::json!({"keys": [keys.ec.1]}));
        let expired = sign(Algorithm::ES256, Some("ec-1"), &claims(-600), &keys.ec.0);
        assert_eq!(
            verifier.verify(&expired).unwrap_err().kind(),
            Kind::TokenExpired
        );
        let mut wrong_issuer = claims(600);
        wrong_issuer["iss"] = "https://evil.example".into();
        let token = sign(Algorithm::ES256, Some("ec-1"), &wrong_issuer, &keys.ec.0);
        assert_eq!(
            verifier.verify(&token).unwrap_err().kind(),
            Kind::InvalidToken
        );
        let mut wrong_audience = claims(600);
        wrong_audience["aud"] = "other".into();
        let token = sign(Algorithm::ES256, Some("ec-1"), &wrong_audience, &keys.ec.0);
        assert_eq!(
            verifier.verify(&token).unwrap_err().kind(),
            Kind::InvalidToken
        );
        let mut early = claims(600);
        early["nbf"] = (super::super::claims::now_secs() + 300).into();
        let token = sign(Algorithm::ES256, Some("ec-1"), &early, &keys.ec.0);
        assert_eq!(
            verifier.verify(&token).unwrap_err().kind(),
            Kind::InvalidToken
        );
    }

    #[test]
    fn another_key_or_hmac_fails() {
        let keys_a = keys("ec-1", "ed-1");
        let keys_b = keys("ec-1", "ed-1");
        let verifier = verifier(&serde_json::json!({"keys": [keys_a.ec.1, keys_a.ed.1]}));
        let token = sign(Algorithm::ES256, Some("ec-1"), &claims(600), &keys_b.ec.0);
        let error = verifier.verify(&token).unwrap_err();
        assert_eq!(error.kind(), Kind::InvalidToken);
        assert!(error.message().contains("signature"), "{error}");
        // HS256 "signed" with the public key bytes is refused before any key is tried.
        let public = keys_a.ed.1["x"].as_str().unwrap().as_bytes().to_vec();
        let token = sign(
            Algorithm::HS256,
            Some("ed-1"),
            &claims(600),
            &EncodingKey::from_secret(&public),
        );
        assert_eq!(
            verifier.verify(&token).unwrap_err().kind(),
            Kind::InvalidToken
        );
    }

    #[test]
    fn an_unknown_kid_is_refused_and_quoted_short() {
        let keys = keys("ec-1", "ed-1");
        let verifier = verifier(&serde_json::json!({"keys": [keys.ec.1]}));
        let kid = "k".repeat(100_000);
        let token = sign(Algorithm::ES256, Some(&kid), &claims(600), &keys.ec.0);
        let error = verifier.verify(&token).unwrap_err();
        assert_eq!(error.kind(), Kind::InvalidToken);
        assert!(
            error.message().contains(&"k".repeat(MAX_QUOTED_KID_CHARS)),
            "{error}"
        );
        assert!(
            error.message().len() < 200,
            "{} bytes",
            error.message().len()
        );
    }

    #[test]
    fn the_jwks_comes_over_https_or_from_this_machine() {
        for (url, allowed) in [
            ("https://idp.example/jwks.json", true),
            ("http://127.0.0.1:8080/jwks.json", true),
            ("http://[::1]/jwks.json", true),
            ("http://LOCALHOST/jwks.json", true),
            ("http://idp.example/jwks.json", false),
            ("http://10.0.0.1/jwks.json", false),
            ("http://localhost.idp.example/jwks.json", false),
            ("ftp://idp.example/jwks.json", false),
        ] {
            let parsed = reqwest::Url::parse(url).unwrap();
            assert_eq!(jwks_url_allowed(&parsed), allowed, "{url}");
        }
    }

    /// A loopback HTTP endpoint answering every request with `response`, for the test's life.
    async fn answering(response: Vec<u8>) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await;
                let _ = stream.write_all(&response).await;
                let _ = stream.shutdown().await;
            }
        });
        url
    }

    fn verifier_of(url: &str) -> JwtVerifier {
        let mut auth = crate::config::Config::defaults().auth;
        auth.jwt.jwks_url = url.into();
        auth.jwt.issuer = "https://idp.example".into();
        auth.jwt.audience = "vault".into();
        JwtVerifier::from_config(&auth).unwrap().unwrap()
    }

    #[tokio::test]
    async fn a_fetch_is_not_redirected_to_plain_http_elsewhere() {
        let url = answering(
            b"HTTP/1.1 302 Found\r\nlocation: http://192.0.2.1/jwks.json\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                .to_vec(),
        )
        .await;
        let error = verifier_of(&url).refresh().await.unwrap_err();
        assert_eq!(error.kind(), Kind::Unavailable);
        assert!(error.message().contains("redirect"), "{error}");
    }

    #[tokio::test]
    async fn a_jwks_body_past_the_limit_is_refused() {
        let body = vec![b' '; MAX_JWKS_BYTES + 1];
        let mut response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        response.extend_from_slice(&body);
        let error = verifier_of(&answering(response).await)
            .refresh()
            .await
            .unwrap_err();
        assert!(error.message().contains("more than"), "{error}");
    }

    #[test]
    fn a_jwks_needs_https_an_issuer_and_an_audience() {
        let configured = |url: &str, issuer: &str, audience: &str| {
            let mut auth = crate::config::Config::defaults().auth;
            auth.jwt.jwks_url = url.into();
            auth.jwt.issuer = issuer.into();
            auth.jwt.audience = audience.into();
            JwtVerifier::from_config(&auth).map(|verifier| verifier.is_some())
        };
        let idp = "https://idp.example/jwks.json";
        assert!(configured(idp, "https://idp.example", "vault").unwrap());
        for (url, issuer, audience) in [
            (
                "http://idp.example/jwks.json",
                "https://idp.example",
                "vault",
            ),
            (idp, "", "vault"),
            (idp, "https://idp.example", ""),
        ] {
            let error = configured(url, issuer, audience).unwrap_err();
            assert_eq!(
                error.kind(),
                Kind::InvalidArgument,
                "{url} {issuer:?} {audience:?}"
            );
        }
    }

    /// The same keys in another order or spelling are the same set (a provider behind several
    /// servers must not empty the token cache at every refresh); another key is not.
    #[test]
    fn a_key_set_is_known_by_its_keys_not_its_bytes() {
        let keys = keys("ec-1", "ed-1");
        let parse = |document: String| KeySet::parse(document.as_bytes()).unwrap().fingerprint;
        let one = parse(serde_json::json!({ "keys": [keys.ec.1, keys.ed.1] }).to_string());
        let reordered = parse(format!(
            "{{ \"keys\": [ {},\n {} ] }}",
            keys.ed.1, keys.ec.1
        ));
        assert_eq!(one, reordered);
        let other = keys_with_other_ec();
        assert_ne!(
            one,
            parse(serde_json::json!({ "keys": [other, keys.ed.1] }).to_string())
        );
    }

    fn keys_with_other_ec() -> serde_json::Value {
        keys("ec-1", "ed-unused").ec.1
    }

    #[test]
    fn jwks_parsing_skips_what_it_cannot_use() {
        let keys = keys("ec-1", "ed-1");
        let jwks = serde_json::json!({"keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"},
            {"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"},
            keys.ec.1,
        ]});
        let set = KeySet::parse(jwks.to_string().as_bytes()).unwrap();
        assert_eq!(set.kids(), vec!["ec-1".to_owned()]);
        assert!(KeySet::parse(br#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).is_err());
        assert!(KeySet::parse(b"not json").is_err());
    }

    #[test]
    fn rsa_keys_shorter_than_2048_bits_are_skipped() {
        use base64::Engine as _;
        let raw_modulus = |bytes: usize, first: u8| {
            let mut n = vec![0x5a_u8; bytes];
            n[0] = first;
            n
        };
        let modulus = |bytes: usize, first: u8| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw_modulus(bytes, first))
        };
        let rsa = |kid: &str, n: String| serde_json::json!({"kty": "RSA", "kid": kid, "n": n, "e": "AQAB"});
        let jwks = serde_json::json!({"keys": [
            rsa("rsa-1024", modulus(128, 0xc5)),
            // 2047 bits: the top bit of 256 bytes clear.
            rsa("rsa-2047", modulus(256, 0x45)),
            rsa("rsa-2048", modulus(256, 0xc5)),
            rsa("rsa-4096", modulus(512, 0x80)),
        ]});
        let set = KeySet::parse(jwks.to_string().as_bytes()).unwrap();
        assert_eq!(
            set.kids(),
            vec!["rsa-2048".to_owned(), "rsa-4096".to_owned()]
        );
        let short_only = serde_json::json!({"keys": [rsa("rsa-1024", modulus(128, 0xc5))]});
        assert!(KeySet::parse(short_only.to_string().as_bytes()).is_err());

        assert_eq!(rsa_modulus_bits(&raw_modulus(256, 0xc5)), 2048);
        assert_eq!(rsa_modulus_bits(&raw_modulus(256, 0x01)), 2041);
        // A leading zero byte (as some encoders write) does not count.
        let mut leading_zero = vec![0_u8];
        leading_zero.extend(vec![0xff_u8; 256]);
        assert_eq!(rsa_modulus_bits(&leading_zero), 2048);
        assert_eq!(rsa_modulus_bits(&[]), 0);
        // A modulus that is not base64url is malformed, and the key skipped.
        let malformed = serde_json::json!({"keys": [
            rsa("rsa-bad", "not base64!".to_owned()),
            rsa("rsa-2048", modulus(256, 0xc5)),
        ]});
        let set = KeySet::parse(malformed.to_string().as_bytes()).unwrap();
        assert_eq!(set.kids(), vec!["rsa-2048".to_owned()]);
    }
}
