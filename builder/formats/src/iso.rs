//! Hybrid ISO 9660 images: a CD that boots through El Torito (UEFI, and BIOS
//! with isolinux) and is also a disk, through an isohybrid MBR and a GPT whose
//! partitions cover files inside the ISO (the ESP image, a squashfs, …).
//!
//! [`write`] first plans the whole image in memory (every block address, the
//! boot catalog, the patched isolinux.bin), then writes it in one sequential
//! pass, streaming host files, and last puts the partition tables in place.
//! The same spec gives the same bytes: children are sorted the ECMA-119 way,
//! every timestamp is `epoch`, and nothing comes from the host but file
//! contents.
//!
//! Layout, in 2048-byte blocks: the system area (0..16: MBR, primary GPT),
//! the PVD at 16, the El Torito boot record, the terminator, the L and M path
//! tables, the boot catalog, the directories in path-table order, the files
//! sorted by path, then the files that partitions cover, each on a 1 MiB
//! boundary (where [`crate::gpt`] wants partitions to start), and last the
//! backup GPT, ending the image.
//!
//! Names are plain ISO 9660 level 2 (upper case, no Rock Ridge or Joliet):
//! the firmware and isolinux read them as they are, and Linux shows them in
//! lower case.

// `is_multiple_of` needs Rust 1.87; the workspace promises 1.80.
#![allow(clippy::manual_is_multiple_of)]

use std::cmp::Ordering;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::gpt::{Gpt, GptError, Guid, Partition, SECTOR};

/// ISO 9660 logical block size.
pub const BLOCK: u64 = 2048;
const PVD_LBA: u32 = 16;
/// Partitions must start on 1 MiB ([`crate::gpt::ALIGN_SECTORS`]).
const PART_ALIGN_BLOCKS: u64 = crate::gpt::ALIGN_SECTORS * SECTOR / BLOCK;
/// The backup GPT: 16 KiB of entries and the header.
const GPT_TAIL_SECTORS: u64 = 33;
const MAX_FILE_SIZE: u64 = u32::MAX as u64;
/// ECMA-119 6.8.2.1: at most eight directory levels, root included.
const MAX_DIR_LEVELS: usize = 8;
const MAX_PATH_LEN: usize = 255;
/// Level 2: file name plus extension.
const MAX_FILE_ID: usize = 30;
const MAX_DIR_ID: usize = 31;
const MAX_VOLUME_ID: usize = 32;
const MBR_CODE_MAX: usize = 432;
/// isolinux.bin's mark of an isohybrid-capable build, at byte 0x40 (libisofs
/// checks the same before writing an isohybrid MBR).
const ISOHYBRID_MAGIC: [u8; 4] = [0xfb, 0xc0, 0x78, 0x70];
/// The boot info table: bytes 8..64 of the boot file.
const BOOT_INFO_END: usize = 64;
/// Directory records are 33 bytes plus the identifier (and a pad byte).
const RECORD_BASE: usize = 33;

/// Where a file's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Read at write time, streamed, never held whole in memory. Its size is
    /// taken when the image is planned and checked again while writing.
    Host(PathBuf),
    Bytes(Vec<u8>),
}

/// One file of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsoFile {
    /// Absolute ISO path in upper case, like `/EFI/BOOT/EFI.IMG`. Parents
    /// are created as needed; kiln adds the `;1` version.
    pub path: String,
    pub content: Content,
}

impl IsoFile {
    pub fn host(path: &str, host: impl Into<PathBuf>) -> IsoFile {
        IsoFile {
            path: path.to_string(),
            content: Content::Host(host.into()),
        }
    }

    pub fn bytes(path: &str, bytes: impl Into<Vec<u8>>) -> IsoFile {
        IsoFile {
            path: path.to_string(),
            content: Content::Bytes(bytes.into()),
        }
    }
}

/// BIOS boot through isolinux.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BiosBoot {
    /// ISO path of isolinux.bin among the files. Its copy in the image gets
    /// the boot info table.
    pub isolinux_path: String,
    /// The isohybrid MBR boot code (isohdpfx.bin, 432 bytes).
    pub mbr_code: Vec<u8>,
}

/// A GPT partition over one file of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HybridPartition {
    pub name: String,
    pub type_guid: Guid,
    pub uuid: Guid,
    /// ISO path of the file whose extent the partition covers.
    pub file: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsoSpec {
    /// A–Z, 0–9 and `_`, at most 32 characters.
    pub volume_id: String,
    /// Every timestamp in the image (SOURCE_DATE_EPOCH), 1970 to 2155.
    pub epoch: u64,
    pub files: Vec<IsoFile>,
    /// ISO path of a FAT image: the El Torito UEFI entry (platform 0xEF).
    pub efi_image: Option<String>,
    /// The El Torito BIOS entry (platform 0), the default one when present.
    pub bios: Option<BiosBoot>,
    /// GPT partitions in this order (number 1 first), 512-byte LBAs.
    pub partitions: Vec<HybridPartition>,
    pub disk_guid: Guid,
}

/// Where a file landed in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub path: String,
    pub byte_offset: u64,
    pub len: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum IsoError {
    #[error("ISO path {path:?}: {reason}")]
    BadPath { path: String, reason: String },
    #[error("ISO path {path:?} is given twice; list each file once")]
    Duplicate { path: String },
    #[error("ISO path {path:?}: {other:?} is a file, so it cannot also be a directory")]
    FileDirConflict { path: String, other: String },
    #[error("ISO volume ID {id:?}: {reason}")]
    BadVolumeId { id: String, reason: String },
    #[error("epoch {epoch}: {reason}")]
    BadEpoch { epoch: u64, reason: String },
    #[error("{what} {path:?} is not one of the ISO's files; add it to `files` or fix the path")]
    MissingFile { what: String, path: String },
    #[error("BIOS boot file {path:?}: {reason}")]
    BadIsolinux { path: String, reason: String },
    #[error("isohybrid MBR code is {len} bytes; it must be 1 to 432 bytes (isohdpfx.bin from Debian's isolinux is 432)")]
    BadMbrCode { len: usize },
    #[error("GPT partition {index} ({name:?}): {reason}")]
    BadPartition {
        index: usize,
        name: String,
        reason: String,
    },
    #[error("ISO path {path:?}: {size} bytes is more than one ISO 9660 extent holds (4 GiB - 1); split the file")]
    FileTooLarge { path: String, size: u64 },
    #[error(
        "the image would be {bytes} bytes, more than ISO 9660 and the isohybrid MBR can address"
    )]
    ImageTooLarge { bytes: u64 },
    #[error("{count} directories; ISO 9660 path tables number at most 65535, so flatten the tree")]
    TooManyDirectories { count: usize },
    #[error("host file {host:?} (for ISO path {path:?}): {source}")]
    HostFile {
        path: String,
        host: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("host file {host:?} (for ISO path {path:?}) changed while writing: {expected} bytes when planned, {actual} now; do not modify inputs during a build")]
    HostFileChanged {
        path: String,
        host: PathBuf,
        expected: u64,
        actual: String,
    },
    #[error("ISO partition table: {0}")]
    Gpt(#[from] GptError),
    #[error("{what} {path:?}: {source}")]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Writes the image described by `spec` to `out` (through a temporary file
/// beside it, renamed into place when complete) and returns where each file
/// of `spec.files` landed, in the same order.
pub fn write(spec: &IsoSpec, out: &Path) -> Result<Vec<Extent>, IsoError> {
    let plan = Plan::new(spec)?;
    let io_err = |what: &str| {
        let what = what.to_string();
        let path = out.to_path_buf();
        move |source| IsoError::Io { what, path, source }
    };
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp =
        tempfile::NamedTempFile::new_in(dir).map_err(io_err("creating a temporary file beside"))?;
    {
        let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file());
        plan.write_to(spec, &mut w, out)?;
        w.flush().map_err(io_err("writing"))?;
    }
    plan.write_tables(spec, &mut tmp.as_file(), out)?;
    tmp.persist(out).map_err(|e| IsoError::Io {
        what: "renaming the finished image to".into(),
        path: out.to_path_buf(),
        source: e.error,
    })?;
    Ok(plan.extents(spec))
}

