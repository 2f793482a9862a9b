//! Network bring-up from the node config: loopback, then DHCPv4 on links with
//! carrier (the default) or the static settings asked for.

use super::console;
use kiln_contract::config::{self, Interface, NodeConfig};
use crate::net::{self, Lease, Link};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A DHCP lease being kept.
pub struct Held {
    pub link: Link,
    pub lease: Lease,
    /// When the lease was (re)granted; T1 and T2 count from here.
    pub granted: Instant,
    pub renew_at: Instant,
}

#[derive(Default)]
pub struct NetState {
    pub held: Vec<Held>,
    pub dns: Vec<IpAddr>,
    pub search: Vec<String>,
    /// (interface, address/prefix) of every address configured.
    pub addresses: Vec<(String, String)>,
}

fn is_physical(l: &Link) -> bool {
    !l.is_loopback && l.mac.is_some() && l.kind.is_none()
}

/// Waits (bounded) for at least one non-loopback link to appear: NIC drivers
/// may still be probing when PID 1 starts.
fn physical_links(wait: Duration) -> Vec<Link> {
    let deadline = Instant::now() + wait;
    loop {
        let links: Vec<Link> = net::links().unwrap_or_default().into_iter().filter(is_physical).collect();
        if !links.is_empty() || Instant::now() >= deadline {
            return links;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The MAC of the first physical link, for derived hostnames.
pub fn first_mac() -> Option<[u8; 6]> {
    let mut links = physical_links(Duration::from_secs(5));
    links.sort_by_key(|l| l.index);
    links.first().and_then(|l| l.mac)
}

pub fn bring_up(cfg: &NodeConfig, hostname: &str) -> NetState {
    let mut st = NetState { dns: cfg.network.dns.clone(), search: cfg.network.search.clone(), ..Default::default() };
    if let Err(e) = net::loopback_up() {
        console::error(&format!("loopback: {e}"));
    }
    let wait = Duration::from_secs(cfg.network.wait_seconds.into());
    let deadline = Instant::now() + wait;
    let links = physical_links(Duration::from_secs(5));
    let plan: Vec<(Link, Interface)> = if cfg.network.interfaces.is_empty() {
        links.into_iter().map(|l| (l, Interface { dhcp: Some(true), ..Default::default() })).collect()
    } else {
        let mut p = Vec::new();
        for want in &cfg.network.interfaces {
            let found = links.iter().find(|l| {
                want.name.as_deref() == Some(l.name.as_str()) || want.mac.as_deref().and_then(config::parse_mac).is_some_and(|m| l.mac == Some(m))
            });
            match found {
                Some(l) => p.push((l.clone(), want.clone())),
                None => console::error(&format!(
                    "network: no link matches {}; links present: {}",
                    want.name.clone().or(want.mac.clone()).unwrap_or_default(),
                    links.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", ")
                )),
            }
        }
        p
    };
    if plan.is_empty() {
        console::warn("network: no network interface found; continuing without network");
    }
    for (link, want) in plan {
        if let Err(e) = net::set_up(link.index) {
            console::error(&format!("network: {e}"));
            continue;
        }
        let link = match want.vlan {
            Some(id) => {
                let name = format!("{}.{id}", link.name);
                match net::add_vlan(link.index, &name, id).and_then(|ix| net::set_up(ix).map(|_| ix)) {
                    Ok(ix) => Link { index: ix, name, kind: Some("vlan".into()), ..link },
                    Err(e) => {
                        console::error(&format!("network: VLAN {id} on {}: {e}", link.name));
                        continue;
                    }
                }
            }
            None => link,
        };
        for a in &want.addresses {
            let Ok((addr, prefix)) = config::parse_cidr(a) else { continue };
            match net::add_address(link.index, addr, prefix) {
                Ok(()) => {
                    st.addresses.push((link.name.clone(), a.clone()));
                    console::event("network-up", &[("iface", &link.name), ("addr", a), ("method", &"static")]);
                }
                Err(e) => console::error(&format!("network: {e}")),
            }
        }
        if let Some(gw) = want.gateway {
            if let Err(e) = net::add_route(None, Some(gw), link.index) {
                console::error(&format!("network: default route via {gw}: {e}"));
            }
        }
        if !want.wants_dhcp() {
            continue;
        }
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(3));
        match net::wait_carrier(link.index, left.min(Duration::from_secs(10))) {
            Ok(true) => {}
            Ok(false) => {
                console::warn(&format!("network: {} has no carrier; skipping DHCP on it", link.name));
                continue;
            }
            Err(e) => {
                console::error(&format!("network: {e}"));
                continue;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(3));
        match net::dhcp_acquire(&link, Some(hostname), left) {
            Ok(lease) => match net::apply_lease(&link, &lease) {
                Ok(()) => {
                    let addr = format!("{}/{}", lease.addr, lease.prefix);
                    let gw = lease.router.map(|r| r.to_string()).unwrap_or_else(|| "none".into());
                    console::event("network-up", &[("iface", &link.name), ("addr", &addr), ("gateway", &gw), ("method", &"dhcp"), ("lease", &lease.lease_secs)]);
                    st.addresses.push((link.name.clone(), addr));
                    for d in &lease.dns {
                        let d = IpAddr::V4(*d);
                        if !st.dns.contains(&d) {
                            st.dns.push(d);
                        }
                    }
                    if let Some(dom) = &lease.domain {
                        if !st.search.contains(dom) {
                            st.search.push(dom.clone());
                        }
                    }
                    let renew_at = Instant::now() + Duration::from_secs(lease.renew_secs.max(30).into());
                    st.held.push(Held { link, lease, granted: Instant::now(), renew_at });
                }
                Err(e) => console::error(&format!("network: {e}")),
            },
            Err(e) => console::error(&format!("network: DHCP on {}: {e}", link.name)),
        }
    }
    if st.addresses.is_empty() {
        console::event("network-failed", &[("reason", &"no address configured")]);
    }
    st
}

impl NetState {
    /// The earliest renewal due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.held.iter().map(|h| h.renew_at).min()
    }

    /// Renews the leases that are due: unicast RENEW until T2, broadcast
    /// REBIND after it; a NAK drops the address and starts over. A failure
    /// is retried in a minute, keeping the address meanwhile.
    pub fn renew_due(&mut self, hostname: &str) {
        let now = Instant::now();
        for h in self.held.iter_mut().filter(|h| h.renew_at <= now) {
            let rebinding = h.granted.elapsed().as_secs() >= u64::from(h.lease.rebind_secs);
            let r = if rebinding { net::dhcp_rebind(&h.link, &h.lease, Duration::from_secs(10)) } else { net::dhcp_renew(&h.link, &h.lease, Duration::from_secs(10)) };
            let r = match r {
                Err(net::NetError::DhcpNak { .. }) => {
                    console::warn(&format!("network: DHCP server refused the lease on {}; acquiring a new one", h.link.name));
                    let _ = net::del_address(h.link.index, IpAddr::V4(h.lease.addr), h.lease.prefix);
                    net::dhcp_acquire(&h.link, Some(hostname), Duration::from_secs(30))
                }
                r => r,
            };
            match r {
                Ok(l) => {
                    if l.addr != h.lease.addr || l.prefix != h.lease.prefix {
                        let _ = net::del_address(h.link.index, IpAddr::V4(h.lease.addr), h.lease.prefix);
                        if let Err(e) = net::apply_lease(&h.link, &l) {
                            console::error(&format!("network: {e}"));
                        }
                        console::event("network-up", &[("iface", &h.link.name), ("addr", &format!("{}/{}", l.addr, l.prefix)), ("method", &"dhcp-renew")]);
                    }
                    h.granted = now;
                    h.renew_at = now + Duration::from_secs(l.renew_secs.max(30).into());
                    h.lease = l;
                }
                Err(e) => {
                    console::warn(&format!("network: DHCP renew on {}: {e}; retrying in 60 s", h.link.name));
                    h.renew_at = now + Duration::from_secs(60);
                }
            }
        }
    }
}
