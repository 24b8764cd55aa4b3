//! The bench echo baseline and the client's transport behaviour against a real `nats-server`
//! (no ringvault service involved).

use crate::common;

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use common::NatsServer;
use futures::StreamExt as _;
use ringvault::bench::{self, BenchCase, BenchMethod};
use ringvault::client::{Client, ClientOptions};
use ringvault::protocol::{self, ErrorBody, Format, Method};
use ringvault::{Error, Kind};

#[tokio::test]
async fn echo_case_runs_every_request_without_errors() {
    let server = NatsServer::start().await;
    let nats = async_nats::connect(server.url()).await.expect("connect");
    let subject = "bench.echo";
    let responder = bench::start_echo_responder(&nats, subject)
        .await
        .expect("start echo responder");

    for (method, format) in [
        (BenchMethod::Encrypt, Format::Protobuf),
        (BenchMethod::Decrypt, Format::Protobuf),
        (BenchMethod::Decrypt, Format::Json),
    ] {
        let case = BenchCase {
            method,
            requests: 200,
            concurrency: 8,
            payload_bytes: 1024,
            keyring: bench::DEFAULT_KEYRING.to_owned(),
            credential: bench::Credential::StaticToken,
        };
        let mut results = Vec::new();
        // The plain echo, then the reply-shaped one with replies of 1500 bytes.
        for reply_len in [None, Some(1500)] {
            let last_progress = std::cell::Cell::new(0);
            let progress = |done| {
                assert!(done <= 200, "progress {done} beyond the request count");
                last_progress.set(last_progress.get().max(done));
            };
            let result = bench::run_echo_case(
                &nats,
                subject,
                reply_len,
                &case,
                Some("t0k"),
                format,
                progress,
            )
            .await
            .expect("echo case")
            .summarize(&case);
            assert_eq!(result.requests, 200, "{result:?}");
            assert_eq!(result.errors, 0, "{:?}", result.first_error);
            assert!(result.req_per_sec > 0.0);
            assert!(result.p50 <= result.p99 && result.p99 <= result.max);
            assert_eq!(last_progress.get(), 200);
            results.push(result);
        }
        let [echo, shaped] = <[_; 2]>::try_from(results).expect("two results");
        let row = bench::BenchRow {
            service: echo.clone(),
            echo,
            shaped: Some(shaped),
        };
        let line = row.json_line();
        assert!(line.contains("\"ratio\":1.0"), "{line}");
        assert!(line.contains("\"ratio_to_shaped\":"), "{line}");
        let text = bench::table(&[row]);
        assert_eq!(text.lines().count(), 3, "{text}");
    }

    // A shaped reply has the service's headers and the length its subject names; the plain
    // echo's reply is the request itself, without headers.
    for (content_type, reply_content_type) in [
        (None, None),
        (Some("application/x-protobuf"), None),
        (
            Some("application/json; charset=utf-8"),
            Some(protocol::JSON_CONTENT_TYPE),
        ),
    ] {
        let mut headers =
            ringvault::client::request_headers(Some("t0k"), Format::Protobuf).expect("headers");
        if let Some(content_type) = content_type {
            headers.insert(protocol::CONTENT_TYPE, content_type);
        }
        let request_id = headers
            .get(protocol::REQUEST_ID)
            .expect("a request id")
            .to_string();
        let shaped = nats
            .request_with_headers(
                bench::shaped_echo_subject(subject, 777),
                headers.clone(),
                Bytes::from_static(b"request"),
            )
            .await
            .expect("shaped echo reply");
        assert_eq!(shaped.payload.len(), 777);
        let reply_headers = shaped.headers.expect("reply headers");
        assert_eq!(
            reply_headers.get(protocol::REQUEST_ID).map(|v| v.as_str()),
            Some(request_id.as_str())
        );
        assert!(reply_headers.get(protocol::AUTHORIZATION).is_none());
        assert_eq!(
            reply_headers
                .get(protocol::CONTENT_TYPE)
                .map(|v| v.as_str()),
            reply_content_type,
            "request content type {content_type:?}"
        );
        let plain = nats
            .request_with_headers(subject, headers, Bytes::from_static(b"request"))
            .await
            .expect("echo reply");
        assert_eq!(&plain.payload[..], b"request");
        assert!(plain.headers.is_none_or(|headers| headers.is_empty()));
    }

    // A length beyond the server's max_payload is not answered, and the echo goes on answering.
    let too_long = nats.server_info().max_payload + 1;
    let unanswered = tokio::time::timeout(
        Duration::from_millis(300),
        nats.request(
            bench::shaped_echo_subject(subject, too_long),
            Bytes::from_static(b"x"),
        ),
    )
    .await;
    assert!(unanswered.is_err(), "answered: {unanswered:?}");
    let shaped = nats
        .request(bench::shaped_echo_subject(subject, 3), Bytes::new())
        .await
        .expect("still answering");
    assert_eq!(shaped.payload.len(), 3);

    // Aborting the responder stops both echoes.
    responder.abort();
    for subject in [subject.to_owned(), bench::shaped_echo_subject(subject, 3)] {
        let outcome = tokio::time::timeout(
            Duration::from_secs(5),
            eventually_no_responders(&nats, &subject),
        )
        .await;
        assert!(outcome.is_ok(), "{subject} still answered");
    }
}

