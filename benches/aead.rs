//! In-process AEAD: ringvault's seal/open (aws-lc-rs, through `Dek`, including the nonce draw
//! and the envelope's protobuf bytes) beside ring's AES-256-GCM — the reference of what this CPU can do — and
//! RustCrypto's `aes-gcm`, the implementation ringvault used before, all in the same run.

use aes_gcm::aead::AeadInPlace as _;
use aes_gcm::{Aes256Gcm, KeyInit as _};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ringvault::crypto::Dek;

// The service's allocator, so that buffer reuse costs here what it costs there.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SIZES: [usize; 3] = [32, 1024, 64 * 1024];

fn aead(c: &mut Criterion) {
    let dek = Dek::generate();
    let ring_key =
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).expect("32-byte key"));
    let rustcrypto = Aes256Gcm::new_from_slice(&[7u8; 32]).expect("32-byte key");
    let mut group = c.benchmark_group("aead");
    for size in SIZES {
        let plaintext = vec![0x5au8; size];
        group.throughput(Throughput::Bytes(size as u64));

        group.bench_with_input(
            BenchmarkId::new("ringvault_seal", size),
            &plaintext,
            |b, p| b.iter(|| dek.seal_envelope(p)),
        );
        let sealed = dek.seal(&plaintext);
        group.bench_with_input(BenchmarkId::new("ringvault_open", size), &sealed, |b, s| {
            b.iter(|| dek.open(s.clone()).expect("opens"))
        });

        group.bench_with_input(BenchmarkId::new("ring_seal", size), &plaintext, |b, p| {
            b.iter(|| {
                let mut buffer = Vec::with_capacity(p.len() + 16);
                buffer.extend_from_slice(p);
                let nonce = Nonce::assume_unique_for_key(rand::random());
                ring_key
                    .seal_in_place_append_tag(nonce, Aad::empty(), &mut buffer)
                    .expect("seals");
                buffer
            })
        });
        let nonce_bytes: [u8; 12] = rand::random();
        let mut ring_sealed = plaintext.clone();
        ring_key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::empty(),
                &mut ring_sealed,
            )
            .expect("seals");
        group.bench_with_input(BenchmarkId::new("ring_open", size), &ring_sealed, |b, s| {
            b.iter(|| {
                let mut buffer = s.clone();
                let opened = ring_key
                    .open_in_place(
                        Nonce::assume_unique_for_key(nonce_bytes),
                        Aad::empty(),
                        &mut buffer,
                    )
                    .expect("opens")
                    .len();
                buffer.truncate(opened);
                buffer
            })
        });

        group.bench_with_input(
            BenchmarkId::new("rustcrypto_seal", size),
            &plaintext,
            |b, p| {
                b.iter(|| {
                    let mut buffer = Vec::with_capacity(p.len() + 16);
                    buffer.extend_from_slice(p);
                    let nonce: [u8; 12] = rand::random();
                    rustcrypto
                        .encrypt_in_place(&nonce.into(), b"", &mut buffer)
                        .expect("seals");
                    buffer
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("rustcrypto_open", size),
            &ring_sealed,
            |b, s| {
                b.iter(|| {
                    let mut buffer = s.clone();
                    rustcrypto
                        .decrypt_in_place(&nonce_bytes.into(), b"", &mut buffer)
                        .expect("opens");
                    buffer
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, aead);
criterion_main!(benches);
