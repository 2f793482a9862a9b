//! The same profile and inputs give byte-identical outputs, and a warm
//! rebuild does not recompile the kernel.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().to_string_lossy().to_string(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn two_builds_are_byte_identical_and_the_second_reuses_the_kernel() {
    let cache = kiln::cache::Cache::default_location();
    let profile = common::workspace().join("profiles/qemu-amd64.toml");
    let root = common::scratch().join("repro");
    let _ = std::fs::remove_dir_all(&root);
    let a = kiln::pipeline::build(&profile, &root.join("a"), &cache).unwrap_or_else(|e| panic!("{e:#}"));
    let b = kiln::pipeline::build(&profile, &root.join("b"), &cache).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(b.kernel_cached, "the warm rebuild must not recompile the kernel");
    let (fa, fb) = (files(&a.out), files(&b.out));
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    for (name, bytes) in &fa {
        assert!(bytes == &fb[name], "{name} differs between two builds");
    }
    for want in ["pxe/vmlinuz", "pxe/initramfs.cpio.zst", "pxe/boot.ipxe", "manifest.json", "qemu-amd64.iso", "disk.raw"] {
        assert!(fa.contains_key(want), "missing {want}: {:?}", fa.keys());
    }
    // The manifest lists every artifact with its sha256.
    let m: serde_json::Value = serde_json::from_slice(&fa["manifest.json"]).unwrap();
    let arts = m["artifacts"].as_array().unwrap();
    for (name, bytes) in &fa {
        if name == "manifest.json" {
            continue;
        }
        let entry = arts.iter().find(|x| x["path"] == name.as_str()).unwrap_or_else(|| panic!("{name} not in the manifest"));
        assert_eq!(entry["sha256"].as_str().unwrap(), kiln::input::sha256_bytes(bytes));
    }
    assert!(m["inputs"].as_array().unwrap().iter().any(|i| i["source"].as_str().unwrap_or("").starts_with("linux-source-6.1")));
    assert!(m["payload"]["description"].as_str().unwrap().contains("not k0s"));
    // The initramfs is a cpio that GNU cpio lists, holding stage 1 and the
    // verified root (squashfs + hash tree).
    let cpio = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("zstd -dc {} | cpio -it", a.out.join("pxe/initramfs.cpio.zst").display()))
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&cpio.stdout);
    for want in ["init", "sbin/kiln-init", "kiln/root.squashfs", "kiln/root.verity"] {
        assert!(listing.lines().any(|l| l == want), "{want} not in the initramfs:\n{listing}");
    }
}
