//! The initramfs: a newc cpio of a rootfs tree, zstd-compressed.
//!
//! Reproducible: paths in sorted order, a fixed mtime, inode numbers from a
//! counter, owners from the tree.

use crate::tree::{Content, Kind, Tree};
use cpio::newc::{Builder, ModeFileType};
use std::io::{self, Read, Write};

/// Passes writes through and drops flushes: the `cpio` crate flushes after
/// every entry, which would end a zstd block each time (a larger archive,
/// and one that depends on the crate's flushing).
struct NoFlush<W>(W);

impl<W: Write> Write for NoFlush<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes the tree as an uncompressed newc archive (the `cpio` crate's
/// writer), with the tree's owners and modes, inode numbers from a counter
/// and one `mtime`. Host files are streamed.
pub fn write_cpio(tree: &Tree, mtime: u64, w: &mut impl Write) -> io::Result<()> {
    let mtime = u32::try_from(mtime).unwrap_or(u32::MAX);
    let mut w = NoFlush(w);
    let mut ino = 1u32;
    for (path, e) in tree.iter() {
        if path == "/" {
            continue;
        }
        ino += 1;
        let b = Builder::new(&path[1..]).ino(ino).uid(e.uid).gid(e.gid).mtime(mtime);
        match &e.kind {
            Kind::Dir => b.mode(e.mode).set_mode_file_type(ModeFileType::Directory).nlink(2).write(&mut w, 0).finish()?,
            Kind::Symlink(t) => {
                let mut x = b.mode(0o777).set_mode_file_type(ModeFileType::Symlink).write(&mut w, t.len() as u32);
                x.write_all(t.as_bytes())?;
                x.finish()?
            }
            Kind::CharDev(maj, min) => b.mode(e.mode).set_mode_file_type(ModeFileType::Char).rdev_major(*maj).rdev_minor(*min).write(&mut w, 0).finish()?,
            Kind::File(c) => {
                let too_big = || io::Error::new(io::ErrorKind::InvalidInput, format!("{path} is over 4 GiB, too big for newc"));
                let b = b.mode(e.mode).set_mode_file_type(ModeFileType::Regular);
                match c {
                    Content::Bytes(data) => {
                        let mut x = b.write(&mut w, u32::try_from(data.len()).map_err(|_| too_big())?);
                        x.write_all(data)?;
                        x.finish()?
                    }
                    Content::Host(p) => {
                        let named = |err: io::Error| io::Error::new(err.kind(), format!("{}: {err}", p.display()));
                        let f = std::fs::File::open(p).map_err(named)?;
                        let len = f.metadata().map_err(named)?.len();
                        let mut x = b.write(&mut w, u32::try_from(len).map_err(|_| too_big())?);
                        // The crate pads and finishes whatever was written:
                        // a file that shrank would leave a short entry.
                        if io::copy(&mut f.take(len), &mut x).map_err(named)? != len {
                            return Err(named(io::Error::new(io::ErrorKind::UnexpectedEof, "it became shorter while being archived")));
                        }
                        x.finish()?
                    }
                }
            }
        };
    }
    cpio::newc::trailer(&mut w)?;
    Ok(())
}

/// The length of [`write_cpio`]'s archive of `tree`, from the entries'
/// sizes (host files are not read).
pub fn newc_len(tree: &Tree) -> io::Result<u64> {
    let entry = |name: &str, size: u64| (110 + name.len() as u64 + 1).div_ceil(4) * 4 + size.div_ceil(4) * 4;
    let mut n = 0;
    for (path, e) in tree.iter() {
        if path == "/" {
            continue;
        }
        let size = match &e.kind {
            Kind::Symlink(t) => t.len() as u64,
            Kind::File(Content::Bytes(b)) => b.len() as u64,
            Kind::File(Content::Host(p)) => std::fs::metadata(p).map_err(|err| io::Error::new(err.kind(), format!("{}: {err}", p.display())))?.len(),
            Kind::Dir | Kind::CharDev(..) => 0,
        };
        n += entry(&path[1..], size);
    }
    Ok(n + entry("TRAILER!!!", 0))
}

/// zstd's largest block, and the window the stored frame declares.
const STORED_BLOCK: usize = 128 << 10;

/// The length of [`write_stored`]'s output for an archive of `archive`
/// bytes: the frame header and a 3-byte header per block.
pub fn stored_len(archive: u64) -> u64 {
    6 + 3 * archive.div_ceil(STORED_BLOCK as u64).max(1) + archive
}

/// Writes the tree as a newc archive inside a zstd frame of stored (raw)
/// blocks: a zstd stream that `zstd -d` and the kernel read, for contents
/// compressed already (a squashfs), at the cost of a copy rather than of
/// compressing again.
pub fn write_stored(tree: &Tree, mtime: u64, w: impl Write) -> io::Result<()> {
    let mut f = StoredFrame::new(w)?;
    write_cpio(tree, mtime, &mut f)?;
    f.finish()
}

/// A zstd frame of raw blocks: magic, a frame header with no content size
/// or checksum and a 128 KiB window, then blocks of at most 128 KiB, each
/// with its 3-byte header (last-block bit, type 0 = raw, size).
struct StoredFrame<W: Write> {
    inner: W,
    buf: Vec<u8>,
}

impl<W: Write> StoredFrame<W> {
    fn new(mut inner: W) -> io::Result<Self> {
        // Frame_Header_Descriptor 0: no checksum, no dictionary, not single
        // segment; Window_Descriptor 0x38: 2^(10 + 7) bytes.
        inner.write_all(&[0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x38])?;
        Ok(StoredFrame { inner, buf: Vec::with_capacity(2 * STORED_BLOCK) })
    }

    fn block(&mut self, len: usize, last: bool) -> io::Result<()> {
        let header = (len as u32) << 3 | u32::from(last);
        self.inner.write_all(&header.to_le_bytes()[..3])?;
        self.inner.write_all(&self.buf[..len])?;
        self.buf.drain(..len);
        Ok(())
    }

    fn finish(mut self) -> io::Result<()> {
        while self.buf.len() > STORED_BLOCK {
            self.block(STORED_BLOCK, false)?;
        }
        let n = self.buf.len();
        self.block(n, true)?;
        self.inner.flush()
    }
}

impl<W: Write> Write for StoredFrame<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        // Keep the last block back: the frame's last block says so.
        while self.buf.len() > STORED_BLOCK {
            self.block(STORED_BLOCK, false)?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One entry of a newc archive, from [`list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub mode: u32,
    /// Where its data is in the bytes given to [`list`].
    pub data: std::ops::Range<usize>,
}

/// The entries of one or more newc archives end to end (as the kernel
/// reads an initramfs: zero padding between them is skipped), trailers left
/// out. For checking what an initramfs holds, decompressed.
pub fn list(bytes: &[u8]) -> Result<Vec<Member>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        if bytes[at] == 0 {
            at += 1;
            continue;
        }
        let head = bytes.get(at..at + 110).ok_or_else(|| format!("a header cut short at byte {at}"))?;
        if &head[..6] != b"070701" {
            return Err(format!("no newc header at byte {at}"));
        }
        let field = |i: usize| {
            std::str::from_utf8(&head[6 + i * 8..14 + i * 8]).ok().and_then(|s| u32::from_str_radix(s, 16).ok()).ok_or_else(|| format!("a bad header field at byte {}", at + 6 + i * 8))
        };
        let (mode, size, namesize) = (field(1)?, field(6)? as usize, field(11)? as usize);
        let name_end = at + 110 + namesize;
        let name = bytes.get(at + 110..name_end.saturating_sub(1)).ok_or_else(|| format!("a name cut short at byte {at}"))?;
        let name = String::from_utf8_lossy(name).into_owned();
        let data = name_end.div_ceil(4) * 4;
        if data + size > bytes.len() {
            return Err(format!("{name}: its {size} bytes run past the end"));
        }
        if name != "TRAILER!!!" {
            out.push(Member { name, mode, data: data..data + size });
        }
        at = (data + size).div_ceil(4) * 4;
    }
    Ok(out)
}

/// Writes the tree as a zstd-compressed newc archive. Level 19 and one
/// thread keep the output identical across machines.
pub fn write(tree: &Tree, mtime: u64, w: impl Write) -> io::Result<()> {
    let mut enc = zstd::stream::write::Encoder::new(w, 19)?;
    enc.include_checksum(true)?;
    write_cpio(tree, mtime, &mut enc)?;
    enc.finish()?.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S_IFDIR: u32 = 0o040000;
    const S_IFREG: u32 = 0o100000;

    fn sample() -> Tree {
        let mut t = Tree::new();
        t.file("/etc/hostname", "node\n", 0o644).unwrap();
        t.symlink("/init", "sbin/kiln-init").unwrap();
        t.insert("/dev/console", Kind::CharDev(5, 1), 0o600).unwrap();
        t.file("/sbin/kiln-init", vec![0x7f, b'E', b'L', b'F', 1, 2, 3], 0o755).unwrap();
        t
    }

    /// `cpio -t` (GNU cpio, a tool nobody here wrote) lists what we wrote.
    #[test]
    fn gnu_cpio_lists_it() {
        if kiln_testkit::checker("cpio", "cpio").is_none() {
            return;
        }
        let mut buf = Vec::new();
        write_cpio(&sample(), 0, &mut buf).unwrap();
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a.cpio");
        std::fs::write(&f, &buf).unwrap();
        let out = std::process::Command::new("sh").arg("-c").arg(format!("cpio -itv < {}", f.display())).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let listing = String::from_utf8_lossy(&out.stdout);
        for want in ["etc/hostname", "init -> sbin/kiln-init", "dev/console", "sbin/kiln-init"] {
            assert!(listing.contains(want), "missing {want} in\n{listing}");
        }
        // Extract and compare contents.
        let x = d.path().join("x");
        std::fs::create_dir(&x).unwrap();
        let ok = std::process::Command::new("sh").arg("-c").arg(format!("cd {} && cpio -id --no-absolute-filenames < {} 2>/dev/null; cat etc/hostname", x.display(), f.display())).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&ok.stdout), "node\n");
    }

    /// zstd (a tool nobody here wrote) reads the stored frame back; after
    /// a compressed one, as in a PXE initramfs, it reads both.
    #[test]
    fn stored_frames_are_zstd_streams() {
        let d = tempfile::tempdir().unwrap();
        let big = d.path().join("big");
        std::fs::write(&big, kiln_testkit::noise(11, 300_000)).unwrap();
        let mut t = Tree::new();
        t.host_file("/kiln/root.squashfs", big.clone(), 0o444).unwrap();
        t.file("/kiln/root.sizes", "x\n", 0o444).unwrap();
        let mut both = Vec::new();
        write(&sample(), 0, &mut both).unwrap();
        let mut stored = Vec::new();
        write_stored(&t, 0, &mut stored).unwrap();
        assert_eq!(stored.len() as u64, stored_len(newc_len(&t).unwrap()));
        both.extend_from_slice(&stored);
        let mut empty = Vec::new();
        write_stored(&Tree::new(), 0, &mut empty).unwrap();
        both.extend_from_slice(&empty);
        let f = d.path().join("i.cpio.zst");
        std::fs::write(&f, &both).unwrap();
        if kiln_testkit::checker("zstd", "zstd").is_none() {
            return;
        }
        let out = std::process::Command::new("zstd").arg("-dc").arg(&f).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let members = list(&out.stdout).unwrap();
        let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        assert!(names.contains(&"sbin/kiln-init") && names.ends_with(&["kiln", "kiln/root.sizes", "kiln/root.squashfs"]), "{names:?}");
        let m = members.iter().find(|m| m.name == "kiln/root.squashfs").unwrap();
        assert_eq!(out.stdout[m.data.clone()], std::fs::read(&big).unwrap()[..]);
        assert!(list(&out.stdout[..out.stdout.len() - 7]).is_err(), "a cut archive is an error");
    }

    #[test]
    fn newc_len_is_the_archive_length() {
        let d = tempfile::tempdir().unwrap();
        let mut t = sample();
        for n in [0usize, 1, 3, 4, 4097] {
            let p = d.path().join(format!("f{n}"));
            std::fs::write(&p, vec![7u8; n]).unwrap();
            t.host_file(&format!("/kiln/f{n}"), p, 0o444).unwrap();
        }
        let mut buf = Vec::new();
        write_cpio(&t, 0, &mut buf).unwrap();
        assert_eq!(newc_len(&t).unwrap(), buf.len() as u64);
    }

    #[test]
    fn deterministic() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        write(&sample(), 0, &mut a).unwrap();
        write(&sample(), 0, &mut b).unwrap();
        assert_eq!(a, b);
    }

    /// Parses a newc archive back: (name, mode, data) in order.
    fn parse(mut b: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let total = b.len();
        loop {
            assert_eq!(&b[..6], b"070701");
            let f = |i: usize| u32::from_str_radix(std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).unwrap(), 16).unwrap() as usize;
            let (mode, size, namesize) = (f(1), f(6), f(11));
            let name = String::from_utf8(b[110..110 + namesize - 1].to_vec()).unwrap();
            let off = (110 + namesize + 3) & !3;
            let data = b[off..off + size].to_vec();
            let next = (off + size + 3) & !3;
            assert_eq!((total - b.len()) % 4, 0);
            if name == "TRAILER!!!" {
                return out;
            }
            out.push((name, mode as u32, data));
            b = &b[next..];
        }
    }

    proptest! {
        #[test]
        fn round_trip(files in proptest::collection::btree_map("[a-z]{1,8}(/[a-z]{1,8}){0,2}", proptest::collection::vec(any::<u8>(), 0..300), 1..12)) {
            let mut t = Tree::new();
            let mut want = Vec::new();
            for (p, data) in &files {
                let path = format!("/{p}");
                if t.file(&path, data.clone(), 0o644).is_ok() {
                    want.push((path, data.clone()));
                }
            }
            let mut buf = Vec::new();
            write_cpio(&t, 7, &mut buf).unwrap();
            let got = parse(&buf);
            for (p, data) in want {
                if let Some((_, mode, d)) = got.iter().find(|(n, _, _)| format!("/{n}") == p) {
                    if *mode & S_IFREG != 0 && *mode & S_IFDIR == 0 {
                        prop_assert_eq!(d, &data);
                    }
                }
            }
        }
    }
}
