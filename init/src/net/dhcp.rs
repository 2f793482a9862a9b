//! DHCPv4 (RFC 2131, options RFC 2132): packets, IPv4/UDP framing, leases
//! and the client's state machine.
//!
//! Pure: no sockets and no clock, so every transition is unit-tested and
//! decoding is fuzzed. [`super::client`] does the I/O.

use std::net::Ipv4Addr;
use std::time::Duration;

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
pub const BOOTREQUEST: u8 = 1;
pub const BOOTREPLY: u8 = 2;
/// Asks the server to broadcast its answer: we have no address yet.
pub const FLAG_BROADCAST: u16 = 0x8000;

const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// op..file: everything before the magic cookie.
const FIXED_LEN: usize = 236;
const SNAME: std::ops::Range<usize> = 44..108;
const FILE: std::ops::Range<usize> = 108..236;
/// BOOTP's minimum message (RFC 1542): some relays drop shorter ones.
const MIN_LEN: usize = 300;

/// Used when an ACK carries no lease time (as udhcpc does).
pub const DEFAULT_LEASE_SECS: u32 = 3600;
/// Shorter leases are raised to this, so a broken or hostile server cannot
/// make the caller renew in a tight loop.
pub const MIN_LEASE_SECS: u32 = 60;
/// "Infinite" in lease, T1 and T2.
pub const INFINITE: u32 = u32::MAX;

/// REQUEST transmissions in the REQUESTING state before starting over.
pub const REQUEST_TRIES: u32 = 4;

/// Option codes (RFC 2132).
pub mod opt {
    pub const PAD: u8 = 0;
    pub const SUBNET_MASK: u8 = 1;
    pub const ROUTER: u8 = 3;
    pub const DNS: u8 = 6;
    pub const HOSTNAME: u8 = 12;
    pub const DOMAIN: u8 = 15;
    pub const BROADCAST: u8 = 28;
    pub const NTP: u8 = 42;
    pub const REQUESTED_IP: u8 = 50;
    pub const LEASE_TIME: u8 = 51;
    pub const OVERLOAD: u8 = 52;
    pub const MESSAGE_TYPE: u8 = 53;
    pub const SERVER_ID: u8 = 54;
    pub const PARAMS: u8 = 55;
    pub const MESSAGE: u8 = 56;
    pub const MAX_SIZE: u8 = 57;
    pub const T1: u8 = 58;
    pub const T2: u8 = 59;
    pub const CLIENT_ID: u8 = 61;
    pub const END: u8 = 255;
}

/// What we ask for in option 55.
pub const PARAMS: [u8; 11] = [
    opt::SUBNET_MASK,
    opt::ROUTER,
    opt::DNS,
    opt::HOSTNAME,
    opt::DOMAIN,
    opt::BROADCAST,
    opt::NTP,
    opt::LEASE_TIME,
    opt::SERVER_ID,
    opt::T1,
    opt::T2,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Discover,
    Offer,
    Request,
    Decline,
    Ack,
    Nak,
    Release,
    Inform,
}

impl MessageType {
    pub fn code(self) -> u8 {
        match self {
            MessageType::Discover => 1,
            MessageType::Offer => 2,
            MessageType::Request => 3,
            MessageType::Decline => 4,
            MessageType::Ack => 5,
            MessageType::Nak => 6,
            MessageType::Release => 7,
            MessageType::Inform => 8,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => MessageType::Discover,
            2 => MessageType::Offer,
            3 => MessageType::Request,
            4 => MessageType::Decline,
            5 => MessageType::Ack,
            6 => MessageType::Nak,
            7 => MessageType::Release,
            8 => MessageType::Inform,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            MessageType::Discover => "DHCPDISCOVER",
            MessageType::Offer => "DHCPOFFER",
            MessageType::Request => "DHCPREQUEST",
            MessageType::Decline => "DHCPDECLINE",
            MessageType::Ack => "DHCPACK",
            MessageType::Nak => "DHCPNAK",
            MessageType::Release => "DHCPRELEASE",
            MessageType::Inform => "DHCPINFORM",
        }
    }
}

/// DHCP options by code, in the order first seen. Decoding concatenates an
/// option that appears more than once (RFC 3396); encoding splits values
/// longer than 255 bytes the same way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    list: Vec<(u8, Vec<u8>)>,
}

impl Options {
    pub fn get(&self, code: u8) -> Option<&[u8]> {
        self.list
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_slice())
    }

    /// Sets `code` to `value`, replacing an earlier value.
    pub fn set(&mut self, code: u8, value: impl Into<Vec<u8>>) {
        let value = value.into();
        match self.list.iter_mut().find(|(c, _)| *c == code) {
            Some((_, v)) => *v = value,
            None => self.list.push((code, value)),
        }
    }

    fn append(&mut self, code: u8, data: &[u8]) {
        match self.list.iter_mut().find(|(c, _)| *c == code) {
            Some((_, v)) => v.extend_from_slice(data),
            None => self.list.push((code, data.to_vec())),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (u8, &[u8])> {
        self.list.iter().map(|(c, v)| (*c, v.as_slice()))
    }

    fn ipv4(&self, code: u8) -> Option<Ipv4Addr> {
        self.get(code)
            .and_then(|v| <[u8; 4]>::try_from(v).ok())
            .map(Ipv4Addr::from)
    }

    /// A list of addresses; a length that is not a multiple of 4 is ignored
    /// as a whole.
    fn ipv4_list(&self, code: u8) -> Vec<Ipv4Addr> {
        match self.get(code) {
            Some(v) if !v.is_empty() && v.len() % 4 == 0 => v
                .chunks_exact(4)
                .filter_map(|c| <[u8; 4]>::try_from(c).ok())
                .map(Ipv4Addr::from)
                .filter(|a| !a.is_unspecified() && !a.is_broadcast())
                .collect(),
            _ => Vec::new(),
        }
    }

    fn u32(&self, code: u8) -> Option<u32> {
        self.get(code)
            .and_then(|v| <[u8; 4]>::try_from(v).ok())
            .map(u32::from_be_bytes)
    }
}

/// One BOOTP/DHCP message. `sname` and `file` are not kept: we never send
/// them, and when a server overloads them with options, decoding folds those
/// into `options`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub op: u8,
    pub xid: u32,
    pub secs: u16,
    pub flags: u16,
    pub ciaddr: Ipv4Addr,
    pub yiaddr: Ipv4Addr,
    pub siaddr: Ipv4Addr,
    pub giaddr: Ipv4Addr,
    pub chaddr: [u8; 16],
    pub options: Options,
}

