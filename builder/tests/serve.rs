//! `kiln serve` as a user runs it: the real binary on a free port, with a
//! temporary PXE bundle and configs directory. Checks files, MAC spellings,
//! traversal refusal, the boot.ipxe rewrite and the log lines; then a signed
//! config made by `kiln config sign`, served and checked by Debian's
//! minisign and by kiln_contract::minisign.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

/// A running `kiln serve`, killed on drop.
struct Serve {
    child: Child,
    addr: String,
    log: mpsc::Receiver<String>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    fn start(dir: &Path, configs: Option<&Path>) -> Serve {
        Serve::start_with(dir, configs, &[])
    }

    fn start_with(dir: &Path, configs: Option<&Path>, extra: &[&str]) -> Serve {
        let mut cmd = Command::new(KILN);
        cmd.arg("serve").arg(dir).args(["--listen", "127.0.0.1:0"]).args(extra);
        if let Some(c) = configs {
            cmd.arg("--configs").arg(c);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kiln serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        // Startup notes, then the address last.
        let first = loop {
            let l = log
                .recv_timeout(Duration::from_secs(20))
                .expect("kiln serve printed no address");
            if l.contains("listening on ") {
                break l;
            }
        };
        let addr = first
            .split("listening on ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .unwrap_or_else(|| panic!("no address in {first:?}"))
            .to_string();
        assert!(
            !addr.ends_with(":0"),
            "port 0 must be reported as the real port: {first}"
        );
        Serve { child, addr, log }
    }

    /// The next log line, which must come soon.
    fn log_line(&self) -> String {
        self.log
            .recv_timeout(Duration::from_secs(10))
            .expect("no log line")
    }

    /// Sends a raw request; returns (status, headers, body).
    fn raw(&self, request: &str) -> (u16, String, Vec<u8>) {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let split = out
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("no head");
        let head = String::from_utf8_lossy(&out[..split]).into_owned();
        let code = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status");
        (code, head, out[split + 4..].to_vec())
    }

    fn get(&self, path: &str) -> (u16, String, Vec<u8>) {
        self.raw(&format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        ))
    }
}

fn bundle() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let pxe = d.path().join("pxe");
    std::fs::create_dir_all(&pxe).unwrap();
    std::fs::write(
        pxe.join("boot.ipxe"),
        "#!ipxe\nset kiln-server http://replaced-by-kiln-serve\nkernel ${kiln-server}/vmlinuz kiln.config=${kiln-server}/configs/${mac}.toml\ninitrd ${kiln-server}/initramfs.cpio.zst\nboot\n",
    )
    .unwrap();
    // Larger than any socket buffer, so it is streamed.
    let kernel: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(pxe.join("vmlinuz"), kernel).unwrap();
    std::fs::write(pxe.join("initramfs.cpio.zst"), b"cpio").unwrap();
    std::fs::write(d.path().join("secret"), b"SECRET-CONTENT").unwrap();
    std::os::unix::fs::symlink("../secret", pxe.join("escape")).unwrap();
    let configs = d.path().join("configs");
    std::fs::create_dir_all(&configs).unwrap();
    std::fs::write(
        configs.join("52:54:00:12:34:56.toml"),
        "role = \"single\"\n",
    )
    .unwrap();
    std::fs::write(
        configs.join("aa-bb-cc-dd-ee-ff.toml"),
        "role = \"controller\"\n",
    )
    .unwrap();
    d
}

