//! The node config (`node.toml`): schema, parsing and validation.
//!
//! The node and `kiln config check` on the host run this same code, so a file
//! that passes on the host is accepted on the node. Unknown keys are errors,
//! and every error names a key and, when it can, a line.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

/// What to do about an unsigned config where a signed one is required.
pub const SIGN_HOW: &str = "sign the config with `kiln config sign node.toml --key <secret key>`";

/// The role the node plays in its cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Role {
    #[serde(rename = "controller")]
    Controller,
    #[serde(rename = "worker")]
    Worker,
    #[serde(rename = "controller+worker")]
    ControllerWorker,
    #[serde(rename = "single")]
    Single,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Controller => "controller",
            Role::Worker => "worker",
            Role::ControllerWorker => "controller+worker",
            Role::Single => "single",
        }
    }
    /// Whether the node runs the kubelet (and so needs the worker half of the
    /// host contract).
    pub fn runs_workloads(self) -> bool {
        !matches!(self, Role::Controller)
    }
    /// Whether the node runs the control plane.
    pub fn runs_control_plane(self) -> bool {
        !matches!(self, Role::Worker)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every key of the schema, dotted (`[[…]]` arrays without an index),
/// tables included. Add a key here when adding it to a struct below: a test
/// walks the structs and fails on a key missing here, the config fuzz test
/// draws its keys from this list, and a builder test checks that
/// docs/node-config.md documents each one.
pub const KEYS: &[&str] = &[
    "role",
    "hostname",
    "hostname.from",
    "hostname.prefix",
    "network",
    "network.interfaces",
    "network.interfaces.name",
    "network.interfaces.mac",
    "network.interfaces.vlan",
    "network.interfaces.dhcp",
    "network.interfaces.addresses",
    "network.interfaces.gateway",
    "network.dns",
    "network.search",
    "network.wait_seconds",
    "k0s",
    "k0s.config",
    "k0s.token",
    "k0s.token_file",
    "k0s.labels",
    "k0s.taints",
    "k0s.kubelet_extra_args",
    "k0s.disable_components",
    "k0s.env",
    "k0s.extra_args",
    "k0s.no_taints",
    "k0s.ca",
    "k0s.ca.cert",
    "k0s.ca.key",
    "k0s.manifests",
    "k0s.manifests.stack",
    "k0s.manifests.name",
    "k0s.manifests.content",
    "log",
    "log.max_bytes",
    "log.console_lines_per_second",
    "debug",
    "debug.shell",
    "install",
    "install.disk",
    "storage",
    "storage.var_disk",
    "time",
    "time.ntp",
    "time.wait_seconds",
    "update",
    "update.tries",
    "update.health_seconds",
    "update.boot_timeout_seconds",
    "update.allow_downgrade",
    "update.server",
    "update.channel",
    "update.window",
    "update.window.days",
    "update.window.start",
    "update.window.length_minutes",
];

/// A whole node.toml.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub role: Role,
    #[serde(default)]
    pub hostname: Option<Hostname>,
    #[serde(default)]
    pub network: Network,
    #[serde(default)]
    pub k0s: K0s,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub debug: Debug,
    #[serde(default)]
    pub install: Install,
    #[serde(default)]
    pub storage: Storage,
    #[serde(default)]
    pub time: Time,
    #[serde(default)]
    pub update: Update,
}

/// The keys of a node config's text that carry secrets: a join token
/// (`k0s.token`) or the cluster CA's private key (`k0s.ca.key`). Such a
/// config must not cross a network in the clear. Text that is not TOML is
/// judged by what it contains, so a broken config is not waved through.
pub fn secret_keys(text: &str) -> Vec<&'static str> {
    let mut keys = Vec::new();
    match text.parse::<toml::Table>() {
        Ok(t) => {
            let k0s = t.get("k0s").and_then(|v| v.as_table());
            if k0s.is_some_and(|k| k.contains_key("token")) {
                keys.push("k0s.token");
            }
            if k0s.and_then(|k| k.get("ca")).and_then(|c| c.as_table()).is_some_and(|c| c.contains_key("key")) {
                keys.push("k0s.ca.key");
            }
        }
        Err(_) => {
            if text.lines().any(|l| l.trim_start().strip_prefix("token").is_some_and(|r| r.trim_start().starts_with('='))) {
                keys.push("k0s.token");
            }
            if text.contains("PRIVATE KEY") {
                keys.push("k0s.ca.key");
            }
        }
    }
    keys
}

/// `[update]`: A/B updates, boot assessment and rollback (docs/updates.md).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Update {
    /// Boots a newly installed image gets to become healthy before the boot
    /// loader falls back to the previous one (systemd-boot's `+N`).
    #[serde(default = "default_tries")]
    pub tries: u32,
    /// How long the payload must run without exiting, on a new image's
    /// boot, before the image counts as good.
    #[serde(default = "default_health")]
    pub health_seconds: u32,
    /// A new image not good this long after kiln-init started reboots,
    /// spending a try.
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout_seconds: u32,
    /// Take bundles older than the running image.
    #[serde(default)]
    pub allow_downgrade: bool,
    /// The update server's base URL (https://, or http://: bundles are
    /// signed either way; HTTPS also hides what a node asks for and lets
    /// fleets use HTTPS-only stores). The node polls
    /// `<server>/<channel>/index.yaml` in its window.
    #[serde(default)]
    pub server: Option<String>,
    #[serde(default)]
    pub channel: Option<String>,
    #[serde(default)]
    pub window: Option<Window>,
}

/// `[update.window]`: when the node may poll its channel, apply an update
/// and reboot (UTC).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Days of the week (`mon` … `sun`); empty or unset: every day.
    #[serde(default)]
    pub days: Vec<String>,
    /// Start, `HH:MM` UTC.
    pub start: String,
    pub length_minutes: u32,
}

fn default_tries() -> u32 {
    3
}
fn default_health() -> u32 {
    120
}
fn default_boot_timeout() -> u32 {
    900
}

/// Bounds of the `[update]` numbers.
pub const UPDATE_TRIES_RANGE: std::ops::RangeInclusive<u32> = 1..=9;
pub const UPDATE_HEALTH_RANGE: std::ops::RangeInclusive<u32> = 5..=3600;
pub const UPDATE_BOOT_TIMEOUT_RANGE: std::ops::RangeInclusive<u32> = 30..=7200;
pub const WINDOW_DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl Default for Update {
    fn default() -> Self {
        Update { tries: default_tries(), health_seconds: default_health(), boot_timeout_seconds: default_boot_timeout(), allow_downgrade: false, server: None, channel: None, window: None }
    }
}

impl Window {
    /// Minutes after midnight UTC the window opens.
    pub fn start_minute(&self) -> Option<u32> {
        let (h, m) = self.start.split_once(':')?;
        if h.len() != 2 || m.len() != 2 {
            return None;
        }
        let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
        (h < 24 && m < 60).then_some(h * 60 + m)
    }

    /// Day numbers (0 = Monday) the window opens on.
    pub fn day_numbers(&self) -> Vec<u32> {
        if self.days.is_empty() {
            return (0..7).collect();
        }
        self.days.iter().filter_map(|d| WINDOW_DAYS.iter().position(|w| w.eq_ignore_ascii_case(d)).map(|p| p as u32)).collect()
    }

    /// Whether `unix` (seconds, UTC) is inside the window.
    pub fn contains(&self, unix: i64) -> bool {
        self.seconds_until(unix) == 0
    }

