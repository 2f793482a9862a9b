//! The clock: set by SNTP once the network is up and before the payload
//! starts, because boards without an RTC start in 1970 and TLS then judges
//! every certificate wrong. The wait is bounded (`time.wait_seconds`); after
//! it the node carries on with a warning. A background thread then re-syncs
//! every 1024 s (sooner while unsynced) and speaks only when the state
//! changes.

use super::console;
use super::netup::NetState;
use kiln_contract::config::{self, NtpHost, NtpServer, Time};
use kiln_contract::date::civil_from_days;
use crate::net::sntp::{self, Sample};
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Re-sync period while synced (NTP's maximum poll interval, 2^10 s).
pub const RESYNC: Duration = Duration::from_secs(1024);
/// First retry while unsynced; it doubles up to [`RESYNC`].
const RETRY_FIRST: Duration = Duration::from_secs(64);
/// The bound on one background re-sync.
const RESYNC_WAIT: Duration = Duration::from_secs(10);
/// Per-request wait: 1 s, doubling to this.
const TRY_MAX: Duration = Duration::from_secs(4);
/// Addresses tried per host name.
const ADDRS_PER_NAME: usize = 4;
/// Re-syncs slew offsets below this (adjtime, at most 0.5 ms/s) instead of
/// stepping the clock under a running payload.
const SLEW_MAX_NS: i128 = 500_000_000;
const NANOS: i128 = 1_000_000_000;

pub const REASON_NO_SERVERS: &str = "no NTP servers (set time.ntp in node.toml or DHCP option 42)";
pub const REASON_DISABLED: &str = "time sync is disabled (time.ntp = [] in node.toml)";

/// One server to ask and where it came from (`node.toml` or `dhcp`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub spec: NtpServer,
    pub source: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Disabled,
    NoServers,
    Ask(Vec<Server>),
}

/// The servers to ask: `time.ntp` when set, else those of the DHCP leases.
pub fn plan(time: &Time, dhcp_ntp: &[std::net::Ipv4Addr]) -> Plan {
    let servers: Vec<Server> = match &time.ntp {
        Some(list) if list.is_empty() => return Plan::Disabled,
        // Validated with the config; an entry that does not parse is skipped.
        Some(list) => list.iter().filter_map(|s| config::parse_ntp_server(s).ok()).map(|spec| Server { spec, source: "node.toml" }).collect(),
        None => {
            let mut v: Vec<Server> = Vec::new();
            for a in dhcp_ntp {
                let spec = NtpServer { host: NtpHost::Ip(IpAddr::V4(*a)), port: sntp::PORT };
                if !v.iter().any(|s| s.spec == spec) {
                    v.push(Server { spec, source: "dhcp" });
                }
            }
            v
        }
    };
    if servers.is_empty() {
        Plan::NoServers
    } else {
        Plan::Ask(servers)
    }
}

/// A good answer, and from whom.
struct Found {
    server: Server,
    addr: SocketAddr,
    sample: Sample,
}

