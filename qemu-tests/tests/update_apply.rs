//! Applying update bundles (`kiln_init::node::update::apply`) to a disk image laid
//! out as kiln lays out its disks (made with sgdisk), with an ESP directory
//! beside it. The roots are arbitrary data with real dm-verity trees from the
//! builder's `verity` code, so the root hashes and the PARTUUIDs derived from
//! them are genuine; the bundles are written by `kiln::image::update` with a fresh
//! key, as in tests/update_bundle.rs.

use kiln::arch::Arch;
use kiln::provenance::sign::{KeyPair, PublicKey};
use kiln::image::update::{self, Content, PartSource, Spec};
use kiln_formats::verity;
use kiln_init::node::gpt::{Gpt, Guid, Partition};
use kiln_init::cmdline::MbrRoot;
use kiln_init::node::update::apply::{self, ApplyError, Slot, Target};
use kiln_init::node::update::uboot::{self, State};
use kiln_contract::update::{BundleError, BundleReader, PartKind, Policy};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const DISK_MIB: u64 = 40;
const ROOT_MIB: u64 = 4;

fn have_sgdisk() -> bool {
    kiln_testkit::checker("sgdisk", "gdisk").is_some()
}

fn sgdisk(args: &[&str], disk: &Path) -> String {
    let out = kiln_testkit::command("sgdisk").args(args).arg(disk).output().unwrap();
    let text = kiln_testkit::output_text(&out);
    assert!(out.status.success(), "sgdisk {args:?}: {text}");
    text
}

/// A root image: data, its verity tree and a fake UKI, as files.
struct Image {
    root: PathBuf,
    verity: PathBuf,
    uki: PathBuf,
    roothash: String,
}

impl Image {
    fn hash(&self) -> [u8; 32] {
        kiln_contract::digest::unhex32(&self.roothash).unwrap()
    }
}

fn image(dir: &Path, tag: &str, seed: u64, root_len: usize) -> Image {
    let root = dir.join(format!("{tag}.squashfs"));
    let vpath = dir.join(format!("{tag}.verity"));
    let uki = dir.join(format!("{tag}.efi"));
    std::fs::write(&root, kiln_testkit::noise(seed, root_len)).unwrap();
    let v = verity::format_file(&root, &vpath).unwrap();
    let mut efi = b"MZ fake UKI ".to_vec();
    efi.extend_from_slice(tag.as_bytes());
    efi.extend(kiln_testkit::noise(seed ^ 0xff, 3000));
    std::fs::write(&uki, efi).unwrap();
    Image { root, verity: vpath, uki, roothash: v.root_hex() }
}

fn bundle(dir: &Path, key: &KeyPair, img: &Image, version: &str, roothash: &str) -> PathBuf {
    let out = dir.join(format!("{version}-{}.kiln", &roothash[..8]));
    let parts = vec![
        PartSource { name: "root.squashfs".into(), kind: PartKind::Root, content: Content::Host(img.root.clone()) },
        PartSource { name: "root.verity".into(), kind: PartKind::Verity, content: Content::Host(img.verity.clone()) },
        PartSource { name: "kiln.efi".into(), kind: PartKind::Uki, content: Content::Host(img.uki.clone()) },
    ];
    let spec = Spec { version, arch: Arch::Amd64, profile: "edge", board: None, roothash, cmdline: None, source_date_epoch: 1_700_000_000 };
    update::write(&out, &spec, &parts, key).unwrap();
    out
}

fn policy(keys: &[PublicKey]) -> Policy<'_> {
    Policy { keys, arch: "amd64", profile: "edge", running_version: Some("1.0"), allow_downgrade: false }
}

fn guid(hex_half: &str) -> String {
    Guid(std::array::from_fn(|i| u8::from_str_radix(&hex_half[2 * i..2 * i + 2], 16).unwrap())).to_string()
}

/// A slot's root and verity bytes and partitions.
type SlotState = (Vec<u8>, Vec<u8>, Partition, Partition);

/// A node's disk and ESP: kiln's six partitions, image `a` in slot a with
/// its derived PARTUUIDs, slot b empty, and slot a's boot entry.
struct Node {
    _dir: tempfile::TempDir,
    disk: PathBuf,
    esp: PathBuf,
    work: PathBuf,
}

