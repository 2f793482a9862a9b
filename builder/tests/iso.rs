//! The hybrid ISO writer, checked with tools nobody here wrote: xorriso
//! (El Torito, system area, extraction), sgdisk and sfdisk (GPT).
//!
//! The BIOS tests use Debian's real isolinux.bin and isohdpfx.bin, fetched
//! through kiln's own pinned-input path (apt-get download, into the kiln
//! cache), so they run on CI rather than skip.

use std::collections::BTreeMap;
use std::fs;
use std::io::Cursor;
use std::path::Path;
use std::process::Command;

use kiln::inputs::cache::Cache;
use kiln_formats::fat::{FatBuilder, FileContent};
use kiln_formats::gpt::{deterministic_guid, types};
use kiln::inputs::input::{self, Input};
use kiln_formats::iso::{self, BiosBoot, Content, Extent, HybridPartition, IsoFile, IsoSpec};
// A checker tool. Missing on CI is a failure; on a workstation, a skip.
use kiln_testkit::checker;

const EPOCH: u64 = 1_700_000_000; // 2023-11-14 22:13:20 UTC
const ISOLINUX_VERSION: &str = "3:6.04~git20190206.bf6db5b4+dfsg1-3";
const ISOLINUX_DEB_SHA256: &str =
    "cb14af88adc2c3844976cd2de61571d2af94d2fb65c277fe4acf3dc8a5d25aae";

