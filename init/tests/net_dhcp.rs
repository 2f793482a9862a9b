//! kiln_init::net against the real kernel, inside network namespaces these
//! tests create: a DHCP exchange with dnsmasq over a veth pair, and links,
//! addresses, routes and VLANs.
//!
//! Needs root and iproute2 (and dnsmasq for the DHCP test). Without them a
//! test prints `skipped: <why>` and passes. Only the namespaces and the veth
//! pair made here are touched; both ends of the veth live in those
//! namespaces, never in the host's.

use std::fs::{self, File};
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_init::net::{self, NetError};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Why these tests cannot run here, if they cannot. A missing `ip` or
/// dnsmasq is a checker's skip (a failure under CI=true).
fn missing(need_dnsmasq: bool) -> Option<String> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root (network namespaces need it)".into());
    }
    if kiln_testkit::checker("ip", "iproute2").is_none() {
        return Some("no `ip` (apt-get install -y iproute2)".into());
    }
    if need_dnsmasq && kiln_testkit::checker("dnsmasq", "dnsmasq-base").is_none() {
        return Some("no `dnsmasq` (apt-get install -y dnsmasq-base)".into());
    }
    None
}

/// Runs a tool, at most 10 s; Err carries its stderr.
fn run(tool: &str, args: &[&str]) -> Result<(), String> {
    let bin = kiln_testkit::find(tool).ok_or_else(|| format!("no {tool}"))?;
    let mut child = Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{tool} {}: {e}", args.join(" ")))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut s) = child.stderr.take() {
                    let _ = s.read_to_string(&mut err);
                }
                return if status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "{tool} {}: {status}: {}",
                        args.join(" "),
                        err.trim()
                    ))
                };
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{tool} {}: no exit within 10 s", args.join(" ")));
            }
        }
    }
}

/// Two namespaces joined by a veth pair: `srv_if` in `srv`, `cli_if` in
/// `cli`. Dropping it kills dnsmasq and deletes both namespaces (and so the
/// veth), also when an assertion failed.
struct Lab {
    srv: String,
    cli: String,
    srv_if: String,
    cli_if: String,
    dir: PathBuf,
    namespaces: Vec<String>,
    dnsmasq: Option<Child>,
}

