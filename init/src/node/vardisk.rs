//! `storage.var_disk`: /var on a disk of its own for nodes whose boot medium
//! has no data partition (PXE, a kiln ISO). Stage 1 left a tmpfs on /var;
//! stage 2 replaces it with the disk once the config names one.
//!
//! A disk kiln prepared before (a GPT entry named `kiln-var`) is mounted as
//! it is, grown when the disk got bigger. A blank disk (its first MiB all
//! zeros, and no GPT at its end) gets the image's empty ext4 template and a
//! fresh GPT. Anything else is refused, and /var stays on the tmpfs.
//!
//! Preparing writes the filesystem first and the GPT last, the primary copy
//! (with the protective MBR) in the final write. Until that write lands the
//! disk still reads as blank (or as an interrupted preparation, when only
//! the backup copy made it), so a power cut at any point leads to a fresh
//! preparation at the next boot, never to a half-made /var.
//!
//! [`Layout`] and [`classify`] are pure; the rest runs on the node.

use super::gpt::{self, Gpt, Guid};
use super::grow::{self, Ext4Super};
use super::{console, install, stage1, sys};
use kiln_contract::config::NodeConfig;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

/// The GPT name that marks a disk kiln prepared for /var.
pub const PART_NAME: &str = "kiln-var";
/// The empty ext4 the builder bakes into the root; written to a blank
/// disk and grown online.
pub use kiln_contract::layout::VAR_TEMPLATE as TEMPLATE;
/// Linux filesystem data, 0FC63DAF-8483-4772-8E79-3D69D8477DE4.
pub const LINUX_DATA: Guid = Guid([
    0x0f, 0xc6, 0x3d, 0xaf, 0x84, 0x83, 0x47, 0x72, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4,
]);
/// The part of the disk that must be all zeros for it to count as blank;
/// the partition starts right after it.
pub const HEAD: u64 = 1 << 20;
/// Smaller disks are refused: /var would not hold k0s.
pub const MIN_DISK: u64 = 64 << 20;
const ENTRIES: u32 = 128;
const ENTRY_SIZE: u32 = 128;
/// How long to wait for the named disk, and for its new partition.
const APPEAR_WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(100);
const VAR: &str = "/var";

// ---- the GPT ------------------------------------------------------------------

/// A fresh GPT for a /var disk: protective MBR, primary and backup tables
/// of 128 entries, and one partition [`PART_NAME`] from 1 MiB to the last
/// usable block (where [`grow`] would put it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub lba_size: u64,
    pub disk_lbas: u64,
    pub disk_guid: Guid,
    pub part_guid: Guid,
}

impl Layout {
    pub fn new(
        disk_bytes: u64,
        lba_size: u64,
        disk_guid: Guid,
        part_guid: Guid,
    ) -> Result<Layout, String> {
        if !lba_size.is_power_of_two() || !(512..=4096).contains(&lba_size) {
            return Err(format!(
                "logical block size {lba_size}; kiln handles 512 to 4096"
            ));
        }
        if disk_bytes < MIN_DISK {
            return Err(format!(
                "{disk_bytes} bytes is too small for /var: give a disk of at least {} MiB",
                MIN_DISK >> 20
            ));
        }
        Ok(Layout {
            lba_size,
            disk_lbas: disk_bytes / lba_size,
            disk_guid,
            part_guid,
        })
    }

    fn entry_lbas(&self) -> u64 {
        (ENTRIES as u64 * ENTRY_SIZE as u64).div_ceil(self.lba_size)
    }

    pub fn first_usable(&self) -> u64 {
        2 + self.entry_lbas()
    }

    pub fn last_usable(&self) -> u64 {
        self.disk_lbas - 2 - self.entry_lbas()
    }

    pub fn first_lba(&self) -> u64 {
        HEAD / self.lba_size
    }

    /// Byte offset of the partition.
    pub fn part_offset(&self) -> u64 {
        self.first_lba() * self.lba_size
    }

    pub fn part_bytes(&self) -> u64 {
        (self.last_usable() + 1 - self.first_lba()) * self.lba_size
    }

    fn entries(&self) -> Vec<u8> {
        let mut e = vec![0u8; (ENTRIES * ENTRY_SIZE) as usize];
        e[0..16].copy_from_slice(&to_gpt_bytes(LINUX_DATA));
        e[16..32].copy_from_slice(&to_gpt_bytes(self.part_guid));
        e[32..40].copy_from_slice(&self.first_lba().to_le_bytes());
        e[40..48].copy_from_slice(&self.last_usable().to_le_bytes());
        for (i, u) in PART_NAME.encode_utf16().enumerate() {
            e[56 + 2 * i..58 + 2 * i].copy_from_slice(&u.to_le_bytes());
        }
        e
    }

