//! `sbom.spdx.json`: what an image is made of, as an SPDX 2.3 document.
//!
//! It lists the kernel (release, image sha256, source and .config hashes),
//! kiln-init and the payload with the crates they are built from (from
//! Cargo.lock, for the target), every input (Debian packages by name,
//! version, arch and sha256; files and URLs by sha256), and every artifact
//! of the output as an SPDX file with SHA1 and SHA256. Like the manifest it
//! has no wall-clock time and no random id: `created` is the build's
//! SOURCE_DATE_EPOCH and the namespace is derived from the content, so the
//! same build gives the same bytes.

use crate::inputs::cache::Cache;
use crate::provenance::crates::{self, CratesError, Graph};
use crate::inputs::input::{self, Resolved};
use crate::inputs::kernel::Kernel;
use crate::inputs::payload::Payload;
use crate::identity::Identity;
use crate::inputs::payload::Spec as PayloadSpec;
use serde_json::{json, Map, Value};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

pub const FILE: &str = "sbom.spdx.json";
pub const SIGNATURE: &str = "sbom.spdx.json.minisig";

#[derive(Debug, thiserror::Error)]
pub enum SbomError {
    #[error(transparent)]
    Crates(#[from] CratesError),
    #[error("SBOM: {1}: {0}")]
    Io(#[source] std::io::Error, String),
}

/// One file of the output.
#[derive(Debug, Clone)]
pub struct ArtifactFile {
    pub path: String,
    pub sha1: String,
    pub sha256: String,
}

/// The inputs the kernel is made from (a compiled kernel's source, a distro
/// kernel's package).
const KERNEL_INPUTS: &[&str] = &["kernel.source", "kernel.package"];

#[derive(Debug, Clone)]
pub struct KernelPart {
    pub release: String,
    pub image_sha256: String,
    pub config_sha256: String,
    pub cache_key: String,
    /// A distro kernel's package and shipped modules.
    pub distro: Option<crate::inputs::kernel::DistroKernel>,
}

/// A node binary built from this workspace.
#[derive(Debug, Clone)]
pub struct Binary {
    pub sha256: String,
    pub crates: Graph,
}

#[derive(Debug, Clone)]
pub enum PayloadPart {
    /// The test fixture from qemu-tests/.
    StandIn(Binary),
    /// Real k0s: the input `payload.k0s` in [`Sbom::inputs`].
    K0s { version: String },
}

/// Everything the document says, gathered from a build.
#[derive(Debug, Clone)]
pub struct Sbom {
    pub profile: String,
    pub description: String,
    pub arch: String,
    pub target: String,
    pub kiln_version: String,
    pub epoch: u64,
    pub kernel: KernelPart,
    pub inputs: Vec<Resolved>,
    pub init: Binary,
    pub payload: PayloadPart,
    pub artifacts: Vec<ArtifactFile>,
}

/// Gathers the SBOM of a build whose artifacts are in `dir`.
pub fn collect(id: &Identity, kernel: &Kernel, init_bin: &Path, payload_spec: &PayloadSpec, payload: &Payload, inputs: &[Resolved], dir: &Path, cache: &Cache) -> Result<Sbom, SbomError> {
    let io = |what: &Path| {
        let what = what.display().to_string();
        move |e| SbomError::Io(e, what)
    };
    let sha256 = |p: &Path| input::sha256_file(p).map(|(h, _)| h).map_err(io(p));
    let target = id.arch.rust_target();
    let init = Binary { sha256: sha256(init_bin)?, crates: crates::graph(id.tree, crate::inputs::init::PACKAGE, target, cache)? };
    let payload_part = match payload_spec {
        PayloadSpec::StandIn => PayloadPart::StandIn(Binary { sha256: sha256(&payload.path)?, crates: crates::graph(id.tree, crate::inputs::payload::STAND_IN_PACKAGE, target, cache)? }),
        PayloadSpec::K0s { .. } => PayloadPart::K0s { version: payload.version.clone() },
    };
    let files: Vec<(String, PathBuf)> = crate::provenance::manifest::files(dir).map_err(io(dir))?.into_iter().filter(|(path, _)| path != FILE && path != SIGNATURE).collect();
    // An image's files are large: hashed on every core, largest first.
    let mut order: Vec<usize> = (0..files.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(std::fs::metadata(&files[i].1).map_or(0, |m| m.len())));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(files.len().max(1));
    let mut sums: Vec<Option<std::io::Result<(String, String)>>> = (0..files.len()).map(|_| None).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut got = Vec::new();
                    loop {
                        let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&i) = order.get(k) else { break };
                        got.push((i, hash_both(&files[i].1)));
                    }
                    got
                })
            })
            .collect();
        for h in handles {
            for (i, r) in h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)) {
                sums[i] = Some(r);
            }
        }
    });
    let mut artifacts = Vec::new();
    for ((path, full), sum) in files.into_iter().zip(sums) {
        let (sha1, sha256) = sum.unwrap_or_else(|| Err(std::io::Error::other("not hashed"))).map_err(io(&full))?;
        artifacts.push(ArtifactFile { path, sha1, sha256 });
    }
    Ok(Sbom {
        profile: id.name.into(),
        description: id.description.into(),
        arch: id.arch.to_string(),
        target: target.into(),
        kiln_version: env!("CARGO_PKG_VERSION").into(),
        epoch: id.source_date_epoch,
        kernel: KernelPart { release: kernel.release.clone(), image_sha256: sha256(&kernel.image)?, config_sha256: sha256(&kernel.config)?, cache_key: kernel.key.clone(), distro: kernel.distro.clone() },
        inputs: inputs.to_vec(),
        init,
        payload: payload_part,
        artifacts,
    })
}

