//! FAT32 filesystems (the ESP and the armv7 boot partition), built without
//! root, loop devices or mkfs.
//!
//! [`FatBuilder`] is a pure in-memory tree of directories and files. Nothing
//! touches the disk until [`FatBuilder::write`], which lays the whole
//! filesystem out in one pass: reserved sectors (boot sector, FSInfo, their
//! backups at sector 6), two FATs, then directories and files, each in one
//! contiguous cluster run. The same tree, timestamp and size always give the
//! same bytes: directory entries are sorted by name, clusters are allocated in
//! a fixed order and every timestamp is the one given to
//! [`FatBuilder::set_timestamp`] (default: the DOS epoch, 1980-01-01).
//!
//! Names that are not plain upper-case 8.3 get VFAT long-name entries and a
//! generated short name with a `~N` tail, unique within the directory.

// `is_multiple_of` needs Rust 1.87; the workspace promises 1.80.
#![allow(clippy::manual_is_multiple_of)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

const SECTOR: u64 = 512;
const RESERVED_SECTORS: u64 = 32;
const NUM_FATS: u64 = 2;
/// mkfs.fat's FAT32 floor, a little above the 65525 of Microsoft's spec, so
/// no implementation can mistake the volume for FAT16.
const MIN_CLUSTERS: u64 = 65529;
/// The largest cluster count FAT32 can address, with a small margin.
const MAX_CLUSTERS: u64 = 0x0FFF_FFF0;
const MAX_DIR_ENTRIES: u64 = 65536;
const MAX_FILE_SIZE: u64 = u32::MAX as u64;
const MAX_NAME_UNITS: usize = 255;
const EOC: u32 = 0x0FFF_FFFF;

const ATTR_VOLUME_ID: u8 = 0x08;
const ATTR_DIRECTORY: u8 = 0x10;
const ATTR_ARCHIVE: u8 = 0x20;
const ATTR_LFN: u8 = 0x0F;

/// Characters allowed in a short (8.3) name besides A-Z and 0-9.
const SHORT_EXTRA: &[u8] = b"!#$%&'()-@^_`{}~";

