//! What a PXE node's RAM root should be, and the RAM that takes.
//!
//! A PXE initramfs is two zstd frames, each a cpio archive: stage 1
//! (compressed), then, in stored (uncompressed) blocks, [`RAM_ROOT_SIZES`]
//! followed by the root squashfs and its hash tree at [`RAM_ROOT`] and
//! [`RAM_VERITY`]. With too little RAM the kernel fails to unpack the root
//! ("Initramfs unpacking failed: write error") and still starts stage 1.
//! The sizes, unpacked before the root, let stage 1 tell a cut-short root
//! from a damaged one, and say how much RAM the node needs.
//!
//! ```text
//! root_bytes=254803968
//! verity_bytes=2011136
//! initramfs_bytes=270532608
//! ```
//!
//! [`RAM_ROOT`]: crate::layout::RAM_ROOT
//! [`RAM_VERITY`]: crate::layout::RAM_VERITY
//! [`RAM_ROOT_SIZES`]: crate::layout::RAM_ROOT_SIZES

const MIB: u64 = 1 << 20;

/// Room for the kernel, its allocations and stage 1's own files, beyond
/// what the root takes.
pub const RAM_MARGIN_BYTES: u64 = 192 * MIB;

/// The sizes in [`RAM_ROOT_SIZES`](crate::layout::RAM_ROOT_SIZES).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRoot {
    /// The squashfs file at `RAM_ROOT`.
    pub root_bytes: u64,
    /// The hash tree file at `RAM_VERITY`.
    pub verity_bytes: u64,
    /// The whole initramfs file (both frames).
    pub initramfs_bytes: u64,
}

const KEYS: [&str; 3] = ["root_bytes", "verity_bytes", "initramfs_bytes"];

impl RamRoot {
    pub fn to_file(&self) -> String {
        format!("root_bytes={}\nverity_bytes={}\ninitramfs_bytes={}\n", self.root_bytes, self.verity_bytes, self.initramfs_bytes)
    }

    /// Parses the file: each key once, decimal values (leading zeros are
    /// fine), blank lines ignored. The error names the line.
    pub fn parse(text: &str) -> Result<RamRoot, String> {
        let mut v: [Option<u64>; 3] = [None; 3];
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(format!("line {n}: {line:?} is not key=value"));
            };
            let (key, value) = (key.trim(), value.trim());
            let Some(k) = KEYS.iter().position(|k| *k == key) else {
                return Err(format!("line {n}: unknown key {key:?} (expected {})", KEYS.join(", ")));
            };
            if v[k].is_some() {
                return Err(format!("line {n}: {key} is given twice"));
            }
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("line {n}: {key}={value:?} is not a number of bytes"));
            }
            let x = value.parse::<u64>().map_err(|_| format!("line {n}: {key}={value} is too large"))?;
            if x == 0 {
                return Err(format!("line {n}: {key} is 0"));
            }
            v[k] = Some(x);
        }
        let get = |k: usize| v[k].ok_or_else(|| format!("{} is missing", KEYS[k]));
        let r = RamRoot { root_bytes: get(0)?, verity_bytes: get(1)?, initramfs_bytes: get(2)? };
        if r.initramfs_bytes < r.root_bytes.saturating_add(r.verity_bytes) {
            return Err(format!("initramfs_bytes={} is less than root_bytes + verity_bytes ({}), which it contains", r.initramfs_bytes, r.root_bytes.saturating_add(r.verity_bytes)));
        }
        Ok(r)
    }

    /// The root and its hash tree, as unpacked into RAM.
    pub fn unpacked_bytes(&self) -> u64 {
        self.root_bytes.saturating_add(self.verity_bytes)
    }

    /// The RAM a PXE node needs to unpack and boot this root, rounded up to
    /// a whole MiB.
    pub fn min_ram_bytes(&self) -> u64 {
        // The kernel unpacks into rootfs, a tmpfs capped at 50 % of the RAM
        // it counts when mounting it. The initrd's pages are reserved (not
        // counted) until unpacking ends, so the root must fit in half of
        // what the initramfs leaves; the margin holds the kernel and stage 1.
        let need = self.initramfs_bytes.saturating_add(self.unpacked_bytes().saturating_mul(2)).saturating_add(RAM_MARGIN_BYTES);
        need.div_ceil(MIB).saturating_mul(MIB)
    }

    pub fn min_ram_mib(&self) -> u64 {
        self.min_ram_bytes() / MIB
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: RamRoot = RamRoot { root_bytes: 254_803_968, verity_bytes: 2_011_136, initramfs_bytes: 270_532_608 };

    #[test]
    fn round_trips() {
        assert_eq!(SAMPLE.to_file(), "root_bytes=254803968\nverity_bytes=2011136\ninitramfs_bytes=270532608\n");
        assert_eq!(RamRoot::parse(&SAMPLE.to_file()), Ok(SAMPLE));
        // Any order, padded numbers, CRLF and blank lines.
        assert_eq!(RamRoot::parse("\ninitramfs_bytes=000270532608\r\nverity_bytes = 2011136\nroot_bytes=254803968"), Ok(SAMPLE));
    }

    #[test]
    fn rejects_garbage_clearly() {
        let err = |s: &str| RamRoot::parse(s).unwrap_err();
        assert_eq!(err(""), "root_bytes is missing");
        assert_eq!(err("root_bytes=1\nverity_bytes=1\n"), "initramfs_bytes is missing");
        assert_eq!(err("\x7fELF\x02"), "line 1: \"\\u{7f}ELF\\u{2}\" is not key=value");
        assert_eq!(err("root_bytes=1\nroot_bytes=2\n"), "line 2: root_bytes is given twice");
        assert!(err("root_byte=1\n").starts_with("line 1: unknown key \"root_byte\""));
        assert_eq!(err("root_bytes=-1\n"), "line 1: root_bytes=\"-1\" is not a number of bytes");
        assert_eq!(err("root_bytes=12 MiB\n"), "line 1: root_bytes=\"12 MiB\" is not a number of bytes");
        assert_eq!(err("root_bytes=\n"), "line 1: root_bytes=\"\" is not a number of bytes");
        assert_eq!(err("root_bytes=99999999999999999999\n"), "line 1: root_bytes=99999999999999999999 is too large");
        assert_eq!(err("root_bytes=0\n"), "line 1: root_bytes is 0");
        assert!(err("root_bytes=10\nverity_bytes=10\ninitramfs_bytes=19\n").starts_with("initramfs_bytes=19 is less than"));
    }

    #[test]
    fn min_ram_is_the_initramfs_twice_the_root_and_a_margin() {
        let r = RamRoot { root_bytes: 100 * MIB, verity_bytes: MIB, initramfs_bytes: 110 * MIB };
        assert_eq!(r.min_ram_bytes(), (110 + 2 * 101 + 192) * MIB);
        assert_eq!(r.min_ram_mib(), 504);
        // Rounded up to a whole MiB.
        let r = RamRoot { root_bytes: 1, verity_bytes: 1, initramfs_bytes: 3 };
        assert_eq!(r.min_ram_mib(), 193);
        // A real-size root: ~243 MiB.
        assert_eq!(SAMPLE.min_ram_mib(), 940);
        // Nonsense sizes saturate instead of wrapping.
        let r = RamRoot { root_bytes: u64::MAX, verity_bytes: u64::MAX, initramfs_bytes: u64::MAX };
        assert!(r.min_ram_bytes() >= u64::MAX - MIB);
    }
}
