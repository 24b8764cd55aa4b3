//! Signed tokens (HS256) and static tokens over the real NATS path: each failure mode, secret
//! rotation, policies, and revocation through the same library call as `ringvault token
//! revoke`, refused within a second and after a restart.

use crate::common;

use std::time::Duration;

use base64::Engine as _;
use common::service::{client, eventually, start_server, TestEnv};
use ringvault::auth::{Claims, SignedTokens};
use ringvault::client::Client;
use ringvault::config::Config;
use ringvault::protocol::Format;
use ringvault::Kind;

const OLD: &str = "old-signing-secret-0123456789abcdef";
const NEW: &str = "new-signing-secret-0123456789abcdef";
const OTHER: &str = "someone-elses-secret-0123456789abcdef";

fn signer(secret: &str, issuer: &str) -> SignedTokens {
    SignedTokens::new(&[secret], issuer, None, Duration::ZERO, "tenant_id").unwrap()
}

fn claims(workspace: &str, permissions: &[&str]) -> Claims {
    let mut claims = Claims::new("svc-a", Duration::from_secs(600));
    claims.workspace = Some(workspace.to_owned());
    claims.permissions = permissions.iter().map(|p| p.to_string()).collect();
    claims.aud = vec!["vault".to_owned()];
    claims
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn b64(json: &serde_json::Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json.to_string())
}

async fn kind_of(client: &Client, token: &str, keyring: &str) -> Result<(), Kind> {
    client
        .with_token(Some(token.to_owned()))
        .encrypt(keyring, "hello")
        .await
        .map(|_| ())
        .map_err(|error| error.kind())
}

fn signed_env() -> Vec<(&'static str, String)> {
    vec![
        ("RINGVAULT_AUTH_SIGNING_SECRETS", format!("{NEW},{OLD}")),
        ("RINGVAULT_AUTH_AUDIENCE", "vault".to_owned()),
        ("RINGVAULT_AUTH_LEEWAY_SECS", "2".to_owned()),
    ]
}

