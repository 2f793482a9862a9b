//! kiln-init: PID 1 of a kiln node. What it shares with the builder (the
//! node-config schema, events, the requirement table, the disk layout, the
//! update bundle…) is in `kiln-contract`; this crate is the node itself.
//!
//! - [`node`]: stage 1 (initramfs → verified root), then stage 2: config,
//!   network, clock, preflight, the supervised payload, shutdown.
//! - [`update`]: node-side A/B updates: applying a bundle to the other slot,
//!   the channel, and u-boot cards' state file.
//! - [`net`]: netlink, DHCPv4, SNTP and the HTTP client's sockets.
//! - [`dm`]: device-mapper ioctls, for stage 1's dm-verity root.
//! - [`k0s`]: the payload's command line, environment and limits by role.

pub mod dm;
pub mod k0s;
pub mod net;
#[cfg(target_os = "linux")]
pub mod node;
pub mod update;
