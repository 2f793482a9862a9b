//! Applying a verified update bundle to the inactive A/B slot of a GPT disk,
//! or of an MBR card booted by u-boot (see "u-boot boards" below).
//!
//! [`apply`] takes an opened [`BundleReader`] (signature and policy already
//! checked), the disk the node booted from, the mounted ESP and the running
//! root hash, and:
//!
//! 1. finds the inactive slot: the one of `root-a`/`root-b` whose PARTUUID is
//!    not the running root hash's first half;
//! 2. checks, before writing anything, that the root and verity parts fit
//!    `root-<x>` and `root-<x>-verity`, and that the ESP has room for the UKI;
//! 3. removes slot x's old boot entries (see below), then streams the root
//!    part into `root-<x>`, the verity part into `root-<x>-verity` and the UKI
//!    into a temporary file on the ESP (`EFI/Linux/.kiln-<profile>-<x>.efi.tmp`,
//!    which systemd-boot ignores), never holding a part in memory;
//! 4. once the bundle has been read to its end (every part's size and sha256
//!    matched the signed manifest), drops the slot's pages from the cache and
//!    reads it back: recomputes the dm-verity root hash of what is now on
//!    `root-<x>`, with the salt and size in the superblock now on
//!    `root-<x>-verity`, compares it with the manifest's `roothash`, and
//!    compares every hash block on `root-<x>-verity` with the recomputed
//!    tree (the kernel reads those blocks, so they must be right too);
//! 5. only then gives the slot its new identity: the PARTUUIDs of `root-<x>`
//!    and `root-<x>-verity` become the halves of the new root hash (as the
//!    builder derives them), in the backup GPT first, synced, then the primary,
//!    synced;
//! 6. last, renames the UKI into place as `EFI/Linux/kiln-<profile>-<x>+3.efi`
//!    (BLS type #2 boot counting: three tries) and syncs the directory.
//!
//! The running slot's partitions, their GPT entries and its boot entry are
//! never written.
//!
//! # Power loss
//!
//! At every instant the running slot's entry still boots the running root:
//! nothing of it is touched. For slot x:
//!
//! - Its old boot entry (an older image, or a failed update) is removed
//!   before the first byte of its root is overwritten: from then on that
//!   entry would point at a root that no longer verifies, so it is no longer
//!   a fallback worth keeping, and booting it would only cost a failed boot.
//! - While the root and verity are written and checked, slot x still has its
//!   old PARTUUIDs, which no boot entry names any more; a half-written slot is
//!   therefore never found by stage 1.
//! - After the GPT switch but before the rename, slot x has the new identity
//!   and no boot entry: still not bootable. A cut between the backup and the
//!   primary GPT write leaves a valid primary (old identity); the next apply
//!   rewrites both.
//! - The rename is atomic on the ESP's FAT as far as FAT goes (the new name
//!   is one directory entry); the UKI's data was synced before it. Only after
//!   it does a boot entry name the new root, and by then the root, its hash
//!   tree and the PARTUUIDs that find them are all on disk.
//!
//! A leftover `.tmp` from a cut apply is removed by the next one.
//!
//! If the read-back fails, [`apply`] returns an error with the GPT and the
//! boot entries as they were (except slot x's old entry, see above).
//!
//! # u-boot boards (MBR cards)
//!
//! An armv7 card has no GPT and no UKIs: partition 2 is slot a, 3 is slot b,
//! each holding its squashfs and, `hash_offset` bytes in (`kiln.mbr=`), its
//! verity tree; the boot FAT holds each slot's kernel, initramfs, dtbs and
//! extlinux.conf in `kiln/<x>/`, and `kiln/state` says which slot is good
//! and which is on trial ([`super::uboot`]; `/boot.scr` reads it). With
//! [`Target::mbr`] set, [`apply`]:
//!
//! 1. checks the MBR's disk signature against `kiln.mbr=`, that the parts
//!    fit slot x's partition and the files fit the boot FAT;
//! 2. writes `kiln/state` with the running slot good and nothing on trial
//!    (a trial of x left from an earlier apply ends here), then removes
//!    `kiln/<x>/`;
//! 3. streams the root to the start of slot x's partition, the verity tree
//!    to `hash_offset` in it, the kernel, initramfs and dtbs to `kiln/<x>/`
//!    (each synced);
//! 4. reads the slot back against the root hash, as on GPT;
//! 5. writes `kiln/<x>/extlinux.conf` with the manifest's cmdline plus
//!    `kiln.slot=<x> kiln.mbr=<signature>,<x's partition>,<hash_offset>`;
//! 6. last, puts x on trial in `kiln/state` (one in-place sector write).
//!
//! Until step 6, no state names slot x, so a cut anywhere before it boots
//! the running slot; after it, boot.scr counts x's tries and falls back to
//! the running slot when they are spent (or when x's files do not load).
//!
//! # Not covered yet
//!
//! - u-boot boards with a GPT card ([`ApplyError::Unsupported`]: no kiln
//!   board has one yet).
//! - Making the new entry the default or a one-shot (systemd-boot picks the
//!   newest version it finds), marking a boot good, and rollback.
//! - The kernel's view of the partition table is not re-read after the
//!   PARTUUID change (the disk is busy); the next boot reads it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_contract::verity::{hash_blocks, parse_superblock, TreeBuilder, BLOCK as VERITY_BLOCK};

