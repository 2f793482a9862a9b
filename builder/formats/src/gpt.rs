//! GPT and MBR partition tables, as pure structs written only by `write()`.
//!
//! [`Gpt`] describes a disk of 512-byte sectors: a protective MBR, the
//! primary header and 128 entries at LBA 1 and 2, their backup at the end.
//! `write` touches only those table areas, never partition contents, so the
//! same code serves the builder (fresh sparse image) and a node growing its
//! disk at first boot ([`Gpt::read`], [`Gpt::grow_to`], `write`).
//!
//! [`Layout`] places partitions one after another on 1 MiB boundaries.
//! [`Mbr`] is the four-partition table for boards whose boot ROM needs it.
//!
//! GUIDs are held in RFC 4122 byte order (the order they are printed in) and
//! converted to the GPT's mixed-endian order only on disk.

// `is_multiple_of` needs Rust 1.87; the workspace promises 1.80.
#![allow(clippy::manual_is_multiple_of)]

use std::fmt;
use std::io::{self, Read, Seek, SeekFrom, Write};

use sha2::{Digest, Sha256};

pub const SECTOR: u64 = 512;
/// 1 MiB in sectors: where partitions start and what they are aligned to.
pub const ALIGN_SECTORS: u64 = 2048;
const ENTRIES: u64 = 128;
const ENTRY_SIZE: u64 = 128;
/// Sectors taken by the entry array (16 KiB).
const ENTRY_SECTORS: u64 = ENTRIES * ENTRY_SIZE / SECTOR;
const HEADER_SIZE: u32 = 92;
const MAX_NAME_UNITS: usize = 36;

pub use kiln_contract::guid::Guid;

#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error(transparent)]
    BadGuid(#[from] kiln_contract::guid::GuidError),
    #[error("disk size {size} bytes: {reason}")]
    BadDiskSize { size: u64, reason: String },
    #[error("{count} partitions; the table holds at most {max}")]
    TooManyPartitions { count: usize, max: usize },
    #[error("partition {index} ({name:?}): {reason}")]
    BadPartition {
        index: usize,
        name: String,
        reason: String,
    },
    #[error("partitions {a} ({a_name:?}) and {b} ({b_name:?}) overlap")]
    Overlap {
        a: usize,
        a_name: String,
        b: usize,
        b_name: String,
    },
    #[error(
        "partitions {a} and {b} have the same unique GUID {guid}; derive each from its own name"
    )]
    DuplicateGuid { a: usize, b: usize, guid: Guid },
    #[error("partition layout: {0}")]
    Layout(String),
    #[error("MBR partition {index}: {reason}")]
    BadMbrPartition { index: usize, reason: String },
    #[error("no valid GPT on the device: {0}")]
    NotGpt(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> GptError {
    let what = what.into();
    move |source| GptError::Io { what, source }
}

/// A reproducible GUID: SHA-256 of `namespace`, a NUL and `name`, cut to 128
/// bits and marked as an RFC 9562 version 8 (custom) UUID. Same inputs, same
/// GUID, on every machine.
pub fn deterministic_guid(namespace: &str, name: &str) -> Guid {
    let mut h = Sha256::new();
    h.update(namespace.as_bytes());
    h.update([0]);
    h.update(name.as_bytes());
    let digest = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0F) | 0x80;
    b[8] = (b[8] & 0x3F) | 0x80;
    Guid(b)
}

/// Partition type GUIDs kiln uses (FORMATS.md; the Discoverable Partitions
/// Specification).
pub mod types {
    use super::Guid;
    pub const ESP: Guid = Guid::from_str_const("c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
    pub const LINUX_DATA: Guid = Guid::from_str_const("0fc63daf-8483-4772-8e79-3d69d8477de4");
    pub const ROOT_X86_64: Guid = Guid::from_str_const("4f68bce3-e8cd-4db1-96e7-fbcaf984b709");
    pub const ROOT_ARM64: Guid = Guid::from_str_const("b921b045-1df0-41c3-af44-4c6f280d3fae");
    pub const ROOT_ARM: Guid = Guid::from_str_const("69dad710-2ce4-4e3c-b16c-21a1d49abed3");
    pub const ROOT_VERITY_X86_64: Guid =
        Guid::from_str_const("2c7357ed-ebd2-46d9-aec1-23d437ec2bf5");
    pub const ROOT_VERITY_ARM64: Guid =
        Guid::from_str_const("df3300ce-d69f-4c92-978c-9bfb0f38d820");
    pub const ROOT_VERITY_ARM: Guid = Guid::from_str_const("7386cdf2-203c-47a9-a498-f2ecce45a2d6");
    pub const ROOT_VERITY_SIG_X86_64: Guid =
        Guid::from_str_const("41092b05-9fc8-4523-994f-2def0408b176");
    pub const ROOT_VERITY_SIG_ARM64: Guid =
        Guid::from_str_const("6db69de6-29f4-4758-a7a5-962190f00ce3");
    pub const ROOT_VERITY_SIG_ARM: Guid =
        Guid::from_str_const("42b0455f-eb11-491d-98d3-56145ba9d037");
}

/// GPT partition attribute bits (UEFI and the Discoverable Partitions
/// Specification).
pub mod attributes {
    pub const REQUIRED: u64 = 1 << 0;
    pub const NO_BLOCK_IO: u64 = 1 << 1;
    pub const LEGACY_BIOS_BOOTABLE: u64 = 1 << 2;
    pub const READ_ONLY: u64 = 1 << 60;
    pub const NO_AUTO: u64 = 1 << 63;
    pub const GROWFS: u64 = 1 << 59;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub type_guid: Guid,
    pub uuid: Guid,
    /// At most 36 UTF-16 code units.
    pub name: String,
    pub first_lba: u64,
    /// Inclusive.
    pub last_lba: u64,
    pub attributes: u64,
}

impl Partition {
    pub fn size_bytes(&self) -> u64 {
        (self.last_lba + 1).saturating_sub(self.first_lba) * SECTOR
    }

