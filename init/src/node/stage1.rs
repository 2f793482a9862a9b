//! Stage 1, from the initramfs: find the root partitions by the root hash on
//! the kernel cmdline, set up dm-verity, read every block once, mount the
//! squashfs with /etc on a tmpfs and /var on the data partition (grown on
//! first boot), mount the ESP at /boot, then switch_root and exec stage 2.
//!
//! Every failure is a console error plus an event, then maintenance: never a
//! hang without a word, never a boot on an unverified root.

use crate::cmdline::{has_roothash, parse_cmdline, Cmdline, MbrRoot, OnCorruption};
use super::gpt::mbr_signature;
use super::install::MEDIUM_FILE;
use kiln_contract::layout::{INSTALL_PART, MBR_BOOT, MBR_DATA, RAM_ROOT, RAM_ROOT_SIZES, RAM_VERITY};
use super::gpt::{self, Gpt, Guid};
use super::grow::{self, Ext4Super};
use super::{coldplug, console, kmod, ramroot, sys, update};
use crate::dm;
use kiln_contract::layout::Slot;
use kiln_contract::verity::VeritySuperblock;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const SYSROOT: &str = "/sysroot";
/// The dm device's name.
pub const DM_NAME: &str = "root";
/// How long to wait for the root partitions to appear.
const WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(150);
/// The argument stage 1 passes to the root's init.
pub const STAGE2_ARG: &str = "--stage2";
/// Read size of the eager verification.
const VERIFY_CHUNK: usize = 1 << 20;
/// Where /etc is seeded before it is moved onto the new root.
const ETC_STAGING: &str = "/run/kiln/etc";

/// Directories under the read-only root that k0s and CNI plugins write,
/// bound from /var.
pub const WRITABLE_BINDS: &[(&str, &str)] = &[("/var/lib/kiln/cni-bin", "/opt/cni/bin"), ("/var/lib/kiln/kubelet-plugins", "/usr/libexec/k0s/kubelet-plugins")];

const RAMFS_MAGIC: u32 = 0x8584_58f6;
const TMPFS_MAGIC: u32 = 0x0102_1994;

// ---- block devices ----------------------------------------------------------

/// A partition as the kernel registered it.
#[derive(Clone, Debug)]
pub struct Part {
    pub sysname: String,
    pub number: u32,
    pub dev: (u32, u32),
    pub bytes: u64,
}

impl Part {
    pub fn node(&self) -> String {
        format!("/dev/{}", self.sysname)
    }
}

/// A whole disk, its partitions and its GPT as read now.
#[derive(Debug)]
pub struct Disk {
    pub sysname: String,
    pub dev: (u32, u32),
    pub lba_size: u64,
    pub bytes: u64,
    pub parts: Vec<Part>,
    pub gpt: Result<Gpt, String>,
}

impl Disk {
    pub fn node(&self) -> String {
        format!("/dev/{}", self.sysname)
    }

    /// The kernel partition for GPT entry `number`.
    pub fn part(&self, number: u32) -> Option<&Part> {
        self.parts.iter().find(|p| p.number == number)
    }

    fn describe(&self) -> String {
        let table = match &self.gpt {
            Err(e) => e.clone(),
            Ok(g) => {
                let parts: Vec<String> = g.partitions().iter().map(|p| format!("{} {:?} partuuid={}", p.number, p.name, p.uuid)).collect();
                format!("GPT: {}", if parts.is_empty() { "empty".into() } else { parts.join(", ") })
            }
        };
        format!("{} ({} bytes; {table})", self.sysname, self.bytes)
    }
}

fn read_trim(p: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

fn parse_devno(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn devname(sysdir: &Path, fallback: &str) -> String {
    read_trim(sysdir.join("uevent")).and_then(|u| u.lines().find_map(|l| l.strip_prefix("DEVNAME=").map(str::to_string))).unwrap_or_else(|| fallback.to_string())
}

/// The disks the kernel knows now, with their GPTs.
pub fn scan_disks() -> Vec<Disk> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/sys/block") else { return out };
    let mut names: Vec<String> = rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    for name in names {
        if ["loop", "ram", "zram", "dm-", "fd", "nbd"].iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let dir = Path::new("/sys/block").join(&name);
        let sectors: u64 = read_trim(dir.join("size")).and_then(|s| s.parse().ok()).unwrap_or(0);
        if sectors == 0 {
            continue;
        }
        let lba_size: u64 = read_trim(dir.join("queue/logical_block_size")).and_then(|s| s.parse().ok()).filter(|s: &u64| s.is_power_of_two() && *s >= 512).unwrap_or(512);
        let sysname = devname(&dir, &name);
        let Some(dev) = read_trim(dir.join("dev")).and_then(|s| parse_devno(&s)) else { continue };
        let mut parts = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let pdir = e.path();
                let Some(number) = read_trim(pdir.join("partition")).and_then(|s| s.parse().ok()) else { continue };
                let Some(dev) = read_trim(pdir.join("dev")).and_then(|s| parse_devno(&s)) else { continue };
                let psize: u64 = read_trim(pdir.join("size")).and_then(|s| s.parse().ok()).unwrap_or(0);
                let pname = e.file_name().to_string_lossy().into_owned();
                parts.push(Part { sysname: devname(&pdir, &pname), number, dev, bytes: psize * 512 });
            }
        }
        parts.sort_by_key(|p| p.number);
        let bytes = sectors * 512;
        // An isohybrid ISO's GPT uses 512-byte LBAs even on a CD's 2048-byte
        // sectors.
        let gpt = match File::open(ensure_node(&sysname, dev)) {
            Ok(f) => Gpt::read(&f, lba_size, bytes).or_else(|e| if lba_size != 512 { Gpt::read(&f, 512, bytes) } else { Err(e) }).map_err(|e| e.to_string()),
            Err(e) => Err(format!("/dev/{sysname}: {e}")),
        };
        out.push(Disk { sysname, dev, lba_size, bytes, parts, gpt });
    }
    out
}

/// A block device stage 1 reads: a partition the kernel registered, a
/// dm-linear map of a GPT entry it did not (a CD), or a loop device over a
/// file in the initramfs (PXE, or a root copied into RAM).
#[derive(Clone, Debug)]
pub struct Blk {
    pub node: String,
    pub dev: (u32, u32),
    pub bytes: u64,
}

/// Where the root came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Medium {
    /// An installed disk: A/B slots and a data partition.
    Disk,
    /// A kiln ISO, as a CD or a USB stick: no data partition.
    Iso,
    /// The squashfs inside the initramfs (PXE).
    Initramfs,
}

impl Medium {
    pub fn as_str(self) -> &'static str {
        match self {
            Medium::Disk => "disk",
            Medium::Iso => "iso",
            Medium::Initramfs => "initramfs",
        }
    }
}


/// The verified root's two devices, and the disk they are on (none for PXE).
pub struct Root {
    pub medium: Medium,
    pub disk: Option<Disk>,
    pub data: Blk,
    pub hash: Blk,
}

