#![allow(dead_code)]
//! The harness for tests that build a profile and boot it under QEMU.
//!
//! Builds happen once per test binary. VMs run one at a time (these machines
//! have two cores and TCG is slow), each with a serial log under
//! `target/qemu-tests/logs/`, kept when the test fails.

use kiln::tools::run::{Accel, Vm, VmSpec};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// Generous: TCG on a loaded two-core machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

pub fn scratch() -> PathBuf {
    let d = workspace().join("target").join("qemu-tests");
    let _ = std::fs::create_dir_all(&d);
    d
}

/// Builds a profile once per test binary; returns the output directory.
pub fn built(profile: &str) -> PathBuf {
    static BUILDS: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
    let mut b = BUILDS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = b.iter().find(|(n, _)| n == profile) {
        return p.clone();
    }
    let cache = kiln::inputs::cache::Cache::default_location();
    // A name from profiles/, or a path to a profile a test wrote.
    let path = if profile.ends_with(".toml") { PathBuf::from(profile) } else { workspace().join("profiles").join(format!("{profile}.toml")) };
    let out = kiln::pipeline::build(&path, &scratch().join("out"), &cache)
        .unwrap_or_else(|e| panic!("building {profile}: {e:#}"));
    b.push((profile.to_string(), out.out.clone()));
    out.out
}

fn vm_lock() -> MutexGuard<'static, ()> {
    static L: OnceLock<Mutex<()>> = OnceLock::new();
    L.get_or_init(|| Mutex::new(()))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// A booted VM, its log, and the lock that keeps other VMs waiting (shared
/// by the two VMs of a pair).
pub struct Node {
    pub vm: Vm,
    pub log: PathBuf,
    _lock: Rc<MutexGuard<'static, ()>>,
}

/// Boots a build output's PXE kernel and initramfs directly. `config` is a
/// node.toml text given through fw_cfg.
pub fn boot(test: &str, out: &Path, config: Option<&str>) -> Node {
    boot_with(test, out, config, |s| s.boot = kiln::tools::run::BootFrom::Pxe)
}

/// Boots with the spec adjusted by `tweak` (disk image, size, overlay…).
pub fn boot_with(
    test: &str,
    out: &Path,
    config: Option<&str>,
    tweak: impl FnOnce(&mut VmSpec),
) -> Node {
    start(test, out, config, tweak, Rc::new(vm_lock()))
}

/// Boots two VMs at once, joined by a point-to-point Ethernet link (QEMU
/// `-netdev socket,udp=`, over host loopback) and nothing else: no DHCP,
/// no host access, so the configs give static addresses. `names` name the
/// logs (`<test>-<name>.log`); each VM has 1 GiB and its own MAC
/// (52:54:00:00:00:01, …:02). The pair holds the VM lock until both are
/// dropped.
pub fn boot_pair(
    test: &str,
    out: &Path,
    names: [&str; 2],
    configs: [&str; 2],
) -> (Node, Node) {
    let lock = Rc::new(vm_lock());
    let (p1, p2) = free_udp_ports();
    let links = [(p1, p2), (p2, p1)];
    let mut nodes = (0..2).map(|i| {
        start(&format!("{test}-{}", names[i]), out, Some(configs[i]), |s| {
            s.boot = kiln::tools::run::BootFrom::Pxe;
            s.memory_mib = 1024;
            s.net = kiln::tools::run::Net::Udp { local: links[i].0, remote: links[i].1 };
            s.mac = format!("52:54:00:00:00:{:02x}", i + 1);
        }, lock.clone())
    });
    let a = nodes.next().expect("first VM");
    let b = nodes.next().expect("second VM");
    (a, b)
}

/// Two distinct UDP ports that were free a moment ago (the kernel's picks).
fn free_udp_ports() -> (u16, u16) {
    let bind = || std::net::UdpSocket::bind("127.0.0.1:0").expect("binding a UDP port on 127.0.0.1");
    let (a, b) = (bind(), bind());
    let port = |s: &std::net::UdpSocket| s.local_addr().map(|a| a.port()).expect("a bound UDP port");
    (port(&a), port(&b))
}

