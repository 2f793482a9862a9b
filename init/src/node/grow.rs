//! First-boot growth of the data partition: the image ships a small `data`
//! partition at the end of the disk; on a larger disk the GPT is rewritten so
//! that it ends at the last usable block, the kernel is told (BLKPG), and the
//! mounted ext4 is grown online (EXT4_IOC_RESIZE_FS).
//!
//! [`Plan`] and [`Plan::writes`] are pure; only [`apply`] and the ioctls
//! touch a device. Writes cover the protective MBR entry and the GPT header
//! and entry areas, nothing else. The backup copy is written first, so an
//! interrupted rewrite leaves a table the kernel can still read.

use super::gpt::{self, Gpt};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

#[derive(Debug, thiserror::Error)]
pub enum GrowError {
    #[error("no partition named {0:?} in the GPT")]
    NoPartition(String),
    #[error("partition {name:?} ends at block {last}, but partition {other} ({other_name:?}) follows it; only the last partition can grow")]
    NotLast { name: String, last: u64, other: u32, other_name: String },
    #[error("the disk ({blocks} blocks) is too small for its own GPT")]
    TooSmall { blocks: u64 },
    #[error("partition {name:?} starts at block {first}, past its end at block {last}; the GPT is damaged")]
    Backwards { name: String, first: u64, last: u64 },
    #[error("{op}: {source}")]
    Io { op: String, source: std::io::Error },
}

/// What growing changes: the disk's new geometry and the partition's new end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub number: u32,
    pub first_lba: u64,
    pub old_last: u64,
    pub new_last: u64,
    pub disk_lbas: u64,
    pub lba_size: u64,
}

impl Plan {
    /// Growth for partition `name` on a disk of `disk_lbas` blocks, or None
    /// when it already ends at the last usable block.
    pub fn new(gpt: &Gpt, name: &str, disk_lbas: u64) -> Result<Option<Plan>, GrowError> {
        let parts = gpt.partitions();
        let p = parts.iter().find(|p| p.name.eq_ignore_ascii_case(name)).ok_or_else(|| GrowError::NoPartition(name.into()))?;
        let entry_lbas = gpt.entry_lbas();
        let last_usable = disk_lbas.checked_sub(2 + entry_lbas).ok_or(GrowError::TooSmall { blocks: disk_lbas })?;
        if last_usable <= gpt.header.first_usable {
            return Err(GrowError::TooSmall { blocks: disk_lbas });
        }
        if let Some(o) = parts.iter().find(|o| o.number != p.number && o.last_lba > p.last_lba) {
            return Err(GrowError::NotLast { name: p.name.clone(), last: p.last_lba, other: o.number, other_name: o.name.clone() });
        }
        if p.last_lba >= last_usable {
            return Ok(None);
        }
        // Then first <= old_last < new_last < disk_lbas: the sizes and byte
        // offsets below cannot overflow.
        if p.first_lba > p.last_lba {
            return Err(GrowError::Backwards { name: p.name.clone(), first: p.first_lba, last: p.last_lba });
        }
        Ok(Some(Plan { number: p.number, first_lba: p.first_lba, old_last: p.last_lba, new_last: last_usable, disk_lbas, lba_size: gpt.lba_size }))
    }

    pub fn old_bytes(&self) -> u64 {
        (self.old_last + 1 - self.first_lba) * self.lba_size
    }

    pub fn new_bytes(&self) -> u64 {
        (self.new_last + 1 - self.first_lba) * self.lba_size
    }

    /// The (byte offset, bytes) writes that apply the plan, in the order
    /// they must happen: backup entries and header, then primary entries and
    /// header, then the protective MBR's size.
    pub fn writes(&self, gpt: &Gpt, mbr: Option<&[u8]>) -> Vec<(u64, Vec<u8>)> {
        let lba = self.lba_size;
        let size = gpt.header.entry_size as usize;
        let mut entries = gpt.entries.clone();
        let off = (self.number as usize - 1) * size;
        entries[off + 40..off + 48].copy_from_slice(&self.new_last.to_le_bytes());
        let crc = gpt::crc32(&entries);
        let last = self.disk_lbas - 1;
        let backup_entries = last - gpt.entry_lbas();
        let h = &gpt.header;
        // A header read from the backup has the backup's own LBAs; the
        // primary always lives at LBA 1 with its entries at LBA 2.
        let primary_entries = if gpt.from_backup { 2 } else { h.entries_lba };
        let mut out = vec![
            (backup_entries * lba, entries.clone()),
            (last * lba, h.encode(last, 1, self.new_last, backup_entries, crc)),
            (primary_entries * lba, entries),
            (lba, h.encode(1, last, self.new_last, primary_entries, crc)),
        ];
        if let Some(m) = mbr.and_then(|m| protective_mbr_entry(m, self.disk_lbas)) {
            out.push(m);
        }
        out
    }
}

