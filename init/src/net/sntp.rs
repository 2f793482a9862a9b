//! SNTPv4 client mode (RFC 4330, with the on-wire rules of RFC 5905): the
//! 48-byte packet, reply checks and the offset math, all pure and fuzzed,
//! plus [`query`], one exchange over a UDP socket.
//!
//! Times are Unix nanoseconds in `i128`: NTP timestamps cover 136 years and
//! a node without an RTC starts in 1970, so differences do not fit an `i64`
//! comfortably and must never overflow.

use std::fmt;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

pub const PORT: u16 = 123;
pub const PACKET_LEN: usize = 48;
const VERSION: u8 = 4;
const MODE_CLIENT: u8 = 3;
const MODE_SERVER: u8 = 4;
/// Leap indicator 3: the server's clock is not synchronized.
const LEAP_ALARM: u8 = 3;
/// Seconds from 1900-01-01 (NTP era 0) to 1970-01-01.
const NTP_TO_UNIX: i128 = 2_208_988_800;
const ERA: i128 = 1 << 32;
const NANOS: i128 = 1_000_000_000;
/// A server further than this from its reference clock (half its root delay
/// plus its root dispersion) is not trusted; systemd-timesyncd uses the same.
pub const MAX_ROOT_DISTANCE_NS: i128 = 5 * NANOS;

/// An NTP timestamp: seconds since 1900 (32 bits) and a binary fraction (32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// Unix nanoseconds → NTP, modulo the era (exact to within a nanosecond).
    pub fn from_unix_nanos(ns: i128) -> Timestamp {
        let secs = ns.div_euclid(NANOS);
        let sub = ns.rem_euclid(NANOS);
        let ntp_secs = (secs + NTP_TO_UNIX).rem_euclid(ERA) as u64;
        let frac = ((sub << 32) / NANOS) as u64;
        Timestamp((ntp_secs << 32) | frac)
    }

    /// NTP → Unix nanoseconds. Seconds with the top bit clear are taken as
    /// era 1 (from 2036), as RFC 4330 section 3 says, so the range is
    /// 1968 to 2104.
    pub fn to_unix_nanos(self) -> i128 {
        let secs = i128::from(self.0 >> 32);
        let secs = if secs & 0x8000_0000 == 0 { secs + ERA } else { secs };
        let frac = i128::from(self.0 & 0xffff_ffff);
        (secs - NTP_TO_UNIX) * NANOS + ((frac * NANOS) >> 32)
    }
}

/// One SNTP packet (no extension fields or MAC; those are ignored in replies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Packet {
    pub leap: u8,
    pub version: u8,
    pub mode: u8,
    pub stratum: u8,
    pub poll: i8,
    pub precision: i8,
    /// 16.16 fixed-point seconds.
    pub root_delay: u32,
    /// 16.16 fixed-point seconds.
    pub root_dispersion: u32,
    pub reference_id: [u8; 4],
    pub reference: Timestamp,
    pub origin: Timestamp,
    pub receive: Timestamp,
    pub transmit: Timestamp,
}

impl Packet {
    /// A client request. `nonce` goes in the transmit timestamp, which the
    /// server copies into its reply's origin timestamp.
    pub fn request(nonce: Timestamp) -> Packet {
        Packet { version: VERSION, mode: MODE_CLIENT, transmit: nonce, ..Packet::default() }
    }
}

pub fn encode(p: &Packet) -> [u8; PACKET_LEN] {
    let mut b = [0u8; PACKET_LEN];
    b[0] = ((p.leap & 3) << 6) | ((p.version & 7) << 3) | (p.mode & 7);
    b[1] = p.stratum;
    b[2] = p.poll as u8;
    b[3] = p.precision as u8;
    b[4..8].copy_from_slice(&p.root_delay.to_be_bytes());
    b[8..12].copy_from_slice(&p.root_dispersion.to_be_bytes());
    b[12..16].copy_from_slice(&p.reference_id);
    for (at, t) in [(16, p.reference), (24, p.origin), (32, p.receive), (40, p.transmit)] {
        b[at..at + 8].copy_from_slice(&t.0.to_be_bytes());
    }
    b
}

