//! The payload (k0s) as a supervised child: its own cgroup and session, the
//! k0s unit's limits, output to the console (rate-limited) and to a
//! size-capped log on /var, and restart with capped backoff.

use super::console;
use super::host::PAYLOAD_CGROUP;
use crate::k0s::{self, Invocation};
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const LOG_PATH: &str = "/var/log/k0s.log";
const BACKOFF_MAX_SECS: u64 = 30;
/// A run this long resets the backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

pub struct Running {
    pub pid: i32,
    pub started: Instant,
    pub out: OwnedFd,
    partial: Vec<u8>,
}

pub struct Supervisor {
    pub inv: Invocation,
    pub role: String,
    pub running: Option<Running>,
    pub attempt: u32,
    pub next_start: Option<Instant>,
    log: LogFile,
    rate: RateLimit,
    loop_: CrashLoop,
    /// The last error writing k0s's files, announced once.
    prepare_error: Option<String>,
}

impl Supervisor {
    pub fn new(inv: Invocation, role: &str, log_max: u64, console_rate: u32) -> Supervisor {
        Supervisor {
            inv,
            role: role.to_string(),
            running: None,
            attempt: 0,
            next_start: Some(Instant::now()),
            log: LogFile { max: log_max, file: None, size: 0 },
            rate: RateLimit { per_sec: console_rate.max(1), window: Instant::now(), used: 0, dropped: 0 },
            loop_: CrashLoop::default(),
            prepare_error: None,
        }
    }

    /// Writes the files the command line refers to.
    pub fn prepare(&self) -> std::io::Result<()> {
        std::fs::create_dir_all("/etc/k0s")?;
        std::fs::create_dir_all("/run/k0s")?;
        std::fs::create_dir_all(k0s::DATA_DIR)?;
        if let Some((path, content)) = &self.inv.config_file {
            std::fs::write(path, content)?;
        }
        if let Some((path, content)) = &self.inv.token_file {
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::remove_file(path);
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
            f.write_all(content.as_bytes())?;
        }
        Ok(())
    }

