//! Faults on a running service: a failing keyring actor, a failing storage actor, supervision
//! giving up, and bad input over the wire (each with its code, the service answering the next
//! valid request after each one).

use crate::common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::service::{audit_records, eventually, files_under, TestEnv, TOKEN};
use futures::StreamExt as _;
use rand::{Rng as _, SeedableRng as _};
use ringvault::client::{request_headers, Client, RawReply};
use ringvault::protocol::{
    self, decode_envelope, encode_envelope, DecryptBulkRequest, DecryptRequest,
    DescribeKeyringRequest, EncryptBulkRequest, EncryptRequest, Format, Method, ReEncryptRequest,
    RotateKeyringRequest,
};
use ringvault::server::ServerError;
use ringvault::storage::validate_keyring;
use ringvault::Kind;

/// Files stored for `keyring` (its DEK objects and LATEST).
fn keyring_files(env: &TestEnv, keyring: &str) -> Vec<PathBuf> {
    files_under(&env.store_path().join("keyring").join(keyring))
}

/// The file names stored for `keyring`, sorted.
fn keyring_file_names(env: &TestEnv, keyring: &str) -> Vec<String> {
    keyring_files(env, keyring)
        .iter()
        .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// Asserts that `keyring` holds exactly `deks` (by id) plus LATEST.
fn assert_stored(env: &TestEnv, keyring: &str, deks: &[&str]) {
    let mut expected: Vec<String> = deks.iter().map(|id| id.to_string()).collect();
    expected.push("LATEST".to_owned());
    expected.sort();
    assert_eq!(
        keyring_file_names(env, keyring),
        expected,
        "objects of keyring {keyring:?}"
    );
}

/// Retries `attempt` until it succeeds (every failure must be `unavailable`), for up to 20 s.
async fn until_ok<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ringvault::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut refusals = Vec::new();
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(error) => {
                assert_eq!(error.kind(), Kind::Unavailable, "{what}: {error}");
                refusals.push(error.to_string());
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} never succeeded: {refusals:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_failed_keyring_actor_is_respawned_and_loses_no_key() {
    let env = TestEnv::start().await;
    let server = env.service(&[]).await;
    let client = env.client(Format::Protobuf).await;

    let before = client
        .encrypt("ws_k", "made before the fault")
        .await
        .unwrap();
    assert_stored(&env, "ws_k", &[&before.key_id]);

    // RotateKeyring always goes through the actor.
    *server.hooks().faults.fail_keyring_actor.lock().unwrap() = Some("ws_k".to_owned());
    let error = client.rotate("ws_k").await.unwrap_err();
    assert_eq!(error.kind(), Kind::Unavailable, "{error}");
    assert!(
        server
            .hooks()
            .faults
            .fail_keyring_actor
            .lock()
            .unwrap()
            .is_none(),
        "the injected fault was consumed"
    );
    // The failed rotation wrote nothing.
    assert_stored(&env, "ws_k", &[&before.key_id]);

    // The actor is forgotten and respawned on next use. A rotation that is refused while the
    // supervisor has not yet forgotten the dead actor writes nothing either.
    let rotated = until_ok("rotated", || client.rotate("ws_k")).await;
    assert_eq!(rotated.previous_key_id, before.key_id);
    assert_ne!(rotated.key_id, before.key_id);
    // Exactly one DEK object more: nothing lost, nothing duplicated.
    assert_stored(&env, "ws_k", &[&before.key_id, &rotated.key_id]);

    let after = client
        .encrypt("ws_k", "made after the fault")
        .await
        .unwrap();
    assert_eq!(after.key_id, rotated.key_id);
    assert_eq!(
        client
            .decrypt("ws_k", &after.encrypted)
            .await
            .unwrap()
            .plaintext,
        "made after the fault"
    );
    assert_eq!(
        client
            .decrypt("ws_k", &before.encrypted)
            .await
            .unwrap()
            .plaintext,
        "made before the fault"
    );

    // A fault on the very first use of a keyring: nothing is created, and the next use
    // creates exactly one DEK.
    *server.hooks().faults.fail_keyring_actor.lock().unwrap() = Some("ws_k_first".to_owned());
    let error = client.encrypt("ws_k_first", "x").await.unwrap_err();
    assert_eq!(error.kind(), Kind::Unavailable, "{error}");
    assert!(keyring_files(&env, "ws_k_first").is_empty());
    let first = until_ok("first", || client.encrypt("ws_k_first", "first")).await;
    assert_stored(&env, "ws_k_first", &[&first.key_id]);
    assert_eq!(
        client
            .decrypt("ws_k_first", &first.encrypted)
            .await
            .unwrap()
            .plaintext,
        "first"
    );

    // ReEncrypt (reads LATEST through the actor) also survives a fault.
    *server.hooks().faults.fail_keyring_actor.lock().unwrap() = Some("ws_k".to_owned());
    let error = client
        .reencrypt("ws_k", &before.encrypted)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), Kind::Unavailable, "{error}");
    let moved = until_ok("moved", || client.reencrypt("ws_k", &before.encrypted)).await;
    assert_eq!(moved.key_id, rotated.key_id);
    assert_stored(&env, "ws_k", &[&before.key_id, &rotated.key_id]);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_failed_storage_actor_is_restarted_and_the_write_can_be_retried() {
    let env = TestEnv::start().await;
    let server = env.service(&[]).await;
    let client = env.client(Format::Protobuf).await;
    let faults = server.hooks().faults.clone();

    let old = client.encrypt("ws_old", "older keyring").await.unwrap();
    assert_stored(&env, "ws_old", &[&old.key_id]);

    faults.fail_storage_actor.store(1, Ordering::SeqCst);
    let error = client.encrypt("ws_new", "first use").await.unwrap_err();
    assert_eq!(error.kind(), Kind::Unavailable, "{error}");
    assert_eq!(faults.fail_storage_actor.load(Ordering::SeqCst), 0);
    assert!(
        keyring_files(&env, "ws_new").is_empty(),
        "nothing stored by the failed write: {:?}",
        keyring_files(&env, "ws_new")
    );

    // The supervisor restarts the writer after its backoff (10 ms here).
    let sealed = until_ok("sealed", || client.encrypt("ws_new", "first use")).await;
    assert_stored(&env, "ws_new", &[&sealed.key_id]);
    assert_eq!(
        client
            .decrypt("ws_new", &sealed.encrypted)
            .await
            .unwrap()
            .plaintext,
        "first use"
    );

    // The keyring created before the fault still works, old ciphertexts included.
    assert_eq!(
        client
            .decrypt("ws_old", &old.encrypted)
            .await
            .unwrap()
            .plaintext,
        "older keyring"
    );
    let again = client.encrypt("ws_old", "still works").await.unwrap();
    assert_eq!(again.key_id, old.key_id);

    // A rotation whose write fails leaves the keyring as it was; the retry adds one DEK.
    faults.fail_storage_actor.store(1, Ordering::SeqCst);
    let error = client.rotate("ws_old").await.unwrap_err();
    assert_eq!(error.kind(), Kind::Unavailable, "{error}");
    assert_stored(&env, "ws_old", &[&old.key_id]);
    let rotated = until_ok("rotated", || client.rotate("ws_old")).await;
    assert_eq!(rotated.previous_key_id, old.key_id);
    assert_stored(&env, "ws_old", &[&old.key_id, &rotated.key_id]);
    assert_eq!(
        client
            .decrypt("ws_old", &old.encrypted)
            .await
            .unwrap()
            .plaintext,
        "older keyring"
    );
    server.shutdown().await.unwrap();
}

/// Many callers meeting one keyring's cold cache at once: each call reaches a keyring actor
/// even when the actors it met finished their work and stopped before the call arrived, and
/// every caller gets the keyring's one key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_first_uses_of_one_keyring_all_succeed() {
    let env = TestEnv::start().await;
    let server = env.service(&[]).await;
    let client = env.client(Format::Protobuf).await;
    for round in 0..8 {
        let keyring = format!("ws_burst_{round}");
        let replies =
            futures::future::join_all((0..64).map(|_| client.encrypt(&keyring, "burst"))).await;
        let key_ids: std::collections::BTreeSet<String> = replies
            .into_iter()
            .map(|reply| {
                reply
                    .unwrap_or_else(|error| panic!("{keyring}: {error}"))
                    .key_id
            })
            .collect();
        assert_eq!(key_ids.len(), 1, "{keyring}: {key_ids:?}");
    }
    // ReEncrypt reads storage each time, so the cache cannot answer its retries: a burst of
    // them on one keyring still reaches actors, one after another.
    let sealed = client.encrypt("ws_burst_re", "burst").await.unwrap();
    for round in 0..4 {
        let replies = futures::future::join_all(
            (0..64).map(|_| client.reencrypt("ws_burst_re", &sealed.encrypted)),
        )
        .await;
        for reply in replies {
            reply.unwrap_or_else(|error| panic!("reencrypt round {round}: {error}"));
        }
    }
    server.shutdown().await.unwrap();
}