    /// One header sector.
    fn header(
        &self,
        my_lba: u64,
        alternate_lba: u64,
        entries_lba: u64,
        entries_crc: u32,
    ) -> Vec<u8> {
        let mut h = vec![0u8; self.lba_size as usize];
        h[0..8].copy_from_slice(gpt::SIGNATURE);
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&gpt::MIN_HEADER_SIZE.to_le_bytes());
        h[24..32].copy_from_slice(&my_lba.to_le_bytes());
        h[32..40].copy_from_slice(&alternate_lba.to_le_bytes());
        h[40..48].copy_from_slice(&self.first_usable().to_le_bytes());
        h[48..56].copy_from_slice(&self.last_usable().to_le_bytes());
        h[56..72].copy_from_slice(&to_gpt_bytes(self.disk_guid));
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&ENTRIES.to_le_bytes());
        h[84..88].copy_from_slice(&ENTRY_SIZE.to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = gpt::crc32(&h[..gpt::MIN_HEADER_SIZE as usize]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// LBA 0: a protective MBR covering the whole disk (as far as 32 bits
    /// reach).
    fn protective_mbr(&self) -> Vec<u8> {
        let mut s = vec![0u8; self.lba_size as usize];
        let e = &mut s[446..462];
        e[1..4].copy_from_slice(&[0x00, 0x02, 0x00]);
        e[4] = 0xEE;
        e[5..8].copy_from_slice(&[0xFF, 0xFF, 0xFF]);
        e[8..12].copy_from_slice(&1u32.to_le_bytes());
        e[12..16].copy_from_slice(
            &u32::try_from(self.disk_lbas - 1)
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        s[510] = 0x55;
        s[511] = 0xAA;
        s
    }

    /// The (byte offset, bytes) writes, in order: the backup entries and
    /// header, then the protective MBR, primary header and entries in one
    /// write. [`grow::apply`] syncs after the backup.
    pub fn writes(&self) -> Vec<(u64, Vec<u8>)> {
        let lba = self.lba_size;
        let entries = self.entries();
        let crc = gpt::crc32(&entries);
        let last = self.disk_lbas - 1;
        let backup_entries = last - self.entry_lbas();
        let mut primary = self.protective_mbr();
        primary.extend(self.header(1, last, 2, crc));
        primary.extend(&entries);
        vec![
            (backup_entries * lba, entries.clone()),
            (last * lba, self.header(last, 1, backup_entries, crc)),
            (0, primary),
        ]
    }
}

/// A GUID's on-disk form (first three fields little-endian).
fn to_gpt_bytes(g: Guid) -> [u8; 16] {
    let mut b = g.0;
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    b
}

/// A random (version 4) GUID.
fn random_guid() -> Result<Guid, String> {
    let mut b = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    Ok(Guid(b))
}

// ---- what is on the disk -----------------------------------------------------

/// What a disk holds, as far as /var is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// First MiB all zeros, no GPT: prepare it.
    Blank,
    /// First MiB all zeros, and a backup GPT with only `kiln-var`: a
    /// preparation stopped before its last write. Prepare it again.
    Interrupted,
    /// A GPT with a `kiln-var` partition: mount it.
    Prepared,
    /// Anything else, in words.
    Other(String),
}

/// Classifies a disk from its first MiB (`head`, or the whole disk when it
/// is smaller) and the GPT read from it, if any.
pub fn classify(head: &[u8], gpt: Option<&Gpt>) -> Found {
    let zero = first_nonzero(head).is_none();
    match gpt {
        Some(g) if g.by_name(PART_NAME).is_some() => {
            if !zero {
                Found::Prepared
            } else if g.from_backup && g.partitions().len() == 1 {
                Found::Interrupted
            } else {
                Found::Other(format!("{} at its end but nothing at its start (a damaged disk? gdisk can rebuild the table from the backup)", describe_gpt(g)))
            }
        }
        Some(g) if zero => Found::Other(format!("{} at its end but nothing at its start (a damaged disk? gdisk can rebuild the table from the backup)", describe_gpt(g))),
        Some(g) => {
            let mut found = vec![describe_gpt(g)];
            found.extend(signatures(head).into_iter().filter(|s| !s.contains("MBR")));
            Found::Other(found.join(", "))
        }
        None if zero => Found::Blank,
        None => {
            let sigs = signatures(head);
            if sigs.is_empty() {
                let at = first_nonzero(head).unwrap_or(0);
                Found::Other(format!("data at byte {at} in a format kiln does not know"))
            } else {
                Found::Other(sigs.join(", "))
            }
        }
    }
}

fn first_nonzero(b: &[u8]) -> Option<usize> {
    b.iter().position(|x| *x != 0)
}

fn describe_gpt(g: &Gpt) -> String {
    let parts: Vec<String> = g
        .partitions()
        .iter()
        .map(|p| format!("{} {:?}", p.number, p.name))
        .collect();
    let what = if g.from_backup {
        "a backup GPT"
    } else {
        "a GPT"
    };
    if parts.is_empty() {
        format!("{what} with no partitions")
    } else {
        format!("{what} with partitions {}", parts.join(", "))
    }
}

/// The partition tables and filesystems whose signatures `head` carries.
pub fn signatures(head: &[u8]) -> Vec<String> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    let mut out = Vec::new();
    if at(0, b"LUKS\xba\xbe") {
        out.push("a LUKS header".to_string());
    }
    if at(0, b"XFSB") {
        out.push("an XFS filesystem".into());
    }
    if at(0, b"hsqs") {
        out.push("a squashfs".into());
    }
    if at(512, b"LABELONE") {
        out.push("an LVM physical volume".into());
    }
    if let Some(sb) = head.get(1024..2048).and_then(Ext4Super::parse) {
        out.push(if sb.label.is_empty() {
            "an ext2/3/4 filesystem".into()
        } else {
            format!("an ext2/3/4 filesystem labelled {:?}", sb.label)
        });
    }
    if at(0x8001, b"CD001") {
        out.push("an ISO 9660 filesystem".into());
    }
    if at(0x10040, b"_BHRfS_M") {
        out.push("a btrfs filesystem".into());
    }
    if at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE") {
        out.push("a swap area".into());
    }
    let boot_sig = at(510, &[0x55, 0xAA]);
    let fat = boot_sig && (at(54, b"FAT") || at(82, b"FAT32"));
    if fat {
        out.push("a FAT filesystem".into());
    } else if boot_sig {
        let types: Vec<u8> = (0..4)
            .map(|i| head[446 + 16 * i + 4])
            .filter(|t| *t != 0)
            .collect();
        out.push(if types.contains(&0xEE) {
            "a protective MBR (a GPT disk whose GPT is damaged)".into()
        } else if types.is_empty() {
            "an MBR boot sector".into()
        } else {
            format!("an MBR partition table ({} partitions)", types.len())
        });
    }
    out
}