    /// Seconds from `unix` until the window is next open (0: it is open).
    pub fn seconds_until(&self, unix: i64) -> i64 {
        let Some(start) = self.start_minute() else { return i64::MAX };
        let days = self.day_numbers();
        let day = unix.div_euclid(86_400);
        // 1970-01-01 was a Thursday (day 3 with Monday = 0).
        let weekday = |d: i64| ((d + 3).rem_euclid(7)) as u32;
        let len = i64::from(self.length_minutes) * 60;
        let mut best = i64::MAX;
        // A window that opened up to a day before may still be open.
        for d in day - 1..=day + 7 {
            if !days.contains(&weekday(d)) {
                continue;
            }
            let open = d * 86_400 + i64::from(start) * 60;
            if unix >= open && unix < open + len {
                return 0;
            }
            if open > unix {
                best = best.min(open - unix);
            }
        }
        best
    }
}

/// `[install]`: when booted from a kiln ISO, write the image to a disk.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Install {
    /// The whole disk to install to, e.g. `/dev/vda` or `/dev/nvme0n1`.
    /// Everything on it is replaced. Only acted on when the node booted from
    /// a kiln ISO; `kiln.install=` on the cmdline does the same.
    pub disk: Option<String>,
}

/// `[storage]`: where /var lives when the boot medium has no data partition
/// (PXE, an ISO).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Storage {
    /// A whole disk for /var. A blank disk (no partition table or
    /// filesystem in its first MiB) is partitioned and formatted; one that
    /// kiln prepared before is mounted as it is; anything else is refused.
    pub var_disk: Option<String>,
}

/// `[time]`: setting the clock by SNTP before the payload starts, so TLS
/// certificates are judged against the right time.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Time {
    /// NTP servers: `host`, `host:port`, `10.0.0.1`, `fd00::1` or
    /// `[fd00::1]:123`. Unset: the servers the DHCP lease names (option 42).
    /// `[]`: do not set the clock.
    #[serde(default)]
    pub ntp: Option<Vec<String>>,
    /// Seconds the payload waits for the clock before starting anyway.
    #[serde(default = "default_time_wait")]
    pub wait_seconds: u32,
}

fn default_time_wait() -> u32 {
    15
}

/// Bounds of `time.wait_seconds`.
pub const TIME_WAIT_RANGE: std::ops::RangeInclusive<u32> = 1..=300;
/// At most this many entries in `time.ntp`.
pub const MAX_NTP_SERVERS: usize = 8;

impl Default for Time {
    fn default() -> Self {
        Time { ntp: None, wait_seconds: default_time_wait() }
    }
}

/// The host part of an NTP server entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NtpHost {
    Ip(IpAddr),
    /// A DNS name, resolved on the node.
    Name(String),
}

/// One parsed `time.ntp` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NtpServer {
    pub host: NtpHost,
    pub port: u16,
}

impl fmt::Display for NtpServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            NtpHost::Ip(IpAddr::V6(a)) => write!(f, "[{a}]:{}", self.port),
            NtpHost::Ip(a) => write!(f, "{a}:{}", self.port),
            NtpHost::Name(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

/// Parses `host`, `host:port`, an IPv4 or IPv6 address, or `[v6]:port`.
/// The port defaults to 123.
pub fn parse_ntp_server(s: &str) -> Result<NtpServer, String> {
    let port_of = |p: &str| -> Result<u16, String> {
        p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("`{s}`: `{p}` is not a port (1..=65535)"))
    };
    if s.is_empty() {
        return Err("an empty server name; give a host name or an address like 10.0.0.1 or pool.ntp.org:123".into());
    }
    if let Some(c) = s.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("`{s}` contains {c:?}; give one server per list entry"));
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or_else(|| format!("`{s}` opens `[` but never closes it; write [fd00::1]:123"))?;
        let a: std::net::Ipv6Addr = inside.parse().map_err(|_| format!("`{inside}` in `{s}` is not an IPv6 address"))?;
        let port = match after {
            "" => 123,
            p => port_of(p.strip_prefix(':').ok_or_else(|| format!("`{s}`: after `]` comes `:port` or nothing"))?)?,
        };
        return Ok(NtpServer { host: NtpHost::Ip(IpAddr::V6(a)), port });
    }
    if let Ok(a) = s.parse::<IpAddr>() {
        return Ok(NtpServer { host: NtpHost::Ip(a), port: 123 });
    }
    let (host, port) = match s.split_once(':') {
        Some((_, p)) if p.contains(':') => {
            return Err(format!("`{s}` is not an IPv6 address; an IPv6 address with a port goes in brackets, like [fd00::1]:123"))
        }
        Some((h, p)) => (h, port_of(p)?),
        None => (s, 123),
    };
    if let Ok(a) = host.parse::<std::net::Ipv4Addr>() {
        return Ok(NtpServer { host: NtpHost::Ip(IpAddr::V4(a)), port });
    }
    check_dns_name(host).map_err(|m| format!("`{s}`: {m}"))?;
    Ok(NtpServer { host: NtpHost::Name(host.trim_end_matches('.').to_ascii_lowercase()), port })
}

/// A DNS name to resolve (RFC 1123 labels, any case, an optional final dot).
fn check_dns_name(h: &str) -> Result<(), String> {
    let name = h.strip_suffix('.').unwrap_or(h);
    if name.is_empty() || name.len() > 253 {
        return Err(format!("`{h}` is not a host name (1 to 253 characters)"));
    }
    let labels: Vec<&str> = name.split('.').collect();
    for label in &labels {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!("`{h}` is not a host name: labels are letters, digits and inner hyphens, separated by dots"));
        }
    }
    if labels.last().is_some_and(|l| l.chars().all(|c| c.is_ascii_digit())) {
        return Err(format!("`{h}` is neither an IPv4 address nor a host name"));
    }
    Ok(())
}

fn check_update(u: &Update) -> Result<(), ConfigError> {
    let range = |key: &str, v: u32, r: std::ops::RangeInclusive<u32>, what: &str| {
        if r.contains(&v) {
            Ok(())
        } else {
            Err(err(key, format!("{v} is out of range {}..={} ({what})", r.start(), r.end())))
        }
    };
    range("update.tries", u.tries, UPDATE_TRIES_RANGE, "boots a new image gets before the node falls back to the previous one")?;
    range("update.health_seconds", u.health_seconds, UPDATE_HEALTH_RANGE, "seconds the payload must run for a new image to count as good")?;
    range("update.boot_timeout_seconds", u.boot_timeout_seconds, UPDATE_BOOT_TIMEOUT_RANGE, "seconds a new image has to become good before the node reboots")?;
    if u.boot_timeout_seconds <= u.health_seconds {
        return Err(err(
            "update.boot_timeout_seconds",
            format!("{} is not more than update.health_seconds ({}): a new image could never be marked good; make it longer (several minutes more, for k0s to start)", u.boot_timeout_seconds, u.health_seconds),
        ));
    }
    if let Some(s) = &u.server {
        let rest = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://"));
        if rest.is_none_or(|r| r.is_empty() || r.contains(char::is_whitespace)) {
            return Err(err("update.server", format!("`{s}` is not an https:// or http:// URL, like https://updates.example.com/kiln")));
        }
    }
    if let Some(c) = &u.channel {
        if c.is_empty() || !c.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) || c.starts_with('.') {
            return Err(err("update.channel", format!("`{c}` is not a channel name: letters, digits, `-`, `_` and `.`, like `stable`")));
        }
    }
    match (&u.server, &u.channel) {
        (Some(_), None) => return Err(err("update.channel", "update.server is set but update.channel is not: name the channel to follow, like `stable`")),
        (None, Some(_)) => return Err(err("update.server", "update.channel is set but update.server is not: give the server's URL")),
        _ => {}
    }
    if let Some(w) = &u.window {
        if w.start_minute().is_none() {
            return Err(err("update.window.start", format!("`{}` is not a time of day like `02:30` (HH:MM, UTC)", w.start)));
        }
        for (i, d) in w.days.iter().enumerate() {
            if !WINDOW_DAYS.iter().any(|x| x.eq_ignore_ascii_case(d)) {
                return Err(err(&format!("update.window.days[{i}]"), format!("`{d}` is not a day: use {}", WINDOW_DAYS.join(", "))));
            }
        }
        if !(1..=7 * 24 * 60).contains(&w.length_minutes) {
            return Err(err("update.window.length_minutes", format!("{} is out of range 1..={} (the window's length in minutes)", w.length_minutes, 7 * 24 * 60)));
        }
    } else if u.server.is_some() {
        return Err(err("update.window", "update.server is set but there is no [update.window]: say when the node may update and reboot (days, start, length_minutes)"));
    }
    Ok(())
}

