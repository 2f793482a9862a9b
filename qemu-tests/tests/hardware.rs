//! Hardware support: Debian's kernel as the kernel input, its modules
//! loaded by kiln-init's coldplug, on a matrix of the NICs and disk
//! controllers real machines have (QEMU's emulations of them); and the
//! compiled kernel's gaps on the same hardware, reported by the
//! `driver-missing` event rather than by a node that silently has no disk
//! or network.

mod common;

use common::{boot_with, built, BOOT_TIMEOUT};
use kiln::tools::run::{BootFrom, DiskBus};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const DISTRO: &str = "qemu-amd64-distro";
const CONFIG: &str = "role = \"single\"\n[debug]\nshell = true\n";

/// The modules the kernel has loaded (`/proc/modules`), through the debug
/// shell.
fn proc_modules(n: &mut common::Node) -> Vec<String> {
    n.vm.send("\necho kiln-mods-begin; cut -d' ' -f1 /proc/modules; echo kiln-mods-end\n").unwrap();
    n.line("the end of /proc/modules", Duration::from_secs(60), |l| l.trim() == "kiln-mods-end");
    let log = n.vm.log();
    let end = log.iter().rposition(|l| l.trim() == "kiln-mods-end").unwrap();
    let start = log[..end].iter().rposition(|l| l.trim() == "kiln-mods-begin").unwrap();
    log[start + 1..end].iter().map(|l| l.trim().to_string()).filter(|l| !l.is_empty() && !l.contains(' ')).collect()
}

/// Once the node is up: payload started, every stand-in check ok (the
/// kernel-config and modules checks included), the `wanted` drivers
/// loaded, and no NIC or disk controller left without a driver. Returns
/// /proc/modules and the uptime at `payload-started`.
fn up_and_checked(n: &mut common::Node, name: &str, wanted: &[&str]) -> (Vec<String>, f64) {
    n.event("network-up", BOOT_TIMEOUT);
    let started = n.event("payload-started", BOOT_TIMEOUT);
    let checks = n.standin_checks();
    let bad: Vec<&String> = checks.iter().filter(|l| !l.contains(" ok")).collect();
    assert!(bad.is_empty(), "{name}: stand-in checks not ok: {bad:#?}\n(serial log: {})", n.log.display());
    for want in ["kernel-config", "modules"] {
        assert!(checks.iter().any(|l| l.contains(&format!("check {want} ok"))), "{name}: no `{want}` check: {checks:#?}");
    }
    let mods = proc_modules(n);
    for m in wanted {
        assert!(mods.iter().any(|x| x == m), "{name}: {m} not loaded; /proc/modules: {mods:?}\n(serial log: {})", n.log.display());
    }
    let log = n.vm.log();
    let missing: Vec<&String> = log.iter().filter(|l| l.contains("kiln-init: driver-missing")).collect();
    assert!(
        !missing.iter().any(|l| ["Ethernet", "NVMe", "SATA", "RAID", "SAS", "SCSI"].iter().any(|c| l.contains(&format!("class={c}")))),
        "{name}: the distro kernel left a NIC or disk controller without a driver: {missing:#?}"
    );
    (mods, started.get("uptime").and_then(|u| u.parse().ok()).unwrap_or(0.0))
}

/// One boot of the distro image: the boot disk on `bus`, one NIC of
/// `model`; the node comes up on them, their drivers (`disk_mod`,
/// `nic_mod`) loaded by coldplug.
fn boots_on(bus: DiskBus, model: &str, disk_mod: &str, nic_mod: &str) {
    let out = built(DISTRO);
    let name = format!("distro_{bus:?}_{model}").to_lowercase();
    let mut n = boot_with(&name, &out, Some(CONFIG), |s| {
        s.boot = BootFrom::Disk;
        s.disk_bus = bus;
        s.nic = model.into();
    });
    n.event("root-verified", BOOT_TIMEOUT);
    n.event("data-mounted", BOOT_TIMEOUT);
    n.event("coldplug", BOOT_TIMEOUT);
    let (_, up) = up_and_checked(&mut n, &name, &[disk_mod, nic_mod]);
    println!("hardware-report: distro kernel, {bus:?} + {model}: payload-started at {up:.2} s uptime");
}

