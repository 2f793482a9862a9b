//! The payload (k0s) as a supervised child: its own cgroup and session, the
//! k0s unit's limits, output to the console (rate-limited) and to a
//! size-capped log on /var, and restart with capped backoff.

use super::console;
use super::host::PAYLOAD_CGROUP;
use crate::k0s::{self, Invocation, Resource, Token};
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const LOG_PATH: &str = "/var/log/k0s.log";
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
            log: LogFile::new(LOG_PATH, log_max),
            rate: RateLimit::new(console_rate, Instant::now()),
            loop_: CrashLoop::default(),
            prepare_error: None,
        }
    }

    /// Writes the files the command line refers to, and checks a token file
    /// the config names. Errors say which file.
    pub fn prepare(&self) -> Result<(), String> {
        for d in ["/etc/k0s", "/run/k0s", k0s::DATA_DIR] {
            std::fs::create_dir_all(d).map_err(|e| format!("creating {d}: {e}"))?;
        }
        if let Some((path, content)) = &self.inv.config_file {
            write_private(Path::new(path), content.as_bytes())?;
        }
        match &self.inv.token {
            Some(Token::Write { path, content }) => write_private(Path::new(path), content.as_bytes())?,
            Some(Token::Existing(path)) => check_token_file(Path::new(path))?,
            None => {}
        }
        Ok(())
    }

    pub fn start(&mut self) {
        self.next_start = None;
        // A start that fails before k0s runs counts too, so it backs off.
        self.attempt += 1;
        // The files first, on every start: a failure (a full or read-only
        // /var, /etc) is retried like a crash, and fixing it brings k0s up.
        if let Err(e) = self.prepare() {
            let msg = format!("cannot write the k0s config or token: {e}");
            if self.prepare_error.as_deref() != Some(msg.as_str()) {
                console::error(&format!("preparing k0s files: {e}"));
                console::event("maintenance", &[("reason", &msg)]);
                self.prepare_error = Some(msg);
            }
            self.schedule_restart();
            return;
        }
        self.prepare_error = None;
        let (rd, wr) = match pipe() {
            Ok(p) => p,
            Err(e) => {
                console::error(&format!("payload: pipe: {e}"));
                self.schedule_restart();
                return;
            }
        };
        let wr2 = match wr.try_clone() {
            Ok(w) => w,
            Err(e) => {
                console::error(&format!("payload: pipe: {e}"));
                self.schedule_restart();
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
        // TasksMax=infinity: no pids limit on k0s's cgroup (the default, said
        // out loud in case something set one).
        let _ = super::sys::write(format!("{PAYLOAD_CGROUP}/pids.max"), "max");
        let limits: Vec<(libc::c_int, libc::rlimit)> = k0s::LIMITS.iter().map(|(r, v)| rlimit(*r, *v)).collect();
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::setsid();
                for (resource, value) in &limits {
                    if libc::setrlimit(*resource as _, value) != 0 {
                        // Fails the spawn; the parent reports it.
                        return Err(std::io::Error::last_os_error());
                    }
                }
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
                let uptime = format!("{:.2}", super::sys::uptime());
                let (used, total) = super::sys::mem_used_kib();
                console::event(
                    "payload-started",
                    &[
                        ("role", &self.role),
                        ("pid", &pid),
                        ("attempt", &self.attempt),
                        ("uptime", &uptime),
                        ("init_rss_kib", &super::sys::rss_kib()),
                        ("mem_used_kib", &used),
                        ("mem_total_kib", &total),
                        ("mem_used_mib", &(used / 1024)),
                        ("mem_total_mib", &(total / 1024)),
                    ],
                );
            }
            Err(e) => {
                console::error(&format!("payload: cannot start {} (with its limits: nofile={}, core and nproc unlimited): {e}", k0s::BINARY, k0s::NOFILE));
                self.schedule_restart();
            }
        }
    }

    fn delay(&self) -> Duration {
        k0s::restart_delay(self.attempt)
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
        let now = Instant::now();
        if let Some(note) = self.rate.note(now) {
            console::warn(&note);
        }
        if self.rate.allow(now) {
            console::line(line);
        }
    }

    /// When the console needs a note about lines kept off it, even if the
    /// payload says nothing more.
    pub fn note_due(&self) -> Option<Instant> {
        self.rate.note_due()
    }

    /// Prints that note once it is due.
    pub fn tick(&mut self) {
        if let Some(note) = self.rate.note(Instant::now()) {
            console::warn(&note);
        }
    }
}