pub fn decode(buf: &[u8]) -> Result<Packet, ReplyError> {
    let b: &[u8; PACKET_LEN] = buf.get(..PACKET_LEN).and_then(|s| s.try_into().ok()).ok_or(ReplyError::Short(buf.len()))?;
    let be32 = |at: usize| u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let ts = |at: usize| Timestamp((u64::from(be32(at)) << 32) | u64::from(be32(at + 4)));
    Ok(Packet {
        leap: b[0] >> 6,
        version: (b[0] >> 3) & 7,
        mode: b[0] & 7,
        stratum: b[1],
        poll: b[2] as i8,
        precision: b[3] as i8,
        root_delay: be32(4),
        root_dispersion: be32(8),
        reference_id: [b[12], b[13], b[14], b[15]],
        reference: ts(16),
        origin: ts(24),
        receive: ts(32),
        transmit: ts(40),
    })
}

/// Why a reply is not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("{0} bytes is shorter than an NTP packet")]
    Short(usize),
    #[error("mode {0} is not a server reply (4)")]
    Mode(u8),
    #[error("NTP version {0} is not supported")]
    Version(u8),
    #[error("the server sent kiss-o'-death {0:?} (it refuses to serve this node now)")]
    KissOfDeath(String),
    #[error("stratum {0} is not a synchronized server (1..=15)")]
    Stratum(u8),
    #[error("the server says its own clock is not synchronized (leap indicator 3)")]
    Unsynchronized,
    #[error("the reply has no transmit timestamp")]
    ZeroTransmit,
    #[error("the reply's origin timestamp is not the one this node sent (a stale or forged reply)")]
    OriginMismatch,
    #[error("the server's timestamps run backwards (sent before received)")]
    Backwards,
    #[error("the server is {0} ms from its reference clock (more than 5 s)")]
    TooFar(i128),
}

impl ReplyError {
    /// Whether waiting longer for another reply to the same request can
    /// help: a stale or forged packet does not say anything about the server.
    pub fn is_stray(&self) -> bool {
        matches!(self, ReplyError::Short(_) | ReplyError::Mode(_) | ReplyError::OriginMismatch)
    }
}

/// What one good exchange says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Add this to the local clock to get the server's time.
    pub offset_ns: i128,
    /// Round trip, without the server's processing time.
    pub delay_ns: i128,
    pub stratum: u8,
}

/// Clock offset and round-trip delay from the four timestamps (RFC 5905
/// section 8): t1 sent and t4 received here, t2 received and t3 sent there.
pub fn offset_delay(t1: i128, t2: i128, t3: i128, t4: i128) -> (i128, i128) {
    let offset = ((t2 - t1) + (t3 - t4)).div_euclid(2);
    let delay = (t4 - t1) - (t3 - t2);
    (offset, delay.max(0))
}

/// Checks a reply to the request whose transmit timestamp was `nonce`, sent
/// at local time `t1` and answered at local time `t4`.
pub fn check_reply(buf: &[u8], nonce: Timestamp, t1: i128, t4: i128) -> Result<Sample, ReplyError> {
    let p = decode(buf)?;
    if p.mode != MODE_SERVER {
        return Err(ReplyError::Mode(p.mode));
    }
    if p.origin != nonce {
        return Err(ReplyError::OriginMismatch);
    }
    if p.version == 0 || p.version > VERSION {
        return Err(ReplyError::Version(p.version));
    }
    if p.stratum == 0 {
        let code: String = p.reference_id.iter().map(|&c| if c.is_ascii_graphic() { c as char } else { '?' }).collect();
        return Err(ReplyError::KissOfDeath(code));
    }
    if p.stratum > 15 {
        return Err(ReplyError::Stratum(p.stratum));
    }
    if p.leap == LEAP_ALARM {
        return Err(ReplyError::Unsynchronized);
    }
    if p.transmit.0 == 0 {
        return Err(ReplyError::ZeroTransmit);
    }
    let (t2, t3) = (p.receive.to_unix_nanos(), p.transmit.to_unix_nanos());
    if p.receive.0 == 0 || t3 < t2 {
        return Err(ReplyError::Backwards);
    }
    let fixed = |v: u32| (i128::from(v) * NANOS) >> 16;
    let distance = fixed(p.root_delay) / 2 + fixed(p.root_dispersion);
    if distance > MAX_ROOT_DISTANCE_NS {
        return Err(ReplyError::TooFar(distance / 1_000_000));
    }
    let (offset_ns, delay_ns) = offset_delay(t1, t2, t3, t4);
    Ok(Sample { offset_ns, delay_ns, stratum: p.stratum })
}

