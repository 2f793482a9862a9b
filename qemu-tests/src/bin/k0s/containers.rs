//! Real containers, for images that carry containerd and runc (Debian's
//! packages, through `[[rootfs.packages]]`). It does what a k0s worker does
//! with its bundled containerd: start containerd with its state under the
//! data directory, import every image tarball in `<data-dir>/images`, and
//! run containers. Then it shows what k0s's kubelet would rely on:
//!
//! - a container from an imported image runs and prints a known line;
//! - it has its own network namespace (only `lo`);
//! - its cgroup v2 `memory.max`, read from the host while it runs, is the
//!   limit it was given;
//! - a container that allocates past its limit is OOM-killed (exit 137), and
//!   containerd reports the `/tasks/oom` event for it.
//!
//! Each step prints a `check …` line; the details print as `container …`
//! lines. containerd keeps running afterwards, as under k0s.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::out::{say, Report};

pub const CONTAINERD: &str = "/usr/bin/containerd";
const CTR: &str = "/usr/bin/ctr";
const RUN_DIR: &str = "/run/k0s";
const SOCKET: &str = "/run/k0s/containerd.sock";
/// k0s's namespace for the kubelet's containers.
const NAMESPACE: &str = "k8s.io";
/// The limit the containers run with: 32 MiB.
pub const MEMORY_LIMIT: u64 = 32 << 20;
/// The line the first container prints.
pub const HELLO: &str = "kiln-container-hello";
/// TCG on a one-core armv7 board is slow; containerd's first start there
/// takes tens of seconds.
const START_TIMEOUT: Duration = Duration::from_secs(240);
const STEP_TIMEOUT: Duration = Duration::from_secs(300);
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

static DAEMON: Mutex<Option<Child>> = Mutex::new(None);

/// Whether this image carries containerd.
pub fn present() -> bool {
    Path::new(CONTAINERD).is_file() && Path::new(CTR).is_file()
}

/// containerd's config: the data directory holds its state, as under k0s;
/// the CRI plugin (the kubelet's way in) is not needed here.
pub fn config(data_dir: &str) -> String {
    format!(
        "version = 2\nroot = \"{data_dir}/containerd\"\nstate = \"{RUN_DIR}/containerd\"\n\
         disabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.snapshotter.v1.aufs\", \"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.devmapper\", \"io.containerd.snapshotter.v1.zfs\"]\n\
         \n[grpc]\n  address = \"{SOCKET}\"\n\
         \n[plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{data_dir}/containerd/opt\"\n"
    )
}

/// Stops containerd (the stand-in is stopping).
pub fn stop() {
    if let Some(mut c) = DAEMON.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// What a command printed (stdout then stderr) and its exit code, or why it
/// could not run to the end within `timeout` (then it is killed).
fn run(args: &[&str], timeout: Duration) -> Result<(i32, String), String> {
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .env("PATH", PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", args[0]))?;
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        })
    };
    let out = reader(Box::new(child.stdout.take().expect("piped stdout")));
    let err = reader(Box::new(child.stderr.take().expect("piped stderr")));
    let end = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(100)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("`{}` did not finish within {} s", args.join(" "), timeout.as_secs()));
            }
            Err(e) => return Err(format!("waiting for {}: {e}", args[0])),
        }
    };
    let text = format!("{}{}", out.join().unwrap_or_default(), err.join().unwrap_or_default());
    // A signal's death reads as 128 + signal, as a shell shows it.
    let code = status.code().unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0));
    Ok((code, text))
}

fn ctr(args: &[&str], timeout: Duration) -> Result<(i32, String), String> {
    let mut v = vec![CTR, "--address", SOCKET, "--namespace", NAMESPACE];
    v.extend_from_slice(args);
    run(&v, timeout)
}

