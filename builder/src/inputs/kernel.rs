//! The kernel: a minimal build from a source tarball plus `kernel-configs/`
//! fragments, cached by a hash of source, fragments and toolchain.
//!
//! After `olddefconfig`, every option a fragment asked for must have the value
//! it asked for: Kconfig drops options whose dependencies are unmet without a
//! word, and a dropped option is a build error here.

use crate::inputs::cache::Cache;
use crate::inputs::input::{self, Resolved};
use crate::arch::Arch;
use crate::progress::Counter;
use crate::inputs::input::Input;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Bump when the build recipe changes in a way that changes the output.
/// v2: clean environment with TZ=UTC, build paths mapped out, ld in the key.
const RECIPE: &str = "kiln-kernel-v2";

/// `[kernel]` as resolved from the profile: fragment paths made absolute.
#[derive(Debug, Clone)]
pub struct KernelSpec {
    pub source: Input,
    pub base: String,
    pub fragments: Vec<PathBuf>,
    /// Source patches, applied in order with `patch -p1`.
    pub patches: Vec<PathBuf>,
    pub cmdline: Vec<String>,
    /// `kind = "distro"`: a Debian kernel package instead of compiling
    /// (`source`, `base`, `fragments` and `patches` are then unused).
    pub distro: Option<DistroSpec>,
}

/// The `[kernel]` keys of a distro kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct DistroSpec {
    /// The `linux-image-<release>` package (not the `linux-image-amd64`
    /// metapackage, which holds no kernel).
    pub package: Input,
    /// Hardware classes whose drivers go in (see `distro::CLASSES`).
    pub drivers: Vec<String>,
    /// More modules by name, with their closure.
    pub modules: Vec<String>,
    /// Firmware packages; a module's declared `firmware=` files are taken
    /// from them.
    pub firmware: Vec<Input>,
}

/// A module shipped in the image, for the manifest and SBOM.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Shipped {
    pub name: String,
    pub path: String,
    pub sha256: String,
    /// Also in the stage-1 initramfs.
    pub stage1: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{file}:{line}: `{text}` is not a Kconfig line (want `CONFIG_X=y`, `CONFIG_X=\"s\"` or `# CONFIG_X is not set`)")]
    BadFragmentLine { file: PathBuf, line: usize, text: String },
    #[error("{0}")]
    Dropped(String),
    #[error("kernel {step} failed (exit {code}); the last lines of {log}:\n{tail}")]
    Make { step: String, code: String, log: PathBuf, tail: String },
    #[error("kernel build: {what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("kernel build: {0}")]
    Other(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> KernelError {
    let what = what.into();
    move |source| KernelError::Io { what, source }
}

/// A requested option value, with where it was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub option: String,
    /// `None` means "is not set".
    pub value: Option<String>,
    pub file: PathBuf,
    pub line: usize,
}

/// Parses fragments in order; a later request for the same option wins.
pub fn parse_fragments(files: &[PathBuf]) -> Result<BTreeMap<String, Request>, KernelError> {
    let mut out = BTreeMap::new();
    for f in files {
        let text = std::fs::read_to_string(f).map_err(io(format!("reading {}", f.display())))?;
        for (i, raw) in text.lines().enumerate() {
            let l = raw.trim();
            let req = if let Some(rest) = l.strip_prefix("# CONFIG_").and_then(|r| r.strip_suffix(" is not set")) {
                Some((rest.to_string(), None))
            } else if l.is_empty() || l.starts_with('#') {
                None
            } else if let Some((k, v)) = l.strip_prefix("CONFIG_").and_then(|r| r.split_once('=')) {
                if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || v.is_empty() {
                    return Err(KernelError::BadFragmentLine { file: f.clone(), line: i + 1, text: raw.to_string() });
                }
                Some((k.to_string(), if v == "n" { None } else { Some(v.to_string()) }))
            } else {
                return Err(KernelError::BadFragmentLine { file: f.clone(), line: i + 1, text: raw.to_string() });
            };
            if let Some((option, value)) = req {
                out.insert(option.clone(), Request { option, value, file: f.clone(), line: i + 1 });
            }
        }
    }
    Ok(out)
}

