//! The `ringvault` command: the service (`serve`), maintenance on the store (`keygen`,
//! `roll-deks`), client commands over NATS, and the load generator (`bench`).
#![forbid(unsafe_code)]

use std::io::{IsTerminal as _, Read as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ringvault::auth::{Claims, SignedTokens};
use ringvault::bench::{
    self, BenchCase, BenchMethod, BenchResult, BenchRow, Credential as BenchCredential,
};
use ringvault::client::{Client, ClientOptions};
use ringvault::config::Config;
use ringvault::crypto::Kek;
use ringvault::keyring::{roll_deks, KeyringStore};
use ringvault::protocol::{Format, DEFAULT_PREFIX};
use ringvault::server::{self, ServerError};
use ringvault::storage::{Storage, StoragePolicy};
use ringvault::{Error, Kind};

// glibc's allocator spent ~10% of the service's CPU at 64 requests in flight (malloc
// consolidation across the runtime's threads); mimalloc's thread-local free lists do not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "ringvault",
    version,
    about = "Envelope encryption over NATS, compatible with Unkey's Vault"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Serve(ConfigArgs),
    /// Print a new random master key (base64 of a protobuf KeyEncryptionKey).
    Keygen,
    /// Re-seal every stored key with the current master key (works on the store directly).
    RollDeks(ConfigArgs),
    /// Ask a running service whether it is alive.
    Liveness(ClientArgs),
    /// Encrypt DATA (or standard input) for a keyring; prints the envelope.
    Encrypt(DataArgs),
    /// Decrypt an envelope (argument or standard input); prints the plaintext.
    Decrypt(DataArgs),
    /// Re-encrypt an envelope with the keyring's current key; prints the new envelope.
    Reencrypt(DataArgs),
    /// Make a new key the keyring's current one; prints its id.
    Rotate(KeyringArgs),
    /// Load-generate against the service and an echo responder on the same nats-server.
    Bench(BenchArgs),
    /// The bench's echo responder, run by `bench` as a process of its own.
    #[command(hide = true)]
    BenchEcho(BenchEchoArgs),
    /// The service as the bench runs it: `serve` that also stops when its standard input
    /// closes, so that it never outlives the bench.
    #[command(hide = true)]
    BenchServe(ConfigArgs),
    /// Mint, inspect and revoke signed tokens.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new token signed with auth.signing_secrets[0] (or http.token_secret with --http).
    Issue(TokenIssueArgs),
    /// Verify a token and print its claims and expiry.
    Inspect(TokenInspectArgs),
    /// Revoke a token (or every token with a jti) on every replica, now and after restarts.
    Revoke(TokenRevokeArgs),
}

#[derive(Args)]
struct TokenIssueArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Who the token stands for (`sub`).
    #[arg(long)]
    subject: String,
    /// The workspace it is bound to (written to auth.workspace_claim); absent: all keyrings.
    #[arg(long)]
    workspace: Option<String>,
    /// Permissions, comma-separated: encrypt, decrypt, reencrypt, rotate, admin, each
    /// optionally scoped by a keyring pattern (decrypt:ws_1/*).
    #[arg(long, value_delimiter = ',')]
    permissions: Vec<String>,
    /// Roles for the HTTP endpoints, comma-separated.
    #[arg(long, value_delimiter = ',')]
    roles: Vec<String>,
    /// Lifetime, e.g. 15m, 1h, 30d.
    #[arg(long)]
    ttl: String,
    /// The audience (`aud`); defaults to auth.audience (http.audience with --http).
    #[arg(long)]
    audience: Option<String>,
    /// Sign a role token for /health and /metrics with http.token_secret.
    #[arg(long)]
    http: bool,
}

#[derive(Args)]
struct TokenInspectArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// The token; `-` reads it from standard input (keeping it out of `ps` and shell history).
    token: String,
    /// Verify with http.token_secret instead of auth.signing_secrets.
    #[arg(long)]
    http: bool,
}

#[derive(Args)]
struct TokenRevokeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// The token, or a jti; `-` reads it from standard input.
    token_or_jti: String,
}

/// A secret given on the command line, or read from standard input when it is `-`.
fn secret_argument(argument: &str) -> Result<zeroize::Zeroizing<String>, u8> {
    if argument != "-" {
        return Ok(zeroize::Zeroizing::new(argument.trim().to_owned()));
    }
    let mut text = zeroize::Zeroizing::new(String::new());
    if let Err(error) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut text) {
        eprintln!("error: cannot read the token from standard input: {error}");
        return Err(66);
    }
    Ok(zeroize::Zeroizing::new(text.trim().to_owned()))
}

#[derive(Args)]
struct ConfigArgs {
    /// A TOML file merged over the embedded defaults (config/ringvault.toml).
    #[arg(long, short, env = "RINGVAULT_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct ClientArgs {
    /// NATS server of the service.
    #[arg(long, env = "RINGVAULT_URL", default_value = "nats://127.0.0.1:4222")]
    url: String,
    /// Bearer token; defaults to the contents of --token-file.
    #[arg(long, env = "RINGVAULT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the bearer token [default: ./data/token, the development token of `serve`,
    /// when it exists].
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Subject prefix of the service.
    #[arg(long, default_value = DEFAULT_PREFIX)]
    prefix: String,
    /// Request timeout in milliseconds.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    timeout_ms: u64,
}

#[derive(Args)]
struct KeyringArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The keyring.
    #[arg(long, short)]
    keyring: String,
}

#[derive(Args)]
struct DataArgs {
    #[command(flatten)]
    keyring: KeyringArgs,
    /// The input; read from standard input when absent.
    data: Option<String>,
}

