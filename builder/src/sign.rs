//! Signs `manifest.json` in minisign format (ed25519), so that a plain
//! `minisign -Vm manifest.json -p kiln.pub` accepts it.
//!
//! Only the formats live here: key files, `.minisig` files, signing and
//! verifying bytes. Reading and writing the files is the caller's job, which
//! also names the path in its error context.
//!
//! Layouts (all integers little-endian), as minisign 0.11 writes them:
//! - public key: `"Ed" || key id (8) || ed25519 public key (32)`
//! - secret key: `"Ed" || kdf "\0\0" || "B2" || salt (32) || opslimit (8) ||
//!   memlimit (8) || key id (8) || seed||public key (64) || checksum (32)`,
//!   where checksum = BLAKE2b-256(`"Ed" || key id || seed||public key`)
//! - signature: `"ED" || key id (8) || ed25519(BLAKE2b-512(data)) (64)`, then a
//!   trusted comment line, then ed25519(signature || trusted comment).

use std::fmt;

use blake2::digest::consts::U32;
use blake2::{Blake2b, Blake2b512, Digest};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::{OsRng, RngCore};

const UNTRUSTED_PREFIX: &str = "untrusted comment: ";
const TRUSTED_PREFIX: &str = "trusted comment: ";

/// Legacy mode: the signature covers the data itself. Verified, never made.
const SIG_ALG_LEGACY: [u8; 2] = *b"Ed";
/// Prehashed mode: the signature covers BLAKE2b-512 of the data.
const SIG_ALG_HASHED: [u8; 2] = *b"ED";
const KDF_NONE: [u8; 2] = [0, 0];
const KDF_SCRYPT: [u8; 2] = *b"Sc";
const CHK_BLAKE2B: [u8; 2] = *b"B2";

const PUBLIC_KEY_LEN: usize = 2 + 8 + 32;
const SECRET_KEY_LEN: usize = 2 + 2 + 2 + 32 + 8 + 8 + 8 + 64 + 32;
const SIGNATURE_LEN: usize = 2 + 8 + 64;

/// minisign 0.11 refuses to write trusted comments much longer than this
/// ("xfprintf() overflow"), so we never make one it could not have made.
pub const MAX_TRUSTED_COMMENT: usize = 4096;

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
/// shows it: the bytes read as a little-endian u64, in upper-case hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", u64::from_le_bytes(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// A signing key with its minisign key id.
pub struct KeyPair {
    id: KeyId,
    key: SigningKey,
}

/// A verifying key with its minisign key id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    id: KeyId,
    key: VerifyingKey,
}

