//! The dm-verity hash-tree format kiln uses, in one place for the builder
//! (`kiln_formats::verity`, which writes trees and is checked against `veritysetup`)
//! and the node (`update::apply`, which reads a written slot back and
//! recomputes its tree).
//!
//! The format is `veritysetup format`'s default (cryptsetup
//! `lib/verity/verity_hash.c`): hash type 1, sha256, 4096-byte data and hash
//! blocks, the superblock at offset 0 of the hash area.
//!
//! - Block 0 of the hash area: the 512-byte superblock, zero-padded to 4096.
//! - Then the hash levels, the root-most level first. Level 0 holds one
//!   sha256(salt || block) per data block; level i+1 holds the hashes of the
//!   blocks of level i. 128 digests per 4096-byte block, zero-padded.
//! - The tree has the fewest levels L with data_blocks <= 128^L, so the top
//!   level is one block, and the root hash is sha256(salt || that block).
//!   With one data block L = 0: no hash blocks at all, and the root hash is
//!   the hash of the data block itself (the kernel does the same).
//!
//! [`TreeBuilder`] takes the data as it streams by and holds only the
//! digests (32 bytes per 4 KiB block).

use sha2::{Digest, Sha256};
use crate::digest::hex;

/// Data and hash block size, in bytes.
pub const BLOCK: u64 = 4096;
/// Size of the on-disk superblock; it is padded to a whole hash block.
pub const SUPERBLOCK_LEN: usize = 512;
/// Longest salt the superblock holds.
pub const MAX_SALT: usize = 256;
/// Bytes of one digest (sha256).
pub const DIGEST: usize = 32;
/// Digests in one hash block.
pub const PER_BLOCK: usize = BLOCK as usize / DIGEST;

/// One hash block (or one data block) in memory.
pub type Block = [u8; BLOCK as usize];

/// Blocks of the hash area for `data_blocks` data blocks, superblock
/// included: to size a verity partition before the tree is built.
pub fn hash_blocks(data_blocks: u64) -> u64 {
    let mut total = 1;
    let mut n = data_blocks;
    while n > 1 {
        n = n.div_ceil(PER_BLOCK as u64);
        total += n;
    }
    total
}

/// sha256(salt || block), hash type 1, with the salt fed once.
#[derive(Clone)]
pub struct Hasher {
    salted: Sha256,
}

impl Hasher {
    pub fn new(salt: &[u8]) -> Hasher {
        Hasher { salted: Sha256::new().chain_update(salt) }
    }

    /// The digest of one data or hash block.
    pub fn digest(&self, block: &[u8]) -> [u8; DIGEST] {
        self.salted.clone().chain_update(block).finalize().into()
    }
}

/// Up to [`PER_BLOCK`] digests packed into one hash block, zero-padded.
pub fn pack(digests: &[[u8; DIGEST]]) -> Block {
    debug_assert!(digests.len() <= PER_BLOCK);
    let mut block = [0u8; BLOCK as usize];
    for (slot, d) in block.chunks_exact_mut(DIGEST).zip(digests) {
        slot.copy_from_slice(d);
    }
    block
}

/// Builds a tree from the data, a whole number of blocks at a time.
pub struct TreeBuilder {
    hasher: Hasher,
    level0: Vec<[u8; DIGEST]>,
}

impl TreeBuilder {
    /// A builder for a tree with `salt`; `data_blocks` is the expected count,
    /// a hint only (capped, since it is only a promise until the data has
    /// been read).
    pub fn new(salt: &[u8], data_blocks: u64) -> TreeBuilder {
        TreeBuilder { hasher: Hasher::new(salt), level0: Vec::with_capacity(data_blocks.min(1 << 20) as usize) }
    }

    /// Hashes the next data blocks. Panics unless `data` is a whole number
    /// of [`BLOCK`]s.
    pub fn push(&mut self, data: &[u8]) {
        assert!(data.len().is_multiple_of(BLOCK as usize), "verity data of {} bytes is not whole 4096-byte blocks", data.len());
        let hasher = &self.hasher;
        self.level0.extend(data.chunks_exact(BLOCK as usize).map(|b| hasher.digest(b)));
    }

