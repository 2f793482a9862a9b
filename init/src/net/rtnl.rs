//! Links, addresses, routes and VLANs over an rtnetlink socket.
//!
//! Each call opens its own socket in the calling thread's network namespace
//! and closes it on return: no shared state, and tests can run each call in
//! a namespace of their own. A kernel answer is waited for at most
//! [`REPLY_TIMEOUT`]; rtnetlink answers at once, so this only guards PID 1
//! against a hang.

use std::io;
use std::mem;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::netlink::{
    self, parse_addr, parse_link, Link, Request, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP,
    NLMSG_OVERRUN, NLM_F_DUMP_INTR, RTM_NEWADDR, RTM_NEWLINK, RTPROT_BOOT,
};
use super::error::NetError;
use super::sys;

/// The longest wait for the kernel's answer to one netlink request.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

const POLL_CARRIER: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub(crate) enum NlError {
    Io(io::Error),
    Kernel {
        errno: i32,
        ext_ack: Option<String>,
    },
    Malformed(String),
    Timeout,
    /// The dump changed while it was read (NLM_F_DUMP_INTR); what was read.
    Interrupted(Vec<(u16, Vec<u8>)>),
}

impl From<io::Error> for NlError {
    fn from(e: io::Error) -> Self {
        NlError::Io(e)
    }
}

