//! The optional root shell on the console: from the start of stage 2 when
//! the image asks for it (`node.debug_shell` in the profile puts
//! [`kiln_contract::layout::DEBUG_SHELL`] in the root), so it is there in
//! maintenance, before any config is read; or once a config with
//! `debug.shell = true` is loaded. It is started again when it exits.

use super::console;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A shell that exits this soon after starting counts as failing.
const QUICK_EXIT: Duration = Duration::from_secs(2);
/// After this many quick exits in a row it is not started again.
const MAX_QUICK_EXITS: u32 = 5;

struct Shell {
    enabled: bool,
    pid: Option<i32>,
    started: Option<Instant>,
    quick_exits: u32,
}

static SHELL: Mutex<Shell> = Mutex::new(Shell { enabled: false, pid: None, started: None, quick_exits: 0 });

/// Whether the image enables the shell from the start.
pub fn in_image() -> bool {
    std::path::Path::new(kiln_contract::layout::DEBUG_SHELL).exists()
}

/// Turns the shell on (once; later calls do nothing) and starts it.
pub fn enable(why: &str) {
    let Ok(mut s) = SHELL.lock() else { return };
    if s.enabled {
        return;
    }
    s.enabled = true;
    if !std::path::Path::new("/bin/sh").exists() {
        console::error(&format!("debug shell ({why}): the image has no /bin/sh (add \"sh\" to rootfs.busybox_applets)"));
        return;
    }
    console::warn(&format!("debug shell on the console ({why}): press Enter for a root prompt"));
    s.spawn();
}

/// Starts the shell again if it is enabled and has exited. Call after
/// reaping children: whoever reaped it, it is gone once reaped.
pub fn tick() {
    let Ok(mut s) = SHELL.lock() else { return };
    let Some(pid) = s.pid else { return };
    // SAFETY: signal 0 only checks that the process exists.
    let gone = unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
    if !gone {
        return;
    }
    s.pid = None;
    if s.started.is_some_and(|t| t.elapsed() < QUICK_EXIT) {
        s.quick_exits += 1;
        if s.quick_exits >= MAX_QUICK_EXITS {
            console::error(&format!("debug shell: /bin/sh exited {MAX_QUICK_EXITS} times right after starting; not starting it again"));
            s.enabled = false;
            return;
        }
    } else {
        s.quick_exits = 0;
    }
    s.spawn();
}

impl Shell {
    fn spawn(&mut self) {
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.env_clear().env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin").env("HOME", "/root").env("TERM", "vt100").env("PS1", "kiln# ");
        if std::path::Path::new("/root").is_dir() {
            cmd.current_dir("/root");
        } else {
            cmd.current_dir("/");
        }
        use std::os::unix::process::CommandExt;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                libc::ioctl(0, libc::TIOCSCTTY as _, 1);
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(c) => {
                self.pid = Some(c.id() as i32);
                self.started = Some(Instant::now());
                // Reaped by PID 1's SIGCHLD handling, not through Child.
                std::mem::forget(c);
            }
            Err(e) => {
                console::error(&format!("debug shell: starting /bin/sh: {e}"));
                self.enabled = false;
            }
        }
    }
}