/// The disk whose GPT holds both root entries, and the two entries.
fn find_root(disks: Vec<Disk>, data_uuid: Guid, hash_uuid: Guid) -> Result<(Disk, gpt::Partition, gpt::Partition), Vec<Disk>> {
    let mut rest = Vec::new();
    for disk in disks {
        let hit = disk.gpt.as_ref().ok().and_then(|g| {
            let ps = g.partitions();
            let d = ps.iter().find(|p| p.uuid == data_uuid)?.clone();
            let h = ps.iter().find(|p| p.uuid == hash_uuid)?.clone();
            Some((d, h))
        });
        match hit {
            Some((d, h)) => return Ok((disk, d, h)),
            None => rest.push(disk),
        }
    }
    Err(rest)
}

/// The disk whose MBR has `m`'s signature, and its partition.
fn find_mbr_root(disks: Vec<Disk>, m: MbrRoot) -> Result<(Disk, Part), Vec<Disk>> {
    let mut rest = Vec::new();
    for disk in disks {
        let sig = disk_mbr_signature(&disk);
        match disk.part(m.partition).filter(|_| sig == Some(m.signature)).cloned() {
            Some(p) => return Ok((disk, p)),
            None => rest.push(disk),
        }
    }
    Err(rest)
}


/// The MBR disk signature of `disk`, when it has an MBR and no GPT.
fn disk_mbr_signature(disk: &Disk) -> Option<u32> {
    let mut sector = [0u8; 512];
    File::open(ensure_node(&disk.sysname, disk.dev)).and_then(|f| f.read_exact_at(&mut sector, 0)).ok().and_then(|_| mbr_signature(&sector))
}

/// The root slot on an MBR card: the partition, and a read-only loop
/// device over its verity tree.
fn mbr_root(disk: Disk, p: &Part, m: MbrRoot, start: Instant) -> Result<Root, Fail> {
    let node = ensure_node(&p.sysname, p.dev);
    if m.hash_offset >= p.bytes {
        return Err(Fail::root(format!("kiln.mbr: the verity tree is {} bytes into {node}, which has only {}: a truncated or different image", m.hash_offset, p.bytes)));
    }
    let hash = loop_device_at(&node, m.hash_offset, p.bytes - m.hash_offset).map_err(|e| Fail::root(format!("kiln.mbr: the verity tree on {node}: {e}")))?;
    console::info(&format!("root found on {} (MBR {:08x}) after {:.1} s: data {node}, hash {} at byte {}", disk.sysname, m.signature, start.elapsed().as_secs_f64(), hash.node, m.hash_offset));
    let data = Blk { node, dev: p.dev, bytes: m.hash_offset };
    Ok(Root { medium: Medium::Disk, disk: Some(disk), data, hash })
}

/// The block device for GPT entry `e` of `disk`: the kernel's partition, or
/// a read-only loop device over its bytes when the kernel registered none
/// (a CD: no partition scanning, 2048-byte sectors; the loop device has
/// 512-byte sectors, which the ESP's FAT needs).
pub fn entry_blk(disk: &Disk, e: &gpt::Partition) -> Result<Blk, String> {
    if let Some(p) = disk.part(e.number) {
        return Ok(Blk { node: ensure_node(&p.sysname, p.dev), dev: p.dev, bytes: p.bytes });
    }
    let lba = disk.gpt.as_ref().map(|g| g.lba_size).unwrap_or(512);
    let (start, bytes) = (e.first_lba * lba, (e.last_lba + 1 - e.first_lba) * lba);
    if start + bytes > disk.bytes {
        return Err(format!("GPT entry {:?} on {} ends past the device's end ({} bytes): a truncated image", e.name, disk.node(), disk.bytes));
    }
    loop_device_at(&disk.node(), start, bytes).map_err(|err| format!("GPT entry {:?} on {}: {err}", e.name, disk.node()))
}

/// Creates and resumes device-mapper device `name` with one target.
fn dm_create(name: &str, flags: u32, t: dm::Target) -> Result<(u32, u32), dm::DmError> {
    let ctl = dm::Control::open()?;
    ctl.create(name)?;
    match ctl.load(name, flags, &[t]).and_then(|_| ctl.resume(name)) {
        Ok(r) => Ok(r.devno()),
        Err(e) => {
            let _ = ctl.remove(name);
            Err(e)
        }
    }
}

/// The /dev node of a dm device.
fn dm_node(dev: (u32, u32)) -> String {
    let name = devname(Path::new(&format!("/sys/dev/block/{}:{}", dev.0, dev.1)), &format!("dm-{}", dev.1));
    ensure_node(&name, dev)
}

const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

/// A read-only loop device over `path`.
pub fn loop_device(path: &str) -> Result<Blk, String> {
    loop_device_at(path, 0, 0)
}

/// `struct loop_info64`, for the offset and size limit.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LO_FLAGS_READ_ONLY: u32 = 1;

/// A read-only loop device over `bytes` bytes of `path` from `offset`
/// (`bytes` 0: to the end).
pub fn loop_device_at(path: &str, offset: u64, bytes: u64) -> Result<Blk, String> {
    let f = File::open(path).map_err(|e| format!("{path}: {e}"))?;
    let size = match bytes {
        0 => {
            use std::io::Seek;
            let mut g = &f;
            g.seek(std::io::SeekFrom::End(0)).map_err(|e| format!("{path}: {e}"))? - offset
        }
        n => n,
    };
    let ctl = File::open(ensure_node("loop-control", (10, 237))).map_err(|e| format!("/dev/loop-control: {e} (is CONFIG_BLK_DEV_LOOP in the kernel?)"))?;
    for _ in 0..8 {
        // SAFETY: ioctl without arguments on an open fd.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if n < 0 {
            return Err(format!("/dev/loop-control: {}", std::io::Error::last_os_error()));
        }
        let dev = (7, n as u32);
        let node = ensure_node(&format!("loop{n}"), dev);
        let lo = File::open(&node).map_err(|e| format!("{node}: {e}"))?;
        // SAFETY: LOOP_SET_FD takes the backing fd by value; a read-only fd
        // makes a read-only loop device.
        if unsafe { libc::ioctl(lo.as_raw_fd(), LOOP_SET_FD as _, f.as_raw_fd()) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EBUSY) {
                continue;
            }
            return Err(format!("attaching {path} to {node}: {e}"));
        }
        if offset != 0 || bytes != 0 {
            // SAFETY: the struct is plain data, zeroed, then filled.
            let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
            info.offset = offset;
            info.sizelimit = size;
            info.flags = LO_FLAGS_READ_ONLY;
            // SAFETY: LOOP_SET_STATUS64 reads one struct loop_info64.
            if unsafe { libc::ioctl(lo.as_raw_fd(), LOOP_SET_STATUS64 as _, &info) } != 0 {
                let e = std::io::Error::last_os_error();
                // SAFETY: detach what was just attached.
                unsafe { libc::ioctl(lo.as_raw_fd(), LOOP_CLR_FD as _, 0) };
                return Err(format!("setting offset {offset} and size {size} on {node}: {e}"));
            }
        }
        return Ok(Blk { node, dev, bytes: size });
    }
    Err(format!("no free loop device for {path}"))
}

