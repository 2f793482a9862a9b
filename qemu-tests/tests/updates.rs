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

use common::{boot_with, scratch, workspace, BOOT_TIMEOUT};
use kiln::qemu::BootFrom;
use kiln::sign::KeyPair;
use kiln::update::{Content, PartSource, Spec};
use kiln_init::event::Event;
use kiln_init::update::PartKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

const NAME: &str = "upd";
/// Boots a new image gets (node.toml `update.tries`).
const TRIES: u32 = 2;
const CONFIG: &str = "role = \"single\"\n\n[update]\ntries = 2\nhealth_seconds = 10\nboot_timeout_seconds = 45\n\n[debug]\nshell = true\n";

fn dir() -> PathBuf {
    let d = scratch().join("updates");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A profile `upd` at `version`, signed with `key`, with `extra` appended.
fn build(tag: &str, version: &str, extra: &str) -> PathBuf {
    let d = dir();
    let ws = workspace();
    // Outside profiles/: kernel-configs/ is found through this.
    std::env::set_var("KILN_SOURCE_DIR", &ws);
    let path = d.join(format!("{tag}.toml"));
    std::fs::write(
        &path,
        format!(
            "extends = \"{}\"\nname = \"{NAME}\"\nversion = \"{version}\"\noutputs = [\"disk\", \"update\"]\n\n[node]\nconfig = \"{}\"\n\n[sign]\nkey = \"kiln.key\"\n{extra}",
            ws.join("profiles/qemu-amd64.toml").display(),
            ws.join("profiles/nodes/single.toml").display()
        ),
    )
    .unwrap();
    let out = kiln::pipeline::build(&path, &d.join(format!("out-{tag}")), &kiln::cache::Cache::default_location()).unwrap_or_else(|e| panic!("building {tag}: {e:#}"));
    out.out
}

/// A well-formed bundle of `upd` with small stand-in parts, signed by `key`.
fn crafted(key: &KeyPair, arch: kiln::profile::Arch, version: &str, to: &Path) {
    let part = |name: &str, kind, n: usize| PartSource { name: name.into(), kind, content: Content::Bytes(vec![0x5a; n]) };
    let parts = [part("root.squashfs", PartKind::Root, 8192), part("root.verity", PartKind::Verity, 4096), part("kiln.efi", PartKind::Uki, 4096)];
    let spec = Spec { version, arch, profile: NAME, board: None, roothash: &"ab".repeat(32), source_date_epoch: 1 };
    kiln::update::write(to, &spec, &parts, key).unwrap();
}

/// A FAT volume labelled KILNUPD holding `files`.
fn stick(files: &[(&str, &Path)]) -> PathBuf {
    let p = dir().join("kilnupd.img");
    let _ = std::fs::remove_file(&p);
    let bytes: u64 = files.iter().map(|(_, f)| std::fs::metadata(f).unwrap().len()).sum();
    let kib = bytes / 1024 + 16 * 1024;
    common::sh(&format!("mkfs.vfat -C -n KILNUPD {} {kib} >/dev/null", p.display()));
    for (name, f) in files {
        common::sh(&format!("MTOOLS_SKIP_CHECK=1 mcopy -i {} {} ::/{name}", p.display(), f.display()));
    }
    p
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

fn expect(e: &Event, key: &str, want: &str) {
    assert_eq!(e.get(key), Some(want), "{e:?}");
}

#[test]
fn updates_apply_refuse_and_roll_back() {
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

    let other_key = d.join("other-key.kiln");
    crafted(&KeyPair::generate(), kiln::profile::Arch::Amd64, "2.0.0", &other_key);
    let arm64 = d.join("arm64.kiln");
    crafted(&key, kiln::profile::Arch::Arm64, "2.0.0", &arm64);
    let downgrade = d.join("downgrade.kiln");
    crafted(&key, kiln::profile::Arch::Amd64, "0.9.0", &downgrade);
    let truncated = d.join("truncated.kiln");
    let full = std::fs::read(v2.join("update.kiln")).unwrap();
    std::fs::write(&truncated, &full[..full.len() / 2]).unwrap();
    let stick = stick(&[
        ("a-other-key.kiln", &other_key),
        ("b-arm64.kiln", &arm64),
        ("c-downgrade.kiln", &downgrade),
        ("d-truncated.kiln", &truncated),
        ("e-2.0.0.kiln", &v2.join("update.kiln")),
        ("f-3.0.0-panic.kiln", &v3.join("update.kiln")),
        ("g-3.0.1-unhealthy.kiln", &v4.join("update.kiln")),
    ]);

    let disk = common::copy_disk(&v1, "updates");
    let mut n = boot_with("updates", &v1, Some(CONFIG), |s| {
        s.boot = BootFrom::Disk;
        s.disk = Some(disk.clone());
        s.extra_disk = Some(stick.clone());
    });
    let long = BOOT_TIMEOUT;

    // Boot 1: the first image, on trial until its payload has run 10 s.
    n.event("watchdog-armed", long);
    let t = n.event("boot-trial", long);
    expect(&t, "slot", "a");
    expect(&t, "version", "1.0.0");
    expect(&t, "fallback", "no");
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
    let t = n.event("boot-trial", long);
    expect(&t, "slot", "b");
    expect(&t, "version", "2.0.0");
    expect(&t, "fallback", "yes");
    n.event("payload-started", long);
    n.vm.send("\ncat /var/lib/k0s/update-test\n").unwrap();
    n.line("/var kept across the update", Duration::from_secs(60), |l| l.trim() == "kiln-var-42");
    expect(&n.event("boot-good", long), "version", "2.0.0");
    skipped(&mut n, "e-2.0.0.kiln", "already runs");

    // 3.0.0: kiln-init panics; two tries, then 2.0.0 again.
    let applied = n.event("update-applied", long);
    expect(&applied, "version", "3.0.0");
    expect(&applied, "slot", "a");
    for _ in 0..TRIES {
        let t = n.event("boot-trial", long);
        expect(&t, "version", "3.0.0");
        n.event("boot-failed", long);
    }
    let rb = n.event("rolled-back", long);
    expect(&rb, "from", "3.0.0");
    expect(&rb, "to", "2.0.0");
    expect(&rb, "slot", "a");
    skipped(&mut n, "e-2.0.0.kiln", "already runs");
    skipped(&mut n, "f-3.0.0-panic.kiln", "rolled back");

    // 3.0.1: the payload never runs 10 s; two tries, then 2.0.0 again.
    let applied = n.event("update-applied", long);
    expect(&applied, "version", "3.0.1");
    for _ in 0..TRIES {
        let t = n.event("boot-trial", long);
        expect(&t, "version", "3.0.1");
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
