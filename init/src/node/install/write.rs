//! Writing a disk from an install image (format: `kiln_contract::install_image`)
//! in an order that keeps an interrupted install from leaving a
//! half-bootable disk: the installer's half of the ISO install.

// `is_multiple_of` needs Rust 1.87; the workspace promises 1.80.
#![allow(clippy::manual_is_multiple_of)]

use kiln_contract::digest::{hex, Sha256};
use kiln_contract::install_image::*;
use std::fmt;
use std::io::{self, Read, Seek, SeekFrom};
use std::time::Instant;

/// Why an install failed. Each message says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(
        "the install image is unusable: {0}; rewrite the ISO to the install medium, or rebuild it"
    )]
    Image(#[from] FormatError),
    #[error("the install image is {have} bytes, but its header describes {want}: {}; rewrite the ISO to the install medium", if have < want { "it is truncated" } else { "it has trailing data" })]
    ImageLength { have: u64, want: u64 },
    #[error("the install image's header is not the one this boot expects (sha256 {found}): the medium was altered or is for another build")]
    NotPinned { found: String },
    #[error("the target disk is {target_bytes} bytes, but the image needs {disk_bytes}: use a disk of at least {} MiB", disk_bytes.div_ceil(1 << 20))]
    TargetTooSmall { target_bytes: u64, disk_bytes: u64 },
    #[error("the {which} source is {have} bytes, but the image needs {need}: the install medium is damaged or does not belong to this image")]
    SourceShort {
        which: &'static str,
        have: u64,
        need: u64,
    },
    #[error("the {which} bytes for disk offset {disk_offset} ({len} bytes) do not match their checksum: the install medium is damaged; nothing bootable was written, rewrite the medium and retry")]
    SourceDigest {
        which: &'static str,
        disk_offset: u64,
        len: u64,
    },
    #[error("read-back of the {len} bytes at disk offset {disk_offset} differs from what was written: the target disk may be failing; try another disk")]
    Verify { disk_offset: u64, len: u64 },
    #[error("{op}: {source}")]
    Io { op: String, source: io::Error },
}

fn io_err(op: impl Into<String>) -> impl FnOnce(io::Error) -> InstallError {
    let op = op.into();
    move |source| InstallError::Io { op, source }
}

/// What the installer writes to: a disk, or anything standing in for one in
/// tests (a failing writer simulates a power cut).
pub trait Target {
    /// Writes all of `buf` at `offset`.
    fn write_at_offset(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Fills all of `buf` from `offset`.
    fn read_at_offset(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Makes everything written so far durable (fsync).
    fn flush_to_disk(&self) -> io::Result<()>;
    /// Makes `len` bytes at `offset` read as zeros.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zeros(self, offset, len)
    }
    /// Drops cached pages so reads come from the device (best effort).
    fn drop_cache(&self) {}
}

fn write_zeros<T: Target + ?Sized>(t: &T, offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; CHUNK.min(len as usize)];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(CHUNK as u64) as usize;
        t.write_at_offset(&zeros[..n], offset + at)?;
        at += n as u64;
    }
    Ok(())
}

#[cfg(unix)]
impl Target for std::fs::File {
    fn write_at_offset(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, buf, offset)
    }

    fn read_at_offset(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }

    fn flush_to_disk(&self) -> io::Result<()> {
        // On a block device this also flushes the disk's write cache.
        self.sync_all()
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        if linux::zero_fast(self, offset, len) {
            return Ok(());
        }
        write_zeros(self, offset, len)
    }

    fn drop_cache(&self) {
        #[cfg(target_os = "linux")]
        linux::drop_cache(self);
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::fs::File;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileTypeExt;

    /// _IO(0x12, 127)
    const BLKZEROOUT: libc::c_ulong = 0x127f;

    /// Zeroes without sending the zeros: BLKZEROOUT on a block device (the
    /// disk's WRITE ZEROES, or the kernel writing them), a punched hole in a
    /// regular file. False when neither applies; the caller writes zeros.
    pub fn zero_fast(f: &File, offset: u64, len: u64) -> bool {
        let Ok(meta) = f.metadata() else { return false };
        let fd = f.as_raw_fd();
        if meta.file_type().is_block_device() {
            // Aligned to any logical block size up to 4 KiB; other ranges
            // (only ever a few sectors) are written.
            if offset % 4096 != 0 || len % 4096 != 0 {
                return false;
            }
            let range: [u64; 2] = [offset, len];
            // SAFETY: BLKZEROOUT reads two u64s (start, length).
            return unsafe { libc::ioctl(fd, BLKZEROOUT as _, range.as_ptr()) } == 0;
        }
        if meta.is_file() && offset.saturating_add(len) <= meta.len() {
            let (Ok(o), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
                return false;
            };
            // SAFETY: plain syscall on a valid fd.
            return unsafe {
                libc::fallocate(
                    fd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    o,
                    l,
                )
            } == 0;
        }
        false
    }

    /// Best effort: DONTNEED drops clean cached pages of the device, so a
    /// read-back after fsync usually comes from the disk, not from memory. A
    /// page the kernel keeps (mapped, or busy) is still read from cache, so
    /// this catches a disk that drops writes, not every possible fault.
    pub fn drop_cache(f: &File) {
        // SAFETY: plain syscall on a valid fd.
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
}

/// Where [`apply`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Hashing the packed area before touching the target.
    Checking,
    /// Zeroing old partition tables and the image's zero runs.
    Wiping,
    /// Writing partition contents.
    Writing,
    /// Reading back and comparing.
    Verifying,
    /// Writing the partition tables, last.
    WritingTable,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Checking => "checking the install image",
            Phase::Wiping => "wiping old partition tables and empty space",
            Phase::Writing => "writing",
            Phase::Verifying => "verifying",
            Phase::WritingTable => "writing the partition table",
        })
    }
}

