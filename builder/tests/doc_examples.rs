//! Every profile and node.toml example in README.md and docs/ (recursively;
//! docs/design/ excepted) is checked by the real `kiln profile check` or
//! `kiln config check`, one real-k0s profile example goes through a whole
//! `kiln build`, and docs/node-config.md documents every key of the schema.
//!
//! # Which ```toml block is what
//!
//! A marker on the line directly before the fence says what a block is:
//!
//! - `<!-- doc-test: node -->`: a node.toml. With a top-level `role =` it is
//!   a whole config and must pass `kiln config check` as it is; without one
//!   it is a fragment, checked merged into the minimal config
//!   `role = "single"` (so a fragment that needs another role must be
//!   written as a whole config).
//! - `<!-- doc-test: node reference -->`: a reference that lists node.toml
//!   keys side by side rather than a config one node would use: every key
//!   must be one the schema takes, with a value of the right type, but the
//!   values are not validated together.
//! - `<!-- doc-test: profile -->`: a whole profile (it has `extends` or
//!   `arch`), checked by `kiln profile check`.
//! - `<!-- doc-test: profile build -->`: a whole profile that is also built
//!   with `kiln build` (the one build of this test: exactly one block in all
//!   the docs, a real-k0s one).
//! - `<!-- doc-test: profile fragment of BASE -->`: a part of a profile
//!   (`[payload]`, `[sign]` …), checked as a profile in kiln's profiles/
//!   directory that is `extends = "<checkout>/BASE"` followed by the block,
//!   which is how profiles inherit (keys in the child win, tables merge).
//!   BASE is a path in this repository, e.g. `profiles/qemu-amd64.toml`.
//! - `<!-- doc-test: profile reference -->`: like `node reference`, for a
//!   profile: checked against the profile schema (what `kiln profile check`
//!   checks first, with the same library code), not as one image.
//! - `<!-- doc-test: skip (WHY) -->`: neither a profile nor a node.toml (a
//!   board overlay, an update manifest …). WHY is required. (A skip marker
//!   is also allowed, and redundant, above a fence of another language.)
//!
//! `profile`, `profile build` and `profile fragment of BASE` may end in
//! `with KILN_SIGNING_KEY`: kiln runs with a signing key (from `kiln key
//! generate`) in that variable, for an example whose text says the key
//! comes from the environment (an `update` output without `[sign]`).
//! Otherwise kiln runs with none of its variables (`KILN_SOURCE_DIR`,
//! `KILN_SIGNING_KEY`, `KILN_SECUREBOOT_KEY`, `KILN_NODE_BINARIES`).
//!
//! Without a marker: in docs/node-config.md every block is a node.toml.
//! Elsewhere a block whose top-level keys and tables are all node.toml ones
//! (`role`, `[network]`, `[storage]`, …) is a node.toml, and one with a
//! top-level `extends` or `arch` is a whole profile; anything else fails
//! and asks for a marker (a profile fragment must name its base). A marker
//! not directly above a ```toml fence fails too, and so does an untagged
//! fence (```) holding a profile or node.toml: tag it ```toml.
//!
//! # How a profile block is laid out
//!
//! Each block gets a temporary directory T holding `T/kiln`, a link to this
//! checkout, and `T/profiles/`, a copy of kiln's profiles/ made of links to
//! its files. The block is written to:
//!
//! - `T/<path>` when its first line is a comment naming it (`# vendor/appliance.toml`);
//! - else `T/vendor/` when it `extends = "../kiln/…"` (a vendor folder beside
//!   a kiln checkout, docs/use-cases/appliance.md);
//! - else `T/profiles/`, beside kiln's profiles (`extends = "qemu-amd64.toml"`).
//!   Fragments go there too, so `../keys/kiln.key` is `T/keys/kiln.key`.
//!
//! Before the check:
//!
//! - an input `url` on github.com cannot be fetched here: it is rewritten to
//!   a `file` input named after the URL's last part (a k0s or airgap bundle
//!   URL becomes `file = "k0s-v1.30.14+k0s.0-amd64"`, the name kept);
//! - every file the block names relative to the profile and that is not
//!   there is made as a placeholder of the right kind: a stand-in at the k0s
//!   path (a few bytes for `profile check`, which does not read it; the
//!   static stand-in payload binary of qemu-tests for the build), a node.toml
//!   (`role = "single"`), minisign keys (`kiln key generate`), a CA
//!   certificate, a Secure Boot db key, certificate and `.auth` files
//!   (openssl, sbsigntool), a directory of manifests, a Helm chart archive,
//!   bytes for anything else. Nothing is made outside T. Without openssl or
//!   sbsigntool (which kiln's Secure Boot check needs too) a block naming
//!   Secure Boot files is skipped, saying so; under CI that fails;
//! - a placeholder pin (`sha256 = "…"`, `"<from sha256sums.txt>"`) becomes the
//!   sha256 of the input's file, or, for a `deb` or `url` input, 64 zeros:
//!   `profile check` checks a pin's form, not the download.
//!
//! A block with a k0s payload must then say `payload: k0s … (sha256 <the
//! stand-in's>)`. A failure names the doc and the line of the fence, and
//! shows kiln's output and the file it checked.
//!
//! # Key coverage
//!
//! Each key in `kiln_contract::config::KEYS` (the list kept next to the
//! schema's structs, itself checked against them) must appear in
//! docs/node-config.md, either defined in one of its node.toml blocks (as a
//! key of a table, an array of tables or an inline table) or written out in
//! backticks as its full dotted name (`` `hostname.from` ``).

