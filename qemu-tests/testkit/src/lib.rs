//! Test helpers shared by kiln's crates (dev-dependency only).
//!
//! kiln checks the formats it writes with tools nobody here wrote: sgdisk,
//! fsck.vfat, unsquashfs, veritysetup, minisign, xorriso, ... On a
//! workstation without one, the test that needs it prints one
//! `skipped: ...` line and passes. Under CI (`CI=true` or `CI=1`) a missing
//! checker is a failure: every format check must run there, and
//! `scripts/setup.sh` installs them all.

use std::ffi::OsStr;
use std::fmt::Display;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where checkers are looked for besides `PATH`: a non-root `PATH` often
/// lacks the sbin directories that sgdisk, mkfs.ext4 and the like live in.
const SBIN: [&str; 2] = ["/usr/sbin", "/sbin"];

/// An external checker tool, or None when it is missing and the test should
/// skip: then one `skipped: NAME not installed (...)` line goes to stderr.
///
/// `package` is the Debian package with the tool (`apt-get install
/// PACKAGE`), or, when it contains a space, the whole install command (e.g.
/// `python3 -m pip install spdx-tools`).
///
/// # Panics
/// When the tool is missing and `CI` is `true` or `1`.
#[track_caller]
pub fn checker(name: &str, package: &str) -> Option<PathBuf> {
    missing_is_skip(
        find(name),
        &format!("checker `{name}`"),
        name,
        package,
        under_ci(),
    )
}

/// A file a checker needs (e.g. systemd-boot's
/// `/usr/lib/systemd/boot/efi/linuxx64.efi.stub`), or None when it is not
/// there; with the same rule as [`checker`]: a skip on a workstation, a
/// panic under CI.
#[track_caller]
pub fn checker_file(path: impl AsRef<Path>, package: &str) -> Option<PathBuf> {
    let path = path.as_ref();
    let found = path.is_file().then(|| path.to_path_buf());
    let shown = path.display().to_string();
    missing_is_skip(
        found,
        &format!("checker file `{shown}`"),
        &shown,
        package,
        under_ci(),
    )
}

/// A skip that is not a missing checker (e.g. "creating device nodes needs
/// root"): prints `skipped: REASON` to stderr. Allowed under CI too.
pub fn skip(reason: impl Display) {
    eprintln!("skipped: {reason}");
}

/// An executable called `name` on `PATH` or in /usr/sbin or /sbin, without
/// any skip or CI rule: for running a tool that [`checker`] already found.
pub fn find(name: &str) -> Option<PathBuf> {
    find_in(
        std::env::var_os("PATH").as_deref().unwrap_or_default(),
        name,
    )
}

/// A [`Command`] for the checker `name`: its full path when [`find`] finds
/// it (so sbin tools run under a `PATH` without sbin), else the bare name.
pub fn command(name: &str) -> Command {
    Command::new(find(name).unwrap_or_else(|| PathBuf::from(name)))
}

/// Whether this is a CI run: `CI` is `true` or `1` (GitHub Actions and most
/// CI systems set `CI=true`).
pub fn under_ci() -> bool {
    ci_value(std::env::var("CI").ok().as_deref())
}

fn ci_value(v: Option<&str>) -> bool {
    matches!(v.map(str::trim), Some("true" | "TRUE" | "True" | "1"))
}

