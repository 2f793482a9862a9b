//! Just enough ELF reading to check a binary for the image: its machine,
//! whether it is static (no program interpreter), and what its dynamic
//! section asks the loader for (`DT_NEEDED`, `DT_RUNPATH`, `DT_RPATH`).
//! Little-endian ELF32 and ELF64 only: all our targets are little-endian.

use std::os::unix::fs::FileExt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    pub machine: u16,
    pub class64: bool,
    /// PT_INTERP present: the binary needs a dynamic loader.
    pub interp: Option<String>,
}

/// What the dynamic loader needs to run an ELF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dynamic {
    pub info: ElfInfo,
    /// e_type: 1 relocatable (kernel modules), 2 executable, 3 shared object
    /// or PIE, 4 core.
    pub kind: u16,
    pub needed: Vec<String>,
    pub runpath: Option<String>,
    pub rpath: Option<String>,
}

pub const ET_EXEC: u16 = 2;
pub const ET_DYN: u16 = 3;

impl Dynamic {
    /// Executables and shared objects: what the loader maps.
    pub fn is_loadable(&self) -> bool {
        matches!(self.kind, ET_EXEC | ET_DYN)
    }
}

pub fn machine_name(m: u16) -> &'static str {
    match m {
        3 => "i386",
        40 => "arm (armv7)",
        62 => "x86-64 (amd64)",
        183 => "aarch64 (arm64)",
        _ => "another architecture",
    }
}

/// Random access to the bytes of a file, so that a large binary on the host
/// is not read whole.
pub trait Source {
    fn read(&self, off: u64, len: usize) -> Option<Vec<u8>>;
}

impl Source for [u8] {
    fn read(&self, off: u64, len: usize) -> Option<Vec<u8>> {
        let o = usize::try_from(off).ok()?;
        self.get(o..o.checked_add(len)?).map(<[u8]>::to_vec)
    }
}

impl Source for std::fs::File {
    fn read(&self, off: u64, len: usize) -> Option<Vec<u8>> {
        let mut v = vec![0; len];
        self.read_exact_at(&mut v, off).ok()?;
        Some(v)
    }
}

/// True if the bytes start like an ELF file (of any kind or byte order).
pub fn is_elf(head: &[u8]) -> bool {
    head.starts_with(b"\x7fELF")
}

/// Parses the ELF header and program headers. `None` if not a little-endian
/// ELF file.
pub fn inspect(b: &[u8]) -> Option<ElfInfo> {
    dynamic(b).map(|d| d.info)
}

// Dynamic section tags.
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;
/// Bigger string tables than this are damage, not binaries.
const MAX_STRTAB: u64 = 64 << 20;

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    b.get(o..o + 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    b.get(o..o + 8).and_then(|s| s.try_into().ok()).map(u64::from_le_bytes)
}
/// A word of the file's class: 8 bytes in ELF64, 4 in ELF32.
fn word_at(b: &[u8], o: usize, class64: bool) -> Option<u64> {
    if class64 {
        u64_at(b, o)
    } else {
        u32_at(b, o).map(u64::from)
    }
}

