//! A distribution kernel as the kernel input (`[kernel] kind = "distro"`):
//! a pinned Debian `linux-image-*` package. Its kernel image and `.config`
//! are used as they are; of its ~4000 modules the image ships the ones k0s
//! and stage 1 need plus every driver of the hardware classes the profile
//! selects, each with its dependency closure (`depends=` and soft
//! dependencies, from the modules' own `.modinfo`), and the firmware those
//! modules declare when a firmware package is given. Stage 1 gets the
//! subset needed to reach the root (disk controllers, device-mapper,
//! squashfs, the /var and config filesystems). kiln-init loads them at boot
//! from the modalias of each device it finds (coldplug), and on hotplug.

use super::cache::Cache;
use super::input::{self, Resolved};
use super::kernel::{DistroKernel, DistroSpec, Kernel, KernelError, Shipped};
use super::packages::{self, DebEntry, Package};
use crate::arch::Arch;
use kiln_formats::kmod::{self, Index, ModInfo};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Hardware classes: module paths under `kernel/` (a directory prefix, or
/// one `.ko`). Documented in docs/hardware.md.
pub const CLASSES: &[(&str, &[&str])] = &[
    ("storage", &["drivers/ata/", "drivers/nvme/", "drivers/scsi/", "drivers/block/", "drivers/md/", "drivers/message/fusion/", "drivers/mmc/", "drivers/cdrom/", "drivers/usb/storage/"]),
    ("net", &["drivers/net/ethernet/", "drivers/net/phy/", "drivers/net/mdio/", "drivers/net/pcs/", "drivers/net/usb/", "drivers/net/vmxnet3/", "drivers/net/hyperv/", "drivers/net/virtio_net.ko", "drivers/net/xen-netfront.ko", "drivers/net/mii.ko", "drivers/net/mdio.ko"]),
    ("usb", &["drivers/usb/host/", "drivers/usb/core/", "drivers/usb/storage/", "drivers/usb/typec/", "drivers/hid/", "drivers/input/keyboard/"]),
    // QEMU/KVM guests: virtio devices, and fw_cfg (a node config source).
    ("virtio", &["drivers/virtio/", "drivers/firmware/qemu_fw_cfg.ko", "drivers/block/virtio_blk.ko", "drivers/net/virtio_net.ko", "drivers/scsi/virtio_scsi.ko", "drivers/char/hw_random/virtio-rng.ko", "drivers/char/virtio_console.ko", "drivers/gpu/drm/virtio/"]),
    ("watchdog", &["drivers/watchdog/"]),
    ("rtc", &["drivers/rtc/"]),
];

/// What a distro kernel profile gets when it names no classes: a server
/// of unknown make needs all of them.
pub fn default_drivers() -> Vec<String> {
    CLASSES.iter().map(|(n, _)| n.to_string()).collect()
}

/// Always in the root: what Kubernetes networking and k0s use (the
/// requirement table's netfilter, IPVS, bridge, overlay and tunnel
/// options, and the CNIs' virtual devices).
const K8S: &[&str] = &[
    "fs/overlayfs/",
    "fs/fuse/",
    "net/netfilter/",
    "net/ipv4/netfilter/",
    "net/ipv6/netfilter/",
    "net/bridge/",
    "net/802/",
    "net/llc/",
    "net/sched/",
    "net/8021q/",
    "net/ipv4/",
    "net/ipv6/",
    "drivers/net/veth.ko",
    "drivers/net/vxlan/",
    "drivers/net/vxlan.ko",
    "drivers/net/geneve.ko",
    "drivers/net/macvlan.ko",
    "drivers/net/ipvlan/",
    "drivers/net/dummy.ko",
    "drivers/net/tun.ko",
    "drivers/net/wireguard/",
    "drivers/net/bonding/",
    "drivers/net/vrf.ko",
];

/// Stage 1 reaches the root with these: filesystems for the root, /var,
/// the ESP and config sticks, and device-mapper (plus the storage, USB and
/// virtio classes the profile selects, minus [`NOT_IN_STAGE1`]).
const STAGE1_PATHS: &[&str] = &["fs/squashfs/", "fs/ext4/", "fs/jbd2/", "fs/mbcache.ko", "fs/fat/", "fs/isofs/", "drivers/md/dm-mod.ko", "drivers/md/dm-verity.ko", "drivers/block/loop.ko"];
const STAGE1_CLASSES: &[&str] = &["storage", "usb", "virtio"];

/// Storage drivers the root has but stage 1 does not: SAN and iSCSI
/// offload adapters (booting from them needs more than a driver) and test
/// devices. They make up most of the storage class's size.
const NOT_IN_STAGE1: &[&str] = &[
    "drivers/scsi/fcoe/", "drivers/scsi/libfc/", "drivers/scsi/bnx2fc/", "drivers/scsi/bnx2i/", "drivers/scsi/qedf/", "drivers/scsi/qedi/", "drivers/scsi/csiostor/", "drivers/scsi/cxgbi/", "drivers/scsi/be2iscsi/", "drivers/scsi/fnic/", "drivers/scsi/snic/", "drivers/scsi/bfa/",
    "drivers/scsi/lpfc/", "drivers/scsi/qla2xxx/", "drivers/scsi/qla4xxx/", "drivers/scsi/scsi_debug.ko", "drivers/scsi/iscsi_tcp.ko", "drivers/block/drbd/", "drivers/block/rnbd/", "drivers/block/nbd.ko", "drivers/usb/typec/", "drivers/hid/", "drivers/input/keyboard/",
];

/// Bump when the selection rules change: cached assemblies are keyed by it.
const RULES: &str = "distro-3";

fn other(s: impl Into<String>) -> KernelError {
    KernelError::Other(s.into())
}

/// The cache key: the package, the firmware, the selection.
pub fn cache_key(pkg: &Resolved, fw: &[Resolved], spec: &DistroSpec) -> String {
    let mut s = format!("{RULES}\n{}\n", pkg.sha256);
    for f in fw {
        s.push_str(&format!("fw {}\n", f.sha256));
    }
    s.push_str(&format!("drivers {}\nmodules {}\n", spec.drivers.join(","), spec.modules.join(",")));
    s.push_str(&format!("stage1 {}\nk0s {}\n", kiln_contract::modules::STAGE1_MODULES.join(","), kiln_contract::modules::K0S_MODULES.join(",")));
    input::sha256_bytes(s.as_bytes())
}

/// Checks the class names (at profile load, so a typo fails early).
pub fn check_drivers(drivers: &[String]) -> Result<(), String> {
    for d in drivers {
        if !CLASSES.iter().any(|(n, _)| n == d) {
            return Err(format!("unknown driver class `{d}`; the classes are {}", CLASSES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")));
        }
    }
    Ok(())
}

fn class_paths(names: &[String]) -> Vec<&'static str> {
    CLASSES.iter().filter(|(n, _)| names.iter().any(|x| x == n)).flat_map(|(_, p)| p.iter().copied()).collect()
}

/// Modules under the given paths (`kernel/`-relative prefixes or files).
fn under(ix: &Index, paths: &[&str], except: &[&str]) -> BTreeSet<String> {
    let hit = |m: &ModInfo, list: &[&str]| list.iter().any(|p| m.path.strip_prefix("kernel/").is_some_and(|r| if p.ends_with(".ko") { r == *p } else { r.starts_with(p) }));
    ix.modules.values().filter(|m| hit(m, paths) && !hit(m, except)).map(|m| m.name.clone()).collect()
}

/// The two module sets: stage 1's and the root's (a superset).
pub fn select(ix: &Index, spec: &DistroSpec) -> Result<(BTreeSet<String>, BTreeSet<String>), KernelError> {
    let named = |names: &[&str]| -> BTreeSet<String> { names.iter().map(|n| kmod::normalise(n)).filter(|n| ix.modules.contains_key(n)).collect() };
    let stage1_classes: Vec<String> = spec.drivers.iter().filter(|d| STAGE1_CLASSES.contains(&d.as_str())).cloned().collect();
    let mut s1 = under(ix, &class_paths(&stage1_classes), NOT_IN_STAGE1);
    s1.extend(under(ix, STAGE1_PATHS, &[]));
    s1.extend(named(kiln_contract::modules::STAGE1_MODULES));
    let s1 = ix.closure(&s1).map_err(|e| other(format!("the stage-1 modules: {e}")))?;

    let mut root = s1.clone();
    root.extend(under(ix, &class_paths(&spec.drivers), &[]));
    root.extend(under(ix, K8S, &[]));
    root.extend(named(kiln_contract::modules::K0S_MODULES));
    for m in &spec.modules {
        if !ix.has(m) {
            return Err(other(format!("kernel.modules: no module named `{m}` in this kernel (nor built in); the names are those of the package's .ko files, e.g. `mlx5_core`")));
        }
        root.insert(kmod::normalise(m));
    }
    let root = ix.closure(&root).map_err(|e| other(format!("the root's modules: {e}")))?;
    Ok((s1, root))
}

/// What `assemble` leaves in the cache entry besides the files.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Record {
    release: String,
    modules: Vec<Shipped>,
    firmware: Vec<String>,
    firmware_missing: Vec<String>,
}

/// The kernel of a distro package, with its module trees, from the cache
/// or assembled now.
pub fn assemble(arch: Arch, pkg: &Resolved, fw: &[Resolved], spec: &DistroSpec, cache: &Cache) -> Result<Kernel, KernelError> {
    let key = cache_key(pkg, fw, spec);
    let entry = cache.entry("kernel-distro", &key);
    let io = |what: &str| {
        let what = what.to_string();
        move |source| KernelError::Io { what, source }
    };
    let found = |cached| -> Result<Kernel, KernelError> {
        let rec: Record = serde_json::from_str(&std::fs::read_to_string(entry.join("record.json")).map_err(io("reading the cached distro kernel"))?).map_err(|e| other(format!("the cached distro kernel's record: {e}")))?;
        Ok(Kernel {
            image: entry.join("vmlinuz"),
            config: entry.join("config"),
            release: rec.release,
            key: key.clone(),
            modules_dir: entry.join("root"),
            stage1_modules_dir: entry.join("stage1"),
            dtbs_dir: entry.join("dtbs"),
            cached,
            distro: Some(DistroKernel { package: pkg.source.clone(), modules: rec.modules, firmware: rec.firmware, firmware_missing: rec.firmware_missing }),
        })
    };
    if entry.join("record.json").exists() {
        tracing::info!("distro kernel {key:.12} is cached");
        return found(true);
    }
    let what = |r: &Resolved| Package { key: r.name.clone(), resolved: r.clone(), exclude: Vec::new() };
    tracing::info!("kernel: unpacking {} (its modules are read once, then cached)", pkg.source);
    let entries = packages::unpack(&what(pkg), cache).map_err(|e| other(e.to_string()))?;
    let files: BTreeMap<&str, &str> = entries.iter().filter_map(|e| match e {
        DebEntry::File { path, sha256, .. } => Some((path.as_str(), sha256.as_str())),
        _ => None,
    }).collect();
    let release = files
        .keys()
        .find_map(|p| p.strip_prefix("boot/config-"))
        .ok_or_else(|| other(format!("{} has no boot/config-<release>: it is not a kernel image package (name the linux-image-<release> package, not the linux-image-{} metapackage)", pkg.source, arch.debian())))?
        .to_string();
    let blob = |p: &str| files.get(p).map(|s| cache.blob(s)).ok_or_else(|| other(format!("{} has no {p}", pkg.source)));
    let image = blob(&format!("boot/vmlinuz-{release}"))?;
    let config = blob(&format!("boot/config-{release}"))?;
    let mods = format!("lib/modules/{release}/");

    let mut ix = Index::default();
    for (p, sha) in &files {
        let Some(rel) = p.strip_prefix(&mods) else { continue };
        if rel.ends_with(".ko") {
            let bytes = std::fs::read(cache.blob(sha)).map_err(io(p))?;
            let m = kmod::modinfo(rel, &bytes).ok_or_else(|| other(format!("{p} in {} is not a kernel module (no .modinfo)", pkg.source)))?;
            ix.modules.insert(m.name.clone(), m);
        } else if rel.ends_with(".ko.xz") || rel.ends_with(".ko.zst") || rel.ends_with(".ko.gz") {
            return Err(other(format!("{p}: compressed modules are not read yet (Debian 12's kernels ship them uncompressed); use a package with plain .ko files")));
        }
    }
    if let Some(sha) = files.get(format!("{mods}modules.builtin").as_str()) {
        ix.builtin = std::fs::read_to_string(cache.blob(sha)).map_err(io("modules.builtin"))?.lines().filter(|l| !l.trim().is_empty()).map(kmod::name_of_path).collect();
    }
    let (s1, root) = select(&ix, spec)?;

    // Firmware the shipped modules declare, from the firmware packages.
    let mut fw_files: BTreeMap<String, String> = BTreeMap::new();
    for f in fw {
        for e in packages::unpack(&what(f), cache).map_err(|e| other(e.to_string()))? {
            if let DebEntry::File { path, sha256, .. } = e {
                if let Some(rel) = path.strip_prefix("lib/firmware/").or_else(|| path.strip_prefix("usr/lib/firmware/")) {
                    fw_files.insert(rel.to_string(), sha256);
                }
            }
        }
    }

    let tmp = cache.temp_dir().map_err(io("creating a temp dir"))?;
    let t = tmp.path();
    link_or_copy(&image, &t.join("vmlinuz")).map_err(io("the kernel image"))?;
    link_or_copy(&config, &t.join("config")).map_err(io("the kernel config"))?;
    std::fs::create_dir_all(t.join("dtbs")).map_err(io("the dtbs dir"))?;
    let mut shipped = Vec::new();
    let mut firmware = BTreeSet::new();
    let mut firmware_missing = BTreeSet::new();
    for (dir, set) in [("root", &root), ("stage1", &s1)] {
        let mdir = t.join(dir).join("lib/modules").join(&release);
        std::fs::create_dir_all(&mdir).map_err(io("the modules dir"))?;
        for n in set.iter() {
            let m = &ix.modules[n];
            let src = format!("{mods}{}", m.path);
            let sha = files[src.as_str()];
            let dst = mdir.join(&m.path);
            std::fs::create_dir_all(dst.parent().unwrap_or(&mdir)).map_err(io("the modules dir"))?;
            link_or_copy(&cache.blob(sha), &dst).map_err(io(&src))?;
            if dir == "root" {
                shipped.push(Shipped { name: n.clone(), path: m.path.clone(), sha256: sha.to_string(), stage1: s1.contains(n) });
            }
        }
        for f in ["modules.builtin", "modules.builtin.modinfo", "modules.order"] {
            if let Some(sha) = files.get(format!("{mods}{f}").as_str()) {
                link_or_copy(&cache.blob(sha), &mdir.join(f)).map_err(io(f))?;
            }
        }
        for (name, text) in ix.index_files(set) {
            std::fs::write(mdir.join(name), text).map_err(io(name))?;
        }
        for want in ix.firmware(set) {
            match fw_files.get(&want) {
                Some(sha) => {
                    let dst = t.join(dir).join("lib/firmware").join(&want);
                    std::fs::create_dir_all(dst.parent().unwrap_or(t)).map_err(io("the firmware dir"))?;
                    link_or_copy(&cache.blob(sha), &dst).map_err(io(&want))?;
                    firmware.insert(want);
                }
                None => {
                    firmware_missing.insert(want);
                }
            }
        }
    }
    let rec = Record { release: release.clone(), modules: shipped, firmware: firmware.into_iter().collect(), firmware_missing: firmware_missing.into_iter().collect() };
    std::fs::write(t.join("record.json"), serde_json::to_string_pretty(&rec).map_err(|e| other(e.to_string()))?).map_err(io("the record"))?;
    tracing::info!("kernel: {} {release}: {} modules in the root, {} in stage 1, {} firmware files", pkg.source, root.len(), s1.len(), rec.firmware.len());
    cache.commit_dir(tmp, &entry).map_err(io("storing the distro kernel in the cache"))?;
    found(false)
}

/// A hard link to the cache's blob (same file system), else a copy.
fn link_or_copy(src: &Path, dst: &PathBuf) -> std::io::Result<()> {
    if std::fs::hard_link(src, dst).is_err() {
        std::fs::copy(src, dst)?;
    }
    Ok(())
}