impl Message {
    pub fn message_type(&self) -> Option<MessageType> {
        self.options
            .get(opt::MESSAGE_TYPE)
            .and_then(|v| v.first())
            .and_then(|c| MessageType::from_code(*c))
    }

    pub fn server_id(&self) -> Option<Ipv4Addr> {
        self.options
            .ipv4(opt::SERVER_ID)
            .filter(|a| !a.is_unspecified())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{0} bytes is shorter than a DHCP message")]
    Short(usize),
    #[error("no DHCP magic cookie")]
    NoMagic,
    #[error("option {0} runs past the end of its field")]
    Truncated(u8),
}

pub fn encode(msg: &Message) -> Vec<u8> {
    let mut b = Vec::with_capacity(MIN_LEN + 64);
    b.extend_from_slice(&[msg.op, 1, 6, 0]); // htype Ethernet, hlen 6, hops
    b.extend_from_slice(&msg.xid.to_be_bytes());
    b.extend_from_slice(&msg.secs.to_be_bytes());
    b.extend_from_slice(&msg.flags.to_be_bytes());
    for a in [msg.ciaddr, msg.yiaddr, msg.siaddr, msg.giaddr] {
        b.extend_from_slice(&a.octets());
    }
    b.extend_from_slice(&msg.chaddr);
    b.resize(FIXED_LEN, 0); // sname, file
    b.extend_from_slice(&MAGIC);
    for (code, value) in msg.options.iter() {
        if code == opt::PAD || code == opt::END {
            continue;
        }
        if value.is_empty() {
            b.extend_from_slice(&[code, 0]);
        }
        for chunk in value.chunks(255) {
            b.push(code);
            b.push(chunk.len() as u8);
            b.extend_from_slice(chunk);
        }
    }
    b.push(opt::END);
    if b.len() < MIN_LEN {
        b.resize(MIN_LEN, opt::PAD);
    }
    b
}

pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
    let fixed = buf.get(..FIXED_LEN).ok_or(DecodeError::Short(buf.len()))?;
    if buf.get(FIXED_LEN..FIXED_LEN + 4) != Some(&MAGIC[..]) {
        return Err(if buf.len() < FIXED_LEN + 4 {
            DecodeError::Short(buf.len())
        } else {
            DecodeError::NoMagic
        });
    }
    let mut options = Options::default();
    parse_options(buf.get(FIXED_LEN + 4..).unwrap_or(&[]), &mut options)?;
    // RFC 3396 order: options, then file, then sname.
    let overload = options
        .get(opt::OVERLOAD)
        .and_then(|v| v.first())
        .copied()
        .unwrap_or(0);
    if overload & 1 != 0 {
        parse_options(fixed.get(FILE).unwrap_or(&[]), &mut options)?;
    }
    if overload & 2 != 0 {
        parse_options(fixed.get(SNAME).unwrap_or(&[]), &mut options)?;
    }
    let ip = |at: usize| {
        fixed
            .get(at..at + 4)
            .and_then(|s| <[u8; 4]>::try_from(s).ok())
            .map(Ipv4Addr::from)
            .unwrap_or(Ipv4Addr::UNSPECIFIED)
    };
    let be16 = |at: usize| {
        fixed
            .get(at..at + 2)
            .map(|s| u16::from_be_bytes([s[0], s[1]]))
            .unwrap_or(0)
    };
    let mut chaddr = [0u8; 16];
    if let Some(s) = fixed.get(28..44) {
        chaddr.copy_from_slice(s);
    }
    Ok(Message {
        op: fixed[0],
        xid: fixed
            .get(4..8)
            .and_then(|s| <[u8; 4]>::try_from(s).ok())
            .map(u32::from_be_bytes)
            .unwrap_or(0),
        secs: be16(8),
        flags: be16(10),
        ciaddr: ip(12),
        yiaddr: ip(16),
        siaddr: ip(20),
        giaddr: ip(24),
        chaddr,
        options,
    })
}

fn parse_options(field: &[u8], out: &mut Options) -> Result<(), DecodeError> {
    let mut i = 0;
    while let Some(&code) = field.get(i) {
        match code {
            opt::PAD => {
                i += 1;
                continue;
            }
            opt::END => return Ok(()),
            _ => {}
        }
        let len = usize::from(*field.get(i + 1).ok_or(DecodeError::Truncated(code))?);
        let value = field
            .get(i + 2..i + 2 + len)
            .ok_or(DecodeError::Truncated(code))?;
        out.append(code, value);
        i += 2 + len;
    }
    Ok(())
}

/// What a lease gives this node, ready for [`super::apply_lease`].
/// Times are seconds from when the ACK arrived; [`INFINITE`] means forever.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub ntp: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub server: Ipv4Addr,
    pub lease_secs: u32,
    /// T1: when to renew with the server that gave the lease.
    pub renew_secs: u32,
    /// T2: when to rebind with any server.
    pub rebind_secs: u32,
    /// The host name the server assigned, if any.
    pub hostname: Option<String>,
    /// The host name this client sent when acquiring; renewing and
    /// rebinding send it again, so the server keeps the name.
    pub client_hostname: Option<String>,
}