    /// Data blocks pushed so far.
    pub fn data_blocks(&self) -> u64 {
        self.level0.len() as u64
    }

    /// Hashes the levels above the data. Panics if no block was pushed:
    /// dm-verity has no tree for empty data.
    pub fn finish(self) -> Tree {
        assert!(!self.level0.is_empty(), "a dm-verity tree needs at least one data block");
        let mut levels = vec![self.level0];
        while let Some(last) = levels.last().filter(|l| l.len() > 1) {
            let next = last.chunks(PER_BLOCK).map(|ds| self.hasher.digest(&pack(ds))).collect();
            levels.push(next);
        }
        let tree = Tree { levels };
        debug_assert_eq!(tree.hash_blocks(), hash_blocks(tree.data_blocks()));
        tree
    }
}

/// A computed tree: the digests of every level.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tree {
    /// levels[0]: one digest per data block; levels[i + 1]: one per hash
    /// block of levels[i]. The last is a single digest: the root hash.
    levels: Vec<Vec<[u8; DIGEST]>>,
}

impl Tree {
    pub fn root_hash(&self) -> [u8; DIGEST] {
        self.levels.last().expect("never empty")[0]
    }

    pub fn data_blocks(&self) -> u64 {
        self.levels[0].len() as u64
    }

    /// Blocks of the hash area, superblock included.
    pub fn hash_blocks(&self) -> u64 {
        1 + self.stored().iter().map(|l| l.len().div_ceil(PER_BLOCK) as u64).sum::<u64>()
    }

    /// The hash blocks that follow the superblock, in their on-disk order
    /// (root-most level first): block i of this is block i + 1 of the hash
    /// area.
    pub fn blocks(&self) -> impl Iterator<Item = Block> + '_ {
        self.stored().iter().rev().flat_map(|level| level.chunks(PER_BLOCK).map(pack))
    }

    /// The levels written to disk: all but the root hash.
    fn stored(&self) -> &[Vec<[u8; DIGEST]>] {
        &self.levels[..self.levels.len() - 1]
    }
}

/// The veritysetup superblock (`struct verity_sb`, little-endian) for a tree
/// of `data_blocks` blocks, padded to a whole hash block. The salt must be
/// at most [`MAX_SALT`] bytes.
pub fn superblock(data_blocks: u64, salt: &[u8], uuid: [u8; 16]) -> Block {
    assert!(salt.len() <= MAX_SALT, "a dm-verity salt of {} bytes (at most {MAX_SALT})", salt.len());
    let mut block = [0u8; BLOCK as usize];
    block[0..8].copy_from_slice(b"verity\0\0");
    block[8..12].copy_from_slice(&1u32.to_le_bytes()); // superblock version
    block[12..16].copy_from_slice(&1u32.to_le_bytes()); // hash type: normal (salt first)
    block[16..32].copy_from_slice(&uuid);
    block[32..38].copy_from_slice(b"sha256"); // NUL-padded to 32
    block[64..68].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    block[68..72].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    block[72..80].copy_from_slice(&data_blocks.to_le_bytes());
    block[80..82].copy_from_slice(&(salt.len() as u16).to_le_bytes());
    // 6 bytes of padding, then salt[256], then padding up to 512.
    block[88..88 + salt.len()].copy_from_slice(salt);
    block
}

/// The superblock `veritysetup format` writes at the start of the hash
/// device (`struct verity_sb`, little-endian).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VeritySuperblock {
    pub uuid: [u8; 16],
    pub data_block_size: u32,
    pub hash_block_size: u32,
    pub data_blocks: u64,
    pub salt: Vec<u8>,
}

