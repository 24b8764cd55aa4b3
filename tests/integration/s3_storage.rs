//! ringvault on a real S3 server (s3s-fs): startup checks of the bucket, conditional writes
//! between two instances racing a keyring's first use, a bucket larger than one listing page
//! through the master-key roll, and the store going away and coming back under a running
//! service.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use prost::Message as _;

use common::service::{eventually, files_under, TestEnv};
use common::{free_port, S3Server};
use ringvault::client::Client;
use ringvault::crypto::{Dek, Kek, MasterKeys};
use ringvault::keyring::{roll_deks, CachePolicy, KeyringStore, Keyrings};
use ringvault::protocol::{
    decode_envelope, encode_envelope, Encrypted, EncryptedDataEncryptionKey, Format,
};
use ringvault::server::{Server, ServerError};
use ringvault::storage::{
    dek_key, latest_key, ObjectStoreBackend, PutCondition, S3Settings, Storage, StorageError,
    StoragePolicy,
};
use ringvault::Kind;

/// Storage budget of the services in these tests: short, so that outages are quick to see.
const STORAGE_TIMEOUT_MS: &str = "1500";

fn s3_settings(s3: &S3Server) -> S3Settings {
    S3Settings {
        endpoint: s3.endpoint(),
        region: s3.region().to_owned(),
        bucket: s3.bucket().to_owned(),
        access_key_id: s3.access_key().to_owned(),
        secret_access_key: s3.secret_key().to_owned(),
        conditional_writes: true,
        ..S3Settings::default()
    }
}

/// A storage handle straight on the bucket, without a service.
fn direct_storage(s3: &S3Server) -> Storage {
    storage_with(&s3_settings(s3))
}

/// A storage handle on the bucket `settings` name, with those settings.
fn storage_with(settings: &S3Settings) -> Storage {
    let backend = ObjectStoreBackend::s3(settings, Duration::from_secs(10)).unwrap();
    Storage::new(
        Arc::new(backend),
        StoragePolicy {
            timeout: Duration::from_secs(20),
            ..StoragePolicy::default()
        },
    )
}

/// A store that refuses our credentials refuses every call the same way: the call fails as
/// `Refused` at once (and says so in the logs) instead of being retried until its budget runs out
/// and reported as a timeout.
#[tokio::test]
async fn refused_credentials_are_not_retried_as_an_outage() {
    let s3 = S3Server::start().await;
    let storage = storage_with(&S3Settings {
        secret_access_key: "not-the-secret".into(),
        ..s3_settings(&s3)
    });
    let got = storage.get("keyring/ws_1/LATEST").await.unwrap_err();
    assert!(
        matches!(
            got,
            StorageError::Refused {
                operation: "get",
                ..
            }
        ),
        "{got:?}"
    );
    let put = storage
        .put(
            "keyring/ws_1/LATEST",
            Bytes::from_static(b"x"),
            PutCondition::IfAbsent,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            put,
            StorageError::Refused {
                operation: "put",
                ..
            }
        ),
        "{put:?}"
    );
    let listed = storage
        .list("keyring/")
        .try_collect::<Vec<_>>()
        .await
        .unwrap_err();
    assert!(
        matches!(
            listed,
            StorageError::Refused {
                operation: "list",
                ..
            }
        ),
        "{listed:?}"
    );
    let caller_sees = ringvault::Error::from(put);
    assert_eq!(caller_sees.kind(), Kind::Unavailable);
    assert_no_secrets(&caller_sees, &s3);
}

