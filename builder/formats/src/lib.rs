//! kiln-formats: the image formats kiln writes, each a pure writer (and,
//! where kiln or its tests need one, a reader) over `Read`/`Write`/`Seek`
//! streams and files. Nothing here knows of profiles or the build
//! pipeline; each format's tests check it with the external tool that
//! owns the format (see FORMATS.md): sgdisk/sfdisk, fsck.vfat/mtools,
//! xorriso/isoinfo, unsquashfs, veritysetup, objdump/sbverify, cpio,
//! mkimage.
//!
//! - [`tree`]: the in-memory file tree (path → mode, owner, content) that
//!   the filesystem writers read; no root privileges needed.
//! - [`gpt`]: GPT (and protective/hybrid MBR) partition tables.
//! - [`fat`]: FAT32 filesystems (ESP, boot FAT, El Torito EFI image).
//! - [`iso`]: ISO 9660 (level 2), El Torito (UEFI and BIOS), hybrid GPT/MBR.
//! - [`squashfs`]: squashfs 4.0 (zstd), reproducible.
//! - [`verity`]: dm-verity hash trees of files (the tree itself is
//!   `kiln_contract::verity`, shared with the node).
//! - [`uki`]: PE/COFF: unified kernel images (systemd-stub + sections).
//! - [`cpio`]: newc cpio archives (initramfs), zstd-compressed, written with
//!   the `cpio` crate.
//! - [`bootscr`]: u-boot legacy script images (`boot.scr`) and kiln's A/B
//!   boot script.
//! - [`elf`]: reading ELF headers (arch, static or not, needed libraries).
//! - [`kmod`]: kernel modules of a distribution kernel: `.modinfo`, the
//!   dependency closure of a selection, and depmod's index files.
//! - [`uboot_cmds`]: reading which commands a 32-bit ARM u-boot binary has
//!   (its command tables), for checking a board's u-boot runs `boot.scr`.

pub mod bootscr;
pub mod cpio;
pub mod elf;
pub mod fat;
pub mod gpt;
pub mod iso;
pub mod kmod;
pub mod squashfs;
pub mod tree;
pub mod uboot_cmds;
pub mod uki;
pub mod verity;
