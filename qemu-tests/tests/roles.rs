//! One boot per role: the node.toml (through fw_cfg) becomes the k0s
//! command line, environment, token file and cluster config the stand-in
//! sees, and the appliance baked into the image shows up where k0s imports
//! and applies it.
//!
//! The image is the default profile (qemu-amd64) plus a small `[appliance]`
//! (an airgap bundle, an image tarball, a manifest stack and a Helm chart),
//! built once for all four boots. The join tokens are real k0s tokens
//! pointing at an address nobody answers; the stand-in only decodes them.
//!
//! An armv7 controller (ETCD_UNSUPPORTED_ARCH=arm) gets its boot with the
//! ARM profiles.

mod common;
use common::{boot, built, Node, BOOT_TIMEOUT};
use kiln_contract::digest::hex;
use kiln_contract::minisign::b64_encode;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Where the tokens point: QEMU's user network has nothing there.
const API: &str = "10.0.2.99";
/// The stand-in prints more than the default 50 lines a second at start.
const LOG: &str = "[log]\nconsole_lines_per_second = 2000\n";
const CLUSTER_CONFIG: &str = "apiVersion: k0s.k0sproject.io/v1beta1\nkind: ClusterConfig\nmetadata:\n  name: roles-test\nspec:\n  api:\n    sans: [\"10.0.2.15\"]\n";

/// A join token as `k0s token create` makes one (K0S-CONTRACT.md, Tokens):
/// base64 of a gzipped kubeconfig with cluster and context `k0s`.
fn join_token(port: u16, user: &str) -> String {
    let ca = b64_encode(b"-----BEGIN CERTIFICATE-----\nMIIBroles\n-----END CERTIFICATE-----\n");
    let kubeconfig = format!(
        "apiVersion: v1\nclusters:\n- cluster:\n    certificate-authority-data: {ca}\n    server: https://{API}:{port}\n  name: k0s\ncontexts:\n- context:\n    cluster: k0s\n    user: {user}\n  name: k0s\ncurrent-context: k0s\nkind: Config\npreferences: {{}}\nusers:\n- name: {user}\n  user:\n    token: abcdef.0123456789abcdef\n"
    );
    kiln::tools::cluster::join_token(&kubeconfig)
}

fn sha_prefix(data: &[u8]) -> String {
    Sha256::digest(data).iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// The test profile and what its appliance puts in the root.
struct Appliance {
    profile: PathBuf,
    /// (file name under images/, content)
    images: Vec<(String, Vec<u8>)>,
    /// (stack/file under manifests/, content)
    manifests: Vec<(String, Vec<u8>)>,
}

fn write(p: &Path, data: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

/// A chart archive as `helm package` makes one.
fn chart_tgz() -> Vec<u8> {
    let files = [
        ("hello/Chart.yaml", "apiVersion: v2\nname: hello\nversion: 0.1.0\nappVersion: \"1.0\"\n"),
        ("hello/values.yaml", "replicas: 1\n"),
        ("hello/templates/cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: hello\ndata:\n  replicas: \"{{ .Values.replicas }}\"\n"),
    ];
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default()));
    for (p, c) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(c.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, p, c.as_bytes()).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

fn appliance() -> &'static Appliance {
    static A: OnceLock<Appliance> = OnceLock::new();
    A.get_or_init(|| {
        let ws = common::workspace();
        let dir = common::scratch().join("roles-profile");
        let _ = std::fs::remove_dir_all(&dir);
        let bundle_name = "k0s-airgap-bundle-v1.30.14+k0s.0-amd64";
        let bundle: Vec<u8> = b"stand-in airgap bundle (not a real one)\n".repeat(100);
        let image: Vec<u8> = b"app image tarball\n".repeat(40);
        let ns = b"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: app\n".to_vec();
        let cm = b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app\n  namespace: app\ndata:\n  hello: world\n".to_vec();
        let tgz = chart_tgz();
        write(&dir.join(bundle_name), &bundle);
        write(&dir.join("app.tar"), &image);
        write(&dir.join("manifests/10-namespace.yaml"), &ns);
        write(&dir.join("manifests/20-configmap.yaml"), &cm);
        write(&dir.join("hello-0.1.0.tgz"), &tgz);
        let pin = |d: &[u8]| hex(&Sha256::digest(d));
        let profile = dir.join("roles.toml");
        let text = format!(
            r#"extends = "{base}"
name = "qemu-amd64-roles"
outputs = ["pxe"]

[node]
config = "{node}"

[appliance]
airgap_bundle = {{ file = "{bundle_name}", sha256 = "{bundle_pin}" }}

[appliance.images]
"app.tar" = {{ file = "app.tar", sha256 = "{image_pin}" }}

[[appliance.manifests]]
stack = "app"
path = "manifests"

[[appliance.charts]]
name = "hello"
namespace = "hello"
chart = {{ file = "hello-0.1.0.tgz", sha256 = "{chart_pin}" }}
values = """
replicas: 2
"""
"#,
            base = ws.join("profiles/qemu-amd64.toml").display(),
            node = ws.join("profiles/nodes/single.toml").display(),
            bundle_pin = pin(&bundle),
            image_pin = pin(&image),
            chart_pin = pin(&tgz),
        );
        write(&profile, text.as_bytes());
        // Outside profiles/: kernel-configs/ is found through this.
        std::env::set_var("KILN_SOURCE_DIR", &ws);
        // What the builder renders for the chart, read back through the
        // library so the test compares with exactly what was baked.
        let p = kiln::profile::load(&profile).unwrap_or_else(|e| panic!("{e}"));
        let a = kiln::inputs::appliance::resolve(&p.appliance, &p.path, "amd64", &kiln::inputs::cache::Cache::default_location()).unwrap_or_else(|e| panic!("{e}"));
        let chart = a.bytes("/usr/lib/kiln/appliance/manifests/kiln-charts/hello.yaml").expect("the chart manifest").to_vec();
        assert!(String::from_utf8_lossy(&chart).contains("chartName: /usr/lib/kiln/appliance/charts/hello-0.1.0.tgz"));
        Appliance {
            profile,
            images: vec![(bundle_name.to_string(), bundle), ("app.tar".into(), image)],
            manifests: vec![("app/10-namespace.yaml".into(), ns), ("app/20-configmap.yaml".into(), cm), ("kiln-charts/hello.yaml".into(), chart)],
        }
    })
}

