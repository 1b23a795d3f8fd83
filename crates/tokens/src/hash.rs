//! Block hashing: the identity of a full KV block across engine, mocker and router.
//!
//! Definition (version 1):
//!
//! ```text
//! hash(block) = xxh3_64_with_seed(bytes, SEED)
//! bytes       = u32 LE version (=1)
//!            ++ u64 LE parent hash (0 when the block starts the sequence) ++ u8 has_parent
//!            ++ each token id as u32 LE
//! ```
//!
//! A block's hash covers its own tokens and, through the parent, every token before it, so
//! equal hashes mean equal prefixes (up to 64-bit collisions). Only full blocks are hashed.
//! Changing anything above is a new version: bump `BLOCK_HASH_VERSION` so mixed fleets
//! notice instead of silently missing the cache.

use xxhash_rust::xxh3::xxh3_64_with_seed;

pub type BlockHash = u64;

pub const BLOCK_HASH_VERSION: u32 = 1;

const SEED: u64 = 0x5357_4954_4348_5944; // "SWITCHYD"

/// Hash of one full block given its parent's hash.
pub fn hash_block(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut bytes = Vec::with_capacity(13 + tokens.len() * 4);
    hash_block_with(&mut bytes, parent, tokens)
}

/// [`hash_block`] with a caller-owned scratch buffer, so hashing a long prompt does not
/// allocate once per block (the router hashes every prompt it places).
fn hash_block_with(bytes: &mut Vec<u8>, parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    bytes.clear();
    bytes.extend_from_slice(&BLOCK_HASH_VERSION.to_le_bytes());
    bytes.extend_from_slice(&parent.unwrap_or(0).to_le_bytes());
    bytes.push(parent.is_some() as u8);
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    xxh3_64_with_seed(bytes, SEED)
}

/// Chained hashes of every full block of `tokens`; a trailing partial block is not hashed.
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    assert!(block_size > 0, "block_size must be positive");
    let mut parent = None;
    let mut bytes = Vec::with_capacity(13 + block_size * 4);
    tokens
        .chunks_exact(block_size)
        .map(|chunk| {
            let h = hash_block_with(&mut bytes, parent, chunk);
            parent = Some(h);
            h
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_prefixes_share_hashes_and_diverge_after() {
        let a: Vec<u32> = (0..40).collect();
        let mut b = a.clone();
        b[20] = 999;
        let ha = block_hashes(&a, 8);
        let hb = block_hashes(&b, 8);
        assert_eq!(ha.len(), 5);
        assert_eq!(ha[..2], hb[..2]);
        // Block 2 holds token 20, and every later block chains over it.
        assert!(ha[2..].iter().zip(&hb[2..]).all(|(x, y)| x != y));
    }

    #[test]
    fn parent_matters() {
        let t = [1u32, 2, 3, 4];
        assert_ne!(hash_block(None, &t), hash_block(Some(0), &t));
        assert_ne!(hash_block(Some(1), &t), hash_block(Some(2), &t));
    }

    #[test]
    fn partial_block_is_not_hashed() {
        assert_eq!(block_hashes(&[1, 2, 3], 4).len(), 0);
        assert_eq!(block_hashes(&[1, 2, 3, 4, 5], 4).len(), 1);
    }

    #[test]
    fn version_one_is_stable() {
        // Pin the definition: a change here must come with a version bump.
        let h = hash_block(None, &[0, 1, 2, 3]);
        assert_eq!(h, PINNED_V1);
        // The scratch-buffer path of `block_hashes` chains the same function.
        assert_eq!(
            block_hashes(&[0, 1, 2, 3, 9, 8, 7, 6], 4),
            [h, hash_block(Some(h), &[9, 8, 7, 6])]
        );
    }

    const PINNED_V1: u64 = 4_440_839_997_900_975_695;
}