/// Makes sure /dev has a node for `name` (devtmpfs normally made it).
fn ensure_node(name: &str, dev: (u32, u32)) -> String {
    let path = format!("/dev/{name}");
    if !Path::new(&path).exists() {
        if let Ok(c) = std::ffi::CString::new(path.clone()) {
            if let Some(parent) = Path::new(&path).parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            // SAFETY: valid C string.
            unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, libc::makedev(dev.0, dev.1)) };
        }
    }
    path
}

// ---- running stage 1 ---------------------------------------------------------

/// True when this PID 1 is stage 1: / is the initramfs and the cmdline
/// carries a root hash. Leaves /proc mounted only when it is.
pub fn wanted() -> bool {
    if !root_is_initramfs() {
        return false;
    }
    let mounted = sys::mount("proc", "/proc", "proc", libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, None).is_ok();
    let yes = std::fs::read_to_string("/proc/cmdline").map(|c| has_roothash(&c)).unwrap_or(false);
    if !yes && mounted {
        let _ = sys::umount("/proc", 0);
    }
    yes
}

#[allow(clippy::unnecessary_cast)]
fn fs_magic(path: &str) -> Option<u32> {
    let c = std::ffi::CString::new(path).ok()?;
    // SAFETY: statfs fills a plain struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_type as u32)
}

fn root_is_initramfs() -> bool {
    matches!(fs_magic("/"), Some(RAMFS_MAGIC | TMPFS_MAGIC))
}

/// A failure that ends stage 1: the event to emit (if any) and the reason.
struct Fail {
    event: Option<&'static str>,
    /// The event's keys; none: `reason` alone.
    fields: Vec<(&'static str, String)>,
    reason: String,
    detail: Vec<String>,
}

/// The event of a PXE root that did not fit in RAM.
const RAM_TOO_SMALL: &str = "ram-too-small";

impl Fail {
    fn root(reason: impl Into<String>) -> Fail {
        Fail { event: Some("root-failed"), fields: Vec::new(), reason: reason.into(), detail: Vec::new() }
    }

    fn detail(mut self, line: impl Into<String>) -> Fail {
        self.detail.push(line.into());
        self
    }
}

/// Stage 1, start to exec. Never returns.
pub fn run() -> ! {
    mount_early();
    sys::attach_console();
    let _ = sys::write("/proc/sys/kernel/printk", "4 4 1 7");
    console::open_kmsg();
    console::open_mirrors();
    console::event("started", &[("stage", &1), ("version", &env!("CARGO_PKG_VERSION")), ("uptime", &format!("{:.2}", sys::uptime()))]);
    let mut devices = coldplug::State::default();
    load_modules(&mut devices);
    let (fail, found) = boot(&mut devices);
    console::error(&fail.reason);
    for d in &fail.detail {
        console::error(d);
    }
    if let Some(ev) = fail.event {
        if fail.fields.is_empty() {
            console::event(ev, &[("reason", &fail.reason)]);
        } else {
            let fields: Vec<(&str, &dyn std::fmt::Display)> = fail.fields.iter().map(|(k, v)| (*k, v as &dyn std::fmt::Display)).collect();
            console::event(ev, &fields);
        }
    }
    if let Some((cmd, root)) = found {
        reboot_if_on_trial(&cmd, &root, &fail.reason);
    }
    maintenance(&fail.reason)
}

/// Where stage 1 mounts the boot partition, read-only, to see whether a
/// failed boot was a trial.
const TRIAL_CHECK_MOUNT: &str = "/run/kiln/boot-check";

/// A boot that failed in stage 1 while its slot was on trial, with a good
/// slot to fall back to, reboots: the bootloader spent the try when it
/// started this boot (systemd-boot renamed the entry; boot.scr wrote the
/// state), so the next boot is the next try or the good slot. Otherwise
/// (no trial, no fallback, or the boot partition unreadable) the node stays
/// in maintenance, as a reboot would only boot the same root again.
fn reboot_if_on_trial(cmd: &Cmdline, root: &Root, reason: &str) {
    let Some(disk) = root.disk.as_ref().filter(|_| root.medium == Medium::Disk) else { return };
    let slot = if cmd.slot == "b" { Slot::B } else { Slot::A };
    let part = match boot_partition(disk) {
        Ok(p) => p,
        Err(e) => {
            console::info(&format!("cannot tell whether this boot is a trial: {e}"));
            return;
        }
    };
    let _ = sys::mkdir_p(TRIAL_CHECK_MOUNT);
    if let Err(e) = sys::mount(&part.node, TRIAL_CHECK_MOUNT, "vfat", libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, Some("umask=0077")) {
        console::info(&format!("cannot tell whether this boot is a trial: mounting {}: {e}", part.node));
        return;
    }
    let trial = update::trial_in(Path::new(TRIAL_CHECK_MOUNT), slot, cmd.mbr.is_some());
    let _ = sys::umount(TRIAL_CHECK_MOUNT, 0);
    let Some(entry) = trial else { return };
    console::event(
        "boot-failed",
        &[("slot", &slot), ("stage", &1), ("entry", &entry.name), ("tries_left", &entry.left.unwrap_or(0)), ("reason", &reason), ("action", &"reboot")],
    );
    console::warn("this image is on trial and cannot mount its root: rebooting in 5 s to spend a try (the previous image boots when they are spent)");
    std::thread::sleep(Duration::from_secs(5));
    sys::sync();
    let e = sys::reboot(libc::RB_AUTOBOOT);
    console::error(&format!("reboot: {e}"));
}

/// Says why, then reaps forever. Ctrl-Alt-Del still reboots (stage 1 leaves
/// the kernel's default).
fn maintenance(reason: &str) -> ! {
    console::event("maintenance", &[("stage", &1), ("reason", &reason)]);
    console::info("the node cannot boot this root; fix the cause (reflash, or boot the other slot) and reboot");
    super::watchdog::idle_forever()
}

fn mount_early() {
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    let table: &[(&str, &str, &str, libc::c_ulong, Option<&str>)] = &[
        ("proc", "/proc", "proc", nosuid_nodev | libc::MS_NOEXEC, None),
        ("sysfs", "/sys", "sysfs", nosuid_nodev | libc::MS_NOEXEC, None),
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, Some("mode=0755")),
        ("tmpfs", "/run", "tmpfs", nosuid_nodev, Some("mode=0755")),
    ];
    for (src, target, fs, flags, data) in table {
        if *target != "/proc" && sys::is_mountpoint(target) {
            continue;
        }
        if *target == "/proc" && Path::new("/proc/self").exists() {
            continue;
        }
        if let Err(e) = sys::mount(src, target, fs, *flags, *data) {
            console::error(&format!("{e}"));
        }
    }
}

