//! Role → k0s command line, environment, limits and restart timing, as
//! K0S-CONTRACT.md says.

use kiln_contract::config::{NodeConfig, Role};
use std::time::Duration;

pub const BINARY: &str = "/usr/bin/k0s";
pub const DATA_DIR: &str = "/var/lib/k0s";
pub const CONFIG_PATH: &str = "/etc/k0s/k0s.yaml";
pub const TOKEN_PATH: &str = "/etc/k0s/token";
/// What a read-only root cannot run: autopilot swaps the k0s binary in place.
pub const DEFAULT_DISABLED: &[&str] = &["autopilot", "update-prober"];
/// As the unit `k0s install` writes (LimitNOFILE=999999).
pub const NOFILE: u64 = 999_999;
/// The unit's RestartSec=10: the first restart waits this long.
pub const RESTART_SEC: Duration = Duration::from_secs(10);
/// Crashing again and again doubles the wait, up to this.
pub const RESTART_MAX: Duration = Duration::from_secs(60);

/// A resource limit the payload gets, like the k0s unit's `Limit*=` lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// LimitNOFILE=999999.
    Nofile,
    /// LimitCORE=infinity.
    Core,
    /// TasksMax=infinity has no rlimit; this keeps a per-user process cap
    /// from standing in for it.
    Nproc,
}

/// Each limit, soft and hard alike; `None` is unlimited (RLIM_INFINITY).
pub const LIMITS: &[(Resource, Option<u64>)] = &[(Resource::Nofile, Some(NOFILE)), (Resource::Core, None), (Resource::Nproc, None)];

/// How long to wait before starting k0s again after its `failures`-th
/// exit in a row (1 for the first): 10 s like the unit, doubling to 60 s.
pub fn restart_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    RESTART_SEC.saturating_mul(1 << doublings).min(RESTART_MAX)
}

/// Where k0s reads its join token from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// `k0s.token`: kiln-init writes it to `path` (mode 0600) first.
    Write { path: String, content: String },
    /// `k0s.token_file`: a file already on the node.
    Existing(String),
}

