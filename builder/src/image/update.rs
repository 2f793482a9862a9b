//! `update.kiln`: the signed update bundle, the `update` output.
//!
//! A ustar stream of the manifest (`kiln-update.toml`), its minisign
//! signature, then the parts in the manifest's order; the node reads it with
//! `kiln_contract::update::BundleReader`, which holds the format's rules. Users'
//! description: docs/updates.md.
//!
//! Deterministic: entries have mode 0644, uid and gid 0, no user names and
//! the profile's `source_date_epoch` as mtime, and the manifest has a fixed
//! key order, so the same build gives the same bytes. (The signature is
//! deterministic too: ed25519 signs without randomness.) Before the bundle
//! is renamed into place it is read back with the node's reader.

use crate::image::disk::RootImage;
use crate::arch::Arch;
use crate::identity::Identity;
use crate::provenance::sign::KeyPair;
use anyhow::{bail, Context, Result};
use kiln_contract::update::bundle::{self, Manifest, Part, PartKind, FORMAT, MANIFEST_NAME, SIGNATURE_NAME};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The bundle's file name in the build's output directory.
pub const FILE: &str = "update.kiln";

/// What the profile error and the pipeline say when there is no key.
pub const NEEDS_KEY: &str = "the `update` output needs a signing key, since nodes only take signed updates: set `sign.key` (or `sign.key_command`) in the profile, or KILN_SIGNING_KEY; make a key with `kiln key generate`";

/// A part's bytes: a file, or bytes the build holds in memory.
pub enum Content {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

impl Content {
    fn open(&self) -> Result<Box<dyn Read + '_>> {
        Ok(match self {
            Content::Host(p) => Box::new(std::io::BufReader::new(std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?)),
            Content::Bytes(b) => Box::new(&b[..]),
        })
    }

    fn describe(&self) -> String {
        match self {
            Content::Host(p) => p.display().to_string(),
            Content::Bytes(_) => "(built in memory)".into(),
        }
    }
}

pub struct PartSource {
    pub name: String,
    pub kind: PartKind,
    pub content: Content,
}

/// Everything a bundle records besides its parts.
pub struct Spec<'a> {
    pub version: &'a str,
    pub arch: Arch,
    pub profile: &'a str,
    pub board: Option<&'a str>,
    pub roothash: &'a str,
    /// u-boot boards: the kernel cmdline (see `Manifest::cmdline`).
    pub cmdline: Option<&'a str>,
    pub source_date_epoch: u64,
}

/// How the image boots, which decides the boot parts.
pub enum Boot<'a> {
    /// amd64, arm64, and armv7 on UEFI: the UKI.
    Uki(&'a Path),
    /// armv7 boards (u-boot): the zImage, the stage-1 initramfs, the dtb
    /// (its name under the kernel's dts directory, and the file).
    Board { zimage: &'a Path, dtb: Option<(&'a str, PathBuf)>, cmdline: &'a str },
}

/// The parts of a build, in bundle order.
pub fn parts(root: &RootImage, boot: &Boot) -> Vec<PartSource> {
    let part = |name: &str, kind, content| PartSource { name: name.into(), kind, content };
    let mut v = vec![part("root.squashfs", PartKind::Root, Content::Host(root.squashfs.clone())), part("root.verity", PartKind::Verity, Content::Host(root.verity_path.clone()))];
    match boot {
        Boot::Uki(p) => v.push(part("kiln.efi", PartKind::Uki, Content::Host(p.to_path_buf()))),
        Boot::Board { zimage, dtb, .. } => {
            v.push(part("zImage", PartKind::Kernel, Content::Host(zimage.to_path_buf())));
            v.push(part("initramfs.cpio.zst", PartKind::Initramfs, Content::Bytes(root.initrd.clone())));
            if let Some((name, file)) = dtb {
                v.push(part(&format!("dtbs/{name}"), PartKind::Dtb, Content::Host(file.clone())));
            }
        }
    }
    v
}

