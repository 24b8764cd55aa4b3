//! Tampering with envelopes: every change to the bytes a caller keeps must make Decrypt fail,
//! or (only for fields outside authentication, like `time`) return exactly the original
//! plaintext. It must never return other plaintext.
//!
//! Every test goes through the same decrypt path a request takes:
//! `decode_envelope(text)` → `keyrings.dek(keyring, &env.encryption_key_id)` → `dek.open(env)`.

use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use proptest::prelude::*;
use rand::{Rng as _, RngCore as _};
use ringvault::crypto::{Kek, MasterKeys};
use ringvault::keyring::{CachePolicy, KeyringStore, Keyrings};
use ringvault::protocol::{decode_envelope, encode_envelope, Encrypted};
use ringvault::storage::Storage;
use ringvault::Kind;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn new_keyrings() -> Keyrings {
    let master_keys = Arc::new(MasterKeys::new(Kek::generate(), []).unwrap());
    Keyrings::new(
        KeyringStore::new(Storage::in_memory(), master_keys),
        CachePolicy::default(),
    )
}

/// The full decrypt path of a request.
async fn decrypt(keyrings: &Keyrings, keyring: &str, text: &str) -> ringvault::Result<Vec<u8>> {
    let envelope = decode_envelope(text)?;
    let dek = keyrings.dek(keyring, &envelope.encryption_key_id).await?;
    dek.open(envelope)
}

/// Seals `plaintext` with the keyring's LATEST and returns the base64 envelope.
async fn encrypt(keyrings: &Keyrings, keyring: &str, plaintext: &[u8]) -> String {
    let dek = keyrings.latest(keyring).await.unwrap();
    encode_envelope(&dek.seal(plaintext))
}

fn proto_bytes(text: &str) -> Vec<u8> {
    B64.decode(text).unwrap()
}

/// Byte ranges (start..end) inside the protobuf bytes of `encrypted`: the values of nonce,
/// ciphertext and key id, and the whole time field (tag and varint). Found by searching, so
/// that the tests do not depend on varint widths.
struct Layout {
    nonce: std::ops::Range<usize>,
    ciphertext: std::ops::Range<usize>,
    key_id: std::ops::Range<usize>,
    time: std::ops::Range<usize>,
}

fn layout(bytes: &[u8], encrypted: &Encrypted) -> Layout {
    fn find(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .position(|window| window == needle)
            .expect("field bytes present")
    }
    // Field order written by prost: 1 (absent, algorithm 0), 2 nonce, 3 ciphertext, 4 key id,
    // 5 time.
    assert_eq!(bytes[0], 0x12, "nonce is the first field");
    let nonce = 2..2 + encrypted.nonce.len();
    let ciphertext_start = find(&bytes[nonce.end..], &encrypted.ciphertext) + nonce.end;
    let ciphertext = ciphertext_start..ciphertext_start + encrypted.ciphertext.len();
    let key_id_start = find(
        &bytes[ciphertext.end..],
        encrypted.encryption_key_id.as_bytes(),
    ) + ciphertext.end;
    let key_id = key_id_start..key_id_start + encrypted.encryption_key_id.len();
    assert_eq!(bytes[key_id.end], 0x28, "time follows the key id");
    // The whole time field, tag included.
    let time = key_id.end..bytes.len();
    Layout {
        nonce,
        ciphertext,
        key_id,
        time,
    }
}

/// Asserts the outcome of decrypting a tampered envelope is an error or exactly `original`,
/// and returns whether it was an error.
fn check_outcome(outcome: &ringvault::Result<Vec<u8>>, original: &[u8], what: &str) -> bool {
    match outcome {
        Err(_) => true,
        Ok(plaintext) => {
            assert_eq!(
                plaintext.as_slice(),
                original,
                "{what}: tampered envelope decrypted to OTHER plaintext"
            );
            false
        }
    }
}

// 1. Single-bit flips.

