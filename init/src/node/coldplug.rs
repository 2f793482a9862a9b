//! Drivers for the devices present, without udev: coldplug walks
//! `/sys/devices` for `modalias` files and loads the modules whose aliases
//! match (repeating while loading a bus driver brings new devices), then
//! reports PCI devices left without a driver. Hotplug does the same for
//! devices added later, from the kernel's uevent netlink socket.

use super::console;
use super::kmod::{self, Index, Loader};
use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// What a boot stage has seen, so each device costs something once.
#[derive(Debug, Default)]
pub struct State {
    /// `modalias` files already read.
    files: BTreeSet<PathBuf>,
    /// Modalias strings already matched.
    aliases: BTreeSet<String>,
    /// PCI slots already reported without a driver.
    reported: BTreeSet<String>,
}

/// What a scan did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Modules inserted, in order.
    pub loaded: Vec<String>,
    /// Walks of /sys/devices.
    pub passes: u32,
}

/// Coldplug over the running system with the shared loader.
pub fn scan(state: &mut State) -> Summary {
    scan_in(Path::new("/sys"), &mut kmod::shared(), state)
}

/// Loads modules for devices under `sys`/devices not seen before, pass
/// after pass until a pass loads nothing. Without `modules.alias` (kiln's
/// own kernel) there is nothing to load and nothing is walked.
pub fn scan_in(sys: &Path, loader: &mut Loader, state: &mut State) -> Summary {
    let mut sum = Summary::default();
    if !loader.index().has_aliases() {
        return sum;
    }
    loop {
        sum.passes += 1;
        let new: Vec<String> = new_modaliases(&sys.join("devices"), &mut state.files).into_iter().filter(|m| state.aliases.insert(m.clone())).collect();
        let mut loaded = Vec::new();
        let mut unmatched = 0;
        for m in &new {
            let (matched, l) = loader.load_matching(m);
            unmatched += usize::from(matched.is_empty());
            loaded.extend(l);
        }
        if loaded.is_empty() {
            return sum;
        }
        let tail = if unmatched > 0 { format!(" ({unmatched} new devices matched no module)") } else { String::new() };
        console::info(&format!("coldplug: loaded {}{tail}", loaded.join(" ")));
        sum.loaded.extend(loaded);
    }
}

/// The contents of `modalias` files under `devices` not read before, each
/// once, in path order (so modules load in bus order, whatever readdir
/// returns). Symlinks are not followed (sysfs is full of loops); files
/// that vanish mid-walk are skipped.
fn new_modaliases(devices: &Path, files: &mut BTreeSet<PathBuf>) -> Vec<String> {
    let mut new: Vec<String> = Vec::new();
    let mut stack = vec![devices.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() && e.file_name() == "modalias" && files.insert(e.path()) {
                new.push(e.path().to_string_lossy().into_owned());
            }
        }
    }
    new.sort();
    let mut out: Vec<String> = Vec::new();
    for p in new {
        let Ok(s) = std::fs::read_to_string(&p) else { continue };
        let s = s.trim();
        if !s.is_empty() && !out.iter().any(|o| o == s) {
            out.push(s.to_string());
        }
    }
    out
}

// ---- PCI devices without a driver ------------------------------------------------------

/// A PCI device no driver claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unclaimed {
    /// `0000:00:03.0`.
    pub slot: String,
    /// `15b3:1017`.
    pub id: String,
    pub class: String,
    /// Modules whose aliases match it (it has one, which did not bind).
    pub modules: Vec<String>,
}

/// Reports PCI devices without a driver, each once per boot stage: the
/// `driver-missing` event when no module (nor built-in) matches it, a
/// warning when one matches but did not bind.
pub fn report_unclaimed(state: &mut State) {
    let found = {
        let l = kmod::shared();
        unclaimed_in(Path::new("/sys"), l.index(), state)
    };
    for u in &found {
        report(u);
    }
}

fn report(u: &Unclaimed) {
    if u.modules.is_empty() {
        console::event("driver-missing", &[("bus", &"pci"), ("id", &u.id), ("class", &u.class), ("slot", &u.slot)]);
    } else {
        console::warn(&format!("PCI device {} ({} {}) has no driver: module {} matches it but did not bind (see the module warnings above, or dmesg)", u.slot, u.id, u.class, u.modules.join(" ")));
    }
}

