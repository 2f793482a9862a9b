//! A real-size payload fixture for tests and benchmarks (issue 20): a file
//! the size of k0s for the arch, and an airgap-like image tarball of a few
//! hundred MB. Both are generated from pinned Debian packages, never
//! committed, and named as fixtures: nothing here claims to be k0s.
//!
//! - `kiln-fixture-k0s-sized-<arch>`: a static Go ELF executable for the
//!   arch (kubectl) followed by other Go binaries of the same packages,
//!   cut at exactly [`elf_target`] bytes. Appended bytes keep it a valid
//!   ELF, and Go code compresses with zstd about as k0s does.
//! - `kiln-fixture-images-<arch>.tar`: what `docker save` writes (an OCI
//!   layout plus `manifest.json`), with gzip-compressed layers. Most layers
//!   hold whole .deb files, already compressed like a real bundle's layers,
//!   so gzip is cheap; a few hold raw Go binaries.
//!
//! The result is a cache entry keyed by the recipe, so only the first call
//! per arch pays (35-50 s cold, mostly apt-get); the sha256s are stored
//! beside it.

use crate::arch::Arch;
use crate::inputs::cache::Cache;
use crate::inputs::input::{resolve, Input};
use crate::inputs::packed::HashWriter;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Bump when the output changes for the same pins (layout, order, names).
pub const RECIPE: u32 = 1;

/// The fixture files of one arch, in the cache.
#[derive(Debug, Clone)]
pub struct RealSize {
    /// A static-ELF-headed file of k0s's size for the arch
    /// ([`elf_name`], [`elf_target`] bytes).
    pub elf: PathBuf,
    pub elf_sha256: String,
    /// An airgap-like image tarball with gzip'd layers ([`images_name`]).
    pub images: PathBuf,
    pub images_sha256: String,
}

pub fn elf_name(arch: Arch) -> String {
    format!("kiln-fixture-k0s-sized-{}", arch.as_str())
}

pub fn images_name(arch: Arch) -> String {
    format!("kiln-fixture-images-{}.tar", arch.as_str())
}

/// The size of the ELF fixture: k0s's static binary is about this big.
pub fn elf_target(arch: Arch) -> u64 {
    match arch {
        Arch::Amd64 => 240_000_000,
        Arch::Arm64 => 220_000_000,
        Arch::Armv7 => 180_000_000,
    }
}

/// One pinned .deb.
#[derive(Debug, Clone, Copy)]
pub struct Pin {
    pub package: &'static str,
    /// Debian architecture.
    pub arch: &'static str,
    pub version: &'static str,
    /// sha256 of the .deb.
    pub sha256: &'static str,
    /// Size of the .deb, for the record (not checked).
    pub size: u64,
}

