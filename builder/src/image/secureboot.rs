//! UEFI Secure Boot (`[secureboot]`): Authenticode-signs every EFI binary
//! kiln writes (systemd-boot, each UKI, the PXE kernel) with the profile's db
//! key, and puts the optional PK/KEK/db `.auth` files on the ESP for
//! systemd-boot to enrol.
//!
//! Signing is `sbsign` (Debian sbsigntool). sbsign puts a PKCS#9 signingTime
//! attribute, the wall clock, into every signature; it runs under
//! `faketime` with the clock frozen at the build's `source_date_epoch`, so
//! the same inputs give the same signed bytes (RSA PKCS#1 v1.5 signatures
//! are deterministic). Firmware ignores that attribute.

use kiln_formats::fat::{FatBuilder, FileContent};
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Holds the db key's PEM text; wins over `secureboot.key`.
pub const KEY_ENV: &str = "KILN_SECUREBOOT_KEY";

/// Where systemd-boot looks for keys to enrol (`/loader/keys/<name>/`).
pub const ENROLL_DIR: &str = "/loader/keys/kiln";

/// `[secureboot]` as resolved from the profile: paths made absolute.
#[derive(Debug, Clone)]
pub struct SecureBootSpec {
    /// The db signing key (PEM, unencrypted); `None` when only `KEY_ENV`
    /// gives it.
    pub key: Option<PathBuf>,
    /// The db certificate (PEM) that the firmware trusts.
    pub cert: PathBuf,
    pub enroll: Option<Enroll>,
}

/// Signed EFI variable updates (`.auth`) for systemd-boot to enrol when the
/// firmware is in setup mode.
#[derive(Debug, Clone)]
pub struct Enroll {
    pub pk: PathBuf,
    pub kek: PathBuf,
    pub db: PathBuf,
    /// `secure-boot-enroll force` (enrol without asking) instead of
    /// `manual` (a boot menu entry).
    pub force: bool,
}

/// A loaded, checked db key and certificate. The key lives in a private
/// temporary directory for as long as the signer does.
pub struct Signer {
    key: PathBuf,
    cert: PathBuf,
    epoch: u64,
    enroll: Option<Enroll>,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for Signer {
    // Never print key material or where it is.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("cert", &self.cert).finish_non_exhaustive()
    }
}

fn run(cmd: &mut Command, what: &str, install: &str) -> Result<Output> {
    cmd.output().with_context(|| format!("running {what} ({install})"))
}

fn text(o: &Output) -> String {
    let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&o.stderr));
    // sbsign warns about the stub's section gaps on every binary; noise.
    s.lines().filter(|l| !l.starts_with("warning: data remaining")).collect::<Vec<_>>().join("\n")
}

/// What is wrong with a private key file's text, if anything.
pub fn check_key_text(s: &str) -> Result<(), String> {
    if s.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") || s.contains("Proc-Type: 4,ENCRYPTED") {
        return Err("the key is encrypted; kiln signs without prompting, so give it unencrypted (`openssl pkey -in KEY -out KEY.plain`, then keep KEY.plain as secret as KEY)".into());
    }
    if !(s.contains("-----BEGIN ") && s.contains("PRIVATE KEY-----")) {
        return Err("not a PEM private key (a `-----BEGIN PRIVATE KEY-----` or `-----BEGIN RSA PRIVATE KEY-----` block)".into());
    }
    Ok(())
}

/// What is wrong with a certificate file's text, if anything.
pub fn check_cert_text(s: &[u8]) -> Result<(), String> {
    if !s.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
        return Err("not a PEM certificate (sbsign reads `-----BEGIN CERTIFICATE-----`); convert a DER one with `openssl x509 -inform der -in CERT -out CERT.pem`".into());
    }
    Ok(())
}

const PKCS7_GUID: [u8; 16] = [0x9d, 0xd2, 0xaf, 0x4a, 0xdf, 0x68, 0xee, 0x49, 0x8a, 0xa9, 0x34, 0x7d, 0x37, 0x56, 0x65, 0xa7];

