//! The hybrid ISO: checked by xorriso and sgdisk, booted as a CD and as a
//! USB stick under OVMF, as a CD under SeaBIOS (isolinux), and used as an
//! installer onto a blank disk.

mod common;

use common::{boot_with, built, BOOT_TIMEOUT};
use kiln::tools::run::BootFrom;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const PROFILE: &str = "qemu-amd64";
const GIB: u64 = 1 << 30;

fn run(cmd: &str) -> (bool, String) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    (out.status.success(), kiln_testkit::output_text(&out))
}

fn iso(out: &Path) -> PathBuf {
    out.join(format!("{PROFILE}.iso"))
}

fn iso_spec(boot: BootFrom) -> impl FnOnce(&mut kiln::tools::run::VmSpec) {
    move |s| s.boot = boot
}

/// Boots to payload-started from the medium: verified root, /var on tmpfs
/// (announced), every stand-in check ok.
fn boots_from_the_medium(test: &str, boot: BootFrom) {
    let out = built(PROFILE);
    let mut n = boot_with(test, &out, Some("role = \"single\"\nhostname = \"iso-node\"\n"), iso_spec(boot));
    let v = n.event("root-verified", BOOT_TIMEOUT);
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(v.get("hash"), m["disk"]["roothash"].as_str());
    let eph = n.event("data-ephemeral", BOOT_TIMEOUT);
    assert!(eph.get("reason").unwrap_or("").contains("ISO"), "{eph:?}");
    let loaded = n.event("config-loaded", BOOT_TIMEOUT);
    assert_eq!(loaded.get("hostname"), Some("iso-node"), "{loaded:?}");
    n.event("payload-started", BOOT_TIMEOUT);
    let checks = n.standin_checks();
    let failed: Vec<_> = checks.iter().filter(|l| !l.ends_with(" ok")).collect();
    assert!(failed.is_empty(), "stand-in checks failed: {failed:#?}");
}

#[test]
fn iso_has_bios_and_uefi_boot_entries_and_a_valid_gpt() {
    let out = built(PROFILE);
    let iso = iso(&out);
    let (ok, report) = run(&format!("xorriso -indev {} -report_el_torito plain", iso.display()));
    assert!(ok, "{report}");
    let entries: Vec<&str> = report.lines().filter(|l| l.starts_with("El Torito boot img :")).collect();
    assert_eq!(entries.len(), 2, "{report}");
    assert!(entries.iter().any(|l| l.contains("BIOS") && l.contains(" y ")), "a bootable BIOS entry: {report}");
    assert!(entries.iter().any(|l| l.contains("UEFI") && l.contains(" y ")), "a bootable UEFI entry: {report}");
    assert!(report.contains("/ISOLINUX/ISOLINUX.BIN") || report.contains("/isolinux/isolinux.bin"), "{report}");
    let (ok, v) = run(&format!("sgdisk -v {}", iso.display()));
    assert!(ok && v.contains("No problems found"), "{v}");
    let (ok, parts) = run(&format!("sfdisk --json {}", iso.display()));
    assert!(ok, "{parts}");
    for name in ["esp", "root-a", "root-a-verity", "kiln-install"] {
        assert!(parts.contains(&format!("\"name\":\"{name}\"")) || parts.contains(&format!("\"name\": \"{name}\"")), "partition {name}: {parts}");
    }
    // The ESP image inside is a clean FAT with systemd-boot and the UKI.
    let scratch = common::scratch().join("iso-extract");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    let (ok, x) = run(&format!("osirrox -indev {} -extract /BOOT/EFI.IMG {}/efi.img", iso.display(), scratch.display()));
    assert!(ok, "{x}");
    let (ok, f) = run(&format!("fsck.vfat -n {}/efi.img", scratch.display()));
    assert!(ok, "{f}");
    let (ok, l) = run(&format!("MTOOLS_SKIP_CHECK=1 mdir -/ -b -i {}/efi.img ::/", scratch.display()));
    assert!(ok && l.contains("BOOTX64.EFI") && l.contains(&format!("kiln-{PROFILE}.efi")), "{l}");
}

#[test]
fn iso_boots_as_a_cd_under_ovmf() {
    boots_from_the_medium("iso_cd_ovmf", BootFrom::Iso);
}

#[test]
fn iso_boots_as_a_usb_stick_under_ovmf() {
    boots_from_the_medium("iso_usb_ovmf", BootFrom::IsoUsb);
}

#[test]
fn iso_boots_as_a_cd_under_seabios() {
    boots_from_the_medium("iso_cd_seabios", BootFrom::IsoBios);
}

