//! The UKI: systemd-stub with os-release, cmdline, optional dtb and uname,
//! initramfs and kernel added as PE sections, following ukify's order and
//! layout rules (FORMATS.md).
//!
//! Done in Rust over a small, bounds-checked PE/COFF subset, so a build needs
//! neither ukify nor objcopy. The output is unsigned; sign it afterwards.

use std::io::{self, Write};

const SECTION_HEADER: usize = 40;
const DEBUG_ENTRY: usize = 28;
const PAGE: u32 = 4096;
const MIN_FILE_ALIGN: u32 = 512;
/// The PE limit for FileAlignment; 64 KiB pages are also the largest
/// SectionAlignment a UEFI stub uses.
const MAX_ALIGN: u64 = 0x10000;

const SCN_CNT_CODE: u32 = 0x20;
const SCN_CNT_INITIALIZED_DATA: u32 = 0x40;
const SCN_MEM_READ: u32 = 0x4000_0000;

const DIR_SECURITY: usize = 4;
const DIR_DEBUG: usize = 6;

// Offsets into the COFF file header.
const COFF_NUMBER_OF_SECTIONS: usize = 2;
const COFF_SYMBOL_TABLE: usize = 8;
const COFF_NUMBER_OF_SYMBOLS: usize = 12;
const COFF_SIZE_OF_OPTIONAL_HEADER: usize = 16;
const COFF_LEN: usize = 20;

// Offsets into the optional header; PE32 and PE32+ agree on all of these.
const OPT_SIZE_OF_CODE: usize = 4;
const OPT_SIZE_OF_INITIALIZED_DATA: usize = 8;
const OPT_SECTION_ALIGNMENT: usize = 32;
const OPT_FILE_ALIGNMENT: usize = 36;
const OPT_SIZE_OF_IMAGE: usize = 56;
const OPT_SIZE_OF_HEADERS: usize = 60;
const OPT_CHECKSUM: usize = 64;

/// What goes into a UKI. `stub` is `linux{x64,aa64,arm}.efi.stub`; `linux`
/// must be an EFI-stub kernel (it carries a PE header).
#[derive(Debug, Clone, Copy)]
pub struct UkiParts<'a> {
    pub stub: &'a [u8],
    pub linux: &'a [u8],
    pub initrd: &'a [u8],
    pub cmdline: &'a str,
    pub osrel: &'a str,
    pub uname: Option<&'a str>,
    pub dtb: Option<&'a [u8]>,
}

/// One entry of a PE section table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionInfo {
    pub name: String,
    pub virtual_address: u32,
    pub virtual_size: u32,
    pub raw_offset: u32,
    pub raw_size: u32,
}

impl SectionInfo {
    /// Bytes the section takes in memory; a zero VirtualSize means the raw
    /// size.
    fn mapped_size(&self) -> u32 {
        if self.virtual_size == 0 {
            self.raw_size
        } else {
            self.virtual_size
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UkiError {
    #[error("not a usable PE image: {0}")]
    Malformed(String),
    #[error("systemd-stub: {0}; pass linux{{x64,aa64,arm}}.efi.stub from Debian's systemd-boot-efi, unsigned")]
    Stub(String),
    #[error(
        "kernel: {0}; the kernel must be built with CONFIG_EFI_STUB so that it carries a PE header"
    )]
    Kernel(String),
    #[error("the kernel cmdline contains a NUL byte; remove it")]
    CmdlineNul,
    #[error("the UKI would be over 4 GiB ({0}); a PE image cannot hold it, shrink the initramfs")]
    TooBig(&'static str),
    #[error("writing the UKI: {0}")]
    Io(#[from] io::Error),
}

fn bytes(b: &[u8], off: usize, len: usize) -> Option<&[u8]> {
    b.get(off..off.checked_add(len)?)
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes(b, off, 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes(b, off, 4)?.try_into().ok()?))
}

fn put(b: &mut [u8], off: usize, v: &[u8]) -> Result<(), UkiError> {
    let end = off
        .checked_add(v.len())
        .ok_or_else(|| UkiError::Stub("header offset overflows".into()))?;
    b.get_mut(off..end)
        .ok_or_else(|| UkiError::Stub(format!("header field at {off:#x} lies outside the file")))?
        .copy_from_slice(v);
    Ok(())
}

fn put_u16(b: &mut [u8], off: usize, v: u16) -> Result<(), UkiError> {
    put(b, off, &v.to_le_bytes())
}

fn put_u32(b: &mut [u8], off: usize, v: u32) -> Result<(), UkiError> {
    put(b, off, &v.to_le_bytes())
}

fn round_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align) * align
}

/// The COFF Machine field of a PE image (0x8664 x64, 0xaa64 AA64, 0x1c2
/// ARM Thumb-2), or None when `pe` is not a PE image.
pub fn pe_machine(pe: &[u8]) -> Option<u16> {
    let h = parse(pe).ok()?;
    u16_at(pe, h.coff)
}

