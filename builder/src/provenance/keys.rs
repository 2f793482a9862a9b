//! Where a build's signing key comes from, and signing files beside
//! themselves.
//!
//! In order: the `KILN_SIGNING_KEY` environment variable (the key file's
//! text, for CI secrets), then the profile's `sign.key_command` (a program
//! that prints the key file: a password manager, a secrets CLI), then the
//! file `sign.key`. The secret key only ever lives in memory; nothing here
//! writes it anywhere.

use crate::provenance::sign::KeyPair;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const ENV: &str = "KILN_SIGNING_KEY";

/// `[sign]` as resolved from a profile: `key` made absolute.
#[derive(Debug, Clone, Default)]
pub struct KeySpec {
    pub key: Option<PathBuf>,
    /// A command that prints the key file (`sign.key_command`); it runs in
    /// the profile's directory.
    pub key_command: Option<Vec<String>>,
    /// The profile that says so, for messages.
    pub profile: PathBuf,
}

/// The build's signing key, or `None` for an unsigned build.
pub fn signing_key(spec: &KeySpec) -> Result<Option<KeyPair>> {
    let (text, from) = match (std::env::var(ENV), &spec.key_command, &spec.key) {
        (Ok(t), _, _) if !t.trim().is_empty() => (t, format!("the {ENV} environment variable")),
        (_, Some(argv), _) => {
            let dir = spec.profile.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let from = format!("`{}` (key `sign.key_command` in {})", argv.join(" "), spec.profile.display());
            (run_key_command(argv, dir).with_context(|| format!("running {from}"))?, from)
        }
        (_, _, Some(p)) => (
            std::fs::read_to_string(p).with_context(|| format!("reading the signing key {} (key `sign.key` in {}); make one with `kiln key generate`", p.display(), spec.profile.display()))?,
            p.display().to_string(),
        ),
        _ => return Ok(None),
    };
    KeyPair::from_secret_file(&text).map(Some).with_context(|| format!("loading the signing key from {from}"))
}

/// Runs `argv` in `dir` and returns its stdout. Its stderr and stdin stay
/// the terminal's, so it can ask for a passphrase.
fn run_key_command(argv: &[String], dir: &Path) -> Result<String> {
    let Some((program, args)) = argv.split_first() else { bail!("the command is empty") };
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::inherit())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start {program} in {}", dir.display()))?;
    if !out.status.success() {
        bail!("it failed ({}); its messages are above", out.status);
    }
    String::from_utf8(out.stdout).map_err(|_| anyhow::anyhow!("it printed something that is not a key file (not UTF-8)"))
}

/// Writes `FILE.minisig` beside `file`, and returns its path.
pub fn sign_beside(key: &KeyPair, file: &Path, trusted_comment: &str) -> Result<PathBuf> {
    let data = std::fs::read(file).with_context(|| format!("reading {} to sign it", file.display()))?;
    let sig = PathBuf::from(format!("{}.minisig", file.display()));
    std::fs::write(&sig, key.sign(&data, trusted_comment)).with_context(|| format!("writing {}", sig.display()))?;
    Ok(sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(dir: &Path, sign: &str) -> KeySpec {
        let d = dir.join("profiles");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::create_dir_all(dir.join("kernel-configs")).unwrap();
        std::fs::write(dir.join("kernel-configs/a.config"), "CONFIG_NET=y\n").unwrap();
        let zeros = "0".repeat(64);
        std::fs::write(
            d.join("p.toml"),
            format!("arch = \"amd64\"\nname = \"p\"\n[kernel]\nfragments = [\"a.config\"]\nsource = {{ file = \"/x\", sha256 = \"{zeros}\" }}\n[rootfs]\nbusybox = {{ file = \"/y\", sha256 = \"{zeros}\" }}\n[payload]\nstand-in = true\n[node]\nconfig = \"n.toml\"\n[sign]\n{sign}\n"),
        )
        .unwrap();
        crate::profile::load(&d.join("p.toml")).unwrap_or_else(|e| panic!("{e}")).sign
    }

    // One test, so that the KILN_SIGNING_KEY cases do not race each other.
    #[test]
    fn key_sources() {
        let d = tempfile::tempdir().unwrap();
        let k = KeyPair::generate();
        std::fs::create_dir_all(d.path().join("keys")).unwrap();
        std::fs::write(d.path().join("keys/kiln.key"), k.to_secret_file()).unwrap();
        std::env::remove_var(ENV);

        let from_file = profile(d.path(), "key = \"../keys/kiln.key\"");
        assert_eq!(signing_key(&from_file).unwrap().unwrap().key_id(), k.key_id());

        // Relative to the profile's directory, like `key`.
        let from_cmd = profile(d.path(), "key_command = [\"cat\", \"../keys/kiln.key\"]");
        assert_eq!(signing_key(&from_cmd).unwrap().unwrap().key_id(), k.key_id());

        let failing = profile(d.path(), "key_command = [\"sh\", \"-c\", \"exit 3\"]");
        let err = format!("{:#}", signing_key(&failing).unwrap_err());
        assert!(err.contains("sign.key_command") && err.contains("exit status: 3"), "{err}");
        let missing = profile(d.path(), "key_command = [\"/nonexistent/kiln-key-helper\"]");
        let err = format!("{:#}", signing_key(&missing).unwrap_err());
        assert!(err.contains("cannot start /nonexistent/kiln-key-helper"), "{err}");
        let garbage = profile(d.path(), "key_command = [\"echo\", \"not a key\"]");
        let err = format!("{:#}", signing_key(&garbage).unwrap_err());
        assert!(err.contains("loading the signing key from `echo not a key`"), "{err}");

        // The environment wins over both.
        let other = KeyPair::generate();
        std::env::set_var(ENV, other.to_secret_file());
        assert_eq!(signing_key(&from_file).unwrap().unwrap().key_id(), other.key_id());
        assert_eq!(signing_key(&failing).unwrap().unwrap().key_id(), other.key_id());
        std::env::remove_var(ENV);

        let unsigned = profile(d.path(), "");
        assert!(signing_key(&unsigned).unwrap().is_none());

        // Not both in one profile.
        let p = d.path().join("profiles/p.toml");
        let text = std::fs::read_to_string(&p).unwrap().replace("[sign]\n", "[sign]\nkey = \"k\"\nkey_command = [\"cat\"]\n");
        std::fs::write(&p, text).unwrap();
        let err = crate::profile::load(&p).unwrap_err().to_string();
        assert!(err.contains("key `sign.key_command`") && err.contains("not both"), "{err}");
    }
}
