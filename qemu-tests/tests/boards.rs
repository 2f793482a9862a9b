//! Real armv7 boards. The cards of every shipped board profile
//! (`armv7-factory-worker` on a Cubieboard2, `beaglebone-black`,
//! `orangepi-pc`), built with the one armv7 kernel and its real dtbs, pass
//! the format checkers and carry their u-boot where the boot ROM reads it.
//! Then the Orange Pi PC card boots on QEMU's `orangepi-pc` from the
//! emulated boot ROM: SPL, Debian's u-boot, boot.scr, the board kernel and
//! dtb, the SoC's SD and Ethernet drivers; it stays up, takes an update, and
//! rolls a bad one back through the board u-boot's own boot counting.

mod common;

use common::{boot_with, built, expect, expect_all, sh, BOOT_TIMEOUT};
use kiln::inputs::board;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn read_at(path: &Path, at: u64, len: usize) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    let mut b = vec![0; len];
    f.read_exact(&mut b).unwrap();
    b
}

/// A card of a real board profile: the MBR and the boot FAT pass sfdisk and
/// fsck.vfat; each blob sits byte for byte at its offset and each FAT file
/// (MLO, u-boot.img) is on the FAT; the dtb there is the board's own (its
/// model, read by fdtget); extlinux.conf boots it with the board's console;
/// and the board's u-boot has every command boot.scr runs.
fn check_card(profile: &str, model: &str) {
    let out = built(profile);
    let m = common::manifest(&out);
    let name = m["board"].as_str().unwrap_or_else(|| panic!("{profile}: no board in the manifest"));
    let boards = common::workspace().join("overlays/boards");
    let b = board::load_named(&boards, name).unwrap();
    let inputs = b.resolve("armhf", &kiln::inputs::cache::Cache::default_location()).unwrap();
    let img = out.join("sdcard.img");
    let v = sh(&format!("sfdisk --verify {} 2>&1", img.display()));
    assert!(v.contains("No errors detected"), "{profile}: {v}");
    let (off, size) = common::mbr_part(&img, 1);
    let fat = common::scratch().join(format!("{profile}-boot.img"));
    sh(&format!("dd if={} of={} bs=512 skip={} count={} status=none", img.display(), fat.display(), off / 512, size / 512));
    sh(&format!("fsck.vfat -n {} >/dev/null", fat.display()));
    let mtype = |path: &str| {
        let o = std::process::Command::new("mtype").env("MTOOLS_SKIP_CHECK", "1").arg("-i").arg(&fat).arg(format!("::{path}")).output().unwrap();
        assert!(o.status.success(), "{profile}: mtype {path}: {}", String::from_utf8_lossy(&o.stderr));
        o.stdout
    };
    for (blob, r) in b.blobs.iter().zip(&inputs.blobs) {
        let want = std::fs::read(&r.path).unwrap();
        assert!(read_at(&img, blob.offset, want.len()) == want, "{profile}: {} is not at byte {} of the card", r.source, blob.offset);
    }
    for (f, r) in b.files.iter().zip(&inputs.files) {
        assert!(mtype(&f.path) == std::fs::read(&r.path).unwrap(), "{profile}: {} on the FAT differs from {}", f.path, r.source);
    }
    let dtb_name = b.dtb.as_deref().unwrap();
    let dtb = common::scratch().join(format!("{profile}.dtb"));
    std::fs::write(&dtb, mtype(&format!("/kiln/a/dtbs/{dtb_name}"))).unwrap();
    let got = sh(&format!("fdtget -t s {} / model", dtb.display()));
    assert_eq!(got.trim(), model, "{profile}: the dtb on the card");
    let conf = String::from_utf8(mtype("/kiln/a/extlinux.conf")).unwrap();
    assert!(conf.contains(&format!("/kiln/a/dtbs/{dtb_name}")) && conf.contains("console=ttyS0,115200") && conf.contains("kiln.mbr="), "{profile}: {conf}");
    let checked = b.check_boot_script(&inputs, &kiln_formats::bootscr::script()).unwrap_or_else(|e| panic!("{profile}: {e}"));
    assert!(!checked.is_empty(), "{profile}: no u-boot was checked");
    common::kernel_check_is_clean(&m);
    // Into this binary's own output directory: armv7.rs builds qemu-armv7
    // into the shared one at the same time (scripts/test.sh runs it beside).
    let armv7 = kiln::pipeline::build(&common::workspace().join("profiles/qemu-armv7.toml"), &common::scratch().join("out-boards"), &kiln::inputs::cache::Cache::default_location()).unwrap_or_else(|e| panic!("building qemu-armv7: {e:#}"));
    assert_eq!(m["kernel"]["cache_key"], common::manifest(&armv7.out)["kernel"]["cache_key"], "{profile}: not the one armv7 kernel");
    eprintln!("{profile}: card ok; boot.scr checked against {}", checked.iter().map(|c| format!("{} ({} commands)", c.input, c.commands.commands.len())).collect::<Vec<_>>().join(", "));
}

