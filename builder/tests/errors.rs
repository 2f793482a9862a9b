//! Bad input gets a clear error that names the cause, never a panic.
//! These run the `kiln` binary as a user would.

use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn kiln(args: &[&str], envs: &[(&str, &Path)]) -> (i32, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.args(args);
    for (k, v) in envs {
        c.env(k, v);
    }
    let out = c.output().expect("running kiln");
    let text = kiln_testkit::output_text(&out);
    assert!(!text.contains("panicked"), "kiln panicked:\n{text}");
    (out.status.code().unwrap_or(-1), text)
}

/// A scratch tree with profiles/ and kernel-configs/, whose profiles extend
/// the real ones by absolute path.
fn scratch_tree() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("profiles/nodes")).unwrap();
    let kc = d.path().join("kernel-configs");
    std::fs::create_dir_all(&kc).unwrap();
    for sub in ["common", "amd64", "patches/linux-6.1"] {
        let src = workspace().join("kernel-configs").join(sub);
        std::fs::create_dir_all(kc.join(sub)).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), kc.join(sub).join(e.file_name())).unwrap();
        }
    }
    std::fs::write(d.path().join("profiles/nodes/single.toml"), "role = \"single\"\n").unwrap();
    d
}

#[test]
fn typo_in_profile_names_file_line_and_key() {
    let d = scratch_tree();
    let p = d.path().join("profiles/typo.toml");
    let base = workspace().join("profiles/qemu-amd64.toml");
    std::fs::write(&p, format!("extends = \"{}\"\nname = \"typo\"\n\n[kernel]\nfragmnets = [\"common/k8s.config\"]\n", base.display())).unwrap();
    let (code, text) = kiln(&["profile", "check", p.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains(&format!("{}:5: key `fragmnets`", p.display())), "{text}");
    assert!(text.contains("unknown field"), "{text}");
}

#[test]
fn the_real_profiles_check_clean() {
    let profiles: Vec<_> = std::fs::read_dir(workspace().join("profiles"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.file_name().is_some_and(|n| n != "base.toml"))
        .collect();
    assert!(!profiles.is_empty());
    // The factory profiles take their signing key from the environment, as
    // a CI secret.
    let d = tempfile::tempdir().unwrap();
    let (code, text) = kiln(&["key", "generate", "--dir", d.path().to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{text}");
    let key = std::fs::read_to_string(d.path().join("kiln.key")).unwrap();
    for path in profiles {
        let (code, text) = kiln(&["profile", "check", path.to_str().unwrap()], &[("KILN_SIGNING_KEY", Path::new(&key))]);
        assert_eq!(code, 0, "{text}");
    }
}

#[test]
fn a_malformed_source_date_epoch_is_an_error() {
    let p = workspace().join("profiles/qemu-amd64.toml");
    let (code, text) = kiln(&["profile", "check", p.to_str().unwrap()], &[("SOURCE_DATE_EPOCH", Path::new("2023-11-14"))]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("SOURCE_DATE_EPOCH=`2023-11-14`") && text.contains("date +%s"), "{text}");
}

#[test]
fn missing_input_file_says_what_and_how() {
    let d = scratch_tree();
    let p = d.path().join("profiles/missing.toml");
    let base = workspace().join("profiles/qemu-amd64.toml");
    std::fs::write(
        &p,
        format!(
            "extends = \"{}\"\nname = \"missing\"\n[payload]\nstand-in = false\nk0s = {{ file = \"/nonexistent/k0s-v1.30.14\", sha256 = \"{}\" }}\n",
            base.display(),
            "0".repeat(64)
        ),
    )
    .unwrap();
    let out = d.path().join("out");
    let (code, text) = kiln(&["build", p.to_str().unwrap(), "--out", out.to_str().unwrap()], &[("KILN_SOURCE_DIR", &workspace())]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("payload.k0s") && text.contains("/nonexistent/k0s-v1.30.14") && text.contains("missing"), "{text}");
    // Nothing half-written.
    assert!(!out.join("missing").exists());
}

#[test]
fn kernel_option_kconfig_cannot_set_fails_naming_it() {
    let d = scratch_tree();
    std::fs::write(
        d.path().join("kernel-configs/amd64/impossible.config"),
        "# Not an option in any kernel.\nCONFIG_KILN_NO_SUCH_OPTION=y\n# Depends on SQUASHFS, which is not enabled here.\nCONFIG_SQUASHFS_XZ=y\n",
    )
    .unwrap();
    let p = d.path().join("profiles/impossible.toml");
    let base = workspace().join("profiles/qemu-amd64.toml");
    std::fs::write(&p, format!("extends = \"{}\"\nname = \"impossible\"\n[kernel]\nfragments = [\"amd64/impossible.config\"]\n", base.display())).unwrap();
    let (code, text) = kiln(&["kernel", "build", p.to_str().unwrap()], &[("KILN_SOURCE_DIR", d.path())]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("CONFIG_KILN_NO_SUCH_OPTION=y") && text.contains("impossible.config:2"), "{text}");
    assert!(text.contains("CONFIG_SQUASHFS_XZ=y") && text.contains("depends on SQUASHFS"), "{text}");
}

#[test]
fn kernel_check_reports_missing_requirements() {
    let d = tempfile::tempdir().unwrap();
    let c = d.path().join("config");
    std::fs::write(&c, "CONFIG_NET=y\nCONFIG_INET=y\n").unwrap();
    let (code, text) = kiln(&["kernel", "check", c.to_str().unwrap(), "--role", "worker"], &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("missing CONFIG_CGROUP_BPF"), "{text}");
}

#[test]
fn config_check_accepts_and_rejects() {
    let d = tempfile::tempdir().unwrap();
    let good = d.path().join("good.toml");
    std::fs::write(&good, "role = \"worker\"\n[k0s]\ntoken_file = \"/var/lib/kiln/token\"\n").unwrap();
    let (code, text) = kiln(&["config", "check", good.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{text}");
    let bad = d.path().join("bad.toml");
    std::fs::write(&bad, "role = \"worker\"\n\n[network]\nwait = 3\n").unwrap();
    let (code, text) = kiln(&["config", "check", bad.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("bad.toml: line 4, key `network.wait`"), "{text}");
}