/// Checks that `b` is a time-based authenticated variable update
/// (EFI_VARIABLE_AUTHENTICATION_2: an EFI_TIME, a WIN_CERTIFICATE_UEFI_GUID
/// holding a PKCS#7 signature, then EFI_SIGNATURE_LISTs), as
/// `sign-efi-sig-list`, `sbvarsign` and `sbctl` write them.
pub fn check_auth(b: &[u8]) -> Result<(), String> {
    const TIME: usize = 16;
    const HDR: usize = 8 + 16;
    if b.len() < TIME + HDR {
        return Err(format!("{} bytes is too short for a signed EFI variable (.auth)", b.len()));
    }
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) as usize;
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let length = u32_at(TIME);
    if u16_at(TIME + 4) != 0x0200 || u16_at(TIME + 6) != 0x0ef1 || b[TIME + 8..TIME + 24] != PKCS7_GUID {
        return Err("not a signed EFI variable (.auth): no WIN_CERTIFICATE_UEFI_GUID with a PKCS#7 signature after the timestamp. An .esl, .crt or .der is not enough; sign the signature list with `sign-efi-sig-list` (efitools) or `sbvarsign` (sbsigntool)".into());
    }
    if length < HDR || TIME + length > b.len() {
        return Err(format!("the signature claims {length} bytes but the file has {} after the timestamp", b.len() - TIME));
    }
    // The new value: one or more EFI_SIGNATURE_LISTs, each at least its
    // 28-byte header, sized by SignatureListSize.
    let mut at = TIME + length;
    if at == b.len() {
        return Err("the signed value is empty: this .auth deletes the variable instead of enrolling keys".into());
    }
    while at < b.len() {
        let size = if at + 28 <= b.len() { u32_at(at + 16) } else { 0 };
        if size < 28 || at + size > b.len() {
            return Err(format!("the EFI signature list at byte {at} is cut off or malformed"));
        }
        at += size;
    }
    Ok(())
}

