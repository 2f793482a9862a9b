//! Debian packages in the root (`[[rootfs.packages]]`): each pinned .deb's
//! data.tar is unpacked into the rootfs tree, and then every executable and
//! shared library in the tree is checked: its program interpreter and each
//! `DT_NEEDED` library must be in the image, found the way glibc's ld.so
//! finds them on the node.
//!
//! The image is not merged-/usr: kiln's own /bin, /sbin and /lib are real
//! directories, so a package's `lib/x` goes to /lib/x and its `usr/lib/x` to
//! /usr/lib/x, as in the .deb. The loader searches both (see `search_dirs`).

use crate::inputs::appliance::KeyError;
use crate::inputs::cache::Cache;
use kiln_formats::elf;
use crate::inputs::input::{self, Input, InputError, Resolved};
use crate::arch::Arch;
use kiln_formats::tree::{Content, Kind, Tree, TreeError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// What is left out of a package unless its `exclude` says otherwise.
pub const DEFAULT_EXCLUDE: &[&str] = &["usr/share/doc/**", "usr/share/man/**", "usr/share/lintian/**", "usr/share/locale/**"];

/// One `[[rootfs.packages]]` entry, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageFile {
    pub deb: String,
    pub version: String,
    /// sha256 of the .deb.
    pub sha256: String,
    /// Debian architecture; defaults to the target's (`all` for data).
    pub arch: Option<String>,
    /// Globs of paths in the package to leave out (`**` spans directories).
    /// Replaces DEFAULT_EXCLUDE.
    pub exclude: Option<Vec<String>>,
    /// A local .deb (a vendor's own), relative to the profile that sets it,
    /// instead of `apt-get download`.
    pub file: Option<PathBuf>,
}

impl PackageFile {
    /// Makes a relative `file` relative to `dir`, the directory of the
    /// profile that wrote it.
    pub fn anchor(&mut self, dir: &Path) {
        if let Some(f) = self.file.as_mut().filter(|f| f.is_relative()) {
            *f = dir.join(&*f);
        }
    }
}

/// A checked entry.
#[derive(Debug, Clone, PartialEq)]
pub struct PackageSpec {
    /// `rootfs.packages[i]`, for errors.
    pub key: String,
    pub input: Input,
    pub exclude: Vec<String>,
    /// A local .deb instead of apt.
    pub file: Option<PathBuf>,
}

/// A fetched package.
#[derive(Debug, Clone)]
pub struct Package {
    pub key: String,
    pub resolved: Resolved,
    pub exclude: Vec<String>,
}

impl Package {
    pub fn name(&self) -> &str {
        self.resolved.deb.as_ref().map(|d| d.package.as_str()).unwrap_or(&self.resolved.name)
    }
}

/// Who put each non-directory path in the tree, by package name. Paths not
/// in here are kiln's own.
pub type Owners = BTreeMap<String, String>;

#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error("{key} ({package}): {reason}")]
    Unpack { key: String, package: String, reason: String },
    #[error("{key} ({package}): /{path} is also put there by {other}; leave it out with `exclude = [\"{path}\"]`, or drop one of the two")]
    Collision { key: String, package: String, path: String, other: String },
    #[error("{key} ({package}): {source}")]
    Tree { key: String, package: String, source: TreeError },
    #[error("rootfs: reading {path} for the ELF check: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{}", .0.join("\n"))]
    Elf(Vec<String>),
}