/// Where the parts of a PE image's headers are, all checked to lie inside it.
#[derive(Debug)]
struct Headers {
    coff: usize,
    opt: usize,
    dirs: usize,
    n_dirs: usize,
    table: usize,
    sections: Vec<SectionInfo>,
}

impl Headers {
    fn opt_u32(&self, pe: &[u8], field: usize) -> u32 {
        // parse() checked that the fixed optional header fields are present.
        u32_at(pe, self.opt + field).unwrap_or(0)
    }

    fn dir(&self, pe: &[u8], i: usize) -> Option<(u32, u32)> {
        if i >= self.n_dirs {
            return None;
        }
        Some((
            u32_at(pe, self.dirs + i * 8)?,
            u32_at(pe, self.dirs + i * 8 + 4)?,
        ))
    }

    /// The file offset holding `rva`, through the section that maps it.
    fn rva_to_offset(&self, rva: u32) -> Option<usize> {
        self.sections.iter().find_map(|s| {
            let within = rva.checked_sub(s.virtual_address)?;
            (within < s.raw_size).then(|| s.raw_offset as usize + within as usize)
        })
    }
}

fn parse(pe: &[u8]) -> Result<Headers, String> {
    if bytes(pe, 0, 2) != Some(b"MZ") {
        return Err("no MZ signature".into());
    }
    let lfanew = u32_at(pe, 0x3c).ok_or("truncated DOS header")? as usize;
    if bytes(pe, lfanew, 4) != Some(b"PE\0\0") {
        return Err(format!("no PE signature at e_lfanew {lfanew:#x}"));
    }
    let coff = lfanew + 4;
    bytes(pe, coff, COFF_LEN).ok_or("truncated COFF header")?;
    let n_sections = u16_at(pe, coff + COFF_NUMBER_OF_SECTIONS).unwrap_or(0) as usize;
    let opt_len = u16_at(pe, coff + COFF_SIZE_OF_OPTIONAL_HEADER).unwrap_or(0) as usize;
    let opt = coff + COFF_LEN;
    bytes(pe, opt, opt_len).ok_or("optional header runs past the end of the file")?;
    let dirs_at = match u16_at(pe, opt) {
        Some(0x10b) => 96,
        Some(0x20b) => 112,
        Some(m) => return Err(format!("unknown optional header magic {m:#x}")),
        None => return Err("no optional header".into()),
    };
    if opt_len < dirs_at {
        return Err(format!("optional header is {opt_len} bytes, too short"));
    }
    let n_dirs = u32_at(pe, opt + dirs_at - 4).unwrap_or(0) as usize;
    if n_dirs > (opt_len - dirs_at) / 8 {
        return Err(format!(
            "{n_dirs} data directories do not fit the optional header"
        ));
    }
    let table = opt + opt_len;
    let raw = bytes(pe, table, n_sections * SECTION_HEADER)
        .ok_or("section table runs past the end of the file")?;
    let sections = raw
        .chunks_exact(SECTION_HEADER)
        .map(|h| {
            let name = &h[..8];
            let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(8)];
            let at = |o: usize| u32_at(h, o).unwrap_or(0);
            SectionInfo {
                name: String::from_utf8_lossy(name).into_owned(),
                virtual_size: at(8),
                virtual_address: at(12),
                raw_size: at(16),
                raw_offset: at(20),
            }
        })
        .collect();
    Ok(Headers {
        coff,
        opt,
        dirs: opt + dirs_at,
        n_dirs,
        table,
        sections,
    })
}

/// Lists the section table of a PE image.
pub fn inspect(pe: &[u8]) -> Result<Vec<SectionInfo>, UkiError> {
    parse(pe).map(|h| h.sections).map_err(UkiError::Malformed)
}

/// The contents of the first section called `name`, without the file
/// alignment padding. `None` if there is no such section or it lies outside
/// the file.
pub fn section<'a>(pe: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let h = parse(pe).ok()?;
    let s = h.sections.iter().find(|s| s.name == name)?;
    let len = s.mapped_size().min(s.raw_size);
    bytes(pe, s.raw_offset as usize, len as usize)
}

/// The kernel command line stored in a UKI's `.cmdline`, without its NUL.
pub fn cmdline(pe: &[u8]) -> Option<&str> {
    let raw = section(pe, ".cmdline")?;
    let raw = &raw[..raw.iter().position(|&c| c == 0).unwrap_or(raw.len())];
    std::str::from_utf8(raw).ok()
}

fn power_of_two(v: u32, what: &str) -> Result<u64, UkiError> {
    if v.is_power_of_two() {
        Ok(v as u64)
    } else {
        Err(UkiError::Stub(format!(
            "{what} {v:#x} is not a power of two"
        )))
    }
}

fn to_u32(v: u64, what: &'static str) -> Result<u32, UkiError> {
    u32::try_from(v).map_err(|_| UkiError::TooBig(what))
}

