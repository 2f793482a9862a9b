//! Digests and their hex form, as the manifest, the bundles, the install
//! image and the kernel command line (`roothash=`) write them, and GPT's
//! CRC-32.

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// sha256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(data);
    h.finalize()
}

/// SHA-256 (the `sha2` crate, which ed25519-dalek already pulls in),
/// returning plain arrays.
#[derive(Clone, Default)]
pub struct Sha256(sha2::Sha256);

impl Sha256 {
    pub fn new() -> Sha256 {
        Sha256::default()
    }

    pub fn update(&mut self, data: &[u8]) {
        sha2::Digest::update(&mut self.0, data);
    }

    pub fn finalize(self) -> [u8; 32] {
        sha2::Digest::finalize(self.0).into()
    }
}

/// CRC-32 (IEEE, as zlib), which GPT uses for headers and entries.
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = flate2::Crc::new();
    c.update(data);
    c.sum()
}

/// 64 hex digits (either case) as 32 bytes.
pub fn unhex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        let d = |c: u8| (c as char).to_digit(16);
        out[i] = (d(pair[0])? * 16 + d(pair[1])?) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_fips_vectors() {
        let hexs = |d: &[u8]| hex(&sha256(d));
        assert_eq!(
            hexs(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hexs(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hexs(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        // A million 'a's, fed in awkward pieces.
        let mut h = Sha256::new();
        let a = [b'a'; 1000];
        let mut left = 1_000_000usize;
        let mut step = 1;
        while left > 0 {
            let n = step.min(left).min(a.len());
            h.update(&a[..n]);
            left -= n;
            step = step * 7 % 997 + 1;
        }
        assert_eq!(
            hex(&h.finalize()),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        );
    }

    #[test]
    fn unhex32_takes_64_digits_only() {
        let h = hex(&sha256(b"abc"));
        assert_eq!(unhex32(&h), Some(sha256(b"abc")));
        assert_eq!(unhex32(&h.to_uppercase()), Some(sha256(b"abc")));
        assert_eq!(unhex32(&h[..62]), None);
        assert_eq!(unhex32(&format!("{}zz", &h[..62])), None);
        assert_eq!(unhex32("+0".repeat(32).as_str()), None);
    }
}
