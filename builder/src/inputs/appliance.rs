//! Appliance payloads: image tarballs (the k0s airgap bundle and others),
//! manifests in named stacks, and Helm charts, baked into the read-only
//! root under `/usr/lib/kiln/appliance`. kiln-init links them into
//! `/var/lib/k0s/images/` and `/var/lib/k0s/manifests/<stack>/` at every
//! boot (kiln-init's node/appliance.rs; the path is kiln_contract::layout::APPLIANCE_SOURCE), where k0s imports and applies them.
//!
//! A chart becomes a k0s `helm.k0sproject.io/v1beta1` `Chart` manifest in
//! the `kiln-charts` stack whose `chartName` is the archive's path in the
//! root: k0s's helm controller loads a chart from a local `.tgz` when
//! `chartName` is a path that exists on the controller (it stats the name
//! before trying repositories), so nothing is downloaded.

use crate::inputs::cache::Cache;
use crate::inputs::input::{self, Input, InputError, Resolved};
use crate::arch::Arch;
use kiln_formats::tree::{Tree, TreeError};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Where the payloads live in the root.
pub const ROOT: &str = kiln_contract::layout::APPLIANCE_SOURCE;
/// The stack that holds the charts' `Chart` manifests.
pub const CHART_STACK: &str = "kiln-charts";
/// Stacks k0s writes itself; a vendor's files there would fight with it.
const K0S_STACKS: &[&str] = &[
    "api-config",
    "autopilot",
    "bootstraprbac",
    "calico",
    "calico_init",
    "coredns",
    "helm",
    "konnectivity",
    "kubelet",
    "kubeproxy",
    "kuberouter",
    "metricserver",
    "windows",
];

// ---- As written in a profile. ----

/// `[appliance]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplianceFile {
    /// The k0s airgap bundle for the profile's arch, installed under its
    /// own file name.
    pub airgap_bundle: Option<Input>,
    /// More image tarballs, keyed by the file name they get in
    /// /var/lib/k0s/images.
    pub images: Option<BTreeMap<String, Input>>,
    /// `[[appliance.manifests]]`: a .yaml file or a directory of them, into
    /// a named stack.
    pub manifests: Option<Vec<ManifestsFile>>,
    /// `[[appliance.charts]]`: Helm charts installed by k0s.
    pub charts: Option<Vec<ChartFile>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestsFile {
    pub stack: String,
    /// Relative to the profile that sets it.
    pub path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChartFile {
    /// The Helm release name.
    pub name: String,
    /// The chart archive (`helm package` output), pinned like every input.
    pub chart: Input,
    /// The namespace the release goes into (created if missing).
    pub namespace: String,
    /// Defaults to the version in the archive's Chart.yaml, and must match it.
    pub version: Option<String>,
    /// Values, as YAML text.
    pub values: Option<String>,
    /// Or a values file, relative to the profile that sets it.
    pub values_file: Option<PathBuf>,
    /// How long k0s waits for the release (a Go duration, `10m` by default).
    pub timeout: Option<String>,
}

impl ApplianceFile {
    /// Anchors relative paths (manifests, values files, `file =` inputs) at
    /// `dir`, the directory of the profile that wrote them, so that a
    /// profile extending this one does not move them.
    pub fn anchor(&mut self, dir: &Path) {
        let at = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        let input = |i: &mut Input| {
            if let Some(f) = i.file.as_mut() {
                at(f);
            }
        };
        if let Some(i) = self.airgap_bundle.as_mut() {
            input(i);
        }
        for i in self.images.iter_mut().flat_map(|m| m.values_mut()) {
            input(i);
        }
        for m in self.manifests.iter_mut().flatten() {
            at(&mut m.path);
        }
        for c in self.charts.iter_mut().flatten() {
            input(&mut c.chart);
            if let Some(v) = c.values_file.as_mut() {
                at(v);
            }
        }
    }

    /// Fills what the child leaves unset from its base, key by key.
    pub fn inherit(&mut self, base: &ApplianceFile) {
        if self.airgap_bundle.is_none() {
            self.airgap_bundle = base.airgap_bundle.clone();
        }
        if self.images.is_none() {
            self.images = base.images.clone();
        }
        if self.manifests.is_none() {
            self.manifests = base.manifests.clone();
        }
        if self.charts.is_none() {
            self.charts = base.charts.clone();
        }
    }
}

// ---- Checked against the profile. ----

/// A problem with one key of `[appliance]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    pub key: String,
    pub message: String,
}