fn check_time(t: &Time) -> Result<(), ConfigError> {
    if !TIME_WAIT_RANGE.contains(&t.wait_seconds) {
        return Err(err(
            "time.wait_seconds",
            format!("{} is out of range {}..={} (seconds the node waits for the clock before starting k0s)", t.wait_seconds, TIME_WAIT_RANGE.start(), TIME_WAIT_RANGE.end()),
        ));
    }
    let list = t.ntp.as_deref().unwrap_or_default();
    if list.len() > MAX_NTP_SERVERS {
        return Err(err("time.ntp", format!("{} servers given; at most {MAX_NTP_SERVERS}", list.len())));
    }
    for (i, s) in list.iter().enumerate() {
        parse_ntp_server(s).map_err(|m| err(&format!("time.ntp[{i}]"), m))?;
        if list[..i].contains(s) {
            return Err(err(&format!("time.ntp[{i}]"), format!("`{s}` is listed twice")));
        }
    }
    Ok(())
}

/// A fixed name, or one derived from a hardware identity so that one config
/// can serve many nodes.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Hostname {
    Fixed(String),
    Derived(DerivedHostname),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DerivedHostname {
    /// `mac` (the first NIC's MAC, without colons) or `serial` (DMI/devicetree
    /// serial number).
    pub from: HostnameSource,
    #[serde(default)]
    pub prefix: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HostnameSource {
    Mac,
    Serial,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Per-interface settings. With none, every link with carrier gets DHCPv4.
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    /// Name servers for /etc/resolv.conf, added to any from DHCP.
    #[serde(default)]
    pub dns: Vec<IpAddr>,
    /// Search domains for /etc/resolv.conf.
    #[serde(default)]
    pub search: Vec<String>,
    /// Seconds to wait for an address before carrying on without one.
    #[serde(default = "default_network_wait")]
    pub wait_seconds: u32,
}

fn default_network_wait() -> u32 {
    30
}

/// A node.toml without `[network]` gets the same as an empty table.
impl Default for Network {
    fn default() -> Self {
        Network { interfaces: Vec::new(), dns: Vec::new(), search: Vec::new(), wait_seconds: default_network_wait() }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    /// Match by kernel name (`eth0`)...
    #[serde(default)]
    pub name: Option<String>,
    /// ...or by MAC address (`52:54:00:12:34:56`).
    #[serde(default)]
    pub mac: Option<String>,
    /// A VLAN on top of the matched link; the settings below apply to it.
    #[serde(default)]
    pub vlan: Option<u16>,
    /// DHCPv4. Defaults to true when no static address is given.
    #[serde(default)]
    pub dhcp: Option<bool>,
    /// Static addresses in CIDR form (`10.0.0.5/24`, `fd00::5/64`).
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub gateway: Option<IpAddr>,
}

impl Interface {
    pub fn wants_dhcp(&self) -> bool {
        self.dhcp.unwrap_or(self.addresses.is_empty())
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct K0s {
    /// Inline cluster config (k0s.yaml), for controllers.
    #[serde(default)]
    pub config: Option<String>,
    /// Join token, inline.
    #[serde(default)]
    pub token: Option<String>,
    /// Join token, from a file on the node.
    #[serde(default)]
    pub token_file: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub taints: Vec<String>,
    #[serde(default)]
    pub kubelet_extra_args: Option<String>,
    /// Components to disable. Defaults to autopilot and update-prober, which
    /// cannot work on a read-only root; set to [] to keep them.
    #[serde(default)]
    pub disable_components: Option<Vec<String>>,
    /// Environment for k0s. `<COMPONENT>_X` reaches that component as `X`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Extra arguments appended to the k0s command line, as given.
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// Remove the controller taint on controller+worker nodes.
    #[serde(default)]
    pub no_taints: bool,
    /// A pre-generated cluster CA for a controller (`kiln cluster init`),
    /// written to /var/lib/k0s/pki/ca.crt and ca.key before k0s starts.
    #[serde(default)]
    pub ca: Option<ClusterCa>,
    /// Files for the controller's manifests directory,
    /// /var/lib/k0s/manifests/<stack>/<name>, which k0s applies.
    #[serde(default)]
    pub manifests: Vec<Manifest>,
}

/// `[k0s.ca]`: the cluster CA, in PEM.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterCa {
    pub cert: String,
    pub key: String,
}

/// `[[k0s.manifests]]`: one manifest file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub stack: String,
    pub name: String,
    pub content: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Log {
    /// Size at which /var/log/k0s.log is rotated (to k0s.log.1), in bytes.
    #[serde(default = "default_log_max")]
    pub max_bytes: u64,
    /// Payload lines per second copied to the console; the file gets all.
    #[serde(default = "default_console_rate")]
    pub console_lines_per_second: u32,
}

fn default_log_max() -> u64 {
    4 * 1024 * 1024
}
fn default_console_rate() -> u32 {
    50
}

impl Default for Log {
    fn default() -> Self {
        Log { max_bytes: default_log_max(), console_lines_per_second: default_console_rate() }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Debug {
    /// A root shell on the console. Off by default: anyone at the console
    /// would own the node.
    #[serde(default)]
    pub shell: bool,
}

/// A config error: what is wrong, at which key, and where in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: Option<String>,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.line, &self.key) {
            (Some(l), Some(k)) => write!(f, "line {l}, key `{k}`: {}", self.message),
            (Some(l), None) => write!(f, "line {l}: {}", self.message),
            (None, Some(k)) => write!(f, "key `{k}`: {}", self.message),
            (None, None) => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Parses and validates a node.toml. Arbitrary bytes give an error, never a
/// panic.
pub fn parse(src: &str) -> Result<NodeConfig, ConfigError> {
    let cfg: NodeConfig = toml::from_str(src).map_err(|e| from_toml_error(src, &e))?;
    validate(&cfg).map_err(|mut e| {
        if e.line.is_none() {
            if let Some(k) = &e.key {
                e.line = line_of_key(src, k);
            }
        }
        e
    })?;
    Ok(cfg)
}

fn from_toml_error(src: &str, e: &toml::de::Error) -> ConfigError {
    let line = e.span().map(|s| line_at(src, s.start));
    // The toml message names the field for unknown/missing keys; keep only its
    // first line, the rest is a source excerpt we point at with `line` anyway.
    let message = e.message().lines().next().unwrap_or("invalid TOML").to_string();
    // A syntax error has a line and no key; an error in a value read against
    // the schema is at the key whose key or value holds the error's span.
    let located = e.span().and_then(|s| Located::new(src).and_then(|l| l.key_at_offset(s.start)));
    let key = located.or_else(|| unknown_field_name(&message));
    ConfigError { key, line, message }
}

fn unknown_field_name(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("unknown field `").or_else(|| msg.strip_prefix("missing field `"))?;
    rest.split('`').next().map(str::to_string)
}

/// The dotted key defined on the given line (the innermost one, when an
/// inline table defines several); None when the text is not TOML.
pub fn key_at_line(src: &str, line: Option<usize>) -> Option<String> {
    let line = line?;
    let located = Located::new(src)?;
    located
        .entries
        .iter()
        .filter(|e| e.key.as_ref().is_some_and(|k| line_at(src, k.start) == line))
        .max_by_key(|e| e.path.len())
        .map(|e| e.path.clone())
}

/// The 1-based line of a byte offset. An offset at the very end (after the
/// last newline) is on the last line, so the line always exists.
pub fn line_at(src: &str, byte: usize) -> usize {
    let n = src.get(..byte.min(src.len())).map_or(1, |s| s.matches('\n').count() + 1);
    n.min(src.lines().count().max(1))
}

/// The line defining a dotted key such as `k0s.token` or
/// `network.interfaces[1].mac`. When the key itself is absent, the line of
/// the nearest table on its path that is there (`[[network.interfaces]]`
/// for an interface that lacks a key); None when none is, or the text is
/// not TOML.
pub fn line_of_key(src: &str, dotted: &str) -> Option<usize> {
    let located = Located::new(src)?;
    let mut path = dotted.to_string();
    loop {
        if let Some(at) = located.entries.iter().find(|e| e.path == path).and_then(Entry::start) {
            return Some(line_at(src, at));
        }
        let cut = path.rfind(['.', '['])?;
        path.truncate(cut);
    }
}

/// Every key of a parsed TOML text with where it is.
struct Located {
    entries: Vec<Entry>,
}

struct Entry {
    /// Dotted, with `[i]` for the tables of an array.
    path: String,
    /// The key (for a `[table]`, its header).
    key: Option<std::ops::Range<usize>>,
    value: Option<std::ops::Range<usize>>,
}

impl Entry {
    fn start(&self) -> Option<usize> {
        self.key.as_ref().or(self.value.as_ref()).map(|r| r.start)
    }
}

impl Located {
    fn new(src: &str) -> Option<Located> {
        let doc = toml_edit::ImDocument::parse(src).ok()?;
        let mut entries = Vec::new();
        walk_table(doc.as_table(), "", &mut entries);
        Some(Located { entries })
    }

    /// The innermost key whose key or value holds the offset.
    fn key_at_offset(&self, at: usize) -> Option<String> {
        let holds = |r: &Option<std::ops::Range<usize>>| r.as_ref().is_some_and(|r| r.start <= at && at < r.end.max(r.start + 1));
        self.entries
            .iter()
            .filter(|e| holds(&e.key) || holds(&e.value))
            .max_by_key(|e| e.path.len())
            .map(|e| e.path.clone())
    }
}

fn join(path: &str, key: &str) -> String {
    let bare = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let key = if bare { key.to_string() } else { format!("{key:?}") };
    if path.is_empty() {
        key
    } else {
        format!("{path}.{key}")
    }
}

fn walk_table(t: &dyn toml_edit::TableLike, path: &str, out: &mut Vec<Entry>) {
    for (name, item) in t.iter() {
        let p = join(path, name);
        let key = t.key(name).and_then(|k| k.span());
        match item {
            toml_edit::Item::Table(tab) => {
                out.push(Entry { path: p.clone(), key: tab.span().or(key), value: None });
                walk_table(tab, &p, out);
            }
            toml_edit::Item::ArrayOfTables(a) => {
                out.push(Entry { path: p.clone(), key, value: a.span() });
                for (i, tab) in a.iter().enumerate() {
                    let pi = format!("{p}[{i}]");
                    out.push(Entry { path: pi.clone(), key: tab.span(), value: None });
                    walk_table(tab, &pi, out);
                }
            }
            toml_edit::Item::Value(v) => {
                out.push(Entry { path: p.clone(), key, value: v.span() });
                walk_value(v, &p, out);
            }
            toml_edit::Item::None => {}
        }
    }
}

fn walk_value(v: &toml_edit::Value, path: &str, out: &mut Vec<Entry>) {
    match v {
        toml_edit::Value::InlineTable(t) => walk_table(t, path, out),
        toml_edit::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                if let toml_edit::Value::InlineTable(t) = x {
                    let pi = format!("{path}[{i}]");
                    out.push(Entry { path: pi.clone(), key: None, value: x.span() });
                    walk_table(t, &pi, out);
                }
            }
        }
        _ => {}
    }
}

fn err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError { key: Some(key.to_string()), line: None, message: message.into() }
}

/// Checks what serde cannot: values, and combinations of keys.
pub fn validate(cfg: &NodeConfig) -> Result<(), ConfigError> {
    match &cfg.hostname {
        Some(Hostname::Fixed(h)) => {
            check_hostname(h).map_err(|m| err("hostname", m))?;
        }
        Some(Hostname::Derived(d)) if !d.prefix.is_empty() => {
            check_hostname(d.prefix.trim_end_matches('-')).map_err(|m| err("hostname.prefix", m))?;
        }
        Some(Hostname::Derived(_)) => {}
        None => {}
    }
    for (i, iface) in cfg.network.interfaces.iter().enumerate() {
        let key = |k: &str| format!("network.interfaces[{i}].{k}");
        if iface.name.is_some() == iface.mac.is_some() {
            return Err(err(&key("name"), "give exactly one of `name` or `mac` to say which link this is"));
        }
        if let Some(mac) = &iface.mac {
            parse_mac(mac).ok_or_else(|| err(&key("mac"), format!("`{mac}` is not a MAC address like 52:54:00:12:34:56")))?;
        }
        if let Some(v) = iface.vlan {
            if v == 0 || v > 4094 {
                return Err(err(&key("vlan"), format!("VLAN id {v} is out of range 1..=4094")));
            }
        }
        for a in &iface.addresses {
            parse_cidr(a).map_err(|m| err(&key("addresses"), m))?;
        }
        if iface.gateway.is_some() && iface.addresses.is_empty() {
            return Err(err(&key("gateway"), "a gateway needs a static address on the same interface"));
        }
        if !iface.wants_dhcp() && iface.addresses.is_empty() {
            return Err(err(&key("dhcp"), "DHCP is off and no static address is given: the interface would get no address"));
        }
    }
    let k = &cfg.k0s;
    if k.token.is_some() && k.token_file.is_some() {
        return Err(err("k0s.token", "give either `token` or `token_file`, not both (k0s takes exactly one token source)"));
    }
    if cfg.role == Role::Worker && k.token.is_none() && k.token_file.is_none() {
        return Err(err("k0s.token", "a worker needs a join token: set `token` or `token_file` (from `k0s token create --role worker` or `kiln cluster init`)"));
    }
    if cfg.role == Role::Worker && k.config.is_some() {
        return Err(err("k0s.config", "a worker takes its configuration from the controller; `config` is for controller roles"));
    }
    if cfg.role == Role::Single && (k.token.is_some() || k.token_file.is_some()) {
        return Err(err("k0s.token", "a single node does not join a cluster; remove the token or pick another role"));
    }
    if let Some(c) = &k.config {
        check_k0s_yaml(c).map_err(|m| err("k0s.config", m))?;
    }
    if let Some(f) = &k.token_file {
        if !f.starts_with('/') || f.contains("..") {
            return Err(err("k0s.token_file", format!("`{f}` must be an absolute path on the node, like /var/lib/kiln/join-token")));
        }
    }
    if !cfg.role.runs_workloads() {
        let node_keys = [("k0s.labels", !k.labels.is_empty()), ("k0s.taints", !k.taints.is_empty()), ("k0s.kubelet_extra_args", k.kubelet_extra_args.is_some())];
        if let Some((key, _)) = node_keys.iter().find(|(_, set)| *set) {
            return Err(err(key, "a controller runs no kubelet, so this has no effect; use role = \"controller+worker\" to run workloads here"));
        }
    }
    if k.no_taints && cfg.role != Role::ControllerWorker {
        return Err(err("k0s.no_taints", format!("only a controller+worker is tainted; role {} has nothing to remove", cfg.role)));
    }
    if k.env.contains_key("K0S_TOKEN") {
        return Err(err("k0s.env", "K0S_TOKEN would be a second token source next to --token-file; give the token as `token` or `token_file`"));
    }
    if let Some(t) = &k.token {
        if t.trim().is_empty() || t.trim().chars().any(|c| !(c.is_ascii_alphanumeric() || "+/=".contains(c))) {
            return Err(err("k0s.token", "a join token is base64 text (the output of `k0s token create`)"));
        }
    }
    for (name, _) in k.labels.iter() {
        if name.is_empty() || name.contains(['=', ',', ' ']) {
            return Err(err("k0s.labels", format!("label key `{name}` is not a valid Kubernetes label key")));
        }
    }
    for t in &k.taints {
        let effect = t.rsplit_once(':').map(|(_, e)| e);
        if !matches!(effect, Some("NoSchedule" | "PreferNoSchedule" | "NoExecute")) {
            return Err(err("k0s.taints", format!("taint `{t}` must look like key=value:NoSchedule (effects: NoSchedule, PreferNoSchedule, NoExecute)")));
        }
    }
    check_cluster_files(cfg.role, k)?;
    for name in k.env.keys() {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(err("k0s.env", format!("`{name}` is not a valid environment variable name")));
        }
    }
    for (key, v) in [("install.disk", &cfg.install.disk), ("storage.var_disk", &cfg.storage.var_disk)] {
        if let Some(d) = v {
            if !d.starts_with("/dev/") || d.len() <= 5 || d.contains("..") {
                return Err(err(key, format!("`{d}` is not a device path like /dev/vda or /dev/disk/by-id/…")));
            }
        }
    }
    if cfg.install.disk.is_some() && cfg.install.disk == cfg.storage.var_disk {
        return Err(err("storage.var_disk", "the install target cannot also be the /var disk: the installed disk carries its own data partition"));
    }
    if cfg.log.max_bytes < 64 * 1024 {
        return Err(err("log.max_bytes", "must be at least 65536 bytes"));
    }
    check_time(&cfg.time)?;
    check_update(&cfg.update)?;
    Ok(())
}

/// The largest manifest accepted; a node config is read whole into memory.
const MAX_MANIFEST: usize = 1 << 20;

fn check_cluster_files(role: Role, k: &K0s) -> Result<(), ConfigError> {
    if role == Role::Worker {
        if k.ca.is_some() {
            return Err(err("k0s.ca", "a worker gets the cluster CA from its join token; `[k0s.ca]` is for controller roles"));
        }
        if !k.manifests.is_empty() {
            return Err(err("k0s.manifests", "only controllers apply manifests; `[[k0s.manifests]]` is for controller roles"));
        }
    }
    if let Some(ca) = &k.ca {
        check_pem(&ca.cert, &["CERTIFICATE"]).map_err(|m| err("k0s.ca.cert", m))?;
        check_pem(&ca.key, &["RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY"]).map_err(|m| err("k0s.ca.key", m))?;
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, m) in k.manifests.iter().enumerate() {
        let key = |f: &str| format!("k0s.manifests[{i}].{f}");
        check_file_name(&m.stack, 63).map_err(|e| err(&key("stack"), format!("stack `{}`: {e}", m.stack)))?;
        check_file_name(&m.name, 255).map_err(|e| err(&key("name"), format!("file name `{}`: {e}", m.name)))?;
        if !m.name.ends_with(".yaml") {
            return Err(err(&key("name"), format!("`{}` must end in .yaml: k0s applies only *.yaml files in a stack", m.name)));
        }
        if !seen.insert((m.stack.as_str(), m.name.as_str())) {
            return Err(err(&key("name"), format!("`{}/{}` is given twice", m.stack, m.name)));
        }
        if m.content.trim().is_empty() {
            return Err(err(&key("content"), "the manifest is empty"));
        }
        if m.content.len() > MAX_MANIFEST {
            return Err(err(&key("content"), format!("the manifest is {} bytes; at most {MAX_MANIFEST} are accepted", m.content.len())));
        }
        if let Some(n) = m.content.lines().position(|l| l.starts_with('\t')) {
            return Err(err(&key("content"), format!("line {} of the manifest is indented with a tab, which YAML does not allow", n + 1)));
        }
    }
    Ok(())
}

/// One name in a path: letters, digits, `-`, `_` and `.`, starting and
/// ending with a letter or digit (so never `.`, `..` or a hidden file).
fn check_file_name(s: &str, max: usize) -> Result<(), String> {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if s.is_empty() || s.len() > max {
        return Err(format!("must be 1 to {max} characters"));
    }
    if !s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) || !alnum(s.chars().next()) || !alnum(s.chars().last()) {
        return Err("use letters, digits, `-`, `_` and `.`, starting and ending with a letter or digit (no `/`, no `..`)".into());
    }
    Ok(())
}

