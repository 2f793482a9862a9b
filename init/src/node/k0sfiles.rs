//! Files a controller's config hands to k0s before it starts: the cluster CA
//! (`[k0s.ca]`) in /var/lib/k0s/pki and manifests (`[[k0s.manifests]]`) in
//! /var/lib/k0s/manifests/<stack>/. Together they let one `kiln cluster init`
//! describe both sides of a new cluster (K0S-CONTRACT.md, "Tokens").
//!
//! The CA is written only where there is none yet or the same one: replacing
//! a cluster's CA would cut every node off, so a different one is refused.
//! Manifests follow the config: written when absent or changed.

use super::console;
use kiln_contract::config::K0s;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What was done, for the `k0s-files` event.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// `written`, `unchanged` or `none`.
    pub ca: &'static str,
    pub manifests_written: usize,
    pub manifests_unchanged: usize,
}

struct File {
    path: PathBuf,
    content: String,
    mode: u32,
}

fn with_newline(s: &str) -> String {
    let mut s = s.trim_end().to_string();
    s.push('\n');
    s
}

fn pki_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("pki")
}

/// Writes the CA and manifests under `data_dir` (/var/lib/k0s on the node).
/// Everything is checked before anything is written, so a refusal leaves
/// the disk as it was.
pub fn write(k: &K0s, data_dir: &Path) -> Result<Outcome, String> {
    let mut out = Outcome { ca: "none", ..Outcome::default() };
    let mut todo: Vec<File> = Vec::new();
    if let Some(ca) = &k.ca {
        let pki = pki_dir(data_dir);
        let mut unchanged = 0;
        for (name, key, content, mode) in [("ca.crt", "k0s.ca.cert", &ca.cert, 0o644), ("ca.key", "k0s.ca.key", &ca.key, 0o600)] {
            let path = pki.join(name);
            let want = with_newline(content);
            match std::fs::read_to_string(&path) {
                Ok(have) if have.trim_end() == want.trim_end() => unchanged += 1,
                Ok(_) => {
                    return Err(format!(
                        "{} exists and is not the CA in `{key}`: this node already belongs to a cluster with another CA. \
                         Replacing it would cut the cluster off; to start this node afresh, remove {} (or wipe /var) and reboot, \
                         or boot it with the node config it was created with",
                        path.display(),
                        data_dir.display()
                    ))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => todo.push(File { path, content: want, mode }),
                Err(e) => return Err(format!("reading {}: {e}", path.display())),
            }
        }
        out.ca = if unchanged == 2 { "unchanged" } else { "written" };
    }
    for m in &k.manifests {
        let path = data_dir.join("manifests").join(&m.stack).join(&m.name);
        let want = with_newline(&m.content);
        match std::fs::read_to_string(&path) {
            Ok(have) if have == want => out.manifests_unchanged += 1,
            Ok(_) => todo.push(File { path, content: want, mode: 0o600 }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => todo.push(File { path, content: want, mode: 0o600 }),
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        }
    }
    out.manifests_written = todo.iter().filter(|f| !f.path.starts_with(pki_dir(data_dir))).count();
    for f in &todo {
        let dir = f.path.parent().unwrap_or(data_dir);
        // k0s's own modes: pki/ is 0751, manifests/ and its stacks 0755.
        let dir_mode = if dir == pki_dir(data_dir) { 0o751 } else { 0o755 };
        std::fs::DirBuilder::new().recursive(true).mode(dir_mode).create(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        write_atomic(&f.path, f.content.as_bytes(), f.mode).map_err(|e| format!("writing {}: {e}", f.path.display()))?;
    }
    Ok(out)
}

/// Writes to a temporary file beside `path`, syncs it, then renames it over:
/// whole or not at all, with `mode` from the start. A failed write leaves no
/// temporary file behind.
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.kiln-tmp"));
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        f.write_all(data)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// On the node: writes the files and announces them. An error is for
/// maintenance.
pub fn apply(k: &K0s) -> Result<(), String> {
    if k.ca.is_none() && k.manifests.is_empty() {
        return Ok(());
    }
    let o = write(k, Path::new(crate::k0s::DATA_DIR))?;
    console::event("k0s-files", &[("ca", &o.ca), ("manifests", &o.manifests_written), ("manifests_unchanged", &o.manifests_unchanged)]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_contract::config::{ClusterCa, Manifest};
    use std::os::unix::fs::MetadataExt;

    fn cfg() -> K0s {
        K0s {
            ca: Some(ClusterCa { cert: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----".into(), key: "KEY\n".into() }),
            manifests: vec![Manifest { stack: "kiln-cluster".into(), name: "bootstrap-token-abcdef.yaml".into(), content: "kind: Secret".into() }],
            ..K0s::default()
        }
    }

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-k0sfiles-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn writes_then_leaves_alone() {
        let d = tmp();
        let o = write(&cfg(), &d).unwrap();
        assert_eq!(o, Outcome { ca: "written", manifests_written: 1, manifests_unchanged: 0 });
        assert_eq!(std::fs::read_to_string(d.join("pki/ca.key")).unwrap(), "KEY\n");
        assert_eq!(mode(&d.join("pki/ca.key")), 0o600);
        assert_eq!(mode(&d.join("pki/ca.crt")), 0o644);
        assert_eq!(mode(&d.join("pki")), 0o751);
        let m = d.join("manifests/kiln-cluster/bootstrap-token-abcdef.yaml");
        assert_eq!(std::fs::read_to_string(&m).unwrap(), "kind: Secret\n");
        assert_eq!(mode(&m), 0o600);
        let o = write(&cfg(), &d).unwrap();
        assert_eq!(o, Outcome { ca: "unchanged", manifests_written: 0, manifests_unchanged: 1 });
        // A changed manifest follows the config.
        let mut c = cfg();
        c.manifests[0].content = "kind: Secret\ntype: x\n".into();
        assert_eq!(write(&c, &d).unwrap().manifests_written, 1);
        assert!(std::fs::read_to_string(&m).unwrap().ends_with("type: x\n"));
        assert!(!std::fs::read_dir(m.parent().unwrap()).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().contains("kiln-tmp")));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn another_ca_is_refused_and_nothing_written() {
        let d = tmp();
        std::fs::create_dir_all(d.join("pki")).unwrap();
        std::fs::write(d.join("pki/ca.crt"), "other").unwrap();
        let e = write(&cfg(), &d).unwrap_err();
        assert!(e.contains("pki/ca.crt exists") && e.contains("k0s.ca.cert"), "{e}");
        assert!(!d.join("pki/ca.key").exists(), "no half-written CA");
        assert!(!d.join("manifests").exists(), "nothing written after a refusal");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_missing_key_beside_the_same_cert_is_completed() {
        let d = tmp();
        std::fs::create_dir_all(d.join("pki")).unwrap();
        std::fs::write(d.join("pki/ca.crt"), "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        let o = write(&cfg(), &d).unwrap();
        assert_eq!(o.ca, "written");
        assert_eq!(std::fs::read_to_string(d.join("pki/ca.key")).unwrap(), "KEY\n");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn nothing_asked_nothing_done() {
        let d = tmp();
        assert_eq!(write(&K0s::default(), &d).unwrap(), Outcome { ca: "none", manifests_written: 0, manifests_unchanged: 0 });
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