// ---- on the node ---------------------------------------------------------------

/// Why /var is not on the disk.
enum Refusal {
    /// /var was not touched: it is still the tmpfs.
    Untouched(String),
    /// The tmpfs was already unmounted; /var needs a new one.
    Released(String),
}

/// Acts on `storage.var_disk`. Never blocks the node: a refusal or a
/// failure leaves /var on a tmpfs, with an error that says what to do.
pub fn setup(cfg: &NodeConfig) {
    let Some(want) = cfg.storage.var_disk.as_deref() else {
        return;
    };
    let medium = install::read_medium().ok();
    if medium.as_ref().is_some_and(|m| m.kind == "disk") {
        console::info(&format!("storage.var_disk = {want} is ignored: this node booted from its disk, and /var is on that disk's data partition"));
        return;
    }
    match use_disk(want, medium.as_ref()) {
        Ok(()) => {}
        Err(Refusal::Untouched(e)) => {
            console::error(&format!("storage.var_disk: {e}"));
            console::event(
                "data-ephemeral",
                &[("reason", &format!("storage.var_disk: {e}"))],
            );
            console::warn("/var stays on a tmpfs: k0s state, logs and images are lost at reboot");
        }
        Err(Refusal::Released(e)) => {
            console::error(&format!("storage.var_disk: {e}"));
            stage1::ephemeral_var(VAR, &format!("storage.var_disk: {e}"));
            if medium.is_some() {
                stage1::writable_binds("");
            }
        }
    }
}