#[derive(Args)]
struct BenchArgs {
    /// Run the whole matrix (Encrypt and Decrypt × 32 B, 1 KiB, 16 KiB, 64 KiB × 1 and 64 in flight).
    #[arg(long)]
    matrix: bool,
    /// Scale the matrix's request counts (0.1 for a quick look).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// `encrypt`, `decrypt` or `cold-encrypt` (single case).
    #[arg(long, default_value = "encrypt")]
    method: String,
    /// Requests in total (single case).
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Requests in flight (single case).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Plaintext size in bytes (single case).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Use a running service on this NATS server; by default the bench starts a nats-server
    /// and a ringvault as processes of their own, on loopback, and stops them at the end.
    #[arg(long)]
    url: Option<String>,
    /// Bearer token for --url.
    #[arg(long, env = "RINGVAULT_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Args)]
struct BenchEchoArgs {
    #[arg(long)]
    url: String,
    #[arg(long)]
    subject: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::from(70);
        }
    };
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args, shutdown_signal()).await,
            Command::BenchServe(args) => {
                serve(args, async {
                    tokio::select! {
                        () = shutdown_signal() => {}
                        () = stdin_closed() => {}
                    }
                })
                .await
            }
            Command::Keygen => keygen(),
            Command::RollDeks(args) => roll(args).await,
            Command::Liveness(args) => {
                client_command(&args, |client| async move {
                    Ok(client.liveness().await?.status)
                })
                .await
            }
            Command::Encrypt(args) => {
                let data = input(args.data);
                let keyring = args.keyring.keyring.clone();
                client_command(&args.keyring.client, |client| async move {
                    Ok(client.encrypt(&keyring, &data?).await?.encrypted)
                })
                .await
            }
            Command::Decrypt(args) => {
                let data = input(args.data);
                let keyring = args.keyring.keyring.clone();
                client_command(&args.keyring.client, |client| async move {
                    Ok(client.decrypt(&keyring, data?.trim()).await?.plaintext)
                })
                .await
            }
            Command::Reencrypt(args) => {
                let data = input(args.data);
                let keyring = args.keyring.keyring.clone();
                client_command(&args.keyring.client, |client| async move {
                    Ok(client.reencrypt(&keyring, data?.trim()).await?.encrypted)
                })
                .await
            }
            Command::Rotate(args) => {
                let keyring = args.keyring.clone();
                client_command(&args.client, |client| async move {
                    Ok(client.rotate(&keyring).await?.key_id)
                })
                .await
            }
            Command::Bench(args) => run_bench(args).await,
            Command::BenchEcho(args) => bench_echo(args).await,
            Command::Token(command) => token_command(command).await,
        }
    });
    ExitCode::from(code)
}

/// Logs go to stderr from a thread of their own: at the default level every request leaves an
/// audit line, and a write to a slow pipe must not stall the runtime that serves requests. The
/// lines of a burst leave in one write (the thread flushes whenever it has caught up). When
/// more than [`LOG_BUFFERED_LINES`] wait, new lines are dropped and counted, never waited for;
/// the audit records themselves also go out on NATS. Keep the guard until exit: dropping it
/// writes what is left.
fn init_logging(config: &Config) -> LogGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let (writer, flush_on_drop) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_BUFFERED_LINES)
        .thread_name("ringvault-log")
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    let dropped = writer.error_counter();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        // Colour codes only for a person at a terminal, not in files and log pipelines.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if config.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    LogGuard {
        flush_on_drop: Some(flush_on_drop),
        dropped,
    }
}

/// Log lines waiting for the log thread before new ones are dropped. The queue's slots are
/// allocated and touched up front (tracing-appender's default of 128,000 held ~3 MiB resident
/// in an idle service); the thread writes far more lines per second than this.
const LOG_BUFFERED_LINES: usize = 16_384;

/// Writes the waiting log lines when dropped, then says how many were dropped, if any.
struct LogGuard {
    flush_on_drop: Option<tracing_appender::non_blocking::WorkerGuard>,
    dropped: tracing_appender::non_blocking::ErrorCounter,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        // Counted before the log thread stops: lines that tasks still emit while the process
        // exits (a NATS connection closing) are dropped as well, and are not what this warns
        // about.
        let dropped = self.dropped.dropped_lines();
        drop(self.flush_on_drop.take());
        if dropped > 0 {
            eprintln!("warning: {dropped} log lines were dropped (stderr did not keep up)");
        }
    }
}

fn load_config(path: Option<&std::path::Path>) -> Result<Config, u8> {
    Config::load(path).map_err(|error| {
        eprintln!("error: {error}");
        64
    })
}

async fn connect_nats(config: &Config) -> Result<async_nats::Client, ServerError> {
    server::connect_nats(config, "ringvault").await
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown signal received: draining");
}

/// Resolves when standard input reaches its end: for the bench's children, whose standard input
/// is a pipe from the bench, that is when the bench has exited, however it exited. (tokio reads
/// stdin on a blocking thread that cannot be cancelled, so a child stopped otherwise exits only
/// once the bench closes the pipe — which the bench does when it stops them.)
async fn stdin_closed() {
    use tokio::io::AsyncReadExt as _;
    let mut stdin = tokio::io::stdin();
    let mut buffer = [0u8; 64];
    while let Ok(read) = stdin.read(&mut buffer).await {
        if read == 0 {
            break;
        }
    }
}