fn key_err<T>(key: impl Into<String>, message: impl Into<String>) -> Result<T, KeyError> {
    Err(KeyError { key: key.into(), message: message.into() })
}

#[derive(Debug, Clone, Default)]
pub struct Spec {
    pub images: Vec<Image>,
    pub manifests: Vec<Manifests>,
    pub charts: Vec<Chart>,
}

#[derive(Debug, Clone)]
pub struct Image {
    pub key: String,
    /// Its file name in images/.
    pub name: String,
    pub input: Input,
}

#[derive(Debug, Clone)]
pub struct Manifests {
    pub key: String,
    pub stack: String,
    pub path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Chart {
    pub key: String,
    pub name: String,
    pub namespace: String,
    pub version: Option<String>,
    pub values: Values,
    pub timeout: Option<String>,
    pub input: Input,
}

#[derive(Debug, Clone)]
pub enum Values {
    Inline(String),
    File(PathBuf),
}

impl Spec {
    pub fn is_empty(&self) -> bool {
        self.images.is_empty() && self.manifests.is_empty() && self.charts.is_empty()
    }
}

/// The k0s arch name in its release file names.
fn k0s_arch(arch: Arch) -> &'static str {
    match arch {
        Arch::Amd64 => "amd64",
        Arch::Arm64 => "arm64",
        Arch::Armv7 => "arm",
    }
}

/// A plain file name: no path, no leading dot, nothing a shell or YAML
/// would trip on.
fn check_file_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty() && name.len() <= 255 && !name.starts_with('.') && name.chars().all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("`{name}` is not a plain file name (letters, digits, `.`, `_`, `+`, `-`; not starting with `.`)"))
    }
}

/// A stack name is a directory name and a Kubernetes label value.
fn check_stack(name: &str) -> Result<(), String> {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    let ok = name.len() <= 63 && edge(name.chars().next()) && edge(name.chars().last()) && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !ok {
        return Err(format!("stack `{name}` must be 1 to 63 letters, digits, `-`, `_` or `.`, starting and ending with a letter or digit (k0s labels what it applies with it)"));
    }
    if K0S_STACKS.contains(&name) {
        return Err(format!("k0s writes its own manifests into the stack `{name}`; pick another name"));
    }
    Ok(())
}

/// RFC 1123 label: what namespaces and (up to 53 characters) Helm release
/// names must be.
fn check_dns_label(what: &str, name: &str, max: usize) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!("{what} `{name}` must be 1 to {max} lowercase letters, digits and inner `-`"))
    }
}

/// A Go duration such as `10m` or `1h30m`, which k0s parses.
fn is_go_duration(s: &str) -> bool {
    let units = ["ns", "us", "µs", "ms", "s", "m", "h"];
    let mut rest = s;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let n = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let num = &rest[..n];
        if n == 0 || num.starts_with('.') || num.ends_with('.') || num.matches('.').count() > 1 {
            return false;
        }
        rest = &rest[n..];
        let Some(u) = units.iter().filter(|u| rest.starts_with(**u)).max_by_key(|u| u.len()) else { return false };
        rest = &rest[u.len()..];
    }
    true
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The file name an input arrives with: the file's, the URL's last path
/// segment, or the deb member's.
pub fn source_name(i: &Input) -> Option<String> {
    if let Some(f) = &i.file {
        return f.file_name().map(|n| n.to_string_lossy().into_owned());
    }
    if let Some(u) = &i.url {
        let path = u.split(['?', '#']).next().unwrap_or(u);
        let last = path.rsplit('/').next().filter(|s| !s.is_empty() && !path.ends_with("//"))?;
        return Some(percent_decode(last));
    }
    i.member.as_deref().and_then(|m| m.rsplit('/').next()).filter(|s| !s.is_empty()).map(str::to_string)
}

/// `k0s-airgap-bundle-<version>-<arch>` (v1.30–1.35) or
/// `k0s-airgap-bundle-<version>-linux-<arch>.tar` (v1.36+): the version and
/// arch, when the name has that shape.
pub fn airgap_name(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix("k0s-airgap-bundle-")?;
    let rest = rest.strip_suffix(".tar").unwrap_or(rest);
    let (ver, arch) = rest.rsplit_once('-')?;
    let ver = ver.strip_suffix("-linux").unwrap_or(ver);
    (!ver.is_empty()).then_some((ver, arch))
}

