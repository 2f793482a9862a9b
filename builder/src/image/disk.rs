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
use crate::progress::{Steps, Unit};
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const MIB: u64 = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub esp_mib: u64,
    pub root_slot: RootSlot,
    pub data_mib: u64,
    pub on_corruption: Option<OnCorruption>,
}

/// The size of each root slot (A and B): `disk.root_slot_mib`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootSlot {
    /// Sized from the root: [`AUTO_HEADROOM_PERCENT`] more than the
    /// squashfs, rounded up to [`AUTO_ROUND_MIB`], at least [`AUTO_MIN_MIB`].
    Auto,
    Mib(u64),
}

/// How much bigger than the root an `auto` slot is: room for the updates
/// the slot must take later (a k0s minor release grows by a few percent;
/// an appliance adds images).
pub const AUTO_HEADROOM_PERCENT: u64 = 50;
pub const AUTO_ROUND_MIB: u64 = 64;
pub const AUTO_MIN_MIB: u64 = 128;

impl RootSlot {
    /// The slot, in MiB, for a root of `root_bytes`; an explicit size that
    /// cannot hold it is an error naming what it needs.
    pub fn mib_for(self, root_bytes: u64) -> Result<u64> {
        let root_mib = root_bytes.div_ceil(MIB);
        let auto = (root_mib * (100 + AUTO_HEADROOM_PERCENT)).div_ceil(100).div_ceil(AUTO_ROUND_MIB).max(1) * AUTO_ROUND_MIB;
        let auto = auto.max(AUTO_MIN_MIB);
        match self {
            RootSlot::Auto => Ok(auto),
            RootSlot::Mib(m) if m * MIB >= root_bytes => Ok(m),
            RootSlot::Mib(m) => bail!(
                "the root filesystem is {root_mib} MiB but a root slot is {m} MiB (`disk.root_slot_mib` in the profile): set it to at least {root_mib}, or to {auto} for room to grow by {AUTO_HEADROOM_PERCENT} %, or to \"auto\""
            ),
        }
    }
}

/// What the verified root is built from.
pub struct RootInputs<'a> {
    pub root: &'a Tree,
    pub stage1: &'a Tree,
    pub cmdline: &'a str,
    pub epoch: u64,
    /// Packed large files from earlier builds (the kiln cache's).
    pub store: Option<&'a dyn squashfs::Store>,
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
    pub stats: squashfs::Stats,
}

/// Builds the squashfs and its hash tree into `work`, and the stage-1
/// initramfs.
pub fn build_root(work: &Path, spec: &DiskSpec, i: &RootInputs, steps: &Steps) -> Result<RootImage> {
    let sqfs = work.join("root.squashfs");
    let stats = {
        let step = steps.start("squashfs", Unit::Bytes);
        step.counter.set_total(squashfs::data_bytes(i.root));
        let mut f = std::io::BufWriter::new(File::create(&sqfs)?);
        let opts = squashfs::Options { mtime: u32::try_from(i.epoch).unwrap_or(u32::MAX), ..Default::default() };
        let extras = squashfs::Extras { progress: Some(&step.counter.done), store: i.store };
        let stats = squashfs::write_with(i.root, &opts, &mut f, extras).context("writing the root squashfs")?;
        f.flush()?;
        stats
    };
    let verity_path = work.join("root.verity");
    // The hash tree and the stage-1 initramfs (zstd 19 of kiln-init and
    // modules) side by side: each keeps one core busy.
    let (v, initrd) = std::thread::scope(|s| {
        let (stage1, epoch) = (i.stage1, i.epoch);
        let initrd = s.spawn(move || {
            let mut initrd = Vec::new();
            steps.run("stage-1 initramfs", Unit::Bytes, |_| cpio::write(stage1, epoch, &mut initrd)).map(|()| initrd)
        });
        let v = steps.run("verity", Unit::Bytes, |_| verity::format_file(&sqfs, &verity_path));
        (v, initrd.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
    });
    let v = v.context("computing the dm-verity tree")?;
    let initrd = initrd.context("writing the stage-1 initramfs")?;
    let squashfs_bytes = v.data_len();
    let mut cmdline = format!("{} roothash={} kiln.slot=a", i.cmdline, v.root_hex());
    if let Some(c) = spec.on_corruption {
        cmdline.push_str(match c {
            OnCorruption::Panic => " kiln.verity=panic",
            OnCorruption::Restart => " kiln.verity=restart",
        });
    }
    Ok(RootImage { squashfs: sqfs, verity_path, verity: v, initrd, cmdline: cmdline.trim().to_string(), squashfs_bytes, stats })
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
pub fn write(disk_path: &Path, work: &Path, spec: &DiskSpec, root: &RootImage, b: &BootInputs, steps: &Steps) -> Result<DiskBuilt> {
    let slot = root_slot_bytes(root, spec.root_slot)?;

    let uki_path = work.join("kiln.efi");
    steps.run("uki", Unit::Bytes, |_| write_uki(root, b, &root.cmdline, &uki_path))?;
    let _step = steps.start("disk", Unit::Bytes);
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
pub fn root_slot_bytes(root: &RootImage, slot: RootSlot) -> Result<u64> {
    Ok(slot.mib_for(root.squashfs_bytes)? * MIB)
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
    let mut cur: Option<(u64, u64, Sha256)> = None;
    // Only the file's data extents are read: the holes (most of a fresh
    // disk's root slots) are zeros, and unmapped.
    for (start, end) in data_extents(&f, size)? {
        f.seek(SeekFrom::Start(start))?;
        for b in start / BS..end.div_ceil(BS) {
            let n = read_full(&mut f, &mut buf)?;
            let mapped = buf[..n].iter().any(|x| *x != 0);
            match (mapped, cur.as_mut()) {
                (true, Some((_, last, h))) if *last + 1 == b => {
                    h.update(&buf[..n]);
                    *last = b;
                }
                (true, _) => {
                    if let Some((first, last, h)) = cur.take() {
                        ranges.push((first, last, hex::encode(h.finalize())));
                    }
                    let mut h = Sha256::new();
                    h.update(&buf[..n]);
                    cur = Some((b, b, h));
                }
                (false, _) => {
                    if let Some((first, last, h)) = cur.take() {
                        ranges.push((first, last, hex::encode(h.finalize())));
                    }
                }
            }
        }
    }
    if let Some((first, last, h)) = cur.take() {
        ranges.push((first, last, hex::encode(h.finalize())));
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

/// The byte ranges of `f` that hold data (SEEK_DATA / SEEK_HOLE), 4 KiB
/// aligned; the whole file where the filesystem cannot say.
fn data_extents(f: &File, size: u64) -> Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut at = 0i64;
    let size = i64::try_from(size).unwrap_or(i64::MAX);
    while at < size {
        // SAFETY: lseek on an open descriptor has no memory effects.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `at`
            }
            return Ok(vec![(0, size as u64)]);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { size } else { hole.min(size) };
        let start = (data as u64) / 4096 * 4096;
        match out.last_mut() {
            Some((_, end)) if *end >= start => *end = hole as u64,
            _ => out.push((start, hole as u64)),
        }
        at = hole;
    }
    Ok(out)
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
