//! `kiln build PROFILE`: the pipeline from ARCHITECTURE.md, as one function.

use crate::inputs::cache::Cache;
use crate::inputs::input::{self, Resolved};
use crate::inputs::kernel::Kernel;
use crate::provenance::manifest::{self, Manifest};
use crate::inputs::payload::{self, Payload};
use crate::profile::{self, Output, Profile};
use kiln_formats::tree::{Kind, Tree};
use crate::image::{disk, isoboot, pxe, sdcard, update};
use crate::inputs::{init, packages};
use crate::provenance::{keys, sbom};
use crate::progress::{Steps, Unit};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct Built {
    pub out: PathBuf,
    pub kernel_cached: bool,
    /// A distro kernel (taken from its package, not compiled).
    pub kernel_distro: bool,
    /// Size of the PXE initramfs, when the profile has the pxe output.
    pub initramfs_bytes: Option<u64>,
    pub payload_bytes: u64,
    /// Where the time went, step by step.
    pub timings: Vec<crate::progress::Timing>,
    /// The root squashfs: bytes, and file data in and stored as it was.
    pub squashfs: kiln_formats::squashfs::Stats,
}

/// Step 1: the profile, and everything it names that can be checked without
/// fetching or building anything: the baked node config, the signing key
/// (and that an `update` output has one), the Secure Boot key and
/// certificate, the node config key. `kiln profile check` runs exactly
/// this, so a profile that passes it cannot fail step 1 of a build.
pub struct Checked {
    pub profile: Profile,
    pub node_toml: String,
    pub node: kiln_contract::config::NodeConfig,
    pub signer: Option<crate::provenance::sign::KeyPair>,
    pub secureboot: Option<crate::image::secureboot::Signer>,
    pub config_key: Option<crate::provenance::sign::PublicKey>,
    /// `node.trust`, checked.
    pub trust: Vec<crate::inputs::trust::Anchor>,
}

pub fn check(profile_path: &Path) -> Result<Checked> {
    let profile = profile::load(profile_path)?;
    // Check the baked node config now, not on the node.
    let node_toml = std::fs::read_to_string(&profile.node_config).with_context(|| format!("reading the default node config {} (key `node.config` in {})", profile.node_config.display(), profile.path.display()))?;
    let node = kiln_contract::config::parse(&node_toml).map_err(|e| anyhow::anyhow!("{}: {e}", profile.node_config.display()))?;

    // The signing key, loaded first so a bad key fails before any work. The
    // private key never goes into an output; the public key goes into the
    // image for verifying updates.
    let signer = keys::signing_key(&profile.sign)?;
    if profile.outputs.contains(&Output::Update) && signer.is_none() {
        bail!("{}: {}", profile.path.display(), update::NEEDS_KEY);
    }
    // The Secure Boot db key and certificate, checked against each other.
    let secureboot = profile.secureboot.as_ref().map(|s| crate::image::secureboot::Signer::load(s, &profile.path, profile.source_date_epoch)).transpose()?;
    // With it, the node takes configs from outside the image only when signed.
    let config_key = match &profile.config_key {
        Some(p) => {
            let at = || format!("{} (key `node.config_key` in {})", p.display(), profile.path.display());
            let text = std::fs::read_to_string(p).with_context(|| format!("reading the node config key {}; make a key pair with `kiln key generate` and name its .pub here", at()))?;
            Some(crate::provenance::sign::PublicKey::from_file(&text).with_context(|| format!("{} is not a minisign public key (the .pub file of `kiln key generate`)", at()))?)
        }
        None => None,
    };
    let trust = crate::inputs::trust::load(&profile.trust, &profile.path)?;
    Ok(Checked { profile, node_toml, node, signer, secureboot, config_key, trust })
}

/// What the image runs as its payload, said plainly: `stand-in (a test
/// fixture, not k0s)` or `k0s <version> (sha256 …)`.
pub fn payload_line(profile: &Profile) -> String {
    match &profile.payload {
        profile::Payload::StandIn => "payload: stand-in (a test fixture, not k0s)".into(),
        profile::Payload::K0s { input, version } => format!(
            "payload: k0s {} (sha256 {})",
            version.as_deref().unwrap_or("(version not given: set [payload] version)"),
            input.sha256.as_deref().unwrap_or("?")
        ),
    }
}

