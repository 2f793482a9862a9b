//! The `KILNCFG` config source: any block device (a whole disk or a
//! partition: a USB stick, a second virtual disk, a CD) whose filesystem is
//! labelled `KILNCFG` and holds `/node.toml`, like cloud-init's NoCloud
//! `cidata` volume.
//!
//! The label is read from the superblock bytes (FAT12/16/32 boot sector and
//! root-directory label, ISO 9660 primary volume descriptor, ext2/3/4
//! superblock); the node has no blkid or udev. A volume that matches is
//! mounted read-only on a temporary directory just long enough to read the
//! two files.

use super::grow::Ext4Super;
use super::{console, sys};
use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The label, compared without regard to case (FAT tools upper-case it).
pub const LABEL: &str = "KILNCFG";
/// The files read from the volume's root.
pub const FILE: &str = "node.toml";
pub const SIG_FILE: &str = "node.toml.minisig";
/// Where a volume is mounted while it is read.
const MOUNT_AT: &str = "/run/kiln/kilncfg";
/// A node.toml larger than this is refused (as for a URL).
const MAX_BYTES: u64 = 1 << 20;
/// How long to wait at boot for USB mass storage still being set up.
const USB_SETTLE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fs {
    Fat,
    Iso9660,
    Ext,
}

impl Fs {
    pub fn mount_type(self) -> &'static str {
        match self {
            Fs::Fat => "vfat",
            Fs::Iso9660 => "iso9660",
            Fs::Ext => "ext4",
        }
    }
}

/// What a device holds: its filesystem and label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub fs: Fs,
    pub label: String,
}

impl Probe {
    pub fn is_kilncfg(&self) -> bool {
        self.label.trim().eq_ignore_ascii_case(LABEL)
    }
}

/// Reads the filesystem label through `read(offset, buf)` (which fills buf
/// or fails). None when no FAT, ISO 9660 or ext2/3/4 filesystem is there.
pub fn probe(read: &dyn Fn(u64, &mut [u8]) -> std::io::Result<()>) -> Option<Probe> {
    let mut head = vec![0u8; 2048];
    read(0, &mut head).ok()?;
    if let Some(label) = fat_label(&head, read) {
        return Some(Probe { fs: Fs::Fat, label });
    }
    if let Some(sb) = Ext4Super::parse(&head[1024..2048]) {
        return Some(Probe { fs: Fs::Ext, label: sb.label });
    }
    iso_label(read).map(|label| Probe { fs: Fs::Iso9660, label })
}

fn u16_at(b: &[u8], o: usize) -> u64 {
    u16::from_le_bytes([b[o], b[o + 1]]) as u64
}

fn u32_at(b: &[u8], o: usize) -> u64 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) as u64
}

/// An 11-byte FAT label, without its space padding.
fn fat_name(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim_end_matches([' ', '\0']).to_string()
}

/// The label of a FAT boot sector: the root directory's volume-label entry
/// when there is one (what Windows and mlabel change, and what blkid
/// reports), else the boot sector's copy unless it is `NO NAME`.
fn fat_label(bs: &[u8], read: &dyn Fn(u64, &mut [u8]) -> std::io::Result<()>) -> Option<String> {
    if bs[510..512] != [0x55, 0xAA] {
        return None;
    }
    let bps = u16_at(bs, 11);
    let spc = bs[13] as u64;
    let reserved = u16_at(bs, 14);
    let fats = bs[16] as u64;
    let root_entries = u16_at(bs, 17);
    let fat16_size = u16_at(bs, 22);
    if !matches!(bps, 512 | 1024 | 2048 | 4096) || !spc.is_power_of_two() || reserved == 0 || fats == 0 {
        return None;
    }
    let fat32 = fat16_size == 0;
    let (sig_at, label_at, type_at) = if fat32 { (66, 71, 82) } else { (38, 43, 54) };
    if &bs[type_at..type_at + 3] != b"FAT" {
        return None;
    }
    let boot_label = matches!(bs[sig_at], 0x28 | 0x29).then(|| fat_name(&bs[label_at..label_at + 11])).filter(|l| l != "NO NAME");
    // The root directory: a fixed area on FAT12/16, the first cluster of its
    // chain on FAT32 (the label entry comes first in practice).
    let (offset, len) = if fat32 {
        let fat_size = u32_at(bs, 36);
        let root_cluster = u32_at(bs, 44).max(2);
        let data = reserved + fats * fat_size;
        ((data + (root_cluster - 2) * spc) * bps, spc * bps)
    } else {
        ((reserved + fats * fat16_size) * bps, root_entries * 32)
    };
    let mut dir = vec![0u8; len.min(64 * 1024) as usize];
    let dir_label = read(offset, &mut dir).ok().and_then(|()| {
        for e in dir.chunks_exact(32) {
            match e[0] {
                0x00 => break,
                0xE5 => continue,
                _ => {}
            }
            let attr = e[11];
            if attr != 0x0F && attr & 0x08 != 0 && attr & 0x10 == 0 {
                return Some(fat_name(&e[0..11]));
            }
        }
        None
    });
    Some(dir_label.or(boot_label).unwrap_or_default())
}

