//! dm-verity: the hash tree and superblock for the root squashfs, computed in
//! Rust, in the format `veritysetup format` writes with its defaults (hash
//! type 1, sha256, 4096-byte data and hash blocks, superblock at offset 0 of
//! the hash area). `veritysetup verify` accepts the result, and for the same
//! salt and UUID the hash area is byte-identical to veritysetup's.
//!
//! The tree format itself (levels, digests, packing, the superblock) is
//! [`kiln_contract::verity`], shared with the node's update read-back; this
//! module adds the builder's side: deriving salt and UUID, streaming a file
//! through it, the kernel table and the partition UUIDs.

use sha2::{Digest, Sha256};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub use kiln_contract::verity::{hash_blocks, BLOCK, MAX_SALT, SUPERBLOCK_LEN};
use kiln_contract::verity::{superblock, TreeBuilder};

/// Blocks read from the data per `read_exact` (1 MiB).
const READ_CHUNK: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum VerityError {
    #[error("dm-verity: {what} is empty; there is nothing to protect. Check that the root filesystem image was written")]
    Empty { what: String },
    #[error("dm-verity: {what} is {len} bytes, not a multiple of 4096. Pad it with zeros to whole 4 KiB blocks first (verity::pad_to_block)")]
    Unaligned { what: String, len: u64 },
    #[error("dm-verity: the salt is {len} bytes; the superblock holds at most 256. Use verity::derive_salt (32 bytes)")]
    SaltTooLong { len: usize },
    #[error("dm-verity: reading block {block} of {blocks} from {what}: {source}. Was the image changed or truncated while kiln read it?")]
    Read {
        what: String,
        block: u64,
        blocks: u64,
        source: io::Error,
    },
    #[error("dm-verity: writing the hash tree to {what}: {source}. Check free space and permissions there")]
    Write { what: String, source: io::Error },
    #[error("dm-verity: {op} {path}: {source}")]
    File {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// What the hash tree is built with: the data size, a salt and the
/// superblock UUID. [`Params::derive`] makes all three from the data, so the
/// same squashfs always gets the same hash tree and root hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    pub data_blocks: u64,
    /// 32 bytes from [`derive_salt`]; up to [`MAX_SALT`] are allowed.
    pub salt: Vec<u8>,
    /// Superblock UUID, bytes in the order of its string form.
    pub uuid: [u8; 16],
}

impl Params {
    /// Params for `data_len` bytes of data whose sha256 is `data_sha256`.
    pub fn derive(data_sha256: &[u8; 32], data_len: u64) -> Result<Params, VerityError> {
        let data_blocks = blocks_of("the data", data_len)?;
        Ok(Params {
            data_blocks,
            salt: derive_salt(data_sha256),
            uuid: derive_uuid(data_sha256),
        })
    }

    /// Blocks of the hash area, superblock included.
    pub fn hash_blocks(&self) -> u64 {
        hash_blocks(self.data_blocks)
    }
}

/// A built hash tree: what the kernel table and the partition table need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verity {
    pub root_hash: [u8; 32],
    pub salt: Vec<u8>,
    pub data_blocks: u64,
    /// Blocks of the hash area, superblock included (`veritysetup dump`
    /// prints this minus one as "Hash blocks").
    pub hash_blocks: u64,
    /// Superblock UUID, bytes in the order of its string form.
    pub uuid: [u8; 16],
}

/// What the kernel does when a block does not match its hash. Without either,
/// the read fails with EIO and the node carries on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnCorruption {
    Panic,
    Restart,
}

impl OnCorruption {
    /// The dm-verity optional argument.
    pub fn as_str(self) -> &'static str {
        match self {
            OnCorruption::Panic => "panic_on_corruption",
            OnCorruption::Restart => "restart_on_corruption",
        }
    }
}

impl std::str::FromStr for OnCorruption {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "panic_on_corruption" => Ok(OnCorruption::Panic),
            "restart_on_corruption" => Ok(OnCorruption::Restart),
            _ => Err(format!("unknown dm-verity corruption action `{s}`: use `panic_on_corruption` or `restart_on_corruption`")),
        }
    }
}