use kiln_contract::config::{NodeConfig, KEYS};
use std::path::{Path, PathBuf};
use std::process::Command;

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// kiln with none of its environment variables but `env`, so that only the
/// files count; (success, stdout and stderr).
fn kiln(args: &[&str], dir: &Path, env: &[(&str, String)]) -> (bool, String) {
    let mut c = Command::new(KILN);
    c.args(args).current_dir(dir);
    for v in ["KILN_SOURCE_DIR", "KILN_SIGNING_KEY", "KILN_NODE_BINARIES", "KILN_SECUREBOOT_KEY"] {
        c.env_remove(v);
    }
    c.envs(env.iter().map(|(k, v)| (k, v)));
    let out = c.output().expect("running kiln");
    (out.status.success(), kiln_testkit::output_text(&out).trim().to_string())
}

fn sha256_hex(bytes: &[u8]) -> String {
    kiln_contract::digest::hex(&<sha2::Sha256 as sha2::Digest>::digest(bytes))
}

#[derive(Debug, Clone)]
struct Block {
    doc: String,
    /// 1-based line of the opening fence.
    line: usize,
    /// What follows the opening ```: `toml`, `sh`, or nothing.
    lang: String,
    marker: Option<String>,
    text: String,
}

impl Block {
    fn at(&self) -> String {
        format!("{}:{}", self.doc, self.line)
    }
}

/// README.md and the Markdown files under docs/, but not docs/design/.
fn markdown_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                if p != workspace().join("docs/design") {
                    walk(&p, out);
                }
            } else if p.extension().is_some_and(|x| x == "md") {
                out.push(p);
            }
        }
    }
    let mut out = vec![workspace().join("README.md")];
    walk(&workspace().join("docs"), &mut out);
    out.sort();
    out
}

/// The fenced blocks of a Markdown file, and the markers that are not
/// directly above a ```toml fence (as failures).
fn fences(path: &Path) -> (Vec<Block>, Vec<String>) {
    let md = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc = path.strip_prefix(workspace()).unwrap_or(path).display().to_string();
    let lines: Vec<&str> = md.lines().collect();
    let marker_of = |l: &str| l.trim().strip_prefix("<!-- doc-test:").and_then(|l| l.strip_suffix("-->")).map(|m| m.trim().to_string());
    let mut out = Vec::new();
    let mut stray = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let fence = lines[i].trim_start();
        if let Some(lang) = fence.strip_prefix("```") {
            let indent = lines[i].len() - fence.len();
            let lang = lang.trim().to_string();
            let marker = i.checked_sub(1).and_then(|p| marker_of(lines[p]));
            if marker.as_deref().is_some_and(|m| !m.starts_with("skip")) && lang != "toml" {
                stray.push(format!("{doc}:{i}: a doc-test marker above a ```{lang} fence; markers other than `skip (why)` are for ```toml blocks"));
            }
            let mut text = String::new();
            let mut j = i + 1;
            while j < lines.len() && !lines[j].trim_start().starts_with("```") {
                text.push_str(lines[j].get(indent..).unwrap_or(lines[j].trim_start()));
                text.push('\n');
                j += 1;
            }
            out.push(Block { doc: doc.clone(), line: i + 1, lang, marker, text });
            i = j + 1;
            continue;
        }
        if marker_of(lines[i]).is_some() && !lines.get(i + 1).is_some_and(|n| n.trim_start().starts_with("```")) {
            stray.push(format!("{doc}:{}: a doc-test marker that is not on the line directly before a ```toml fence", i + 1));
        }
        i += 1;
    }
    (out, stray)
}

