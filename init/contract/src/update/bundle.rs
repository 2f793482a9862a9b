//! Update bundles: reading one as a stream and checking it on the way.
//!
//! A bundle is a POSIX ustar archive with, in this order and nothing else:
//! 1. `kiln-update.toml`, the [`Manifest`];
//! 2. `kiln-update.toml.minisig`, its minisign signature (prehashed ed25519)
//!    by the image's signing key;
//! 3. the parts, in the order the manifest lists them;
//!
//! then the two zero blocks that end a tar archive. The builder writes it
//! (`kiln::image::update`); docs/updates.md describes it for users.
//!
//! [`BundleReader::open`] reads the manifest and its signature, verifies the
//! signature, then checks the manifest against the node ([`Policy`]) before
//! any part is read. [`BundleReader::next_part`] then hands out the parts
//! one at a time as readers that hash what passes through them and fail at
//! their end if the size or sha256 differ from the manifest's. Memory use is
//! bounded: the manifest and signature have size limits, and parts are
//! never buffered. A caller must treat a part as untrusted until its reader
//! has returned end-of-file (or [`PartReader::finish`] has returned `Ok`),
//! and the whole bundle as untrusted until [`BundleReader::finish`] has.

use std::fmt;
use std::io::{self, Read};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::version::Version;

/// Where a signed image keeps the public half of its signing key, which
/// update bundles must be signed with.
pub const KEY_PATH: &str = "/etc/kiln/update.pub";
use crate::minisign::{PublicKey, SignError};

pub const MANIFEST_NAME: &str = "kiln-update.toml";
pub const SIGNATURE_NAME: &str = "kiln-update.toml.minisig";
/// The manifest format this node understands.
pub const FORMAT: u32 = 1;
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;
pub const MAX_SIGNATURE_BYTES: u64 = 8 * 1024;
/// Zero bytes tolerated after the end-of-archive blocks (tar pads to its
/// record size, 10 KiB, by default).
const MAX_TRAILING_ZEROS: u64 = 64 * 1024;
const BLOCK: usize = 512;

/// What a part is, so the node knows where it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartKind {
    /// The root squashfs (dm-verity data device).
    Root,
    /// Its dm-verity hash tree.
    Verity,
    /// The unified kernel image (amd64, arm64).
    Uki,
    /// A kernel image to boot with u-boot (armv7 zImage).
    Kernel,
    /// The stage-1 initramfs (armv7).
    Initramfs,
    /// A device tree blob (armv7).
    Dtb,
}

impl fmt::Display for PartKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PartKind::Root => "root",
            PartKind::Verity => "verity",
            PartKind::Uki => "uki",
            PartKind::Kernel => "kernel",
            PartKind::Initramfs => "initramfs",
            PartKind::Dtb => "dtb",
        })
    }
}

/// `kiln-update.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The manifest format, [`FORMAT`].
    pub format: u32,
    /// The image version (the profile's `version`).
    pub version: String,
    pub arch: String,
    /// The profile's name.
    pub profile: String,
    /// The armv7 board, when the image is for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub board: Option<String>,
    /// The dm-verity root hash of the root part, in hex.
    pub roothash: String,
    /// Bundles with a kernel and initramfs (u-boot boards): the kernel
    /// command line, with `roothash=` but without the slot's `kiln.slot=`
    /// and `kiln.mbr=`, which the node adds for the slot it writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    pub source_date_epoch: u64,
    #[serde(rename = "part")]
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    /// The entry's name in the bundle.
    pub name: String,
    pub kind: PartKind,
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
}

impl Manifest {
    /// Parses and checks the manifest's own consistency (not the node's
    /// policy). Only call this on a manifest whose signature was verified.
    pub fn parse(text: &str) -> Result<Manifest, BundleError> {
        #[derive(Deserialize)]
        struct Probe {
            format: Option<u32>,
        }
        let bad = |reason: String| BundleError::BadManifest { reason };
        let probe: Probe = toml::from_str(text).map_err(|e| bad(e.message().to_string()))?;
        match probe.format {
            Some(FORMAT) => {}
            Some(found) => return Err(BundleError::UnsupportedFormat { found }),
            None => return Err(bad("key `format` is missing".into())),
        }
        let m: Manifest = toml::from_str(text).map_err(|e| bad(e.message().to_string()))?;
        m.check()?;
        Ok(m)
    }

    /// The manifest as the builder writes it.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }

    fn check(&self) -> Result<(), BundleError> {
        let bad = |reason: String| -> Result<(), BundleError> { Err(BundleError::BadManifest { reason }) };
        if let Err(e) = Version::parse(&self.version) {
            return bad(format!("key `version`: {e}"));
        }
        if !is_hex64(&self.roothash) {
            return bad(format!("key `roothash`: `{}` is not 64 lower-case hex digits", self.roothash));
        }
        if self.parts.is_empty() {
            return bad("it lists no parts".into());
        }
        for (i, p) in self.parts.iter().enumerate() {
            if let Err(why) = check_name(&p.name) {
                return bad(format!("part {}: name `{}` {why}", i + 1, p.name));
            }
            if p.name == MANIFEST_NAME || p.name == SIGNATURE_NAME {
                return bad(format!("part {}: name `{}` is the manifest's own", i + 1, p.name));
            }
            if self.parts[..i].iter().any(|q| q.name == p.name) {
                return bad(format!("part `{}` is listed twice", p.name));
            }
            if !is_hex64(&p.sha256) {
                return bad(format!("part `{}`: sha256 `{}` is not 64 lower-case hex digits", p.name, p.sha256));
            }
        }
        let count = |k: PartKind| self.parts.iter().filter(|p| p.kind == k).count();
        for k in [PartKind::Root, PartKind::Verity] {
            if count(k) != 1 {
                return bad(format!("it needs exactly one part of kind `{k}`, not {}", count(k)));
            }
        }
        let uki = count(PartKind::Uki);
        let (kernel, initramfs) = (count(PartKind::Kernel), count(PartKind::Initramfs));
        let ok = match uki {
            1 => kernel == 0 && initramfs == 0 && count(PartKind::Dtb) == 0,
            0 => kernel == 1 && initramfs == 1,
            _ => false,
        };
        if !ok {
            return bad("it needs either one `uki` part, or one `kernel` and one `initramfs` part (and any `dtb` parts)".into());
        }
        match (&self.cmdline, uki) {
            (None, 0) => return bad("a bundle with a `kernel` part needs `cmdline`".into()),
            (Some(_), 1) => return bad("a bundle with a `uki` part has its cmdline inside the UKI, not in `cmdline`".into()),
            (Some(c), _) if !c.split_whitespace().any(|w| w == format!("roothash={}", self.roothash)) => {
                return bad(format!("key `cmdline` does not carry roothash={}", self.roothash))
            }
            (Some(c), _) if c.split_whitespace().any(|w| w.starts_with("kiln.mbr=") || w.starts_with("kiln.slot=")) => {
                return bad("key `cmdline` has `kiln.mbr=` or `kiln.slot=`, which the node sets for the slot it writes".into())
            }
            _ => {}
        }
        Ok(())
    }

    pub fn part(&self, kind: PartKind) -> Option<&Part> {
        self.parts.iter().find(|p| p.kind == kind)
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A part's name: a relative path of plain components that fits a ustar
/// header.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 200 {
        return Err("must be 1 to 200 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b)) {
        return Err("may only have letters, digits, `.`, `_`, `-` and `/`");
    }
    if name.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err("must be a relative path without empty, `.` or `..` components");
    }
    if name.len() > 100 && split_ustar(name).is_none() {
        return Err("is too long for a ustar header");
    }
    Ok(())
}

/// Splits a long name into ustar's prefix (≤ 155) and name (≤ 100) at a
/// `/`, the way the builder's tar writer does.
pub fn split_ustar(name: &str) -> Option<(&str, &str)> {
    if name.len() <= 100 {
        return Some(("", name));
    }
    name.char_indices()
        .filter(|&(i, c)| c == '/' && i <= 155 && name.len() - i - 1 <= 100 && i > 0)
        .map(|(i, _)| (&name[..i], &name[i + 1..]))
        .next()
}