/// A 128-bit UUID held as its 16 bytes in the order of the string form
/// (RFC 4122 / systemd `sd_id128_t` order), so
/// `00112233-4455-6677-8899-aabbccddeeff` is `[0x00, 0x11, …, 0xff]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// The 16 bytes as a GPT entry stores them: the first three fields
    /// (4, 2 and 2 bytes) little-endian, the last 8 bytes as they are.
    pub fn to_gpt_bytes(self) -> [u8; 16] {
        let b = self.0;
        let mut g = b;
        g[0..4].copy_from_slice(&[b[3], b[2], b[1], b[0]]);
        g[4..6].copy_from_slice(&[b[5], b[4]]);
        g[6..8].copy_from_slice(&[b[7], b[6]]);
        g
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = hex::encode(self.0);
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }
}

impl Verity {
    /// The root hash in lowercase hex, as the kernel cmdline carries it.
    pub fn root_hex(&self) -> String {
        hex::encode(self.root_hash)
    }

    /// The salt in hex; `-` for an empty salt, as dm-verity wants it.
    pub fn salt_hex(&self) -> String {
        if self.salt.is_empty() {
            "-".into()
        } else {
            hex::encode(&self.salt)
        }
    }

    /// Bytes of data covered; on MBR boards this is also the hash offset,
    /// where [`format_in_place`] put the hash area.
    pub fn data_len(&self) -> u64 {
        self.data_blocks * BLOCK
    }

    /// Bytes of the hash area, superblock included.
    pub fn hash_len(&self) -> u64 {
        self.hash_blocks * BLOCK
    }

    /// The device-mapper table line for this tree:
    /// `0 <sectors> verity 1 <data_dev> <hash_dev> 4096 4096 <data_blocks>
    /// <hash_start_block> sha256 <root> <salt> [1 <on_corruption>]`.
    /// `hash_start_block` is in 4096-byte blocks on `hash_dev` and points past
    /// the superblock: 1 for a verity partition of its own,
    /// [`hash_start_block`]`(hash_offset)` when the hash area follows the data.
    pub fn table(
        &self,
        data_dev: &str,
        hash_dev: &str,
        hash_start_block: u64,
        on_corruption: Option<OnCorruption>,
    ) -> String {
        let mut t = format!(
            "0 {} verity 1 {data_dev} {hash_dev} {BLOCK} {BLOCK} {} {hash_start_block} sha256 {} {}",
            self.data_blocks * (BLOCK / 512),
            self.data_blocks,
            self.root_hex(),
            self.salt_hex()
        );
        if let Some(action) = on_corruption {
            t.push_str(" 1 ");
            t.push_str(action.as_str());
        }
        t
    }

    /// PARTUUID of the data (root) partition: the first 128 bits of the root
    /// hash, per the Discoverable Partitions Specification. The bytes are in
    /// hash order, which is the order of the UUID string (systemd copies the
    /// hash bytes into an `sd_id128_t` and compares it with the PARTUUID
    /// string blkid reports). Write it to GPT with [`Uuid::to_gpt_bytes`].
    pub fn data_partition_uuid(&self) -> Uuid {
        let mut b = [0; 16];
        b.copy_from_slice(&self.root_hash[..16]);
        Uuid(b)
    }

    /// PARTUUID of the verity partition: the last 128 bits of the root hash,
    /// same byte order as [`Verity::data_partition_uuid`].
    pub fn hash_partition_uuid(&self) -> Uuid {
        let mut b = [0; 16];
        b.copy_from_slice(&self.root_hash[16..]);
        Uuid(b)
    }
}

/// The kernel table's `hash_start_block` for a hash area (superblock first)
/// that starts `hash_offset` bytes into the hash device; veritysetup's rule.
pub fn hash_start_block(hash_offset: u64) -> u64 {
    (hash_offset + SUPERBLOCK_LEN as u64).div_ceil(BLOCK)
}

/// The salt for data whose sha256 is `data_sha256`: deterministic, so builds
/// are reproducible, and different for every image.
pub fn derive_salt(data_sha256: &[u8; 32]) -> Vec<u8> {
    Sha256::new()
        .chain_update(b"kiln dm-verity salt v1\0")
        .chain_update(data_sha256)
        .finalize()
        .to_vec()
}

