//! Small typed wrappers over the syscalls PID 1 uses. Every error names the
//! operation and the path.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::path::Path;

#[derive(Debug)]
pub struct SysError {
    pub op: String,
    pub err: io::Error,
}

impl fmt::Display for SysError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.op, self.err)
    }
}

impl std::error::Error for SysError {}

pub type Result<T> = std::result::Result<T, SysError>;

pub fn ctx<T>(r: io::Result<T>, op: impl FnOnce() -> String) -> Result<T> {
    r.map_err(|err| SysError { op: op(), err })
}

fn cstr(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| SysError { op: format!("path {s:?}"), err: io::Error::from(io::ErrorKind::InvalidInput) })
}

fn check(rc: libc::c_int, op: impl FnOnce() -> String) -> Result<()> {
    if rc < 0 {
        Err(SysError { op: op(), err: io::Error::last_os_error() })
    } else {
        Ok(())
    }
}

pub fn mount(src: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: Option<&str>) -> Result<()> {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f) = (cstr(src)?, cstr(target)?, cstr(fstype)?);
    let d = data.map(cstr).transpose()?;
    let dp = d.as_ref().map_or(std::ptr::null(), |d| d.as_ptr() as *const libc::c_void);
    // SAFETY: all pointers are valid NUL-terminated strings or null.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, dp) };
    check(rc, || format!("mount {fstype} on {target}"))
}

/// Changes propagation or flags of an existing mount.
pub fn remount(target: &str, flags: libc::c_ulong) -> Result<()> {
    let t = cstr(target)?;
    // SAFETY: valid C strings; null source/fstype/data are allowed here.
    let rc = unsafe { libc::mount(std::ptr::null(), t.as_ptr(), std::ptr::null(), flags, std::ptr::null()) };
    check(rc, || format!("remount {target} (flags {flags:#x})"))
}

pub fn umount(target: &str, flags: libc::c_int) -> Result<()> {
    let t = cstr(target)?;
    // SAFETY: valid C string.
    let rc = unsafe { libc::umount2(t.as_ptr(), flags) };
    check(rc, || format!("umount {target}"))
}

pub fn is_mountpoint(target: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts").map(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(target))).unwrap_or(false)
}

pub fn write(path: impl AsRef<Path>, content: impl AsRef<[u8]>) -> Result<()> {
    let p = path.as_ref();
    ctx(std::fs::write(p, content), || format!("write {}", p.display()))
}

pub fn read(path: impl AsRef<Path>) -> Result<String> {
    let p = path.as_ref();
    ctx(std::fs::read_to_string(p), || format!("read {}", p.display()))
}

pub fn mkdir_p(path: impl AsRef<Path>) -> Result<()> {
    let p = path.as_ref();
    ctx(std::fs::create_dir_all(p), || format!("mkdir {}", p.display()))
}

pub fn sethostname(name: &str) -> Result<()> {
    // SAFETY: pointer and length describe a valid buffer.
    let rc = unsafe { libc::sethostname(name.as_ptr() as *const libc::c_char, name.len()) };
    check(rc, || format!("sethostname {name}"))
}

pub fn setrlimit(resource: libc::c_int, soft: u64, hard: u64) -> Result<()> {
    let lim = libc::rlimit { rlim_cur: soft as libc::rlim_t, rlim_max: hard as libc::rlim_t };
    // SAFETY: valid pointer to an initialised rlimit. The resource type differs
    // between libcs, hence the cast.
    #[allow(clippy::useless_conversion)]
    let rc = unsafe { libc::setrlimit(resource as _, &lim) };
    check(rc, || format!("setrlimit {resource}"))
}

/// Seconds since boot (CLOCK_BOOTTIME).
pub fn uptime() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Resident set size of this process, in KiB.
pub fn rss_kib() -> u64 {
    read("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// Memory the OS is using (MemTotal - MemAvailable), in KiB.
pub fn mem_used_kib() -> (u64, u64) {
    let s = read("/proc/meminfo").unwrap_or_default();
    let get = |k: &str| s.lines().find(|l| l.starts_with(k)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let total = get("MemTotal:");
    (total.saturating_sub(get("MemAvailable:")), total)
}

pub fn kill(pid: i32, sig: libc::c_int) -> bool {
    // SAFETY: plain syscall.
    unsafe { libc::kill(pid, sig) == 0 }
}

pub fn sync() {
    // SAFETY: plain syscall.
    unsafe { libc::sync() };
}

pub fn reboot(cmd: libc::c_int) -> io::Error {
    // SAFETY: plain syscall; returns only on failure.
    unsafe { libc::reboot(cmd) };
    io::Error::last_os_error()
}

/// Makes fd 0, 1, 2 the console.
pub fn attach_console() {
    let path = c"/dev/console";
    // SAFETY: valid C string; fds are only duplicated if open succeeded.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
        if fd >= 0 {
            libc::dup2(fd, 0);
            libc::dup2(fd, 1);
            libc::dup2(fd, 2);
            if fd > 2 {
                libc::close(fd);
            }
        }
    }
}

/// Reaps every exited child; returns (pid, wait status) of each.
pub fn reap() -> Vec<(i32, i32)> {
    let mut out = Vec::new();
    loop {
        let mut status = 0;
        // SAFETY: valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return out;
        }
        out.push((pid, status));
    }
}

/// Renames a file on the ESP and makes the new name durable with the file's
/// size and first cluster.
///
/// On FAT those live in the directory entry, not in an inode: Linux's vfat
/// writes the new entry at once but fills them in only when it writes the
/// file's inode back. Syncing only the directory therefore can put an empty
/// `kiln-….efi` on the disk, and a power cut then leaves an entry that does
/// not boot (the QEMU power-loss test found this). Syncing the file right
/// after the rename writes the entry complete.
pub fn rename_synced(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    std::fs::File::open(to)?.sync_all()?;
    if let Some(dir) = to.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