/// Requests whose final value differs, as (request, final value).
pub fn mismatches<'a>(requests: &'a BTreeMap<String, Request>, final_config: &str) -> Vec<(&'a Request, Option<String>)> {
    let fin = kiln_contract::requirements::KernelConfig::parse(final_config).values;
    requests
        .values()
        .filter_map(|r| {
            let got = fin.get(&r.option).cloned();
            (got != r.value).then_some((r, got))
        })
        .collect()
}

/// Renders the dropped-options error, with each option's `depends on` lines
/// from the kernel source when they can be found.
fn dropped_error(bad: &[(&Request, Option<String>)], src: &Path) -> KernelError {
    let mut msg = format!("{} requested kernel option(s) did not survive olddefconfig:\n", bad.len());
    for (r, got) in bad {
        let want = r.value.clone().unwrap_or_else(|| "is not set".into());
        let got = got.clone().unwrap_or_else(|| "not set".into());
        msg.push_str(&format!("  CONFIG_{}={want} ({}:{}) ended up {got}", r.option, r.file.display(), r.line));
        if let Some(deps) = kconfig_depends(src, &r.option) {
            msg.push_str(&format!("; Kconfig says: {deps}"));
        }
        msg.push('\n');
    }
    msg.push_str("Add the options they depend on to a fragment, or remove the request if the option does not exist in this kernel version.");
    KernelError::Dropped(msg)
}

fn kconfig_depends(src: &Path, option: &str) -> Option<String> {
    let needle = format!("config {option}");
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let name = e.file_name();
            let name = name.to_string_lossy();
            if p.is_dir() {
                if !name.starts_with('.') && name != "Documentation" && name != "tools" {
                    stack.push(p);
                }
            } else if name.starts_with("Kconfig") {
                let Ok(text) = std::fs::read_to_string(&p) else { continue };
                let mut lines = text.lines();
                while let Some(l) = lines.next() {
                    if l.trim() == needle || l.trim() == format!("menuconfig {option}") {
                        let deps: Vec<String> = lines
                            .by_ref()
                            .take_while(|l| !l.starts_with("config ") && !l.starts_with("menuconfig "))
                            .map(str::trim)
                            .filter(|l| l.starts_with("depends on"))
                            .map(str::to_string)
                            .collect();
                        return Some(if deps.is_empty() { "no `depends on` (check the `if` block around it)".into() } else { deps.join("; ") });
                    }
                }
            }
        }
    }
    None
}

/// A built (or cached) kernel.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub image: PathBuf,
    pub config: PathBuf,
    pub release: String,
    pub key: String,
    pub modules_dir: PathBuf,
    /// The device trees the config built (`make dtbs`), by their path under
    /// `arch/<arch>/boot/dts/` (e.g. `allwinner/sun7i-a20-cubieboard2.dtb`).
    /// Empty on amd64, and on arm when the config enables no board platform.
    pub dtbs_dir: PathBuf,
    /// The modules for the stage-1 initramfs (a `lib/modules` tree like
    /// `modules_dir`): the same directory for a compiled kernel.
    pub stage1_modules_dir: PathBuf,
    pub cached: bool,
    /// What a distro kernel shipped.
    pub distro: Option<DistroKernel>,
}

/// The package and modules of a distro kernel, for the manifest and SBOM.
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct DistroKernel {
    pub package: String,
    pub modules: Vec<Shipped>,
    pub firmware: Vec<String>,
    /// Firmware files shipped modules may ask for that no firmware package
    /// given has (most are for hardware variants; the node logs a load
    /// failure if one is really needed).
    pub firmware_missing: Vec<String>,
}

fn toolchain_id(arch: Arch) -> String {
    let cc = format!("{}gcc", arch.cross_compile());
    let v = |cmd: &str| {
        Command::new(cmd)
            .arg("--version")
            .env("LC_ALL", "C")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().to_string())
            .unwrap_or_else(|| format!("{cmd}: missing"))
    };
    let ld = format!("{}ld", arch.cross_compile());
    format!("{}\n{}\n{}", v(&cc), v(&ld), v("make"))
}