/// The ```toml blocks of a Markdown file.
fn toml_blocks(path: &Path) -> Vec<Block> {
    fences(path).0.into_iter().filter(|b| b.lang == "toml").collect()
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

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Skip(String),
    Node,
    NodeReference,
    Profile(ProfileKind),
    ProfileReference,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct ProfileKind {
    /// A fragment: the profile it is merged into (a path in the checkout).
    base: Option<String>,
    /// Also built (the one build).
    build: bool,
    /// Checked with a signing key in `KILN_SIGNING_KEY`.
    key_env: bool,
}

const GRAMMAR: &str = "`skip (why)`, `node`, `node reference`, `profile`, `profile build`, `profile reference` or `profile fragment of profiles/<base>.toml`, a profile kind optionally followed by `with KILN_SIGNING_KEY`";

fn parse_marker(m: &str) -> Result<Kind, String> {
    if let Some(rest) = m.strip_prefix("skip") {
        return match rest.trim().strip_prefix('(').and_then(|r| r.strip_suffix(')')).map(str::trim) {
            Some(why) if !why.is_empty() => Ok(Kind::Skip(why.to_string())),
            _ => Err(format!("`<!-- doc-test: {m} -->` must say why the block is skipped: `<!-- doc-test: skip (a board overlay) -->`")),
        };
    }
    let (kind, key_env) = match m.strip_suffix(" with KILN_SIGNING_KEY") {
        Some(k) => (k.trim(), true),
        None => (m, false),
    };
    let profile = |base: Option<&str>, build| Ok(Kind::Profile(ProfileKind { base: base.map(str::to_string), build, key_env }));
    match kind {
        "node" if !key_env => Ok(Kind::Node),
        "node reference" if !key_env => Ok(Kind::NodeReference),
        "profile reference" if !key_env => Ok(Kind::ProfileReference),
        "profile" => profile(None, false),
        "profile build" => profile(None, true),
        _ => match kind.strip_prefix("profile fragment of ").map(str::trim) {
            Some(base) if !base.is_empty() => profile(Some(base), false),
            _ => Err(format!("unknown marker `<!-- doc-test: {m} -->` (use {GRAMMAR})")),
        },
    }
}

/// Whether a profile text is a whole one: a top-level `extends` or `arch`.
fn is_whole_profile(text: &str) -> bool {
    top_level(text).is_some_and(|k| k.iter().any(|k| k == "extends" || k == "arch"))
}

/// What a block is; Err when it does not say and cannot be told.
fn classify(b: &Block) -> Result<Kind, String> {
    if b.lang != "toml" {
        // An untagged fence holding a profile or a node.toml would escape
        // the checks.
        let node = top_level(&b.text).is_some_and(|keys| !keys.is_empty() && keys.iter().all(|k| node_top_level().contains(&k.as_str())));
        let profile = top_level(&b.text).is_some_and(|keys| !keys.is_empty()) && kiln::profile::parse_str(Path::new("block"), &b.text).is_ok();
        return if b.lang.is_empty() && (node || profile) {
            Err("this untagged fence holds a profile or a node.toml: make it ```toml so that it is checked".into())
        } else {
            Ok(Kind::Skip(format!("```{}", b.lang)))
        };
    }
    if let Some(m) = &b.marker {
        let kind = parse_marker(m)?;
        if matches!(&kind, Kind::Profile(p) if p.base.is_none()) && !is_whole_profile(&b.text) {
            return Err(format!("marked `{m}`, but a whole profile has a top-level `extends` or `arch`; mark a part of one `profile fragment of profiles/<base>.toml`"));
        }
        return Ok(kind);
    }
    if b.doc == "docs/node-config.md" {
        return Ok(Kind::Node);
    }
    let Some(keys) = top_level(&b.text) else {
        return Err(format!("not TOML: {}", toml::from_str::<toml::Table>(&b.text).unwrap_err().message()));
    };
    let node = node_top_level();
    if !keys.is_empty() && keys.iter().all(|k| node.contains(&k.as_str())) {
        Ok(Kind::Node)
    } else if is_whole_profile(&b.text) {
        Ok(Kind::Profile(ProfileKind::default()))
    } else {
        Err(format!("neither a node.toml nor a whole profile (top-level {keys:?}): say what it is with a marker on the line before the fence, {GRAMMAR}"))
    }
}

// ---- node.toml ----

fn kiln_config_check(b: &Block, text: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{}-line{}.toml", b.doc.replace('/', "_"), b.line));
    std::fs::write(&file, text).unwrap();
    let (ok, said) = kiln(&["config", "check", file.to_str().unwrap()], dir.path(), &[]);
    if ok {
        Ok(())
    } else {
        Err(said)
    }
}

fn check_node(b: &Block) -> Result<String, String> {
    let whole = b.text.lines().take_while(|l| !l.trim_start().starts_with('[')).any(|l| l.trim_start().starts_with("role ") || l.trim_start().starts_with("role="));
    if whole {
        kiln_config_check(b, &b.text).map(|()| "node config".into()).map_err(|e| format!("`kiln config check` says:\n{e}"))
    } else {
        kiln_config_check(b, &format!("role = \"single\"\n{}", b.text)).map(|()| "node fragment".into()).map_err(|e| format!("as a fragment merged into `role = \"single\"`, `kiln config check` says:\n{e}"))
    }
}

// ---- profiles ----

/// What stands at the k0s path.
#[derive(Clone, Copy)]
enum StandIn<'a> {
    /// A few bytes: `kiln profile check` does not read the k0s file.
    Bytes,
    /// A static executable for the profile's arch, for `kiln build`.
    Binary(&'a Path),
}

/// A profile block written out for kiln, with what it needs around it.
struct Laid {
    dir: tempfile::TempDir,
    file: PathBuf,
    /// The text kiln gets (rewritten URLs, pins, the `extends` of a fragment).
    text: String,
    /// The sha256 of the stand-in at the k0s path, when the block names k0s.
    k0s: Option<String>,
    /// The environment kiln runs in (`with KILN_SIGNING_KEY`).
    env: Vec<(&'static str, String)>,
}

/// `url = "https://github.com/…/NAME"` becomes `file = "NAME"`: nothing can
/// be fetched from github.com here.
fn rewrite_github_urls(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let mut l = line.to_string();
        while let Some(start) = l.find("url = \"https://github.com/") {
            let v = start + "url = \"".len();
            let Some(len) = l[v..].find('"') else { break };
            let url = &l[v..v + len];
            let name = percent_decode(url.rsplit('/').next().unwrap_or(url));
            l = format!("{}file = \"{name}\"{}", &l[..start], &l[v + len + 1..]);
        }
        out.push_str(&l);
        out.push('\n');
    }
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if let Some(x) = (b[i] == b'%').then(|| s.get(i + 1..i + 3)).flatten().and_then(|h| u8::from_str_radix(h, 16).ok()) {
            out.push(x);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A pin that stands for one (`…`, `<from sha256sums.txt>`), not a typo'd one.
fn is_placeholder_pin(s: &str) -> bool {
    s.len() != 64 && (s.contains('…') || (s.starts_with('<') && s.ends_with('>')))
}

/// Makes `path` with `bytes` unless something is there; never outside
/// `root` (the test's directory), nor through a link into the checkout.
fn put(root: &Path, path: &Path, bytes: &[u8]) -> Result<(), String> {
    if path.symlink_metadata().is_ok() {
        return Ok(());
    }
    let existing = path.ancestors().skip(1).find(|a| a.exists()).and_then(|a| a.canonicalize().ok());
    let root = root.canonicalize().unwrap();
    if !existing.is_some_and(|a| a.starts_with(&root)) {
        return Err(format!("the example names {}, which is not there and is outside the example's own folder: not making a placeholder there", path.display()));
    }
    std::fs::create_dir_all(path.parent().unwrap()).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
}

fn str_at<'a>(t: &'a toml::Table, path: &[&str]) -> Option<&'a str> {
    let (last, tables) = path.split_last()?;
    let mut t = t;
    for k in tables {
        t = t.get(*k)?.as_table()?;
    }
    t.get(*last)?.as_str()
}

fn tables_at<'a>(t: &'a toml::Table, table: &str, array: &str) -> Vec<&'a toml::Table> {
    t.get(table).and_then(|v| v.as_table()).and_then(|t| t.get(array)).and_then(|v| v.as_array()).map(|a| a.iter().filter_map(|v| v.as_table()).collect()).unwrap_or_default()
}