/// An existing bucket may hold keyrings whose names ringvault would not accept (Unkey's Vault
/// takes any string): the roll re-seals them too, addressing each object as the store lists it.
#[tokio::test]
async fn roll_deks_accounts_for_objects_of_keyrings_ringvault_would_not_name() {
    let s3 = S3Server::start().await;
    let storage = direct_storage(&s3);
    let old_kek = Kek::generate().to_base64().to_string();
    let new_kek = Kek::generate().to_base64().to_string();
    let keyrings = Keyrings::new(
        KeyringStore::new(storage.clone(), master_keys(&old_kek, &[])),
        CachePolicy::default(),
    );
    let dek = keyrings.latest("ws_plain").await.unwrap();
    // The same sealed key under a keyring named with characters outside ringvault's rule.
    let bucket = s3.bucket_dir();
    let sealed = std::fs::read(bucket.join("keyring/ws_plain/LATEST")).unwrap();
    let odd = bucket.join("keyring/ws#odd name");
    std::fs::create_dir_all(&odd).unwrap();
    std::fs::write(odd.join("LATEST"), &sealed).unwrap();
    std::fs::write(odd.join(dek.id()), &sealed).unwrap();

    let rolling = KeyringStore::new(storage.clone(), master_keys(&new_kek, &[&old_kek]));
    let report = roll_deks(&rolling, |_| {}).await.unwrap();
    eprintln!("{report:?}");
    assert_eq!(report.scanned, 4, "{report:?}");
    assert_eq!(report.resealed, 4, "{:?}", report.failures);
    let new_kek_id = Kek::parse(&new_kek).unwrap().id().to_owned();
    for path in [odd.join("LATEST"), odd.join(dek.id())] {
        let stored =
            EncryptedDataEncryptionKey::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
        assert_eq!(
            stored.encrypted.unwrap().encryption_key_id,
            new_kek_id,
            "{}",
            path.display()
        );
    }
}

fn master_keys(current: &str, previous: &[&str]) -> Arc<MasterKeys> {
    let previous: Vec<Kek> = previous
        .iter()
        .map(|text| Kek::parse(text).unwrap())
        .collect();
    Arc::new(MasterKeys::new(Kek::parse(current).unwrap(), previous).unwrap())
}

