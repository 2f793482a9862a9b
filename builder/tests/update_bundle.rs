//! Update bundles, both halves: `kiln::image::update` writes one from small fake
//! parts with a fresh key, and the node's reader (`kiln_contract::update`) takes
//! it back. Every way the node must refuse a bundle is tried: a changed
//! part, manifest or signature, another key, another arch or profile, an
//! older version, entries out of order or added, and the bundle cut at any
//! byte. None may panic, and none may hand out a part the builder did not
//! put in.

use kiln::arch::Arch;
use kiln::provenance::sign::{KeyPair, PublicKey, SignError};
use kiln::image::update::{self, Content, PartSource, Spec};
use kiln_contract::update::bundle::{MANIFEST_NAME, SIGNATURE_NAME};
use kiln_contract::update::{BundleError, BundleReader, PartKind, Policy};
use proptest::prelude::*;
use std::io::Read;
use std::path::Path;
use std::sync::OnceLock;

const ROOTHASH: &str = "5e9c0b8d9f1e2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3";

/// Distinct, recognisable contents; sizes that are and are not whole
/// 512-byte blocks, and an empty part.
fn contents() -> Vec<(&'static str, PartKind, Vec<u8>)> {
    let fill = |tag: &[u8], len: usize| tag.iter().copied().cycle().take(len).collect::<Vec<u8>>();
    vec![
        ("root.squashfs", PartKind::Root, fill(b"ROOT-data-", 20_000)),
        ("root.verity", PartKind::Verity, fill(b"VERITY-tree-", 4096)),
        ("kiln.efi", PartKind::Uki, fill(b"MZ-uki-", 1537)),
    ]
}

fn armv7_contents() -> Vec<(&'static str, PartKind, Vec<u8>)> {
    vec![
        ("root.squashfs", PartKind::Root, vec![7; 8192]),
        ("root.verity", PartKind::Verity, vec![8; 4096]),
        ("zImage", PartKind::Kernel, b"zImage".repeat(300)),
        ("initramfs.cpio.zst", PartKind::Initramfs, vec![]),
        ("dtbs/am335x-boneblack.dtb", PartKind::Dtb, b"\xd0\x0d\xfe\xed".repeat(50)),
    ]
}

fn spec(version: &str) -> Spec<'_> {
    Spec { version, arch: Arch::Amd64, profile: "edge", board: None, roothash: ROOTHASH, cmdline: None, source_date_epoch: 1_700_000_000 }
}

/// The parts as the pipeline gives them: files on disk (and one in memory).
fn sources(dir: &Path, contents: &[(&'static str, PartKind, Vec<u8>)]) -> Vec<PartSource> {
    contents
        .iter()
        .enumerate()
        .map(|(i, (name, kind, data))| {
            let content = if *kind == PartKind::Initramfs {
                Content::Bytes(data.clone())
            } else {
                let p = dir.join(format!("part{i}"));
                std::fs::write(&p, data).unwrap();
                Content::Host(p)
            };
            PartSource { name: name.to_string(), kind: *kind, content }
        })
        .collect()
}

fn write_bundle(key: &KeyPair, spec: &Spec, contents: &[(&'static str, PartKind, Vec<u8>)]) -> Vec<u8> {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out").join(update::FILE);
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    update::write(&out, spec, &sources(d.path(), contents), key).unwrap();
    // Only the bundle is left in the output directory.
    assert_eq!(std::fs::read_dir(out.parent().unwrap()).unwrap().count(), 1);
    std::fs::read(&out).unwrap()
}

/// One key and one bundle for the whole file: key generation is quick, but
/// the proptests read the same bundle many times.
fn fixture() -> &'static (KeyPair, Vec<u8>) {
    static F: OnceLock<(KeyPair, Vec<u8>)> = OnceLock::new();
    F.get_or_init(|| {
        let key = KeyPair::generate();
        let b = write_bundle(&key, &spec("1.2.10"), &contents());
        (key, b)
    })
}

fn policy<'a>(keys: &'a [PublicKey]) -> Policy<'a> {
    Policy { keys, arch: "amd64", profile: "edge", running_version: Some("1.2.9"), allow_downgrade: false }
}

/// A stream that hands out at most a few bytes per read, as a network
/// socket may.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.step = self.step % 7 + 1;
        let n = buf.len().min(self.step).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Reads every part to its end, then finishes the bundle.
fn read_all(r: impl Read, policy: &Policy) -> Result<Vec<(String, PartKind, Vec<u8>)>, BundleError> {
    let mut bundle = BundleReader::open(r, policy)?;
    let mut parts = Vec::new();
    while let Some(mut part) = bundle.next_part()? {
        let (name, kind) = (part.part().name.clone(), part.part().kind);
        let mut data = Vec::new();
        part.read_to_end(&mut data).map_err(BundleError::from_io)?;
        parts.push((name, kind, data));
    }
    bundle.finish()?;
    Ok(parts)
}

fn expected() -> Vec<(String, PartKind, Vec<u8>)> {
    contents().into_iter().map(|(n, k, d)| (n.to_string(), k, d)).collect()
}

/// Where each entry's header starts, by name, as a plain tar reader sees it.
fn offsets(bundle: &[u8]) -> Vec<(String, usize, usize)> {
    let mut a = tar::Archive::new(bundle);
    a.entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.path().unwrap().to_string_lossy().into_owned(), e.raw_header_position() as usize, e.raw_file_position() as usize)
        })
        .collect()
}

