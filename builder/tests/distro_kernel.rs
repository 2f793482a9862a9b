//! A distro kernel package is checked like a compiled kernel: its `.config`
//! against the k0s requirement table, before anything is built from it.
//! The package here is made up (a `.deb` built with dpkg-deb), so that it
//! can lack exactly one required option.

use kiln_contract::requirements::TABLE;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A `linux-image-*`-shaped .deb: kernel, config without `drop`, and an
/// empty module tree.
fn fake_kernel_deb(dir: &Path, release: &str, drop: &str) -> PathBuf {
    let root = dir.join("pkg");
    std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(root.join("boot")).unwrap();
    std::fs::create_dir_all(root.join(format!("lib/modules/{release}/kernel"))).unwrap();
    std::fs::write(root.join("DEBIAN/control"), format!("Package: linux-image-{release}\nVersion: 1\nArchitecture: amd64\nMaintainer: kiln tests <kiln@example.invalid>\nDescription: a made-up kernel package\n")).unwrap();
    std::fs::write(root.join(format!("boot/vmlinuz-{release}")), b"MZ not a kernel").unwrap();
    let mut config = String::new();
    for r in TABLE {
        for o in r.options {
            if *o != drop {
                config.push_str(&format!("CONFIG_{o}=m\n"));
            }
        }
    }
    config.push_str(&format!("# CONFIG_{drop} is not set\n"));
    std::fs::write(root.join(format!("boot/config-{release}")), config).unwrap();
    std::fs::write(root.join(format!("lib/modules/{release}/modules.builtin")), "").unwrap();
    let deb = dir.join("linux-image-test.deb");
    dpkg_deb(&root, &deb);
    deb
}

/// `kiln build` of a profile on qemu-amd64-distro with `deb` as the
/// kernel package: whether it succeeded, and what it printed.
fn build_with_package(dir: &Path, name: &str, deb: &Path) -> (bool, String) {
    let sha = kiln::inputs::input::sha256_file(deb).unwrap().0;
    let profiles = repo().join("profiles");
    let profile = dir.join(format!("{name}.toml"));
    std::fs::write(
        &profile,
        format!(
            "extends = \"{}\"\nname = \"{name}\"\n[kernel]\npackage = {{ file = \"{}\", sha256 = \"{sha}\" }}\n[node]\nconfig = \"{}\"\n",
            profiles.join("qemu-amd64-distro.toml").display(),
            deb.display(),
            profiles.join("nodes/single.toml").display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln")).arg("build").arg(&profile).arg("--out").arg(dir.join("out")).env("KILN_SOURCE_DIR", repo()).output().unwrap();
    (out.status.success(), kiln_testkit::output_text(&out))
}

fn dpkg_deb(root: &Path, deb: &Path) {
    let out = Command::new("dpkg-deb").args(["--root-owner-group", "-Zgzip", "--build"]).arg(root).arg(deb).output().expect("dpkg-deb (apt-get install dpkg)");
    assert!(out.status.success(), "{}", kiln_testkit::output_text(&out));
}

#[test]
fn a_distro_kernel_without_a_required_option_fails_the_build_naming_it() {
    let d = tempfile::tempdir().unwrap();
    let deb = fake_kernel_deb(d.path(), "6.1.0-99-test", "OVERLAY_FS");
    let (ok, text) = build_with_package(d.path(), "vendor-distro", &deb);
    assert!(!ok, "the build must fail:\n{text}");
    assert!(text.contains("missing CONFIG_OVERLAY_FS"), "the error names the option:\n{text}");
    assert!(!d.path().join("out/vendor-distro").exists(), "no half-written output");
}

#[test]
fn the_metapackage_is_refused_with_what_to_name_instead() {
    // linux-image-amd64 holds no kernel: the error says which package to name.
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("pkg");
    std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(root.join("usr/share/doc/linux-image-amd64")).unwrap();
    std::fs::write(root.join("DEBIAN/control"), "Package: linux-image-amd64\nVersion: 1\nArchitecture: amd64\nMaintainer: kiln tests <kiln@example.invalid>\nDescription: a metapackage\n").unwrap();
    std::fs::write(root.join("usr/share/doc/linux-image-amd64/README"), "meta\n").unwrap();
    let deb = d.path().join("meta.deb");
    dpkg_deb(&root, &deb);
    let (ok, text) = build_with_package(d.path(), "meta", &deb);
    assert!(!ok && text.contains("not a kernel image package") && text.contains("linux-image-<release>"), "{text}");
}
