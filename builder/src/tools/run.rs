//! `kiln run`: boots a build output under QEMU with the serial console on a
//! pipe, so callers (the CLI, qemu-tests) can wait for console events, type
//! into the console, and press the ACPI power button through QMP.

use crate::arch::{Arch, Machine};
use kiln_contract::event::{self, Event};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM if a probe guest boots under it, else TCG.
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone)]
pub struct VmSpec {
    pub out_dir: PathBuf,
    /// A node.toml handed to the node through fw_cfg `opt/kiln/node.toml`.
    pub config: Option<PathBuf>,
    pub memory_mib: u32,
    pub cpus: u32,
    pub accel: Accel,
    /// Host port forwarded to the node's API port 6443 (0: none).
    pub api_port: u16,
    /// Where to copy the serial console, as it arrives.
    pub log: Option<PathBuf>,
    pub extra_args: Vec<String>,
    /// What to boot: the disk image when the output has one, else PXE files.
    pub boot: BootFrom,
    /// Boot this disk image instead of OUT/disk.raw (e.g. a modified copy).
    pub disk: Option<PathBuf>,
    /// Size of the virtual disk the guest sees (0: the image's size). The
    /// image is never modified: writes go to a qcow2 overlay.
    pub disk_size: u64,
    /// Keep guest writes across `Vm::start` calls by using this overlay.
    pub overlay: Option<PathBuf>,
    /// Keep the node across runs (`kiln run --state DIR`): the disk overlay
    /// and the UEFI variables live in DIR, made on the first run and reused
    /// by later ones (see [`State`]).
    pub state: Option<PathBuf>,
    /// A second disk (a raw file, written in place), e.g. an install target.
    pub extra_disk: Option<PathBuf>,
    /// For `BootFrom::Ipxe`: the URL QEMU's DHCP hands out as the boot file
    /// (default: `boot.ipxe` over QEMU's TFTP from OUT/pxe).
    pub ipxe_url: Option<String>,
    /// What the NIC is plugged into.
    pub net: Net,
    /// The NIC's MAC address.
    pub mac: String,
    /// UEFI boots with Secure Boot enforcing: OVMF's Secure Boot build (SMM)
    /// with Debian's snakeoil keys enrolled (`PkKek-1-snakeoil.pem` in
    /// PK, KEK and db), so only binaries signed with that key run.
    pub secure_boot: bool,
    /// The controller the boot disk (`BootFrom::Disk`) hangs off.
    pub disk_bus: DiskBus,
    /// The NIC's QEMU device model (`virtio-net-pci`, `e1000e`, `rtl8139`,
    /// `vmxnet3`, …): for trying a kernel's drivers.
    pub nic: String,
}

/// Disk controllers QEMU emulates that real machines have and its UEFI
/// firmware boots from: paravirtual, NVMe, SATA (AHCI, q35's own). (QEMU's
/// MegaRAID and LSI SAS adapters have no UEFI option ROM, so OVMF cannot
/// boot from them.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DiskBus {
    #[default]
    Virtio,
    Nvme,
    Ahci,
}

impl DiskBus {
    /// The QEMU devices for drive `d0` as the first boot device.
    fn devices(self, arch: Arch) -> Result<Vec<String>, VmError> {
        Ok(match self {
            DiskBus::Virtio => vec!["virtio-blk-pci,drive=d0,bootindex=1".into()],
            DiskBus::Nvme => vec!["nvme,drive=d0,serial=kiln0,bootindex=1".into()],
            DiskBus::Ahci if arch == Arch::Amd64 => vec!["ide-hd,drive=d0,bus=ide.0,bootindex=1".into()],
            DiskBus::Ahci => vec!["ich9-ahci,id=ahci0".into(), "ide-hd,drive=d0,bus=ahci0.0,bootindex=1".into()],
        })
    }
}

/// The network a VM's NIC is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    /// QEMU user networking: NAT to the host, with its DHCP server
    /// (10.0.2.15 for the guest) and `api_port` forwarded.
    User,
    /// A point-to-point Ethernet link to another VM: UDP datagrams between
    /// 127.0.0.1:`local` and 127.0.0.1:`remote` on the host. No DHCP, no
    /// host access; the nodes need static addresses.
    Udp { local: u16, remote: u16 },
}

impl std::str::FromStr for Net {
    type Err = String;
    /// `user`, or `udp:LOCAL:REMOTE` (host ports).
    fn from_str(s: &str) -> Result<Net, String> {
        if s == "user" {
            return Ok(Net::User);
        }
        let bad = || format!("`{s}` is not `user` or `udp:LOCAL_PORT:REMOTE_PORT` (e.g. udp:40001:40002 for one VM and udp:40002:40001 for the other)");
        let rest = s.strip_prefix("udp:").ok_or_else(bad)?;
        let (l, r) = rest.split_once(':').ok_or_else(bad)?;
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad);
        Ok(Net::Udp { local: port(l)?, remote: port(r)? })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BootFrom {
    /// The disk image when the output has one, else direct kernel boot.
    Auto,
    /// disk.raw under OVMF (through an overlay: the image is not changed).
    Disk,
    /// Direct kernel boot of pxe/vmlinuz and pxe/initramfs.cpio.zst.
    Pxe,
    /// Network boot: the NIC's iPXE ROM under SeaBIOS fetches boot.ipxe.
    Ipxe,
    /// The ISO as a CD-ROM under OVMF.
    Iso,
    /// The ISO as a USB stick under OVMF.
    IsoUsb,
    /// The ISO as a CD-ROM under SeaBIOS (isolinux).
    IsoBios,
}

impl VmSpec {
    /// A spec sized as the output's profile says (`[qemu]` memory and
    /// CPUs, in its manifest), else as [`VmSpec::new`].
    pub fn for_output(out_dir: impl Into<PathBuf>) -> VmSpec {
        let mut s = VmSpec::new(out_dir);
        if let Some(q) = qemu_info(&s.out_dir) {
            s.memory_mib = q.memory_mib;
            s.cpus = q.cpus;
        }
        s
    }