fn start(
    test: &str,
    out: &Path,
    config: Option<&str>,
    tweak: impl FnOnce(&mut VmSpec),
    lock: Rc<MutexGuard<'static, ()>>,
) -> Node {
    let logs = scratch().join("logs");
    let _ = std::fs::create_dir_all(&logs);
    let mut spec = VmSpec::new(out);
    spec.accel = Accel::Tcg;
    spec.memory_mib = 2048;
    spec.log = Some(logs.join(format!("{test}.log")));
    if let Some(c) = config {
        let p = logs.join(format!("{test}.node.toml"));
        std::fs::write(&p, c).expect("writing the test node.toml");
        spec.config = Some(p);
    }
    tweak(&mut spec);
    let vm = Vm::start(&spec).unwrap_or_else(|e| panic!("{test}: starting QEMU: {e}"));
    Node {
        vm,
        log: spec.log.clone().unwrap_or_default(),
        _lock: lock,
    }
}

impl Node {
    /// Fails the test with the log's location.
    pub fn fail(&self, what: impl std::fmt::Display) -> ! {
        panic!("{what}\n(serial log: {})", self.log.display())
    }

    /// After a power cut during an update, once the node is back up: how
    /// the update went on. Either the new image booted on trial (its
    /// `boot-trial` comes before `payload-started`, so it may be in the log
    /// already: the cut came after the entry was in place), or the old
    /// image applies the bundle again (`update-applied`, later). `version`:
    /// the new image's.
    pub fn update_resumed(&mut self, version: &str, timeout: Duration) -> kiln_contract::event::Event {
        if let Some(t) = self.vm.log().iter().filter_map(|l| kiln_contract::event::parse(l)).find(|e| e.name == "boot-trial" && e.get("version") == Some(version)) {
            return t;
        }
        let l = self.line("update-applied or boot-trial", timeout, |l| kiln_contract::event::parse(l).is_some_and(|e| e.name == "update-applied" || e.name == "boot-trial"));
        kiln_contract::event::parse(&l).expect("an event line")
    }

    pub fn event(&mut self, name: &str, timeout: Duration) -> kiln_contract::event::Event {
        match self.vm.wait_event(name, timeout) {
            Ok(e) => e,
            Err(e) => self.fail(e),
        }
    }

    pub fn line(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        match self.vm.wait_for(what, timeout, pred) {
            Ok(l) => l,
            Err(e) => self.fail(e),
        }
    }

    /// Waits for the stand-in's summary and returns every check line.
    pub fn standin_checks(&mut self) -> Vec<String> {
        let done = self.line("stand-in checks done", BOOT_TIMEOUT, |l| {
            l.contains("stand-in: checks done")
        });
        let log = self.vm.log();
        let end = log.iter().rposition(|l| *l == done).unwrap_or(log.len());
        let start = log[..end]
            .iter()
            .rposition(|l| l.contains("stand-in: argv"))
            .unwrap_or(0);
        log[start..end]
            .iter()
            .filter(|l| l.contains("stand-in: check "))
            .cloned()
            .collect()
    }
}

/// A build output's manifest.json.
pub fn manifest(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("manifest.json")).expect("the output's manifest.json")).expect("manifest.json is JSON")
}

/// (start, size) in bytes of MBR partition `n` (1-based), from sfdisk.
pub fn mbr_part(img: &Path, n: usize) -> (u64, u64) {
    let j: serde_json::Value = serde_json::from_str(&sh(&format!("sfdisk --json {}", img.display()))).expect("sfdisk --json");
    let p = &j["partitiontable"]["partitions"][n - 1];
    (p["start"].as_u64().unwrap_or(0) * 512, p["size"].as_u64().unwrap_or(0) * 512)
}

