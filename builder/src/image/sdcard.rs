//! The armv7 SD-card image (`sdcard.img`): a board's partition table and raw
//! bootloader blobs, a FAT32 boot partition for u-boot's distro boot, the
//! A/B root slots and a data partition.
//!
//! The boot FAT holds `/boot.scr` (the A/B choice and its boot counter, see
//! [`kiln_formats::bootscr`]), `/kiln/state`, and per slot `/kiln/<x>/` with
//! `extlinux.conf`, `zImage`, `initramfs.cpio.zst` and `dtbs/<dtb>`; slot b's
//! directory appears with the first update. There is no
//! `/extlinux/extlinux.conf`: u-boot's distro boot would take it before
//! boot.scr.
//!
//! GPT boards get disk.rs's layout, with the boot FAT as `esp` marked legacy
//! BIOS bootable (what u-boot's `part list -bootable` looks for), so
//! kiln-init finds root and verity by the root hash as on any disk. MBR has
//! four primary partitions and no partition UUIDs: boot FAT (bootable),
//! root-a, root-b, data, each root slot holding its verity tree after the
//! squashfs at the slot's size; `kiln.mbr=<disk signature>,<partition>,<hash
//! offset>` on the cmdline tells kiln-init where.
//!
//! The image is written to a temporary file next to `path` and renamed into
//! place, so a failed build never leaves a half-written card image.

use crate::inputs::board::{Board, BoardInputs, PartitionTable, Region};
use kiln_formats::bootscr;
use crate::image::disk::{self, RootImage, MIB};
use kiln_formats::fat::{FatBuilder, FileContent};
use kiln_formats::gpt::{self, Mbr, MbrPartition, SECTOR};
use crate::arch::Arch;
use crate::tomlfile::ProfileError;
use anyhow::{Context, Result};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

pub use kiln_contract::uboot::{extlinux_conf, DTB_DIR, EXTLINUX, INITRD, KERNEL};
use kiln_contract::layout::Slot;
use kiln_contract::uboot;

/// The firmware `kiln build` copies from an armv7 board's `bios` input
/// (u-boot for QEMU) into the output, for `kiln run`'s `-bios`.
pub const UBOOT_BIN: &str = "u-boot.bin";

/// The sizes and names of the card.
#[derive(Debug, Clone)]
pub struct SdSpec {
    /// The profile name: GUIDs, the disk signature and the volume id derive
    /// from it.
    pub profile: String,
    pub boot_mib: u64,
    pub root_slot: disk::RootSlot,
    pub data_mib: u64,
    /// Every FAT and ext4 timestamp.
    pub epoch: u64,
}

/// The kernel build's outputs the card needs.
pub struct KernelFiles<'a> {
    /// `arch/arm/boot/zImage`.
    pub zimage: &'a Path,
    /// The kernel cache's `dtbs/` (paths relative to arch/arm/boot/dts/);
    /// only needed when the board names a dtb.
    pub dtbs: Option<&'a Path>,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct SdBuilt {
    pub size: u64,
    /// The APPEND line of extlinux.conf.
    pub cmdline: String,
    /// Partitions in table order.
    pub partitions: Vec<Region>,
}

/// Where the partitions go. Pure, so it is tested without a disk.
#[derive(Debug, Clone, PartialEq)]
enum Table {
    Mbr(Mbr),
    Gpt(gpt::Gpt),
}

#[derive(Debug, Clone, PartialEq)]
struct Plan {
    table: Table,
    size: u64,
    boot: Region,
    /// root-a's squashfs and its verity tree (one region on MBR, where the
    /// tree starts `slot` bytes into the partition).
    root_a: Region,
    root_a_verity: Region,
    data: Region,
    partitions: Vec<Region>,
    /// `kiln.mbr=…` for MBR cards.
    cmdline: Option<String>,
}

/// The MBR disk signature: from the profile, never 0 (which means none).
fn disk_signature(profile: &str) -> u32 {
    let g = disk::guid(profile, "mbr-disk");
    u32::from_le_bytes([g.0[0], g.0[1], g.0[2], g.0[3]]).max(1)
}

