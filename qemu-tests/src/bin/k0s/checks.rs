//! The host contract checks (K0S-CONTRACT.md), one function each, run from
//! inside the booted node. A check returns `Err(why)`, never panics; the
//! parsing behind it is pure and unit-tested below.

use std::ffi::CString;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cli::{RunOpts, TokenSource};
use crate::out::{say, Report};
use crate::token;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;
const RUN_DIR: &str = "/run/k0s";
const MIN_NOFILE: u64 = 65536;

/// State a passing check leaves behind for the life of the process.
pub struct Held {
    /// Holding the open file holds the flock on /run/k0s/k0s.yaml.lock.
    _lock: File,
    pub pid_file: PathBuf,
}

pub fn run_all(opts: &RunOpts, r: &mut Report) -> Option<Held> {
    r.check("cgroup2", cgroup2());
    let cg = own_cgroup();
    r.check("cgroup-controllers", cgroup_controllers(&cg));
    r.check("cgroup-not-root", cgroup_not_root(&cg));
    r.check("hostname", hostname());
    r.check("etc-hosts", etc_hosts());
    r.check("resolv-conf", resolv_conf());
    r.check("mount-umount", mount_umount());
    r.check("data-dir", data_dir(opts.data_dir()));
    let held = r.check("run-k0s", run_k0s());
    r.check("dev-kmsg", dev_kmsg());
    r.check(
        "sysctl-forwarding",
        sysctls_are_one(&[
            "/proc/sys/net/ipv4/ip_forward",
            "/proc/sys/net/ipv6/conf/all/forwarding",
        ]),
    );
    r.check(
        "sysctl-bridge-nf",
        sysctls_are_one(&[
            "/proc/sys/net/bridge/bridge-nf-call-iptables",
            "/proc/sys/net/bridge/bridge-nf-call-ip6tables",
        ]),
    );
    r.check("modules", modules());
    r.check("kernel-config", kernel_config());
    if let Some(path) = &opts.config {
        r.check("config-file", config_file(path));
    }
    match &opts.token {
        Some(TokenSource::File(path)) => {
            r.check("token-file", token_file(path));
        }
        Some(TokenSource::Argument(t)) => inline_token("argument", t),
        Some(TokenSource::Env(t)) => inline_token("K0S_TOKEN", t),
        None => say("token none"),
    }
    r.check("rlimit-nofile", rlimit_nofile());
    r.check("rlimits-unit", rlimits_unit());
    r.check("data-dir-payloads", crate::payloads::data_dir_payloads(opts.data_dir()));
    r.check("tmp-writable", tmp_writable());
    r.check("writable-paths", writable_paths());
    held
}

fn why_io(what: &str, path: impl AsRef<Path>, e: &io::Error) -> String {
    format!("{what} {}: {e}", path.as_ref().display())
}

// ---- cgroups -------------------------------------------------------------

fn statfs_magic(path: &str) -> Result<u64, String> {
    let c = CString::new(path).map_err(|_| format!("bad path {path:?}"))?;
    // SAFETY: statfs fills the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(why_io("cannot statfs", path, &io::Error::last_os_error()));
    }
    // f_type is signed and 32 bits wide on some targets; magics are 32 bits.
    #[allow(clippy::unnecessary_cast)]
    Ok((st.f_type as u64) & 0xffff_ffff)
}

/// Filesystem type of the last mount on `mountpoint` in /proc/mounts.
pub fn mount_fstype<'a>(mounts: &'a str, mountpoint: &str) -> Option<&'a str> {
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, mnt, ty) = (f.next()?, f.next()?, f.next()?);
            (mnt == mountpoint).then_some(ty)
        })
        .next_back()
}

fn cgroup2() -> Result<(), String> {
    let magic = statfs_magic(CGROUP_ROOT)?;
    if magic == CGROUP2_SUPER_MAGIC {
        return Ok(());
    }
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    Err(match mount_fstype(&mounts, CGROUP_ROOT) {
        Some(ty) => format!("{CGROUP_ROOT} is {ty}, want cgroup2"),
        None => format!(
            "nothing is mounted on {CGROUP_ROOT} (filesystem magic {magic:#x}), want cgroup2"
        ),
    })
}