/// The rewritten 0xEE entry of a protective MBR covering the grown disk, if
/// sector 0 is one.
fn protective_mbr_entry(sector0: &[u8], disk_lbas: u64) -> Option<(u64, Vec<u8>)> {
    if sector0.len() < 512 || sector0[510..512] != [0x55, 0xAA] {
        return None;
    }
    let i = (0..4).find(|i| sector0[446 + 16 * i + 4] == 0xEE)?;
    let at = 446 + 16 * i;
    let mut e = sector0[at..at + 16].to_vec();
    let start = u32::from_le_bytes([e[8], e[9], e[10], e[11]]);
    if start != 1 {
        return None;
    }
    let sectors = u32::try_from(disk_lbas - 1).unwrap_or(u32::MAX);
    if u32::from_le_bytes([e[12], e[13], e[14], e[15]]) == sectors {
        return None;
    }
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    Some((at as u64, e))
}

/// Reads the GPT of `disk`, and grows partition `name` to the end if it is
/// not there yet. Returns what was done (None: nothing to do).
pub fn grow_gpt(disk: &File, lba_size: u64, disk_bytes: u64, name: &str) -> Result<Option<Plan>, GrowError> {
    let io = |op: String| move |source| GrowError::Io { op, source };
    let gpt = Gpt::read(disk, lba_size, disk_bytes).map_err(|e| GrowError::Io { op: "reading the GPT".into(), source: std::io::Error::other(e.to_string()) })?;
    let Some(plan) = Plan::new(&gpt, name, disk_bytes / lba_size)? else { return Ok(None) };
    let mut mbr = vec![0u8; 512];
    disk.read_exact_at(&mut mbr, 0).map_err(io("reading the protective MBR".into()))?;
    apply(disk, &plan.writes(&gpt, Some(&mbr)))?;
    Ok(Some(plan))
}

/// Writes and syncs, in order.
pub fn apply(disk: &File, writes: &[(u64, Vec<u8>)]) -> Result<(), GrowError> {
    for (i, (off, bytes)) in writes.iter().enumerate() {
        disk.write_all_at(bytes, *off).map_err(|source| GrowError::Io { op: format!("writing {} bytes at offset {off}", bytes.len()), source })?;
        // Backup complete before the primary changes.
        if i == 1 {
            disk.sync_data().map_err(|source| GrowError::Io { op: "syncing the backup GPT".into(), source })?;
        }
    }
    disk.sync_all().map_err(|source| GrowError::Io { op: "syncing the GPT".into(), source })
}

const BLKPG: libc::c_ulong = 0x1269;
const BLKPG_ADD_PARTITION: libc::c_int = 1;
const BLKPG_RESIZE_PARTITION: libc::c_int = 3;

#[repr(C)]
struct BlkpgPartition {
    start: libc::c_longlong,
    length: libc::c_longlong,
    pno: libc::c_int,
    devname: [libc::c_char; 64],
    volname: [libc::c_char; 64],
}

#[repr(C)]
struct BlkpgIoctlArg {
    op: libc::c_int,
    flags: libc::c_int,
    datalen: libc::c_int,
    data: *mut libc::c_void,
}

/// Tells the kernel the new size of partition `number` of `disk` (bytes).
pub fn blkpg_resize(disk: &File, number: u32, start: u64, length: u64) -> std::io::Result<()> {
    blkpg(disk, BLKPG_RESIZE_PARTITION, number, start, length)
}

