//! The `kiln` command line as a first-time user meets it: every command's
//! help describes every argument and names only files that exist; `profile
//! check` says what the payload is and warns about what a flashed node cannot
//! change later; a vendor profile beside a kiln checkout builds real k0s
//! without environment variables.

use std::path::{Path, PathBuf};
use std::process::Command;

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Runs kiln with no kiln environment variables; (success, stdout+stderr).
fn kiln(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut c = Command::new(KILN);
    c.args(args).current_dir(workspace());
    for v in ["KILN_SOURCE_DIR", "KILN_SIGNING_KEY", "KILN_NODE_BINARIES"] {
        c.env_remove(v);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("running kiln");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The subcommands a help text lists under "Commands:".
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter(|l| l.len() > 2 && !l[2..].starts_with(' '))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect()
}

/// (entry, description) of each argument and option in a help text.
fn entries(help: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = help.lines().collect();
    let mut out = Vec::new();
    let mut section = false;
    for (i, l) in lines.iter().enumerate() {
        if matches!(*l, "Arguments:" | "Options:") {
            section = true;
            continue;
        }
        if l.is_empty() {
            continue;
        }
        if !l.starts_with(' ') {
            section = false;
            continue;
        }
        // An entry: two spaces, then `<ARG>`, `-x` or `--flag`.
        let t = l.trim_start();
        let indent = l.len() - t.len();
        if !section || indent > 6 || !(t.starts_with('<') || t.starts_with('-') || t.starts_with('[')) {
            continue;
        }
        let (name, rest) = match t.find("  ") {
            Some(j) => (&t[..j], t[j..].trim()),
            None => (t, ""),
        };
        let desc = if rest.is_empty() {
            lines.get(i + 1).filter(|n| n.len() - n.trim_start().len() > indent + 2).map_or("", |n| n.trim())
        } else {
            rest
        };
        out.push((name.to_string(), desc.to_string()));
    }
    out
}

#[test]
fn every_help_describes_every_argument_and_names_existing_files() {
    let (ok, top) = kiln(&["--help"], &[]);
    assert!(ok, "{top}");
    assert!(top.contains("Workflow:") && top.contains("kiln build") && top.contains("kiln verify") && top.contains("docs/"), "kiln --help ends with the workflow and the docs: {top}");
    let mut helps = vec![("kiln".to_string(), top.clone())];
    for c in subcommands(&top) {
        let (ok, h) = kiln(&[&c, "--help"], &[]);
        assert!(ok, "kiln {c} --help: {h}");
        let subs = subcommands(&h);
        for s in &subs {
            let (ok, hs) = kiln(&[&c, s, "--help"], &[]);
            assert!(ok, "kiln {c} {s} --help: {hs}");
            helps.push((format!("kiln {c} {s}"), hs));
        }
        helps.push((format!("kiln {c}"), h));
    }
    assert!(helps.len() > 15, "every subcommand was found: {}", helps.len());
    let ws = workspace();
    let all: usize = helps.iter().map(|(_, h)| entries(h).len()).sum();
    assert!(all > 60, "the help parser found the arguments and options: {all}");
    let serve = entries(&helps.iter().find(|(c, _)| c == "kiln serve").unwrap().1);
    assert!(serve.iter().any(|(n, d)| n.starts_with("<DIR>") && d.contains("directory to serve")), "{serve:?}");
    for (cmd, h) in &helps {
        for (name, desc) in entries(h) {
            assert!(!desc.is_empty(), "`{cmd} --help`: {name} has no description:\n{h}");
        }
        // Files an example or a description names must exist.
        for word in h.split(|c: char| c.is_whitespace() || "()`,;\"'".contains(c)) {
            let w = word.trim_end_matches(['.', ':']);
            // Paths into the kiln tree (out/… and DIR/… are what a build or
            // the user makes).
            let named = ["profiles/", "docs/", "kernel-configs/", "overlays/"].iter().any(|p| w.starts_with(p));
            if named && !w.ends_with('/') {
                assert!(ws.join(w).exists(), "`{cmd} --help` names {w}, which does not exist:\n{h}");
            } else if named {
                assert!(ws.join(w).is_dir(), "`{cmd} --help` names {w}, which does not exist");
            }
        }
    }
    // The one that was wrong before: no --disk option to name.
    let run = &helps.iter().find(|(c, _)| c == "kiln run").unwrap().1;
    assert!(!run.contains("`--disk`"), "{run}");
}

#[test]
fn profile_check_says_what_the_payload_is_and_what_cannot_change_later() {
    let (ok, out) = kiln(&["profile", "check", "profiles/armv7-factory-worker.toml"], &[]);
    assert!(ok, "{out}");
    assert!(out.contains("payload: stand-in (a test fixture, not k0s)"), "{out}");
    assert!(out.contains("warning: the payload is the stand-in"), "{out}");
    assert!(out.contains("warning: no signing key"), "{out}");

    // The factory profiles with a key and a k0s file: nothing to warn about.
    let d = tempfile::tempdir().unwrap();
    let (ok, out) = kiln(&["key", "generate", "--dir", d.path().to_str().unwrap()], &[]);
    assert!(ok, "{out}");
    let key = std::fs::read_to_string(d.path().join("kiln.key")).unwrap();
    let k0s = d.path().join("k0s-arm");
    std::fs::write(&k0s, b"a file at the k0s path").unwrap();
    let sha = kiln_contract::digest::hex(&<sha2::Sha256 as sha2::Digest>::digest(std::fs::read(&k0s).unwrap()));
    for base in ["factory-cubieboard2", "factory-beaglebone-black"] {
        let (ok, out) = kiln(&["profile", "check", &format!("profiles/{base}.toml")], &[]);
        assert!(!ok && out.contains("signing key") && out.contains("KILN_SIGNING_KEY"), "without a key the update output cannot be built: {out}");
        let child = d.path().join(format!("{base}-real.toml"));
        std::fs::write(&child, format!("extends = \"{}\"\n\n[payload]\nk0s = {{ file = \"k0s-arm\", sha256 = \"{sha}\" }}\nversion = \"v1.30.14+k0s.0\"\n", ws_profile(base).display())).unwrap();
        let (ok, out) = kiln(&["profile", "check", child.to_str().unwrap()], &[("KILN_SIGNING_KEY", &key)]);
        assert!(ok, "{out}");
        assert!(out.contains(&format!("payload: k0s v1.30.14+k0s.0 (sha256 {sha})")), "{out}");
        assert!(!out.contains("warning"), "{base} with a key and k0s: {out}");
    }

    // A debug shell in the image is said, as a warning.
    let debug = d.path().join("debug.toml");
    std::fs::write(&debug, format!("extends = \"{}\"\n\n[node]\ndebug_shell = true\n", ws_profile("qemu-amd64").display())).unwrap();
    let (ok, out) = kiln(&["profile", "check", debug.to_str().unwrap()], &[]);
    assert!(ok && out.contains("warning: node.debug_shell = true: every node of this image has a root shell on its console"), "{out}");
    // Without `sh` in the root there is no shell to give: refused, naming
    // the line.
    std::fs::write(&debug, format!("extends = \"{}\"\n\n[rootfs]\nbusybox_applets = [\"mount\"]\n\n[node]\ndebug_shell = true\n", ws_profile("qemu-amd64").display())).unwrap();
    let (ok, out) = kiln(&["profile", "check", debug.to_str().unwrap()], &[]);
    assert!(!ok && out.contains("debug.toml:7: key `node.debug_shell`: needs a shell in the root"), "{out}");
}

fn ws_profile(name: &str) -> PathBuf {
    workspace().join("profiles").join(format!("{name}.toml"))
}

/// docs/use-cases/appliance.md's layout: a vendor folder beside a kiln
/// checkout, its profile extending one of kiln's across the folders and
/// setting only real k0s (here a stand-in binary at the k0s path, pinned).
/// It builds with no environment variable, and says the payload is k0s.
#[test]
fn a_vendor_profile_beside_a_kiln_checkout_builds_real_k0s() {
    let d = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(workspace(), d.path().join("kiln")).unwrap();
    let vendor = d.path().join("vendor");
    std::fs::create_dir_all(&vendor).unwrap();
    // A static amd64 executable to stand at the k0s path: the stand-in.
    let standin = kiln::inputs::init::cargo_build(&workspace(), "kiln-qemu-tests", "k0s", kiln::arch::Arch::Amd64).unwrap();
    std::fs::copy(&standin, vendor.join("k0s-amd64")).unwrap();
    let sha = kiln_contract::digest::hex(&<sha2::Sha256 as sha2::Digest>::digest(std::fs::read(vendor.join("k0s-amd64")).unwrap()));
    std::fs::write(
        vendor.join("appliance.toml"),
        format!("extends = \"../kiln/profiles/qemu-amd64.toml\"\nname = \"vendor-appliance\"\noutputs = [\"pxe\"]\n\n[payload]\nk0s = {{ file = \"k0s-amd64\", sha256 = \"{sha}\" }}\nversion = \"v1.30.14+k0s.0\"\n"),
    )
    .unwrap();
    let out = d.path().join("out");
    let (ok, log) = kiln(&["build", vendor.join("appliance.toml").to_str().unwrap(), "--out", out.to_str().unwrap()], &[]);
    assert!(ok, "{log}");
    assert!(log.contains(&format!("payload: k0s v1.30.14+k0s.0 (sha256 {sha})")), "{log}");
    assert!(log.contains("next:") && log.contains("kiln serve"), "the build says what to do next: {log}");
    assert!(out.join("vendor-appliance/pxe/vmlinuz").is_file());
}
