//! Just enough ELF reading to check a binary for the image: its machine, and
//! whether it is static (no program interpreter).

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    pub machine: u16,
    pub class64: bool,
    /// PT_INTERP present: the binary needs a dynamic loader.
    pub interp: Option<String>,
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

/// Parses the ELF header and program headers. `None` if not a little-endian
/// ELF file (all our targets are little-endian).
pub fn inspect(b: &[u8]) -> Option<ElfInfo> {
    if b.len() < 52 || &b[..4] != b"\x7fELF" || b[5] != 1 {
        return None;
    }
    let class64 = match b[4] {
        1 => false,
        2 => true,
        _ => return None,
    };
    let u16_at = |o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let u32_at = |o: usize| b.get(o..o + 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]));
    let u64_at = |o: usize| b.get(o..o + 8).map(|s| u64::from_le_bytes(s.try_into().unwrap_or([0; 8])));
    let machine = u16_at(18)?;
    let (phoff, phentsize, phnum) = if class64 {
        (u64_at(32)? as usize, u16_at(54)? as usize, u16_at(56)? as usize)
    } else {
        (u32_at(28)? as usize, u16_at(42)? as usize, u16_at(44)? as usize)
    };
    let mut interp = None;
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(ph)? == 3 {
            let (off, size) = if class64 { (u64_at(ph + 8)? as usize, u64_at(ph + 32)? as usize) } else { (u32_at(ph + 4)? as usize, u32_at(ph + 16)? as usize) };
            let s = b.get(off..off.checked_add(size)?)?;
            interp = Some(String::from_utf8_lossy(s).trim_end_matches('\0').to_string());
        }
    }
    Some(ElfInfo { machine, class64, interp })
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn garbage_never_panics() {
        for n in 0..200 {
            let mut v = b"\x7fELF\x02\x01".to_vec();
            v.extend((0..n).map(|i| (i * 37 % 251) as u8));
            let _ = inspect(&v);
        }
    }
}
