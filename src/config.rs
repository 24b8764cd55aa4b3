//! Typed configuration: the embedded defaults of `config/ringvault.toml`, an optional file
//! merged over them, and `RINGVAULT_*` environment variables over both, validated at start.
//!
//! ```
//! let config = ringvault::config::Config::from_sources(
//!     None,
//!     [("RINGVAULT_NATS_URL".to_owned(), "nats://127.0.0.1:4333".to_owned())],
//! ).unwrap();
//! assert_eq!(config.nats.url, "nats://127.0.0.1:4333");
//! ```

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The embedded defaults.
pub const DEFAULTS: &str = include_str!("../config/ringvault.toml");
/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "RINGVAULT_";

/// `url` (one NATS URL or a comma-separated list) with any `user:password@` replaced by
/// `***@`, for logs and error messages: NATS URLs may carry credentials.
pub fn redacted_url(url: &str) -> String {
    url.split(',')
        .map(|one| match (one.find("://"), one.rfind('@')) {
            (Some(scheme_end), Some(at)) if at > scheme_end => {
                format!("{}***{}", &one[..scheme_end + 3], &one[at..])
            }
            (None, Some(at)) => format!("***{}", &one[at..]),
            _ => one.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `RINGVAULT_*` variables that are not settings: the command line's own (the config file, and
/// the client commands' server and token).
pub const COMMAND_LINE_VARIABLES: [&str; 3] =
    ["RINGVAULT_CONFIG", "RINGVAULT_URL", "RINGVAULT_TOKEN"];

/// Whether `name` has the shape of the variables Kubernetes gives every pod for each Service
/// of its namespace (a Service `ringvault` brings `RINGVAULT_SERVICE_HOST`,
/// `RINGVAULT_SERVICE_PORT[_<name>]`, `RINGVAULT_PORT` and `RINGVAULT_PORT_<n>_TCP[_PROTO|_PORT|_ADDR]`).
/// No setting has that shape, and refusing them would stop a pod beside such a Service.
fn is_kubernetes_service_link(name: &str) -> bool {
    if name.ends_with("_SERVICE_HOST") || name.contains("_SERVICE_PORT") || name.ends_with("_PORT")
    {
        return true;
    }
    name.split("_PORT_").skip(1).any(|rest| {
        let mut parts = rest.split('_');
        let number = parts.next().unwrap_or_default();
        let protocol = parts.next().unwrap_or_default();
        !number.is_empty()
            && number.bytes().all(|byte| byte.is_ascii_digit())
            && matches!(protocol, "TCP" | "UDP" | "SCTP")
    })
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML does not parse or does not fit the schema.
    #[error("invalid configuration: {0}")]
    Parse(String),
    /// An environment variable has a value of the wrong type.
    #[error("environment variable {name}: {reason}")]
    Env {
        /// The variable.
        name: String,
        /// Why.
        reason: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// NATS connection and API surface.
    pub nats: NatsConfig,
    /// Object storage.
    pub storage: StorageConfig,
    /// Master keys.
    pub master_key: MasterKeyConfig,
    /// DEK cache.
    pub cache: CacheConfig,
    /// Credentials.
    pub auth: AuthConfig,
    /// Key events.
    pub events: EventsConfig,
    /// Scheduled rotation.
    pub rotation: RotationConfig,
    /// Health and metrics over HTTP.
    pub http: HttpConfig,
    /// Actor supervision.
    pub supervision: SupervisionConfig,
    /// Logging.
    pub log: LogConfig,
}

/// `[nats]`
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL.
    pub url: String,
    /// Subject prefix.
    pub prefix: String,
    /// Queue group shared by replicas.
    pub queue_group: String,
    /// Requests handled at once.
    pub max_inflight: usize,
    /// Queue subscriptions per method, each served by its own task (0: one per two cores, at
    /// least one).
    pub subscriptions_per_method: usize,
    /// Largest plaintext accepted (bytes).
    pub max_plaintext_bytes: usize,
    /// A `.creds` file for the connection (empty: none).
    pub credentials_file: String,
    /// A token for the connection (empty: none).
    pub token: String,
}

/// `[storage]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `file`, `s3` or `memory`.
    pub backend: String,
    /// Root of the file backend.
    pub path: PathBuf,
    /// Budget of one storage call.
    pub timeout_ms: u64,
    /// Use conditional writes where supported.
    pub conditional_writes: bool,
    /// `[storage.s3]`
    pub s3: S3Config,
}

/// `[storage.s3]`
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint URL; empty for AWS.
    pub endpoint: String,
    /// Region.
    pub region: String,
    /// Bucket.
    pub bucket: String,
    /// Access key id; empty: `AWS_ACCESS_KEY_ID`, else the AWS role providers.
    pub access_key_id: String,
    /// Secret; empty: `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: String,
    /// Session token of temporary credentials; empty: `AWS_SESSION_TOKEN` unless
    /// `access_key_id` is set here.
    pub session_token: String,
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &redacted_url(&self.url))
            .field("prefix", &self.prefix)
            .field("queue_group", &self.queue_group)
            .field("max_inflight", &self.max_inflight)
            .field("subscriptions_per_method", &self.subscriptions_per_method)
            .field("max_plaintext_bytes", &self.max_plaintext_bytes)
            .field("credentials_file", &self.credentials_file)
            .field("token", &(!self.token.is_empty()).then_some("<redacted>"))
            .finish()
    }
}