/// A directory of the image, in path-table order (index 0 is the root).
#[derive(Debug)]
struct Dir {
    /// Identifier (empty for the root).
    ident: String,
    parent: usize,
    /// Children sorted by identifier, as directory records need.
    children: Vec<Child>,
    lba: u32,
    size: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Child {
    Dir(usize),
    File(usize),
}

#[derive(Debug)]
struct PlannedFile {
    /// `NAME.EXT;1`.
    ident: String,
    size: u64,
    lba: u32,
}

/// Every byte position of the image, worked out before anything is written.
#[derive(Debug)]
struct Plan {
    /// Space padded.
    volume_id: [u8; 32],
    dirs: Vec<Dir>,
    /// In `spec.files` order.
    files: Vec<PlannedFile>,
    date7: [u8; 7],
    date17: [u8; 17],
    terminator_lba: u32,
    path_table_size: u32,
    l_table_lba: u32,
    m_table_lba: u32,
    catalog: Option<(u32, [u8; 2048])>,
    /// The patched isolinux.bin, for the file of this index.
    bios_image: Option<(usize, Vec<u8>)>,
    /// The isohybrid MBR boot code and the fields after it (432..440).
    mbr_code: Option<Vec<u8>>,
    gpt: Option<Gpt>,
    volume_blocks: u32,
    image_bytes: u64,
}

impl Plan {
    fn new(spec: &IsoSpec) -> Result<Plan, IsoError> {
        check_volume_id(&spec.volume_id)?;
        let (date7, date17) = dates(spec.epoch)?;

        // The tree.
        let mut files = Vec::with_capacity(spec.files.len());
        let mut by_path: HashMap<&str, usize> = HashMap::new();
        let mut dir_by_path: HashMap<String, usize> = HashMap::new();
        // (identifier, parent, child dirs, child files) before ordering.
        let mut raw_dirs: Vec<(String, usize, Vec<usize>, Vec<usize>)> =
            vec![(String::new(), 0, Vec::new(), Vec::new())];
        dir_by_path.insert(String::new(), 0);
        for (i, f) in spec.files.iter().enumerate() {
            let (dirs, file_ident) = parse_path(&f.path)?;
            if by_path.insert(f.path.as_str(), i).is_some() {
                return Err(IsoError::Duplicate {
                    path: f.path.clone(),
                });
            }
            if dir_by_path.contains_key(&f.path) {
                return Err(IsoError::BadPath {
                    path: f.path.clone(),
                    reason: "is already a directory, holding other files; a path is a file or a directory, not both".into(),
                });
            }
            let mut parent = 0;
            let mut prefix = String::new();
            for d in dirs {
                prefix.push('/');
                prefix.push_str(d);
                if by_path.contains_key(prefix.as_str()) {
                    return Err(IsoError::FileDirConflict {
                        path: f.path.clone(),
                        other: prefix,
                    });
                }
                parent = match dir_by_path.get(&prefix) {
                    Some(&n) => n,
                    None => {
                        let n = raw_dirs.len();
                        raw_dirs.push((d.to_string(), parent, Vec::new(), Vec::new()));
                        raw_dirs[parent].2.push(n);
                        dir_by_path.insert(prefix.clone(), n);
                        n
                    }
                };
            }
            raw_dirs[parent].3.push(i);
            let size = content_size(f)?;
            if size > MAX_FILE_SIZE {
                return Err(IsoError::FileTooLarge {
                    path: f.path.clone(),
                    size,
                });
            }
            files.push(PlannedFile {
                ident: file_ident,
                size,
                lba: 0,
            });
        }

        if raw_dirs.len() > usize::from(u16::MAX) {
            return Err(IsoError::TooManyDirectories {
                count: raw_dirs.len(),
            });
        }

        // Path-table order: breadth first, siblings by identifier.
        let mut order = Vec::with_capacity(raw_dirs.len());
        let mut new_index = vec![0usize; raw_dirs.len()];
        let mut queue = VecDeque::from([0usize]);
        while let Some(d) = queue.pop_front() {
            new_index[d] = order.len();
            order.push(d);
            let mut kids = raw_dirs[d].2.clone();
            kids.sort_by(|a, b| ident_cmp(&raw_dirs[*a].0, &raw_dirs[*b].0));
            queue.extend(kids);
        }
        let mut dirs: Vec<Dir> = order
            .iter()
            .map(|&d| {
                let (ident, parent, sub, fs) = &raw_dirs[d];
                let children = sub
                    .iter()
                    .map(|s| Child::Dir(new_index[*s]))
                    .chain(fs.iter().map(|f| Child::File(*f)))
                    .collect();
                Dir {
                    ident: ident.clone(),
                    parent: new_index[*parent],
                    children,
                    lba: 0,
                    size: 0,
                }
            })
            .collect();
        // Children sorted now that every directory has its final index.
        for i in 0..dirs.len() {
            let mut children = std::mem::take(&mut dirs[i].children);
            children.sort_by(|a, b| {
                ident_cmp(
                    child_ident(&dirs, &files, *a),
                    child_ident(&dirs, &files, *b),
                )
            });
            dirs[i].children = children;
        }

        // Boot pieces, checked before anything is placed.
        let find = |what: &str, path: &str| {
            by_path
                .get(path)
                .copied()
                .ok_or_else(|| IsoError::MissingFile {
                    what: what.to_string(),
                    path: path.to_string(),
                })
        };
        let efi_index = match &spec.efi_image {
            Some(p) => Some(find("EFI boot image (efi_image)", p)?),
            None => None,
        };
        let bios_index = match &spec.bios {
            Some(b) => {
                if b.mbr_code.is_empty() || b.mbr_code.len() > MBR_CODE_MAX {
                    return Err(IsoError::BadMbrCode {
                        len: b.mbr_code.len(),
                    });
                }
                Some(find("BIOS boot file (isolinux_path)", &b.isolinux_path)?)
            }
            None => None,
        };
        let bios_bytes = match (&spec.bios, bios_index) {
            (Some(b), Some(i)) => {
                let bytes = read_small(&spec.files[i])?;
                check_isolinux(&b.isolinux_path, &bytes)?;
                if bytes.len() as u64 != files[i].size {
                    return Err(IsoError::HostFileChanged {
                        path: b.isolinux_path.clone(),
                        host: host_of(&spec.files[i]),
                        expected: files[i].size,
                        actual: bytes.len().to_string(),
                    });
                }
                Some((i, bytes))
            }
            _ => None,
        };
        let mut part_files = Vec::with_capacity(spec.partitions.len());
        for (n, p) in spec.partitions.iter().enumerate() {
            let bad = |reason: String| IsoError::BadPartition {
                index: n + 1,
                name: p.name.clone(),
                reason,
            };
            let Some(&i) = by_path.get(p.file.as_str()) else {
                return Err(bad(format!(
                    "its file {:?} is not one of the ISO's files; add it to `files` or fix the path",
                    p.file
                )));
            };
            if let Some(m) = part_files.iter().position(|&j| j == i) {
                return Err(bad(format!(
                    "partition {} already covers {:?}; partitions must not overlap",
                    m + 1,
                    p.file
                )));
            }
            if files[i].size == 0 {
                return Err(bad(format!(
                    "its file {:?} is empty, and a partition needs at least one sector",
                    p.file
                )));
            }
            part_files.push(i);
        }

        // Block addresses.
        let bootable = efi_index.is_some() || bios_index.is_some();
        let mut next: u64 = u64::from(PVD_LBA) + 1;
        if bootable {
            next += 1;
        }
        let terminator_lba = next as u32;
        next += 1;
        let path_table_size: u64 = dirs
            .iter()
            .map(|d| {
                let len = d.ident.len().max(1);
                (8 + len + len % 2) as u64
            })
            .sum();
        let pt_blocks = path_table_size.div_ceil(BLOCK).max(1);
        let l_table_lba = next;
        next += pt_blocks;
        let m_table_lba = next;
        next += pt_blocks;
        let catalog_lba = if bootable {
            next += 1;
            Some(next - 1)
        } else {
            None
        };
        for i in 0..dirs.len() {
            let size = dir_size(&dirs, &files, i);
            dirs[i].lba = to_u32(next)?;
            dirs[i].size = size;
            next += u64::from(size) / BLOCK;
        }
        let mut plain: Vec<usize> = (0..files.len())
            .filter(|i| !part_files.contains(i))
            .collect();
        plain.sort_by(|a, b| spec.files[*a].path.cmp(&spec.files[*b].path));
        for i in plain {
            files[i].lba = to_u32(next)?;
            next += files[i].size.div_ceil(BLOCK);
        }
        for &i in &part_files {
            next = next.div_ceil(PART_ALIGN_BLOCKS) * PART_ALIGN_BLOCKS;
            files[i].lba = to_u32(next)?;
            next += files[i].size.div_ceil(BLOCK);
        }
        let hybrid = spec.bios.is_some() || !spec.partitions.is_empty();
        let image_bytes = if hybrid {
            let sectors = next * (BLOCK / SECTOR) + GPT_TAIL_SECTORS;
            sectors.div_ceil(BLOCK / SECTOR) * BLOCK
        } else {
            next * BLOCK
        };
        let volume_blocks = to_u32(image_bytes / BLOCK)?;

        let catalog = catalog_lba.map(|lba| {
            let bios = bios_index.map(|i| files[i].lba);
            let efi = efi_index.map(|i| {
                let sectors = files[i].size.div_ceil(SECTOR);
                (files[i].lba, u16::try_from(sectors).unwrap_or(0))
            });
            (lba as u32, boot_catalog(bios, efi))
        });
        let bios_image = bios_bytes.map(|(i, mut bytes)| {
            patch_boot_info(&mut bytes, PVD_LBA, files[i].lba);
            (i, bytes)
        });
        let mbr_code = match (&spec.bios, bios_index) {
            (Some(b), Some(i)) => {
                let mut code = vec![0u8; 440];
                code[..b.mbr_code.len()].copy_from_slice(&b.mbr_code);
                let lba512 = u32::try_from(u64::from(files[i].lba) * (BLOCK / SECTOR))
                    .map_err(|_| IsoError::ImageTooLarge { bytes: image_bytes })?;
                code[432..436].copy_from_slice(&lba512.to_le_bytes());
                Some(code)
            }
            _ => None,
        };
        let gpt = if hybrid {
            let partitions = spec
                .partitions
                .iter()
                .zip(&part_files)
                .map(|(p, &i)| {
                    let first = u64::from(files[i].lba) * (BLOCK / SECTOR);
                    Partition {
                        type_guid: p.type_guid,
                        uuid: p.uuid,
                        name: p.name.clone(),
                        first_lba: first,
                        last_lba: first + files[i].size.div_ceil(SECTOR) - 1,
                        attributes: 0,
                    }
                })
                .collect();
            let gpt = Gpt {
                disk_guid: spec.disk_guid,
                partitions,
                size_bytes: image_bytes,
            };
            gpt.validate()?;
            Some(gpt)
        } else {
            None
        };

        let mut volume_id = [b' '; 32];
        volume_id[..spec.volume_id.len()].copy_from_slice(spec.volume_id.as_bytes());
        Ok(Plan {
            volume_id,
            dirs,
            files,
            date7,
            date17,
            terminator_lba,
            path_table_size: path_table_size as u32,
            l_table_lba: l_table_lba as u32,
            m_table_lba: m_table_lba as u32,
            catalog,
            bios_image,
            mbr_code,
            gpt,
            volume_blocks,
            image_bytes,
        })
    }

