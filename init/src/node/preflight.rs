//! Preflight: the builder's requirement table, read against the running
//! kernel, plus cgroups and memory (`run`, right after the config is
//! loaded, so a role this kernel cannot run is refused before anything is
//! set up) and the disk (`var_space`, once /var is in place).

use super::console;
use kiln_contract::config::Role;
use kiln_contract::requirements::{self, KernelConfig, Level, Needs};
use std::io::Read;

pub struct Outcome {
    pub failures: Vec<String>,
    pub warnings: Vec<String>,
}

pub fn run(role: Role, enabled_controllers: &[String]) -> Outcome {
    let mut failures = Vec::new();
    let mut warnings = Vec::new();
    match read_config() {
        Ok(cfg) => {
            let report = requirements::check(&cfg, Needs::for_role(role));
            for m in report.missing(Level::Required) {
                failures.push(format!("CONFIG_{m}"));
            }
            for m in report.missing(Level::Warn) {
                warnings.push(format!("CONFIG_{m} is not set"));
            }
            let optional = report.missing(Level::Report);
            if !optional.is_empty() {
                console::info(&format!("kernel lacks optional options: {}", optional.join(" ")));
            }
        }
        Err(e) => warnings.push(format!("cannot read /proc/config.gz nor {} ({e}); kernel options not checked", shipped_config())),
    }
    if role.runs_workloads() {
        for c in ["cpu", "cpuset", "memory", "pids"] {
            if !enabled_controllers.iter().any(|x| x == c) {
                failures.push(format!("cgroup controller {c}"));
            }
        }
    }
    let (_, total_kib) = super::sys::mem_used_kib();
    let want_mib = if role.runs_control_plane() { 1024 } else { 500 };
    if total_kib > 0 && total_kib / 1024 < want_mib {
        warnings.push(format!("{} MiB of memory; k0s wants at least {want_mib} MiB for a {role}", total_kib / 1024));
    }
    for w in &warnings {
        console::warn(&format!("preflight: {w}"));
    }
    for f in &failures {
        console::error(&format!("preflight: missing {f}"));
    }
    Outcome { failures, warnings }
}

/// The free space for k0s's data, once /var is where it stays (after
/// `storage.var_disk`): the warnings printed.
pub fn var_space() -> Vec<String> {
    let mut warnings = Vec::new();
    if let Some(free) = free_mib("/var/lib/k0s") {
        if free < 1024 {
            warnings.push(format!("{free} MiB free under /var/lib/k0s"));
        }
    }
    for w in &warnings {
        console::warn(&format!("preflight: {w}"));
    }
    warnings
}

/// The running kernel's config: /proc/config.gz, or the copy the image
/// carries (a distro kernel has no IKCONFIG).
fn read_config() -> std::io::Result<KernelConfig> {
    match std::fs::File::open("/proc/config.gz") {
        Ok(f) => {
            let mut s = String::new();
            flate2::read::GzDecoder::new(f).read_to_string(&mut s)?;
            Ok(KernelConfig::parse(&s))
        }
        Err(_) => Ok(KernelConfig::parse(&std::fs::read_to_string(shipped_config())?).shipped()),
    }
}

fn shipped_config() -> String {
    requirements::SHIPPED_CONFIG.replace("{release}", &super::kmod::release())
}

fn free_mib(path: &str) -> Option<u64> {
    let c = std::ffi::CString::new(path).ok()?;
    // SAFETY: valid C string and a zeroed statvfs out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| (st.f_bavail as u64).saturating_mul(st.f_frsize as u64) / (1024 * 1024))
}