impl std::fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtConfig")
            .field("jwks_file", &self.jwks_file)
            .field("jwks_url", &redacted_url(&self.jwks_url))
            .field("jwks_refresh_secs", &self.jwks_refresh_secs)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// `[master_key]`
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterKeyConfig {
    /// The current key, base64 (empty: read `current_file`).
    pub current: String,
    /// File holding the current key.
    pub current_file: PathBuf,
    /// Generate `current_file` when absent (development default).
    pub generate_if_missing: bool,
    /// Previous keys, base64.
    pub previous: Vec<String>,
}

impl std::fmt::Debug for MasterKeyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKeyConfig")
            .field("current_file", &self.current_file)
            .field("generate_if_missing", &self.generate_if_missing)
            .field("previous", &self.previous.len())
            .finish_non_exhaustive()
    }
}

/// `[cache]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Freshness of LATEST.
    pub fresh_for_secs: u64,
    /// Longest LATEST is served without a storage read.
    pub max_stale_secs: u64,
    /// Cached DEKs.
    pub max_entries: usize,
}

/// `[auth]`
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// File holding the development token (empty: none).
    pub token_file: PathBuf,
    /// Generate `token_file` when absent.
    pub generate_token_if_missing: bool,
    /// Static bearer tokens.
    #[serde(default)]
    pub tokens: Vec<StaticTokenConfig>,
    /// HS256 secrets of minted tokens; the first signs.
    pub signing_secrets: Vec<String>,
    /// `iss` of minted tokens.
    pub issuer: String,
    /// Required `aud` of minted tokens (empty: not checked).
    pub audience: String,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway_secs: u64,
    /// The claim naming a token's workspace.
    pub workspace_claim: String,
    /// External identity provider.
    pub jwt: JwtConfig,
    /// Per-workspace rate limit.
    pub rate_limit: RateLimitConfig,
    /// Permission policies by subject or workspace.
    #[serde(default)]
    pub policies: Vec<PolicyConfig>,
}

/// `[auth.jwt]`: JWTs of an external identity provider.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// A JWKS file.
    pub jwks_file: String,
    /// A JWKS URL (http or https).
    pub jwks_url: String,
    /// Refresh period of the JWKS.
    pub jwks_refresh_secs: u64,
    /// Required `iss` of the provider's tokens (must be set with a JWKS).
    pub issuer: String,
    /// Required `aud` of the provider's tokens (must be set with a JWKS).
    pub audience: String,
}