/// Shifts every file offset at or after `from` by `delta`: section data, the
/// COFF symbol table and debug directory payloads. Called after `delta`
/// zero bytes were inserted at `from`, with `h` describing the old layout.
fn shift_file_offsets(body: &mut [u8], h: &Headers, from: u32, delta: u32) -> Result<(), UkiError> {
    let moved = |v: u32| -> Result<u32, UkiError> {
        if v != 0 && v >= from {
            v.checked_add(delta).ok_or(UkiError::TooBig("stub"))
        } else {
            Ok(v)
        }
    };
    for (i, s) in h.sections.iter().enumerate() {
        put_u32(
            body,
            h.table + i * SECTION_HEADER + 20,
            moved(s.raw_offset)?,
        )?;
    }
    let symtab = u32_at(body, h.coff + COFF_SYMBOL_TABLE).unwrap_or(0);
    put_u32(body, h.coff + COFF_SYMBOL_TABLE, moved(symtab)?)?;
    if let Some((rva, size)) = h
        .dir(body, DIR_DEBUG)
        .filter(|&(rva, size)| rva != 0 && size != 0)
    {
        let at = h.rva_to_offset(rva).ok_or_else(|| {
            UkiError::Stub(format!("debug directory at RVA {rva:#x} is in no section"))
        })?;
        let at = moved(at as u32)? as usize;
        for i in 0..size as usize / DEBUG_ENTRY {
            let field = at + i * DEBUG_ENTRY + 24;
            let ptr = u32_at(body, field).ok_or_else(|| {
                UkiError::Stub("debug directory runs past the end of the file".into())
            })?;
            put_u32(body, field, moved(ptr)?)?;
        }
    }
    Ok(())
}

