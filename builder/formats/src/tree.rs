//! The root filesystem as an in-memory tree: path → mode, owner, content.
//!
//! No root privileges, no real chown: owners and modes are data here, and the
//! writers (cpio now, squashfs later) put them in the archive.

use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Bytes(Vec<u8>),
    /// A file on the host, read when the archive is written.
    Host(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File(Content),
    Symlink(String),
    /// A character device (major, minor).
    CharDev(u32, u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// Permission bits only (0o755); the type comes from `kind`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("rootfs: `{0}` is not an absolute normalised path")]
    BadPath(String),
    #[error("rootfs: `{path}` is added twice ({what})")]
    Conflict { path: String, what: String },
    #[error("rootfs: `{parent}` must be a directory to hold `{path}`")]
    NotDir { parent: String, path: String },
    #[error("rootfs: reading {path}: {source}")]
    Host { path: std::path::PathBuf, source: std::io::Error },
}

/// Paths are absolute, `/`-separated, with no `.`/`..`/empty components.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    entries: BTreeMap<String, Entry>,
}

fn check_path(p: &str) -> Result<(), TreeError> {
    if p == "/" {
        return Ok(());
    }
    if !p.starts_with('/') || p.ends_with('/') || p[1..].split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(TreeError::BadPath(p.into()));
    }
    Ok(())
}

fn parent(p: &str) -> &str {
    match p.rfind('/') {
        Some(0) => "/",
        Some(i) => &p[..i],
        None => "/",
    }
}

impl Tree {
    pub fn new() -> Tree {
        let mut t = Tree::default();
        t.entries.insert("/".into(), Entry { kind: Kind::Dir, mode: 0o755, uid: 0, gid: 0 });
        t
    }

    /// Creates a directory and its parents (0755, root). Existing dirs are kept.
    pub fn mkdir_p(&mut self, path: &str, mode: u32) -> Result<(), TreeError> {
        check_path(path)?;
        // Walk down from the root, without recursion (trees can be deep).
        let mut at = String::new();
        let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        for (i, c) in comps.iter().enumerate() {
            let parent = if at.is_empty() { "/".to_string() } else { at.clone() };
            at.push('/');
            at.push_str(c);
            let m = if i + 1 == comps.len() { mode } else { 0o755 };
            match self.entries.get(at.as_str()) {
                Some(Entry { kind: Kind::Dir, .. }) => {}
                Some(_) => return Err(TreeError::NotDir { parent: at.clone(), path: path.into() }),
                None => {
                    if !matches!(self.entries.get(parent.as_str()).map(|e| &e.kind), Some(Kind::Dir)) {
                        return Err(TreeError::NotDir { parent, path: path.into() });
                    }
                    self.entries.insert(at.clone(), Entry { kind: Kind::Dir, mode: m, uid: 0, gid: 0 });
                }
            }
        }
        Ok(())
    }

    /// Sets the owner of an existing entry.
    pub fn chown(&mut self, path: &str, uid: u32, gid: u32) -> Result<(), TreeError> {
        let e = self.entries.get_mut(path).ok_or_else(|| TreeError::BadPath(format!("{path} (not in the tree)")))?;
        e.uid = uid;
        e.gid = gid;
        Ok(())
    }

    /// Adds a non-directory entry; parents are created. Replacing an existing
    /// non-directory is allowed (overlays win), replacing a directory is not.
    pub fn insert(&mut self, path: &str, kind: Kind, mode: u32) -> Result<(), TreeError> {
        check_path(path)?;
        let par = parent(path).to_string();
        self.mkdir_p(&par, 0o755)?;
        if !matches!(self.entries.get(&par).map(|e| &e.kind), Some(Kind::Dir)) {
            return Err(TreeError::NotDir { parent: par, path: path.into() });
        }
        if matches!(self.entries.get(path).map(|e| &e.kind), Some(Kind::Dir)) {
            return Err(TreeError::Conflict { path: path.into(), what: "a file over a directory".into() });
        }
        self.entries.insert(path.into(), Entry { kind, mode, uid: 0, gid: 0 });
        Ok(())
    }

    pub fn file(&mut self, path: &str, bytes: impl Into<Vec<u8>>, mode: u32) -> Result<(), TreeError> {
        self.insert(path, Kind::File(Content::Bytes(bytes.into())), mode)
    }

    pub fn host_file(&mut self, path: &str, src: PathBuf, mode: u32) -> Result<(), TreeError> {
        self.insert(path, Kind::File(Content::Host(src)), mode)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), TreeError> {
        self.insert(path, Kind::Symlink(target.into()), 0o777)
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path)
    }

    /// Finds what `path` names on the booted node, following symlinks inside
    /// the tree: absolute targets start at the tree's root and `..` stops
    /// there, as under chroot. Returns the path reached and its entry;
    /// `None` if something on the way is missing, not a directory, or loops.
    pub fn lookup(&self, path: &str) -> Option<(String, &Entry)> {
        let mut todo: Vec<String> = path.split('/').rev().map(str::to_string).collect();
        let mut at: Vec<String> = Vec::new();
        let mut hops = 0;
        let join = |at: &[String]| format!("/{}", at.join("/"));
        while let Some(c) = todo.pop() {
            match c.as_str() {
                "" | "." => continue,
                ".." => {
                    at.pop();
                    continue;
                }
                _ => at.push(c),
            }
            let e = self.entries.get(&join(&at))?;
            match &e.kind {
                Kind::Dir => {}
                Kind::Symlink(target) => {
                    // The kernel's limit on links followed in one lookup.
                    hops += 1;
                    if hops > 40 {
                        return None;
                    }
                    at.pop();
                    if target.starts_with('/') {
                        at.clear();
                    }
                    todo.extend(target.split('/').rev().map(str::to_string));
                }
                _ if todo.iter().any(|c| !c.is_empty() && c != ".") => return None,
                _ => {}
            }
        }
        let p = join(&at);
        self.entries.get_key_value(&p).map(|(k, e)| (k.clone(), e))
    }

    /// Entries in path order (parents before children), which is also the
    /// order archive writers need.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.len() <= 1
    }

    /// Total size of file contents, in bytes.
    pub fn content_size(&self) -> std::io::Result<u64> {
        let mut n = 0;
        for (_, e) in self.iter() {
            match &e.kind {
                Kind::File(Content::Bytes(b)) => n += b.len() as u64,
                Kind::File(Content::Host(p)) => n += std::fs::metadata(p)?.len(),
                _ => {}
            }
        }
        Ok(n)
    }
}

