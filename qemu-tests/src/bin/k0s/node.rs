//! Running like a node: report, then stay up until SIGTERM or SIGINT.
//!
//! The stop signals are blocked from the first instruction and collected
//! with sigtimedwait, so there is no signal handler at all and a signal that
//! arrives during the checks is acted on as soon as they end.

use std::time::{Duration, Instant};

use crate::checks::{self, Held};
use crate::cli::{quote_argv, RunOpts};
use crate::out::{say, Report};

const ALIVE_EVERY: Duration = Duration::from_secs(30);
const EXIT_AFTER_VAR: &str = "KILN_STANDIN_EXIT_AFTER";

fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Blocks SIGTERM and SIGINT in this (only) thread. Children started with
/// std's Command get an empty signal mask back.
pub fn block_stop_signals() {
    let set = stop_signals();
    // SAFETY: plain mask change with a valid set.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Waits up to `timeout` for a stop signal.
fn wait_stop_signal(timeout: Duration) -> Option<libc::c_int> {
    let set = stop_signals();
    // SAFETY: timespec is plain data; zeroed leaves any padding field zero.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // `as _`: time_t is 32 bits on armv7 glibc, and its name is deprecated on musl.
    ts.tv_sec = timeout.as_secs().min(i32::MAX as u64) as _;
    ts.tv_nsec = timeout.subsec_nanos() as _;
    // SAFETY: valid set and timespec; the siginfo output is optional.
    let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "a signal",
    }
}

/// The env lines: names k0s passes to its components, and proxies.
pub fn shown_env(vars: impl Iterator<Item = (String, String)>) -> Vec<String> {
    const PREFIXES: [&str; 5] = ["ETCD_", "K0S_", "CONTAINERD_", "KUBELET_", "KUBE_"];
    const PROXIES: [&str; 3] = ["HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"];
    let mut v: Vec<(String, String)> = vars
        .filter(|(k, _)| {
            PREFIXES.iter().any(|p| k.starts_with(p))
                || PROXIES.iter().any(|p| k.eq_ignore_ascii_case(p))
        })
        .collect();
    v.sort();
    // A join token is a credential: show that it is there, not what it is.
    v.into_iter()
        .map(|(k, val)| {
            if k == "K0S_TOKEN" {
                format!("{k}=<redacted, {} bytes>", val.len())
            } else {
                format!("{k}={val}")
            }
        })
        .collect()
}

/// Parses KILN_STANDIN_EXIT_AFTER (whole seconds).
pub fn parse_exit_after(v: &str) -> Option<u64> {
    v.trim().parse().ok()
}

fn finish(held: &Option<Held>, code: i32) -> ! {
    crate::containers::stop();
    if let Some(h) = held {
        let _ = std::fs::remove_file(&h.pid_file);
    }
    std::process::exit(code)
}

pub fn run(argv: &[String], opts: &RunOpts) -> ! {
    let start = Instant::now();
    block_stop_signals();
    say(&format!("argv {}", quote_argv(argv)));
    say(&format!(
        "role={} pid={}",
        opts.role().as_str(),
        std::process::id()
    ));
    let vars = std::env::vars_os().map(|(k, v)| {
        (
            k.to_string_lossy().into_owned(),
            v.to_string_lossy().into_owned(),
        )
    });
    for line in shown_env(vars) {
        say(&format!("env {line}"));
    }
    let exit_after = match std::env::var_os(EXIT_AFTER_VAR) {
        None => None,
        Some(v) => {
            let v = v.to_string_lossy();
            let secs = parse_exit_after(&v);
            match secs {
                Some(s) => say(&format!(
                    "will exit with code 1 after {s} s ({EXIT_AFTER_VAR})"
                )),
                None => say(&format!(
                    "ignoring {EXIT_AFTER_VAR}={v}: want whole seconds"
                )),
            }
            // A time past what Instant can hold means never.
            secs.and_then(|s| start.checked_add(Duration::from_secs(s)))
        }
    };

    let mut report = Report::default();
    let held = checks::run_all(opts, &mut report);
    crate::cluster::start(opts, &mut report);
    // A worker runs containers; an image with containerd shows it can.
    if opts.role() != crate::cli::Role::Controller && crate::containers::present() {
        crate::containers::run_all(opts.data_dir(), &mut report);
    }
    say(&format!(
        "checks done ok={} failed={}",
        report.ok, report.failed
    ));
    say("running");

    let mut next_alive = start + ALIVE_EVERY;
    loop {
        let now = Instant::now();
        if exit_after.is_some_and(|t| now >= t) {
            say(&format!("exiting with code 1 as asked by {EXIT_AFTER_VAR}"));
            finish(&held, 1);
        }
        if now >= next_alive {
            say(&format!("alive uptime={}", start.elapsed().as_secs()));
            while next_alive <= now {
                next_alive += ALIVE_EVERY;
            }
        }
        let wake = exit_after.map_or(next_alive, |t| t.min(next_alive));
        if let Some(sig) = wait_stop_signal(wake.saturating_duration_since(now)) {
            say(&format!("got {}, stopping", signal_name(sig)));
            finish(&held, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_filter_and_order() {
        let vars = [
            ("PATH", "/bin"),
            ("K0S_TOKEN", "t"),
            ("ETCD_UNSUPPORTED_ARCH", "arm"),
            ("https_proxy", "http://p"),
            ("HTTP_PROXY", "http://q"),
            ("CONTAINERD_HTTPS_PROXY", "http://c"),
            ("KUBELET_X", "1"),
            ("KUBE_PROXY_X", "2"),
            ("KUBEX", "no"),
            ("NO_PROXY", "10.0.0.0/8"),
            ("MY_HTTP_PROXY", "no"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(
            shown_env(vars),
            vec![
                "CONTAINERD_HTTPS_PROXY=http://c",
                "ETCD_UNSUPPORTED_ARCH=arm",
                "HTTP_PROXY=http://q",
                "K0S_TOKEN=<redacted, 1 bytes>",
                "KUBELET_X=1",
                "KUBE_PROXY_X=2",
                "NO_PROXY=10.0.0.0/8",
                "https_proxy=http://p",
            ]
        );
    }

    #[test]
    fn exit_after_values() {
        assert_eq!(parse_exit_after("5"), Some(5));
        assert_eq!(parse_exit_after(" 0\n"), Some(0));
        assert_eq!(parse_exit_after("-1"), None);
        assert_eq!(parse_exit_after("1.5"), None);
        assert_eq!(parse_exit_after(""), None);
    }
}
