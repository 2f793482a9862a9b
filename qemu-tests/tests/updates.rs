//! A/B updates under QEMU (amd64, OVMF, TCG): one disk taken through a
//! good update, four refused bundles, an image whose kiln-init panics and
//! one whose payload never becomes healthy, each rolled back by
//! systemd-boot's boot counting alone.
//!
//! The bundles reach the node on a `KILNUPD` volume (a FAT disk, as a USB
//! stick would carry them). The node takes them in name order and applies
//! the first good one it has not run or rolled back before:
//!
//! | file | what | expected |
//! |------|------|----------|
//! | `a-other-key.kiln` | signed with another key | `update-rejected` (signature) |
//! | `b-arm64.kiln` | signed, for arm64 | `update-rejected` (arch) |
//! | `c-downgrade.kiln` | signed, version 0.9.0 | `update-rejected` (older) |
//! | `d-truncated.kiln` | 2.0.0 cut short | `update-rejected` (truncated) |
//! | `e-2.0.0.kiln` | good | applied to slot b; boots; marked good |
//! | `f-3.0.0-panic.kiln` | kiln-init panics (`kiln.fault=panic`) | two tries, then back to 2.0.0 |
//! | `g-3.0.1-unhealthy.kiln` | the payload exits at once | two tries, then back to 2.0.0 |

mod common;

use common::{boot_with, expect, scratch, BOOT_TIMEOUT};
use kiln::tools::run::BootFrom;
use kiln::provenance::sign::KeyPair;
use kiln::image::update::{Content, PartSource, Spec};
use kiln_contract::event::Event;
use kiln_contract::update::PartKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

const NAME: &str = "upd";
/// Boots a new image gets (node.toml `update.tries`).
const TRIES: u32 = 2;
const CONFIG: &str = "role = \"single\"\n\n[update]\ntries = 2\nhealth_seconds = 5\nboot_timeout_seconds = 30\n\n[debug]\nshell = true\n";

fn dir() -> PathBuf {
    let d = scratch().join("updates");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A profile `upd` at `version`, signed with `key`, with `extra` appended.
fn build(tag: &str, version: &str, extra: &str) -> PathBuf {
    common::build_versioned(&dir(), "qemu-amd64", NAME, tag, version, "[\"disk\", \"update\"]", extra)
}

/// A well-formed bundle of `upd` with small stand-in parts, signed by `key`.
fn crafted(key: &KeyPair, arch: kiln::arch::Arch, version: &str, to: &Path) {
    let part = |name: &str, kind, n: usize| PartSource { name: name.into(), kind, content: Content::Bytes(vec![0x5a; n]) };
    let parts = [part("root.squashfs", PartKind::Root, 8192), part("root.verity", PartKind::Verity, 4096), part("kiln.efi", PartKind::Uki, 4096)];
    let spec = Spec { version, arch, profile: NAME, board: None, roothash: &"ab".repeat(32), cmdline: None, source_date_epoch: 1 };
    kiln::image::update::write(to, &spec, &parts, key).unwrap();
}

/// A KILNUPD stick in this test's scratch directory.
fn stick(name: &str, files: &[(&str, &Path)]) -> PathBuf {
    common::kilnupd_stick(&dir().join(name), files)
}

/// Waits for a `boot-trial` event and checks it.
fn trial(n: &mut common::Node, slot: &str, version: &str, fallback: &str) -> Event {
    let t = n.event("boot-trial", BOOT_TIMEOUT);
    expect(&t, "slot", slot);
    expect(&t, "version", version);
    expect(&t, "fallback", fallback);
    t
}

/// Waits for the `update-skipped` event of `file` (others may come first).
fn skipped(n: &mut common::Node, file: &str, why: &str) {
    loop {
        let e = n.event("update-skipped", BOOT_TIMEOUT);
        if e.get("source").is_some_and(|s| s.ends_with(file)) {
            assert!(e.get("reason").is_some_and(|r| r.contains(why)), "{e:?}");
            return;
        }
    }
}


/// The key and the four builds, once per test binary.
struct Builds {
    key: KeyPair,
    v1: PathBuf,
    v2: PathBuf,
    v3: PathBuf,
    v4: PathBuf,
}

fn builds() -> &'static Builds {
    static B: std::sync::OnceLock<Builds> = std::sync::OnceLock::new();
    B.get_or_init(|| {
    let d = dir();
    let key = KeyPair::generate();
    std::fs::write(d.join("kiln.key"), key.to_secret_file()).unwrap();
    let v1 = build("v1", "1.0.0", "");
    let v2 = build("v2", "2.0.0", "");
    let v3 = build("v3", "3.0.0", "\n[kernel]\ncmdline = [\"console=ttyS0,115200\", \"panic=10\", \"kiln.fault=panic\"]\n");
    // busybox as `k0s`: "applet not found", exit 127, at every start.
    let v4 = build(
        "v4",
        "3.0.1",
        "\n[payload]\nstand-in = false\nk0s = { deb = \"busybox-static\", version = \"1:1.35.0-4+deb12u1+b1\", sha256 = \"3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb108744\", member = \"bin/busybox\" }\n",
    );
    Builds { key, v1, v2, v3, v4 }
    })
}