/// Acceptance for the distro kernel on virtio, with a config stick plugged
/// in after boot: the ESP's node.toml is invalid, so the node waits in
/// maintenance; a `KILNCFG` stick hot-plugged through QMP (usb-storage on
/// xhci) gets its drivers loaded on the uevent (usb_storage, sd_mod) and
/// brings the node up, every stand-in check ok.
#[test]
fn distro_kernel_on_virtio_takes_a_hot_plugged_config_stick() {
    let t = Instant::now();
    let out = built(DISTRO);
    let disk = common::copy_disk(&out, "distro_hotplug");
    common::mcopy(&common::esp_image(&disk), "role = \"single\"\nhostname = \"Not_A_Hostname\"\n", "node.toml");
    let stick = common::config_stick("distro-hotplug-stick.img", "KILNCFG", "role = \"single\"\nhostname = \"from-the-stick\"\n[debug]\nshell = true\n");
    let mut n = boot_with("distro_virtio_hotplug", &out, None, |s| {
        s.boot = BootFrom::Disk;
        s.disk = Some(disk.clone());
        s.extra_args.extend(["-device", "qemu-xhci,id=xhci"].map(String::from));
    });
    n.event("coldplug", BOOT_TIMEOUT);
    let m = n.event("maintenance", BOOT_TIMEOUT);
    assert!(m.get("reason").is_some_and(|r| r.contains("esp") && r.contains("hostname")), "{m:?}");
    common::plug(&n, "stick0", &stick);
    let loaded = n.event("config-loaded", Duration::from_secs(120));
    assert_eq!(loaded.get("source"), Some("kilncfg"), "{loaded:?}");
    assert_eq!(loaded.get("hostname"), Some("from-the-stick"), "{loaded:?}");
    assert!(n.vm.log().iter().any(|l| l.contains("hotplug: loaded") && l.contains("usb_storage")), "usb_storage was loaded on the hotplug uevent\n(serial log: {})", n.log.display());
    let (mods, up) = up_and_checked(&mut n, "distro_virtio_hotplug", &["virtio_blk", "virtio_net", "usb_storage", "sd_mod", "xhci_pci"]);
    // The k0s modules and stage 1's, loaded by name.
    for m in ["overlay", "br_netfilter", "nf_conntrack", "veth", "vxlan", "dm_verity", "squashfs", "ext4", "crc32c_generic"] {
        assert!(mods.iter().any(|x| x == m), "{m} not loaded: {mods:?}");
    }
    println!("hardware-report: distro kernel, virtio + virtio-net-pci: payload-started at {up:.2} s uptime (a stick hot-plugged in maintenance first); {} modules loaded: {}", mods.len(), mods.join(" "));
    println!("(boot test took {:.0} s)", t.elapsed().as_secs_f64());
}

#[test]
fn distro_kernel_boots_from_nvme_with_e1000e() {
    boots_on(DiskBus::Nvme, "e1000e", "nvme", "e1000e");
}

#[test]
fn distro_kernel_boots_from_ahci_with_rtl8139() {
    boots_on(DiskBus::Ahci, "rtl8139", "ahci", "8139too");
}