impl Node {
    fn new(a: &Image) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.raw");
        File::create(&disk).unwrap().set_len(DISK_MIB << 20).unwrap();
        let (h1, h2) = (&a.roothash[..32], &a.roothash[32..]);
        let (root_t, verity_t) = ("4f68bce3-e8cd-4db1-96e7-fbcaf984b709", "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5");
        let r = format!("+{ROOT_MIB}M");
        let args: Vec<String> = [
            "-o", "-n", "1:2048:+8M", "-t", "1:c12a7328-f81f-11d2-ba4b-00a0c93ec93b", "-c", "1:esp",
            "-n", &format!("2:0:{r}"), "-t", &format!("2:{root_t}"), "-c", "2:root-a", "-u", &format!("2:{}", guid(h1)),
            "-n", "3:0:+1M", "-t", &format!("3:{verity_t}"), "-c", "3:root-a-verity", "-u", &format!("3:{}", guid(h2)),
            "-n", &format!("4:0:{r}"), "-t", &format!("4:{root_t}"), "-c", "4:root-b", "-u", "4:11111111-2222-4333-8444-555555555555",
            "-n", "5:0:+1M", "-t", &format!("5:{verity_t}"), "-c", "5:root-b-verity", "-u", "5:66666666-7777-4888-8999-aaaaaaaaaaaa",
            "-n", "6:0:+8M", "-t", "6:0fc63daf-8483-4772-8e79-3d69d8477de4", "-c", "6:data",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        sgdisk(&args.iter().map(String::as_str).collect::<Vec<_>>(), &disk);
        let node = Node { esp: dir.path().join("esp"), work: dir.path().join("work"), disk, _dir: dir };
        std::fs::create_dir_all(&node.work).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&node.disk).unwrap();
        f.write_all_at(&std::fs::read(&a.root).unwrap(), node.part("root-a").first_lba * 512).unwrap();
        f.write_all_at(&std::fs::read(&a.verity).unwrap(), node.part("root-a-verity").first_lba * 512).unwrap();
        let linux = node.esp.join("EFI/Linux");
        std::fs::create_dir_all(&linux).unwrap();
        std::fs::copy(&a.uki, linux.join("kiln-edge-a+3.efi")).unwrap();
        std::fs::write(node.esp.join("node.toml"), "# config\n").unwrap();
        node
    }

    fn gpt(&self) -> Gpt {
        let f = File::open(&self.disk).unwrap();
        Gpt::read(&f, 512, DISK_MIB << 20).unwrap()
    }

    fn part(&self, name: &str) -> Partition {
        self.gpt().by_name(name).unwrap()
    }

    /// A slot's two partitions: their bytes and their GPT entries.
    fn slot_state(&self, slot: &str) -> SlotState {
        let (root, verity) = (format!("root-{slot}"), format!("root-{slot}-verity"));
        (self.part_bytes(&root), self.part_bytes(&verity), self.part(&root), self.part(&verity))
    }

    fn part_bytes(&self, name: &str) -> Vec<u8> {
        let p = self.part(name);
        let mut buf = vec![0u8; ((p.last_lba + 1 - p.first_lba) * 512) as usize];
        File::open(&self.disk).unwrap().read_exact_at(&mut buf, p.first_lba * 512).unwrap();
        buf
    }

    /// Every file on the ESP and its contents.
    fn esp_files(&self) -> BTreeMap<String, Vec<u8>> {
        fn walk(base: &Path, d: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(base, &p, out);
                } else {
                    out.insert(p.strip_prefix(base).unwrap().display().to_string(), std::fs::read(&p).unwrap());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.esp, &self.esp, &mut out);
        out
    }

    fn disk_sha(&self) -> String {
        kiln_contract::digest::hex(&Sha256::digest(std::fs::read(&self.disk).unwrap()))
    }

    fn apply(&self, bundle: &Path, key: &KeyPair, running: &Image) -> Result<apply::Applied, ApplyError> {
        self.apply_hash(bundle, key, running.hash())
    }

    fn apply_hash(&self, bundle: &Path, key: &KeyPair, running: [u8; 32]) -> Result<apply::Applied, ApplyError> {
        let keys = [key.public()];
        let r = BundleReader::open(std::io::BufReader::new(File::open(bundle).unwrap()), &policy(&keys))?;
        apply::apply(r, &Target { disk: &self.disk, esp: &self.esp, running_roothash: running, tries: apply::TRIES, progress: None, mbr: None })
    }

    fn assert_verifies(&self) {
        let out = sgdisk(&["-v"], &self.disk);
        assert!(out.contains("No problems found"), "sgdisk -v: {out}");
    }

    /// The slot's PARTUUIDs are the halves of `img`'s root hash.
    fn assert_slot_is(&self, slot: &str, img: &Image) {
        let g = self.gpt();
        assert_eq!(g.by_name(&format!("root-{slot}")).unwrap().uuid.to_string(), guid(&img.roothash[..32]));
        assert_eq!(g.by_name(&format!("root-{slot}-verity")).unwrap().uuid.to_string(), guid(&img.roothash[32..]));
        // sgdisk agrees (it prints upper case).
        let n = if slot == "a" { "2" } else { "4" };
        let info = sgdisk(&["-i", n], &self.disk);
        assert!(info.contains(&format!("Partition unique GUID: {}", guid(&img.roothash[..32]).to_uppercase())), "{info}");
    }

    /// The slot holds `img`'s root and tree at the start of its partitions.
    fn assert_slot_holds(&self, slot: &str, img: &Image) {
        let root = std::fs::read(&img.root).unwrap();
        let tree = std::fs::read(&img.verity).unwrap();
        assert!(self.part_bytes(&format!("root-{slot}"))[..root.len()] == root[..]);
        assert!(self.part_bytes(&format!("root-{slot}-verity"))[..tree.len()] == tree[..]);
    }
}

