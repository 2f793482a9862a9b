//! The installer. Booted from a kiln ISO with `kiln.install=/dev/X` on the
//! cmdline, or `install.disk` in node.toml, kiln-init writes the node's disk
//! image to that disk, reads it back against the recorded sha256s, and
//! reboots into it.
//!
//! The disk image is rebuilt from the ISO: the verified root (read through
//! dm-verity), its hash tree, and the install image (`/KILN/INSTALL.IMG`:
//! the GPT, the ESP and the data partition). See
//! `kiln_contract::install_image` for the format, and [`write`] for the
//! write order that keeps an
//! interrupted install from leaving a half-bootable disk.

pub mod write;

use super::console;
use write as install_image;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Instant;

/// What stage 1 tells stage 2 about the boot medium (key=value lines).
pub const MEDIUM_FILE: &str = "/run/kiln/medium";

/// What stage 1 recorded about the boot medium.
#[derive(Debug, Default)]
pub struct Medium {
    pub kind: String,
    pub root: String,
    pub root_bytes: u64,
    pub verity: String,
    pub verity_bytes: u64,
    pub install: Option<String>,
    pub device: Option<String>,
}

pub fn read_medium() -> Result<Medium, String> {
    let text = std::fs::read_to_string(MEDIUM_FILE).map_err(|e| format!("{MEDIUM_FILE}: {e} (stage 1 did not run: this is not a verified boot)"))?;
    let mut m = Medium::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else { continue };
        let v = v.to_string();
        match k {
            "kind" => m.kind = v,
            "root" => m.root = v,
            "root_bytes" => m.root_bytes = v.parse().unwrap_or(0),
            "verity" => m.verity = v,
            "verity_bytes" => m.verity_bytes = v.parse().unwrap_or(0),
            "install" => m.install = Some(v),
            "device" => m.device = Some(v),
            _ => {}
        }
    }
    Ok(m)
}

/// `kiln.install=/dev/X` on the kernel cmdline.
pub fn requested_on_cmdline() -> Option<String> {
    let c = std::fs::read_to_string("/proc/cmdline").ok()?;
    crate::cmdline::words(&c).into_iter().rev().find_map(|w| w.strip_prefix("kiln.install=").map(str::to_string)).filter(|s| !s.is_empty())
}

pub enum Outcome {
    Installed { target: String, bytes: u64, seconds: f64 },
    /// The target already holds this image (the medium was left in).
    AlreadyInstalled { target: String },
}

/// The kernel name of a block device node (`/dev/vda` → `vda`), following
/// symlinks such as /dev/disk/by-id/….
fn sysname(node: &str) -> Result<String, String> {
    let real = std::fs::canonicalize(node).map_err(|e| format!("{node}: {e}"))?;
    real.file_name().map(|n| n.to_string_lossy().into_owned()).ok_or_else(|| format!("{node} is not a device"))
}

/// The disk's size in bytes.
fn size_of(f: &File) -> Result<u64, String> {
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut n: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64.
    if unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64 as _, &mut n) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(n)
}

fn sector_size(f: &File) -> u32 {
    const BLKSSZGET: libc::c_ulong = 0x1268;
    let mut n: libc::c_int = 512;
    // SAFETY: BLKSSZGET writes one int.
    if unsafe { libc::ioctl(f.as_raw_fd(), BLKSSZGET as _, &mut n) } != 0 {
        return 512;
    }
    n as u32
}

/// `kiln.install_sha256=` on the cmdline: the digest of the install image
/// header the ISO was built with.
fn install_pin() -> Result<[u8; 32], String> {
    let c = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let hex = crate::cmdline::words(&c).into_iter().rev().find_map(|w| w.strip_prefix("kiln.install_sha256=").map(str::to_string));
    let hex = hex.ok_or("the cmdline has no kiln.install_sha256= (the ISO's boot entry pins its install image); rebuild the ISO with a current kiln")?;
    let b = hex.as_bytes();
    let mut out = [0u8; 32];
    if b.len() != 64 {
        return Err(format!("kiln.install_sha256={hex}: not 64 hex digits"));
    }
    for (i, pair) in b.chunks_exact(2).enumerate() {
        let d = |c: u8| (c as char).to_digit(16).ok_or_else(|| format!("kiln.install_sha256={hex}: not hex"));
        out[i] = (d(pair[0])? * 16 + d(pair[1])?) as u8;
    }
    Ok(out)
}

