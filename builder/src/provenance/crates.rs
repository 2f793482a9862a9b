//! The Rust crates a node binary (kiln-init, the stand-in) is built from, for
//! the SBOM.
//!
//! `cargo tree -e normal --target T` gives exactly what `cargo build -p P
//! --target T` compiles: per-package features, no dev-dependencies, no
//! crates for other platforms. Its answer depends only on Cargo.lock and the
//! workspace manifests, so it is kept in the cache under their hash: a build
//! without a toolchain (`KILN_NODE_BINARIES`, an unprivileged user) then
//! lists the same crates as the build that compiled the binaries. With
//! neither cargo nor a cached answer, the list comes from Cargo.lock alone,
//! which cannot tell platforms apart; the graph says so ([`Graph::exact`]).

use crate::inputs::cache::Cache;
use crate::inputs::input::sha256_bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Bump when the cached text's format changes.
const MEMO_FORMAT: &str = "cargo-tree v1";

#[derive(Debug, thiserror::Error)]
pub enum CratesError {
    #[error("{path}: {reason}. The SBOM lists the node binaries' crates from it; run kiln from a kiln checkout, or set KILN_SOURCE_DIR to one")]
    Lock { path: PathBuf, reason: String },
    #[error("{path}: package `{package}` is not in Cargo.lock")]
    NoPackage { path: PathBuf, package: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crate {
    pub name: String,
    pub version: String,
    /// `registry+https://…` or `git+https://…`; `None` for a workspace member.
    pub source: Option<String>,
    /// sha256 of the `.crate` file, from Cargo.lock.
    pub checksum: Option<String>,
    /// The license field of its Cargo.toml, as cargo reports it.
    pub license: Option<String>,
    /// Runs in the compiler; not linked into the binary.
    pub proc_macro: bool,
}

impl Crate {
    pub fn from_crates_io(&self) -> bool {
        self.source.as_deref().is_some_and(|s| s.starts_with("registry+") && s.contains("crates.io"))
    }
}

/// A package and its dependency closure.
#[derive(Debug, Clone)]
pub struct Graph {
    /// `crates[0]` is the package itself.
    pub crates: Vec<Crate>,
    /// (dependent, dependency), as indices into `crates`.
    pub edges: BTreeSet<(usize, usize)>,
    /// False when the list came from Cargo.lock alone and may hold crates
    /// the binary does not contain (other platforms, unused features).
    pub exact: bool,
}

struct LockEntry {
    name: String,
    version: String,
    source: Option<String>,
    checksum: Option<String>,
    deps: Vec<String>,
}

/// The crates `package` is built from for `target`, in the workspace at
/// `tree`.
pub fn graph(tree: &Path, package: &str, target: &str, cache: &Cache) -> Result<Graph, CratesError> {
    let lock_path = tree.join("Cargo.lock");
    let lock_text = std::fs::read_to_string(&lock_path).map_err(|e| CratesError::Lock { path: lock_path.clone(), reason: e.to_string() })?;
    let lock = parse_lock(&lock_text).map_err(|reason| CratesError::Lock { path: lock_path.clone(), reason })?;

    let memo = cache.index_path("cargo-tree", &memo_key(tree, package, target, &lock_text));
    let text = match std::fs::read_to_string(&memo) {
        Ok(t) => Some(t),
        Err(_) => match cargo_tree(tree, package, target) {
            Ok(t) => {
                if let Err(e) = cache.write_index(&memo, &t) {
                    tracing::warn!("could not cache the crate list of {package}: {e}");
                }
                Some(t)
            }
            Err(e) => {
                tracing::warn!("`cargo tree` for {package} failed ({e}); the SBOM lists its crates from Cargo.lock, unfiltered for {target}");
                None
            }
        },
    };
    match text {
        Some(t) => Ok(from_tree(&t, &lock)),
        None => from_lock(&lock, package, &dev_dependencies(tree)).ok_or(CratesError::NoPackage { path: lock_path, package: package.into() }),
    }
}

/// What cargo tree's answer depends on.
fn memo_key(tree: &Path, package: &str, target: &str, lock_text: &str) -> String {
    let mut key = format!("{MEMO_FORMAT}\n{package}\n{target}\n{}\n", sha256_bytes(lock_text.as_bytes()));
    for m in member_manifests(tree) {
        key.push_str(&format!("{}\n", sha256_bytes(&std::fs::read(&m).unwrap_or_default())));
    }
    key
}

/// Runs cargo tree and keeps what does not depend on where the tree is: one
/// line per node, `depth|name|version|proc-macro|license`.
fn cargo_tree(tree: &Path, package: &str, target: &str) -> Result<String, String> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(tree)
        .args(["tree", "--locked", "--offline", "-e", "normal", "--prefix", "depth", "--format", "{p}|{l}", "--target", target, "-p", package])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let mut lines = String::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let digits = line.bytes().take_while(u8::is_ascii_digit).count();
        let (depth, rest) = line.split_at(digits);
        let rest = rest.strip_suffix(" (*)").unwrap_or(rest);
        let Some((spec, license)) = rest.split_once('|') else { continue };
        let mut words = spec.split_whitespace();
        let (Some(name), Some(version)) = (words.next(), words.next()) else { continue };
        let version = version.strip_prefix('v').unwrap_or(version);
        let proc_macro = spec.contains("(proc-macro)");
        lines.push_str(&format!("{depth}|{name}|{version}|{}|{}\n", proc_macro as u8, license.trim()));
    }
    if lines.is_empty() {
        return Err("cargo tree printed nothing".into());
    }
    Ok(lines)
}