fn data_at(bundle: &[u8], name: &str) -> usize {
    offsets(bundle).into_iter().find(|(n, _, _)| n == name).map(|(_, _, data)| data).unwrap()
}

#[test]
fn round_trip() {
    let (key, bundle) = fixture();
    let keys = [key.public()];
    assert_eq!(read_all(&bundle[..], &policy(&keys)).unwrap(), expected());
    // Byte by byte through a stream that gives a few bytes at a time.
    assert_eq!(read_all(Trickle { data: bundle, step: 0 }, &policy(&keys)).unwrap(), expected());

    let r = BundleReader::open(&bundle[..], &policy(&keys)).unwrap();
    let m = r.manifest();
    assert_eq!((m.version.as_str(), m.arch.as_str(), m.profile.as_str(), m.board.as_deref()), ("1.2.10", "amd64", "edge", None));
    assert_eq!((m.roothash.as_str(), m.source_date_epoch, m.format), (ROOTHASH, 1_700_000_000, 1));
    assert_eq!(m.parts.iter().map(|p| (p.name.as_str(), p.size)).collect::<Vec<_>>(), vec![("root.squashfs", 20_000), ("root.verity", 4096), ("kiln.efi", 1537)]);
    assert_eq!(r.trusted_comment(), "kiln update profile=edge arch=amd64 version=1.2.10");
    // The length the manifest implies: the archive up to its end blocks
    // (tar's record padding may follow).
    let want = r.expected_len() as usize;
    assert!(want <= bundle.len() && bundle.len() - want < 10240, "{want} of {}", bundle.len());
    assert_eq!(&bundle[want - 1024..want], &[0u8; 1024][..]);
    assert_ne!(&bundle[want - 1536..want - 1024], &[0u8; 512][..]);

    // The same version again is not a downgrade; no running version at all
    // (an image built without `version`) takes any.
    for running in [Some("1.2.10"), Some("1.2.10.0"), Some("0.9"), None] {
        assert!(read_all(&bundle[..], &Policy { running_version: running, ..policy(&keys) }).is_ok(), "{running:?}");
    }
    // Any of several keys may have signed it.
    let keys2 = [KeyPair::generate().public(), key.public()];
    assert!(read_all(&bundle[..], &policy(&keys2)).is_ok());
}

#[test]
fn armv7_board_bundle_round_trips() {
    let key = KeyPair::generate();
    let cmdline = format!("roothash={ROOTHASH} quiet console=ttyS0,115200");
    let s = Spec { arch: Arch::Armv7, board: Some("beaglebone-black"), cmdline: Some(&cmdline), ..spec("3") };
    let bundle = write_bundle(&key, &s, &armv7_contents());
    let keys = [key.public()];
    let p = Policy { arch: "armv7", ..policy(&keys) };
    let got = read_all(&bundle[..], &p).unwrap();
    let want: Vec<_> = armv7_contents().into_iter().map(|(n, k, d)| (n.to_string(), k, d)).collect();
    assert_eq!(got, want);
    assert_eq!(BundleReader::open(&bundle[..], &p).unwrap().manifest().board.as_deref(), Some("beaglebone-black"));
}