fn use_disk(want: &str, medium: Option<&install::Medium>) -> Result<(), Refusal> {
    let untouched = Refusal::Untouched;
    let name = wait_for_disk(want).map_err(untouched)?;
    let node = format!("/dev/{name}");
    let disk = stage1::scan_disks().into_iter().find(|d| d.sysname == name).ok_or_else(|| untouched(format!("{want} ({node}) is not a disk kiln can use for /var (loop, ram and device-mapper devices are not)")))?;
    let parts: Vec<String> = disk.parts.iter().map(|p| p.sysname.clone()).collect();
    check_target(want, &name, &parts, medium).map_err(untouched)?;

    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_EXCL)
        .open(&node)
        .map_err(|e| untouched(format!("opening {node} exclusively: {e}; it is in use (mounted, a swap area, or under a device-mapper or RAID device)")))?;
    let mut head = vec![0u8; HEAD.min(disk.bytes) as usize];
    dev.read_exact_at(&mut head, 0)
        .map_err(|e| untouched(format!("reading {node}: {e}")))?;
    let table = Gpt::read(&dev, disk.lba_size, disk.bytes)
        .or_else(|e| {
            if disk.lba_size != 512 {
                Gpt::read(&dev, 512, disk.bytes)
            } else {
                Err(e)
            }
        })
        .ok();
    match classify(&head, table.as_ref()) {
        Found::Prepared => {
            drop(dev);
            mountable(&disk).map_err(untouched)?;
            console::info(&format!(
                "storage.var_disk: {node} holds a kiln /var (partition {PART_NAME:?}); mounting it"
            ));
            switch_var(medium.is_some(), || {
                stage1::mount_data(&disk, PART_NAME, VAR)
            })
        }
        found @ (Found::Blank | Found::Interrupted) => {
            if found == Found::Interrupted {
                console::warn(&format!("storage.var_disk: {node} holds an interrupted kiln preparation; preparing it again"));
            }
            let part = prepare(&dev, &disk, &node).map_err(untouched)?;
            drop(dev);
            let disk = wait_for_partition(&name, &node, &part).map_err(untouched)?;
            mountable(&disk).map_err(untouched)?;
            switch_var(medium.is_some(), || {
                stage1::mount_data(&disk, PART_NAME, VAR)
            })
        }
        Found::Other(what) => {
            let who = if want == node {
                node.clone()
            } else {
                format!("{want} ({node})")
            };
            Err(untouched(format!(
                "{who} is not used for /var: it holds {what}. kiln takes only a blank disk (first MiB all zeros) or one it prepared before. If nothing on it is needed, wipe it (`wipefs -a {node}` and `dd if=/dev/zero of={node} bs=1M count=1`) and reboot; or name another disk in storage.var_disk"
            )))
        }
    }
}

/// What [`stage1::mount_data`] needs, checked while /var is still the
/// tmpfs: the kernel's partition for `kiln-var`, with an ext4 on it.
fn mountable(disk: &stage1::Disk) -> Result<(), String> {
    let node = disk.node();
    let table = disk.gpt.as_ref().map_err(|e| format!("{node}: {e}"))?;
    let entry = table
        .by_name(PART_NAME)
        .ok_or_else(|| format!("{node}: no partition {PART_NAME:?} in its GPT"))?;
    let part = disk.part(entry.number).ok_or_else(|| {
        format!(
            "{node}: the kernel has no partition {} ({PART_NAME:?}): is the protective MBR damaged? `sgdisk -v {node}` tells",
            entry.number
        )
    })?;
    let pnode = part.node();
    let f = File::open(&pnode).map_err(|e| format!("{pnode}: {e}"))?;
    Ext4Super::read(&f).ok_or_else(|| {
        format!("{pnode} ({PART_NAME:?}) holds no ext4 filesystem; if nothing on it is needed, wipe {node} and reboot to prepare it again")
    })?;
    Ok(())
}

/// Waits for the configured device; returns its kernel name.
fn wait_for_disk(want: &str) -> Result<String, String> {
    let start = Instant::now();
    while !Path::new(want).exists() {
        if start.elapsed() >= APPEAR_WAIT {
            let hint = if want.starts_with("/dev/disk/") {
                " (kiln has no udev, so /dev/disk/by-* links do not exist: name the kernel's device)"
            } else {
                ""
            };
            return Err(format!(
                "{want} did not appear within {} s{hint}; disks present: {}",
                APPEAR_WAIT.as_secs(),
                disks().join(", ")
            ));
        }
        std::thread::sleep(POLL);
    }
    let real = std::fs::canonicalize(want).map_err(|e| format!("{want}: {e}"))?;
    real.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| format!("{want} is not a device"))
}

fn disks() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/block")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    !["loop", "ram", "zram", "dm-"]
                        .iter()
                        .any(|p| n.starts_with(p))
                })
                .map(|n| format!("/dev/{n}"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    if v.is_empty() {
        v.push("none".into());
    }
    v
}

/// Refuses what /var must never take: a partition, the boot medium, a
/// read-only or busy disk.
fn check_target(
    want: &str,
    name: &str,
    parts: &[String],
    medium: Option<&install::Medium>,
) -> Result<(), String> {
    let sys = Path::new("/sys/class/block").join(name);
    if sys.join("partition").exists() {
        return Err(format!(
            "{want} is a partition; name the whole disk (for example /dev/vdb, not /dev/vdb1)"
        ));
    }
    if !Path::new("/sys/block").join(name).exists() {
        return Err(format!(
            "{want} is not a whole disk; disks present: {}",
            disks().join(", ")
        ));
    }
    if medium
        .and_then(|m| m.device.as_deref())
        .map(|d| d.trim_start_matches("/dev/"))
        == Some(name)
    {
        return Err(format!(
            "{want} is the medium this node booted from; name another disk"
        ));
    }
    if std::fs::read_to_string(sys.join("ro")).is_ok_and(|s| s.trim() == "1") {
        return Err(format!(
            "{want} is read-only (a CD, or write-protected); name a writable disk"
        ));
    }
    let mut names = vec![name.to_string()];
    names.extend(parts.iter().cloned());
    let ours = |src: &str| {
        let real = std::fs::canonicalize(src).ok();
        let base = real
            .as_deref()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| src.trim_start_matches("/dev/").to_string());
        names.contains(&base)
    };
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if let Some((src, at)) = mounts
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(s, r)| (s, r.split(' ').next().unwrap_or("")))
        .find(|(s, _)| s.starts_with("/dev/") && ours(s))
    {
        return Err(format!("{want} is in use: {src} is mounted on {at}"));
    }
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    if let Some(src) = swaps
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .find(|s| ours(s))
    {
        return Err(format!("{want} is in use: {src} is a swap area"));
    }
    for n in &names {
        let holders: Vec<String> =
            std::fs::read_dir(Path::new("/sys/class/block").join(n).join("holders"))
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
        if !holders.is_empty() {
            return Err(format!(
                "{want} is in use: {n} is held by {}",
                holders.join(", ")
            ));
        }
    }
    Ok(())
}

