//! Network errors: each names the operation and, where there is one, the
//! interface.

use std::io;
use std::net::Ipv4Addr;
use std::time::Duration;

/// Why a network operation failed. Every variant names the operation and,
/// where there is one, the interface.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The kernel refused a netlink request.
    #[error("{op}{}: {}", on(iface), kernel_text(*errno, ext_ack.as_deref()))]
    Kernel {
        op: String,
        iface: String,
        errno: i32,
        /// The kernel's extended ack message, when it sent one.
        ext_ack: Option<String>,
    },
    /// A socket call failed.
    #[error("{op}{}: {}", on(iface), io_text(source))]
    Io {
        op: String,
        iface: String,
        #[source]
        source: io::Error,
    },
    /// The kernel answered with something this module cannot read.
    #[error("{op}{}: malformed reply: {detail}", on(iface))]
    Malformed {
        op: String,
        iface: String,
        detail: String,
    },
    /// The kernel did not answer a netlink request in time.
    #[error("{op}{}: no answer from the kernel within {after:?}", on(iface))]
    Timeout {
        op: String,
        iface: String,
        after: Duration,
    },
    /// The caller passed something that cannot be sent.
    #[error("{op}: {reason}")]
    Invalid { op: String, reason: String },
    /// DHCP needs an Ethernet MAC address and the link has none.
    #[error("DHCP on {iface}: the link has no Ethernet MAC address")]
    NoMac { iface: String },
    /// No usable DHCP answer before the caller's timeout.
    #[error("DHCP on {iface}: {stage} within {after:?}")]
    DhcpTimeout {
        iface: String,
        /// What was missing, e.g. "no DHCPOFFER".
        stage: String,
        after: Duration,
    },
    /// The server refused the lease: drop the address and acquire again.
    #[error("DHCP on {iface}: server {server} refused the lease (DHCPNAK){}", nak_text(message.as_deref()))]
    DhcpNak {
        iface: String,
        server: Ipv4Addr,
        message: Option<String>,
    },
}

impl NetError {
    /// The errno behind this error, if the kernel or a socket call gave one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetError::Kernel { errno, .. } => Some(*errno),
            NetError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

fn on(iface: &str) -> String {
    if iface.is_empty() {
        String::new()
    } else {
        format!(" on {iface}")
    }
}

/// The errno text without std's " (os error N)" suffix.
fn errno_text(errno: i32) -> String {
    let text = io::Error::from_raw_os_error(errno).to_string();
    match text.rfind(" (os error ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

fn kernel_text(errno: i32, ext_ack: Option<&str>) -> String {
    match ext_ack {
        Some(msg) if !msg.is_empty() => format!("{} ({msg})", errno_text(errno)),
        _ => errno_text(errno),
    }
}

fn io_text(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(errno) => errno_text(errno),
        None => e.to_string(),
    }
}

fn nak_text(message: Option<&str>) -> String {
    match message {
        Some(m) if !m.is_empty() => format!(": {m}"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_error_names_operation_and_interface() {
        let e = NetError::Kernel {
            op: "RTM_NEWADDR 10.0.2.15/24".into(),
            iface: "eth0".into(),
            errno: libc::EPERM,
            ext_ack: None,
        };
        assert_eq!(
            e.to_string(),
            "RTM_NEWADDR 10.0.2.15/24 on eth0: Operation not permitted"
        );
        assert_eq!(e.errno(), Some(libc::EPERM));

        let e = NetError::Kernel {
            op: "RTM_NEWLINK vlan eth0.42 id 42".into(),
            iface: "eth0".into(),
            errno: libc::EOPNOTSUPP,
            ext_ack: Some("Unknown device type".into()),
        };
        assert!(e.to_string().ends_with("(Unknown device type)"), "{e}");
    }

    #[test]
    fn io_error_without_os_error_suffix() {
        let e = NetError::Io {
            op: "send DHCPDISCOVER".into(),
            iface: "eth0".into(),
            source: io::Error::from_raw_os_error(libc::ENETDOWN),
        };
        assert_eq!(e.to_string(), "send DHCPDISCOVER on eth0: Network is down");
    }

    #[test]
    fn nak_and_timeout_messages() {
        let e = NetError::DhcpNak {
            iface: "eth0".into(),
            server: Ipv4Addr::new(10, 0, 2, 2),
            message: Some("wrong network".into()),
        };
        assert_eq!(
            e.to_string(),
            "DHCP on eth0: server 10.0.2.2 refused the lease (DHCPNAK): wrong network"
        );
        let e = NetError::DhcpTimeout {
            iface: "eth0".into(),
            stage: "no DHCPOFFER".into(),
            after: Duration::from_secs(30),
        };
        assert_eq!(e.to_string(), "DHCP on eth0: no DHCPOFFER within 30s");
    }
}