#[test]
fn two_writes_are_byte_identical() {
    let (key, bundle) = fixture();
    assert_eq!(&write_bundle(key, &spec("1.2.10"), &contents()), bundle);
    // Fixed metadata in every header, as a plain tar reader sees it.
    let mut a = tar::Archive::new(&bundle[..]);
    for e in a.entries().unwrap() {
        let e = e.unwrap();
        let h = e.header();
        assert_eq!((h.mode().unwrap(), h.uid().unwrap(), h.gid().unwrap(), h.mtime().unwrap()), (0o644, 0, 0, 1_700_000_000));
        assert!(h.as_ustar().is_some());
        assert_eq!(h.username().unwrap(), Some(""));
    }
    assert_eq!(bundle.len() % 512, 0);
    assert!(bundle[bundle.len() - 1024..].iter().all(|&b| b == 0));
}

#[test]
fn entries_are_in_the_fixed_order() {
    let (_, bundle) = fixture();
    let names: Vec<String> = offsets(bundle).into_iter().map(|(n, _, _)| n).collect();
    assert_eq!(names, [MANIFEST_NAME, SIGNATURE_NAME, "root.squashfs", "root.verity", "kiln.efi"]);
}

#[test]
fn a_flipped_byte_in_a_part_is_a_sha256_mismatch() {
    let (key, bundle) = fixture();
    let keys = [key.public()];
    for (name, _, data) in contents() {
        for at in [0, data.len() / 2, data.len() - 1] {
            let mut b = bundle.clone();
            b[data_at(bundle, name) + at] ^= 0x20;
            let e = read_all(&b[..], &policy(&keys)).unwrap_err();
            match &e {
                BundleError::Sha256Mismatch { name: n, .. } => assert_eq!(n, name),
                other => panic!("{name}+{at}: {other}"),
            }
            let msg = e.to_string();
            assert!(msg.contains(&format!("part `{name}` has sha256")) && msg.contains("download it again"), "{msg}");
        }
    }
}

#[test]
fn a_part_is_checked_even_when_not_read_to_its_end() {
    let (key, bundle) = fixture();
    let keys = [key.public()];
    let mut b = bundle.clone();
    b[data_at(bundle, "root.squashfs") + 15_000] ^= 1;
    let mut r = BundleReader::open(&b[..], &policy(&keys)).unwrap();
    let mut part = r.next_part().unwrap().unwrap();
    let mut head = [0u8; 100];
    part.read_exact(&mut head).unwrap();
    let e = r.next_part().err().unwrap();
    assert!(matches!(e, BundleError::Sha256Mismatch { .. }), "{e}");
    // And the reader stays refused.
    assert!(matches!(r.next_part().err().unwrap(), BundleError::UsedAfterError));

    // `finish` before all parts are read says so.
    let r = BundleReader::open(&bundle[..], &policy(&keys)).unwrap();
    let e = r.finish().unwrap_err();
    assert!(matches!(&e, BundleError::Unread { name } if name == "root.squashfs"), "{e}");
}

#[test]
fn a_changed_manifest_or_signature_is_a_signature_error() {
    let (key, bundle) = fixture();
    let keys = [key.public()];
    let manifest = data_at(bundle, MANIFEST_NAME);
    let text = std::str::from_utf8(&bundle[manifest..manifest + 200]).unwrap();
    let version = text.find("1.2.10").unwrap();
    for at in [0, version + 5, 150] {
        let mut b = bundle.clone();
        b[manifest + at] ^= 1;
        let e = read_all(&b[..], &policy(&keys)).unwrap_err();
        assert!(matches!(e, BundleError::Signature { source: SignError::BadSignature }), "manifest+{at}: {e}");
        assert!(e.to_string().contains("signature is not valid"), "{e}");
    }
    // The signature file: its signature line, its trusted comment, its
    // global signature.
    let sig = data_at(bundle, SIGNATURE_NAME);
    let sig_text = std::str::from_utf8(&bundle[sig..sig + 300]).unwrap();
    let lines: Vec<usize> = std::iter::once(0).chain(sig_text.match_indices('\n').map(|(i, _)| i + 1)).collect();
    for (line, want_bad_comment) in [(1, false), (2, true), (3, true)] {
        let mut b = bundle.clone();
        let at = sig + lines[line] + 20;
        b[at] = if b[at] == b'A' { b'B' } else { b'A' };
        let e = read_all(&b[..], &policy(&keys)).unwrap_err();
        let BundleError::Signature { source } = &e else { panic!("line {line}: {e}") };
        assert_eq!(matches!(source, SignError::BadTrustedComment), want_bad_comment, "line {line}: {e}");
    }
}

