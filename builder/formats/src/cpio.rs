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