/// The cgroup2 path in /proc/self/cgroup (the `0::/path` line).
pub fn cgroup2_path(self_cgroup: &str) -> Option<&str> {
    self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim_end)
}

fn own_cgroup() -> Result<String, String> {
    let text = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| why_io("cannot read", "/proc/self/cgroup", &e))?;
    let path = cgroup2_path(&text)
        .ok_or("/proc/self/cgroup has no cgroup2 (0::) line; is cgroup2 mounted?")?;
    say(&format!("cgroup path={path}"));
    Ok(path.to_string())
}

pub fn missing_controllers(controllers: &str) -> Vec<&'static str> {
    let have: Vec<&str> = controllers.split_whitespace().collect();
    ["cpu", "cpuset", "memory", "pids"]
        .into_iter()
        .filter(|c| !have.contains(c))
        .collect()
}

fn cgroup_controllers(cg: &Result<String, String>) -> Result<(), String> {
    let path = cg.clone()?;
    let dir = Path::new(CGROUP_ROOT).join(path.trim_start_matches('/'));
    let file = dir.join("cgroup.controllers");
    let have = fs::read_to_string(&file).map_err(|e| why_io("cannot read", &file, &e))?;
    say(&format!("cgroup controllers={}", have.trim()));
    let mut why = Vec::new();
    let missing = missing_controllers(&have);
    if !missing.is_empty() {
        why.push(format!(
            "{} not in {} (enable in the parent's cgroup.subtree_control)",
            missing.join(", "),
            file.display()
        ));
    }
    if !dir.join("cgroup.freeze").exists() {
        why.push(format!(
            "no cgroup.freeze in {} (freezer needs kernel >= 5.2 and a non-root cgroup)",
            dir.display()
        ));
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(why.join("; "))
    }
}

fn cgroup_not_root(cg: &Result<String, String>) -> Result<(), String> {
    match cg.clone()?.as_str() {
        "/" => Err(
            "runs in the root cgroup; the init must move the payload into a child cgroup".into(),
        ),
        _ => Ok(()),
    }
}

// ---- host identity and files ----------------------------------------------