#[test]
fn another_key_is_a_signature_error() {
    let (_, bundle) = fixture();
    let other = [KeyPair::generate().public()];
    let e = read_all(&bundle[..], &policy(&other)).unwrap_err();
    assert!(matches!(e, BundleError::Signature { source: SignError::WrongKey { .. } }), "{e}");
    assert!(e.to_string().contains("the same signing key as this image"), "{e}");
    // A bundle re-signed by someone else (a consistent, valid bundle) is
    // refused for the same reason.
    let forged = write_bundle(&KeyPair::generate(), &spec("1.2.10"), &contents());
    let keys = [fixture().0.public()];
    assert!(matches!(read_all(&forged[..], &policy(&keys)), Err(BundleError::Signature { .. })));
}

#[test]
fn policy_errors() {
    let (key, bundle) = fixture();
    let keys = [key.public()];
    let e = read_all(&bundle[..], &Policy { arch: "armv7", ..policy(&keys) }).unwrap_err();
    assert_eq!(e.to_string(), "the update bundle is for amd64 but this node is armv7; build it from the node's profile");
    let e = read_all(&bundle[..], &Policy { profile: "core", ..policy(&keys) }).unwrap_err();
    assert!(matches!(e, BundleError::WrongProfile { .. }), "{e}");
    assert!(e.to_string().contains("built from profile `edge` but this node runs profile `core`"), "{e}");
    let newer = Policy { running_version: Some("1.10.0"), ..policy(&keys) };
    let e = read_all(&bundle[..], &newer).unwrap_err();
    assert!(matches!(e, BundleError::Downgrade { .. }), "{e}");
    assert!(e.to_string().contains("version 1.2.10, older than the running 1.10.0"), "{e}");
    assert_eq!(read_all(&bundle[..], &Policy { allow_downgrade: true, ..newer }).unwrap(), expected());
}

#[test]
fn truncated_anywhere_is_a_truncated_error() {
    let (key, bundle) = fixture();
    let keys = [key.public()];
    let o = offsets(bundle);
    let start = |name: &str| o.iter().find(|(n, _, _)| n == name).unwrap().1;
    let named = [
        ("inside the first header", 100),
        ("inside the manifest", data_at(bundle, MANIFEST_NAME) + 50),
        ("between manifest and signature", start(SIGNATURE_NAME)),
        ("inside the signature", data_at(bundle, SIGNATURE_NAME) + 50),
        ("before the first part", start("root.squashfs")),
        ("inside a part's header", start("root.squashfs") + 10),
        ("inside a part", data_at(bundle, "root.squashfs") + 9_999),
        ("inside a part's padding", data_at(bundle, "root.squashfs") + 20_000 + 10),
        ("between parts", start("root.verity")),
        ("inside the last part", data_at(bundle, "kiln.efi") + 1000),
        ("after the last part", bundle.len() - 1024),
        ("inside the end marker", bundle.len() - 512),
        ("one byte short", bundle.len() - 1),
    ];
    for (what, at) in named {
        let e = read_all(&bundle[..at], &policy(&keys)).unwrap_err();
        assert!(matches!(e, BundleError::Truncated { .. }), "{what} ({at}): {e}");
        assert!(e.to_string().contains("truncated"), "{e}");
    }
    // Every length, in steps: always the truncated error, never a panic.
    for at in (0..bundle.len()).step_by(61) {
        let e = read_all(&bundle[..at], &policy(&keys)).unwrap_err();
        assert!(matches!(e, BundleError::Truncated { .. }), "at {at}: {e}");
    }
    assert!(matches!(read_all(&[][..], &policy(&keys)), Err(BundleError::Truncated { .. })));
}