/// Where a file's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileContent {
    Bytes(Vec<u8>),
    /// Read from the host at [`FatBuilder::write`] time, streamed, never held
    /// whole in memory. Its size is taken when the file is added and checked
    /// again while writing.
    Host(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum FatError {
    #[error("FAT path {path:?}: {reason}")]
    InvalidPath { path: String, reason: String },
    #[error("FAT path {path:?} already exists")]
    Exists { path: String },
    #[error("FAT path {path:?}: {existing:?} is already there and FAT names are case-insensitive; use one spelling")]
    CaseConflict { path: String, existing: String },
    #[error("FAT path {path:?}: {parent:?} is a file, not a directory")]
    NotADirectory { path: String, parent: String },
    #[error("FAT path {path:?}: {size} bytes is more than FAT32 can hold in one file (4 GiB - 1)")]
    FileTooLarge { path: String, size: u64 },
    #[error("FAT directory {path:?}: {entries} directory entries, FAT allows at most 65536; use fewer or shorter names")]
    DirectoryTooLarge { path: String, entries: u64 },
    #[error("host file {host:?} (for FAT path {path:?}): {source}")]
    HostFile {
        path: String,
        host: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("host file {host:?} (for FAT path {path:?}) changed size while building: {expected} bytes when added, {actual} now")]
    HostFileChanged {
        path: String,
        host: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("FAT volume label {label:?}: {reason}")]
    BadLabel { label: String, reason: String },
    #[error("FAT size {size}: {reason}")]
    BadSize { size: u64, reason: String },
    #[error("FAT32 files do not fit: they need at least {needed} bytes, the filesystem is {size} bytes ({} bytes short); make the partition bigger", needed - size)]
    DoesNotFit { size: u64, needed: u64 },
    #[error("writing the FAT filesystem ({what}): {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> FatError {
    let what = what.into();
    move |source| FatError::Io { what, source }
}

#[derive(Debug)]
struct FileNode {
    content: FileContent,
    size: u64,
}

#[derive(Debug, Default)]
struct DirNode {
    /// Sorted by name: this is the on-disk order.
    children: BTreeMap<String, Node>,
    /// Upper-cased name → name as given, for case-insensitive clashes.
    folded: HashMap<String, String>,
}

#[derive(Debug)]
enum Node {
    Dir(DirNode),
    File(FileNode),
}

/// An in-memory FAT32 filesystem. See the module docs.
#[derive(Debug)]
pub struct FatBuilder {
    label: String,
    volume_id: u32,
    hidden_sectors: u32,
    date: u16,
    time: u16,
    root: DirNode,
}

impl FatBuilder {
    /// `volume_label` goes in the boot sector and the root directory (up to
    /// 11 upper-case characters; checked by `write`). `volume_id` is the
    /// serial number, which the caller derives deterministically.
    pub fn new(volume_label: &str, volume_id: u32) -> Self {
        let (date, time) = dos_datetime(0);
        FatBuilder {
            label: volume_label.to_string(),
            volume_id,
            hidden_sectors: 0,
            date,
            time,
            root: DirNode::default(),
        }
    }

    /// Every timestamp in the filesystem (seconds since the Unix epoch, UTC,
    /// e.g. SOURCE_DATE_EPOCH). Clamped to the DOS range 1980..2107.
    pub fn set_timestamp(&mut self, unix_seconds: u64) {
        let (date, time) = dos_datetime(unix_seconds);
        self.date = date;
        self.time = time;
    }

    /// The partition's first LBA, stored as the BPB's hidden-sector count.
    /// Some firmware and boot ROMs read it; 0 (the default) suits a bare
    /// filesystem image.
    pub fn set_hidden_sectors(&mut self, partition_start_lba: u32) {
        self.hidden_sectors = partition_start_lba;
    }

    /// Adds a directory and any missing parents. Adding an existing directory
    /// again is fine.
    pub fn add_dir(&mut self, path: &str) -> Result<(), FatError> {
        let names = split_path(path)?;
        let mut dir = &mut self.root;
        for (i, name) in names.iter().enumerate() {
            dir = child_dir(dir, name, path, &names[..i])?;
        }
        Ok(())
    }

    /// Adds a file; missing parent directories are created.
    pub fn add_file(&mut self, path: &str, content: FileContent) -> Result<(), FatError> {
        if path.ends_with('/') {
            return Err(FatError::InvalidPath {
                path: path.to_string(),
                reason: "a file path cannot end with '/'".into(),
            });
        }
        let names = split_path(path)?;
        let Some((name, parents)) = names.split_last() else {
            return Err(FatError::InvalidPath {
                path: path.to_string(),
                reason: "a file needs a name; \"/\" is the root directory".into(),
            });
        };
        let size = match &content {
            FileContent::Bytes(b) => b.len() as u64,
            FileContent::Host(host) => {
                let meta = std::fs::metadata(host).map_err(|source| FatError::HostFile {
                    path: path.to_string(),
                    host: host.clone(),
                    source,
                })?;
                if !meta.is_file() {
                    return Err(FatError::HostFile {
                        path: path.to_string(),
                        host: host.clone(),
                        source: io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
                    });
                }
                meta.len()
            }
        };
        if size > MAX_FILE_SIZE {
            return Err(FatError::FileTooLarge {
                path: path.to_string(),
                size,
            });
        }
        let mut dir = &mut self.root;
        for (i, parent) in parents.iter().enumerate() {
            dir = child_dir(dir, parent, path, &names[..i])?;
        }
        check_new_name(dir, name, path)?;
        dir.folded.insert(fold(name), name.clone());
        dir.children
            .insert(name.clone(), Node::File(FileNode { content, size }));
        Ok(())
    }

    /// The smallest filesystem size in bytes (a multiple of 512) that holds
    /// everything added so far. FAT32 needs at least 65529 clusters, so this
    /// is never below about 32.5 MiB.
    pub fn min_size(&self) -> u64 {
        let Ok(plan) = self.plan() else {
            // A directory over the FAT limit fits nowhere; write() names it.
            return u64::MAX;
        };
        let mut best = u64::MAX;
        let mut spc = 1;
        while spc <= 64 {
            if let Some(size) = min_size_for(&plan, spc) {
                best = best.min(size);
            }
            spc *= 2;
        }
        best
    }

    /// Writes a FAT32 filesystem of exactly `size` bytes (a multiple of 512)
    /// at the stream's current position, e.g. a partition's offset inside a
    /// disk image. Free clusters are not written, so a new file stays sparse.
    pub fn write<W: Write + Seek>(&self, size: u64, out: &mut W) -> Result<(), FatError> {
        check_label(&self.label)?;
        let plan = self.plan()?;
        let (geo, alloc) = self.choose_geometry(&plan, size)?;
        let base = out
            .stream_position()
            .map_err(io_err("finding the start position"))?;
        let mut w = Out { out, base };

        // Reserved area: boot sector and FSInfo, backups at sector 6.
        let boot = self.boot_sector(&geo);
        let free = geo.clusters - (u64::from(alloc.next_free) - 2);
        let next_free = if free == 0 {
            0xFFFF_FFFF
        } else {
            alloc.next_free
        };
        let info = fsinfo_sector(free, next_free);
        let mut reserved = vec![0u8; (RESERVED_SECTORS * SECTOR) as usize];
        reserved[..512].copy_from_slice(&boot);
        reserved[512..1024].copy_from_slice(&info);
        reserved[6 * 512..7 * 512].copy_from_slice(&boot);
        reserved[7 * 512..8 * 512].copy_from_slice(&info);
        w.write_at(0, &reserved, "reserved sectors")?;

        for copy in 0..NUM_FATS {
            let start = (RESERVED_SECTORS + copy * geo.fat_sectors) * SECTOR;
            write_fat(&mut w, start, &geo, &alloc)?;
        }

        for (d, dir) in plan.dirs.iter().enumerate() {
            let bytes = self.render_dir(&plan, &geo, &alloc, d);
            w.write_at(geo.cluster_offset(alloc.dirs[d].0), &bytes, &dir.path)?;
        }

        let mut buf = Vec::new();
        for (f, file) in plan.files.iter().enumerate() {
            let (first, count) = alloc.files[f];
            if count == 0 {
                continue;
            }
            let offset = geo.cluster_offset(first);
            write_file(&mut w, offset, file, &mut buf)?;
            let padding = count * geo.cluster_bytes() - file.node.size;
            if padding > 0 {
                buf.clear();
                buf.resize(padding as usize, 0);
                w.write_at(offset + file.node.size, &buf, &file.path)?;
            }
        }

        // Make the stream exactly cover the filesystem without writing the
        // free clusters.
        let end = w
            .out
            .seek(SeekFrom::End(0))
            .map_err(io_err("finding the end"))?;
        if end < base + size {
            w.write_at(size - 1, &[0], "the last sector")?;
        }
        w.out
            .seek(SeekFrom::Start(base + size))
            .map_err(io_err("seeking past the filesystem"))?;
        Ok(())
    }

    fn plan(&self) -> Result<Plan<'_>, FatError> {
        let mut plan = Plan {
            dirs: Vec::new(),
            files: Vec::new(),
        };
        let mut queue: VecDeque<(usize, &DirNode)> = VecDeque::new();
        plan.dirs.push(DirPlan {
            path: "/".into(),
            parent: None,
            entries: Vec::new(),
            slots: 0,
        });
        queue.push_back((0, &self.root));
        while let Some((d, node)) = queue.pop_front() {
            let shorts = short_names(node.children.keys());
            let mut entries = Vec::with_capacity(node.children.len());
            // The root holds the volume label; others hold "." and "..".
            let mut slots: u64 = if d == 0 {
                u64::from(!label_or_none(&self.label).is_empty())
            } else {
                2
            };
            for ((name, child), (short, lfn)) in node.children.iter().zip(shorts) {
                let path = join(&plan.dirs[d].path, name);
                let target = match child {
                    Node::Dir(sub) => {
                        let idx = plan.dirs.len();
                        plan.dirs.push(DirPlan {
                            path,
                            parent: Some(d),
                            entries: Vec::new(),
                            slots: 0,
                        });
                        queue.push_back((idx, sub));
                        Target::Dir(idx)
                    }
                    Node::File(file) => {
                        plan.files.push(FilePlan { path, node: file });
                        Target::File(plan.files.len() - 1)
                    }
                };
                let long = if lfn {
                    name.encode_utf16().collect()
                } else {
                    Vec::new()
                };
                slots += 1 + long.len().div_ceil(13) as u64;
                entries.push(Entry {
                    short,
                    long,
                    target,
                });
            }
            if slots > MAX_DIR_ENTRIES {
                return Err(FatError::DirectoryTooLarge {
                    path: plan.dirs[d].path.clone(),
                    entries: slots,
                });
            }
            plan.dirs[d].entries = entries;
            plan.dirs[d].slots = slots;
        }
        Ok(plan)
    }

    fn choose_geometry(&self, plan: &Plan, size: u64) -> Result<(Geometry, Alloc), FatError> {
        if size % SECTOR != 0 {
            return Err(FatError::BadSize {
                size,
                reason: "not a multiple of 512-byte sectors".into(),
            });
        }
        let total = size / SECTOR;
        if total > u64::from(u32::MAX) {
            return Err(FatError::BadSize {
                size,
                reason: "FAT32 holds at most 2^32-1 sectors (2 TiB)".into(),
            });
        }
        // Microsoft's cluster sizes for FAT32, then smaller ones when the
        // volume is too small for 65529 clusters of that size, then larger
        // ones as a last resort.
        const GIB: u64 = 1 << 30;
        let preferred: u64 = match size {
            s if s <= 8 * GIB => 8,
            s if s <= 16 * GIB => 16,
            s if s <= 32 * GIB => 32,
            _ => 64,
        };
        let mut order = Vec::new();
        let mut spc = preferred;
        while spc >= 1 {
            order.push(spc);
            spc /= 2;
        }
        let mut spc = preferred * 2;
        while spc <= 64 {
            order.push(spc);
            spc *= 2;
        }
        for spc in order {
            let Some(geo) = Geometry::new(total, spc) else {
                continue;
            };
            if plan.clusters_needed(geo.cluster_bytes()) <= geo.clusters {
                return Ok((geo, allocate(plan, geo.cluster_bytes())));
            }
        }
        Err(FatError::DoesNotFit {
            size,
            needed: self.min_size().max(size + 1),
        })
    }

    fn boot_sector(&self, geo: &Geometry) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..3].copy_from_slice(&[0xEB, 0x58, 0x90]);
        b[3..11].copy_from_slice(b"MSWIN4.1");
        put16(&mut b, 11, SECTOR as u16);
        b[13] = geo.sectors_per_cluster as u8;
        put16(&mut b, 14, RESERVED_SECTORS as u16);
        b[16] = NUM_FATS as u8;
        // 17: root entries, 19: 16-bit total sectors, 22: 16-bit FAT size: 0 on FAT32.
        b[21] = 0xF8;
        // mtools refuses a volume whose sector count is not a multiple of the
        // sectors per track, so pick a track size that divides it.
        let spt = [32u64, 63, 16, 8, 4, 2, 1]
            .into_iter()
            .find(|s| geo.total_sectors % s == 0)
            .unwrap_or(1);
        put16(&mut b, 24, spt as u16);
        put16(&mut b, 26, if spt == 63 { 255 } else { 64 });
        put32(&mut b, 28, self.hidden_sectors);
        put32(&mut b, 32, geo.total_sectors as u32);
        put32(&mut b, 36, geo.fat_sectors as u32);
        // 40: flags 0 (FATs mirrored), 42: version 0.0.
        put32(&mut b, 44, 2); // root directory cluster
        put16(&mut b, 48, 1); // FSInfo sector
        put16(&mut b, 50, 6); // backup boot sector
        b[64] = 0x80;
        b[66] = 0x29;
        put32(&mut b, 67, self.volume_id);
        b[71..82].copy_from_slice(&label_bytes(&self.label));
        b[82..90].copy_from_slice(b"FAT32   ");
        // Booted by a BIOS by mistake: int 18h (try the next device), else halt.
        b[90..96].copy_from_slice(&[0xCD, 0x18, 0xFA, 0xF4, 0xEB, 0xFD]);
        b[510] = 0x55;
        b[511] = 0xAA;
        b
    }

    fn render_dir(&self, plan: &Plan, geo: &Geometry, alloc: &Alloc, d: usize) -> Vec<u8> {
        let dir = &plan.dirs[d];
        let (first, count) = alloc.dirs[d];
        let mut bytes = Vec::with_capacity((count * geo.cluster_bytes()) as usize);
        match dir.parent {
            None => {
                let label = label_or_none(&self.label);
                if !label.is_empty() {
                    bytes.extend(self.short_entry(&label_bytes(label), ATTR_VOLUME_ID, 0, 0));
                }
            }
            Some(parent) => {
                let mut dot = [b' '; 11];
                dot[0] = b'.';
                bytes.extend(self.short_entry(&dot, ATTR_DIRECTORY, first, 0));
                dot[1] = b'.';
                // ".." of a directory in the root points to cluster 0.
                let up = if parent == 0 { 0 } else { alloc.dirs[parent].0 };
                bytes.extend(self.short_entry(&dot, ATTR_DIRECTORY, up, 0));
            }
        }
        for entry in &dir.entries {
            if !entry.long.is_empty() {
                lfn_entries(&entry.long, &entry.short, &mut bytes);
            }
            let (attr, cluster, size) = match entry.target {
                Target::Dir(i) => (ATTR_DIRECTORY, alloc.dirs[i].0, 0),
                Target::File(i) => {
                    let (first, count) = alloc.files[i];
                    let first = if count == 0 { 0 } else { first };
                    (ATTR_ARCHIVE, first, plan.files[i].node.size as u32)
                }
            };
            bytes.extend(self.short_entry(&entry.short, attr, cluster, size));
        }
        bytes.resize((count * geo.cluster_bytes()) as usize, 0);
        bytes
    }

    fn short_entry(&self, name: &[u8; 11], attr: u8, cluster: u32, size: u32) -> [u8; 32] {
        let mut e = [0u8; 32];
        e[..11].copy_from_slice(name);
        e[11] = attr;
        put16(&mut e, 14, self.time); // created
        put16(&mut e, 16, self.date);
        put16(&mut e, 18, self.date); // accessed
        put16(&mut e, 20, (cluster >> 16) as u16);
        put16(&mut e, 22, self.time); // written
        put16(&mut e, 24, self.date);
        put16(&mut e, 26, cluster as u16);
        put32(&mut e, 28, size);
        e
    }
}

