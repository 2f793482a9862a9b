//! The rtnetlink wire format: building requests and walking replies.
//!
//! Pure: no sockets, so every byte layout is unit-tested and arbitrary input
//! is fuzzed. Headers are in native byte order (netlink is host-local);
//! layouts follow the kernel uapi structs byte by byte, never a Rust struct,
//! so armv7 and aarch64 get the same encoding as x86_64.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

// <linux/netlink.h>
pub const NLMSG_HDRLEN: usize = 16;
pub const NLMSG_NOOP: u16 = 1;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLMSG_OVERRUN: u16 = 4;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP_INTR: u16 = 0x10;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_REPLACE: u16 = 0x100;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
/// In an NLMSG_ERROR: the echoed request was cut to its header.
pub const NLM_F_CAPPED: u16 = 0x100;
/// In an NLMSG_ERROR: extended-ack attributes follow.
pub const NLM_F_ACK_TLVS: u16 = 0x200;
pub const NLMSGERR_ATTR_MSG: u16 = 1;
pub const NETLINK_CAP_ACK: libc::c_int = 10;
pub const NETLINK_EXT_ACK: libc::c_int = 11;
const NLA_TYPE_MASK: u16 = 0x3fff;

// <linux/rtnetlink.h>
pub const RTM_NEWLINK: u16 = 16;
pub const RTM_GETLINK: u16 = 18;
pub const RTM_NEWADDR: u16 = 20;
pub const RTM_DELADDR: u16 = 21;
pub const RTM_GETADDR: u16 = 22;
pub const RTM_NEWROUTE: u16 = 24;
pub const RT_TABLE_MAIN: u8 = 254;
pub const RTPROT_BOOT: u8 = 3;
pub const RTPROT_DHCP: u8 = 16;
pub const RT_SCOPE_UNIVERSE: u8 = 0;
pub const RT_SCOPE_LINK: u8 = 253;
pub const RT_SCOPE_HOST: u8 = 254;
pub const RTN_UNICAST: u8 = 1;
pub const RTA_DST: u16 = 1;
pub const RTA_OIF: u16 = 4;
pub const RTA_GATEWAY: u16 = 5;
pub const RTA_TABLE: u16 = 15;

// <linux/if_link.h>, <linux/if_addr.h>, <linux/if.h>
pub const IFLA_ADDRESS: u16 = 1;
pub const IFLA_IFNAME: u16 = 3;
pub const IFLA_MTU: u16 = 4;
pub const IFLA_LINK: u16 = 5;
pub const IFLA_LINKINFO: u16 = 18;
pub const IFLA_CARRIER: u16 = 33;
pub const IFLA_INFO_KIND: u16 = 1;
pub const IFLA_INFO_DATA: u16 = 2;
pub const IFLA_VLAN_ID: u16 = 1;
pub const IFA_ADDRESS: u16 = 1;
pub const IFA_LOCAL: u16 = 2;
pub const IFA_BROADCAST: u16 = 4;
pub const IFF_UP: u32 = 0x1;
pub const IFF_LOOPBACK: u32 = 0x8;
pub const IFF_LOWER_UP: u32 = 0x1_0000;
pub const ARPHRD_LOOPBACK: u16 = 772;

pub const AF_UNSPEC: u8 = libc::AF_UNSPEC as u8;
pub const AF_INET: u8 = libc::AF_INET as u8;
pub const AF_INET6: u8 = libc::AF_INET6 as u8;

/// Longest interface name (IFNAMSIZ without the NUL).
pub const IFNAME_MAX: usize = 15;

/// One network interface, as RTM_GETLINK reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The hardware address, when it is 6 bytes long (Ethernet and friends).
    pub mac: Option<[u8; 6]>,
    pub is_loopback: bool,
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// Up and the lower layer has carrier (IFF_LOWER_UP).
    pub carrier: bool,
    pub mtu: u32,
    /// The driver kind from IFLA_LINKINFO, e.g. "vlan", "veth"; None for
    /// plain hardware.
    pub kind: Option<String>,
    /// The lower device (IFLA_LINK), e.g. a VLAN's parent. For a veth this
    /// may be an index in another namespace.
    pub parent: Option<u32>,
    /// The 802.1Q id, for kind "vlan".
    pub vlan_id: Option<u16>,
}

pub fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_ne_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