async fn serve(args: ConfigArgs, shutdown: impl std::future::Future<Output = ()>) -> u8 {
    let config = match load_config(args.config.as_deref()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let _log_guard = init_logging(&config);
    let result = async {
        let nats = connect_nats(&config).await?;
        tracing::info!(
            url = ringvault::config::redacted_url(&config.nats.url),
            "connected to nats"
        );
        server::run(&config, nats, shutdown).await
    }
    .await;
    match result {
        Ok(()) => 0,
        Err(error) => {
            tracing::error!(%error, "ringvault stopped with an error");
            eprintln!("error: {error}");
            u8::try_from(error.exit_code()).unwrap_or(70)
        }
    }
}

fn keygen() -> u8 {
    let kek = Kek::generate();
    println!("{}", kek.to_base64().as_str());
    eprintln!("generated master key {}; store it as a secret", kek.id());
    0
}

/// A file store that is not there is not an empty one: run from another directory, the
/// default relative path names nothing, and opening it would create it. Maintenance commands
/// that read the store refuse rather than report on nothing.
fn existing_file_store(config: &Config) -> Result<(), String> {
    if config.storage.backend == "file" && !config.storage.path.exists() {
        return Err(format!("no store at {}", config.storage.path.display()));
    }
    Ok(())
}

async fn roll(args: ConfigArgs) -> u8 {
    let config = match load_config(args.config.as_deref()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let setup = async {
        // Never a generated key here: re-sealing the store with a key made up on this machine
        // (where the replicas' key file may not be) would lock every replica out of it.
        let mut key_config = config.clone();
        key_config.master_key.generate_if_missing = false;
        let master_keys = server::load_master_keys(&key_config)?;
        if let Err(missing) = existing_file_store(&config) {
            return Err(ServerError::Unavailable(format!(
                "{missing}: nothing to roll; run roll-deks with the service's configuration"
            )));
        }
        let backend = server::open_backend(&config).await?;
        Ok::<_, ServerError>((master_keys, backend))
    }
    .await;
    let (master_keys, backend) = match setup {
        Ok(parts) => parts,
        Err(error) => {
            eprintln!("error: {error}");
            return u8::try_from(error.exit_code()).unwrap_or(70);
        }
    };
    let mut storage = Storage::new(
        backend,
        StoragePolicy {
            timeout: config.storage_timeout(),
            ..StoragePolicy::default()
        },
    );
    if !config.storage.conditional_writes {
        storage = storage.without_conditional_writes();
    }
    if let Err(error) = storage.probe().await {
        eprintln!(
            "error: storage {} is not usable: {error}",
            storage.describe()
        );
        return 69;
    }
    // roll-deks logs nothing, so the probe's warning would be lost: README makes the roll's
    // safety on such a store depend on knowing it.
    if !storage.compare_and_swap() {
        eprintln!(
            "warning: {} does not compare versions on update: a rotation that lands while \
             this roll rewrites its keyring's LATEST can be undone; run it while no rotation \
             is due",
            storage.describe()
        );
    }
    eprintln!(
        "re-sealing every key in {} with master key {}",
        storage.describe(),
        master_keys.current().id()
    );
    let kek_id = master_keys.current().id().to_owned();
    let store = KeyringStore::new(storage, std::sync::Arc::new(master_keys));
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let outcome = roll_deks(&store, |report| {
        bar.set_message(format!(
            "scanned {} · re-sealed {} · already current {} · failed {}",
            report.scanned, report.resealed, report.already_current, report.failed
        ));
    })
    .await;
    bar.finish_and_clear();
    match outcome {
        Ok(report) => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{:<16} {:>10}", "objects", "count");
            let _ = writeln!(out, "{:<16} {:>10}", "scanned", report.scanned);
            let _ = writeln!(out, "{:<16} {:>10}", "re-sealed", report.resealed);
            let _ = writeln!(
                out,
                "{:<16} {:>10}",
                "already current", report.already_current
            );
            let _ = writeln!(out, "{:<16} {:>10}", "failed", report.failed);
            for (key, reason) in &report.failures {
                eprintln!("failed: {key}: {reason}");
            }
            announce_roll(&config, &kek_id, &report).await;
            // The exit code of the gravest failure: 70 (an object ringvault cannot read as a
            // key) outranks 69 (the store failed; run again), as it needs more than a rerun.
            if let Some(code) = report
                .failures
                .iter()
                .map(|(_, error)| exit_code(error))
                .max()
            {
                eprintln!("some objects were not re-sealed; fix the cause and run roll-deks again");
                return code;
            }
            // Not a success: a roll of the wrong store (another path or bucket, the memory
            // backend) re-seals nothing and fails nothing, which is what a roll that lets the
            // old master key go looks like, yet every key of the real store is still sealed
            // with it.
            if report.scanned == 0 {
                eprintln!(
                    "error: the store holds no keys at all, so none was re-sealed; if the \
                     service has keys, this is not its store (check storage.* against the \
                     service's configuration) and the old master key is still needed"
                );
                return 66;
            }
            0
        }
        Err(error) => {
            eprintln!("error: {error}; the roll is safe to run again");
            exit_code(&error)
        }
    }
}

/// Publishes `kek.rolled` when NATS is reachable; the roll itself never depends on it.
async fn announce_roll(config: &Config, kek_id: &str, report: &ringvault::keyring::RollReport) {
    let event = ringvault::protocol::KekRolled {
        version: ringvault::protocol::EVENT_VERSION,
        kek_id: kek_id.to_owned(),
        scanned: report.scanned,
        resealed: report.resealed,
        already_current: report.already_current,
        failed: report.failed,
        time: ringvault::crypto::now_ms(),
    };
    let published = async {
        // With the configured credentials: a secured NATS refuses an anonymous publisher.
        let nats = tokio::time::timeout(
            Duration::from_secs(3),
            server::connect_nats(config, "ringvault roll-deks"),
        )
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|error| error.to_string())?;
        ringvault::actors::publish_kek_rolled(&nats, &config.nats.prefix, &event)
            .await
            .map_err(|error| error.to_string())
    }
    .await;
    let url = ringvault::config::redacted_url(&config.nats.url);
    match published {
        Ok(()) => eprintln!("published kek.rolled on {url}"),
        Err(error) => {
            eprintln!("note: kek.rolled not published ({error}); nats at {url} is not reachable")
        }
    }
}