fn min_size_for(plan: &Plan, spc: u64) -> Option<u64> {
    let n = plan.clusters_needed(spc * SECTOR).max(MIN_CLUSTERS);
    if n > MAX_CLUSTERS {
        return None;
    }
    let fat_sectors = (n + 2).div_ceil(SECTOR / 4);
    let total = RESERVED_SECTORS + NUM_FATS * fat_sectors + n * spc;
    (total <= u64::from(u32::MAX)).then_some(total * SECTOR)
}

fn child_dir<'a>(
    dir: &'a mut DirNode,
    name: &str,
    path: &str,
    parents: &[String],
) -> Result<&'a mut DirNode, FatError> {
    if !dir.children.contains_key(name) {
        check_new_name(dir, name, path)?;
        dir.folded.insert(fold(name), name.to_string());
        dir.children
            .insert(name.to_string(), Node::Dir(DirNode::default()));
    }
    match dir.children.get_mut(name) {
        Some(Node::Dir(d)) => Ok(d),
        _ => Err(FatError::NotADirectory {
            path: path.to_string(),
            parent: format!("/{}", [parents, &[name.to_string()]].concat().join("/")),
        }),
    }
}

fn check_new_name(dir: &DirNode, name: &str, path: &str) -> Result<(), FatError> {
    if dir.children.contains_key(name) {
        return Err(FatError::Exists {
            path: path.to_string(),
        });
    }
    if let Some(existing) = dir.folded.get(&fold(name)) {
        return Err(FatError::CaseConflict {
            path: path.to_string(),
            existing: existing.clone(),
        });
    }
    Ok(())
}