impl fmt::Debug for KeyPair {
    // Never print secret material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    pub fn generate() -> KeyPair {
        let mut id = [0u8; 8];
        OsRng.fill_bytes(&mut id);
        KeyPair {
            id: KeyId(id),
            key: SigningKey::generate(&mut OsRng),
        }
    }

    pub fn key_id(&self) -> KeyId {
        self.id
    }

    /// The unencrypted secret key file in the layout `minisign -G -W` writes
    /// (salt and KDF limits zero). Unlike minisign, the checksum is filled in,
    /// as `minisign -C -W` does, so corruption is caught on load.
    pub fn to_secret_file(&self) -> String {
        let keypair = self.key.to_keypair_bytes();
        let mut raw = Vec::with_capacity(SECRET_KEY_LEN);
        raw.extend_from_slice(&SIG_ALG_LEGACY);
        raw.extend_from_slice(&KDF_NONE);
        raw.extend_from_slice(&CHK_BLAKE2B);
        raw.extend_from_slice(&[0u8; 32 + 8 + 8]);
        raw.extend_from_slice(&self.id.0);
        raw.extend_from_slice(&keypair);
        raw.extend_from_slice(&secret_checksum(&self.id, &keypair));
        format!(
            "{UNTRUSTED_PREFIX}minisign unencrypted secret key {}\n{}\n",
            self.id,
            b64_encode(&raw)
        )
    }

    pub fn from_secret_file(s: &str) -> Result<KeyPair, SignError> {
        const FILE: &str = "secret key";
        let lines = file_lines(s);
        expect_untrusted_comment(FILE, &lines, 1)?;
        let raw = decode_line(FILE, &lines, 2, SECRET_KEY_LEN)?;

        let (sig_alg, rest) = raw.split_at(2);
        let (kdf_alg, rest) = rest.split_at(2);
        let (chk_alg, rest) = rest.split_at(2);
        // Salt and KDF limits only matter for encrypted keys.
        let rest = &rest[32 + 8 + 8..];
        let (id, rest) = rest.split_at(8);
        let (keypair, chk) = rest.split_at(64);

        if sig_alg != SIG_ALG_LEGACY {
            return Err(unsupported(FILE, "signature algorithm", sig_alg));
        }
        if kdf_alg == KDF_SCRYPT {
            return Err(SignError::EncryptedSecretKey);
        }
        if kdf_alg != KDF_NONE {
            return Err(unsupported(FILE, "key derivation", kdf_alg));
        }
        if chk_alg != CHK_BLAKE2B {
            return Err(unsupported(FILE, "checksum algorithm", chk_alg));
        }
        let id = KeyId(to_array(id));
        let keypair: [u8; 64] = to_array(keypair);
        // `minisign -G -W` leaves the checksum zero (it computes it only when
        // encrypting); `minisign -C -W` keeps the real one. Accept both.
        if chk.iter().any(|&b| b != 0) && secret_checksum(&id, &keypair)[..] != *chk {
            return Err(SignError::SecretKeyChecksum);
        }
        let key =
            SigningKey::from_keypair_bytes(&keypair).map_err(|_| SignError::SecretKeyMismatch)?;
        Ok(KeyPair { id, key })
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            id: self.id,
            key: self.key.verifying_key(),
        }
    }

    /// A complete `.minisig` file in prehashed mode. Line breaks in
    /// `trusted_comment` become spaces (the format is line-based), and it is
    /// cut to [`MAX_TRUSTED_COMMENT`] bytes; what is returned is what is
    /// signed.
    pub fn sign(&self, data: &[u8], trusted_comment: &str) -> String {
        let comment = one_line(trusted_comment);
        let signature = self.key.sign(&Blake2b512::digest(data)).to_bytes();

        let mut sig_line = Vec::with_capacity(SIGNATURE_LEN);
        sig_line.extend_from_slice(&SIG_ALG_HASHED);
        sig_line.extend_from_slice(&self.id.0);
        sig_line.extend_from_slice(&signature);

        let mut global = Vec::with_capacity(64 + comment.len());
        global.extend_from_slice(&signature);
        global.extend_from_slice(comment.as_bytes());
        let global = self.key.sign(&global).to_bytes();

        format!(
            "{UNTRUSTED_PREFIX}signature from kiln secret key {}\n{}\n{TRUSTED_PREFIX}{comment}\n{}\n",
            self.id,
            b64_encode(&sig_line),
            b64_encode(&global)
        )
    }
}