#[test]
fn updates_apply_refuse_and_roll_back() {
    let d = dir();
    let Builds { key, v1, v2, v3, v4 } = builds();

    let other_key = d.join("other-key.kiln");
    crafted(&KeyPair::generate(), kiln::arch::Arch::Amd64, "2.0.0", &other_key);
    let arm64 = d.join("arm64.kiln");
    crafted(key, kiln::arch::Arch::Arm64, "2.0.0", &arm64);
    let downgrade = d.join("downgrade.kiln");
    crafted(key, kiln::arch::Arch::Amd64, "0.9.0", &downgrade);
    let truncated = d.join("truncated.kiln");
    let full = std::fs::read(v2.join("update.kiln")).unwrap();
    std::fs::write(&truncated, &full[..full.len() / 2]).unwrap();
    let stick = stick("kilnupd.img", &[
        ("a-other-key.kiln", &other_key),
        ("b-arm64.kiln", &arm64),
        ("c-downgrade.kiln", &downgrade),
        ("d-truncated.kiln", &truncated),
        ("e-2.0.0.kiln", &v2.join("update.kiln")),
        ("f-3.0.0-panic.kiln", &v3.join("update.kiln")),
        ("g-3.0.1-unhealthy.kiln", &v4.join("update.kiln")),
    ]);

    let disk = common::copy_disk(v1, "updates");
    let mut n = boot_with("updates", v1, Some(CONFIG), |s| {
        s.boot = BootFrom::Disk;
        s.disk = Some(disk.clone());
        s.extra_disk = Some(stick.clone());
    });
    let long = BOOT_TIMEOUT;

    // Boot 1: the first image, on trial until its payload has run 5 s.
    n.event("watchdog-armed", long);
    trial(&mut n, "a", "1.0.0", "no");
    n.event("payload-started", long);
    n.vm.send("\necho kiln-var-$((6*7)) > /var/lib/k0s/update-test; sync\n").unwrap();
    let good = n.event("boot-good", long);
    expect(&good, "entry", "kiln-upd-a.efi");
    // The refused bundles, each with its reason, and nothing applied.
    for (file, why) in [
        ("a-other-key.kiln", "key"),
        ("b-arm64.kiln", "arm64"),
        ("c-downgrade.kiln", "0.9.0"),
        ("d-truncated.kiln", "trunc"),
    ] {
        let r = n.event("update-rejected", long);
        let source = r.get("source").unwrap_or_default().to_string();
        let reason = r.get("reason").unwrap_or_default().to_lowercase();
        assert!(source.ends_with(file), "{r:?}");
        assert!(reason.contains(why), "{file}: {r:?}");
    }
    let applied = n.event("update-applied", long);
    expect(&applied, "version", "2.0.0");
    expect(&applied, "from", "1.0.0");
    expect(&applied, "slot", "b");
    expect(&applied, "entry", &format!("kiln-upd-b+{TRIES}.efi"));
    expect(&n.event("shutdown", long), "reason", "update-applied");

    // Boot 2: systemd-boot picks 2.0.0, which is marked good and has /var.
    trial(&mut n, "b", "2.0.0", "yes");
    n.event("payload-started", long);
    n.vm.send("\ncat /var/lib/k0s/update-test\n").unwrap();
    n.line("/var kept across the update", Duration::from_secs(60), |l| l.trim() == "kiln-var-42");
    expect(&n.event("boot-good", long), "version", "2.0.0");
    skipped(&mut n, "e-2.0.0.kiln", "already runs");

    // 3.0.0: kiln-init panics; two tries, then 2.0.0 again.
    let applied = n.event("update-applied", long);
    expect(&applied, "version", "3.0.0");
    expect(&applied, "slot", "a");
    // It panics before it assesses the boot; the panic handler says which
    // try this was.
    for left in (0..TRIES).rev() {
        let f = n.event("boot-failed", long);
        expect(&f, "version", "3.0.0");
        expect(&f, "tries_left", &left.to_string());
        expect(&f, "action", "reboot");
    }
    let rb = n.event("rolled-back", long);
    expect(&rb, "from", "3.0.0");
    expect(&rb, "to", "2.0.0");
    expect(&rb, "slot", "a");
    skipped(&mut n, "e-2.0.0.kiln", "already runs");
    skipped(&mut n, "f-3.0.0-panic.kiln", "rolled back");

    // 3.0.1: the payload never runs 5 s; two tries, then 2.0.0 again.
    let applied = n.event("update-applied", long);
    expect(&applied, "version", "3.0.1");
    for left in (0..TRIES).rev() {
        let t = n.event("boot-trial", long);
        expect(&t, "version", "3.0.1");
        expect(&t, "tries_left", &left.to_string());
        expect(&n.event("boot-unhealthy", long), "action", "reboot");
    }
    let rb = n.event("rolled-back", long);
    expect(&rb, "from", "3.0.1");
    expect(&rb, "to", "2.0.0");
    // 2.0.0 stays, good, and takes none of the bundles again.
    n.event("payload-started", long);
    skipped(&mut n, "e-2.0.0.kiln", "already runs");
    skipped(&mut n, "f-3.0.0-panic.kiln", "rolled back");
    skipped(&mut n, "g-3.0.1-unhealthy.kiln", "rolled back");
    n.vm.send("\nls /boot/EFI/Linux/\n").unwrap();
    n.line("the ESP's entries", Duration::from_secs(60), |l| l.contains("kiln-upd-b.efi"));
}

