//! Key events on NATS (and JetStream), rotation seen by every replica, scheduled rotation,
//! DescribeKeyring, and service discovery.

use crate::common;

use std::time::Duration;

use common::service::{eventually, TestEnv};
use futures::StreamExt as _;
use ringvault::protocol::{
    keyring_token, DekCause, DekCreated, DescribeKeyringRequest, DescribeKeyringResponse, Format,
    Method,
};

async fn next_event(subscriber: &mut async_nats::Subscriber) -> (String, DekCreated, String) {
    let message = tokio::time::timeout(Duration::from_secs(5), subscriber.next())
        .await
        .expect("an event within 5 s")
        .expect("subscription open");
    let msg_id = message
        .headers
        .as_ref()
        .and_then(|headers| headers.get("Nats-Msg-Id"))
        .map(|value| value.as_str().to_owned())
        .expect("Nats-Msg-Id header");
    let event: DekCreated = serde_json::from_slice(&message.payload).expect("documented payload");
    (message.subject.to_string(), event, msg_id)
}

#[tokio::test]
async fn a_subscriber_receives_dek_created_for_first_use_and_rotation() {
    let env = TestEnv::start().await;
    let _server = env.service(&[]).await;
    let client = env.client(Format::Protobuf).await;
    let watcher = async_nats::connect(env.nats.url()).await.unwrap();
    let mut all = watcher.subscribe("vault.v1.events.>").await.unwrap();
    watcher.flush().await.unwrap();

    let keyring = "org/team.a";
    let first = client.encrypt(keyring, "x").await.unwrap();
    let (subject, event, msg_id) = next_event(&mut all).await;
    assert_eq!(
        subject,
        format!("vault.v1.events.{}.dek.created", keyring_token(keyring))
    );
    assert_eq!(subject, "vault.v1.events.org/team%2Ea.dek.created");
    assert_eq!(event.version, 1);
    assert_eq!(event.keyring, keyring);
    assert_eq!(event.key_id, first.key_id);
    assert_eq!(event.previous_key_id, None);
    assert_eq!(event.cause, DekCause::FirstUse);
    assert_eq!(msg_id, format!("dek.created:{keyring}:{}", first.key_id));

    let rotated = client.rotate(keyring).await.unwrap();
    let (_, event, _) = next_event(&mut all).await;
    assert_eq!(event.key_id, rotated.key_id);
    assert_eq!(
        event.previous_key_id.as_deref(),
        Some(first.key_id.as_str())
    );
    assert_eq!(event.cause, DekCause::Manual);

    // Cache hits publish nothing: the next event after them is the next rotation's.
    for _ in 0..5 {
        client.encrypt(keyring, "y").await.unwrap();
    }
    let again = client.rotate(keyring).await.unwrap();
    let (_, event, _) = next_event(&mut all).await;
    assert_eq!(
        event.key_id, again.key_id,
        "an event came from a cached encrypt"
    );
}

#[tokio::test]
async fn with_jetstream_a_subscriber_that_was_away_replays_what_it_missed() {
    let env = TestEnv {
        nats: common::NatsServer::start_jetstream().await,
        ..TestEnv::start().await
    };
    let _server = env
        .service(&[
            ("RINGVAULT_EVENTS_JETSTREAM", "true"),
            ("RINGVAULT_EVENTS_STREAM", "RV_EVENTS"),
        ])
        .await;
    let client = env.client(Format::Protobuf).await;
    let nats = async_nats::connect(env.nats.url()).await.unwrap();
    let jetstream = async_nats::jetstream::new(nats);
    let stream = jetstream.get_stream("RV_EVENTS").await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("auditor".into()),
            ..Default::default()
        })
        .await
        .unwrap();

    // The subscriber reads one event, goes away, and misses two.
    client.encrypt("ws_js", "a").await.unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let first = messages.next().await.unwrap().unwrap();
    first.ack().await.unwrap();
    drop(messages);
    let rotated = client.rotate("ws_js").await.unwrap();
    client.encrypt("ws_js_2", "b").await.unwrap();

    // Back: the durable consumer replays exactly the missed ones.
    let mut messages = consumer.messages().await.unwrap();
    let mut missed = Vec::new();
    for _ in 0..2 {
        let message = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let event: DekCreated = serde_json::from_slice(&message.payload).unwrap();
        message.ack().await.unwrap();
        missed.push(event);
    }
    assert_eq!(missed[0].key_id, rotated.key_id);
    assert_eq!(missed[1].keyring, "ws_js_2");
}