/// With a distro kernel: what stage 1 needs by name (device-mapper, the
/// filesystems), then drivers for the devices present. Quiet when built in.
fn load_modules(devices: &mut coldplug::State) {
    let (loaded, _) = kmod::load_all(kiln_contract::modules::STAGE1_MODULES);
    if !loaded.is_empty() {
        console::info(&format!("stage 1: modules loaded: {}", loaded.join(" ")));
    }
    coldplug::scan(devices);
}

/// Finds the root and boots it (never returns then). Returns why not, and
/// the cmdline and root if the root was found.
fn boot(devices: &mut coldplug::State) -> (Fail, Option<(Cmdline, Root)>) {
    let (cmd, root) = match find(devices) {
        Ok(x) => x,
        Err(f) => {
            // No root: what has no driver may be why. (With the root found,
            // stage 2 reports against the root's larger set of modules.)
            if f.event != Some(RAM_TOO_SMALL) {
                coldplug::report_unclaimed(devices);
            }
            return (f, None);
        }
    };
    match mount_and_switch(&cmd, &root) {
        Ok(()) => exec_stage2(),
        Err(f) => (f, Some((cmd, root))),
    }
}

/// The cmdline, and the root it names.
fn find(devices: &mut coldplug::State) -> Result<(Cmdline, Root), Fail> {
    let text = sys::read("/proc/cmdline").map_err(|e| Fail::root(format!("cmdline: {e}")))?;
    let cmd = parse_cmdline(&text).map_err(|e| Fail::root(format!("cmdline: {e}")))?;

    let pxe = Path::new(RAM_ROOT_SIZES).exists();
    if pxe {
        check_ram_root()?;
    }
    let root = if pxe || Path::new(RAM_ROOT).exists() {
        console::info(&format!("stage 1: root hash {} (slot {}); the root is in the initramfs", cmd.root_hex(), cmd.slot));
        let lo = |p: &str| loop_device(p).map_err(|e| Fail::root(format!("the root in the initramfs: {e}")));
        Root { medium: Medium::Initramfs, disk: None, data: lo(RAM_ROOT)?, hash: lo(RAM_VERITY)? }
    } else {
        console::info(&format!("stage 1: root hash {} (slot {}); looking for PARTUUIDs {} and {}", cmd.root_hex(), cmd.slot, Guid::root_of(&cmd.roothash), Guid::verity_of(&cmd.roothash)));
        let root = wait_for_root(&cmd, devices)?;
        if cmd.ram {
            copy_to_ram(root)?
        } else {
            root
        }
    };
    Ok((cmd, root))
}

/// A PXE root: checks that the kernel unpacked it whole into RAM. If not,
/// removes what arrived (to give the RAM back) and says whether the node
/// lacks RAM, and how much this root needs.
fn check_ram_root() -> Result<(), Fail> {
    let text = sys::read(RAM_ROOT_SIZES).map_err(|e| Fail::root(format!("{e}")))?;
    let sizes = kiln_contract::pxe::RamRoot::parse(&text).map_err(|e| Fail::root(format!("{RAM_ROOT_SIZES}: {e}")).detail("the image's build wrote a broken file; rebuild it"))?;
    let len = |p: &str| std::fs::metadata(p).ok().filter(|m| m.is_file()).map(|m| m.len());
    let mem_mib = sys::read("/proc/meminfo").ok().and_then(|m| ramroot::mem_total_mib(&m));
    let state = ramroot::unpacked(&sizes, len(RAM_ROOT), len(RAM_VERITY));
    if state == ramroot::Unpacked::Complete {
        if let Some(w) = mem_mib.and_then(|m| ramroot::low_ram_warning(&sizes, m)) {
            console::warn(&w);
        }
        return Ok(());
    }
    let _ = std::fs::remove_file(RAM_ROOT);
    let _ = std::fs::remove_file(RAM_VERITY);
    let i = ramroot::incomplete(&sizes, mem_mib, state);
    let mut f = Fail::root(i.reason);
    if i.too_small {
        f.event = Some(RAM_TOO_SMALL);
        let mem = mem_mib.map_or_else(|| "unknown".to_string(), |m| m.to_string());
        f.fields = vec![("mem_mib", mem), ("needs_mib", sizes.min_ram_mib().to_string()), ("root_bytes", sizes.root_bytes.to_string()), ("verity_bytes", sizes.verity_bytes.to_string())];
    }
    f.detail = i.detail;
    Err(f)
}

/// Verifies and mounts the root, prepares it, and makes it `/`.
fn mount_and_switch(cmd: &Cmdline, root: &Root) -> Result<(), Fail> {
    let sb = read_superblock(root)?;
    let dm_node = setup_verity(cmd, root, &sb)?;
    verify(cmd, &dm_node)?;

    sys::mount(&dm_node, SYSROOT, "squashfs", libc::MS_RDONLY, None).map_err(|e| Fail::root(format!("mounting the verified root: {e}")).detail("the root passed verity but is not a squashfs the kernel can mount (CONFIG_SQUASHFS, its compressor)"))?;
    console::info(&format!("root mounted read-only at {SYSROOT}"));

    if let Err(e) = setup_etc() {
        console::error(&format!("/etc on tmpfs: {e}; /etc stays read-only and stage 2 cannot write hostname, hosts or resolv.conf"));
    }
    setup_var(root);
    writable_binds(SYSROOT);
    let esp = mount_esp(root);
    if let Err(e) = write_medium(root, &dm_node, &sb, esp.as_ref()) {
        console::warn(&format!("{MEDIUM_FILE}: {e}; installing from this medium is not possible"));
    }
    switch_root().map_err(|e| Fail { event: None, fields: Vec::new(), reason: format!("switch_root: {e}"), detail: Vec::new() })
}

/// Tells stage 2 what it booted from, for the installer.
fn write_medium(root: &Root, dm_node: &str, sb: &VeritySuperblock, esp: Option<&Blk>) -> std::io::Result<()> {
    let mut s = format!("kind={}\nroot={dm_node}\nroot_bytes={}\nverity={}\nverity_bytes={}\n", root.medium.as_str(), sb.data_bytes(), root.hash.node, sb.hash_bytes());
    if let Some(d) = &root.disk {
        s.push_str(&format!("device={}\n", d.node()));
        if let Some(e) = d.gpt.as_ref().ok().and_then(|g| g.by_name(INSTALL_PART)) {
            match entry_blk(d, &e) {
                Ok(b) => s.push_str(&format!("install={}\n", b.node)),
                Err(e) => console::warn(&format!("the install image on {}: {e}", d.node())),
            }
        }
    }
    if let Some(e) = esp {
        s.push_str(&format!("esp={}\n", e.node));
    }
    std::fs::create_dir_all("/run/kiln")?;
    std::fs::write(MEDIUM_FILE, s)
}