/// Writes the template and a fresh GPT to the blank disk `dev` (opened
/// exclusively). Returns the new partition's geometry.
fn prepare(dev: &File, disk: &stage1::Disk, node: &str) -> Result<Layout, String> {
    let t0 = Instant::now();
    let template = File::open(TEMPLATE).map_err(|e| {
        format!(
            "{TEMPLATE}: {e}; the image has no /var template (built by an older kiln?): rebuild it"
        )
    })?;
    let layout = Layout::new(disk.bytes, disk.lba_size, random_guid()?, random_guid()?)
        .map_err(|e| format!("{node}: {e}"))?;
    write_disk(dev, &layout, &template).map_err(|e| format!("preparing {node}: {e}"))?;
    console::info(&format!("storage.var_disk: {node} prepared in {:.2} s: GPT partition {PART_NAME:?} of {} bytes with an empty ext4", t0.elapsed().as_secs_f64(), layout.part_bytes()));
    Ok(layout)
}

/// The filesystem, then the GPT, each synced. Works on any file, so tests
/// run it on an image.
pub fn write_disk(dev: &File, layout: &Layout, template: &File) -> Result<(), String> {
    let len = template
        .metadata()
        .map_err(|e| format!("{TEMPLATE}: {e}"))?
        .len();
    let sb = Ext4Super::read(template).ok_or_else(|| {
        format!("{TEMPLATE} is not an ext4 filesystem: the image is damaged; rebuild it")
    })?;
    if sb.bytes() > len {
        return Err(format!(
            "{TEMPLATE} is truncated ({len} bytes, its superblock says {})",
            sb.bytes()
        ));
    }
    if len > layout.part_bytes() {
        return Err(format!("the disk is too small: the partition would have {} bytes, the empty filesystem alone takes {len}", layout.part_bytes()));
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = buf.len().min((len - off) as usize);
        template
            .read_exact_at(&mut buf[..n], off)
            .map_err(|e| format!("reading {TEMPLATE}: {e}"))?;
        dev.write_all_at(&buf[..n], layout.part_offset() + off)
            .map_err(|e| {
                format!(
                    "writing the filesystem at byte {}: {e}",
                    layout.part_offset() + off
                )
            })?;
        off += n as u64;
    }
    dev.sync_data()
        .map_err(|e| format!("syncing the filesystem: {e}"))?;
    grow::apply(dev, &layout.writes()).map_err(|e| format!("writing the GPT: {e}"))
}

/// _IO(0x12, 95)
const BLKRRPART: libc::c_ulong = 0x125f;

/// Has the kernel read the new table, waits for partition 1, and returns
/// the disk as it is now.
fn wait_for_partition(name: &str, node: &str, layout: &Layout) -> Result<stage1::Disk, String> {
    let f = File::open(node).map_err(|e| format!("{node}: {e}"))?;
    // SAFETY: an ioctl without arguments on an open fd.
    if unsafe { libc::ioctl(f.as_raw_fd(), BLKRRPART as _) } != 0 {
        let e = std::io::Error::last_os_error();
        grow::blkpg_add(&f, 1, layout.part_offset(), layout.part_bytes())
            .map_err(|e2| format!("{node} is prepared, but the kernel did not take its new partition table (BLKRRPART: {e}; BLKPG: {e2}); /var moves to it at the next boot"))?;
    }
    drop(f);
    let start = Instant::now();
    loop {
        if let Some(d) = stage1::scan_disks().into_iter().find(|d| d.sysname == name) {
            if let Some(p) = d.part(1) {
                let (pnode, bytes) = (p.node(), p.bytes);
                if Path::new(&pnode).exists() {
                    console::event(
                        "data-prepared",
                        &[("dev", &pnode), ("disk", &node), ("bytes", &bytes)],
                    );
                    return Ok(d);
                }
            }
        }
        if start.elapsed() >= APPEAR_WAIT {
            return Err(format!("{node} is prepared, but its partition 1 did not appear within {} s; /var moves to it at the next boot", APPEAR_WAIT.as_secs()));
        }
        std::thread::sleep(POLL);
    }
}

