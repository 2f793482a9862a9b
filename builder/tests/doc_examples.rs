//! The node.toml examples in the docs are checked by the real `kiln config
//! check`, and docs/node-config.md documents every key of the schema.
//!
//! Which ```toml blocks are node configs:
//!
//! - In docs/node-config.md, every block, unless the line before its fence
//!   is a marker:
//!   - `<!-- doc-test: skip (why) -->`: not a node config (a profile
//!     fragment, say); not checked here.
//!   - `<!-- doc-test: reference -->`: a reference that lists keys side by
//!     side rather than a config one node would use: every key must be one
//!     the schema takes, with a value of the right type, but the values are
//!     not validated together.
//! - In docs/use-cases/*.md, the blocks whose top-level keys and tables are
//!   all node.toml ones (`role`, `[network]`, `[storage]`, …); the others are
//!   profiles. The same markers apply.
//!
//! A block with a top-level `role =` is a whole config and must pass
//! `kiln config check` as it is. A block without one is a fragment: it is
//! checked merged into the minimal config `role = "single"` (so a fragment
//! that needs another role must be written as a whole config).
//!
//! Key coverage: each key in `kiln_contract::config::KEYS` (the list kept next
//! to the schema's structs, itself checked against them) must appear in
//! docs/node-config.md, either defined in one of its ```toml blocks (as a
//! key of a table, an array of tables or an inline table) or written out in
//! backticks as its full dotted name (`` `hostname.from` ``).

use kiln_contract::config::{NodeConfig, KEYS};
use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

#[derive(Debug)]
struct Block {
    doc: String,
    /// 1-based line of the opening fence.
    line: usize,
    marker: Option<String>,
    text: String,
}

/// The ```toml blocks of a Markdown file.
fn toml_blocks(path: &Path) -> Vec<Block> {
    let md = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc = path.strip_prefix(workspace()).unwrap_or(path).display().to_string();
    let lines: Vec<&str> = md.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let fence = lines[i].trim_start();
        if fence.starts_with("```toml") {
            let indent = lines[i].len() - fence.len();
            let marker = i
                .checked_sub(1)
                .map(|p| lines[p].trim())
                .and_then(|l| l.strip_prefix("<!-- doc-test:"))
                .and_then(|l| l.strip_suffix("-->"))
                .map(|m| m.trim().to_string());
            let mut text = String::new();
            let mut j = i + 1;
            while j < lines.len() && !lines[j].trim_start().starts_with("```") {
                text.push_str(lines[j].get(indent..).unwrap_or(lines[j].trim_start()));
                text.push('\n');
                j += 1;
            }
            out.push(Block { doc: doc.clone(), line: i + 1, marker, text });
            i = j;
        }
        i += 1;
    }
    out
}

/// The top-level keys and tables of node.toml.
fn node_top_level() -> Vec<&'static str> {
    KEYS.iter().filter(|k| !k.contains('.')).copied().collect()
}

/// The top-level names a TOML text defines (None when it is not TOML).
fn top_level(text: &str) -> Option<Vec<String>> {
    let t: toml::Table = toml::from_str(text).ok()?;
    Some(t.keys().cloned().collect())
}

fn kiln_config_check(b: &Block, text: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{}-line{}.toml", b.doc.replace('/', "_"), b.line));
    std::fs::write(&file, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln")).args(["config", "check"]).arg(&file).output().expect("running kiln");
    let said = kiln_testkit::output_text(&out);
    if out.status.success() {
        Ok(())
    } else {
        Err(said.trim().to_string())
    }
}

/// Checks one block; Err says why it fails.
fn check(b: &Block) -> Result<&'static str, String> {
    match b.marker.as_deref() {
        Some(m) if m.starts_with("skip") => return Ok("skipped"),
        Some("reference") => {
            return toml::from_str::<NodeConfig>(&b.text).map(|_| "reference").map_err(|e| format!("not in the schema: {}", e.message().lines().next().unwrap_or("")));
        }
        Some(other) => return Err(format!("unknown marker `<!-- doc-test: {other} -->` (use `skip (why)` or `reference`)")),
        None => {}
    }
    let whole = b.text.lines().take_while(|l| !l.trim_start().starts_with('[')).any(|l| l.trim_start().starts_with("role ") || l.trim_start().starts_with("role="));
    if whole {
        kiln_config_check(b, &b.text).map(|()| "config")
    } else {
        kiln_config_check(b, &format!("role = \"single\"\n{}", b.text)).map(|()| "fragment").map_err(|e| format!("as a fragment merged into `role = \"single\"`: {e}"))
    }
}

#[test]
fn node_config_examples_pass_kiln_config_check() {
    let docs = workspace().join("docs");
    let mut blocks = toml_blocks(&docs.join("node-config.md"));
    let mut use_cases: Vec<PathBuf> = std::fs::read_dir(docs.join("use-cases")).map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "md")).collect()).unwrap_or_default();
    use_cases.sort();
    let top = node_top_level();
    for p in use_cases {
        blocks.extend(toml_blocks(&p).into_iter().filter(|b| b.marker.is_some() || top_level(&b.text).is_some_and(|keys| !keys.is_empty() && keys.iter().all(|k| top.contains(&k.as_str())))));
    }
    let mut failures = Vec::new();
    let mut seen = Vec::new();
    for b in &blocks {
        match check(b) {
            Ok(kind) => seen.push(format!("{}:{} {kind}", b.doc, b.line)),
            Err(e) => failures.push(format!("{}:{}: the ```toml block there fails: {e}\n{}", b.doc, b.line, b.text)),
        }
    }
    eprintln!("checked: {seen:#?}");
    assert!(failures.is_empty(), "{} doc example(s) fail (fix the example, or mark a block that is not a node config with `<!-- doc-test: skip (why) -->` on the line before its fence):\n\n{}", failures.len(), failures.join("\n\n"));
    assert!(seen.iter().filter(|s| s.ends_with(" config")).count() >= 2, "expected whole configs in docs/node-config.md: {seen:#?}");
}

/// Every path a TOML value defines: `a`, `a.b`, arrays of tables without
/// an index.
fn paths(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, x) in t {
                let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                out.push(p.clone());
                paths(&p, x, out);
            }
        }
        toml::Value::Array(a) => {
            for x in a {
                if x.is_table() {
                    paths(prefix, x, out);
                }
            }
        }
        _ => {}
    }
}

#[test]
fn node_config_md_documents_every_key() {
    let path = workspace().join("docs/node-config.md");
    let md = std::fs::read_to_string(&path).unwrap();
    let mut defined = Vec::new();
    for b in toml_blocks(&path).iter().filter(|b| !b.marker.as_deref().is_some_and(|m| m.starts_with("skip"))) {
        if let Ok(t) = toml::from_str::<toml::Table>(&b.text) {
            paths("", &toml::Value::Table(t), &mut defined);
        }
    }
    let missing: Vec<&str> = KEYS.iter().copied().filter(|k| !defined.iter().any(|d| d == k) && !md.contains(&format!("`{k}`"))).collect();
    assert!(
        missing.is_empty(),
        "docs/node-config.md does not document {missing:?}: define each in a ```toml example there, or name it in backticks with its full dotted name"
    );
}
