//! The install image (`KILNIMG1`, format in `kiln_contract::install_image`):
//! `disk.raw` without root-a and root-a-verity, whose contents the ISO
//! carries anyway. The installer on the node rebuilds the disk from it and
//! those two.
//!
//! Runs never cross a partition boundary, so the installer can hold back
//! exactly the blocks holding partition tables until everything else is on
//! the disk. Zero blocks become zero runs (the installer zeroes them on a
//! disk that held something before), except inside the B slots, where no
//! one reads what is not written by an update.

use anyhow::{bail, Context, Result};
use kiln_contract::install_image::{Header, Run, Source, BACKUP_GPT_BYTES};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use kiln_formats::gpt::Gpt;

/// Zero blocks are found at this size.
const BLOCK: u64 = 4096;
const CHUNK: usize = 1 << 20;

/// What went into an install image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub disk_bytes: u64,
    pub runs: usize,
    /// Bytes stored in the image itself.
    pub packed_bytes: u64,
    /// Bytes the installer zeroes.
    pub zero_bytes: u64,
    /// Bytes read from the root and verity sources.
    pub root_bytes: u64,
    pub verity_bytes: u64,
    /// The size of the install image file.
    pub image_bytes: u64,
    /// sha256 of the header, which covers every run's sha256.
    pub header_sha256: [u8; 32],
}

/// Writes the install image for `disk_raw` to `out`. `root_part` and
/// `verity_part` are root-a's and root-a-verity's (offset, length) in
/// `disk_raw`, holding `root_file` (the squashfs) and `verity_file` (its
/// hash tree) at their starts.
pub fn write(
    disk_raw: &Path,
    root_part: (u64, u64),
    root_file: &Path,
    verity_part: (u64, u64),
    verity_file: &Path,
    out: &Path,
) -> Result<Summary> {
    let mut disk =
        File::open(disk_raw).with_context(|| format!("opening {}", disk_raw.display()))?;
    let disk_bytes = disk.metadata()?.len();
    let gpt = Gpt::read(&mut disk).with_context(|| {
        format!(
            "reading the GPT of {}; an install image is made from a kiln disk image",
            disk_raw.display()
        )
    })?;
    if gpt.size_bytes != disk_bytes {
        bail!(
            "{} is {disk_bytes} bytes but its GPT describes {}; rebuild the disk image",
            disk_raw.display(),
            gpt.size_bytes
        );
    }
    let find = |(off, len): (u64, u64), what: &str| {
        gpt.partitions
            .iter()
            .find(|p| p.offset_bytes() == off && p.size_bytes() == len)
            .cloned()
            .with_context(|| {
                format!(
                    "no partition of {} is {what} ({len} bytes at offset {off})",
                    disk_raw.display()
                )
            })
    };
    let root_p = find(root_part, "root-a")?;
    let verity_p = find(verity_part, "root-a-verity")?;

    // The squashfs and tree, and that disk.raw holds exactly them.
    let mut runs = Vec::new();
    for (file, (off, slot), source, what) in [
        (
            root_file,
            root_part,
            Source::Root { offset: 0 },
            "root squashfs",
        ),
        (
            verity_file,
            verity_part,
            Source::Verity { offset: 0 },
            "verity tree",
        ),
    ] {
        let len = std::fs::metadata(file)
            .with_context(|| format!("reading the {what} {}", file.display()))?
            .len();
        if len > slot {
            bail!(
                "the {what} {} is {len} bytes, larger than its {slot}-byte partition",
                file.display()
            );
        }
        if len > 0 {
            let sha256 = compare(&mut disk, off, file, len).with_context(|| {
                format!(
                    "{} does not hold the {what} {} at offset {off}; rebuild the disk image",
                    disk_raw.display(),
                    file.display()
                )
            })?;
            runs.push(Run {
                disk_offset: off,
                len,
                source,
                sha256,
            });
        }
    }

    // Everything else, segment by segment.
    let skip = [
        (root_p.offset_bytes(), root_p.size_bytes()),
        (verity_p.offset_bytes(), verity_p.size_bytes()),
    ];
    let b_slots: Vec<(u64, u64)> = gpt
        .partitions
        .iter()
        .filter(|p| {
            (p.type_guid == root_p.type_guid || p.type_guid == verity_p.type_guid)
                && **p != root_p
                && **p != verity_p
        })
        .map(|p| (p.offset_bytes(), p.size_bytes()))
        .collect();
    let mut cuts = vec![0, disk_bytes, disk_bytes - BACKUP_GPT_BYTES];
    for p in &gpt.partitions {
        cuts.push(p.offset_bytes());
        cuts.push(p.offset_bytes() + p.size_bytes());
    }
    cuts.sort_unstable();
    cuts.dedup();
    let mut holes = Holes::new(&disk);
    let mut buf = vec![0u8; BLOCK as usize];
    for seg in cuts.windows(2) {
        let (start, end) = (seg[0], seg[1]);
        if skip.contains(&(start, end - start)) {
            continue;
        }
        let keep_zeros = !b_slots.contains(&(start, end - start));
        let mut at = start;
        while at < end {
            let n = (end - at).min(BLOCK);
            let zero = if holes.is_hole(at, n)? {
                true
            } else {
                disk.read_exact_at(&mut buf[..n as usize], at)
                    .with_context(|| format!("reading {}", disk_raw.display()))?;
                buf[..n as usize].iter().all(|b| *b == 0)
            };
            let source = if !zero {
                Some(Source::Packed { offset: 0 })
            } else if keep_zeros {
                Some(Source::Zero)
            } else {
                None
            };
            match (source, runs.last_mut()) {
                (Some(s), Some(last))
                    if last.source == s && last.end() == at && last.disk_offset >= start =>
                {
                    last.len += n
                }
                (Some(s), _) => runs.push(Run {
                    disk_offset: at,
                    len: n,
                    source: s,
                    sha256: [0; 32],
                }),
                (None, _) => {}
            }
            at += n;
        }
    }
    runs.sort_by_key(|r| r.disk_offset);

    // Packed offsets follow run order.
    let mut packed = 0;
    for r in runs.iter_mut() {
        if let Source::Packed { .. } = r.source {
            r.source = Source::Packed { offset: packed };
            packed += r.len;
        }
    }
    let mut header = Header { disk_bytes, runs };
    header.validate().context("laying out the install image")?;

    // Packed bytes first (their hashes go into the header), then the header.
    let tmp = out.with_extension("tmp");
    let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.seek(SeekFrom::Start(header.packed_start()))?;
    let mut w = std::io::BufWriter::with_capacity(CHUNK, f);
    let mut chunk = vec![0u8; CHUNK];
    for r in header.runs.iter_mut() {
        if !matches!(r.source, Source::Packed { .. }) {
            continue;
        }
        disk.seek(SeekFrom::Start(r.disk_offset))?;
        let mut h = Sha256::new();
        let mut left = r.len;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            disk.read_exact(&mut chunk[..n])
                .with_context(|| format!("reading {}", disk_raw.display()))?;
            h.update(&chunk[..n]);
            w.write_all(&chunk[..n])
                .with_context(|| format!("writing {}", tmp.display()))?;
            left -= n as u64;
        }
        r.sha256 = h.finalize().into();
    }
    let mut f = w.into_inner().map_err(|e| e.into_error())?;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(
        &header
            .encode()
            .context("encoding the install image header")?,
    )
    .with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, out)
        .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;

    let sum = |s: fn(&Source) -> bool| -> u64 {
        header
            .runs
            .iter()
            .filter(|r| s(&r.source))
            .map(|r| r.len)
            .sum()
    };
    Ok(Summary {
        disk_bytes,
        runs: header.runs.len(),
        packed_bytes: header.packed_bytes(),
        zero_bytes: sum(|s| *s == Source::Zero),
        root_bytes: header.root_bytes(),
        verity_bytes: header.verity_bytes(),
        image_bytes: header.image_bytes(),
        header_sha256: header.digest(),
    })
}

