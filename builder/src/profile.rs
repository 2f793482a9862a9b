//! Profiles: TOML files that say what image to build.
//!
//! A profile may `extends = "other.toml"` (relative to itself); keys in the
//! child win, tables merge. Each file is checked on its own against the schema
//! first, so an unknown or mistyped key is reported with that file's name,
//! line and key.

use crate::inputs::input::Input;
pub use crate::inputs::kernel::KernelSpec;
pub use crate::inputs::payload::Spec as Payload;
pub use crate::tomlfile::ProfileError;
use crate::tomlfile::{line_in_table, parse_toml};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// `SOURCE_DATE_EPOCH` as the reproducible-builds spec has it: unset or
/// empty means "not given"; anything else must be seconds since the epoch.
pub fn source_date_epoch_from_env(value: Option<&str>) -> Result<Option<u64>, ProfileError> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| ProfileError::BadSourceDateEpoch { value: v.to_string() }),
    }
}

use crate::arch::Arch;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    /// pxe/: vmlinuz, initramfs.cpio.zst (the whole root), boot.ipxe.
    Pxe,
    /// disk.raw: GPT, ESP with systemd-boot and a UKI, verified root, data.
    Disk,
    /// disk.qcow2 (implies disk).
    Qcow2,
    /// disk.raw.zst (implies disk).
    Zst,
    /// disk.bmap, for bmaptool (implies disk).
    Bmap,
    /// `<name>.iso`: hybrid ISO 9660 (CD, USB stick), El Torito UEFI (and
    /// BIOS on amd64), and an installer.
    Iso,
    /// sdcard.img: the armv7 SD card for the profile's `board` (u-boot,
    /// extlinux.conf, A/B roots, data).
    Sdcard,
    /// update.kiln: the signed update bundle (root, verity tree, UKI, or on
    /// an armv7 board zImage, initramfs and dtb). Needs `version` and a
    /// signing key.
    Update,
}

impl Output {
    /// The name a profile gives it.
    pub fn name(self) -> &'static str {
        match self {
            Output::Pxe => "pxe",
            Output::Disk => "disk",
            Output::Qcow2 => "qcow2",
            Output::Zst => "zst",
            Output::Bmap => "bmap",
            Output::Iso => "iso",
            Output::Sdcard => "sdcard",
            Output::Update => "update",
        }
    }

    pub fn needs_disk(self) -> bool {
        !matches!(self, Output::Pxe | Output::Sdcard | Output::Update)
    }
}

// ---- One file, as written: every key optional, unknown keys rejected. ----

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileFile {
    pub extends: Option<String>,
    pub name: Option<String>,
    pub description: Option<String>,
    pub arch: Option<Arch>,
    pub outputs: Option<Vec<Output>>,
    /// The image's version (dot-separated numbers), for update bundles and
    /// os-release's IMAGE_VERSION.
    pub version: Option<String>,
    /// An armv7 board overlay, `overlays/boards/<board>/board.toml`.
    pub board: Option<String>,
    /// Timestamps inside artifacts (cpio mtimes…). `SOURCE_DATE_EPOCH` wins.
    pub source_date_epoch: Option<u64>,
    #[serde(default)]
    pub kernel: KernelFile,
    #[serde(default)]
    pub rootfs: RootfsFile,
    #[serde(default)]
    pub payload: PayloadFile,
    #[serde(default)]
    pub node: NodeFile,
    #[serde(default)]
    pub qemu: QemuFile,
    #[serde(default)]
    pub boot: BootFile,
    #[serde(default)]
    pub disk: DiskFile,
    #[serde(default)]
    pub sign: SignFile,
    #[serde(default)]
    pub iso: IsoFile,
    #[serde(default)]
    pub appliance: crate::inputs::appliance::ApplianceFile,
    #[serde(default)]
    pub secureboot: SecureBootFile,
    #[serde(default)]
    pub pxe: PxeFile,
}

/// `[pxe]`: what boot.ipxe points at (see image/pxe.rs).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PxeFile {
    /// The URL the pxe/ directory is served from (default
    /// `http://${next-server}:8080`; `kiln serve` rewrites it).
    pub server: Option<String>,
    /// `per-mac` (configs/<mac>.toml beside the bundle), `image` (the
    /// baked-in config), or one config URL for every node.
    pub config: Option<String>,
}