/// Every table with a `file` and a `sha256` (a pinned input), anywhere.
fn file_inputs(v: &toml::Value, out: &mut Vec<String>) {
    match v {
        toml::Value::Table(t) => {
            if let (Some(f), true) = (t.get("file").and_then(|f| f.as_str()), t.contains_key("sha256")) {
                out.push(f.to_string());
            }
            t.values().for_each(|x| file_inputs(x, out));
        }
        toml::Value::Array(a) => a.iter().for_each(|x| file_inputs(x, out)),
        _ => {}
    }
}

/// Runs a tool, Err with what it said.
fn run(c: &mut Command) -> Result<(), String> {
    let o = c.output().map_err(|e| format!("{c:?}: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!("{c:?}: {}", kiln_testkit::output_text(&o)))
    }
}

/// A minisign key pair (`kiln key generate`), made once per example.
fn minisign_keys(root: &Path) -> Result<PathBuf, String> {
    let d = root.join(".doc-test/minisign");
    if !d.join("kiln.key").is_file() {
        std::fs::create_dir_all(&d).unwrap();
        let (ok, said) = kiln(&["key", "generate", "--dir", d.to_str().unwrap()], root, &[]);
        if !ok {
            return Err(format!("kiln key generate: {said}"));
        }
    }
    Ok(d)
}

/// A Secure Boot db key, its certificate and PK/KEK/db `.auth` files, made
/// as docs/profiles.md says; None (a skip) without openssl and sbsigntool.
fn secureboot_files(root: &Path) -> Result<Option<PathBuf>, String> {
    let d = root.join(".doc-test/secureboot");
    if d.join("db.auth").is_file() {
        return Ok(Some(d));
    }
    let (Some(openssl), Some(siglist), Some(varsign)) = (kiln_testkit::checker("openssl", "openssl"), kiln_testkit::checker("sbsiglist", "sbsigntool"), kiln_testkit::checker("sbvarsign", "sbsigntool")) else {
        return Ok(None);
    };
    std::fs::create_dir_all(&d).unwrap();
    let p = |n: &str| d.join(n);
    run(Command::new(&openssl).args(["req", "-x509", "-nodes", "-subj", "/CN=kiln doc test db/", "-days", "3650", "-newkey", "rsa:2048", "-keyout"]).arg(p("db.key")).arg("-out").arg(p("db.pem")))?;
    run(Command::new(&openssl).args(["x509", "-outform", "der", "-in"]).arg(p("db.pem")).arg("-out").arg(p("db.der")))?;
    run(Command::new(&siglist).args(["--owner", "11111111-2222-3333-4444-555555555555", "--type", "x509", "--output"]).arg(p("db.esl")).arg(p("db.der")))?;
    for var in ["PK", "KEK", "db"] {
        run(Command::new(&varsign).arg("--key").arg(p("db.key")).arg("--cert").arg(p("db.pem")).arg("--output").arg(p(&format!("{var}.auth"))).arg(var).arg(p("db.esl")))?;
    }
    Ok(Some(d))
}

/// A `helm package` archive: `<name>/Chart.yaml`.
fn chart_archive(name: &str, version: &str) -> Vec<u8> {
    let yaml = format!("apiVersion: v2\nname: {name}\nversion: {version}\ntype: application\n");
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    let mut h = tar::Header::new_gnu();
    h.set_size(yaml.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, format!("{name}/Chart.yaml"), yaml.as_bytes()).unwrap();
    tar.into_inner().unwrap().finish().unwrap()
}

/// Makes the files a profile names relative to `dir` that are not there.
/// Ok(false): a tool to make one is missing (the block is skipped).
fn placeholders(t: &toml::Table, root: &Path, dir: &Path, standin: StandIn) -> Result<bool, String> {
    let at = |rel: &str| dir.join(rel);
    if let Some(f) = str_at(t, &["payload", "k0s", "file"]) {
        match standin {
            StandIn::Bytes => put(root, &at(f), b"kiln doc test: a stand-in at the k0s path (kiln profile check does not read it)\n")?,
            StandIn::Binary(bin) => put(root, &at(f), &std::fs::read(bin).unwrap())?,
        }
    }
    if let Some(f) = str_at(t, &["node", "config"]) {
        put(root, &at(f), b"role = \"single\"\n")?;
    }
    for (key, file) in [(["node", "config_key"], "kiln.pub"), (["sign", "key"], "kiln.key")] {
        if let Some(f) = str_at(t, &key).filter(|f| at(f).symlink_metadata().is_err()) {
            put(root, &at(f), &std::fs::read(minisign_keys(root)?.join(file)).unwrap())?;
        }
    }
    for f in t.get("node").and_then(|n| n.get("trust")).and_then(|v| v.as_array()).into_iter().flatten().filter_map(|v| v.as_str()) {
        put(root, &at(f), &std::fs::read(workspace().join("init/tests/data/tls/ca.pem")).unwrap())?;
    }
    let sb: [(&[&str], &str); 5] = [(&["secureboot", "key"], "db.key"), (&["secureboot", "cert"], "db.pem"), (&["secureboot", "enroll", "pk"], "PK.auth"), (&["secureboot", "enroll", "kek"], "KEK.auth"), (&["secureboot", "enroll", "db"], "db.auth")];
    for (key, file) in sb {
        if let Some(f) = str_at(t, key).filter(|f| at(f).symlink_metadata().is_err()) {
            let Some(d) = secureboot_files(root)? else { return Ok(false) };
            put(root, &at(f), &std::fs::read(d.join(file)).unwrap())?;
        }
    }
    for m in tables_at(t, "appliance", "manifests") {
        if let Some(p) = m.get("path").and_then(|v| v.as_str()) {
            let yaml = b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: kiln-doc-test\n  namespace: default\n";
            if p.ends_with(".yaml") {
                put(root, &at(p), yaml)?;
            } else {
                put(root, &at(p).join("10-placeholder.yaml"), yaml)?;
            }
        }
    }
    for c in tables_at(t, "appliance", "charts") {
        let name = c.get("name").and_then(|v| v.as_str()).unwrap_or("chart");
        if let Some(f) = c.get("chart").and_then(|v| v.get("file")).and_then(|v| v.as_str()) {
            let from_name = Path::new(f).file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix(&format!("{name}-"))).and_then(|n| n.strip_suffix(".tgz"));
            let version = c.get("version").and_then(|v| v.as_str()).or(from_name).unwrap_or("0.1.0");
            put(root, &at(f), &chart_archive(name, version))?;
        }
        if let Some(f) = c.get("values_file").and_then(|v| v.as_str()) {
            put(root, &at(f), b"{}\n")?;
        }
    }
    let mut files = Vec::new();
    file_inputs(&toml::Value::Table(t.clone()), &mut files);
    for f in files {
        put(root, &at(&f), format!("kiln doc test: a placeholder for {f}\n").as_bytes())?;
    }
    Ok(true)
}