/// The cache key: source, base, fragments (content, in order) and toolchain.
pub fn cache_key(arch: Arch, source_sha: &str, spec: &KernelSpec) -> Result<String, KernelError> {
    let mut k = format!("{RECIPE}\n{arch}\n{source_sha}\n{}\n{}\n", spec.base, toolchain_id(arch));
    for f in &spec.fragments {
        let text = std::fs::read_to_string(f).map_err(io(format!("reading {}", f.display())))?;
        k.push_str(&format!("{}\n{}\n", f.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(), input::sha256_bytes(text.as_bytes())));
    }
    // Only when there are patches, so an unpatched kernel keeps its key.
    for (name, sha) in patch_ids(&spec.patches)? {
        k.push_str(&format!("patch\n{name}\n{sha}\n"));
    }
    Ok(input::sha256_bytes(k.as_bytes()))
}

/// (file name, sha256 of the content) of each patch, in order.
fn patch_ids(patches: &[PathBuf]) -> Result<Vec<(String, String)>, KernelError> {
    patches
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).map_err(io(format!("reading kernel patch {}", p.display())))?;
            Ok((p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(), input::sha256_bytes(&bytes)))
        })
        .collect()
}

/// Builds the kernel, or returns the cached one.
pub fn build(arch: Arch, source: &Resolved, spec: &KernelSpec, cache: &Cache, progress: &Counter) -> Result<Kernel, KernelError> {
    let requests = parse_fragments(&spec.fragments)?;
    let key = cache_key(arch, &source.sha256, spec)?;
    let entry = cache.entry("kernel", &key);
    let (img_target, _) = arch.kernel_image();
    let found = |cached| -> Result<Kernel, KernelError> {
        Ok(Kernel {
            image: entry.join(img_target),
            config: entry.join("config"),
            release: std::fs::read_to_string(entry.join("release")).map_err(io("reading cached kernel release"))?.trim().to_string(),
            key: key.clone(),
            modules_dir: entry.join("modules"),
            dtbs_dir: entry.join("dtbs"),
            stage1_modules_dir: entry.join("modules"),
            cached,
            distro: None,
        })
    };
    if entry.join("release").exists() {
        tracing::info!("kernel {key:.12} is cached");
        return found(true);
    }
    check_toolchain(arch)?;
    let src = patched_source(source, &spec.patches, cache)?;
    // One build directory per key, locked, so concurrent builds never share one.
    let build = cache.work(&format!("kernel-build/{}", &key[..16])).map_err(io("creating the build directory"))?;
    let _lock = lock(&build)?;
    if entry.join("release").exists() {
        return found(true);
    }
    let log = build.join("kiln-build.log");
    let make = |args: &[&str], step: &str| run_make(&src, &build, arch, args, step, &log, None);

    tracing::info!("kernel: {} + {} fragment(s) for {arch}", spec.base, spec.fragments.len());
    make(&[&spec.base], &spec.base)?;
    let cfg_path = build.join(".config");
    let mut cfg = std::fs::read_to_string(&cfg_path).map_err(io("reading .config"))?;
    for r in requests.values() {
        match &r.value {
            Some(v) => cfg.push_str(&format!("CONFIG_{}={v}\n", r.option)),
            None => cfg.push_str(&format!("# CONFIG_{} is not set\n", r.option)),
        }
    }
    std::fs::write(&cfg_path, cfg).map_err(io("writing .config"))?;
    make(&["olddefconfig"], "olddefconfig")?;
    let fin = std::fs::read_to_string(&cfg_path).map_err(io("reading .config"))?;
    let bad = mismatches(&requests, &fin);
    if !bad.is_empty() {
        return Err(dropped_error(&bad, &src));
    }
    let jobs = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).to_string();
    // The progress lines count the files compiled, against the count of
    // the last compile for this arch when there was one.
    let count_file = build.parent().map(|p| p.join(format!("{arch}.compiled"))).unwrap_or_default();
    let last: u64 = std::fs::read_to_string(&count_file).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0);
    progress.set_total(last);
    tracing::info!("kernel: compiling with -j{jobs} (several minutes the first time; cached after)");
    let mut targets = vec![img_target];
    let modular = fin.lines().any(|l| l.ends_with("=m"));
    if modular {
        targets.push("modules");
    }
    // Device trees are kept for board overlays; QEMU virt makes its own.
    let dtbs = arch != Arch::Amd64 && fin.lines().any(|l| l == "CONFIG_OF=y");
    if dtbs {
        targets.push("dtbs");
    }
    let jflag = format!("-j{jobs}");
    let mut args: Vec<&str> = vec![&jflag];
    args.extend(targets.iter().copied());
    run_make(&src, &build, arch, &args, "compile", &log, Some(progress))?;
    let _ = std::fs::write(&count_file, progress.done.load(std::sync::atomic::Ordering::Relaxed).to_string());
    let release = make_command(&src, &build, arch).arg("-s").arg("kernelrelease").output().map_err(io("make kernelrelease"))?;
    let release = String::from_utf8_lossy(&release.stdout).trim().to_string();
    if release.is_empty() {
        return Err(KernelError::Other("`make kernelrelease` printed nothing".into()));
    }

    let tmp = cache.temp_dir().map_err(io("creating a temp dir"))?;
    std::fs::copy(build.join(arch.kernel_image().1), tmp.path().join(img_target)).map_err(io("copying the kernel image"))?;
    std::fs::copy(&cfg_path, tmp.path().join("config")).map_err(io("copying .config"))?;
    std::fs::write(tmp.path().join("release"), format!("{release}\n")).map_err(io("writing release"))?;
    let mods = tmp.path().join("modules");
    std::fs::create_dir_all(&mods).map_err(io("creating modules dir"))?;
    if modular {
        make(&[&format!("INSTALL_MOD_PATH={}", mods.display()), "INSTALL_MOD_STRIP=1", "modules_install"], "modules_install")?;
    } else if build.join("modules.builtin").exists() {
        let dst = mods.join("lib/modules").join(&release);
        std::fs::create_dir_all(&dst).map_err(io("creating modules dir"))?;
        for f in ["modules.builtin", "modules.builtin.modinfo"] {
            if build.join(f).exists() {
                std::fs::copy(build.join(f), dst.join(f)).map_err(io(format!("copying {f}")))?;
            }
        }
    }
    let dtb_dst = tmp.path().join("dtbs");
    std::fs::create_dir_all(&dtb_dst).map_err(io("creating the dtbs dir"))?;
    if dtbs {
        let dts = build.join("arch").join(arch.kernel_arch()).join("boot/dts");
        copy_dtbs(&dts, &dts, &dtb_dst).map_err(io("copying the device trees"))?;
    }
    cache.commit_dir(tmp, &entry).map_err(io("storing the kernel in the cache"))?;
    // The artifacts are kept; the object tree is not worth its gigabyte.
    let _ = std::fs::remove_dir_all(&build);
    found(false)
}