/// A request loop that ends outside a drain (its subscription closed, a panic) fails the
/// gateway, which the supervisor starts again: the method is served again, instead of
/// answering "no responders" for good while health says the gateway is up.
#[tokio::test]
async fn a_request_loop_that_ends_restarts_the_gateway() {
    let env = TestEnv::start().await;
    let server = env
        .service(&[("RINGVAULT_NATS_SUBSCRIPTIONS_PER_METHOD", "1")])
        .await;
    let client = env.client(Format::Protobuf).await;
    client.encrypt("ws_loop", "before").await.unwrap();
    let dropped = end_the_encrypt_loop(&env, &server, "ws_loop")
        .await
        .unwrap_err();
    assert_eq!(dropped.kind(), Kind::Unavailable, "{dropped}");
    let sealed = until_ok("encrypt after the loop ended", || {
        client.encrypt("ws_loop", "after")
    })
    .await;
    assert!(sealed.key_id.starts_with("dek_"));
    server.shutdown().await.unwrap();
}

/// When one request loop ends outside a drain, the gateway drains the others before it is
/// restarted: a request another method's loop has taken is answered, not aborted.
#[tokio::test]
async fn a_request_loop_that_ends_lets_the_others_answer_what_they_hold() {
    let env = TestEnv::start().await;
    let server = env
        .service(&[("RINGVAULT_NATS_SUBSCRIPTIONS_PER_METHOD", "1")])
        .await;
    let client = env.client(Format::Protobuf).await;
    let sealed = client.encrypt("ws_held", "held").await.unwrap();
    let faults = server.hooks().faults.clone();
    let held = hold_next_request(&faults, Method::Decrypt, Duration::from_secs(1), {
        let client = client.clone();
        async move { client.decrypt("ws_held", &sealed.encrypted).await }
    })
    .await;
    let _ = end_the_encrypt_loop(&env, &server, "ws_held").await;
    let opened = held.await.unwrap().expect("the held Decrypt is answered");
    assert_eq!(opened.plaintext, "held");
    until_ok("encrypt after the restart", || {
        client.encrypt("ws_held", "after")
    })
    .await;
    server.shutdown().await.unwrap();
}

/// `nats.max_inflight` bounds the requests in progress across every method: with a limit of
/// one, a Liveness waits for a held Encrypt; without it, it does not.
#[tokio::test]
async fn max_inflight_bounds_requests_across_methods() {
    for (limit, liveness_waits) in [("1", true), ("64", false)] {
        let env = TestEnv::start().await;
        let server = env
            .service(&[
                ("RINGVAULT_NATS_MAX_INFLIGHT", limit),
                ("RINGVAULT_NATS_SUBSCRIPTIONS_PER_METHOD", "1"),
            ])
            .await;
        let client = env.client(Format::Protobuf).await;
        client.encrypt("ws_inflight", "warm").await.unwrap();
        let faults = server.hooks().faults.clone();
        let hold = Duration::from_millis(1500);
        let held = hold_next_request(&faults, Method::Encrypt, hold, {
            let client = client.clone();
            async move {
                client.encrypt("ws_inflight", "held").await.unwrap();
                tokio::time::Instant::now()
            }
        })
        .await;
        client.liveness().await.unwrap();
        let liveness_done = tokio::time::Instant::now();
        let held_done = held.await.unwrap();
        assert_eq!(
            liveness_done >= held_done,
            liveness_waits,
            "max_inflight {limit}: liveness at {liveness_done:?}, held encrypt at {held_done:?}"
        );
        server.shutdown().await.unwrap();
    }
}

