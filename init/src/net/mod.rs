//! Network bring-up over rtnetlink, and a DHCPv4 client.
//!
//! The node has no `ip`, no udhcpc and no NSS, so PID 1 talks to the kernel
//! itself. Nothing here prints: every function returns data or a [`NetError`]
//! that names the operation and the interface, and the caller emits events.
//!
//! - [`netlink`]: the rtnetlink wire format (pure, fuzzed).
//! - [`rtnl`]: links, addresses, routes and VLANs over a netlink socket.
//! - [`dhcp`]: DHCPv4 packets, IPv4/UDP framing and the client state
//!   machine (pure, fuzzed).
//! - [`client`]: the DHCP exchanges over an `AF_PACKET` socket.
//! - [`sntp`]: SNTPv4 packets and reply checks (pure, fuzzed), and one
//!   exchange over a UDP socket.

pub mod client;
pub mod dhcp;
pub mod netlink;
pub mod rtnl;
pub mod sntp;
mod error;
mod sys;

pub use error::NetError;


pub use client::{apply_lease, dhcp_acquire, dhcp_rebind, dhcp_renew};
pub use dhcp::Lease;
pub use netlink::Link;
pub use rtnl::{
    add_address, add_route, add_vlan, addresses, del_address, link, link_by_name, links,
    loopback_up, set_up, wait_carrier,
};