    fn extents(&self, spec: &IsoSpec) -> Vec<Extent> {
        spec.files
            .iter()
            .zip(&self.files)
            .map(|(f, p)| Extent {
                path: f.path.clone(),
                byte_offset: u64::from(p.lba) * BLOCK,
                len: p.size,
            })
            .collect()
    }

    fn write_to<W: Write + Seek>(
        &self,
        spec: &IsoSpec,
        w: &mut W,
        out: &Path,
    ) -> Result<(), IsoError> {
        let mut s = Seq { w, pos: 0, out };
        s.zeros_to(u64::from(PVD_LBA) * BLOCK)?;
        s.put(&self.pvd())?;
        if let Some((lba, _)) = &self.catalog {
            s.put(&boot_record(*lba))?;
        }
        s.zeros_to(u64::from(self.terminator_lba) * BLOCK)?;
        s.put(&terminator())?;
        s.zeros_to(u64::from(self.l_table_lba) * BLOCK)?;
        s.put(&self.path_table(false))?;
        s.zeros_to(u64::from(self.m_table_lba) * BLOCK)?;
        s.put(&self.path_table(true))?;
        if let Some((lba, cat)) = &self.catalog {
            s.zeros_to(u64::from(*lba) * BLOCK)?;
            s.put(cat)?;
        }
        for i in 0..self.dirs.len() {
            s.zeros_to(u64::from(self.dirs[i].lba) * BLOCK)?;
            s.put(&self.directory(i))?;
        }
        let mut order: Vec<usize> = (0..self.files.len())
            .filter(|i| self.files[*i].size > 0)
            .collect();
        order.sort_by_key(|i| self.files[*i].lba);
        for i in order {
            s.zeros_to(u64::from(self.files[i].lba) * BLOCK)?;
            match (&self.bios_image, &spec.files[i].content) {
                (Some((b, bytes)), _) if *b == i => s.put(bytes)?,
                (_, Content::Bytes(bytes)) => s.put(bytes)?,
                (_, Content::Host(host)) => {
                    s.copy_host(&spec.files[i].path, host, self.files[i].size)?
                }
            }
        }
        s.zeros_to(self.image_bytes)?;
        Ok(())
    }

    /// The isohybrid tables, once the image is written to its full length:
    /// the GPT (whose writer reads the entries back) and the MBR's boot code
    /// and disk signature.
    fn write_tables<F: Read + Write + Seek + fmt::Debug>(&self, spec: &IsoSpec, w: &mut F, out: &Path) -> Result<(), IsoError> {
        if let Some(gpt) = &self.gpt {
            gpt.write(w)?;
            let mut head = [0u8; 444];
            if let Some(code) = &self.mbr_code {
                head[..440].copy_from_slice(code);
            }
            // A fixed disk signature, from the disk GUID, like the rest.
            head[440..444].copy_from_slice(&spec.disk_guid.0[..4]);
            w.seek(SeekFrom::Start(0))
                .and_then(|_| w.write_all(&head))
                .and_then(|_| w.seek(SeekFrom::End(0)).map(|_| ()))
                .map_err(|source| IsoError::Io {
                    what: "writing the MBR of".into(),
                    path: out.to_path_buf(),
                    source,
                })?;
        }
        Ok(())
    }