/// Checks `[appliance]` as far as can be done without reading any file.
/// `k0s_version` is `payload.version`, when the profile says it.
pub fn spec(f: &ApplianceFile, arch: Arch, k0s_version: Option<&str>) -> Result<Spec, KeyError> {
    let mut s = Spec::default();
    if let Some(i) = &f.airgap_bundle {
        let key = "appliance.airgap_bundle";
        i.validate().or_else(|m| key_err(key, m))?;
        let Some(name) = source_name(i) else {
            return key_err(key, "cannot tell the bundle's file name; give a `file`, a `url` ending in the file name, or a deb `member`");
        };
        check_file_name(&name).or_else(|m| key_err(key, m))?;
        if let Some((ver, got)) = airgap_name(&name) {
            let want = k0s_arch(arch);
            if got != want {
                return key_err(key, format!("`{name}` is the airgap bundle for {got}; this profile is {arch}, so it needs k0s-airgap-bundle-{ver}-{want}"));
            }
            if let Some(v) = k0s_version.filter(|v| *v != ver) {
                return key_err(key, format!("`{name}` is the airgap bundle of k0s {ver}, but `payload.version` is {v}; use the bundle of the same release"));
            }
        }
        s.images.push(Image { key: key.into(), name, input: i.clone() });
    }
    for (name, i) in f.images.iter().flatten() {
        let key = format!("appliance.images.{name}");
        i.validate().or_else(|m| key_err(&key, m))?;
        check_file_name(name).or_else(|m| key_err(&key, m))?;
        if let Some(first) = s.images.iter().find(|x| &x.name == name) {
            return key_err(&key, format!("`{name}` is also the file name of `{}`; each file in /var/lib/k0s/images needs its own name", first.key));
        }
        s.images.push(Image { key, name: name.clone(), input: i.clone() });
    }
    for (n, m) in f.manifests.iter().flatten().enumerate() {
        let key = format!("appliance.manifests[{n}]");
        check_stack(&m.stack).or_else(|msg| key_err(format!("{key}.stack"), msg))?;
        s.manifests.push(Manifests { key: format!("{key}.path"), stack: m.stack.clone(), path: m.path.clone() });
    }
    for (n, c) in f.charts.iter().flatten().enumerate() {
        let key = format!("appliance.charts[{n}]");
        check_dns_label("release name", &c.name, 53).or_else(|m| key_err(format!("{key}.name"), m))?;
        if let Some(first) = s.charts.iter().find(|x| x.name == c.name) {
            return key_err(format!("{key}.name"), format!("`{}` is also the release name of `{}`", c.name, first.key));
        }
        check_dns_label("namespace", &c.namespace, 63).or_else(|m| key_err(format!("{key}.namespace"), m))?;
        c.chart.validate().or_else(|m| key_err(format!("{key}.chart"), m))?;
        if let Some(v) = &c.version {
            if v.is_empty() || v.chars().any(|c| c.is_whitespace() || c.is_control() || "\"'\\".contains(c)) {
                return key_err(format!("{key}.version"), format!("`{v}` is not a chart version like 1.2.3"));
            }
        }
        if let Some(t) = &c.timeout {
            if !is_go_duration(t) {
                return key_err(format!("{key}.timeout"), format!("`{t}` is not a duration like 10m or 1h30m"));
            }
        }
        let values = match (&c.values, &c.values_file) {
            (Some(_), Some(_)) => return key_err(format!("{key}.values"), "give `values` or `values_file`, not both"),
            (Some(v), None) => Values::Inline(v.clone()),
            (None, Some(p)) => Values::File(p.clone()),
            (None, None) => Values::Inline(String::new()),
        };
        if let Values::Inline(v) = &values {
            check_values(v).or_else(|m| key_err(format!("{key}.values"), m))?;
        }
        s.charts.push(Chart { key, name: c.name.clone(), namespace: c.namespace.clone(), version: c.version.clone(), values, timeout: c.timeout.clone(), input: c.chart.clone() });
    }
    Ok(s)
}

/// Values are YAML: no tabs in the indentation.
fn check_values(v: &str) -> Result<(), String> {
    match v.lines().position(|l| l.trim_start_matches(' ').starts_with('\t')) {
        Some(n) => Err(format!("line {} of the values is indented with a tab, which YAML does not allow", n + 1)),
        None => Ok(()),
    }
}

// ---- Resolved for a build. ----