/// Writes the bundle of a build to `dir/update.kiln`.
pub fn write_build(dir: &Path, id: &Identity, key: &KeyPair, root: &RootImage, boot: &Boot) -> Result<Manifest> {
    let Some(version) = id.version else { bail!("{}: the `update` output needs `version = \"…\"`", id.profile.display()) };
    let cmdline = match boot {
        Boot::Board { cmdline, .. } => Some(*cmdline),
        Boot::Uki(_) => None,
    };
    let spec = Spec { version, arch: id.arch, profile: id.name, board: id.board, roothash: &root.verity.root_hex(), cmdline, source_date_epoch: id.source_date_epoch };
    write(&dir.join(FILE), &spec, &parts(root, boot), key)
}

/// Writes a bundle to `out`, through a temporary file beside it that is
/// renamed once complete. Returns the manifest it holds.
pub fn write(out: &Path, spec: &Spec, parts: &[PartSource], key: &KeyPair) -> Result<Manifest> {
    let mut listed = Vec::with_capacity(parts.len());
    for p in parts {
        bundle::check_name(&p.name).map_err(|why| anyhow::anyhow!("update bundle part name `{}` {why}", p.name))?;
        let (size, sha256) = hash(&mut *p.content.open()?).with_context(|| format!("reading {} for the update bundle", p.content.describe()))?;
        listed.push(Part { name: p.name.clone(), kind: p.kind, size, sha256 });
    }
    let manifest = Manifest {
        format: FORMAT,
        version: spec.version.into(),
        arch: spec.arch.to_string(),
        profile: spec.profile.into(),
        board: spec.board.map(Into::into),
        roothash: spec.roothash.into(),
        cmdline: spec.cmdline.map(Into::into),
        source_date_epoch: spec.source_date_epoch,
        parts: listed,
    };
    let text = manifest.to_toml().context("writing the update manifest")?;
    // What the node would refuse for its form, refuse here.
    Manifest::parse(&text).with_context(|| format!("the update manifest kiln made is not valid:\n{text}"))?;
    let signature = key.sign(text.as_bytes(), &format!("kiln update profile={} arch={} version={}", spec.profile, spec.arch, spec.version));

    let dir = out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new().prefix(".update-").tempfile_in(dir).with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(tmp.as_file().try_clone()?));
    let epoch = spec.source_date_epoch;
    tar.append(&header(MANIFEST_NAME, text.len() as u64, epoch)?, text.as_bytes())?;
    tar.append(&header(SIGNATURE_NAME, signature.len() as u64, epoch)?, signature.as_bytes())?;
    for (p, listed) in parts.iter().zip(&manifest.parts) {
        // Hashed again on the way in: a file that changed since it was
        // hashed above would make a bundle every node refuses.
        let mut reader = HashingReader { inner: p.content.open()?, hasher: Sha256::new(), len: 0 };
        tar.append(&header(&p.name, listed.size, epoch)?, &mut reader).with_context(|| format!("adding {} to the update bundle", p.content.describe()))?;
        if reader.len != listed.size || bundle::hex(&reader.hasher.finalize()) != listed.sha256 {
            bail!("{} changed while the update bundle was written", p.content.describe());
        }
    }
    let mut w = tar.into_inner().context("finishing the update bundle")?;
    w.flush()?;
    drop(w);
    tmp.as_file().sync_all()?;
    check(tmp.path(), &manifest, key).with_context(|| format!("checking the update bundle kiln wrote ({})", tmp.path().display()))?;
    tmp.persist(out).with_context(|| format!("renaming the update bundle into {}", out.display()))?;
    Ok(manifest)
}

/// Reads the bundle back the way a node of the same profile would.
fn check(path: &Path, manifest: &Manifest, key: &KeyPair) -> Result<()> {
    let keys = [key.public()];
    let policy = bundle::Policy { keys: &keys, arch: &manifest.arch, profile: &manifest.profile, running_version: Some(&manifest.version), allow_downgrade: false };
    let mut r = bundle::BundleReader::open(std::io::BufReader::new(std::fs::File::open(path)?), &policy)?;
    while let Some(mut part) = r.next_part()? {
        std::io::copy(&mut part, &mut std::io::sink()).map_err(bundle::BundleError::from_io)?;
    }
    if r.finish()? != *manifest {
        bail!("it holds another manifest than the one written");
    }
    Ok(())
}