    fn pvd(&self) -> [u8; 2048] {
        let mut d = [0u8; 2048];
        d[0] = 1;
        d[1..6].copy_from_slice(b"CD001");
        d[6] = 1;
        d[8..40].fill(b' '); // system identifier
        d[40..72].copy_from_slice(&self.volume_id);
        both32(&mut d[80..88], self.volume_blocks);
        both16(&mut d[120..124], 1); // volume set size
        both16(&mut d[124..128], 1); // volume sequence number
        both16(&mut d[128..132], BLOCK as u16);
        both32(&mut d[132..140], self.path_table_size);
        d[140..144].copy_from_slice(&self.l_table_lba.to_le_bytes());
        d[148..152].copy_from_slice(&self.m_table_lba.to_be_bytes());
        let root = &self.dirs[0];
        d[156..190].copy_from_slice(&record(root.lba, root.size, true, &[0], &self.date7));
        // Volume set, publisher, preparer, application, copyright, abstract
        // and bibliographic identifiers: unspecified.
        d[190..813].fill(b' ');
        d[813..830].copy_from_slice(&self.date17); // creation
        d[830..847].copy_from_slice(&self.date17); // modification
        d[847..863].fill(b'0'); // expiration: none
        d[864..880].fill(b'0'); // effective: unspecified
        d[881] = 1; // file structure version
        d
    }

    fn path_table(&self, big_endian: bool) -> Vec<u8> {
        let mut t = Vec::with_capacity(self.path_table_size as usize);
        for d in &self.dirs {
            let ident: &[u8] = if d.ident.is_empty() {
                &[0]
            } else {
                d.ident.as_bytes()
            };
            t.push(ident.len() as u8);
            t.push(0);
            let parent = (d.parent + 1) as u16;
            if big_endian {
                t.extend_from_slice(&d.lba.to_be_bytes());
                t.extend_from_slice(&parent.to_be_bytes());
            } else {
                t.extend_from_slice(&d.lba.to_le_bytes());
                t.extend_from_slice(&parent.to_le_bytes());
            }
            t.extend_from_slice(ident);
            if ident.len() % 2 == 1 {
                t.push(0);
            }
        }
        t
    }

    /// The extent of directory `i`: `.`, `..`, then the sorted children,
    /// no record crossing a block boundary.
    fn directory(&self, i: usize) -> Vec<u8> {
        let d = &self.dirs[i];
        let parent = &self.dirs[d.parent];
        let mut buf = vec![0u8; d.size as usize];
        let mut pos = 0usize;
        let mut put = |rec: &[u8]| {
            if pos % BLOCK as usize + rec.len() > BLOCK as usize {
                pos = pos.div_ceil(BLOCK as usize) * BLOCK as usize;
            }
            buf[pos..pos + rec.len()].copy_from_slice(rec);
            pos += rec.len();
        };
        put(&record(d.lba, d.size, true, &[0], &self.date7));
        put(&record(parent.lba, parent.size, true, &[1], &self.date7));
        for c in &d.children {
            let rec = match *c {
                Child::Dir(j) => {
                    let s = &self.dirs[j];
                    record(s.lba, s.size, true, s.ident.as_bytes(), &self.date7)
                }
                Child::File(f) => {
                    let f = &self.files[f];
                    record(f.lba, f.size as u32, false, f.ident.as_bytes(), &self.date7)
                }
            };
            put(&rec);
        }
        buf
    }
}

/// Writes forward only, filling gaps with zeros.
struct Seq<'a, W: Write> {
    w: &'a mut W,
    pos: u64,
    out: &'a Path,
}

impl<W: Write> Seq<'_, W> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), IsoError> {
        self.w.write_all(bytes).map_err(|source| IsoError::Io {
            what: "writing".into(),
            path: self.out.to_path_buf(),
            source,
        })?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Zeros up to byte `offset`; the plan never places anything behind the
    /// write position.
    fn zeros_to(&mut self, offset: u64) -> Result<(), IsoError> {
        debug_assert!(
            offset >= self.pos,
            "ISO plan overlaps: {offset} < {}",
            self.pos
        );
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        while self.pos < offset {
            let n = (offset - self.pos).min(ZEROS.len() as u64) as usize;
            self.put(&ZEROS[..n])?;
        }
        Ok(())
    }

    /// Streams a host file, which must still be `size` bytes.
    fn copy_host(&mut self, path: &str, host: &Path, size: u64) -> Result<(), IsoError> {
        let host_err = |source| IsoError::HostFile {
            path: path.to_string(),
            host: host.to_path_buf(),
            source,
        };
        let changed = |actual: String| IsoError::HostFileChanged {
            path: path.to_string(),
            host: host.to_path_buf(),
            expected: size,
            actual,
        };
        let mut f = File::open(host).map_err(host_err)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        while done < size {
            let want = (size - done).min(buf.len() as u64) as usize;
            let n = f.read(&mut buf[..want]).map_err(host_err)?;
            if n == 0 {
                return Err(changed(done.to_string()));
            }
            self.put(&buf[..n])?;
            done += n as u64;
        }
        if f.read(&mut buf[..1]).map_err(host_err)? != 0 {
            return Err(changed(format!("more than {size}")));
        }
        Ok(())
    }
}

fn to_u32(blocks: u64) -> Result<u32, IsoError> {
    u32::try_from(blocks).map_err(|_| IsoError::ImageTooLarge {
        bytes: blocks.saturating_mul(BLOCK),
    })
}

fn both16(dst: &mut [u8], v: u16) {
    dst[..2].copy_from_slice(&v.to_le_bytes());
    dst[2..4].copy_from_slice(&v.to_be_bytes());
}

fn both32(dst: &mut [u8], v: u32) {
    dst[..4].copy_from_slice(&v.to_le_bytes());
    dst[4..8].copy_from_slice(&v.to_be_bytes());
}

fn record_len(ident_len: usize) -> usize {
    RECORD_BASE + ident_len + (1 - ident_len % 2)
}

/// A directory record (ECMA-119 9.1).
fn record(lba: u32, size: u32, is_dir: bool, ident: &[u8], date: &[u8; 7]) -> Vec<u8> {
    let mut r = vec![0u8; record_len(ident.len())];
    r[0] = r.len() as u8;
    both32(&mut r[2..10], lba);
    both32(&mut r[10..18], size);
    r[18..25].copy_from_slice(date);
    r[25] = if is_dir { 0x02 } else { 0 };
    both16(&mut r[28..32], 1);
    r[32] = ident.len() as u8;
    r[33..33 + ident.len()].copy_from_slice(ident);
    r
}

fn child_ident<'a>(dirs: &'a [Dir], files: &'a [PlannedFile], c: Child) -> &'a str {
    match c {
        Child::Dir(d) => &dirs[d].ident,
        Child::File(f) => &files[f].ident,
    }
}

/// Size of directory `i`'s extent, in whole blocks.
fn dir_size(dirs: &[Dir], files: &[PlannedFile], i: usize) -> u32 {
    let block = BLOCK as usize;
    let mut pos = 2 * record_len(1);
    for c in &dirs[i].children {
        let len = record_len(child_ident(dirs, files, *c).len());
        if pos % block + len > block {
            pos = pos.div_ceil(block) * block;
        }
        pos += len;
    }
    (pos.div_ceil(block) * block) as u32
}

/// ECMA-119 9.3 order: by name, then by extension, each padded with spaces
/// (the versions are all 1).
fn ident_cmp(a: &str, b: &str) -> Ordering {
    fn split(s: &str) -> (&[u8], &[u8]) {
        let s = s.strip_suffix(";1").unwrap_or(s);
        match s.split_once('.') {
            Some((n, e)) => (n.as_bytes(), e.as_bytes()),
            None => (s.as_bytes(), &[]),
        }
    }
    fn padded(a: &[u8], b: &[u8]) -> Ordering {
        let n = a.len().max(b.len());
        (0..n)
            .map(|i| {
                let x = a.get(i).copied().unwrap_or(b' ');
                let y = b.get(i).copied().unwrap_or(b' ');
                x.cmp(&y)
            })
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
    }
    let (an, ae) = split(a);
    let (bn, be) = split(b);
    padded(an, bn).then_with(|| padded(ae, be))
}

fn is_d_char(c: u8) -> bool {
    c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_'
}