/// Copies every `*.dtb` under `dir` to the same relative path under `dst`.
fn copy_dtbs(root: &Path, dir: &Path, dst: &Path) -> std::io::Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    for e in entries {
        let p = e?.path();
        if p.is_dir() {
            copy_dtbs(root, &p, dst)?;
        } else if p.extension().is_some_and(|x| x == "dtb") {
            let rel = p.strip_prefix(root).expect("under root");
            let to = dst.join(rel);
            std::fs::create_dir_all(to.parent().expect("has a parent"))?;
            std::fs::copy(&p, &to)?;
        }
    }
    Ok(())
}

/// An exclusive lock on a directory, held until the returned file is dropped.
fn lock(dir: &Path) -> Result<std::fs::File, KernelError> {
    lock_file(&dir.join(".kiln-lock"))
}

fn lock_file(path: &Path) -> Result<std::fs::File, KernelError> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(io(format!("locking {}", path.display())))?;
    // SAFETY: valid fd.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(KernelError::Io { what: "locking the build directory".into(), source: std::io::Error::last_os_error() });
    }
    Ok(f)
}

fn check_toolchain(arch: Arch) -> Result<(), KernelError> {
    let cc = format!("{}gcc", arch.cross_compile());
    for tool in [cc.as_str(), "make", "flex", "bison", "bc"] {
        if Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().map(|o| !o.status.success()).unwrap_or(true) {
            return Err(KernelError::Other(format!(
                "`{tool}` is not installed; a kernel build needs build-essential bc flex bison libelf-dev libssl-dev{} (apt-get install them)",
                if arch == Arch::Amd64 { String::new() } else { format!(" gcc-{}", arch.cross_compile().trim_end_matches('-')) }
            )));
        }
    }
    Ok(())
}

