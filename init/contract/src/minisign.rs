//! The minisign format (ed25519): public key files, `.minisig` files, and
//! verifying data against them the way `minisign -V` does.
//!
//! The node uses this to check signed node configs against
//! `/etc/kiln/config.pub`; the builder (`kiln::provenance::sign`) adds key generation and
//! signing on top, and shares the parsing helpers below, so there is one
//! copy of the format. Only formats live here: reading the files is the
//! caller's job, which also names the path in its error.
//!
//! Layouts (all integers little-endian), as minisign 0.11 writes them:
//! - public key: `"Ed" || key id (8) || ed25519 public key (32)`
//! - secret key: `"Ed" || kdf "\0\0" || "B2" || salt (32) || opslimit (8) ||
//!   memlimit (8) || key id (8) || seed||public key (64) || checksum (32)`,
//!   where checksum = BLAKE2b-256(`"Ed" || key id || seed||public key`)
//! - signature: `"ED" || key id (8) || ed25519(BLAKE2b-512(data)) (64)`, then a
//!   trusted comment line, then ed25519(signature || trusted comment).

use std::fmt;

use blake2::{Blake2b512, Digest};
use ed25519_dalek::{Signature, VerifyingKey};

pub const UNTRUSTED_PREFIX: &str = "untrusted comment: ";
pub const TRUSTED_PREFIX: &str = "trusted comment: ";

/// Legacy mode: the signature covers the data itself. Verified, never made.
/// Also the algorithm tag of key files.
pub const SIG_ALG_LEGACY: [u8; 2] = *b"Ed";
/// Prehashed mode: the signature covers BLAKE2b-512 of the data.
pub const SIG_ALG_HASHED: [u8; 2] = *b"ED";

pub const PUBLIC_KEY_LEN: usize = 2 + 8 + 32;
pub const SIGNATURE_LEN: usize = 2 + 8 + 64;

/// Errors from parsing key and signature files and from verifying.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("malformed {file}, line {line}: {reason}")]
    Malformed {
        file: &'static str,
        line: usize,
        reason: String,
    },
    #[error(
        "the secret key is encrypted with a password, which kiln cannot prompt for; \
         create an unencrypted key with `kiln key generate` or `minisign -G -W`, \
         or remove the password with `minisign -C -W -s <file>`"
    )]
    EncryptedSecretKey,
    #[error("unsupported {what} {found:?} in {file}; kiln understands minisign's ed25519 keys and signatures only")]
    Unsupported {
        file: &'static str,
        what: &'static str,
        found: String,
    },
    #[error("secret key checksum does not match: the key file is corrupt or was edited")]
    SecretKeyChecksum,
    #[error("secret key is inconsistent: its public half does not belong to its seed")]
    SecretKeyMismatch,
    #[error("signature was made by key {found}, but the public key given is {expected}; verify with the matching public key")]
    WrongKey { expected: KeyId, found: KeyId },
    #[error("signature does not match the data: the file was modified after signing, or the signature is corrupt")]
    BadSignature,
    #[error("trusted comment signature is invalid: the trusted comment (or its signature line) was modified")]
    BadTrustedComment,
}

/// The 8 random bytes minisign uses to tell keys apart. Shown as minisign
/// shows it: the bytes read as a little-endian u64, in upper-case hex without
/// leading zeros.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}", u64::from_le_bytes(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// A verifying key with its minisign key id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    id: KeyId,
    key: VerifyingKey,
}

impl PublicKey {
    pub fn new(id: KeyId, key: VerifyingKey) -> PublicKey {
        PublicKey { id, key }
    }

    pub fn key_id(&self) -> KeyId {
        self.id
    }

    pub fn to_file(&self) -> String {
        format!(
            "{UNTRUSTED_PREFIX}minisign public key {}\n{}\n",
            self.id,
            self.to_base64()
        )
    }

    /// The bare key, as `minisign -P` takes it.
    pub fn to_base64(&self) -> String {
        let mut raw = Vec::with_capacity(PUBLIC_KEY_LEN);
        raw.extend_from_slice(&SIG_ALG_LEGACY);
        raw.extend_from_slice(&self.id.0);
        raw.extend_from_slice(self.key.as_bytes());
        b64_encode(&raw)
    }

