//! Where the node config comes from. First found wins:
//! `kiln.config=URL` on the kernel cmdline, then QEMU fw_cfg
//! `opt/kiln/node.toml`, then `node.toml` on a volume labelled `KILNCFG`
//! (see volume.rs), then `node.toml` on the ESP (mounted at /boot by stage
//! 1), then the default baked into the image.
//!
//! The order goes from the most deliberate and specific to the most
//! general: fw_cfg is set per VM by whoever starts it; a KILNCFG stick is
//! plugged into this one machine on purpose, to override the image without
//! editing it; the ESP's file travels with the flashed image (often the same
//! for a fleet); the image's default is what the profile baked in.
//!
//! With a URL on the cmdline, the URL is the only source: the network comes
//! up with DHCP first, and a failed fetch is retried, never replaced by a
//! local file. When the image carries `/etc/kiln/config.pub`, every source but
//! the image's own must come with a minisign signature by that key.

use super::netup::{self, NetState};
use super::{console, fetch, host, sys, volume};
use kiln_contract::config::{self, NodeConfig};
use kiln_contract::minisign::PublicKey;
use std::time::Duration;

pub const FW_CFG: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/kiln/node.toml/raw";
pub const FW_CFG_SIG: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/kiln/node.toml.minisig/raw";
pub const ESP: &str = "/boot/node.toml";
pub const ESP_SIG: &str = "/boot/node.toml.minisig";
pub const BAKED: &str = "/etc/kiln/node.toml";
/// The public key configs from outside the image must be signed with.
pub const CONFIG_KEY: &str = "/etc/kiln/config.pub";
pub const DMI_UUID: &str = "/sys/class/dmi/id/product_uuid";
/// How to make a signature, for messages.
pub use kiln_contract::config::SIGN_HOW;
/// Present when the image accepts secret-bearing configs over plain http://.
pub const INSECURE_HTTP_SECRETS: &str = kiln_contract::layout::INSECURE_HTTP_SECRETS;
/// The cmdline parameter naming the config URL.
pub const CMDLINE_PARAM: &str = "kiln.config";

/// The raw text of the first local source that exists, and its name. The
/// ESP file counts only when it has a setting: the image ships a commented
/// template there.
pub fn find() -> Option<(String, String)> {
    first_local().map(|l| (l.source.to_string(), String::from_utf8_lossy(&l.bytes).into_owned()))
}

/// A local source's file, its signature (or why there is none and what to
/// do), and for a KILNCFG volume the device.
struct Local {
    source: &'static str,
    bytes: Vec<u8>,
    sig: Result<String, String>,
    dev: Option<String>,
}

fn read_sig(path: &str, name: &str, how: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!("there is no {name}; {SIGN_HOW} {how}")
        } else {
            format!("reading {name}: {e}")
        }
    })
}

fn first_local() -> Option<Local> {
    if let Ok(bytes) = std::fs::read(FW_CFG) {
        let sig = read_sig(FW_CFG_SIG, "fw_cfg opt/kiln/node.toml.minisig", "and pass node.toml.minisig as fw_cfg opt/kiln/node.toml.minisig too");
        return Some(Local { source: "fw_cfg", bytes, sig, dev: None });
    }
    if let Some(v) = volume::find() {
        return Some(Local { source: "kilncfg", bytes: v.bytes, sig: v.sig, dev: Some(v.dev) });
    }
    if let Ok(bytes) = std::fs::read(ESP) {
        if !only_comments(&String::from_utf8_lossy(&bytes)) {
            let sig = read_sig(ESP_SIG, ESP_SIG, "and copy node.toml.minisig beside node.toml on the boot partition");
            return Some(Local { source: "esp", bytes, sig, dev: None });
        }
    }
    let bytes = std::fs::read(BAKED).ok()?;
    Some(Local { source: "image", bytes, sig: Err(String::new()), dev: None })
}

/// True when a TOML text has no settings: only blank lines and comments.
pub fn only_comments(text: &str) -> bool {
    text.lines()
        .map(|l| l.trim_start_matches('\u{feff}').trim())
        .all(|l| l.is_empty() || l.starts_with('#'))
}