#[tokio::test]
async fn every_bit_flip_in_the_first_64_bytes_fails_or_returns_the_original() {
    let keyrings = new_keyrings();
    let plaintext: Vec<u8> = (0..200u32).map(|i| (i * 7 + 3) as u8).collect();
    let text = encrypt(&keyrings, "ws_a", &plaintext).await;
    assert_eq!(decrypt(&keyrings, "ws_a", &text).await.unwrap(), plaintext);
    let bytes = proto_bytes(&text);
    assert!(bytes.len() > 64, "envelope is {} bytes", bytes.len());
    let layout = layout(&bytes, &decode_envelope(&text).unwrap());

    let mut errors = 0;
    let mut originals = 0;
    for byte in 0..64 {
        for bit in 0..8 {
            let mut tampered = bytes.clone();
            tampered[byte] ^= 1 << bit;
            let outcome = decrypt(&keyrings, "ws_a", &B64.encode(&tampered)).await;
            let what = format!("bit {bit} of byte {byte}");
            if check_outcome(&outcome, &plaintext, &what) {
                errors += 1;
            } else {
                originals += 1;
                assert!(
                    !layout.nonce.contains(&byte) && !layout.ciphertext.contains(&byte),
                    "{what} is inside nonce or ciphertext and still decrypted"
                );
            }
        }
    }
    // The first 64 bytes are the nonce field and the start of the ciphertext field only:
    // every flip there must fail.
    assert!(layout.ciphertext.end > 64);
    assert_eq!(errors, 64 * 8, "{originals} flips decrypted");
}

#[tokio::test]
async fn every_bit_flip_anywhere_fails_unless_it_only_touches_time() {
    let keyrings = new_keyrings();
    let plaintext = b"a short secret, so that key id and time are in reach".to_vec();
    let text = encrypt(&keyrings, "ws_a", &plaintext).await;
    let bytes = proto_bytes(&text);
    let layout = layout(&bytes, &decode_envelope(&text).unwrap());

    let mut originals = Vec::new();
    for byte in 0..bytes.len() {
        for bit in 0..8 {
            let mut tampered = bytes.clone();
            tampered[byte] ^= 1 << bit;
            let outcome = decrypt(&keyrings, "ws_a", &B64.encode(&tampered)).await;
            let what = format!("bit {bit} of byte {byte}");
            if !check_outcome(&outcome, &plaintext, &what) {
                originals.push((byte, bit));
            }
        }
    }
    // Only flips inside the time field (its value, or its tag turned into an unknown field)
    // may leave the envelope decryptable.
    for &(byte, bit) in &originals {
        assert!(
            layout.time.contains(&byte),
            "bit {bit} of byte {byte} is outside time (time at {:?}, key id at {:?}) and decrypted",
            layout.time,
            layout.key_id
        );
    }
    assert!(
        !originals.is_empty(),
        "time is not authenticated: some flip should pass"
    );
}

// 2. Truncation.

#[tokio::test]
async fn every_truncation_fails_or_returns_the_original() {
    let keyrings = new_keyrings();
    let plaintext: Vec<u8> = (0..300u32).map(|i| (i % 251) as u8).collect();
    let text = encrypt(&keyrings, "ws_a", &plaintext).await;
    let bytes = proto_bytes(&text);
    let layout = layout(&bytes, &decode_envelope(&text).unwrap());

    let mut decrypted = Vec::new();
    for len in 0..bytes.len() {
        let truncated = &bytes[..len];
        let outcome = decrypt(&keyrings, "ws_a", &B64.encode(truncated)).await;
        if !check_outcome(&outcome, &plaintext, &format!("truncated to {len}")) {
            decrypted.push(len);
        }
        if len < layout.ciphertext.end {
            assert!(outcome.is_err(), "truncation to {len} cuts the ciphertext");
        }
    }
    // The only truncation that can decrypt is the one that drops the whole time field
    // (time then reads as 0, which is not authenticated).
    assert!(
        decrypted.iter().all(|&len| len == layout.time.start),
        "truncations that decrypted: {decrypted:?}, time field starts at {}",
        layout.time.start
    );
    // Truncating the base64 text itself, character by character.
    for len in 0..text.len() {
        let outcome = decrypt(&keyrings, "ws_a", &text[..len]).await;
        check_outcome(&outcome, &plaintext, &format!("text truncated to {len}"));
    }
}

// 3. Appended bytes.