fn name_problem(part: &str) -> Option<String> {
    if part.bytes().all(is_d_char) {
        return None;
    }
    if part.bytes().any(|c| c.is_ascii_lowercase()) {
        let upper = part.to_ascii_uppercase();
        if upper.bytes().all(|c| is_d_char(c) || c == b'.') {
            return Some(format!(
                "{part:?} has lower case letters; ISO 9660 names are upper case ({upper:?})"
            ));
        }
    }
    Some(format!(
        "{part:?} may only use A-Z, 0-9 and _ (ISO 9660 d-characters) and one dot in a file name"
    ))
}

/// Splits `/A/B/NAME.EXT` into its directories and the file identifier
/// `NAME.EXT;1`, checking every name.
fn parse_path(path: &str) -> Result<(Vec<&str>, String), IsoError> {
    let bad = |reason: String| IsoError::BadPath {
        path: path.to_string(),
        reason,
    };
    if path.contains(';') {
        return Err(bad("leave out the `;1` version; kiln adds it".to_string()));
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(bad("must be absolute, starting with `/`".into()));
    };
    let parts: Vec<&str> = rest.split('/').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(bad(
            "has an empty component (a doubled or trailing `/`, or no file name)".into(),
        ));
    }
    let (file, dirs) = parts.split_last().expect("split yields at least one part");
    if dirs.len() + 1 > MAX_DIR_LEVELS {
        return Err(bad(format!(
            "{} directory levels below the root; ISO 9660 allows {} levels, root included",
            dirs.len(),
            MAX_DIR_LEVELS
        )));
    }
    for d in dirs {
        if let Some(p) = name_problem(d) {
            return Err(bad(format!("directory name {p}")));
        }
        if d.len() > MAX_DIR_ID {
            return Err(bad(format!(
                "directory name {d:?} is {} characters; ISO 9660 level 2 allows {MAX_DIR_ID}",
                d.len()
            )));
        }
    }
    if file.ends_with('.') {
        return Err(bad(format!(
            "file name {file:?} ends with a dot; leave it out (kiln writes `NAME.;1` for a name without extension)"
        )));
    }
    let (name, ext) = file.split_once('.').unwrap_or((file, ""));
    if ext.contains('.') {
        return Err(bad(format!(
            "file name {file:?} has more than one dot; ISO 9660 allows one"
        )));
    }
    for part in [name, ext] {
        if let Some(p) = name_problem(part) {
            return Err(bad(format!("file name {p}")));
        }
    }
    if name.len() + ext.len() > MAX_FILE_ID {
        return Err(bad(format!(
            "file name {file:?} has {} characters besides the dot; ISO 9660 level 2 allows {MAX_FILE_ID}",
            name.len() + ext.len()
        )));
    }
    let ident = format!("{name}.{ext};1");
    let total: usize = dirs.iter().map(|d| d.len() + 1).sum::<usize>() + ident.len();
    if total > MAX_PATH_LEN {
        return Err(bad(format!(
            "is {total} characters with its version; ISO 9660 allows {MAX_PATH_LEN}"
        )));
    }
    Ok((dirs.to_vec(), ident))
}

fn check_volume_id(id: &str) -> Result<(), IsoError> {
    let bad = |reason: String| IsoError::BadVolumeId {
        id: id.to_string(),
        reason,
    };
    if id.is_empty() || id.len() > MAX_VOLUME_ID {
        return Err(bad(format!(
            "must be 1 to {MAX_VOLUME_ID} characters, not {}",
            id.len()
        )));
    }
    if !id.bytes().all(is_d_char) {
        return Err(bad(format!(
            "may only use A-Z, 0-9 and _ (try {:?})",
            id.to_ascii_uppercase()
                .bytes()
                .map(|c| if is_d_char(c) { c as char } else { '_' })
                .collect::<String>()
        )));
    }
    Ok(())
}

use kiln_contract::date::civil;

/// The 7-byte directory record date and the 17-byte volume descriptor date,
/// both UTC.
fn dates(epoch: u64) -> Result<([u8; 7], [u8; 17]), IsoError> {
    let (y, mo, d, h, mi, s) = civil(epoch);
    if y > 2155 {
        return Err(IsoError::BadEpoch {
            epoch,
            reason: format!(
                "is in the year {y}; ISO 9660 directory dates end in 2155. Set SOURCE_DATE_EPOCH to a real date"
            ),
        });
    }
    let short = [
        (y - 1900) as u8,
        mo as u8,
        d as u8,
        h as u8,
        mi as u8,
        s as u8,
        0,
    ];
    let mut long = [0u8; 17];
    long[..16].copy_from_slice(format!("{y:04}{mo:02}{d:02}{h:02}{mi:02}{s:02}00").as_bytes());
    Ok((short, long))
}

fn content_size(f: &IsoFile) -> Result<u64, IsoError> {
    match &f.content {
        Content::Bytes(b) => Ok(b.len() as u64),
        Content::Host(host) => {
            let meta = std::fs::metadata(host).map_err(|source| IsoError::HostFile {
                path: f.path.clone(),
                host: host.clone(),
                source,
            })?;
            if !meta.is_file() {
                return Err(IsoError::HostFile {
                    path: f.path.clone(),
                    host: host.clone(),
                    source: io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
                });
            }
            Ok(meta.len())
        }
    }
}

fn read_small(f: &IsoFile) -> Result<Vec<u8>, IsoError> {
    match &f.content {
        Content::Bytes(b) => Ok(b.clone()),
        Content::Host(host) => std::fs::read(host).map_err(|source| IsoError::HostFile {
            path: f.path.clone(),
            host: host.clone(),
            source,
        }),
    }
}

fn host_of(f: &IsoFile) -> PathBuf {
    match &f.content {
        Content::Host(h) => h.clone(),
        Content::Bytes(_) => PathBuf::new(),
    }
}

fn check_isolinux(path: &str, bytes: &[u8]) -> Result<(), IsoError> {
    let bad = |reason: &str| IsoError::BadIsolinux {
        path: path.to_string(),
        reason: reason.to_string(),
    };
    if bytes.len() < BOOT_INFO_END + ISOHYBRID_MAGIC.len() {
        return Err(bad(&format!(
            "{} bytes is too short for isolinux.bin (it holds a boot info table and the isohybrid mark at 0x40)",
            bytes.len()
        )));
    }
    if bytes[0x40..0x44] != ISOHYBRID_MAGIC {
        return Err(bad(
            "has no isohybrid mark (fb c0 78 70 at byte 0x40), so the isohybrid MBR cannot start it; use isolinux.bin from Debian's isolinux package",
        ));
    }
    Ok(())
}

/// The El Torito boot info table (what `mkisofs -boot-info-table` writes):
/// at byte 8, the PVD's LBA, the file's LBA, its length and the sum of its
/// 32-bit little-endian words from byte 64 on; then 40 zero bytes.
fn patch_boot_info(bytes: &mut [u8], pvd_lba: u32, file_lba: u32) {
    let sum = bytes[BOOT_INFO_END..].chunks(4).fold(0u32, |acc, c| {
        let mut w = [0u8; 4];
        w[..c.len()].copy_from_slice(c);
        acc.wrapping_add(u32::from_le_bytes(w))
    });
    let len = bytes.len() as u32;
    bytes[8..12].copy_from_slice(&pvd_lba.to_le_bytes());
    bytes[12..16].copy_from_slice(&file_lba.to_le_bytes());
    bytes[16..20].copy_from_slice(&len.to_le_bytes());
    bytes[20..24].copy_from_slice(&sum.to_le_bytes());
    bytes[24..BOOT_INFO_END].fill(0);
}

const PLATFORM_X86: u8 = 0x00;
const PLATFORM_EFI: u8 = 0xEF;
/// isolinux loads 4 sectors of 512 bytes (`-boot-load-size 4`).
const BIOS_LOAD_SECTORS: u16 = 4;

