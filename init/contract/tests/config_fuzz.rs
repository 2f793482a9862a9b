//! Property tests ("fuzzing") of the node-config parser and validator: what
//! the node and `kiln config check` run on every node.toml.
//!
//! cargo-fuzz needs a nightly toolchain, which the build machines lack, so
//! these use proptest on stable. Two kinds of input:
//!
//! - arbitrary bytes, as lossy UTF-8 and as valid UTF-8: never a panic;
//! - node.toml texts built from the schema's own keys (`config::KEYS`) with
//!   valid, mistyped and out-of-range values, unknown keys, keys in the wrong
//!   table and repeated keys and tables: every error names a key or a line,
//!   a named line exists in the input, a named key is a schema key or appears
//!   in the input, and an error found after the TOML was read (validation)
//!   points at the line that holds that key.
//!
//! A failing case is shrunk by proptest and printed; add it to the
//! regression tests in init/contract/src/config.rs when fixing it.

use kiln_contract::config::{self, NodeConfig, KEYS};
use proptest::prelude::*;

/// The input's lines as an error can name them: 1..=max(lines, 1).
fn line_exists(src: &str, line: usize) -> bool {
    line >= 1 && line <= src.lines().count().max(1)
}

/// `network.interfaces[1].mac` → `network.interfaces.mac`.
fn without_indices(key: &str) -> String {
    let mut out = String::new();
    let mut skip = false;
    for c in key.chars() {
        match c {
            '[' => skip = true,
            ']' => skip = false,
            c if !skip => out.push(c),
            _ => {}
        }
    }
    out
}

/// Checks one input against the properties above.
fn check(src: &str) -> Result<(), TestCaseError> {
    let Err(e) = config::parse(src) else { return Ok(()) };
    prop_assert!(e.key.is_some() || e.line.is_some(), "error names neither key nor line: {e}\n--- input:\n{src}");
    prop_assert!(!e.message.trim().is_empty(), "empty message: {e:?}\n--- input:\n{src}");
    if let Some(l) = e.line {
        prop_assert!(line_exists(src, l), "line {l} is not in the input ({} lines): {e}\n--- input:\n{src}", src.lines().count());
    }
    if let Some(k) = &e.key {
        let plain = without_indices(k);
        let leaf = plain.rsplit('.').next().unwrap_or(&plain);
        // A key that needs quotes is named as TOML writes it (`"}"`, `""`);
        // the input may have quoted it another way (`'}'`, `''`).
        let quoted = leaf.strip_prefix('"').and_then(|x| x.strip_suffix('"')).is_some_and(|inner| {
            if inner.is_empty() {
                src.contains("''") || src.contains("\"\"")
            } else {
                src.contains(inner)
            }
        });
        prop_assert!(
            KEYS.contains(&plain.as_str()) || src.contains(leaf) || quoted,
            "key `{k}` is neither a schema key nor in the input: {e}\n--- input:\n{src}"
        );
    }
    // A validation error (the TOML itself was read) with a line: the line
    // holds the key or, when the key is missing, the table it belongs in.
    if toml::from_str::<NodeConfig>(src).is_ok() {
        if let (Some(k), Some(l)) = (&e.key, e.line) {
            let plain = without_indices(k);
            let text = src.lines().nth(l - 1).unwrap_or("");
            prop_assert!(plain.split('.').any(|seg| text.contains(seg)), "line {l} ({text:?}) holds neither key `{k}` nor its table: {e}\n--- input:\n{src}");
        }
    }
    Ok(())
}

// ---- arbitrary input --------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let text = String::from_utf8_lossy(&bytes);
        check(&text)?;
    }

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
        check(&text)?;
    }

    /// TOML-ish noise: the characters TOML gives meaning to, in bulk.
    #[test]
    fn toml_punctuation_never_panics(text in "[\\[\\]{}=\"'#.,\n a-z0-9_+:-]{0,400}") {
        check(&text)?;
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    for depth in [64usize, 1_000, 20_000] {
        for (open, close) in [("[", "]"), ("{ a = ", " }")] {
            let src = format!("role = \"single\"\nx = {}1{}\n", open.repeat(depth), close.repeat(depth));
            let e = config::parse(&src).unwrap_err();
            assert!(e.line.is_some() || e.key.is_some(), "{e}");
        }
    }
}