/// Checks the entries of `[[rootfs.packages]]` against the target.
pub fn spec(files: &[PackageFile], arch: Arch) -> Result<Vec<PackageSpec>, KeyError> {
    let mut out: Vec<PackageSpec> = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let key = format!("rootfs.packages[{i}]");
        let err = |leaf: &str, message: String| KeyError { key: format!("{key}.{leaf}"), message };
        if f.deb.is_empty() || f.deb.contains(['/', ':', '=', ' ']) {
            return Err(err("deb", format!("`{}` is not a Debian package name", f.deb)));
        }
        if f.version.is_empty() || f.version.contains([' ', '=', '/']) {
            return Err(err("version", format!("`{}` is not a Debian version (`apt-cache policy {}` lists them)", f.version, f.deb)));
        }
        if let Some(a) = f.arch.as_deref().filter(|a| *a != "all" && *a != arch.debian()) {
            return Err(err("arch", format!("`{a}` packages do not run on this {arch} image: use `{}` or `all`, or leave `arch` out", arch.debian())));
        }
        if let Some(p) = out.iter().find(|p| p.input.deb.as_deref() == Some(f.deb.as_str())) {
            return Err(err("deb", format!("`{}` is already in {}", f.deb, p.key)));
        }
        let exclude = match &f.exclude {
            Some(globs) => globs.iter().map(|g| g.trim_start_matches('/').to_string()).collect(),
            None => DEFAULT_EXCLUDE.iter().map(|g| g.to_string()).collect::<Vec<_>>(),
        };
        if let Some(g) = exclude.iter().find(|g| g.is_empty() || g.split('/').any(|c| c == "..")) {
            return Err(err("exclude", format!("`{g}` is not a path glob inside the package, like `usr/share/doc/**`")));
        }
        let input = Input { deb: Some(f.deb.clone()), version: Some(f.version.clone()), arch: f.arch.clone(), sha256: Some(f.sha256.clone()), ..Default::default() };
        input.validate().map_err(|m| err("sha256", m))?;
        out.push(PackageSpec { key, input, exclude, file: f.file.clone() });
    }
    Ok(out)
}

/// Fetches each package (or finds it in the cache) and checks its pin. A
/// local `file` must be the package, version and arch the entry names.
pub fn resolve(specs: &[PackageSpec], deb_arch: &str, cache: &Cache) -> Result<Vec<Package>, PackageError> {
    specs
        .iter()
        .map(|s| {
            let deb = s.input.deb.clone().unwrap_or_default();
            let name = format!("rootfs.packages.{deb}");
            let resolved = match &s.file {
                None => input::resolve(&name, &s.input, deb_arch, cache)?,
                Some(file) => {
                    let local = Input { file: Some(file.clone()), sha256: s.input.sha256.clone(), ..Default::default() };
                    let mut r = input::resolve(&name, &local, deb_arch, cache)?;
                    r.version = s.input.version.clone();
                    let want = [("Package", deb.as_str()), ("Version", s.input.version.as_deref().unwrap_or_default()), ("Architecture", s.input.arch.as_deref().unwrap_or(deb_arch))];
                    let fail = |reason: String| PackageError::Unpack { key: s.key.clone(), package: deb.clone(), reason };
                    let control = control_fields(&r.path).map_err(|e| fail(format!("{}: {e}", file.display())))?;
                    for (field, value) in want {
                        let got = control.iter().find(|(k, _)| k == field).map(|(_, v)| v.as_str()).unwrap_or("(none)");
                        if got != value {
                            return Err(fail(format!("{} has {field}: {got}, but the profile says {value}; fix the profile or build the .deb again", file.display())));
                        }
                    }
                    r
                }
            };
            Ok(Package { key: s.key.clone(), resolved, exclude: s.exclude.clone() })
        })
        .collect()
}

/// The fields of a .deb's control file (`Package`, `Version`, …).
pub fn control_fields(deb: &Path) -> Result<Vec<(String, String)>, String> {
    let f = std::fs::File::open(deb).map_err(|e| e.to_string())?;
    let mut archive = tar::Archive::new(input::ar_member(f, "control.tar")?);
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        if entry.path_bytes().as_ref() != b"./control" && entry.path_bytes().as_ref() != b"control" {
            continue;
        }
        let mut text = String::new();
        entry.take(1 << 20).read_to_string(&mut text).map_err(|e| format!("control: {e}"))?;
        return Ok(text.lines().filter(|l| !l.starts_with([' ', '\t'])).filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect());
    }
    Err("not a Debian package: no control file".into())
}

/// One thing in a package's data.tar, with its content in the cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum DebEntry {
    Dir { path: String, mode: u32, uid: u32, gid: u32 },
    File { path: String, mode: u32, uid: u32, gid: u32, sha256: String },
    Symlink { path: String, target: String },
}

impl DebEntry {
    /// Relative to the root, without `./`.
    pub fn path(&self) -> &str {
        match self {
            DebEntry::Dir { path, .. } | DebEntry::File { path, .. } | DebEntry::Symlink { path, .. } => path,
        }
    }
}