/// Refuses what must never be overwritten: partitions, the boot medium, a
/// mounted disk.
fn check_target(target: &str, name: &str, m: &Medium) -> Result<(), String> {
    let sys = Path::new("/sys/class/block").join(name);
    if !sys.exists() {
        return Err(format!("{target} is not a block device the kernel knows; disks present: {}", disks().join(", ")));
    }
    if sys.join("partition").exists() {
        return Err(format!("{target} is a partition; give the whole disk (for example /dev/vda, not /dev/vda1)"));
    }
    if m.device.as_deref().map(|d| d.trim_start_matches("/dev/")) == Some(name) {
        return Err(format!("{target} is the medium this node booted from"));
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if let Some(l) = mounts.lines().find(|l| l.split(' ').next().is_some_and(|d| d.trim_start_matches("/dev/").starts_with(name))) {
        return Err(format!("{target} is in use (mounted: {l})"));
    }
    Ok(())
}

/// Whole disks, for error messages.
fn disks() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/block").map(|rd| rd.flatten().map(|e| format!("/dev/{}", e.file_name().to_string_lossy())).filter(|n| !n.contains("/loop") && !n.contains("/dm-") && !n.contains("/ram")).collect()).unwrap_or_default();
    v.sort();
    v
}

/// Installs onto `target`. `why` says who asked (cmdline or node.toml).
pub fn run(target: &str, why: &str) -> Result<Outcome, String> {
    let m = read_medium()?;
    if m.kind != "iso" {
        return Err(format!("the node booted from {} (not a kiln ISO): there is no install image to write", if m.kind.is_empty() { "an unknown medium" } else { &m.kind }));
    }
    let install = m.install.clone().ok_or("the ISO has no install image (partition kiln-install): rebuild it with a current kiln")?;
    let name = sysname(target)?;
    check_target(target, &name, &m)?;
    let node = format!("/dev/{name}");

    // A disk already holding this root: the ISO was left in after the
    // install. Do not install again.
    let cmd = crate::cmdline::parse_cmdline(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default())?;
    if let Ok(f) = File::open(&node) {
        let bytes = size_of(&f).unwrap_or(0);
        if let Ok(g) = super::gpt::Gpt::read(&f, 512, bytes) {
            // A table read from the backup only may be an install cut short
            // between the two table writes: install again.
            if !g.from_backup && g.partitions().iter().any(|p| p.uuid == super::gpt::Guid::root_of(&cmd.roothash)) {
                return Ok(Outcome::AlreadyInstalled { target: node });
            }
        }
    }

    let pin = install_pin()?;
    let open = |p: &str| File::open(p).map_err(|e| format!("{p}: {e}"));
    let (mut image, mut root, mut verity) = (open(&install)?, open(&m.root)?, open(&m.verity)?);
    let dev = std::fs::OpenOptions::new().read(true).write(true).custom_flags_excl().open(&node).map_err(|e| format!("opening {node} for writing: {e}"))?;
    let bytes = size_of(&dev).map_err(|e| format!("{node}: size: {e}"))?;
    let sector = sector_size(&dev);
    if sector != 512 {
        return Err(format!("{node} has {sector}-byte logical sectors; the image's GPT is laid out for 512-byte sectors"));
    }
    console::event("install-started", &[("target", &node), ("bytes", &bytes), ("from", &why)]);
    let t0 = Instant::now();
    let mut last = 0u64;
    let report = install_image::apply_pinned(&mut image, &pin, &mut root, &mut verity, &dev, bytes, |p: install_image::Progress| {
        let pct = (p.done * 100).checked_div(p.total).unwrap_or(100);
        if pct >= last + 20 {
            last = pct;
            console::info(&format!("install: {pct}% ({} of {} bytes) {}", p.done, p.total, p.phase));
        }
    })
    .map_err(|e| format!("installing to {node}: {e}"))?;
    drop(dev);
    // Let the kernel see the new partitions (best effort; the reboot
    // follows anyway).
    super::sys::sync();
    Ok(Outcome::Installed { target: node, bytes: report.bytes_written, seconds: t0.elapsed().as_secs_f64() })
}

trait ExclOpen {
    fn custom_flags_excl(&mut self) -> &mut Self;
}

impl ExclOpen for std::fs::OpenOptions {
    /// O_EXCL on a block device: fails if anything has it open for mounting.
    fn custom_flags_excl(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_EXCL)
    }
}