/// Exit codes of client commands, by error kind (sysexits.h).
fn exit_code(error: &Error) -> u8 {
    match error.kind() {
        Kind::InvalidArgument | Kind::PayloadTooLarge => 65,
        Kind::NotFound => 66,
        Kind::AuthenticationRequired
        | Kind::InvalidToken
        | Kind::TokenExpired
        | Kind::AccessDenied => 77,
        Kind::RateLimited => 75,
        Kind::Unavailable => 69,
        Kind::Internal => 70,
    }
}

fn input(argument: Option<String>) -> ringvault::Result<String> {
    if let Some(data) = argument {
        return Ok(data);
    }
    if std::io::stdin().is_terminal() {
        eprintln!("reading input from standard input; end with Ctrl-D");
    }
    let mut data = String::new();
    std::io::stdin()
        .read_to_string(&mut data)
        .map_err(|error| {
            Error::invalid_argument(format!("cannot read standard input as utf-8: {error}"))
        })?;
    Ok(data)
}

/// Where the client commands look for a token when given none: what `serve` writes on its
/// first start with the embedded defaults.
const DEVELOPMENT_TOKEN_FILE: &str = "./data/token";

/// The token of a client command: `--token`, else `--token-file`, which must be readable
/// (the request would otherwise go out without a token and come back "authentication
/// required", pointing away from the file), else the development token when there is one.
fn client_token(args: &ClientArgs) -> ringvault::Result<Option<String>> {
    // Trimmed: a secret mounted from a file often ends in a newline.
    if let Some(token) = &args.token {
        return Ok(Some(token.trim().to_owned()));
    }
    let Some(path) = &args.token_file else {
        return Ok(std::fs::read_to_string(DEVELOPMENT_TOKEN_FILE)
            .ok()
            .map(|text| text.trim().to_owned())
            .filter(|token| !token.is_empty()));
    };
    let text = std::fs::read_to_string(path).map_err(|error| {
        Error::new(
            Kind::NotFound,
            format!("cannot read the token file {}: {error}", path.display()),
        )
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(Error::invalid_argument(format!(
            "the token file {} is empty",
            path.display()
        )));
    }
    Ok(Some(token.to_owned()))
}

async fn client_command<F, Fut>(args: &ClientArgs, command: F) -> u8
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = ringvault::Result<String>>,
{
    let outcome = async {
        let options = ClientOptions {
            prefix: args.prefix.clone(),
            token: client_token(args)?,
            timeout: Duration::from_millis(args.timeout_ms),
            ..ClientOptions::default()
        };
        let client = Client::connect(&args.url, options).await?;
        command(client).await
    }
    .await;
    match outcome {
        Ok(output) => {
            println!("{output}");
            0
        }
        Err(error) => {
            eprintln!("error: {error}");
            exit_code(&error)
        }
    }
}

/// Resident memory of the service process around the cold-keyring case (bytes, when readable).
struct ColdMemory {
    keyrings: usize,
    before: Option<u64>,
    right_after: Option<u64>,
    settled: Option<u64>,
}

/// How long the bench waits after the cold-keyring case before it reads resident memory again:
/// keyring actors stop as their work ends, so this is only a margin for the last ones.
const IDLE_SETTLE: Duration = Duration::from_secs(2);

/// The ES256 key of the bench's JWT cases: its JWKS for the service, and a token it signs.
struct BenchJwtKey {
    pkcs8: Vec<u8>,
    public_point: Vec<u8>,
}

impl BenchJwtKey {
    const ISSUER: &'static str = "https://idp.bench.invalid";
    const AUDIENCE: &'static str = "ringvault-bench";
    const KID: &'static str = "bench-es256";

    fn generate() -> Result<Self, Error> {
        use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
        let failed = |_| Error::internal("cannot generate the bench's ES256 key");
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &aws_lc_rs::rand::SystemRandom::new(),
        )
        .map_err(failed)?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
            .map_err(|_| Error::internal("cannot read the bench's ES256 key"))?;
        Ok(Self {
            pkcs8: pkcs8.as_ref().to_vec(),
            public_point: pair.public_key().as_ref().to_vec(),
        })
    }

    fn jwks(&self) -> String {
        let b64 = |bytes: &[u8]| {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        };
        serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": Self::KID,
            "x": b64(&self.public_point[1..33]), "y": b64(&self.public_point[33..65]),
        }]})
        .to_string()
    }

    /// A token for a principal bound to no workspace that may encrypt and decrypt, valid 1 h.
    fn sign(&self) -> Result<String, Error> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let claims = serde_json::json!({
            "sub": "bench", "scope": "encrypt decrypt",
            "iss": Self::ISSUER, "aud": Self::AUDIENCE,
            "iat": now, "exp": now + 3600,
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(Self::KID.to_owned());
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_ec_der(&self.pkcs8),
        )
        .map_err(|error| Error::internal(format!("cannot sign the bench jwt: {error}")))
    }
}