#[tokio::test]
async fn appended_bytes_fail_or_return_the_original() {
    let keyrings = new_keyrings();
    let plaintext = b"appended bytes must not change what decrypts".to_vec();
    let mut rng = rand::thread_rng();
    for _ in 0..50 {
        let text = encrypt(&keyrings, "ws_a", &plaintext).await;
        let bytes = proto_bytes(&text);
        for extra_len in [1usize, 2, 3, 16, 100] {
            let mut extra = vec![0u8; extra_len];
            rng.fill_bytes(&mut extra);

            let mut longer = bytes.clone();
            longer.extend_from_slice(&extra);
            let outcome = decrypt(&keyrings, "ws_a", &B64.encode(&longer)).await;
            check_outcome(&outcome, &plaintext, &format!("{extra_len} bytes appended"));

            let appended_text = format!("{text}{}", B64.encode(&extra));
            let outcome = decrypt(&keyrings, "ws_a", &appended_text).await;
            check_outcome(&outcome, &plaintext, "base64 appended to the text");

            let chars: String = (0..extra_len)
                .map(|_| {
                    let alphabet =
                        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=";
                    char::from(alphabet[rng.gen_range(0..alphabet.len())])
                })
                .collect();
            let outcome = decrypt(&keyrings, "ws_a", &format!("{text}{chars}")).await;
            check_outcome(&outcome, &plaintext, "characters appended to the text");
        }
    }
}

#[tokio::test]
async fn appended_fields_that_replace_authenticated_fields_fail() {
    let keyrings = new_keyrings();
    let plaintext = b"last field wins in proto3".to_vec();
    let text = encrypt(&keyrings, "ws_a", &plaintext).await;
    let bytes = proto_bytes(&text);
    // A second nonce field (tag 2, 12 bytes) overrides the first.
    let mut second_nonce = bytes.clone();
    second_nonce.extend_from_slice(&[0x12, 12]);
    second_nonce.extend_from_slice(&[0xAA; 12]);
    assert!(decrypt(&keyrings, "ws_a", &B64.encode(&second_nonce))
        .await
        .is_err());
    // A second ciphertext field (tag 3) overrides the first.
    let mut second_ciphertext = bytes.clone();
    second_ciphertext.extend_from_slice(&[0x1a, 20]);
    second_ciphertext.extend_from_slice(&[0x55; 20]);
    assert!(decrypt(&keyrings, "ws_a", &B64.encode(&second_ciphertext))
        .await
        .is_err());
    // A second time field (tag 5) is not authenticated: the original plaintext comes back.
    let mut second_time = bytes.clone();
    second_time.extend_from_slice(&[0x28, 0x01]);
    assert_eq!(
        decrypt(&keyrings, "ws_a", &B64.encode(&second_time))
            .await
            .unwrap(),
        plaintext
    );
    // A non-zero algorithm is rejected.
    let mut algorithm = bytes;
    algorithm.extend_from_slice(&[0x08, 0x01]);
    let error = decrypt(&keyrings, "ws_a", &B64.encode(&algorithm))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), Kind::InvalidArgument, "{error}");
}

// 4. Nonces.

#[tokio::test]
async fn zero_or_swapped_nonce_fails() {
    let keyrings = new_keyrings();
    let dek = keyrings.latest("ws_a").await.unwrap();
    let first = dek.seal(b"first secret");
    let second = dek.seal(b"second secret");

    let mut zero = first.clone();
    zero.nonce = vec![0; 12];
    let error = decrypt(&keyrings, "ws_a", &encode_envelope(&zero))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), Kind::InvalidArgument, "{error}");

    let mut swapped_first = first.clone();
    swapped_first.nonce = second.nonce.clone();
    let mut swapped_second = second.clone();
    swapped_second.nonce = first.nonce.clone();
    for swapped in [&swapped_first, &swapped_second] {
        assert!(decrypt(&keyrings, "ws_a", &encode_envelope(swapped))
            .await
            .is_err());
    }

    // Swapping ciphertexts (same key, each with the other's nonce) fails too.
    let mut crossed = first.clone();
    crossed.ciphertext = second.ciphertext.clone();
    assert!(decrypt(&keyrings, "ws_a", &encode_envelope(&crossed))
        .await
        .is_err());

    // Wrong nonce lengths are rejected before any key lookup.
    for len in [0usize, 11, 13, 16] {
        let mut wrong = first.clone();
        wrong.nonce = vec![1; len];
        let error = decrypt(&keyrings, "ws_a", &encode_envelope(&wrong))
            .await
            .unwrap_err();
        assert_eq!(
            error.kind(),
            Kind::InvalidArgument,
            "nonce of {len}: {error}"
        );
    }
    // Ciphertexts shorter than the tag too.
    let mut short = first;
    short.ciphertext.truncate(15);
    let error = decrypt(&keyrings, "ws_a", &encode_envelope(&short))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), Kind::InvalidArgument, "{error}");
}