/// A netlink request under construction: header, fixed part, attributes.
#[derive(Debug, Clone)]
pub struct Request {
    buf: Vec<u8>,
}

impl Request {
    pub fn new(ty: u16, flags: u16) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish()
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // seq, set by finish()
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: 0 = let the kernel route it
        Request { buf }
    }

    /// `struct ifinfomsg` (16 bytes).
    pub fn ifinfomsg(mut self, family: u8, index: u32, flags: u32, change: u32) -> Self {
        self.buf.push(family);
        self.buf.push(0);
        self.buf.extend_from_slice(&0u16.to_ne_bytes()); // ifi_type
        self.buf.extend_from_slice(&index.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&change.to_ne_bytes());
        self
    }

    /// `struct ifaddrmsg` (8 bytes).
    pub fn ifaddrmsg(mut self, family: u8, prefix: u8, scope: u8, index: u32) -> Self {
        self.buf.extend_from_slice(&[family, prefix, 0, scope]);
        self.buf.extend_from_slice(&index.to_ne_bytes());
        self
    }

    /// `struct rtmsg` (12 bytes).
    pub fn rtmsg(
        mut self,
        family: u8,
        dst_len: u8,
        table: u8,
        protocol: u8,
        scope: u8,
        ty: u8,
    ) -> Self {
        self.buf
            .extend_from_slice(&[family, dst_len, 0, 0, table, protocol, scope, ty]);
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self
    }

    fn pad(&mut self) {
        while self.buf.len() & 3 != 0 {
            self.buf.push(0);
        }
    }

    pub fn attr(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        // Callers pass short values; an oversized one turns into a length
        // the kernel rejects, never a panic.
        let len = u16::try_from(4 + data.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    pub fn attr_u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.attr(ty, &v.to_ne_bytes())
    }

    /// A NUL-terminated string attribute.
    pub fn attr_str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut data = Vec::with_capacity(s.len() + 1);
        data.extend_from_slice(s.as_bytes());
        data.push(0);
        self.attr(ty, &data)
    }

    pub fn attr_ip(&mut self, ty: u16, ip: IpAddr) -> &mut Self {
        match ip {
            IpAddr::V4(a) => self.attr(ty, &a.octets()),
            IpAddr::V6(a) => self.attr(ty, &a.octets()),
        }
    }

    /// Opens a nested attribute; close it with [`Request::nest_end`].
    pub fn nest_start(&mut self, ty: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        at
    }

    pub fn nest_end(&mut self, at: usize) -> &mut Self {
        let len = u16::try_from(self.buf.len().saturating_sub(at)).unwrap_or(u16::MAX);
        if let Some(s) = self.buf.get_mut(at..at + 2) {
            s.copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    /// The finished message with its length and sequence number filled in.
    pub fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

/// One netlink message out of a received datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    pub port: u32,
    pub payload: &'a [u8],
}

/// Walks the messages of one datagram. Yields `Err` once, then stops, if a
/// header is short or claims more bytes than there are.
pub fn messages(buf: &[u8]) -> Messages<'_> {
    Messages { rest: buf }
}

pub struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let rest = self.rest;
        let header = (|| {
            let len = u32_at(rest, 0)? as usize;
            Some((
                len,
                u16_at(rest, 4)?,
                u16_at(rest, 6)?,
                u32_at(rest, 8)?,
                u32_at(rest, 12)?,
            ))
        })();
        let Some((len, ty, flags, seq, port)) = header else {
            self.rest = &[];
            return Some(Err(format!(
                "{} trailing bytes, shorter than a netlink header",
                rest.len()
            )));
        };
        if len < NLMSG_HDRLEN || len > rest.len() {
            self.rest = &[];
            return Some(Err(format!(
                "netlink message claims {len} bytes, {} left",
                rest.len()
            )));
        }
        let payload = rest.get(NLMSG_HDRLEN..len).unwrap_or(&[]);
        self.rest = rest.get(align4(len).min(rest.len())..).unwrap_or(&[]);
        Some(Ok(Message {
            ty,
            flags,
            seq,
            port,
            payload,
        }))
    }
}

/// Walks netlink attributes; stops quietly at a malformed one (the kernel
/// never sends those, and a partial view is safer than an error in PID 1).
pub fn attrs(buf: &[u8]) -> Attrs<'_> {
    Attrs { rest: buf }
}