    pub fn new(out_dir: impl Into<PathBuf>) -> VmSpec {
        VmSpec {
            out_dir: out_dir.into(),
            config: None,
            memory_mib: 2048,
            cpus: 2,
            accel: Accel::Auto,
            api_port: 0,
            log: None,
            extra_args: Vec::new(),
            boot: BootFrom::Auto,
            disk: None,
            disk_size: 0,
            overlay: None,
            state: None,
            extra_disk: None,
            ipxe_url: None,
            net: Net::User,
            mac: "52:54:00:12:34:56".into(),
            secure_boot: false,
            disk_bus: DiskBus::Virtio,
            nic: "virtio-net-pci".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0}")]
    Setup(String),
    #[error("timed out after {secs}s waiting for {what}; the last console lines:\n{tail}")]
    Timeout { what: String, secs: u64, tail: String },
    #[error("QEMU exited ({status}) while waiting for {what}; the last console lines:\n{tail}")]
    Exited { what: String, status: String, tail: String },
    #[error("QMP: {0}")]
    Qmp(String),
}

#[derive(Default)]
struct Console {
    lines: Vec<String>,
    closed: bool,
}

/// The running QEMU. A board that cannot reset itself gets a new one (see
/// [`Machine::resets_itself`]), so this is shared with the console reader.
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Set by [`Vm::kill`]: no more restarts.
    stopped: bool,
    /// How many times QEMU was restarted for the guest.
    restarts: u32,
}

pub struct Vm {
    proc: Arc<Mutex<Proc>>,
    console: Arc<(Mutex<Console>, Condvar)>,
    cursor: usize,
    qmp: PathBuf,
    _dir: tempfile::TempDir,
    pub accel: Accel,
}

/// What the guest does when its console shows `line`, on a machine that
/// cannot reset itself: Linux (`reboot: Restarting system`, a panic's
/// `Rebooting in N seconds..`, the arm fallback `Reboot failed -- System
/// halted`) or u-boot (`resetting ...`) asking for a reset, or Linux powering
/// off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wants {
    Reset,
    PowerOff,
}

fn wants(line: &str) -> Option<Wants> {
    let l = line.trim();
    if l.contains("reboot: Restarting system") || l.contains("Reboot failed -- System halted") || l.starts_with("resetting ...") || (l.contains("Rebooting in ") && l.contains(" seconds")) {
        Some(Wants::Reset)
    } else if l.contains("reboot: Power down") || l.contains("reboot: System halted") {
        Some(Wants::PowerOff)
    } else {
        None
    }
}

/// Sends one QMP command to the QEMU listening on `sock` and returns its
/// reply line.
fn qmp_call(sock: &Path, execute: &str, arguments: &serde_json::Value) -> Result<String, VmError> {
    let mut s = std::os::unix::net::UnixStream::connect(sock).map_err(|e| VmError::Qmp(format!("{}: {e}", sock.display())))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| VmError::Qmp(e.to_string()))?;
    let mut r = BufReader::new(s.try_clone().map_err(|e| VmError::Qmp(e.to_string()))?);
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| VmError::Qmp(format!("greeting: {e}")))?;
    let none = serde_json::json!({});
    for (cmd, args) in [("qmp_capabilities", &none), (execute, arguments)] {
        writeln!(s, "{}", serde_json::json!({ "execute": cmd, "arguments": args })).map_err(|e| VmError::Qmp(e.to_string()))?;
        loop {
            line.clear();
            r.read_line(&mut line).map_err(|e| VmError::Qmp(format!("{cmd}: {e}")))?;
            if line.is_empty() {
                return Err(VmError::Qmp(format!("{cmd}: connection closed")));
            }
            if line.contains("\"return\"") || line.contains("\"error\"") {
                break;
            }
        }
        if line.contains("\"error\"") {
            return Err(VmError::Qmp(format!("{cmd}: {}", line.trim())));
        }
    }
    Ok(line.trim().to_string())
}

/// Stops a QEMU as a reset or power cut would leave its disks: `quit`
/// through QMP, so what the guest wrote reaches the card image (the image
/// format's own metadata included), then a kill if it does not exit.
fn stop_qemu(child: &mut Child, sock: &Path) {
    if qmp_call(sock, "quit", &serde_json::json!({})).is_ok() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The console line kiln run adds when it restarts QEMU for the guest.
pub const RESTART_NOTE: &str = "kiln run: the guest asked for a reset, which QEMU cannot do on this machine; restarting QEMU with the same card";

type Sink = (Arc<(Mutex<Console>, Condvar)>, Arc<Mutex<Option<std::fs::File>>>);

fn push_line(sink: &Sink, line: String) {
    if let Ok(mut l) = sink.1.lock() {
        if let Some(f) = l.as_mut() {
            let _ = writeln!(f, "{line}");
        }
    }
    let (m, cv) = &*sink.0;
    if let Ok(mut c) = m.lock() {
        c.lines.push(line);
    }
    cv.notify_all();
}

/// Copies `stream` into the console, line by line, until it ends; calls
/// `on_line` with each (stdout only) and returns what it returned last that
/// was not `None`.
fn pump(stream: impl Read, prefix: &str, sink: &Sink, mut on_line: impl FnMut(&str) -> bool) {
    let mut r = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = format!("{prefix}{}", String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']));
                let stop = on_line(&line);
                push_line(sink, line);
                if stop {
                    return;
                }
            }
        }
    }
}

fn spawn_stderr(stderr: Option<std::process::ChildStderr>, sink: &Sink) {
    if let Some(e) = stderr {
        let sink = sink.clone();
        std::thread::spawn(move || pump(e, "qemu: ", &sink, |_| false));
    }
}

fn manifest_field(out: &Path, key: &str) -> Result<String, VmError> {
    let p = out.join("manifest.json");
    let text = std::fs::read_to_string(&p).map_err(|e| VmError::Setup(format!("{}: {e}. Is this a `kiln build` output directory?", p.display())))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| VmError::Setup(format!("{}: {e}", p.display())))?;
    v.get(key).and_then(|x| x.as_str()).map(str::to_string).ok_or_else(|| VmError::Setup(format!("{}: no `{key}`", p.display())))
}

fn arch_of(out: &Path) -> Result<Arch, VmError> {
    match manifest_field(out, "arch")?.as_str() {
        "amd64" => Ok(Arch::Amd64),
        "arm64" => Ok(Arch::Arm64),
        "armv7" => Ok(Arch::Armv7),
        other => Err(VmError::Setup(format!("unknown arch `{other}` in the manifest"))),
    }
}

/// The machine the output is for (the manifest's `qemu.machine`; outputs
/// from before kiln recorded it get their arch's default).
fn machine_of(out: &Path, arch: Arch) -> Result<Machine, VmError> {
    match qemu_info(out) {
        Some(q) => Machine::parse(&q.machine, arch).map_err(|e| VmError::Setup(format!("{}: {e}", out.join("manifest.json").display()))),
        None => Ok(Machine::default_for(arch)),
    }
}

