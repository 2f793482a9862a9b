//! HTTPS for what the node fetches (its config, the update channel, bundles):
//! rustls with ring, TLS 1.2 and 1.3, trusting only the anchors the verified
//! image carries in `/etc/kiln/trust` (the profile's `node.trust`): CA
//! certificates, or a server's own self-signed certificate, which pins that
//! server. There is no system CA store: a node trusts exactly what its image
//! says.
//!
//! Certificate problems become one clear line: the URL, what is wrong
//! (unknown issuer, name mismatch, expired or not yet valid, with the node's
//! clock when NTP has not set it yet), and what to do.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, ClientConfig, ClientConnection, RootCertStore};
use std::net::TcpStream;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// Where the image keeps its trust anchors (`node.trust`).
pub const TRUST_DIR: &str = kiln_contract::layout::TRUST_DIR_ABS;

/// The anchors found in a directory, and the files that were not usable.
pub struct Anchors {
    pub store: RootCertStore,
    /// Files that gave at least one anchor.
    pub files: Vec<String>,
    pub problems: Vec<String>,
}

/// Reads every `*.pem`/`*.crt` file in `dir` (each may hold several
/// certificates), in name order. A missing directory gives no anchors.
pub fn load_anchors(dir: &Path) -> Anchors {
    let mut a = Anchors { store: RootCertStore::empty(), files: Vec::new(), problems: Vec::new() };
    let Ok(rd) = std::fs::read_dir(dir) else { return a };
    let mut names: Vec<_> = rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "pem" || e == "crt")).collect();
    names.sort();
    for p in names {
        let shown = p.display().to_string();
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) => {
                a.problems.push(format!("{shown}: {e}"));
                continue;
            }
        };
        let mut n = 0;
        for c in CertificateDer::pem_slice_iter(&bytes) {
            match c.map_err(|e| e.to_string()).and_then(|c| a.store.add(c).map_err(|e| e.to_string())) {
                Ok(()) => n += 1,
                Err(e) => a.problems.push(format!("{shown}: a certificate is unusable: {e}")),
            }
        }
        if n > 0 {
            a.files.push(shown);
        } else {
            a.problems.push(format!("{shown}: no PEM certificate in it"));
        }
    }
    a
}

/// A client configuration trusting `store`.
pub fn client_config(store: RootCertStore) -> Arc<ClientConfig> {
    client_config_with(rustls::crypto::ring::default_provider(), store)
}

/// [`client_config`] with another crypto provider: the fuzz harness's
/// (`crate::fuzzing`) is ring's with fixed randomness, so the config it
/// fuzzes is the node's in everything else.
pub(crate) fn client_config_with(provider: rustls::crypto::CryptoProvider, store: RootCertStore) -> Arc<ClientConfig> {
    let cfg = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(store).with_no_client_auth());
    match cfg {
        Ok(c) => Arc::new(c),
        // The ring provider supports the default versions; unreachable, but
        // a PID 1 does not panic: a config that trusts nothing.
        Err(_) => Arc::new(
            ClientConfig::builder_with_protocol_versions(rustls::DEFAULT_VERSIONS)
                .with_root_certificates(RootCertStore::empty())
                .with_no_client_auth(),
        ),
    }
}

/// The image's client configuration, read once. Err says why https:// cannot
/// be used at all (no anchors) and what to do.
pub fn image_config() -> Result<Arc<ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let a = load_anchors(Path::new(TRUST_DIR));
            for p in &a.problems {
                super::console::error(&format!("trust anchors: {p}"));
            }
            if a.store.is_empty() {
                return Err(format!(
                    "this image trusts no certificate authority ({TRUST_DIR} has no certificate), so it cannot check any https:// server; \
                     add the server's CA to node.trust in the profile (kiln serve --init-tls DIR makes one for a lab) and rebuild"
                ));
            }
            Ok(client_config(a.store))
        })
        .clone()
}

/// A TLS problem as one line, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub what: String,
    pub hint: &'static str,
}

/// What the node's clock says, for certificate-time errors.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub unix: i128,
    /// Set by NTP since boot.
    pub synced: bool,
}

impl Clock {
    pub fn now() -> Clock {
        let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i128);
        Clock { unix, synced: super::clock::synced() }
    }

    fn note(&self) -> String {
        let at = super::clock::utc_text(self.unix);
        if self.synced {
            format!("this node's clock reads {at} (set by NTP)")
        } else {
            format!("this node's clock reads {at} and has not been set by NTP yet: the clock may be the cause")
        }
    }
}

const FIX_ISSUER: &str = "give the server a certificate issued by a CA in the image's node.trust (kiln serve --init-tls DIR makes a CA and a server certificate), or add the server's CA to node.trust in the profile and rebuild";
const FIX_NAME: &str = "use the host name or address the server's certificate names in the URL, or give the server a certificate for the name the node uses (kiln serve --tls-name)";
const FIX_TIME: &str = "renew the server's certificate, or set the node's clock: give it an NTP server (DHCP option 42 or time.ntp) or a battery-backed clock";
const FIX_OTHER: &str = "check the server's TLS setup (certificate chain, protocol versions) and its log";