/// The `file` of the input a placeholder pin on line `i` belongs to: in the
/// inline table on that line, or in the line's table (`[[rootfs.packages]]`).
fn pinned_file(lines: &[&str], i: usize, nth: usize) -> Option<String> {
    let line = lines[i];
    if let Ok(t) = toml::from_str::<toml::Table>(line) {
        let mut inputs = Vec::new();
        fn walk(v: &toml::Value, out: &mut Vec<Option<String>>) {
            match v {
                toml::Value::Table(t) => {
                    if t.get("sha256").and_then(|s| s.as_str()).is_some_and(is_placeholder_pin) {
                        out.push(t.get("file").and_then(|f| f.as_str()).map(str::to_string));
                    }
                    t.values().for_each(|x| walk(x, out));
                }
                toml::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
                _ => {}
            }
        }
        // The line's own keys are not an input; its inline tables may be.
        t.values().for_each(|v| walk(v, &mut inputs));
        if !inputs.is_empty() {
            return inputs.get(nth).cloned().flatten();
        }
        // `sha256 = "…"` on its own: a key of the table the line is in.
        if t.contains_key("sha256") {
            let header = |l: &&str| l.trim_start().starts_with('[');
            let start = lines[..i].iter().rposition(header).map_or(0, |h| h + 1);
            let end = lines[i..].iter().position(header).map_or(lines.len(), |n| i + n);
            return lines[start..end].iter().filter_map(|l| toml::from_str::<toml::Table>(l).ok()).find_map(|t| t.get("file").and_then(|f| f.as_str()).map(str::to_string));
        }
    }
    None
}