/// Progress over the whole install: `done` grows from 0 to `total` across
/// all phases (bytes hashed, zeroed, written and read back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub phase: Phase,
    pub done: u64,
    pub total: u64,
}

/// What [`apply`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// Bytes copied to the target (packed, root and verity runs).
    pub bytes_written: u64,
    /// Bytes zeroed: zero runs and the wiped ends of the target.
    pub bytes_zeroed: u64,
    pub runs: usize,
    pub seconds: f64,
}

/// [`apply`], refusing an image whose header digest is not `expected`.
#[allow(clippy::too_many_arguments)]
pub fn apply_pinned<I, R, V, T>(
    image: &mut I,
    expected: &[u8; 32],
    root: &mut R,
    verity: &mut V,
    target: &T,
    target_bytes: u64,
    progress: impl FnMut(Progress),
) -> Result<Report, InstallError>
where
    I: Read + Seek,
    R: Read + Seek,
    V: Read + Seek,
    T: Target + ?Sized,
{
    apply_inner(
        image,
        Some(expected),
        root,
        verity,
        target,
        target_bytes,
        progress,
    )
}

/// Writes the disk described by `image` onto `target` (`target_bytes`
/// long), reading root and verity runs from `root` and `verity`.
///
/// Order, so that an interrupted install never leaves a disk that firmware
/// or the kernel would take for a half-written kiln disk:
/// 1. check everything that can be checked without writing: the header,
///    the image's length, the sizes of target and sources, and the sha256
///    of every packed run (the image is small; root and verity are not, and
///    are checked while they are copied);
/// 2. zero the first and last MiB of the target (old partition tables) and
///    the image's zero runs, then fsync: no old table survives once new
///    contents start landing;
/// 3. write every run except the table runs ([`Header::is_table_run`]),
///    checking each run's sha256 as it streams; fsync; read them back;
/// 4. write the backup table, then the protective MBR and primary GPT,
///    fsync, and read them back. Only this last step makes a GPT disk; an
///    interruption before it leaves no valid primary GPT and no protective
///    MBR.
///
/// The backup GPT stays where the image has it (at `disk_bytes`, not at the
/// end of a larger target): stage 1 moves it to the end and grows the data
/// partition at first boot (`node::grow`).
pub fn apply<I, R, V, T>(
    image: &mut I,
    root: &mut R,
    verity: &mut V,
    target: &T,
    target_bytes: u64,
    progress: impl FnMut(Progress),
) -> Result<Report, InstallError>
where
    I: Read + Seek,
    R: Read + Seek,
    V: Read + Seek,
    T: Target + ?Sized,
{
    apply_inner(image, None, root, verity, target, target_bytes, progress)
}

/// Cumulative progress reporting.
struct Meter<F: FnMut(Progress)> {
    done: u64,
    total: u64,
    f: F,
}

impl<F: FnMut(Progress)> Meter<F> {
    fn add(&mut self, phase: Phase, n: u64) {
        self.done = self.done.saturating_add(n).min(self.total);
        (self.f)(Progress {
            phase,
            done: self.done,
            total: self.total,
        });
    }
}