/// Checks that `disk` holds `file` (`len` bytes) at `off`; returns its
/// sha256.
fn compare(disk: &mut File, off: u64, file: &Path, len: u64) -> Result<[u8; 32]> {
    let mut f = File::open(file).with_context(|| format!("opening {}", file.display()))?;
    disk.seek(SeekFrom::Start(off))?;
    let (mut a, mut b) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut h = Sha256::new();
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK as u64) as usize;
        f.read_exact(&mut a[..n])?;
        disk.read_exact(&mut b[..n])?;
        if a[..n] != b[..n] {
            let i = a[..n]
                .iter()
                .zip(&b[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            bail!("they differ at byte {}", done + i as u64);
        }
        h.update(&a[..n]);
        done += n as u64;
    }
    Ok(h.finalize().into())
}

/// Holes of a sparse file (SEEK_DATA), so that scanning a mostly empty
/// disk image does not read gigabytes of zeros. Only a speed-up: a hole
/// reads as zeros, so the result is the same without it.
struct Holes<'a> {
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    file: &'a File,
    /// The next data at or after `from` starts at `data`.
    from: u64,
    data: u64,
}

impl<'a> Holes<'a> {
    fn new(file: &'a File) -> Holes<'a> {
        Holes {
            file,
            from: u64::MAX,
            data: 0,
        }
    }

    /// Whether `[at, at + len)` lies in a hole.
    fn is_hole(&mut self, at: u64, len: u64) -> Result<bool> {
        if !(self.from <= at && at < self.data) {
            self.from = at;
            self.data = self.next_data(at);
        }
        Ok(at + len <= self.data)
    }

    #[cfg(target_os = "linux")]
    fn next_data(&self, at: u64) -> u64 {
        use std::os::fd::AsRawFd;
        let Ok(off) = libc::off_t::try_from(at) else {
            return at;
        };
        // SAFETY: plain syscall on a valid fd. lseek moves the file offset;
        // the scan reads with pread and later reads seek first.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, libc::SEEK_DATA) };
        if r >= 0 {
            return r as u64;
        }
        match std::io::Error::last_os_error().raw_os_error() {
            // No data after `at`: the rest of the file is a hole.
            Some(libc::ENXIO) => u64::MAX,
            // Not supported here: assume data, and read.
            _ => at,
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn next_data(&self, at: u64) -> u64 {
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_found_and_data_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse");
        let mut f = File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(32 << 20)).unwrap();
        f.write_all(&[1u8; 4096]).unwrap();
        f.sync_all().unwrap();
        let f = File::open(&p).unwrap();
        let mut h = Holes::new(&f);
        // Whether holes are reported depends on the filesystem; data never
        // is a hole.
        assert!(!h.is_hole(32 << 20, 4096).unwrap());
        assert!(!h.is_hole((32 << 20) - 4096, 8192).unwrap());
        let _ = h.is_hole(0, 4096).unwrap();
        assert!(!h.is_hole(32 << 20, 1).unwrap());
    }
}
