//! `node.trust`: the certificates a node trusts for https:// (its config
//! URL, update channels, bundles). Each file holds PEM certificates: CA
//! certificates, or a server's self-signed certificate, which pins that one
//! server. They go into the verified root under `/etc/kiln/trust/`; a node
//! trusts nothing else (there is no system CA store).

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::CertificateDer;
use std::path::{Path, PathBuf};

/// One `node.trust` file, checked.
#[derive(Debug, Clone)]
pub struct Anchor {
    pub path: PathBuf,
    /// Its name under /etc/kiln/trust.
    pub name: String,
    /// The certificates only, as PEM.
    pub pem: String,
    pub certificates: usize,
}

/// Reads and checks the files: each must hold at least one certificate
/// rustls accepts as a trust anchor, and no private key.
pub fn load(paths: &[PathBuf], profile: &Path) -> Result<Vec<Anchor>> {
    let mut out = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let at = || format!("{} (`node.trust` in {})", p.display(), profile.display());
        let bytes = std::fs::read(p).with_context(|| format!("reading {}; name the PEM certificate of the CA that signs your server's certificate (kiln serve --init-tls DIR writes DIR/ca.pem)", at()))?;
        let mut pem = String::new();
        let mut n = 0;
        for item in <(SectionKind, Vec<u8>)>::pem_slice_iter(&bytes) {
            let (kind, der) = item.map_err(|e| anyhow::anyhow!("{}: not a PEM file ({e})", at()))?;
            match kind {
                SectionKind::Certificate => {
                    let mut store = rustls::RootCertStore::empty();
                    store.add(CertificateDer::from(der.clone())).map_err(|e| anyhow::anyhow!("{}: certificate {} is not usable as a trust anchor: {e}", at(), n + 1))?;
                    pem.push_str(&pem_block("CERTIFICATE", &der));
                    n += 1;
                }
                SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey => {
                    bail!("{}: this file holds a private key; node.trust takes certificates only. Name the certificate (ca.pem), and keep the key off the image", at())
                }
                _ => {}
            }
        }
        if n == 0 {
            bail!("{}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it", at());
        }
        let stem = p.file_stem().map(|s| s.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect::<String>()).unwrap_or_default();
        out.push(Anchor { path: p.clone(), name: format!("{:02}-{stem}.pem", i + 1), pem, certificates: n });
    }
    Ok(out)
}

fn pem_block(label: &str, der: &[u8]) -> String {
    let b64 = kiln_contract::minisign::b64_encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(line));
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../init/tests/data/tls");

    #[test]
    fn certificates_are_taken_and_keys_refused() {
        let d = tempfile::tempdir().unwrap();
        let ca = Path::new(DATA).join("ca.pem");
        let a = load(std::slice::from_ref(&ca), Path::new("p.toml")).unwrap();
        assert_eq!((a[0].name.as_str(), a[0].certificates), ("01-ca.pem", 1));
        // The re-encoded certificate is the same DER.
        let orig = CertificateDer::pem_file_iter(&ca).unwrap().next().unwrap().unwrap();
        let again = CertificateDer::pem_slice_iter(a[0].pem.as_bytes()).next().unwrap().unwrap();
        assert_eq!(orig, again);
        let both = d.path().join("bundle.pem");
        std::fs::write(&both, [std::fs::read_to_string(&ca).unwrap(), std::fs::read_to_string(Path::new(DATA).join("other-ca.pem")).unwrap()].concat()).unwrap();
        assert_eq!(load(&[both], Path::new("p.toml")).unwrap()[0].certificates, 2);
        let e = load(&[Path::new(DATA).join("ca.key")], Path::new("p.toml")).unwrap_err().to_string();
        assert!(e.contains("private key") && e.contains("node.trust"), "{e}");
        let empty = d.path().join("e.pem");
        std::fs::write(&empty, "hello\n").unwrap();
        let e = load(&[empty], Path::new("p.toml")).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = format!("{:#}", load(&[d.path().join("missing.pem")], Path::new("p.toml")).unwrap_err());
        assert!(e.contains("missing.pem") && e.contains("--init-tls"), "{e}");
    }
}