    pub fn offset_bytes(&self) -> u64 {
        self.first_lba * SECTOR
    }

}

/// A GPT disk of 512-byte sectors. Entry `i` of `partitions` is partition
/// number `i + 1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpt {
    pub disk_guid: Guid,
    pub partitions: Vec<Partition>,
    pub size_bytes: u64,
}

impl Gpt {
    pub fn last_lba(&self) -> u64 {
        (self.size_bytes / SECTOR).saturating_sub(1)
    }

    /// After the protective MBR, the header and the entry array.
    pub fn first_usable_lba(&self) -> u64 {
        2 + ENTRY_SECTORS
    }

    /// Before the backup entry array and header.
    pub fn last_usable_lba(&self) -> u64 {
        self.last_lba().saturating_sub(1 + ENTRY_SECTORS)
    }

    /// Checks what `write` relies on: a sane disk size, at most 128
    /// partitions, each inside the usable area, starting on a 1 MiB
    /// boundary, with a short enough name, a type and a unique GUID, and no
    /// two overlapping.
    pub fn validate(&self) -> Result<(), GptError> {
        let size = self.size_bytes;
        let bad_size = |reason: &str| GptError::BadDiskSize {
            size,
            reason: reason.to_string(),
        };
        if size % SECTOR != 0 {
            return Err(bad_size("not a multiple of 512-byte sectors"));
        }
        if size / SECTOR < 2 * (2 + ENTRY_SECTORS) + 1 {
            return Err(bad_size("too small for the two GPT copies"));
        }
        if self.partitions.len() > ENTRIES as usize {
            return Err(GptError::TooManyPartitions {
                count: self.partitions.len(),
                max: ENTRIES as usize,
            });
        }
        let (first, last) = (self.first_usable_lba(), self.last_usable_lba());
        for (i, p) in self.partitions.iter().enumerate() {
            let bad = |reason: String| GptError::BadPartition {
                index: i + 1,
                name: p.name.clone(),
                reason,
            };
            let units = p.name.encode_utf16().count();
            if units > MAX_NAME_UNITS {
                return Err(bad(format!(
                    "name is {units} UTF-16 characters, GPT allows {MAX_NAME_UNITS}"
                )));
            }
            if p.type_guid.is_nil() {
                return Err(bad("type GUID is nil, which marks an unused entry".into()));
            }
            if p.uuid.is_nil() {
                return Err(bad("unique GUID is nil".into()));
            }
            if p.first_lba > p.last_lba {
                return Err(bad(format!(
                    "first LBA {} is after last LBA {}",
                    p.first_lba, p.last_lba
                )));
            }
            if p.first_lba < first || p.last_lba > last {
                return Err(bad(format!(
                    "LBAs {}..={} are outside the usable area {first}..={last} of a {size}-byte disk",
                    p.first_lba, p.last_lba
                )));
            }
            if p.first_lba % ALIGN_SECTORS != 0 {
                return Err(bad(format!(
                    "first LBA {} is not on a 1 MiB boundary (a multiple of {ALIGN_SECTORS})",
                    p.first_lba
                )));
            }
        }
        for (i, a) in self.partitions.iter().enumerate() {
            for (j, b) in self.partitions.iter().enumerate().skip(i + 1) {
                if a.first_lba <= b.last_lba && b.first_lba <= a.last_lba {
                    return Err(GptError::Overlap {
                        a: i + 1,
                        a_name: a.name.clone(),
                        b: j + 1,
                        b_name: b.name.clone(),
                    });
                }
                if a.uuid == b.uuid {
                    return Err(GptError::DuplicateGuid {
                        a: i + 1,
                        b: j + 1,
                        guid: a.uuid,
                    });
                }
            }
        }
        Ok(())
    }

    /// Moves the backup table to the end of a disk of `new_size` bytes (in
    /// memory only; `write` puts it there). Extending the last partition is
    /// the caller's job.
    pub fn grow_to(&mut self, new_size: u64) -> Result<(), GptError> {
        if new_size % SECTOR != 0 {
            return Err(GptError::BadDiskSize {
                size: new_size,
                reason: "not a multiple of 512-byte sectors".into(),
            });
        }
        if new_size < self.size_bytes {
            return Err(GptError::BadDiskSize {
                size: new_size,
                reason: format!(
                    "smaller than the current {} bytes; a GPT is only grown",
                    self.size_bytes
                ),
            });
        }
        self.size_bytes = new_size;
        Ok(())
    }

