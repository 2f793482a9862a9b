//! kiln-init: PID 1 of a kiln node. What it shares with the builder (the
//! node-config schema, events, the requirement table, the disk layout, the
//! update bundle…) is in `kiln-contract`; this crate is the node itself.
//!
//! - [`node`]: stage 1 (initramfs → verified root), then stage 2: config,
//!   network, clock, preflight, the supervised payload, shutdown, and
//!   node-side A/B updates (`node::update`).
//! - [`net`]: netlink, DHCPv4, SNTP and the HTTP client's sockets.
//! - [`cmdline`]: the kernel command line's kiln words.
//! - [`dm`]: device-mapper ioctls, for stage 1's dm-verity root.
//! - [`k0s`]: the payload's command line, environment and limits by role.

#[cfg(target_os = "linux")]
pub mod cmdline;
pub mod dm;
/// The fuzz harnesses (init/fuzz) and their corpora's replay test.
#[cfg(target_os = "linux")]
#[doc(hidden)]
pub mod fuzzing;
pub mod k0s;
pub mod net;
#[cfg(target_os = "linux")]
pub mod node;