fn hash_both(path: &Path) -> std::io::Result<(String, String)> {
    let mut f = std::fs::File::open(path)?;
    let (mut a, mut b) = (Sha1::new(), Sha256::new());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = kiln_contract::stream::read_full(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        a.update(&buf[..n]);
        b.update(&buf[..n]);
    }
    Ok((hex::encode(a.finalize()), hex::encode(b.finalize())))
}

impl Sbom {
    /// Writes `dir/sbom.spdx.json` and returns its path.
    pub fn write(&self, dir: &Path) -> Result<PathBuf, SbomError> {
        let path = dir.join(FILE);
        std::fs::write(&path, self.to_json()).map_err(|e| SbomError::Io(e, path.display().to_string()))?;
        Ok(path)
    }

    /// The document, pretty-printed, ending in a newline.
    pub fn to_json(&self) -> String {
        let mut doc = self.document();
        // The namespace must be unique per document: derive it from
        // everything else, so a rebuild gives the same one.
        let digest = Sha256::digest(serde_json::to_vec(&doc).unwrap_or_default());
        doc["documentNamespace"] = json!(format!("urn:uuid:{}", uuid_from(&digest)));
        let mut s = serde_json::to_string_pretty(&doc).unwrap_or_default();
        s.push('\n');
        s
    }

