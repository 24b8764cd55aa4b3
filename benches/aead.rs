//! In-process AEAD: ringvault's seal/open (ring, through `Dek`, including the nonce draw and the
//! envelope's protobuf bytes) beside bare ring AES-256-GCM — the reference of what this CPU can
//! do — and bare aws-lc-rs, the implementation ringvault used before, all in the same run.

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
    let aws_lc_key = aws_lc_rs::aead::LessSafeKey::new(
        aws_lc_rs::aead::UnboundKey::new(&aws_lc_rs::aead::AES_256_GCM, &[7u8; 32])
            .expect("32-byte key"),
    );
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

        group.bench_with_input(BenchmarkId::new("aws_lc_seal", size), &plaintext, |b, p| {
            b.iter(|| {
                let mut buffer = Vec::with_capacity(p.len() + 16);
                buffer.extend_from_slice(p);
                let nonce = aws_lc_rs::aead::Nonce::assume_unique_for_key(rand::random());
                aws_lc_key
                    .seal_in_place_append_tag(nonce, aws_lc_rs::aead::Aad::empty(), &mut buffer)
                    .expect("seals");
                buffer
            })
        });
        group.bench_with_input(
            BenchmarkId::new("aws_lc_open", size),
            &ring_sealed,
            |b, s| {
                b.iter(|| {
                    let mut buffer = s.clone();
                    let opened = aws_lc_key
                        .open_in_place(
                            aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce_bytes),
                            aws_lc_rs::aead::Aad::empty(),
                            &mut buffer,
                        )
                        .expect("opens")
                        .len();
                    buffer.truncate(opened);
                    buffer
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, aead);
criterion_main!(benches);
