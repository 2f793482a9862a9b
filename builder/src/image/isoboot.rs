//! The ISO output (`<name>.iso`): what goes on the medium. The ISO 9660 /
//! El Torito / isohybrid encoding itself is [`kiln_formats::iso`].
//!
//! - `/BOOT/EFI.IMG`: a FAT with systemd-boot and a UKI, the El Torito UEFI
//!   entry and, through the hybrid GPT, the ESP of a USB stick.
//! - `/ISOLINUX/…`, `/BOOT/VMLINUZ`, `/BOOT/INITRD.ZST` (amd64 with BIOS
//!   inputs): isolinux boots the same kernel, stage-1 initramfs and cmdline.
//! - `/KILN/ROOT.SQFS`, `/KILN/ROOT.VRT`: the verified root and its hash
//!   tree, as GPT partitions with the root hash's PARTUUIDs, so stage 1 finds
//!   them on a stick (kernel partitions) and on a CD (it maps the GPT entries
//!   itself).
//! - `/KILN/INSTALL.IMG`: everything else of `disk.raw` (GPT, ESP, data), for
//!   the installer (`kiln.install=` / `install.disk`).

use crate::image::disk::{self, BootInputs, DiskBuilt, RootImage};
use kiln_formats::gpt::{self, deterministic_guid, Guid};
use kiln_formats::iso::{self, BiosBoot, Content, HybridPartition, IsoFile, IsoSpec};
use anyhow::{Context, Result};
use std::path::Path;

const MIB: u64 = 1024 * 1024;

/// isolinux's config: boot the kernel at once, console on serial too.
fn isolinux_cfg(cmdline: &str) -> String {
    format!(
        "SERIAL 0 115200\nDEFAULT kiln\nPROMPT 0\nTIMEOUT 0\nLABEL kiln\n  KERNEL /BOOT/VMLINUZ\n  INITRD /BOOT/INITRD.ZST\n  APPEND {cmdline}\n"
    )
}

/// Volume ids are d-characters: A–Z, 0–9 and _.
fn volume_id(profile: &str) -> String {
    let v: String = format!("KILN_{profile}").to_ascii_uppercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    v.chars().take(32).collect()
}

/// Writes the ISO to `out` (through a temp file renamed when complete).
#[allow(clippy::too_many_arguments)]
pub fn write(out: &Path, work: &Path, root: &RootImage, b: &BootInputs, disk_raw: &Path, built: &DiskBuilt, root_in_ram: bool, bios: Option<(&Path, &Path, &Path)>) -> Result<()> {
    let g = |what: &str| deterministic_guid(&format!("kiln/{}", b.profile), what);

    // The installer's image: disk.raw without the root it can read from
    // this medium.
    let install = work.join("install.img");
    let summary = crate::image::install::write(disk_raw, (built.root_a.0, built.root_a.1), &root.squashfs, (built.root_a_verity.0, built.root_a_verity.1), &root.verity_path, &install).context("writing the install image")?;

    // The ISO's cmdline pins the install image: the installer refuses any
    // other, so what it writes is covered by the boot chain.
    let mut cmdline = format!("{} kiln.install_sha256={}", root.cmdline, hex::encode(summary.header_sha256));
    if root_in_ram {
        cmdline.push_str(" kiln.root=ram");
    }

    // The ESP image: systemd-boot and a UKI without a boot counter (a CD
    // cannot count).
    let uki = work.join("iso-uki.efi");
    disk::write_uki(root, b, &cmdline, &uki)?;
    let mut fat = disk::esp_fat("KILN-ISO", &g("iso-esp-volume"), b)?;
    fat.add_file(&format!("/EFI/Linux/kiln-{}.efi", b.profile), kiln_formats::fat::FileContent::Host(uki.clone()))?;
    let esp = work.join("efi.img");
    {
        let size = (fat.min_size() + MIB).div_ceil(MIB) * MIB;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&esp)?);
        fat.write(size, &mut f).context("writing the ISO's ESP image")?;
        std::io::Write::flush(&mut f)?;
    }

    let host = |p: &Path| Content::Host(p.to_path_buf());
    let mut files = vec![
        IsoFile { path: "/BOOT/EFI.IMG".into(), content: host(&esp) },
        IsoFile { path: "/KILN/ROOT.SQFS".into(), content: host(&root.squashfs) },
        IsoFile { path: "/KILN/ROOT.VRT".into(), content: host(&root.verity_path) },
        IsoFile { path: "/KILN/INSTALL.IMG".into(), content: host(&install) },
    ];
    let bios = match bios {
        None => None,
        Some((isolinux, mbr, ldlinux)) => {
            files.push(IsoFile { path: "/ISOLINUX/ISOLINUX.BIN".into(), content: host(isolinux) });
            files.push(IsoFile { path: "/ISOLINUX/LDLINUX.C32".into(), content: host(ldlinux) });
            files.push(IsoFile { path: "/ISOLINUX/ISOLINUX.CFG".into(), content: Content::Bytes(isolinux_cfg(&cmdline).into_bytes()) });
            files.push(IsoFile { path: "/BOOT/VMLINUZ".into(), content: host(b.kernel) });
            files.push(IsoFile { path: "/BOOT/INITRD.ZST".into(), content: Content::Bytes(root.initrd.clone()) });
            let code = std::fs::read(mbr).with_context(|| format!("reading the isohybrid MBR {}", mbr.display()))?;
            Some(BiosBoot { isolinux_path: "/ISOLINUX/ISOLINUX.BIN".into(), mbr_code: code })
        }
    };
    let (root_t, verity_t) = disk::root_types(b.arch);
    let v = &root.verity;
    let partitions = vec![
        HybridPartition { name: "esp".into(), type_guid: gpt::types::ESP, uuid: g("iso-esp"), file: "/BOOT/EFI.IMG".into() },
        HybridPartition { name: "root-a".into(), type_guid: root_t, uuid: Guid::from_bytes_rfc4122(v.data_partition_uuid().0), file: "/KILN/ROOT.SQFS".into() },
        HybridPartition { name: "root-a-verity".into(), type_guid: verity_t, uuid: Guid::from_bytes_rfc4122(v.hash_partition_uuid().0), file: "/KILN/ROOT.VRT".into() },
        HybridPartition { name: kiln_contract::layout::INSTALL_PART.into(), type_guid: gpt::types::LINUX_DATA, uuid: g("iso-install"), file: "/KILN/INSTALL.IMG".into() },
    ];
    let spec = IsoSpec { volume_id: volume_id(b.profile), epoch: b.epoch, files, efi_image: Some("/BOOT/EFI.IMG".into()), bios, partitions, disk_guid: g("iso-disk") };
    let tmp = out.with_extension("iso.part");
    iso::write(&spec, &tmp)?;
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    std::fs::rename(&tmp, out)?;
    Ok(())
}