/// A path inside the package, relative, normalised; an error for one that
/// would land outside the root.
fn inside(raw: &str) -> Result<String, String> {
    let p = raw.trim_start_matches("./").trim_end_matches('/');
    if raw.starts_with('/') || p.split('/').any(|c| c == "..") {
        return Err(format!("`{raw}` points outside the root; this is not a package kiln can unpack"));
    }
    Ok(p.split('/').filter(|c| !c.is_empty() && *c != ".").collect::<Vec<_>>().join("/"))
}

/// Lists a package's data.tar, storing each file in the cache. Memoised by
/// the .deb's hash, so a warm cache does not unpack again.
pub fn unpack(pkg: &Package, cache: &Cache) -> Result<Vec<DebEntry>, PackageError> {
    let fail = |reason: String| PackageError::Unpack { key: pkg.key.clone(), package: pkg.name().to_string(), reason };
    let index = cache.index_path("deb-tree", &pkg.resolved.sha256);
    if let Some(list) = std::fs::read_to_string(&index).ok().and_then(|s| serde_json::from_str::<Vec<DebEntry>>(&s).ok()) {
        if list.iter().all(|e| !matches!(e, DebEntry::File { sha256, .. } if !cache.blob(sha256).exists())) {
            return Ok(list);
        }
    }
    let f = std::fs::File::open(&pkg.resolved.path).map_err(|e| fail(format!("{}: {e}", pkg.resolved.path.display())))?;
    let data = input::ar_member(f, "data.tar").map_err(fail)?;
    let mut archive = tar::Archive::new(data);
    let mut list = Vec::new();
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    for entry in archive.entries().map_err(|e| fail(e.to_string()))? {
        let mut entry = entry.map_err(|e| fail(format!("reading data.tar: {e}")))?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let path = inside(&raw).map_err(fail)?;
        let h = entry.header();
        let (mode, uid, gid) = (h.mode().unwrap_or(0o644) & 0o7777, h.uid().unwrap_or(0) as u32, h.gid().unwrap_or(0) as u32);
        let ty = h.entry_type();
        let link = || entry.link_name_bytes().map(|l| String::from_utf8_lossy(&l).into_owned()).ok_or_else(|| fail(format!("link `{raw}` has no target")));
        if ty.is_dir() {
            if !path.is_empty() {
                list.push(DebEntry::Dir { path, mode, uid, gid });
            }
        } else if ty.is_symlink() {
            let target = link()?;
            list.push(DebEntry::Symlink { path, target });
        } else if ty.is_hard_link() {
            // A copy of the file it links to, which came earlier.
            let to = inside(&link()?).map_err(fail)?;
            let sha256 = files.get(&to).cloned().ok_or_else(|| fail(format!("hard link `{raw}` points at `{to}`, which is not a file earlier in the package")))?;
            files.insert(path.clone(), sha256.clone());
            list.push(DebEntry::File { path, mode, uid, gid, sha256 });
        } else if ty.is_file() || ty == tar::EntryType::Continuous {
            let (sha256, _) = input::store(cache, &mut entry).map_err(|e| fail(format!("storing `{raw}` in the cache: {e}")))?;
            files.insert(path.clone(), sha256.clone());
            list.push(DebEntry::File { path, mode, uid, gid, sha256 });
        } else if ty.is_character_special() || ty.is_block_special() || ty.is_fifo() {
            return Err(fail(format!("`{raw}` is a device node or FIFO; an image's /dev is made at boot, so kiln does not take these from packages")));
        } else if !(ty.is_pax_global_extensions() || ty.is_pax_local_extensions() || ty.is_gnu_longname() || ty.is_gnu_longlink()) {
            return Err(fail(format!("`{raw}` has tar entry type {:?}, which kiln does not unpack", ty.as_byte() as char)));
        }
    }
    let json = serde_json::to_string(&list).map_err(|e| fail(e.to_string()))?;
    cache.write_index(&index, &json).map_err(|e| fail(format!("writing the cache index: {e}")))?;
    Ok(list)
}