/// Replaces the tmpfs on /var (and the binds into it) with `mount`'s.
fn switch_var(binds: bool, mount: impl FnOnce() -> Result<(), String>) -> Result<(), Refusal> {
    for (_, dst) in stage1::WRITABLE_BINDS.iter().rev() {
        unmount(dst);
    }
    unmount(VAR);
    mount().map_err(|e| Refusal::Released(format!("mounting the /var disk: {e}")))?;
    if binds {
        stage1::writable_binds("");
    }
    Ok(())
}

/// Unmounts everything on `target`; lazily when busy.
fn unmount(target: &str) {
    for _ in 0..4 {
        if !sys::is_mountpoint(target) {
            return;
        }
        if let Err(e) = sys::umount(target, 0) {
            if e.err.raw_os_error() == Some(libc::EBUSY) {
                console::warn(&format!("{target} is busy; detaching it (lazy unmount)"));
            }
            if let Err(e) = sys::umount(target, libc::MNT_DETACH) {
                console::warn(&format!("{e}; the disk is mounted over it"));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::gpt::tests::{kiln_disk, sgdisk, tempdir};

    const DISK_GUID: Guid = Guid([
        0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x47, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff,
        0x00,
    ]);
    const PART_GUID: Guid = Guid([
        0xa0, 0xa1, 0xa2, 0xa3, 0xb0, 0xb1, 0x4c, 0xc1, 0x8d, 0xd1, 0xe0, 0xe1, 0xe2, 0xe3, 0xe4,
        0xe5,
    ]);

    fn image(path: &Path, bytes: u64) -> File {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap();
        f.set_len(bytes).unwrap();
        f
    }

    fn head_of(f: &File) -> Vec<u8> {
        let len = f.metadata().unwrap().len().min(HEAD);
        let mut b = vec![0u8; len as usize];
        f.read_exact_at(&mut b, 0).unwrap();
        b
    }

    fn found(f: &File, lba: u64) -> Found {
        let g = Gpt::read(f, lba, f.metadata().unwrap().len()).ok();
        classify(&head_of(f), g.as_ref())
    }

    fn verify(path: &Path) -> String {
        let out = kiln_testkit::command("sgdisk")
            .arg("-v")
            .arg(path)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn layout_geometry() {
        let l = Layout::new(1 << 30, 512, DISK_GUID, PART_GUID).unwrap();
        assert_eq!(
            (l.first_usable(), l.first_lba(), l.last_usable()),
            (34, 2048, (1 << 21) - 34)
        );
        assert_eq!(l.part_offset(), 1 << 20);
        assert_eq!(l.part_bytes(), ((1 << 21) - 34 + 1 - 2048) * 512);
        let l = Layout::new(1 << 30, 4096, DISK_GUID, PART_GUID).unwrap();
        assert_eq!(
            (l.first_usable(), l.first_lba(), l.last_usable()),
            (6, 256, (1 << 18) - 6)
        );
        assert!(Layout::new(32 << 20, 512, DISK_GUID, PART_GUID)
            .unwrap_err()
            .contains("too small"));
        assert!(Layout::new(1 << 30, 520, DISK_GUID, PART_GUID)
            .unwrap_err()
            .contains("block size"));
        let w = Layout::new(1 << 30, 512, DISK_GUID, PART_GUID)
            .unwrap()
            .writes();
        // Backup first; the primary (with the protective MBR) last, in one write.
        assert_eq!(
            w.iter().map(|(o, b)| (*o, b.len())).collect::<Vec<_>>(),
            [
                (((1 << 21) - 33) * 512, 16384),
                (((1 << 21) - 1) * 512, 512),
                (0, 34 * 512)
            ]
        );
    }

    #[test]
    fn gpt_passes_sgdisk_and_reads_back() {
        if kiln_testkit::checker("sgdisk", "gdisk").is_none() {
            return;
        }
        let d = tempdir("vardisk-gpt");
        let path = d.join("disk.img");
        let f = image(&path, 256 << 20);
        let l = Layout::new(256 << 20, 512, DISK_GUID, PART_GUID).unwrap();
        grow::apply(&f, &l.writes()).unwrap();
        let v = verify(&path);
        assert!(v.contains("No problems found"), "sgdisk -v: {v}");
        let info = sgdisk(&["-i", "1"], &path);
        assert!(
            info.contains("0FC63DAF-8483-4772-8E79-3D69D8477DE4"),
            "{info}"
        );
        assert!(
            info.contains("A0A1A2A3-B0B1-4CC1-8DD1-E0E1E2E3E4E5"),
            "{info}"
        );
        assert!(info.contains("First sector: 2048 "), "{info}");
        assert!(
            info.contains(&format!("Last sector: {} ", (256u64 << 11) - 34)),
            "{info}"
        );
        assert!(info.contains("'kiln-var'"), "{info}");
        let p = sgdisk(&["-p"], &path);
        assert!(p.contains("11223344-5566-4788-99AA-BBCCDDEEFF00"), "{p}");

        // kiln-init's own reader, from the primary and from the backup.
        let g = Gpt::read(&f, 512, 256 << 20).unwrap();
        assert!(!g.from_backup);
        let parts = g.partitions();
        assert_eq!(parts.len(), 1);
        assert_eq!(
            (
                parts[0].number,
                parts[0].name.as_str(),
                parts[0].type_guid,
                parts[0].uuid
            ),
            (1, PART_NAME, LINUX_DATA, PART_GUID)
        );
        assert_eq!(
            (parts[0].first_lba, parts[0].last_lba),
            (2048, l.last_usable())
        );
        assert_eq!(g.header.last_usable, l.last_usable());
        assert_eq!(found(&f, 512), Found::Prepared);
        f.write_all_at(b"XXXX", 512).unwrap();
        let b = Gpt::read(&f, 512, 256 << 20).unwrap();
        assert!(b.from_backup);
        assert_eq!(b.partitions(), parts);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn grows_with_the_disk() {
        if kiln_testkit::checker("sgdisk", "gdisk").is_none() {
            return;
        }
        let d = tempdir("vardisk-grow");
        let path = d.join("disk.img");
        let f = image(&path, 128 << 20);
        grow::apply(
            &f,
            &Layout::new(128 << 20, 512, DISK_GUID, PART_GUID)
                .unwrap()
                .writes(),
        )
        .unwrap();
        assert_eq!(
            grow::grow_gpt(&f, 512, 128 << 20, PART_NAME).unwrap(),
            None,
            "already at the end"
        );
        f.set_len(512 << 20).unwrap();
        let plan = grow::grow_gpt(&f, 512, 512 << 20, PART_NAME)
            .unwrap()
            .unwrap();
        assert_eq!((plan.first_lba, plan.new_last), (2048, (512 << 11) - 34));
        let v = verify(&path);
        assert!(v.contains("No problems found"), "sgdisk -v: {v}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn gpt_on_4k_sectors_reads_back() {
        let d = tempdir("vardisk-4k");
        let f = image(&d.join("disk.img"), 128 << 20);
        let l = Layout::new(128 << 20, 4096, DISK_GUID, PART_GUID).unwrap();
        grow::apply(&f, &l.writes()).unwrap();
        let g = Gpt::read(&f, 4096, 128 << 20).unwrap();
        let p = g.by_name(PART_NAME).unwrap();
        assert_eq!((p.first_lba, p.last_lba), (256, (128 << 8) - 6));
        let mut mbr = [0u8; 512];
        f.read_exact_at(&mut mbr, 0).unwrap();
        assert_eq!((mbr[450], &mbr[510..512]), (0xEE, &[0x55, 0xAA][..]));
        assert_eq!(
            u32::from_le_bytes([mbr[458], mbr[459], mbr[460], mbr[461]]),
            (128 << 8) - 1
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn blank_interrupted_and_prepared() {
        let d = tempdir("vardisk-classify");
        let f = image(&d.join("disk.img"), 128 << 20);
        assert_eq!(found(&f, 512), Found::Blank);
        // Leftovers past the first MiB (an old filesystem's tail) do not count.
        f.write_all_at(b"old data", 5 << 20).unwrap();
        assert_eq!(found(&f, 512), Found::Blank);
        // Power cut after the backup table: prepared again.
        let w = Layout::new(128 << 20, 512, DISK_GUID, PART_GUID)
            .unwrap()
            .writes();
        grow::apply(&f, &w[..2]).unwrap();
        assert_eq!(found(&f, 512), Found::Interrupted);
        grow::apply(&f, &w[2..]).unwrap();
        assert_eq!(found(&f, 512), Found::Prepared);
        // A smaller-than-a-MiB head is all there is to look at.
        assert_eq!(classify(&[0u8; 4096], None), Found::Blank);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn refuses_what_it_did_not_make() {
        let other = |head: &[u8]| match classify(head, None) {
            Found::Other(s) => s,
            f => panic!("{f:?}"),
        };
        let mut h = vec![0u8; HEAD as usize];
        h[300_000] = 1;
        assert!(other(&h).contains("data at byte 300000"), "{}", other(&h));
        let put = |off: usize, magic: &[u8]| {
            let mut h = vec![0u8; HEAD as usize];
            h[off..off + magic.len()].copy_from_slice(magic);
            h
        };
        assert!(other(&put(0, b"XFSB")).contains("XFS"));
        assert!(other(&put(0x10040, b"_BHRfS_M")).contains("btrfs"));
        assert!(other(&put(0x8001, b"CD001")).contains("ISO 9660"));
        assert!(other(&put(0, b"LUKS\xba\xbe")).contains("LUKS"));
        assert!(other(&put(512, b"LABELONE")).contains("LVM"));
        assert!(other(&put(4086, b"SWAPSPACE2")).contains("swap"));
        let mut ext = put(1024 + 0x38, &[0x53, 0xEF]);
        ext[1024 + 0x78..1024 + 0x7d].copy_from_slice(b"hello");
        assert!(
            other(&ext).contains("ext2/3/4 filesystem labelled \"hello\""),
            "{}",
            other(&ext)
        );
        let mut mbr = put(510, &[0x55, 0xAA]);
        mbr[446 + 4] = 0x83;
        assert!(
            other(&mbr).contains("MBR partition table (1 partitions)"),
            "{}",
            other(&mbr)
        );
        let mut fat = put(510, &[0x55, 0xAA]);
        fat[82..87].copy_from_slice(b"FAT32");
        assert_eq!(other(&fat), "a FAT filesystem");
    }

    #[test]
    fn refuses_a_foreign_gpt() {
        if kiln_testkit::checker("sgdisk", "gdisk").is_none() {
            return;
        }
        let d = tempdir("vardisk-foreign");
        let path = d.join("disk.img");
        kiln_disk(&path, 64);
        let f = File::open(&path).unwrap();
        match found(&f, 512) {
            Found::Other(s) => assert!(
                s.starts_with("a GPT with partitions 1 \"esp\", 2 \"root-a\"")
                    && !s.contains("MBR"),
                "{s}"
            ),
            x => panic!("{x:?}"),
        }
        // Only the backup left (the start zeroed): still refused.
        let w = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        w.write_all_at(&vec![0u8; HEAD as usize], 0).unwrap();
        match found(&f, 512) {
            Found::Other(s) => assert!(
                s.contains("a backup GPT with partitions") && s.contains("nothing at its start"),
                "{s}"
            ),
            x => panic!("{x:?}"),
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn refuses_a_filesystem_from_mkfs() {
        if kiln_testkit::checker("mkfs.ext4", "e2fsprogs").is_none() {
            return;
        }
        let d = tempdir("vardisk-mkfs");
        let path = d.join("disk.img");
        drop(image(&path, 64 << 20));
        let out = kiln_testkit::command("mkfs.ext4")
            .args(["-q", "-F", "-L", "backups"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            found(&File::open(&path).unwrap(), 512),
            Found::Other("an ext2/3/4 filesystem labelled \"backups\"".into())
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn writes_the_filesystem_then_the_gpt() {
        if kiln_testkit::checker("sgdisk", "gdisk").is_none()
            || kiln_testkit::checker("mkfs.ext4", "e2fsprogs").is_none()
        {
            return;
        }
        let d = tempdir("vardisk-write");
        let tpath = d.join("var.ext4");
        drop(image(&tpath, 32 << 20));
        let out = kiln_testkit::command("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-L", PART_NAME])
            .arg(&tpath)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let template = File::open(&tpath).unwrap();
        let path = d.join("disk.img");
        let f = image(&path, 256 << 20);
        // Garbage where the partition goes must not matter.
        f.write_all_at(&[0xAB; 8192], 1 << 20).unwrap();
        let l = Layout::new(256 << 20, 512, DISK_GUID, PART_GUID).unwrap();
        write_disk(&f, &l, &template).unwrap();
        assert!(verify(&path).contains("No problems found"));
        let mut sb = vec![0u8; 1024];
        f.read_exact_at(&mut sb, l.part_offset() + 1024).unwrap();
        let sb = Ext4Super::parse(&sb).unwrap();
        assert_eq!((sb.label.as_str(), sb.bytes()), (PART_NAME, 32 << 20));
        assert_eq!(found(&f, 512), Found::Prepared);

        // A disk whose partition cannot hold the template is refused before
        // anything is written.
        let small = image(&d.join("small.img"), 64 << 20);
        let big = image(&d.join("big.ext4"), 70 << 20);
        let out = kiln_testkit::command("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(d.join("big.ext4"))
            .output()
            .unwrap();
        assert!(out.status.success());
        let e = write_disk(
            &small,
            &Layout::new(64 << 20, 512, DISK_GUID, PART_GUID).unwrap(),
            &big,
        )
        .unwrap_err();
        assert!(e.contains("too small"), "{e}");
        assert_eq!(found(&small, 512), Found::Blank);
        let _ = std::fs::remove_dir_all(&d);
    }

    proptest::proptest! {
        #[test]
        fn classify_never_panics(bytes in proptest::collection::vec(0u8..=255, 0..70_000)) {
            let _ = classify(&bytes, None);
        }
    }
}
