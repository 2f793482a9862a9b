//! External inputs: `file`, `url` or `deb`, each pinned by sha256, all
//! landing in the content-addressed cache.

use crate::inputs::cache::Cache;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// One external input, as written in a profile.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// A local file (in a profile, relative to the profile file that names it).
    pub file: Option<PathBuf>,
    /// An http(s) URL.
    pub url: Option<String>,
    /// A Debian package, fetched with the host's apt for `arch` (default: the
    /// target's Debian architecture).
    pub deb: Option<String>,
    /// The exact Debian version, for `deb`.
    pub version: Option<String>,
    /// The Debian architecture of the package (`all`, `amd64`, `arm64`, `armhf`).
    pub arch: Option<String>,
    /// sha256 of the file, the download, or the .deb.
    pub sha256: Option<String>,
    /// For `deb`: the file inside the package to use.
    pub member: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{what}: file {path} is missing: {source}. Put the file there, or change the path in the profile")]
    MissingFile { what: String, path: PathBuf, source: std::io::Error },
    #[error("{what}: sha256 mismatch: the profile pins {want}, but {got_from} has {got}. If this new content is intended, update the pin in the profile")]
    Mismatch { what: String, want: String, got: String, got_from: String },
    #[error("{what}: download of {url} failed: {reason}. Check the URL, or download it yourself and use `file = …` with the same sha256")]
    Download { what: String, url: String, reason: String },
    #[error("{what}: `apt-get download {spec}` failed: {reason}. Run `apt-get update` (with `dpkg --add-architecture {arch}` for a foreign arch), or fetch the .deb yourself and use `file = …`")]
    Apt { what: String, spec: String, arch: String, reason: String },
    #[error("{what}: {path}: {reason}")]
    Unpack { what: String, path: PathBuf, reason: String },
    #[error("{what}: {0}", what = .1)]
    Io(#[source] std::io::Error, String),
}

/// A fetched input.
#[derive(Debug, Clone, Serialize)]
pub struct Resolved {
    /// What it is in the profile (`kernel.source`).
    pub name: String,
    pub kind: &'static str,
    /// The file, URL or `package=version:arch`.
    pub source: String,
    pub version: Option<String>,
    pub sha256: String,
    pub size: u64,
    /// For `deb`: the package itself (`sha256` above is the member's when a
    /// member is used).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deb: Option<DebPackage>,
    /// The blob in the cache (or, for `deb` with `member`, the member's blob).
    #[serde(skip)]
    pub path: PathBuf,
}

/// A Debian package an input came from.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DebPackage {
    pub package: String,
    pub version: Option<String>,
    pub arch: String,
    /// sha256 of the .deb (the profile's pin).
    pub sha256: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
}

impl Input {
    /// Checks the shape of the input: exactly one source and a pin.
    pub fn validate(&self) -> Result<(), String> {
        let n = self.file.is_some() as u8 + self.url.is_some() as u8 + self.deb.is_some() as u8;
        if n != 1 {
            return Err("give exactly one of `file`, `url` or `deb`".into());
        }
        match &self.sha256 {
            None => return Err("an input needs a `sha256` pin (run `sha256sum` on the file, or on the .deb for `deb` inputs)".into()),
            Some(s) if s.len() != 64 || !s.chars().all(|c| c.is_ascii_hexdigit()) => {
                return Err(format!("`sha256 = \"{s}\"` is not 64 hex digits"));
            }
            _ => {}
        }
        if self.deb.is_none() && (self.version.is_some() || self.member.is_some() || self.arch.is_some()) {
            return Err("`version`, `arch` and `member` only apply to `deb` inputs".into());
        }
        if let Some(u) = &self.url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(format!("`url = \"{u}\"` must be http:// or https://"));
            }
        }
        Ok(())
    }

    fn pin(&self) -> String {
        self.sha256.clone().unwrap_or_default().to_ascii_lowercase()
    }
}

pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    hash_copy(&mut std::fs::File::open(path)?, &mut std::io::sink())
}

/// Reads `r` to the end, copying into `w`; returns the sha256 and the size.
fn hash_copy(r: &mut dyn Read, w: &mut dyn Write) -> std::io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
        w.write_all(&buf[..n])?;
    }
    Ok((hex::encode(h.finalize()), size))
}