/// A bootable no-emulation entry, load segment 0 (meaning 0x7C0).
fn catalog_entry(lba: u32, sectors: u16) -> [u8; 32] {
    let mut e = [0u8; 32];
    e[0] = 0x88;
    e[6..8].copy_from_slice(&sectors.to_le_bytes());
    e[8..12].copy_from_slice(&lba.to_le_bytes());
    e
}

/// The El Torito boot catalog: validation entry, default entry (BIOS if
/// present, else UEFI), and with both, a final section for UEFI.
fn boot_catalog(bios: Option<u32>, efi: Option<(u32, u16)>) -> [u8; 2048] {
    let mut c = [0u8; 2048];
    c[0] = 0x01;
    c[1] = if bios.is_some() {
        PLATFORM_X86
    } else {
        PLATFORM_EFI
    };
    c[30] = 0x55;
    c[31] = 0xAA;
    let sum = c[..32].chunks_exact(2).fold(0u16, |a, w| {
        a.wrapping_add(u16::from_le_bytes([w[0], w[1]]))
    });
    c[28..30].copy_from_slice(&0u16.wrapping_sub(sum).to_le_bytes());
    match (bios, efi) {
        (Some(b), efi) => {
            c[32..64].copy_from_slice(&catalog_entry(b, BIOS_LOAD_SECTORS));
            if let Some((lba, sectors)) = efi {
                c[64] = 0x91; // final section header
                c[65] = PLATFORM_EFI;
                c[66..68].copy_from_slice(&1u16.to_le_bytes());
                c[96..128].copy_from_slice(&catalog_entry(lba, sectors));
            }
        }
        (None, Some((lba, sectors))) => {
            c[32..64].copy_from_slice(&catalog_entry(lba, sectors));
        }
        (None, None) => {}
    }
    c
}

fn boot_record(catalog_lba: u32) -> [u8; 2048] {
    let mut d = [0u8; 2048];
    d[1..6].copy_from_slice(b"CD001");
    d[6] = 1;
    let id = b"EL TORITO SPECIFICATION";
    d[7..7 + id.len()].copy_from_slice(id);
    d[71..75].copy_from_slice(&catalog_lba.to_le_bytes());
    d
}

