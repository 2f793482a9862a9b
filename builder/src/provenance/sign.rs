//! Signs `manifest.json` and node configs in minisign format (ed25519), so
//! that a plain `minisign -Vm FILE -p kiln.pub` accepts them.
//!
//! The public half of the format (key files, `.minisig` parsing, verifying)
//! is [`kiln_contract::minisign`], shared with the node; this module adds secret
//! key files and signing. Reading and writing the files is the caller's job,
//! which also names the path in its error context.

use blake2::digest::consts::U32;
use blake2::{Blake2b, Blake2b512, Digest};
use ed25519_dalek::{Signer, SigningKey};
use kiln_contract::minisign::{
    b64_encode, decode_line, expect_untrusted_comment, file_lines, to_array, unsupported,
    SIGNATURE_LEN, SIG_ALG_HASHED, SIG_ALG_LEGACY, TRUSTED_PREFIX, UNTRUSTED_PREFIX,
};
pub use kiln_contract::minisign::{KeyId, PublicKey, SignError};
use rand_core::{OsRng, RngCore};
use std::fmt;

const KDF_NONE: [u8; 2] = [0, 0];
const KDF_SCRYPT: [u8; 2] = *b"Sc";
const CHK_BLAKE2B: [u8; 2] = *b"B2";

const SECRET_KEY_LEN: usize = 2 + 2 + 2 + 32 + 8 + 8 + 8 + 64 + 32;

/// minisign 0.11 refuses to write trusted comments much longer than this
/// ("xfprintf() overflow"), so we never make one it could not have made.
pub const MAX_TRUSTED_COMMENT: usize = 4096;

/// A signing key with its minisign key id.
pub struct KeyPair {
    id: KeyId,
    key: SigningKey,
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
        PublicKey::new(self.id, self.key.verifying_key())
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

fn secret_checksum(id: &KeyId, keypair: &[u8; 64]) -> [u8; 32] {
    let mut h = Blake2b::<U32>::new();
    h.update(SIG_ALG_LEGACY);
    h.update(id.0);
    h.update(keypair);
    h.finalize().into()
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

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_contract::minisign::b64_decode;
    use proptest::prelude::*;
    use std::path::Path;
    use std::process::{Command, Output, Stdio};

    fn have_minisign() -> bool {
        kiln_testkit::checker("minisign", "minisign").is_some()
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
