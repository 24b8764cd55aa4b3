//! In-process ringvault instances for integration tests, on a real nats-server.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ringvault::client::{Client, ClientOptions};
use ringvault::config::Config;
use ringvault::crypto::{Kek, MasterKeys};
use ringvault::keyring::{CachePolicy, KeyringStore, Keyrings};
use ringvault::protocol::{EncryptResponse, Format};
use ringvault::server::Server;
use ringvault::storage::{ObjectStoreBackend, Storage, StoragePolicy};
use tempfile::TempDir;

use super::{NatsServer, S3Server};

/// The keyrings of a local-directory store at `root`, opened with `master_keys` as another
/// process would (no service in between).
pub fn local_keyrings(root: &Path, master_keys: MasterKeys) -> Keyrings {
    let backend = ObjectStoreBackend::local(root).unwrap();
    let storage = Storage::new(std::sync::Arc::new(backend), StoragePolicy::default());
    Keyrings::new(
        KeyringStore::new(storage, std::sync::Arc::new(master_keys)),
        CachePolicy::default(),
    )
}

/// The `$SRV.STATS` entry of endpoint `name` (`Encrypt`, `EncryptBulk`, …) of the ringvault
/// service on `nats`.
pub async fn endpoint_stats(nats: &async_nats::Client, name: &str) -> serde_json::Value {
    let stats = nats
        .request("$SRV.STATS.ringvault", "".into())
        .await
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&stats.payload).unwrap();
    stats["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|endpoint| endpoint["name"] == name)
        .unwrap_or_else(|| panic!("no endpoint {name} in {stats}"))
        .clone()
}

/// The token every test service accepts (with every permission).
pub const TOKEN: &str = "test-token-with-every-permission";

/// A nats-server, a store directory and a master key that several instances can share.
pub struct TestEnv {
    pub nats: NatsServer,
    pub dir: TempDir,
    pub master_key: String,
    /// The S3 server when the store is S3 (else the store is a local directory).
    pub s3: Option<S3Server>,
}

impl TestEnv {
    /// NATS and a local-directory store.
    pub async fn start() -> TestEnv {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("token"), TOKEN).expect("write token");
        TestEnv {
            nats: NatsServer::start().await,
            dir,
            master_key: Kek::generate().to_base64().to_string(),
            s3: None,
        }
    }

    /// The file store, and a nats-server whose `max_payload` is `bytes`.
    pub async fn start_with_max_payload(bytes: usize) -> TestEnv {
        let mut env = TestEnv::start().await;
        env.nats = NatsServer::start_with_max_payload(bytes).await;
        env
    }

    /// NATS and an S3 store (s3s-fs).
    pub async fn start_s3() -> TestEnv {
        let mut env = TestEnv::start().await;
        env.s3 = Some(S3Server::start().await);
        env
    }

    /// Where the objects live on disk (for S3, the bucket directory of s3s-fs).
    pub fn store_path(&self) -> PathBuf {
        match &self.s3 {
            Some(s3) => s3.bucket_dir(),
            None => self.dir.path().join("store"),
        }
    }

    /// The storage settings of this env as configuration pairs.
    pub fn storage_env(&self) -> Vec<(String, String)> {
        let Some(s3) = &self.s3 else {
            return vec![(
                "RINGVAULT_STORAGE_PATH".into(),
                self.store_path().display().to_string(),
            )];
        };
        vec![
            ("RINGVAULT_STORAGE_BACKEND".into(), "s3".into()),
            ("RINGVAULT_STORAGE_S3_ENDPOINT".into(), s3.endpoint()),
            ("RINGVAULT_STORAGE_S3_REGION".into(), s3.region().into()),
            ("RINGVAULT_STORAGE_S3_BUCKET".into(), s3.bucket().into()),
            (
                "RINGVAULT_STORAGE_S3_ACCESS_KEY_ID".into(),
                s3.access_key().into(),
            ),
            (
                "RINGVAULT_STORAGE_S3_SECRET_ACCESS_KEY".into(),
                s3.secret_key().into(),
            ),
        ]
    }

    /// The configuration of an instance: this env's NATS, store and key, then `extra`.
    pub fn config(&self, extra: &[(&str, &str)]) -> Config {
        let mut env: Vec<(String, String)> = vec![
            ("RINGVAULT_NATS_URL".into(), self.nats.url()),
            (
                "RINGVAULT_MASTER_KEY_CURRENT".into(),
                self.master_key.clone(),
            ),
            (
                "RINGVAULT_MASTER_KEY_GENERATE_IF_MISSING".into(),
                "false".into(),
            ),
            (
                "RINGVAULT_AUTH_TOKEN_FILE".into(),
                self.dir.path().join("token").display().to_string(),
            ),
            (
                "RINGVAULT_AUTH_GENERATE_TOKEN_IF_MISSING".into(),
                "false".into(),
            ),
            (
                "RINGVAULT_SUPERVISION_RESTART_BACKOFF_MS".into(),
                "10".into(),
            ),
        ];
        env.extend(self.storage_env());
        env.extend(
            extra
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string())),
        );
        Config::from_sources(None, env).expect("test config is valid")
    }

    /// Starts an instance with `extra` configuration.
    pub async fn service(&self, extra: &[(&str, &str)]) -> Server {
        start_server(&self.config(extra)).await
    }

    /// A client with the test token in `format`.
    pub async fn client(&self, format: Format) -> Client {
        client(&self.nats.url(), Some(TOKEN), format).await
    }
}

