//! The disk image (`disk.raw`): GPT with an ESP (systemd-boot and a UKI
//! carrying the root hash), root-a and its verity tree, empty B slots, and a
//! small ext4 data partition that the node grows at first boot.
//!
//! Everything is written into a sparse file at its partition offset: no
//! root, no loop devices, no mount.

use kiln_contract::stream::read_full;
use kiln_formats::fat::{FatBuilder, FileContent};
use kiln_formats::gpt::{self, deterministic_guid, Guid, Layout, PartSize};
use crate::arch::Arch;
use kiln_formats::tree::Tree;
use kiln_formats::verity::{self, OnCorruption, Verity};
use kiln_formats::{cpio, squashfs, uki};
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const MIB: u64 = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub esp_mib: u64,
    pub root_slot_mib: u64,
    pub data_mib: u64,
    pub on_corruption: Option<OnCorruption>,
}

/// What the verified root is built from.
pub struct RootInputs<'a> {
    pub root: &'a Tree,
    pub stage1: &'a Tree,
    pub cmdline: &'a str,
    pub epoch: u64,
}

/// The verified root every format shares: the squashfs, its dm-verity tree,
/// the stage-1 initramfs, and the cmdline carrying the root hash.
pub struct RootImage {
    pub squashfs: PathBuf,
    pub verity_path: PathBuf,
    pub verity: Verity,
    pub initrd: Vec<u8>,
    /// The profile's cmdline plus `roothash=… kiln.slot=a [kiln.verity=…]`.
    pub cmdline: String,
    pub squashfs_bytes: u64,
}

/// Builds the squashfs and its hash tree into `work`, and the stage-1
/// initramfs.
pub fn build_root(work: &Path, spec: &DiskSpec, i: &RootInputs) -> Result<RootImage> {
    let sqfs = work.join("root.squashfs");
    {
        let mut f = std::io::BufWriter::new(File::create(&sqfs)?);
        let opts = squashfs::Options { mtime: u32::try_from(i.epoch).unwrap_or(u32::MAX), ..Default::default() };
        squashfs::write(i.root, &opts, &mut f).context("writing the root squashfs")?;
        f.flush()?;
    }
    let verity_path = work.join("root.verity");
    let v = verity::format_file(&sqfs, &verity_path).context("computing the dm-verity tree")?;
    let squashfs_bytes = v.data_len();
    let mut initrd = Vec::new();
    cpio::write(i.stage1, i.epoch, &mut initrd).context("writing the stage-1 initramfs")?;
    let mut cmdline = format!("{} roothash={} kiln.slot=a", i.cmdline, v.root_hex());
    if let Some(c) = spec.on_corruption {
        cmdline.push_str(match c {
            OnCorruption::Panic => " kiln.verity=panic",
            OnCorruption::Restart => " kiln.verity=restart",
        });
    }
    Ok(RootImage { squashfs: sqfs, verity_path, verity: v, initrd, cmdline: cmdline.trim().to_string(), squashfs_bytes })
}

/// What a UKI is assembled from, besides the root.
pub struct BootInputs<'a> {
    pub arch: Arch,
    pub profile: &'a str,
    pub kernel: &'a Path,
    pub kernel_release: &'a str,
    pub systemd_boot: &'a Path,
    pub stub: &'a Path,
    pub os_release: &'a str,
    pub epoch: u64,
    /// Signs each UKI after assembly (`systemd_boot` is then the signed
    /// copy) and adds the enrolment files to the ESP.
    pub secureboot: Option<&'a crate::image::secureboot::Signer>,
}

/// Assembles a UKI (stub + kernel + stage-1 initramfs + `cmdline`) at `out`.
pub fn write_uki(root: &RootImage, b: &BootInputs, cmdline: &str, out: &Path) -> Result<()> {
    let stub = std::fs::read(b.stub).with_context(|| format!("reading the systemd stub {}", b.stub.display()))?;
    let linux = std::fs::read(b.kernel)?;
    let parts = uki::UkiParts { stub: &stub, linux: &linux, initrd: &root.initrd, cmdline, osrel: b.os_release, uname: Some(b.kernel_release), dtb: None };
    let mut f = std::io::BufWriter::new(File::create(out)?);
    uki::assemble(&parts, &mut f).context("assembling the UKI")?;
    f.flush()?;
    drop(f);
    if let Some(s) = b.secureboot {
        s.sign_in_place(out)?;
    }
    Ok(())
}