/// `[secureboot]`: Authenticode-sign the EFI binaries (see secureboot.rs).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureBootFile {
    /// The db signing key (PEM, unencrypted), relative to the profile.
    /// `KILN_SECUREBOOT_KEY` (the key file's text) overrides it.
    pub key: Option<String>,
    /// The db certificate (PEM), relative to the profile.
    pub cert: Option<String>,
    /// PK/KEK/db `.auth` files for systemd-boot to enrol.
    pub enroll: Option<EnrollFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollFile {
    pub pk: String,
    pub kek: String,
    pub db: String,
    /// Enrol without asking (`secure-boot-enroll force`).
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IsoFile {
    /// Where the booted ISO's root lives: `medium` (read from the CD or
    /// stick) or `ram` (copied into RAM first, so the medium can be removed).
    pub root: Option<String>,
    /// BIOS boot (amd64): isolinux.bin (Debian `isolinux`).
    pub isolinux: Option<Input>,
    /// The isohybrid MBR (Debian `isolinux`, isohdpfx.bin), so that a stick
    /// boots under BIOS too.
    pub isohybrid_mbr: Option<Input>,
    /// isolinux's ldlinux.c32 (Debian `syslinux-common`).
    pub ldlinux: Option<Input>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignFile {
    /// The minisign secret key (unencrypted), relative to the profile.
    /// `KILN_SIGNING_KEY` (the key file's text) overrides it.
    pub key: Option<String>,
    /// A command (program and arguments) that prints the secret key file on
    /// stdout, run in the profile's directory; instead of `key`.
    pub key_command: Option<Vec<String>>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootFile {
    /// systemd-boot's EFI binary (Debian systemd-boot-efi for the target).
    pub systemd_boot: Option<Input>,
    /// The systemd-stub the UKI is built on.
    pub stub: Option<Input>,
}

/// `disk.root_slot_mib`: a number of MiB, or a word (`auto`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum SlotFile {
    Mib(u64),
    Word(String),
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskFile {
    pub esp_mib: Option<u64>,
    /// Each root slot (A and B), MiB or `"auto"`; the squashfs must fit.
    pub root_slot_mib: Option<SlotFile>,
    /// The data partition as built; the node grows it to fill the disk.
    pub data_mib: Option<u64>,
    /// `panic_on_corruption`, `restart_on_corruption`, or unset (I/O errors).
    pub verity_on_corruption: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelFile {
    /// The kernel source tarball (a `deb` with `member`, a `file` or a `url`).
    pub source: Option<Input>,
    /// The make target the fragments apply on top of (`tinyconfig`).
    pub base: Option<String>,
    /// Fragments, relative to the `kernel-configs/` directory, applied in order.
    pub fragments: Option<Vec<String>>,
    /// Source patches (`patch -p1`), relative to `kernel-configs/`, applied
    /// in order to the unpacked source.
    pub patches: Option<Vec<String>>,
    /// Kernel command line, before what kiln adds.
    pub cmdline: Option<Vec<String>>,
    /// `compiled` (the default: `source` + `fragments`) or `distro`.
    pub kind: Option<String>,
    /// `kind = "distro"`: the `linux-image-<release>` package.
    pub package: Option<Input>,
    /// `kind = "distro"`: the hardware classes whose drivers go in.
    pub drivers: Option<Vec<String>>,
    /// `kind = "distro"`: more modules by name.
    pub modules: Option<Vec<String>>,
    /// `kind = "distro"`: firmware packages.
    pub firmware: Option<Vec<Input>>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootfsFile {
    /// A static busybox for the target (gives mount, umount, modprobe, sh).
    pub busybox: Option<Input>,
    /// Applets linked into /bin.
    pub busybox_applets: Option<Vec<String>>,
    /// `[[rootfs.packages]]`: Debian packages unpacked into the root.
    pub packages: Option<Vec<crate::inputs::packages::PackageFile>>,
    /// `[[rootfs.files]]`: single pinned files at a path in the root.
    pub files: Option<Vec<crate::inputs::rootfiles::RootFileFile>>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadFile {
    /// Build the stand-in test fixture from qemu-tests/ instead of using k0s.
    #[serde(rename = "stand-in")]
    pub stand_in: Option<bool>,
    /// Real k0s: a static binary for the target arch, pinned by sha256.
    pub k0s: Option<Input>,
    /// The version string recorded in the manifest.
    pub version: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// The node.toml baked in as the default, relative to the profile.
    pub config: Option<String>,
    /// A minisign public key, relative to the profile. When set, node
    /// configs from outside the image (URL, fw_cfg, ESP) must carry a valid
    /// `.minisig` by this key; unsigned ones are refused.
    pub config_key: Option<String>,
    /// PEM files of CA certificates (or a server's self-signed certificate)
    /// the node trusts for https:// (configs, update channels, bundles),
    /// relative to the profile.
    pub trust: Option<Vec<String>>,
    /// Accept node configs holding secrets (a join token, a CA key) over
    /// plain http://. Off: such configs are refused.
    pub insecure_http_secrets: Option<bool>,
    /// A root shell on the console of every node of this image, from the
    /// start of stage 2: in maintenance too, before any config is read.
    pub debug_shell: Option<bool>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuFile {
    pub machine: Option<String>,
    pub memory_mib: Option<u32>,
    pub cpus: Option<u32>,
}

macro_rules! merge_opts {
    ($child:expr, $base:expr, $($f:ident),*) => { $( if $child.$f.is_none() { $child.$f = $base.$f.clone(); } )* };
}

impl ProfileFile {
    /// Fills what the child leaves unset from its base.
    fn inherit(&mut self, base: &ProfileFile) {
        merge_opts!(self, base, name, description, arch, outputs, version, board, source_date_epoch);
        merge_opts!(self.kernel, base.kernel, source, base, fragments, patches, cmdline, kind, package, drivers, modules, firmware);
        merge_opts!(self.rootfs, base.rootfs, busybox, busybox_applets, packages, files);
        // `stand-in` and `k0s` are one choice too: a child giving real k0s
        // replaces the base's stand-in (and the stand-in, a base's k0s).
        if self.payload.stand_in.is_none() && self.payload.k0s.is_none() {
            merge_opts!(self.payload, base.payload, stand_in, k0s);
        }
        merge_opts!(self.payload, base.payload, version);
        merge_opts!(self.node, base.node, config, config_key, trust, insecure_http_secrets, debug_shell);
        merge_opts!(self.iso, base.iso, root, isolinux, isohybrid_mbr, ldlinux);
        merge_opts!(self.qemu, base.qemu, machine, memory_mib, cpus);
        merge_opts!(self.pxe, base.pxe, server, config);
        merge_opts!(self.boot, base.boot, systemd_boot, stub);
        // `key` and `key_command` are one choice: a child naming either
        // replaces the base's.
        if self.sign.key.is_none() && self.sign.key_command.is_none() {
            merge_opts!(self.sign, base.sign, key, key_command);
        }
        merge_opts!(self.secureboot, base.secureboot, key, cert, enroll);
        merge_opts!(self.disk, base.disk, esp_mib, root_slot_mib, data_mib, verity_on_corruption);
        self.appliance.inherit(&base.appliance);
    }
}

/// `[kernel] kind = "distro"` and its keys; `None` for a compiled kernel
/// (where the distro keys are errors, so a typo'd kind is not silently a
/// compiled kernel).
fn distro_spec(path: &Path, k: &KernelFile) -> Result<Option<crate::inputs::kernel::DistroSpec>, ProfileError> {
    let bad = |key: &str, message: String| ProfileError::Invalid { path: path.to_path_buf(), line: line_of(path, key), key: key.into(), message };
    match k.kind.as_deref() {
        None | Some("compiled") => {
            for (key, set) in [("kernel.package", k.package.is_some()), ("kernel.drivers", k.drivers.is_some()), ("kernel.modules", k.modules.is_some()), ("kernel.firmware", k.firmware.is_some())] {
                if set {
                    return Err(bad(key, "only a distro kernel takes this key; add `kind = \"distro\"` to [kernel]".into()));
                }
            }
            Ok(None)
        }
        Some("distro") => {
            let package = k.package.clone().ok_or_else(|| bad("kernel.kind", "a distro kernel needs `package = { deb = \"linux-image-<release>\", version = \"…\", sha256 = \"…\" }`".into()))?;
            let drivers = k.drivers.clone().unwrap_or_else(crate::inputs::distro::default_drivers);
            crate::inputs::distro::check_drivers(&drivers).map_err(|m| bad("kernel.drivers", m))?;
            for (i, fw) in k.firmware.iter().flatten().enumerate() {
                fw.validate().map_err(|m| bad("kernel.firmware", format!("firmware[{i}]: {m}")))?;
            }
            Ok(Some(crate::inputs::kernel::DistroSpec { package, drivers, modules: k.modules.clone().unwrap_or_default(), firmware: k.firmware.clone().unwrap_or_default() }))
        }
        Some(other) => Err(bad("kernel.kind", format!("`{other}` is not a kernel kind; use `compiled` (source + fragments) or `distro` (a Debian linux-image package)"))),
    }
}

// ---- The resolved profile the pipeline uses. ----

impl Profile {
    /// Whether the build makes a UKI: for a disk output, or for an update
    /// bundle of an image that boots with UEFI (not an armv7 board).
    pub fn identity(&self) -> crate::identity::Identity<'_> {
        crate::identity::Identity {
            profile: &self.path,
            name: &self.name,
            description: &self.description,
            arch: self.arch,
            version: self.version.as_deref(),
            board: self.board.as_ref().map(|b| b.name.as_str()),
            source_date_epoch: self.source_date_epoch,
            tree: &self.tree,
        }
    }

    pub fn wants_uki(&self) -> bool {
        self.outputs.iter().any(|o| o.needs_disk()) || (self.outputs.contains(&Output::Update) && self.board.is_none())
    }
}

#[derive(Debug, Clone)]
pub struct Profile {
    pub path: PathBuf,
    pub name: String,
    pub description: String,
    pub arch: Arch,
    pub outputs: Vec<Output>,
    /// `version`, checked to be one.
    pub version: Option<String>,
    pub source_date_epoch: u64,
    pub kernel: KernelSpec,
    pub busybox: Input,
    pub busybox_applets: Vec<String>,
    /// `[[rootfs.packages]]`, checked.
    pub packages: Vec<crate::inputs::packages::PackageSpec>,
    /// `[[rootfs.files]]`, checked.
    pub root_files: Vec<crate::inputs::rootfiles::RootFile>,
    pub payload: Payload,
    pub node_config: PathBuf,
    pub qemu: QemuSpec,
    /// systemd-boot and the stub; needed when an output needs the disk.
    pub boot: Option<(Input, Input)>,
    pub disk: crate::image::disk::DiskSpec,
    /// `[sign]`: where the signing key comes from.
    pub sign: crate::provenance::keys::KeySpec,
    /// The public key node configs must be signed with (`node.config_key`).
    pub config_key: Option<PathBuf>,
    /// `node.trust`: the HTTPS trust anchors' PEM files.
    pub trust: Vec<PathBuf>,
    /// `node.insecure_http_secrets`.
    pub insecure_http_secrets: bool,
    /// `node.debug_shell`.
    pub debug_shell: bool,
    pub iso: IsoSpec,
    /// `[pxe]`: where boot.ipxe points.
    pub pxe: crate::image::pxe::PxeSpec,
    /// `[appliance]`: images, manifests and charts baked into the root.
    pub appliance: crate::inputs::appliance::Spec,
    /// `[secureboot]`, when the profile has it.
    pub secureboot: Option<crate::image::secureboot::SecureBootSpec>,
    /// `board`: the armv7 board overlay, loaded.
    pub board: Option<crate::inputs::board::Board>,
    /// The kiln checkout holding kernel-configs/, overlays/, init/ …:
    /// `KILN_SOURCE_DIR`, else the one the profile or a profile it extends
    /// lives in.
    pub tree: PathBuf,
}


/// `[iso]`: the BIOS inputs are set together or not at all.
#[derive(Debug, Clone)]
pub struct IsoSpec {
    pub root_in_ram: bool,
    /// isolinux.bin, isohdpfx.bin, ldlinux.c32.
    pub bios: Option<(Input, Input, Input)>,
}

#[derive(Debug, Clone)]
pub struct QemuSpec {
    pub machine: crate::arch::Machine,
    pub memory_mib: u32,
    pub cpus: u32,
}

/// Loads a profile and everything it extends.
pub fn load(path: &Path) -> Result<Profile, ProfileError> {
    let mut chain: Vec<PathBuf> = Vec::new();
    let mut tree = None;
    let merged = load_chain(path, &mut chain, &mut tree)?;
    resolve(path, merged, tree)
}

/// The kiln source tree a file lives in: the nearest directory above it
/// holding kernel-configs/ and init/ (a kiln checkout).
pub fn tree_of(dir: &Path) -> Option<PathBuf> {
    dir.ancestors().find(|d| d.join("kernel-configs").is_dir() && d.join("init").is_dir()).map(Path::to_path_buf)
}

impl ProfileFile {
    /// Makes every path this file names absolute, relative to `dir`, the
    /// directory of this file: a profile extending it from elsewhere does
    /// not move them. Kernel fragments and patches are names under
    /// `kernel-configs/` of the kiln tree this file is in (`tree`), or files
    /// beside it.
    fn anchor_paths(&mut self, dir: &Path, tree: Option<&Path>) {
        let at = |s: &mut String| {
            if Path::new(s.as_str()).is_relative() {
                *s = dir.join(s.as_str()).display().to_string();
            }
        };
        let input = |i: &mut Option<Input>| {
            if let Some(f) = i.as_mut().and_then(|i| i.file.as_mut()).filter(|f| f.is_relative()) {
                *f = dir.join(&*f);
            }
        };
        for s in [&mut self.node.config, &mut self.node.config_key, &mut self.sign.key, &mut self.secureboot.key, &mut self.secureboot.cert].into_iter().flatten() {
            at(s);
        }
        for s in self.node.trust.iter_mut().flatten() {
            at(s);
        }
        if let Some(e) = self.secureboot.enroll.as_mut() {
            for s in [&mut e.pk, &mut e.kek, &mut e.db] {
                at(s);
            }
        }
        for i in [&mut self.kernel.source, &mut self.kernel.package, &mut self.rootfs.busybox, &mut self.payload.k0s, &mut self.boot.systemd_boot, &mut self.boot.stub, &mut self.iso.isolinux, &mut self.iso.isohybrid_mbr, &mut self.iso.ldlinux] {
            input(i);
        }
        for s in [&mut self.kernel.fragments, &mut self.kernel.patches].into_iter().flatten().flatten() {
            if Path::new(s.as_str()).is_relative() {
                let beside = dir.join(s.as_str());
                if beside.is_file() {
                    *s = beside.display().to_string();
                } else if let Some(t) = tree {
                    *s = t.join("kernel-configs").join(s.as_str()).display().to_string();
                }
            }
        }
        self.appliance.anchor(dir);
        for p in self.rootfs.packages.iter_mut().flatten() {
            p.anchor(dir);
        }
        for f in self.rootfs.files.iter_mut().flatten() {
            f.anchor(dir);
        }
    }
}

/// Loads `path` and its bases, each with its paths anchored to its own
/// directory. `tree` gets the kiln tree of the first file in the chain that
/// lives in one.
fn load_chain(path: &Path, chain: &mut Vec<PathBuf>, tree: &mut Option<PathBuf>) -> Result<ProfileFile, ProfileError> {
    let canon = path.canonicalize().map_err(|source| ProfileError::Read { path: path.to_path_buf(), source })?;
    if chain.contains(&canon) {
        return Err(ProfileError::Cycle { path: chain[0].clone(), again: path.to_path_buf() });
    }
    let dir = canon.parent().map(Path::to_path_buf).unwrap_or_default();
    chain.push(canon);
    let mut file = parse_file(path)?;
    let own_tree = tree_of(&dir);
    if tree.is_none() {
        tree.clone_from(&own_tree);
    }
    file.anchor_paths(&dir, own_tree.as_deref());
    if let Some(ext) = file.extends.clone() {
        let base_path = path.parent().unwrap_or(Path::new(".")).join(&ext);
        if !base_path.exists() {
            return Err(ProfileError::Invalid {
                path: path.to_path_buf(),
                line: line_of(path, "extends"),
                key: "extends".into(),
                message: format!("the base profile {} does not exist (paths are relative to this file)", base_path.display()),
            });
        }
        let base = load_chain(&base_path, chain, tree)?;
        file.inherit(&base);
    }
    Ok(file)
}

fn line_of(path: &Path, key: &str) -> usize {
    let Ok(src) = std::fs::read_to_string(path) else { return 1 };
    // Keys with dots of their own (`appliance.images."a.tar"`) or an index
    // (`appliance.charts[1].name`) first, then plain ones.
    key.match_indices('.')
        .find_map(|(i, _)| line_in_table(&src, &key[..i], &key[i + 1..]))
        .or_else(|| kiln_contract::config::line_of_key(&src, key))
        .unwrap_or(1)
}


/// Parses one file against the schema.
pub fn parse_file(path: &Path) -> Result<ProfileFile, ProfileError> {
    let src = std::fs::read_to_string(path).map_err(|source| ProfileError::Read { path: path.to_path_buf(), source })?;
    parse_str(path, &src)
}

pub fn parse_str(path: &Path, src: &str) -> Result<ProfileFile, ProfileError> {
    parse_toml(path, src)
}


fn resolve(path: &Path, f: ProfileFile, chain_tree: Option<PathBuf>) -> Result<Profile, ProfileError> {
    let missing = |key: &str| ProfileError::Semantic {
        path: path.to_path_buf(),
        message: format!("key `{key}` is not set here or in any profile this one extends"),
    };
    let abs = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let dir = abs.parent().unwrap_or(Path::new("/")).to_path_buf();
    // The kiln checkout: named by KILN_SOURCE_DIR, else the one the profile
    // (or the first profile it extends that is in one) lives in.
    let tree = match (std::env::var_os("KILN_SOURCE_DIR"), chain_tree) {
        (Some(d), _) => PathBuf::from(d),
        (None, Some(t)) => t,
        (None, None) => dir.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("..")),
    };
    let name = f.name.clone().ok_or_else(|| missing("name"))?;
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(ProfileError::Semantic { path: path.to_path_buf(), message: format!("key `name`: `{name}` must be letters, digits, - and _ (it names the output directory)") });
    }
    let arch = f.arch.ok_or_else(|| missing("arch"))?;
    let distro = distro_spec(path, &f.kernel)?;
    let fragments: Vec<PathBuf> = match (&f.kernel.fragments, &distro) {
        (Some(fr), _) => fr.iter().map(|p| tree.join("kernel-configs").join(p)).collect(),
        (None, Some(_)) => Vec::new(),
        (None, None) => return Err(missing("kernel.fragments")),
    };
    let patches: Vec<PathBuf> = f.kernel.patches.clone().unwrap_or_default().iter().map(|p| tree.join("kernel-configs").join(p)).collect();
    for (key, what, files) in [("kernel.fragments", "fragment", &fragments), ("kernel.patches", "patch", &patches)] {
        if let Some(fr) = files.iter().find(|fr| !fr.is_file()) {
            return Err(ProfileError::Invalid {
                path: path.to_path_buf(),
                line: line_of(path, key),
                key: key.into(),
                message: format!("kernel {what} {} does not exist", fr.display()),
            });
        }
    }
    let payload = match (f.payload.stand_in, f.payload.k0s.clone()) {
        (Some(true), None) => Payload::StandIn,
        (Some(true), Some(_)) => {
            return Err(ProfileError::Semantic { path: path.to_path_buf(), message: "key `payload`: set either `stand-in = true` or `k0s = { … }`, not both".into() })
        }
        (_, Some(input)) => Payload::K0s { input, version: f.payload.version.clone() },
        (_, None) => {
            return Err(ProfileError::Semantic {
                path: path.to_path_buf(),
                message: "key `payload.k0s`: no payload. Give real k0s as `[payload] k0s = { url = \"…\", sha256 = \"…\" }` (or `file =`), or `stand-in = true` for the test fixture".into(),
            })
        }
    };
    let node_config = dir.join(f.node.config.clone().ok_or_else(|| missing("node.config"))?);
    let inputs: Vec<(&str, &Input)> = [("kernel.source", f.kernel.source.as_ref()), ("kernel.package", f.kernel.package.as_ref()), ("rootfs.busybox", f.rootfs.busybox.as_ref())]
        .into_iter()
        .filter_map(|(k, i)| i.map(|i| (k, i)))
        .chain(match &payload {
            Payload::K0s { input, .. } => Some(("payload.k0s", input)),
            Payload::StandIn => None,
        })
        .collect();
    let outputs = f.outputs.clone().unwrap_or_else(|| vec![Output::Pxe]);
    // An update bundle carries a UKI, unless the image is for an armv7 board.
    let wants_disk = outputs.iter().any(|o| o.needs_disk()) || (outputs.contains(&Output::Update) && f.board.is_none());
    let version = match &f.version {
        Some(v) => Some(kiln_contract::update::Version::parse(v).map(|_| v.clone()).map_err(|m| ProfileError::Invalid { path: path.to_path_buf(), line: line_of(path, "version"), key: "version".into(), message: m })?),
        None if outputs.contains(&Output::Update) => {
            return Err(ProfileError::Invalid {
                path: path.to_path_buf(),
                line: line_of(path, "outputs"),
                key: "outputs".into(),
                message: "the `update` output needs the image's version: add `version = \"1.0.0\"` (nodes refuse bundles older than what they run)".into(),
            })
        }
        None => None,
    };
    let boot = match (f.boot.systemd_boot.clone(), f.boot.stub.clone()) {
        (Some(a), Some(b)) => Some((a, b)),
        _ if wants_disk => return Err(missing("boot.systemd_boot` and `boot.stub")),
        _ => None,
    };
    let mut inputs = inputs;
    if let Some((a, b)) = &boot {
        inputs.push(("boot.systemd_boot", a));
        inputs.push(("boot.stub", b));
    }
    let on_corruption = match &f.disk.verity_on_corruption {
        None => None,
        Some(s) => Some(s.parse().map_err(|_| ProfileError::Invalid {
            path: path.to_path_buf(),
            line: line_of(path, "disk.verity_on_corruption"),
            key: "disk.verity_on_corruption".into(),
            message: format!("`{s}` is not panic_on_corruption or restart_on_corruption"),
        })?),
    };
    let root_slot = match &f.disk.root_slot_mib {
        None => crate::image::disk::RootSlot::Auto,
        Some(SlotFile::Word(w)) if w == "auto" => crate::image::disk::RootSlot::Auto,
        Some(SlotFile::Mib(m)) if *m >= 1 => crate::image::disk::RootSlot::Mib(*m),
        Some(other) => {
            return Err(ProfileError::Invalid {
                path: path.to_path_buf(),
                line: line_of(path, "disk.root_slot_mib"),
                key: "disk.root_slot_mib".into(),
                message: format!("{} is not a size in MiB or \"auto\"", match other { SlotFile::Mib(m) => m.to_string(), SlotFile::Word(w) => format!("\"{w}\"") }),
            })
        }
    };
    let disk = crate::image::disk::DiskSpec {
        esp_mib: f.disk.esp_mib.unwrap_or(64),
        root_slot,
        data_mib: f.disk.data_mib.unwrap_or(64),
        on_corruption,
    };
    if disk.esp_mib < 34 {
        return Err(ProfileError::Semantic { path: path.to_path_buf(), message: "key `disk.esp_mib`: an ESP is FAT32 and needs at least 34 MiB".into() });
    }
    let root_in_ram = match f.iso.root.as_deref() {
        None | Some("medium") => false,
        Some("ram") => true,
        Some(other) => {
            return Err(ProfileError::Invalid { path: path.to_path_buf(), line: line_of(path, "iso.root"), key: "iso.root".into(), message: format!("`{other}` is not `medium` or `ram`") })
        }
    };
    let bios = match (f.iso.isolinux.clone(), f.iso.isohybrid_mbr.clone(), f.iso.ldlinux.clone()) {
        (Some(a), Some(b), Some(c)) => Some((a, b, c)),
        (None, None, None) => None,
        _ => return Err(ProfileError::Semantic { path: path.to_path_buf(), message: "keys `iso.isolinux`, `iso.isohybrid_mbr` and `iso.ldlinux`: BIOS boot needs all three, or none".into() }),
    };
    if bios.is_some() && arch != Arch::Amd64 {
        return Err(ProfileError::Semantic { path: path.to_path_buf(), message: format!("key `iso.isolinux`: BIOS boot is for amd64; this profile is {arch}") });
    }
    let appliance = crate::inputs::appliance::spec(&f.appliance, arch, f.payload.version.as_deref())
        .map_err(|e| ProfileError::Invalid { path: path.to_path_buf(), line: line_of(path, &e.key), key: e.key, message: e.message })?;
    if let Some((a, b, c)) = &bios {
        inputs.push(("iso.isolinux", a));
        inputs.push(("iso.isohybrid_mbr", b));
        inputs.push(("iso.ldlinux", c));
    }
    if f.sign.key.is_some() && f.sign.key_command.is_some() {
        return Err(ProfileError::Invalid { path: path.to_path_buf(), line: line_of(path, "sign.key_command"), key: "sign.key_command".into(), message: "give `sign.key` or `sign.key_command`, not both".into() });
    }
    if f.sign.key_command.as_ref().is_some_and(|c| c.first().is_none_or(|p| p.is_empty())) {
        return Err(ProfileError::Invalid { path: path.to_path_buf(), line: line_of(path, "sign.key_command"), key: "sign.key_command".into(), message: "needs a program, e.g. `[\"pass\", \"show\", \"kiln/signing-key\"]`".into() });
    }
    let packages = crate::inputs::packages::spec(f.rootfs.packages.as_deref().unwrap_or_default(), arch)
        .map_err(|e| ProfileError::Invalid { path: path.to_path_buf(), line: line_of(path, &e.key), key: e.key, message: e.message })?;
    let root_files = crate::inputs::rootfiles::spec(f.rootfs.files.as_deref().unwrap_or_default())
        .map_err(|e| ProfileError::Invalid { path: path.to_path_buf(), line: line_of(path, &e.key), key: e.key, message: e.message })?;
    let secureboot = secureboot_spec(path, &dir, &f.secureboot)?;
    if f.node.debug_shell == Some(true) && !f.rootfs.busybox_applets.iter().flatten().any(|a| a == "sh") {
        return Err(ProfileError::Invalid { path: path.to_path_buf(), line: line_of(path, "node.debug_shell"), key: "node.debug_shell".into(), message: "needs a shell in the root, but `sh` is not in rootfs.busybox_applets; add \"sh\" to it".into() });
    }
    let pxe = crate::image::pxe::PxeSpec::from_keys(f.pxe.server.as_deref(), f.pxe.config.as_deref())
        .map_err(|(key, message)| ProfileError::Invalid { path: path.to_path_buf(), line: line_of(path, key), key: key.into(), message })?;
    let board = board_spec(path, &tree, arch, &f, &outputs)?;
    let qemu = qemu_spec(path, arch, &f, &outputs)?;
    for (key, input) in inputs {
        input.validate().map_err(|m| ProfileError::Invalid { path: path.to_path_buf(), line: line_of(path, key), key: key.into(), message: m })?;
    }
    Ok(Profile {
        path: path.to_path_buf(),
        name,
        description: f.description.unwrap_or_default(),
        arch,
        outputs,
        version,
        source_date_epoch: source_date_epoch_from_env(std::env::var("SOURCE_DATE_EPOCH").ok().as_deref())?.or(f.source_date_epoch).unwrap_or(0),
        kernel: KernelSpec {
            source: match (&f.kernel.source, &distro) {
                (Some(s), _) => s.clone(),
                (None, Some(_)) => Input::default(),
                (None, None) => return Err(missing("kernel.source")),
            },
            base: f.kernel.base.unwrap_or_else(|| "tinyconfig".into()),
            fragments,
            patches,
            cmdline: f.kernel.cmdline.unwrap_or_default(),
            distro,
        },
        busybox: f.rootfs.busybox.ok_or_else(|| missing("rootfs.busybox"))?,
        busybox_applets: f.rootfs.busybox_applets.unwrap_or_default(),
        packages,
        root_files,
        payload,
        node_config,
        qemu,
        boot,
        disk,
        sign: crate::provenance::keys::KeySpec { key: f.sign.key.as_ref().map(|k| dir.join(k)), key_command: f.sign.key_command.clone(), profile: path.to_path_buf() },
        config_key: f.node.config_key.as_ref().map(|k| dir.join(k)),
        trust: f.node.trust.iter().flatten().map(|t| dir.join(t)).collect(),
        insecure_http_secrets: f.node.insecure_http_secrets.unwrap_or(false),
        debug_shell: f.node.debug_shell.unwrap_or(false),
        iso: IsoSpec { root_in_ram, bios },
        pxe,
        appliance,
        secureboot,
        board,
        tree,
    })
}

/// `[secureboot]` with its paths resolved; each named file must exist.
/// `[qemu]`: the machine `kiln run` boots the output on, checked against
/// the arch and the outputs, and its size.
fn qemu_spec(path: &Path, arch: Arch, f: &ProfileFile, outputs: &[Output]) -> Result<QemuSpec, ProfileError> {
    let bad = |key: &str, message: String| ProfileError::Invalid { path: path.to_path_buf(), line: line_of(path, key), key: key.into(), message };
    let machine = match &f.qemu.machine {
        Some(m) => crate::arch::Machine::parse(m, arch).map_err(|m| bad("qemu.machine", m))?,
        None => crate::arch::Machine::default_for(arch),
    };
    if machine.is_board() && !outputs.contains(&Output::Sdcard) {
        return Err(bad("qemu.machine", format!("`{machine}` is an emulated board that boots its SD card: add \"sdcard\" to `outputs`")));
    }
    let memory_mib = f.qemu.memory_mib.unwrap_or_else(|| machine.max_memory_mib().unwrap_or(2048));
    if memory_mib < 128 || machine.max_memory_mib().is_some_and(|max| memory_mib > max) {
        let max = machine.max_memory_mib().map(|m| format!(" and at most {m} on `{machine}`")).unwrap_or_default();
        return Err(bad("qemu.memory_mib", format!("{memory_mib} MiB: give at least 128{max}")));
    }
    let cpus = f.qemu.cpus.unwrap_or_else(|| machine.fixed_cpus().unwrap_or(2));
    match machine.fixed_cpus() {
        Some(n) if cpus != n => return Err(bad("qemu.cpus", format!("`{machine}` has {n} cores in QEMU; give {n} (or leave `cpus` out)"))),
        _ if !(1..=64).contains(&cpus) => return Err(bad("qemu.cpus", format!("{cpus}: give 1 to 64"))),
        _ => {}
    }
    Ok(QemuSpec { machine, memory_mib, cpus })
}

/// `board`, loaded, and checked against the arch and the outputs.
fn board_spec(path: &Path, tree: &Path, arch: Arch, f: &ProfileFile, outputs: &[Output]) -> Result<Option<crate::inputs::board::Board>, ProfileError> {
    let bad = |key: &str, message: String| ProfileError::Invalid { path: path.to_path_buf(), line: line_of(path, key), key: key.into(), message };
    let wants = outputs.contains(&Output::Sdcard);
    if wants && arch != Arch::Armv7 {
        return Err(bad("outputs", format!("the `sdcard` output is for armv7 boards; this profile is {arch}: use `disk`")));
    }
    let Some(name) = &f.board else {
        return match wants {
            true => Err(bad("outputs", "the `sdcard` output needs a `board = \"…\"` (a directory under overlays/boards/)".into())),
            false => Ok(None),
        };
    };
    if arch != Arch::Armv7 {
        return Err(bad("board", format!("board overlays are for armv7 SD cards; this profile is {arch}: remove `board`")));
    }
    let dir = tree.join("overlays/boards");
    if !dir.join(name).join(crate::inputs::board::FILE).is_file() {
        let mut known: Vec<String> = std::fs::read_dir(&dir).into_iter().flatten().flatten().filter(|e| e.path().join(crate::inputs::board::FILE).is_file()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        known.sort();
        return Err(bad("board", format!("no board overlay `{name}` in {} (there: {})", dir.display(), if known.is_empty() { "none".into() } else { known.join(", ") })));
    }
    crate::inputs::board::load_named(&dir, name).map(Some)
}

fn secureboot_spec(path: &Path, dir: &Path, f: &SecureBootFile) -> Result<Option<crate::image::secureboot::SecureBootSpec>, ProfileError> {
    if f.key.is_none() && f.cert.is_none() && f.enroll.is_none() {
        return Ok(None);
    }
    let file = |key: &str, rel: &str| {
        let p = dir.join(rel);
        if p.is_file() {
            Ok(p)
        } else {
            Err(ProfileError::Invalid { path: path.to_path_buf(), line: line_of(path, key), key: key.into(), message: format!("{} does not exist (paths are relative to this profile)", p.display()) })
        }
    };
    let Some(cert) = &f.cert else {
        return Err(ProfileError::Semantic { path: path.to_path_buf(), message: "key `secureboot.cert`: [secureboot] needs the db certificate (PEM) that the firmware trusts".into() });
    };
    let enroll = match &f.enroll {
        None => None,
        Some(e) => Some(crate::image::secureboot::Enroll {
            pk: file("secureboot.enroll", &e.pk)?,
            kek: file("secureboot.enroll", &e.kek)?,
            db: file("secureboot.enroll", &e.db)?,
            force: e.force,
        }),
    };
    Ok(Some(crate::image::secureboot::SecureBootSpec {
        // With the key in the environment, the file is not read.
        key: match f.key.as_deref() {
            Some(k) if std::env::var(crate::image::secureboot::KEY_ENV).is_ok_and(|v| !v.trim().is_empty()) => Some(dir.join(k)),
            k => k.map(|k| file("secureboot.key", k)).transpose()?,
        },
        cert: file("secureboot.cert", cert)?,
        enroll,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source tree with one kernel fragment, and the text of a minimal
    /// profile for it: `head` first, `tail` last.
    fn source_tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for dir in ["profiles", "kernel-configs"] {
            std::fs::create_dir_all(d.path().join(dir)).unwrap();
        }
        std::fs::write(d.path().join("kernel-configs/a.config"), "CONFIG_NET=y\n").unwrap();
        d
    }

    fn minimal(head: &str, tail: &str) -> String {
        let pin = "0".repeat(64);
        format!("{head}\nname = \"p\"\n[kernel]\nfragments = [\"a.config\"]\nsource = {{ file = \"/x\", sha256 = \"{pin}\" }}\n[rootfs]\nbusybox = {{ file = \"/b\", sha256 = \"{pin}\" }}\n[payload]\nstand-in = true\n[node]\nconfig = \"n.toml\"\n{tail}")
    }

    #[test]
    fn source_date_epoch_must_be_seconds() {
        assert_eq!(source_date_epoch_from_env(None).unwrap(), None);
        assert_eq!(source_date_epoch_from_env(Some("")).unwrap(), None);
        assert_eq!(source_date_epoch_from_env(Some("1700000000\n")).unwrap(), Some(1_700_000_000));
        for bad in ["2023-11-14", "-1", "1.5", "@1700000000"] {
            let e = source_date_epoch_from_env(Some(bad)).unwrap_err().to_string();
            assert!(e.contains(&format!("SOURCE_DATE_EPOCH=`{bad}`")) && e.contains("date +%s"), "{e}");
        }
    }

    #[test]
    fn distro_kernel_keys() {
        let d = source_tree();
        let pin = "0".repeat(64);
        let load_with = |kernel: &str| {
            let p = d.path().join("profiles/p.toml");
            std::fs::write(&p, format!("arch = \"amd64\"\nname = \"p\"\n[kernel]\n{kernel}\n[rootfs]\nbusybox = {{ file = \"/b\", sha256 = \"{pin}\" }}\n[payload]\nstand-in = true\n[node]\nconfig = \"n.toml\"\n")).unwrap();
            load(&p).map_err(|e| e.to_string())
        };
        let pkg = format!("package = {{ deb = \"linux-image-6.1.0-57-amd64\", version = \"6.1.192-3\", sha256 = \"{pin}\" }}");
        // Neither source nor fragments are needed; every class by default.
        let p = load_with(&format!("kind = \"distro\"\n{pkg}")).unwrap();
        let dist = p.kernel.distro.expect("a distro kernel");
        assert_eq!(dist.drivers, ["storage", "net", "usb", "virtio", "watchdog", "rtc"]);
        assert!(p.kernel.fragments.is_empty());
        let e = load_with(&format!("kind = \"distro\"\n{pkg}\ndrivers = [\"net\", \"gpu\"]")).unwrap_err();
        assert!(e.contains("kernel.drivers") && e.contains("unknown driver class `gpu`") && e.contains("storage, net"), "{e}");
        let e = load_with("kind = \"distro\"").unwrap_err();
        assert!(e.contains("kernel.kind") && e.contains("needs `package"), "{e}");
        let e = load_with(&format!("kind = \"debian\"\n{pkg}")).unwrap_err();
        assert!(e.contains("`debian` is not a kernel kind"), "{e}");
        // A distro key without the kind is an error, not a silently
        // compiled kernel.
        let e = load_with(&format!("fragments = [\"a.config\"]\nsource = {{ file = \"/x\", sha256 = \"{pin}\" }}\n{pkg}")).unwrap_err();
        assert!(e.contains("kernel.package") && e.contains("kind = \"distro\""), "{e}");
    }

    #[test]
    fn typo_names_file_line_key() {
        let e = parse_str(Path::new("p.toml"), "name = \"x\"\n[kernel]\nfragmets = []\n").unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("p.toml:3: key `fragmets`"), "{s}");
    }

    #[test]
    fn bad_value_names_key() {
        let e = parse_str(Path::new("p.toml"), "name = \"x\"\narch = \"sparc\"\n").unwrap_err();
        let s = e.to_string();
        assert!(s.contains("p.toml:2: key `arch`"), "{s}");
    }

    #[test]
    fn lines_of_dotted_and_indexed_keys() {
        let src = "name = \"x\"\n[appliance.images]\n\"a.tar\" = {}\n[[appliance.charts]]\nname = \"a\"\n[[appliance.charts]]\nname = \"b\"\n";
        assert_eq!(line_in_table(src, "appliance.images", "a.tar"), Some(3));
        assert_eq!(line_in_table(src, "appliance.charts[0]", "name"), Some(5));
        assert_eq!(line_in_table(src, "appliance.charts[1]", "name"), Some(7));
        assert_eq!(line_in_table(src, "appliance.charts[2]", "name"), None);
        assert_eq!(line_in_table(src, "appliance", "images"), None);
    }

    #[test]
    fn update_output_needs_a_version() {
        let d = source_tree();
        let profile = |head: &str| {
            let p = d.path().join("profiles/p.toml");
            std::fs::write(&p, minimal(head, "[boot]\nsystemd_boot = { file = \"/s\", sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\" }\nstub = { file = \"/t\", sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\" }\n")).unwrap();
            load(&p).map_err(|e| e.to_string())
        };
        let p = profile("arch = \"amd64\"\noutputs = [\"update\"]\nversion = \"1.2.10\"").unwrap();
        assert_eq!(p.outputs, vec![Output::Update]);
        assert_eq!(p.version.as_deref(), Some("1.2.10"));
        assert!(p.boot.is_some());
        let e = profile("arch = \"amd64\"\noutputs = [\"update\"]").unwrap_err();
        assert!(e.contains("p.toml:2: key `outputs`") && e.contains("needs the image's version") && e.contains("version = \"1.0.0\""), "{e}");
        let e = profile("arch = \"amd64\"\nversion = \"1.2-rc1\"").unwrap_err();
        assert!(e.contains("p.toml:2: key `version`") && e.contains("`1.2-rc1` is not a version"), "{e}");
        assert!(profile("arch = \"amd64\"").unwrap().version.is_none());
    }

    #[test]
    fn board_and_sdcard_are_for_armv7() {
        let d = source_tree();
        std::fs::create_dir_all(d.path().join("overlays/boards/testboard")).unwrap();
        std::fs::write(d.path().join("overlays/boards/testboard/board.toml"), "partition_table = \"mbr\"\nconsole = \"ttyS0,115200\"\n").unwrap();
        let profile = |head: &str| {
            let p = d.path().join("profiles/p.toml");
            std::fs::write(&p, minimal(head, "")).unwrap();
            load(&p).map_err(|e| e.to_string())
        };
        let p = profile("arch = \"armv7\"\nboard = \"testboard\"\noutputs = [\"sdcard\"]").unwrap();
        assert_eq!(p.board.as_ref().map(|b| b.name.as_str()), Some("testboard"));
        assert!(p.boot.is_none(), "an SD card needs no systemd-boot");
        assert!(profile("arch = \"armv7\"").unwrap().board.is_none());
        let e = profile("arch = \"amd64\"\nboard = \"testboard\"").unwrap_err();
        assert!(e.contains("p.toml:2: key `board`") && e.contains("armv7"), "{e}");
        let e = profile("arch = \"armv7\"\noutputs = [\"sdcard\"]").unwrap_err();
        assert!(e.contains("p.toml:2: key `outputs`") && e.contains("needs a `board"), "{e}");
        let e = profile("arch = \"arm64\"\noutputs = [\"sdcard\"]").unwrap_err();
        assert!(e.contains("key `outputs`") && e.contains("use `disk`"), "{e}");
        // An armv7 board's update bundle carries its kernel files, not a UKI.
        let p = profile("arch = \"armv7\"\nboard = \"testboard\"\nversion = \"1.2\"\noutputs = [\"sdcard\", \"update\"]").unwrap();
        assert!(p.boot.is_none() && p.version.as_deref() == Some("1.2"));
        let e = profile("arch = \"armv7\"\noutputs = [\"update\"]\nversion = \"1\"").unwrap_err();
        assert!(e.contains("key `boot.systemd_boot` and `boot.stub`"), "{e}");
        let e = profile("arch = \"armv7\"\nboard = \"cubieboard3\"").unwrap_err();
        assert!(e.contains("p.toml:2: key `board`") && e.contains("no board overlay `cubieboard3`") && e.contains("(there: testboard)"), "{e}");
        std::fs::write(d.path().join("overlays/boards/testboard/board.toml"), "partition_table = \"mbr\"\nconsol = 1\n").unwrap();
        let e = profile("arch = \"armv7\"\nboard = \"testboard\"").unwrap_err();
        assert!(e.contains("testboard/board.toml:2: key `consol`"), "{e}");
    }

    #[test]
    fn appliance_paths_follow_the_profile_that_sets_them() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("profiles");
        let vendor = d.path().join("vendor");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::create_dir_all(vendor.join("m")).unwrap();
        std::fs::create_dir_all(d.path().join("kernel-configs")).unwrap();
        std::fs::write(d.path().join("kernel-configs/a.config"), "CONFIG_NET=y\n").unwrap();
        let pin = "0".repeat(64);
        std::fs::write(
            base.join("base.toml"),
            format!("arch = \"amd64\"\nname = \"base\"\n[kernel]\nfragments = [\"a.config\"]\nsource = {{ file = \"/x\", sha256 = \"{pin}\" }}\n[rootfs]\nbusybox = {{ file = \"/b\", sha256 = \"{pin}\" }}\n[payload]\nstand-in = true\n[node]\nconfig = \"n.toml\"\n[[appliance.manifests]]\nstack = \"base\"\npath = \"m\"\n"),
        )
        .unwrap();
        std::fs::write(vendor.join("v.toml"), format!("extends = \"../profiles/base.toml\"\nname = \"v\"\n[appliance.images]\n\"app.tar\" = {{ file = \"app.tar\", sha256 = \"{pin}\" }}\n")).unwrap();
        // The tree (kernel-configs/) is the leaf profile's parent: `d`.
        let p = load(&vendor.join("v.toml")).unwrap();
        assert_eq!(p.appliance.manifests[0].path, base.canonicalize().unwrap().join("m"));
        assert_eq!(p.appliance.images[0].input.file.as_deref(), Some(vendor.canonicalize().unwrap().join("app.tar").as_path()));
        std::fs::write(vendor.join("bad.toml"), format!("extends = \"../profiles/base.toml\"\nname = \"v\"\n[appliance.images]\n\"ok.tar\" = {{ file = \"a\", sha256 = \"{pin}\" }}\n\"b/c.tar\" = {{ file = \"a\", sha256 = \"{pin}\" }}\n")).unwrap();
        let e = load(&vendor.join("bad.toml")).unwrap_err().to_string();
        assert!(e.contains("bad.toml:5: key `appliance.images.b/c.tar`"), "{e}");
    }

    #[test]
    fn qemu_machine_fits_the_arch_and_its_limits() {
        let d = source_tree();
        let profile = |head: &str, qemu: &str| {
            let p = d.path().join("profiles/q.toml");
            std::fs::write(&p, minimal(head, &format!("[qemu]\n{qemu}"))).unwrap();
            load(&p).map(|p| p.qemu).map_err(|e| e.to_string())
        };
        let q = profile("arch = \"arm64\"", "").unwrap();
        assert_eq!((q.machine, q.memory_mib, q.cpus), (crate::arch::Machine::Virt, 2048, 2));
        let e = profile("arch = \"amd64\"", "machine = \"virt\"\n").unwrap_err();
        assert!(e.contains("key `qemu.machine`") && e.contains("does not run amd64; for amd64 use q35"), "{e}");
        let e = profile("arch = \"armv7\"", "machine = \"raspi2b\"\n").unwrap_err();
        assert!(e.contains("`raspi2b` is not a QEMU machine kiln runs; for armv7 use virt or orangepi-pc"), "{e}");
        let e = profile("arch = \"armv7\"\noutputs = [\"pxe\"]", "machine = \"orangepi-pc\"\n").unwrap_err();
        assert!(e.contains("emulated board that boots its SD card"), "{e}");
    }

    #[test]
    fn rootfs_packages_are_checked_with_file_line_and_key() {
        let d = source_tree();
        let pin = "0".repeat(64);
        let profile = |packages: &str| {
            let p = d.path().join("profiles/p.toml");
            std::fs::write(&p, minimal("arch = \"amd64\"", packages)).unwrap();
            load(&p).map_err(|e| e.to_string())
        };
        let p = profile(&format!("[[rootfs.packages]]\ndeb = \"runc\"\nversion = \"1.1.5+ds1-1+deb12u1\"\nsha256 = \"{pin}\"\n[[rootfs.packages]]\ndeb = \"tzdata\"\nversion = \"2024a-0+deb12u1\"\narch = \"all\"\nsha256 = \"{pin}\"\nexclude = []\n")).unwrap();
        assert_eq!(p.packages.len(), 2);
        assert_eq!(p.packages[0].input.deb.as_deref(), Some("runc"));
        assert_eq!(p.packages[0].exclude, crate::inputs::packages::DEFAULT_EXCLUDE);
        assert!(p.packages[1].exclude.is_empty());
        assert_eq!(p.packages[1].file, None);
        let p = profile(&format!("[[rootfs.packages]]\ndeb = \"acme\"\nversion = \"1\"\nsha256 = \"{pin}\"\nfile = \"debs/acme.deb\"\n")).unwrap();
        assert_eq!(p.packages[0].file.as_deref(), Some(d.path().canonicalize().unwrap().join("profiles/debs/acme.deb").as_path()), "relative to the profile");
        assert!(profile("").unwrap().packages.is_empty());
        let e = profile(&format!("[[rootfs.packages]]\ndeb = \"runc\"\nversion = \"1\"\nsha256 = \"{pin}\"\n[[rootfs.packages]]\ndeb = \"libc6\"\nversion = \"2\"\narch = \"arm64\"\nsha256 = \"{pin}\"\n")).unwrap_err();
        assert!(e.contains("p.toml:19: key `rootfs.packages[1].arch`: `arm64` packages do not run on this amd64 image"), "{e}");
        let e = profile("[[rootfs.packages]]\ndeb = \"runc\"\nmember = \"usr/sbin/runc\"\n").unwrap_err();
        assert!(e.contains("p.toml:14: key `member`"), "{e}");
    }

    #[test]
    fn extends_merges_child_wins() {
        let d = tempfile::tempdir().unwrap();
        let profiles = d.path().join("profiles");
        std::fs::create_dir_all(&profiles).unwrap();
        std::fs::create_dir_all(d.path().join("kernel-configs")).unwrap();
        std::fs::write(d.path().join("kernel-configs/a.config"), "CONFIG_NET=y\n").unwrap();
        std::fs::write(
            profiles.join("base.toml"),
            "arch = \"amd64\"\nname = \"base\"\n[kernel]\nfragments = [\"a.config\"]\nsource = { file = \"/x.tar.xz\", sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\" }\n[rootfs]\nbusybox = { file = \"/bin/busybox\", sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\" }\n[payload]\nstand-in = true\n[node]\nconfig = \"n.toml\"\n",
        )
        .unwrap();
        std::fs::write(profiles.join("child.toml"), "extends = \"base.toml\"\nname = \"child\"\n[qemu]\nmemory_mib = 512\n").unwrap();
        let p = load(&profiles.join("child.toml")).unwrap();
        assert_eq!(p.name, "child");
        assert_eq!(p.arch, Arch::Amd64);
        assert_eq!(p.qemu.memory_mib, 512);
        assert_eq!(p.kernel.fragments.len(), 1);
        // Real k0s in a child replaces the base's stand-in, and back.
        let pin = "0".repeat(64);
        std::fs::write(profiles.join("real.toml"), format!("extends = \"base.toml\"\n[payload]\nk0s = {{ file = \"/k0s\", sha256 = \"{pin}\" }}\nversion = \"v1.30.14+k0s.0\"\n")).unwrap();
        let p = load(&profiles.join("real.toml")).unwrap();
        assert!(matches!(&p.payload, Payload::K0s { version: Some(v), .. } if v == "v1.30.14+k0s.0"), "{:?}", p.payload);
        std::fs::write(profiles.join("back.toml"), "extends = \"real.toml\"\n[payload]\nstand-in = true\n").unwrap();
        assert!(matches!(load(&profiles.join("back.toml")).unwrap().payload, Payload::StandIn));
        std::fs::write(profiles.join("loop.toml"), "extends = \"loop.toml\"\n").unwrap();
        assert!(matches!(load(&profiles.join("loop.toml")), Err(ProfileError::Cycle { .. })));
    }
}
