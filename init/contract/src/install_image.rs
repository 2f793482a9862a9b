//! The install image (`KILNIMG1`): everything of `disk.raw` except the root
//! filesystem and its dm-verity tree, which the ISO already carries and the
//! installer reads from their own (verified) devices. Shared by the builder
//! (`kiln::image::install` writes it) and the installer (kiln-init's
//! `node::install::write` writes a disk from it).
//!
//! # Format, version 1
//!
//! All integers are little-endian.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "KILNIMG1"
//! 8       4     version = 1
//! 12      4     n: number of runs (at most MAX_RUNS)
//! 16      8     disk_bytes: size of the source disk image (a multiple of 512)
//! 24      8     reserved, zero
//! 32      64*n  runs, each:
//!                 0   8   disk_offset
//!                 8   8   len (> 0)
//!                 16  1   source: 0 zero, 1 packed, 2 root, 3 verity
//!                 17  7   reserved, zero
//!                 24  8   source_offset (0 for zero runs)
//!                 32  32  sha256 of the run's bytes (all zero for zero runs)
//! 32+64n  32    sha256 of bytes [0, 32+64n): the header digest
//! ...           zero padding up to packed_start = round_up(64+64n, 4096)
//! packed_start  the packed area: the bytes of the packed runs, back to back
//! ```
//!
//! Rules, all checked by [`Header::decode`]: runs are sorted by
//! `disk_offset`, do not overlap and end inside `disk_bytes`; packed runs
//! follow each other in the packed area in run order (the first at offset 0,
//! no gaps), so the installer reads the image front to back once per pass;
//! the file ends exactly where the packed area does.
//!
//! A run's source says where its bytes come from:
//! - `Packed`: the packed area of this file;
//! - `Root` / `Verity`: the root squashfs / its hash tree, read from the
//!   devices the installer is given (on the node, through dm-verity);
//! - `Zero`: zeros. The writer emits these for the zero blocks of the ESP,
//!   the data partition and the table areas, so that a disk that held
//!   something before ends up equal to `disk.raw` there: ext4 and FAT both
//!   trust some zeroed metadata (inode tables, FAT entries) to be zero. Slots
//!   of the root's kind other than root-a (the B slots), and the part of the
//!   root-a slots after the squashfs and tree, are left as they were.
//!
//! The header digest only detects damage. Since it covers every run's
//! sha256, pinning it somewhere trusted (a signed cmdline) would make the
//! whole disk authenticated: the installer's `apply_pinned` does.

// `is_multiple_of` needs Rust 1.87; the workspace promises 1.80.
#![allow(clippy::manual_is_multiple_of)]

use std::io::{self, Read};
use crate::digest::{sha256, Sha256};

pub const MAGIC: &[u8; 8] = b"KILNIMG1";
pub const VERSION: u32 = 1;
/// Bounds the header a reader must hold in memory (4 MiB).
pub const MAX_RUNS: u32 = 1 << 16;
pub const FIXED_LEN: u64 = 32;
pub const RUN_LEN: u64 = 64;
pub const DIGEST_LEN: u64 = 32;
/// The packed area starts on this boundary of the file.
pub const ALIGN: u64 = 4096;
pub const SECTOR: u64 = 512;
/// Protective MBR, primary GPT header and a 128-entry array.
pub const PRIMARY_GPT_BYTES: u64 = 34 * SECTOR;
/// Backup entry array and backup header, at the end of the disk.
pub const BACKUP_GPT_BYTES: u64 = 33 * SECTOR;
/// Copy and hash in pieces of this size; nothing bigger is held in memory.
pub const CHUNK: usize = 1 << 20;
/// The installer zeroes this much at both ends of the target first.
pub const WIPE_BYTES: u64 = 1 << 20;

/// Where a run's bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Zero,
    Packed { offset: u64 },
    Root { offset: u64 },
    Verity { offset: u64 },
}