#[test]
fn serves_the_bundle_and_configs_by_mac() {
    let d = bundle();
    let pxe = d.path().join("pxe");
    let configs = d.path().join("configs");
    let s = Serve::start(&pxe, Some(&configs));

    // Files, streamed with their length.
    let (code, head, body) = s.get("/vmlinuz");
    assert_eq!(code, 200);
    assert_eq!(body, std::fs::read(pxe.join("vmlinuz")).unwrap());
    assert!(head.contains("Content-Length: 3000000"), "{head}");
    let line = s.log_line();
    assert_eq!(line, "kiln serve: 127.0.0.1 GET /vmlinuz 200 3000000 B");
    let (code, head, body) = s.raw(&format!(
        "HEAD /initramfs.cpio.zst HTTP/1.1\r\nHost: {}\r\n\r\n",
        s.addr
    ));
    assert_eq!((code, body.len()), (200, 0));
    assert!(head.contains("Content-Length: 4"), "{head}");
    s.log_line();

    // boot.ipxe names the server as the client reached it.
    let (code, _, body) =
        s.raw("GET /boot.ipxe?mac=52-54-00-12-34-56 HTTP/1.1\r\nHost: boot.example:8080\r\n\r\n");
    assert_eq!(code, 200);
    let script = String::from_utf8(body).unwrap();
    assert!(
        script.contains("\nset kiln-server http://boot.example:8080\n"),
        "{script}"
    );
    assert!(script.contains("kernel ${kiln-server}/vmlinuz"), "{script}");
    let line = s.log_line();
    assert!(
        line.starts_with("kiln serve: 127.0.0.1 GET /boot.ipxe?mac=52-54-00-12-34-56 200 ")
            && line.ends_with(" mac=52:54:00:12:34:56"),
        "{line}"
    );

    // Configs: any spelling of the MAC finds the file in either spelling.
    for path in [
        "/configs/52:54:00:12:34:56.toml",
        "/configs/52-54-00-12-34-56.toml",
        "/configs/52%3A54%3A00%3A12%3A34%3A56.toml",
        "/configs/525400123456.toml",
    ] {
        let (code, _, body) = s.get(path);
        assert_eq!(
            (code, body.as_slice()),
            (200, &b"role = \"single\"\n"[..]),
            "{path}"
        );
        let line = s.log_line();
        assert_eq!(
            line,
            format!("kiln serve: 127.0.0.1 GET {path} 200 16 B mac=52:54:00:12:34:56")
        );
    }
    let (code, _, body) = s.get("/configs/AA:BB:CC:DD:EE:FF.toml");
    assert_eq!(
        (code, body.as_slice()),
        (200, &b"role = \"controller\"\n"[..])
    );
    assert!(s.log_line().ends_with(" mac=aa:bb:cc:dd:ee:ff"));

    // A missing config says which files were looked for.
    let (code, _, body) = s.get("/configs/52:54:00:00:00:01.toml");
    assert_eq!(code, 404);
    assert!(String::from_utf8_lossy(&body).contains("52:54:00:00:00:01.toml"));
    let line = s.log_line();
    let want = format!(
        "kiln serve: 127.0.0.1 GET /configs/52:54:00:00:00:01.toml 404 {} B mac=52:54:00:00:00:01 (no node config: looked for {c}/52:54:00:00:00:01.toml or {c}/52-54-00-00-00-01.toml)",
        body.len(),
        c = configs.canonicalize().unwrap().display()
    );
    assert_eq!(line, want);

    // Nothing outside the served directory, however asked.
    for (path, want) in [
        ("/../secret", 400),
        ("/%2e%2e/secret", 400),
        ("/configs/..%2F..%2Fsecret.toml", 400),
        ("/escape", 404),
        ("/nothing-here", 404),
        ("/", 404),
    ] {
        let (code, _, body) = s.get(path);
        assert_eq!(code, want, "{path}");
        assert!(!String::from_utf8_lossy(&body).contains("SECRET"), "{path}");
        let line = s.log_line();
        assert!(line.contains(&format!(" GET {path} {want} ")), "{line}");
    }
    let (code, head, _) = s.raw("POST /boot.ipxe HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(code, 405);
    assert!(head.contains("Allow: GET, HEAD"), "{head}");
    assert!(s.log_line().contains(" POST /boot.ipxe 405 "));
    let (code, _, _) = s.raw("garbage\r\n\r\n");
    assert_eq!(code, 400);
    assert!(s.log_line().contains(" 400 "));
}

#[test]
fn missing_directory_is_a_clear_error() {
    let out = Command::new(KILN)
        .args(["serve", "/nonexistent/pxe", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/pxe") && err.contains("pxe/ directory of a build output"),
        "{err}"
    );
}

#[test]
fn signed_config_round_trip() {
    let d = bundle();
    let t = d.path();
    let run = |args: &[&str]| {
        let out = Command::new(KILN).args(args).output().unwrap();
        let text = kiln_testkit::output_text(&out);
        (out.status.success(), text)
    };
    let (ok, text) = run(&["key", "generate", "--dir", t.to_str().unwrap()]);
    assert!(ok, "{text}");
    let node = t.join("configs/52:54:00:12:34:56.toml");
    let key = t.join("kiln.key");
    let (ok, text) = run(&[
        "config",
        "sign",
        node.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert!(ok && text.contains(".toml.minisig"), "{text}");

    // An invalid config is not signed.
    let bad = t.join("bad.toml");
    std::fs::write(&bad, "role = \"boss\"\n").unwrap();
    let (ok, text) = run(&[
        "config",
        "sign",
        bad.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert!(
        !ok && text.contains("not signing an invalid config"),
        "{text}"
    );
    assert!(!t.join("bad.toml.minisig").exists());
    // Without a key, say how to give one.
    let out = Command::new(KILN)
        .args(["config", "sign", node.to_str().unwrap()])
        .env_remove("KILN_SIGNING_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("KILN_SIGNING_KEY"));
    // The key from the environment, as for builds.
    let other = t.join("other.toml");
    std::fs::write(&other, "role = \"single\"\n").unwrap();
    let out = Command::new(KILN)
        .args(["config", "sign", other.to_str().unwrap()])
        .env("KILN_SIGNING_KEY", std::fs::read_to_string(&key).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    // Debian's minisign accepts the signature.
    let public = t.join("kiln.pub");
    if let Some(minisign) = kiln_testkit::checker("minisign", "minisign") {
        let out = Command::new(minisign)
            .arg("-Vm")
            .arg(&node)
            .arg("-p")
            .arg(&public)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stdout)
            .contains("kiln node config 52:54:00:12:34:56.toml"));
    }

    // Served by kiln serve, checked by the node's verifier (the contract's);
    // one flipped byte is refused. (The node's HTTP client against kiln
    // serve: qemu-tests' pxe_net boots.)
    let s = Serve::start(&t.join("pxe"), Some(&t.join("configs")));
    let path = "/configs/52-54-00-12-34-56.toml";
    let (code, _, data) = s.get(path);
    assert_eq!(code, 200);
    let (code, _, sig) = s.get(&format!("{path}.minisig"));
    assert_eq!(code, 200);
    let sig = String::from_utf8(sig).unwrap();
    let pk = kiln_contract::minisign::PublicKey::from_file(&std::fs::read_to_string(&public).unwrap())
        .unwrap();
    assert_eq!(
        pk.verify(&data, &sig).unwrap(),
        "kiln node config 52:54:00:12:34:56.toml"
    );
    for i in 0..data.len() {
        let mut flipped = data.clone();
        flipped[i] ^= 0x01;
        assert!(
            matches!(
                pk.verify(&flipped, &sig),
                Err(kiln_contract::minisign::SignError::BadSignature)
            ),
            "byte {i}"
        );
    }
    // The client stops reading at Content-Length, so the two lines may
    // come in either order.
    let mut lines = [s.log_line(), s.log_line()];
    lines.sort();
    assert!(
        lines[0].ends_with(".toml 200 16 B mac=52:54:00:12:34:56"),
        "{lines:?}"
    );
    assert!(lines[1].contains(".toml.minisig 200 "), "{lines:?}");
}

/// curl, as a client that checks certificates the usual way.
fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl").args(["-sS", "--max-time", "20"]).args(args).output().expect("curl (apt-get install curl)");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn tls_lab_ca_and_secrets_stay_off_plain_http() {
    let d = bundle();
    let pxe = d.path().join("pxe");
    let configs = d.path().join("configs");
    let token = "role = \"worker\"\n[k0s]\ntoken = \"c2VjcmV0\"\n";
    std::fs::write(configs.join("52:54:00:00:00:02.toml"), token).unwrap();
    std::fs::write(configs.join("52:54:00:00:00:03.toml"), "role = \"controller\"\n[k0s.ca]\ncert = '''\n-----BEGIN CERTIFICATE-----\n'''\nkey = '''\n-----BEGIN RSA PRIVATE KEY-----\n'''\n").unwrap();
    // Without TLS: the token config is refused with the reason, in the body
    // and the log; a config without secrets is served.
    let s = Serve::start(&pxe, Some(&configs));
    let (code, _, body) = s.get("/configs/52:54:00:00:00:02.toml");
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("k0s.token") && body.contains("https://") && body.contains("--insecure-http-secrets"), "{body}");
    let line = s.log_line();
    assert!(line.contains(" 403 ") && line.contains("k0s.token"), "{line}");
    assert_eq!(s.get("/configs/52:54:00:12:34:56.toml").0, 200);
    s.log_line();
    drop(s);
    // --insecure-http-secrets serves it; a CA key is still refused.
    let s = Serve::start_with(&pxe, Some(&configs), &["--insecure-http-secrets"]);
    let (code, _, body) = s.get("/configs/52:54:00:00:00:02.toml");
    assert_eq!((code, body.as_slice()), (200, token.as_bytes()));
    s.log_line();
    let (code, _, body) = s.get("/configs/52:54:00:00:00:03.toml");
    assert_eq!(code, 403);
    assert!(String::from_utf8_lossy(&body).contains("controller.local.toml"));
    drop(s);

    // A lab CA: made, then served with on the same port as plain HTTP.
    let tls = d.path().join("tls");
    let s = Serve::start_with(&pxe, Some(&configs), &["--init-tls", tls.to_str().unwrap(), "--tls-name", "kiln.test"]);
    let ca = tls.join("ca.pem");
    let verified = Command::new("openssl").args(["verify", "-CAfile"]).arg(&ca).arg(tls.join("server.pem")).output().unwrap();
    assert!(verified.status.success(), "openssl verify of the server certificate against the lab CA: {verified:?}");
    let port = s.addr.rsplit(':').next().unwrap().to_string();
    let url = format!("https://127.0.0.1:{port}/configs/52:54:00:00:00:02.toml");
    let (ok, out) = curl(&["--cacert", ca.to_str().unwrap(), &url]);
    assert!(ok && out == token, "curl over TLS: {out}");
    let line = s.log_line();
    assert!(line.contains(" 200 ") && line.contains("mac=52:54:00:00:00:02"), "{line}");
    // The extra name is in the certificate.
    let (ok, out) = curl(&["--cacert", ca.to_str().unwrap(), "--resolve", &format!("kiln.test:{port}:127.0.0.1"), &format!("https://kiln.test:{port}/configs/52:54:00:12:34:56.toml")]);
    assert!(ok, "{out}");
    s.log_line();
    // A client trusting another CA refuses the server.
    let other = Path::new(env!("CARGO_MANIFEST_DIR")).join("../init/tests/data/tls/other-ca.pem");
    let (ok, out) = curl(&["--cacert", other.to_str().unwrap(), &url]);
    assert!(!ok, "{out}");
    // Plain HTTP on the same port: boot files yes, the token no.
    while s.log.recv_timeout(Duration::from_millis(300)).is_ok() {}
    assert_eq!(s.get("/configs/52:54:00:00:00:02.toml").0, 403);
    assert_eq!(s.get("/vmlinuz").0, 200);
    // The CA key stays refused over TLS too.
    let (ok, out) = curl(&["--cacert", ca.to_str().unwrap(), "--fail", &format!("https://127.0.0.1:{port}/configs/52:54:00:00:00:03.toml")]);
    assert!(!ok && out.contains("403"), "{out}");
    drop(s);
    // A second start reuses the CA.
    let before = std::fs::read(&ca).unwrap();
    let s = Serve::start_with(&pxe, Some(&configs), &["--init-tls", tls.to_str().unwrap(), "--tls-name", "kiln.test"]);
    assert_eq!(std::fs::read(&ca).unwrap(), before);
    drop(s);
}

#[test]
fn boot_ipxe_sends_configs_to_https_when_serving_tls() {
    let d = bundle();
    let pxe = d.path().join("pxe");
    std::fs::write(pxe.join("boot.ipxe"), "#!ipxe\nset kiln-server http://${next-server}:8080\nset kiln-config-server ${kiln-server}\nkernel ${kiln-server}/vmlinuz kiln.config=${kiln-config-server}/configs/${mac}.toml\n").unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../init/tests/data/tls");
    let s = Serve::start_with(&pxe, None, &["--tls-cert", data.join("server.pem").to_str().unwrap(), "--tls-key", data.join("server.key").to_str().unwrap()]);
    let (code, _, body) = s.raw("GET /boot.ipxe HTTP/1.1\r\nHost: 10.0.2.2:8080\r\n\r\n");
    let script = String::from_utf8(body).unwrap();
    assert_eq!(code, 200);
    assert!(script.contains("\nset kiln-server http://10.0.2.2:8080\nset kiln-config-server https://10.0.2.2:8080\n"), "{script}");
    drop(s);
    let s = Serve::start(&pxe, None);
    let (_, _, body) = s.raw("GET /boot.ipxe HTTP/1.1\r\nHost: 10.0.2.2:8080\r\n\r\n");
    let script = String::from_utf8(body).unwrap();
    assert!(script.contains("\nset kiln-config-server ${kiln-server}\n"), "without TLS the line stays: {script}");
}