// 5. Key ids and keyrings.

#[tokio::test]
async fn wrong_key_id_or_keyring_fails() {
    let keyrings = new_keyrings();
    let plaintext = b"bound to one key of one keyring".to_vec();
    let first = keyrings.latest("ws_a").await.unwrap();
    let sealed = first.seal(&plaintext);
    let text = encode_envelope(&sealed);

    let rotation = keyrings.rotate("ws_a").await.unwrap();
    assert_ne!(rotation.dek.id(), first.id());
    // Still opens after rotation with its own id.
    assert_eq!(decrypt(&keyrings, "ws_a", &text).await.unwrap(), plaintext);

    // Another existing DEK of the same keyring.
    let mut other_dek = sealed.clone();
    other_dek.encryption_key_id = rotation.dek.id().to_owned();
    let error = decrypt(&keyrings, "ws_a", &encode_envelope(&other_dek))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), Kind::InvalidArgument, "{error}");

    // A nonexistent id.
    let mut missing = sealed.clone();
    missing.encryption_key_id = "dek_doesNotExist0000000000".into();
    let error = decrypt(&keyrings, "ws_a", &encode_envelope(&missing))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), Kind::NotFound, "{error}");

    // Empty, invalid and path-like ids are rejected, never resolved to another object.
    // (`LATEST` is a byte copy of the newest DEK, so it must not be accepted as a key id.)
    for key_id in [
        "",
        "LATEST",
        ".",
        "..",
        "../ws_b/LATEST",
        "/etc/passwd",
        "dek_a/../LATEST",
    ] {
        let mut bad = sealed.clone();
        bad.encryption_key_id = key_id.into();
        let outcome = decrypt(&keyrings, "ws_a", &encode_envelope(&bad)).await;
        assert!(outcome.is_err(), "key id {key_id:?} decrypted");
    }
    // `LATEST` of ws_a is now the rotated DEK: an envelope sealed by it must not open via the
    // `LATEST` id either.
    let mut via_latest = rotation.dek.seal(&plaintext);
    via_latest.encryption_key_id = "LATEST".into();
    assert!(decrypt(&keyrings, "ws_a", &encode_envelope(&via_latest))
        .await
        .is_err());

    // The wrong keyring, which has a DEK of its own.
    let ws_b = keyrings.latest("ws_b").await.unwrap();
    assert_ne!(ws_b.id(), first.id());
    let error = decrypt(&keyrings, "ws_b", &text).await.unwrap_err();
    assert_eq!(error.kind(), Kind::NotFound, "{error}");
    // ... and ws_b's envelope in ws_a.
    let text_b = encrypt(&keyrings, "ws_b", &plaintext).await;
    let error = decrypt(&keyrings, "ws_a", &text_b).await.unwrap_err();
    assert_eq!(error.kind(), Kind::NotFound, "{error}");
    // ws_b's ciphertext relabelled with a ws_a key id fails authentication.
    let mut relabelled = decode_envelope(&text_b).unwrap();
    relabelled.encryption_key_id = first.id().to_owned();
    assert!(decrypt(&keyrings, "ws_a", &encode_envelope(&relabelled))
        .await
        .is_err());
    // A keyring that was never used.
    let error = decrypt(&keyrings, "ws_never_used", &text)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), Kind::NotFound, "{error}");
}

// 6. Text that is not an envelope.

#[tokio::test]
async fn invalid_base64_and_empty_text_are_invalid_argument() {
    let keyrings = new_keyrings();
    keyrings.latest("ws_a").await.unwrap();
    for text in [
        "",
        "%%%",
        "not base64!",
        "abc",
        "A",
        "====",
        "ab=c",
        "YWJj-_",
        "  ",
        "\u{e9}t\u{e9}",
        "\0",
    ] {
        let error = decrypt(&keyrings, "ws_a", text).await.unwrap_err();
        assert_eq!(error.kind(), Kind::InvalidArgument, "{text:?}: {error}");
    }
    // Valid base64 of bytes that are not an envelope.
    let error = decrypt(&keyrings, "ws_a", "//////8=").await.unwrap_err();
    assert_eq!(error.kind(), Kind::InvalidArgument, "{error}");
}

