//! The DHCP exchanges over sockets.
//!
//! Acquiring and rebinding use an `AF_PACKET` datagram socket bound to the
//! link, like busybox udhcpc: it sends and receives before the link has an
//! address, and sees the server's answer whatever its IP destination.
//! Renewing uses a plain UDP socket, unicast to the server, since by then the
//! lease is applied.

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::dhcp::{
    self, Acquire, ClientInfo, Lease, Message, Renew, Step, CLIENT_PORT, SERVER_PORT,
};
use super::netlink::{Link, RTPROT_DHCP};
use super::rtnl::{add_address, add_route_proto};
use super::sys::{self, Rng};
use super::error::NetError;

/// sll_pkttype of frames this host sent, which packet sockets also see.
const PACKET_OUTGOING: u8 = 4;
const SO_ATTACH_FILTER: libc::c_int = 26;
const RECV_BUF: usize = 64 * 1024;

fn io_err(op: &str, link: &Link, source: io::Error) -> NetError {
    NetError::Io {
        op: op.to_string(),
        iface: link.name.clone(),
        source,
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
    )
}

/// Classic BPF for a SOCK_DGRAM packet socket (offset 0 is the IP header):
/// keep unfragmented UDP to port 68, drop the rest in the kernel.
fn bootp_filter() -> [libc::sock_filter; 9] {
    const LD_B_ABS: u16 = 0x30;
    const LD_H_ABS: u16 = 0x28;
    const LDX_B_MSH: u16 = 0xb1;
    const LD_H_IND: u16 = 0x48;
    const JEQ_K: u16 = 0x15;
    const JSET_K: u16 = 0x45;
    const RET_K: u16 = 0x06;
    let ins = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    [
        ins(LD_B_ABS, 0, 0, 9),                   // A = protocol
        ins(JEQ_K, 0, 6, 17),                     // UDP, else drop
        ins(LD_H_ABS, 0, 0, 6),                   // A = flags + fragment offset
        ins(JSET_K, 4, 0, 0x1fff),                // a later fragment: drop
        ins(LDX_B_MSH, 0, 0, 0),                  // X = IP header length
        ins(LD_H_IND, 0, 0, 2),                   // A = UDP destination port
        ins(JEQ_K, 0, 1, u32::from(CLIENT_PORT)), // 68, else drop
        ins(RET_K, 0, 0, 0x0fff_ffff),            // keep the whole packet
        ins(RET_K, 0, 0, 0),                      // drop
    ]
}

fn packet_addr(index: u32, dst_mac: Option<[u8; 6]>) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut sa: libc::sockaddr_ll = unsafe { mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as libc::c_ushort;
    sa.sll_protocol = (libc::ETH_P_IP as u16).to_be();
    sa.sll_ifindex = index as libc::c_int;
    if let Some(mac) = dst_mac {
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&mac);
    }
    sa
}

struct PacketSocket {
    fd: OwnedFd,
    index: u32,
}

impl PacketSocket {
    fn open(link: &Link) -> Result<Self, NetError> {
        // Protocol 0 receives nothing until bind(), so no other interface's
        // traffic is queued before the filter and the binding are in place.
        let fd = sys::socket(libc::AF_PACKET, libc::SOCK_DGRAM, 0)
            .map_err(|e| io_err("AF_PACKET socket", link, e))?;
        let mut filter = bootp_filter();
        let prog = libc::sock_fprog {
            len: filter.len() as libc::c_ushort,
            filter: filter.as_mut_ptr(),
        };
        // Best effort: every packet is checked again in user space.
        let _ = sys::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_ATTACH_FILTER, &prog);
        let sa = packet_addr(link.index, None);
        // SAFETY: sa is a sockaddr_ll of the length passed.
        sys::cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_ll).cast(),
                mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })
        .map_err(|e| io_err("bind AF_PACKET socket", link, e))?;
        Ok(PacketSocket {
            fd,
            index: link.index,
        })
    }

    /// Sends an IPv4 packet to the Ethernet broadcast address.
    fn send(&self, packet: &[u8]) -> io::Result<()> {
        let sa = packet_addr(self.index, Some([0xff; 6]));
        loop {
            // SAFETY: packet and sa are live for the call, lengths match.
            let r = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&sa as *const libc::sockaddr_ll).cast(),
                    mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            match sys::cvt_size(r) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// One received IPv4 packet, or `None` for our own outgoing frames.
    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut from: libc::sockaddr_ll = unsafe { mem::zeroed() };
        let mut from_len = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: buf is writable for its length; from/from_len describe a
        // sockaddr_ll.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut from_len,
            )
        };
        let n = sys::cvt_size(n)?.min(buf.len());
        Ok((from.sll_pkttype != PACKET_OUTGOING).then_some(n))
    }
}

