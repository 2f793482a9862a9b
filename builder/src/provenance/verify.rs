//! `kiln verify DIR`: checks a build output against its signed manifest
//! (every artifact's size and sha256, nothing added) and its SBOM.

use crate::provenance::{manifest, sbom};
use std::path::Path;

/// Checks a build output: the manifest's signature with `key`, then every
/// artifact's size and sha256, and that nothing was added. Every problem is
/// named with its file.
pub fn verify_dir(dir: &Path, key: &crate::provenance::sign::PublicKey) -> Result<Vec<String>, Vec<String>> {
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
        match crate::inputs::input::sha256_file(&dir.join(path)) {
            Ok((got, n)) if &got == sha && n == *size => ok.push(format!("{path}: ok")),
            Ok((got, n)) => problems.push(format!("{path}: sha256 {got} ({n} bytes) does not match the manifest's {sha} ({size} bytes)")),
            Err(e) => problems.push(format!("{path}: {e}")),
        }
    }
    match manifest::artifacts(dir) {
        Ok(found) => {
            for a in found {
                if !listed.iter().any(|(p, _, _)| *p == a.path) {
                    problems.push(format!("{}: not in the manifest", a.path));
                }
            }
        }
        Err(e) => problems.push(format!("{}: {e}", dir.display())),
    }
    sbom::verify(dir, key, &listed, &mut ok, &mut problems);
    if problems.is_empty() {
        Ok(ok)
    } else {
        Err(problems)
    }
}