#[test]
fn real_board_cards_pass_the_checkers() {
    check_card("armv7-factory-worker", "Cubietech Cubieboard2");
    check_card("beaglebone-black", "TI AM335x BeagleBone Black");
    check_card("orangepi-pc", "Xunlong Orange Pi PC");
}

/// `orangepi-pc` builds at 1.0.0, 2.0.0 and 3.0.0 (kiln-init panics), signed,
/// with a card and a bundle each.
struct Builds {
    v1: PathBuf,
    v2: PathBuf,
    v3: PathBuf,
}

fn builds() -> Builds {
    let d = common::scratch().join("opi-updates");
    std::fs::create_dir_all(&d).unwrap();
    let key = kiln::provenance::sign::KeyPair::generate();
    std::fs::write(d.join("kiln.key"), key.to_secret_file()).unwrap();
    let build = |tag: &str, version: &str, extra: &str| common::build_versioned(&d, "orangepi-pc", "opi", tag, version, "[\"sdcard\", \"update\"]", extra);
    let v1 = build("v1", "1.0.0", "");
    let v2 = build("v2", "2.0.0", "");
    let v3 = build("v3", "3.0.0", "\n[kernel]\ncmdline = [\"panic=10\", \"kiln.fault=panic\"]\n");
    Builds { v1, v2, v3 }
}

/// A node config on the board's KILNCFG stick (it has no fw_cfg). The
/// trial's boot timeout allows for the emulated board's slow boot.
const CONFIG: &str = "role = \"single\"\nhostname = \"opi\"\n\n[update]\ntries = 2\nhealth_seconds = 5\nboot_timeout_seconds = 240\n\n[debug]\nshell = true\n";

/// Has the node fetch `url` into its update drop (/var/lib/kiln/update/,
/// scanned every 30 s) over the network: under another name first, so
/// kiln-init never sees half a bundle.
fn fetch_bundle(n: &mut common::Node, url: &str, name: &str) {
    n.vm.send(&format!("\nmkdir -p /var/lib/kiln/update; wget -q -O /var/lib/kiln/update/{name}.part {url} && mv /var/lib/kiln/update/{name}.part /var/lib/kiln/update/{name} && echo fetched-{name}\n")).unwrap();
    n.line("the bundle fetched over the EMAC", Duration::from_secs(300), |l| l.trim() == format!("fetched-{name}"));
}

/// The kernel faults the log must not show.
fn faults(log: &[String]) -> Vec<String> {
    log.iter().filter(|l| l.contains("Oops") || l.contains("Kernel panic") || l.contains("Unable to handle kernel") || l.contains("BUG: ")).cloned().collect()
}