fn plan(board: &Board, spec: &SdSpec, root: &RootImage, slot: u64) -> Result<Plan> {
    let (boot_bytes, data_bytes) = (spec.boot_mib * MIB, spec.data_mib * MIB);
    match board.partition_table {
        PartitionTable::Gpt => {
            let t = disk::gpt_table(&spec.profile, Arch::Armv7, &root.verity, boot_bytes, gpt::attributes::LEGACY_BIOS_BOOTABLE, slot, data_bytes)?;
            let region = |name: &str| -> Result<Region> {
                let p = disk::gpt_part(&t, name)?;
                Ok(Region::new(format!("partition {name}"), p.offset_bytes(), p.size_bytes()))
            };
            let partitions = t.partitions.iter().map(|p| Region::new(format!("partition {}", p.name), p.offset_bytes(), p.size_bytes())).collect();
            Ok(Plan { size: t.size_bytes, boot: region("esp")?, root_a: region("root-a")?, root_a_verity: region("root-a-verity")?, data: region("data")?, partitions, cmdline: None, table: Table::Gpt(t) })
        }
        PartitionTable::Mbr => {
            let root_bytes = slot + disk::verity_slot_bytes(slot);
            let names = ["boot", "root-a", "root-b", "data"];
            let sizes = [boot_bytes, root_bytes, root_bytes, data_bytes];
            let mut at = MIB;
            let mut regions = Vec::new();
            let mut entries = Vec::new();
            for (i, (name, len)) in names.iter().zip(sizes).enumerate() {
                let len = len.div_ceil(MIB).max(1) * MIB;
                let sectors = u32::try_from(len / SECTOR).context("a partition too big for MBR")?;
                let first = u32::try_from(at / SECTOR).context("a card too big for MBR (2 TiB)")?;
                entries.push(MbrPartition { bootable: i == 0, kind: if i == 0 { 0x0c } else { 0x83 }, first_lba: first, sectors });
                regions.push(Region::new(format!("partition {} ({name})", i + 1), at, len));
                at += len;
            }
            let sig = disk_signature(&spec.profile);
            let ra = regions[1].clone();
            Ok(Plan {
                table: Table::Mbr(Mbr { disk_signature: sig, partitions: entries }),
                size: at,
                boot: regions[0].clone(),
                root_a_verity: Region::new("root-a verity", ra.start + slot, ra.end - ra.start - slot),
                root_a: ra,
                data: regions[3].clone(),
                partitions: regions,
                cmdline: Some(format!("kiln.mbr={sig:08x},2,{slot}")),
            })
        }
    }
}

/// The cmdline a board bundle carries: the card's without the slot's
/// `kiln.slot=` (the node sets it, with `kiln.mbr=` on MBR cards).
pub fn bundle_cmdline(board: &Board, root: &RootImage) -> String {
    card_cmdline(board, root, None).split_whitespace().filter(|w| !w.starts_with("kiln.slot=")).collect::<Vec<_>>().join(" ")
}

/// The kernel cmdline on the card: the root's (with `roothash=`), the
/// board's extra words, its console last (the last console= is
/// /dev/console), and where the root is on an MBR card.
fn card_cmdline(board: &Board, root: &RootImage, mbr: Option<&str>) -> String {
    let console = board.console.as_ref().map(|c| format!("console={c}"));
    [Some(root.cmdline.as_str()), Some(board.cmdline.as_str()), console.as_deref(), mbr].into_iter().flatten().filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" ")
}