    fn document(&self) -> Value {
        let mut d = Doc::default();
        let image = d.id("image", &[&self.profile]);
        d.rel("SPDXRef-DOCUMENT", "DESCRIBES", &image);

        // The artifacts, as files of the image package.
        let mut files = Vec::new();
        for a in &self.artifacts {
            let id = d.id("file", &[&a.path]);
            files.push(json!({
                "SPDXID": id,
                "fileName": format!("./{}", a.path),
                "checksums": [checksum("SHA1", &a.sha1), checksum("SHA256", &a.sha256)],
                "licenseConcluded": NOASSERTION,
                "copyrightText": NOASSERTION,
            }));
            d.rel(&image, "CONTAINS", &id);
        }
        let mut p = package(&image, &self.profile, &self.kiln_version);
        p.insert("filesAnalyzed".into(), json!(true));
        p.insert("packageVerificationCode".into(), json!({ "packageVerificationCodeValue": verification_code(&self.artifacts) }));
        p.insert("primaryPackagePurpose".into(), json!("OPERATING-SYSTEM"));
        let about = if self.description.is_empty() { String::new() } else { format!("{}. ", self.description.trim_end_matches('.')) };
        p.insert("description".into(), json!(format!("{about}kiln image of profile {} for {}, built by kiln {}; its files are the build output.", self.profile, self.arch, self.kiln_version)));
        d.packages.push(Value::Object(p));

        // The kernel, built from its source input.
        let kernel = d.id("kernel", &["linux", &self.kernel.release]);
        let mut p = package(&kernel, "linux", &self.kernel.release);
        p.insert("checksums".into(), json!([checksum("SHA256", &self.kernel.image_sha256)]));
        p.insert("externalRefs".into(), json!([purl(&format!("pkg:generic/linux@{}", purl_escape(&self.kernel.release)))]));
        p.insert("licenseDeclared".into(), json!("GPL-2.0-only"));
        p.insert("primaryPackagePurpose".into(), json!("OPERATING-SYSTEM"));
        let source = self.inputs.iter().find(|i| KERNEL_INPUTS.contains(&i.name.as_str()));
        let from = source.map(|s| format!("{} (sha256 {}{})", s.source, s.sha256, s.deb.as_ref().map(|d| format!(", in the .deb of sha256 {}", d.sha256)).unwrap_or_default())).unwrap_or_else(|| "its source".into());
        let how = if self.kernel.distro.is_some() { "taken by kiln from the distribution package" } else { "built by kiln from" };
        p.insert("sourceInfo".into(), json!(format!("{how} {from} with a .config of sha256 {}; kiln kernel cache key {}", self.kernel.config_sha256, self.kernel.cache_key)));
        let mut comment = format!("checksum: the kernel image. source_sha256={} config_sha256={} cache_key={}", source.map(|s| s.sha256.as_str()).unwrap_or("unknown"), self.kernel.config_sha256, self.kernel.cache_key);
        if let Some(d) = &self.kernel.distro {
            // Every module shipped, with its hash, and the firmware.
            comment.push_str(&format!("\nmodules ({}): {}", d.modules.len(), d.modules.iter().map(|m| format!("{}={}", m.path, m.sha256)).collect::<Vec<_>>().join(" ")));
            if !d.firmware.is_empty() {
                comment.push_str(&format!("\nfirmware: {}", d.firmware.join(" ")));
            }
        }
        p.insert("comment".into(), json!(comment));
        d.packages.push(Value::Object(p));
        d.rel(&image, "CONTAINS", &kernel);

        // kiln-init and the payload, with their crates.
        let init = d.id("binary", &["kiln-init"]);
        let mut p = self.binary_package(&init, "kiln-init", &self.init, &format!("PID 1 of the image (/sbin/kiln-init), a static executable for {}.", self.target));
        p.insert("sourceInfo".into(), json!(format!("built by kiln from the kiln-init crate of this kiln tree, for {}", self.target)));
        d.packages.push(Value::Object(p));
        d.rel(&image, "CONTAINS", &init);
        d.crates(&init, &self.init.crates);

        let k0s_input = self.inputs.iter().find(|i| i.name == "payload.k0s");
        match (&self.payload, k0s_input) {
            (PayloadPart::StandIn(bin), _) => {
                let id = d.id("binary", &["stand-in"]);
                let mut p = self.binary_package(
                    &id,
                    "kiln-stand-in",
                    bin,
                    "The stand-in payload: a kiln test fixture with the k0s command-line surface, installed as /usr/bin/k0s so that kiln-init starts it. It is not k0s and runs no Kubernetes.",
                );
                p.insert("sourceInfo".into(), json!(format!("built by kiln from the kiln-qemu-tests crate (binary `k0s`) of this kiln tree, for {}", self.target)));
                d.packages.push(Value::Object(p));
                d.rel(&image, "CONTAINS", &id);
                d.crates(&id, &bin.crates);
            }
            (PayloadPart::K0s { version }, input) => {
                let id = d.id("payload", &["k0s", version]);
                let mut p = package(&id, "k0s", version);
                let mut purl_text = format!("pkg:generic/k0s@{}", purl_escape(version));
                if let Some(i) = input {
                    p.insert("checksums".into(), json!([checksum("SHA256", &i.sha256)]));
                    p.insert("sourceInfo".into(), json!(format!("{} input {} (sha256 {})", i.kind, i.source, i.sha256)));
                    if i.kind == "url" {
                        if let Some(u) = download_location(&i.source) {
                            p.insert("downloadLocation".into(), json!(u));
                        }
                        purl_text.push_str(&format!("?download_url={}", purl_escape(&i.source)));
                    }
                }
                p.insert("externalRefs".into(), json!([purl(&purl_text)]));
                p.insert("primaryPackagePurpose".into(), json!("APPLICATION"));
                p.insert("description".into(), json!("The payload: k0s, installed as /usr/bin/k0s and started by kiln-init."));
                d.packages.push(Value::Object(p));
                d.rel(&image, "CONTAINS", &id);
            }
        }

        // The other inputs: Debian packages (one per .deb), files and URLs.
        let mut debs: Vec<(&input::DebPackage, Vec<&Resolved>)> = Vec::new();
        for i in self.inputs.iter().filter(|i| i.name != "payload.k0s") {
            match &i.deb {
                Some(deb) => match debs.iter_mut().find(|(d, _)| d.package == deb.package && d.sha256 == deb.sha256) {
                    Some((_, uses)) => uses.push(i),
                    None => debs.push((deb, vec![i])),
                },
                None => {
                    let id = d.id("input", &[&i.name]);
                    let version = i.version.clone().unwrap_or_else(|| NOASSERTION.into());
                    let mut p = package(&id, &i.name, &version);
                    p.insert("checksums".into(), json!([checksum("SHA256", &i.sha256)]));
                    p.insert("sourceInfo".into(), json!(format!("profile input {}: {} {}", i.name, i.kind, i.source)));
                    if i.kind == "url" {
                        if let Some(u) = download_location(&i.source) {
                            p.insert("downloadLocation".into(), json!(u));
                        }
                    }
                    let name = i.name.rsplit('.').next().unwrap_or(&i.name);
                    let at = i.version.as_deref().map(|v| format!("@{}", purl_escape(v))).unwrap_or_default();
                    p.insert("externalRefs".into(), json!([purl(&format!("pkg:generic/{}{at}?checksum=sha256:{}", purl_escape(name), i.sha256))]));
                    d.packages.push(Value::Object(p));
                    d.input_rel(&image, &kernel, &id, &[i]);
                }
            }
        }
        for (deb, uses) in debs {
            let version = deb.version.clone().unwrap_or_else(|| NOASSERTION.into());
            let id = d.id("deb", &[&deb.package, &version, &deb.arch]);
            let mut p = package(&id, &deb.package, &version);
            p.insert("supplier".into(), json!("Organization: Debian"));
            p.insert("checksums".into(), json!([checksum("SHA256", &deb.sha256)]));
            let at = deb.version.as_deref().map(|v| format!("@{}", purl_escape(v))).unwrap_or_default();
            p.insert("externalRefs".into(), json!([purl(&format!("pkg:deb/debian/{}{at}?arch={}", purl_escape(&deb.package), purl_escape(&deb.arch)))]));
            let used: Vec<String> = uses
                .iter()
                .map(|u| match &u.deb.as_ref().and_then(|d| d.member.clone()) {
                    Some(m) => format!("{} (member {m}, sha256 {})", u.name, u.sha256),
                    None => format!("{} (the whole .deb)", u.name),
                })
                .collect();
            p.insert("sourceInfo".into(), json!(format!("Debian package {}={version} for {}, fetched with apt-get download and checked against its sha256; used as {}", deb.package, deb.arch, used.join("; "))));
            d.packages.push(Value::Object(p));
            d.input_rel(&image, &kernel, &id, &uses);
        }

        // Crates, sorted by name and version.
        let mut crate_packages: Vec<Value> = d.crate_packages.values().cloned().collect();
        crate_packages.sort_by(|a, b| (a["name"].as_str(), a["versionInfo"].as_str()).cmp(&(b["name"].as_str(), b["versionInfo"].as_str())));
        d.packages.extend(crate_packages);

        let mut relationships = d.relationships;
        relationships.extend(d.depends.into_iter().map(|(a, b)| rel(&a, "DEPENDS_ON", &b)));
        let (y, mo, day, h, mi, s) = kiln_contract::date::civil(self.epoch);
        json!({
            "spdxVersion": "SPDX-2.3",
            "dataLicense": "CC0-1.0",
            "SPDXID": "SPDXRef-DOCUMENT",
            "name": format!("kiln-{}", self.profile),
            "documentNamespace": "",
            "creationInfo": {
                "created": format!("{y:04}-{mo:02}-{day:02}T{h:02}:{mi:02}:{s:02}Z"),
                "creators": [format!("Tool: kiln-{}", self.kiln_version)],
                "comment": "created is the build's SOURCE_DATE_EPOCH, not the wall clock, so that builds are reproducible",
            },
            "comment": format!(
                "What the kiln image {} is made of. Every file of the build output is listed with SHA1 and SHA256, except this document, {SIGNATURE}, manifest.json and manifest.json.minisig; manifest.json lists this document.",
                self.profile
            ),
            "packages": d.packages,
            "files": files,
            "relationships": relationships,
        })
    }