/// The file names under `<bucket>/keyring/<ring>/` (LATEST and the DEK ids), sorted.
fn ring_files(bucket_dir: &Path, ring: &str) -> Vec<String> {
    let dir = bucket_dir.join("keyring").join(ring);
    let mut names: Vec<String> = files_under(&dir)
        .iter()
        .map(|path| {
            path.strip_prefix(&dir)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Asserts that the keyring holds exactly LATEST and one DEK object with the same bytes, and
/// returns that DEK's id.
fn assert_one_dek(bucket_dir: &Path, ring: &str) -> String {
    let files = ring_files(bucket_dir, ring);
    let deks: Vec<&String> = files.iter().filter(|name| *name != "LATEST").collect();
    assert!(
        files.iter().any(|name| name == "LATEST") && deks.len() == 1,
        "keyring {ring}: expected LATEST and exactly one DEK object, found {files:?}"
    );
    assert!(deks[0].starts_with("dek_"), "{files:?}");
    let dir = bucket_dir.join("keyring").join(ring);
    assert_eq!(
        std::fs::read(dir.join("LATEST")).unwrap(),
        std::fs::read(dir.join(deks[0])).unwrap(),
        "keyring {ring}: LATEST is a byte copy of its DEK object"
    );
    deks[0].clone()
}

/// Asserts that an error a caller sees names no endpoint and no credential.
fn assert_no_secrets(error: &ringvault::Error, s3: &S3Server) {
    let text = format!("{error} / {}", error.message());
    for secret in ["127.0.0.1", "http", s3.access_key(), s3.secret_key()] {
        assert!(
            !text.contains(secret),
            "the error a caller sees contains {secret:?}: {text}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Startup
// ---------------------------------------------------------------------------------------------

async fn start_fails_unavailable(env: &TestEnv, what: &str, extra: &[(&str, &str)]) {
    let config = env.config(extra);
    let nats = async_nats::connect(env.nats.url()).await.unwrap();
    let started = Instant::now();
    let outcome = Server::start(&config, nats).await;
    let elapsed = started.elapsed();
    let error = match outcome {
        Ok(server) => {
            let _ = server.shutdown().await;
            panic!("{what}: the service started");
        }
        Err(error) => error,
    };
    assert!(
        matches!(error, ServerError::Unavailable(_)),
        "{what}: expected Unavailable, got {error:?}"
    );
    assert_eq!(error.exit_code(), 69, "{what}");
    assert!(
        elapsed < Duration::from_secs(10),
        "{what}: failing took {elapsed:?}"
    );
    let s3 = env.s3.as_ref().unwrap();
    let text = error.to_string();
    assert!(
        !text.contains(s3.secret_key()),
        "{what}: the startup error shows the secret key: {text}"
    );
    eprintln!("{what}: {text} ({elapsed:?})");
}

#[tokio::test]
async fn startup_refuses_a_missing_bucket_wrong_credentials_and_an_unreachable_endpoint() {
    let env = TestEnv::start_s3().await;
    start_fails_unavailable(
        &env,
        "missing bucket",
        &[
            ("RINGVAULT_STORAGE_S3_BUCKET", "nope"),
            ("RINGVAULT_STORAGE_TIMEOUT_MS", "1000"),
        ],
    )
    .await;
    start_fails_unavailable(
        &env,
        "wrong secret key",
        &[
            ("RINGVAULT_STORAGE_S3_SECRET_ACCESS_KEY", "not-the-secret"),
            ("RINGVAULT_STORAGE_TIMEOUT_MS", "1000"),
        ],
    )
    .await;
    start_fails_unavailable(
        &env,
        "unknown access key",
        &[
            ("RINGVAULT_STORAGE_S3_ACCESS_KEY_ID", "not-the-access-key"),
            ("RINGVAULT_STORAGE_TIMEOUT_MS", "1000"),
        ],
    )
    .await;
    let unreachable = format!("http://127.0.0.1:{}", free_port());
    start_fails_unavailable(
        &env,
        "unreachable endpoint",
        &[
            ("RINGVAULT_STORAGE_S3_ENDPOINT", unreachable.as_str()),
            ("RINGVAULT_STORAGE_TIMEOUT_MS", "1000"),
        ],
    )
    .await;
    // Nothing was created in the bucket by the failed starts, and the right settings work.
    assert!(
        files_under(&env.store_path()).is_empty(),
        "{:?}",
        files_under(&env.store_path())
    );
    let server = env
        .service(&[("RINGVAULT_STORAGE_TIMEOUT_MS", STORAGE_TIMEOUT_MS)])
        .await;
    let client = env.client(Format::Protobuf).await;
    let sealed = common::service::assert_round_trip(&client, "ws_start", "ok").await;
    assert_eq!(assert_one_dek(&env.store_path(), "ws_start"), sealed.key_id);
    server.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Conditional writes: two instances racing first use
// ---------------------------------------------------------------------------------------------
//
// s3s-fs 0.14.1 checks `If-None-Match: *` and then writes (temp file, rename) without a lock,
// so two PUTs racing on one key can both succeed; real S3 refuses the second. Where that
// happens the two instances each keep their own DEK (both stored, both decrypt). The checks
// below hold whatever the store's atomicity; where the instances agree, the loser got a real
// "already exists" from the store.

async fn open_on(server: &Server, ring: &str, envelope: &Encrypted) -> Vec<u8> {
    server
        .keyrings()
        .dek(ring, &envelope.encryption_key_id)
        .await
        .unwrap_or_else(|error| panic!("{ring}: {error}"))
        .open(envelope.clone())
        .unwrap_or_else(|error| panic!("{ring}: {error}"))
}

/// What two instances did racing the first use of 50 keyrings.
struct Race {
    env: TestEnv,
    /// Keyring, the DEK id instance one got, the DEK id instance two got.
    rings: Vec<(String, String, String)>,
}

/// Two instances on one NATS and one bucket call `latest` at once on each of 50 new keyrings;
/// every ciphertext either produced decrypts on both and through the queue group.
async fn race_first_use() -> Race {
    let env = TestEnv::start_s3().await;
    let config = [("RINGVAULT_STORAGE_TIMEOUT_MS", "5000")];
    let one = env.service(&config).await;
    let two = env.service(&config).await;
    let client = env.client(Format::Protobuf).await;
    let rings: Vec<String> = (0..50).map(|index| format!("ws_race_{index:02}")).collect();

    let raced = futures::future::join_all(rings.iter().map(|ring| {
        let (one, two) = (&one, &two);
        async move {
            let (a, b) = tokio::join!(one.keyrings().latest(ring), two.keyrings().latest(ring));
            let (a, b) = (
                a.unwrap_or_else(|error| panic!("{ring} on one: {error}")),
                b.unwrap_or_else(|error| panic!("{ring} on two: {error}")),
            );
            (ring.clone(), a, b)
        }
    }))
    .await;

    let mut sealed = Vec::new();
    for (ring, a, b) in &raced {
        sealed.push((ring.clone(), a.seal(format!("{ring} by one").as_bytes())));
        sealed.push((ring.clone(), b.seal(format!("{ring} by two").as_bytes())));
    }
    for (index, (ring, envelope)) in sealed.iter().enumerate() {
        let expected = format!("{ring} by {}", if index % 2 == 0 { "one" } else { "two" });
        assert_eq!(open_on(&one, ring, envelope).await, expected.as_bytes());
        assert_eq!(open_on(&two, ring, envelope).await, expected.as_bytes());
        let opened = client
            .decrypt(ring, &encode_envelope(envelope))
            .await
            .unwrap_or_else(|error| panic!("{ring}: {error}"));
        assert_eq!(opened.plaintext, expected);
    }
    one.shutdown().await.unwrap();
    two.shutdown().await.unwrap();
    let rings = raced
        .into_iter()
        .map(|(ring, a, b)| (ring, a.id().to_owned(), b.id().to_owned()))
        .collect();
    Race { env, rings }
}

#[tokio::test]
async fn two_instances_racing_first_use_lose_no_key() {
    let race = race_first_use().await;
    let bucket = race.env.store_path();
    let mut disagreed = 0;
    for (ring, a, b) in &race.rings {
        let dir = bucket.join("keyring").join(ring);
        let files = ring_files(&bucket, ring);
        let deks: Vec<&String> = files.iter().filter(|name| *name != "LATEST").collect();
        assert!(
            files.iter().any(|name| name == "LATEST"),
            "{ring}: {files:?}"
        );
        // Each instance wrote at most one DEK, and every DEK handed out is stored. A DEK that
        // lost the conditional write of LATEST stays too (unused): a "lost" write may be a
        // retry that met its own landed write, read meanwhile by the other instance.
        assert!(deks.len() <= 2, "{ring}: {files:?}");
        for id in [a, b] {
            assert!(deks.contains(&id), "{ring}: {id} is not stored: {files:?}");
        }
        // LATEST is a byte copy of one of them, one that an instance uses.
        let latest = std::fs::read(dir.join("LATEST")).unwrap();
        let copied: Vec<&&String> = deks
            .iter()
            .filter(|id| std::fs::read(dir.join(id)).unwrap() == latest)
            .collect();
        assert_eq!(copied.len(), 1, "{ring}: LATEST copies one DEK: {files:?}");
        assert!(
            *copied[0] == a || *copied[0] == b,
            "{ring}: LATEST holds {} that no instance uses ({a}, {b})",
            copied[0]
        );
        if a != b {
            disagreed += 1;
        }
    }
    eprintln!(
        "{disagreed} of {} keyrings got two DEKs because s3s-fs let both conditional writes of \
         LATEST through",
        race.rings.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Scale: more objects than one listing page, through the master-key roll
// ---------------------------------------------------------------------------------------------

const SCALE_RINGS: usize = 50;
const DEKS_PER_RING: usize = 50;

struct Kept {
    ring: String,
    key_id: String,
    envelope: Encrypted,
    plaintext: Vec<u8>,
}

#[tokio::test]
async fn a_bucket_of_2550_objects_lists_fully_and_rolls_to_a_new_master_key() {
    let s3 = S3Server::start().await;
    let storage = direct_storage(&s3);
    let old_kek = Kek::generate().to_base64().to_string();
    let new_kek = Kek::generate().to_base64().to_string();
    let new_kek_id = Kek::parse(&new_kek).unwrap().id().to_owned();
    let old_store = KeyringStore::new(storage.clone(), master_keys(&old_kek, &[]));

    let started = Instant::now();
    let mut objects: Vec<(String, Bytes)> = Vec::new();
    let mut kept = Vec::new();
    let mut latest_ids = BTreeMap::new();
    for ring_index in 0..SCALE_RINGS {
        let ring = format!("ws_scale_{ring_index:02}");
        let mut last = Bytes::new();
        for dek_index in 0..DEKS_PER_RING {
            let dek = Dek::generate();
            let bytes = old_store.seal(&dek);
            if dek_index % 20 == 0 || dek_index == DEKS_PER_RING - 1 {
                let plaintext = format!("{ring} payload {dek_index}").into_bytes();
                kept.push(Kept {
                    ring: ring.clone(),
                    key_id: dek.id().to_owned(),
                    envelope: dek.seal(&plaintext),
                    plaintext,
                });
            }
            if dek_index == DEKS_PER_RING - 1 {
                latest_ids.insert(ring.clone(), dek.id().to_owned());
                last = bytes.clone();
            }
            objects.push((dek_key(&ring, dek.id()), bytes));
        }
        objects.push((latest_key(&ring), last));
    }
    let expected_keys: BTreeSet<String> = objects.iter().map(|(key, _)| key.clone()).collect();
    assert_eq!(expected_keys.len(), SCALE_RINGS * (DEKS_PER_RING + 1));
    futures::stream::iter(objects)
        .map(|(key, bytes)| {
            let storage = &storage;
            async move { storage.put(&key, bytes, PutCondition::Overwrite).await }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await
        .unwrap();
    eprintln!("wrote 2550 objects in {:?}", started.elapsed());

    // Listing pages through the whole bucket (s3s-fs answers 1,000 keys a page).
    let listed: Vec<String> = storage.list("keyring/").try_collect().await.unwrap();
    assert_eq!(
        listed.len(),
        expected_keys.len(),
        "listed every object once"
    );
    assert_eq!(
        listed.into_iter().collect::<BTreeSet<_>>(),
        expected_keys,
        "listed exactly the objects written"
    );

    let started = Instant::now();
    let rolling = KeyringStore::new(storage.clone(), master_keys(&new_kek, &[&old_kek]));
    let report = roll_deks(&rolling, |_| {}).await.unwrap();
    eprintln!("rolled in {:?}: {report:?}", started.elapsed());
    assert_eq!(report.scanned, 2550, "{report:?}");
    assert_eq!(report.resealed, 2550, "{report:?}");
    assert_eq!(report.failed, 0, "{:?}", report.failures);

    let again = roll_deks(&rolling, |_| {}).await.unwrap();
    assert_eq!(again.scanned, 2550, "{again:?}");
    assert_eq!(again.already_current, 2550, "{again:?}");
    assert_eq!(again.resealed, 0, "{again:?}");
    assert_eq!(again.failed, 0, "{:?}", again.failures);

    // On disk: every object is sealed by the new master key, and LATEST still copies its DEK.
    let bucket = s3.bucket_dir();
    let files = files_under(&bucket.join("keyring"));
    assert_eq!(files.len(), 2550, "no object appeared or vanished");
    for path in &files {
        let stored = EncryptedDataEncryptionKey::decode(std::fs::read(path).unwrap().as_slice())
            .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        let sealed_by = stored
            .encrypted
            .map(|encrypted| encrypted.encryption_key_id);
        assert_eq!(
            sealed_by.as_deref(),
            Some(new_kek_id.as_str()),
            "{}",
            path.display()
        );
    }
    for (ring, latest_id) in &latest_ids {
        let dir = bucket.join("keyring").join(ring);
        assert_eq!(
            std::fs::read(dir.join("LATEST")).unwrap(),
            std::fs::read(dir.join(latest_id)).unwrap(),
            "{ring}: LATEST is a byte copy of {latest_id} after the roll"
        );
    }

    // With only the new master key, everything still works.
    let keyrings = Keyrings::new(
        KeyringStore::new(storage.clone(), master_keys(&new_kek, &[])),
        CachePolicy::default(),
    );
    for item in &kept {
        let dek = keyrings.dek(&item.ring, &item.key_id).await.unwrap();
        assert_eq!(dek.open(item.envelope.clone()).unwrap(), item.plaintext);
        let round_trip = decode_envelope(&encode_envelope(&item.envelope)).unwrap();
        assert_eq!(dek.open(round_trip).unwrap(), item.plaintext);
    }
    for (ring, latest_id) in &latest_ids {
        let dek = keyrings.latest(ring).await.unwrap();
        assert_eq!(dek.id(), latest_id, "{ring}");
    }
    // Using the keyrings created nothing new.
    assert_eq!(files_under(&bucket.join("keyring")).len(), 2550);
}

// ---------------------------------------------------------------------------------------------
// The store goes away under a running service, and comes back
// ---------------------------------------------------------------------------------------------

async fn timed<T>(
    what: &str,
    call: impl std::future::Future<Output = ringvault::Result<T>>,
) -> ringvault::Result<T> {
    let started = Instant::now();
    let outcome = call.await;
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(10),
        "{what} took {elapsed:?} with the store down"
    );
    eprintln!(
        "{what}: {} in {elapsed:?}",
        if outcome.is_ok() { "ok" } else { "error" }
    );
    outcome
}

fn expect_unavailable<T: std::fmt::Debug>(
    what: &str,
    outcome: ringvault::Result<T>,
    s3: &S3Server,
) {
    let error = outcome.expect_err(what);
    assert_eq!(error.kind(), Kind::Unavailable, "{what}: {error}");
    assert_no_secrets(&error, s3);
}

async fn decrypts(client: &Client, ring: &str, encrypted: &str, plaintext: &str) {
    let opened = client
        .decrypt(ring, encrypted)
        .await
        .unwrap_or_else(|error| panic!("decrypt on {ring}: {error}"));
    assert_eq!(opened.plaintext, plaintext);
}

#[tokio::test]
async fn s3_stopping_and_restarting_under_a_running_service() {
    let mut env = TestEnv::start_s3().await;
    let server = env
        .service(&[("RINGVAULT_STORAGE_TIMEOUT_MS", STORAGE_TIMEOUT_MS)])
        .await;
    let client = env.client(Format::Protobuf).await;

    // ws_a is in use: its LATEST and DEK are cached.
    let sealed_a = client.encrypt("ws_a", "before the outage").await.unwrap();
    // ws_cold has a key in the bucket (written by another process) that this service never saw.
    let cold = Keyrings::new(
        KeyringStore::new(
            direct_storage(env.s3.as_ref().unwrap()),
            master_keys(&env.master_key, &[]),
        ),
        CachePolicy::default(),
    );
    let cold_dek = cold.latest("ws_cold").await.unwrap();
    let sealed_cold = encode_envelope(&cold_dek.seal(b"sealed elsewhere"));
    assert!(!server.keyrings().is_cached("ws_cold"));

    env.s3.as_mut().unwrap().stop().await;
    let s3 = env.s3.as_ref().unwrap();

    // A cached DEK still decrypts.
    let opened = timed(
        "decrypt with a cached key",
        client.decrypt("ws_a", &sealed_a.encrypted),
    )
    .await
    .unwrap();
    assert_eq!(opened.plaintext, "before the outage");
    // A cached LATEST still encrypts.
    let during = timed(
        "encrypt with a cached latest",
        client.encrypt("ws_a", "during"),
    )
    .await
    .unwrap();
    assert_eq!(during.key_id, sealed_a.key_id);
    // A keyring never seen cannot be served: unavailable, and no key is invented.
    expect_unavailable(
        "encrypt on a new keyring",
        timed("encrypt on a new keyring", client.encrypt("ws_new", "x")).await,
        s3,
    );
    expect_unavailable(
        "encrypt on a new keyring, again",
        timed(
            "encrypt on a new keyring, again",
            client.encrypt("ws_new", "x"),
        )
        .await,
        s3,
    );
    // A DEK not cached cannot be read: unavailable, not "not found".
    expect_unavailable(
        "decrypt with a key not cached",
        timed(
            "decrypt with a key not cached",
            client.decrypt("ws_cold", &sealed_cold),
        )
        .await,
        s3,
    );
    // Rotation needs the store.
    expect_unavailable("rotate", timed("rotate", client.rotate("ws_a")).await, s3);
    // Still serving what is cached after the failures.
    decrypts(&client, "ws_a", &during.encrypted, "during").await;

    env.s3.as_mut().unwrap().restart().await;
    let s3 = env.s3.as_ref().unwrap();

    // Everything resumes without restarting ringvault.
    let after = std::sync::Mutex::new(None);
    let resumed = eventually(Duration::from_secs(15), || {
        let (client, after) = (&client, &after);
        async move {
            match client.encrypt("ws_new", "after the outage").await {
                Ok(response) => {
                    *after.lock().unwrap() = Some(response);
                    true
                }
                Err(error) => {
                    assert_eq!(error.kind(), Kind::Unavailable, "{error}");
                    assert_no_secrets(&error, s3);
                    false
                }
            }
        }
    })
    .await;
    assert!(resumed, "encrypt on a new keyring never worked again");
    let after = after.into_inner().unwrap().unwrap();
    decrypts(&client, "ws_new", &after.encrypted, "after the outage").await;
    decrypts(&client, "ws_a", &sealed_a.encrypted, "before the outage").await;
    decrypts(&client, "ws_a", &during.encrypted, "during").await;
    decrypts(&client, "ws_cold", &sealed_cold, "sealed elsewhere").await;
    let encrypted = client.encrypt("ws_a", "after").await.unwrap();
    assert_eq!(encrypted.key_id, sealed_a.key_id);

    // No key was lost or duplicated.
    let bucket = env.store_path();
    assert_eq!(assert_one_dek(&bucket, "ws_a"), sealed_a.key_id);
    assert_eq!(assert_one_dek(&bucket, "ws_new"), after.key_id);
    assert_eq!(assert_one_dek(&bucket, "ws_cold"), cold_dek.id());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_cached_latest_outlives_the_store_only_until_max_stale() {
    const MAX_STALE: Duration = Duration::from_secs(4);
    let mut env = TestEnv::start_s3().await;
    let server = env
        .service(&[
            ("RINGVAULT_STORAGE_TIMEOUT_MS", STORAGE_TIMEOUT_MS),
            ("RINGVAULT_CACHE_FRESH_FOR_SECS", "0"),
            ("RINGVAULT_CACHE_MAX_STALE_SECS", "4"),
        ])
        .await;
    let client = env.client(Format::Protobuf).await;
    // The cached LATEST is read at or after this instant (first use, then the background
    // refresh every use starts, fresh_for being 0), and at or before the store stops.
    let earliest_read = Instant::now();
    let first = client.encrypt("ws_stale", "first").await.unwrap();
    client.encrypt("ws_stale", "refresh").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    env.s3.as_mut().unwrap().stop().await;
    let latest_read = Instant::now();
    let s3 = env.s3.as_ref().unwrap();
    if earliest_read.elapsed() < MAX_STALE - Duration::from_secs(1) {
        let during = timed(
            "encrypt within max-stale",
            client.encrypt("ws_stale", "during"),
        )
        .await
        .unwrap();
        assert_eq!(during.key_id, first.key_id);
    }
    tokio::time::sleep((latest_read + MAX_STALE + Duration::from_millis(300)) - Instant::now())
        .await;
    expect_unavailable(
        "encrypt past max-stale",
        timed("encrypt past max-stale", client.encrypt("ws_stale", "late")).await,
        s3,
    );
    // Decrypting with the cached key is not bounded by max-stale.
    decrypts(&client, "ws_stale", &first.encrypted, "first").await;

    env.s3.as_mut().unwrap().restart().await;
    assert!(
        eventually(Duration::from_secs(15), || async {
            client.encrypt("ws_stale", "after").await.is_ok()
        })
        .await,
        "encrypt never worked again after the store came back"
    );
    assert_eq!(assert_one_dek(&env.store_path(), "ws_stale"), first.key_id);
    server.shutdown().await.unwrap();
}