/// Growing primary partition `number` (1-4) of an MBR disk of `disk_sectors`
/// 512-byte sectors to the disk's end (or the 2 TiB an MBR can address),
/// when it is the last partition and that gains at least 1 MiB. Returns the
/// partition's start sector, its old and new sizes in sectors, and the new
/// 16-byte table entry with its offset in sector 0.
pub fn mbr_plan(sector0: &[u8], number: u32, disk_sectors: u64) -> Option<MbrPlan> {
    if sector0.len() < 512 || sector0[510..512] != [0x55, 0xAA] || !(1..=4).contains(&number) {
        return None;
    }
    let entry = |n: u32| {
        let o = 446 + (n as usize - 1) * 16;
        let u = |i: usize| u32::from_le_bytes([sector0[o + i], sector0[o + i + 1], sector0[o + i + 2], sector0[o + i + 3]]) as u64;
        (o, sector0[o + 4], u(8), u(12))
    };
    let (off, ty, start, old) = entry(number);
    if ty == 0 || ty == 0xEE || start == 0 || old == 0 {
        return None;
    }
    // Nothing may sit after it.
    if (1..=4).filter(|&n| n != number).map(entry).any(|(_, t, s, _)| t != 0 && s > start) {
        return None;
    }
    let end = disk_sectors.min(u32::MAX as u64);
    let new = end.checked_sub(start)?;
    if new < old + 2048 {
        return None;
    }
    let mut bytes = sector0[off..off + 16].to_vec();
    bytes[12..16].copy_from_slice(&(new as u32).to_le_bytes());
    Some(MbrPlan { start, old_sectors: old, new_sectors: new, entry_offset: off as u64, entry: bytes })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MbrPlan {
    pub start: u64,
    pub old_sectors: u64,
    pub new_sectors: u64,
    pub entry_offset: u64,
    pub entry: Vec<u8>,
}

/// Tells the kernel about a new partition `number` of `disk` (bytes).
pub fn blkpg_add(disk: &File, number: u32, start: u64, length: u64) -> std::io::Result<()> {
    blkpg(disk, BLKPG_ADD_PARTITION, number, start, length)
}

fn blkpg(disk: &File, op: libc::c_int, number: u32, start: u64, length: u64) -> std::io::Result<()> {
    let mut p = BlkpgPartition { start: start as _, length: length as _, pno: number as _, devname: [0; 64], volname: [0; 64] };
    let mut a = BlkpgIoctlArg { op, flags: 0, datalen: std::mem::size_of::<BlkpgPartition>() as _, data: &mut p as *mut _ as *mut libc::c_void };
    // SAFETY: valid fd; the argument points to live, correctly laid-out structs.
    let rc = unsafe { libc::ioctl(disk.as_raw_fd(), BLKPG as _, &mut a) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// _IOW('f', 16, __u64)
const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;

/// Grows the ext4 mounted at `mountpoint` to `blocks` filesystem blocks.
pub fn ext4_resize(mountpoint: &str, blocks: u64) -> std::io::Result<()> {
    let f = File::open(mountpoint)?;
    let n: u64 = blocks;
    // SAFETY: valid fd and a pointer to a u64, as the ioctl expects.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), EXT4_IOC_RESIZE_FS as _, &n) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// What stage 1 needs from an ext4 superblock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ext4Super {
    pub block_size: u64,
    pub blocks: u64,
    pub label: String,
}

impl Ext4Super {
    /// Parses the 1024-byte superblock found at byte 1024 of the device.
    pub fn parse(sb: &[u8]) -> Option<Ext4Super> {
        if sb.len() < 1024 || sb[0x38..0x3a] != [0x53, 0xEF] {
            return None;
        }
        let u32_at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
        let log = u32_at(0x18);
        if log > 6 {
            return None;
        }
        let incompat = u32_at(0x60);
        let hi = if incompat & 0x80 != 0 { u32_at(0x150) as u64 } else { 0 };
        let label: Vec<u8> = sb[0x78..0x88].iter().copied().take_while(|b| *b != 0).collect();
        let (block_size, blocks) = (1024 << log, (hi << 32) | u32_at(0x04) as u64);
        // More bytes than a u64 holds is no filesystem: `bytes` stays exact.
        blocks.checked_mul(block_size)?;
        Some(Ext4Super { block_size, blocks, label: String::from_utf8_lossy(&label).into_owned() })
    }

    pub fn read(dev: &File) -> Option<Ext4Super> {
        let mut sb = vec![0u8; 1024];
        dev.read_exact_at(&mut sb, 1024).ok()?;
        Self::parse(&sb)
    }

    pub fn bytes(&self) -> u64 {
        self.blocks * self.block_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::gpt::tests::{kiln_disk, sgdisk, tempdir};

    fn last_sector(info: &str) -> u64 {
        let l = info.lines().find(|l| l.starts_with("Last sector:")).unwrap();
        l.split_whitespace().nth(2).unwrap().parse().unwrap()
    }

    #[test]
    fn grows_data_to_the_end_of_an_enlarged_disk() {
        if kiln_testkit::checker("sgdisk", "gdisk").is_none() {
            return;
        }
        let d = tempdir("grow");
        let disk = d.join("disk.img");
        kiln_disk(&disk, 64);
        let before = sgdisk(&["-i", "6"], &disk);
        let root_before = sgdisk(&["-i", "2"], &disk);
        // The disk gets larger, as after `dd` to a bigger card or a resized
        // virtual disk; the backup GPT is now in the middle.
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&disk).unwrap();
        f.set_len(300 << 20).unwrap();
        let plan = grow_gpt(&f, 512, 300 << 20, "data").unwrap().unwrap();
        drop(f);
        let total = (300u64 << 20) / 512;
        assert_eq!(plan.new_last, total - 34);
        assert_eq!(plan.old_last, last_sector(&before));

        let out = kiln_testkit::command("sgdisk").arg("-v").arg(&disk).output().unwrap();
        let v = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && v.contains("No problems found"), "sgdisk -v: {v}");
        let info = sgdisk(&["-i", "6"], &disk);
        assert_eq!(last_sector(&info), total - 34, "{info}");
        assert!(info.contains("'data'"), "{info}");
        // Unchanged partitions stay put.
        assert_eq!(sgdisk(&["-i", "2"], &disk), root_before);

        // A second run has nothing to do.
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&disk).unwrap();
        assert_eq!(grow_gpt(&f, 512, 300 << 20, "data").unwrap(), None);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn grows_from_the_backup_when_the_primary_is_damaged() {
        if kiln_testkit::checker("sgdisk", "gdisk").is_none() {
            return;
        }
        let d = tempdir("grow-backup");
        let disk = d.join("disk.img");
        kiln_disk(&disk, 64);
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&disk).unwrap();
        f.write_all_at(b"XXXX", 512).unwrap();
        // Same size: the backup is at the end, and it is what gets read.
        let plan = grow_gpt(&f, 512, 64 << 20, "data").unwrap().unwrap();
        assert_eq!(plan.new_last, (64 << 11) - 34);
        drop(f);
        let out = kiln_testkit::command("sgdisk").arg("-v").arg(&disk).output().unwrap();
        let v = String::from_utf8_lossy(&out.stdout);
        assert!(v.contains("No problems found"), "sgdisk -v: {v}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn only_the_last_partition_grows() {
        if kiln_testkit::checker("sgdisk", "gdisk").is_none() {
            return;
        }
        let d = tempdir("grow-notlast");
        let disk = d.join("disk.img");
        kiln_disk(&disk, 64);
        let f = File::open(&disk).unwrap();
        let g = Gpt::read(&f, 512, 64 << 20).unwrap();
        assert!(matches!(Plan::new(&g, "root-b", 1 << 20), Err(GrowError::NotLast { other: 5, .. })));
        assert!(matches!(Plan::new(&g, "nope", 1 << 20), Err(GrowError::NoPartition(_))));
        assert!(matches!(Plan::new(&g, "data", 10), Err(GrowError::TooSmall { .. })));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn ext4_superblock() {
        if kiln_testkit::checker("mkfs.ext4", "e2fsprogs").is_none() {
            return;
        }
        let d = tempdir("ext4");
        let img = d.join("fs.img");
        File::create(&img).unwrap().set_len(16 << 20).unwrap();
        let out = kiln_testkit::command("mkfs.ext4").args(["-q", "-F", "-L", "kiln-data", "-b", "4096"]).arg(&img).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let sb = Ext4Super::read(&File::open(&img).unwrap()).unwrap();
        assert_eq!(sb, Ext4Super { block_size: 4096, blocks: 4096, label: "kiln-data".into() });
        assert!(Ext4Super::parse(&[0u8; 1024]).is_none());
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Found by fuzzing (init/fuzz, target gpt_mbr): a 64-bit block count
    /// whose size in bytes overflows made `bytes` panic.
    #[test]
    fn an_ext4_larger_than_a_u64_is_no_ext4() {
        let mut sb = vec![0u8; 1024];
        sb[0x38..0x3a].copy_from_slice(&[0x53, 0xEF]);
        sb[0x18..0x1c].copy_from_slice(&2u32.to_le_bytes()); // 4 KiB blocks
        sb[0x04..0x08].copy_from_slice(&1000u32.to_le_bytes());
        sb[0x60..0x64].copy_from_slice(&0x80u32.to_le_bytes()); // 64bit
        sb[0x150..0x154].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(Ext4Super::parse(&sb).unwrap().bytes(), ((1 << 32) + 1000) * 4096);
        sb[0x150..0x154].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Ext4Super::parse(&sb), None);
    }

    /// A partition that starts after its end made the plan's sizes
    /// underflow (seen reviewing what the gpt_mbr fuzz target reaches).
    #[test]
    fn a_partition_ending_before_it_starts_is_not_grown() {
        let mut entries = vec![0u8; 128 * 4];
        entries[..16].copy_from_slice(&[1u8; 16]);
        entries[32..40].copy_from_slice(&5000u64.to_le_bytes());
        entries[40..48].copy_from_slice(&100u64.to_le_bytes());
        for (i, u) in "data".encode_utf16().enumerate() {
            entries[56 + 2 * i..58 + 2 * i].copy_from_slice(&u.to_le_bytes());
        }
        let header = gpt::Header { header_size: 92, my_lba: 1, alternate_lba: 9999, first_usable: 34, last_usable: 9966, entries_lba: 2, entry_count: 4, entry_size: 128, entries_crc: 0, raw: vec![0; 512] };
        let g = Gpt { lba_size: 512, header, entries, from_backup: false };
        let e = Plan::new(&g, "data", 1 << 20).unwrap_err();
        assert!(matches!(e, GrowError::Backwards { first: 5000, last: 100, .. }), "{e}");
    }

    #[test]
    fn mbr_plan_grows_the_last_partition_only() {
        let mut s0 = vec![0u8; 512];
        s0[510] = 0x55;
        s0[511] = 0xAA;
        let mut put = |n: usize, ty: u8, start: u32, size: u32| {
            let o = 446 + (n - 1) * 16;
            s0[o + 4] = ty;
            s0[o + 8..o + 12].copy_from_slice(&start.to_le_bytes());
            s0[o + 12..o + 16].copy_from_slice(&size.to_le_bytes());
        };
        put(1, 0x0c, 2048, 131072);
        put(2, 0x83, 133120, 266240);
        put(4, 0x83, 399360, 131072);
        let p = mbr_plan(&s0, 4, 8 << 21).unwrap();
        assert_eq!((p.start, p.old_sectors, p.new_sectors), (399360, 131072, (8 << 21) - 399360));
        assert_eq!(p.entry_offset, 446 + 48);
        assert_eq!(&p.entry[12..16], &(((8u64 << 21) - 399360) as u32).to_le_bytes());
        assert_eq!(mbr_plan(&s0, 2, 8 << 21), None, "partition 4 comes after 2");
        assert_eq!(mbr_plan(&s0, 4, 399360 + 131072 + 100), None, "less than 1 MiB to gain");
        assert_eq!(mbr_plan(&s0, 3, 8 << 21), None, "empty entry");
        let p = mbr_plan(&s0, 4, 1 << 40).unwrap();
        assert_eq!(p.start + p.new_sectors, u32::MAX as u64, "an MBR addresses 2^32 sectors");
        s0[511] = 0;
        assert_eq!(mbr_plan(&s0, 4, 8 << 21), None, "no MBR");
    }
}