/// A stream the operator made (here: in memory, with its own description and a subject
/// covering the events') keeps what is theirs; ringvault only brings its retention to the configuration.
/// An existing stream whose subjects take in the request subjects (`vault.v1.>`) is refused at
/// start: JetStream would acknowledge every request in the service's place and keep bodies
/// and bearer tokens for its retention.
#[tokio::test]
async fn an_existing_stream_over_the_request_subjects_is_refused() {
    let env = TestEnv {
        nats: common::NatsServer::start_jetstream().await,
        ..TestEnv::start().await
    };
    let nats = async_nats::connect(env.nats.url()).await.unwrap();
    async_nats::jetstream::new(nats.clone())
        .create_stream(async_nats::jetstream::stream::Config {
            name: "EVERYTHING".into(),
            subjects: vec!["vault.v1.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let config = env.config(&[
        ("RINGVAULT_EVENTS_JETSTREAM", "true"),
        ("RINGVAULT_EVENTS_STREAM", "EVERYTHING"),
    ]);
    match ringvault::server::Server::start(&config, nats).await {
        Ok(server) => {
            let _ = server.shutdown().await;
            panic!("started with a stream over the request subjects");
        }
        Err(error) => assert!(error.to_string().contains("captures"), "{error}"),
    }
}

#[tokio::test]
async fn an_existing_event_stream_keeps_the_operator_s_settings() {
    use async_nats::jetstream::stream::{Config, StorageType};

    let env = TestEnv {
        nats: common::NatsServer::start_jetstream().await,
        ..TestEnv::start().await
    };
    let nats = async_nats::connect(env.nats.url()).await.unwrap();
    let jetstream = async_nats::jetstream::new(nats);
    jetstream
        .create_stream(Config {
            name: "OPS_EVENTS".into(),
            subjects: vec!["vault.*.events.>".into()],
            storage: StorageType::Memory,
            description: Some("made by the operator".into()),
            max_messages: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let server = env
        .service(&[
            ("RINGVAULT_EVENTS_JETSTREAM", "true"),
            ("RINGVAULT_EVENTS_STREAM", "OPS_EVENTS"),
            ("RINGVAULT_EVENTS_MAX_MESSAGES", "5000"),
        ])
        .await;
    let mut stream = jetstream.get_stream("OPS_EVENTS").await.unwrap();
    let config = stream.info().await.unwrap().config.clone();
    assert_eq!(config.storage, StorageType::Memory);
    assert_eq!(config.description.as_deref(), Some("made by the operator"));
    assert_eq!(
        config.subjects,
        ["vault.*.events.>"],
        "no overlapping subject added"
    );
    assert_eq!(
        config.max_messages, 5000,
        "retention follows the configuration"
    );

    let client = env.client(Format::Protobuf).await;
    client.encrypt("ws_ops", "x").await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || {
            let mut stream = stream.clone();
            async move { stream.info().await.unwrap().state.messages >= 1 }
        })
        .await,
        "the first-use event is captured"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_rotation_on_one_replica_reaches_the_others() {
    let env = TestEnv::start().await;
    let first = env.service(&[]).await;
    let second = env.service(&[]).await;
    let client = env.client(Format::Protobuf).await;
    let keyring = "ws_spread";
    let original = client.encrypt(keyring, "warm").await.unwrap();
    // Warm both replicas' caches through the queue group.
    assert!(
        eventually(Duration::from_secs(10), || async {
            client.encrypt(keyring, "warm").await.unwrap();
            first.keyrings().peek_latest(keyring).is_some()
                && second.keyrings().peek_latest(keyring).is_some()
        })
        .await,
        "both replicas cache the keyring"
    );
    let rotated = client.rotate(keyring).await.unwrap();
    assert_ne!(rotated.key_id, original.key_id);
    let started = std::time::Instant::now();
    assert!(
        eventually(Duration::from_secs(10), || async {
            [&first, &second].iter().all(|server| {
                server
                    .keyrings()
                    .peek_latest(keyring)
                    .is_some_and(|dek| dek.id() == rotated.key_id)
            })
        })
        .await,
        "every replica uses the new key within 10 s"
    );
    eprintln!(
        "rotation applied on both replicas after {:?}",
        started.elapsed()
    );
    for _ in 0..20 {
        assert_eq!(
            client.encrypt(keyring, "after").await.unwrap().key_id,
            rotated.key_id
        );
    }
}

/// A rotation announced while this replica's NATS connection was down never reaches it as an
/// event: once the connection is back, its cached keyrings read LATEST again on their next use
/// instead of keeping the old key for up to `fresh_for` (an hour).
#[tokio::test]
async fn a_rotation_missed_while_nats_was_away_is_read_after_the_reconnection() {
    let mut env = TestEnv::start().await;
    let server = env.service(&[]).await;
    let client = env.client(Format::Protobuf).await;
    let keyring = "ws_missed";
    let first = client.encrypt(keyring, "warm").await.unwrap();
    env.nats.kill().await;
    // As another replica would while this one cannot hear its event.
    let rotated = rotate_unannounced(&env, keyring).await;
    assert_ne!(rotated.dek.id(), first.key_id);
    env.nats.restart().await;
    // The client and the service reconnect on their own.
    assert!(
        eventually(Duration::from_secs(15), || async {
            matches!(
                client.encrypt(keyring, "after").await,
                Ok(reply) if reply.key_id == rotated.dek.id()
            )
        })
        .await,
        "after the reconnection, encrypt uses the key rotated meanwhile"
    );
    server.shutdown().await.unwrap();
}

/// Rotates `keyring` in the test's store behind the service's back, with no announcement: as
/// another replica whose event was lost would.
async fn rotate_unannounced(env: &TestEnv, keyring: &str) -> ringvault::keyring::Rotation {
    let master_keys = ringvault::crypto::MasterKeys::new(
        ringvault::crypto::Kek::parse(&env.master_key).unwrap(),
        [],
    )
    .unwrap();
    let store = common::service::local_keyrings(&env.store_path(), master_keys);
    store.rotate(keyring).await.unwrap()
}

/// The JSON of the `dek.created` event another replica would publish for `rotated`.
fn dek_created_from_elsewhere(
    keyring: &str,
    rotated: &ringvault::keyring::Rotation,
    previous_key_id: &str,
) -> Vec<u8> {
    serde_json::to_vec(&DekCreated {
        version: ringvault::protocol::EVENT_VERSION,
        keyring: keyring.into(),
        key_id: rotated.dek.id().to_owned(),
        previous_key_id: Some(previous_key_id.to_owned()),
        cause: DekCause::Manual,
        time: 0,
        replica: "elsewhere".into(),
    })
    .unwrap()
}

/// A key event is applied only when its subject is its keyring's: NATS permissions are per
/// subject, and a publisher allowed one keyring's subject must not reach another by naming it
/// in the payload.
#[tokio::test]
async fn a_key_event_on_another_keyring_s_subject_is_ignored() {
    let env = TestEnv::start().await;
    let server = env.service(&[]).await;
    let client = env.client(Format::Protobuf).await;
    let first = client.encrypt("ws_target", "warm").await.unwrap();
    let rotated = rotate_unannounced(&env, "ws_target").await;
    assert_ne!(rotated.dek.id(), first.key_id);
    let barrier_first = client.encrypt("ws_barrier", "warm").await.unwrap();
    let barrier = rotate_unannounced(&env, "ws_barrier").await;

    let nats = async_nats::connect(env.nats.url()).await.unwrap();
    let payload = dek_created_from_elsewhere("ws_target", &rotated, &first.key_id);
    let on_subject = |keyring: &str| {
        ringvault::protocol::event_subject("vault.v1", keyring, ringvault::protocol::DEK_CREATED)
    };
    nats.publish(on_subject("ws_other"), payload.clone().into())
        .await
        .unwrap();
    // A barrier: a proper event behind it. Events are handled in the order they arrive, so
    // once this one is applied the one before it has been handled too.
    nats.publish(
        on_subject("ws_barrier"),
        dek_created_from_elsewhere("ws_barrier", &barrier, &barrier_first.key_id).into(),
    )
    .await
    .unwrap();
    nats.flush().await.unwrap();
    let applied = |keyring: &'static str| {
        server
            .keyrings()
            .peek_latest(keyring)
            .unwrap()
            .id()
            .to_owned()
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            applied("ws_barrier") == barrier.dek.id()
        })
        .await,
        "the barrier event is applied"
    );
    // Room for a reload the ignored event would have scheduled (they run 100 ms apart).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        applied("ws_target"),
        first.key_id,
        "applied from another keyring's subject"
    );

    nats.publish(on_subject("ws_target"), payload.into())
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            applied("ws_target") == rotated.dek.id()
        })
        .await,
        "the event on its own subject is applied"
    );
    server.shutdown().await.unwrap();
}