#[allow(clippy::too_many_arguments)]
fn apply_inner<I, R, V, T>(
    image: &mut I,
    expected: Option<&[u8; 32]>,
    root: &mut R,
    verity: &mut V,
    target: &T,
    target_bytes: u64,
    progress: impl FnMut(Progress),
) -> Result<Report, InstallError>
where
    I: Read + Seek,
    R: Read + Seek,
    V: Read + Seek,
    T: Target + ?Sized,
{
    let t0 = Instant::now();
    image
        .seek(SeekFrom::Start(0))
        .map_err(io_err("reading the install image"))?;
    let header = Header::decode(image)?;
    if let Some(want) = expected {
        let found = header.digest();
        if &found != want {
            return Err(InstallError::NotPinned { found: hex(&found) });
        }
    }
    let have = image
        .seek(SeekFrom::End(0))
        .map_err(io_err("finding the install image's size"))?;
    if have != header.image_bytes() {
        return Err(InstallError::ImageLength {
            have,
            want: header.image_bytes(),
        });
    }
    if target_bytes < header.disk_bytes {
        return Err(InstallError::TargetTooSmall {
            target_bytes,
            disk_bytes: header.disk_bytes,
        });
    }
    for (which, have, need) in [
        (
            "root",
            root.seek(SeekFrom::End(0))
                .map_err(io_err("finding the root source's size"))?,
            header.root_bytes(),
        ),
        (
            "verity",
            verity
                .seek(SeekFrom::End(0))
                .map_err(io_err("finding the verity source's size"))?,
            header.verity_bytes(),
        ),
    ] {
        if have < need {
            return Err(InstallError::SourceShort { which, have, need });
        }
    }

    let wipe = [
        (0, WIPE_BYTES.min(target_bytes)),
        (
            target_bytes.saturating_sub(WIPE_BYTES),
            WIPE_BYTES.min(target_bytes),
        ),
    ];
    let zero_bytes: u64 = header
        .runs
        .iter()
        .filter(|r| r.source == Source::Zero)
        .map(|r| r.len)
        .sum();
    let copy_bytes: u64 = header
        .runs
        .iter()
        .filter(|r| r.source != Source::Zero)
        .map(|r| r.len)
        .sum();
    let all_bytes: u64 = header.runs.iter().map(|r| r.len).sum();
    let wipe_bytes = wipe[0].1 + wipe[1].1;
    let mut meter = Meter {
        done: 0,
        total: [
            header.packed_bytes(),
            wipe_bytes,
            zero_bytes,
            copy_bytes,
            all_bytes,
        ]
        .into_iter()
        .fold(0, u64::saturating_add),
        f: progress,
    };
    let mut buf = vec![0u8; CHUNK];

    // 1. The packed area, before anything is written.
    image
        .seek(SeekFrom::Start(header.packed_start()))
        .map_err(io_err("reading the install image"))?;
    for r in header
        .runs
        .iter()
        .filter(|r| matches!(r.source, Source::Packed { .. }))
    {
        let got = hash_stream(image, r.len, &mut buf, |n| meter.add(Phase::Checking, n))
            .map_err(io_err("reading the install image"))?;
        if got != r.sha256 {
            return Err(InstallError::SourceDigest {
                which: "install image",
                disk_offset: r.disk_offset,
                len: r.len,
            });
        }
    }

    // 2. Old tables and zero runs, durable before any new content.
    for (off, len) in wipe {
        target.zero_range(off, len).map_err(io_err(format!(
            "zeroing {len} bytes at offset {off} of the target"
        )))?;
        meter.add(Phase::Wiping, len);
    }
    for r in header.runs.iter().filter(|r| r.source == Source::Zero) {
        target
            .zero_range(r.disk_offset, r.len)
            .map_err(io_err(format!(
                "zeroing {} bytes at disk offset {}",
                r.len, r.disk_offset
            )))?;
        meter.add(Phase::Wiping, r.len);
    }
    target
        .flush_to_disk()
        .map_err(io_err("syncing the target after wiping"))?;

    // 3. Contents.
    let body: Vec<&Run> = header
        .runs
        .iter()
        .filter(|r| r.source != Source::Zero && !header.is_table_run(r))
        .collect();
    let mut written = 0u64;
    for r in &body {
        copy_run(
            &header,
            r,
            image,
            root,
            verity,
            target,
            &mut buf,
            &mut meter,
            Phase::Writing,
        )?;
        written += r.len;
    }
    target
        .flush_to_disk()
        .map_err(io_err("syncing the target"))?;
    target.drop_cache();
    let body_and_zero: Vec<&Run> = header
        .runs
        .iter()
        .filter(|r| !header.is_table_run(r))
        .collect();
    verify(&body_and_zero, target, &mut buf, &mut meter)?;

    // 4. The tables: backup first, the primary (with the protective MBR)
    // last of all.
    let tables: Vec<&Run> = header
        .runs
        .iter()
        .rev()
        .filter(|r| header.is_table_run(r))
        .collect();
    for r in &tables {
        copy_run(
            &header,
            r,
            image,
            root,
            verity,
            target,
            &mut buf,
            &mut meter,
            Phase::WritingTable,
        )?;
        written += r.len;
    }
    target
        .flush_to_disk()
        .map_err(io_err("syncing the partition table"))?;
    target.drop_cache();
    verify(&tables, target, &mut buf, &mut meter)?;

    Ok(Report {
        bytes_written: written,
        bytes_zeroed: zero_bytes + wipe_bytes,
        runs: header.runs.len(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Copies one run from its source to the target, checking its sha256 as it
/// streams.
#[allow(clippy::too_many_arguments)]
fn copy_run<I, R, V, T, F>(
    header: &Header,
    r: &Run,
    image: &mut I,
    root: &mut R,
    verity: &mut V,
    target: &T,
    buf: &mut [u8],
    meter: &mut Meter<F>,
    phase: Phase,
) -> Result<(), InstallError>
where
    I: Read + Seek,
    R: Read + Seek,
    V: Read + Seek,
    T: Target + ?Sized,
    F: FnMut(Progress),
{
    fn at<'a, S: Seek>(s: &'a mut S, pos: u64, which: &str) -> Result<&'a mut S, InstallError> {
        s.seek(SeekFrom::Start(pos)).map_err(io_err(format!(
            "seeking to offset {pos} of the {which} source"
        )))?;
        Ok(s)
    }
    let (src, which): (&mut dyn Read, &'static str) = match r.source {
        Source::Packed { offset } => (
            at(image, header.packed_start() + offset, "install image")?,
            "install image",
        ),
        Source::Root { offset } => (at(root, offset, "root")?, "root"),
        Source::Verity { offset } => (at(verity, offset, "verity")?, "verity"),
        Source::Zero => return Ok(()),
    };
    let mut h = Sha256::new();
    let mut done = 0u64;
    while done < r.len {
        let n = (r.len - done).min(buf.len() as u64) as usize;
        src.read_exact(&mut buf[..n]).map_err(io_err(format!(
            "reading the {which} bytes for disk offset {}",
            r.disk_offset + done
        )))?;
        h.update(&buf[..n]);
        target
            .write_at_offset(&buf[..n], r.disk_offset + done)
            .map_err(io_err(format!(
                "writing {n} bytes at disk offset {} of the target",
                r.disk_offset + done
            )))?;
        done += n as u64;
        meter.add(phase, n as u64);
    }
    if h.finalize() != r.sha256 {
        return Err(InstallError::SourceDigest {
            which,
            disk_offset: r.disk_offset,
            len: r.len,
        });
    }
    Ok(())
}

fn verify<T, F>(
    runs: &[&Run],
    target: &T,
    buf: &mut [u8],
    meter: &mut Meter<F>,
) -> Result<(), InstallError>
where
    T: Target + ?Sized,
    F: FnMut(Progress),
{
    for r in runs {
        let mut h = Sha256::new();
        let mut done = 0u64;
        let mut zero = true;
        while done < r.len {
            let n = (r.len - done).min(buf.len() as u64) as usize;
            target
                .read_at_offset(&mut buf[..n], r.disk_offset + done)
                .map_err(io_err(format!(
                    "reading back {n} bytes at disk offset {}",
                    r.disk_offset + done
                )))?;
            if r.source == Source::Zero {
                zero &= buf[..n].iter().all(|b| *b == 0);
            } else {
                h.update(&buf[..n]);
            }
            done += n as u64;
            meter.add(Phase::Verifying, n as u64);
        }
        let ok = if r.source == Source::Zero {
            zero
        } else {
            h.finalize() == r.sha256
        };
        if !ok {
            return Err(InstallError::Verify {
                disk_offset: r.disk_offset,
                len: r.len,
            });
        }
    }
    Ok(())
}

/// Hashes the next `len` bytes of `r`.
fn hash_stream<R: Read + ?Sized>(
    r: &mut R,
    len: u64,
    buf: &mut [u8],
    mut tick: impl FnMut(u64),
) -> io::Result<[u8; 32]> {
    let mut h = Sha256::new();
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        r.read_exact(&mut buf[..n])?;
        h.update(&buf[..n]);
        done += n as u64;
        tick(n as u64);
    }
    Ok(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cell::{Cell, RefCell};
    use kiln_contract::digest::sha256;
    use std::io::Cursor;

    const MIB: u64 = 1 << 20;

    /// A small disk: "tables" at both ends, a packed run, a root run, a
    /// verity run and zero runs, with `root` and `verity` sources.
    struct Fixture {
        disk: Vec<u8>,
        header: Header,
        image: Vec<u8>,
        root: Vec<u8>,
        verity: Vec<u8>,
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    fn fixture() -> Fixture {
        let disk_bytes = 4 * MIB;
        let mut disk = vec![0u8; disk_bytes as usize];
        let root = pattern(300_000, 7);
        let verity = pattern(8192, 9);
        // (offset, len, source)
        let layout: Vec<(u64, u64, Source)> = vec![
            (0, 4096, Source::Packed { offset: 0 }),
            (4096, MIB - 4096, Source::Zero),
            (MIB, 2 * 4096, Source::Packed { offset: 4096 }),
            (MIB + 8192, MIB - 8192, Source::Zero),
            (2 * MIB, root.len() as u64, Source::Root { offset: 0 }),
            (3 * MIB, 8192, Source::Verity { offset: 0 }),
            (4 * MIB - 16896, 16896, Source::Packed { offset: 12288 }),
        ];
        let mut runs = Vec::new();
        for (off, len, source) in layout {
            let (o, l) = (off as usize, len as usize);
            match source {
                Source::Packed { .. } => {
                    disk[o..o + l].copy_from_slice(&pattern(l, o as u8));
                    if o == 0 {
                        disk[510..512].copy_from_slice(&[0x55, 0xAA]);
                    }
                }
                Source::Root { .. } => disk[o..o + l].copy_from_slice(&root),
                Source::Verity { .. } => disk[o..o + l].copy_from_slice(&verity),
                Source::Zero => {}
            }
            let sha256 = if source == Source::Zero {
                [0; 32]
            } else {
                sha256(&disk[o..o + l])
            };
            runs.push(Run {
                disk_offset: off,
                len,
                source,
                sha256,
            });
        }
        let header = Header { disk_bytes, runs };
        let mut image = header.encode().unwrap();
        for r in &header.runs {
            if let Source::Packed { .. } = r.source {
                image.extend_from_slice(&disk[r.disk_offset as usize..r.end() as usize]);
            }
        }
        Fixture {
            disk,
            header,
            image,
            root,
            verity,
        }
    }

    #[derive(Debug, Clone, PartialEq)]
    enum Op {
        Write(u64, u64),
        Zero(u64, u64),
        Sync,
        DropCache,
    }

    /// A disk in memory that logs what is done to it, can stop accepting
    /// writes after `budget` bytes (a power cut mid-write keeps what fit),
    /// and can silently drop writes at one offset (a lying disk).
    struct MemDisk {
        data: RefCell<Vec<u8>>,
        log: RefCell<Vec<Op>>,
        budget: Cell<u64>,
        drop_writes_at: Option<u64>,
    }

    impl MemDisk {
        fn new(len: u64, fill: u8) -> MemDisk {
            MemDisk {
                data: RefCell::new(vec![fill; len as usize]),
                log: RefCell::new(Vec::new()),
                budget: Cell::new(u64::MAX),
                drop_writes_at: None,
            }
        }

        fn writes(&self) -> usize {
            self.log
                .borrow()
                .iter()
                .filter(|o| matches!(o, Op::Write(..) | Op::Zero(..)))
                .count()
        }
    }

    impl Target for MemDisk {
        fn write_at_offset(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            let keep = (buf.len() as u64).min(self.budget.get()) as usize;
            self.budget.set(self.budget.get() - keep as u64);
            let mut d = self.data.borrow_mut();
            let o = offset as usize;
            if o + buf.len() > d.len() {
                return Err(io::Error::other("write past the end"));
            }
            if self
                .drop_writes_at
                .is_some_and(|x| (offset..offset + buf.len() as u64).contains(&x))
            {
                return Ok(());
            }
            d[o..o + keep].copy_from_slice(&buf[..keep]);
            if keep < buf.len() {
                return Err(io::Error::other("power cut"));
            }
            self.log
                .borrow_mut()
                .push(Op::Write(offset, buf.len() as u64));
            Ok(())
        }

        fn read_at_offset(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let d = self.data.borrow();
            let o = offset as usize;
            buf.copy_from_slice(
                d.get(o..o + buf.len())
                    .ok_or_else(|| io::Error::other("read past the end"))?,
            );
            Ok(())
        }

        fn flush_to_disk(&self) -> io::Result<()> {
            self.log.borrow_mut().push(Op::Sync);
            Ok(())
        }

        fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
            self.log.borrow_mut().push(Op::Zero(offset, len));
            let mut d = self.data.borrow_mut();
            d.get_mut(offset as usize..(offset + len) as usize)
                .ok_or_else(|| io::Error::other("zero past the end"))?
                .fill(0);
            Ok(())
        }

        fn drop_cache(&self) {
            self.log.borrow_mut().push(Op::DropCache);
        }
    }

    /// The disk offset of the first run whose bytes on `d` are not the
    /// fixture's.
    fn differing_run(f: &Fixture, d: &[u8]) -> Option<u64> {
        f.header
            .runs
            .iter()
            .find(|r| {
                d[r.disk_offset as usize..r.end() as usize]
                    != f.disk[r.disk_offset as usize..r.end() as usize]
            })
            .map(|r| r.disk_offset)
    }

    fn run_apply(f: &Fixture, image: &[u8], t: &MemDisk) -> Result<Report, InstallError> {
        let len = t.data.borrow().len() as u64;
        apply(
            &mut Cursor::new(image),
            &mut Cursor::new(&f.root),
            &mut Cursor::new(&f.verity),
            t,
            len,
            |_| {},
        )
    }

    #[test]
    fn header_round_trips() {
        let f = fixture();
        let enc = f.header.encode().unwrap();
        assert_eq!(enc.len() as u64, f.header.packed_start());
        assert_eq!(f.header.packed_start() % ALIGN, 0);
        let mut c = Cursor::new(&f.image);
        assert_eq!(Header::decode(&mut c).unwrap(), f.header);
        assert_eq!(c.position(), f.header.packed_start());
        assert_eq!(f.header.image_bytes(), f.image.len() as u64);
        assert_eq!(f.header.root_bytes(), f.root.len() as u64);
        assert_eq!(f.header.verity_bytes(), 8192);
        assert_eq!(&f.image[..8], MAGIC);
        assert_eq!(enc[enc.len() - 1], 0);
        let table_end = (FIXED_LEN + RUN_LEN * f.header.runs.len() as u64) as usize;
        assert_eq!(f.image[table_end..table_end + 32], f.header.digest());
    }

    #[test]
    fn validate_names_the_problem() {
        let f = fixture();
        let check = |m: &dyn Fn(&mut Header), want: &str| {
            let mut h = f.header.clone();
            m(&mut h);
            let msg = h.validate().unwrap_err().to_string();
            assert!(msg.contains(want), "wanted {want:?} in {msg:?}");
            assert!(h.encode().is_err());
        };
        check(&|h| h.runs.swap(1, 2), "overlaps or precedes");
        check(&|h| h.runs[2].disk_offset -= 1, "overlaps");
        check(&|h| h.runs[6].len += 1, "past the disk size");
        check(
            &|h| h.runs[6].disk_offset = u64::MAX - 2,
            "past the disk size",
        );
        check(&|h| h.runs[3].len = 0, "run 3 is empty");
        check(
            &|h| h.runs[2].source = Source::Packed { offset: 4097 },
            "expected 4096",
        );
        check(&|h| h.runs[1].sha256[0] = 1, "zero run 1 has a checksum");
        check(
            &|h| h.runs[4].source = Source::Root { offset: u64::MAX },
            "overflows",
        );
        check(&|h| h.disk_bytes += 1, "multiple of 512");
        check(&|h| h.disk_bytes = 512, "multiple of 512");
    }

    #[test]
    fn decode_says_what_is_wrong() {
        let f = fixture();
        let err = |b: &[u8]| Header::decode(&mut Cursor::new(b)).unwrap_err().to_string();
        let mut b = f.image.clone();
        b[0] = b'X';
        assert!(err(&b).contains("not a kiln install image"), "{}", err(&b));
        let mut b = f.image.clone();
        b[8] = 2;
        assert!(err(&b).contains("version 2"), "{}", err(&b));
        assert!(err(&f.image[..20]).contains("ends inside the header (the fixed part)"));
        assert!(
            err(&f.image[..100]).contains("table of 7 runs"),
            "{}",
            err(&f.image[..100])
        );
        assert!(
            err(&f.image[..1000]).contains("padding"),
            "{}",
            err(&f.image[..1000])
        );
        let mut b = f.image.clone();
        b[40] ^= 1;
        assert!(err(&b).contains("header checksum mismatch"), "{}", err(&b));
        let mut b = f.image.clone();
        b[12..16].copy_from_slice(&(MAX_RUNS + 1).to_le_bytes());
        assert!(err(&b).contains("more than"), "{}", err(&b));
        let mut b = f.image.clone();
        b[f.header.packed_start() as usize - 1] = 1;
        assert!(
            err(&b).contains("padding after the header is not zero"),
            "{}",
            err(&b)
        );
    }

    proptest! {
        #[test]
        fn damaged_images_are_refused_and_never_panic(at in 0usize..4096 + 24576, xor in 1u8..=255) {
            let f = fixture();
            let mut b = f.image.clone();
            let at = at % b.len();
            b[at] ^= xor;
            let t = MemDisk::new(8 * MIB, 0);
            prop_assert!(run_apply(&f, &b, &t).is_err());
            prop_assert_eq!(t.writes(), 0, "nothing is written from a damaged image");
        }
    }

    #[test]
    fn writes_the_disk_in_a_power_safe_order() {
        let f = fixture();
        let t = MemDisk::new(6 * MIB, 0xAA);
        let mut seen = Vec::new();
        let r = apply(
            &mut Cursor::new(&f.image),
            &mut Cursor::new(&f.root),
            &mut Cursor::new(&f.verity),
            &t,
            6 * MIB,
            |p| seen.push(p),
        )
        .unwrap();
        let d = t.data.borrow();
        assert_eq!(differing_run(&f, &d), None, "the target holds every run");
        // Outside any run (the tail of a root slot): left as it was.
        assert!(d[2 * MIB as usize + 300_000..3 * MIB as usize]
            .iter()
            .all(|b| *b == 0xAA));
        assert!(
            d[4 * MIB as usize..5 * MIB as usize]
                .iter()
                .all(|b| *b == 0xAA),
            "beyond the image, only the last MiB is wiped"
        );
        assert!(d[5 * MIB as usize..].iter().all(|b| *b == 0));
        assert_eq!(r.runs, 7);
        assert_eq!(r.bytes_written, 4096 + 8192 + 300_000 + 8192 + 16896);
        assert_eq!(r.bytes_zeroed, 2 * MIB + 2 * MIB - 4096 - 8192);

        let log = t.log.borrow();
        let first_write = log.iter().position(|o| matches!(o, Op::Write(..))).unwrap();
        assert!(
            log[..first_write]
                .iter()
                .filter(|o| matches!(o, Op::Zero(..)))
                .count()
                == 4,
            "{log:?}"
        );
        assert_eq!(
            log[first_write - 1],
            Op::Sync,
            "wiping is durable before any write"
        );
        assert_eq!(log[0], Op::Zero(0, MIB));
        assert_eq!(log[1], Op::Zero(5 * MIB, MIB));
        // The last two writes: the backup table, then the primary.
        let writes: Vec<&Op> = log.iter().filter(|o| matches!(o, Op::Write(..))).collect();
        let n = writes.len();
        assert_eq!(writes[n - 1], &Op::Write(0, 4096));
        assert_eq!(writes[n - 2], &Op::Write(4 * MIB - 16896, 16896));
        let table_start = log
            .iter()
            .position(|o| *o == Op::Write(4 * MIB - 16896, 16896))
            .unwrap();
        // Contents are synced and read back before the first table write.
        assert_eq!(log[table_start - 2..table_start], [Op::Sync, Op::DropCache]);
        assert_eq!(&log[log.len() - 2..], &[Op::Sync, Op::DropCache]);

        // Progress only grows, and ends complete.
        assert!(seen
            .windows(2)
            .all(|w| w[0].done <= w[1].done && w[0].total == w[1].total));
        let last = seen.last().unwrap();
        assert_eq!(last.done, last.total);
        assert_eq!(seen[0].phase, Phase::Checking);
        assert!(seen.iter().any(|p| p.phase == Phase::WritingTable));
    }

    #[test]
    fn refuses_before_writing() {
        let f = fixture();
        let expect = |t: &MemDisk, r: Result<Report, InstallError>, want: &str| {
            let msg = r.unwrap_err().to_string();
            assert!(msg.contains(want), "wanted {want:?} in {msg:?}");
            assert_eq!(t.writes(), 0, "{msg}");
        };
        let t = MemDisk::new(4 * MIB - 512, 0);
        let r = run_apply(&f, &f.image, &t);
        expect(
            &t,
            r,
            &format!(
                "the target disk is {} bytes, but the image needs {}",
                4 * MIB - 512,
                4 * MIB
            ),
        );

        let t = MemDisk::new(8 * MIB, 0);
        let r = run_apply(&f, &f.image[..f.image.len() - 1], &t);
        expect(&t, r, "is truncated");
        let mut long = f.image.clone();
        long.push(0);
        let r = run_apply(&f, &long, &t);
        expect(&t, r, "trailing data");

        let r = apply(
            &mut Cursor::new(&f.image),
            &mut Cursor::new(&f.root[..1000]),
            &mut Cursor::new(&f.verity),
            &t,
            8 * MIB,
            |_| {},
        );
        expect(
            &t,
            r,
            "the root source is 1000 bytes, but the image needs 300000",
        );
        let r = apply(
            &mut Cursor::new(&f.image),
            &mut Cursor::new(&f.root),
            &mut Cursor::new(&[0u8; 10]),
            &t,
            8 * MIB,
            |_| {},
        );
        expect(&t, r, "the verity source is 10 bytes");

        let mut bad = f.image.clone();
        let at = f.header.packed_start() as usize + 5000;
        bad[at] ^= 0x40;
        let r = run_apply(&f, &bad, &t);
        expect(
            &t,
            r,
            &format!("install image bytes for disk offset {}", MIB),
        );

        let mut other = f.header.digest();
        other[0] ^= 1;
        let r = apply_pinned(
            &mut Cursor::new(&f.image),
            &other,
            &mut Cursor::new(&f.root),
            &mut Cursor::new(&f.verity),
            &t,
            8 * MIB,
            |_| {},
        );
        expect(&t, r, "not the one this boot expects");
        let t2 = MemDisk::new(8 * MIB, 0);
        apply_pinned(
            &mut Cursor::new(&f.image),
            &f.header.digest(),
            &mut Cursor::new(&f.root),
            &mut Cursor::new(&f.verity),
            &t2,
            8 * MIB,
            |_| {},
        )
        .unwrap();
    }

    #[test]
    fn a_bad_root_source_stops_before_the_tables() {
        let f = fixture();
        let mut root = f.root.clone();
        root[123_456] ^= 1;
        let t = MemDisk::new(6 * MIB, 0xAA);
        let msg = apply(
            &mut Cursor::new(&f.image),
            &mut Cursor::new(&root),
            &mut Cursor::new(&f.verity),
            &t,
            6 * MIB,
            |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains(&format!("root bytes for disk offset {}", 2 * MIB)),
            "{msg}"
        );
        let d = t.data.borrow();
        assert!(
            d[..PRIMARY_GPT_BYTES as usize].iter().all(|b| *b == 0),
            "no primary table"
        );
    }

    #[test]
    fn read_back_catches_a_disk_that_drops_writes() {
        let f = fixture();
        let mut t = MemDisk::new(6 * MIB, 0xAA);
        t.drop_writes_at = Some(3 * MIB + 100);
        let msg = run_apply(&f, &f.image, &t).unwrap_err().to_string();
        assert!(
            msg.contains(&format!("at disk offset {}", 3 * MIB)) && msg.contains("differs"),
            "{msg}"
        );
        assert!(
            t.data.borrow()[..4096].iter().all(|b| *b == 0),
            "tables are not written after a failed read-back"
        );
    }

    #[test]
    fn an_interrupted_install_has_no_table_without_its_contents() {
        let f = fixture();
        let total = {
            let t = MemDisk::new(6 * MIB, 0xAA);
            run_apply(&f, &f.image, &t).unwrap();
            let w: u64 = t
                .log
                .borrow()
                .iter()
                .map(|o| if let Op::Write(_, n) = o { *n } else { 0 })
                .sum();
            w
        };
        let table_start = total - 4096 - 16896;
        let mut cuts: Vec<u64> = (0..total).step_by(7919).collect();
        cuts.extend([
            table_start - 1,
            table_start,
            table_start + 1,
            total - 4096,
            total - 4096 + 600,
            total - 1,
        ]);
        for cut in cuts {
            let t = MemDisk::new(6 * MIB, 0xAA);
            t.budget.set(cut);
            let msg = run_apply(&f, &f.image, &t).unwrap_err().to_string();
            assert!(msg.contains("power cut"), "{msg}");
            let d = t.data.borrow();
            // The protective MBR's signature is the last thing to land.
            let primary = d[..4096] == f.disk[..4096];
            if cut < total - 4096 + 512 {
                assert!(
                    d[510..512] != [0x55, 0xAA],
                    "cut at {cut}: a protective MBR"
                );
            }
            if primary {
                assert_eq!(
                    differing_run(&f, &d),
                    None,
                    "cut at {cut}: a table without its contents"
                );
            }
        }
    }
}
