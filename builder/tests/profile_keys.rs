//! docs/profiles.md documents every key a profile takes.
//!
//! The keys are read off the profile reader itself: each table is probed
//! with an unknown key, and the reader's refusal lists the table's fields
//! ("unknown field `zzz`, expected one of `a`, `b`"), so a key added to the
//! schema is found without a list kept by hand. A key counts as documented
//! when docs/profiles.md defines it in a ```toml block (as a key of a table,
//! an array of tables or an inline table, or in a commented-out line that
//! is TOML by itself) or writes its dotted name out in backticks
//! (`` `pxe.server` ``). The fields of inputs (`file`, `url`, `deb`, …, the
//! same under every input key) are documented once, as keys of any inline
//! table.

use std::collections::BTreeSet;
use std::path::Path;

const PROBE: &str = "zzz_not_a_key";

/// The fields the reader expects at `path` (dotted), if it is a table (or
/// an array of tables) there.
fn fields_at(path: &str) -> Option<Vec<String>> {
    let probes = if path.is_empty() {
        vec![format!("{PROBE} = 1\n")]
    } else {
        vec![format!("{path} = {{ {PROBE} = 1 }}\n"), format!("{path} = [{{ {PROBE} = 1 }}]\n")]
    };
    for text in probes {
        let Err(e) = kiln::profile::parse_str(Path::new("probe.toml"), &text) else { continue };
        let msg = e.to_string();
        let Some(at) = msg.find(&format!("unknown field `{PROBE}`")) else { continue };
        let rest = &msg[at..];
        let Some(exp) = rest.find("expected") else { return Some(Vec::new()) };
        let names: Vec<String> = rest[exp..].split('`').skip(1).step_by(2).map(str::to_string).collect();
        return Some(names);
    }
    None
}

/// Every key path of the schema (dotted), to `depth` levels.
fn schema() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut todo = vec![(String::new(), 0)];
    while let Some((path, depth)) = todo.pop() {
        let Some(fields) = fields_at(&path) else { continue };
        for f in fields {
            let key = if f.contains('-') { format!("\"{f}\"") } else { f.clone() };
            let p = if path.is_empty() { key } else { format!("{path}.{key}") };
            if depth < 3 {
                todo.push((p.clone(), depth + 1));
            }
            out.insert(p.replace('"', ""));
        }
    }
    out
}

/// The key paths defined in a TOML value (arrays of tables walked into).
fn walk(prefix: &str, v: &toml::Value, out: &mut BTreeSet<String>, inline_keys: &mut BTreeSet<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                if !prefix.is_empty() {
                    inline_keys.insert(k.clone());
                }
                out.insert(p.clone());
                walk(&p, v, out, inline_keys);
            }
        }
        toml::Value::Array(a) => {
            for v in a {
                walk(prefix, v, out, inline_keys);
            }
        }
        _ => {}
    }
}

#[test]
fn docs_profiles_md_documents_every_profile_key() {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let md = std::fs::read_to_string(ws.join("docs/profiles.md")).unwrap();
    let mut documented = BTreeSet::new();
    let mut leaves = BTreeSet::new();
    let mut block = None::<String>;
    for line in md.lines() {
        match (&mut block, line.trim_start()) {
            (None, l) if l.starts_with("```toml") => block = Some(String::new()),
            (Some(b), l) if l.starts_with("```") => {
                // Commented-out lines are documentation too (`# arch = …`).
                // A commented-out key is documentation too (`# arch = …`),
                // when the line alone is TOML.
                let uncomment = |l: &str| l.trim_start().strip_prefix("# ").filter(|r| r.parse::<toml::Table>().is_ok()).map(str::to_string).unwrap_or_else(|| l.to_string());
                let text: String = b.lines().map(uncomment).collect::<Vec<_>>().join("\n");
                if let Ok(v) = text.parse::<toml::Table>() {
                    walk("", &toml::Value::Table(v), &mut documented, &mut leaves);
                } else if let Ok(v) = b.parse::<toml::Table>() {
                    walk("", &toml::Value::Table(v), &mut documented, &mut leaves);
                }
                block = None;
            }
            (Some(b), l) => {
                b.push_str(l);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    for quoted in md.split('`').skip(1).step_by(2) {
        documented.insert(quoted.trim().to_string());
    }
    let schema = schema();
    assert!(schema.contains("pxe.server") && schema.contains("kernel.source") && schema.contains("payload.stand-in"), "the probe reads the schema: {schema:?}");
    // Input fields: documented once, as keys of any inline table.
    let input_fields: BTreeSet<String> = fields_at("payload.k0s").unwrap_or_default().into_iter().collect();
    let missing: Vec<&String> = schema
        .iter()
        .filter(|p| !documented.contains(*p))
        .filter(|p| {
            // An input's field under any key (an input, or a table that
            // takes one's fields, like [[rootfs.files]]).
            let leaf = p.rsplit_once('.').map_or(p.as_str(), |(_, l)| l);
            !(p.contains('.') && input_fields.contains(leaf) && leaves.contains(leaf))
        })
        .collect();
    assert!(missing.is_empty(), "profile keys the reader takes that docs/profiles.md does not document (add each to its reference block or name it in backticks): {missing:?}");
}