fn pairs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn signed_tokens_each_failure_mode_on_the_wire() {
    let env = TestEnv::start().await;
    let settings = signed_env();
    let service = env.service(&pairs(&settings)).await;
    let client = env.client(Format::Json).await;
    let new = signer(NEW, "ringvault");

    let valid = new.issue(&claims("ws_1", &["encrypt"])).unwrap();
    assert_eq!(kind_of(&client, &valid, "ws_1/app").await, Ok(()));
    assert_eq!(
        kind_of(&client, &valid, "ws_2/app").await,
        Err(Kind::AccessDenied),
        "another workspace"
    );
    let decrypt_only = new.issue(&claims("ws_1", &["decrypt"])).unwrap();
    assert_eq!(
        kind_of(&client, &decrypt_only, "ws_1/app").await,
        Err(Kind::AccessDenied)
    );

    let mut expired = claims("ws_1", &["encrypt"]);
    expired.exp = now() - 60;
    let expired = new.issue(&expired).unwrap();
    assert_eq!(
        kind_of(&client, &expired, "ws_1/app").await,
        Err(Kind::TokenExpired)
    );
    let error = client
        .with_token(Some(expired.clone()))
        .encrypt("ws_1/app", "x")
        .await
        .unwrap_err();
    assert!(error.message().contains("token expired at"), "{error}");
    assert!(!error.message().contains(&expired));

    let mut early = claims("ws_1", &["encrypt"]);
    early.nbf = Some(now() + 300);
    let early = new.issue(&early).unwrap();
    assert_eq!(
        kind_of(&client, &early, "ws_1/app").await,
        Err(Kind::InvalidToken)
    );

    // Validly signed, valid only after the year 9999 (or at the end of u64): RFC 3339 has no
    // such year, and writing the error must not panic the auth actor.
    for nbf in [253_402_300_800, u64::MAX] {
        let mut far = claims("ws_1", &["encrypt"]);
        far.nbf = Some(nbf);
        let far = new.issue(&far).unwrap();
        let error = client
            .with_token(Some(far))
            .encrypt("ws_1/app", "x")
            .await
            .unwrap_err();
        assert_eq!(error.kind(), Kind::InvalidToken, "{error}");
        assert!(error.message().contains(&nbf.to_string()), "{error}");
    }
    assert_eq!(kind_of(&client, &valid, "ws_1/app").await, Ok(()));

    let mut wrong_audience = claims("ws_1", &["encrypt"]);
    wrong_audience.aud = vec!["another-service".into()];
    let wrong_audience = new.issue(&wrong_audience).unwrap();
    assert_eq!(
        kind_of(&client, &wrong_audience, "ws_1/app").await,
        Err(Kind::InvalidToken)
    );

    let wrong_issuer = signer(NEW, "not-ringvault")
        .issue(&claims("ws_1", &["encrypt"]))
        .unwrap();
    assert_eq!(
        kind_of(&client, &wrong_issuer, "ws_1/app").await,
        Err(Kind::InvalidToken)
    );

    let bad_signature = signer(OTHER, "ringvault")
        .issue(&claims("ws_1", &["encrypt"]))
        .unwrap();
    assert_eq!(
        kind_of(&client, &bad_signature, "ws_1/app").await,
        Err(Kind::InvalidToken)
    );

    let payload = b64(&claims("ws_1", &["admin"]).to_json("tenant_id"));
    let alg_none = format!("{}.{payload}.", b64(&serde_json::json!({"alg": "none"})));
    assert_eq!(
        kind_of(&client, &alg_none, "ws_1/app").await,
        Err(Kind::InvalidToken)
    );

    // HS256 "signed" with a public key as the secret: HS256 only ever checks signing_secrets.
    let public_pem = std::fs::read("tests/data/jwt_rsa_public.pem").unwrap();
    let confused = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims("ws_1", &["admin"]).to_json("tenant_id"),
        &jsonwebtoken::EncodingKey::from_secret(&public_pem),
    )
    .unwrap();
    assert_eq!(
        kind_of(&client, &confused, "ws_1/app").await,
        Err(Kind::InvalidToken)
    );

    // No credential at all, and an unknown opaque one.
    let error = client
        .with_token(None)
        .encrypt("ws_1/app", "x")
        .await
        .unwrap_err();
    assert_eq!(error.kind(), Kind::AuthenticationRequired);
    assert_eq!(
        kind_of(&client, "not-a-token", "ws_1/app").await,
        Err(Kind::InvalidToken)
    );
    service.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn secret_rotation_overlap_then_drop() {
    let env = TestEnv::start().await;
    let old_token = signer(OLD, "ringvault")
        .issue(&claims("ws_1", &["encrypt"]))
        .unwrap();
    let new_token = signer(NEW, "ringvault")
        .issue(&claims("ws_1", &["encrypt"]))
        .unwrap();
    let client = env.client(Format::Json).await;

    // Before: only the old secret.
    let service = env
        .service(&[
            ("RINGVAULT_AUTH_SIGNING_SECRETS", OLD),
            ("RINGVAULT_AUTH_AUDIENCE", "vault"),
        ])
        .await;
    assert_eq!(kind_of(&client, &old_token, "ws_1/a").await, Ok(()));
    assert_eq!(
        kind_of(&client, &new_token, "ws_1/a").await,
        Err(Kind::InvalidToken)
    );
    service.shutdown().await.unwrap();

    // Overlap: the new one signs, both verify.
    let settings = signed_env();
    let service = env.service(&pairs(&settings)).await;
    assert_eq!(kind_of(&client, &old_token, "ws_1/a").await, Ok(()));
    assert_eq!(kind_of(&client, &new_token, "ws_1/a").await, Ok(()));
    service.shutdown().await.unwrap();

    // After: the old one is dropped.
    let service = env
        .service(&[
            ("RINGVAULT_AUTH_SIGNING_SECRETS", NEW),
            ("RINGVAULT_AUTH_AUDIENCE", "vault"),
        ])
        .await;
    assert_eq!(kind_of(&client, &new_token, "ws_1/a").await, Ok(()));
    assert_eq!(
        kind_of(&client, &old_token, "ws_1/a").await,
        Err(Kind::InvalidToken)
    );
    service.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn revocation_reaches_every_replica_within_a_second_and_survives_restarts() {
    let env = TestEnv::start().await;
    let settings = signed_env();
    let replica_a = env.service(&pairs(&settings)).await;
    let replica_b = env.service(&pairs(&settings)).await;
    let client = env.client(Format::Json).await;
    let new = signer(NEW, "ringvault");
    let by_token = new.issue(&claims("ws_1", &["encrypt"])).unwrap();
    let by_jti_claims = claims("ws_1", &["encrypt"]);
    let by_jti = new.issue(&by_jti_claims).unwrap();
    let untouched = new.issue(&claims("ws_1", &["encrypt"])).unwrap();
    // Warm both replicas' caches (the queue group spreads requests).
    for _ in 0..6 {
        assert_eq!(kind_of(&client, &by_token, "ws_1/a").await, Ok(()));
        assert_eq!(kind_of(&client, &by_jti, "ws_1/a").await, Ok(()));
    }

    let config = env.config(&pairs(&settings));
    let storage = ringvault::server::open_backend(&config).await.unwrap();
    let nats = async_nats::connect(env.nats.url()).await.unwrap();
    let revoked = ringvault::auth::revoke(&*storage, &nats, &config.nats.prefix, &by_token)
        .await
        .unwrap();
    assert!(!revoked.is_empty());
    let jti = by_jti_claims.jti.clone().unwrap();
    ringvault::auth::revoke(&*storage, &nats, &config.nats.prefix, &jti)
        .await
        .unwrap();
    // Soon (within a second on an idle machine; the bound here only keeps the test finite),
    // every request with either token is refused, whichever replica answers.
    assert!(
        eventually(Duration::from_secs(10), || async {
            let mut all = true;
            for _ in 0..4 {
                all &= kind_of(&client, &by_token, "ws_1/a").await == Err(Kind::InvalidToken);
                all &= kind_of(&client, &by_jti, "ws_1/a").await == Err(Kind::InvalidToken);
            }
            all
        })
        .await,
        "revocation not effective within 10 s"
    );
    for _ in 0..6 {
        assert_eq!(
            kind_of(&client, &by_token, "ws_1/a").await,
            Err(Kind::InvalidToken)
        );
    }
    let error = client
        .with_token(Some(by_token.clone()))
        .encrypt("ws_1/a", "x")
        .await
        .unwrap_err();
    assert!(error.message().contains("revoked"), "{error}");
    assert_eq!(kind_of(&client, &untouched, "ws_1/a").await, Ok(()));
    // Nothing in the store holds the token or the jti.
    for path in common::service::files_under(&env.store_path()) {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            !text.contains(&by_token) && !text.contains(&jti),
            "{path:?}"
        );
    }
    replica_a.shutdown().await.unwrap();
    replica_b.shutdown().await.unwrap();

    // After a restart the store says so.
    let restarted = env.service(&pairs(&settings)).await;
    assert_eq!(
        kind_of(&client, &by_token, "ws_1/a").await,
        Err(Kind::InvalidToken)
    );
    assert_eq!(
        kind_of(&client, &by_jti, "ws_1/a").await,
        Err(Kind::InvalidToken)
    );
    assert_eq!(kind_of(&client, &untouched, "ws_1/a").await, Ok(()));
    restarted.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn cached_tokens_expire() {
    let env = TestEnv::start().await;
    let service = env
        .service(&[
            ("RINGVAULT_AUTH_SIGNING_SECRETS", NEW),
            ("RINGVAULT_AUTH_LEEWAY_SECS", "0"),
        ])
        .await;
    let client = env.client(Format::Json).await;
    let mut short = Claims::new("svc", Duration::from_secs(2));
    short.permissions = vec!["encrypt".into()];
    let token = signer(NEW, "ringvault").issue(&short).unwrap();
    assert_eq!(kind_of(&client, &token, "ws_1/a").await, Ok(()));
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_eq!(
        kind_of(&client, &token, "ws_1/a").await,
        Err(Kind::TokenExpired)
    );
    service.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn static_tokens_and_policies_from_a_config_file() {
    let env = TestEnv::start().await;
    let hashed = "static-token-known-by-its-digest";
    let digest = hex::encode(ringvault::auth::token_digest(hashed));
    let toml = format!(
        r#"
[auth]
signing_secrets = ["{NEW}"]

[[auth.tokens]]
sha256 = "{digest}"
subject = "billing"
workspace = "ws_b"
permissions = ["encrypt", "decrypt"]

[[auth.tokens]]
token = "static-wide-token"
subject = "ops"
permissions = ["admin"]

[[auth.policies]]
subject = "ops"
permissions = ["encrypt:ws_ops/*"]

[[auth.policies]]
workspace = "ws_p"
permissions = ["decrypt", "encrypt:ws_p/public/*"]
"#
    );
    let env_pairs: Vec<(String, String)> = vec![
        ("RINGVAULT_NATS_URL".into(), env.nats.url()),
        (
            "RINGVAULT_MASTER_KEY_CURRENT".into(),
            env.master_key.clone(),
        ),
        (
            "RINGVAULT_MASTER_KEY_GENERATE_IF_MISSING".into(),
            "false".into(),
        ),
        ("RINGVAULT_AUTH_TOKEN_FILE".into(), String::new()),
        (
            "RINGVAULT_STORAGE_PATH".into(),
            env.store_path().display().to_string(),
        ),
    ];
    let config = Config::from_sources(Some(&toml), env_pairs).unwrap();
    let service = start_server(&config).await;
    let client = client(&env.nats.url(), None, Format::Json).await;

    assert_eq!(kind_of(&client, hashed, "ws_b/x").await, Ok(()));
    assert_eq!(
        kind_of(&client, hashed, "ws_c/x").await,
        Err(Kind::AccessDenied)
    );
    // admin ∩ encrypt:ws_ops/* = encrypt:ws_ops/*
    assert_eq!(
        kind_of(&client, "static-wide-token", "ws_ops/x").await,
        Ok(())
    );
    assert_eq!(
        kind_of(&client, "static-wide-token", "ws_other/x").await,
        Err(Kind::AccessDenied)
    );
    let rotate = client
        .with_token(Some("static-wide-token".into()))
        .rotate("ws_ops/x")
        .await
        .unwrap_err();
    assert_eq!(rotate.kind(), Kind::AccessDenied);

    // A signed token of ws_p holding admin is narrowed by the workspace policy.
    let token = signer(NEW, "ringvault")
        .issue(&{
            let mut claims = Claims::new("app", Duration::from_secs(600));
            claims.workspace = Some("ws_p".into());
            claims.scope = Some("admin".into());
            claims
        })
        .unwrap();
    assert_eq!(kind_of(&client, &token, "ws_p/public/a").await, Ok(()));
    assert_eq!(
        kind_of(&client, &token, "ws_p/private").await,
        Err(Kind::AccessDenied)
    );

    // A static token revoked by value.
    let storage = ringvault::server::open_backend(&config).await.unwrap();
    let nats = async_nats::connect(env.nats.url()).await.unwrap();
    ringvault::auth::revoke(&*storage, &nats, &config.nats.prefix, hashed)
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            kind_of(&client, hashed, "ws_b/x").await == Err(Kind::InvalidToken)
        })
        .await
    );
    service.shutdown().await.unwrap();
}