    /// Reads a public key file, or a bare base64 key as `minisign -P` takes.
    pub fn from_file(s: &str) -> Result<Self, SignError> {
        const FILE: &str = "public key";
        let lines = file_lines(s);
        let key_line = if lines
            .first()
            .is_some_and(|l| l.starts_with(UNTRUSTED_PREFIX))
        {
            2
        } else {
            1
        };
        let raw = decode_line(FILE, &lines, key_line, PUBLIC_KEY_LEN)?;
        let (sig_alg, rest) = raw.split_at(2);
        let (id, pk) = rest.split_at(8);
        if sig_alg != SIG_ALG_LEGACY {
            return Err(unsupported(FILE, "signature algorithm", sig_alg));
        }
        let key = VerifyingKey::from_bytes(&to_array(pk)).map_err(|_| SignError::Malformed {
            file: FILE,
            line: key_line,
            reason: "not a valid ed25519 public key".into(),
        })?;
        Ok(PublicKey {
            id: KeyId(to_array(id)),
            key,
        })
    }

    /// Checks a `.minisig` file against `data` the way `minisign -V` does and
    /// returns the trusted comment. Accepts prehashed and legacy signatures.
    pub fn verify(&self, data: &[u8], minisig: &str) -> Result<String, SignError> {
        const FILE: &str = "signature";
        let lines = file_lines(minisig);
        expect_untrusted_comment(FILE, &lines, 1)?;
        let raw = decode_line(FILE, &lines, 2, SIGNATURE_LEN)?;
        let comment = match lines.get(2) {
            Some(line) => {
                line.strip_prefix(TRUSTED_PREFIX)
                    .ok_or_else(|| SignError::Malformed {
                        file: FILE,
                        line: 3,
                        reason: format!("expected a line starting with {TRUSTED_PREFIX:?}"),
                    })?
            }
            None => return Err(missing_line(FILE, 3, "the trusted comment")),
        };
        let global: [u8; 64] = to_array(&decode_line(FILE, &lines, 4, 64)?);

        let (sig_alg, rest) = raw.split_at(2);
        let (id, signature) = rest.split_at(8);
        let id = KeyId(to_array(id));
        let signature: [u8; 64] = to_array(signature);
        if id != self.id {
            return Err(SignError::WrongKey {
                expected: self.id,
                found: id,
            });
        }
        let signed = if sig_alg == SIG_ALG_HASHED {
            self.key.verify_strict(
                &Blake2b512::digest(data),
                &Signature::from_bytes(&signature),
            )
        } else if sig_alg == SIG_ALG_LEGACY {
            self.key
                .verify_strict(data, &Signature::from_bytes(&signature))
        } else {
            return Err(unsupported(FILE, "signature algorithm", sig_alg));
        };
        signed.map_err(|_| SignError::BadSignature)?;

        let mut global_msg = Vec::with_capacity(64 + comment.len());
        global_msg.extend_from_slice(&signature);
        global_msg.extend_from_slice(comment.as_bytes());
        self.key
            .verify_strict(&global_msg, &Signature::from_bytes(&global))
            .map_err(|_| SignError::BadTrustedComment)?;
        Ok(comment.to_string())
    }
}

/// Lines without their terminator ("\n" or "\r\n"), as minisign trims them.
pub fn file_lines(s: &str) -> Vec<&str> {
    s.split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect()
}

/// Checks that line `line` (1-based) is an untrusted comment.
pub fn expect_untrusted_comment(
    file: &'static str,
    lines: &[&str],
    line: usize,
) -> Result<(), SignError> {
    match lines.get(line - 1) {
        Some(l) if l.starts_with(UNTRUSTED_PREFIX) => Ok(()),
        _ => Err(SignError::Malformed {
            file,
            line,
            reason: format!("expected a line starting with {UNTRUSTED_PREFIX:?}"),
        }),
    }
}

fn missing_line(file: &'static str, line: usize, what: &str) -> SignError {
    SignError::Malformed {
        file,
        line,
        reason: format!("file ends before {what}"),
    }
}