/// What the node accepts.
#[derive(Debug, Clone)]
pub struct Policy<'a> {
    /// The keys a bundle may be signed with (the image's `update.pub`).
    pub keys: &'a [PublicKey],
    /// This node's arch (amd64, arm64, armv7).
    pub arch: &'a str,
    /// The profile the running image was built from.
    pub profile: &'a str,
    /// The running image's version, when it has one.
    pub running_version: Option<&'a str>,
    /// Take a bundle older than the running image.
    pub allow_downgrade: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("reading the update bundle failed at byte {offset}: {source}")]
    Io { offset: u64, source: io::Error },
    #[error("the update bundle is truncated: it ends inside {what} (after {offset} bytes); download it again, completely")]
    Truncated { what: String, offset: u64 },
    #[error("the update bundle is not a kiln bundle (a ustar archive): at byte {offset}, {reason}; give the `update.kiln` file of a kiln build")]
    NotABundle { offset: u64, reason: String },
    #[error("the update bundle has `{found}` where `{expected}` belongs (at byte {offset}); it was not written by kiln or was altered")]
    UnexpectedEntry { expected: String, found: String, offset: u64 },
    #[error("the update bundle's `{name}` is {size} bytes, more than the {limit} allowed; it was not written by kiln or was altered")]
    TooLarge { name: String, size: u64, limit: u64 },
    #[error("the update bundle has no signature check: no public key was given (the image's {key} is missing; only images built with a signing key take updates)", key = KEY_PATH)]
    NoKeys,
    #[error("the update bundle's signature is not valid: {source}. Take bundles built with the same signing key as this image, and only from where you trust")]
    Signature { source: SignError },
    #[error("the update bundle's manifest is not valid: {reason}")]
    BadManifest { reason: String },
    #[error("the update bundle's manifest has format {found}, but this node reads format {FORMAT}; update the node with a bundle from the kiln version that built it first, or reinstall")]
    UnsupportedFormat { found: u32 },
    #[error("the update bundle is for {bundle} but this node is {node}; build it from the node's profile")]
    WrongArch { bundle: String, node: String },
    #[error("the update bundle was built from profile `{bundle}` but this node runs profile `{node}`; build the update from `{node}`, or reinstall the node to change its profile")]
    WrongProfile { bundle: String, node: String },
    #[error("the update bundle is version {bundle}, older than the running {running}; build a newer version, or allow downgrades on this node to roll back on purpose")]
    Downgrade { bundle: String, running: String },
    #[error("the running image's version `{running}` cannot be compared: {reason}")]
    BadRunningVersion { running: String, reason: String },
    #[error("part `{name}` is {found} bytes in the archive, but the manifest says {expected}; the bundle was altered")]
    SizeMismatch { name: String, expected: u64, found: u64 },
    #[error("part `{name}` has sha256 {found}, but the manifest says {expected}; the bundle is corrupt or was altered: download it again")]
    Sha256Mismatch { name: String, expected: String, found: String },
    #[error("the update bundle has more after its last part (at byte {offset}): {what}; it was not written by kiln or was altered")]
    TrailingData { offset: u64, what: String },
    #[error("the update bundle's reader was finished before part `{name}` was read")]
    Unread { name: String },
    #[error("the update bundle's reader was used again after an error; start over with a new reader")]
    UsedAfterError,
    /// An I/O error that did not come from the bundle (writing a part out,
    /// say), passed through [`BundleError::from_io`].
    #[error("{source}")]
    Other { source: io::Error },
}

impl BundleError {
    /// The bundle error inside an `io::Error` from a [`PartReader`], or
    /// [`BundleError::Other`] for any other I/O error (from `io::copy`'s
    /// writer, say).
    pub fn from_io(e: io::Error) -> BundleError {
        if !e.get_ref().is_some_and(|inner| inner.is::<BundleError>()) {
            return BundleError::Other { source: e };
        }
        match e.into_inner().map(|inner| inner.downcast::<BundleError>()) {
            Some(Ok(b)) => *b,
            Some(Err(inner)) => BundleError::Other { source: io::Error::other(inner) },
            None => BundleError::UsedAfterError,
        }
    }
}

impl From<BundleError> for io::Error {
    fn from(e: BundleError) -> io::Error {
        io::Error::other(e)
    }
}

/// A ustar header, reduced to what the reader needs.
#[derive(Debug)]
struct Entry {
    name: String,
    size: u64,
}

struct Current {
    index: usize,
    remaining: u64,
    padding: u64,
    hasher: Sha256,
    done: bool,
}

/// Reads a bundle from any byte stream; see the module docs.
pub struct BundleReader<R: Read> {
    inner: R,
    offset: u64,
    manifest: Manifest,
    trusted_comment: String,
    next: usize,
    current: Option<Current>,
    failed: bool,
}

impl<R: Read> BundleReader<R> {
    /// Reads and verifies the manifest, and checks it against `policy`.
    pub fn open(inner: R, policy: &Policy) -> Result<BundleReader<R>, BundleError> {
        if policy.keys.is_empty() {
            return Err(BundleError::NoKeys);
        }
        let mut r = BundleReader {
            inner,
            offset: 0,
            manifest: Manifest { format: FORMAT, version: String::new(), arch: String::new(), profile: String::new(), board: None, roothash: String::new(), cmdline: None, source_date_epoch: 0, parts: Vec::new() },
            trusted_comment: String::new(),
            next: 0,
            current: None,
            failed: false,
        };
        let manifest = r.small_entry(MANIFEST_NAME, MAX_MANIFEST_BYTES, "the manifest")?;
        let signature = r.small_entry(SIGNATURE_NAME, MAX_SIGNATURE_BYTES, "the manifest's signature")?;
        let signature = String::from_utf8(signature).map_err(|_| BundleError::Signature {
            source: SignError::Malformed { file: "signature", line: 1, reason: "not UTF-8 text".into() },
        })?;
        r.trusted_comment = verify(policy.keys, &manifest, &signature)?;
        let text = String::from_utf8(manifest).map_err(|_| BundleError::BadManifest { reason: "it is not UTF-8 text".into() })?;
        r.manifest = Manifest::parse(&text)?;
        check_policy(&r.manifest, policy)?;
        Ok(r)
    }