/// Describes a rustls error met while talking to a server.
pub fn describe(e: &rustls::Error, clock: Clock) -> Problem {
    use CertificateError as C;
    let p = |what: String, hint| Problem { what, hint };
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => p("the server's certificate is not trusted (unknown issuer): no CA in this image's node.trust issued it".into(), FIX_ISSUER),
            C::BadSignature => p("the server's certificate has a bad signature (not issued by the trusted CA it names)".into(), FIX_ISSUER),
            C::NotValidForName => p("the server's certificate does not name this host (name mismatch)".into(), FIX_NAME),
            C::NotValidForNameContext { expected, presented } => {
                p(format!("the server's certificate is for {}, not {expected:?} (name mismatch)", if presented.is_empty() { "no name".to_string() } else { presented.join(", ") }), FIX_NAME)
            }
            C::Expired => p(format!("the server's certificate has expired; {}", clock.note()), FIX_TIME),
            C::ExpiredContext { not_after, .. } => p(format!("the server's certificate expired at {}; {}", super::clock::utc_text(not_after.as_secs() as i128), clock.note()), FIX_TIME),
            C::NotValidYet => p(format!("the server's certificate is not valid yet; {}", clock.note()), FIX_TIME),
            C::NotValidYetContext { not_before, .. } => {
                p(format!("the server's certificate is not valid before {}; {}", super::clock::utc_text(not_before.as_secs() as i128), clock.note()), FIX_TIME)
            }
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => p("the server's certificate is not for TLS servers (extended key usage)".into(), FIX_ISSUER),
            C::Revoked => p("the server's certificate is revoked".into(), FIX_ISSUER),
            other => p(format!("the server's certificate is unusable: {other:?}"), FIX_ISSUER),
        },
        rustls::Error::AlertReceived(a) => p(format!("the server ended the TLS handshake with alert {a:?}"), FIX_OTHER),
        rustls::Error::PeerIncompatible(why) => p(format!("the server and this node share no TLS version or cipher ({why:?})"), FIX_OTHER),
        rustls::Error::InvalidMessage(why) => p(format!("the server does not speak TLS here ({why:?}); is this an http:// server?"), "check the URL's scheme and port"),
        other => p(format!("TLS failed: {other}"), FIX_OTHER),
    }
}

/// The rustls error inside an I/O error from a TLS stream, if that is what
/// it is.
pub fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
}

/// A TLS stream over TCP.
pub type Stream = rustls::StreamOwned<ClientConnection, TcpStream>;

/// Starts a TLS session to `host` over `tcp` and completes the handshake.
/// The error is an I/O error (timeouts) or one carrying a rustls error.
pub fn handshake(cfg: Arc<ClientConfig>, host: &str, mut tcp: TcpStream) -> std::io::Result<Stream> {
    let name = ServerName::try_from(host.to_string()).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{host:?} is not a host name for TLS: {e}")))?;
    let mut conn = ClientConnection::new(cfg, name).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    Ok(rustls::StreamOwned::new(conn, tcp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors_from_a_directory() {
        let d = tempfile::tempdir().unwrap();
        assert!(load_anchors(&d.path().join("none")).store.is_empty());
        let ca = rcgen_free_ca();
        std::fs::write(d.path().join("10-ca.pem"), ca).unwrap();
        std::fs::write(d.path().join("20-junk.pem"), "not a certificate").unwrap();
        std::fs::write(d.path().join("readme.txt"), "ignored").unwrap();
        let a = load_anchors(d.path());
        assert_eq!(a.store.len(), 1);
        assert_eq!(a.files.len(), 1);
        assert!(a.problems.len() == 1 && a.problems[0].contains("20-junk.pem"), "{:?}", a.problems);
    }

    /// A self-signed certificate made once with openssl (the tests of the
    /// handshake itself are in tests/https.rs, against a rustls server).
    fn rcgen_free_ca() -> &'static str {
        include_str!("../../tests/data/tls/ca.pem")
    }

    #[test]
    fn problems_say_what_and_what_to_do() {
        let unsynced = Clock { unix: 5, synced: false };
        let d = describe(&rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer), unsynced);
        assert!(d.what.contains("unknown issuer") && d.hint.contains("node.trust"), "{d:?}");
        let d = describe(&rustls::Error::InvalidCertificate(CertificateError::NotValidYet), unsynced);
        assert!(d.what.contains("1970-01-01") && d.what.contains("clock may be the cause"), "{d:?}");
        let synced = Clock { unix: 1_800_000_000, synced: true };
        let d = describe(&rustls::Error::InvalidCertificate(CertificateError::Expired), synced);
        assert!(d.what.contains("expired") && !d.what.contains("may be the cause"), "{d:?}");
        let d = describe(&rustls::Error::InvalidCertificate(CertificateError::NotValidForName), synced);
        assert!(d.what.contains("name mismatch"), "{d:?}");
    }
}
