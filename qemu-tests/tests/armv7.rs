//! armv7 (`profiles/qemu-armv7.toml`): the SD-card image booted by u-boot
//! (`qemu_arm` as `-bios`) on QEMU virt with 512 MiB and one CPU, the PXE
//! kernel directly, a tampered root that must stop at the verity check, the
//! memory the OS uses, two byte-identical builds, and A/B updates on the
//! card (u-boot's boot.scr counting tries): a good update, refused bundles,
//! two rollbacks, a new slot that fails in stage 1, power cuts during the
//! apply, and a channel's window.

mod common;

use common::{boot_with, built, sh, BOOT_TIMEOUT};
use kiln::tools::run::BootFrom;
use std::path::{Path, PathBuf};

const PROFILE: &str = "qemu-armv7";
const MIB: u64 = 1 << 20;

/// The factory board's size: one core, 512 MiB; the card is 2 GiB.
fn card(disk: Option<PathBuf>) -> impl FnOnce(&mut kiln::tools::run::VmSpec) {
    move |s| {
        s.boot = BootFrom::Disk;
        s.disk = disk;
        s.disk_size = 2 << 30;
        s.memory_mib = 512;
        s.cpus = 1;
    }
}

#[test]
fn outputs_are_armv7_and_pass_the_format_checkers() {
    let out = built(PROFILE);
    let m = common::manifest(&out);
    assert_eq!(m["arch"], "armv7");
    // Node binaries: static 32-bit ARM executables (glibc, crt-static).
    let nodebin = common::workspace().join("target/kiln-node/armv7-unknown-linux-gnueabihf/node");
    for bin in ["kiln-init", "k0s"] {
        let f = sh(&format!("file -b {}", nodebin.join(bin).display()));
        assert!(f.contains("ARM, EABI5") && f.contains("statically linked"), "{bin}: {f}");
    }
    common::kernel_check_is_clean(&m);
    // The card: a valid MBR, a clean FAT boot partition with extlinux.conf
    // naming the kernel, the initramfs and the root hash.
    let img = out.join("sdcard.img");
    let v = sh(&format!("sfdisk --verify {} 2>&1", img.display()));
    assert!(v.contains("No errors detected"), "{v}");
    let (off, size) = common::mbr_part(&img, 1);
    let boot = common::scratch().join("armv7-boot.img");
    sh(&format!("dd if={} of={} bs=512 skip={} count={} status=none", img.display(), boot.display(), off / 512, size / 512));
    sh(&format!("fsck.vfat -n {} >/dev/null", boot.display()));
    let conf = sh(&format!("MTOOLS_SKIP_CHECK=1 mtype -i {} ::/kiln/a/extlinux.conf", boot.display()));
    let root = m["disk"]["roothash"].as_str().unwrap();
    assert!(conf.contains("/kiln/a/zImage") && conf.contains("/kiln/a/initramfs.cpio.zst") && conf.contains(&format!("roothash={root}")) && conf.contains("console=ttyAMA0"), "{conf}");
    let files = sh(&format!("MTOOLS_SKIP_CHECK=1 mdir -b -i {} ::/kiln/a", boot.display()));
    assert!(files.contains("zImage") && files.contains("initramfs.cpio.zst"), "{files}");
    let files = sh(&format!("MTOOLS_SKIP_CHECK=1 mdir -b -i {} ::/", boot.display()));
    assert!(files.contains("boot.scr") && !files.contains("extlinux"), "{files}");
    let f = sh(&format!("file -b {}", out.join("pxe/vmlinuz").display()));
    assert!(f.contains("ARM") && f.contains("zImage"), "pxe/vmlinuz: {f}");
    // The QEMU board's firmware sits beside the card, not in it.
    assert!(out.join(kiln::tools::run::UBOOT_BIN).is_file());
}