/// Replaces every placeholder pin with the sha256 of its input's file (64
/// zeros for a `deb` or `url` input).
fn pin_placeholders(text: &str, dir: &Path) -> Result<String, String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        let mut l = String::new();
        let mut rest = *line;
        let mut nth = 0;
        while let Some(k) = rest.find("sha256") {
            let after = &rest[k + "sha256".len()..];
            let value = after.trim_start().strip_prefix('=').map(str::trim_start).and_then(|v| v.strip_prefix('"')).and_then(|v| v.find('"').map(|e| &v[..e]));
            match value.filter(|v| is_placeholder_pin(v)) {
                Some(v) => {
                    let pin = match pinned_file(&lines, i, nth) {
                        Some(f) => sha256_hex(&std::fs::read(dir.join(&f)).map_err(|e| format!("{}: {e}", dir.join(&f).display()))?),
                        None => "0".repeat(64),
                    };
                    let vstart = k + rest[k..].find(&format!("\"{v}\"")).unwrap() + 1;
                    l.push_str(&rest[..vstart]);
                    l.push_str(&pin);
                    rest = &rest[vstart + v.len()..];
                    nth += 1;
                }
                None => {
                    l.push_str(&rest[..k + "sha256".len()]);
                    rest = &rest[k + "sha256".len()..];
                }
            }
        }
        l.push_str(rest);
        out.push_str(&l);
        out.push('\n');
    }
    Ok(out)
}

fn link(from: &Path, to: &Path) {
    std::os::unix::fs::symlink(from, to).unwrap_or_else(|e| panic!("{} -> {}: {e}", to.display(), from.display()));
}

/// Writes a profile block (a fragment after its `extends`) into a new
/// directory laid out as the docs describe, with its placeholders.
/// Ok(None): a tool to make a placeholder is missing.
fn lay_out(b: &Block, kind: &ProfileKind, standin: StandIn) -> Result<Option<Laid>, String> {
    let d = tempfile::Builder::new().prefix("kiln-doc-test.").tempdir().unwrap();
    let root = d.path();
    link(&workspace(), &root.join("kiln"));
    // kiln's profiles/, file by file, so that placeholders never land in the checkout.
    for sub in ["profiles", "profiles/nodes"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
        for e in std::fs::read_dir(workspace().join(sub)).unwrap().flatten() {
            if e.path().is_file() {
                link(&e.path(), &root.join(sub).join(e.file_name()));
            }
        }
    }
    let stem = format!("{}-line{}", b.doc.replace('/', "_").trim_end_matches(".md"), b.line);
    let mut text = rewrite_github_urls(&b.text);
    let named = text.lines().next().and_then(|l| l.strip_prefix('#')).map(str::trim).filter(|p| p.ends_with(".toml") && !p.contains(' ') && !p.starts_with('/') && !p.split('/').any(|c| c == ".." || c == "kiln"));
    let file = match &kind.base {
        Some(base) => {
            text = format!("extends = \"{}\"\n{text}", workspace().join(base).display());
            root.join("profiles").join(format!("{stem}.toml"))
        }
        None => match named {
            Some(p) => root.join(p),
            None if str_at(&toml::from_str(&text).unwrap_or_default(), &["extends"]).is_some_and(|e| e.starts_with("../kiln/")) => root.join("vendor").join(format!("{stem}.toml")),
            None => root.join("profiles").join(format!("{stem}.toml")),
        },
    };
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let dir = file.parent().unwrap();
    let t: toml::Table = toml::from_str(&text).map_err(|e| format!("not TOML: {}", e.message()))?;
    if !placeholders(&t, root, dir, standin)? {
        return Ok(None);
    }
    let k0s = str_at(&t, &["payload", "k0s", "file"]).map(|f| sha256_hex(&std::fs::read(dir.join(f)).unwrap()));
    let text = pin_placeholders(&text, dir)?;
    std::fs::write(&file, &text).unwrap();
    let mut env = Vec::new();
    if kind.key_env {
        env.push(("KILN_SIGNING_KEY", std::fs::read_to_string(minisign_keys(root)?.join("kiln.key")).unwrap()));
    }
    Ok(Some(Laid { dir: d, file, text, k0s, env }))
}

fn numbered(text: &str) -> String {
    text.lines().enumerate().map(|(n, l)| format!("{:>4} | {l}\n", n + 1)).collect()
}

fn check_profile(b: &Block, kind: &ProfileKind) -> Result<String, String> {
    let what = match &kind.base {
        Some(base) => format!("profile fragment of {base}"),
        None => "profile".into(),
    };
    let Some(laid) = lay_out(b, kind, StandIn::Bytes)? else {
        return Ok(format!("skipped ({what}: a tool to make its placeholder files is missing)"));
    };
    let shown = laid.file.strip_prefix(laid.dir.path()).unwrap_or(&laid.file).display().to_string();
    let (ok, said) = kiln(&["profile", "check", &shown], laid.dir.path(), &laid.env);
    let context = || {
        let shift = if kind.base.is_some() { " (line 1 is the `extends` of its base, line N+1 is line N of the block)" } else { "" };
        format!("as a {what}, `kiln profile check {shown}` says:\n{said}\n\n{shown}{shift}:\n{}", numbered(&laid.text))
    };
    if !ok {
        return Err(context());
    }
    if let Some(sha) = &laid.k0s {
        if !said.contains("payload: k0s ") || !said.contains(&format!("(sha256 {sha})")) {
            return Err(format!("it names k0s, but the check does not say `payload: k0s … (sha256 {sha})` (the stand-in at the k0s path); {}", context()));
        }
        return Ok(format!("{what}, payload k0s"));
    }
    Ok(what)
}