/// The pins, from bookworm main. To refresh (apt dropped a version: the
/// error says which): for each package and arch,
/// `apt-cache policy PKG:ARCH` (the candidate), then
/// `apt-cache show PKG:ARCH=VERSION` (SHA256 and Size). The output changes,
/// so the cache key does too; check the sizes with the ignored test.
pub const PINS: &[Pin] = &[
    Pin { package: "kubernetes-client", arch: "amd64", version: "1.20.5+really1.20.2-1.1+deb12u1", sha256: "087c42dc26c847740043cdaa8b16db666be5591a1da957f822922aa1b677494e", size: 8293048 },
    Pin { package: "kubernetes-client", arch: "arm64", version: "1.20.5+really1.20.2-1.1+deb12u1", sha256: "a80869df8ac3c5a5b17056a049a6b9b4ad9b521ff331d99d6362ee6a6fef6d02", size: 7107004 },
    Pin { package: "kubernetes-client", arch: "armhf", version: "1.20.5+really1.20.2-1.1+deb12u1", sha256: "f82e9375658a81a012e8136f23aaab6fef977138d173b9f7c284c0efc57f257a", size: 7184424 },
    Pin { package: "containerd", arch: "amd64", version: "1.6.20~ds1-1+deb12u3", sha256: "8669d264eeb0fcdb4a0b1ba436ab88ec5dafde4a66e1278ec279d830db4c2216", size: 25903404 },
    Pin { package: "containerd", arch: "arm64", version: "1.6.20~ds1-1+deb12u3", sha256: "b946c7da94211c925fe8ed26fc0df4db045a976d7c8266c2ac107475a4ebee0f", size: 15438684 },
    Pin { package: "containerd", arch: "armhf", version: "1.6.20~ds1-1+deb12u3", sha256: "1854c935db53c3e6dd288d9326f0eace0aec020a0d31325ceb457eb08ac31eea", size: 15619872 },
    Pin { package: "docker.io", arch: "amd64", version: "20.10.24+dfsg1-1+deb12u1+b6", sha256: "daf8ff8f7aa53e8533d38e386fcc2a11e8f3891210776fb78a84b98feb4eea0e", size: 36256664 },
    Pin { package: "docker.io", arch: "arm64", version: "20.10.24+dfsg1-1+deb12u1+b6", sha256: "6db2efc4b346ad726c90bdecb630f02a4df884840c4a7e8fd44d92df313ae26c", size: 27505880 },
    Pin { package: "docker.io", arch: "armhf", version: "20.10.24+dfsg1-1+deb12u1+b6", sha256: "1d871f481a4ac90d1538ad16ce17aface2525ff62647541cea2330ce77157ab1", size: 28337992 },
    Pin { package: "runc", arch: "amd64", version: "1.1.5+ds1-1+deb12u1", sha256: "a00351f8c0318de0b424ecf5cd0fdb69880a89f3511cae4f6fff7de3e57881c5", size: 2709960 },
    Pin { package: "runc", arch: "arm64", version: "1.1.5+ds1-1+deb12u1", sha256: "9cd43580a5e01bbcb57b662aa94df63914ffde088e9f739324cf0d6fb87c38c0", size: 2337376 },
    Pin { package: "runc", arch: "armhf", version: "1.1.5+ds1-1+deb12u1", sha256: "8d6ce6db0c47576b44032a716f5593e5e681603b901df9944621922f404ed0c8", size: 2343448 },
    Pin { package: "golang-1.19-go", arch: "amd64", version: "1.19.8-2", sha256: "545123039b6c79e75cf2d86528781a825424cf33ce9d3f4513d772d7144cd531", size: 62705552 },
    Pin { package: "golang-1.19-go", arch: "arm64", version: "1.19.8-2", sha256: "c087d91b306be6cb69085a1fd5ba5a9c841c6e7a5c8d27705bb5a6928c6d3f74", size: 56586524 },
    Pin { package: "golang-1.19-go", arch: "armhf", version: "1.19.8-2", sha256: "98eac1617b34daeffc5ca5f73d63bda836be99fdaab7a091be78635eedbc71a9", size: 56895288 },
    Pin { package: "crowdsec", arch: "amd64", version: "1.4.6-6~deb12u1+b1", sha256: "cce2f051a567060bf30de412b141f5723c3ed59390805b9f10bebeeecf118f38", size: 31727504 },
    Pin { package: "crowdsec", arch: "arm64", version: "1.4.6-6~deb12u1+b1", sha256: "e5cb7e05c95af88ad1342aa0cc0682071f21b59ba405d57c6d4128c229f59043", size: 26541552 },
    Pin { package: "crowdsec", arch: "armhf", version: "1.4.6-6~deb12u1+b1", sha256: "59842da6b25fcb79ea8b6e3db3ea557c79cdaffa8df9db08b00ae945bcc8ccc5", size: 26265136 },
    Pin { package: "victoria-metrics", arch: "amd64", version: "1.79.5+ds1-2+b5", sha256: "bb437c10c5aa7c6a293acbb93828bd726dded618aa4bf3f4b45bef24c6d2f6f0", size: 23177580 },
    Pin { package: "victoria-metrics", arch: "arm64", version: "1.79.5+ds1-2+b5", sha256: "82f08b45f29ce24585e4e7d89acbe26a7a07af2dce99276c47edbfbe923fc8b6", size: 19716156 },
    Pin { package: "victoria-metrics", arch: "armhf", version: "1.79.5+ds1-2+b5", sha256: "23516897d9bb50b20dd4d175ffe862b9b15a9af57fec4cd840a6a791a769dc0a", size: 19897396 },
    Pin { package: "prometheus", arch: "amd64", version: "2.42.0+ds-5+deb12u1", sha256: "81d59a24fce84f7fbe97a45a4f2914b6a5881b5cd1db2a6a0e129e515e1a5f55", size: 19257088 },
    Pin { package: "prometheus", arch: "arm64", version: "2.42.0+ds-5+deb12u1", sha256: "ca131aa102390083398afbc80be9c8dd1dda78f9f92154fc00df8f7f1f4556e9", size: 16826400 },
    Pin { package: "prometheus", arch: "armhf", version: "2.42.0+ds-5+deb12u1", sha256: "69ac11f37513d3ea39504fc3ee4d93d44baff989c2d52fb3dbaf100185ca132a", size: 16941808 },
    Pin { package: "podman", arch: "amd64", version: "4.3.1+ds1-8+deb12u1+b3", sha256: "881ab556a1df5b911359c83a647597eb36c156a8615e754436e520a6ae0661ab", size: 10679784 },
    Pin { package: "podman", arch: "arm64", version: "4.3.1+ds1-8+deb12u1+b3", sha256: "ef75a5e3f39c9705ec7ad1d0a4e11ca81be3cb864fad631e89493538112126cb", size: 9197728 },
    Pin { package: "podman", arch: "armhf", version: "4.3.1+ds1-8+deb12u1+b3", sha256: "3567d21ab2094cabdc29d36d62a11e307b98f24861f93300b82579f43d8ba0aa", size: 9383092 },
    Pin { package: "etcd-server", arch: "amd64", version: "3.4.23-4+b4", sha256: "3a9445d4560ad6de1c375756b2a17d97713df44cbd20a658c871fe108af7ef5d", size: 8438488 },
    Pin { package: "etcd-server", arch: "arm64", version: "3.4.23-4+b4", sha256: "821e59be145fa42bd72b3e003d275640947c3d824b4c06b1ed2a01a631d555a1", size: 7620188 },
    Pin { package: "etcd-server", arch: "armhf", version: "3.4.23-4+b4", sha256: "442556c390f54f665d01e62e48ee0dbc99feb70ab003ce51cb9c0cf95f97573b", size: 7705984 },
];