#[test]
fn sd_card_boots_through_u_boot_with_512_mib_and_one_cpu() {
    let out = built(PROFILE);
    let cfg = "role = \"single\"\nhostname = \"armv7-card\"\n";
    let mut n = boot_with("armv7_card", &out, Some(cfg), card(None));
    n.line("boot.scr picks slot a", BOOT_TIMEOUT, |l| l.contains("kiln: slot a (good a"));
    let v = n.event("root-verified", BOOT_TIMEOUT);
    assert_eq!(v.get("hash"), common::manifest(&out)["disk"]["roothash"].as_str());
    // The data partition (MBR partition 4) grows to fill the 2 GiB card.
    let mounted = n.event("data-mounted", BOOT_TIMEOUT);
    let size: u64 = mounted.get("size").and_then(|s| s.parse().ok()).unwrap_or(0);
    assert!(size > 1536 * MIB, "/var is {size} bytes on a 2 GiB card: {mounted:?}");
    let loaded = n.event("config-loaded", BOOT_TIMEOUT);
    assert_eq!(loaded.get("hostname"), Some("armv7-card"), "{loaded:?}");
    let started = n.event("payload-started", BOOT_TIMEOUT);
    let checks = n.standin_checks();
    let failed: Vec<_> = checks.iter().filter(|l| !l.ends_with(" ok")).collect();
    assert!(checks.len() >= 10 && failed.is_empty(), "stand-in checks on armv7: {checks:#?}");
    // The memory the OS uses when the payload starts (MemTotal minus
    // MemAvailable, read by kiln-init before the payload has run): the
    // factory budget is 64 MiB without the payload.
    let used: u64 = started.get("mem_used_kib").and_then(|v| v.parse().ok()).unwrap_or(u64::MAX);
    let total: u64 = started.get("mem_total_kib").and_then(|v| v.parse().ok()).unwrap_or(0);
    eprintln!("armv7 memory at payload-started: used {used} KiB of {total} KiB, kiln-init RSS {} KiB", started.get("init_rss_kib").unwrap_or("?"));
    assert!(total > 400 * 1024 && total <= 512 * 1024, "-m 512: MemTotal {total} KiB");
    assert!(used * 1024 < 64 * MIB, "the OS uses {used} KiB at payload-started, over 64 MiB: {started:?}");
}

#[test]
fn a_tampered_root_stops_at_the_verity_check() {
    let out = built(PROFILE);
    let img = common::scratch().join("armv7-tamper.img");
    sh(&format!("cp --sparse=always {} {}", out.join("sdcard.img").display(), img.display()));
    let (off, _) = common::mbr_part(&img, 2);
    let sq = common::manifest(&out)["disk"]["squashfs_bytes"].as_u64().unwrap();
    let at = off + sq / 2 + 123;
    common::flip_byte(&img, at);
    let mut n = boot_with("armv7_tamper", &out, None, card(Some(img)));
    let failed = n.event("root-failed", BOOT_TIMEOUT);
    assert!(failed.get("reason").unwrap_or("").contains("verity"), "{failed:?}");
    let r = n.vm.wait_for("payload-started (must not happen)", std::time::Duration::from_secs(20), |l| {
        kiln_contract::event::parse(l).is_some_and(|e| e.name == "payload-started" || e.name == "switch-root")
    });
    if let Ok(l) = r {
        n.fail(format!("the node went on after a failed root check: {l}"));
    }
}

#[test]
fn pxe_kernel_and_initramfs_boot_directly() {
    let out = built(PROFILE);
    let mut n = boot_with("armv7_pxe", &out, Some("role = \"single\"\nhostname = \"armv7-pxe\"\n"), |s| {
        s.boot = BootFrom::Pxe;
        s.memory_mib = 512;
        s.cpus = 1;
    });
    let loaded = n.event("config-loaded", BOOT_TIMEOUT);
    assert_eq!(loaded.get("hostname"), Some("armv7-pxe"), "{loaded:?}");
    n.event("payload-started", BOOT_TIMEOUT);
    let checks = n.standin_checks();
    let failed: Vec<_> = checks.iter().filter(|l| !l.ends_with(" ok")).collect();
    assert!(failed.is_empty(), "{failed:#?}");
    // etcd refuses 32-bit arm unless told: k0s runs it with this set.
    let log = n.vm.log();
    assert!(log.iter().any(|l| l.contains("stand-in: env ETCD_UNSUPPORTED_ARCH=arm")), "the controller's etcd needs ETCD_UNSUPPORTED_ARCH=arm on armv7");
}

#[test]
fn two_builds_are_byte_identical() {
    let out = built(PROFILE);
    let cache = kiln::inputs::cache::Cache::default_location();
    let other = common::scratch().join("armv7-again");
    let _ = std::fs::remove_dir_all(&other);
    let again = kiln::pipeline::build(&common::workspace().join("profiles/qemu-armv7.toml"), &other, &cache).unwrap_or_else(|e| panic!("second build: {e:#}"));
    let (a, b) = (common::files(&out), common::files(&again.out));
    assert_eq!(a, b, "the two builds wrote different files");
    assert!(a.iter().any(|n| n == "sdcard.img") && a.iter().any(|n| n == "pxe/initramfs.cpio.zst"), "{a:?}");
    for n in &a {
        assert!(std::fs::read(out.join(n)).unwrap() == std::fs::read(again.out.join(n)).unwrap(), "{n} differs between two armv7 builds");
    }
}