/// Writes the card image for `board` at `path` (atomically), with scratch
/// files in `work`. `inputs` are `board`'s, resolved.
pub fn write(path: &Path, work: &Path, spec: &SdSpec, board: &Board, inputs: &BoardInputs, root: &RootImage, kernel: &KernelFiles) -> Result<SdBuilt> {
    let slot = disk::root_slot_bytes(root, spec.root_slot)?;
    let dtb = dtb_file(board, kernel.dtbs)?;
    let plan = plan(board, spec, root, slot)?;
    let sizes: Vec<u64> = inputs.blobs.iter().map(|r| r.size).collect();
    board.check_layout(&sizes, &plan.partitions, plan.size)?;
    let cmdline = card_cmdline(board, root, plan.cmdline.as_deref());

    let vol = disk::guid(&spec.profile, "boot-volume");
    let mut fat = FatBuilder::new("KILN-BOOT", u32::from_le_bytes([vol.0[0], vol.0[1], vol.0[2], vol.0[3]]));
    fat.set_timestamp(spec.epoch);
    fat.set_hidden_sectors(u32::try_from(plan.boot.start / SECTOR).unwrap_or(0));
    for (f, r) in board.files.iter().zip(&inputs.files) {
        fat.add_file(&f.path, FileContent::Host(r.path.clone())).with_context(|| format!("{}: file {}", board.path.display(), f.path))?;
    }
    let a = format!("/{}", uboot::slot_dir(Slot::A));
    fat.add_file(&format!("{a}/{KERNEL}"), FileContent::Host(kernel.zimage.to_path_buf())).context("the kernel zImage")?;
    if let (Some(d), Some(host)) = (&board.dtb, dtb) {
        fat.add_file(&format!("{a}/{DTB_DIR}/{d}"), FileContent::Host(host))?;
    }
    fat.add_file(&format!("{a}/{INITRD}"), FileContent::Bytes(root.initrd.clone()))?;
    fat.add_file(&format!("{a}/{EXTLINUX}"), FileContent::Bytes(extlinux_conf(&board.name, Slot::A, board.dtb.as_deref(), &cmdline).into_bytes()))?;
    fat.add_file(&format!("/{}", uboot::STATE), FileContent::Bytes(uboot::State::initial().to_text().into_bytes()))?;
    fat.add_file(bootscr::PATH, FileContent::Bytes(bootscr::image(&bootscr::script(), "kiln A/B", u32::try_from(spec.epoch).unwrap_or(u32::MAX))))?;
    fat.add_file("/node.toml", FileContent::Bytes(disk::NODE_TOML_TEMPLATE.as_bytes().to_vec()))?;

    let data_path = work.join("sdcard-data.ext4");
    disk::make_ext4(&data_path, plan.data.end - plan.data.start, &spec.profile, spec.epoch)?;

    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new().prefix(".sdcard-").tempfile_in(dir).with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let mut img = tmp.as_file().try_clone()?;
    img.set_len(plan.size)?;
    match &plan.table {
        Table::Mbr(m) => m.write(&mut img).context("writing the MBR")?,
        Table::Gpt(g) => g.write(&mut img).context("writing the GPT")?,
    }
    for ((n, b), r) in board.blobs.iter().enumerate().zip(&inputs.blobs) {
        disk::copy_sparse(&r.path, &mut img, b.offset).with_context(|| format!("{}: blob[{n}]", board.path.display()))?;
    }
    img.seek(SeekFrom::Start(plan.boot.start))?;
    fat.write(plan.boot.end - plan.boot.start, &mut img).context("writing the boot FAT partition")?;
    disk::copy_sparse(&root.squashfs, &mut img, plan.root_a.start)?;
    disk::copy_sparse(&root.verity_path, &mut img, plan.root_a_verity.start)?;
    disk::copy_sparse(&data_path, &mut img, plan.data.start)?;
    img.flush()?;
    img.sync_all()?;
    tmp.persist(path).with_context(|| format!("renaming the card image into {}", path.display()))?;
    Ok(SdBuilt { size: plan.size, cmdline, partitions: plan.partitions })
}

/// The host file of the board's dtb, checked to exist.
pub(crate) fn dtb_file(board: &Board, dtbs: Option<&Path>) -> Result<Option<std::path::PathBuf>> {
    let Some(d) = &board.dtb else { return Ok(None) };
    let err = |message: String| ProfileError::Invalid { path: board.path.clone(), line: line_of_dtb(board), key: "dtb".into(), message };
    let Some(dir) = dtbs else {
        return Err(err(format!("the board needs {d}, but the kernel came without dtbs; build the kernel with `kiln kernel build` (it keeps every dtb) or give a kernel with its dtbs directory")).into());
    };
    let host = dir.join(d);
    if !host.is_file() {
        return Err(err(format!("{d} is not among the kernel's dtbs ({}): check the name against arch/arm/boot/dts/ and that the kernel config enables the board's SoC", dir.display())).into());
    }
    Ok(Some(host))
}

