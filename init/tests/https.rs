//! The node's HTTPS client against a rustls server on loopback: a trusted
//! certificate works (plain and chunked bodies), and each certificate
//! problem is a clear error naming what is wrong.

use kiln_init::node::fetch::{self, FetchError, Options};
use kiln_init::node::tls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/tls");

fn server_config(name: &str) -> Arc<rustls::ServerConfig> {
    let cert = CertificateDer::pem_file_iter(Path::new(DATA).join(format!("{name}.pem"))).unwrap().collect::<Result<Vec<_>, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_file(Path::new(DATA).join(format!("{name}.key"))).unwrap();
    Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(cert, key)
            .unwrap(),
    )
}

/// Serves `answer` to every TLS connection; returns the port.
fn serve(name: &str, answer: &'static [u8]) -> u16 {
    serve_on("127.0.0.1:0", name, answer).unwrap()
}

fn serve_on(addr: &str, name: &str, answer: &'static [u8]) -> std::io::Result<u16> {
    let cfg = server_config(name);
    let l = TcpListener::bind(addr)?;
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let Ok(conn) = rustls::ServerConnection::new(cfg) else { return };
                let mut tls = rustls::StreamOwned::new(conn, s);
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut b) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                let _ = tls.write_all(answer);
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    Ok(port)
}

fn opts(ca: &str) -> Options {
    let a = tls::load_anchors(&tempdir_with(ca));
    Options { tls: Some(tls::client_config(a.store)), ..Options::default() }
}

fn tempdir_with(ca: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-https-test-{}-{ca}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(Path::new(DATA).join(format!("{ca}.pem")), d.join(format!("{ca}.pem"))).unwrap();
    d
}

#[test]
fn a_trusted_server_answers_over_tls() {
    let port = serve("server", b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\nrole = \"single\"");
    let body = fetch::get(&format!("https://127.0.0.1:{port}/configs/a.toml"), &opts("ca")).unwrap();
    assert_eq!(body, b"role = \"single\"");
    let body = fetch::get(&format!("https://localhost:{port}/x"), &opts("ca")).unwrap();
    assert_eq!(body, b"role = \"single\"");
    let port = serve("server", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nrole\r\n0\r\n\r\n");
    assert_eq!(fetch::get(&format!("https://127.0.0.1:{port}/"), &opts("ca")).unwrap(), b"role");
}

#[test]
fn an_unknown_issuer_is_named() {
    let port = serve("other-server", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    let url = format!("https://127.0.0.1:{port}/configs/a.toml");
    let e = fetch::get(&url, &opts("ca")).unwrap_err();
    let FetchError::Tls { what, hint, .. } = &e else { panic!("{e:?}") };
    assert!(what.contains("unknown issuer"), "{what}");
    assert!(hint.contains("node.trust"), "{hint}");
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
}

#[test]
fn a_name_mismatch_is_named() {
    // The certificate is for localhost and 127.0.0.1, not 127.0.0.2 (all
    // of 127/8 is loopback on Linux).
    let port = serve_on("127.0.0.2:0", "server", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").unwrap();
    let e = fetch::get(&format!("https://127.0.0.2:{port}/"), &opts("ca")).unwrap_err();
    let FetchError::Tls { what, hint, .. } = &e else { panic!("{e:?}") };
    assert!(what.contains("name mismatch") && what.contains("127.0.0.1"), "{what}");
    assert!(hint.contains("name"), "{hint}");
}

#[test]
fn plain_http_on_a_tls_port_and_tls_on_a_plain_port_are_errors() {
    // An http:// server asked for https://.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let e = fetch::get(&format!("https://127.0.0.1:{port}/"), &opts("ca")).unwrap_err();
    assert!(matches!(e, FetchError::Tls { .. } | FetchError::Io(_) | FetchError::Truncated(_)), "{e:?}");
}

#[test]
fn an_image_without_anchors_says_so() {
    // The image's trust dir does not exist on the test machine.
    if Path::new(tls::TRUST_DIR).exists() {
        return;
    }
    let e = fetch::get("https://127.0.0.1:1/", &Options::default()).unwrap_err();
    assert!(matches!(&e, FetchError::NoTrust(m) if m.contains("node.trust")), "{e:?}");
}

#[test]
fn a_self_signed_server_certificate_in_the_trust_store_pins_that_server() {
    let port = serve("pinned", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    assert_eq!(fetch::get(&format!("https://127.0.0.1:{port}/"), &opts("pinned")).unwrap(), b"ok");
    // Another server, even with a certificate from a real CA, is not it.
    let port = serve("server", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    assert!(matches!(fetch::get(&format!("https://127.0.0.1:{port}/"), &opts("pinned")), Err(FetchError::Tls { .. })));
}

#[test]
fn a_redirect_from_https_down_to_http_is_refused() {
    let port = serve("server", b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/plain.toml\r\nContent-Length: 0\r\n\r\n");
    let e = fetch::get(&format!("https://127.0.0.1:{port}/a.toml"), &opts("ca")).unwrap_err();
    assert!(matches!(&e, FetchError::Downgrade(u) if u.starts_with("https://")), "{e:?}");
    assert!(e.to_string().contains("in the clear"), "{e}");
}