/// Runs a shell command; fails the test with its stderr when it fails.
pub fn sh(cmd: &str) -> String {
    let out = std::process::Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(out.status.success(), "`{cmd}`: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (byte offset, byte size) of a GPT partition by name, from sfdisk.
pub fn part(disk: &Path, name: &str) -> (u64, u64) {
    let j: serde_json::Value = serde_json::from_str(&sh(&format!("sfdisk --json {}", disk.display()))).unwrap();
    let p = j["partitiontable"]["partitions"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("no {name}")).clone();
    (p["start"].as_u64().unwrap() * 512, p["size"].as_u64().unwrap() * 512)
}

/// A private copy of the built disk image, to modify.
pub fn copy_disk(out: &Path, test: &str) -> PathBuf {
    let dst = scratch().join(format!("{test}.raw"));
    sh(&format!("cp --sparse=always {} {}", out.join("disk.raw").display(), dst.display()));
    dst
}

/// The ESP of a disk image as an mtools image argument (`-i disk@@offset`).
pub fn esp_image(disk: &Path) -> String {
    let (off, _) = part(disk, "esp");
    format!("{}@@{off}", disk.display())
}

/// Copies a file onto a FAT image (an ESP via `esp_image`, or a stick) at
/// `::/name`, replacing what is there.
pub fn mcopy(image: &str, text: &str, name: &str) {
    let src = scratch().join(format!("mcopy-{}-{name}", std::process::id()));
    std::fs::write(&src, text).expect("writing the file to copy");
    sh(&format!("MTOOLS_SKIP_CHECK=1 mcopy -o -i {image} {} ::/{name}", src.display()));
    let _ = std::fs::remove_file(src);
}

/// A small FAT image labelled `label` holding node.toml (a USB stick or an
/// extra disk, as a technician would prepare it).
pub fn config_stick(name: &str, label: &str, node_toml: &str) -> PathBuf {
    let p = scratch().join(name);
    let _ = std::fs::remove_file(&p);
    sh(&format!("mkfs.vfat -C -n {label} {} 4096 >/dev/null", p.display()));
    mcopy(&p.display().to_string(), node_toml, "node.toml");
    p
}

/// Builds a signed, versioned variant of `profiles/<base>.toml` for update
/// tests: profile `name` at `version` with `outputs`, the single-node
/// config, the key `dir/kiln.key`, and `extra` TOML appended; written as
/// `dir/<tag>.toml`, built into `dir/out-<tag>`.
/// The test PKI (init/tests/data/tls): two CAs and a server certificate
/// from each for 10.0.2.2. Its keys are public: only test images trust it.
pub fn test_tls(file: &str) -> PathBuf {
    workspace().join("init/tests/data/tls").join(file)
}

/// A profile's text: `extends` profiles/<base>.toml, then `head` (top-level
/// keys), then a `[node]` table with the single-node config and the test CA
/// as `node.trust` plus `node` (more `[node]` keys), then `tail` (other
/// tables).
fn extending(base: &str, head: &str, node: &str, tail: &str) -> String {
    let ws = workspace();
    // Outside profiles/: kernel-configs/ is found through this.
    std::env::set_var("KILN_SOURCE_DIR", &ws);
    format!(
        "extends = \"{}\"\n{head}\n[node]\nconfig = \"{}\"\ntrust = [\"{}\"]\n{node}\n{tail}",
        ws.join(format!("profiles/{base}.toml")).display(),
        ws.join("profiles/nodes/single.toml").display(),
        test_tls("ca.pem").display()
    )
}

/// A profile extending `base` whose images trust the test CA
/// (`node.trust`), plus the top-level keys in `head` and the `[node]` keys
/// in `node`, written under the scratch directory as `<name>.toml`; pass it
/// to [`built`].
pub fn derived(base: &str, name: &str, head: &str, node: &str) -> String {
    let dir = scratch().join("profiles");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, extending(base, &format!("name = \"{name}\"\n{head}"), node, "")).unwrap();
    path.display().to_string()
}

/// A profile extending `base` whose images trust the test CA.
pub fn trusting_test_ca(base: &str) -> String {
    derived(base, &format!("{base}-tls"), "", "")
}

/// A versioned, signed build of `base` (trusting the test CA, for channels
/// over HTTPS).
pub fn build_versioned(dir: &Path, base: &str, name: &str, tag: &str, version: &str, outputs: &str, extra: &str) -> PathBuf {
    let path = dir.join(format!("{tag}.toml"));
    let head = format!("name = \"{name}\"\nversion = \"{version}\"\noutputs = {outputs}\n");
    std::fs::write(&path, extending(base, &head, "", &format!("[sign]\nkey = \"kiln.key\"\n{extra}"))).unwrap();
    let out = kiln::pipeline::build(&path, &dir.join(format!("out-{tag}")), &kiln::inputs::cache::Cache::default_location()).unwrap_or_else(|e| panic!("building {tag}: {e:#}"));
    out.out
}

/// The `kiln` binary of this workspace (built by `cargo test --workspace`).
pub fn kiln_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test>-… → target/<profile>/kiln
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join("kiln");
    if !bin.exists() {
        sh(&format!("cd {} && cargo build --quiet -p kiln --bin kiln", workspace().display()));
    }
    bin
}