/// PCI devices under `sys`/bus/pci/devices with no driver, not reported
/// before, bridges aside, in slot order.
pub fn unclaimed_in(sys: &Path, index: &Index, state: &mut State) -> Vec<Unclaimed> {
    let Ok(rd) = std::fs::read_dir(sys.join("bus/pci/devices")) else { return Vec::new() };
    let mut slots: Vec<String> = rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    slots.sort();
    let mut out = Vec::new();
    for slot in slots {
        let dir = sys.join("bus/pci/devices").join(&slot);
        if state.reported.contains(&slot) || dir.join("driver").symlink_metadata().is_ok() {
            continue;
        }
        let class = read_hex(&dir.join("class")).unwrap_or(0);
        if class >> 16 == 0x06 {
            continue;
        }
        let modalias = std::fs::read_to_string(dir.join("modalias")).unwrap_or_default();
        let modalias = modalias.trim();
        let mut modules = Vec::new();
        if !modalias.is_empty() {
            modules = index.alias_matches(modalias);
            modules.extend(index.builtin_alias_matches(modalias));
        }
        let hex4 = |f: &str| read_hex(&dir.join(f)).map_or("????".to_string(), |v| format!("{v:04x}"));
        let id = format!("{}:{}", hex4("vendor"), hex4("device"));
        state.reported.insert(slot.clone());
        out.push(Unclaimed { slot, id, class: class_name(class), modules });
    }
    out
}

fn read_hex(p: &Path) -> Option<u32> {
    let s = std::fs::read_to_string(p).ok()?;
    let s = s.trim();
    u32::from_str_radix(s.strip_prefix("0x").unwrap_or(s), 16).ok()
}

/// A short name for a PCI class code (`class` file: 0xCCSSPP).
pub fn class_name(code: u32) -> String {
    let (base, sub) = ((code >> 16) & 0xff, (code >> 8) & 0xff);
    let name = match (base, sub) {
        (0x01, 0x00) => "SCSI",
        (0x01, 0x01) => "IDE",
        (0x01, 0x04) => "RAID",
        (0x01, 0x06) => "SATA",
        (0x01, 0x07) => "SAS",
        (0x01, 0x08) => "NVMe",
        (0x01, _) => "Storage",
        (0x02, 0x00) => "Ethernet",
        (0x02, 0x07) => "InfiniBand",
        (0x02, _) => "Network",
        (0x03, 0x00) => "VGA",
        (0x03, _) => "Display",
        (0x04, _) => "Multimedia",
        (0x07, _) => "Communication",
        (0x08, _) => "System",
        (0x0c, 0x03) => "USB",
        (0x0c, 0x05) => "SMBus",
        (0x0c, _) => "Serial-bus",
        (0x0d, _) => "Wireless",
        (0x12, _) => "Accelerator",
        _ => return format!("class 0x{base:02x}{sub:02x}"),
    };
    name.to_string()
}

// ---- hotplug ----------------------------------------------------------------------------

/// One kernel uevent.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Uevent {
    pub action: String,
    pub devpath: String,
    pub subsystem: String,
    pub modalias: Option<String>,
}

/// Parses a kernel uevent: `add@/devices/…` then NUL-separated `KEY=value`
/// strings. None for anything else (libudev's messages start `libudev`).
pub fn parse_uevent(msg: &[u8]) -> Option<Uevent> {
    let mut parts = msg.split(|&b| b == 0).filter(|p| !p.is_empty());
    let (action, devpath) = std::str::from_utf8(parts.next()?).ok()?.split_once('@')?;
    let mut ev = Uevent { action: action.to_string(), devpath: devpath.to_string(), ..Uevent::default() };
    for p in parts.filter_map(|p| std::str::from_utf8(p).ok()) {
        match p.split_once('=') {
            Some(("ACTION", v)) => ev.action = v.to_string(),
            Some(("DEVPATH", v)) => ev.devpath = v.to_string(),
            Some(("SUBSYSTEM", v)) => ev.subsystem = v.to_string(),
            Some(("MODALIAS", v)) if !v.is_empty() => ev.modalias = Some(v.to_string()),
            _ => {}
        }
    }
    Some(ev)
}

