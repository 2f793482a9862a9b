//! `manifest.json`: every artifact and every input, with sha256.
//!
//! No timestamps and sorted keys, so the same inputs give the same manifest.

use crate::input::{self, Resolved};
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
    pub inputs: Vec<Resolved>,
    pub artifacts: Vec<Artifact>,
}

#[derive(Debug, Serialize)]
pub struct KernelInfo {
    pub release: String,
    pub config_sha256: String,
    pub cache_key: String,
}

#[derive(Debug, Serialize)]
pub struct DiskInfo {
    pub roothash: String,
    /// The kernel command line inside the UKI.
    pub cmdline: String,
    pub uki: String,
    pub squashfs_bytes: u64,
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
    files(dir)?
        .into_iter()
        .map(|(path, p)| {
            let (sha256, size) = input::sha256_file(&p)?;
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

/// Checks a build output: the manifest's signature with `key`, then every
/// artifact's size and sha256, and that nothing was added. Every problem is
/// named with its file.
pub fn verify_dir(dir: &Path, key: &crate::sign::PublicKey) -> Result<Vec<String>, Vec<String>> {
    let mut problems = Vec::new();
    let mut ok = Vec::new();
    let manifest = match std::fs::read(dir.join("manifest.json")) {
        Ok(b) => b,
        Err(e) => return Err(vec![format!("{}: {e}", dir.join("manifest.json").display())]),
    };
    match std::fs::read_to_string(dir.join("manifest.json.minisig")) {
        Ok(sig) => match key.verify(&manifest, &sig) {
            Ok(comment) => ok.push(format!("manifest.json: signature ok ({comment})")),
            Err(e) => problems.push(format!("manifest.json.minisig: does not verify manifest.json: {e}")),
        },
        Err(e) => problems.push(format!("manifest.json.minisig: {e} (was the build signed? give it a key: `sign.key` or `sign.key_command` in the profile, or KILN_SIGNING_KEY)")),
    }
    let parsed: serde_json::Value = match serde_json::from_slice(&manifest) {
        Ok(v) => v,
        Err(e) => {
            problems.push(format!("manifest.json: not valid JSON: {e}"));
            return Err(problems);
        }
    };
    let listed: Vec<(String, String, u64)> = parsed["artifacts"]
        .as_array()
        .map(|a| a.iter().map(|x| (x["path"].as_str().unwrap_or("").to_string(), x["sha256"].as_str().unwrap_or("").to_string(), x["size"].as_u64().unwrap_or(0))).collect())
        .unwrap_or_default();
    for (path, sha, size) in &listed {
        if Path::new(path).components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
            problems.push(format!("manifest.json: artifact path `{path}` is not a plain path inside the output directory"));
            continue;
        }
        match input::sha256_file(&dir.join(path)) {
            Ok((got, n)) if &got == sha && n == *size => ok.push(format!("{path}: ok")),
            Ok((got, n)) => problems.push(format!("{path}: sha256 {got} ({n} bytes) does not match the manifest's {sha} ({size} bytes)")),
            Err(e) => problems.push(format!("{path}: {e}")),
        }
    }
    match artifacts(dir) {
        Ok(found) => {
            for a in found {
                if !listed.iter().any(|(p, _, _)| *p == a.path) {
                    problems.push(format!("{}: not in the manifest", a.path));
                }
            }
        }
        Err(e) => problems.push(format!("{}: {e}", dir.display())),
    }
    crate::sbom::verify(dir, key, &listed, &mut ok, &mut problems);
    if problems.is_empty() {
        Ok(ok)
    } else {
        Err(problems)
    }
}