/// The last lines of a log file, for a failure's report.
fn tail(path: &str, n: usize) -> String {
    let t = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

fn start_daemon(data_dir: &str) -> Result<(), String> {
    fs::create_dir_all(RUN_DIR).map_err(|e| format!("{RUN_DIR}: {e}"))?;
    let conf = format!("{RUN_DIR}/containerd.toml");
    fs::write(&conf, config(data_dir)).map_err(|e| format!("{conf}: {e}"))?;
    let log_path = format!("{RUN_DIR}/containerd.log");
    let log = fs::File::create(&log_path).map_err(|e| format!("{log_path}: {e}"))?;
    let log2 = log.try_clone().map_err(|e| format!("{log_path}: {e}"))?;
    let child = Command::new(CONTAINERD)
        .args(["--config", &conf])
        .env("PATH", PATH)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| format!("cannot start {CONTAINERD}: {e}"))?;
    say(&format!("containerd pid={} config={conf} log={log_path} root={data_dir}/containerd socket={SOCKET}", child.id()));
    *DAEMON.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
    let start = Instant::now();
    loop {
        if let Some(c) = DAEMON.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            if let Ok(Some(s)) = c.try_wait() {
                return Err(format!("containerd exited ({s}): {}", tail(&log_path, 15)));
            }
        }
        if Path::new(SOCKET).exists() {
            if let Ok((0, v)) = ctr(&["version"], Duration::from_secs(60)) {
                let server = v.lines().skip_while(|l| !l.starts_with("Server")).find(|l| l.trim_start().starts_with("Version")).unwrap_or("").trim();
                say(&format!("containerd up after {} s, server {server}", start.elapsed().as_secs()));
                return Ok(());
            }
        }
        if start.elapsed() > START_TIMEOUT {
            return Err(format!("{SOCKET} did not answer within {} s: {}", START_TIMEOUT.as_secs(), tail(&log_path, 15)));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Imports every file in `<data_dir>/images`, as k0s does at start; returns
/// the image references containerd then has.
fn import(data_dir: &str) -> Result<Vec<String>, String> {
    let dir = Path::new(data_dir).join("images");
    let mut files: Vec<_> = fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?.flatten().map(|e| e.path()).collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("no image tarballs in {}", dir.display()));
    }
    for f in &files {
        let p = f.to_string_lossy();
        let (code, out) = ctr(&["images", "import", &p], STEP_TIMEOUT)?;
        if code != 0 {
            return Err(format!("`ctr images import {p}` exited {code}: {}", out.trim()));
        }
        say(&format!("container image-imported file={p} {}", crate::out::one_line(out.trim())));
    }
    let (code, out) = ctr(&["images", "list", "--quiet"], STEP_TIMEOUT)?;
    if code != 0 {
        return Err(format!("`ctr images list` exited {code}: {}", out.trim()));
    }
    let refs: Vec<String> = out.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    say(&format!("container images {}", refs.join(",")));
    if refs.is_empty() {
        return Err("the import named no image".into());
    }
    Ok(refs)
}

/// What the first container reports about itself.
#[derive(Debug, Default, PartialEq)]
pub struct Seen {
    pub hello: bool,
    pub netns: Option<String>,
    pub ifaces: Vec<String>,
    pub cgroup: Option<String>,
}

/// The shell script the first container runs (busybox applets only).
pub const HELLO_SCRIPT: &str = "echo kiln-container-hello; echo netns=$(readlink /proc/self/ns/net); echo ifaces=$(ls /sys/class/net); echo cgroup=$(cut -d: -f3 /proc/self/cgroup); sleep 5";

pub fn parse_seen(out: &str) -> Seen {
    let mut s = Seen::default();
    for l in out.lines().map(str::trim) {
        if l == HELLO {
            s.hello = true;
        } else if let Some(v) = l.strip_prefix("netns=") {
            s.netns = Some(v.to_string());
        } else if let Some(v) = l.strip_prefix("ifaces=") {
            s.ifaces = v.split_whitespace().map(String::from).collect();
        } else if let Some(v) = l.strip_prefix("cgroup=") {
            s.cgroup = Some(v.to_string());
        }
    }
    s
}

