//! Console output: events, errors and payload lines, to the console, to the
//! other active consoles (`console=ttyS0,115200 console=tty0` prints on the
//! serial port and on the screen) and to /dev/kmsg.

use kiln_contract::event;
use std::io::Write;
use std::sync::Mutex;

static KMSG: Mutex<Option<std::fs::File>> = Mutex::new(None);
static MIRRORS: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());

/// The consoles besides /dev/console, from the kernel's list of active ones
/// (`/sys/class/tty/console/active`, e.g. `tty0 ttyS0`), whose last entry
/// is the one /dev/console is.
pub fn other_consoles(active: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for n in active.split_whitespace() {
        let ok = !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.') && !names.iter().any(|m| m == n);
        if ok {
            names.push(n.to_string());
        }
    }
    names.pop();
    names
}

/// Opens the other active consoles, so every line reaches each of them.
/// Writes to them never block PID 1: a line that does not fit a console's
/// buffer is dropped there.
pub fn open_mirrors() {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(active) = std::fs::read_to_string("/sys/class/tty/console/active") else { return };
    let mut files = Vec::new();
    for n in other_consoles(&active) {
        // tty0 is the foreground virtual terminal, as the kernel prints.
        match std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK).open(format!("/dev/{n}")) {
            Ok(f) => files.push(f),
            Err(e) => line(&format!("kiln-init: warning console {n} (console= on the kernel command line): {e}; kiln-init's lines go to the other consoles only")),
        }
    }
    if let Ok(mut m) = MIRRORS.lock() {
        *m = files;
    }
}

pub fn open_kmsg() {
    if let Ok(f) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        if let Ok(mut k) = KMSG.lock() {
            *k = Some(f);
        }
    }
}

/// Writes a line to the console (stdout) and, at info level, to the kernel
/// log (kept off the console by the loglevel set at start).
pub fn line(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(s.as_bytes());
    let _ = out.write_all(b"\n");
    let _ = out.flush();
    if let Ok(mut m) = MIRRORS.lock() {
        if !m.is_empty() {
            let l = format!("{s}\n");
            for f in m.iter_mut() {
                let _ = f.write_all(l.as_bytes());
            }
        }
    }
    if let Ok(mut k) = KMSG.lock() {
        if let Some(f) = k.as_mut() {
            let _ = f.write_all(format!("<6>{}\n", s.trim_end()).as_bytes());
        }
    }
}

/// Emits a stable event line: `kiln-init: <name> k=v…`.
pub fn event(name: &str, fields: &[(&str, &dyn std::fmt::Display)]) {
    line(&event::format(name, fields));
}

/// A human message, prefixed like events but never parsed as one by tests
/// (the name is `info`, `warning` or `error`).
pub fn info(msg: &str) {
    for l in msg.lines() {
        line(&format!("kiln-init: info {l}"));
    }
}

pub fn warn(msg: &str) {
    for l in msg.lines() {
        line(&format!("kiln-init: warning {l}"));
    }
}

pub fn error(msg: &str) {
    for l in msg.lines() {
        line(&format!("kiln-init: error {l}"));
    }
}

#[cfg(test)]
mod tests {
    use super::other_consoles;

    #[test]
    fn every_active_console_but_the_last_is_mirrored() {
        assert_eq!(other_consoles("tty0 ttyS0\n"), ["tty0"]);
        assert_eq!(other_consoles("ttyS0 tty0\n"), ["ttyS0"]);
        assert_eq!(other_consoles("ttyAMA0\n"), Vec::<String>::new());
        assert_eq!(other_consoles(""), Vec::<String>::new());
        assert_eq!(other_consoles("ttyS0 ttyS0 tty0"), ["ttyS0"]);
        assert_eq!(other_consoles("../x ttyS1 hvc0"), ["ttyS1"]);
    }
}