/// `openssl` on the key or certificate; its stdout.
fn openssl(args: &[&str], file: &Path, what: &str) -> Result<String> {
    let o = run(Command::new("openssl").args(args).arg(file), "openssl", "apt-get install openssl")?;
    if !o.status.success() {
        bail!("{what}: openssl cannot read it: {}", text(&o).trim());
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

impl Signer {
    /// Loads and checks the key, certificate and `.auth` files. `profile` is
    /// named in errors; `epoch` is the signing time written into signatures.
    pub fn load(spec: &SecureBootSpec, profile: &Path, epoch: u64) -> Result<Signer> {
        Signer::load_with(spec, profile, epoch, std::env::var(KEY_ENV).ok())
    }

    /// [`Signer::load`] with `env_key` standing for the value of [`KEY_ENV`].
    fn load_with(spec: &SecureBootSpec, profile: &Path, epoch: u64, env_key: Option<String>) -> Result<Signer> {
        let p = profile.display();
        let (key_text, from) = match (env_key, &spec.key) {
            (Some(t), _) if !t.trim().is_empty() => (t, format!("the {KEY_ENV} environment variable")),
            (_, Some(k)) => (
                std::fs::read_to_string(k).with_context(|| format!("reading the Secure Boot key {} (key `secureboot.key` in {p})", k.display()))?,
                format!("{} (key `secureboot.key` in {p})", k.display()),
            ),
            _ => bail!("{p}: key `secureboot.key` is not set and {KEY_ENV} is empty: give the db signing key (PEM) one way or the other"),
        };
        check_key_text(&key_text).map_err(|m| anyhow::anyhow!("the Secure Boot key from {from}: {m}"))?;
        let cert_at = format!("{} (key `secureboot.cert` in {p})", spec.cert.display());
        let cert_bytes = std::fs::read(&spec.cert).with_context(|| format!("reading the Secure Boot certificate {cert_at}"))?;
        check_cert_text(&cert_bytes).map_err(|m| anyhow::anyhow!("the Secure Boot certificate {cert_at}: {m}"))?;

        let dir = tempfile::Builder::new().prefix("kiln-secureboot.").tempdir()?;
        let key = dir.path().join("db.key");
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&key)?;
            f.write_all(key_text.as_bytes())?;
        }
        let cert = dir.path().join("db.crt");
        std::fs::write(&cert, &cert_bytes)?;

        let key_pub = openssl(&["pkey", "-pubout", "-in"], &key, &format!("the Secure Boot key from {from}"))?;
        let cert_pub = openssl(&["x509", "-noout", "-pubkey", "-in"], &cert, &format!("the Secure Boot certificate {cert_at}"))?;
        if key_pub.trim() != cert_pub.trim() {
            bail!("the Secure Boot key from {from} does not match the certificate {cert_at}: give the db key that this certificate was made for");
        }
        let info = openssl(&["x509", "-noout", "-text", "-in"], &cert, &format!("the Secure Boot certificate {cert_at}"))?;
        if !info.contains("rsaEncryption") {
            let alg = info.lines().find_map(|l| l.trim().strip_prefix("Public Key Algorithm:")).unwrap_or("?").trim().to_string();
            bail!("the Secure Boot certificate {cert_at} has a {alg} key; UEFI firmware checks RSA signatures: make an RSA (2048 bits or more) db key");
        }
        if let Some(e) = &spec.enroll {
            for (k, path) in [("pk", &e.pk), ("kek", &e.kek), ("db", &e.db)] {
                let at = format!("{} (key `secureboot.enroll.{k}` in {p})", path.display());
                let b = std::fs::read(path).with_context(|| format!("reading {at}"))?;
                check_auth(&b).map_err(|m| anyhow::anyhow!("{at}: {m}"))?;
            }
        }
        Ok(Signer { key, cert, epoch, enroll: spec.enroll.clone(), _dir: dir })
    }

    /// The certificate, for verifying (`sbverify --cert`).
    pub fn cert(&self) -> &Path {
        &self.cert
    }

    /// Signs `input` into `output` (which may be the same file), through a
    /// temporary file renamed when complete.
    pub fn sign(&self, input: &Path, output: &Path) -> Result<()> {
        let (y, mo, d, h, mi, s) = kiln_contract::date::civil(self.epoch);
        let frozen = format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}");
        let tmp = PathBuf::from(format!("{}.signing", output.display()));
        let _ = std::fs::remove_file(&tmp);
        let o = run(
            Command::new("faketime").arg("-f").arg(&frozen).arg("sbsign").arg("--key").arg(&self.key).arg("--cert").arg(&self.cert).arg("--output").arg(&tmp).arg(input).env("TZ", "UTC"),
            "faketime sbsign",
            "apt-get install faketime sbsigntool",
        )?;
        if !o.status.success() || !tmp.is_file() {
            let _ = std::fs::remove_file(&tmp);
            let t = text(&o);
            let hint = if t.contains("faketime") && t.contains("sbsign") { " (apt-get install sbsigntool)" } else { "" };
            bail!("signing {} for Secure Boot failed{hint}: {}", input.display(), t.trim());
        }
        std::fs::rename(&tmp, output).with_context(|| format!("moving the signed {} into place", output.display()))?;
        Ok(())
    }

    pub fn sign_in_place(&self, path: &Path) -> Result<()> {
        self.sign(path, path)
    }

    /// `loader.conf` lines for enrolment, when there are keys to enrol.
    pub fn loader_conf(&self) -> &'static str {
        match &self.enroll {
            Some(e) if e.force => "secure-boot-enroll force\n",
            Some(_) => "secure-boot-enroll manual\n",
            None => "",
        }
    }

    /// Puts the `.auth` files where systemd-boot enrols them from.
    pub fn add_enroll_files(&self, fat: &mut FatBuilder) -> Result<()> {
        if let Some(e) = &self.enroll {
            for (name, path) in [("PK.auth", &e.pk), ("KEK.auth", &e.kek), ("db.auth", &e.db)] {
                fat.add_file(&format!("{ENROLL_DIR}/{name}"), FileContent::Host(path.clone()))?;
            }
        }
        Ok(())
    }
}

