//! A new cluster from one command: `kiln cluster init` writes a controller
//! and a worker config; two nodes booted with them on one Ethernet link fit
//! together. The controller's kiln-init puts the CA and the bootstrap token
//! Secret where k0s reads them, and the worker's stand-in reaches the
//! controller's stand-in at the address in its join token with a token id
//! and secret that match that Secret.

mod common;
use common::{boot_pair, built, BOOT_TIMEOUT};
use std::io::Read;
use std::time::Duration;

const PROFILE: &str = "qemu-amd64";
/// The worker stand-in retries for up to 600 s; both nodes boot at once.
const JOIN_TIMEOUT: Duration = Duration::from_secs(660);

/// The `<id>.<secret>` inside a join token.
fn token_of(join_token: &str) -> (String, String) {
    let gz = kiln_contract::minisign::b64_decode(join_token.trim()).expect("the join token is base64");
    let mut kc = String::new();
    flate2::read::GzDecoder::new(&gz[..]).read_to_string(&mut kc).expect("the join token is gzip");
    let t = kc.lines().find_map(|l| l.trim().strip_prefix("token: ")).expect("a user token in the kubeconfig");
    let (id, secret) = t.split_once('.').expect("<id>.<secret>");
    (id.to_string(), secret.to_string())
}

#[test]
fn cluster_init_pair_joins() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = kiln::tools::cluster::InitOptions::new(dir.path().join("lab"));
    o.name = "lab".into();
    o.controller_address = Some("10.0.0.10/24".into());
    o.worker_address = Some("10.0.0.11/24".into());
    // The pair's link reaches nothing else: no NTP server to wait for.
    o.ntp = Vec::new();
    let r = kiln::tools::cluster::init(&o).unwrap_or_else(|e| panic!("kiln cluster init: {e}"));
    assert_eq!(r.server, "https://10.0.0.10:6443");
    let read = |n: &str| std::fs::read_to_string(o.dir.join(n)).unwrap_or_else(|e| panic!("{n}: {e}"));
    let (id, secret) = token_of(&read("worker.token"));
    assert_eq!(id, r.token_id);

    // Only the controller's local-media config holds a private key; every
    // config meant for the network (worker.toml) has none.
    for e in std::fs::read_dir(&o.dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".toml") && name != kiln::tools::cluster::CONTROLLER_FILE {
            assert!(!read(&name).contains("PRIVATE KEY"), "{name} is meant for the network but holds a private key");
        }
    }
    assert!(read(kiln::tools::cluster::CONTROLLER_FILE).contains("PRIVATE KEY"), "the controller's own config carries the CA key");
    assert!(read(&format!("bootstrap-token-{id}.yaml")).contains("expiration"), "the worker token expires by default");
    // The admin kubeconfig names the controller's CA and the API server.
    let admin = read(kiln::tools::cluster::ADMIN_KUBECONFIG);
    let ca_b64 = kiln_contract::minisign::b64_encode(read("ca.crt").as_bytes());
    assert!(admin.contains(&format!("certificate-authority-data: {ca_b64}")) && admin.contains(&format!("server: {}", r.server)), "{admin}");

    let out = built(PROFILE);
    let (mut ctl, mut wrk) = boot_pair("cluster_init_pair", &out, ["controller", "worker"], [&read(kiln::tools::cluster::CONTROLLER_FILE), &read("worker.toml")]);

    // The controller: static address, the CA and the Secret in place.
    let loaded = ctl.event("config-loaded", BOOT_TIMEOUT);
    assert_eq!((loaded.get("role"), loaded.get("hostname")), (Some("controller"), Some("lab-controller")));
    let up = ctl.event("network-up", BOOT_TIMEOUT);
    assert_eq!((up.get("addr"), up.get("method")), (Some("10.0.0.10/24"), Some("static")));
    let files = ctl.event("k0s-files", BOOT_TIMEOUT);
    assert_eq!((files.get("ca"), files.get("manifests")), (Some("written"), Some("1")), "{files:?}");
    let started = ctl.event("payload-started", BOOT_TIMEOUT);
    assert_eq!(started.get("role"), Some("controller"));
    let manifest = format!("/var/lib/k0s/manifests/{}/bootstrap-token-{id}.yaml", kiln::tools::cluster::STACK);
    let found = ctl.line("the bootstrap Secret", BOOT_TIMEOUT, |l| l.contains("stand-in: bootstrap-secret id="));
    assert!(found.contains(&format!("id={id} found in {manifest} authentication=true")), "{found}");
    ctl.line("stand-in listening", BOOT_TIMEOUT, |l| l.contains("stand-in: listening on ports 6443,9443"));
    let checks = ctl.standin_checks();
    assert!(checks.iter().any(|l| l.ends_with("check cluster-ca ok")), "the CA k0s needs is in /var/lib/k0s/pki: {checks:#?}");
    let failed: Vec<_> = checks.iter().filter(|l| !l.ends_with(" ok")).collect();
    if !failed.is_empty() {
        ctl.fail(format!("controller stand-in checks failed: {failed:#?}"));
    }

    // The worker: static address, its token points at the controller.
    let loaded = wrk.event("config-loaded", BOOT_TIMEOUT);
    assert_eq!(loaded.get("role"), Some("worker"));
    assert!(loaded.get("hostname").is_some_and(|h| h == "lab-worker-525400000002"), "{loaded:?}");
    let up = wrk.event("network-up", BOOT_TIMEOUT);
    assert_eq!((up.get("addr"), up.get("method")), (Some("10.0.0.11/24"), Some("static")));
    wrk.event("payload-started", BOOT_TIMEOUT);
    let tok = wrk.line("the token's server", BOOT_TIMEOUT, |l| l.contains("stand-in: token server="));
    assert!(tok.contains("server=https://10.0.0.10:6443 user=kubelet-bootstrap"), "{tok}");
    let failed: Vec<_> = wrk.standin_checks().into_iter().filter(|l| !l.ends_with(" ok")).collect();
    if !failed.is_empty() {
        wrk.fail(format!("worker stand-in checks failed: {failed:#?}"));
    }
    let reached = wrk.line("the worker reaching the controller", JOIN_TIMEOUT, |l| {
        l.contains("stand-in: reached controller") || l.contains("stand-in: controller 10.0.0.10:6443 not reached")
    });
    assert!(reached.contains("reached controller 10.0.0.10:6443 answer=ok"), "{reached}\n(worker log: {})", wrk.log.display());

    // And the controller saw that worker, with the Secret's id and secret.
    let join = ctl.line("the join on the controller", Duration::from_secs(60), |l| l.contains("stand-in: join from"));
    assert!(join.contains("join from 10.0.0.11:") && join.contains(&format!("on port 6443 id={id} answer=ok")), "{join}");
    let secret_yaml = read(&format!("bootstrap-token-{id}.yaml"));
    let b64 = |s: &str| kiln_contract::minisign::b64_encode(s.as_bytes());
    assert!(secret_yaml.contains(&format!("token-secret: {}", b64(&secret))), "the worker's secret is the Secret's");
}