use kiln_contract::update::bundle::{hex, BundleError, BundleReader, Manifest, Part, PartKind};
use super::uboot::{self, State};
use crate::node::gpt::{self, Gpt, Guid, Header, Partition};
use crate::cmdline::MbrRoot;
use crate::node::gpt::mbr_signature;

pub use kiln_contract::layout::{entry_name, Slot, ENTRY_DIR, TRIES};
use kiln_contract::digest::unhex32;
const CHUNK: usize = 1 << 20;

/// Where to apply an update.
#[derive(Clone)]
pub struct Target<'a> {
    /// The whole disk the node booted from (a block device, or an image file
    /// in tests).
    pub disk: &'a Path,
    /// The mounted ESP (`/boot` on a node).
    pub esp: &'a Path,
    /// The running root hash (`roothash=` on the cmdline).
    pub running_roothash: [u8; 32],
    /// Boots the new entry gets before systemd-boot falls back (`+N`).
    pub tries: u32,
    /// An MBR card booted by u-boot: `kiln.mbr=` of the running root (the
    /// disk signature, the running slot's partition, the verity offset).
    /// The update then goes to the other slot's partition, its files to
    /// `<esp>/kiln/<x>/` and its trial to `<esp>/kiln/state`; see
    /// [`apply`]'s module docs, "u-boot boards".
    pub mbr: Option<MbrRoot>,
    /// Told each step as it begins (for the console).
    pub progress: Option<&'a (dyn Fn(Step) + Sync)>,
}

impl Target<'_> {
    /// Tells `progress` that step `s` begins.
    fn step(&self, s: Step) {
        if let Some(p) = self.progress {
            p(s)
        }
    }
}

impl std::fmt::Debug for Target<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("disk", &self.disk).field("esp", &self.esp).field("running_roothash", &hex(&self.running_roothash)).field("tries", &self.tries).finish_non_exhaustive()
    }
}

/// The steps of [`apply`], in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Streaming the parts onto the inactive slot.
    Writing(Slot),
    /// Reading the slot back against the root hash.
    Verifying(Slot),
    /// Writing the slot's new PARTUUIDs (backup GPT, then primary).
    Switching(Slot),
    /// Renaming the UKI into place as the slot's boot entry (u-boot
    /// boards: writing the slot's extlinux.conf).
    Installing(Slot),
    /// u-boot boards: putting the slot on trial in `/kiln/state`.
    Trial(Slot),
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Writing(x) => write!(f, "writing slot {x}"),
            Step::Verifying(x) => write!(f, "reading slot {x} back"),
            Step::Switching(x) => write!(f, "switching slot {x}'s partition UUIDs"),
            Step::Installing(x) => write!(f, "installing slot {x}'s boot entry"),
            Step::Trial(x) => write!(f, "switching the boot to slot {x} on trial"),
        }
    }
}

/// What [`apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The slot written.
    pub slot: Slot,
    pub version: String,
    pub roothash: String,
    pub root_bytes: u64,
    pub verity_bytes: u64,
    pub uki_bytes: u64,
    /// The boot entry's file name in `EFI/Linux`, `kiln-<profile>-<x>+3.efi`.
    pub entry: String,
    /// How long reading the slot back against the root hash took.
    pub readback: Duration,
}