/// The volume id of the primary volume descriptor (the set starts at
/// sector 16 of 2048 bytes and ends with a terminator, type 255).
fn iso_label(read: &dyn Fn(u64, &mut [u8]) -> std::io::Result<()>) -> Option<String> {
    let mut vd = vec![0u8; 2048];
    for sector in 16..32u64 {
        read(sector * 2048, &mut vd).ok()?;
        if &vd[1..6] != b"CD001" {
            return None;
        }
        match vd[0] {
            1 => return Some(String::from_utf8_lossy(&vd[40..72]).trim_end_matches([' ', '\0']).to_string()),
            255 => return None,
            _ => {}
        }
    }
    None
}

// ---- on the node ----------------------------------------------------------------

/// A KILNCFG volume's files.
pub struct Volume {
    /// `/dev/sdb1`.
    pub dev: String,
    pub bytes: Vec<u8>,
    /// The signature text, or why there is none.
    pub sig: Result<String, String>,
}

/// Block devices that can never be a KILNCFG volume.
fn skipped(name: &str) -> bool {
    ["loop", "ram", "zram", "dm-", "nbd"].iter().any(|p| name.starts_with(p))
}

/// The block devices with media, in name order.
fn block_devices() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/block")
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.retain(|n| !skipped(n) && std::fs::read_to_string(format!("/sys/class/block/{n}/size")).is_ok_and(|s| s.trim() != "0"));
    names.sort();
    names
}

/// Devices (`/dev/…`) whose filesystem label is `label` (any case), in name
/// order, with their filesystem.
pub fn labelled(label: &str) -> Vec<(String, Fs)> {
    block_devices()
        .into_iter()
        .filter_map(|n| {
            let dev = format!("/dev/{n}");
            probe_device(&dev).filter(|p| p.label.trim().eq_ignore_ascii_case(label)).map(|p| (dev, p.fs))
        })
        .collect()
}

fn probe_device(dev: &str) -> Option<Probe> {
    let f = File::open(dev).ok()?;
    probe(&|off, buf| f.read_exact_at(buf, off))
}

/// Notes printed once per boot (maintenance polls every few seconds).
fn once(note: String) {
    static SEEN: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    if SEEN.lock().is_ok_and(|mut s| s.insert(note.clone())) {
        console::warn(&note);
    }
}

/// The first KILNCFG volume (by kernel name) that holds node.toml.
pub fn find() -> Option<Volume> {
    let found: Vec<(String, Probe)> = block_devices()
        .into_iter()
        .filter_map(|n| {
            let dev = format!("/dev/{n}");
            probe_device(&dev).filter(Probe::is_kilncfg).map(|p| (dev, p))
        })
        .collect();
    let mut chosen: Option<Volume> = None;
    for (dev, p) in &found {
        if chosen.is_some() {
            once(format!("{LABEL} volume {dev} is ignored: {} comes first (one {LABEL} volume at a time)", chosen.as_ref().map(|v| v.dev.as_str()).unwrap_or("")));
            continue;
        }
        match read_volume(dev, p.fs) {
            Ok(Some((bytes, sig))) => chosen = Some(Volume { dev: dev.clone(), bytes, sig }),
            Ok(None) => once(format!("{LABEL} volume {dev} has no /{FILE}; it is not a config source")),
            Err(e) => once(format!("{LABEL} volume {dev}: {e}")),
        }
    }
    chosen
}

type Files = (Vec<u8>, Result<String, String>);