impl Lease {
    /// Whether `ip` is on the leased subnet (and so reachable on-link).
    pub fn on_link(&self, ip: Ipv4Addr) -> bool {
        let mask = super::netlink::v4_mask(self.prefix);
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}

/// An address a server may hand out to a host.
fn usable(a: Ipv4Addr) -> bool {
    !(a.is_unspecified()
        || a.is_broadcast()
        || a.is_multicast()
        || a.is_loopback()
        || a.octets()[0] == 0)
}

/// A contiguous netmask as a prefix length.
pub fn mask_to_prefix(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let prefix = m.leading_ones() as u8;
    (prefix > 0 && super::netlink::v4_mask(prefix) == m).then_some(prefix)
}

/// The classful default when a server sends no netmask.
fn classful_prefix(a: Ipv4Addr) -> u8 {
    match a.octets()[0] {
        0..=127 => 8,
        128..=191 => 16,
        _ => 24,
    }
}

/// Text from an option, if it is a plausible DNS name: it goes into
/// /etc/resolv.conf and the hostname, so anything else is dropped.
fn dns_text(v: &[u8]) -> Option<String> {
    let end = v.iter().position(|b| *b == 0).unwrap_or(v.len());
    let s = &v[..end];
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    ok.then(|| String::from_utf8_lossy(s).into_owned())
}

/// A server's message (option 56), printable ASCII only, for an error.
fn message_text(v: &[u8]) -> Option<String> {
    let s: String = v
        .iter()
        .take(200)
        .take_while(|b| **b != 0)
        .map(|b| {
            if b.is_ascii_graphic() || *b == b' ' {
                *b as char
            } else {
                '?'
            }
        })
        .collect();
    let s = s.trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// The lease in an ACK. `fallback_server` is used when the ACK has no
/// server identifier (the server we asked, or the packet's source).
pub fn lease_from_ack(msg: &Message, fallback_server: Ipv4Addr) -> Result<Lease, String> {
    let addr = msg.yiaddr;
    if !usable(addr) {
        return Err(format!("the server offered {addr}, which no host can use"));
    }
    let o = &msg.options;
    let prefix = o
        .ipv4(opt::SUBNET_MASK)
        .and_then(mask_to_prefix)
        .unwrap_or_else(|| classful_prefix(addr));
    let router = o
        .ipv4_list(opt::ROUTER)
        .into_iter()
        .find(|r| usable(*r) && *r != addr);
    let lease_secs = o
        .u32(opt::LEASE_TIME)
        .unwrap_or(DEFAULT_LEASE_SECS)
        .max(MIN_LEASE_SECS);
    let (renew_secs, rebind_secs) = timers(lease_secs, o.u32(opt::T1), o.u32(opt::T2));
    Ok(Lease {
        addr,
        prefix,
        router,
        dns: o.ipv4_list(opt::DNS),
        ntp: o.ipv4_list(opt::NTP),
        domain: o.get(opt::DOMAIN).and_then(dns_text),
        server: msg.server_id().unwrap_or(fallback_server),
        lease_secs,
        renew_secs,
        rebind_secs,
        hostname: o.get(opt::HOSTNAME).and_then(dns_text),
        client_hostname: None,
    })
}

/// T1 and T2 from the options, or 50% and 87.5% of the lease when they are
/// missing or out of order (T1 <= T2 <= lease).
pub fn timers(lease: u32, t1: Option<u32>, t2: Option<u32>) -> (u32, u32) {
    if lease == INFINITE && t1.is_none() && t2.is_none() {
        return (INFINITE, INFINITE);
    }
    let t2 = t2
        .filter(|t| *t <= lease)
        .unwrap_or((u64::from(lease) * 7 / 8) as u32);
    let t1 = t1.filter(|t| *t <= t2).unwrap_or((lease / 2).min(t2));
    (t1, t2)
}

/// Who we are, in every message we send.
#[derive(Debug, Clone, Copy)]
pub struct ClientInfo<'a> {
    pub mac: [u8; 6],
    pub hostname: Option<&'a str>,
    /// Option 57: the largest DHCP message we accept (576 minimum).
    pub max_size: u16,
}

fn chaddr(mac: [u8; 6]) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[..6].copy_from_slice(&mac);
    c
}

fn request_base(
    info: &ClientInfo<'_>,
    ty: MessageType,
    xid: u32,
    secs: u16,
    flags: u16,
) -> Message {
    let mut options = Options::default();
    options.set(opt::MESSAGE_TYPE, [ty.code()]);
    let mut client_id = vec![1u8]; // htype Ethernet
    client_id.extend_from_slice(&info.mac);
    options.set(opt::CLIENT_ID, client_id);
    Message {
        op: BOOTREQUEST,
        xid,
        secs,
        flags,
        ciaddr: Ipv4Addr::UNSPECIFIED,
        yiaddr: Ipv4Addr::UNSPECIFIED,
        siaddr: Ipv4Addr::UNSPECIFIED,
        giaddr: Ipv4Addr::UNSPECIFIED,
        chaddr: chaddr(info.mac),
        options,
    }
}

fn finish_request(mut m: Message, info: &ClientInfo<'_>) -> Message {
    m.options
        .set(opt::MAX_SIZE, info.max_size.max(576).to_be_bytes());
    if let Some(h) = info.hostname.filter(|h| !h.is_empty()) {
        let h = h.as_bytes();
        m.options.set(opt::HOSTNAME, &h[..h.len().min(255)]);
    }
    m.options.set(opt::PARAMS, PARAMS);
    m
}

pub fn discover(info: &ClientInfo<'_>, xid: u32, secs: u16) -> Message {
    let m = request_base(info, MessageType::Discover, xid, secs, FLAG_BROADCAST);
    finish_request(m, info)
}

/// The REQUEST that answers an offer (SELECTING state).
pub fn request_selecting(
    info: &ClientInfo<'_>,
    xid: u32,
    secs: u16,
    offered: Ipv4Addr,
    server: Ipv4Addr,
) -> Message {
    let mut m = request_base(info, MessageType::Request, xid, secs, FLAG_BROADCAST);
    m.options.set(opt::REQUESTED_IP, offered.octets());
    m.options.set(opt::SERVER_ID, server.octets());
    finish_request(m, info)
}

