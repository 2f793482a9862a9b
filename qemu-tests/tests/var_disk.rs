//! `storage.var_disk` on a PXE-booted node (root in the initramfs, /var on
//! a tmpfs from stage 1): a blank disk is prepared and becomes /var, what is
//! written there survives a reboot, and a disk holding something else is
//! left alone.

mod common;

use common::{boot_with, built, BOOT_TIMEOUT};
use kiln::tools::run::BootFrom;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const PROFILE: &str = "qemu-amd64";
const MIB: u64 = 1 << 20;
const CONFIG: &str =
    "role = \"single\"\n\n[storage]\nvar_disk = \"/dev/vda\"\n\n[debug]\nshell = true\n";

/// A sparse raw file of `bytes`, fresh for each run.
fn raw_disk(name: &str, bytes: u64) -> PathBuf {
    let p = common::scratch().join(name);
    let _ = std::fs::remove_file(&p);
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(bytes))
        .expect("creating the extra disk");
    p
}

fn pxe_with(disk: &Path) -> impl FnOnce(&mut kiln::tools::run::VmSpec) {
    let disk = disk.to_path_buf();
    move |s| {
        s.boot = BootFrom::Pxe;
        s.extra_disk = Some(disk);
    }
}

fn size_of(e: &kiln_contract::event::Event) -> u64 {
    e.get("size").and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[test]
fn a_blank_var_disk_is_prepared_and_keeps_var_across_reboot() {
    let out = built(PROFILE);
    let disk = raw_disk("var-disk.raw", 1 << 30);
    let mut n = boot_with("var_disk", &out, Some(CONFIG), pxe_with(&disk));
    // Stage 1 has no data partition to offer.
    n.event("data-ephemeral", BOOT_TIMEOUT);
    n.event("config-loaded", BOOT_TIMEOUT);
    let prepared = n.event("data-prepared", BOOT_TIMEOUT);
    assert_eq!(prepared.get("disk"), Some("/dev/vda"), "{prepared:?}");
    assert_eq!(prepared.get("dev"), Some("/dev/vda1"), "{prepared:?}");
    let grown = n.event("data-grown", Duration::from_secs(120));
    let mounted = n.event("data-mounted", Duration::from_secs(120));
    assert_eq!(mounted.get("dev"), Some("/dev/vda1"), "{mounted:?}");
    let size = size_of(&mounted);
    assert!(size > 900 * MIB, "/var is {size} bytes ({grown:?})");
    n.event("payload-started", BOOT_TIMEOUT);
    n.standin_checks();
    // /var and the binds into it are on the disk now.
    n.vm.send("\ngrep -e ' /var ' -e cni-bin /proc/self/mountinfo\n")
        .unwrap();
    n.line("/var on /dev/vda1", Duration::from_secs(60), |l| {
        l.contains(" /var ") && l.contains(" ext4 /dev/vda1 ")
    });
    n.vm.send("\ngrep -e ' /var ' -e cni-bin /proc/self/mountinfo\n")
        .unwrap();
    n.line(
        "/opt/cni/bin bound from the disk",
        Duration::from_secs(60),
        |l| l.contains("/lib/kiln/cni-bin /opt/cni/bin ") && l.contains(" /dev/vda1 "),
    );
    n.vm.send("\necho kiln-var-$((6*7)) > /var/lib/k0s/var-disk-test; sync; kill -TERM 1\n")
        .unwrap();
    n.event("shutdown", Duration::from_secs(60));

    // Same QEMU, same disk: the reboot mounts what the first boot made.
    n.event("root-verified", BOOT_TIMEOUT);
    n.event("config-loaded", BOOT_TIMEOUT);
    let again = n.event("data-mounted", BOOT_TIMEOUT);
    assert_eq!(size_of(&again), size, "{again:?}");
    n.event("payload-started", BOOT_TIMEOUT);
    n.standin_checks();
    n.vm.send("\ncat /var/lib/k0s/var-disk-test\n").unwrap();
    n.line(
        "the file written before the reboot",
        Duration::from_secs(60),
        |l| l.trim() == "kiln-var-42",
    );
    let log = n.vm.log();
    let count = |ev: &str| {
        log.iter()
            .filter(|l| kiln_contract::event::parse(l).is_some_and(|e| e.name == ev))
            .count()
    };
    assert_eq!(
        count("data-prepared"),
        1,
        "prepared once, on the first boot"
    );
    assert_eq!(count("data-grown"), 1, "grown once, on the first boot");
    let refusals = log
        .iter()
        .filter_map(|l| kiln_contract::event::parse(l))
        .filter(|e| {
            e.name == "data-ephemeral"
                && e.get("reason")
                    .is_some_and(|r| r.contains("storage.var_disk"))
        })
        .count();
    assert_eq!(refusals, 0, "the var disk was never refused");
    n.vm.kill();

    // The table is sound to other tools too.
    if let Some(sgdisk) = kiln_testkit::checker("sgdisk", "gdisk") {
        let v = Command::new(&sgdisk).arg("-v").arg(&disk).output().unwrap();
        let text = String::from_utf8_lossy(&v.stdout);
        assert!(
            text.contains("No problems found"),
            "sgdisk -v {}: {text}",
            disk.display()
        );
        let i = Command::new(&sgdisk)
            .args(["-i", "1"])
            .arg(&disk)
            .output()
            .unwrap();
        let info = String::from_utf8_lossy(&i.stdout);
        assert!(
            info.contains("'kiln-var'")
                && info.contains("0FC63DAF-8483-4772-8E79-3D69D8477DE4")
                && info.contains("First sector: 2048 "),
            "{info}"
        );
    }
    let _ = std::fs::remove_file(&disk);
}

#[test]
fn a_disk_holding_a_filesystem_is_left_alone() {
    let out = built(PROFILE);
    let disk = raw_disk("var-disk-used.raw", 256 * MIB);
    let mk = kiln_testkit::command("mkfs.ext4")
        .args(["-q", "-F", "-L", "precious"])
        .arg(&disk)
        .output()
        .expect("mkfs.ext4 (apt-get install e2fsprogs)");
    assert!(
        mk.status.success(),
        "{}",
        String::from_utf8_lossy(&mk.stderr)
    );
    let before = std::fs::read(&disk).unwrap();
    let mut n = boot_with("var_disk_used", &out, Some(CONFIG), pxe_with(&disk));
    n.event("data-ephemeral", BOOT_TIMEOUT);
    n.event("config-loaded", BOOT_TIMEOUT);
    let refused = n.event("data-ephemeral", Duration::from_secs(120));
    let reason = refused.get("reason").unwrap_or("");
    assert!(
        reason.contains("/dev/vda")
            && reason.contains("ext2/3/4 filesystem labelled \"precious\"")
            && reason.contains("wipefs"),
        "{refused:?}"
    );
    // The node goes on, on the tmpfs.
    n.event("payload-started", BOOT_TIMEOUT);
    n.standin_checks();
    n.vm.kill();
    assert!(
        std::fs::read(&disk).unwrap() == before,
        "the refused disk was modified"
    );
    let _ = std::fs::remove_file(&disk);
}
