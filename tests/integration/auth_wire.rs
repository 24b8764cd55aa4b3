//! Authorization wired into the request path, over the real NATS path: per-workspace rate
//! limits with `Retry-After`, workspace isolation and `X-Tenant-ID`, and audit records on
//! `vault.v1.audit`.

use crate::common;

use std::time::Duration;

use common::service::{audit_records, TestEnv};
use futures::StreamExt as _;
use ringvault::auth::{Claims, SignedTokens};
use ringvault::client::{request_headers, Client, RawReply};
use ringvault::protocol::{encode, EncryptRequest, Format, Method};
use ringvault::Kind;

const SECRET: &str = "auth-wire-signing-secret-0123456789abcdef";

fn token(subject: &str, workspace: &str, permissions: &[&str]) -> String {
    token_in(subject, Some(workspace), permissions)
}

/// A signed token bound to `workspace`, or to none (every keyring).
fn token_in(subject: &str, workspace: Option<&str>, permissions: &[&str]) -> String {
    let signer = SignedTokens::new(&[SECRET], "ringvault", None, Duration::ZERO, "tenant_id")
        .expect("signer");
    let mut claims = Claims::new(subject, Duration::from_secs(600));
    claims.workspace = workspace.map(str::to_owned);
    claims.permissions = permissions.iter().map(|p| p.to_string()).collect();
    signer.issue(&claims).expect("token")
}

const ALL_BUT_ADMIN: &[&str] = &["encrypt", "decrypt", "reencrypt", "rotate"];

/// Encrypt with exactly these headers: the token, and `X-Tenant-ID` when given.
async fn raw_encrypt(
    client: &Client,
    token: &str,
    tenant: Option<&str>,
    keyring: &str,
    data: &str,
) -> RawReply {
    let mut headers = request_headers(Some(token), Format::Json).unwrap();
    if let Some(tenant) = tenant {
        headers.insert("X-Tenant-ID", tenant);
    }
    let body = encode(
        Format::Json,
        &EncryptRequest {
            keyring: keyring.to_owned(),
            data: data.to_owned(),
        },
    );
    client
        .request_raw(Method::Encrypt, headers, body)
        .await
        .expect("a reply")
}