/// The MegaRAID: QEMU's adapter has no UEFI option ROM (a real card
/// brings its own), so OVMF cannot read the disk behind it. The firmware's
/// part is skipped: the UKI's kernel, initramfs and command line (with the
/// root hash) are booted directly, and stage 1 must find, verify and mount
/// the root on the disk behind the MegaRAID, as it would after a real
/// card's option ROM loaded the UKI.
#[test]
fn distro_kernel_boots_from_megaraid_with_vmxnet3() {
    let out = built(DISTRO);
    let name = "distro_megasas_vmxnet3";
    let disk = common::copy_disk(&out, name);
    let direct = uki_as_direct_boot(&out, &disk, name);
    let drive = format!("if=none,id=d0,format=raw,file={}", disk.display());
    let mut n = boot_with(name, &direct, Some(CONFIG), |s| {
        s.boot = BootFrom::Pxe;
        s.nic = "vmxnet3".into();
        s.extra_args.extend(["-drive", &drive, "-device", "megasas-gen2,id=raid0", "-device", "scsi-hd,drive=d0,bus=raid0.0"].map(String::from));
    });
    n.event("root-verified", BOOT_TIMEOUT);
    let d = n.event("data-mounted", BOOT_TIMEOUT);
    assert!(d.get("dev").is_some_and(|d| d.starts_with("/dev/sd")), "/var is on the disk behind the MegaRAID: {d:?}");
    n.event("coldplug", BOOT_TIMEOUT);
    up_and_checked(&mut n, name, &["megaraid_sas", "vmxnet3"]);
}

