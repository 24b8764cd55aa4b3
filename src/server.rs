//! The running service: bootstraps keys, storage and credentials from a [`Config`], starts the
//! actor tree on a NATS connection it is given, and runs until a shutdown signal (drain, then
//! stop) or until supervision gives up. Tests start it in-process with [`Server::start`].

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorRef};
use tokio::sync::watch;

use crate::actors::{
    ActorSlot, ActorStorage, AuthHandle, EventStream, EventsArgs, EventsHandle, GatewayArgs, Hooks,
    KeyringRegistry, SupervisionPolicy, Supervisor, SupervisorArgs, SupervisorMsg,
};
use crate::auth::{
    Authenticator, CredentialSource, Principal, RateLimiter, StaticToken, StaticTokens,
};
use crate::config::Config;
use crate::crypto::{Kek, MasterKeys};
use crate::http::HealthSource;
use crate::keyring::{CachePolicy, KeyringStore, Keyrings, RotationPolicy};
use crate::rpc::Vault;
use crate::storage::{ObjectStorage, ObjectStoreBackend, S3Settings, Storage, StoragePolicy};

/// Room kept in a NATS message for headers and the envelope's own fields.
const REPLY_OVERHEAD: usize = 4096;

/// Why the service could not start or had to stop. Each has its process exit code.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is unusable (exit 64).
    #[error("{0}")]
    Config(String),
    /// A dependency (NATS, storage) is unreachable (exit 69).
    #[error("{0}")]
    Unavailable(String),
    /// Supervision gave up after repeated failures (exit 70).
    #[error("fatal: {0}")]
    Fatal(String),
    /// Anything else (exit 70).
    #[error("{0}")]
    Internal(String),
}

impl ServerError {
    /// The process exit code (sysexits.h).
    pub fn exit_code(&self) -> i32 {
        match self {
            ServerError::Config(_) => 64,
            ServerError::Unavailable(_) => 69,
            ServerError::Fatal(_) | ServerError::Internal(_) => 70,
        }
    }
}

/// A started service.
pub struct Server {
    supervisor: ActorRef<SupervisorMsg>,
    fatal: watch::Receiver<Option<String>>,
    keyrings: Keyrings,
    registry: KeyringRegistry,
    hooks: Hooks,
    max_plaintext_bytes: usize,
    http: Option<HttpServer>,
}

/// The running health and metrics endpoint.
struct HttpServer {
    address: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Whether one actor is up.
type AliveCheck = Box<dyn Fn() -> bool + Send + Sync>;

/// What `/health` reports: the NATS connection, the permanent actors, the cache.
struct ServiceHealth {
    nats: async_nats::Client,
    actors: Vec<(&'static str, AliveCheck)>,
    keyrings: Keyrings,
}

impl HealthSource for ServiceHealth {
    fn report(&self) -> (serde_json::Value, bool) {
        let nats_connected =
            self.nats.connection_state() == async_nats::connection::State::Connected;
        let mut healthy = nats_connected;
        let mut actors = serde_json::Map::new();
        for (name, alive) in &self.actors {
            let up = alive();
            healthy &= up;
            actors.insert(
                (*name).to_owned(),
                serde_json::Value::from(if up { "up" } else { "down" }),
            );
        }
        let report = serde_json::json!({
            "status": if healthy { "ok" } else { "degraded" },
            "nats": if nats_connected { "connected" } else { "disconnected" },
            "actors": actors,
            "cached_keyrings": self.keyrings.cached_keyrings(),
            "cached_keys": self.keyrings.cached_keys(),
        });
        (report, healthy)
    }