fn fold(name: &str) -> String {
    name.to_uppercase()
}

fn join(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// "/EFI/BOOT" → ["EFI", "BOOT"], each a valid long name.
fn split_path(path: &str) -> Result<Vec<String>, FatError> {
    let bad = |reason: &str| FatError::InvalidPath {
        path: path.to_string(),
        reason: reason.to_string(),
    };
    let rest = path.strip_prefix('/').unwrap_or(path);
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let mut names = Vec::new();
    for name in rest.split('/') {
        if name.is_empty() {
            return Err(bad("empty path component (\"//\")"));
        }
        if name == "." || name == ".." {
            return Err(bad("\".\" and \"..\" are not allowed"));
        }
        if let Some(c) = name
            .chars()
            .find(|c| (*c as u32) < 0x20 || "\"*:<>?\\|".contains(*c))
        {
            return Err(bad(&format!("{c:?} is not allowed in FAT names")));
        }
        if name.ends_with('.') || name.ends_with(' ') {
            return Err(bad("FAT names cannot end with '.' or ' '"));
        }
        if name.encode_utf16().count() > MAX_NAME_UNITS {
            return Err(bad("a FAT name is at most 255 UTF-16 characters"));
        }
        names.push(name.to_string());
    }
    Ok(names)
}

fn label_or_none(label: &str) -> &str {
    let trimmed = label.trim_end_matches(' ');
    if trimmed == "NO NAME" {
        ""
    } else {
        trimmed
    }
}

fn label_bytes(label: &str) -> [u8; 11] {
    let label = label_or_none(label);
    let label = if label.is_empty() { "NO NAME" } else { label };
    let mut out = [b' '; 11];
    for (o, b) in out.iter_mut().zip(label.bytes()) {
        *o = b;
    }
    out
}

fn check_label(label: &str) -> Result<(), FatError> {
    let bad = |reason: &str| FatError::BadLabel {
        label: label.to_string(),
        reason: reason.to_string(),
    };
    if label.len() > 11 {
        return Err(bad("at most 11 characters"));
    }
    if let Some(c) = label.chars().find(|c| {
        !(c.is_ascii_uppercase()
            || c.is_ascii_digit()
            || *c == ' '
            || (c.is_ascii() && SHORT_EXTRA.contains(&(*c as u8))))
    }) {
        return Err(bad(&format!(
            "{c:?} is not allowed; use A-Z, 0-9, space and !#$%&'()-@^_`{{}}~"
        )));
    }
    if label.starts_with(' ') {
        return Err(bad("cannot start with a space"));
    }
    Ok(())
}

fn short_char_ok(b: u8) -> bool {
    b.is_ascii_uppercase() || b.is_ascii_digit() || SHORT_EXTRA.contains(&b)
}

/// The short name for `name` if it needs no tail: the 8.3 form of the
/// upper-cased name, when nothing is lost. The bool says whether `name` is
/// already exactly that (no long-name entries needed).
fn exact_short(name: &str) -> Option<([u8; 11], bool)> {
    let upper = name.to_ascii_uppercase();
    if !upper.is_ascii() || upper.starts_with('.') {
        return None;
    }
    let (base, ext) = match upper.rsplit_once('.') {
        Some((b, e)) => (b, e),
        None => (upper.as_str(), ""),
    };
    if base.is_empty() || base.len() > 8 || ext.len() > 3 {
        return None;
    }
    if !base.bytes().chain(ext.bytes()).all(short_char_ok) {
        return None;
    }
    let mut s = [b' '; 11];
    s[..base.len()].copy_from_slice(base.as_bytes());
    s[8..8 + ext.len()].copy_from_slice(ext.as_bytes());
    Some((s, upper == name))
}

/// The lossy basis (base up to 8 chars, extension up to 3) of the Windows
/// short-name algorithm.
fn short_basis(name: &str) -> (Vec<u8>, Vec<u8>) {
    let clean = |s: &str| -> Vec<u8> {
        s.chars()
            .filter(|c| *c != ' ' && *c != '.')
            .map(|c| {
                let u = c.to_ascii_uppercase();
                if u.is_ascii() && short_char_ok(u as u8) {
                    u as u8
                } else {
                    b'_'
                }
            })
            .collect()
    };
    let trimmed = name.trim_start_matches('.');
    let (base, ext) = match trimmed.rsplit_once('.') {
        Some((b, e)) => (clean(b), clean(e)),
        None => (clean(trimmed), Vec::new()),
    };
    let mut base = base;
    base.truncate(8);
    if base.is_empty() {
        base.push(b'_');
    }
    let mut ext = ext;
    ext.truncate(3);
    (base, ext)
}

/// Short names for one directory's (sorted) names, plus whether each needs
/// long-name entries. Exact 8.3 names are placed first so generated ones
/// never take them.
fn short_names<'a>(names: impl Iterator<Item = &'a String>) -> Vec<([u8; 11], bool)> {
    let names: Vec<&String> = names.collect();
    let mut out: Vec<Option<([u8; 11], bool)>> = vec![None; names.len()];
    let mut used: HashSet<[u8; 11]> = HashSet::new();
    for (i, name) in names.iter().enumerate() {
        if let Some((short, exact)) = exact_short(name) {
            // Distinct case-insensitive names give distinct exact shorts.
            if used.insert(short) {
                out[i] = Some((short, !exact));
            }
        }
    }
    let mut next_tail: HashMap<(Vec<u8>, Vec<u8>), u32> = HashMap::new();
    for (i, name) in names.iter().enumerate() {
        if out[i].is_some() {
            continue;
        }
        let (base, ext) = short_basis(name);
        let n = next_tail.entry((base.clone(), ext.clone())).or_insert(1);
        loop {
            let tail = format!("~{n}");
            *n += 1;
            let keep = base.len().min(8 - tail.len());
            let mut s = [b' '; 11];
            s[..keep].copy_from_slice(&base[..keep]);
            s[keep..keep + tail.len()].copy_from_slice(tail.as_bytes());
            s[8..8 + ext.len()].copy_from_slice(&ext);
            if used.insert(s) {
                out[i] = Some((s, true));
                break;
            }
        }
    }
    out.into_iter()
        .map(|o| o.unwrap_or(([b'_'; 11], true)))
        .collect()
}

