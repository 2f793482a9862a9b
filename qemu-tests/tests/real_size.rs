//! Real-size payloads (issue 20): images whose root holds the real-size
//! fixture (`kiln::tools::fixture`: a file of k0s's size and an airgap-like
//! image tarball with gzip'd layers, from pinned Debian packages; not k0s,
//! which cannot be downloaded here; the payload is still the stand-in).
//!
//! - amd64, from disk under OVMF: stage 1 verifies the whole root, the
//!   payload starts, and a signed update bundle of the same size is applied
//!   to slot B (written, read back) and boots on trial.
//! - amd64, PXE with too little RAM for its root: stage 1 says how much RAM
//!   the root needs and goes to maintenance; no kernel panic.
//! - armv7: the SD card with the armv7-sized fixture boots through u-boot
//!   on 512 MiB and one CPU.
//!
//! The figures (verification seconds, memory at payload-started, apply
//! time) are printed for docs/profiles.md; nothing here is a timed test.

mod common;

use common::{boot_with, expect, BOOT_TIMEOUT};
use kiln::arch::Arch;
use kiln::tools::run::BootFrom;
use std::path::{Path, PathBuf};
use std::time::Duration;

const CONFIG: &str = "role = \"single\"\n\n[update]\ntries = 2\nhealth_seconds = 5\nboot_timeout_seconds = 60\n\n[debug]\nshell = true\n";
const MIB: u64 = 1 << 20;

fn dir() -> PathBuf {
    let d = common::scratch().join("real-size");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fixture(arch: Arch) -> (kiln::tools::fixture::RealSize, String) {
    let f = kiln::tools::fixture::real_size(arch, &kiln::inputs::cache::Cache::default_location()).unwrap_or_else(|e| panic!("the real-size fixture for {arch}: {e:#}"));
    let toml = kiln::tools::bench::fixture_toml(arch, &f);
    (f, toml)
}

/// The amd64 builds, once: 1.0.0 (disk, PXE) and 2.0.0 (the update bundle),
/// both with the fixture, signed with one key.
struct Amd64 {
    v1: PathBuf,
    v2: PathBuf,
    fixture_bytes: u64,
}

fn amd64() -> &'static Amd64 {
    static B: std::sync::OnceLock<Amd64> = std::sync::OnceLock::new();
    B.get_or_init(|| {
        let d = dir();
        let key = kiln::provenance::sign::KeyPair::generate();
        std::fs::write(d.join("kiln.key"), key.to_secret_file()).unwrap();
        let (f, extra) = fixture(Arch::Amd64);
        let v1 = common::build_versioned(&d, "qemu-amd64", "real", "v1", "1.0.0", "[\"disk\", \"pxe\"]", &extra);
        let v2 = common::build_versioned(&d, "qemu-amd64", "real", "v2", "2.0.0", "[\"update\"]", &extra);
        let fixture_bytes = std::fs::metadata(&f.elf).unwrap().len() + std::fs::metadata(&f.images).unwrap().len();
        Amd64 { v1, v2, fixture_bytes }
    })
}

fn num(e: &kiln_contract::event::Event, key: &str) -> f64 {
    e.get(key).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no number `{key}` in {e:?}"))
}

/// Stage 1 verified every block of a root that holds the fixture.
fn verified_all(n: &mut common::Node, out: &Path, fixture_bytes: u64, what: &str) -> f64 {
    let v = n.event("root-verified", BOOT_TIMEOUT);
    let m = common::manifest(out);
    let squashfs = m["disk"]["squashfs_bytes"].as_u64().unwrap();
    expect(&v, "hash", m["disk"]["roothash"].as_str().unwrap());
    let blocks = num(&v, "blocks") as u64;
    assert_eq!(blocks * 4096, squashfs, "{what}: stage 1 verifies every block of the root: {v:?}");
    // The fixture's files are in it: a compressed root that still holds
    // more than a third of them (the image layers do not compress).
    assert!(squashfs > fixture_bytes / 3, "{what}: the root ({squashfs} bytes) cannot hold the fixture ({fixture_bytes} bytes)");
    let s = num(&v, "seconds");
    eprintln!("{what}: root-verified {blocks} blocks ({} MiB) in {s:.2}s", squashfs / MIB);
    s
}

fn started(n: &mut common::Node, what: &str) {
    let p = n.event("payload-started", BOOT_TIMEOUT);
    eprintln!(
        "{what}: payload-started at {}s uptime, memory in use {} MiB of {} MiB",
        p.get("uptime").unwrap_or("?"),
        p.get("mem_used_mib").unwrap_or("?"),
        p.get("mem_total_mib").unwrap_or("?")
    );
}