/// Warnings about decisions a flashed node cannot undo: an image that
/// cannot take update bundles, or whose root slots leave no room for a
/// real-size root. Each says what to add.
pub fn advice(c: &Checked) -> Vec<String> {
    let p = &c.profile;
    let mut w = Vec::new();
    if matches!(p.payload, profile::Payload::StandIn) {
        w.push("the payload is the stand-in, a test fixture that is not k0s: nodes from this image never run Kubernetes; give [payload] k0s = { url = \"…\", sha256 = \"…\" } (docs/profiles.md, Real k0s)".to_string());
    }
    if p.debug_shell {
        w.push("node.debug_shell = true: every node of this image has a root shell on its console (serial and screen), in maintenance too, so anyone at the console owns the node; keep it to lab and test images".into());
    }
    let updatable = p.outputs.iter().any(|o| matches!(o, Output::Disk | Output::Qcow2 | Output::Zst | Output::Bmap | Output::Iso | Output::Sdcard));
    if !updatable {
        return w;
    }
    if c.signer.is_none() {
        w.push("no signing key: nodes flashed or installed from this image never take an update bundle (the image carries no /etc/kiln/update.pub); set KILN_SIGNING_KEY or [sign] key = \"kiln.key\" (kiln key generate) before the first flash".into());
    }
    if p.version.is_none() {
        w.push("no `version`: nodes cannot tell a newer bundle from this image; add version = \"1.0.0\"".into());
    }
    const REAL_SIZE_MIB: u64 = 512;
    match p.disk.root_slot {
        crate::image::disk::RootSlot::Mib(n) if n < REAL_SIZE_MIB => w.push(format!(
            "root slots of {n} MiB: a real-size root (k0s and its images, ~350 MiB) will not fit a later update, and slot sizes cannot change after flashing; set disk.root_slot_mib = 1024"
        )),
        crate::image::disk::RootSlot::Auto if matches!(p.payload, profile::Payload::StandIn) => w.push(
            "root_slot_mib = \"auto\" sizes the slots for this build's small stand-in root, so a later bundle with real k0s will not fit; set disk.root_slot_mib = 1024 for nodes you will update".into(),
        ),
        _ => {}
    }
    w
}

/// What to do with each output a build made, one line each.
pub fn next_steps(profile: &Profile, out: &Path) -> Vec<String> {
    let o = out.display();
    let name = &profile.name;
    let mut n = Vec::new();
    for output in &profile.outputs {
        n.push(match output {
            Output::Disk => format!("boot the disk under QEMU: kiln run {o}; flash it: dd if={o}/disk.raw of=/dev/sdX bs=4M conv=fsync"),
            Output::Qcow2 => format!("a VM disk: {o}/disk.qcow2 (kiln run {o} --boot disk uses disk.raw)"),
            Output::Zst => format!("flash the compressed disk: zstdcat {o}/disk.raw.zst | dd of=/dev/sdX bs=4M conv=fsync"),
            Output::Bmap => format!("flash only the written blocks: bmaptool copy --bmap {o}/disk.bmap {o}/disk.raw /dev/sdX"),
            Output::Iso => format!("boot the installer ISO: kiln run {o} --boot iso; or write {o}/{name}.iso to a USB stick (docs/quickstart.md)"),
            Output::Pxe => format!("network boot: kiln serve {o}/pxe --configs CONFIGS --init-tls TLS, then chain http://SERVER:8080/boot.ipxe (docs/use-cases/pxe.md); or kiln run {o} --boot pxe"),
            Output::Sdcard => format!("flash the card: dd if={o}/sdcard.img of=/dev/mmcblkX bs=4M conv=fsync (docs/use-cases/sd-card.md)"),
            Output::Update => format!("publish {o}/update.kiln in a channel or copy it to a KILNUPD stick (docs/updates.md)"),
        });
    }
    n.push(format!("check the signatures and hashes: kiln verify {o} --key kiln.pub"));
    n
}