fn lfn_checksum(short: &[u8; 11]) -> u8 {
    short
        .iter()
        .fold(0u8, |sum, &b| sum.rotate_right(1).wrapping_add(b))
}

/// Long-name entries for `name`, last part first, as they sit on disk.
fn lfn_entries(name: &[u16], short: &[u8; 11], out: &mut Vec<u8>) {
    let checksum = lfn_checksum(short);
    let parts = name.len().div_ceil(13);
    for part in (0..parts).rev() {
        let mut units = [0xFFFFu16; 13];
        let chunk = &name[part * 13..name.len().min(part * 13 + 13)];
        units[..chunk.len()].copy_from_slice(chunk);
        if chunk.len() < 13 {
            units[chunk.len()] = 0;
        }
        let mut e = [0u8; 32];
        e[0] = (part + 1) as u8 | if part + 1 == parts { 0x40 } else { 0 };
        e[11] = ATTR_LFN;
        e[13] = checksum;
        let offsets = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];
        for (u, off) in units.iter().zip(offsets) {
            put16(&mut e, off, *u);
        }
        out.extend_from_slice(&e);
    }
}

enum Target {
    Dir(usize),
    File(usize),
}

struct Entry {
    short: [u8; 11],
    /// UTF-16 long name; empty when the short name says it all.
    long: Vec<u16>,
    target: Target,
}

struct DirPlan {
    path: String,
    parent: Option<usize>,
    entries: Vec<Entry>,
    /// 32-byte directory entries, including ".", ".." or the volume label.
    slots: u64,
}

struct FilePlan<'a> {
    path: String,
    node: &'a FileNode,
}

/// The tree flattened: directories breadth-first (root first), files in the
/// same walk.
struct Plan<'a> {
    dirs: Vec<DirPlan>,
    files: Vec<FilePlan<'a>>,
}

impl Plan<'_> {
    fn clusters_needed(&self, cluster_bytes: u64) -> u64 {
        let dirs: u64 = self
            .dirs
            .iter()
            .map(|d| (d.slots * 32).div_ceil(cluster_bytes).max(1))
            .sum();
        let files: u64 = self
            .files
            .iter()
            .map(|f| f.node.size.div_ceil(cluster_bytes))
            .sum();
        dirs + files
    }
}

/// (first cluster, cluster count) per directory and file; clusters are
/// handed out in order from cluster 2, directories first.
struct Alloc {
    dirs: Vec<(u32, u64)>,
    files: Vec<(u32, u64)>,
    next_free: u32,
}

fn allocate(plan: &Plan, cluster_bytes: u64) -> Alloc {
    let mut next: u64 = 2;
    let mut take = |count: u64| {
        let first = next;
        next += count;
        (first as u32, count)
    };
    let dirs = plan
        .dirs
        .iter()
        .map(|d| take((d.slots * 32).div_ceil(cluster_bytes).max(1)))
        .collect();
    let files = plan
        .files
        .iter()
        .map(|f| take(f.node.size.div_ceil(cluster_bytes)))
        .collect();
    Alloc {
        dirs,
        files,
        next_free: next as u32,
    }
}

#[derive(Debug, Clone, Copy)]
struct Geometry {
    total_sectors: u64,
    sectors_per_cluster: u64,
    fat_sectors: u64,
    clusters: u64,
}

impl Geometry {
    /// The smallest FAT that maps every cluster left after it, if the result
    /// is a valid FAT32 volume.
    fn new(total_sectors: u64, spc: u64) -> Option<Geometry> {
        let avail = total_sectors.checked_sub(RESERVED_SECTORS)?;
        let per_sector = SECTOR / 4;
        let fits = |fat: u64| -> bool {
            NUM_FATS * fat < avail && fat * per_sector >= (avail - NUM_FATS * fat) / spc + 2
        };
        let mut fat = (avail / spc + 2).div_ceil(per_sector);
        if !fits(fat) {
            return None;
        }
        while fat > 1 && fits(fat - 1) {
            fat -= 1;
        }
        let clusters = (avail - NUM_FATS * fat) / spc;
        (MIN_CLUSTERS..=MAX_CLUSTERS)
            .contains(&clusters)
            .then_some(Geometry {
                total_sectors,
                sectors_per_cluster: spc,
                fat_sectors: fat,
                clusters,
            })
    }

    fn cluster_bytes(&self) -> u64 {
        self.sectors_per_cluster * SECTOR
    }

    fn cluster_offset(&self, cluster: u32) -> u64 {
        let data = RESERVED_SECTORS + NUM_FATS * self.fat_sectors;
        (data + (u64::from(cluster) - 2) * self.sectors_per_cluster) * SECTOR
    }
}

fn fsinfo_sector(free: u64, next_free: u32) -> [u8; 512] {
    let mut s = [0u8; 512];
    put32(&mut s, 0, 0x4161_5252);
    put32(&mut s, 484, 0x6141_7272);
    put32(&mut s, 488, free as u32);
    put32(&mut s, 492, next_free);
    put32(&mut s, 508, 0xAA55_0000);
    s
}

struct Out<'a, W> {
    out: &'a mut W,
    base: u64,
}

impl<W: Write + Seek> Out<'_, W> {
    fn write_at(&mut self, offset: u64, bytes: &[u8], what: &str) -> Result<(), FatError> {
        self.out
            .seek(SeekFrom::Start(self.base + offset))
            .and_then(|_| self.out.write_all(bytes))
            .map_err(io_err(what))
    }
}

/// One FAT copy, generated in chunks: each run of clusters chains to the
/// next and ends in end-of-chain; everything after the last run is free.
fn write_fat<W: Write + Seek>(
    w: &mut Out<W>,
    start: u64,
    geo: &Geometry,
    alloc: &Alloc,
) -> Result<(), FatError> {
    const CHUNK: usize = 64 * 1024;
    let mut runs = alloc
        .dirs
        .iter()
        .chain(alloc.files.iter())
        .filter(|(_, count)| *count > 0)
        .map(|&(first, count)| (u64::from(first), u64::from(first) + count));
    let mut run = runs.next();
    let entries = geo.fat_sectors * SECTOR / 4;
    let mut buf = Vec::with_capacity(CHUNK);
    let mut offset = start;
    for cluster in 0..entries {
        let value = match cluster {
            0 => 0x0FFF_FF00 | 0xF8,
            // All ones: clean unmount, no I/O errors.
            1 => EOC,
            _ => {
                while matches!(run, Some((_, end)) if cluster >= end) {
                    run = runs.next();
                }
                match run {
                    Some((first, end)) if cluster >= first => {
                        if cluster + 1 == end {
                            EOC
                        } else {
                            cluster as u32 + 1
                        }
                    }
                    _ => 0,
                }
            }
        };
        buf.extend_from_slice(&value.to_le_bytes());
        if buf.len() == CHUNK {
            w.write_at(offset, &buf, "the FAT")?;
            offset += CHUNK as u64;
            buf.clear();
        }
    }
    if !buf.is_empty() {
        w.write_at(offset, &buf, "the FAT")?;
    }
    Ok(())
}