    fn update_gauges(&self) {
        metrics::gauge!("ringvault_cache_keys").set(self.keyrings.cached_keys() as f64);
        metrics::gauge!("ringvault_cache_keyrings").set(self.keyrings.cached_keyrings() as f64);
        let connects = self
            .nats
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed);
        metrics::gauge!("ringvault_nats_reconnects").set(connects.saturating_sub(1) as f64);
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("keyrings", &self.keyrings)
            .field("max_plaintext_bytes", &self.max_plaintext_bytes)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Starts the service on `nats` as `config` says.
    pub async fn start(config: &Config, nats: async_nats::Client) -> Result<Server, ServerError> {
        // The recorder first: metric handles registered before it would record nowhere.
        crate::http::metrics_handle();
        let master_keys = Arc::new(load_master_keys(config)?);
        let backend = open_backend(config).await?;
        let authenticator = load_authenticator(config)?;
        let hooks = Hooks::default();
        let call_timeout = config.call_timeout();

        let replica = hex::encode(rand::random::<[u8; 8]>());
        let storage_slot = ActorSlot::new("storage actor");
        let events_slot = ActorSlot::new("events actor");
        let auth_slot = ActorSlot::new("auth actor");
        let gateway_slot = ActorSlot::new("gateway");
        let actor_storage = ActorStorage::new(
            backend.clone(),
            storage_slot.clone(),
            config.storage_timeout() + Duration::from_secs(1),
        );
        let policy = StoragePolicy {
            timeout: config.storage_timeout(),
            ..StoragePolicy::default()
        };
        // Probe the store itself before the actors exist: reachability and whether it
        // enforces conditional writes decide how the actors' storage behaves.
        let mut direct = Storage::new(backend.clone(), policy);
        if !config.storage.conditional_writes {
            direct = direct.without_conditional_writes();
        }
        direct.probe().await.map_err(|error| {
            ServerError::Unavailable(format!(
                "storage {} is not usable: {error}",
                direct.describe()
            ))
        })?;
        let mut storage = Storage::new(Arc::new(actor_storage), policy);
        if !direct.conditional_writes() {
            storage = storage.without_conditional_writes();
        } else if !direct.compare_and_swap() {
            storage = storage.without_compare_and_swap();
        }
        tracing::info!(
            store = storage.describe(),
            conditional_writes = storage.conditional_writes(),
            master_key = master_keys.current().id(),
            "storage ready"
        );
        let keyrings = Keyrings::new(
            KeyringStore::new(storage, master_keys),
            CachePolicy {
                fresh_for: Duration::from_secs(config.cache.fresh_for_secs),
                max_stale: Duration::from_secs(config.cache.max_stale_secs),
                max_entries: config.cache.max_entries,
            },
        );
        keyrings.set_event_sink(Arc::new(EventsHandle::new(
            events_slot.clone(),
            replica.clone(),
        )));
        let registry = KeyringRegistry::new(keyrings.clone(), call_timeout, hooks.clone());
        let events = EventsArgs {
            nats: nats.clone(),
            prefix: config.nats.prefix.clone(),
            replica: replica.clone(),
            registry: registry.clone(),
            stream: config.events.jetstream.then(|| EventStream {
                name: config.events.stream.clone(),
                max_age: Duration::from_secs(config.events.max_age_secs),
                max_messages: config.events.max_messages,
            }),
        };
        // 0 when the server did not say.
        let max_payload = nats.server_info().max_payload;
        let max_plaintext_bytes = effective_max_plaintext(config, max_payload);
        let mut vault = Vault::new(registry.clone(), max_plaintext_bytes);
        if max_payload > 0 {
            vault = vault.with_max_reply_bytes(max_payload);
        }
        let gateway = GatewayArgs {
            nats: nats.clone(),
            prefix: config.nats.prefix.clone(),
            queue_group: config.nats.queue_group.clone(),
            max_inflight: config.nats.max_inflight,
            subscriptions_per_method: config.nats.subscriptions_per_method,
            auth: AuthHandle::new(auth_slot.clone(), call_timeout),
            policies: authenticator.policies(),
            vault,
            rate_limiter: RateLimiter::from_config(&config.auth.rate_limit).map(Arc::new),
            hooks: hooks.clone(),
        };
        let (fatal_sender, fatal) = watch::channel(None);
        let args = SupervisorArgs {
            policy: SupervisionPolicy {
                backoff: Duration::from_millis(config.supervision.restart_backoff_ms),
                max_restarts: config.supervision.max_restarts,
                window: Duration::from_secs(config.supervision.window_secs),
            },
            storage_backend: backend,
            storage_slot,
            authenticator,
            auth_slot,
            gateway,
            gateway_slot,
            events,
            events_slot,
            registry: registry.clone(),
            rotation: rotation_policy(config),
            rotation_check: Duration::from_secs(config.rotation.check_interval_secs.max(1)),
            hooks: hooks.clone(),
            fatal: fatal_sender,
        };
        let health = ServiceHealth {
            nats: nats.clone(),
            actors: vec![
                ("storage", alive(&args.storage_slot)),
                ("auth", alive(&args.auth_slot)),
                ("events", alive(&args.events_slot)),
                ("gateway", alive(&args.gateway_slot)),
            ],
            keyrings: keyrings.clone(),
        };
        // Before the HTTP endpoint takes role tokens: the revocations already stored are loaded
        // (bounded), as the AuthActor would do later. Idempotent, so its own call does nothing.
        args.authenticator.start_background().await;
        let revocations = args.authenticator.revocations().clone();
        let http = start_http(config, health, revocations).await?;
        let (supervisor, _) = Actor::spawn(None, Supervisor, args)
            .await
            .map_err(|error| {
                ServerError::Unavailable(format!("cannot start the actors: {error}"))
            })?;
        Ok(Server {
            supervisor,
            fatal,
            keyrings,
            registry,
            hooks,
            max_plaintext_bytes,
            http,
        })
    }

