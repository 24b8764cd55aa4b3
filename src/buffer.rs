//! Appending large byte slices to buffers at memory speed on every CPU.
//!
//! glibc copies blocks above ~2 KiB (2,112 bytes on CPUs with fast short `rep movsb`, such as
//! AMD Zen 3) with `rep movsb`, which on the Zen 3 benchmark machine runs ~20× slower — 35 µs
//! instead of 1.7 µs for 64 KiB — when the destination lies 1–31 bytes past the source modulo
//! 4 KiB. Writing a payload behind a few bytes of protobuf header into a fresh buffer, from a
//! source at the same offset in its own page, is exactly that case: the Encrypt hot path spent
//! more time in this one copy than in AES-GCM. Copies below the threshold use vector loops
//! that have no such case and run as fast, so large slices are appended in pieces under it.
//! (`GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold` can lower the threshold to 256 bytes on
//! AVX2 machines, which would bring the slow case back for these pieces.)

/// Pieces smaller than glibc's default `rep movsb` threshold.
const PIECE: usize = 1024;

/// `destination.extend_from_slice(source)`, in pieces of [`PIECE`] bytes.
pub(crate) fn extend_from_slice(destination: &mut Vec<u8>, source: &[u8]) {
    destination.reserve(source.len());
    for piece in source.chunks(PIECE) {
        destination.extend_from_slice(piece);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_every_byte_in_order() {
        for len in [0, 1, PIECE - 1, PIECE, PIECE + 1, 3 * PIECE + 17, 65_536] {
            let source: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut destination = b"head".to_vec();
            extend_from_slice(&mut destination, &source);
            assert_eq!(&destination[..4], b"head");
            assert_eq!(&destination[4..], &source[..], "{len}");
        }
    }
}