/// An armv7 profile `upd7` at `version`, signed, with a card and a bundle.
fn build_update(dir: &Path, tag: &str, version: &str, extra: &str) -> PathBuf {
    common::build_versioned(dir, "qemu-armv7", "upd7", tag, version, "[\"sdcard\", \"update\"]", extra)
}

/// The signing key and the four builds of `upd7`, once per test binary:
/// 1.0.0, 2.0.0, 3.0.0 (kiln-init panics), 3.0.1 (the payload exits).
struct UpdateBuilds {
    dir: PathBuf,
    key: kiln::provenance::sign::KeyPair,
    v1: PathBuf,
    v2: PathBuf,
    v3: PathBuf,
    v4: PathBuf,
}

fn update_builds() -> &'static UpdateBuilds {
    static B: std::sync::OnceLock<UpdateBuilds> = std::sync::OnceLock::new();
    B.get_or_init(|| {
        let d = common::scratch().join("armv7-updates");
        std::fs::create_dir_all(&d).unwrap();
        let key = kiln::provenance::sign::KeyPair::generate();
        std::fs::write(d.join("kiln.key"), key.to_secret_file()).unwrap();
        let v1 = build_update(&d, "v1", "1.0.0", "");
        let v2 = build_update(&d, "v2", "2.0.0", "");
        let v3 = build_update(&d, "v3", "3.0.0", "\n[kernel]\ncmdline = [\"panic=10\", \"kiln.fault=panic\"]\n");
        // busybox as `k0s`: "applet not found", exit 127, at every start.
        let v4 = build_update(
            &d,
            "v4",
            "3.0.1",
            "\n[payload]\nstand-in = false\nk0s = { deb = \"busybox-static\", version = \"1:1.35.0-4+deb12u1+b1\", sha256 = \"2f68dbeaebeda49f3cde34ac421d5add85fb1c837ff7c4a4971945340d9d66ff\", member = \"bin/busybox\" }\n",
        );
        UpdateBuilds { dir: d, key, v1, v2, v3, v4 }
    })
}

const UPDATE_CONFIG: &str = "role = \"single\"\n\n[update]\ntries = 2\nhealth_seconds = 5\nboot_timeout_seconds = 30\n\n[debug]\nshell = true\n";