/// `[auth.rate_limit]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Whether limits apply.
    pub enabled: bool,
    /// Sustained rate per workspace.
    pub requests_per_second: u64,
    /// Burst per workspace.
    pub burst: u64,
}

/// `[[auth.policies]]`: the most a subject or a workspace may do. A token's effective
/// permissions are its own intersected with every policy that matches it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// The subject it applies to (empty: any).
    #[serde(default)]
    pub subject: String,
    /// The workspace it applies to (empty: any).
    #[serde(default)]
    pub workspace: String,
    /// The permissions allowed.
    pub permissions: Vec<String>,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("token_file", &self.token_file)
            .field("tokens", &self.tokens.len())
            .field("signing_secrets", &self.signing_secrets.len())
            .field("issuer", &self.issuer)
            .field("jwt", &self.jwt)
            .field("rate_limit", &self.rate_limit)
            .field("policies", &self.policies.len())
            .finish_non_exhaustive()
    }
}

/// `[[auth.tokens]]`: one static bearer token.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticTokenConfig {
    /// The token itself, or empty when `sha256` is given.
    #[serde(default)]
    pub token: String,
    /// Hex SHA-256 of the token, so that the file holds no secret.
    #[serde(default)]
    pub sha256: String,
    /// Who presents it (audit, logs).
    pub subject: String,
    /// The workspace it is bound to; empty: all keyrings.
    #[serde(default)]
    pub workspace: String,
    /// Permissions such as `encrypt` or `decrypt:ws_42/*`.
    pub permissions: Vec<String>,
}

/// `[events]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// Capture events in a JetStream stream.
    pub jetstream: bool,
    /// The stream's name.
    pub stream: String,
    /// Retention by age.
    pub max_age_secs: u64,
    /// Retention by count.
    pub max_messages: i64,
}

/// `[rotation]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationConfig {
    /// Default age after which LATEST is rotated (0: never).
    pub rotate_after_secs: u64,
    /// How often ages are checked.
    pub check_interval_secs: u64,
    /// Per-keyring ages, first matching pattern wins.
    #[serde(default)]
    pub keyrings: Vec<KeyringRotationConfig>,
}

/// `[[rotation.keyrings]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyringRotationConfig {
    /// Keyrings it applies to (`*` matches anything).
    pub pattern: String,
    /// Age after which LATEST is rotated (0: never).
    pub rotate_after_secs: u64,
}

/// `[http]`
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address; empty: off.
    pub listen: String,
    /// HS256 secret of role tokens.
    pub token_secret: String,
    /// Required `aud` of role tokens (empty: not checked).
    pub audience: String,
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("listen", &self.listen)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

/// `[supervision]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisionConfig {
    /// First restart backoff.
    pub restart_backoff_ms: u64,
    /// Failures tolerated within the window.
    pub max_restarts: usize,
    /// The window.
    pub window_secs: u64,
    /// Timeout of every actor call.
    pub call_timeout_ms: u64,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// Level filter.
    pub level: String,
}

/// A TOML error as its line and message, never the source line it would quote: the line may
/// hold a master key or a token.
fn parse_error(text: &str, error: &toml::de::Error) -> String {
    let message = without_quoted(error.message());
    match error.span() {
        Some(span) => {
            let before = &text.as_bytes()[..span.start.min(text.len())];
            let line = before.iter().filter(|&&byte| byte == b'\n').count() + 1;
            format!("line {line}: {message}")
        }
        None => message,
    }
}

/// `message` with every double-quoted part replaced by `"…"`: a deserialization error quotes
/// the value it could not take, which may be a secret.
fn without_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut inside = false;
    let mut escaped = false;
    for character in message.chars() {
        if inside && escaped {
            escaped = false;
            continue;
        }
        if inside && character == '\\' {
            escaped = true;
            continue;
        }
        if character == '"' {
            if inside {
                out.push_str("…\"");
            } else {
                out.push('"');
            }
            inside = !inside;
        } else if !inside {
            out.push(character);
        }
    }
    out
}

