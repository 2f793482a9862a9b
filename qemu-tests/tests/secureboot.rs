//! Secure Boot under OVMF with Debian's snakeoil keys enrolled: an image
//! signed with the snakeoil key boots with Secure Boot enforcing, and the
//! firmware refuses an unsigned image and a signed UKI changed after
//! signing.

mod common;

use common::{boot_with, BOOT_TIMEOUT};
use kiln::tools::run::BootFrom;
use std::path::{Path, PathBuf};
use std::process::Command;

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(out.status.success(), "`{cmd}`: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    kiln_testkit::output_text(&out)
}

/// Copies `from` to `to` with mtools; `img` is the ESP, `::/…` paths are in it.
fn mcopy(img: &str, from: &str, to: &str) {
    sh(&format!("MTOOLS_SKIP_CHECK=1 mcopy -o -i {img} {from} {to}"));
}

/// (file offset, size) of a PE section.
fn section(pe: &[u8], name: &str) -> (usize, usize) {
    let u16_at = |o: usize| u16::from_le_bytes([pe[o], pe[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes([pe[o], pe[o + 1], pe[o + 2], pe[o + 3]]) as usize;
    let coff = u32_at(0x3c) + 4;
    let table = coff + 20 + u16_at(coff + 16);
    (0..u16_at(coff + 2))
        .map(|i| table + 40 * i)
        .find(|s| pe[*s..*s + 8].split(|b| *b == 0).next() == Some(name.as_bytes()))
        .map(|s| (u32_at(s + 20), u32_at(s + 16)))
        .unwrap_or_else(|| panic!("no {name} section"))
}

/// Writes a profile extending qemu-amd64 (disk only) into `dir`.
fn profile(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let p = dir.join(format!("profiles/{name}.toml"));
    std::fs::write(
        &p,
        format!(
            "extends = \"{}\"\nname = \"{name}\"\noutputs = [\"disk\"]\n[node]\nconfig = \"nodes/single.toml\"\n{extra}",
            common::workspace().join("profiles/qemu-amd64.toml").display()
        ),
    )
    .unwrap();
    p
}

fn secure(disk: Option<PathBuf>) -> impl FnOnce(&mut kiln::tools::run::VmSpec) {
    move |s| {
        s.boot = BootFrom::Disk;
        s.disk = disk;
        s.secure_boot = true;
    }
}

/// The firmware (or systemd-boot, through the firmware) refuses the image:
/// `refusal` matches a console line, the firmware runs out of boot options,
/// and nothing of the image ran.
fn refused(test: &str, out: &Path, disk: Option<PathBuf>, what: &str, refusal: impl Fn(&str) -> bool) {
    let mut n = boot_with(test, out, None, secure(disk));
    n.line(what, BOOT_TIMEOUT, refusal);
    // OVMF then tries its other boot options (the built-in shell is not
    // signed either) and gives up.
    n.line("OVMF giving up", BOOT_TIMEOUT, |l| l.contains("No bootable option or device was found"));
    if let Some(l) = n.vm.log().iter().find(|l| l.contains("kiln-init:") || l.contains("Linux version")) {
        n.fail(format!("the refused image ran anyway: {l}"));
    }
}

#[test]
fn signed_boots_enforcing_unsigned_and_tampered_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let t = d.path();
    std::fs::create_dir_all(t.join("profiles/nodes")).unwrap();
    std::fs::write(t.join("profiles/nodes/single.toml"), "role = \"single\"\n").unwrap();
    // The snakeoil db key is shipped encrypted (password `snakeoil`); kiln
    // signs with unencrypted keys.
    let key = t.join("db.key");
    sh(&format!("openssl pkey -in /usr/share/ovmf/PkKek-1-snakeoil.key -passin pass:snakeoil -out {}", key.display()));
    std::fs::copy("/usr/share/ovmf/PkKek-1-snakeoil.pem", t.join("db.pem")).unwrap();
    let signed = profile(t, "sb-signed", "[secureboot]\nkey = \"../db.key\"\ncert = \"../db.pem\"\n");
    let unsigned = profile(t, "sb-unsigned", "");
    std::env::set_var("KILN_SOURCE_DIR", common::workspace());
    let signed = common::built(&signed.to_string_lossy());
    let unsigned = common::built(&unsigned.to_string_lossy());

    // Every EFI binary on the signed ESP verifies against the certificate.
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(signed.join("manifest.json")).unwrap()).unwrap();
    let uki = m["disk"]["uki"].as_str().unwrap().to_string();
    let img = common::esp_image(&signed.join("disk.raw"));
    for f in ["/EFI/BOOT/BOOTX64.EFI", "/EFI/systemd/systemd-bootx64.efi", &format!("/EFI/Linux/{uki}")] {
        let local = t.join("check.efi");
        mcopy(&img, &format!("::{f}"), &local.display().to_string());
        let v = sh(&format!("sbverify --cert {} {}", t.join("db.pem").display(), local.display()));
        assert!(v.contains("Signature verification OK"), "{f}: {v}");
    }

    // 1. Signed: boots with Secure Boot enforcing.
    {
        let mut n = boot_with("secureboot_signed", &signed, None, secure(None));
        let started = n.line("stage 2 `started` with secureboot=", BOOT_TIMEOUT, |l| {
            kiln_contract::event::parse(l).is_some_and(|e| e.name == "started" && e.get("secureboot").is_some())
        });
        let e = kiln_contract::event::parse(&started).unwrap();
        assert_eq!(e.get("secureboot"), Some("on"), "{started}");
        n.event("payload-started", BOOT_TIMEOUT);
    }

    // 2. Unsigned: the firmware will not run systemd-boot.
    refused("secureboot_unsigned", &unsigned, None, "OVMF refusing systemd-boot", |l| l.contains("BdsDxe: failed to load Boot0001") && l.contains("Access Denied"));

    // 3. Signed, then one byte of the kernel inside the UKI changed:
    //    systemd-boot (signed) runs, the firmware refuses the UKI.
    let disk = common::scratch().join("secureboot_tampered.raw");
    sh(&format!("cp --sparse=always {} {}", signed.join("disk.raw").display(), disk.display()));
    let img = common::esp_image(&disk);
    let local = t.join("tampered.efi");
    mcopy(&img, &format!("::/EFI/Linux/{uki}"), &local.display().to_string());
    let mut pe = std::fs::read(&local).unwrap();
    let (off, size) = section(&pe, ".linux");
    pe[off + size / 2] ^= 0x01;
    std::fs::write(&local, &pe).unwrap();
    let v = Command::new("sbverify").arg("--cert").arg(t.join("db.pem")).arg(&local).output().unwrap();
    assert!(!v.status.success(), "sbverify accepted the changed UKI");
    mcopy(&img, &local.display().to_string(), &format!("::/EFI/Linux/{uki}"));
    refused("secureboot_tampered", &signed, Some(disk.clone()), "systemd-boot failing to load the UKI", |l| l.contains("Error loading \\EFI\\Linux\\") && l.contains("Access Denied"));
    let _ = std::fs::remove_file(&disk);
}