    fn binary_package(&self, id: &str, name: &str, bin: &Binary, description: &str) -> Map<String, Value> {
        let root = &bin.crates.crates[0];
        let mut p = package(id, name, &root.version);
        p.insert("checksums".into(), json!([checksum("SHA256", &bin.sha256)]));
        if let Some(l) = root.license.as_deref().and_then(license_expression) {
            p.insert("licenseDeclared".into(), json!(l));
        }
        p.insert("primaryPackagePurpose".into(), json!("APPLICATION"));
        p.insert("description".into(), json!(description));
        if !bin.crates.exact {
            p.insert("comment".into(), json!(format!("The crate list comes from Cargo.lock alone (cargo was not available to filter it for {}): it may name crates this binary does not contain.", self.target)));
        }
        p
    }
}

const NOASSERTION: &str = "NOASSERTION";

#[derive(Default)]
struct Doc {
    ids: BTreeSet<String>,
    packages: Vec<Value>,
    relationships: Vec<Value>,
    /// Crates by SPDX id, shared between the binaries.
    crate_packages: std::collections::BTreeMap<String, Value>,
    depends: BTreeSet<(String, String)>,
}

impl Doc {
    /// A new SPDX id, `SPDXRef-<kind>-<parts>` with only the characters
    /// SPDX allows, made unique.
    fn id(&mut self, kind: &str, parts: &[&str]) -> String {
        let clean: String = std::iter::once(kind)
            .chain(parts.iter().copied())
            .collect::<Vec<_>>()
            .join("-")
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '-' })
            .collect();
        let mut id = format!("SPDXRef-{clean}");
        let mut n = 2;
        while self.ids.contains(&id) {
            id = format!("SPDXRef-{clean}-{n}");
            n += 1;
        }
        self.ids.insert(id.clone());
        id
    }

    fn rel(&mut self, a: &str, ty: &str, b: &str) {
        self.relationships.push(rel(a, ty, b));
    }

    /// The kernel is generated from its source input; the image contains
    /// every other input.
    fn input_rel(&mut self, image: &str, kernel: &str, id: &str, uses: &[&Resolved]) {
        if uses.iter().any(|u| KERNEL_INPUTS.contains(&u.name.as_str())) {
            self.rel(kernel, "GENERATED_FROM", id);
        }
        if uses.iter().any(|u| !KERNEL_INPUTS.contains(&u.name.as_str())) {
            self.rel(image, "CONTAINS", id);
        }
    }

    /// The crates of a binary (its package is `root`), and who depends on whom.
    fn crates(&mut self, root: &str, g: &Graph) {
        let mut ids = vec![root.to_string()];
        for c in &g.crates[1..] {
            let key = format!("SPDXRef-crate-{}-{}", c.name, c.version).chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '-' }).collect::<String>();
            if !self.crate_packages.contains_key(&key) {
                self.ids.insert(key.clone());
                self.crate_packages.insert(key.clone(), Value::Object(crate_package(&key, c)));
            }
            ids.push(key);
        }
        for &(a, b) in &g.edges {
            if b != 0 {
                self.depends.insert((ids[a].clone(), ids[b].clone()));
            }
        }
    }
}