/// Waits until a request to `subject` finds no responder. Each try is short: a request sent
/// before the unsubscription reached the server goes to a subscription that is gone, and gets
/// no answer at all.
async fn eventually_no_responders(nats: &async_nats::Client, subject: &str) {
    loop {
        let request = nats.request(subject.to_owned(), Bytes::new());
        let outcome = tokio::time::timeout(Duration::from_millis(200), request).await;
        if let Ok(Err(error)) = outcome {
            if error.kind() == async_nats::RequestErrorKind::NoResponders {
                return;
            }
        }
    }
}

#[tokio::test]
async fn no_responders_is_unavailable_after_the_retries() {
    let server = NatsServer::start().await;
    let options = ClientOptions {
        prefix: "nobody.home".into(),
        retries: 2,
        ..ClientOptions::default()
    };
    let client = Client::connect(&server.url(), options)
        .await
        .expect("connect");
    let started = Instant::now();
    let error = client.liveness().await.unwrap_err();
    assert_eq!(error.kind(), Kind::Unavailable, "{error}");
    assert!(error.message().contains("nobody.home.Liveness"), "{error}");
    // Backoffs of 50 ms and 100 ms happened before giving up.
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn unreachable_server_is_unavailable_and_names_the_url() {
    let url = format!("nats://127.0.0.1:{}", common::free_port());
    let options = ClientOptions {
        timeout: Duration::from_secs(1),
        ..ClientOptions::default()
    };
    let error = Client::connect(&url, options).await.unwrap_err();
    assert_eq!(error.kind(), Kind::Unavailable, "{error}");
    assert!(error.message().contains(&url), "{error}");
}

/// A stand-in service on `vault.v1.Encrypt`: a request with `Authorization: Bearer good` gets a
/// success reply in the request's format; anything else gets a 401 error reply.
async fn start_fake_encrypt(nats: &async_nats::Client) -> tokio::task::JoinHandle<()> {
    let mut subscriber = nats
        .subscribe(Method::Encrypt.subject(protocol::DEFAULT_PREFIX))
        .await
        .expect("subscribe");
    nats.flush().await.expect("flush");
    let nats = nats.clone();
    tokio::spawn(async move {
        while let Some(message) = subscriber.next().await {
            let Some(reply) = message.reply else {
                continue;
            };
            let request_headers = message.headers.unwrap_or_default();
            let header = |name: &str| request_headers.get(name).map(|v| v.as_str().to_owned());
            let format = Format::from_content_type(header(protocol::CONTENT_TYPE).as_deref());
            let mut headers = HeaderMap::new();
            if let Some(request_id) = header(protocol::REQUEST_ID) {
                headers.insert(protocol::REQUEST_ID, request_id.as_str());
            }
            let body = if header(protocol::AUTHORIZATION).as_deref() == Some("Bearer good") {
                let request: protocol::EncryptRequest =
                    protocol::decode(format, &message.payload).expect("decode request");
                let response = protocol::EncryptResponse {
                    encrypted: format!("sealed:{}", request.data),
                    key_id: "dek_1".into(),
                };
                protocol::encode(format, &response)
            } else {
                let error = Error::new(Kind::InvalidToken, "token is not valid");
                headers.insert(protocol::SERVICE_ERROR_CODE, "401");
                headers.insert(protocol::SERVICE_ERROR, error.message());
                ErrorBody::from_error(&error).to_bytes()
            };
            nats.publish_with_headers(reply, headers, body)
                .await
                .expect("publish reply");
        }
    })
}

#[tokio::test]
async fn calls_decode_successes_and_surface_service_errors() {
    let server = NatsServer::start().await;
    let nats = async_nats::connect(server.url()).await.expect("connect");
    let fake = start_fake_encrypt(&nats).await;

    for format in [Format::Protobuf, Format::Json] {
        let client = Client::new(
            nats.clone(),
            ClientOptions {
                token: Some("good".into()),
                format,
                ..ClientOptions::default()
            },
        );
        let sealed = client.encrypt("ring", "hello").await.expect("encrypt");
        assert_eq!(sealed.encrypted, "sealed:hello");
        assert_eq!(sealed.key_id, "dek_1");

        let error = client
            .with_token(Some("bad".into()))
            .encrypt("ring", "hello")
            .await
            .unwrap_err();
        assert_eq!(error.kind(), Kind::InvalidToken, "{error}");
        assert_eq!(error.message(), "token is not valid");
    }

    let client = Client::new(nats.clone(), ClientOptions::default());
    let mut headers = HeaderMap::new();
    headers.insert(protocol::REQUEST_ID, "req-42");
    let reply = client
        .request_raw(Method::Encrypt, headers, Bytes::from_static(b"\xff\xff"))
        .await
        .expect("raw request");
    assert_eq!(reply.request_id().as_deref(), Some("req-42"));
    assert_eq!(reply.error().map(|e| e.kind()), Some(Kind::InvalidToken));
    fake.abort();
}

#[tokio::test]
async fn a_silent_responder_times_out_as_unavailable() {
    let server = NatsServer::start().await;
    let nats = async_nats::connect(server.url()).await.expect("connect");
    // Subscribed but never answering.
    let _silent = nats
        .subscribe(Method::Liveness.subject("silent"))
        .await
        .expect("subscribe");
    nats.flush().await.expect("flush");
    let options = ClientOptions {
        prefix: "silent".into(),
        timeout: Duration::from_millis(200),
        ..ClientOptions::default()
    };
    let error = Client::new(nats, options).liveness().await.unwrap_err();
    assert_eq!(error.kind(), Kind::Unavailable, "{error}");
    assert!(error.message().contains("timed out"), "{error}");
}

/// `PATH` with the harness's nats-server first, for the bench, which starts `nats-server`.
fn path_with_nats_server() -> std::ffi::OsString {
    let nats_dir = common::nats_server_bin()
        .parent()
        .expect("nats-server has a directory")
        .to_owned();
    let rest = std::env::var_os("PATH").unwrap_or_default();
    std::env::join_paths(std::iter::once(nats_dir).chain(std::env::split_paths(&rest)))
        .expect("PATH")
}

/// Runs `ringvault bench` with `args` (its own nats-server, service and echo processes) and
/// returns the JSON lines it printed.
fn run_bench_command(args: &[&str]) -> Vec<serde_json::Value> {
    let output = std::process::Command::new("timeout")
        .arg("120")
        .arg(env!("CARGO_BIN_EXE_ringvault"))
        .arg("bench")
        .args(args)
        .env("RINGVAULT_LOG_LEVEL", "warn")
        .env("PATH", path_with_nats_server())
        .output()
        .expect("run ringvault bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "bench failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str(line).expect("json line"))
        .collect()
}

#[test]
fn the_bench_command_measures_its_own_service_and_echo_processes() {
    let lines = run_bench_command(&["--requests", "300", "--concurrency", "8", "--size", "64"]);
    let [case] = lines.as_slice() else {
        panic!("one case expected: {lines:?}");
    };
    assert_eq!(case["method"], "encrypt");
    assert!(case["ratio_to_shaped"].as_f64().unwrap() > 0.0, "{case}");
    for side in ["service", "echo", "shaped_echo"] {
        assert_eq!(case[side]["requests"], 300, "{case}");
        assert_eq!(case[side]["errors"], 0, "{case}");
        assert!(case[side]["req_per_sec"].as_f64().unwrap() > 0.0, "{case}");
    }
}

#[test]
fn the_cold_keyring_case_reports_the_service_processes_memory() {
    let lines = run_bench_command(&["--method", "cold-encrypt", "--requests", "200"]);
    let memory = lines
        .iter()
        .find(|line| line.get("cold_keyrings").is_some())
        .unwrap_or_else(|| panic!("no memory line: {lines:?}"));
    assert_eq!(memory["cold_keyrings"], 200);
    // Read from the service's own process, which exists apart from the bench's.
    let resident = memory["resident_bytes"]
        .as_u64()
        .expect("resident bytes on linux");
    let before = memory["resident_bytes_before"].as_u64().unwrap();
    assert!(resident > 1 << 20 && before > 1 << 20, "{memory}");
    let case = lines
        .iter()
        .find(|line| line["method"] == "cold-encrypt")
        .expect("cold case line");
    assert_eq!(case["service"]["errors"], 0, "{case}");
    // Its subject is the first use of each keyring, which no echo stands in for.
    assert!(case.get("shaped_echo").is_none(), "{case}");
}

/// The pids of `parent`'s children and their command names (from `/proc`).
fn children_of(parent: u32) -> Vec<(u32, String)> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces, so split after the last ')'.
        let Some((head, tail)) = stat.rsplit_once(") ") else {
            continue;
        };
        let ppid = tail
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            let name = head
                .split_once(" (")
                .map_or("", |(_, name)| name)
                .to_owned();
            children.push((pid, name));
        }
    }
    children
}