    /// Writes the protective MBR's table, the primary header and entries,
    /// and the backup entries and header, at absolute offsets of `out` (the
    /// whole disk, already `size_bytes` long, open for reading too: the crate
    /// reads the entries back to checksum them). MBR boot code and partition
    /// contents are left alone. The headers and entries are written by the
    /// `gpt` crate; placing and checking the partitions ([`Gpt::validate`])
    /// and the protective MBR (with real CHS values) are ours.
    pub fn write<W: Read + Write + Seek + fmt::Debug>(&self, out: &mut W) -> Result<(), GptError> {
        self.validate()?;
        let len = out.seek(SeekFrom::End(0)).map_err(io_err("finding the size of the disk to write the GPT to"))?;
        if len != self.size_bytes {
            return Err(GptError::BadDiskSize { size: len, reason: format!("the table is for a disk of {} bytes; size the disk first", self.size_bytes) });
        }
        let protective = Mbr {
            disk_signature: 0,
            partitions: vec![MbrPartition { bootable: false, kind: 0xEE, first_lba: 1, sectors: u32::try_from(self.last_lba()).unwrap_or(u32::MAX) }],
        };
        protective.write_table(out)?;

        let crate_err = |what: &'static str| move |e: gpt::GptError| GptError::Io { what: what.into(), source: io::Error::other(e.to_string()) };
        let id = |g: Guid| uuid::Uuid::from_bytes(g.0);
        let mut disk = gpt::GptConfig::new()
            .writable(true)
            .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
            .create_from_device(&mut *out, Some(id(self.disk_guid)))
            .map_err(crate_err("starting the GPT"))?;
        let parts = self
            .partitions
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let part = gpt::partition::Partition {
                    part_type_guid: gpt::partition_types::Type { guid: id(p.type_guid), os: gpt::partition_types::OperatingSystem::None },
                    part_guid: id(p.uuid),
                    first_lba: p.first_lba,
                    last_lba: p.last_lba,
                    flags: p.attributes,
                    name: p.name.clone(),
                };
                (i as u32 + 1, part)
            })
            .collect();
        disk.update_partitions(parts).map_err(crate_err("laying out the GPT entries"))?;
        disk.write().map_err(crate_err("writing the GPT headers and entries"))?;
        Ok(())
    }

    /// Reads a GPT: the primary copy, or the backup at the device's end if
    /// the primary is damaged. `size_bytes` is the disk size the table
    /// describes (its backup header's LBA + 1), which is less than the
    /// device's after the device grew; `grow_to` then moves it.
    ///
    /// Only tables with 128 entries of 128 bytes and no unused entry before
    /// a used one are accepted, since `write` would renumber anything else.
    pub fn read<R: Read + Seek>(dev: &mut R) -> Result<Gpt, GptError> {
        let primary = read_copy(dev, 1);
        let (header, entries) = match primary {
            Ok(found) => found,
            Err(primary_err) => {
                let end = dev
                    .seek(SeekFrom::End(0))
                    .map_err(io_err("finding the device size"))?;
                let last = (end / SECTOR).saturating_sub(1);
                read_copy(dev, last).map_err(|backup_err| {
                    GptError::NotGpt(format!(
                        "primary: {primary_err}; backup at LBA {last}: {backup_err}"
                    ))
                })?
            }
        };
        let le64 = |b: &[u8], o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let guid = |b: &[u8], o: usize| {
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[o..o + 16]);
            Guid::from_gpt_bytes(a)
        };
        let my_lba = le64(&header, 24);
        let alternate = le64(&header, 32);
        let last = my_lba.max(alternate);
        let mut partitions = Vec::new();
        let mut ended = false;
        for (i, e) in entries.chunks_exact(ENTRY_SIZE as usize).enumerate() {
            let type_guid = guid(e, 0);
            if type_guid.is_nil() {
                ended = true;
                continue;
            }
            if ended {
                return Err(GptError::NotGpt(format!(
                    "entry {} is used after an unused entry; kiln only rewrites tables without gaps",
                    i + 1
                )));
            }
            let units: Vec<u16> = e[56..128]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|u| *u != 0)
                .collect();
            partitions.push(Partition {
                type_guid,
                uuid: guid(e, 16),
                name: String::from_utf16_lossy(&units),
                first_lba: le64(e, 32),
                last_lba: le64(e, 40),
                attributes: le64(e, 48),
            });
        }
        Ok(Gpt {
            disk_guid: guid(&header, 56),
            partitions,
            size_bytes: (last + 1) * SECTOR,
        })
    }
}

/// One header and its entry array, checked: signature, sizes, both CRCs.
fn read_copy<R: Read + Seek>(dev: &mut R, lba: u64) -> Result<(Vec<u8>, Vec<u8>), GptError> {
    let mut header = vec![0u8; SECTOR as usize];
    read_at(dev, lba * SECTOR, &mut header, "reading a GPT header")?;
    if &header[0..8] != b"EFI PART" {
        return Err(GptError::NotGpt(format!(
            "no \"EFI PART\" signature at LBA {lba}"
        )));
    }
    let u32_at =
        |o: usize| u32::from_le_bytes([header[o], header[o + 1], header[o + 2], header[o + 3]]);
    let size = u32_at(12) as usize;
    if !(HEADER_SIZE as usize..=SECTOR as usize).contains(&size) {
        return Err(GptError::NotGpt(format!("header size {size} at LBA {lba}")));
    }
    let stored = u32_at(16);
    let mut copy = header[..size].to_vec();
    copy[16..20].fill(0);
    if crc32(&copy) != stored {
        return Err(GptError::NotGpt(format!(
            "header CRC mismatch at LBA {lba}"
        )));
    }
    if u64::from(u32_at(80)) != ENTRIES || u64::from(u32_at(84)) != ENTRY_SIZE {
        return Err(GptError::NotGpt(format!(
            "{} entries of {} bytes; kiln handles 128 of 128",
            u32_at(80),
            u32_at(84)
        )));
    }
    let mut lba_bytes = [0u8; 8];
    lba_bytes.copy_from_slice(&header[72..80]);
    let entries_lba = u64::from_le_bytes(lba_bytes);
    let mut entries = vec![0u8; (ENTRIES * ENTRY_SIZE) as usize];
    read_at(
        dev,
        entries_lba * SECTOR,
        &mut entries,
        "reading GPT entries",
    )?;
    if crc32(&entries) != u32_at(88) {
        return Err(GptError::NotGpt(format!(
            "entry array CRC mismatch for the header at LBA {lba}"
        )));
    }
    Ok((header, entries))
}