fn terminator() -> [u8; 2048] {
    let mut d = [0u8; 2048];
    d[0] = 255;
    d[1..6].copy_from_slice(b"CD001");
    d[6] = 1;
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpt::{deterministic_guid, types};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn le32(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    fn be32(b: &[u8], o: usize) -> u32 {
        u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
    }

    /// A small ISO 9660 reader, independent of the writer's plan: files by
    /// path (as written, without `;1` or a bare trailing dot) with their
    /// extent, and directories by path with theirs.
    #[derive(Debug, Default)]
    struct Tree {
        files: BTreeMap<String, (u32, u32)>,
        dirs: BTreeMap<String, (u32, u32)>,
    }

    fn read_tree(img: &[u8]) -> Tree {
        let pvd = &img[16 * 2048..17 * 2048];
        assert_eq!(pvd[0], 1);
        assert_eq!(&pvd[1..6], b"CD001");
        assert_eq!(
            le32(pvd, 80) as usize * 2048,
            img.len(),
            "volume space size"
        );
        assert_eq!(be32(pvd, 84), le32(pvd, 80), "both-endian volume size");
        let root = &pvd[156..190];
        assert_eq!(root[0], 34);
        let mut tree = Tree::default();
        let (lba, size) = (le32(root, 2), le32(root, 10));
        tree.dirs.insert(String::new(), (lba, size));
        walk(img, "", lba, size, (lba, size), &mut tree);
        tree
    }

    fn walk(img: &[u8], path: &str, lba: u32, size: u32, parent: (u32, u32), tree: &mut Tree) {
        assert_eq!(size % 2048, 0, "directory {path:?} size");
        let mut seen = 0;
        for block in 0..size / 2048 {
            let base = (lba + block) as usize * 2048;
            let mut pos = 0usize;
            while pos < 2048 && img[base + pos] != 0 {
                let r = &img[base + pos..];
                let len = r[0] as usize;
                assert!(pos + len <= 2048, "record crosses a block in {path:?}");
                assert_eq!(len % 2, 0, "odd record length");
                let (elba, esize) = (le32(r, 2), le32(r, 10));
                assert_eq!(be32(r, 6), elba);
                assert_eq!(be32(r, 14), esize);
                let ident = &r[33..33 + r[32] as usize];
                let is_dir = r[25] & 2 != 0;
                match (seen, ident) {
                    (0, [0]) => assert_eq!((elba, esize), (lba, size), "`.` of {path:?}"),
                    (1, [1]) => assert_eq!((elba, esize), parent, "`..` of {path:?}"),
                    (0 | 1, _) => panic!("{path:?} does not start with `.` and `..`"),
                    _ => {
                        let name = std::str::from_utf8(ident).unwrap();
                        if is_dir {
                            let p = format!("{path}/{name}");
                            tree.dirs.insert(p.clone(), (elba, esize));
                            walk(img, &p, elba, esize, (lba, size), tree);
                        } else {
                            let name = name.strip_suffix(";1").unwrap();
                            let name = name.strip_suffix('.').unwrap_or(name);
                            tree.files.insert(format!("{path}/{name}"), (elba, esize));
                        }
                    }
                }
                seen += 1;
                pos += len;
            }
            assert!(
                img[base + pos.min(2047)..base + 2048]
                    .iter()
                    .all(|b| *b == 0)
                    || pos >= 2048
            );
        }
    }

    /// Both path tables list every directory once, parents first, with the
    /// extents the directory records give.
    fn check_path_tables(img: &[u8], tree: &Tree) {
        let pvd = &img[16 * 2048..17 * 2048];
        let size = le32(pvd, 132) as usize;
        for (lba, big) in [(le32(pvd, 140), false), (be32(pvd, 148), true)] {
            let t = &img[lba as usize * 2048..lba as usize * 2048 + size];
            let mut pos = 0;
            let mut paths: Vec<String> = Vec::new();
            while pos < size {
                let n = t[pos] as usize;
                let (elba, parent) = if big {
                    (
                        be32(t, pos + 2),
                        u16::from_be_bytes([t[pos + 6], t[pos + 7]]),
                    )
                } else {
                    (
                        le32(t, pos + 2),
                        u16::from_le_bytes([t[pos + 6], t[pos + 7]]),
                    )
                };
                let ident = &t[pos + 8..pos + 8 + n];
                let path = if paths.is_empty() {
                    assert_eq!((ident, parent), (&[0u8][..], 1));
                    String::new()
                } else {
                    assert!((parent as usize) <= paths.len(), "parent listed later");
                    format!(
                        "{}/{}",
                        paths[parent as usize - 1],
                        std::str::from_utf8(ident).unwrap()
                    )
                };
                assert_eq!(tree.dirs[&path].0, elba, "{path:?} in the path table");
                paths.push(path);
                pos += 8 + n + n % 2;
            }
            assert_eq!(paths.len(), tree.dirs.len());
        }
    }

    fn spec(files: Vec<IsoFile>) -> IsoSpec {
        IsoSpec {
            volume_id: "UNIT".into(),
            epoch: 1_700_000_000,
            files,
            efi_image: None,
            bios: None,
            partitions: Vec::new(),
            disk_guid: deterministic_guid("iso-unit", "disk"),
        }
    }

    /// A fake isolinux.bin that carries the isohybrid mark.
    fn fake_isolinux(len: usize) -> Vec<u8> {
        let mut b: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        b[0x40..0x44].copy_from_slice(&ISOHYBRID_MAGIC);
        b
    }

    fn write_vec(spec: &IsoSpec) -> (Vec<u8>, Vec<Extent>) {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("t.iso");
        let e = write(spec, &out).unwrap();
        (std::fs::read(out).unwrap(), e)
    }

    #[test]
    fn paths_are_checked() {
        let ok = |p: &str, dirs: &[&str], ident: &str| {
            let (d, i) = parse_path(p).unwrap();
            assert_eq!((d.as_slice(), i.as_str()), (dirs, ident), "{p}");
        };
        ok("/A.B", &[], "A.B;1");
        ok("/NOEXT", &[], "NOEXT.;1");
        ok("/.HIDDEN", &[], ".HIDDEN;1");
        ok("/EFI/BOOT/BOOTX64.EFI", &["EFI", "BOOT"], "BOOTX64.EFI;1");
        ok(
            &format!("/{}", "X".repeat(30)),
            &[],
            &format!("{}.;1", "X".repeat(30)),
        );
        ok(
            "/1/2/3/4/5/6/7/F",
            &["1", "2", "3", "4", "5", "6", "7"],
            "F.;1",
        );
        let bad = |p: &str, want: &str| {
            let msg = parse_path(p).unwrap_err().to_string();
            assert!(
                msg.contains(want) && msg.contains(p),
                "{p}: wanted {want:?} in {msg:?}"
            );
        };
        bad("A.B", "absolute");
        bad("/efi/x.efi", "\"EFI\"");
        bad("/A.B;1", "`;1`");
        bad("/A//B", "empty component");
        bad("/A/", "empty component");
        bad("/", "empty component");
        bad("/A.B.C", "more than one dot");
        bad("/.", "ends with a dot");
        bad("/..", "ends with a dot");
        bad("/NAME.", "ends with a dot");
        bad("/A-B", "A-Z, 0-9 and _");
        bad("/É", "A-Z, 0-9 and _");
        bad(&format!("/{}", "X".repeat(31)), "level 2 allows 30");
        bad(&format!("/{}/F", "D".repeat(32)), "level 2 allows 31");
        bad("/1/2/3/4/5/6/7/8/F", "8 directory levels");
        let long = format!(
            "/{}/{}.EFI",
            vec!["D".repeat(31); 7].join("/"),
            "X".repeat(26)
        );
        bad(&long, "ISO 9660 allows 255");
    }

    #[test]
    fn identifiers_sort_the_ecma119_way() {
        let mut ids = vec!["A.B0;1", "A_.;1", "A.B;1", "AB", "A0.;1", "A", "A.;1"];
        ids.sort_by(|a, b| ident_cmp(a, b));
        // Names first, padded with spaces: "A" < "A0"; then extensions:
        // "B" < "B0", though ';' sorts after '0' bytewise.
        assert_eq!(
            ids,
            ["A", "A.;1", "A.B;1", "A.B0;1", "A0.;1", "AB", "A_.;1"]
        );
    }

    #[test]
    fn volume_ids_are_checked() {
        check_volume_id("KILN_AMD64_2024").unwrap();
        check_volume_id(&"V".repeat(32)).unwrap();
        for (id, want) in [
            ("", "1 to 32"),
            ("kiln", "\"KILN\""),
            ("KILN-1", "\"KILN_1\""),
            (&"V".repeat(33) as &str, "1 to 32"),
        ] {
            let msg = check_volume_id(id).unwrap_err().to_string();
            assert!(msg.contains(want), "{id:?}: {msg}");
        }
    }

    #[test]
    fn dates_are_utc() {
        assert_eq!(civil(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(civil(1_700_000_000), (2023, 11, 14, 22, 13, 20));
        assert_eq!(civil(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(civil(5_869_583_999), (2155, 12, 31, 23, 59, 59));
        let (short, long) = dates(1_700_000_000).unwrap();
        assert_eq!(short, [123, 11, 14, 22, 13, 20, 0]);
        assert_eq!(&long, b"2023111422132000\0");
        dates(5_869_583_999).unwrap();
        let msg = dates(5_869_584_000).unwrap_err().to_string();
        assert!(
            msg.contains("2156") && msg.contains("SOURCE_DATE_EPOCH"),
            "{msg}"
        );
        assert!(dates(u64::MAX).is_err());
    }

    #[test]
    fn boot_catalog_entries() {
        let words_sum = |c: &[u8]| {
            c[..32].chunks_exact(2).fold(0u16, |a, w| {
                a.wrapping_add(u16::from_le_bytes([w[0], w[1]]))
            })
        };
        let both = boot_catalog(Some(40), Some((600, 2000)));
        assert_eq!(words_sum(&both), 0);
        assert_eq!((both[0], both[1], both[30], both[31]), (1, 0, 0x55, 0xAA));
        assert_eq!(both[32], 0x88);
        assert_eq!(both[33], 0, "no emulation");
        assert_eq!(&both[34..36], &[0, 0], "load segment 0 (0x7C0)");
        assert_eq!(&both[38..40], &4u16.to_le_bytes());
        assert_eq!(le32(&both, 40), 40);
        assert_eq!(&both[64..68], &[0x91, 0xEF, 1, 0], "final UEFI section");
        assert_eq!(both[96], 0x88);
        assert_eq!(&both[102..104], &2000u16.to_le_bytes());
        assert_eq!(le32(&both, 104), 600);
        assert!(both[128..].iter().all(|b| *b == 0));

        let efi = boot_catalog(None, Some((600, 0)));
        assert_eq!(words_sum(&efi), 0);
        assert_eq!(efi[1], 0xEF);
        assert_eq!(efi[32], 0x88);
        assert_eq!(le32(&efi, 40), 600);
        assert!(efi[64..].iter().all(|b| *b == 0), "no sections");

        let bios = boot_catalog(Some(40), None);
        assert_eq!(words_sum(&bios), 0);
        assert!(bios[64..].iter().all(|b| *b == 0));
    }

    #[test]
    fn boot_info_table() {
        // 64 header bytes, then words 1, 2 and a partial word 0x03.
        let mut b = vec![0xAAu8; 64];
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&2u32.to_le_bytes());
        b.push(3);
        patch_boot_info(&mut b, 16, 1234);
        assert!(b[..8].iter().all(|x| *x == 0xAA), "the jump stays");
        assert_eq!(le32(&b, 8), 16);
        assert_eq!(le32(&b, 12), 1234);
        assert_eq!(le32(&b, 16), 73);
        assert_eq!(le32(&b, 20), 6);
        assert!(b[24..64].iter().all(|x| *x == 0));
    }

    #[test]
    fn layout_aligns_partitions_and_ends_with_the_backup_gpt() {
        let mut s = spec(vec![
            IsoFile::bytes("/SMALL.TXT", b"x".to_vec()),
            IsoFile::bytes("/BOOT/EFI.IMG", vec![1; 300_000]),
            IsoFile::bytes("/LIVE/ROOT.SQF", vec![2; 5000]),
            IsoFile::bytes("/ISOLINUX/ISOLINUX.BIN", fake_isolinux(4096)),
        ]);
        s.efi_image = Some("/BOOT/EFI.IMG".into());
        s.bios = Some(BiosBoot {
            isolinux_path: "/ISOLINUX/ISOLINUX.BIN".into(),
            mbr_code: vec![0x90; 432],
        });
        let part = |n: &str, f: &str| HybridPartition {
            name: n.into(),
            type_guid: types::LINUX_DATA,
            uuid: deterministic_guid("iso-unit", n),
            file: f.into(),
        };
        s.partitions = vec![part("root", "/LIVE/ROOT.SQF"), part("esp", "/BOOT/EFI.IMG")];
        let (img, ext) = write_vec(&s);
        let at = |p: &str| ext.iter().find(|e| e.path == p).unwrap().clone();
        let (root, esp) = (at("/LIVE/ROOT.SQF"), at("/BOOT/EFI.IMG"));
        assert_eq!(root.byte_offset, 1 << 20, "first partition file on 1 MiB");
        assert_eq!(esp.byte_offset, 2 << 20, "next one on the next MiB");
        assert!(at("/SMALL.TXT").byte_offset < 1 << 20);
        let gpt = Gpt::read(&mut io::Cursor::new(&img)).unwrap();
        assert_eq!(gpt.size_bytes, img.len() as u64);
        assert_eq!(gpt.disk_guid, s.disk_guid);
        assert_eq!(gpt.partitions[0].first_lba, 2048);
        assert_eq!(gpt.partitions[0].last_lba, 2048 + 10 - 1);
        assert_eq!(gpt.partitions[1].first_lba, 4096);
        assert_eq!(gpt.partitions[1].last_lba, 4096 + 586 - 1);
        assert_eq!(gpt.partitions[1].name, "esp");
        // The backup table sits after the data, which ends with the ESP.
        assert!(gpt.last_usable_lba() >= gpt.partitions[1].last_lba);
        assert!(img.len() as u64 - 33 * 512 >= esp.byte_offset + esp.len);
        assert_eq!(img.len() % 2048, 0);
        assert!(img.len() as u64 - 33 * 512 - (esp.byte_offset + esp.len) < 2 * 2048);
        // The MBR: code, isolinux.bin's 512-byte LBA, signature, 0xEE.
        let bin = at("/ISOLINUX/ISOLINUX.BIN");
        assert!(img[..432].iter().all(|b| *b == 0x90));
        assert_eq!(le32(&img, 432) as u64, bin.byte_offset / 512);
        assert_eq!(le32(&img, 436), 0);
        assert_eq!(&img[440..444], &s.disk_guid.0[..4]);
        assert_eq!(img[446 + 4], 0xEE);
        // The boot record points at the catalog, which points at the files.
        assert_eq!(
            &img[17 * 2048 + 7..17 * 2048 + 30],
            b"EL TORITO SPECIFICATION"
        );
        let cat = le32(&img, 17 * 2048 + 71) as usize * 2048;
        assert_eq!(le32(&img, cat + 40) as u64 * 2048, bin.byte_offset);
        assert_eq!(le32(&img, cat + 104) as u64 * 2048, esp.byte_offset);
        assert_eq!(&img[cat + 102..cat + 104], &586u16.to_le_bytes());
        assert_eq!(img[18 * 2048], 255, "terminator");
        // isolinux.bin carries its boot info table.
        let b = bin.byte_offset as usize;
        assert_eq!(le32(&img, b + 8), 16);
        assert_eq!(le32(&img, b + 12) as u64 * 2048, bin.byte_offset);
        assert_eq!(le32(&img, b + 16), 4096);
        let tree = read_tree(&img);
        check_path_tables(&img, &tree);
        assert_eq!(tree.files.len(), 4);
    }

    #[test]
    fn no_hybrid_parts_without_bios_or_partitions() {
        let mut s = spec(vec![IsoFile::bytes("/EFI.IMG", vec![7; 4096])]);
        s.efi_image = Some("/EFI.IMG".into());
        let (img, ext) = write_vec(&s);
        assert!(img[..16 * 2048].iter().all(|b| *b == 0));
        assert_eq!(img.len() as u64, ext[0].byte_offset + 4096, "no tail");
    }

    #[test]
    fn empty_files_take_no_blocks() {
        let s = spec(vec![
            IsoFile::bytes("/A.TXT", Vec::new()),
            IsoFile::bytes("/B.TXT", b"b".to_vec()),
        ]);
        let (img, ext) = write_vec(&s);
        assert_eq!(ext[0].len, 0);
        assert_eq!(
            ext[0].byte_offset, ext[1].byte_offset,
            "A points where B starts"
        );
        assert_eq!(img.len() as u64, ext[1].byte_offset + 2048);
    }

    #[test]
    fn spec_mistakes_name_the_culprit() {
        let check = |s: IsoSpec, want: &[&str]| {
            let msg = Plan::new(&s).unwrap_err().to_string();
            for w in want {
                assert!(msg.contains(w), "wanted {w:?} in {msg:?}");
            }
        };
        let f = |p: &str| IsoFile::bytes(p, b"x".to_vec());
        check(
            spec(vec![f("/A/B"), f("/A")]),
            &["\"/A\"", "already a directory"],
        );
        check(
            spec(vec![f("/A"), f("/A/B")]),
            &["\"/A/B\"", "\"/A\" is a file"],
        );
        check(spec(vec![f("/A"), f("/A")]), &["\"/A\"", "twice"]);
        let mut s = spec(vec![f("/A")]);
        s.bios = Some(BiosBoot {
            isolinux_path: "/A".into(),
            mbr_code: vec![0; 433],
        });
        check(s.clone(), &["433 bytes"]);
        s.bios.as_mut().unwrap().mbr_code = vec![0; 432];
        check(s.clone(), &["\"/A\"", "too short"]);
        s.files = vec![IsoFile::bytes("/A", vec![0; 100])];
        check(s.clone(), &["\"/A\"", "isohybrid mark"]);
        s.files = vec![IsoFile::bytes("/A", fake_isolinux(100))];
        Plan::new(&s).unwrap();
        let mut s = spec(vec![IsoFile::host("/D", "/")]);
        check(s.clone(), &["\"/\"", "not a regular file"]);
        s.files = vec![f("/A")];
        s.epoch = u64::MAX;
        check(s, &["epoch"]);
    }

    #[test]
    fn host_files_that_change_are_caught() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("h");
        std::fs::write(&host, vec![1u8; 5000]).unwrap();
        let s = spec(vec![IsoFile::host("/H.BIN", &host)]);
        let out = dir.path().join("o.iso");
        for new_len in [4000, 6000] {
            let plan = Plan::new(&s).unwrap();
            std::fs::write(&host, vec![1u8; new_len]).unwrap();
            let mut f = io::Cursor::new(Vec::new());
            let msg = plan.write_to(&s, &mut f, &out).unwrap_err().to_string();
            assert!(msg.contains("changed") && msg.contains("/H.BIN"), "{msg}");
            std::fs::write(&host, vec![1u8; 5000]).unwrap();
        }
    }

    /// Random trees of upper-case names: every file comes back through an
    /// independent reader, at the extent `write` reported.
    fn tree_strategy() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
        let dir = proptest::sample::select(vec!["A", "B0", "EFI", "LONG_DIRECTORY_NAME_1", "Z"]);
        let name = "[A-Z0-9_]{1,12}(\\.[A-Z0-9_]{1,3})?";
        let file = (
            proptest::collection::vec(dir, 0..4),
            name,
            proptest::collection::vec(any::<u8>(), 0..6000),
        )
            .prop_map(|(dirs, name, content)| {
                let mut p = String::new();
                for d in dirs {
                    p.push('/');
                    p.push_str(d);
                }
                (format!("{p}/{name}"), content)
            });
        proptest::collection::vec(file, 1..40)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn random_trees_read_back(files in tree_strategy()) {
            // Drop repeats and files whose path another file needs as a
            // directory (or the other way round).
            let mut kept: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            for (p, c) in files {
                let clash = kept.keys().any(|k| {
                    k == &p || k.starts_with(&format!("{p}/")) || p.starts_with(&format!("{k}/"))
                });
                if !clash {
                    kept.insert(p, c);
                }
            }
            let s = spec(kept.iter().map(|(p, c)| IsoFile::bytes(p, c.clone())).collect());
            let (img, ext) = write_vec(&s);
            let tree = read_tree(&img);
            check_path_tables(&img, &tree);
            prop_assert_eq!(tree.files.len(), kept.len());
            for e in &ext {
                let (lba, len) = tree.files[&e.path];
                prop_assert_eq!(u64::from(lba) * BLOCK, e.byte_offset);
                prop_assert_eq!(u64::from(len), e.len);
                let got = &img[e.byte_offset as usize..(e.byte_offset + e.len) as usize];
                prop_assert_eq!(got, &kept[&e.path][..]);
            }
            // Deterministic.
            prop_assert!(write_vec(&s).0 == img);
        }
    }
}