/// The ELF fixture's parts, in order, taken until the target size (and
/// from the start again if they run out). The first must be a static
/// executable: kubectl is one in Debian on all three arches.
const ELF_PARTS: &[(&str, &str)] = &[
    ("kubernetes-client", "usr/bin/kubectl"),
    ("containerd", "usr/bin/containerd"),
    ("docker.io", "usr/sbin/dockerd"),
    ("docker.io", "usr/bin/docker"),
    ("containerd", "usr/bin/ctr"),
    ("containerd", "usr/bin/containerd-shim-runc-v2"),
    ("runc", "usr/sbin/runc"),
    ("docker.io", "usr/bin/dnet"),
];

/// What a layer holds: a whole .deb (under var/cache/apt/archives/), or one
/// file of a package at its own path.
#[derive(Debug, Clone, Copy)]
enum Part {
    Deb(&'static str),
    Member(&'static str, &'static str),
}

#[derive(Debug)]
struct Image {
    name: &'static str,
    layers: &'static [&'static [Part]],
}

use Part::{Deb, Member};

/// The images of the tarball (amd64: about 300 MB).
const IMAGES: &[Image] = &[
    Image { name: "kubectl", layers: &[&[Member("kubernetes-client", "usr/bin/kubectl")], &[Deb("kubernetes-client")]] },
    Image {
        name: "containerd",
        layers: &[&[Member("containerd", "usr/bin/containerd"), Member("containerd", "usr/bin/containerd-shim-runc-v2")], &[Deb("containerd"), Deb("runc")]],
    },
    Image { name: "docker", layers: &[&[Member("docker.io", "usr/sbin/dockerd"), Member("docker.io", "usr/bin/docker")], &[Deb("docker.io")]] },
    Image { name: "golang", layers: &[&[Deb("golang-1.19-go")]] },
    Image { name: "crowdsec", layers: &[&[Deb("crowdsec")]] },
    Image { name: "victoria-metrics", layers: &[&[Deb("victoria-metrics")]] },
    Image { name: "prometheus", layers: &[&[Deb("prometheus")], &[Deb("etcd-server"), Deb("podman")]] },
];

const GZIP_LEVEL: u32 = 6;
const SUMS: &str = "sums.json";

/// What is stored beside the files, so a hit needs no rehash.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Sums {
    key: String,
    elf: FileSum,
    images: FileSum,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct FileSum {
    name: String,
    size: u64,
    sha256: String,
}

/// The real-size fixture for `arch`, built on the first call (streamed,
/// a few MB of memory) and then found in the cache.
pub fn real_size(arch: Arch, cache: &Cache) -> Result<RealSize> {
    let key = recipe_key(arch);
    let dst = cache.entry("fixture-real-size", &key);
    if let Some(r) = cached(&dst, &key) {
        return Ok(r);
    }
    let started = std::time::Instant::now();
    tracing::info!("building the real-size fixture for {} (once per recipe)", arch.as_str());
    let mut inputs = Inputs { arch, cache, resolved: HashMap::new() };
    let tmp = cache.temp_dir().with_context(|| format!("creating a temp dir in the cache {}", cache.root().display()))?;

    let elf = write_elf(arch, &mut inputs, &tmp.path().join(elf_name(arch)))?;
    tracing::info!("fixture: {} written after {:.1?}", elf.name, started.elapsed());
    let images = write_images(arch, &mut inputs, tmp.path(), &images_name(arch))?;
    tracing::info!("fixture: {} written after {:.1?}", images.name, started.elapsed());
    let sums = Sums { key: key.clone(), elf, images };
    std::fs::write(tmp.path().join(SUMS), serde_json::to_vec_pretty(&sums)?).with_context(|| format!("writing {SUMS} in {}", tmp.path().display()))?;

    // Another process may have finished the same entry meanwhile.
    if let Some(r) = cached(&dst, &key) {
        return Ok(r);
    }
    cache.commit_dir(tmp, &dst).with_context(|| format!("moving the fixture into the cache at {}", dst.display()))?;
    tracing::info!("real-size fixture for {} built in {:.1?}: {}", arch.as_str(), started.elapsed(), dst.display());
    cached(&dst, &key).with_context(|| format!("the fixture at {} is incomplete right after building it; remove the directory and retry", dst.display()))
}