fn qemu_info(out: &Path) -> Option<crate::provenance::manifest::QemuInfo> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).ok()?).ok()?;
    serde_json::from_value(v.get("qemu")?.clone()).ok()
}

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// Debian's Secure Boot OVMF (needs SMM) and its variables with the
/// snakeoil certificate enrolled as PK, KEK and db (ovmf's README.Debian).
const OVMF_CODE_SECBOOT: &str = "/usr/share/OVMF/OVMF_CODE_4M.snakeoil.fd";
const OVMF_VARS_SNAKEOIL: &str = "/usr/share/OVMF/OVMF_VARS_4M.snakeoil.fd";

/// The firmware `kiln build` copies beside an armv7 card, which `kiln run`
/// passes to `-bios`.
pub use crate::image::sdcard::UBOOT_BIN;

/// AAVMF: EDK2 for QEMU virt on arm64 (Debian qemu-efi-aarch64), 64 MiB
/// flash images as QEMU wants them.
const AAVMF_CODE: &str = "/usr/share/AAVMF/AAVMF_CODE.fd";
const AAVMF_VARS: &str = "/usr/share/AAVMF/AAVMF_VARS.fd";

/// The one `*.iso` in a build output.
fn find_iso(out: &Path) -> Result<PathBuf, VmError> {
    let mut isos: Vec<PathBuf> = std::fs::read_dir(out).map_err(|e| VmError::Setup(format!("{}: {e}", out.display())))?.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "iso")).collect();
    isos.sort();
    isos.into_iter().next().ok_or_else(|| VmError::Setup(format!("{}: no .iso; build a profile with `outputs = [\"iso\"]`", out.display())))
}

/// What `kiln run --state DIR` keeps between runs, so a node reboots into
/// what it wrote (its /var, an applied update, its boot counters):
/// `DIR/disk.qcow2`, the disk overlay over the image, and `DIR/efivars.fd`,
/// the UEFI variables. `DIR/image` records the image the overlay sits on:
/// a rebuilt image (other size or time) or another firmware does not match
/// the kept disk, and is refused rather than booted over it.
pub struct State;

impl State {
    pub const DISK: &'static str = "disk.qcow2";
    pub const VARS: &'static str = "efivars.fd";
    pub const IMAGE: &'static str = "image";

    /// What identifies the image (and firmware) a state belongs to.
    fn identity(disk: &Path, firmware: &str) -> Result<String, VmError> {
        use std::os::unix::fs::MetadataExt;
        let abs = disk.canonicalize().map_err(|e| VmError::Setup(format!("{}: {e}", disk.display())))?;
        let m = std::fs::metadata(&abs).map_err(|e| VmError::Setup(format!("{}: {e}", abs.display())))?;
        Ok(format!("image = {}\nbytes = {}\nmodified = {}.{:09}\nfirmware = {firmware}\n", abs.display(), m.len(), m.mtime(), m.mtime_nsec()))
    }

    /// Makes DIR (first run) or checks that it belongs to this image and
    /// firmware (later runs).
    fn open(dir: &Path, disk: &Path, firmware: &str) -> Result<(), VmError> {
        let want = State::identity(disk, firmware)?;
        let record = dir.join(State::IMAGE);
        match std::fs::read_to_string(&record) {
            Ok(have) if have == want => Ok(()),
            Ok(have) => {
                let field = |t: &str, k: &str| t.lines().find_map(|l| l.strip_prefix(&format!("{k} = ")).map(str::to_string)).unwrap_or_default();
                let why = if field(&have, "image") != field(&want, "image") {
                    format!("it keeps a node of {}, not of {}", field(&have, "image"), field(&want, "image"))
                } else if field(&have, "firmware") != field(&want, "firmware") {
                    format!("it was made with the {} firmware, not {} (--secure-boot must be the same on every run)", field(&have, "firmware"), field(&want, "firmware"))
                } else {
                    format!("{} was rebuilt since the state was made, so the kept disk no longer matches it", disk.display())
                };
                Err(VmError::Setup(format!("--state {}: {why}; remove {} to start the node afresh, or give another --state directory", dir.display(), dir.display())))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if dir.join(State::DISK).exists() {
                    return Err(VmError::Setup(format!("--state {}: it holds {} but no {} record, so which image it belongs to is unknown; remove it to start afresh", dir.display(), State::DISK, State::IMAGE)));
                }
                std::fs::create_dir_all(dir).map_err(|e| VmError::Setup(format!("--state {}: {e}", dir.display())))?;
                let tmp = dir.join(format!(".{}.tmp", State::IMAGE));
                std::fs::write(&tmp, &want).and_then(|_| std::fs::rename(&tmp, &record)).map_err(|e| VmError::Setup(format!("--state {}: {e}", dir.display())))
            }
            Err(e) => Err(VmError::Setup(format!("--state {}: {e}", record.display()))),
        }
    }
}

/// A qcow2 overlay over the disk image, so the image itself is never
/// written; reused when the spec names an existing one (or `--state` has
/// one).
fn overlay_for(spec: &VmSpec, disk: &Path, scratch: &Path) -> Result<PathBuf, VmError> {
    let kept = spec.overlay.clone().or_else(|| spec.state.as_ref().map(|s| s.join(State::DISK)));
    if let Some(o) = kept.as_ref().filter(|o| o.exists()) {
        return Ok(o.clone());
    }
    let path = kept.unwrap_or_else(|| scratch.join("disk.qcow2"));
    let abs = disk.canonicalize().map_err(|e| VmError::Setup(format!("{}: {e}", disk.display())))?;
    let mut q = Command::new("qemu-img");
    q.args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"]).arg(&abs).arg(&path);
    if spec.disk_size > 0 {
        q.arg(spec.disk_size.to_string());
    }
    let r = q.output().map_err(|e| VmError::Setup(format!("qemu-img: {e} (apt-get install qemu-utils)")))?;
    if !r.status.success() {
        return Err(VmError::Setup(format!("qemu-img create: {}", String::from_utf8_lossy(&r.stderr).trim())));
    }
    Ok(path)
}