/// Checks that `text` is one PEM block with one of the `labels`, whose body is
/// base64 of a DER SEQUENCE; returns the label.
pub fn check_pem<'a>(text: &str, labels: &[&'a str]) -> Result<&'a str, String> {
    let want = || labels.iter().map(|l| format!("`-----BEGIN {l}-----`")).collect::<Vec<_>>().join(" or ");
    let lines: Vec<&str> = text.trim().lines().map(str::trim).collect();
    let (Some(first), Some(last)) = (lines.first(), lines.last()) else { return Err(format!("empty; expected a PEM block starting with {}", want())) };
    let label = first
        .strip_prefix("-----BEGIN ")
        .and_then(|r| r.strip_suffix("-----"))
        .and_then(|l| labels.iter().find(|x| **x == l))
        .ok_or_else(|| format!("expected a PEM block starting with {}, found `{first}`", want()))?;
    if lines.len() < 3 || *last != format!("-----END {label}-----") {
        return Err(format!("the PEM block does not end with `-----END {label}-----` (one block only)"));
    }
    let body: String = lines[1..lines.len() - 1].concat();
    let der = crate::minisign::b64_decode(&body).map_err(|e| format!("the PEM body is not base64: {e}"))?;
    if der.first() != Some(&0x30) || der.len() < 16 {
        return Err(format!("the PEM body is not a DER {label}"));
    }
    Ok(label)
}