/// `make` in the kernel tree with nothing from the caller's environment but
/// PATH, so the image depends on the source, the config and the toolchain
/// only: not on who builds it, where, when, or in which time zone and locale.
///
/// - `KBUILD_BUILD_*` fix what `uname -v` shows (user, host, `#1`, date).
/// - `TZ=UTC`: the built-in initramfs takes its mtimes from
///   `date -d $KBUILD_BUILD_TIMESTAMP`, which is local time.
/// - The source and build directories live in the cache, so their paths are
///   mapped out of `__FILE__` and debug info (the kernel's own
///   `-fmacro-prefix-map` covers only the source tree, and only macros).
/// - `LOCALVERSION` set (empty) keeps `setlocalversion` from appending `+`
///   when the source happens to sit in a git checkout.
fn make_command(src: &Path, build: &Path, arch: Arch) -> Command {
    // make works with the real paths (`realpath`), so map those.
    let real = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let maps = format!("-ffile-prefix-map={}/= -ffile-prefix-map={}/=", real(src).display(), real(build).display());
    let mut c = Command::new("make");
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()))
        .env("TZ", "UTC")
        .env("LC_ALL", "C")
        .env("KBUILD_BUILD_TIMESTAMP", "1970-01-01")
        .env("KBUILD_BUILD_USER", "kiln")
        .env("KBUILD_BUILD_HOST", "kiln")
        .env("KBUILD_BUILD_VERSION", "1")
        .env("LOCALVERSION", "")
        .arg("-C")
        .arg(src)
        .arg(format!("O={}", build.display()))
        .arg(format!("ARCH={}", arch.kernel_arch()))
        .arg(format!("CROSS_COMPILE={}", arch.cross_compile()))
        .arg(format!("KCFLAGS={maps}"))
        .arg(format!("KAFLAGS={maps}"));
    c
}

/// Runs make, its output into `log`; with `progress`, counts the files it
/// compiles (Kbuild's `  CC      path.o` lines).
fn run_make(src: &Path, build: &Path, arch: Arch, args: &[&str], step: &str, log: &Path, progress: Option<&Counter>) -> Result<(), KernelError> {
    let logf = std::fs::OpenOptions::new().create(true).append(true).open(log).map_err(io(format!("opening {}", log.display())))?;
    let mut cmd = make_command(src, build, arch);
    cmd.args(args).stderr(logf.try_clone().map_err(io("log"))?);
    let status = match progress {
        None => cmd.stdout(logf).status().map_err(io("running make"))?,
        Some(p) => {
            let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().map_err(io("running make"))?;
            let out = child.stdout.take().ok_or_else(|| KernelError::Other("make: no stdout".into()))?;
            let mut logw = std::io::BufWriter::new(logf);
            for line in std::io::BufRead::lines(std::io::BufReader::new(out)) {
                let line = line.map_err(io("reading make's output"))?;
                if is_compile_line(&line) {
                    p.add(1);
                }
                std::io::Write::write_all(&mut logw, format!("{line}\n").as_bytes()).map_err(io("log"))?;
            }
            std::io::Write::flush(&mut logw).map_err(io("log"))?;
            child.wait().map_err(io("running make"))?
        }
    };
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(KernelError::Make {
            step: step.into(),
            code: status.code().map_or("signal".into(), |c| c.to_string()),
            log: log.to_path_buf(),
            tail: tail.join("\n"),
        });
    }
    Ok(())
}

/// Kbuild's quiet line for one compiled C or assembler file.
fn is_compile_line(l: &str) -> bool {
    let mut w = l.split_whitespace();
    matches!(w.next(), Some("CC" | "AS")) && w.last().is_some_and(|f| f.ends_with(".o"))
}

