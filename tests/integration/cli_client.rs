//! The client commands of the binary (`keygen`, `liveness`, `encrypt`, `decrypt`, `reencrypt`,
//! `rotate`) against a service on a real nats-server: what README's quick start runs, and the
//! exit codes it documents.

use crate::common;

use std::process::Output;
use std::time::Duration;

use common::service::{TestEnv, TOKEN};
use ringvault::crypto::Kek;
use ringvault::protocol::decode_envelope;

/// Runs `ringvault ARGS` with `stdin` as standard input, bounded in time; none of the caller's
/// `RINGVAULT_*` client variables reach it.
async fn ringvault(args: &[&str], stdin: &[u8]) -> Output {
    use tokio::io::AsyncWriteExt as _;

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ringvault"))
        .args(args)
        .env_remove("RINGVAULT_URL")
        .env_remove("RINGVAULT_TOKEN")
        .env_remove("RINGVAULT_CONFIG")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ringvault");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin).await.expect("write stdin");
    drop(input);
    tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the command ends within 30 s")
        .expect("the command runs")
}

fn stdout(output: &Output) -> String {
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout.clone())
        .expect("utf-8")
        .trim_end_matches('\n')
        .to_owned()
}

fn key_id(envelope: &str) -> String {
    decode_envelope(envelope)
        .expect("an envelope")
        .encryption_key_id
}

#[test]
fn keygen_prints_a_master_key_that_parses() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ringvault"))
        .arg("keygen")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let first = Kek::parse(text.trim()).expect("keygen's output is a master key");
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_ringvault"))
        .arg("keygen")
        .output()
        .unwrap();
    let second = Kek::parse(String::from_utf8(again.stdout).unwrap().trim()).unwrap();
    assert_ne!(first.id(), second.id(), "each keygen makes a new key");
}

#[tokio::test]
async fn client_commands_round_trip_and_exit_with_the_documented_codes() {
    let env = TestEnv::start().await;
    let _service = env.service(&[]).await;
    let url = env.nats.url();
    let token_file = env.dir.path().join("token").display().to_string();
    let client = |command: &'static str| {
        vec![
            command.to_owned(),
            "--url".to_owned(),
            url.clone(),
            "--token-file".to_owned(),
            token_file.clone(),
        ]
    };
    let run = |args: Vec<String>, extra: &[&str], stdin: &[u8]| {
        let stdin = stdin.to_vec();
        let mut args = args;
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ringvault(&args, &stdin).await
        }
    };

    assert_eq!(stdout(&run(client("liveness"), &[], b"").await), "ok");

    let sealed = stdout(&run(client("encrypt"), &["-k", "ws_42", "hello"], b"").await);
    let opened = run(client("decrypt"), &["-k", "ws_42", &sealed], b"").await;
    assert_eq!(stdout(&opened), "hello");

    // Data from standard input, as the quick start pipes it; the envelope read back from
    // standard input too, with the newline a shell pipe leaves.
    let from_stdin = stdout(&run(client("encrypt"), &["-k", "ws_42"], b"from stdin").await);
    let piped = format!("{from_stdin}\n");
    let opened = run(client("decrypt"), &["-k", "ws_42"], piped.as_bytes()).await;
    assert_eq!(stdout(&opened), "from stdin");

    let rotated = stdout(&run(client("rotate"), &["-k", "ws_42"], b"").await);
    assert!(rotated.starts_with("dek_"), "{rotated}");
    assert_ne!(rotated, key_id(&sealed), "rotate makes a new key");
    let resealed = stdout(&run(client("reencrypt"), &["-k", "ws_42", &sealed], b"").await);
    assert_eq!(
        key_id(&resealed),
        rotated,
        "reencrypt seals with the current key"
    );
    let opened = run(client("decrypt"), &["-k", "ws_42", &resealed], b"").await;
    assert_eq!(stdout(&opened), "hello");

    // Exit codes: 65 invalid argument, 66 not found, 77 refused credential, 69 no service.
    let not_base64 = run(client("decrypt"), &["-k", "ws_42", "not base64!"], b"").await;
    assert_eq!(not_base64.status.code(), Some(65), "{not_base64:?}");
    assert!(String::from_utf8_lossy(&not_base64.stderr).contains("invalid_argument"));

    let other_keyring = run(client("decrypt"), &["-k", "ws_43", &sealed], b"").await;
    assert_eq!(other_keyring.status.code(), Some(66), "{other_keyring:?}");

    let mut wrong_token = vec!["encrypt".to_owned(), "--url".to_owned(), url.clone()];
    wrong_token.extend(["--token".to_owned(), format!("{TOKEN}-not")]);
    let refused = run(wrong_token, &["-k", "ws_42", "x"], b"").await;
    assert_eq!(refused.status.code(), Some(77), "{refused:?}");

    let nobody = run(
        client("liveness"),
        &["--prefix", "nobody.v1", "--timeout-ms", "200"],
        b"",
    )
    .await;
    assert_eq!(nobody.status.code(), Some(69), "{nobody:?}");
}

/// A `--token-file` that cannot be read is named in the error (66), and an empty one refused
/// (65): neither request goes out without a token to come back "authentication required".
#[tokio::test]
async fn a_token_file_that_cannot_be_read_is_named() {
    let env = TestEnv::start().await;
    let _service = env.service(&[]).await;
    let url = env.nats.url();
    let missing = env.dir.path().join("no-such-token");
    let empty = env.dir.path().join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    for (file, code) in [(&missing, 66), (&empty, 65)] {
        let file = file.display().to_string();
        let output = ringvault(
            &[
                "encrypt",
                "--url",
                &url,
                "--token-file",
                &file,
                "-k",
                "ws_1",
                "hello",
            ],
            b"",
        )
        .await;
        assert_eq!(output.status.code(), Some(code), "{output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(&file), "{stderr}");
    }
}