pub struct Attrs<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Attrs<'a> {
    /// (type without the NESTED/BYTEORDER bits, value)
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.rest;
        let (Some(len), Some(ty)) = (u16_at(rest, 0), u16_at(rest, 2)) else {
            self.rest = &[];
            return None;
        };
        let len = usize::from(len);
        let Some(data) = rest.get(4..len).filter(|_| len >= 4) else {
            self.rest = &[];
            return None;
        };
        self.rest = rest.get(align4(len).min(rest.len())..).unwrap_or(&[]);
        Some((ty & NLA_TYPE_MASK, data))
    }
}

/// The bytes up to the first NUL, if they are UTF-8.
pub fn attr_string(data: &[u8]) -> Option<String> {
    let end = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    std::str::from_utf8(&data[..end]).ok().map(str::to_string)
}

fn attr_u32(data: &[u8]) -> Option<u32> {
    (data.len() == 4).then(|| u32_at(data, 0)).flatten()
}

pub fn ip_from_bytes(data: &[u8]) -> Option<IpAddr> {
    if let Ok(b) = <[u8; 4]>::try_from(data) {
        return Some(IpAddr::V4(Ipv4Addr::from(b)));
    }
    if let Ok(b) = <[u8; 16]>::try_from(data) {
        return Some(IpAddr::V6(Ipv6Addr::from(b)));
    }
    None
}

/// The answer carried by an NLMSG_ERROR: `Ok(())` for an ack, or the
/// positive errno and the kernel's extended-ack text.
pub fn parse_error(msg: &Message<'_>) -> Result<Result<(), (i32, Option<String>)>, String> {
    let p = msg.payload;
    let code = u32_at(p, 0).ok_or("NLMSG_ERROR shorter than its error code")? as i32;
    if code == 0 {
        return Ok(Ok(()));
    }
    let errno = code.checked_neg().filter(|e| *e > 0).unwrap_or(libc::EIO);
    let mut ext = None;
    if msg.flags & NLM_F_ACK_TLVS != 0 {
        // The request is echoed after the code: just its header if capped.
        let echoed = if msg.flags & NLM_F_CAPPED != 0 {
            NLMSG_HDRLEN
        } else {
            u32_at(p, 4)
                .map(|l| align4(l as usize))
                .unwrap_or(NLMSG_HDRLEN)
        };
        let tlvs = 4usize
            .checked_add(echoed)
            .and_then(|at| p.get(at..))
            .unwrap_or(&[]);
        ext = attrs(tlvs)
            .find(|(ty, _)| *ty == NLMSGERR_ATTR_MSG)
            .and_then(|(_, v)| attr_string(v))
            .filter(|s| !s.is_empty());
    }
    Ok(Err((errno, ext)))
}

/// The error code an NLMSG_DONE may carry (a dump that failed midway).
pub fn parse_done(msg: &Message<'_>) -> i32 {
    u32_at(msg.payload, 0)
        .map(|c| c as i32)
        .filter(|c| *c < 0)
        .map(|c| c.saturating_neg())
        .unwrap_or(0)
}