#[test]
fn short_signing_secrets_refuse_to_start() {
    let error = Config::from_sources(
        None,
        [(
            "RINGVAULT_AUTH_SIGNING_SECRETS".to_owned(),
            "too-short".to_owned(),
        )],
    )
    .unwrap_err();
    assert!(error.to_string().contains("at least 32"), "{error}");
}

/// `ringvault token issue --workspace ""` (an unset variable in a script) is refused rather
/// than minting a token for every keyring, and so is a workspace no keyring could have, which
/// the service would refuse at every request.
#[test]
fn token_issue_refuses_an_empty_or_invalid_workspace() {
    let issue = |workspace: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ringvault"))
            .args([
                "token",
                "issue",
                "--subject",
                "svc",
                "--workspace",
                workspace,
            ])
            .args(["--permissions", "encrypt", "--ttl", "1h"])
            .env("RINGVAULT_AUTH_SIGNING_SECRETS", NEW)
            .env_remove("RINGVAULT_CONFIG")
            .output()
            .unwrap()
    };
    for refused in ["", " ", "ws 1", "ws_*", "ws_1/", "/ws_1", "ws_1//a"] {
        let output = issue(refused);
        assert_eq!(output.status.code(), Some(64), "{refused:?}: {output:?}");
        assert!(String::from_utf8_lossy(&output.stderr).contains("--workspace"));
    }
    let output = issue("ws_1");
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).matches('.').count(),
        2
    );
}

