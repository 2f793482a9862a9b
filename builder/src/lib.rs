//! kiln: builds immutable, signed, bootable k0s node images.
//!
//! One module per pipeline stage, named after what it makes; [`pipeline`]
//! strings them together in the order of ARCHITECTURE.md.

pub mod appliance;
pub mod arch;
pub mod board;
pub mod cache;
pub mod cluster;
pub mod crates;
pub mod disk;
pub mod init;
pub mod install;
pub mod input;
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
pub mod sbom;
pub mod sdcard;
pub mod secureboot;
pub mod serve;
pub mod sign;
pub mod tomlfile;
pub mod update;
pub mod verify;