    /// The test hooks of this instance.
    pub fn hooks(&self) -> &Hooks {
        &self.hooks
    }

    /// The keyring cache of this instance.
    pub fn keyrings(&self) -> &Keyrings {
        &self.keyrings
    }

    /// How many keyring actors are running (they stop once idle; the cache stays).
    pub fn keyring_actors(&self) -> usize {
        self.registry.actor_count()
    }

    /// The address of the health and metrics endpoint, when it runs.
    pub fn http_address(&self) -> Option<std::net::SocketAddr> {
        self.http.as_ref().map(|http| http.address)
    }

    /// The largest plaintext accepted (the configured value, bounded by NATS' max_payload).
    pub fn max_plaintext_bytes(&self) -> usize {
        self.max_plaintext_bytes
    }

    /// Drains (stop taking requests, answer the ones in flight) and stops every actor,
    /// storage last.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        if let Some(mut http) = self.http.take() {
            let _ = http.stop.send(());
            // Graceful shutdown waits for requests in progress, and a client that sends its
            // request slowly keeps one going up to the header timeout: it must not hold the
            // drain of the NATS requests, which matter more than a health probe.
            if tokio::time::timeout(HTTP_SHUTDOWN_GRACE, &mut http.task)
                .await
                .is_err()
            {
                // Stops accepting; the connections' tasks are aborted with it.
                http.task.abort();
                tracing::warn!("stopped waiting for http connections still open at shutdown");
            }
        }
        if let Some(reason) = self.fatal.borrow().clone() {
            return Err(ServerError::Fatal(reason));
        }
        let outcome = crate::actors::call(
            "supervisor",
            &self.supervisor,
            SupervisorMsg::Shutdown,
            Duration::from_secs(120),
        )
        .await;
        if let Err(error) = outcome {
            return Err(ServerError::Internal(format!(
                "shutdown did not complete: {error}"
            )));
        }
        tracing::info!("ringvault stopped");
        Ok(())
    }

    /// Runs until `shutdown` completes (then drains and returns `Ok`) or supervision gives up
    /// (returns [`ServerError::Fatal`]).
    pub async fn run_until(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), ServerError> {
        tokio::select! {
            () = shutdown => self.shutdown().await,
            reason = wait_fatal(&mut self.fatal) => Err(ServerError::Fatal(reason)),
        }
    }
}

async fn wait_fatal(fatal: &mut watch::Receiver<Option<String>>) -> String {
    loop {
        if let Some(reason) = fatal.borrow_and_update().clone() {
            return reason;
        }
        if fatal.changed().await.is_err() {
            // The supervisor is gone without saying why: nothing is restarted any more, so
            // the process must not go on looking alive.
            return "the supervisor stopped unexpectedly".to_owned();
        }
    }
}