impl Applied {
    pub fn bytes_written(&self) -> u64 {
        self.root_bytes + self.verity_bytes + self.uki_bytes
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    Bundle(#[from] BundleError),
    #[error("applying this update is not supported yet: {what}")]
    Unsupported { what: String },
    #[error("the update's root hash {roothash} is the running root's: this node already runs that image, nothing to apply")]
    AlreadyRunning { roothash: String },
    #[error("{op} {path}: {source}")]
    Io { op: String, path: PathBuf, source: io::Error },
    #[error("the partition table of {disk} cannot be used for an update: {reason}")]
    Gpt { disk: PathBuf, reason: String },
    #[error("{disk} has no partition named `{name}`: it is not a kiln disk with A/B slots (root-a, root-a-verity, root-b, root-b-verity), or its table was changed; give the disk the node booted from")]
    MissingPartition { disk: PathBuf, name: String },
    #[error("neither root-a (PARTUUID {a}) nor root-b (PARTUUID {b}) on {disk} holds the running root (PARTUUID {running}, the first half of the running root hash); give the disk the node booted from")]
    NotRunningDisk { disk: PathBuf, a: Guid, b: Guid, running: Guid },
    #[error("part `{part}` is {size} bytes, but partition {partition} on {disk} holds only {capacity}; nothing was written. The new image outgrew the slot: make the root smaller, or reinstall the node with a larger `disk.root_slot_mib`")]
    TooLarge { part: String, size: u64, partition: String, disk: PathBuf, capacity: u64 },
    #[error("the ESP at {esp} has {free} bytes free, but the new boot entry needs {need}; nothing was written. Remove files you do not need from the ESP (not EFI/Linux/kiln-*)")]
    EspFull { esp: PathBuf, free: u64, need: u64 },
    #[error("the verity part now on {partition} is not a dm-verity hash tree as kiln writes it: {reason}; slot not switched, boot entries left as they were. The bundle was not built by kiln, or is from an incompatible version")]
    BadVerity { partition: String, reason: String },
    #[error("reading back slot {slot}: the root now on {partition} has dm-verity root hash {found}, but the update's manifest says {expected}; slot not switched, boot entries left as they were. Either the bundle's root and verity parts do not belong together (a bad build), or the disk did not keep what was written (check it)")]
    RootHashMismatch { slot: Slot, partition: String, expected: String, found: String },
    #[error("reading back slot {slot}: hash block {block} on {partition} differs from the tree of the root now on {root}; slot not switched, boot entries left as they were. Either the bundle's verity part is not the tree of its root (a bad build), or the disk did not keep what was written (check it)")]
    TreeMismatch { slot: Slot, partition: String, root: String, block: u64 },
}

fn io_err(op: impl Into<String>, path: &Path) -> impl FnOnce(io::Error) -> ApplyError + '_ {
    let op = op.into();
    move |source| ApplyError::Io { op, path: path.to_path_buf(), source }
}

/// A partition's place on the disk, for messages and I/O.
#[derive(Debug, Clone)]
struct Region {
    /// `root-b (partition 4 of /dev/vda)`.
    label: String,
    offset: u64,
    len: u64,
}

impl Region {
    fn of(p: &Partition, lba: u64, disk: &Path) -> Region {
        // Disk::read checked first <= last < the disk's blocks.
        Region { label: format!("{} (partition {} of {})", p.name, p.number, disk.display()), offset: p.first_lba * lba, len: (p.last_lba + 1 - p.first_lba) * lba }
    }
}

/// The disk's GPT, primary and backup, and the slots.
struct Disk {
    lba: u64,
    gpt: Gpt,
    backup: Header,
    running: Slot,
    parts: [Partition; 4], // root-a, root-a-verity, root-b, root-b-verity
}

impl Disk {
    fn read(f: &File, path: &Path, running_hash: &[u8; 32]) -> Result<Disk, ApplyError> {
        let lba = sector_size(f);
        let bytes = (&*f).seek(SeekFrom::End(0)).map_err(io_err("finding the size of", path))?;
        let bad = |reason: String| ApplyError::Gpt { disk: path.to_path_buf(), reason };
        let gpt = Gpt::read(f, lba, bytes).map_err(|e| match e {
            gpt::GptError::Io(source) => ApplyError::Io { op: "reading the GPT of".into(), path: path.to_path_buf(), source },
            e => bad(e.to_string()),
        })?;
        if gpt.from_backup {
            return Err(bad("the primary GPT is damaged (only the backup is readable); repair it (`sgdisk -v`, then `sgdisk -e` or a reinstall) before updating".into()));
        }
        let h = &gpt.header;
        if h.my_lba != 1 || h.alternate_lba <= h.last_usable || h.alternate_lba >= bytes / lba {
            return Err(bad(format!("the primary header's LBAs ({} and backup {}) do not fit a disk of {} blocks", h.my_lba, h.alternate_lba, bytes / lba)));
        }
        let mut sector = vec![0u8; lba as usize];
        f.read_exact_at(&mut sector, h.alternate_lba * lba).map_err(io_err("reading the backup GPT of", path))?;
        let backup = Gpt::parse(lba, &sector, &read_entries(f, path, &sector, lba)?).map_err(|e| bad(format!("the backup GPT: {e}; repair it (`sgdisk -v`, `sgdisk -e`) before updating")))?;
        if backup.entries != gpt.entries || backup.header.my_lba != h.alternate_lba {
            return Err(bad("the backup GPT does not match the primary; repair it (`sgdisk -v`) before updating".into()));
        }
        let find = |name: &str| gpt.by_name(name).ok_or_else(|| ApplyError::MissingPartition { disk: path.to_path_buf(), name: name.into() });
        let parts = [find("root-a")?, find("root-a-verity")?, find("root-b")?, find("root-b-verity")?];
        // Writing slot x must never reach past the disk or into the other slot.
        let lbas = bytes / lba;
        for (i, p) in parts.iter().enumerate() {
            if p.first_lba > p.last_lba || p.last_lba >= lbas {
                return Err(bad(format!("partition {} ({}) spans blocks {} to {}, outside a disk of {lbas} blocks", p.number, p.name, p.first_lba, p.last_lba)));
            }
            if let Some(q) = parts[..i].iter().find(|q| q.first_lba <= p.last_lba && p.first_lba <= q.last_lba) {
                return Err(bad(format!("partitions {} ({}) and {} ({}) overlap", q.number, q.name, p.number, p.name)));
            }
        }
        let running_uuid = data_uuid(running_hash);
        let running = if parts[0].uuid == running_uuid {
            Slot::A
        } else if parts[2].uuid == running_uuid {
            Slot::B
        } else {
            return Err(ApplyError::NotRunningDisk { disk: path.to_path_buf(), a: parts[0].uuid, b: parts[2].uuid, running: running_uuid });
        };
        Ok(Disk { lba, gpt, backup: backup.header, running, parts })
    }