fn gethostname() -> Result<String, String> {
    let mut buf = [0u8; 256];
    // SAFETY: the length passed is the buffer's; the last byte stays NUL.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    if rc != 0 {
        return Err(format!("gethostname: {}", io::Error::last_os_error()));
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// Why `h` cannot become a node name, if it cannot. The node name is the
/// hostname lowercased, so upper case letters are fine.
pub fn hostname_problem(h: &str) -> Option<String> {
    if h.is_empty() {
        return Some("hostname is empty".into());
    }
    if h == "(none)" {
        return Some("hostname is (none), the kernel default; set it before k0s starts".into());
    }
    if h.eq_ignore_ascii_case("localhost") {
        return Some("hostname is localhost, which cannot be a node name".into());
    }
    // Kubernetes node names are RFC 1123 subdomains: dot-separated labels.
    if h.len() > 253 {
        return Some(format!("hostname is {} bytes, want at most 253 (RFC 1123)", h.len()));
    }
    for label in h.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Some(format!("hostname {h:?} has an empty label or one over 63 bytes (RFC 1123)"));
        }
        if let Some(c) = label.chars().find(|c| !c.is_ascii_alphanumeric() && *c != '-') {
            return Some(format!("hostname {h:?} has {c:?}; want letters, digits, '-' and '.' (RFC 1123)"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Some(format!("hostname {h:?} has a label that starts or ends with '-' (RFC 1123)"));
        }
    }
    None
}

/// The name in /etc/hostname: its first line that is not blank or a comment.
pub fn etc_hostname(content: &str) -> &str {
    content
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap_or("")
}

fn hostname() -> Result<(), String> {
    let h = gethostname()?;
    say(&format!(
        "hostname {h} node-name={}",
        h.to_ascii_lowercase()
    ));
    if let Some(why) = hostname_problem(&h) {
        return Err(why);
    }
    match fs::read_to_string("/etc/hostname") {
        Ok(c) if etc_hostname(&c) == h => Ok(()),
        Ok(c) => Err(format!(
            "hostname is {h:?} but /etc/hostname says {:?}",
            etc_hostname(&c)
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(why_io("cannot read", "/etc/hostname", &e)),
    }
}

/// Whether an /etc/hosts maps `localhost` for 127.0.0.1 and for ::1.
pub fn hosts_localhost(hosts: &str) -> (bool, bool) {
    let (mut v4, mut v6) = (false, false);
    for line in hosts.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut f = line.split_whitespace();
        let Some(Ok(ip)) = f.next().map(str::parse::<std::net::IpAddr>) else {
            continue;
        };
        if !f.any(|n| n.eq_ignore_ascii_case("localhost")) {
            continue;
        }
        match ip {
            std::net::IpAddr::V4(a) if a == std::net::Ipv4Addr::LOCALHOST => v4 = true,
            std::net::IpAddr::V6(a) if a == std::net::Ipv6Addr::LOCALHOST => v6 = true,
            _ => {}
        }
    }
    (v4, v6)
}

fn etc_hosts() -> Result<(), String> {
    let hosts =
        fs::read_to_string("/etc/hosts").map_err(|e| why_io("cannot read", "/etc/hosts", &e))?;
    match hosts_localhost(&hosts) {
        (true, true) => Ok(()),
        (false, false) => Err("/etc/hosts maps localhost to neither 127.0.0.1 nor ::1".into()),
        (false, true) => Err("/etc/hosts does not map localhost to 127.0.0.1".into()),
        (true, false) => Err("/etc/hosts does not map localhost to ::1".into()),
    }
}

fn resolv_conf() -> Result<(), String> {
    let p = "/etc/resolv.conf";
    let text = fs::read_to_string(p).map_err(|e| why_io("cannot read", p, &e))?;
    let n = text
        .lines()
        .filter(|l| l.split_whitespace().next() == Some("nameserver"))
        .count();
    say(&format!("resolv-conf nameservers={n}"));
    Ok(())
}

/// The first executable `name` in a $PATH value.
pub fn find_in_path(path_var: &str, name: &str) -> Option<PathBuf> {
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| {
            fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

fn mount_umount() -> Result<(), String> {
    let Some(path) = std::env::var_os("PATH") else {
        return Err("PATH is not set".into());
    };
    let path = path.to_string_lossy();
    let found: Vec<(&str, Option<PathBuf>)> = ["mount", "umount"]
        .into_iter()
        .map(|n| (n, find_in_path(&path, n)))
        .collect();
    let shown: Vec<String> = found
        .iter()
        .map(|(n, p)| match p {
            Some(p) => format!("{n}={}", p.display()),
            None => format!("{n}=none"),
        })
        .collect();
    say(&format!("path {}", shown.join(" ")));
    let missing: Vec<&str> = found
        .iter()
        .filter(|(_, p)| p.is_none())
        .map(|(n, _)| *n)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} not found on PATH={path}",
            missing.join(" and ")
        ))
    }
}

// ---- directories k0s writes ------------------------------------------------

fn make_dir(path: &Path) -> Result<(), String> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(|e| why_io("cannot create", path, &e))?;
    let m = fs::metadata(path).map_err(|e| why_io("cannot stat", path, &e))?;
    if !m.is_dir() {
        return Err(format!("{} is not a directory", path.display()));
    }
    Ok(())
}

fn remove_if_there(path: &Path) -> Result<(), String> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(why_io("cannot remove", path, &e)),
        _ => Ok(()),
    }
}

fn data_dir(dir: &str) -> Result<(), String> {
    if dir.is_empty() {
        return Err("--data-dir is empty".into());
    }
    let dir = Path::new(dir);
    make_dir(dir)?;
    let mode = fs::metadata(dir).map(|m| m.mode() & 0o7777).unwrap_or(0);
    say(&format!("data-dir {} mode={mode:04o}", dir.display()));
    // k0s unpacks its embedded binaries into bin/ and runs them from there.
    let bin = dir.join("bin");
    make_dir(&bin)?;
    let exe = bin.join("stand-in-exec-check");
    // Unlink first: writing over a binary another instance still runs is ETXTBSY.
    remove_if_there(&exe)?;
    fs::copy("/proc/self/exe", &exe).map_err(|e| why_io("cannot write", &exe, &e))?;
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755))
        .map_err(|e| why_io("cannot chmod", &exe, &e))?;
    let result = exec_version(&exe);
    let _ = fs::remove_file(&exe);
    result
}