fn kind<T>(result: ringvault::Result<T>) -> Result<(), Kind> {
    result.map(|_| ()).map_err(|error| error.kind())
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limit_is_per_workspace_with_retry_after() {
    let env = TestEnv::start().await;
    let _service = env
        .service(&[
            ("RINGVAULT_AUTH_SIGNING_SECRETS", SECRET),
            ("RINGVAULT_AUTH_RATE_LIMIT_ENABLED", "true"),
            ("RINGVAULT_AUTH_RATE_LIMIT_REQUESTS_PER_SECOND", "1"),
            ("RINGVAULT_AUTH_RATE_LIMIT_BURST", "3"),
        ])
        .await;
    let watcher = async_nats::connect(env.nats.url()).await.unwrap();
    let mut audit = watcher.subscribe("vault.v1.audit").await.unwrap();
    watcher.flush().await.unwrap();
    let client = env.client(Format::Json).await;
    let ws_a = token("svc-a", "ws_a", &["encrypt"]);
    let ws_b = token("svc-b", "ws_b", &["encrypt"]);

    let mut limited = 0;
    for _ in 0..6 {
        let reply = raw_encrypt(&client, &ws_a, None, "ws_a/app", "hello").await;
        let Some(error) = reply.error() else {
            continue;
        };
        assert_eq!(error.kind(), Kind::RateLimited, "{error}");
        assert!(error.message().contains("ws_a"), "{error}");
        let retry: u64 = reply
            .headers
            .get("Retry-After")
            .expect("Retry-After header")
            .as_str()
            .parse()
            .expect("whole seconds");
        assert!((1..=2).contains(&retry), "{retry}");
        limited += 1;
    }
    assert!(
        limited >= 2,
        "6 quick requests against a burst of 3: {limited} limited"
    );
    // Each of the six left a record, the limited ones with their keyring and error code.
    let records = audit_records(&mut audit, 6).await;
    let limited_records: Vec<_> = records
        .iter()
        .filter(|record| record["error_code"] == "rate_limited")
        .collect();
    assert_eq!(limited_records.len(), limited, "{records:#?}");
    for record in limited_records {
        assert_eq!(record["keyring"], "ws_a/app", "{record}");
        assert_eq!(record["subject"], "svc-a", "{record}");
    }

    for _ in 0..3 {
        let reply = raw_encrypt(&client, &ws_b, None, "ws_b/app", "hello").await;
        assert!(
            reply.error().is_none(),
            "ws_b is unaffected: {:?}",
            reply.error()
        );
    }

    // Acting for workspaces below its own does not give a principal a fresh burst each.
    let ws_c = token("svc-c", "ws_c", &["admin"]);
    let mut limited = 0;
    for below in 0..6 {
        let tenant = format!("ws_c/{below}");
        let reply = raw_encrypt(
            &client,
            &ws_c,
            Some(&tenant),
            &format!("{tenant}/app"),
            "hi",
        )
        .await;
        if let Some(error) = reply.error() {
            assert_eq!(error.kind(), Kind::RateLimited, "{error}");
            assert!(error.message().contains("\"ws_c\""), "{error}");
            limited += 1;
        }
    }
    assert!(
        limited >= 2,
        "6 quick requests for 6 workspaces below ws_c, against ws_c's burst of 3: {limited} limited"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn workspace_isolation_and_tenant_header() {
    let env = TestEnv::start().await;
    let _service = env
        .service(&[("RINGVAULT_AUTH_SIGNING_SECRETS", SECRET)])
        .await;
    let client = env.client(Format::Json).await;
    let ws_a = client.with_token(Some(token("svc-a", "ws_a", ALL_BUT_ADMIN)));
    let ws_b = client.with_token(Some(token("svc-b", "ws_b", ALL_BUT_ADMIN)));

    // A valid ciphertext of ws_b, which ws_a holds but may not use.
    let sealed = ws_b.encrypt("ws_b/app", "secret of b").await.unwrap();
    assert_eq!(
        ws_b.decrypt("ws_b/app", &sealed.encrypted)
            .await
            .unwrap()
            .plaintext,
        "secret of b"
    );
    let denied = Err(Kind::AccessDenied);
    assert_eq!(kind(ws_a.encrypt("ws_b/app", "x").await), denied);
    assert_eq!(
        kind(ws_a.decrypt("ws_b/app", &sealed.encrypted).await),
        denied
    );
    assert_eq!(
        kind(ws_a.reencrypt("ws_b/app", &sealed.encrypted).await),
        denied
    );
    assert_eq!(kind(ws_a.rotate("ws_b/app").await), denied);
    // Naming its own keyring does not help: the envelope's key is not in ws_a.
    assert!(ws_a.decrypt("ws_a/app", &sealed.encrypted).await.is_err());
    assert_eq!(kind(ws_a.encrypt("ws_a/app", "x").await), Ok(()));

    // An admin bound to a workspace stays in it: X-Tenant-ID cannot take it to another one
    // (nor, with a pattern grant, to one whose name merely starts like its own).
    let bound_admin = token("operator", "ops", &["admin"]);
    for tenant in [None, Some("ws_b")] {
        let reply = raw_encrypt(&client, &bound_admin, tenant, "ws_b/app", "x").await;
        assert_eq!(reply.error().map(|e| e.kind()), Some(Kind::AccessDenied));
    }
    let prefix_admin = token("operator", "ws_1", &["admin:ws_1*"]);
    let reply = raw_encrypt(&client, &prefix_admin, Some("ws_10"), "ws_10/app", "x").await;
    assert_eq!(reply.error().map(|e| e.kind()), Some(Kind::AccessDenied));
    // An admin bound to no workspace acts for ws_b with X-Tenant-ID.
    let admin = token_in("operator", None, &["admin"]);
    let reply = raw_encrypt(&client, &admin, Some("ws_b"), "ws_b/app", "x").await;
    assert!(reply.error().is_none(), "{:?}", reply.error());
    // Acting for ws_b, it is bound to ws_b.
    let reply = raw_encrypt(&client, &admin, Some("ws_b"), "ops/app", "x").await;
    assert_eq!(reply.error().map(|e| e.kind()), Some(Kind::AccessDenied));

    // Without admin, X-Tenant-ID for another workspace is refused, even on its own keyring;
    // naming its own workspace is harmless.
    let non_admin = token("svc-a", "ws_a", ALL_BUT_ADMIN);
    let reply = raw_encrypt(&client, &non_admin, Some("ws_b"), "ws_b/app", "x").await;
    assert_eq!(reply.error().map(|e| e.kind()), Some(Kind::AccessDenied));
    let reply = raw_encrypt(&client, &non_admin, Some("ws_b"), "ws_a/app", "x").await;
    assert_eq!(reply.error().map(|e| e.kind()), Some(Kind::AccessDenied));
    let reply = raw_encrypt(&client, &non_admin, Some("ws_a"), "ws_a/app", "x").await;
    assert!(reply.error().is_none(), "{:?}", reply.error());

    // An X-Tenant-ID that is no workspace name is the caller's mistake, not a refusal.
    for invalid in ["ws_*", "ws_b/", "../ws_b"] {
        let reply = raw_encrypt(&client, &admin, Some(invalid), "ws_b/app", "x").await;
        let error = reply.error().expect("refused");
        assert_eq!(error.kind(), Kind::InvalidArgument, "{invalid}: {error}");
        assert!(error.message().contains("X-Tenant-ID"), "{error}");
    }
}

/// An admin acting for a workspace is limited by that workspace's policies, as the
/// workspace's own principals are.
#[tokio::test(flavor = "multi_thread")]
async fn acting_for_a_workspace_applies_its_policies() {
    let env = TestEnv::start().await;
    let mut config = env.config(&[("RINGVAULT_AUTH_SIGNING_SECRETS", SECRET)]);
    config.auth.policies = vec![ringvault::config::PolicyConfig {
        subject: String::new(),
        workspace: "ws_capped".into(),
        permissions: vec!["decrypt".into(), "encrypt:ws_capped/open/*".into()],
    }];
    let _service = common::service::start_server(&config).await;
    let client = env.client(Format::Json).await;
    let admin = token_in("operator", None, &["admin"]);

    let capped = raw_encrypt(&client, &admin, Some("ws_capped"), "ws_capped/app", "x").await;
    assert_eq!(capped.error().map(|e| e.kind()), Some(Kind::AccessDenied));
    let open = raw_encrypt(&client, &admin, Some("ws_capped"), "ws_capped/open/a", "x").await;
    assert!(open.error().is_none(), "{:?}", open.error());
    // Another workspace, with no policy of its own, is not capped.
    let other = raw_encrypt(&client, &admin, Some("ws_free"), "ws_free/app", "x").await;
    assert!(other.error().is_none(), "{:?}", other.error());
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_records_on_nats() {
    let env = TestEnv::start().await;
    let _service = env
        .service(&[("RINGVAULT_AUTH_SIGNING_SECRETS", SECRET)])
        .await;
    let watcher = async_nats::connect(env.nats.url()).await.unwrap();
    let mut audit = watcher.subscribe("vault.v1.audit").await.unwrap();
    watcher.flush().await.unwrap();

    let client = env.client(Format::Json).await;
    let ws_a_token = token("svc-a", "ws_a", ALL_BUT_ADMIN);
    let ws_a = client.with_token(Some(ws_a_token.clone()));
    let admin_token = token_in("operator", None, &["admin"]);
    const PLAINTEXT: &str = "the-plaintext-that-must-not-leak";

    // Not audited: liveness, and a failed authentication.
    client.liveness().await.unwrap();
    let forged = client.with_token(Some("not-a-valid-token".to_owned()));
    assert_eq!(
        kind(forged.encrypt("ws_a/app", PLAINTEXT).await),
        Err(Kind::InvalidToken)
    );
    // Audited: encrypt, decrypt, a denied encrypt, and an admin acting for ws_b.
    let sealed = ws_a.encrypt("ws_a/app", PLAINTEXT).await.unwrap();
    ws_a.decrypt("ws_a/app", &sealed.encrypted).await.unwrap();
    assert_eq!(
        kind(ws_a.encrypt("ws_b/app", PLAINTEXT).await),
        Err(Kind::AccessDenied)
    );
    let reply = raw_encrypt(&client, &admin_token, Some("ws_b"), "ws_b/app", PLAINTEXT).await;
    assert!(reply.error().is_none(), "{:?}", reply.error());
    // Refused before its body is decoded: its record still names the keyring.
    let reply = raw_encrypt(&client, &ws_a_token, Some("ws_b"), "ws_b/app", PLAINTEXT).await;
    assert_eq!(
        reply.error().map(|error| error.kind()),
        Some(Kind::AccessDenied)
    );
    // In protobuf, whose Encrypt and Decrypt bodies are read in place.
    let protobuf = env
        .client(Format::Protobuf)
        .await
        .with_token(Some(ws_a_token.clone()));
    let sealed_pb = protobuf.encrypt("ws_a/pb", PLAINTEXT).await.unwrap();
    protobuf
        .decrypt("ws_a/pb", &sealed_pb.encrypted)
        .await
        .unwrap();

    // The seven expected records (within a generous bound), then a short wait for any extra.
    let mut records = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let wait = if records.len() < 7 {
            deadline.saturating_duration_since(tokio::time::Instant::now())
        } else {
            Duration::from_millis(300)
        };
        let Ok(Some(message)) = tokio::time::timeout(wait, audit.next()).await else {
            break;
        };
        // A message carries one or more records, one per line.
        let lines = String::from_utf8(message.payload.to_vec()).unwrap();
        records.extend(lines.lines().map(str::to_owned));
    }
    assert_eq!(records.len(), 7, "{records:#?}");
    for raw in &records {
        for secret in [
            PLAINTEXT,
            &sealed.encrypted,
            &sealed_pb.encrypted,
            &ws_a_token,
            &admin_token,
        ] {
            assert!(!raw.contains(secret), "audit leaks a secret: {raw}");
        }
        assert!(!raw.contains("not-a-valid-token"), "{raw}");
    }
    let json: Vec<serde_json::Value> = records
        .iter()
        .map(|raw| serde_json::from_str(raw).unwrap())
        .collect();

    let encrypt = &json[0];
    assert_eq!(encrypt["subject"], "svc-a");
    assert_eq!(encrypt["workspace"], "ws_a");
    assert_eq!(encrypt["credential_source"], "signed_token");
    assert_eq!(encrypt["action"], "encrypt");
    assert_eq!(encrypt["keyring"], "ws_a/app");
    assert_eq!(encrypt["key_id"], sealed.key_id.as_str());
    assert_eq!(encrypt["item_count"], 1);
    assert_eq!(encrypt["outcome"], "ok");
    assert!(encrypt.get("error_code").is_none());
    assert!(!encrypt["request_id"].as_str().unwrap().is_empty());

    let decrypt = &json[1];
    assert_eq!(decrypt["action"], "decrypt");
    assert_eq!(decrypt["key_id"], sealed.key_id.as_str());
    assert_eq!(decrypt["outcome"], "ok");

    let denied = &json[2];
    assert_eq!(denied["action"], "encrypt");
    assert_eq!(denied["keyring"], "ws_b/app");
    assert_eq!(denied["outcome"], "error");
    assert_eq!(denied["error_code"], "access_denied");
    assert!(denied.get("key_id").is_none());

    let acting = &json[3];
    assert_eq!(acting["subject"], "operator");
    // Its own binding (none), and the workspace it acted for.
    assert!(acting.get("workspace").is_none(), "{acting}");
    assert_eq!(acting["acting_for"], "ws_b");
    assert_eq!(acting["keyring"], "ws_b/app");
    assert_eq!(acting["outcome"], "ok");

    let refused_tenant = &json[4];
    assert_eq!(refused_tenant["subject"], "svc-a");
    assert_eq!(refused_tenant["acting_for"], "ws_b");
    assert_eq!(refused_tenant["keyring"], "ws_b/app");
    assert_eq!(refused_tenant["error_code"], "access_denied");

    for (record, action) in [(&json[5], "encrypt"), (&json[6], "decrypt")] {
        assert_eq!(record["action"], action, "{record}");
        assert_eq!(record["keyring"], "ws_a/pb", "{record}");
        assert_eq!(record["key_id"], sealed_pb.key_id.as_str(), "{record}");
        assert_eq!(record["item_count"], 1, "{record}");
        assert_eq!(record["outcome"], "ok", "{record}");
    }
}

/// A burst's audit records are published in as many messages as the nats-server's
/// `max_payload` needs: one message over it would be refused, and every record in it lost.
#[tokio::test(flavor = "multi_thread")]
async fn audit_batches_larger_than_max_payload_are_split() {
    const MAX_PAYLOAD: usize = 8 * 1024;
    const REQUESTS: usize = 256;
    let env = TestEnv::start_with_max_payload(MAX_PAYLOAD).await;
    let _service = env.service(&[]).await;
    let watcher = async_nats::connect(env.nats.url()).await.unwrap();
    let mut audit = watcher.subscribe("vault.v1.audit").await.unwrap();
    watcher.flush().await.unwrap();

    // A long keyring name makes each record ~500 bytes: a burst's records are many times the
    // limit together.
    let keyring = format!("ws_1/{}", "k".repeat(200));
    let client = env.client(Format::Protobuf).await;
    client.encrypt(&keyring, "warm-up").await.unwrap();
    let burst = futures::future::join_all((0..REQUESTS).map(|_| client.encrypt(&keyring, "x")));
    for outcome in burst.await {
        outcome.unwrap();
    }

    let mut records = 0;
    let mut messages = 0;
    while records < REQUESTS + 1 {
        let message = tokio::time::timeout(Duration::from_secs(10), audit.next())
            .await
            .unwrap_or_else(|_| panic!("{} audit records within 10 s, got {records}", REQUESTS + 1))
            .unwrap();
        assert!(
            message.payload.len() <= MAX_PAYLOAD,
            "{}",
            message.payload.len()
        );
        messages += 1;
        records += std::str::from_utf8(&message.payload)
            .unwrap()
            .lines()
            .count();
    }
    assert_eq!(records, REQUESTS + 1);
    assert!(messages > 1, "{messages}");
}