/// The REQUEST that extends a lease (RENEWING and REBINDING): ciaddr set,
/// no requested address, no server identifier.
pub fn request_renewing(info: &ClientInfo<'_>, xid: u32, secs: u16, ciaddr: Ipv4Addr) -> Message {
    let mut m = request_base(info, MessageType::Request, xid, secs, 0);
    m.ciaddr = ciaddr;
    finish_request(m, info)
}

/// A BOOTREPLY for this exchange: our xid and our hardware address.
pub fn is_reply_for(msg: &Message, xid: u32, mac: &[u8; 6]) -> bool {
    msg.op == BOOTREPLY && msg.xid == xid && msg.chaddr[..6] == mac[..]
}

/// How long to wait before retransmission `attempt` (0-based): 4 s doubling
/// to 64 s, plus `jitter_ms` in -1000..=1000 (RFC 2131 §4.1). The caller
/// caps it to its own deadline.
pub fn retransmit_delay(attempt: u32, jitter_ms: i32) -> Duration {
    let base: i64 = 4000 << attempt.min(4);
    let ms = (base + i64::from(jitter_ms.clamp(-1000, 1000))).max(1000);
    Duration::from_millis(ms as u64)
}

/// What the I/O loop should do after a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Not for us, or not useful now: keep waiting.
    Ignore,
    /// An offer was taken: send the REQUEST now.
    SendRequest,
    Bound(Lease),
    /// The server refused: start over (acquire) or give the lease up (renew).
    Nak {
        server: Ipv4Addr,
        message: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Selecting,
    Requesting { offered: Ipv4Addr, server: Ipv4Addr },
}

/// DISCOVER → OFFER → REQUEST → ACK, as a state machine without I/O.
#[derive(Debug, Clone)]
pub struct Acquire {
    pub mac: [u8; 6],
    pub xid: u32,
    pub phase: Phase,
}

impl Acquire {
    pub fn new(mac: [u8; 6], xid: u32) -> Self {
        Acquire {
            mac,
            xid,
            phase: Phase::Selecting,
        }
    }

    /// Back to SELECTING with a fresh transaction id.
    pub fn restart(&mut self, xid: u32) {
        self.xid = xid;
        self.phase = Phase::Selecting;
    }

    /// The message to (re)transmit in the current phase.
    pub fn packet(&self, info: &ClientInfo<'_>, secs: u16) -> Message {
        match self.phase {
            Phase::Selecting => discover(info, self.xid, secs),
            Phase::Requesting { offered, server } => {
                request_selecting(info, self.xid, secs, offered, server)
            }
        }
    }

    /// `src` is the IPv4 source of the packet, used when a server leaves
    /// out its identifier.
    pub fn on_reply(&mut self, msg: &Message, src: Ipv4Addr) -> Step {
        if !is_reply_for(msg, self.xid, &self.mac) {
            return Step::Ignore;
        }
        match (&self.phase, msg.message_type()) {
            (Phase::Selecting, Some(MessageType::Offer)) => {
                let server = msg.server_id().unwrap_or(src);
                if !usable(msg.yiaddr) || !usable(server) {
                    return Step::Ignore;
                }
                self.phase = Phase::Requesting {
                    offered: msg.yiaddr,
                    server,
                };
                Step::SendRequest
            }
            (Phase::Requesting { server, .. }, Some(MessageType::Ack)) => {
                if msg.server_id().is_some_and(|s| s != *server) {
                    return Step::Ignore;
                }
                lease_from_ack(msg, *server)
                    .map(Step::Bound)
                    .unwrap_or(Step::Ignore)
            }
            (Phase::Requesting { server, .. }, Some(MessageType::Nak)) => {
                if msg.server_id().is_some_and(|s| s != *server) {
                    return Step::Ignore;
                }
                Step::Nak {
                    server: *server,
                    message: msg.options.get(opt::MESSAGE).and_then(message_text),
                }
            }
            _ => Step::Ignore,
        }
    }

    /// What is missing if the deadline passes now.
    pub fn waiting_for(&self) -> &'static str {
        match self.phase {
            Phase::Selecting => "no DHCPOFFER",
            Phase::Requesting { .. } => "no DHCPACK",
        }
    }
}

/// Extending a lease (RENEWING or REBINDING), as a state machine without I/O.
#[derive(Debug, Clone)]
pub struct Renew {
    pub mac: [u8; 6],
    pub xid: u32,
    pub addr: Ipv4Addr,
    pub server: Ipv4Addr,
}

impl Renew {
    pub fn packet(&self, info: &ClientInfo<'_>, secs: u16) -> Message {
        request_renewing(info, self.xid, secs, self.addr)
    }

    pub fn on_reply(&self, msg: &Message, src: Ipv4Addr) -> Step {
        if !is_reply_for(msg, self.xid, &self.mac) {
            return Step::Ignore;
        }
        let server = msg
            .server_id()
            .or(Some(src).filter(|s| usable(*s)))
            .unwrap_or(self.server);
        match msg.message_type() {
            Some(MessageType::Ack) => lease_from_ack(msg, server)
                .map(Step::Bound)
                .unwrap_or(Step::Ignore),
            Some(MessageType::Nak) => Step::Nak {
                server,
                message: msg.options.get(opt::MESSAGE).and_then(message_text),
            },
            _ => Step::Ignore,
        }
    }
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum16(0, data))
}

