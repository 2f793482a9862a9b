//! Device-mapper through its ioctls on /dev/mapper/control (interface
//! version 4, `linux/dm-ioctl.h`): create a device, load a table, resume.
//! No libdevmapper, no dmsetup.
//!
//! `struct dm_ioctl` is 312 bytes of fixed-size fields with the one u64
//! (`dev`) at offset 40, the same on every architecture; it is encoded byte
//! by byte so no `repr(C)` padding question arises on 32-bit ARM.

/// `sizeof(struct dm_ioctl)`.
pub const IOCTL_SIZE: usize = 312;
pub const NAME_LEN: usize = 128;
pub const UUID_LEN: usize = 129;
/// `sizeof(struct dm_target_spec)`.
pub const TARGET_SPEC_SIZE: usize = 40;
pub const MAX_TYPE_NAME: usize = 16;
/// The interface version asked for; the kernel accepts any 4.x at least this.
pub const VERSION: [u32; 3] = [4, 0, 0];

pub const READONLY_FLAG: u32 = 1 << 0;
pub const SUSPEND_FLAG: u32 = 1 << 1;

pub const CONTROL: &str = "/dev/mapper/control";

/// Room for what the kernel writes back.
const REPLY_SIZE: usize = 16 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmd {
    Version = 0,
    DevCreate = 3,
    DevRemove = 4,
    DevSuspend = 6,
    DevStatus = 7,
    TableLoad = 9,
}

impl Cmd {
    /// `_IOWR(0xfd, nr, struct dm_ioctl)`.
    pub fn request(self) -> u32 {
        (3 << 30) | ((IOCTL_SIZE as u32) << 16) | (0xfd << 8) | self as u32
    }