/// The modules an `add` uevent's modalias needs, loaded; those inserted.
fn on_uevent(loader: &mut Loader, ev: &Uevent) -> Vec<String> {
    match (&ev.modalias, ev.action.as_str()) {
        (Some(m), "add") => loader.load_matching(m).1,
        _ => Vec::new(),
    }
}

/// The kernel's uevent multicast group, for devices added from now on.
/// Opened before the coldplug scan so a device appearing during it is not
/// missed.
pub fn open_uevents() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_KOBJECT_UEVENT) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket(2).
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_nl is plain data; all-zero is valid.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    sa.nl_groups = 1;
    // SAFETY: sa is a sockaddr_nl of the length passed.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), &sa as *const libc::sockaddr_nl as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // Room for a burst (a USB hub and its devices) while modules load;
    // without it the default buffer is used.
    let size: libc::c_int = 1 << 20;
    // SAFETY: size is a live c_int of the length passed.
    unsafe { libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &size as *const libc::c_int as *const libc::c_void, std::mem::size_of::<libc::c_int>() as libc::socklen_t) };
    Ok(fd)
}

/// Loads modules for devices added from now on, in a thread. Start it
/// after PID 1 blocks its signals: the thread inherits the mask, so the
/// signals still reach PID 1's signalfd.
pub fn start_hotplug(sock: OwnedFd) {
    if let Err(e) = std::thread::Builder::new().name("kiln-hotplug".into()).spawn(move || hotplug(sock)) {
        console::warn(&format!("hotplug: cannot start its thread: {e}; devices plugged in later get no module loaded"));
    }
}

