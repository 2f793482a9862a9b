//! Signed builds: the manifest's minisign signature is accepted by Debian's
//! minisign and by `kiln verify`, and tampering is named.

mod common;

use std::path::Path;
use std::process::Command;

fn run(cmd: &str) -> (bool, String) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn flip(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    let i = at.min(b.len() - 1);
    b[i] ^= 0x01;
    std::fs::write(path, b).unwrap();
}

#[test]
fn signed_manifest_verifies_and_tampering_is_named() {
    common::built("qemu-amd64"); // warm cache
    let kiln = common::workspace().join("target/debug/kiln");
    let d = tempfile::tempdir().unwrap();
    let t = d.path();
    let (ok, text) = run(&format!("{} key generate --dir {}", kiln.display(), t.display()));
    assert!(ok, "{text}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(t.join("kiln.key")).unwrap().permissions().mode() & 0o777, 0o600);
    std::fs::create_dir_all(t.join("profiles/nodes")).unwrap();
    std::fs::write(t.join("profiles/nodes/single.toml"), "role = \"single\"\n").unwrap();
    std::fs::write(
        t.join("profiles/s.toml"),
        format!(
            "extends = \"{}\"\nname = \"signed\"\noutputs = [\"pxe\"]\n[node]\nconfig = \"nodes/single.toml\"\n[sign]\nkey = \"../kiln.key\"\n",
            common::workspace().join("profiles/qemu-amd64.toml").display()
        ),
    )
    .unwrap();
    std::env::set_var("KILN_SOURCE_DIR", common::workspace());
    let b = kiln::pipeline::build(&t.join("profiles/s.toml"), &t.join("out"), &kiln::cache::Cache::default_location()).unwrap_or_else(|e| panic!("{e:#}"));
    let o = b.out.clone();
    let pubkey = t.join("kiln.pub");
    let minisign = |dir: &Path| run(&format!("minisign -Vm {}/manifest.json -p {}", dir.display(), pubkey.display()));
    let verify = |dir: &Path| run(&format!("{} verify {} --key {}", kiln.display(), dir.display(), pubkey.display()));
    let (ok, text) = minisign(&o);
    assert!(ok && text.contains("kiln manifest profile=signed"), "{text}");
    let (ok, text) = verify(&o);
    assert!(ok && text.contains("verified"), "{text}");
    // The public key is in the image; the secret key is in no output.
    // (In the root squashfs, which the PXE initramfs carries.)
    let sq = t.join("root.squashfs");
    let (ok, text) = run(&format!("zstd -dc {}/pxe/initramfs.cpio.zst | cpio -i --quiet --to-stdout kiln/root.squashfs > {}", o.display(), sq.display()));
    assert!(ok, "{text}");
    let (ok, listing) = run(&format!("unsquashfs -l {}", sq.display()));
    assert!(ok && listing.lines().any(|l| l == "squashfs-root/etc/kiln/update.pub"), "{listing}");
    let secret_line = std::fs::read_to_string(t.join("kiln.key")).unwrap().lines().nth(1).unwrap().to_string();
    let (found, _) = run(&format!("grep -rlF '{secret_line}' {}", o.display()));
    assert!(!found, "the secret key leaked into an output");

    // Inside the signature line (the first line is the untrusted comment,
    // which no verifier checks).
    let sig_at = std::fs::read(o.join("manifest.json.minisig")).unwrap().iter().position(|b| *b == b'\n').unwrap() + 20;
    for (what, file, at) in [("artifact", "pxe/vmlinuz", 5000), ("manifest", "manifest.json", 40), ("signature", "manifest.json.minisig", sig_at)] {
        let copy = t.join(format!("tampered-{what}"));
        let (ok, text) = run(&format!("cp -r {} {}", o.display(), copy.display()));
        assert!(ok, "{text}");
        flip(&copy.join(file), at);
        let (ok, text) = verify(&copy);
        assert!(!ok, "kiln verify accepted a tampered {what}");
        assert!(text.contains(if what == "artifact" { file } else { "manifest.json" }), "the {what} is named: {text}");
        if what != "artifact" {
            let (ok, _) = minisign(&copy);
            assert!(!ok, "minisign accepted a tampered {what}");
        }
    }
}
