//! Every RPC over a real nats-server, in protobuf and JSON; authentication on the wire;
//! rotation and ReEncrypt; two instances in one queue group.

use crate::common;

use std::collections::HashMap;

use common::service::{TestEnv, TOKEN};
use ringvault::protocol::{Format, Method};
use ringvault::Kind;

/// Runs a scenario on a local-directory store and on S3.
macro_rules! on_both_stores {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                #[tokio::test]
                async fn file_store() {
                    super::$scenario(super::TestEnv::start().await).await;
                }

                #[tokio::test]
                async fn s3_store() {
                    super::$scenario(super::TestEnv::start_s3().await).await;
                }
            }
        )*
    };
}

on_both_stores!(
    every_rpc_round_trips_in_protobuf,
    every_rpc_round_trips_in_json,
    json_by_hand_uses_camel_case_and_accepts_snake_case,
    liveness_needs_no_token_and_the_rest_refuse_bad_ones,
    after_rotation_reencrypt_moves_to_the_new_key_and_old_ciphertexts_decrypt,
    two_instances_in_one_queue_group_decrypt_each_others_ciphertexts,
);

async fn round_trip_every_rpc(env: TestEnv, format: Format) {
    let server = env.service(&[]).await;
    let client = env.client(format).await;

    assert_eq!(client.liveness().await.unwrap().status, "ok");

    let sealed = client.encrypt("ws_rpc", "hello over nats").await.unwrap();
    assert!(sealed.key_id.starts_with("dek_"), "{sealed:?}");
    let opened = client.decrypt("ws_rpc", &sealed.encrypted).await.unwrap();
    assert_eq!(opened.plaintext, "hello over nats");

    let again = client.reencrypt("ws_rpc", &sealed.encrypted).await.unwrap();
    assert_eq!(again.key_id, sealed.key_id, "no rotation yet: same key");
    assert_ne!(again.encrypted, sealed.encrypted, "fresh nonce");

    let items: HashMap<String, String> = (0..5)
        .map(|index| (format!("item-{index}"), format!("secret {index}")))
        .collect();
    let bulk = client.encrypt_bulk("ws_rpc", items.clone()).await.unwrap();
    assert_eq!(bulk.items.len(), 5);
    let envelopes: HashMap<String, String> = bulk
        .items
        .iter()
        .map(|(id, item)| (id.clone(), item.encrypted.clone()))
        .collect();
    let opened = client
        .decrypt_bulk("ws_rpc", envelopes.clone())
        .await
        .unwrap();
    assert_eq!(opened.items, items);

    // All or nothing: one bad item fails the call and is named.
    let mut with_bad = envelopes;
    with_bad.insert("broken".into(), "not base64 !!".into());
    let error = client.decrypt_bulk("ws_rpc", with_bad).await.unwrap_err();
    assert_eq!(error.kind(), Kind::InvalidArgument);
    assert!(error.message().contains("\"broken\""), "{error}");

    let rotated = client.rotate("ws_rpc").await.unwrap();
    assert_ne!(rotated.key_id, sealed.key_id);
    server.shutdown().await.unwrap();
}

async fn every_rpc_round_trips_in_protobuf(env: TestEnv) {
    round_trip_every_rpc(env, Format::Protobuf).await;
}

async fn every_rpc_round_trips_in_json(env: TestEnv) {
    round_trip_every_rpc(env, Format::Json).await;
}