pub struct DiskBuilt {
    pub uki_name: String,
    /// The UKI, in the work directory.
    pub uki_path: PathBuf,
    /// Byte ranges (offset, length) of root-a and root-a-verity in disk.raw.
    pub root_a: (u64, u64),
    pub root_a_verity: (u64, u64),
}

/// The comment a technician sees when opening node.toml on the ESP.
pub const NODE_TOML_TEMPLATE: &str = "\
# kiln node config.
#
# Put this node's settings here, from any computer that can read this FAT
# partition. Lines starting with # are ignored; a file with only comments
# means: use the default config built into the image.
#
# Example, a worker joining a cluster:
#
#   role = \"worker\"
#   hostname = { from = \"mac\", prefix = \"worker-\" }
#
#   [k0s]
#   token = \"<output of: k0s token create --role worker>\"
#
# Every key is described in docs/node-config.md. Check a file before you copy
# it here with: kiln config check node.toml
";

fn boot_file(arch: Arch) -> &'static str {
    match arch {
        Arch::Amd64 => "BOOTX64.EFI",
        Arch::Arm64 => "BOOTAA64.EFI",
        Arch::Armv7 => "BOOTARM.EFI",
    }
}

pub fn root_types(arch: Arch) -> (Guid, Guid) {
    match arch {
        Arch::Amd64 => (gpt::types::ROOT_X86_64, gpt::types::ROOT_VERITY_X86_64),
        Arch::Arm64 => (gpt::types::ROOT_ARM64, gpt::types::ROOT_VERITY_ARM64),
        Arch::Armv7 => (gpt::types::ROOT_ARM, gpt::types::ROOT_VERITY_ARM),
    }
}

/// Builds `disk.raw` at `disk_path` from the root, with scratch files in
/// `work`.
pub fn write(disk_path: &Path, work: &Path, spec: &DiskSpec, root: &RootImage, b: &BootInputs) -> Result<DiskBuilt> {
    let slot = root_slot_bytes(root, spec.root_slot_mib)?;

    let uki_path = work.join("kiln.efi");
    write_uki(root, b, &root.cmdline, &uki_path)?;
    // Boot counting (BLS type #2): three tries before systemd-boot prefers
    // another entry.
    let uki_name = format!("kiln-{}-a+3.efi", b.profile);

    // Data: a small ext4 the node grows at first boot.
    let data_path = work.join("data.ext4");
    make_ext4(&data_path, spec.data_mib * MIB, b.profile, b.epoch)?;

    // Partition table.
    let g = |what: &str| guid(b.profile, what);
    let table = gpt_table(b.profile, b.arch, &root.verity, spec.esp_mib * MIB, 0, slot, spec.data_mib * MIB)?;
    let size = table.size_bytes;

    let mut disk = File::options().read(true).write(true).create(true).truncate(true).open(disk_path)?;
    disk.set_len(size)?;
    table.write(&mut disk).context("writing the GPT")?;
    let part = |name: &str| gpt_part(&table, name);

    let esp = part("esp")?;
    let mut fat = esp_fat("KILN-ESP", &g("esp-volume"), b)?;
    fat.set_hidden_sectors(u32::try_from(esp.first_lba).unwrap_or(0));
    fat.add_file(&format!("/EFI/Linux/{uki_name}"), FileContent::Host(uki_path.clone()))?;
    disk.seek(SeekFrom::Start(esp.offset_bytes()))?;
    fat.write(esp.size_bytes(), &mut disk).context("writing the ESP")?;

    let (ra, rv) = (part("root-a")?, part("root-a-verity")?);
    copy_sparse(&root.squashfs, &mut disk, ra.offset_bytes())?;
    copy_sparse(&root.verity_path, &mut disk, rv.offset_bytes())?;
    copy_sparse(&data_path, &mut disk, part("data")?.offset_bytes())?;
    disk.sync_all()?;
    Ok(DiskBuilt { uki_name, uki_path, root_a: (ra.offset_bytes(), ra.size_bytes()), root_a_verity: (rv.offset_bytes(), rv.size_bytes()) })
}