/// Polls for the root's partitions; each round first loads drivers for
/// devices that appeared since (a controller's disks come late).
fn wait_for_root(cmd: &Cmdline, devices: &mut coldplug::State) -> Result<Root, Fail> {
    let (want_data, want_hash) = (Guid::root_of(&cmd.roothash), Guid::verity_of(&cmd.roothash));
    let start = Instant::now();
    let mut told = false;
    let mut hinted = false;
    loop {
        coldplug::scan(devices);
        let disks = match cmd.mbr {
            Some(m) => match find_mbr_root(scan_disks(), m) {
                Ok((disk, part)) => return mbr_root(disk, &part, m, start),
                Err(disks) => disks,
            },
            None => scan_disks(),
        };
        let disks = match find_root(disks, want_data, want_hash) {
            Ok((disk, d, h)) => {
                let iso = disk.sysname.starts_with("sr") || disk.gpt.as_ref().is_ok_and(|g| g.by_name(INSTALL_PART).is_some());
                let blk = |e: &gpt::Partition| entry_blk(&disk, e).map_err(Fail::root);
                let (data, hash) = (blk(&d)?, blk(&h)?);
                console::info(&format!(
                    "root found on {} after {:.1} s: data {} ({} bytes), hash {} ({} bytes)",
                    disk.sysname,
                    start.elapsed().as_secs_f64(),
                    data.node,
                    data.bytes,
                    hash.node,
                    hash.bytes
                ));
                return Ok(Root { medium: if iso { Medium::Iso } else { Medium::Disk }, disk: Some(disk), data, hash });
            }
            Err(disks) => disks,
        };
        if !hinted {
            let name = format!("root-{}", cmd.slot);
            if let Some((d, p)) = disks.iter().find_map(|d| d.gpt.as_ref().ok().and_then(|g| g.by_name(&name)).map(|p| (d, p))) {
                console::warn(&format!(
                    "{} has a partition {name:?} with PARTUUID {}, not {}: the roothash= on the cmdline is not this disk's root hash (wrong boot entry, or a partly written image?); still waiting for another disk",
                    d.sysname, p.uuid, want_data
                ));
                hinted = true;
            }
        }
        if start.elapsed() >= WAIT {
            let seen: Vec<String> = disks.iter().map(Disk::describe).collect();
            let wanted = match cmd.mbr {
                Some(m) => format!("no MBR disk with signature {:08x} and a partition {} (kiln.mbr) appeared", m.signature, m.partition),
                None => format!("no partitions with PARTUUID {want_data} (root) and {want_hash} (verity) appeared"),
            };
            let mut f = Fail::root(format!("{wanted} within {} s", WAIT.as_secs()))
                .detail(format!("looked for the root hash halves of roothash={}", cmd.root_hex()));
            if seen.is_empty() {
                f = f.detail("no block devices at all: is the storage driver (virtio-blk, nvme, mmc, ahci, usb-storage) built into the kernel?");
            }
            for s in seen {
                f = f.detail(format!("block device seen: {s}"));
            }
            return Err(f);
        }
        if !told && start.elapsed() > Duration::from_secs(1) {
            console::info(&format!("waiting up to {} s for the root partitions", WAIT.as_secs()));
            told = true;
        }
        std::thread::sleep(POLL);
    }
}

/// `kiln.root=ram`: copies the root and its hash tree into the initramfs
/// and uses loop devices over the copies. Verity checks the copies.
fn copy_to_ram(root: Root) -> Result<Root, Fail> {
    let sb = read_superblock(&root)?;
    let t0 = Instant::now();
    let _ = std::fs::create_dir_all("/kiln");
    for (from, len, to) in [(&root.data, sb.data_bytes(), RAM_ROOT), (&root.hash, sb.hash_bytes(), RAM_VERITY)] {
        let copy = || -> std::io::Result<u64> {
            let src = File::open(&from.node)?;
            let mut dst = File::create(to)?;
            std::io::copy(&mut std::io::Read::take(src, len), &mut dst)
        };
        match copy() {
            Ok(n) if n == len => {}
            Ok(n) => return Err(Fail::root(format!("kiln.root=ram: {} gave {n} of {len} bytes: the medium is truncated", from.node))),
            Err(e) => return Err(Fail::root(format!("kiln.root=ram: copying {} into RAM: {e}", from.node)).detail("is there enough RAM for the root? boot without kiln.root=ram to run from the medium")),
        }
    }
    console::info(&format!("kiln.root=ram: root copied into RAM ({} KiB) in {:.2} s; the medium can be removed", (sb.data_bytes() + sb.hash_bytes()) / 1024, t0.elapsed().as_secs_f64()));
    let lo = |p: &str| loop_device(p).map_err(|e| Fail::root(format!("kiln.root=ram: {e}")));
    Ok(Root { medium: root.medium, disk: root.disk, data: lo(RAM_ROOT)?, hash: lo(RAM_VERITY)? })
}

/// The veritysetup superblock at the start of the hash device, checked
/// against the sizes of both devices.
fn read_superblock(root: &Root) -> Result<VeritySuperblock, Fail> {
    let hash_node = &root.hash.node;
    let mut sb = vec![0u8; 512];
    File::open(hash_node).and_then(|f| f.read_exact_at(&mut sb, 0)).map_err(|e| Fail::root(format!("reading the verity superblock from {hash_node}: {e}")))?;
    let sb = VeritySuperblock::parse(&sb).map_err(|e| Fail::root(format!("verity superblock on {hash_node}: {e}")))?;
    let short = |f: Fail| if root.medium == Medium::Initramfs { f.detail("the root in the initramfs is short: the node may lack the RAM to unpack it (dmesg: \"Initramfs unpacking failed\"); give it more RAM") } else { f };
    if sb.data_bytes() > root.data.bytes {
        return Err(short(Fail::root(format!("verity superblock on {hash_node} covers {} bytes, but {} has only {}: the image is truncated", sb.data_bytes(), root.data.node, root.data.bytes))));
    }
    if sb.hash_bytes() > root.hash.bytes {
        return Err(short(Fail::root(format!("the hash tree needs {} bytes, but {hash_node} has only {}: the image is truncated", sb.hash_bytes(), root.hash.bytes))));
    }
    Ok(sb)
}

/// Creates /dev/mapper/root (as /dev/dm-N) over the two devices. Returns
/// the node.
fn setup_verity(cmd: &Cmdline, root: &Root, sb: &VeritySuperblock) -> Result<String, Fail> {
    let target = dm::verity_target(root.data.dev, root.hash.dev, sb.data_block_size, sb.hash_block_size, sb.data_blocks, &cmd.root_hex(), &sb.salt_hex(), cmd.on_corruption.map(OnCorruption::table_arg));
    console::info(&format!("dm-verity table: {} {} {} {}", target.start, target.length, target.kind, target.params));
    let dev = dm_create(DM_NAME, dm::READONLY_FLAG, target)
        .map_err(|e| Fail::root(format!("dm-verity: {e}")).detail("the kernel log (dmesg) says why the table was refused; the kernel needs CONFIG_DM_VERITY"))?;
    let node = dm_node(dev);
    // /dev/mapper/root for humans and tools; nothing depends on it.
    let name = node.trim_start_matches("/dev/");
    let _ = std::os::unix::fs::symlink(format!("../{name}"), format!("/dev/mapper/{DM_NAME}"));
    Ok(node)
}

