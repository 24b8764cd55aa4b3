//! Key ids: a prefix and 22 base62 characters from the OS-seeded CSPRNG (131 bits), so ids
//! never collide across replicas without coordination.

use rand::Rng as _;

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const RANDOM_CHARS: usize = 22;

fn random_id(prefix: &str) -> String {
    let mut rng = rand::thread_rng();
    let mut id = String::with_capacity(prefix.len() + RANDOM_CHARS);
    id.push_str(prefix);
    for _ in 0..RANDOM_CHARS {
        id.push(char::from(BASE62[rng.gen_range(0..BASE62.len())]));
    }
    id
}

/// A new data encryption key id, `dek_` + 22 base62 characters.
pub fn new_dek_id() -> String {
    random_id(crate::storage::DEK_ID_PREFIX)
}

/// A new master key id, `kek_` + 22 base62 characters.
pub fn new_kek_id() -> String {
    random_id("kek_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_prefix_length_and_alphabet() {
        let id = new_dek_id();
        assert!(id.starts_with("dek_"));
        assert_eq!(id.len(), 4 + RANDOM_CHARS);
        assert!(id[4..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert!(new_kek_id().starts_with("kek_"));
        let ids: std::collections::HashSet<_> = (0..1000).map(|_| new_dek_id()).collect();
        assert_eq!(ids.len(), 1000);
    }
}