/// A/B updates on the card, through u-boot's boot.scr and /kiln/state: a
/// refused bundle of each kind, a good update that keeps /var, an image
/// whose kiln-init panics and one whose payload never becomes healthy, each
/// rolled back by boot.scr once its two tries are spent. The bundles come
/// on a KILNUPD stick, taken in name order (see tests/updates.rs, the same
/// on amd64).
#[test]
fn card_updates_apply_refuse_and_roll_back() {
    use common::expect;
    use kiln::image::update::{Content, PartSource, Spec};
    let UpdateBuilds { dir: d, key, v1, v2, v3, v4 } = update_builds();
    let crafted = |key: &kiln::provenance::sign::KeyPair, arch, version: &str, name: &str| {
        let to = d.join(name);
        let part = |name: &str, kind, n: usize| PartSource { name: name.into(), kind, content: Content::Bytes(vec![0x5a; n]) };
        let cmdline = format!("roothash={}", "ab".repeat(32));
        let parts = [part("root.squashfs", kiln_contract::update::PartKind::Root, 8192), part("root.verity", kiln_contract::update::PartKind::Verity, 4096), part("zImage", kiln_contract::update::PartKind::Kernel, 4096), part("initramfs.cpio.zst", kiln_contract::update::PartKind::Initramfs, 4096)];
        let spec = Spec { version, arch, profile: "upd7", board: Some("qemu-armv7"), roothash: &"ab".repeat(32), cmdline: Some(&cmdline), source_date_epoch: 1 };
        kiln::image::update::write(&to, &spec, &parts, key).unwrap();
        to
    };
    let other_key = crafted(&kiln::provenance::sign::KeyPair::generate(), kiln::arch::Arch::Armv7, "2.0.0", "other-key.kiln");
    let arm64 = crafted(key, kiln::arch::Arch::Arm64, "2.0.0", "arm64.kiln");
    let downgrade = crafted(key, kiln::arch::Arch::Armv7, "0.9.0", "downgrade.kiln");
    let truncated = d.join("truncated.kiln");
    let full = std::fs::read(v2.join("update.kiln")).unwrap();
    std::fs::write(&truncated, &full[..full.len() / 2]).unwrap();
    let stick = common::kilnupd_stick(&d.join("kilnupd.img"), &[
        ("a-other-key.kiln", &other_key),
        ("b-arm64.kiln", &arm64),
        ("c-downgrade.kiln", &downgrade),
        ("d-truncated.kiln", &truncated),
        ("e-2.0.0.kiln", &v2.join("update.kiln")),
        ("f-3.0.0-panic.kiln", &v3.join("update.kiln")),
        ("g-3.0.1-unhealthy.kiln", &v4.join("update.kiln")),
    ]);
    let mut n = boot_with("armv7_updates", v1, Some(UPDATE_CONFIG), move |s| {
        card(None)(s);
        s.extra_disk = Some(stick);
    });
    let long = BOOT_TIMEOUT;
    let skipped = |n: &mut common::Node, file: &str, why: &str| loop {
        let e = n.event("update-skipped", long);
        if e.get("source").is_some_and(|s| s.ends_with(file)) {
            assert!(e.get("reason").is_some_and(|r| r.contains(why)), "{e:?}");
            return;
        }
    };

    // Boot 1: the card as flashed, slot a good; the SoC-style watchdog is
    // QEMU's i6300esb here.
    n.line("boot.scr boots slot a", long, |l| l.contains("kiln: slot a (good a"));
    n.event("watchdog-armed", long);
    n.event("payload-started", long);
    n.vm.send("\necho kiln-var-$((6*7)) > /var/lib/k0s/update-test; sync\n").unwrap();
    let applied = n.event("update-applied", long);
    // The card is good from its first boot, so the stick is read at once:
    // the refusals may come before payload-started. Each, in name order.
    let rejected: Vec<_> = n.vm.log().iter().filter_map(|l| kiln_contract::event::parse(l)).filter(|e| e.name == "update-rejected").collect();
    assert_eq!(rejected.len(), 4, "{rejected:#?}");
    for (r, (file, why)) in rejected.iter().zip([("a-other-key.kiln", "key"), ("b-arm64.kiln", "arm64"), ("c-downgrade.kiln", "0.9.0"), ("d-truncated.kiln", "trunc")]) {
        assert!(r.get("source").unwrap_or_default().ends_with(file), "{r:?}");
        assert!(r.get("reason").unwrap_or_default().to_lowercase().contains(why), "{file}: {r:?}");
    }
    expect(&applied, "version", "2.0.0");
    expect(&applied, "slot", "b");
    expect(&applied, "entry", "kiln/b/extlinux.conf");
    expect(&n.event("shutdown", long), "reason", "update-applied");

    // Boot 2: boot.scr takes a try of b; 2.0.0 runs, keeps /var, is good.
    n.line("boot.scr tries slot b", long, |l| l.contains("kiln: slot b (good a, trying b with 1 tries left)"));
    let t = n.event("boot-trial", long);
    expect(&t, "slot", "b");
    expect(&t, "version", "2.0.0");
    expect(&t, "fallback", "yes");
    n.event("payload-started", long);
    n.vm.send("\ncat /var/lib/k0s/update-test\n").unwrap();
    n.line("/var kept across the update", std::time::Duration::from_secs(60), |l| l.trim() == "kiln-var-42");
    expect(&n.event("boot-good", long), "version", "2.0.0");
    skipped(&mut n, "e-2.0.0.kiln", "already runs");

    // 3.0.0 panics in kiln-init: two tries, then boot.scr boots b again.
    let applied = n.event("update-applied", long);
    expect(&applied, "version", "3.0.0");
    expect(&applied, "slot", "a");
    for left in [1, 0] {
        let f = n.event("boot-failed", long);
        expect(&f, "version", "3.0.0");
        expect(&f, "tries_left", &left.to_string());
    }
    n.line("boot.scr falls back to b", long, |l| l.contains("kiln: slot b (good b"));
    let rb = n.event("rolled-back", long);
    expect(&rb, "from", "3.0.0");
    expect(&rb, "to", "2.0.0");
    expect(&rb, "slot", "a");
    skipped(&mut n, "f-3.0.0-panic.kiln", "rolled back");

    // 3.0.1: the payload never runs 5 s; two tries, then 2.0.0 again.
    let applied = n.event("update-applied", long);
    expect(&applied, "version", "3.0.1");
    for left in [1, 0] {
        let t = n.event("boot-trial", long);
        expect(&t, "version", "3.0.1");
        expect(&t, "tries_left", &left.to_string());
        expect(&n.event("boot-unhealthy", long), "action", "reboot");
    }
    let rb = n.event("rolled-back", long);
    expect(&rb, "from", "3.0.1");
    expect(&rb, "to", "2.0.0");
    n.event("payload-started", long);
    skipped(&mut n, "g-3.0.1-unhealthy.kiln", "rolled back");
    n.vm.send("\ncat /boot/kiln/state\n").unwrap();
    n.line("the state names b good, nothing on trial", std::time::Duration::from_secs(60), |l| l.trim() == "kiln_try=-");
}