/// The superblock UUID for data whose sha256 is `data_sha256`, shaped as a
/// version-4 UUID the way systemd shapes its derived IDs.
pub fn derive_uuid(data_sha256: &[u8; 32]) -> [u8; 16] {
    let h = Sha256::new()
        .chain_update(b"kiln dm-verity uuid v1\0")
        .chain_update(data_sha256)
        .finalize();
    let mut u = [0; 16];
    u.copy_from_slice(&h[..16]);
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// Reads `data_len` bytes of `data` (a multiple of 4096) and writes the hash
/// area (superblock, then the hash levels) to `hash_out`. Only the digests
/// are kept in memory, never the data.
pub fn build(
    data: &mut impl Read,
    data_len: u64,
    salt: &[u8],
    uuid: [u8; 16],
    hash_out: &mut impl Write,
) -> Result<Verity, VerityError> {
    build_named(
        data,
        "the data",
        data_len,
        salt,
        uuid,
        hash_out,
        "the hash output",
    )
}

fn blocks_of(what: &str, len: u64) -> Result<u64, VerityError> {
    if len == 0 {
        return Err(VerityError::Empty { what: what.into() });
    }
    if len.next_multiple_of(BLOCK) != len {
        return Err(VerityError::Unaligned {
            what: what.into(),
            len,
        });
    }
    Ok(len / BLOCK)
}

fn build_named(
    data: &mut impl Read,
    data_what: &str,
    data_len: u64,
    salt: &[u8],
    uuid: [u8; 16],
    hash_out: &mut impl Write,
    hash_what: &str,
) -> Result<Verity, VerityError> {
    let data_blocks = blocks_of(data_what, data_len)?;
    if salt.len() > MAX_SALT {
        return Err(VerityError::SaltTooLong { len: salt.len() });
    }
    let mut tree = TreeBuilder::new(salt, data_blocks);
    let mut buf = vec![0u8; READ_CHUNK * BLOCK as usize];
    let mut done = 0u64;
    while done < data_blocks {
        let n = (data_blocks - done).min(READ_CHUNK as u64) as usize;
        let chunk = &mut buf[..n * BLOCK as usize];
        data.read_exact(chunk).map_err(|source| VerityError::Read {
            what: data_what.into(),
            block: done,
            blocks: data_blocks,
            source,
        })?;
        tree.push(chunk);
        done += n as u64;
    }
    let tree = tree.finish();

    let w = |source| VerityError::Write {
        what: hash_what.into(),
        source,
    };
    hash_out
        .write_all(&superblock(data_blocks, salt, uuid))
        .map_err(w)?;
    for block in tree.blocks() {
        hash_out.write_all(&block).map_err(w)?;
    }
    hash_out.flush().map_err(w)?;

    Ok(Verity {
        root_hash: tree.root_hash(),
        salt: salt.to_vec(),
        data_blocks,
        hash_blocks: tree.hash_blocks(),
        uuid,
    })
}

/// Pads the file at `path` with zeros to a whole number of 4096-byte blocks
/// and returns its new length. Squashfs ignores bytes past its own end, and
/// dm-verity covers whole blocks only.
pub fn pad_to_block(path: &Path) -> Result<u64, VerityError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|source| VerityError::File {
            op: "opening",
            path: path.into(),
            source,
        })?;
    let len = file
        .metadata()
        .map_err(|source| VerityError::File {
            op: "reading the size of",
            path: path.into(),
            source,
        })?
        .len();
    if len == 0 {
        return Err(VerityError::Empty {
            what: path.display().to_string(),
        });
    }
    let padded = len.next_multiple_of(BLOCK);
    if padded != len {
        file.set_len(padded).map_err(|source| VerityError::File {
            op: "padding",
            path: path.into(),
            source,
        })?;
    }
    Ok(padded)
}

/// sha256 of the first `len` bytes of `path`, and the params derived from it.
fn derive_for(path: &Path, len: u64) -> Result<Params, VerityError> {
    let mut f = File::open(path).map_err(|source| VerityError::File {
        op: "opening",
        path: path.into(),
        source,
    })?;
    let mut h = Sha256::new();
    let copied = io::copy(&mut (&mut f).take(len), &mut h).map_err(|source| VerityError::File {
        op: "reading",
        path: path.into(),
        source,
    })?;
    if copied != len {
        let source = io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{copied} of {len} bytes"),
        );
        return Err(VerityError::File {
            op: "reading",
            path: path.into(),
            source,
        });
    }
    Params::derive(&h.finalize().into(), len)
}