/// Starts the service and runs it until `shutdown`.
pub async fn run(
    config: &Config,
    nats: async_nats::Client,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    Server::start(config, nats).await?.run_until(shutdown).await
}

fn alive<M: ractor::Message>(slot: &Arc<ActorSlot<M>>) -> AliveCheck {
    let slot = slot.clone();
    Box::new(move || slot.get().is_some())
}

/// How long shutdown lets the health and metrics endpoint finish its open connections.
const HTTP_SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Starts the health and metrics endpoint when `http.listen` is set.
async fn start_http(
    config: &Config,
    health: ServiceHealth,
    revocations: Arc<crate::auth::Revocations>,
) -> Result<Option<HttpServer>, ServerError> {
    crate::http::metrics_handle();
    if config.http.listen.is_empty() {
        return Ok(None);
    }
    let tokens = crate::auth::SignedTokens::http_from_config(config)
        .map_err(|error| ServerError::Config(format!("http.token_secret: {}", error.message())))?
        .ok_or_else(|| {
            ServerError::Config("http.token_secret is required with http.listen".into())
        })?;
    let listener = tokio::net::TcpListener::bind(&config.http.listen)
        .await
        .map_err(|error| {
            ServerError::Unavailable(format!("cannot listen on {}: {error}", config.http.listen))
        })?;
    let address = listener
        .local_addr()
        .map_err(|error| ServerError::Internal(format!("http listener: {error}")))?;
    let router = crate::http::router(tokens, revocations, Arc::new(health));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(crate::http::serve(listener, router, async move {
        let _ = stopped.await;
    }));
    tracing::info!(%address, "health and metrics on http");
    Ok(Some(HttpServer {
        address,
        stop,
        task,
    }))
}

fn rotation_policy(config: &Config) -> RotationPolicy {
    let age = |secs: u64| (secs > 0).then(|| Duration::from_secs(secs));
    RotationPolicy {
        default: age(config.rotation.rotate_after_secs),
        by_pattern: config
            .rotation
            .keyrings
            .iter()
            .map(|entry| (entry.pattern.clone(), age(entry.rotate_after_secs)))
            .collect(),
    }
}

/// The largest plaintext whose Encrypt reply (base64 of the envelope) still fits the server's
/// `max_payload` (0: unknown).
fn effective_max_plaintext(config: &Config, max_payload: usize) -> usize {
    let configured = config.nats.max_plaintext_bytes;
    if max_payload == 0 {
        return configured;
    }
    let fits = max_payload.saturating_sub(REPLY_OVERHEAD) / 4 * 3;
    if configured > fits {
        tracing::info!(
            configured,
            max_payload,
            effective = fits,
            "nats.max_plaintext_bytes lowered to what fits the server's max_payload"
        );
        return fits;
    }
    configured
}

/// Writes `contents` to `path` readable by the owner only, creating parent directories. All or
/// nothing, and never over an existing file: the contents go to a temporary file beside it,
/// synced, then linked into place (`AlreadyExists` when another process got there first), and
/// the directory is synced, so that a crash leaves either no file or the whole one.
fn write_secret_file(path: &Path, contents: &str) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)?;
    let file_name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("no file name"))?
        .to_string_lossy()
        .into_owned();
    let temporary = parent.join(format!(
        ".{file_name}.{}.tmp",
        hex::encode(rand::random::<[u8; 6]>())
    ));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let write = |target: &Path| -> std::io::Result<()> {
        let mut file = options.open(target)?;
        file.write_all(contents.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()
    };
    let linked = write(&temporary).and_then(|()| std::fs::hard_link(&temporary, path));
    let _ = std::fs::remove_file(&temporary);
    match linked {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => return Err(error),
        // A file system without hard links (vfat, some FUSE mounts): written in place, still
        // never over an existing file.
        Err(_) => write(path)?,
    }
    // Some file systems cannot sync a directory; the file itself is synced either way.
    let _ = std::fs::File::open(&parent).and_then(|directory| directory.sync_all());
    Ok(())
}

