//! The firmware's Secure Boot state, from the `SecureBoot` and `SetupMode`
//! EFI variables (efivarfs), for the `started` event.

use super::sys;
use std::path::Path;

pub const EFIVARS: &str = "/sys/firmware/efi/efivars";
const GLOBAL: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";

/// What the firmware enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Secure Boot is enforcing: the firmware ran only signed binaries.
    On,
    /// Keys are enrolled but Secure Boot is off.
    Off,
    /// No platform key: the firmware is in setup mode and checks nothing.
    Setup,
    /// Not booted through UEFI, or the firmware has no Secure Boot.
    Unsupported,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::On => "on",
            State::Off => "off",
            State::Setup => "setup",
            State::Unsupported => "unsupported",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A boolean EFI variable as efivarfs shows it: 4 bytes of attributes,
/// then the value (one byte).
fn flag(dir: &Path, name: &str) -> Option<bool> {
    let b = std::fs::read(dir.join(format!("{name}-{GLOBAL}"))).ok()?;
    (b.len() >= 5).then(|| b[4] == 1)
}

/// The state from an efivarfs directory.
pub fn state_in(dir: &Path) -> State {
    match (flag(dir, "SecureBoot"), flag(dir, "SetupMode")) {
        (Some(true), _) => State::On,
        (_, Some(true)) => State::Setup,
        (Some(false), _) => State::Off,
        (None, _) => State::Unsupported,
    }
}

/// The running firmware's state; mounts efivarfs first if it is not.
pub fn state() -> State {
    if !Path::new("/sys/firmware/efi").is_dir() {
        return State::Unsupported;
    }
    if !sys::is_mountpoint(EFIVARS) {
        let _ = sys::mount("efivarfs", EFIVARS, "efivarfs", libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, None);
    }
    state_in(Path::new(EFIVARS))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(std::path::PathBuf);
    impl Dir {
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn var(dir: &Path, name: &str, v: u8) {
        // Attributes: non-volatile, boot service and runtime access.
        std::fs::write(dir.join(format!("{name}-{GLOBAL}")), [0x06, 0, 0, 0, v]).unwrap();
    }

    #[test]
    fn reads_the_variables() {
        let dir = std::env::temp_dir().join(format!("kiln-init-efivars-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let d = Dir(dir);
        assert_eq!(state_in(d.path()), State::Unsupported);
        var(d.path(), "SecureBoot", 0);
        var(d.path(), "SetupMode", 1);
        assert_eq!(state_in(d.path()), State::Setup);
        var(d.path(), "SetupMode", 0);
        assert_eq!(state_in(d.path()), State::Off);
        var(d.path(), "SecureBoot", 1);
        assert_eq!(state_in(d.path()), State::On);
        assert_eq!(State::On.to_string(), "on");
        // A truncated variable is no answer.
        std::fs::write(d.path().join(format!("SecureBoot-{GLOBAL}")), [6, 0, 0, 0]).unwrap();
        assert_eq!(state_in(d.path()), State::Unsupported);
    }
}