fn run(tool: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", tool.display()));
    let text = kiln_testkit::output_text(&out);
    (out.status.success(), text)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// isolinux.bin and isohdpfx.bin from the pinned Debian package.
fn isolinux() -> (Vec<u8>, Vec<u8>) {
    let cache = Cache::default_location();
    let get = |member: &str| {
        let i = Input {
            deb: Some("isolinux".into()),
            version: Some(ISOLINUX_VERSION.into()),
            arch: Some("all".into()),
            sha256: Some(ISOLINUX_DEB_SHA256.into()),
            member: Some(format!("usr/lib/ISOLINUX/{member}")),
            ..Default::default()
        };
        let r = input::resolve(member, &i, "amd64", &cache)
            .unwrap_or_else(|e| panic!("fetching {member} from Debian's isolinux: {e}"));
        fs::read(&r.path).unwrap()
    };
    (get("isolinux.bin"), get("isohdpfx.bin"))
}

/// Bytes that differ from sector to sector, so a misplaced sector shows.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// A real FAT32 ESP image (about 33 MiB, so more 512-byte sectors than the
/// catalog's 16-bit count holds).
fn esp_image() -> Vec<u8> {
    let mut fat = FatBuilder::new("KILN_ESP", 0x4B49_4C4E);
    fat.set_timestamp(EPOCH);
    fat.add_file(
        "/EFI/BOOT/BOOTX64.EFI",
        FileContent::Bytes(pattern(70_000, 9)),
    )
    .unwrap();
    let size = fat.min_size();
    let mut c = Cursor::new(Vec::new());
    fat.write(size, &mut c).unwrap();
    let mut v = c.into_inner();
    v.resize(size as usize, 0);
    v
}

fn g(name: &str) -> kiln_formats::gpt::Guid {
    deterministic_guid("kiln-iso-test", name)
}

/// Expected file contents by ISO path.
struct Fixture {
    _dir: tempfile::TempDir,
    spec: IsoSpec,
    want: BTreeMap<String, Vec<u8>>,
}

/// Files of every shape: empty, one byte short of a block, several blocks,
/// nested directories, no extension, host files streamed from disk.
fn fixture(with_bios: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut files = vec![
        IsoFile::bytes("/README.TXT", b"kiln hybrid ISO\n".to_vec()),
        IsoFile::bytes("/EMPTY.DAT", Vec::new()),
        IsoFile::bytes("/NOEXT", b"no extension".to_vec()),
        IsoFile::bytes("/A/B/C/D/DEEP.BIN", pattern(5000, 1)),
        IsoFile::bytes("/A/B/EXACT.BLK", pattern(2048, 2)),
        IsoFile::bytes("/A/SHORT.BLK", pattern(2047, 3)),
        IsoFile::bytes("/EFI/BOOT/EFI.IMG", esp_image()),
    ];
    for (path, len, seed) in [
        ("/LIVE/ROOT.SQF", 3 * 1024 * 1024 + 123, 4),
        ("/LIVE/ROOT.VER", 40_961, 5),
        ("/LIVE/KERNEL.EFI", 100_000, 6),
    ] {
        let p = dir.path().join(format!("host{seed}"));
        fs::write(&p, pattern(len, seed)).unwrap();
        files.push(IsoFile::host(path, p));
    }
    let mut bios = None;
    if with_bios {
        let (bin, mbr) = isolinux();
        files.push(IsoFile::bytes("/ISOLINUX/ISOLINUX.BIN", bin));
        files.push(IsoFile::bytes(
            "/ISOLINUX/ISOLINUX.CFG",
            b"SERIAL 0 115200\nPROMPT 1\n".to_vec(),
        ));
        bios = Some(BiosBoot {
            isolinux_path: "/ISOLINUX/ISOLINUX.BIN".into(),
            mbr_code: mbr,
        });
    }
    let want = files
        .iter()
        .map(|f| {
            let bytes = match &f.content {
                Content::Bytes(b) => b.clone(),
                Content::Host(h) => fs::read(h).unwrap(),
            };
            (f.path.clone(), bytes)
        })
        .collect();
    let part = |name: &str, t, file: &str| HybridPartition {
        name: name.into(),
        type_guid: t,
        uuid: g(name),
        file: file.into(),
    };
    let spec = IsoSpec {
        volume_id: "KILN_TEST".into(),
        epoch: EPOCH,
        files,
        efi_image: Some("/EFI/BOOT/EFI.IMG".into()),
        bios,
        partitions: vec![
            part("ESP", types::ESP, "/EFI/BOOT/EFI.IMG"),
            part("root", types::ROOT_X86_64, "/LIVE/ROOT.SQF"),
            part("root-verity", types::ROOT_VERITY_X86_64, "/LIVE/ROOT.VER"),
        ],
        disk_guid: g("disk"),
    };
    Fixture {
        _dir: dir,
        spec,
        want,
    }
}

fn extent<'a>(extents: &'a [Extent], path: &str) -> &'a Extent {
    extents.iter().find(|e| e.path == path).unwrap()
}

fn read_range(img: &[u8], e: &Extent) -> Vec<u8> {
    img[e.byte_offset as usize..(e.byte_offset + e.len) as usize].to_vec()
}

/// The copy of isolinux.bin in the image is the original with a boot info
/// table at bytes 8..64.
fn expected_isolinux(orig: &[u8], lba: u32) -> Vec<u8> {
    let mut v = orig.to_vec();
    let mut sum = 0u32;
    for c in orig[64..].chunks(4) {
        let mut w = [0u8; 4];
        w[..c.len()].copy_from_slice(c);
        sum = sum.wrapping_add(u32::from_le_bytes(w));
    }
    v[8..12].copy_from_slice(&16u32.to_le_bytes());
    v[12..16].copy_from_slice(&lba.to_le_bytes());
    v[16..20].copy_from_slice(&(orig.len() as u32).to_le_bytes());
    v[20..24].copy_from_slice(&sum.to_le_bytes());
    v[24..64].fill(0);
    v
}