impl NlError {
    fn errno(&self) -> Option<i32> {
        match self {
            NlError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    pub(crate) fn at(self, op: &str, iface: &str) -> NetError {
        let (op, iface) = (op.to_string(), iface.to_string());
        match self {
            NlError::Io(source) => NetError::Io { op, iface, source },
            NlError::Kernel { errno, ext_ack } => NetError::Kernel {
                op,
                iface,
                errno,
                ext_ack,
            },
            NlError::Malformed(detail) => NetError::Malformed { op, iface, detail },
            NlError::Timeout => NetError::Timeout {
                op,
                iface,
                after: REPLY_TIMEOUT,
            },
            NlError::Interrupted(_) => NetError::Malformed {
                op,
                iface,
                detail: "the dump kept changing while it was read".into(),
            },
        }
    }
}

struct Rtnl {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    fn open() -> Result<Rtnl, NlError> {
        let fd = sys::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE)?;
        // Best effort: error strings from the kernel, and acks that do not
        // echo the whole request. Older kernels lack these options.
        let one: libc::c_int = 1;
        let _ = sys::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_NETLINK,
            netlink::NETLINK_EXT_ACK,
            &one,
        );
        let _ = sys::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_NETLINK,
            netlink::NETLINK_CAP_ACK,
            &one,
        );
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut sa: libc::sockaddr_nl = unsafe { mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: sa is a sockaddr_nl of the length passed.
        sys::cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast(),
                mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })?;
        let seq = (sys::random_u64(b"rtnl") as u32) | 1;
        Ok(Rtnl {
            fd,
            seq,
            buf: vec![0; 32 * 1024],
        })
    }

    fn send(&mut self, req: Request) -> Result<u32, NlError> {
        self.seq = self.seq.wrapping_add(1);
        let bytes = req.finish(self.seq);
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut to: libc::sockaddr_nl = unsafe { mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: bytes and to are live for the call, lengths match.
            let r = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    0,
                    (&to as *const libc::sockaddr_nl).cast(),
                    mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            match sys::cvt_size(r) {
                Ok(n) if n == bytes.len() => return Ok(self.seq),
                Ok(n) => {
                    return Err(NlError::Malformed(format!(
                        "sent {n} of {} bytes",
                        bytes.len()
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Receives one datagram from the kernel into `self.buf`.
    fn recv(&mut self) -> Result<usize, NlError> {
        let deadline = sys::deadline(REPLY_TIMEOUT);
        loop {
            if !sys::wait_readable(self.fd.as_raw_fd(), deadline)? {
                return Err(NlError::Timeout);
            }
            // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
            let mut from: libc::sockaddr_nl = unsafe { mem::zeroed() };
            let mut from_len = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            // Peek with MSG_TRUNC for the real size, so a large dump datagram
            // is never cut short.
            // SAFETY: buf is writable for its length.
            let size = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_PEEK | libc::MSG_TRUNC | libc::MSG_DONTWAIT,
                )
            };
            match sys::cvt_size(size) {
                Ok(n) if n > self.buf.len() => self.buf.resize(n, 0),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(e.into()),
            }
            // SAFETY: buf is writable for its length; from/from_len describe
            // a sockaddr_nl.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut from as *mut libc::sockaddr_nl).cast(),
                    &mut from_len,
                )
            };
            let n = match sys::cvt_size(n) {
                Ok(n) => n.min(self.buf.len()),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(e.into()),
            };
            // Only the kernel (port 0) answers rtnetlink requests.
            if from.nl_pid != 0 {
                continue;
            }
            return Ok(n);
        }
    }

    /// Sends `req` and collects the data messages of the answer, until the
    /// ack (requests with NLM_F_ACK) or NLMSG_DONE (dumps).
    fn transact(&mut self, req: Request) -> Result<Vec<(u16, Vec<u8>)>, NlError> {
        let seq = self.send(req)?;
        let mut out = Vec::new();
        let mut interrupted = false;
        loop {
            let n = self.recv()?;
            for msg in netlink::messages(&self.buf[..n]) {
                let msg = msg.map_err(NlError::Malformed)?;
                if msg.seq != seq {
                    continue;
                }
                if msg.flags & NLM_F_DUMP_INTR != 0 {
                    interrupted = true;
                }
                match msg.ty {
                    NLMSG_NOOP => {}
                    NLMSG_ERROR => {
                        return match netlink::parse_error(&msg).map_err(NlError::Malformed)? {
                            Ok(()) => Ok(out),
                            Err((errno, ext_ack)) => Err(NlError::Kernel { errno, ext_ack }),
                        };
                    }
                    NLMSG_DONE => {
                        let errno = netlink::parse_done(&msg);
                        if errno != 0 {
                            return Err(NlError::Kernel {
                                errno,
                                ext_ack: None,
                            });
                        }
                        return if interrupted {
                            Err(NlError::Interrupted(out))
                        } else {
                            Ok(out)
                        };
                    }
                    NLMSG_OVERRUN => return Err(NlError::Malformed("NLMSG_OVERRUN".into())),
                    ty => out.push((ty, msg.payload.to_vec())),
                }
            }
        }
    }
}

fn request(req: Request) -> Result<Vec<(u16, Vec<u8>)>, NlError> {
    Rtnl::open()?.transact(req)
}

/// A dump, retried a few times if the kernel says it changed midway; the
/// last (possibly inconsistent) view is better than none.
fn dump(make: impl Fn() -> Request) -> Result<Vec<(u16, Vec<u8>)>, NlError> {
    let mut nl = Rtnl::open()?;
    let mut last = Vec::new();
    for _ in 0..4 {
        match nl.transact(make()) {
            Err(NlError::Interrupted(partial)) => last = partial,
            other => return other,
        }
    }
    Ok(last)
}

/// The interface's name for an error message, or "ifindex N".
fn ifname(index: u32) -> String {
    link(index)
        .map(|l| l.name)
        .unwrap_or_else(|_| format!("ifindex {index}"))
}

fn invalid(op: &str, reason: String) -> NetError {
    NetError::Invalid {
        op: op.to_string(),
        reason,
    }
}

/// Every link in this network namespace (RTM_GETLINK dump).
pub fn links() -> Result<Vec<Link>, NetError> {
    let replies = dump(netlink::getlink_dump).map_err(|e| e.at("RTM_GETLINK dump", ""))?;
    Ok(replies
        .iter()
        .filter(|(ty, _)| *ty == RTM_NEWLINK)
        .filter_map(|(_, p)| parse_link(p))
        .collect())
}

fn one_link(replies: Vec<(u16, Vec<u8>)>, op: &str, iface: &str) -> Result<Link, NetError> {
    replies
        .iter()
        .filter(|(ty, _)| *ty == RTM_NEWLINK)
        .find_map(|(_, p)| parse_link(p))
        .ok_or_else(|| NetError::Malformed {
            op: op.to_string(),
            iface: iface.to_string(),
            detail: "no readable RTM_NEWLINK in the answer".into(),
        })
}

/// One link by index.
pub fn link(index: u32) -> Result<Link, NetError> {
    let iface = format!("ifindex {index}");
    let replies =
        request(netlink::getlink_index(index)).map_err(|e| e.at("RTM_GETLINK", &iface))?;
    one_link(replies, "RTM_GETLINK", &iface)
}

/// One link by name.
pub fn link_by_name(name: &str) -> Result<Link, NetError> {
    netlink::check_ifname(name).map_err(|r| invalid("RTM_GETLINK", r))?;
    let replies = request(netlink::getlink_name(name)).map_err(|e| e.at("RTM_GETLINK", name))?;
    one_link(replies, "RTM_GETLINK", name)
}

/// Sets the link administratively up (RTM_NEWLINK with IFF_UP).
pub fn set_up(index: u32) -> Result<(), NetError> {
    request(netlink::setlink_up(index))
        .map(drop)
        .map_err(|e| e.at("RTM_NEWLINK up", &ifname(index)))
}

/// Brings `lo` up; the kernel then adds 127.0.0.1/8 and ::1 itself.
pub fn loopback_up() -> Result<(), NetError> {
    let lo = links()?
        .into_iter()
        .find(|l| l.is_loopback)
        .ok_or_else(|| NetError::Invalid {
            op: "loopback up".into(),
            reason: "this network namespace has no loopback interface".into(),
        })?;
    set_up(lo.index)
}

/// Waits up to `timeout` for carrier on the link; `Ok(false)` if none came.
/// Polls over netlink rather than /sys, which shows the namespace sysfs was
/// mounted in, not the caller's.
pub fn wait_carrier(index: u32, timeout: Duration) -> Result<bool, NetError> {
    let deadline = sys::deadline(timeout);
    loop {
        if link(index)?.carrier {
            return Ok(true);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        std::thread::sleep(POLL_CARRIER.min(deadline - now));
    }
}

/// Adds `addr/prefix` to the link (with the subnet broadcast for v4). An
/// address that is already there is fine.
pub fn add_address(index: u32, addr: IpAddr, prefix: u8) -> Result<(), NetError> {
    let op = format!("RTM_NEWADDR {addr}/{prefix}");
    netlink::check_prefix(addr, prefix).map_err(|r| invalid(&op, r))?;
    match request(netlink::newaddr(index, addr, prefix)) {
        Ok(_) => Ok(()),
        Err(e) if e.errno() == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(e.at(&op, &ifname(index))),
    }
}

/// Removes `addr/prefix` from the link; an address that is not there is fine.
pub fn del_address(index: u32, addr: IpAddr, prefix: u8) -> Result<(), NetError> {
    let op = format!("RTM_DELADDR {addr}/{prefix}");
    netlink::check_prefix(addr, prefix).map_err(|r| invalid(&op, r))?;
    match request(netlink::deladdr(index, addr, prefix)) {
        Ok(_) => Ok(()),
        Err(e) if e.errno() == Some(libc::EADDRNOTAVAIL) => Ok(()),
        Err(e) => Err(e.at(&op, &ifname(index))),
    }
}

/// The addresses on one link, v4 and v6, as (address, prefix).
pub fn addresses(index: u32) -> Result<Vec<(IpAddr, u8)>, NetError> {
    let replies =
        dump(netlink::getaddr_dump).map_err(|e| e.at("RTM_GETADDR dump", &ifname(index)))?;
    Ok(replies
        .iter()
        .filter(|(ty, _)| *ty == RTM_NEWADDR)
        .filter_map(|(_, p)| parse_addr(p))
        .filter(|(i, _, _)| *i == index)
        .map(|(_, ip, prefix)| (ip, prefix))
        .collect())
}

fn route_op(dst: Option<(IpAddr, u8)>, gateway: Option<IpAddr>) -> String {
    let mut op = match dst {
        Some((d, p)) if p > 0 => format!("RTM_NEWROUTE {}/{p}", netlink::network(d, p)),
        _ => "RTM_NEWROUTE default".to_string(),
    };
    if let Some(g) = gateway {
        op.push_str(&format!(" via {g}"));
    }
    op
}

pub(crate) fn add_route_proto(
    dst: Option<(IpAddr, u8)>,
    gateway: Option<IpAddr>,
    index: u32,
    protocol: u8,
) -> Result<(), NetError> {
    let op = route_op(dst, gateway);
    let req = netlink::newroute(dst, gateway, index, protocol).map_err(|r| invalid(&op, r))?;
    match request(req) {
        Ok(_) => Ok(()),
        Err(e) if e.errno() == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(e.at(&op, &ifname(index))),
    }
}

/// Adds a route in the main table out of link `index`: `dst` None is the
/// default route; without a gateway the route is on-link. A route that is
/// already there is fine (and is left as it is).
pub fn add_route(
    dst: Option<(IpAddr, u8)>,
    gateway: Option<IpAddr>,
    index: u32,
) -> Result<(), NetError> {
    add_route_proto(dst, gateway, index, RTPROT_BOOT)
}

/// Creates an 802.1Q VLAN `name` with `vlan_id` on `parent` and returns its
/// index. If that exact VLAN already exists, returns it.
pub fn add_vlan(parent: u32, name: &str, vlan_id: u16) -> Result<u32, NetError> {
    let op = format!("RTM_NEWLINK vlan {name} id {vlan_id}");
    netlink::check_ifname(name).map_err(|r| invalid(&op, r))?;
    if !(1..=4094).contains(&vlan_id) {
        return Err(invalid(
            &op,
            format!("VLAN id {vlan_id} is outside 1..=4094"),
        ));
    }
    match request(netlink::newlink_vlan(parent, name, vlan_id)) {
        Ok(_) => Ok(link_by_name(name)?.index),
        Err(e) if e.errno() == Some(libc::EEXIST) => match link_by_name(name) {
            Ok(l)
                if l.kind.as_deref() == Some("vlan")
                    && l.parent == Some(parent)
                    && l.vlan_id == Some(vlan_id) =>
            {
                Ok(l.index)
            }
            _ => Err(e.at(&op, &ifname(parent))),
        },
        Err(e) => Err(e.at(&op, &ifname(parent))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a thread in a fresh network namespace of its own (gone
    /// when the thread ends); None without root.
    fn in_private_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        std::thread::spawn(move || {
            // SAFETY: affects only this thread's network namespace.
            (unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0).then(f)
        })
        .join()
        .ok()
        .flatten()
    }

    #[test]
    fn link_kinds_and_parents_against_the_kernel() {
        let ran = in_private_netns(|| {
            let links = links().expect("links");
            assert_eq!(links.len(), 1, "a new namespace has only lo: {links:?}");
            assert!(links[0].is_loopback && !links[0].up);
            loopback_up().expect("loopback_up");
            assert!(link(links[0].index).expect("link").up);

            match request(netlink::newlink_kind(None, "kbr0", "bridge")) {
                Ok(_) => {}
                Err(e) if e.errno() == Some(libc::EOPNOTSUPP) => {
                    kiln_testkit::skip(
                        "link_kinds_and_parents_against_the_kernel: no bridge driver",
                    );
                    return;
                }
                Err(e) => panic!("add bridge: {e:?}"),
            }
            let br = link_by_name("kbr0").expect("kbr0");
            assert_eq!(br.kind.as_deref(), Some("bridge"));
            assert!(br.mac.is_some());
            request(netlink::newlink_kind(Some(br.index), "kmv0", "macvlan")).expect("add macvlan");
            let mv = link_by_name("kmv0").expect("kmv0");
            assert_eq!(
                (mv.kind.as_deref(), mv.parent),
                (Some("macvlan"), Some(br.index))
            );

            match add_vlan(br.index, "kbr0.5", 5) {
                Ok(ix) => {
                    let v = link(ix).expect("vlan link");
                    assert_eq!(
                        (v.kind.as_deref(), v.parent, v.vlan_id),
                        (Some("vlan"), Some(br.index), Some(5))
                    );
                    assert_eq!(add_vlan(br.index, "kbr0.5", 5).expect("again"), ix);
                    let e = add_vlan(br.index, "kbr0.5", 6).expect_err("same name, other id");
                    assert_eq!(e.errno(), Some(libc::EEXIST));
                }
                Err(e) => assert_eq!(e.errno(), Some(libc::EOPNOTSUPP), "{e}"),
            }
            // A name taken by something that is not that VLAN.
            let e = add_vlan(br.index, "kmv0", 5).expect_err("kmv0 is a macvlan");
            assert!(e.to_string().contains("on kbr0"), "{e}");
        });
        if ran.is_none() {
            kiln_testkit::skip(
                "link_kinds_and_parents_against_the_kernel: needs root and unshare(CLONE_NEWNET)",
            );
        }
    }
}