/// Asks the servers in turn, each round waiting 1 s per request, then 2 s,
/// up to 4 s, until one answers well or `wait` is over. The error names what
/// each server did last.
fn attempt(servers: &[Server], wait: Duration) -> Result<Found, String> {
    let start = Instant::now();
    let deadline = start + wait;
    let mut last: Vec<Option<String>> = vec![None; servers.len()];
    // Names are looked up all at once, each in its own thread, so a DNS
    // server that does not answer holds up neither the others nor the wait.
    let mut lookups: Vec<Lookup> = servers.iter().map(|s| Lookup::start(&s.spec)).collect();
    let mut try_len = Duration::from_secs(1);
    loop {
        let round_end = (Instant::now() + try_len).min(deadline);
        for (i, server) in servers.iter().enumerate() {
            if Instant::now() >= deadline {
                break;
            }
            let addrs = match lookups[i].addrs((Instant::now() + try_len).min(deadline)) {
                Ok(a) => a,
                Err(e) => {
                    last[i] = Some(format!("{}: {e}", server.spec));
                    if matches!(lookups[i], Lookup::Failed) {
                        lookups[i] = Lookup::start(&server.spec);
                    }
                    continue;
                }
            };
            for addr in addrs {
                let until = (Instant::now() + try_len).min(deadline);
                if until <= Instant::now() {
                    break;
                }
                match sntp::query(addr, until) {
                    Ok(sample) => return Ok(Found { server: server.clone(), addr, sample }),
                    Err(e) => last[i] = Some(format!("{addr}: {e}")),
                }
            }
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        // A refusal comes back at once; do not turn it into a busy loop.
        std::thread::sleep(round_end.saturating_duration_since(now));
        try_len = (try_len * 2).min(TRY_MAX);
        if Instant::now() >= deadline {
            break;
        }
    }
    let said: Vec<String> = last.into_iter().flatten().collect();
    Err(if said.is_empty() {
        format!("no NTP server answered within {} s", wait.as_secs())
    } else {
        format!("no NTP server answered within {} s: {}", wait.as_secs(), said.join("; "))
    })
}

type LookupResult = io::Result<Vec<SocketAddr>>;

/// A server's addresses: known, or being looked up through the C library
/// (musl reads the /etc/resolv.conf written from DHCP and node.toml).
enum Lookup {
    Ready(Vec<SocketAddr>),
    Pending(std::sync::mpsc::Receiver<LookupResult>),
    /// The last lookup failed; the next round starts another.
    Failed,
}

impl Lookup {
    fn start(s: &NtpServer) -> Lookup {
        let name = match &s.host {
            NtpHost::Ip(ip) => return Lookup::Ready(vec![SocketAddr::new(*ip, s.port)]),
            NtpHost::Name(n) => n.clone(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let port = s.port;
        let lookup = move || {
            let _ = tx.send((name.as_str(), port).to_socket_addrs().map(|a| a.take(ADDRS_PER_NAME).collect()));
        };
        match std::thread::Builder::new().name("kiln-resolve".into()).spawn(lookup) {
            Ok(_) => Lookup::Pending(rx),
            Err(_) => Lookup::Failed,
        }
    }

    /// The addresses, waiting for a pending lookup until `until` at most.
    fn addrs(&mut self, until: Instant) -> Result<Vec<SocketAddr>, String> {
        let got = match self {
            Lookup::Ready(a) => return Ok(a.clone()),
            Lookup::Failed => return Err("cannot start a name lookup".into()),
            Lookup::Pending(rx) => match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(r) => r,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return Err("the name has not resolved yet (check the DNS server in /etc/resolv.conf)".into()),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(io::Error::other("the lookup ended without an answer")),
            },
        };
        match got {
            Ok(a) if !a.is_empty() => {
                *self = Lookup::Ready(a.clone());
                Ok(a)
            }
            Ok(_) => {
                *self = Lookup::Failed;
                Err("the name has no address".into())
            }
            Err(e) => {
                *self = Lookup::Failed;
                Err(format!("cannot resolve the name: {e} (check the DNS server in /etc/resolv.conf)"))
            }
        }
    }
}

/// Sets the clock from the node config or DHCP before the payload starts:
/// `clock-synced`, or `clock-unsynced` and a warning. Then keeps it.
pub fn sync_at_boot(time: &Time, net: &NetState) {
    let dhcp: Vec<std::net::Ipv4Addr> = net.held.iter().flat_map(|h| h.lease.ntp.iter().copied()).collect();
    let servers = match plan(time, &dhcp) {
        Plan::Disabled => {
            announce_unsynced(REASON_DISABLED, Duration::ZERO);
            return;
        }
        Plan::NoServers => {
            announce_unsynced(REASON_NO_SERVERS, Duration::ZERO);
            warn_wrong_time("set time.ntp in node.toml (for example ntp = [\"pool.ntp.org\"]) or have the DHCP server hand out NTP servers (option 42)");
            return;
        }
        Plan::Ask(s) => s,
    };
    if net.addresses.is_empty() {
        announce_unsynced("no network address, so no NTP server can be reached", Duration::ZERO);
        warn_wrong_time("fix the network (see network-failed above)");
        return;
    }
    let wait = Duration::from_secs(time.wait_seconds.into());
    let start = Instant::now();
    let synced = match attempt(&servers, wait) {
        Ok(f) => match step(f.sample.offset_ns) {
            Ok(()) => {
                announce_synced(&f);
                true
            }
            Err(e) => {
                announce_unsynced(&format!("setting the clock from {}: {e}", f.addr), start.elapsed());
                warn_wrong_time("see the error above; kiln-init tries again in the background");
                false
            }
        },
        Err(reason) => {
            announce_unsynced(&reason, start.elapsed());
            warn_wrong_time(&format!(
                "make an NTP server reachable from this node (time.ntp in node.toml, or DHCP option 42) or set the hardware clock; kiln-init keeps trying every {}..{} s",
                RETRY_FIRST.as_secs(),
                RESYNC.as_secs()
            ));
            false
        }
    };
    let spawned = std::thread::Builder::new().name("kiln-clock".into()).spawn(move || keep(&servers, synced));
    if let Err(e) = spawned {
        console::error(&format!("clock: cannot start the re-sync thread: {e}; the clock will drift"));
    }
}

/// Before fetching an https:// config on a node whose clock NTP has not set
/// (a board without a battery starts in 1970, and every certificate then
/// looks not yet valid): one bounded try with the NTP servers the DHCP
/// lease gave. True when the clock is set now. Quiet on failure: the
/// certificate error that may follow names the clock.
pub fn sync_for_tls(net: &NetState, wait: Duration) -> bool {
    if synced() {
        return true;
    }
    let dhcp: Vec<std::net::Ipv4Addr> = net.held.iter().flat_map(|h| h.lease.ntp.iter().copied()).collect();
    let Plan::Ask(servers) = plan(&Time::default(), &dhcp) else { return false };
    match attempt(&servers, wait) {
        Ok(f) if step(f.sample.offset_ns).is_ok() => {
            announce_synced(&f);
            true
        }
        _ => false,
    }
}

/// Re-syncs forever: every [`RESYNC`] while synced, after 64 s doubling to
/// 1024 s while not. Events only on a change of state.
fn keep(servers: &[Server], mut synced: bool) {
    let mut retry = RETRY_FIRST;
    loop {
        std::thread::sleep(if synced { RESYNC } else { retry });
        let start = Instant::now();
        let result = attempt(servers, RESYNC_WAIT).and_then(|f| {
            let off = f.sample.offset_ns;
            let r = if synced && off.abs() < SLEW_MAX_NS { slew(off) } else { step(off) };
            r.map(|()| f).map_err(|e| format!("setting the clock: {e}"))
        });
        match result {
            Ok(f) => {
                if !synced {
                    announce_synced(&f);
                } else if f.sample.offset_ns.abs() >= SLEW_MAX_NS {
                    console::info(&format!("clock: stepped by {} ms to match {}", f.sample.offset_ns / 1_000_000, f.addr));
                }
                synced = true;
                retry = RETRY_FIRST;
            }
            Err(reason) => {
                if synced {
                    announce_unsynced(&reason, start.elapsed());
                    console::warn(&format!("clock: re-sync failed; the clock now drifts freely until an NTP server answers (tried every {}..{} s)", RETRY_FIRST.as_secs(), RESYNC.as_secs()));
                }
                synced = false;
                retry = (retry * 2).min(RESYNC);
            }
        }
    }
}

/// Whether NTP has set the clock since boot (and the last try did not fail).
static SYNCED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// True once NTP has set the clock and while re-syncs keep working.
pub fn synced() -> bool {
    SYNCED.load(std::sync::atomic::Ordering::Relaxed)
}

fn announce_synced(f: &Found) {
    SYNCED.store(true, std::sync::atomic::Ordering::Relaxed);
    let now = sntp::realtime_nanos();
    let _ = write_rtc(now.div_euclid(NANOS));
    console::event(
        "clock-synced",
        &[
            ("server", &f.addr),
            ("source", &f.server.source),
            ("offset_ms", &(f.sample.offset_ns / 1_000_000)),
            ("delay_ms", &(f.sample.delay_ns / 1_000_000)),
            ("stratum", &f.sample.stratum),
            ("time", &now.div_euclid(NANOS)),
            ("uptime", &format!("{:.2}", super::sys::uptime())),
        ],
    );
}

fn announce_unsynced(reason: &str, waited: Duration) {
    SYNCED.store(false, std::sync::atomic::Ordering::Relaxed);
    console::event(
        "clock-unsynced",
        &[
            ("reason", &reason),
            ("waited", &format!("{:.1}", waited.as_secs_f64())),
            ("time", &sntp::realtime_nanos().div_euclid(NANOS)),
            ("uptime", &format!("{:.2}", super::sys::uptime())),
        ],
    );
}

fn warn_wrong_time(what_to_do: &str) {
    let now = sntp::realtime_nanos().div_euclid(NANOS);
    console::warn(&format!(
        "clock: not set by NTP; it reads {}. If that is wrong, TLS certificates are judged not yet valid or expired, and k0s may fail to join its cluster, pull images or serve its API. To fix: {what_to_do}",
        utc_text(now)
    ));
}

/// Adds `offset_ns` to CLOCK_REALTIME at once.
fn step(offset_ns: i128) -> io::Result<()> {
    let target = sntp::realtime_nanos() + offset_ns;
    // SAFETY: timespec is plain data; zeroed leaves any padding field zero.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // tv_sec's type (time_t) is 32 bits on armv7 glibc; its name is
    // deprecated on musl, so it is inferred from the field.
    ts.tv_sec = target.div_euclid(NANOS).try_into().map_err(|_| io::Error::other(format!("{} is beyond what this platform's clock can hold", utc_text(target.div_euclid(NANOS)))))?;
    ts.tv_nsec = target.rem_euclid(NANOS) as _;
    // SAFETY: valid pointer to an initialised timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Moves CLOCK_REALTIME by `offset_ns` gradually (adjtime).
fn slew(offset_ns: i128) -> io::Result<()> {
    let us = (offset_ns / 1000) as i64;
    // SAFETY: timeval is plain data.
    let mut tv: libc::timeval = unsafe { std::mem::zeroed() };
    tv.tv_sec = (us / 1_000_000) as _;
    tv.tv_usec = (us % 1_000_000) as _;
    // SAFETY: valid pointer; the old delta is not wanted.
    if unsafe { libc::adjtime(&tv, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `struct rtc_time` (linux/rtc.h): the fields of a `struct tm`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RtcTime {
    pub sec: libc::c_int,
    pub min: libc::c_int,
    pub hour: libc::c_int,
    pub mday: libc::c_int,
    /// 0..=11.
    pub mon: libc::c_int,
    /// Years since 1900.
    pub year: libc::c_int,
    /// 0 = Sunday.
    pub wday: libc::c_int,
    /// 0..=365.
    pub yday: libc::c_int,
    pub isdst: libc::c_int,
}

/// `_IOW('p', 0x0a, struct rtc_time)`.
const RTC_SET_TIME: u32 = (1 << 30) | ((std::mem::size_of::<RtcTime>() as u32) << 16) | (0x70 << 8) | 0x0a;
const RTC: &str = "/dev/rtc0";

/// Writes the time to the hardware clock, in UTC, when there is one. Best
/// effort: a board without a battery forgets it anyway, and a failure is
/// said once.
fn write_rtc(unix_secs: i128) -> Result<(), String> {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !std::path::Path::new(RTC).exists() {
        return Ok(());
    }
    let r = (|| {
        let tm = rtc_time(unix_secs).ok_or_else(|| format!("{} does not fit an RTC", utc_text(unix_secs)))?;
        let f = std::fs::File::open(RTC).map_err(|e| format!("opening {RTC}: {e}"))?;
        use std::os::fd::AsRawFd;
        // SAFETY: valid fd and a pointer to a live rtc_time of the size the
        // request encodes.
        if unsafe { libc::ioctl(f.as_raw_fd(), RTC_SET_TIME as _, &tm as *const RtcTime) } != 0 {
            return Err(format!("RTC_SET_TIME on {RTC}: {}", io::Error::last_os_error()));
        }
        Ok(())
    })();
    if let Err(e) = &r {
        if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
            console::warn(&format!("clock: the hardware clock was not updated: {e}"));
        }
    }
    r
}

fn is_leap(y: i128) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

/// The RTC fields for a Unix time; None outside what `c_int` years hold.
pub fn rtc_time(unix_secs: i128) -> Option<RtcTime> {
    let days = unix_secs.div_euclid(86_400);
    let sod = unix_secs.rem_euclid(86_400) as libc::c_int;
    let (y, m, d) = civil_from_days(i64::try_from(days).ok()?);
    let y = i128::from(y);
    const BEFORE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = BEFORE[(m - 1) as usize] + d - 1 + u32::from(m > 2 && is_leap(y));
    Some(RtcTime {
        sec: sod % 60,
        min: sod / 60 % 60,
        hour: sod / 3600,
        mday: d as libc::c_int,
        mon: m as libc::c_int - 1,
        year: libc::c_int::try_from(y - 1900).ok()?,
        wday: (days + 4).rem_euclid(7) as libc::c_int,
        yday: yday as libc::c_int,
        isdst: 0,
    })
}

/// `2025-01-01 00:00:00 UTC`, for people.
pub fn utc_text(unix_secs: i128) -> String {
    let (y, m, d) = civil_from_days(unix_secs.div_euclid(86_400).clamp(-(1 << 40), 1 << 40) as i64);
    let s = unix_secs.rem_euclid(86_400);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", s / 3600, s / 60 % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn time(ntp: Option<&[&str]>) -> Time {
        Time { ntp: ntp.map(|l| l.iter().map(|s| s.to_string()).collect()), wait_seconds: 15 }
    }

    #[test]
    fn which_servers() {
        let dhcp = ["10.0.2.4".parse().unwrap(), "10.0.2.4".parse().unwrap(), "10.0.2.5".parse().unwrap()];
        assert_eq!(plan(&time(Some(&[])), &dhcp), Plan::Disabled, "[] means off, even with DHCP servers");
        assert_eq!(plan(&time(None), &[]), Plan::NoServers);
        let Plan::Ask(from_dhcp) = plan(&time(None), &dhcp) else { panic!() };
        assert_eq!(from_dhcp.iter().map(|s| (s.spec.to_string(), s.source)).collect::<Vec<_>>(), [("10.0.2.4:123".to_string(), "dhcp"), ("10.0.2.5:123".to_string(), "dhcp")]);
        let Plan::Ask(own) = plan(&time(Some(&["10.0.2.2:1123", "pool.ntp.org"])), &dhcp) else { panic!() };
        assert_eq!(own.iter().map(|s| (s.spec.to_string(), s.source)).collect::<Vec<_>>(), [("10.0.2.2:1123".to_string(), "node.toml"), ("pool.ntp.org:123".to_string(), "node.toml")]);
    }

    #[test]
    fn dates() {
        assert_eq!(utc_text(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_text(951_782_400 + 3723), "2000-02-29 01:02:03 UTC");
        assert_eq!(utc_text(-1), "1969-12-31 23:59:59 UTC");
        assert_eq!(utc_text(2_147_483_648), "2038-01-19 03:14:08 UTC");
        let t = rtc_time(1_709_164_800 + 86_399).unwrap();
        assert_eq!(t, RtcTime { sec: 59, min: 59, hour: 23, mday: 29, mon: 1, year: 124, wday: 4, yday: 59, isdst: 0 });
        let t = rtc_time(1_735_689_600).unwrap();
        assert_eq!((t.year, t.mon, t.mday, t.wday, t.yday), (125, 0, 1, 3, 0));
        let t = rtc_time(-86_400).unwrap();
        assert_eq!((t.year, t.mon, t.mday, t.wday, t.yday), (69, 11, 31, 3, 364));
        assert_eq!(RTC_SET_TIME, 0x4024_700a, "the value linux/rtc.h gives");
    }

    /// A one-shot SNTP server on 127.0.0.1, `ahead_ns` ahead; its port.
    fn serve_once(ahead_ns: i128, stratum: u8) -> u16 {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = sock.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            let (n, from) = sock.recv_from(&mut buf).unwrap();
            let req = sntp::decode(&buf[..n]).unwrap();
            let now = sntp::Timestamp::from_unix_nanos(sntp::realtime_nanos() + ahead_ns);
            let p = sntp::Packet { version: 4, mode: 4, stratum, origin: req.transmit, receive: now, transmit: now, ..Default::default() };
            sock.send_to(&sntp::encode(&p), from).unwrap();
        });
        port
    }

    #[test]
    fn attempt_against_a_loopback_server() {
        let port = serve_once(86_400 * NANOS, 3);
        // A closed port first: its refusal is recorded and the next server asked.
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let Plan::Ask(servers) = plan(&time(Some(&[&format!("127.0.0.1:{closed}"), &format!("127.0.0.1:{port}")])), &[]) else { panic!() };
        let f = attempt(&servers, Duration::from_secs(5)).unwrap();
        assert_eq!(f.addr.port(), port);
        assert!((f.sample.offset_ns - 86_400 * NANOS).abs() < NANOS, "{}", f.sample.offset_ns);
        assert_eq!(f.sample.stratum, 3);
    }

    #[test]
    fn names_are_looked_up() {
        let port = serve_once(0, 1);
        let Plan::Ask(servers) = plan(&time(Some(&["no-such-host.invalid", &format!("localhost:{port}")])), &[]) else { panic!() };
        let f = attempt(&servers, Duration::from_secs(5)).unwrap();
        assert_eq!(f.addr.port(), port);
        assert!(f.addr.ip().is_loopback());
        assert!(f.sample.offset_ns.abs() < NANOS);
    }

    #[test]
    fn attempt_is_bounded_and_says_why() {
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let Plan::Ask(servers) = plan(&time(Some(&[&format!("127.0.0.1:{closed}")])), &[]) else { panic!() };
        let start = Instant::now();
        let Err(e) = attempt(&servers, Duration::from_secs(2)) else { panic!() };
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(3), "{took:?}");
        assert!(e.contains("within 2 s") && e.contains(&format!("127.0.0.1:{closed}")) && e.contains("port unreachable"), "{e}");
    }

    proptest! {
        #[test]
        fn rtc_fields_are_in_range(t in -4_000_000_000i64..8_000_000_000i64) {
            let r = rtc_time(i128::from(t)).unwrap();
            prop_assert!((0..60).contains(&r.sec) && (0..60).contains(&r.min) && (0..24).contains(&r.hour));
            prop_assert!((1..=31).contains(&r.mday) && (0..12).contains(&r.mon) && (0..7).contains(&r.wday) && (0..366).contains(&r.yday));
        }
    }
}