/// `xorriso -report_el_torito plain` boot image lines as
/// (platform, emulation, load size, LBA).
fn el_torito_images(xorriso: &Path, img: &Path) -> (Vec<(String, String, u64, u64)>, String) {
    let (ok, text) = run(xorriso, &["-indev", s(img), "-report_el_torito", "plain"]);
    assert!(ok, "xorriso -report_el_torito failed:\n{text}");
    let images = text
        .lines()
        .filter_map(|l| l.strip_prefix("El Torito boot img :"))
        .map(|rest| {
            let f: Vec<&str> = rest.split_whitespace().collect();
            // N  Pltf  B  Emul  Ld_seg  Hdpt  Ldsiz  LBA
            assert_eq!(f.len(), 8, "unexpected line {rest:?} in\n{text}");
            (
                f[1].to_string(),
                f[3].to_string(),
                f[6].parse().unwrap(),
                f[7].parse().unwrap(),
            )
        })
        .collect();
    (images, text)
}

/// Extracts the whole tree with osirrox and returns every file by path.
fn extract(xorriso: &Path, img: &Path, into: &Path) -> BTreeMap<String, Vec<u8>> {
    let (ok, text) = run(
        xorriso,
        &["-osirrox", "on", "-indev", s(img), "-extract", "/", s(into)],
    );
    assert!(ok, "osirrox extract failed:\n{text}");
    let mut got = BTreeMap::new();
    let mut stack = vec![into.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(into).unwrap().to_str().unwrap();
                got.insert(format!("/{rel}"), fs::read(&p).unwrap());
            }
        }
    }
    got
}

fn sgdisk_clean(sgdisk: &Path, img: &Path) {
    let (ok, text) = run(sgdisk, &["-v", s(img)]);
    assert!(ok, "sgdisk -v failed:\n{text}");
    assert!(text.contains("No problems found"), "sgdisk -v:\n{text}");
    assert!(
        !text.to_lowercase().contains("warning"),
        "sgdisk -v:\n{text}"
    );
}