/// The stand-in's report of one run: every `stand-in: ` line from its argv
/// to `checks done`, without the prefix. Fails the test unless every check
/// passed.
fn report(n: &mut Node, role: &str) -> Vec<String> {
    let started = n.event("payload-started", BOOT_TIMEOUT);
    assert_eq!(started.get("role"), Some(role));
    let checks = n.standin_checks();
    let failed: Vec<_> = checks.iter().filter(|l| !l.ends_with(" ok")).collect();
    if !failed.is_empty() {
        n.fail(format!("stand-in checks failed: {failed:#?}"));
    }
    assert!(checks.len() >= 18, "expected every contract check, got {checks:#?}");
    let log = n.vm.log();
    let Some(end) = log.iter().rposition(|l| l.contains("stand-in: checks done")) else { n.fail("no `checks done` line") };
    let start = log[..end].iter().rposition(|l| l.contains("stand-in: argv")).unwrap_or(0);
    log[start..=end].iter().filter_map(|l| l.split_once("stand-in: ").map(|(_, r)| r.trim_end().to_string())).collect()
}

fn has(n: &Node, r: &[String], want: &str) {
    if !r.iter().any(|l| l == want) {
        n.fail(format!("the stand-in did not print `{want}`; it printed:\n{}", r.join("\n")));
    }
}

fn lines_with<'a>(r: &'a [String], prefix: &str) -> Vec<&'a str> {
    r.iter().filter(|l| l.starts_with(prefix)).map(String::as_str).collect()
}

/// Lines every role shares: the unit's limits and the appliance links.
fn common_facts(n: &Node, r: &[String]) {
    has(n, r, "rlimits nofile=999999/999999 core=infinity/infinity nproc=infinity/infinity");
    assert!(lines_with(r, "env ETCD_UNSUPPORTED_ARCH").is_empty(), "amd64 needs no ETCD_UNSUPPORTED_ARCH: {r:#?}");
    let a = appliance();
    has(n, r, &format!("payloads images={} manifests={}", a.images.len(), a.manifests.len()));
}

fn images_are_linked(n: &Node, r: &[String]) {
    for (name, data) in &appliance().images {
        has(n, r, &format!("image {name} bytes={} sha256={} link=/usr/lib/kiln/appliance/images/{name}", data.len(), sha_prefix(data)));
    }
}

fn manifests_are_linked(n: &Node, r: &[String]) {
    for (name, data) in &appliance().manifests {
        has(n, r, &format!("manifest {name} bytes={} sha256={} link=/usr/lib/kiln/appliance/manifests/{name}", data.len(), sha_prefix(data)));
    }
}

fn token_file_is_private(n: &Node, r: &[String], port: u16, user: &str) {
    has(n, r, "token-file /etc/k0s/token mode=0600");
    has(n, r, &format!("token server=https://{API}:{port} user={user}"));
}

