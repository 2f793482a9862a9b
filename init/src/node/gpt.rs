//! A small GPT reader for stage 1 (the builder's writer lives in another
//! crate). It keeps the raw header and entry array, so [`super::grow`] can
//! rewrite them without losing fields it does not know about.
//!
//! GUIDs are held in the order of their string form; on disk the first three
//! fields are little-endian.

use std::fs::File;
use std::os::unix::fs::FileExt;

pub const SIGNATURE: &[u8; 8] = b"EFI PART";
/// The smallest header the UEFI spec defines (through the entries CRC).
pub const MIN_HEADER_SIZE: u32 = 92;
/// Refuse entry arrays larger than this; real ones are 16 KiB.
const MAX_ENTRIES_BYTES: u64 = 1 << 20;

/// Partition type GUIDs stage 1 looks at (FORMATS.md).
pub const ESP_TYPE: Guid = Guid([0xc1, 0x2a, 0x73, 0x28, 0xf8, 0x1f, 0x11, 0xd2, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b]);

#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error("no GPT: {0}")]
    NotGpt(String),
    #[error("reading the partition table: {0}")]
    Io(#[from] std::io::Error),
}

pub use kiln_contract::guid::Guid;

/// The fields of a GPT header stage 1 uses; `raw` is the whole header
/// sector as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub header_size: u32,
    pub my_lba: u64,
    pub alternate_lba: u64,
    pub first_usable: u64,
    pub last_usable: u64,
    pub entries_lba: u64,
    pub entry_count: u32,
    pub entry_size: u32,
    pub entries_crc: u32,
    pub raw: Vec<u8>,
}