// ---- node.toml texts from the schema ------------------------------------------

/// Values of every shape TOML has, plus the plausible and the broken ones
/// each key sees in real files.
fn value() -> impl Strategy<Value = String> {
    let scalar = prop_oneof![
        // Plausible values for the schema's keys.
        Just("\"single\"".to_string()),
        Just("\"worker\"".to_string()),
        Just("\"controller+worker\"".to_string()),
        Just("\"master\"".to_string()),
        Just("\"edge-1\"".to_string()),
        Just("\"Node_1\"".to_string()),
        Just("\"eth0\"".to_string()),
        Just("\"52:54:00:12:34:56\"".to_string()),
        Just("\"52:54:00:12:34\"".to_string()),
        Just("\"10.0.0.5/24\"".to_string()),
        Just("\"10.0.0.5/33\"".to_string()),
        Just("\"10.0.0.1\"".to_string()),
        Just("\"fd00::5/64\"".to_string()),
        Just("\"/dev/vda\"".to_string()),
        Just("\"/dev/\"".to_string()),
        Just("\"/etc/shadow\"".to_string()),
        Just("\"mac\"".to_string()),
        Just("\"serial\"".to_string()),
        Just("\"dGVzdA==\"".to_string()),
        Just("\"not a token!\"".to_string()),
        Just("\"key=value:NoSchedule\"".to_string()),
        Just("\"key=value:Sometimes\"".to_string()),
        Just("\"\"".to_string()),
        Just("\"apiVersion: k0s.k0sproject.io/v1beta1\\nkind: ClusterConfig\\n\"".to_string()),
        Just("\"\"\"\napiVersion: k0s.k0sproject.io/v1beta1\nkind: ClusterConfig\n[k0s]\ntoken = \"x\"\n\"\"\"".to_string()),
        Just("'''\n\tkind: ClusterConfig\n'''".to_string()),
        // Numbers: in and out of every range the schema has.
        (-3i64..70_000).prop_map(|n| n.to_string()),
        Just("4094".to_string()),
        Just("4095".to_string()),
        Just("65535".to_string()),
        Just("65536".to_string()),
        Just("4294967296".to_string()),
        Just("9223372036854775807".to_string()),
        Just("18446744073709551616".to_string()),
        Just("-1".to_string()),
        Just("1e3".to_string()),
        Just("nan".to_string()),
        Just("inf".to_string()),
        Just("0x10".to_string()),
        Just("1_000".to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        Just("1979-05-27T07:32:00Z".to_string()),
        Just("07:32:00".to_string()),
        // Not TOML at all.
        Just("yes".to_string()),
        Just("\"unterminated".to_string()),
        Just("".to_string()),
        "[a-z0-9 \"'=.:/_-]{0,12}",
    ];
    scalar.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            proptest::collection::vec((key_name(), inner), 0..4).prop_map(|kv| {
                let body: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{{ {} }}", body.join(", "))
            }),
        ]
    })
}

/// A key name: a schema leaf (from any table, so often the wrong one), a
/// dotted schema key, or an unknown one.
fn key_name() -> impl Strategy<Value = String> {
    let leaves: Vec<String> = {
        let mut v: Vec<String> = KEYS.iter().map(|k| k.rsplit('.').next().unwrap_or(k).to_string()).collect();
        v.sort();
        v.dedup();
        v
    };
    let dotted: Vec<String> = KEYS.iter().map(|k| k.to_string()).collect();
    prop_oneof![
        6 => proptest::sample::select(leaves),
        2 => proptest::sample::select(dotted),
        1 => "[a-z_]{1,10}",
        1 => Just("\"quoted key\"".to_string()),
        1 => Just("label".to_string()),
    ]
}