#[derive(Debug, thiserror::Error)]
pub enum ApplianceError {
    #[error("{profile}: key `{key}`: {message}")]
    Key { profile: PathBuf, key: String, message: String },
    #[error(transparent)]
    Input(#[from] InputError),
}

#[derive(Debug, Clone)]
enum Source {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

/// Everything the root gets, by path.
#[derive(Debug, Default)]
pub struct Appliance {
    /// The pinned inputs, for the manifest.
    pub inputs: Vec<Resolved>,
    files: BTreeMap<String, (Source, String)>,
}

impl Appliance {
    /// Paths in the root, sorted.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.files.keys().map(String::as_str)
    }

    /// What a path's content will be, when it is made here (chart manifests).
    pub fn bytes(&self, path: &str) -> Option<&[u8]> {
        match self.files.get(path) {
            Some((Source::Bytes(b), _)) => Some(b),
            _ => None,
        }
    }

    pub fn add_to(&self, t: &mut Tree) -> Result<(), TreeError> {
        for (path, (src, _)) in &self.files {
            match src {
                Source::Host(p) => t.host_file(path, p.clone(), 0o644)?,
                Source::Bytes(b) => t.file(path, b.clone(), 0o644)?,
            }
        }
        Ok(())
    }

    /// Adds a file; a path given twice names both keys.
    fn put(&mut self, profile: &Path, key: &str, path: String, src: Source) -> Result<(), ApplianceError> {
        if let Some((_, first)) = self.files.get(&path) {
            let shown = path.strip_prefix(ROOT).unwrap_or(&path).trim_start_matches('/');
            return Err(ApplianceError::Key { profile: profile.into(), key: key.into(), message: format!("`{shown}` is also given by `{first}`; each file needs its own name") });
        }
        self.files.insert(path, (src, key.to_string()));
        Ok(())
    }
}

/// Fetches the inputs, reads the manifests and charts, and lays out the
/// files. Every error names the profile and the key.
pub fn resolve(spec: &Spec, profile: &Path, deb_arch: &str, cache: &Cache) -> Result<Appliance, ApplianceError> {
    let err = |key: &str, message: String| ApplianceError::Key { profile: profile.into(), key: key.into(), message };
    let mut a = Appliance::default();
    for i in &spec.images {
        let r = input::resolve(&i.key, &i.input, deb_arch, cache)?;
        a.put(profile, &i.key, format!("{ROOT}/images/{}", i.name), Source::Host(r.path.clone()))?;
        a.inputs.push(r);
    }
    for m in &spec.manifests {
        for (name, path) in manifest_files(&m.path).map_err(|e| err(&m.key, e))? {
            a.put(profile, &m.key, format!("{ROOT}/manifests/{}/{name}", m.stack), Source::Host(path))?;
        }
    }
    for c in &spec.charts {
        let key = format!("{}.chart", c.key);
        let r = input::resolve(&key, &c.input, deb_arch, cache)?;
        let meta = chart_meta(&r.path).map_err(|e| err(&key, e))?;
        let version = match &c.version {
            Some(v) if *v != meta.version => return Err(err(&format!("{}.version", c.key), format!("the chart archive is {} version {}, not {v}; k0s would upgrade it over and over. Set the archive's version, or leave `version` out", meta.name, meta.version))),
            _ => meta.version.clone(),
        };
        let values = match &c.values {
            Values::Inline(v) => v.clone(),
            Values::File(p) => {
                let k = format!("{}.values_file", c.key);
                let v = std::fs::read_to_string(p).map_err(|e| err(&k, format!("{}: {e} (paths are relative to the profile that sets them)", p.display())))?;
                check_values(&v).map_err(|m| err(&k, format!("{}: {m}", p.display())))?;
                v
            }
        };
        let archive = format!("{ROOT}/charts/{}-{version}.tgz", c.name);
        let manifest = chart_manifest(c, &archive, &version, &values);
        a.put(profile, &key, archive, Source::Host(r.path.clone()))?;
        a.put(profile, &format!("{}.name", c.key), format!("{ROOT}/manifests/{CHART_STACK}/{}.yaml", c.name), Source::Bytes(manifest.into_bytes()))?;
        a.inputs.push(r);
    }
    Ok(a)
}

/// The .yaml files a manifests `path` gives, as (name, path): the file
/// itself, or every file of a directory (hidden ones skipped).
fn manifest_files(path: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e} (paths are relative to the profile that sets them)", path.display()))?;
    let named = |name: String, p: PathBuf| -> Result<(String, PathBuf), String> {
        check_file_name(&name).map_err(|m| format!("{}: {m}", p.display()))?;
        if !name.ends_with(".yaml") {
            return Err(format!("{}: k0s applies only files named *.yaml; rename it", p.display()));
        }
        Ok((name, p))
    };
    if meta.is_file() {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        return Ok(vec![named(name, path.to_path_buf())?]);
    }
    let mut out = Vec::new();
    let rd = std::fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))?;
    for e in rd {
        let e = e.map_err(|e| format!("{}: {e}", path.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let p = e.path();
        if std::fs::metadata(&p).map_err(|e| format!("{}: {e}", p.display()))?.is_dir() {
            return Err(format!("{}: k0s reads no subdirectories of a stack; give it its own [[appliance.manifests]] entry", p.display()));
        }
        out.push(named(name, p)?);
    }
    if out.is_empty() {
        return Err(format!("{} has no .yaml files", path.display()));
    }
    out.sort();
    Ok(out)
}

/// What the builder reads from a chart archive's Chart.yaml.
#[derive(Debug, PartialEq, Eq)]
pub struct ChartMeta {
    pub name: String,
    pub version: String,
}

/// A top-level `key: value` of a YAML text, unquoted.
fn top_level<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix(':')?;
        let v = v.split(" #").next().unwrap_or(v).trim();
        Some(v.trim_matches(|c| c == '"' || c == '\''))
    })
}

