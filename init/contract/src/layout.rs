//! Names and paths the image and the node agree on: partitions, the ESP and
//! boot FAT, the root slots, and where the builder puts what kiln-init reads.
//! The design card's disk layout (ARCHITECTURE.md) in code.

use std::fmt;

/// GPT partition names of a disk image, in table order (ESP, root-a,
/// root-a-verity, root-b, root-b-verity, data).
pub const ESP_PART: &str = "ESP";
pub const DATA_PART: &str = "data";
/// The GPT name of the ISO's install-image partition; its presence marks a
/// kiln ISO.
pub const INSTALL_PART: &str = "kiln-install";
/// The install image's path on the ISO (ISO 9660 and its hybrid GPT entry).
pub const INSTALL_IMAGE: &str = "/KILN/INSTALL.IMG";

/// MBR partitions of a u-boot card: boot FAT, root-a, root-b, data. Each
/// root slot carries its hash tree after the squashfs.
pub const MBR_BOOT: u32 = 1;
pub const MBR_DATA: u32 = 4;

/// Where UKIs live on the ESP (BLS type #2); systemd-boot counts boots in
/// their names.
pub const ENTRY_DIR: &str = "EFI/Linux";
/// Tries a new boot entry gets by default (BLS boot counting, `+3`).
pub const TRIES: u32 = 3;

/// Where a PXE initramfs (or `kiln.root=ram`) holds the root and its tree.
pub const RAM_ROOT: &str = "/kiln/root.squashfs";
pub const RAM_VERITY: &str = "/kiln/root.verity";
/// In a PXE initramfs, before the root: the sizes the root and its tree
/// should have once unpacked ([`crate::pxe::RamRoot`]).
pub const RAM_ROOT_SIZES: &str = "/kiln/root.sizes";

/// The trust anchors for HTTPS (profile `node.trust`): PEM files of CA
/// certificates, or of a server's self-signed certificate (which pins it).
pub const TRUST_DIR_ABS: &str = "/etc/kiln/trust";
/// Present when the profile opted out of refusing secret-bearing node
/// configs fetched over plain http:// (`node.insecure_http_secrets = true`).
pub const INSECURE_HTTP_SECRETS: &str = "/etc/kiln/insecure-http-secrets";
/// Present when the profile asked for a root shell on the console from the
/// start of stage 2, in maintenance too (`node.debug_shell = true`).
pub const DEBUG_SHELL: &str = "/etc/kiln/debug-shell";

/// The empty ext4 the node copies onto a fresh data partition (/var).
pub const VAR_TEMPLATE: &str = "/usr/lib/kiln/var.ext4";
/// Appliance content (airgap bundles, manifests) in the root; the node links
/// it into k0s's data dir.
pub const APPLIANCE_SOURCE: &str = "/usr/lib/kiln/appliance";

/// A root slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn letter(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// GPT name of the slot's root partition: `root-a`.
    pub fn root_name(self) -> String {
        format!("root-{}", self.letter())
    }

    /// GPT name of the slot's hash-tree partition: `root-a-verity`.
    pub fn verity_name(self) -> String {
        format!("root-{}-verity", self.letter())
    }

    /// The slot's MBR partition on a u-boot card.
    pub fn mbr_partition(self) -> u32 {
        match self {
            Slot::A => 2,
            Slot::B => 3,
        }
    }

    /// The slot of an MBR card's partition number.
    pub fn of_mbr_partition(partition: u32) -> Option<Slot> {
        match partition {
            2 => Some(Slot::A),
            3 => Some(Slot::B),
            _ => None,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.letter())
    }
}

/// The boot entry file name of `slot` with `tries` left:
/// `kiln-<profile>-<x>+<tries>.efi`.
pub fn entry_name(profile: &str, slot: Slot, tries: u32) -> String {
    format!("kiln-{profile}-{slot}+{tries}.efi")
}

/// PARTUUID (RFC 4122 byte order) of a root partition: the root hash's first
/// 128 bits, the Discoverable Partitions rule.
pub fn root_uuid(roothash: &[u8; 32]) -> [u8; 16] {
    let mut g = [0u8; 16];
    g.copy_from_slice(&roothash[..16]);
    g
}

/// PARTUUID of a verity partition: the root hash's last 128 bits.
pub fn verity_uuid(roothash: &[u8; 32]) -> [u8; 16] {
    let mut g = [0u8; 16];
    g.copy_from_slice(&roothash[16..]);
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_name_their_partitions() {
        assert_eq!(Slot::A.root_name(), "root-a");
        assert_eq!(Slot::B.verity_name(), "root-b-verity");
        assert_eq!(Slot::A.other(), Slot::B);
        for s in [Slot::A, Slot::B] {
            assert_eq!(Slot::of_mbr_partition(s.mbr_partition()), Some(s));
        }
        assert_eq!(Slot::of_mbr_partition(MBR_BOOT), None);
        assert_eq!(Slot::of_mbr_partition(MBR_DATA), None);
        assert_eq!(entry_name("edge", Slot::B, 3), "kiln-edge-b+3.efi");
    }

    #[test]
    fn partition_uuids_are_the_root_hash_halves() {
        let h: [u8; 32] = std::array::from_fn(|i| i as u8);
        assert_eq!(root_uuid(&h)[..], h[..16]);
        assert_eq!(verity_uuid(&h)[..], h[16..]);
    }
}
