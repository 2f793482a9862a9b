//! kiln: builds immutable, signed, bootable k0s node images.
//!
//! One module per pipeline stage, named after what it makes; [`pipeline`]
//! strings them together in the order of ARCHITECTURE.md.

pub mod appliance;
pub mod arch;
pub mod board;
pub mod bootscr;
pub mod cache;
pub mod cluster;
pub mod crates;
pub mod disk;
pub mod elf;
pub mod fat;
pub mod gpt;
pub mod init;
pub mod initramfs;
pub mod install;
pub mod input;
pub mod iso;
pub mod isoboot;
pub mod kernel;
pub mod keys;
pub mod manifest;
pub mod packages;
pub mod payload;
pub mod pipeline;
pub mod profile;
pub mod pxe;
pub mod qemu;
pub mod rootfs;
pub mod sbom;
pub mod sdcard;
pub mod secureboot;
pub mod serve;
pub mod sign;
pub mod squashfs;
pub mod uki;
pub mod update;
pub mod verity;