/// Partitions from `sfdisk --json`: (start, size, type, uuid, name).
fn sfdisk_partitions(sfdisk: &Path, img: &Path) -> Vec<(u64, u64, String, String, String)> {
    let out = Command::new(sfdisk)
        .arg("--json")
        .arg(img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = &json["partitiontable"];
    assert_eq!(t["label"], "gpt", "{json}");
    t["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["start"].as_u64().unwrap(),
                p["size"].as_u64().unwrap(),
                p["type"].as_str().unwrap().to_lowercase(),
                p["uuid"].as_str().unwrap().to_lowercase(),
                p["name"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

/// Everything at once: BIOS and UEFI El Torito, isohybrid MBR, GPT over
/// three files, and every file back through osirrox.
#[test]
fn hybrid_iso_with_bios_and_uefi() {
    let fx = fixture(true);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("kiln.iso");
    let extents = iso::write(&fx.spec, &img).unwrap();
    let bytes = fs::read(&img).unwrap();
    assert_eq!(extents.len(), fx.spec.files.len());
    for (e, f) in extents.iter().zip(&fx.spec.files) {
        assert_eq!(e.path, f.path);
        assert_eq!(e.len, fx.want[&f.path].len() as u64, "{}", e.path);
        if e.len > 0 {
            assert_eq!(e.byte_offset % 2048, 0, "{}", e.path);
        }
    }
    let bin = extent(&extents, "/ISOLINUX/ISOLINUX.BIN");
    let bin_lba = (bin.byte_offset / 2048) as u32;
    let efi = extent(&extents, "/EFI/BOOT/EFI.IMG");

    // Size: whole blocks, and the PVD's volume space size says so.
    assert_eq!(bytes.len() % 2048, 0);
    assert_eq!(&bytes[16 * 2048 + 1..16 * 2048 + 6], b"CD001");
    assert_eq!(le32(&bytes, 16 * 2048 + 80) as usize, bytes.len() / 2048);

    // Contents in place, isolinux.bin with its boot info table.
    let mut want = fx.want.clone();
    let orig_bin = want["/ISOLINUX/ISOLINUX.BIN"].clone();
    want.insert(
        "/ISOLINUX/ISOLINUX.BIN".into(),
        expected_isolinux(&orig_bin, bin_lba),
    );
    for e in &extents {
        assert_eq!(read_range(&bytes, e), want[&e.path], "{}", e.path);
    }

    // The isohybrid MBR: boot code, isolinux.bin's 512-byte LBA, signature.
    let (_, mbr_code) = isolinux();
    assert_eq!(&bytes[..432], &mbr_code[..]);
    assert_eq!(le32(&bytes, 432), bin_lba * 4);
    assert_eq!(le32(&bytes, 436), 0);
    assert_eq!(&bytes[440..444], &g("disk").0[..4]);
    assert_eq!(bytes[446 + 4], 0xEE, "protective MBR entry");
    assert_eq!(&bytes[510..512], &[0x55, 0xAA]);

    let Some(xorriso) = checker("xorriso", "xorriso") else {
        return;
    };
    let (images, text) = el_torito_images(&xorriso, &img);
    assert_eq!(images.len(), 2, "{text}");
    assert_eq!(
        images[0],
        ("BIOS".into(), "none".into(), 4, u64::from(bin_lba)),
        "{text}"
    );
    // 33 MiB of FAT is more 512-byte sectors than the catalog holds: 0.
    assert_eq!(
        images[1],
        ("UEFI".into(), "none".into(), 0, efi.byte_offset / 2048),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("El Torito img opts :") && l.contains("boot-info-table")),
        "xorriso does not see the boot info table:\n{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("El Torito img path :") && l.contains("/ISOLINUX/ISOLINUX.BIN")),
        "{text}"
    );

    let (ok, text) = run(
        &xorriso,
        &["-indev", s(&img), "-report_system_area", "plain"],
    );
    assert!(ok, "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("System area summary:")
            && l.contains("MBR")
            && l.contains("isohybrid")
            && l.contains("GPT")),
        "xorriso does not recognise an isohybrid MBR with GPT:\n{text}"
    );
    for (i, name) in ["ESP", "root", "root-verity"].iter().enumerate() {
        let part_file = ["/EFI/BOOT/EFI.IMG", "/LIVE/ROOT.SQF", "/LIVE/ROOT.VER"][i];
        let e = extent(&extents, part_file);
        let start = e.byte_offset / 512;
        let end = start + e.len.div_ceil(512) - 1;
        let line = format!("GPT start and size :   {}  {}", i + 1, start);
        assert!(
            text.lines().any(|l| l.starts_with(&line)
                && l.split_whitespace().last() == Some(&(end - start + 1).to_string())),
            "wanted partition {name} as {line:?} … {} in\n{text}",
            end - start + 1
        );
        let path = format!("GPT partition path :   {}  {part_file}", i + 1);
        assert!(
            text.lines().any(|l| l == path),
            "wanted {path:?} in\n{text}"
        );
    }

    let got = extract(&xorriso, &img, &dir.path().join("x"));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (path, content) in &want {
        assert!(got[path] == *content, "{path} differs after extraction");
    }

    if let Some(sgdisk) = checker("sgdisk", "gdisk") {
        sgdisk_clean(&sgdisk, &img);
    }
    if let Some(sfdisk) = checker("sfdisk", "fdisk") {
        let parts = sfdisk_partitions(&sfdisk, &img);
        assert_eq!(parts.len(), 3);
        for (p, hp) in parts.iter().zip(&fx.spec.partitions) {
            let e = extent(&extents, &hp.file);
            assert_eq!(p.0 * 512, e.byte_offset, "{}", hp.name);
            assert_eq!(p.1, e.len.div_ceil(512), "{}", hp.name);
            assert_eq!(p.2, hp.type_guid.to_string());
            assert_eq!(p.3, hp.uuid.to_string());
            assert_eq!(p.4, hp.name);
            let part = &bytes[(p.0 * 512) as usize..((p.0 + p.1) * 512) as usize];
            assert_eq!(&part[..e.len as usize], &fx.want[&hp.file][..]);
            assert!(part[e.len as usize..].iter().all(|b| *b == 0));
        }
    }
}

/// UEFI only: the UEFI entry is the default, no BIOS code in the MBR, and a
/// small FAT image gets its exact sector count.
#[test]
fn uefi_only_iso() {
    let mut fx = fixture(false);
    let small = pattern(1_000_000, 7);
    for f in &mut fx.spec.files {
        if f.path == "/EFI/BOOT/EFI.IMG" {
            *f = IsoFile::bytes("/EFI/BOOT/EFI.IMG", small.clone());
        }
    }
    fx.want.insert("/EFI/BOOT/EFI.IMG".into(), small);
    fx.spec.partitions.truncate(1);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("uefi.iso");
    let extents = iso::write(&fx.spec, &img).unwrap();
    let bytes = fs::read(&img).unwrap();
    assert!(bytes[..440].iter().all(|b| *b == 0), "no boot code");
    assert_eq!(bytes[446 + 4], 0xEE);
    let efi = extent(&extents, "/EFI/BOOT/EFI.IMG");
    let Some(xorriso) = checker("xorriso", "xorriso") else {
        return;
    };
    let (images, text) = el_torito_images(&xorriso, &img);
    assert_eq!(
        images,
        vec![(
            "UEFI".to_string(),
            "none".to_string(),
            1_000_000u64.div_ceil(512),
            efi.byte_offset / 2048
        )],
        "{text}"
    );
    let got = extract(&xorriso, &img, &dir.path().join("x"));
    assert_eq!(got, fx.want);
    if let Some(sgdisk) = checker("sgdisk", "gdisk") {
        sgdisk_clean(&sgdisk, &img);
    }
}

/// No boot entries and no partitions: a plain ISO 9660 volume with an empty
/// system area and nothing after the data.
#[test]
fn plain_iso_without_boot() {
    let mut fx = fixture(false);
    fx.spec.efi_image = None;
    fx.spec.partitions.clear();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("plain.iso");
    iso::write(&fx.spec, &img).unwrap();
    let bytes = fs::read(&img).unwrap();
    assert!(bytes[..32768].iter().all(|b| *b == 0));
    assert_eq!(le32(&bytes, 16 * 2048 + 80) as usize, bytes.len() / 2048);
    // The descriptor after the PVD is the terminator, not a boot record.
    assert_eq!(bytes[17 * 2048], 255);
    let Some(xorriso) = checker("xorriso", "xorriso") else {
        return;
    };
    let (images, text) = el_torito_images(&xorriso, &img);
    assert!(images.is_empty(), "{text}");
    let got = extract(&xorriso, &img, &dir.path().join("x"));
    assert_eq!(got, fx.want);
    let (ok, text) = run(&xorriso, &["-indev", s(&img), "-pvd_info"]);
    assert!(ok, "{text}");
    for want in [
        "Volume Id    : KILN_TEST",
        "Creation Time: 2023111422132000",
    ] {
        assert!(text.contains(want), "wanted {want:?} in\n{text}");
    }
}

/// Many files in one directory: its records span several blocks, none
/// crossing a block boundary, and xorriso reads them all back.
#[test]
fn large_directory_spans_blocks() {
    let mut files = Vec::new();
    let mut want = BTreeMap::new();
    for i in 0..300 {
        let path = format!("/MANY/FILE_WITH_A_LONGER_NAME_{i:03}.TXT");
        let content = format!("file {i}\n").into_bytes();
        want.insert(path.clone(), content.clone());
        files.push(IsoFile::bytes(&path, content));
    }
    let spec = IsoSpec {
        volume_id: "MANY".into(),
        epoch: EPOCH,
        files,
        efi_image: None,
        bios: None,
        partitions: Vec::new(),
        disk_guid: g("many"),
    };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("many.iso");
    iso::write(&spec, &img).unwrap();
    let Some(xorriso) = checker("xorriso", "xorriso") else {
        return;
    };
    assert_eq!(extract(&xorriso, &img, &dir.path().join("x")), want);
}

/// The same spec gives the same bytes; another epoch changes them.
#[test]
fn writes_are_reproducible() {
    let fx = fixture(true);
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a.iso"),
        dir.path().join("b.iso"),
        dir.path().join("c.iso"),
    );
    let ea = iso::write(&fx.spec, &a).unwrap();
    let eb = iso::write(&fx.spec, &b).unwrap();
    assert_eq!(ea, eb);
    assert!(
        fs::read(&a).unwrap() == fs::read(&b).unwrap(),
        "two writes differ"
    );
    let mut later = fx.spec.clone();
    later.epoch += 1;
    iso::write(&later, &c).unwrap();
    assert!(fs::read(&a).unwrap() != fs::read(&c).unwrap());
}

/// Mistakes in the spec are errors that name the culprit; nothing is left
/// behind at the output path.
#[test]
fn bad_specs_are_clear_errors() {
    let base = fixture(false);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("bad.iso");
    let check = |f: &dyn Fn(&mut IsoSpec), want: &[&str]| {
        let mut spec = base.spec.clone();
        f(&mut spec);
        let msg = iso::write(&spec, &img).unwrap_err().to_string();
        for w in want {
            assert!(msg.contains(w), "wanted {w:?} in {msg:?}");
        }
        assert!(!img.exists(), "a failed write left {img:?}");
    };
    check(
        &|s| {
            s.files
                .push(IsoFile::bytes("/efi/boot/x.efi", b"x".to_vec()))
        },
        &["/efi/boot/x.efi", "upper case"],
    );
    check(
        &|s| s.files.push(IsoFile::bytes("/A/B-C.TXT", b"x".to_vec())),
        &["/A/B-C.TXT", "A-Z, 0-9 and _"],
    );
    check(
        &|s| s.files.push(IsoFile::bytes("/README.TXT", b"x".to_vec())),
        &["/README.TXT", "twice"],
    );
    check(
        &|s| {
            s.files
                .push(IsoFile::bytes("/NOEXT/INNER.TXT", b"x".to_vec()))
        },
        &["/NOEXT", "is a file"],
    );
    check(
        &|s| s.efi_image = Some("/EFI/BOOT/NOPE.IMG".into()),
        &[
            "/EFI/BOOT/NOPE.IMG",
            "efi_image",
            "not one of the ISO's files",
        ],
    );
    check(
        &|s| {
            s.bios = Some(BiosBoot {
                isolinux_path: "/ISOLINUX/ISOLINUX.BIN".into(),
                mbr_code: vec![0; 432],
            })
        },
        &["/ISOLINUX/ISOLINUX.BIN", "isolinux_path"],
    );
    check(
        &|s| {
            s.bios = Some(BiosBoot {
                isolinux_path: "/README.TXT".into(),
                mbr_code: vec![0; 432],
            })
        },
        &["/README.TXT", "isolinux"],
    );
    check(
        &|s| s.partitions[1].file = "/LIVE/GONE.SQF".into(),
        &["partition 2", "root", "/LIVE/GONE.SQF"],
    );
    check(
        &|s| s.partitions[2].file = "/LIVE/ROOT.SQF".into(),
        &["partition 3", "partition 2 already covers"],
    );
    check(
        &|s| s.partitions[1].file = "/EMPTY.DAT".into(),
        &["partition 2", "empty"],
    );
    check(
        &|s| s.partitions[2].uuid = s.partitions[0].uuid,
        &["same unique GUID"],
    );
    check(&|s| s.volume_id = "kiln test".into(), &["volume ID", "A-Z"]);
    check(
        &|s| {
            s.files
                .push(IsoFile::host("/HOST.BIN", "/nonexistent/kiln"))
        },
        &["/nonexistent/kiln", "/HOST.BIN"],
    );
}
