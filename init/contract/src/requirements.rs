//! The kernel requirement table for k0s and for kiln itself.
//!
//! The builder checks a kernel's `.config` against it at build time, and
//! kiln-init checks `/proc/config.gz` against it at boot: one table, two
//! places. The k0s entries follow what `k0s sysinfo` checks (see
//! K0S-CONTRACT.md).

use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// The node cannot work without it.
    Required,
    /// k0s warns; some features will not work.
    Warn,
    /// Reported only; network providers and kube-proxy modes use these.
    Report,
}

/// Which nodes need an option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every node, any role.
    Any,
    /// Nodes that run the kubelet.
    Worker,
}

#[derive(Debug, Clone, Copy)]
pub struct Requirement {
    /// Option names without `CONFIG_`; any one of them satisfies it.
    pub options: &'static [&'static str],
    pub level: Level,
    pub scope: Scope,
    pub why: &'static str,
}

const fn req(options: &'static [&'static str], level: Level, scope: Scope, why: &'static str) -> Requirement {
    Requirement { options, level, scope, why }
}

use Level::*;
use Scope::*;

pub const TABLE: &[Requirement] = &[
    // kiln-init itself.
    req(&["DEVTMPFS"], Required, Any, "kiln-init mounts devtmpfs on /dev"),
    req(&["TMPFS"], Required, Any, "/run, /tmp and /etc are tmpfs"),
    req(&["PROC_FS"], Required, Any, "proc"),
    req(&["SYSFS"], Required, Any, "sysfs"),
    req(&["BLK_DEV_INITRD"], Required, Any, "the initramfs"),
    req(&["UNIX"], Required, Any, "unix sockets (k0s status socket, containerd)"),
    req(&["IKCONFIG_PROC"], Required, Any, "preflight reads /proc/config.gz"),
    req(&["CGROUPS"], Required, Any, "kiln-init supervises k0s in its own cgroup"),
    req(&["CGROUP_FREEZER"], Warn, Any, "cgroup.freeze; kubelet and runc use it"),
    req(&["INPUT_EVDEV"], Warn, Any, "the power button reaches kiln-init as KEY_POWER"),
    // On a 32-bit kernel (armv7), glibc's armhf ABI and Go's linux/arm
    // runtime (k0s) still make the 32-bit time syscalls: without them
    // nanosleep and futex waits fail with ENOSYS.
    req(&["64BIT", "COMPAT_32BIT_TIME"], Required, Any, "32-bit time syscalls for 32-bit userland (glibc armhf, Go linux/arm)"),
    // k0s sysinfo, any role.
    req(&["NET"], Required, Any, "networking"),
    req(&["INET"], Required, Any, "IPv4"),
    // k0s sysinfo, worker.
    req(&["CGROUP_SCHED"], Required, Worker, "cpu controller"),
    req(&["FAIR_GROUP_SCHED"], Required, Worker, "cpu shares"),
    req(&["MEMCG"], Required, Worker, "memory controller"),
    req(&["CGROUP_PIDS"], Required, Worker, "pids controller"),
    req(&["CPUSETS"], Required, Worker, "cpuset controller"),
    req(&["CGROUP_BPF"], Required, Worker, "the devices controller on cgroup v2"),
    req(&["BPF_SYSCALL"], Required, Worker, "the devices controller on cgroup v2"),
    req(&["NAMESPACES"], Required, Worker, "containers"),
    req(&["UTS_NS"], Required, Worker, "containers"),
    req(&["IPC_NS"], Required, Worker, "containers"),
    req(&["PID_NS"], Required, Worker, "containers"),
    req(&["NET_NS"], Required, Worker, "pod networking"),
    req(&["NETFILTER"], Required, Worker, "kube-proxy"),
    req(&["NF_CONNTRACK"], Required, Worker, "kube-proxy"),
    req(&["NETFILTER_XTABLES"], Required, Worker, "iptables"),
    req(&["NETFILTER_XT_TARGET_REDIRECT", "IP_NF_TARGET_REDIRECT"], Required, Worker, "kube-proxy"),
    req(&["NETFILTER_XT_MATCH_COMMENT"], Required, Worker, "kube-proxy rules"),
    req(&["EXT4_FS"], Required, Worker, "the data partition"),
    req(&["OVERLAY_FS"], Required, Worker, "containerd's overlayfs snapshotter"),
    req(&["CFS_BANDWIDTH"], Warn, Worker, "CPU limits"),
    req(&["BLK_CGROUP"], Warn, Worker, "I/O accounting"),
    req(&["NETFILTER_ADVANCED"], Warn, Worker, "most xtables matches"),
    req(&["BRIDGE"], Warn, Worker, "CNI bridge"),
    req(&["BRIDGE_NETFILTER"], Warn, Worker, "bridge-nf-call-iptables"),
    req(&["VETH"], Warn, Worker, "pod network interfaces"),
    // Reported, as k0s sysinfo does.
    req(&["IPV6"], Report, Worker, "IPv6"),
    req(&["NETFILTER_NETLINK"], Report, Worker, "netfilter core"),
    req(&["NF_NAT"], Report, Worker, "netfilter core"),
    req(&["NF_REJECT_IPV4"], Report, Worker, "netfilter core"),
    req(&["NETFILTER_XT_MARK"], Report, Worker, "xtables"),
    req(&["NETFILTER_XT_SET"], Report, Worker, "xtables"),
    req(&["NETFILTER_XT_TARGET_MASQUERADE"], Report, Worker, "xtables"),
    req(&["NETFILTER_XT_NAT"], Report, Worker, "xtables"),
    req(&["NETFILTER_XT_MATCH_ADDRTYPE"], Report, Worker, "xtables"),
    req(&["NETFILTER_XT_MATCH_CONNTRACK"], Report, Worker, "xtables"),
    req(&["NETFILTER_XT_MATCH_MULTIPORT"], Report, Worker, "xtables"),
    req(&["NETFILTER_XT_MATCH_RECENT"], Report, Worker, "xtables"),
    req(&["NETFILTER_XT_MATCH_STATISTIC"], Report, Worker, "xtables"),
    req(&["IP_SET"], Report, Worker, "ipset"),
    req(&["IP_SET_HASH_IP"], Report, Worker, "ipset"),
    req(&["IP_SET_HASH_NET"], Report, Worker, "ipset"),
    req(&["IP_VS"], Report, Worker, "IPVS"),
    req(&["IP_VS_NFCT"], Report, Worker, "IPVS"),
    req(&["IP_VS_SH"], Report, Worker, "IPVS"),
    req(&["IP_VS_RR"], Report, Worker, "IPVS"),
    req(&["IP_VS_WRR"], Report, Worker, "IPVS"),
    req(&["IP_NF_IPTABLES"], Report, Worker, "IPv4 netfilter"),
    req(&["IP_NF_FILTER"], Report, Worker, "IPv4 netfilter"),
    req(&["IP_NF_TARGET_REJECT"], Report, Worker, "IPv4 netfilter"),
    req(&["IP_NF_NAT"], Report, Worker, "IPv4 netfilter"),
    req(&["IP_NF_MANGLE"], Report, Worker, "IPv4 netfilter"),
    req(&["IP6_NF_IPTABLES"], Report, Worker, "IPv6 netfilter"),
    req(&["IP6_NF_FILTER"], Report, Worker, "IPv6 netfilter"),
    req(&["IP6_NF_MANGLE"], Report, Worker, "IPv6 netfilter"),
    req(&["IP6_NF_NAT"], Report, Worker, "IPv6 netfilter"),
    req(&["LLC"], Report, Worker, "bridge"),
    req(&["STP"], Report, Worker, "bridge"),
    req(&["VXLAN"], Report, Worker, "kube-router and calico overlay"),
];

