//! The disk image, checked by tools nobody here wrote: sgdisk, sfdisk,
//! fsck.vfat, mtools, unsquashfs, veritysetup and qemu-img.

mod common;

use std::path::Path;
use std::process::Command;

fn run(cmd: &str) -> (bool, String) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    (out.status.success(), kiln_testkit::output_text(&out))
}

fn must(cmd: &str) -> String {
    let (ok, text) = run(cmd);
    assert!(ok, "`{cmd}` failed:\n{text}");
    text
}

struct Part {
    name: String,
    start: u64,
    size: u64,
    uuid: String,
    type_guid: String,
}

fn partitions(disk: &Path) -> Vec<Part> {
    let j: serde_json::Value = serde_json::from_str(&must(&format!("sfdisk --json {}", disk.display()))).unwrap();
    j["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Part {
            name: p["name"].as_str().unwrap_or("").into(),
            start: p["start"].as_u64().unwrap(),
            size: p["size"].as_u64().unwrap(),
            uuid: p["uuid"].as_str().unwrap_or("").to_lowercase(),
            type_guid: p["type"].as_str().unwrap_or("").to_lowercase(),
        })
        .collect()
}

fn extract(disk: &Path, p: &Part, to: &Path) {
    must(&format!("dd if={} of={} bs=512 skip={} count={} status=none", disk.display(), to.display(), p.start, p.size));
}

#[test]
fn disk_image_passes_external_checks() {
    let out = common::built("qemu-amd64");
    let disk = out.join("disk.raw");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let root = m["disk"]["roothash"].as_str().unwrap().to_string();
    assert!(std::fs::metadata(&disk).unwrap().len() <= 1 << 30, "the image is at most 1 GiB");

    let v = must(&format!("sgdisk -v {}", disk.display()));
    assert!(v.contains("No problems found"), "{v}");
    let parts = partitions(&disk);
    let names: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["esp", "root-a", "root-a-verity", "root-b", "root-b-verity", "data"]);
    let types: Vec<&str> = parts.iter().map(|p| p.type_guid.as_str()).collect();
    assert_eq!(
        types,
        [
            "c12a7328-f81f-11d2-ba4b-00a0c93ec93b",
            "4f68bce3-e8cd-4db1-96e7-fbcaf984b709",
            "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5",
            "4f68bce3-e8cd-4db1-96e7-fbcaf984b709",
            "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5",
            "0fc63daf-8483-4772-8e79-3d69d8477de4"
        ]
    );
    // The root hash alone finds the partitions (DPS rule).
    assert_eq!(parts[1].uuid.replace('-', ""), root[..32]);
    assert_eq!(parts[2].uuid.replace('-', ""), root[32..]);

    let d = tempfile::tempdir().unwrap();
    let esp = d.path().join("esp.img");
    extract(&disk, &parts[0], &esp);
    must(&format!("fsck.vfat -n {}", esp.display()));
    let dir = must(&format!("MTOOLS_SKIP_CHECK=1 mdir -i {} ::/EFI/Linux", esp.display()));
    let uki = m["disk"]["uki"].as_str().unwrap();
    assert!(dir.contains(uki) && uki.ends_with("+3.efi"), "boot-counting UKI name: {dir}");
    must(&format!("MTOOLS_SKIP_CHECK=1 mdir -i {} ::/EFI/BOOT/BOOTX64.EFI", esp.display()));
    let tmpl = must(&format!("MTOOLS_SKIP_CHECK=1 mtype -i {} ::/node.toml", esp.display()));
    assert!(tmpl.lines().all(|l| l.trim().is_empty() || l.starts_with('#')), "the ESP node.toml is a commented template");
    // The UKI's cmdline carries the root hash.
    let uki_file = d.path().join("uki.efi");
    must(&format!("MTOOLS_SKIP_CHECK=1 mcopy -i {} ::/EFI/Linux/{uki} {}", esp.display(), uki_file.display()));
    let pe = std::fs::read(&uki_file).unwrap();
    let cmdline = kiln_formats::uki::cmdline(&pe).unwrap().to_string();
    assert!(cmdline.contains(&format!("roothash={root}")) && cmdline.contains("kiln.slot=a"), "{cmdline}");
    let sections = must(&format!("objdump -h {}", uki_file.display()));
    for s in [".osrel", ".cmdline", ".uname", ".initrd", ".linux"] {
        assert!(sections.contains(s), "{s} missing:\n{sections}");
    }

    let ra = d.path().join("root-a.img");
    let rv = d.path().join("root-a-verity.img");
    extract(&disk, &parts[1], &ra);
    extract(&disk, &parts[2], &rv);
    let list = must(&format!("unsquashfs -l {}", ra.display()));
    for want in ["squashfs-root/sbin/kiln-init", "squashfs-root/usr/bin/k0s", "squashfs-root/bin/mount", "squashfs-root/etc/kiln/node.toml"] {
        assert!(list.lines().any(|l| l == want), "{want} missing from root-a");
    }
    must(&format!("veritysetup verify {} {} {root}", ra.display(), rv.display()));
    // One flipped byte is caught.
    let mut bytes = std::fs::read(&ra).unwrap();
    bytes[8192 + 100] ^= 0x01;
    std::fs::write(&ra, &bytes).unwrap();
    let (ok, _) = run(&format!("veritysetup verify {} {} {root}", ra.display(), rv.display()));
    assert!(!ok, "veritysetup must reject a tampered root");

    let data = d.path().join("data.img");
    extract(&disk, &parts[5], &data);
    let fsck = must(&format!("/sbin/e2fsck -fn {} 2>&1", data.display()));
    assert!(fsck.contains("kiln-data") || fsck.contains("files"), "{fsck}");
    let label = must(&format!("/sbin/dumpe2fs -h {} 2>/dev/null | grep 'volume name'", data.display()));
    assert!(label.contains("kiln-data"), "{label}");

    let q = must(&format!("qemu-img check {}", out.join("disk.qcow2").display()));
    assert!(q.contains("No errors"), "{q}");
    let bmap = std::fs::read_to_string(out.join("disk.bmap")).unwrap();
    assert!(bmap.contains("<bmap version=\"2.0\">") && bmap.contains("<ChecksumType> sha256 </ChecksumType>"), "{bmap}");
}