#[test]
fn iso_installs_onto_a_blank_disk_which_then_boots_with_a_persistent_var() {
    let out = built(PROFILE);
    let target = common::scratch().join("install-target.raw");
    let _ = std::fs::remove_file(&target);
    std::fs::File::create(&target).unwrap().set_len(2 * GIB).unwrap();
    let cfg = "role = \"single\"\n[install]\ndisk = \"/dev/vda\"\n";
    let t = target.clone();
    let mut n = boot_with("iso_install", &out, Some(cfg), move |s| {
        s.boot = BootFrom::Iso;
        s.extra_disk = Some(t);
        // The installer reboots; QEMU exits instead, as if the medium
        // were pulled.
        s.extra_args.push("-no-reboot".into());
    });
    let started = n.event("install-started", BOOT_TIMEOUT);
    assert_eq!(started.get("target"), Some("/dev/vda"), "{started:?}");
    let done = n.event("install-complete", BOOT_TIMEOUT);
    assert_eq!(done.get("verified"), Some("yes"), "{done:?}");
    n.event("shutdown-complete", Duration::from_secs(60));
    if let Err(e) = n.vm.wait_exit(Duration::from_secs(60)) {
        n.fail(e);
    }
    drop(n);

    // The installed disk, alone, under OVMF, keeping writes across a reboot.
    let overlay = common::scratch().join("installed.qcow2");
    let _ = std::fs::remove_file(&overlay);
    let (disk, ov) = (target.clone(), overlay.clone());
    let mut n = boot_with("iso_installed_disk", &out, Some("role = \"single\"\n[debug]\nshell = true\n"), move |s| {
        s.boot = BootFrom::Disk;
        s.disk = Some(disk);
        s.overlay = Some(ov);
    });
    n.event("root-verified", BOOT_TIMEOUT);
    n.event("data-grown", BOOT_TIMEOUT);
    let mounted = n.event("data-mounted", BOOT_TIMEOUT);
    assert!(mounted.get("size").and_then(|s| s.parse::<u64>().ok()).unwrap_or(0) > GIB, "/var fills the 2 GiB disk: {mounted:?}");
    n.event("payload-started", BOOT_TIMEOUT);
    n.standin_checks();
    n.vm.send("\necho kiln-installed-$((6*7)) > /var/lib/k0s/persist-test; sync; kill -TERM 1\n").unwrap();
    n.event("shutdown", Duration::from_secs(60));
    n.event("root-verified", BOOT_TIMEOUT);
    n.event("data-mounted", BOOT_TIMEOUT);
    n.event("payload-started", BOOT_TIMEOUT);
    n.standin_checks();
    n.vm.send("\ncat /var/lib/k0s/persist-test\n").unwrap();
    n.line("the file written before the reboot", Duration::from_secs(60), |l| l.trim() == "kiln-installed-42");
}

#[test]
fn iso_with_the_root_in_ram_runs_from_copies_in_memory() {
    // A profile that only changes [iso] root; outside profiles/, so it names
    // its base and default config by absolute path.
    let ws = common::workspace();
    let dir = common::scratch().join("ram-profile");
    std::fs::create_dir_all(&dir).unwrap();
    let profile = dir.join("qemu-amd64-ram.toml");
    std::fs::write(
        &profile,
        format!(
            "extends = \"{base}\"\nname = \"qemu-amd64-ram\"\noutputs = [\"iso\"]\n[iso]\nroot = \"ram\"\n[node]\nconfig = \"{node}\"\n",
            base = ws.join("profiles/qemu-amd64.toml").display(),
            node = ws.join("profiles/nodes/single.toml").display()
        ),
    )
    .unwrap();
    std::env::set_var("KILN_SOURCE_DIR", &ws);
    let out = built(profile.to_str().unwrap());
    let mut n = boot_with("iso_ram", &out, Some("role = \"single\"\n[debug]\nshell = true\n"), iso_spec(BootFrom::Iso));
    n.line("the root copied into RAM", BOOT_TIMEOUT, |l| l.contains("kiln.root=ram: root copied into RAM"));
    n.event("root-verified", BOOT_TIMEOUT);
    n.event("payload-started", BOOT_TIMEOUT);
    n.standin_checks();
    // dm-verity sits on loop devices backed by the copies, not on the CD.
    n.vm.send("\nfor d in /sys/block/dm-0/slaves/*; do cat $d/loop/backing_file; done\n").unwrap();
    n.line("the root's backing file", Duration::from_secs(60), |l| l.trim().starts_with("/kiln/root.squashfs"));
}