fn exec_version(exe: &Path) -> Result<(), String> {
    let mut child = Command::new(exe)
        .arg("version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            let hint = if e.kind() == io::ErrorKind::PermissionDenied {
                " (is it mounted noexec?)"
            } else {
                ""
            };
            format!("cannot exec {}: {e}{hint}", exe.display())
        })?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} version did not exit within 10 s",
                    exe.display()
                ));
            }
            Err(e) => return Err(why_io("cannot wait for", exe, &e)),
        }
    };
    let mut printed = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut printed);
    }
    if !status.success() {
        return Err(format!("{} version exited with {status}", exe.display()));
    }
    if !printed.contains("stand-in") {
        return Err(format!(
            "{} version printed {:?}",
            exe.display(),
            printed.trim()
        ));
    }
    Ok(())
}

fn run_k0s() -> Result<Held, String> {
    let dir = Path::new(RUN_DIR);
    make_dir(dir)?;
    let lock_path = dir.join("k0s.yaml.lock");
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&lock_path)
        .map_err(|e| why_io("cannot open", &lock_path, &e))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            format!(
                "{} is locked by another process (is k0s already running?)",
                lock_path.display()
            )
        } else {
            why_io("cannot flock", &lock_path, &e)
        });
    }
    let pid_file = dir.join("k0s.pid");
    fs::write(&pid_file, format!("{}\n", std::process::id()))
        .map_err(|e| why_io("cannot write", &pid_file, &e))?;
    Ok(Held {
        _lock: lock,
        pid_file,
    })
}

fn dev_kmsg() -> Result<(), String> {
    let p = "/dev/kmsg";
    OpenOptions::new()
        .write(true)
        .open(p)
        .map_err(|e| why_io("cannot open for writing", p, &e))?;
    // The kubelet's OOM watcher reads it, and fails to start without it.
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(p)
        .map_err(|e| why_io("cannot open for reading", p, &e))?;
    Ok(())
}

// ---- kernel state -----------------------------------------------------------

fn sysctls_are_one(paths: &[&str]) -> Result<(), String> {
    let why: Vec<String> = paths
        .iter()
        .filter_map(|p| match fs::read_to_string(p) {
            Ok(v) if v.trim() == "1" => None,
            Ok(v) => Some(format!("{p} is {}, want 1", v.trim())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Some(format!("{p} does not exist")),
            Err(e) => Some(why_io("cannot read", p, &e)),
        })
        .collect();
    if why.is_empty() {
        Ok(())
    } else {
        Err(why.join("; "))
    }
}

pub fn filesystems_has(proc_filesystems: &str, fs_name: &str) -> bool {
    proc_filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some(fs_name))
}

fn modules() -> Result<(), String> {
    let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let mut missing = Vec::new();
    if !filesystems_has(&filesystems, "overlay") {
        missing.push("overlay (not in /proc/filesystems)");
    }
    // What each module leaves behind once loaded or built in.
    let evidence = [
        (
            "/proc/sys/net/netfilter/nf_conntrack_max",
            "nf_conntrack (no /proc/sys/net/netfilter/nf_conntrack_max)",
        ),
        (
            "/proc/sys/net/bridge",
            "br_netfilter (no /proc/sys/net/bridge)",
        ),
        (
            "/proc/net/ip_tables_names",
            "ip_tables (no /proc/net/ip_tables_names)",
        ),
    ];
    for (path, why) in evidence {
        if !Path::new(path).exists() {
            missing.push(why);
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("missing {}", missing.join(", ")))
    }
}

/// Value of `CONFIG_X` in a kernel .config, None when unset or absent.
pub fn kconfig_value<'a>(config: &'a str, name: &str) -> Option<&'a str> {
    config.lines().find_map(|l| {
        let v = l.strip_prefix(name)?.strip_prefix('=')?;
        (!v.is_empty()).then_some(v)
    })
}