    pub fn start(&mut self) {
        self.next_start = None;
        // The files first, on every start: a failure (a full or read-only
        // /var, /etc) is retried like a crash, and fixing it brings k0s up.
        if let Err(e) = self.prepare() {
            let msg = format!("cannot write the k0s config or token: {e}");
            if self.prepare_error.as_deref() != Some(msg.as_str()) {
                console::error(&format!("preparing k0s files: {e}"));
                console::event("maintenance", &[("reason", &msg)]);
                self.prepare_error = Some(msg);
            }
            self.failed_start();
            return;
        }
        self.prepare_error = None;
        let (rd, wr) = match pipe() {
            Ok(p) => p,
            Err(e) => {
                console::error(&format!("payload: pipe: {e}"));
                self.failed_start();
                return;
            }
        };
        let wr2 = match wr.try_clone() {
            Ok(w) => w,
            Err(e) => {
                console::error(&format!("payload: pipe: {e}"));
                self.failed_start();
                return;
            }
        };
        let procs = std::ffi::CString::new(format!("{PAYLOAD_CGROUP}/cgroup.procs")).unwrap_or_default();
        let mut cmd = Command::new(k0s::BINARY);
        cmd.args(&self.inv.args)
            .env_clear()
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", "/root")
            .envs(self.inv.env.iter().map(|(a, b)| (a, b)))
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::from(wr))
            .stderr(Stdio::from(wr2));
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::setsid();
                let nofile = libc::rlimit { rlim_cur: k0s::NOFILE as libc::rlim_t, rlim_max: k0s::NOFILE as libc::rlim_t };
                libc::setrlimit(libc::RLIMIT_NOFILE as _, &nofile);
                let inf = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
                libc::setrlimit(libc::RLIMIT_CORE as _, &inf);
                libc::setrlimit(libc::RLIMIT_NPROC as _, &inf);
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd >= 0 {
                    libc::write(fd, b"0".as_ptr() as *const libc::c_void, 1);
                    libc::close(fd);
                }
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(child) => {
                let pid = child.id() as i32;
                // The child is reaped by PID 1's waitpid(-1) loop, not by std.
                std::mem::forget(child);
                self.running = Some(Running { pid, started: Instant::now(), out: rd, partial: Vec::new() });
                self.attempt += 1;
                let uptime = format!("{:.2}", super::sys::uptime());
                let (used, total) = super::sys::mem_used_kib();
                console::event(
                    "payload-started",
                    &[("role", &self.role), ("pid", &pid), ("attempt", &self.attempt), ("uptime", &uptime), ("init_rss_kib", &super::sys::rss_kib()), ("mem_used_kib", &used), ("mem_total_kib", &total)],
                );
            }
            Err(e) => {
                console::error(&format!("payload: cannot start {}: {e}", k0s::BINARY));
                self.failed_start();
            }
        }
    }

    fn delay(&self) -> Duration {
        backoff(self.attempt)
    }

    /// A start that did not get as far as a process counts as an attempt,
    /// so the backoff grows.
    fn failed_start(&mut self) {
        self.attempt += 1;
        self.schedule_restart();
    }

    fn schedule_restart(&mut self) {
        let delay = self.delay();
        self.next_start = Some(Instant::now() + delay);
        console::event("payload-restarting", &[("delay", &format!("{}s", delay.as_secs())), ("attempt", &(self.attempt + 1))]);
    }

    /// Called when waitpid reports the payload's pid.
    pub fn exited(&mut self, status: i32, restart: bool) {
        let Some(r) = self.running.take() else { return };
        self.drain(&r.out, true);
        let ran = r.started.elapsed();
        let what = describe_status(status);
        console::event("payload-exited", &[("pid", &r.pid), ("status", &what), ("ran", &format!("{}s", ran.as_secs()))]);
        if ran >= HEALTHY_RUN {
            self.attempt = 0;
            self.loop_ = CrashLoop::default();
        }
        self.loop_.exited(r.started);
        if restart {
            console::warn(&self.loop_.status(self.delay()));
            self.schedule_restart();
        }
    }

    /// Reads what the payload wrote; forwards complete lines.
    pub fn pump(&mut self) {
        if let Some(mut r) = self.running.take() {
            let mut buf = [0u8; 8192];
            loop {
                // SAFETY: valid fd and buffer.
                let n = unsafe { libc::read(r.out.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
                if n <= 0 {
                    break;
                }
                r.partial.extend_from_slice(&buf[..n as usize]);
                while let Some(i) = r.partial.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = r.partial.drain(..=i).collect();
                    self.forward(&String::from_utf8_lossy(&line[..line.len() - 1]));
                }
                if r.partial.len() > 64 * 1024 {
                    let line: Vec<u8> = std::mem::take(&mut r.partial);
                    self.forward(&String::from_utf8_lossy(&line));
                }
            }
            self.running = Some(r);
        }
    }

    fn drain(&mut self, fd: &OwnedFd, flush_partial: bool) {
        let mut pending = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            // SAFETY: valid fd and buffer; the fd is non-blocking.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
            if n <= 0 {
                break;
            }
            pending.extend_from_slice(&buf[..n as usize]);
        }
        let text = String::from_utf8_lossy(&pending).into_owned();
        let mut lines: Vec<&str> = text.split('\n').collect();
        if !flush_partial || lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        for l in lines {
            self.forward(l);
        }
    }

    fn forward(&mut self, line: &str) {
        self.log.append(line);
        if self.rate.allow() {
            console::line(line);
        }
    }
}

/// The wait before the next start after `attempt` starts: 2, 4, 8, 16,
/// then 30 s; 1 s before any start.
fn backoff(attempt: u32) -> Duration {
    Duration::from_secs((1u64 << attempt.min(5)).min(BACKOFF_MAX_SECS))
}

