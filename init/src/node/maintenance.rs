//! Maintenance: the node cannot go on with what it has, says exactly why
//! (a console error and one `maintenance` event per distinct problem), and
//! keeps watching the config sources. It goes on as soon as a config
//! appears that is valid and differs from one that was refused.
//!
//! This file decides what one look at the sources means; mod.rs does the
//! waiting (answering the power button and shutdown signals meanwhile).

use super::sources::{self, Found};
use kiln_contract::config::NodeConfig;

/// A valid config, and where it came from.
pub struct Loaded {
    pub config: NodeConfig,
    pub source: String,
    /// The device, for a KILNCFG volume.
    pub dev: Option<String>,
    pub text: String,
}

/// A config that was valid but could not be used (preflight failed for its
/// role, its install failed): the same text again is not tried again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub text: String,
    pub reason: String,
    /// What to do about it.
    pub hint: String,
}

/// Something to tell the operator while waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Identifies the problem: it is announced again only when this changes.
    pub key: String,
    /// The console error line.
    pub error: String,
    /// The `maintenance` event's reason.
    pub reason: String,
    /// What to do, once, after the error.
    pub hint: Option<String>,
    /// A console error printed on every look, not only once (a URL that
    /// cannot be fetched: each try says so).
    pub every_time: bool,
}

pub enum Verdict {
    Use(Box<Loaded>),
    Wait(Problem),
}

/// What to tell the operator about `found`, or the config to go on with.
pub fn judge(found: Found, refused: Option<&Refused>) -> Verdict {
    match found {
        Found::Valid { source, config, text, dev } => match refused {
            Some(r) if r.text == text => Verdict::Wait(refused_again(r)),
            _ => Verdict::Use(Box::new(Loaded { config: *config, source, dev, text })),
        },
        Found::Invalid { source, reason, text } => Verdict::Wait(Problem {
            key: format!("invalid:{source}:{text}"),
            error: format!("node config from {source} is invalid: {reason}"),
            reason: format!("invalid node config from {source}: {reason}"),
            hint: Some("fix the node config (kiln config check node.toml); waiting for a valid one".into()),
            every_time: false,
        }),
        Found::Unsigned { source, reason } => {
            let msg = format!("node config from {source} is not signed by the key in {}: {reason}", sources::CONFIG_KEY);
            Verdict::Wait(Problem { key: msg.clone(), error: msg.clone(), reason: msg, hint: None, every_time: false })
        }
        Found::Insecure { url, keys } => {
            let keys = keys.join(" and ");
            Verdict::Wait(Problem {
                key: format!("insecure:{url}"),
                error: format!("node config {url} holds secrets ({keys}) but came over plain http://, where anyone on the network can read them; it is not used"),
                reason: format!("node config {url}: secrets ({keys}) over plain http://"),
                hint: Some("serve it over https:// (kiln serve --init-tls DIR, and the CA in node.trust in the profile) and point kiln.config= at it; or, on a network you trust, build the image with node.insecure_http_secrets = true (docs/security.md). Waiting and fetching again".into()),
                every_time: false,
            })
        }
        Found::Unreachable { url, error, hint } => Verdict::Wait(Problem {
            key: format!("node config {url}: {error}"),
            error: format!("node config {url}: {error}; {hint}"),
            reason: format!("node config {url}: {error}"),
            hint: None,
            every_time: true,
        }),
        Found::Missing => Verdict::Wait(Problem {
            key: "missing".into(),
            error: "no node config found (fw_cfg, a KILNCFG volume, the ESP, the image)".into(),
            reason: "no node config found".into(),
            hint: None,
            every_time: false,
        }),
    }
}

/// The problem announced when a config is refused, and again (silently,
/// same key) while the same config is all there is.
pub fn refused_again(r: &Refused) -> Problem {
    Problem {
        key: format!("refused:{}", r.text),
        error: r.reason.clone(),
        reason: r.reason.clone(),
        hint: Some(format!("{}; waiting for a changed node config (the same one is not tried again)", r.hint)),
        every_time: false,
    }
}