impl Token {
    pub fn path(&self) -> &str {
        match self {
            Token::Write { path, .. } | Token::Existing(path) => path,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub args: Vec<String>,
    /// Added to a clean environment (PATH and HOME are set by the supervisor).
    pub env: Vec<(String, String)>,
    pub token: Option<Token>,
    /// The cluster config to write before starting.
    pub config_file: Option<(String, String)>,
}

/// Builds the command line for a node. `armv7` adds what etcd needs there.
pub fn invocation(cfg: &NodeConfig, armv7: bool) -> Invocation {
    let k = &cfg.k0s;
    let role = cfg.role;
    let mut args: Vec<String> = Vec::new();
    let mut env: Vec<(String, String)> = Vec::new();
    let token = match (&k.token, &k.token_file) {
        (Some(t), _) => Some(Token::Write { path: TOKEN_PATH.to_string(), content: format!("{}\n", t.trim()) }),
        (None, Some(f)) => Some(Token::Existing(f.clone())),
        (None, None) => None,
    };
    let mut config_file = None;
    args.push(if role == Role::Worker { "worker" } else { "controller" }.into());
    match role {
        // kine storage, no konnectivity, and a kubelet without the taint.
        Role::Single => args.push("--single".into()),
        Role::ControllerWorker => {
            args.push("--enable-worker".into());
            if k.no_taints {
                args.push("--no-taints".into());
            }
        }
        Role::Controller | Role::Worker => {}
    }
    if role.runs_control_plane() {
        if let Some(c) = &k.config {
            args.push(format!("--config={CONFIG_PATH}"));
            config_file = Some((CONFIG_PATH.to_string(), c.clone()));
        }
    }
    args.push(format!("--data-dir={DATA_DIR}"));
    // One token source only: never K0S_TOKEN or the positional argument too.
    if let Some(t) = &token {
        args.push(format!("--token-file={}", t.path()));
    }
    if role.runs_control_plane() {
        let disabled: Vec<String> = match &k.disable_components {
            Some(v) => v.clone(),
            None => DEFAULT_DISABLED.iter().map(|s| s.to_string()).collect(),
        };
        if !disabled.is_empty() {
            args.push(format!("--disable-components={}", disabled.join(",")));
        }
    }
    // Node settings go to the kubelet; a controller without one has no Node.
    if role.runs_workloads() {
        if !k.labels.is_empty() {
            let l: Vec<String> = k.labels.iter().map(|(a, b)| format!("{a}={b}")).collect();
            args.push(format!("--labels={}", l.join(",")));
        }
        if !k.taints.is_empty() {
            args.push(format!("--taints={}", k.taints.join(",")));
        }
        if let Some(a) = &k.kubelet_extra_args {
            args.push(format!("--kubelet-extra-args={a}"));
        }
    }
    args.extend(k.extra_args.iter().cloned());
    // etcd refuses 32-bit ARM without it; a worker runs no etcd.
    if armv7 && role.runs_control_plane() {
        env.push(("ETCD_UNSUPPORTED_ARCH".into(), "arm".into()));
    }
    // Passed as given: k0s hands `<COMPONENT>_X` to that component as `X`.
    for (a, b) in &k.env {
        env.retain(|(x, _)| x != a);
        env.push((a.clone(), b.clone()));
    }
    Invocation { args, env, token, config_file }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_contract::config::parse;

    fn inv(toml: &str, armv7: bool) -> Invocation {
        invocation(&parse(toml).unwrap_or_else(|e| panic!("{e}")), armv7)
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn single() {
        let i = inv("role = \"single\"", false);
        assert_eq!(i.args, ["controller", "--single", "--data-dir=/var/lib/k0s", "--disable-components=autopilot,update-prober"]);
        assert!(i.env.is_empty());
        assert_eq!(i.token, None);
        assert_eq!(i.config_file, None);
        // kine, not etcd, but a ClusterConfig may still ask for etcd.
        assert_eq!(inv("role = \"single\"", true).env, pairs(&[("ETCD_UNSUPPORTED_ARCH", "arm")]));
    }

    #[test]
    fn single_with_node_settings() {
        let i = inv("role = \"single\"\n[k0s]\nlabels = { a = \"b\" }\ntaints = [\"k=v:NoSchedule\"]\nkubelet_extra_args = \"--max-pods=20\"\n", false);
        assert_eq!(
            i.args,
            ["controller", "--single", "--data-dir=/var/lib/k0s", "--disable-components=autopilot,update-prober", "--labels=a=b", "--taints=k=v:NoSchedule", "--kubelet-extra-args=--max-pods=20"]
        );
    }

    #[test]
    fn worker_with_token() {
        let c = "role = \"worker\"\n[k0s]\ntoken = \"abc=\"\nlabels = { zone = \"a\", rack = \"r1\" }\ntaints = [\"dedicated=edge:NoSchedule\"]\nkubelet_extra_args = \"--max-pods=50 --node-ip=10.0.0.5\"\nenv = { CONTAINERD_HTTPS_PROXY = \"http://p:3128\" }\n";
        let i = inv(c, true);
        assert_eq!(
            i.args,
            [
                "worker",
                "--data-dir=/var/lib/k0s",
                "--token-file=/etc/k0s/token",
                "--labels=rack=r1,zone=a",
                "--taints=dedicated=edge:NoSchedule",
                "--kubelet-extra-args=--max-pods=50 --node-ip=10.0.0.5"
            ]
        );
        assert_eq!(i.token, Some(Token::Write { path: TOKEN_PATH.into(), content: "abc=\n".into() }));
        assert_eq!(i.env, pairs(&[("CONTAINERD_HTTPS_PROXY", "http://p:3128")]), "etcd env only on controllers");
        assert!(!i.args.iter().any(|a| a.starts_with("--disable-components") || a.starts_with("--config")), "worker flags only");
    }

    #[test]
    fn worker_with_token_file_on_the_node() {
        let i = inv("role = \"worker\"\n[k0s]\ntoken_file = \"/var/lib/kiln/join-token\"\n", false);
        assert_eq!(i.args, ["worker", "--data-dir=/var/lib/k0s", "--token-file=/var/lib/kiln/join-token"]);
        assert_eq!(i.token, Some(Token::Existing("/var/lib/kiln/join-token".into())));
    }

    #[test]
    fn controller_joining_with_config() {
        let c = "role = \"controller\"\n[k0s]\ntoken = \"dG9r\"\nconfig = \"apiVersion: k0s.k0sproject.io/v1beta1\\nkind: ClusterConfig\\n\"\ndisable_components = [\"metrics-server\"]\nextra_args = [\"--debug\"]\n";
        let i = inv(c, true);
        assert_eq!(i.args, ["controller", "--config=/etc/k0s/k0s.yaml", "--data-dir=/var/lib/k0s", "--token-file=/etc/k0s/token", "--disable-components=metrics-server", "--debug"]);
        assert_eq!(i.config_file.as_ref().map(|(p, _)| p.as_str()), Some(CONFIG_PATH));
        assert!(i.config_file.unwrap().1.contains("kind: ClusterConfig"));
        assert_eq!(i.env, pairs(&[("ETCD_UNSUPPORTED_ARCH", "arm")]));
        assert!(inv("role = \"controller\"", false).env.is_empty(), "only armv7 needs it");
    }

    #[test]
    fn controller_worker_armv7() {
        let c = "role = \"controller+worker\"\n[k0s]\nno_taints = true\ndisable_components = []\nenv = { CONTAINERD_HTTPS_PROXY = \"http://p:3128\", KUBELET_X = \"1\" }\n";
        let i = inv(c, true);
        assert_eq!(i.args, ["controller", "--enable-worker", "--no-taints", "--data-dir=/var/lib/k0s"]);
        assert_eq!(i.env, pairs(&[("ETCD_UNSUPPORTED_ARCH", "arm"), ("CONTAINERD_HTTPS_PROXY", "http://p:3128"), ("KUBELET_X", "1")]));
        // The config's env wins over kiln's.
        let i = inv("role = \"controller+worker\"\n[k0s]\nenv = { ETCD_UNSUPPORTED_ARCH = \"arm64\" }\n", true);
        assert_eq!(i.env, pairs(&[("ETCD_UNSUPPORTED_ARCH", "arm64")]));
        assert_eq!(inv("role = \"controller+worker\"", false).args, ["controller", "--enable-worker", "--data-dir=/var/lib/k0s", "--disable-components=autopilot,update-prober"]);
    }

    #[test]
    fn limits_match_the_unit() {
        assert_eq!(LIMITS.iter().find(|(r, _)| *r == Resource::Nofile), Some(&(Resource::Nofile, Some(999_999))));
        assert!(LIMITS.contains(&(Resource::Core, None)));
        assert!(LIMITS.contains(&(Resource::Nproc, None)));
    }

    #[test]
    fn restart_timing() {
        let secs: Vec<u64> = (0..8).map(|n| restart_delay(n).as_secs()).collect();
        assert_eq!(secs, [10, 10, 20, 40, 60, 60, 60, 60]);
        assert_eq!(restart_delay(u32::MAX), RESTART_MAX);
    }
}