/// The Unix time in nanoseconds (CLOCK_REALTIME).
pub fn realtime_nanos() -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer; CLOCK_REALTIME always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    i128::from(ts.tv_sec) * NANOS + i128::from(ts.tv_nsec)
}

/// Why an exchange gave no sample.
#[derive(Debug)]
pub enum QueryError {
    /// The socket could not be made or the request not sent (no route, …).
    Send(io::Error),
    /// An ICMP error came back: nothing listens there, or no route.
    Unreachable(io::Error),
    /// Only unusable replies, or none, before the deadline.
    NoReply { after: Duration, last: Option<ReplyError> },
    /// The server answered, and the answer says not to use it.
    Refused(ReplyError),
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueryError::Send(e) => write!(f, "cannot send: {}", short_io(e)),
            QueryError::Unreachable(e) => write!(f, "{}", short_io(e)),
            QueryError::NoReply { after, last: None } => write!(f, "no answer within {:.1} s", after.as_secs_f64()),
            QueryError::NoReply { after, last: Some(r) } => write!(f, "no usable answer within {:.1} s (last: {r})", after.as_secs_f64()),
            QueryError::Refused(r) => write!(f, "{r}"),
        }
    }
}

impl std::error::Error for QueryError {}

fn short_io(e: &io::Error) -> String {
    let text = match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => return "port unreachable (nothing answers NTP there)".into(),
        _ => e.to_string(),
    };
    match text.rfind(" (os error ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// One exchange with `server`: a request, then waiting until `until` for a
/// valid reply. Replies from other addresses never arrive (the socket is
/// connected) and stray ones are skipped.
pub fn query(server: SocketAddr, until: Instant) -> Result<Sample, QueryError> {
    // Random low bits in the transmit timestamp, so an off-path sender cannot
    // guess the origin timestamp a reply must carry.
    query_with(server, until, super::sys::random_u64(server.to_string().as_bytes()) as u32)
}

fn query_with(server: SocketAddr, until: Instant, nonce_bits: u32) -> Result<Sample, QueryError> {
    let start = Instant::now();
    let local: SocketAddr = if server.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let sock = UdpSocket::bind(local).map_err(QueryError::Send)?;
    sock.connect(server).map_err(QueryError::Send)?;
    let t1 = realtime_nanos();
    let nonce = Timestamp((Timestamp::from_unix_nanos(t1).0 & !0xffff_ffff) | u64::from(nonce_bits));
    sock.send(&encode(&Packet::request(nonce))).map_err(|e| match e.raw_os_error() {
        Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH) => QueryError::Unreachable(e),
        _ => QueryError::Send(e),
    })?;
    let mut last = None;
    let mut buf = [0u8; 512];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(QueryError::NoReply { after: start.elapsed(), last });
        }
        sock.set_read_timeout(Some(left)).map_err(QueryError::Send)?;
        match sock.recv(&mut buf) {
            Ok(n) => {
                let t4 = realtime_nanos();
                match check_reply(&buf[..n], nonce, t1, t4) {
                    Ok(s) => return Ok(s),
                    Err(e) if e.is_stray() => last = Some(e),
                    Err(e) => return Err(QueryError::Refused(e)),
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH)) => {
                return Err(QueryError::Unreachable(e))
            }
            Err(e) => return Err(QueryError::Send(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: i128 = NANOS;
    /// 2025-01-01T00:00:00Z.
    const NEW_YEAR: i128 = 1_735_689_600 * S;

    fn reply(nonce: Timestamp, t2: i128, t3: i128) -> Packet {
        Packet {
            leap: 0,
            version: 4,
            mode: MODE_SERVER,
            stratum: 2,
            reference_id: [10, 0, 0, 1],
            origin: nonce,
            receive: Timestamp::from_unix_nanos(t2),
            transmit: Timestamp::from_unix_nanos(t3),
            ..Packet::default()
        }
    }

    #[test]
    fn request_bytes() {
        let b = encode(&Packet::request(Timestamp(0x0102_0304_0506_0708)));
        assert_eq!(b[0], 0x23, "LI 0, VN 4, mode 3");
        assert!(b[1..40].iter().all(|&x| x == 0));
        assert_eq!(&b[40..], &[1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn encode_decode_round_trip() {
        let p = Packet {
            leap: 1,
            version: 3,
            mode: 4,
            stratum: 15,
            poll: -6,
            precision: -20,
            root_delay: 0x0001_8000,
            root_dispersion: 7,
            reference_id: *b"GPS\0",
            reference: Timestamp(1),
            origin: Timestamp(u64::MAX),
            receive: Timestamp(3 << 32),
            transmit: Timestamp(4),
        };
        assert_eq!(decode(&encode(&p)), Ok(p));
        let mut long = encode(&p).to_vec();
        long.extend_from_slice(&[0; 20]); // an extension field or MAC is ignored
        assert_eq!(decode(&long), Ok(p));
        assert_eq!(decode(&long[..47]), Err(ReplyError::Short(47)));
    }

    #[test]
    fn timestamps_and_eras() {
        assert_eq!(Timestamp::from_unix_nanos(0), Timestamp((NTP_TO_UNIX as u64) << 32));
        assert_eq!(Timestamp::from_unix_nanos(S / 2).0 & 0xffff_ffff, 1 << 31);
        for t in [0, NEW_YEAR + 123_456_789, -(S / 3), 2_085_978_496 * S, 4_000_000_000 * S] {
            let back = Timestamp::from_unix_nanos(t).to_unix_nanos();
            assert!((back - t).abs() <= 1, "{t} came back as {back}");
        }
        // 2036-02-07T06:28:16Z is the start of era 1: NTP seconds wrap to 0.
        let era1 = 2_085_978_496 * S;
        assert_eq!(Timestamp::from_unix_nanos(era1).0 >> 32, 0);
        assert_eq!(Timestamp((0x8000_0000u64) << 32).to_unix_nanos(), (0x8000_0000 - NTP_TO_UNIX) * S, "1968");
    }

    #[test]
    fn offset_math() {
        // Server 10 s ahead, 20 ms each way, 1 ms processing.
        let t1 = NEW_YEAR;
        let t2 = t1 + 10 * S + 20_000_000;
        let t3 = t2 + 1_000_000;
        let t4 = t1 + 41_000_000;
        assert_eq!(offset_delay(t1, t2, t3, t4), (10 * S, 40_000_000));
        // A node in 1970 and a server in 2025.
        let (o, d) = offset_delay(0, NEW_YEAR, NEW_YEAR, 2_000_000);
        assert_eq!((o, d), (NEW_YEAR - 1_000_000, 2_000_000));
        // Asymmetric paths bias the offset by half the asymmetry.
        assert_eq!(offset_delay(0, 30, 30, 10), (25, 10));
        // A negative delay (coarse server clock) is clamped.
        assert_eq!(offset_delay(0, 0, 20, 10), (5, 0));
    }

    #[test]
    fn a_good_reply_gives_a_sample() {
        let nonce = Timestamp::from_unix_nanos(NEW_YEAR);
        let b = encode(&reply(nonce, NEW_YEAR + 3600 * S, NEW_YEAR + 3600 * S));
        let s = check_reply(&b, nonce, NEW_YEAR, NEW_YEAR + 2_000_000).unwrap();
        assert_eq!(s, Sample { offset_ns: 3600 * S - 1_000_000, delay_ns: 2_000_000, stratum: 2 });
    }

    #[test]
    fn bad_replies_are_refused() {
        let nonce = Timestamp::from_unix_nanos(NEW_YEAR);
        let good = reply(nonce, NEW_YEAR, NEW_YEAR);
        let check = |p: Packet| check_reply(&encode(&p), nonce, NEW_YEAR, NEW_YEAR + 1);
        assert!(check(good).is_ok());
        assert_eq!(check(Packet { mode: 3, ..good }), Err(ReplyError::Mode(3)));
        assert_eq!(check(Packet { mode: 5, ..good }), Err(ReplyError::Mode(5)));
        assert_eq!(check(Packet { version: 0, ..good }), Err(ReplyError::Version(0)));
        assert_eq!(check(Packet { version: 5, ..good }), Err(ReplyError::Version(5)));
        assert!(check(Packet { version: 3, ..good }).is_ok(), "NTPv3 servers answer in kind");
        assert_eq!(check(Packet { stratum: 0, reference_id: *b"RATE", ..good }), Err(ReplyError::KissOfDeath("RATE".into())));
        assert_eq!(check(Packet { stratum: 16, ..good }), Err(ReplyError::Stratum(16)));
        assert!(check(Packet { stratum: 1, ..good }).is_ok());
        assert!(check(Packet { stratum: 15, ..good }).is_ok());
        assert_eq!(check(Packet { leap: 3, ..good }), Err(ReplyError::Unsynchronized));
        assert!(check(Packet { leap: 1, ..good }).is_ok(), "a leap second ahead is fine");
        assert_eq!(check(Packet { transmit: Timestamp(0), ..good }), Err(ReplyError::ZeroTransmit));
        assert_eq!(check(Packet { origin: Timestamp(nonce.0 ^ 1), ..good }), Err(ReplyError::OriginMismatch));
        assert_eq!(check(Packet { receive: Timestamp::from_unix_nanos(NEW_YEAR + S), ..good }), Err(ReplyError::Backwards));
        assert_eq!(check(Packet { root_dispersion: 6 << 16, ..good }), Err(ReplyError::TooFar(6000)));
        assert!(check(Packet { root_delay: 8 << 16, root_dispersion: 0, ..good }).is_ok(), "4 s away is within 5 s");
        assert!(ReplyError::OriginMismatch.is_stray() && !ReplyError::Unsynchronized.is_stray());
    }

    /// A one-shot SNTP server on the loopback that answers `ahead_ns` ahead.
    fn serve_once(ahead_ns: i128, tweak: impl FnOnce(&mut Packet) + Send + 'static) -> SocketAddr {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            let (n, from) = sock.recv_from(&mut buf).unwrap();
            let req = decode(&buf[..n]).unwrap();
            assert_eq!((req.mode, req.version), (3, 4));
            let now = realtime_nanos() + ahead_ns;
            let mut p = reply(req.transmit, now, now);
            tweak(&mut p);
            sock.send_to(&encode(&p), from).unwrap();
        });
        addr
    }

    #[test]
    fn query_over_loopback() {
        let addr = serve_once(1000 * S, |_| {});
        let s = query_with(addr, Instant::now() + Duration::from_secs(5), 0x1234_5678).unwrap();
        assert!((s.offset_ns - 1000 * S).abs() < S / 2, "{s:?}");
        assert_eq!(s.stratum, 2);

        let addr = serve_once(0, |p| p.origin = Timestamp(p.origin.0 ^ 1));
        let e = query_with(addr, Instant::now() + Duration::from_millis(500), 7).unwrap_err();
        assert!(matches!(e, QueryError::NoReply { last: Some(ReplyError::OriginMismatch), .. }), "{e}");

        let addr = serve_once(0, |p| p.leap = 3);
        let e = query(addr, Instant::now() + Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, QueryError::Refused(ReplyError::Unsynchronized)), "{e}");
    }

    #[test]
    fn query_to_a_closed_port_ends_early() {
        let port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let start = Instant::now();
        let e = query(port, Instant::now() + Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, QueryError::Unreachable(_)), "{e}");
        assert!(e.to_string().contains("port unreachable"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(4));
    }

    proptest! {
        #[test]
        fn arbitrary_reply_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..80),
            nonce in any::<u64>(), t1 in any::<i64>(), t4 in any::<i64>()
        ) {
            let _ = decode(&bytes);
            let _ = check_reply(&bytes, Timestamp(nonce), i128::from(t1), i128::from(t4));
        }

        #[test]
        fn arbitrary_replies_to_our_nonce_never_panic(
            mut bytes in proptest::collection::vec(any::<u8>(), 48..64),
            nonce in any::<u64>(), t1 in any::<i64>(), t4 in any::<i64>()
        ) {
            bytes[24..32].copy_from_slice(&nonce.to_be_bytes());
            bytes[0] = (bytes[0] & !7) | MODE_SERVER;
            if let Ok(s) = check_reply(&bytes, Timestamp(nonce), i128::from(t1), i128::from(t4)) {
                prop_assert!(s.delay_ns >= 0);
                prop_assert!((1..=15).contains(&s.stratum));
            }
        }

        #[test]
        fn timestamps_round_trip(t in -61_505_152i64 * 1_000_000_000..4_230_442_495i64 * 1_000_000_000) {
            let back = Timestamp::from_unix_nanos(i128::from(t)).to_unix_nanos();
            prop_assert!((back - i128::from(t)).abs() <= 1);
        }
    }
}