/// What the stand-in requires: what k0s and its components need to run.
const KCONFIG_REQUIRED: &[(&str, &[&str])] = &[
    ("CONFIG_CGROUPS", &["y"]),
    ("CONFIG_CGROUP_BPF", &["y"]),
    ("CONFIG_NAMESPACES", &["y"]),
    ("CONFIG_NETFILTER_XT_MATCH_COMMENT", &["y", "m"]),
    ("CONFIG_OVERLAY_FS", &["y", "m"]),
];

/// What `k0s sysinfo` calls required for any role or for a worker. Shown,
/// not judged; each entry is a list of alternatives.
const SYSINFO_REQUIRED: &[&[&str]] = &[
    &["NET"],
    &["INET"],
    &["CGROUPS"],
    &["CGROUP_SCHED"],
    &["FAIR_GROUP_SCHED"],
    &["NAMESPACES"],
    &["UTS_NS"],
    &["IPC_NS"],
    &["PID_NS"],
    &["NET_NS"],
    &["NETFILTER"],
    &["NF_CONNTRACK"],
    &["NETFILTER_XTABLES"],
    &["NETFILTER_XT_TARGET_REDIRECT", "IP_NF_TARGET_REDIRECT"],
    &["NETFILTER_XT_MATCH_COMMENT"],
    &["EXT4_FS"],
    &["PROC_FS"],
];

pub fn kconfig_problems(config: &str) -> Vec<String> {
    KCONFIG_REQUIRED
        .iter()
        .filter_map(|(name, allowed)| {
            let want = allowed.join("|");
            match kconfig_value(config, name) {
                Some(v) if allowed.contains(&v) => None,
                Some(v) => Some(format!("{name}={v} (want {want})")),
                None => Some(format!("{name} is not set (want {want})")),
            }
        })
        .collect()
}

pub fn sysinfo_missing(config: &str) -> Vec<String> {
    SYSINFO_REQUIRED
        .iter()
        .filter(|alts| {
            !alts.iter().any(|a| {
                matches!(
                    kconfig_value(config, &format!("CONFIG_{a}")),
                    Some("y" | "m")
                )
            })
        })
        .map(|alts| alts.join("|"))
        .collect()
}

fn kernel_config() -> Result<(), String> {
    // Where k0s's sysinfo looks: /proc/config.gz, then files such as
    // /usr/lib/modules/<release>/config (a distro kernel has no IKCONFIG).
    let p = "/proc/config.gz";
    let raw = match File::open(p) {
        Ok(f) => {
            let mut raw = Vec::new();
            flate2::read::GzDecoder::new(f)
                .take(64 << 20)
                .read_to_end(&mut raw)
                .map_err(|e| why_io("cannot decompress", p, &e))?;
            raw
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
            let file = format!("/usr/lib/modules/{}/config", release.trim());
            fs::read(&file).map_err(|e| {
                format!("neither {p} (CONFIG_IKCONFIG_PROC) nor {file} is readable: {e}")
            })?
        }
        Err(e) => return Err(why_io("cannot open", p, &e)),
    };
    let config = String::from_utf8_lossy(&raw);
    let missing = sysinfo_missing(&config);
    say(&format!(
        "kernel-config sysinfo-required-missing={}",
        if missing.is_empty() {
            "none".to_string()
        } else {
            missing.join(",")
        }
    ));
    let problems = kconfig_problems(&config);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join(", "))
    }
}

// ---- payload inputs --------------------------------------------------------

/// Whether a YAML text has the top-level lines of a k0s ClusterConfig.
pub fn cluster_config_problems(text: &str) -> Vec<&'static str> {
    let top = |key: &str, want: &str| {
        text.lines().any(|l| {
            l.strip_prefix(key)
                .and_then(|v| v.strip_prefix(':'))
                .map(|v| {
                    let v = v.trim();
                    let v = v.trim_matches(|c| c == '"' || c == '\'');
                    v == want
                })
                .unwrap_or(false)
        })
    };
    let mut why = Vec::new();
    if !top("apiVersion", "k0s.k0sproject.io/v1beta1") {
        why.push("no `apiVersion: k0s.k0sproject.io/v1beta1` line");
    }
    if !top("kind", "ClusterConfig") {
        why.push("no `kind: ClusterConfig` line");
    }
    why
}