/// Remembers the last problem announced.
#[derive(Default)]
pub struct Announcer {
    last: Option<String>,
}

impl Announcer {
    /// True when `p` is new (the caller prints it in full); a repeat only
    /// prints what is meant for every look.
    pub fn is_new(&mut self, p: &Problem) -> bool {
        if self.last.as_deref() == Some(p.key.as_str()) {
            return false;
        }
        self.last = Some(p.key.clone());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(text: &str) -> Found {
        Found::Valid { source: "esp".into(), config: Box::new(kiln_contract::config::parse(text).unwrap()), text: text.into(), dev: None }
    }

    #[test]
    fn a_refused_config_is_not_used_again_but_a_changed_one_is() {
        let worker = "role = \"worker\"\n[k0s]\ntoken = \"abc\"\n";
        let refused = Refused { text: worker.into(), reason: "preflight failed for role worker: missing cgroup controller cpu".into(), hint: "h".into() };
        let Verdict::Wait(p) = judge(valid(worker), Some(&refused)) else { panic!("the refused config was used again") };
        assert_eq!(p, refused_again(&refused));
        assert!(p.reason.contains("preflight failed"), "{p:?}");
        let Verdict::Use(l) = judge(valid("role = \"controller\"\n"), Some(&refused)) else { panic!("a changed config was not used") };
        assert_eq!(l.config.role, kiln_contract::config::Role::Controller);
        assert!(matches!(judge(valid(worker), None), Verdict::Use(_)));
    }

    #[test]
    fn each_problem_is_announced_once() {
        let mut a = Announcer::default();
        let bad = |text: &str| judge(Found::Invalid { source: "kilncfg".into(), reason: "/dev/sda: line 3, key `k0s.lables`: unknown field".into(), text: text.into() }, None);
        let Verdict::Wait(p1) = bad("a") else { panic!() };
        assert!(p1.reason.contains("kilncfg") && p1.reason.contains("line 3") && p1.reason.contains("lables"), "{p1:?}");
        assert!(a.is_new(&p1));
        assert!(!a.is_new(&p1), "the same problem again is quiet");
        let Verdict::Wait(p2) = bad("b") else { panic!() };
        assert!(a.is_new(&p2), "a changed file with the same error is news");
        let Verdict::Wait(m) = judge(Found::Missing, None) else { panic!() };
        assert!(a.is_new(&m));
        assert!(a.is_new(&p1), "and back");
        // A refusal announced when it happens stays quiet while waiting.
        let r = Refused { text: "role = \"single\"\n".into(), reason: "x".into(), hint: "h".into() };
        assert!(a.is_new(&refused_again(&r)));
        let Verdict::Wait(again) = judge(valid("role = \"single\"\n"), Some(&r)) else { panic!() };
        assert!(!a.is_new(&again));
    }

    #[test]
    fn fetch_failures_are_printed_every_time() {
        let Verdict::Wait(p) = judge(Found::Unreachable { url: "http://h/x".into(), error: "connection refused".into(), hint: "start kiln serve".into() }, None) else { panic!() };
        assert!(p.every_time);
        assert_eq!(p.reason, "node config http://h/x: connection refused");
    }

    #[test]
    fn secrets_over_plain_http_are_refused_once_with_the_way_out() {
        let Verdict::Wait(p) = judge(Found::Insecure { url: "http://h/x.toml".into(), keys: vec!["k0s.token"] }, None) else { panic!() };
        assert!(!p.every_time);
        assert!(p.error.contains("http://h/x.toml") && p.error.contains("k0s.token") && p.error.contains("not used"), "{}", p.error);
        let hint = p.hint.unwrap();
        assert!(hint.contains("https://") && hint.contains("node.insecure_http_secrets"), "{hint}");
    }
}