/// The QEMU command line for a build output. `scratch` holds the firmware
/// variables and the disk overlay.
/// For a PXE boot: refuses `memory_mib` below what the bundle's root needs
/// in RAM (`pxe/root.sizes`, written beside the initramfs), naming it; the
/// node itself would stop in stage 1 and say the same.
pub fn check_pxe_ram(spec: &VmSpec) -> Result<(), String> {
    let disk = spec.disk.clone().unwrap_or_else(|| spec.out_dir.join(if arch_of(&spec.out_dir).ok() == Some(Arch::Armv7) { "sdcard.img" } else { "disk.raw" }));
    let loads_initramfs = match spec.boot {
        BootFrom::Pxe | BootFrom::Ipxe => true,
        BootFrom::Auto => !disk.exists(),
        _ => false,
    };
    if !loads_initramfs {
        return Ok(());
    }
    let path = spec.out_dir.join(crate::image::pxe::SIZES_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
    let sizes = kiln_contract::pxe::RamRoot::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let need = sizes.min_ram_mib();
    if u64::from(spec.memory_mib) < need {
        return Err(format!(
            "this PXE bundle's root ({} MiB, with its hash tree) is unpacked into RAM: a node needs at least {need} MiB to boot it, and --mem is {} MiB. Give --mem {need} or more, or boot the disk or ISO image",
            (sizes.root_bytes + sizes.verity_bytes).div_ceil(1 << 20),
            spec.memory_mib
        ));
    }
    Ok(())
}

pub fn command(spec: &VmSpec, accel: Accel, qmp: &Path, scratch: &Path) -> Result<Command, VmError> {
    let out = &spec.out_dir;
    let arch = arch_of(out)?;
    let pxe = out.join("pxe");
    // armv7 boots its SD-card image through u-boot; the others a GPT disk
    // through UEFI.
    let disk = spec.disk.clone().unwrap_or_else(|| out.join(if arch == Arch::Armv7 { "sdcard.img" } else { "disk.raw" }));
    let boot = match spec.boot {
        BootFrom::Auto if disk.exists() => BootFrom::Disk,
        BootFrom::Auto => BootFrom::Pxe,
        b => b,
    };
    let m = machine_of(out, arch)?;
    if let Some(st) = &spec.state {
        if boot != BootFrom::Disk {
            return Err(VmError::Setup(format!("--state keeps a disk between runs, for a disk boot (--boot disk), not {boot:?}; a PXE or ISO node keeps its /var on --extra-disk (storage.var_disk in its node config)")));
        }
        if !disk.is_file() {
            return Err(VmError::Setup(format!("{}: no disk image to keep a state of; build a profile with `outputs = [\"disk\"]` (or \"sdcard\")", disk.display())));
        }
        let firmware = match arch {
            _ if m.is_board() => m.as_str(),
            Arch::Amd64 if spec.secure_boot => "ovmf-secure-boot",
            Arch::Amd64 => "ovmf",
            Arch::Arm64 => "aavmf",
            Arch::Armv7 => "u-boot",
        };
        State::open(st, &disk, firmware)?;
    }
    if m.is_board() {
        return board_command(spec, m, boot, &disk, accel, qmp, scratch);
    }
    let (bin, machine) = match arch {
        Arch::Amd64 => ("qemu-system-x86_64", "q35"),
        Arch::Arm64 => ("qemu-system-aarch64", "virt"),
        // No LPAE in the kernel: keep every device below 4 GiB.
        Arch::Armv7 => ("qemu-system-arm", "virt,highmem=off"),
    };
    let mut c = Command::new(bin);
    c.args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio"]);
    let uefi = matches!(boot, BootFrom::Disk | BootFrom::Iso | BootFrom::IsoUsb) && arch != Arch::Armv7;
    if spec.secure_boot && (!uefi || arch != Arch::Amd64) {
        return Err(VmError::Setup(format!("Secure Boot needs a UEFI boot on amd64 (--boot disk, iso or iso-usb), not {boot:?} on {arch}")));
    }
    // Secure Boot OVMF keeps its variables behind SMM, which q35 has.
    let machine = if spec.secure_boot { "q35,smm=on" } else { machine };
    c.args(["-M", machine, "-accel", if accel == Accel::Kvm { "kvm" } else { "tcg" }]);
    match arch {
        Arch::Arm64 => c.args(["-cpu", "cortex-a57"]),
        Arch::Armv7 => c.args(["-cpu", "cortex-a15"]),
        Arch::Amd64 => &mut c,
    };
    c.args(["-m", &spec.memory_mib.to_string(), "-smp", &spec.cpus.to_string()]);
    if boot == BootFrom::IsoBios && arch != Arch::Amd64 {
        return Err(VmError::Setup(format!("{arch} has no BIOS boot; boot the ISO with --boot iso (UEFI)")));
    }
    if !matches!(boot, BootFrom::Pxe | BootFrom::Disk) && arch == Arch::Armv7 {
        return Err(VmError::Setup(format!("{arch} boots its SD card (--boot disk) or the PXE kernel (--boot pxe), not {boot:?}")));
    }
    if arch == Arch::Armv7 && boot == BootFrom::Disk {
        // u-boot for QEMU, from the board overlay, is the firmware.
        let bios = out.join(UBOOT_BIN);
        if !bios.is_file() {
            return Err(VmError::Setup(format!("{}: missing; build a profile whose board has a `bios` (board = \"qemu-armv7\")", bios.display())));
        }
        c.arg("-bios").arg(bios);
    }
    if uefi {
        let (code, vars_template, package) = match arch {
            Arch::Amd64 if spec.secure_boot => (OVMF_CODE_SECBOOT, OVMF_VARS_SNAKEOIL, "ovmf"),
            Arch::Amd64 => (OVMF_CODE, OVMF_VARS, "ovmf"),
            _ => (AAVMF_CODE, AAVMF_VARS, "qemu-efi-aarch64"),
        };
        if !Path::new(code).exists() {
            return Err(VmError::Setup(format!("{code} is missing: apt-get install {package}")));
        }
        if spec.secure_boot {
            c.args(["-global", "driver=cfi.pflash01,property=secure,value=on"]);
        }
        let vars = match &spec.state {
            Some(s) => s.join(State::VARS),
            None => scratch.join("OVMF_VARS.fd"),
        };
        if spec.state.is_none() || !vars.exists() {
            let tmp = vars.with_extension("tmp");
            std::fs::copy(vars_template, &tmp).and_then(|_| std::fs::rename(&tmp, &vars)).map_err(|e| VmError::Setup(format!("copying {vars_template} to {}: {e}", vars.display())))?;
        }
        c.arg("-drive").arg(format!("if=pflash,format=raw,unit=0,readonly=on,file={code}"));
        c.arg("-drive").arg(format!("if=pflash,format=raw,unit=1,file={}", vars.display()));
    }
    match boot {
        BootFrom::Disk => {
            if !disk.is_file() {
                return Err(VmError::Setup(format!("{}: no disk image; build a profile with `outputs = [\"disk\"]`", disk.display())));
            }
            let overlay = overlay_for(spec, &disk, scratch)?;
            c.arg("-drive").arg(format!("if=none,id=d0,format=qcow2,file={}", overlay.display()));
            for d in spec.disk_bus.devices(arch)? {
                c.arg("-device").arg(d);
            }
        }
        BootFrom::Iso | BootFrom::IsoUsb | BootFrom::IsoBios => {
            let iso = match &spec.disk {
                Some(d) => d.clone(),
                None => find_iso(out)?,
            };
            c.arg("-drive").arg(format!("if=none,id=iso,format=raw,readonly=on,file={}", iso.display()));
            if boot == BootFrom::IsoUsb {
                c.args(["-device", "qemu-xhci,id=xhci", "-device", "usb-storage,bus=xhci.0,drive=iso,removable=on,bootindex=1"]);
            } else if arch != Arch::Amd64 {
                // QEMU virt has no IDE: the CD sits on virtio-scsi.
                c.args(["-device", "virtio-scsi-pci,id=scsi0", "-device", "scsi-cd,bus=scsi0.0,drive=iso,bootindex=1"]);
            } else {
                c.args(["-device", "ide-cd,drive=iso,bus=ide.0,bootindex=1"]);
            }
        }
        BootFrom::Pxe => {
            if !pxe.join("vmlinuz").exists() {
                return Err(VmError::Setup(format!("{} has neither disk.raw nor pxe/vmlinuz; is this a `kiln build` output?", out.display())));
            }
            let cmdline = std::fs::read_to_string(pxe.join("cmdline")).map_err(|e| VmError::Setup(format!("{}: {e}", pxe.join("cmdline").display())))?;
            c.arg("-kernel").arg(pxe.join("vmlinuz"));
            c.arg("-initrd").arg(pxe.join("initramfs.cpio.zst"));
            c.arg("-append").arg(cmdline.trim());
        }
        BootFrom::Ipxe | BootFrom::Auto => {}
    }
    if let Some(x) = &spec.extra_disk {
        c.arg("-drive").arg(format!("if=none,id=x0,format=raw,file={}", x.display()));
        c.args(["-device", "virtio-blk-pci,drive=x0,bootindex=2"]);
    }
    if kiln_contract::config::parse_mac(&spec.mac).is_none() {
        return Err(VmError::Setup(format!("`{}` is not a MAC address like 52:54:00:12:34:56", spec.mac)));
    }
    let mac = &spec.mac;
    let mut netdev = netdev(spec);
    if boot == BootFrom::Ipxe && spec.net != Net::User {
        return Err(VmError::Setup("network boot (iPXE) needs user networking, for QEMU's DHCP and TFTP".into()));
    }
    if boot == BootFrom::Ipxe {
        if !pxe.join("boot.ipxe").exists() {
            return Err(VmError::Setup(format!("{}: no PXE bundle; build a profile with `outputs = [\"pxe\"]`", pxe.display())));
        }
        netdev.push_str(&format!(",tftp={}", pxe.display()));
        netdev.push_str(&format!(",bootfile={}", spec.ipxe_url.as_deref().unwrap_or("boot.ipxe")));
        c.args(["-netdev", &netdev, "-device", &format!("virtio-net-pci,netdev=n0,mac={mac},bootindex=1")]);
    } else {
        if spec.nic.is_empty() || spec.nic.contains(',') {
            return Err(VmError::Setup(format!("`{}` is not a QEMU NIC model (e.g. virtio-net-pci, e1000e, rtl8139, vmxnet3; `qemu-system-x86_64 -device help` lists them)", spec.nic)));
        }
        c.args(["-netdev", &netdev, "-device", &format!("{},netdev=n0,mac={mac},romfile=", spec.nic)]);
    }
    c.args(["-device", "virtio-rng-pci"]);
    // A watchdog (kiln-init arms it): a hung guest resets, as on hardware.
    c.args(["-device", "i6300esb", "-action", "watchdog=reset"]);
    if let Some(cfg) = &spec.config {
        if !cfg.is_file() {
            return Err(VmError::Setup(format!("--config {}: no such file", cfg.display())));
        }
        c.arg("-fw_cfg").arg(format!("name=opt/kiln/node.toml,file={}", cfg.display()));
        // A signed config travels with its signature.
        let sig = PathBuf::from(format!("{}.minisig", cfg.display()));
        if sig.is_file() {
            c.arg("-fw_cfg").arg(format!("name=opt/kiln/node.toml.minisig,file={}", sig.display()));
        }
    }
    c.arg("-qmp").arg(format!("unix:{},server=on,wait=off", qmp.display()));
    c.args(&spec.extra_args);
    Ok(c)
}

impl Vm {
    pub fn start(spec: &VmSpec) -> Result<Vm, VmError> {
        let accel = match spec.accel {
            Accel::Auto => {
                if kvm_usable(spec) {
                    Accel::Kvm
                } else {
                    Accel::Tcg
                }
            }
            a => a,
        };
        let dir = tempfile::tempdir().map_err(|e| VmError::Setup(e.to_string()))?;
        let qmp = dir.path().join("qmp.sock");
        let mut cmd = command(spec, accel, &qmp, dir.path())?;
        let resets_itself = arch_of(&spec.out_dir).and_then(|a| machine_of(&spec.out_dir, a)).map(|m| m.resets_itself()).unwrap_or(true);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        tracing::debug!("{cmd:?}");
        let mut child = cmd.spawn().map_err(|e| VmError::Setup(format!("cannot start QEMU: {e}. Install qemu-system-x86 / qemu-system-arm")))?;
        let console = Arc::new((Mutex::new(Console::default()), Condvar::new()));
        let log = match &spec.log {
            Some(p) => Some(std::fs::File::create(p).map_err(|e| VmError::Setup(format!("{}: {e}", p.display())))?),
            None => None,
        };
        let sink: Sink = (console.clone(), Arc::new(Mutex::new(log)));
        let stdout = child.stdout.take();
        spawn_stderr(child.stderr.take(), &sink);
        let stdin = child.stdin.take();
        let proc = Arc::new(Mutex::new(Proc { child, stdin, stopped: false, restarts: 0 }));
        let shared = proc.clone();
        let sock = qmp.clone();
        std::thread::spawn(move || {
            let mut stdout = stdout;
            while let Some(out) = stdout.take() {
                let mut asked = None;
                pump(out, "", &sink, |l| {
                    asked = if resets_itself { None } else { wants(l) };
                    asked.is_some()
                });
                // The guest asked for a reset or power-off that the machine
                // cannot do: do it from outside.
                let Some(w) = asked else { break };
                let Ok(mut p) = shared.lock() else { break };
                if p.stopped {
                    break;
                }
                stop_qemu(&mut p.child, &sock);
                if w == Wants::PowerOff {
                    break;
                }
                push_line(&sink, RESTART_NOTE.to_string());
                match cmd.spawn() {
                    Ok(mut c) => {
                        stdout = c.stdout.take();
                        spawn_stderr(c.stderr.take(), &sink);
                        p.stdin = c.stdin.take();
                        p.child = c;
                        p.restarts += 1;
                    }
                    Err(e) => push_line(&sink, format!("kiln run: restarting QEMU failed: {e}")),
                }
            }
            let (m, cv) = &*sink.0;
            if let Ok(mut c) = m.lock() {
                c.closed = true;
            }
            cv.notify_all();
        });
        Ok(Vm { proc, console, cursor: 0, qmp, _dir: dir, accel })
    }

    /// How many times QEMU was restarted because the guest asked for a reset
    /// its machine cannot do.
    pub fn restarts(&self) -> u32 {
        self.proc.lock().map(|p| p.restarts).unwrap_or(0)
    }

    /// The last `n` console lines.
    pub fn tail(&self, n: usize) -> String {
        let c = self.console.0.lock().map(|c| c.lines.clone()).unwrap_or_default();
        c[c.len().saturating_sub(n)..].join("\n")
    }

    /// The whole console so far.
    pub fn log(&self) -> Vec<String> {
        self.console.0.lock().map(|c| c.lines.clone()).unwrap_or_default()
    }

    /// Waits for a console line after the cursor that matches, and moves the
    /// cursor past it.
    pub fn wait_for(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<String, VmError> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.console;
        let mut c = m.lock().map_err(|_| VmError::Setup("console lock poisoned".into()))?;
        loop {
            while self.cursor < c.lines.len() {
                let line = &c.lines[self.cursor];
                self.cursor += 1;
                if pred(line) {
                    return Ok(line.clone());
                }
            }
            if c.closed {
                drop(c);
                let status = self.proc.lock().map_err(|_| VmError::Setup("QEMU lock poisoned".into()))?.child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                return Err(VmError::Exited { what: what.into(), status, tail: self.tail(40) });
            }
            let now = Instant::now();
            if now >= deadline {
                drop(c);
                return Err(VmError::Timeout { what: what.into(), secs: timeout.as_secs(), tail: self.tail(40) });
            }
            c = cv.wait_timeout(c, deadline - now).map_err(|_| VmError::Setup("console lock poisoned".into()))?.0;
        }
    }

    /// Waits for the next `kiln-init: <name>` event.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Event, VmError> {
        let line = self.wait_for(&format!("event `{name}`"), timeout, |l| event::parse(l).is_some_and(|e| e.name == name))?;
        event::parse(&line).ok_or_else(|| VmError::Setup("event vanished".into()))
    }

    /// Types into the serial console.
    pub fn send(&mut self, text: &str) -> Result<(), VmError> {
        let mut p = self.proc.lock().map_err(|_| VmError::Setup("QEMU lock poisoned".into()))?;
        let s = p.stdin.as_mut().ok_or_else(|| VmError::Setup("console input is closed".into()))?;
        s.write_all(text.as_bytes()).and_then(|_| s.flush()).map_err(|e| VmError::Setup(format!("writing to the console: {e}")))
    }

    /// Sends a QMP command and returns its reply line.
    pub fn qmp(&self, execute: &str) -> Result<String, VmError> {
        self.qmp_with(execute, &serde_json::json!({}))
    }

    /// Sends a QMP command with arguments (e.g. `device_add` of a USB
    /// stick) and returns its reply line.
    pub fn qmp_with(&self, execute: &str, arguments: &serde_json::Value) -> Result<String, VmError> {
        qmp_call(&self.qmp, execute, arguments)
    }

    /// Presses the ACPI power button.
    pub fn powerdown(&self) -> Result<(), VmError> {
        self.qmp("system_powerdown").map(|_| ())
    }

    /// Waits for QEMU to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus, VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            let done = self.proc.lock().ok().and_then(|mut p| p.child.try_wait().ok().flatten());
            if let Some(s) = done {
                // Let the reader threads drain the last output.
                std::thread::sleep(Duration::from_millis(200));
                return Ok(s);
            }
            if Instant::now() >= deadline {
                return Err(VmError::Timeout { what: "QEMU to exit".into(), secs: timeout.as_secs(), tail: self.tail(40) });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn kill(&mut self) {
        if let Ok(mut p) = self.proc.lock() {
            p.stopped = true;
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `-netdev` options for the spec's network (id `n0`).
fn netdev(spec: &VmSpec) -> String {
    let mut netdev = match spec.net {
        Net::User => "user,id=n0".to_string(),
        Net::Udp { local, remote } => format!("socket,id=n0,udp=127.0.0.1:{remote},localaddr=127.0.0.1:{local}"),
    };
    if spec.api_port != 0 && spec.net == Net::User {
        netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{}-:6443", spec.api_port));
    }
    netdev
}

/// The QEMU command line for an emulated board (`-M orangepi-pc`): no
/// `-bios`, the emulated boot ROM starts the SPL from the card. The card is
/// an SD card (a qcow2 overlay, its size rounded up to the power of two
/// QEMU's SD model wants; the image is never written), the NIC is the SoC's
/// own, and the node config and the extra disk are USB sticks on the SoC's
/// EHCI (a board has no fw_cfg): the config as a `KILNCFG` FAT volume.
fn board_command(spec: &VmSpec, m: Machine, boot: BootFrom, disk: &Path, accel: Accel, qmp: &Path, scratch: &Path) -> Result<Command, VmError> {
    if boot != BootFrom::Disk {
        return Err(VmError::Setup(format!("`{m}` boots its SD card (--boot disk), not {boot:?}")));
    }
    if accel == Accel::Kvm {
        return Err(VmError::Setup(format!("`{m}` is emulated with TCG only")));
    }
    if spec.secure_boot {
        return Err(VmError::Setup(format!("Secure Boot needs a UEFI boot on amd64, not `{m}`")));
    }
    if let Some(max) = m.max_memory_mib().filter(|max| spec.memory_mib > *max) {
        return Err(VmError::Setup(format!("`{m}` takes at most {max} MiB of memory, not {}", spec.memory_mib)));
    }
    if let Some(n) = m.fixed_cpus().filter(|n| spec.cpus != *n) {
        return Err(VmError::Setup(format!("`{m}` has {n} cores in QEMU, not {}", spec.cpus)));
    }
    if !disk.is_file() {
        return Err(VmError::Setup(format!("{}: no card image; build a profile with `outputs = [\"sdcard\"]`", disk.display())));
    }
    if kiln_contract::config::parse_mac(&spec.mac).is_none() {
        return Err(VmError::Setup(format!("`{}` is not a MAC address like 52:54:00:12:34:56", spec.mac)));
    }
    let image = std::fs::metadata(disk).map_err(|e| VmError::Setup(format!("{}: {e}", disk.display())))?.len();
    let mut sized = spec.clone();
    sized.disk_size = spec.disk_size.max(image).next_power_of_two();
    let overlay = overlay_for(&sized, disk, scratch)?;
    let mut c = Command::new("qemu-system-arm");
    c.args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-M", m.as_str(), "-accel", "tcg"]);
    c.args(["-m", &spec.memory_mib.to_string(), "-smp", &spec.cpus.to_string()]);
    c.arg("-drive").arg(format!("if=sd,format=qcow2,file={}", overlay.display()));
    // The SoC's own NIC: `-nic` wires it to the network (no `-device`).
    c.args(["-nic", &format!("{},mac={}", netdev(spec).replacen(",id=n0", "", 1), spec.mac)]);
    // EHCI1 and EHCI2: EHCI0 shares its port with the OTG controller.
    let mut buses = ["usb-bus.1", "usb-bus.2"].into_iter();
    let mut stick = |id: &str, file: &Path| {
        let bus = buses.next().unwrap_or("usb-bus.3");
        c.arg("-drive").arg(format!("if=none,id={id},format=raw,file={}", file.display()));
        c.args(["-device", &format!("usb-storage,bus={bus},drive={id},removable=on")]);
    };
    if let Some(cfg) = &spec.config {
        stick("cfg", &config_stick(cfg, scratch)?);
    }
    if let Some(x) = &spec.extra_disk {
        stick("x0", x);
    }
    c.arg("-qmp").arg(format!("unix:{},server=on,wait=off", qmp.display()));
    c.args(&spec.extra_args);
    Ok(c)
}

/// A `KILNCFG` FAT stick in `scratch` with `node.toml` (and its
/// `.minisig` when there is one), for machines without fw_cfg.
fn config_stick(cfg: &Path, scratch: &Path) -> Result<PathBuf, VmError> {
    use kiln_formats::fat::{FatBuilder, FileContent};
    let read = |p: &Path| std::fs::read(p).map_err(|e| VmError::Setup(format!("--config {}: {e}", p.display())));
    let mut fat = FatBuilder::new("KILNCFG", 0x6b69_6c6e);
    let mut add = |name: &str, bytes: Vec<u8>| fat.add_file(name, FileContent::Bytes(bytes)).map_err(|e| VmError::Setup(format!("the config stick: {e}")));
    add("/node.toml", read(cfg)?)?;
    let sig = PathBuf::from(format!("{}.minisig", cfg.display()));
    if sig.is_file() {
        add("/node.toml.minisig", read(&sig)?)?;
    }
    let path = scratch.join("kilncfg.img");
    let mut f = std::fs::File::create(&path).map_err(|e| VmError::Setup(format!("{}: {e}", path.display())))?;
    fat.write(fat.min_size(), &mut f).map_err(|e| VmError::Setup(format!("writing {}: {e}", path.display())))?;
    Ok(path)
}

/// KVM is used only when a guest really boots under it: on nested machines
/// /dev/kvm can exist while guests hang. The verdict is kept per QEMU binary
/// for the session in the cache directory.
fn kvm_usable(spec: &VmSpec) -> bool {
    if std::env::consts::ARCH != "x86_64" || arch_of(&spec.out_dir).ok() != Some(Arch::Amd64) {
        return false;
    }
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        return false;
    }
    let verdict = crate::inputs::cache::Cache::default_location().root().join("kvm-verdict");
    if let Ok(v) = std::fs::read_to_string(&verdict) {
        return v.trim() == "works";
    }
    let kernel = spec.out_dir.join("pxe/vmlinuz");
    if !kernel.exists() {
        return false;
    }
    // A kernel with no root panics at once; panic=-1 and -no-reboot make QEMU
    // exit. Under a working KVM that takes well under the limit.
    let child = Command::new("qemu-system-x86_64")
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-M", "q35", "-accel", "kvm", "-m", "256", "-no-reboot"])
        .arg("-kernel")
        .arg(&kernel)
        .args(["-append", "console=ttyS0 panic=-1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else { return false };
    let deadline = Instant::now() + Duration::from_secs(20);
    let works = loop {
        match child.try_wait() {
            Ok(Some(_)) => {
                let mut out = String::new();
                if let Some(mut s) = child.stdout.take() {
                    let _ = s.read_to_string(&mut out);
                }
                break out.contains("Kernel panic");
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break false;
            }
        }
    };
    if let Some(parent) = verdict.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let _ = std::fs::write(&verdict, if works { "works\n" } else { "broken\n" });
    if !works {
        tracing::warn!("KVM is present but a test guest did not boot under it; using TCG (delete {} to probe again)", verdict.display());
    }
    works
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_belongs_to_one_image_and_firmware() {
        let t = tempfile::tempdir().unwrap();
        let disk = t.path().join("disk.raw");
        std::fs::write(&disk, vec![0u8; 4096]).unwrap();
        let st = t.path().join("node1");
        State::open(&st, &disk, "ovmf").unwrap();
        assert!(st.join(State::IMAGE).is_file());
        // The same image and firmware: reused.
        State::open(&st, &disk, "ovmf").unwrap();
        let err = |fw: &str, d: &Path| match State::open(&st, d, fw) {
            Err(VmError::Setup(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        };
        let m = err("ovmf-secure-boot", &disk);
        assert!(m.contains("--secure-boot") && m.contains("remove"), "{m}");
        let other = t.path().join("other.raw");
        std::fs::write(&other, vec![0u8; 4096]).unwrap();
        assert!(err("ovmf", &other).contains("keeps a node of"));
        // A rebuilt image: same path, other size.
        std::fs::write(&disk, vec![0u8; 8192]).unwrap();
        let m = err("ovmf", &disk);
        assert!(m.contains("rebuilt") && m.contains(&st.display().to_string()), "{m}");
        // A disk without its record is not guessed at.
        let bare = t.path().join("bare");
        std::fs::create_dir(&bare).unwrap();
        std::fs::write(bare.join(State::DISK), b"x").unwrap();
        assert!(matches!(State::open(&bare, &disk, "ovmf"), Err(VmError::Setup(m)) if m.contains("unknown")));
    }

    #[test]
    fn net_from_str() {
        assert_eq!("user".parse::<Net>(), Ok(Net::User));
        assert_eq!("udp:40001:40002".parse::<Net>(), Ok(Net::Udp { local: 40001, remote: 40002 }));
        for bad in ["", "udp", "udp:1", "udp:0:2", "udp:1:x", "tap:1:2", "udp:1:2:3"] {
            assert!(bad.parse::<Net>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_pxe_boot_with_too_little_ram_for_the_root_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("pxe")).unwrap();
        std::fs::write(d.path().join("manifest.json"), r#"{"arch": "amd64"}"#).unwrap();
        let mut spec = VmSpec::new(d.path());
        spec.boot = BootFrom::Pxe;
        spec.memory_mib = 512;
        // No sizes (a bundle from before they were written): no check.
        assert_eq!(check_pxe_ram(&spec), Ok(()));
        let sizes = kiln_contract::pxe::RamRoot { root_bytes: 400 << 20, verity_bytes: 4 << 20, initramfs_bytes: 410 << 20 };
        std::fs::write(d.path().join(crate::image::pxe::SIZES_FILE), sizes.to_file()).unwrap();
        let need = sizes.min_ram_mib();
        let e = check_pxe_ram(&spec).unwrap_err();
        assert!(e.contains(&format!("at least {need} MiB")) && e.contains("--mem is 512 MiB"), "{e}");
        spec.boot = BootFrom::Ipxe;
        assert!(check_pxe_ram(&spec).is_err());
        spec.memory_mib = need as u32;
        assert_eq!(check_pxe_ram(&spec), Ok(()));
        spec.memory_mib = 512;
        spec.boot = BootFrom::Disk;
        assert_eq!(check_pxe_ram(&spec), Ok(()));
    }

    fn args(spec: &VmSpec) -> Result<Vec<String>, VmError> {
        let d = tempfile::tempdir().unwrap();
        command(spec, Accel::Tcg, &d.path().join("qmp"), d.path()).map(|c| c.get_args().map(|a| a.to_string_lossy().into_owned()).collect())
    }

    #[test]
    fn udp_link_replaces_user_networking() {
        let out = tempfile::tempdir().unwrap();
        std::fs::write(out.path().join("manifest.json"), r#"{"arch": "amd64"}"#).unwrap();
        std::fs::create_dir(out.path().join("pxe")).unwrap();
        for f in ["vmlinuz", "initramfs.cpio.zst", "cmdline"] {
            std::fs::write(out.path().join("pxe").join(f), "x").unwrap();
        }
        let mut spec = VmSpec::new(out.path());
        spec.boot = BootFrom::Pxe;
        spec.api_port = 6443;
        let user = args(&spec).unwrap().join(" ");
        assert!(user.contains("-netdev user,id=n0,hostfwd=tcp:127.0.0.1:6443-:6443"), "{user}");
        assert!(user.contains("mac=52:54:00:12:34:56"), "{user}");
        spec.net = Net::Udp { local: 40001, remote: 40002 };
        spec.mac = "52:54:00:00:00:02".into();
        let udp = args(&spec).unwrap().join(" ");
        assert!(udp.contains("-netdev socket,id=n0,udp=127.0.0.1:40002,localaddr=127.0.0.1:40001 "), "{udp}");
        assert!(udp.contains("virtio-net-pci,netdev=n0,mac=52:54:00:00:00:02,romfile="), "{udp}");
        assert!(!udp.contains("hostfwd"), "{udp}");
        spec.boot = BootFrom::Ipxe;
        assert!(args(&spec).unwrap_err().to_string().contains("user networking"));
        spec.boot = BootFrom::Pxe;
        spec.mac = "52:54:00".into();
        assert!(args(&spec).unwrap_err().to_string().contains("MAC"));
    }

    #[test]
    fn an_emulated_board_boots_its_card_from_the_boot_rom() {
        let out = tempfile::tempdir().unwrap();
        std::fs::write(out.path().join("manifest.json"), r#"{"arch": "armv7", "qemu": {"machine": "orangepi-pc", "memory_mib": 1024, "cpus": 4}}"#).unwrap();
        std::fs::write(out.path().join("sdcard.img"), vec![0u8; 3 << 20]).unwrap();
        let cfg = out.path().join("node.toml");
        std::fs::write(&cfg, "role = \"single\"\n").unwrap();
        let mut spec = VmSpec::for_output(out.path());
        assert_eq!((spec.memory_mib, spec.cpus), (1024, 4));
        spec.config = Some(cfg);
        spec.disk_size = 0;
        let d = tempfile::tempdir().unwrap();
        let c = command(&spec, Accel::Tcg, &d.path().join("qmp"), d.path()).unwrap();
        let a = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ");
        assert!(a.contains("-M orangepi-pc") && a.contains("-drive if=sd,format=qcow2,file=") && !a.contains("-bios") && !a.contains("virtio"), "{a}");
        assert!(a.contains("usb-storage,bus=usb-bus.1,drive=cfg") && !a.contains("fw_cfg"), "{a}");
        assert!(a.contains("-nic user,mac=52:54:00:12:34:56"), "{a}");
        // The overlay is the next power of two (4 MiB) over the 3 MiB card.
        let info = Command::new("qemu-img").args(["info", "--output=json"]).arg(d.path().join("disk.qcow2")).output().unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["virtual-size"], 4 << 20);
        // The config stick is a FAT volume labelled KILNCFG.
        let stick = std::fs::read(d.path().join("kilncfg.img")).unwrap();
        assert!(stick.windows(7).any(|w| w == b"KILNCFG"));
        spec.cpus = 1;
        assert!(args(&spec).unwrap_err().to_string().contains("4 cores"));
        spec.cpus = 4;
        spec.boot = BootFrom::Pxe;
        assert!(args(&spec).unwrap_err().to_string().contains("boots its SD card"));
    }

    #[test]
    fn reset_and_power_off_requests_on_the_console() {
        for l in ["[  123.4] reboot: Restarting system", "Rebooting in 10 seconds..", "resetting ...", "[ 1.0] Reboot failed -- System halted"] {
            assert_eq!(wants(l), Some(Wants::Reset), "{l}");
        }
        assert_eq!(wants("[   99.1] reboot: Power down"), Some(Wants::PowerOff));
        for l in ["kiln-init: event reboot", "echo resetting", "U-Boot 2023.01"] {
            assert_eq!(wants(l), None, "{l}");
        }
    }
}