#[test]
fn zst_and_bmap_outputs_are_what_zstd_and_bmaptool_expect() {
    common::built("qemu-amd64"); // warm cache
    let d = tempfile::tempdir().unwrap();
    let profiles = d.path().join("profiles");
    std::fs::create_dir_all(profiles.join("nodes")).unwrap();
    std::fs::write(profiles.join("nodes/single.toml"), "role = \"single\"\n").unwrap();
    let base = common::workspace().join("profiles/qemu-amd64.toml");
    std::fs::write(
        profiles.join("z.toml"),
        format!("extends = \"{}\"\nname = \"zst-bmap\"\noutputs = [\"disk\", \"zst\", \"bmap\"]\n[node]\nconfig = \"nodes/single.toml\"\n", base.display()),
    )
    .unwrap();
    std::env::set_var("KILN_SOURCE_DIR", common::workspace());
    let b = kiln::pipeline::build(&profiles.join("z.toml"), &d.path().join("out"), &kiln::inputs::cache::Cache::default_location()).unwrap_or_else(|e| panic!("{e:#}"));
    let o = b.out.display();
    must(&format!("zstd -t {o}/disk.raw.zst && zstd -dc {o}/disk.raw.zst | cmp - {o}/disk.raw"));
    let copy = d.path().join("copy.img");
    must(&format!("bmaptool copy --bmap {o}/disk.bmap {o}/disk.raw {}", copy.display()));
    must(&format!("cmp {} {o}/disk.raw", copy.display()));
}