fn sum16(mut acc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc = acc.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
        acc = (acc & 0xffff) + (acc >> 16);
    }
    if let [last] = chunks.remainder() {
        acc = acc.wrapping_add(u32::from(*last) << 8);
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

const IPPROTO_UDP: u8 = 17;

/// An IPv4 header (no options) and a UDP header around `payload`.
pub fn encode_ip_udp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = u16::try_from(8 + payload.len()).unwrap_or(u16::MAX);
    let total = udp_len.saturating_add(20);
    let mut p = Vec::with_capacity(usize::from(total));
    p.extend_from_slice(&[0x45, 0]); // v4, IHL 5; TOS
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0]); // id, flags, fragment offset
    p.extend_from_slice(&[64, IPPROTO_UDP, 0, 0]); // TTL, protocol, checksum
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let ip_sum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());

    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&udp_len.to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, IPPROTO_UDP]);
    pseudo.extend_from_slice(&udp_len.to_be_bytes());
    let udp_sum = !fold(sum16(sum16(0, &pseudo), &p[20..]));
    // 0 means "no checksum" in UDP over IPv4, so send its other form.
    let udp_sum = if udp_sum == 0 { 0xffff } else { udp_sum };
    p[26..28].copy_from_slice(&udp_sum.to_be_bytes());
    p
}

/// A UDP datagram out of an IPv4 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub payload: &'a [u8],
}