/// A link out of an RTM_NEWLINK payload; `None` if it is too short or nameless.
pub fn parse_link(payload: &[u8]) -> Option<Link> {
    let ifi_type = u16_at(payload, 2)?;
    let index = u32_at(payload, 4)?;
    let flags = u32_at(payload, 8)?;
    let attrs_at = payload.get(16..)?;
    let mut name = None;
    let mut mac = None;
    let mut mtu = 0;
    let mut kind = None;
    let mut info_data: Option<&[u8]> = None;
    let mut parent = None;
    let mut carrier_attr = None;
    for (ty, data) in attrs(attrs_at) {
        match ty {
            IFLA_IFNAME => name = attr_string(data),
            IFLA_ADDRESS => mac = <[u8; 6]>::try_from(data).ok(),
            IFLA_MTU => mtu = attr_u32(data).unwrap_or(0),
            IFLA_LINK => parent = attr_u32(data).filter(|p| *p != 0),
            IFLA_CARRIER => carrier_attr = data.first().map(|c| *c != 0),
            IFLA_LINKINFO => {
                for (ity, idata) in attrs(data) {
                    match ity {
                        IFLA_INFO_KIND => kind = attr_string(idata).filter(|k| !k.is_empty()),
                        IFLA_INFO_DATA => info_data = Some(idata),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let vlan_id = match (kind.as_deref(), info_data) {
        (Some("vlan"), Some(d)) => attrs(d)
            .find(|(ty, _)| *ty == IFLA_VLAN_ID)
            .and_then(|(_, v)| u16_at(v, 0)),
        _ => None,
    };
    let name = name.filter(|n| !n.is_empty())?;
    let up = flags & IFF_UP != 0;
    Some(Link {
        index,
        name,
        mac,
        is_loopback: flags & IFF_LOOPBACK != 0 || ifi_type == ARPHRD_LOOPBACK,
        up,
        carrier: flags & IFF_LOWER_UP != 0 || (up && carrier_attr == Some(true)),
        mtu,
        kind,
        parent,
        vlan_id,
    })
}

/// An address out of an RTM_NEWADDR payload: (ifindex, address, prefix).
/// IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on
/// point-to-point links, so LOCAL wins when both are present.
pub fn parse_addr(payload: &[u8]) -> Option<(u32, IpAddr, u8)> {
    let family = *payload.first()?;
    let prefix = *payload.get(1)?;
    let index = u32_at(payload, 4)?;
    let mut local = None;
    let mut address = None;
    for (ty, data) in attrs(payload.get(8..)?) {
        match ty {
            IFA_LOCAL => local = ip_from_bytes(data),
            IFA_ADDRESS => address = ip_from_bytes(data),
            _ => {}
        }
    }
    let ip = local.or(address)?;
    let family_ok = match ip {
        IpAddr::V4(_) => family == AF_INET,
        IpAddr::V6(_) => family == AF_INET6,
    };
    family_ok.then_some((index, ip, prefix))
}

/// `addr` with the host bits cleared, as the kernel wants a route's dst.
pub fn network(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & v4_mask(prefix))),
        IpAddr::V6(a) => {
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix.min(128)))
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

pub fn v4_mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    }
}

/// The directed broadcast of a v4 subnet; none for /31 and /32.
pub fn v4_broadcast(addr: Ipv4Addr, prefix: u8) -> Option<Ipv4Addr> {
    (prefix <= 30).then(|| Ipv4Addr::from(u32::from(addr) | !v4_mask(prefix)))
}

/// Why the kernel would reject `name` as an interface name.
pub fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > IFNAME_MAX {
        return Err(format!(
            "interface name {name:?} must be 1 to {IFNAME_MAX} bytes"
        ));
    }
    if name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        return Err(format!(
            "interface name {name:?} may not be . or .. or contain '/', ':' or whitespace"
        ));
    }
    Ok(())
}

pub fn check_prefix(addr: IpAddr, prefix: u8) -> Result<(), String> {
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(format!("prefix /{prefix} is longer than /{max}"));
    }
    Ok(())
}

// Requests. Each returns an unfinished [`Request`]; the socket fills in seq.

pub fn getlink_dump() -> Request {
    Request::new(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP).ifinfomsg(AF_UNSPEC, 0, 0, 0)
}

pub fn getlink_index(index: u32) -> Request {
    Request::new(RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK).ifinfomsg(AF_UNSPEC, index, 0, 0)
}

pub fn getlink_name(name: &str) -> Request {
    let mut r = Request::new(RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK).ifinfomsg(AF_UNSPEC, 0, 0, 0);
    r.attr_str(IFLA_IFNAME, name);
    r
}

pub fn setlink_up(index: u32) -> Request {
    Request::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK).ifinfomsg(AF_UNSPEC, index, IFF_UP, IFF_UP)
}

/// Creates `name` of a driver `kind` that needs no IFLA_INFO_DATA (bridge,
/// macvlan in its default mode), optionally on a lower device.
pub fn newlink_kind(parent: Option<u32>, name: &str, kind: &str) -> Request {
    let mut r = Request::new(
        RTM_NEWLINK,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE,
    )
    .ifinfomsg(AF_UNSPEC, 0, 0, 0);
    if let Some(p) = parent {
        r.attr_u32(IFLA_LINK, p);
    }
    r.attr_str(IFLA_IFNAME, name);
    let info = r.nest_start(IFLA_LINKINFO);
    r.attr(IFLA_INFO_KIND, kind.as_bytes());
    r.nest_end(info);
    r
}