pub fn sha256_bytes(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Fetches (or finds in the cache) an input, checks its pin, and for `deb`
/// inputs with a `member` extracts that member into the cache too.
pub fn resolve(name: &str, input: &Input, default_deb_arch: &str, cache: &Cache) -> Result<Resolved, InputError> {
    input.validate().map_err(|m| InputError::Unpack { what: name.into(), path: PathBuf::from("profile"), reason: m })?;
    let want = input.pin();
    let io = |e: std::io::Error| InputError::Io(e, name.to_string());
    let mut deb = None;
    let (kind, source, blob) = if let Some(file) = &input.file {
        let (got, _) = sha256_file(file).map_err(|source| InputError::MissingFile { what: name.into(), path: file.clone(), source })?;
        if got != want {
            return Err(InputError::Mismatch { what: name.into(), want, got, got_from: file.display().to_string() });
        }
        let blob = cache.blob(&want);
        if !blob.exists() {
            cache.put_file(file, &want).map_err(io)?;
        }
        ("file", file.display().to_string(), blob)
    } else if let Some(url) = &input.url {
        let blob = cache.blob(&want);
        if !blob.exists() {
            fetch_url(name, url, &want, cache)?;
        }
        ("url", url.clone(), blob)
    } else {
        let pkg = input.deb.clone().unwrap_or_default();
        let arch = input.arch.clone().unwrap_or_else(|| default_deb_arch.to_string());
        let spec = match &input.version {
            Some(v) => format!("{pkg}:{arch}={v}"),
            None => format!("{pkg}:{arch}"),
        };
        let blob = cache.blob(&want);
        if !blob.exists() {
            fetch_deb(name, &spec, &arch, &want, cache)?;
        }
        deb = Some(DebPackage { package: pkg, version: input.version.clone(), arch, sha256: want.clone(), member: input.member.clone() });
        ("deb", spec, blob)
    };
    let (sha256, size, path) = match &input.member {
        Some(member) => {
            let (sha, size, path) = deb_member(name, &blob, member, cache)?;
            (sha, size, path)
        }
        None => {
            let size = std::fs::metadata(&blob).map_err(io)?.len();
            (want.clone(), size, blob)
        }
    };
    Ok(Resolved { name: name.into(), kind, source, version: input.version.clone(), sha256, size, deb, path })
}

fn fetch_url(name: &str, url: &str, want: &str, cache: &Cache) -> Result<(), InputError> {
    let err = |reason: String| InputError::Download { what: name.into(), url: url.into(), reason };
    tracing::info!("fetching {url}");
    let resp = ureq::get(url).call().map_err(|e| err(e.to_string()))?;
    let mut tmp = cache.temp_file().map_err(|e| err(e.to_string()))?;
    let (got, _) = hash_copy(&mut resp.into_reader(), &mut tmp).map_err(|e| err(e.to_string()))?;
    if got != want {
        return Err(InputError::Mismatch { what: name.into(), want: want.into(), got, got_from: url.into() });
    }
    cache.commit(tmp, want).map_err(|e| err(e.to_string()))
}

fn fetch_deb(name: &str, spec: &str, arch: &str, want: &str, cache: &Cache) -> Result<(), InputError> {
    let apt_err = |reason: String| InputError::Apt { what: name.into(), spec: spec.into(), arch: arch.into(), reason };
    let dir = cache.temp_dir().map_err(|e| apt_err(e.to_string()))?;
    tracing::info!("apt-get download {spec}");
    let out = Command::new("apt-get").arg("download").arg(spec).current_dir(dir.path()).output().map_err(|e| apt_err(format!("cannot run apt-get: {e}")))?;
    if !out.status.success() {
        return Err(apt_err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    let deb = std::fs::read_dir(dir.path())
        .map_err(|e| apt_err(e.to_string()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| apt_err("apt-get produced no .deb".into()))?;
    let (got, _) = sha256_file(&deb).map_err(|e| apt_err(e.to_string()))?;
    if got != want {
        return Err(InputError::Mismatch { what: name.into(), want: want.into(), got, got_from: deb.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default() });
    }
    cache.put_file(&deb, want).map_err(|e| apt_err(e.to_string()))
}

/// Extracts one file from a .deb's data archive into the cache (memoised by
/// the deb's hash and the member name).
fn deb_member(name: &str, deb: &Path, member: &str, cache: &Cache) -> Result<(String, u64, PathBuf), InputError> {
    let unpack = |reason: String| InputError::Unpack { what: name.into(), path: deb.to_path_buf(), reason };
    let deb_sha = deb.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default();
    let index = cache.index_path("deb-member", &format!("{deb_sha}/{member}"));
    if let Ok(sha) = std::fs::read_to_string(&index) {
        let blob = cache.blob(sha.trim());
        if let Ok(meta) = std::fs::metadata(&blob) {
            return Ok((sha.trim().to_string(), meta.len(), blob));
        }
    }
    let file = std::fs::File::open(deb).map_err(|e| unpack(e.to_string()))?;
    let data = ar_member(file, "data.tar").map_err(unpack)?;
    let want = member.trim_start_matches("./").trim_start_matches('/');
    let mut archive = tar::Archive::new(data);
    for entry in archive.entries().map_err(|e| unpack(e.to_string()))? {
        let mut entry = entry.map_err(|e| unpack(e.to_string()))?;
        let p = entry.path().map_err(|e| unpack(e.to_string()))?.to_string_lossy().to_string();
        if p.trim_start_matches("./") != want {
            continue;
        }
        let (sha, size) = store(cache, &mut entry).map_err(|e| unpack(e.to_string()))?;
        cache.write_index(&index, &sha).map_err(|e| unpack(e.to_string()))?;
        return Ok((sha.clone(), size, cache.blob(&sha)));
    }
    Err(unpack(format!("the package has no file `{member}`; list its files with `dpkg-deb -c`")))
}

/// Copies everything `r` gives into the cache, under its sha256; returns
/// the hash and the size.
pub(crate) fn store(cache: &Cache, r: &mut dyn Read) -> std::io::Result<(String, u64)> {
    let mut tmp = cache.temp_file()?;
    let (sha, size) = hash_copy(r, &mut tmp)?;
    if !cache.blob(&sha).exists() {
        cache.commit(tmp, &sha)?;
    }
    Ok((sha, size))
}

/// Opens the member of an `ar` archive whose name starts with `prefix`,
/// decompressing it by its suffix (.xz, .zst, .gz or none).
pub(crate) fn ar_member(mut f: std::fs::File, prefix: &str) -> Result<Box<dyn Read>, String> {
    let mut magic = [0u8; 8];
    f.read_exact(&mut magic).map_err(|e| e.to_string())?;
    if &magic != b"!<arch>\n" {
        return Err("not a Debian package (no ar header)".into());
    }
    loop {
        let mut hdr = [0u8; 60];
        if f.read_exact(&mut hdr).is_err() {
            return Err(format!("no {prefix}.* member in the package"));
        }
        let name = String::from_utf8_lossy(&hdr[0..16]).trim().trim_end_matches('/').to_string();
        let size: u64 = String::from_utf8_lossy(&hdr[48..58]).trim().parse().map_err(|_| "corrupt ar header".to_string())?;
        if name.starts_with(prefix) {
            let body = f.take(size);
            return Ok(if name.ends_with(".xz") {
                Box::new(xz2::read::XzDecoder::new(body))
            } else if name.ends_with(".zst") {
                Box::new(zstd::stream::read::Decoder::new(body).map_err(|e| e.to_string())?)
            } else if name.ends_with(".gz") {
                Box::new(flate2::read::GzDecoder::new(body))
            } else {
                Box::new(body)
            });
        }
        let skip = size + (size & 1);
        std::io::copy(&mut (&mut f).take(skip), &mut std::io::sink()).map_err(|e| e.to_string())?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_shapes() {
        let pin = "a".repeat(64);
        assert!(Input { file: Some("x".into()), sha256: Some(pin.clone()), ..Default::default() }.validate().is_ok());
        assert!(Input { file: Some("x".into()), ..Default::default() }.validate().unwrap_err().contains("sha256"));
        assert!(Input { file: Some("x".into()), url: Some("http://x".into()), sha256: Some(pin.clone()), ..Default::default() }.validate().is_err());
        assert!(Input { url: Some("ftp://x".into()), sha256: Some(pin.clone()), ..Default::default() }.validate().is_err());
        assert!(Input { file: Some("x".into()), sha256: Some("zz".into()), ..Default::default() }.validate().is_err());
    }

    #[test]
    fn missing_file_is_clear() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::at(d.path().join("c"));
        let i = Input { file: Some(d.path().join("nope")), sha256: Some("a".repeat(64)), ..Default::default() };
        let e = resolve("payload.k0s", &i, "amd64", &cache).unwrap_err().to_string();
        assert!(e.contains("payload.k0s") && e.contains("nope") && e.contains("missing"), "{e}");
    }

    #[test]
    fn file_pin_mismatch_and_cache() {
        let d = tempfile::tempdir().unwrap();
        let cache = Cache::at(d.path().join("c"));
        let f = d.path().join("f");
        std::fs::write(&f, b"hello").unwrap();
        let good = sha256_bytes(b"hello");
        let i = Input { file: Some(f.clone()), sha256: Some("b".repeat(64)), ..Default::default() };
        assert!(matches!(resolve("x", &i, "amd64", &cache), Err(InputError::Mismatch { .. })));
        let i = Input { file: Some(f), sha256: Some(good.clone()), ..Default::default() };
        let r = resolve("x", &i, "amd64", &cache).unwrap();
        assert_eq!(r.sha256, good);
        assert_eq!(std::fs::read(r.path).unwrap(), b"hello");
    }
}