fn build_from_path(
    data: &Path,
    p: &Params,
    hash_out: &mut impl Write,
    hash_what: &str,
) -> Result<Verity, VerityError> {
    let f = File::open(data).map_err(|source| VerityError::File {
        op: "opening",
        path: data.into(),
        source,
    })?;
    let data_what = data.display().to_string();
    build_named(
        &mut f.take(p.data_blocks * BLOCK),
        &data_what,
        p.data_blocks * BLOCK,
        &p.salt,
        p.uuid,
        hash_out,
        hash_what,
    )
}

/// GPT layout: pads `data` (the squashfs) to whole blocks and writes its hash
/// area to a new file `hash` (the future verity partition). Salt and UUID
/// are derived from the data.
pub fn format_file(data: &Path, hash: &Path) -> Result<Verity, VerityError> {
    let len = pad_to_block(data)?;
    let params = derive_for(data, len)?;
    let out = File::create(hash).map_err(|source| VerityError::File {
        op: "creating",
        path: hash.into(),
        source,
    })?;
    build_from_path(
        data,
        &params,
        &mut BufWriter::new(out),
        &hash.display().to_string(),
    )
}

/// MBR layout: pads `path` (the bare squashfs) to whole blocks and appends
/// the hash area right after it, at hash offset [`Verity::data_len`]. The
/// kernel table then uses the same device twice, with
/// `hash_start_block(v.data_len())`. Call it once: a second call would take
/// the first hash area for data.
pub fn format_in_place(path: &Path) -> Result<Verity, VerityError> {
    let len = pad_to_block(path)?;
    let params = derive_for(path, len)?;
    let what = format!("{} at offset {len}", path.display());
    let mut out = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|source| VerityError::File {
            op: "opening",
            path: path.into(),
            source,
        })?;
    out.seek(SeekFrom::Start(len))
        .map_err(|source| VerityError::File {
            op: "seeking in",
            path: path.into(),
            source,
        })?;
    // The tree is written only after all data has been read, so reading and
    // appending to the same file cannot race.
    build_from_path(path, &params, &mut BufWriter::new(out), &what)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::process::Output;

    fn have_veritysetup() -> bool {
        kiln_testkit::checker("veritysetup", "cryptsetup-bin").is_some()
    }

    fn run(args: &[&str]) -> Output {
        kiln_testkit::command("veritysetup")
            .args(args)
            .output()
            .expect("running veritysetup")
    }

    fn field<'a>(out: &'a str, name: &str) -> &'a str {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no `{name}` in:\n{out}"))
            .trim()
    }

    /// veritysetup's own `format` of `data` into `hash`; returns the root hex.
    fn reference_format(
        data: &Path,
        hash: &Path,
        salt: &[u8],
        uuid: [u8; 16],
        hash_offset: Option<u64>,
    ) -> String {
        let salt = if salt.is_empty() {
            "-".to_string()
        } else {
            hex::encode(salt)
        };
        let uuid = Uuid(uuid).to_string();
        let offset = hash_offset.map(|o| format!("--hash-offset={o}"));
        let mut args = vec!["format", "--salt", &salt, "--uuid", &uuid];
        args.extend(offset.as_deref());
        args.extend([data.to_str().unwrap(), hash.to_str().unwrap()]);
        let out = run(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "veritysetup format failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        field(&stdout, "Root hash:").to_string()
    }

    fn verify(data: &Path, hash: &Path, root: &str, hash_offset: Option<u64>) -> Output {
        let offset = hash_offset.map(|o| format!("--hash-offset={o}"));
        let mut args = vec!["verify"];
        args.extend(offset.as_deref());
        args.extend([data.to_str().unwrap(), hash.to_str().unwrap(), root]);
        run(&args)
    }

    /// Our tree for `blocks` blocks of noise against veritysetup's, through
    /// `build`, `verify`, `dump` and `format`.
    fn check_against_veritysetup(blocks: u64, seed: u64, salt: &[u8]) {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let hash = dir.path().join("hash");
        let hash2 = dir.path().join("hash2");
        let content = kiln_testkit::noise(seed, (blocks * BLOCK) as usize);
        std::fs::write(&data, &content).unwrap();
        let uuid = derive_uuid(&[seed as u8; 32]);

        let mut out = Vec::new();
        let v = build(
            &mut &content[..],
            content.len() as u64,
            salt,
            uuid,
            &mut out,
        )
        .unwrap();
        assert_eq!(v.data_blocks, blocks);
        assert_eq!(v.hash_blocks, hash_blocks(blocks));
        assert_eq!(out.len() as u64, v.hash_len());
        std::fs::write(&hash, &out).unwrap();

        let o = verify(&data, &hash, &v.root_hex(), None);
        assert!(
            o.status.success(),
            "{blocks} blocks: veritysetup verify failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );

        let o = run(&["dump", hash.to_str().unwrap()]);
        let dump = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "veritysetup dump: {dump}");
        assert_eq!(field(&dump, "UUID:"), Uuid(uuid).to_string());
        assert_eq!(field(&dump, "Hash type:"), "1");
        assert_eq!(field(&dump, "Data blocks:"), blocks.to_string());
        assert_eq!(
            field(&dump, "Hash blocks:"),
            (v.hash_blocks - 1).to_string()
        );
        assert_eq!(field(&dump, "Data block size:"), "4096");
        assert_eq!(field(&dump, "Hash block size:"), "4096");
        assert_eq!(field(&dump, "Hash algorithm:"), "sha256");
        assert_eq!(field(&dump, "Salt:"), v.salt_hex());

        let root = reference_format(&data, &hash2, salt, uuid, None);
        assert_eq!(
            root,
            v.root_hex(),
            "{blocks} blocks: root hash differs from veritysetup's"
        );
        assert!(
            std::fs::read(&hash2).unwrap() == out,
            "{blocks} blocks: hash area differs from veritysetup's"
        );
    }

    #[test]
    fn matches_veritysetup_at_level_edges() {
        if !have_veritysetup() {
            return;
        }
        let salt = derive_salt(&[7; 32]);
        for (i, blocks) in [1, 2, 127, 128, 129, 16384 + 5].into_iter().enumerate() {
            check_against_veritysetup(blocks, i as u64 + 1, &salt);
        }
    }

    #[test]
    fn one_flipped_byte_fails_verify() {
        if !have_veritysetup() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("root.squashfs");
        let hash = dir.path().join("root.verity");
        std::fs::write(&data, kiln_testkit::noise(42, 300 * BLOCK as usize)).unwrap();
        let v = format_file(&data, &hash).unwrap();
        assert!(verify(&data, &hash, &v.root_hex(), None).status.success());

        for (file, at) in [
            (&data, 123_457u64),
            (&data, 0),
            (&data, 300 * BLOCK - 1),
            (&hash, BLOCK + 5),
        ] {
            let good = std::fs::read(file).unwrap();
            let mut bad = good.clone();
            bad[at as usize] ^= 0x01;
            std::fs::write(file, &bad).unwrap();
            let o = verify(&data, &hash, &v.root_hex(), None);
            assert!(
                !o.status.success(),
                "verify passed with byte {at} of {} flipped",
                file.display()
            );
            std::fs::write(file, &good).unwrap();
        }
        assert!(verify(&data, &hash, &v.root_hex(), None).status.success());
    }

    #[test]
    fn format_file_pads_and_is_reproducible() {
        if !have_veritysetup() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("root.squashfs");
        let hash = dir.path().join("root.verity");
        let hash2 = dir.path().join("again.verity");
        std::fs::write(&data, kiln_testkit::noise(9, 5 * BLOCK as usize + 100)).unwrap();
        let v = format_file(&data, &hash).unwrap();
        assert_eq!(std::fs::metadata(&data).unwrap().len(), 6 * BLOCK);
        assert_eq!(v.data_blocks, 6);
        assert_eq!(v.salt.len(), 32);
        assert!(verify(&data, &hash, &v.root_hex(), None).status.success());

        // Same data, same everything.
        let again = format_file(&data, &hash2).unwrap();
        assert_eq!(again, v);
        assert_eq!(
            std::fs::read(&hash).unwrap(),
            std::fs::read(&hash2).unwrap()
        );
        let sha: [u8; 32] = Sha256::digest(std::fs::read(&data).unwrap()).into();
        assert_eq!(v.salt, derive_salt(&sha));
        assert_eq!(v.uuid, derive_uuid(&sha));
    }

    #[test]
    fn in_place_matches_veritysetup_hash_offset() {
        if !have_veritysetup() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let part = dir.path().join("root-a.part");
        let reference = dir.path().join("reference.part");
        let content = kiln_testkit::noise(5, 200 * BLOCK as usize - 1000);
        std::fs::write(&part, &content).unwrap();
        let v = format_in_place(&part).unwrap();
        let offset = v.data_len();
        assert_eq!(offset, 200 * BLOCK);
        assert_eq!(
            std::fs::metadata(&part).unwrap().len(),
            offset + v.hash_len()
        );
        assert_eq!(hash_start_block(offset), 201);

        let o = verify(&part, &part, &v.root_hex(), Some(offset));
        assert!(
            o.status.success(),
            "verify with --hash-offset: {}",
            String::from_utf8_lossy(&o.stderr)
        );

        let mut padded = content.clone();
        padded.resize(offset as usize, 0);
        std::fs::write(&reference, &padded).unwrap();
        let root = reference_format(&reference, &reference, &v.salt, v.uuid, Some(offset));
        assert_eq!(root, v.root_hex());
        assert!(
            std::fs::read(&reference).unwrap() == std::fs::read(&part).unwrap(),
            "in-place image differs from veritysetup's"
        );
    }

    #[test]
    fn root_hash_matches_veritysetup() {
        if !have_veritysetup() {
            return;
        }
        let salt_len = prop_oneof![Just(0usize), Just(32), 1usize..=256];
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(16));
        runner
            .run(
                &(1u64..400, any::<u64>(), salt_len),
                |(blocks, seed, salt_len)| {
                    check_against_veritysetup(blocks, seed, &kiln_testkit::noise(!seed, salt_len));
                    Ok(())
                },
            )
            .unwrap();
    }

    #[test]
    fn single_block_root_is_the_block_hash() {
        let block = kiln_testkit::noise(3, BLOCK as usize);
        let salt = [0xab; 32];
        let mut out = Vec::new();
        let v = build(&mut &block[..], BLOCK, &salt, [0; 16], &mut out).unwrap();
        let want: [u8; 32] = Sha256::new()
            .chain_update(salt)
            .chain_update(&block)
            .finalize()
            .into();
        assert_eq!(v.root_hash, want);
        assert_eq!(v.hash_blocks, 1);
        assert_eq!(out.len(), BLOCK as usize);
    }

    #[test]
    fn superblock_layout() {
        let salt: Vec<u8> = (0..32).collect();
        let uuid = [0x11; 16];
        let mut out = Vec::new();
        build(
            &mut &[0u8; 2 * BLOCK as usize][..],
            2 * BLOCK,
            &salt,
            uuid,
            &mut out,
        )
        .unwrap();
        assert_eq!(&out[..8], b"verity\0\0");
        assert_eq!(out[8..16], [1, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(out[16..32], uuid);
        assert_eq!(
            &out[32..64],
            b"sha256\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
        );
        assert_eq!(out[64..72], [0, 0x10, 0, 0, 0, 0x10, 0, 0]);
        assert_eq!(out[72..80], 2u64.to_le_bytes());
        assert_eq!(out[80..88], [32, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(out[88..120], salt[..]);
        assert!(out[120..BLOCK as usize].iter().all(|&b| b == 0));
    }

    #[test]
    fn rejects_bad_input() {
        let mut sink = Vec::new();
        let e = build(&mut &[][..], 0, &[], [0; 16], &mut sink).unwrap_err();
        assert!(matches!(e, VerityError::Empty { .. }), "{e}");
        let e = build(&mut &[0u8; 5000][..], 5000, &[], [0; 16], &mut sink).unwrap_err();
        assert!(matches!(e, VerityError::Unaligned { len: 5000, .. }), "{e}");
        assert!(e.to_string().contains("multiple of 4096"));
        let e = build(&mut &[0u8; 4096][..], 4096, &[0; 257], [0; 16], &mut sink).unwrap_err();
        assert!(matches!(e, VerityError::SaltTooLong { len: 257 }), "{e}");
        // Data shorter than announced.
        let e = build(&mut &[0u8; 4096][..], 3 * BLOCK, &[], [0; 16], &mut sink).unwrap_err();
        assert!(
            matches!(
                e,
                VerityError::Read {
                    block: 0,
                    blocks: 3,
                    ..
                }
            ),
            "{e}"
        );
        assert!(sink.is_empty(), "nothing is written on error");
    }

    #[test]
    fn table_line() {
        let v = Verity {
            root_hash: core::array::from_fn(|i| i as u8),
            salt: vec![0xab; 32],
            data_blocks: 1000,
            hash_blocks: hash_blocks(1000),
            uuid: [0; 16],
        };
        let root = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
        let salt = "ab".repeat(32);
        assert_eq!(
            v.table("/dev/vda2", "/dev/vda3", 1, None),
            format!("0 8000 verity 1 /dev/vda2 /dev/vda3 4096 4096 1000 1 sha256 {root} {salt}")
        );
        assert_eq!(
            v.table("/dev/mmcblk0p2", "/dev/mmcblk0p2", hash_start_block(v.data_len()), Some(OnCorruption::Restart)),
            format!("0 8000 verity 1 /dev/mmcblk0p2 /dev/mmcblk0p2 4096 4096 1000 1001 sha256 {root} {salt} 1 restart_on_corruption")
        );
        assert!(v
            .table("a", "b", 1, Some(OnCorruption::Panic))
            .ends_with(" 1 panic_on_corruption"));
        let unsalted = Verity { salt: vec![], ..v };
        assert!(unsalted
            .table("a", "b", 1, None)
            .ends_with(&format!("{root} -")));
        assert_eq!("panic_on_corruption".parse(), Ok(OnCorruption::Panic));
        assert_eq!("restart_on_corruption".parse(), Ok(OnCorruption::Restart));
        assert!("panic".parse::<OnCorruption>().is_err());
    }

    #[test]
    fn hash_start_block_follows_veritysetup() {
        assert_eq!(hash_start_block(0), 1);
        assert_eq!(hash_start_block(BLOCK), 2);
        assert_eq!(hash_start_block(100 * BLOCK), 101);
        // veritysetup rounds an unaligned superblock up past its 512 bytes.
        assert_eq!(hash_start_block(3584), 1);
        assert_eq!(hash_start_block(3585), 2);
    }

    #[test]
    fn partition_uuids_are_root_hash_halves() {
        let root = hex::decode("4f68bce3e8cd4db196e7fbcaf984b7092c7357edebd246d9aec123d437ec2bf5")
            .unwrap();
        let v = Verity {
            root_hash: root.try_into().unwrap(),
            salt: vec![],
            data_blocks: 1,
            hash_blocks: 1,
            uuid: [0; 16],
        };
        // The UUID string is the hash bytes in order (systemd's dissect and repart).
        assert_eq!(
            v.data_partition_uuid().to_string(),
            "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
        );
        assert_eq!(
            v.hash_partition_uuid().to_string(),
            "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5"
        );
        assert_eq!(
            hex::encode(v.data_partition_uuid().0) + &hex::encode(v.hash_partition_uuid().0),
            v.root_hex()
        );
        // On disk GPT swaps the first three fields.
        assert_eq!(
            hex::encode(v.data_partition_uuid().to_gpt_bytes()),
            "e3bc684fcde8b14d96e7fbcaf984b709"
        );
    }

    #[test]
    fn gpt_byte_order_of_a_known_guid() {
        // The EFI System Partition type GUID, as every GPT disk stores it.
        let esp = Uuid(
            hex::decode("c12a7328f81f11d2ba4b00a0c93ec93b")
                .unwrap()
                .try_into()
                .unwrap(),
        );
        assert_eq!(esp.to_string(), "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
        assert_eq!(
            esp.to_gpt_bytes(),
            [
                0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
                0xc9, 0x3b
            ]
        );
    }

    #[test]
    fn derived_values_are_stable() {
        let sha = [0x5a; 32];
        assert_eq!(derive_salt(&sha), derive_salt(&sha));
        assert_eq!(derive_salt(&sha).len(), 32);
        assert_ne!(derive_salt(&sha), derive_salt(&[0x5b; 32]));
        let u = derive_uuid(&sha);
        assert_eq!(u[6] >> 4, 4);
        assert_eq!(u[8] >> 6, 0b10);
        let p = Params::derive(&sha, 3 * BLOCK).unwrap();
        assert_eq!((p.data_blocks, p.hash_blocks()), (3, 2));
    }
}