fn cached(dir: &Path, key: &str) -> Option<RealSize> {
    let sums: Sums = serde_json::from_slice(&std::fs::read(dir.join(SUMS)).ok()?).ok()?;
    let ok = |f: &FileSum| std::fs::metadata(dir.join(&f.name)).is_ok_and(|m| m.len() == f.size);
    (sums.key == key && ok(&sums.elf) && ok(&sums.images)).then(|| RealSize {
        elf: dir.join(&sums.elf.name),
        elf_sha256: sums.elf.sha256,
        images: dir.join(&sums.images.name),
        images_sha256: sums.images.sha256,
    })
}

/// `<arch>-<hash of the recipe>`: the pins, the parts and the sizes.
fn recipe_key(arch: Arch) -> String {
    let pins: Vec<&Pin> = PINS.iter().filter(|p| p.arch == arch.debian()).collect();
    let recipe = format!("{RECIPE}\n{}\n{}\n{GZIP_LEVEL}\n{pins:?}\n{ELF_PARTS:?}\n{IMAGES:?}", arch.as_str(), elf_target(arch));
    format!("{}-{}", arch.as_str(), &hex::encode(Sha256::digest(recipe.as_bytes()))[..16])
}

fn pin(package: &str, deb_arch: &str) -> Result<&'static Pin> {
    PINS.iter()
        .find(|p| p.package == package && p.arch == deb_arch)
        .with_context(|| format!("the fixture has no pin for {package}:{deb_arch}; add one to PINS in builder/src/tools/fixture.rs"))
}

/// The pinned packages, fetched through the input machinery (memoised).
struct Inputs<'a> {
    arch: Arch,
    cache: &'a Cache,
    resolved: HashMap<(&'static str, Option<&'static str>), PathBuf>,
}

impl Inputs<'_> {
    /// The .deb (`member` None) or one file of it, as a blob in the cache.
    fn get(&mut self, package: &'static str, member: Option<&'static str>) -> Result<PathBuf> {
        if let Some(p) = self.resolved.get(&(package, member)) {
            return Ok(p.clone());
        }
        let deb_arch = self.arch.debian();
        let pin = pin(package, deb_arch)?;
        let input = Input {
            deb: Some(package.into()),
            version: Some(pin.version.into()),
            arch: Some(deb_arch.into()),
            sha256: Some(pin.sha256.into()),
            member: member.map(Into::into),
            ..Default::default()
        };
        let name = format!("fixture.{package}{}", member.map(|m| format!(":{m}")).unwrap_or_default());
        let r = resolve(&name, &input, deb_arch, self.cache).with_context(|| {
            format!(
                "real-size fixture for {}: pinned package {package}={} ({deb_arch}). If apt no longer offers this version, refresh PINS in builder/src/tools/fixture.rs",
                self.arch.as_str(),
                pin.version
            )
        })?;
        self.resolved.insert((package, member), r.path.clone());
        Ok(r.path)
    }
}

/// Writes ELF_PARTS one after another to exactly `elf_target` bytes.
fn write_elf(arch: Arch, inputs: &mut Inputs, out: &Path) -> Result<FileSum> {
    let target = elf_target(arch);
    let (head_pkg, head_member) = ELF_PARTS[0];
    let head = inputs.get(head_pkg, Some(head_member))?;
    check_static_elf(&head, arch).with_context(|| format!("{head_pkg}:{head_member} cannot head the fixture; put a static executable first in ELF_PARTS"))?;

    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = HashWriter::new(BufWriter::with_capacity(1 << 20, file));
    // Parts in a row that added nothing: a whole round of them would loop forever.
    let mut idle = 0;
    for &(pkg, member) in ELF_PARTS.iter().cycle() {
        let left = target - w.size;
        if left == 0 {
            break;
        }
        if idle == ELF_PARTS.len() {
            bail!("the fixture's ELF parts are all empty");
        }
        let src = inputs.get(pkg, Some(member))?;
        let f = std::fs::File::open(&src).with_context(|| format!("opening {} ({pkg}:{member})", src.display()))?;
        let n = std::io::copy(&mut f.take(left), &mut w).with_context(|| format!("writing {}", out.display()))?;
        idle = if n == 0 { idle + 1 } else { 0 };
    }
    let (sha256, size) = w.finish().with_context(|| format!("writing {}", out.display()))?;
    Ok(FileSum { name: file_name(out), size, sha256 })
}