fn rlimit(r: Resource, value: Option<u64>) -> (libc::c_int, libc::rlimit) {
    let resource = match r {
        Resource::Nofile => libc::RLIMIT_NOFILE,
        Resource::Core => libc::RLIMIT_CORE,
        Resource::Nproc => libc::RLIMIT_NPROC,
    };
    let v = value.map_or(libc::RLIM_INFINITY, |v| v as libc::rlim_t);
    (resource as libc::c_int, libc::rlimit { rlim_cur: v, rlim_max: v })
}

/// Writes a file only root can read, whole or not at all.
fn write_private(path: &Path, content: &[u8]) -> Result<(), String> {
    super::k0sfiles::write_atomic(path, content, 0o600).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// A `k0s.token_file` must be there; one others could read is made 0600.
fn check_token_file(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("k0s.token_file {}: {e}; put the join token there, or give it inline as k0s.token", path.display()))?;
    if !meta.is_file() {
        return Err(format!("k0s.token_file {} is not a file", path.display()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        match std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
            Ok(()) => console::warn(&format!("k0s.token_file {} had mode {mode:04o}; made it 0600 (a join token is a credential)", path.display())),
            Err(e) => console::warn(&format!("k0s.token_file {} has mode {mode:04o} and cannot be made 0600: {e}", path.display())),
        }
    }
    Ok(())
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
    path: PathBuf,
    max: u64,
    file: Option<std::fs::File>,
    size: u64,
}

impl LogFile {
    fn new(path: impl Into<PathBuf>, max: u64) -> LogFile {
        LogFile { path: path.into(), max, file: None, size: 0 }
    }

    fn rotated(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".1");
        PathBuf::from(p)
    }

    fn open(&mut self) {
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        self.file = std::fs::OpenOptions::new().create(true).append(true).open(&self.path).ok();
        self.size = self.file.as_ref().and_then(|f| f.metadata().ok()).map_or(0, |m| m.len());
    }

    /// Appends a line; first moves a file that would grow past `max` to
    /// `.1` (replacing the one before). A line longer than `max` still goes
    /// into a fresh file whole.
    fn append(&mut self, line: &str) {
        if self.file.is_none() {
            self.open();
        }
        let add = line.len() as u64 + 1;
        if self.size > 0 && self.size + add > self.max {
            let _ = std::fs::rename(&self.path, self.rotated());
            self.file = None;
            self.open();
        }
        if let Some(f) = self.file.as_mut() {
            if f.write_all(format!("{line}\n").as_bytes()).is_ok() {
                self.size += add;
            }
        }
    }
}

/// At most `per_sec` payload lines a second reach the console; the log file
/// gets every line. Lines kept off are counted and announced once the
/// second is over.
struct RateLimit {
    per_sec: u32,
    window: Instant,
    used: u32,
    dropped: u64,
}

impl RateLimit {
    fn new(per_sec: u32, now: Instant) -> RateLimit {
        RateLimit { per_sec: per_sec.max(1), window: now, used: 0, dropped: 0 }
    }

    fn roll(&mut self, now: Instant) -> u64 {
        if now.saturating_duration_since(self.window) < Duration::from_secs(1) {
            return 0;
        }
        self.window = now;
        self.used = 0;
        std::mem::take(&mut self.dropped)
    }

    /// The note about the last second's dropped lines, once it is over.
    fn note(&mut self, now: Instant) -> Option<String> {
        match self.roll(now) {
            0 => None,
            n => Some(format!("{n} payload line(s) kept off the console (more than {} a second); all are in {LOG_PATH}", self.per_sec)),
        }
    }

    fn allow(&mut self, now: Instant) -> bool {
        self.roll(now);
        if self.used < self.per_sec {
            self.used += 1;
            true
        } else {
            self.dropped += 1;
            false
        }
    }