/// Reads the whole verity device once, so a bad block stops the boot here
/// instead of surfacing later as a read error under k0s.
fn verify(cmd: &Cmdline, node: &str) -> Result<(), Fail> {
    use std::io::Read;
    if let Some(a) = cmd.on_corruption {
        console::info(&format!("verifying the root; a bad block makes the kernel {} (kiln.verity)", if a == OnCorruption::Panic { "panic" } else { "restart" }));
    }
    let t0 = Instant::now();
    let mut f = File::open(node).map_err(|e| Fail::root(format!("verity: opening {node}: {e}")))?;
    let mut buf = vec![0u8; VERIFY_CHUNK];
    let mut off: u64 = 0;
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => off += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let bad = first_bad_block(&f, off).unwrap_or(off / 4096);
                return Err(Fail::root(format!("verity: block {bad} of {node} does not match the root hash ({e})"))
                    .detail("the root partition or its hash tree was modified or is damaged; reflash the image or boot the other slot"));
            }
        }
    }
    // The squashfs reads the device directly; drop the copy in the page cache.
    // SAFETY: valid fd.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let blocks = off / 4096;
    console::event("root-verified", &[("hash", &cmd.root_hex()), ("blocks", &blocks), ("seconds", &format!("{:.2}", t0.elapsed().as_secs_f64()))]);
    Ok(())
}

/// The first 4 KiB block from `from` that fails to read.
fn first_bad_block(f: &File, from: u64) -> Option<u64> {
    let mut b = vec![0u8; 4096];
    let mut off = from;
    for _ in 0..(VERIFY_CHUNK / 4096) {
        match f.read_at(&mut b, off) {
            Ok(0) => return None,
            Ok(n) => off += n as u64,
            Err(_) => return Some(off / 4096),
        }
    }
    None
}