impl Source {
    fn tag(self) -> u8 {
        match self {
            Source::Zero => 0,
            Source::Packed { .. } => 1,
            Source::Root { .. } => 2,
            Source::Verity { .. } => 3,
        }
    }

    fn offset(self) -> u64 {
        match self {
            Source::Zero => 0,
            Source::Packed { offset } | Source::Root { offset } | Source::Verity { offset } => {
                offset
            }
        }
    }
}

/// One range of the disk and where its bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub disk_offset: u64,
    pub len: u64,
    pub source: Source,
    /// sha256 of the run's bytes; all zero for [`Source::Zero`].
    pub sha256: [u8; 32],
}

impl Run {
    /// One past the last byte (saturating: `validate` refuses overflow).
    pub fn end(&self) -> u64 {
        self.disk_offset.saturating_add(self.len)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.disk_offset.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.push(self.source.tag());
        out.extend_from_slice(&[0; 7]);
        out.extend_from_slice(&self.source.offset().to_le_bytes());
        out.extend_from_slice(&self.sha256);
    }

    fn decode(i: usize, b: &[u8]) -> Result<Run, FormatError> {
        let offset = le64(&b[24..32]);
        let source = match b[16] {
            // The format says 0: anything else would not encode back the
            // same (and the digest would no longer describe the header).
            0 if offset != 0 => {
                return Err(FormatError::Invalid(format!(
                    "zero run {i} has source offset {offset}, not 0"
                )))
            }
            0 => Source::Zero,
            1 => Source::Packed { offset },
            2 => Source::Root { offset },
            3 => Source::Verity { offset },
            t => {
                return Err(FormatError::Invalid(format!(
                    "run {i} has unknown source {t}"
                )))
            }
        };
        if b[17..24].iter().any(|x| *x != 0) {
            return Err(FormatError::Invalid(format!(
                "run {i} has non-zero reserved bytes"
            )));
        }
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&b[32..64]);
        Ok(Run {
            disk_offset: le64(&b[0..8]),
            len: le64(&b[8..16]),
            source,
            sha256,
        })
    }
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// What is wrong with an install image's header or layout.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not a kiln install image (magic {0:?}, expected \"KILNIMG1\")")]
    Magic(String),
    #[error("install image version {0}; this kiln-init reads version {VERSION}")]
    Version(u32),
    #[error("the file ends inside the header ({0})")]
    ShortHeader(String),
    #[error("header checksum mismatch: the header is damaged")]
    HeaderDigest,
    #[error("{0}")]
    Invalid(String),
    #[error("reading the header: {0}")]
    Io(io::Error),
}

/// The header of an install image: the disk it describes, run by run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub disk_bytes: u64,
    pub runs: Vec<Run>,
}