fn config_file(path: &str) -> Result<(), String> {
    let data = fs::read(path).map_err(|e| why_io("cannot read", path, &e))?;
    say(&format!("config-file {path} bytes={}", data.len()));
    let text = String::from_utf8_lossy(&data);
    for line in text.lines().take(20) {
        say(&format!("config | {line}"));
    }
    let why = cluster_config_problems(&text);
    if why.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{path} does not look like a k0s ClusterConfig: {}",
            why.join(", ")
        ))
    }
}

fn say_token(kubeconfig: &str) -> Result<(), String> {
    let info = token::kubeconfig_info(kubeconfig)?;
    say(&format!(
        "token server={} user={}",
        info.server,
        info.user.as_deref().unwrap_or("?")
    ));
    Ok(())
}

fn token_file(path: &str) -> Result<(), String> {
    let meta = fs::metadata(path).map_err(|e| why_io("cannot stat", path, &e))?;
    let mode = meta.mode() & 0o7777;
    say(&format!("token-file {path} mode={mode:04o}"));
    let mut text = String::new();
    File::open(path)
        .and_then(|f| f.take(1 << 20).read_to_string(&mut text))
        .map_err(|e| why_io("cannot read", path, &e))?;
    let mut why = Vec::new();
    if mode != 0o600 {
        why.push(format!("{path} has mode {mode:04o}, want 0600"));
    }
    if let Err(e) = token::decode(&text).and_then(|kc| say_token(&kc)) {
        why.push(e);
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(why.join("; "))
    }
}

/// A token given on the command line or in K0S_TOKEN: shown, not a check.
fn inline_token(source: &str, tok: &str) {
    say(&format!("token source={source}"));
    if let Err(e) = token::decode(tok).and_then(|kc| say_token(&kc)) {
        say(&format!("token invalid: {e}"));
    }
}

// ---- process limits and scratch space --------------------------------------

fn rlimit_nofile() -> Result<(), String> {
    // SAFETY: getrlimit fills the zeroed struct we own.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return Err(format!("getrlimit: {}", io::Error::last_os_error()));
    }
    let show = |v: libc::rlim_t| {
        if v == libc::RLIM_INFINITY {
            "unlimited".to_string()
        } else {
            v.to_string()
        }
    };
    say(&format!(
        "rlimit-nofile soft={} hard={}",
        show(rl.rlim_cur),
        show(rl.rlim_max)
    ));
    // rlim_t is 32 bits on armv7 glibc.
    #[allow(clippy::unnecessary_cast)]
    let soft = rl.rlim_cur as u64;
    if rl.rlim_cur != libc::RLIM_INFINITY && soft < MIN_NOFILE {
        return Err(format!(
            "RLIMIT_NOFILE soft limit is {soft}, want at least {MIN_NOFILE}"
        ));
    }
    Ok(())
}

/// Soft and hard value of a limit, as the unit file would write it.
fn rlimit_pair(resource: libc::c_int) -> Result<(String, String), String> {
    // SAFETY: getrlimit fills the zeroed struct we own.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrlimit(resource as _, &mut rl) } != 0 {
        return Err(format!("getrlimit: {}", io::Error::last_os_error()));
    }
    let show = |v: libc::rlim_t| {
        if v == libc::RLIM_INFINITY {
            "infinity".to_string()
        } else {
            v.to_string()
        }
    };
    Ok((show(rl.rlim_cur), show(rl.rlim_max)))
}

/// The limits of the unit `k0s install` writes: LimitNOFILE=999999 and
/// LimitCORE=infinity (and no process cap standing in for TasksMax=infinity).
fn rlimits_unit() -> Result<(), String> {
    let mut shown = Vec::new();
    let mut why = Vec::new();
    for (name, resource, want) in [
        ("nofile", libc::RLIMIT_NOFILE as libc::c_int, "999999"),
        ("core", libc::RLIMIT_CORE as libc::c_int, "infinity"),
        ("nproc", libc::RLIMIT_NPROC as libc::c_int, "infinity"),
    ] {
        let (soft, hard) = rlimit_pair(resource)?;
        if soft != want || hard != want {
            why.push(format!("{name} is {soft}/{hard}, want {want}"));
        }
        shown.push(format!("{name}={soft}/{hard}"));
    }
    say(&format!("rlimits {}", shown.join(" ")));
    if why.is_empty() {
        Ok(())
    } else {
        Err(why.join("; "))
    }
}