/// An event from a newer replica (a cause this one does not know, a field it has not heard of)
/// is still applied: in a rolling upgrade, the older replicas must not drop it as malformed.
#[tokio::test]
async fn a_key_event_from_a_newer_replica_is_applied() {
    let env = TestEnv::start().await;
    let server = env.service(&[]).await;
    let client = env.client(Format::Protobuf).await;
    let first = client.encrypt("ws_newer", "warm").await.unwrap();
    let rotated = rotate_unannounced(&env, "ws_newer").await;
    let mut event: serde_json::Value = serde_json::from_slice(&dek_created_from_elsewhere(
        "ws_newer",
        &rotated,
        &first.key_id,
    ))
    .unwrap();
    event["cause"] = "reseal".into();
    event["shard"] = 7.into();
    publish_dek_created(&env, "ws_newer", serde_json::to_vec(&event).unwrap()).await;
    assert!(
        comes_to_cache(&server, "ws_newer", rotated.dek.id()).await,
        "the event was applied"
    );
    server.shutdown().await.unwrap();
}

/// Publishes `payload` on `keyring`'s `dek.created` subject, as another replica would.
async fn publish_dek_created(env: &TestEnv, keyring: &str, payload: Vec<u8>) {
    let nats = async_nats::connect(env.nats.url()).await.unwrap();
    let subject =
        ringvault::protocol::event_subject("vault.v1", keyring, ringvault::protocol::DEK_CREATED);
    nats.publish(subject, payload.into()).await.unwrap();
    nats.flush().await.unwrap();
}