/// A handler that panics after authentication (a defect) costs its caller an `internal` error
/// and nothing more: the request still leaves its audit record, and the loop goes on serving.
#[tokio::test]
async fn a_panicking_handler_answers_internal_and_leaves_its_audit_record() {
    let env = TestEnv::start().await;
    let server = env.service(&[]).await;
    let watcher = async_nats::connect(env.nats.url()).await.unwrap();
    let mut audit = watcher.subscribe("vault.v1.audit").await.unwrap();
    watcher.flush().await.unwrap();

    *server.hooks().faults.panic_next_request.lock().unwrap() = Some(Method::Encrypt);
    let failed = impatient_client(&env)
        .await
        .encrypt("ws_panic/app", "lost")
        .await
        .unwrap_err();
    assert_eq!(failed.kind(), Kind::Internal, "{failed}");
    assert!(server
        .hooks()
        .faults
        .panic_next_request
        .lock()
        .unwrap()
        .is_none());
    let client = env.client(Format::Protobuf).await;
    let sealed = common::service::assert_round_trip(&client, "ws_panic/app", "kept").await;

    let records = audit_records(&mut audit, 3).await;
    // Found by content: the Encrypt and Decrypt loops publish their records independently.
    let find = |action: &str, outcome: &str| {
        let found: Vec<_> = records
            .iter()
            .filter(|record| record["action"] == action && record["outcome"] == outcome)
            .collect();
        assert_eq!(found.len(), 1, "{action} {outcome}: {records:#?}");
        found[0].clone()
    };
    let panicked = find("encrypt", "error");
    assert_eq!(panicked["error_code"], "internal", "{panicked}");
    // The hook panics before the body is read; the record names the keyring all the same.
    assert_eq!(panicked["keyring"], "ws_panic/app", "{panicked}");
    assert!(panicked.get("key_id").is_none(), "{panicked}");
    assert_eq!(find("encrypt", "ok")["key_id"], sealed.key_id.as_str());
    assert_eq!(find("decrypt", "ok")["keyring"], "ws_panic/app");
    server.shutdown().await.unwrap();
}

/// Has the service hold its next request of `method` for `hold`, sends it (`request`, spawned),
/// and returns once the service has taken it.
async fn hold_next_request<T: Send + 'static>(
    faults: &ringvault::actors::FaultHooks,
    method: Method,
    hold: Duration,
    request: impl std::future::Future<Output = T> + Send + 'static,
) -> tokio::task::JoinHandle<T> {
    *faults.delay_next_request.lock().unwrap() = Some((method, hold));
    let sent = tokio::spawn(request);
    assert!(
        eventually(Duration::from_secs(10), || async {
            faults.delay_next_request.lock().unwrap().is_none()
        })
        .await,
        "the held request was not taken"
    );
    sent
}

/// Ends the Encrypt request loop that takes the next request, and sends it one: the loop
/// drops it, so its caller is answered by no one.
async fn end_the_encrypt_loop(
    env: &TestEnv,
    server: &ringvault::server::Server,
    keyring: &str,
) -> ringvault::Result<ringvault::protocol::EncryptResponse> {
    *server.hooks().faults.end_request_loop.lock().unwrap() = Some(Method::Encrypt);
    impatient_client(env)
        .await
        .encrypt(keyring, "dropped")
        .await
}

/// A client that waits 500 ms for a reply and does not retry: for requests a fault drops.
async fn impatient_client(env: &TestEnv) -> Client {
    Client::connect(
        env.nats.url().as_str(),
        ringvault::client::ClientOptions {
            token: Some(TOKEN.into()),
            timeout: Duration::from_millis(500),
            retries: 0,
            format: Format::Protobuf,
            ..ringvault::client::ClientOptions::default()
        },
    )
    .await
    .unwrap()
}