/// Option 57: what we accept, within DHCP's 576 minimum and plain Ethernet.
fn max_size(mtu: u32) -> u16 {
    mtu.clamp(576, 1500) as u16
}

fn secs_since(start: Instant) -> u16 {
    start.elapsed().as_secs().min(u64::from(u16::MAX)) as u16
}

fn new_xid(mac: &[u8; 6]) -> u32 {
    sys::random_u64(mac) as u32
}

/// Waits on the packet socket until `until` for a reply that moves the
/// exchange on; `Ok(None)` when the wait ends first.
fn receive_packet(
    sock: &PacketSocket,
    buf: &mut [u8],
    until: Instant,
    mut on_reply: impl FnMut(&Message, Ipv4Addr) -> Step,
) -> io::Result<Option<Step>> {
    loop {
        if !sys::wait_readable(sock.fd.as_raw_fd(), until)? {
            return Ok(None);
        }
        let n = match sock.recv(buf) {
            Ok(Some(n)) => n,
            Ok(None) => continue,
            Err(e) if is_transient(&e) => continue,
            Err(e) => return Err(e),
        };
        let Some(d) = dhcp::decode_ip_udp(&buf[..n]) else {
            continue;
        };
        if d.dport != CLIENT_PORT {
            continue;
        }
        let Ok(msg) = dhcp::decode(d.payload) else {
            continue;
        };
        match on_reply(&msg, d.src) {
            Step::Ignore => continue,
            step => return Ok(Some(step)),
        }
    }
}

fn retransmit_at(attempt: u32, rng: &mut Rng, deadline: Instant) -> Instant {
    let now = Instant::now();
    now.checked_add(dhcp::retransmit_delay(attempt, rng.jitter_ms()))
        .unwrap_or(deadline)
        .min(deadline)
}

/// Acquires a lease on `link`: DISCOVER → OFFER → REQUEST → ACK, with
/// RFC 2131 retransmission (4 s doubling to 64 s, ±1 s) capped to
/// `timeout`. A DHCPNAK starts over. The link must be up; nothing is
/// configured (see [`apply_lease`]).
pub fn dhcp_acquire(
    link: &Link,
    hostname: Option<&str>,
    timeout: Duration,
) -> Result<Lease, NetError> {
    let mac = link.mac.ok_or_else(|| NetError::NoMac {
        iface: link.name.clone(),
    })?;
    let sock = PacketSocket::open(link)?;
    let info = ClientInfo {
        mac,
        hostname,
        max_size: max_size(link.mtu),
    };
    let start = Instant::now();
    let deadline = sys::deadline(timeout);
    let mut rng = Rng::new(&mac);
    let mut buf = vec![0u8; RECV_BUF];
    let mut ex = Acquire::new(mac, new_xid(&mac));
    let mut attempt = 0u32;
    let mut naks = 0u32;
    let mut last_nak = None;
    loop {
        if Instant::now() >= deadline {
            let mut stage = ex.waiting_for().to_string();
            if let Some((server, message)) = &last_nak {
                stage.push_str(&format!(
                    " (last answer: DHCPNAK from {server}{})",
                    match message {
                        Some(m) => format!(": {m}"),
                        None => String::new(),
                    }
                ));
            }
            return Err(NetError::DhcpTimeout {
                iface: link.name.clone(),
                stage,
                after: timeout,
            });
        }
        let msg = ex.packet(&info, secs_since(start));
        let name = msg
            .message_type()
            .map(|t| t.name())
            .unwrap_or("DHCP message");
        let packet = dhcp::encode_ip_udp(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            CLIENT_PORT,
            SERVER_PORT,
            &dhcp::encode(&msg),
        );
        sock.send(&packet)
            .map_err(|e| io_err(&format!("send {name}"), link, e))?;
        let until = retransmit_at(attempt, &mut rng, deadline);
        attempt = attempt.saturating_add(1);
        let step = receive_packet(&sock, &mut buf, until, |m, src| ex.on_reply(m, src))
            .map_err(|e| io_err("receive DHCP reply", link, e))?;
        match step {
            None => {
                if matches!(ex.phase, dhcp::Phase::Requesting { .. })
                    && attempt >= dhcp::REQUEST_TRIES
                {
                    ex.restart(new_xid(&mac));
                    attempt = 0;
                }
            }
            Some(Step::SendRequest) => attempt = 0,
            Some(Step::Bound(mut lease)) => {
                lease.client_hostname = hostname.filter(|h| !h.is_empty()).map(str::to_string);
                return Ok(lease);
            }
            Some(Step::Nak { server, message }) => {
                naks = naks.saturating_add(1);
                last_nak = Some((server, message));
                ex.restart(new_xid(&mac));
                attempt = 0;
                // Start over at once the first time; a server that keeps
                // refusing gets a growing pause instead of a packet storm.
                if naks > 1 {
                    let pause = Duration::from_secs(1u64 << (naks - 2).min(3));
                    let left = deadline.saturating_duration_since(Instant::now());
                    std::thread::sleep(pause.min(left));
                }
            }
            Some(Step::Ignore) => {}
        }
    }
}