    fn slot(&self, s: Slot) -> (&Partition, &Partition) {
        match s {
            Slot::A => (&self.parts[0], &self.parts[1]),
            Slot::B => (&self.parts[2], &self.parts[3]),
        }
    }

    /// The writes that give slot `s` the identity of `roothash`: backup
    /// entries and header, then primary entries and header.
    fn switch_writes(&self, s: Slot, roothash: &[u8; 32]) -> Vec<(u64, Vec<u8>)> {
        let (root, verity) = self.slot(s);
        let size = self.gpt.header.entry_size as usize;
        let mut entries = self.gpt.entries.clone();
        for (p, uuid) in [(root, data_uuid(roothash)), (verity, hash_uuid(roothash))] {
            let off = (p.number as usize - 1) * size;
            entries[off + 16..off + 32].copy_from_slice(&to_gpt_bytes(uuid));
        }
        let crc = gpt::crc32(&entries);
        let (p, b) = (&self.gpt.header, &self.backup);
        vec![
            (b.entries_lba * self.lba, entries.clone()),
            (b.my_lba * self.lba, b.encode(b.my_lba, b.alternate_lba, b.last_usable, b.entries_lba, crc)),
            (p.entries_lba * self.lba, entries),
            (p.my_lba * self.lba, p.encode(p.my_lba, p.alternate_lba, p.last_usable, p.entries_lba, crc)),
        ]
    }
}

fn read_entries(f: &File, path: &Path, sector: &[u8], lba: u64) -> Result<Vec<u8>, ApplyError> {
    let h = Header::parse(sector).map_err(|e| ApplyError::Gpt { disk: path.to_path_buf(), reason: format!("the backup GPT: {e}; repair it (`sgdisk -v`, `sgdisk -e`) before updating") })?;
    let mut entries = vec![0u8; h.entries_bytes() as usize];
    f.read_exact_at(&mut entries, h.entries_lba * lba).map_err(io_err("reading the backup GPT entries of", path))?;
    Ok(entries)
}

fn sector_size(f: &File) -> u64 {
    const BLKSSZGET: libc::c_ulong = 0x1268;
    let is_block = f.metadata().map(|m| m.file_type().is_block_device()).unwrap_or(false);
    if !is_block {
        return 512;
    }
    let mut n: libc::c_int = 512;
    // SAFETY: BLKSSZGET writes one int.
    if unsafe { libc::ioctl(f.as_raw_fd(), BLKSSZGET as _, &mut n) } != 0 || n < 512 {
        return 512;
    }
    n as u64
}

/// PARTUUID of a root partition: the root hash's first 128 bits (as the
/// builder and stage 1 derive it).
pub fn data_uuid(roothash: &[u8; 32]) -> Guid {
    Guid::root_of(roothash)
}

/// PARTUUID of a verity partition: the root hash's last 128 bits.
pub fn hash_uuid(roothash: &[u8; 32]) -> Guid {
    Guid::verity_of(roothash)
}

fn to_gpt_bytes(g: Guid) -> [u8; 16] {
    let mut b = g.0;
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    b
}



/// The slot the node runs: the one of `root-a`/`root-b` on `disk` whose
/// PARTUUID is the first half of `roothash`.
pub fn running_slot(disk: &Path, roothash: &[u8; 32]) -> Result<Slot, ApplyError> {
    let f = File::open(disk).map_err(io_err("opening the disk", disk))?;
    Ok(Disk::read(&f, disk, roothash)?.running)
}

/// True for a boot entry of `slot`, whatever its counter says:
/// `kiln-<profile>-<x>.efi`, `…+N.efi`, `…+N-M.efi` (any case: FAT).
pub fn is_slot_entry(name: &str, profile: &str, slot: Slot) -> bool {
    let name = name.to_ascii_lowercase();
    let stem = format!("kiln-{}-{slot}", profile.to_ascii_lowercase());
    let Some(rest) = name.strip_prefix(&stem).and_then(|r| r.strip_suffix(".efi")) else { return false };
    if rest.is_empty() {
        return true;
    }
    let Some(counter) = rest.strip_prefix('+') else { return false };
    let mut it = counter.splitn(2, '-');
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    it.next().is_some_and(digits) && it.next().into_iter().all(digits)
}

fn temp_name(profile: &str, slot: Slot) -> String {
    format!(".kiln-{profile}-{slot}.efi.tmp")
}

/// Writes the bundle to the inactive slot of `target.disk` and installs its
/// boot entry; see the module docs for the order and why.
pub fn apply<R: Read>(bundle: BundleReader<R>, target: &Target) -> Result<Applied, ApplyError> {
    let m = bundle.manifest();
    match (m.part(PartKind::Uki).is_some(), target.mbr) {
        (true, None) => apply_uki(bundle, target),
        (false, Some(mbr)) => apply_board(bundle, target, mbr),
        (true, Some(_)) => Err(ApplyError::Unsupported { what: format!("the bundle for {} has a UKI, but this node boots through u-boot from an MBR card, which needs a bundle with a kernel and initramfs (build the update for the card's board profile)", m.arch) }),
        (false, None) => Err(ApplyError::Unsupported {
            what: match &m.board {
                Some(b) => format!("the bundle is for the {b} board, which boots a kernel, initramfs and device tree through u-boot from an MBR card, but this node boots from a GPT disk with UKIs; give it a bundle built for its own profile"),
                None => format!("the bundle for {} has a kernel and initramfs instead of a UKI, but this node boots UKIs from a GPT disk; give it a bundle built for its own profile", m.arch),
            },
        }),
    }
}

/// The bundle's root and verity parts and its root hash, which must not be
/// the running one.
fn new_root(m: &Manifest, target: &Target) -> Result<(Part, Part, [u8; 32]), ApplyError> {
    let (root, verity) = (m.part(PartKind::Root).cloned().expect("checked by Manifest::parse"), m.part(PartKind::Verity).cloned().expect("checked by Manifest::parse"));
    let new_hash = unhex32(&m.roothash).ok_or_else(|| BundleError::BadManifest { reason: format!("key `roothash`: `{}` is not hex", m.roothash) })?;
    if new_hash == target.running_roothash {
        return Err(ApplyError::AlreadyRunning { roothash: m.roothash.clone() });
    }
    Ok((root, verity, new_hash))
}

/// The root and verity parts fit the slot's regions on `disk`.
fn check_fit(root: &Part, verity: &Part, rr: &Region, vr: &Region, disk: &Path) -> Result<(), ApplyError> {
    for (part, region) in [(root, rr), (verity, vr)] {
        if part.size > region.len {
            return Err(ApplyError::TooLarge { part: part.name.clone(), size: part.size, partition: region.label.clone(), disk: disk.to_path_buf(), capacity: region.len });
        }
    }
    Ok(())
}

fn apply_uki<R: Read>(mut bundle: BundleReader<R>, target: &Target) -> Result<Applied, ApplyError> {
    let m = bundle.manifest().clone();
    let uki = m.part(PartKind::Uki).cloned().expect("checked by apply");
    let (root, verity, new_hash) = new_root(&m, target)?;

    // Everything that can be checked before a write.
    let path = target.disk;
    let f = OpenOptions::new().read(true).write(true).open(path).map_err(io_err("opening the disk", path))?;
    let disk = Disk::read(&f, path, &target.running_roothash)?;
    let x = disk.running.other();
    let (rp, vp) = disk.slot(x);
    let (rr, vr) = (Region::of(rp, disk.lba, path), Region::of(vp, disk.lba, path));
    check_fit(&root, &verity, &rr, &vr, path)?;
    let dir = target.esp.join(ENTRY_DIR);
    fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    // Slot x's old entries (and a cut apply's temp file) go first: its root
    // is about to be overwritten.
    let tmp_name = temp_name(&m.profile, x);
    let mut stale = Vec::new();
    for e in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
        let e = e.map_err(io_err("listing", &dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if is_slot_entry(&name, &m.profile, x) || name.eq_ignore_ascii_case(&tmp_name) {
            let len = e.metadata().map_err(io_err("reading", &e.path()))?.len();
            stale.push((e.path(), len));
        }
    }
    // Free space counts what the stale entries will free.
    let free = free_bytes(&dir)? + stale.iter().map(|(_, len)| len).sum::<u64>();
    // The UKI plus a little for FAT's directory and cluster slack.
    let need = uki.size + 64 * 1024;
    if free < need {
        return Err(ApplyError::EspFull { esp: target.esp.to_path_buf(), free, need });
    }
    for (p, _) in &stale {
        fs::remove_file(p).map_err(io_err("removing the old boot entry", p))?;
    }
    if !stale.is_empty() {
        sync_dir(&dir)?;
    }

    // Stream the parts.
    target.step(Step::Writing(x));
    let tmp = dir.join(&tmp_name);
    let streamed = (|| -> Result<(u64, u64, u64), ApplyError> {
        let (mut rb, mut vb, mut ub) = (0, 0, 0);
        while let Some(mut part) = bundle.next_part()? {
            match part.part().kind {
                PartKind::Root => rb = write_region(&mut part, &f, &rr)?,
                PartKind::Verity => vb = write_region(&mut part, &f, &vr)?,
                PartKind::Uki => ub = write_file(&mut part, &tmp)?,
                k => return Err(ApplyError::Unsupported { what: format!("a `{k}` part in a bundle with a UKI") }),
            }
        }
        bundle.finish()?;
        Ok((rb, vb, ub))
    })();
    let cleanup = |e: ApplyError| {
        let _ = fs::remove_file(&tmp);
        e
    };
    let (root_bytes, verity_bytes, uki_bytes) = streamed.map_err(cleanup)?;

    // Read back, then switch, then install.
    target.step(Step::Verifying(x));
    let t0 = Instant::now();
    check_slot(&f, x, &rr, &vr, root.size, verity.size, &new_hash).map_err(cleanup)?;
    let readback = t0.elapsed();
    target.step(Step::Switching(x));
    for (i, (off, bytes)) in disk.switch_writes(x, &new_hash).iter().enumerate() {
        f.write_all_at(bytes, *off).map_err(io_err("writing the GPT of", path)).map_err(cleanup)?;
        if i == 1 {
            f.sync_data().map_err(io_err("syncing the backup GPT of", path)).map_err(cleanup)?;
        }
    }
    f.sync_all().map_err(io_err("syncing the GPT of", path)).map_err(cleanup)?;
    target.step(Step::Installing(x));
    let entry = entry_name(&m.profile, x, target.tries.max(1));
    let dst = dir.join(&entry);
    crate::node::sys::rename_synced(&tmp, &dst).map_err(io_err(format!("renaming {} to", tmp.display()), &dst)).map_err(cleanup)?;
    Ok(Applied { slot: x, version: m.version, roothash: m.roothash, root_bytes, verity_bytes, uki_bytes, entry, readback })
}

/// An MBR card's root slots: partition 2 is slot a, 3 is slot b (as the
/// builder lays them out, see kiln::image::sdcard).
pub fn mbr_slot(partition: u32) -> Option<Slot> {
    Slot::of_mbr_partition(partition)
}

/// The root and verity regions of `slot` on an MBR card: the partition's
/// first `hash_offset` bytes, then the rest.
fn mbr_slot_regions(f: &File, path: &Path, mbr: MbrRoot, slot: Slot) -> Result<(Region, Region), ApplyError> {
    let bad = |reason: String| ApplyError::Gpt { disk: path.to_path_buf(), reason };
    let mut s0 = [0u8; 512];
    f.read_exact_at(&mut s0, 0).map_err(io_err("reading the MBR of", path))?;
    match mbr_signature(&s0) {
        Some(sig) if sig == mbr.signature => {}
        Some(sig) => return Err(bad(format!("its MBR disk signature is {sig:08x}, but the running root's kiln.mbr= names {:08x}; give the disk the node booted from", mbr.signature))),
        None => return Err(bad("it has no MBR (or a GPT's protective one), but the running root's kiln.mbr= says it booted from an MBR card".into())),
    }
    let bytes = (&*f).seek(SeekFrom::End(0)).map_err(io_err("finding the size of", path))?;
    let lba = sector_size(f);
    let entry = |n: u32| {
        let e = &s0[446 + 16 * (n as usize - 1)..][..16];
        let first = u64::from(u32::from_le_bytes([e[8], e[9], e[10], e[11]])) * lba;
        let len = u64::from(u32::from_le_bytes([e[12], e[13], e[14], e[15]])) * lba;
        (e[4], first, len)
    };
    let n = slot.mbr_partition();
    let (kind, first, len) = entry(n);
    if kind == 0 || len == 0 {
        return Err(ApplyError::MissingPartition { disk: path.to_path_buf(), name: format!("root-{slot} (MBR partition {n})") });
    }
    if first + len > bytes {
        return Err(bad(format!("partition {n} (root-{slot}) ends at byte {}, past the disk's {bytes}", first + len)));
    }
    let (_, of, ol) = entry(slot.other().mbr_partition());
    if of < first + len && first < of + ol {
        return Err(bad("partitions 2 and 3 (root-a and root-b) overlap".to_string()));
    }
    if mbr.hash_offset >= len {
        return Err(bad(format!("kiln.mbr= puts the verity tree {} bytes into partition {n}, which holds only {len}", mbr.hash_offset)));
    }
    let label = format!("root-{slot} (partition {n} of {})", path.display());
    Ok((Region { label: label.clone(), offset: first, len: mbr.hash_offset }, Region { label: format!("the verity tree of {label}"), offset: first + mbr.hash_offset, len: len - mbr.hash_offset }))
}

/// A file name for a `dtb` part in the slot's `dtbs/` (its last component).
fn dtb_name(part: &str) -> &str {
    part.rsplit('/').next().unwrap_or(part)
}

/// u-boot boards on an MBR card (see the module docs, "u-boot boards").
fn apply_board<R: Read>(mut bundle: BundleReader<R>, target: &Target, mbr: MbrRoot) -> Result<Applied, ApplyError> {
    let m = bundle.manifest().clone();
    let (root, verity, new_hash) = new_root(&m, target)?;
    let cmdline = m.cmdline.clone().ok_or_else(|| BundleError::BadManifest { reason: "a bundle with a `kernel` part needs `cmdline`".into() })?;
    let running = mbr_slot(mbr.partition).ok_or_else(|| ApplyError::Gpt { disk: target.disk.to_path_buf(), reason: format!("the running root is on partition {} (kiln.mbr=), which is not a root slot (2 or 3)", mbr.partition) })?;
    let x = running.other();

    // Everything that can be checked before a write.
    let path = target.disk;
    let f = OpenOptions::new().read(true).write(true).open(path).map_err(io_err("opening the disk", path))?;
    let (rr, vr) = mbr_slot_regions(&f, path, mbr, x)?;
    check_fit(&root, &verity, &rr, &vr, path)?;
    let boot = target.esp;
    let dir = boot.join(uboot::slot_dir(x));
    let old: u64 = walk_sizes(&dir);
    let files: u64 = m.parts.iter().filter(|p| matches!(p.kind, PartKind::Kernel | PartKind::Initramfs | PartKind::Dtb)).map(|p| p.size).sum();
    let free = free_bytes(boot)? + old;
    let need = files + 64 * 1024;
    if free < need {
        return Err(ApplyError::EspFull { esp: boot.to_path_buf(), free, need });
    }

    // Slot x is not booted from here on: no trial names it, and its
    // files go before its root is overwritten.
    let state = uboot::read_state(boot).map_err(io_err("reading", &boot.join(uboot::STATE)))?;
    let keep = State { good: running, trial: None };
    if state != Some(keep) {
        uboot::write_state(boot, &keep).map_err(io_err("writing", &boot.join(uboot::STATE)))?;
    }
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(io_err("removing the old slot files", &dir))?;
    }
    let dtbs = dir.join(uboot::DTB_DIR);
    fs::create_dir_all(&dtbs).map_err(io_err("creating", &dtbs))?;

    target.step(Step::Writing(x));
    let mut dtb = None;
    let streamed = (|| -> Result<(u64, u64, u64), ApplyError> {
        let (mut rb, mut vb, mut fb) = (0, 0, 0);
        while let Some(mut part) = bundle.next_part()? {
            let p = part.part().clone();
            match p.kind {
                PartKind::Root => rb = write_region(&mut part, &f, &rr)?,
                PartKind::Verity => vb = write_region(&mut part, &f, &vr)?,
                PartKind::Kernel => fb += write_file(&mut part, &dir.join(uboot::KERNEL))?,
                PartKind::Initramfs => fb += write_file(&mut part, &dir.join(uboot::INITRD))?,
                PartKind::Dtb => {
                    let name = dtb_name(&p.name).to_string();
                    fb += write_file(&mut part, &dtbs.join(&name))?;
                    dtb.get_or_insert(name);
                }
                k => return Err(ApplyError::Unsupported { what: format!("a `{k}` part in a bundle for a u-boot board") }),
            }
        }
        bundle.finish()?;
        Ok((rb, vb, fb))
    })();
    let cleanup = |e: ApplyError| {
        let _ = fs::remove_dir_all(&dir);
        e
    };
    let (root_bytes, verity_bytes, file_bytes) = streamed.map_err(cleanup)?;
    sync_dir(&dtbs).map_err(cleanup)?;
    sync_dir(&dir).map_err(cleanup)?;

    target.step(Step::Verifying(x));
    let t0 = Instant::now();
    check_slot(&f, x, &rr, &vr, root.size, verity.size, &new_hash).map_err(cleanup)?;
    let readback = t0.elapsed();

    target.step(Step::Installing(x));
    let slot_cmdline = format!("{cmdline} kiln.slot={x} kiln.mbr={:08x},{},{}", mbr.signature, x.mbr_partition(), mbr.hash_offset);
    let conf = uboot::extlinux_conf(m.board.as_deref().unwrap_or(&m.profile), x, dtb.as_deref(), &slot_cmdline);
    let conf_path = dir.join(uboot::EXTLINUX);
    write_file(&mut conf.as_bytes(), &conf_path).map_err(cleanup)?;
    sync_dir(&dir).map_err(cleanup)?;

    target.step(Step::Trial(x));
    let trial = State { good: running, trial: Some((x, target.tries.clamp(1, 9))) };
    uboot::write_state(boot, &trial).map_err(io_err("writing", &boot.join(uboot::STATE)))?;
    Ok(Applied { slot: x, version: m.version, roothash: m.roothash, root_bytes, verity_bytes, uki_bytes: file_bytes, entry: format!("{}/{}", uboot::slot_dir(x), uboot::EXTLINUX), readback })
}

/// The bytes of the files under `dir` (0 when it is missing).
fn walk_sizes(dir: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => walk_sizes(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

/// Reads up to `buf.len()` bytes; fewer only at the end.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, ApplyError> {
    kiln_contract::stream::read_full(r, buf).map_err(|e| ApplyError::Bundle(BundleError::from_io(e)))
}

fn write_region(part: &mut impl Read, f: &File, r: &Region) -> Result<u64, ApplyError> {
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    let werr = |source| ApplyError::Io { op: "writing".into(), path: PathBuf::from(&r.label), source };
    loop {
        let n = read_full(part, &mut buf)?;
        if n == 0 {
            break;
        }
        if at + n as u64 > r.len {
            // The manifest's size was checked; this is defence in depth.
            return Err(werr(io::Error::other("the part is larger than the partition")));
        }
        f.write_all_at(&buf[..n], r.offset + at).map_err(werr)?;
        at += n as u64;
    }
    f.sync_data().map_err(werr)?;
    Ok(at)
}

fn write_file(part: &mut impl Read, path: &Path) -> Result<u64, ApplyError> {
    let mut out = File::create(path).map_err(io_err("creating", path))?;
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    loop {
        let n = read_full(part, &mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).map_err(io_err("writing", path))?;
        at += n as u64;
    }
    out.sync_all().map_err(io_err("syncing", path))?;
    Ok(at)
}


fn sync_dir(dir: &Path) -> Result<(), ApplyError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("syncing the directory", dir))
}