/// A gateway start that fails after spawning its tasks leaves none of them behind: after a
/// failed restart and a good one, one instance answers discovery, not two.
#[tokio::test]
async fn a_failed_gateway_start_leaves_nothing_serving() {
    let env = TestEnv::start().await;
    let server = env
        .service(&[("RINGVAULT_NATS_SUBSCRIPTIONS_PER_METHOD", "1")])
        .await;
    let client = env.client(Format::Protobuf).await;
    let faults = server.hooks().faults.clone();
    faults.fail_gateway_start.store(1, Ordering::SeqCst);
    *faults.end_request_loop.lock().unwrap() = Some(Method::Liveness);
    let _ = impatient_client(&env).await.liveness().await;
    until_ok("liveness after the restarts", || client.liveness()).await;
    assert_eq!(faults.fail_gateway_start.load(Ordering::SeqCst), 0);

    let nats = async_nats::connect(env.nats.url()).await.unwrap();
    let inbox = nats.new_inbox();
    let mut replies = nats.subscribe(inbox.clone()).await.unwrap();
    nats.publish_with_reply("$SRV.PING.ringvault", inbox, "".into())
        .await
        .unwrap();
    let mut instances = std::collections::BTreeSet::new();
    while let Ok(Some(reply)) =
        tokio::time::timeout(Duration::from_millis(500), replies.next()).await
    {
        let ping: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
        instances.insert(ping["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(instances.len(), 1, "{instances:?}");
    server.shutdown().await.unwrap();
}

/// A restart that fails is one more failure: retried after its backoff, not the end of
/// supervision (a supervisor that failed with it left a process serving nothing).
#[tokio::test]
async fn a_restart_that_fails_is_retried() {
    let env = TestEnv::start().await;
    let server = env.service(&[]).await;
    let client = env.client(Format::Protobuf).await;
    let faults = server.hooks().faults.clone();
    faults.fail_storage_start.store(2, Ordering::SeqCst);
    faults.fail_storage_actor.store(1, Ordering::SeqCst);
    let error = client.encrypt("ws_restart", "first use").await.unwrap_err();
    assert_eq!(error.kind(), Kind::Unavailable, "{error}");
    let sealed = until_ok("sealed", || client.encrypt("ws_restart", "first use")).await;
    assert_eq!(faults.fail_storage_start.load(Ordering::SeqCst), 0);
    assert_stored(&env, "ws_restart", &[&sealed.key_id]);
    server.shutdown().await.unwrap();
}

/// A restart waits out its backoff as a message the supervisor sends itself, not inside the
/// supervisor's handler: a shutdown meanwhile is taken at once.
#[tokio::test]
async fn a_shutdown_during_a_restart_backoff_is_not_held_up() {
    let env = TestEnv::start().await;
    let server = env
        .service(&[("RINGVAULT_SUPERVISION_RESTART_BACKOFF_MS", "600000")])
        .await;
    let client = env.client(Format::Protobuf).await;
    server
        .hooks()
        .faults
        .fail_storage_actor
        .store(1, Ordering::SeqCst);
    let error = client.encrypt("ws_backoff", "x").await.unwrap_err();
    assert_eq!(error.kind(), Kind::Unavailable, "{error}");
    // The backoff is capped at 10 s; a shutdown that waited for it would take longer than
    // this whole bound, which a prompt one (well under a second) never nears.
    tokio::time::timeout(Duration::from_secs(9), server.shutdown())
        .await
        .expect("shutdown waited for the restart backoff")
        .unwrap();
}

/// Restarts that keep failing escalate like failures of the running actor.
#[tokio::test]
async fn restarts_that_keep_failing_escalate() {
    let env = TestEnv::start().await;
    let server = env
        .service(&[
            ("RINGVAULT_SUPERVISION_MAX_RESTARTS", "3"),
            ("RINGVAULT_SUPERVISION_WINDOW_SECS", "60"),
        ])
        .await;
    let client = env.client(Format::Protobuf).await;
    let faults = server.hooks().faults.clone();
    faults.fail_storage_start.store(1000, Ordering::SeqCst);
    faults.fail_storage_actor.store(1, Ordering::SeqCst);
    let running = tokio::spawn(server.run_until(std::future::pending()));
    let _ = client.encrypt("ws_doomed", "first use").await;
    let outcome = tokio::time::timeout(Duration::from_secs(15), running)
        .await
        .expect("supervision did not give up within 15 s")
        .expect("run_until did not panic");
    match outcome {
        Err(error @ ServerError::Fatal(_)) => {
            assert!(error.to_string().contains("restart failed"), "{error}");
        }
        other => panic!("expected a fatal error, got {other:?}"),
    }
    // The running actor's failure, then three failed starts: the fourth failure escalates.
    assert_eq!(1000 - faults.fail_storage_start.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn supervision_gives_up_after_too_many_failures_within_the_window() {
    let env = TestEnv::start().await;
    let server = env
        .service(&[
            ("RINGVAULT_SUPERVISION_MAX_RESTARTS", "3"),
            ("RINGVAULT_SUPERVISION_WINDOW_SECS", "60"),
        ])
        .await;
    let client = env.client(Format::Protobuf).await;
    let faults = server.hooks().faults.clone();
    faults.fail_storage_actor.store(1000, Ordering::SeqCst);

    let running = tokio::spawn(server.run_until(std::future::pending()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut attempts = 0;
    while !running.is_finished() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "supervision did not give up within 15 s ({attempts} rotations sent, {} faults left)",
            faults.fail_storage_actor.load(Ordering::SeqCst)
        );
        attempts += 1;
        let _ = client.rotate("ws_fatal").await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let outcome = running.await.expect("run_until did not panic");
    match outcome {
        Err(error @ ServerError::Fatal(_)) => {
            assert_ne!(error.exit_code(), 0, "{error}");
            assert!(error.to_string().contains("storage actor"), "{error}");
        }
        other => panic!("expected a fatal error, got {other:?}"),
    }
    // max_restarts = 3: the fourth failure within the window escalates.
    assert_eq!(
        1000 - faults.fail_storage_actor.load(Ordering::SeqCst),
        4,
        "failures consumed before giving up"
    );
    // Nothing answers any more: the client says unavailable, not a timeout.
    let error = client.liveness().await.unwrap_err();
    assert_eq!(error.kind(), Kind::Unavailable, "{error}");
    assert!(
        error.message().contains("no ringvault responded"),
        "{error}"
    );
}

// ---------------------------------------------------------------------------
// Bad input over the wire
// ---------------------------------------------------------------------------

const MAX_PLAINTEXT: usize = 1024;

async fn raw(client: &Client, method: Method, format: Format, body: impl Into<Bytes>) -> RawReply {
    client
        .request_raw(
            method,
            request_headers(Some(TOKEN), format).unwrap(),
            body.into(),
        )
        .await
        .unwrap_or_else(|error| panic!("{method:?}: no reply: {error}"))
}

/// Header names are matched whatever their case: `authorization` authenticates,
/// `content-type` picks JSON, and Go's canonical `X-Request-Id` is echoed.
#[tokio::test]
async fn header_names_match_whatever_their_case() {
    let env = TestEnv::start().await;
    let server = env.service(&[]).await;
    let client = env.client(Format::Json).await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {TOKEN}").as_str());
    headers.insert("content-type", "application/json");
    headers.insert("X-Request-Id", "req-lowercase-1");
    let reply = client
        .request_raw(
            Method::Encrypt,
            headers,
            Bytes::from_static(br#"{"keyring":"ws_case","data":"hello"}"#),
        )
        .await
        .unwrap();
    assert!(reply.error().is_none(), "{:?}", reply.error());
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert!(body["encrypted"].is_string(), "{body}");
    assert_eq!(
        reply
            .headers
            .get(protocol::REQUEST_ID)
            .map(|value| value.as_str()),
        Some("req-lowercase-1")
    );
    server.shutdown().await.unwrap();
}

/// One header under two spellings is refused, every time: the header map keeps no order
/// between spellings, so taking either would pass or fail the same request at random (a good
/// and a bad token; two workspaces in `X-Tenant-ID`).
#[tokio::test]
async fn a_header_under_two_spellings_is_refused() {
    let env = TestEnv::start().await;
    let server = env.service(&[]).await;
    let client = env.client(Format::Json).await;
    let body = Bytes::from_static(br#"{"keyring":"ws_case","data":"hello"}"#);
    let good = format!("Bearer {TOKEN}");
    for (first, first_value, second, second_value) in [
        (
            "Authorization",
            good.as_str(),
            "authorization",
            "Bearer not-the-token",
        ),
        ("X-Tenant-ID", "ws_a", "x-tenant-id", "ws_b"),
        ("X-Request-ID", "req-one", "x-request-id", "req-two"),
    ] {
        // Enough tries that a coin toss would have let one through.
        for attempt in 0..8 {
            let mut headers = request_headers(Some(TOKEN), Format::Json).unwrap();
            headers.insert(first, first_value);
            headers.insert(second, second_value);
            let reply = client
                .request_raw(Method::Encrypt, headers, body.clone())
                .await
                .unwrap();
            let what = format!("{first} and {second}, attempt {attempt}");
            let error = reply
                .error()
                .unwrap_or_else(|| panic!("{what}: expected a refusal"));
            assert_eq!(error.kind(), Kind::InvalidArgument, "{what}: {error}");
            assert!(error.message().contains("two spellings"), "{what}: {error}");
            // Neither spelling's request id is echoed.
            let echoed = reply.headers.get(protocol::REQUEST_ID).unwrap().as_str();
            assert!(!echoed.starts_with("req-"), "{what}: {echoed}");
        }
    }
    // Liveness reads no header, and one spelling still works.
    client.liveness().await.unwrap();
    client.encrypt("ws_case", "hello").await.unwrap();
    server.shutdown().await.unwrap();
}

/// Asserts that `reply` is an error of `kind` with the HTTP-like `status` header, then that the
/// service still answers a valid request.
async fn expect_error(client: &Client, what: &str, reply: RawReply, kind: Kind, status: &str) {
    let error = reply
        .error()
        .unwrap_or_else(|| panic!("{what}: expected {kind:?}, got a success"));
    assert_eq!(error.kind(), kind, "{what}: {error}");
    let header = reply
        .headers
        .get(protocol::SERVICE_ERROR_CODE)
        .unwrap_or_else(|| panic!("{what}: no {} header", protocol::SERVICE_ERROR_CODE));
    assert_eq!(header.as_str(), status, "{what}: {error}");
    let body: serde_json::Value = serde_json::from_slice(&reply.body)
        .unwrap_or_else(|e| panic!("{what}: error body is not json: {e}"));
    assert_eq!(body["code"], kind.code(), "{what}: {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {body}"
    );
    assert_service_answers(client, what).await;
}

async fn assert_service_answers(client: &Client, after: &str) {
    let sealed = client
        .encrypt("ws_valid", "still answering")
        .await
        .unwrap_or_else(|error| panic!("valid request after {after} failed: {error}"));
    assert_eq!(
        client
            .decrypt("ws_valid", &sealed.encrypted)
            .await
            .unwrap_or_else(|error| panic!("valid decrypt after {after} failed: {error}"))
            .plaintext,
        "still answering"
    );
}

fn proto<T: prost::Message>(message: &T) -> Vec<u8> {
    message.encode_to_vec()
}

#[tokio::test]
async fn bad_input_gets_a_clear_code_and_the_service_keeps_answering() {
    let env = TestEnv::start().await;
    let max = MAX_PLAINTEXT.to_string();
    let server = env
        .service(&[("RINGVAULT_NATS_MAX_PLAINTEXT_BYTES", max.as_str())])
        .await;
    assert_eq!(server.max_plaintext_bytes(), MAX_PLAINTEXT);
    let client = env.client(Format::Protobuf).await;
    let pb = Format::Protobuf;
    assert_service_answers(&client, "start").await;

    // Random bytes as a protobuf body (0xff.. is an unterminated varint tag).
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut noise = vec![0xffu8; 3];
    noise.extend((0..61).map(|_| rng.gen::<u8>()));
    let reply = raw(&client, Method::Encrypt, pb, noise).await;
    expect_error(&client, "random bytes", reply, Kind::InvalidArgument, "400").await;

    // Malformed protobuf: a truncated length varint, a truncated length-delimited field, a
    // field with the wrong wire type, an invalid wire type.
    for (what, body) in [
        ("truncated varint", vec![0x0a, 0x80]),
        ("truncated field", vec![0x0a, 0x10, b'w', b's']),
        ("wrong wire type", vec![0x08, 0x01]),
        ("invalid wire type", vec![0x0f, 0x01]),
        ("field number zero", vec![0x02, 0x00]),
    ] {
        for method in [
            Method::Encrypt,
            Method::Decrypt,
            Method::ReEncrypt,
            Method::EncryptBulk,
            Method::DecryptBulk,
            Method::RotateKeyring,
            Method::DescribeKeyring,
        ] {
            let reply = raw(&client, method, pb, body.clone()).await;
            expect_error(
                &client,
                &format!("{what} to {method:?}"),
                reply,
                Kind::InvalidArgument,
                "400",
            )
            .await;
        }
    }

    // Bad base64 in Decrypt, ReEncrypt and DecryptBulk.
    let bad_base64 = DecryptRequest {
        keyring: "ws_valid".into(),
        encrypted: "not base64 !!".into(),
    };
    let reply = raw(&client, Method::Decrypt, pb, proto(&bad_base64)).await;
    expect_error(&client, "bad base64", reply, Kind::InvalidArgument, "400").await;
    let reencrypt = ReEncryptRequest {
        keyring: "ws_valid".into(),
        encrypted: "%%%".into(),
        key_id: None,
    };
    let reply = raw(&client, Method::ReEncrypt, pb, proto(&reencrypt)).await;
    expect_error(
        &client,
        "bad base64 reencrypt",
        reply,
        Kind::InvalidArgument,
        "400",
    )
    .await;
    // Base64 that decodes to bytes that are no envelope.
    let not_envelope = DecryptRequest {
        keyring: "ws_valid".into(),
        encrypted: "/////w==".into(),
    };
    let reply = raw(&client, Method::Decrypt, pb, proto(&not_envelope)).await;
    expect_error(
        &client,
        "not an envelope",
        reply,
        Kind::InvalidArgument,
        "400",
    )
    .await;

    // An envelope that decodes but is tampered with.
    let sealed = client.encrypt("ws_valid", "tamper with me").await.unwrap();
    let envelope = decode_envelope(&sealed.encrypted).unwrap();
    let mut tampered = envelope.clone();
    tampered.ciphertext[0] ^= 0x01;
    let request = DecryptRequest {
        keyring: "ws_valid".into(),
        encrypted: encode_envelope(&tampered),
    };
    let reply = raw(&client, Method::Decrypt, pb, proto(&request)).await;
    expect_error(
        &client,
        "tampered ciphertext",
        reply,
        Kind::InvalidArgument,
        "400",
    )
    .await;
    let mut tampered_tag = envelope.clone();
    *tampered_tag.ciphertext.last_mut().unwrap() ^= 0x80;
    let request = ReEncryptRequest {
        keyring: "ws_valid".into(),
        encrypted: encode_envelope(&tampered_tag),
        key_id: None,
    };
    let reply = raw(&client, Method::ReEncrypt, pb, proto(&request)).await;
    expect_error(&client, "tampered tag", reply, Kind::InvalidArgument, "400").await;
    let mut tampered_nonce = envelope.clone();
    tampered_nonce.nonce[3] ^= 0x10;
    let request = DecryptRequest {
        keyring: "ws_valid".into(),
        encrypted: encode_envelope(&tampered_nonce),
    };
    let reply = raw(&client, Method::Decrypt, pb, proto(&request)).await;
    expect_error(
        &client,
        "tampered nonce",
        reply,
        Kind::InvalidArgument,
        "400",
    )
    .await;
    let mut short_nonce = envelope.clone();
    short_nonce.nonce.pop();
    let request = DecryptRequest {
        keyring: "ws_valid".into(),
        encrypted: encode_envelope(&short_nonce),
    };
    let reply = raw(&client, Method::Decrypt, pb, proto(&request)).await;
    expect_error(&client, "short nonce", reply, Kind::InvalidArgument, "400").await;

    // A valid envelope of another keyring: the key is not found there.
    let request = DecryptRequest {
        keyring: "ws_other".into(),
        encrypted: sealed.encrypted.clone(),
    };
    let reply = raw(&client, Method::Decrypt, pb, proto(&request)).await;
    expect_error(&client, "other keyring", reply, Kind::NotFound, "404").await;

    // Unknown key id in a well-formed envelope.
    let mut unknown = envelope.clone();
    unknown.encryption_key_id = "dek_doesnotexist".into();
    let request = DecryptRequest {
        keyring: "ws_valid".into(),
        encrypted: encode_envelope(&unknown),
    };
    let reply = raw(&client, Method::Decrypt, pb, proto(&request)).await;
    expect_error(&client, "unknown key id", reply, Kind::NotFound, "404").await;
    let request = DecryptBulkRequest {
        keyring: "ws_valid".into(),
        items: HashMap::from([
            ("good".to_owned(), sealed.encrypted.clone()),
            ("unknown".to_owned(), encode_envelope(&unknown)),
        ]),
    };
    let reply = raw(&client, Method::DecryptBulk, pb, proto(&request)).await;
    expect_error(&client, "bulk unknown key id", reply, Kind::NotFound, "404").await;
    // Key ids that must never become a path.
    for key_id in ["../../LATEST", "LATEST", "dek/../x", ".."] {
        let mut bad = envelope.clone();
        bad.encryption_key_id = key_id.into();
        let request = DecryptRequest {
            keyring: "ws_valid".into(),
            encrypted: encode_envelope(&bad),
        };
        let reply = raw(&client, Method::Decrypt, pb, proto(&request)).await;
        expect_error(
            &client,
            &format!("key id {key_id:?}"),
            reply,
            Kind::InvalidArgument,
            "400",
        )
        .await;
    }

    // Invalid keyrings, on every method that takes one.
    for keyring in ["", "../x", "a//b", "a b", "/a", "a/", "a/./b", "é"] {
        let bodies = [
            (
                Method::Encrypt,
                proto(&EncryptRequest {
                    keyring: keyring.into(),
                    data: "x".into(),
                }),
            ),
            (
                Method::Decrypt,
                proto(&DecryptRequest {
                    keyring: keyring.into(),
                    encrypted: sealed.encrypted.clone(),
                }),
            ),
            (
                Method::ReEncrypt,
                proto(&ReEncryptRequest {
                    keyring: keyring.into(),
                    encrypted: sealed.encrypted.clone(),
                    key_id: None,
                }),
            ),
            (
                Method::EncryptBulk,
                proto(&EncryptBulkRequest {
                    keyring: keyring.into(),
                    items: HashMap::from([("a".to_owned(), "x".to_owned())]),
                }),
            ),
            (
                Method::DecryptBulk,
                proto(&DecryptBulkRequest {
                    keyring: keyring.into(),
                    items: HashMap::from([("a".to_owned(), sealed.encrypted.clone())]),
                }),
            ),
            (
                Method::RotateKeyring,
                proto(&RotateKeyringRequest {
                    keyring: keyring.into(),
                }),
            ),
            (
                Method::DescribeKeyring,
                proto(&DescribeKeyringRequest {
                    keyring: keyring.into(),
                }),
            ),
        ];
        for (method, body) in bodies {
            let reply = raw(&client, method, pb, body).await;
            expect_error(
                &client,
                &format!("keyring {keyring:?} on {method:?}"),
                reply,
                Kind::InvalidArgument,
                "400",
            )
            .await;
        }
    }
    let long = "a".repeat(257);
    let reply = raw(
        &client,
        Method::Encrypt,
        pb,
        proto(&EncryptRequest {
            keyring: long,
            data: "x".into(),
        }),
    )
    .await;
    expect_error(
        &client,
        "keyring too long",
        reply,
        Kind::InvalidArgument,
        "400",
    )
    .await;
    assert!(
        !env.store_path().join("x").exists() && !env.store_path().join("keyring/a").exists(),
        "an invalid keyring reached the store: {:?}",
        files_under(&env.store_path())
    );

    // Oversized plaintext: one item, and bulk items together.
    let at_limit = "p".repeat(MAX_PLAINTEXT);
    client.encrypt("ws_valid", &at_limit).await.unwrap();
    let request = EncryptRequest {
        keyring: "ws_valid".into(),
        data: "p".repeat(2000),
    };
    let reply = raw(&client, Method::Encrypt, pb, proto(&request)).await;
    expect_error(&client, "oversized", reply, Kind::PayloadTooLarge, "413").await;
    let request = EncryptRequest {
        keyring: "ws_valid".into(),
        data: "p".repeat(MAX_PLAINTEXT + 1),
    };
    let reply = raw(&client, Method::Encrypt, pb, proto(&request)).await;
    expect_error(
        &client,
        "one byte too many",
        reply,
        Kind::PayloadTooLarge,
        "413",
    )
    .await;
    let request = EncryptBulkRequest {
        keyring: "ws_valid".into(),
        items: (0..3)
            .map(|index| (format!("item-{index}"), "b".repeat(400)))
            .collect(),
    };
    let reply = raw(&client, Method::EncryptBulk, pb, proto(&request)).await;
    expect_error(
        &client,
        "oversized bulk",
        reply,
        Kind::PayloadTooLarge,
        "413",
    )
    .await;
    let error = client
        .encrypt_bulk("ws_valid", request.items.clone())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), Kind::PayloadTooLarge, "{error}");

    // Invalid UTF-8 in a JSON body.
    let json = Format::Json;
    let body = b"{\"keyring\":\"ws_valid\",\"data\":\"\xff\xfe\"}".to_vec();
    let reply = raw(&client, Method::Encrypt, json, body).await;
    expect_error(
        &client,
        "invalid utf-8 json",
        reply,
        Kind::InvalidArgument,
        "400",
    )
    .await;
    let body = b"{\"keyring\":\"ws_\xc3\",\"encrypted\":\"AAAA\"}".to_vec();
    let reply = raw(&client, Method::Decrypt, json, body).await;
    expect_error(
        &client,
        "invalid utf-8 json keyring",
        reply,
        Kind::InvalidArgument,
        "400",
    )
    .await;
    // Malformed JSON and JSON of the wrong type.
    for body in [
        &b"{\"keyring\":"[..],
        b"[1,2,3]",
        b"{\"keyring\":42}",
        b"{\"keyring\":\"ws_valid\",\"items\":[\"x\"]}",
        b"\"just a string\"",
    ] {
        let reply = raw(&client, Method::EncryptBulk, json, body.to_vec()).await;
        expect_error(
            &client,
            &format!("json {:?}", String::from_utf8_lossy(body)),
            reply,
            Kind::InvalidArgument,
            "400",
        )
        .await;
    }
    // Error replies to JSON requests carry the same codes.
    let reply = raw(
        &client,
        Method::Encrypt,
        json,
        r#"{"keyring":"a b","data":"x"}"#,
    )
    .await;
    expect_error(
        &client,
        "json bad keyring",
        reply,
        Kind::InvalidArgument,
        "400",
    )
    .await;

    // Invalid UTF-8 inside a protobuf string field (EncryptRequest.data = 0xff).
    let mut body = vec![0x0a, 8];
    body.extend_from_slice(b"ws_valid");
    body.extend_from_slice(&[0x12, 1, 0xff]);
    let reply = raw(&client, Method::Encrypt, pb, body).await;
    expect_error(
        &client,
        "invalid utf-8 proto data",
        reply,
        Kind::InvalidArgument,
        "400",
    )
    .await;
    let body = vec![0x0a, 2, 0xc3, 0x28];
    let reply = raw(&client, Method::RotateKeyring, pb, body).await;
    expect_error(
        &client,
        "invalid utf-8 proto keyring",
        reply,
        Kind::InvalidArgument,
        "400",
    )
    .await;

    // An empty body is a request with every field empty: the keyring is empty.
    for format in [pb, json] {
        for method in [Method::Encrypt, Method::Decrypt, Method::RotateKeyring] {
            let reply = raw(&client, method, format, Vec::new()).await;
            expect_error(
                &client,
                &format!("empty {format:?} body to {method:?}"),
                reply,
                Kind::InvalidArgument,
                "400",
            )
            .await;
        }
    }
    // A valid keyring with an empty envelope.
    let request = DecryptRequest {
        keyring: "ws_valid".into(),
        encrypted: String::new(),
    };
    let reply = raw(&client, Method::Decrypt, pb, proto(&request)).await;
    expect_error(
        &client,
        "empty envelope",
        reply,
        Kind::InvalidArgument,
        "400",
    )
    .await;

    server.shutdown().await.unwrap();
}

/// Whether `body` is a well-formed request of `method` naming a valid keyring: only such a
/// request may succeed.
fn well_formed(method: Method, format: Format, body: &[u8]) -> bool {
    fn keyring_of<T>(format: Format, body: &[u8], keyring: impl Fn(&T) -> &str) -> bool
    where
        T: prost::Message + Default + serde::de::DeserializeOwned,
    {
        protocol::decode::<T>(format, body)
            .is_ok_and(|request| validate_keyring(keyring(&request)).is_ok())
    }
    match method {
        Method::Liveness => true,
        Method::Encrypt => keyring_of::<EncryptRequest>(format, body, |r| &r.keyring),
        Method::Decrypt => keyring_of::<DecryptRequest>(format, body, |r| &r.keyring),
        Method::ReEncrypt => keyring_of::<ReEncryptRequest>(format, body, |r| &r.keyring),
        Method::EncryptBulk => keyring_of::<EncryptBulkRequest>(format, body, |r| &r.keyring),
        Method::DecryptBulk => keyring_of::<DecryptBulkRequest>(format, body, |r| &r.keyring),
        Method::RotateKeyring => keyring_of::<RotateKeyringRequest>(format, body, |r| &r.keyring),
        Method::DescribeKeyring => {
            keyring_of::<DescribeKeyringRequest>(format, body, |r| &r.keyring)
        }
    }
}

/// A valid request body of `method`, to be mutated.
fn valid_body(method: Method, format: Format, encrypted: &str) -> Vec<u8> {
    let keyring = "ws_fuzz".to_owned();
    let body = match method {
        Method::Liveness => protocol::encode(format, &protocol::LivenessRequest {}),
        Method::Encrypt => protocol::encode(
            format,
            &EncryptRequest {
                keyring,
                data: "fuzz me".into(),
            },
        ),
        Method::Decrypt => protocol::encode(
            format,
            &DecryptRequest {
                keyring,
                encrypted: encrypted.into(),
            },
        ),
        Method::ReEncrypt => protocol::encode(
            format,
            &ReEncryptRequest {
                keyring,
                encrypted: encrypted.into(),
                key_id: Some("dek_x".into()),
            },
        ),
        Method::EncryptBulk => protocol::encode(
            format,
            &EncryptBulkRequest {
                keyring,
                items: HashMap::from([("a".to_owned(), "x".to_owned())]),
            },
        ),
        Method::DecryptBulk => protocol::encode(
            format,
            &DecryptBulkRequest {
                keyring,
                items: HashMap::from([("a".to_owned(), encrypted.to_owned())]),
            },
        ),
        Method::RotateKeyring => protocol::encode(format, &RotateKeyringRequest { keyring }),
        Method::DescribeKeyring => protocol::encode(format, &DescribeKeyringRequest { keyring }),
    };
    body.to_vec()
}

#[tokio::test]
async fn random_bodies_to_every_method_are_refused_cleanly() {
    let env = TestEnv::start().await;
    let max = MAX_PLAINTEXT.to_string();
    let server = env
        .service(&[("RINGVAULT_NATS_MAX_PLAINTEXT_BYTES", max.as_str())])
        .await;
    let client = env.client(Format::Protobuf).await;
    let sealed = client.encrypt("ws_fuzz", "fuzz me").await.unwrap();

    const PER_METHOD: usize = 200;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_f00d);
    let mut cases = Vec::new();
    for method in Method::ALL {
        for index in 0..PER_METHOD {
            let format = if rng.gen_bool(0.3) {
                Format::Json
            } else {
                Format::Protobuf
            };
            let body: Vec<u8> = if index % 2 == 0 {
                // Pure noise.
                let len = rng.gen_range(0..300);
                (0..len).map(|_| rng.gen()).collect()
            } else {
                // A valid body with a few bytes flipped, cut or appended.
                let mut body = valid_body(method, format, &sealed.encrypted);
                for _ in 0..rng.gen_range(1..4) {
                    match rng.gen_range(0..3) {
                        0 if !body.is_empty() => {
                            let at = rng.gen_range(0..body.len());
                            body[at] ^= 1 << rng.gen_range(0..8);
                        }
                        1 if !body.is_empty() => {
                            let at = rng.gen_range(0..body.len());
                            body.truncate(at);
                        }
                        _ => body.push(rng.gen()),
                    }
                }
                body
            };
            cases.push((method, format, body));
        }
    }

    let outcomes: Vec<_> = futures::stream::iter(cases)
        .map(|(method, format, body)| {
            let client = client.clone();
            async move {
                let reply = client
                    .request_raw(
                        method,
                        request_headers(Some(TOKEN), format).unwrap(),
                        Bytes::from(body.clone()),
                    )
                    .await;
                (method, format, body, reply)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;

    let mut successes = 0;
    let mut refused = HashMap::<&str, usize>::new();
    for (method, format, body, reply) in outcomes {
        let case = format!("{method:?} {format:?} body {}", hex::encode(&body));
        let reply = reply.unwrap_or_else(|error| panic!("{case}: no reply: {error}"));
        match reply.error() {
            None => {
                assert!(
                    well_formed(method, format, &body),
                    "{case}: a malformed request succeeded"
                );
                successes += 1;
            }
            Some(error) => {
                assert!(
                    matches!(error.kind(), Kind::InvalidArgument | Kind::NotFound),
                    "{case}: {:?} {error}",
                    error.kind()
                );
                let status = reply
                    .headers
                    .get(protocol::SERVICE_ERROR_CODE)
                    .map(|value| value.as_str().to_owned());
                let expected = error.kind().status().to_string();
                assert_eq!(status.as_deref(), Some(expected.as_str()), "{case}");
                *refused.entry(error.kind().code()).or_default() += 1;
            }
        }
    }
    assert!(
        refused.get("invalid_argument").copied().unwrap_or(0) > PER_METHOD,
        "most random bodies are refused: {refused:?}, {successes} successes"
    );

    // The service is unharmed.
    common::service::assert_round_trip(&client, "ws_fuzz", "after the fuzz").await;
    assert_eq!(
        client
            .decrypt("ws_fuzz", &sealed.encrypted)
            .await
            .unwrap()
            .plaintext,
        "fuzz me"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn keyring_actors_stop_after_their_work_and_keyrings_keep_working() {
    let env = TestEnv::start().await;
    let server = env.service(&[]).await;
    let client = env.client(Format::Protobuf).await;

    // 200 first uses at once: each spawns an actor, which drains and stops when done.
    let rings: Vec<String> = (0..200).map(|n| format!("ws_transient_{n}")).collect();
    let sealed =
        futures::future::join_all(rings.iter().map(|ring| client.encrypt(ring, "kept"))).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while server.keyring_actors() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} keyring actors still running",
            server.keyring_actors()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.keyrings().cached_keyrings(), rings.len());

    // The cache serves them without actors; slow paths get fresh ones, concurrently too.
    for (ring, envelope) in rings.iter().zip(&sealed) {
        let envelope = envelope.as_ref().unwrap();
        let opened = client.decrypt(ring, &envelope.encrypted).await.unwrap();
        assert_eq!(opened.plaintext, "kept");
    }
    let rotations = futures::future::join_all((0..20).map(|_| client.rotate(&rings[0]))).await;
    let mut previous: Vec<String> = rotations
        .into_iter()
        .map(|rotation| rotation.unwrap().previous_key_id)
        .collect();
    previous.sort();
    previous.dedup();
    assert_eq!(
        previous.len(),
        20,
        "each rotation follows another: {previous:?}"
    );
}
