//! `[[rootfs.files]]`: single files put into the root at a path, each a
//! pinned input (`file`, `url`, or a `deb` with its `member`). For what has
//! no Debian package: a static tool, a CA bundle, a site's certificate.
//!
//! ```toml
//! [[rootfs.files]]
//! path = "/usr/local/bin/tool"
//! file = "bin/tool"            # relative to the profile that sets it
//! sha256 = "…"
//! mode = "0755"                # default 0644
//! ```

use crate::inputs::cache::Cache;
use crate::inputs::input::{self, Input, InputError, Resolved};
use kiln_formats::tree::Tree;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// One entry as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootFileFile {
    pub path: Option<String>,
    /// Octal, as a string (`"0755"`).
    pub mode: Option<String>,
    pub file: Option<PathBuf>,
    pub url: Option<String>,
    pub deb: Option<String>,
    pub version: Option<String>,
    pub arch: Option<String>,
    pub sha256: Option<String>,
    pub member: Option<String>,
}

impl RootFileFile {
    /// Makes a relative `file` relative to the profile's directory.
    pub fn anchor(&mut self, dir: &Path) {
        if let Some(f) = self.file.as_mut().filter(|f| f.is_relative()) {
            *f = dir.join(&*f);
        }
    }
}

/// A checked entry.
#[derive(Debug, Clone, PartialEq)]
pub struct RootFile {
    /// `rootfs.files[i]`, for errors.
    pub key: String,
    pub path: String,
    pub mode: u32,
    pub input: Input,
}

/// A problem with an entry: the key and what is wrong.
#[derive(Debug)]
pub struct KeyError {
    pub key: String,
    pub message: String,
}

/// Where a file would be hidden by what the node mounts there, or would
/// fight kiln-init.
const NOT_UNDER: &[&str] = &["/dev", "/proc", "/sys", "/run", "/tmp", "/var", "/sysroot"];

pub fn spec(entries: &[RootFileFile]) -> Result<Vec<RootFile>, KeyError> {
    let mut out: Vec<RootFile> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let key = format!("rootfs.files[{i}]");
        let err = |field: &str, message: String| KeyError { key: format!("{key}.{field}"), message };
        let path = e.path.clone().ok_or_else(|| err("path", "missing: where the file goes in the root, e.g. \"/usr/local/bin/tool\"".into()))?;
        if !path.starts_with('/') || path.ends_with('/') || path.split('/').skip(1).any(|c| c.is_empty() || c == "." || c == "..") || path.contains('\0') {
            return Err(err("path", format!("`{path}` is not an absolute path to a file (no `.`, `..`, `//` or trailing `/`)")));
        }
        if let Some(m) = NOT_UNDER.iter().find(|m| path == **m || path.starts_with(&format!("{m}/"))) {
            return Err(err("path", format!("`{path}` is under {m}, which the node mounts over or fills at boot; put it under /usr or /etc (a file for /var belongs in an appliance payload or the node's own state)")));
        }
        if let Some(o) = out.iter().find(|o| o.path == path) {
            return Err(err("path", format!("`{path}` is also given by {}", o.key)));
        }
        let mode = match e.mode.as_deref() {
            None => 0o644,
            Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8).ok().filter(|v| *v <= 0o7777).ok_or_else(|| err("mode", format!("`{m}` is not an octal mode like \"0755\"")))?,
        };
        let input = Input { file: e.file.clone(), url: e.url.clone(), deb: e.deb.clone(), version: e.version.clone(), arch: e.arch.clone(), sha256: e.sha256.clone(), member: e.member.clone() };
        if input.deb.is_some() && input.member.is_none() {
            return Err(err("member", "a `deb` needs the `member`: the file inside the package to use".into()));
        }
        input.validate().map_err(|m| KeyError { key: key.clone(), message: m })?;
        out.push(RootFile { key, path, mode, input });
    }
    Ok(out)
}

/// The entries fetched (and checked against their pins).
pub fn resolve(files: &[RootFile], deb_arch: &str, cache: &Cache) -> Result<Vec<(RootFile, Resolved)>, InputError> {
    files.iter().map(|f| Ok((f.clone(), input::resolve(&f.key, &f.input, deb_arch, cache)?))).collect()
}

/// Puts them into the root; a path kiln already fills is an error naming
/// both.
pub fn add_to(t: &mut Tree, files: &[(RootFile, Resolved)]) -> anyhow::Result<()> {
    for (f, r) in files {
        if t.get(&f.path).is_some() {
            anyhow::bail!("{}: `{}` is already in the root (kiln, the payload or an appliance file puts it there); choose another path", f.key, f.path);
        }
        t.host_file(&f.path, r.path.clone(), f.mode).map_err(|e| anyhow::anyhow!("{}: {e}", f.key))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str) -> RootFileFile {
        RootFileFile { path: Some(path.into()), file: Some("/x".into()), sha256: Some("0".repeat(64)), ..Default::default() }
    }

    #[test]
    fn paths_modes_and_inputs_are_checked() {
        let ok = spec(&[RootFileFile { mode: Some("0755".into()), ..entry("/usr/local/bin/tool") }, entry("/etc/ssl/site.pem")]).unwrap();
        assert_eq!((ok[0].mode, ok[1].mode, ok[1].key.as_str()), (0o755, 0o644, "rootfs.files[1]"));
        let e = |es: &[RootFileFile]| spec(es).unwrap_err();
        let bad = e(&[entry("usr/bin/x")]);
        assert_eq!(bad.key, "rootfs.files[0].path");
        for p in ["/usr/../etc/x", "/usr//x", "/usr/bin/"] {
            assert!(e(&[entry(p)]).message.contains("not an absolute path"), "{p}");
        }
        assert!(e(&[entry("/var/lib/x")]).message.contains("under /var"));
        assert!(e(&[entry("/etc/a"), entry("/etc/a")]).message.contains("rootfs.files[0]"));
        assert_eq!(e(&[RootFileFile { mode: Some("rwx".into()), ..entry("/etc/a") }]).key, "rootfs.files[0].mode");
        assert_eq!(e(&[RootFileFile { path: None, ..entry("/etc/a") }]).key, "rootfs.files[0].path");
        assert_eq!(e(&[RootFileFile { file: None, deb: Some("ca-certificates".into()), ..entry("/etc/a") }]).key, "rootfs.files[0].member");
    }

    #[test]
    fn a_file_kiln_puts_there_is_not_replaced() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, "x").unwrap();
        let f = spec(&[entry("/usr/bin/k0s")]).unwrap().remove(0);
        let r = Resolved { name: f.key.clone(), kind: "file", source: p.display().to_string(), version: None, sha256: String::new(), size: 1, deb: None, path: p };
        let mut t = Tree::new();
        t.file("/usr/bin/k0s", "payload", 0o755).unwrap();
        let e = add_to(&mut t, &[(f.clone(), r.clone())]).unwrap_err().to_string();
        assert!(e.contains("rootfs.files[0]") && e.contains("already in the root"), "{e}");
        let mut t = Tree::new();
        add_to(&mut t, &[(f, r)]).unwrap();
        assert!(t.get("/usr/bin/k0s").is_some());
    }
}