#[test]
fn a_channel_update_waits_for_its_window() {
    let Builds { v1, v2, .. } = builds();
    let bundle = std::fs::read(v2.join("update.kiln")).unwrap();
    let sha = kiln_contract::digest::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bundle));
    let index = format!("# kiln test channel\nversion: 2.0.0\nplatforms:\n  linux-amd64:\n    url: 2.0.0/update.kiln\n    sha256: {sha}\n  linux-arm:\n    url: 2.0.0/armv7/update.kiln\n    sha256: \"{}\"\n", "0".repeat(64));
    // Over HTTPS: the image trusts the test CA (common::build_versioned).
    let (port, requests) = common::serve_tls(vec![("/kiln/stable/index.yaml".into(), index.into_bytes()), ("/kiln/stable/2.0.0/update.kiln".into(), bundle)]);
    // The window opens at the start of a minute at least 100 s from now
    // (the node is good by then), every day, for 30 minutes.
    let opens = (common::unix_now() + 100).div_ceil(60) * 60;
    let start = format!("{:02}:{:02}", opens / 3600 % 24, opens / 60 % 60);
    let config = format!(
        "role = \"single\"\n\n[update]\ntries = 2\nhealth_seconds = 5\nboot_timeout_seconds = 30\nserver = \"https://10.0.2.2:{port}/kiln\"\nchannel = \"stable\"\n\n[update.window]\nstart = \"{start}\"\nlength_minutes = 30\n"
    );
    let disk = common::copy_disk(v1, "updates-channel");
    let mut n = boot_with("updates_channel", v1, Some(&config), |s| {
        s.boot = BootFrom::Disk;
        s.disk = Some(disk.clone());
    });
    let long = BOOT_TIMEOUT;
    expect(&n.event("boot-good", long), "version", "1.0.0");
    let closed = n.event("update-window", long);
    expect(&closed, "state", "closed");
    let opens_in: u64 = closed.get("opens_in").and_then(|s| s.parse().ok()).unwrap_or(0);
    assert!(opens_in > 0, "{closed:?}");
    let open = n.event("update-window", Duration::from_secs(opens_in + 120));
    expect(&open, "state", "open");
    let checked = n.event("update-checked", long);
    expect(&checked, "result", "newer");
    expect(&checked, "offered", "2.0.0");
    let applied = n.event("update-applied", long);
    expect(&applied, "version", "2.0.0");
    assert_eq!(applied.get("source"), Some(format!("https://10.0.2.2:{port}/kiln/stable/2.0.0/update.kiln").as_str()), "{applied:?}");
    expect(&n.event("shutdown", long), "reason", "update-applied");
    let t = n.event("boot-trial", long);
    expect(&t, "version", "2.0.0");
    expect(&n.event("boot-good", long), "version", "2.0.0");
    // Nothing was asked of the server before the window opened.
    common::asked_nothing_before(opens, &open, &requests, &["/kiln/stable/index.yaml", "/kiln/stable/2.0.0/update.kiln"]);
}