fn from_tree(text: &str, lock: &[LockEntry]) -> Graph {
    let mut crates: Vec<Crate> = Vec::new();
    let mut edges = BTreeSet::new();
    let mut stack: Vec<usize> = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.splitn(5, '|').collect();
        if f.len() != 5 {
            continue;
        }
        let Ok(depth) = f[0].parse::<usize>() else { continue };
        let (name, version) = (f[1], f[2]);
        let i = match crates.iter().position(|c| c.name == name && c.version == version) {
            Some(i) => i,
            None => {
                let entry = lock.iter().find(|e| e.name == name && e.version == version);
                crates.push(Crate {
                    name: name.into(),
                    version: version.into(),
                    source: entry.and_then(|e| e.source.clone()),
                    checksum: entry.and_then(|e| e.checksum.clone()),
                    license: Some(f[4].to_string()).filter(|l| !l.is_empty()),
                    proc_macro: f[3] == "1",
                });
                crates.len() - 1
            }
        };
        stack.truncate(depth);
        if let Some(&parent) = stack.last() {
            edges.insert((parent, i));
        }
        stack.push(i);
    }
    Graph { crates, edges, exact: true }
}

/// The closure of `package` in Cargo.lock, without its dev-dependencies.
fn from_lock(lock: &[LockEntry], package: &str, dev: &BTreeMap<String, BTreeSet<String>>) -> Option<Graph> {
    let root = lock.iter().position(|e| e.name == package && e.source.is_none())?;
    let find = |dep: &str| -> Option<usize> {
        let mut w = dep.split_whitespace();
        let name = w.next()?;
        let version = w.next();
        lock.iter().position(|e| e.name == name && version.is_none_or(|v| e.version == v))
    };
    let mut order = vec![root];
    let mut index: BTreeMap<usize, usize> = BTreeMap::from([(root, 0)]);
    let mut edges = BTreeSet::new();
    let mut next = 0;
    while next < order.len() {
        let at = order[next];
        next += 1;
        for dep in &lock[at].deps {
            let member_dev = lock[at].source.is_none().then(|| dev.get(&lock[at].name)).flatten();
            if member_dev.is_some_and(|d| dep.split_whitespace().next().is_some_and(|n| d.contains(n))) {
                continue;
            }
            let Some(d) = find(dep) else { continue };
            let di = *index.entry(d).or_insert_with(|| {
                order.push(d);
                order.len() - 1
            });
            edges.insert((index[&at], di));
        }
    }
    let crates = order
        .iter()
        .map(|&i| Crate { name: lock[i].name.clone(), version: lock[i].version.clone(), source: lock[i].source.clone(), checksum: lock[i].checksum.clone(), license: None, proc_macro: false })
        .collect();
    Some(Graph { crates, edges, exact: false })
}

fn parse_lock(text: &str) -> Result<Vec<LockEntry>, String> {
    let v: toml::Value = toml::from_str(text).map_err(|e| format!("not a Cargo.lock: {e}"))?;
    let packages = v.get("package").and_then(|p| p.as_array()).ok_or("no [[package]] entries")?;
    let s = |p: &toml::Value, k: &str| p.get(k).and_then(|x| x.as_str()).map(str::to_string);
    Ok(packages
        .iter()
        .filter_map(|p| {
            Some(LockEntry {
                name: s(p, "name")?,
                version: s(p, "version")?,
                source: s(p, "source"),
                checksum: s(p, "checksum"),
                deps: p.get("dependencies").and_then(|d| d.as_array()).map(|d| d.iter().filter_map(|x| x.as_str().map(str::to_string)).collect()).unwrap_or_default(),
            })
        })
        .collect())
}

