//! The initramfs: a newc cpio of a rootfs tree, zstd-compressed.
//!
//! Reproducible: paths in sorted order, a fixed mtime, inode numbers from a
//! counter, owners from the tree.

use crate::tree::{Content, Kind, Tree};
use std::io::{self, Read, Write};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

fn pad4(w: &mut impl Write, n: usize) -> io::Result<()> {
    let p = (4 - n % 4) % 4;
    w.write_all(&[0u8; 3][..p])
}

#[allow(clippy::too_many_arguments)]
fn header(w: &mut impl Write, ino: u32, mode: u32, uid: u32, gid: u32, nlink: u32, mtime: u32, size: u32, rdev: (u32, u32), name: &str) -> io::Result<()> {
    let namesize = name.len() + 1;
    write!(
        w,
        "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
        0, 0, rdev.0, rdev.1, 0
    )?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad4(w, 110 + namesize)
}

/// Writes the tree as an uncompressed newc archive.
pub fn write_cpio(tree: &Tree, mtime: u64, w: &mut impl Write) -> io::Result<()> {
    let mtime = u32::try_from(mtime).unwrap_or(u32::MAX);
    let mut ino = 1u32;
    for (path, e) in tree.iter() {
        if path == "/" {
            continue;
        }
        let name = &path[1..];
        ino += 1;
        match &e.kind {
            Kind::Dir => header(w, ino, S_IFDIR | e.mode, e.uid, e.gid, 2, mtime, 0, (0, 0), name)?,
            Kind::Symlink(t) => {
                header(w, ino, S_IFLNK | 0o777, e.uid, e.gid, 1, mtime, t.len() as u32, (0, 0), name)?;
                w.write_all(t.as_bytes())?;
                pad4(w, t.len())?;
            }
            Kind::CharDev(maj, min) => header(w, ino, S_IFCHR | e.mode, e.uid, e.gid, 1, mtime, 0, (*maj, *min), name)?,
            Kind::File(c) => {
                let data = match c {
                    Content::Bytes(b) => b.clone(),
                    Content::Host(p) => {
                        let mut v = Vec::new();
                        std::fs::File::open(p).and_then(|mut f| f.read_to_end(&mut v)).map_err(|err| io::Error::new(err.kind(), format!("{}: {err}", p.display())))?;
                        v
                    }
                };
                let size = u32::try_from(data.len()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{path} is over 4 GiB, too big for newc")))?;
                header(w, ino, S_IFREG | e.mode, e.uid, e.gid, 1, mtime, size, (0, 0), name)?;
                w.write_all(&data)?;
                pad4(w, data.len())?;
            }
        }
    }
    header(w, 0, 0, 0, 0, 1, 0, 0, (0, 0), "TRAILER!!!")
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