async fn json_by_hand_uses_camel_case_and_accepts_snake_case(env: TestEnv) {
    let _server = env.service(&[]).await;
    let client = env.client(Format::Json).await;
    let mut headers = ringvault::client::request_headers(Some(TOKEN), Format::Json).unwrap();
    headers.insert("X-Request-ID", "my-request-1");
    let reply = client
        .request_raw(
            Method::Encrypt,
            headers,
            r#"{"keyring":"ws_json","data":"by hand","unknown":1}"#.into(),
        )
        .await
        .unwrap();
    assert!(reply.error().is_none(), "{:?}", reply.error());
    assert_eq!(reply.request_id().as_deref(), Some("my-request-1"));
    // One that could not be echoed safely (too long, a `:` or a space in it) is replaced by a
    // fresh one, never left out.
    for unusable in ["a".repeat(129), "a:b".to_owned(), "a b".to_owned()] {
        let mut headers = ringvault::client::request_headers(Some(TOKEN), Format::Json).unwrap();
        headers.insert("X-Request-ID", unusable.as_str());
        let reply = client
            .request_raw(
                Method::Encrypt,
                headers,
                r#"{"keyring":"ws_json","data":"x"}"#.into(),
            )
            .await
            .unwrap();
        assert!(reply.error().is_none(), "{:?}", reply.error());
        let echoed = reply.request_id().expect("a request id");
        assert!(!echoed.is_empty() && echoed != unusable, "{echoed}");
    }
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert!(
        body["keyId"].as_str().unwrap().starts_with("dek_"),
        "{body}"
    );
    let encrypted = body["encrypted"].as_str().unwrap();
    let request = format!(r#"{{"keyring":"ws_json","encrypted":"{encrypted}"}}"#);
    let reply = client
        .request_raw(
            Method::Decrypt,
            ringvault::client::request_headers(Some(TOKEN), Format::Json).unwrap(),
            request.into(),
        )
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(body["plaintext"], "by hand");
    assert!(
        reply.request_id().is_some_and(|id| id.len() == 32),
        "generated id"
    );
}

async fn liveness_needs_no_token_and_the_rest_refuse_bad_ones(env: TestEnv) {
    let _server = env.service(&[]).await;
    let anonymous = common::service::client(&env.nats.url(), None, Format::Protobuf).await;
    assert_eq!(anonymous.liveness().await.unwrap().status, "ok");
    let error = anonymous.encrypt("ws_1", "x").await.unwrap_err();
    assert_eq!(error.kind(), Kind::AuthenticationRequired, "{error}");
    let wrong = anonymous.with_token(Some("not-the-token".into()));
    for error in [
        wrong.encrypt("ws_1", "x").await.unwrap_err(),
        wrong.decrypt("ws_1", "AAAA").await.unwrap_err(),
        wrong.reencrypt("ws_1", "AAAA").await.unwrap_err(),
        wrong.rotate("ws_1").await.unwrap_err(),
    ] {
        assert_eq!(error.kind(), Kind::InvalidToken, "{error}");
    }
    // Another scheme is refused as invalid_token, with the 401 status header.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Authorization", "Basic dXNlcjpwYXNz");
    let reply = anonymous
        .request_raw(Method::Encrypt, headers, bytes::Bytes::new())
        .await
        .unwrap();
    assert_eq!(reply.error().unwrap().kind(), Kind::InvalidToken);
    let status = reply.headers.get("Nats-Service-Error-Code").unwrap();
    assert_eq!(status.as_str(), "401");
}

async fn after_rotation_reencrypt_moves_to_the_new_key_and_old_ciphertexts_decrypt(env: TestEnv) {
    let _server = env.service(&[]).await;
    let client = env.client(Format::Protobuf).await;
    let old = client.encrypt("ws_rot", "before rotation").await.unwrap();
    let rotated = client.rotate("ws_rot").await.unwrap();
    assert_eq!(rotated.previous_key_id, old.key_id);
    let moved = client.reencrypt("ws_rot", &old.encrypted).await.unwrap();
    assert_eq!(moved.key_id, rotated.key_id);
    assert_eq!(
        client
            .decrypt("ws_rot", &old.encrypted)
            .await
            .unwrap()
            .plaintext,
        "before rotation"
    );
    assert_eq!(
        client
            .decrypt("ws_rot", &moved.encrypted)
            .await
            .unwrap()
            .plaintext,
        "before rotation"
    );
    let fresh = client.encrypt("ws_rot", "after").await.unwrap();
    assert_eq!(fresh.key_id, rotated.key_id);
}

async fn two_instances_in_one_queue_group_decrypt_each_others_ciphertexts(env: TestEnv) {
    let first = env.service(&[]).await;
    let second = env.service(&[]).await;
    let client = env.client(Format::Protobuf).await;
    let mut sealed = Vec::new();
    for index in 0..40 {
        let keyring = format!("ws_pair_{}", index % 4);
        let text = format!("payload {index}");
        let reply = client.encrypt(&keyring, &text).await.unwrap();
        sealed.push((keyring, text, reply.encrypted, reply.key_id));
    }
    for (keyring, text, encrypted, _) in &sealed {
        assert_eq!(
            &client.decrypt(keyring, encrypted).await.unwrap().plaintext,
            text
        );
    }
    // Both instances served: each cached some keyring.
    assert!(first.keyrings().cached_keyrings() > 0);
    assert!(second.keyrings().cached_keyrings() > 0);
    // Each instance has every key that sealed something, whichever instance sealed it.
    for (keyring, _, _, key_id) in &sealed {
        for instance in [&first, &second] {
            let dek = instance.keyrings().dek(keyring, key_id).await.unwrap();
            assert_eq!(dek.id(), key_id);
        }
    }
    // And the one left decrypts everything over the wire.
    second.shutdown().await.unwrap();
    for (keyring, text, encrypted, _) in &sealed {
        assert_eq!(
            &client.decrypt(keyring, encrypted).await.unwrap().plaintext,
            text
        );
    }
    first.shutdown().await.unwrap();
}

/// An envelope that opens to bytes that are not UTF-8 (sealed by another tool: Encrypt only
/// takes text) cannot become a Decrypt reply's string field: `invalid_argument`, not `internal`.
#[tokio::test]
async fn an_envelope_of_bytes_that_are_not_utf8_is_invalid_argument() {
    use ringvault::crypto::{Kek, MasterKeys};

    let env = TestEnv::start().await;
    let service = env.service(&[]).await;
    let client = env.client(Format::Protobuf).await;
    client
        .encrypt("ws_1/bytes", "creates the key")
        .await
        .unwrap();

    let master_keys = MasterKeys::new(Kek::parse(&env.master_key).unwrap(), []).unwrap();
    let keyrings = common::service::local_keyrings(&env.store_path(), master_keys);
    let dek = keyrings.latest("ws_1/bytes").await.unwrap();
    let text = ringvault::protocol::encode_envelope(&dek.seal(&[b'a', 0xff, 0xfe]));

    let error = client.decrypt("ws_1/bytes", &text).await.unwrap_err();
    assert_eq!(error.kind(), Kind::InvalidArgument, "{error}");
    assert!(error.message().contains("utf-8"), "{error}");
    service.shutdown().await.unwrap();
}

/// Many small bulk items pass the plaintext limit and still make a reply larger than the
/// nats-server's `max_payload` (each envelope is ~130 bytes): the call is refused as
/// `payload_too_large` before anything is sealed, by a lower bound of the reply's size.
#[tokio::test]
async fn a_bulk_call_whose_reply_cannot_fit_is_refused_before_the_work() {
    let env = TestEnv::start().await;
    let service = env.service(&[]).await;
    let client = env.client(Format::Protobuf).await;
    let items: HashMap<String, String> = (0..12_000)
        .map(|index| (format!("item-{index:05}"), "x".to_owned()))
        .collect();
    let error = client.encrypt_bulk("ws_1/many", items).await.unwrap_err();
    assert_eq!(error.kind(), Kind::PayloadTooLarge, "{error}");
    assert!(error.message().contains("at least"), "{error}");
    assert!(error.message().contains("max_payload"), "{error}");
    client.encrypt("ws_1/many", "still serving").await.unwrap();

    // Just under the bound, the call goes through.
    let items: HashMap<String, String> = (0..5_000)
        .map(|index| (format!("item-{index:05}"), "x".to_owned()))
        .collect();
    assert_eq!(
        client
            .encrypt_bulk("ws_1/many", items)
            .await
            .unwrap()
            .items
            .len(),
        5_000
    );
    service.shutdown().await.unwrap();
}

/// A reply larger than the nats-server's `max_payload` cannot be sent: the caller gets
/// `payload_too_large` at once rather than waiting for its timeout. A Decrypt in JSON of a
/// plaintext of control characters makes one (each escaped as six characters).
#[tokio::test]
async fn a_reply_over_max_payload_becomes_payload_too_large() {
    let logs = common::service::CapturedLogs::start();
    let env = TestEnv::start().await;
    let service = env.service(&[]).await;
    let protobuf = env.client(Format::Protobuf).await;
    let json = env.client(Format::Json).await;
    let plaintext = "\u{1}".repeat(200_000);
    let sealed = protobuf.encrypt("ws_1/escaped", &plaintext).await.unwrap();
    let error = json
        .decrypt("ws_1/escaped", &sealed.encrypted)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), Kind::PayloadTooLarge, "{error}");
    assert!(error.message().contains("max_payload"), "{error}");
    json.encrypt("ws_1/escaped", "still serving").await.unwrap();

    // The endpoint's statistics count the call once, as the error it ended in.
    let decrypt = common::service::endpoint_stats(json.nats(), "Decrypt").await;
    assert_eq!(decrypt["num_requests"], 1, "{decrypt}");
    assert_eq!(decrypt["num_errors"], 1, "{decrypt}");
    // Only the code: anyone on the nats account may read the statistics.
    assert_eq!(decrypt["last_error"], "413:payload_too_large", "{decrypt}");
    // The audit log line says what the caller got, as the audit subject does: it is written
    // once the reply's fate is known, not when the operation succeeded.
    let text = logs.text();
    let decrypt_lines: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("ringvault::audit") && line.contains("action=\"decrypt\""))
        .collect();
    assert_eq!(decrypt_lines.len(), 1, "{text}");
    assert!(decrypt_lines[0].contains("outcome=\"error\""), "{text}");
    assert!(
        decrypt_lines[0].contains("error_code=\"payload_too_large\""),
        "{text}"
    );
    service.shutdown().await.unwrap();
}

/// An error that quotes what the caller sent stays short in the reply's header and body.
#[tokio::test]
async fn an_error_quoting_a_huge_item_id_is_cut() {
    let env = TestEnv::start().await;
    let service = env.service(&[]).await;
    let client = env.client(Format::Json).await;
    let items = HashMap::from([("x".repeat(200_000), "not an envelope".to_owned())]);
    let error = client.decrypt_bulk("ws_1/cut", items).await.unwrap_err();
    assert_eq!(error.kind(), Kind::InvalidArgument, "{error}");
    assert!(error.message().contains("xxxx"), "{error}");
    assert!(
        error.message().chars().count() <= ringvault::protocol::MAX_ERROR_MESSAGE_CHARS + 1,
        "{} chars",
        error.message().len()
    );
    service.shutdown().await.unwrap();
}
