//! kiln-contract: everything a kiln image and its PID 1 must agree on, and
//! nothing else. The builder (`kiln`) writes what this crate describes;
//! kiln-init reads it. Neither links the other.
//!
//! - [`config`]: the node.toml schema and its validation.
//! - [`event`]: the stable console event format.
//! - [`requirements`]: the kernel/host requirement table for k0s.
//! - [`guid`]: GUIDs as GPT writes them.
//! - [`modules`]: the kernel modules kiln-init loads by name (stage 1, k0s).
//! - [`layout`]: partition names, ESP and boot-FAT paths, root slots, and
//!   the paths in the root that the builder fills and the node reads.
//! - [`verity`]: the dm-verity hash tree and superblock.
//! - [`pxe`]: the sizes a PXE node's RAM root should have, and the RAM
//!   that takes.
//! - [`minisign`]: signatures (configs, manifests, update bundles).
//! - [`update`]: the update bundle and image versions.
//! - [`uboot`]: the A/B state file and extlinux.conf of u-boot cards.
//! - [`install_image`]: the ISO's install image (`KILNIMG1`).
//! - [`digest`]: sha256, CRC-32 and hex, as all of the above write them.
//! - [`date`]: calendar dates of Unix times (UTC).
//! - [`stream`]: reading streams to the end, as every reader here does.

pub mod config;
pub mod date;
pub mod digest;
pub mod event;
pub mod guid;
pub mod install_image;
pub mod layout;
pub mod minisign;
pub mod modules;
pub mod pxe;
pub mod requirements;
pub mod stream;
pub mod uboot;
pub mod update;
pub mod verity;