/// The workspace's Cargo.toml and its members', in a stable order.
fn member_manifests(tree: &Path) -> Vec<PathBuf> {
    let root = tree.join("Cargo.toml");
    let members: Vec<String> = std::fs::read_to_string(&root)
        .ok()
        .and_then(|t| toml::from_str::<toml::Value>(&t).ok())
        .and_then(|v| v.get("workspace")?.get("members")?.as_array().cloned())
        .map(|m| m.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let mut out = vec![root];
    out.extend(members.iter().map(|m| tree.join(m).join("Cargo.toml")));
    out
}

/// Each workspace member's dev-dependencies (names in Cargo.lock terms),
/// by package name. Cargo.lock does not mark dev edges, so the closure from
/// it leaves these out for every member it passes through.
fn dev_dependencies(tree: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    for m in member_manifests(tree).into_iter().skip(1) {
        let Some(v) = std::fs::read_to_string(&m).ok().and_then(|t| toml::from_str::<toml::Value>(&t).ok()) else { continue };
        let Some(name) = v.get("package").and_then(|p| p.get("name")).and_then(|n| n.as_str()) else { continue };
        let normal = v.get("dependencies").and_then(|d| d.as_table());
        let dev = v.get("dev-dependencies").and_then(|d| d.as_table()).map(|dev| {
            dev.iter()
                .filter(|(k, _)| normal.is_none_or(|n| !n.contains_key(*k)))
                .map(|(k, spec)| spec.get("package").and_then(|p| p.as_str()).unwrap_or(k).to_string())
                .collect()
        });
        out.insert(name.to_string(), dev.unwrap_or_default());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workspace() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
    }

    const TARGET: &str = "x86_64-unknown-linux-musl";

    #[test]
    fn kiln_init_crates_for_the_target() {
        let cache = Cache::at(tempfile::tempdir().unwrap().keep());
        let g = graph(&workspace(), "kiln-init", TARGET, &cache).unwrap();
        assert!(g.exact, "cargo tree runs under cargo test");
        assert_eq!(g.crates[0].name, "kiln-init");
        assert!(g.crates[0].source.is_none());
        let names: BTreeSet<&str> = g.crates.iter().map(|c| c.name.as_str()).collect();
        for want in ["serde", "toml", "ed25519-dalek", "sha2", "flate2", "libc"] {
            assert!(names.contains(want), "{want} missing from {names:?}");
        }
        // Dev-dependencies and other platforms' crates are not in the binary.
        for not in ["proptest", "windows-sys", "wasi"] {
            assert!(!names.contains(not), "{not} listed: {names:?}");
        }
        // Through the contract crate, a workspace member like kiln-init.
        let contract = g.crates.iter().position(|c| c.name == "kiln-contract").unwrap();
        assert!(g.edges.contains(&(0, contract)) && g.crates[contract].source.is_none());
        let serde = g.crates.iter().position(|c| c.name == "serde").unwrap();
        assert!(g.edges.contains(&(contract, serde)));
        let c = &g.crates[serde];
        assert!(c.from_crates_io() && c.checksum.as_ref().is_some_and(|s| s.len() == 64), "{c:?}");
        assert!(c.license.as_deref().is_some_and(|l| l.contains("MIT")), "{c:?}");
        assert!(g.crates.iter().any(|c| c.name == "serde_derive" && c.proc_macro));
        // Every edge points at a listed crate.
        assert!(g.edges.iter().all(|&(a, b)| a < g.crates.len() && b < g.crates.len()));
    }

    #[test]
    fn the_cached_answer_serves_a_build_without_cargo() {
        let cache = Cache::at(tempfile::tempdir().unwrap().keep());
        let with = graph(&workspace(), "kiln-qemu-tests", TARGET, &cache).unwrap();
        assert!(with.crates.iter().any(|c| c.name == "flate2"));
        // What a build without cargo reads back.
        let lock_text = std::fs::read_to_string(workspace().join("Cargo.lock")).unwrap();
        let lock = parse_lock(&lock_text).unwrap();
        let key = memo_key(&workspace(), "kiln-qemu-tests", TARGET, &lock_text);
        let memo = std::fs::read_to_string(cache.index_path("cargo-tree", &key)).unwrap();
        let again = from_tree(&memo, &lock);
        assert_eq!(again.crates, with.crates);
        assert_eq!(again.edges, with.edges);
    }

    #[test]
    fn cargo_lock_alone_gives_a_marked_superset() {
        let ws = workspace();
        let lock = parse_lock(&std::fs::read_to_string(ws.join("Cargo.lock")).unwrap()).unwrap();
        let dev = dev_dependencies(&ws);
        assert!(dev["kiln-init"].contains("proptest") && dev["kiln-contract"].contains("proptest"), "{dev:?}");
        let g = from_lock(&lock, "kiln-init", &dev).unwrap();
        assert!(!g.exact);
        let names: BTreeSet<&str> = g.crates.iter().map(|c| c.name.as_str()).collect();
        assert!(names.contains("serde") && names.contains("ed25519-dalek") && !names.contains("proptest"), "{names:?}");
        let cache = Cache::at(tempfile::tempdir().unwrap().keep());
        let exact = graph(&ws, "kiln-init", TARGET, &cache).unwrap();
        for c in &exact.crates {
            assert!(names.contains(c.name.as_str()), "{} missing from the Cargo.lock closure", c.name);
        }
        assert!(from_lock(&lock, "no-such-crate", &dev).is_none());
    }

    #[test]
    fn missing_lock_is_named() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::at(d.path().join("cache"));
        let err = graph(d.path(), "kiln-init", TARGET, &cache).unwrap_err().to_string();
        assert!(err.contains("Cargo.lock") && err.contains("KILN_SOURCE_DIR"), "{err}");
    }
}