/// What the bench sets up when it runs its own service (no `--url`).
struct LocalSetup {
    nats: BenchNats,
    /// The service's configuration, as `RINGVAULT_*` variables.
    env: Vec<(&'static str, String)>,
    /// Removed when dropped.
    dir: tempfile::TempDir,
    jwt_key: BenchJwtKey,
}

/// A nats-server started for the bench on a free loopback port, killed on drop.
struct BenchNats {
    child: std::process::Child,
    url: String,
}

impl BenchNats {
    fn start() -> Result<BenchNats, Error> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(|error| Error::unavailable(format!("no free port: {error}")))?
            .port();
        let child = std::process::Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|error| {
                Error::unavailable(format!(
                    "cannot start nats-server ({error}); install it with `just deps` or pass --url"
                ))
            })?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if std::time::Instant::now() > deadline {
                return Err(Error::unavailable("nats-server did not start within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(BenchNats {
            child,
            url: format!("nats://127.0.0.1:{port}"),
        })
    }
}

impl Drop for BenchNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long the bench waits for the service or the echo responder it started to answer.
const CHILD_START_TIMEOUT: Duration = Duration::from_secs(30);

/// `ringvault <args>` as a child of the bench: its standard input is a pipe the bench holds
/// open, so the child can stop when the bench goes (see `stdin_closed`); killed on drop.
fn bench_child(args: &[&str]) -> Result<tokio::process::Command, Error> {
    let executable = std::env::current_exe()
        .map_err(|error| Error::unavailable(format!("cannot find this executable: {error}")))?;
    let mut command = tokio::process::Command::new(executable);
    command
        .args(args)
        .stdin(std::process::Stdio::piped())
        .kill_on_drop(true);
    Ok(command)
}

/// The bench's own ringvault: `ringvault bench-serve` (`serve` that also stops when the bench
/// goes) as a child process, so that its resident memory is its own and it shares no runtime
/// with the load generator. Killed on drop.
struct BenchService {
    child: tokio::process::Child,
}

impl BenchService {
    async fn start(env: &[(&str, String)], client: &Client) -> Result<Self, Error> {
        // The caller's RINGVAULT_* settings reach the service (e.g. to try a tuning); the
        // bench's own setup overrides them. Not a config file, though (it could point the
        // service at a real bucket), nor RUST_LOG (per-request logs would be measured too).
        let mut child = bench_child(&["bench-serve"])?
            .envs(env.iter().map(|(name, value)| (name, value)))
            .env_remove("RINGVAULT_CONFIG")
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|error| Error::unavailable(format!("cannot start the service: {error}")))?;
        let deadline = tokio::time::Instant::now() + CHILD_START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Error::unavailable(format!(
                    "the bench's service exited at startup ({status}); its error is above"
                )));
            }
            if client.liveness().await.is_ok() {
                return Ok(Self { child });
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::unavailable(format!(
                    "the bench's service did not answer within {CHILD_START_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn resident_bytes(&self) -> Option<u64> {
        bench::resident_bytes(self.child.id()?)
    }

    /// Kills the service and waits until it is gone.
    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// The echo responder as a child process (`ringvault bench-echo`), like the service beside it.
async fn start_bench_echo(url: &str, subject: &str) -> Result<tokio::process::Child, Error> {
    use tokio::io::AsyncBufReadExt as _;
    let mut child = bench_child(&["bench-echo", "--url", url, "--subject", subject])?
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|error| Error::unavailable(format!("cannot start the echo responder: {error}")))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| Error::internal("the echo responder has no stdout"))?;
    let mut line = String::new();
    let ready = tokio::time::timeout(
        CHILD_START_TIMEOUT,
        tokio::io::BufReader::new(stdout).read_line(&mut line),
    )
    .await;
    match ready {
        Ok(Ok(_)) if line.trim() == BENCH_ECHO_READY => Ok(child),
        _ => Err(Error::unavailable(
            "the echo responder did not start; its error is above",
        )),
    }
}

/// What `bench-echo` prints once its subscription is known to the server.
const BENCH_ECHO_READY: &str = "ready";

async fn bench_echo(args: BenchEchoArgs) -> u8 {
    let result = async {
        let nats = async_nats::connect(args.url.as_str())
            .await
            .map_err(|error| Error::unavailable(format!("cannot connect to nats: {error}")))?;
        let responder = bench::start_echo_responder(&nats, &args.subject).await?;
        println!("{BENCH_ECHO_READY}");
        let _ = std::io::stdout().flush();
        tokio::select! {
            _ = responder => {}
            () = stdin_closed() => {}
        }
        Ok::<(), Error>(())
    }
    .await;
    match result {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("error: {error}");
            exit_code(&error)
        }
    }
}

async fn run_bench(args: BenchArgs) -> u8 {
    // On SIGINT/SIGTERM the bench's future is dropped, and with it the processes it started.
    let outcome = tokio::select! {
        outcome = bench_main(args) => outcome,
        () = shutdown_signal() => Err(Error::unavailable("interrupted")),
    };
    match outcome {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("error: {error}");
            exit_code(&error)
        }
    }
}

