//! Reading streams the way every kiln format reader does: in chunks, to the
//! end of the data.

use std::io::{self, Read};

/// Fills `buf` from `r` until it is full or `r` ends; the number of bytes
/// read (short only at the end of the stream).
pub fn read_full(r: &mut (impl Read + ?Sized), buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out at most 3 bytes a call, with an interruption first.
    struct Trickle(Vec<u8>, bool);

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if !self.1 {
                self.1 = true;
                return Err(io::ErrorKind::Interrupted.into());
            }
            let k = buf.len().min(3).min(self.0.len());
            buf[..k].copy_from_slice(&self.0[..k]);
            self.0.drain(..k);
            Ok(k)
        }
    }

    #[test]
    fn fills_across_short_reads_and_stops_at_the_end() {
        let mut r = Trickle((0..10).collect(), false);
        let mut buf = [0u8; 8];
        assert_eq!(read_full(&mut r, &mut buf).unwrap(), 8);
        assert_eq!(buf, [0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(read_full(&mut r, &mut buf).unwrap(), 2);
        assert_eq!(read_full(&mut r, &mut buf).unwrap(), 0);
    }
}