/// Bytes of a root slot, checked to hold the root's squashfs.
pub fn root_slot_bytes(root: &RootImage, root_slot_mib: u64) -> Result<u64> {
    let slot = root_slot_mib * MIB;
    if root.squashfs_bytes > slot {
        bail!(
            "the root filesystem is {} MiB but a root slot is {} MiB; raise `disk.root_slot_mib` in the profile",
            root.squashfs_bytes.div_ceil(MIB),
            root_slot_mib
        );
    }
    Ok(slot)
}

/// Bytes of the verity tree (superblock included) for a full root slot.
pub fn verity_slot_bytes(slot: u64) -> u64 {
    verity::hash_blocks(slot / verity::BLOCK) * verity::BLOCK
}

/// A GUID (or MBR disk signature, volume id) derived from the profile name.
pub fn guid(profile: &str, what: &str) -> Guid {
    deterministic_guid(&format!("kiln/{profile}"), what)
}

/// The GPT every disk image shares: esp (the ESP, or an armv7 board's boot
/// FAT, with `esp_attributes`), root-a and root-a-verity found by the root
/// hash, empty B slots, and data, which the node grows.
pub fn gpt_table(profile: &str, arch: Arch, v: &Verity, esp_bytes: u64, esp_attributes: u64, slot: u64, data_bytes: u64) -> Result<gpt::Gpt> {
    let verity_slot = verity_slot_bytes(slot);
    let (root_t, verity_t) = root_types(arch);
    let g = |what: &str| guid(profile, what);
    let mut layout = Layout::new(g("disk"));
    layout
        .add("esp", gpt::types::ESP, g("esp"), PartSize::Bytes(esp_bytes), esp_attributes)
        .add("root-a", root_t, Guid::from_bytes_rfc4122(v.data_partition_uuid().0), PartSize::Bytes(slot), 0)
        .add("root-a-verity", verity_t, Guid::from_bytes_rfc4122(v.hash_partition_uuid().0), PartSize::Bytes(verity_slot), 0)
        .add("root-b", root_t, g("root-b"), PartSize::Bytes(slot), 0)
        .add("root-b-verity", verity_t, g("root-b-verity"), PartSize::Bytes(verity_slot), 0)
        .add("data", gpt::types::LINUX_DATA, g("data"), PartSize::Bytes(data_bytes), gpt::attributes::GROWFS);
    layout.build(layout.min_disk_size()).context("laying out the partitions")
}

/// The partition called `name`.
pub fn gpt_part(table: &gpt::Gpt, name: &str) -> Result<gpt::Partition> {
    table.partitions.iter().find(|p| p.name == name).cloned().ok_or_else(|| anyhow::anyhow!("partition {name} missing"))
}

/// An ESP's FAT with systemd-boot, loader.conf and the node.toml template;
/// the caller adds the UKI.
pub fn esp_fat(label: &str, volume: &Guid, b: &BootInputs) -> Result<FatBuilder> {
    let mut fat = FatBuilder::new(label, u32::from_le_bytes(volume.0[..4].try_into().unwrap_or([0; 4])));
    fat.set_timestamp(b.epoch);
    fat.add_file(&format!("/EFI/BOOT/{}", boot_file(b.arch)), FileContent::Host(b.systemd_boot.to_path_buf()))?;
    fat.add_file(&format!("/EFI/systemd/{}", boot_file(b.arch).replace("BOOT", "systemd-boot").to_lowercase()), FileContent::Host(b.systemd_boot.to_path_buf()))?;
    let enroll = b.secureboot.map(|s| s.loader_conf()).unwrap_or_default();
    fat.add_file("/loader/loader.conf", FileContent::Bytes(format!("timeout 0\neditor no\n{enroll}").into_bytes()))?;
    if let Some(s) = b.secureboot {
        s.add_enroll_files(&mut fat)?;
    }
    fat.add_file("/node.toml", FileContent::Bytes(NODE_TOML_TEMPLATE.as_bytes().to_vec()))?;
    Ok(fat)
}

