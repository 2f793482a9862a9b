//! Stage 1 of a PXE boot: did the kernel unpack the root into RAM whole?
//!
//! Without RAM for the root, the kernel stops unpacking the initramfs
//! ("Initramfs unpacking failed: write error") and still starts stage 1,
//! with the root short or missing. The initramfs's
//! [`RAM_ROOT_SIZES`](kiln_contract::layout::RAM_ROOT_SIZES) says what
//! should be there, so the node can say it lacks RAM, and how much it needs,
//! instead of failing on a truncated squashfs.

use kiln_contract::layout::{RAM_ROOT, RAM_VERITY};
use kiln_contract::pxe::RamRoot;

const MIB: u64 = 1 << 20;

/// How the root's two files came out of the initramfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpacked {
    Complete,
    /// `path` has `have` of the `want` bytes it should have.
    Short { path: &'static str, have: u64, want: u64 },
    Missing { path: &'static str },
}

/// Compares the files' lengths (None: no file) with the sizes. A file
/// longer than said is left to verity to judge.
pub fn unpacked(sizes: &RamRoot, root_len: Option<u64>, verity_len: Option<u64>) -> Unpacked {
    for (path, len, want) in [(RAM_ROOT, root_len, sizes.root_bytes), (RAM_VERITY, verity_len, sizes.verity_bytes)] {
        match len {
            None => return Unpacked::Missing { path },
            Some(have) if have < want => return Unpacked::Short { path, have, want },
            Some(_) => {}
        }
    }
    Unpacked::Complete
}

/// Why the root did not arrive whole: the node lacks RAM (event
/// `ram-too-small`), or it has enough and the initramfs is damaged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incomplete {
    pub too_small: bool,
    pub reason: String,
    pub detail: Vec<String>,
}

/// Bytes as whole MiB, rounded up (a 1 KiB tree is "1 MiB", not "0").
fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(MIB)
}

/// What to tell the user when the root is not [`Unpacked::Complete`].
/// `mem_mib` is the node's MemTotal (None when /proc/meminfo says nothing).
pub fn incomplete(sizes: &RamRoot, mem_mib: Option<u64>, u: Unpacked) -> Incomplete {
    let needs = sizes.min_ram_mib();
    let what = match u {
        Unpacked::Complete => String::new(),
        Unpacked::Short { path, have, want } => format!("{path} has {have} of its {want} bytes"),
        Unpacked::Missing { path } => format!("{path} is missing"),
    };
    let root = format!("this PXE image's root ({} MiB + {} MiB verity)", mib(sizes.root_bytes), mib(sizes.verity_bytes));
    match mem_mib {
        Some(mem) if mem >= needs => Incomplete {
            too_small: false,
            reason: format!("{root} is incomplete in the initramfs: {what}, although the node has {mem} MiB of the {needs} MiB it needs"),
            detail: vec!["the initramfs file was cut short or damaged on its way to the node; copy or build it again (a boot loader that limits the initrd's size cuts it too)".into()],
        },
        _ => {
            let has = mem_mib.map_or_else(|| "an unknown amount of RAM (no MemTotal in /proc/meminfo)".to_string(), |m| format!("{m} MiB"));
            Incomplete {
                too_small: true,
                reason: format!("{root} did not fit in RAM: the node has {has}, this root needs at least {needs} MiB; give the node more RAM or use a disk/ISO image"),
                detail: vec![format!("{what}: the kernel ran out of room unpacking the initramfs (dmesg: \"Initramfs unpacking failed\"); the partial root was removed from RAM")],
            }
        }
    }
}

/// A warning when the root arrived whole but leaves the node little RAM
/// (under 64 MiB besides the root).
pub fn low_ram_warning(sizes: &RamRoot, mem_mib: u64) -> Option<String> {
    let root_mib = mib(sizes.unpacked_bytes());
    (mem_mib < root_mib + 64).then(|| {
        format!("the node has {mem_mib} MiB of RAM and the root takes {root_mib} MiB of it, leaving too little for k0s; this PXE image needs at least {} MiB", sizes.min_ram_mib())
    })
}