/// Where the root carries the kernel's `.config` (`{release}` is `uname
/// -r`), read by preflight when there is no /proc/config.gz. k0s's own
/// checks look there too.
pub const SHIPPED_CONFIG: &str = "/lib/modules/{release}/config";

/// A parsed kernel `.config`: option (without `CONFIG_`) → value.
#[derive(Debug, Clone, Default)]
pub struct KernelConfig {
    pub values: BTreeMap<String, String>,
}

impl KernelConfig {
    pub fn parse(text: &str) -> KernelConfig {
        let mut values = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("CONFIG_") {
                if let Some((k, v)) = rest.split_once('=') {
                    values.insert(k.to_string(), v.to_string());
                }
            }
        }
        KernelConfig { values }
    }

    /// A config the image carries as a file ([`SHIPPED_CONFIG`]), as with a
    /// distro kernel built without IKCONFIG: that file serves what
    /// /proc/config.gz would, so the IKCONFIG requirement holds.
    pub fn shipped(mut self) -> KernelConfig {
        for o in ["IKCONFIG", "IKCONFIG_PROC"] {
            self.values.insert(o.to_string(), "y".to_string());
        }
        self
    }

    /// Built in or as a module.
    pub fn enabled(&self, option: &str) -> bool {
        matches!(self.values.get(option).map(String::as_str), Some("y" | "m"))
    }
}

