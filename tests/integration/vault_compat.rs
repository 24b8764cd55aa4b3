//! Compatibility with Unkey's Vault: the spec's test vector, a store laid out as an existing
//! Vault bucket, and the master-key roll over it.

use std::path::Path;

use crate::common::service::local_keyrings;
use prost::Message as _;
use ringvault::crypto::{seal_with_nonce, Dek, Kek, MasterKeys};
use ringvault::keyring::{roll_deks, Keyrings};
use ringvault::protocol::{
    decode_envelope, encode_envelope, Encrypted, EncryptedDataEncryptionKey,
};

const VECTOR_MASTER_KEY: &str =
    "Cg1rZWtfVEVTVEtFSzAxEIDQlf+8MRogAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const VECTOR_STORED_DEK: &str = "0a0d64656b5f5445535444454b30311081d095ffbc311a6e120c0101010101010101010101011a487dce815003da3c238700235d535763c84abe1a242db20cfcd3fa25cfb92cd81684ff4864cabb741c6813c5ec0690b847b3dc723672c2bf260db1272e553d40bc95774be3e3993773220d6b656b5f544553544b454b30312882d095ffbc31";
const VECTOR_HELLO: &str =
    "EgwCAgICAgICAgICAgIaFQVrWddDKJXEx3VtC+wQWZYT4astTSINZGVrX1RFU1RERUswMSiD0JX/vDE=";

async fn decrypt(keyrings: &Keyrings, keyring: &str, text: &str) -> ringvault::Result<Vec<u8>> {
    let envelope = decode_envelope(text)?;
    keyrings
        .dek(keyring, &envelope.encryption_key_id)
        .await?
        .open(envelope)
}

#[tokio::test]
async fn spec_test_vector() {
    let kek = Kek::parse(VECTOR_MASTER_KEY).unwrap();
    assert_eq!(kek.id(), "kek_TESTKEK01");
    assert_eq!(kek.created_at(), 1_700_000_000_000);
    assert_eq!(kek.to_base64().as_str(), VECTOR_MASTER_KEY);
    assert!(
        !format!("{kek:?}").contains("0001"),
        "debug shows no key bytes"
    );

    let master_keys = MasterKeys::new(kek, []).unwrap();
    let stored_bytes = hex::decode(VECTOR_STORED_DEK).unwrap();
    let stored = EncryptedDataEncryptionKey::decode(stored_bytes.as_slice()).unwrap();
    let dek = master_keys.open_dek(&stored).unwrap();
    assert_eq!(dek.id(), "dek_TESTDEK01");
    assert_eq!(dek.created_at(), 1_700_000_000_001);

    // The vector's store decrypts "hello" through the whole keyring path.
    let dir = tempfile::tempdir().unwrap();
    let ring_dir = dir.path().join("keyring/ws_vector");
    std::fs::create_dir_all(&ring_dir).unwrap();
    std::fs::write(ring_dir.join("dek_TESTDEK01"), &stored_bytes).unwrap();
    std::fs::write(ring_dir.join("LATEST"), &stored_bytes).unwrap();
    let keyrings = local_keyrings(
        dir.path(),
        MasterKeys::new(Kek::parse(VECTOR_MASTER_KEY).unwrap(), []).unwrap(),
    );
    assert_eq!(
        decrypt(&keyrings, "ws_vector", VECTOR_HELLO).await.unwrap(),
        b"hello"
    );
    assert_eq!(
        keyrings.latest("ws_vector").await.unwrap().id(),
        "dek_TESTDEK01"
    );

    // Our encoder reproduces the vector's bytes given its nonces and times.
    let key: Vec<u8> = (0x20..0x40).collect();
    let dek = Dek::from_parts("dek_TESTDEK01".into(), 1_700_000_000_001, &key).unwrap();
    let resealed = master_keys.seal_dek_with_nonce(&dek, [1; 12], 1_700_000_000_002);
    assert_eq!(hex::encode(resealed.encode_to_vec()), VECTOR_STORED_DEK);
    let hello = seal_with_nonce(dek.cipher(), dek.id(), b"hello", [2; 12], 1_700_000_000_003);
    assert_eq!(encode_envelope(&hello), VECTOR_HELLO);
}