/// Reads `<dir>/Chart.yaml` from a `helm package` archive and checks that
/// k0s can install it without a network: an application chart whose
/// dependencies are packed inside.
pub fn chart_meta(archive: &Path) -> Result<ChartMeta, String> {
    let f = std::fs::File::open(archive).map_err(|e| format!("{}: {e}", archive.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let not_chart = |why: String| format!("not a Helm chart archive ({why}); make one with `helm package`");
    let mut chart_yaml: Option<String> = None;
    let mut bundled = false;
    for e in tar.entries().map_err(|e| not_chart(e.to_string()))? {
        let mut e = e.map_err(|e| not_chart(e.to_string()))?;
        let p = e.path().map_err(|e| not_chart(e.to_string()))?.into_owned();
        let comps: Vec<String> = p.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
        if comps.len() >= 3 && comps[1] == "charts" {
            bundled = true;
        }
        if comps.len() == 2 && comps[1] == "Chart.yaml" && chart_yaml.is_none() {
            let mut text = String::new();
            e.by_ref().take(1 << 20).read_to_string(&mut text).map_err(|e| not_chart(format!("Chart.yaml: {e}")))?;
            chart_yaml = Some(text);
        }
    }
    let text = chart_yaml.ok_or_else(|| not_chart("no <chart>/Chart.yaml".into()))?;
    let field = |k: &str| top_level(&text, k).filter(|v| !v.is_empty()).map(str::to_string);
    let name = field("name").ok_or_else(|| not_chart("Chart.yaml has no name".into()))?;
    let version = field("version").ok_or_else(|| not_chart("Chart.yaml has no version".into()))?;
    if let Some(t) = field("type").filter(|t| t != "application") {
        return Err(format!("chart {name} is of type {t}; k0s installs only application charts"));
    }
    let has_deps = field("dependencies").is_some_and(|d| d != "[]") || text.lines().any(|l| l.trim_end() == "dependencies:");
    if has_deps && !bundled {
        return Err(format!("chart {name} has dependencies but none are packed in it, and an air-gapped k0s cannot fetch them; run `helm dependency update` before `helm package`"));
    }
    Ok(ChartMeta { name, version })
}

/// The `Chart` manifest k0s's helm controller acts on. It must live in
/// kube-system; the finalizer makes k0s uninstall the release when the
/// manifest goes away.
pub fn chart_manifest(c: &Chart, archive: &str, version: &str, values: &str) -> String {
    let mut y = format!(
        "# Made by kiln from [[appliance.charts]] `{name}`; the chart archive is in the image.\n\
         apiVersion: helm.k0sproject.io/v1beta1\n\
         kind: Chart\n\
         metadata:\n\
         \x20 name: kiln-{name}\n\
         \x20 namespace: kube-system\n\
         \x20 finalizers:\n\
         \x20   - helm.k0sproject.io/uninstall-helm-release\n\
         spec:\n\
         \x20 chartName: {archive}\n\
         \x20 releaseName: {name}\n\
         \x20 version: \"{version}\"\n\
         \x20 namespace: {ns}\n",
        name = c.name,
        ns = c.namespace
    );
    if let Some(t) = &c.timeout {
        y.push_str(&format!("  timeout: {t}\n"));
    }
    if values.trim().is_empty() {
        y.push_str("  values: \"\"\n");
    } else {
        // An explicit indentation, so values starting with a nested line or
        // a blank line keep their shape.
        y.push_str("  values: |2\n");
        for l in values.lines() {
            if l.is_empty() {
                y.push('\n');
            } else {
                y.push_str(&format!("    {l}\n"));
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn pin(data: &[u8]) -> String {
        input::sha256_bytes(data)
    }

    fn file_input(p: &Path, data: &[u8]) -> Input {
        Input { file: Some(p.to_path_buf()), sha256: Some(pin(data)), ..Default::default() }
    }

    /// A chart archive as `helm package` makes one.
    pub fn chart_tgz(files: &[(&str, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default()));
        for (p, content) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(content.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, p, content.as_bytes()).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn names_from_sources() {
        let url = |u: &str| Input { url: Some(u.into()), ..Default::default() };
        assert_eq!(
            source_name(&url("https://github.com/k0sproject/k0s/releases/download/v1.30.14%2Bk0s.0/k0s-airgap-bundle-v1.30.14%2Bk0s.0-amd64?x=1")).as_deref(),
            Some("k0s-airgap-bundle-v1.30.14+k0s.0-amd64")
        );
        assert_eq!(source_name(&url("https://h/")), None);
        assert_eq!(source_name(&Input { file: Some("/a/b.tar".into()), ..Default::default() }).as_deref(), Some("b.tar"));
        assert_eq!(source_name(&Input { deb: Some("x".into()), member: Some("usr/share/x/img.tar".into()), ..Default::default() }).as_deref(), Some("img.tar"));
        assert_eq!(source_name(&Input { deb: Some("x".into()), ..Default::default() }), None);
        assert_eq!(percent_decode("a%2Bb%2"), "a+b%2");
        assert_eq!(airgap_name("k0s-airgap-bundle-v1.30.14+k0s.0-arm"), Some(("v1.30.14+k0s.0", "arm")));
        assert_eq!(airgap_name("k0s-airgap-bundle-v1.36.0+k0s.0-linux-arm64.tar"), Some(("v1.36.0+k0s.0", "arm64")));
        assert_eq!(airgap_name("app.tar"), None);
    }

    #[test]
    fn durations() {
        for ok in ["10m", "1h30m", "90s", "1.5h", "300ms"] {
            assert!(is_go_duration(ok), "{ok}");
        }
        for bad in ["", "10", "m", "10x", "1..5h", "-1m", "10 m"] {
            assert!(!is_go_duration(bad), "{bad}");
        }
    }

    fn parse(toml_text: &str) -> ApplianceFile {
        #[derive(Deserialize)]
        struct P {
            appliance: ApplianceFile,
        }
        toml::from_str::<P>(toml_text).unwrap_or_else(|e| panic!("{e}")).appliance
    }

    const PIN: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn spec_errors_name_the_key() {
        let e = |t: &str, arch: Arch, v: Option<&str>| spec(&parse(t), arch, v).unwrap_err();
        let bundle = format!("[appliance]\nairgap_bundle = {{ url = \"https://x/k0s-airgap-bundle-v1.30.14+k0s.0-arm64\", sha256 = \"{PIN}\" }}\n");
        let x = e(&bundle, Arch::Amd64, None);
        assert_eq!(x.key, "appliance.airgap_bundle");
        assert!(x.message.contains("for arm64") && x.message.contains("k0s-airgap-bundle-v1.30.14+k0s.0-amd64"), "{}", x.message);
        assert!(spec(&parse(&bundle), Arch::Arm64, Some("v1.30.14+k0s.0")).is_ok());
        assert!(e(&bundle, Arch::Arm64, Some("v1.31.1+k0s.0")).message.contains("payload.version"));
        let dup = format!("{bundle}[appliance.images]\n\"k0s-airgap-bundle-v1.30.14+k0s.0-arm64\" = {{ file = \"x\", sha256 = \"{PIN}\" }}\n");
        let x = e(&dup, Arch::Arm64, None);
        assert_eq!(x.key, "appliance.images.k0s-airgap-bundle-v1.30.14+k0s.0-arm64");
        assert!(x.message.contains("appliance.airgap_bundle"), "{}", x.message);
        let x = e(&format!("[appliance.images]\n\"../x\" = {{ file = \"x\", sha256 = \"{PIN}\" }}\n"), Arch::Amd64, None);
        assert!(x.message.contains("plain file name"), "{}", x.message);
        assert_eq!(e("[appliance.images]\n\"a.tar\" = { file = \"x\" }\n", Arch::Amd64, None).key, "appliance.images.a.tar");
        assert_eq!(e("[[appliance.manifests]]\nstack = \"coredns\"\npath = \"m\"\n", Arch::Amd64, None).key, "appliance.manifests[0].stack");
        assert_eq!(e("[[appliance.manifests]]\nstack = \"-x\"\npath = \"m\"\n", Arch::Amd64, None).key, "appliance.manifests[0].stack");
        let chart = |extra: &str| format!("[[appliance.charts]]\nname = \"app\"\nnamespace = \"app\"\nchart = {{ file = \"c.tgz\", sha256 = \"{PIN}\" }}\n{extra}");
        assert!(spec(&parse(&chart("")), Arch::Amd64, None).is_ok());
        assert_eq!(e(&chart("values = \"a\"\nvalues_file = \"v.yaml\"\n"), Arch::Amd64, None).key, "appliance.charts[0].values");
        assert_eq!(e(&chart("timeout = \"ten\"\n"), Arch::Amd64, None).key, "appliance.charts[0].timeout");
        assert_eq!(e(&chart("version = \"1 2\"\n"), Arch::Amd64, None).key, "appliance.charts[0].version");
        assert_eq!(e(&chart("values = \"a:\\n\\tb: 1\\n\"\n"), Arch::Amd64, None).key, "appliance.charts[0].values");
        assert_eq!(e(&chart("").replace("name = \"app\"", "name = \"App\""), Arch::Amd64, None).key, "appliance.charts[0].name");
        assert_eq!(e(&chart("").replace("namespace = \"app\"", "namespace = \"a_b\""), Arch::Amd64, None).key, "appliance.charts[0].namespace");
        let two = format!("{}{}", chart(""), chart(""));
        let x = e(&two, Arch::Amd64, None);
        assert_eq!(x.key, "appliance.charts[1].name");
        assert!(x.message.contains("appliance.charts[0]"));
    }

    #[test]
    fn resolves_files_stacks_and_charts() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::at(d.path().join("cache"));
        let img = d.path().join("app.tar");
        std::fs::write(&img, b"image").unwrap();
        let mdir = d.path().join("m");
        std::fs::create_dir_all(&mdir).unwrap();
        std::fs::write(mdir.join("10-ns.yaml"), "kind: Namespace\n").unwrap();
        std::fs::write(mdir.join(".hidden"), "").unwrap();
        std::fs::write(d.path().join("one.yaml"), "kind: ConfigMap\n").unwrap();
        let tgz = chart_tgz(&[("app/Chart.yaml", "apiVersion: v2\nname: app\nversion: 1.2.3 # a comment\n"), ("app/templates/cm.yaml", "kind: ConfigMap\n")]);
        let chart = d.path().join("app-1.2.3.tgz");
        std::fs::write(&chart, &tgz).unwrap();
        std::fs::write(d.path().join("values.yaml"), "replicas: 2\n").unwrap();
        let mut f = ApplianceFile {
            images: Some([("app.tar".to_string(), file_input(&img, b"image"))].into()),
            manifests: Some(vec![ManifestsFile { stack: "app".into(), path: "m".into() }, ManifestsFile { stack: "app".into(), path: "one.yaml".into() }]),
            charts: Some(vec![ChartFile { name: "app".into(), chart: file_input(Path::new("app-1.2.3.tgz"), &tgz), namespace: "apps".into(), version: None, values: None, values_file: Some("values.yaml".into()), timeout: Some("20m".into()) }]),
            ..Default::default()
        };
        f.anchor(d.path());
        let s = spec(&f, Arch::Amd64, None).unwrap();
        let a = resolve(&s, Path::new("p.toml"), "amd64", &cache).unwrap();
        let paths: Vec<&str> = a.paths().collect();
        assert_eq!(
            paths,
            [
                "/usr/lib/kiln/appliance/charts/app-1.2.3.tgz",
                "/usr/lib/kiln/appliance/images/app.tar",
                "/usr/lib/kiln/appliance/manifests/app/10-ns.yaml",
                "/usr/lib/kiln/appliance/manifests/app/one.yaml",
                "/usr/lib/kiln/appliance/manifests/kiln-charts/app.yaml",
            ]
        );
        assert_eq!(a.inputs.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["appliance.images.app.tar", "appliance.charts[0].chart"]);
        let m = String::from_utf8(a.bytes("/usr/lib/kiln/appliance/manifests/kiln-charts/app.yaml").unwrap().to_vec()).unwrap();
        assert!(m.contains("  chartName: /usr/lib/kiln/appliance/charts/app-1.2.3.tgz\n"), "{m}");
        assert!(m.contains("  version: \"1.2.3\"\n  namespace: apps\n  timeout: 20m\n  values: |2\n    replicas: 2\n"), "{m}");
        let mut t = Tree::new();
        a.add_to(&mut t).unwrap();
        assert!(t.get("/usr/lib/kiln/appliance/images/app.tar").is_some());

        // The same file name twice in one stack names both keys.
        std::fs::write(mdir.join("one.yaml"), "x").unwrap();
        let e = resolve(&s, Path::new("p.toml"), "amd64", &cache).unwrap_err().to_string();
        assert!(e.starts_with("p.toml: key `appliance.manifests[1].path`: `manifests/app/one.yaml` is also given by `appliance.manifests[0].path`"), "{e}");
        std::fs::remove_file(mdir.join("one.yaml")).unwrap();
        // A version that is not the archive's.
        let mut s2 = s.clone();
        s2.charts[0].version = Some("1.2.4".into());
        let e = resolve(&s2, Path::new("p.toml"), "amd64", &cache).unwrap_err().to_string();
        assert!(e.contains("`appliance.charts[0].version`") && e.contains("app version 1.2.3, not 1.2.4"), "{e}");
    }

    #[test]
    fn manifest_file_rules() {
        let d = tempfile::tempdir().unwrap();
        let e = manifest_files(&d.path().join("none")).unwrap_err();
        assert!(e.contains("relative to the profile"), "{e}");
        std::fs::write(d.path().join("a.yml"), "").unwrap();
        assert!(manifest_files(&d.path().join("a.yml")).unwrap_err().contains("only files named *.yaml"));
        let sub = d.path().join("stack");
        std::fs::create_dir_all(sub.join("nested")).unwrap();
        assert!(manifest_files(&sub).unwrap_err().contains("no subdirectories"));
        std::fs::remove_dir(sub.join("nested")).unwrap();
        assert!(manifest_files(&sub).unwrap_err().contains("has no .yaml files"));
    }

    #[test]
    fn chart_archives_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let write = |name: &str, data: &[u8]| {
            let p = d.path().join(name);
            std::fs::File::create(&p).unwrap().write_all(data).unwrap();
            p
        };
        let ok = write("ok.tgz", &chart_tgz(&[("app/Chart.yaml", "name: \"app\"\nversion: '0.1.0'\ndependencies:\n- name: db\n"), ("app/charts/db-1.0.0.tgz", "x")]));
        assert_eq!(chart_meta(&ok).unwrap(), ChartMeta { name: "app".into(), version: "0.1.0".into() });
        let deps = write("deps.tgz", &chart_tgz(&[("app/Chart.yaml", "name: app\nversion: 1\ndependencies:\n- name: db\n")]));
        assert!(chart_meta(&deps).unwrap_err().contains("helm dependency update"));
        let lib = write("lib.tgz", &chart_tgz(&[("lib/Chart.yaml", "name: lib\nversion: 1\ntype: library\n")]));
        assert!(chart_meta(&lib).unwrap_err().contains("type library"));
        let none = write("none.tgz", &chart_tgz(&[("x/values.yaml", "")]));
        assert!(chart_meta(&none).unwrap_err().contains("helm package"));
        let junk = write("junk.tgz", b"not gzip");
        assert!(chart_meta(&junk).unwrap_err().contains("not a Helm chart archive"));
    }

    #[test]
    fn chart_manifest_shape() {
        let c = Chart { key: "k".into(), name: "app".into(), namespace: "apps".into(), version: None, values: Values::Inline(String::new()), timeout: None, input: Input::default() };
        let m = chart_manifest(&c, "/usr/lib/kiln/appliance/charts/app-1.0.0.tgz", "1.0.0", "");
        assert!(m.contains("kind: Chart\nmetadata:\n  name: kiln-app\n  namespace: kube-system\n  finalizers:\n    - helm.k0sproject.io/uninstall-helm-release\n"), "{m}");
        assert!(m.ends_with("  values: \"\"\n"), "{m}");
        let m = chart_manifest(&c, "/a.tgz", "1.0.0", "  nested: first\ntop: 1\n\nafter: blank\n");
        assert!(m.ends_with("  values: |2\n      nested: first\n    top: 1\n\n    after: blank\n"), "{m}");
    }
}