/// Why this configuration may not generate a development master key, if it may not.
fn dev_key_refusal(config: &Config) -> Option<&'static str> {
    if !config.master_key.generate_if_missing {
        return Some("master_key.generate_if_missing is off");
    }
    if !matches!(config.storage.backend.as_str(), "file" | "memory") {
        return Some(
            "a development key is generated only for a local store: each replica of a shared \
             store would make up its own",
        );
    }
    if !config.master_key.previous.is_empty() {
        return Some(
            "previous master keys are configured, so the current one exists somewhere: a \
             missing file is a mistake, not a first start",
        );
    }
    None
}

/// The configured master keys; generates the development key file when allowed and absent.
pub fn load_master_keys(config: &Config) -> Result<MasterKeys, ServerError> {
    let settings = &config.master_key;
    let current_text = if !settings.current.is_empty() {
        zeroize::Zeroizing::new(settings.current.clone())
    } else {
        read_or_generate_master_key(config)?
    };
    let current = Kek::parse(&current_text)
        .map_err(|error| ServerError::Config(format!("master_key.current: {}", error.message())))?;
    let previous = settings
        .previous
        .iter()
        .enumerate()
        .map(|(index, text)| {
            Kek::parse(text).map_err(|error| {
                ServerError::Config(format!("master_key.previous[{index}]: {}", error.message()))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    MasterKeys::new(current, previous)
        .map_err(|error| ServerError::Config(error.message().to_owned()))
}

/// The configured credential sources; generates the development token file when allowed.
pub fn load_authenticator(config: &Config) -> Result<Authenticator, ServerError> {
    let mut tokens = Vec::new();
    for entry in &config.auth.tokens {
        tokens.push(
            StaticToken::from_config(entry).map_err(|error| {
                ServerError::Config(format!("auth.tokens: {}", error.message()))
            })?,
        );
    }
    if let Some(token) = load_dev_token(config)? {
        tokens.push(StaticToken::new(
            &token,
            Principal {
                workspace: None,
                subject: "dev".to_owned(),
                source: CredentialSource::StaticToken,
                permissions: crate::auth::parse_grants(&["admin"]).expect("valid grant"),
            },
        ));
    }
    let auth = &config.auth;
    let signed = crate::auth::SignedTokens::from_config(auth)
        .map_err(auth_config_error("auth.signing_secrets"))?;
    let jwt = crate::auth::JwtVerifier::from_config(auth).map_err(auth_config_error("auth.jwt"))?;
    let policies = crate::auth::Policies::from_config(&auth.policies)
        .map_err(auth_config_error("auth.policies"))?;
    if tokens.is_empty() && signed.is_none() && jwt.is_none() {
        tracing::warn!("no credentials configured: every request but Liveness will be refused");
    }
    tracing::info!(
        static_tokens = tokens.len(),
        signing_secrets = auth.signing_secrets.len(),
        jwks = jwt.as_ref().map(|jwt| jwt.source().to_string()),
        policies = policies.len(),
        "credential sources"
    );
    let mut authenticator = Authenticator::new(StaticTokens::new(tokens))
        .with_policies(policies)
        .with_revocation_sync(revocation_sync_config(config));
    if let Some(signed) = signed {
        authenticator = authenticator.with_signed_tokens(signed);
    }
    if let Some(jwt) = jwt {
        authenticator = authenticator.with_jwt(jwt);
    }
    Ok(authenticator)
}

/// What the revocation sync keeps for the life of the process: the configuration it needs to
/// reach the store and NATS, without the secrets it does not (master keys, tokens, signing
/// secrets), which would otherwise sit in memory unwiped beside it.
fn revocation_sync_config(config: &Config) -> Config {
    let mut kept = config.clone();
    kept.master_key.current.clear();
    kept.master_key.previous.clear();
    kept.auth.tokens.clear();
    kept.auth.signing_secrets.clear();
    kept.http.token_secret.clear();
    kept
}

/// Maps an error of the `[auth]` section named `section` to a configuration error.
fn auth_config_error(section: &'static str) -> impl Fn(crate::Error) -> ServerError {
    move |error| ServerError::Config(format!("{section}: {}", error.message()))
}

fn load_dev_token(config: &Config) -> Result<Option<zeroize::Zeroizing<String>>, ServerError> {
    let path = &config.auth.token_file;
    if path.as_os_str().is_empty() {
        return Ok(None);
    }
    if let Some(token) = read_token_file(path)? {
        return Ok(Some(token));
    }
    if !config.auth.generate_token_if_missing {
        return Err(ServerError::Config(format!(
            "cannot read token file {}: it does not exist",
            path.display()
        )));
    }
    // The development token goes with the development key: a setup that may not make up a
    // master key (production) gets no every-permission token made up either.
    if dev_key_refusal(config).is_some() {
        tracing::info!(
            path = %path.display(),
            "no development token: the token file does not exist, and one is generated only \
             with a development master key"
        );
        return Ok(None);
    }
    let token = zeroize::Zeroizing::new(format!(
        "rv_dev_{}",
        hex::encode(rand::random::<[u8; 24]>())
    ));
    if !write_new_secret(path, &token, "token")? {
        return read_token_file(path)?.map(Some).ok_or_else(|| {
            ServerError::Config(format!(
                "cannot read token file {}: it does not exist",
                path.display()
            ))
        });
    }
    tracing::warn!(
        path = %path.display(),
        token = crate::auth::fingerprint(&token),
        "GENERATED A DEVELOPMENT TOKEN with every permission; send it as \"Authorization: Bearer $(cat {})\"",
        path.display()
    );
    Ok(Some(token))
}

/// The token in the file at `path` (surrounding whitespace ignored), `None` when there is no
/// such file; an empty one is an error.
fn read_token_file(path: &Path) -> Result<Option<zeroize::Zeroizing<String>>, ServerError> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => Err(ServerError::Config(format!(
            "token file {} is empty",
            path.display()
        ))),
        Ok(text) => Ok(Some(zeroize::Zeroizing::new(text.trim().to_owned()))),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(ServerError::Config(format!(
            "cannot read token file {}: {error}",
            path.display()
        ))),
    }
}

/// The master key in `master_key.current_file`, or a development key generated there when the
/// file is missing and [`dev_key_refusal`] allows it.
fn read_or_generate_master_key(config: &Config) -> Result<zeroize::Zeroizing<String>, ServerError> {
    let path = &config.master_key.current_file;
    let read = || std::fs::read_to_string(path).map(zeroize::Zeroizing::new);
    let read_error = |error: std::io::Error| {
        ServerError::Config(format!(
            "cannot read master key file {}: {error}",
            path.display()
        ))
    };
    match read() {
        Ok(text) => return Ok(text),
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            return Err(read_error(error))
        }
        Err(_) => {}
    }
    if let Some(refusal) = dev_key_refusal(config) {
        return Err(ServerError::Config(format!(
            "no master key: master_key.current is empty and {} does not exist; not generating \
             one ({refusal})",
            path.display()
        )));
    }
    let kek = Kek::generate();
    let text = kek.to_base64();
    if !write_new_secret(path, &text, "master key")? {
        return read().map_err(read_error);
    }
    tracing::warn!(
        path = %path.display(),
        master_key = kek.id(),
        "GENERATED A DEVELOPMENT MASTER KEY. Keep this file safe and private: every key in the store is sealed by it. In production, set master_key.current (RINGVAULT_MASTER_KEY_CURRENT) and generate_if_missing = false"
    );
    Ok(text)
}

/// Writes a freshly generated secret (`what`, for errors) to `path`: true when this process
/// wrote it, false when another process starting beside this one wrote it first (read theirs).
fn write_new_secret(path: &Path, contents: &str, what: &str) -> Result<bool, ServerError> {
    match write_secret_file(path, contents) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(error) => Err(ServerError::Config(format!(
            "cannot write {what} file {}: {error}",
            path.display()
        ))),
    }
}