#[test]
fn applies_to_the_inactive_slot_then_back() {
    if !have_sgdisk() {
        return;
    }
    let key = KeyPair::generate();
    let tmp = tempfile::tempdir().unwrap();
    let a = image(tmp.path(), "a", 1, 100 * 4096);
    let b = image(tmp.path(), "b", 2, 150 * 4096 + 1000);
    let c = image(tmp.path(), "c", 3, 300 * 4096);
    let node = Node::new(&a);
    node.assert_verifies();
    // A stale entry of slot b (a failed earlier update) and a cut apply's
    // temp file go; slot a's entry stays.
    let linux = node.esp.join("EFI/Linux");
    std::fs::write(linux.join("kiln-edge-b+0-3.efi"), b"old").unwrap();
    std::fs::write(linux.join(".kiln-edge-b.efi.tmp"), b"cut").unwrap();
    let slot_a = node.slot_state("a");
    let entry_a = std::fs::read(linux.join("kiln-edge-a+3.efi")).unwrap();

    let bb = bundle(&node.work, &key, &b, "1.1", &b.roothash);
    let done = node.apply(&bb, &key, &a).unwrap();
    assert_eq!(done.slot, Slot::B);
    assert_eq!((done.version.as_str(), done.roothash.as_str(), done.entry.as_str()), ("1.1", b.roothash.as_str(), "kiln-edge-b+3.efi"));
    let sizes = |i: &Image| [&i.root, &i.verity, &i.uki].map(|p| std::fs::metadata(p).unwrap().len());
    assert_eq!([done.root_bytes, done.verity_bytes, done.uki_bytes], sizes(&b));
    assert_eq!(done.bytes_written(), sizes(&b).iter().sum::<u64>());
    node.assert_slot_is("b", &b);
    node.assert_slot_holds("b", &b);
    node.assert_verifies();
    assert_eq!(node.slot_state("a"), slot_a, "slot a changed");
    let files: Vec<String> = node.esp_files().into_keys().collect();
    assert_eq!(files, ["EFI/Linux/kiln-edge-a+3.efi", "EFI/Linux/kiln-edge-b+3.efi", "node.toml"]);
    assert_eq!(std::fs::read(linux.join("kiln-edge-b+3.efi")).unwrap(), std::fs::read(&b.uki).unwrap());
    assert_eq!(std::fs::read(linux.join("kiln-edge-a+3.efi")).unwrap(), entry_a);

    // Applying the same root again while b runs: nothing to do.
    let e = node.apply(&bb, &key, &b).unwrap_err();
    assert!(matches!(e, ApplyError::AlreadyRunning { .. }), "{e}");

    // Now running b (its entry has counted a boot): c goes to slot a, and
    // slot a's old entry is replaced.
    std::fs::rename(linux.join("kiln-edge-b+3.efi"), linux.join("kiln-edge-b+2-1.efi")).unwrap();
    let slot_b = node.slot_state("b");
    let cb = bundle(&node.work, &key, &c, "1.2", &c.roothash);
    let done = node.apply(&cb, &key, &b).unwrap();
    assert_eq!((done.slot, done.entry.as_str()), (Slot::A, "kiln-edge-a+3.efi"));
    node.assert_slot_is("a", &c);
    node.assert_slot_holds("a", &c);
    node.assert_slot_is("b", &b);
    node.assert_verifies();
    assert_eq!(node.slot_state("b"), slot_b, "slot b changed");
    let files = node.esp_files();
    assert_eq!(files.keys().cloned().collect::<Vec<_>>(), ["EFI/Linux/kiln-edge-a+3.efi", "EFI/Linux/kiln-edge-b+2-1.efi", "node.toml"]);
    assert_eq!(files["EFI/Linux/kiln-edge-a+3.efi"], std::fs::read(&c.uki).unwrap());
    assert_eq!(files["EFI/Linux/kiln-edge-b+2-1.efi"], std::fs::read(&b.uki).unwrap());

    // The image `c` replaced is the veritysetup-checked format: when the
    // tool is here, it agrees with what is now on slot a.
    if let Some(veritysetup) = kiln_testkit::checker("veritysetup", "cryptsetup-bin") {
        let (root, tree) = (node.work.join("slot-a.root"), node.work.join("slot-a.verity"));
        let n = std::fs::metadata(&c.root).unwrap().len() as usize;
        std::fs::write(&root, &node.part_bytes("root-a")[..n]).unwrap();
        std::fs::write(&tree, node.part_bytes("root-a-verity")).unwrap();
        let out = Command::new(veritysetup).arg("verify").arg(&root).arg(&tree).arg(&c.roothash).output().unwrap();
        assert!(out.status.success(), "veritysetup verify: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// The GPT areas at the start and end of the disk, slot a, and the ESP.
type Snapshot = (Vec<u8>, Vec<u8>, SlotState, BTreeMap<String, Vec<u8>>);

/// Everything that must not change when an apply fails before the switch.
fn snapshot(node: &Node) -> Snapshot {
    let f = File::open(&node.disk).unwrap();
    let mut head = vec![0u8; 34 * 512];
    f.read_exact_at(&mut head, 0).unwrap();
    let mut tail = vec![0u8; 33 * 512];
    f.read_exact_at(&mut tail, (DISK_MIB << 20) - 33 * 512).unwrap();
    (head, tail, node.slot_state("a"), node.esp_files())
}

#[test]
fn a_root_too_big_for_the_slot_is_refused_before_any_write() {
    if !have_sgdisk() {
        return;
    }
    let key = KeyPair::generate();
    let tmp = tempfile::tempdir().unwrap();
    let a = image(tmp.path(), "a", 1, 64 * 4096);
    let big = image(tmp.path(), "big", 4, ((ROOT_MIB << 20) + 4096) as usize);
    let node = Node::new(&a);
    let before = node.disk_sha();
    let esp = node.esp_files();
    let bundle = bundle(&node.work, &key, &big, "1.1", &big.roothash);
    let e = node.apply(&bundle, &key, &a).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ApplyError::TooLarge { .. }), "{e}");
    let (size, cap) = ((ROOT_MIB << 20) + 4096, ROOT_MIB << 20);
    assert!(msg.contains("root.squashfs") && msg.contains("root-b (partition 4") && msg.contains(&size.to_string()) && msg.contains(&cap.to_string()), "{msg}");
    assert_eq!(node.disk_sha(), before, "the disk was written");
    assert_eq!(node.esp_files(), esp);
}

#[test]
fn a_bad_verity_or_part_leaves_gpt_and_esp_alone() {
    if !have_sgdisk() {
        return;
    }
    let key = KeyPair::generate();
    let tmp = tempfile::tempdir().unwrap();
    let a = image(tmp.path(), "a", 1, 64 * 4096);
    let b = image(tmp.path(), "b", 2, 200 * 4096);
    let node = Node::new(&a);
    let before = snapshot(&node);

    // A tree that is not the root's, signed all the same: the root hash
    // checks out (it comes from the data), a hash block does not.
    let mut tree = std::fs::read(&b.verity).unwrap();
    tree[4096 + 7] ^= 1;
    let bad_tree = Image { verity: node.work.join("bad.verity"), ..image(tmp.path(), "b2", 2, 200 * 4096) };
    std::fs::write(&bad_tree.verity, &tree).unwrap();
    let e = node.apply(&bundle(&node.work, &key, &bad_tree, "1.1", &b.roothash), &key, &a).unwrap_err();
    assert!(matches!(e, ApplyError::TreeMismatch { slot: Slot::B, block: 1, .. }), "{e}");
    assert!(e.to_string().contains("root-b-verity (partition 5") && e.to_string().contains("slot not switched"), "{e}");
    assert_eq!(snapshot(&node), before);

    // A manifest root hash that is not the root's (signed, so only the
    // read-back can tell).
    let other = image(tmp.path(), "other", 9, 8 * 4096);
    let e = node.apply(&bundle(&node.work, &key, &b, "1.1", &other.roothash), &key, &a).unwrap_err();
    assert!(matches!(e, ApplyError::RootHashMismatch { slot: Slot::B, .. }), "{e}");
    assert!(e.to_string().contains(&other.roothash) && e.to_string().contains(&b.roothash), "{e}");
    assert_eq!(snapshot(&node), before);

    // A verity part that is no tree at all.
    let junk = Image { verity: node.work.join("junk.verity"), ..image(tmp.path(), "b3", 2, 200 * 4096) };
    std::fs::write(&junk.verity, vec![0x55; 8192]).unwrap();
    let e = node.apply(&bundle(&node.work, &key, &junk, "1.1", &b.roothash), &key, &a).unwrap_err();
    assert!(matches!(e, ApplyError::BadVerity { .. }), "{e}");
    assert_eq!(snapshot(&node), before);

    // A part changed after signing: its sha256 is not the manifest's.
    let good = bundle(&node.work, &key, &b, "1.1", &b.roothash);
    let mut bytes = std::fs::read(&good).unwrap();
    let root_data = std::fs::read(&b.root).unwrap();
    let at = bytes.windows(64).position(|w| w == &root_data[..64]).unwrap();
    bytes[at + 5000] ^= 0x80;
    let tampered = node.work.join("tampered.kiln");
    std::fs::write(&tampered, bytes).unwrap();
    let e = node.apply(&tampered, &key, &a).unwrap_err();
    assert!(matches!(e, ApplyError::Bundle(BundleError::Sha256Mismatch { .. })), "{e}");
    assert_eq!(snapshot(&node), before);

    // And after all that, the good bundle still applies.
    node.apply(&good, &key, &a).unwrap();
    node.assert_slot_is("b", &b);
    node.assert_verifies();
}

#[test]
fn refuses_other_disks_and_boards() {
    if !have_sgdisk() {
        return;
    }
    let key = KeyPair::generate();
    let tmp = tempfile::tempdir().unwrap();
    let a = image(tmp.path(), "a", 1, 16 * 4096);
    let b = image(tmp.path(), "b", 2, 16 * 4096);
    let node = Node::new(&a);
    let bb = bundle(&node.work, &key, &b, "1.1", &b.roothash);
    let e = node.apply_hash(&bb, &key, [0x42; 32]).unwrap_err();
    assert!(matches!(e, ApplyError::NotRunningDisk { .. }), "{e}");
    assert!(e.to_string().contains("42424242-4242-4242-4242-424242424242"), "{e}");

    // No slot b at all.
    sgdisk(&["-d", "4"], &node.disk);
    let e = node.apply(&bb, &key, &a).unwrap_err();
    assert!(matches!(&e, ApplyError::MissingPartition { name, .. } if name == "root-b"), "{e}");

    // A u-boot board's bundle on a GPT node with UKIs.
    let zimage = node.work.join("zImage");
    std::fs::write(&zimage, b"zImage").unwrap();
    let out = node.work.join("board.kiln");
    let parts = vec![
        PartSource { name: "root.squashfs".into(), kind: PartKind::Root, content: Content::Host(b.root.clone()) },
        PartSource { name: "root.verity".into(), kind: PartKind::Verity, content: Content::Host(b.verity.clone()) },
        PartSource { name: "zImage".into(), kind: PartKind::Kernel, content: Content::Host(zimage) },
        PartSource { name: "initramfs.cpio.zst".into(), kind: PartKind::Initramfs, content: Content::Bytes(vec![1, 2, 3]) },
    ];
    let cmdline = format!("roothash={} console=ttyS0", b.roothash);
    let spec = Spec { version: "1.1", arch: Arch::Armv7, profile: "edge", board: Some("beaglebone"), roothash: &b.roothash, cmdline: Some(&cmdline), source_date_epoch: 1 };
    update::write(&out, &spec, &parts, &key).unwrap();
    let keys = [key.public()];
    let r = BundleReader::open(File::open(&out).unwrap(), &Policy { arch: "armv7", ..policy(&keys) }).unwrap();
    let e = apply::apply(r, &Target { disk: &node.disk, esp: &node.esp, running_roothash: a.hash(), tries: 2, progress: None, mbr: None }).unwrap_err();
    assert!(matches!(e, ApplyError::Unsupported { .. }), "{e}");
    assert!(e.to_string().contains("beaglebone") && e.to_string().contains("GPT disk"), "{e}");
}

/// A root of one 4 KiB block has no hash levels: its root hash is the
/// block's own hash, and the tree is the superblock alone.
#[test]
fn a_one_block_root() {
    if !have_sgdisk() {
        return;
    }
    let key = KeyPair::generate();
    let tmp = tempfile::tempdir().unwrap();
    let a = image(tmp.path(), "a", 1, 16 * 4096);
    let tiny = image(tmp.path(), "tiny", 5, 100);
    assert_eq!(std::fs::metadata(&tiny.verity).unwrap().len(), 4096);
    let node = Node::new(&a);
    let done = node.apply(&bundle(&node.work, &key, &tiny, "1.1", &tiny.roothash), &key, &a).unwrap();
    assert_eq!((done.slot, done.root_bytes, done.verity_bytes), (Slot::B, 4096, 4096));
    node.assert_slot_is("b", &tiny);
    node.assert_verifies();
}

// ---- u-boot boards: an MBR card (made with sfdisk) and its boot FAT ----

const SIG: u32 = 0x1a2b_3c4d;
const HASH_OFFSET: u64 = ROOT_MIB << 20;

/// An armv7 card as kiln::image::sdcard lays it out: boot FAT, root-a and root-b
/// (squashfs, then the verity tree at `HASH_OFFSET`), data; image `a` in
/// slot a, and the boot FAT's files as a directory.
struct Card {
    _dir: tempfile::TempDir,
    disk: PathBuf,
    boot: PathBuf,
    work: PathBuf,
}

impl Card {
    fn new(a: &Image) -> Card {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("card.img");
        File::create(&disk).unwrap().set_len(DISK_MIB << 20).unwrap();
        let slot = (ROOT_MIB + 1) * 2048;
        let script = format!("label: dos\nlabel-id: 0x{SIG:08x}\n2048,16384,c,*\n,{slot},83\n,{slot},83\n,,83\n");
        let mut c = kiln_testkit::command("sfdisk").arg("--no-reread").arg("--no-tell-kernel").arg(&disk).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
        std::io::Write::write_all(c.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "sfdisk: {}", String::from_utf8_lossy(&out.stderr));
        let card = Card { boot: dir.path().join("boot"), work: dir.path().join("work"), disk, _dir: dir };
        std::fs::create_dir_all(&card.work).unwrap();
        let (start, _) = card.part(2);
        let f = std::fs::OpenOptions::new().write(true).open(&card.disk).unwrap();
        f.write_all_at(&std::fs::read(&a.root).unwrap(), start).unwrap();
        f.write_all_at(&std::fs::read(&a.verity).unwrap(), start + HASH_OFFSET).unwrap();
        let sa = card.boot.join("kiln/a");
        std::fs::create_dir_all(sa.join("dtbs")).unwrap();
        std::fs::write(sa.join("zImage"), b"zImage a").unwrap();
        std::fs::write(sa.join("extlinux.conf"), b"a's").unwrap();
        uboot::write_state(&card.boot, &State::initial()).unwrap();
        card
    }

    /// Partition `n`'s byte offset and length, as sfdisk reads them.
    fn part(&self, n: u32) -> (u64, u64) {
        let out = kiln_testkit::command("sfdisk").arg("-J").arg(&self.disk).output().unwrap();
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let p = &j["partitiontable"]["partitions"][n as usize - 1];
        (p["start"].as_u64().unwrap() * 512, p["size"].as_u64().unwrap() * 512)
    }

    fn bytes(&self, at: u64, len: u64) -> Vec<u8> {
        let mut b = vec![0u8; len as usize];
        File::open(&self.disk).unwrap().read_exact_at(&mut b, at).unwrap();
        b
    }

    fn state(&self) -> Option<State> {
        uboot::read_state(&self.boot).unwrap()
    }

    fn target<'a>(&'a self, running: &Image, partition: u32, progress: Option<&'a (dyn Fn(apply::Step) + Sync)>) -> Target<'a> {
        Target { disk: &self.disk, esp: &self.boot, running_roothash: running.hash(), tries: 2, progress, mbr: Some(MbrRoot { signature: SIG, partition, hash_offset: HASH_OFFSET }) }
    }

    fn apply(&self, bundle: &Path, key: &KeyPair, running: &Image, partition: u32) -> Result<apply::Applied, ApplyError> {
        let keys = [key.public()];
        let r = BundleReader::open(std::io::BufReader::new(File::open(bundle).unwrap()), &Policy { arch: "armv7", ..policy(&keys) })?;
        apply::apply(r, &self.target(running, partition, None))
    }
}

/// A bundle for a u-boot board: root, verity, zImage, initramfs, a dtb.
fn board_bundle(dir: &Path, key: &KeyPair, img: &Image, version: &str, roothash: &str) -> PathBuf {
    let out = dir.join(format!("board-{version}-{}.kiln", &roothash[..8]));
    let parts = vec![
        PartSource { name: "root.squashfs".into(), kind: PartKind::Root, content: Content::Host(img.root.clone()) },
        PartSource { name: "root.verity".into(), kind: PartKind::Verity, content: Content::Host(img.verity.clone()) },
        PartSource { name: "zImage".into(), kind: PartKind::Kernel, content: Content::Bytes(format!("zImage {version}").into_bytes()) },
        PartSource { name: "initramfs.cpio.zst".into(), kind: PartKind::Initramfs, content: Content::Bytes(kiln_testkit::noise(7, 5000)) },
        PartSource { name: "dtbs/am335x-boneblack.dtb".into(), kind: PartKind::Dtb, content: Content::Bytes(b"dtb".to_vec()) },
    ];
    let cmdline = format!("roothash={roothash} quiet console=ttyS0,115200");
    let spec = Spec { version, arch: Arch::Armv7, profile: "edge", board: Some("beaglebone-black"), roothash, cmdline: Some(&cmdline), source_date_epoch: 1_700_000_000 };
    update::write(&out, &spec, &parts, key).unwrap();
    out
}

#[test]
fn a_uboot_card_takes_the_update_in_the_other_slot_then_back() {
    if kiln_testkit::checker("sfdisk", "fdisk").is_none() {
        return;
    }
    let key = KeyPair::generate();
    let tmp = tempfile::tempdir().unwrap();
    let a = image(tmp.path(), "a", 1, 300 * 4096);
    let b = image(tmp.path(), "b", 2, 700 * 4096);
    let card = Card::new(&a);
    let (pa, la) = card.part(2);
    let (pb, _) = card.part(3);
    let slot_a = card.bytes(pa, la);
    let table = card.bytes(0, 512);

    let bb = board_bundle(&card.work, &key, &b, "1.1", &b.roothash);
    let steps = std::sync::Mutex::new(Vec::new());
    let progress = |s: apply::Step| steps.lock().unwrap().push(s);
    let keys = [key.public()];
    let r = BundleReader::open(File::open(&bb).unwrap(), &Policy { arch: "armv7", ..policy(&keys) }).unwrap();
    let done = apply::apply(r, &card.target(&a, 2, Some(&progress))).unwrap();
    assert_eq!((done.slot, done.entry.as_str()), (Slot::B, "kiln/b/extlinux.conf"));
    use apply::Step::*;
    assert_eq!(*steps.lock().unwrap(), [Writing(Slot::B), Verifying(Slot::B), Installing(Slot::B), Trial(Slot::B)]);

    // Slot b holds b's root and tree; slot a and the table are untouched.
    let root = std::fs::read(&b.root).unwrap();
    assert_eq!(card.bytes(pb, root.len() as u64), root);
    let tree = std::fs::read(&b.verity).unwrap();
    assert_eq!(card.bytes(pb + HASH_OFFSET, tree.len() as u64), tree);
    assert_eq!(card.bytes(pa, la), slot_a);
    assert_eq!(card.bytes(0, 512), table);
    // b's files and boot entry, and b on trial with two tries.
    let sb = card.boot.join("kiln/b");
    assert_eq!(std::fs::read(sb.join("zImage")).unwrap(), b"zImage 1.1");
    assert_eq!(std::fs::read(sb.join("dtbs/am335x-boneblack.dtb")).unwrap(), b"dtb");
    assert_eq!(std::fs::read(sb.join("initramfs.cpio.zst")).unwrap(), kiln_testkit::noise(7, 5000));
    let conf = std::fs::read_to_string(sb.join("extlinux.conf")).unwrap();
    let want = format!("    kernel /kiln/b/zImage\n    fdt /kiln/b/dtbs/am335x-boneblack.dtb\n    initrd /kiln/b/initramfs.cpio.zst\n    append roothash={} quiet console=ttyS0,115200 kiln.slot=b kiln.mbr={SIG:08x},3,{HASH_OFFSET}\n", b.roothash);
    assert!(conf.contains(&want), "{conf}");
    assert_eq!(card.state(), Some(State { good: Slot::A, trial: Some((Slot::B, 2)) }));
    assert_eq!(std::fs::read(card.boot.join("kiln/a/extlinux.conf")).unwrap(), b"a's");

    // Running b (marked good), an update goes back to slot a.
    uboot::write_state(&card.boot, &State { good: Slot::B, trial: None }).unwrap();
    let c = image(tmp.path(), "c", 3, 200 * 4096);
    let cb = board_bundle(&card.work, &key, &c, "1.2", &c.roothash);
    let done = card.apply(&cb, &key, &b, 3).unwrap();
    assert_eq!(done.slot, Slot::A);
    assert_eq!(card.state(), Some(State { good: Slot::B, trial: Some((Slot::A, 2)) }));
    let conf = std::fs::read_to_string(card.boot.join("kiln/a/extlinux.conf")).unwrap();
    assert!(conf.contains(&format!("kiln.slot=a kiln.mbr={SIG:08x},2,{HASH_OFFSET}")), "{conf}");
    assert_eq!(card.bytes(pb, root.len() as u64), root, "the running slot b is untouched");
}

#[test]
fn a_uboot_card_refuses_bad_writes_without_putting_anything_on_trial() {
    if kiln_testkit::checker("sfdisk", "fdisk").is_none() {
        return;
    }
    let key = KeyPair::generate();
    let tmp = tempfile::tempdir().unwrap();
    let a = image(tmp.path(), "a", 1, 300 * 4096);
    let b = image(tmp.path(), "b", 2, 300 * 4096);
    let card = Card::new(&a);
    let (pa, la) = card.part(2);
    let slot_a = card.bytes(pa, la);

    // An earlier apply left b on trial; then a bundle whose root is not its
    // tree's: the read-back fails, and b is neither on trial nor has files.
    uboot::write_state(&card.boot, &State { good: Slot::A, trial: Some((Slot::B, 3)) }).unwrap();
    let other = image(tmp.path(), "other", 9, 300 * 4096);
    let bad = board_bundle(&card.work, &key, &b, "1.1", &other.roothash);
    let e = card.apply(&bad, &key, &a, 2).unwrap_err();
    assert!(matches!(e, ApplyError::RootHashMismatch { slot: Slot::B, .. }), "{e}");
    assert_eq!(card.state(), Some(State::initial()));
    assert!(!card.boot.join("kiln/b").exists());

    // A card with another disk signature than kiln.mbr= says.
    let keys = [key.public()];
    let good = board_bundle(&card.work, &key, &b, "1.1", &b.roothash);
    let r = BundleReader::open(File::open(&good).unwrap(), &Policy { arch: "armv7", ..policy(&keys) }).unwrap();
    let t = Target { mbr: Some(MbrRoot { signature: 0x0bad_0bad, partition: 2, hash_offset: HASH_OFFSET }), ..card.target(&a, 2, None) };
    let e = apply::apply(r, &t).unwrap_err();
    assert!(e.to_string().contains("1a2b3c4d") && e.to_string().contains("0bad0bad"), "{e}");

    // A root too big for the slot (the tree's offset) is refused up front.
    let big = image(tmp.path(), "big", 4, (HASH_OFFSET as usize) + 4096);
    let bigb = board_bundle(&card.work, &key, &big, "1.1", &big.roothash);
    let e = card.apply(&bigb, &key, &a, 2).unwrap_err();
    assert!(matches!(e, ApplyError::TooLarge { .. }), "{e}");

    // A UKI bundle is not for this card.
    let uki = bundle(&card.work, &key, &b, "1.1", &b.roothash);
    let r = BundleReader::open(File::open(&uki).unwrap(), &Policy { arch: "amd64", ..policy(&keys) }).unwrap();
    let e = apply::apply(r, &card.target(&a, 2, None)).unwrap_err();
    assert!(matches!(e, ApplyError::Unsupported { .. }) && e.to_string().contains("u-boot"), "{e}");

    // A bundle cut short: nothing on trial.
    let cut = card.work.join("cut.kiln");
    let full = std::fs::read(&good).unwrap();
    std::fs::write(&cut, &full[..full.len() / 2]).unwrap();
    assert!(card.apply(&cut, &key, &a, 2).is_err());
    assert_eq!(card.state(), Some(State::initial()));
    assert!(!card.boot.join("kiln/b").exists());
    assert_eq!(card.bytes(pa, la), slot_a, "the running slot is never written");

    // And then the good one.
    card.apply(&good, &key, &a, 2).unwrap();
    assert_eq!(card.state(), Some(State { good: Slot::A, trial: Some((Slot::B, 2)) }));
}
