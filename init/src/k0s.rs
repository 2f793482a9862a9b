//! Role → k0s command line and environment, as K0S-CONTRACT.md says.

use crate::config::{NodeConfig, Role};

pub const BINARY: &str = "/usr/bin/k0s";
pub const DATA_DIR: &str = "/var/lib/k0s";
pub const CONFIG_PATH: &str = "/etc/k0s/k0s.yaml";
pub const TOKEN_PATH: &str = "/etc/k0s/token";
/// What a read-only root cannot run: autopilot swaps the k0s binary in place.
pub const DEFAULT_DISABLED: &[&str] = &["autopilot", "update-prober"];
/// As the unit `k0s install` writes (LimitNOFILE=999999).
pub const NOFILE: u64 = 999_999;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The token file to write (mode 0600) before starting, with its content.
    pub token_file: Option<(String, String)>,
    /// The cluster config to write before starting.
    pub config_file: Option<(String, String)>,
}

/// Builds the command line for a node. `armv7` adds what etcd needs there.
pub fn invocation(cfg: &NodeConfig, armv7: bool) -> Invocation {
    let k = &cfg.k0s;
    let mut args: Vec<String> = Vec::new();
    let mut env: Vec<(String, String)> = Vec::new();
    let token_path = match (&k.token, &k.token_file) {
        (Some(_), _) => Some(TOKEN_PATH.to_string()),
        (None, Some(f)) => Some(f.clone()),
        (None, None) => None,
    };
    let token_file = k.token.as_ref().map(|t| (TOKEN_PATH.to_string(), format!("{}\n", t.trim())));
    let mut config_file = None;
    match cfg.role {
        Role::Worker => args.push("worker".into()),
        _ => args.push("controller".into()),
    }
    match cfg.role {
        Role::Single => args.push("--single".into()),
        Role::ControllerWorker => {
            args.push("--enable-worker".into());
            if k.no_taints {
                args.push("--no-taints".into());
            }
        }
        _ => {}
    }
    if cfg.role.runs_control_plane() {
        if let Some(c) = &k.config {
            args.push(format!("--config={CONFIG_PATH}"));
            config_file = Some((CONFIG_PATH.to_string(), c.clone()));
        }
    }
    args.push(format!("--data-dir={DATA_DIR}"));
    if let Some(t) = &token_path {
        args.push(format!("--token-file={t}"));
    }
    if cfg.role.runs_control_plane() {
        let disabled: Vec<String> = match &k.disable_components {
            Some(v) => v.clone(),
            None => DEFAULT_DISABLED.iter().map(|s| s.to_string()).collect(),
        };
        if !disabled.is_empty() {
            args.push(format!("--disable-components={}", disabled.join(",")));
        }
    }
    if !k.labels.is_empty() {
        let l: Vec<String> = k.labels.iter().map(|(a, b)| format!("{a}={b}")).collect();
        args.push(format!("--labels={}", l.join(",")));
    }
    if !k.taints.is_empty() && cfg.role.runs_workloads() {
        args.push(format!("--taints={}", k.taints.join(",")));
    }
    if let Some(a) = &k.kubelet_extra_args {
        if cfg.role.runs_workloads() {
            args.push(format!("--kubelet-extra-args={a}"));
        }
    }
    args.extend(k.extra_args.iter().cloned());
    if armv7 && cfg.role.runs_control_plane() {
        env.push(("ETCD_UNSUPPORTED_ARCH".into(), "arm".into()));
    }
    for (a, b) in &k.env {
        env.retain(|(x, _)| x != a);
        env.push((a.clone(), b.clone()));
    }
    Invocation { args, env, token_file, config_file }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    #[test]
    fn single() {
        let i = invocation(&parse("role = \"single\"").unwrap(), false);
        assert_eq!(i.args, ["controller", "--single", "--data-dir=/var/lib/k0s", "--disable-components=autopilot,update-prober"]);
        assert!(i.env.is_empty());
    }

    #[test]
    fn worker_with_token() {
        let c = parse("role = \"worker\"\n[k0s]\ntoken = \"abc=\"\nlabels = { zone = \"a\" }\nkubelet_extra_args = \"--max-pods=50\"\n").unwrap();
        let i = invocation(&c, true);
        assert_eq!(i.args, ["worker", "--data-dir=/var/lib/k0s", "--token-file=/etc/k0s/token", "--labels=zone=a", "--kubelet-extra-args=--max-pods=50"]);
        assert_eq!(i.token_file, Some((TOKEN_PATH.into(), "abc=\n".into())));
        assert!(i.env.is_empty(), "etcd env only on controllers");
    }

    #[test]
    fn controller_worker_armv7() {
        let c = parse("role = \"controller+worker\"\n[k0s]\nno_taints = true\ndisable_components = []\nenv = { CONTAINERD_HTTPS_PROXY = \"http://p:3128\" }\n").unwrap();
        let i = invocation(&c, true);
        assert_eq!(i.args, ["controller", "--enable-worker", "--no-taints", "--data-dir=/var/lib/k0s"]);
        assert_eq!(i.env, [("ETCD_UNSUPPORTED_ARCH".to_string(), "arm".to_string()), ("CONTAINERD_HTTPS_PROXY".into(), "http://p:3128".into())]);
    }
}