impl PublicKey {
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

fn secret_checksum(id: &KeyId, keypair: &[u8; 64]) -> [u8; 32] {
    let mut h = Blake2b::<U32>::new();
    h.update(SIG_ALG_LEGACY);
    h.update(id.0);
    h.update(keypair);
    h.finalize().into()
}

/// Lines without their terminator ("\n" or "\r\n"), as minisign trims them.
fn file_lines(s: &str) -> Vec<&str> {
    s.split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect()
}

fn expect_untrusted_comment(
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
fn decode_line(
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

fn unsupported(file: &'static str, what: &'static str, found: &[u8]) -> SignError {
    SignError::Unsupported {
        file,
        what,
        found: String::from_utf8_lossy(found).into_owned(),
    }
}

/// Callers check the length first.
fn to_array<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(b);
    a
}

fn one_line(comment: &str) -> String {
    let mut out: String = comment
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    if out.len() > MAX_TRUSTED_COMMENT {
        let mut end = MAX_TRUSTED_COMMENT;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    out
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64_encode(data: &[u8]) -> String {
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
fn b64_decode(text: &str) -> Result<Vec<u8>, String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::Path;
    use std::process::{Command, Output, Stdio};

    fn have_minisign() -> bool {
        let found = Command::new("minisign")
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            println!("skipped: minisign not installed (apt-get install minisign)");
        }
        found
    }

    fn minisign(dir: &Path, args: &[&str]) -> Output {
        Command::new("minisign")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .expect("run minisign")
    }

    fn minisign_verifies(dir: &Path, data: &[u8], sig: &str, public: &PublicKey) -> Output {
        std::fs::write(dir.join("data"), data).unwrap();
        std::fs::write(dir.join("data.minisig"), sig).unwrap();
        std::fs::write(dir.join("pub"), public.to_file()).unwrap();
        minisign(dir, &["-Vm", "data", "-p", "pub"])
    }

    /// Replaces one base64 character in the middle of `line` (0-based) with
    /// another, so decoding still succeeds but the bytes differ.
    fn tamper_line(sig: &str, line: usize) -> String {
        let mut lines: Vec<String> = sig.lines().map(str::to_string).collect();
        let l = &mut lines[line];
        let mid = l.len() / 2;
        let c = l.as_bytes()[mid];
        let new = if c == b'A' { "B" } else { "A" };
        l.replace_range(mid..mid + 1, new);
        lines.join("\n") + "\n"
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
        let pk = PublicKey::from_file(
            "untrusted comment: minisign public key AC2854F841C60D77\n\
             RWR3DcZB+FQorG7K9Fc4Oj7YBicVzTFKMp44mI0B/YTJ+g90rJSjhj0t\n",
        )
        .unwrap();
        assert_eq!(pk.key_id().to_string(), "AC2854F841C60D77");
        assert_eq!(
            pk.to_base64(),
            "RWR3DcZB+FQorG7K9Fc4Oj7YBicVzTFKMp44mI0B/YTJ+g90rJSjhj0t"
        );
        assert_eq!(PublicKey::from_file(&pk.to_base64()).unwrap(), pk);
    }

    #[test]
    fn round_trip_and_tamper() {
        let kp = KeyPair::generate();
        let kp2 = KeyPair::from_secret_file(&kp.to_secret_file()).unwrap();
        assert_eq!(kp2.public(), kp.public());
        let public = PublicKey::from_file(&kp.public().to_file()).unwrap();
        assert_eq!(public, kp.public());

        let data = b"{\"manifest\": 1}\n";
        let sig = kp.sign(data, "kiln manifest\nsecond line");
        assert_eq!(
            public.verify(data, &sig).unwrap(),
            "kiln manifest second line"
        );
        assert!(matches!(
            public.verify(b"{\"manifest\": 2}\n", &sig),
            Err(SignError::BadSignature)
        ));
        assert!(matches!(
            public.verify(data, &sig.replace("kiln manifest", "kiln manifesT")),
            Err(SignError::BadTrustedComment)
        ));
        assert!(public.verify(data, &tamper_line(&sig, 1)).is_err());
        assert!(matches!(
            public.verify(data, &tamper_line(&sig, 3)),
            Err(SignError::BadTrustedComment)
        ));
        let other = KeyPair::generate().public();
        assert!(matches!(
            other.verify(data, &sig),
            Err(SignError::WrongKey { .. })
        ));
        // CRLF line endings are tolerated, as minisign does.
        assert!(public.verify(data, &sig.replace('\n', "\r\n")).is_ok());
    }

    #[test]
    fn errors_name_the_line() {
        let kp = KeyPair::generate();
        let sig = kp.sign(b"x", "c");
        let broken = sig.replacen('\n', "\n!", 1);
        let err = kp.public().verify(b"x", &broken).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("base64"), "{err}");
        let err = PublicKey::from_file("untrusted comment: x\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn encrypted_secret_key_is_refused() {
        let kp = KeyPair::generate();
        let file = kp.to_secret_file();
        let mut raw = b64_decode(file.lines().nth(1).unwrap()).unwrap();
        raw[2..4].copy_from_slice(b"Sc");
        let enc = format!("untrusted comment: x\n{}\n", b64_encode(&raw));
        let err = KeyPair::from_secret_file(&enc).unwrap_err();
        assert!(matches!(err, SignError::EncryptedSecretKey));
        let msg = err.to_string();
        assert!(msg.contains("minisign -G -W") && msg.contains("kiln key generate"));

        raw[2..4].copy_from_slice(&KDF_NONE);
        let mut zero_chk = raw.clone();
        zero_chk[SECRET_KEY_LEN - 32..].fill(0);
        zero_chk[70] ^= 1; // the seed no longer matches the public half
        let bad = format!("untrusted comment: x\n{}\n", b64_encode(&zero_chk));
        assert!(matches!(
            KeyPair::from_secret_file(&bad),
            Err(SignError::SecretKeyMismatch)
        ));
        raw[60] ^= 1;
        let bad = format!("untrusted comment: x\n{}\n", b64_encode(&raw));
        assert!(matches!(
            KeyPair::from_secret_file(&bad),
            Err(SignError::SecretKeyChecksum)
        ));
    }

    #[test]
    fn long_trusted_comment_is_cut_to_what_minisign_accepts() {
        let kp = KeyPair::generate();
        let sig = kp.sign(b"x", &"é".repeat(MAX_TRUSTED_COMMENT));
        let comment = kp.public().verify(b"x", &sig).unwrap();
        assert!(comment.len() <= MAX_TRUSTED_COMMENT && comment.len() > 4000);
        if !have_minisign() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = minisign_verifies(dir.path(), b"x", &sig, &kp.public());
        assert!(out.status.success(), "{out:?}");
    }

    #[test]
    fn minisign_accepts_our_signatures_and_rejects_tampering() {
        if !have_minisign() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let kp = KeyPair::generate();
        let public = kp.public();
        let data = b"{\"version\": \"1.2.3\"}\n".to_vec();
        let sig = kp.sign(&data, "kiln manifest 1.2.3");

        let out = minisign_verifies(d, &data, &sig, &public);
        assert!(out.status.success(), "{out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("Trusted comment: kiln manifest 1.2.3"),
            "{stdout}"
        );

        let mut flipped = data.clone();
        flipped[3] ^= 1;
        let cases: [(&str, Vec<u8>, String); 4] = [
            ("data", flipped, sig.clone()),
            ("signature line", data.clone(), tamper_line(&sig, 1)),
            ("global signature line", data.clone(), tamper_line(&sig, 3)),
            (
                "trusted comment",
                data.clone(),
                sig.replace("manifest 1.2.3", "manifest 1.2.4"),
            ),
        ];
        for (what, d2, s2) in cases {
            let out = minisign_verifies(d, &d2, &s2, &public);
            assert!(!out.status.success(), "minisign accepted tampered {what}");
            assert!(
                public.verify(&d2, &s2).is_err(),
                "we accepted tampered {what}"
            );
        }
    }

    #[test]
    fn interoperates_with_minisign_keys_and_signatures() {
        if !have_minisign() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let out = minisign(d, &["-G", "-W", "-p", "pub", "-s", "sec"]);
        assert!(out.status.success(), "{out:?}");
        let sec = std::fs::read_to_string(d.join("sec")).unwrap();
        let pub_file = std::fs::read_to_string(d.join("pub")).unwrap();
        let kp = KeyPair::from_secret_file(&sec).unwrap();
        let public = PublicKey::from_file(&pub_file).unwrap();
        assert_eq!(kp.public(), public);
        assert_eq!(public.to_file(), pub_file);
        // Our secret file is minisign's byte for byte, except that we fill in
        // the checksum minisign leaves zero for unencrypted keys.
        let theirs = b64_decode(sec.lines().nth(1).unwrap()).unwrap();
        let ours = b64_decode(kp.to_secret_file().lines().nth(1).unwrap()).unwrap();
        let body = SECRET_KEY_LEN - 32;
        assert_eq!(ours[..body], theirs[..body]);
        assert_eq!(
            ours[body..],
            secret_checksum(&kp.key_id(), &kp.key.to_keypair_bytes())
        );
        assert!(KeyPair::from_secret_file(&kp.to_secret_file()).is_ok());

        // A key whose password minisign removed keeps its real checksum.
        let out = minisign(d, &["-C", "-W", "-s", "sec"]);
        assert!(out.status.success(), "{out:?}");
        let sec_c = std::fs::read_to_string(d.join("sec")).unwrap();
        assert_eq!(KeyPair::from_secret_file(&sec_c).unwrap().public(), public);

        // Our signature with minisign's key, checked by minisign.
        let data = b"payload".to_vec();
        std::fs::write(d.join("data"), &data).unwrap();
        std::fs::write(d.join("data.minisig"), kp.sign(&data, "ours")).unwrap();
        let out = minisign(d, &["-Vm", "data", "-p", "pub"]);
        assert!(out.status.success(), "{out:?}");

        // minisign's signature, checked by us.
        let out = minisign(d, &["-S", "-s", "sec", "-m", "data", "-t", "theirs"]);
        assert!(out.status.success(), "{out:?}");
        let sig = std::fs::read_to_string(d.join("data.minisig")).unwrap();
        assert_eq!(public.verify(&data, &sig).unwrap(), "theirs");
        assert!(public.verify(b"payloaD", &sig).is_err());

        // minisign signs with a secret key file we wrote.
        let ours = KeyPair::generate();
        std::fs::write(d.join("oursec"), ours.to_secret_file()).unwrap();
        std::fs::write(d.join("ourpub"), ours.public().to_file()).unwrap();
        let out = minisign(d, &["-S", "-s", "oursec", "-m", "data", "-t", "t"]);
        assert!(out.status.success(), "{out:?}");
        let sig = std::fs::read_to_string(d.join("data.minisig")).unwrap();
        assert_eq!(ours.public().verify(&data, &sig).unwrap(), "t");
        let out = minisign(d, &["-Vm", "data", "-p", "ourpub"]);
        assert!(out.status.success(), "{out:?}");
    }

    proptest! {
        #[test]
        fn arbitrary_input_never_panics(s in ".{0,400}", data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let kp = KeyPair::generate();
            let _ = PublicKey::from_file(&s);
            let _ = KeyPair::from_secret_file(&s);
            let _ = kp.public().verify(&data, &s);
            let _ = b64_decode(&s);
        }

        #[test]
        fn near_valid_input_never_panics(b64 in "[A-Za-z0-9+/=]{0,220}", comment in "\\PC{0,40}") {
            let kp = KeyPair::generate();
            let _ = PublicKey::from_file(&b64);
            let _ = KeyPair::from_secret_file(&format!("untrusted comment: x\n{b64}\n"));
            let sig = format!("untrusted comment: x\n{b64}\ntrusted comment: {comment}\n{b64}\n");
            let _ = kp.public().verify(b"x", &sig);
        }

        #[test]
        fn sign_verify_any_comment(comment in "\\PC{0,80}|.{0,80}", data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let kp = KeyPair::generate();
            let sig = kp.sign(&data, &comment);
            let got = kp.public().verify(&data, &sig).unwrap();
            prop_assert_eq!(got, one_line(&comment));
        }
    }
}