/// Holds off this binary's other VMs, for a VM started another way (the
/// `kiln run` command).
pub fn exclusive() -> MutexGuard<'static, ()> {
    vm_lock()
}

/// A FAT volume labelled KILNUPD holding `files` (name on the stick,
/// host file), as a USB stick would carry update bundles.
pub fn kilnupd_stick(path: &Path, files: &[(&str, &Path)]) -> PathBuf {
    let _ = std::fs::remove_file(path);
    let bytes: u64 = files.iter().map(|(_, f)| std::fs::metadata(f).unwrap().len()).sum();
    let kib = bytes / 1024 + 16 * 1024;
    sh(&format!("mkfs.vfat -C -n KILNUPD {} {kib} >/dev/null", path.display()));
    for (name, f) in files {
        sh(&format!("MTOOLS_SKIP_CHECK=1 mcopy -i {} {} ::/{name}", path.display(), f.display()));
    }
    path.to_path_buf()
}

/// Asserts an event's field.
#[track_caller]
pub fn expect(e: &kiln_contract::event::Event, key: &str, want: &str) {
    assert_eq!(e.get(key), Some(want), "{e:?}");
}

/// Asserts several of an event's fields.
#[track_caller]
pub fn expect_all(e: &kiln_contract::event::Event, fields: &[(&str, &str)]) {
    for (k, v) in fields {
        assert_eq!(e.get(k), Some(*v), "{k}: {e:?}");
    }
}

/// (unix time, path) of each request a test server answered.
pub type Requests = std::sync::Arc<std::sync::Mutex<Vec<(u64, String)>>>;

/// A plain HTTP/1.1 server on 127.0.0.1 (the guest's 10.0.2.2) serving
/// `files` by path; returns its port and the log of requests.
pub fn serve(files: Vec<(String, Vec<u8>)>) -> (u16, Requests) {
    serve_with(files, None)
}

/// [`serve`] over TLS, with the test PKI's server certificate (for
/// 10.0.2.2, from the CA [`trusting_test_ca`] images trust).
pub fn serve_tls(files: Vec<(String, Vec<u8>)>) -> (u16, Requests) {
    use rustls::pki_types::pem::PemObject;
    let chain = rustls::pki_types::CertificateDer::pem_file_iter(test_tls("server.pem")).unwrap().collect::<Result<Vec<_>, _>>().unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(test_tls("server.key")).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    serve_with(files, Some(std::sync::Arc::new(cfg)))
}

/// A connection [`serve_with`] answers on.
trait Conn: std::io::Read + std::io::Write {
    /// Ends the answer (TLS: close_notify, so the client knows it is whole).
    fn finish(&mut self) {
        let _ = std::io::Write::flush(self);
    }
}
impl Conn for std::net::TcpStream {}
impl Conn for rustls::StreamOwned<rustls::ServerConnection, std::net::TcpStream> {
    fn finish(&mut self) {
        self.conn.send_close_notify();
        let _ = std::io::Write::flush(self);
    }
}

fn serve_with(files: Vec<(String, Vec<u8>)>, tls: Option<std::sync::Arc<rustls::ServerConfig>>) -> (u16, Requests) {
    use std::io::{BufRead, BufReader, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
            let _ = c.set_write_timeout(Some(Duration::from_secs(30)));
            let c: Box<dyn Conn> = match &tls {
                None => Box::new(c),
                Some(cfg) => {
                    let Ok(conn) = rustls::ServerConnection::new(cfg.clone()) else { continue };
                    Box::new(rustls::StreamOwned::new(conn, c))
                }
            };
            let mut r = BufReader::new(c);
            let mut first = String::new();
            if r.read_line(&mut first).is_err() {
                continue;
            }
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).map(|n| n == 0).unwrap_or(true) || h.trim().is_empty() {
                    break;
                }
            }
            let path = first.split_whitespace().nth(1).unwrap_or("").to_string();
            log2.lock().unwrap().push((unix_now(), path.clone()));
            let mut c = r.into_inner();
            match files.iter().find(|(p, _)| *p == path) {
                Some((_, body)) => {
                    let _ = write!(c, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                    let _ = c.write_all(body);
                }
                None => {
                    let _ = write!(c, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                }
            }
            c.finish();
        }
    });
    (port, log)
}