/// A directory `kiln run --boot pxe` boots like a PXE bundle, holding the
/// kernel, initramfs and command line of the disk's UKI (slot A).
fn uki_as_direct_boot(out: &Path, disk: &Path, name: &str) -> PathBuf {
    let m = common::manifest(out);
    let uki_name = m["disk"]["uki"].as_str().expect("the manifest names the UKI");
    let dir = common::scratch().join(format!("{name}-direct"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("pxe")).unwrap();
    let uki = dir.join("uki.efi");
    common::sh(&format!("MTOOLS_SKIP_CHECK=1 mcopy -o -i {} ::EFI/Linux/{uki_name} {}", common::esp_image(disk), uki.display()));
    let pe = std::fs::read(&uki).unwrap();
    let part = |s: &str| kiln_formats::uki::section(&pe, s).unwrap_or_else(|| panic!("{uki_name} has no {s} section")).to_vec();
    std::fs::write(dir.join("pxe/vmlinuz"), part(".linux")).unwrap();
    std::fs::write(dir.join("pxe/initramfs.cpio.zst"), part(".initrd")).unwrap();
    std::fs::write(dir.join("pxe/cmdline"), kiln_formats::uki::cmdline(&pe).expect("the UKI's .cmdline")).unwrap();
    std::fs::copy(out.join("manifest.json"), dir.join("manifest.json")).unwrap();
    dir
}

/// The compiled kernel on the same hardware: it drives virtio, NVMe, AHCI
/// and e1000e, and not the RTL8139, the VMXNET3 or the MegaRAID; each of
/// those is named by a `driver-missing` event, and nothing it drives is.
#[test]
fn compiled_kernel_names_the_hardware_it_has_no_driver_for() {
    let out = built("qemu-amd64");
    let mut n = boot_with("compiled_unclaimed", &out, None, |s| {
        s.boot = BootFrom::Disk;
        s.extra_args.extend(
            [
                "-device", "rtl8139,romfile=",
                "-device", "vmxnet3,romfile=",
                "-device", "e1000e,romfile=",
                "-device", "megasas-gen2,id=raid1",
                "-device", "nvme,serial=kiln1,drive=nv1",
                "-drive", "if=none,id=nv1,format=raw,file=null-co://,file.read-zeroes=on",
            ]
            .map(String::from),
        );
    });
    let started = n.event("payload-started", BOOT_TIMEOUT);
    println!("hardware-report: compiled kernel, virtio disk: payload-started at {} s uptime", started.get("uptime").unwrap_or("?"));
    let log = n.vm.log();
    let missing: Vec<kiln_contract::event::Event> = log.iter().filter_map(|l| kiln_contract::event::parse(l)).filter(|e| e.name == "driver-missing").collect();
    let ids: Vec<&str> = missing.iter().filter_map(|e| e.get("id")).collect();
    for (id, what) in [("10ec:8139", "RTL8139"), ("15ad:07b0", "VMXNET3"), ("1000:0079", "MegaRAID SAS 2108")] {
        let e = missing.iter().find(|e| e.get("id") == Some(id)).unwrap_or_else(|| n.fail(format!("no driver-missing event for the {what} ({id}); events: {missing:#?}")));
        assert_eq!(e.get("bus"), Some("pci"), "{e:?}");
        assert!(e.get("slot").is_some_and(|s| s.starts_with("0000:")), "{e:?}");
    }
    let class = |id: &str| missing.iter().find(|e| e.get("id") == Some(id)).and_then(|e| e.get("class")).unwrap_or("").to_string();
    assert_eq!(class("10ec:8139"), "Ethernet");
    assert_eq!(class("15ad:07b0"), "Ethernet");
    assert_eq!(class("1000:0079"), "RAID");
    // What it drives is never reported: virtio, NVMe, AHCI, e1000e.
    for id in ["1af4:1000", "1af4:1001", "1b36:0010", "8086:2922", "8086:10d3"] {
        assert!(!ids.contains(&id), "{id} has a driver in the compiled kernel, yet was reported: {missing:#?}");
    }
}

/// The distro image is reproducible (a second build into another
/// directory is byte-identical), and its sizes next to the compiled
/// kernel's image: kernel, stage-1 initramfs (inside the UKI), root.
#[test]
fn distro_image_is_reproducible_and_its_size_is_reported() {
    let out = built(DISTRO);
    let cache = kiln::inputs::cache::Cache::default_location();
    let other = common::scratch().join("distro-again");
    let _ = std::fs::remove_dir_all(&other);
    let again = kiln::pipeline::build(&common::workspace().join(format!("profiles/{DISTRO}.toml")), &other, &cache).unwrap_or_else(|e| panic!("second build: {e:#}"));
    let (a, b) = (common::files(&out), common::files(&again.out));
    assert_eq!(a, b, "the two builds wrote different files");
    for f in &a {
        assert!(std::fs::read(out.join(f)).unwrap() == std::fs::read(again.out.join(f)).unwrap(), "{f} differs between two builds of {DISTRO}");
    }
    let m = common::manifest(&out);
    let mods = m["kernel"]["distro"]["modules"].as_array().expect("the manifest lists the modules shipped");
    assert!(mods.iter().any(|x| x["name"] == "megaraid_sas" && x["stage1"] == true), "megaraid_sas is in stage 1");
    assert!(mods.iter().any(|x| x["name"] == "vmxnet3" && x["stage1"] == false), "vmxnet3 is in the root only");
    assert!(m["inputs"].as_array().unwrap().iter().any(|i| i["name"] == "kernel.package"), "the manifest's inputs name the kernel package");
    // The firmware package's files that shipped modules declare (isci, a
    // SAS driver), and nothing else of it.
    let fw = &m["kernel"]["distro"]["firmware"];
    assert!(fw.as_array().is_some_and(|f| f.iter().any(|x| x == "isci/isci_firmware.bin")), "{fw}");
    assert!(!fw.as_array().unwrap().iter().any(|x| x.as_str().is_some_and(|x| x.starts_with("av7110"))), "firmware no shipped module declares: {fw}");
    for (name, dir) in [("compiled", built("qemu-amd64")), ("distro", out.clone())] {
        let m = common::manifest(&dir);
        let uki_name = m["disk"]["uki"].as_str().unwrap().to_string();
        let uki = common::scratch().join(format!("size-{name}.efi"));
        common::sh(&format!("MTOOLS_SKIP_CHECK=1 mcopy -o -i {} ::EFI/Linux/{uki_name} {}", common::esp_image(&dir.join("disk.raw")), uki.display()));
        let pe = std::fs::read(&uki).unwrap();
        let len = |s: &str| kiln_formats::uki::section(&pe, s).map_or(0, <[u8]>::len);
        println!(
            "hardware-report: {name} kernel: image {} bytes, stage-1 initramfs {} bytes, UKI {} bytes, root squashfs {} bytes, modules shipped {}",
            len(".linux"),
            len(".initrd"),
            pe.len(),
            m["disk"]["squashfs_bytes"],
            m["kernel"]["distro"]["modules"].as_array().map_or(0, Vec::len)
        );
    }
}