#[test]
fn single() {
    let a = appliance();
    let out = built(a.profile.to_str().unwrap());
    let cfg = format!("role = \"single\"\nhostname = \"role-single\"\n{LOG}");
    let mut n = boot("roles_single", &out, Some(&cfg));
    let r = report(&mut n, "single");
    has(&n, &r, "argv /usr/bin/k0s controller --single --data-dir=/var/lib/k0s --disable-components=autopilot,update-prober");
    assert!(r.iter().any(|l| l.starts_with("role=single pid=")), "{r:#?}");
    has(&n, &r, "token none");
    assert!(lines_with(&r, "env ").is_empty(), "no environment beyond PATH and HOME: {r:#?}");
    assert!(lines_with(&r, "config-file").is_empty(), "no cluster config given: {r:#?}");
    common_facts(&n, &r);
}

#[test]
fn controller_joins_with_config_token_and_env() {
    let a = appliance();
    let out = built(a.profile.to_str().unwrap());
    let token = join_token(9443, "controller-bootstrap");
    let cfg = format!(
        "role = \"controller\"\nhostname = \"role-controller\"\n[k0s]\ntoken = \"{token}\"\nconfig = \"\"\"\n{CLUSTER_CONFIG}\"\"\"\nenv = {{ ETCD_HEARTBEAT_INTERVAL = \"250\", HTTPS_PROXY = \"http://10.0.2.2:3128\" }}\n{LOG}"
    );
    let mut n = boot("roles_controller", &out, Some(&cfg));
    let r = report(&mut n, "controller");
    has(&n, &r, "argv /usr/bin/k0s controller --config=/etc/k0s/k0s.yaml --data-dir=/var/lib/k0s --token-file=/etc/k0s/token --disable-components=autopilot,update-prober");
    token_file_is_private(&n, &r, 9443, "controller-bootstrap");
    has(&n, &r, &format!("config-file /etc/k0s/k0s.yaml bytes={}", CLUSTER_CONFIG.len()));
    let config: Vec<&str> = lines_with(&r, "config | ").iter().map(|l| &l["config | ".len()..]).collect();
    assert_eq!(config, CLUSTER_CONFIG.lines().collect::<Vec<_>>(), "the cluster config, line by line");
    assert_eq!(lines_with(&r, "env "), ["env ETCD_HEARTBEAT_INTERVAL=250", "env HTTPS_PROXY=http://10.0.2.2:3128"], "the config's env, passed as given");
    common_facts(&n, &r);
    // The controller applies manifests: the baked stack and the chart's.
    manifests_are_linked(&n, &r);
}

#[test]
fn worker_joins_with_node_settings_and_images() {
    let a = appliance();
    let out = built(a.profile.to_str().unwrap());
    let token = join_token(6443, "kubelet-bootstrap");
    let cfg = format!(
        "role = \"worker\"\nhostname = \"role-worker\"\n[k0s]\ntoken = \"{token}\"\nlabels = {{ site = \"lab\", tier = \"edge\" }}\ntaints = [\"dedicated=edge:NoSchedule\"]\nkubelet_extra_args = \"--max-pods=50 --v=2\"\nenv = {{ CONTAINERD_HTTPS_PROXY = \"http://10.0.2.2:3128\", KUBELET_X = \"1\" }}\n{LOG}"
    );
    let mut n = boot("roles_worker", &out, Some(&cfg));
    let r = report(&mut n, "worker");
    has(&n, &r, "argv /usr/bin/k0s worker --data-dir=/var/lib/k0s --token-file=/etc/k0s/token --labels=site=lab,tier=edge --taints=dedicated=edge:NoSchedule '--kubelet-extra-args=--max-pods=50 --v=2'");
    token_file_is_private(&n, &r, 6443, "kubelet-bootstrap");
    assert_eq!(lines_with(&r, "env "), ["env CONTAINERD_HTTPS_PROXY=http://10.0.2.2:3128", "env KUBELET_X=1"]);
    assert!(lines_with(&r, "config-file").is_empty(), "a worker has no --config: {r:#?}");
    common_facts(&n, &r);
    // The worker imports every file in images/: the airgap bundle and the
    // extra tarball, read through their links.
    images_are_linked(&n, &r);
}

#[test]
fn controller_worker_without_taints() {
    let a = appliance();
    let out = built(a.profile.to_str().unwrap());
    let cfg = format!("role = \"controller+worker\"\nhostname = \"role-cw\"\n[k0s]\nno_taints = true\nlabels = {{ site = \"lab\" }}\ndisable_components = [\"autopilot\", \"update-prober\", \"metrics-server\"]\n{LOG}");
    let mut n = boot("roles_controller_worker", &out, Some(&cfg));
    let r = report(&mut n, "controller+worker");
    has(&n, &r, "argv /usr/bin/k0s controller --enable-worker --no-taints --data-dir=/var/lib/k0s --disable-components=autopilot,update-prober,metrics-server --labels=site=lab");
    has(&n, &r, "token none");
    assert!(lines_with(&r, "env ").is_empty(), "{r:#?}");
    common_facts(&n, &r);
}