fn write_at<W: Write + Seek>(
    out: &mut W,
    offset: u64,
    bytes: &[u8],
    what: &str,
) -> Result<(), GptError> {
    out.seek(SeekFrom::Start(offset))
        .and_then(|_| out.write_all(bytes))
        .map_err(io_err(what))
}

fn read_at<R: Read + Seek>(
    dev: &mut R,
    offset: u64,
    buf: &mut [u8],
    what: &str,
) -> Result<(), GptError> {
    dev.seek(SeekFrom::Start(offset))
        .and_then(|_| dev.read_exact(buf))
        .map_err(io_err(format!("{what} at byte {offset}")))
}

/// How big a [`Layout`] partition is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartSize {
    /// Rounded up to whole MiB.
    Bytes(u64),
    /// Everything up to the last usable LBA; only for the last partition.
    Rest,
}

#[derive(Debug, Clone)]
struct LayoutEntry {
    name: String,
    type_guid: Guid,
    uuid: Guid,
    size: PartSize,
    attributes: u64,
}

/// Places partitions back to back from LBA 2048, each starting on a 1 MiB
/// boundary and a whole number of MiB long, except a `Rest` partition at the
/// end, which runs to the last usable LBA.
#[derive(Debug, Clone)]
pub struct Layout {
    disk_guid: Guid,
    entries: Vec<LayoutEntry>,
}

impl Layout {
    pub fn new(disk_guid: Guid) -> Layout {
        Layout {
            disk_guid,
            entries: Vec::new(),
        }
    }

    pub fn add(
        &mut self,
        name: &str,
        type_guid: Guid,
        uuid: Guid,
        size: PartSize,
        attributes: u64,
    ) -> &mut Layout {
        self.entries.push(LayoutEntry {
            name: name.to_string(),
            type_guid,
            uuid,
            size,
            attributes,
        });
        self
    }

    /// The smallest whole-MiB disk that holds every partition, giving a
    /// `Rest` partition 1 MiB.
    pub fn min_disk_size(&self) -> u64 {
        let mib = ALIGN_SECTORS * SECTOR;
        let parts: u64 = self
            .entries
            .iter()
            .map(|e| match e.size {
                PartSize::Bytes(b) => b.div_ceil(mib).max(1) * mib,
                PartSize::Rest => mib,
            })
            .fold(0u64, u64::saturating_add);
        // 1 MiB before the first partition, and a MiB for the backup table.
        parts.saturating_add(2 * mib)
    }

    /// The partition table for a disk of `size_bytes`.
    pub fn build(&self, size_bytes: u64) -> Result<Gpt, GptError> {
        let mut gpt = Gpt {
            disk_guid: self.disk_guid,
            partitions: Vec::with_capacity(self.entries.len()),
            size_bytes,
        };
        if size_bytes % SECTOR != 0 || size_bytes / SECTOR < 2 * (2 + ENTRY_SECTORS) + 1 {
            // validate() words it.
            gpt.validate()?;
        }
        let last_usable = gpt.last_usable_lba();
        let mut next = ALIGN_SECTORS;
        for (i, e) in self.entries.iter().enumerate() {
            let last = match e.size {
                PartSize::Rest if i + 1 != self.entries.len() => {
                    return Err(GptError::Layout(format!(
                        "partition {} ({:?}) takes the rest of the disk, so it must be the last",
                        i + 1,
                        e.name
                    )));
                }
                PartSize::Rest => last_usable,
                PartSize::Bytes(b) => {
                    let sectors = b.div_ceil(SECTOR).div_ceil(ALIGN_SECTORS).max(1) * ALIGN_SECTORS;
                    next.saturating_add(sectors) - 1
                }
            };
            if last > last_usable || next > last_usable {
                return Err(GptError::Layout(format!(
                    "partition {} ({:?}) does not fit on a {size_bytes}-byte disk; it needs at least {} bytes",
                    i + 1,
                    e.name,
                    self.min_disk_size()
                )));
            }
            gpt.partitions.push(Partition {
                type_guid: e.type_guid,
                uuid: e.uuid,
                name: e.name.clone(),
                first_lba: next,
                last_lba: last,
                attributes: e.attributes,
            });
            next = last + 1;
        }
        gpt.validate()?;
        Ok(gpt)
    }
}

/// One primary MBR partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MbrPartition {
    pub bootable: bool,
    /// 0x0c FAT32 (LBA), 0x83 Linux, 0xEE GPT protective, …
    pub kind: u8,
    pub first_lba: u32,
    pub sectors: u32,
}