#[test]
fn master_key_errors_are_clear() {
    let error = Kek::parse("%%%").unwrap_err();
    assert!(error.message().contains("base64"), "{error}");
    let short = ringvault::protocol::KeyEncryptionKey {
        id: "kek_short".into(),
        created_at: 1,
        key: vec![1; 16],
    };
    let text = base64_encode(&short.encode_to_vec());
    let error = Kek::parse(&text).unwrap_err();
    assert!(error.message().contains("32 bytes"), "{error}");
    assert!(!error.message().contains(&text), "the key is not repeated");
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// DEK ids as found in existing Vault buckets: 9 alphanumerics, base58, KSUID.
const WILD_IDS: [&str; 3] = [
    "dek_3ZkPq9Lx2",
    "dek_4Pk6DmQ8qTbKbr5e9bWJ7Y",
    "dek_2VJbKzD9o4H1yf7mPb8bZqTqW1x",
];
const WILD_KEYRINGS: [&str; 3] = [
    "ws_3ZkPq9Lx",
    "env_prod/team-a/x.y",
    "org/team/project/keyring",
];

/// Writes a bucket as Vault would have: every DEK sealed by `old`, LATEST a byte copy of the
/// last one. Returns ciphertexts issued by "Vault" with their keyring and plaintext.
fn write_vault_bucket(root: &Path, old: &MasterKeys) -> Vec<(String, String, String)> {
    let mut issued = Vec::new();
    for (ring_index, keyring) in WILD_KEYRINGS.iter().enumerate() {
        let ring_dir = root.join("keyring").join(keyring);
        std::fs::create_dir_all(&ring_dir).unwrap();
        let mut last = Vec::new();
        for (id_index, id) in WILD_IDS.iter().enumerate() {
            let key = [(ring_index * 16 + id_index) as u8; 32];
            let dek = Dek::from_parts(id.to_string(), 1_600_000_000_000, &key).unwrap();
            last = old.seal_dek(&dek).encode_to_vec();
            std::fs::write(ring_dir.join(id), &last).unwrap();
            let plaintext = format!("secret {keyring} {id}");
            let sealed: Encrypted = dek.seal(plaintext.as_bytes());
            issued.push((keyring.to_string(), encode_envelope(&sealed), plaintext));
        }
        std::fs::write(ring_dir.join("LATEST"), &last).unwrap();
    }
    issued
}

fn sealing_kek(path: &Path) -> String {
    let stored =
        EncryptedDataEncryptionKey::decode(std::fs::read(path).unwrap().as_slice()).unwrap();
    stored.encrypted.unwrap().encryption_key_id
}

#[tokio::test]
async fn existing_vault_bucket_decrypts_rolls_and_survives_removing_the_old_key() {
    let dir = tempfile::tempdir().unwrap();
    let old_kek_text = Kek::generate().to_base64();
    let new_kek_text = Kek::generate().to_base64();
    let old = MasterKeys::new(Kek::parse(&old_kek_text).unwrap(), []).unwrap();
    let issued = write_vault_bucket(dir.path(), &old);

    let both = || {
        MasterKeys::new(
            Kek::parse(&new_kek_text).unwrap(),
            [Kek::parse(&old_kek_text).unwrap()],
        )
        .unwrap()
    };
    let keyrings = local_keyrings(dir.path(), both());
    for (keyring, text, plaintext) in &issued {
        let opened = decrypt(&keyrings, keyring, text).await.unwrap();
        assert_eq!(opened, plaintext.as_bytes(), "{keyring}");
    }
    for keyring in WILD_KEYRINGS {
        assert_eq!(keyrings.latest(keyring).await.unwrap().id(), WILD_IDS[2]);
    }

    let store = keyrings.store().clone();
    let mut progress_calls = 0;
    let report = roll_deks(&store, |_| progress_calls += 1).await.unwrap();
    assert_eq!(report.scanned, 12, "{report:?}");
    assert_eq!(report.resealed, 12, "{report:?}");
    assert_eq!(report.failed, 0, "{report:?}");
    assert_eq!(progress_calls, 12);
    let new_kek_id = Kek::parse(&new_kek_text).unwrap().id().to_owned();
    for keyring in WILD_KEYRINGS {
        let ring_dir = dir.path().join("keyring").join(keyring);
        for name in WILD_IDS.iter().chain(["LATEST"].iter()) {
            assert_eq!(
                sealing_kek(&ring_dir.join(name)),
                new_kek_id,
                "{keyring}/{name}"
            );
        }
        assert_eq!(
            std::fs::read(ring_dir.join("LATEST")).unwrap(),
            std::fs::read(ring_dir.join(WILD_IDS[2])).unwrap(),
            "LATEST stays a byte copy"
        );
    }
    let again = roll_deks(&store, |_| {}).await.unwrap();
    assert_eq!(
        (again.resealed, again.already_current),
        (0, 12),
        "idempotent"
    );

    // The previous master key removed: everything still decrypts and encrypts.
    let only_new = local_keyrings(
        dir.path(),
        MasterKeys::new(Kek::parse(&new_kek_text).unwrap(), []).unwrap(),
    );
    for (keyring, text, plaintext) in &issued {
        let opened = decrypt(&only_new, keyring, text).await.unwrap();
        assert_eq!(opened, plaintext.as_bytes());
    }
    for keyring in WILD_KEYRINGS {
        let dek = only_new.latest(keyring).await.unwrap();
        assert_eq!(dek.id(), WILD_IDS[2]);
        let text = encode_envelope(&dek.seal(b"after the roll"));
        assert_eq!(
            decrypt(&only_new, keyring, &text).await.unwrap(),
            b"after the roll"
        );
    }
}

#[tokio::test]
async fn roll_reports_objects_it_cannot_open() {
    let dir = tempfile::tempdir().unwrap();
    let unknown = MasterKeys::new(Kek::generate(), []).unwrap();
    write_vault_bucket(dir.path(), &unknown);
    std::fs::write(
        dir.path().join("keyring/ws_3ZkPq9Lx/dek_garbage"),
        b"not protobuf \xff",
    )
    .unwrap();
    let keyrings = local_keyrings(dir.path(), MasterKeys::new(Kek::generate(), []).unwrap());
    let report = roll_deks(keyrings.store(), |_| {}).await.unwrap();
    assert_eq!(report.failed, 13, "{report:?}");
    assert_eq!(report.resealed, 0);
    assert!(report
        .failures
        .iter()
        .all(|(_, error)| !error.message().is_empty()));
}