impl Header {
    /// Checks the rules of the format (see the module docs).
    pub fn validate(&self) -> Result<(), FormatError> {
        let bad = |s: String| Err(FormatError::Invalid(s));
        if self.disk_bytes % SECTOR != 0 || self.disk_bytes < PRIMARY_GPT_BYTES + BACKUP_GPT_BYTES {
            return bad(format!(
                "disk size {} is not a multiple of 512 of at least {} bytes",
                self.disk_bytes,
                PRIMARY_GPT_BYTES + BACKUP_GPT_BYTES
            ));
        }
        if self.runs.len() > MAX_RUNS as usize {
            return bad(format!(
                "{} runs, more than the {MAX_RUNS} allowed",
                self.runs.len()
            ));
        }
        let mut prev_end = 0u64;
        let mut packed = 0u64;
        for (i, r) in self.runs.iter().enumerate() {
            if r.len == 0 {
                return bad(format!("run {i} is empty"));
            }
            let end = match r.disk_offset.checked_add(r.len) {
                Some(e) if e <= self.disk_bytes => e,
                _ => {
                    return bad(format!(
                        "run {i} ({} bytes at disk offset {}) ends past the disk size {}",
                        r.len, r.disk_offset, self.disk_bytes
                    ))
                }
            };
            if r.disk_offset < prev_end {
                return bad(format!("run {i} at disk offset {} overlaps or precedes the run before it (which ends at {prev_end})", r.disk_offset));
            }
            prev_end = end;
            match r.source {
                Source::Zero if r.sha256 != [0; 32] => {
                    return bad(format!("zero run {i} has a checksum"))
                }
                Source::Packed { offset } if offset != packed => {
                    return bad(format!("packed run {i} starts at packed offset {offset}, expected {packed} (packed runs are stored back to back)"));
                }
                Source::Packed { .. } => packed += r.len,
                Source::Root { offset } | Source::Verity { offset }
                    if offset.checked_add(r.len).is_none() =>
                {
                    return bad(format!(
                        "run {i}: source offset {offset} plus length {} overflows",
                        r.len
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Header bytes without the digest: fixed part and run table.
    fn table_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity((FIXED_LEN + RUN_LEN * self.runs.len() as u64) as usize);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.runs.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.disk_bytes.to_le_bytes());
        out.extend_from_slice(&[0; 8]);
        for r in &self.runs {
            r.encode(&mut out);
        }
        out
    }

    /// The header digest, as stored after the run table.
    pub fn digest(&self) -> [u8; 32] {
        sha256(&self.table_bytes())
    }

    /// Everything before the packed area: table, digest and padding.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        self.validate()?;
        let mut out = self.table_bytes();
        out.extend_from_slice(&sha256(&out));
        out.resize(self.packed_start() as usize, 0);
        Ok(out)
    }

    /// Reads and checks a header, leaving `r` at the start of the packed
    /// area. Never reads more than the run table's size (at most 4 MiB).
    pub fn decode<R: Read>(r: &mut R) -> Result<Header, FormatError> {
        let mut fixed = [0u8; FIXED_LEN as usize];
        read_header_part(r, &mut fixed, "the fixed part")?;
        if &fixed[..8] != MAGIC {
            return Err(FormatError::Magic(
                String::from_utf8_lossy(&fixed[..8]).into_owned(),
            ));
        }
        let version = le32(&fixed[8..12]);
        if version != VERSION {
            return Err(FormatError::Version(version));
        }
        let n = le32(&fixed[12..16]);
        if n > MAX_RUNS {
            return Err(FormatError::Invalid(format!(
                "{n} runs, more than the {MAX_RUNS} allowed"
            )));
        }
        let mut rest = vec![0u8; (RUN_LEN * n as u64 + DIGEST_LEN) as usize];
        read_header_part(r, &mut rest, &format!("the table of {n} runs"))?;
        let table_len = rest.len() - DIGEST_LEN as usize;
        let mut h = Sha256::new();
        h.update(&fixed);
        h.update(&rest[..table_len]);
        if h.finalize()[..] != rest[table_len..] {
            return Err(FormatError::HeaderDigest);
        }
        let header = Self::parse_table(&fixed, &rest[..table_len])?;
        let mut pad =
            vec![0u8; (header.packed_start() - FIXED_LEN - table_len as u64 - DIGEST_LEN) as usize];
        read_header_part(r, &mut pad, "the padding after the header")?;
        if pad.iter().any(|b| *b != 0) {
            return Err(FormatError::Invalid(
                "the padding after the header is not zero".into(),
            ));
        }
        Ok(header)
    }

    /// The fixed part and run table, without the digest check.
    fn parse_table(fixed: &[u8], table: &[u8]) -> Result<Header, FormatError> {
        if fixed[24..32].iter().any(|b| *b != 0) {
            return Err(FormatError::Invalid(
                "non-zero reserved bytes in the header".into(),
            ));
        }
        let runs = table
            .chunks_exact(RUN_LEN as usize)
            .enumerate()
            .map(|(i, b)| Run::decode(i, b))
            .collect::<Result<Vec<_>, _>>()?;
        let h = Header {
            disk_bytes: le64(&fixed[16..24]),
            runs,
        };
        h.validate()?;
        Ok(h)
    }

    /// Where the packed area starts in the file.
    pub fn packed_start(&self) -> u64 {
        (FIXED_LEN + RUN_LEN * self.runs.len() as u64 + DIGEST_LEN).div_ceil(ALIGN) * ALIGN
    }

    pub fn packed_bytes(&self) -> u64 {
        self.runs
            .iter()
            .filter(|r| matches!(r.source, Source::Packed { .. }))
            .map(|r| r.len)
            .fold(0, u64::saturating_add)
    }

    /// The length of a whole, valid image file with this header.
    pub fn image_bytes(&self) -> u64 {
        self.packed_start().saturating_add(self.packed_bytes())
    }

    /// How many bytes of the root source the runs read.
    pub fn root_bytes(&self) -> u64 {
        self.runs
            .iter()
            .filter_map(|r| {
                if let Source::Root { offset } = r.source {
                    Some(offset + r.len)
                } else {
                    None
                }
            })
            .max()
            .unwrap_or(0)
    }

    pub fn verity_bytes(&self) -> u64 {
        self.runs
            .iter()
            .filter_map(|r| {
                if let Source::Verity { offset } = r.source {
                    Some(offset + r.len)
                } else {
                    None
                }
            })
            .max()
            .unwrap_or(0)
    }

    /// Runs whose bytes end up holding a partition table: the protective MBR
    /// and primary GPT, or the backup GPT. The installer writes these last.
    pub fn is_table_run(&self, r: &Run) -> bool {
        r.source != Source::Zero
            && (r.disk_offset < PRIMARY_GPT_BYTES
                || r.end() > self.disk_bytes.saturating_sub(BACKUP_GPT_BYTES))
    }
}

fn read_header_part<R: Read>(r: &mut R, buf: &mut [u8], what: &str) -> Result<(), FormatError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            FormatError::ShortHeader(what.to_string())
        } else {
            FormatError::Io(e)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::sha256;
    use proptest::prelude::*;
    use std::io::Cursor;

    /// An image whose run table is `table`, with a correct digest, so that
    /// the checks behind the digest get exercised.
    fn with_digest(disk_bytes: u64, table: &[u8]) -> Vec<u8> {
        let n = (table.len() / RUN_LEN as usize) as u32;
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&disk_bytes.to_le_bytes());
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(&table[..n as usize * RUN_LEN as usize]);
        let d = sha256(&b);
        b.extend_from_slice(&d);
        b.resize(b.len().div_ceil(4096) * 4096, 0);
        b
    }

    /// Found by fuzzing (init/fuzz, target bundle): a zero run with a
    /// source offset decoded, but encoded back without it.
    #[test]
    fn a_zero_run_with_a_source_offset_is_refused() {
        let mut run = Vec::new();
        Run { disk_offset: 0, len: 4096, source: Source::Zero, sha256: [0; 32] }.encode(&mut run);
        let img = with_digest(1 << 20, &run);
        assert!(Header::decode(&mut Cursor::new(&img)).is_ok());
        run[24..32].copy_from_slice(&77u64.to_le_bytes());
        let img = with_digest(1 << 20, &run);
        let e = Header::decode(&mut Cursor::new(&img)).unwrap_err().to_string();
        assert!(e.contains("zero run 0 has source offset 77"), "{e}");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = Header::decode(&mut Cursor::new(&bytes));
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&bytes);
            let _ = Header::decode(&mut Cursor::new(&b));
        }

        #[test]
        fn arbitrary_run_tables_never_panic(disk_bytes in any::<u64>(), table in proptest::collection::vec(any::<u8>(), 0..1000)) {
            let img = with_digest(disk_bytes, &table);
            if let Ok(h) = Header::decode(&mut Cursor::new(&img)) {
                // Whatever decodes is valid and encodes back the same.
                prop_assert_eq!(h.encode().unwrap(), img);
            }
        }
    }
}