/// Expiries far in the future are refused when issuing and shown, not panicked on, when
/// inspecting a token minted elsewhere.
#[test]
fn token_expiries_past_the_clock_s_range_are_refused_or_shown() {
    let dir = tempfile::tempdir().unwrap();
    let ringvault = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ringvault"))
            .args(args)
            .current_dir(dir.path())
            .env("RINGVAULT_STORAGE_PATH", dir.path())
            .env("RINGVAULT_AUTH_SIGNING_SECRETS", NEW)
            .env_remove("RINGVAULT_CONFIG")
            .output()
            .unwrap()
    };
    let issue = |ttl: &str| {
        ringvault(&[
            "token",
            "issue",
            "--subject",
            "svc",
            "--workspace",
            "ws_1",
            "--permissions",
            "encrypt",
            "--ttl",
            ttl,
        ])
    };
    let output = issue("10000y");
    assert_eq!(output.status.code(), Some(64), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("--ttl"));
    assert!(output.stdout.is_empty(), "no token is printed: {output:?}");
    assert!(issue("10y").status.success());

    let mut claims = claims("ws_1", &["encrypt"]);
    claims.exp = u64::MAX / 2;
    let far = signer(NEW, "ringvault").issue(&claims).unwrap();
    let output = ringvault(&["token", "inspect", &far]);
    assert!(output.status.success(), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("s after the unix epoch"),
        "{output:?}"
    );
}

