//! The clock: kiln-init sets it by SNTP before the payload starts. A small
//! SNTP server in this test (UDP on 127.0.0.1, which QEMU user networking
//! shows the guest as 10.0.2.2) serves a time ten days ahead of the host's,
//! so a synced node is easy to tell from one that kept its RTC time.

mod common;

use common::{boot, built, BOOT_TIMEOUT};
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const PROFILE: &str = "qemu-amd64";
/// How far ahead of the host's clock the test server is.
const AHEAD: i64 = 10 * 86_400;
/// Seconds from 1900 (NTP) to 1970 (Unix).
const NTP_TO_UNIX: u64 = 2_208_988_800;

/// Host time in seconds (fractional) since 1970.
fn host_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// An SNTP server on loopback, written from RFC 4330 here rather than with
/// kiln-init's encoder, so a mistake on one side is not mirrored on the other.
struct SntpServer {
    port: u16,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl SntpServer {
    fn start(ahead: i64) -> SntpServer {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("binding the test SNTP server");
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let port = sock.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else { continue };
                // A client request: at least 48 bytes, mode 3.
                if n < 48 || buf[0] & 7 != 3 {
                    continue;
                }
                r.fetch_add(1, Ordering::Relaxed);
                let now = ntp_timestamp(host_now() + ahead as f64);
                let mut reply = [0u8; 48];
                reply[0] = (4 << 3) | 4; // LI 0, VN 4, mode 4 (server)
                reply[1] = 2; // stratum 2
                reply[2] = 6; // poll
                reply[3] = 0xec; // precision 2^-20
                reply[12..16].copy_from_slice(&[127, 0, 0, 1]); // reference id
                reply[16..24].copy_from_slice(&now.to_be_bytes()); // reference
                reply[24..32].copy_from_slice(&buf[40..48]); // origin = their transmit
                reply[32..40].copy_from_slice(&now.to_be_bytes()); // receive
                reply[40..48].copy_from_slice(&now.to_be_bytes()); // transmit
                let _ = sock.send_to(&reply, from);
            }
        });
        SntpServer { port, requests, stop }
    }
}

impl Drop for SntpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn ntp_timestamp(unix: f64) -> u64 {
    let secs = unix.floor();
    let frac = ((unix - secs) * 4_294_967_296.0) as u64;
    ((secs as u64 + NTP_TO_UNIX) << 32) | frac
}

fn num<T: std::str::FromStr>(e: &kiln_contract::event::Event, key: &str) -> T {
    e.get(key).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("event {} has no numeric `{key}`: {e:?}", e.name))
}

#[test]
fn sntp_sets_the_clock_before_the_payload() {
    let out = built(PROFILE);
    let server = SntpServer::start(AHEAD);
    let cfg = format!("role = \"single\"\n[time]\nntp = [\"10.0.2.2:{}\"]\n[debug]\nshell = true\n", server.port);
    let mut n = boot("clock_synced", &out, Some(&cfg));
    n.event("network-up", BOOT_TIMEOUT);
    let ev = n.event("clock-synced", Duration::from_secs(60));
    let seen = host_now();
    assert_eq!(ev.get("server"), Some(format!("10.0.2.2:{}", server.port).as_str()), "{ev:?}");
    assert_eq!(ev.get("source"), Some("node.toml"));
    assert_eq!(ev.get("stratum"), Some("2"));
    // The node's clock now reads the served time (give or take the console's
    // delay under TCG).
    let time: f64 = num(&ev, "time");
    let served = seen + AHEAD as f64;
    assert!((time - served).abs() < 30.0, "node time {time}, served {served}");
    // QEMU's RTC starts at the host's time, so the step is about ten days.
    let offset_ms: i64 = num(&ev, "offset_ms");
    assert!((offset_ms - AHEAD * 1000).abs() < 120_000, "offset_ms={offset_ms}, expected about {}", AHEAD * 1000);
    assert!(server.requests.load(Ordering::Relaxed) >= 1);
    // Only then the payload.
    n.event("payload-started", BOOT_TIMEOUT);
    n.standin_checks();
    // From inside: the system clock and the hardware clock kiln-init wrote.
    n.vm.send("\necho CLK=$(date +%s) RTC=$(cat /sys/class/rtc/rtc0/since_epoch)\n").unwrap();
    let line = n.line("date and RTC from the debug shell", Duration::from_secs(60), |l| {
        l.contains("CLK=") && l.split("CLK=").nth(1).is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
    });
    let served = host_now() + AHEAD as f64;
    let field = |k: &str| -> f64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| n.fail(format!("no {k} in {line:?}")))
    };
    let (clk, rtc) = (field("CLK="), field("RTC="));
    assert!((clk - served).abs() < 60.0, "node clock {clk}, served {served}: {line}");
    assert!((rtc - served).abs() < 60.0, "RTC {rtc}, served {served}: {line}");
}

#[test]
fn unreachable_server_gives_unsynced_within_the_wait_then_the_payload() {
    let out = built(PROFILE);
    // A port nothing listens on.
    let port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = format!("role = \"single\"\n[time]\nntp = [\"10.0.2.2:{port}\"]\nwait_seconds = 5\n");
    let mut n = boot("clock_unsynced", &out, Some(&cfg));
    n.event("network-up", BOOT_TIMEOUT);
    let net_seen = Instant::now();
    let ev = n.event("clock-unsynced", Duration::from_secs(120));
    let host_wait = net_seen.elapsed();
    let waited: f64 = num(&ev, "waited");
    assert!((4.5..=6.5).contains(&waited), "waited={waited}, wait_seconds is 5: {ev:?}");
    assert!(host_wait < Duration::from_secs(60), "clock-unsynced came {host_wait:?} after network-up");
    let reason = ev.get("reason").unwrap_or_default();
    assert!(reason.contains(&format!("10.0.2.2:{port}")) && reason.contains("within 5 s"), "the reason names the server and the wait: {reason}");
    let warned = n.line("the clock warning", Duration::from_secs(10), |l| l.contains("kiln-init: warning clock: not set by NTP"));
    assert!(warned.contains("TLS certificates") && warned.contains("time.ntp"), "{warned}");
    let started = n.event("payload-started", BOOT_TIMEOUT);
    let (t_unsynced, t_started): (f64, f64) = (num(&ev, "uptime"), num(&started, "uptime"));
    assert!(t_started >= t_unsynced, "payload-started (uptime {t_started}) after clock-unsynced ({t_unsynced})");
}

#[test]
fn no_ntp_servers_gives_unsynced_at_once() {
    let out = built(PROFILE);
    // No [time]: the servers would come from DHCP option 42, which QEMU's
    // DHCP server does not send.
    let mut n = boot("clock_no_servers", &out, Some("role = \"single\"\n"));
    n.event("network-up", BOOT_TIMEOUT);
    let ev = n.event("clock-unsynced", Duration::from_secs(60));
    assert_eq!(ev.get("reason"), Some("no NTP servers (set time.ntp in node.toml or DHCP option 42)"));
    assert_eq!(ev.get("waited"), Some("0.0"));
    n.event("payload-started", BOOT_TIMEOUT);
}