#[test]
fn power_loss_during_an_update_leaves_a_node_that_boots() {
    let Builds { v1, v2, .. } = builds();
    let stick = stick("kilnupd-power.img", &[("e-2.0.0.kiln", &v2.join("update.kiln"))]);
    let long = BOOT_TIMEOUT;
    // Where QEMU is killed: a step of the apply as kiln-init announces it,
    // and how long after.
    for (i, (step, delay_ms)) in [("writing slot b", 300), ("switching slot b", 0), ("installing slot b", 0)].into_iter().enumerate() {
        let name = format!("updates_power{i}");
        let disk = common::copy_disk(v1, &name);
        let overlay = scratch().join(format!("{name}.qcow2"));
        let _ = std::fs::remove_file(&overlay);
        let spec = |s: &mut kiln::tools::run::VmSpec| {
            s.boot = BootFrom::Disk;
            s.disk = Some(disk.clone());
            s.overlay = Some(overlay.clone());
            s.extra_disk = Some(stick.clone());
        };
        let mut n = boot_with(&name, v1, Some(CONFIG), spec);
        n.line(step, long, |l| l.contains(&format!("update: {step}")));
        std::thread::sleep(Duration::from_millis(delay_ms));
        n.vm.kill();
        drop(n);
        // Power back: a good slot boots to the payload, whichever it is,
        // and the update completes.
        let mut n = boot_with(&format!("{name}-after"), v1, Some(CONFIG), spec);
        let started = n.event("payload-started", long);
        let log = n.vm.log();
        assert!(!log.iter().any(|l| l.contains("root-failed") || l.contains("maintenance")), "cut at `{step}` +{delay_ms} ms: {started:?}");
        // The running image applies the bundle again, from the start; or,
        // when the cut came after the entry was in place, the new image is
        // on trial (a CI run cut at "installing slot b" +0 ms and got that).
        let next = n.update_resumed("2.0.0", long);
        expect(&next, "version", "2.0.0");
        expect(&n.event("boot-good", long), "version", "2.0.0");
        eprintln!("cut at `{step}` +{delay_ms} ms: {}", if next.name == "update-applied" { "1.0.0 booted and applied the bundle again" } else { "2.0.0 booted on trial" });
    }
}

/// The update recipe of docs/use-cases/qemu.md, through the `kiln` command
/// as a CI job would run it: a KILNUPD stick made with mkfs.vfat and mcopy
/// carries the v2 bundle; `kiln run --state` applies it in one run and
/// boots v2 in the next, from the disk the first run left.
#[test]
fn kiln_run_state_keeps_an_applied_update_for_the_next_run() {
    let Builds { v1, v2, .. } = builds();
    let d = dir();
    let state = d.join("recipe-state");
    let _ = std::fs::remove_dir_all(&state);
    let stick = d.join("recipe-stick.img");
    let bundle = v2.join("update.kiln");
    // The recipe's lines (the stick: the bundle's size plus 8 MiB, in KiB).
    common::sh(&format!(
        "set -e; rm -f {s}; mkfs.vfat -C -n KILNUPD {s} $(( $(stat -c %s {b}) / 1024 + 8192 )) >/dev/null; MTOOLS_SKIP_CHECK=1 mcopy -i {s} {b} ::",
        s = stick.display(),
        b = bundle.display()
    ));
    let config = d.join("recipe-node.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let _vms = common::exclusive();
    let run = |name: &str, args: &[&str]| -> String {
        let out = std::process::Command::new(common::kiln_bin())
            .arg("run")
            .arg(v1)
            .arg("--state")
            .arg(&state)
            .arg("--config")
            .arg(&config)
            .args(["--accel", "tcg", "--api-port", "0", "--timeout", "600"])
            .args(args)
            .output()
            .expect("running kiln");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        std::fs::write(scratch().join("logs").join(format!("{name}.log")), &stdout).unwrap();
        assert!(out.status.success(), "kiln run {args:?}: {}\n{}\n…{}", out.status, String::from_utf8_lossy(&out.stderr), &stdout[stdout.len().saturating_sub(3000)..]);
        stdout
    };
    let event = |log: &str, name: &str| log.lines().filter_map(kiln_contract::event::parse).find(|e| e.name == name).unwrap_or_else(|| panic!("no {name} event in:\n{log}"));
    // Run 1: v1 finds the bundle on the stick and applies it.
    let first = run("updates_recipe_run1", &["--extra-disk", stick.to_str().unwrap(), "--until", "update-applied"]);
    expect(&event(&first, "started"), "stage", "1");
    expect(&event(&first, "update-applied"), "version", "2.0.0");
    for f in [kiln::tools::run::State::DISK, kiln::tools::run::State::VARS, kiln::tools::run::State::IMAGE] {
        assert!(state.join(f).is_file(), "--state keeps {f}");
    }
    // Run 2, without the stick: the kept disk boots v2 on trial, which
    // becomes good.
    let second = run("updates_recipe_run2", &["--until", "boot-good"]);
    expect(&event(&second, "boot-trial"), "version", "2.0.0");
    expect(&event(&second, "boot-good"), "version", "2.0.0");
    assert!(!second.contains("data-grown"), "the second run's /var is the first run's, already grown");
}