#[test]
fn extra_or_reordered_entries_are_refused() {
    let (key, bundle) = fixture();
    let keys = [key.public()];
    let end = bundle.len() - 1024;

    // Zeros after the end, as tar pads to its record size, are fine.
    let mut padded = bundle.clone();
    padded.resize(10240 * bundle.len().div_ceil(10240), 0);
    assert!(read_all(&padded[..], &policy(&keys)).is_ok());

    // An entry after the last part.
    let mut extra = bundle[..end].to_vec();
    let mut h = tar::Header::new_ustar();
    h.set_path("evil.sh").unwrap();
    h.set_size(3);
    h.set_cksum();
    let mut t = tar::Builder::new(Vec::new());
    t.append(&h, &b"rm\n"[..]).unwrap();
    extra.extend(t.into_inner().unwrap());
    let e = read_all(&extra[..], &policy(&keys)).unwrap_err();
    assert!(matches!(&e, BundleError::TrailingData { what, .. } if what.contains("evil.sh")), "{e}");

    // Bytes after the end marker.
    let mut junk = bundle.clone();
    junk.extend_from_slice(b"junk");
    assert!(matches!(read_all(&junk[..], &policy(&keys)), Err(BundleError::TrailingData { .. })));

    // Two parts swapped.
    let o = offsets(bundle);
    let start = |name: &str| o.iter().find(|(n, _, _)| n == name).unwrap().1;
    let (v, k) = (start("root.verity"), start("kiln.efi"));
    let mut swapped = bundle[..v].to_vec();
    swapped.extend_from_slice(&bundle[k..end]);
    swapped.extend_from_slice(&bundle[v..k]);
    swapped.extend_from_slice(&bundle[end..]);
    let e = read_all(&swapped[..], &policy(&keys)).unwrap_err();
    assert!(matches!(&e, BundleError::UnexpectedEntry { expected, found, .. } if expected == "root.verity" && found == "kiln.efi"), "{e}");

    // A part left out.
    let mut missing = bundle[..v].to_vec();
    missing.extend_from_slice(&bundle[k..]);
    assert!(matches!(read_all(&missing[..], &policy(&keys)), Err(BundleError::UnexpectedEntry { .. })));
    let mut last_missing = bundle[..k].to_vec();
    last_missing.extend_from_slice(&bundle[end..]);
    let e = read_all(&last_missing[..], &policy(&keys)).unwrap_err();
    assert!(matches!(&e, BundleError::Truncated { what, .. } if what.contains("`kiln.efi` is missing")), "{e}");
}

/// Other tools read it: tar lists and extracts it, and minisign verifies the
/// extracted manifest with the image's public key file.
#[test]
fn tar_and_minisign_read_it() {
    let (key, bundle) = fixture();
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("update.kiln"), bundle).unwrap();
    std::fs::write(d.path().join("update.pub"), key.public().to_file()).unwrap();
    let run = |cmd: &str| std::process::Command::new("sh").arg("-c").arg(cmd).current_dir(d.path()).output().unwrap();
    if kiln_testkit::checker("tar", "tar").is_none() {
        return;
    }
    let out = run("tar -tf update.kiln && tar -xf update.kiln");
    let listing = String::from_utf8_lossy(&out.stdout);
    assert_eq!(listing.lines().collect::<Vec<_>>(), [MANIFEST_NAME, SIGNATURE_NAME, "root.squashfs", "root.verity", "kiln.efi"]);
    assert_eq!(std::fs::read(d.path().join("kiln.efi")).unwrap(), contents()[2].2);
    if kiln_testkit::checker("minisign", "minisign").is_some() {
        let out = run(&format!("minisign -Vm {MANIFEST_NAME} -p update.pub"));
        assert!(out.status.success(), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Trusted comment: kiln update profile=edge"), "{out:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Any changed byte: no panic, and whatever the reader accepts is what
    /// the builder put in (the change hit padding or an ignored byte).
    #[test]
    fn a_changed_bundle_never_yields_other_parts(at in any::<prop::sample::Index>(), xor in 1u8..=255, cut in any::<prop::sample::Index>(), do_cut in any::<bool>()) {
        let (key, bundle) = fixture();
        let keys = [key.public()];
        let mut b = bundle.clone();
        let i = at.index(b.len());
        b[i] ^= xor;
        if do_cut {
            b.truncate(cut.index(b.len()));
        }
        if let Ok(parts) = read_all(&b[..], &policy(&keys)) {
            prop_assert_eq!(parts, expected());
        }
    }

    /// Arbitrary bytes after a valid manifest and signature.
    #[test]
    fn arbitrary_parts_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let (key, bundle) = fixture();
        let keys = [key.public()];
        let mut b = bundle[..offsets(bundle)[2].1].to_vec();
        b.extend_from_slice(&tail);
        prop_assert!(read_all(&b[..], &policy(&keys)).is_err());
    }
}