/// The process's `RINGVAULT_*` variables. Others are not looked at, whatever their bytes
/// (`std::env::vars` panics on one that is not UTF-8); a `RINGVAULT_*` one that is not UTF-8
/// is a configuration error.
fn ringvault_env() -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str().filter(|name| name.starts_with(ENV_PREFIX)) else {
            continue;
        };
        let Some(value) = value.to_str() else {
            return Err(ConfigError::Env {
                name: name.to_owned(),
                reason: "its value is not UTF-8".to_owned(),
            });
        };
        out.push((name.to_owned(), value.to_owned()));
    }
    Ok(out)
}

impl Config {
    /// The embedded defaults, with no file and no environment.
    pub fn defaults() -> Config {
        Self::from_sources(None, std::iter::empty()).expect("embedded defaults are valid")
    }

    /// Loads the defaults, `file` over them, and the process environment over both.
    pub fn load(file: Option<&std::path::Path>) -> Result<Config, ConfigError> {
        let text = match file {
            Some(path) => {
                Some(
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                        path: path.to_owned(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        Self::from_sources(text.as_deref(), ringvault_env()?)
    }

    /// Builds a configuration from a TOML text (merged over the defaults) and environment
    /// pairs; only `RINGVAULT_*` names are looked at.
    pub fn from_sources(
        file: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut merged: toml::Table = DEFAULTS
            .parse()
            .map_err(|error| ConfigError::Parse(format!("embedded defaults: {error}")))?;
        if let Some(text) = file {
            let overlay: toml::Table = text
                .parse()
                .map_err(|error: toml::de::Error| ConfigError::Parse(parse_error(text, &error)))?;
            merge(&mut merged, overlay);
        }
        let env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(name, _)| name.starts_with(ENV_PREFIX))
            .collect();
        let applied = apply_env(&mut merged, &mut Vec::new(), &env)?;
        // A misspelt name would otherwise leave its setting at the default without a word:
        // `RINGVAULT_MASTERKEY_CURRENT` would have the service generate and use a dev key.
        if let Some((name, _)) = env.iter().find(|(name, _)| {
            !applied.contains(name)
                && !COMMAND_LINE_VARIABLES.contains(&name.as_str())
                && !is_kubernetes_service_link(name)
        }) {
            return Err(ConfigError::Env {
                name: name.clone(),
                reason: "no such setting (the settings and their variables are listed in \
                         README.md, Configuration)"
                    .to_owned(),
            });
        }
        let mut config: Config =
            toml::Value::Table(merged)
                .try_into()
                .map_err(|error: toml::de::Error| {
                    ConfigError::Parse(without_quoted(&error.to_string()))
                })?;
        // tracing's filter reads a level with a space beside it as a target's name: `"info "`
        // would silence every line.
        config.log.level = config.log.level.trim().to_owned();
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        /// Requests in flight per replica: well past what one process serves, and within what
        /// the drain can wait for (`u32` permits).
        const MAX_INFLIGHT: usize = 1 << 20;
        /// Allowed clock skew on `exp` and `nbf`: an hour is generous; more turns an expiry into
        /// a suggestion.
        const MAX_LEEWAY_SECS: u64 = 3600;
        let invalid = |message: String| Err(ConfigError::Invalid(message));
        if !self.nats.url.contains("://") && !self.nats.url.contains(':') {
            return invalid(format!("nats.url {:?} is not a url", self.nats.url));
        }
        if self.nats.prefix.is_empty()
            || self
                .nats
                .prefix
                .contains(|c: char| c.is_whitespace() || c == '*' || c == '>')
            || self.nats.prefix.split('.').any(str::is_empty)
        {
            return invalid(format!(
                "nats.prefix {:?} is not a valid subject prefix",
                self.nats.prefix
            ));
        }
        if self.nats.max_inflight == 0 || self.nats.max_inflight > MAX_INFLIGHT {
            return invalid(format!(
                "nats.max_inflight must be 1 to {MAX_INFLIGHT} (it is {})",
                self.nats.max_inflight
            ));
        }
        if self.nats.queue_group.is_empty()
            || self
                .nats
                .queue_group
                .contains(|c: char| c.is_whitespace() || c == '*' || c == '>')
        {
            return invalid(format!(
                "nats.queue_group {:?} is not a valid queue group name",
                self.nats.queue_group
            ));
        }
        if self.nats.max_plaintext_bytes == 0 {
            return invalid("nats.max_plaintext_bytes must be at least 1".into());
        }
        match self.storage.backend.as_str() {
            "file" | "memory" => {}
            "s3" if self.storage.s3.bucket.is_empty() => {
                return invalid(
                    "storage.s3.bucket is required with storage.backend = \"s3\"".into(),
                )
            }
            "s3" => {}
            other => {
                return invalid(format!(
                    "storage.backend {other:?} is not one of \"file\", \"s3\", \"memory\""
                ))
            }
        }
        if self.storage.timeout_ms == 0 {
            return invalid("storage.timeout_ms must be at least 1".into());
        }
        if self.cache.fresh_for_secs > self.cache.max_stale_secs {
            return invalid("cache.fresh_for_secs must not exceed cache.max_stale_secs".into());
        }
        if self.cache.max_entries == 0 {
            return invalid("cache.max_entries must be at least 1".into());
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return invalid(format!(
                "log.format {:?} is not \"text\" or \"json\"",
                self.log.format
            ));
        }
        if self.supervision.call_timeout_ms == 0 {
            return invalid("supervision.call_timeout_ms must be at least 1".into());
        }
        if self.supervision.window_secs == 0 {
            return invalid(
                "supervision.window_secs must be at least 1 (0 would never give up)".into(),
            );
        }
        if self.auth.leeway_secs > MAX_LEEWAY_SECS {
            return invalid(format!(
                "auth.leeway_secs is at most {MAX_LEEWAY_SECS} (clock skew, not a grace period); it is {}",
                self.auth.leeway_secs
            ));
        }
        // A bare word is a target to tracing's filter, not a level: `warning` would keep only
        // the lines of a target named `warning`, and with them every audit line would go.
        // Trimmed already by `from_sources`.
        let level = self.log.level.as_str();
        let bare_level_ok = ["trace", "debug", "info", "warn", "error", "off"]
            .iter()
            .any(|known| level.eq_ignore_ascii_case(known));
        if (!level.contains(['=', ',']) && !bare_level_ok)
            || tracing_subscriber::EnvFilter::try_new(level).is_err()
        {
            return invalid(format!(
                "log.level {level:?} is not a level (trace, debug, info, warn, error, off) or a \
                 filter such as \"info,ringvault::audit=off\""
            ));
        }
        if !self.http.listen.is_empty() {
            let port = self
                .http
                .listen
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(_))) if !host.is_empty()) {
                return invalid(format!(
                    "http.listen {:?} is not an address with a port (e.g. 127.0.0.1:9464)",
                    self.http.listen
                ));
            }
        }
        if !self.http.listen.is_empty() && self.http.token_secret.len() < 32 {
            return invalid(format!(
                "http.token_secret must be at least 32 bytes when http.listen is set (it is {} bytes)",
                self.http.token_secret.len()
            ));
        }
        if self.events.stream.is_empty() || self.events.stream.contains(['.', ' ', '*', '>']) {
            return invalid(format!(
                "events.stream {:?} is not a valid stream name",
                self.events.stream
            ));
        }
        for (index, secret) in self.auth.signing_secrets.iter().enumerate() {
            if secret.len() < 32 {
                return invalid(format!(
                    "auth.signing_secrets[{index}] is {} bytes; at least 32 are required",
                    secret.len()
                ));
            }
        }
        if !self.auth.jwt.jwks_file.is_empty() && !self.auth.jwt.jwks_url.is_empty() {
            return invalid("auth.jwt: set jwks_file or jwks_url, not both".into());
        }
        if self.auth.rate_limit.enabled
            && (self.auth.rate_limit.requests_per_second == 0 || self.auth.rate_limit.burst == 0)
        {
            return invalid(
                "auth.rate_limit: requests_per_second and burst must be at least 1".into(),
            );
        }
        for (index, token) in self.auth.tokens.iter().enumerate() {
            if token.token.is_empty() == token.sha256.is_empty() {
                return invalid(format!(
                    "auth.tokens[{index}] ({:?}) needs exactly one of token or sha256",
                    token.subject
                ));
            }
        }
        Ok(())
    }