/// The UDP datagram in `pkt`, if it is a whole, unfragmented IPv4/UDP
/// packet with a valid header checksum. The UDP checksum is not checked: on
/// a packet socket it may still be unfilled (checksum offload, veth), and
/// the xid and hardware address checks guard the exchange.
pub fn decode_ip_udp(pkt: &[u8]) -> Option<Datagram<'_>> {
    let v_ihl = *pkt.first()?;
    let ihl = usize::from(v_ihl & 0x0f) * 4;
    if v_ihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    let header = pkt.get(..ihl)?;
    let total = usize::from(u16::from_be_bytes([*pkt.get(2)?, *pkt.get(3)?]));
    // Ethernet may pad short frames, so bytes past `total` are ignored.
    let packet = pkt.get(..total).filter(|_| total >= ihl)?;
    let frag = u16::from_be_bytes([header[6], header[7]]);
    if frag & 0x3fff != 0 || header[9] != IPPROTO_UDP || checksum(header) != 0 {
        return None; // a fragment (MF or offset), not UDP, or corrupt
    }
    let ip = |at: usize| Ipv4Addr::new(header[at], header[at + 1], header[at + 2], header[at + 3]);
    let udp = packet.get(ihl..)?;
    let be16 = |at: usize| {
        udp.get(at..at + 2)
            .map(|s| u16::from_be_bytes([s[0], s[1]]))
    };
    let udp_len = usize::from(be16(4)?);
    let payload = udp.get(8..udp_len).filter(|_| udp_len >= 8)?;
    Some(Datagram {
        src: ip(12),
        dst: ip(16),
        sport: be16(0)?,
        dport: be16(2)?,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

    fn info() -> ClientInfo<'static> {
        ClientInfo {
            mac: MAC,
            hostname: Some("node-1"),
            max_size: 1500,
        }
    }

    fn reply(ty: MessageType, xid: u32, yiaddr: Ipv4Addr, opts: &[(u8, &[u8])]) -> Message {
        let mut options = Options::default();
        options.set(opt::MESSAGE_TYPE, [ty.code()]);
        for (c, v) in opts {
            options.set(*c, v.to_vec());
        }
        Message {
            op: BOOTREPLY,
            xid,
            secs: 0,
            flags: 0,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: chaddr(MAC),
            options,
        }
    }

    fn ack_opts() -> Vec<(u8, &'static [u8])> {
        vec![
            (opt::SERVER_ID, &[10, 0, 2, 2]),
            (opt::SUBNET_MASK, &[255, 255, 255, 0]),
            (opt::ROUTER, &[10, 0, 2, 2]),
            (opt::DNS, &[10, 0, 2, 3, 1, 1, 1, 1]),
            (opt::NTP, &[10, 0, 2, 4]),
            (opt::DOMAIN, b"example.internal"),
            (opt::LEASE_TIME, &[0, 0, 0x0e, 0x10]),
        ]
    }

    #[test]
    fn discover_has_the_required_options() {
        let m = discover(&info(), 0xdead_beef, 3);
        let bytes = encode(&m);
        assert!(bytes.len() >= MIN_LEN);
        assert_eq!(&bytes[..4], &[BOOTREQUEST, 1, 6, 0]);
        assert_eq!(&bytes[4..8], &[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(&bytes[8..10], &[0, 3]);
        assert_eq!(&bytes[10..12], &[0x80, 0]); // broadcast flag
        assert_eq!(&bytes[28..34], &MAC);
        assert_eq!(&bytes[236..240], &MAGIC);
        // Message type comes first.
        assert_eq!(&bytes[240..243], &[opt::MESSAGE_TYPE, 1, 1]);
        let back = decode(&bytes).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.message_type(), Some(MessageType::Discover));
        let o = &back.options;
        assert_eq!(
            o.get(opt::CLIENT_ID),
            Some(&[1, 0x52, 0x54, 0, 0x12, 0x34, 0x56][..])
        );
        assert_eq!(o.get(opt::HOSTNAME), Some(&b"node-1"[..]));
        assert_eq!(o.get(opt::MAX_SIZE), Some(&[0x05, 0xdc][..]));
        assert_eq!(
            o.get(opt::PARAMS),
            Some(&[1, 3, 6, 12, 15, 28, 42, 51, 54, 58, 59][..])
        );
        assert_eq!(o.get(opt::REQUESTED_IP), None);
    }

    #[test]
    fn requests_carry_the_right_fields() {
        let offered = Ipv4Addr::new(10, 0, 2, 15);
        let m = decode(&encode(&request_selecting(&info(), 7, 0, offered, SERVER))).unwrap();
        assert_eq!(m.message_type(), Some(MessageType::Request));
        assert_eq!(m.options.get(opt::REQUESTED_IP), Some(&[10, 0, 2, 15][..]));
        assert_eq!(m.server_id(), Some(SERVER));
        assert_eq!(m.ciaddr, Ipv4Addr::UNSPECIFIED);

        let m = decode(&encode(&request_renewing(&info(), 7, 0, offered))).unwrap();
        assert_eq!(m.ciaddr, offered);
        assert_eq!(m.flags, 0);
        assert_eq!(m.options.get(opt::REQUESTED_IP), None);
        assert_eq!(m.server_id(), None);
    }

    #[test]
    fn no_hostname_no_option_12() {
        let i = ClientInfo {
            hostname: None,
            ..info()
        };
        assert_eq!(discover(&i, 1, 0).options.get(opt::HOSTNAME), None);
        let i = ClientInfo {
            hostname: Some(""),
            ..info()
        };
        assert_eq!(discover(&i, 1, 0).options.get(opt::HOSTNAME), None);
    }

    #[test]
    fn full_exchange() {
        let mut a = Acquire::new(MAC, 42);
        assert_eq!(
            a.packet(&info(), 0).message_type(),
            Some(MessageType::Discover)
        );
        let offered = Ipv4Addr::new(10, 0, 2, 15);

        // Wrong xid, wrong MAC, a request echoed back: ignored.
        assert_eq!(
            a.on_reply(&reply(MessageType::Offer, 41, offered, &ack_opts()), SERVER),
            Step::Ignore
        );
        let mut other = reply(MessageType::Offer, 42, offered, &ack_opts());
        other.chaddr[5] ^= 1;
        assert_eq!(a.on_reply(&other, SERVER), Step::Ignore);
        let mut ours = reply(MessageType::Offer, 42, offered, &ack_opts());
        ours.op = BOOTREQUEST;
        assert_eq!(a.on_reply(&ours, SERVER), Step::Ignore);
        // An ACK before any offer: ignored.
        assert_eq!(
            a.on_reply(&reply(MessageType::Ack, 42, offered, &ack_opts()), SERVER),
            Step::Ignore
        );

        assert_eq!(
            a.on_reply(&reply(MessageType::Offer, 42, offered, &ack_opts()), SERVER),
            Step::SendRequest
        );
        assert_eq!(
            a.phase,
            Phase::Requesting {
                offered,
                server: SERVER
            }
        );
        let req = a.packet(&info(), 1);
        assert_eq!(req.message_type(), Some(MessageType::Request));
        assert_eq!(req.xid, 42);

        // An ACK from another server is not ours to take.
        let mut opts = ack_opts();
        opts[0] = (opt::SERVER_ID, &[10, 9, 9, 9]);
        assert_eq!(
            a.on_reply(&reply(MessageType::Ack, 42, offered, &opts), SERVER),
            Step::Ignore
        );

        let Step::Bound(lease) =
            a.on_reply(&reply(MessageType::Ack, 42, offered, &ack_opts()), SERVER)
        else {
            panic!("expected a lease");
        };
        assert_eq!(
            lease,
            Lease {
                addr: offered,
                prefix: 24,
                router: Some(SERVER),
                dns: vec![Ipv4Addr::new(10, 0, 2, 3), Ipv4Addr::new(1, 1, 1, 1)],
                ntp: vec![Ipv4Addr::new(10, 0, 2, 4)],
                domain: Some("example.internal".into()),
                server: SERVER,
                lease_secs: 3600,
                renew_secs: 1800,
                rebind_secs: 3150,
                hostname: None,
                client_hostname: None,
            }
        );
        assert!(lease.on_link(Ipv4Addr::new(10, 0, 2, 200)));
        assert!(!lease.on_link(Ipv4Addr::new(10, 0, 3, 1)));
    }

    #[test]
    fn nak_restarts() {
        let mut a = Acquire::new(MAC, 42);
        let offered = Ipv4Addr::new(10, 0, 2, 15);
        assert_eq!(
            a.on_reply(&reply(MessageType::Offer, 42, offered, &ack_opts()), SERVER),
            Step::SendRequest
        );
        let nak = reply(
            MessageType::Nak,
            42,
            Ipv4Addr::UNSPECIFIED,
            &[
                (opt::SERVER_ID, &[10, 0, 2, 2]),
                (opt::MESSAGE, b"wrong\nnet\0"),
            ],
        );
        assert_eq!(
            a.on_reply(&nak, SERVER),
            Step::Nak {
                server: SERVER,
                message: Some("wrong?net".into())
            }
        );
        a.restart(43);
        assert_eq!(a.phase, Phase::Selecting);
        assert_eq!(
            a.packet(&info(), 0).message_type(),
            Some(MessageType::Discover)
        );
        assert_eq!(a.waiting_for(), "no DHCPOFFER");
    }

    #[test]
    fn offers_of_unusable_addresses_are_ignored() {
        for bad in [
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::new(224, 0, 0, 1),
            Ipv4Addr::new(127, 0, 0, 1),
        ] {
            let mut a = Acquire::new(MAC, 1);
            assert_eq!(
                a.on_reply(&reply(MessageType::Offer, 1, bad, &ack_opts()), SERVER),
                Step::Ignore
            );
        }
        // No server identifier: the source address stands in.
        let mut a = Acquire::new(MAC, 1);
        let offer = reply(MessageType::Offer, 1, Ipv4Addr::new(10, 0, 2, 15), &[]);
        assert_eq!(a.on_reply(&offer, SERVER), Step::SendRequest);
        // Neither: nothing to send a REQUEST to.
        let mut a = Acquire::new(MAC, 1);
        assert_eq!(a.on_reply(&offer, Ipv4Addr::UNSPECIFIED), Step::Ignore);
    }

    #[test]
    fn renew_takes_ack_and_nak() {
        let addr = Ipv4Addr::new(10, 0, 2, 15);
        let r = Renew {
            mac: MAC,
            xid: 9,
            addr,
            server: SERVER,
        };
        let m = r.packet(&info(), 0);
        assert_eq!(m.ciaddr, addr);
        assert!(
            matches!(r.on_reply(&reply(MessageType::Ack, 9, addr, &ack_opts()), SERVER), Step::Bound(l) if l.addr == addr)
        );
        assert_eq!(
            r.on_reply(&reply(MessageType::Ack, 8, addr, &ack_opts()), SERVER),
            Step::Ignore
        );
        assert_eq!(
            r.on_reply(&reply(MessageType::Offer, 9, addr, &ack_opts()), SERVER),
            Step::Ignore
        );
        assert_eq!(
            r.on_reply(
                &reply(MessageType::Nak, 9, Ipv4Addr::UNSPECIFIED, &[]),
                SERVER
            ),
            Step::Nak {
                server: SERVER,
                message: None
            }
        );
    }

    #[test]
    fn lease_defaults_and_sanitising() {
        let addr = Ipv4Addr::new(172, 16, 5, 9);
        let m = reply(
            MessageType::Ack,
            1,
            addr,
            &[
                (opt::DOMAIN, b"evil\nnameserver 6.6.6.6"),
                (opt::HOSTNAME, b"node-7\0\0"),
                (opt::DNS, &[1, 2, 3]), // not a multiple of 4
                (opt::ROUTER, &[0, 0, 0, 0, 172, 16, 0, 1]),
                (opt::SUBNET_MASK, &[255, 0, 255, 0]), // not contiguous
            ],
        );
        let l = lease_from_ack(&m, SERVER).unwrap();
        assert_eq!(l.domain, None);
        assert_eq!(l.hostname.as_deref(), Some("node-7"));
        assert!(l.dns.is_empty());
        assert_eq!(l.router, Some(Ipv4Addr::new(172, 16, 0, 1)));
        assert_eq!(l.prefix, 16); // classful fallback
        assert_eq!(l.server, SERVER);
        assert_eq!(
            (l.lease_secs, l.renew_secs, l.rebind_secs),
            (3600, 1800, 3150)
        );

        let m = reply(
            MessageType::Ack,
            1,
            addr,
            &[(opt::LEASE_TIME, &[0, 0, 0, 5])],
        );
        assert_eq!(
            lease_from_ack(&m, SERVER).unwrap().lease_secs,
            MIN_LEASE_SECS
        );
    }

    #[test]
    fn timer_rules() {
        assert_eq!(timers(1000, None, None), (500, 875));
        assert_eq!(timers(1000, Some(100), Some(200)), (100, 200));
        assert_eq!(timers(1000, Some(900), Some(200)), (200, 200)); // T1 > T2: T1 default, capped at T2
        assert_eq!(timers(1000, Some(300), Some(2000)), (300, 875)); // T2 > lease
        assert_eq!(timers(INFINITE, None, None), (INFINITE, INFINITE));
        assert_eq!(
            timers(INFINITE, Some(10), None),
            (10, (u64::from(INFINITE) * 7 / 8) as u32)
        );
    }

    #[test]
    fn masks() {
        assert_eq!(mask_to_prefix(Ipv4Addr::new(255, 255, 255, 0)), Some(24));
        assert_eq!(mask_to_prefix(Ipv4Addr::new(255, 255, 255, 255)), Some(32));
        assert_eq!(mask_to_prefix(Ipv4Addr::new(255, 255, 255, 254)), Some(31));
        assert_eq!(mask_to_prefix(Ipv4Addr::new(0, 0, 0, 0)), None);
        assert_eq!(mask_to_prefix(Ipv4Addr::new(255, 0, 255, 0)), None);
    }

    #[test]
    fn overload_and_split_options() {
        let mut bytes = encode(&reply(
            MessageType::Ack,
            1,
            Ipv4Addr::new(10, 0, 0, 5),
            &[(opt::OVERLOAD, &[3])],
        ));
        // Router in `file`, DNS split across `file` and `sname`.
        bytes[FILE.start..FILE.start + 12].copy_from_slice(&[3, 4, 10, 0, 0, 1, 6, 4, 8, 8, 8, 8]);
        bytes[FILE.start + 12] = opt::END;
        bytes[SNAME.start..SNAME.start + 7].copy_from_slice(&[6, 4, 9, 9, 9, 9, 255]);
        let m = decode(&bytes).unwrap();
        let l = lease_from_ack(&m, SERVER).unwrap();
        assert_eq!(l.router, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(
            l.dns,
            vec![Ipv4Addr::new(8, 8, 8, 8), Ipv4Addr::new(9, 9, 9, 9)]
        );

        // A value longer than 255 bytes is split on encode and joined on decode.
        let mut m = reply(MessageType::Ack, 1, Ipv4Addr::new(10, 0, 0, 5), &[]);
        let long: Vec<u8> = (0..600u32).map(|i| i as u8).collect();
        m.options.set(200, long.clone());
        assert_eq!(
            decode(&encode(&m)).unwrap().options.get(200),
            Some(&long[..])
        );
    }

    #[test]
    fn decode_rejects_garbage() {
        assert_eq!(decode(&[0; 10]), Err(DecodeError::Short(10)));
        assert_eq!(decode(&[0; 300]), Err(DecodeError::NoMagic));
        let mut bytes = encode(&discover(&info(), 1, 0));
        bytes.truncate(243);
        bytes.extend([opt::DNS, 8, 1, 2]); // claims 8 bytes, has 2
        assert_eq!(decode(&bytes), Err(DecodeError::Truncated(opt::DNS)));
        // Missing END is fine: the options simply run to the end.
        let mut bytes = encode(&discover(&info(), 1, 0));
        let end = bytes.iter().rposition(|b| *b == opt::END).unwrap();
        bytes.truncate(end);
        assert!(decode(&bytes).is_ok());
    }

    #[test]
    fn ip_udp_framing() {
        let payload = encode(&discover(&info(), 5, 0));
        let pkt = encode_ip_udp(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            CLIENT_PORT,
            SERVER_PORT,
            &payload,
        );
        assert_eq!(checksum(&pkt[..20]), 0);
        let d = decode_ip_udp(&pkt).unwrap();
        assert_eq!(
            (d.src, d.dst, d.sport, d.dport),
            (Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, 68, 67)
        );
        assert_eq!(d.payload, &payload[..]);
        // UDP checksum over pseudo-header + datagram verifies to zero.
        let mut pseudo = vec![0, 0, 0, 0, 255, 255, 255, 255, 0, 17];
        pseudo.extend_from_slice(&pkt[24..26]);
        assert_eq!(!fold(sum16(sum16(0, &pseudo), &pkt[20..])), 0);

        // Ethernet padding after the packet is ignored.
        let mut padded = pkt.clone();
        padded.extend([0; 20]);
        assert_eq!(decode_ip_udp(&padded).unwrap().payload, &payload[..]);
        // A corrupt header, a fragment, a short packet: dropped.
        let mut bad = pkt.clone();
        bad[8] = 1;
        assert!(decode_ip_udp(&bad).is_none());
        let mut frag = pkt.clone();
        frag[6] = 0x20; // MF
        frag[10..12].copy_from_slice(&[0, 0]);
        let s = checksum(&frag[..20]);
        frag[10..12].copy_from_slice(&s.to_be_bytes());
        assert!(decode_ip_udp(&frag).is_none());
        assert!(decode_ip_udp(&pkt[..pkt.len() - 1]).is_none());
    }

    #[test]
    fn checksum_known_value() {
        // RFC 1071's example bytes.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
        assert_eq!(checksum(&[0xff]), !0xff00);
    }

    #[test]
    fn backoff_follows_rfc2131() {
        let secs: Vec<u64> = (0..7).map(|a| retransmit_delay(a, 0).as_secs()).collect();
        assert_eq!(secs, vec![4, 8, 16, 32, 64, 64, 64]);
        assert_eq!(retransmit_delay(0, -1000), Duration::from_secs(3));
        assert_eq!(retransmit_delay(0, 5000), Duration::from_secs(5));
        assert_eq!(retransmit_delay(u32::MAX, 1000), Duration::from_secs(65));
    }

    fn arb_options() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
        proptest::collection::vec(
            (
                prop_oneof![
                    Just(opt::SUBNET_MASK),
                    Just(opt::ROUTER),
                    Just(opt::DNS),
                    Just(opt::HOSTNAME),
                    Just(opt::DOMAIN),
                    Just(opt::NTP),
                    Just(opt::LEASE_TIME),
                    Just(opt::OVERLOAD),
                    Just(opt::MESSAGE_TYPE),
                    Just(opt::SERVER_ID),
                    Just(opt::MESSAGE),
                    Just(opt::T1),
                    Just(opt::T2),
                    any::<u8>(),
                ],
                proptest::collection::vec(any::<u8>(), 0..12),
            ),
            0..16,
        )
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            if let Ok(m) = decode(&bytes) {
                let _ = lease_from_ack(&m, SERVER);
                let _ = Acquire::new(MAC, m.xid).on_reply(&m, SERVER);
            }
            let _ = decode_ip_udp(&bytes);
        }

        /// A valid header and cookie, then arbitrary option bytes (and
        /// arbitrary sname/file), so the option walker is really exercised.
        #[test]
        fn arbitrary_options_never_panic(
            tail in proptest::collection::vec(any::<u8>(), 0..400),
            sname_file in proptest::collection::vec(any::<u8>(), 192),
            overload in 0u8..4,
        ) {
            let mut m = reply(MessageType::Ack, 1, Ipv4Addr::new(10, 0, 0, 5), &[]);
            m.options.set(opt::OVERLOAD, [overload]);
            let mut bytes = encode(&m);
            bytes[SNAME.start..FILE.end].copy_from_slice(&sname_file);
            bytes.truncate(246); // header, cookie, type and overload options
            bytes.extend(&tail);
            if let Ok(m) = decode(&bytes) {
                let _ = lease_from_ack(&m, SERVER);
                let mut a = Acquire::new(MAC, 1);
                a.phase = Phase::Requesting { offered: Ipv4Addr::new(10, 0, 0, 5), server: SERVER };
                let _ = a.on_reply(&m, SERVER);
                let _ = Renew { mac: MAC, xid: 1, addr: m.yiaddr, server: SERVER }.on_reply(&m, SERVER);
            }
        }

        #[test]
        fn arbitrary_leases_are_consistent(opts in arb_options(), yiaddr in any::<[u8; 4]>()) {
            let opts: Vec<(u8, &[u8])> = opts.iter().map(|(c, v)| (*c, v.as_slice())).collect();
            let m = reply(MessageType::Ack, 1, Ipv4Addr::from(yiaddr), &opts);
            let back = decode(&encode(&m));
            prop_assert!(back.is_ok());
            if let Ok(l) = lease_from_ack(&back.unwrap(), SERVER) {
                prop_assert!(l.prefix >= 1 && l.prefix <= 32);
                prop_assert!(l.renew_secs <= l.rebind_secs && l.rebind_secs <= l.lease_secs);
                prop_assert!(l.lease_secs >= MIN_LEASE_SECS);
                for s in l.domain.iter().chain(l.hostname.iter()) {
                    prop_assert!(!s.contains(char::is_whitespace));
                }
            }
        }

        #[test]
        fn messages_round_trip(xid in any::<u32>(), secs in any::<u16>(), flags in any::<u16>(),
                               ciaddr in any::<[u8; 4]>(), opts in arb_options()) {
            let mut m = discover(&info(), xid, secs);
            m.flags = flags;
            m.ciaddr = Ipv4Addr::from(ciaddr);
            for (c, v) in &opts {
                if *c != opt::PAD && *c != opt::END && *c != opt::OVERLOAD {
                    m.options.set(*c, v.clone());
                }
            }
            prop_assert_eq!(decode(&encode(&m)).unwrap(), m);
        }

        #[test]
        fn ip_udp_round_trip(src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(), sport in any::<u16>(), dport in any::<u16>(),
                             payload in proptest::collection::vec(any::<u8>(), 0..600)) {
            let pkt = encode_ip_udp(src.into(), dst.into(), sport, dport, &payload);
            let d = decode_ip_udp(&pkt).unwrap();
            prop_assert_eq!(d, Datagram { src: src.into(), dst: dst.into(), sport, dport, payload: &payload });
        }
    }
}