fn find_in(path: &OsStr, name: &str) -> Option<PathBuf> {
    std::env::split_paths(path)
        .filter(|d| !d.as_os_str().is_empty())
        .chain(SBIN.map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn install_hint(package: &str) -> String {
    if package.contains(' ') {
        package.to_string()
    } else {
        format!("apt-get install {package}")
    }
}

#[track_caller]
fn missing_is_skip(
    found: Option<PathBuf>,
    what: &str,
    name: &str,
    package: &str,
    ci: bool,
) -> Option<PathBuf> {
    if found.is_none() {
        let hint = install_hint(package);
        assert!(
            !ci,
            "{what} is missing ({hint}, or run scripts/setup.sh); under CI=true every format check must run"
        );
        eprintln!("skipped: {name} not installed ({hint})");
    }
    found
}

/// What a finished command printed, stdout then stderr, for assertions
/// and failure messages.
pub fn output_text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Deterministic, incompressible test data: xorshift64 from `seed`.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A file of `len` bytes at `path`, sparse (holes read as zeros), open for
/// reading and writing.
pub fn sparse_file(path: &Path, len: u64) -> std::fs::File {
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    f.set_len(len).unwrap_or_else(|e| panic!("sizing {}: {e}", path.display()));
    f
}

/// A minimal little-endian ELF32 ARM executable with an interpreter and
/// a dynamic section, laid out by hand: header, 3 program headers
/// (PT_LOAD over the whole file, PT_INTERP, PT_DYNAMIC), the interpreter
/// string, the dynamic table, the string table.
pub fn tiny_elf32(interp: &str, needed: &[&str], runpath: Option<&str>) -> Vec<u8> {
    let base = 0x10000u32;
    let phoff = 52u32;
    let interp_off = phoff + 3 * 32;
    let interp_bytes = [interp.as_bytes(), b"\0"].concat();
    let mut strs = vec![0u8];
    let mut idx = Vec::new();
    for n in needed.iter().chain(runpath.iter()) {
        idx.push(strs.len() as u32);
        strs.extend_from_slice(n.as_bytes());
        strs.push(0);
    }
    let dyn_off = (interp_off + interp_bytes.len() as u32 + 3) & !3;
    let ndyn = needed.len() + usize::from(runpath.is_some()) + 3;
    let str_off = dyn_off + 8 * ndyn as u32;
    let total = str_off + strs.len() as u32;
    let mut b = Vec::new();
    b.extend_from_slice(b"\x7fELF\x01\x01\x01\0\0\0\0\0\0\0\0\0");
    for v in [2u16, 40] {
        b.extend_from_slice(&v.to_le_bytes()); // e_type, e_machine
    }
    for v in [1u32, base, phoff, 0, 0x0500_0400] {
        b.extend_from_slice(&v.to_le_bytes()); // version, entry, phoff, shoff, flags
    }
    for v in [52u16, 32, 3, 40, 0, 0] {
        b.extend_from_slice(&v.to_le_bytes()); // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
    }
    let ph = |ty: u32, off: u32, size: u32| [ty, off, base + off, base + off, size, size, 4, 4];
    for p in [ph(1, 0, total), ph(3, interp_off, interp_bytes.len() as u32), ph(2, dyn_off, 8 * ndyn as u32)] {
        for v in p {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    b.extend_from_slice(&interp_bytes);
    b.resize(dyn_off as usize, 0);
    let mut dy: Vec<(u32, u32)> = needed.iter().enumerate().map(|(i, _)| (1, idx[i])).collect();
    if runpath.is_some() {
        dy.push((29, idx[needed.len()]));
    }
    dy.extend([(5, base + str_off), (10, strs.len() as u32), (0, 0)]);
    for (t, v) in dy {
        b.extend_from_slice(&t.to_le_bytes());
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&strs);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    // The CI rule is tested through missing_is_skip and ci_value, not by
    // setting CI: tests run in parallel threads of one process, and CI may
    // well be set for the whole run.

    #[test]
    fn present_is_some() {
        let sh = find("sh").expect("sh on PATH");
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{}", sh.display());
        assert_eq!(
            missing_is_skip(Some(sh.clone()), "checker `sh`", "sh", "dash", true),
            Some(sh.clone())
        );
        assert_eq!(checker("sh", "dash"), Some(sh));
        assert!(checker_file("/bin/sh", "dash").is_some());
    }

    #[test]
    fn missing_is_none_off_ci() {
        let name = "kiln-testkit-no-such-tool";
        assert_eq!(find(name), None);
        assert_eq!(
            missing_is_skip(find(name), "checker `x`", name, "nothing", false),
            None
        );
    }

    #[test]
    #[should_panic(
        expected = "checker `kiln-testkit-no-such-tool` is missing (apt-get install nothing, or run scripts/setup.sh); under CI=true every format check must run"
    )]
    fn missing_panics_under_ci() {
        let name = "kiln-testkit-no-such-tool";
        missing_is_skip(
            find(name),
            &format!("checker `{name}`"),
            name,
            "nothing",
            true,
        );
    }

    #[test]
    #[should_panic(expected = "(python3 -m pip install spdx-tools, or run scripts/setup.sh)")]
    fn a_command_is_shown_as_it_is() {
        missing_is_skip(
            None,
            "checker `pyspdxtools`",
            "pyspdxtools",
            "python3 -m pip install spdx-tools",
            true,
        );
    }

    #[test]
    fn ci_values() {
        for v in ["true", "1", "TRUE", " true\n"] {
            assert!(ci_value(Some(v)), "{v:?}");
        }
        for v in ["", "0", "false", "no"] {
            assert!(!ci_value(Some(v)), "{v:?}");
        }
        assert!(!ci_value(None));
    }

    #[test]
    fn looks_in_sbin_and_only_at_executables() {
        let d = std::env::temp_dir().join(format!("kiln-testkit-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let (exe, data) = (d.join("a-tool"), d.join("not-a-tool"));
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::write(&data, "").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(find_in(d.as_os_str(), "a-tool"), Some(exe));
        assert_eq!(find_in(d.as_os_str(), "not-a-tool"), None);
        // An empty PATH still finds what is in /usr/sbin or /sbin.
        if let Some(t) = SBIN
            .iter()
            .flat_map(|s| std::fs::read_dir(s).into_iter().flatten())
            .flatten()
            .map(|e| e.path())
            .find(|p| is_executable(p))
        {
            let name = t.file_name().unwrap().to_str().unwrap();
            assert!(find_in(OsStr::new(""), name).is_some(), "{}", t.display());
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