/// The source with `patches` applied, once per source and patch set (the
/// plain unpacked source when there are none). A patch that does not apply
/// is an error naming it, with patch's output; nothing half-patched is kept.
fn patched_source(source: &Resolved, patches: &[PathBuf], cache: &Cache) -> Result<PathBuf, KernelError> {
    let clean = unpack_source(source, cache)?;
    if patches.is_empty() {
        return Ok(clean);
    }
    let ids = patch_ids(patches)?;
    let key = input::sha256_bytes(format!("{}\n{}", source.sha256, ids.iter().map(|(n, s)| format!("{n} {s}\n")).collect::<String>()).as_bytes());
    let dir = cache.entry("kernel-src", &key);
    let top = dir.join("linux");
    let locks = cache.work("locks").map_err(io("creating the lock directory"))?;
    let _lock = lock_file(&locks.join(format!("kernel-src-{}", &key[..16])))?;
    if dir.join(".kiln-unpacked").exists() && top.join("Makefile").exists() {
        return Ok(top);
    }
    tracing::info!("kernel: applying {} patch(es) to {}", patches.len(), source.source);
    let tmp = cache.temp_dir().map_err(io("creating a temp dir"))?;
    let work = tmp.path().join("linux");
    // Hard links: the patched tree costs inodes, not another 1.3 GB. GNU
    // patch writes each file it changes anew and renames it into place, so
    // the clean tree is never touched; a cache on a file system without hard
    // links gets a real copy.
    let mut cp = Command::new("cp").args(["-al"]).arg(&clean).arg(&work).output().map_err(io("running cp"))?;
    if !cp.status.success() {
        let _ = std::fs::remove_dir_all(&work);
        cp = Command::new("cp").args(["-a", "--reflink=auto"]).arg(&clean).arg(&work).output().map_err(io("running cp"))?;
    }
    if !cp.status.success() {
        return Err(KernelError::Other(format!("copying the kernel source for patching: {}", String::from_utf8_lossy(&cp.stderr).trim())));
    }
    for p in patches {
        let out = Command::new("patch").args(["-p1", "--batch", "--forward", "--no-backup-if-mismatch", "-d"]).arg(&work).arg("-i").arg(p).output().map_err(|e| KernelError::Other(format!("running patch for {}: {e} (apt-get install patch)", p.display())))?;
        if !out.status.success() {
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            return Err(KernelError::Other(format!("kernel patch {} does not apply to {}:\n{}\nRebase the patch on this source, or drop it from `kernel.patches`", p.display(), source.source, text.trim())));
        }
    }
    std::fs::write(tmp.path().join(".kiln-unpacked"), "").map_err(io("marking the source patched"))?;
    cache.commit_dir(tmp, &dir).map_err(io("storing the patched kernel source"))?;
    Ok(top)
}