/// Power cuts while the card takes an update: while slot b is written,
/// while its extlinux.conf is installed, and at the switch to the trial.
/// Each time the card boots a good slot to the payload, and the update
/// then completes.
#[test]
fn power_loss_during_a_card_update_leaves_a_card_that_boots() {
    use common::expect;
    let UpdateBuilds { dir, v1, v2, .. } = update_builds();
    let stick = common::kilnupd_stick(&dir.join("kilnupd-power.img"), &[("e-2.0.0.kiln", &v2.join("update.kiln"))]);
    let long = BOOT_TIMEOUT;
    for (i, (step, delay_ms)) in [("writing slot b", 300), ("installing slot b", 0), ("switching the boot to slot b", 0)].into_iter().enumerate() {
        let name = format!("armv7_power{i}");
        let overlay = common::scratch().join(format!("{name}.qcow2"));
        let _ = std::fs::remove_file(&overlay);
        let spec = |s: &mut kiln::tools::run::VmSpec| {
            card(None)(s);
            s.overlay = Some(overlay.clone());
            s.extra_disk = Some(stick.clone());
        };
        let mut n = boot_with(&name, v1, Some(UPDATE_CONFIG), spec);
        n.line(step, long, |l| l.contains(&format!("update: {step}")));
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        n.vm.kill();
        drop(n);
        let mut n = boot_with(&format!("{name}-after"), v1, Some(UPDATE_CONFIG), spec);
        let chosen = n.line("boot.scr's choice", long, |l| l.starts_with("kiln: slot "));
        let started = n.event("payload-started", long);
        let log = n.vm.log();
        assert!(!log.iter().any(|l| l.contains("root-failed") || l.contains("maintenance")), "cut at `{step}` +{delay_ms} ms: {started:?}");
        let next = n.update_resumed("2.0.0", long);
        expect(&next, "version", "2.0.0");
        expect(&n.event("boot-good", long), "version", "2.0.0");
        eprintln!("cut at `{step}` +{delay_ms} ms: boot.scr said `{chosen}`; {}", if next.name == "update-applied" { "1.0.0 booted and applied the bundle again" } else { "2.0.0 booted on trial" });
    }
}