/// Creates `name`, an 802.1Q VLAN on `parent` (same layout as
/// `ip link add link PARENT name NAME type vlan id ID`).
pub fn newlink_vlan(parent: u32, name: &str, vlan_id: u16) -> Request {
    let mut r = Request::new(
        RTM_NEWLINK,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE,
    )
    .ifinfomsg(AF_UNSPEC, 0, 0, 0);
    r.attr_u32(IFLA_LINK, parent);
    r.attr_str(IFLA_IFNAME, name);
    let info = r.nest_start(IFLA_LINKINFO);
    r.attr(IFLA_INFO_KIND, b"vlan");
    let data = r.nest_start(IFLA_INFO_DATA);
    r.attr(IFLA_VLAN_ID, &vlan_id.to_ne_bytes());
    r.nest_end(data);
    r.nest_end(info);
    r
}

fn addr_family(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    }
}

/// Adds `addr/prefix`, with the subnet broadcast for v4. Loopback v4
/// addresses get host scope, as `ip addr add` gives them.
pub fn newaddr(index: u32, addr: IpAddr, prefix: u8) -> Request {
    let scope = match addr {
        IpAddr::V4(a) if a.is_loopback() => RT_SCOPE_HOST,
        _ => RT_SCOPE_UNIVERSE,
    };
    let mut r = Request::new(
        RTM_NEWADDR,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE,
    )
    .ifaddrmsg(addr_family(addr), prefix, scope, index);
    r.attr_ip(IFA_LOCAL, addr);
    r.attr_ip(IFA_ADDRESS, addr);
    if let IpAddr::V4(a) = addr {
        if let Some(brd) = v4_broadcast(a, prefix) {
            r.attr(IFA_BROADCAST, &brd.octets());
        }
    }
    r
}

pub fn deladdr(index: u32, addr: IpAddr, prefix: u8) -> Request {
    let mut r = Request::new(RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK).ifaddrmsg(
        addr_family(addr),
        prefix,
        0,
        index,
    );
    r.attr_ip(IFA_LOCAL, addr);
    r.attr_ip(IFA_ADDRESS, addr);
    r
}

pub fn getaddr_dump() -> Request {
    Request::new(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP).ifaddrmsg(AF_UNSPEC, 0, 0, 0)
}