/// Decodes base64 line `line` (1-based) and checks its decoded length.
pub fn decode_line(
    file: &'static str,
    lines: &[&str],
    line: usize,
    len: usize,
) -> Result<Vec<u8>, SignError> {
    let text = lines
        .get(line - 1)
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .ok_or_else(|| missing_line(file, line, "the base64 data"))?;
    let raw = b64_decode(text).map_err(|reason| SignError::Malformed { file, line, reason })?;
    if raw.len() != len {
        return Err(SignError::Malformed {
            file,
            line,
            reason: format!("expected {len} bytes of base64 data, found {}", raw.len()),
        });
    }
    Ok(raw)
}

pub fn unsupported(file: &'static str, what: &'static str, found: &[u8]) -> SignError {
    SignError::Unsupported {
        file,
        what,
        found: String::from_utf8_lossy(found).into_owned(),
    }
}

/// A fixed-size copy of `b`. Callers check the length first.
pub fn to_array<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(b);
    a
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn b64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Strict standard base64 with padding, as libsodium's original variant.
pub fn b64_decode(text: &str) -> Result<Vec<u8>, String> {
    let bytes = text.as_bytes();
    let quads = bytes.chunks_exact(4);
    if !quads.remainder().is_empty() {
        return Err(format!(
            "invalid base64: length {} is not a multiple of 4",
            bytes.len()
        ));
    }
    let groups = quads.len();
    let mut out = Vec::with_capacity(groups * 3);
    for (g, quad) in quads.enumerate() {
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && g + 1 != groups) {
            return Err("invalid base64: misplaced '=' padding".into());
        }
        let mut n = 0u32;
        for (i, &c) in quad[..4 - pad].iter().enumerate() {
            let v = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                _ => {
                    return Err(format!(
                        "invalid base64: unexpected character {:?} at column {}",
                        char::from(c),
                        g * 4 + i + 1
                    ))
                }
            };
            n |= u32::from(v) << (18 - 6 * i);
        }
        let keep = 3 - pad;
        if n & ((1 << (8 * pad)) - 1) != 0 {
            return Err("invalid base64: non-zero bits in the last character".into());
        }
        out.extend_from_slice(&n.to_be_bytes()[1..1 + keep]);
    }
    Ok(out)
}

/// A signature made by minisign itself, for tests here and of the node's
/// config sources.
#[doc(hidden)]
pub mod vectors {
    /// Made by Debian's minisign 0.11 (`minisign -G -W`, then
    /// `minisign -S -m node.toml -t "kiln test vector"`), so the node's
    /// verifier is checked against minisign itself without running it. The
    /// key id has a leading zero nibble, which minisign does not print.
    pub const VEC_PUB: &str = "untrusted comment: minisign public key 33DD12F3591D808\n\
                           RWQI2JE1L9E9A/noPNGvJEkYg0Fasm7I45n0TdoKChqPj8oV+izZcrHN\n";
    pub const VEC_DATA: &[u8] = b"role = \"single\"\n";
    pub const VEC_SIG: &str = "untrusted comment: signature from minisign secret key\n\
        RUQI2JE1L9E9A6NRPuCtWDIxkcfQoGDZOgbmaCUiFngxhDsHmgo2XIEjp9yzjhU9b6xcuuCl3x4GiXHMN7kNYXEffStAvSdQSAE=\n\
        trusted comment: kiln test vector\n\
        8qpCeot6r2FgkjA+sI70gKOBVfkQWcQ06KLjhPKxg7cqQabYwlkD09UaapL/uFpwoDCUgiZQDyQrUKFAHYlmCA==\n";
}

#[cfg(test)]
mod tests {
    use super::vectors::*;
    use super::*;
    use proptest::prelude::*;

    /// From `minisign -G`: key id bytes 77 0d c6 41 f8 54 28 ac.
    const PUB: &str = "untrusted comment: minisign public key AC2854F841C60D77\n\
                       RWR3DcZB+FQorG7K9Fc4Oj7YBicVzTFKMp44mI0B/YTJ+g90rJSjhj0t\n";