/// Builds every output of a profile into `out_root/<name>/`, saying on
/// stderr how a long step is going.
pub fn build(profile_path: &Path, out_root: &Path, cache: &Cache) -> Result<Built> {
    build_with(profile_path, out_root, cache, &Steps::new(false))
}

/// [`build`], timing each step in `steps`.
pub fn build_with(profile_path: &Path, out_root: &Path, cache: &Cache, steps: &Steps) -> Result<Built> {
    // 1. Profile.
    let step = steps.start("profile", Unit::Files);
    let Checked { profile, node_toml, node, signer, secureboot, config_key, trust } = check(profile_path)?;

    // 2. Inputs.
    drop(step);
    let step = steps.start("inputs", Unit::Files);
    let deb_arch = profile.arch.debian();
    let kernel_inputs = crate::inputs::kernel_input::resolve_inputs(&profile.kernel, deb_arch, cache)?;
    let busybox = input::resolve("rootfs.busybox", &profile.busybox, deb_arch, cache)?;
    init::check_static("rootfs.busybox", &busybox.path, profile.arch)?;
    let boot = match &profile.boot {
        Some((sd, stub)) if profile.wants_uki() => Some((
            input::resolve("boot.systemd_boot", sd, deb_arch, cache)?,
            input::resolve("boot.stub", stub, deb_arch, cache)?,
        )),
        _ => None,
    };
    if let Some((sd, stub)) = &boot {
        for (key, r) in [("boot.systemd_boot", sd), ("boot.stub", stub)] {
            check_efi_arch(key, &r.path, profile.arch)?;
        }
    }
    let bios = match &profile.iso.bios {
        Some((a, b, c)) if profile.outputs.contains(&Output::Iso) => Some((
            input::resolve("iso.isolinux", a, deb_arch, cache)?,
            input::resolve("iso.isohybrid_mbr", b, deb_arch, cache)?,
            input::resolve("iso.ldlinux", c, deb_arch, cache)?,
        )),
        _ => None,
    };
    if let profile::Payload::K0s { input: spec, .. } = &profile.payload {
        // Fail on a missing or mis-pinned payload before any compiling.
        input::resolve("payload.k0s", spec, deb_arch, cache)?;
    }
    // Appliance payloads, also before any compiling.
    let board_inputs = profile.board.as_ref().map(|b| b.resolve(deb_arch, cache)).transpose()?;
    // The card's boot.scr must run on the board's own u-boot: a command it
    // lacks would only show on the board, as a card that never boots.
    if let (Some(board), Some(bi)) = (&profile.board, &board_inputs) {
        for u in board.check_boot_script(bi, &kiln_formats::bootscr::script()).map_err(anyhow::Error::msg)? {
            tracing::info!("board {}: boot.scr checked against the u-boot in {} ({} commands)", board.name, u.input, u.commands.commands.len());
        }
    }
    let appliance = crate::inputs::appliance::resolve(&profile.appliance, &profile.path, deb_arch, cache)?;
    let packages = packages::resolve(&profile.packages, deb_arch, cache)?;
    let root_files = crate::inputs::rootfiles::resolve(&profile.root_files, deb_arch, cache)?;
    // A package with a missing library fails here, before any compiling
    // (kiln's own programs are static); the whole root is checked again
    // once assembled.
    packages::add_and_check(&mut Tree::new(), &packages, profile.arch, cache)?;

    // 3. Kernel, checked against the requirement table for the default role.
    drop(step);
    let step = steps.start("kernel", Unit::Files);
    let kernel = crate::inputs::kernel_input::get_counted(profile.arch, &kernel_inputs, &profile.kernel, cache, &step.counter)?;
    let mut kconfig = kiln_contract::requirements::KernelConfig::parse(&std::fs::read_to_string(&kernel.config)?);
    if kernel.distro.is_some() {
        // The root carries its .config (rootfs_tree), for preflight and k0s.
        kconfig = kconfig.shipped();
    }
    let report = kiln_contract::requirements::check(&kconfig, kiln_contract::requirements::Needs::for_role(node.role));
    if !report.ok() {
        bail!("the kernel does not meet the requirements for role {}:\n{report}", node.role);
    }

    // 4. Init, and the payload.
    drop(step);
    let step = steps.start("kiln-init and payload", Unit::Files);
    let init_bin = init::build(&profile.tree, profile.arch)?;
    let payload = payload::build(&profile.payload, &profile.tree, profile.arch, cache)?;

    // 5. Root filesystem tree.
    drop(step);
    let step = steps.start("root tree", Unit::Files);
    let mut tree = rootfs_tree(&profile, &kernel, &init_bin, &busybox, &payload, &node_toml)?;
    appliance.add_to(&mut tree)?;
    crate::inputs::rootfiles::add_to(&mut tree, &root_files)?;
    if let Some(k) = &signer {
        tree.file("/etc/kiln/update.pub", k.public().to_file(), 0o644)?;
    }
    if let Some(key) = &config_key {
        tree.file("/etc/kiln/config.pub", key.to_file(), 0o644)?;
    }
    for a in &trust {
        tree.file(&format!("{}/{}", kiln_contract::layout::TRUST_DIR_ABS, a.name), a.pem.clone(), 0o644)?;
    }
    if profile.insecure_http_secrets {
        tree.file(kiln_contract::layout::INSECURE_HTTP_SECRETS, "node.insecure_http_secrets = true: this image uses node configs holding secrets even when they came over plain http://\n", 0o644)?;
    }
    if profile.debug_shell {
        tree.file(kiln_contract::layout::DEBUG_SHELL, "node.debug_shell = true: a root shell on the console of every node of this image, in maintenance too\n", 0o644)?;
    }
    // Debian packages last, so that one colliding with kiln's own files is
    // caught; then every ELF file in the root must be loadable.
    packages::add_and_check(&mut tree, &packages, profile.arch, cache)?;

    // 6–8. Root image, initramfs, boot artifacts and outputs, written aside
    // and renamed.
    let name = &profile.name;
    std::fs::create_dir_all(out_root).with_context(|| format!("creating {}", out_root.display()))?;
    let staging = tempfile::Builder::new().prefix(&format!(".{name}.")).tempdir_in(out_root)?;
    let work = staging.path().join(".work");
    std::fs::create_dir_all(&work)?;
    let cmdline = profile.kernel.cmdline.join(" ");
    // The root is the tree, read-only, with mount points for what stage 1
    // puts there.
    tree.mkdir_p("/boot", 0o755)?;
    let stage1 = disk::stage1_tree(&init_bin, &kernel.stage1_modules_dir)?;
    drop(step);
    let store = crate::inputs::packed::PackedStore::new(cache);
    let store = steps.reuse_packed().then_some(&store as &dyn kiln_formats::squashfs::Store);
    let root = disk::build_root(&work, &profile.disk, &disk::RootInputs { root: &tree, stage1: &stage1, cmdline: &cmdline, epoch: profile.source_date_epoch, store }, steps)?;

    let mut initramfs_bytes = None;
    if profile.outputs.contains(&Output::Pxe) {
        let _step = steps.start("pxe", Unit::Bytes);
        initramfs_bytes = Some(pxe::write(staging.path(), &kernel.image, &root, profile.source_date_epoch, name, &profile.pxe).context("writing the PXE bundle")?);
        let vmlinuz = staging.path().join("pxe/vmlinuz");
        if let Some(s) = secureboot.as_ref().filter(|_| crate::image::secureboot::is_pe(&vmlinuz).unwrap_or(false)) {
            s.sign_in_place(&vmlinuz)?;
        }
    }
    let mut uki = None;
    if let Some((sd, stub)) = &boot {
        let systemd_boot = match &secureboot {
            Some(s) => {
                let signed = work.join("systemd-boot.signed.efi");
                s.sign(&sd.path, &signed)?;
                signed
            }
            None => sd.path.clone(),
        };
        let b = disk::BootInputs {
            arch: profile.arch,
            profile: name,
            kernel: &kernel.image,
            kernel_release: &kernel.release,
            systemd_boot: &systemd_boot,
            stub: &stub.path,
            os_release: &os_release(&profile),
            epoch: profile.source_date_epoch,
            secureboot: secureboot.as_ref(),
        };
        if !profile.outputs.iter().any(|o| o.needs_disk()) {
            // Only the update bundle wants the UKI: no disk to write.
            let _step = steps.start("uki", Unit::Bytes);
            let uki_path = work.join("kiln.efi");
            disk::write_uki(&root, &b, &root.cmdline, &uki_path)?;
            uki = Some((String::new(), uki_path));
        } else {
            let wants_disk_file = profile.outputs.iter().any(|o| matches!(o, Output::Disk | Output::Qcow2 | Output::Zst | Output::Bmap));
            let disk_path = if wants_disk_file { staging.path().join("disk.raw") } else { work.join("disk.raw") };
            let built = disk::write(&disk_path, &work, &profile.disk, &root, &b, steps)?;
            for o in &profile.outputs {
                let _step = matches!(o, Output::Qcow2 | Output::Zst | Output::Bmap | Output::Iso).then(|| steps.start(o.name(), Unit::Bytes));
                match o {
                    Output::Qcow2 => disk::write_qcow2(staging.path())?,
                    Output::Zst => disk::write_zst(staging.path())?,
                    Output::Bmap => disk::write_bmap(staging.path())?,
                    Output::Iso => {
                        let bios = bios.as_ref().map(|(a, b, c)| (a.path.as_path(), b.path.as_path(), c.path.as_path()));
                        isoboot::write(&staging.path().join(format!("{name}.iso")), &work, &root, &b, &disk_path, &built, profile.iso.root_in_ram, bios).context("writing the ISO")?;
                    }
                    Output::Pxe | Output::Disk | Output::Sdcard | Output::Update => {}
                }
            }
            uki = Some((built.uki_name, built.uki_path));
        }
    }
    if let (Some(board), Some(bi)) = (&profile.board, &board_inputs) {
        if profile.outputs.contains(&Output::Sdcard) {
            let _step = steps.start("sdcard", Unit::Bytes);
            let spec = sdcard::SdSpec { profile: name.clone(), boot_mib: profile.disk.esp_mib, root_slot: profile.disk.root_slot, data_mib: profile.disk.data_mib, epoch: profile.source_date_epoch };
            let k = sdcard::KernelFiles { zimage: &kernel.image, dtbs: Some(&kernel.dtbs_dir) };
            sdcard::write(&staging.path().join("sdcard.img"), &work, &spec, board, bi, &root, &k).context("writing the SD card image")?;
        }
        if let (Some(key), true) = (&signer, profile.outputs.contains(&Output::Update)) {
            let _step = steps.start("update", Unit::Bytes);
            let dtb = sdcard::dtb_file(board, Some(&kernel.dtbs_dir))?.zip(board.dtb.as_deref()).map(|(file, name)| (name, file));
            let cmdline = sdcard::bundle_cmdline(board, &root);
            update::write_build(staging.path(), &profile.identity(), key, &root, &update::Boot::Board { zimage: &kernel.image, dtb, cmdline: &cmdline }).context("writing the update bundle")?;
        }
        // The QEMU board's firmware, for `kiln run` (not part of the card).
        if let Some(bios) = &bi.bios {
            std::fs::copy(&bios.path, staging.path().join(sdcard::UBOOT_BIN)).with_context(|| format!("copying the board's bios {}", bios.path.display()))?;
        }
    }
    if let (Some(key), Some((_, uki_path)), None, true) = (&signer, &uki, &profile.board, profile.outputs.contains(&Output::Update)) {
        let _step = steps.start("update", Unit::Bytes);
        update::write_build(staging.path(), &profile.identity(), key, &root, &update::Boot::Uki(uki_path)).context("writing the update bundle")?;
    }
    std::fs::remove_dir_all(&work)?;
    let step = steps.start("sbom, manifest, signatures", Unit::Bytes);
    let disk_info = Some(manifest::DiskInfo { roothash: root.verity.root_hex(), cmdline: root.cmdline.clone(), uki: uki.map(|(name, _)| name).unwrap_or_default(), squashfs_bytes: root.squashfs_bytes, root_slot_mib: profile.disk.root_slot.mib_for(root.squashfs_bytes).ok() });

    let mut inputs: Vec<Resolved> = kernel_inputs.all().cloned().collect();
    inputs.push(busybox);
    if let Some((a, b)) = boot {
        inputs.push(a);
        inputs.push(b);
    }
    if let Some((a, b, c)) = bios {
        inputs.extend([a, b, c]);
    }
    if let Some(r) = &payload.input {
        inputs.push(r.clone());
    }
    inputs.extend(appliance.inputs);
    inputs.extend(packages.into_iter().map(|p| p.resolved));
    inputs.extend(root_files.into_iter().map(|(_, r)| r));
    inputs.extend(board_inputs.iter().flat_map(|b| b.all().cloned()));
    // The SBOM lists the artifacts so far; the manifest then lists it too.
    let sbom_doc = sbom::collect(&profile.identity(), &kernel, &init_bin, &profile.payload, &payload, &inputs, staging.path(), cache)?;
    let hashed: std::collections::HashMap<String, String> = sbom_doc.artifacts.iter().map(|a| (a.path.clone(), a.sha256.clone())).collect();
    let sbom = sbom_doc.write(staging.path())?;
    if let Some(k) = &signer {
        keys::sign_beside(k, &sbom, &format!("kiln sbom profile={name} arch={}", profile.arch))?;
    }
    let manifest = Manifest {
        kiln_version: env!("CARGO_PKG_VERSION").into(),
        profile: name.clone(),
        arch: profile.arch.to_string(),
        kernel: manifest::KernelInfo { release: kernel.release.clone(), config_sha256: input::sha256_file(&kernel.config)?.0, cache_key: kernel.key.clone(), distro: kernel.distro.clone() },
        payload: manifest::PayloadInfo { description: payload.description.clone(), version: payload.version.clone(), sha256: input::sha256_file(&payload.path)?.0 },
        cmdline,
        disk: disk_info,
        board: profile.board.as_ref().map(|b| b.name.clone()),
        qemu: manifest::QemuInfo { machine: profile.qemu.machine.to_string(), memory_mib: profile.qemu.memory_mib, cpus: profile.qemu.cpus },
        inputs,
        artifacts: manifest::artifacts_known(staging.path(), &hashed)?,
    };
    manifest.write(staging.path())?;
    if let Some(k) = &signer {
        keys::sign_beside(k, &staging.path().join("manifest.json"), &format!("kiln manifest profile={name} arch={}", profile.arch))?;
    }

    let out = out_root.join(name);
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("replacing {}", out.display()))?;
    }
    let staged = staging.keep();
    std::fs::rename(&staged, &out).with_context(|| format!("moving the finished build to {}", out.display()))?;
    let payload_bytes = std::fs::metadata(&payload.path)?.len();
    drop(step);
    Ok(Built { out, kernel_cached: kernel.cached, kernel_distro: kernel.distro.is_some(), initramfs_bytes, payload_bytes, timings: steps.timings(), squashfs: root.stats })
}