/// Does the glob match the path (both relative)? `*` and `?` stay within a
/// component; `**` spans any number of them, none included.
pub fn glob_match(glob: &str, path: &str) -> bool {
    fn comps(g: &[&str], p: &[&str]) -> bool {
        match g.split_first() {
            None => p.is_empty(),
            Some((&"**", rest)) => (0..=p.len()).any(|i| comps(rest, &p[i..])),
            Some((c, rest)) => p.split_first().is_some_and(|(pc, prest)| one(c.as_bytes(), pc.as_bytes()) && comps(rest, prest)),
        }
    }
    fn one(g: &[u8], s: &[u8]) -> bool {
        match g.split_first() {
            None => s.is_empty(),
            Some((b'*', rest)) => (0..=s.len()).any(|i| one(rest, &s[i..])),
            Some((b'?', rest)) => !s.is_empty() && one(rest, &s[1..]),
            Some((c, rest)) => s.first() == Some(c) && one(rest, &s[1..]),
        }
    }
    let g: Vec<&str> = glob.split('/').filter(|c| !c.is_empty()).collect();
    let p: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    comps(&g, &p)
}

/// Unpacks the packages into the tree, after kiln's own entries. A file
/// over one of kiln's, or over another package's, is an error naming both.
pub fn add_to(tree: &mut Tree, pkgs: &[Package], cache: &Cache) -> Result<Owners, PackageError> {
    let mut owners = Owners::new();
    for pkg in pkgs {
        let name = pkg.name().to_string();
        let tree_err = |source: TreeError| PackageError::Tree { key: pkg.key.clone(), package: name.clone(), source };
        for e in unpack(pkg, cache)? {
            let rel = e.path();
            if pkg.exclude.iter().any(|g| glob_match(g, rel)) {
                continue;
            }
            let abs = format!("/{rel}");
            match (tree.get(&abs).map(|x| &x.kind), &e) {
                (None, _) | (Some(Kind::Dir), DebEntry::Dir { .. }) => {}
                (Some(_), _) => {
                    let other = owners.get(&abs).map(|o| format!("package {o}")).unwrap_or_else(|| "kiln itself (kiln-init, busybox and its applets, /etc defaults, the payload)".into());
                    return Err(PackageError::Collision { key: pkg.key.clone(), package: name, path: rel.to_string(), other });
                }
            }
            match e {
                DebEntry::Dir { mode, uid, gid, .. } => {
                    if tree.get(&abs).is_none() {
                        tree.mkdir_p(&abs, mode).map_err(tree_err)?;
                        tree.chown(&abs, uid, gid).map_err(tree_err)?;
                    }
                }
                DebEntry::File { mode, uid, gid, sha256, .. } => {
                    tree.host_file(&abs, cache.blob(&sha256), mode).map_err(tree_err)?;
                    tree.chown(&abs, uid, gid).map_err(tree_err)?;
                    owners.insert(abs, name.clone());
                }
                DebEntry::Symlink { target, .. } => {
                    tree.symlink(&abs, &target).map_err(tree_err)?;
                    owners.insert(abs, name.clone());
                }
            }
        }
    }
    Ok(owners)
}

/// The Debian multiarch triplet of the target.
pub fn triplet(arch: Arch) -> &'static str {
    match arch {
        Arch::Amd64 => "x86_64-linux-gnu",
        Arch::Arm64 => "aarch64-linux-gnu",
        Arch::Armv7 => "arm-linux-gnueabihf",
    }
}

/// Where Debian's ld.so looks after RUNPATH/RPATH. The image has no
/// /etc/ld.so.cache, so ld.so.conf.d does not count, as on the node.
pub fn search_dirs(arch: Arch) -> Vec<String> {
    let t = triplet(arch);
    vec![format!("/lib/{t}"), format!("/usr/lib/{t}"), "/lib".into(), "/usr/lib".into()]
}

/// The Debian package that usually carries a library, by policy's naming
/// (libfoo.so.1 in libfoo1, libfoo2.so.0 in libfoo2-0): a hint only.
fn likely_package(lib: &str) -> Option<String> {
    if lib.starts_with("ld-") {
        return Some("libc6".into());
    }
    let (base, ver) = lib.split_once(".so.")?;
    let base = base.replace('_', "-").to_ascii_lowercase();
    Some(match base.ends_with(|c: char| c.is_ascii_digit()) {
        true => format!("{base}-{ver}"),
        false => format!("{base}{ver}"),
    })
}

