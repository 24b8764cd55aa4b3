//! The real binary under load receives SIGTERM: it drains (every request it took gets its
//! reply), stops taking new ones (callers see no responders → `unavailable`) and exits 0.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::service::{eventually, TOKEN};
use common::NatsServer;
use ringvault::client::{Client, ClientOptions};
use ringvault::crypto::Kek;
use ringvault::protocol::Format;
use ringvault::Kind;
use tokio::sync::Mutex;

/// The `ringvault serve` child process, killed if the test ends before it exits.
struct Service {
    child: Child,
    log: PathBuf,
}

impl Service {
    fn spawn(nats_url: &str, dir: &Path) -> Service {
        let token_file = dir.join("token");
        std::fs::write(&token_file, TOKEN).expect("write token file");
        let log = dir.join("ringvault.log");
        let open_log = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .expect("open service log")
        };
        let master_key = Kek::generate().to_base64().to_string();
        let child = Command::new(env!("CARGO_BIN_EXE_ringvault"))
            .arg("serve")
            .current_dir(dir)
            .env("RINGVAULT_NATS_URL", nats_url)
            .env("RINGVAULT_STORAGE_PATH", dir.join("store"))
            .env("RINGVAULT_MASTER_KEY_CURRENT", master_key)
            .env("RINGVAULT_MASTER_KEY_GENERATE_IF_MISSING", "false")
            .env("RINGVAULT_AUTH_TOKEN_FILE", &token_file)
            .env("RINGVAULT_AUTH_GENERATE_TOKEN_IF_MISSING", "false")
            // TEST_SERVICE_LOG, not RINGVAULT_…: every child inherits the environment, and the
            // service refuses RINGVAULT_ variables that name no setting.
            .env(
                "RINGVAULT_LOG_LEVEL",
                std::env::var("TEST_SERVICE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(open_log())
            .stderr(open_log())
            .spawn()
            .expect("spawn ringvault serve");
        Service { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

const WORKERS: usize = 16;
const PAYLOAD_BYTES: usize = 4 * 1024;

/// What happened to one worker's requests.
#[derive(Debug, Default)]
struct Tally {
    ok: usize,
    stopped_by_no_responders: usize,
    timeouts: Vec<String>,
    other_errors: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_drains_every_request_and_exits_zero() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut service = Service::spawn(&nats.url(), dir.path());

    let probe = Client::connect(
        &nats.url(),
        ClientOptions {
            token: Some(TOKEN.into()),
            timeout: Duration::from_secs(1),
            retries: 0,
            format: Format::Protobuf,
            ..ClientOptions::default()
        },
    )
    .await
    .expect("probe connects");
    let up = eventually(Duration::from_secs(20), || {
        let probe = probe.clone();
        async move { probe.liveness().await.is_ok() }
    })
    .await;
    assert!(
        up,
        "ringvault did not answer Liveness within 20 s (exit: {:?}); log:\n{}",
        service.exited(),
        service.log()
    );

    let client = Client::connect(
        &nats.url(),
        ClientOptions {
            token: Some(TOKEN.into()),
            timeout: Duration::from_secs(10),
            format: Format::Protobuf,
            ..ClientOptions::default()
        },
    )
    .await
    .expect("client connects");
    let payload: Arc<str> = "s".repeat(PAYLOAD_BYTES).into();
    // Create the keyrings first, so that the load is steady encryption.
    for ring in 0..4 {
        client
            .encrypt(&format!("ws_shutdown_{ring}"), "warm up")
            .await
            .expect("warm-up encrypt");
    }

    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut workers = Vec::with_capacity(WORKERS);
    for worker in 0..WORKERS {
        let client = client.clone();
        let payload = payload.clone();
        let tally = tally.clone();
        workers.push(tokio::spawn(async move {
            let keyring = format!("ws_shutdown_{}", worker % 4);
            let mut ok = 0;
            let outcome = loop {
                match client.encrypt(&keyring, &payload).await {
                    Ok(reply) => {
                        assert!(reply.key_id.starts_with("dek_"), "{reply:?}");
                        ok += 1;
                    }
                    Err(error) => break error,
                }
            };
            let mut tally = tally.lock().await;
            tally.ok += ok;
            let text = format!("worker {worker} after {ok} replies: {outcome}");
            match outcome.kind() {
                Kind::Unavailable if outcome.message().contains("no ringvault responded") => {
                    tally.stopped_by_no_responders += 1;
                }
                Kind::Unavailable if outcome.message().contains("timed out") => {
                    tally.timeouts.push(text);
                }
                _ => tally.other_errors.push(text),
            }
        }));
    }

    tokio::time::sleep(Duration::from_millis(300)).await;
    let served_before_signal = tally.lock().await.ok;
    assert!(
        service.exited().is_none(),
        "ringvault exited under load before SIGTERM; log:\n{}",
        service.log()
    );
    service.terminate();

    // Every worker ends: at its first "no responders" (the service stopped taking requests)
    // or, which is the failure this test is about, a timeout.
    let all_done =
        tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(workers))
            .await
            .expect("workers finished within 30 s");
    for done in all_done {
        done.expect("worker did not panic");
    }

    let status = service.wait_exit(Duration::from_secs(20)).await;
    let log = service.log();
    let tally = tally.lock().await;
    assert!(
        tally.timeouts.is_empty() && tally.other_errors.is_empty(),
        "requests lost during shutdown ({} ok, {} stopped cleanly):\ntimeouts: {:#?}\nother: {:#?}\nlog:\n{log}",
        tally.ok,
        tally.stopped_by_no_responders,
        tally.timeouts,
        tally.other_errors,
    );
    assert_eq!(tally.stopped_by_no_responders, WORKERS);
    assert!(tally.ok > 0, "no request was served; log:\n{log}");
    let status = status
        .unwrap_or_else(|| panic!("ringvault did not exit within 20 s of SIGTERM; log:\n{log}"));
    assert!(
        status.success(),
        "ringvault exited with {status}; log:\n{log}"
    );
    assert!(
        log.contains("shutdown signal received"),
        "the service saw SIGTERM; log:\n{log}"
    );
    eprintln!(
        "served {} encrypts ({served_before_signal} before SIGTERM), {} workers stopped by no responders",
        tally.ok, tally.stopped_by_no_responders
    );
}

/// With the nats-server gone (crashed, unreachable) nothing can arrive or be answered, so the
/// drain does not wait for it: shutdown finishes in seconds, not after the drain timeouts.
#[tokio::test]
async fn shutdown_with_nats_gone_does_not_wait_for_it() {
    let mut env = common::service::TestEnv::start().await;
    let service = env.service(&[]).await;
    let client = env.client(Format::Protobuf).await;
    client.encrypt("ws_1/app", "before").await.unwrap();
    env.nats.kill().await;
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(45), service.shutdown())
        .await
        .expect("shutdown hung with nats gone");
    outcome.unwrap();
    // The drain timeouts alone are 30 s and 60 s; a bounded flush makes it a few seconds.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "shutdown took {:?}",
        started.elapsed()
    );
}
