//! kiln-init (and other node binaries from this workspace), cross-built as
//! static executables for the target.

use kiln_formats::elf;
use crate::arch::Arch;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    #[error("{bin}: the kiln source tree was not found at {tree} (no Cargo.toml with init/). Run kiln from a kiln checkout, or set KILN_SOURCE_DIR to one")]
    NoTree { bin: String, tree: PathBuf },
    #[error("{bin}: `cargo build` for {target} failed (exit {code}). If the target is missing: `rustup target add {target}`{extra}")]
    Cargo { bin: String, target: String, code: String, extra: String },
    #[error("{bin}: {path}: {reason}")]
    Check { bin: String, path: PathBuf, reason: String },
    #[error("{bin}: {0}", bin = .1)]
    Io(#[source] std::io::Error, String),
}

/// Builds one binary of a workspace package for the target with the `node`
/// profile, and checks that it is a static executable for that arch.
pub fn cargo_build(tree: &Path, package: &str, bin: &str, arch: Arch) -> Result<PathBuf, BinaryError> {
    // Prebuilt node binaries (KILN_NODE_BINARIES/<rust target>/<bin>) let a
    // machine without a Rust toolchain build images.
    if let Some(dir) = std::env::var_os("KILN_NODE_BINARIES") {
        let p = PathBuf::from(dir).join(arch.rust_target()).join(bin);
        if !p.is_file() {
            return Err(BinaryError::Check { bin: bin.into(), path: p, reason: "KILN_NODE_BINARIES is set but this binary is not there".into() });
        }
        check_static(bin, &p, arch)?;
        return Ok(p);
    }
    if !tree.join("Cargo.toml").is_file() || !tree.join("init").is_dir() {
        return Err(BinaryError::NoTree { bin: bin.into(), tree: tree.to_path_buf() });
    }
    let target = arch.rust_target();
    // Paths are remapped so the binary does not depend on where the tree or
    // cargo's registry is (panic messages carry source paths): the real
    // paths, which are what rustc sees.
    let real = |p: PathBuf| p.canonicalize().unwrap_or(p);
    let tree = &real(tree.to_path_buf());
    let target_dir = tree.join("target").join("kiln-node");
    let home = std::env::var_os("CARGO_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo"))).map(real);
    let mut flags = vec![
        "-C".to_string(),
        "target-feature=+crt-static".to_string(),
        format!("--remap-path-prefix={}=/kiln", tree.display()),
    ];
    if let Some(home) = home {
        flags.push(format!("--remap-path-prefix={}=/cargo", home.display()));
    }
    let linker_var = format!("CARGO_TARGET_{}_LINKER", target.to_uppercase().replace('-', "_"));
    let linker = match arch {
        Arch::Amd64 | Arch::Arm64 => "rust-lld",
        Arch::Armv7 => "arm-linux-gnueabihf-gcc",
    };
    // ring (TLS in kiln-init) compiles C and assembly: with the same cross
    // gcc the kernel uses (its target libc headers: libc6-dev-<arch>-cross).
    let cc_var = format!("CC_{}", target.replace('-', "_"));
    let cc = format!("{}gcc", arch.cross_compile());
    tracing::info!("building {bin} for {target}");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(tree)
        .args(["build", "--locked", "--profile", "node", "--target", target, "-p", package, "--bin", bin])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"))
        .env_remove("RUSTFLAGS")
        .env(linker_var, linker)
        .env(cc_var, cc)
        .status()
        .map_err(|e| BinaryError::Io(e, bin.into()))?;
    if !status.success() {
        let extra = match arch {
            Arch::Amd64 => String::new(),
            _ => format!("; {0}gcc compiles ring's C code and needs the target's libc headers (apt-get install gcc-{1} libc6-dev-{2}-cross){3}", arch.cross_compile(), arch.cross_compile().trim_end_matches('-'), arch.debian(), if arch == Arch::Armv7 { ", and links armv7" } else { "" }),
        };
        return Err(BinaryError::Cargo { bin: bin.into(), target: target.into(), code: status.code().map_or("signal".into(), |c| c.to_string()), extra });
    }
    let out = target_dir.join(target).join("node").join(bin);
    check_static(bin, &out, arch)?;
    Ok(out)
}

/// A binary for the image must be an ELF for the target with no dynamic
/// loader: the root has no libc to load.
pub fn check_static(what: &str, path: &Path, arch: Arch) -> Result<(), BinaryError> {
    let bytes = std::fs::read(path).map_err(|e| BinaryError::Io(e, format!("{what}: {}", path.display())))?;
    let info = elf::inspect(&bytes).ok_or_else(|| BinaryError::Check { bin: what.into(), path: path.into(), reason: "not an ELF executable".into() })?;
    if info.machine != arch.elf_machine() {
        return Err(BinaryError::Check {
            bin: what.into(),
            path: path.into(),
            reason: format!("built for {}, but the profile's arch is {arch}", elf::machine_name(info.machine)),
        });
    }
    if let Some(i) = info.interp {
        return Err(BinaryError::Check { bin: what.into(), path: path.into(), reason: format!("dynamically linked (needs {i}); the image needs a static binary") });
    }
    Ok(())
}

/// The workspace package kiln-init is built from.
pub const PACKAGE: &str = "kiln-init";

/// kiln-init for the target.
pub fn build(tree: &Path, arch: Arch) -> Result<PathBuf, BinaryError> {
    cargo_build(tree, PACKAGE, "kiln-init", arch)
}