fn line_of_dtb(board: &Board) -> usize {
    let src = std::fs::read_to_string(&board.path).unwrap_or_default();
    kiln_contract::config::line_of_key(&src, "dtb").unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_formats::verity::Verity;
    use std::path::PathBuf;

    fn board(table: PartitionTable, dtb: Option<&str>) -> Board {
        Board {
            name: "b".into(),
            path: PathBuf::from("overlays/boards/b/board.toml"),
            description: None,
            partition_table: table,
            console: Some("ttyS0,115200".into()),
            cmdline: "quiet".into(),
            dtb: dtb.map(Into::into),
            bios: None,
            blobs: vec![],
            files: vec![],
            uboot: crate::inputs::board::UbootPlace::Card,
        }
    }

    fn root() -> RootImage {
        let v = Verity { data_blocks: 10, hash_blocks: 2, root_hash: std::array::from_fn(|i| i as u8), salt: vec![1; 32], uuid: [0; 16] };
        RootImage { squashfs: "r".into(), verity_path: "v".into(), verity: v, initrd: vec![], cmdline: "roothash=07 kiln.slot=a".into(), stats: Default::default(), squashfs_bytes: 40960 }
    }

    fn spec() -> SdSpec {
        SdSpec { profile: "p".into(), boot_mib: 64, root_slot: disk::RootSlot::Mib(32), data_mib: 16, epoch: 0 }
    }

    #[test]
    fn mbr_plan_four_primaries_verity_after_the_slot() {
        let p = plan(&board(PartitionTable::Mbr, None), &spec(), &root(), 32 * MIB).unwrap();
        let Table::Mbr(m) = &p.table else { panic!() };
        m.validate().unwrap();
        let kinds: Vec<(bool, u8, u32)> = m.partitions.iter().map(|e| (e.bootable, e.kind, e.first_lba)).collect();
        let root_sectors = ((32 * MIB + disk::verity_slot_bytes(32 * MIB)).div_ceil(MIB) * MIB / 512) as u32;
        assert_eq!(kinds, vec![(true, 0x0c, 2048), (false, 0x83, 2048 + 131072), (false, 0x83, 133120 + root_sectors), (false, 0x83, 133120 + 2 * root_sectors)]);
        assert_eq!(p.root_a_verity.start, p.root_a.start + 32 * MIB);
        assert_eq!(p.size, p.data.end);
        assert_eq!(p.cmdline, Some(format!("kiln.mbr={:08x},2,{}", m.disk_signature, 32 * MIB)));
        assert_ne!(m.disk_signature, 0);
        // Deterministic, and per profile.
        assert_eq!(plan(&board(PartitionTable::Mbr, None), &spec(), &root(), 32 * MIB).unwrap(), p);
        assert_ne!(disk_signature("p"), disk_signature("q"));
    }

    #[test]
    fn gpt_plan_is_the_disk_layout_with_a_bootable_boot_fat() {
        let p = plan(&board(PartitionTable::Gpt, None), &spec(), &root(), 32 * MIB).unwrap();
        let Table::Gpt(g) = &p.table else { panic!() };
        let names: Vec<&str> = g.partitions.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["esp", "root-a", "root-a-verity", "root-b", "root-b-verity", "data"]);
        assert_eq!(g.partitions[0].attributes, gpt::attributes::LEGACY_BIOS_BOOTABLE);
        assert_eq!(g.partitions[1].type_guid, gpt::types::ROOT_ARM);
        assert_eq!(g.partitions[1].uuid.to_bytes_rfc4122(), std::array::from_fn::<u8, 16, _>(|i| i as u8));
        assert_eq!(p.cmdline, None);
    }

    #[test]
    fn extlinux_entry() {
        let b = board(PartitionTable::Mbr, Some("am335x-boneblack.dtb"));
        let cmd = card_cmdline(&b, &root(), Some("kiln.mbr=1,2,3"));
        assert_eq!(cmd, "roothash=07 kiln.slot=a quiet console=ttyS0,115200 kiln.mbr=1,2,3");
        let c = extlinux_conf(&b.name, Slot::A, b.dtb.as_deref(), &cmd);
        assert!(c.contains("label kiln\n    kernel /kiln/a/zImage\n    fdt /kiln/a/dtbs/am335x-boneblack.dtb\n    initrd /kiln/a/initramfs.cpio.zst\n    append roothash=07"), "{c}");
        let c = extlinux_conf("t", Slot::B, None, "x");
        assert!(!c.contains("fdt"), "{c}");
    }

    #[test]
    fn missing_dtb_names_the_board_key() {
        let b = board(PartitionTable::Mbr, Some("x.dtb"));
        let d = tempfile::tempdir().unwrap();
        let e = dtb_file(&b, Some(d.path())).unwrap_err().to_string();
        assert!(e.contains("board.toml:1: key `dtb`") && e.contains("x.dtb is not among the kernel's dtbs"), "{e}");
        assert!(dtb_file(&b, None).unwrap_err().to_string().contains("without dtbs"));
        assert!(dtb_file(&board(PartitionTable::Mbr, None), None).unwrap().is_none());
    }
}