const DIRS: &[(&str, u32)] = &[
    ("/dev", 0o755),
    ("/proc", 0o555),
    ("/sys", 0o555),
    ("/run", 0o755),
    ("/tmp", 0o1777),
    ("/root", 0o700),
    ("/etc/k0s/containerd.d", 0o755),
    ("/etc/cni/net.d", 0o755),
    ("/opt/cni/bin", 0o755),
    ("/var/lib/k0s", 0o755),
    ("/var/log/pods", 0o755),
    ("/usr/libexec/k0s/kubelet-plugins/volume/exec", 0o755),
    ("/usr/local/bin", 0o755),
];

/// What the node's root holds: kiln-init, busybox, the payload, the kernel's
/// module metadata, and /etc defaults.
fn rootfs_tree(profile: &Profile, kernel: &Kernel, init_bin: &Path, busybox: &Resolved, payload: &Payload, node_toml: &str) -> Result<Tree> {
    let mut t = Tree::new();
    for (d, mode) in DIRS {
        t.mkdir_p(d, *mode)?;
    }
    t.insert("/dev/console", Kind::CharDev(5, 1), 0o600)?;
    t.insert("/dev/null", Kind::CharDev(1, 3), 0o666)?;
    t.host_file("/sbin/kiln-init", init_bin.to_path_buf(), 0o755)?;
    t.symlink("/init", "sbin/kiln-init")?;
    t.symlink("/sbin/init", "kiln-init")?;
    t.host_file("/bin/busybox", busybox.path.clone(), 0o755)?;
    for applet in &profile.busybox_applets {
        if applet.is_empty() || applet.contains('/') {
            bail!("{}: busybox applet `{applet}` is not a plain name (key `rootfs.busybox_applets`)", profile.path.display());
        }
        t.symlink(&format!("/bin/{applet}"), "busybox")?;
    }
    t.host_file("/usr/bin/k0s", payload.path.clone(), 0o755)?;
    t.file("/etc/kiln/node.toml", node_toml.as_bytes(), 0o644)?;
    t.file("/etc/os-release", os_release(profile), 0o644)?;
    t.symlink("/usr/lib/os-release", "../../etc/os-release")?;
    t.file("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n", 0o644)?;
    t.file("/etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644)?;
    t.file("/etc/nsswitch.conf", "hosts: files dns\n", 0o644)?;
    // Module metadata (modules.builtin) and any modules, under /lib/modules,
    // and their firmware; kiln-init is the modprobe the kernel calls.
    disk::add_modules(&mut t, &kernel.modules_dir)?;
    // The .config where preflight and k0s look when there is no
    // /proc/config.gz; /usr/lib/modules is where a merged-/usr system has it.
    t.host_file(&kiln_contract::requirements::SHIPPED_CONFIG.replace("{release}", &kernel.release), kernel.config.clone(), 0o644)?;
    t.symlink("/usr/lib/modules", "../../lib/modules")?;
    t.file(kiln_contract::layout::VAR_TEMPLATE, var_template(profile)?, 0o644)?;
    Ok(t)
}

/// The empty ext4 kiln-init writes to a blank `storage.var_disk`. Mostly
/// zeros, which the squashfs stores as holes.
fn var_template(profile: &Profile) -> Result<Vec<u8>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("var.ext4");
    disk::make_var_template(&path, &profile.name, profile.source_date_epoch).context("making the /var template")?;
    Ok(std::fs::read(&path)?)
}

fn os_release(p: &Profile) -> String {
    let mut s = format!(
        "NAME=kiln\nID=kiln\nPRETTY_NAME=\"kiln {v} ({name})\"\nVERSION_ID={v}\nIMAGE_ID={name}\n",
        v = env!("CARGO_PKG_VERSION"),
        name = p.name
    );
    // What the node compares an update bundle's version with.
    if let Some(v) = &p.version {
        s.push_str(&format!("IMAGE_VERSION={v}\n"));
    }
    s
}


/// An EFI program from a profile input must be for the profile's arch: the
/// firmware would refuse another one only at boot, on the device.
fn check_efi_arch(key: &str, path: &std::path::Path, arch: crate::arch::Arch) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("{key}: reading {}", path.display()))?;
    let want = arch.pe_machine();
    match kiln_formats::uki::pe_machine(&bytes) {
        Some(m) if m == want => Ok(()),
        Some(m) => bail!("{key}: {} is an EFI program for machine {m:#x}, but the profile's arch is {arch} ({want:#x}); take the {} build of it", path.display(), arch.debian()),
        None => bail!("{key}: {} is not an EFI (PE) program", path.display()),
    }
}