    /// Budget of one storage call.
    pub fn storage_timeout(&self) -> Duration {
        Duration::from_millis(self.storage.timeout_ms)
    }

    /// Timeout of actor calls.
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.supervision.call_timeout_ms)
    }
}

fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(base_table)), toml::Value::Table(overlay_table)) => {
                merge(base_table, overlay_table)
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Overrides every leaf of `table` that has a `RINGVAULT_<PATH>` variable, parsed as the
/// leaf's type; returns the names of the variables applied.
fn apply_env(
    table: &mut toml::Table,
    path: &mut Vec<String>,
    env: &[(String, String)],
) -> Result<Vec<String>, ConfigError> {
    let mut applied = Vec::new();
    for (key, value) in table.iter_mut() {
        path.push(key.clone());
        if let toml::Value::Table(inner) = value {
            applied.extend(apply_env(inner, path, env)?);
        } else {
            let name = format!("{ENV_PREFIX}{}", path.join("_").to_uppercase());
            if let Some((_, text)) = env.iter().rev().find(|(candidate, _)| *candidate == name) {
                *value = parse_env_value(&name, value, text)?;
                applied.push(name);
            }
        }
        path.pop();
    }
    Ok(applied)
}

fn parse_env_value(name: &str, like: &toml::Value, text: &str) -> Result<toml::Value, ConfigError> {
    let wrong = |expected: &str| ConfigError::Env {
        name: name.to_owned(),
        reason: format!("expected {expected}, got {text:?}"),
    };
    Ok(match like {
        toml::Value::Integer(_) => {
            toml::Value::Integer(text.trim().parse().map_err(|_| wrong("an integer"))?)
        }
        toml::Value::Boolean(_) => match text.trim() {
            "true" | "1" | "yes" => toml::Value::Boolean(true),
            "false" | "0" | "no" => toml::Value::Boolean(false),
            _ => return Err(wrong("true or false")),
        },
        toml::Value::Array(_) => toml::Value::Array(
            text.split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(|item| toml::Value::String(item.to_owned()))
                .collect(),
        ),
        _ => toml::Value::String(text.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect()
    }

    /// A configuration error names the line or the setting, never the value: the value may be
    /// a master key or a token.
    #[test]
    fn configuration_errors_never_quote_values() {
        const SECRET: &str = "CiRrZWtfc2VjcmV0X3ZhbHVlX3RoYXRfbXVzdF9ub3RfbGVhaw";
        let duplicate = format!("[master_key]\ncurrent = \"x\"\ncurrent = \"{SECRET}\"\n");
        let wrong_type = format!("[master_key]\nprevious = \"{SECRET}\"\n");
        let inner_quote = format!("[auth]\nsigning_secrets = 'ab\"{SECRET}'\n");
        for text in [duplicate, wrong_type, inner_quote] {
            let error = Config::from_sources(Some(&text), Vec::new())
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(!error.contains(SECRET), "{error}");
            assert!(!error.contains("CiRr"), "{error}");
        }
    }

    #[test]
    fn values_that_would_break_the_service_are_refused() {
        for (name, value) in [
            ("RINGVAULT_AUTH_LEEWAY_SECS", "31536000"),
            ("RINGVAULT_NATS_MAX_INFLIGHT", "100000000000"),
            ("RINGVAULT_NATS_QUEUE_GROUP", ""),
            ("RINGVAULT_NATS_QUEUE_GROUP", "ring vault"),
            ("RINGVAULT_NATS_PREFIX", "vault..v1"),
            ("RINGVAULT_NATS_PREFIX", "vault\tv1"),
            ("RINGVAULT_SUPERVISION_WINDOW_SECS", "0"),
            ("RINGVAULT_LOG_LEVEL", "warning"),
            ("RINGVAULT_LOG_LEVEL", "info,=["),
        ] {
            assert!(
                Config::from_sources(None, env(&[(name, value)])).is_err(),
                "{name}={value:?} accepted"
            );
        }
    }

    #[test]
    fn debug_output_holds_no_nats_credentials() {
        let config = Config::from_sources(
            None,
            env(&[
                (
                    "RINGVAULT_NATS_URL",
                    "nats://user:hunter2-password@127.0.0.1:4222",
                ),
                ("RINGVAULT_NATS_TOKEN", "nats-token-s3cret"),
            ]),
        )
        .unwrap();
        let printed = format!("{config:?}");
        assert!(!printed.contains("hunter2-password"), "{printed}");
        assert!(!printed.contains("nats-token-s3cret"), "{printed}");
        assert!(printed.contains("127.0.0.1:4222"), "{printed}");
    }

    #[test]
    fn log_levels_and_filters_are_accepted() {
        for level in [
            "info",
            "WARN",
            "off",
            "info,ringvault::audit=off",
            "ringvault=debug",
        ] {
            let config = Config::from_sources(None, env(&[("RINGVAULT_LOG_LEVEL", level)]));
            assert!(config.is_ok(), "{level:?} refused: {:?}", config.err());
        }
        for (level, kept) in [("info ", "info"), (" warn\n", "warn")] {
            let config = Config::from_sources(None, env(&[("RINGVAULT_LOG_LEVEL", level)]));
            assert_eq!(config.unwrap().log.level, kept);
        }
    }

    #[test]
    fn http_listen_must_name_a_port() {
        let secret = (
            "RINGVAULT_HTTP_TOKEN_SECRET",
            "a-role-token-secret-of-32-bytes-or-more",
        );
        for listen in ["127.0.0.1:9464", "localhost:9464", "[::1]:9464"] {
            let config =
                Config::from_sources(None, env(&[secret, ("RINGVAULT_HTTP_LISTEN", listen)]));
            assert!(config.is_ok(), "{listen:?} refused: {:?}", config.err());
        }
        for listen in ["nohost", ":9464", "127.0.0.1:99999", "127.0.0.1:"] {
            let config =
                Config::from_sources(None, env(&[secret, ("RINGVAULT_HTTP_LISTEN", listen)]));
            assert!(config.is_err(), "{listen:?} accepted");
        }
    }

    #[test]
    fn defaults_are_the_embedded_ones() {
        let config = Config::defaults();
        assert_eq!(config.nats.url, "nats://127.0.0.1:4222");
        assert_eq!(config.nats.prefix, "vault.v1");
        assert_eq!(config.storage.backend, "file");
        assert_eq!(config.storage.path, PathBuf::from("./data/store"));
        assert_eq!(
            config.master_key.current_file,
            PathBuf::from("./data/master.key")
        );
        assert_eq!(config.cache.max_entries, 10_000);
        assert_eq!(config.nats.max_plaintext_bytes, 1 << 20);
    }

    #[test]
    fn file_then_env_override() {
        let file = "[nats]\nprefix = \"acme.vault\"\n[cache]\nmax_entries = 5\n";
        let config = Config::from_sources(
            Some(file),
            env(&[
                ("RINGVAULT_CACHE_MAX_ENTRIES", "7"),
                ("RINGVAULT_MASTER_KEY_PREVIOUS", "a, b"),
                ("RINGVAULT_STORAGE_CONDITIONAL_WRITES", "false"),
                ("OTHER_VAR", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(config.nats.prefix, "acme.vault");
        assert_eq!(config.cache.max_entries, 7);
        assert_eq!(config.master_key.previous, ["a", "b"]);
        assert!(!config.storage.conditional_writes);
    }

    #[test]
    fn example_configurations_are_valid() {
        for (name, text) in [
            ("aws-s3", include_str!("../config/examples/aws-s3.toml")),
            ("minio", include_str!("../config/examples/minio.toml")),
            ("garage", include_str!("../config/examples/garage.toml")),
            ("r2", include_str!("../config/examples/r2.toml")),
        ] {
            let config = Config::from_sources(Some(text), [])
                .unwrap_or_else(|error| panic!("{name}: {error}"));
            assert_eq!(config.storage.backend, "s3", "{name}");
        }
    }

    #[test]
    fn invalid_configuration_is_a_clear_error() {
        let error = Config::from_sources(None, env(&[("RINGVAULT_CACHE_MAX_ENTRIES", "lots")]))
            .unwrap_err();
        assert!(
            error.to_string().contains("RINGVAULT_CACHE_MAX_ENTRIES"),
            "{error}"
        );
        let error = Config::from_sources(Some("[nats]\nurll = \"x\""), []).unwrap_err();
        assert!(error.to_string().contains("urll"), "{error}");
        let error =
            Config::from_sources(None, env(&[("RINGVAULT_STORAGE_BACKEND", "s3")])).unwrap_err();
        assert!(error.to_string().contains("bucket"), "{error}");
        let error =
            Config::from_sources(None, env(&[("RINGVAULT_NATS_PREFIX", "a.>")])).unwrap_err();
        assert!(error.to_string().contains("prefix"), "{error}");
    }

    #[test]
    fn nats_urls_lose_their_credentials_in_logs() {
        assert_eq!(
            redacted_url("nats://127.0.0.1:4222"),
            "nats://127.0.0.1:4222"
        );
        assert_eq!(
            redacted_url("nats://svc:s3cret@nats.internal:4222"),
            "nats://***@nats.internal:4222"
        );
        assert_eq!(
            redacted_url("tls://t0k@a:4222,nats://b:4222"),
            "tls://***@a:4222,nats://b:4222"
        );
        assert_eq!(redacted_url("user:pw@host:4222"), "***@host:4222");
    }

    #[test]
    fn a_misspelt_variable_is_refused_rather_than_ignored() {
        let error = Config::from_sources(None, env(&[("RINGVAULT_MASTERKEY_CURRENT", "AAAA")]))
            .unwrap_err();
        assert!(
            matches!(&error, ConfigError::Env { name, .. } if name == "RINGVAULT_MASTERKEY_CURRENT"),
            "{error}"
        );
        assert!(error.to_string().contains("no such setting"), "{error}");

        // The command line's own variables, Kubernetes' service links and other programs'
        // are not settings to check.
        let config = Config::from_sources(
            None,
            env(&[
                ("RINGVAULT_CONFIG", "/etc/ringvault.toml"),
                ("RINGVAULT_URL", "nats://127.0.0.1:4222"),
                ("RINGVAULT_TOKEN", "secret"),
                ("AWS_REGION", "eu-west-1"),
                ("RINGVAULT_STORAGE_S3_SESSION_TOKEN", "session"),
                ("RINGVAULT_SERVICE_HOST", "10.0.0.11"),
                ("RINGVAULT_SERVICE_PORT", "9464"),
                ("RINGVAULT_SERVICE_PORT_METRICS", "9464"),
                ("RINGVAULT_PORT", "tcp://10.0.0.11:9464"),
                ("RINGVAULT_PORT_9464_TCP", "tcp://10.0.0.11:9464"),
                ("RINGVAULT_PORT_9464_TCP_ADDR", "10.0.0.11"),
                ("RINGVAULT_NATS_SERVICE_HOST", "10.0.0.12"),
                ("RINGVAULT_NATS_PORT_4222_TCP_PROTO", "tcp"),
            ]),
        )
        .unwrap();
        assert_eq!(config.storage.s3.session_token, "session");
    }
}