/// A UDP socket on port 68 of `link`, for unicast renewal.
fn udp_socket(link: &Link) -> Result<UdpSocket, NetError> {
    let fd = sys::socket(libc::AF_INET, libc::SOCK_DGRAM, 0)
        .map_err(|e| io_err("UDP socket", link, e))?;
    let one: libc::c_int = 1;
    sys::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, &one)
        .map_err(|e| io_err("SO_REUSEADDR", link, e))?;
    // SAFETY: the name bytes are live for the call, and the length matches.
    sys::cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            link.name.as_ptr().cast(),
            link.name.len() as libc::socklen_t,
        )
    })
    .map_err(|e| io_err("SO_BINDTODEVICE", link, e))?;
    // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
    let mut sa: libc::sockaddr_in = unsafe { mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = CLIENT_PORT.to_be();
    // SAFETY: sa is a sockaddr_in of the length passed.
    sys::cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })
    .map_err(|e| io_err("bind UDP port 68", link, e))?;
    let sock = UdpSocket::from(fd);
    sock.set_nonblocking(true)
        .map_err(|e| io_err("UDP socket", link, e))?;
    Ok(sock)
}

fn extend_lease(
    link: &Link,
    lease: &Lease,
    timeout: Duration,
    unicast: bool,
) -> Result<Lease, NetError> {
    let mac = link.mac.ok_or_else(|| NetError::NoMac {
        iface: link.name.clone(),
    })?;
    let info = ClientInfo {
        mac,
        hostname: lease.client_hostname.as_deref(),
        max_size: max_size(link.mtu),
    };
    let start = Instant::now();
    let deadline = sys::deadline(timeout);
    let mut rng = Rng::new(&mac);
    let renew = Renew {
        mac,
        xid: new_xid(&mac),
        addr: lease.addr,
        server: lease.server,
    };
    let mut buf = vec![0u8; RECV_BUF];
    enum Sock {
        Udp(UdpSocket),
        Packet(PacketSocket),
    }
    let sock = if unicast {
        Sock::Udp(udp_socket(link)?)
    } else {
        Sock::Packet(PacketSocket::open(link)?)
    };
    let mut attempt = 0u32;
    loop {
        if Instant::now() >= deadline {
            let stage = if unicast {
                format!(
                    "no DHCPACK from {} to the renewal of {}",
                    lease.server, lease.addr
                )
            } else {
                format!("no DHCPACK to the rebinding of {}", lease.addr)
            };
            return Err(NetError::DhcpTimeout {
                iface: link.name.clone(),
                stage,
                after: timeout,
            });
        }
        let payload = dhcp::encode(&renew.packet(&info, secs_since(start)));
        let until = retransmit_at(attempt, &mut rng, deadline);
        attempt = attempt.saturating_add(1);
        let step = match &sock {
            Sock::Udp(udp) => {
                let to = SocketAddrV4::new(lease.server, SERVER_PORT);
                udp.send_to(&payload, to)
                    .map_err(|e| io_err("send DHCPREQUEST (renewing)", link, e))?;
                receive_udp(udp, &mut buf, until, |m, src| renew.on_reply(m, src))
            }
            Sock::Packet(p) => {
                let packet = dhcp::encode_ip_udp(
                    lease.addr,
                    Ipv4Addr::BROADCAST,
                    CLIENT_PORT,
                    SERVER_PORT,
                    &payload,
                );
                p.send(&packet)
                    .map_err(|e| io_err("send DHCPREQUEST (rebinding)", link, e))?;
                receive_packet(p, &mut buf, until, |m, src| renew.on_reply(m, src))
            }
        }
        .map_err(|e| io_err("receive DHCP reply", link, e))?;
        match step {
            Some(Step::Bound(mut new)) => {
                new.client_hostname = lease.client_hostname.clone();
                return Ok(new);
            }
            Some(Step::Nak { server, message }) => {
                return Err(NetError::DhcpNak {
                    iface: link.name.clone(),
                    server,
                    message,
                });
            }
            Some(Step::SendRequest) | Some(Step::Ignore) | None => {}
        }
    }
}