async fn bench_main(args: BenchArgs) -> ringvault::Result<()> {
    let cases = if args.matrix {
        bench::matrix_scaled(args.scale)
    } else {
        let method = match args.method.as_str() {
            "encrypt" => BenchMethod::Encrypt,
            "decrypt" => BenchMethod::Decrypt,
            "cold-encrypt" => BenchMethod::ColdEncrypt,
            other => return Err(Error::invalid_argument(format!("unknown method {other:?}"))),
        };
        vec![BenchCase {
            method,
            requests: args.requests,
            concurrency: args.concurrency,
            payload_bytes: args.size,
            keyring: if method == BenchMethod::ColdEncrypt {
                bench::COLD_KEYRING_PREFIX.to_owned()
            } else {
                bench::DEFAULT_KEYRING.to_owned()
            },
            credential: BenchCredential::StaticToken,
        }]
    };
    // Without --url: our own nats-server and a service over a temporary store.
    let mut local = None;
    let (url, token) = match args.url {
        Some(url) => (url, args.token),
        None => {
            let nats = BenchNats::start()?;
            let url = nats.url.clone();
            // A fresh directory of our own (random name, mode 0700): a predictable name in a
            // shared /tmp could be prepared by someone else, with links where the token goes.
            let dir = tempfile::Builder::new()
                .prefix("ringvault-bench-")
                .tempdir()
                .map_err(|error| {
                    Error::unavailable(format!("cannot create the bench directory: {error}"))
                })?;
            let jwks_file = dir.path().join("jwks.json");
            let token = format!("bench-{}", hex::encode(rand::random::<[u8; 16]>()));
            let jwt_key = BenchJwtKey::generate()?;
            let env = vec![
                ("RINGVAULT_NATS_URL", nats.url.clone()),
                // Always a throwaway local store, whatever the caller's environment says: the
                // bench writes 10,000 keyrings, which must never land in a real bucket.
                ("RINGVAULT_STORAGE_BACKEND", "file".to_owned()),
                (
                    "RINGVAULT_STORAGE_PATH",
                    dir.path().join("store").display().to_string(),
                ),
                (
                    "RINGVAULT_MASTER_KEY_CURRENT",
                    Kek::generate().to_base64().to_string(),
                ),
                (
                    "RINGVAULT_AUTH_TOKEN_FILE",
                    dir.path().join("token").display().to_string(),
                ),
                // Quiet unless the caller asks: at `info` every request also leaves an audit
                // line, whose cost BENCHMARKS.md gives on its own.
                (
                    "RINGVAULT_LOG_LEVEL",
                    std::env::var("RINGVAULT_LOG_LEVEL").unwrap_or_else(|_| "warn".to_owned()),
                ),
                (
                    "RINGVAULT_AUTH_JWT_JWKS_FILE",
                    jwks_file.display().to_string(),
                ),
                ("RINGVAULT_AUTH_JWT_ISSUER", BenchJwtKey::ISSUER.to_owned()),
                (
                    "RINGVAULT_AUTH_JWT_AUDIENCE",
                    BenchJwtKey::AUDIENCE.to_owned(),
                ),
                // Room for the cold-keyring case's keys beside the others.
                ("RINGVAULT_CACHE_MAX_ENTRIES", "20000".to_owned()),
            ];
            std::fs::write(dir.path().join("token"), &token).map_err(|error| {
                Error::unavailable(format!("cannot write the bench token: {error}"))
            })?;
            std::fs::write(&jwks_file, jwt_key.jwks()).map_err(|error| {
                Error::unavailable(format!("cannot write the bench jwks: {error}"))
            })?;
            local = Some(LocalSetup {
                nats,
                env,
                dir,
                jwt_key,
            });
            (url, Some(token))
        }
    };
    let client = Client::connect(
        &url,
        ClientOptions {
            token: token.clone(),
            timeout: Duration::from_secs(30),
            format: Format::Protobuf,
            ..ClientOptions::default()
        },
    )
    .await?;
    let service = match &local {
        Some(setup) => Some(BenchService::start(&setup.env, &client).await?),
        None => None,
    };
    let echo_subject = format!(
        "ringvault.bench.echo.{}",
        hex::encode(rand::random::<[u8; 4]>())
    );
    let echo = start_bench_echo(&url, &echo_subject).await?;
    // Warm up: the first Encrypt creates the keyring's key.
    client.encrypt(bench::DEFAULT_KEYRING, "warm-up").await?;

    let jwt_client = match &local {
        Some(setup) => Some(client.with_token(Some(setup.jwt_key.sign()?))),
        None => None,
    };
    let service_resident = || service.as_ref().and_then(BenchService::resident_bytes);
    let mut rows: Vec<BenchRow> = Vec::new();
    let mut credential_rows: Vec<(BenchResult, BenchResult)> = Vec::new();
    let mut memory = None;
    let total = cases.len();
    for (index, case) in cases.iter().enumerate() {
        let label = format!(
            "[{}/{total}] {} {} B × {} in flight ({})",
            index + 1,
            case.method.name(),
            case.payload_bytes,
            case.concurrency,
            case.credential.name(),
        );
        let case_client = match (case.credential, &jwt_client) {
            (BenchCredential::StaticToken, _) => &client,
            (BenchCredential::Es256Jwt, Some(jwt_client)) => jwt_client,
            (BenchCredential::Es256Jwt, None) => {
                eprintln!("{label}: skipped (needs the bench's own service, not --url)");
                continue;
            }
        };
        let resident_before = (case.method == BenchMethod::ColdEncrypt).then(service_resident);
        let bar = indicatif::ProgressBar::new((case.requests * bench::sides_of(case)) as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} {bar:30} {pos}/{len}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(label.clone());
        let row = bench::run_row(case_client, &echo_subject, case, |done| {
            bar.set_position(done as u64)
        })
        .await?;
        bar.finish_and_clear();
        if let Some(before) = resident_before {
            let right_after = service_resident();
            // Keyring actors stop as their work ends; what stays is the cache itself.
            eprintln!("{label}: waiting {IDLE_SETTLE:?} for the last keyring actors to stop");
            tokio::time::sleep(IDLE_SETTLE).await;
            memory = Some(ColdMemory {
                keyrings: case.requests,
                before,
                right_after,
                settled: service_resident(),
            });
        }
        let shaped = row.shaped.as_ref().map_or(String::new(), |shaped| {
            format!(
                "; shaped echo {:.0}, vs shaped {:.2}",
                shaped.req_per_sec,
                bench::ratio(&row.service, shaped)
            )
        });
        eprintln!(
            "{label}: {:.0} req/s (echo {:.0}), ratio {:.2}{shaped}",
            row.service.req_per_sec,
            row.echo.req_per_sec,
            bench::ratio(&row.service, &row.echo)
        );
        if case.credential == BenchCredential::Es256Jwt {
            // The goal compares the two credentials directly: alternate them, like service
            // and echo, so that drift between cases does not enter the quotient.
            let [jwt, static_token] = bench::run_alternating(
                [
                    bench::Side::Service(case_client),
                    bench::Side::Service(&client),
                ],
                case,
                |_| {},
            )
            .await?;
            let quotient = bench::ratio(&jwt, &static_token);
            eprintln!(
                "{label}: es256 {:.0} req/s vs static token {:.0} req/s, alternating: {quotient:.2}",
                jwt.req_per_sec, static_token.req_per_sec
            );
            credential_rows.push((jwt, static_token));
        }
        rows.push(row);
    }
    let mut echo = echo;
    let _ = echo.kill().await;
    println!("{}", bench::table(&rows));
    for (jwt, static_token) in &credential_rows {
        println!(
            "{} {} B x {} in flight, es256 jwt vs static token in alternating rounds: {:.0} vs {:.0} req/s, ratio {:.2}; p99 {}µs vs {}µs",
            jwt.case.method.name(),
            jwt.case.payload_bytes,
            jwt.case.concurrency,
            jwt.req_per_sec,
            static_token.req_per_sec,
            bench::ratio(jwt, static_token),
            jwt.p99.as_micros(),
            static_token.p99.as_micros(),
        );
    }
    let checks = bench::goals(
        &rows,
        &credential_rows,
        memory.as_ref().and_then(|memory| memory.settled),
    );
    let mut memory_json = None;
    if let Some(ColdMemory {
        keyrings,
        before,
        right_after,
        settled,
    }) = memory
    {
        let mib = |bytes: Option<u64>| {
            bytes.map_or("unknown".to_owned(), |bytes| {
                format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
            })
        };
        println!(
            "resident memory of the service process with {keyrings} new keyrings cached: {} ({} right after the case, {} before it)",
            mib(settled),
            mib(right_after),
            mib(before),
        );
        memory_json = Some(serde_json::json!({
            "cold_keyrings": keyrings,
            "resident_bytes": settled,
            "resident_bytes_right_after": right_after,
            "resident_bytes_before": before,
        }));
    }
    // The verdicts after the figures they come from, and before the JSON lines.
    if !checks.is_empty() {
        println!("\n{}", bench::goals_table(&checks));
    }
    if let Some(memory_json) = memory_json {
        println!("{memory_json}");
    }
    for row in &rows {
        println!("{}", row.json_line());
    }
    if let Some(service) = service {
        service.stop().await;
    }
    if let Some(setup) = local.take() {
        drop(setup.nats);
        drop(setup.dir);
    }
    Ok(())
}