/// Checks that `path` is an ELF executable for `arch` without an
/// interpreter (a static binary).
fn check_static_elf(path: &Path, arch: Arch) -> Result<()> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = [0u8; 64];
    f.read_exact(&mut h).with_context(|| format!("{} is too short for an ELF", path.display()))?;
    if &h[..4] != b"\x7fELF" || h[5] != 1 {
        bail!("{} is not a little-endian ELF", path.display());
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let (e_type, machine) = (u16_at(&h, 16), u16_at(&h, 18));
    if e_type != 2 || machine != arch.elf_machine() {
        bail!("{}: ELF type {e_type}, machine {machine}; want an executable (2) for {} ({})", path.display(), arch.as_str(), arch.elf_machine());
    }
    let (phoff, phentsize, phnum) = match h[4] {
        1 => (u64::from(u32_at(&h, 28)), u16_at(&h, 42), u16_at(&h, 44)),
        2 => (u64::from_le_bytes(h[32..40].try_into().unwrap_or_default()), u16_at(&h, 54), u16_at(&h, 56)),
        c => bail!("{}: unknown ELF class {c}", path.display()),
    };
    let mut ph = vec![0u8; usize::from(phentsize) * usize::from(phnum)];
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(phoff)).and_then(|_| f.read_exact(&mut ph)).with_context(|| format!("{}: reading the program headers", path.display()))?;
    if phentsize >= 4 && ph.chunks(usize::from(phentsize)).any(|p| u32_at(p, 0) == 3) {
        bail!("{} is dynamically linked (it has PT_INTERP)", path.display());
    }
    Ok(())
}

/// A finished layer blob.
#[derive(Debug, Clone)]
struct Layer {
    /// The gzip'd blob, in the temp dir.
    path: PathBuf,
    digest: String,
    size: u64,
    /// sha256 of the uncompressed tar.
    diff_id: String,
}

/// A file to put in a layer.
struct LayerFile {
    path: String,
    src: PathBuf,
    mode: u32,
}

fn write_images(arch: Arch, inputs: &mut Inputs, dir: &Path, name: &str) -> Result<FileSum> {
    // Fetch everything first, then gzip the layers in parallel.
    let mut jobs: Vec<Vec<LayerFile>> = Vec::new();
    for image in IMAGES {
        for parts in image.layers {
            let mut files = Vec::new();
            for part in *parts {
                files.push(match *part {
                    Deb(pkg) => {
                        let pin = pin(pkg, arch.debian())?;
                        let version = pin.version.split_once(':').map_or(pin.version, |(_, v)| v);
                        LayerFile { path: format!("var/cache/apt/archives/{pkg}_{version}_{}.deb", pin.arch), src: inputs.get(pkg, None)?, mode: 0o644 }
                    }
                    Member(pkg, member) => LayerFile { path: member.to_string(), src: inputs.get(pkg, Some(member))?, mode: 0o755 },
                });
            }
            jobs.push(files);
        }
    }
    tracing::info!("fixture: {} layers to gzip", jobs.len());
    let blobs = dir.join("layers");
    std::fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
    let layers = gzip_layers(&jobs, &blobs)?;

    let mut layers = layers.into_iter();
    let mut images = Vec::new();
    for image in IMAGES {
        let tag = format!("kiln-fixture/{}:r{RECIPE}-{}", image.name, arch.as_str());
        let history = image.layers.iter().map(|parts| format!("kiln fixture: {}", parts.iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join(", "))).collect();
        images.push((tag, history, layers.by_ref().take(image.layers.len()).collect::<Vec<_>>()));
    }
    let out = dir.join(name);
    let sum = write_archive(arch, &images, &out)?;
    std::fs::remove_dir_all(&blobs).with_context(|| format!("removing {}", blobs.display()))?;
    Ok(sum)
}

/// Gzips the layers on a few threads; the result is in `jobs` order.
fn gzip_layers(jobs: &[Vec<LayerFile>], dir: &Path) -> Result<Vec<Layer>> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 4).min(jobs.len().max(1));
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<Option<Result<Layer>>>> = Mutex::new((0..jobs.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= jobs.len() {
                    break;
                }
                let r = write_layer(&jobs[i], &dir.join(format!("{i}.tar.gz")));
                let failed = r.is_err();
                if let Ok(mut d) = done.lock() {
                    d[i] = Some(r);
                }
                if failed {
                    next.store(jobs.len(), Ordering::Relaxed);
                }
            });
        }
    });
    let done = done.into_inner().map_err(|_| anyhow::anyhow!("a layer thread panicked"))?;
    done.into_iter().map(|r| r.unwrap_or_else(|| bail!("a layer was not written (an earlier layer failed)"))).collect()
}