fn add_hint(lib: &str) -> String {
    let name = lib.rsplit('/').next().unwrap_or(lib);
    let eg = likely_package(name).map(|p| format!(", e.g. {p}")).unwrap_or_default();
    format!("add the Debian package that has it (apt-file search {name}{eg}) to [[rootfs.packages]]")
}

/// `/opt/x/bin/../lib` as `/opt/x/lib`, for messages.
fn tidy(dir: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for c in dir.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    format!("/{}", out.join("/"))
}

/// Where ELF files are for the kernel or for devices, never for ld.so:
/// firmware for other processors, kernel modules.
const NOT_LOADED: &[&str] = &["/lib/firmware/", "/usr/lib/firmware/", "/lib/modules/", "/usr/lib/modules/"];

/// Reads the ELF headers of a file in the tree, if it is an ELF file.
/// `Some(None)`: ELF magic, but not a file kiln can read.
fn read_elf(path: &str, content: &Content) -> Result<Option<Option<elf::Dynamic>>, PackageError> {
    let read_err = |source| PackageError::Read { path: path.to_string(), source };
    match content {
        Content::Bytes(b) => Ok(elf::is_elf(b).then(|| elf::dynamic(b.as_slice()))),
        Content::Host(p) => {
            let f = std::fs::File::open(p).map_err(read_err)?;
            let head = elf::Source::read(&f, 0, 4);
            Ok(head.is_some_and(|h| elf::is_elf(&h)).then(|| elf::dynamic(&f)))
        }
    }
}

/// Checks that every executable and shared library in the tree can be
/// loaded on the node: built for the arch, with its program interpreter and
/// every `DT_NEEDED` library in the image (through RUNPATH or RPATH with
/// `$ORIGIN`, then the standard directories, following symlinks inside the
/// tree). Reports every miss, one per line.
pub fn check_elves(tree: &Tree, arch: Arch, owners: &Owners) -> Result<(), PackageError> {
    let mut elves: BTreeMap<&str, elf::Dynamic> = BTreeMap::new();
    let mut problems = Vec::new();
    let who = |path: &str| match owners.get(path) {
        Some(p) => format!("rootfs.packages: {path} (package {p})"),
        None => format!("rootfs: {path}"),
    };
    for (path, e) in tree.iter() {
        let Kind::File(content) = &e.kind else { continue };
        if NOT_LOADED.iter().any(|d| path.starts_with(d)) {
            continue;
        }
        match read_elf(path, content)? {
            None => {}
            Some(Some(d)) => {
                elves.insert(path, d);
            }
            Some(None) => problems.push(format!("{} is an ELF file kiln cannot read (damaged, or big-endian); take the {} build of it, or leave it out with `exclude`", who(path), arch.debian())),
        }
    }
    let want = arch.elf_machine();
    let defaults = search_dirs(arch);
    // A candidate counts if it is an ELF object for the same machine, as
    // ld.so skips others and goes on searching.
    let loadable = |p: &str, machine: u16| tree.lookup(p).and_then(|(real, _)| elves.get(real.as_str())).is_some_and(|d| d.info.machine == machine);
    for (path, d) in &elves {
        if !d.is_loadable() {
            continue;
        }
        if d.info.machine != want {
            problems.push(format!("{} is built for {}, but the profile's arch is {arch}; take the {} build of its package (arch = \"{}\"), or leave it out with `exclude`", who(path), elf::machine_name(d.info.machine), arch.debian(), arch.debian()));
            continue;
        }
        if let Some(interp) = &d.info.interp {
            if !loadable(interp, d.info.machine) {
                problems.push(format!("{} needs the program interpreter {interp}, which is not in the image; {}", who(path), add_hint(interp)));
            }
        }
        let origin = path.rsplit_once('/').map(|(dir, _)| if dir.is_empty() { "/" } else { dir }).unwrap_or("/");
        // RUNPATH, when present, replaces RPATH.
        let own = d.runpath.as_ref().or(d.rpath.as_ref());
        let own: Vec<String> = own.iter().flat_map(|s| s.split(':')).map(|dir| dir.replace("${ORIGIN}", origin).replace("$ORIGIN", origin)).filter(|dir| dir.starts_with('/')).collect();
        let dirs: Vec<&String> = own.iter().chain(defaults.iter()).collect();
        for lib in &d.needed {
            let found = match lib.contains('/') {
                true => loadable(lib, d.info.machine),
                false => dirs.iter().any(|dir| loadable(&format!("{dir}/{lib}"), d.info.machine)),
            };
            if !found {
                let looked = dirs.iter().map(|d| tidy(d)).collect::<Vec<_>>().join(", ");
                problems.push(format!("{} needs {lib}, which is not in the image (looked in {looked}); {}", who(path), add_hint(lib)));
            }
        }
    }
    match problems.is_empty() {
        true => Ok(()),
        false => Err(PackageError::Elf(problems)),
    }
}

