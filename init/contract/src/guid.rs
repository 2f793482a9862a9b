//! GUIDs as GPT and the Discoverable Partitions Specification use them:
//! one type for the builder's tables and the node's reader.

use std::fmt;
use std::str::FromStr;

/// A GUID in RFC 4122 byte order: `Guid::parse("c12a7328-f81f-…")` gives
/// bytes `c1 2a 73 28 f8 1f …`. `Display` prints it the same way (lower
/// case; sgdisk prints the same digits in upper case).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Guid(pub [u8; 16]);


#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a GUID: expected 8-4-4-4-12 hex digits, like c12a7328-f81f-11d2-ba4b-00a0c93ec93b")]
pub struct GuidError {
    pub input: String,
}

impl Guid {
    pub const NIL: Guid = Guid([0; 16]);

    /// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, either case.
    pub fn parse(s: &str) -> Result<Guid, GuidError> {
        parse_guid(s.as_bytes()).ok_or_else(|| GuidError { input: s.to_string() })
    }

    /// For constants; fails to compile on a malformed literal.
    pub const fn from_str_const(s: &str) -> Guid {
        match parse_guid(s.as_bytes()) {
            Some(g) => g,
            None => panic!("malformed GUID literal"),
        }
    }

    pub const fn from_bytes_rfc4122(bytes: [u8; 16]) -> Guid {
        Guid(bytes)
    }

    pub const fn to_bytes_rfc4122(self) -> [u8; 16] {
        self.0
    }

    /// The on-disk GPT form: the first three fields little-endian.
    pub fn to_gpt_bytes(self) -> [u8; 16] {
        let mut b = self.0;
        b[0..4].reverse();
        b[4..6].reverse();
        b[6..8].reverse();
        b
    }

    pub fn from_gpt_bytes(bytes: [u8; 16]) -> Guid {
        // The swap is its own inverse.
        Guid(Guid(bytes).to_gpt_bytes())
    }

    pub fn is_nil(self) -> bool {
        self == Guid::NIL
    }

    /// The GUID stored at `at` in an on-disk GPT structure (header or
    /// entry), or None when `b` is too short.
    pub fn from_gpt_slice(b: &[u8], at: usize) -> Option<Guid> {
        let bytes: [u8; 16] = b.get(at..at.checked_add(16)?)?.try_into().ok()?;
        Some(Guid::from_gpt_bytes(bytes))
    }

    /// PARTUUID of a root partition: the root hash's first 128 bits (the
    /// Discoverable Partitions rule).
    pub fn root_of(roothash: &[u8; 32]) -> Guid {
        Guid(crate::layout::root_uuid(roothash))
    }

    /// PARTUUID of a verity partition: the root hash's last 128 bits.
    pub fn verity_of(roothash: &[u8; 32]) -> Guid {
        Guid(crate::layout::verity_uuid(roothash))
    }
}

const fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

const fn parse_guid(s: &[u8]) -> Option<Guid> {
    if s.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    let mut i = 0;
    let mut n = 0;
    while i < 36 {
        if i == 8 || i == 13 || i == 18 || i == 23 {
            if s[i] != b'-' {
                return None;
            }
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (hex_val(s[i]), hex_val(s[i + 1])) else {
            return None;
        };
        out[n] = hi << 4 | lo;
        n += 1;
        i += 2;
    }
    Some(Guid(out))
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid({self})")
    }
}

impl FromStr for Guid {
    type Err = GuidError;
    fn from_str(s: &str) -> Result<Guid, GuidError> {
        Guid::parse(s)
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_on_disk_forms() {
        let g = Guid::parse("c12a7328-f81f-11d2-ba4b-00a0c93ec93b").unwrap();
        assert_eq!(g.to_string(), "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
        assert_eq!(Guid::parse("C12A7328-F81F-11D2-BA4B-00A0C93EC93B"), Ok(g));
        assert_eq!(g.to_gpt_bytes()[..4], [0x28, 0x73, 0x2a, 0xc1]);
        assert_eq!(Guid::from_gpt_bytes(g.to_gpt_bytes()), g);
        let mut disk = vec![0u8; 40];
        disk[20..36].copy_from_slice(&g.to_gpt_bytes());
        assert_eq!(Guid::from_gpt_slice(&disk, 20), Some(g));
        assert_eq!(Guid::from_gpt_slice(&disk, 30), None);
        assert!(Guid::parse("c12a7328f81f11d2ba4b00a0c93ec93b").is_err());
        let h: [u8; 32] = std::array::from_fn(|i| if i < 16 { (i as u8) * 0x11 } else { 0xf0 - (i as u8 - 16) * 0x0f });
        assert_eq!(Guid::root_of(&h).to_string(), "00112233-4455-6677-8899-aabbccddeeff");
        assert_eq!(Guid::verity_of(&h).to_string(), "f0e1d2c3-b4a5-9687-7869-5a4b3c2d1e0f");
    }
}