/// The schema check `kiln profile check` makes of each file first.
fn check_profile_reference(b: &Block) -> Result<String, String> {
    kiln::profile::parse_str(Path::new("block"), &b.text).map(|_| "profile reference".to_string()).map_err(|e| format!("not in the profile schema: {e}"))
}

/// Checks one block; Err names the doc and the line of its fence and says
/// why it fails.
fn check(b: &Block) -> Result<String, String> {
    let kind = classify(b);
    let res = match &kind {
        Err(e) => Err(e.clone()),
        Ok(Kind::Skip(why)) => Ok(format!("skipped ({why})")),
        Ok(Kind::Node) => check_node(b),
        Ok(Kind::NodeReference) => toml::from_str::<NodeConfig>(&b.text).map(|_| "node reference".into()).map_err(|e| format!("not in the node.toml schema: {}", e.message().lines().next().unwrap_or(""))),
        Ok(Kind::ProfileReference) => check_profile_reference(b),
        Ok(Kind::Profile(k)) => check_profile(b, k),
    };
    res.map_err(|e| format!("{}: the ```{} block there fails: {e}\n\nthe block:\n{}", b.at(), b.lang, numbered(&b.text)))
}

/// Every fenced block of the docs, and the stray markers.
fn all_blocks() -> (Vec<Block>, Vec<String>) {
    let mut blocks = Vec::new();
    let mut stray = Vec::new();
    for p in markdown_files() {
        let (b, s) = fences(&p);
        blocks.extend(b);
        stray.extend(s);
    }
    (blocks, stray)
}