/// How far the guest's clock may stray from the host's during a channel
/// test. The node's clock comes from the RTC at boot (whole seconds) and
/// then runs on a TSC or timer that TCG only approximates: a CI run saw
/// the node open its window a second or two before the host's clock said
/// so, a few minutes after boot.
pub const CLOCK_SKEW: u64 = 10;

/// Asserts that the channel was asked nothing before the window opened at
/// `opens` (unix time), and that the first requests were `paths`, in
/// order. The window is the node's: the `update-window state=open` event
/// `open` must carry a node time in it. The server's log is in the host's
/// time, so it is held to the same line less [`CLOCK_SKEW`]: the window
/// opened at least 100 s after boot, so a request while it was closed
/// would still be seen.
#[track_caller]
pub fn asked_nothing_before(opens: u64, open: &kiln_contract::event::Event, requests: &Requests, paths: &[&str]) {
    let node_time: u64 = open.get("time").and_then(|t| t.parse().ok()).unwrap_or_else(|| panic!("no time in {open:?}"));
    assert!(node_time >= opens, "the node opened its window at {node_time} by its own clock, before {opens}: {open:?}");
    let seen = requests.lock().unwrap().clone();
    assert!(
        !seen.is_empty() && seen.iter().all(|(t, _)| *t + CLOCK_SKEW >= opens),
        "window opened at {opens} (host clock, allowing {CLOCK_SKEW} s of guest clock skew); requests: {seen:?}"
    );
    assert_eq!(seen.iter().map(|(_, p)| p.as_str()).take(paths.len()).collect::<Vec<_>>(), paths, "{seen:?}");
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// Every file under a build output, as sorted paths relative to it.
pub fn files(out: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, names: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).expect("reading a build output").flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, names);
            } else {
                names.push(p.strip_prefix(root).expect("under the root").display().to_string());
            }
        }
    }
    let mut names = Vec::new();
    walk(out, out, &mut names);
    names.sort();
    names
}

/// Flips one bit of the byte at `at` in a file (tampering with an image).
pub fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).expect("opening the image to tamper with");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("reading the byte to flip");
    b[0] ^= 0x20;
    f.write_all_at(&b, at).expect("writing the flipped byte");
}

/// The built kernel meets every k0s requirement, warnings included, as a
/// worker (the stricter role): what `kiln kernel check` reports on its
/// .config, found in the cache by the manifest's key.
pub fn kernel_check_is_clean(manifest: &serde_json::Value) {
    use kiln_contract::requirements::{check, KernelConfig, Level, Needs};
    let key = manifest["kernel"]["cache_key"].as_str().expect("the manifest's kernel cache_key");
    let config = kiln::inputs::cache::Cache::default_location().entry("kernel", key).join("config");
    let cfg = KernelConfig::parse(&std::fs::read_to_string(&config).expect("the cached kernel .config"));
    let report = check(&cfg, Needs { worker: true });
    assert!(report.missing(Level::Required).is_empty() && report.missing(Level::Warn).is_empty(), "{report}");
}

pub fn qmp(n: &Node, cmd: &str, args: serde_json::Value) {
    if let Err(e) = n.vm.qmp_with(cmd, &args) {
        n.fail(format!("QMP {cmd} {args}: {e}"));
    }
}

/// Plugs a USB stick (a raw image, read-only) into the running VM's
/// `qemu-xhci` controller `xhci`.
pub fn plug(n: &Node, id: &str, image: &Path) {
    qmp(n, "blockdev-add", serde_json::json!({
        "driver": "raw", "node-name": id, "read-only": true,
        "file": { "driver": "file", "filename": image.display().to_string(), "read-only": true }
    }));
    qmp(n, "device_add", serde_json::json!({ "driver": "usb-storage", "bus": "xhci.0", "drive": id, "id": id, "removable": true }));
}