/// Builds the UKI and writes it to `out`. The result is deterministic: the
/// same parts give the same bytes.
pub fn assemble(parts: &UkiParts, out: &mut impl Write) -> Result<(), UkiError> {
    let h = parse(parts.stub).map_err(UkiError::Stub)?;
    let stub = parts.stub;
    let kh = parse(parts.linux).map_err(UkiError::Kernel)?;
    let kernel_image_size = kh.opt_u32(parts.linux, OPT_SIZE_OF_IMAGE);
    if parts.cmdline.contains('\0') {
        return Err(UkiError::CmdlineNul);
    }

    let sa = power_of_two(h.opt_u32(stub, OPT_SECTION_ALIGNMENT), "SectionAlignment")?;
    let fa = power_of_two(h.opt_u32(stub, OPT_FILE_ALIGNMENT), "FileAlignment")?;
    if fa > MAX_ALIGN || sa > MAX_ALIGN {
        return Err(UkiError::Stub(format!(
            "alignments over {MAX_ALIGN:#x} are not supported"
        )));
    }
    let file_align = fa.max(MIN_FILE_ALIGN as u64);
    let virt_align = sa.max(PAGE as u64);
    let soh = h.opt_u32(stub, OPT_SIZE_OF_HEADERS) as u64;

    let mut cmdline = parts.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    let mut new: Vec<(&'static str, &[u8])> =
        vec![(".osrel", parts.osrel.as_bytes()), (".cmdline", &cmdline)];
    if let Some(dtb) = parts.dtb {
        new.push((".dtb", dtb));
    }
    if let Some(uname) = parts.uname {
        new.push((".uname", uname.as_bytes()));
    }
    new.push((".initrd", parts.initrd));
    new.push((".linux", parts.linux));

    for s in &h.sections {
        if new.iter().any(|(n, _)| *n == s.name) {
            return Err(UkiError::Stub(format!(
                "it already has a {} section, so it is a UKI, not a bare stub",
                s.name
            )));
        }
        if s.raw_size != 0 && bytes(stub, s.raw_offset as usize, s.raw_size as usize).is_none() {
            return Err(UkiError::Stub(format!(
                "section {} runs past the end of the file",
                s.name
            )));
        }
    }
    let with_data = || h.sections.iter().filter(|s| s.raw_size != 0);
    let sections_end = with_data()
        .map(|s| s.raw_offset as u64 + s.raw_size as u64)
        .max()
        .unwrap_or(0)
        .max(soh);
    let mut body = stub.to_vec();

    // The result is signed later, so drop any signature the stub carries.
    if let Some((off, _)) = h.dir(stub, DIR_SECURITY).filter(|&(o, s)| o != 0 || s != 0) {
        if (off as u64) < sections_end || off as usize > body.len() {
            return Err(UkiError::Stub(format!(
                "certificate table at {off:#x} overlaps the image"
            )));
        }
        body.truncate(off as usize);
        put(&mut body, h.dirs + DIR_SECURITY * 8, &[0; 8])?;
    }

    // The COFF symbol table is debug data no loader reads, and it would sit
    // between the stub's sections and ours. Keep it only when section names
    // point into its string table.
    let symtab = u32_at(stub, h.coff + COFF_SYMBOL_TABLE).unwrap_or(0);
    if symtab != 0
        && symtab as u64 >= sections_end
        && !h.sections.iter().any(|s| s.name.starts_with('/'))
    {
        body.truncate(body.len().min(symtab as usize));
        put_u32(&mut body, h.coff + COFF_SYMBOL_TABLE, 0)?;
        put_u32(&mut body, h.coff + COFF_NUMBER_OF_SYMBOLS, 0)?;
    }

    // Make room for the new section headers, moving all data down if needed.
    let n_total = h.sections.len() + new.len();
    let n_total_u16 =
        u16::try_from(n_total).map_err(|_| UkiError::Stub("too many sections".into()))?;
    let table_end = (h.table + n_total * SECTION_HEADER) as u64;
    let first_raw = with_data()
        .map(|s| s.raw_offset as u64)
        .min()
        .unwrap_or(body.len() as u64);
    let mut new_soh = soh;
    if table_end > soh.min(first_raw) {
        let old_table_end = (h.table + h.sections.len() * SECTION_HEADER) as u64;
        if first_raw % fa != 0 || soh > first_raw || old_table_end > first_raw {
            return Err(UkiError::Stub(
                "no room for more section headers, and its layout is too odd to grow them".into(),
            ));
        }
        let grown = round_up(table_end, file_align);
        let delta = round_up(grown.saturating_sub(first_raw), file_align);
        new_soh = grown.max(soh);
        let first_va = h
            .sections
            .iter()
            .map(|s| s.virtual_address as u64)
            .filter(|&v| v != 0)
            .min()
            .unwrap_or(u64::MAX);
        if round_up(new_soh, sa) > first_va {
            return Err(UkiError::Stub(format!("no room for more section headers: they would need {new_soh:#x} bytes but the first section is mapped at {first_va:#x}")));
        }
        let (from, delta) = (to_u32(first_raw, "stub")?, to_u32(delta, "stub")?);
        if delta != 0 {
            let at = (from as usize).min(body.len());
            body.splice(at..at, std::iter::repeat_n(0u8, delta as usize));
            shift_file_offsets(&mut body, &h, from, delta)?;
        }
    }

    // Lay out the new sections after everything the stub maps and stores.
    let mapped_end = h
        .sections
        .iter()
        .map(|s| s.virtual_address as u64 + s.mapped_size() as u64)
        .max()
        .unwrap_or(0);
    let mut va = round_up(mapped_end.max(new_soh), virt_align);
    let mut ptr = round_up(body.len() as u64, file_align);
    let data_start = ptr;
    let (mut code, mut data) = (
        h.opt_u32(stub, OPT_SIZE_OF_CODE) as u64,
        h.opt_u32(stub, OPT_SIZE_OF_INITIALIZED_DATA) as u64,
    );
    for (i, &(name, content)) in new.iter().enumerate() {
        let len = content.len() as u64;
        let raw = round_up(len, file_align);
        let (vsize, flags) = if name == ".linux" {
            // The kernel runs in place and needs room for its own bss.
            code += raw;
            (
                len.max(kernel_image_size as u64),
                SCN_CNT_CODE | SCN_MEM_READ,
            )
        } else {
            data += raw;
            (len, SCN_CNT_INITIALIZED_DATA | SCN_MEM_READ)
        };
        let mut hdr = [0u8; SECTION_HEADER];
        hdr[..name.len()].copy_from_slice(name.as_bytes());
        put_u32(&mut hdr, 8, to_u32(vsize, name)?)?;
        put_u32(&mut hdr, 12, to_u32(va, name)?)?;
        put_u32(&mut hdr, 16, to_u32(raw, name)?)?;
        put_u32(&mut hdr, 20, to_u32(ptr, name)?)?;
        put_u32(&mut hdr, 36, flags)?;
        put(
            &mut body,
            h.table + (h.sections.len() + i) * SECTION_HEADER,
            &hdr,
        )?;
        va = round_up(va + vsize, virt_align);
        ptr += raw;
    }
    to_u32(ptr, "file")?;

    put_u16(&mut body, h.coff + COFF_NUMBER_OF_SECTIONS, n_total_u16)?;
    put_u32(&mut body, h.opt + OPT_SIZE_OF_IMAGE, to_u32(va, "image")?)?;
    put_u32(
        &mut body,
        h.opt + OPT_SIZE_OF_HEADERS,
        to_u32(new_soh, "headers")?,
    )?;
    put_u32(
        &mut body,
        h.opt + OPT_SIZE_OF_CODE,
        u32::try_from(code).unwrap_or(u32::MAX),
    )?;
    put_u32(
        &mut body,
        h.opt + OPT_SIZE_OF_INITIALIZED_DATA,
        u32::try_from(data).unwrap_or(u32::MAX),
    )?;
    put_u32(&mut body, h.opt + OPT_CHECKSUM, 0)?;

    out.write_all(&body)?;
    zeros(out, data_start - body.len() as u64)?;
    for (_, content) in &new {
        out.write_all(content)?;
        zeros(
            out,
            round_up(content.len() as u64, file_align) - content.len() as u64,
        )?;
    }
    Ok(())
}

fn zeros(out: &mut impl Write, mut n: u64) -> io::Result<()> {
    const Z: [u8; 4096] = [0; 4096];
    while n > 0 {
        let k = n.min(Z.len() as u64) as usize;
        out.write_all(&Z[..k])?;
        n -= k as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_testkit::{checker, checker_file};
    use proptest::prelude::*;
    use std::process::Command;

    const STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";
    const KERNEL_IMAGE_SIZE: u32 = 0x80_0000;

    fn real_stub() -> Option<Vec<u8>> {
        let stub = checker_file(STUB, "systemd-boot-efi")?;
        Some(std::fs::read(stub).unwrap())
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// A minimal PE image: SectionAlignment 4096, FileAlignment 512, the
    /// given SizeOfHeaders and sections laid out after the headers.
    fn fake_pe(
        pe32plus: bool,
        machine: u16,
        soh: u32,
        image_size: Option<u32>,
        sections: &[(&str, u32, &[u8])],
    ) -> Vec<u8> {
        let opt_len: usize = if pe32plus { 240 } else { 224 };
        let mut b = vec![0u8; 0x40];
        b[..2].copy_from_slice(b"MZ");
        b[0x3c..0x40].copy_from_slice(&0x40u32.to_le_bytes());
        b.extend_from_slice(b"PE\0\0");
        let (coff, opt) = (b.len(), b.len() + 20);
        let table = opt + opt_len;
        b.resize(table + sections.len() * SECTION_HEADER, 0);
        assert!(b.len() <= soh as usize, "fake PE headers do not fit");
        b.resize(soh as usize, 0);
        let w16 = |b: &mut Vec<u8>, o: usize, v: u16| b[o..o + 2].copy_from_slice(&v.to_le_bytes());
        let w32 = |b: &mut Vec<u8>, o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_le_bytes());
        w16(&mut b, coff, machine);
        w16(&mut b, coff + 2, sections.len() as u16);
        w16(&mut b, coff + 16, opt_len as u16);
        w16(&mut b, coff + 18, if pe32plus { 0x206 } else { 0x10e });
        w16(&mut b, opt, if pe32plus { 0x20b } else { 0x10b });
        w32(&mut b, opt + 16, sections.first().map_or(0, |s| s.1));
        w32(&mut b, opt + 32, 0x1000);
        w32(&mut b, opt + 36, 0x200);
        w32(&mut b, opt + 60, soh);
        w16(&mut b, opt + 68, 10);
        w32(&mut b, opt + if pe32plus { 108 } else { 92 }, 16);
        let mut end = 0;
        for (i, (name, va, data)) in sections.iter().enumerate() {
            let h = table + i * SECTION_HEADER;
            let ptr = b.len() as u32;
            let raw = round_up(data.len() as u64, 512) as u32;
            b[h..h + name.len()].copy_from_slice(name.as_bytes());
            w32(&mut b, h + 8, data.len() as u32);
            w32(&mut b, h + 12, *va);
            w32(&mut b, h + 16, raw);
            w32(&mut b, h + 20, ptr);
            w32(&mut b, h + 36, 0x6000_0020);
            b.extend_from_slice(data);
            b.resize((ptr + raw) as usize, 0);
            end = va + data.len() as u32;
        }
        w32(
            &mut b,
            opt + 56,
            image_size.unwrap_or(round_up(end as u64, 0x1000) as u32),
        );
        b
    }

    /// Stands in for a bzImage: what the assembler reads of a kernel is its
    /// PE header, and SizeOfImage there is larger than the file, like a real
    /// kernel's with its bss.
    fn fake_kernel() -> Vec<u8> {
        fake_pe(
            true,
            0x8664,
            0x1000,
            Some(KERNEL_IMAGE_SIZE),
            &[
                (".setup", 0x1000, &pattern(0x2e00, 1)),
                (".text", 0x4000, &pattern(20_001, 2)),
            ],
        )
    }

    /// A stub-like PE whose headers have room for no more section headers.
    fn full_stub(pe32plus: bool) -> Vec<u8> {
        let machine = if pe32plus { 0x8664 } else { 0x14c };
        fake_pe(
            pe32plus,
            machine,
            0x200,
            None,
            &[
                (".text", 0x1000, &pattern(3000, 3)),
                (".data", 0x2000, &pattern(700, 4)),
                (
                    ".sdmagic",
                    0x3000,
                    b"#### LoaderInfo: systemd-stub test ####",
                ),
            ],
        )
    }

    struct Owned {
        stub: Vec<u8>,
        linux: Vec<u8>,
        initrd: Vec<u8>,
        dtb: Option<Vec<u8>>,
    }

    const CMDLINE: &str = "console=ttyS0 kiln.test=1";
    const OSREL: &str = "ID=kiln\nNAME=kiln\nVERSION_ID=1\n";
    const UNAME: &str = "6.1.0-kiln";

    impl Owned {
        fn new(stub: Vec<u8>) -> Owned {
            Owned {
                stub,
                linux: fake_kernel(),
                initrd: pattern(3001, 5),
                dtb: None,
            }
        }
        fn parts(&self) -> UkiParts<'_> {
            UkiParts {
                stub: &self.stub,
                linux: &self.linux,
                initrd: &self.initrd,
                cmdline: CMDLINE,
                osrel: OSREL,
                uname: Some(UNAME),
                dtb: self.dtb.as_deref(),
            }
        }
        fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            assemble(&self.parts(), &mut out).unwrap();
            out
        }
    }

    /// (name, virtual size, contents) of the sections the assembler adds.
    fn added(o: &Owned) -> Vec<(&'static str, u32, Vec<u8>)> {
        let mut cmdline = CMDLINE.as_bytes().to_vec();
        cmdline.push(0);
        let mut v = vec![
            (".osrel", OSREL.len() as u32, OSREL.as_bytes().to_vec()),
            (".cmdline", cmdline.len() as u32, cmdline),
        ];
        if let Some(dtb) = &o.dtb {
            v.push((".dtb", dtb.len() as u32, dtb.clone()));
        }
        v.push((".uname", UNAME.len() as u32, UNAME.as_bytes().to_vec()));
        v.push((".initrd", o.initrd.len() as u32, o.initrd.clone()));
        v.push((".linux", KERNEL_IMAGE_SIZE, o.linux.clone()));
        v
    }

    /// The section table the assembler should produce, worked out from the
    /// rules in FORMATS.md rather than from the assembler's code.
    fn expected(o: &Owned, stub_shift: u32) -> Vec<SectionInfo> {
        let stub = inspect(&o.stub).unwrap();
        let mut want: Vec<SectionInfo> = stub
            .iter()
            .map(|s| SectionInfo {
                raw_offset: s.raw_offset + stub_shift,
                ..s.clone()
            })
            .collect();
        let mut va = stub
            .iter()
            .map(|s| s.virtual_address + s.virtual_size)
            .max()
            .unwrap()
            .next_multiple_of(4096);
        let mut off = stub
            .iter()
            .map(|s| s.raw_offset + s.raw_size + stub_shift)
            .max()
            .unwrap()
            .next_multiple_of(512);
        for (name, vsize, data) in added(o) {
            let raw = (data.len() as u32).next_multiple_of(512);
            want.push(SectionInfo {
                name: name.into(),
                virtual_address: va,
                virtual_size: vsize,
                raw_offset: off,
                raw_size: raw,
            });
            va = (va + vsize).next_multiple_of(4096);
            off += raw;
        }
        want
    }

    fn opt_field(pe: &[u8], field: usize) -> u32 {
        let h = parse(pe).unwrap();
        h.opt_u32(pe, field)
    }

    /// (name, size, vma, file offset) of each section, as `objdump -h` sees it.
    fn objdump(pe: &[u8], format: &str) -> Option<Vec<(String, u64, u64, u64)>> {
        let objdump = checker("objdump", "binutils")?;
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("uki.efi");
        std::fs::write(&f, pe).unwrap();
        let out = Command::new(objdump).arg("-h").arg(&f).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "objdump -h failed: {}{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains(&format!("file format {format}")),
            "objdump did not read it as {format}:\n{text}"
        );
        let hex = |s: &str| u64::from_str_radix(s, 16).unwrap();
        Some(
            text.lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .filter(|w| w.len() >= 6 && w[0].parse::<u32>().is_ok())
                .map(|w| (w[1].to_string(), hex(w[2]), hex(w[3]), hex(w[5])))
                .collect(),
        )
    }

    /// objdump shows a PE section's size as the smaller of its virtual and
    /// raw sizes.
    fn check_objdump(pe: &[u8], want: &[SectionInfo], format: &str) {
        let Some(got) = objdump(pe, format) else {
            return;
        };
        let want: Vec<_> = want
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    s.virtual_size.min(s.raw_size) as u64,
                    s.virtual_address as u64,
                    s.raw_offset as u64,
                )
            })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn objdump_lists_the_sections_in_ukify_order() {
        let Some(stub) = real_stub() else { return };
        let o = Owned::new(stub);
        let out = o.build();
        let want = expected(&o, 0);
        assert_eq!(inspect(&out).unwrap(), want);
        check_objdump(&out, &want, "pei-x86-64");
    }

    #[test]
    fn a_dtb_goes_after_the_cmdline() {
        let Some(stub) = real_stub() else { return };
        let mut o = Owned::new(stub);
        o.dtb = Some(pattern(1234, 6));
        let out = o.build();
        let want = expected(&o, 0);
        let names: Vec<_> = want
            .iter()
            .skip(inspect(&o.stub).unwrap().len())
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(
            names,
            [".osrel", ".cmdline", ".dtb", ".uname", ".initrd", ".linux"]
        );
        assert_eq!(inspect(&out).unwrap(), want);
        assert_eq!(section(&out, ".dtb"), o.dtb.as_deref());
    }

    #[test]
    fn sections_read_back() {
        let Some(stub) = real_stub() else { return };
        let o = Owned::new(stub);
        let out = o.build();
        assert_eq!(
            section(&out, ".cmdline").unwrap(),
            b"console=ttyS0 kiln.test=1\0"
        );
        assert_eq!(cmdline(&out), Some(CMDLINE));
        for (name, _, data) in added(&o) {
            let got = section(&out, name).unwrap();
            assert_eq!(&got[..data.len()], &data[..], "{name}");
        }
        for s in inspect(&o.stub).unwrap() {
            assert_eq!(
                section(&out, &s.name),
                section(&o.stub, &s.name),
                "stub section {} changed",
                s.name
            );
        }
    }

    #[test]
    fn layout_follows_the_alignment_rules() {
        let Some(stub) = real_stub() else { return };
        let o = Owned::new(stub);
        let out = o.build();
        let secs = inspect(&out).unwrap();
        let n_stub = inspect(&o.stub).unwrap().len();
        let mut prev_end = secs[..n_stub]
            .iter()
            .map(|s| s.virtual_address + s.virtual_size)
            .max()
            .unwrap();
        let mut file_end = secs[..n_stub]
            .iter()
            .map(|s| s.raw_offset + s.raw_size)
            .max()
            .unwrap();
        for (s, (name, _, data)) in secs[n_stub..].iter().zip(added(&o)) {
            assert_eq!(s.name, name);
            assert_eq!(s.raw_offset % 512, 0, "{name}");
            assert!(s.raw_offset >= file_end, "{name} overlaps earlier data");
            assert_eq!(
                s.raw_size as usize,
                data.len().next_multiple_of(512),
                "{name}"
            );
            assert_eq!(s.virtual_address % 4096, 0, "{name}");
            assert_eq!(s.virtual_address, prev_end.next_multiple_of(4096), "{name}");
            prev_end = s.virtual_address + s.virtual_size;
            file_end = s.raw_offset + s.raw_size;
        }
        assert_eq!(
            out.len(),
            file_end as usize,
            "the file ends with the last section"
        );
        let size_of_image = opt_field(&out, OPT_SIZE_OF_IMAGE);
        assert_eq!(size_of_image, prev_end.next_multiple_of(4096));
        assert_eq!(size_of_image % opt_field(&out, OPT_SECTION_ALIGNMENT), 0);
        assert_eq!(opt_field(&out, OPT_CHECKSUM), 0);
        assert_eq!(
            opt_field(&out, OPT_SIZE_OF_HEADERS),
            opt_field(&o.stub, OPT_SIZE_OF_HEADERS)
        );
        let h = parse(&out).unwrap();
        assert_eq!(h.dir(&out, DIR_SECURITY), Some((0, 0)));
        assert_eq!(
            secs.iter()
                .find(|s| s.name == ".linux")
                .unwrap()
                .virtual_size,
            KERNEL_IMAGE_SIZE
        );
    }

    #[test]
    fn deterministic() {
        let Some(stub) = real_stub() else { return };
        let o = Owned::new(stub);
        assert_eq!(o.build(), o.build());
    }

    /// sbverify parses the PE (headers, section table, data directories) the
    /// way the signing tools do, and finds no signature yet.
    #[test]
    fn sbverify_reads_it_unsigned() {
        let Some(stub) = real_stub() else { return };
        if checker("sbverify", "sbsigntool").is_none() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("uki.efi");
        std::fs::write(&f, Owned::new(stub).build()).unwrap();
        let out = Command::new("sbverify")
            .arg("--list")
            .arg(&f)
            .output()
            .unwrap();
        let text = kiln_testkit::output_text(&out);
        assert!(
            text.contains("No signature table present"),
            "sbverify --list said:\n{text}"
        );
        for bad in ["Can't open", "warning", "error", "invalid"] {
            assert!(!text.contains(bad), "sbverify --list said:\n{text}");
        }
    }

    /// The assembled UKI can be Authenticode-signed and verified.
    #[test]
    fn sbsign_signs_it() {
        let Some(stub) = real_stub() else { return };
        if !(checker("sbsign", "sbsigntool").is_some()
            && checker("sbverify", "sbsigntool").is_some()
            && checker("openssl", "openssl").is_some())
        {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| d.path().join(n);
        std::fs::write(p("uki.efi"), Owned::new(stub).build()).unwrap();
        let run = |cmd: &mut Command| {
            let out = cmd.output().unwrap();
            let text = kiln_testkit::output_text(&out);
            assert!(out.status.success(), "{cmd:?} failed:\n{text}");
            text
        };
        run(Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=kiln test/",
                "-days",
                "1",
                "-keyout",
            ])
            .arg(p("k.pem"))
            .arg("-out")
            .arg(p("c.pem")));
        run(Command::new("sbsign")
            .arg("--key")
            .arg(p("k.pem"))
            .arg("--cert")
            .arg(p("c.pem"))
            .arg("--output")
            .arg(p("signed.efi"))
            .arg(p("uki.efi")));
        let listed = run(Command::new("sbverify").arg("--list").arg(p("signed.efi")));
        assert!(listed.contains("signature 1"), "{listed}");
        let verified = run(Command::new("sbverify")
            .arg("--cert")
            .arg(p("c.pem"))
            .arg(p("signed.efi")));
        assert!(verified.contains("Signature verification OK"), "{verified}");
    }

    /// A stub whose headers are full gets them grown by one file alignment
    /// unit, with all its data moved down; PE32 (armhf stubs) and PE32+.
    #[test]
    fn grows_full_headers() {
        for (pe32plus, format) in [(true, "pei-x86-64"), (false, "pei-i386")] {
            let o = Owned::new(full_stub(pe32plus));
            let out = o.build();
            assert_eq!(opt_field(&out, OPT_SIZE_OF_HEADERS), 0x400);
            let want = expected(&o, 0x200);
            assert_eq!(inspect(&out).unwrap(), want);
            check_objdump(&out, &want, format);
            for s in inspect(&o.stub).unwrap() {
                assert_eq!(
                    section(&out, &s.name),
                    section(&o.stub, &s.name),
                    "stub section {} changed",
                    s.name
                );
            }
            assert_eq!(cmdline(&out), Some(CMDLINE));
        }
    }

    /// A signed stub loses its signature; the UKI is signed as a whole later.
    #[test]
    fn drops_the_stubs_signature() {
        let mut stub = full_stub(true);
        let cert_at = stub.len() as u32;
        stub.extend_from_slice(&[0x5a; 0x300]);
        let dirs = parse(&stub).unwrap().dirs;
        stub[dirs + 32..dirs + 36].copy_from_slice(&cert_at.to_le_bytes());
        stub[dirs + 36..dirs + 40].copy_from_slice(&0x300u32.to_le_bytes());
        let o = Owned::new(stub);
        let out = o.build();
        let h = parse(&out).unwrap();
        assert_eq!(h.dir(&out, DIR_SECURITY), Some((0, 0)));
        let osrel = inspect(&out)
            .unwrap()
            .into_iter()
            .find(|s| s.name == ".osrel")
            .unwrap();
        assert_eq!(
            osrel.raw_offset,
            cert_at + 0x200,
            "the certificate table was kept"
        );
    }

    /// The real stub's COFF symbol table is dropped, so the signed image
    /// has no unhashed gap between the stub's sections and ours.
    #[test]
    fn drops_the_coff_symbol_table() {
        let Some(stub) = real_stub() else { return };
        let out = Owned::new(stub).build();
        let coff = parse(&out).unwrap().coff;
        assert_eq!(u32_at(&out, coff + COFF_SYMBOL_TABLE), Some(0));
        assert_eq!(u32_at(&out, coff + COFF_NUMBER_OF_SYMBOLS), Some(0));
    }

    #[test]
    fn rejects_bad_input() {
        let o = Owned::new(full_stub(true));
        let mut sink = Vec::new();
        for cut in [0, 1, 0x40, 0x44, 0x60, 0x150, 0x1f0] {
            let p = UkiParts {
                stub: &o.stub[..cut],
                ..o.parts()
            };
            assert!(
                matches!(assemble(&p, &mut sink), Err(UkiError::Stub(_))),
                "stub cut at {cut}"
            );
        }
        let p = UkiParts {
            linux: b"not a kernel",
            ..o.parts()
        };
        let err = assemble(&p, &mut sink).unwrap_err();
        assert!(matches!(err, UkiError::Kernel(_)));
        assert!(err.to_string().contains("CONFIG_EFI_STUB"), "{err}");
        let p = UkiParts {
            cmdline: "a\0b",
            ..o.parts()
        };
        assert!(matches!(assemble(&p, &mut sink), Err(UkiError::CmdlineNul)));
        let uki = o.build();
        let p = UkiParts {
            stub: &uki,
            ..o.parts()
        };
        let err = assemble(&p, &mut sink).unwrap_err();
        assert!(
            err.to_string().contains("already has a .osrel section"),
            "{err}"
        );
        assert!(matches!(inspect(b"MZ"), Err(UkiError::Malformed(_))));
        assert_eq!(section(b"", ".linux"), None);
    }

    #[test]
    fn the_real_stub_parses() {
        let Some(stub) = real_stub() else { return };
        let names: Vec<_> = inspect(&stub)
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert!(names.contains(&".sdmagic".to_string()), "{names:?}");
    }

    proptest! {
        #[test]
        fn inspect_never_panics(b in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = inspect(&b);
            let _ = section(&b, ".cmdline");
        }

        /// Corrupting a valid stub's headers gives errors, never panics
        /// or huge allocations.
        #[test]
        fn corrupt_stubs_never_panic(edits in proptest::collection::vec((0usize..0x200, any::<u8>()), 1..8), pe32plus in any::<bool>()) {
            let mut o = Owned::new(full_stub(pe32plus));
            for (at, v) in edits {
                o.stub[at] = v;
            }
            let _ = inspect(&o.stub);
            let _ = section(&o.stub, ".text");
            let mut out = Vec::new();
            if assemble(&o.parts(), &mut out).is_ok() {
                prop_assert!(inspect(&out).is_ok());
            }
        }
    }
}
