//! The `kiln` command line: a thin layer over the library.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use kiln::inputs::cache::Cache;
use kiln::tools::run::{Accel, Vm, VmSpec};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Build immutable, signed, bootable k0s node images",
    long_about = None,
    after_help = "Workflow:\n  kiln profile check profiles/qemu-amd64.toml   check a profile (payload, updatability, trust)\n  kiln build profiles/qemu-amd64.toml           build its outputs into out/qemu-amd64/\n  kiln run out/qemu-amd64                       boot the output under QEMU\n  kiln verify out/qemu-amd64 --key kiln.pub     check its signatures and hashes\n  kiln serve out/qemu-amd64/pxe --init-tls tls  network-boot it (PXE); or flash disk.raw\n\nDocs: docs/quickstart.md, docs/profiles.md, docs/node-config.md, docs/security.md, docs/use-cases/"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build every output of a profile into OUT/<profile name>/.
    ///
    /// Example: kiln build profiles/qemu-amd64.toml
    Build {
        /// The profile, e.g. profiles/qemu-amd64.toml.
        profile: PathBuf,
        /// Where outputs go.
        #[arg(long, default_value = "out")]
        out: PathBuf,
    },
    /// Boot a build output in QEMU, with the serial console on stdout.
    ///
    /// Example: kiln run out/qemu-amd64 --config profiles/nodes/single.toml --until payload-started
    Run {
        /// A build output directory, e.g. out/qemu-amd64.
        out_dir: PathBuf,
        /// A node.toml given to the node through QEMU fw_cfg (on an emulated
        /// board, which has no fw_cfg: on a KILNCFG USB stick).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Exit 0 when this kiln-init event appears (e.g. payload-started).
        #[arg(long, conflicts_with = "until_text")]
        until: Option<String>,
        /// Exit 0 when a console line contains this text.
        #[arg(long)]
        until_text: Option<String>,
        /// Seconds to wait for --until before failing.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Guest memory in MiB (default: the profile's `[qemu] memory_mib`).
        #[arg(long)]
        mem: Option<u32>,
        /// Guest CPUs (default: the profile's `[qemu] cpus`).
        #[arg(long)]
        cpus: Option<u32>,
        /// auto uses KVM only if a probe guest boots under it.
        #[arg(long, value_enum, default_value_t = Accel::Auto)]
        accel: Accel,
        /// Host port forwarded to the node's Kubernetes API (6443); 0 for none.
        #[arg(long, default_value_t = 6443)]
        api_port: u16,
        /// What to boot: the disk image (OVMF), the PXE kernel and initramfs
        /// directly, the bundle over the network (iPXE), or the ISO as a CD
        /// (OVMF or SeaBIOS) or a USB stick.
        #[arg(long, value_enum, default_value_t = kiln::tools::run::BootFrom::Auto)]
        boot: kiln::tools::run::BootFrom,
        /// Size of the virtual disk in GiB; the image itself is not changed.
        #[arg(long, default_value_t = 8)]
        disk_size: u64,
        /// Keep the node between runs in this directory (made on the first
        /// run): the disk's writes (/var, applied updates, boot counters)
        /// and the UEFI variables. Without it every run starts from the
        /// image as built. Remove the directory to start afresh.
        #[arg(long, value_name = "DIR")]
        state: Option<PathBuf>,
        /// Attach this raw file as a second disk (/dev/vda when booting the
        /// ISO), written in place: an install target, a /var disk, or a
        /// KILNUPD stick with update bundles (docs/use-cases/qemu.md).
        #[arg(long)]
        extra_disk: Option<PathBuf>,
        /// Boot with Secure Boot enforcing: OVMF's Secure Boot firmware with
        /// Debian's snakeoil keys enrolled (for images built with
        /// `[secureboot]` and /usr/share/ovmf/PkKek-1-snakeoil.key).
        #[arg(long)]
        secure_boot: bool,
        /// With --boot ipxe: the boot file URL QEMU's DHCP hands out, e.g.
        /// http://10.0.2.2:8080/boot.ipxe for `kiln serve` on the host.
        #[arg(long)]
        ipxe_url: Option<String>,
        /// The NIC's network: `user` (NAT and DHCP from QEMU, --api-port
        /// forwarded), or `udp:LOCAL:REMOTE`, an Ethernet link to another
        /// `kiln run` with the two host ports swapped (static addresses, no
        /// host access).
        #[arg(long, default_value = "user")]
        net: kiln::tools::run::Net,
        /// The NIC's MAC address; give each VM on a shared link its own.
        #[arg(long, default_value = "52:54:00:12:34:56")]
        mac: String,
        /// The controller of the boot disk (--boot disk): try an image on
        /// the disk hardware of a real machine (virtio, nvme, ahci).
        #[arg(long, value_enum, default_value_t = kiln::tools::run::DiskBus::Virtio)]
        disk_bus: kiln::tools::run::DiskBus,
        /// The NIC's QEMU model: virtio-net-pci, e1000e, e1000, rtl8139,
        /// vmxnet3, igb (`qemu-system-x86_64 -device help` lists more).
        #[arg(long, default_value = "virtio-net-pci")]
        nic: String,
    },
    /// Time a (warm) build of a profile against mksquashfs + veritysetup of
    /// the same root tree, measured in the same run; print the runs, the
    /// ratio and the build's time per step.
    ///
    /// Example: kiln bench profiles/qemu-amd64.toml --real-size
    Bench {
        /// The profile to build, e.g. profiles/qemu-amd64.toml.
        profile: PathBuf,
        /// Timed runs of each side; the medians are compared.
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// Add the real-size fixture (a file of k0s's size and an airgap-like
        /// image tarball, from pinned Debian packages) to the profile's root.
        #[arg(long)]
        real_size: bool,
    },
    /// Signing keys (minisign, ed25519).
    Key {
        #[command(subcommand)]
        cmd: KeyCmd,
    },
    /// Check a build output's signed manifest, every artifact and the signed
    /// SBOM, or one file against FILE.minisig. Names every file that fails.
    ///
    /// Example: kiln verify out/qemu-amd64 --key kiln.pub
    Verify {
        /// A build output directory (out/<profile name>), or one file with
        /// its FILE.minisig beside it.
        target: PathBuf,
        /// The public key (kiln.pub, as `kiln key generate` writes it).
        #[arg(long)]
        key: PathBuf,
    },
    /// Profile commands.
    Profile {
        #[command(subcommand)]
        cmd: ProfileCmd,
    },
    /// Kernel commands.
    Kernel {
        #[command(subcommand)]
        cmd: KernelCmd,
    },
    /// Node config commands.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// New clusters: a CA, a worker join token and both node configs.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Serve a PXE bundle and per-node configs over HTTP and HTTPS, for iPXE.
    ///
    /// GET /boot.ipxe, /vmlinuz, … serve files under DIR (boot.ipxe with its
    /// `set kiln-server` line pointing at this server). GET
    /// /configs/<mac>.toml (and .toml.minisig) serves CONFIGS/<mac>.toml,
    /// the MAC with colons or hyphens in any case.
    ///
    /// With TLS (--init-tls DIR for a lab CA, or --tls-cert/--tls-key) the
    /// same port also speaks HTTPS, and boot.ipxe points the node's
    /// kiln.config= at https://. A config holding a join token or a CA key
    /// is never sent over plain HTTP (403) unless --insecure-http-secrets.
    ///
    /// Example: kiln serve out/qemu-amd64/pxe --configs configs --init-tls tls
    Serve {
        /// The directory to serve, e.g. out/qemu-amd64/pxe.
        dir: PathBuf,
        /// Where node configs are, named <mac>.toml (52:54:00:12:34:56.toml
        /// or 52-54-00-12-34-56.toml); default DIR/configs.
        #[arg(long)]
        configs: Option<PathBuf>,
        /// Address and port to listen on; port 0 picks a free one.
        #[arg(long, default_value = "0.0.0.0:8080")]
        listen: String,
        /// The server certificate (PEM, with any intermediates after it).
        #[arg(long, requires = "tls_key", conflicts_with = "init_tls")]
        tls_cert: Option<PathBuf>,
        /// The server certificate's private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Make (or reuse) a lab CA and server certificate in this directory
        /// and serve with them: DIR/ca.pem goes into images as node.trust.
        #[arg(long, value_name = "DIR")]
        init_tls: Option<PathBuf>,
        /// With --init-tls: a host name or address the server certificate
        /// covers, besides localhost, this machine's name and addresses and
        /// 10.0.2.2 (QEMU's host). Repeatable.
        #[arg(long = "tls-name", value_name = "NAME", requires = "init_tls")]
        tls_names: Vec<String>,
        /// Serve node configs holding secrets (join tokens, CA keys) over
        /// plain HTTP too, where anyone on the network can read them. Only on
        /// a network you trust completely.
        #[arg(long)]
        insecure_http_secrets: bool,
        /// Serve node configs holding a cluster CA's private key (k0s.ca.key).
        /// By default they get 403: the controller's config belongs on its own
        /// media (kiln cluster init writes controller.local.toml).
        #[arg(long)]
        serve_ca_keys: bool,
    },
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Write a new key pair: DIR/kiln.key (secret, mode 0600) and DIR/kiln.pub.
    Generate {
        /// Where the two files go (created if missing).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum ProfileCmd {
    /// Validate a profile (and what it extends) without building, and say
    /// what its images will be: the payload, whether they can take updates,
    /// what they trust for HTTPS.
    ///
    /// Example: kiln profile check profiles/factory-cubieboard2.toml
    Check {
        /// The profile, e.g. profiles/qemu-amd64.toml.
        profile: PathBuf,
    },
}