/// Whether `server` caches `key_id` as `keyring`'s LATEST within 10 s.
async fn comes_to_cache(server: &ringvault::server::Server, keyring: &str, key_id: &str) -> bool {
    eventually(Duration::from_secs(10), || async {
        server
            .keyrings()
            .peek_latest(keyring)
            .is_some_and(|dek| dek.id() == key_id)
    })
    .await
}

/// A keyring actor that fails while it holds a key event's reload loses that reload with its
/// mailbox; the reload is handed to a fresh actor, so the event still leads to a read of
/// storage (without waiting for another event or the cache's freshness to run out).
#[tokio::test]
async fn a_key_event_whose_actor_fails_is_still_followed_by_a_read() {
    let env = TestEnv::start().await;
    let server = env.service(&[]).await;
    let client = env.client(Format::Protobuf).await;
    let first = client.encrypt("ws_lost", "warm").await.unwrap();
    let rotated = rotate_unannounced(&env, "ws_lost").await;

    // The actor fails on the next message it handles: the event's reload.
    *server.hooks().faults.fail_keyring_actor.lock().unwrap() = Some("ws_lost".to_owned());
    publish_dek_created(
        &env,
        "ws_lost",
        dek_created_from_elsewhere("ws_lost", &rotated, &first.key_id),
    )
    .await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            server
                .hooks()
                .faults
                .fail_keyring_actor
                .lock()
                .unwrap()
                .is_none()
        })
        .await,
        "the fault was not hit"
    );
    assert!(
        comes_to_cache(&server, "ws_lost", rotated.dek.id()).await,
        "the new key was not read after the actor failed"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn scheduled_rotation_happens_once_across_two_replicas() {
    let env = TestEnv::start().await;
    let schedule = [
        ("RINGVAULT_ROTATION_ROTATE_AFTER_SECS", "3"),
        ("RINGVAULT_ROTATION_CHECK_INTERVAL_SECS", "1"),
    ];
    let first = env.service(&schedule).await;
    let second = env.service(&schedule).await;
    let client = env.client(Format::Protobuf).await;
    let watcher = async_nats::connect(env.nats.url()).await.unwrap();
    let mut events = watcher
        .subscribe("vault.v1.events.ws_sched.>")
        .await
        .unwrap();
    watcher.flush().await.unwrap();
    let original = client.encrypt("ws_sched", "x").await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            client.encrypt("ws_sched", "warm").await.unwrap();
            first.keyrings().peek_latest("ws_sched").is_some()
                && second.keyrings().peek_latest("ws_sched").is_some()
        })
        .await
    );
    let (_, created, _) = next_event(&mut events).await;
    assert_eq!(created.cause, DekCause::FirstUse);
    // Within the next ~5 s exactly one scheduled rotation happens (the next is due 3 s later).
    let (_, scheduled, _) = tokio::time::timeout(Duration::from_secs(6), next_event(&mut events))
        .await
        .unwrap();
    assert_eq!(scheduled.cause, DekCause::Scheduled);
    assert_eq!(
        scheduled.previous_key_id.as_deref(),
        Some(original.key_id.as_str())
    );
    // The other replica must not rotate the same LATEST again. On a loaded machine the next
    // period's rotation may already fall in this window; it must then follow the first (its
    // previous key is the first's new key) and come a whole period later.
    let mut last = scheduled;
    let mut later_rotations = 0;
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(1500), events.next()).await
    {
        let event: DekCreated = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(event.cause, DekCause::Scheduled, "{event:?}");
        assert_eq!(
            event.previous_key_id.as_deref(),
            Some(last.key_id.as_str()),
            "a second rotation of the same key: {event:?} after {last:?}"
        );
        assert!(
            event.time - last.time >= 2_900,
            "rotated again before the period was over: {event:?} after {last:?}"
        );
        last = event;
        later_rotations += 1;
    }
    let dek_files = common::service::files_under(&env.store_path().join("keyring/ws_sched"))
        .into_iter()
        .filter(|path| path.file_name().unwrap() != "LATEST")
        .count();
    // The first key and one per scheduled rotation, plus at most one per rotation from the
    // replica that lost the conditional write of LATEST (its key stays stored, unused).
    let rotations = 1 + later_rotations;
    assert!(
        (1 + rotations..=1 + 2 * rotations).contains(&dek_files),
        "{dek_files} keys after {rotations} scheduled rotations"
    );
}

