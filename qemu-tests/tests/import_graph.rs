//! The workspace's module import graph has no circles: within each crate,
//! no module reaches itself through `crate::`/`super::` paths or a parent's
//! use of its own submodules. (Between crates cargo forbids circles, and
//! `builder_never_links_kiln_init` checks the dependency rule of
//! ARCHITECTURE.md.)
//!
//! A source-level reading, not rustc's: comments and `#[cfg(test)] mod
//! tests` are left out, and a path counts as an edge to the longest module
//! prefix it names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Module path ("" for the crate root) → file, for one crate's `src/`.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(src, &mut files);
    let mut out = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).unwrap().with_extension("");
        let mut parts: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
        if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
            parts.pop();
        }
        // Binaries under src/bin are crates of their own.
        if parts.first().is_some_and(|p| p == "bin") {
            continue;
        }
        out.insert(parts.join("::"), f);
    }
    out
}

/// The file's code without comments and without its unit-test module.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests").or_else(|| text.find("#[cfg(test)]\npub(crate) mod tests")) {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

fn idents(s: &str) -> impl Iterator<Item = (usize, &str)> {
    s.char_indices().filter(move |&(i, c)| (c.is_alphanumeric() || c == '_') && (i == 0 || !s[..i].ends_with(|p: char| p.is_alphanumeric() || p == '_'))).map(move |(i, _)| {
        let end = s[i..].find(|c: char| !(c.is_alphanumeric() || c == '_')).map_or(s.len(), |e| i + e);
        (i, &s[i..end])
    })
}

/// Edges of one crate: module → modules it names.
fn edges(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules(src);
    let mut out = BTreeMap::new();
    for (m, file) in &mods {
        let base: Vec<&str> = if m.is_empty() { vec![] } else { m.split("::").collect() };
        let is_dir = matches!(file.file_stem().and_then(|s| s.to_str()), Some("mod" | "lib" | "main"));
        let text = code(&std::fs::read_to_string(file).unwrap());
        let mut to = BTreeSet::new();
        let mut add = |full: Vec<&str>| {
            for k in (1..=full.len()).rev() {
                let t = full[..k].join("::");
                if mods.contains_key(&t) {
                    if &t != m {
                        to.insert(t);
                    }
                    break;
                }
            }
        };
        for (i, word) in idents(&text) {
            let rest = &text[i + word.len()..];
            let Some(rest) = rest.strip_prefix("::") else { continue };
            let prefix: Vec<&str> = match word {
                "crate" => vec![],
                "super" => base[..base.len().saturating_sub(1)].to_vec(),
                // A parent naming its own submodule.
                w if is_dir && mods.contains_key(&base.iter().copied().chain([w]).collect::<Vec<_>>().join("::")) => {
                    if i > 0 && text[..i].ends_with("::") {
                        continue;
                    }
                    add(base.iter().copied().chain([w]).collect());
                    continue;
                }
                _ => continue,
            };
            if let Some(group) = rest.strip_prefix('{') {
                let group = &group[..group.find('}').unwrap_or(group.len())];
                for item in group.split(',') {
                    let path = item.split_whitespace().next().unwrap_or("");
                    let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty() && *s != "self" && *s != "*").collect();
                    if !segs.is_empty() {
                        add(prefix.iter().copied().chain(segs).collect());
                    }
                }
            } else {
                let path: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
                let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
                add(prefix.iter().copied().chain(segs).collect());
            }
        }
        out.insert(m.clone(), to);
    }
    out
}

/// Strongly connected components with more than one module (Tarjan).
fn circles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<BTreeSet<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        t.on.insert(v);
        for w in &t.g[v] {
            let w = w.as_str();
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = BTreeSet::new();
            loop {
                let w = t.stack.pop().unwrap();
                t.on.remove(w);
                comp.insert(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                t.out.push(comp);
            }
        }
    }
    let mut t = T { g, index: BTreeMap::new(), low: BTreeMap::new(), stack: vec![], on: BTreeSet::new(), out: vec![] };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

/// The graph of top-level modules: `image::disk → inputs::cache` becomes
/// `image → inputs`.
fn folders(g: &BTreeMap<String, BTreeSet<String>>) -> BTreeMap<String, BTreeSet<String>> {
    let top = |m: &str| m.split("::").next().unwrap_or("").to_string();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, to) in g {
        let a = top(m);
        out.entry(a.clone()).or_default();
        for t in to {
            let b = top(t);
            out.entry(b.clone()).or_default();
            if a != b && !a.is_empty() && !b.is_empty() {
                out.get_mut(&a).unwrap().insert(b);
            }
        }
    }
    out
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn no_module_reaches_itself() {
    let ws = workspace();
    let mut bad = Vec::new();
    for src in ["init/contract/src", "init/src", "builder/formats/src", "builder/src", "qemu-tests/testkit/src", "qemu-tests/src"] {
        for c in circles(&edges(&ws.join(src))) {
            bad.push(format!("{src}: {}", c.into_iter().collect::<Vec<_>>().join(" ↔ ")));
        }
        // Nor between folders (and top-level modules): inputs/, image/,
        // provenance/, node/ … depend on each other in one direction only.
        for c in circles(&folders(&edges(&ws.join(src)))) {
            bad.push(format!("{src} (folders): {}", c.into_iter().collect::<Vec<_>>().join(" ↔ ")));
        }
    }
    assert!(bad.is_empty(), "import circles (break them by moving what both sides need into a module of its own):\n{}", bad.join("\n"));
}

#[test]
fn the_reader_finds_a_planted_circle() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path();
    std::fs::create_dir_all(src.join("node")).unwrap();
    std::fs::write(src.join("lib.rs"), "pub mod a;\npub mod b;\npub mod node;\n").unwrap();
    std::fs::write(src.join("a.rs"), "use crate::b::thing;\n").unwrap();
    std::fs::write(src.join("b.rs"), "pub fn thing() { super::a::x(); }\n#[cfg(test)]\nmod tests { use crate::node::c; }\n").unwrap();
    std::fs::write(src.join("node/mod.rs"), "pub mod c;\npub mod d;\nfn f() { c::go(); }\n").unwrap();
    std::fs::write(src.join("node/c.rs"), "use super::{d, Thing};\n// crate::a in a comment\n").unwrap();
    std::fs::write(src.join("node/d.rs"), "use crate::{a, b};\n").unwrap();
    let g = edges(src);
    assert_eq!(g["node::c"], set(&["node", "node::d"]));
    assert_eq!(circles(&g), vec![set(&["a", "b"]), set(&["node", "node::c"])]);
    // node::d → a: the folder `node` and `a` are no circle; add a → node.
    std::fs::write(src.join("a.rs"), "use crate::node::d;\n").unwrap();
    let g = edges(src);
    assert!(circles(&folders(&g)).iter().any(|c| c.contains("a") && c.contains("node")), "{:?}", folders(&g));
}

#[test]
fn builder_never_links_kiln_init() {
    let tree = |p: &str| {
        let out = Command::new(env!("CARGO")).current_dir(workspace()).args(["tree", "--locked", "-e", "normal,build,dev", "--prefix", "none", "-p", p]).output().unwrap();
        assert!(out.status.success(), "cargo tree -p {p}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let has = |t: &str, name: &str| t.lines().any(|l| l.split_whitespace().next() == Some(name));
    let kiln = tree("kiln");
    assert!(has(&kiln, "kiln-contract") && !has(&kiln, "kiln-init"), "{kiln}");
    let init = tree("kiln-init");
    assert!(has(&init, "kiln-contract") && !has(&init, "kiln") && !has(&init, "kiln-formats"), "{init}");
}
