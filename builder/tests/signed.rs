//! Signed builds, end to end through the CLI: `kiln key generate`, a signed
//! build of a small (PXE only) profile, checked with Debian's minisign, with
//! `kiln verify` and with pyspdxtools. One flipped byte in any artifact, in
//! the manifest, in the SBOM or in either signature makes both checkers fail,
//! naming the file. The secret key is in no output; the public key is in
//! the image.

use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn text(out: std::process::Output) -> (bool, String) {
    (out.status.success(), kiln_testkit::output_text(&out))
}

fn kiln(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_SOURCE_DIR", workspace())
        .env_remove("KILN_SIGNING_KEY")
        .output()
        .expect("run kiln");
    text(out)
}

fn sh(cmd: &str) -> (bool, String) {
    text(Command::new("sh").arg("-c").arg(cmd).output().expect("sh"))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every file under `dir`, relative, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = kiln::provenance::manifest::files(dir).unwrap().into_iter().map(|(rel, _)| rel).collect();
    out.extend(["manifest.json", "manifest.json.minisig"].into_iter().filter(|f| dir.join(f).exists()).map(String::from));
    out.sort();
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn signed_output_verifies_and_every_flipped_byte_is_named() {
    if kiln_testkit::checker("minisign", "minisign").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (ok, out) = kiln(&["key", "generate", "--dir", s(t)]);
    assert!(ok, "{out}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(t.join("kiln.key")).unwrap().permissions().mode() & 0o777, 0o600);
    let (ok, out) = kiln(&["key", "generate", "--dir", s(t)]);
    assert!(!ok && out.contains("refusing to overwrite"), "{out}");

    // The key comes from a command here (`sign.key_command`); the other
    // sources are unit-tested in builder/src/keys.rs.
    std::fs::create_dir_all(t.join("profiles/nodes")).unwrap();
    std::fs::write(t.join("profiles/nodes/single.toml"), "role = \"single\"\n").unwrap();
    std::fs::write(
        t.join("profiles/s.toml"),
        format!(
            "extends = \"{}\"\nname = \"signed\"\nversion = \"1.4.0\"\noutputs = [\"pxe\", \"update\"]\n[node]\nconfig = \"nodes/single.toml\"\n[sign]\nkey_command = [\"cat\", \"../kiln.key\"]\n",
            workspace().join("profiles/qemu-amd64.toml").display()
        ),
    )
    .unwrap();
    let (ok, out) = kiln(&["build", s(&t.join("profiles/s.toml")), "--out", s(&t.join("out"))]);
    assert!(ok, "kiln build: {out}");
    let o = t.join("out/signed");
    let public = t.join("kiln.pub");
    let minisign = |file: &str| sh(&format!("minisign -Vm {} -p {}", o.join(file).display(), public.display()));
    let verify = || kiln(&["verify", s(&o), "--key", s(&public)]);

    for (file, comment) in [("manifest.json", "kiln manifest profile=signed"), ("sbom.spdx.json", "kiln sbom profile=signed")] {
        let (ok, out) = minisign(file);
        assert!(ok && out.contains(comment), "minisign {file}: {out}");
        let (ok, out) = kiln(&["verify", s(&o.join(file)), "--key", s(&public)]);
        assert!(ok && out.contains(comment), "kiln verify {file}: {out}");
    }
    let (ok, out) = verify();
    assert!(ok && out.contains("verified") && out.contains("sbom.spdx.json: lists every artifact"), "{out}");
    let all = files(&o);
    for want in ["manifest.json", "manifest.json.minisig", "sbom.spdx.json", "sbom.spdx.json.minisig", "pxe/vmlinuz", "pxe/initramfs.cpio.zst", "pxe/boot.ipxe"] {
        assert!(all.iter().any(|f| f == want), "{want} missing: {all:?}");
    }

    // The update bundle, read as the node reads it, against the public key
    // the image carries: its manifest names this build, and every part
    // checks. An older node takes it; a newer one, or another arch, does not.
    {
        use kiln_contract::update::{BundleReader, PartKind, Policy};
        use std::io::Read;
        let keys = [kiln_contract::minisign::PublicKey::from_file(&std::fs::read_to_string(&public).unwrap()).unwrap()];
        let policy = |arch, running| Policy { keys: &keys, arch, profile: "signed", running_version: running, allow_downgrade: false };
        let open = |p: &Policy| BundleReader::open(std::fs::File::open(o.join("update.kiln")).unwrap(), p);
        let mut b = open(&policy("amd64", Some("1.3.9"))).unwrap_or_else(|e| panic!("{e}"));
        let m = b.manifest().clone();
        assert_eq!((m.version.as_str(), m.arch.as_str(), m.profile.as_str()), ("1.4.0", "amd64", "signed"));
        let kinds: Vec<PartKind> = m.parts.iter().map(|p| p.kind).collect();
        assert_eq!(kinds, [PartKind::Root, PartKind::Verity, PartKind::Uki]);
        while let Some(mut part) = b.next_part().unwrap() {
            let mut sink = Vec::new();
            part.read_to_end(&mut sink).unwrap_or_else(|e| panic!("{}: {e}", part.part().name));
            part.finish().unwrap();
        }
        b.finish().unwrap();
        let refused = |p: Policy| open(&p).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused(policy("amd64", Some("1.5.0"))).contains("1.4.0"), "a downgrade is refused");
        assert!(refused(policy("armv7", None)).contains("armv7"), "another arch is refused");
    }

    // The SBOM: valid SPDX, naming what the image is made of.
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(o.join("manifest.json")).unwrap()).unwrap();
    let sbom: serde_json::Value = serde_json::from_slice(&std::fs::read(o.join("sbom.spdx.json")).unwrap()).unwrap();
    if kiln_testkit::checker("pyspdxtools", "python3 -m pip install spdx-tools").is_some() {
        let (ok, out) = sh(&format!("pyspdxtools -i {}", o.join("sbom.spdx.json").display()));
        assert!(ok, "pyspdxtools rejected the SBOM:\n{out}");
    }
    let packages = sbom["packages"].as_array().unwrap();
    let package = |name: &str| packages.iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("no package {name} in the SBOM"));
    assert_eq!(package("linux")["versionInfo"], manifest["kernel"]["release"]);
    assert!(package("linux")["comment"].as_str().unwrap().contains(manifest["kernel"]["config_sha256"].as_str().unwrap()));
    let busybox = manifest["inputs"].as_array().unwrap().iter().find(|i| i["name"] == "rootfs.busybox").unwrap();
    assert_eq!(package("busybox-static")["versionInfo"], busybox["version"]);
    assert_eq!(package("busybox-static")["checksums"][0]["checksumValue"], busybox["deb"]["sha256"]);
    assert_eq!(package("linux-source-6.1")["externalRefs"][0]["referenceLocator"].as_str().unwrap().split('@').next().unwrap(), "pkg:deb/debian/linux-source-6.1");
    assert_eq!(package("kiln-stand-in")["checksums"][0]["checksumValue"], manifest["payload"]["sha256"]);
    for c in ["serde", "toml", "ed25519-dalek", "flate2"] {
        let p = package(c);
        assert!(p["externalRefs"][0]["referenceLocator"].as_str().unwrap().starts_with(&format!("pkg:cargo/{c}@")), "{p}");
    }
    let listed: Vec<&str> = sbom["files"].as_array().unwrap().iter().map(|f| f["fileName"].as_str().unwrap().trim_start_matches("./")).collect();
    let expected: Vec<&str> = all.iter().map(String::as_str).filter(|f| !f.starts_with("manifest.json") && !f.starts_with("sbom.spdx.json")).collect();
    assert_eq!(listed, expected);

    // The public key is in the image (in the root squashfs the PXE
    // initramfs carries); the secret key is in no output, compressed or not.
    let key_text = std::fs::read_to_string(t.join("kiln.key")).unwrap();
    let secret_line = key_text.lines().nth(1).unwrap().to_string();
    let raw = kiln_contract::minisign::b64_decode(&secret_line).unwrap();
    let seed = raw[62..94].to_vec(); // after algorithms, salt, KDF limits and key id
    let root = t.join("root");
    let (ok, out) = sh(&format!("zstd -dc {o}/pxe/initramfs.cpio.zst > {t}/initramfs.cpio", o = o.display(), t = t.display()));
    assert!(ok, "{out}");
    let cpio = std::fs::read(t.join("initramfs.cpio")).unwrap();
    let members = kiln_formats::cpio::list(&cpio).unwrap();
    let m = members.iter().find(|m| m.name == "kiln/root.squashfs").expect("the root in the PXE initramfs");
    std::fs::write(t.join("root.squashfs"), &cpio[m.data.clone()]).unwrap();
    let (ok, out) = sh(&format!("cd {t} && unsquashfs -q -n -d {r} root.squashfs", t = t.display(), r = root.display()));
    assert!(ok, "{out}");
    assert_eq!(std::fs::read_to_string(root.join("etc/kiln/update.pub")).unwrap(), std::fs::read_to_string(&public).unwrap());
    let mut searched: Vec<PathBuf> = all.iter().map(|f| o.join(f)).collect();
    searched.push(t.join("initramfs.cpio"));
    let (ok, found) = sh(&format!("find {} -type f", root.display()));
    assert!(ok, "{found}");
    searched.extend(found.lines().map(PathBuf::from));
    assert!(searched.len() > 10);
    for p in &searched {
        let bytes = std::fs::read(p).unwrap();
        assert!(!contains(&bytes, secret_line.as_bytes()) && !contains(&bytes, &seed), "the secret key leaked into {}", p.display());
    }

    // One flipped byte anywhere: both checkers fail, kiln verify names the
    // file. In a signature, each signed line is tried: the signature, the
    // trusted comment and its signature (the first line, the untrusted
    // comment, is signed by nobody, in minisign's format).
    for file in &all {
        let path = o.join(file);
        let original = std::fs::read(&path).unwrap();
        let offsets: Vec<usize> = if file.ends_with(".minisig") {
            let text = String::from_utf8(original.clone()).unwrap();
            let mut at = 0;
            let mut starts = Vec::new();
            for line in text.split_inclusive('\n') {
                starts.push((at, line.trim_end().len()));
                at += line.len();
            }
            starts[1..4].iter().map(|(start, len)| start + len / 2).collect()
        } else {
            vec![original.len() / 2]
        };
        for at in offsets {
            let mut bytes = original.clone();
            bytes[at] ^= 0x01;
            std::fs::write(&path, &bytes).unwrap();
            let (ok, out) = verify();
            assert!(!ok, "kiln verify accepted {file} with byte {at} flipped:\n{out}");
            assert!(out.contains(&format!("{file}:")), "kiln verify does not name {file} (byte {at} flipped):\n{out}");
            if let Some(signed) = ["manifest.json", "sbom.spdx.json"].into_iter().find(|s| file.starts_with(s)) {
                let (ok, out) = minisign(signed);
                assert!(!ok, "minisign accepted {signed} with byte {at} of {file} flipped:\n{out}");
            }
            std::fs::write(&path, &original).unwrap();
        }
    }
    let (ok, out) = verify();
    assert!(ok, "after restoring every file: {out}");

    // A file added to the output, or one removed, is named too.
    std::fs::write(o.join("pxe/extra"), "x").unwrap();
    let (ok, out) = verify();
    assert!(!ok && out.contains("pxe/extra: not in the manifest"), "{out}");
    std::fs::remove_file(o.join("pxe/extra")).unwrap();
    std::fs::rename(o.join("sbom.spdx.json.minisig"), t.join("moved")).unwrap();
    let (ok, out) = verify();
    assert!(!ok && out.contains("sbom.spdx.json.minisig:"), "{out}");
    std::fs::rename(t.join("moved"), o.join("sbom.spdx.json.minisig")).unwrap();

    // The wrong public key is named as such.
    let other = t.join("other");
    std::fs::create_dir_all(&other).unwrap();
    assert!(kiln(&["key", "generate", "--dir", s(&other)]).0);
    let (ok, out) = kiln(&["verify", s(&o), "--key", s(&other.join("kiln.pub"))]);
    assert!(!ok && out.contains("manifest.json.minisig: does not verify manifest.json") && out.contains("key"), "{out}");
}