/// RFC 1123 host name: dot-separated labels of a-z0-9 and inner hyphens.
pub fn check_hostname(h: &str) -> Result<(), String> {
    if h.is_empty() || h.len() > 253 {
        return Err(format!("hostname `{h}` must be 1 to 253 characters"));
    }
    for label in h.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "hostname `{h}` is not a valid node name: use lowercase letters, digits and inner hyphens (Kubernetes uses it as the node name)"
            ));
        }
    }
    Ok(())
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (a, p) = s.split_once('/').ok_or_else(|| format!("`{s}` needs a prefix length, like 10.0.0.5/24"))?;
    let addr: IpAddr = a.parse().map_err(|_| format!("`{a}` is not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = p.parse().ok().filter(|p| *p <= max).ok_or_else(|| format!("`{p}` is not a prefix length (0..={max})"))?;
    Ok((addr, prefix))
}

/// A light check that the cluster config is YAML-shaped and a k0s
/// ClusterConfig, so a paste error shows up here rather than in k0s's log.
fn check_k0s_yaml(c: &str) -> Result<(), String> {
    if c.contains('\t') {
        return Err("YAML does not allow tabs for indentation".into());
    }
    let has = |k: &str, v: &str| c.lines().any(|l| l.trim_start() == l && l.split_once(':').is_some_and(|(a, b)| a.trim() == k && b.trim().trim_matches('"') == v));
    if !has("apiVersion", "k0s.k0sproject.io/v1beta1") {
        return Err("expected a k0s ClusterConfig with `apiVersion: k0s.k0sproject.io/v1beta1`".into());
    }
    if !has("kind", "ClusterConfig") {
        return Err("expected `kind: ClusterConfig`".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn minimal() {
        let c = parse("role = \"single\"\n").unwrap();
        assert_eq!(c.role, Role::Single);
        assert!(c.network.interfaces.is_empty());
    }

    #[test]
    fn update_defaults_and_values() {
        let c = parse("role = \"single\"\n").unwrap();
        assert_eq!(c.update, Update::default());
        assert_eq!((c.update.tries, c.update.health_seconds, c.update.boot_timeout_seconds), (3, 120, 900));
        let c = parse("role = \"single\"\n[update]\ntries = 2\nhealth_seconds = 10\nboot_timeout_seconds = 60\nallow_downgrade = true\nserver = \"http://10.0.2.2:8080/kiln\"\nchannel = \"stable\"\n[update.window]\ndays = [\"sat\", \"Sun\"]\nstart = \"02:30\"\nlength_minutes = 90\n").unwrap();
        assert_eq!(c.update.tries, 2);
        assert!(c.update.allow_downgrade);
        let w = c.update.window.unwrap();
        assert_eq!(w.start_minute(), Some(150));
        assert_eq!(w.day_numbers(), vec![5, 6]);
    }

    #[test]
    fn update_errors_name_the_key() {
        for (body, key, says) in [
            ("tries = 0", "update.tries", "out of range 1..=9"),
            ("health_seconds = 1", "update.health_seconds", "out of range"),
            ("health_seconds = 100\nboot_timeout_seconds = 100", "update.boot_timeout_seconds", "could never be marked good"),
            ("server = \"ftp://x\"\nchannel = \"s\"", "update.server", "not an https:// or http:// URL"),
            ("server = \"https://\"\nchannel = \"s\"", "update.server", "not an https:// or http:// URL"),
            ("server = \"http://x\"", "update.channel", "name the channel"),
            ("channel = \"s\"", "update.server", "give the server"),
            ("server = \"http://x\"\nchannel = \"../x\"", "update.channel", "not a channel name"),
            ("server = \"http://x\"\nchannel = \"s\"", "update.window", "say when"),
            ("[update.window]\nstart = \"25:00\"\nlength_minutes = 5", "update.window.start", "HH:MM"),
            ("[update.window]\nstart = \"2:00\"\nlength_minutes = 5", "update.window.start", "HH:MM"),
            ("[update.window]\nstart = \"02:00\"\nlength_minutes = 0", "update.window.length_minutes", "out of range"),
            ("[update.window]\ndays = [\"fri\", \"someday\"]\nstart = \"02:00\"\nlength_minutes = 5", "update.window.days[1]", "not a day"),
        ] {
            let e = parse(&format!("role = \"single\"\n[update]\n{body}\n")).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{body}: {e}");
            assert!(e.to_string().contains(says), "{body}: {e}");
        }
    }

    #[test]
    fn window_opens_on_its_days_and_wraps_midnight() {
        let w = |days: &[&str], start: &str, len: u32| Window { days: days.iter().map(|d| d.to_string()).collect(), start: start.into(), length_minutes: len };
        // 2026-12-05 is a Saturday; midnight UTC.
        let sat = 1_796_428_800;
        assert_eq!((sat / 86_400 + 3) % 7, 5);
        let x = w(&["sat"], "02:00", 60);
        assert!(!x.contains(sat + 3600));
        assert_eq!(x.seconds_until(sat + 3600), 3600);
        assert!(x.contains(sat + 2 * 3600));
        assert!(x.contains(sat + 3 * 3600 - 1));
        assert!(!x.contains(sat + 3 * 3600));
        // Next Saturday.
        assert_eq!(x.seconds_until(sat + 3 * 3600), 7 * 86_400 - 3600);
        // 23:30 for two hours: still open at 01:00 the next day.
        let y = w(&["fri"], "23:30", 120);
        assert!(y.contains(sat + 3600));
        assert!(!y.contains(sat + 2 * 3600));
        // No days: every day.
        let z = w(&[], "00:00", 10);
        assert!(z.contains(sat + 86_400 * 3 + 60));
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = parse("role = \"single\"\n\n[k0s]\nlabel = {}\n").unwrap_err();
        assert_eq!(e.line, Some(4));
        assert_eq!(e.key.as_deref(), Some("k0s.label"));
        assert!(e.message.contains("unknown field"), "{e}");
    }

    /// The tables of the schema, found through serde's own answer to an
    /// unknown key (`expected one of `a`, `b``), and every key in them.
    fn walk_schema() -> (Vec<String>, Vec<String>) {
        fn fields(src: &str) -> Option<Vec<String>> {
            let e = toml::from_str::<NodeConfig>(src).err()?;
            let m = e.message();
            let rest = m.strip_prefix("unknown field `zz_probe`")?;
            Some(rest.split('`').skip(1).step_by(2).map(str::to_string).collect())
        }
        fn walk(ctx: &str, path: &str, keys: &mut Vec<String>, tables: &mut Vec<String>) {
            let Some(list) = fields(&format!("role = \"single\"\n{ctx}zz_probe = 1\n")) else { return };
            tables.push(path.to_string());
            for f in list {
                let p = if path.is_empty() { f.clone() } else { format!("{path}.{f}") };
                keys.push(p.clone());
                for header in [format!("[{p}]"), format!("[[{p}]]")] {
                    let sub = format!("{ctx}{header}\n");
                    if fields(&format!("role = \"single\"\n{sub}zz_probe = 1\n")).is_some() {
                        walk(&sub, &p, keys, tables);
                        break;
                    }
                }
            }
        }
        let (mut keys, mut tables) = (Vec::new(), Vec::new());
        walk("", "", &mut keys, &mut tables);
        (keys, tables)
    }

    #[test]
    fn keys_lists_every_key_of_the_schema() {
        let (walked, tables) = walk_schema();
        assert!(walked.len() > 20 && tables.iter().any(|t| t == "network.interfaces"), "the walk found {walked:?}");
        for k in &walked {
            assert!(KEYS.contains(&k.as_str()), "`{k}` is in the schema but not in config::KEYS: add it there (and document it in docs/node-config.md)");
        }
        // What the walk cannot enter (an untagged enum such as `hostname`) is
        // listed under a parent the walk found as a key, not as a table.
        for k in KEYS {
            if walked.iter().any(|w| w == k) {
                continue;
            }
            let parent = k.rsplit_once('.').map(|(p, _)| p).unwrap_or("");
            assert!(
                walked.iter().any(|w| w == parent) && !tables.iter().any(|t| t == parent),
                "config::KEYS has `{k}`, which the schema does not take"
            );
        }
    }

    #[test]
    fn errors_point_at_the_right_interface() {
        let src = "role = \"single\"\n[[network.interfaces]]\nmac = \"52:54:00:12:34:56\"\n\n[[network.interfaces]]\nmac = \"52:54:00:12:34\"\n";
        let e = parse(src).unwrap_err();
        assert_eq!((e.key.as_deref(), e.line), (Some("network.interfaces[1].mac"), Some(6)), "{e}");
        // A missing key: the line of its table.
        let e = parse("role = \"single\"\n\n[[network.interfaces]]\ndhcp = true\n").unwrap_err();
        assert_eq!((e.key.as_deref(), e.line), (Some("network.interfaces[0].name"), Some(3)), "{e}");
        // A value error inside an array of inline tables.
        let e = parse("role = \"single\"\nnetwork = { interfaces = [\n  { name = \"eth0\" },\n  { name = \"eth1\", vlan = 5000 },\n] }\n").unwrap_err();
        assert_eq!(e.line, Some(4), "{e}");
        assert_eq!(e.key.as_deref(), Some("network.interfaces[1].vlan"), "{e}");
    }

    #[test]
    fn keys_inside_multiline_strings_are_not_keys() {
        let src = "role = \"worker\"\n[k0s]\nkubelet_extra_args = \"\"\"\n[k0s]\ntoken = \"x\"\n\"\"\"\n";
        let e = parse(src).unwrap_err();
        assert_eq!((e.key.as_deref(), e.line), (Some("k0s.token"), Some(2)), "{e}");
        let e = parse("role = \"single\"\nx = \"\"\"\n[k0s]\n\"\"\"\n").unwrap_err();
        assert_eq!((e.key.as_deref(), e.line), (Some("x"), Some(2)), "{e}");
    }

    #[test]
    fn a_syntax_error_has_a_line_that_exists() {
        for src in ["role = \"single\"\nx = \n", "role = \"single\"\n[k0s\n", "_]+\n", "role = \"single\"\nrole = \"worker\"\n"] {
            let e = parse(src).unwrap_err();
            let l = e.line.unwrap_or_else(|| panic!("no line: {e}"));
            assert!(l >= 1 && l <= src.lines().count(), "{src:?}: {e}");
        }
        let e = parse("").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("role"), "{e}");
    }

    #[test]
    fn bad_role() {
        let e = parse("role = \"master\"\n").unwrap_err();
        assert_eq!(e.line, Some(1));
        assert!(e.message.contains("unknown variant"), "{e}");
    }

    #[test]
    fn semantic_error_has_line() {
        let e = parse("role = \"worker\"\nhostname = \"Node_1\"\n[k0s]\ntoken = \"abc\"\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("hostname"));
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn worker_needs_token() {
        let e = parse("role = \"worker\"\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("k0s.token"));
    }

    #[test]
    fn role_specific_k0s_keys() {
        let e = parse("role = \"controller\"\n[k0s]\nlabels = { a = \"b\" }\n").unwrap_err();
        assert_eq!((e.key.as_deref(), e.line), (Some("k0s.labels"), Some(3)));
        assert!(e.message.contains("controller+worker"), "{e}");
        assert_eq!(parse("role = \"controller\"\n[k0s]\ntaints = [\"a=b:NoSchedule\"]\n").unwrap_err().key.as_deref(), Some("k0s.taints"));
        assert_eq!(parse("role = \"controller\"\n[k0s]\nkubelet_extra_args = \"-v\"\n").unwrap_err().key.as_deref(), Some("k0s.kubelet_extra_args"));
        assert!(parse("role = \"single\"\n[k0s]\nlabels = { a = \"b\" }\n").is_ok());
        assert_eq!(parse("role = \"single\"\n[k0s]\nno_taints = true\n").unwrap_err().key.as_deref(), Some("k0s.no_taints"));
        assert!(parse("role = \"controller+worker\"\n[k0s]\nno_taints = true\n").is_ok());
        let e = parse("role = \"worker\"\n[k0s]\ntoken = \"abc\"\nenv = { K0S_TOKEN = \"x\" }\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("k0s.env"));
        let e = parse("role = \"worker\"\n[k0s]\ntoken_file = \"token\"\n").unwrap_err();
        assert_eq!((e.key.as_deref(), e.line), (Some("k0s.token_file"), Some(3)));
    }

    #[test]
    fn derived_hostname_and_static_net() {
        let c = parse(
            r#"role = "controller+worker"
hostname = { from = "mac", prefix = "edge-" }
[[network.interfaces]]
mac = "52:54:00:12:34:56"
addresses = ["10.0.0.5/24"]
gateway = "10.0.0.1"
"#,
        )
        .unwrap();
        assert!(matches!(c.hostname, Some(Hostname::Derived(_))));
        assert!(!c.network.interfaces[0].wants_dhcp());
    }

    #[test]
    fn time_defaults_and_servers() {
        let c = parse("role = \"single\"\n").unwrap();
        assert_eq!(c.time, Time { ntp: None, wait_seconds: 15 });
        let c = parse("role = \"single\"\n[time]\nntp = [\"pool.ntp.org\", \"ntp.example:1123\", \"10.0.0.1\", \"fd00::1\", \"[fd00::2]:124\"]\nwait_seconds = 5\n").unwrap();
        let parsed: Vec<String> = c.time.ntp.unwrap().iter().map(|s| parse_ntp_server(s).unwrap().to_string()).collect();
        assert_eq!(parsed, ["pool.ntp.org:123", "ntp.example:1123", "10.0.0.1:123", "[fd00::1]:123", "[fd00::2]:124"]);
        assert_eq!(c.time.wait_seconds, 5);
        let off = parse("role = \"single\"\n[time]\nntp = []\n").unwrap();
        assert_eq!(off.time.ntp, Some(vec![]));
    }

    #[test]
    fn ntp_server_forms() {
        assert_eq!(parse_ntp_server("10.0.2.2:1234").unwrap(), NtpServer { host: NtpHost::Ip("10.0.2.2".parse().unwrap()), port: 1234 });
        assert_eq!(parse_ntp_server("Time.Example.COM.").unwrap(), NtpServer { host: NtpHost::Name("time.example.com".into()), port: 123 });
        for bad in ["", "a b", "host:0", "host:70000", "host:", "fd00::1:123:x", "[fd00::1", "[fd00::1]123", "[10.0.0.1]:123", "10.0.0.256", "1.2.3", "-bad.example", "a..b", "under_score.example"] {
            assert!(parse_ntp_server(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn time_errors_name_the_key_and_line() {
        let e = parse("role = \"single\"\n[time]\nntp = [\"pool.ntp.org\", \"10.0.0.1:99999\"]\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("time.ntp[1]"));
        assert_eq!(e.line, Some(3));
        assert!(e.message.contains("99999") && e.message.contains("port"), "{e}");
        let e = parse("role = \"single\"\n[time]\nwait_seconds = 0\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("time.wait_seconds"));
        assert_eq!(e.line, Some(3));
        let e = parse("role = \"single\"\n[time]\nwait_seconds = 301\n").unwrap_err();
        assert!(e.message.contains("1..=300"), "{e}");
        let e = parse("role = \"single\"\n[time]\nntp = [\"a.example\", \"a.example\"]\n").unwrap_err();
        assert!(e.message.contains("twice"), "{e}");
        let e = parse("role = \"single\"\n[time]\nservers = []\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("time.servers"));
        let e = parse("role = \"single\"\n[time]\nntp = \"pool.ntp.org\"\n").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
    }

    /// A PEM block whose body is a (fake) DER SEQUENCE.
    fn pem(label: &str) -> String {
        let der: Vec<u8> = [0x30, 0x82, 0x01, 0x0a].into_iter().chain((0..60u8).map(|i| i.wrapping_mul(7))).collect();
        let b = crate::minisign::b64_encode(&der);
        format!("-----BEGIN {label}-----\n{}\n{}\n-----END {label}-----\n", &b[..64], &b[64..])
    }

    fn cluster_cfg(role: &str, ca: (&str, &str), stack: &str, name: &str) -> String {
        format!(
            "role = \"{role}\"\n[k0s.ca]\ncert = '''\n{}'''\nkey = '''\n{}'''\n\n[[k0s.manifests]]\nstack = \"{stack}\"\nname = \"{name}\"\ncontent = '''\napiVersion: v1\nkind: Secret\n'''\n",
            ca.0, ca.1
        )
    }

    #[test]
    fn cluster_ca_and_manifests() {
        let (c, k) = (pem("CERTIFICATE"), pem("RSA PRIVATE KEY"));
        let cfg = parse(&cluster_cfg("controller", (&c, &k), "kiln-cluster", "bootstrap-token-abcdef.yaml")).unwrap();
        assert_eq!(cfg.k0s.ca.as_ref().unwrap().cert, c);
        assert_eq!(cfg.k0s.manifests[0].stack, "kiln-cluster");
        assert_eq!(cfg.k0s.manifests[0].content, "apiVersion: v1\nkind: Secret\n");
        assert!(parse(&cluster_cfg("single", (&c, &pem("PRIVATE KEY")), "a", "b.yaml")).is_ok());
        assert_eq!(check_pem(&k, &["PRIVATE KEY", "RSA PRIVATE KEY"]), Ok("RSA PRIVATE KEY"));
    }

    #[test]
    fn cluster_files_are_checked() {
        let (c, k) = (pem("CERTIFICATE"), pem("RSA PRIVATE KEY"));
        let bad = |src: String, key: &str, what: &str| {
            let e = parse(&src).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{e}");
            assert!(e.message.contains(what), "{e}");
            assert!(e.line.is_some(), "{e}");
        };
        bad(cluster_cfg("controller", (&k, &k), "s", "a.yaml"), "k0s.ca.cert", "BEGIN CERTIFICATE");
        bad(cluster_cfg("controller", (&c, &c), "s", "a.yaml"), "k0s.ca.key", "PRIVATE KEY");
        bad(cluster_cfg("controller", (&c.replace("-----END CERTIFICATE-----", "-----END X-----"), &k), "s", "a.yaml"), "k0s.ca.cert", "does not end");
        bad(cluster_cfg("controller", (&c.replacen("-----\n", "-----\n*", 1), &k), "s", "a.yaml"), "k0s.ca.cert", "not base64");
        bad(cluster_cfg("controller", (&c, &k), "../etc", "a.yaml"), "k0s.manifests[0].stack", "no `/`");
        bad(cluster_cfg("controller", (&c, &k), ".hidden", "a.yaml"), "k0s.manifests[0].stack", "starting and ending");
        bad(cluster_cfg("controller", (&c, &k), "s", "x/../../a.yaml"), "k0s.manifests[0].name", "no `/`");
        bad(cluster_cfg("controller", (&c, &k), "s", "a.json"), "k0s.manifests[0].name", ".yaml");
        let worker = cluster_cfg("worker", (&c, &k), "s", "a.yaml").replace("[k0s.ca]", "[k0s]\ntoken = \"abc=\"\n[k0s.ca]");
        bad(worker, "k0s.ca", "controller roles");
        let twice = format!("{}[[k0s.manifests]]\nstack = \"s\"\nname = \"a.yaml\"\ncontent = \"x: 1\"\n", cluster_cfg("controller", (&c, &k), "s", "a.yaml"));
        bad(twice, "k0s.manifests[1].name", "twice");
        let tab = cluster_cfg("controller", (&c, &k), "s", "a.yaml").replace("kind: Secret", "kind: Secret\n\tx: 1");
        bad(tab, "k0s.manifests[0].content", "tab");
        let unknown = cluster_cfg("controller", (&c, &k), "s", "a.yaml").replace("[k0s.ca]", "[k0s.ca]\ncrt = \"x\"");
        bad(unknown, "k0s.ca.crt", "unknown field");
    }

    proptest! {
        #[test]
        fn arbitrary_input_never_panics(s in "\\PC*") {
            let _ = parse(&s);
        }

        #[test]
        fn arbitrary_ntp_entries_never_panic(s in "\\PC{0,40}") {
            if let Ok(srv) = parse_ntp_server(&s) {
                // What parses prints back as something that parses the same.
                prop_assert_eq!(parse_ntp_server(&srv.to_string()), Ok(srv));
            }
        }

        #[test]
        fn arbitrary_toml_like_errors_name_something(
            key in "[a-z_]{1,12}", val in "[a-z0-9\" ]{0,10}"
        ) {
            let src = format!("role = \"single\"\n{key} = {val}\n");
            if let Err(e) = parse(&src) {
                prop_assert!(e.line.is_some() || e.key.is_some(), "{}", e);
            }
        }
    }

    #[test]
    fn secrets_are_found_in_good_and_broken_configs() {
        assert!(secret_keys("role = \"worker\"\n[k0s]\ntoken_file = \"/x\"\n").is_empty());
        assert_eq!(secret_keys("role = \"worker\"\n[k0s]\ntoken = \"abc\"\n"), ["k0s.token"]);
        assert_eq!(secret_keys("role = \"controller\"\n[k0s.ca]\ncert = \"c\"\nkey = \"k\"\n"), ["k0s.ca.key"]);
        assert_eq!(secret_keys("role = \"worker\"\n[k0s]\ntoken = \"abc\n"), ["k0s.token"]);
        assert_eq!(secret_keys("[[[\n-----BEGIN EC PRIVATE KEY-----\n"), ["k0s.ca.key"]);
    }
}

