//! TLS for `kiln serve`: loading a certificate and key, and `--init-tls DIR`,
//! a provisioning CA and a server certificate for a lab.
//!
//! DIR holds `ca.pem` (goes into images as `node.trust`), `ca.key` (0600;
//! keep it, it signs the next server certificate), `server.pem` and
//! `server.key` (0600). A second run reuses the CA, and issues a new server
//! certificate only when the names asked for changed or the old one is
//! within 30 days of expiry, so images built against ca.pem keep working.

use rand_core::{OsRng, RngCore};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use time::OffsetDateTime;

pub const CA_DAYS: i64 = 3650;
pub const SERVER_DAYS: i64 = 825;
const RENEW_DAYS: i64 = 30;
const CA_NAME: &str = "kiln provisioning CA";

/// The server side's configuration from PEM files.
pub fn server_config(cert: &Path, key_path: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}; give the server certificate in PEM (--tls-cert)", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no PEM certificate in it; give the server certificate (--tls-cert)", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| format!("{}: {e}; give the server certificate's private key in PEM (--tls-key)", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("{} and {}: {e}; is --tls-key the private key of --tls-cert?", cert.display(), key_path.display()))?;
    Ok(Arc::new(cfg))
}

/// What `--init-tls DIR` made or found.
#[derive(Debug, Clone)]
pub struct Lab {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub names: Vec<String>,
    /// What was (re)made this time: "CA and server certificate", "server
    /// certificate", or empty.
    pub made: String,
}

/// The names a lab server certificate covers by default: localhost, this
/// machine's host name and addresses, and 10.0.2.2 (the host as QEMU's user
/// network shows it).
pub fn default_names() -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string(), "10.0.2.2".to_string()];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() {
            names.push(h.to_string());
        }
    }
    names.extend(local_addresses());
    let mut seen = std::collections::BTreeSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

fn local_addresses() -> Vec<String> {
    let mut out = Vec::new();
    let mut ifa: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut ifa) } != 0 {
        return out;
    }
    let mut p = ifa;
    while !p.is_null() {
        // SAFETY: p walks the list getifaddrs returned.
        let a = unsafe { &*p };
        if !a.ifa_addr.is_null() {
            // SAFETY: the family says which sockaddr it is.
            match unsafe { (*a.ifa_addr).sa_family } as i32 {
                libc::AF_INET => {
                    let sin = unsafe { &*(a.ifa_addr as *const libc::sockaddr_in) };
                    let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                    if !ip.is_loopback() {
                        out.push(ip.to_string());
                    }
                }
                libc::AF_INET6 => {
                    let sin = unsafe { &*(a.ifa_addr as *const libc::sockaddr_in6) };
                    let ip = std::net::Ipv6Addr::from(sin.sin6_addr.s6_addr);
                    if !ip.is_loopback() && (ip.segments()[0] & 0xffc0) != 0xfe80 {
                        out.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
        p = a.ifa_next;
    }
    // SAFETY: ifa came from getifaddrs.
    unsafe { libc::freeifaddrs(ifa) };
    out
}

fn write_private(path: &Path, text: &str, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut t = tempfile::NamedTempFile::new_in(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    t.as_file().set_permissions(std::fs::Permissions::from_mode(mode)).map_err(|e| format!("{}: {e}", path.display()))?;
    t.write_all(text.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))?;
    t.persist(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}

/// Stamps a certificate kiln makes (here and in `kiln cluster init`) with its
/// validity, from `early` before `now` (clocks drift; whole seconds) to
/// `days` after it, and a random positive 128-bit serial.
pub fn validity_and_serial(p: &mut rcgen::CertificateParams, now: OffsetDateTime, early: time::Duration, days: i64) {
    let now = now.replace_nanosecond(0).unwrap_or(now);
    p.not_before = now - early;
    p.not_after = now + time::Duration::days(days);
    let mut s = [0u8; 16];
    OsRng.fill_bytes(&mut s);
    s[0] &= 0x7f;
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&s));
}

/// Makes (or reuses) a lab CA and a server certificate for `names` in `dir`.
pub fn init_lab(dir: &Path, names: &[String], now: OffsetDateTime) -> Result<Lab, String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    std::fs::create_dir_all(dir).map_err(|err| format!("{}: {err}", dir.display()))?;
    let lab = Lab { ca: dir.join("ca.pem"), cert: dir.join("server.pem"), key: dir.join("server.key"), names: names.to_vec(), made: String::new() };
    let ca_key_path = dir.join("ca.key");
    // The server certificate's names and expiry, to know when to reissue.
    let names_path = dir.join("server.info");
    let mut made = Vec::new();
    // The CA: reused when both halves are there.
    let (ca_params, ca_key) = if lab.ca.is_file() && ca_key_path.is_file() {
        let key_pem = std::fs::read_to_string(&ca_key_path).map_err(|err| format!("{}: {err}", ca_key_path.display()))?;
        let key = rcgen::KeyPair::from_pem(&key_pem).map_err(|err| format!("{}: {err}", ca_key_path.display()))?;
        // The issuer as the server certificate names it: the subject kiln
        // gives its lab CAs, with the CA's key.
        (ca_params(now), key)
    } else if lab.ca.exists() || ca_key_path.exists() {
        return Err(format!("{}: has only one of ca.pem and ca.key; restore the other, or use an empty directory for a new CA (images built with the old ca.pem will not trust it)", dir.display()));
    } else {
        let key = rcgen::KeyPair::generate().map_err(|x| e(&x))?;
        let p = ca_params(now);
        let cert = p.clone().self_signed(&key).map_err(|x| e(&x))?;
        write_private(&ca_key_path, &key.serialize_pem(), 0o600)?;
        write_private(&lab.ca, &cert.pem(), 0o644)?;
        made.push("CA");
        (p, key)
    };
    let ca_cert = ca_params.self_signed(&ca_key).map_err(|x| e(&x))?;
    // The server certificate: reissued when missing, for other names, or
    // close to expiry.
    let wanted = format!("names={}", names.join(","));
    let info = std::fs::read_to_string(&names_path).unwrap_or_default();
    let not_after = info.lines().find_map(|l| l.strip_prefix("not_after=")).and_then(|t| t.parse::<i64>().ok()).unwrap_or(0);
    let fresh = lab.cert.is_file() && lab.key.is_file() && info.lines().any(|l| l == wanted) && not_after > (now + time::Duration::days(RENEW_DAYS)).unix_timestamp();
    if !fresh || !made.is_empty() {
        let key = rcgen::KeyPair::generate().map_err(|x| e(&x))?;
        let mut p = rcgen::CertificateParams::new(names.to_vec()).map_err(|x| e(&x))?;
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, names.first().cloned().unwrap_or_else(|| "kiln serve".into()));
        p.is_ca = rcgen::IsCa::ExplicitNoCa;
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        validity_and_serial(&mut p, now, time::Duration::days(1), SERVER_DAYS);
        let not_after = p.not_after.unix_timestamp();
        let cert = p.signed_by(&key, &ca_cert, &ca_key).map_err(|x| e(&x))?;
        write_private(&lab.key, &key.serialize_pem(), 0o600)?;
        write_private(&lab.cert, &cert.pem(), 0o644)?;
        write_private(&names_path, &format!("{wanted}\nnot_after={not_after}\n"), 0o644)?;
        made.push("server certificate");
    }
    Ok(Lab { made: made.join(" and "), ..lab })
}