async fn token_command(command: TokenCommand) -> u8 {
    match command {
        TokenCommand::Issue(args) => token_issue(args),
        TokenCommand::Inspect(args) => token_inspect(args).await,
        TokenCommand::Revoke(args) => token_revoke(args).await,
    }
}

/// The signer of `token` commands: auth.signing_secrets, or http.token_secret with `http`.
/// Exit 64 when no secret is configured.
fn token_signer(config: &Config, http: bool) -> Result<SignedTokens, u8> {
    let signer = if http {
        match SignedTokens::http_from_config(config) {
            Ok(None) => {
                eprintln!(
                    "error: no http token secret is configured; set http.token_secret (RINGVAULT_HTTP_TOKEN_SECRET), at least 32 bytes"
                );
                return Err(64);
            }
            other => other,
        }
    } else {
        SignedTokens::from_config(&config.auth)
    };
    match signer {
        Ok(Some(signer)) => Ok(signer),
        Ok(None) => {
            eprintln!(
                "error: no signing secret is configured; set auth.signing_secrets (RINGVAULT_AUTH_SIGNING_SECRETS), each at least 32 bytes"
            );
            Err(64)
        }
        Err(error) => {
            eprintln!("error: {}", error.message());
            Err(64)
        }
    }
}

fn token_issue(args: TokenIssueArgs) -> u8 {
    let config = match load_config(args.config.config.as_deref()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let signer = match token_signer(&config, args.http) {
        Ok(signer) => signer,
        Err(code) => return code,
    };
    let ttl = match humantime::parse_duration(&args.ttl) {
        Ok(ttl) if (Duration::from_secs(1)..=MAX_TOKEN_TTL).contains(&ttl) => ttl,
        Ok(_) => {
            eprintln!("error: --ttl must be at least 1s and at most 10y");
            return 64;
        }
        Err(error) => {
            eprintln!("error: --ttl {:?}: {error}", args.ttl);
            return 64;
        }
    };
    if args.subject.trim().is_empty() {
        eprintln!("error: --subject must not be empty");
        return 64;
    }
    let permissions: Vec<String> = args
        .permissions
        .iter()
        .map(|permission| permission.trim().to_owned())
        .filter(|permission| !permission.is_empty())
        .collect();
    if let Err(error) = ringvault::auth::parse_grants(&permissions) {
        eprintln!("error: --permissions: {}", error.message());
        return 64;
    }
    // An empty --workspace (an unset variable in a script) must not mint a token for every
    // keyring; leaving the option out does that.
    if args
        .workspace
        .as_deref()
        .is_some_and(|workspace| workspace.trim().is_empty())
    {
        eprintln!("error: --workspace is empty; leave it out for a token bound to no workspace");
        return 64;
    }
    // The service refuses a token whose workspace no keyring could have: better said now
    // than at the first request.
    if let Some(Err(error)) = args
        .workspace
        .as_deref()
        .map(|workspace| ringvault::auth::validate_workspace(workspace.trim()))
    {
        eprintln!("error: --workspace: {}", error.message());
        return 64;
    }
    let mut claims = Claims::new(args.subject.trim(), ttl);
    claims.workspace = args.workspace.map(|workspace| workspace.trim().to_owned());
    claims.permissions = permissions;
    claims.roles = args
        .roles
        .iter()
        .map(|role| role.trim().to_owned())
        .filter(|role| !role.is_empty())
        .collect();
    if let Some(audience) = args.audience.filter(|audience| !audience.is_empty()) {
        claims.aud = vec![audience];
    }
    match signer.issue(&claims) {
        Ok(token) => {
            println!("{token}");
            eprintln!(
                "issued token {} for {:?} (jti {}), expires at {}",
                ringvault::auth::fingerprint(&token),
                claims.sub,
                claims.jti.as_deref().unwrap_or("-"),
                claims.expires_at_text()
            );
            0
        }
        Err(error) => {
            eprintln!("error: {error}");
            70
        }
    }
}

/// The longest `token issue --ttl`: ten years as `--ttl` counts them (`10y`, 365.25 days each).
const MAX_TOKEN_TTL: Duration = Duration::from_secs(10 * 31_557_600);

async fn token_inspect(args: TokenInspectArgs) -> u8 {
    let config = match load_config(args.config.config.as_deref()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let signer = match token_signer(&config, args.http) {
        Ok(signer) => signer,
        Err(code) => return code,
    };
    let token = match secret_argument(&args.token) {
        Ok(token) => token,
        Err(code) => return code,
    };
    let token = token.as_str();
    let claims = match signer.verify(token) {
        Ok(claims) => claims,
        Err(error) => {
            eprintln!("error: {error}");
            return 77;
        }
    };
    // Valid means what the service would accept: the stored revocations decide too.
    if let Err(missing) = existing_file_store(&config) {
        eprintln!("error: {missing}, so the token's revocation is unknown; run inspect with the service's configuration");
        return 69;
    }
    let revocations = ringvault::auth::Revocations::new();
    let loaded = async {
        let backend = server::open_backend(&config)
            .await
            .map_err(|error| error.to_string())?;
        let loaded = ringvault::auth::load_revocations(&*backend, &revocations)
            .await
            .map_err(|error| error.to_string())?;
        if loaded.unreadable > 0 {
            return Err(format!(
                "{} stored revocations cannot be read",
                loaded.unreadable
            ));
        }
        Ok::<_, String>(backend.describe())
    }
    .await;
    match loaded {
        Ok(store) => eprintln!("revocations checked in {store}"),
        Err(reason) => {
            eprintln!(
                "error: cannot read the stored revocations, so the token's state is unknown: \
                 {reason}"
            );
            return 69;
        }
    }
    if let Err(error) = revocations.refuse_if_revoked(token, claims.jti.as_deref()) {
        eprintln!("error: {error}");
        return 77;
    }
    let json = claims.to_json(signer.workspace_claim());
    println!(
        "{}",
        serde_json::to_string_pretty(&json).unwrap_or_else(|_| json.to_string())
    );
    let left = SignedTokens::time_left(&claims);
    println!(
        "expires at {} (in {})",
        claims.expires_at_text(),
        humantime::format_duration(Duration::from_secs(left.as_secs()))
    );
    0
}

async fn token_revoke(args: TokenRevokeArgs) -> u8 {
    let config = match load_config(args.config.config.as_deref()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    // A revocation written to a store the service does not read would report success and
    // revoke nothing.
    if let Err(missing) = existing_file_store(&config) {
        eprintln!("error: {missing}: the revocation would reach no service; run revoke with the service's configuration");
        return 69;
    }
    let backend = match server::open_backend(&config).await {
        Ok(backend) => backend,
        Err(error) => {
            eprintln!("error: {error}");
            return u8::try_from(error.exit_code()).unwrap_or(70);
        }
    };
    // The store first: it alone makes the revocation last, and replicas read it within a
    // minute even when the announcement cannot go out.
    let token_or_jti = match secret_argument(&args.token_or_jti) {
        Ok(text) => text,
        Err(code) => return code,
    };
    let revoked = match ringvault::auth::store_revocations(&*backend, &token_or_jti).await {
        Ok(revoked) => revoked,
        Err(error) => {
            eprintln!("error: {error}");
            return exit_code(&error);
        }
    };
    // A JWT (a token whose revocation digest is not its whole text's) is revoked twice: by its
    // signed part, and by its whole text for replicas that predate revocation by the signed
    // part.
    let is_jwt = ringvault::auth::revocation_digest(&token_or_jti)
        != ringvault::auth::token_digest(&token_or_jti);
    let whole_text = ringvault::auth::Revocation::whole_token(&token_or_jti).object_key();
    for revocation in &revoked {
        let note = if is_jwt && revocation.object_key() == whole_text {
            " (whole text, for older replicas)"
        } else {
            ""
        };
        println!("revoked {}{note}", revocation.describe());
    }
    let announced = async {
        let nats = connect_nats(&config)
            .await
            .map_err(|error| error.to_string())?;
        ringvault::auth::announce_revocations(&nats, &config.nats.prefix, &revoked)
            .await
            .map_err(|error| error.to_string())
    }
    .await;
    match announced {
        Ok(()) => 0,
        Err(reason) => {
            eprintln!(
                "error: stored, but not announced ({reason}): running replicas refuse the token \
                 at their next read of the store, within a minute; running revoke again is harmless"
            );
            69
        }
    }
}