impl Header {
    /// Parses and checks one header sector (signature, size, CRC).
    pub fn parse(sector: &[u8]) -> Result<Header, GptError> {
        let bad = |s: &str| GptError::NotGpt(s.to_string());
        if sector.len() < 512 || &sector[0..8] != SIGNATURE {
            return Err(bad("no \"EFI PART\" signature"));
        }
        let u32_at = |o: usize| u32::from_le_bytes([sector[o], sector[o + 1], sector[o + 2], sector[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&sector[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let header_size = u32_at(12);
        if header_size < MIN_HEADER_SIZE || header_size as usize > sector.len() {
            return Err(bad(&format!("header size {header_size} is out of range")));
        }
        let mut copy = sector[..header_size as usize].to_vec();
        copy[16..20].fill(0);
        if crc32(&copy) != u32_at(16) {
            return Err(bad("header CRC mismatch"));
        }
        let h = Header {
            header_size,
            my_lba: u64_at(24),
            alternate_lba: u64_at(32),
            first_usable: u64_at(40),
            last_usable: u64_at(48),
            entries_lba: u64_at(72),
            entry_count: u32_at(80),
            entry_size: u32_at(84),
            entries_crc: u32_at(88),
            raw: sector.to_vec(),
        };
        if h.entry_size < 128 || h.entry_size & 7 != 0 {
            return Err(bad(&format!("entry size {} is not a multiple of 8 of at least 128", h.entry_size)));
        }
        if h.entries_bytes() > MAX_ENTRIES_BYTES {
            return Err(bad(&format!("{} entries of {} bytes is implausibly large", h.entry_count, h.entry_size)));
        }
        Ok(h)
    }

    pub fn entries_bytes(&self) -> u64 {
        self.entry_count as u64 * self.entry_size as u64
    }

    /// The header sector with new LBAs and CRCs (`raw` is left alone).
    pub fn encode(&self, my_lba: u64, alternate_lba: u64, last_usable: u64, entries_lba: u64, entries_crc: u32) -> Vec<u8> {
        let mut s = self.raw.clone();
        s[24..32].copy_from_slice(&my_lba.to_le_bytes());
        s[32..40].copy_from_slice(&alternate_lba.to_le_bytes());
        s[48..56].copy_from_slice(&last_usable.to_le_bytes());
        s[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        s[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        s[16..20].fill(0);
        let crc = crc32(&s[..self.header_size as usize]);
        s[16..20].copy_from_slice(&crc.to_le_bytes());
        s
    }
}

/// One used entry of the table. `number` is the kernel's partition number
/// (entry index + 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    pub number: u32,
    pub type_guid: Guid,
    pub uuid: Guid,
    pub first_lba: u64,
    pub last_lba: u64,
    pub attributes: u64,
    pub name: String,
}

impl Partition {
    fn parse(number: u32, e: &[u8]) -> Option<Partition> {
        let type_guid = Guid::from_gpt_slice(e, 0).unwrap_or_default();
        if type_guid.is_nil() {
            return None;
        }
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&e[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let units: Vec<u16> = e[56..128].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|u| *u != 0).collect();
        Some(Partition {
            number,
            type_guid,
            uuid: Guid::from_gpt_slice(e, 16).unwrap_or_default(),
            first_lba: u64_at(32),
            last_lba: u64_at(40),
            attributes: u64_at(48),
            name: String::from_utf16_lossy(&units),
        })
    }
}

/// A partition table as read from a disk of `lba_size`-byte blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gpt {
    pub lba_size: u64,
    pub header: Header,
    /// The whole entry array, as read.
    pub entries: Vec<u8>,
    /// True when the primary header was unusable and the backup was read.
    pub from_backup: bool,
}

impl Gpt {
    /// Parses a header sector and its entry array (checking the entries CRC).
    pub fn parse(lba_size: u64, header: &[u8], entries: &[u8]) -> Result<Gpt, GptError> {
        let header = Header::parse(header)?;
        let n = header.entries_bytes() as usize;
        if entries.len() < n {
            return Err(GptError::NotGpt("entry array is short".into()));
        }
        if crc32(&entries[..n]) != header.entries_crc {
            return Err(GptError::NotGpt("entry array CRC mismatch".into()));
        }
        // Growing rewrites the entries at this LBA: it must be a byte offset.
        if header.entries_lba.checked_mul(lba_size).is_none() {
            return Err(GptError::NotGpt(format!("entry array LBA {} is past any disk", header.entries_lba)));
        }
        Ok(Gpt { lba_size, header, entries: entries[..n].to_vec(), from_backup: false })
    }

    /// Reads the primary table, or the backup at the last LBA when the
    /// primary is damaged.
    pub fn read(dev: &File, lba_size: u64, disk_bytes: u64) -> Result<Gpt, GptError> {
        let primary = Self::read_at(dev, lba_size, 1);
        match primary {
            Ok(g) => Ok(g),
            Err(GptError::Io(e)) => Err(GptError::Io(e)),
            Err(first) => {
                let last = (disk_bytes / lba_size).saturating_sub(1);
                if last < 2 {
                    return Err(first);
                }
                let mut g = Self::read_at(dev, lba_size, last).map_err(|_| first)?;
                g.from_backup = true;
                Ok(g)
            }
        }
    }

    fn read_at(dev: &File, lba_size: u64, lba: u64) -> Result<Gpt, GptError> {
        let mut sector = vec![0u8; lba_size as usize];
        dev.read_exact_at(&mut sector, lba * lba_size)?;
        let h = Header::parse(&sector)?;
        let mut entries = vec![0u8; h.entries_bytes() as usize];
        let at = h.entries_lba.checked_mul(lba_size).ok_or_else(|| GptError::NotGpt(format!("entry array LBA {} is past any disk", h.entries_lba)))?;
        dev.read_exact_at(&mut entries, at)?;
        Self::parse(lba_size, &sector, &entries)
    }

    /// The used entries.
    pub fn partitions(&self) -> Vec<Partition> {
        let size = self.header.entry_size as usize;
        self.entries.chunks_exact(size).enumerate().filter_map(|(i, e)| Partition::parse(i as u32 + 1, e)).collect()
    }

    /// The entry whose name is `name` (case-insensitive).
    pub fn by_name(&self, name: &str) -> Option<Partition> {
        self.partitions().into_iter().find(|p| p.name.eq_ignore_ascii_case(name))
    }

    /// Blocks taken by one copy of the entry array.
    pub fn entry_lbas(&self) -> u64 {
        self.header.entries_bytes().div_ceil(self.lba_size)
    }
}

/// The disk signature of an MBR (sector 0); none for a protective MBR
/// (GPT) or no table.
pub fn mbr_signature(sector0: &[u8]) -> Option<u32> {
    if sector0.len() < 512 || sector0[510..512] != [0x55, 0xAA] || sector0[450] == 0xEE {
        return None;
    }
    Some(u32::from_le_bytes([sector0[440], sector0[441], sector0[442], sector0[443]]))
}

pub use kiln_contract::digest::crc32;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn mbr_signature_of_sector_zero() {
        let mut s = [0u8; 512];
        assert_eq!(mbr_signature(&s), None);
        s[440..444].copy_from_slice(&0x1a2b_3c4du32.to_le_bytes());
        s[510] = 0x55;
        s[511] = 0xAA;
        s[450] = 0x0c;
        assert_eq!(mbr_signature(&s), Some(0x1a2b_3c4d));
        assert_eq!(mbr_signature(&s[..100]), None);
        // A GPT's protective MBR is not an MBR card.
        s[450] = 0xEE;
        assert_eq!(mbr_signature(&s), None);
    }

    /// A scratch directory removed when the test ends (pass or fail).
    pub struct Scratch(tempfile::TempDir);

    impl std::ops::Deref for Scratch {
        type Target = Path;
        fn deref(&self) -> &Path {
            self.0.path()
        }
    }

    impl AsRef<Path> for Scratch {
        fn as_ref(&self) -> &Path {
            self.0.path()
        }
    }

    pub fn tempdir(tag: &str) -> Scratch {
        Scratch(tempfile::Builder::new().prefix(&format!("kiln-init-{tag}-")).tempdir().unwrap())
    }

    pub fn sgdisk(args: &[&str], disk: &Path) -> String {
        let out = kiln_testkit::command("sgdisk").args(args).arg(disk).output().unwrap();
        assert!(out.status.success(), "sgdisk {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A sparse disk with kiln's six partitions, made by sgdisk.
    pub fn kiln_disk(path: &Path, mib: u64) {
        let f = File::create(path).unwrap();
        f.set_len(mib << 20).unwrap();
        drop(f);
        sgdisk(
            &[
                "-o",
                "-n", "1:2048:+8M", "-t", "1:c12a7328-f81f-11d2-ba4b-00a0c93ec93b", "-c", "1:esp",
                "-n", "2:0:+4M", "-t", "2:4f68bce3-e8cd-4db1-96e7-fbcaf984b709", "-c", "2:root-a", "-u", "2:00112233-4455-6677-8899-aabbccddeeff",
                "-n", "3:0:+1M", "-t", "3:2c7357ed-ebd2-46d9-aec1-23d437ec2bf5", "-c", "3:root-a-verity",
                "-n", "4:0:+4M", "-t", "4:4f68bce3-e8cd-4db1-96e7-fbcaf984b709", "-c", "4:root-b",
                "-n", "5:0:+1M", "-t", "5:2c7357ed-ebd2-46d9-aec1-23d437ec2bf5", "-c", "5:root-b-verity",
                "-n", "6:0:+8M", "-t", "6:0fc63daf-8483-4772-8e79-3d69d8477de4", "-c", "6:data",
            ],
            path,
        );
    }

    #[test]
    fn reads_what_sgdisk_writes() {
        if kiln_testkit::checker("sgdisk", "gdisk").is_none() {
            return;
        }
        let d = tempdir("gpt-read");
        let disk = d.join("disk.img");
        kiln_disk(&disk, 64);
        let f = File::open(&disk).unwrap();
        let g = Gpt::read(&f, 512, 64 << 20).unwrap();
        assert!(!g.from_backup);
        let parts = g.partitions();
        let names: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["esp", "root-a", "root-a-verity", "root-b", "root-b-verity", "data"]);
        assert_eq!(parts[0].type_guid, ESP_TYPE);
        assert_eq!(parts[0].first_lba, 2048);
        assert_eq!(parts[1].uuid.to_string(), "00112233-4455-6677-8899-aabbccddeeff");
        assert_eq!(parts[5].number, 6);
        assert_eq!(g.header.last_usable, (64 << 11) - 34);
        assert_eq!(g.by_name("DATA").map(|p| p.number), Some(6));

        // Damage the primary header: the backup is read instead.
        let w = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        w.write_all_at(b"XXXX", 512).unwrap();
        let g2 = Gpt::read(&f, 512, 64 << 20).unwrap();
        assert!(g2.from_backup);
        assert_eq!(g2.partitions(), parts);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn rejects_garbage() {
        assert!(Header::parse(&[0u8; 512]).is_err());
        let mut s = [0u8; 512];
        s[..8].copy_from_slice(SIGNATURE);
        s[12..16].copy_from_slice(&92u32.to_le_bytes());
        assert!(matches!(Header::parse(&s), Err(GptError::NotGpt(m)) if m.contains("CRC")));
    }

    /// Found by fuzzing (gpt_mbr): a table whose entry array LBA times the
    /// block size overflows made growing it panic (init/fuzz).
    #[test]
    fn an_entry_array_past_any_disk_is_refused() {
        let mut s = vec![0u8; 512];
        s[..8].copy_from_slice(SIGNATURE);
        s[12..16].copy_from_slice(&92u32.to_le_bytes());
        s[72..80].copy_from_slice(&(u64::MAX / 3).to_le_bytes());
        s[80..84].copy_from_slice(&4u32.to_le_bytes());
        s[84..88].copy_from_slice(&128u32.to_le_bytes());
        s[88..92].copy_from_slice(&crc32(&[0u8; 512]).to_le_bytes());
        let crc = crc32(&s[..92]);
        s[16..20].copy_from_slice(&crc.to_le_bytes());
        assert!(Header::parse(&s).is_ok());
        let e = Gpt::parse(512, &s, &[0u8; 512]).unwrap_err().to_string();
        assert!(e.contains("past any disk"), "{e}");
        s[72..80].copy_from_slice(&2u64.to_le_bytes());
        s[16..20].fill(0);
        let crc = crc32(&s[..92]);
        s[16..20].copy_from_slice(&crc.to_le_bytes());
        assert!(Gpt::parse(512, &s, &[0u8; 512]).is_ok());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_sectors_never_panic(bytes in proptest::collection::vec(0u8..=255, 512..1024), size in 0u32..2000) {
            let mut s = bytes.clone();
            s[..8].copy_from_slice(SIGNATURE);
            s[12..16].copy_from_slice(&size.to_le_bytes());
            let _ = Header::parse(&s);
            let _ = Gpt::parse(512, &s, &bytes);
        }
    }
}