    /// The least length the whole bundle can have, from its manifest: what
    /// was read so far, each part's header, data and padding, and the two
    /// end-of-archive blocks. Known once opened, so a file shorter than this
    /// is refused before anything is written.
    pub fn expected_len(&self) -> u64 {
        self.offset + self.manifest.parts.iter().map(|p| BLOCK as u64 + p.size + padding(p.size)).sum::<u64>() + 2 * BLOCK as u64
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The signature's trusted comment (the builder puts profile, arch and
    /// version there, for logs).
    pub fn trusted_comment(&self) -> &str {
        &self.trusted_comment
    }

    /// The next part, or `None` after the last. An unfinished previous part
    /// is read to its end and checked first.
    pub fn next_part(&mut self) -> Result<Option<PartReader<'_, R>>, BundleError> {
        self.guard(|r| {
            r.finish_current()?;
            let Some(part) = r.manifest.parts.get(r.next).cloned() else { return Ok(false) };
            let at = r.offset;
            let entry = r.header(&format!("the header of part `{}`", part.name))?;
            let Some(entry) = entry else {
                return Err(BundleError::Truncated { what: format!("the archive: part `{}` is missing", part.name), offset: at });
            };
            if entry.name != part.name {
                return Err(BundleError::UnexpectedEntry { expected: part.name, found: entry.name, offset: at });
            }
            if entry.size != part.size {
                return Err(BundleError::SizeMismatch { name: part.name, expected: part.size, found: entry.size });
            }
            r.current = Some(Current { index: r.next, remaining: entry.size, padding: padding(entry.size), hasher: Sha256::new(), done: false });
            r.next += 1;
            if entry.size == 0 {
                r.complete_current()?;
            }
            Ok(true)
        })
        .map(|more| more.then_some(PartReader { bundle: self }))
    }

    /// Checks that every part was read and that the archive ends properly.
    pub fn finish(mut self) -> Result<Manifest, BundleError> {
        self.guard(|r| {
            r.finish_current()?;
            if let Some(p) = r.manifest.parts.get(r.next) {
                return Err(BundleError::Unread { name: p.name.clone() });
            }
            let at = r.offset;
            if let Some(e) = r.header("the end of the archive")? {
                return Err(BundleError::TrailingData { offset: at, what: format!("an entry `{}`", e.name) });
            }
            // The second zero block.
            let mut block = [0u8; BLOCK];
            r.read_exact_at(&mut block, "the end of the archive")?;
            if block.iter().any(|&b| b != 0) {
                return Err(BundleError::TrailingData { offset: r.offset - BLOCK as u64, what: "a damaged end-of-archive marker".into() });
            }
            let mut extra = 0u64;
            loop {
                let n = r.read_some(&mut block)?;
                if n == 0 {
                    break;
                }
                if block[..n].iter().any(|&b| b != 0) || extra + n as u64 > MAX_TRAILING_ZEROS {
                    return Err(BundleError::TrailingData { offset: r.offset - n as u64, what: "bytes after the end-of-archive marker".into() });
                }
                extra += n as u64;
            }
            Ok(())
        })?;
        Ok(self.manifest)
    }