fn write_file<W: Write + Seek>(
    w: &mut Out<W>,
    offset: u64,
    file: &FilePlan,
    buf: &mut Vec<u8>,
) -> Result<(), FatError> {
    match &file.node.content {
        FileContent::Bytes(bytes) => w.write_at(offset, bytes, &file.path),
        FileContent::Host(host) => {
            let host_err = |source| FatError::HostFile {
                path: file.path.clone(),
                host: host.clone(),
                source,
            };
            let mut f = File::open(host).map_err(host_err)?;
            w.out
                .seek(SeekFrom::Start(w.base + offset))
                .map_err(io_err(file.path.as_str()))?;
            buf.resize(1 << 20, 0);
            let expected = file.node.size;
            let mut copied: u64 = 0;
            loop {
                let n = match f.read(buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(host_err(e)),
                };
                if n == 0 {
                    break;
                }
                if copied + n as u64 > expected {
                    let actual = f.metadata().map(|m| m.len()).unwrap_or(copied + n as u64);
                    return Err(FatError::HostFileChanged {
                        path: file.path.clone(),
                        host: host.clone(),
                        expected,
                        actual,
                    });
                }
                w.out
                    .write_all(&buf[..n])
                    .map_err(io_err(file.path.as_str()))?;
                copied += n as u64;
            }
            if copied != expected {
                return Err(FatError::HostFileChanged {
                    path: file.path.clone(),
                    host: host.clone(),
                    expected,
                    actual: copied,
                });
            }
            Ok(())
        }
    }
}

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// (date, time) in DOS format for a Unix time, clamped to 1980..=2107.
fn dos_datetime(unix_seconds: u64) -> (u16, u16) {
    const MIN: u64 = 315_532_800; // 1980-01-01T00:00:00Z
    const MAX: u64 = 4_354_819_199; // 2107-12-31T23:59:59Z
    let t = unix_seconds.clamp(MIN, MAX);
    let secs = t % 86_400;
    let (year, month, day) = kiln_contract::date::civil_from_days((t / 86_400) as i64);
    let date = (((year - 1980) as u16) << 9) | ((month as u16) << 5) | day as u16;
    let time =
        (((secs / 3600) as u16) << 11) | (((secs / 60 % 60) as u16) << 5) | (secs % 60 / 2) as u16;
    (date, time)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_testkit::checker;
    use std::path::Path;
    use std::process::Command;

    fn write_image(fs: &FatBuilder, size: u64, path: &Path) {
        let mut f = File::create(path).unwrap();
        fs.write(size, &mut f).unwrap();
        assert_eq!(f.metadata().unwrap().len(), size);
    }

    /// fsck.vfat must exit 0 and say nothing beyond its usual report.
    fn fsck_clean(img: &Path) -> bool {
        let Some(fsck) = checker("fsck.vfat", "dosfstools") else {
            return false;
        };
        let out = Command::new(fsck)
            .args(["-n", "-v"])
            .arg(img)
            .output()
            .unwrap();
        let text = kiln_testkit::output_text(&out);
        assert!(out.status.success(), "fsck.vfat failed:\n{text}");
        // Anything but fsck's usual report is a complaint.
        let report = [
            "fsck.fat ",
            "Checking ",
            "Boot sector contents:",
            "System ID ",
            "Media byte ",
            "First FAT starts ",
            "Root directory start",
            "Data area starts ",
        ];
        let summary = format!("{}: ", img.display());
        for line in text.lines() {
            let ok = report.iter().any(|p| line.starts_with(p))
                || line.trim_start().starts_with(|c: char| c.is_ascii_digit())
                || (line.starts_with(&summary) && line.contains(" files, "));
            assert!(ok, "fsck.vfat complained: {line:?}\n{text}");
        }
        true
    }

    fn mcopy(mcopy: &Path, img: &Path, path: &str) -> Vec<u8> {
        let out = Command::new(mcopy)
            .env("LC_ALL", "C.UTF-8") // mtools matches non-ASCII names only in a UTF-8 locale
            .arg("-n")
            .arg("-i")
            .arg(img)
            .arg(format!("::{path}"))
            .arg("-")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mcopy {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    fn check_with_mtools(img: &Path, files: &[(String, Vec<u8>)]) {
        let Some(mcopy_bin) = checker("mcopy", "mtools") else {
            return;
        };
        for (path, content) in files {
            let got = mcopy(&mcopy_bin, img, path);
            assert!(
                got == *content,
                "{path}: mcopy read back {} bytes, expected {}",
                got.len(),
                content.len()
            );
        }
    }

    fn esp_files() -> Vec<(String, Vec<u8>)> {
        let mut files = vec![
            ("/EFI/BOOT/BOOTX64.EFI".to_string(), kiln_testkit::noise(1, 300 * 1024)),
            (
                "/EFI/Linux/kiln-0.1.0+3-0.efi".to_string(),
                kiln_testkit::noise(2, 2 << 20),
            ),
            (
                "/loader/loader.conf".to_string(),
                b"timeout 3\ndefault kiln-*\n".to_vec(),
            ),
            ("/node.toml".to_string(), b"role = \"worker\"\n".to_vec()),
            ("/empty".to_string(), Vec::new()),
            ("/résumé über 日本.txt".to_string(), b"unicode\n".to_vec()),
        ];
        for i in 0..300 {
            files.push((
                format!("/many/a rather long file name, number {i:04}.conf"),
                kiln_testkit::noise(100 + i, (i as usize * 37) % 2000),
            ));
        }
        files
    }

    fn builder_with(files: &[(String, Vec<u8>)]) -> FatBuilder {
        let mut fs = FatBuilder::new("ESP", 0x1234_5678);
        fs.add_dir("/EFI/empty-dir").unwrap();
        for (path, content) in files {
            fs.add_file(path, FileContent::Bytes(content.clone()))
                .unwrap();
        }
        fs
    }

    #[test]
    fn esp_image_checks_clean_at_several_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let files = esp_files();
        let fs = builder_with(&files);
        for mib in [34u64, 64, 512] {
            let img = dir.path().join(format!("esp-{mib}.img"));
            write_image(&fs, mib << 20, &img);
            if !fsck_clean(&img) {
                return;
            }
            check_with_mtools(&img, &files);
        }
        if let Some(mdir) = checker("mdir", "mtools") {
            let out = Command::new(mdir)
                .env("LC_ALL", "C.UTF-8")
                .args(["-i"])
                .arg(dir.path().join("esp-34.img"))
                .arg("::/EFI/Linux")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{text}");
            assert!(text.contains("kiln-0.1.0+3-0.efi"), "{text}");
            assert!(text.contains("KILN-0~1 EFI"), "{text}");
        }
    }

    #[test]
    fn geometry_follows_size() {
        let fs = builder_with(&esp_files());
        let plan = fs.plan().unwrap();
        let (g34, _) = fs.choose_geometry(&plan, 34 << 20).unwrap();
        assert_eq!(g34.sectors_per_cluster, 1);
        let (g512, _) = fs.choose_geometry(&plan, 512 << 20).unwrap();
        assert_eq!(g512.sectors_per_cluster, 8);
        for g in [g34, g512] {
            assert!(g.clusters >= MIN_CLUSTERS);
            assert!(g.fat_sectors * 128 >= g.clusters + 2);
            assert_eq!(
                g.clusters,
                (g.total_sectors - RESERVED_SECTORS - 2 * g.fat_sectors) / g.sectors_per_cluster
            );
        }
    }

    #[test]
    fn boot_sector_fields() {
        let mut fs = FatBuilder::new("KILNCFG", 0xCAFE_F00D);
        fs.set_hidden_sectors(2048);
        fs.add_file("/node.toml", FileContent::Bytes(vec![b'x'; 700]))
            .unwrap();
        let mut c = io::Cursor::new(Vec::new());
        fs.write(64 << 20, &mut c).unwrap();
        let img = c.into_inner();
        let u16_at = |o: usize| u16::from_le_bytes([img[o], img[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([img[o], img[o + 1], img[o + 2], img[o + 3]]);
        assert_eq!(u16_at(11), 512);
        assert_eq!(img[13], 1, "512-byte clusters at 64 MiB");
        assert_eq!(u16_at(14), 32);
        assert_eq!(img[16], 2);
        assert_eq!(img[21], 0xF8);
        assert_eq!(u32_at(28), 2048, "hidden sectors");
        assert_eq!(u32_at(32), (64 << 20) / 512);
        assert_eq!(u32_at(67), 0xCAFE_F00D);
        assert_eq!(&img[71..82], b"KILNCFG    ");
        assert_eq!(&img[82..90], b"FAT32   ");
        assert_eq!(&img[510..512], &[0x55, 0xAA]);
        assert_eq!(
            img[..1024],
            img[6 * 512..7 * 512 + 512],
            "backup boot + FSInfo"
        );
        // FSInfo: free count and next free after root (1) + node.toml (2).
        let clusters = u64::from(u32_at(32) - 32 - 2 * u32_at(36));
        assert_eq!(u64::from(u32_at(512 + 488)), clusters - 3);
        assert_eq!(u32_at(512 + 492), 5);
        // FAT: media, clean flags, root chain end, node.toml 3 → 4 → end.
        let fat = 32 * 512;
        assert_eq!(u32_at(fat), 0x0FFF_FFF8);
        assert_eq!(u32_at(fat + 4), 0x0FFF_FFFF);
        assert_eq!(u32_at(fat + 8), 0x0FFF_FFFF);
        assert_eq!(u32_at(fat + 12), 4);
        assert_eq!(u32_at(fat + 16), 0x0FFF_FFFF);
        assert_eq!(u32_at(fat + 20), 0);
    }

    #[test]
    fn output_is_deterministic() {
        let files = esp_files();
        let write = || {
            let mut c = io::Cursor::new(Vec::new());
            builder_with(&files).write(34 << 20, &mut c).unwrap();
            c.into_inner()
        };
        let a = write();
        assert_eq!(a.len(), 34 << 20);
        assert!(a == write(), "two writes differ");
    }

    #[test]
    fn writes_at_the_stream_position() {
        let mut fs = FatBuilder::new("ESP", 7);
        fs.add_file("/node.toml", FileContent::Bytes(b"x".to_vec()))
            .unwrap();
        let size = fs.min_size();
        let mut alone = io::Cursor::new(Vec::new());
        fs.write(size, &mut alone).unwrap();
        let mut inside = io::Cursor::new(vec![0xAAu8; 4096]);
        inside.set_position(1024);
        fs.write(size, &mut inside).unwrap();
        let inside = inside.into_inner();
        assert_eq!(inside.len() as u64, 1024 + size);
        assert!(inside[..1024].iter().all(|b| *b == 0xAA));
        assert!(inside[1024..] == alone.into_inner()[..]);
    }

    #[test]
    fn host_files_are_streamed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("uki.efi");
        let content = kiln_testkit::noise(9, 5 << 20 | 123);
        std::fs::write(&host, &content).unwrap();
        let mut fs = FatBuilder::new("ESP", 1);
        fs.add_file("/EFI/Linux/kiln.efi", FileContent::Host(host.clone()))
            .unwrap();
        let img = dir.path().join("esp.img");
        write_image(&fs, 40 << 20, &img);
        if fsck_clean(&img) {
            check_with_mtools(&img, &[("/EFI/Linux/kiln.efi".into(), content.clone())]);
        }
        // A host file that changes size between add and write is an error.
        std::fs::write(&host, b"short").unwrap();
        let err = fs
            .write(40 << 20, &mut io::Cursor::new(Vec::new()))
            .unwrap_err();
        assert!(
            matches!(err, FatError::HostFileChanged { expected, actual: 5, .. } if expected == content.len() as u64),
            "{err}"
        );
        let err = fs
            .add_file("/missing", FileContent::Host(dir.path().join("nope")))
            .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn min_size_is_enough_and_tight() {
        let mut fs = FatBuilder::new("ESP", 1);
        let empty = fs.min_size();
        assert!(empty > 32 << 20 && empty < 34 << 20, "{empty}");
        fs.add_file("/big", FileContent::Bytes(kiln_testkit::noise(3, 40 << 20)))
            .unwrap();
        fs.add_file("/small", FileContent::Bytes(vec![1; 10]))
            .unwrap();
        let min = fs.min_size();
        let mut c = io::Cursor::new(Vec::new());
        fs.write(min, &mut c).unwrap();
        let err = fs.write(min - 512, &mut c).unwrap_err();
        match err {
            FatError::DoesNotFit { needed, size } => {
                assert_eq!(needed, min);
                assert_eq!(size, min - 512);
            }
            e => panic!("{e}"),
        }
        let msg = fs.write(34 << 20, &mut c).unwrap_err().to_string();
        assert!(msg.contains("bytes short"), "{msg}");
    }

    #[test]
    fn path_errors_name_the_path() {
        let mut fs = FatBuilder::new("ESP", 1);
        fs.add_file("/a/file", FileContent::Bytes(vec![])).unwrap();
        fs.add_dir("/a").unwrap();
        let cases: Vec<(Result<(), FatError>, &str)> = vec![
            (
                fs.add_file("/a/file", FileContent::Bytes(vec![])),
                "already exists",
            ),
            (
                fs.add_file("/A/x", FileContent::Bytes(vec![])),
                "case-insensitive",
            ),
            (
                fs.add_file("/a/file/x", FileContent::Bytes(vec![])),
                "is a file",
            ),
            (fs.add_dir("/a/file"), "is a file"),
            (
                fs.add_file("/bad:name", FileContent::Bytes(vec![])),
                "not allowed",
            ),
            (
                fs.add_file("/trailing.", FileContent::Bytes(vec![])),
                "end with",
            ),
            (fs.add_file("//x", FileContent::Bytes(vec![])), "empty path"),
            (fs.add_file("/", FileContent::Bytes(vec![])), "end with '/'"),
            (fs.add_file("", FileContent::Bytes(vec![])), "needs a name"),
            (
                fs.add_file(&format!("/{}", "x".repeat(256)), FileContent::Bytes(vec![])),
                "255",
            ),
        ];
        for (res, want) in cases {
            let msg = res.unwrap_err().to_string();
            assert!(msg.contains(want) && msg.contains("FAT path"), "{msg}");
        }
        let bad = FatBuilder::new("esp", 1);
        let msg = bad
            .write(34 << 20, &mut io::Cursor::new(Vec::new()))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("\"esp\""), "{msg}");
        let msg = fs
            .write(34 << 20 | 1, &mut io::Cursor::new(Vec::new()))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("512"), "{msg}");
    }

    #[test]
    fn short_names_follow_vfat_rules() {
        let names: Vec<String> = [
            "BOOTX64.EFI",
            "kiln-0.1.0+3-0.efi",
            "kiln-0.1.0+4-0.efi",
            "loader.conf",
            "node.toml",
            "loader",
            "KILN-0~1.EFI",
            ".hidden",
            "a b.c d",
            "résumé.txt",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut sorted = names.clone();
        sorted.sort();
        let shorts = short_names(sorted.iter());
        let get = |n: &str| {
            let i = sorted.iter().position(|s| s == n).unwrap();
            (
                String::from_utf8(shorts[i].0.to_vec()).unwrap(),
                shorts[i].1,
            )
        };
        assert_eq!(get("BOOTX64.EFI"), ("BOOTX64 EFI".into(), false));
        // The exact name KILN-0~1.EFI keeps ~1; the generated ones move on.
        assert_eq!(get("KILN-0~1.EFI"), ("KILN-0~1EFI".into(), false));
        assert_eq!(get("kiln-0.1.0+3-0.efi"), ("KILN-0~2EFI".into(), true));
        assert_eq!(get("kiln-0.1.0+4-0.efi"), ("KILN-0~3EFI".into(), true));
        assert_eq!(get("loader.conf"), ("LOADER~1CON".into(), true));
        assert_eq!(get("loader"), ("LOADER     ".into(), true));
        assert_eq!(get("node.toml"), ("NODE~1  TOM".into(), true));
        assert_eq!(get(".hidden"), ("HIDDEN~1   ".into(), true));
        assert_eq!(get("a b.c d"), ("AB~1    CD ".into(), true));
        assert_eq!(get("résumé.txt"), ("R_SUM_~1TXT".into(), true));
        // Tails grow into the base and stay unique.
        let many: Vec<String> = (0..1200)
            .map(|i| format!("long file name {i:05}.txt"))
            .collect();
        let shorts = short_names(many.iter());
        let set: HashSet<_> = shorts.iter().map(|s| s.0).collect();
        assert_eq!(set.len(), many.len());
        assert_eq!(&shorts[1000].0, b"LON~1001TXT");
    }

    #[test]
    fn lfn_checksum_matches_reference() {
        // Worked example: the checksum of "BOOTX64 EFI" by the spec's loop.
        let mut sum: u8 = 0;
        for b in *b"BOOTX64 EFI" {
            sum = (if sum & 1 != 0 { 0x80u8 } else { 0 })
                .wrapping_add(sum >> 1)
                .wrapping_add(b);
        }
        assert_eq!(lfn_checksum(b"BOOTX64 EFI"), sum);
    }

    #[test]
    fn dos_dates() {
        assert_eq!(dos_datetime(0), (0x21, 0));
        // 2024-02-29T13:45:58Z
        let (d, t) = dos_datetime(1_709_214_358);
        assert_eq!((d >> 9, (d >> 5) & 15, d & 31), (44, 2, 29));
        assert_eq!((t >> 11, (t >> 5) & 63, (t & 31) * 2), (13, 45, 58));
        assert_eq!(dos_datetime(u64::MAX).0 >> 9, 127);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn name() -> impl Strategy<Value = String> {
            "[A-Za-z0-9é][A-Za-z0-9 _+,;=.~éÜ日-]{0,40}"
                .prop_filter("FAT strips trailing dots and spaces", |s| {
                    !s.ends_with('.') && !s.ends_with(' ')
                })
        }

        fn tree() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
            let entry = (
                prop::option::of(name()),
                name(),
                prop::collection::vec(any::<u8>(), 0..3000),
            );
            prop::collection::vec(entry, 1..40).prop_map(|entries| {
                // Case-folded path → "file", or a directory's spelling: keep
                // one spelling per folded path and never a name that is both
                // a file and a directory.
                let mut kinds: HashMap<String, String> = HashMap::new();
                let mut files = Vec::new();
                for (dir, file, content) in entries {
                    let dir = dir.map(|d| format!("/{d}"));
                    let path = format!("{}/{file}", dir.as_deref().unwrap_or(""));
                    let key = path.to_uppercase();
                    if kinds.contains_key(&key) {
                        continue;
                    }
                    if let Some(d) = &dir {
                        match kinds.get(&d.to_uppercase()) {
                            Some(k) if k != d => continue,
                            _ => {}
                        }
                        kinds.insert(d.to_uppercase(), d.clone());
                    }
                    kinds.insert(key, "file".into());
                    files.push((path, content));
                }
                files
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]
            #[test]
            fn random_trees_check_clean(files in tree()) {
                let mut fs = FatBuilder::new("KILN TEST", 42);
                for (path, content) in &files {
                    fs.add_file(path, FileContent::Bytes(content.clone())).unwrap();
                }
                let dir = tempfile::tempdir().unwrap();
                let img = dir.path().join("p.img");
                write_image(&fs, fs.min_size(), &img);
                if fsck_clean(&img) {
                    check_with_mtools(&img, &files);
                }
            }
        }
    }
}