#[test]
fn doc_examples_pass_kiln_profile_check_and_kiln_config_check() {
    let t = std::time::Instant::now();
    let (blocks, stray) = all_blocks();
    let mut failures = stray;
    let mut seen = Vec::new();
    for b in &blocks {
        match check(b) {
            Ok(kind) if b.lang == "toml" => seen.push(format!("{} {kind}", b.at())),
            Ok(_) => {}
            Err(e) => failures.push(e),
        }
    }
    eprintln!("checked in {:.1}s: {seen:#?}", t.elapsed().as_secs_f64());
    assert!(
        failures.is_empty(),
        "{} doc example(s) fail (fix the example, or say what a block is with a marker on the line before its fence, see the header of builder/tests/doc_examples.rs):\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    let count = |s: &str| seen.iter().filter(|x| x.contains(s)).count();
    assert!(seen.iter().filter(|s| s.starts_with("docs/node-config.md") && s.ends_with(" node config")).count() >= 2, "expected whole configs in docs/node-config.md: {seen:#?}");
    assert!(count(" profile fragment of ") >= 3 && count(" profile,") + seen.iter().filter(|s| s.ends_with(" profile")).count() >= 2, "expected whole profiles and fragments: {seen:#?}");
    assert!(count("payload k0s") >= 2, "expected real-k0s profile examples checked against the stand-in: {seen:#?}");
}

/// The one block marked `profile build` (a real-k0s profile, the vendor
/// appliance of docs/use-cases/appliance.md) builds, as the docs have it
/// but with a stand-in binary at the k0s path, and says its payload is k0s.
#[test]
fn the_real_k0s_doc_example_builds() {
    let (blocks, _) = all_blocks();
    let marked: Vec<&Block> = blocks.iter().filter(|b| b.lang == "toml" && b.marker.as_deref() == Some("profile build")).collect();
    assert!(marked.len() == 1, "exactly one block in the docs must be marked `<!-- doc-test: profile build -->` (builds cost time): {:?}", marked.iter().map(|b| b.at()).collect::<Vec<_>>());
    let b = marked[0];
    let Ok(Kind::Profile(kind)) = classify(b) else { panic!("{}: `profile build` is for a whole profile", b.at()) };
    // Which arch the stand-in is built for: the profile's, laid out once to see it.
    let first = lay_out(b, &kind, StandIn::Bytes).unwrap_or_else(|e| panic!("{}: {e}", b.at())).expect("placeholders");
    let arch = kiln::profile::load(&first.file).unwrap_or_else(|e| panic!("{}: {e}", b.at())).arch;
    // A static executable to stand at the k0s path: the stand-in payload.
    let bin = kiln::inputs::init::cargo_build(&workspace(), "kiln-qemu-tests", "k0s", arch).unwrap();
    let laid = lay_out(b, &kind, StandIn::Binary(&bin)).unwrap_or_else(|e| panic!("{}: {e}", b.at())).expect("placeholders");
    let sha = laid.k0s.clone().unwrap_or_else(|| panic!("{}: the example built must name real k0s", b.at()));
    let out = laid.dir.path().join("out");
    let t = std::time::Instant::now();
    let (ok, log) = kiln(&["build", laid.file.to_str().unwrap(), "--out", out.to_str().unwrap()], laid.dir.path(), &laid.env);
    eprintln!("{}: kiln build took {:.1}s", b.at(), t.elapsed().as_secs_f64());
    assert!(ok, "{}: `kiln build` of the ```toml block there fails:\n{log}\n\n{}:\n{}", b.at(), laid.file.display(), numbered(&laid.text));
    assert!(log.contains("payload: k0s ") && log.contains(&format!("(sha256 {sha})")), "{}: the build does not say `payload: k0s … (sha256 {sha})`:\n{log}", b.at());
}

/// A broken example fails, naming the doc and the line, with kiln's words.
#[test]
fn broken_examples_fail_naming_the_doc_and_line() {
    let block = |marker: Option<&str>, text: &str| Block { doc: "docs/broken.md".into(), line: 42, lang: "toml".into(), marker: marker.map(str::to_string), text: text.into() };
    let fails = |b: Block, said: &str| {
        let e = check(&b).err().unwrap_or_else(|| panic!("{} should fail: {said}", b.text));
        assert!(e.starts_with("docs/broken.md:42: ") && e.contains(said), "{e}");
        e
    };
    // A misspelled key in a whole profile: kiln's error, file, line and key.
    let e = fails(block(None, "extends = \"qemu-amd64.toml\"\nname = \"broken\"\n\n[payload]\nk0s = { url = \"https://github.com/k0sproject/k0s/releases/download/v1.30.14%2Bk0s.0/k0s-v1.30.14+k0s.0-amd64\", sha256 = \"…\" }\nvesion = \"v1.30.14+k0s.0\"\n"), "key `vesion`");
    assert!(e.contains("kiln profile check") && e.contains(":6:"), "{e}");
    // The same in a fragment.
    fails(block(Some("profile fragment of profiles/qemu-amd64.toml"), "[payload]\nk0s = { file = \"k0s\", sha256 = \"…\" }\nvesion = \"v1\"\n"), "key `vesion`");
    // A fragment whose base, or whose kernel fragment file, is missing.
    fails(block(Some("profile fragment of profiles/no-such.toml"), "[qemu]\ncpus = 4\n"), "does not exist");
    fails(block(Some("profile fragment of profiles/qemu-amd64.toml"), "[kernel]\nfragments = [\"amd64/no-such.config\"]\n"), "no-such.config does not exist");
    // A profile that does not say what it is, or says it badly.
    fails(block(None, "[qemu]\ncpus = 4\n"), "profile fragment of profiles/<base>.toml");
    fails(block(Some("skip"), "[qemu]\ncpus = 4\n"), "must say why");
    fails(block(Some("profile"), "[qemu]\ncpus = 4\n"), "a whole profile has");
    fails(block(Some("profile reference"), "[payload]\nk0ss = \"x\"\n"), "k0ss");
    // node.toml, whole and fragment.
    fails(block(None, "role = \"captain\"\n"), "kiln config check");
    fails(block(Some("node"), "[storage]\nvar_disk = 5\n"), "var_disk");
    // An untagged fence holding a profile.
    let mut b = block(None, "extends = \"base.toml\"\nname = \"x\"\n");
    b.lang = String::new();
    fails(b, "make it ```toml");
    // An update output needs a key: from [sign], or the environment when the
    // marker says so.
    let update = "extends = \"qemu-amd64.toml\"\nversion = \"1.0.0\"\noutputs = [\"disk\", \"update\"]\n";
    fails(block(Some("profile"), update), "needs a signing key");
    assert_eq!(check(&block(Some("profile with KILN_SIGNING_KEY"), update)).as_deref(), Ok("profile"));
    fails(block(Some("node with KILN_SIGNING_KEY"), "role = \"single\"\n"), "unknown marker");
    // And a good one passes, with the k0s stand-in.
    let ok = check(&block(Some("profile fragment of profiles/qemu-amd64.toml"), "[payload]\nk0s = { url = \"https://github.com/k0sproject/k0s/releases/download/v1.30.14%2Bk0s.0/k0s-v1.30.14+k0s.0-amd64\", sha256 = \"<from sha256sums.txt>\" }\nversion = \"v1.30.14+k0s.0\"\n"));
    assert_eq!(ok.as_deref(), Ok("profile fragment of profiles/qemu-amd64.toml, payload k0s"));
}

#[test]
fn placeholder_pins_take_their_files_sha256() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("a"), b"a").unwrap();
    std::fs::write(d.path().join("b"), b"b").unwrap();
    let text = "x = { file = \"a\", sha256 = \"…\" }  # sha256 of a\ny = [{ deb = \"d\", sha256 = \"…\" }, { file = \"b\", sha256 = \"<sha256sum b>\" }]\nkeep = { file = \"a\", sha256 = \"abc\" }\n[[t]]\nsha256 = \"…\"\nfile = \"b\"\n";
    let got = pin_placeholders(text, d.path()).unwrap();
    let (a, b, z) = (sha256_hex(b"a"), sha256_hex(b"b"), "0".repeat(64));
    assert_eq!(got, format!("x = {{ file = \"a\", sha256 = \"{a}\" }}  # sha256 of a\ny = [{{ deb = \"d\", sha256 = \"{z}\" }}, {{ file = \"b\", sha256 = \"{b}\" }}]\nkeep = {{ file = \"a\", sha256 = \"abc\" }}\n[[t]]\nsha256 = \"{b}\"\nfile = \"b\"\n"));
    assert_eq!(
        rewrite_github_urls("k0s = { url = \"https://github.com/k0sproject/k0s/releases/download/v1.30.14%2Bk0s.0/k0s-v1.30.14+k0s.0-amd64\", sha256 = \"…\" }\n"),
        "k0s = { file = \"k0s-v1.30.14+k0s.0-amd64\", sha256 = \"…\" }\n"
    );
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
    for b in toml_blocks(&path).iter().filter(|b| matches!(classify(b), Ok(Kind::Node | Kind::NodeReference))) {
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