fn receive_udp(
    sock: &UdpSocket,
    buf: &mut [u8],
    until: Instant,
    mut on_reply: impl FnMut(&Message, Ipv4Addr) -> Step,
) -> io::Result<Option<Step>> {
    loop {
        if !sys::wait_readable(sock.as_raw_fd(), until)? {
            return Ok(None);
        }
        let (n, from) = match sock.recv_from(buf) {
            Ok(r) => r,
            Err(e) if is_transient(&e) => continue,
            Err(e) => return Err(e),
        };
        let src = match from.ip() {
            IpAddr::V4(a) => a,
            IpAddr::V6(_) => continue,
        };
        let Ok(msg) = dhcp::decode(buf.get(..n).unwrap_or(&[])) else {
            continue;
        };
        match on_reply(&msg, src) {
            Step::Ignore => continue,
            step => return Ok(Some(step)),
        }
    }
}

/// Extends `lease` with a REQUEST unicast to the server that gave it
/// (RENEWING, from T1). The lease must be applied: the answer comes to its
/// address. A DHCPNAK is [`NetError::DhcpNak`]: give the address up and
/// acquire again.
pub fn dhcp_renew(link: &Link, lease: &Lease, timeout: Duration) -> Result<Lease, NetError> {
    extend_lease(link, lease, timeout, true)
}

/// Extends `lease` with a REQUEST broadcast to any server (REBINDING, from
/// T2, or when renewing got no answer).
pub fn dhcp_rebind(link: &Link, lease: &Lease, timeout: Duration) -> Result<Lease, NetError> {
    extend_lease(link, lease, timeout, false)
}

/// Puts the lease on the link: its address (with broadcast) and a default
/// route via its router. A router outside the leased subnet first gets a
/// host route, as cloud DHCP servers expect. Existing entries are fine.
pub fn apply_lease(link: &Link, lease: &Lease) -> Result<(), NetError> {
    add_address(link.index, IpAddr::V4(lease.addr), lease.prefix)?;
    if let Some(router) = lease.router {
        if !lease.on_link(router) {
            add_route_proto(
                Some((IpAddr::V4(router), 32)),
                None,
                link.index,
                RTPROT_DHCP,
            )?;
        }
        add_route_proto(None, Some(IpAddr::V4(router)), link.index, RTPROT_DHCP)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_jumps_stay_inside_the_program() {
        let f = bootp_filter();
        for (i, ins) in f.iter().enumerate() {
            if ins.code & 0x07 == 0x05 {
                assert!(i + 1 + usize::from(ins.jt) < f.len());
                assert!(i + 1 + usize::from(ins.jf) < f.len());
            }
        }
        assert_eq!(f.last().map(|i| (i.code, i.k)), Some((0x06, 0)));
    }

    /// The kernel validates a filter when it is attached; the end-to-end
    /// test then shows it lets DHCP replies through.
    #[test]
    fn the_kernel_accepts_the_filter() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            kiln_testkit::skip("the_kernel_accepts_the_filter: AF_PACKET needs root");
            return;
        }
        let fd = sys::socket(libc::AF_PACKET, libc::SOCK_DGRAM, 0).expect("AF_PACKET socket");
        let mut filter = bootp_filter();
        let prog = libc::sock_fprog {
            len: filter.len() as libc::c_ushort,
            filter: filter.as_mut_ptr(),
        };
        sys::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_ATTACH_FILTER, &prog)
            .expect("SO_ATTACH_FILTER");
    }

    #[test]
    fn max_size_is_clamped() {
        assert_eq!(max_size(0), 576);
        assert_eq!(max_size(1500), 1500);
        assert_eq!(max_size(9000), 1500);
    }

    #[test]
    fn no_mac_is_an_error_before_any_socket() {
        let link = Link {
            index: 1,
            name: "lo".into(),
            mac: None,
            is_loopback: true,
            up: true,
            carrier: true,
            mtu: 65536,
            kind: None,
            parent: None,
            vlan_id: None,
        };
        let e = dhcp_acquire(&link, None, Duration::from_millis(1)).unwrap_err();
        assert!(matches!(e, NetError::NoMac { .. }), "{e}");
    }
}