/// Unpacks the source tarball once per source hash.
fn unpack_source(source: &Resolved, cache: &Cache) -> Result<PathBuf, KernelError> {
    let dir = cache.entry("kernel-src", &source.sha256);
    let find_top = |d: &Path| -> Option<PathBuf> {
        if d.join("Makefile").exists() {
            return Some(d.to_path_buf());
        }
        std::fs::read_dir(d).ok()?.flatten().map(|e| e.path()).find(|p| p.join("Makefile").exists() && p.join("Kconfig").exists())
    };
    let locks = cache.work("locks").map_err(io("creating the lock directory"))?;
    let _lock = lock_file(&locks.join(format!("kernel-src-{}", &source.sha256[..16])))?;
    if dir.join(".kiln-unpacked").exists() {
        if let Some(t) = find_top(&dir) {
            return Ok(t);
        }
    }
    tracing::info!("unpacking kernel source {}", source.source);
    let tmp = cache.temp_dir().map_err(io("creating a temp dir"))?;
    let f = std::fs::File::open(&source.path).map_err(io(format!("opening {}", source.path.display())))?;
    let mut magic = [0u8; 6];
    std::io::Read::read_exact(&mut &f, &mut magic).map_err(io("reading the source tarball"))?;
    let f = std::fs::File::open(&source.path).map_err(io("opening the source tarball"))?;
    let reader: Box<dyn std::io::Read> = if magic == *b"\xfd7zXZ\0" {
        Box::new(xz2::read::XzDecoder::new(std::io::BufReader::new(f)))
    } else if magic[..2] == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f)))
    } else {
        Box::new(std::io::BufReader::new(f))
    };
    tar::Archive::new(reader).unpack(tmp.path()).map_err(io("unpacking the kernel source"))?;
    std::fs::write(tmp.path().join(".kiln-unpacked"), "").map_err(io("marking the source unpacked"))?;
    cache.commit_dir(tmp, &dir).map_err(io("storing the kernel source"))?;
    find_top(&dir).ok_or_else(|| KernelError::Other(format!("{} holds no kernel tree (no Makefile + Kconfig)", source.source)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny "kernel source" tarball, a cache, and the source as resolved.
    fn tiny_source(d: &Path) -> (Cache, Resolved) {
        let tree = d.join("t/linux-x");
        std::fs::create_dir_all(&tree).unwrap();
        std::fs::write(tree.join("Makefile"), "all:\n").unwrap();
        std::fs::write(tree.join("Kconfig"), "config A\n\tbool \"a\"\n").unwrap();
        let tarball = d.join("linux.tar");
        let st = Command::new("tar").arg("-C").arg(d.join("t")).arg("-cf").arg(&tarball).arg("linux-x").status().unwrap();
        assert!(st.success());
        let r = Resolved { name: "kernel.source".into(), kind: "file", source: "linux.tar".into(), version: None, sha256: "ab".repeat(32), size: 0, deb: None, path: tarball };
        (Cache::at(d.join("cache")), r)
    }

    #[test]
    fn patches_apply_once_and_a_bad_one_is_named() {
        let d = tempfile::tempdir().unwrap();
        let (cache, src) = tiny_source(d.path());
        let good = d.path().join("0001-good.patch");
        std::fs::write(&good, "--- a/Makefile\n+++ b/Makefile\n@@ -1 +1,2 @@\n all:\n+\t@echo patched\n").unwrap();
        let top = patched_source(&src, std::slice::from_ref(&good), &cache).unwrap();
        assert_eq!(std::fs::read_to_string(top.join("Makefile")).unwrap(), "all:\n\t@echo patched\n");
        // The clean tree is untouched, and the patched one is reused.
        let clean = unpack_source(&src, &cache).unwrap();
        assert_eq!(std::fs::read_to_string(clean.join("Makefile")).unwrap(), "all:\n");
        assert_eq!(patched_source(&src, std::slice::from_ref(&good), &cache).unwrap(), top);
        let bad = d.path().join("0002-bad.patch");
        std::fs::write(&bad, "--- a/Kconfig\n+++ b/Kconfig\n@@ -1 +1 @@\n-config B\n+config C\n").unwrap();
        let e = patched_source(&src, &[good.clone(), bad.clone()], &cache).unwrap_err().to_string();
        assert!(e.contains("0002-bad.patch does not apply to linux.tar") && e.contains("FAILED"), "{e}");
        // The key changes with the patches, and not without them.
        let spec = |patches: Vec<PathBuf>| KernelSpec { source: Input::default(), base: "tinyconfig".into(), fragments: vec![], patches, cmdline: vec![], distro: None };
        let plain = cache_key(Arch::Armv7, "s", &spec(vec![])).unwrap();
        assert_ne!(plain, cache_key(Arch::Armv7, "s", &spec(vec![good])).unwrap());
    }

    #[test]
    fn fragments_and_mismatches() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.config");
        let b = d.path().join("b.config");
        std::fs::write(&a, "# why\nCONFIG_NET=y\nCONFIG_FOO=y\nCONFIG_LOCALVERSION=\"-k\"\n").unwrap();
        std::fs::write(&b, "# CONFIG_FOO is not set\nCONFIG_BAR=m\n").unwrap();
        let r = parse_fragments(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(r["FOO"].value, None);
        assert_eq!(r["FOO"].file, b);
        let fin = "CONFIG_NET=y\nCONFIG_LOCALVERSION=\"-k\"\n# CONFIG_BAR is not set\n";
        let bad = mismatches(&r, fin);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].0.option, "BAR");
        let e = dropped_error(&bad, d.path()).to_string();
        assert!(e.contains("CONFIG_BAR=m") && e.contains("b.config:2"), "{e}");
    }

    #[test]
    fn bad_line_is_named() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.config");
        std::fs::write(&a, "CONFIG_NET=y\nNET=y\n").unwrap();
        let e = parse_fragments(&[a]).unwrap_err().to_string();
        assert!(e.contains("a.config:2"), "{e}");
    }
}