    /// Runs `f`, and refuses any further use after it failed once.
    fn guard<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, BundleError>) -> Result<T, BundleError> {
        if self.failed {
            return Err(BundleError::UsedAfterError);
        }
        let out = f(self);
        if out.is_err() {
            self.failed = true;
        }
        out
    }

    /// Reads one whole entry of at most `limit` bytes, which must be `name`.
    fn small_entry(&mut self, name: &str, limit: u64, what: &str) -> Result<Vec<u8>, BundleError> {
        let at = self.offset;
        let entry = self.header(&format!("the header of {what}"))?.ok_or_else(|| BundleError::NotABundle { offset: at, reason: format!("the archive is empty where {what} belongs") })?;
        if entry.name != name {
            return Err(BundleError::UnexpectedEntry { expected: name.into(), found: entry.name, offset: at });
        }
        if entry.size > limit {
            return Err(BundleError::TooLarge { name: name.into(), size: entry.size, limit });
        }
        let mut data = vec![0u8; entry.size as usize];
        self.read_exact_at(&mut data, what)?;
        let mut pad = [0u8; BLOCK];
        self.read_exact_at(&mut pad[..padding(entry.size) as usize], what)?;
        Ok(data)
    }

    /// Reads a header block: `None` for a zero block (the end of the
    /// archive).
    fn header(&mut self, what: &str) -> Result<Option<Entry>, BundleError> {
        let at = self.offset;
        let mut h = [0u8; BLOCK];
        self.read_exact_at(&mut h, what)?;
        if h.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        parse_header(&h).map(Some).map_err(|reason| BundleError::NotABundle { offset: at, reason })
    }

    fn finish_current(&mut self) -> Result<(), BundleError> {
        let mut buf = [0u8; 8192];
        while self.current.as_ref().is_some_and(|c| !c.done) {
            self.read_part(&mut buf)?;
        }
        self.current = None;
        Ok(())
    }

    /// Reads part data into `buf`, checking the part at its end.
    fn read_part(&mut self, buf: &mut [u8]) -> Result<usize, BundleError> {
        let Some(c) = self.current.as_mut() else { return Ok(0) };
        if c.done || buf.is_empty() {
            return Ok(0);
        }
        if c.remaining == 0 {
            self.complete_current()?;
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(c.remaining).unwrap_or(usize::MAX));
        let index = c.index;
        let n = self.read_some(&mut buf[..want])?;
        if n == 0 {
            let what = format!("part `{}`", self.manifest.parts[index].name);
            return Err(BundleError::Truncated { what, offset: self.offset });
        }
        let Some(c) = self.current.as_mut() else { return Ok(0) };
        c.hasher.update(&buf[..n]);
        c.remaining -= n as u64;
        if c.remaining == 0 {
            self.complete_current()?;
        }
        Ok(n)
    }

    /// The part's data is all read: check its hash, skip its padding.
    fn complete_current(&mut self) -> Result<(), BundleError> {
        let Some(c) = self.current.as_mut() else { return Ok(()) };
        let part = &self.manifest.parts[c.index];
        let found = hex(&std::mem::take(&mut c.hasher).finalize());
        if found != part.sha256 {
            return Err(BundleError::Sha256Mismatch { name: part.name.clone(), expected: part.sha256.clone(), found });
        }
        let (pad, what) = (c.padding as usize, format!("part `{}`", part.name));
        let mut block = [0u8; BLOCK];
        self.read_exact_at(&mut block[..pad], &what)?;
        if let Some(c) = self.current.as_mut() {
            c.done = true;
        }
        Ok(())
    }

    fn read_exact_at(&mut self, buf: &mut [u8], what: &str) -> Result<(), BundleError> {
        let mut got = 0;
        while got < buf.len() {
            let n = self.read_some(&mut buf[got..])?;
            if n == 0 {
                return Err(BundleError::Truncated { what: what.to_string(), offset: self.offset });
            }
            got += n;
        }
        Ok(())
    }

    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, BundleError> {
        loop {
            match self.inner.read(buf) {
                Ok(n) => {
                    self.offset += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(BundleError::Io { offset: self.offset, source }),
            }
        }
    }
}

/// One part's data. It ends with an error instead of end-of-file when the
/// part is short or its sha256 differs (an `io::Error` carrying a
/// [`BundleError`]; see [`BundleError::from_io`]).
pub struct PartReader<'a, R: Read> {
    bundle: &'a mut BundleReader<R>,
}

impl<R: Read> PartReader<'_, R> {
    pub fn part(&self) -> &Part {
        let i = self.bundle.current.as_ref().map_or(0, |c| c.index);
        &self.bundle.manifest.parts[i]
    }

    /// Reads the rest of the part (discarding it) and checks it.
    pub fn finish(self) -> Result<(), BundleError> {
        self.bundle.guard(|r| r.finish_current())
    }
}

impl<R: Read> Read for PartReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(self.bundle.guard(|r| r.read_part(buf))?)
    }
}

fn verify(keys: &[PublicKey], data: &[u8], signature: &str) -> Result<String, BundleError> {
    let mut first_err = None;
    for k in keys {
        match k.verify(data, signature) {
            Ok(comment) => return Ok(comment),
            // A key with the signature's id that refuses it says more than
            // one with another id.
            Err(e @ SignError::WrongKey { .. }) => {
                first_err.get_or_insert(e);
            }
            Err(e) => return Err(BundleError::Signature { source: e }),
        }
    }
    Err(BundleError::Signature { source: first_err.unwrap_or(SignError::BadSignature) })
}

fn check_policy(m: &Manifest, p: &Policy) -> Result<(), BundleError> {
    if m.arch != p.arch {
        return Err(BundleError::WrongArch { bundle: m.arch.clone(), node: p.arch.into() });
    }
    if m.profile != p.profile {
        return Err(BundleError::WrongProfile { bundle: m.profile.clone(), node: p.profile.into() });
    }
    if let (Some(running), false) = (p.running_version, p.allow_downgrade) {
        let bundle = Version::parse(&m.version).map_err(|reason| BundleError::BadManifest { reason })?;
        let current = Version::parse(running).map_err(|reason| BundleError::BadRunningVersion { running: running.into(), reason })?;
        if bundle < current {
            return Err(BundleError::Downgrade { bundle: m.version.clone(), running: running.into() });
        }
    }
    Ok(())
}

fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

/// Parses a ustar header block that is not all zeros.
fn parse_header(h: &[u8; BLOCK]) -> Result<Entry, String> {
    let stored = octal(&h[148..156]).ok_or("the header checksum is not a number")?;
    let sum: u64 = h.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u64::from(b) }).sum();
    if stored != sum {
        return Err("a header checksum does not match (damaged, or not a tar archive)".into());
    }
    if &h[257..263] != b"ustar\0" || &h[263..265] != b"00" {
        return Err("the header is not POSIX ustar".into());
    }
    let field = |r: std::ops::Range<usize>| -> Result<String, String> {
        let raw = &h[r];
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        String::from_utf8(raw[..end].to_vec()).map_err(|_| "an entry name is not UTF-8".to_string())
    };
    let (name, prefix) = (field(0..100)?, field(345..500)?);
    let name = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
    let shown: String = name.chars().map(|c| if c.is_control() { '?' } else { c }).collect();
    if !matches!(h[156], b'0' | 0) {
        return Err(format!("entry `{shown}` is not a regular file (type {:?})", char::from(h[156])));
    }
    let size = size_field(&h[124..136]).ok_or_else(|| format!("entry `{shown}` has a malformed size"))?;
    Ok(Entry { name: shown, size })
}

/// A size: octal digits, or GNU's base-256 for sizes of 8 GiB and more.
fn size_field(f: &[u8]) -> Option<u64> {
    if f[0] & 0x80 != 0 {
        if f[0] != 0x80 || f[1..4].iter().any(|&b| b != 0) {
            return None;
        }
        return Some(f[4..].iter().fold(0u64, |n, &b| n << 8 | u64::from(b)));
    }
    octal(f)
}

fn octal(f: &[u8]) -> Option<u64> {
    let s = f.iter().skip_while(|&&b| b == b' ').take_while(|&&b| b != 0 && b != b' ');
    let mut n: u64 = 0;
    let mut any = false;
    for &b in s {
        if !(b'0'..=b'7').contains(&b) {
            return None;
        }
        n = n.checked_mul(8)?.checked_add(u64::from(b - b'0'))?;
        any = true;
    }
    any.then_some(n)
}

pub use crate::digest::hex;

/// Writing bundles' tar framing by hand, independently of the builder's tar
/// crate: for the tests here and kiln-init's fuzz harnesses
/// (`kiln_init::fuzzing`), which build bundles to feed the reader.
#[doc(hidden)]
pub mod testing {
    use crate::update::bundle::{padding, split_ustar, BLOCK};

