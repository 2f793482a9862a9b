//! The host side of the k0s contract: pseudo filesystems, cgroups, sysctls,
//! modules, hostname and /etc files.

use super::console;
use super::sys::{self, Result};
use kiln_contract::config::{Hostname, HostnameSource, NodeConfig};

const MS_NOSUID: libc::c_ulong = libc::MS_NOSUID;
const MS_NODEV: libc::c_ulong = libc::MS_NODEV;
const MS_NOEXEC: libc::c_ulong = libc::MS_NOEXEC;

/// Mounts /proc, /sys, /dev, /run, /tmp and cgroup2. Each is skipped when
/// already mounted (stage 1 may have done it).
pub fn mount_pseudo() -> Result<()> {
    let table: &[(&str, &str, &str, libc::c_ulong, Option<&str>)] = &[
        ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
        ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
        ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, Some("mode=0755")),
        ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, Some("gid=5,mode=0620,ptmxmode=0666")),
        ("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, Some("mode=1777")),
        ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, Some("mode=0755")),
        ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, Some("mode=1777")),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, Some("nsdelegate")),
    ];
    for (src, target, fs, flags, data) in table {
        // /proc is needed to know what is mounted; stage 1 may have moved
        // one here already.
        if *target == "/proc" && std::path::Path::new("/proc/self").exists() {
            continue;
        }
        if *target != "/proc" && sys::is_mountpoint(target) {
            continue;
        }
        if let Err(e) = sys::mount(src, target, fs, *flags, *data) {
            if *target == "/proc" && e.err.raw_os_error() == Some(libc::EBUSY) {
                continue;
            }
            return Err(e);
        }
    }
    if std::path::Path::new("/sys/firmware/efi/efivars").exists() && !sys::is_mountpoint("/sys/firmware/efi/efivars") {
        let _ = sys::mount("efivarfs", "/sys/firmware/efi/efivars", "efivarfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, None);
    }
    // Container runtimes need mount propagation from the root.
    sys::remount("/", libc::MS_REC | libc::MS_SHARED)?;
    Ok(())
}

pub const INIT_CGROUP: &str = "/sys/fs/cgroup/kiln-init";
pub const PAYLOAD_CGROUP: &str = "/sys/fs/cgroup/k0s";

/// Moves PID 1 out of the root cgroup and enables every controller for the
/// children. Returns the enabled controllers.
pub fn setup_cgroups() -> Result<Vec<String>> {
    sys::mkdir_p(INIT_CGROUP)?;
    sys::write(format!("{INIT_CGROUP}/cgroup.procs"), "1")?;
    let available = sys::read("/sys/fs/cgroup/cgroup.controllers")?;
    let mut enabled = Vec::new();
    for c in available.split_whitespace() {
        match sys::write("/sys/fs/cgroup/cgroup.subtree_control", format!("+{c}")) {
            Ok(()) => enabled.push(c.to_string()),
            Err(e) => console::warn(&format!("cgroup controller {c} could not be enabled: {e}")),
        }
    }
    sys::mkdir_p(PAYLOAD_CGROUP)?;
    Ok(enabled)
}

/// What k0s sets at worker start, done first so it never has to.
pub const SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv4/ip_forward", "1"),
    ("net/ipv6/conf/all/forwarding", "1"),
    ("net/bridge/bridge-nf-call-iptables", "1"),
    ("net/bridge/bridge-nf-call-ip6tables", "1"),
    ("fs/inotify/max_user_instances", "8192"),
    ("fs/inotify/max_user_watches", "524288"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("vm/overcommit_memory", "1"),
];

pub fn set_sysctls() {
    for (k, v) in SYSCTLS {
        if let Err(e) = sys::write(format!("/proc/sys/{k}"), v) {
            console::warn(&format!("sysctl {} = {v}: {e}", k.replace('/', ".")));
        }
    }
}

/// The modules k0s modprobes at worker start.
pub use kiln_contract::modules::K0S_MODULES as MODULES;

/// Loads the modules k0s needs, with their dependencies and softdeps,
/// unless built in or loaded. Returns those that could not be found at all
/// (failures to load are on the console already).
pub fn load_modules() -> Vec<String> {
    let (loaded, missing) = super::kmod::load_all(MODULES);
    if !loaded.is_empty() {
        console::info(&format!("modules loaded for k0s: {}", loaded.join(" ")));
    }
    missing
}

/// The node's name: from the config, or derived from the first NIC's MAC so
/// that it is stable across reboots.
pub fn hostname(cfg: &NodeConfig, first_mac: Option<[u8; 6]>) -> String {
    let mac = || first_mac.map(|m| m.iter().map(|b| format!("{b:02x}")).collect::<String>());
    match &cfg.hostname {
        Some(Hostname::Fixed(h)) => h.clone(),
        Some(Hostname::Derived(d)) => {
            let id = match d.from {
                HostnameSource::Mac => mac(),
                HostnameSource::Serial => serial(),
            };
            format!("{}{}", d.prefix, id.unwrap_or_else(|| "unknown".into()))
        }
        None => format!("kiln-{}", mac().unwrap_or_else(|| "node".into())),
    }
}

fn serial() -> Option<String> {
    for p in ["/sys/class/dmi/id/product_serial", "/sys/firmware/devicetree/base/serial-number", "/proc/device-tree/serial-number"] {
        if let Ok(s) = std::fs::read_to_string(p) {
            let s: String = s.trim_matches(char::from(0)).trim().to_ascii_lowercase().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
            if !s.is_empty() {
                return Some(s);
            }
        }
    }
    None
}

/// Sets the hostname and writes /etc/hostname and /etc/hosts.
pub fn apply_hostname(name: &str) -> Result<()> {
    sys::sethostname(name)?;
    sys::write("/etc/hostname", format!("{name}\n"))?;
    sys::write("/etc/hosts", format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{name}\n"))?;
    Ok(())
}

pub fn write_resolv_conf(dns: &[std::net::IpAddr], search: &[String]) -> Result<()> {
    let mut s = String::from("# written by kiln-init\n");
    if !search.is_empty() {
        s.push_str(&format!("search {}\n", search.join(" ")));
    }
    for d in dns.iter().take(3) {
        s.push_str(&format!("nameserver {d}\n"));
    }
    sys::write("/etc/resolv.conf", s)
}

/// A machine id that is stable for the node: derived from the hostname and
/// MAC unless one already exists on persistent storage.
pub fn write_machine_id(seed: &str) -> Result<()> {
    if std::fs::metadata("/etc/machine-id").map(|m| m.len() >= 32).unwrap_or(false) {
        return Ok(());
    }
    // FNV-1a over the seed, twice with different offsets: 128 bits.
    let h = |basis: u64| seed.bytes().fold(basis, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    sys::write("/etc/machine-id", format!("{:016x}{:016x}\n", h(0xcbf29ce484222325), h(0x84222325cbf29ce4)))
}