/// A unicast route in the main table. `dst` None is the default route.
/// Without a gateway the route is on-link (scope link). Fails if the
/// families of `dst` and `gateway` differ.
pub fn newroute(
    dst: Option<(IpAddr, u8)>,
    gateway: Option<IpAddr>,
    index: u32,
    protocol: u8,
) -> Result<Request, String> {
    let family = match (dst, gateway) {
        (Some((d, _)), Some(g)) if d.is_ipv4() != g.is_ipv4() => {
            return Err(format!(
                "destination {d} and gateway {g} are of different families"
            ));
        }
        (Some((d, _)), _) => addr_family(d),
        (None, Some(g)) => addr_family(g),
        (None, None) => AF_INET,
    };
    let dst_len = dst.map(|(_, p)| p).unwrap_or(0);
    if let Some((d, p)) = dst {
        check_prefix(d, p)?;
    }
    let scope = if gateway.is_some() {
        RT_SCOPE_UNIVERSE
    } else {
        RT_SCOPE_LINK
    };
    let mut r = Request::new(
        RTM_NEWROUTE,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE,
    )
    .rtmsg(family, dst_len, RT_TABLE_MAIN, protocol, scope, RTN_UNICAST);
    if let Some((d, p)) = dst.filter(|(_, p)| *p > 0) {
        r.attr_ip(RTA_DST, network(d, p));
    }
    if let Some(g) = gateway {
        r.attr_ip(RTA_GATEWAY, g);
    }
    r.attr_u32(RTA_OIF, index);
    r.attr_u32(RTA_TABLE, u32::from(RT_TABLE_MAIN));
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ne16(v: u16) -> [u8; 2] {
        v.to_ne_bytes()
    }
    fn ne32(v: u32) -> [u8; 4] {
        v.to_ne_bytes()
    }

    /// What iproute2 sent for `ip link add link b0 name b0.42 type vlan id 42`
    /// (captured with strace), with our seq.
    #[test]
    fn vlan_request_matches_iproute2() {
        let mut want = Vec::new();
        want.extend(ne32(76));
        want.extend(ne16(RTM_NEWLINK));
        want.extend(ne16(NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE));
        want.extend(ne32(9)); // seq
        want.extend(ne32(0)); // port
        want.extend([0u8; 16]); // ifinfomsg
        want.extend(ne16(8));
        want.extend(ne16(IFLA_LINK));
        want.extend(ne32(2));
        want.extend(ne16(10));
        want.extend(ne16(IFLA_IFNAME));
        want.extend(b"b0.42\0\0\0");
        want.extend(ne16(24));
        want.extend(ne16(IFLA_LINKINFO));
        want.extend(ne16(8));
        want.extend(ne16(IFLA_INFO_KIND));
        want.extend(b"vlan");
        want.extend(ne16(12));
        want.extend(ne16(IFLA_INFO_DATA));
        want.extend(ne16(6));
        want.extend(ne16(IFLA_VLAN_ID));
        want.extend(ne16(42));
        want.extend([0, 0]);
        assert_eq!(newlink_vlan(2, "b0.42", 42).finish(9), want);
    }

    #[test]
    fn newaddr_v4_carries_broadcast() {
        let bytes = newaddr(3, "10.0.2.15".parse().unwrap(), 24).finish(1);
        let msg = messages(&bytes).next().unwrap().unwrap();
        assert_eq!(msg.ty, RTM_NEWADDR);
        assert_eq!(&msg.payload[..4], &[AF_INET, 24, 0, RT_SCOPE_UNIVERSE]);
        assert_eq!(&msg.payload[4..8], &ne32(3));
        let got: Vec<_> = attrs(&msg.payload[8..]).collect();
        assert_eq!(
            got,
            vec![
                (IFA_LOCAL, &[10u8, 0, 2, 15][..]),
                (IFA_ADDRESS, &[10u8, 0, 2, 15][..]),
                (IFA_BROADCAST, &[10u8, 0, 2, 255][..]),
            ]
        );
        assert_eq!(
            parse_addr(msg.payload),
            Some((3, "10.0.2.15".parse().unwrap(), 24))
        );
    }

    #[test]
    fn newaddr_loopback_is_host_scope_and_v6_has_no_broadcast() {
        let bytes = newaddr(1, "127.0.0.2".parse().unwrap(), 8).finish(1);
        assert_eq!(bytes[16 + 3], RT_SCOPE_HOST);
        let bytes = newaddr(2, "fd00::5".parse().unwrap(), 64).finish(1);
        let msg = messages(&bytes).next().unwrap().unwrap();
        assert_eq!(msg.payload[0], AF_INET6);
        assert!(attrs(&msg.payload[8..]).all(|(ty, _)| ty != IFA_BROADCAST));
    }

    #[test]
    fn route_masks_destination_and_checks_families() {
        let r = newroute(
            Some(("10.1.2.3".parse().unwrap(), 16)),
            Some("10.0.0.1".parse().unwrap()),
            4,
            RTPROT_BOOT,
        )
        .unwrap()
        .finish(1);
        let msg = messages(&r).next().unwrap().unwrap();
        assert_eq!(
            &msg.payload[..8],
            &[
                AF_INET,
                16,
                0,
                0,
                RT_TABLE_MAIN,
                RTPROT_BOOT,
                RT_SCOPE_UNIVERSE,
                RTN_UNICAST
            ]
        );
        let got: Vec<_> = attrs(&msg.payload[12..]).collect();
        assert_eq!(got[0], (RTA_DST, &[10u8, 1, 0, 0][..]));
        assert_eq!(got[1], (RTA_GATEWAY, &[10u8, 0, 0, 1][..]));
        assert_eq!(got[2], (RTA_OIF, &ne32(4)[..]));

        // Default route: no RTA_DST at all.
        let r = newroute(None, Some("10.0.0.1".parse().unwrap()), 4, RTPROT_DHCP)
            .unwrap()
            .finish(1);
        let msg = messages(&r).next().unwrap().unwrap();
        assert_eq!(msg.payload[1], 0);
        assert!(attrs(&msg.payload[12..]).all(|(ty, _)| ty != RTA_DST));

        // On-link route: scope link.
        let r = newroute(
            Some(("10.0.0.1".parse().unwrap(), 32)),
            None,
            4,
            RTPROT_DHCP,
        )
        .unwrap()
        .finish(1);
        assert_eq!(r[16 + 6], RT_SCOPE_LINK);

        assert!(newroute(
            Some(("10.0.0.0".parse().unwrap(), 8)),
            Some("fe80::1".parse().unwrap()),
            1,
            3
        )
        .is_err());
        assert!(newroute(Some(("10.0.0.0".parse().unwrap(), 33)), None, 1, 3).is_err());
    }

    fn newlink_reply(flags: u32, ifi_type: u16, extra: &dyn Fn(&mut Request)) -> Vec<u8> {
        let mut r = Request::new(RTM_NEWLINK, 0);
        r.buf.push(AF_UNSPEC);
        r.buf.push(0);
        r.buf.extend(ne16(ifi_type));
        r.buf.extend(ne32(7));
        r.buf.extend(ne32(flags));
        r.buf.extend(ne32(0));
        extra(&mut r);
        r.finish(0)
    }

    #[test]
    fn parses_a_vlan_link() {
        let bytes = newlink_reply(IFF_UP | IFF_LOWER_UP, 1, &|r| {
            r.attr_str(IFLA_IFNAME, "eth0.42");
            r.attr(IFLA_ADDRESS, &[2, 0, 0, 0, 0, 1]);
            r.attr_u32(IFLA_MTU, 1500);
            r.attr_u32(IFLA_LINK, 2);
            r.attr(IFLA_CARRIER, &[1]);
            let info = r.nest_start(IFLA_LINKINFO | 0x8000);
            r.attr_str(IFLA_INFO_KIND, "vlan");
            let data = r.nest_start(IFLA_INFO_DATA);
            r.attr(IFLA_VLAN_ID, &ne16(42));
            r.nest_end(data);
            r.nest_end(info);
        });
        let msg = messages(&bytes).next().unwrap().unwrap();
        let link = parse_link(msg.payload).unwrap();
        assert_eq!(
            link,
            Link {
                index: 7,
                name: "eth0.42".into(),
                mac: Some([2, 0, 0, 0, 0, 1]),
                is_loopback: false,
                up: true,
                carrier: true,
                mtu: 1500,
                kind: Some("vlan".into()),
                parent: Some(2),
                vlan_id: Some(42),
            }
        );
    }

    #[test]
    fn carrier_needs_the_link_up() {
        let bytes = newlink_reply(0, 1, &|r| {
            r.attr_str(IFLA_IFNAME, "eth0");
            r.attr(IFLA_CARRIER, &[1]);
        });
        let msg = messages(&bytes).next().unwrap().unwrap();
        let link = parse_link(msg.payload).unwrap();
        assert!(!link.up && !link.carrier && link.kind.is_none());
        let bytes = newlink_reply(
            IFF_UP | IFF_LOOPBACK | IFF_LOWER_UP,
            ARPHRD_LOOPBACK,
            &|r| {
                r.attr_str(IFLA_IFNAME, "lo");
            },
        );
        let link = parse_link(messages(&bytes).next().unwrap().unwrap().payload).unwrap();
        assert!(link.is_loopback && link.carrier);
    }

    #[test]
    fn parses_errors_with_and_without_ext_ack() {
        // Capped ack with an extended-ack message.
        let mut p = Vec::new();
        p.extend((-libc::EOPNOTSUPP).to_ne_bytes());
        p.extend(Request::new(RTM_NEWLINK, 0).finish(5)); // echoed header
        p.extend(ne16(24));
        p.extend(ne16(NLMSGERR_ATTR_MSG));
        p.extend(b"Unknown device type\0");
        let msg = Message {
            ty: NLMSG_ERROR,
            flags: NLM_F_CAPPED | NLM_F_ACK_TLVS,
            seq: 5,
            port: 0,
            payload: &p,
        };
        assert_eq!(
            parse_error(&msg).unwrap(),
            Err((libc::EOPNOTSUPP, Some("Unknown device type".into())))
        );

        // Uncapped: the whole request is echoed before the TLVs.
        let mut p = Vec::new();
        p.extend((-libc::EEXIST).to_ne_bytes());
        p.extend(newaddr(1, "10.0.0.1".parse().unwrap(), 8).finish(5));
        p.extend(ne16(12));
        p.extend(ne16(NLMSGERR_ATTR_MSG));
        p.extend(b"exists\0\0");
        let msg = Message {
            ty: NLMSG_ERROR,
            flags: NLM_F_ACK_TLVS,
            seq: 5,
            port: 0,
            payload: &p,
        };
        assert_eq!(
            parse_error(&msg).unwrap(),
            Err((libc::EEXIST, Some("exists".into())))
        );

        let ack = 0i32.to_ne_bytes();
        let msg = Message {
            ty: NLMSG_ERROR,
            flags: 0,
            seq: 5,
            port: 0,
            payload: &ack,
        };
        assert_eq!(parse_error(&msg).unwrap(), Ok(()));
        let msg = Message {
            ty: NLMSG_ERROR,
            flags: 0,
            seq: 5,
            port: 0,
            payload: &[1, 2],
        };
        assert!(parse_error(&msg).is_err());
    }

    #[test]
    fn truncated_messages_are_errors() {
        let bytes = getlink_dump().finish(1);
        assert!(messages(&bytes[..bytes.len() - 1]).next().unwrap().is_err());
        assert!(messages(&bytes[..5]).next().unwrap().is_err());
        let mut two = bytes.clone();
        two.extend(&bytes);
        assert_eq!(messages(&two).filter(|m| m.is_ok()).count(), 2);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_ifname("eth0.42").is_ok());
        assert!(check_ifname("").is_err());
        assert!(check_ifname("abcdefghijklmnop").is_err());
        assert!(check_ifname("a/b").is_err());
        assert!(check_ifname("a b").is_err());
        assert!(check_ifname("..").is_err());
    }

    #[test]
    fn masks_and_broadcasts() {
        assert_eq!(
            network("10.1.2.3".parse().unwrap(), 0),
            "0.0.0.0".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            network("10.1.2.3".parse().unwrap(), 32),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            network("fd00::1:2".parse().unwrap(), 112),
            "fd00::1:0".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            v4_broadcast("192.168.1.7".parse().unwrap(), 24),
            Some("192.168.1.255".parse().unwrap())
        );
        assert_eq!(v4_broadcast("192.168.1.7".parse().unwrap(), 31), None);
        assert_eq!(
            v4_broadcast("192.168.1.7".parse().unwrap(), 0),
            Some("255.255.255.255".parse().unwrap())
        );
    }

    proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            for msg in messages(&bytes).flatten() {
                let _ = parse_error(&msg);
                let _ = parse_done(&msg);
                let _ = parse_link(msg.payload);
                let _ = parse_addr(msg.payload);
            }
            let _ = parse_link(&bytes);
            let _ = parse_addr(&bytes);
            for (_, v) in attrs(&bytes) {
                let _ = attr_string(v);
                for _ in attrs(v) {}
            }
        }

        /// Well-framed messages with arbitrary payloads reach the parsers.
        #[test]
        fn framed_arbitrary_payloads_never_panic(
            ty in prop_oneof![Just(RTM_NEWLINK), Just(RTM_NEWADDR), Just(NLMSG_ERROR), Just(NLMSG_DONE), any::<u16>()],
            flags in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 0..400),
        ) {
            let mut r = Request::new(ty, flags);
            r.buf.extend(&payload);
            let bytes = r.finish(1);
            let msg = messages(&bytes).next().unwrap().unwrap();
            prop_assert_eq!(msg.payload, &payload[..]);
            let _ = parse_error(&msg);
            let _ = parse_done(&msg);
            let _ = parse_link(msg.payload);
            let _ = parse_addr(msg.payload);
        }

        #[test]
        fn addresses_round_trip(a in any::<[u8; 4]>(), p in 0u8..=32, idx in any::<u32>()) {
            let ip = IpAddr::V4(Ipv4Addr::from(a));
            let bytes = newaddr(idx, ip, p).finish(1);
            let msg = messages(&bytes).next().unwrap().unwrap();
            prop_assert_eq!(parse_addr(msg.payload), Some((idx, ip, p)));
        }

        #[test]
        fn v6_addresses_round_trip(a in any::<[u8; 16]>(), p in 0u8..=128, idx in any::<u32>()) {
            let ip = IpAddr::V6(Ipv6Addr::from(a));
            let bytes = newaddr(idx, ip, p).finish(1);
            let msg = messages(&bytes).next().unwrap().unwrap();
            prop_assert_eq!(parse_addr(msg.payload), Some((idx, ip, p)));
        }
    }
}