    /// A ustar header for a regular file (mode 0644, owner root, mtime 0),
    /// as the builder writes them; a long name is split into ustar's prefix
    /// and name. Panics on a name ustar cannot hold ([`crate::update::bundle::check_name`]).
    pub fn ustar_header(name: &str, size: u64) -> [u8; BLOCK] {
        let mut h = [0u8; BLOCK];
        let (prefix, short) = split_ustar(name).expect("a name ustar can hold");
        h[..short.len()].copy_from_slice(short.as_bytes());
        h[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
        h[100..108].copy_from_slice(b"0000644\0");
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[136..148].copy_from_slice(b"00000000000\0");
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    /// A tar entry appended to `out`: header, data, zero padding to the block.
    pub fn ustar_entry(out: &mut Vec<u8>, name: &str, data: &[u8]) {
        out.extend_from_slice(&ustar_header(name, data.len() as u64));
        out.extend_from_slice(data);
        out.resize(out.len() + padding(data.len() as u64) as usize, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{ustar_entry as entry, ustar_header as header};
    use super::*;
    use crate::minisign::vectors::{VEC_PUB, VEC_SIG};
    use proptest::prelude::*;

    fn sha(d: &[u8]) -> String {
        hex(&Sha256::digest(d))
    }

    fn manifest(parts: &[(&str, PartKind, &[u8])]) -> Manifest {
        Manifest {
            format: FORMAT,
            version: "1.2.10".into(),
            arch: "amd64".into(),
            profile: "edge".into(),
            board: None,
            roothash: "ab".repeat(32),
            cmdline: None,
            source_date_epoch: 1_700_000_000,
            parts: parts.iter().map(|(n, k, d)| Part { name: n.to_string(), kind: *k, size: d.len() as u64, sha256: sha(d) }).collect(),
        }
    }

    #[test]
    fn manifest_round_trips_and_checks_itself() {
        let m = manifest(&[("root.squashfs", PartKind::Root, b"r"), ("root.verity", PartKind::Verity, b"v"), ("kiln.efi", PartKind::Uki, b"u")]);
        let text = m.to_toml().unwrap();
        assert!(text.contains("[[part]]\nname = \"root.squashfs\"\nkind = \"root\""), "{text}");
        assert_eq!(Manifest::parse(&text).unwrap(), m);

        let e = Manifest::parse(&text.replace("format = 1", "format = 2")).unwrap_err();
        assert!(matches!(e, BundleError::UnsupportedFormat { found: 2 }), "{e}");
        let e = Manifest::parse(&text.replace("kind = \"uki\"", "kind = \"kernel\"")).unwrap_err().to_string();
        assert!(e.contains("either one `uki` part"), "{e}");
        let e = Manifest::parse(&text.replace("kiln.efi", "../kiln.efi")).unwrap_err().to_string();
        assert!(e.contains("name `../kiln.efi`"), "{e}");
        let e = Manifest::parse(&text.replace("root.verity", "root.squashfs")).unwrap_err().to_string();
        assert!(e.contains("listed twice"), "{e}");
        let e = Manifest::parse(&format!("{text}\nextra = 1\n")).unwrap_err().to_string();
        assert!(e.contains("manifest is not valid"), "{e}");
        let e = Manifest::parse(&text.replace("1.2.10", "1.2-rc")).unwrap_err().to_string();
        assert!(e.contains("key `version`"), "{e}");

        let mut arm = manifest(&[("root.squashfs", PartKind::Root, b"r"), ("root.verity", PartKind::Verity, b"v"), ("zImage", PartKind::Kernel, b"k"), ("initramfs.cpio.zst", PartKind::Initramfs, b"i"), ("dtbs/am335x-boneblack.dtb", PartKind::Dtb, b"d")]);
        let e = Manifest::parse(&arm.to_toml().unwrap()).unwrap_err().to_string();
        assert!(e.contains("needs `cmdline`"), "{e}");
        arm.cmdline = Some(format!("roothash={} quiet", arm.roothash));
        assert_eq!(Manifest::parse(&arm.to_toml().unwrap()).unwrap(), arm);
        for (bad, why) in [("quiet", "does not carry roothash"), ("roothash=ab kiln.slot=b", "does not carry roothash")] {
            arm.cmdline = Some(bad.into());
            let e = Manifest::parse(&arm.to_toml().unwrap()).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        arm.cmdline = Some(format!("roothash={} kiln.mbr=1,2,3", arm.roothash));
        let e = Manifest::parse(&arm.to_toml().unwrap()).unwrap_err().to_string();
        assert!(e.contains("which the node sets"), "{e}");
        let mut uki = m.clone();
        uki.cmdline = Some(format!("roothash={}", uki.roothash));
        let e = Manifest::parse(&uki.to_toml().unwrap()).unwrap_err().to_string();
        assert!(e.contains("inside the UKI"), "{e}");
    }

    #[test]
    fn names() {
        assert!(check_name("dtbs/a.dtb").is_ok());
        for bad in ["", "/abs", "a//b", "a/./b", "a/../b", "a b", "a\\b", "ü"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        let long = format!("{}/{}", "d".repeat(150), "f".repeat(49));
        assert!(check_name(&long).is_ok());
        assert_eq!(split_ustar(&long).unwrap(), (&long[..150], &long[151..]));
        assert!(check_name(&"x".repeat(101)).is_err());
    }

    #[test]
    fn headers() {
        let h = header("root.squashfs", 0o1234);
        let e = parse_header(&h).unwrap();
        assert_eq!((e.name.as_str(), e.size), ("root.squashfs", 0o1234));
        let mut bad = h;
        bad[0] ^= 1;
        assert!(parse_header(&bad).unwrap_err().contains("checksum"));
        assert_eq!(size_field(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 1]), Some(0x201));
        assert_eq!(size_field(b"00000000017\0"), Some(15));
        assert_eq!(size_field(b"0000000008\0\0"), None);
        assert_eq!(size_field(b"\0\0\0\0\0\0\0\0\0\0\0\0"), None);
    }

    /// The signature check is exercised with real signatures in the
    /// builder's tests (kiln signs); here, an unsigned manifest must stop
    /// everything before the parts.
    #[test]
    fn wrong_signature_stops_before_the_parts() {
        let m = manifest(&[("root.squashfs", PartKind::Root, b"r"), ("root.verity", PartKind::Verity, b"v"), ("kiln.efi", PartKind::Uki, b"u")]);
        let mut b = Vec::new();
        entry(&mut b, MANIFEST_NAME, m.to_toml().unwrap().as_bytes());
        entry(&mut b, SIGNATURE_NAME, VEC_SIG.as_bytes());
        let key = PublicKey::from_file(VEC_PUB).unwrap();
        let keys = [key];
        let policy = Policy { keys: &keys, arch: "amd64", profile: "edge", running_version: None, allow_downgrade: false };
        let e = BundleReader::open(&b[..], &policy).err().unwrap();
        assert!(matches!(e, BundleError::Signature { source: SignError::BadSignature }), "{e}");
        assert!(e.to_string().contains("signature is not valid"), "{e}");

        let e = BundleReader::open(&b[..], &Policy { keys: &[], ..policy.clone() }).err().unwrap();
        assert!(matches!(e, BundleError::NoKeys), "{e}");

        // Entries out of order.
        let mut swapped = Vec::new();
        entry(&mut swapped, SIGNATURE_NAME, VEC_SIG.as_bytes());
        entry(&mut swapped, MANIFEST_NAME, m.to_toml().unwrap().as_bytes());
        let e = BundleReader::open(&swapped[..], &policy).err().unwrap();
        assert!(matches!(e, BundleError::UnexpectedEntry { .. }), "{e}");

        let mut big = Vec::new();
        entry(&mut big, MANIFEST_NAME, &vec![b'#'; MAX_MANIFEST_BYTES as usize + 1]);
        let e = BundleReader::open(&big[..], &policy).err().unwrap();
        assert!(matches!(e, BundleError::TooLarge { .. }), "{e}");

        let e = BundleReader::open(&b[..700], &policy).err().unwrap();
        assert!(matches!(e, BundleError::Truncated { .. }), "{e}");
        let e = BundleReader::open(&[][..], &policy).err().unwrap();
        assert!(matches!(e, BundleError::Truncated { .. }), "{e}");
        let e = BundleReader::open(&[0u8; 1024][..], &policy).err().unwrap();
        assert!(matches!(e, BundleError::NotABundle { .. }), "{e}");
    }

    #[test]
    fn policy() {
        let m = manifest(&[("root.squashfs", PartKind::Root, b"r"), ("root.verity", PartKind::Verity, b"v"), ("kiln.efi", PartKind::Uki, b"u")]);
        let p = Policy { keys: &[], arch: "amd64", profile: "edge", running_version: Some("1.2.9"), allow_downgrade: false };
        assert!(check_policy(&m, &p).is_ok());
        assert!(check_policy(&m, &Policy { running_version: Some("1.2.10.0"), ..p.clone() }).is_ok());
        assert!(check_policy(&m, &Policy { running_version: None, ..p.clone() }).is_ok());
        let e = check_policy(&m, &Policy { arch: "armv7", ..p.clone() }).unwrap_err().to_string();
        assert_eq!(e, "the update bundle is for amd64 but this node is armv7; build it from the node's profile");
        let e = check_policy(&m, &Policy { profile: "core", ..p.clone() }).unwrap_err().to_string();
        assert!(e.contains("profile `edge`") && e.contains("runs profile `core`"), "{e}");
        let newer = Policy { running_version: Some("1.10"), ..p.clone() };
        let e = check_policy(&m, &newer).unwrap_err().to_string();
        assert!(e.contains("version 1.2.10, older than the running 1.10") && e.contains("allow downgrades"), "{e}");
        assert!(check_policy(&m, &Policy { allow_downgrade: true, ..newer }).is_ok());
        let e = check_policy(&m, &Policy { running_version: Some("dev"), ..p }).unwrap_err();
        assert!(matches!(e, BundleError::BadRunningVersion { .. }), "{e}");
    }

    #[test]
    fn io_errors_carry_bundle_errors() {
        let e: io::Error = BundleError::Truncated { what: "x".into(), offset: 3 }.into();
        assert!(matches!(BundleError::from_io(e), BundleError::Truncated { offset: 3, .. }));
        let e = BundleError::from_io(io::Error::other("disk full"));
        assert!(matches!(e, BundleError::Other { .. }) && e.to_string() == "disk full");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let keys = [PublicKey::from_file(VEC_PUB).unwrap()];
            let policy = Policy { keys: &keys, arch: "amd64", profile: "edge", running_version: None, allow_downgrade: false };
            prop_assert!(BundleReader::open(&data[..], &policy).is_err());
        }

        #[test]
        fn arbitrary_headers_never_panic(data in proptest::collection::vec(any::<u8>(), BLOCK..=BLOCK), name in "[a-z./]{0,120}", size in any::<u64>()) {
            let mut h = [0u8; BLOCK];
            h.copy_from_slice(&data);
            let _ = parse_header(&h);
            let _ = check_name(&name);
            let _ = split_ustar(&name);
            if check_name(&name).is_ok() {
                let h = header(&name, size % 0o77777777777);
                let e = parse_header(&h).unwrap();
                prop_assert_eq!(e.name, name);
            }
        }
    }
}