/// Parses the header, the program headers and the dynamic section (through
/// the PT_LOAD segments, so stripped files work). `None` if the file is not
/// a little-endian ELF or is damaged.
pub fn dynamic<S: Source + ?Sized>(src: &S) -> Option<Dynamic> {
    let ident = src.read(0, 16)?;
    if !is_elf(&ident) || ident[5] != 1 {
        return None;
    }
    let class64 = match ident[4] {
        1 => false,
        2 => true,
        _ => return None,
    };
    let h = src.read(0, if class64 { 64 } else { 52 })?;
    let kind = u16_at(&h, 16)?;
    let machine = u16_at(&h, 18)?;
    let (phoff, phentsize, phnum) = if class64 { (u64_at(&h, 32)?, u16_at(&h, 54)?, u16_at(&h, 56)?) } else { (u64::from(u32_at(&h, 28)?), u16_at(&h, 42)?, u16_at(&h, 44)?) };
    if usize::from(phentsize) < if class64 { 56 } else { 32 } && phnum > 0 {
        return None;
    }
    let phs = src.read(phoff, usize::from(phentsize) * usize::from(phnum))?;
    let mut interp = None;
    let mut dyn_seg = None;
    // (file offset, vaddr, file size) of each PT_LOAD.
    let mut loads = Vec::new();
    for i in 0..usize::from(phnum) {
        let p = i * usize::from(phentsize);
        let ty = u32_at(&phs, p)?;
        let (off, vaddr, filesz) = if class64 { (u64_at(&phs, p + 8)?, u64_at(&phs, p + 16)?, u64_at(&phs, p + 32)?) } else { (u64::from(u32_at(&phs, p + 4)?), u64::from(u32_at(&phs, p + 8)?), u64::from(u32_at(&phs, p + 16)?)) };
        match ty {
            1 => loads.push((off, vaddr, filesz)),
            2 => dyn_seg = Some((off, filesz)),
            3 => {
                let s = src.read(off, usize::try_from(filesz.min(4096)).ok()?)?;
                interp = Some(String::from_utf8_lossy(&s).trim_end_matches('\0').to_string());
            }
            _ => {}
        }
    }
    let info = ElfInfo { machine, class64, interp };
    let mut d = Dynamic { info, kind, needed: Vec::new(), runpath: None, rpath: None };
    let Some((off, size)) = dyn_seg else { return Some(d) };
    let ent = if class64 { 16 } else { 8 };
    let table = src.read(off, usize::try_from(size.min(1 << 20)).ok()?)?;
    let (mut strtab, mut strsz) = (None, 0);
    let mut refs = Vec::new();
    for e in table.chunks_exact(ent) {
        let tag = word_at(e, 0, class64)?;
        let val = word_at(e, ent / 2, class64)?;
        match tag {
            DT_NULL => break,
            DT_STRTAB => strtab = Some(val),
            DT_STRSZ => strsz = val,
            DT_NEEDED | DT_RPATH | DT_RUNPATH => refs.push((tag, val)),
            _ => {}
        }
    }
    if refs.is_empty() {
        return Some(d);
    }
    let strtab = strtab?;
    // DT_STRTAB is an address: find the segment that holds it.
    let (seg_off, seg_vaddr, _) = loads.iter().find(|(_, v, sz)| strtab >= *v && strtab - v < *sz)?;
    let str_off = seg_off.checked_add(strtab - seg_vaddr)?;
    if strsz == 0 || strsz > MAX_STRTAB {
        return None;
    }
    let strs = src.read(str_off, usize::try_from(strsz).ok()?)?;
    let string = |i: u64| -> Option<String> {
        let rest = strs.get(usize::try_from(i).ok()?..)?;
        let end = rest.iter().position(|&c| c == 0)?;
        Some(String::from_utf8_lossy(&rest[..end]).into_owned())
    };
    for (tag, val) in refs {
        let s = string(val)?;
        match tag {
            DT_NEEDED => d.needed.push(s),
            DT_RPATH => d.rpath = Some(s),
            _ => d.runpath = Some(s),
        }
    }
    Some(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_testkit::tiny_elf32;

    #[test]
    fn host_binaries() {
        let sh = std::fs::read("/bin/sh").unwrap();
        let i = inspect(&sh).unwrap();
        assert!(i.interp.is_some(), "/bin/sh on Debian is dynamic");
        assert!(inspect(b"#!/bin/sh\n").is_none());
        // Truncated before the program headers: not usable, and no panic.
        assert!(inspect(&sh[..60]).is_none());
    }

    #[test]
    fn dynamic_section_of_host_binaries() {
        // Read through the file, as the image check does, not whole.
        let ls = dynamic(&std::fs::File::open("/bin/ls").unwrap()).unwrap();
        assert!(ls.is_loadable());
        assert!(ls.needed.iter().any(|n| n == "libc.so.6"), "{:?}", ls.needed);
        assert_eq!(ls.info.class64, cfg!(target_pointer_width = "64"));
        let whole = dynamic(std::fs::read("/bin/ls").unwrap().as_slice()).unwrap();
        assert_eq!(whole, ls);
        let libc = ["/lib/x86_64-linux-gnu/libc.so.6", "/lib/aarch64-linux-gnu/libc.so.6"].into_iter().find(|p| std::path::Path::new(p).exists()).unwrap();
        let libc = dynamic(&std::fs::File::open(libc).unwrap()).unwrap();
        assert_eq!(libc.kind, ET_DYN);
        assert!(libc.needed.iter().any(|n| n.starts_with("ld-linux")), "{:?}", libc.needed);
    }


    #[test]
    fn hand_built_elf32() {
        let b = tiny_elf32("/lib/ld-linux-armhf.so.3", &["libseccomp.so.2", "libc.so.6"], Some("$ORIGIN/../lib"));
        let d = dynamic(b.as_slice()).unwrap();
        assert_eq!(d.info, ElfInfo { machine: 40, class64: false, interp: Some("/lib/ld-linux-armhf.so.3".into()) });
        assert_eq!(d.kind, ET_EXEC);
        assert_eq!(d.needed, ["libseccomp.so.2", "libc.so.6"]);
        assert_eq!(d.runpath.as_deref(), Some("$ORIGIN/../lib"));
        assert_eq!(d.rpath, None);
        // Cut anywhere: never a panic, and no half answer past the headers.
        for n in 0..b.len() {
            let _ = dynamic(&b[..n]);
        }
    }

    proptest::proptest! {
        /// Any bytes after a real header, or any change to a real file:
        /// an answer or `None`, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(class in 1u8..3, rest in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600), at in 0usize..400, byte in proptest::prelude::any::<u8>()) {
            let mut v = vec![0x7f, b'E', b'L', b'F', class, 1];
            v.extend(&rest);
            let _ = dynamic(v.as_slice());
            let mut b = tiny_elf32("/lib/ld-linux-armhf.so.3", &["libc.so.6"], Some("$ORIGIN"));
            let i = at % b.len();
            b[i] = byte;
            let _ = dynamic(b.as_slice());
        }
    }

    #[test]
    fn garbage_never_panics() {
        for n in 0..200 {
            let mut v = b"\x7fELF\x02\x01".to_vec();
            v.extend((0..n).map(|i| (i * 37 % 251) as u8));
            let _ = inspect(&v);
            let mut v = b"\x7fELF\x01\x01".to_vec();
            v.extend((0..n).map(|i| (i * 53 % 241) as u8));
            let _ = dynamic(v.as_slice());
        }
    }
}