#[test]
fn a_real_size_root_boots_from_disk_and_takes_an_update_of_its_size() {
    let b = amd64();
    let stick = common::kilnupd_stick(&dir().join("kilnupd.img"), &[("real-2.0.0.kiln", &b.v2.join("update.kiln"))]);
    let disk = common::copy_disk(&b.v1, "real-size");
    let mut n = boot_with("real_size_disk", &b.v1, Some(CONFIG), |s| {
        s.boot = BootFrom::Disk;
        s.disk = Some(disk.clone());
        s.extra_disk = Some(stick.clone());
    });
    verified_all(&mut n, &b.v1, b.fixture_bytes, "amd64 disk 1.0.0");
    started(&mut n, "amd64 disk 1.0.0");
    let applied = n.event("update-applied", Duration::from_secs(900));
    expect(&applied, "version", "2.0.0");
    expect(&applied, "slot", "b");
    eprintln!(
        "amd64: update bundle of {} MiB applied in {}s (read-back {}s)",
        std::fs::metadata(b.v2.join("update.kiln")).unwrap().len() / MIB,
        applied.get("seconds").unwrap_or("?"),
        applied.get("readback_seconds").unwrap_or("?")
    );
    // Stage 1 verifies the new root before stage 2 says it is on trial.
    verified_all(&mut n, &b.v2, b.fixture_bytes, "amd64 disk 2.0.0 (on trial)");
    let t = n.event("boot-trial", BOOT_TIMEOUT);
    expect(&t, "slot", "b");
    expect(&t, "version", "2.0.0");
    started(&mut n, "amd64 disk 2.0.0");
    expect(&n.event("boot-good", BOOT_TIMEOUT), "version", "2.0.0");
}

#[test]
fn a_pxe_node_with_too_little_ram_for_its_root_says_what_it_needs() {
    let b = amd64();
    let sizes = kiln_contract::pxe::RamRoot::parse(&std::fs::read_to_string(b.v1.join(kiln::image::pxe::SIZES_FILE)).unwrap()).unwrap();
    let need = sizes.min_ram_mib();
    // Enough to load the initramfs and start the kernel, not to unpack the
    // root beside it.
    let mem = (sizes.initramfs_bytes / MIB + 512).min(need - 64) as u32;
    let mut spec = kiln::tools::run::VmSpec::new(&b.v1);
    spec.boot = BootFrom::Pxe;
    spec.memory_mib = mem;
    let refused = kiln::tools::run::check_pxe_ram(&spec).unwrap_err();
    assert!(refused.contains(&format!("at least {need} MiB")), "{refused}");
    let mut n = boot_with("real_size_pxe_low_ram", &b.v1, None, |s| {
        s.boot = BootFrom::Pxe;
        s.memory_mib = mem;
    });
    let line = n.line("the console error", BOOT_TIMEOUT, |l| l.contains("did not fit in RAM"));
    assert!(line.contains(&format!("at least {need} MiB")), "{line}");
    let e = n.event("ram-too-small", Duration::from_secs(30));
    expect(&e, "needs_mib", &need.to_string());
    n.event("maintenance", Duration::from_secs(60));
    eprintln!("PXE with {mem} MiB: ram-too-small, needs {need} MiB ({e:?})");
    let panicked = n.vm.wait_for("a kernel panic (must not happen)", Duration::from_secs(10), |l| l.contains("Kernel panic") || l.contains("Out of memory"));
    if let Ok(l) = panicked {
        n.fail(format!("the kernel went down instead: {l}"));
    }
}

#[test]
fn an_armv7_card_with_a_real_size_root_boots_on_512_mib_and_one_cpu() {
    let d = dir().join("armv7");
    std::fs::create_dir_all(&d).unwrap();
    let key = kiln::provenance::sign::KeyPair::generate();
    std::fs::write(d.join("kiln.key"), key.to_secret_file()).unwrap();
    let (f, extra) = fixture(Arch::Armv7);
    let out = common::build_versioned(&d, "qemu-armv7", "real7", "v1", "1.0.0", "[\"sdcard\"]", &extra);
    let fixture_bytes = std::fs::metadata(&f.elf).unwrap().len() + std::fs::metadata(&f.images).unwrap().len();
    let mut n = boot_with("real_size_armv7", &out, Some("role = \"single\"\n"), |s| {
        s.boot = BootFrom::Disk;
        s.disk_size = 2 << 30;
        s.memory_mib = 512;
        s.cpus = 1;
    });
    verified_all(&mut n, &out, fixture_bytes, "armv7 card");
    started(&mut n, "armv7 card, 512 MiB, one CPU");
}
