//! Small syscall wrappers shared by the netlink and DHCP sockets.

use std::io;
use std::mem;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

pub(crate) fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub(crate) fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// A close-on-exec socket: PID 1 execs k0s later and must not leak these.
pub(crate) fn socket(
    domain: libc::c_int,
    ty: libc::c_int,
    proto: libc::c_int,
) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the returned descriptor is owned by nobody else.
    let fd = cvt(unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) })?;
    // SAFETY: fd was just returned by socket(2) and is valid.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn setsockopt<T>(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: value points to a live T of the length passed.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// `now + timeout`, without the panic std's `+` has on overflow.
pub(crate) fn deadline(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(now)
}

/// Waits until `fd` is readable or `deadline` passes; `Ok(false)` on timeout.
pub(crate) fn wait_readable(fd: RawFd, deadline: Instant) -> io::Result<bool> {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        // Round up, so a sub-millisecond remainder does not become a busy loop.
        let ms = (deadline - now)
            .as_millis()
            .saturating_add(1)
            .min(i32::MAX as u128) as libc::c_int;
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r > 0 {
            if pfd.revents & libc::POLLNVAL != 0 {
                return Err(io::Error::from_raw_os_error(libc::EBADF));
            }
            // POLLERR too: the pending error comes out of the next recv.
            return Ok(true);
        }
    }
}

/// 64 random bits from getrandom(2). Early in boot the pool may not be ready
/// (or the syscall may be missing), so fall back to clocks, pid and `salt`:
/// good enough for a DHCP xid and retransmission jitter, never a panic.
pub(crate) fn random_u64(salt: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: buf is 8 writable bytes.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), libc::GRND_NONBLOCK) };
    if n == buf.len() as libc::ssize_t {
        return u64::from_ne_bytes(buf);
    }
    fallback_seed(salt)
}

fn fallback_seed(salt: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut mix = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for clock in [
        libc::CLOCK_MONOTONIC,
        libc::CLOCK_REALTIME,
        libc::CLOCK_BOOTTIME,
    ] {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: ts is a valid timespec; failure leaves it zero.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        mix(&ts.tv_sec.to_ne_bytes());
        mix(&ts.tv_nsec.to_ne_bytes());
    }
    // SAFETY: getpid cannot fail.
    mix(&unsafe { libc::getpid() }.to_ne_bytes());
    mix(salt);
    splitmix(h)
}

fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A tiny generator for retransmission jitter, seeded from [`random_u64`].
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(salt: &[u8]) -> Self {
        Rng(random_u64(salt))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        splitmix(self.0)
    }

    /// Uniform in `-1000..=1000` milliseconds (RFC 2131 §4.1's ±1 s).
    pub(crate) fn jitter_ms(&mut self) -> i32 {
        (self.next_u64() % 2001) as i32 - 1000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_seed_differs_by_salt() {
        assert_ne!(fallback_seed(b"a"), fallback_seed(b"b"));
    }

    #[test]
    fn jitter_is_bounded() {
        let mut rng = Rng(7);
        for _ in 0..10_000 {
            let j = rng.jitter_ms();
            assert!((-1000..=1000).contains(&j));
        }
    }
}