fn header(name: &str, size: u64, epoch: u64) -> Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name).with_context(|| format!("naming `{name}` in the update bundle"))?;
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(epoch);
    h.set_size(size);
    h.set_cksum();
    Ok(h)
}

fn hash(r: &mut dyn Read) -> std::io::Result<(u64, String)> {
    let mut h = Sha256::new();
    let n = std::io::copy(r, &mut h)?;
    Ok((n, bundle::hex(&h.finalize())))
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    len: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec<'static> {
        Spec { version: "1.0.0", arch: Arch::Arm64, profile: "edge", board: None, roothash: "00", cmdline: None, source_date_epoch: 1_700_000_000 }
    }

    #[test]
    fn the_builder_refuses_what_the_node_would() {
        let d = tempfile::tempdir().unwrap();
        let key = KeyPair::generate();
        let parts = vec![PartSource { name: "root.squashfs".into(), kind: PartKind::Root, content: Content::Bytes(vec![1]) }];
        let e = format!("{:#}", write(&d.path().join(FILE), &spec(), &parts, &key).unwrap_err());
        assert!(e.contains("roothash"), "{e}");
        let bad = vec![PartSource { name: "../x".into(), kind: PartKind::Root, content: Content::Bytes(vec![1]) }];
        let e = format!("{:#}", write(&d.path().join(FILE), &spec(), &bad, &key).unwrap_err());
        assert!(e.contains("part name `../x`"), "{e}");
        let missing = vec![PartSource { name: "a".into(), kind: PartKind::Root, content: Content::Host(d.path().join("nope")) }];
        let e = format!("{:#}", write(&d.path().join(FILE), &spec(), &missing, &key).unwrap_err());
        assert!(e.contains("nope"), "{e}");
        // Nothing is left behind.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn parts_of_a_build_in_bundle_order() {
        let v = kiln_formats::verity::Verity { data_blocks: 10, hash_blocks: 2, root_hash: [7; 32], salt: vec![1; 32], uuid: [0; 16] };
        let root = RootImage { squashfs: "/w/root.squashfs".into(), verity_path: "/w/root.verity".into(), verity: v, initrd: vec![9; 3], cmdline: String::new(), squashfs_bytes: 40960, stats: Default::default() };
        let names = |b: &Boot| parts(&root, b).iter().map(|p| (p.name.clone(), p.kind)).collect::<Vec<_>>();
        let uki = names(&Boot::Uki(Path::new("/w/kiln.efi")));
        assert_eq!(uki, [("root.squashfs".into(), PartKind::Root), ("root.verity".into(), PartKind::Verity), ("kiln.efi".into(), PartKind::Uki)]);
        let board = names(&Boot::Board { zimage: Path::new("/k/zImage"), dtb: Some(("am335x-boneblack.dtb", "/k/dtbs/am335x-boneblack.dtb".into())), cmdline: "roothash=00" });
        let want: Vec<(String, PartKind)> = vec![("root.squashfs".into(), PartKind::Root), ("root.verity".into(), PartKind::Verity), ("zImage".into(), PartKind::Kernel), ("initramfs.cpio.zst".into(), PartKind::Initramfs), ("dtbs/am335x-boneblack.dtb".into(), PartKind::Dtb)];
        assert_eq!(board, want);
        // The stage-1 initramfs is the one the build holds in memory.
        let p = parts(&root, &Boot::Board { zimage: Path::new("/k/zImage"), dtb: None, cmdline: "roothash=00" });
        assert_eq!(p.len(), 4);
        assert!(matches!(&p[3].content, Content::Bytes(b) if b == &[9; 3]));
    }

    #[test]
    fn long_names_use_the_ustar_prefix() {
        let name = format!("dtbs/{}/{}.dtb", "v".repeat(120), "b".repeat(60));
        let h = header(&name, 3, 0).unwrap();
        let raw = h.as_bytes();
        assert_eq!(&raw[257..263], b"ustar\0");
        assert_eq!(bundle::split_ustar(&name).map(|(a, b)| (a.len(), b.len())), Some((125, 64)));
        assert_eq!(&raw[345..350], b"dtbs/");
        assert!(header(&"x".repeat(101), 3, 0).is_err());
    }
}