    #[test]
    fn verifies_minisigns_own_signature() {
        let pk = PublicKey::from_file(VEC_PUB).unwrap();
        assert_eq!(pk.to_file(), VEC_PUB);
        assert_eq!(pk.verify(VEC_DATA, VEC_SIG).unwrap(), "kiln test vector");
    }

    #[test]
    fn refuses_any_flipped_byte() {
        let pk = PublicKey::from_file(VEC_PUB).unwrap();
        for i in 0..VEC_DATA.len() {
            for bit in [0x01, 0x80] {
                let mut d = VEC_DATA.to_vec();
                d[i] ^= bit;
                assert!(
                    matches!(pk.verify(&d, VEC_SIG), Err(SignError::BadSignature)),
                    "byte {i}"
                );
            }
        }
        // Every byte of the signature and of the global signature, decoded.
        let lines: Vec<&str> = VEC_SIG.lines().collect();
        for line in [1, 3] {
            let raw = b64_decode(lines[line]).unwrap();
            for i in 0..raw.len() {
                let mut r = raw.clone();
                r[i] ^= 1;
                let mut l: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
                l[line] = b64_encode(&r);
                let sig = l.join("\n") + "\n";
                assert!(pk.verify(VEC_DATA, &sig).is_err(), "line {line} byte {i}");
            }
        }
        let other = PublicKey::from_file(PUB).unwrap();
        assert!(matches!(
            other.verify(VEC_DATA, VEC_SIG),
            Err(SignError::WrongKey { .. })
        ));
        assert!(pk
            .verify(VEC_DATA, &VEC_SIG.replace("vector", "vectoR"))
            .is_err());
        assert!(pk.verify(VEC_DATA, &VEC_SIG.replace('\n', "\r\n")).is_ok());
    }

    #[test]
    fn base64_round_trips() {
        for len in 0..10 {
            let data: Vec<u8> = (0..len as u8).map(|b| b.wrapping_mul(37)).collect();
            let enc = b64_encode(&data);
            assert_eq!(b64_decode(&enc).unwrap(), data, "{enc}");
        }
        assert_eq!(b64_encode(b"foob"), "Zm9vYg==");
        assert!(b64_decode("Zm9vYh==").is_err());
        assert!(b64_decode("Zm9=Yg==").is_err());
        assert!(b64_decode("Zm9vY").is_err());
    }

    #[test]
    fn key_id_shows_like_minisign() {
        // From `minisign -G`: bytes 77 0d c6 41 f8 54 28 ac.
        let pk = PublicKey::from_file(PUB).unwrap();
        assert_eq!(pk.key_id().to_string(), "AC2854F841C60D77");
        assert_eq!(
            pk.to_base64(),
            "RWR3DcZB+FQorG7K9Fc4Oj7YBicVzTFKMp44mI0B/YTJ+g90rJSjhj0t"
        );
        assert_eq!(PublicKey::from_file(&pk.to_base64()).unwrap(), pk);
        assert_eq!(pk.to_file(), PUB);
    }

    #[test]
    fn errors_name_the_line() {
        let err = PublicKey::from_file("untrusted comment: x\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
        let pk = PublicKey::from_file(PUB).unwrap();
        let err = pk.verify(b"x", "untrusted comment: x\n!!!!\n").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        let err = pk.verify(b"x", "no comment\n").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    proptest! {
        #[test]
        fn arbitrary_input_never_panics(s in ".{0,400}", data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let pk = PublicKey::from_file(PUB).unwrap();
            let _ = PublicKey::from_file(&s);
            let _ = pk.verify(&data, &s);
            let _ = b64_decode(&s);
        }

        #[test]
        fn near_valid_input_never_panics(b64 in "[A-Za-z0-9+/=]{0,220}", comment in "\\PC{0,40}") {
            let pk = PublicKey::from_file(PUB).unwrap();
            let _ = PublicKey::from_file(&b64);
            let sig = format!("untrusted comment: x\n{b64}\ntrusted comment: {comment}\n{b64}\n");
            let _ = pk.verify(b"x", &sig);
        }
    }
}