/// MemTotal in MiB, from a /proc/meminfo text (in KiB there).
pub fn mem_total_mib(meminfo: &str) -> Option<u64> {
    let kib: u64 = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.split_whitespace().next()?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZES: RamRoot = RamRoot { root_bytes: 243 * MIB, verity_bytes: 2 * MIB + 4096, initramfs_bytes: 256 * MIB };

    #[test]
    fn tells_complete_short_and_missing_apart() {
        let (r, v) = (SIZES.root_bytes, SIZES.verity_bytes);
        assert_eq!(unpacked(&SIZES, Some(r), Some(v)), Unpacked::Complete);
        assert_eq!(unpacked(&SIZES, Some(r + 1), Some(v)), Unpacked::Complete);
        assert_eq!(unpacked(&SIZES, Some(r - 1), Some(v)), Unpacked::Short { path: RAM_ROOT, have: r - 1, want: r });
        assert_eq!(unpacked(&SIZES, Some(0), None), Unpacked::Short { path: RAM_ROOT, have: 0, want: r });
        assert_eq!(unpacked(&SIZES, None, None), Unpacked::Missing { path: RAM_ROOT });
        assert_eq!(unpacked(&SIZES, Some(r), None), Unpacked::Missing { path: RAM_VERITY });
        assert_eq!(unpacked(&SIZES, Some(r), Some(4096)), Unpacked::Short { path: RAM_VERITY, have: 4096, want: v });
    }

    #[test]
    fn blames_ram_when_the_node_has_less_than_the_root_needs() {
        let needs = SIZES.min_ram_mib();
        // 256 + 2 * (245 MiB + 4 KiB) + 192, rounded up.
        assert_eq!(needs, 939);
        let i = incomplete(&SIZES, Some(480), Unpacked::Short { path: RAM_ROOT, have: 100, want: SIZES.root_bytes });
        assert!(i.too_small);
        assert_eq!(
            i.reason,
            format!("this PXE image's root (243 MiB + 3 MiB verity) did not fit in RAM: the node has 480 MiB, this root needs at least {needs} MiB; give the node more RAM or use a disk/ISO image")
        );
        assert!(i.detail[0].starts_with(&format!("{RAM_ROOT} has 100 of its {} bytes: the kernel ran out of room", SIZES.root_bytes)));
        let i = incomplete(&SIZES, None, Unpacked::Missing { path: RAM_VERITY });
        assert!(i.too_small && i.reason.contains("an unknown amount of RAM"));
        assert!(i.detail[0].starts_with(&format!("{RAM_VERITY} is missing:")));
    }

    #[test]
    fn blames_the_file_when_the_ram_was_enough() {
        let i = incomplete(&SIZES, Some(SIZES.min_ram_mib()), Unpacked::Missing { path: RAM_ROOT });
        assert!(!i.too_small);
        assert!(i.reason.contains("is incomplete in the initramfs: /kiln/root.squashfs is missing"), "{}", i.reason);
    }

    #[test]
    fn warns_when_the_root_leaves_little_ram() {
        assert!(low_ram_warning(&SIZES, 1024).is_none());
        assert!(low_ram_warning(&SIZES, 246 + 64).is_none());
        assert!(low_ram_warning(&SIZES, 246 + 63).is_some_and(|w| w.contains("309 MiB of RAM and the root takes 246 MiB")));
    }

    #[test]
    fn reads_memtotal() {
        assert_eq!(mem_total_mib("MemTotal:         491520 kB\nMemFree:  1 kB\n"), Some(480));
        assert_eq!(mem_total_mib("MemFree:  1 kB\n"), None);
        assert_eq!(mem_total_mib("MemTotal: lots\n"), None);
    }
}