    fn name(self) -> &'static str {
        match self {
            Cmd::Version => "DM_VERSION",
            Cmd::DevCreate => "DM_DEV_CREATE",
            Cmd::DevRemove => "DM_DEV_REMOVE",
            Cmd::DevSuspend => "DM_DEV_SUSPEND",
            Cmd::DevStatus => "DM_DEV_STATUS",
            Cmd::TableLoad => "DM_TABLE_LOAD",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DmError {
    #[error("device-mapper name {0:?} is empty or longer than 127 bytes")]
    BadName(String),
    #[error("device-mapper target type {0:?} is empty or longer than 15 bytes")]
    BadType(String),
    #[error("device-mapper target parameters contain a NUL byte")]
    BadParams,
    #[error("{CONTROL}: {0}. Is device-mapper (CONFIG_BLK_DEV_DM) in the kernel?")]
    Control(std::io::Error),
    #[error("{cmd} on {name:?}: {source}")]
    Ioctl { cmd: &'static str, name: String, source: std::io::Error },
    #[error("{cmd}: the kernel's reply is short or of another interface version")]
    Reply { cmd: &'static str },
}

/// One line of a table: `start length type params`, in 512-byte sectors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub start: u64,
    pub length: u64,
    pub kind: String,
    pub params: String,
}

/// Encodes a `struct dm_ioctl` for device `name` with `flags`, followed by
/// `targets` (each a `struct dm_target_spec`, its NUL-terminated parameter
/// string, padded to 8 bytes). The buffer is at least `min_size` bytes so the
/// kernel has room to reply.
pub fn encode(name: &str, flags: u32, targets: &[Target], min_size: usize) -> Result<Vec<u8>, DmError> {
    if name.is_empty() || name.len() >= NAME_LEN || name.contains('\0') {
        return Err(DmError::BadName(name.into()));
    }
    let mut buf = vec![0u8; IOCTL_SIZE];
    for t in targets {
        if t.kind.is_empty() || t.kind.len() >= MAX_TYPE_NAME || t.kind.contains('\0') {
            return Err(DmError::BadType(t.kind.clone()));
        }
        if t.params.contains('\0') {
            return Err(DmError::BadParams);
        }
        let len = (TARGET_SPEC_SIZE + t.params.len() + 1).next_multiple_of(8);
        let mut spec = vec![0u8; len];
        spec[0..8].copy_from_slice(&t.start.to_ne_bytes());
        spec[8..16].copy_from_slice(&t.length.to_ne_bytes());
        // status (s32) stays 0; next = offset of the following spec.
        spec[20..24].copy_from_slice(&(len as u32).to_ne_bytes());
        spec[24..24 + t.kind.len()].copy_from_slice(t.kind.as_bytes());
        spec[TARGET_SPEC_SIZE..TARGET_SPEC_SIZE + t.params.len()].copy_from_slice(t.params.as_bytes());
        buf.extend_from_slice(&spec);
    }
    if buf.len() < min_size {
        buf.resize(min_size, 0);
    }
    for (i, v) in VERSION.iter().enumerate() {
        buf[4 * i..4 * i + 4].copy_from_slice(&v.to_ne_bytes());
    }
    let size = buf.len() as u32;
    buf[12..16].copy_from_slice(&size.to_ne_bytes()); // data_size
    buf[16..20].copy_from_slice(&(IOCTL_SIZE as u32).to_ne_bytes()); // data_start
    buf[20..24].copy_from_slice(&(targets.len() as u32).to_ne_bytes()); // target_count
    buf[28..32].copy_from_slice(&flags.to_ne_bytes());
    buf[48..48 + name.len()].copy_from_slice(name.as_bytes());
    Ok(buf)
}

/// The fields of the kernel's reply that callers use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    pub version: [u32; 3],
    pub flags: u32,
    pub target_count: u32,
    pub open_count: i32,
    /// `huge_encode_dev` form.
    pub dev: u64,
}

impl Reply {
    pub fn decode(buf: &[u8]) -> Option<Reply> {
        if buf.len() < IOCTL_SIZE {
            return None;
        }
        let u32_at = |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        let mut dev = [0u8; 8];
        dev.copy_from_slice(&buf[40..48]);
        Some(Reply { version: [u32_at(0), u32_at(4), u32_at(8)], flags: u32_at(28), target_count: u32_at(20), open_count: u32_at(24) as i32, dev: u64::from_ne_bytes(dev) })
    }

    /// (major, minor) of the device.
    pub fn devno(&self) -> (u32, u32) {
        let d = self.dev;
        (((d & 0xfff00) >> 8) as u32, ((d & 0xff) | ((d >> 12) & 0xfff00)) as u32)
    }
}

/// The dm-verity table for a root of `data_blocks` blocks of `block_size`
/// bytes, with the hash tree one hash block into `hash_dev` (after the
/// veritysetup superblock). `salt` is hex, or `-` for none.
#[allow(clippy::too_many_arguments)]
pub fn verity_target(data_dev: (u32, u32), hash_dev: (u32, u32), data_block_size: u32, hash_block_size: u32, data_blocks: u64, root_hex: &str, salt_hex: &str, on_corruption: Option<&str>) -> Target {
    let mut params = format!(
        "1 {}:{} {}:{} {data_block_size} {hash_block_size} {data_blocks} 1 sha256 {root_hex} {salt_hex}",
        data_dev.0, data_dev.1, hash_dev.0, hash_dev.1
    );
    if let Some(a) = on_corruption {
        params.push_str(" 1 ");
        params.push_str(a);
    }
    Target { start: 0, length: data_blocks * (data_block_size as u64 / 512), kind: "verity".into(), params }
}

#[cfg(target_os = "linux")]
pub use control::Control;

#[cfg(target_os = "linux")]
mod control {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// An open /dev/mapper/control.
    pub struct Control(OwnedFd);

    impl Control {
        /// Opens the control node, creating it from sysfs when devtmpfs did
        /// not (it normally does, as `mapper/control`).
        pub fn open() -> Result<Control, DmError> {
            if !std::path::Path::new(CONTROL).exists() {
                let _ = std::fs::create_dir_all("/dev/mapper");
                if let Ok(s) = std::fs::read_to_string("/sys/class/misc/device-mapper/dev") {
                    if let Some((ma, mi)) = s.trim().split_once(':') {
                        if let (Ok(ma), Ok(mi)) = (ma.parse::<u32>(), mi.parse::<u32>()) {
                            // SAFETY: valid C string; a char device node.
                            unsafe { libc::mknod(c"/dev/mapper/control".as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(ma, mi)) };
                        }
                    }
                }
            }
            // SAFETY: valid C string.
            let fd = unsafe { libc::open(c"/dev/mapper/control".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(DmError::Control(std::io::Error::last_os_error()));
            }
            // SAFETY: fd was just opened and is owned here.
            Ok(Control(unsafe { OwnedFd::from_raw_fd(fd) }))
        }

        fn call(&self, cmd: Cmd, name: &str, mut buf: Vec<u8>) -> Result<Reply, DmError> {
            // SAFETY: buf is a live, writable buffer of the size its header
            // declares in data_size.
            let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), cmd.request() as _, buf.as_mut_ptr()) };
            if rc < 0 {
                return Err(DmError::Ioctl { cmd: cmd.name(), name: name.into(), source: std::io::Error::last_os_error() });
            }
            let r = Reply::decode(&buf).ok_or(DmError::Reply { cmd: cmd.name() })?;
            if r.version[0] != VERSION[0] {
                return Err(DmError::Reply { cmd: cmd.name() });
            }
            Ok(r)
        }

        /// The kernel's interface version.
        pub fn version(&self) -> Result<[u32; 3], DmError> {
            let buf = encode("-", 0, &[], REPLY_SIZE)?;
            self.call(Cmd::Version, "-", buf).map(|r| r.version)
        }

        pub fn create(&self, name: &str) -> Result<Reply, DmError> {
            self.call(Cmd::DevCreate, name, encode(name, 0, &[], REPLY_SIZE)?)
        }

        /// Loads `targets` as the inactive table.
        pub fn load(&self, name: &str, flags: u32, targets: &[Target]) -> Result<Reply, DmError> {
            self.call(Cmd::TableLoad, name, encode(name, flags, targets, REPLY_SIZE)?)
        }

        /// Makes the loaded table live.
        pub fn resume(&self, name: &str) -> Result<Reply, DmError> {
            self.call(Cmd::DevSuspend, name, encode(name, 0, &[], REPLY_SIZE)?)
        }

        pub fn remove(&self, name: &str) -> Result<Reply, DmError> {
            self.call(Cmd::DevRemove, name, encode(name, 0, &[], REPLY_SIZE)?)
        }

        pub fn status(&self, name: &str) -> Result<Reply, DmError> {
            self.call(Cmd::DevStatus, name, encode(name, 0, &[], REPLY_SIZE)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        // From <linux/dm-ioctl.h> as compiled on x86_64 and arm.
        assert_eq!(Cmd::Version.request(), 0xc138_fd00);
        assert_eq!(Cmd::DevCreate.request(), 0xc138_fd03);
        assert_eq!(Cmd::DevRemove.request(), 0xc138_fd04);
        assert_eq!(Cmd::DevSuspend.request(), 0xc138_fd06);
        assert_eq!(Cmd::DevStatus.request(), 0xc138_fd07);
        assert_eq!(Cmd::TableLoad.request(), 0xc138_fd09);
    }

    fn le(v: u32) -> [u8; 4] {
        v.to_ne_bytes()
    }

    #[test]
    fn golden_table_load() {
        let t = Target { start: 0, length: 8, kind: "verity".into(), params: "abc".into() };
        let buf = encode("root", READONLY_FLAG, &[t], 0).unwrap();
        // 312 header + 40 spec + "abc\0", padded to 8.
        let mut want = vec![0u8; 360];
        want[0..4].copy_from_slice(&le(4));
        want[12..16].copy_from_slice(&le(360));
        want[16..20].copy_from_slice(&le(312));
        want[20..24].copy_from_slice(&le(1));
        want[28..32].copy_from_slice(&le(READONLY_FLAG));
        want[48..52].copy_from_slice(b"root");
        want[320..328].copy_from_slice(&8u64.to_ne_bytes());
        want[332..336].copy_from_slice(&le(48));
        want[336..342].copy_from_slice(b"verity");
        want[352..355].copy_from_slice(b"abc");
        assert_eq!(buf, want);
        if cfg!(target_endian = "little") {
            assert_eq!(&buf[..32], b"\x04\0\0\0\0\0\0\0\0\0\0\0\x68\x01\0\0\x38\x01\0\0\x01\0\0\0\0\0\0\0\x01\0\0\0");
        }
    }

    #[test]
    fn header_only_with_reply_room() {
        let buf = encode("root", 0, &[], 16384).unwrap();
        assert_eq!(buf.len(), 16384);
        assert_eq!(&buf[12..16], &le(16384));
        assert_eq!(&buf[20..24], &le(0));
        assert!(buf[52..].iter().all(|b| *b == 0));
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(matches!(encode("", 0, &[], 0), Err(DmError::BadName(_))));
        assert!(matches!(encode(&"x".repeat(128), 0, &[], 0), Err(DmError::BadName(_))));
        assert!(encode(&"x".repeat(127), 0, &[], 0).is_ok());
        let t = |k: &str, p: &str| Target { start: 0, length: 1, kind: k.into(), params: p.into() };
        assert!(matches!(encode("r", 0, &[t("a-very-long-target-type", "")], 0), Err(DmError::BadType(_))));
        assert!(matches!(encode("r", 0, &[t("verity", "a\0b")], 0), Err(DmError::BadParams)));
    }

    #[test]
    fn reply_devno() {
        let mut buf = encode("root", 0, &[], 0).unwrap();
        // huge_encode_dev(MKDEV(253, 0x1234)) = minor low byte | major << 8 | minor high << 12
        let dev: u64 = 0x34 | (253 << 8) | (0x12 << 20);
        buf[40..48].copy_from_slice(&dev.to_ne_bytes());
        let r = Reply::decode(&buf).unwrap();
        assert_eq!(r.devno(), (253, 0x1234));
        assert_eq!(r.version, VERSION);
        assert!(Reply::decode(&buf[..100]).is_none());
    }

    #[test]
    fn verity_table_line() {
        let t = verity_target((254, 2), (254, 3), 4096, 4096, 1000, "ab", "cd", Some("restart_on_corruption"));
        assert_eq!(t.length, 8000);
        assert_eq!(t.kind, "verity");
        assert_eq!(t.params, "1 254:2 254:3 4096 4096 1000 1 sha256 ab cd 1 restart_on_corruption");
        assert!(!verity_target((1, 2), (3, 4), 4096, 4096, 1, "ab", "-", None).params.contains("corruption"));
    }
}