    fn note_due(&self) -> Option<Instant> {
        (self.dropped > 0).then(|| self.window + Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_counts_and_notes_dropped_lines() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(3, t0);
        let shown: Vec<bool> = (0..5).map(|_| r.allow(t0)).collect();
        assert_eq!(shown, [true, true, true, false, false]);
        assert_eq!(r.note_due(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(r.note(t0 + Duration::from_millis(999)), None, "not before the second is over");
        let note = r.note(t0 + Duration::from_secs(1)).expect("a note");
        assert!(note.starts_with("2 payload line(s) kept off the console (more than 3 a second)"), "{note}");
        assert!(note.contains(LOG_PATH));
        assert_eq!(r.note_due(), None, "announced once");
        assert!(r.allow(t0 + Duration::from_millis(1500)), "a new second");
        // A quiet second loses nothing: the note comes with the next line's roll.
        let t1 = t0 + Duration::from_secs(3);
        let mut r = RateLimit::new(1, t1);
        assert!(r.allow(t1));
        assert!(!r.allow(t1));
        assert!(r.allow(t1 + Duration::from_secs(2)), "the roll resets the window");
        assert_eq!(r.dropped, 0);
        // Zero means one, never nothing.
        assert!(RateLimit::new(0, t0).allow(t0));
    }

    #[test]
    fn log_rotates_at_max_bytes() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("log/k0s.log");
        let mut log = LogFile::new(&path, 20);
        log.append("0123456789"); // 11 bytes
        log.append("abcdefgh"); // 9: exactly 20
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "0123456789\nabcdefgh\n");
        log.append("next");
        assert_eq!(std::fs::read_to_string(d.path().join("log/k0s.log.1")).unwrap(), "0123456789\nabcdefgh\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "next\n");
        // Longer than max: rotated out of the way, then written whole.
        log.append(&"x".repeat(30));
        assert_eq!(std::fs::read_to_string(d.path().join("log/k0s.log.1")).unwrap(), "next\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap().len(), 31);
        log.append("y");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "y\n");
        // A file left by an earlier boot counts towards the size.
        let p2 = d.path().join("old.log");
        std::fs::write(&p2, "z".repeat(15)).unwrap();
        let mut log = LogFile::new(&p2, 20);
        log.append("0123456789");
        assert_eq!(std::fs::read_to_string(d.path().join("old.log.1")).unwrap().len(), 15);
        assert_eq!(std::fs::read_to_string(&p2).unwrap(), "0123456789\n");
    }

    #[test]
    fn private_files_are_0600_and_whole() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("token");
        std::fs::write(&p, "old, world-readable").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&p, b"tok\n").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"tok\n");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777, 0o600);
        assert!(!d.path().join(".token.kiln-tmp").exists());
        let e = write_private(&d.path().join("no/such/dir/token"), b"x").unwrap_err();
        assert!(e.contains("no/such/dir/token"), "{e}");
    }

    #[test]
    fn token_file_is_checked_and_tightened() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("join-token");
        let e = check_token_file(&p).unwrap_err();
        assert!(e.contains("k0s.token_file") && e.contains("join-token"), "{e}");
        std::fs::write(&p, "tok").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        check_token_file(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777, 0o600);
        assert!(check_token_file(d.path()).unwrap_err().contains("not a file"));
    }

    #[test]
    fn rlimits_are_the_units() {
        let got: Vec<_> = k0s::LIMITS.iter().map(|(r, v)| rlimit(*r, *v)).collect();
        assert!(got.iter().any(|(r, l)| *r == libc::RLIMIT_NOFILE as libc::c_int && l.rlim_cur == 999_999 && l.rlim_max == 999_999));
        assert!(got.iter().any(|(r, l)| *r == libc::RLIMIT_CORE as libc::c_int && l.rlim_cur == libc::RLIM_INFINITY));
        assert!(got.iter().any(|(r, l)| *r == libc::RLIMIT_NPROC as libc::c_int && l.rlim_max == libc::RLIM_INFINITY));
    }
}

#[cfg(test)]
mod crash_loop_tests {
    use super::*;

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