/// Which parts of the table apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    pub worker: bool,
}

impl Needs {
    pub fn for_role(role: crate::config::Role) -> Needs {
        Needs { worker: role.runs_workloads() }
    }
}

#[derive(Debug, Clone)]
pub struct Finding {
    pub requirement: Requirement,
    pub present: bool,
}

/// The result of checking a config against the table.
#[derive(Debug, Clone)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn missing(&self, level: Level) -> Vec<&'static str> {
        self.findings.iter().filter(|f| !f.present && f.requirement.level == level).map(|f| f.requirement.options[0]).collect()
    }
    pub fn ok(&self) -> bool {
        self.missing(Level::Required).is_empty()
    }
}

pub fn check(cfg: &KernelConfig, needs: Needs) -> Report {
    let findings = TABLE
        .iter()
        .filter(|r| r.scope == Scope::Any || needs.worker)
        .map(|r| Finding { requirement: *r, present: r.options.iter().any(|o| cfg.enabled(o)) })
        .collect();
    Report { findings }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for level in [Required, Warn, Report] {
            let all: Vec<_> = self.findings.iter().filter(|x| x.requirement.level == level).collect();
            let missing: Vec<_> = all.iter().filter(|x| !x.present).collect();
            let name = match level {
                Required => "required",
                Warn => "recommended",
                Report => "optional",
            };
            writeln!(f, "{name}: {}/{} present", all.len() - missing.len(), all.len())?;
            for m in missing {
                let opts: Vec<String> = m.requirement.options.iter().map(|o| format!("CONFIG_{o}")).collect();
                writeln!(f, "  missing {} ({})", opts.join(" or "), m.requirement.why)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alternatives_and_scope() {
        let cfg = KernelConfig::parse("CONFIG_NET=y\nCONFIG_INET=y\nCONFIG_IP_NF_TARGET_REDIRECT=m\n# CONFIG_IPV6 is not set\n");
        let ctl = check(&cfg, Needs { worker: false });
        assert!(ctl.findings.iter().all(|f| f.requirement.scope == Scope::Any));
        assert!(ctl.missing(Required).contains(&"DEVTMPFS"));
        let w = check(&cfg, Needs { worker: true });
        assert!(!w.missing(Required).contains(&"NETFILTER_XT_TARGET_REDIRECT"));
        assert!(w.missing(Report).contains(&"IPV6"));
        assert!(!w.ok());
        assert!(w.to_string().contains("missing CONFIG_DEVTMPFS"));
    }
}