/// /etc: a tmpfs seeded with the image's /etc, moved over /sysroot/etc.
fn setup_etc() -> Result<(), String> {
    let src = format!("{SYSROOT}/etc");
    sys::mount("tmpfs", ETC_STAGING, "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, Some("mode=0755")).map_err(|e| e.to_string())?;
    let n = copy_tree(Path::new(&src), Path::new(ETC_STAGING)).map_err(|e| format!("copying {src}: {e}"));
    let n = match n {
        Ok(n) => n,
        Err(e) => {
            let _ = sys::umount(ETC_STAGING, 0);
            return Err(e);
        }
    };
    for d in ["cni/net.d", "k0s"] {
        let _ = std::fs::create_dir_all(format!("{ETC_STAGING}/{d}"));
    }
    sys::mount(ETC_STAGING, &src, "", libc::MS_MOVE, None).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir(ETC_STAGING);
    console::info(&format!("/etc: tmpfs seeded with {n} entries from the image"));
    Ok(())
}

/// Copies a tree with modes, owners and symlinks (no device nodes or
/// sockets; /etc has none). Returns the number of entries copied.
pub fn copy_tree(src: &Path, dst: &Path) -> std::io::Result<usize> {
    use std::os::unix::fs::{lchown, symlink};
    let top = std::fs::symlink_metadata(src)?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(top.mode() & 0o7777))?;
    lchown(dst, Some(top.uid()), Some(top.gid()))?;
    let mut n = 0;
    let mut stack: Vec<(PathBuf, PathBuf)> = vec![(src.to_path_buf(), dst.to_path_buf())];
    while let Some((s, d)) = stack.pop() {
        for e in std::fs::read_dir(&s)? {
            let e = e?;
            let (sp, dp) = (e.path(), d.join(e.file_name()));
            let m = std::fs::symlink_metadata(&sp)?;
            let ft = m.file_type();
            if ft.is_symlink() {
                symlink(std::fs::read_link(&sp)?, &dp)?;
            } else if ft.is_dir() {
                std::fs::create_dir(&dp)?;
                stack.push((sp, dp.clone()));
            } else if ft.is_file() {
                std::fs::copy(&sp, &dp)?;
            } else {
                console::warn(&format!("/etc: skipping {} (not a file, directory or symlink)", sp.display()));
                continue;
            }
            lchown(&dp, Some(m.uid()), Some(m.gid()))?;
            if !ft.is_symlink() {
                std::fs::set_permissions(&dp, std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
            }
            n += 1;
        }
    }
    Ok(n)
}

/// /var on the data partition, grown on first boot; a tmpfs if there is
/// none (ISO, PXE) or it fails, announced loudly.
fn setup_var(root: &Root) {
    let var = format!("{SYSROOT}/var");
    let r = match (&root.disk, root.medium) {
        (Some(disk), Medium::Disk) if disk.gpt.is_err() && disk_mbr_signature(disk).is_some() => match disk.part(MBR_DATA) {
            Some(p) => {
                if let Err(e) = grow_mbr_partition(disk, MBR_DATA) {
                    console::warn(&format!("growing the data partition {}: {e}; /var keeps its size", p.node()));
                }
                mount_var_fs(p, &var)
            }
            None => Err(format!("the MBR card {} has no partition {MBR_DATA} (data)", disk.node())),
        },
        (Some(disk), Medium::Disk) => mount_data(disk, "data", &var),
        (_, m) => Err(format!("booted from {} (no data partition)", if m == Medium::Iso { "an ISO" } else { "the network: the root is in the initramfs" })),
    };
    if let Err(reason) = r {
        if root.medium == Medium::Disk {
            console::error(&format!("/var: {reason}"));
        }
        ephemeral_var(&var, &reason);
    }
}

/// A tmpfs /var, with the `data-ephemeral` event and a warning.
pub fn ephemeral_var(var: &str, reason: &str) {
    console::event("data-ephemeral", &[("reason", &reason)]);
    console::warn("/var is a tmpfs: k0s state, logs and images are lost at reboot (node.toml `storage.var_disk` names a disk for /var)");
    if let Err(e) = sys::mount("tmpfs", var, "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, Some("mode=0755")) {
        console::error(&format!("/var on tmpfs: {e}"));
    }
}

/// Mounts GPT partition `name` of `disk` (ext4) on `var`, growing the
/// partition to the disk's end and the filesystem to the partition first.
pub fn mount_data(disk: &Disk, name: &str, var: &str) -> Result<(), String> {
    let gpt = disk.gpt.as_ref().map_err(|e| format!("{}: {e}", disk.node()))?;
    let entry = gpt.by_name(name).ok_or_else(|| format!("no partition named {name:?} on {}", disk.node()))?;
    let part = disk.part(entry.number).ok_or_else(|| format!("the kernel has no partition {} on {}", entry.number, disk.node()))?.clone();
    match grow_partition(disk, gpt, name) {
        Ok(Some(plan)) => console::info(&format!("data partition {} grown from {} to {} bytes", part.node(), plan.old_bytes(), plan.new_bytes())),
        Ok(None) => {}
        Err(e) => console::warn(&format!("growing the data partition {}: {e}; /var keeps its size", part.node())),
    }
    mount_var_fs(&part, var)
}

/// Mounts the ext4 on `part` at `var`, grown to the partition's size.
fn mount_var_fs(part: &Part, var: &str) -> Result<(), String> {
    let node = ensure_node(&part.sysname, part.dev);
    let dev = File::open(&node).map_err(|e| format!("{node}: {e}"))?;
    let sb = Ext4Super::read(&dev).ok_or_else(|| format!("{node} holds no ext4 filesystem"))?;
    drop(dev);
    sys::mount(&node, var, "ext4", libc::MS_NOSUID | libc::MS_NODEV, None).map_err(|e| format!("{e} (is the filesystem damaged? see dmesg)"))?;

    let part_bytes = read_trim(format!("/sys/class/block/{}/size", part.sysname)).and_then(|s| s.parse::<u64>().ok()).map(|s| s * 512).unwrap_or(part.bytes);
    let want = part_bytes / sb.block_size;
    if want > sb.blocks {
        let t0 = Instant::now();
        match grow::ext4_resize(var, want) {
            Ok(()) => console::event("data-grown", &[("dev", &node), ("from", &sb.bytes()), ("to", &(want * sb.block_size)), ("seconds", &format!("{:.2}", t0.elapsed().as_secs_f64()))]),
            Err(e) => console::warn(&format!("growing the ext4 on {node} from {} to {} blocks: {e}; /var keeps its size", sb.blocks, want)),
        }
    }
    let (size, free) = statvfs(var).unwrap_or((0, 0));
    console::event("data-mounted", &[("dev", &node), ("size", &size), ("free", &free)]);
    Ok(())
}

/// Extends the data partition to the disk's end in the GPT and tells the
/// kernel.
fn grow_partition(disk: &Disk, gpt: &Gpt, name: &str) -> Result<Option<grow::Plan>, String> {
    let Some(plan) = grow::Plan::new(gpt, name, disk.bytes / disk.lba_size).map_err(|e| e.to_string())? else { return Ok(None) };
    let f = std::fs::OpenOptions::new().read(true).write(true).open(disk.node()).map_err(|e| format!("{}: {e}", disk.node()))?;
    let mut mbr = vec![0u8; 512];
    f.read_exact_at(&mut mbr, 0).map_err(|e| format!("{}: reading sector 0: {e}", disk.node()))?;
    grow::apply(&f, &plan.writes(gpt, Some(&mbr))).map_err(|e| format!("{}: {e}", disk.node()))?;
    grow::blkpg_resize(&f, plan.number, plan.first_lba * plan.lba_size, plan.new_bytes()).map_err(|e| format!("the GPT on {} is updated, but the kernel refused the new size (BLKPG): {e}; it takes effect at the next boot", disk.node()))?;
    Ok(Some(plan))
}

/// Extends MBR partition `number` to the card's end and tells the kernel.
fn grow_mbr_partition(disk: &Disk, number: u32) -> Result<(), String> {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(disk.node()).map_err(|e| format!("{}: {e}", disk.node()))?;
    let mut s0 = vec![0u8; 512];
    f.read_exact_at(&mut s0, 0).map_err(|e| format!("{}: reading sector 0: {e}", disk.node()))?;
    let Some(plan) = grow::mbr_plan(&s0, number, disk.bytes / 512) else { return Ok(()) };
    grow::apply(&f, &[(plan.entry_offset, plan.entry.clone())]).map_err(|e| format!("{}: {e}", disk.node()))?;
    f.sync_data().map_err(|e| format!("{}: syncing the MBR: {e}", disk.node()))?;
    grow::blkpg_resize(&f, number, plan.start * 512, plan.new_sectors * 512).map_err(|e| format!("the MBR on {} is updated, but the kernel refused the new size (BLKPG): {e}; it takes effect at the next boot", disk.node()))?;
    console::info(&format!("data partition {number} of {} grown from {} to {} bytes", disk.node(), plan.old_sectors * 512, plan.new_sectors * 512));
    Ok(())
}

#[allow(clippy::unnecessary_cast)]
fn statvfs(path: &str) -> Option<(u64, u64)> {
    let c = std::ffi::CString::new(path).ok()?;
    // SAFETY: statvfs fills a plain struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let f = st.f_frsize as u64;
    Some((st.f_blocks as u64 * f, st.f_bavail as u64 * f))
}

/// The k0s contract's writable directories under the read-only root at
/// `root` ("" for the running root).
pub fn writable_binds(root: &str) {
    for (src, dst) in WRITABLE_BINDS {
        let (s, d) = (format!("{root}{src}"), format!("{root}{dst}"));
        if let Err(e) = sys::mkdir_p(&s) {
            console::warn(&format!("{e}; {dst} stays read-only"));
            continue;
        }
        if !Path::new(&d).is_dir() {
            console::warn(&format!("the image has no {dst} to bind {src} onto; {dst} is missing"));
            continue;
        }
        if let Err(e) = sys::mount(&s, &d, "", libc::MS_BIND, None) {
            console::warn(&format!("{e}; {dst} stays read-only"));
        }
    }
}

/// The ESP at /boot, so stage 2 can read /boot/node.toml (read-only on an
/// ISO). Returns its device.
fn mount_esp(root: &Root) -> Option<Blk> {
    let disk = root.disk.as_ref()?;
    match boot_partition(disk) {
        Ok(blk) => mount_boot_fat(root, blk),
        // An MBR disk that is not a kiln card has nothing to say.
        Err(_) if disk.gpt.is_err() => None,
        Err(e) => {
            console::warn(&format!("{e}; /boot/node.toml is not a config source"));
            None
        }
    }
}

/// The root disk's ESP (GPT) or boot FAT (partition 1 of an MBR card).
fn boot_partition(disk: &Disk) -> Result<Blk, String> {
    let Ok(gpt) = &disk.gpt else {
        let p = disk.part(MBR_BOOT).filter(|_| disk_mbr_signature(disk).is_some()).ok_or_else(|| format!("{} has no boot partition {MBR_BOOT}", disk.node()))?;
        return Ok(Blk { node: ensure_node(&p.sysname, p.dev), dev: p.dev, bytes: p.bytes });
    };
    let esp = gpt.by_name("esp").or_else(|| gpt.partitions().into_iter().find(|p| p.type_guid == gpt::ESP_TYPE)).ok_or_else(|| format!("no ESP on {}", disk.node()))?;
    entry_blk(disk, &esp).map_err(|e| format!("ESP: {e}"))
}

/// Mounts the ESP or boot FAT at /boot.
fn mount_boot_fat(root: &Root, blk: Blk) -> Option<Blk> {
    let target = format!("{SYSROOT}/boot");
    let ro = if root.medium == Medium::Disk { 0 } else { libc::MS_RDONLY };
    match sys::mount(&blk.node, &target, "vfat", libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | ro, Some("umask=0077")) {
        Ok(()) => console::info(&format!("ESP {} mounted at /boot", blk.node)),
        Err(e) => console::warn(&format!("ESP: {e}; /boot/node.toml is not a config source")),
    }
    Some(blk)
}

/// Moves the pseudo filesystems into the new root, frees the initramfs, and
/// makes /sysroot the root.
fn switch_root() -> Result<(), String> {
    for m in ["/dev", "/proc", "/sys", "/run"] {
        let target = format!("{SYSROOT}{m}");
        if let Err(e) = sys::mount(m, &target, "", libc::MS_MOVE, None) {
            console::warn(&format!("moving {m} into the new root: {e}; stage 2 mounts its own"));
        }
    }
    std::env::set_current_dir(SYSROOT).map_err(|e| format!("chdir {SYSROOT}: {e}"))?;
    free_initramfs();
    sys::mount(".", "/", "", libc::MS_MOVE, None).map_err(|e| e.to_string())?;
    // SAFETY: valid C string.
    if unsafe { libc::chroot(c".".as_ptr()) } != 0 {
        return Err(format!("chroot: {}", std::io::Error::last_os_error()));
    }
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(())
}

/// Deletes the initramfs's files (they would hold RAM forever), staying on
/// its filesystem so nothing mounted is touched.
fn free_initramfs() {
    let Ok(root) = std::fs::symlink_metadata("/") else { return };
    if !root_is_initramfs() {
        return;
    }
    let mut freed = 0u64;
    remove_children(Path::new("/"), root.dev(), &mut freed);
    console::info(&format!("initramfs freed ({} KiB)", freed / 1024));
}

fn remove_children(dir: &Path, dev: u64, freed: &mut u64) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(m) = std::fs::symlink_metadata(&p) else { continue };
        if m.dev() != dev {
            continue;
        }
        if m.is_dir() {
            remove_children(&p, dev, freed);
            let _ = std::fs::remove_dir(&p);
        } else if std::fs::remove_file(&p).is_ok() {
            *freed += m.len();
        }
    }
}