#[derive(Subcommand)]
enum KernelCmd {
    /// Build (or find cached) the profile's kernel.
    Build {
        /// The profile whose kernel to build, e.g. profiles/qemu-armv7.toml.
        profile: PathBuf,
    },
    /// Print the k0s requirement report for a kernel .config.
    Check {
        /// A kernel .config (or /proc/config.gz contents, uncompressed).
        config: PathBuf,
        /// The role whose requirements apply (a worker needs more).
        #[arg(long, value_enum)]
        role: RoleArg,
        /// The config of a distro kernel (`/boot/config-<release>` of a
        /// linux-image package): kiln ships it in the image, so the node
        /// reads it there and IKCONFIG_PROC is not needed.
        #[arg(long)]
        distro: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    /// A worker (or controller+worker): kubelet and containerd's needs too.
    Worker,
    /// A controller only.
    Controller,
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Write DIR/controller.local.toml and DIR/worker.toml for a new cluster,
    /// with its CA (DIR/ca.crt, ca.key), the worker join token
    /// (DIR/worker.token) and the bootstrap token Secret that admits it
    /// (DIR/bootstrap-token-<id>.yaml), as `k0s token pre-shared` makes them.
    ///
    /// Boot the controller with controller.local.toml from its own media (its
    /// ESP or a KILNCFG stick: it holds the CA key) and any number of workers
    /// with worker.toml (local, or from `kiln serve` over HTTPS); the workers
    /// join the controller at https://API:6443.
    ///
    /// Example: kiln cluster init lab --controller-address 10.0.0.10/24
    Init {
        /// Where the files go (created if missing).
        dir: PathBuf,
        /// The controller's address as workers reach it (IP or DNS name);
        /// default: the address of --controller-address.
        #[arg(long)]
        api: Option<String>,
        /// The cluster's name (k0s ClusterConfig name, node name prefix).
        #[arg(long, default_value = "kiln")]
        name: String,
        /// Replace the files of a cluster already in DIR.
        #[arg(long)]
        force: bool,
        /// A static address for the controller, e.g. 10.0.0.10/24 (default:
        /// DHCP).
        #[arg(long, value_name = "ADDR/PREFIX")]
        controller_address: Option<String>,
        /// A static address for the worker, e.g. 10.0.0.11/24 (default: DHCP;
        /// with it, worker.toml is for one node).
        #[arg(long, value_name = "ADDR/PREFIX")]
        worker_address: Option<String>,
        /// Default gateway for the static addresses.
        #[arg(long)]
        gateway: Option<std::net::IpAddr>,
        /// The link the static addresses go on.
        #[arg(long, default_value = "eth0")]
        interface: String,
        /// How long the worker join token is valid (24h, 7d, …), or `never`
        /// (until its Secret is deleted). Flashing cards in a factory and
        /// shipping them takes longer than a day: give the time that takes.
        #[arg(long, default_value = "24h")]
        valid: String,
        /// DNS servers for the static addresses (comma-separated; `none` for
        /// none). With DHCP the lease brings them.
        #[arg(long, value_delimiter = ',', default_value = "1.1.1.1,9.9.9.9")]
        dns: Vec<String>,
        /// NTP servers for the static addresses (comma-separated; `none` for
        /// none): boards without a battery start in 1970, and TLS refuses
        /// every certificate until the clock is set.
        #[arg(long, value_delimiter = ',', default_value = "pool.ntp.org")]
        ntp: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate a node.toml with the same code the node runs.
    ///
    /// Example: kiln config check profiles/nodes/single.toml
    Check {
        /// The node config, e.g. profiles/nodes/single.toml.
        node_toml: PathBuf,
    },
    /// Sign a node.toml: writes NODE_TOML.minisig, which nodes built with
    /// `node.config_key` require next to any config from outside the image.
    Sign {
        /// The node config to sign.
        node_toml: PathBuf,
        /// The secret key (kiln.key, as `kiln key generate` writes it);
        /// default: the KILN_SIGNING_KEY environment variable.
        #[arg(long)]
        key: Option<PathBuf>,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
    match run(Cli::parse()) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    let cache = Cache::default_location();
    match cli.cmd {
        Cmd::Build { profile, out } => {
            let t = Instant::now();
            let b = kiln::pipeline::build(&profile, &out, &cache)?;
            println!(
                "built {} in {:.1}s (kernel {}{})",
                b.out.display(),
                t.elapsed().as_secs_f64(),
                match (b.kernel_cached, b.kernel_distro) {
                    (true, _) => "cached",
                    (false, true) => "taken from its package",
                    (false, false) => "compiled",
                },
                b.initramfs_bytes.map(|n| format!("; PXE initramfs {n} bytes")).unwrap_or_default()
            );
            print_steps(&b);
            let p = kiln::profile::load(&profile)?;
            println!("{}", kiln::pipeline::payload_line(&p));
            println!("next:");
            for step in kiln::pipeline::next_steps(&p, &b.out) {
                println!("  {step}");
            }
            Ok(0)
        }
        Cmd::Run { out_dir, config, until, until_text, timeout, mem, cpus, accel, api_port, boot, disk_size, state, extra_disk, ipxe_url, net, mac, secure_boot, disk_bus, nic } => {
            let mut spec = VmSpec::for_output(out_dir);
            spec.disk_bus = disk_bus;
            spec.nic = nic;
            spec.net = net;
            spec.mac = mac;
            spec.secure_boot = secure_boot;
            spec.extra_disk = extra_disk;
            spec.state = state;
            spec.ipxe_url = ipxe_url;
            spec.config = config;
            spec.memory_mib = mem.unwrap_or(spec.memory_mib);
            spec.cpus = cpus.unwrap_or(spec.cpus);
            spec.accel = accel;
            spec.api_port = api_port;
            spec.boot = boot;
            spec.disk_size = disk_size << 30;
            kiln::tools::run::check_pxe_ram(&spec).map_err(anyhow::Error::msg)?;
            let mut vm = Vm::start(&spec)?;
            eprintln!("kiln: booting {} under QEMU ({:?}); console follows", spec.out_dir.display(), vm.accel);
            let waiting = until.is_some() || until_text.is_some();
            let what = match (&until, &until_text) {
                (Some(e), _) => format!("event `{e}`"),
                (_, Some(t)) => format!("a line containing `{t}`"),
                _ => "QEMU to exit".into(),
            };
            let deadline = Duration::from_secs(if waiting { timeout } else { u64::MAX / 4 });
            let res = vm.wait_for(&what, deadline, |l| {
                println!("{l}");
                match (&until, &until_text) {
                    (Some(e), _) => kiln_contract::event::parse(l).is_some_and(|ev| &ev.name == e),
                    (_, Some(t)) => l.contains(t.as_str()),
                    _ => false,
                }
            });
            match res {
                Ok(_) => {
                    eprintln!("kiln: saw {what}; stopping the VM");
                    Ok(0)
                }
                Err(kiln::tools::run::VmError::Exited { status, .. }) if !waiting => {
                    eprintln!("kiln: QEMU exited ({status})");
                    Ok(0)
                }
                Err(e) => bail!("{e}"),
            }
        }
        Cmd::Key { cmd: KeyCmd::Generate { dir } } => {
            use std::os::unix::fs::OpenOptionsExt;
            let (sec, public) = (dir.join("kiln.key"), dir.join("kiln.pub"));
            if sec.exists() {
                bail!("{} exists; refusing to overwrite a signing key", sec.display());
            }
            let k = kiln::provenance::sign::KeyPair::generate();
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&sec).with_context(|| format!("creating {}", sec.display()))?;
            std::io::Write::write_all(&mut f, k.to_secret_file().as_bytes())?;
            std::fs::write(&public, k.public().to_file())?;
            println!("wrote {} (secret; keep it out of the repository) and {}", sec.display(), public.display());
            Ok(0)
        }
        Cmd::Verify { target, key } => {
            let text = std::fs::read_to_string(&key).with_context(|| format!("reading {}", key.display()))?;
            let pk = kiln::provenance::sign::PublicKey::from_file(&text).map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
            if target.is_dir() {
                match kiln::provenance::verify::verify_dir(&target, &pk) {
                    Ok(lines) => {
                        for l in lines {
                            println!("{l}");
                        }
                        println!("{}: verified", target.display());
                        Ok(0)
                    }
                    Err(problems) => bail!("{} does not verify:\n  {}", target.display(), problems.join("\n  ")),
                }
            } else {
                let data = std::fs::read(&target).with_context(|| format!("reading {}", target.display()))?;
                let sig_path = PathBuf::from(format!("{}.minisig", target.display()));
                let sig = std::fs::read_to_string(&sig_path).with_context(|| format!("reading {}", sig_path.display()))?;
                let comment = pk.verify(&data, &sig).map_err(|e| anyhow::anyhow!("{}: {e}", target.display()))?;
                println!("{}: signature ok ({comment})", target.display());
                Ok(0)
            }
        }
        Cmd::Bench { profile, runs, real_size } => {
            kiln::tools::bench::bench(&profile, runs.max(1), real_size, &cache)?;
            Ok(0)
        }
        Cmd::Profile { cmd: ProfileCmd::Check { profile } } => {
            let c = kiln::pipeline::check(&profile)?;
            let p = &c.profile;
            println!("{}: ok ({} for {}, {} kernel fragment(s))", profile.display(), p.name, p.arch, p.kernel.fragments.len());
            println!("{}", kiln::pipeline::payload_line(p));
            if c.trust.is_empty() {
                println!("https: the image trusts no CA, so its nodes can fetch configs and updates over http:// only (node.trust adds CAs)");
            } else {
                let n: usize = c.trust.iter().map(|a| a.certificates).sum();
                println!("https: the image trusts {n} certificate(s) from {}", c.trust.iter().map(|a| a.path.display().to_string()).collect::<Vec<_>>().join(", "));
            }
            if p.insecure_http_secrets {
                println!("warning: node.insecure_http_secrets = true: nodes use join tokens and CA keys that came over plain http://, readable by anyone on the network");
            }
            for w in kiln::pipeline::advice(&c) {
                println!("warning: {w}");
            }
            Ok(0)
        }
        Cmd::Kernel { cmd: KernelCmd::Build { profile } } => {
            let p = kiln::profile::load(&profile)?;
            let inputs = kiln::inputs::kernel_input::resolve_inputs(&p.kernel, p.arch.debian(), &cache)?;
            let t = Instant::now();
            let k = kiln::inputs::kernel_input::get(p.arch, &inputs, &p.kernel, &cache)?;
            println!("kernel {} ({}) {} in {:.1}s: {}", k.release, &k.key[..12], if k.cached { "cached" } else { "built" }, t.elapsed().as_secs_f64(), k.image.display());
            Ok(0)
        }
        Cmd::Kernel { cmd: KernelCmd::Check { config, role, distro } } => {
            let text = read_config(&config)?;
            let mut cfg = kiln_contract::requirements::KernelConfig::parse(&text);
            if distro {
                cfg = cfg.shipped();
            }
            let needs = kiln_contract::requirements::Needs { worker: matches!(role, RoleArg::Worker) };
            let report = kiln_contract::requirements::check(&cfg, needs);
            print!("{report}");
            Ok(if report.ok() { 0 } else { 1 })
        }
        Cmd::Config { cmd: ConfigCmd::Sign { node_toml, key } } => {
            let (text, from) = match (&key, std::env::var("KILN_SIGNING_KEY")) {
                (Some(k), _) => (std::fs::read_to_string(k).with_context(|| format!("reading the secret key {}", k.display()))?, k.display().to_string()),
                (None, Ok(t)) if !t.trim().is_empty() => (t, "the KILN_SIGNING_KEY environment variable".into()),
                _ => bail!("no signing key: give --key kiln.key (from `kiln key generate`) or set KILN_SIGNING_KEY to the key's contents"),
            };
            let kp = kiln::provenance::sign::KeyPair::from_secret_file(&text).with_context(|| format!("loading the signing key from {from}"))?;
            let data = std::fs::read(&node_toml).with_context(|| format!("reading {}", node_toml.display()))?;
            let parsed = std::str::from_utf8(&data).map_err(|e| anyhow::anyhow!("{e}")).and_then(|t| kiln_contract::config::parse(t).map_err(|e| anyhow::anyhow!("{e}")));
            if let Err(e) = parsed {
                bail!("{}: {e}; not signing an invalid config (check it with `kiln config check`)", node_toml.display());
            }
            let name = node_toml.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let sig_path = PathBuf::from(format!("{}.minisig", node_toml.display()));
            std::fs::write(&sig_path, kp.sign(&data, &format!("kiln node config {name}"))).with_context(|| format!("writing {}", sig_path.display()))?;
            println!("wrote {} (key {})", sig_path.display(), kp.key_id());
            Ok(0)
        }
        Cmd::Cluster { cmd: ClusterCmd::Init { dir, api, name, force, controller_address, worker_address, gateway, interface, valid, dns, ntp } } => {
            let valid = kiln::tools::cluster::parse_valid_or_never(&valid).map_err(|e| anyhow::anyhow!("--valid: {e}"))?;
            let none = |v: &[String]| v.len() == 1 && v[0] == "none";
            let dns = if none(&dns) { Vec::new() } else { dns.iter().map(|d| d.trim().parse().map_err(|_| anyhow::anyhow!("--dns: `{d}` is not an IP address"))).collect::<Result<_>>()? };
            let ntp = if none(&ntp) { Vec::new() } else { ntp };
            let o = kiln::tools::cluster::InitOptions { dir, api, name, force, controller_address, worker_address, gateway, interface, valid, dns, ntp };
            let r = kiln::tools::cluster::init(&o)?;
            for f in &r.files {
                println!("wrote {}", f.display());
            }
            println!("cluster `{}`: workers join {} with bootstrap token id {}", o.name, r.server, r.token_id);
            match o.valid {
                Some(d) => println!("the worker join token expires in {} h; workers must join before then (--valid to change)", d.as_secs() / 3600),
                None => println!("the worker join token never expires (--valid never): delete its Secret to revoke it"),
            }
            println!("{}, worker.toml, worker.token, {} and ca.key are secrets: keep them out of the repository", kiln::tools::cluster::CONTROLLER_FILE, kiln::tools::cluster::ADMIN_KUBECONFIG);
            println!("kubectl: KUBECONFIG={} kubectl get nodes (once the controller is up)", o.dir.join(kiln::tools::cluster::ADMIN_KUBECONFIG).display());
            println!("next: put {} on the controller's ESP as node.toml or on a KILNCFG stick (it holds the CA key: never serve it), and give workers {} (locally, or with kiln serve over HTTPS)", o.dir.join(kiln::tools::cluster::CONTROLLER_FILE).display(), o.dir.join("worker.toml").display());
            Ok(0)
        }
        Cmd::Serve { dir, configs, listen, tls_cert, tls_key, init_tls, tls_names, insecure_http_secrets, serve_ca_keys } => {
            use kiln::tools::tls;
            let files = match (&init_tls, &tls_cert, &tls_key) {
                (Some(d), _, _) => {
                    let mut names = tls::default_names();
                    names.extend(tls_names.iter().cloned());
                    let lab = tls::init_lab(d, &names, time::OffsetDateTime::now_utc()).map_err(anyhow::Error::msg)?;
                    if !lab.made.is_empty() {
                        eprintln!("kiln serve: made the {} in {}", lab.made, d.display());
                    }
                    eprintln!("kiln serve: the server certificate covers {}", lab.names.join(", "));
                    eprintln!("kiln serve: images trust this server when their profile has\n    [node]\n    trust = [\"{}\"]", lab.ca.display());
                    Some((lab.cert, lab.key))
                }
                (None, Some(c), Some(k)) => Some((c.clone(), k.clone())),
                _ => None,
            };
            let tls = files.map(|(c, k)| tls::server_config(&c, &k)).transpose().map_err(anyhow::Error::msg)?;
            let server = kiln::tools::serve::Server::bind(&dir, configs.as_deref(), &listen)?
                .with_options(kiln::tools::serve::Options { tls, insecure_http_secrets, serve_ca_keys });
            let addr = server.local_addr()?;
            let site = server.site();
            let schemes = if server.tls() { "https:// and http://" } else { "http://" };
            if !server.tls() && !insecure_http_secrets {
                eprintln!("kiln serve: no TLS: node configs holding a join token get 403 (use --init-tls DIR, or --tls-cert/--tls-key)");
            } else if insecure_http_secrets {
                eprintln!("kiln serve: --insecure-http-secrets: node configs holding secrets are served over plain HTTP too");
            }
            if addr.ip().is_unspecified() {
                eprintln!("kiln serve: from iPXE: chain http://<this machine's address>:{}/boot.ipxe", addr.port());
            }
            // Last, so a script can wait for this line.
            eprintln!("kiln serve: listening on {addr} ({schemes}) serving {} (node configs from {})", site.root.display(), site.configs.display());
            server.run(|line| eprintln!("{line}")).with_context(|| format!("serving on {addr}"))?;
            Ok(0)
        }
        Cmd::Config { cmd: ConfigCmd::Check { node_toml } } => {
            let text = std::fs::read_to_string(&node_toml).with_context(|| format!("reading {}", node_toml.display()))?;
            match kiln_contract::config::parse(&text) {
                Ok(c) => {
                    println!("{}: ok (role {})", node_toml.display(), c.role);
                    Ok(0)
                }
                Err(e) => bail!("{}: {e}", node_toml.display()),
            }
        }
    }
}

/// One line per step of the build, and what the squashfs step did.
fn print_steps(b: &kiln::pipeline::Built) {
    let total: f64 = b.timings.iter().map(|t| t.seconds).sum();
    for t in &b.timings {
        let extra = match t.step.as_str() {
            "squashfs" => {
                let s = &b.squashfs;
                format!(
                    "  ({} MB of files into {} MB; {} MB already compressed, stored as is; {} MB packed by an earlier build, from the cache)",
                    s.data_in / 1_000_000,
                    s.bytes / 1_000_000,
                    s.stored_raw / 1_000_000,
                    s.reused / 1_000_000
                )
            }
            _ => String::new(),
        };
        println!("  {:<28} {:>7.2}s {:>5.1}%{extra}", t.step, t.seconds, if total > 0.0 { t.seconds * 100.0 / total } else { 0.0 });
    }
}

fn read_config(path: &PathBuf) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut s).with_context(|| format!("decompressing {}", path.display()))?;
        return Ok(s);
    }
    String::from_utf8(bytes).with_context(|| format!("{} is not a text .config", path.display()))
}