/// A gzip'd tar of `files` (with their parent directories), entries sorted,
/// owner root, mtime 0.
fn write_layer(files: &[LayerFile], out: &Path) -> Result<Layer> {
    let mut entries: BTreeMap<String, Option<&LayerFile>> = BTreeMap::new();
    for f in files {
        let mut dir = String::new();
        for comp in f.path.split('/').collect::<Vec<_>>().split_last().map_or(&[][..], |(_, d)| d) {
            dir = format!("{dir}{comp}/");
            entries.insert(dir.clone(), None);
        }
        entries.insert(f.path.clone(), Some(f));
    }
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let gz = flate2::write::GzEncoder::new(HashWriter::new(BufWriter::with_capacity(1 << 20, file)), flate2::Compression::new(GZIP_LEVEL));
    let mut tar = tar::Builder::new(HashWriter::new(gz));
    for (path, f) in &entries {
        match f {
            None => append(&mut tar, path, tar::EntryType::Directory, 0o755, 0, std::io::empty())?,
            Some(f) => {
                let src = std::fs::File::open(&f.src).with_context(|| format!("opening {}", f.src.display()))?;
                let size = src.metadata().with_context(|| format!("reading {}", f.src.display()))?.len();
                append(&mut tar, path, tar::EntryType::Regular, f.mode, size, src)?;
            }
        }
    }
    let ctx = || format!("writing {}", out.display());
    let HashWriter { inner: gz, hash, .. } = tar.into_inner().with_context(ctx)?;
    let diff_id = hex::encode(hash.finalize());
    let gz = gz.finish().with_context(ctx)?;
    let (digest, size) = gz.finish().with_context(ctx)?;
    Ok(Layer { path: out.to_path_buf(), digest, size, diff_id })
}

fn append<W: Write>(tar: &mut tar::Builder<W>, path: &str, kind: tar::EntryType, mode: u32, size: u64, data: impl Read) -> Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path).with_context(|| format!("tar path {path}"))?;
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    tar.append(&h, data).with_context(|| format!("adding {path} to a tar"))
}

#[derive(Serialize)]
struct Descriptor {
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    digest: String,
    size: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<&'static str, String>,
}

#[derive(Serialize)]
struct OciManifest {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Serialize)]
struct OciIndex {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    manifests: Vec<Descriptor>,
}

#[derive(Serialize)]
struct DockerManifest {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags")]
    repo_tags: Vec<String>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

#[derive(Serialize)]
struct ImageConfig {
    architecture: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<&'static str>,
    os: &'static str,
    config: BTreeMap<String, String>,
    rootfs: RootFs,
    history: Vec<History>,
}

#[derive(Serialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<String>,
}

#[derive(Serialize)]
struct History {
    created: &'static str,
    created_by: String,
}