#[tokio::test]
async fn describe_keyring_lists_keys_without_material() {
    let env = TestEnv::start().await;
    let _server = env.service(&[]).await;
    let client = env.client(Format::Json).await;
    let first = client.encrypt("ws_desc", "x").await.unwrap();
    // A deeper keyring shares the prefix but is not listed.
    client.encrypt("ws_desc/inner", "x").await.unwrap();
    let second = client.rotate("ws_desc").await.unwrap();
    let described: DescribeKeyringResponse = client
        .call(
            Method::DescribeKeyring,
            &DescribeKeyringRequest {
                keyring: "ws_desc".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(described.count, 2);
    assert_eq!(described.latest_key_id, second.key_id);
    let ids: Vec<&str> = described
        .keys
        .iter()
        .map(|key| key.key_id.as_str())
        .collect();
    assert_eq!(ids, [first.key_id.as_str(), second.key_id.as_str()]);
    assert!(described.keys.iter().all(|key| key.created_at > 0));
}

#[tokio::test]
async fn discovery_lists_every_endpoint_and_counts_requests() {
    let env = TestEnv::start().await;
    let _server = env.service(&[]).await;
    let client = env.client(Format::Protobuf).await;
    client.liveness().await.unwrap();
    client.encrypt("ws_srv", "x").await.unwrap();
    let nats = async_nats::connect(env.nats.url()).await.unwrap();
    let info = nats
        .request("$SRV.INFO.ringvault", "".into())
        .await
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.payload).unwrap();
    let subjects: Vec<&str> = info["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|endpoint| endpoint["subject"].as_str().unwrap())
        .collect();
    for method in Method::ALL {
        assert!(
            subjects.contains(&method.subject("vault.v1").as_str()),
            "{subjects:?}"
        );
    }
    let encrypt = common::service::endpoint_stats(&nats, "Encrypt").await;
    assert!(encrypt["num_requests"].as_u64().unwrap() >= 1, "{encrypt}");
}

/// `ringvault roll-deks` on the file store under `dir/store`, with NATS unreachable (the
/// announcement is only a note), the master key given as `key_variable` (`…_CURRENT` or
/// `…_PREVIOUS`) and run from `dir`.
fn roll_deks_in(dir: &std::path::Path, key_variable: &str) -> std::process::Output {
    roll_deks_with(dir, key_variable, &[])
}

/// [`roll_deks_in`] with `settings` in its environment as well.
fn roll_deks_with(
    dir: &std::path::Path,
    key_variable: &str,
    settings: &[(&str, &str)],
) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ringvault"))
        .envs(settings.iter().copied())
        .arg("roll-deks")
        .current_dir(dir)
        .env_remove("RINGVAULT_CONFIG")
        .env("RINGVAULT_NATS_URL", "nats://127.0.0.1:1")
        .env("RINGVAULT_STORAGE_PATH", dir.join("store"))
        .env(
            key_variable,
            ringvault::crypto::Kek::generate().to_base64().as_str(),
        )
        .output()
        .unwrap()
}

/// A roll run where the current master key is missing (only `previous` configured, no key
/// file) stops with a configuration error: it never makes up a key and re-seals the store with
/// it, which would lock every replica out of the keys it does not hold in memory.
#[test]
fn roll_deks_never_generates_a_master_key() {
    let dir = tempfile::tempdir().unwrap();
    let output = roll_deks_in(dir.path(), "RINGVAULT_MASTER_KEY_PREVIOUS");
    assert_eq!(output.status.code(), Some(64), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no master key"),
        "{output:?}"
    );
    assert!(
        !dir.path().join("data/master.key").exists(),
        "roll-deks generated a master key"
    );
}

/// A roll pointed at a file store that is not there (run from the wrong directory) refuses
/// instead of creating an empty store and reporting nothing left to roll.
#[test]
fn roll_deks_refuses_a_file_store_that_is_not_there() {
    let dir = tempfile::tempdir().unwrap();
    let output = roll_deks_in(dir.path(), "RINGVAULT_MASTER_KEY_CURRENT");
    assert_eq!(output.status.code(), Some(69), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no store at"),
        "{output:?}"
    );
    assert!(
        !dir.path().join("store").exists(),
        "roll-deks created the store"
    );
}

/// A roll of a store that holds no keys (the wrong path or bucket, the memory backend) is not
/// a success: it re-sealed nothing, and a script that drops the old master key after a clean
/// roll would lock the real store's keys away.
#[test]
fn roll_deks_of_a_store_without_keys_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("store")).unwrap();
    let output = roll_deks_in(dir.path(), "RINGVAULT_MASTER_KEY_CURRENT");
    assert_eq!(output.status.code(), Some(66), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("holds no keys"), "{output:?}");
    assert!(!stderr.contains("does not compare versions"), "{output:?}");
}