/// The host's interfaces that sit on a device (eth0, …), as opposed to the
/// ones the kernel makes in every namespace (lo, tunl0, …).
fn hardware_interfaces() -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir("/sys/class/net")
        .map(|rd| rd.flatten().filter(|e| e.path().join("device").exists()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// The container is in a namespace of its own: not the host's, with `lo`,
/// and none of the host's hardware interfaces.
pub fn own_netns(s: &Seen, host_ns: &str, host_hw: &[String]) -> Result<(), String> {
    let shared: Vec<&String> = s.ifaces.iter().filter(|i| host_hw.contains(i)).collect();
    match &s.netns {
        Some(n) if n != host_ns && s.ifaces.iter().any(|i| i == "lo") && shared.is_empty() => Ok(()),
        n => Err(format!("the container's network namespace is {n:?} with interfaces {:?}; the host's is {host_ns} with {host_hw:?}", s.ifaces)),
    }
}

/// Collects the output of `ctr events` on a thread.
struct Events {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Events {
    fn start() -> Result<Events, String> {
        let mut child = Command::new(CTR)
            .args(["--address", SOCKET, "events"])
            .env("PATH", PATH)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start `ctr events`: {e}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("piped stdout");
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                l2.lock().unwrap_or_else(|e| e.into_inner()).push(l);
            }
        });
        Ok(Events { child, lines })
    }

    /// Waits up to `timeout` for an event line that has every one of `words`.
    fn wait(&self, words: &[&str], timeout: Duration) -> Option<String> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(l) = self.lines.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|l| words.iter().all(|w| l.contains(w))) {
                return Some(l.clone());
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The whole exercise; one check line per step. containerd stays up.
pub fn run_all(data_dir: &str, r: &mut Report) {
    say(&format!("containerd found at {CONTAINERD}: running containers as a k0s worker would"));
    if r.check("containerd", start_daemon(data_dir)).is_none() {
        return;
    }
    let Some(refs) = r.check("image-import", import(data_dir)) else { return };
    let image = refs[0].clone();
    let limit = MEMORY_LIMIT.to_string();

    // The limit as the kernel holds it, read from the host while the
    // container runs (it sleeps a little after its lines).
    let (image2, limit2) = (image.clone(), limit.clone());
    let running = std::thread::spawn(move || ctr(&["run", "--rm", "--memory-limit", &limit2, &image2, "kiln-hello", "sh", "-c", HELLO_SCRIPT], STEP_TIMEOUT));
    let cgroup = format!("/{NAMESPACE}/kiln-hello");
    let max_file = format!("/sys/fs/cgroup{cgroup}/memory.max");
    let end = Instant::now() + STEP_TIMEOUT;
    // runc makes the cgroup, then writes its limits: read until the limit
    // shows or the container is gone, and keep the last value seen.
    let mut memory_max = None;
    loop {
        if let Ok(v) = fs::read_to_string(&max_file) {
            memory_max = Some(v.trim().to_string());
        }
        if memory_max.as_deref() == Some(limit.as_str()) || running.is_finished() || Instant::now() > end {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    say(&format!("container kiln-hello {max_file}={}", memory_max.as_deref().unwrap_or("unreadable")));
    let hello = running.join().unwrap_or_else(|_| Err("the thread running ctr panicked".into()));
    let seen = r.check(
        "container-run",
        hello.and_then(|(code, out)| {
            say(&format!("container kiln-hello image={image} exit={code} output={}", crate::out::one_line(out.trim())));
            let s = parse_seen(&out);
            match (code, s.hello) {
                (0, true) => Ok(s),
                _ => Err(format!("exit {code}, and the output has {}the line {HELLO}", if s.hello { "" } else { "not " })),
            }
        }),
    );
    if let Some(s) = seen {
        let host = fs::read_link("/proc/self/ns/net").map(|p| p.display().to_string()).unwrap_or_default();
        r.check("container-netns", own_netns(&s, &host, &hardware_interfaces()));
        r.check(
            "container-memory-limit",
            match (s.cgroup.as_deref(), memory_max.as_deref()) {
                (Some(c), Some(m)) if c == cgroup && m == limit => Ok(()),
                (c, m) => Err(format!("the container is in cgroup {c:?} (want {cgroup}), whose memory.max is {m:?}, not {limit}")),
            },
        );
    }

    // Past its limit: the shell holds 256 MiB in a variable.
    let oom = (|| {
        let events = Events::start()?;
        // `ctr events` subscribes when it starts; give it a moment.
        std::thread::sleep(Duration::from_secs(2));
        let (code, out) = ctr(&["run", "--rm", "--memory-limit", &limit, &image, "kiln-oom", "sh", "-c", "echo allocating; a=$(yes | head -c 268435456); echo survived"], STEP_TIMEOUT)?;
        say(&format!("container kiln-oom exit={code} output={}", crate::out::one_line(out.trim())));
        let event = events.wait(&["/tasks/oom", "kiln-oom"], Duration::from_secs(30));
        say(&format!("container kiln-oom event={}", event.as_deref().map(crate::out::one_line).unwrap_or_else(|| "none".into())));
        match (code, out.contains("survived"), event) {
            (137, false, Some(_)) => {
                say(&format!("oom-killed container=kiln-oom limit={limit} exit=137 event=/tasks/oom"));
                Ok(())
            }
            (c, survived, e) => Err(format!("exit {c} (want 137, SIGKILL), survived={survived}, containerd's /tasks/oom event {}", if e.is_some() { "seen" } else { "not seen" })),
        }
    })();
    r.check("container-oom-kill", oom);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_container_prints() {
        let s = parse_seen("kiln-container-hello\nnetns=net:[4026532200]\nifaces=lo\ncgroup=/k8s.io/kiln-hello\n");
        assert_eq!(s, Seen { hello: true, netns: Some("net:[4026532200]".into()), ifaces: vec!["lo".into()], cgroup: Some("/k8s.io/kiln-hello".into()) });
        assert_eq!(parse_seen("oops\n"), Seen::default());
    }

    #[test]
    fn own_netns_means_another_namespace_without_the_hosts_devices() {
        let hw = vec!["eth0".to_string()];
        let seen = |ns: &str, ifaces: &[&str]| Seen { hello: true, netns: Some(ns.into()), ifaces: ifaces.iter().map(|s| s.to_string()).collect(), cgroup: None };
        assert!(own_netns(&seen("net:[2]", &["lo", "tunl0"]), "net:[1]", &hw).is_ok());
        assert!(own_netns(&seen("net:[1]", &["lo"]), "net:[1]", &hw).is_err());
        assert!(own_netns(&seen("net:[2]", &["eth0", "lo"]), "net:[1]", &hw).is_err());
        assert!(own_netns(&seen("net:[2]", &[]), "net:[1]", &hw).is_err());
        assert!(own_netns(&Seen::default(), "net:[1]", &hw).is_err());
    }

    #[test]
    fn config_keeps_state_under_the_data_dir() {
        let c = config("/var/lib/k0s");
        assert!(c.contains("root = \"/var/lib/k0s/containerd\""), "{c}");
        assert!(c.contains("address = \"/run/k0s/containerd.sock\""), "{c}");
        assert!(c.contains("path = \"/var/lib/k0s/containerd/opt\""), "{c}");
    }

    #[test]
    fn run_reports_exit_codes_signals_and_timeouts() {
        assert_eq!(run(&["sh", "-c", "echo hi; exit 3"], Duration::from_secs(10)).unwrap(), (3, "hi\n".into()));
        assert_eq!(run(&["sh", "-c", "kill -9 $$"], Duration::from_secs(10)).unwrap().0, 137);
        assert!(run(&["sleep", "5"], Duration::from_millis(300)).unwrap_err().contains("did not finish"));
        assert!(run(&["/nonexistent"], Duration::from_secs(1)).unwrap_err().contains("cannot start"));
    }
}