const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The tarball as `docker save` writes it: an OCI layout (oci-layout,
/// index.json, blobs/sha256/*) plus the docker-archive manifest.json.
fn write_archive(arch: Arch, images: &[(String, Vec<String>, Vec<Layer>)], out: &Path) -> Result<FileSum> {
    let (oci_arch, variant) = match arch {
        Arch::Amd64 => ("amd64", None),
        Arch::Arm64 => ("arm64", Some("v8")),
        Arch::Armv7 => ("arm", Some("v7")),
    };
    // Blobs by digest: a file on disk or bytes (the small json).
    let mut blobs: BTreeMap<String, Blob> = BTreeMap::new();
    let mut index = Vec::new();
    let mut docker = Vec::new();
    let blob_path = |d: &str| format!("blobs/sha256/{d}");
    for (tag, history, layers) in images {
        let config = ImageConfig {
            architecture: oci_arch,
            variant,
            os: "linux",
            config: BTreeMap::new(),
            rootfs: RootFs { kind: "layers", diff_ids: layers.iter().map(|l| format!("sha256:{}", l.diff_id)).collect() },
            history: history.iter().map(|h| History { created: "1970-01-01T00:00:00Z", created_by: h.clone() }).collect(),
        };
        let config = serde_json::to_vec(&config)?;
        let config_digest = hex::encode(Sha256::digest(&config));
        let manifest = OciManifest {
            schema_version: 2,
            media_type: "application/vnd.oci.image.manifest.v1+json",
            config: Descriptor { media_type: "application/vnd.oci.image.config.v1+json", digest: format!("sha256:{config_digest}"), size: config.len() as u64, annotations: BTreeMap::new() },
            layers: layers.iter().map(|l| Descriptor { media_type: LAYER_TYPE, digest: format!("sha256:{}", l.digest), size: l.size, annotations: BTreeMap::new() }).collect(),
        };
        let manifest = serde_json::to_vec(&manifest)?;
        let manifest_digest = hex::encode(Sha256::digest(&manifest));
        let reference = tag.rsplit_once(':').map_or("latest", |(_, t)| t).to_string();
        index.push(Descriptor {
            media_type: "application/vnd.oci.image.manifest.v1+json",
            digest: format!("sha256:{manifest_digest}"),
            size: manifest.len() as u64,
            annotations: BTreeMap::from([("io.containerd.image.name", format!("docker.io/{tag}")), ("org.opencontainers.image.ref.name", reference)]),
        });
        docker.push(DockerManifest { config: blob_path(&config_digest), repo_tags: vec![tag.clone()], layers: layers.iter().map(|l| blob_path(&l.digest)).collect() });
        for l in layers {
            blobs.insert(l.digest.clone(), Blob::File(l.path.clone(), l.size));
        }
        blobs.insert(config_digest, Blob::Bytes(config));
        blobs.insert(manifest_digest, Blob::Bytes(manifest));
    }
    let index = serde_json::to_vec(&OciIndex { schema_version: 2, media_type: "application/vnd.oci.image.index.v1+json", manifests: index })?;
    let docker = serde_json::to_vec(&docker)?;

    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut tar = tar::Builder::new(HashWriter::new(BufWriter::with_capacity(1 << 20, file)));
    append(&mut tar, "blobs/", tar::EntryType::Directory, 0o755, 0, std::io::empty())?;
    append(&mut tar, "blobs/sha256/", tar::EntryType::Directory, 0o755, 0, std::io::empty())?;
    for (digest, blob) in &blobs {
        match blob {
            Blob::Bytes(b) => append(&mut tar, &blob_path(digest), tar::EntryType::Regular, 0o644, b.len() as u64, &b[..])?,
            Blob::File(p, size) => {
                let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
                append(&mut tar, &blob_path(digest), tar::EntryType::Regular, 0o644, *size, f)?;
            }
        }
    }
    append(&mut tar, "index.json", tar::EntryType::Regular, 0o644, index.len() as u64, &index[..])?;
    append(&mut tar, "manifest.json", tar::EntryType::Regular, 0o644, docker.len() as u64, &docker[..])?;
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    append(&mut tar, "oci-layout", tar::EntryType::Regular, 0o644, layout.len() as u64, &layout[..])?;
    let (sha256, size) = tar.into_inner().and_then(HashWriter::finish).with_context(|| format!("writing {}", out.display()))?;
    Ok(FileSum { name: file_name(out), size, sha256 })
}

enum Blob {
    File(PathBuf, u64),
    Bytes(Vec<u8>),
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Arch; 3] = [Arch::Amd64, Arch::Arm64, Arch::Armv7];

    fn packages() -> Vec<&'static str> {
        let mut p: Vec<&str> = ELF_PARTS.iter().map(|(p, _)| *p).collect();
        for i in IMAGES {
            for l in i.layers {
                p.extend(l.iter().map(|part| match part {
                    Deb(p) | Member(p, _) => *p,
                }));
            }
        }
        p.sort();
        p.dedup();
        p
    }

    #[test]
    fn fixture_pins_cover_every_arch() {
        for arch in ALL {
            for pkg in packages() {
                let p = pin(pkg, arch.debian()).unwrap();
                assert_eq!(p.sha256.len(), 64, "{pkg}:{}", p.arch);
                assert!(p.sha256.chars().all(|c| c.is_ascii_hexdigit()), "{pkg}:{}", p.arch);
                assert!(!p.version.is_empty());
            }
        }
        for p in PINS {
            assert_eq!(PINS.iter().filter(|q| q.package == p.package && q.arch == p.arch).count(), 1, "{} pinned twice", p.package);
            assert!(packages().contains(&p.package), "{} is pinned but unused", p.package);
        }
    }

    #[test]
    fn fixture_names_sizes_and_keys() {
        assert_eq!(elf_name(Arch::Amd64), "kiln-fixture-k0s-sized-amd64");
        assert_eq!(images_name(Arch::Armv7), "kiln-fixture-images-armv7.tar");
        assert_eq!(elf_target(Arch::Amd64), 240_000_000);
        assert!(elf_target(Arch::Armv7) < elf_target(Arch::Arm64));
        let keys: Vec<String> = ALL.iter().map(|a| recipe_key(*a)).collect();
        assert!(keys[0].starts_with("amd64-") && keys[0] != keys[1] && keys[1] != keys[2]);
        assert_eq!(recipe_key(Arch::Amd64), keys[0]);
    }

    #[test]
    fn fixture_head_must_be_static() {
        let d = tempfile::tempdir().unwrap();
        let dynamic = d.path().join("dyn");
        std::fs::write(&dynamic, kiln_testkit::tiny_elf32("/lib/ld-linux-armhf.so.3", &["libc.so.6"], None)).unwrap();
        let e = format!("{:#}", check_static_elf(&dynamic, Arch::Armv7).unwrap_err());
        assert!(e.contains("dynamically linked"), "{e}");
        // The same file without its PT_INTERP header counts as static.
        let mut b = std::fs::read(&dynamic).unwrap();
        b[52 + 32..52 + 36].copy_from_slice(&6u32.to_le_bytes());
        let stat = d.path().join("static");
        std::fs::write(&stat, &b).unwrap();
        check_static_elf(&stat, Arch::Armv7).unwrap();
        assert!(check_static_elf(&stat, Arch::Arm64).is_err());
        std::fs::write(&stat, b"not an elf, but long enough to read a header from it, surely......").unwrap();
        assert!(check_static_elf(&stat, Arch::Amd64).is_err());
    }

    #[test]
    fn fixture_layers_are_deterministic() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        std::fs::write(&a, b"hello".repeat(1000)).unwrap();
        let files = || vec![LayerFile { path: "usr/bin/x".into(), src: a.clone(), mode: 0o755 }, LayerFile { path: "var/y.deb".into(), src: a.clone(), mode: 0o644 }];
        let one = write_layer(&files(), &d.path().join("1.tar.gz")).unwrap();
        let two = write_layer(&files(), &d.path().join("2.tar.gz")).unwrap();
        assert_eq!((one.digest.clone(), one.diff_id.clone()), (two.digest, two.diff_id));
        let bytes = std::fs::read(&one.path).unwrap();
        assert_eq!(hex::encode(Sha256::digest(&bytes)), one.digest);
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&bytes[..]).read_to_end(&mut raw).unwrap();
        assert_eq!(hex::encode(Sha256::digest(&raw)), one.diff_id);
        let names: Vec<String> = tar::Archive::new(&raw[..]).entries().unwrap().map(|e| e.unwrap().path().unwrap().to_string_lossy().to_string()).collect();
        assert_eq!(names, ["usr/", "usr/bin/", "usr/bin/x", "var/", "var/y.deb"]);
    }

    /// Builds (or finds) the amd64 fixture in the shared cache and checks it
    /// with file, tar and gzip. Slow when cold; run with `--ignored`.
    #[test]
    #[ignore]
    fn fixture_real_size_amd64() {
        real_size_checked(Arch::Amd64);
    }

    #[test]
    #[ignore]
    fn fixture_real_size_arm64() {
        real_size_checked(Arch::Arm64);
    }

    #[test]
    #[ignore]
    fn fixture_real_size_armv7() {
        real_size_checked(Arch::Armv7);
    }

    fn real_size_checked(arch: Arch) {
        let (Some(_), Some(_), Some(_)) = (kiln_testkit::checker("file", "file"), kiln_testkit::checker("tar", "tar"), kiln_testkit::checker("gzip", "gzip")) else {
            return;
        };
        let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("kiln=info").with_timer(tracing_subscriber::fmt::time::uptime()).try_init();
        let cache = Cache::default_location();
        let t = std::time::Instant::now();
        let r = real_size(arch, &cache).unwrap_or_else(|e| panic!("{e:#}"));
        eprintln!("{}: first call {:.1?}", arch.as_str(), t.elapsed());
        let t = std::time::Instant::now();
        let again = real_size(arch, &cache).unwrap();
        let warm = t.elapsed();
        eprintln!("{}: second call {warm:.1?}", arch.as_str());
        assert!(warm < std::time::Duration::from_secs(1));
        assert_eq!((again.elf_sha256.as_str(), again.images_sha256.as_str()), (r.elf_sha256.as_str(), r.images_sha256.as_str()));
        assert_eq!(r.elf.file_name().unwrap().to_str().unwrap(), elf_name(arch));

        let elf_size = std::fs::metadata(&r.elf).unwrap().len();
        assert_eq!(elf_size, elf_target(arch));
        let out = kiln_testkit::command("file").arg("-b").arg(&r.elf).output().unwrap();
        let what = String::from_utf8_lossy(&out.stdout).to_string();
        let machine = match arch {
            Arch::Amd64 => "x86-64",
            Arch::Arm64 => "aarch64",
            Arch::Armv7 => "ARM,",
        };
        assert!(what.starts_with("ELF") && what.contains("executable") && what.contains("statically linked") && what.contains(machine), "{what}");

        let images_size = std::fs::metadata(&r.images).unwrap().len();
        eprintln!("{}: elf {elf_size} bytes, images {images_size} bytes", arch.as_str());
        assert!(images_size > 200_000_000, "{images_size}");
        let out = kiln_testkit::command("tar").arg("-tf").arg(&r.images).output().unwrap();
        assert!(out.status.success());
        let list = String::from_utf8_lossy(&out.stdout).to_string();
        for name in ["manifest.json", "index.json", "oci-layout"] {
            assert!(list.lines().any(|l| l == name), "{name} missing from {list}");
        }
        let d = tempfile::tempdir().unwrap();
        let st = kiln_testkit::command("tar").arg("-xf").arg(&r.images).arg("-C").arg(d.path()).status().unwrap();
        assert!(st.success());
        let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(d.path().join("manifest.json")).unwrap()).unwrap();
        let layers: Vec<&str> = manifest.as_array().unwrap().iter().flat_map(|m| m["Layers"].as_array().unwrap().iter().map(|l| l.as_str().unwrap())).collect();
        assert!(layers.len() >= 5, "{layers:?}");
        for l in layers {
            let st = kiln_testkit::command("gzip").arg("-t").arg(d.path().join(l)).status().unwrap();
            assert!(st.success(), "gzip -t {l}");
        }
    }
}