/// The packages stage of the pipeline: unpack into the tree, then check
/// every ELF file in it.
pub fn add_and_check(tree: &mut Tree, pkgs: &[Package], arch: Arch, cache: &Cache) -> Result<Owners, PackageError> {
    let owners = add_to(tree, pkgs, cache)?;
    check_elves(tree, arch, &owners)?;
    Ok(owners)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_testkit::tiny_elf32;

    fn pin() -> String {
        "ab".repeat(32)
    }

    #[test]
    fn globs() {
        for (g, p, m) in [
            ("usr/share/doc/**", "usr/share/doc", true),
            ("usr/share/doc/**", "usr/share/doc/runc/copyright", true),
            ("usr/share/doc/**", "usr/share/docs/x", false),
            ("usr/share/man/**", "usr/share/man/man8/runc.8.gz", true),
            ("usr/**/*.a", "usr/lib/x86_64-linux-gnu/libc.a", true),
            ("usr/lib/*.a", "usr/lib/x86_64-linux-gnu/libc.a", false),
            ("usr/bin/runc?", "usr/bin/runc2", true),
            ("usr/bin/runc?", "usr/bin/runc", false),
            ("**", "anything/at/all", true),
        ] {
            assert_eq!(glob_match(g, p), m, "{g} {p}");
        }
    }

    #[test]
    fn spec_checks_each_key() {
        let f = |deb: &str, arch: Option<&str>, exclude: Option<Vec<&str>>| PackageFile {
            deb: deb.into(),
            version: "1.0-1".into(),
            sha256: pin(),
            arch: arch.map(str::to_string),
            exclude: exclude.map(|v| v.into_iter().map(str::to_string).collect()),
            file: None,
        };
        let s = spec(&[f("runc", None, None), f("tzdata", Some("all"), Some(vec!["/usr/share/zoneinfo/right/**"]))], Arch::Amd64).unwrap();
        assert_eq!(s[0].key, "rootfs.packages[0]");
        assert_eq!(s[0].exclude.len(), DEFAULT_EXCLUDE.len());
        assert_eq!(s[1].exclude, ["usr/share/zoneinfo/right/**"]);
        assert_eq!(s[1].input.arch.as_deref(), Some("all"));
        let e = spec(&[f("runc", Some("arm64"), None)], Arch::Amd64).unwrap_err();
        assert_eq!(e.key, "rootfs.packages[0].arch");
        assert!(e.message.contains("use `amd64` or `all`"), "{}", e.message);
        let e = spec(&[f("runc", None, None), f("runc", None, None)], Arch::Armv7).unwrap_err();
        assert_eq!((e.key.as_str(), e.message.as_str()), ("rootfs.packages[1].deb", "`runc` is already in rootfs.packages[0]"));
        assert_eq!(spec(&[f("a", None, Some(vec!["../etc"]))], Arch::Amd64).unwrap_err().key, "rootfs.packages[0].exclude");
        assert_eq!(spec(&[f("runc:amd64", None, None)], Arch::Amd64).unwrap_err().key, "rootfs.packages[0].deb");
        let mut bad = f("runc", None, None);
        bad.version = String::new();
        assert_eq!(spec(&[bad], Arch::Amd64).unwrap_err().key, "rootfs.packages[0].version");
        let mut bad = f("runc", None, None);
        bad.sha256 = "zz".into();
        assert_eq!(spec(&[bad], Arch::Amd64).unwrap_err().key, "rootfs.packages[0].sha256");
    }

    #[test]
    fn paths_stay_inside() {
        assert_eq!(inside("./usr/bin/runc").unwrap(), "usr/bin/runc");
        assert_eq!(inside("./").unwrap(), "");
        assert_eq!(inside("./usr/lib/").unwrap(), "usr/lib");
        assert!(inside("/etc/passwd").unwrap_err().contains("outside the root"));
        assert!(inside("./usr/../../etc").is_err());
    }

    #[test]
    fn likely_packages() {
        assert_eq!(likely_package("libseccomp.so.2").as_deref(), Some("libseccomp2"));
        assert_eq!(likely_package("libc.so.6").as_deref(), Some("libc6"));
        assert_eq!(likely_package("libfoo2.so.0").as_deref(), Some("libfoo2-0"));
        assert_eq!(likely_package("ld-linux-armhf.so.3").as_deref(), Some("libc6"));
        assert_eq!(likely_package("libplugin.so"), None);
    }

    /// An armv7 tree like a package would make one: a program in
    /// /usr/sbin, libc through a multiarch dir, a private library through
    /// $ORIGIN, the interpreter through a symlink.
    fn armv7_tree() -> Tree {
        let mut t = Tree::new();
        let lib = |needed: &[&str]| {
            let mut b = tiny_elf32("/lib/ld-linux-armhf.so.3", needed, None);
            b[16] = 3; // ET_DYN
            b
        };
        t.file("/lib/arm-linux-gnueabihf/ld-linux-armhf.so.3", lib(&[]), 0o755).unwrap();
        t.symlink("/lib/ld-linux-armhf.so.3", "arm-linux-gnueabihf/ld-linux-armhf.so.3").unwrap();
        t.file("/lib/arm-linux-gnueabihf/libc.so.6", lib(&["ld-linux-armhf.so.3"]), 0o644).unwrap();
        t.file("/usr/lib/arm-linux-gnueabihf/libseccomp.so.2.5.4", lib(&["libc.so.6"]), 0o644).unwrap();
        t.symlink("/usr/lib/arm-linux-gnueabihf/libseccomp.so.2", "libseccomp.so.2.5.4").unwrap();
        t.file("/opt/vendor/lib/libvendor.so.1", lib(&["libc.so.6"]), 0o644).unwrap();
        t.file("/opt/vendor/bin/tool", tiny_elf32("/lib/ld-linux-armhf.so.3", &["libvendor.so.1", "libc.so.6"], Some("$ORIGIN/../lib")), 0o755).unwrap();
        t.file("/usr/sbin/runc", tiny_elf32("/lib/ld-linux-armhf.so.3", &["libseccomp.so.2", "libc.so.6"], None), 0o755).unwrap();
        t.file("/etc/motd", "not ELF", 0o644).unwrap();
        t
    }

    #[test]
    fn resolves_through_symlinks_origin_and_multiarch_dirs() {
        let t = armv7_tree();
        check_elves(&t, Arch::Armv7, &Owners::new()).unwrap();
    }

    #[test]
    fn every_miss_is_named_with_what_to_do() {
        let mut t = armv7_tree();
        t.symlink("/usr/lib/arm-linux-gnueabihf/libseccomp.so.2", "gone").unwrap();
        t.file("/opt/vendor/lib/libvendor.so.1", "no longer ELF", 0o644).unwrap();
        let owners = Owners::from([("/usr/sbin/runc".to_string(), "runc".to_string())]);
        let e = check_elves(&t, Arch::Armv7, &owners).unwrap_err().to_string();
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines.len(), 2, "{e}");
        assert_eq!(lines[0], "rootfs: /opt/vendor/bin/tool needs libvendor.so.1, which is not in the image (looked in /opt/vendor/lib, /lib/arm-linux-gnueabihf, /usr/lib/arm-linux-gnueabihf, /lib, /usr/lib); add the Debian package that has it (apt-file search libvendor.so.1, e.g. libvendor1) to [[rootfs.packages]]");
        assert_eq!(lines[1], "rootfs.packages: /usr/sbin/runc (package runc) needs libseccomp.so.2, which is not in the image (looked in /lib/arm-linux-gnueabihf, /usr/lib/arm-linux-gnueabihf, /lib, /usr/lib); add the Debian package that has it (apt-file search libseccomp.so.2, e.g. libseccomp2) to [[rootfs.packages]]");
    }

    #[test]
    fn interpreter_and_machine_are_checked() {
        let mut t = armv7_tree();
        t.symlink("/lib/ld-linux-armhf.so.3", "nowhere").unwrap();
        let e = check_elves(&t, Arch::Armv7, &Owners::new()).unwrap_err().to_string();
        assert!(e.contains("rootfs: /usr/sbin/runc needs the program interpreter /lib/ld-linux-armhf.so.3, which is not in the image; add the Debian package that has it (apt-file search ld-linux-armhf.so.3, e.g. libc6)"), "{e}");
        // Every file that names it: every miss counts.
        assert_eq!(e.lines().filter(|l| l.contains("needs the program interpreter /lib/ld-linux-armhf.so.3")).count(), 6, "{e}");
        let e = check_elves(&armv7_tree(), Arch::Amd64, &Owners::new()).unwrap_err().to_string();
        assert!(e.contains("rootfs: /usr/sbin/runc is built for arm (armv7), but the profile's arch is amd64; take the amd64 build"), "{e}");
        // A library for another machine does not satisfy a DT_NEEDED.
        let mut t = armv7_tree();
        let mut other = tiny_elf32("/x", &[], None);
        other[18] = 62;
        t.file("/usr/lib/arm-linux-gnueabihf/libseccomp.so.2.5.4", other, 0o644).unwrap();
        let e = check_elves(&t, Arch::Armv7, &Owners::new()).unwrap_err().to_string();
        assert!(e.contains("/usr/sbin/runc needs libseccomp.so.2"), "{e}");
        // Firmware for another processor is the kernel's business.
        let mut t = armv7_tree();
        let mut fw = tiny_elf32("/nowhere", &["libdsp.so"], None);
        fw[18] = 62;
        t.file("/lib/firmware/acme/dsp.elf", fw, 0o644).unwrap();
        check_elves(&t, Arch::Armv7, &Owners::new()).unwrap();
        // Damaged ELF: named, no panic.
        let mut t = Tree::new();
        t.file("/bin/broken", b"\x7fELF\x01\x01\x01".to_vec(), 0o755).unwrap();
        let e = check_elves(&t, Arch::Armv7, &Owners::new()).unwrap_err().to_string();
        assert!(e.starts_with("rootfs: /bin/broken is an ELF file kiln cannot read"), "{e}");
    }

    #[test]
    fn host_programs_check_against_the_host_libraries() {
        // /bin/ls with the host's loader and libraries, read from disk.
        let arch = match std::env::consts::ARCH {
            "x86_64" => Arch::Amd64,
            "aarch64" => Arch::Arm64,
            _ => return,
        };
        let mut t = Tree::new();
        t.host_file("/bin/ls", "/bin/ls".into(), 0o755).unwrap();
        let e = check_elves(&t, arch, &Owners::new()).unwrap_err().to_string();
        assert!(e.contains("rootfs: /bin/ls needs libc.so.6, which is not in the image"), "{e}");
        // Add the loader and the libraries, and theirs, until none is missing.
        let ls = elf::dynamic(&std::fs::File::open("/bin/ls").unwrap()).unwrap();
        let mut todo: Vec<String> = ls.info.interp.into_iter().chain(ls.needed.iter().map(|n| format!("/lib/{}/{n}", triplet(arch)))).collect();
        while let Some(lib) = todo.pop() {
            if t.get(&lib).is_some() {
                continue;
            }
            let real = std::fs::canonicalize(&lib).unwrap_or_else(|e| panic!("{lib}: {e}"));
            t.host_file(&lib, real.clone(), 0o755).unwrap();
            let d = elf::dynamic(&std::fs::File::open(&real).unwrap()).unwrap();
            todo.extend(d.needed.iter().map(|n| format!("/lib/{}/{n}", triplet(arch))));
        }
        check_elves(&t, arch, &Owners::new()).unwrap();
    }
}