/// Whether a file is a PE image (`MZ` with a `PE\0\0` header), i.e. an EFI
/// binary that can carry an Authenticode signature.
pub fn is_pe(path: &Path) -> Result<bool> {
    let b = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if b.len() < 0x40 || &b[..2] != b"MZ" {
        return Ok(false);
    }
    let pe = u32::from_le_bytes([b[0x3c], b[0x3d], b[0x3e], b[0x3f]]) as usize;
    Ok(b.get(pe..pe + 4) == Some(b"PE\0\0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> bool {
        [("sbsign", "sbsigntool"), ("sbverify", "sbsigntool"), ("faketime", "faketime"), ("openssl", "openssl"), ("sbsiglist", "sbsigntool"), ("sbvarsign", "sbsigntool")]
            .iter()
            .all(|(t, pkg)| kiln_testkit::checker(t, pkg).is_some())
    }

    fn sh(cmd: &mut Command) -> String {
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{cmd:?}: {}", text(&o));
        text(&o)
    }

    fn keypair(dir: &Path, name: &str, alg: &[&str]) -> (PathBuf, PathBuf) {
        let (k, c) = (dir.join(format!("{name}.key")), dir.join(format!("{name}.crt")));
        sh(Command::new("openssl").args(["req", "-x509", "-nodes", "-subj", &format!("/CN=kiln test {name}/"), "-days", "3650"]).args(alg).arg("-keyout").arg(&k).arg("-out").arg(&c));
        (k, c)
    }

    fn rsa(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        keypair(dir, name, &["-newkey", "rsa:2048"])
    }

    fn spec(key: &Path, cert: &Path) -> SecureBootSpec {
        SecureBootSpec { key: Some(key.into()), cert: cert.into(), enroll: None }
    }

    /// The systemd-boot the profiles use (host package), when installed.
    fn systemd_boot() -> Option<PathBuf> {
        kiln_testkit::checker_file(
            "/usr/lib/systemd/boot/efi/systemd-bootx64.efi",
            "systemd-boot-efi",
        )
    }

    #[test]
    fn signs_reproducibly_and_sbverify_accepts() {
        let Some(sd) = systemd_boot() else { return };
        if !tools() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let (k, c) = rsa(d.path(), "db");
        let s = Signer::load_with(&spec(&k, &c), Path::new("p.toml"), 1_700_000_000, None).unwrap();
        let (a, b) = (d.path().join("a.efi"), d.path().join("b.efi"));
        s.sign(&sd, &a).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        std::fs::copy(&sd, &b).unwrap();
        s.sign_in_place(&b).unwrap();
        assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(), "signing twice gave different bytes");
        let v = sh(Command::new("sbverify").arg("--cert").arg(&c).arg(&a));
        assert!(v.contains("Signature verification OK"), "{v}");
        // The signing time is the build's epoch, not the clock.
        let pk7 = d.path().join("a.pk7");
        sh(Command::new("sbattach").arg("--detach").arg(&pk7).arg(&a));
        let p = sh(Command::new("openssl").args(["pkcs7", "-inform", "der", "-print", "-in"]).arg(&pk7));
        assert!(p.contains("Nov 14 22:13:20 2023 GMT"), "{p}");
        // Another certificate does not verify it.
        let (_, other) = rsa(d.path(), "other");
        let o = Command::new("sbverify").arg("--cert").arg(&other).arg(&a).output().unwrap();
        assert!(!o.status.success());
        assert!(is_pe(&a).unwrap() && !is_pe(&c).unwrap());
    }

    #[test]
    fn bad_keys_are_named() {
        if !tools() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let (k, c) = rsa(d.path(), "db");
        let (k2, _) = rsa(d.path(), "other");
        let err = |s: &SecureBootSpec| format!("{:#}", Signer::load_with(s, Path::new("prof.toml"), 0, None).unwrap_err());

        let e = err(&spec(&k2, &c));
        assert!(e.contains("does not match the certificate") && e.contains("secureboot.cert") && e.contains("prof.toml"), "{e}");

        let e = err(&spec(&d.path().join("missing.key"), &c));
        assert!(e.contains("secureboot.key") && e.contains("missing.key"), "{e}");

        let e = err(&spec(&k, &d.path().join("missing.crt")));
        assert!(e.contains("secureboot.cert") && e.contains("missing.crt"), "{e}");

        let enc = d.path().join("enc.key");
        sh(Command::new("openssl").args(["pkey", "-aes256", "-passout", "pass:x", "-in"]).arg(&k).arg("-out").arg(&enc));
        let e = err(&spec(&enc, &c));
        assert!(e.contains("encrypted") && e.contains("secureboot.key"), "{e}");

        let der = d.path().join("c.der");
        sh(Command::new("openssl").args(["x509", "-outform", "der", "-in"]).arg(&c).arg("-out").arg(&der));
        let e = err(&spec(&k, &der));
        assert!(e.contains("not a PEM certificate"), "{e}");

        let (ek, ec) = keypair(d.path(), "ec", &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]);
        let e = err(&spec(&ek, &ec));
        assert!(e.contains("RSA"), "{e}");

        // Enrolment files must be signed variables.
        let mut s = spec(&k, &c);
        s.enroll = Some(Enroll { pk: c.clone(), kek: c.clone(), db: c.clone(), force: false });
        let e = err(&s);
        assert!(e.contains("secureboot.enroll.pk") && e.contains("not a signed EFI variable"), "{e}");
        s.enroll = Some(Enroll { pk: d.path().join("nope.auth"), kek: c.clone(), db: c.clone(), force: false });
        let e = err(&s);
        assert!(e.contains("secureboot.enroll.pk") && e.contains("nope.auth"), "{e}");
    }

    #[test]
    fn the_key_can_come_from_the_environment() {
        if !tools() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let (k, c) = rsa(d.path(), "db");
        let env = Some(std::fs::read_to_string(&k).unwrap());
        // It wins over the file.
        let s = SecureBootSpec { key: Some(d.path().join("missing.key")), cert: c.clone(), enroll: None };
        Signer::load_with(&s, Path::new("p.toml"), 0, env).unwrap();
        let e = format!("{:#}", Signer::load_with(&SecureBootSpec { key: None, cert: c, enroll: None }, Path::new("p.toml"), 0, Some(" \n".into())).unwrap_err());
        assert!(e.contains("secureboot.key") && e.contains(KEY_ENV), "{e}");
    }

    /// Real `.auth` files (sbsiglist + sbvarsign) pass the check and land in
    /// systemd-boot's enrolment directory with the loader.conf line.
    #[test]
    fn enrolment_files_go_on_the_esp() {
        if !(tools() && kiln_testkit::checker("mtype", "mtools").is_some()) {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| d.path().join(n);
        let (k, c) = rsa(d.path(), "db");
        let der = p("db.der");
        sh(Command::new("openssl").args(["x509", "-outform", "der", "-in"]).arg(&c).arg("-out").arg(&der));
        sh(Command::new("sbsiglist").args(["--owner", "11111111-2222-3333-4444-555555555555", "--type", "x509", "--output"]).arg(p("db.esl")).arg(&der));
        let mut auth = Vec::new();
        for var in ["PK", "KEK", "db"] {
            let out = p(&format!("{var}.auth"));
            sh(Command::new("sbvarsign").args(["--key"]).arg(&k).arg("--cert").arg(&c).arg("--output").arg(&out).arg(var).arg(p("db.esl")));
            check_auth(&std::fs::read(&out).unwrap()).unwrap_or_else(|e| panic!("{var}.auth: {e}"));
            auth.push(out);
        }
        let mut s = spec(&k, &c);
        s.enroll = Some(Enroll { pk: auth[0].clone(), kek: auth[1].clone(), db: auth[2].clone(), force: true });
        let signer = Signer::load_with(&s, Path::new("p.toml"), 0, None).unwrap();
        assert_eq!(signer.loader_conf(), "secure-boot-enroll force\n");
        let mut fat = FatBuilder::new("T", 1);
        signer.add_enroll_files(&mut fat).unwrap();
        let img = p("esp.img");
        let mut f = std::fs::File::create(&img).unwrap();
        fat.write(fat.min_size().max(34 << 20), &mut f).unwrap();
        drop(f);
        for name in ["PK", "KEK", "db"] {
            let o = Command::new("mtype").env("MTOOLS_SKIP_CHECK", "1").arg("-i").arg(&img).arg(format!("::{ENROLL_DIR}/{name}.auth")).output().unwrap();
            assert!(o.status.success(), "{name}.auth: {}", text(&o));
            assert_eq!(o.stdout, std::fs::read(p(&format!("{name}.auth"))).unwrap());
        }
        // Cut short, or not signed at all: refused.
        let b = std::fs::read(&auth[0]).unwrap();
        assert!(check_auth(&b[..b.len() - 5]).is_err());
        assert!(check_auth(&std::fs::read(p("db.esl")).unwrap()).is_err());
    }

    /// `[secureboot]` in a profile: paths relative to it, a missing file or
    /// certificate named with file, line and key.
    #[test]
    fn profile_table() {
        let d = tempfile::tempdir().unwrap();
        let profiles = d.path().join("profiles");
        std::fs::create_dir_all(&profiles).unwrap();
        std::fs::create_dir_all(d.path().join("kernel-configs")).unwrap();
        std::fs::write(d.path().join("kernel-configs/a.config"), "CONFIG_NET=y\n").unwrap();
        let zero = "0".repeat(64);
        let base = format!("arch = \"amd64\"\nname = \"sb\"\n[kernel]\nfragments = [\"a.config\"]\nsource = {{ file = \"/x\", sha256 = \"{zero}\" }}\n[rootfs]\nbusybox = {{ file = \"/bin/busybox\", sha256 = \"{zero}\" }}\n[payload]\nstand-in = true\n[node]\nconfig = \"n.toml\"\n");
        let load = |extra: &str| {
            let p = profiles.join("p.toml");
            std::fs::write(&p, format!("{base}{extra}")).unwrap();
            crate::profile::load(&p)
        };
        assert!(load("").unwrap().secureboot.is_none());
        std::fs::write(d.path().join("db.pem"), "x").unwrap();
        std::fs::write(d.path().join("db.key"), "x").unwrap();
        let p = load("[secureboot]\nkey = \"../db.key\"\ncert = \"../db.pem\"\n").unwrap();
        let sb = p.secureboot.unwrap();
        assert_eq!(sb.cert, profiles.join("../db.pem"));
        assert!(sb.enroll.is_none());
        let e = load("[secureboot]\nkey = \"../db.key\"\n").unwrap_err().to_string();
        assert!(e.contains("secureboot.cert"), "{e}");
        let e = load("[secureboot]\nkey = \"../db.key\"\ncert = \"../nope.pem\"\n").unwrap_err().to_string();
        assert!(e.contains("p.toml:14: key `secureboot.cert`") && e.contains("nope.pem"), "{e}");
        let e = load("[secureboot]\ncert = \"../db.pem\"\nenroll = { pk = \"../db.pem\", kek = \"../db.pem\", db = \"../no.auth\" }\n").unwrap_err().to_string();
        assert!(e.contains("p.toml:14: key `secureboot.enroll`") && e.contains("no.auth"), "{e}");
        let e = load("[secureboot]\ncert = \"../db.pem\"\nkeys = 1\n").unwrap_err().to_string();
        assert!(e.contains("key `keys`"), "{e}");
    }
}