impl Tree {
    /// Adds the host directory `src` (files, directories, symlinks; sorted,
    /// so the tree is the same whatever order the host lists them in) under
    /// `dst`. A missing `src` adds nothing.
    pub fn add_host_dir(&mut self, src: &std::path::Path, dst: &str) -> Result<(), TreeError> {
        if !src.is_dir() {
            return Ok(());
        }
        let host = |e: std::io::Error| TreeError::Host { path: src.to_path_buf(), source: e };
        let mut entries: Vec<_> = std::fs::read_dir(src).and_then(|d| d.collect::<std::io::Result<Vec<_>>>()).map_err(host)?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let path = format!("{dst}/{}", e.file_name().to_string_lossy());
            let ft = e.file_type().map_err(host)?;
            if ft.is_dir() {
                self.mkdir_p(&path, 0o755)?;
                self.add_host_dir(&e.path(), &path)?;
            } else if ft.is_symlink() {
                let target = std::fs::read_link(e.path()).map_err(host)?;
                self.symlink(&path, &target.to_string_lossy())?;
            } else {
                self.host_file(&path, e.path(), 0o644)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_created_and_sorted() {
        let mut t = Tree::new();
        t.file("/etc/kiln/node.toml", "x", 0o644).unwrap();
        t.symlink("/init", "sbin/kiln-init").unwrap();
        let paths: Vec<_> = t.iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(paths, ["/", "/etc", "/etc/kiln", "/etc/kiln/node.toml", "/init"]);
    }

    #[test]
    fn rejects_bad_paths_and_conflicts() {
        let mut t = Tree::new();
        assert!(t.file("etc/x", "", 0o644).is_err());
        assert!(t.file("/etc/../x", "", 0o644).is_err());
        t.file("/a", "", 0o644).unwrap();
        assert!(t.file("/a/b", "", 0o644).is_err());
        t.mkdir_p("/d", 0o755).unwrap();
        assert!(t.file("/d", "", 0o644).is_err());
        assert!(t.mkdir_p("/a/b", 0o755).is_err(), "a directory under a file");
        let deep = "/x".repeat(30_000);
        t.mkdir_p(&deep, 0o700).unwrap();
        assert_eq!(t.get(&deep).unwrap().mode, 0o700);
        t.chown("/d", 1000, 1000).unwrap();
        assert_eq!(t.get("/d").unwrap().uid, 1000);
    }

    proptest::proptest! {
        /// Symlinks anywhere, to anything: lookup ends, and what it returns
        /// is in the tree and not a symlink.
        #[test]
        fn lookup_always_ends(links in proptest::collection::vec(("[ab]{1,2}(/[ab]{1,2}){0,2}", "(/|\\.\\./)?[ab.]{1,2}(/[ab.]{1,2}){0,2}"), 0..12), ask in "[ab]{1,2}(/[ab]{1,2}){0,3}") {
            let mut t = Tree::new();
            t.file("/a/b", "x", 0o644).ok();
            for (p, target) in &links {
                t.symlink(&format!("/{p}"), target).ok();
            }
            if let Some((p, e)) = t.lookup(&format!("/{ask}")) {
                proptest::prop_assert!(t.get(&p).is_some());
                proptest::prop_assert!(!matches!(e.kind, Kind::Symlink(_)));
            }
        }
    }

    #[test]
    fn lookup_follows_symlinks_inside_the_tree() {
        let mut t = Tree::new();
        t.file("/lib/x86_64-linux-gnu/libc.so.6", "elf", 0o644).unwrap();
        t.symlink("/lib64/ld.so", "/lib/x86_64-linux-gnu/libc.so.6").unwrap();
        t.symlink("/usr/lib/libc.so.6", "../../lib/x86_64-linux-gnu/libc.so.6").unwrap();
        t.symlink("/usr/lib64", "../lib64").unwrap();
        t.symlink("/escape", "../../../../lib64/ld.so").unwrap();
        t.symlink("/loop", "loop").unwrap();
        t.symlink("/dangling", "/nowhere").unwrap();
        let want = "/lib/x86_64-linux-gnu/libc.so.6";
        for p in ["/lib64/ld.so", "/usr/lib/libc.so.6", "/usr/lib64/ld.so", "/escape", "//lib/./x86_64-linux-gnu/../x86_64-linux-gnu/libc.so.6"] {
            assert_eq!(t.lookup(p).map(|(p, _)| p), Some(want.to_string()), "{p}");
        }
        assert_eq!(t.lookup("/usr/lib64").map(|(p, _)| p), Some("/lib64".to_string()));
        for p in ["/loop", "/dangling", "/lib64/ld.so/x", "/nope"] {
            assert!(t.lookup(p).is_none(), "{p}");
        }
    }
}