#[tokio::test]
async fn tolerated_text_forms_decrypt_to_the_original() {
    // Line breaks and non-zero trailing bits are accepted (Go's decoder does), and must
    // still give exactly the original plaintext.
    let keyrings = new_keyrings();
    let plaintext = b"folded".to_vec();
    let text = encrypt(&keyrings, "ws_a", &plaintext).await;
    let folded = format!("{}\r\n{}\n", &text[..10], &text[10..]);
    assert_eq!(
        decrypt(&keyrings, "ws_a", &folded).await.unwrap(),
        plaintext
    );
    let unpadded = text.trim_end_matches('=');
    let outcome = decrypt(&keyrings, "ws_a", unpadded).await;
    check_outcome(&outcome, &plaintext, "padding removed");
}

// 7. Round trips and decoder robustness.

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

fn shared_keyrings() -> &'static Keyrings {
    static KEYRINGS: OnceLock<Keyrings> = OnceLock::new();
    KEYRINGS.get_or_init(new_keyrings)
}

fn round_trip(plaintext: &[u8]) -> Vec<u8> {
    runtime().block_on(async {
        let keyrings = shared_keyrings();
        let dek = keyrings.latest("ws_round_trip").await.unwrap();
        let sealed = dek.seal(plaintext);
        let text = encode_envelope(&sealed);
        assert_eq!(decode_envelope(&text).unwrap(), sealed);
        decrypt(keyrings, "ws_round_trip", &text).await.unwrap()
    })
}

#[test]
fn round_trip_edge_sizes() {
    for len in [0usize, 1, 15, 16, 17, 1 << 20] {
        let mut plaintext = vec![0u8; len];
        rand::thread_rng().fill_bytes(&mut plaintext);
        assert_eq!(round_trip(&plaintext), plaintext, "{len} bytes");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn round_trip_random_payloads(plaintext in prop::collection::vec(any::<u8>(), 0..=1 << 20)) {
        prop_assert_eq!(round_trip(&plaintext), plaintext);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decode_envelope_never_panics_on_base64_of_random_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..512)
    ) {
        let _ = decode_envelope(&B64.encode(&bytes));
    }

    #[test]
    fn decode_envelope_never_panics_on_arbitrary_strings(text in any::<String>()) {
        let _ = decode_envelope(&text);
    }

    #[test]
    fn decode_envelope_never_panics_on_base64_like_strings(
        text in "[A-Za-z0-9+/=\r\n]{0,200}"
    ) {
        let _ = decode_envelope(&text);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random protobuf bytes through the whole decrypt path never decrypt.
    #[test]
    fn random_bytes_never_decrypt(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let outcome = runtime().block_on(async {
            let keyrings = shared_keyrings();
            keyrings.latest("ws_random").await.unwrap();
            decrypt(keyrings, "ws_random", &B64.encode(&bytes)).await
        });
        prop_assert!(outcome.is_err());
    }

    /// Well-formed envelopes naming the real key id, with random nonce and ciphertext,
    /// never decrypt.
    #[test]
    fn forged_envelopes_with_the_real_key_id_never_decrypt(
        nonce in prop::array::uniform12(any::<u8>()),
        ciphertext in prop::collection::vec(any::<u8>(), 16..128),
        time in any::<i64>(),
    ) {
        let outcome = runtime().block_on(async {
            let keyrings = shared_keyrings();
            let dek = keyrings.latest("ws_forged").await.unwrap();
            let forged = Encrypted {
                nonce: nonce.to_vec(),
                ciphertext,
                encryption_key_id: dek.id().to_owned(),
                time,
                ..Default::default()
            };
            decrypt(keyrings, "ws_forged", &encode_envelope(&forged)).await
        });
        let error = outcome.unwrap_err();
        prop_assert_eq!(error.kind(), Kind::InvalidArgument);
    }
}