pub async fn start_server(config: &Config) -> Server {
    let nats = async_nats::connect(config.nats.url.as_str())
        .await
        .expect("connect to test nats");
    let server = Server::start(config, nats).await.expect("server starts");
    server
}

pub async fn client(url: &str, token: Option<&str>, format: Format) -> Client {
    Client::connect(
        url,
        ClientOptions {
            token: token.map(str::to_owned),
            timeout: Duration::from_secs(10),
            format,
            ..ClientOptions::default()
        },
    )
    .await
    .expect("client connects")
}

/// The next `count` audit records (or more, when the last message carries more) on `audit`, a
/// subscription to the audit subject: one JSON object per line of each message, waiting up to
/// 10 s for each message.
pub async fn audit_records(
    audit: &mut async_nats::Subscriber,
    count: usize,
) -> Vec<serde_json::Value> {
    use futures::StreamExt as _;
    let mut records = Vec::new();
    while records.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(10), audit.next())
            .await
            .unwrap_or_else(|_| panic!("{count} audit records within 10 s, got {}", records.len()))
            .expect("the audit subscription is open");
        let lines = String::from_utf8(message.payload.to_vec()).expect("audit records are utf-8");
        records.extend(
            lines
                .lines()
                .map(|line| serde_json::from_str(line).expect("an audit record is json")),
        );
    }
    records
}

/// Encrypts `text` on `keyring` and checks that it decrypts back to it; returns the Encrypt
/// reply.
pub async fn assert_round_trip(client: &Client, keyring: &str, text: &str) -> EncryptResponse {
    let sealed = client.encrypt(keyring, text).await.unwrap();
    let opened = client.decrypt(keyring, &sealed.encrypted).await.unwrap();
    assert_eq!(opened.plaintext, text, "{keyring}");
    sealed
}

/// Polls `condition` every 20 ms for up to `within`.
pub async fn eventually<F, Fut>(within: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if condition().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

pub fn files_under(path: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![path.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// The log lines written on this thread while it is alive: a `#[tokio::test]` runs the
/// in-process service on the test's own thread, so its request handling logs here.
pub struct CapturedLogs {
    buffer: Arc<std::sync::Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

impl CapturedLogs {
    /// Starts capturing at `info`, as the service logs by default.
    pub fn start() -> Self {
        let buffer = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || LogSink(sink.clone()))
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        Self {
            buffer,
            _guard: guard,
        }
    }

    /// What was logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buffer.lock().unwrap()).into_owned()
    }
}

struct LogSink(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