/// A lab CA's certificate fields. For a reused CA they only name the issuer
/// of a new server certificate (its subject and key are what count).
fn ca_params(now: OffsetDateTime) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, CA_NAME);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    validity_and_serial(&mut p, now, time::Duration::days(1), CA_DAYS);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lab_ca_is_made_once_and_its_server_certificate_loads() {
        let d = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let now = OffsetDateTime::now_utc();
        let lab = init_lab(d.path(), &names, now).unwrap();
        assert_eq!(lab.made, "CA and server certificate");
        server_config(&lab.cert, &lab.key).unwrap();
        use std::os::unix::fs::PermissionsExt;
        for k in ["ca.key", "server.key"] {
            assert_eq!(std::fs::metadata(d.path().join(k)).unwrap().permissions().mode() & 0o777, 0o600, "{k}");
        }
        let ca = std::fs::read(&lab.ca).unwrap();
        // Again: nothing new.
        assert_eq!(init_lab(d.path(), &names, now).unwrap().made, "");
        // Other names: a new server certificate from the same CA.
        let again = init_lab(d.path(), &["kiln.lab".to_string()], now).unwrap();
        assert_eq!(again.made, "server certificate");
        assert_eq!(std::fs::read(&lab.ca).unwrap(), ca);
        // Near expiry: renewed.
        let later = now + time::Duration::days(SERVER_DAYS - 10);
        assert_eq!(init_lab(d.path(), &["kiln.lab".to_string()], later).unwrap().made, "server certificate");
        // Half a CA is an error, not a silent new CA.
        std::fs::remove_file(d.path().join("ca.key")).unwrap();
        assert!(init_lab(d.path(), &names, now).unwrap_err().contains("only one of ca.pem and ca.key"));
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let d = tempfile::tempdir().unwrap();
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../init/tests/data/tls");
        let e = server_config(&d.path().join("none.pem"), &data.join("server.key")).unwrap_err();
        assert!(e.contains("none.pem") && e.contains("--tls-cert"), "{e}");
        let e = server_config(&data.join("server.pem"), &data.join("other-server.key")).unwrap_err();
        assert!(e.contains("--tls-key"), "{e}");
        server_config(&data.join("server.pem"), &data.join("server.key")).unwrap();
    }
}