/// An MBR partition table (up to four primary partitions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mbr {
    pub disk_signature: u32,
    pub partitions: Vec<MbrPartition>,
}

impl Mbr {
    pub fn validate(&self) -> Result<(), GptError> {
        if self.partitions.len() > 4 {
            return Err(GptError::TooManyPartitions {
                count: self.partitions.len(),
                max: 4,
            });
        }
        for (i, p) in self.partitions.iter().enumerate() {
            let bad = |reason: &str| GptError::BadMbrPartition {
                index: i + 1,
                reason: reason.to_string(),
            };
            if p.kind == 0 {
                return Err(bad("type 0 marks an unused entry"));
            }
            if p.first_lba == 0 {
                return Err(bad("starts at LBA 0, over the MBR itself"));
            }
            if p.sectors == 0 {
                return Err(bad("has no sectors"));
            }
            if u64::from(p.first_lba) + u64::from(p.sectors) > 1 << 32 {
                return Err(bad("ends beyond the 2 TiB an MBR can address"));
            }
        }
        for (i, a) in self.partitions.iter().enumerate() {
            for (j, b) in self.partitions.iter().enumerate().skip(i + 1) {
                let (a0, a1) = (
                    u64::from(a.first_lba),
                    u64::from(a.first_lba) + u64::from(a.sectors),
                );
                let (b0, b1) = (
                    u64::from(b.first_lba),
                    u64::from(b.first_lba) + u64::from(b.sectors),
                );
                if a0 < b1 && b0 < a1 {
                    return Err(GptError::BadMbrPartition {
                        index: j + 1,
                        reason: format!("overlaps partition {}", i + 1),
                    });
                }
            }
        }
        Ok(())
    }

    /// Writes bytes 440..512 of LBA 0 (disk signature, table, 0x55AA). The
    /// boot code area before it is left alone: board overlays may put a
    /// bootloader there.
    pub fn write<W: Write + Seek>(&self, out: &mut W) -> Result<(), GptError> {
        self.validate()?;
        self.write_table(out)
    }

    fn write_table<W: Write + Seek>(&self, out: &mut W) -> Result<(), GptError> {
        let mut t = [0u8; 72];
        t[0..4].copy_from_slice(&self.disk_signature.to_le_bytes());
        for (slot, p) in t[6..70].chunks_exact_mut(16).zip(&self.partitions) {
            slot[0] = if p.bootable { 0x80 } else { 0 };
            let last = u64::from(p.first_lba) + u64::from(p.sectors) - 1;
            if p.kind == 0xEE {
                // The UEFI spec's protective entry: starts at CHS 0/0/2.
                slot[1..4].copy_from_slice(&[0x00, 0x02, 0x00]);
            } else {
                slot[1..4].copy_from_slice(&chs(u64::from(p.first_lba)));
            }
            slot[4] = p.kind;
            slot[5..8].copy_from_slice(&chs(last));
            slot[8..12].copy_from_slice(&p.first_lba.to_le_bytes());
            slot[12..16].copy_from_slice(&p.sectors.to_le_bytes());
        }
        t[70] = 0x55;
        t[71] = 0xAA;
        write_at(out, 440, &t, "writing the MBR partition table")
    }
}

/// CHS for an LBA with 255 heads and 63 sectors per track, or the "beyond
/// CHS" marker 1023/254/63 that partitioners write.
fn chs(lba: u64) -> [u8; 3] {
    const HEADS: u64 = 255;
    const SPT: u64 = 63;
    let cyl = lba / (HEADS * SPT);
    if cyl > 1023 {
        return [0xFE, 0xFF, 0xFF];
    }
    let head = (lba / SPT) % HEADS;
    let sector = lba % SPT + 1;
    [
        head as u8,
        (sector as u8) | (((cyl >> 8) as u8) << 6),
        cyl as u8,
    ]
}