/// A table header: the schema's tables (as tables and as arrays of tables),
/// its leaves (wrongly used as tables), or an unknown one.
fn header() -> impl Strategy<Value = String> {
    let names: Vec<String> = KEYS.iter().map(|k| k.to_string()).collect();
    prop_oneof![
        4 => proptest::sample::select(names.clone()).prop_map(|n| format!("[{n}]")),
        2 => proptest::sample::select(names).prop_map(|n| format!("[[{n}]]")),
        1 => "[a-z]{1,8}".prop_map(|n| format!("[{n}]")),
        1 => Just("[network.interfaces]".to_string()),
        1 => Just("[[network.interfaces]]".to_string()),
        1 => Just("[ k0s . labels ]".to_string()),
    ]
}

#[derive(Debug, Clone)]
enum Line {
    Header(String),
    Pair(String, String),
    Comment,
    Blank,
}

fn line() -> impl Strategy<Value = Line> {
    prop_oneof![
        2 => header().prop_map(Line::Header),
        8 => (key_name(), value()).prop_map(|(k, v)| Line::Pair(k, v)),
        1 => Just(Line::Comment),
        1 => Just(Line::Blank),
    ]
}

/// A node.toml: usually a role first (so the rest gets looked at), then
/// lines. Repeats happen when a key or header is drawn twice.
fn node_toml() -> impl Strategy<Value = String> {
    let role = prop_oneof![
        Just(String::new()),
        Just("role = \"single\"\n".to_string()),
        Just("role = \"worker\"\n".to_string()),
        Just("role = \"controller\"\n".to_string()),
        Just("role = \"controller+worker\"\n".to_string()),
        value().prop_map(|v| format!("role = {v}\n")),
    ];
    let crlf = any::<bool>();
    (role, proptest::collection::vec(line(), 0..14), crlf).prop_map(|(role, lines, crlf)| {
        let mut s = role;
        for l in lines {
            match l {
                Line::Header(h) => s.push_str(&h),
                Line::Pair(k, v) => s.push_str(&format!("{k} = {v}")),
                Line::Comment => s.push_str("# a comment = 1"),
                Line::Blank => {}
            }
            s.push('\n');
        }
        if crlf {
            s = s.replace('\n', "\r\n");
        }
        s
    })
}

/// The valid file `almost_valid` mutates.
const BASE: &str = "role = \"controller+worker\"\nhostname = \"edge-1\"\n\n[network]\ndns = [\"1.1.1.1\"]\nwait_seconds = 30\n\n[[network.interfaces]]\nname = \"eth0\"\naddresses = [\"10.0.0.5/24\"]\ngateway = \"10.0.0.1\"\n\n[[network.interfaces]]\nmac = \"52:54:00:12:34:56\"\nvlan = 10\n\n[k0s]\nlabels = { zone = \"a\" }\ntaints = [\"dedicated=edge:NoSchedule\"]\n\n[log]\nmax_bytes = 4194304\n\n[storage]\nvar_disk = \"/dev/vdb\"\n";

/// A valid config with one thing changed: closer to what people get wrong.
fn almost_valid() -> impl Strategy<Value = String> {
    let lines: Vec<&'static str> = BASE.lines().collect();
    let n = lines.len();
    (0..n, key_name(), value(), 0..3u8).prop_map(move |(at, k, v, how)| {
        let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        match how {
            // Replace the value of the line there (or add a pair there).
            0 => match out[at].split_once(" = ") {
                Some((key, _)) => out[at] = format!("{key} = {v}"),
                None => out.insert(at + 1, format!("{k} = {v}")),
            },
            // Insert a pair after that line (in that line's table).
            1 => out.insert(at + 1, format!("{k} = {v}")),
            // Repeat that line further down.
            _ => {
                let l = out[at].clone();
                out.push(l);
            }
        }
        out.join("\n") + "\n"
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn schema_shaped_errors_name_a_key_or_a_line(src in node_toml()) {
        check(&src)?;
    }

    #[test]
    fn almost_valid_errors_name_a_key_or_a_line(src in almost_valid()) {
        check(&src)?;
    }
}

#[test]
fn the_almost_valid_base_is_valid() {
    // The generator above mutates a valid file; make sure it is one.
    config::parse(BASE).unwrap();
}