/// A card whose new slot fails in stage 1 (a block of slot b's root
/// damaged after the update was written, so the verity check stops it):
/// stage 1 sees on the boot FAT that b is on trial with a good a to fall
/// back to, reports `boot-failed stage=1` and reboots rather than wait in
/// maintenance; after the two tries boot.scr boots a, which reports the
/// rollback.
#[test]
fn a_trial_slot_that_fails_in_stage_1_rolls_back() {
    use common::expect;
    let UpdateBuilds { dir, v1, v2, .. } = update_builds();
    let stick = common::kilnupd_stick(&dir.join("kilnupd-stage1.img"), &[("e-2.0.0.kiln", &v2.join("update.kiln"))]);
    let long = BOOT_TIMEOUT;
    let overlay = common::scratch().join("armv7_stage1.qcow2");
    let _ = std::fs::remove_file(&overlay);
    let mut n = boot_with("armv7_stage1", v1, Some(UPDATE_CONFIG), |s| {
        card(None)(s);
        s.overlay = Some(overlay.clone());
        s.extra_disk = Some(stick);
    });
    expect(&n.event("update-applied", long), "slot", "b");
    expect(&n.event("shutdown", long), "reason", "update-applied");
    // Linux is down once u-boot starts again: everything is on the card.
    n.line("u-boot again", long, |l| l.contains("U-Boot "));
    n.vm.kill();
    drop(n);
    // 4 KiB in the middle of slot b's squashfs (partition 3).
    let (off, _) = common::mbr_part(&v1.join("sdcard.img"), 3);
    let at = (off + common::manifest(v2)["disk"]["squashfs_bytes"].as_u64().unwrap() / 2) & !4095;
    sh(&format!("qemu-io -f qcow2 -c 'write -P 0x5a {at} 4096' {}", overlay.display()));

    let mut n = boot_with("armv7_stage1-after", v1, Some(UPDATE_CONFIG), |s| {
        card(None)(s);
        s.overlay = Some(overlay.clone());
    });
    for left in [1, 0] {
        n.line("boot.scr tries slot b", long, |l| l.contains(&format!("kiln: slot b (good a, trying b with {left} tries left)")));
        let failed = n.event("root-failed", long);
        assert!(failed.get("reason").unwrap_or("").contains("verity"), "{failed:?}");
        common::expect_all(&n.event("boot-failed", long), &[("stage", "1"), ("slot", "b"), ("tries_left", &left.to_string()), ("action", "reboot")]);
    }
    n.line("boot.scr falls back to a", long, |l| l.contains("kiln: slot a (good a"));
    common::expect_all(&n.event("rolled-back", long), &[("from", "2.0.0"), ("to", "1.0.0"), ("slot", "b")]);
    n.event("payload-started", long);
    assert!(!n.vm.log().iter().filter_map(|l| kiln_contract::event::parse(l)).any(|e| e.name == "maintenance"), "stage 1 parked instead of rebooting");
}

/// A channel drives the card's update in its maintenance window: a
/// loopback HTTP server serves index.yaml with a `linux-arm` bundle, and
/// nothing is asked of it before the window opens.
#[test]
fn a_card_takes_a_channel_update_in_its_window() {
    use common::expect;
    let UpdateBuilds { v1, v2, .. } = update_builds();
    let bundle = std::fs::read(v2.join("update.kiln")).unwrap();
    let sha = kiln_contract::digest::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bundle));
    let index = format!("version: 2.0.0\nplatforms:\n  linux-amd64:\n    url: 2.0.0/amd64/update.kiln\n    sha256: \"{}\"\n  linux-arm:\n    url: 2.0.0/armv7/update.kiln\n    sha256: {sha}\n", "0".repeat(64));
    let (port, requests) = common::serve(vec![("/kiln/stable/index.yaml".into(), index.into_bytes()), ("/kiln/stable/2.0.0/armv7/update.kiln".into(), bundle)]);
    let opens = (common::unix_now() + 100).div_ceil(60) * 60;
    let start = format!("{:02}:{:02}", opens / 3600 % 24, opens / 60 % 60);
    let config = format!(
        "role = \"single\"\n\n[update]\ntries = 2\nhealth_seconds = 5\nboot_timeout_seconds = 30\nserver = \"http://10.0.2.2:{port}/kiln\"\nchannel = \"stable\"\n\n[update.window]\nstart = \"{start}\"\nlength_minutes = 30\n"
    );
    let mut n = boot_with("armv7_channel", v1, Some(&config), card(None));
    let long = BOOT_TIMEOUT;
    let closed = n.event("update-window", long);
    expect(&closed, "state", "closed");
    let opens_in: u64 = closed.get("opens_in").and_then(|s| s.parse().ok()).unwrap_or(0);
    assert!(opens_in > 0, "{closed:?}");
    let open = n.event("update-window", std::time::Duration::from_secs(opens_in + 120));
    expect(&open, "state", "open");
    let checked = n.event("update-checked", long);
    expect(&checked, "result", "newer");
    let applied = n.event("update-applied", long);
    expect(&applied, "version", "2.0.0");
    expect(&applied, "slot", "b");
    assert_eq!(applied.get("source"), Some(format!("http://10.0.2.2:{port}/kiln/stable/2.0.0/armv7/update.kiln").as_str()), "{applied:?}");
    n.line("boot.scr tries slot b", long, |l| l.contains("kiln: slot b (good a, trying b"));
    expect(&n.event("boot-trial", long), "version", "2.0.0");
    expect(&n.event("boot-good", long), "version", "2.0.0");
    common::asked_nothing_before(opens, &open, &requests, &["/kiln/stable/index.yaml", "/kiln/stable/2.0.0/armv7/update.kiln"]);
}
