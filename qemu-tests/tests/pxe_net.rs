//! Network boot: QEMU's built-in DHCP/TFTP hands the NIC's iPXE the bundle's
//! boot.ipxe, `kiln serve` on loopback (10.0.2.2 to the guest) serves the
//! kernel, the initramfs with the verified root, and the per-MAC node config
//! (over HTTPS when the server has TLS: the image trusts the test CA).

mod common;

use common::{boot_with, built, sh, BOOT_TIMEOUT};
use kiln::tools::run::BootFrom;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PROFILE: &str = "qemu-amd64";
/// The MAC `kiln run` gives the node.
const MAC: &str = "52:54:00:12:34:56";

/// `kiln serve` on an ephemeral loopback port; its log lines are kept.
struct Server {
    child: Child,
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(bundle: &Path, configs: &Path, extra: &[&str]) -> Server {
        Server::start_on(bundle, configs, "127.0.0.1:0", extra)
    }

    /// With TLS from the test PKI: `server` or `other-server` (another CA).
    fn tls(bundle: &Path, configs: &Path, listen: &str, cert: &str) -> Server {
        let (c, k) = (common::test_tls(&format!("{cert}.pem")), common::test_tls(&format!("{cert}.key")));
        Server::start_on(bundle, configs, listen, &["--tls-cert", c.to_str().unwrap(), "--tls-key", k.to_str().unwrap()])
    }

