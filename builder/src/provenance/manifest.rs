//! `manifest.json`: every artifact and every input, with sha256.
//!
//! No timestamps and sorted keys, so the same inputs give the same manifest.

use crate::inputs::input::{self, Resolved};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Serialize)]
pub struct Manifest {
    pub kiln_version: String,
    pub profile: String,
    pub arch: String,
    pub kernel: KernelInfo,
    pub payload: PayloadInfo,
    pub cmdline: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskInfo>,
    /// The armv7 board overlay the card is for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub board: Option<String>,
    /// The machine `kiln run` boots the output on, from the profile's `[qemu]`.
    pub qemu: QemuInfo,
    pub inputs: Vec<Resolved>,
    pub artifacts: Vec<Artifact>,
}

#[derive(Debug, Serialize)]
pub struct KernelInfo {
    pub release: String,
    pub config_sha256: String,
    pub cache_key: String,
    /// A distro kernel: its package, and every module and firmware file
    /// shipped (`stage1`: also in the initramfs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distro: Option<crate::inputs::kernel::DistroKernel>,
}

#[derive(Debug, Serialize)]
pub struct DiskInfo {
    pub roothash: String,
    /// The kernel command line inside the UKI.
    pub cmdline: String,
    pub uki: String,
    pub squashfs_bytes: u64,
    /// Each root slot's size on a disk or card built from this (with
    /// `disk.root_slot_mib = "auto"`, what it came to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_slot_mib: Option<u64>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct QemuInfo {
    pub machine: String,
    pub memory_mib: u32,
    pub cpus: u32,
}

#[derive(Debug, Serialize)]
pub struct PayloadInfo {
    pub description: String,
    pub version: String,
    pub sha256: String,
}

#[derive(Debug, Serialize)]
pub struct Artifact {
    pub path: String,
    pub sha256: String,
    pub size: u64,
}

/// Every regular file under `dir`, as (path relative to it, full path),
/// sorted by path; without the manifest and its signature.
pub fn files(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap_or(&p).to_string_lossy().to_string();
                if rel == "manifest.json" || rel == "manifest.json.minisig" {
                    continue;
                }
                out.push((rel, p));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Hashes every regular file under `dir` (paths relative to it, sorted),
/// skipping the manifest itself.
pub fn artifacts(dir: &Path) -> std::io::Result<Vec<Artifact>> {
    artifacts_known(dir, &std::collections::HashMap::new())
}

/// [`artifacts`], taking the sha256 of the files in `known` (by path) from
/// there: the SBOM has just hashed them, and an image's files are large.
pub fn artifacts_known(dir: &Path, known: &std::collections::HashMap<String, String>) -> std::io::Result<Vec<Artifact>> {
    files(dir)?
        .into_iter()
        .map(|(path, p)| {
            let (sha256, size) = match known.get(&path) {
                Some(h) => (h.clone(), std::fs::metadata(&p)?.len()),
                None => input::sha256_file(&p)?,
            };
            Ok(Artifact { path, sha256, size })
        })
        .collect()
}

impl Manifest {
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let mut s = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        s.push('\n');
        std::fs::write(dir.join("manifest.json"), s)
    }
}