/// `token inspect` answers as the service would: a revoked token is refused (exit 77) even
/// though its signature and claims are good.
#[tokio::test]
async fn token_inspect_refuses_a_revoked_token() {
    let env = TestEnv::start().await;
    let config = env.config(&[("RINGVAULT_AUTH_SIGNING_SECRETS", NEW)]);
    let storage = ringvault::server::open_backend(&config).await.unwrap();
    let nats = async_nats::connect(env.nats.url()).await.unwrap();
    let tokens = signer(NEW, "ringvault");
    let revoked = tokens.issue(&claims("ws_1", &["encrypt"])).unwrap();
    let kept = tokens.issue(&claims("ws_1", &["encrypt"])).unwrap();
    ringvault::auth::revoke(&*storage, &nats, &config.nats.prefix, &revoked)
        .await
        .unwrap();
    let inspect = |token: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ringvault"))
            .args(["token", "inspect", token])
            .env_remove("RINGVAULT_CONFIG")
            .env("RINGVAULT_AUTH_SIGNING_SECRETS", NEW)
            .env("RINGVAULT_STORAGE_PATH", env.store_path())
            .output()
            .unwrap()
    };
    let output = inspect(&revoked);
    assert_eq!(output.status.code(), Some(77), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("revoked"),
        "{output:?}"
    );
    let output = inspect(&kept);
    assert!(output.status.success(), "{output:?}");
    // `-`: the token from standard input, kept out of the command line.
    let mut from_stdin = std::process::Command::new(env!("CARGO_BIN_EXE_ringvault"))
        .args(["token", "inspect", "-"])
        .env_remove("RINGVAULT_CONFIG")
        .env("RINGVAULT_AUTH_SIGNING_SECRETS", NEW)
        .env("RINGVAULT_STORAGE_PATH", env.store_path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = from_stdin.stdin.take().unwrap();
        writeln!(stdin, "{revoked}").unwrap();
    }
    let output = from_stdin.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(77), "{output:?}");

    // Where there is no store, nothing says the token is not revoked.
    let elsewhere = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ringvault"))
        .args(["token", "inspect", &kept])
        .current_dir(elsewhere.path())
        .env_remove("RINGVAULT_CONFIG")
        .env("RINGVAULT_AUTH_SIGNING_SECRETS", NEW)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(69), "{output:?}");
    assert!(
        !elsewhere.path().join("data").exists(),
        "inspect created a store"
    );
}

/// `token revoke` writes the store first: with NATS unreachable the revocation is still
/// recorded (replicas read it within a minute) and the command says so with exit 69; pointed
/// at a file store that is not there it refuses, rather than revoking into a store no service
/// reads.
#[test]
fn token_revoke_stores_first_and_refuses_a_missing_store() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("store")).unwrap();
    let revoke = |cwd: &std::path::Path, store: Option<&std::path::Path>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ringvault"));
        command
            .args(["token", "revoke", "some-static-token"])
            .current_dir(cwd)
            .env_remove("RINGVAULT_CONFIG")
            .env("RINGVAULT_NATS_URL", "nats://127.0.0.1:1");
        if let Some(store) = store {
            command.env("RINGVAULT_STORAGE_PATH", store);
        }
        command.output().unwrap()
    };
    let output = revoke(dir.path(), Some(&dir.path().join("store")));
    assert_eq!(output.status.code(), Some(69), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("stored, but not announced"),
        "{output:?}"
    );
    let stored = std::fs::read_dir(dir.path().join("store/revocations"))
        .unwrap()
        .count();
    assert_eq!(stored, 2, "the token and the jti it may be");

    let elsewhere = tempfile::tempdir().unwrap();
    let output = revoke(elsewhere.path(), None);
    assert_eq!(output.status.code(), Some(69), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no store at"),
        "{output:?}"
    );
    assert!(
        !elsewhere.path().join("data").exists(),
        "revoke created a store"
    );
}