    fn start_on(bundle: &Path, configs: &Path, listen: &str, extra: &[&str]) -> Server {
        let mut child = Command::new(common::kiln_bin())
            .arg("serve")
            .arg(bundle)
            .arg("--configs")
            .arg(configs)
            .args(["--listen", listen])
            .args(extra)
            .stderr(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting kiln serve");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        for pipe in [Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>, Box::new(child.stdout.take().unwrap())] {
            let (log, tx) = (log.clone(), tx.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    eprintln!("[serve] {line}");
                    if let Some(port) = line.split("127.0.0.1:").nth(1).and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next()).and_then(|p| p.parse::<u16>().ok()) {
                        let _ = tx.send(port);
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let port = rx.recv_timeout(Duration::from_secs(30)).expect("kiln serve printed its address");
        Server { child, port, log }
    }

    fn saw(&self, pred: impl Fn(&str) -> bool) -> bool {
        self.log.lock().unwrap().iter().any(|l| pred(l))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}


/// qemu-amd64 trusting the test CA, built once for every test here.
fn out() -> PathBuf {
    built(&common::trusting_test_ca(PROFILE))
}

/// A worker join token pointing at nothing (QEMU's user network has no
/// 10.0.2.99): the stand-in reports its server.
fn join_token() -> String {
    let ca = kiln_contract::minisign::b64_encode(b"-----BEGIN CERTIFICATE-----\nMIIBpxe\n-----END CERTIFICATE-----\n");
    let kubeconfig = format!("apiVersion: v1\nclusters:\n- cluster:\n    certificate-authority-data: {ca}\n    server: https://10.0.2.99:6443\n  name: k0s\ncontexts:\n- context:\n    cluster: k0s\n    user: kubelet-bootstrap\n  name: k0s\ncurrent-context: k0s\nkind: Config\npreferences: {{}}\nusers:\n- name: kubelet-bootstrap\n  user:\n    token: abcdef.0123456789abcdef\n");
    kiln::tools::cluster::join_token(&kubeconfig)
}

fn worker_config(hostname: &str) -> String {
    format!("role = \"worker\"\nhostname = \"{hostname}\"\n[k0s]\ntoken = \"{}\"\n", join_token())
}

fn configs_dir(name: &str) -> PathBuf {
    let configs = common::scratch().join(name);
    let _ = std::fs::remove_dir_all(&configs);
    std::fs::create_dir_all(&configs).unwrap();
    configs
}

fn ipxe(port: u16) -> impl FnOnce(&mut kiln::tools::run::VmSpec) {
    move |s| {
        s.boot = BootFrom::Ipxe;
        s.ipxe_url = Some(format!("http://10.0.2.2:{port}/boot.ipxe"));
    }
}

#[test]
fn ipxe_boot_fetches_the_config_by_mac_over_https_and_runs_the_payload() {
    let out = out();
    let configs = configs_dir("pxe-configs");
    std::fs::write(configs.join(format!("{MAC}.toml")), worker_config("pxe-node-7")).unwrap();
    let server = Server::tls(&out.join("pxe"), &configs, "127.0.0.1:0", "server");
    let mut n = boot_with("ipxe_by_mac", &out, None, ipxe(server.port));
    let v = n.event("root-verified", BOOT_TIMEOUT);
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(v.get("hash"), m["disk"]["roothash"].as_str());
    let eph = n.event("data-ephemeral", BOOT_TIMEOUT);
    assert!(!eph.get("reason").unwrap_or("").is_empty(), "{eph:?}");
    let loaded = n.event("config-loaded", BOOT_TIMEOUT);
    assert_eq!(loaded.get("source"), Some("url"), "{loaded:?}");
    assert_eq!(loaded.get("hostname"), Some("pxe-node-7"), "{loaded:?}");
    assert_eq!(loaded.get("role"), Some("worker"), "{loaded:?}");
    let started = n.event("payload-started", BOOT_TIMEOUT);
    // PID 1 stays small with TLS in use.
    let rss: u64 = started.get("init_rss_kib").and_then(|v| v.parse().ok()).unwrap_or(u64::MAX);
    eprintln!("figures: kiln-init RSS at payload-started after an HTTPS config fetch: {rss} KiB");
    assert!(rss <= 4096, "kiln-init RSS {rss} KiB > 4 MiB");
    // The token from the fetched config reached the payload.
    n.line("the token's server", BOOT_TIMEOUT, |l| l.contains("stand-in: token server=https://10.0.2.99:6443 user=kubelet-bootstrap"));
    let checks = n.standin_checks();
    assert!(checks.iter().any(|l| l.contains("check hostname ok")), "{checks:#?}");
    assert!(server.saw(|l| l.contains("/configs/") && l.contains(" 200 ") && l.contains(&format!("mac={MAC} tls"))), "the server logged the config request over TLS with the MAC");
    assert!(server.saw(|l| l.contains("GET /vmlinuz") && l.contains(" 200 ") && !l.contains(" tls")), "iPXE fetched the kernel over plain HTTP");
}

#[test]
fn a_server_certificate_from_another_ca_is_refused_until_the_server_is_fixed() {
    let out = out();
    let configs = configs_dir("pxe-configs-other-ca");
    std::fs::write(configs.join(format!("{MAC}.toml")), worker_config("pxe-node-8")).unwrap();
    let server = Server::tls(&out.join("pxe"), &configs, "127.0.0.1:0", "other-server");
    let port = server.port;
    let mut n = boot_with("ipxe_other_ca", &out, None, ipxe(port));
    let url = format!("https://10.0.2.2:{port}/configs/{MAC}.toml");
    let err = n.line("the certificate error", BOOT_TIMEOUT, |l| l.contains("error") && l.contains("unknown issuer"));
    assert!(err.contains(&url) && err.contains("node.trust"), "the line names the URL and the fix: {err}");
    let m = n.event("maintenance", Duration::from_secs(60));
    assert!(m.get("reason").is_some_and(|r| r.contains("unknown issuer")), "{m:?}");
    // Retried, still refused; no config is applied meanwhile.
    let again = n.line("a retry", Duration::from_secs(120), |l| (l.contains("unknown issuer") && l != err) || kiln_contract::event::parse(l).is_some_and(|e| e.name == "config-loaded"));
    assert!(again.contains("unknown issuer"), "a config was applied from a server the image does not trust: {again}");
    assert!(!server.saw(|l| l.contains("/configs/") && l.contains(" 200 ")), "the node never completed a request to the wrong server");
    // The operator fixes the server (same port, the right certificate): the
    // node comes up without a reboot.
    drop(server);
    let server = Server::tls(&out.join("pxe"), &configs, &format!("127.0.0.1:{port}"), "server");
    let loaded = n.event("config-loaded", Duration::from_secs(120));
    assert_eq!(loaded.get("hostname"), Some("pxe-node-8"), "{loaded:?}");
    n.event("payload-started", BOOT_TIMEOUT);
    assert!(server.saw(|l| l.contains("/configs/") && l.contains(" 200 ") && l.contains(" tls")));
    let log = std::fs::read_to_string(&n.log).unwrap_or_default();
    assert_eq!(log.matches("Linux version ").count(), 1, "the node came up without a reboot");
}

#[test]
fn a_missing_config_is_a_clear_error_and_is_retried_until_it_appears() {
    let out = out();
    let configs = configs_dir("pxe-configs-404");
    // Plain HTTP, serving secrets anyway: the node must refuse them.
    let server = Server::start(&out.join("pxe"), &configs, &["--insecure-http-secrets"]);
    let mut n = boot_with("ipxe_config_404", &out, None, ipxe(server.port));
    let err = n.line("a console error about the 404", BOOT_TIMEOUT, |l| l.contains("error") && l.contains("404") && l.contains(MAC));
    assert!(err.contains("retrying"), "{err}");
    n.event("maintenance", Duration::from_secs(60));
    // A second attempt, still 404.
    let t0 = Instant::now();
    n.line("a retry", Duration::from_secs(120), |l| l.contains("error") && l.contains("404") && l != err);
    eprintln!("retried after {:.1} s", t0.elapsed().as_secs_f64());
    // An invalid config from the URL: maintenance naming the source, key and
    // line, and the node keeps fetching.
    std::fs::write(configs.join(format!("{MAC}.toml")), "role = \"single\"\nhostname = \"Bad_Name\"\n").unwrap();
    let m = n.line("maintenance for the invalid config", Duration::from_secs(120), |l| {
        kiln_contract::event::parse(l).is_some_and(|e| e.name == "maintenance" && e.get("reason").is_some_and(|r| r.contains("url") && r.contains("hostname")))
    });
    assert!(m.contains("line 2"), "the reason names the line: {m}");
    // A config holding a join token over plain http://: refused, not used.
    std::fs::write(configs.join(format!("{MAC}.toml")), worker_config("leaked")).unwrap();
    let refused = n.line("the refusal of secrets over http", Duration::from_secs(120), |l| l.contains("error") && l.contains("plain http://"));
    assert!(refused.contains("k0s.token") && refused.contains(&format!("http://10.0.2.2:{}/configs/{MAC}.toml", server.port)), "{refused}");
    let m = n.line("maintenance for the secrets", Duration::from_secs(60), |l| kiln_contract::event::parse(l).is_some_and(|e| e.name == "maintenance" && e.get("reason").is_some_and(|r| r.contains("secrets"))));
    assert!(m.contains("http://"), "{m}");
    // The operator puts a valid config in place; the node comes up.
    std::fs::write(configs.join(format!("{MAC}.toml")), "role = \"single\"\nhostname = \"late-config\"\n").unwrap();
    let loaded = n.event("config-loaded", Duration::from_secs(120));
    assert_eq!(loaded.get("hostname"), Some("late-config"), "{loaded:?}");
    n.event("payload-started", BOOT_TIMEOUT);
}


#[test]
fn a_bundle_with_a_tampered_squashfs_stops_at_the_verity_check() {
    let out = out();
    let copy = common::scratch().join("tampered-pxe");
    let _ = std::fs::remove_dir_all(&copy);
    std::fs::create_dir_all(copy.join("pxe")).unwrap();
    std::fs::copy(out.join("manifest.json"), copy.join("manifest.json")).unwrap();
    for f in ["vmlinuz", "cmdline"] {
        std::fs::copy(out.join("pxe").join(f), copy.join("pxe").join(f)).unwrap();
    }
    // Decompressed, the initramfs is stage 1's archive, then the root's:
    // flip a byte of the squashfs and compress it all again as one frame.
    let cpio = copy.join("initramfs.cpio");
    sh(&format!("zstd -q -d -f {} -o {}", out.join("pxe/initramfs.cpio.zst").display(), cpio.display()));
    let mut bytes = std::fs::read(&cpio).unwrap();
    let m = kiln_formats::cpio::list(&bytes).unwrap().into_iter().find(|m| m.name == "kiln/root.squashfs").expect("the root in the initramfs");
    let (at, len) = (m.data.start, m.data.len());
    assert_eq!(&bytes[at..at + 4], b"hsqs", "the initramfs carries the squashfs");
    bytes[at + len / 2 + 77] ^= 0x40;
    std::fs::write(&cpio, &bytes).unwrap();
    sh(&format!("zstd -q -3 -f --rm {} -o {}", cpio.display(), copy.join("pxe/initramfs.cpio.zst").display()));
    let mut n = boot_with("pxe_tampered", &copy, None, |s| s.boot = BootFrom::Pxe);
    let failed = n.event("root-failed", BOOT_TIMEOUT);
    assert!(failed.get("reason").unwrap_or("").contains("verity"), "{failed:?}");
    n.event("maintenance", Duration::from_secs(30));
    let r = n.vm.wait_for("payload-started (must not happen)", Duration::from_secs(20), |l| kiln_contract::event::parse(l).is_some_and(|e| e.name == "payload-started"));
    if let Ok(l) = r {
        n.fail(format!("the node went on after a failed root check: {l}"));
    }
}