/// The exits since k0s last ran for a healthy minute, for the console.
#[derive(Default)]
struct CrashLoop {
    exits: u32,
    since: Option<Instant>,
}

impl CrashLoop {
    fn exited(&mut self, started: Instant) {
        self.exits += 1;
        self.since.get_or_insert(started);
    }

    fn status(&self, delay: Duration) -> String {
        let span = self.since.map(|s| s.elapsed()).unwrap_or_default();
        status_line(self.exits, span, delay)
    }
}

/// `k0s has exited 5 times in 3 min; restarting in 30 s`.
fn status_line(exits: u32, span: Duration, delay: Duration) -> String {
    let secs = span.as_secs();
    let span = if secs < 120 { format!("{secs} s") } else { format!("{} min", secs / 60) };
    let times = if exits == 1 { "once".to_string() } else { format!("{exits} times") };
    format!("k0s has exited {times} in {span}; restarting in {} s", delay.as_secs())
}

fn describe_status(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exit-{}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("signal-{}", libc::WTERMSIG(status))
    } else {
        format!("raw-{status}")
    }
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: valid out array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    use std::os::fd::FromRawFd;
    // SAFETY: the fds were just created and are owned here.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: valid fd.
    unsafe { libc::fcntl(rd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    Ok((rd, wr))
}

/// /var/log/k0s.log, rotated to k0s.log.1 at `max` bytes (SD cards wear out).
struct LogFile {
    max: u64,
    file: Option<std::fs::File>,
    size: u64,
}

impl LogFile {
    fn append(&mut self, line: &str) {
        if self.file.is_none() {
            let _ = std::fs::create_dir_all("/var/log");
            self.file = std::fs::OpenOptions::new().create(true).append(true).open(LOG_PATH).ok();
            self.size = std::fs::metadata(LOG_PATH).map(|m| m.len()).unwrap_or(0);
        }
        if self.size + line.len() as u64 + 1 > self.max {
            let _ = std::fs::rename(LOG_PATH, format!("{LOG_PATH}.1"));
            self.file = std::fs::OpenOptions::new().create(true).append(true).truncate(false).open(LOG_PATH).ok();
            self.size = 0;
        }
        if let Some(f) = self.file.as_mut() {
            if f.write_all(line.as_bytes()).and_then(|_| f.write_all(b"\n")).is_ok() {
                self.size += line.len() as u64 + 1;
            }
        }
    }
}

struct RateLimit {
    per_sec: u32,
    window: Instant,
    used: u32,
    dropped: u64,
}

impl RateLimit {
    fn allow(&mut self) -> bool {
        if self.window.elapsed() >= Duration::from_secs(1) {
            if self.dropped > 0 {
                console::warn(&format!("{} payload line(s) kept off the console (rate limit); all are in {LOG_PATH}", self.dropped));
            }
            self.window = Instant::now();
            self.used = 0;
            self.dropped = 0;
        }
        if self.used < self.per_sec {
            self.used += 1;
            true
        } else {
            self.dropped += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped() {
        let s: Vec<u64> = (0..9).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(s, [1, 2, 4, 8, 16, 30, 30, 30, 30]);
        assert_eq!(backoff(u32::MAX).as_secs(), 30);
    }

    #[test]
    fn the_crash_loop_status_line() {
        assert_eq!(status_line(5, Duration::from_secs(190), Duration::from_secs(30)), "k0s has exited 5 times in 3 min; restarting in 30 s");
        assert_eq!(status_line(1, Duration::from_secs(4), Duration::from_secs(2)), "k0s has exited once in 4 s; restarting in 2 s");
        let mut l = CrashLoop::default();
        let t = Instant::now();
        l.exited(t);
        l.exited(Instant::now());
        assert_eq!(l.since, Some(t), "counted from the first start of the streak");
        assert!(l.status(Duration::from_secs(4)).starts_with("k0s has exited 2 times in "), "{}", l.status(Duration::from_secs(4)));
    }
}