pub enum Found {
    Valid {
        source: String,
        config: Box<NodeConfig>,
        text: String,
        /// The device, for a KILNCFG volume.
        dev: Option<String>,
    },
    Invalid {
        source: String,
        reason: String,
        text: String,
    },
    /// Not signed (or not validly) by the key in /etc/kiln/config.pub: never
    /// used.
    Unsigned {
        source: String,
        reason: String,
    },
    /// Fetched over plain http:// but holds secrets (`keys`): anyone on the
    /// network could have read them. Never used, unless the image opted out
    /// ([`INSECURE_HTTP_SECRETS`]).
    Insecure {
        url: String,
        keys: Vec<&'static str>,
    },
    /// The URL could not be fetched; worth retrying. `error` says what
    /// happened, `hint` what to do.
    Unreachable {
        url: String,
        error: String,
        hint: String,
    },
    Missing,
}

/// Whether configs from outside the image must be signed, and by what key.
#[derive(Debug, Clone, PartialEq)]
pub enum Trust {
    /// No /etc/kiln/config.pub: any config is taken.
    Any,
    Key(PublicKey),
    /// The file is there but unreadable or not a key: refuse everything
    /// rather than trust anything.
    Broken(String),
}

impl Trust {
    pub fn read() -> Trust {
        match std::fs::read_to_string(CONFIG_KEY) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Trust::Any,
            Err(e) => Trust::Broken(format!("reading {CONFIG_KEY}: {e}")),
            Ok(t) => Trust::from_text(&t),
        }
    }

    pub fn from_text(text: &str) -> Trust {
        match PublicKey::from_file(text) {
            Ok(k) => Trust::Key(k),
            Err(e) => Trust::Broken(format!(
                "{CONFIG_KEY} is not a minisign public key ({e}); the image is damaged: rebuild it"
            )),
        }
    }

    /// Checks `data` against its signature, when signatures are required.
    /// `sig` is the `.minisig` text, or why there is none and what to do.
    /// Ok holds a note for the console.
    pub fn check(
        &self,
        data: &[u8],
        sig: Result<String, String>,
    ) -> Result<Option<String>, String> {
        let key = match self {
            Trust::Any => return Ok(None),
            Trust::Broken(why) => return Err(why.clone()),
            Trust::Key(k) => k,
        };
        let sig = sig?;
        match key.verify(data, &sig) {
            Ok(comment) => Ok(Some(format!("signed by key {} ({comment})", key.key_id()))),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Loads the first local source (fw_cfg, KILNCFG volume, ESP, image).
/// Only the image's own config needs no signature.
pub fn load(trust: &Trust) -> Found {
    let Some(local) = first_local() else {
        return Found::Missing;
    };
    if local.source != "image" {
        if let Err(reason) = trust.check(&local.bytes, local.sig) {
            return Found::Unsigned {
                source: local.source.into(),
                reason,
            };
        }
    }
    let location = local.dev.as_deref().map(|d| format!("{d}: ")).unwrap_or_default();
    let mut found = parse(local.source, String::from_utf8_lossy(&local.bytes).into_owned(), &location);
    if let Found::Valid { dev, .. } = &mut found {
        *dev = local.dev;
    }
    found
}

fn parse(source: &str, text: String, location: &str) -> Found {
    match config::parse(&text) {
        Ok(c) => Found::Valid {
            source: source.into(),
            config: Box::new(c),
            text,
            dev: None,
        },
        Err(e) => Found::Invalid {
            reason: format!("{location}{e}"),
            source: source.into(),
            text,
        },
    }
}

/// `kiln.config=` from a kernel cmdline, when set and not empty.
pub fn cmdline_url(cmdline: &str) -> Option<String> {
    // The last one wins, as the kernel does with repeated parameters.
    crate::cmdline::words(cmdline)
        .into_iter()
        .rev()
        .find_map(|w| {
            w.strip_prefix(CMDLINE_PARAM)
                .and_then(|r| r.strip_prefix('='))
                .map(str::to_string)
        })
        .filter(|u| !u.trim().is_empty())
}

/// What `${…}` in the URL can stand for.
#[derive(Debug, Clone, Default)]
pub struct Vars {
    /// The MAC of the interface that got the DHCP lease.
    pub mac: Option<[u8; 6]>,
    /// The DMI product UUID, lowercase.
    pub uuid: Option<String>,
}

pub fn read_uuid() -> Option<String> {
    let s = std::fs::read_to_string(DMI_UUID).ok()?;
    let s = s.trim().to_ascii_lowercase();
    (!s.is_empty()).then_some(s)
}

/// Substitutes `${mac}` (52:54:00:12:34:56), `${mac:hexhyp}`
/// (52-54-00-12-34-56), `${mac:hexraw}` (525400123456) and `${uuid}`. An
/// unknown or unavailable variable is an error naming it.
pub fn expand(template: &str, vars: &Vars) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let Some(end) = after.find('}') else {
            return Err(format!(
                "{CMDLINE_PARAM}={template}: `${{` without a closing `}}`"
            ));
        };
        let name = &after[..end];
        let mac = |sep: &str| {
            vars.mac.map(|m| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(sep)).ok_or_else(|| {
                format!("{CMDLINE_PARAM}={template}: no network interface got a DHCP lease, so there is no MAC for ${{{name}}}; check the cable and the DHCP server")
            })
        };
        let value = match name {
            "mac" | "mac:hex" => mac(":")?,
            "mac:hexhyp" => mac("-")?,
            "mac:hexraw" => mac("")?,
            "uuid" => vars.uuid.clone().ok_or_else(|| format!("{CMDLINE_PARAM}={template}: this machine has no DMI product UUID ({DMI_UUID}) for ${{uuid}}; use ${{mac}}"))?,
            other => {
                return Err(format!(
                    "{CMDLINE_PARAM}={template}: unknown variable ${{{other}}}; kiln-init substitutes ${{mac}}, ${{mac:hexhyp}}, ${{mac:hexraw}} and ${{uuid}}"
                ))
            }
        };
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Where a config URL's signature is: `.minisig` appended to the path,
/// before any query.
pub fn signature_url(url: &str) -> String {
    match url.split_once('?') {
        Some((path, query)) => format!("{path}.minisig?{query}"),
        None => format!("{url}.minisig"),
    }
}

/// The wait before retry number `attempt` (0-based): 1, 2, 4, 8, 16, then
/// 30 s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_secs([1, 2, 4, 8, 16, 30][attempt.min(5) as usize])
}

/// The network settings used to fetch the config: DHCPv4 on every link with
/// carrier, as with a node.toml that sets nothing.
pub fn dhcp_everywhere() -> Option<NodeConfig> {
    // An empty [network] table, so its serde defaults (a 30 s wait) apply.
    config::parse("role = \"single\"\n[network]\n").ok()
}

/// The `kiln.config=URL` source, with the network brought up to reach it.
pub struct UrlSource {
    pub template: String,
    net: Option<NetState>,
    uuid: Option<String>,
    pub opts: fetch::Options,
    /// After `take_network`: the node runs the network now; fetch over it
    /// with the MAC that got the lease.
    handed_over: Option<Option<[u8; 6]>>,
}

impl UrlSource {
    /// From /proc/cmdline; None when there is no `kiln.config=`.
    pub fn from_cmdline() -> Option<UrlSource> {
        let template = cmdline_url(&sys::read("/proc/cmdline").unwrap_or_default())?;
        Some(UrlSource {
            template,
            net: None,
            uuid: read_uuid(),
            opts: fetch::Options::default(),
            handed_over: None,
        })
    }

    /// Brings up DHCP (again, while no address was had).
    fn ensure_network(&mut self) {
        if self.handed_over.is_some() || self.net.as_ref().is_some_and(|n| !n.addresses.is_empty()) {
            return;
        }
        let Some(cfg) = dhcp_everywhere() else { return };
        let hostname = host::hostname(&cfg, netup::first_mac());
        let net = netup::bring_up(&cfg, &hostname);
        if let Err(e) = host::write_resolv_conf(&net.dns, &net.search) {
            console::error(&format!("resolv.conf: {e}"));
        }
        self.net = Some(net);
    }

    fn vars(&self) -> Vars {
        let leased = self
            .net
            .as_ref()
            .and_then(|n| n.held.first())
            .and_then(|h| h.link.mac)
            .or(self.handed_over.flatten());
        Vars {
            mac: leased.or_else(netup::first_mac),
            uuid: self.uuid.clone(),
        }
    }

    /// One attempt: network, substitution, fetch, signature, parse.
    pub fn load(&mut self, trust: &Trust) -> Found {
        self.ensure_network();
        let url = match expand(&self.template, &self.vars()) {
            Ok(u) => u,
            Err(e) => return Found::Unreachable {
                url: self.template.clone(),
                error: e,
                hint:
                    "fix kiln.config= on the kernel command line (in boot.ipxe or the boot entry)"
                        .into(),
            },
        };
        if url.get(..8).is_some_and(|s| s.eq_ignore_ascii_case("https://")) {
            // Certificates need the time: set it first when DHCP names NTP
            // servers and nothing has set it yet.
            if let Some(net) = &self.net {
                super::clock::sync_for_tls(net, Duration::from_secs(5));
            }
        }
        let body = match fetch::get(&url, &self.opts) {
            Ok(b) => b,
            Err(e) => {
                return Found::Unreachable {
                    url,
                    error: e.to_string(),
                    hint: e.hint().into(),
                }
            }
        };
        let mut note = None;
        if *trust != Trust::Any {
            let sig_url = signature_url(&url);
            let sig = match fetch::get(&sig_url, &self.opts) {
                Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
                Err(
                    e @ fetch::FetchError::Status {
                        code: 404 | 410, ..
                    },
                ) => Err(format!(
                    "there is no {sig_url} ({e}); {SIGN_HOW}, which writes the .minisig to serve beside it"
                )),
                Err(e) => {
                    return Found::Unreachable {
                        url: sig_url,
                        error: e.to_string(),
                        hint: e.hint().into(),
                    }
                }
            };
            let missing = sig.is_err();
            match trust.check(&body, sig) {
                Ok(n) => note = n,
                Err(reason) => {
                    let reason = if missing {
                        reason
                    } else {
                        format!("{url}: {reason}")
                    };
                    return Found::Unsigned {
                        source: "url".into(),
                        reason,
                    };
                }
            }
        }
        let plain = !url.get(..8).is_some_and(|s| s.eq_ignore_ascii_case("https://"));
        if plain {
            let keys = config::secret_keys(&String::from_utf8_lossy(&body));
            if !keys.is_empty() {
                if !std::path::Path::new(INSECURE_HTTP_SECRETS).exists() {
                    return Found::Insecure { url, keys };
                }
                console::warn(&format!(
                    "node config {url} holds {} and came over plain http://; used because this image was built with node.insecure_http_secrets = true",
                    keys.join(" and ")
                ));
            }
        }
        let found = parse(
            "url",
            String::from_utf8_lossy(&body).into_owned(),
            &format!("{url}: "),
        );
        if let Found::Valid { .. } = found {
            console::info(&format!(
                "node config from {url} ({} bytes{})",
                body.len(),
                note.map(|n| format!(", {n}")).unwrap_or_default()
            ));
        }
        found
    }

    /// The network the config was fetched over, kept for the node (its DHCP
    /// leases are renewed as usual). The config's DNS servers and search
    /// domains are added; its interface settings are not applied again.
    /// The source stays usable to fetch the config again (over the node's
    /// network, without DHCP of its own).
    pub fn take_network(&mut self, cfg: &NodeConfig) -> Option<NetState> {
        let mut net = self.net.take()?;
        self.handed_over = Some(net.held.first().and_then(|h| h.link.mac));
        if !cfg.network.interfaces.is_empty() {
            console::warn("network: the node config sets [[network.interfaces]], but with kiln.config=URL the node keeps the DHCP setup it fetched the config over; those settings are not applied");
        }
        for d in &cfg.network.dns {
            if !net.dns.contains(d) {
                net.dns.insert(0, *d);
            }
        }
        for s in &cfg.network.search {
            if !net.search.contains(s) {
                net.search.push(s.clone());
            }
        }
        Some(net)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn commented_template_counts_as_absent() {
        assert!(only_comments(""));
        assert!(only_comments(
            "# node.toml: uncomment to configure\n\n  # role = \"worker\"\r\n\t\n"
        ));
        assert!(only_comments("\u{feff}# with a BOM\n"));
        assert!(!only_comments("# header\nrole = \"single\"\n"));
        assert!(!only_comments("[network]"));
    }

    #[test]
    fn url_from_the_cmdline() {
        assert_eq!(
            cmdline_url(
                "console=ttyS0 kiln.config=http://10.0.2.2:8080/configs/${mac}.toml quiet\n"
            )
            .as_deref(),
            Some("http://10.0.2.2:8080/configs/${mac}.toml")
        );
        assert_eq!(
            cmdline_url("kiln.config=\"http://h/a b\"").as_deref(),
            Some("http://h/a b")
        );
        assert_eq!(
            cmdline_url("kiln.config=http://a kiln.config=http://b").as_deref(),
            Some("http://b")
        );
        assert_eq!(
            cmdline_url("kiln.configx=http://a kiln.config= console=ttyS0"),
            None
        );
        assert_eq!(cmdline_url("root=/dev/sda"), None);
    }

    #[test]
    fn substitution() {
        let v = Vars {
            mac: Some([0x52, 0x54, 0x00, 0x12, 0xAB, 0x56]),
            uuid: Some("4c4c4544-0042".into()),
        };
        assert_eq!(
            expand("http://h/configs/${mac}.toml", &v).unwrap(),
            "http://h/configs/52:54:00:12:ab:56.toml"
        );
        assert_eq!(
            expand("http://h/${mac:hexhyp}/${uuid}?m=${mac:hexraw}", &v).unwrap(),
            "http://h/52-54-00-12-ab-56/4c4c4544-0042?m=52540012ab56"
        );
        assert_eq!(
            expand("http://h/plain.toml", &v).unwrap(),
            "http://h/plain.toml"
        );
        assert_eq!(expand("$mac {mac} $", &v).unwrap(), "$mac {mac} $");
        let e = expand("http://h/${serial}", &v).unwrap_err();
        assert!(
            e.contains("unknown variable ${serial}") && e.contains("${mac:hexhyp}"),
            "{e}"
        );
        assert!(expand("http://h/${mac", &v)
            .unwrap_err()
            .contains("without a closing"));
        let none = Vars::default();
        assert!(expand("http://h/${mac}", &none)
            .unwrap_err()
            .contains("DHCP lease"));
        assert!(expand("http://h/${uuid}", &none)
            .unwrap_err()
            .contains("product UUID"));
    }

    #[test]
    fn signature_beside_the_config() {
        assert_eq!(
            signature_url("http://h/c/x.toml"),
            "http://h/c/x.toml.minisig"
        );
        assert_eq!(
            signature_url("http://h/c?mac=1"),
            "http://h/c.minisig?mac=1"
        );
    }

    #[test]
    fn after_handing_over_the_network_the_leased_mac_is_kept() {
        let mut u = UrlSource { template: "http://h/${mac:hexraw}".into(), net: None, uuid: None, opts: fetch::Options::default(), handed_over: Some(Some([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc])) };
        assert_eq!(expand(&u.template, &u.vars()).unwrap(), "http://h/525400aabbcc");
        // No DHCP of its own any more: the node's network is used as it is.
        u.ensure_network();
        assert!(u.net.is_none());
    }

    #[test]
    fn backoff_caps_at_30_s() {
        let s: Vec<u64> = (0..8).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(s, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(backoff(u32::MAX).as_secs(), 30);
    }

    #[test]
    fn fetch_network_is_dhcp_everywhere() {
        let c = dhcp_everywhere().unwrap();
        assert!(c.network.interfaces.is_empty());
        assert_eq!(c.network.wait_seconds, 30);
    }

    use kiln_contract::minisign::vectors::{VEC_DATA as DATA, VEC_PUB as PUB, VEC_SIG as SIG};

    #[test]
    fn trust_decides() {
        assert_eq!(Trust::Any.check(DATA, Err("none".into())), Ok(None));
        let t = Trust::from_text(PUB);
        assert!(t
            .check(DATA, Ok(SIG.into()))
            .unwrap()
            .unwrap()
            .contains("kiln test vector"));
        let e = t
            .check(
                DATA,
                Err("there is no /boot/node.toml.minisig; sign".into()),
            )
            .unwrap_err();
        assert!(e == "there is no /boot/node.toml.minisig; sign", "{e}");
        let e = t.check(b"role = \"worker\"\n", Ok(SIG.into())).unwrap_err();
        assert!(e.contains("does not match"), "{e}");
        let broken = Trust::from_text("not a key");
        assert!(matches!(broken, Trust::Broken(_)));
        assert!(broken
            .check(DATA, Ok(SIG.into()))
            .unwrap_err()
            .contains("rebuild"));
    }

    proptest! {
        #[test]
        fn expand_never_panics(t in "\\PC{0,60}|(\\$\\{[a-z:]{0,10}\\}?[ -~]{0,5}){0,4}") {
            let v = Vars { mac: Some([1, 2, 3, 4, 5, 6]), uuid: Some("u".into()) };
            let _ = expand(&t, &v);
            let _ = expand(&t, &Vars::default());
            let _ = cmdline_url(&t);
        }
    }
}