fn hotplug(sock: OwnedFd) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut overrun_said = false;
    loop {
        // SAFETY: sockaddr_nl is plain data; recvfrom fills it and buf.
        let mut from: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: buf and from are live and of the lengths passed.
        let n = unsafe { libc::recvfrom(sock.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0, &mut from as *mut libc::sockaddr_nl as *mut libc::sockaddr, &mut len) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOBUFS) => {
                    if !overrun_said {
                        console::warn("hotplug: uevents were lost (too many at once); a device plugged in just now may need replugging");
                        overrun_said = true;
                    }
                    continue;
                }
                _ => {
                    console::warn(&format!("hotplug: reading uevents: {e}; devices plugged in from now on get no module loaded"));
                    return;
                }
            }
        }
        // Only the kernel (port 0) speaks for devices.
        if from.nl_pid != 0 {
            continue;
        }
        let Some(ev) = parse_uevent(&buf[..n as usize]) else { continue };
        let loaded = on_uevent(&mut kmod::shared(), &ev);
        if !loaded.is_empty() {
            console::info(&format!("hotplug: loaded {} for {} {}", loaded.join(" "), ev.subsystem, ev.devpath));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::gpt::tests::tempdir;
    use crate::node::kmod::tests::{loader, Fake};
    use std::os::unix::fs::symlink;
    use std::sync::Arc;

    const DEP: &str = "\
kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko: kernel/drivers/ptp/ptp.ko
kernel/drivers/ptp/ptp.ko:
kernel/drivers/ata/ahci.ko: kernel/drivers/ata/libahci.ko kernel/drivers/ata/libata.ko
kernel/drivers/ata/libahci.ko: kernel/drivers/ata/libata.ko
kernel/drivers/ata/libata.ko:
kernel/drivers/scsi/sd_mod.ko: kernel/drivers/scsi/scsi_mod.ko
kernel/drivers/scsi/scsi_mod.ko:
kernel/drivers/usb/storage/usb-storage.ko:
";
    const ALIAS: &str = "\
alias pci:v00008086d000010D3sv*sd*bc*sc*i* e1000e
alias pci:v*d*sv*sd*bc01sc06i01* ahci
alias scsi:t-0x00* sd_mod
alias usb:v*p*d*dc*dsc*dp*ic08isc06ip50in* usb_storage
";

    /// A PCI device in a fake sysfs, linked from bus/pci/devices.
    fn pci(sys: &Path, slot: &str, vendor: u16, device: u16, class: u32) -> PathBuf {
        let dir = sys.join("devices/pci0000:00").join(slot);
        std::fs::create_dir_all(&dir).unwrap();
        let (base, sub, pi) = (class >> 16, (class >> 8) & 0xff, class & 0xff);
        std::fs::write(dir.join("modalias"), format!("pci:v0000{vendor:04X}d0000{device:04X}sv00001AF4sd00001100bc{base:02X}sc{sub:02X}i{pi:02X}\n")).unwrap();
        std::fs::write(dir.join("class"), format!("0x{class:06x}\n")).unwrap();
        std::fs::write(dir.join("vendor"), format!("0x{vendor:04x}\n")).unwrap();
        std::fs::write(dir.join("device"), format!("0x{device:04x}\n")).unwrap();
        std::fs::create_dir_all(sys.join("bus/pci/devices")).unwrap();
        symlink(format!("../../../devices/pci0000:00/{slot}"), sys.join("bus/pci/devices").join(slot)).unwrap();
        dir
    }

    fn bind(dev: &Path, driver: &str) {
        symlink(format!("../../bus/pci/drivers/{driver}"), dev.join("driver")).unwrap();
    }

    /// A q35-like machine: a host bridge, an Intel NIC, a ConnectX NIC no
    /// module knows, an AHCI controller, a bound virtio device, and a
    /// platform device; and a sysfs loop through a symlink.
    fn machine(sys: &Path) {
        pci(sys, "0000:00:00.0", 0x8086, 0x29c0, 0x060000);
        pci(sys, "0000:00:02.0", 0x8086, 0x10d3, 0x020000);
        pci(sys, "0000:00:03.0", 0x15b3, 0x1017, 0x020000);
        pci(sys, "0000:00:1f.2", 0x8086, 0x2922, 0x010601);
        let v = pci(sys, "0000:00:04.0", 0x1af4, 0x1000, 0x020000);
        bind(&v, "virtio-pci");
        symlink("../../..", v.join("subsystem")).unwrap();
        let p = sys.join("devices/platform/serial8250");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("modalias"), "platform:serial8250\n").unwrap();
        std::fs::create_dir_all(sys.join("devices/virtual/misc/empty")).unwrap();
        std::fs::write(sys.join("devices/virtual/misc/empty/modalias"), "").unwrap();
    }

    /// ahci, once loaded, binds its controller and a disk appears behind it.
    fn kernel(sys: &Path) -> Fake {
        let sys = sys.to_path_buf();
        Fake {
            on_insert: Some(Arc::new(move |m: &str| {
                if m == "ahci" {
                    let ctl = sys.join("devices/pci0000:00/0000:00:1f.2");
                    bind(&ctl, "ahci");
                    let disk = ctl.join("ata1/host0/target0:0:0/0:0:0:0");
                    std::fs::create_dir_all(&disk).unwrap();
                    std::fs::write(disk.join("modalias"), "scsi:t-0x00\n").unwrap();
                }
            })),
            ..Fake::default()
        }
    }

    fn modules_dir(root: &Path, alias: bool) -> PathBuf {
        let d = root.join("modules");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("modules.dep"), DEP).unwrap();
        if alias {
            std::fs::write(d.join("modules.alias"), ALIAS).unwrap();
        }
        d
    }

    #[test]
    fn coldplug_repeats_until_nothing_new_loads() {
        let t = tempdir("coldplug");
        let sys = t.join("sys");
        machine(&sys);
        let fake = kernel(&sys);
        let (mut l, warnings) = loader(&modules_dir(&t, true), fake.clone());
        let mut st = State::default();
        let s = scan_in(&sys, &mut l, &mut st);
        // Pass 1: the NIC and the controller; pass 2: the disk the
        // controller brought; pass 3: nothing new.
        assert_eq!(s.loaded, ["ptp", "e1000e", "libata", "libahci", "ahci", "scsi_mod", "sd_mod"]);
        assert_eq!(s.passes, 3);
        assert_eq!(*fake.inserted.lock().unwrap(), s.loaded);
        // A later scan (stage 1 polls) only walks.
        assert_eq!(scan_in(&sys, &mut l, &mut st), Summary { loaded: vec![], passes: 1 });
        assert!(warnings.lock().unwrap().is_empty());

        // e1000e loaded but did not bind; the ConnectX has no module at all;
        // the bridge and the bound devices are not reported.
        let found = unclaimed_in(&sys, l.index(), &mut st);
        assert_eq!(
            found,
            [
                Unclaimed { slot: "0000:00:02.0".into(), id: "8086:10d3".into(), class: "Ethernet".into(), modules: vec!["e1000e".into()] },
                Unclaimed { slot: "0000:00:03.0".into(), id: "15b3:1017".into(), class: "Ethernet".into(), modules: vec![] },
            ]
        );
        assert!(unclaimed_in(&sys, l.index(), &mut st).is_empty(), "reported once per stage");
    }

    #[test]
    fn without_modules_alias_nothing_loads_and_every_unbound_device_is_reported() {
        let t = tempdir("coldplug-builtin");
        let sys = t.join("sys");
        machine(&sys);
        let fake = kernel(&sys);
        let (mut l, _) = loader(&modules_dir(&t, false), fake.clone());
        let mut st = State::default();
        assert_eq!(scan_in(&sys, &mut l, &mut st), Summary::default());
        assert!(fake.inserted.lock().unwrap().is_empty());
        let found = unclaimed_in(&sys, l.index(), &mut st);
        let got: Vec<(&str, &str, &str, usize)> = found.iter().map(|u| (u.slot.as_str(), u.id.as_str(), u.class.as_str(), u.modules.len())).collect();
        assert_eq!(got, [("0000:00:02.0", "8086:10d3", "Ethernet", 0), ("0000:00:03.0", "15b3:1017", "Ethernet", 0), ("0000:00:1f.2", "8086:2922", "SATA", 0)]);
        // No sysfs at all: nothing, no panic.
        assert!(unclaimed_in(&t.join("nowhere"), l.index(), &mut State::default()).is_empty());
    }

    #[test]
    fn pci_class_names() {
        assert_eq!(class_name(0x010802), "NVMe");
        assert_eq!(class_name(0x010601), "SATA");
        assert_eq!(class_name(0x010000), "SCSI");
        assert_eq!(class_name(0x018000), "Storage");
        assert_eq!(class_name(0x020000), "Ethernet");
        assert_eq!(class_name(0x020700), "InfiniBand");
        assert_eq!(class_name(0x028000), "Network");
        assert_eq!(class_name(0x030000), "VGA");
        assert_eq!(class_name(0x038000), "Display");
        assert_eq!(class_name(0x0c0330), "USB");
        assert_eq!(class_name(0x0c0500), "SMBus");
        assert_eq!(class_name(0x0c8000), "Serial-bus");
        assert_eq!(class_name(0xff0000), "class 0xff00");
        // Quoted in events, so the space is safe.
        assert_eq!(kiln_contract::event::format("driver-missing", &[("class", &class_name(0x0b4000))]), "kiln-init: driver-missing class=\"class 0x0b40\"");
    }

    #[test]
    fn uevents() {
        let msg = b"add@/devices/pci0000:00/0000:00:1d.0/usb2/2-1/2-1:1.0\0ACTION=add\0DEVPATH=/devices/pci0000:00/0000:00:1d.0/usb2/2-1/2-1:1.0\0SUBSYSTEM=usb\0DEVTYPE=usb_interface\0MODALIAS=usb:v0781p5567d0100dc00dsc00dp00ic08isc06ip50in00\0SEQNUM=2215\0";
        let ev = parse_uevent(msg).unwrap();
        assert_eq!(
            ev,
            Uevent {
                action: "add".into(),
                devpath: "/devices/pci0000:00/0000:00:1d.0/usb2/2-1/2-1:1.0".into(),
                subsystem: "usb".into(),
                modalias: Some("usb:v0781p5567d0100dc00dsc00dp00ic08isc06ip50in00".into()),
            }
        );
        let rm = parse_uevent(b"remove@/devices/x\0ACTION=remove\0SUBSYSTEM=usb\0MODALIAS=usb:v1\0").unwrap();
        assert_eq!((rm.action.as_str(), rm.modalias.as_deref()), ("remove", Some("usb:v1")));
        assert_eq!(parse_uevent(b"libudev\0\xfe\xed\xca\xfe\0ACTION=add\0"), None);
        assert_eq!(parse_uevent(b""), None);
        assert_eq!(parse_uevent(b"change@/devices/y").unwrap().modalias, None);

        let t = tempdir("hotplug");
        let (mut l, _) = loader(&modules_dir(&t, true), Fake::default());
        assert_eq!(on_uevent(&mut l, &ev), ["usb_storage"]);
        assert!(on_uevent(&mut l, &ev).is_empty(), "already loaded");
        assert!(on_uevent(&mut l, &rm).is_empty(), "only add events load");
    }
}
