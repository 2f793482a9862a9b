//! The hardware watchdog (`/dev/watchdog0`: i6300esb under QEMU, the SoC's
//! on boards). Armed by stage 2, petted from every wait of PID 1's loops,
//! so a hung kernel or a stuck PID 1 resets the machine; a reset on a
//! trial boot spends one of its tries like any failed boot.

use super::{console, sys};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

/// Seconds without a pet before the watchdog resets the machine.
pub const TIMEOUT: u32 = 60;
/// PID 1 pets at least this often (its waits are capped to it).
pub const PET_EVERY: std::time::Duration = std::time::Duration::from_secs(15);

static DOG: Mutex<Option<File>> = Mutex::new(None);

const WDIOC_SETTIMEOUT: libc::c_ulong = 0xC004_5706;

/// Opens and arms the first watchdog device, if there is one.
pub fn arm() {
    let Some(dev) = ["/dev/watchdog0", "/dev/watchdog"].into_iter().find(|d| std::path::Path::new(d).exists()) else {
        console::info("no watchdog device: a hung kernel is not reset (a trial boot's try is spent at the next power cycle)");
        return;
    };
    match OpenOptions::new().write(true).open(dev) {
        Ok(f) => {
            let mut t: libc::c_int = TIMEOUT as libc::c_int;
            // SAFETY: WDIOC_SETTIMEOUT reads and writes one int.
            let r = unsafe { libc::ioctl(f.as_raw_fd(), WDIOC_SETTIMEOUT as _, &mut t) };
            let timeout = if r == 0 { t.to_string() } else { "driver default".into() };
            console::event("watchdog-armed", &[("dev", &dev), ("timeout", &timeout)]);
            if let Ok(mut d) = DOG.lock() {
                *d = Some(f);
            }
        }
        Err(e) => console::warn(&format!("watchdog {dev}: {e}; a hung kernel is not reset")),
    }
}

/// Tells the watchdog PID 1 is alive.
pub fn pet() {
    if let Ok(mut d) = DOG.lock() {
        if let Some(f) = d.as_mut() {
            let _ = f.write_all(b"\0");
        }
    }
}

/// Whether a watchdog is armed.
pub fn armed() -> bool {
    DOG.lock().is_ok_and(|d| d.is_some())
}

/// Pets the watchdog and reaps children forever: where a node that cannot
/// go on waits (maintenance), still answering Ctrl-Alt-Del and power keys.
pub fn idle_forever() -> ! {
    loop {
        sys::reap();
        pet();
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}