/// The Orange Pi PC card from power-on: the emulated boot ROM loads the SPL
/// from 8 KiB into the card, u-boot runs boot.scr, the board kernel boots
/// with the H3 dtb, the root is verified, the data partition grows to the
/// 2 GiB card, DHCP and HTTP go over the H3's EMAC (driver dwmac-sun8i), the
/// stand-in's checks pass and the node stays up 60 s with no kernel fault.
/// Then A/B on the board's own u-boot: 2.0.0, fetched over the network into
/// the update drop, boots on trial and is marked good; 3.0.0, whose
/// kiln-init panics, fails its two tries and boot.scr rolls back to 2.0.0.
/// (Not a KILNUPD stick: QEMU 7.2 aborts when a USB stick is hot-plugged on
/// this machine.)
///
/// QEMU 7.2 has no model of the H3 watchdog, through which Linux and u-boot
/// reset the board: each reboot hangs in the guest, and `kiln run` restarts
/// QEMU with the same card (its overlay) when the console asks for a reset.
/// The test counts those restarts.
#[test]
fn orangepi_pc_boots_from_its_boot_rom_and_rolls_back_on_its_own_u_boot() {
    let Builds { v1, v2, v3 } = builds();
    let long = BOOT_TIMEOUT;
    let t0 = Instant::now();
    let mut n = boot_with("opi", &v1, Some(CONFIG), |s| {
        s.memory_mib = 1024;
        s.cpus = 4;
        s.disk_size = 2 << 30;
    });
    n.line("the SPL", long, |l| l.starts_with("U-Boot SPL "));
    n.line("u-boot proper", long, |l| l.starts_with("U-Boot 20"));
    n.line("u-boot finds boot.scr on the card", long, |l| l.contains("Found U-Boot script /boot.scr"));
    n.line("boot.scr picks slot a", long, |l| l.contains("kiln: slot a (good a"));
    n.line("the board kernel with the Orange Pi PC dtb", long, |l| l.contains("Machine model: Xunlong Orange Pi PC"));
    let v = n.event("root-verified", long);
    assert_eq!(v.get("hash"), common::manifest(&v1)["disk"]["roothash"].as_str());
    let mounted = n.event("data-mounted", long);
    let size: u64 = mounted.get("size").and_then(|s| s.parse().ok()).unwrap_or(0);
    assert!(size > 1536 * MIB, "/var is {size} bytes on a 2 GiB card: {mounted:?}");
    let up = n.event("network-up", long);
    expect(&up, "method", "dhcp");
    assert!(up.get("addr").is_some_and(|a| a.starts_with("10.0.2.15")), "{up:?}");
    let iface = up.get("iface").unwrap_or("eth0").to_string();
    let started = n.event("payload-started", long);
    let wall = t0.elapsed();
    let checks = n.standin_checks();
    let failed: Vec<_> = checks.iter().filter(|l| !l.ends_with(" ok")).collect();
    assert!(checks.len() >= 10 && failed.is_empty(), "stand-in checks on the Orange Pi PC: {checks:#?}");
    let after = Instant::now();

    // The NIC is the SoC's EMAC, and traffic flows through it: an HTTP
    // request from the node reaches the host, and the answer comes back.
    let bundle = |out: &Path| std::fs::read(out.join("update.kiln")).unwrap();
    let (port, requests) = common::serve(vec![("/emac".into(), b"kiln-emac-reply-7\n".to_vec()), ("/2.0.0.kiln".into(), bundle(&v2)), ("/3.0.0.kiln".into(), bundle(&v3))]);
    n.vm.send(&format!("\nls -l /sys/class/net/{iface}/device/driver; wget -q -O - http://10.0.2.2:{port}/emac\n")).unwrap();
    n.line("the EMAC driver", Duration::from_secs(60), |l| l.contains("drivers/dwmac-sun8i"));
    n.line("an answer over the EMAC", Duration::from_secs(60), |l| l.trim() == "kiln-emac-reply-7");
    assert_eq!(requests.lock().unwrap().iter().map(|(_, p)| p.as_str()).collect::<Vec<_>>(), ["/emac"]);

    let used: u64 = started.get("mem_used_kib").and_then(|v| v.parse().ok()).unwrap_or(u64::MAX);
    let total: u64 = started.get("mem_total_kib").and_then(|v| v.parse().ok()).unwrap_or(0);
    eprintln!(
        "orangepi-pc: power-on to payload-started {:.0} s wall, kernel uptime {} s; memory used {used} KiB of {total} KiB, kiln-init RSS {} KiB",
        wall.as_secs_f64(),
        started.get("uptime").unwrap_or("?"),
        started.get("init_rss_kib").unwrap_or("?")
    );
    assert!(total > 900 * 1024 && total <= 1024 * 1024, "-m 1G: MemTotal {total} KiB");
    assert!(used * 1024 < 64 * MIB, "the OS uses {used} KiB at payload-started, over 64 MiB: {started:?}");

    // Up for 60 s after payload-started, with no kernel fault.
    std::thread::sleep(Duration::from_secs(60).saturating_sub(after.elapsed()));
    n.vm.send("\necho still-up-$((6*7))\n").unwrap();
    n.line("the node answers after 60 s", Duration::from_secs(60), |l| l.trim() == "still-up-42");
    let f = faults(&n.vm.log());
    assert!(f.is_empty(), "kernel faults on the Orange Pi PC: {f:#?}");
    assert!(!n.vm.log().iter().any(|l| l.contains("payload-exited") || l.contains("payload-restarting")), "the payload did not stay up");

    // 2.0.0, downloaded over the EMAC into the update drop: written to
    // slot b, tried, good.
    fetch_bundle(&mut n, &format!("http://10.0.2.2:{port}/2.0.0.kiln"), "2.0.0.kiln");
    let applied = n.event("update-applied", long);
    expect_all(&applied, &[("version", "2.0.0"), ("slot", "b"), ("entry", "kiln/b/extlinux.conf")]);
    expect(&n.event("shutdown", long), "reason", "update-applied");
    n.line("kiln run restarts the board", long, |l| l == kiln::tools::run::RESTART_NOTE);
    n.line("boot.scr tries slot b", long, |l| l.contains("kiln: slot b (good a, trying b with 1 tries left)"));
    expect_all(&n.event("boot-trial", long), &[("slot", "b"), ("version", "2.0.0"), ("fallback", "yes")]);
    n.event("payload-started", long);
    expect(&n.event("boot-good", long), "version", "2.0.0");

    // 3.0.0 panics in kiln-init: two tries, then boot.scr boots b again.
    fetch_bundle(&mut n, &format!("http://10.0.2.2:{port}/3.0.0.kiln"), "3.0.0.kiln");
    expect_all(&n.event("update-applied", long), &[("version", "3.0.0"), ("slot", "a")]);
    for left in [1, 0] {
        n.line("boot.scr tries slot a", long, |l| l.contains(&format!("kiln: slot a (good b, trying a with {left} tries left)")));
        expect_all(&n.event("boot-failed", long), &[("version", "3.0.0"), ("tries_left", &left.to_string())]);
    }
    n.line("boot.scr falls back to b", long, |l| l.contains("kiln: slot b (good b"));
    expect_all(&n.event("rolled-back", long), &[("from", "3.0.0"), ("to", "2.0.0"), ("slot", "a")]);
    n.event("payload-started", long);
    let restarts = n.vm.restarts();
    assert!(restarts >= 4, "QEMU was restarted {restarts} times; an update and two failed tries need at least 4");
    let f = faults(&n.vm.log().iter().filter(|l| !l.contains("kiln.fault=panic") && !l.contains("kiln-init")).cloned().collect::<Vec<_>>());
    eprintln!("orangepi-pc: A/B done with {restarts} QEMU restarts from outside; {} s in all", t0.elapsed().as_secs());
    // The panics asked for are kiln-init's; anything else is a fault.
    assert!(f.iter().all(|l| l.contains("Attempted to kill init")), "unexpected kernel faults: {f:#?}");
}
