//! SD-card images for the shipped armv7 boards, with the real u-boot blobs
//! from Debian (fetched through apt into the kiln cache) and a small
//! synthetic kernel, dtb, initramfs and root. Each image is checked with
//! tools nobody here wrote: sfdisk or sgdisk, fsck.vfat and mtools.

use kiln::inputs::board::{self, Board, BoardInputs};
use kiln::inputs::cache::Cache;
use kiln::image::disk::{self, DiskSpec, RootImage, RootInputs};
use kiln_formats::tree::Tree;
use kiln::image::sdcard::{self, KernelFiles, SdSpec};
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1024 * 1024;

fn boards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../overlays/boards")
}

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd).args(args).env("MTOOLS_SKIP_CHECK", "1").output().unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    (out.status.success(), kiln_testkit::output_text(&out))
}

/// A root, a kernel and dtbs, small and made up.
struct Fixture {
    dir: tempfile::TempDir,
    root: RootImage,
    zimage: PathBuf,
    dtbs: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut root = Tree::new();
    root.mkdir_p("/etc", 0o755).unwrap();
    root.file("/etc/os-release", "ID=kiln\n", 0o644).unwrap();
    let mut stage1 = Tree::new();
    stage1.file("/init", "#!/bin/sh\n", 0o755).unwrap();
    let spec = DiskSpec { esp_mib: 64, root_slot: kiln::image::disk::RootSlot::Mib(8), data_mib: 8, on_corruption: None };
    let root = disk::build_root(dir.path(), &spec, &RootInputs { root: &root, stage1: &stage1, cmdline: "panic=10", epoch: 1_700_000_000, store: None }, &kiln::progress::Steps::new(true)).unwrap();
    let zimage = dir.path().join("zImage");
    std::fs::write(&zimage, (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect::<Vec<_>>()).unwrap();
    let dtbs = dir.path().join("dtbs");
    std::fs::create_dir_all(&dtbs).unwrap();
    for d in ["sun7i-a20-cubieboard2.dtb", "am335x-boneblack.dtb"] {
        std::fs::write(dtbs.join(d), format!("\u{d0}\u{0d}fake dtb {d}")).unwrap();
    }
    Fixture { dir, root, zimage, dtbs }
}

fn spec() -> SdSpec {
    SdSpec { profile: "board-test".into(), boot_mib: 64, root_slot: kiln::image::disk::RootSlot::Mib(8), data_mib: 8, epoch: 1_700_000_000 }
}

fn write(f: &Fixture, b: &Board, inputs: &BoardInputs, name: &str) -> anyhow::Result<(PathBuf, sdcard::SdBuilt)> {
    let out = f.dir.path().join(name);
    let k = KernelFiles { zimage: &f.zimage, dtbs: Some(&f.dtbs) };
    let built = sdcard::write(&out, f.dir.path(), &spec(), b, inputs, &f.root, &k)?;
    Ok((out, built))
}

fn real_board(name: &str) -> (Board, BoardInputs) {
    let b = board::load_named(&boards_dir(), name).unwrap();
    let inputs = b.resolve("armhf", &Cache::default_location()).unwrap_or_else(|e| panic!("{e}"));
    (b, inputs)
}

/// The boot FAT partition, as its own file, for fsck.vfat and mtools.
fn boot_fat(img: &Path, built: &sdcard::SdBuilt, out: &Path) -> PathBuf {
    let p = &built.partitions[0];
    let bytes = std::fs::read(img).unwrap();
    let fat = out.join("boot.fat");
    std::fs::write(&fat, &bytes[p.start as usize..p.end as usize]).unwrap();
    let (ok, text) = run("fsck.vfat", &["-n", fat.to_str().unwrap()]);
    assert!(ok, "fsck.vfat -n:\n{text}");
    fat
}

fn mtype(fat: &Path, path: &str) -> Vec<u8> {
    let out = Command::new("mtype").args(["-i", fat.to_str().unwrap(), &format!("::{path}")]).env("MTOOLS_SKIP_CHECK", "1").output().unwrap();
    assert!(out.status.success(), "mtype {path}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn sfdisk_verify(img: &Path) {
    let (ok, text) = run("sfdisk", &["--verify", img.to_str().unwrap()]);
    assert!(ok && text.contains("No errors detected") && !text.contains("arning"), "sfdisk --verify:\n{text}");
}

/// Checks shared by every board: the table, the FAT and what u-boot reads.
fn check_common(f: &Fixture, b: &Board, img: &Path, built: &sdcard::SdBuilt) -> PathBuf {
    let fat = boot_fat(img, built, f.dir.path());
    // u-boot's distro boot runs /boot.scr (a legacy script image that
    // `mkimage -l` reads), which boots slot a's extlinux.conf from
    // /kiln/state; there is no /extlinux/extlinux.conf to take first.
    let scr = mtype(&fat, "/boot.scr");
    assert_eq!(scr, kiln_formats::bootscr::image(&kiln_formats::bootscr::script(), "kiln A/B", 1_700_000_000));
    let scr_path = fat.with_extension("scr");
    std::fs::write(&scr_path, &scr).unwrap();
    let (ok, listing) = run("mkimage", &["-l", scr_path.to_str().unwrap()]);
    assert!(ok && listing.contains("kiln A/B") && listing.contains("Script"), "mkimage -l boot.scr:\n{listing}");
    assert_eq!(String::from_utf8(mtype(&fat, "/kiln/state")).unwrap(), kiln_contract::uboot::State::initial().to_text());
    let (ok, listing) = run("mdir", &["-b", "-i", fat.to_str().unwrap(), "::/extlinux"]);
    assert!(!ok, "no /extlinux on the card: {listing}");
    let conf = String::from_utf8(mtype(&fat, "/kiln/a/extlinux.conf")).unwrap();
    assert!(conf.contains("kernel /kiln/a/zImage") && conf.contains("initrd /kiln/a/initramfs.cpio.zst"), "{conf}");
    assert!(conf.contains(&format!("append {}", built.cmdline)), "{conf}");
    assert!(built.cmdline.contains(&format!("roothash={}", f.root.verity.root_hex())));
    assert!(built.cmdline.contains(&format!("console={}", b.console.as_deref().unwrap())), "{}", built.cmdline);
    assert_eq!(mtype(&fat, "/kiln/a/zImage"), std::fs::read(&f.zimage).unwrap());
    assert_eq!(mtype(&fat, "/kiln/a/initramfs.cpio.zst"), f.root.initrd);
    assert!(String::from_utf8(mtype(&fat, "/node.toml")).unwrap().starts_with("# kiln node config."));
    match &b.dtb {
        Some(d) => {
            assert!(conf.contains(&format!("fdt /kiln/a/dtbs/{d}\n")), "{conf}");
            assert_eq!(mtype(&fat, &format!("/kiln/a/dtbs/{d}")), std::fs::read(f.dtbs.join(d)).unwrap());
        }
        None => assert!(!conf.contains("fdt"), "{conf}"),
    }
    // root-a: the squashfs, then (MBR) its verity tree at the slot's end.
    let bytes = std::fs::read(img).unwrap();
    let ra = &built.partitions[1];
    let sq = std::fs::read(&f.root.squashfs).unwrap();
    assert_eq!(&bytes[ra.start as usize..ra.start as usize + sq.len()], &sq[..]);
    fat
}

fn byte_identical(f: &Fixture, b: &Board, inputs: &BoardInputs, first: &Path) {
    let (again, _) = write(f, b, inputs, "again.img").unwrap();
    assert!(std::fs::read(first).unwrap() == std::fs::read(&again).unwrap(), "two writes of {} differ", b.name);
}

/// The MBR and the kiln.mbr= words that let kiln-init find root-a.
fn check_mbr_cmdline(f: &Fixture, img: &Path, built: &sdcard::SdBuilt) {
    let bytes = std::fs::read(img).unwrap();
    let sig = u32::from_le_bytes(bytes[440..444].try_into().unwrap());
    assert_eq!(bytes[446], 0x80, "partition 1 is bootable");
    assert_eq!(bytes[450], 0x0c, "partition 1 is FAT32 LBA");
    let slot = 8 * MIB;
    assert!(built.cmdline.contains(&format!("kiln.mbr={sig:08x},2,{slot}")), "{}", built.cmdline);
    let ra = &built.partitions[1];
    let v = std::fs::read(&f.root.verity_path).unwrap();
    let at = (ra.start + slot) as usize;
    assert_eq!(&bytes[at..at + v.len()], &v[..], "verity tree after the slot");
}

#[test]
fn cubieboard2() {
    let f = fixture();
    let (b, inputs) = real_board("cubieboard2");
    let (img, built) = write(&f, &b, &inputs, "cubieboard2.img").unwrap();
    sfdisk_verify(&img);
    let bytes = std::fs::read(&img).unwrap();
    let blob = std::fs::read(&inputs.blobs[0].path).unwrap();
    assert!(blob.len() > 100_000, "the real u-boot-sunxi-with-spl.bin");
    assert_eq!(&bytes[8192..8192 + blob.len()], &blob[..], "u-boot at 8 KiB");
    // The SPL's eGON header, which the A20 boot ROM checks.
    assert_eq!(&bytes[8192 + 4..8192 + 12], b"eGON.BT0");
    check_common(&f, &b, &img, &built);
    check_mbr_cmdline(&f, &img, &built);
    byte_identical(&f, &b, &inputs, &img);
}

#[test]
fn beaglebone_black() {
    let f = fixture();
    let (b, inputs) = real_board("beaglebone-black");
    let (img, built) = write(&f, &b, &inputs, "bbb.img").unwrap();
    sfdisk_verify(&img);
    let fat = check_common(&f, &b, &img, &built);
    check_mbr_cmdline(&f, &img, &built);
    for (file, r) in b.files.iter().zip(&inputs.files) {
        assert_eq!(mtype(&fat, &file.path), std::fs::read(&r.path).unwrap(), "{}", file.path);
    }
    // MLO is the root directory's first file, and its data the first on
    // the volume.
    let (ok, dir) = run("mdir", &["-i", fat.to_str().unwrap(), "-b", "::/"]);
    assert!(ok, "{dir}");
    assert_eq!(dir.lines().next(), Some("::/MLO"), "{dir}");
    let (_, mlo) = run("mshowfat", &["-i", fat.to_str().unwrap(), "::/MLO"]);
    let (_, uboot) = run("mshowfat", &["-i", fat.to_str().unwrap(), "::/u-boot.img"]);
    let first = |s: &str| s.split('<').nth(1).and_then(|r| r.split(['-', '>']).next()).and_then(|n| n.trim().parse::<u32>().ok()).unwrap_or(u32::MAX);
    assert!(first(&mlo) < first(&uboot), "MLO {mlo} before u-boot.img {uboot}");
    byte_identical(&f, &b, &inputs, &img);
}

#[test]
fn qemu_armv7() {
    let f = fixture();
    let (b, inputs) = real_board("qemu-armv7");
    let bios = inputs.bios.as_ref().expect("the qemu board's u-boot");
    assert!(std::fs::metadata(&bios.path).unwrap().len() > 100_000);
    let (img, built) = write(&f, &b, &inputs, "qemu.img").unwrap();
    sfdisk_verify(&img);
    check_common(&f, &b, &img, &built);
    check_mbr_cmdline(&f, &img, &built);
    // No bootloader in the image: QEMU loads u-boot with -bios.
    let bytes = std::fs::read(&img).unwrap();
    assert!(bytes[512..MIB as usize].iter().all(|b| *b == 0));
}

/// A scratch overlay in `dir`, with blob files made up.
fn scratch_board(dir: &Path, toml: &str, blobs: &[(&str, usize)]) -> (Board, BoardInputs) {
    let bd = dir.join("scratch");
    std::fs::create_dir_all(&bd).unwrap();
    let mut t = toml.to_string();
    for (name, len) in blobs {
        let data: Vec<u8> = (0..*len).map(|i| (i % 200) as u8 + 1).collect();
        std::fs::write(bd.join(name), &data).unwrap();
        t = t.replace(&format!("@{name}@"), &kiln::inputs::input::sha256_bytes(&data));
    }
    std::fs::write(bd.join("board.toml"), t).unwrap();
    let b = board::load(&bd).unwrap_or_else(|e| panic!("{e}"));
    let cache = Cache::at(dir.join("cache"));
    let inputs = b.resolve("armhf", &cache).unwrap();
    (b, inputs)
}

/// Nothing of the image, not even a temporary file, is left after an error.
fn nothing_left(f: &Fixture, name: &str) {
    assert!(!f.dir.path().join(name).exists());
    let stray: Vec<_> = std::fs::read_dir(f.dir.path()).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with(".sdcard-")).collect();
    assert!(stray.is_empty(), "{stray:?}");
}

#[test]
fn gpt_board_with_a_blob() {
    let f = fixture();
    let (b, inputs) = scratch_board(
        f.dir.path(),
        "partition_table = \"gpt\"\nconsole = \"ttyS2,1500000\"\n[[blob]]\ninput = { file = \"spl.bin\", sha256 = \"@spl.bin@\" }\noffset = 32768\n",
        &[("spl.bin", 200_000)],
    );
    let (img, built) = write(&f, &b, &inputs, "gpt.img").unwrap();
    let (ok, text) = run("sgdisk", &["-v", img.to_str().unwrap()]);
    assert!(ok && text.contains("No problems found"), "sgdisk -v:\n{text}");
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(&bytes[32768..232_768], &std::fs::read(&inputs.blobs[0].path).unwrap()[..]);
    check_common(&f, &b, &img, &built);
    assert!(!built.cmdline.contains("kiln.mbr="));
    byte_identical(&f, &b, &inputs, &img);
}

#[test]
fn overlapping_blob_is_a_clear_error() {
    let f = fixture();
    let blob = |n: &str, off: u64| format!("[[blob]]\ninput = {{ file = \"{n}\", sha256 = \"@{n}@\" }}\noffset = {off}\n");
    let toml = format!("partition_table = \"mbr\"\n{}{}", blob("a.bin", 8192), blob("b.bin", 65536));
    let (b, inputs) = scratch_board(f.dir.path(), &toml, &[("a.bin", 60_000), ("b.bin", 10)]);
    let e = format!("{:#}", write(&f, &b, &inputs, "x.img").unwrap_err());
    assert!(e.contains("board.toml:7: key `blob[1].offset`") && e.contains("blob[1] (bytes 65536..65546) overlaps blob[0] (bytes 8192..68192)"), "{e}");
    nothing_left(&f, "x.img");
    // A blob running into the first partition.
    let (b, inputs) = scratch_board(f.dir.path(), &format!("partition_table = \"mbr\"\n{}", blob("a.bin", 8192)), &[("a.bin", 2_000_000)]);
    let e = format!("{:#}", write(&f, &b, &inputs, "x.img").unwrap_err());
    assert!(e.contains("key `blob[0].offset`") && e.contains("overlaps partition 1 (boot) (bytes 1048576.."), "{e}");
    nothing_left(&f, "x.img");
}

#[test]
fn missing_dtb_is_a_clear_error() {
    let f = fixture();
    let (b, inputs) = scratch_board(f.dir.path(), "partition_table = \"mbr\"\ndtb = \"sun8i-h3-nanopi.dtb\"\n", &[]);
    let e = format!("{:#}", write(&f, &b, &inputs, "x.img").unwrap_err());
    assert!(e.contains("board.toml:2: key `dtb`") && e.contains("sun8i-h3-nanopi.dtb is not among the kernel's dtbs"), "{e}");
    nothing_left(&f, "x.img");
}

/// Every shipped overlay's u-boot runs boot.scr: the build's check reads
/// each u-boot's command table (the SPL-only MLO is skipped) and finds every
/// command the script uses.
#[test]
fn every_shipped_board_u_boot_has_the_boot_script_commands() {
    let script = kiln_formats::bootscr::script();
    for (name, where_) in [("cubieboard2", "blob[0]"), ("orangepi-pc", "blob[0]"), ("beaglebone-black", "file /u-boot.img"), ("qemu-armv7", "bios")] {
        let (b, inputs) = real_board(name);
        let checked = b.check_boot_script(&inputs, &script).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(checked.iter().map(|c| c.input.as_str()).collect::<Vec<_>>(), [where_], "{name}");
        assert!(checked[0].commands.commands.len() > 50, "{name}: {:?}", checked[0].commands);
    }
}

/// Debian's am335x u-boot (the BeagleBone Black's) has no `setexpr`: a
/// script using it gets an error that names the board, the u-boot file and
/// the command.
#[test]
fn a_u_boot_without_a_command_the_script_runs_is_a_clear_error() {
    let (b, inputs) = real_board("beaglebone-black");
    let e = b.check_boot_script(&inputs, "if itest 1 == 1; then setexpr n 1 + 1; fi\n").unwrap_err();
    assert!(e.contains("board beaglebone-black (") && e.contains("board.toml)"), "{e}");
    assert!(e.contains("file /u-boot.img (u-boot-omap") && e.contains("am335x_evm/u-boot.img"), "{e}");
    assert!(e.contains("has no `setexpr` command") && e.contains("CONFIG_CMD_SETEXPR"), "{e}");

    // The Orange Pi PC's u-boot with its `fatwrite` renamed: the real
    // script now fails on that board, naming the blob.
    let d = tempfile::tempdir().unwrap();
    let (mut b, mut inputs) = real_board("orangepi-pc");
    let mut bytes = std::fs::read(&inputs.blobs[0].path).unwrap();
    let mut renamed = 0;
    for i in 0..bytes.len().saturating_sub(10) {
        if &bytes[i..i + 10] == b"\0fatwrite\0" {
            bytes[i + 8] = b'X';
            renamed += 1;
        }
    }
    assert!(renamed > 0, "no fatwrite name in the blob");
    let patched = d.path().join("u-boot-sunxi-with-spl.bin");
    std::fs::write(&patched, &bytes).unwrap();
    inputs.blobs[0].path = patched;
    let e = b.check_boot_script(&inputs, &kiln_formats::bootscr::script()).unwrap_err();
    assert!(e.contains("board orangepi-pc (") && e.contains("blob[0] (u-boot-sunxi") && e.contains("nanopi_neo/u-boot-sunxi-with-spl.bin"), "{e}");
    assert!(e.contains("has no `fatwrite` command") && e.contains("CONFIG_FAT_WRITE"), "{e}");

    // No u-boot among the inputs at all (only an SPL-like blob).
    std::fs::write(d.path().join("spl.bin"), vec![0x5a; 32 * 1024]).unwrap();
    inputs.blobs[0].path = d.path().join("spl.bin");
    let e = b.check_boot_script(&inputs, "echo hi\n").unwrap_err();
    assert!(e.contains("none of its blobs, files or bios holds a u-boot command table") && e.contains("uboot = \"board\""), "{e}");
    b.uboot = board::UbootPlace::Board;
    assert!(b.check_boot_script(&inputs, "echo hi\n").unwrap().is_empty());
}