fn free_bytes(dir: &Path) -> Result<u64, ApplyError> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|_| ApplyError::Io { op: "checking free space on".into(), path: dir.to_path_buf(), source: io::Error::other("a NUL in the path") })?;
    // SAFETY: statvfs fills the struct it is given; the path is NUL-terminated.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(ApplyError::Io { op: "checking free space on".into(), path: dir.to_path_buf(), source: io::Error::last_os_error() });
    }
    Ok(s.f_bavail as u64 * s.f_frsize as u64)
}

/// The read-back: the root hash of the data on `root` with the salt and size
/// of the superblock on `verity`, and every hash block on `verity` compared
/// with the recomputed tree. The tree is [`kiln_contract::verity`]'s, the code the
/// builder's `kiln_formats::verity::build` writes trees with.
fn check_slot(f: &File, slot: Slot, root: &Region, verity: &Region, root_size: u64, verity_size: u64, expected: &[u8; 32]) -> Result<(), ApplyError> {
    // What was just written must come from the disk, not the page cache.
    // SAFETY: plain advice on an open fd.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), root.offset as libc::off_t, root.len as libc::off_t, libc::POSIX_FADV_DONTNEED);
        libc::posix_fadvise(f.as_raw_fd(), verity.offset as libc::off_t, verity.len as libc::off_t, libc::POSIX_FADV_DONTNEED);
    }
    let rerr = |r: &Region| {
        let label = r.label.clone();
        move |source| ApplyError::Io { op: "reading back".into(), path: PathBuf::from(label), source }
    };
    let bad = |reason: String| ApplyError::BadVerity { partition: verity.label.clone(), reason };
    let mut block = [0u8; VERITY_BLOCK as usize];
    f.read_exact_at(&mut block, verity.offset).map_err(rerr(verity))?;
    let sb = parse_superblock(&block).map_err(bad)?;
    if sb.data_blocks.checked_mul(VERITY_BLOCK) != Some(root_size) {
        return Err(bad(format!("it covers {} blocks of 4096 bytes, but the root part is {root_size} bytes", sb.data_blocks)));
    }
    let hash_len = hash_blocks(sb.data_blocks) * VERITY_BLOCK;
    if hash_len > verity_size {
        return Err(bad(format!("its tree needs {hash_len} bytes, but the verity part is {verity_size}")));
    }

    let mut tree = TreeBuilder::new(&sb.salt, sb.data_blocks);
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    while at < root_size {
        let n = (root_size - at).min(CHUNK as u64) as usize;
        f.read_exact_at(&mut buf[..n], root.offset + at).map_err(rerr(root))?;
        tree.push(&buf[..n]);
        at += n as u64;
    }
    let tree = tree.finish();
    let found = tree.root_hash();
    if found != *expected {
        return Err(ApplyError::RootHashMismatch { slot, partition: root.label.clone(), expected: hex(expected), found: hex(&found) });
    }
    for (index, want) in (1u64..).zip(tree.blocks()) {
        f.read_exact_at(&mut block, verity.offset + index * VERITY_BLOCK).map_err(rerr(verity))?;
        if block != want {
            return Err(ApplyError::TreeMismatch { slot, partition: verity.label.clone(), root: root.label.clone(), block: index });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_entries() {
        for n in ["kiln-edge-b+3.efi", "kiln-edge-b.efi", "kiln-edge-b+0-3.efi", "KILN-EDGE-B+2-1.EFI", "kiln-edge-b+12.efi"] {
            assert!(is_slot_entry(n, "edge", Slot::B), "{n}");
        }
        for n in ["kiln-edge-a+3.efi", "kiln-edge-b+.efi", "kiln-edge-b+3-.efi", "kiln-edge-bb+3.efi", "kiln-edge-b+3.efi.tmp", "kiln-edge2-b+3.efi", "kiln-edge-b+x.efi", "kiln-edge-b+1-2-3.efi"] {
            assert!(!is_slot_entry(n, "edge", Slot::B), "{n}");
        }
        assert_eq!(entry_name("edge", Slot::A, 3), "kiln-edge-a+3.efi");
        assert!(!is_slot_entry(&temp_name("edge", Slot::B), "edge", Slot::B));
    }

    #[test]
    fn uuids_are_root_hash_halves_in_gpt_order() {
        let h = unhex32("4f68bce3e8cd4db196e7fbcaf984b7092c7357edebd246d9aec123d437ec2bf5").unwrap();
        assert_eq!(data_uuid(&h).to_string(), "4f68bce3-e8cd-4db1-96e7-fbcaf984b709");
        assert_eq!(hash_uuid(&h).to_string(), "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5");
        let g = to_gpt_bytes(data_uuid(&h));
        assert_eq!(hex(&g), "e3bc684fcde8b14d96e7fbcaf984b709");
        assert_eq!(Guid::from_gpt_slice(&g, 0), Some(data_uuid(&h)));
        assert!(unhex32("zz").is_none());
    }
}