/// On a store that does not compare versions, the roll says so: its safety there depends on
/// no rotation landing meanwhile, and roll-deks writes no log for the probe's warning.
#[test]
fn roll_deks_warns_of_a_store_without_compare_and_swap() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("store")).unwrap();
    let output = roll_deks_with(
        dir.path(),
        "RINGVAULT_MASTER_KEY_CURRENT",
        &[("RINGVAULT_STORAGE_CONDITIONAL_WRITES", "false")],
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("does not compare versions"),
        "{output:?}"
    );
}

/// A roll that leaves objects behind exits with the code of its gravest failure (sysexits, as
/// README lists them): here an object that is no key at all, `internal`.
#[test]
fn roll_deks_exits_with_the_code_of_its_gravest_failure() {
    let dir = tempfile::tempdir().unwrap();
    let ring = dir.path().join("store/keyring/ws_1");
    std::fs::create_dir_all(&ring).unwrap();
    std::fs::write(ring.join("dek_garbage"), b"not protobuf \xff").unwrap();
    let output = roll_deks_in(dir.path(), "RINGVAULT_MASTER_KEY_CURRENT");
    assert_eq!(output.status.code(), Some(70), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("dek_garbage"),
        "{output:?}"
    );
}

#[tokio::test]
async fn roll_deks_publishes_kek_rolled_with_its_counts() {
    let env = TestEnv::start().await;
    let server = env.service(&[]).await;
    let client = env.client(Format::Protobuf).await;
    client.encrypt("ws_roll_a", "x").await.unwrap();
    client.encrypt("ws_roll_b", "y").await.unwrap();
    server.shutdown().await.unwrap();

    // The announcement goes through a NATS that refuses anonymous clients: roll-deks connects
    // with the configured credentials, as the service does.
    const NATS_TOKEN: &str = "roll-deks-nats-token";
    let secured = common::NatsServer::start_with_token(NATS_TOKEN).await;
    let watcher = async_nats::ConnectOptions::with_token(NATS_TOKEN.into())
        .connect(secured.url())
        .await
        .unwrap();
    let mut rolled = watcher
        .subscribe("vault.v1.events.%.kek.rolled")
        .await
        .unwrap();
    watcher.flush().await.unwrap();
    let new_key = ringvault::crypto::Kek::generate();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_ringvault"))
        .arg("roll-deks")
        .env("RINGVAULT_NATS_URL", secured.url())
        .env("RINGVAULT_NATS_TOKEN", NATS_TOKEN)
        .env("RINGVAULT_STORAGE_PATH", env.store_path())
        .env("RINGVAULT_MASTER_KEY_CURRENT", new_key.to_base64().as_str())
        .env("RINGVAULT_MASTER_KEY_PREVIOUS", &env.master_key)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("re-sealed"), "summary table: {stdout}");
    let message = tokio::time::timeout(Duration::from_secs(5), rolled.next())
        .await
        .unwrap()
        .unwrap();
    let event: ringvault::protocol::KekRolled = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(event.version, 1);
    assert_eq!(event.kek_id, new_key.id());
    assert_eq!((event.scanned, event.resealed, event.failed), (4, 4, 0));
    assert!(message.headers.unwrap().get("Nats-Msg-Id").is_some());
}