/// Mounts `dev` read-only, reads node.toml and its signature, unmounts.
/// Ok(None) when the volume has no node.toml.
fn read_volume(dev: &str, fs: Fs) -> Result<Option<Files>, String> {
    sys::mkdir_p(MOUNT_AT).map_err(|e| e.to_string())?;
    if sys::is_mountpoint(MOUNT_AT) {
        // Left over from an interrupted read.
        let _ = sys::umount(MOUNT_AT, libc::MNT_DETACH);
    }
    let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // A distro kernel has the filesystem and its NLS tables as modules.
    super::kmod::load_for_fs(fs.mount_type());
    sys::mount(dev, MOUNT_AT, fs.mount_type(), flags, None).map_err(|e| format!("mounting it ({}) read-only: {e}", fs.mount_type()))?;
    let dir = Path::new(MOUNT_AT);
    let read = || -> Result<Option<Files>, String> {
        let path = dir.join(FILE);
        let meta = match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("/{FILE}: {e}")),
            Ok(m) => m,
        };
        if meta.len() > MAX_BYTES {
            return Err(format!("/{FILE} is {} bytes; a node config is at most {MAX_BYTES}", meta.len()));
        }
        let bytes = std::fs::read(&path).map_err(|e| format!("/{FILE}: {e}"))?;
        let sig = std::fs::read_to_string(dir.join(SIG_FILE)).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                format!("there is no {SIG_FILE} on the {LABEL} volume {dev}; {} and copy {SIG_FILE} beside {FILE} on the volume", kiln_contract::config::SIGN_HOW)
            } else {
                format!("reading {SIG_FILE} on {dev}: {e}")
            }
        });
        Ok(Some((bytes, sig)))
    };
    let out = read();
    if sys::umount(MOUNT_AT, 0).is_err() {
        let _ = sys::umount(MOUNT_AT, libc::MNT_DETACH);
    }
    out
}

/// USB mass-storage interfaces bound to a driver but without a disk yet.
fn usb_storage_pending() -> Vec<String> {
    let mut disks: Vec<std::path::PathBuf> = Vec::new();
    for n in std::fs::read_dir("/sys/block").map(|rd| rd.flatten().map(|e| e.path()).collect::<Vec<_>>()).unwrap_or_default() {
        if let Ok(p) = std::fs::canonicalize(&n) {
            disks.push(p);
        }
    }
    let mut pending = Vec::new();
    for driver in ["usb-storage", "uas"] {
        let Ok(rd) = std::fs::read_dir(format!("/sys/bus/usb/drivers/{driver}")) else { continue };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // Interfaces are named like 1-1:1.0; the rest are driver knobs.
            if !name.contains(':') {
                continue;
            }
            let Ok(intf) = std::fs::canonicalize(e.path()) else { continue };
            if !disks.iter().any(|d| d.starts_with(&intf)) {
                pending.push(name);
            }
        }
    }
    pending
}