fn crate_package(id: &str, c: &crates::Crate) -> Map<String, Value> {
    let mut p = package(id, &c.name, &c.version);
    if let Some(sum) = &c.checksum {
        p.insert("checksums".into(), json!([checksum("SHA256", sum)]));
    }
    if c.from_crates_io() {
        p.insert("downloadLocation".into(), json!(format!("https://crates.io/api/v1/crates/{}/{}/download", c.name, c.version)));
        p.insert("externalRefs".into(), json!([purl(&format!("pkg:cargo/{}@{}", purl_escape(&c.name), purl_escape(&c.version)))]));
    }
    p.insert(
        "sourceInfo".into(),
        json!(match &c.source {
            Some(s) => format!("Rust crate from {s}; checksum from Cargo.lock"),
            None => "Rust crate of this kiln workspace".into(),
        }),
    );
    if let Some(l) = c.license.as_deref().and_then(license_expression) {
        p.insert("licenseDeclared".into(), json!(l));
    }
    p.insert("primaryPackagePurpose".into(), json!("LIBRARY"));
    if c.proc_macro {
        p.insert("comment".into(), json!("proc-macro: runs in the compiler while building; none of its code is in the binary"));
    }
    p
}

fn package(id: &str, name: &str, version: &str) -> Map<String, Value> {
    let mut p = Map::new();
    p.insert("SPDXID".into(), json!(id));
    p.insert("name".into(), json!(name));
    p.insert("versionInfo".into(), json!(version));
    p.insert("supplier".into(), json!(NOASSERTION));
    p.insert("downloadLocation".into(), json!(NOASSERTION));
    p.insert("filesAnalyzed".into(), json!(false));
    p.insert("licenseConcluded".into(), json!(NOASSERTION));
    p.insert("licenseDeclared".into(), json!(NOASSERTION));
    p.insert("copyrightText".into(), json!(NOASSERTION));
    p
}

fn checksum(alg: &str, value: &str) -> Value {
    json!({ "algorithm": alg, "checksumValue": value })
}

fn purl(locator: &str) -> Value {
    json!({ "referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl", "referenceLocator": locator })
}

fn rel(a: &str, ty: &str, b: &str) -> Value {
    json!({ "spdxElementId": a, "relationshipType": ty, "relatedSpdxElement": b })
}

/// Percent-encodes what a purl component must not hold raw (`+` in Debian
/// and semver versions above all); `:` and `/` stay, as in the purl spec's
/// examples (`pkg:deb/debian/attr@1:2.4.47-2`).
fn purl_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' | b'~' | b':' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// SPDX's check of a download location wants a host name ending in a
/// letters-only label; anything else (an IP address, a port-only host) is
/// recorded in sourceInfo instead.
fn download_location(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"))?;
    let host = rest.split(['/', '?', '#']).next()?.rsplit('@').next()?;
    let host = host.split(':').next()?;
    let tld = host.rsplit('.').next()?;
    let ok = host.contains('.') && (2..=5).contains(&tld.len()) && tld.bytes().all(|b| b.is_ascii_alphabetic()) && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    ok.then(|| url.to_string())
}

/// A crate's `license` field as an SPDX expression, when every identifier is
/// one SPDX knows; cargo's old `MIT/Apache-2.0` form is read as OR.
fn license_expression(l: &str) -> Option<String> {
    const KNOWN: &[&str] = &[
        "MIT", "MIT-0", "Apache-2.0", "BSD-2-Clause", "BSD-3-Clause", "ISC", "Zlib", "0BSD", "Unicode-3.0", "Unicode-DFS-2016", "MPL-2.0", "CC0-1.0", "Unlicense", "BSL-1.0", "LLVM-exception", "GPL-2.0-only",
        "GPL-2.0-or-later", "LGPL-2.1-or-later",
    ];
    let expr = l.trim().replace('/', " OR ");
    let ok = !expr.is_empty() && expr.replace(['(', ')'], " ").split_whitespace().all(|t| matches!(t, "AND" | "OR" | "WITH") || KNOWN.contains(&t));
    ok.then_some(expr)
}

/// SPDX's package verification code: SHA1 of the sorted SHA1s of its files.
fn verification_code(files: &[ArtifactFile]) -> String {
    let mut sums: Vec<&str> = files.iter().map(|f| f.sha1.as_str()).collect();
    sums.sort_unstable();
    hex::encode(Sha1::digest(sums.concat().as_bytes()))
}