impl VeritySuperblock {
    pub fn parse(b: &[u8]) -> Result<VeritySuperblock, String> {
        if b.len() < SUPERBLOCK_LEN {
            return Err(format!("shorter than the {SUPERBLOCK_LEN}-byte superblock"));
        }
        if &b[0..8] != b"verity\0\0" {
            return Err("no dm-verity superblock (magic \"verity\") at its start".into());
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let version = u32_at(8);
        if version != 1 {
            return Err(format!("superblock version {version}; only version 1 is known"));
        }
        let hash_type = u32_at(12);
        if hash_type != 1 {
            return Err(format!("hash type {hash_type}; kiln uses type 1 (veritysetup's default)"));
        }
        let alg: Vec<u8> = b[32..64].iter().copied().take_while(|c| *c != 0).collect();
        if alg != b"sha256" {
            return Err(format!("hash algorithm {:?}; the root hash on the cmdline is sha256", String::from_utf8_lossy(&alg)));
        }
        let (dbs, hbs) = (u32_at(64), u32_at(68));
        for (what, s) in [("data", dbs), ("hash", hbs)] {
            if !s.is_power_of_two() || !(512..=4096).contains(&s) {
                return Err(format!("{what} block size {s}; dm-verity needs a power of two from 512 to 4096"));
            }
        }
        let mut n = [0u8; 8];
        n.copy_from_slice(&b[72..80]);
        let data_blocks = u64::from_le_bytes(n);
        if data_blocks == 0 {
            return Err("0 data blocks".into());
        }
        // The superblock is not covered by the root hash: its size must not
        // overflow `data_bytes` (nor `hash_bytes`, which is smaller).
        if data_blocks.checked_mul(u64::from(dbs)).is_none() {
            return Err(format!("{data_blocks} data blocks of {dbs} bytes is more than any device holds"));
        }
        let salt_len = u16::from_le_bytes([b[80], b[81]]) as usize;
        if salt_len > MAX_SALT {
            return Err(format!("salt of {salt_len} bytes; at most {MAX_SALT} fit"));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        Ok(VeritySuperblock { uuid, data_block_size: dbs, hash_block_size: hbs, data_blocks, salt: b[88..88 + salt_len].to_vec() })
    }

    pub fn data_bytes(&self) -> u64 {
        self.data_blocks * self.data_block_size as u64
    }

    /// Bytes of the hash device used: the superblock block and the tree.
    pub fn hash_bytes(&self) -> u64 {
        let per = (self.hash_block_size / 32) as u64;
        let (mut total, mut n) = (1u64, self.data_blocks);
        while n > 1 {
            n = n.div_ceil(per);
            total += n;
        }
        total * self.hash_block_size as u64
    }

    pub fn salt_hex(&self) -> String {
        if self.salt.is_empty() {
            "-".into()
        } else {
            hex(&self.salt)
        }
    }
}

/// A superblock as [`superblock`] writes it, with 4096-byte data and hash
/// blocks: what the updater recomputes a tree with.
pub fn parse_superblock(b: &[u8]) -> Result<VeritySuperblock, String> {
    let sb = VeritySuperblock::parse(b)?;
    if sb.data_block_size != BLOCK as u32 || sb.hash_block_size != BLOCK as u32 {
        return Err(format!("block sizes {} and {}, not {BLOCK}", sb.data_block_size, sb.hash_block_size));
    }
    Ok(sb)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree_of(data: &[u8], salt: &[u8]) -> Tree {
        let mut t = TreeBuilder::new(salt, 0);
        t.push(data);
        t.finish()
    }

    #[test]
    fn hash_area_sizes() {
        // Superblock + levels: ceil(n/128), ceil(n/128^2), … down to one block.
        assert_eq!(hash_blocks(1), 1);
        assert_eq!(hash_blocks(2), 2);
        assert_eq!(hash_blocks(128), 2);
        assert_eq!(hash_blocks(129), 4);
        assert_eq!(hash_blocks(128 * 128), 1 + 128 + 1);
        assert_eq!(hash_blocks(16384 + 5), 1 + 129 + 2 + 1);
        // A 1 GiB squashfs needs a little over 8 MiB of hash area.
        assert_eq!(hash_blocks(262_144), 1 + 2048 + 16 + 1);
    }

    #[test]
    fn one_block_is_its_own_root() {
        let data = [0x5a; BLOCK as usize];
        let t = tree_of(&data, b"salt");
        let want: [u8; 32] = Sha256::new().chain_update(b"salt").chain_update(data).finalize().into();
        assert_eq!(t.root_hash(), want);
        assert_eq!((t.data_blocks(), t.hash_blocks(), t.blocks().count()), (1, 1, 0));
    }

    #[test]
    fn levels_are_packed_root_most_first() {
        // 129 blocks: level 0 is two hash blocks, level 1 one block.
        let data: Vec<u8> = (0..129 * BLOCK as usize).map(|i| (i / BLOCK as usize) as u8).collect();
        let h = Hasher::new(&[1, 2, 3]);
        let l0: Vec<[u8; 32]> = data.chunks(BLOCK as usize).map(|b| h.digest(b)).collect();
        let (b1, b2) = (pack(&l0[..128]), pack(&l0[128..]));
        let top = pack(&[h.digest(&b1), h.digest(&b2)]);
        let t = tree_of(&data, &[1, 2, 3]);
        assert_eq!(t.blocks().collect::<Vec<_>>(), [top, b1, b2]);
        assert_eq!(t.root_hash(), h.digest(&top));
        assert_eq!(t.hash_blocks(), hash_blocks(129));
        assert!(b2[32..].iter().all(|&b| b == 0), "zero-padded");
        // Pushed in pieces, the same tree.
        let mut pieces = TreeBuilder::new(&[1, 2, 3], 129);
        for c in data.chunks(7 * BLOCK as usize) {
            pieces.push(c);
        }
        assert_eq!(pieces.data_blocks(), 129);
        assert_eq!(pieces.finish(), t);
    }

    #[test]
    #[should_panic(expected = "not whole 4096-byte blocks")]
    fn partial_blocks_are_refused() {
        TreeBuilder::new(&[], 1).push(&[0; 100]);
    }

    /// A data block count whose size in bytes overflows made `data_bytes`
    /// and `hash_bytes` panic (seen reviewing what the gpt_mbr fuzz target
    /// reaches, init/fuzz).
    #[test]
    fn a_superblock_larger_than_a_u64_is_refused() {
        let mut b = superblock(300, b"salt", [7; 16]).to_vec();
        assert_eq!(VeritySuperblock::parse(&b).unwrap().data_bytes(), 300 * 4096);
        b[72..80].copy_from_slice(&(u64::MAX / 4096).to_le_bytes());
        let sb = VeritySuperblock::parse(&b).unwrap();
        assert!(sb.hash_bytes() > sb.data_bytes() / 128);
        b[72..80].copy_from_slice(&(u64::MAX / 4096 + 1).to_le_bytes());
        let e = VeritySuperblock::parse(&b).unwrap_err();
        assert!(e.contains("more than any device holds"), "{e}");
    }

    #[test]
    fn superblocks() {
        let b = superblock(7, &[0xab, 0xcd], [0x11; 16]);
        assert_eq!(&b[..8], b"verity\0\0");
        assert_eq!(b[8..16], [1, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(b[16..32], [0x11; 16]);
        assert_eq!(b[64..72], [0, 0x10, 0, 0, 0, 0x10, 0, 0]);
        let sb = parse_superblock(&b).unwrap();
        assert_eq!((sb.data_blocks, sb.salt.as_slice(), sb.uuid), (7, &[0xab, 0xcd][..], [0x11; 16]));
        let big = superblock(1, &[9; MAX_SALT], [0; 16]);
        assert_eq!(parse_superblock(&big).unwrap().salt, [9; MAX_SALT]);
        let mut sha1 = b;
        sha1[32..38].copy_from_slice(b"sha1\0\0");
        assert!(parse_superblock(&sha1).unwrap_err().contains("sha1"));
        let mut small = b;
        small[64..66].copy_from_slice(&[0, 2]);
        assert!(parse_superblock(&small).unwrap_err().contains("block sizes"));
        let mut long_salt = b;
        long_salt[80..82].copy_from_slice(&257u16.to_le_bytes());
        assert!(parse_superblock(&long_salt).unwrap_err().contains("257"));
        assert!(parse_superblock(&superblock(0, &[], [0; 16])).unwrap_err().contains("0 data blocks"));
        assert!(parse_superblock(&[0u8; 4096]).is_err());
        assert!(parse_superblock(&b[..100]).is_err());
    }
}