impl Lab {
    fn new() -> Result<Lab, String> {
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("kiln-net-test-{pid}-{n}"));
        let mut lab = Lab {
            srv: format!("kiln-test-{pid}-{n}-srv"),
            cli: format!("kiln-test-{pid}-{n}-cli"),
            srv_if: format!("kv{pid}x{n}s"),
            cli_if: format!("kv{pid}x{n}c"),
            dir,
            namespaces: Vec::new(),
            dnsmasq: None,
        };
        fs::create_dir_all(&lab.dir).map_err(|e| format!("{}: {e}", lab.dir.display()))?;
        for ns in [lab.srv.clone(), lab.cli.clone()] {
            run("ip", &["netns", "add", &ns])?;
            lab.namespaces.push(ns);
        }
        run(
            "ip",
            &[
                "link",
                "add",
                &lab.srv_if,
                "netns",
                &lab.srv,
                "type",
                "veth",
                "peer",
                "name",
                &lab.cli_if,
                "netns",
                &lab.cli,
            ],
        )?;
        run("ip", &["-n", &lab.srv, "link", "set", "lo", "up"])?;
        run(
            "ip",
            &[
                "-n",
                &lab.srv,
                "addr",
                "add",
                "10.77.0.1/24",
                "dev",
                &lab.srv_if,
            ],
        )?;
        run("ip", &["-n", &lab.srv, "link", "set", &lab.srv_if, "up"])?;
        Ok(lab)
    }

    /// dnsmasq on the server end, started in the server namespace.
    fn start_dnsmasq(&mut self) -> Result<(), String> {
        let log = self.dir.join("dnsmasq.log");
        let bin = kiln_testkit::find("dnsmasq").ok_or("no dnsmasq")?;
        let mut cmd = Command::new(bin);
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--port=0",
            "--user=root",
            "--group=root",
            "--bind-interfaces",
            "--dhcp-authoritative",
            "--no-ping",
            "--log-dhcp",
            "--dhcp-range=10.77.0.50,10.77.0.59,255.255.255.0,2m",
            "--dhcp-option=option:router,10.77.0.1",
            "--dhcp-option=option:dns-server,10.77.0.53,10.77.0.54",
            "--dhcp-option=option:ntp-server,10.77.0.123",
            "--dhcp-option=option:domain-name,kiln.test",
        ])
        .arg(format!("--interface={}", self.srv_if))
        .arg(format!(
            "--dhcp-leasefile={}",
            self.dir.join("leases").display()
        ))
        .arg(format!(
            "--pid-file={}",
            self.dir.join("dnsmasq.pid").display()
        ))
        .arg(format!("--log-facility={}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let ns = File::open(format!("/run/netns/{}", self.srv))
            .map_err(|e| format!("open netns {}: {e}", self.srv))?;
        let ns_fd = ns.as_raw_fd();
        // SAFETY: setns(2) is async-signal-safe; ns_fd stays open until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            });
        }
        let child = cmd.spawn().map_err(|e| format!("spawn dnsmasq: {e}"))?;
        drop(ns);
        self.dnsmasq = Some(child);
        // Ready once it logs its DHCP range; it is gone if it exits.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = fs::read_to_string(&log).unwrap_or_default();
            if text.contains("DHCP, IP range") {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.dnsmasq.as_mut().map(|c| c.try_wait()) {
                return Err(format!("dnsmasq exited ({status}): {text}"));
            }
            if Instant::now() >= deadline {
                return Err(format!("dnsmasq not ready within 5 s: {text}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn file(&self, name: &str) -> String {
        fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut child) = self.dnsmasq.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.namespaces.drain(..) {
            let _ = run("ip", &["netns", "del", &ns]);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Runs `f` on a thread that has joined network namespace `ns`, at most
/// `timeout`. A panic inside comes back as Err with its message.
fn in_netns<T: Send + 'static>(
    ns: &str,
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let path = format!("/run/netns/{ns}");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let joined = File::open(&path).and_then(|f| {
            // SAFETY: f is an open namespace file; setns only affects this thread.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
        if let Err(e) = joined {
            let _ = tx.send(Err(format!("setns {path}: {e}")));
            return;
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panicked".into())
        });
        let _ = tx.send(r);
    });
    rx.recv_timeout(timeout)
        .map_err(|_| format!("no result from namespace {ns} within {timeout:?}"))?
}

/// The IPv4 routes of the calling thread's namespace, from
/// /proc/thread-self/net/route: (iface, destination, mask bits, gateway).
fn v4_routes() -> Vec<(String, Ipv4Addr, u32, Ipv4Addr)> {
    let text = fs::read_to_string("/proc/thread-self/net/route").unwrap_or_default();
    let addr = |hex: &str| Ipv4Addr::from(u32::from_str_radix(hex, 16).unwrap_or(0).to_ne_bytes());
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let mask = u32::from(addr(f.get(7)?)).count_ones();
            Some((
                f.first()?.to_string(),
                addr(f.get(1)?),
                mask,
                addr(f.get(2)?),
            ))
        })
        .collect()
}

fn find_link(name: &str) -> net::Link {
    let links = net::links().expect("links()");
    links
        .iter()
        .find(|l| l.name == name)
        .cloned()
        .unwrap_or_else(|| panic!("no {name} in {links:?}"))
}

struct DhcpResult {
    lease: net::Lease,
    mac: [u8; 6],
    addrs: Vec<(IpAddr, u8)>,
    routes: Vec<(String, Ipv4Addr, u32, Ipv4Addr)>,
    renewed: Result<net::Lease, String>,
    rebound: Result<net::Lease, String>,
    nak: Result<net::Lease, NetError>,
}

#[test]
fn dhcp_against_dnsmasq_in_a_namespace() {
    if let Some(why) = missing(true) {
        kiln_testkit::skip(format!("dhcp_against_dnsmasq_in_a_namespace: {why}"));
        return;
    }
    let mut lab = match Lab::new() {
        Ok(lab) => lab,
        Err(e) if e.contains("Operation not permitted") => {
            kiln_testkit::skip(format!(
                "dhcp_against_dnsmasq_in_a_namespace: cannot create network namespaces here: {e}"
            ));
            return;
        }
        Err(e) => panic!("setting up namespaces: {e}"),
    };
    lab.start_dnsmasq().unwrap_or_else(|e| panic!("{e}"));
    let cli_if = lab.cli_if.clone();

    let r = in_netns(&lab.cli, Duration::from_secs(90), move || {
        let link = find_link(&cli_if);
        net::set_up(link.index).expect("set_up");
        assert!(
            net::wait_carrier(link.index, Duration::from_secs(5)).expect("wait_carrier"),
            "no carrier on veth"
        );
        let link = net::link(link.index).expect("link()");
        assert!(link.up && link.carrier);

        let lease = net::dhcp_acquire(&link, Some("kiln-e2e"), Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("dhcp_acquire: {e}"));
        net::apply_lease(&link, &lease).unwrap_or_else(|e| panic!("apply_lease: {e}"));
        // Applying twice is fine (EEXIST).
        net::apply_lease(&link, &lease).unwrap_or_else(|e| panic!("apply_lease again: {e}"));
        let addrs = net::addresses(link.index).expect("addresses");
        let routes = v4_routes();
        let renewed =
            net::dhcp_renew(&link, &lease, Duration::from_secs(15)).map_err(|e| e.to_string());
        let rebound =
            net::dhcp_rebind(&link, &lease, Duration::from_secs(15)).map_err(|e| e.to_string());
        // Renewing an address the server never gave: dnsmasq refuses a
        // unicast renewal of it (a broadcast rebinding it would just ignore).
        let bogus = net::Lease {
            addr: Ipv4Addr::new(10, 77, 0, 200),
            ..lease.clone()
        };
        let nak = net::dhcp_renew(&link, &bogus, Duration::from_secs(15));
        DhcpResult {
            lease,
            mac: link.mac.expect("veth has a MAC"),
            addrs,
            routes,
            renewed,
            rebound,
            nak,
        }
    })
    .unwrap_or_else(|e| panic!("{e}\ndnsmasq log:\n{}", lab.file("dnsmasq.log")));

    let log = lab.file("dnsmasq.log");
    let l = &r.lease;
    let octets = l.addr.octets();
    assert!(
        octets[..3] == [10, 77, 0] && (50..=59).contains(&octets[3]),
        "leased {} outside the range\n{log}",
        l.addr
    );
    assert_eq!(l.prefix, 24);
    assert_eq!(l.router, Some(Ipv4Addr::new(10, 77, 0, 1)));
    assert_eq!(
        l.dns,
        vec![Ipv4Addr::new(10, 77, 0, 53), Ipv4Addr::new(10, 77, 0, 54)]
    );
    assert_eq!(l.ntp, vec![Ipv4Addr::new(10, 77, 0, 123)]);
    assert_eq!(l.domain.as_deref(), Some("kiln.test"));
    assert_eq!(l.server, Ipv4Addr::new(10, 77, 0, 1));
    assert_eq!(l.lease_secs, 120);
    assert!(
        l.renew_secs > 0 && l.renew_secs <= l.rebind_secs && l.rebind_secs <= l.lease_secs,
        "{l:?}"
    );
    assert_eq!(l.client_hostname.as_deref(), Some("kiln-e2e"));

    assert!(r.addrs.contains(&(IpAddr::V4(l.addr), 24)), "{:?}", r.addrs);
    assert!(
        r.routes
            .iter()
            .any(|(ifc, dst, bits, gw)| ifc == &lab.cli_if
                && dst.is_unspecified()
                && *bits == 0
                && *gw == Ipv4Addr::new(10, 77, 0, 1)),
        "no default route via 10.77.0.1 in {:?}",
        r.routes
    );

    let renewed = r
        .renewed
        .unwrap_or_else(|e| panic!("dhcp_renew: {e}\n{log}"));
    assert_eq!(renewed.addr, l.addr);
    assert_eq!(renewed.client_hostname.as_deref(), Some("kiln-e2e"));
    let rebound = r
        .rebound
        .unwrap_or_else(|e| panic!("dhcp_rebind: {e}\n{log}"));
    assert_eq!(rebound.addr, l.addr);
    match r.nak {
        Err(NetError::DhcpNak { server, .. }) => assert_eq!(server, Ipv4Addr::new(10, 77, 0, 1)),
        other => panic!("renewing a bogus lease: expected DHCPNAK, got {other:?}\n{log}"),
    }

    // The server saw our hostname (option 12) and client id (option 61).
    let leases = lab.file("leases");
    let mac: Vec<String> = r.mac.iter().map(|b| format!("{b:02x}")).collect();
    let line = leases
        .lines()
        .find(|x| x.contains(&l.addr.to_string()))
        .unwrap_or_else(|| panic!("no lease in {leases:?}"));
    assert!(line.contains("kiln-e2e"), "{line}");
    assert!(line.contains(&format!("01:{}", mac.join(":"))), "{line}");
    // Three ACKs: acquiring, renewing, rebinding.
    assert!(log.matches("DHCPACK(").count() >= 3, "{log}");
}

type VlanResult = (net::Link, u32, Vec<(IpAddr, u8)>);

struct LinkResult {
    lo_addrs: Vec<(IpAddr, u8)>,
    carrier_while_down: bool,
    veth: net::Link,
    addrs: Vec<(IpAddr, u8)>,
    addrs_after_del: Vec<(IpAddr, u8)>,
    routes: Vec<(String, Ipv4Addr, u32, Ipv4Addr)>,
    v6_routes: String,
    /// The VLAN, the index a second add_vlan returned, its addresses.
    vlan: Result<VlanResult, NetError>,
    errors: Vec<String>,
    timeout: (Result<net::Lease, NetError>, Duration),
}

#[test]
fn links_addresses_routes_and_vlans_in_a_namespace() {
    if let Some(why) = missing(false) {
        kiln_testkit::skip(format!(
            "links_addresses_routes_and_vlans_in_a_namespace: {why}"
        ));
        return;
    }
    let lab = match Lab::new() {
        Ok(lab) => lab,
        Err(e) if e.contains("Operation not permitted") => {
            kiln_testkit::skip(format!("links_addresses_routes_and_vlans_in_a_namespace: cannot create network namespaces here: {e}"));
            return;
        }
        Err(e) => panic!("setting up namespaces: {e}"),
    };
    let cli_if = lab.cli_if.clone();
    let r = in_netns(&lab.cli, Duration::from_secs(60), move || {
        net::loopback_up().expect("loopback_up");
        let lo = net::links()
            .expect("links")
            .into_iter()
            .find(|l| l.is_loopback)
            .expect("lo");
        assert!(lo.up && lo.name == "lo", "{lo:?}");
        let lo_addrs = net::addresses(lo.index).expect("addresses(lo)");

        let veth = find_link(&cli_if);
        let carrier_while_down =
            net::wait_carrier(veth.index, Duration::from_millis(300)).expect("wait_carrier");
        net::set_up(veth.index).expect("set_up");
        assert!(net::wait_carrier(veth.index, Duration::from_secs(5)).expect("wait_carrier"));
        let ix = veth.index;

        let v4: IpAddr = "10.78.0.2".parse().unwrap();
        let v6: IpAddr = "fd00:78::2".parse().unwrap();
        for _ in 0..2 {
            net::add_address(ix, v4, 24).unwrap_or_else(|e| panic!("{e}"));
            net::add_address(ix, v6, 64).unwrap_or_else(|e| panic!("{e}"));
            net::add_address(ix, "10.78.1.9".parse().unwrap(), 32)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let addrs = net::addresses(ix).expect("addresses");
        net::del_address(ix, "10.78.1.9".parse().unwrap(), 32).unwrap_or_else(|e| panic!("{e}"));
        net::del_address(ix, "10.78.1.9".parse().unwrap(), 32)
            .unwrap_or_else(|e| panic!("deleting twice: {e}"));
        let addrs_after_del = net::addresses(ix).expect("addresses");

        let gw: IpAddr = "10.78.0.1".parse().unwrap();
        for _ in 0..2 {
            net::add_route(Some(("10.99.3.4".parse().unwrap(), 16)), Some(gw), ix)
                .unwrap_or_else(|e| panic!("{e}"));
            net::add_route(Some(("10.98.0.0".parse().unwrap(), 24)), None, ix)
                .unwrap_or_else(|e| panic!("{e}"));
            net::add_route(None, Some(gw), ix).unwrap_or_else(|e| panic!("{e}"));
            net::add_route(
                Some(("fd00:99::".parse().unwrap(), 48)),
                Some("fe80::1".parse().unwrap()),
                ix,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
        let routes = v4_routes();
        let v6_routes = fs::read_to_string("/proc/thread-self/net/ipv6_route").unwrap_or_default();

        let vlan_name = format!("{cli_if}.7");
        let vlan = net::add_vlan(ix, &vlan_name, 7).and_then(|vix| {
            let again = net::add_vlan(ix, &vlan_name, 7)?;
            net::set_up(vix)?;
            net::add_address(vix, "10.79.0.2".parse().unwrap(), 24)?;
            Ok((net::link(vix)?, again, net::addresses(vix)?))
        });

        let errors = vec![
            net::set_up(999_999).unwrap_err().to_string(),
            net::add_address(999_999, v4, 24).unwrap_err().to_string(),
            net::add_address(ix, v4, 33).unwrap_err().to_string(),
            net::add_vlan(ix, "much-too-long-name", 7)
                .unwrap_err()
                .to_string(),
            net::add_vlan(ix, "v0", 4095).unwrap_err().to_string(),
            net::add_route(Some((v4, 24)), Some("fe80::1".parse().unwrap()), ix)
                .unwrap_err()
                .to_string(),
            net::link_by_name("nosuchif0").unwrap_err().to_string(),
        ];

        // Nobody serves DHCP here: a bounded failure naming the interface.
        let link = net::link(ix).expect("link");
        let start = Instant::now();
        let res = net::dhcp_acquire(&link, None, Duration::from_millis(1500));
        let timeout = (res, start.elapsed());

        LinkResult {
            lo_addrs,
            carrier_while_down,
            veth: link,
            addrs,
            addrs_after_del,
            routes,
            v6_routes,
            vlan,
            errors,
            timeout,
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));

    assert!(
        r.lo_addrs.contains(&("127.0.0.1".parse().unwrap(), 8)),
        "{:?}",
        r.lo_addrs
    );
    assert!(
        !r.carrier_while_down,
        "carrier reported on a link that is down"
    );
    assert_eq!(r.veth.kind.as_deref(), Some("veth"));
    assert!(
        r.veth.mac.is_some()
            && r.veth.mtu == 1500
            && r.veth.up
            && r.veth.carrier
            && !r.veth.is_loopback
    );

    for want in [("10.78.0.2", 24), ("fd00:78::2", 64), ("10.78.1.9", 32)] {
        assert!(
            r.addrs.contains(&(want.0.parse().unwrap(), want.1)),
            "{want:?} not in {:?}",
            r.addrs
        );
    }
    assert!(
        !r.addrs_after_del
            .iter()
            .any(|(a, _)| a.to_string() == "10.78.1.9"),
        "{:?}",
        r.addrs_after_del
    );

    let on_veth = |dst: &str, bits: u32, gw: &str| {
        r.routes.iter().any(|(i, d, b, g)| {
            i == &r.veth.name && d.to_string() == dst && *b == bits && g.to_string() == gw
        })
    };
    assert!(on_veth("10.99.0.0", 16, "10.78.0.1"), "{:?}", r.routes);
    assert!(on_veth("10.98.0.0", 24, "0.0.0.0"), "{:?}", r.routes);
    assert!(on_veth("0.0.0.0", 0, "10.78.0.1"), "{:?}", r.routes);
    // ipv6_route: dst, dst len (hex), src, src len, gateway, …, iface.
    assert!(
        r.v6_routes
            .lines()
            .any(|l| l.starts_with("fd000099000000000000000000000000 30 ")
                && l.contains("fe800000000000000000000000000001")
                && l.ends_with(&r.veth.name)),
        "{}",
        r.v6_routes
    );

    match &r.vlan {
        Ok((vlan, again, addrs)) => {
            assert_eq!(vlan.kind.as_deref(), Some("vlan"));
            assert_eq!(vlan.vlan_id, Some(7));
            assert_eq!(vlan.parent, Some(r.veth.index));
            assert_eq!(*again, vlan.index, "adding the same VLAN twice returns it");
            assert!(
                addrs.contains(&("10.79.0.2".parse().unwrap(), 24)),
                "{addrs:?}"
            );
        }
        Err(e) if e.errno() == Some(libc::EOPNOTSUPP) => {
            kiln_testkit::skip(format!(
                "add_vlan: this kernel has no 802.1Q support (CONFIG_VLAN_8021Q): {e}"
            ));
        }
        Err(e) => panic!("add_vlan: {e}"),
    }

    let e = &r.errors;
    assert!(
        e[0].starts_with("RTM_NEWLINK up on ifindex 999999: No such device"),
        "{}",
        e[0]
    );
    assert!(
        e[1].starts_with("RTM_NEWADDR 10.78.0.2/24 on ifindex 999999: No such device"),
        "{}",
        e[1]
    );
    assert!(e[2].contains("/33"), "{}", e[2]);
    assert!(e[3].contains("much-too-long-name"), "{}", e[3]);
    assert!(e[4].contains("4095"), "{}", e[4]);
    assert!(e[5].contains("different families"), "{}", e[5]);
    assert!(
        e[6].starts_with("RTM_GETLINK on nosuchif0: No such device"),
        "{}",
        e[6]
    );

    let (res, took) = &r.timeout;
    match res {
        Err(err @ NetError::DhcpTimeout { iface, .. }) => {
            assert_eq!(iface, &r.veth.name);
            assert!(err.to_string().contains("no DHCPOFFER"), "{err}");
        }
        other => panic!("expected a DHCP timeout, got {other:?}"),
    }
    assert!(
        *took >= Duration::from_millis(1400) && *took < Duration::from_millis(3000),
        "took {took:?}"
    );
}