/// Copies `src` into `dst` at `offset`, skipping all-zero blocks so the
/// image stays sparse.
pub fn copy_sparse(src: &Path, dst: &mut File, offset: u64) -> Result<()> {
    let mut f = File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = offset;
    loop {
        let n = read_full(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        for chunk in buf[..n].chunks(4096) {
            if chunk.iter().any(|b| *b != 0) {
                dst.seek(SeekFrom::Start(at))?;
                dst.write_all(chunk)?;
            }
            at += chunk.len() as u64;
        }
    }
    Ok(())
}


/// An empty ext4 made reproducible: fixed UUID, hash seed and time.
pub fn make_ext4(path: &Path, size: u64, profile: &str, epoch: u64) -> Result<()> {
    mkfs_ext4(path, size, "kiln-data", "data", &[], profile, epoch)
}

/// Size of the /var template.
pub const VAR_TEMPLATE_BYTES: u64 = 32 * MIB;

/// The empty ext4 that kiln-init writes to a blank `storage.var_disk` and
/// grows online. A fixed inode count keeps the default 16 KiB per inode once
/// grown (mkfs would size it for 32 MiB), and the journal is larger than
/// mkfs picks for so small a filesystem; neither grows with it.
pub fn make_var_template(path: &Path, profile: &str, epoch: u64) -> Result<()> {
    mkfs_ext4(path, VAR_TEMPLATE_BYTES, "kiln-var", "var", &["-N", "8192", "-J", "size=8"], profile, epoch)
}

/// mkfs.ext4 with a label, and a UUID and hash seed derived from the
/// profile and `tag`.
fn mkfs_ext4(path: &Path, size: u64, label: &str, tag: &str, extra: &[&str], profile: &str, epoch: u64) -> Result<()> {
    let f = File::create(path)?;
    f.set_len(size)?;
    drop(f);
    let uuid = deterministic_guid(&format!("kiln/{profile}"), &format!("{tag}-fs"));
    let seed = deterministic_guid(&format!("kiln/{profile}"), &format!("{tag}-hash-seed"));
    let mkfs = ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"].into_iter().find(|p| Path::new(p).exists()).unwrap_or("mkfs.ext4");
    let out = Command::new(mkfs)
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-T", "default", "-m", "1", "-L", label])
        .args(extra)
        .arg("-U")
        .arg(uuid.to_string())
        .arg("-E")
        .arg(format!("hash_seed={seed},root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0,nodiscard"))
        .arg(path)
        .env("E2FSPROGS_FAKE_TIME", epoch.max(1).to_string())
        .env("MKE2FS_DEVICE_SECTSIZE", "512")
        .output()
        .context("running mkfs.ext4 (apt-get install e2fsprogs)")?;
    if !out.status.success() {
        bail!("mkfs.ext4 for {label} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// `disk.qcow2`, converted with qemu-img.
pub fn write_qcow2(out_dir: &Path) -> Result<()> {
    let out = Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(out_dir.join("disk.raw"))
        .arg(out_dir.join("disk.qcow2"))
        .output()
        .context("running qemu-img (apt-get install qemu-utils)")?;
    if !out.status.success() {
        bail!("qemu-img convert failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// `disk.raw.zst`, for flashing with `zstdcat disk.raw.zst | dd …`.
pub fn write_zst(out_dir: &Path) -> Result<()> {
    let mut src = File::open(out_dir.join("disk.raw"))?;
    let dst = File::create(out_dir.join("disk.raw.zst"))?;
    let mut enc = zstd::stream::write::Encoder::new(std::io::BufWriter::new(dst), 10)?;
    enc.include_checksum(true)?;
    std::io::copy(&mut src, &mut enc)?;
    enc.finish()?.flush()?;
    Ok(())
}

/// `disk.bmap` in bmaptool's format 2.0: the 4 KiB blocks that hold data,
/// with a sha256 per range, so `bmaptool copy` writes only those.
pub fn write_bmap(out_dir: &Path) -> Result<()> {
    use sha2::{Digest, Sha256};
    const BS: u64 = 4096;
    let path = out_dir.join("disk.raw");
    let mut f = File::open(&path)?;
    let size = f.metadata()?.len();
    let blocks = size.div_ceil(BS);
    let mut ranges: Vec<(u64, u64, String)> = Vec::new();
    let mut buf = vec![0u8; BS as usize];
    let mut cur: Option<(u64, Sha256)> = None;
    for b in 0..blocks {
        let n = read_full(&mut f, &mut buf)?;
        let mapped = buf[..n].iter().any(|x| *x != 0);
        match (mapped, cur.as_mut()) {
            (true, Some((_, h))) => h.update(&buf[..n]),
            (true, None) => {
                let mut h = Sha256::new();
                h.update(&buf[..n]);
                cur = Some((b, h));
            }
            (false, _) => {
                if let Some((start, h)) = cur.take() {
                    ranges.push((start, b - 1, hex::encode(h.finalize())));
                }
            }
        }
    }
    if let Some((start, h)) = cur.take() {
        ranges.push((start, blocks - 1, hex::encode(h.finalize())));
    }
    let mapped: u64 = ranges.iter().map(|(a, b, _)| b - a + 1).sum();
    let render = |file_sum: &str| {
        let mut s = format!(
            "<?xml version=\"1.0\" ?>\n<bmap version=\"2.0\">\n    <ImageSize> {size} </ImageSize>\n    <BlockSize> {BS} </BlockSize>\n    <BlocksCount> {blocks} </BlocksCount>\n    <MappedBlocksCount> {mapped} </MappedBlocksCount>\n    <ChecksumType> sha256 </ChecksumType>\n    <BmapFileChecksum> {file_sum} </BmapFileChecksum>\n    <BlockMap>\n"
        );
        for (a, b, sum) in &ranges {
            if a == b {
                s.push_str(&format!("        <Range chksum=\"{sum}\"> {a} </Range>\n"));
            } else {
                s.push_str(&format!("        <Range chksum=\"{sum}\"> {a}-{b} </Range>\n"));
            }
        }
        s.push_str("    </BlockMap>\n</bmap>\n");
        s
    };
    // The file's own checksum is taken with that field set to zeros.
    let zeros = "0".repeat(64);
    let sum = hex::encode(Sha256::digest(render(&zeros).as_bytes()));
    std::fs::write(out_dir.join("disk.bmap"), render(&sum))?;
    Ok(())
}

/// A kernel's `lib/modules` (and `lib/firmware`, when there is any) under
/// `dir`, and `/sbin/modprobe` as kiln-init: the kernel runs it for
/// `request_module` (a filesystem or crypto module asked for by name).
pub fn add_modules(t: &mut Tree, dir: &Path) -> Result<()> {
    t.add_host_dir(&dir.join("lib/modules"), "/lib/modules")?;
    if dir.join("lib/firmware").is_dir() {
        t.add_host_dir(&dir.join("lib/firmware"), "/lib/firmware")?;
    }
    t.symlink("/sbin/modprobe", "kiln-init")?;
    Ok(())
}

/// The tree for the stage-1 initramfs of a disk image: kiln-init alone.
pub fn stage1_tree(init_bin: &Path, modules: &Path) -> Result<Tree> {
    let mut t = Tree::new();
    for d in ["/proc", "/sys", "/dev", "/run", "/sysroot", "/tmp"] {
        t.mkdir_p(d, 0o755)?;
    }
    t.insert("/dev/console", kiln_formats::tree::Kind::CharDev(5, 1), 0o600)?;
    t.host_file("/sbin/kiln-init", init_bin.to_path_buf(), 0o755)?;
    t.symlink("/init", "sbin/kiln-init")?;
    add_modules(&mut t, modules)?;
    Ok(t)
}

pub fn scratch_dir(out: &Path) -> PathBuf {
    out.join(".work")
}
