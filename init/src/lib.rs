//! kiln-init's library: what the node and the builder share.
//!
//! - [`config`]: the node.toml schema and its validation.
//! - [`requirements`]: the kernel/host requirement table for k0s.
//! - [`event`]: the stable console event format.
//! - [`net`]: netlink and DHCPv4, used by PID 1.
//! - [`dm`]: device-mapper ioctls, for stage 1's dm-verity root.
//! - [`date`]: calendar dates of Unix times (UTC).
//! - [`update`]: reading and verifying signed update bundles.
//! - [`verity`]: the dm-verity hash-tree format (builder and node).

pub mod config;
pub mod date;
pub mod dm;
pub mod event;
pub mod install_image;
pub mod k0s;
pub mod minisign;
pub mod net;
#[cfg(target_os = "linux")]
pub mod node;
pub mod requirements;
pub mod update;
pub mod verity;