/// An RFC 9562 version 8 (custom) UUID from the first 16 bytes of a digest.
fn uuid_from(digest: &[u8]) -> String {
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// The SBOM checks of `kiln verify`: its signature, and that the files it
/// lists are the manifest's artifacts with the same sha256.
pub fn verify(dir: &Path, key: &crate::provenance::sign::PublicKey, listed: &[(String, String, u64)], ok: &mut Vec<String>, problems: &mut Vec<String>) {
    let path = dir.join(FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        // Not there: the artifact check already names it when the manifest lists it.
        Err(_) => return,
    };
    match std::fs::read_to_string(dir.join(SIGNATURE)) {
        Ok(sig) => match key.verify(&bytes, &sig) {
            Ok(comment) => ok.push(format!("{FILE}: signature ok ({comment})")),
            Err(e) => problems.push(format!("{SIGNATURE}: does not verify {FILE}: {e}")),
        },
        Err(e) => problems.push(format!("{SIGNATURE}: {e}")),
    }
    let doc: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            problems.push(format!("{FILE}: not valid JSON: {e}"));
            return;
        }
    };
    if doc["spdxVersion"] != "SPDX-2.3" {
        problems.push(format!("{FILE}: spdxVersion is {}, not SPDX-2.3", doc["spdxVersion"]));
    }
    let mut seen = BTreeSet::new();
    for f in doc["files"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let name = f["fileName"].as_str().unwrap_or_default();
        let path = name.strip_prefix("./").unwrap_or(name);
        let sha = f["checksums"].as_array().and_then(|c| c.iter().find(|c| c["algorithm"] == "SHA256")).and_then(|c| c["checksumValue"].as_str()).unwrap_or_default();
        match listed.iter().find(|(p, _, _)| p == path) {
            Some((_, want, _)) if want == sha => {}
            Some((_, want, _)) => problems.push(format!("{FILE}: lists {path} with sha256 {sha}, but manifest.json has {want}")),
            None => problems.push(format!("{FILE}: lists {path}, which manifest.json does not")),
        }
        seen.insert(path.to_string());
    }
    for (p, _, _) in listed {
        if p != FILE && p != SIGNATURE && !seen.contains(p) {
            problems.push(format!("{p}: not in {FILE}"));
        }
    }
    if problems.iter().all(|p| !p.starts_with(FILE)) {
        ok.push(format!("{FILE}: lists every artifact with the manifest's sha256"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provenance::crates::Crate;
    use std::process::Command;

    fn krate(name: &str, version: &str, source: Option<&str>, license: &str) -> Crate {
        Crate {
            name: name.into(),
            version: version.into(),
            source: source.map(str::to_string),
            checksum: source.map(|_| input::sha256_bytes(name.as_bytes())),
            license: Some(license.into()),
            proc_macro: name.ends_with("_derive"),
        }
    }

    const CRATES_IO: &str = "registry+https://github.com/rust-lang/crates.io-index";

    fn deb(name: &str, package: &str, version: &str, arch: &str, member: &str) -> Resolved {
        let deb_sha = input::sha256_bytes(package.as_bytes());
        Resolved {
            name: name.into(),
            kind: "deb",
            source: format!("{package}:{arch}={version}"),
            version: Some(version.into()),
            sha256: input::sha256_bytes(member.as_bytes()),
            size: 10,
            deb: Some(input::DebPackage { package: package.into(), version: Some(version.into()), arch: arch.into(), sha256: deb_sha, member: Some(member.into()) }),
            path: PathBuf::new(),
        }
    }

    /// An SBOM like a qemu-amd64 build's, from made-up hashes.
    fn sample(payload: PayloadPart, extra_input: Option<Resolved>) -> Sbom {
        let init = Graph {
            crates: vec![
                krate("kiln-init", "0.1.0", None, "Apache-2.0"),
                krate("serde", "1.0.229", Some(CRATES_IO), "MIT OR Apache-2.0"),
                krate("serde_derive", "1.0.229", Some(CRATES_IO), "MIT/Apache-2.0"),
                krate("unicode-ident", "1.0.27", Some(CRATES_IO), "(MIT OR Apache-2.0) AND Unicode-3.0"),
                krate("odd", "0.1.0+build.5", Some(CRATES_IO), "Some-Custom-License"),
            ],
            edges: [(0, 1), (1, 2), (2, 3), (0, 4)].into_iter().collect(),
            exact: true,
        };
        let mut inputs = vec![
            deb("kernel.source", "linux-source-6.1", "6.1.158-1", "all", "usr/src/linux-source-6.1.tar.xz"),
            deb("rootfs.busybox", "busybox-static", "1:1.35.0-4+deb12u1+b1", "amd64", "bin/busybox"),
            deb("boot.systemd_boot", "systemd-boot-efi", "252.39-1~deb12u2", "amd64", "usr/lib/systemd/boot/efi/systemd-bootx64.efi"),
            deb("boot.stub", "systemd-boot-efi", "252.39-1~deb12u2", "amd64", "usr/lib/systemd/boot/efi/linuxx64.efi.stub"),
        ];
        inputs.extend(extra_input);
        Sbom {
            profile: "qemu-amd64".into(),
            description: "amd64 node for QEMU".into(),
            arch: "amd64".into(),
            target: "x86_64-unknown-linux-musl".into(),
            kiln_version: "0.1.0".into(),
            epoch: 1_700_000_000,
            kernel: KernelPart { release: "6.1.158".into(), image_sha256: "a".repeat(64), config_sha256: "b".repeat(64), cache_key: "c".repeat(64), distro: None },
            inputs,
            init: Binary { sha256: "0".repeat(64), crates: init },
            payload,
            artifacts: ["disk.raw", "pxe/vmlinuz", "pxe/initramfs.cpio.zst", "weird name+1.iso"]
                .iter()
                .map(|p| ArtifactFile { path: p.to_string(), sha1: hex::encode(Sha1::digest(p.as_bytes())), sha256: input::sha256_bytes(p.as_bytes()) })
                .collect(),
        }
    }

    fn stand_in() -> PayloadPart {
        PayloadPart::StandIn(Binary {
            sha256: "d".repeat(64),
            crates: Graph { crates: vec![krate("kiln-qemu-tests", "0.1.0", None, "Apache-2.0"), krate("serde", "1.0.229", Some(CRATES_IO), "MIT OR Apache-2.0")], edges: [(0, 1)].into_iter().collect(), exact: false },
        })
    }

    fn packages(doc: &Value) -> Vec<&Value> {
        doc["packages"].as_array().unwrap().iter().collect()
    }

    fn find<'a>(doc: &'a Value, name: &str) -> &'a Value {
        packages(doc).into_iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("no package {name}"))
    }

    fn purl_of(p: &Value) -> &str {
        p["externalRefs"][0]["referenceLocator"].as_str().unwrap()
    }

    fn has_rel(doc: &Value, a: &str, ty: &str, b: &str) -> bool {
        doc["relationships"].as_array().unwrap().iter().any(|r| r["spdxElementId"] == a && r["relationshipType"] == ty && r["relatedSpdxElement"] == b)
    }

    /// pyspdxtools (spdx-tools from PyPI, installed by scripts/setup.sh).
    /// Missing on CI is a failure; on a workstation, a skip.
    pub(crate) fn pyspdxtools(file: &Path) -> Option<(bool, String)> {
        let tool = kiln_testkit::checker("pyspdxtools", "python3 -m pip install spdx-tools")?;
        let out = Command::new(tool).arg("-i").arg(file).output().expect("running pyspdxtools");
        Some((out.status.success(), kiln_testkit::output_text(&out)))
    }

    #[test]
    fn names_what_the_image_is_made_of() {
        let s = sample(stand_in(), None);
        let doc: Value = serde_json::from_str(&s.to_json()).unwrap();
        assert_eq!(doc["spdxVersion"], "SPDX-2.3");
        assert_eq!(doc["creationInfo"]["created"], "2023-11-14T22:13:20Z");
        assert!(doc["documentNamespace"].as_str().unwrap().starts_with("urn:uuid:"));

        let linux = find(&doc, "linux");
        assert_eq!(linux["versionInfo"], "6.1.158");
        assert_eq!(purl_of(linux), "pkg:generic/linux@6.1.158");
        assert!(linux["comment"].as_str().unwrap().contains(&format!("config_sha256={}", "b".repeat(64))));
        let src = find(&doc, "linux-source-6.1");
        assert!(has_rel(&doc, linux["SPDXID"].as_str().unwrap(), "GENERATED_FROM", src["SPDXID"].as_str().unwrap()));

        let bb = find(&doc, "busybox-static");
        assert_eq!(bb["versionInfo"], "1:1.35.0-4+deb12u1+b1");
        assert_eq!(purl_of(bb), "pkg:deb/debian/busybox-static@1:1.35.0-4%2Bdeb12u1%2Bb1?arch=amd64");
        assert_eq!(bb["checksums"][0]["checksumValue"], input::sha256_bytes(b"busybox-static"));
        assert_eq!(bb["supplier"], "Organization: Debian");
        // One package per .deb, naming both members used.
        let sd: Vec<_> = packages(&doc).into_iter().filter(|p| p["name"] == "systemd-boot-efi").collect();
        assert_eq!(sd.len(), 1);
        let info = sd[0]["sourceInfo"].as_str().unwrap();
        assert!(info.contains("boot.systemd_boot") && info.contains("boot.stub"), "{info}");

        let init = find(&doc, "kiln-init");
        assert_eq!(init["licenseDeclared"], "Apache-2.0");
        let serde = find(&doc, "serde");
        assert_eq!(purl_of(serde), "pkg:cargo/serde@1.0.229");
        assert_eq!(serde["downloadLocation"], "https://crates.io/api/v1/crates/serde/1.0.229/download");
        assert!(has_rel(&doc, init["SPDXID"].as_str().unwrap(), "DEPENDS_ON", serde["SPDXID"].as_str().unwrap()));
        assert_eq!(find(&doc, "serde_derive")["licenseDeclared"], "MIT OR Apache-2.0");
        assert!(find(&doc, "serde_derive")["comment"].as_str().unwrap().contains("proc-macro"));
        assert_eq!(find(&doc, "odd")["licenseDeclared"], "NOASSERTION");
        assert_eq!(purl_of(find(&doc, "odd")), "pkg:cargo/odd@0.1.0%2Bbuild.5");
        // serde is shared by both binaries: one package, two dependents.
        assert_eq!(packages(&doc).iter().filter(|p| p["name"] == "serde").count(), 1);
        let stand_in = find(&doc, "kiln-stand-in");
        assert!(stand_in["description"].as_str().unwrap().contains("not k0s"));
        assert!(stand_in["comment"].as_str().unwrap().contains("Cargo.lock alone"));
        assert!(has_rel(&doc, stand_in["SPDXID"].as_str().unwrap(), "DEPENDS_ON", serde["SPDXID"].as_str().unwrap()));
        assert!(packages(&doc).iter().all(|p| p["name"] != "k0s"));

        let image = find(&doc, "qemu-amd64");
        let image_id = image["SPDXID"].as_str().unwrap();
        assert!(has_rel(&doc, "SPDXRef-DOCUMENT", "DESCRIBES", image_id));
        let files = doc["files"].as_array().unwrap();
        assert_eq!(files.len(), 4);
        for f in files {
            assert!(has_rel(&doc, image_id, "CONTAINS", f["SPDXID"].as_str().unwrap()));
            assert_eq!(f["checksums"].as_array().unwrap().len(), 2);
        }
        assert!(files.iter().any(|f| f["fileName"] == "./weird name+1.iso" && f["SPDXID"] == "SPDXRef-file-weird-name-1.iso"));
    }

    #[test]
    fn a_rootfs_package_is_a_whole_deb_in_the_image() {
        let mut runc = deb("rootfs.packages.runc", "runc", "1.1.5+ds1-1+deb12u1", "amd64", "");
        runc.deb.as_mut().unwrap().member = None;
        runc.sha256 = runc.deb.as_ref().unwrap().sha256.clone();
        let doc: Value = serde_json::from_str(&sample(stand_in(), Some(runc)).to_json()).unwrap();
        let p = find(&doc, "runc");
        assert_eq!(purl_of(p), "pkg:deb/debian/runc@1.1.5%2Bds1-1%2Bdeb12u1?arch=amd64");
        assert_eq!(p["checksums"][0]["checksumValue"], input::sha256_bytes(b"runc"));
        assert!(p["sourceInfo"].as_str().unwrap().ends_with("used as rootfs.packages.runc (the whole .deb)"), "{}", p["sourceInfo"]);
        let image = find(&doc, "qemu-amd64")["SPDXID"].as_str().unwrap().to_string();
        assert!(has_rel(&doc, &image, "CONTAINS", p["SPDXID"].as_str().unwrap()));
    }

    #[test]
    fn the_same_build_gives_the_same_bytes() {
        let a = sample(stand_in(), None).to_json();
        assert_eq!(a, sample(stand_in(), None).to_json());
        let mut other = sample(stand_in(), None);
        other.artifacts[0].sha256 = "e".repeat(64);
        let b = other.to_json();
        let ns = |s: &str| serde_json::from_str::<Value>(s).unwrap()["documentNamespace"].clone();
        assert_ne!(ns(&a), ns(&b), "a different build gets a different namespace");
    }

    #[test]
    fn real_k0s_gets_its_version_and_sha256() {
        let k0s = Resolved {
            name: "payload.k0s".into(),
            kind: "url",
            source: "https://github.com/k0sproject/k0s/releases/download/v1.30.14+k0s.0/k0s-v1.30.14+k0s.0-amd64".into(),
            version: None,
            sha256: "f".repeat(64),
            size: 1,
            deb: None,
            path: PathBuf::new(),
        };
        let s = sample(PayloadPart::K0s { version: "v1.30.14+k0s.0".into() }, Some(k0s));
        let doc: Value = serde_json::from_str(&s.to_json()).unwrap();
        let p = find(&doc, "k0s");
        assert_eq!(p["versionInfo"], "v1.30.14+k0s.0");
        assert_eq!(p["checksums"][0]["checksumValue"], "f".repeat(64));
        assert!(p["downloadLocation"].as_str().unwrap().starts_with("https://github.com/"));
        assert!(purl_of(p).starts_with("pkg:generic/k0s@v1.30.14%2Bk0s.0?download_url=https://github.com/"));
        assert!(packages(&doc).iter().all(|p| p["name"] != "kiln-stand-in" && p["name"] != "payload.k0s"));
    }

    #[test]
    fn pyspdxtools_accepts_it() {
        let d = tempfile::tempdir().unwrap();
        let k0s = Resolved { name: "payload.k0s".into(), kind: "url", source: "http://10.0.2.2:8080/k0s".into(), version: None, sha256: "f".repeat(64), size: 1, deb: None, path: PathBuf::new() };
        let firmware = Resolved { name: "firmware.blob".into(), kind: "file", source: "/srv/fw.bin".into(), version: None, sha256: "9".repeat(64), size: 1, deb: None, path: PathBuf::new() };
        for (name, s) in [("stand-in", sample(stand_in(), Some(firmware))), ("k0s", sample(PayloadPart::K0s { version: "v1.30.14+k0s.0".into() }, Some(k0s)))] {
            let path = d.path().join(format!("{name}.spdx.json"));
            std::fs::write(&path, s.to_json()).unwrap();
            let Some((ok, text)) = pyspdxtools(&path) else { return };
            assert!(ok, "pyspdxtools rejected the {name} SBOM:\n{text}");
        }
    }

    #[test]
    fn helpers() {
        assert_eq!(download_location("http://10.0.2.2:8080/k0s"), None);
        assert_eq!(download_location("https://example.com:8443/a/b").as_deref(), Some("https://example.com:8443/a/b"));
        assert_eq!(download_location("ftp://example.com/x"), None);
        assert_eq!(license_expression("MIT/Apache-2.0").as_deref(), Some("MIT OR Apache-2.0"));
        assert_eq!(license_expression("Apache-2.0 WITH LLVM-exception OR MIT").as_deref(), Some("Apache-2.0 WITH LLVM-exception OR MIT"));
        assert_eq!(license_expression("GPL-3.0+"), None);
        assert_eq!(license_expression(""), None);
        let u = uuid_from(&[0xff; 32]);
        assert_eq!(u, "ffffffff-ffff-8fff-bfff-ffffffffffff");
        // The spec's algorithm: SHA1 over the sorted, concatenated SHA1s.
        let files = vec![ArtifactFile { path: "b".into(), sha1: "2".repeat(40), sha256: String::new() }, ArtifactFile { path: "a".into(), sha1: "1".repeat(40), sha256: String::new() }];
        assert_eq!(verification_code(&files), hex::encode(Sha1::digest(format!("{}{}", "1".repeat(40), "2".repeat(40)))));
    }
}
