//! Boot disk.raw under OVMF: verified root, growing and persistent /var,
//! node.toml on the ESP, and tampering that must stop the boot.

mod common;

use common::{boot_with, built, copy_disk, part, sh, BOOT_TIMEOUT};
use kiln::tools::run::BootFrom;
use std::path::{Path, PathBuf};
use std::time::Duration;

const PROFILE: &str = "qemu-amd64";
const GIB: u64 = 1 << 30;

fn mtools_img(disk: &Path) -> String {
    common::esp_image(disk)
}

fn disk_spec(disk: Option<PathBuf>, size: u64, overlay: Option<PathBuf>) -> impl FnOnce(&mut kiln::tools::run::VmSpec) {
    move |s| {
        s.boot = BootFrom::Disk;
        s.disk = disk;
        s.disk_size = size;
        s.overlay = overlay;
    }
}

fn stays_down(n: &mut common::Node, secs: u64) {
    let r = n.vm.wait_for("payload-started (must not happen)", Duration::from_secs(secs), |l| {
        kiln_contract::event::parse(l).is_some_and(|e| e.name == "payload-started" || e.name == "switch-root")
    });
    if let Ok(l) = r {
        n.fail(format!("the node went on after a failed root check: {l}"));
    }
}

#[test]
fn disk_boots_grows_data_and_keeps_var_across_reboot() {
    let out = built(PROFILE);
    let overlay = common::scratch().join("persist.qcow2");
    let _ = std::fs::remove_file(&overlay);
    let cfg = "role = \"single\"\n[debug]\nshell = true\n";
    let mut n = boot_with("disk_grow_persist", &out, Some(cfg), disk_spec(None, 4 * GIB, Some(overlay)));
    let v = n.event("root-verified", BOOT_TIMEOUT);
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(v.get("hash"), m["disk"]["roothash"].as_str());
    let grown = n.event("data-grown", BOOT_TIMEOUT);
    let mounted = n.event("data-mounted", BOOT_TIMEOUT);
    let size: u64 = mounted.get("size").and_then(|s| s.parse().ok()).unwrap_or(0);
    assert!(size >= 3 * GIB + GIB / 2, "data grew to {size} bytes ({grown:?})");
    n.event("payload-started", BOOT_TIMEOUT);
    n.standin_checks();
    n.vm.send("\necho kiln-persist-$((6*7)) > /var/lib/k0s/persist-test; sync; kill -TERM 1\n").unwrap();
    n.event("shutdown", Duration::from_secs(60));
    // Same QEMU, same overlay: the reboot sees what was written.
    n.event("root-verified", BOOT_TIMEOUT);
    let again = n.event("data-mounted", BOOT_TIMEOUT);
    assert!(again.get("size").and_then(|s| s.parse::<u64>().ok()).unwrap_or(0) >= size, "{again:?}");
    n.event("payload-started", BOOT_TIMEOUT);
    n.standin_checks();
    n.vm.send("\ncat /var/lib/k0s/persist-test\n").unwrap();
    n.line("the file written before the reboot", Duration::from_secs(60), |l| l.trim() == "kiln-persist-42");
    let log = n.vm.log();
    assert_eq!(log.iter().filter(|l| l.contains("kiln-init: data-grown")).count(), 1, "grows once, on the first boot");
}

#[test]
fn node_toml_on_the_esp_sets_the_hostname() {
    let out = built(PROFILE);
    let disk = copy_disk(&out, "esp_node_toml");
    let cfg = common::scratch().join("esp-node.toml");
    std::fs::write(&cfg, "# written after the build, as a technician would\nrole = \"single\"\nhostname = \"from-the-esp\"\n").unwrap();
    sh(&format!("MTOOLS_SKIP_CHECK=1 mcopy -o -i {} {} ::/node.toml", mtools_img(&disk), cfg.display()));
    let mut n = boot_with("esp_node_toml", &out, None, disk_spec(Some(disk), 0, None));
    let loaded = n.event("config-loaded", BOOT_TIMEOUT);
    assert_eq!(loaded.get("hostname"), Some("from-the-esp"), "{loaded:?}");
    assert_eq!(loaded.get("source"), Some("esp"), "{loaded:?}");
    n.event("payload-started", BOOT_TIMEOUT);
    let checks = n.standin_checks();
    assert!(checks.iter().any(|l| l.contains("check hostname ok")), "{checks:#?}");
}

#[test]
fn a_flipped_byte_in_the_root_stops_the_boot() {
    let out = built(PROFILE);
    let disk = copy_disk(&out, "tamper_squashfs");
    let (off, _) = part(&disk, "root-a");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let sq = m["disk"]["squashfs_bytes"].as_u64().unwrap();
    // Inside the squashfs, in its middle (file data).
    let at = off + sq / 2 + 123;
    common::flip_byte(&disk, at);
    let mut n = boot_with("tamper_squashfs", &out, None, disk_spec(Some(disk), 0, None));
    let failed = n.event("root-failed", BOOT_TIMEOUT);
    assert!(failed.get("reason").unwrap_or("").contains("verity"), "{failed:?}");
    n.event("maintenance", Duration::from_secs(30));
    stays_down(&mut n, 20);
}

#[test]
fn a_changed_root_hash_stops_the_boot() {
    let out = built(PROFILE);
    let disk = copy_disk(&out, "tamper_roothash");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let root = m["disk"]["roothash"].as_str().unwrap().to_string();
    let uki = m["disk"]["uki"].as_str().unwrap().to_string();
    let local = common::scratch().join("tamper.efi");
    let img = mtools_img(&disk);
    sh(&format!("MTOOLS_SKIP_CHECK=1 mcopy -o -i {img} ::/EFI/Linux/{uki} {}", local.display()));
    let mut pe = std::fs::read(&local).unwrap();
    let needle = format!("roothash={root}");
    let at = pe.windows(needle.len()).position(|w| w == needle.as_bytes()).expect("roothash in the UKI") + "roothash=".len() + 10;
    pe[at] = if pe[at] == b'0' { b'1' } else { b'0' };
    std::fs::write(&local, &pe).unwrap();
    sh(&format!("MTOOLS_SKIP_CHECK=1 mcopy -o -i {img} {} ::/EFI/Linux/{uki}", local.display()));
    let mut n = boot_with("tamper_roothash", &out, None, disk_spec(Some(disk), 0, None));
    let failed = n.event("root-failed", BOOT_TIMEOUT);
    assert!(!failed.get("reason").unwrap_or("").is_empty(), "{failed:?}");
    n.event("maintenance", Duration::from_secs(30));
    stays_down(&mut n, 20);
}