/// Directories k0s, the kubelet and CNI plugins write into (K0S-CONTRACT.md).
const WRITABLE: &[&str] = &[
    "/etc/cni/net.d",
    "/opt/cni/bin",
    "/var/log/pods",
    "/etc/k0s",
    "/usr/libexec/k0s/kubelet-plugins/volume/exec",
];

fn writable_paths() -> Result<(), String> {
    let mut bad = Vec::new();
    for d in WRITABLE {
        if let Err(e) = dir_writable(Path::new(d)) {
            bad.push(e);
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad.join("; "))
    }
}

fn dir_writable(dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| why_io("cannot create", dir, &e))?;
    let p = dir.join(format!(".stand-in-write-check-{}", std::process::id()));
    remove_if_there(&p)?;
    let r = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&p)
        .and_then(|mut f| f.write_all(b"stand-in\n"))
        .map_err(|e| why_io("cannot write", &p, &e));
    let _ = fs::remove_file(&p);
    r
}

fn tmp_writable() -> Result<(), String> {
    let p = PathBuf::from(format!("/tmp/stand-in-tmp-check-{}", std::process::id()));
    remove_if_there(&p)?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&p)
        .map_err(|e| why_io("cannot create", &p, &e))?;
    let wrote = f
        .write_all(b"stand-in\n")
        .map_err(|e| why_io("cannot write", &p, &e));
    drop(f);
    let _ = fs::remove_file(&p);
    wrote
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::tests::Rng;

    #[test]
    fn mounts_and_cgroup_paths() {
        let mounts = "sysfs /sys sysfs rw 0 0\ntmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
        assert_eq!(mount_fstype(mounts, "/sys/fs/cgroup"), Some("cgroup2"));
        assert_eq!(mount_fstype(mounts, "/run"), None);
        assert_eq!(cgroup2_path("0::/kiln/payload\n"), Some("/kiln/payload"));
        assert_eq!(
            cgroup2_path("12:pids:/x\n1:name=systemd:/y\n0::/\n"),
            Some("/")
        );
        assert_eq!(cgroup2_path("12:pids:/x\n"), None);
        assert_eq!(
            missing_controllers("cpuset cpu io memory hugetlb pids rdma misc\n"),
            Vec::<&str>::new()
        );
        assert_eq!(missing_controllers("cpu io memory"), vec!["cpuset", "pids"]);
        assert!(cgroup_not_root(&Ok("/".into())).is_err());
        assert!(cgroup_not_root(&Ok("/kiln".into())).is_ok());
        assert_eq!(cgroup_not_root(&Err("x".into())), Err("x".into()));
    }

    #[test]
    fn hostnames() {
        assert_eq!(hostname_problem("node-1"), None);
        assert_eq!(hostname_problem("Node1"), None);
        assert_eq!(hostname_problem(&"a".repeat(63)), None);
        assert_eq!(hostname_problem("node-1.lab.example"), None);
        for bad in [
            "",
            "(none)",
            "localhost",
            "LocalHost",
            "-a",
            "a-",
            "a_b",
            "a..b",
            "a.-b",
            "é",
            &"a".repeat(64),
        ] {
            assert!(hostname_problem(bad).is_some(), "{bad:?}");
        }
        assert_eq!(etc_hostname("# kiln\n\n node-1 \n"), "node-1");
        assert_eq!(etc_hostname(""), "");
    }

    #[test]
    fn hosts_files() {
        assert_eq!(
            hosts_localhost("127.0.0.1 localhost\n::1 localhost ip6-localhost\n"),
            (true, true)
        );
        assert_eq!(
            hosts_localhost("127.0.0.1\tnode localhost.localdomain LOCALHOST # x\n"),
            (true, false)
        );
        assert_eq!(
            hosts_localhost("0:0:0:0:0:0:0:1 localhost\n"),
            (false, true)
        );
        assert_eq!(
            hosts_localhost("# 127.0.0.1 localhost\n127.0.1.1 localhost\n::1 ip6-localhost\n"),
            (false, false)
        );
        assert_eq!(hosts_localhost("garbage localhost\n\n"), (false, false));
    }

    #[test]
    fn path_lookup() {
        assert!(find_in_path("/nonexistent::/also-not", "mount").is_none());
        assert!(find_in_path("", "sh").is_none());
        // The shell is on any build machine.
        assert!(find_in_path("/nonexistent:/bin:/usr/bin", "sh").is_some());
    }

    #[test]
    fn filesystems() {
        assert!(filesystems_has(
            "nodev\tsysfs\n\text4\nnodev\toverlay\n",
            "overlay"
        ));
        assert!(!filesystems_has("nodev\toverlayfs\n", "overlay"));
    }

    #[test]
    fn kernel_configs() {
        let good = "# comment\nCONFIG_CGROUPS=y\nCONFIG_CGROUP_BPF=y\nCONFIG_NAMESPACES=y\nCONFIG_NETFILTER_XT_MATCH_COMMENT=m\nCONFIG_OVERLAY_FS=y\n";
        assert!(kconfig_problems(good).is_empty());
        let bad = "CONFIG_CGROUPS=y\nCONFIG_CGROUP_BPF=m\n# CONFIG_NAMESPACES is not set\nCONFIG_OVERLAY_FS_REDIRECT_DIR=y\n";
        assert_eq!(
            kconfig_problems(bad),
            vec![
                "CONFIG_CGROUP_BPF=m (want y)",
                "CONFIG_NAMESPACES is not set (want y)",
                "CONFIG_NETFILTER_XT_MATCH_COMMENT is not set (want y|m)",
                "CONFIG_OVERLAY_FS is not set (want y|m)",
            ]
        );
        assert_eq!(kconfig_value("CONFIG_A=\"x\"\n", "CONFIG_A"), Some("\"x\""));
        assert_eq!(kconfig_value("CONFIG_AB=y\n", "CONFIG_A"), None);
        let missing = sysinfo_missing("CONFIG_NET=y\nCONFIG_IP_NF_TARGET_REDIRECT=m\n");
        assert!(missing.contains(&"INET".to_string()));
        assert!(!missing.iter().any(|m| m.contains("REDIRECT") || m == "NET"));
    }

    #[test]
    fn cluster_configs() {
        let ok =
            "apiVersion: k0s.k0sproject.io/v1beta1\nkind: ClusterConfig\nmetadata:\n  name: k0s\n";
        assert!(cluster_config_problems(ok).is_empty());
        assert!(cluster_config_problems(
            "apiVersion: \"k0s.k0sproject.io/v1beta1\"\nkind: 'ClusterConfig'\n"
        )
        .is_empty());
        assert_eq!(cluster_config_problems("kind: ClusterConfig\n").len(), 1);
        // Nested keys are not the document's.
        assert_eq!(
            cluster_config_problems(
                "spec:\n  apiVersion: k0s.k0sproject.io/v1beta1\n  kind: ClusterConfig\n"
            )
            .len(),
            2
        );
    }

    #[test]
    fn arbitrary_text_never_panics() {
        let pieces = [
            "127.0.0.1",
            "::1",
            " ",
            "\t",
            "\n",
            "#",
            "localhost",
            "0::",
            "/",
            "CONFIG_",
            "=",
            "y",
            "apiVersion:",
            "kind:",
            "-",
            "é",
        ];
        let mut rng = Rng::new(7);
        for _ in 0..20_000 {
            let s = rng.string(&pieces);
            let _ = hosts_localhost(&s);
            let _ = hostname_problem(&s);
            let _ = etc_hostname(&s);
            let _ = cgroup2_path(&s);
            let _ = mount_fstype(&s, "/");
            let _ = missing_controllers(&s);
            let _ = kconfig_problems(&s);
            let _ = sysinfo_missing(&s);
            let _ = cluster_config_problems(&s);
            let _ = filesystems_has(&s, "overlay");
        }
    }
}