/// At boot, waits (up to 10 s) for USB sticks the kernel is still setting
/// up, so a KILNCFG stick present at power-on is not missed in favour of a
/// config on the ESP or in the image. Returns at once without USB storage.
pub fn settle() {
    let deadline = Instant::now() + USB_SETTLE;
    let mut said = false;
    loop {
        let pending = usb_storage_pending();
        if pending.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            console::warn(&format!("USB storage {} has no disk after {} s; not waiting for it ({LABEL} volumes there are picked up when the node waits for a config)", pending.join(", "), USB_SETTLE.as_secs()));
            return;
        }
        if !said {
            console::info(&format!("waiting for USB storage {} (a {LABEL} volume?)", pending.join(", ")));
            said = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn from_bytes(img: &[u8]) -> Option<Probe> {
        probe(&|off, buf| {
            let off = off as usize;
            let src = img.get(off..off + buf.len()).ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
            buf.copy_from_slice(src);
            Ok(())
        })
    }

    fn from_file(p: &Path) -> Option<Probe> {
        probe_device(p.to_str().unwrap())
    }

    fn run(cmd: &mut Command) {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn image(dir: &Path, name: &str, mib: u64) -> std::path::PathBuf {
        let p = dir.join(name);
        File::create(&p).unwrap().set_len(mib << 20).unwrap();
        p
    }

    #[test]
    fn fat_labels_from_mkfs_vfat() {
        if kiln_testkit::checker("mkfs.vfat", "dosfstools").is_none() {
            return;
        }
        let dir = tempfile_dir("fat");
        for (bits, mib) in [("12", 2), ("16", 20), ("32", 40)] {
            let img = image(&dir, &format!("fat{bits}.img"), mib);
            run(kiln_testkit::command("mkfs.vfat").args(["-F", bits, "-n", "KILNCFG"]).arg(&img));
            let p = from_file(&img).unwrap_or_else(|| panic!("FAT{bits} not recognised"));
            assert_eq!(p, Probe { fs: Fs::Fat, label: "KILNCFG".into() }, "FAT{bits}");
            assert!(p.is_kilncfg());
        }
        // No label at all.
        let img = image(&dir, "nolabel.img", 2);
        run(kiln_testkit::command("mkfs.vfat").arg(&img));
        let p = from_file(&img).unwrap();
        assert_eq!(p.fs, Fs::Fat);
        assert!(!p.is_kilncfg(), "{p:?}");
    }

    #[test]
    fn the_root_directory_label_wins_over_the_boot_sector() {
        if kiln_testkit::checker("mkfs.vfat", "dosfstools").is_none()
            || kiln_testkit::checker("mlabel", "mtools").is_none()
        {
            return;
        }
        let dir = tempfile_dir("relabel");
        for bits in ["16", "32"] {
            let img = image(&dir, &format!("r{bits}.img"), 40);
            run(kiln_testkit::command("mkfs.vfat").args(["-F", bits, "-n", "OTHER"]).arg(&img));
            // What Windows does on a rename: the directory entry only. mlabel
            // writes both, so put the old name back into the boot sector.
            run(kiln_testkit::command("mlabel").env("MTOOLS_SKIP_CHECK", "1").arg("-i").arg(&img).arg("::kilncfg"));
            let mut b = std::fs::read(&img).unwrap();
            let at = if bits == "32" { 71 } else { 43 };
            b[at..at + 11].copy_from_slice(b"OTHER      ");
            std::fs::write(&img, &b).unwrap();
            let p = from_file(&img).unwrap();
            assert!(p.is_kilncfg(), "FAT{bits}: {p:?}");
        }
    }

    #[test]
    fn iso_and_ext4_labels() {
        let dir = tempfile_dir("iso-ext");
        if kiln_testkit::checker("xorriso", "xorriso").is_some() {
            let tree = dir.join("tree");
            std::fs::create_dir_all(&tree).unwrap();
            std::fs::write(tree.join("node.toml"), "role = \"single\"\n").unwrap();
            let iso = dir.join("cfg.iso");
            run(kiln_testkit::command("xorriso").args(["-as", "mkisofs", "-quiet", "-V", "KILNCFG", "-J", "-R", "-o"]).arg(&iso).arg(&tree));
            assert_eq!(from_file(&iso), Some(Probe { fs: Fs::Iso9660, label: "KILNCFG".into() }));
        }
        if kiln_testkit::checker("mkfs.ext4", "e2fsprogs").is_some() {
            let img = image(&dir, "ext4.img", 8);
            run(kiln_testkit::command("mkfs.ext4").args(["-q", "-F", "-L", "kilncfg"]).arg(&img));
            let p = from_file(&img).unwrap();
            assert_eq!(p, Probe { fs: Fs::Ext, label: "kilncfg".into() });
            assert!(p.is_kilncfg(), "the label is compared without case");
        }
    }

    #[test]
    fn other_content_is_not_a_volume() {
        assert_eq!(from_bytes(&[0u8; 64 * 1024]), None);
        // An MBR partition table: boot signature, no FAT boot sector.
        let mut mbr = vec![0u8; 64 * 1024];
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        mbr[446 + 4] = 0x0c;
        assert_eq!(from_bytes(&mbr), None);
        // Too short to hold anything.
        assert_eq!(from_bytes(&[0u8; 100]), None);
        // A FAT boot sector with an impossible geometry.
        let mut bad = vec![0u8; 64 * 1024];
        bad[510] = 0x55;
        bad[511] = 0xAA;
        bad[54..57].copy_from_slice(b"FAT");
        bad[11..13].copy_from_slice(&300u16.to_le_bytes());
        assert_eq!(from_bytes(&bad), None);
    }

    proptest::proptest! {
        #[test]
        fn probing_garbage_never_panics(head in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096), fat in proptest::prelude::any::<bool>()) {
            let mut img = head;
            if fat && img.len() >= 512 {
                img[510] = 0x55;
                img[511] = 0xAA;
                img[54..57].copy_from_slice(b"FAT");
            }
            img.resize(40 * 1024, 0xAB);
            let _ = from_bytes(&img);
        }
    }

    fn tempfile_dir(tag: &str) -> crate::node::gpt::tests::Scratch {
        crate::node::gpt::tests::tempdir(&format!("volume-{tag}"))
    }
}