/// Execs the root's init as stage 2.
fn exec_stage2() -> ! {
    use std::os::unix::process::CommandExt;
    console::info(&format!("switching to the root ({:.2} s since boot)", sys::uptime()));
    let mut errs = Vec::new();
    for init in ["/sbin/init", "/sbin/kiln-init"] {
        let e = std::process::Command::new(init).arg(STAGE2_ARG).exec();
        errs.push(format!("{init}: {e}"));
    }
    let reason = format!("cannot exec stage 2 in the new root: {}", errs.join("; "));
    console::error(&reason);
    maintenance(&reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_contract::digest::hex;
    use crate::node::gpt::tests::tempdir;


    proptest::proptest! {
        #[test]
        fn superblock_never_panics(b in proptest::collection::vec(0u8..=255, 0..600)) {
            let mut b = b;
            if b.len() >= 16 {
                b[..8].copy_from_slice(b"verity\0\0");
                b[8..12].copy_from_slice(&1u32.to_le_bytes());
                b[12..16].copy_from_slice(&1u32.to_le_bytes());
            }
            let _ = VeritySuperblock::parse(&b);
        }
    }

    #[test]
    fn superblock_from_veritysetup() {
        if kiln_testkit::checker("veritysetup", "cryptsetup-bin").is_none() {
            return;
        }
        let d = tempdir("verity-sb");
        let (data, hash) = (d.join("data"), d.join("hash"));
        // 300 blocks: three hash blocks at level 0, one above.
        let bytes: Vec<u8> = (0..300 * 4096u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
        std::fs::write(&data, &bytes).unwrap();
        let salt = "5a".repeat(32);
        let out = kiln_testkit::command("veritysetup").args(["format", "--salt", &salt, "--uuid", "12345678-9abc-def0-1234-56789abcdef0"]).arg(&data).arg(&hash).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let sb = VeritySuperblock::parse(&std::fs::read(&hash).unwrap()).unwrap();
        assert_eq!(sb.data_blocks, 300);
        assert_eq!((sb.data_block_size, sb.hash_block_size), (4096, 4096));
        assert_eq!(sb.salt_hex(), salt);
        assert_eq!(hex(&sb.uuid), "123456789abcdef0123456789abcdef0");
        assert_eq!(sb.hash_bytes(), std::fs::metadata(&hash).unwrap().len());
        assert_eq!(sb.data_bytes(), 300 * 4096);

        let mut raw = std::fs::read(&hash).unwrap();
        raw[0] = b'V';
        assert!(VeritySuperblock::parse(&raw).unwrap_err().contains("magic"));
        raw[0] = b'v';
        raw[32..38].copy_from_slice(b"sha512");
        assert!(VeritySuperblock::parse(&raw).unwrap_err().contains("sha512"));
        raw[32..38].copy_from_slice(b"sha256");
        raw[64..68].copy_from_slice(&1000u32.to_le_bytes());
        assert!(VeritySuperblock::parse(&raw).unwrap_err().contains("block size 1000"));
        raw[64..68].copy_from_slice(&4096u32.to_le_bytes());
        raw[80..82].copy_from_slice(&300u16.to_le_bytes());
        assert!(VeritySuperblock::parse(&raw).unwrap_err().contains("salt"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn superblock_hash_size_for_one_block() {
        let sb = VeritySuperblock { uuid: [0; 16], data_block_size: 4096, hash_block_size: 4096, data_blocks: 1, salt: vec![] };
        assert_eq!(sb.hash_bytes(), 4096);
        assert_eq!(sb.salt_hex(), "-");
        let sb = VeritySuperblock { data_blocks: 128 * 128 + 1, ..sb };
        // 129 + 2 + 1 tree blocks, plus the superblock.
        assert_eq!(sb.hash_bytes(), (1 + 129 + 2 + 1) * 4096);
    }

    #[test]
    fn copies_a_tree_with_modes_and_links() {
        let d = tempdir("copy-tree");
        let (src, dst) = (d.join("etc"), d.join("out"));
        std::fs::create_dir_all(src.join("kiln/sub")).unwrap();
        std::fs::write(src.join("kiln/node.toml"), "role = \"single\"\n").unwrap();
        std::fs::write(src.join("shadow"), "x").unwrap();
        std::fs::set_permissions(src.join("shadow"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(src.join("kiln/sub"), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink("../proc/self/mounts", src.join("mtab")).unwrap();
        std::fs::create_dir(&dst).unwrap();
        assert_eq!(copy_tree(&src, &dst).unwrap(), 5);
        assert_eq!(std::fs::read_to_string(dst.join("kiln/node.toml")).unwrap(), "role = \"single\"\n");
        assert_eq!(std::fs::metadata(dst.join("shadow")).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(dst.join("kiln/sub")).unwrap().mode() & 0o777, 0o700);
        assert_eq!(std::fs::read_link(dst.join("mtab")).unwrap(), Path::new("../proc/self/mounts"));
        let _ = std::fs::remove_dir_all(&d);
    }
}