/// A child process killed when the test ends, however it ends.
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_benchs_service_and_echo_stop_when_the_bench_is_killed() {
    // The bench's own temporary directory goes in one this test owns and removes.
    let temp = tempfile::tempdir().expect("tempdir");
    let mut bench = KilledOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_ringvault"))
            .args(["bench", "--requests", "100000000", "--concurrency", "1"])
            .env("RINGVAULT_LOG_LEVEL", "warn")
            .env("PATH", path_with_nats_server())
            .env("TMPDIR", temp.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start ringvault bench"),
    );
    let bench_pid = bench.0.id();
    // Wait for its three children: nats-server, the service and the echo responder.
    let deadline = Instant::now() + Duration::from_secs(60);
    let children = loop {
        let children = children_of(bench_pid);
        if children.len() >= 3 {
            break children;
        }
        assert!(Instant::now() < deadline, "children: {children:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    bench.0.kill().expect("SIGKILL the bench");
    bench.0.wait().expect("reap the bench");

    let alive = |pid: u32| std::path::Path::new(&format!("/proc/{pid}")).exists();
    let (nats, ringvaults): (Vec<_>, Vec<_>) = children
        .into_iter()
        .partition(|(_, name)| name.starts_with("nats-server"));
    let deadline = Instant::now() + Duration::from_secs(15);
    while ringvaults.iter().any(|(pid, _)| alive(*pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    // A SIGKILLed bench cannot stop its nats-server nor remove its store; this test does (the
    // store goes with `temp`).
    for (pid, _) in &nats {
        let _ = std::process::Command::new("kill")
            .arg(pid.to_string())
            .status();
    }
    assert_eq!(ringvaults.len(), 2, "service and echo: {ringvaults:?}");
    let left: Vec<_> = ringvaults.iter().filter(|(pid, _)| alive(*pid)).collect();
    assert!(left.is_empty(), "outlived the bench: {left:?}");
}

/// A stand-in service: Decrypt answers properly; Encrypt answers the first request properly,
/// then with replies whose key id grows by one character each time, or with error replies when
/// `fail_later` is set.
async fn flaky_service(
    nats: async_nats::Client,
    prefix: &str,
    fail_later: bool,
) -> tokio::task::JoinHandle<()> {
    let encrypts = nats
        .subscribe(Method::Encrypt.subject(prefix))
        .await
        .expect("subscribe");
    let decrypts = nats
        .subscribe(Method::Decrypt.subject(prefix))
        .await
        .expect("subscribe");
    nats.flush().await.expect("flush");
    tokio::spawn(async move {
        let dek = ringvault::crypto::Dek::generate();
        let mut encrypts_answered = 0usize;
        let mut requests = futures::stream::select(encrypts, decrypts);
        while let Some(message) = requests.next().await {
            let Some(reply) = message.reply else { continue };
            let mut headers = HeaderMap::new();
            let body = if message.subject.ends_with("Decrypt") {
                let request: protocol::DecryptRequest =
                    protocol::decode(Format::Protobuf, &message.payload)
                        .expect("a decrypt request");
                let envelope = protocol::decode_envelope(&request.encrypted).expect("an envelope");
                let plaintext = String::from_utf8(dek.open(envelope).expect("opens")).unwrap();
                protocol::encode(Format::Protobuf, &protocol::DecryptResponse { plaintext })
            } else {
                let index = encrypts_answered;
                encrypts_answered += 1;
                if index > 0 && fail_later {
                    headers.insert(protocol::SERVICE_ERROR_CODE, "500");
                    headers.insert(protocol::SERVICE_ERROR, "broken");
                    ErrorBody::from_error(&Error::internal("broken")).to_bytes()
                } else {
                    let request: protocol::EncryptRequest =
                        protocol::decode(Format::Protobuf, &message.payload)
                            .expect("an encrypt request");
                    let envelope = dek.seal_envelope(request.data.as_bytes());
                    let key_id = format!("{}{}", dek.id(), "x".repeat(index));
                    protocol::encode_encrypt_response(Format::Protobuf, &envelope, &key_id)
                }
            };
            nats.publish_with_headers(reply, headers, body)
                .await
                .expect("reply");
        }
    })
}

#[tokio::test]
async fn service_case_counts_replies_of_another_length_or_with_an_error_as_failures() {
    let server = NatsServer::start().await;
    let case = BenchCase {
        method: BenchMethod::Encrypt,
        requests: 20,
        concurrency: 4,
        payload_bytes: 100,
        keyring: bench::DEFAULT_KEYRING.to_owned(),
        credential: bench::Credential::StaticToken,
    };
    for (fail_later, expected) in [(false, "expected"), (true, "broken")] {
        let prefix = format!("flaky{}", u8::from(fail_later));
        let nats = async_nats::connect(server.url()).await.expect("connect");
        let responder = flaky_service(nats.clone(), &prefix, fail_later).await;
        let client = Client::new(
            nats,
            ClientOptions {
                prefix,
                ..ClientOptions::default()
            },
        );
        let result = bench::run_service_case(&client, &case, |_| {})
            .await
            .expect("the first reply is well formed")
            .summarize(&case);
        assert_eq!(result.errors, 20, "{result:?}");
        let first_error = result.first_error.unwrap_or_default();
        assert!(first_error.contains(expected), "{first_error}");
        responder.abort();
    }
}