/// CRC-32 (IEEE 802.3, reflected, as GPT uses): the one kiln-init checks
/// GPTs with.
pub use kiln_contract::digest::crc32;

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_testkit::checker;
    use std::fs::File;
    use std::path::Path;
    use std::process::{Command, Output};

    const MIB: u64 = 1 << 20;

    fn run(tool: &Path, args: &[&str], img: &Path) -> (Output, String) {
        let out = Command::new(tool).args(args).arg(img).output().unwrap();
        let text = kiln_testkit::output_text(&out);
        (out, text)
    }

    fn six_partitions() -> Layout {
        let g = |n: &str| deterministic_guid("kiln-test", n);
        let mut l = Layout::new(g("disk"));
        l.add("ESP", types::ESP, g("esp"), PartSize::Bytes(64 * MIB), 0)
            .add(
                "root-a",
                types::ROOT_X86_64,
                g("root-a"),
                PartSize::Bytes(200 * MIB + 1),
                attributes::READ_ONLY,
            )
            .add(
                "root-a-verity",
                types::ROOT_VERITY_X86_64,
                g("root-a-verity"),
                PartSize::Bytes(16 * MIB),
                attributes::READ_ONLY,
            )
            .add(
                "root-b",
                types::ROOT_X86_64,
                g("root-b"),
                PartSize::Bytes(200 * MIB),
                attributes::NO_AUTO,
            )
            .add(
                "root-b-verity",
                types::ROOT_VERITY_X86_64,
                g("root-b-verity"),
                PartSize::Bytes(16 * MIB),
                attributes::NO_AUTO,
            )
            .add(
                "data",
                types::LINUX_DATA,
                g("data"),
                PartSize::Rest,
                attributes::GROWFS,
            );
        l
    }

    fn sgdisk_verify(sgdisk: &Path, img: &Path) {
        let (out, text) = run(sgdisk, &["-v"], img);
        assert!(out.status.success(), "sgdisk -v failed:\n{text}");
        assert!(text.contains("No problems found"), "sgdisk -v:\n{text}");
        assert!(
            !text.to_lowercase().contains("warning"),
            "sgdisk -v:\n{text}"
        );
    }

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn guid_round_trips() {
        let s = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
        let g = Guid::parse(s).unwrap();
        assert_eq!(g, types::ESP);
        assert_eq!(g.to_string(), s);
        assert_eq!(Guid::parse(&s.to_uppercase()).unwrap(), g);
        assert_eq!(g.0[..4], [0xc1, 0x2a, 0x73, 0x28]);
        assert_eq!(
            g.to_gpt_bytes()[..8],
            [0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11]
        );
        assert_eq!(Guid::from_gpt_bytes(g.to_gpt_bytes()), g);
        assert_eq!(Guid::from_bytes_rfc4122(g.to_bytes_rfc4122()), g);
        for bad in [
            "",
            "c12a7328f81f11d2ba4b00a0c93ec93b",
            "c12a7328-f81f-11d2-ba4b-00a0c93ec93g",
            "{c12a7328-f81f-11d2-ba4b-00a0c93ec93}",
        ] {
            let msg = Guid::parse(bad).unwrap_err().to_string();
            assert!(msg.contains("not a GUID"), "{msg}");
        }
    }

    #[test]
    fn deterministic_guids() {
        let a = deterministic_guid("kiln", "esp");
        assert_eq!(a, deterministic_guid("kiln", "esp"));
        assert_ne!(a, deterministic_guid("kiln", "data"));
        assert_ne!(deterministic_guid("ab", "c"), deterministic_guid("a", "bc"));
        assert_eq!(a.0[6] >> 4, 8, "version 8");
        assert_eq!(a.0[8] >> 6, 0b10, "RFC 4122 variant");
    }

    #[test]
    fn layout_aligns_and_fills() {
        let gpt = six_partitions().build(GIB).unwrap();
        let p = &gpt.partitions;
        assert_eq!(p[0].first_lba, 2048);
        assert_eq!(p[0].size_bytes(), 64 * MIB);
        assert_eq!(p[1].size_bytes(), 201 * MIB, "rounded up to MiB");
        for w in p.windows(2) {
            assert_eq!(w[0].last_lba + 1, w[1].first_lba);
        }
        assert_eq!(p[5].last_lba, GIB / 512 - 34);
        assert!(six_partitions().min_disk_size() <= GIB);
        let msg = six_partitions().build(400 * MIB).unwrap_err().to_string();
        assert!(
            msg.contains("does not fit") && msg.contains("root-b"),
            "{msg}"
        );
        let mut bad = Layout::new(Guid::NIL);
        bad.add(
            "a",
            types::LINUX_DATA,
            deterministic_guid("x", "a"),
            PartSize::Rest,
            0,
        )
        .add(
            "b",
            types::LINUX_DATA,
            deterministic_guid("x", "b"),
            PartSize::Bytes(MIB),
            0,
        );
        let msg = bad.build(GIB).unwrap_err().to_string();
        assert!(msg.contains("must be the last"), "{msg}");
        let min = six_partitions().min_disk_size();
        six_partitions().build(min).unwrap();
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn validate_catches_mistakes() {
        let good = six_partitions().build(GIB).unwrap();
        let check = |f: &dyn Fn(&mut Gpt), want: &str| {
            let mut g = good.clone();
            f(&mut g);
            let msg = g.validate().unwrap_err().to_string();
            assert!(msg.contains(want), "wanted {want:?} in {msg:?}");
        };
        check(&|g| g.partitions[1].first_lba -= 2048, "overlap");
        check(&|g| g.partitions[0].first_lba = 2049, "1 MiB");
        check(
            &|g| g.partitions[5].last_lba += 1,
            "outside the usable area",
        );
        check(
            &|g| g.partitions[0].first_lba = 0,
            "outside the usable area",
        );
        check(&|g| g.partitions[0].name = "x".repeat(37), "37 UTF-16");
        check(
            &|g| g.partitions[2].uuid = g.partitions[1].uuid,
            "same unique GUID",
        );
        check(&|g| g.partitions[0].type_guid = Guid::NIL, "nil");
        check(&|g| g.size_bytes += 1, "multiple of 512");
        check(
            &|g| g.partitions[3].last_lba = g.partitions[3].first_lba - 1,
            "after last LBA",
        );
        // 36 UTF-16 units is the limit, even with non-ASCII names.
        let mut g = good.clone();
        g.partitions[0].name = "é".repeat(36);
        g.validate().unwrap();
    }

    #[test]
    fn six_partition_disk_checks_clean() {
        let Some(sgdisk) = checker("sgdisk", "gdisk") else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        let gpt = six_partitions().build(GIB).unwrap();
        gpt.write(&mut kiln_testkit::sparse_file(&img, GIB)).unwrap();
        assert_eq!(std::fs::metadata(&img).unwrap().len(), GIB);
        sgdisk_verify(&sgdisk, &img);

        let (_, text) = run(&sgdisk, &["-p"], &img);
        assert!(
            text.contains(&format!(
                "Disk identifier (GUID): {}",
                gpt.disk_guid.to_string().to_uppercase()
            )),
            "{text}"
        );
        for (i, p) in gpt.partitions.iter().enumerate() {
            let (out, text) = run(&sgdisk, &["-i", &(i + 1).to_string()], &img);
            assert!(out.status.success(), "{text}");
            let want = [
                format!(
                    "Partition GUID code: {}",
                    p.type_guid.to_string().to_uppercase()
                ),
                format!(
                    "Partition unique GUID: {}",
                    p.uuid.to_string().to_uppercase()
                ),
                format!("First sector: {} ", p.first_lba),
                format!("Last sector: {} ", p.last_lba),
                format!("Attribute flags: {:016X}", p.attributes),
                format!("Partition name: '{}'", p.name),
            ];
            for w in want {
                assert!(
                    text.contains(&w),
                    "sgdisk -i {}: wanted {w:?} in\n{text}",
                    i + 1
                );
            }
        }

        // Read back our own table.
        let back = Gpt::read(&mut File::open(&img).unwrap()).unwrap();
        assert_eq!(back, gpt);

        if let Some(sfdisk) = checker("sfdisk", "fdisk") {
            let (out, text) = run(&sfdisk, &["--json"], &img);
            assert!(out.status.success(), "{text}");
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let t = &json["partitiontable"];
            assert_eq!(t["label"], "gpt");
            assert_eq!(
                t["id"].as_str().unwrap().to_lowercase(),
                gpt.disk_guid.to_string()
            );
            assert_eq!(t["firstlba"], gpt.first_usable_lba());
            assert_eq!(t["lastlba"], gpt.last_usable_lba());
            let parts = t["partitions"].as_array().unwrap();
            assert_eq!(parts.len(), 6);
            for (j, p) in parts.iter().zip(&gpt.partitions) {
                assert_eq!(j["start"], p.first_lba);
                assert_eq!(j["size"], p.last_lba - p.first_lba + 1);
                assert_eq!(
                    j["type"].as_str().unwrap().to_lowercase(),
                    p.type_guid.to_string()
                );
                assert_eq!(
                    j["uuid"].as_str().unwrap().to_lowercase(),
                    p.uuid.to_string()
                );
                assert_eq!(j["name"], p.name.as_str());
            }
            let (out, text) = run(&sfdisk, &["--verify"], &img);
            assert!(out.status.success(), "sfdisk --verify:\n{text}");
        }
    }

    #[test]
    fn grow_moves_the_backup_and_keeps_contents() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        let gpt = six_partitions().build(GIB).unwrap();
        let mut f = kiln_testkit::sparse_file(&img, GIB);
        gpt.write(&mut f).unwrap();
        // Something inside the data partition, which growing must not touch.
        let data = &gpt.partitions[5];
        write_at(&mut f, data.offset_bytes(), b"ext4 lives here", "test").unwrap();
        // As the node sees it after the disk grew: a bigger device.
        f.set_len(4 * GIB).unwrap();
        let mut g = Gpt::read(&mut f).unwrap();
        assert_eq!(g.size_bytes, GIB, "the table still describes 1 GiB");
        assert!(g.grow_to(GIB - 512).is_err());
        assert!(g.grow_to(4 * GIB + 1).is_err());
        g.grow_to(4 * GIB).unwrap();
        let last = g.partitions.len() - 1;
        g.partitions[last].last_lba = g.last_usable_lba();
        g.write(&mut f).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 4 * GIB);
        let mut buf = [0u8; 15];
        read_at(&mut f, data.offset_bytes(), &mut buf, "test").unwrap();
        assert_eq!(&buf, b"ext4 lives here");
        assert_eq!(Gpt::read(&mut f).unwrap(), g);
        if let Some(sgdisk) = checker("sgdisk", "gdisk") {
            sgdisk_verify(&sgdisk, &img);
            let (_, text) = run(&sgdisk, &["-i", "6"], &img);
            assert!(
                text.contains(&format!("Last sector: {} ", 4 * GIB / 512 - 34)),
                "{text}"
            );
        }
    }

    #[test]
    fn read_falls_back_to_the_backup() {
        let mut disk = io::Cursor::new(vec![0u8; 64 << 20]);
        let mut l = Layout::new(deterministic_guid("t", "disk"));
        l.add(
            "ESP",
            types::ESP,
            deterministic_guid("t", "esp"),
            PartSize::Rest,
            0,
        );
        let gpt = l.build(64 << 20).unwrap();
        gpt.write(&mut disk).unwrap();
        disk.get_mut()[512 + 40] ^= 0xFF; // break the primary header CRC
        assert_eq!(Gpt::read(&mut disk).unwrap(), gpt);
        let last = disk.get_ref().len() - 512;
        disk.get_mut()[last] = 0;
        let msg = Gpt::read(&mut disk).unwrap_err().to_string();
        assert!(msg.contains("primary") && msg.contains("backup"), "{msg}");
    }

    #[test]
    fn write_is_deterministic_and_table_only() {
        let gpt = six_partitions().build(GIB).unwrap();
        let image = |fill: u8| {
            let mut c = io::Cursor::new(vec![fill; (GIB / 64) as usize]);
            // Write into a small buffer standing in for the disk's ends.
            let mut g = gpt.clone();
            g.size_bytes = GIB / 64;
            g.partitions.truncate(1);
            g.partitions[0].last_lba = g.last_usable_lba();
            g.write(&mut c).unwrap();
            c.into_inner()
        };
        let a = image(0);
        assert_eq!(a, image(0));
        let b = image(0x5A);
        // MBR boot code and everything between the tables is untouched.
        assert!(b[..440].iter().all(|x| *x == 0x5A));
        assert!(b[34 * 512..b.len() - 33 * 512].iter().all(|x| *x == 0x5A));
        assert_eq!(&b[510..512], &[0x55, 0xAA]);
    }

    #[test]
    fn protective_mbr_is_capped() {
        let mut c = io::Cursor::new(vec![0u8; (64 * MIB) as usize]);
        let mut l = Layout::new(deterministic_guid("t", "disk"));
        l.add(
            "data",
            types::LINUX_DATA,
            deterministic_guid("t", "d"),
            PartSize::Bytes(MIB),
            0,
        );
        // 3 TiB disk, written sparsely into a Cursor would be huge: use a file.
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("big.img");
        let size = 3u64 << 40;
        let mut f = kiln_testkit::sparse_file(&img, size);
        l.build(size).unwrap().write(&mut f).unwrap();
        let mut mbr = [0u8; 512];
        read_at(&mut f, 0, &mut mbr, "test").unwrap();
        assert_eq!(mbr[446 + 4], 0xEE);
        assert_eq!(&mbr[446 + 8..446 + 12], &1u32.to_le_bytes());
        assert_eq!(&mbr[446 + 12..446 + 16], &u32::MAX.to_le_bytes());
        l.build(64 * MIB).unwrap().write(&mut c).unwrap();
        let m = c.into_inner();
        assert_eq!(
            &m[446 + 12..446 + 16],
            &((64 * MIB / 512 - 1) as u32).to_le_bytes()
        );
        if let Some(sgdisk) = checker("sgdisk", "gdisk") {
            sgdisk_verify(&sgdisk, &img);
        }
    }

    fn board_mbr() -> Mbr {
        Mbr {
            disk_signature: 0x4B49_4C4E,
            partitions: vec![
                MbrPartition {
                    bootable: true,
                    kind: 0x0C,
                    first_lba: 2048,
                    sectors: 65536,
                },
                MbrPartition {
                    bootable: false,
                    kind: 0x83,
                    first_lba: 67584,
                    sectors: 40960,
                },
                MbrPartition {
                    bootable: false,
                    kind: 0x83,
                    first_lba: 108544,
                    sectors: 40960,
                },
                MbrPartition {
                    bootable: false,
                    kind: 0x83,
                    first_lba: 149504,
                    sectors: 12288,
                },
            ],
        }
    }

    #[test]
    fn mbr_checks_clean() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("board.img");
        let mbr = board_mbr();
        let mut f = kiln_testkit::sparse_file(&img, 80 * MIB);
        // A boot blob in the first 440 bytes survives.
        write_at(&mut f, 0, &[0xB0; 440], "test").unwrap();
        mbr.write(&mut f).unwrap();
        let mut head = [0u8; 512];
        read_at(&mut f, 0, &mut head, "test").unwrap();
        assert!(head[..440].iter().all(|b| *b == 0xB0));
        let Some(sfdisk) = checker("sfdisk", "fdisk") else {
            return;
        };
        let (out, text) = run(&sfdisk, &["--verify"], &img);
        assert!(
            out.status.success() && !text.to_lowercase().contains("warning"),
            "{text}"
        );
        let (out, text) = run(&sfdisk, &["-d"], &img);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("label: dos"), "{text}");
        assert!(text.contains("label-id: 0x4b494c4e"), "{text}");
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(" : start=")).collect();
        assert_eq!(lines.len(), 4, "{text}");
        for (line, p) in lines.iter().zip(&mbr.partitions) {
            let squashed: String = line.split_whitespace().collect();
            assert!(
                squashed.contains(&format!("start={},", p.first_lba)),
                "{line}"
            );
            assert!(squashed.contains(&format!("size={},", p.sectors)), "{line}");
            assert!(squashed.contains(&format!("type={:x}", p.kind)), "{line}");
            assert_eq!(line.contains("bootable"), p.bootable, "{line}");
        }
    }

    #[test]
    fn mbr_validate_catches_mistakes() {
        let check = |f: &dyn Fn(&mut Mbr), want: &str| {
            let mut m = board_mbr();
            f(&mut m);
            let msg = m.validate().unwrap_err().to_string();
            assert!(msg.contains(want), "wanted {want:?} in {msg:?}");
        };
        check(&|m| m.partitions[1].first_lba = 3000, "overlaps");
        check(&|m| m.partitions.push(m.partitions[0]), "at most");
        check(&|m| m.partitions[0].first_lba = 0, "LBA 0");
        check(&|m| m.partitions[0].sectors = 0, "no sectors");
        check(&|m| m.partitions[0].kind = 0, "unused");
        check(&|m| m.partitions[3].first_lba = u32::MAX, "2 TiB");
    }

    #[test]
    fn chs_values() {
        assert_eq!(chs(0), [0, 1, 0]);
        assert_eq!(chs(2048), [32, 33, 0]);
        assert_eq!(chs(1 << 30), [0xFE, 0xFF, 0xFF]);
    }
}