/// Opens the configured store, checking that it answers.
pub async fn open_backend(config: &Config) -> Result<Arc<dyn ObjectStorage>, ServerError> {
    let backend: Arc<dyn ObjectStorage> = match config.storage.backend.as_str() {
        "memory" => Arc::new(ObjectStoreBackend::in_memory()),
        "file" => Arc::new(
            ObjectStoreBackend::local(&config.storage.path)
                .map_err(|error| ServerError::Unavailable(format!("file store: {error}")))?,
        ),
        "s3" => {
            let s3 = &config.storage.s3;
            let settings = S3Settings {
                endpoint: s3.endpoint.clone(),
                region: s3.region.clone(),
                bucket: s3.bucket.clone(),
                access_key_id: s3.access_key_id.clone(),
                secret_access_key: s3.secret_access_key.clone(),
                session_token: s3.session_token.clone(),
                conditional_writes: config.storage.conditional_writes,
            };
            Arc::new(
                ObjectStoreBackend::s3(&settings, config.storage_timeout())
                    .map_err(|error| ServerError::Config(format!("s3 store: {error}")))?,
            )
        }
        other => {
            return Err(ServerError::Config(format!(
                "unknown storage backend {other:?}"
            )))
        }
    };
    Ok(backend)
}

/// Connects to NATS as `[nats]` says (url, credentials file, token), naming the connection
/// `name`; connection events go to the log.
pub async fn connect_nats(config: &Config, name: &str) -> Result<async_nats::Client, ServerError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(|event| async move {
            tracing::info!(%event, "nats connection event");
        });
    if !config.nats.credentials_file.is_empty() {
        options = options
            .credentials_file(&config.nats.credentials_file)
            .await
            .map_err(|error| ServerError::Config(format!("nats.credentials_file: {error}")))?;
    }
    if !config.nats.token.is_empty() {
        options = options.token(config.nats.token.clone());
    }
    options
        .connect(config.nats.url.as_str())
        .await
        .map_err(|error| {
            ServerError::Unavailable(format!(
                "cannot connect to nats at {}: {error}",
                crate::config::redacted_url(&config.nats.url)
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `nats.max_plaintext_bytes` is lowered to what the server's `max_payload` can carry: the
    /// Encrypt reply of the largest accepted plaintext (base64 of the envelope, in either
    /// format, with room for headers) fits, and the limit is not far below what would.
    #[test]
    fn max_plaintext_is_lowered_to_fit_the_server_max_payload() {
        use crate::protocol::{encode_encrypt_response, Format};

        let mut config = Config::defaults();
        config.nats.max_plaintext_bytes = 64 * 1024 * 1024;
        let dek = crate::crypto::Dek::generate();
        for max_payload in [8 * 1024, 64 * 1024, 1024 * 1024, 8 * 1024 * 1024] {
            let fits = effective_max_plaintext(&config, max_payload);
            assert!(fits < max_payload, "{max_payload}: {fits}");
            assert!(
                fits * 4 / 3 + REPLY_OVERHEAD >= max_payload - 8,
                "{max_payload}: {fits}"
            );
            let envelope = dek.seal_envelope(&vec![b'a'; fits]);
            for format in [Format::Protobuf, Format::Json] {
                let body = encode_encrypt_response(format, &envelope, dek.id());
                // Headers: the request id (at most 128 bytes) and the framing around it.
                assert!(
                    body.len() + 512 <= max_payload,
                    "{max_payload} {format:?}: {}",
                    body.len()
                );
            }
        }
        config.nats.max_plaintext_bytes = 1000;
        assert_eq!(effective_max_plaintext(&config, 1024 * 1024), 1000);
        assert_eq!(
            effective_max_plaintext(&config, 0),
            1000,
            "max_payload unknown"
        );
    }

    /// `[[rotation.keyrings]]`: the first matching pattern wins, `0` means never, and a keyring
    /// no pattern matches takes `rotation.rotate_after_secs`.
    #[test]
    fn rotation_ages_by_keyring_pattern() {
        let config = Config::from_sources(
            Some(
                r#"
                [rotation]
                rotate_after_secs = 86400
                [[rotation.keyrings]]
                pattern = "busy/*"
                rotate_after_secs = 3600
                [[rotation.keyrings]]
                pattern = "busy/archive"
                rotate_after_secs = 60
                [[rotation.keyrings]]
                pattern = "frozen*"
                rotate_after_secs = 0
                "#,
            ),
            Vec::new(),
        )
        .unwrap();
        let policy = rotation_policy(&config);
        assert!(policy.is_enabled());
        let hours = |hours: u64| Some(Duration::from_secs(hours * 3600));
        assert_eq!(policy.rotate_after("busy/a"), hours(1));
        // Listed second: `busy/*` matches first.
        assert_eq!(policy.rotate_after("busy/archive"), hours(1));
        assert_eq!(policy.rotate_after("frozen_1"), None);
        assert_eq!(policy.rotate_after("ws_1"), hours(24));
        assert_eq!(policy.rotate_after("busy"), hours(24));

        let only_patterns = Config::from_sources(
            Some("[[rotation.keyrings]]\npattern = \"a*\"\nrotate_after_secs = 5\n"),
            Vec::new(),
        )
        .unwrap();
        let policy = rotation_policy(&only_patterns);
        assert!(policy.is_enabled());
        assert_eq!(policy.rotate_after("ab"), Some(Duration::from_secs(5)));
        assert_eq!(policy.rotate_after("b"), None);
        assert!(!rotation_policy(&Config::defaults()).is_enabled());
    }

    fn config_in(dir: &Path, extra: &[(&str, &str)]) -> Config {
        let mut env: Vec<(String, String)> = vec![
            (
                "RINGVAULT_MASTER_KEY_CURRENT_FILE".into(),
                dir.join("data/master.key").display().to_string(),
            ),
            (
                "RINGVAULT_AUTH_TOKEN_FILE".into(),
                dir.join("data/token").display().to_string(),
            ),
            (
                "RINGVAULT_STORAGE_PATH".into(),
                dir.join("data/store").display().to_string(),
            ),
        ];
        env.extend(
            extra
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string())),
        );
        Config::from_sources(None, env).unwrap()
    }

    /// The embedded defaults on a local store: a development key, written once (a second start
    /// reads the same key), and a development token with it.
    #[test]
    fn a_local_store_gets_a_development_key_and_token_once() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path(), &[]);
        let first = load_master_keys(&config).unwrap();
        let again = load_master_keys(&config).unwrap();
        assert_eq!(first.current().id(), again.current().id());
        assert!(load_dev_token(&config).unwrap().is_some());
        assert!(dir.path().join("data/token").exists());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("data"))
            .unwrap()
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }

    /// A shared store, or previous keys configured, or generation turned off: a missing key
    /// file is an error, never a made-up key; and no every-permission token is made up then.
    #[test]
    fn no_development_key_or_token_where_one_would_be_made_up() {
        let previous = Kek::generate().to_base64().to_string();
        for extra in [
            vec![
                ("RINGVAULT_STORAGE_BACKEND", "s3"),
                ("RINGVAULT_STORAGE_S3_BUCKET", "shared"),
            ],
            vec![("RINGVAULT_MASTER_KEY_PREVIOUS", previous.as_str())],
            vec![("RINGVAULT_MASTER_KEY_GENERATE_IF_MISSING", "false")],
        ] {
            let dir = tempfile::tempdir().unwrap();
            let config = config_in(dir.path(), &extra);
            let error = load_master_keys(&config).map(|_| ()).unwrap_err();
            assert_eq!(error.exit_code(), 64, "{extra:?}: {error}");
            assert!(!dir.path().join("data/master.key").exists(), "{extra:?}");
            assert!(load_dev_token(&config).unwrap().is_none(), "{extra:?}");
            assert!(!dir.path().join("data/token").exists(), "{extra:?}");
        }
    }
}
